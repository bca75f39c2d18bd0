//! Every limit of the pub/sub core in one overridable struct.
//!
//! Each field defaults to a named constant that lives next to the code it
//! bounds (and says why it has that value). This module only gathers them so
//! the runtime can expose one set of knobs; it must not hold behaviour.

use crate::dedup::MAX_PUBLISHERS;
use crate::local::MAX_SUBSCRIPTIONS;
use crate::outbound::{MAX_OUTBOUND_PEERS, PEER_QUEUE_BYTES, PEER_QUEUE_CAPACITY};
use crate::queue::{QUEUE_BYTES, QUEUE_CAPACITY};
use crate::sublist::CACHE_CAPACITY;
use crate::topic::{MAX_DOUBLE_WILDCARDS, MAX_SEGMENTS, MAX_TOPIC_LEN};

/// The limits of the pub/sub core. `Limits::default()` is what a production
/// mesh runs with; override single fields with struct update syntax:
///
/// ```
/// let limits = macula_pubsub::Limits { queue_capacity: 64, ..Default::default() };
/// assert_eq!(limits.max_segments, macula_pubsub::topic::MAX_SEGMENTS);
/// ```
///
/// Every node of a mesh should validate topics with the same values: a topic
/// one node accepts and another rejects is dropped (and counted) at the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest topic or pattern, in bytes (see [`MAX_TOPIC_LEN`]).
    pub max_topic_len: usize,
    /// Most segments in a topic or pattern (see [`MAX_SEGMENTS`]).
    pub max_segments: usize,
    /// Most `**` segments in one pattern (see [`MAX_DOUBLE_WILDCARDS`]).
    /// Raising it raises the worst-case cost of matching one topic.
    pub max_double_wildcards: usize,
    /// Entries in a [`crate::Sublist`]'s result cache; 0 disables the cache
    /// (see [`CACHE_CAPACITY`]).
    pub cache_capacity: usize,
    /// Publishers a [`crate::SeqTracker`] remembers; at least 1 is used
    /// (see [`MAX_PUBLISHERS`]).
    pub max_publishers: usize,
    /// Messages a [`crate::BoundedQueue`] holds before dropping the oldest;
    /// at least 1 is used (see [`QUEUE_CAPACITY`]).
    pub queue_capacity: usize,
    /// Bytes a [`crate::BoundedQueue`] holds (as weighed by `push_sized`)
    /// before dropping the oldest (see [`QUEUE_BYTES`]).
    pub queue_bytes: usize,
    /// Subscriptions one node holds, client feeds' patterns included
    /// (see [`MAX_SUBSCRIPTIONS`]).
    pub max_subscriptions: usize,
    /// Messages queued for one remote node before a publish waits or
    /// drops, as its `Overflow` says (see [`PEER_QUEUE_CAPACITY`]).
    pub peer_queue_capacity: usize,
    /// Payload bytes queued for one remote node before a publish waits or
    /// drops (see [`PEER_QUEUE_BYTES`]).
    pub peer_queue_bytes: usize,
    /// Remote nodes with an outbound queue at once (see
    /// [`MAX_OUTBOUND_PEERS`]).
    pub max_outbound_peers: usize,
    /// Proved publishers (PROTOCOL.md §5.3): a client seals its batches
    /// and a full node drops forwarded batches that no seal proves. On by
    /// default; off only to measure what proofs cost (`macula bench
    /// proofs`), or beside nodes that predate them.
    pub proofs: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_topic_len: MAX_TOPIC_LEN,
            max_segments: MAX_SEGMENTS,
            max_double_wildcards: MAX_DOUBLE_WILDCARDS,
            cache_capacity: CACHE_CAPACITY,
            max_publishers: MAX_PUBLISHERS,
            queue_capacity: QUEUE_CAPACITY,
            queue_bytes: QUEUE_BYTES,
            max_subscriptions: MAX_SUBSCRIPTIONS,
            peer_queue_capacity: PEER_QUEUE_CAPACITY,
            peer_queue_bytes: PEER_QUEUE_BYTES,
            max_outbound_peers: MAX_OUTBOUND_PEERS,
            proofs: true,
        }
    }
}
