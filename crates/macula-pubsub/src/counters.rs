//! Counters of everything the core did, dropped or refused.
//!
//! prometheus-client `Counter`s and `Gauge`s (relaxed atomics; the crate
//! does no I/O) so that a metrics scrape reads them without taking the
//! driver's lock around the core; the core is still the only writer of most
//! of them. Each is declared once, in [`Counters::register`]: its exported
//! name, help text and (by its type) kind. This module must not decide
//! anything.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

/// One node's pub/sub counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub published_total: Counter,
    /// Events pushed into local subscription queues (the driver counts them
    /// as it pushes).
    pub delivered_local_total: Counter,
    /// Events dropped from full subscription queues (slow subscribers).
    pub dropped_slow_total: Counter,
    /// Messages refused by the realm's permissions where they were
    /// delivered: received from a peer that may not publish them, or kept
    /// from a peer that may not subscribe to them.
    pub unauthorized_dropped_total: Counter,
    /// Live subscriptions (a gauge).
    pub subscriptions: Gauge<u64, AtomicU64>,
    /// Messages queued to other nodes (one per interested node).
    pub sent_remote_total: Counter,
    /// Messages received from other nodes and accepted.
    pub received_remote_total: Counter,
    /// Received duplicates (or stale sequence numbers) dropped.
    pub duplicates_dropped_total: Counter,
    /// Messages the receiver saw as missing (sequence gaps).
    pub gaps_total: Counter,
    /// Outbound messages dropped: peer queue full, peer unreachable, peer
    /// cut off, or too large for the peer's frame limit.
    pub remote_dropped_total: Counter,
    /// Received messages refused (bad topic, publisher mismatch, oversized).
    pub remote_rejected_total: Counter,
    /// PUBLISH_BATCH frames written to data streams.
    pub batches_sent_total: Counter,
    /// PUBLISH_BATCH frames received.
    pub batches_received_total: Counter,
    /// Peers cut off because their data stream accepted nothing for the
    /// stall timeout.
    pub peers_cut_off_total: Counter,
    /// Inbound data streams closed for bad input (malformed frame, wrong
    /// kind, publisher mismatch).
    pub data_streams_rejected_total: Counter,
    /// Messages received that another node forwarded for their publisher
    /// (a gateway for its client).
    pub forwarded_received_total: Counter,
    /// Received messages dropped because their publisher was not proved:
    /// a forwarded batch without a seal, or one whose seal does not verify
    /// (a forged publisher). Never delivered.
    pub unproved_dropped_total: Counter,
    /// Messages this node forwarded as a gateway: clients' messages into
    /// the mesh and matching events to clients (one per target).
    pub forwarded_sent_total: Counter,
    /// Received messages (new, valid) that matched no subscription or
    /// client feed here: dropped quietly. Expected after an interest record
    /// was summarized, and briefly after an unsubscribe.
    pub unmatched_total: Counter,
    /// Interest record puts into the DHT, failed ones included (concurrent
    /// updates of one name share a put).
    pub interest_puts_total: Counter,
    /// Interest records put as a summary (generalized patterns) because the
    /// exact list was over the record limit.
    pub interest_summarized_total: Counter,
    /// Outbound messages dropped because they do not fit the receiving
    /// node's frame limit (its HELLO `max_frame_size`); also counted in
    /// `remote_dropped_total`.
    pub too_large_for_peer_total: Counter,
    /// Forwarded messages left out of a frame because it would have
    /// carried only part of their topic group in a seal of kind 3 (which
    /// then would not verify); reported lost to the receiver and also
    /// counted in `remote_dropped_total`.
    pub ungrouped_total: Counter,
    /// Interested nodes found unreachable (connection timed out or closed
    /// by the node leaving, or a failed attempt to reach it): their
    /// interest is set aside and nothing is queued to them.
    pub peers_unreachable_total: Counter,
    /// Nodes set aside as unreachable that came back (reconnected, or put
    /// a newer interest record).
    pub peers_restored_total: Counter,
    /// Messages dropped from a full peer queue to make room for a newer one
    /// ([`crate::Overflow::DropOldest`]); also in `remote_dropped_total`.
    pub remote_evicted_total: Counter,
    /// Publishes that found a queue full and waited for room
    /// ([`crate::Overflow::Block`], counted once per wait).
    pub publish_blocked_total: Counter,
    /// Publishes refused because a queue was full
    /// ([`crate::Overflow::FailFast`]).
    pub publish_refused_total: Counter,
    /// Dropped messages named in loss reports sent to the nodes they were
    /// for (PUBLISH_DROPPED), in-flight losses included.
    pub loss_reported_total: Counter,
    /// Dropped messages that could not be reported: the node was gone (set
    /// aside, or this node shut down) or the report table was full.
    pub loss_unreported_total: Counter,
    /// Missed events told to local subscriptions (as `Lagged`) from loss
    /// reports received, per subscription.
    pub loss_told_total: Counter,
    /// Subscriptions that took nothing while a data stream waited on them
    /// for the subscriber bound (half the stall timeout): readers stopped
    /// waiting for them (their full queues drop their oldest, `Lagged`).
    pub subscriber_overruns_total: Counter,
    /// Seconds events waited in local subscription queues (the driver,
    /// which has a clock, observes it as the application takes each event).
    pub delivery_wait: DeliveryWait,
}

/// Histogram of how long an event waited in a subscription queue, from
/// being queued (arrived at the node, or published locally) to the
/// application taking it (`macula_pubsub_delivery_wait_seconds`).
#[derive(Debug, Clone)]
pub struct DeliveryWait(pub prometheus_client::metrics::histogram::Histogram);

impl Default for DeliveryWait {
    fn default() -> Self {
        // 10 µs .. ~10 s.
        DeliveryWait(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.000_01, 4.0, 11),
        ))
    }
}

impl Counters {
    /// Registers every counter in a node's metrics registry. The names are
    /// a compatibility promise to dashboards; a counter's is exported with
    /// `_total` appended (`macula_pubsub_published_total`).
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_pubsub_published",
            "Messages published on this node.",
            self.published_total.clone(),
        );
        register(
            r,
            "macula_pubsub_delivered_local",
            "Events queued to local subscriptions.",
            self.delivered_local_total.clone(),
        );
        register(
            r,
            "macula_pubsub_dropped_slow",
            "Events dropped from full subscription queues (slow subscribers).",
            self.dropped_slow_total.clone(),
        );
        register(
            r,
            "macula_pubsub_unauthorized_dropped",
            "Messages refused by the realm's permissions where they were delivered (a sender that may not publish them, a receiver that may not subscribe to them).",
            self.unauthorized_dropped_total.clone(),
        );
        register(
            r,
            "macula_pubsub_subscriptions",
            "Live subscriptions on this node.",
            self.subscriptions.clone(),
        );
        register(
            r,
            "macula_pubsub_sent_remote",
            "Messages queued to interested nodes (one per node).",
            self.sent_remote_total.clone(),
        );
        register(
            r,
            "macula_pubsub_received_remote",
            "Messages received from other nodes and delivered.",
            self.received_remote_total.clone(),
        );
        register(
            r,
            "macula_pubsub_duplicates_dropped",
            "Received duplicates dropped.",
            self.duplicates_dropped_total.clone(),
        );
        register(
            r,
            "macula_pubsub_gaps",
            "Messages seen missing from a publisher's sequence.",
            self.gaps_total.clone(),
        );
        register(
            r,
            "macula_pubsub_remote_dropped",
            "Outbound messages dropped (queue full, node unreachable or cut off, too large for the node).",
            self.remote_dropped_total.clone(),
        );
        register(
            r,
            "macula_pubsub_remote_rejected",
            "Received messages refused (bad topic, wrong publisher, oversized).",
            self.remote_rejected_total.clone(),
        );
        register(
            r,
            "macula_pubsub_batches_sent",
            "PUBLISH_BATCH frames written to pub/sub data streams.",
            self.batches_sent_total.clone(),
        );
        register(
            r,
            "macula_pubsub_batches_received",
            "PUBLISH_BATCH frames received.",
            self.batches_received_total.clone(),
        );
        register(
            r,
            "macula_pubsub_peers_cut_off",
            "Peers whose pub/sub data stream was reset because it accepted nothing for the stall timeout.",
            self.peers_cut_off_total.clone(),
        );
        register(
            r,
            "macula_pubsub_data_streams_rejected",
            "Inbound pub/sub data streams closed for bad input.",
            self.data_streams_rejected_total.clone(),
        );
        register(
            r,
            "macula_pubsub_forwarded_received",
            "Messages received that another node forwarded for their publisher (a gateway for its client).",
            self.forwarded_received_total.clone(),
        );
        register(
            r,
            "macula_pubsub_unproved_dropped",
            "Received messages dropped, never delivered, because a seal did not prove their publisher (a forwarded batch without a seal, or a wrong signature).",
            self.unproved_dropped_total.clone(),
        );
        register(
            r,
            "macula_pubsub_forwarded_sent",
            "Messages this node forwarded as a gateway: clients' messages into the mesh and events to clients.",
            self.forwarded_sent_total.clone(),
        );
        register(
            r,
            "macula_pubsub_unmatched",
            "Received messages that matched no subscription here, dropped (expected when an interest record is a summary, or just after an unsubscribe).",
            self.unmatched_total.clone(),
        );
        register(
            r,
            "macula_pubsub_interest_puts",
            "Interest record puts into the DHT, failed ones included (concurrent updates of one name share a put).",
            self.interest_puts_total.clone(),
        );
        register(
            r,
            "macula_pubsub_interest_summarized",
            "Interest records put as a summary (generalized patterns) because the exact list was over the DHT record size limit.",
            self.interest_summarized_total.clone(),
        );
        register(
            r,
            "macula_pubsub_too_large_for_peer",
            "Outbound messages dropped because they exceed the receiving node's frame limit (its HELLO max_frame_size).",
            self.too_large_for_peer_total.clone(),
        );
        register(
            r,
            "macula_pubsub_ungrouped",
            "Forwarded messages left out because their frame would have carried only part of their topic group (a seal of kind 3); reported lost to the receiver.",
            self.ungrouped_total.clone(),
        );
        register(
            r,
            "macula_pubsub_peers_unreachable",
            "Interested nodes found unreachable (connection timed out, node left, or not reachable): their interest is set aside.",
            self.peers_unreachable_total.clone(),
        );
        register(
            r,
            "macula_pubsub_peers_restored",
            "Nodes set aside as unreachable that came back (reconnected, or put a newer interest record).",
            self.peers_restored_total.clone(),
        );
        register(
            r,
            "macula_pubsub_remote_evicted",
            "Messages dropped from a full peer queue to make room for a newer one (DropOldest); also in remote_dropped_total.",
            self.remote_evicted_total.clone(),
        );
        register(
            r,
            "macula_pubsub_publish_blocked",
            "Publishes that found a peer queue full and waited for room (Block).",
            self.publish_blocked_total.clone(),
        );
        register(
            r,
            "macula_pubsub_publish_refused",
            "Publishes refused because a peer queue was full (FailFast).",
            self.publish_refused_total.clone(),
        );
        register(
            r,
            "macula_pubsub_loss_reported",
            "Dropped messages named in loss reports (PUBLISH_DROPPED) sent to the nodes they were for.",
            self.loss_reported_total.clone(),
        );
        register(
            r,
            "macula_pubsub_loss_unreported",
            "Dropped messages that could not be reported (node gone, shutting down, report table full).",
            self.loss_unreported_total.clone(),
        );
        register(
            r,
            "macula_pubsub_subscriber_overruns",
            "Subscriptions that took nothing for half the stall timeout while a data stream waited for room in them; no longer waited for until they catch up (their full queues drop the oldest, told as Lagged).",
            self.subscriber_overruns_total.clone(),
        );
        register(
            r,
            "macula_pubsub_loss_told",
            "Missed events told to local subscriptions as Lagged from loss reports received (per subscription).",
            self.loss_told_total.clone(),
        );
        register(
            r,
            "macula_pubsub_delivery_wait_seconds",
            "Seconds an event waited in a local subscription queue before the application took it.",
            self.delivery_wait.0.clone(),
        );
    }

    /// Adds `n`, skipping the atomic write when there is nothing to add.
    pub(crate) fn add(counter: &Counter, n: u64) {
        if n > 0 {
            counter.inc_by(n);
        }
    }
}

/// Registers `metric` with `help` as exported: prometheus-client appends
/// the final period itself.
fn register(r: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    r.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(c: &Counters) -> String {
        let mut r = Registry::default();
        c.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        out
    }

    #[test]
    fn every_counter_is_registered_with_help_and_kind() {
        let c = Counters::default();
        c.published_total.inc();
        Counters::add(&c.peers_restored_total, 3);
        Counters::add(&c.gaps_total, 0);
        c.subscriptions.set(2);
        let text = render(&c);
        c.delivery_wait.0.observe(0.5);
        assert_eq!(text.matches("# TYPE macula_pubsub_").count(), 33);
        assert_eq!(text.matches("# HELP macula_pubsub_").count(), 33);
        assert_eq!(text.matches(" counter\n").count(), 31);
        assert!(text.contains("# TYPE macula_pubsub_delivery_wait_seconds histogram\n"));
        assert!(text.contains("macula_pubsub_delivery_wait_seconds_count 0\n"));
        assert!(render(&c).contains("macula_pubsub_delivery_wait_seconds_count 1\n"));
        assert!(text.contains("# TYPE macula_pubsub_subscriptions gauge\n"));
        assert!(text.contains("# HELP macula_pubsub_published Messages published on this node.\n"));
        assert!(text.contains("macula_pubsub_published_total 1\n"));
        assert!(text.contains("macula_pubsub_peers_restored_total 3\n"));
        assert!(text.contains("macula_pubsub_gaps_total 0\n"));
        assert!(text.contains("macula_pubsub_subscriptions 2\n"));
        assert!(!text.contains(".."), "one final period per help text");
    }
}
