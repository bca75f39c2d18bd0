//! The DHT's internal request and response types, and the outgoing envelope.
//!
//! These are plain Rust values, not a wire format: the mapping to frames (and the
//! compatibility promise that comes with it) lives in the wire crate, so nothing
//! here derives `Serialize`. Correlation IDs travel beside the message, not in it.

use std::sync::Arc;

use macula_wire::NodeId;

use crate::record::{Record, RecordError};
use crate::Millis;

/// A peer: its node ID (proved by the TLS handshake in the real node) and an
/// opaque address the runtime knows how to dial (a socket address string there,
/// `sim:<n>` in the simulator). `Arc<str>` because contacts are copied into every
/// FIND_NODE response and lookup shortlist; cloning must not allocate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Contact {
    /// The peer's node ID.
    pub id: NodeId,
    /// Where to reach it; the core never parses it.
    pub addr: Arc<str>,
}

impl Contact {
    /// A contact from an ID and any string-like address.
    pub fn new(id: NodeId, addr: impl Into<Arc<str>>) -> Contact {
        Contact {
            id,
            addr: addr.into(),
        }
    }
}

/// Matches a response to the request it answers. Unique per node for the life of
/// the process (a 64-bit counter starting at a random value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CorrelationId(pub u64);

/// What one node asks another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Are you alive? Answered with [`Response::Pong`].
    Ping,
    /// Which nodes do you know closest to `target`? Answered with [`Response::Nodes`].
    FindNode {
        /// The ID being looked up.
        target: NodeId,
    },
    /// Which records do you hold for `key`, and which nodes are closer?
    /// Answered with [`Response::Value`] (or [`Response::Nodes`] if none).
    FindValue {
        /// The record key.
        key: NodeId,
    },
    /// Please hold this record for at most `ttl` (never longer than `record.ttl`:
    /// a replicating node forwards what is left of the lifetime, not a new one).
    Store {
        /// The signed record.
        record: Record,
        /// Remaining lifetime.
        ttl: Millis,
    },
}

impl Request {
    /// Short name, for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::FindNode { .. } => "find_node",
            Request::FindValue { .. } => "find_value",
            Request::Store { .. } => "store",
        }
    }
}

/// What a node answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong,
    /// Up to k contacts closest to the target (never the requester itself).
    Nodes {
        /// Closest known contacts, nearest first.
        closer: Vec<Contact>,
    },
    /// Records held for the key (possibly empty) plus closer contacts, so a
    /// FIND_VALUE can keep collecting from every replica.
    Value {
        /// Records for the key, at most one per publisher.
        records: Vec<Record>,
        /// Closest known contacts, nearest first.
        closer: Vec<Contact>,
    },
    /// The record was stored.
    Stored,
    /// The record was refused, and why.
    StoreRejected(RecordError),
}

/// A request the core wants sent. The runtime sends `request` to `to`, and hands
/// the peer's answer back to [`crate::Dht::handle_response`] with the same
/// `correlation_id`; if no answer comes it does nothing (the core times it out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination.
    pub to: Contact,
    /// Echoed by the peer's response.
    pub correlation_id: CorrelationId,
    /// What to send.
    pub request: Request,
}
