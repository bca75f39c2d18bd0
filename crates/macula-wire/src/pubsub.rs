//! Pub/sub messages on the wire (types `0x30..=0x4f`).
//!
//! A publisher sends one PUBLISH to each node that has a matching
//! subscription; that node delivers it to its local subscribers. Wire types
//! only: matching, interest and delivery live in `macula-pubsub` and the
//! runtime.

use serde::{Deserialize, Serialize};

use crate::node_id::NodeId;

/// Topic length on the wire (the pub/sub core's limit is 256).
pub const MAX_WIRE_TOPIC_LEN: usize = 512;
/// Headers on one message.
pub const MAX_WIRE_HEADERS: usize = 32;
/// Header name and value lengths.
pub const MAX_WIRE_HEADER_LEN: usize = 1024;
/// Message ID length.
pub const MAX_WIRE_MESSAGE_ID_LEN: usize = 256;

/// One published message, sent to one interested node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub topic: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The publishing node; must be the node that sent the frame.
    pub publisher: NodeId,
    /// Publisher's run (Unix ms of its start); `seq` restarts at 1 with it.
    pub epoch: u64,
    /// Per-publisher sequence number: delivery is in this order, once.
    pub seq: u64,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub message_id: Option<String>,
}

impl Publish {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.topic.len() > MAX_WIRE_TOPIC_LEN {
            return Err(format!("topic of {} bytes", self.topic.len()));
        }
        if self.headers.len() > MAX_WIRE_HEADERS {
            return Err(format!(
                "{} headers, limit {MAX_WIRE_HEADERS}",
                self.headers.len()
            ));
        }
        if self
            .headers
            .iter()
            .any(|(k, v)| k.len() > MAX_WIRE_HEADER_LEN || v.len() > MAX_WIRE_HEADER_LEN)
        {
            return Err("header too long".into());
        }
        if self
            .message_id
            .as_ref()
            .is_some_and(|m| m.len() > MAX_WIRE_MESSAGE_ID_LEN)
        {
            return Err("message ID too long".into());
        }
        Ok(())
    }
}
