//! Typed node configuration with production defaults.
//!
//! This is what the runtime consumes. It knows nothing about flags, env vars
//! or TOML (the binary layers those into a `NodeConfig`), so embedding
//! applications and tests build one directly with zero configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use macula_wire::time::Millis;
use macula_wire::{DEFAULT_MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE};

use crate::peer_addr::PeerAddr;
use crate::tls::TlsOptions;

/// Default for `Limits::pubsub_stall_timeout`: a peer whose pub/sub data
/// stream accepts no bytes for this long is cut off (stream reset, queue
/// dropped, `macula_pubsub_peers_cut_off_total`, a warning naming it).
pub const PEER_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// RPC limits (each with a config knob).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcLimits {
    /// Calls this node may have outstanding at once; past it `call` fails
    /// with `Overloaded` at once.
    pub max_inflight_calls: usize,
    /// Default concurrent requests per advertised handler; past it callers
    /// get `Overloaded` (and fail over to another provider).
    pub handler_concurrency: usize,
    /// Calls a provider remembers at once (running, or answered within
    /// `recent_call_keep`) that came on replaceable connections (relayed,
    /// or direct by hole punching), so a caller re-sending one over a new
    /// route after its connection died gets the one execution's answer.
    /// Past it, old answers are given up; with every one still running, a
    /// new call on such a connection is refused `Overloaded` ("the
    /// recent-calls table is full"; `macula_rpc_recent_full_total`).
    pub recent_calls: usize,
    /// Bytes of answers kept for re-sent calls, in all; the oldest go
    /// first, and an answer larger than this is replaced by an error
    /// saying so.
    pub recent_call_bytes: usize,
    /// How long an answer is kept for a re-sent copy of its call.
    pub recent_call_keep: Duration,
}

impl Default for RpcLimits {
    fn default() -> Self {
        let recent = macula_rpc::RecentLimits::default();
        RpcLimits {
            max_inflight_calls: 10_000,
            handler_concurrency: 1024,
            recent_calls: recent.max_calls,
            recent_call_bytes: recent.max_bytes,
            recent_call_keep: recent.keep.to_duration(),
        }
    }
}

/// Default QUIC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default realm: nodes that configure nothing find each other.
pub const DEFAULT_REALM: &str = "default";

/// Where the node's identity comes from.
#[derive(Clone, Debug)]
pub enum IdentitySource {
    /// Load `node.key` from this directory, creating it on first start.
    DataDir(PathBuf),
    /// A fresh in-memory identity, gone when the process exits (tests, demos).
    Ephemeral,
}

/// Smallest accepted flow-control window or send buffer (16 KiB).
pub const MIN_WINDOW: u64 = 16 * 1024;

/// Every limit and timer of the connection layer. Each has a default that a
/// production mesh can run with, and a knob.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest frame body accepted (and announced to peers in HELLO).
    pub max_frame_size: u32,
    /// Connections kept in the pool (clients and full nodes); past this
    /// the least recently used full-node connection is closed to make room,
    /// and when none may be closed new connections are turned away.
    pub max_connections: usize,
    /// Slots of `max_connections` clients can never take, so a gateway full
    /// of clients can still reach the mesh it forwards their traffic into
    /// (at most half of `max_connections`; see `max_clients`).
    pub peer_slots: usize,
    /// A pooled connection with no application traffic for this long is
    /// closed (health pings do not count as traffic).
    pub idle_timeout: Duration,
    /// QUIC keep-alive: keeps NAT bindings open and detects dead peers early.
    pub keep_alive_interval: Duration,
    /// QUIC idle timeout: a peer silent for this long (despite keep-alives)
    /// is considered dead and its connection is dropped.
    pub transport_idle_timeout: Duration,
    /// Interval of application health pings, which also measure RTT.
    pub health_ping_interval: Duration,
    /// Failure detector (full nodes only; see `macula_pool::liveness`): a
    /// full node silent this long (no datagram at all) is sent a probe.
    pub peer_probe_after: Duration,
    /// Failure detector: a full node silent this long is declared down (its
    /// connection closed, every service told `PeerDown::Silent`). Raised on
    /// slow paths to `peer_probe_after` plus eight round trips, capped at
    /// `peer_down_after_max`.
    pub peer_down_after: Duration,
    /// Failure detector: the most the RTT may raise `peer_down_after` to.
    pub peer_down_after_max: Duration,
    /// Deadline for TLS plus the HELLO exchange.
    pub handshake_timeout: Duration,
    /// Deadline for a PONG.
    pub ping_timeout: Duration,
    /// First reconnect delay after a bootstrap peer fails or disconnects
    /// (each delay is drawn from the upper half of its step).
    pub reconnect_backoff_min: Duration,
    /// Cap on the reconnect delay.
    pub reconnect_backoff_max: Duration,
    /// When two nodes dial each other at once, the losing connection stays
    /// usable this long so exchanges already on it can finish.
    pub duplicate_close_grace: Duration,
    /// Concurrent streams (of each direction kind) a full node may open on
    /// one connection. Raised to this after its HELLO; until then, and for
    /// a client always, `max_streams_per_client` applies.
    pub max_streams_per_connection: u32,
    /// Concurrent streams (of each kind) a client, or any peer before its
    /// HELLO, may open. QUIC preallocates bookkeeping for every stream a
    /// peer may open, so this is most of a client connection's size; a
    /// client needs two (its control stream and its pub/sub data stream).
    pub max_streams_per_client: u32,
    /// Bytes a peer may send on one stream ahead of what the node has read
    /// (QUIC stream flow control). Memory is only taken while data waits.
    pub stream_receive_window: u32,
    /// Bytes a peer may send on all streams of one connection ahead of
    /// what the node has read: bounds what one connection can make the
    /// node buffer.
    pub connection_receive_window: u32,
    /// Bytes the node buffers per connection for sending, not yet
    /// acknowledged; a writer waits beyond it.
    pub send_window: u64,
    /// Kernel receive and send buffer of the node's UDP socket (SO_RCVBUF,
    /// SO_SNDBUF). Many connections handshaking at once overflow a small
    /// one (packets dropped, handshakes retried after a second). The kernel
    /// caps it at `net.core.rmem_max` / `wmem_max`.
    pub socket_buffer: usize,
    /// A peer whose pub/sub data stream accepts no bytes for this long is
    /// cut off: the stream is reset and what was queued for it dropped
    /// (`macula_pubsub_peers_cut_off_total`, a warning naming the peer).
    pub pubsub_stall_timeout: Duration,
    /// The DHT's routing table and records are written to the data
    /// directory this often (and at a clean shutdown), and read back at
    /// start so a restarted node serves at once (`dht_snapshot.rs`); zero:
    /// only at a clean shutdown. Nodes without a data directory keep none.
    pub dht_snapshot_interval: Duration,
    /// A DHT request (ping, find, store) unanswered this long is counted
    /// lost (`macula_dht_request_timeouts_total`) and sent again or to
    /// another contact; a contact that misses repeatedly is replaced.
    pub dht_request_timeout: Duration,
}

impl Limits {
    /// The failure detector's timers, as the pure detector takes them.
    pub fn liveness(&self) -> macula_pool::LivenessConfig {
        macula_pool::LivenessConfig {
            probe_after: Millis::from_duration(self.peer_probe_after),
            down_after: Millis::from_duration(self.peer_down_after),
            down_after_max: Millis::from_duration(self.peer_down_after_max),
            ..macula_pool::LivenessConfig::default()
        }
    }

    /// Client connections the node holds at most: `max_connections` less
    /// `peer_slots` (capped at half of `max_connections`).
    pub fn max_clients(&self) -> usize {
        self.max_connections - self.peer_slots.min(self.max_connections / 2)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_connections: 1000,
            peer_slots: 64,
            idle_timeout: Duration::from_secs(300),
            keep_alive_interval: Duration::from_secs(10),
            transport_idle_timeout: Duration::from_secs(30),
            health_ping_interval: Duration::from_secs(30),
            peer_probe_after: macula_pool::liveness::PROBE_AFTER.to_duration(),
            peer_down_after: macula_pool::liveness::DOWN_AFTER.to_duration(),
            peer_down_after_max: macula_pool::liveness::DOWN_AFTER_MAX.to_duration(),
            handshake_timeout: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(10),
            reconnect_backoff_min: Duration::from_millis(250),
            reconnect_backoff_max: Duration::from_secs(30),
            duplicate_close_grace: Duration::from_secs(2),
            max_streams_per_connection: 256,
            max_streams_per_client: 4,
            stream_receive_window: 1 << 20,
            connection_receive_window: 8 << 20,
            send_window: 8 << 20,
            socket_buffer: 4 << 20,
            pubsub_stall_timeout: PEER_STALL_TIMEOUT,
            dht_snapshot_interval: DEFAULT_DHT_SNAPSHOT_INTERVAL,
            dht_request_timeout: DEFAULT_DHT_REQUEST_TIMEOUT,
        }
    }
}

/// Default [`Limits::dht_request_timeout`] (`macula_dht`'s own default).
pub const DEFAULT_DHT_REQUEST_TIMEOUT: Duration = macula_dht::config::REQUEST_TIMEOUT.to_duration();

/// Default [`Limits::dht_snapshot_interval`]: a node killed without a
/// clean shutdown restarts with a table at most this old.
pub const DEFAULT_DHT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(30);

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("invalid value {value:?} for {key}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// How the node decides whether peers can dial it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReachabilityMode {
    /// Ask peers to dial back (AutoNAT-style) and act on the answer.
    #[default]
    Auto,
    /// Behave as a node behind NAT without asking: reserve at relays,
    /// publish a relay record, advertise no direct address, and accept no
    /// direct inbound connection (as behind a symmetric NAT: only what
    /// arrives through a relay gets in).
    Private,
}

/// The relay this node runs for peers that cannot be dialed, and how many
/// relays it reserves at when it is such a peer itself.
#[derive(Clone, Debug)]
pub struct RelayLimits {
    /// Relay for others at all (only while this node is not private).
    pub enabled: bool,
    /// Relayed sessions at once; more are refused (`session_limit`).
    pub max_sessions: usize,
    /// Reservations held at once; more are refused (`reservation_limit`).
    pub max_reservations: usize,
    /// Bytes per second per session (both directions together); a session
    /// over it is throttled (the relay stops reading). 0: unlimited.
    pub bytes_per_second: u64,
    /// Burst allowance of the per-session token bucket, bytes.
    pub burst_bytes: u64,
    /// A session with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Lifetime granted to a reservation (renewed by the holder at 75%).
    pub reservation_ttl: Duration,
    /// When private: relays to reserve at (and name in the relay record).
    pub reserve_at: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            enabled: true,
            max_sessions: 128,
            max_reservations: 128,
            bytes_per_second: 1 << 20,
            burst_bytes: 256 * 1024,
            idle_timeout: Duration::from_secs(60),
            reservation_ttl: Duration::from_secs(3600),
            reserve_at: 2,
        }
    }
}

/// Limits and timings of the node's Raft groups (`raft.rs`).
#[derive(Debug, Clone)]
pub struct RaftLimits {
    /// Groups one node may run at once.
    pub max_groups: usize,
    /// How long a write, read or membership change may take, forwarding
    /// and leader changes included, before the caller gets a timeout.
    pub request_timeout: Duration,
    /// Leader heartbeat period.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time in
    /// `[election_min, 2 * election_min)` starts an election.
    pub election_min: Duration,
    /// A snapshot is taken after this many log entries since the last one
    /// (then the log before it is purged).
    pub snapshot_every: u64,
    /// Log entries kept behind the last snapshot (a follower that is at
    /// most this far behind catches up from the log instead of a snapshot).
    pub log_kept_after_snapshot: u64,
    /// Entries a group's proposer has on their way (proposed, not yet
    /// committed) at most; writes queue meanwhile and become the next
    /// batch entry (`macula_raft_proposer_full_total` counts the waits).
    pub proposals_in_flight: usize,
}

/// Default [`RaftLimits::proposals_in_flight`].
pub const DEFAULT_PROPOSALS_IN_FLIGHT: usize = 8;

impl Default for RaftLimits {
    fn default() -> Self {
        RaftLimits {
            max_groups: 64,
            request_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(200),
            snapshot_every: 10_000,
            log_kept_after_snapshot: 1_000,
            proposals_in_flight: DEFAULT_PROPOSALS_IN_FLIGHT,
        }
    }
}

/// Limits of the durable streams a node hosts (`stream/`).
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Streams one node hosts at most.
    pub max_streams: usize,
    /// redb page cache per stream, in bytes.
    pub cache_bytes: usize,
    /// Messages one pull returns at most.
    pub max_batch: usize,
    /// How long one pull may wait at most.
    pub max_wait: Duration,
    /// Durable consumers' positions are written at most this often.
    pub flush_every: Duration,
    /// The timer task runs at least this often.
    pub tick: Duration,
    /// Bound of each stream store's writer queue: bytes of writes queued
    /// and not committed to redb yet (record bytes plus 128 per write). A
    /// publish that finds it full waits for room (`stream/store.rs`,
    /// "Backpressure"; `macula_stream_write_queue_waits_total`).
    pub write_queue_bytes: u64,
    /// How long a publish waits for room in a full writer queue before it
    /// is refused (`StoreError::Busy`, error kind `busy`;
    /// `macula_stream_write_queue_refused_total`).
    pub write_queue_timeout: Duration,
}

/// Default [`StreamLimits::max_streams`].
pub const DEFAULT_MAX_STREAMS: usize = 64;
/// Default [`StreamLimits::cache_bytes`] (4 MiB).
pub const DEFAULT_CACHE_BYTES: usize = 4 << 20;
/// Default [`StreamLimits::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 10_000;
/// Default [`StreamLimits::max_wait`].
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_streams: DEFAULT_MAX_STREAMS,
            cache_bytes: DEFAULT_CACHE_BYTES,
            max_batch: DEFAULT_MAX_BATCH,
            max_wait: DEFAULT_MAX_WAIT,
            flush_every: Duration::from_millis(200),
            tick: Duration::from_millis(250),
            write_queue_bytes: crate::stream::store::DEFAULT_QUEUE_BYTES,
            write_queue_timeout: crate::stream::store::DEFAULT_QUEUE_TIMEOUT,
        }
    }
}

/// Configuration of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// UDP address of the node's one QUIC socket (both directions).
    pub listen: SocketAddr,
    /// Realm; peers in another realm are refused.
    pub realm: String,
    /// Peers to join through; empty means this is a first node.
    pub bootstrap: Vec<PeerAddr>,
    pub identity: IdentitySource,
    pub tls: TlsOptions,
    pub limits: Limits,
    /// Features announced in HELLO.
    pub capabilities: Vec<String>,
    /// RPC limits (in-flight calls, handler concurrency).
    pub rpc: RpcLimits,
    /// Pub/sub limits (subscription queue capacity and bytes, topic and
    /// pattern sizes, match cache, publishers tracked).
    pub pubsub: macula_pubsub::Limits,
    /// Relay limits (as a relay) and reservations (as a private node).
    pub relay: RelayLimits,
    /// Raft groups: how many, timings, request timeout.
    pub raft: RaftLimits,
    /// Durable streams: how many, caches, pulls.
    pub streams: StreamLimits,
    /// Whether to detect reachability or assume this node is private.
    pub reachability: ReachabilityMode,
    /// NAT detection from peers' observed addresses (`nat.rs`): how many
    /// observers are remembered and for how long.
    pub nat: crate::nat::NatLimits,
    /// Trust on first use of configured addresses in an open realm
    /// (`trust.rs`): on by default for nodes with a data directory.
    pub trust: TrustLimits,
    /// The realm's authority and this node's grant (issue 18): with an
    /// authority, only peers presenting a valid grant for the node ID they
    /// proved are admitted. `None`: an open realm, as before.
    pub admission: Option<Admission>,
    /// Who may use the admin API (`admin/auth.rs`): the token file, the
    /// signed-request window, replay cache and failure rate limit.
    pub admin_auth: AdminAuthConfig,
    /// The audit trail in `<data dir>/audit/` (`audit_log.rs`): rotation,
    /// checkpoints, queue.
    pub audit: AuditLimits,
    /// The MQTT bridge (off unless `mqtt.listen` is set).
    pub mqtt: MqttConfig,
    /// The live dashboard (`/dashboard`, `admin/dashboard.rs`) and the node
    /// status service that tells it about peers (`status/`).
    pub dashboard: DashboardLimits,
}

/// The MQTT bridge's limits (`macula_mqtt::Limits`) and the millisecond
/// type of its session expiry.
pub use macula_mqtt::{Limits as MqttLimits, Millis as MqttMillis};

/// The MQTT bridge's settings (`mqtt.rs`; docs/MQTT.md).
#[derive(Debug, Clone, Default)]
pub struct MqttConfig {
    /// TCP address of the MQTT listener; `None`: no listener (the default).
    pub listen: Option<SocketAddr>,
    /// TLS on the listener: the certificate chain and key (PEM); `None`:
    /// plain TCP.
    pub tls: Option<MqttTls>,
    /// `username:password` pairs accepted in a realm without an authority;
    /// empty: any client is accepted (anonymous). In a realm with an
    /// authority the password is an API key instead (docs/MQTT.md).
    pub users: Vec<(String, String)>,
    /// Clients, packet size, inflight window, queue, subscriptions,
    /// retained messages, session expiry.
    pub limits: MqttLimits,
}

/// The MQTT listener's certificate: the node's own (self-signed, for its
/// node ID) or configured files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttTls {
    /// The node's self-signed certificate (clients must pin it or skip
    /// verification).
    NodeCertificate,
    /// A certificate chain and its private key, PEM files.
    Files {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
    },
}

/// Limits of the live dashboard and of the node status service
/// (STATUS_REQUEST / STATUS_REPORT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DashboardLimits {
    /// Dashboard event streams (`GET /admin/dashboard/events`) open at
    /// once; one more is answered 503 `dashboard.too_many_streams`
    /// (`macula_dashboard_streams_refused_total`).
    pub max_streams: usize,
    /// Between two snapshots of a stream, and between two rounds of
    /// STATUS_REQUESTs to peers while a dashboard is open (rounds: never
    /// under `status::MIN_ROUND_INTERVAL`, 250 ms).
    pub interval: Duration,
    /// A stream ends after this long; the page opens another.
    pub stream_max_duration: Duration,
    /// Peers asked per round (the others in later rounds, in turn); 0:
    /// none (the dashboard shows this node only).
    pub max_peers: usize,
    /// Links listed in this node's STATUS_REPORT (more are counted in
    /// `links_omitted`); also capped by the asker's frame limit.
    pub max_links: usize,
    /// One peer's STATUS_REQUESTs are answered at most once per this
    /// long; faster ones are refused `rate_limited`
    /// (`macula_status_requests_received_total{outcome="rate_limited"}`).
    pub min_answer_interval: Duration,
    /// A peer's report is dropped from the view this long after it
    /// arrived without a newer one; a request unanswered this long is
    /// counted as unanswered. Peers are asked only while a dashboard was
    /// read within this long.
    pub stale_after: Duration,
    /// Rates are computed over the reports of this last stretch of time.
    pub rate_window: Duration,
}

/// Default [`DashboardLimits::max_streams`].
pub const DEFAULT_DASHBOARD_MAX_STREAMS: usize = 8;
/// Default [`DashboardLimits::interval`].
pub const DEFAULT_DASHBOARD_INTERVAL: Duration = Duration::from_secs(1);
/// Default [`DashboardLimits::stream_max_duration`].
pub const DEFAULT_DASHBOARD_STREAM_MAX: Duration = Duration::from_secs(600);
/// Default [`DashboardLimits::max_peers`].
pub const DEFAULT_DASHBOARD_MAX_PEERS: usize = 64;
/// Default [`DashboardLimits::max_links`].
pub const DEFAULT_STATUS_MAX_LINKS: usize = 256;
/// Default [`DashboardLimits::min_answer_interval`].
pub const DEFAULT_STATUS_MIN_ANSWER_INTERVAL: Duration = Duration::from_millis(250);
/// Default [`DashboardLimits::stale_after`].
pub const DEFAULT_DASHBOARD_STALE_AFTER: Duration = Duration::from_secs(10);
/// Default [`DashboardLimits::rate_window`].
pub const DEFAULT_DASHBOARD_RATE_WINDOW: Duration = Duration::from_secs(10);

impl Default for DashboardLimits {
    fn default() -> Self {
        DashboardLimits {
            max_streams: DEFAULT_DASHBOARD_MAX_STREAMS,
            interval: DEFAULT_DASHBOARD_INTERVAL,
            stream_max_duration: DEFAULT_DASHBOARD_STREAM_MAX,
            max_peers: DEFAULT_DASHBOARD_MAX_PEERS,
            max_links: DEFAULT_STATUS_MAX_LINKS,
            min_answer_interval: DEFAULT_STATUS_MIN_ANSWER_INTERVAL,
            stale_after: DEFAULT_DASHBOARD_STALE_AFTER,
            rate_window: DEFAULT_DASHBOARD_RATE_WINDOW,
        }
    }
}

impl DashboardLimits {
    /// Checks every limit; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = |key: &'static str, d: Duration| {
            if d.is_zero() {
                Err((key, "must be more than zero".to_string()))
            } else {
                Ok(())
            }
        };
        if self.max_streams == 0 {
            return Err(("dashboard_max_streams", "must be at least 1".into()));
        }
        if self.max_links > macula_wire::status::MAX_STATUS_LINKS {
            return Err((
                "dashboard_max_links",
                format!("at most {}", macula_wire::status::MAX_STATUS_LINKS),
            ));
        }
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(4) {
            return Err((
                "dashboard_interval",
                "must be 100ms..4s (the admin server closes a connection that gets no response \
                 byte for 5 s, and a stream is one long response)"
                    .into(),
            ));
        }
        positive("dashboard_stream_max_duration", self.stream_max_duration)?;
        positive("dashboard_stale_after", self.stale_after)?;
        positive("dashboard_rate_window", self.rate_window)?;
        if self.rate_window < self.interval {
            return Err((
                "dashboard_rate_window",
                "must be at least dashboard_interval (rates need two reports)".into(),
            ));
        }
        Ok(())
    }
}

/// Settings of the admin API's authentication (`admin/auth.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminAuthConfig {
    /// The file holding the admin token (hex). `None`: `<data dir>/admin-token`,
    /// created at first start (an ephemeral node then has no token, and
    /// only admin grants are accepted).
    pub token_file: Option<std::path::PathBuf>,
    /// A signed request (`Macula-Grant`) must be stamped within this long
    /// of the node's clock, either way.
    pub request_window: Duration,
    /// Signatures remembered to refuse replays (within the window); when
    /// full, new signed requests are refused (`replayed`) until entries expire.
    pub replay_cache_max: usize,
    /// Failed attempts one source address may make per `failure_window`
    /// before it is answered 429.
    pub max_failures: u32,
    /// The window of `max_failures`.
    pub failure_window: Duration,
    /// Source addresses whose failures are tracked at once (the oldest
    /// window is forgotten to make room).
    pub failure_sources_max: usize,
}

/// Default [`AdminAuthConfig::request_window`].
pub const DEFAULT_ADMIN_REQUEST_WINDOW: Duration = Duration::from_secs(30);
/// Default [`AdminAuthConfig::replay_cache_max`].
pub const DEFAULT_ADMIN_REPLAY_CACHE: usize = 16 * 1024;
/// Default [`AdminAuthConfig::max_failures`].
pub const DEFAULT_ADMIN_MAX_FAILURES: u32 = 5;
/// Default [`AdminAuthConfig::failure_window`].
pub const DEFAULT_ADMIN_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Default [`AdminAuthConfig::failure_sources_max`].
pub const DEFAULT_ADMIN_FAILURE_SOURCES: usize = 4096;

impl Default for AdminAuthConfig {
    fn default() -> Self {
        AdminAuthConfig {
            token_file: None,
            request_window: DEFAULT_ADMIN_REQUEST_WINDOW,
            replay_cache_max: DEFAULT_ADMIN_REPLAY_CACHE,
            max_failures: DEFAULT_ADMIN_MAX_FAILURES,
            failure_window: DEFAULT_ADMIN_FAILURE_WINDOW,
            failure_sources_max: DEFAULT_ADMIN_FAILURE_SOURCES,
        }
    }
}

/// Limits of the audit trail file (`audit_log.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditLimits {
    /// `audit.log` is rotated once it is larger than this.
    pub max_bytes: u64,
    /// Files kept: `audit.log` and `audit.log.1 ..` up to this many in all.
    pub files: usize,
    /// A signed checkpoint after this many entries...
    pub checkpoint_every: u64,
    /// ...or this long after the last one, whichever comes first (and at close).
    pub checkpoint_interval: Duration,
    /// Entries waiting for the writer thread; more are counted as dropped
    /// and recorded as one `audit_dropped` entry once there is room.
    pub queue: usize,
}

/// Default [`AuditLimits::max_bytes`] (16 MiB).
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 16 << 20;
/// Default [`AuditLimits::files`].
pub const DEFAULT_AUDIT_FILES: usize = 8;
/// Default [`AuditLimits::checkpoint_every`].
pub const DEFAULT_AUDIT_CHECKPOINT_EVERY: u64 = 1000;
/// Default [`AuditLimits::checkpoint_interval`].
pub const DEFAULT_AUDIT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);
/// Default [`AuditLimits::queue`].
pub const DEFAULT_AUDIT_QUEUE: usize = 4096;

impl Default for AuditLimits {
    fn default() -> Self {
        AuditLimits {
            max_bytes: DEFAULT_AUDIT_MAX_BYTES,
            files: DEFAULT_AUDIT_FILES,
            checkpoint_every: DEFAULT_AUDIT_CHECKPOINT_EVERY,
            checkpoint_interval: DEFAULT_AUDIT_CHECKPOINT_INTERVAL,
            queue: DEFAULT_AUDIT_QUEUE,
        }
    }
}

/// Default [`TrustLimits::max_pins`].
pub const DEFAULT_MAX_PINS: usize = 4096;

/// Trust on first use (`trust.rs`): on or off, and how many pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustLimits {
    pub enabled: bool,
    pub max_pins: usize,
}

impl Default for TrustLimits {
    fn default() -> Self {
        TrustLimits {
            enabled: true,
            max_pins: DEFAULT_MAX_PINS,
        }
    }
}

/// Admission to a realm that has an authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The realm authority's public key.
    pub authority: macula_auth::Key,
    /// This node's own grant (`macula_auth::Grant` bytes), sent in HELLO;
    /// peers of the realm refuse a node without one.
    pub grant: Option<Vec<u8>>,
    /// Clock difference tolerated at both ends of a grant's validity.
    pub clock_skew: Duration,
    /// A signed revocation list to start with (`macula_auth::RevocationList`
    /// bytes); a newer one from the data directory or a peer replaces it.
    pub revocations: Option<Vec<u8>>,
    /// API keys this node accepts from lightweight clients instead of a
    /// grant (`crate::apikey`; the `--api-keys` file): `None`, none.
    pub api_keys: Option<crate::apikey::ApiKeyStore>,
    /// Limits on failed API-key attempts.
    pub api_key_limits: crate::apikey::ApiKeyLimits,
}

/// Default [`Admission::clock_skew`].
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

impl Admission {
    /// An authority and this node's grant, with the default clock skew.
    pub fn new(authority: macula_auth::Key, grant: Option<Vec<u8>>) -> Admission {
        Admission {
            authority,
            grant,
            clock_skew: DEFAULT_CLOCK_SKEW,
            revocations: None,
            api_keys: None,
            api_key_limits: crate::apikey::ApiKeyLimits::default(),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            realm: DEFAULT_REALM.to_string(),
            bootstrap: Vec::new(),
            identity: IdentitySource::Ephemeral,
            tls: TlsOptions::default(),
            limits: Limits::default(),
            capabilities: Vec::new(),
            rpc: RpcLimits::default(),
            pubsub: macula_pubsub::Limits::default(),
            relay: RelayLimits::default(),
            raft: RaftLimits::default(),
            streams: StreamLimits::default(),
            reachability: ReachabilityMode::Auto,
            nat: crate::nat::NatLimits::default(),
            trust: TrustLimits::default(),
            admission: None,
            admin_auth: AdminAuthConfig::default(),
            audit: AuditLimits::default(),
            mqtt: MqttConfig::default(),
            dashboard: DashboardLimits::default(),
        }
    }
}

/// Checks a realm name: 1..=253 bytes of dot-separated DNS-style labels
/// (`a-z`, `0-9`, `-`; no empty label; no label starting or ending with `-`).
pub fn validate_realm(realm: &str) -> Result<(), String> {
    if realm.is_empty() || realm.len() > macula_wire::MAX_REALM_LEN {
        return Err(format!(
            "must be 1 to {} characters",
            macula_wire::MAX_REALM_LEN
        ));
    }
    for label in realm.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots, or a leading/trailing dot)".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "character {c:?} not allowed (use a-z, 0-9, '-' and '.')"
            ));
        }
    }
    Ok(())
}

impl NodeConfig {
    /// Checks every value; the error names the setting and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, value: String, reason: String| ConfigError::Invalid {
            key,
            value,
            reason,
        };
        validate_realm(&self.realm).map_err(|r| invalid("realm", self.realm.clone(), r))?;
        self.dashboard
            .validate()
            .map_err(|(key, r)| invalid(key, format!("{:?}", self.dashboard), r))?;
        if let Some(a) = &self.admission {
            a.api_key_limits
                .validate()
                .map_err(|r| invalid("api_key_limits", format!("{:?}", a.api_key_limits), r))?;
        }
        if self.rpc.recent_calls == 0 {
            return Err(invalid(
                "rpc.recent_calls",
                "0".into(),
                "must be at least 1 (calls on relayed or hole-punched connections are remembered so a re-sent call runs once)".into(),
            ));
        }
        let l = &self.limits;
        if !(MIN_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&l.max_frame_size) {
            return Err(invalid(
                "max_frame_size",
                l.max_frame_size.to_string(),
                format!("must be between {MIN_MAX_FRAME_SIZE} and {MAX_MAX_FRAME_SIZE} bytes"),
            ));
        }
        if l.max_connections == 0 {
            return Err(invalid(
                "max_connections",
                "0".into(),
                "must be at least 1".into(),
            ));
        }
        if l.keep_alive_interval >= l.transport_idle_timeout {
            return Err(invalid(
                "keep_alive_interval",
                format!("{:?}", l.keep_alive_interval),
                format!(
                    "must be shorter than the transport idle timeout ({:?})",
                    l.transport_idle_timeout
                ),
            ));
        }
        if !(l.peer_probe_after < l.peer_down_after
            && l.peer_down_after <= l.peer_down_after_max
            && l.peer_down_after_max < l.transport_idle_timeout)
        {
            return Err(invalid(
                "peer_down_after",
                format!("{:?}", l.peer_down_after),
                format!(
                    "must be longer than peer_probe_after ({:?}), at most peer_down_after_max ({:?}), \
                     which must be shorter than the transport idle timeout ({:?})",
                    l.peer_probe_after, l.peer_down_after_max, l.transport_idle_timeout
                ),
            ));
        }
        for (key, d) in [
            ("idle_timeout", l.idle_timeout),
            ("peer_probe_after", l.peer_probe_after),
            ("handshake_timeout", l.handshake_timeout),
            ("ping_timeout", l.ping_timeout),
            ("health_ping_interval", l.health_ping_interval),
            ("reconnect_backoff_min", l.reconnect_backoff_min),
            ("pubsub_stall_timeout", l.pubsub_stall_timeout),
            ("relay_idle_timeout", self.relay.idle_timeout),
            ("relay_reservation_ttl", self.relay.reservation_ttl),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "0".into(), "must be greater than zero".into()));
            }
        }
        if self.relay.bytes_per_second > 0 && self.relay.burst_bytes < 2048 {
            return Err(invalid(
                "relay_burst_bytes",
                self.relay.burst_bytes.to_string(),
                "must be at least 2048 bytes (one inner packet with its prefix)".into(),
            ));
        }
        if !(2..=l.max_streams_per_connection).contains(&l.max_streams_per_client) {
            return Err(invalid(
                "max_streams_per_client",
                l.max_streams_per_client.to_string(),
                format!(
                    "must be from 2 (a client's control and data streams) to max_streams_per_connection ({})",
                    l.max_streams_per_connection
                ),
            ));
        }
        for (key, v) in [
            ("stream_receive_window", u64::from(l.stream_receive_window)),
            (
                "connection_receive_window",
                u64::from(l.connection_receive_window),
            ),
            ("send_window", l.send_window),
        ] {
            if v < MIN_WINDOW {
                return Err(invalid(
                    key,
                    v.to_string(),
                    format!("must be at least {MIN_WINDOW} bytes"),
                ));
            }
        }
        if l.connection_receive_window < l.stream_receive_window {
            return Err(invalid(
                "connection_receive_window",
                l.connection_receive_window.to_string(),
                format!(
                    "must not be below stream_receive_window ({})",
                    l.stream_receive_window
                ),
            ));
        }
        if l.reconnect_backoff_max < l.reconnect_backoff_min {
            return Err(invalid(
                "reconnect_backoff_max",
                format!("{:?}", l.reconnect_backoff_max),
                "must not be below reconnect_backoff_min".into(),
            ));
        }
        let a = &self.audit;
        if a.max_bytes < 4096 {
            return Err(invalid(
                "audit_max_bytes",
                a.max_bytes.to_string(),
                "must be at least 4096 bytes".into(),
            ));
        }
        for (key, value) in [
            ("audit_files", a.files as u64),
            ("audit_queue", a.queue as u64),
            ("audit_checkpoint_every", a.checkpoint_every),
        ] {
            if value == 0 {
                return Err(invalid(key, "0".into(), "must be at least 1".into()));
            }
        }
        if a.checkpoint_interval.is_zero() {
            return Err(invalid(
                "audit_checkpoint_interval",
                "0s".into(),
                "must be longer than zero".into(),
            ));
        }
        let q = &self.mqtt.limits;
        for (key, value) in [
            ("mqtt_max_clients", q.max_clients as u64),
            ("mqtt_max_sessions", q.max_sessions as u64),
            ("mqtt_max_packet_size", u64::from(q.max_packet_size)),
            ("mqtt_max_inflight", u64::from(q.max_inflight)),
            ("mqtt_queue_len", q.queue_len as u64),
            ("mqtt_max_subscriptions", q.max_subscriptions as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "0".into(), "must be at least 1".into()));
            }
        }
        if q.max_sessions < q.max_clients {
            return Err(invalid(
                "mqtt_max_sessions",
                q.max_sessions.to_string(),
                format!("must not be below mqtt_max_clients ({})", q.max_clients),
            ));
        }
        let m = &self.admin_auth;
        for (key, window) in [
            ("admin_request_window", m.request_window),
            ("admin_failure_window", m.failure_window),
        ] {
            if window.is_zero() {
                return Err(invalid(key, "0s".into(), "must be longer than zero".into()));
            }
        }
        for (key, value) in [
            ("admin_max_failures", m.max_failures as usize),
            ("admin_replay_cache", m.replay_cache_max),
            ("admin_failure_sources", m.failure_sources_max),
        ] {
            if value == 0 {
                return Err(invalid(key, "0".into(), "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn audit_and_admin_limits_are_checked_by_name() {
        let mut c = NodeConfig::default();
        c.audit.files = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("audit_files"));
        let mut c = NodeConfig::default();
        c.admin_auth.replay_cache_max = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("admin_replay_cache"));
        let mut c = NodeConfig::default();
        c.admin_auth.request_window = Duration::ZERO;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("admin_request_window"));
    }

    #[test]
    fn dashboard_limits_are_checked_by_name() {
        let mut c = NodeConfig::default();
        c.dashboard.max_streams = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("dashboard_max_streams"));
        let mut c = NodeConfig::default();
        c.dashboard.rate_window = Duration::from_millis(10);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("dashboard_rate_window"));
    }

    #[test]
    fn realm_rules() {
        for ok in ["default", "io.example.shop", "a-b.c1", "x"] {
            assert!(validate_realm(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "A",
            "a_b",
            "a b",
            &"a".repeat(254),
        ] {
            assert!(validate_realm(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_key_and_value() {
        let mut c = NodeConfig::default();
        c.limits.max_frame_size = 10;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_frame_size") && e.contains("\"10\""), "{e}");
    }
}
