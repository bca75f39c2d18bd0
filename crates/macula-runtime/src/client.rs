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
//! **Two gateways.** Given two or more nodes (and
//! `ClientConfig::redundant_subscriptions`, the default), a client with
//! subscriptions keeps a second connection to another of them carrying them
//! (never its publishes, calls or advertisements: one publisher sequence,
//! one provider). Every event then arrives twice, and the sequence check
//! delivers it once; when either gateway dies, the other has carried
//! everything all along, so nothing is lost, and a new second gateway is
//! attached from the list in the background.
//!
//! **Failover.** When the primary gateway's connection closes (or stays
//! silent despite keep-alives for `GATEWAY_DEAD_AFTER`), the second one (if
//! any) becomes the primary, or else the client attaches to the next
//! configured node; it replays every subscription pattern and advertisement
//! it holds, and only then resumes publishing and calling. Calls in flight
//! on the lost gateway fail as unreachable and are retried through the next
//! one (within their deadline and retry budget). A publisher's events
//! count as carried by the remaining gateway once its stream through it
//! overlapped what was delivered (a newly attached gateway may run ahead of
//! the old one: `SeqTracker::admit_source`). For each publisher not carried
//! so, and for every publisher when the remaining gateway had not carried
//! the subscriptions long enough (`covered`), the gap is told: the
//! publisher's next event reaches every subscription after `Lagged(n)`, `n`
//! the sequence numbers skipped (`PubSubCore::gateway_lost`: exact when
//! the client subscribes to every topic the publisher uses, an upper bound
//! otherwise).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
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

use crate::backoff::reconnects;
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
/// timeout; keep-alives go every second, and the first one after the last
/// packet restarts the timer: a killed gateway is given up 5 s after its
/// death). With one gateway, attaching and replaying on the next node and
/// the publishers' interest bound come on top: events resumed 5.2-5.5 s
/// after a kill -9 of the gateway on loopback (BENCHMARKS.md, "Gateway
/// failover"); with two, the stream does not stop.
pub const GATEWAY_DEAD_AFTER: Duration = Duration::from_secs(4);

/// A remaining gateway counts as carrying everything the lost one did when
/// it acknowledged the subscriptions at least this long (publishers' 1 s
/// interest bound, plus margin for events in flight) before the lost one's
/// last packet (see `Client::covered`).
pub const COVER_MARGIN: Duration = Duration::from_secs(2);

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
    /// With two or more `gateways`: keep a second gateway carrying the same
    /// subscriptions (from the first one), so a gateway's death loses no
    /// event (default `true`).
    /// `false`: one gateway at a time; after a failover the gap is told as
    /// `Lagged`.
    pub redundant_subscriptions: bool,
    /// This client's grant (`macula_auth::Grant` bytes, for its node ID),
    /// sent in HELLO: a gateway whose realm has an authority admits only
    /// clients with a valid one.
    pub grant: Option<Vec<u8>>,
    /// This client's API key (`apikey.rs`), sent in HELLO when it has no
    /// grant: a gateway keeping API keys admits it with the grant the key
    /// is bound to.
    pub api_key: Option<crate::apikey::ApiKey>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("gateways", &self.gateways)
            .field("realm", &self.realm)
            .field("bind", &self.bind)
            .field("redundant_subscriptions", &self.redundant_subscriptions)
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
            redundant_subscriptions: true,
            grant: None,
            api_key: None,
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
    /// The client's grant (`ClientConfig::grant`) does not decode.
    #[error("the client's grant does not decode: {0}")]
    Grant(String),
}

struct Shared {
    node_id: NodeId,
    /// The data directory's lock (see `datadir.rs`), released at shutdown.
    dir_lock: Mutex<Option<crate::datadir::DirLock>>,
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    own_endpoint: bool,
    quic: quinn::ClientConfig,
    local: LocalInfo,
    metrics: Arc<Metrics>,
    pubsub: PubSub,
    rpc: Rpc,
    /// The primary gateway: publishes, calls, advertisements, subscriptions.
    gateway: watch::Sender<Option<Attached>>,
    /// The second gateway: the same subscriptions, nothing else.
    second: watch::Sender<Option<Attached>>,
    /// Which configured node each connection uses or is dialing.
    claims: Mutex<Claims>,
    /// The realm's end-to-end keys, from the gateway.
    e2e: Arc<crate::e2e::E2e>,
    /// Notified when a pattern is subscribed: a client without
    /// subscriptions keeps no second gateway.
    subscribed: tokio::sync::Notify,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>,
    next_request: AtomicU64,
    /// Advertisements to replay on reconnect: procedure → (weight, metadata).
    ads: Mutex<BTreeMap<String, AdSpec>>,
    shutdown: watch::Sender<bool>,
    /// Stops the connection drivers: set after graceful shutdown has
    /// flushed and said goodbye (set first, it would cut the flush off).
    stop_drivers: watch::Sender<bool>,
    failovers: AtomicU64,
    /// Second gateways attached (their subscriptions acknowledged).
    seconds_attached: AtomicU64,
    /// Gateways lost with no other one covering them: the gap was watched.
    gap_watches: AtomicU64,
    /// Errors of the last attach attempts, for `connect`'s error.
    last_error: Mutex<String>,
    /// Set when the first round of attach attempts was turned away by
    /// every node: `connect` fails at once with these reasons.
    turned_away: watch::Sender<Option<String>>,
}

/// A gateway connection the client uses.
#[derive(Clone)]
struct Attached {
    peer: Peer,
    /// Its index in `ClientConfig::gateways`.
    index: usize,
    /// When it had acknowledged every subscription: it carries every event
    /// published from about the interest bound later.
    complete_at: tokio::time::Instant,
}

/// The configured node (index) each of the two connections uses or is
/// dialing, so they never take the same one.
#[derive(Debug, Default)]
struct Claims {
    primary: Option<usize>,
    second: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Primary,
    Second,
}

impl Claims {
    /// Takes `i` for `slot` unless the other slot holds it.
    fn claim(&mut self, slot: Slot, i: usize) -> bool {
        let (mine, other) = match slot {
            Slot::Primary => (&mut self.primary, self.second),
            Slot::Second => (&mut self.second, self.primary),
        };
        if other == Some(i) {
            return false;
        }
        *mine = Some(i);
        true
    }

    /// Gives `i` back, if `slot` still holds it.
    fn release(&mut self, slot: Slot, i: usize) {
        let mine = match slot {
            Slot::Primary => &mut self.primary,
            Slot::Second => &mut self.second,
        };
        if *mine == Some(i) {
            *mine = None;
        }
    }
}

/// A lightweight client. Cheap to clone; `shutdown` ends it.
#[derive(Clone)]
pub struct Client(Arc<Shared>);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("node_id", &self.0.node_id)
            .field("gateway", &self.gateway())
            .field("second_gateway", &self.second_gateway())
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
        if on {
            c.0.subscribed.notify_waiters();
        }
        async move {
            // The second gateway carries the same subscriptions. One that
            // fails what the primary took is out of step: it is dropped and
            // a new one attached (and replayed) in its place.
            let second = c.second();
            let to_second = interest_msg(pattern.clone(), on);
            let (res, other) = futures::join!(
                c.request_current(on, interest_msg(pattern, on)),
                async {
                    match &second {
                        Some(g) => c.request(&g.peer, to_second).await,
                        None => Ok(()),
                    }
                }
            );
            if let (Ok(()), Err(e), Some(g)) = (&res, other, second) {
                tracing::warn!(gateway = %g.peer.node_id(), error = %e, "the second gateway did not take a subscription change; replacing it");
                g.peer
                    .disconnect(DisconnectReason::ProtocolError, "subscription not taken")
                    .await;
            }
            res
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
                let mut ads = c.0.ads.lock();
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

/// CLIENT_SUBSCRIBE (`on`) or CLIENT_UNSUBSCRIBE of `pattern`.
fn interest_msg(pattern: String, on: bool) -> impl FnOnce(u64) -> ClientMessage {
    move |id| match on {
        true => ClientMessage::Subscribe(ClientSubscribe { id, pattern }),
        false => ClientMessage::Unsubscribe(ClientUnsubscribe { id, pattern }),
    }
}

/// What a client advertises, replayed on reconnect: weight and metadata.
type AdSpec = (u32, Vec<(String, String)>);

/// A request message waiting for its ID.
type MakeMsg = Box<dyn FnOnce(u64) -> ClientMessage + Send>;

/// Takes the realm's end-to-end key set from the gateway (REALM_KEYS).
#[derive(Debug)]
struct Keys(Arc<crate::e2e::E2e>);

impl Service for Keys {
    fn name(&self) -> &'static str {
        "client-keys"
    }

    fn serves(&self) -> Serves {
        Serves {
            messages: &[macula_wire::MessageType::RealmKeys],
            ..Serves::default()
        }
    }

    fn on_message(&self, _peer: &Peer, msg: Message) -> Answer {
        if let Message::RealmKeys(k) = msg {
            match self.0.install(&k.set) {
                Ok(crate::authz::Installed::Adopted { version }) => {
                    tracing::info!(
                        version,
                        "realm end-to-end key set adopted (from the gateway)"
                    )
                }
                Ok(crate::authz::Installed::Stale { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the gateway's end-to-end key set was refused")
                }
            }
        }
        Answer::Done
    }
}

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
            if let Some(tx) = s.pending.lock().remove(&a.id) {
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
        crate::node::endpoint(bind, buffer, None, None)
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
                grant: config.grant.clone().map(serde_bytes::ByteBuf::from),
                api_key: match (&config.grant, &config.api_key) {
                    (None, Some(k)) => Some(serde_bytes::ByteBuf::from(k.as_bytes().to_vec())),
                    _ => None,
                },
                // Filled in per connection (`peer::handshake`).
                observed_addr: None,
            },
            max_frame_size: config.limits.max_frame_size,
            // A client checks no one: its gateway proves its node ID in TLS.
            authz: None,
            api_keys: None,
            keys: None,
        };
        let (gateway, _) = watch::channel(None);
        let (second, _) = watch::channel(None);
        let (shutdown, _) = watch::channel(false);
        let (stop_drivers, _) = watch::channel(false);
        let max_frame = config.limits.max_frame_size;
        let stall_timeout = config.limits.pubsub_stall_timeout;
        // The client's own view of its grant: it refuses itself what its
        // gateway would refuse (the gateway checks it for real).
        let own = match &config.grant {
            None => None,
            Some(g) => Some(Arc::new(
                crate::authz::Authz::for_client(g, Arc::default())
                    .map_err(|e| ClientError::Grant(e.to_string()))?,
            )),
        };
        let e2e = Arc::new(crate::e2e::E2e::new(
            own.as_ref().map(|a| *a.authority()),
            identity.signing_key().clone(),
            Arc::default(),
            None,
        ));
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| {
            let pubsub = PubSub::client(
                macula_pubsub::Config {
                    // A client seals its batches: its gateway forwards them
                    // into the mesh, where its signature proves it
                    // published them (PROTOCOL.md §5.3).
                    signer: config.pubsub.proofs.then(|| {
                        Arc::new(macula_pubsub::Signer::new(identity.signing_key().clone()))
                    }),
                    ..crate::pubsub::config(
                        node_id,
                        epoch.value(),
                        max_frame,
                        config.pubsub,
                        "",
                        stall_timeout,
                    )
                },
                Box::new(Link(weak.clone())),
                Box::new(GatewayMesh(weak.clone())),
                own.clone(),
            );
            let rpc = Rpc::with_upstream(
                node_id,
                max_frame,
                config.rpc,
                Arc::new(Link(weak.clone())),
                own,
            );
            // Its calls carry its signature through its gateway.
            rpc.sign_calls(identity.signing_key().clone());
            rpc.set_e2e(e2e.clone());
            pubsub.set_e2e(e2e.clone());
            Shared {
                e2e,
                node_id,
                dir_lock: Mutex::new(dir_lock),
                endpoint,
                own_endpoint,
                quic,
                local,
                metrics: Arc::new(Metrics::default()),
                pubsub,
                rpc,
                gateway,
                second,
                claims: Mutex::new(Claims::default()),
                subscribed: tokio::sync::Notify::new(),
                pending: Mutex::new(HashMap::new()),
                next_request: AtomicU64::new(1),
                ads: Mutex::new(BTreeMap::new()),
                shutdown,
                stop_drivers,
                failovers: AtomicU64::new(0),
                seconds_attached: AtomicU64::new(0),
                gap_watches: AtomicU64::new(0),
                last_error: Mutex::new(String::new()),
                turned_away: watch::channel(None).0,
                config,
            }
        });
        let client = Client(shared);
        tokio::spawn(client.clone().supervise());
        tokio::spawn(client.clone().keep_second());
        let after = client.0.config.attach_timeout;
        let mut turned_away = client.0.turned_away.subscribe();
        let failed = tokio::select! {
            g = client.wait_gateway(after) => match g {
                Some(_) => None,
                None => Some(ClientError::Attach {
                    after,
                    last: client.0.last_error.lock().clone(),
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

    /// The node this client is attached to now (its primary gateway:
    /// publishes, calls, advertisements and subscriptions).
    pub fn gateway(&self) -> Option<NodeId> {
        self.0
            .gateway
            .borrow()
            .as_ref()
            .filter(|g| !g.peer.is_closed())
            .map(|g| g.peer.node_id())
    }

    /// The second gateway carrying the same subscriptions now, if any (see
    /// `ClientConfig::redundant_subscriptions`).
    pub fn second_gateway(&self) -> Option<NodeId> {
        self.second().map(|g| g.peer.node_id())
    }

    fn second(&self) -> Option<Attached> {
        self.0
            .second
            .borrow()
            .as_ref()
            .filter(|g| !g.peer.is_closed())
            .cloned()
    }

    /// Times the client lost its gateway and attached again.
    pub fn failovers(&self) -> u64 {
        self.0.failovers.load(Relaxed)
    }

    /// Second gateways attached so far (the first one included).
    pub fn second_gateways_attached(&self) -> u64 {
        self.0.seconds_attached.load(Relaxed)
    }

    /// Gateways lost while no other one had carried the subscriptions long
    /// enough: after each, the gap was told as `Lagged` (see the module
    /// docs).
    pub fn uncovered_failovers(&self) -> u64 {
        self.0.gap_watches.load(Relaxed)
    }

    /// Sequence numbers told as possibly missed after uncovered failovers
    /// (the sum of those `Lagged` counts, per publisher, before they were
    /// told to each subscription).
    pub fn missed_after_failover(&self) -> u64 {
        self.0.pubsub.failover_stats().n_watch_missing
    }

    /// The realm's end-to-end keys as this client holds them.
    pub fn e2e(&self) -> &Arc<crate::e2e::E2e> {
        &self.0.e2e
    }

    pub fn pubsub(&self) -> &PubSub {
        &self.0.pubsub
    }

    pub fn rpc(&self) -> &Rpc {
        &self.0.rpc
    }

    /// Durable stream `name`, hosted by a node of the mesh, reached over
    /// RPC through the gateway (`_stream.<name>`; each operation but a pull
    /// bounded by `timeout`).
    pub fn stream(&self, name: &str, timeout: std::time::Duration) -> crate::stream::StreamHandle {
        crate::stream::StreamHandle::Remote(
            crate::stream::remote::RemoteStream::new(self.rpc().clone(), name, timeout)
                .via_gateway(),
        )
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
        let second = self.0.second.send_replace(None);
        let gw = self.0.gateway.send_replace(None);
        for g in [gw, second].into_iter().flatten() {
            g.peer
                .disconnect(DisconnectReason::Shutdown, "client shutting down")
                .await;
        }
        self.0.stop_drivers.send_replace(true);
        if self.0.own_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.0.endpoint.wait_idle()).await;
        }
        let held = self.0.dir_lock.lock().take();
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
                if let Some(g) = rx
                    .borrow_and_update()
                    .as_ref()
                    .filter(|g| !g.peer.is_closed())
                {
                    return Some(g.peer.clone());
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
            false => self.0.gateway.borrow().as_ref().map(|g| g.peer.clone()),
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
        self.0.pending.lock().insert(id, tx);
        let res = async {
            gateway.send(&Message::Client(make(id))).await?;
            tokio::select! {
                a = rx => a.unwrap_or_else(|_| Err("request abandoned".into())),
                _ = tokio::time::sleep(REQUEST_TIMEOUT) => Err(format!("gateway did not answer within {REQUEST_TIMEOUT:?}")),
                e = gateway.connection().closed() => Err(format!("gateway connection closed: {}", peer::describe_close(&e))),
            }
        }
        .await;
        self.0.pending.lock().remove(&id);
        res
    }

    /// Keeps the client attached: to the configured nodes in turn, with
    /// backoff when none answers, replaying its state on every new gateway.
    /// When the primary is lost, the second gateway (if any) takes its place.
    async fn supervise(self) {
        let l = &self.0.config.limits;
        let mut backoff = reconnects(l.reconnect_backoff_min, l.reconnect_backoff_max);
        let mut shutdown = self.0.shutdown.subscribe();
        let mut second_rx = self.0.second.subscribe();
        let n = self.0.config.gateways.len();
        let mut next = 0usize;
        let mut attached_before = false;
        loop {
            if self.is_shutting_down() {
                return;
            }
            // The second gateway carries the subscriptions already: it only
            // needs the advertisements (and a replay costs it nothing more).
            let promoted = self.0.second.send_replace(None).filter(|g| {
                let alive = !g.peer.is_closed();
                let mut c = self.0.claims.lock();
                c.release(Slot::Second, g.index);
                alive && c.claim(Slot::Primary, g.index)
            });
            let mut attached = promoted.map(|g| (g.index, g.peer, Some(g.complete_at)));
            let mut refusals = Vec::new();
            if attached.is_none() {
                for k in 0..n {
                    let i = (next + k) % n;
                    if !self.0.claims.lock().claim(Slot::Primary, i) {
                        // The second gateway is being dialed there.
                        continue;
                    }
                    let target = self.0.config.gateways[i].clone();
                    match self.attach(&target).await {
                        Ok(p) => {
                            attached = Some((i, p, None));
                            break;
                        }
                        Err(e) => {
                            self.0.claims.lock().release(Slot::Primary, i);
                            tracing::debug!(gateway = %target, error = %e, "could not attach");
                            *self.0.last_error.lock() = format!("{target}: {e}");
                            if let AttachFail::TurnedAway(why) = e {
                                refusals.push(format!("{target}: {why}"));
                            }
                        }
                    }
                    if self.is_shutting_down() {
                        return;
                    }
                }
            }
            if attached.is_none() && !attached_before && refusals.len() == n {
                // Nobody will have us: `connect` says so now rather than
                // after its timeout (this loop keeps trying meanwhile).
                self.0.turned_away.send_replace(Some(refusals.join("; ")));
            }
            let Some((i, peer, complete_at)) = attached else {
                let delay = backoff.next_delay().to_duration();
                second_rx.borrow_and_update();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    // A second gateway came up: it can be promoted.
                    _ = second_rx.changed() => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            };
            backoff.reset();
            if let Err(e) = self.replay(&peer, true).await {
                tracing::warn!(gateway = %peer.node_id(), error = %e, "could not replay subscriptions and advertisements; trying the next node");
                peer.disconnect(DisconnectReason::ProtocolError, "replay failed")
                    .await;
                self.0.claims.lock().release(Slot::Primary, i);
                next = i + 1;
                continue;
            }
            if attached_before {
                self.0.failovers.fetch_add(1, Relaxed);
            }
            attached_before = true;
            let promoted = complete_at.is_some();
            tracing::info!(gateway = %peer.node_id(), addr = %peer.remote_addr(), promoted, "client attached");
            let complete_at = complete_at.unwrap_or_else(tokio::time::Instant::now);
            self.0.gateway.send_replace(Some(Attached {
                peer: peer.clone(),
                index: i,
                complete_at,
            }));
            let silent = tokio::select! {
                e = peer.connection().closed() => matches!(e, quinn::ConnectionError::TimedOut),
                _ = shutdown.changed() => return,
            };
            self.0.gateway.send_replace(None);
            self.0.claims.lock().release(Slot::Primary, i);
            if self.is_shutting_down() {
                return;
            }
            let second = self.second();
            tracing::warn!(gateway = %peer.node_id(), second = ?second.as_ref().map(|g| g.peer.node_id()), "lost the gateway; moving to the next");
            self.lost(&peer, silent, second.as_ref());
            // The lost node is likely dead: start with the next one.
            next = i + 1;
        }
    }

    /// `gone` (a gateway carrying the subscriptions) was lost, `silent`:
    /// after the transport idle timeout without a packet (else it closed
    /// the connection just now); `rest` is the other one, if any. The gap
    /// of each publisher `rest` had not joined is told; of every publisher
    /// unless `rest` carried the subscriptions long enough to have every
    /// event `gone` did (`PubSubCore::gateway_lost`).
    fn lost(&self, gone: &Peer, silent: bool, rest: Option<&Attached>) {
        let now = tokio::time::Instant::now();
        let silence = match silent {
            true => self.0.config.limits.transport_idle_timeout,
            false => Duration::ZERO,
        };
        let uncovered = !rest.is_some_and(|g| covered(g.complete_at, now, silence));
        self.0.pubsub.gateway_lost(gone.node_id(), uncovered);
        if uncovered {
            self.0.gap_watches.fetch_add(1, Relaxed);
            tracing::info!(gateway = %gone.node_id(), "no other gateway carried every event: the gap is told to subscriptions as Lagged");
        }
    }

    /// Keeps a second gateway carrying the subscriptions (with two or more
    /// configured nodes and `redundant_subscriptions`, once the client has
    /// subscribed): another node than the primary's, attached in the
    /// background, replacing one that is lost or promoted.
    async fn keep_second(self) {
        let cfg = &self.0.config;
        let n = cfg.gateways.len();
        if !cfg.redundant_subscriptions || n < 2 {
            return;
        }
        let mut backoff = reconnects(
            cfg.limits.reconnect_backoff_min,
            cfg.limits.reconnect_backoff_max,
        );
        let mut shutdown = self.0.shutdown.subscribe();
        let mut next = 1usize;
        loop {
            if self.is_shutting_down() {
                return;
            }
            // Only for a client with subscriptions (one that only publishes
            // or calls would double its connections for nothing).
            let subscribed = self.0.subscribed.notified();
            tokio::pin!(subscribed);
            subscribed.as_mut().enable();
            if self.patterns().is_empty() {
                tokio::select! {
                    _ = subscribed => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            // Only beside a primary (first attach, then after each failover).
            let Some(primary) = self.wait_gateway(crate::rpc::GATEWAY_WAIT).await else {
                continue;
            };
            let mut got = None;
            for k in 0..n {
                let i = (next + k) % n;
                let target = &cfg.gateways[i];
                if target.expected == Some(primary.node_id())
                    || !self.0.claims.lock().claim(Slot::Second, i)
                {
                    continue;
                }
                match self.attach_second(i, &primary).await {
                    Ok(g) => {
                        got = Some(g);
                        break;
                    }
                    Err(e) => {
                        self.0.claims.lock().release(Slot::Second, i);
                        tracing::debug!(gateway = %target, error = %e, "could not attach a second gateway");
                    }
                }
                if self.is_shutting_down() {
                    return;
                }
            }
            let Some(g) = got else {
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay().to_duration()) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            };
            backoff.reset();
            let (i, peer) = (g.index, g.peer.clone());
            next = i + 1;
            self.0.seconds_attached.fetch_add(1, Relaxed);
            tracing::info!(gateway = %peer.node_id(), addr = %peer.remote_addr(), "second gateway attached");
            let mut slot = self.0.second.subscribe();
            let ours = |s: &Option<Attached>| {
                s.as_ref()
                    .is_some_and(|s| s.peer.connection_id() == peer.connection_id())
            };
            let mut silent = false;
            // Promoted to primary (possibly already, while catching up).
            let promoted = loop {
                if !ours(&slot.borrow_and_update()) {
                    break true;
                }
                tokio::select! {
                    e = peer.connection().closed() => {
                        silent = matches!(e, quinn::ConnectionError::TimedOut);
                        break false;
                    }
                    r = slot.changed() => {
                        if r.is_err() {
                            break true;
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            };
            if promoted {
                continue;
            }
            // Lost while still the second gateway.
            let was_ours = {
                let mut cur = None;
                self.0.second.send_if_modified(|s| {
                    let mine = ours(s);
                    if mine {
                        cur = s.take();
                    }
                    mine
                });
                cur.is_some()
            };
            if !was_ours {
                continue;
            }
            self.0.claims.lock().release(Slot::Second, i);
            if self.is_shutting_down() {
                return;
            }
            let primary = self.0.gateway.borrow().clone();
            tracing::warn!(gateway = %peer.node_id(), "lost the second gateway; attaching another");
            self.lost(
                &peer,
                silent,
                primary.as_ref().filter(|g| !g.peer.is_closed()),
            );
        }
    }

    /// Dials the `i`th configured node as the second gateway (beside
    /// `primary`), replays the subscriptions on it and publishes it in the
    /// `second` slot; then catches up with subscription changes made
    /// meanwhile (a change made after the slot was set reaches it directly).
    async fn attach_second(&self, i: usize, primary: &Peer) -> Result<Attached, String> {
        let target = self.0.config.gateways[i].clone();
        let peer = self.attach(&target).await.map_err(|e| e.to_string())?;
        let fail = |peer: Peer, why: String| async move {
            peer.disconnect(DisconnectReason::Shutdown, "not kept as second gateway")
                .await;
            Err(why)
        };
        if peer.node_id() == primary.node_id() {
            return fail(peer, "the same node as the primary gateway".into()).await;
        }
        let replayed = match self.replay(&peer, false).await {
            Ok(p) => p,
            Err(e) => return fail(peer, format!("replay failed: {e}")).await,
        };
        let g = Attached {
            peer: peer.clone(),
            index: i,
            complete_at: tokio::time::Instant::now(),
        };
        if self.is_shutting_down() || primary.is_closed() {
            // The primary went meanwhile: start over beside the next one.
            return fail(peer, "the primary gateway changed".into()).await;
        }
        self.0.second.send_replace(Some(g.clone()));
        let now: std::collections::BTreeSet<String> = self.patterns().into_iter().collect();
        let before: std::collections::BTreeSet<String> = replayed.into_iter().collect();
        let changes = now
            .difference(&before)
            .map(|p| (p.clone(), true))
            .chain(before.difference(&now).map(|p| (p.clone(), false)));
        let results = futures::future::join_all(
            changes.map(|(pattern, on)| self.request(&peer, interest_msg(pattern, on))),
        )
        .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            // Out of step: dropped; the loop attaches a new one.
            peer.disconnect(DisconnectReason::ProtocolError, "subscription not taken")
                .await;
            return Err(format!("catching up failed: {e}"));
        }
        Ok(Attached {
            complete_at: tokio::time::Instant::now(),
            ..g
        })
    }

    /// The subscription patterns the client holds now.
    fn patterns(&self) -> Vec<String> {
        self.0
            .pubsub
            .subscriptions()
            .into_iter()
            .map(|(p, _)| p)
            .collect()
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
        s.pubsub.gateway_up(&peer.node_id());
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
                Arc::new(Keys(s.e2e.clone())),
            ]),
        };
        let (p, shutdown) = (peer.clone(), s.stop_drivers.subscribe());
        cfg.services.peer_up(&peer);
        let keys = crate::e2e::gateway_keys(peer.hello());
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
        // The gateway holds an end-to-end key set: it sends it right after
        // the handshake. Attached once it is here, so nothing is published
        // in the clear on a topic the realm encrypts.
        if keys > s.e2e.version() && !s.e2e.wait_version(keys, timeout).await {
            tracing::warn!(gateway = %peer.node_id(), version = keys, "the gateway's end-to-end key set did not arrive in time");
            return Err(other(format!(
                "the gateway holds end-to-end key set version {keys}, which did not arrive within {timeout:?}"
            )));
        }
        Ok(peer)
    }

    /// Repeats every subscription pattern (and, with `ads`, advertisement)
    /// on a new gateway (all at once; each is acknowledged). Returns the
    /// patterns replayed.
    async fn replay(&self, gateway: &Peer, ads: bool) -> Result<Vec<String>, String> {
        let patterns = self.patterns();
        let ads: Vec<(String, AdSpec)> = match ads {
            true => self
                .0
                .ads
                .lock()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            false => Vec::new(),
        };
        let subs = patterns.iter().map(|pattern| {
            self.request(gateway, interest_msg(pattern.clone(), true))
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
        results.into_iter().collect::<Result<(), String>>()?;
        Ok(patterns)
    }
}

/// Whether a gateway that had acknowledged every subscription at
/// `complete_at` carried every event another gateway did, that other one
/// having been found dead at `now` after `silent` without a packet (zero:
/// it closed the connection): its subscriptions had reached publishers
/// (`COVER_MARGIN`) before the other one's last packet.
fn covered(complete_at: tokio::time::Instant, now: tokio::time::Instant, silent: Duration) -> bool {
    now.checked_sub(silent)
        .is_some_and(|last_heard| complete_at + COVER_MARGIN <= last_heard)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn claims_keep_the_two_connections_on_different_nodes() {
        let mut c = Claims::default();
        assert!(c.claim(Slot::Primary, 0));
        assert!(!c.claim(Slot::Second, 0), "the primary's node");
        assert!(c.claim(Slot::Second, 1));
        assert!(!c.claim(Slot::Primary, 1), "the second's node");
        // Released only by its holder, only for the node it holds.
        c.release(Slot::Primary, 1);
        assert_eq!((c.primary, c.second), (Some(0), Some(1)));
        c.release(Slot::Second, 1);
        assert!(c.claim(Slot::Primary, 1));
        assert_eq!((c.primary, c.second), (Some(1), None));
    }

    #[test]
    fn a_gateway_covers_another_only_if_complete_before_its_last_packet() {
        let silent = GATEWAY_DEAD_AFTER;
        let t0 = Instant::now();
        // Found dead at t0 + 10 s: last heard at t0 + 6 s.
        let now = t0 + Duration::from_secs(10);
        assert!(covered(t0, now, silent));
        assert!(covered(t0 + Duration::from_secs(4), now, silent));
        assert!(!covered(
            t0 + Duration::from_secs(4) + Duration::from_millis(1),
            now,
            silent
        ));
        // Attached after the other one's death: never.
        assert!(!covered(t0 + Duration::from_secs(8), now, silent));
    }

    #[test]
    fn redundant_subscriptions_are_the_default() {
        let c = ClientConfig::new(vec!["127.0.0.1:1".parse().unwrap()]);
        assert!(c.redundant_subscriptions);
        assert!(format!("{c:?}").contains("redundant_subscriptions: true"));
    }
}
