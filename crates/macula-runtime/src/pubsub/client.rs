//! The lightweight client's role: interest is registered by its gateway
//! (CLIENT_SUBSCRIBE / CLIENT_UNSUBSCRIBE, acknowledged), and every publish
//! goes to the gateway, which routes it into the mesh. Implemented by
//! `crate::client`; this module must not know how the client attaches.

use futures::future::BoxFuture;
use macula_wire::NodeId;

/// A client's link to its gateway.
pub(crate) trait Upstream: Send + Sync {
    /// The gateway's node ID, if attached now.
    fn gateway(&self) -> Option<NodeId>;
    /// The client's first subscription to `pattern` appeared (`on`) or its
    /// last one went away: tell the gateway (and wait for its answer).
    fn interest(&self, pattern: String, on: bool) -> BoxFuture<'static, Result<(), String>>;
}
