//! Lightweight client mode: a process that listens on nothing, stores no
//! DHT records and is reachable for pub/sub and RPC through one node of
//! the mesh, its gateway (see `gateway.rs` for the gateway side).
//!
//! A client dials its configured nodes in order and keeps one connection,
//! announcing the HELLO capability `client` (so peers keep it out of their
//! routing tables). Subscriptions and advertisements are requests to the
//! gateway (CLIENT_SUBSCRIBE, CLIENT_ADVERTISE), acknowledged once they took
//! effect in the mesh. Publishes go to the gateway on the client's pub/sub
//! data stream with the client's own node ID, epoch and sequence numbers;
//! the gateway forwards them. Calls go to the gateway, which finds the
//! provider. Events come back on the gateway's data stream with their
//! original publisher, and the client's sequence check (per publisher,
//! across gateways) drops duplicates.
//!
//! **Failover.** When the gateway's connection closes (or stays silent
//! despite keep-alives for `GATEWAY_DEAD_AFTER`), the client attaches to the next configured node, replays every
//! subscription pattern and advertisement it holds, and only then resumes
//! publishing and calling. Calls in flight on the lost gateway fail as
//! unreachable and are retried through the next one (within their deadline
//! and retry budget).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use macula_wire::client::{
    ClientAdvertise, ClientSubscribe, ClientUnadvertise, ClientUnsubscribe, CLIENT_CAPABILITY,
};
use macula_wire::{ClientMessage, DisconnectReason, Hello, Message, NodeId, PROTOCOL_VERSION};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::{oneshot, watch};

use crate::backoff::Backoff;
use crate::config::{IdentitySource, Limits};
use crate::driver::{self, DriverConfig, Gone};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::peer::{self, Direction, LocalInfo, Peer};
use crate::peer_addr::PeerAddr;
use crate::pubsub::{PubSub, PubSubError, PublishOptions, Subscription};
use crate::rpc::{AdvertiseOptions, CallBuilder, Handler, Registration, Rpc, RpcError, RpcLimits};
use crate::service::{Answer, PeerDown, Serves, Service, Services};
use crate::tls::{self, TlsOptions};

/// A silent gateway is given up after this long (the client's QUIC idle
/// timeout; keep-alives go every second). With attaching and replaying
/// on the next node, a client's subscriptions resume within about 5 s of
/// its gateway dying.
pub const GATEWAY_DEAD_AFTER: Duration = Duration::from_secs(4);

/// How long a client waits for the gateway to acknowledge a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client's settings.
#[derive(Clone)]
pub struct ClientConfig {
    /// Nodes to attach to, in order of preference (at least one).
    pub gateways: Vec<PeerAddr>,
    pub realm: String,
    pub identity: IdentitySource,
    pub tls: TlsOptions,
    /// Connection timers and limits (handshake timeout, keep-alive...).
    pub limits: Limits,
    pub pubsub: macula_pubsub::Limits,
    pub rpc: RpcLimits,
    /// Local UDP address to dial from (port 0: any).
    pub bind: SocketAddr,
    /// `Client::connect` fails if no gateway accepts within this long.
    pub attach_timeout: Duration,
    /// A shared QUIC endpoint to dial from (many clients in one process);
    /// `None`: the client binds its own at `bind`.
    pub endpoint: Option<quinn::Endpoint>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("gateways", &self.gateways)
            .field("realm", &self.realm)
            .field("bind", &self.bind)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A client of `gateways` with defaults for everything else. A client
    /// notices a dead gateway (killed, unplugged: no goodbye) within
    /// `GATEWAY_DEAD_AFTER`: its QUIC keep-alives go every second and the
    /// connection counts as dead after that much silence.
    pub fn new(gateways: Vec<PeerAddr>) -> ClientConfig {
        ClientConfig {
            gateways,
            realm: crate::config::DEFAULT_REALM.to_string(),
            identity: IdentitySource::Ephemeral,
            tls: TlsOptions::default(),
            limits: Limits {
                keep_alive_interval: Duration::from_secs(1),
                transport_idle_timeout: GATEWAY_DEAD_AFTER,
                ..Limits::default()
            },
            pubsub: macula_pubsub::Limits::default(),
            rpc: RpcLimits::default(),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            attach_timeout: Duration::from_secs(15),
            endpoint: None,
        }
    }
}

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("a client needs at least one node to attach to")]
    NoGateways,
    #[error("invalid realm {realm:?}: {reason}")]
    Realm { realm: String, reason: String },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("QUIC setup failed: {0}")]
    Quic(String),
    #[error(transparent)]
    Epoch(#[from] crate::clock::EpochError),
    /// Another process runs on the same data directory.
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    #[error("no node accepted the client within {after:?}: {last}")]
    Attach { after: Duration, last: String },
    /// Every configured node answered and turned the client away (at its
    /// connection limit, say); `reasons` names each node and its reason.
    #[error("every node turned the client away: {reasons}")]
    TurnedAway { reasons: String },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Shared {
    node_id: NodeId,
    /// The data directory's lock (see `datadir.rs`), released at shutdown.
    dir_lock: std::sync::Mutex<Option<crate::datadir::DirLock>>,
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    own_endpoint: bool,
    quic: quinn::ClientConfig,
    local: LocalInfo,
    metrics: Arc<Metrics>,
    pubsub: PubSub,
    rpc: Rpc,
    gateway: watch::Sender<Option<Peer>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>,
    next_request: AtomicU64,
    /// Advertisements to replay on reconnect: procedure → (weight, metadata).
    ads: Mutex<BTreeMap<String, AdSpec>>,
    shutdown: watch::Sender<bool>,
    /// Stops the connection drivers: set after graceful shutdown has
    /// flushed and said goodbye (set first, it would cut the flush off).
    stop_drivers: watch::Sender<bool>,
    failovers: AtomicU64,
    /// Errors of the last attach attempts, for `connect`'s error.
    last_error: Mutex<String>,
    /// Set when the first round of attach attempts was turned away by
    /// every node: `connect` fails at once with these reasons.
    turned_away: watch::Sender<Option<String>>,
}

/// A lightweight client. Cheap to clone; `shutdown` ends it.
#[derive(Clone)]
pub struct Client(Arc<Shared>);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("node_id", &self.0.node_id)
            .field("gateway", &self.gateway())
            .finish()
    }
}

/// The client's side of the links `PubSub` and `Rpc` use in client mode.
#[derive(Debug)]
struct Link(Weak<Shared>);

impl Link {
    fn client(&self) -> Option<Client> {
        self.0.upgrade().map(Client)
    }
}

impl crate::pubsub::Upstream for Link {
    fn gateway(&self) -> Option<NodeId> {
        self.client().and_then(|c| c.gateway())
    }

    fn interest(&self, pattern: String, on: bool) -> BoxFuture<'static, Result<(), String>> {
        let Some(c) = self.client() else {
            return futures::future::ready(Ok(())).boxed();
        };
        async move {
            let msg = |id| match on {
                true => ClientMessage::Subscribe(ClientSubscribe { id, pattern }),
                false => ClientMessage::Unsubscribe(ClientUnsubscribe { id, pattern }),
            };
            c.request_current(on, msg).await
        }
        .boxed()
    }
}

impl crate::rpc::Upstream for Link {
    fn gateway(&self, wait: Duration) -> BoxFuture<'static, Option<Peer>> {
        let Some(c) = self.client() else {
            return futures::future::ready(None).boxed();
        };
        async move { c.wait_gateway(wait).await }.boxed()
    }

    fn advertise(
        &self,
        procedure: String,
        ad: Option<(u32, Vec<(String, String)>)>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let Some(c) = self.client() else {
            return futures::future::ready(Ok(())).boxed();
        };
        async move {
            let on = ad.is_some();
            let msg: MakeMsg = {
                let mut ads = lock(&c.0.ads);
                match ad {
                    Some((weight, metadata)) => {
                        ads.insert(procedure.clone(), (weight, metadata.clone()));
                        Box::new(move |id| {
                            ClientMessage::Advertise(ClientAdvertise {
                                id,
                                procedure,
                                weight,
                                metadata,
                            })
                        })
                    }
                    None => {
                        ads.remove(&procedure);
                        Box::new(move |id| {
                            ClientMessage::Unadvertise(ClientUnadvertise { id, procedure })
                        })
                    }
                }
            };
            c.request_current(on, msg).await
        }
        .boxed()
    }
}

/// What a client advertises, replayed on reconnect: weight and metadata.
type AdSpec = (u32, Vec<(String, String)>);

/// A request message waiting for its ID.
type MakeMsg = Box<dyn FnOnce(u64) -> ClientMessage + Send>;

/// Matches the gateway's acknowledgements to requests.
#[derive(Debug)]
struct Acks(Weak<Shared>);

impl Service for Acks {
    fn name(&self) -> &'static str {
        "client-acks"
    }

    fn serves(&self) -> Serves {
        Serves {
            messages: &[macula_wire::MessageType::ClientAck],
            ..Serves::default()
        }
    }

    fn on_message(&self, _peer: &Peer, msg: Message) -> Answer {
        if let (Message::Client(ClientMessage::Ack(a)), Some(s)) = (msg, self.0.upgrade()) {
            if let Some(tx) = lock(&s.pending).remove(&a.id) {
                let _ = tx.send(a.error.map_or(Ok(()), Err));
            }
        }
        Answer::Done
    }
}

impl Client {
    /// A client-only QUIC endpoint (one UDP socket at `bind`, listening for
    /// nothing) that many clients of one process can share through
    /// `ClientConfig::endpoint`: QUIC tells their connections apart by
    /// connection ID, so they need no port each.
    pub fn endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
        Client::endpoint_with(bind, Limits::default().socket_buffer)
    }

    /// `endpoint` with `buffer` bytes of kernel socket buffer each way.
    fn endpoint_with(bind: SocketAddr, buffer: usize) -> Result<quinn::Endpoint, ClientError> {
        crate::node::endpoint(bind, buffer, None)
            .map_err(|source| ClientError::Bind { addr: bind, source })
    }

    /// Starts a client and waits until it is attached to one of its nodes.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.gateways.is_empty() {
            return Err(ClientError::NoGateways);
        }
        crate::config::validate_realm(&config.realm).map_err(|reason| ClientError::Realm {
            realm: config.realm.clone(),
            reason,
        })?;
        // One process per data directory, before anything in it is read.
        let dir_lock = match &config.identity {
            IdentitySource::DataDir(dir) => Some(crate::datadir::DirLock::acquire(dir)?),
            IdentitySource::Ephemeral => None,
        };
        let identity = match &config.identity {
            IdentitySource::DataDir(dir) => Identity::load_or_create(dir)?,
            IdentitySource::Ephemeral => Identity::generate(),
        };
        let node_id = identity.node_id();
        // Only the epoch matters to a client (it publishes; it keeps no
        // DHT records), and recording it at start is enough to order runs.
        let epoch = match &config.identity {
            IdentitySource::DataDir(dir) => crate::clock::Epoch::start(dir)?,
            IdentitySource::Ephemeral => crate::clock::Epoch::ephemeral(),
        };
        let tls = tls::build(&identity, &config.tls)?;
        let crypto = QuicClientConfig::try_from(tls.client.clone())
            .map_err(|e| ClientError::Quic(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        quic.transport_config(
            crate::node::transport_config(&config.limits)
                .map_err(|e| ClientError::Quic(e.to_string()))?,
        );
        let (endpoint, own_endpoint) = match &config.endpoint {
            Some(e) => (e.clone(), false),
            None => (
                Client::endpoint_with(config.bind, config.limits.socket_buffer)?,
                true,
            ),
        };
        let local = LocalInfo {
            hello: Hello {
                version: PROTOCOL_VERSION,
                node_id,
                realm: config.realm.clone(),
                capabilities: vec![CLIENT_CAPABILITY.to_string()],
                listen_addrs: Vec::new(),
                max_frame_size: config.limits.max_frame_size,
                agent: format!("macula-client/{}", env!("CARGO_PKG_VERSION")),
            },
            max_frame_size: config.limits.max_frame_size,
        };
        let (gateway, _) = watch::channel(None);
        let (shutdown, _) = watch::channel(false);
        let (stop_drivers, _) = watch::channel(false);
        let max_frame = config.limits.max_frame_size;
        let stall_timeout = config.limits.pubsub_stall_timeout;
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| {
            let pubsub = PubSub::client(
                crate::pubsub::config(
                    node_id,
                    epoch.value(),
                    max_frame,
                    config.pubsub,
                    "",
                    stall_timeout,
                ),
                Box::new(Link(weak.clone())),
                Box::new(GatewayMesh(weak.clone())),
            );
            let rpc =
                Rpc::with_upstream(node_id, max_frame, config.rpc, Arc::new(Link(weak.clone())));
            Shared {
                node_id,
                dir_lock: std::sync::Mutex::new(dir_lock),
                endpoint,
                own_endpoint,
                quic,
                local,
                metrics: Arc::new(Metrics::default()),
                pubsub,
                rpc,
                gateway,
                pending: Mutex::new(HashMap::new()),
                next_request: AtomicU64::new(1),
                ads: Mutex::new(BTreeMap::new()),
                shutdown,
                stop_drivers,
                failovers: AtomicU64::new(0),
                last_error: Mutex::new(String::new()),
                turned_away: watch::channel(None).0,
                config,
            }
        });
        let client = Client(shared);
        tokio::spawn(client.clone().supervise());
        let after = client.0.config.attach_timeout;
        let mut turned_away = client.0.turned_away.subscribe();
        let failed = tokio::select! {
            g = client.wait_gateway(after) => match g {
                Some(_) => None,
                None => Some(ClientError::Attach {
                    after,
                    last: lock(&client.0.last_error).clone(),
                }),
            },
            Ok(r) = turned_away.wait_for(Option::is_some) => Some(ClientError::TurnedAway {
                reasons: r.clone().unwrap_or_default(),
            }),
        };
        if let Some(e) = failed {
            client.shutdown().await;
            return Err(e);
        }
        Ok(client)
    }

    pub fn node_id(&self) -> NodeId {
        self.0.node_id
    }

    /// The node this client is attached to now.
    pub fn gateway(&self) -> Option<NodeId> {
        self.0
            .gateway
            .borrow()
            .as_ref()
            .filter(|p| !p.is_closed())
            .map(|p| p.node_id())
    }

    /// Times the client lost its gateway and attached again.
    pub fn failovers(&self) -> u64 {
        self.0.failovers.load(Relaxed)
    }

    pub fn pubsub(&self) -> &PubSub {
        &self.0.pubsub
    }

    pub fn rpc(&self) -> &Rpc {
        &self.0.rpc
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    /// Subscribes through the gateway; returns once the gateway has
    /// registered the interest in the mesh.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, PubSubError> {
        self.0.pubsub.subscribe_mesh(pattern).await
    }

    /// Publishes through the gateway; returns the sequence number.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, PubSubError> {
        self.publish_with(topic, payload, PublishOptions::default())
            .await
    }

    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        opts: PublishOptions,
    ) -> Result<u64, PubSubError> {
        self.0
            .pubsub
            .publish_mesh(topic, payload.into(), opts)
            .await
    }

    /// A call through the gateway; configure it, then `.await` it.
    pub fn call(&self, procedure: &str, payload: impl Into<Bytes>) -> CallBuilder {
        self.0.rpc.call(procedure, payload)
    }

    /// Serves `procedure`: the gateway advertises it and forwards its calls
    /// here. Dropping the registration withdraws it.
    pub async fn advertise<H: Handler>(
        &self,
        procedure: &str,
        opts: AdvertiseOptions,
        handler: H,
    ) -> Result<Registration, RpcError> {
        self.0.rpc.advertise(procedure, opts, handler).await
    }

    /// Graceful shutdown: withdraws advertisements, delivers what was
    /// published (bounded), says goodbye to the gateway.
    pub async fn shutdown(&self) {
        if self.0.shutdown.send_replace(true) {
            return;
        }
        let limit = Duration::from_secs(2);
        self.0.rpc.begin_shutdown(limit).await;
        if let Err(e) = self.0.pubsub.flush_acked(Duration::from_secs(2)).await {
            tracing::debug!(error = %e, "client shutdown: pub/sub not flushed");
        }
        self.0.rpc.drain(limit).await;
        let gw = self.0.gateway.send_replace(None);
        if let Some(p) = gw {
            p.disconnect(DisconnectReason::Shutdown, "client shutting down")
                .await;
        }
        self.0.stop_drivers.send_replace(true);
        if self.0.own_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.0.endpoint.wait_idle()).await;
        }
        let held = self
            .0
            .dir_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(l) = held {
            l.release();
        }
    }

    fn is_shutting_down(&self) -> bool {
        *self.0.shutdown.borrow()
    }

    /// The gateway connection, waiting up to `wait` for one.
    async fn wait_gateway(&self, wait: Duration) -> Option<Peer> {
        let mut rx = self.0.gateway.subscribe();
        let found = tokio::time::timeout(wait, async {
            loop {
                if let Some(p) = rx.borrow_and_update().as_ref().filter(|p| !p.is_closed()) {
                    return Some(p.clone());
                }
                if self.is_shutting_down() || rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        found.ok().flatten()
    }

    /// Sends a request to the current gateway and waits for its ACK. With
    /// no gateway: a new subscription or advertisement waits for one (it is
    /// replayed there anyway); a withdrawal succeeds at once (the next
    /// gateway never learns of it).
    async fn request_current(
        &self,
        wait: bool,
        make: impl FnOnce(u64) -> ClientMessage,
    ) -> Result<(), String> {
        let gw = match wait {
            true => self.wait_gateway(crate::rpc::GATEWAY_WAIT).await,
            false => self.0.gateway.borrow().clone(),
        };
        match gw {
            Some(p) => self.request(&p, make).await,
            None if wait => Err("not attached to a gateway".into()),
            None => Ok(()),
        }
    }

    /// Sends one request to `gateway` and waits for its acknowledgement.
    async fn request(
        &self,
        gateway: &Peer,
        make: impl FnOnce(u64) -> ClientMessage,
    ) -> Result<(), String> {
        let id = self.0.next_request.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.0.pending).insert(id, tx);
        let res = async {
            gateway.send(&Message::Client(make(id))).await?;
            tokio::select! {
                a = rx => a.unwrap_or_else(|_| Err("request abandoned".into())),
                _ = tokio::time::sleep(REQUEST_TIMEOUT) => Err(format!("gateway did not answer within {REQUEST_TIMEOUT:?}")),
                e = gateway.connection().closed() => Err(format!("gateway connection closed: {}", peer::describe_close(&e))),
            }
        }
        .await;
        lock(&self.0.pending).remove(&id);
        res
    }

    /// Keeps the client attached: to the configured nodes in turn, with
    /// backoff when none answers, replaying its state on every new gateway.
    async fn supervise(self) {
        let l = &self.0.config.limits;
        let mut backoff = Backoff::new(l.reconnect_backoff_min, l.reconnect_backoff_max);
        let mut shutdown = self.0.shutdown.subscribe();
        let n = self.0.config.gateways.len();
        let mut next = 0usize;
        let mut attached_before = false;
        loop {
            if self.is_shutting_down() {
                return;
            }
            let mut attached = None;
            let mut refusals = Vec::new();
            for k in 0..n {
                let i = (next + k) % n;
                let target = self.0.config.gateways[i].clone();
                match self.attach(&target).await {
                    Ok(p) => {
                        attached = Some((i, p));
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(gateway = %target, error = %e, "could not attach");
                        *lock(&self.0.last_error) = format!("{target}: {e}");
                        if let AttachFail::TurnedAway(why) = e {
                            refusals.push(format!("{target}: {why}"));
                        }
                    }
                }
                if self.is_shutting_down() {
                    return;
                }
            }
            if attached.is_none() && !attached_before && refusals.len() == n {
                // Nobody will have us: `connect` says so now rather than
                // after its timeout (this loop keeps trying meanwhile).
                self.0.turned_away.send_replace(Some(refusals.join("; ")));
            }
            let Some((i, peer)) = attached else {
                let delay = backoff.next_delay(0.5);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            };
            backoff.reset();
            if let Err(e) = self.replay(&peer).await {
                tracing::warn!(gateway = %peer.node_id(), error = %e, "could not replay subscriptions and advertisements; trying the next node");
                peer.disconnect(DisconnectReason::ProtocolError, "replay failed")
                    .await;
                next = i + 1;
                continue;
            }
            if attached_before {
                self.0.failovers.fetch_add(1, Relaxed);
            }
            attached_before = true;
            tracing::info!(gateway = %peer.node_id(), addr = %peer.remote_addr(), "client attached");
            self.0.gateway.send_replace(Some(peer.clone()));
            tokio::select! {
                _ = peer.connection().closed() => {}
                _ = shutdown.changed() => return,
            }
            self.0.gateway.send_replace(None);
            if self.is_shutting_down() {
                return;
            }
            tracing::warn!(gateway = %peer.node_id(), "lost the gateway; attaching to the next node");
            // The lost node is likely dead: start with the next one.
            next = i + 1;
        }
    }

    /// Dials `target`, proves identities, exchanges HELLO, starts driving
    /// the connection.
    async fn attach(&self, target: &PeerAddr) -> Result<Peer, AttachFail> {
        let s = &self.0;
        let timeout = s.config.limits.handshake_timeout;
        let other = |e: String| AttachFail::Other(e);
        let work = async {
            let addr = crate::node::resolve(target)
                .await
                .map_err(|e| other(e.to_string()))?;
            let sni = tls::server_name(target.expected);
            let conn = s
                .endpoint
                .connect_with(s.quic.clone(), addr, &sni)
                .map_err(|e| other(e.to_string()))?
                .await
                .map_err(|e| other(e.to_string()))?;
            let proved = crate::node::proved_id(&conn).map_err(other)?;
            peer::handshake(
                conn,
                proved,
                Direction::Outbound,
                &s.local,
                s.metrics.clone(),
                None,
            )
            .await
            .map_err(|e| match e {
                peer::HandshakeError::TurnedAway { .. } | peer::HandshakeError::Rejected { .. } => {
                    AttachFail::TurnedAway(e.to_string())
                }
                e => other(e.to_string()),
            })
        };
        let (peer, reader) = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| other(format!("no handshake within {timeout:?}")))??;
        peer.set_kept(true);
        let cfg = DriverConfig {
            idle_timeout: s.config.limits.idle_timeout,
            // QUIC keep-alives (every `keep_alive_interval`) watch the
            // gateway; pings would cost every gateway a pong per client.
            health_ping_interval: None,
            liveness: None,
            ping_timeout: s.config.limits.ping_timeout,
            max_frame_size: s.config.limits.max_frame_size,
            // A client's services: what its gateway sends it.
            services: Services::new(vec![
                Arc::new(s.pubsub.clone()),
                Arc::new(s.rpc.clone()),
                Arc::new(Acks(Arc::downgrade(&self.0))),
            ]),
        };
        let (p, shutdown) = (peer.clone(), s.stop_drivers.subscribe());
        cfg.services.peer_up(&peer);
        tokio::spawn(async move {
            let services = cfg.services.clone();
            let ended = driver::drive(p.clone(), reader, cfg, shutdown).await;
            tracing::debug!(gateway = %p.node_id(), reason = %ended.why, "gateway connection ended");
            let why = match ended.gone {
                Gone::Left => PeerDown::Left,
                Gone::Silent => PeerDown::Silent,
                Gone::No => PeerDown::Closed,
            };
            services.peer_down(&p, why);
        });
        Ok(peer)
    }

    /// Repeats every subscription pattern and advertisement on a new
    /// gateway (all at once; each is acknowledged).
    async fn replay(&self, gateway: &Peer) -> Result<(), String> {
        let patterns: Vec<String> = self
            .0
            .pubsub
            .subscriptions()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let ads: Vec<(String, AdSpec)> = lock(&self.0.ads)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let subs = patterns.into_iter().map(|pattern| {
            self.request(gateway, move |id| {
                ClientMessage::Subscribe(ClientSubscribe { id, pattern })
            })
            .boxed()
        });
        let advs = ads.into_iter().map(|(procedure, (weight, metadata))| {
            self.request(gateway, move |id| {
                ClientMessage::Advertise(ClientAdvertise {
                    id,
                    procedure,
                    weight,
                    metadata,
                })
            })
            .boxed()
        });
        let results = futures::future::join_all(subs.chain(advs)).await;
        results.into_iter().collect()
    }
}

/// Why one attach attempt failed.
#[derive(Debug)]
enum AttachFail {
    /// The node answered and said no (connection limit, realm...).
    TurnedAway(String),
    /// Anything else: unreachable, TLS, timeout.
    Other(String),
}

impl std::fmt::Display for AttachFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachFail::TurnedAway(e) | AttachFail::Other(e) => f.write_str(e),
        }
    }
}

/// Reaches the gateway for the client's pub/sub sender.
struct GatewayMesh(Weak<Shared>);

impl crate::pubsub::Mesh for GatewayMesh {
    fn reach(&self, id: NodeId) -> BoxFuture<'static, Option<Peer>> {
        let Some(s) = self.0.upgrade() else {
            return futures::future::ready(None).boxed();
        };
        let c = Client(s);
        async move {
            c.wait_gateway(crate::rpc::GATEWAY_WAIT)
                .await
                .filter(|p| p.node_id() == id)
        }
        .boxed()
    }
}
