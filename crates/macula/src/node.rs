//! A full mesh node ([`Node`], built by [`NodeBuilder`]) and a connection to
//! one of its peers ([`Peer`]).
//!
//! Thin wrappers over the runtime's `NodeRuntime` and `Peer`: each method
//! forwards to one runtime call. They exist so that what an application
//! sees is this API, not the runtime's service modules and QUIC types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_runtime::NodeRuntime;

use crate::config::{
    IdentitySource, Limits, NodeConfig, PubSubLimits, ReachabilityMode, RelayLimits, RpcLimits,
    TlsOptions,
};
use crate::{
    AdvertiseOptions, CallBuilder, DhtHandle, Direction, DisconnectReason, Error, Handler, Metrics,
    NodeId, PeerAddr, PeerEvent, PingError, ProviderInfo, PublishOptions, Registration,
    Subscription,
};

/// A snapshot of one connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The node ID the peer proved in the TLS handshake.
    pub node_id: NodeId,
    /// The peer's UDP address as this node sees it.
    pub addr: SocketAddr,
    /// Who dialed whom.
    pub direction: Direction,
    /// QUIC's smoothed round-trip time.
    pub rtt: Duration,
    /// Addresses the peer says it listens on (from its HELLO).
    pub listen_addrs: Vec<String>,
}

/// Counters of one node since it started, read at one moment (each counter
/// is exact; the set is not one atomic snapshot). The full set is served as
/// Prometheus metrics by [`crate::admin::serve`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// Messages published on this node (by it or, as a gateway, its clients).
    pub published: u64,
    /// Events pushed into this node's own subscription queues.
    pub delivered_local: u64,
    /// Events dropped from full subscription queues (slow subscribers).
    pub dropped_slow_subscriber: u64,
    /// Messages queued to other nodes (one per interested node).
    pub sent_remote: u64,
    /// Messages received from other nodes and delivered.
    pub received_remote: u64,
    /// Outbound messages dropped: a peer's queue was full, or the peer was
    /// unreachable.
    pub dropped_outbound: u64,
    /// Of those, dropped from a full queue to make room for a newer one
    /// (`Overflow::DropOldest`).
    pub evicted_outbound: u64,
    /// Publishes that waited for room in a full queue (`Overflow::Block`).
    pub publish_blocked: u64,
    /// Publishes refused with `QueueFull` (`Overflow::FailFast`).
    pub publish_refused: u64,
    /// Dropped messages told to the nodes they were for (loss reports).
    pub loss_reported: u64,
    /// Dropped messages nobody could be told of (the node was gone).
    pub loss_unreported: u64,
    /// Missed events told to this node's subscriptions as `Lagged` from
    /// other nodes' loss reports (per subscription).
    pub loss_told: u64,
    /// Bytes this node forwarded as a relay, both directions.
    pub relayed_bytes: u64,
}

/// Builds and starts a [`Node`].
#[derive(Debug, Clone)]
#[must_use]
pub struct NodeBuilder {
    config: NodeConfig,
    bootstrap_errors: Vec<(String, String)>,
    /// Set by `api_keys`, applied at `start` (in either order with
    /// `realm_authority`).
    api_keys: Option<(crate::apikey::ApiKeyStore, crate::apikey::ApiKeyLimits)>,
    join_wait: Option<Duration>,
}

/// How long [`NodeBuilder::start`] waits, by default, for the join through
/// the bootstrap peers to reach one of them: several of the DHT's join
/// retries (1 s, doubling), well past a handshake on any WAN.
pub const JOIN_WAIT: Duration = Duration::from_secs(10);

impl NodeBuilder {
    /// The realm to join (default `default`). Nodes in other realms are refused.
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        self.config.realm = realm.into();
        self
    }

    /// Peers to join through: `HOST:PORT`, `quic://HOST:PORT` or
    /// `NODEID@HOST:PORT` (the node must then prove that ID).
    pub fn bootstrap<I, S>(mut self, peers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for p in peers {
            match p.as_ref().parse::<PeerAddr>() {
                Ok(addr) => self.config.bootstrap.push(addr),
                Err(e) => self
                    .bootstrap_errors
                    .push((p.as_ref().to_string(), e.to_string())),
            }
        }
        self
    }

    /// UDP address for QUIC (default `0.0.0.0:4433`; port 0 picks one).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }

    /// Persist the identity in `dir/node.key` (created on first start).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.identity = IdentitySource::DataDir(dir.into());
        self
    }

    /// TLS mode and pinned peers (default: self-certifying, no pins).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.config.tls = tls;
        self
    }

    /// Every limit and timer of the connection layer at once.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
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

    /// The relay this node runs for others, and how many relays it reserves
    /// at when it cannot be dialed itself.
    pub fn relay(mut self, relay: RelayLimits) -> Self {
        self.config.relay = relay;
        self
    }

    /// NAT detection and hole punching (`punch_start_delay`: how long a
    /// relayed connection is used before punching starts).
    pub fn nat(mut self, nat: crate::config::NatLimits) -> Self {
        self.config.nat = nat;
        self
    }

    /// Whether to find out if peers can dial this node (default), or to
    /// behave as a node behind NAT without asking.
    pub fn reachability(mut self, mode: ReachabilityMode) -> Self {
        self.config.reachability = mode;
        self
    }

    /// The realm has an authority (`macula realm key` prints it): only
    /// peers with a valid grant for their node ID are admitted, and this
    /// node presents `grant` (a token's bytes, `macula::auth::Grant`).
    /// Without this the realm is open, as by default.
    pub fn realm_authority(mut self, authority: crate::auth::Key, grant: Option<Vec<u8>>) -> Self {
        self.config.admission = Some(crate::config::Admission::new(authority, grant));
        self
    }

    /// Accept lightweight clients presenting one of these API keys instead
    /// of a grant (`macula realm apikey` issues them; [`ApiKeyStore::load`]
    /// reads the file `macula realm apikeys --export` writes): each is
    /// admitted with the grant its key is bound to, verified against the
    /// realm authority, so [`NodeBuilder::realm_authority`] is needed too
    /// ([`NodeBuilder::start`] fails without it). `limits`: failed
    /// attempts tolerated per address and in the realm.
    ///
    /// [`ApiKeyStore::load`]: crate::apikey::ApiKeyStore::load
    pub fn api_keys(
        mut self,
        keys: crate::apikey::ApiKeyStore,
        limits: crate::apikey::ApiKeyLimits,
    ) -> Self {
        self.api_keys = Some((keys, limits));
        self
    }

    /// Replaces the whole configuration (what the daemon does); bootstrap
    /// peers given before are replaced too.
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// How long [`NodeBuilder::start`] waits for the node to join the mesh
    /// through its bootstrap peers: `Some(d)` (default [`JOIN_WAIT`]) fails
    /// the start with [`Error::Join`] if none answered within `d`; `None`
    /// returns at once and keeps retrying in the background (a daemon whose
    /// seeds may come up later; `/ready` tells when it joined).
    pub fn wait_for_join(mut self, wait: Option<Duration>) -> Self {
        self.join_wait = wait;
        self
    }

    /// Starts the node: identity, socket, accept loop, bootstrap; with
    /// bootstrap peers, returns once the node has joined the mesh through
    /// one of them (see [`NodeBuilder::wait_for_join`]), so what it does
    /// next (subscribe, publish, call) reaches the mesh.
    pub async fn start(mut self) -> Result<Node, Error> {
        if let Some((value, reason)) = self.bootstrap_errors.into_iter().next() {
            return Err(Error::Config {
                key: "bootstrap",
                value,
                reason,
            });
        }
        if let Some((keys, limits)) = self.api_keys.take() {
            let Some(a) = self.config.admission.as_mut() else {
                return Err(Error::Config {
                    key: "api_keys",
                    value: format!("{} keys", keys.len()),
                    reason: "API keys need a realm authority (realm_authority) to verify their \
                             grants"
                        .into(),
                });
            };
            a.api_keys = Some(keys);
            a.api_key_limits = limits;
        }
        let peers: Vec<String> = self
            .config
            .bootstrap
            .iter()
            .map(|p| p.to_string())
            .collect();
        let runtime = NodeRuntime::start(self.config).await?;
        if let (Some(wait), false) = (self.join_wait, peers.is_empty()) {
            let joined = tokio::time::timeout(wait, runtime.wait_joined()).await;
            let err = match joined {
                Ok(Ok(())) => None,
                // Every bootstrap peer said no for good: at once, with why.
                Ok(Err(refusals)) => Some(Error::JoinRefused {
                    refusals: refusals
                        .iter()
                        .map(|(t, r)| format!("{t}: {r}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                }),
                Err(_) => Some(Error::Join {
                    peers: peers.join(", "),
                    waited: wait,
                }),
            };
            if let Some(e) = err {
                runtime.shutdown().await;
                return Err(e);
            }
        }
        Ok(Node {
            runtime,
            raft_served: Arc::default(),
        })
    }
}

/// A running mesh node. Cheap to clone: clones share the node.
#[derive(Clone)]
pub struct Node {
    runtime: NodeRuntime,
    /// The `_raft.<group>` advertisements of the groups joined through
    /// this node, shared by every `raft::Group` handle of a group.
    raft_served:
        Arc<parking_lot::Mutex<std::collections::HashMap<String, std::sync::Weak<Registration>>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.runtime.node_id())
            .field("addr", &self.runtime.local_addr())
            .finish()
    }
}

impl Node {
    /// A builder with every setting at its default.
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            config: NodeConfig::default(),
            bootstrap_errors: Vec::new(),
            api_keys: None,
            join_wait: Some(JOIN_WAIT),
        }
    }

    /// This node's ID (the BLAKE3 hash of its public key).
    pub fn id(&self) -> NodeId {
        self.runtime.node_id()
    }

    /// The realm's end-to-end keys as this node holds them (issue 19):
    /// `report` what is held, `member_key` to wrap keys to, `version`.
    /// (`install_keys` below takes a new set and spreads it.)
    pub fn e2e(&self) -> &std::sync::Arc<crate::e2e::E2e> {
        self.runtime.realm_service().e2e()
    }

    /// Takes a signed end-to-end key set (`macula::auth::keys::KeySet`
    /// bytes) as `POST /admin/realm/keys` does: adopted when newer, then
    /// spread to the mesh and to clients. Returns the version held.
    pub fn install_keys(&self, set: &[u8]) -> Result<u64, crate::e2e::E2eError> {
        Ok(
            match self.runtime.realm_service().install_keys(set, None)? {
                macula_runtime::authz::Installed::Adopted { version } => version,
                macula_runtime::authz::Installed::Stale { have } => have,
            },
        )
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.runtime.local_addr()
    }

    /// The MQTT listener's address, when the node has one
    /// (`NodeConfig::mqtt`; docs/MQTT.md).
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.runtime.mqtt().map(|m| m.local_addr())
    }

    /// The realm this node belongs to.
    pub fn realm(&self) -> &str {
        self.runtime.realm()
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &NodeConfig {
        self.runtime.config()
    }

    /// Connected peers, sorted by node ID.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut v: Vec<_> = self
            .runtime
            .peers()
            .into_iter()
            .map(|p| PeerInfo {
                node_id: p.node_id(),
                addr: p.remote_addr(),
                direction: p.direction(),
                rtt: p.rtt(),
                listen_addrs: p.hello().listen_addrs.clone(),
            })
            .collect();
        v.sort_by_key(|p| p.node_id);
        v
    }

    /// The pooled connection to `node_id`, if there is one.
    pub fn peer(&self, node_id: NodeId) -> Option<Peer> {
        self.runtime.peer(&node_id).map(Peer)
    }

    /// Connects (or reuses the pooled connection) to a peer given as
    /// `HOST:PORT` or `NODEID@HOST:PORT`.
    pub async fn connect(&self, peer: &str) -> Result<Peer, Error> {
        let addr = crate::parse_peer("peer", peer)?;
        Ok(Peer(self.runtime.connect_addr(&addr).await?))
    }

    /// Connects (or reuses the pooled connection) to the node at `addr`;
    /// with `expected`, the peer must prove that node ID in the TLS
    /// handshake. Concurrent calls for one address share one dial.
    pub async fn connect_to(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Peer, Error> {
        Ok(Peer(self.runtime.connect(addr, expected).await?))
    }

    /// Opens a new connection (TLS and HELLO) outside the pool, for tools
    /// and benchmarks that measure connection setup. Close it with
    /// [`Peer::disconnect`] or [`Peer::close`] when done.
    pub async fn dial_unpooled(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Peer, Error> {
        Ok(Peer(self.runtime.dial_unpooled(addr, expected).await?))
    }

    /// Connects to `target` through `relay` (a node `target` holds a
    /// reservation at): end-to-end QUIC and TLS that the relay cannot read,
    /// pooled like a direct connection and marked [`Peer::relayed_via`].
    pub async fn connect_via(&self, relay: &Peer, target: NodeId) -> Result<Peer, Error> {
        Ok(Peer(self.runtime.connect_via(&relay.0, target).await?))
    }

    /// Relays this node holds a reservation at (when it is private).
    pub fn reserved_relays(&self) -> Vec<NodeId> {
        self.runtime
            .tunnel()
            .reserved_relays()
            .into_iter()
            .collect()
    }

    /// The node's DHT: `put(key, value, ttl)`, `get(key)`, `closest(key, n)`.
    /// Keys are 256-bit; derive them from names with [`crate::dht_key`].
    pub fn dht(&self) -> &DhtHandle {
        self.runtime.dht()
    }

    /// Publishes `payload` on `topic` (dot-separated, no wildcards) and
    /// returns its sequence number. Subscribers on this node receive it
    /// without a network hop; every other node with a matching subscription
    /// gets one copy. A subscription made elsewhere is found within
    /// `INTEREST_CACHE_TTL` (1 s) of its `subscribe` returning.
    ///
    /// Flow control: when the queue to an interested node is full (65,536
    /// messages or 32 MiB), this waits for room ([`crate::Overflow::Block`], the
    /// default), so a fast publisher goes at the pace of the network and
    /// the slowest interested node; a node that accepts nothing for the
    /// stall timeout (10 s) is cut off and counted. Other policies
    /// (`DropOldest`, `DropNewest`, `FailFast`) are set per publish with
    /// [`Node::publish_with`] and [`PublishOptions::overflow`].
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<u64, Error> {
        self.publish_with(topic, payload, PublishOptions::default())
            .await
    }

    /// Waits until a subscription matching `topic` exists somewhere in the
    /// mesh (this node's own included), at most `timeout`; returns how many
    /// nodes have one, `0` if none appeared in time. Use it before a first
    /// publish that must not go to nobody.
    pub async fn wait_for_subscribers(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<usize, Error> {
        Ok(self
            .runtime
            .pubsub()
            .wait_for_subscribers(topic, timeout)
            .await?)
    }

    /// `publish` with headers, an application message ID, or an overflow
    /// policy.
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        options: PublishOptions,
    ) -> Result<u64, Error> {
        Ok(self
            .runtime
            .pubsub()
            .publish_mesh(topic, payload.into(), options)
            .await?)
    }

    /// Subscribes to `pattern` (`*` matches one segment, `**` any number):
    /// a `Stream` of [`crate::SubscriptionItem`]s, bounded (a slow reader
    /// loses the oldest events and gets `Lagged(n)`). The interest is
    /// registered in the mesh (DHT) before this returns. Dropping it
    /// unsubscribes.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, Error> {
        Ok(self.runtime.pubsub().subscribe_mesh(pattern).await?)
    }

    /// Waits, at most `limit`, until everything published so far has been
    /// handed to QUIC (written to the data streams of the nodes it goes to,
    /// or dropped and reported). `Err` (`pubsub.flush_timeout`) names what
    /// was still pending. Handed to QUIC is not received: see
    /// [`Node::flush_acked`].
    pub async fn flush(&self, limit: Duration) -> Result<(), Error> {
        Ok(self.runtime.pubsub().flush(limit).await?)
    }

    /// [`Node::flush`], then waits until every receiving node has
    /// acknowledged the data (its pub/sub streams are finished and
    /// acknowledged; the next publish opens new ones). [`Node::shutdown`]
    /// does this itself.
    pub async fn flush_acked(&self, limit: Duration) -> Result<(), Error> {
        Ok(self.runtime.pubsub().flush_acked(limit).await?)
    }

    /// Serves `procedure` with `handler` (an async function from
    /// [`crate::Request`] to `Result<Bytes, HandlerError>`) and advertises
    /// it in the mesh before returning. Dropping the [`Registration`] stops
    /// serving and withdraws the advertisement.
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
        Ok(self
            .runtime
            .rpc()
            .advertise(procedure, options, handler)
            .await?)
    }

    /// Serves `procedure` (its name must start with `_node.`) only to calls
    /// addressed to this node ([`Node::call_to`]): nothing is advertised,
    /// so every node can serve the same control procedure. Dropping the
    /// [`Registration`] stops serving it.
    pub fn serve_unlisted<H: Handler>(
        &self,
        procedure: &str,
        handler: H,
    ) -> Result<Registration, Error> {
        Ok(self.runtime.rpc().serve_unlisted(procedure, handler)?)
    }

    /// Calls `procedure` on a provider found in the mesh (this node's own
    /// handler, if it has one, without a network hop). Configure with
    /// `.timeout(d)` (default 5 s, retries included), `.retries(n)`
    /// (default 2, on another provider; at-least-once, see
    /// [`CallBuilder::retries`]) and
    /// `.strategy(s)`, then `.await`. Dropping the future cancels the call
    /// on the provider.
    pub fn call(&self, procedure: &str, payload: impl Into<Bytes>) -> CallBuilder {
        self.runtime.rpc().call(procedure, payload).into()
    }

    /// Calls `procedure` on one chosen provider (no failover).
    pub fn call_to(
        &self,
        provider: NodeId,
        procedure: &str,
        payload: impl Into<Bytes>,
    ) -> CallBuilder {
        self.runtime
            .rpc()
            .call_to(provider, procedure, payload)
            .into()
    }

    /// Calls `procedure` over the connection `peer` (no discovery, no
    /// retries); returns the reply payload. Benchmarks compare pooled and
    /// fresh connections with this.
    pub async fn call_via(
        &self,
        peer: &Peer,
        procedure: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        Ok(self
            .runtime
            .rpc()
            .call_via(&peer.0, procedure, payload, timeout)
            .await?)
    }

    /// The durable streams this node hosts (see [`crate::stream`]); they
    /// need a data directory.
    pub fn streams(&self) -> &crate::stream::Streams {
        self.runtime.streams()
    }

    /// Durable stream `name` wherever it lives in the mesh: hosted by this
    /// node (direct) or by another (over RPC, procedure `_stream.<name>`,
    /// which the hosting node advertises); each operation but a pull is
    /// bounded by `timeout`. Publish with an acknowledgement, read, add
    /// consumers, pull, ack and subscribe from a position through it.
    pub fn stream(&self, name: &str, timeout: Duration) -> crate::stream::StreamHandle {
        self.runtime.stream(name, timeout)
    }

    /// Joins (or re-opens) the Raft group `name` as a member and serves it
    /// to non-members (RPC procedure `_raft.<name>`). `members` are the
    /// founding voters: every founder passes the same list (this node
    /// among them) and the group starts once a majority has joined. A node
    /// joining an existing group passes no members and is added by the
    /// leader ([`raft::Group::add_voter`](crate::raft::Group::add_voter)).
    /// Needs a data directory (the log is kept on disk). Calling it again
    /// returns another handle to the same group. The group runs until the
    /// node stops; dropping every handle only withdraws `_raft.<name>`.
    pub async fn raft_group(
        &self,
        name: &str,
        members: impl IntoIterator<Item = NodeId>,
    ) -> Result<crate::raft::Group, Error> {
        let g = self
            .runtime
            .raft()
            .join(
                name,
                crate::raft::GroupOptions {
                    members: members.into_iter().collect(),
                    ..Default::default()
                },
            )
            .await?;
        let live = self
            .raft_served
            .lock()
            .get(name)
            .and_then(std::sync::Weak::upgrade);
        let reg = match live {
            Some(reg) => reg,
            None => {
                let served = g.clone();
                let reg = Arc::new(
                    self.advertise(&crate::raft::procedure(name), move |req: crate::Request| {
                        crate::raft::serve(served.clone(), req.payload)
                    })
                    .await?,
                );
                self.raft_served
                    .lock()
                    .insert(name.to_string(), Arc::downgrade(&reg));
                reg
            }
        };
        Ok(crate::raft::Group::new(g, self.id(), reg))
    }

    /// The key-value store of Raft group `group`, reached over RPC through
    /// any member (this node need not be one; a member's own
    /// [`raft::Group::kv`](crate::raft::Group::kv) skips the hop). Requests
    /// time out after `timeout`; writes are never retried once sent.
    pub fn kv(&self, group: &str, timeout: Duration) -> crate::raft::Kv {
        let node = self.clone();
        crate::raft::Kv::remote(crate::raft::Remote {
            procedure: crate::raft::procedure(group),
            timeout,
            call: Arc::new(move |member, procedure, body, timeout| {
                let node = node.clone();
                Box::pin(async move {
                    let call = match member {
                        Some(m) => node.call_to(m, &procedure, body),
                        None => node.call(&procedure, body),
                    };
                    let r = call.timeout(timeout).retries(0).await?;
                    Ok(r.payload)
                })
            }),
            leader: Arc::default(),
        })
    }

    /// Every procedure advertised in the mesh, with its providers.
    pub async fn services(&self) -> Result<Vec<(String, Vec<ProviderInfo>)>, Error> {
        Ok(self.runtime.rpc().services().await?)
    }

    /// Peer connect/disconnect notifications.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<PeerEvent> {
        self.runtime.subscribe_events()
    }

    /// Connection-layer counters (the `macula_pool_*`, `macula_connections_*`
    /// metrics).
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.runtime.metrics()
    }

    /// Pub/sub and relay counters, read now.
    pub fn stats(&self) -> NodeStats {
        let ps = self.runtime.pubsub().counters();
        NodeStats {
            published: ps.published_total.get(),
            delivered_local: ps.delivered_local_total.get(),
            dropped_slow_subscriber: ps.dropped_slow_total.get(),
            sent_remote: ps.sent_remote_total.get(),
            received_remote: ps.received_remote_total.get(),
            dropped_outbound: ps.remote_dropped_total.get(),
            evicted_outbound: ps.remote_evicted_total.get(),
            publish_blocked: ps.publish_blocked_total.get(),
            publish_refused: ps.publish_refused_total.get(),
            loss_reported: ps.loss_reported_total.get(),
            loss_unreported: ps.loss_unreported_total.get(),
            loss_told: ps.loss_told_total.get(),
            relayed_bytes: self.runtime.relay().counters().bytes_total.get(),
        }
    }

    /// Time since the node started.
    pub fn uptime(&self) -> Duration {
        self.runtime.uptime()
    }

    /// Says goodbye to every peer and closes the socket.
    pub async fn shutdown(&self) {
        self.runtime.shutdown().await
    }

    /// The node's audit trail in `<data dir>/audit/` (`None` for a node
    /// without a data directory): [`crate::audit_log::AuditLog::record`]
    /// appends to its hash chain; checkpoints are signed with the node key.
    pub fn audit(&self) -> Option<&crate::audit_log::AuditLog> {
        self.runtime.audit()
    }

    /// The runtime underneath, for the admin server of this crate only.
    pub(crate) fn runtime(&self) -> &NodeRuntime {
        &self.runtime
    }

    /// Opens the replicated CRDT `name` (one topic segment: ASCII letters,
    /// digits, `_`, `-`) of type `T` (an [`crate::crdt::OrSet`],
    /// [`crate::crdt::PnCounter`], ...), with the default
    /// [`crate::CrdtOptions`]; [`crate::crdt::open`] takes options. Every
    /// node that opens the name holds a replica; they converge by delta
    /// and digest exchange over pub/sub. See [`crate::crdt`].
    pub async fn crdt<T: crate::crdt::Replicated>(
        &self,
        name: &str,
    ) -> Result<crate::Crdt<T>, Error> {
        crate::crdt::open(self, name, crate::CrdtOptions::default()).await
    }
}

/// A connection to one peer, authenticated (the peer proved its node ID)
/// and past the HELLO exchange. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct Peer(macula_runtime::Peer);

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("node_id", &self.0.node_id())
            .field("addr", &self.0.remote_addr())
            .field("direction", &self.0.direction())
            .finish()
    }
}

impl Peer {
    /// The node ID the peer proved.
    pub fn node_id(&self) -> NodeId {
        self.0.node_id()
    }

    /// The peer's UDP address as this node sees it.
    pub fn remote_addr(&self) -> SocketAddr {
        self.0.remote_addr()
    }

    /// Who dialed whom.
    pub fn direction(&self) -> Direction {
        self.0.direction()
    }

    /// QUIC's smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.0.rtt()
    }

    /// The relay this connection runs through; `None` when direct.
    pub fn relayed_via(&self) -> Option<NodeId> {
        self.0.relayed_via()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Sends a PING and waits (at most `timeout`) for its PONG; returns the
    /// round-trip time.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, PingError> {
        self.0.ping(timeout).await
    }

    /// Tells the peer why (a DISCONNECT frame, waited for at most 500 ms),
    /// then closes the connection.
    pub async fn disconnect(&self, reason: DisconnectReason, message: &str) {
        self.0.disconnect(reason, message).await
    }

    /// Closes the connection at once, without a DISCONNECT frame: the peer
    /// learns `reason` from the QUIC close code only, and data not yet
    /// delivered is abandoned. For measuring connection setup without the
    /// goodbye; otherwise prefer [`Peer::disconnect`].
    pub fn close(&self, reason: DisconnectReason, message: &str) {
        self.0
            .connection()
            .close(macula_runtime::peer::close_code(reason), message.as_bytes());
    }
}
