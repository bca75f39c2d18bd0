//! A lightweight client ([`Client`], built by [`ClientBuilder`]): it attaches
//! to one node of the mesh (its gateway), listens on nothing, stores no DHT
//! records, and fails over to the next node with its subscriptions and
//! advertisements when its gateway dies. Given two or more nodes, it also
//! keeps its subscriptions on a second one (events delivered once), so a
//! gateway's death loses no event
//! ([`ClientBuilder::redundant_subscriptions`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), macula::Error> {
//! let gateways = ["127.0.0.1:4433".parse().unwrap()];
//! let client = macula::Client::builder(gateways)
//!     .realm("io.example.shop")
//!     .connect()
//!     .await?;
//! client.publish("orders.new", "42 apples").await?;
//! client.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Thin wrappers over the runtime's client; they keep its QUIC endpoint and
//! service modules out of the public API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_runtime::ClientConfig;

use crate::config::{IdentitySource, Limits, PubSubLimits, RpcLimits, TlsOptions};
use crate::{
    AdvertiseOptions, CallBuilder, Error, Handler, Metrics, NodeId, PeerAddr, PublishOptions,
    Registration, Subscription,
};

/// Starts a lightweight client attached to the first of `gateways`
/// (`HOST:PORT` or `NODEID@HOST:PORT`) that accepts it. For other settings
/// use [`Client::builder`].
pub async fn connect_client<I, S>(gateways: I) -> Result<Client, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut addrs = Vec::new();
    for g in gateways {
        addrs.push(crate::parse_peer("gateway", g.as_ref())?);
    }
    Client::builder(addrs).connect().await
}

/// One UDP socket that many clients of one process dial from: QUIC tells
/// their connections apart by connection ID, so thousands of clients (a
/// load generator, a benchmark) need no port each. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ClientSocket(quinn::Endpoint);

impl ClientSocket {
    /// Binds a client-only socket at `addr` (port 0: any), listening for
    /// nothing.
    pub fn bind(addr: SocketAddr) -> Result<ClientSocket, Error> {
        Ok(ClientSocket(macula_runtime::Client::endpoint(addr)?))
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    /// Closes every connection still using the socket at once (code 0,
    /// `reason` as the QUIC close reason), without the clients' goodbyes:
    /// shut the clients down first.
    pub fn close(&self, reason: &str) {
        self.0.close(0u32.into(), reason.as_bytes());
    }
}

/// Builds and connects a [`Client`]. Cheap to clone, so one builder can
/// serve as the template of many clients.
#[derive(Clone, Debug)]
#[must_use]
pub struct ClientBuilder {
    config: ClientConfig,
}

impl ClientBuilder {
    /// The realm to join (default `default`).
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        self.config.realm = realm.into();
        self
    }

    /// This client's grant (a token's bytes, `macula::auth::Grant`), for a
    /// gateway whose realm has an authority.
    pub fn grant(mut self, grant: Vec<u8>) -> Self {
        self.config.grant = Some(grant);
        self
    }

    /// This client's API key (`macula realm apikey` prints one), for a
    /// gateway that keeps API keys: it admits the client with the grant
    /// the key is bound to. Sent only when no [`ClientBuilder::grant`] is.
    pub fn api_key(mut self, key: crate::apikey::ApiKey) -> Self {
        self.config.api_key = Some(key);
        self
    }

    /// Persist the client's identity in `dir/node.key` (default: a fresh
    /// in-memory identity).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.identity = IdentitySource::DataDir(dir.into());
        self
    }

    /// Local UDP address to dial from (default `0.0.0.0:0`). Ignored with
    /// [`ClientBuilder::socket`].
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.config.bind = addr;
        self
    }

    /// Dial from a socket shared with other clients instead of binding one.
    pub fn socket(mut self, socket: &ClientSocket) -> Self {
        self.config.endpoint = Some(socket.0.clone());
        self
    }

    /// [`ClientBuilder::connect`] fails if no gateway accepts within this
    /// long (default 15 s).
    pub fn attach_timeout(mut self, timeout: Duration) -> Self {
        self.config.attach_timeout = timeout;
        self
    }

    /// TLS mode and pinned nodes.
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.config.tls = tls;
        self
    }

    /// Connection limits and timers at once. A client's defaults differ
    /// from a node's: keep-alives every second and a gateway considered
    /// dead after 4 s of silence.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// QUIC keep-alive interval (default 1 s): the price of noticing a dead
    /// gateway quickly. The gateway counts as dead after four intervals of
    /// silence, or the current dead-after time if that is longer.
    pub fn keep_alive(mut self, interval: Duration) -> Self {
        let l = &mut self.config.limits;
        l.keep_alive_interval = interval;
        l.transport_idle_timeout = l.transport_idle_timeout.max(interval.saturating_mul(4));
        self
    }

    /// The keep-alive interval the client will use.
    pub fn keep_alive_interval(&self) -> Duration {
        self.config.limits.keep_alive_interval
    }

    /// With two or more gateways, subscribe through two at once (default
    /// `true`; the second connection is made at the first subscription):
    /// every event comes through both and is delivered once, so
    /// the death of either loses nothing, and a new second gateway is
    /// attached in the background. `false`: one gateway at a time; the
    /// events published while the client fails over (about 5 s after a
    /// gateway is killed) are lost, and told to each subscription as
    /// `Lagged(n)`, `n` the publisher's sequence numbers skipped (exact
    /// when the client subscribes to every topic the publisher uses, an
    /// upper bound otherwise). Only the primary gateway carries publishes,
    /// calls and advertisements either way.
    pub fn redundant_subscriptions(mut self, on: bool) -> Self {
        self.config.redundant_subscriptions = on;
        self
    }

    /// Pub/sub limits (subscription queues, topic sizes).
    pub fn pubsub_limits(mut self, limits: PubSubLimits) -> Self {
        self.config.pubsub = limits;
        self
    }

    /// RPC limits (calls in flight, handler concurrency).
    pub fn rpc_limits(mut self, limits: RpcLimits) -> Self {
        self.config.rpc = limits;
        self
    }

    /// Starts the client and waits until one of its gateways accepted it.
    pub async fn connect(self) -> Result<Client, Error> {
        Ok(Client(macula_runtime::Client::connect(self.config).await?))
    }
}

/// A lightweight client of the mesh. Cheap to clone; `shutdown` ends it.
#[derive(Clone)]
pub struct Client(macula_runtime::Client);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.0.node_id())
            .field("gateway", &self.0.gateway())
            .field("second_gateway", &self.0.second_gateway())
            .finish()
    }
}

impl Client {
    /// A builder for a client of `gateways`, in order of preference (at
    /// least one), with every other setting at its default.
    pub fn builder(gateways: impl IntoIterator<Item = PeerAddr>) -> ClientBuilder {
        ClientBuilder {
            config: ClientConfig::new(gateways.into_iter().collect()),
        }
    }

    /// This client's node ID.
    pub fn id(&self) -> NodeId {
        self.0.node_id()
    }

    /// The realm's end-to-end keys as this client holds them (from its
    /// gateway).
    pub fn e2e(&self) -> &std::sync::Arc<crate::e2e::E2e> {
        self.0.e2e()
    }

    /// The node this client is attached to now.
    pub fn gateway(&self) -> Option<NodeId> {
        self.0.gateway()
    }

    /// Times the client lost its gateway and attached again.
    pub fn failovers(&self) -> u64 {
        self.0.failovers()
    }

    /// The second gateway carrying this client's subscriptions now, if any
    /// (see [`ClientBuilder::redundant_subscriptions`]).
    pub fn second_gateway(&self) -> Option<NodeId> {
        self.0.second_gateway()
    }

    /// Gateways lost while no other one had carried every event: after
    /// each, the gap was told to subscriptions as `Lagged`.
    pub fn uncovered_failovers(&self) -> u64 {
        self.0.uncovered_failovers()
    }

    /// Publishers' sequence numbers told as possibly missed after those
    /// failovers (summed over publishers).
    pub fn missed_after_failover(&self) -> u64 {
        self.0.missed_after_failover()
    }

    /// Publishes through the gateway; returns the sequence number.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<u64, Error> {
        Ok(self.0.publish(topic, payload).await?)
    }

    /// `publish` with headers and an application message ID.
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        options: PublishOptions,
    ) -> Result<u64, Error> {
        Ok(self.0.publish_with(topic, payload, options).await?)
    }

    /// Subscribes through the gateway; returns once the gateway has
    /// registered the interest in the mesh. Dropping it unsubscribes.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, Error> {
        Ok(self.0.subscribe(pattern).await?)
    }

    /// A call through the gateway; configure it as with
    /// [`crate::Node::call`], then `.await` it.
    pub fn call(&self, procedure: &str, payload: impl Into<Bytes>) -> CallBuilder {
        self.0.call(procedure, payload).into()
    }

    /// Durable stream `name`, hosted by a node of the mesh, through the
    /// gateway (see [`crate::Node::stream`]).
    pub fn stream(&self, name: &str, timeout: Duration) -> crate::stream::StreamHandle {
        self.0.stream(name, timeout)
    }

    /// The key-value store of Raft group `group`, through its gateway and
    /// any member (see [`crate::Node::kv`]).
    pub fn kv(&self, group: &str, timeout: Duration) -> crate::raft::Kv {
        let client = self.clone();
        crate::raft::Kv::remote(crate::raft::Remote {
            procedure: crate::raft::procedure(group),
            timeout,
            call: Arc::new(move |member, procedure, body, timeout| {
                let client = client.clone();
                Box::pin(async move {
                    // A client's calls go through its gateway, which picks
                    // the member: the leader hint is not used.
                    let _ = member;
                    let r = client
                        .call(&procedure, body)
                        .timeout(timeout)
                        .retries(0)
                        .await?;
                    Ok(r.payload)
                })
            }),
            leader: Arc::default(),
        })
    }

    /// Serves `procedure`: the gateway advertises it and forwards its calls
    /// here (after a failover, the next gateway). Dropping the registration
    /// withdraws it.
    pub async fn advertise<H: Handler>(
        &self,
        procedure: &str,
        handler: H,
    ) -> Result<Registration, Error> {
        self.advertise_with(procedure, AdvertiseOptions::default(), handler)
            .await
    }

    /// `advertise` with a weight, metadata and a concurrency limit.
    pub async fn advertise_with<H: Handler>(
        &self,
        procedure: &str,
        options: AdvertiseOptions,
        handler: H,
    ) -> Result<Registration, Error> {
        Ok(self.0.advertise(procedure, options, handler).await?)
    }

    /// Connection-layer counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.0.metrics()
    }

    /// Graceful shutdown: withdraws advertisements, delivers what was
    /// published (bounded), says goodbye to the gateway.
    pub async fn shutdown(&self) {
        self.0.shutdown().await
    }
}
