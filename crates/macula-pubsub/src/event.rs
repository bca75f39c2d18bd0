//! What applications see of pub/sub: delivered events, publish options, the
//! shared topic name, and the errors a publish or subscribe can return.
//!
//! These are plain values; this module must not hold behaviour beyond the
//! checks of what an application passes in.

use std::sync::Arc;

use bytes::Bytes;
use macula_wire::NodeId;

use crate::topic::TopicError;

/// Headers on one message; more is [`PubSubError::TooManyHeaders`].
pub const MAX_HEADERS: usize = 32;
/// Length of one header name.
pub const MAX_HEADER_NAME_LEN: usize = 64;
/// Length of one header value.
pub const MAX_HEADER_VALUE_LEN: usize = 1024;
/// Room kept in a frame for topic, headers and framing, so any payload we
/// accept locally also fits one frame when it is sent to another node with
/// the same frame limit.
pub const FRAME_HEADROOM: usize = 64 * 1024;

/// Why a publish or subscribe was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PubSubError {
    #[error("invalid topic {topic:?}: {source}")]
    InvalidTopic { topic: String, source: TopicError },
    #[error("invalid pattern {pattern:?}: {source}")]
    InvalidPattern { pattern: String, source: TopicError },
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("{n} headers, the limit is {MAX_HEADERS}")]
    TooManyHeaders { n: usize },
    #[error("header {name:?} is too long (name <= {MAX_HEADER_NAME_LEN}, value <= {MAX_HEADER_VALUE_LEN} bytes)")]
    HeaderTooLong { name: String },
    #[error("this node already has {max} subscriptions")]
    TooManySubscriptions { max: usize },
    /// The subscription could not be announced to the mesh (DHT put failed);
    /// it was not created.
    #[error("could not register interest in {pattern:?} with the mesh: {reason}")]
    Interest { pattern: String, reason: String },
    /// Client mode: no gateway connection right now (it is failing over to
    /// another configured node); the message was not sent.
    #[error("not attached to a gateway (client mode); retry once it reconnects")]
    Detached,
    /// The topic is encrypted end to end (a realm key set names a pattern
    /// that matches it) and this publisher cannot seal: it holds no active
    /// key for it. Nothing was published.
    #[error("cannot publish on {topic:?}: {reason}")]
    Sealing { topic: String, reason: String },
    /// The operation needs a full node's view of the mesh's interest (a
    /// lightweight client only sees its gateway).
    #[error("{what} needs a full node; a lightweight client does not see the mesh's interest")]
    NeedsFullNode { what: &'static str },
    /// [`Overflow::FailFast`]: the queue to an interested node is full;
    /// nothing was published (no node got the message).
    #[error("the queue to node {node} is full ({queued} messages, {bytes} bytes); nothing was published")]
    QueueFull {
        node: NodeId,
        queued: usize,
        bytes: usize,
    },
    /// A flush did not finish in time: `pending` messages were still
    /// queued or being written to other nodes (or, with acknowledgement,
    /// `pending` data streams were not acknowledged yet).
    #[error("flush not done after {waited:?}: {pending} {what} still pending")]
    FlushTimeout {
        pending: u64,
        what: &'static str,
        waited: std::time::Duration,
    },
    /// The realm's permissions refuse it (`kind`: why, e.g.
    /// `not_allowed`, `denied_by_rule`).
    #[error("{message}")]
    Unauthorized { kind: &'static str, message: String },
}

/// Checks an application's headers against the limits above.
pub fn check_headers(headers: &[(String, String)]) -> Result<(), PubSubError> {
    if headers.len() > MAX_HEADERS {
        return Err(PubSubError::TooManyHeaders { n: headers.len() });
    }
    match headers
        .iter()
        .find(|(k, v)| k.len() > MAX_HEADER_NAME_LEN || v.len() > MAX_HEADER_VALUE_LEN)
    {
        Some((k, _)) => Err(PubSubError::HeaderTooLong { name: k.clone() }),
        None => Ok(()),
    }
}

/// A topic name as events carry it: shared (cloning it is a reference-count
/// increment, not a copy), compares with `&str` and `String`, and derefs to
/// `str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TopicName {
    fn from(s: &str) -> Self {
        TopicName(Arc::from(s))
    }
}

impl From<String> for TopicName {
    fn from(s: String) -> Self {
        TopicName(Arc::from(s))
    }
}

impl From<TopicName> for String {
    fn from(t: TopicName) -> String {
        t.0.to_string()
    }
}

impl PartialEq<str> for TopicName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for TopicName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for TopicName {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl serde::Serialize for TopicName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Shared between the events of one topic (see [`TopicName`]).
    pub topic: TopicName,
    pub payload: Bytes,
    /// The node that published it.
    pub publisher: NodeId,
    /// Publisher's sequence number (per publisher epoch, from 1): events of
    /// one publisher arrive in this order, without duplicates.
    pub seq: u64,
    /// Identifies the publisher's run: `seq` restarts at 1 when it changes,
    /// and it grows across the publisher's restarts.
    pub epoch: u64,
    pub headers: Vec<(String, String)>,
    /// Application message ID, if the publisher set one.
    pub message_id: Option<String>,
    /// How `publisher` is known: proved (by the connection that carried
    /// it, or by its signature) or asserted by a client's gateway.
    pub proof: crate::proof::Proof,
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionItem {
    Event(Event),
    /// This many events were lost before the next one: the subscriber was
    /// too slow (its queue dropped its oldest), a node on the way dropped
    /// them and said so (a loss report), or a lightweight client lost the
    /// gateway that carried them (an upper bound when the publisher also
    /// publishes on topics this client does not take).
    Lagged(u64),
}

/// Options of a publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
    /// What to do when the queue to an interested node is full (this node
    /// only: not sent).
    pub overflow: Overflow,
}

/// What a publish does when the queue to an interested node is full (see
/// `outbound::PEER_QUEUE_CAPACITY` and `PEER_QUEUE_BYTES`). Every drop is
/// counted (`macula_pubsub_remote_dropped_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// Wait for room (the default): the publisher goes at the pace of the
    /// network and of the slowest interested node. A node whose data stream
    /// accepts nothing for the stall timeout (10 s) is cut off (counted,
    /// logged) and the publish goes on without it: that is the longest one
    /// stalled node holds the others up.
    #[default]
    Block,
    /// Make room by dropping the oldest messages queued to that node.
    DropOldest,
    /// Drop this message for that node; the others still get it.
    DropNewest,
    /// Publish nothing and return [`PubSubError::QueueFull`].
    FailFast,
}

impl PublishOptions {
    /// `None` when there is nothing to carry: most messages, which then cost
    /// no allocation for their options.
    pub(crate) fn shared(self) -> Option<Arc<PublishOptions>> {
        // `overflow` is this node's business: it alone never costs an Arc.
        (!self.headers.is_empty() || self.message_id.is_some()).then(|| Arc::new(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_against_their_limits() {
        let ok = vec![("k".to_string(), "v".to_string()); MAX_HEADERS];
        assert_eq!(check_headers(&ok), Ok(()));
        let many = vec![("k".to_string(), "v".to_string()); MAX_HEADERS + 1];
        assert_eq!(
            check_headers(&many),
            Err(PubSubError::TooManyHeaders { n: MAX_HEADERS + 1 })
        );
        let name = "n".repeat(MAX_HEADER_NAME_LEN);
        let value = "v".repeat(MAX_HEADER_VALUE_LEN);
        assert_eq!(check_headers(&[(name.clone(), value.clone())]), Ok(()));
        let long_name = format!("{name}x");
        assert_eq!(
            check_headers(&[(long_name.clone(), "v".into())]),
            Err(PubSubError::HeaderTooLong { name: long_name })
        );
        assert_eq!(
            check_headers(&[("k".into(), format!("{value}x"))]),
            Err(PubSubError::HeaderTooLong { name: "k".into() })
        );
    }

    #[test]
    fn topic_names_compare_and_convert() {
        let t = TopicName::from("a.b");
        assert_eq!(t, "a.b");
        assert_eq!(t, *"a.b");
        assert_eq!(t, "a.b".to_string());
        assert_eq!(t.as_str(), "a.b");
        assert_eq!(&*t, "a.b");
        assert_eq!(String::from(t.clone()), "a.b");
        assert_eq!(format!("{t} {t:?}"), "a.b \"a.b\"");
        assert_eq!(TopicName::from("a.b".to_string()), t);
        let r: &str = t.as_ref();
        assert_eq!(r, "a.b");
        assert_ne!(t, "a.c");
        assert_ne!(t, *"a.c");
        assert_ne!(t, "a.c".to_string());
        let mut by_name = std::collections::HashMap::new();
        by_name.insert(t.clone(), 1);
        assert_eq!(by_name.get("a.b"), Some(&1), "borrows as its text");
        assert_eq!(FRAME_HEADROOM, 65_536);
    }

    #[test]
    fn options_are_shared_only_when_set() {
        assert!(PublishOptions::default().shared().is_none());
        let o = PublishOptions {
            headers: vec![],
            message_id: Some("m".into()),
            ..Default::default()
        };
        assert!(o.shared().is_some());
        let o = PublishOptions {
            headers: vec![("k".into(), "v".into())],
            message_id: None,
            ..Default::default()
        };
        assert!(o.shared().is_some());
        let o = PublishOptions {
            overflow: Overflow::FailFast,
            ..Default::default()
        };
        assert!(o.shared().is_none(), "the policy alone costs no Arc");
    }
}
