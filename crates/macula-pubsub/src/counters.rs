//! Counters of everything the core did, dropped or refused.
//!
//! Atomics (relaxed) rather than plain integers so that a metrics scrape
//! reads them without taking the driver's lock around the core; the core
//! is still the only writer of most of them. This module must not decide
//! anything.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One node's pub/sub counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub published_total: AtomicU64,
    /// Events pushed into local subscription queues (the driver counts them
    /// as it pushes).
    pub delivered_local_total: AtomicU64,
    /// Events dropped from full subscription queues (slow subscribers).
    pub dropped_slow_total: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Messages queued to other nodes (one per interested node).
    pub sent_remote_total: AtomicU64,
    /// Messages received from other nodes and accepted.
    pub received_remote_total: AtomicU64,
    /// Received duplicates (or stale sequence numbers) dropped.
    pub duplicates_dropped_total: AtomicU64,
    /// Messages the receiver saw as missing (sequence gaps).
    pub gaps_total: AtomicU64,
    /// Outbound messages dropped: peer queue full, peer unreachable, peer
    /// cut off, or too large for the peer's frame limit.
    pub remote_dropped_total: AtomicU64,
    /// Received messages refused (bad topic, publisher mismatch, oversized).
    pub remote_rejected_total: AtomicU64,
    /// PUBLISH_BATCH frames written to data streams.
    pub batches_sent_total: AtomicU64,
    /// PUBLISH_BATCH frames received.
    pub batches_received_total: AtomicU64,
    /// Peers cut off because their data stream accepted nothing for the
    /// stall timeout.
    pub peers_cut_off_total: AtomicU64,
    /// Inbound data streams closed for bad input (malformed frame, wrong
    /// kind, publisher mismatch).
    pub data_streams_rejected_total: AtomicU64,
    /// Messages received that another node forwarded for their publisher
    /// (a gateway for its client).
    pub forwarded_received_total: AtomicU64,
    /// Messages this node forwarded as a gateway: clients' messages into
    /// the mesh and matching events to clients (one per target).
    pub forwarded_sent_total: AtomicU64,
    /// Received messages (new, valid) that matched no subscription or
    /// client feed here: dropped quietly. Expected after an interest record
    /// was summarized, and briefly after an unsubscribe.
    pub unmatched_total: AtomicU64,
    /// Interest record puts into the DHT, failed ones included (concurrent
    /// updates of one name share a put).
    pub interest_puts_total: AtomicU64,
    /// Interest records put as a summary (generalized patterns) because the
    /// exact list was over the record limit.
    pub interest_summarized_total: AtomicU64,
    /// Outbound messages dropped because they do not fit the receiving
    /// node's frame limit (its HELLO `max_frame_size`); also counted in
    /// `remote_dropped_total`.
    pub too_large_for_peer_total: AtomicU64,
    /// Interested nodes found unreachable (connection timed out or closed
    /// by the node leaving, or a failed attempt to reach it): their
    /// interest is set aside and nothing is queued to them.
    pub peers_unreachable_total: AtomicU64,
    /// Nodes set aside as unreachable that came back (reconnected, or put
    /// a newer interest record).
    pub peers_restored_total: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
