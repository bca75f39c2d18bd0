//! Macula: a zero-config application mesh.
//!
//! This crate is the public face of the mesh for applications. A node is one
//! call away:
//!
//! ```no_run
//! # async fn demo() -> Result<(), macula::Error> {
//! let node = macula::Node::builder()
//!     .realm("io.example.shop")
//!     .bootstrap(["127.0.0.1:4433"])
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .start()
//!     .await?;
//! println!("I am {}", node.id());
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Everything has a default: realm `default`, QUIC on `0.0.0.0:4433`, an
//! in-memory identity unless `data_dir` is set (the `macula` daemon always
//! persists one). This crate only assembles and re-exports; protocol logic
//! lives in `macula-wire` and the runtime in `macula-runtime`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use macula_rpc::Strategy;
pub use macula_runtime::dht::{DhtError, DhtHandle, DhtRecord, DhtStatus};
pub use macula_runtime::metrics::Metrics;
pub use macula_runtime::pubsub::{
    Event, PubSubError, PublishOptions, Subscription, SubscriptionItem, TopicName,
};
pub use macula_runtime::rpc::{
    AdvertiseOptions, CallBuilder, CallOptions, Handler, HandlerError, HandlerResult, ProviderInfo,
    Registration, Request, Response, RpcError, RpcLimits,
};
pub use macula_runtime::tls::{TlsMode, TlsOptions};
pub use macula_runtime::{Client, ClientConfig, ClientError};
pub use macula_runtime::{
    ConnectError, Direction, IdentitySource, Limits, NodeConfig, Peer, PeerAddr, PeerEvent,
    StartError,
};
pub use macula_wire::{dht_key, NodeId};

use macula_runtime::NodeRuntime;

/// Errors from the public API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder value is invalid; names the setting and the value.
    #[error("invalid value {value:?} for {key}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// The node could not start (identity, TLS, socket).
    #[error(transparent)]
    Start(#[from] StartError),
    /// A peer could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A publish or subscribe was refused (invalid topic, limits).
    #[error(transparent)]
    PubSub(#[from] PubSubError),
    /// A lightweight client could not attach.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Starts a lightweight client attached to the first of `gateways`
/// (`HOST:PORT` or `NODEID@HOST:PORT`) that accepts it: it listens on
/// nothing, stores no DHT records, and fails over to the next node (with
/// its subscriptions and advertisements) when its gateway dies. For other
/// settings build a [`ClientConfig`] and call [`Client::connect`].
pub async fn connect_client<I, S>(gateways: I) -> Result<Client, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut addrs = Vec::new();
    for g in gateways {
        let g = g.as_ref();
        let addr = g
            .parse::<macula_runtime::PeerAddr>()
            .map_err(|e| Error::Config {
                key: "gateway",
                value: g.to_string(),
                reason: e.to_string(),
            })?;
        addrs.push(addr);
    }
    Ok(Client::connect(ClientConfig::new(addrs)).await?)
}

/// A snapshot of one connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: NodeId,
    pub addr: SocketAddr,
    pub direction: Direction,
    pub rtt: std::time::Duration,
    pub listen_addrs: Vec<String>,
}

/// Builds and starts a [`Node`].
#[derive(Debug, Clone)]
#[must_use]
pub struct NodeBuilder {
    config: NodeConfig,
    bootstrap_errors: Vec<(String, String)>,
}

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

    /// Every limit and timer at once.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// Replaces the whole configuration (what the daemon does).
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Starts the node: identity, socket, accept loop, bootstrap.
    pub async fn start(self) -> Result<Node, Error> {
        if let Some((value, reason)) = self.bootstrap_errors.into_iter().next() {
            return Err(Error::Config {
                key: "bootstrap",
                value,
                reason,
            });
        }
        let runtime = NodeRuntime::start(self.config).await?;
        Ok(Node { runtime })
    }
}

/// A running mesh node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    runtime: NodeRuntime,
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
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            config: NodeConfig::default(),
            bootstrap_errors: Vec::new(),
        }
    }

    /// This node's ID (the BLAKE3 hash of its public key).
    pub fn id(&self) -> NodeId {
        self.runtime.node_id()
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.runtime.local_addr()
    }

    pub fn realm(&self) -> &str {
        self.runtime.realm()
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

    /// Connects (or reuses the pooled connection) to a peer given as
    /// `HOST:PORT` or `NODEID@HOST:PORT`.
    pub async fn connect(&self, peer: &str) -> Result<Peer, Error> {
        let addr: PeerAddr = peer.parse().map_err(
            |e: macula_runtime::peer_addr::PeerAddrError| Error::Config {
                key: "peer",
                value: peer.to_string(),
                reason: e.to_string(),
            },
        )?;
        Ok(self.runtime.connect_addr(&addr).await?)
    }

    /// The node's DHT: `put(key, value, ttl)`, `get(key)`, `closest(key, n)`.
    /// Keys are 256-bit; derive them from names with [`dht_key`].
    pub fn dht(&self) -> &DhtHandle {
        self.runtime.dht()
    }

    /// Publishes `payload` on `topic` (dot-separated, no wildcards) and
    /// returns its sequence number. Subscribers on this node receive it
    /// without a network hop; every other node with a matching subscription
    /// gets one copy. A subscription made elsewhere is found within
    /// `INTEREST_CACHE_TTL` (1 s) of its `subscribe` returning.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<bytes::Bytes>,
    ) -> Result<u64, Error> {
        self.publish_with(topic, payload, PublishOptions::default())
            .await
    }

    /// `publish` with headers and an application message ID.
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<bytes::Bytes>,
        options: PublishOptions,
    ) -> Result<u64, Error> {
        Ok(self
            .runtime
            .pubsub()
            .publish_mesh(topic, payload.into(), options)
            .await?)
    }

    /// Subscribes to `pattern` (`*` matches one segment, `**` any number):
    /// a `Stream` of [`SubscriptionItem`]s, bounded (a slow reader loses the
    /// oldest events and gets `Lagged(n)`). The interest is registered in the
    /// mesh (DHT) before this returns. Dropping it unsubscribes.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, Error> {
        Ok(self.runtime.pubsub().subscribe_mesh(pattern).await?)
    }

    /// Serves `procedure` with `handler` (an async function from
    /// [`Request`] to `Result<Bytes, HandlerError>`) and advertises it in
    /// the mesh before returning. Dropping the [`Registration`] stops
    /// serving and withdraws the advertisement.
    pub async fn advertise<H: Handler>(
        &self,
        procedure: &str,
        handler: H,
    ) -> Result<Registration, RpcError> {
        self.advertise_with(procedure, AdvertiseOptions::default(), handler)
            .await
    }

    /// `advertise` with a weight, metadata and a concurrency limit.
    pub async fn advertise_with<H: Handler>(
        &self,
        procedure: &str,
        options: AdvertiseOptions,
        handler: H,
    ) -> Result<Registration, RpcError> {
        self.runtime
            .rpc()
            .advertise(procedure, options, handler)
            .await
    }

    /// Calls `procedure` on a provider found in the mesh (this node's own
    /// handler, if it has one, without a network hop). Configure with
    /// `.timeout(d)` (default 5 s, retries included), `.retries(n)`
    /// (default 2, only on errors where the handler did not run) and
    /// `.strategy(s)`, then `.await`. Dropping the future cancels the call
    /// on the provider.
    pub fn call(&self, procedure: &str, payload: impl Into<bytes::Bytes>) -> CallBuilder {
        self.runtime.rpc().call(procedure, payload)
    }

    /// Calls `procedure` on one chosen provider (no failover).
    pub fn call_to(
        &self,
        provider: NodeId,
        procedure: &str,
        payload: impl Into<bytes::Bytes>,
    ) -> CallBuilder {
        self.runtime.rpc().call_to(provider, procedure, payload)
    }

    /// Every procedure advertised in the mesh, with its providers.
    pub async fn services(&self) -> Result<Vec<(String, Vec<ProviderInfo>)>, RpcError> {
        self.runtime.rpc().services().await
    }

    /// Peer connect/disconnect notifications.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<PeerEvent> {
        self.runtime.subscribe_events()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        self.runtime.metrics()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.runtime.uptime()
    }

    /// The runtime underneath, for tools and benchmarks.
    pub fn runtime(&self) -> &NodeRuntime {
        &self.runtime
    }

    /// Says goodbye to every peer and closes the socket.
    pub async fn shutdown(&self) {
        self.runtime.shutdown().await
    }
}
