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
    /// Messages dropped from a full peer queue to make room for a newer one
    /// ([`crate::Overflow::DropOldest`]); also in `remote_dropped_total`.
    pub remote_evicted_total: AtomicU64,
    /// Publishes that found a queue full and waited for room
    /// ([`crate::Overflow::Block`], counted once per wait).
    pub publish_blocked_total: AtomicU64,
    /// Publishes refused because a queue was full
    /// ([`crate::Overflow::FailFast`]).
    pub publish_refused_total: AtomicU64,
    /// Dropped messages named in loss reports sent to the nodes they were
    /// for (PUBLISH_DROPPED), in-flight losses included.
    pub loss_reported_total: AtomicU64,
    /// Dropped messages that could not be reported: the node was gone (set
    /// aside, or this node shut down) or the report table was full.
    pub loss_unreported_total: AtomicU64,
    /// Missed events told to local subscriptions (as `Lagged`) from loss
    /// reports received, per subscription.
    pub loss_told_total: AtomicU64,
    /// Subscriptions that took nothing while a data stream waited on them
    /// for the subscriber bound (half the stall timeout): readers stopped
    /// waiting for them (their full queues drop their oldest, `Lagged`).
    pub subscriber_overruns_total: AtomicU64,
}

impl Counters {
    /// Every counter as (metric name, help, value), for the driver's
    /// metrics exporter: the names are a compatibility promise to dashboards.
    pub fn rows(&self) -> [(&'static str, &'static str, u64); 29] {
        let g = |a: &AtomicU64| a.load(Relaxed);
        [
            ("macula_pubsub_published_total", "Messages published on this node.", g(&self.published_total)),
            ("macula_pubsub_delivered_local_total", "Events queued to local subscriptions.", g(&self.delivered_local_total)),
            ("macula_pubsub_dropped_slow_total", "Events dropped from full subscription queues (slow subscribers).", g(&self.dropped_slow_total)),
            ("macula_pubsub_subscriptions", "Live subscriptions on this node.", g(&self.subscriptions)),
            ("macula_pubsub_sent_remote_total", "Messages queued to interested nodes (one per node).", g(&self.sent_remote_total)),
            ("macula_pubsub_received_remote_total", "Messages received from other nodes and delivered.", g(&self.received_remote_total)),
            ("macula_pubsub_duplicates_dropped_total", "Received duplicates dropped.", g(&self.duplicates_dropped_total)),
            ("macula_pubsub_gaps_total", "Messages seen missing from a publisher's sequence.", g(&self.gaps_total)),
            ("macula_pubsub_remote_dropped_total", "Outbound messages dropped (queue full, node unreachable or cut off, too large for the node).", g(&self.remote_dropped_total)),
            ("macula_pubsub_remote_rejected_total", "Received messages refused (bad topic, wrong publisher, oversized).", g(&self.remote_rejected_total)),
            ("macula_pubsub_batches_sent_total", "PUBLISH_BATCH frames written to pub/sub data streams.", g(&self.batches_sent_total)),
            ("macula_pubsub_batches_received_total", "PUBLISH_BATCH frames received.", g(&self.batches_received_total)),
            ("macula_pubsub_peers_cut_off_total", "Peers whose pub/sub data stream was reset because it accepted nothing for the stall timeout.", g(&self.peers_cut_off_total)),
            ("macula_pubsub_data_streams_rejected_total", "Inbound pub/sub data streams closed for bad input.", g(&self.data_streams_rejected_total)),
            ("macula_pubsub_forwarded_received_total", "Messages received that another node forwarded for their publisher (a gateway for its client).", g(&self.forwarded_received_total)),
            ("macula_pubsub_forwarded_sent_total", "Messages this node forwarded as a gateway: clients' messages into the mesh and events to clients.", g(&self.forwarded_sent_total)),
            ("macula_pubsub_unmatched_total", "Received messages that matched no subscription here, dropped (expected when an interest record is a summary, or just after an unsubscribe).", g(&self.unmatched_total)),
            ("macula_pubsub_interest_puts_total", "Interest record puts into the DHT, failed ones included (concurrent updates of one name share a put).", g(&self.interest_puts_total)),
            ("macula_pubsub_interest_summarized_total", "Interest records put as a summary (generalized patterns) because the exact list was over the DHT record size limit.", g(&self.interest_summarized_total)),
            ("macula_pubsub_too_large_for_peer_total", "Outbound messages dropped because they exceed the receiving node's frame limit (its HELLO max_frame_size).", g(&self.too_large_for_peer_total)),
            ("macula_pubsub_peers_unreachable_total", "Interested nodes found unreachable (connection timed out, node left, or not reachable): their interest is set aside.", g(&self.peers_unreachable_total)),
            ("macula_pubsub_peers_restored_total", "Nodes set aside as unreachable that came back (reconnected, or put a newer interest record).", g(&self.peers_restored_total)),
            ("macula_pubsub_remote_evicted_total", "Messages dropped from a full peer queue to make room for a newer one (DropOldest); also in remote_dropped_total.", g(&self.remote_evicted_total)),
            ("macula_pubsub_publish_blocked_total", "Publishes that found a peer queue full and waited for room (Block).", g(&self.publish_blocked_total)),
            ("macula_pubsub_publish_refused_total", "Publishes refused because a peer queue was full (FailFast).", g(&self.publish_refused_total)),
            ("macula_pubsub_loss_reported_total", "Dropped messages named in loss reports (PUBLISH_DROPPED) sent to the nodes they were for.", g(&self.loss_reported_total)),
            ("macula_pubsub_loss_unreported_total", "Dropped messages that could not be reported (node gone, shutting down, report table full).", g(&self.loss_unreported_total)),
            ("macula_pubsub_subscriber_overruns_total", "Subscriptions that took nothing for half the stall timeout while a data stream waited for room in them; no longer waited for until they catch up (their full queues drop the oldest, told as Lagged).", g(&self.subscriber_overruns_total)),
            ("macula_pubsub_loss_told_total", "Missed events told to local subscriptions as Lagged from loss reports received (per subscription).", g(&self.loss_told_total)),
        ]
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_a_named_row() {
        let c = Counters::default();
        Counters::inc(&c.published_total);
        Counters::add(&c.peers_restored_total, 3);
        Counters::add(&c.gaps_total, 0);
        let rows = c.rows();
        let mut names: Vec<&str> = rows.iter().map(|r| r.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), rows.len(), "distinct names");
        for (name, help, _) in &rows {
            assert!(name.starts_with("macula_pubsub_"), "{name}");
            assert!(help.len() > 10, "{name} has help");
        }
        let value = |n: &str| rows.iter().find(|r| r.0 == n).map(|r| r.2);
        assert_eq!(value("macula_pubsub_published_total"), Some(1));
        assert_eq!(value("macula_pubsub_peers_restored_total"), Some(3));
        assert_eq!(value("macula_pubsub_gaps_total"), Some(0));
        assert_eq!(rows.iter().map(|r| r.2).sum::<u64>(), 4);
    }
}
