//! The admin HTTP server: Prometheus metrics, health probes and the JSON
//! endpoints the `macula` CLI reads.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | OpenMetrics text from this node's own prometheus-client `Registry` |
//! | `GET /health` | [`HealthReport`] (always 200 while the process answers) |
//! | `GET /ready` | [`ReadyReport`]: 200 once joined (or first node), 503 before |
//! | `GET /live` | 200 |
//! | `GET /admin/peers` | [`PeersReport`]: the connected peers |
//! | `GET /admin/subscriptions` | [`SubscriptionsReport`]: local subscriptions |
//! | `GET /admin/routing` | [`RoutingReport`]: the DHT routing table |
//! | `GET /admin/services` | [`ServicesReport`]: local and mesh-wide RPC procedures |
//!
//! Anything else is a 404 (405 for another method) with a JSON
//! [`ErrorReport`]. The JSON shapes are a compatibility promise to scripts:
//! add fields, never rename or remove them.
//!
//! This module only reads the node's state; it must not change it (no
//! connect, no disconnect) and must not read request bodies. It is plain
//! HTTP without authentication, so it listens on loopback unless the operator
//! says otherwise.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::metrics::MetricsCollector;
use crate::node::NodeRuntime;

/// Admin HTTP connections served at once; further clients wait in the
/// listen backlog until one closes. HTTP/1 handles one request at a time per
/// connection, so this also bounds concurrent requests.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed: bounds slow
/// request headers and idle keep-alive connections.
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Content type of `/metrics` (what prometheus-client's text encoder writes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// `ok` when ready, `degraded` while a node with bootstrap peers has none.
    pub status: String,
    /// Same as `GET /ready`.
    pub ready: bool,
    /// Why the node is (not) ready, for humans.
    pub reason: String,
    pub node_id: String,
    pub realm: String,
    /// The software version (`CARGO_PKG_VERSION`).
    pub version: String,
    pub uptime_secs: u64,
    /// Connected peers.
    pub peers: usize,
    /// The bound QUIC address.
    pub listen: SocketAddr,
    /// Records this node holds for the DHT.
    pub dht_records: u64,
    /// Contacts in the DHT routing table.
    pub dht_routing_table_size: u64,
    /// Whether peers can dial this node: `unknown`, `public` or `private`
    /// (behind NAT or a firewall), from peers' dial-backs.
    #[serde(default)]
    pub reachability: String,
    /// Where a peer's dial-back reached this node (when `public`).
    #[serde(default)]
    pub public_addrs: Vec<String>,
}

/// `GET /ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReadyReport {
    pub ready: bool,
    pub reason: String,
}

/// One connected peer in `GET /admin/peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PeerReport {
    pub node_id: String,
    /// The peer's UDP address as we see it.
    pub addr: SocketAddr,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// QUIC's smoothed round-trip time, microseconds.
    pub rtt_us: u64,
    /// Addresses the peer says it listens on (from its HELLO).
    pub listen_addrs: Vec<String>,
    /// The peer's software (from its HELLO).
    pub agent: String,
    /// Seconds since the connection was last used.
    pub idle_secs: u64,
    /// Kept connections (bootstrap peers) are never idle-closed or evicted.
    pub kept: bool,
    /// The relay this connection runs through (node ID); absent when direct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_via: Option<String>,
}

/// `GET /admin/peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PeersReport {
    /// The answering node.
    pub node_id: String,
    /// Peers sorted by node ID.
    pub peers: Vec<PeerReport>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorReport {
    pub error: String,
    pub status: u16,
}

#[derive(Clone)]
struct AdminState {
    node: NodeRuntime,
    registry: Arc<Registry>,
}

/// Serves the admin API on an already-bound listener until `shutdown`
/// completes, then stops accepting and lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    node: NodeRuntime,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, node_id = %node.node_id(), "admin HTTP server listening");
    let listener = LimitedListener {
        inner: listener,
        slots: Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
    };
    axum::serve(listener, router(node))
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!(addr = %addr, "admin HTTP server stopped");
    Ok(())
}

/// The admin routes over `node`, for embedding in another server or for
/// tests. A new endpoint is one `.route` line here.
pub fn router(node: NodeRuntime) -> Router {
    let state = AdminState {
        registry: Arc::new(registry(&node)),
        node,
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/live", get(live))
        .route("/admin/peers", get(peers))
        .route("/admin/subscriptions", get(subscriptions))
        .route("/admin/services", get(services))
        .route("/admin/routing", get(routing))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// This node's metrics registry: every collector of the node registers here
/// (one registry per node, so nodes sharing a process stay separate). Later
/// subsystems (pub/sub, RPC, DHT) add their collector with one line.
pub fn registry(node: &NodeRuntime) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MetricsCollector(node.metrics().clone())));
    registry.register_collector(Box::new(NodeCollector { node: node.clone() }));
    registry.register_collector(Box::new(crate::pubsub::PubSubCollector(
        node.pubsub().counters().clone(),
    )));
    registry.register_collector(Box::new(crate::dht::DhtCollector(
        node.dht().counters().clone(),
    )));
    registry.register_collector(Box::new(node.rpc().collector()));
    registry.register_collector(Box::new(crate::gateway::GatewayCollector(
        node.gateway_counters().clone(),
    )));
    registry.register_collector(Box::new(crate::reachability::ReachCollector(
        node.reachability().counters().clone(),
    )));
    registry.register_collector(Box::new(crate::relay::RelayCollector(
        node.relay().counters().clone(),
    )));
    registry.register(
        "macula_rpc_duration_seconds",
        "Call duration as the caller sees it, by procedure (at most 64 procedure labels; the rest share `_other`).",
        node.rpc().duration_family(),
    );
    registry
}

/// Whether the node is ready, and why: it has at least one connected peer,
/// or it has no bootstrap peers configured (it is the first node). This is
/// the current state, not a latch: a node with bootstrap peers that loses
/// every peer is not ready until one returns.
pub fn readiness(node: &NodeRuntime) -> ReadyReport {
    let peers = node.peers().len();
    let (ready, reason) = if node.is_shutting_down() {
        (false, "shutting down".to_string())
    } else if peers > 0 {
        (true, format!("joined the mesh: {peers} peer(s) connected"))
    } else if node.config().bootstrap.is_empty() {
        (
            true,
            "first node: no bootstrap peers configured".to_string(),
        )
    } else {
        (
            false,
            format!(
                "joining: none of {} bootstrap peer(s) connected yet",
                node.config().bootstrap.len()
            ),
        )
    };
    ReadyReport { ready, reason }
}

/// Node-level gauges that are not connection-layer counters.
struct NodeCollector {
    node: NodeRuntime,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector")
            .field("node_id", &self.node.node_id())
            .finish()
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let uptime = ConstGauge::new(self.node.uptime().as_secs_f64());
        uptime.encode(encoder.encode_descriptor(
            "macula_uptime",
            "Time since the node started.",
            Some(&Unit::Seconds),
            uptime.metric_type(),
        )?)?;
        let peers = ConstGauge::new(self.node.peers().len() as i64);
        peers.encode(encoder.encode_descriptor(
            "macula_peers",
            "Connected peers.",
            None,
            peers.metric_type(),
        )?)?;
        let ready = ConstGauge::new(i64::from(readiness(&self.node).ready));
        ready.encode(encoder.encode_descriptor(
            "macula_ready",
            "1 when the node has joined the mesh (or is the first node), else 0.",
            None,
            ready.metric_type(),
        )?)?;
        let mut info = encoder.encode_descriptor(
            "macula_node",
            "This node's identity and version (value is always 1).",
            None,
            prometheus_client::metrics::MetricType::Info,
        )?;
        let node_id = self.node.node_id().to_string();
        info.encode_info(&[
            ("node_id", node_id.as_str()),
            ("realm", self.node.realm()),
            ("version", env!("CARGO_PKG_VERSION")),
        ])
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorReport {
        error: message.into(),
        status: status.as_u16(),
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode metrics");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics",
            )
        }
    }
}

async fn health(State(s): State<AdminState>) -> Json<HealthReport> {
    let node = &s.node;
    let ready = readiness(node);
    let reach = node.reachability().state();
    Json(HealthReport {
        status: if ready.ready { "ok" } else { "degraded" }.to_string(),
        ready: ready.ready,
        reason: ready.reason,
        node_id: node.node_id().to_string(),
        realm: node.realm().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: node.uptime().as_secs(),
        peers: node.peers().len(),
        listen: node.local_addr(),
        dht_records: node.dht().counters().records.load(Ordering::Relaxed),
        dht_routing_table_size: node
            .dht()
            .counters()
            .routing_table_size
            .load(Ordering::Relaxed),
        reachability: reach.name().to_string(),
        public_addrs: match reach {
            crate::reachability::ReachState::Public { addrs } => addrs,
            _ => Vec::new(),
        },
    })
}

/// `GET /admin/subscriptions`: this node's local subscriptions by pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SubscriptionsReport {
    pub node_id: String,
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// One subscribed pattern and how many local subscriptions use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SubscriptionInfo {
    pub pattern: String,
    pub count: usize,
}

/// `GET /admin/routing`: the DHT routing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RoutingReport {
    pub node_id: String,
    pub contacts: Vec<RoutingContact>,
}

/// One contact of the routing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RoutingContact {
    pub node_id: String,
    pub addr: String,
    /// Common-prefix length of its ID and ours (its k-bucket).
    pub bucket: usize,
    pub last_seen_secs: u64,
}

async fn routing(State(s): State<AdminState>) -> Response {
    match s.node.dht().routing_table().await {
        Ok(entries) => Json(RoutingReport {
            node_id: s.node.node_id().to_string(),
            contacts: entries
                .into_iter()
                .map(|e| RoutingContact {
                    node_id: e.node_id.to_string(),
                    addr: e.addr,
                    bucket: e.bucket,
                    last_seen_secs: e.last_seen.as_secs(),
                })
                .collect(),
        })
        .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(ErrorReport {
                error: format!("the DHT is not available: {e}"),
                status: 503,
            }),
        )
            .into_response(),
    }
}

/// How long `/admin/services` spends reading the mesh's service index.
pub const SERVICES_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /admin/services`: what this node advertises, what the mesh
/// advertises (from the DHT's service index), and what this node has
/// learned about the providers it called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServicesReport {
    pub node_id: String,
    pub local: Vec<LocalService>,
    pub mesh: Vec<MeshService>,
    /// Set when the mesh-wide part could not be read (it is then partial).
    pub mesh_error: Option<String>,
    pub provider_health: Vec<ProviderHealth>,
}

/// A procedure this node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LocalService {
    pub procedure: String,
    pub weight: u32,
    /// Requests the handler can still take before answering `Overloaded`.
    pub available_slots: usize,
}

/// A procedure advertised somewhere in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MeshService {
    pub procedure: String,
    pub providers: Vec<ServiceProvider>,
}

/// One provider's advertisement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServiceProvider {
    pub node_id: String,
    pub weight: u32,
    pub addrs: Vec<String>,
    pub metadata: Vec<(String, String)>,
}

/// Circuit-breaker state and latency estimate of a provider this node called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProviderHealth {
    pub node_id: String,
    pub breaker: String,
    pub latency_us: Option<u64>,
}

async fn services(State(s): State<AdminState>) -> Json<ServicesReport> {
    let rpc = s.node.rpc();
    let (mesh, mesh_error) =
        match tokio::time::timeout(SERVICES_LOOKUP_TIMEOUT, rpc.services()).await {
            Ok(Ok(list)) => (list, None),
            Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
            Err(_) => (
                Vec::new(),
                Some(format!(
                    "service lookup took over {SERVICES_LOOKUP_TIMEOUT:?}"
                )),
            ),
        };
    Json(ServicesReport {
        node_id: s.node.node_id().to_string(),
        local: rpc
            .advertised()
            .into_iter()
            .map(|(procedure, weight, available_slots)| LocalService {
                procedure,
                weight,
                available_slots,
            })
            .collect(),
        mesh: mesh
            .into_iter()
            .map(|(procedure, providers)| MeshService {
                procedure,
                providers: providers
                    .into_iter()
                    .map(|p| ServiceProvider {
                        node_id: p.node.to_string(),
                        weight: p.weight,
                        addrs: p.addrs,
                        metadata: p.metadata,
                    })
                    .collect(),
            })
            .collect(),
        mesh_error,
        provider_health: rpc
            .provider_health()
            .into_iter()
            .map(|(id, breaker, latency_us)| ProviderHealth {
                node_id: id.to_string(),
                breaker: breaker.to_string(),
                latency_us,
            })
            .collect(),
    })
}

async fn subscriptions(State(s): State<AdminState>) -> Json<SubscriptionsReport> {
    Json(SubscriptionsReport {
        node_id: s.node.node_id().to_string(),
        subscriptions: s
            .node
            .pubsub()
            .subscriptions()
            .into_iter()
            .map(|(pattern, count)| SubscriptionInfo { pattern, count })
            .collect(),
    })
}

async fn ready(State(s): State<AdminState>) -> Response {
    let report = readiness(&s.node);
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

async fn live() -> Response {
    (StatusCode::OK, Json(serde_json::json!({ "live": true }))).into_response()
}

async fn peers(State(s): State<AdminState>) -> Json<PeersReport> {
    let mut peers: Vec<PeerReport> = s
        .node
        .peers()
        .into_iter()
        .map(|p| PeerReport {
            node_id: p.node_id().to_string(),
            addr: p.remote_addr(),
            direction: p.direction().name().to_string(),
            rtt_us: u64::try_from(p.rtt().as_micros()).unwrap_or(u64::MAX),
            listen_addrs: p.hello().listen_addrs.clone(),
            agent: p.hello().agent.clone(),
            idle_secs: p.idle_for().as_secs(),
            kept: p.is_kept(),
            relayed_via: p.relayed_via().map(|r| r.to_string()),
        })
        .collect();
    peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Json(PeersReport {
        node_id: s.node.node_id().to_string(),
        peers,
    })
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: the admin API is read-only (GET)",
    )
}

/// A TCP listener that serves at most [`MAX_ADMIN_CONNECTIONS`] connections
/// at once and closes connections idle for [`ADMIN_IDLE_TIMEOUT`].
struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so acquiring only waits; were it
        // closed, accept nothing more rather than serve without a limit.
        let permit = match self.slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => std::future::pending().await,
        };
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            LimitedStream {
                inner: stream,
                idle: Box::pin(tokio::time::sleep(ADMIN_IDLE_TIMEOUT)),
                _permit: permit,
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One admin connection: holds its connection slot and fails reads after
/// [`ADMIN_IDLE_TIMEOUT`] without a byte from the client.
struct LimitedStream {
    inner: TcpStream,
    idle: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let deadline = tokio::time::Instant::now() + ADMIN_IDLE_TIMEOUT;
                self.idle.as_mut().reset(deadline);
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("admin connection idle for {ADMIN_IDLE_TIMEOUT:?}"),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
