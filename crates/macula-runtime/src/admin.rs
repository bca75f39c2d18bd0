//! The admin HTTP server: Prometheus metrics, health probes and the JSON
//! endpoints the `macula` CLI reads.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | OpenMetrics text from this node's own prometheus-client `Registry` (credentials needed unless the client is on loopback) |
//! | `GET /health` | [`HealthReport`] (always 200 while the process answers) |
//! | `GET /ready` | [`ReadyReport`]: 200 once joined (or first node), 503 before |
//! | `GET /live` | 200 |
//! | `GET /admin/peers` | [`PeersReport`]: the connected peers |
//! | `GET /admin/subscriptions` | [`SubscriptionsReport`]: local subscriptions |
//! | `GET /admin/routing` | [`RoutingReport`]: the DHT routing table |
//! | `GET /admin/services` | [`ServicesReport`]: local and mesh-wide RPC procedures |
//! | `GET /dashboard` (and its `app.js`, `style.css`) | the live web dashboard, a static page (`admin/dashboard.rs`) |
//! | `GET /admin/dashboard`, `GET /admin/dashboard/events` | [`DashboardReport`] once, or as a server-sent event stream (bounded: `dashboard_max_streams`) |
//! | `/admin/realm`, `POST /admin/realm/revocations`, `/admin/realm/keys` | the realm's authority, grant and revocation list (`admin/realm.rs`: [`RealmReport`], [`RevocationsReport`]) |
//! | `/admin/raft...` | Raft groups and their key-value store (`admin/raft.rs`: [`RaftReport`], [`KvGetReport`], [`CasReport`], [`WatchReport`]...) |
//!
//! Anything else is a 404 (405 for another method) with a JSON
//! [`ErrorReport`]. The JSON shapes are a compatibility promise to scripts:
//! add fields, never rename or remove them.
//!
//! **Credentials** (`admin/auth.rs`): every route but `/live`, `/ready`,
//! `/health` and the dashboard's static page and assets needs `Authorization: Bearer <admin token>` or a request signed
//! under an admin grant (`Macula-Grant`); `/metrics` also answers loopback
//! clients without them. A refusal is a 401 [`ErrorReport`] whose `kind`
//! names the reason, with a `WWW-Authenticate` header; an address with too
//! many failures gets 429 for a while. Refusals are counted in
//! `macula_admin_unauthorized_total{reason}` and recorded in the node's
//! audit trail (`admin_denied`; not the 429s, so a flood cannot rotate the
//! trail away).
//!
//! Apart from `/admin/raft`, this module only reads the node's state; it
//! must not change it (no connect, no disconnect) and must not read request
//! bodies. The Raft endpoints are the exception: they write to a group's
//! key-value store and change its membership, through the node's own member,
//! with bounded bodies (axum's 2 MB default) and a bounded time
//! ([`RAFT_ADMIN_DEADLINE`]). It is plain HTTP (credentials travel in the
//! clear), so it listens on loopback unless the operator says otherwise.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::task::AtomicWaker;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::metrics::register;
use crate::node::NodeRuntime;

pub mod auth;
pub mod dashboard;
mod raft;
mod realm;
pub mod stream;

pub use auth::{
    request_message, resource, sign_request, AdminAuth, AdminAuthError, Principal, Refusal, BEARER,
    GRANT_SCHEME, TOKEN_FILE,
};

pub use dashboard::{DashboardLink, DashboardNode, DashboardReport, NodeReport};
pub use raft::{
    CasReport, CasRequest, EventReport, KvGetReport, KvListReport, KvReport, KvWriteReport,
    MembersRequest, RaftGroupReport, RaftReport, WatchReport, KV_LIST_DEFAULT_LIMIT,
    KV_LIST_MAX_LIMIT, RAFT_ADMIN_DEADLINE, WATCH_DEFAULT_WAIT, WATCH_MAX_EVENTS, WATCH_MAX_WAIT,
};
pub use realm::{GrantReport, RealmReport, RevocationsReport};

/// Admin HTTP connections served at once. HTTP/1 handles one request at a
/// time per connection, so this also bounds concurrent requests. When every
/// slot is taken the server still accepts: the new connection takes the slot
/// of one already open (see [`serve`]), so idle or slow clients cannot keep
/// the health probes out.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Admin connections from one source IP address open at once (see
/// [`serve`] for what happens to the next one).
pub const MAX_ADMIN_CONNECTIONS_PER_IP: usize = 16;
/// A connection must receive a response within this long of being accepted
/// or of its previous response: it has this long to send a complete request
/// head (a slow-loris client does not), and an idle keep-alive connection is
/// closed after this long. Once a complete request head has arrived, the
/// handler has [`ADMIN_IDLE_TIMEOUT`] to answer instead.
pub const ADMIN_REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// A connection that sends nothing for this long is closed: bounds slow
/// request headers and idle keep-alive connections.
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most one warning line per this long about evicted or refused admin
/// connections; the line counts the ones not logged in between.
const ADMIN_WARN_INTERVAL: Duration = Duration::from_secs(10);
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
    /// The realm authority's key when the realm has one (peers need a
    /// grant), `null` for an open realm (anyone who knows its name joins:
    /// for development).
    #[serde(default)]
    pub realm_authority: Option<String>,
    /// How many client API keys this node accepts (`--api-keys`), `null`
    /// when it takes none.
    #[serde(default)]
    pub api_keys: Option<usize>,
    /// Whether the admin API needs credentials (always, since issue 18;
    /// `false` from older nodes).
    #[serde(default)]
    pub admin_auth: bool,
    /// The credentials this node takes: `token` (it has an admin token
    /// file), `grant` (its realm has an authority).
    #[serde(default)]
    pub admin_auth_methods: Vec<String>,
    /// This node's NAT as peers' observed addresses show it (`nat.rs`),
    /// and its direct rate. Absent from older nodes.
    #[serde(default)]
    pub nat: NatHealth,
}

/// The `nat` part of [`HealthReport`] (also what `macula nat` shows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NatHealth {
    /// `unknown`, `none` (no NAT), `endpoint_independent`,
    /// `address_dependent`, `address_and_port_dependent`.
    pub mapping: String,
    /// `unknown`, `none`, `endpoint_or_address_dependent`,
    /// `address_and_port_dependent` (from the dial-back check; only known
    /// while the NAT preserves ports).
    pub filtering: String,
    /// Whether any peer saw this node at a translated address (`null`: no
    /// observation yet).
    pub behind_nat: Option<bool>,
    /// Whether the NAT kept the local port (`null`: nothing translated).
    pub port_preserved: Option<bool>,
    /// Where peers behind no further NAT see this node (reflexive
    /// addresses), sorted.
    pub reflexive_addrs: Vec<String>,
    /// Peers whose observation is held.
    pub observers: usize,
    /// Connections to full nodes opened, direct or relayed.
    pub connections_opened: u64,
    /// Of those, connections that were direct at some time.
    pub connections_direct: u64,
    /// `connections_direct` in percent of `connections_opened` (`null`
    /// before the first connection), rounded down.
    pub direct_percent: Option<u64>,
}

impl NatHealth {
    /// The report of `node` now.
    pub fn of(node: &NodeRuntime) -> NatHealth {
        let reach = node.reachability();
        let nat = reach.nat(node.now());
        let (opened, direct) = reach.direct_rate();
        NatHealth {
            mapping: nat.report.mapping.name().to_string(),
            filtering: nat.filtering.name().to_string(),
            behind_nat: nat.report.behind_nat,
            port_preserved: nat.report.port_preserved,
            reflexive_addrs: nat.report.reflexive.iter().map(|a| a.to_string()).collect(),
            observers: nat.report.observers,
            connections_opened: opened,
            connections_direct: direct,
            direct_percent: (opened > 0).then(|| direct * 100 / opened),
        }
    }
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
    /// What failed, for scripts: e.g. `raft.no_leader`, `raft.no_key`
    /// (absent on errors that need no more than the status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Clone)]
struct AdminState {
    node: NodeRuntime,
    registry: Arc<Registry>,
}

/// Connection limits of the admin server. [`serve`] uses the defaults (the
/// `MAX_ADMIN_*` and `ADMIN_*` constants); [`serve_with`] takes others, e.g.
/// a short request deadline in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdminLimits {
    /// Connections served at once ([`MAX_ADMIN_CONNECTIONS`]).
    pub max_connections: usize,
    /// Connections from one source IP at once ([`MAX_ADMIN_CONNECTIONS_PER_IP`]).
    pub max_connections_per_ip: usize,
    /// Time to a response after accept or the previous response
    /// ([`ADMIN_REQUEST_DEADLINE`]).
    pub request_deadline: Duration,
    /// Time without a byte from the client, and time a handler has to answer
    /// a complete request ([`ADMIN_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: MAX_ADMIN_CONNECTIONS,
            max_connections_per_ip: MAX_ADMIN_CONNECTIONS_PER_IP,
            request_deadline: ADMIN_REQUEST_DEADLINE,
            idle_timeout: ADMIN_IDLE_TIMEOUT,
        }
    }
}

/// Serves the admin API on an already-bound listener until `shutdown`
/// completes, then stops accepting and lets open requests finish.
///
/// The server cannot be starved by clients that hold connections open:
///
/// * a connection must get a response within [`ADMIN_REQUEST_DEADLINE`] of
///   being accepted or of its previous response, so it must send a complete
///   request head quickly (slow-loris clients trickling bytes are closed);
/// * when all [`MAX_ADMIN_CONNECTIONS`] slots are taken, a new connection is
///   still accepted and an open one is closed ("evicted") to make room: the
///   oldest one never answered and without a complete request, else the one
///   whose last response is oldest, else (every slot has a request in
///   flight) the oldest;
/// * one source IP holds at most [`MAX_ADMIN_CONNECTIONS_PER_IP`]
///   connections: the next one from it closes that source's oldest
///   connection without a request in flight, or, when all of them have one,
///   is itself closed at once ("refused").
///
/// Both are counted (`macula_admin_connections_evicted_total`,
/// `macula_admin_connections_refused_total`, and
/// `macula_admin_requests_timed_out_total` for the deadline) in the
/// `/metrics` this server answers, and logged at most once per 10 s.
pub async fn serve(
    listener: TcpListener,
    node: NodeRuntime,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, node, shutdown, AdminLimits::default()).await
}

/// [`serve`] with other connection limits.
pub async fn serve_with(
    listener: TcpListener,
    node: NodeRuntime,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: AdminLimits,
) -> std::io::Result<()> {
    serve_with_routes(listener, node, shutdown, limits, Router::new()).await
}

/// [`serve_with`] with `routes` merged beside the node's own, behind the
/// same credentials check (a service's admin API). A route that clashes
/// with one of the node's panics at start, as axum does.
pub async fn serve_with_routes(
    listener: TcpListener,
    node: NodeRuntime,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: AdminLimits,
    routes: Router,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, node_id = %node.node_id(), "admin HTTP server listening");
    let counters = Arc::new(AdminCounters::default());
    let listener = LimitedListener {
        inner: listener,
        table: Arc::new(ConnTable::new(limits, counters.clone())),
    };
    let app =
        router_with(node, Some(counters), routes).into_make_service_with_connect_info::<Remote>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!(addr = %addr, "admin HTTP server stopped");
    Ok(())
}

/// The admin routes over `node`, for embedding in another server or for
/// tests. A new endpoint is one `.route` line here.
pub fn router(node: NodeRuntime) -> Router {
    router_with(node, None, Router::new())
}

/// The admin routes; `counters` (the connection counters of [`serve`]) are
/// added to `/metrics` when given.
fn router_with(node: NodeRuntime, counters: Option<Arc<AdminCounters>>, extra: Router) -> Router {
    let mut registry = registry(&node);
    if let Some(counters) = counters {
        counters.register(&mut registry);
    }
    let state = AdminState {
        registry: Arc::new(registry),
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
        .route("/admin/raft", get(raft::status))
        .route("/admin/raft/{group}", get(raft::group))
        .route(
            "/admin/raft/{group}/members",
            get(raft::group).post(raft::members),
        )
        .route("/admin/raft/{group}/kv", get(raft::list))
        .route(
            "/admin/raft/{group}/kv/{*key}",
            get(raft::get).put(raft::put).delete(raft::delete),
        )
        .route("/admin/raft/{group}/cas", post(raft::cas))
        .route("/admin/raft/{group}/watch", get(raft::watch))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/style.css", get(dashboard::style))
        .route("/admin/dashboard", get(dashboard::snapshot))
        .route("/admin/dashboard/events", get(dashboard::events))
        .route("/admin/realm", get(realm::status))
        .route("/admin/realm/revocations", post(realm::revocations))
        .route(
            "/admin/realm/keys",
            get(realm::keys).post(realm::install_keys),
        )
        .route("/admin/streams", get(stream::list).post(stream::add))
        .route(
            "/admin/streams/{name}",
            get(stream::info).put(stream::edit).delete(stream::delete),
        )
        .route("/admin/streams/{name}/purge", post(stream::purge))
        .route("/admin/streams/{name}/publish", post(stream::publish))
        .route("/admin/streams/{name}/msg/{seq}", get(stream::msg))
        .route("/admin/streams/{name}/replica", get(stream::replica))
        .route(
            "/admin/streams/{name}/consumers",
            get(stream::consumers).post(stream::add_consumer),
        )
        .route(
            "/admin/streams/{name}/consumers/{consumer}",
            get(stream::consumer).delete(stream::delete_consumer),
        )
        .route(
            "/admin/streams/{name}/consumers/{consumer}/next",
            post(stream::next),
        )
        .route(
            "/admin/streams/{name}/consumers/{consumer}/ack",
            post(stream::ack),
        )
        .with_state(state.clone())
        .merge(extra)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state,
            require_credentials,
        ))
}

/// The client's address, as the listener of [`serve`] saw it (absent when
/// the router is served by something else: then only credentials count).
#[derive(Debug, Clone, Copy)]
struct Remote(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, LimitedListener>>
    for Remote
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, LimitedListener>) -> Remote {
        Remote(*stream.remote_addr())
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The credentials check in front of every route (see the module doc).
async fn require_credentials(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    // The dashboard's page, script and style hold no data (the page reads
    // it from /admin/dashboard with the admin token).
    if matches!(
        path.as_str(),
        "/live"
            | "/ready"
            | "/health"
            | "/dashboard"
            | "/dashboard/app.js"
            | "/dashboard/style.css"
    ) {
        return next.run(req).await;
    }
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<Remote>>()
        .map(|c| c.0 .0.ip().to_canonical());
    if path == "/metrics" && source.is_some_and(|ip| ip.is_loopback()) {
        return next.run(req).await;
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or(path.as_str(), |p| p.as_str())
        .to_string();
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let auth = s.node.admin_auth();
    let method = req.method().to_string();
    match auth.check(source, &method, &path_and_query, header, unix_ms()) {
        Ok(_) => next.run(req).await,
        Err(refusal) => {
            let who = source.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
            tracing::debug!(source = %who, method, path, reason = %refusal.reason, "admin request refused");
            if refusal.is_rate_limited() {
                let retry = auth.failure_window().as_secs().max(1).to_string();
                let mut r = error_kind(
                    StatusCode::TOO_MANY_REQUESTS,
                    &refusal.reason,
                    refusal.message,
                );
                if let Ok(v) = header::HeaderValue::from_str(&retry) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return r;
            }
            if let Some(audit) = s.node.audit() {
                audit.record(
                    "admin_denied",
                    &format!("{who} {method} {path}: {}", refusal.reason),
                );
            }
            let mut r = error_kind(StatusCode::UNAUTHORIZED, &refusal.reason, refusal.message);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(
                    "Bearer realm=\"macula admin\", Macula-Grant realm=\"macula admin\"",
                ),
            );
            r
        }
    }
}

/// This node's metrics registry: every subsystem registers its counters
/// and gauges here, with one line each (one registry per node, so nodes
/// sharing a process stay separate); values read from live state at scrape
/// time (uptime, peers, Raft groups) come from collectors.
pub fn registry(node: &NodeRuntime) -> Registry {
    let mut registry = Registry::default();
    node.metrics().register(&mut registry);
    registry.register_collector(Box::new(NodeCollector { node: node.clone() }));
    node.pubsub().counters().register(&mut registry);
    node.dht().counters().register(&mut registry);
    node.rpc().register(&mut registry);
    node.gateway_counters().register(&mut registry);
    node.reachability().counters().register(&mut registry);
    node.hole_punching().counters().register(&mut registry);
    node.relay().counters().register(&mut registry);
    node.raft().counters().register(&mut registry);
    node.trust().counters().register(&mut registry);
    node.realm_service().counters().register(&mut registry);
    node.status_service().counters().register(&mut registry);
    registry.register_collector(Box::new(raft::RaftCollector { node: node.clone() }));
    registry.register_collector(Box::new(crate::stream::metrics::StreamCollector {
        streams: node.streams().clone(),
    }));
    node.admin_auth().register(&mut registry);
    crate::trace::register(&mut registry);
    if let Some(mqtt) = node.mqtt() {
        mqtt.register(&mut registry);
    }
    if let Some(audit) = node.audit() {
        audit.counters().register(&mut registry);
    }
    registry
}

/// Whether the node is ready, and why: it has at least one connected peer,
/// or it has no bootstrap peers configured (it is the first node). This is
/// the current state, not a latch: a node with bootstrap peers that loses
/// every peer is not ready until one returns.
pub fn readiness(node: &NodeRuntime) -> ReadyReport {
    let (ready, reason) = node.readiness();
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
        kind: None,
    };
    (status, Json(body)).into_response()
}

/// An error answer whose `kind` names the cause.
fn error_kind(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = ErrorReport {
        error: message.into(),
        status: status.as_u16(),
        kind: Some(kind.to_string()),
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
        realm_authority: node
            .config()
            .admission
            .as_ref()
            .map(|a| a.authority.to_string()),
        api_keys: node
            .config()
            .admission
            .as_ref()
            .and_then(|a| a.api_keys.as_ref())
            .map(|k| k.len()),
        admin_auth: true,
        admin_auth_methods: {
            let auth = node.admin_auth();
            let mut m = Vec::new();
            if auth.token_file().is_some() {
                m.push("token".to_string());
            }
            if auth.accepts_grants() {
                m.push("grant".to_string());
            }
            m
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: node.uptime().as_secs(),
        peers: node.peers().len(),
        listen: node.local_addr(),
        dht_records: node.dht().counters().records.get(),
        dht_routing_table_size: node.dht().counters().routing_table_size.get(),
        reachability: reach.name().to_string(),
        public_addrs: match reach {
            crate::reachability::ReachState::Public { addrs } => addrs,
            _ => Vec::new(),
        },
        nat: NatHealth::of(node),
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
                kind: None,
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

async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {method} not allowed for {}: the admin API is read-only (GET) except the \
             Raft key-value and membership endpoints under /admin/raft",
            uri.path()
        ),
    )
}

// ---------------------------------------------------------------------------
// Connection limits
// ---------------------------------------------------------------------------

/// What the connection limits of [`serve`] did.
#[derive(Debug, Default)]
struct AdminCounters {
    /// Connections closed to make room for a new one (server full).
    evicted: Counter,
    /// Connections closed over the per-source-IP limit.
    refused: Counter,
    /// Connections closed at the request deadline.
    timed_out: Counter,
}

impl AdminCounters {
    /// Registers the counters in the node's registry (one admin server's).
    fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_admin_connections_evicted",
            "Admin HTTP connections closed to make room for a new one while all slots were taken.",
            self.evicted.clone(),
        );
        register(
            r,
            "macula_admin_connections_refused",
            "Admin HTTP connections closed because their source IP had the most connections allowed open.",
            self.refused.clone(),
        );
        register(
            r,
            "macula_admin_requests_timed_out",
            "Admin HTTP connections closed because no complete request arrived before the request deadline.",
            self.timed_out.clone(),
        );
    }
}

/// The part of one admin connection that the listener (to evict it) and the
/// stream share.
#[derive(Debug)]
struct ConnShared {
    /// Accept order: lower is older.
    id: u64,
    /// The client's address, IPv4-mapped IPv6 shown as IPv4.
    ip: IpAddr,
    /// Set to close the connection; its reads and writes fail from then on.
    closed: AtomicBool,
    /// Wakes the connection's task so it sees `closed`.
    waker: AtomicWaker,
    /// A response byte has been written.
    responded: AtomicBool,
    /// A complete request head arrived and its response is not written yet.
    request_pending: AtomicBool,
    /// When the last response byte was written, or the connection accepted
    /// (ms since the table's epoch).
    last_answer_ms: AtomicU64,
}

impl ConnShared {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Which connection to close first, lowest first: one never answered
    /// and without a complete request (a would-be slow-loris), oldest first;
    /// then an answered one waiting for its next request, longest waiting
    /// first; then one with a request in flight, oldest first.
    fn eviction_rank(&self) -> (u8, u64) {
        if self.request_pending.load(Ordering::Relaxed) {
            (2, self.id)
        } else if self.responded.load(Ordering::Relaxed) {
            (1, self.last_answer_ms.load(Ordering::Relaxed))
        } else {
            (0, self.id)
        }
    }
}

/// Why [`ConnTable::admit`] closed a connection.
enum Closed {
    /// Another connection, to make room (server full).
    Evicted(IpAddr),
    /// The source's oldest idle connection, over the per-IP limit.
    SameSource,
    /// The new connection itself, over the per-IP limit.
    Refused,
}

/// Every open admin connection of one server.
#[derive(Debug)]
struct ConnTable {
    limits: AdminLimits,
    counters: Arc<AdminCounters>,
    epoch: Instant,
    next_id: AtomicU64,
    conns: Mutex<Vec<Arc<ConnShared>>>,
    warn: crate::quiet::LogLimit,
}

impl ConnTable {
    fn new(limits: AdminLimits, counters: Arc<AdminCounters>) -> Self {
        let limits = AdminLimits {
            max_connections: limits.max_connections.max(1),
            max_connections_per_ip: limits.max_connections_per_ip.max(1),
            ..limits
        };
        ConnTable {
            limits,
            counters,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            warn: crate::quiet::LogLimit::new(ADMIN_WARN_INTERVAL),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<ConnShared>>> {
        // The entries are atomics: a panic elsewhere leaves them usable.
        self.conns.lock()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Registers a connection just accepted from `ip`, closing another one
    /// if a limit requires; `None` when the new connection must be closed
    /// instead.
    fn admit(&self, ip: IpAddr) -> Option<Arc<ConnShared>> {
        let ip = ip.to_canonical();
        let mut conns = self.lock();
        let from_ip = conns.iter().filter(|c| c.is_open() && c.ip == ip).count();
        let closed = if from_ip >= self.limits.max_connections_per_ip {
            // Over the per-source limit: that source's own connections make
            // room (never another source's), unless all have a request in
            // flight.
            let victim = conns
                .iter()
                .filter(|c| c.is_open() && c.ip == ip && c.eviction_rank().0 < 2)
                .min_by_key(|c| c.eviction_rank());
            match victim {
                Some(v) => {
                    v.close();
                    Some(Closed::SameSource)
                }
                None => {
                    drop(conns);
                    self.counters.refused.inc();
                    self.log(ip, Closed::Refused);
                    return None;
                }
            }
        } else if conns.iter().filter(|c| c.is_open()).count() >= self.limits.max_connections {
            let victim = conns
                .iter()
                .filter(|c| c.is_open())
                .min_by_key(|c| c.eviction_rank());
            victim.map(|v| {
                v.close();
                Closed::Evicted(v.ip)
            })
        } else {
            None
        };
        let shared = Arc::new(ConnShared {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            ip,
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            responded: AtomicBool::new(false),
            request_pending: AtomicBool::new(false),
            last_answer_ms: AtomicU64::new(self.now_ms()),
        });
        conns.push(shared.clone());
        drop(conns);
        if let Some(closed) = closed {
            match closed {
                Closed::SameSource => self.counters.refused.inc(),
                _ => self.counters.evicted.inc(),
            };
            self.log(ip, closed);
        }
        Some(shared)
    }

    /// One rate-limited warning line.
    fn log(&self, ip: IpAddr, closed: Closed) {
        let Some(suppressed) = self.warn.allow() else {
            return;
        };
        let limits = &self.limits;
        match closed {
            Closed::Evicted(victim) => tracing::warn!(
                new = %ip,
                closed = %victim,
                max = limits.max_connections,
                suppressed,
                "admin HTTP server full: closed an open connection to accept a new one (slow or idle clients?)"
            ),
            Closed::SameSource => tracing::warn!(
                source = %ip,
                max_per_ip = limits.max_connections_per_ip,
                suppressed,
                "too many admin HTTP connections from one address: closed its oldest idle one"
            ),
            Closed::Refused => tracing::warn!(
                source = %ip,
                max_per_ip = limits.max_connections_per_ip,
                suppressed,
                "too many admin HTTP connections from one address: refused a new one"
            ),
        }
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|c| c.id != id);
    }
}

/// Finds the end of an HTTP/1 request head (an empty line after some
/// content) in the bytes a client sends. Only a hint for the deadline and
/// eviction; hyper does the parsing.
#[derive(Debug, Default)]
struct HeadScan {
    /// A byte other than CR/LF arrived since the last response.
    content: bool,
    /// Line feeds in a row (CRs between them ignored).
    newlines: u8,
}

impl HeadScan {
    /// Feeds received bytes; true once the head is complete.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match b {
                b'\n' if self.content => {
                    self.newlines += 1;
                    if self.newlines >= 2 {
                        return true;
                    }
                }
                b'\r' | b'\n' => {}
                _ => {
                    self.content = true;
                    self.newlines = 0;
                }
            }
        }
        false
    }
}

/// A TCP listener that applies the [`AdminLimits`] (see [`serve`]).
struct LimitedListener {
    inner: TcpListener,
    table: Arc<ConnTable>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            let Some(shared) = self.table.admit(addr.ip()) else {
                // Over the per-source limit: close it at once.
                drop(stream);
                continue;
            };
            let limits = self.table.limits;
            let now = Instant::now();
            return (
                LimitedStream {
                    inner: stream,
                    idle: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
                    deadline: Box::pin(tokio::time::sleep_until(now + limits.request_deadline)),
                    head: HeadScan::default(),
                    timed_out: false,
                    shared,
                    table: self.table.clone(),
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One admin connection: fails reads after [`AdminLimits::idle_timeout`]
/// without a byte from the client or once the request deadline passes, and
/// fails reads and writes once evicted. Leaves the table when dropped.
struct LimitedStream {
    inner: TcpStream,
    idle: Pin<Box<Sleep>>,
    /// The request deadline; reset by every response write.
    deadline: Pin<Box<Sleep>>,
    head: HeadScan,
    timed_out: bool,
    shared: Arc<ConnShared>,
    table: Arc<ConnTable>,
}

impl LimitedStream {
    fn evicted() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "admin connection closed to make room for another",
        )
    }

    /// A response byte was written: the next request's deadline starts.
    fn answered(&mut self) {
        let shared = &self.shared;
        shared.responded.store(true, Ordering::Relaxed);
        shared.request_pending.store(false, Ordering::Relaxed);
        shared
            .last_answer_ms
            .store(self.table.now_ms(), Ordering::Relaxed);
        self.head = HeadScan::default();
        let now = Instant::now();
        self.deadline
            .as_mut()
            .reset(now + self.table.limits.request_deadline);
        // A response that keeps streaming (the dashboard's events) keeps
        // the connection busy: idle counts from its last byte too.
        self.idle
            .as_mut()
            .reset(now + self.table.limits.idle_timeout);
    }

    /// Bytes arrived from the client.
    fn received(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.shared.request_pending.load(Ordering::Relaxed) {
            return;
        }
        if self.head.feed(bytes) {
            // The request is complete: the handler gets the longer budget.
            self.shared.request_pending.store(true, Ordering::Relaxed);
            let deadline = Instant::now() + self.table.limits.idle_timeout;
            self.deadline.as_mut().reset(deadline);
        }
    }

    /// The deadline passed: count it (once, and not for a keep-alive
    /// connection that simply sent no further request) and fail the read.
    fn deadline_passed(&mut self) -> std::io::Error {
        if !self.timed_out {
            self.timed_out = true;
            let shared = &self.shared;
            let idle_keep_alive = shared.responded.load(Ordering::Relaxed)
                && !shared.request_pending.load(Ordering::Relaxed)
                && !self.head.content;
            if !idle_keep_alive {
                self.table.counters.timed_out.inc();
                tracing::debug!(
                    client = %shared.ip,
                    "admin connection closed: no complete request before the deadline"
                );
            }
        }
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "admin connection closed at the request deadline",
        )
    }
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        self.table.remove(self.shared.id);
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.shared.waker.register(cx.waker());
        if !this.shared.is_open() {
            return Poll::Ready(Err(Self::evicted()));
        }
        // Polling the deadline registers this task's waker with it, so a
        // silent connection is closed when it fires.
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(this.deadline_passed()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let deadline = Instant::now() + this.table.limits.idle_timeout;
                this.idle.as_mut().reset(deadline);
                if r.is_ok() {
                    let filled = buf.filled();
                    let new = filled.get(before..).unwrap_or_default();
                    this.received(new);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "admin connection idle for {:?}",
                        this.table.limits.idle_timeout
                    ),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.shared.waker.register(cx.waker());
        if !this.shared.is_open() {
            return Poll::Ready(Err(Self::evicted()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.answered();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.shared.waker.register(cx.waker());
        if !this.shared.is_open() {
            return Poll::Ready(Err(Self::evicted()));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.answered();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize, per_ip: usize) -> (ConnTable, Arc<AdminCounters>) {
        let counters = Arc::new(AdminCounters::default());
        let limits = AdminLimits {
            max_connections: max,
            max_connections_per_ip: per_ip,
            ..AdminLimits::default()
        };
        (ConnTable::new(limits, counters.clone()), counters)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn admin_head_scan_finds_the_empty_line() {
        let mut h = HeadScan::default();
        assert!(!h.feed(b"\r\n\r\n"), "leading blank lines are no request");
        assert!(!h.feed(b"GET /live HTTP/1.1\r\nHost: x\r"));
        assert!(!h.feed(b"\n"));
        assert!(h.feed(b"\r\n"));
        let mut h = HeadScan::default();
        assert!(h.feed(b"GET / HTTP/1.1\n\n"));
        let mut h = HeadScan::default();
        assert!(!h.feed(b"GET / HTTP/1.1\r\nX-a: b\r\nX"));
    }

    #[test]
    fn admin_full_server_evicts_the_oldest_unanswered() {
        let (t, counters) = table(3, 3);
        let a = t.admit(ip(2)).expect("a");
        let b = t.admit(ip(3)).expect("b");
        let c = t.admit(ip(4)).expect("c");
        // `a` was answered and waits for its next request; `b` never was.
        a.responded.store(true, Ordering::Relaxed);
        let d = t.admit(ip(5)).expect("d");
        assert!(a.is_open() && !b.is_open() && c.is_open() && d.is_open());
        assert_eq!(counters.evicted.get(), 1);
        // `c` has a request in flight, `d` never answered: `d` goes first.
        c.request_pending.store(true, Ordering::Relaxed);
        t.remove(b.id);
        let _e = t.admit(ip(6)).expect("e");
        assert!(!d.is_open() && c.is_open() && a.is_open());
        assert_eq!(counters.evicted.get(), 2);
    }

    #[test]
    fn admin_all_answered_evicts_the_longest_waiting() {
        let (t, _) = table(2, 2);
        let a = t.admit(ip(2)).expect("a");
        let b = t.admit(ip(3)).expect("b");
        for (conn, at) in [(&a, 500), (&b, 100)] {
            conn.responded.store(true, Ordering::Relaxed);
            conn.last_answer_ms.store(at, Ordering::Relaxed);
        }
        let _c = t.admit(ip(4)).expect("c");
        assert!(a.is_open() && !b.is_open());
    }

    #[test]
    fn admin_per_ip_limit_closes_that_sources_own_connections() {
        let (t, counters) = table(10, 2);
        let other = t.admit(ip(9)).expect("other source");
        let a = t.admit(ip(2)).expect("a");
        let b = t.admit(ip(2)).expect("b");
        // Over the limit: the source's oldest idle connection makes room.
        let c = t.admit(ip(2)).expect("c");
        assert!(!a.is_open() && b.is_open() && c.is_open() && other.is_open());
        assert_eq!(counters.refused.get(), 1);
        // When all of them have a request in flight, the new one is refused.
        b.request_pending.store(true, Ordering::Relaxed);
        c.request_pending.store(true, Ordering::Relaxed);
        assert!(t.admit(ip(2)).is_none());
        assert!(b.is_open() && c.is_open());
        assert_eq!(counters.refused.get(), 2);
        assert_eq!(counters.evicted.get(), 0);
        // IPv4-mapped IPv6 counts as the same source.
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().expect("mapped address");
        assert!(t.admit(mapped).is_none());
    }
}
