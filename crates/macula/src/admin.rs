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
//! | `GET /admin/raft` | [`RaftReport`]: the Raft groups this node is a member of |
//! | `GET /admin/raft/{group}` | [`RaftGroupReport`] (also `.../members`) |
//! | `POST /admin/raft/{group}/members` | [`MembersRequest`] → [`RaftGroupReport`] |
//! | `GET /admin/raft/{group}/kv/{key}` | [`KvGetReport`] (`?stale=true`: this member's own state) |
//! | `GET /admin/raft/{group}/kv?prefix=P&limit=N` | [`KvListReport`] |
//! | `PUT /admin/raft/{group}/kv/{key}` | body = value, `?lease=ID` → [`KvWriteReport`] |
//! | `DELETE /admin/raft/{group}/kv/{key}` | `?prefix=true` → [`KvWriteReport`] |
//! | `POST /admin/raft/{group}/cas` | [`CasRequest`] → [`CasReport`] (409 when the comparison failed) |
//! | `GET /admin/raft/{group}/watch?prefix=P&from=REV&wait_ms=MS` | long poll → [`WatchReport`] |
//! | `GET /admin/realm` | [`RealmReport`]: the realm's authority, this node's grant, the revocation list held |
//! | `GET /dashboard` | the live web dashboard (a static page; its data needs the admin token) |
//! | `GET /admin/dashboard` | [`DashboardReport`]: this node and what its peers report over the mesh |
//! | `GET /admin/dashboard/events` | the same as a server-sent event stream (`snapshot` events), at most `dashboard_max_streams` at once |
//! | `/admin/streams...` | durable streams, their messages and consumers (see `macula_runtime::admin::stream` for every route): [`StreamsReport`], [`MsgReport`] ... |
//! | `POST /admin/realm/revocations` | body = a signed revocation list → [`RevocationsReport`] (adopted when newer, then spread through the mesh) |
//!
//! Anything else is a 404 (405 for another method) with an [`ErrorReport`]
//! (its `kind` names the cause, e.g. `raft.no_leader`). The report types are
//! the JSON shapes, a compatibility promise to scripts (fields are added,
//! never renamed or removed); a client of the API deserializes them. Keys
//! and values in JSON are strings when they are UTF-8, else `key_base64` /
//! `value_base64` (standard base64); in URLs they are percent-encoded bytes.
//! The server only reads the node's state, except under `/admin/raft`
//! (key-value writes and membership changes, through this node's member of
//! the group).
//!
//! Every route but `/live`, `/ready` and `/health` needs credentials
//! (`/metrics` not from loopback): `Authorization: Bearer <token>` with the
//! node's admin token ([`TOKEN_FILE`] in its data directory, or
//! [`crate::config::AdminAuthConfig::token_file`]), or a request signed with
//! [`sign_request`] under an admin grant of the realm authority (rules
//! `allow admin admin.**`; the resource of each path is [`resource`]). A
//! refusal is a 401 [`ErrorReport`] whose `kind` names why (`missing`,
//! `bad_token`, `bad_grant:<kind>`, `stale`, `replayed`, `denied`); too many
//! failures from one address get 429. It is plain HTTP: bind it to loopback
//! unless the operator says otherwise.
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

pub use macula_runtime::admin::stream::{
    AckRequest, BrokenStream, MsgReport, NextRequest, PublishRequest, PurgeReport, PurgeRequest,
    StreamsReport, MAX_NEXT_WAIT,
};
pub use macula_runtime::admin::{
    request_message, resource, sign_request, AdminLimits, CasReport, CasRequest, ErrorReport,
    EventReport, GrantReport, HealthReport, KvGetReport, KvListReport, KvReport, KvWriteReport,
    LocalService, MembersRequest, MeshService, NatHealth, PeerReport, PeersReport, ProviderHealth,
    RaftGroupReport, RaftReport, ReadyReport, RealmReport, RevocationsReport, RoutingContact,
    RoutingReport, ServiceProvider, ServicesReport, SubscriptionInfo, SubscriptionsReport,
    WatchReport, ADMIN_IDLE_TIMEOUT, ADMIN_REQUEST_DEADLINE, BEARER, GRANT_SCHEME,
    KV_LIST_DEFAULT_LIMIT, KV_LIST_MAX_LIMIT, MAX_ADMIN_CONNECTIONS, MAX_ADMIN_CONNECTIONS_PER_IP,
    METRICS_CONTENT_TYPE, RAFT_ADMIN_DEADLINE, TOKEN_FILE, WATCH_DEFAULT_WAIT, WATCH_MAX_EVENTS,
    WATCH_MAX_WAIT,
};
pub use macula_runtime::admin::{DashboardLink, DashboardNode, DashboardReport, NodeReport};

/// Serves the admin API for `node` on an already-bound `listener` (so a
/// busy port fails before anything starts, and tests can bind port 0) until
/// `shutdown` completes; then stops accepting and lets open requests finish.
/// At most [`MAX_ADMIN_CONNECTIONS`] connections are served at once
/// ([`MAX_ADMIN_CONNECTIONS_PER_IP`] from one address); it cannot be starved:
/// a connection that sends no whole request within
/// [`ADMIN_REQUEST_DEADLINE`] is closed, and when every slot is taken a new
/// connection evicts the oldest one that was never answered, so `/live`,
/// `/ready` and `/health` answer through a slow-loris flood.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    macula_runtime::admin::serve(listener, node.runtime().clone(), shutdown).await
}

/// [`serve`] with other limits ([`AdminLimits::default`] are `serve`'s).
pub async fn serve_with(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: AdminLimits,
) -> std::io::Result<()> {
    macula_runtime::admin::serve_with(listener, node.runtime().clone(), shutdown, limits).await
}

/// Routes a service adds to the admin API ([`serve_with_routes`]): an
/// axum router without state.
pub type Routes = axum::Router;

/// [`serve_with`] with more routes beside the node's own (a service's
/// admin API, e.g. the workload agent's `/admin/workloads`): they sit
/// behind the same credentials check and connection limits.
pub async fn serve_with_routes(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: AdminLimits,
    routes: Routes,
) -> std::io::Result<()> {
    macula_runtime::admin::serve_with_routes(
        listener,
        node.runtime().clone(),
        shutdown,
        limits,
        routes,
    )
    .await
}

/// End-to-end keys (issue 19): `GET /admin/realm/keys`, and the CSPRNG the
/// CLI wraps keys with.
pub use macula_runtime::e2e::{KeysReport, SysRng};
