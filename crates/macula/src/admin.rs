//! The admin HTTP API of a node: Prometheus metrics, health probes and the
//! JSON endpoints the `macula` CLI reads.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | OpenMetrics text ([`METRICS_CONTENT_TYPE`]) |
//! | `GET /health` | [`HealthReport`] (always 200 while the process answers) |
//! | `GET /ready` | [`ReadyReport`]: 200 once joined (or first node), 503 before |
//! | `GET /live` | 200 |
//! | `GET /admin/peers` | [`PeersReport`]: the connected peers |
//! | `GET /admin/subscriptions` | [`SubscriptionsReport`]: local subscriptions |
//! | `GET /admin/routing` | [`RoutingReport`]: the DHT routing table |
//! | `GET /admin/services` | [`ServicesReport`]: local and mesh-wide RPC procedures |
//!
//! Anything else is a 404 (405 for another method) with an [`ErrorReport`].
//! The report types are the JSON shapes, a compatibility promise to
//! scripts (fields are added, never renamed or removed); a client of the API
//! deserializes them. The server only reads the node's state. It is plain
//! HTTP without authentication: bind it to loopback unless the operator
//! says otherwise.
//!
//! ```no_run
//! # async fn demo(node: macula::Node) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(macula::admin::serve(listener, node, async move {
//!     let _ = stopped.await;
//! }));
//! // ... later:
//! let _ = stop.send(());
//! server.await.expect("admin task")?;
//! # Ok(()) }
//! ```

use std::future::Future;

use tokio::net::TcpListener;

use crate::Node;

pub use macula_runtime::admin::{
    ErrorReport, HealthReport, LocalService, MeshService, PeerReport, PeersReport, ProviderHealth,
    ReadyReport, RoutingContact, RoutingReport, ServiceProvider, ServicesReport, SubscriptionInfo,
    SubscriptionsReport, ADMIN_IDLE_TIMEOUT, MAX_ADMIN_CONNECTIONS, METRICS_CONTENT_TYPE,
};

/// Serves the admin API for `node` on an already-bound `listener` (so a
/// busy port fails before anything starts, and tests can bind port 0) until
/// `shutdown` completes; then stops accepting and lets open requests finish.
/// At most [`MAX_ADMIN_CONNECTIONS`] connections are served at once.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    macula_runtime::admin::serve(listener, node.runtime().clone(), shutdown).await
}
