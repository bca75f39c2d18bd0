//! Macula wire protocol: node identifiers, protocol limits, the frame codec and
//! every message type that crosses the network.
//!
//! This crate is the protocol boundary. It does no I/O, reads no clock and knows
//! nothing about tokio or QUIC: callers hand it bytes and get typed messages back
//! (or a typed error). Only types in this crate derive `Serialize`; everything
//! serialisable here is a compatibility promise documented in `docs/PROTOCOL.md`.
//!
//! **Invariant:** decoding never panics and never allocates more than the frame
//! length the caller allowed.

pub mod backoff;
pub mod bucket;
pub mod client;
pub mod dht;
pub mod frame;
pub mod limits;
pub mod message;
pub mod nat;
pub mod node_id;
pub mod pubsub;
pub mod raft;
pub mod relay;
pub mod rng;
pub mod rpc;
pub mod status;
pub mod suspect;
pub mod time;
pub mod trace;
pub mod ttl_cache;

pub use client::ClientMessage;
pub use dht::{dht_key, DhtMessage, WireContact, WireRecord};
pub use frame::{FrameDecoder, FrameError, FrameHeader, RawFrame, FRAME_HEADER_LEN};
pub use limits::*;
pub use message::{
    DecodeError, Disconnect, DisconnectReason, EncodeError, ErrorCode, ErrorFrame, Hello, Message,
    MessageType, Ping, Pong,
};
pub use node_id::{NodeId, ParseNodeIdError};
pub use pubsub::{
    encode_batch_frame, encode_sealed_batch_frame, event_digest, event_digest_aligned,
    group_digest, is_hop_header, seal_hash, seal_hash_aligned, seal_hash_groups, seal_hash_whole,
    seal_node, seal_tree_absent, seal_tree_absent_count, seal_tree_depth, seal_whole, BatchEntry,
    BatchHead, BatchItem, BatchMessage, Publish, PublishBatch, PublishBatchView, PublishDropped,
    Seal, SealHashes, SealTree, WholeHasher,
};
pub use raft::{RaftKind, RaftMessage, RaftRequest, RaftResponse, RaftStatus};
pub use relay::{RelayCode, RelayMessage, RelayRecord};
pub use rpc::{Advertisement, RpcErrorKind, RpcMessage, ServiceIndex};
pub use status::{
    NodeStatus, StatusLink, StatusMessage, StatusReport, StatusRequest, StatusTotals,
};
pub use time::Millis;

/// Decodes an optional body field: nil is the same as absent, the stated
/// default (PROTOCOL.md 4.1). Senders omit absent fields instead of
/// sending nil (`skip_serializing_if` on `Option` fields).
pub(crate) fn nil_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de> + Default,
{
    Ok(<Option<T> as serde::Deserialize>::deserialize(d)?.unwrap_or_default())
}
