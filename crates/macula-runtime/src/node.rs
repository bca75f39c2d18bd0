//! The node runtime: one QUIC endpoint (one UDP socket for both directions),
//! the connection pool, the accept loop and bootstrap supervisors.
//!
//! This is the thin async driver around the pure parts (`pool::PoolTable`,
//! `macula_wire::backoff`, the wire codec): it owns sockets, tasks and timers and
//! makes no protocol decision those modules can make instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use macula_wire::{DisconnectReason, Hello, NodeId, PROTOCOL_VERSION};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::{broadcast, watch, Semaphore};

use crate::backoff::reconnects;
use crate::clock::{Clock, Epoch, EPOCH_SAVE_INTERVAL};
use crate::config::{ConfigError, IdentitySource, NodeConfig, ReachabilityMode};
use crate::dht::DhtHandle;
use crate::driver::{self, DriverConfig, Ended, Gone};
use crate::framed::FrameReader;
use crate::identity::{Identity, IdentityError};
use crate::metrics::{HandshakeFailure, Metrics};
use crate::peer::{self, close_code, Direction, HandshakeError, LocalInfo, Peer};
use crate::peer_addr::PeerAddr;
use crate::service::{PeerDown, Services};
use crate::tls::{self, TlsError};
use crate::tunnel::{is_tunnel_addr, RelayError, SessionInfo, Tunnel};
use macula_pool::{Admit, PoolTable, Pooled, Refusal};
use macula_wire::relay::{relay_record_name, RelayEntry, RelayRecord};
use macula_wire::suspect::SuspectList;

/// Handshakes (TLS + HELLO) in progress at once on the accept side; beyond
/// this, new connection attempts are refused so a flood cannot pile up tasks.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Capacity of the peer event channel; a subscriber that falls this far
/// behind gets `Lagged` (and must not assume it saw every event).
pub const PEER_EVENT_CAPACITY: usize = 1024;
/// How long a node whose connection went silent is listed as suspected
/// (`macula_peers_suspected`) unless it connects again.
pub const SUSPECT_TTL: macula_wire::time::Millis = macula_wire::time::Millis(60_000);
/// Nodes listed as suspected at once (the oldest suspicion goes first).
pub const MAX_SUSPECTS: usize = 4_096;
/// Time allowed for a graceful shutdown to say goodbye to peers.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// After closing, how long to let QUIC drain (retransmit CONNECTION_CLOSE).
/// The close itself is sent at once; a dial to a dead address can keep the
/// endpoint busy far longer, so this wait is short.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);

impl Pooled for Peer {
    fn node_id(&self) -> NodeId {
        Peer::node_id(self)
    }
    fn outbound(&self) -> bool {
        self.direction() == Direction::Outbound
    }
    fn conn_id(&self) -> usize {
        self.connection_id()
    }
    fn kept(&self) -> bool {
        self.is_kept()
    }
    fn client(&self) -> bool {
        self.is_client()
    }
    fn addr(&self) -> SocketAddr {
        self.remote_addr()
    }
    fn relayed(&self) -> bool {
        self.relayed_via().is_some()
    }
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
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
    /// The admin token file could not be read or created.
    #[error(transparent)]
    AdminAuth(#[from] crate::admin::auth::AdminAuthError),
    /// The audit log in the data directory could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit_log::AuditError),
}

/// Why a connection to a peer could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("cannot resolve {target}: {detail}")]
    Resolve { target: String, detail: String },
    #[error("identity error: the node at {addr} is not {expected}: {detail}")]
    IdentityMismatch {
        addr: SocketAddr,
        expected: NodeId,
        detail: String,
    },
    #[error("TLS handshake with {addr} failed: {detail}")]
    Tls { addr: SocketAddr, detail: String },
    /// Trust on first use: `target` was pinned to `pinned` and another node
    /// answered there (see `trust.rs`).
    #[error("{target} was pinned to node {pinned} on first use, but another node answers there ({detail}); if that is expected, `macula trust revoke {target}`")]
    Untrusted {
        target: String,
        pinned: NodeId,
        detail: String,
    },
    #[error("{addr} is this node itself")]
    SelfConnect { addr: SocketAddr },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: HandshakeError,
    },
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connection limit of {max} reached and every connection is in use")]
    ConnectionLimit { max: usize },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("cannot connect to {addr}: {detail}")]
    Io { addr: SocketAddr, detail: String },
    /// A relayed connection failed at the relay (the error names the limit
    /// or condition the relay reported).
    #[error(transparent)]
    Relay(#[from] RelayError),
}

impl ConnectError {
    /// The node answered and will keep saying no until someone changes a
    /// configuration: another realm, another protocol version, or another
    /// node than the one asked for. Retrying does not help.
    pub fn is_permanent(&self) -> bool {
        use macula_wire::ErrorCode;
        match self {
            ConnectError::IdentityMismatch { .. } | ConnectError::Untrusted { .. } => true,
            ConnectError::Handshake { source, .. } => matches!(
                source,
                HandshakeError::RealmMismatch { .. }
                    | HandshakeError::UnsupportedVersion { .. }
                    | HandshakeError::IdentityMismatch { .. }
                    | HandshakeError::Rejected {
                        code: ErrorCode::RealmMismatch
                            | ErrorCode::UnsupportedVersion
                            | ErrorCode::IdentityMismatch,
                        ..
                    }
            ),
            _ => false,
        }
    }

    fn failure(&self) -> Option<HandshakeFailure> {
        match self {
            ConnectError::IdentityMismatch { .. } | ConnectError::Untrusted { .. } => {
                Some(HandshakeFailure::IdentityMismatch)
            }
            ConnectError::Tls { .. } => Some(HandshakeFailure::Tls),
            ConnectError::Handshake { source, .. } => Some(source.failure()),
            ConnectError::Timeout { .. } => Some(HandshakeFailure::Timeout),
            _ => None,
        }
    }
}

/// A change in the set of connected peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    Connected {
        node_id: NodeId,
        addr: SocketAddr,
        direction: Direction,
    },
    Disconnected {
        node_id: NodeId,
        reason: String,
    },
}

type DialFuture = Shared<BoxFuture<'static, Result<Peer, ConnectError>>>;

struct NodeShared {
    /// What the connection drivers dispatch to.
    services: Services,
    /// The realm's permissions and revocation list (issue 18).
    realm: crate::realm::Realm,
    /// The node status service (STATUS_REQUEST/REPORT, the dashboard's view).
    status: crate::status::StatusService,
    /// Trust on first use of configured addresses (open realms).
    trust: crate::trust::Trust,
    /// Security events on their way to the audit trail.
    trail: Arc<crate::authz::AuditTrail>,
    /// The monotonic clock every core of this node is fed from.
    clock: Clock,
    /// This run's epoch (see `clock.rs`), its mark saved while it runs.
    epoch: Epoch,
    /// The data directory's lock (see `datadir.rs`), released at shutdown.
    dir_lock: Mutex<Option<crate::datadir::DirLock>>,
    /// Bootstrap peers that refused this node for good (see
    /// `ConnectError::is_permanent`): target as configured, and why.
    bootstrap_refused: Mutex<HashMap<String, String>>,
    /// Notified when `bootstrap_refused` changes.
    bootstrap_changed: tokio::sync::Notify,
    /// Rate limits of warnings that junk traffic could repeat at will.
    quiet_handshakes: crate::quiet::LogLimit,
    quiet_pending: crate::quiet::LogLimit,
    gateway: crate::gateway::Gateway,
    node_id: NodeId,
    config: NodeConfig,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    local: LocalInfo,
    table: Mutex<PoolTable<Peer>>,
    /// Nodes whose connection went silent (the failure detector, a failed
    /// health ping, the transport timeout), until they connect again:
    /// `/admin/peers` and `macula_peers_suspected` (each core keeps its own
    /// list for its decisions).
    suspects: Mutex<SuspectList<NodeId>>,
    dialing: Mutex<HashMap<SocketAddr, DialFuture>>,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<PeerEvent>,
    shutdown: watch::Sender<bool>,
    started: Instant,
    /// Second (of uptime, plus one) of the last connection-limit warning.
    refusal_logged: std::sync::atomic::AtomicU64,
    dht: DhtHandle,
    pubsub: crate::pubsub::PubSub,
    rpc: crate::rpc::Rpc,
    reach: crate::reachability::Reachability,
    punch: crate::punch::HolePunching,
    relay: crate::relay::Relay,
    tunnel: Tunnel,
    raft: crate::raft::RaftGroups,
    /// Durable streams hosted here (issue 21).
    streams: crate::stream::Streams,
    /// Relayed dials in progress, by target: concurrent callers share one.
    relay_dialing: Mutex<HashMap<NodeId, DialFuture>>,
    /// Issue 18: the admin API's credentials and the audit trail.
    security: Security,
    /// The MQTT bridge, when `mqtt.listen` is set (issue 24).
    mqtt: std::sync::OnceLock<crate::mqtt::Bridge>,
}

/// The admin API's credentials check and the node's audit trail (in
/// `<data dir>/audit/`, signed with the node key), set up at start.
struct Security {
    admin_auth: Arc<crate::admin::auth::AdminAuth>,
    audit: Option<crate::audit_log::AuditLog>,
}

impl Security {
    fn open(config: &NodeConfig, identity: &Identity) -> Result<Security, StartError> {
        let admin_auth = Arc::new(crate::admin::auth::AdminAuth::prepare(config)?);
        let audit = match &config.identity {
            IdentitySource::DataDir(dir) => Some(crate::audit_log::AuditLog::open(
                &dir.join("audit"),
                identity.signing_key().clone(),
                config.audit.clone(),
            )?),
            IdentitySource::Ephemeral => None,
        };
        Ok(Security { admin_auth, audit })
    }
}

/// TTL of this node's relay record (republished by the DHT before expiry).
pub const RELAY_RECORD_TTL: Duration = Duration::from_secs(120);

/// Dials DHT contacts through the pool. Holds the node weakly: the DHT task
/// must not keep the node alive.
#[derive(Clone)]
struct PoolDialer(std::sync::Weak<NodeShared>);

impl crate::pubsub::Mesh for PoolDialer {
    /// The pooled connection to `id`, or a new one to the address the DHT
    /// knows for it.
    fn reach(&self, id: NodeId) -> futures::future::BoxFuture<'static, Option<Peer>> {
        let weak = self.0.clone();
        Box::pin(async move {
            let node = NodeRuntime(weak.upgrade()?);
            node.route(id, Vec::new(), true).await
        })
    }
}

impl crate::rpc::Reach for PoolDialer {
    /// The pooled connection to `id`, else a dial to the first address in
    /// its advertisement that answers as `id`, else the DHT's address.
    fn reach(
        &self,
        id: NodeId,
        addrs: Vec<String>,
    ) -> futures::future::BoxFuture<'static, Option<Peer>> {
        let weak = self.0.clone();
        Box::pin(async move {
            let node = NodeRuntime(weak.upgrade()?);
            let addrs: Vec<SocketAddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
            node.route(id, addrs, true).await
        })
    }
}

impl crate::raft::Reach for PoolDialer {
    /// The pooled connection to member `id`, else a dial to the address
    /// the DHT knows for it.
    fn reach(&self, id: NodeId) -> futures::future::BoxFuture<'static, Option<Peer>> {
        let weak = self.0.clone();
        Box::pin(async move {
            let node = NodeRuntime(weak.upgrade()?);
            node.route(id, Vec::new(), true).await
        })
    }
}

impl crate::dht::Dialer for PoolDialer {
    async fn dial(&self, addr: SocketAddr, id: NodeId) -> Option<Peer> {
        let node = NodeRuntime(self.0.upgrade()?);
        // No DHT lookups from inside the DHT's own sends: a relayed route is
        // used only when already known.
        node.route(id, vec![addr], false).await
    }
}

/// A running node's connection layer. Cheap to clone; all clones share it.
#[derive(Clone)]
pub struct NodeRuntime(Arc<NodeShared>);

pub(crate) fn transport_config(
    l: &crate::config::Limits,
) -> Result<Arc<quinn::TransportConfig>, StartError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(l.transport_idle_timeout)
        .map_err(|e| StartError::Quic(format!("transport idle timeout: {e}")))?;
    // Streams: what a peer may open before its HELLO says what it is (and
    // all a client ever may); a full node's allowance is raised after HELLO
    // (`allow_streams`). QUIC preallocates state for every allowed stream.
    let streams = quinn::VarInt::from_u32(l.max_streams_per_client);
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(l.keep_alive_interval))
        .max_concurrent_bidi_streams(streams)
        .max_concurrent_uni_streams(streams)
        .stream_receive_window(quinn::VarInt::from_u32(l.stream_receive_window))
        .receive_window(quinn::VarInt::from_u32(l.connection_receive_window))
        .send_window(l.send_window)
        // Unused: without this a peer could park unread datagrams here.
        .datagram_receive_buffer_size(None);
    Ok(Arc::new(t))
}

/// Raises the streams a full node may open on `peer`'s connection to
/// `max_streams_per_connection` (clients keep the small initial allowance).
fn allow_streams(peer: &Peer, l: &crate::config::Limits) {
    if !peer.is_client() {
        let n = quinn::VarInt::from_u32(l.max_streams_per_connection);
        peer.connection().set_max_concurrent_bi_streams(n);
        peer.connection().set_max_concurrent_uni_streams(n);
    }
}

/// A QUIC endpoint on a fresh UDP socket at `addr` whose kernel buffers are
/// `buffer` bytes each (as far as the kernel allows); a server when given
/// `server`; its stateless resets and connection IDs keyed with `keys` (a
/// node's, the same across restarts: see `Identity::restart_keys`), else
/// random keys.
pub(crate) fn endpoint(
    addr: SocketAddr,
    buffer: usize,
    server: Option<quinn::ServerConfig>,
    keys: Option<crate::identity::RestartKeys>,
) -> std::io::Result<quinn::Endpoint> {
    let sock = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&sock).into())?;
    // Best effort: the kernel caps both (net.core.rmem_max, wmem_max).
    let recv = state.set_recv_buffer_size((&sock).into(), buffer);
    let send = state.set_send_buffer_size((&sock).into(), buffer);
    if let (Err(e), _) | (_, Err(e)) = (&recv, &send) {
        tracing::debug!(error = %e, buffer, "could not size the UDP socket buffers");
    }
    tracing::debug!(
        addr = %addr,
        want = buffer,
        recv = ?state.recv_buffer_size((&sock).into()).ok(),
        send = ?state.send_buffer_size((&sock).into()).ok(),
        "UDP socket buffers"
    );
    let mut config = quinn::EndpointConfig::default();
    if let Some(keys) = keys {
        config.reset_key(keys.reset);
        let cid = keys.cid;
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid))
                as Box<dyn quinn::ConnectionIdGenerator>
        });
    }
    quinn::Endpoint::new(config, server, sock, Arc::new(quinn::TokioRuntime))
}

/// The node ID proved by the peer's certificate in a finished TLS handshake.
pub(crate) fn proved_id(conn: &quinn::Connection) -> Result<NodeId, String> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type".to_string())?;
    tls::peer_node_id(&certs).map_err(|e| e.to_string())
}

impl NodeRuntime {
    /// Loads or creates the identity, binds the QUIC socket, starts accepting
    /// and starts joining through the bootstrap peers.
    pub async fn start(config: NodeConfig) -> Result<NodeRuntime, StartError> {
        config.validate()?;
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
        let epoch = match &config.identity {
            IdentitySource::DataDir(dir) => Epoch::start(dir)?,
            IdentitySource::Ephemeral => Epoch::ephemeral(),
        };
        let clock = Clock::new();
        let security = Security::open(&config, &identity)?;
        let tls = tls::build(&identity, &config.tls)?;
        let transport = transport_config(&config.limits)?;
        let server_crypto = QuicServerConfig::try_from(tls.server.clone())
            .map_err(|e| StartError::Quic(e.to_string()))?;
        let client_crypto = QuicClientConfig::try_from(tls.client.clone())
            .map_err(|e| StartError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let tunnel_server = server.clone();
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        let mut endpoint = endpoint(
            config.listen,
            config.limits.socket_buffer,
            Some(server),
            Some(identity.restart_keys()),
        )
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let reach =
            crate::reachability::Reachability::new(client.clone(), config.listen.ip(), config.nat);
        let relay_counters = Arc::new(crate::relay::RelayCounters::default());
        let tunnel = Tunnel::new(
            tunnel_server,
            client.clone(),
            config.limits.max_frame_size,
            relay_counters.clone(),
        )
        .map_err(|e| StartError::Quic(format!("relay tunnel endpoint: {e}")))?;
        endpoint.set_default_client_config(client);
        let local_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let forced_private = config.reachability == ReachabilityMode::Private;
        let mut capabilities = config.capabilities.clone();
        if config.relay.enabled && !forced_private && !capabilities.iter().any(|c| c == "relay") {
            capabilities.push("relay".to_string());
        }
        let hello = Hello {
            version: PROTOCOL_VERSION,
            node_id,
            realm: config.realm.clone(),
            capabilities,
            // A node that knows it is behind NAT names no address: peers
            // would only wait on it.
            listen_addrs: if forced_private {
                Vec::new()
            } else {
                vec![local_addr.to_string()]
            },
            max_frame_size: config.limits.max_frame_size,
            agent: format!("macula/{}", env!("CARGO_PKG_VERSION")),
            grant: config
                .admission
                .as_ref()
                .and_then(|a| a.grant.clone())
                .map(serde_bytes::ByteBuf::from),
            // Full nodes present grants; API keys are for clients.
            api_key: None,
            // Filled in per connection (`peer::handshake`).
            observed_addr: None,
        };
        // The node's metrics, shared with the API-key gate (apikey.rs).
        let metrics = Arc::new(Metrics::default());
        let api_keys = crate::apikey_gate::gate_of(config.admission.as_ref(), &metrics);
        let (events, _) = broadcast::channel(PEER_EVENT_CAPACITY);
        let (shutdown, _) = watch::channel(false);
        let dht_shutdown = shutdown.subscribe();
        let first_node = config.bootstrap.is_empty();
        let dht_identity = identity.clone();
        let max_frame_size = config.limits.max_frame_size;
        let realm = config.realm.clone();
        let stall_timeout = config.limits.pubsub_stall_timeout;
        let realm_counters = Arc::new(crate::authz::RealmCounters::default());
        let authz = config.admission.as_ref().map(|a| {
            let z = crate::authz::Authz::new(a, node_id, peer::unix_ms(), realm_counters.clone());
            if let Some(e) = z.own_error() {
                tracing::error!(error = %e, "this node's grant is not used: it may do nothing itself, and the realm's nodes will refuse it");
            }
            Arc::new(z)
        });
        let trail = Arc::new(crate::authz::AuditTrail::new(security.audit.clone()));
        if let Some(z) = &authz {
            z.set_trail(trail.clone());
            security.admin_auth.set_authz(z.clone());
        }
        let e2e = Arc::new(crate::e2e::E2e::new(
            authz.as_ref().map(|a| *a.authority()),
            identity.signing_key().clone(),
            realm_counters.clone(),
            match &config.identity {
                IdentitySource::DataDir(dir) => Some(dir.clone()),
                IdentitySource::Ephemeral => None,
            },
        ));
        e2e.load();
        let shared = Arc::new_cyclic(|weak| {
            let dht = crate::dht::spawn(
                dht_identity,
                local_addr,
                macula_dht::Config {
                    seq_base: epoch.value(),
                    request_timeout: macula_wire::time::Millis::from_duration(
                        config.limits.dht_request_timeout,
                    ),
                    ..macula_dht::Config::default()
                },
                clock,
                first_node,
                PoolDialer(weak.clone()),
                match &config.identity {
                    IdentitySource::DataDir(dir) => Some(crate::dht::SnapshotSetup {
                        path: crate::dht_snapshot::path(dir),
                        interval: config.limits.dht_snapshot_interval,
                    }),
                    IdentitySource::Ephemeral => None,
                },
                dht_shutdown,
            );
            let pubsub = crate::pubsub::PubSub::node(
                crate::pubsub::config(
                    node_id,
                    epoch.value(),
                    max_frame_size,
                    config.pubsub,
                    &realm,
                    stall_timeout,
                ),
                clock,
                crate::pubsub::MeshLink {
                    dht: dht.clone(),
                    realm,
                    mesh: Box::new(PoolDialer(weak.clone())),
                    authz: authz.clone(),
                },
            );
            pubsub.set_e2e(e2e.clone());
            let rpc = crate::rpc::Rpc::with_link(
                node_id,
                max_frame_size,
                config.rpc,
                Some(crate::rpc::RpcLink {
                    dht: dht.clone(),
                    realm: config.realm.clone(),
                    reach: Box::new(PoolDialer(weak.clone())),
                    addrs: Mutex::new(if local_addr.ip().is_unspecified() || forced_private {
                        Vec::new()
                    } else {
                        vec![local_addr.to_string()]
                    }),
                    authz: authz.clone(),
                }),
            );
            rpc.set_e2e(e2e.clone());
            let gateway = crate::gateway::Gateway::new(pubsub.clone(), rpc.clone());
            let lookup = weak.clone();
            let relay_reach = reach.clone();
            let relay = crate::relay::Relay::new(
                node_id,
                config.relay.clone(),
                config.limits.max_frame_size,
                relay_counters,
                Box::new(move |id| {
                    let shared = lookup.upgrade()?;
                    let peer = shared.table.lock().peek(id).cloned();
                    peer
                }),
                Box::new(move || relay_reach.state() == crate::reachability::ReachState::Private),
                Some(dht.clone()),
            );
            let raft = crate::raft::RaftGroups::new(
                node_id,
                match &config.identity {
                    IdentitySource::DataDir(dir) => Some(dir.clone()),
                    IdentitySource::Ephemeral => None,
                },
                config.raft.clone(),
                config.limits.max_frame_size,
                Arc::new(PoolDialer(weak.clone())),
            );
            let listed: std::sync::Weak<NodeShared> = weak.clone();
            let realm = crate::realm::Realm::new(
                authz.clone(),
                realm_counters,
                trail.clone(),
                Box::new(move || {
                    listed
                        .upgrade()
                        .map(|s| s.table.lock().all())
                        .unwrap_or_default()
                }),
                match &config.identity {
                    IdentitySource::DataDir(dir) => Some(dir.clone()),
                    IdentitySource::Ephemeral => None,
                },
                e2e.clone(),
            );
            let status_of = weak.clone();
            let status_peers = weak.clone();
            let status = crate::status::StatusService::new(
                node_id,
                config.dashboard.clone(),
                clock,
                Box::new(move |max_links| {
                    status_of
                        .upgrade()
                        .map(|s| NodeRuntime(s).local_status(max_links))
                }),
                Box::new(move || {
                    status_peers
                        .upgrade()
                        .map(|s| s.table.lock().all())
                        .unwrap_or_default()
                }),
                authz.clone(),
            );
            let streams = crate::stream::Streams::open(
                match &config.identity {
                    IdentitySource::DataDir(dir) => Some(dir.clone()),
                    IdentitySource::Ephemeral => None,
                },
                pubsub.clone(),
                config.streams.clone(),
                clock,
            );
            let punch = {
                let dialer = weak.clone();
                let direct = weak.clone();
                crate::punch::HolePunching::new(
                    config.nat,
                    reach.clone(),
                    hello.listen_addrs.clone(),
                    Box::new(move |addr, id| {
                        let node = dialer.upgrade().map(NodeRuntime);
                        Box::pin(async move {
                            let node = node.ok_or("node stopped")?;
                            node.dial(addr, Some(id))
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        })
                    }),
                    Box::new(move |id| {
                        direct.upgrade().is_some_and(|s| {
                            s.table
                                .lock()
                                .peek(&id)
                                .is_some_and(|p| p.relayed_via().is_none() && !p.is_closed())
                        })
                    }),
                )
            };
            // Every service this node runs: one line each.
            let services = Services::new(vec![
                Arc::new(realm.clone()),
                Arc::new(status.clone()),
                Arc::new(dht.clone()),
                Arc::new(pubsub.clone()),
                Arc::new(rpc.clone()),
                Arc::new(reach.clone()),
                Arc::new(gateway.clone()),
                Arc::new(relay.clone()),
                Arc::new(tunnel.clone()),
                Arc::new(raft.clone()),
                Arc::new(punch.clone()),
            ]);
            NodeShared {
                services,
                realm,
                status,
                trail: trail.clone(),
                trust: crate::trust::Trust::new(
                    match (&config.identity, &config.admission) {
                        (IdentitySource::DataDir(dir), None) => Some(dir.clone()),
                        _ => None,
                    },
                    config.trust,
                ),
                clock,
                epoch: epoch.clone(),
                dir_lock: Mutex::new(dir_lock),
                bootstrap_refused: Mutex::new(HashMap::new()),
                bootstrap_changed: tokio::sync::Notify::new(),
                quiet_handshakes: crate::quiet::LogLimit::new(Duration::from_secs(1)),
                quiet_pending: crate::quiet::LogLimit::new(Duration::from_secs(1)),
                gateway,
                relay,
                tunnel,
                raft,
                streams,
                relay_dialing: Mutex::new(HashMap::new()),
                reach,
                punch,
                rpc,
                pubsub,
                dht,
                node_id,
                local: LocalInfo {
                    hello,
                    max_frame_size: config.limits.max_frame_size,
                    authz: authz.clone(),
                    api_keys,
                    keys: Some(e2e.clone()),
                },
                table: Mutex::new(PoolTable::new(
                    node_id,
                    config.limits.max_connections,
                    config.limits.max_clients(),
                )),
                suspects: Mutex::new(SuspectList::new(SUSPECT_TTL, MAX_SUSPECTS)),
                dialing: Mutex::new(HashMap::new()),
                metrics,
                events,
                shutdown,
                started: Instant::now(),
                refusal_logged: std::sync::atomic::AtomicU64::new(0),
                endpoint,
                local_addr,
                config,
                security,
                mqtt: std::sync::OnceLock::new(),
            }
        });
        let node = NodeRuntime(shared);
        if let Some(listen) = node.0.config.mqtt.listen {
            let tls = match &node.0.config.mqtt.tls {
                None => None,
                Some(crate::config::MqttTls::NodeCertificate) => {
                    Some(tls::mqtt_server(&identity, None)?)
                }
                Some(crate::config::MqttTls::Files { cert, key }) => {
                    Some(tls::mqtt_server(&identity, Some((cert, key)))?)
                }
            };
            let parts = crate::mqtt::Parts {
                pubsub: node.0.pubsub.clone(),
                clock,
                authz: node.0.local.authz.clone(),
                gate: node.0.local.api_keys.clone(),
                tls,
                dir: match &node.0.config.identity {
                    IdentitySource::DataDir(dir) => Some(dir.clone()),
                    IdentitySource::Ephemeral => None,
                },
            };
            let bridge = crate::mqtt::Bridge::start(
                &node.0.config.mqtt,
                listen,
                parts,
                node.0.shutdown.subscribe(),
            )
            .await
            .map_err(
                |crate::mqtt::MqttError::Bind { addr, source }| StartError::Bind { addr, source },
            )?;
            let _ = node.0.mqtt.set(bridge);
        }
        tracing::info!(node_id = %node_id, listen = %local_addr, realm = %node.0.config.realm, "node started");
        tokio::spawn(node.clone().accept_loop(node.0.endpoint.clone(), false));
        tokio::spawn(
            node.clone()
                .accept_loop(node.0.tunnel.endpoint().clone(), true),
        );
        tokio::spawn(node.clone().check_reachability());
        tokio::spawn(node.clone().save_epoch());
        // Streams hosted here are served to the mesh (`_stream.<name>`);
        // replicated ones rejoin their groups.
        let placement = Arc::downgrade(&node.0);
        node.0.streams.start(
            node.0.rpc.clone(),
            node.0.raft.clone(),
            Box::new(move || {
                placement
                    .upgrade()
                    .map(|s| {
                        NodeRuntime(s)
                            .peers()
                            .into_iter()
                            .filter(|p| !p.is_client() && !p.is_closed())
                            .map(|p| p.node_id())
                            .collect()
                    })
                    .unwrap_or_default()
            }),
        );
        node.0.realm.load(
            node.0
                .config
                .admission
                .as_ref()
                .and_then(|a| a.revocations.as_deref()),
        );
        tokio::spawn(node.0.realm.clone().sweep(node.0.shutdown.subscribe()));
        tokio::spawn(node.0.status.clone().run(node.0.shutdown.subscribe()));
        tokio::spawn(node.clone().maintain_relays());
        for target in node.0.config.bootstrap.clone() {
            tokio::spawn(node.clone().supervise(target));
        }
        Ok(node)
    }

    pub fn node_id(&self) -> NodeId {
        self.0.node_id
    }

    /// The MQTT bridge, when this node listens for MQTT.
    pub fn mqtt(&self) -> Option<&crate::mqtt::Bridge> {
        self.0.mqtt.get()
    }

    /// The realm service: permissions, the revocation list.
    pub fn realm_service(&self) -> &crate::realm::Realm {
        &self.0.realm
    }

    /// The node status service: what peers report, for the dashboard.
    pub fn status_service(&self) -> &crate::status::StatusService {
        &self.0.status
    }

    /// Whether the node is ready, and why: it has at least one connected
    /// peer, or it has no bootstrap peers configured (it is the first
    /// node). The current state, not a latch (`/ready`).
    pub fn readiness(&self) -> (bool, String) {
        let peers = self.peers().len();
        if self.is_shutting_down() {
            (false, "shutting down".to_string())
        } else if peers > 0 {
            (true, format!("joined the mesh: {peers} peer(s) connected"))
        } else if self.0.config.bootstrap.is_empty() {
            (
                true,
                "first node: no bootstrap peers configured".to_string(),
            )
        } else {
            (
                false,
                format!(
                    "joining: none of {} bootstrap peer(s) connected yet",
                    self.0.config.bootstrap.len()
                ),
            )
        }
    }

    /// This node's summary for STATUS_REPORT and the dashboard: identity,
    /// addresses, links to full nodes (at most `max_links`, by node ID),
    /// clients, running totals.
    pub fn local_status(&self, max_links: usize) -> macula_wire::NodeStatus {
        use macula_wire::status::{StatusLink, StatusTotals};
        let mut links = Vec::new();
        let mut clients = 0u32;
        for p in self.peers() {
            if p.is_client() {
                clients = clients.saturating_add(1);
            } else {
                links.push(StatusLink {
                    node_id: p.node_id(),
                    relayed_via: p.relayed_via(),
                    rtt_us: u64::try_from(p.rtt().as_micros()).unwrap_or(u64::MAX),
                    outbound: p.direction() == crate::peer::Direction::Outbound,
                });
            }
        }
        links.sort_by_key(|l| l.node_id);
        links.dedup_by_key(|l| l.node_id);
        let omitted = links.len().saturating_sub(max_links);
        links.truncate(max_links);
        let reach = self.0.reach.state();
        let mut addrs = self.0.local.hello.listen_addrs.clone();
        if let crate::reachability::ReachState::Public { addrs: public } = &reach {
            for a in public {
                if !addrs.contains(a) {
                    addrs.push(a.clone());
                }
            }
        }
        addrs.retain(|a| a.len() <= macula_wire::MAX_ADDR_LEN);
        addrs.truncate(macula_wire::MAX_LISTEN_ADDRS);
        let m = &self.0.metrics;
        let ps = self.0.pubsub.counters();
        let rpc = self.0.rpc.counters();
        let dht = self.0.dht.counters();
        macula_wire::NodeStatus {
            node_id: self.0.node_id,
            addrs,
            agent: self.0.local.hello.agent.clone(),
            uptime_ms: u64::try_from(self.uptime().as_millis()).unwrap_or(u64::MAX),
            ready: self.readiness().0,
            reachability: reach.name().to_string(),
            links,
            links_omitted: u32::try_from(omitted).unwrap_or(u32::MAX),
            clients,
            totals: StatusTotals {
                messages_in: m.frames_received_total.get(),
                messages_out: m.frames_sent_total.get(),
                published: ps.published_total.get(),
                delivered: ps.delivered_local_total.get(),
                pubsub_in: ps.received_remote_total.get(),
                pubsub_out: ps.sent_remote_total.get(),
                rpc_calls: rpc.calls_total.get(),
                rpc_served: rpc.served_total.get(),
                dht_records: dht.records.get(),
                dht_contacts: dht.routing_table_size.get(),
                dht_lookups: dht
                    .lookups_observed
                    .load(std::sync::atomic::Ordering::Relaxed),
                dht_lookup_hops: dht
                    .lookup_rounds_sum
                    .load(std::sync::atomic::Ordering::Relaxed),
                subscriptions: ps.subscriptions.get(),
                services: self.0.rpc.advertised().len() as u64,
            },
        }
    }

    /// The node's pub/sub (subscriptions and local delivery).
    pub fn pubsub(&self) -> &crate::pubsub::PubSub {
        &self.0.pubsub
    }

    /// The node's DHT: put, get, closest.
    /// Whether other nodes can dial this one.
    pub fn reachability(&self) -> &crate::reachability::Reachability {
        &self.0.reach
    }

    /// Hole punching over relayed connections (`punch.rs`).
    pub fn hole_punching(&self) -> &crate::punch::HolePunching {
        &self.0.punch
    }

    /// This node's RPC.
    /// The gateway role's counters (clients attached, requests).
    pub fn gateway_counters(&self) -> &Arc<crate::gateway::GatewayCounters> {
        self.0.gateway.counters()
    }

    /// Patterns each attached client is subscribed to.
    pub fn client_subscriptions(&self) -> Vec<(String, Vec<String>)> {
        self.0.gateway.client_patterns()
    }

    pub fn rpc(&self) -> &crate::rpc::Rpc {
        &self.0.rpc
    }

    pub fn dht(&self) -> &DhtHandle {
        &self.0.dht
    }

    /// The relay this node runs for others (limits, counters).
    pub fn relay(&self) -> &crate::relay::Relay {
        &self.0.relay
    }

    /// This node's relayed sessions and reservations.
    /// The Raft groups this node runs.
    pub fn raft(&self) -> &crate::raft::RaftGroups {
        &self.0.raft
    }

    /// The durable streams this node hosts.
    pub fn streams(&self) -> &crate::stream::Streams {
        &self.0.streams
    }

    /// Durable stream `name` wherever it lives: hosted here (direct) or by
    /// another node (over RPC, `_stream.<name>`; each operation but a
    /// pull bounded by `timeout`).
    pub fn stream(&self, name: &str, timeout: std::time::Duration) -> crate::stream::StreamHandle {
        if self.0.streams.hosts(name) {
            self.0.streams.handle(name)
        } else {
            crate::stream::StreamHandle::Remote(crate::stream::remote::RemoteStream::new(
                self.0.rpc.clone(),
                name,
                timeout,
            ))
        }
    }

    pub fn tunnel(&self) -> &Tunnel {
        &self.0.tunnel
    }

    /// The bound QUIC address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr
    }

    pub fn realm(&self) -> &str {
        &self.0.config.realm
    }

    /// The admin API's credentials check.
    pub fn admin_auth(&self) -> &Arc<crate::admin::auth::AdminAuth> {
        &self.0.security.admin_auth
    }

    /// The node's audit trail (`None` without a data directory).
    pub fn audit(&self) -> Option<&crate::audit_log::AuditLog> {
        self.0.security.audit.as_ref()
    }

    pub fn config(&self) -> &NodeConfig {
        &self.0.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    pub fn uptime(&self) -> Duration {
        self.0.started.elapsed()
    }

    /// This node's monotonic time (what its cores are fed).
    pub fn now(&self) -> macula_wire::time::Millis {
        self.0.clock.now()
    }

    /// Peer connect/disconnect notifications from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.0.events.subscribe()
    }

    /// Every pooled connection.
    pub fn peers(&self) -> Vec<Peer> {
        self.0.table.lock().all()
    }

    /// The pooled connection to `id`, if any (does not dial).
    pub fn peer(&self, id: &NodeId) -> Option<Peer> {
        self.0.table.lock().peek(id).cloned()
    }

    /// True once `shutdown` has begun (readiness probes report not ready).
    pub fn is_shutting_down(&self) -> bool {
        *self.0.shutdown.borrow()
    }

    /// A connection to the node at `addr`, reusing the pooled one when there
    /// is one. With `expected`, the peer must prove that node ID in the TLS
    /// handshake or the connection fails with `IdentityMismatch`.
    /// Concurrent calls for the same address share one dial.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Peer, ConnectError> {
        if self.is_shutting_down() {
            return Err(ConnectError::ShuttingDown);
        }
        let hit = {
            let mut t = self.0.table.lock();
            match expected {
                Some(id) => t.get(&id),
                None => t.get_by_addr(&addr),
            }
        };
        if let Some(p) = hit.filter(|p| !p.is_closed()) {
            self.0.metrics.pool_hits_total.inc();
            p.touch();
            return Ok(p);
        }
        self.0.metrics.pool_misses_total.inc();
        let fut = self.shared_dial(
            |s| &s.dialing,
            addr,
            addr,
            |node| node.dial(addr, expected).boxed(),
        );
        let peer = fut.await?;
        if let Some(want) = expected.filter(|want| *want != peer.node_id()) {
            return Err(ConnectError::IdentityMismatch {
                addr,
                expected: want,
                detail: format!("the node at this address is {}", peer.node_id()),
            });
        }
        peer.touch();
        Ok(peer)
    }

    /// Resolves a user-given address and connects to it.
    /// Without a node ID in `target`, trust on first use applies (open
    /// realms, nodes with a data directory; see `trust.rs`): the first node
    /// that answers at `target` is pinned, and another one later refused.
    pub async fn connect_addr(&self, target: &PeerAddr) -> Result<Peer, ConnectError> {
        let addr = resolve(target).await?;
        if target.expected.is_some() {
            return self.connect(addr, target.expected).await;
        }
        let key = target.authority();
        match self.0.trust.check(&key) {
            crate::trust::Checked::Pinned(pinned) => match self.connect(addr, Some(pinned)).await {
                Err(ConnectError::IdentityMismatch { detail, .. }) => {
                    self.0.trust.refused();
                    self.0.trail.record("trust_refused", &key, || {
                        format!("{key} is pinned to node {pinned}; another node answered: {detail}")
                    });
                    tracing::warn!(target = %key, pinned = %pinned, "trust on first use: another node answers at a pinned address; refused");
                    Err(ConnectError::Untrusted {
                        target: key,
                        pinned,
                        detail,
                    })
                }
                other => other,
            },
            crate::trust::Checked::New => {
                let peer = self.connect(addr, None).await?;
                if self.0.trust.pin(&key, peer.node_id(), peer::unix_ms()) {
                    let id = peer.node_id();
                    self.0.trail.record("trust_pinned", &key, || {
                        format!("{key} pinned to node {id} on first use")
                    });
                }
                Ok(peer)
            }
        }
    }

    /// Trust on first use (pins of configured addresses).
    pub fn trust(&self) -> &crate::trust::Trust {
        &self.0.trust
    }

    /// Opens a new connection (TLS + HELLO) that bypasses the pool, for
    /// benchmarks and diagnostics that must measure a fresh handshake. The
    /// caller should `disconnect` it when done.
    pub async fn dial_unpooled(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Peer, ConnectError> {
        if self.is_shutting_down() {
            return Err(ConnectError::ShuttingDown);
        }
        let (peer, reader) = self.dial_timed(addr, expected).await?;
        self.spawn_driver(peer.clone(), reader);
        Ok(peer)
    }

    /// `dial_inner` bounded by the handshake timeout.
    async fn dial_timed(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<(Peer, FrameReader), ConnectError> {
        let timeout = self.0.config.limits.handshake_timeout;
        tokio::time::timeout(timeout, self.dial_inner(addr, expected))
            .await
            .unwrap_or(Err(ConnectError::Timeout {
                addr,
                after: timeout,
            }))
    }

    async fn dial(self, addr: SocketAddr, expected: Option<NodeId>) -> Result<Peer, ConnectError> {
        let res = self.dial_timed(addr, expected).await;
        match res {
            Ok((peer, reader)) => self.register(peer, reader).await,
            Err(e) => {
                if let Some(f) = e.failure() {
                    self.0.metrics.handshake_failure(f);
                }
                Err(e)
            }
        }
    }

    async fn dial_inner(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<(Peer, FrameReader), ConnectError> {
        let sni = tls::server_name(expected);
        let connecting = self
            .0
            .endpoint
            .connect(addr, &sni)
            .map_err(|e| ConnectError::Io {
                addr,
                detail: e.to_string(),
            })?;
        let conn = connecting.await.map_err(|e| {
            let detail = e.to_string();
            match expected {
                Some(expected)
                    if detail.contains("identity mismatch")
                        || detail.contains("IdentityMismatch") =>
                {
                    ConnectError::IdentityMismatch {
                        addr,
                        expected,
                        detail,
                    }
                }
                _ if matches!(e, quinn::ConnectionError::TransportError(_))
                    || detail.contains("certificate") =>
                {
                    ConnectError::Tls { addr, detail }
                }
                _ => ConnectError::Io { addr, detail },
            }
        })?;
        let proved = proved_id(&conn).map_err(|detail| ConnectError::Tls { addr, detail })?;
        if proved == self.0.node_id {
            conn.close(close_code(DisconnectReason::Shutdown), b"self connection");
            return Err(ConnectError::SelfConnect { addr });
        }
        peer::handshake(
            conn,
            proved,
            Direction::Outbound,
            &self.0.local,
            self.0.metrics.clone(),
            None,
        )
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })
    }

    /// Admission of an inbound peer, from its HELLO: refused when the pool
    /// cannot take it (full of connections it may not evict, or, for a
    /// client, clients hold all the slots they may), so the peer learns why
    /// in the handshake instead of being dropped right after it.
    fn admit(&self, id: NodeId, hello: &Hello) -> Result<(), (DisconnectReason, String)> {
        match self
            .0
            .table
            .lock()
            .refusal(&id, peer::is_client_hello(hello))
        {
            None => Ok(()),
            Some(r) => Err((DisconnectReason::ConnectionLimit, self.refused(id, r).1)),
        }
    }

    /// Counts and logs a refusal; returns the limit hit and what the peer
    /// is told.
    fn refused(&self, peer: NodeId, why: Refusal) -> (usize, String) {
        self.0.metrics.connections_refused_total.inc();
        let l = &self.0.config.limits;
        let (max, text) = match why {
            Refusal::Full => (
                l.max_connections,
                format!(
                    "connection limit reached: this node holds its maximum of {} connections",
                    l.max_connections
                ),
            ),
            Refusal::ClientLimit => (
                l.max_clients(),
                format!(
                    "client limit reached: this node serves at most {} clients (max_connections {} less {} slots kept for full nodes)",
                    l.max_clients(),
                    l.max_connections,
                    l.max_connections - l.max_clients()
                ),
            ),
        };
        self.warn_refusal(peer, max, &text);
        (max, text)
    }

    /// Logs a refusal at the connection limit: the first one and then at
    /// most one a second (a burst of refusals must not flood the log).
    fn warn_refusal(&self, peer: NodeId, max: usize, why: &str) {
        let now = self.0.started.elapsed().as_secs();
        let last = self.0.refusal_logged.swap(now + 1, Relaxed);
        if last != now + 1 {
            let refused = self.0.metrics.connections_refused_total.get();
            tracing::warn!(peer = %peer, max, refused_total = refused, "{why}; refusing new connections (limits.max_connections, limits.peer_slots)");
        }
    }

    /// Offers a handshaken connection to the pool and starts driving it.
    async fn register(&self, peer: Peer, reader: FrameReader) -> Result<Peer, ConnectError> {
        self.observed_by(&peer);
        if peer.is_client() {
            // A client keeps its one connection; evicting it to make room
            // would cut it off until it fails over.
            peer.set_kept(true);
        }
        let admit = self.0.table.lock().admit(peer.clone());
        // The direct rate: a node enters the pool once (opened), and counts
        // as direct when it entered directly or a direct connection later
        // replaced its relayed one (hole punching).
        if !peer.is_client() {
            let direct = peer.relayed_via().is_none();
            match &admit {
                Admit::Inserted { .. } => self.0.reach.connection_opened(direct),
                Admit::Replaced { old } if direct && old.relayed_via().is_some() => {
                    peer.set_punched();
                    // From here every send routes over the direct
                    // connection: how long after it was authenticated.
                    tracing::debug!(peer = %peer.node_id(), moved_us = peer.age().as_micros() as u64, "traffic moved from the relayed connection to the direct one");
                    self.0.reach.connection_upgraded()
                }
                // Both sides' punching dials got through: the tie-break's
                // winner replaces the first, and is punched as well.
                Admit::Replaced { old } if direct && old.is_punched() => peer.set_punched(),
                _ => {}
            }
        }
        let m = &self.0.metrics;
        let grace = self.0.config.limits.duplicate_close_grace;
        let result = match admit {
            Admit::Refused(r) => {
                let (max, why) = self.refused(peer.node_id(), r);
                peer.disconnect(DisconnectReason::ConnectionLimit, &why)
                    .await;
                return Err(ConnectError::ConnectionLimit { max });
            }
            Admit::Inserted { evicted } => {
                if let Some(g) = peer.grant() {
                    let id = peer.node_id();
                    let (remote, dir) = (peer.remote_addr(), peer.direction());
                    self.0.trail.record("admitted", &id.to_string(), || {
                        let b = &g.verified().body;
                        let serial: String = b.id.iter().map(|x| format!("{x:02x}")).collect();
                        format!(
                            "node {id} ({dir:?}, {remote}) admitted as {} with grant {serial}",
                            b.subject
                        )
                    });
                }
                if let Some(old) = evicted {
                    m.pool_evictions_total.inc();
                    tracing::debug!(peer = %old.node_id(), "evicting least recently used connection");
                    // The table no longer holds `old`, so `forget` will not
                    // report it when its driver ends: report it here, or
                    // subscribers would see it connected forever.
                    let _ = self.0.events.send(PeerEvent::Disconnected {
                        node_id: old.node_id(),
                        reason: "Evicted: connection pool full".into(),
                    });
                    tokio::spawn(async move {
                        old.disconnect(DisconnectReason::Evicted, "connection pool full")
                            .await
                    });
                }
                self.announce(&peer);
                Ok(peer.clone())
            }
            Admit::Replaced { old } => {
                m.pool_duplicates_closed_total.inc();
                tracing::debug!(peer = %peer.node_id(), "replacing a duplicate connection");
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    old.disconnect(DisconnectReason::Duplicate, "duplicate connection")
                        .await
                });
                Ok(peer.clone())
            }
            Admit::Duplicate { kept } => {
                m.pool_duplicates_closed_total.inc();
                tracing::debug!(peer = %peer.node_id(), "closing a duplicate connection");
                let loser = peer.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    loser
                        .disconnect(DisconnectReason::Duplicate, "duplicate connection")
                        .await
                });
                Ok(kept)
            }
        };
        m.connections_current.set(self.0.table.lock().len() as u64);
        self.spawn_driver(peer, reader);
        result
    }

    /// What a new connection tells about this node's NAT: the address the
    /// peer saw us at (its HELLO's `observed_addr`; not over a relay, where
    /// addresses are placeholders).
    fn observed_by(&self, peer: &Peer) {
        if peer.is_client() {
            return;
        }
        let reach = &self.0.reach;
        let remote = peer.remote_addr();
        if peer.relayed_via().is_some() || crate::nat::is_tunnel_addr(&remote) {
            return;
        }
        let Some(observed) = peer
            .hello()
            .observed_addr
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            return;
        };
        let port = self.local_addr().port();
        let local_ip = peer
            .connection()
            .local_ip()
            .unwrap_or_else(|| self.local_addr().ip());
        reach.observe(
            remote,
            SocketAddr::new(local_ip, port),
            observed,
            self.0.clock.now(),
        );
    }

    fn spawn_driver(&self, peer: Peer, reader: FrameReader) {
        let node = self.clone();
        allow_streams(&peer, &self.0.config.limits);
        let cfg = DriverConfig {
            idle_timeout: self.0.config.limits.idle_timeout,
            // A client's QUIC keep-alives already tell whether it lives; a
            // ping timer per client would only wake the node.
            health_ping_interval: (!peer.is_client())
                .then_some(self.0.config.limits.health_ping_interval),
            // The failure detector watches full nodes only: a client is
            // watched by QUIC keep-alives (a probe timer per client would
            // wake a gateway of 10,000 clients 40,000 times a second).
            liveness: (!peer.is_client()).then(|| self.0.config.limits.liveness()),
            ping_timeout: self.0.config.limits.ping_timeout,
            max_frame_size: self.0.config.limits.max_frame_size,
            services: self.0.services.clone(),
        };
        let shutdown = self.0.shutdown.subscribe();
        {
            let mut s = self.0.suspects.lock();
            if s.heard_from(&peer.node_id()) {
                let m = &self.0.metrics;
                m.peers_restored_total.inc();
                m.peers_suspected.set(s.len() as u64);
            }
        }
        self.0.services.peer_up(&peer);
        tokio::spawn(async move {
            let ended = driver::drive(peer.clone(), reader, cfg, shutdown).await;
            node.forget(&peer, ended);
        });
    }

    fn announce(&self, peer: &Peer) {
        let m = &self.0.metrics;
        match peer.direction() {
            Direction::Outbound => m.connections_outbound_total.inc(),
            Direction::Inbound => m.connections_inbound_total.inc(),
        };
        tracing::info!(
            peer = %peer.node_id(),
            addr = %peer.remote_addr(),
            direction = peer.direction().name(),
            "peer connected"
        );
        let _ = self.0.events.send(PeerEvent::Connected {
            node_id: peer.node_id(),
            addr: peer.remote_addr(),
            direction: peer.direction(),
        });
    }

    fn forget(&self, peer: &Peer, ended: Ended) {
        let why = ended.why;
        let removed = {
            let mut t = self.0.table.lock();
            let r = t.remove_if(&peer.node_id(), peer.connection_id());
            self.0.metrics.connections_current.set(t.len() as u64);
            r.is_some()
        };
        self.0.metrics.connections_closed_total.inc();
        if ended.gone == Gone::Silent {
            let mut s = self.0.suspects.lock();
            let now = self.0.clock.now();
            s.expire(now);
            s.declare_down(peer.node_id(), now);
            self.0.metrics.peers_suspected.set(s.len() as u64);
        }
        self.0.services.peer_down(
            peer,
            match (ended.gone, removed) {
                (Gone::Left, _) => PeerDown::Left,
                (Gone::Silent, _) => PeerDown::Silent,
                (Gone::No, true) => PeerDown::Closed,
                (Gone::No, false) => PeerDown::Superseded,
            },
        );
        if removed {
            tracing::info!(peer = %peer.node_id(), reason = %why, "peer disconnected");
            let _ = self.0.events.send(PeerEvent::Disconnected {
                node_id: peer.node_id(),
                reason: why,
            });
        } else {
            tracing::debug!(peer = %peer.node_id(), reason = %why, "superseded connection closed");
        }
    }

    /// Accepts connections on `endpoint`: the node's UDP endpoint, or the
    /// relay tunnel's (`tunneled`: relayed sessions).
    async fn accept_loop(self, endpoint: quinn::Endpoint, tunneled: bool) {
        let slots = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        let mut shutdown = self.0.shutdown.subscribe();
        let forced_private = self.0.config.reachability == ReachabilityMode::Private;
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = shutdown.changed() => break,
            };
            let Some(incoming) = incoming else { break };
            let session = if tunneled {
                match self.0.tunnel.session(&incoming.remote_address()) {
                    Some(s) => Some(s),
                    None => {
                        incoming.refuse();
                        continue;
                    }
                }
            } else {
                None
            };
            if forced_private && !tunneled {
                // What a symmetric NAT does: nothing unsolicited gets in.
                self.0.metrics.connections_refused_total.inc();
                tracing::debug!(remote = %incoming.remote_address(), "private node: refusing a direct inbound connection");
                incoming.refuse();
                continue;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                self.0.metrics.connections_refused_total.inc();
                if let Some(held_back) = self.0.quiet_pending.allow() {
                    tracing::warn!(remote = %incoming.remote_address(), limit = MAX_PENDING_HANDSHAKES, held_back,
                        "too many handshakes in progress; refusing connection (at most one such line a second; held_back: lines not written since the last)");
                }
                incoming.refuse();
                continue;
            };
            let node = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                node.accept_one(incoming, session).await;
            });
        }
    }

    async fn accept_one(&self, incoming: quinn::Incoming, session: Option<SessionInfo>) {
        let remote = incoming.remote_address();
        let timeout = self.0.config.limits.handshake_timeout;
        let mut probe_conn: Option<quinn::Connection> = None;
        let fut = async {
            let conn = incoming
                .await
                .map_err(|e| (Some(HandshakeFailure::Tls), e.to_string()))?;
            let proved = proved_id(&conn).map_err(|e| (Some(HandshakeFailure::Tls), e))?;
            probe_conn = Some(conn.clone());
            if proved == self.0.node_id {
                conn.close(close_code(DisconnectReason::Shutdown), b"self connection");
                return Err((
                    Some(HandshakeFailure::Protocol),
                    "connection from ourselves".into(),
                ));
            }
            if let Some(s) = session.as_ref().filter(|s| s.remote != proved) {
                // The relay named someone else than who proved it in TLS.
                conn.close(
                    close_code(DisconnectReason::IdentityMismatch),
                    b"relayed peer is not who the relay announced",
                );
                return Err((
                    Some(HandshakeFailure::IdentityMismatch),
                    format!(
                        "relay {} announced {} but {proved} connected",
                        s.relay, s.remote
                    ),
                ));
            }
            let admit = |hello: &Hello| self.admit(proved, hello);
            peer::handshake(
                conn,
                proved,
                Direction::Inbound,
                &self.0.local,
                self.0.metrics.clone(),
                Some(&admit),
            )
            .await
            .map_err(|e| match e {
                // Counted and logged by `admit`; not a failed handshake.
                HandshakeError::Refused { .. } => (None, e.to_string()),
                e => (Some(e.failure()), e.to_string()),
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok((peer, reader))) => {
                if let Some(s) = &session {
                    peer.set_relayed_via(s.relay);
                    self.0.tunnel.bind(peer.connection().clone());
                    self.0.relay.counters().relayed_connections_total.inc();
                }
                let _ = self.register(peer, reader).await;
            }
            Ok(Err(_)) if is_dial_back(probe_conn.as_ref()) => {
                // A peer checking our reachability: the TLS handshake was
                // all it needed.
                tracing::debug!(remote = %remote, "answered a reachability dial-back");
            }
            Ok(Err((None, detail))) => {
                tracing::debug!(remote = %remote, reason = %detail, "inbound connection turned away");
            }
            Ok(Err((Some(failure), detail))) => {
                self.0.metrics.handshake_failure(failure);
                if failure == HandshakeFailure::Unauthorized {
                    let ip = remote.ip().to_string();
                    self.0.trail.record("admission_refused", &ip, || {
                        format!("inbound from {remote}: {detail}")
                    });
                }
                if let Some(held_back) = self.0.quiet_handshakes.allow() {
                    tracing::warn!(remote = %remote, error = %detail, held_back, "inbound handshake failed (at most one such line a second; held_back: lines not written since the last; every failure is counted in macula_handshake_failures_total)");
                }
            }
            Err(_) => {
                self.0.metrics.handshake_failure(HandshakeFailure::Timeout);
                if let Some(held_back) = self.0.quiet_handshakes.allow() {
                    tracing::warn!(remote = %remote, held_back, "inbound handshake timed out (at most one such line a second)");
                }
            }
        }
    }

    /// Asks peers to dial this node back, now and then (see
    /// `reachability`), until shutdown.
    async fn check_reachability(self) {
        use crate::reachability::{ReachState, RECHECK_INTERVAL, RETRY_INTERVAL};
        let mut shutdown = self.0.shutdown.subscribe();
        if self.0.config.reachability == ReachabilityMode::Private {
            // Configured as behind NAT: nothing to ask.
            self.0.reach.force(ReachState::Private);
            self.0.rpc.set_addrs(Vec::new()).await;
            return;
        }
        loop {
            let peers: Vec<Peer> = self
                .peers()
                .into_iter()
                .filter(|p| p.relayed_via().is_none() && !p.is_client())
                .collect();
            let wait = if peers.is_empty() {
                // Nobody to ask yet.
                Duration::from_secs(1)
            } else {
                let addrs = self.0.local.hello.listen_addrs.clone();
                match self.0.reach.check(peers, addrs).await {
                    ReachState::Unknown => RETRY_INTERVAL,
                    // Advertise where peers actually reached us (this also
                    // gives a node listening on 0.0.0.0 a dialable address)
                    // or, behind NAT, no address at all.
                    ReachState::Public { addrs } => {
                        self.0.rpc.set_addrs(addrs).await;
                        RECHECK_INTERVAL
                    }
                    ReachState::Private => {
                        self.0.rpc.set_addrs(Vec::new()).await;
                        RECHECK_INTERVAL
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            if self.is_shutting_down() {
                return;
            }
        }
    }

    /// Keeps a connection to a bootstrap peer: reconnects with exponential
    /// backoff whenever it fails or drops, until shutdown.
    async fn supervise(self, target: PeerAddr) {
        let l = &self.0.config.limits;
        let mut backoff = reconnects(l.reconnect_backoff_min, l.reconnect_backoff_max);
        let mut shutdown = self.0.shutdown.subscribe();
        let mut last_error: Option<String> = None;
        loop {
            if self.is_shutting_down() {
                return;
            }
            match self.connect_addr(&target).await {
                Ok(peer) => {
                    peer.set_kept(true);
                    self.0.dht.seed(&peer);
                    last_error = None;
                    let connected_at = Instant::now();
                    tokio::select! {
                        _ = peer.connection().closed() => {}
                        _ = shutdown.changed() => return,
                    }
                    // A connection that lived a while was healthy: start over
                    // with short delays.
                    if connected_at.elapsed() > l.reconnect_backoff_max {
                        backoff.reset();
                    }
                    tracing::info!(peer = %peer.node_id(), target = %target, "lost bootstrap peer; reconnecting");
                }
                Err(ConnectError::SelfConnect { .. }) => {
                    tracing::info!(target = %target, "bootstrap address is this node; skipping it");
                    return;
                }
                Err(ConnectError::ShuttingDown) => return,
                Err(e) => {
                    let msg = e.to_string();
                    if e.is_permanent() {
                        // Said so at once to whoever waits for the join; the
                        // loop keeps trying (the peer may be reconfigured).
                        self.0
                            .bootstrap_refused
                            .lock()
                            .insert(target.to_string(), msg.clone());
                        self.0.bootstrap_changed.notify_waiters();
                    }
                    // Log a failure once, not on every retry.
                    if last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(target = %target, error = %msg, "cannot reach bootstrap peer; will retry");
                        last_error = Some(msg);
                    }
                }
            }
            self.0.metrics.reconnect_attempts_total.inc();
            let delay = backoff.next_delay().to_duration();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Reaches `id` the way pub/sub, RPC and the DHT do: the pooled
    /// connection; else, for a node with a relay record (a private node),
    /// a connection through one of its relays; else a direct dial (to
    /// `addrs`, or the DHT's address when `use_dht`) raced against the
    /// relayed route, first success wins. `use_dht: false` (the DHT's own
    /// sends) uses only relay routes already looked up.
    pub async fn route(&self, id: NodeId, addrs: Vec<SocketAddr>, use_dht: bool) -> Option<Peer> {
        if let Some(p) = self.peer(&id).filter(|p| !p.is_closed()) {
            return Some(p);
        }
        if id == self.0.node_id || self.is_shutting_down() {
            return None;
        }
        let cached = self.0.tunnel.cached_routes(&id);
        let known_private = cached.as_ref().is_some_and(|r| !r.is_empty());
        let relayed = {
            let node = self.clone();
            async move {
                let routes = match cached {
                    Some(r) => r,
                    None if use_dht => node.relay_routes(id).await,
                    None => Vec::new(),
                };
                node.connect_through(&routes, id).await
            }
        };
        if known_private {
            return relayed.await;
        }
        let direct = {
            let node = self.clone();
            async move {
                let mut addrs = addrs;
                if addrs.is_empty() && use_dht {
                    if let Ok(found) = node.dht().closest(id, 1).await {
                        addrs = found
                            .into_iter()
                            .filter(|(f, _)| *f == id)
                            .filter_map(|(_, a)| a.parse().ok())
                            .collect();
                    }
                }
                for a in addrs {
                    if a.ip().is_unspecified() || is_tunnel_addr(&a) {
                        continue;
                    }
                    if let Ok(p) = node.connect(a, Some(id)).await {
                        return Some(p);
                    }
                }
                None
            }
        };
        first_some(direct, relayed).await
    }

    /// The relays named in `id`'s relay record (empty: none, so `id` is not
    /// known to be private); cached for a few seconds.
    pub async fn relay_routes(&self, id: NodeId) -> Vec<RelayEntry> {
        if let Some(r) = self.0.tunnel.cached_routes(&id) {
            return r;
        }
        let key = macula_wire::dht_key(relay_record_name(self.realm(), &id).as_bytes());
        let relays: Vec<RelayEntry> = match self.0.dht.get(key).await {
            Ok(records) => records
                .into_iter()
                .filter(|r| r.publisher == id && !r.value.is_empty())
                .filter_map(|r| RelayRecord::decode(&r.value).ok())
                .flat_map(|r| r.relays)
                .filter(|e| e.id != id)
                .collect(),
            Err(e) => {
                tracing::debug!(target = %id, error = %e, "relay record lookup failed");
                return Vec::new();
            }
        };
        self.0.tunnel.cache_routes(id, relays.clone());
        relays
    }

    /// A connection to `target` through the first of `relays` that works.
    async fn connect_through(&self, relays: &[RelayEntry], target: NodeId) -> Option<Peer> {
        for entry in relays {
            if entry.id == self.0.node_id {
                continue;
            }
            let relay = match self.peer(&entry.id).filter(|p| !p.is_closed()) {
                Some(p) => Some(p),
                None => {
                    let mut found = None;
                    for a in entry
                        .addrs
                        .iter()
                        .filter_map(|a| a.parse::<SocketAddr>().ok())
                    {
                        if let Ok(p) = self.connect(a, Some(entry.id)).await {
                            found = Some(p);
                            break;
                        }
                    }
                    found
                }
            };
            let Some(relay) = relay.filter(|r| r.relayed_via().is_none()) else {
                continue;
            };
            match self.connect_via(&relay, target).await {
                Ok(p) => return Some(p),
                Err(e) => {
                    tracing::debug!(relay = %entry.id, target = %target, error = %e, "relayed connection failed")
                }
            }
        }
        None
    }

    /// A connection to `target` through `relay`, a connected peer; the pooled
    /// connection to `target` if there is one. Concurrent calls for the same
    /// target share one attempt. The connection is end-to-end QUIC + TLS
    /// (the relay cannot read or forge it), pooled like a direct one and
    /// marked `relayed_via`.
    pub async fn connect_via(&self, relay: &Peer, target: NodeId) -> Result<Peer, ConnectError> {
        if self.is_shutting_down() {
            return Err(ConnectError::ShuttingDown);
        }
        if let Some(p) = self.peer(&target).filter(|p| !p.is_closed()) {
            return Ok(p);
        }
        let relay = relay.clone();
        let addr = relay.remote_addr();
        // Tracing: the relay session a traced publish or call opens is a
        // span of its trace. Only that exchange runs in it: quinn keeps the
        // span current when it spawns a connection's driver, which would
        // hold the caller's span open for the connection's lifetime.
        let parent = crate::trace::Current::get();
        let fut = self.shared_dial(
            |s| &s.relay_dialing,
            target,
            addr,
            move |node| async move { node.dial_relayed(&relay, target, parent).await }.boxed(),
        );
        let peer = fut.await?;
        peer.touch();
        Ok(peer)
    }

    /// The dial in progress under `key` in the table `table` picks, or a
    /// new one: `dial` runs as its own task, which removes its entry when
    /// done, and every concurrent caller awaits the same result. Driven
    /// inside the callers' futures instead, a caller that gave up (timeout,
    /// select) left a pending future in the table that owns a clone of the
    /// node: a reference cycle that leaked the node and its socket. (Callers
    /// also removed entries that were not theirs.) `addr` names the dial in
    /// the error if its task fails.
    fn shared_dial<K>(
        &self,
        table: fn(&NodeShared) -> &Mutex<HashMap<K, DialFuture>>,
        key: K,
        addr: SocketAddr,
        dial: impl FnOnce(NodeRuntime) -> BoxFuture<'static, Result<Peer, ConnectError>>,
    ) -> DialFuture
    where
        K: std::hash::Hash + Eq + Copy + Send + 'static,
    {
        table(&self.0)
            .lock()
            .entry(key)
            .or_insert_with(|| {
                let node = self.clone();
                let work = dial(self.clone());
                let task = tokio::spawn(async move {
                    let res = work.await;
                    table(&node.0).lock().remove(&key);
                    res
                });
                async move {
                    task.await.unwrap_or_else(|e| {
                        Err(ConnectError::Io {
                            addr,
                            detail: format!("dial task failed: {e}"),
                        })
                    })
                }
                .boxed()
                .shared()
            })
            .clone()
    }

    async fn dial_relayed(
        &self,
        relay: &Peer,
        target: NodeId,
        parent: crate::trace::Current,
    ) -> Result<Peer, ConnectError> {
        let addr = parent.scope(self.0.tunnel.open(relay, target)).await?;
        let timeout = self.0.config.limits.handshake_timeout;
        let handshake = async {
            let sni = tls::server_name(Some(target));
            let connecting =
                self.0
                    .tunnel
                    .endpoint()
                    .connect(addr, &sni)
                    .map_err(|e| ConnectError::Io {
                        addr,
                        detail: e.to_string(),
                    })?;
            let conn = connecting.await.map_err(|e| ConnectError::Tls {
                addr,
                detail: format!("through relay {}: {e}", relay.node_id()),
            })?;
            self.0.tunnel.bind(conn.clone());
            let proved = proved_id(&conn).map_err(|detail| ConnectError::Tls { addr, detail })?;
            if proved != target {
                conn.close(
                    close_code(DisconnectReason::IdentityMismatch),
                    b"identity mismatch",
                );
                return Err(ConnectError::IdentityMismatch {
                    addr,
                    expected: target,
                    detail: format!("{proved} answered through relay {}", relay.node_id()),
                });
            }
            peer::handshake(
                conn,
                proved,
                Direction::Outbound,
                &self.0.local,
                self.0.metrics.clone(),
                None,
            )
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })
        };
        let (peer, reader) = tokio::time::timeout(timeout, handshake)
            .await
            .unwrap_or(Err(ConnectError::Timeout {
                addr,
                after: timeout,
            }))
            .inspect_err(|e| {
                if let Some(f) = e.failure() {
                    self.0.metrics.handshake_failure(f);
                }
            })?;
        peer.set_relayed_via(relay.node_id());
        self.0.relay.counters().relayed_connections_total.inc();
        tracing::debug!(peer = %target, relay = %relay.node_id(), "relayed connection established");
        self.register(peer, reader).await
    }

    /// While this node is private: holds reservations at up to
    /// `relay.reserve_at` directly connected peers that relay, renews them,
    /// replaces lost ones, and publishes the relay record naming them (an
    /// empty record once the node is no longer private).
    async fn maintain_relays(self) {
        let mut shutdown = self.0.shutdown.subscribe();
        let mut published: Vec<NodeId> = Vec::new();
        let mut last_error: Option<String> = None;
        let want = self.0.config.relay.reserve_at;
        let key = macula_wire::dht_key(relay_record_name(self.realm(), &self.0.node_id).as_bytes());
        let mut wait = Duration::from_millis(200);
        loop {
            // Woken at once when peers' observations show this node behind
            // NAT or the dial-back check answers: a node behind NAT reserves
            // as soon as one peer has seen it, before any dial-back.
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.0.reach.changed() => {}
                _ = shutdown.changed() => return,
            }
            if self.is_shutting_down() {
                return;
            }
            if !self.0.reach.wants_relay(self.0.clock.now()) || want == 0 {
                if !published.is_empty() {
                    self.0.tunnel.release_all();
                    let _ = self.0.dht.put(key, Vec::new(), RELAY_RECORD_TTL).await;
                    let _ = self.0.dht.unpublish(key).await;
                    published.clear();
                }
                wait = Duration::from_secs(1);
                continue;
            }
            let mut held = self.0.tunnel.held();
            if held.len() < want {
                let mut candidates: Vec<Peer> = self
                    .peers()
                    .into_iter()
                    .filter(|p| {
                        !p.is_closed()
                            && p.relayed_via().is_none()
                            && p.hello().capabilities.iter().any(|c| c == "relay")
                            && !held.iter().any(|h| h.node_id() == p.node_id())
                    })
                    .collect();
                // Bootstrap (kept) peers first: they are the stable ones.
                candidates.sort_by_key(|p| (!p.is_kept(), p.node_id()));
                for c in candidates {
                    if held.len() >= want {
                        break;
                    }
                    match self.0.tunnel.reserve(&c).await {
                        Ok(ttl) => {
                            c.set_kept(true);
                            tracing::info!(relay = %c.node_id(), ttl_s = ttl.as_secs(), "reserved at relay");
                            held.push(c);
                            last_error = None;
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            if last_error.as_deref() != Some(msg.as_str()) {
                                tracing::warn!(relay = %c.node_id(), error = %msg, "relay reservation failed");
                                last_error = Some(msg);
                            }
                        }
                    }
                }
            }
            let mut ids: Vec<NodeId> = held.iter().map(Peer::node_id).collect();
            ids.sort();
            if ids != published && !held.is_empty() {
                let record = RelayRecord {
                    relays: held
                        .iter()
                        .take(macula_wire::relay::MAX_RELAYS_PER_RECORD)
                        .map(|p| RelayEntry {
                            id: p.node_id(),
                            addrs: vec![p.remote_addr().to_string()],
                        })
                        .collect(),
                };
                match record.encode() {
                    Ok(value) => match self.0.dht.put(key, value, RELAY_RECORD_TTL).await {
                        Ok(_) => {
                            tracing::info!(relays = ?ids, "published relay record");
                            published = ids;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "could not publish the relay record yet")
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "relay record does not encode"),
                }
            }
            wait = if held.len() < want || published.is_empty() {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(5)
            };
        }
    }

    /// Graceful shutdown: tells every peer, closes the endpoint and waits (up
    /// to `SHUTDOWN_GRACE`) for the goodbyes to be delivered.
    pub async fn shutdown(&self) {
        if self.is_shutting_down() {
            return;
        }
        // Take no new requests and withdraw advertisements first, so callers
        // fail over while this node's connections are still up.
        // Withdraw pub/sub interest and RPC advertisements together.
        tokio::join!(
            self.0.rpc.begin_shutdown(SHUTDOWN_GRACE),
            self.0.pubsub.withdraw_all(SHUTDOWN_GRACE),
        );
        // Deliver what was published before shutdown began (bounded), while
        // connections are still up.
        if let Err(e) = self.0.pubsub.flush_acked(SHUTDOWN_GRACE).await {
            tracing::warn!(error = %e, "shutdown: some published messages were not delivered in time");
        }
        // Let requests being served finish and their answers go out.
        if !self.0.rpc.drain(SHUTDOWN_GRACE).await {
            tracing::warn!("shutdown: some RPC requests were still running at the deadline");
        }
        // Keep the routing table and the records held for the next start
        // (after the withdrawals above, so they are what the mesh now has).
        self.0.dht.save_snapshot().await;
        // Stop the Raft groups while the connections are up, so a leader's
        // last heartbeats and answers still go out.
        self.0.raft.shutdown().await;
        // Write the streams' consumer positions and close their stores.
        self.0.streams.shutdown().await;
        // MQTT clients are told, and persistent sessions written.
        if let Some(mqtt) = self.0.mqtt.get() {
            mqtt.shutdown().await;
        }
        if self.0.shutdown.send_replace(true) {
            return;
        }
        let peers = self.peers();
        let goodbyes = peers
            .iter()
            .map(|p| p.disconnect(DisconnectReason::Shutdown, "node shutting down"));
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, futures::future::join_all(goodbyes)).await;
        self.0.tunnel.close();
        self.0.endpoint.close(
            close_code(DisconnectReason::Shutdown),
            b"node shutting down",
        );
        let _ = tokio::time::timeout(SHUTDOWN_DRAIN, self.0.endpoint.wait_idle()).await;
        self.mark_epoch();
        if let Some(audit) = self.0.security.audit.clone() {
            // The final checkpoint, written by the audit thread.
            let _ = tokio::task::spawn_blocking(move || audit.close()).await;
        }
        if let Some(l) = self.0.dir_lock.lock().take() {
            l.release();
        }
        tracing::info!(node_id = %self.0.node_id, "node stopped");
    }

    /// Waits until the node has joined the mesh through a bootstrap peer
    /// (see `DhtHandle::wait_bootstrapped`), or every bootstrap peer has
    /// refused it for good (another realm, version or identity: retrying
    /// cannot help), then `Err` lists each peer with its refusal.
    pub async fn wait_joined(&self) -> Result<(), Vec<(String, String)>> {
        let targets: std::collections::HashSet<String> = self
            .0
            .config
            .bootstrap
            .iter()
            .map(|p| p.to_string())
            .collect();
        let joined = self.0.dht.wait_bootstrapped();
        tokio::pin!(joined);
        loop {
            let changed = self.0.bootstrap_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let refused = self.0.bootstrap_refused.lock();
                if !targets.is_empty() && targets.iter().all(|t| refused.contains_key(t)) {
                    let mut all: Vec<(String, String)> = refused
                        .iter()
                        .map(|(t, r)| (t.clone(), r.clone()))
                        .collect();
                    all.sort();
                    return Err(all);
                }
            }
            tokio::select! {
                r = &mut joined => return r.map_err(|e| vec![(String::new(), e.to_string())]),
                _ = &mut changed => {}
            }
        }
    }

    /// Bootstrap peers that refused this node for good, with why.
    pub fn bootstrap_refusals(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .0
            .bootstrap_refused
            .lock()
            .iter()
            .map(|(t, r)| (t.clone(), r.clone()))
            .collect();
        v.sort();
        v
    }

    /// Records the epoch's high-water mark now (see `clock.rs`).
    fn mark_epoch(&self) {
        if let Err(e) = self.0.epoch.save(self.0.clock.now()) {
            tracing::warn!(error = %e, "could not record the epoch mark");
        }
    }

    /// Keeps the epoch's high-water mark at most `EPOCH_SAVE_INTERVAL` old
    /// until shutdown.
    async fn save_epoch(self) {
        let mut shutdown = self.0.shutdown.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(EPOCH_SAVE_INTERVAL) => self.mark_epoch(),
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// The first `Some` of two futures, or `None` once both gave up.
async fn first_some<A, B>(a: A, b: B) -> Option<Peer>
where
    A: std::future::Future<Output = Option<Peer>>,
    B: std::future::Future<Output = Option<Peer>>,
{
    tokio::pin!(a);
    tokio::pin!(b);
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        tokio::select! {
            r = &mut a, if !a_done => {
                if r.is_some() {
                    return r;
                }
                a_done = true;
            }
            r = &mut b, if !b_done => {
                if r.is_some() {
                    return r;
                }
                b_done = true;
            }
        }
    }
    None
}

/// Whether `conn` was closed by a peer's reachability dial-back.
fn is_dial_back(conn: Option<&quinn::Connection>) -> bool {
    matches!(
        conn.and_then(quinn::Connection::close_reason),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == close_code(DisconnectReason::DialBack)
    )
}

/// Resolves `host:port` (names through the system resolver).
pub async fn resolve(target: &PeerAddr) -> Result<SocketAddr, ConnectError> {
    let text = format!("{}:{}", target.host, target.port);
    let host = target.host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs = tokio::net::lookup_host((host, target.port))
        .await
        .map_err(|e| ConnectError::Resolve {
            target: text.clone(),
            detail: e.to_string(),
        })?;
    addrs.next().ok_or_else(|| ConnectError::Resolve {
        target: text,
        detail: "no addresses".into(),
    })
}
