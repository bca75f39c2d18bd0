//! The lightweight client's role: interest is registered by its gateway
//! (CLIENT_SUBSCRIBE / CLIENT_UNSUBSCRIBE, acknowledged), and every publish
//! goes to the gateway, which routes it into the mesh. Implemented by
//! `crate::client`; this module must not know how the client attaches.
//!
//! A client may receive the same events through two gateways at once: the
//! core's sequence check (per original publisher, whichever gateway an
//! event came through) delivers each once. After a gateway was lost with no
//! other one carrying every event, `gateway_lost` has the core tell the
//! gap.

use futures::future::BoxFuture;
use macula_wire::NodeId;

use super::PubSub;

/// A client's link to its gateway.
pub(crate) trait Upstream: Send + Sync {
    /// The gateway's node ID, if attached now.
    fn gateway(&self) -> Option<NodeId>;
    /// The client's first subscription to `pattern` appeared (`on`) or its
    /// last one went away: tell the gateway (and wait for its answer).
    fn interest(&self, pattern: String, on: bool) -> BoxFuture<'static, Result<(), String>>;
}

impl PubSub {
    /// A client lost gateway `gone`; `uncovered`: no other gateway had
    /// carried the subscriptions long enough to have every event it did.
    /// The next event of each publisher no other gateway carried (of every
    /// publisher heard so far, when `uncovered`) tells every subscription
    /// `Lagged(n)`, `n` the sequence numbers skipped (see
    /// `PubSubCore::gateway_lost`).
    pub(crate) fn gateway_lost(&self, gone: NodeId, uncovered: bool) {
        self.0.core().gateway_lost(gone, uncovered);
    }

    /// A client attached to `gateway` (again).
    pub(crate) fn gateway_up(&self, gateway: &NodeId) {
        self.0.core().gateway_up(gateway);
    }

    /// The sequence tracker's counters: failover watches settled and the
    /// sequence numbers they told as missed.
    pub(crate) fn failover_stats(&self) -> macula_pubsub::SeqStats {
        self.0.core().seq_stats()
    }
}
