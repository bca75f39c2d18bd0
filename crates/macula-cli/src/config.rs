//! The daemon's layered configuration: command-line flags, then `MACULA_*`
//! environment variables, then an optional TOML file, then defaults.
//!
//! [`resolve`] turns [`NodeArgs`] (the flags of `macula start`) plus an
//! environment lookup into validated [`Settings`]. Every error names the key
//! as the user wrote it (`--listen`, `MACULA_REALM`, `` `limits.max_frame_size`
//! in FILE``) and the value.
//!
//! This module must not start anything, bind sockets, read TLS files or touch
//! the process environment: the environment comes in through a closure so
//! tests stay hermetic. The only I/O is reading the config file, and only
//! when one is named (`--config` / `MACULA_CONFIG`): zero config stays zero
//! config.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use macula::config::ReachabilityMode;
use macula::{NodeId, PeerAddr};
use serde::Deserialize;

// ---------------------------------------------------------------------------
// Defaults and bounds
// ---------------------------------------------------------------------------

/// Default QUIC listen address.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 4433));
/// Default realm.
pub const DEFAULT_REALM: &str = "default";
/// Default admin HTTP address (loopback only).
pub const DEFAULT_HTTP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Default TLS mode: self-certifying node identities.
pub const DEFAULT_TLS_MODE: TlsModeSetting = TlsModeSetting::SelfCertifying;
/// Default maximum frame body size (1 MiB).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = macula::config::DEFAULT_MAX_FRAME_SIZE;
/// Smallest accepted `max_frame_size` (1 KiB).
pub const MIN_MAX_FRAME_SIZE: u32 = macula::config::MIN_MAX_FRAME_SIZE;
/// Largest accepted `max_frame_size` (16 MiB).
pub const MAX_MAX_FRAME_SIZE: u32 = macula::config::MAX_MAX_FRAME_SIZE;
/// Default maximum number of pooled connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// Smallest accepted `max_connections`.
pub const MIN_MAX_CONNECTIONS: usize = 1;
/// Largest accepted `max_connections`.
pub const MAX_MAX_CONNECTIONS: usize = 100_000;
/// Default idle timeout of a pooled connection (5 minutes).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Shortest accepted idle timeout.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest accepted idle timeout (one day; keeps deadline arithmetic far from overflow).
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Default events queued per subscription before the oldest are dropped.
pub const DEFAULT_PUBSUB_QUEUE_CAPACITY: usize = macula::config::DEFAULT_PUBSUB_QUEUE_CAPACITY;
/// Accepted `pubsub_queue_capacity` range.
pub const PUBSUB_QUEUE_CAPACITY_RANGE: (usize, usize) = (16, 10_000_000);
/// Default payload bytes queued per subscription before the oldest are
/// dropped (64 MiB).
pub const DEFAULT_PUBSUB_QUEUE_BYTES: usize = macula::config::DEFAULT_PUBSUB_QUEUE_BYTES;
/// Accepted `pubsub_queue_bytes` range: 64 KiB to 16 GiB.
pub const PUBSUB_QUEUE_BYTES_RANGE: (u64, u64) = (64 << 10, 16 << 30);
/// Default messages queued for one remote node before a publish waits or
/// drops.
pub const DEFAULT_PUBSUB_PEER_QUEUE_CAPACITY: usize =
    macula::config::DEFAULT_PUBSUB_PEER_QUEUE_CAPACITY;
/// Accepted `pubsub_peer_queue_capacity` range.
pub const PUBSUB_PEER_QUEUE_CAPACITY_RANGE: (usize, usize) = (16, 10_000_000);
/// Default payload bytes queued for one remote node before a publish waits
/// or drops (32 MiB).
pub const DEFAULT_PUBSUB_PEER_QUEUE_BYTES: usize = macula::config::DEFAULT_PUBSUB_PEER_QUEUE_BYTES;
/// Accepted `pubsub_peer_queue_bytes` range: 64 KiB to 16 GiB.
pub const PUBSUB_PEER_QUEUE_BYTES_RANGE: (u64, u64) = (64 << 10, 16 << 30);
/// Default time a peer's pub/sub data stream may accept nothing before the
/// peer is cut off.
pub const DEFAULT_PUBSUB_STALL_TIMEOUT: Duration = macula::config::DEFAULT_PUBSUB_STALL_TIMEOUT;
/// Accepted `pubsub_stall_timeout` range.
pub const PUBSUB_STALL_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
/// Default silence after which the failure detector declares a full node
/// down (on a fast path; slow paths get more).
pub const DEFAULT_PEER_DOWN_AFTER: Duration = Duration::from_secs(2);
/// Accepted `peer_down_after` range: at least two probes (500 ms apart),
/// below the transport idle timeout (30 s).
pub const PEER_DOWN_AFTER_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(20));
/// Accepted `relay_max_sessions` and `relay_max_reservations` range.
pub const RELAY_COUNT_RANGE: (usize, usize) = (1, 100_000);
/// Accepted `relay_idle_timeout` range.
pub const RELAY_IDLE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// Largest `relay_bytes_per_second` (1 GiB/s; 0 means unlimited).
pub const MAX_RELAY_BYTES_PER_SECOND: u64 = 1 << 30;
/// Accepted range of the QUIC flow-control windows and send buffer
/// (`stream_receive_window`, `connection_receive_window`, `send_window`):
/// 16 KiB to 1 GiB.
pub const WINDOW_RANGE: (u64, u64) = (macula::config::MIN_WINDOW, 1 << 30);
/// Accepted `socket_buffer` range: 64 KiB to 256 MiB (the kernel may cap it
/// lower: net.core.rmem_max).
pub const SOCKET_BUFFER_RANGE: (u64, u64) = (64 << 10, 256 << 20);
/// Accepted `peer_slots` range (the node uses at most half of
/// `max_connections`).
pub const PEER_SLOTS_RANGE: (usize, usize) = (0, 100_000);
/// Accepted `max_streams_per_client` range.
pub const CLIENT_STREAMS_RANGE: (usize, usize) = (2, 256);
/// Longest Raft group name (names are `[A-Za-z0-9._-]`, not starting with
/// `.`: they name files in the data directory).
pub const MAX_RAFT_GROUP_NAME_LEN: usize = macula::raft::MAX_GROUP_NAME_LEN;
/// Accepted `raft_timeout` range.
pub const RAFT_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));
/// Accepted `raft_max_groups` range.
pub const RAFT_MAX_GROUPS_RANGE: (usize, usize) = (1, 4096);
/// Accepted `raft_election_timeout` range (the heartbeat is a quarter of it).
pub const RAFT_ELECTION_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));
/// Default log format.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// Data directory used when the platform has no user data directory.
pub const FALLBACK_DATA_DIR: &str = "./.macula";
/// Longest realm name.
pub const MAX_REALM_LEN: usize = macula::names::MAX_REALM_LEN;

/// Default data directory: the platform's user data directory joined with
/// `macula` (e.g. `~/.local/share/macula`), or [`FALLBACK_DATA_DIR`].
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("macula"))
        .unwrap_or_else(|| PathBuf::from(FALLBACK_DATA_DIR))
}

// ---------------------------------------------------------------------------
// Key names
// ---------------------------------------------------------------------------

/// The three names of one setting and its default, as shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The command-line flag, e.g. `--listen`.
    pub flag: &'static str,
    /// The environment variable, e.g. `MACULA_LISTEN`.
    pub env: &'static str,
    /// The dotted TOML key, e.g. `limits.max_frame_size`.
    pub toml: &'static str,
    /// The default in the form a user would write it.
    pub default: &'static str,
}

/// The names of every setting, for code, docs and tests.
pub mod keys {
    use super::Key;

    /// The config file itself (no TOML key: a file cannot name another).
    pub const CONFIG: Key = Key {
        flag: "--config",
        env: "MACULA_CONFIG",
        toml: "",
        default: "(none: no file is read)",
    };
    /// QUIC listen address.
    pub const LISTEN: Key = Key {
        flag: "--listen",
        env: "MACULA_LISTEN",
        toml: "listen",
        default: "0.0.0.0:4433",
    };
    /// Realm.
    pub const REALM: Key = Key {
        flag: "--realm",
        env: "MACULA_REALM",
        toml: "realm",
        default: "default",
    };
    /// Bootstrap peers.
    pub const BOOTSTRAP: Key = Key {
        flag: "--bootstrap",
        env: "MACULA_BOOTSTRAP_PEERS",
        toml: "bootstrap",
        default: "",
    };
    /// Data directory.
    pub const DATA_DIR: Key = Key {
        flag: "--data-dir",
        env: "MACULA_DATA_DIR",
        toml: "data_dir",
        default: "(user data dir)/macula",
    };
    /// Admin HTTP address.
    pub const HTTP: Key = Key {
        flag: "--http",
        env: "MACULA_HTTP",
        toml: "http",
        default: "127.0.0.1:8080",
    };
    /// TLS mode.
    pub const TLS_MODE: Key = Key {
        flag: "--tls-mode",
        env: "MACULA_TLS_MODE",
        toml: "tls.mode",
        default: "self",
    };
    /// CA certificate (ca mode).
    pub const TLS_CA_CERT_FILE: Key = Key {
        flag: "--tls-ca-cert-file",
        env: "MACULA_TLS_CACERTFILE",
        toml: "tls.ca_cert_file",
        default: "",
    };
    /// The node's certificate chain (ca mode).
    pub const TLS_CERT_FILE: Key = Key {
        flag: "--tls-cert-file",
        env: "MACULA_TLS_CERTFILE",
        toml: "tls.cert_file",
        default: "",
    };
    /// Pinned node IDs.
    pub const TLS_PINNED: Key = Key {
        flag: "--tls-pinned",
        env: "MACULA_TLS_PINNED",
        toml: "tls.pinned",
        default: "",
    };
    /// Maximum frame size.
    pub const MAX_FRAME_SIZE: Key = Key {
        flag: "--max-frame-size",
        env: "MACULA_MAX_FRAME_SIZE",
        toml: "limits.max_frame_size",
        default: "1MiB",
    };
    /// Maximum pooled connections.
    pub const MAX_CONNECTIONS: Key = Key {
        flag: "--max-connections",
        env: "MACULA_MAX_CONNECTIONS",
        toml: "limits.max_connections",
        default: "1000",
    };
    /// Idle timeout.
    pub const IDLE_TIMEOUT: Key = Key {
        flag: "--idle-timeout",
        env: "MACULA_IDLE_TIMEOUT",
        toml: "limits.idle_timeout",
        default: "5m",
    };
    /// Subscription queue bound.
    pub const PUBSUB_QUEUE_CAPACITY: Key = Key {
        flag: "--pubsub-queue-capacity",
        env: "MACULA_PUBSUB_QUEUE_CAPACITY",
        toml: "limits.pubsub_queue_capacity",
        default: "65536",
    };
    /// Subscription queue bound in payload bytes.
    pub const PUBSUB_QUEUE_BYTES: Key = Key {
        flag: "--pubsub-queue-bytes",
        env: "MACULA_PUBSUB_QUEUE_BYTES",
        toml: "limits.pubsub_queue_bytes",
        default: "64MiB",
    };
    /// Messages queued for one remote node.
    pub const PUBSUB_PEER_QUEUE_CAPACITY: Key = Key {
        flag: "--pubsub-peer-queue-capacity",
        env: "MACULA_PUBSUB_PEER_QUEUE_CAPACITY",
        toml: "limits.pubsub_peer_queue_capacity",
        default: "65536",
    };
    /// Payload bytes queued for one remote node.
    pub const PUBSUB_PEER_QUEUE_BYTES: Key = Key {
        flag: "--pubsub-peer-queue-bytes",
        env: "MACULA_PUBSUB_PEER_QUEUE_BYTES",
        toml: "limits.pubsub_peer_queue_bytes",
        default: "32MiB",
    };
    /// Cut-off of a peer that stops reading pub/sub data.
    pub const PUBSUB_STALL_TIMEOUT: Key = Key {
        flag: "--pubsub-stall-timeout",
        env: "MACULA_PUBSUB_STALL_TIMEOUT",
        toml: "limits.pubsub_stall_timeout",
        default: "10s",
    };
    /// Failure detector: silence that declares a full node down.
    pub const PEER_DOWN_AFTER: Key = Key {
        flag: "--peer-down-after",
        env: "MACULA_PEER_DOWN_AFTER",
        toml: "limits.peer_down_after",
        default: "2s",
    };
    /// Relayed sessions this node carries at once.
    pub const RELAY_MAX_SESSIONS: Key = Key {
        flag: "--relay-max-sessions",
        env: "MACULA_RELAY_MAX_SESSIONS",
        toml: "relay.max_sessions",
        default: "128",
    };
    /// Reservations this node holds for private peers at once.
    pub const RELAY_MAX_RESERVATIONS: Key = Key {
        flag: "--relay-max-reservations",
        env: "MACULA_RELAY_MAX_RESERVATIONS",
        toml: "relay.max_reservations",
        default: "128",
    };
    /// Byte rate of one relayed session.
    pub const RELAY_BYTES_PER_SECOND: Key = Key {
        flag: "--relay-bytes-per-second",
        env: "MACULA_RELAY_BYTES_PER_SECOND",
        toml: "relay.bytes_per_second",
        default: "1MiB",
    };
    /// Idle timeout of a relayed session.
    pub const RELAY_IDLE_TIMEOUT: Key = Key {
        flag: "--relay-idle-timeout",
        env: "MACULA_RELAY_IDLE_TIMEOUT",
        toml: "relay.idle_timeout",
        default: "60s",
    };
    /// Connections clients can never take.
    pub const PEER_SLOTS: Key = Key {
        flag: "--peer-slots",
        env: "MACULA_PEER_SLOTS",
        toml: "limits.peer_slots",
        default: "64",
    };
    /// Per-stream flow-control window.
    pub const STREAM_RECEIVE_WINDOW: Key = Key {
        flag: "--stream-receive-window",
        env: "MACULA_STREAM_RECEIVE_WINDOW",
        toml: "limits.stream_receive_window",
        default: "1MiB",
    };
    /// Per-connection flow-control window.
    pub const CONNECTION_RECEIVE_WINDOW: Key = Key {
        flag: "--connection-receive-window",
        env: "MACULA_CONNECTION_RECEIVE_WINDOW",
        toml: "limits.connection_receive_window",
        default: "8MiB",
    };
    /// Per-connection send buffer.
    pub const SEND_WINDOW: Key = Key {
        flag: "--send-window",
        env: "MACULA_SEND_WINDOW",
        toml: "limits.send_window",
        default: "8MiB",
    };
    /// Kernel buffers of the UDP socket.
    pub const SOCKET_BUFFER: Key = Key {
        flag: "--socket-buffer",
        env: "MACULA_SOCKET_BUFFER",
        toml: "limits.socket_buffer",
        default: "4MiB",
    };
    /// Streams a client may open.
    pub const MAX_STREAMS_PER_CLIENT: Key = Key {
        flag: "--max-streams-per-client",
        env: "MACULA_MAX_STREAMS_PER_CLIENT",
        toml: "limits.max_streams_per_client",
        default: "4",
    };
    /// Reachability: detect, or assume private.
    pub const REACHABILITY: Key = Key {
        flag: "--reachability",
        env: "MACULA_REACHABILITY",
        toml: "reachability",
        default: "auto",
    };
    /// Raft groups this node is a member of.
    pub const RAFT_GROUPS: Key = Key {
        flag: "--raft-group",
        env: "MACULA_RAFT_GROUPS",
        toml: "raft_groups",
        default: "",
    };
    /// Founding voters of the Raft groups.
    pub const RAFT_MEMBERS: Key = Key {
        flag: "--raft-members",
        env: "MACULA_RAFT_MEMBERS",
        toml: "raft_members",
        default: "",
    };
    /// Time a Raft request (write, read, membership change) may take.
    pub const RAFT_TIMEOUT: Key = Key {
        flag: "--raft-timeout",
        env: "MACULA_RAFT_TIMEOUT",
        toml: "raft_timeout",
        default: "5s",
    };
    /// Raft groups one node may run.
    pub const RAFT_MAX_GROUPS: Key = Key {
        flag: "--raft-max-groups",
        env: "MACULA_RAFT_MAX_GROUPS",
        toml: "raft_max_groups",
        default: "64",
    };
    /// Shortest time without a leader before a member starts an election.
    pub const RAFT_ELECTION_TIMEOUT: Key = Key {
        flag: "--raft-election-timeout",
        env: "MACULA_RAFT_ELECTION_TIMEOUT",
        toml: "raft_election_timeout",
        default: "200ms",
    };
    /// Log format.
    pub const LOG_FORMAT: Key = Key {
        flag: "--log-format",
        env: "MACULA_LOG_FORMAT",
        toml: "log.format",
        default: "text",
    };

    /// Every setting that can appear in the TOML file, in documentation order.
    pub const ALL: &[Key] = &[
        LISTEN,
        REALM,
        BOOTSTRAP,
        DATA_DIR,
        HTTP,
        TLS_MODE,
        TLS_CA_CERT_FILE,
        TLS_CERT_FILE,
        TLS_PINNED,
        MAX_FRAME_SIZE,
        MAX_CONNECTIONS,
        IDLE_TIMEOUT,
        PUBSUB_QUEUE_CAPACITY,
        PUBSUB_QUEUE_BYTES,
        PUBSUB_PEER_QUEUE_CAPACITY,
        PUBSUB_PEER_QUEUE_BYTES,
        PUBSUB_STALL_TIMEOUT,
        PEER_DOWN_AFTER,
        PEER_SLOTS,
        STREAM_RECEIVE_WINDOW,
        CONNECTION_RECEIVE_WINDOW,
        SEND_WINDOW,
        SOCKET_BUFFER,
        MAX_STREAMS_PER_CLIENT,
        RELAY_MAX_SESSIONS,
        RELAY_MAX_RESERVATIONS,
        RELAY_BYTES_PER_SECOND,
        RELAY_IDLE_TIMEOUT,
        REACHABILITY,
        RAFT_GROUPS,
        RAFT_MEMBERS,
        RAFT_TIMEOUT,
        RAFT_MAX_GROUPS,
        RAFT_ELECTION_TIMEOUT,
        LOG_FORMAT,
    ];
}

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

/// The node's settings as command-line flags. Every flag is optional; an
/// unset flag falls back to its environment variable, then to the config
/// file, then to the default.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct NodeArgs {
    /// TOML config file; none is read unless given [env: MACULA_CONFIG]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// QUIC (UDP) listen address [env: MACULA_LISTEN] [default: 0.0.0.0:4433]
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<String>,

    /// Realm to join: dot-separated labels of a-z, 0-9, '-' [env: MACULA_REALM] [default: default]
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,

    /// Bootstrap peers: HOST:PORT, quic://HOST:PORT or NODEID@HOST:PORT; comma-separated, repeatable [env: MACULA_BOOTSTRAP_PEERS] [default: none]
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    pub bootstrap: Vec<String>,

    /// Directory for the node key and state [env: MACULA_DATA_DIR] [default: <user data dir>/macula]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Admin HTTP address (/metrics, /health, /admin/*) [env: MACULA_HTTP] [default: 127.0.0.1:8080]
    #[arg(long, value_name = "IP:PORT")]
    pub http: Option<String>,

    /// TLS mode: "self" (self-certifying node IDs) or "ca" (also require a chain to a CA) [env: MACULA_TLS_MODE] [default: self]
    #[arg(long, value_name = "self|ca")]
    pub tls_mode: Option<String>,

    /// CA certificate (PEM) peers must chain to; required with --tls-mode ca [env: MACULA_TLS_CACERTFILE]
    #[arg(long, value_name = "PATH")]
    pub tls_ca_cert_file: Option<PathBuf>,

    /// This node's certificate chain (PEM), issued by the CA for the node key; required with --tls-mode ca [env: MACULA_TLS_CERTFILE]
    #[arg(long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,

    /// Only accept peers with these node IDs; comma-separated, repeatable [env: MACULA_TLS_PINNED] [default: none]
    #[arg(long, value_name = "NODEID[,NODEID...]")]
    pub tls_pinned: Vec<String>,

    /// Maximum frame body size, in bytes or with KiB/MiB, 1KiB..16MiB [env: MACULA_MAX_FRAME_SIZE] [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    pub max_frame_size: Option<String>,

    /// Maximum pooled peer connections, 1..100000 [env: MACULA_MAX_CONNECTIONS] [default: 1000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<String>,

    /// Close a pooled connection idle this long: 300, 300s, 5m, 1h, 1500ms; 1s..24h [env: MACULA_IDLE_TIMEOUT] [default: 5m]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,

    /// Events queued per subscription before the oldest are dropped, 16..10000000 [env: MACULA_PUBSUB_QUEUE_CAPACITY] [default: 65536]
    #[arg(long, value_name = "N")]
    pub pubsub_queue_capacity: Option<String>,

    /// Payload bytes queued per subscription before the oldest are dropped, in bytes or with KiB/MiB, 64KiB..16384MiB [env: MACULA_PUBSUB_QUEUE_BYTES] [default: 64MiB]
    #[arg(long, value_name = "SIZE")]
    pub pubsub_queue_bytes: Option<String>,

    /// Messages queued for one remote node before a publish waits (or drops, as it asks), 16..10000000 [env: MACULA_PUBSUB_PEER_QUEUE_CAPACITY] [default: 65536]
    #[arg(long, value_name = "N")]
    pub pubsub_peer_queue_capacity: Option<String>,

    /// Payload bytes queued for one remote node before a publish waits (or drops, as it asks), in bytes or with KiB/MiB, 64KiB..16384MiB [env: MACULA_PUBSUB_PEER_QUEUE_BYTES] [default: 32MiB]
    #[arg(long, value_name = "SIZE")]
    pub pubsub_peer_queue_bytes: Option<String>,

    /// Cut off a peer whose pub/sub data stream accepts nothing this long; 1s..1h [env: MACULA_PUBSUB_STALL_TIMEOUT] [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub pubsub_stall_timeout: Option<String>,

    /// Failure detector: a full node silent this long (no packet, no answer to probes) is declared down, its connection closed and every service told; raised on slow paths; 1s..20s [env: MACULA_PEER_DOWN_AFTER] [default: 2s]
    #[arg(long, value_name = "DURATION")]
    pub peer_down_after: Option<String>,

    /// Connections of --max-connections that clients can never take, kept for full nodes (at most half), 0..100000 [env: MACULA_PEER_SLOTS] [default: 64]
    #[arg(long, value_name = "N")]
    pub peer_slots: Option<String>,

    /// Bytes a peer may send on one stream ahead of the node's reading, 16KiB..1GiB [env: MACULA_STREAM_RECEIVE_WINDOW] [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    pub stream_receive_window: Option<String>,

    /// Bytes a peer may send on one connection ahead of the node's reading, 16KiB..1GiB [env: MACULA_CONNECTION_RECEIVE_WINDOW] [default: 8MiB]
    #[arg(long, value_name = "SIZE")]
    pub connection_receive_window: Option<String>,

    /// Bytes buffered per connection for sending, unacknowledged, 16KiB..1GiB [env: MACULA_SEND_WINDOW] [default: 8MiB]
    #[arg(long, value_name = "SIZE")]
    pub send_window: Option<String>,

    /// Kernel receive and send buffer of the UDP socket (capped by net.core.rmem_max), 64KiB..256MiB [env: MACULA_SOCKET_BUFFER] [default: 4MiB]
    #[arg(long, value_name = "SIZE")]
    pub socket_buffer: Option<String>,

    /// Streams of each kind a client may open at once, 2..256 [env: MACULA_MAX_STREAMS_PER_CLIENT] [default: 4]
    #[arg(long, value_name = "N")]
    pub max_streams_per_client: Option<String>,

    /// Relayed sessions carried at once, 1..100000 [env: MACULA_RELAY_MAX_SESSIONS] [default: 128]
    #[arg(long, value_name = "N")]
    pub relay_max_sessions: Option<String>,

    /// Reservations held for private peers at once, 1..100000 [env: MACULA_RELAY_MAX_RESERVATIONS] [default: 128]
    #[arg(long, value_name = "N")]
    pub relay_max_reservations: Option<String>,

    /// Bytes per second of one relayed session (over it: throttled), bytes or KiB/MiB, 0 = unlimited [env: MACULA_RELAY_BYTES_PER_SECOND] [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    pub relay_bytes_per_second: Option<String>,

    /// Close a relayed session idle this long; 1s..24h [env: MACULA_RELAY_IDLE_TIMEOUT] [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub relay_idle_timeout: Option<String>,

    /// "auto" (peers dial back to tell) or "private" (behind NAT: use relays, accept no direct inbound connection) [env: MACULA_REACHABILITY] [default: auto]
    #[arg(long, value_name = "auto|private")]
    pub reachability: Option<String>,

    /// Raft group to be a member of (consistent KV, leader election); the log is kept in <data dir>/raft; comma-separated, repeatable [env: MACULA_RAFT_GROUPS] [default: none]
    #[arg(long = "raft-group", value_name = "NAME[,NAME...]")]
    pub raft_groups: Vec<String>,

    /// Founding voters of the --raft-group groups: node IDs, this node's own among them; every founder passes the same list. Without it the node joins as a not-yet-member and waits for `macula raft add`; comma-separated, repeatable [env: MACULA_RAFT_MEMBERS] [default: none]
    #[arg(long, value_name = "NODEID[,NODEID...]")]
    pub raft_members: Vec<String>,

    /// Time a Raft group request (write, linearizable read, membership change) may take, leader changes included; 100ms..60s [env: MACULA_RAFT_TIMEOUT] [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub raft_timeout: Option<String>,

    /// Raft groups this node may run at once, 1..4096 [env: MACULA_RAFT_MAX_GROUPS] [default: 64]
    #[arg(long, value_name = "N")]
    pub raft_max_groups: Option<String>,

    /// A member that hears no leader for a random time between this and twice this starts an election; the leader's heartbeat is a quarter of it; 100ms..60s; raise it on links slower than 20 ms round trip [env: MACULA_RAFT_ELECTION_TIMEOUT] [default: 200ms]
    #[arg(long, value_name = "DURATION")]
    pub raft_election_timeout: Option<String>,

    /// Log format: "text" or "json" [env: MACULA_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<String>,
}

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

/// How peers' certificates are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsModeSetting {
    /// `self`: the peer's node ID is derived from the key it proves.
    #[default]
    SelfCertifying,
    /// `ca`: additionally, the peer's chain must lead to the configured CA.
    Ca,
}

impl fmt::Display for TlsModeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsModeSetting::SelfCertifying => "self",
            TlsModeSetting::Ca => "ca",
        })
    }
}

impl FromStr for TlsModeSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "self" => Ok(TlsModeSetting::SelfCertifying),
            "ca" => Ok(TlsModeSetting::Ca),
            _ => Err("expected \"self\" or \"ca\"".to_string()),
        }
    }
}

/// Format of the daemon's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected \"text\" or \"json\"".to_string()),
        }
    }
}

/// The resolved, validated configuration of a node.
#[derive(Debug, Clone)]
pub struct Settings {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Realm (validated with [`validate_realm`]).
    pub realm: String,
    /// Peers to dial at start.
    pub bootstrap: Vec<PeerAddr>,
    /// Directory holding the node key and state.
    pub data_dir: PathBuf,
    /// Admin HTTP address.
    pub http: SocketAddr,
    /// TLS verification mode.
    pub tls_mode: TlsModeSetting,
    /// CA certificate (PEM); `Some` whenever `tls_mode` is `Ca`, `None` otherwise.
    pub tls_ca_cert_file: Option<PathBuf>,
    /// The node's certificate chain (PEM); `Some` whenever `tls_mode` is `Ca`, `None` otherwise.
    pub tls_cert_file: Option<PathBuf>,
    /// If non-empty, only these node IDs are accepted as peers.
    pub tls_pinned: Vec<NodeId>,
    /// Maximum frame body size in bytes.
    pub max_frame_size: u32,
    /// Maximum pooled connections.
    pub max_connections: usize,
    /// Idle timeout of pooled connections.
    pub idle_timeout: Duration,
    /// Events queued per subscription.
    pub pubsub_queue_capacity: usize,
    /// Payload bytes queued per subscription.
    pub pubsub_queue_bytes: usize,
    /// Messages queued for one remote node.
    pub pubsub_peer_queue_capacity: usize,
    /// Payload bytes queued for one remote node.
    pub pubsub_peer_queue_bytes: usize,
    /// Cut-off of a peer that stops reading pub/sub data.
    pub pubsub_stall_timeout: Duration,
    /// Failure detector: silence that declares a full node down.
    pub peer_down_after: Duration,
    /// Connections clients can never take.
    pub peer_slots: usize,
    /// Per-stream flow-control window, bytes.
    pub stream_receive_window: u32,
    /// Per-connection flow-control window, bytes.
    pub connection_receive_window: u32,
    /// Per-connection send buffer, bytes.
    pub send_window: u64,
    /// Kernel buffers of the UDP socket, bytes.
    pub socket_buffer: usize,
    /// Streams of each kind a client may open at once.
    pub max_streams_per_client: u32,
    /// Relayed sessions carried at once.
    pub relay_max_sessions: usize,
    /// Reservations held for private peers at once.
    pub relay_max_reservations: usize,
    /// Byte rate of one relayed session (0: unlimited).
    pub relay_bytes_per_second: u64,
    /// Idle timeout of a relayed session.
    pub relay_idle_timeout: Duration,
    /// Detect reachability, or assume private.
    pub reachability: ReachabilityMode,
    /// Raft groups to join at start (validated names, no duplicates).
    pub raft_groups: Vec<String>,
    /// Founding voters of `raft_groups`; empty: join as a not-yet-member.
    pub raft_members: Vec<NodeId>,
    /// Request timeout of Raft group operations.
    pub raft_timeout: Duration,
    /// Raft groups the node may run at once.
    pub raft_max_groups: usize,
    /// Minimum election timeout (the heartbeat is a quarter of it).
    pub raft_election_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
}

impl Default for Settings {
    /// Every setting at its default; what `macula start` runs with when
    /// nothing is configured.
    fn default() -> Self {
        let relay = macula::config::RelayLimits::default();
        let limits = macula::config::Limits::default();
        let raft = macula::config::RaftLimits::default();
        Settings {
            listen: DEFAULT_LISTEN,
            realm: DEFAULT_REALM.to_string(),
            bootstrap: Vec::new(),
            data_dir: default_data_dir(),
            http: DEFAULT_HTTP,
            tls_mode: DEFAULT_TLS_MODE,
            tls_ca_cert_file: None,
            tls_cert_file: None,
            tls_pinned: Vec::new(),
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            pubsub_queue_capacity: DEFAULT_PUBSUB_QUEUE_CAPACITY,
            pubsub_queue_bytes: DEFAULT_PUBSUB_QUEUE_BYTES,
            pubsub_peer_queue_capacity: DEFAULT_PUBSUB_PEER_QUEUE_CAPACITY,
            pubsub_peer_queue_bytes: DEFAULT_PUBSUB_PEER_QUEUE_BYTES,
            pubsub_stall_timeout: DEFAULT_PUBSUB_STALL_TIMEOUT,
            peer_down_after: DEFAULT_PEER_DOWN_AFTER,
            peer_slots: limits.peer_slots,
            stream_receive_window: limits.stream_receive_window,
            connection_receive_window: limits.connection_receive_window,
            send_window: limits.send_window,
            socket_buffer: limits.socket_buffer,
            max_streams_per_client: limits.max_streams_per_client,
            relay_max_sessions: relay.max_sessions,
            relay_max_reservations: relay.max_reservations,
            relay_bytes_per_second: relay.bytes_per_second,
            relay_idle_timeout: relay.idle_timeout,
            reachability: ReachabilityMode::Auto,
            raft_groups: Vec::new(),
            raft_members: Vec::new(),
            raft_timeout: raft.request_timeout,
            raft_max_groups: raft.max_groups,
            raft_election_timeout: raft.election_min,
            log_format: DEFAULT_LOG_FORMAT,
            config_file: None,
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why the configuration cannot be used. Every variant names the key as the
/// user wrote it and, where there is one, the value.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    InvalidValue {
        /// The key as given: `--listen`, `MACULA_REALM`, or `` `listen` in FILE``.
        key: String,
        /// The value as given.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// The config file could not be read.
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has the wrong shape.
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The config file has a key this version does not know.
    UnknownKey {
        /// The dotted key, e.g. `tls.mod`.
        key: String,
        /// The file.
        path: PathBuf,
    },
    /// A setting that another setting makes mandatory is missing.
    Missing {
        /// All the names of the missing setting.
        key: String,
        /// Which setting requires it, and why.
        reason: String,
    },
    /// A setting that has no effect given another setting (and would give a
    /// false sense of security if silently ignored).
    Conflict {
        /// The key as given.
        key: String,
        /// The value as given.
        value: String,
        /// Why it conflicts.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::InvalidValue { key, value, reason } => {
                write!(f, "invalid value {value:?} for {key}: {reason}")
            }
            ConfigError::ReadFile { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::ParseFile { path, message } => {
                write!(f, "invalid config file {}: {message}", path.display())
            }
            ConfigError::UnknownKey { key, path } => {
                let known: Vec<&str> = keys::ALL.iter().map(|k| k.toml).collect();
                write!(
                    f,
                    "unknown key `{key}` in config file {}; known keys: {}",
                    path.display(),
                    known.join(", ")
                )
            }
            ConfigError::Missing { key, reason } => write!(f, "missing {key}: {reason}"),
            ConfigError::Conflict { key, value, reason } => {
                write!(f, "{key} is set to {value:?} but {reason}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------
// Value parsers (public so other commands can share them)
// ---------------------------------------------------------------------------

/// Parses an `IP:PORT` socket address (IPv6 as `[::1]:4433`). Port 0 is
/// allowed (the OS picks one).
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected an IP:PORT socket address, e.g. 0.0.0.0:4433 or [::]:4433".into())
}

/// Checks a realm name: 1 to 253 characters, dot-separated labels of
/// lowercase `a-z`, `0-9` and `-`, no empty label, no label starting or
/// ending with `-`.
pub fn validate_realm(realm: &str) -> Result<(), String> {
    let problem = if realm.is_empty() || realm.len() > MAX_REALM_LEN {
        Some("a realm has 1 to 253 characters")
    } else if realm.split('.').any(str::is_empty) {
        Some("a realm cannot have an empty label (\"..\", or a leading or trailing dot)")
    } else if !realm
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Some("a realm has only lowercase letters a-z, digits 0-9, '-' and '.'")
    } else if realm
        .split('.')
        .any(|l| l.starts_with('-') || l.ends_with('-'))
    {
        Some("a realm label cannot start or end with '-'")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(format!(
            "{p}; expected dot-separated labels such as io.example.shop"
        )),
    }
}

/// Splits `"123 unit"` into the number and the (trimmed) unit.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(end);
    if digits.is_empty() {
        return None;
    }
    // Digits only, so the only failure is overflow: report it as unparsable.
    digits.parse().ok().map(|n| (n, unit.trim()))
}

/// Parses a byte size: plain bytes (`1048576`, `1048576B`) or a binary
/// suffix (`64KiB`, `1MiB`, case-insensitive, optional space). `KB`/`MB`
/// are rejected as ambiguous.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const EXPECTED: &str =
        "expected a size in bytes or with a KiB/MiB suffix, e.g. 1048576 or 1MiB";
    let (n, unit) = split_number(s).ok_or(EXPECTED)?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "k" | "kb" | "m" | "mb" => {
            return Err(format!(
                "ambiguous unit {unit:?}: use KiB (1024 bytes) or MiB (1048576 bytes)"
            ))
        }
        _ => return Err(EXPECTED.to_string()),
    };
    n.checked_mul(mult).ok_or_else(|| EXPECTED.to_string())
}

/// Parses a duration: a whole number with an optional unit `ms`, `s`, `m`
/// or `h` (no unit means seconds): `300`, `300s`, `5m`, `1h`, `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const EXPECTED: &str = "expected a duration such as 300, 300s, 5m, 1h or 250ms";
    let (n, unit) = split_number(s).ok_or(EXPECTED)?;
    let ms_per: u64 = match unit.to_ascii_lowercase().as_str() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(EXPECTED.to_string()),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| EXPECTED.to_string())
}

/// Formats a duration the way [`parse_duration`] reads it.
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms >= per && (ms / per) * per == ms {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

fn parse_max_frame_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    match u32::try_from(n) {
        Ok(v) if (MIN_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&v) => Ok(v),
        _ => Err(format!(
            "must be from {MIN_MAX_FRAME_SIZE} (1KiB) to {MAX_MAX_FRAME_SIZE} (16MiB) bytes"
        )),
    }
}

/// A whole number in `min..=max`.
fn parse_count(s: &str, (min, max): (usize, usize)) -> Result<usize, String> {
    let t = s.trim();
    match t.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) && t.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

/// A duration in `min..=max`.
fn parse_duration_in(s: &str, (min, max): (Duration, Duration)) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if (min..=max).contains(&d) {
        Ok(d)
    } else {
        Err(format!(
            "must be at least {} and at most {}",
            format_duration(min),
            format_duration(max)
        ))
    }
}

fn parse_max_connections(s: &str) -> Result<usize, String> {
    parse_count(s, (MIN_MAX_CONNECTIONS, MAX_MAX_CONNECTIONS))
}

fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, (MIN_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT))
}

fn parse_pubsub_queue_capacity(s: &str) -> Result<usize, String> {
    parse_count(s, PUBSUB_QUEUE_CAPACITY_RANGE)
}

/// A size in `min..=max` bytes that also fits this platform's `usize`.
fn parse_size_usize(s: &str, range: (u64, u64)) -> Result<usize, String> {
    let n = parse_size_in(s, range)?;
    usize::try_from(n).map_err(|_| format!("must be at most {} bytes on this platform", usize::MAX))
}

fn parse_pubsub_queue_bytes(s: &str) -> Result<usize, String> {
    parse_size_usize(s, PUBSUB_QUEUE_BYTES_RANGE)
}

fn parse_pubsub_peer_queue_capacity(s: &str) -> Result<usize, String> {
    parse_count(s, PUBSUB_PEER_QUEUE_CAPACITY_RANGE)
}

fn parse_pubsub_peer_queue_bytes(s: &str) -> Result<usize, String> {
    parse_size_usize(s, PUBSUB_PEER_QUEUE_BYTES_RANGE)
}

fn parse_pubsub_stall_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, PUBSUB_STALL_TIMEOUT_RANGE)
}

fn parse_peer_down_after(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, PEER_DOWN_AFTER_RANGE)
}

/// A size in `min..=max` bytes.
fn parse_size_in(s: &str, (min, max): (u64, u64)) -> Result<u64, String> {
    let n = parse_size(s)?;
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be from {min} to {max} bytes"))
    }
}

fn parse_window(s: &str) -> Result<u64, String> {
    parse_size_in(s, WINDOW_RANGE)
}

/// A flow-control window (a QUIC varint, kept below 4 GiB here).
fn parse_window_u32(s: &str) -> Result<u32, String> {
    parse_window(s).map(|n| n as u32)
}

fn parse_socket_buffer(s: &str) -> Result<usize, String> {
    parse_size_in(s, SOCKET_BUFFER_RANGE).map(|n| n as usize)
}

fn parse_peer_slots(s: &str) -> Result<usize, String> {
    parse_count(s, PEER_SLOTS_RANGE)
}

fn parse_client_streams(s: &str) -> Result<u32, String> {
    parse_count(s, CLIENT_STREAMS_RANGE).map(|n| n as u32)
}

fn parse_relay_count(s: &str) -> Result<usize, String> {
    parse_count(s, RELAY_COUNT_RANGE)
}

fn parse_relay_bytes_per_second(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n > MAX_RELAY_BYTES_PER_SECOND {
        return Err(format!(
            "must be at most {MAX_RELAY_BYTES_PER_SECOND} bytes (1GiB); 0 means unlimited"
        ));
    }
    Ok(n)
}

fn parse_relay_idle_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, RELAY_IDLE_TIMEOUT_RANGE)
}

fn parse_raft_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, RAFT_TIMEOUT_RANGE)
}

fn parse_raft_max_groups(s: &str) -> Result<usize, String> {
    parse_count(s, RAFT_MAX_GROUPS_RANGE)
}

fn parse_raft_election_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, RAFT_ELECTION_TIMEOUT_RANGE)
}

/// Checks a Raft group name: 1 to 128 characters of `A-Z a-z 0-9 . _ -`,
/// not starting with `.` (the name is the file name of the group's log).
pub fn validate_raft_group(name: &str) -> Result<(), String> {
    if macula::raft::validate_group_name(name).is_ok() {
        Ok(())
    } else {
        Err(format!(
            "invalid Raft group name {name:?}: 1 to {MAX_RAFT_GROUP_NAME_LEN} characters of \
             A-Z a-z 0-9 . _ - not starting with '.'"
        ))
    }
}

fn parse_raft_group(s: &str) -> Result<Vec<String>, String> {
    let name = s.trim();
    validate_raft_group(name)?;
    Ok(vec![name.to_string()])
}

fn parse_raft_groups(s: &str) -> Result<Vec<String>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in s.split(',') {
        out.extend(parse_raft_group(item)?);
    }
    Ok(out)
}

fn parse_reachability(s: &str) -> Result<ReachabilityMode, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(ReachabilityMode::Auto),
        "private" => Ok(ReachabilityMode::Private),
        _ => Err("expected \"auto\" or \"private\"".to_string()),
    }
}

fn parse_realm(s: &str) -> Result<String, String> {
    let r = s.trim();
    validate_realm(r)?;
    Ok(r.to_string())
}

fn parse_peers(s: &str) -> Result<Vec<PeerAddr>, String> {
    macula::parse_peer_addrs(s).map_err(|e| e.to_string())
}

fn parse_peer(s: &str) -> Result<Vec<PeerAddr>, String> {
    s.parse::<PeerAddr>()
        .map(|p| vec![p])
        .map_err(|e| e.to_string())
}

fn parse_node_id(s: &str) -> Result<Vec<NodeId>, String> {
    s.trim().parse::<NodeId>().map(|id| vec![id]).map_err(|e| {
        format!("{e}; expected a node ID as printed by `macula identity` (52 characters a-z, 2-7)")
    })
}

fn parse_node_ids(s: &str) -> Result<Vec<NodeId>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (i, item) in s.split(',').enumerate() {
        if item.trim().is_empty() {
            return Err(format!(
                "empty item {} in node ID list: expected comma-separated node IDs",
                i + 1
            ));
        }
        out.extend(parse_node_id(item)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The config file
// ---------------------------------------------------------------------------

/// The file's shape. Leaves are kept as raw TOML values so that a wrong type
/// is reported like any other invalid value (key and value named).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<toml::Value>,
    realm: Option<toml::Value>,
    bootstrap: Option<toml::Value>,
    data_dir: Option<toml::Value>,
    http: Option<toml::Value>,
    reachability: Option<toml::Value>,
    raft_groups: Option<toml::Value>,
    raft_members: Option<toml::Value>,
    raft_timeout: Option<toml::Value>,
    raft_max_groups: Option<toml::Value>,
    raft_election_timeout: Option<toml::Value>,
    tls: Option<FileTls>,
    limits: Option<FileLimits>,
    relay: Option<FileRelay>,
    log: Option<FileLog>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRelay {
    max_sessions: Option<toml::Value>,
    max_reservations: Option<toml::Value>,
    bytes_per_second: Option<toml::Value>,
    idle_timeout: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTls {
    mode: Option<toml::Value>,
    ca_cert_file: Option<toml::Value>,
    cert_file: Option<toml::Value>,
    pinned: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_frame_size: Option<toml::Value>,
    max_connections: Option<toml::Value>,
    idle_timeout: Option<toml::Value>,
    pubsub_queue_capacity: Option<toml::Value>,
    pubsub_queue_bytes: Option<toml::Value>,
    pubsub_peer_queue_capacity: Option<toml::Value>,
    pubsub_peer_queue_bytes: Option<toml::Value>,
    pubsub_stall_timeout: Option<toml::Value>,
    peer_down_after: Option<toml::Value>,
    peer_slots: Option<toml::Value>,
    stream_receive_window: Option<toml::Value>,
    connection_receive_window: Option<toml::Value>,
    send_window: Option<toml::Value>,
    socket_buffer: Option<toml::Value>,
    max_streams_per_client: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLog {
    format: Option<toml::Value>,
}

/// A loaded config file: its path and its values by dotted key.
struct FileLayer {
    path: PathBuf,
    values: BTreeMap<&'static str, toml::Value>,
}

impl FileLayer {
    fn load(path: &Path) -> Result<FileLayer, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_err = |e: toml::de::Error| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        };
        // Syntax first, then unknown keys (with their full dotted name), then
        // the typed shape (deny_unknown_fields is the backstop).
        let table: toml::Table = text.parse().map_err(parse_err)?;
        check_keys(&table, path)?;
        let cfg: FileConfig = toml::from_str(&text).map_err(parse_err)?;
        let tls = cfg.tls.unwrap_or_default();
        let limits = cfg.limits.unwrap_or_default();
        let log = cfg.log.unwrap_or_default();
        let relay = cfg.relay.unwrap_or_default();
        let values = [
            (keys::LISTEN.toml, cfg.listen),
            (keys::REALM.toml, cfg.realm),
            (keys::BOOTSTRAP.toml, cfg.bootstrap),
            (keys::DATA_DIR.toml, cfg.data_dir),
            (keys::HTTP.toml, cfg.http),
            (keys::TLS_MODE.toml, tls.mode),
            (keys::TLS_CA_CERT_FILE.toml, tls.ca_cert_file),
            (keys::TLS_CERT_FILE.toml, tls.cert_file),
            (keys::TLS_PINNED.toml, tls.pinned),
            (keys::MAX_FRAME_SIZE.toml, limits.max_frame_size),
            (keys::MAX_CONNECTIONS.toml, limits.max_connections),
            (keys::IDLE_TIMEOUT.toml, limits.idle_timeout),
            (
                keys::PUBSUB_QUEUE_CAPACITY.toml,
                limits.pubsub_queue_capacity,
            ),
            (keys::PUBSUB_QUEUE_BYTES.toml, limits.pubsub_queue_bytes),
            (
                keys::PUBSUB_PEER_QUEUE_CAPACITY.toml,
                limits.pubsub_peer_queue_capacity,
            ),
            (
                keys::PUBSUB_PEER_QUEUE_BYTES.toml,
                limits.pubsub_peer_queue_bytes,
            ),
            (keys::PUBSUB_STALL_TIMEOUT.toml, limits.pubsub_stall_timeout),
            (keys::PEER_DOWN_AFTER.toml, limits.peer_down_after),
            (keys::PEER_SLOTS.toml, limits.peer_slots),
            (
                keys::STREAM_RECEIVE_WINDOW.toml,
                limits.stream_receive_window,
            ),
            (
                keys::CONNECTION_RECEIVE_WINDOW.toml,
                limits.connection_receive_window,
            ),
            (keys::SEND_WINDOW.toml, limits.send_window),
            (keys::SOCKET_BUFFER.toml, limits.socket_buffer),
            (
                keys::MAX_STREAMS_PER_CLIENT.toml,
                limits.max_streams_per_client,
            ),
            (keys::RELAY_MAX_SESSIONS.toml, relay.max_sessions),
            (keys::RELAY_MAX_RESERVATIONS.toml, relay.max_reservations),
            (keys::RELAY_BYTES_PER_SECOND.toml, relay.bytes_per_second),
            (keys::RELAY_IDLE_TIMEOUT.toml, relay.idle_timeout),
            (keys::REACHABILITY.toml, cfg.reachability),
            (keys::RAFT_GROUPS.toml, cfg.raft_groups),
            (keys::RAFT_MEMBERS.toml, cfg.raft_members),
            (keys::RAFT_TIMEOUT.toml, cfg.raft_timeout),
            (keys::RAFT_MAX_GROUPS.toml, cfg.raft_max_groups),
            (keys::RAFT_ELECTION_TIMEOUT.toml, cfg.raft_election_timeout),
            (keys::LOG_FORMAT.toml, log.format),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        Ok(FileLayer {
            path: path.to_path_buf(),
            values,
        })
    }

    fn origin(&self, key: &Key) -> Origin {
        Origin::File {
            key: key.toml,
            path: self.path.clone(),
        }
    }

    fn invalid(&self, key: &Key, value: &toml::Value, reason: &str) -> ConfigError {
        ConfigError::InvalidValue {
            key: self.origin(key).to_string(),
            value: value_text(value),
            reason: reason.to_string(),
        }
    }

    /// A string-valued key (`allow_int`: integers are accepted too).
    fn scalar(&self, key: &Key, allow_int: bool) -> Result<Option<Raw>, ConfigError> {
        let Some(v) = self.values.get(key.toml) else {
            return Ok(None);
        };
        let value = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) if allow_int => i.to_string(),
            _ if allow_int => return Err(self.invalid(key, v, "expected an integer or a string")),
            _ => return Err(self.invalid(key, v, "expected a string")),
        };
        Ok(Some(Raw {
            value,
            origin: self.origin(key),
        }))
    }

    /// A path-valued key; relative paths are taken from the file's directory.
    fn path(&self, key: &Key) -> Result<Option<(PathBuf, Origin)>, ConfigError> {
        let Some(v) = self.values.get(key.toml) else {
            return Ok(None);
        };
        match v {
            toml::Value::String(s) if !s.is_empty() => {
                let p = Path::new(s);
                let p = match self.path.parent() {
                    Some(dir) if p.is_relative() => dir.join(p),
                    _ => p.to_path_buf(),
                };
                Ok(Some((p, self.origin(key))))
            }
            _ => Err(self.invalid(key, v, "expected a non-empty path string")),
        }
    }

    /// A list-valued key: an array of strings (one item each) or a string
    /// (comma-separated). Returns the raw items and whether each is a list.
    fn list(&self, key: &Key) -> Result<Option<Vec<(Raw, bool)>>, ConfigError> {
        let Some(v) = self.values.get(key.toml) else {
            return Ok(None);
        };
        let raw = |s: &str| Raw {
            value: s.to_string(),
            origin: self.origin(key),
        };
        match v {
            toml::Value::String(s) => Ok(Some(vec![(raw(s), true)])),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok((raw(s), false)),
                    other => Err(self.invalid(key, other, "expected an array of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            _ => Err(self.invalid(key, v, "expected an array of strings")),
        }
    }
}

/// A TOML value as the user would have written it (strings without quotes).
fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rejects keys the file format does not have, naming them in dotted form.
fn check_keys(table: &toml::Table, path: &Path) -> Result<(), ConfigError> {
    let known = |k: &str| keys::ALL.iter().any(|key| key.toml == k);
    let unknown = |k: String| ConfigError::UnknownKey {
        key: k,
        path: path.to_path_buf(),
    };
    for (k, v) in table {
        if known(k) {
            continue;
        }
        let is_section = keys::ALL
            .iter()
            .any(|key| key.toml.split_once('.').is_some_and(|(s, _)| s == k));
        if !is_section {
            return Err(unknown(k.clone()));
        }
        let toml::Value::Table(sub) = v else {
            return Err(ConfigError::InvalidValue {
                key: format!("`{k}` in {}", path.display()),
                value: value_text(v),
                reason: format!("expected a table ([{k}])"),
            });
        };
        for sk in sub.keys() {
            let dotted = format!("{k}.{sk}");
            if !known(&dotted) {
                return Err(unknown(dotted));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Layering
// ---------------------------------------------------------------------------

/// Where a value came from; its `Display` is the key as the user wrote it.
#[derive(Debug, Clone)]
enum Origin {
    Flag(&'static str),
    Env(&'static str),
    File { key: &'static str, path: PathBuf },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => f.write_str(flag),
            Origin::Env(var) => f.write_str(var),
            Origin::File { key, path } => write!(f, "`{key}` in {}", path.display()),
        }
    }
}

/// One value as given, with its origin.
struct Raw {
    value: String,
    origin: Origin,
}

impl Raw {
    fn parse<T>(&self, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        parse(&self.value).map_err(|reason| ConfigError::InvalidValue {
            key: self.origin.to_string(),
            value: self.value.clone(),
            reason,
        })
    }
}

struct Layers<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    file: Option<FileLayer>,
}

impl Layers<'_> {
    /// The environment variable, treating set-but-empty as unset.
    fn env(&self, key: &Key) -> Option<Raw> {
        (self.env)(key.env)
            .filter(|v| !v.trim().is_empty())
            .map(|value| Raw {
                value,
                origin: Origin::Env(key.env),
            })
    }

    /// The highest-precedence raw value of a scalar setting.
    fn scalar(
        &self,
        flag: &Option<String>,
        key: &Key,
        file_allows_int: bool,
    ) -> Result<Option<Raw>, ConfigError> {
        if let Some(v) = flag {
            return Ok(Some(Raw {
                value: v.clone(),
                origin: Origin::Flag(key.flag),
            }));
        }
        if let Some(raw) = self.env(key) {
            return Ok(Some(raw));
        }
        match &self.file {
            Some(file) => file.scalar(key, file_allows_int),
            None => Ok(None),
        }
    }

    fn value<T>(
        &self,
        flag: &Option<String>,
        key: &Key,
        file_allows_int: bool,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<(T, Origin)>, ConfigError> {
        match self.scalar(flag, key, file_allows_int)? {
            Some(raw) => Ok(Some((raw.parse(parse)?, raw.origin))),
            None => Ok(None),
        }
    }

    fn path(
        &self,
        flag: &Option<PathBuf>,
        key: &Key,
    ) -> Result<Option<(PathBuf, Origin)>, ConfigError> {
        if let Some(p) = flag {
            if p.as_os_str().is_empty() {
                return Err(ConfigError::InvalidValue {
                    key: key.flag.to_string(),
                    value: String::new(),
                    reason: "expected a non-empty path".into(),
                });
            }
            return Ok(Some((p.clone(), Origin::Flag(key.flag))));
        }
        if let Some(raw) = self.env(key) {
            return Ok(Some((PathBuf::from(raw.value), raw.origin)));
        }
        match &self.file {
            Some(file) => file.path(key),
            None => Ok(None),
        }
    }

    /// A list setting. Flags and env are comma-separated (flags repeatable);
    /// the file has an array of strings or one comma-separated string.
    fn list<T>(
        &self,
        flags: &[String],
        key: &Key,
        parse_list: fn(&str) -> Result<Vec<T>, String>,
        parse_one: fn(&str) -> Result<Vec<T>, String>,
    ) -> Result<Option<Vec<T>>, ConfigError> {
        let raws: Vec<(Raw, bool)> = if !flags.is_empty() {
            flags
                .iter()
                .map(|v| {
                    let raw = Raw {
                        value: v.clone(),
                        origin: Origin::Flag(key.flag),
                    };
                    (raw, true)
                })
                .collect()
        } else if let Some(raw) = self.env(key) {
            vec![(raw, true)]
        } else if let Some(file) = &self.file {
            match file.list(key)? {
                Some(items) => items,
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for (raw, is_list) in raws {
            out.extend(raw.parse(if is_list { parse_list } else { parse_one })?);
        }
        Ok(Some(out))
    }
}

/// Resolves the node's settings: flag > `MACULA_*` environment variable >
/// config file (`--config` / `MACULA_CONFIG`, read only when given) > default.
///
/// `env` looks up an environment variable; the binary passes
/// `|k| std::env::var(k).ok()`. A variable that is set but empty counts as
/// unset. Relative paths in the file are taken from the file's directory.
pub fn resolve(
    args: &NodeArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let mut layers = Layers { env, file: None };
    let config_file = match &args.config {
        Some(p) if p.as_os_str().is_empty() => {
            return Err(ConfigError::InvalidValue {
                key: keys::CONFIG.flag.to_string(),
                value: String::new(),
                reason: "expected the path of a TOML file".into(),
            })
        }
        Some(p) => Some(p.clone()),
        None => layers.env(&keys::CONFIG).map(|r| PathBuf::from(r.value)),
    };
    if let Some(path) = &config_file {
        layers.file = Some(FileLayer::load(path)?);
    }

    let d = Settings {
        config_file,
        ..Settings::default()
    };

    let listen = val(layers.value(&args.listen, &keys::LISTEN, false, parse_socket_addr)?);
    let realm = val(layers.value(&args.realm, &keys::REALM, false, parse_realm)?);
    let bootstrap = layers.list(&args.bootstrap, &keys::BOOTSTRAP, parse_peers, parse_peer)?;
    let data_dir = val(layers.path(&args.data_dir, &keys::DATA_DIR)?);
    let http = val(layers.value(&args.http, &keys::HTTP, false, parse_socket_addr)?);
    let tls_mode = layers.value(&args.tls_mode, &keys::TLS_MODE, false, str::parse)?;
    let ca = layers.path(&args.tls_ca_cert_file, &keys::TLS_CA_CERT_FILE)?;
    let cert = layers.path(&args.tls_cert_file, &keys::TLS_CERT_FILE)?;
    let tls_pinned = layers.list(
        &args.tls_pinned,
        &keys::TLS_PINNED,
        parse_node_ids,
        parse_node_id,
    )?;
    let max_frame_size = val(layers.value(
        &args.max_frame_size,
        &keys::MAX_FRAME_SIZE,
        true,
        parse_max_frame_size,
    )?);
    let max_connections = val(layers.value(
        &args.max_connections,
        &keys::MAX_CONNECTIONS,
        true,
        parse_max_connections,
    )?);
    let idle_timeout = val(layers.value(
        &args.idle_timeout,
        &keys::IDLE_TIMEOUT,
        true,
        parse_idle_timeout,
    )?);
    let pubsub_queue_capacity = val(layers.value(
        &args.pubsub_queue_capacity,
        &keys::PUBSUB_QUEUE_CAPACITY,
        true,
        parse_pubsub_queue_capacity,
    )?);
    let pubsub_queue_bytes = val(layers.value(
        &args.pubsub_queue_bytes,
        &keys::PUBSUB_QUEUE_BYTES,
        true,
        parse_pubsub_queue_bytes,
    )?);
    let pubsub_peer_queue_capacity = val(layers.value(
        &args.pubsub_peer_queue_capacity,
        &keys::PUBSUB_PEER_QUEUE_CAPACITY,
        true,
        parse_pubsub_peer_queue_capacity,
    )?);
    let pubsub_peer_queue_bytes = val(layers.value(
        &args.pubsub_peer_queue_bytes,
        &keys::PUBSUB_PEER_QUEUE_BYTES,
        true,
        parse_pubsub_peer_queue_bytes,
    )?);
    let pubsub_stall_timeout = val(layers.value(
        &args.pubsub_stall_timeout,
        &keys::PUBSUB_STALL_TIMEOUT,
        true,
        parse_pubsub_stall_timeout,
    )?);
    let peer_down_after = val(layers.value(
        &args.peer_down_after,
        &keys::PEER_DOWN_AFTER,
        true,
        parse_peer_down_after,
    )?);
    let peer_slots =
        val(layers.value(&args.peer_slots, &keys::PEER_SLOTS, true, parse_peer_slots)?);
    let stream_receive_window = val(layers.value(
        &args.stream_receive_window,
        &keys::STREAM_RECEIVE_WINDOW,
        true,
        parse_window_u32,
    )?);
    let connection_receive_window = val(layers.value(
        &args.connection_receive_window,
        &keys::CONNECTION_RECEIVE_WINDOW,
        true,
        parse_window_u32,
    )?);
    let send_window =
        val(layers.value(&args.send_window, &keys::SEND_WINDOW, true, parse_window)?);
    let socket_buffer = val(layers.value(
        &args.socket_buffer,
        &keys::SOCKET_BUFFER,
        true,
        parse_socket_buffer,
    )?);
    let max_streams_per_client = val(layers.value(
        &args.max_streams_per_client,
        &keys::MAX_STREAMS_PER_CLIENT,
        true,
        parse_client_streams,
    )?);
    let relay_max_sessions = val(layers.value(
        &args.relay_max_sessions,
        &keys::RELAY_MAX_SESSIONS,
        true,
        parse_relay_count,
    )?);
    let relay_max_reservations = val(layers.value(
        &args.relay_max_reservations,
        &keys::RELAY_MAX_RESERVATIONS,
        true,
        parse_relay_count,
    )?);
    let relay_bytes_per_second = val(layers.value(
        &args.relay_bytes_per_second,
        &keys::RELAY_BYTES_PER_SECOND,
        true,
        parse_relay_bytes_per_second,
    )?);
    let relay_idle_timeout = val(layers.value(
        &args.relay_idle_timeout,
        &keys::RELAY_IDLE_TIMEOUT,
        true,
        parse_relay_idle_timeout,
    )?);
    let reachability = val(layers.value(
        &args.reachability,
        &keys::REACHABILITY,
        false,
        parse_reachability,
    )?);
    let raft_groups = layers.list(
        &args.raft_groups,
        &keys::RAFT_GROUPS,
        parse_raft_groups,
        parse_raft_group,
    )?;
    let raft_members = layers.list(
        &args.raft_members,
        &keys::RAFT_MEMBERS,
        parse_node_ids,
        parse_node_id,
    )?;
    let raft_timeout = val(layers.value(
        &args.raft_timeout,
        &keys::RAFT_TIMEOUT,
        true,
        parse_raft_timeout,
    )?);
    let raft_max_groups = val(layers.value(
        &args.raft_max_groups,
        &keys::RAFT_MAX_GROUPS,
        true,
        parse_raft_max_groups,
    )?);
    let raft_election_timeout = val(layers.value(
        &args.raft_election_timeout,
        &keys::RAFT_ELECTION_TIMEOUT,
        true,
        parse_raft_election_timeout,
    )?);
    let log_format = val(layers.value(&args.log_format, &keys::LOG_FORMAT, false, str::parse)?);

    let (tls_mode, mode_origin) = match tls_mode {
        Some((mode, origin)) => (mode, format!("set by {origin}")),
        None => (d.tls_mode, "the default".to_string()),
    };
    let (tls_ca_cert_file, tls_cert_file) = check_tls(tls_mode, &mode_origin, ca, cert)?;
    let raft_max_groups = raft_max_groups.unwrap_or(d.raft_max_groups);
    let (raft_groups, raft_members) = check_raft(
        raft_groups.unwrap_or_default(),
        raft_members.unwrap_or_default(),
        raft_max_groups,
    )?;

    Ok(Settings {
        listen: listen.unwrap_or(d.listen),
        realm: realm.unwrap_or(d.realm),
        bootstrap: bootstrap.unwrap_or(d.bootstrap),
        data_dir: data_dir.unwrap_or(d.data_dir),
        http: http.unwrap_or(d.http),
        tls_mode,
        tls_ca_cert_file,
        tls_cert_file,
        tls_pinned: tls_pinned.unwrap_or(d.tls_pinned),
        max_frame_size: max_frame_size.unwrap_or(d.max_frame_size),
        max_connections: max_connections.unwrap_or(d.max_connections),
        idle_timeout: idle_timeout.unwrap_or(d.idle_timeout),
        pubsub_queue_capacity: pubsub_queue_capacity.unwrap_or(d.pubsub_queue_capacity),
        pubsub_queue_bytes: pubsub_queue_bytes.unwrap_or(d.pubsub_queue_bytes),
        pubsub_peer_queue_capacity: pubsub_peer_queue_capacity
            .unwrap_or(d.pubsub_peer_queue_capacity),
        pubsub_peer_queue_bytes: pubsub_peer_queue_bytes.unwrap_or(d.pubsub_peer_queue_bytes),
        pubsub_stall_timeout: pubsub_stall_timeout.unwrap_or(d.pubsub_stall_timeout),
        peer_down_after: peer_down_after.unwrap_or(d.peer_down_after),
        peer_slots: peer_slots.unwrap_or(d.peer_slots),
        stream_receive_window: stream_receive_window.unwrap_or(d.stream_receive_window),
        connection_receive_window: connection_receive_window.unwrap_or(d.connection_receive_window),
        send_window: send_window.unwrap_or(d.send_window),
        socket_buffer: socket_buffer.unwrap_or(d.socket_buffer),
        max_streams_per_client: max_streams_per_client.unwrap_or(d.max_streams_per_client),
        relay_max_sessions: relay_max_sessions.unwrap_or(d.relay_max_sessions),
        relay_max_reservations: relay_max_reservations.unwrap_or(d.relay_max_reservations),
        relay_bytes_per_second: relay_bytes_per_second.unwrap_or(d.relay_bytes_per_second),
        relay_idle_timeout: relay_idle_timeout.unwrap_or(d.relay_idle_timeout),
        reachability: reachability.unwrap_or(d.reachability),
        raft_groups,
        raft_members,
        raft_timeout: raft_timeout.unwrap_or(d.raft_timeout),
        raft_max_groups,
        raft_election_timeout: raft_election_timeout.unwrap_or(d.raft_election_timeout),
        log_format: log_format.unwrap_or(d.log_format),
        config_file: d.config_file,
    })
}

/// Drops the origin of a resolved value.
fn val<T>(o: Option<(T, Origin)>) -> Option<T> {
    o.map(|(v, _)| v)
}

type TlsFiles = (Option<PathBuf>, Option<PathBuf>);

/// Every name of a setting, for messages about settings that clash.
fn all_names(k: &Key) -> String {
    format!(
        "{} (or {}, or `{}` in the config file)",
        k.flag, k.env, k.toml
    )
}

/// Drops repeated group names and members (keeping the first), refuses
/// members without a group (they would be silently ignored) and more groups
/// than the node may run.
fn check_raft(
    groups: Vec<String>,
    members: Vec<NodeId>,
    max_groups: usize,
) -> Result<(Vec<String>, Vec<NodeId>), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    let groups: Vec<String> = groups
        .into_iter()
        .filter(|g| seen.insert(g.clone()))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let members: Vec<NodeId> = members.into_iter().filter(|m| seen.insert(*m)).collect();
    if groups.is_empty() && !members.is_empty() {
        let list: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        return Err(ConfigError::Conflict {
            key: all_names(&keys::RAFT_MEMBERS),
            value: list.join(","),
            reason: format!(
                "no Raft group is named: the members are the founding voters of the groups \
                 named with {}",
                all_names(&keys::RAFT_GROUPS)
            ),
        });
    }
    if groups.len() > max_groups {
        return Err(ConfigError::Conflict {
            key: all_names(&keys::RAFT_GROUPS),
            value: groups.join(","),
            reason: format!(
                "that is {} groups and a node runs at most {max_groups} ({})",
                groups.len(),
                keys::RAFT_MAX_GROUPS.flag
            ),
        });
    }
    Ok((groups, members))
}

/// CA mode needs both files; self mode must not be given them (they would be
/// silently ignored, which looks like CA verification but is not).
fn check_tls(
    mode: TlsModeSetting,
    mode_origin: &str,
    ca: Option<(PathBuf, Origin)>,
    cert: Option<(PathBuf, Origin)>,
) -> Result<TlsFiles, ConfigError> {
    match mode {
        TlsModeSetting::Ca => {
            let Some((ca, _)) = ca else {
                return Err(ConfigError::Missing {
                    key: all_names(&keys::TLS_CA_CERT_FILE),
                    reason: format!(
                        "TLS mode \"ca\" ({mode_origin}) needs the CA certificate (PEM) \
                         that every peer's chain must lead to"
                    ),
                });
            };
            let Some((cert, _)) = cert else {
                return Err(ConfigError::Missing {
                    key: all_names(&keys::TLS_CERT_FILE),
                    reason: format!(
                        "TLS mode \"ca\" ({mode_origin}) needs this node's certificate \
                         chain (PEM), issued by the CA for the node key"
                    ),
                });
            };
            Ok((Some(ca), Some(cert)))
        }
        TlsModeSetting::SelfCertifying => {
            if let Some((path, origin)) = ca.or(cert) {
                return Err(ConfigError::Conflict {
                    key: origin.to_string(),
                    value: path.display().to_string(),
                    reason: format!(
                        "the TLS mode is \"self\" ({mode_origin}); CA files are only used \
                         with TLS mode \"ca\": set {} ca or remove the setting",
                        keys::TLS_MODE.flag
                    ),
                });
            }
            Ok((None, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        f.write_all(text.as_bytes()).expect("write temp file");
        f
    }

    fn args_with_config(f: &tempfile::NamedTempFile) -> NodeArgs {
        NodeArgs {
            config: Some(f.path().to_path_buf()),
            ..NodeArgs::default()
        }
    }

    fn err_of(args: &NodeArgs, env: &dyn Fn(&str) -> Option<String>) -> String {
        match resolve(args, env) {
            Ok(s) => panic!("expected an error, got {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn nid(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    #[test]
    fn zero_config_gives_defaults() {
        let s = resolve(&NodeArgs::default(), &no_env).unwrap();
        assert_eq!(s.listen, "0.0.0.0:4433".parse().unwrap());
        assert_eq!(s.realm, "default");
        assert!(s.bootstrap.is_empty());
        assert_eq!(s.data_dir, default_data_dir());
        assert_eq!(s.http, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.tls_mode, TlsModeSetting::SelfCertifying);
        assert_eq!(s.tls_ca_cert_file, None);
        assert_eq!(s.tls_cert_file, None);
        assert!(s.tls_pinned.is_empty());
        assert_eq!(s.max_frame_size, 1_048_576);
        assert_eq!(s.max_connections, 1000);
        assert_eq!(s.idle_timeout, Duration::from_secs(300));
        assert_eq!(s.pubsub_queue_capacity, 65_536);
        assert_eq!(s.pubsub_queue_bytes, 64 << 20);
        assert_eq!(s.pubsub_peer_queue_capacity, 65_536);
        assert_eq!(s.pubsub_peer_queue_bytes, 32 << 20);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.config_file, None);
    }

    #[test]
    fn documented_defaults_match_the_constants() {
        let d = Settings::default();
        assert_eq!(parse_socket_addr(keys::LISTEN.default), Ok(d.listen));
        assert_eq!(keys::REALM.default, d.realm);
        assert_eq!(parse_socket_addr(keys::HTTP.default), Ok(d.http));
        assert_eq!(keys::TLS_MODE.default.parse(), Ok(d.tls_mode));
        assert_eq!(
            parse_max_frame_size(keys::MAX_FRAME_SIZE.default),
            Ok(d.max_frame_size)
        );
        assert_eq!(
            parse_max_connections(keys::MAX_CONNECTIONS.default),
            Ok(d.max_connections)
        );
        assert_eq!(
            parse_idle_timeout(keys::IDLE_TIMEOUT.default),
            Ok(d.idle_timeout)
        );
        assert_eq!(
            parse_pubsub_queue_capacity(keys::PUBSUB_QUEUE_CAPACITY.default),
            Ok(d.pubsub_queue_capacity)
        );
        assert_eq!(
            parse_pubsub_queue_bytes(keys::PUBSUB_QUEUE_BYTES.default),
            Ok(d.pubsub_queue_bytes)
        );
        assert_eq!(
            parse_pubsub_peer_queue_capacity(keys::PUBSUB_PEER_QUEUE_CAPACITY.default),
            Ok(d.pubsub_peer_queue_capacity)
        );
        assert_eq!(
            parse_pubsub_peer_queue_bytes(keys::PUBSUB_PEER_QUEUE_BYTES.default),
            Ok(d.pubsub_peer_queue_bytes)
        );
        // The daemon's defaults are the pub/sub core's.
        let pubsub = macula::config::PubSubLimits::default();
        assert_eq!(d.pubsub_queue_capacity, pubsub.queue_capacity);
        assert_eq!(d.pubsub_queue_bytes, pubsub.queue_bytes);
        assert_eq!(d.pubsub_peer_queue_capacity, pubsub.peer_queue_capacity);
        assert_eq!(d.pubsub_peer_queue_bytes, pubsub.peer_queue_bytes);
        assert_eq!(
            parse_pubsub_stall_timeout(keys::PUBSUB_STALL_TIMEOUT.default),
            Ok(d.pubsub_stall_timeout)
        );
        assert_eq!(
            parse_peer_down_after(keys::PEER_DOWN_AFTER.default),
            Ok(d.peer_down_after)
        );
        assert_eq!(
            d.peer_down_after,
            macula::config::Limits::default().peer_down_after
        );
        assert_eq!(
            parse_relay_count(keys::RELAY_MAX_SESSIONS.default),
            Ok(d.relay_max_sessions)
        );
        assert_eq!(
            parse_relay_count(keys::RELAY_MAX_RESERVATIONS.default),
            Ok(d.relay_max_reservations)
        );
        assert_eq!(
            parse_relay_bytes_per_second(keys::RELAY_BYTES_PER_SECOND.default),
            Ok(d.relay_bytes_per_second)
        );
        assert_eq!(
            parse_relay_idle_timeout(keys::RELAY_IDLE_TIMEOUT.default),
            Ok(d.relay_idle_timeout)
        );
        assert_eq!(
            parse_reachability(keys::REACHABILITY.default),
            Ok(d.reachability)
        );
        assert_eq!(keys::LOG_FORMAT.default.parse(), Ok(d.log_format));
        assert_eq!(
            parse_raft_timeout(keys::RAFT_TIMEOUT.default),
            Ok(d.raft_timeout)
        );
        assert_eq!(
            parse_raft_max_groups(keys::RAFT_MAX_GROUPS.default),
            Ok(d.raft_max_groups)
        );
        assert_eq!(
            parse_raft_election_timeout(keys::RAFT_ELECTION_TIMEOUT.default),
            Ok(d.raft_election_timeout)
        );
        // The daemon's defaults are the runtime's (heartbeat: a quarter).
        let raft = macula::config::RaftLimits::default();
        assert_eq!(d.raft_election_timeout / 4, raft.heartbeat);
        assert!(d.raft_groups.is_empty() && d.raft_members.is_empty());
        assert_eq!(
            parse_window_u32(keys::STREAM_RECEIVE_WINDOW.default),
            Ok(d.stream_receive_window)
        );
        assert_eq!(
            parse_window_u32(keys::CONNECTION_RECEIVE_WINDOW.default),
            Ok(d.connection_receive_window)
        );
        assert_eq!(parse_window(keys::SEND_WINDOW.default), Ok(d.send_window));
        assert_eq!(parse_peer_slots(keys::PEER_SLOTS.default), Ok(d.peer_slots));
        assert_eq!(
            parse_socket_buffer(keys::SOCKET_BUFFER.default),
            Ok(d.socket_buffer)
        );
        assert_eq!(
            parse_client_streams(keys::MAX_STREAMS_PER_CLIENT.default),
            Ok(d.max_streams_per_client)
        );
        for k in keys::ALL {
            assert!(
                k.flag.starts_with("--") && k.env.starts_with("MACULA_"),
                "{k:?}"
            );
        }
    }

    #[test]
    fn each_layer_beats_the_next() {
        let f = toml_file(
            r#"
listen = "198.18.0.3:3"
realm = "from-file"
http = "127.0.0.1:9003"
[limits]
max_connections = 30
idle_timeout = "30s"
pubsub_queue_capacity = 1000
pubsub_queue_bytes = "1MiB"
pubsub_peer_queue_capacity = 100
pubsub_peer_queue_bytes = 131072
pubsub_stall_timeout = "5s"
[log]
format = "json"
"#,
        );
        let env = env_of(&[
            ("MACULA_LISTEN", "198.18.0.2:2"),
            ("MACULA_REALM", "from-env"),
            ("MACULA_MAX_CONNECTIONS", "20"),
            ("MACULA_PUBSUB_STALL_TIMEOUT", "3s"),
            ("MACULA_PUBSUB_QUEUE_BYTES", "4MiB"),
            ("MACULA_PUBSUB_PEER_QUEUE_CAPACITY", "300"),
        ]);
        let mut args = args_with_config(&f);
        args.listen = Some("198.18.0.1:1".into());
        args.pubsub_queue_capacity = Some("2000".into());
        args.pubsub_queue_bytes = Some("2MiB".into());
        args.pubsub_peer_queue_capacity = Some("200".into());

        let s = resolve(&args, &env).unwrap();
        assert_eq!(
            s.listen,
            "198.18.0.1:1".parse().unwrap(),
            "flag beats env and file"
        );
        assert_eq!(s.realm, "from-env", "env beats file");
        assert_eq!(s.max_connections, 20, "env beats file");
        assert_eq!(s.pubsub_queue_capacity, 2000, "flag beats file");
        assert_eq!(s.pubsub_queue_bytes, 2 << 20, "flag beats env and file");
        assert_eq!(s.pubsub_peer_queue_capacity, 200, "flag beats env and file");
        assert_eq!(s.pubsub_peer_queue_bytes, 128 << 10, "file beats default");
        assert_eq!(
            s.pubsub_stall_timeout,
            Duration::from_secs(3),
            "env beats file"
        );
        assert_eq!(
            s.http,
            "127.0.0.1:9003".parse().unwrap(),
            "file beats default"
        );
        assert_eq!(
            s.idle_timeout,
            Duration::from_secs(30),
            "file beats default"
        );
        assert_eq!(s.log_format, LogFormat::Json, "file beats default");
        assert_eq!(
            s.max_frame_size, DEFAULT_MAX_FRAME_SIZE,
            "default when unset"
        );
        assert_eq!(s.config_file.as_deref(), Some(f.path()));

        // Remove the flag: env wins; remove env: the file wins.
        args.listen = None;
        args.pubsub_queue_bytes = None;
        args.pubsub_peer_queue_capacity = None;
        let s = resolve(&args, &env).unwrap();
        assert_eq!(s.listen, "198.18.0.2:2".parse().unwrap());
        assert_eq!(s.pubsub_queue_bytes, 4 << 20, "env beats file");
        assert_eq!(s.pubsub_peer_queue_capacity, 300, "env beats file");
        let s = resolve(&args, &no_env).unwrap();
        assert_eq!(s.listen, "198.18.0.3:3".parse().unwrap());
        assert_eq!(s.realm, "from-file");
        assert_eq!(s.max_connections, 30);
        assert_eq!(s.pubsub_queue_bytes, 1 << 20);
        assert_eq!(s.pubsub_peer_queue_capacity, 100);
        assert_eq!(s.pubsub_peer_queue_bytes, 128 << 10);

        // Flags beat env for every kind of setting.
        let args = NodeArgs {
            realm: Some("from-flag".into()),
            max_connections: Some("10".into()),
            log_format: Some("text".into()),
            ..args_with_config(&f)
        };
        let s = resolve(&args, &env).unwrap();
        assert_eq!(s.realm, "from-flag");
        assert_eq!(s.max_connections, 10);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn list_settings_are_layered_as_a_whole() {
        let a = nid(1);
        let f = toml_file(&format!(
            "bootstrap = [\"file:1\", \"quic://{a}@[::1]:2\"]\n[tls]\npinned = [\"{a}\"]\n"
        ));
        let s = resolve(&args_with_config(&f), &no_env).unwrap();
        assert_eq!(
            s.bootstrap,
            vec![
                PeerAddr::new("file", 1),
                PeerAddr::new("::1", 2).with_expected(a)
            ]
        );
        assert_eq!(s.tls_pinned, vec![a]);

        let env = env_of(&[
            ("MACULA_BOOTSTRAP_PEERS", "env:1, quic://env:2"),
            ("MACULA_TLS_PINNED", &format!("{},{}", nid(2), nid(3))),
        ]);
        let s = resolve(&args_with_config(&f), &env).unwrap();
        assert_eq!(
            s.bootstrap,
            vec![PeerAddr::new("env", 1), PeerAddr::new("env", 2)]
        );
        assert_eq!(s.tls_pinned, vec![nid(2), nid(3)]);

        let args = NodeArgs {
            bootstrap: vec!["flag:1,flag:2".into(), format!("{a}@flag:3")],
            tls_pinned: vec![nid(4).to_string()],
            ..args_with_config(&f)
        };
        let s = resolve(&args, &env).unwrap();
        assert_eq!(
            s.bootstrap,
            vec![
                PeerAddr::new("flag", 1),
                PeerAddr::new("flag", 2),
                PeerAddr::new("flag", 3).with_expected(a)
            ]
        );
        assert_eq!(s.tls_pinned, vec![nid(4)]);

        // An explicitly empty flag clears the list from lower layers.
        let args = NodeArgs {
            bootstrap: vec![String::new()],
            ..args_with_config(&f)
        };
        assert!(resolve(&args, &env).unwrap().bootstrap.is_empty());
    }

    #[test]
    fn bootstrap_as_a_single_string_in_the_file() {
        let f = toml_file("bootstrap = \"a:1,b:2\"\n");
        let s = resolve(&args_with_config(&f), &no_env).unwrap();
        assert_eq!(
            s.bootstrap,
            vec![PeerAddr::new("a", 1), PeerAddr::new("b", 2)]
        );
    }

    #[test]
    fn empty_env_counts_as_unset() {
        let f = toml_file("realm = \"from-file\"\nbootstrap = [\"a:1\"]\n");
        let env = env_of(&[("MACULA_REALM", ""), ("MACULA_BOOTSTRAP_PEERS", " ")]);
        let s = resolve(&args_with_config(&f), &env).unwrap();
        assert_eq!(s.realm, "from-file");
        assert_eq!(s.bootstrap, vec![PeerAddr::new("a", 1)]);
    }

    #[test]
    fn config_file_from_env_and_flag_precedence() {
        let env_file = toml_file("realm = \"env-file\"\n");
        let flag_file = toml_file("realm = \"flag-file\"\n");
        let env_path = env_file.path().to_string_lossy().into_owned();
        let env = env_of(&[("MACULA_CONFIG", &env_path)]);
        let s = resolve(&NodeArgs::default(), &env).unwrap();
        assert_eq!(s.realm, "env-file");
        let s = resolve(&args_with_config(&flag_file), &env).unwrap();
        assert_eq!(s.realm, "flag-file");
    }

    #[test]
    fn relative_paths_in_the_file_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("macula.toml");
        std::fs::write(
            &path,
            "data_dir = \"state\"\n[tls]\nmode = \"ca\"\nca_cert_file = \"/etc/ca.pem\"\ncert_file = \"node.pem\"\n",
        )
        .unwrap();
        let args = NodeArgs {
            config: Some(path),
            ..NodeArgs::default()
        };
        let s = resolve(&args, &no_env).unwrap();
        assert_eq!(s.data_dir, dir.path().join("state"));
        assert_eq!(s.tls_mode, TlsModeSetting::Ca);
        assert_eq!(s.tls_ca_cert_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(s.tls_cert_file, Some(dir.path().join("node.pem")));

        // Flags and env are taken as given (relative to the working directory).
        let env = env_of(&[("MACULA_DATA_DIR", "rel/env")]);
        assert_eq!(
            resolve(&NodeArgs::default(), &env).unwrap().data_dir,
            PathBuf::from("rel/env")
        );
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let f = toml_file("[limits]\nmax_frame_size = 7\n");
        let file = f.path().display().to_string();
        // (flags, environment, expected start of the message)
        type Case<'a> = (NodeArgs, Vec<(&'a str, &'a str)>, String);
        let cases: Vec<Case> = vec![
            (
                NodeArgs {
                    listen: Some("abc".into()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"abc\" for --listen: expected an IP:PORT socket address".into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_REALM", "x..y")],
                "invalid value \"x..y\" for MACULA_REALM: a realm cannot have an empty label"
                    .into(),
            ),
            (
                args_with_config(&f),
                vec![],
                format!(
                    "invalid value \"7\" for `limits.max_frame_size` in {file}: must be from 1024"
                ),
            ),
            (
                NodeArgs {
                    http: Some("localhost:80".into()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"localhost:80\" for --http: ".into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_BOOTSTRAP_PEERS", "a:1,,b:2")],
                "invalid value \"a:1,,b:2\" for MACULA_BOOTSTRAP_PEERS: empty item 2".into(),
            ),
            (
                NodeArgs {
                    bootstrap: vec!["tcp://a:1".into()],
                    ..Default::default()
                },
                vec![],
                "invalid value \"tcp://a:1\" for --bootstrap: unsupported scheme".into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_TLS_MODE", "mutual")],
                "invalid value \"mutual\" for MACULA_TLS_MODE: expected \"self\" or \"ca\"".into(),
            ),
            (
                NodeArgs {
                    tls_pinned: vec!["nope".into()],
                    ..Default::default()
                },
                vec![],
                "invalid value \"nope\" for --tls-pinned: a node ID has 52 characters".into(),
            ),
            (
                NodeArgs {
                    max_connections: Some("0".into()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"0\" for --max-connections: expected a whole number from 1 to 100000"
                    .into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_MAX_CONNECTIONS", "100001")],
                "invalid value \"100001\" for MACULA_MAX_CONNECTIONS".into(),
            ),
            (
                NodeArgs {
                    idle_timeout: Some("250ms".into()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"250ms\" for --idle-timeout: must be at least 1s and at most 24h"
                    .into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_IDLE_TIMEOUT", "soon")],
                "invalid value \"soon\" for MACULA_IDLE_TIMEOUT: expected a duration".into(),
            ),
            (
                NodeArgs {
                    max_frame_size: Some("17MiB".into()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"17MiB\" for --max-frame-size: must be from 1024 (1KiB) to 16777216"
                    .into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_LOG_FORMAT", "xml")],
                "invalid value \"xml\" for MACULA_LOG_FORMAT: expected \"text\" or \"json\"".into(),
            ),
            (
                NodeArgs {
                    data_dir: Some(PathBuf::new()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"\" for --data-dir: expected a non-empty path".into(),
            ),
        ];
        for (args, env, want) in cases {
            let got = err_of(&args, &env_of(&env));
            assert!(got.starts_with(&want), "\n got: {got}\nwant: {want}...");
        }
    }

    #[test]
    fn file_type_errors_name_key_and_value() {
        let cases = [
            (
                "listen = 4433\n",
                "invalid value \"4433\" for `listen` in",
                "expected a string",
            ),
            (
                "bootstrap = [1]\n",
                "invalid value \"1\" for `bootstrap` in",
                "expected an array of strings",
            ),
            (
                "bootstrap = [\"\"]\n",
                "invalid value \"\" for `bootstrap` in",
                "empty peer address",
            ),
            (
                "[limits]\nidle_timeout = true\n",
                "invalid value \"true\" for `limits.idle_timeout` in",
                "expected an integer or a string",
            ),
            (
                "[limits]\nmax_connections = -1\n",
                "invalid value \"-1\" for `limits.max_connections` in",
                "expected a whole number",
            ),
            (
                "data_dir = \"\"\n",
                "invalid value \"\" for `data_dir` in",
                "non-empty path",
            ),
            (
                "tls = \"ca\"\n",
                "invalid value \"ca\" for `tls` in",
                "expected a table ([tls])",
            ),
            (
                "[tls]\npinned = [\"abc\"]\n",
                "invalid value \"abc\" for `tls.pinned` in",
                "a node ID has 52 characters",
            ),
        ];
        for (text, prefix, reason) in cases {
            let f = toml_file(text);
            let got = err_of(&args_with_config(&f), &no_env);
            let file = f.path().display().to_string();
            assert!(
                got.starts_with(prefix) && got.contains(&file) && got.contains(reason),
                "{text:?}: {got}"
            );
        }
    }

    #[test]
    fn integers_and_strings_for_sizes_and_durations_in_the_file() {
        let f = toml_file(
            "[limits]\nmax_frame_size = \"64KiB\"\nidle_timeout = 90\nmax_connections = \"5\"\n",
        );
        let s = resolve(&args_with_config(&f), &no_env).unwrap();
        assert_eq!(s.max_frame_size, 64 * 1024);
        assert_eq!(s.idle_timeout, Duration::from_secs(90));
        assert_eq!(s.max_connections, 5);
        let f = toml_file("[limits]\nmax_frame_size = 4096\nidle_timeout = \"2h\"\n");
        let s = resolve(&args_with_config(&f), &no_env).unwrap();
        assert_eq!(s.max_frame_size, 4096);
        assert_eq!(s.idle_timeout, Duration::from_secs(7200));
    }

    #[test]
    fn unknown_keys_are_errors_naming_key_and_file() {
        for (text, key) in [
            ("lisen = \"0.0.0.0:1\"\n", "lisen"),
            ("[tls]\nmod = \"ca\"\n", "tls.mod"),
            ("[limits.extra]\nx = 1\n", "limits.extra"),
            ("[metrics]\nport = 9\n", "metrics"),
        ] {
            let f = toml_file(text);
            let err = resolve(&args_with_config(&f), &no_env).unwrap_err();
            assert!(
                matches!(&err, ConfigError::UnknownKey { key: k, .. } if k == key),
                "{text:?}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{key}`")), "{msg}");
            assert!(msg.contains(&f.path().display().to_string()), "{msg}");
            assert!(msg.contains("tls.mode"), "lists known keys: {msg}");
        }
    }

    #[test]
    fn bad_or_missing_file_is_an_error_naming_it() {
        let f = toml_file("listen = \"0.0.0.0:1\n[tls\n");
        let err = resolve(&args_with_config(&f), &no_env).unwrap_err();
        assert!(matches!(err, ConfigError::ParseFile { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
        assert!(msg.contains("line 1"), "says where: {msg}");

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let args = NodeArgs {
            config: Some(missing.clone()),
            ..NodeArgs::default()
        };
        let err = resolve(&args, &no_env).unwrap_err();
        assert!(matches!(err, ConfigError::ReadFile { .. }), "{err:?}");
        assert!(err.to_string().contains(&missing.display().to_string()));

        let env = env_of(&[("MACULA_CONFIG", "/nonexistent/macula.toml")]);
        let msg = err_of(&NodeArgs::default(), &env);
        assert!(msg.contains("/nonexistent/macula.toml"), "{msg}");

        let args = NodeArgs {
            config: Some(PathBuf::new()),
            ..NodeArgs::default()
        };
        assert!(err_of(&args, &no_env).contains("--config"));
    }

    #[test]
    fn no_file_is_read_unless_named() {
        // Even with a macula.toml in the working directory, zero config reads nothing.
        let s = resolve(&NodeArgs::default(), &no_env).unwrap();
        assert_eq!(s.config_file, None);
    }

    #[test]
    fn ca_mode_requires_both_files() {
        let env = env_of(&[("MACULA_TLS_MODE", "ca")]);
        let err = resolve(&NodeArgs::default(), &env).unwrap_err();
        assert!(matches!(err, ConfigError::Missing { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("--tls-ca-cert-file")
                && msg.contains("MACULA_TLS_CACERTFILE")
                && msg.contains("tls.ca_cert_file")
                && msg.contains("MACULA_TLS_MODE"),
            "{msg}"
        );

        let env = env_of(&[
            ("MACULA_TLS_MODE", "CA"),
            ("MACULA_TLS_CACERTFILE", "/ca.pem"),
        ]);
        let msg = err_of(&NodeArgs::default(), &env);
        assert!(
            msg.contains("--tls-cert-file") && msg.contains("MACULA_TLS_CERTFILE"),
            "{msg}"
        );

        let f = toml_file("[tls]\nmode = \"ca\"\ncert_file = \"/node.pem\"\n");
        let msg = err_of(&args_with_config(&f), &no_env);
        assert!(
            msg.contains("tls.ca_cert_file") && msg.contains("`tls.mode` in"),
            "{msg}"
        );

        let args = NodeArgs {
            tls_mode: Some("ca".into()),
            tls_ca_cert_file: Some("/ca.pem".into()),
            tls_cert_file: Some("/node.pem".into()),
            ..NodeArgs::default()
        };
        let s = resolve(&args, &no_env).unwrap();
        assert_eq!(s.tls_mode, TlsModeSetting::Ca);
        assert_eq!(s.tls_ca_cert_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(s.tls_cert_file, Some(PathBuf::from("/node.pem")));
    }

    #[test]
    fn ca_files_without_ca_mode_are_rejected() {
        let env = env_of(&[("MACULA_TLS_CACERTFILE", "/ca.pem")]);
        let err = resolve(&NodeArgs::default(), &env).unwrap_err();
        assert!(matches!(err, ConfigError::Conflict { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("MACULA_TLS_CACERTFILE is set to \"/ca.pem\"") && msg.contains("self"),
            "{msg}"
        );
        let args = NodeArgs {
            tls_mode: Some("self".into()),
            tls_cert_file: Some("/node.pem".into()),
            ..NodeArgs::default()
        };
        assert!(err_of(&args, &no_env).starts_with("--tls-cert-file is set"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size(" 1024B "), Ok(1024));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("64 kib"), Ok(65_536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("16mib"), Ok(16 << 20));
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "-1",
            "1GiB",
            "1 M iB",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size("1MB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("18446744073709551615MiB").is_err(), "overflow");
        assert_eq!(parse_max_frame_size("1KiB"), Ok(1024));
        assert_eq!(parse_max_frame_size("16MiB"), Ok(16 << 20));
        assert!(parse_max_frame_size("1023").is_err());
        assert!(parse_max_frame_size("16777217").is_err());
        assert!(parse_max_frame_size("4294967296").is_err(), "beyond u32");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration(" 1 h "), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2H"), Ok(Duration::from_secs(7200)));
        for bad in [
            "",
            "s",
            "1.5s",
            "-1s",
            "5 minutes",
            "1d",
            "1h30m",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_idle_timeout("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_idle_timeout("1000ms"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_idle_timeout("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_idle_timeout("999ms").is_err());
        assert!(parse_idle_timeout("0").is_err());
        assert!(parse_idle_timeout("25h").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn realms() {
        for ok in [
            "default",
            "io.example.shop",
            "a",
            "a-b.c0",
            "0",
            &"a".repeat(253),
        ] {
            assert_eq!(validate_realm(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "Shop",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "a.-b",
            "a_b",
            "a b",
            "é",
            &"a".repeat(254),
        ] {
            let err = validate_realm(bad).unwrap_err();
            assert!(err.contains("io.example.shop"), "{bad:?}: {err}");
        }
        let args = NodeArgs {
            realm: Some(" io.example.shop ".into()),
            ..NodeArgs::default()
        };
        assert_eq!(resolve(&args, &no_env).unwrap().realm, "io.example.shop");
    }

    #[test]
    fn modes_and_formats_parse_case_insensitively() {
        assert_eq!("Self".parse(), Ok(TlsModeSetting::SelfCertifying));
        assert_eq!(" ca ".parse(), Ok(TlsModeSetting::Ca));
        assert_eq!("JSON".parse(), Ok(LogFormat::Json));
        assert_eq!(TlsModeSetting::Ca.to_string(), "ca");
        assert_eq!(LogFormat::Json.to_string(), "json");
    }

    #[test]
    fn flags_parse_with_clap() {
        use clap::{CommandFactory, Parser};

        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        Cli::command().debug_assert();
        let a = nid(5);
        let cli = Cli::try_parse_from([
            "macula",
            "--listen",
            "[::]:5000",
            "--bootstrap",
            "a:1,b:2",
            "--bootstrap",
            &format!("quic://{a}@c:3"),
            "--tls-pinned",
            &a.to_string(),
            "--idle-timeout",
            "1h",
            "--max-frame-size",
            "2MiB",
            "--data-dir",
            "/tmp/m",
        ])
        .unwrap();
        let s = resolve(&cli.node, &no_env).unwrap();
        assert_eq!(s.listen, "[::]:5000".parse().unwrap());
        assert_eq!(s.bootstrap.len(), 3);
        assert_eq!(s.bootstrap[2], PeerAddr::new("c", 3).with_expected(a));
        assert_eq!(s.tls_pinned, vec![a]);
        assert_eq!(s.idle_timeout, Duration::from_secs(3600));
        assert_eq!(s.max_frame_size, 2 << 20);
        assert_eq!(s.data_dir, PathBuf::from("/tmp/m"));

        let help = Cli::command().render_long_help().to_string();
        for k in keys::ALL {
            assert!(help.contains(k.flag), "help lists {}", k.flag);
            assert!(help.contains(k.env), "help mentions {}", k.env);
        }
    }

    #[test]
    fn raft_settings_layer_and_are_checked() {
        let (a, b) = (nid(1), nid(2));
        let f = toml_file(&format!(
            "raft_groups = [\"cfg\", \"locks\", \"cfg\"]\nraft_members = [\"{a}\", \"{b}\"]\n\
             raft_timeout = \"2s\"\nraft_max_groups = 8\nraft_election_timeout = \"200ms\"\n"
        ));
        let s = resolve(&args_with_config(&f), &no_env).unwrap();
        assert_eq!(s.raft_groups, ["cfg", "locks"], "repeats dropped");
        assert_eq!(s.raft_members, vec![a, b]);
        assert_eq!(s.raft_timeout, Duration::from_secs(2));
        assert_eq!(s.raft_max_groups, 8);
        assert_eq!(s.raft_election_timeout, Duration::from_millis(200));

        let env = env_of(&[
            ("MACULA_RAFT_GROUPS", "x,y"),
            ("MACULA_RAFT_TIMEOUT", "1s"),
            ("MACULA_RAFT_ELECTION_TIMEOUT", "1s"),
        ]);
        let s = resolve(&args_with_config(&f), &env).unwrap();
        assert_eq!(s.raft_groups, ["x", "y"], "env beats file");
        assert_eq!(s.raft_timeout, Duration::from_secs(1));
        assert_eq!(s.raft_election_timeout, Duration::from_secs(1));
        let args = NodeArgs {
            raft_groups: vec!["z".into(), "w.1,v_2".into()],
            raft_members: vec![b.to_string()],
            raft_max_groups: Some("3".into()),
            ..args_with_config(&f)
        };
        let s = resolve(&args, &env).unwrap();
        assert_eq!(s.raft_groups, ["z", "w.1", "v_2"], "flags beat env");
        assert_eq!(s.raft_members, vec![b]);
        assert_eq!(s.raft_max_groups, 3);

        // Members without a group would be ignored: refused, naming both.
        let args = NodeArgs {
            raft_members: vec![a.to_string()],
            ..NodeArgs::default()
        };
        let e = err_of(&args, &no_env);
        assert!(
            e.contains("--raft-members") && e.contains("--raft-group"),
            "{e}"
        );
        // Bad names, too many groups, out-of-range timings.
        for bad in ["a/b", ".hidden", "", &"g".repeat(129)] {
            let args = NodeArgs {
                raft_groups: vec![format!("ok,{bad}")],
                ..NodeArgs::default()
            };
            let e = err_of(&args, &no_env);
            assert!(e.contains("--raft-group"), "{bad:?}: {e}");
        }
        let args = NodeArgs {
            raft_groups: vec!["a,b".into()],
            raft_max_groups: Some("1".into()),
            ..NodeArgs::default()
        };
        let e = err_of(&args, &no_env);
        assert!(
            e.contains("at most 1") && e.contains("--raft-max-groups"),
            "{e}"
        );
        for (flag, bad) in [("timeout", "50ms"), ("election", "2m"), ("max", "0")] {
            let mut a = NodeArgs::default();
            match flag {
                "timeout" => a.raft_timeout = Some(bad.into()),
                "election" => a.raft_election_timeout = Some(bad.into()),
                _ => a.raft_max_groups = Some(bad.into()),
            }
            let e = resolve(&a, &no_env).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("--raft-"), "{flag}: {e}");
        }
    }

    #[test]
    fn connection_buffers_layer_and_are_bounded() {
        let f = toml_file(
            "[limits]\nstream_receive_window = \"256KiB\"\nsend_window = 65536\nmax_streams_per_client = 6\n",
        );
        let env = env_of(&[
            ("MACULA_SOCKET_BUFFER", "8MiB"),
            ("MACULA_PEER_SLOTS", "16"),
        ]);
        let args = NodeArgs {
            config: Some(f.path().to_path_buf()),
            connection_receive_window: Some("2MiB".into()),
            ..Default::default()
        };
        let s = resolve(&args, &env).unwrap();
        assert_eq!(s.stream_receive_window, 256 << 10);
        assert_eq!(s.connection_receive_window, 2 << 20);
        assert_eq!(s.send_window, 65536);
        assert_eq!(s.socket_buffer, 8 << 20);
        assert_eq!(s.max_streams_per_client, 6);
        assert_eq!(s.peer_slots, 16);
        for (flag, bad) in [
            ("stream", "1KiB"),
            ("send", "2048MiB"),
            ("socket", "1KiB"),
            ("streams", "1"),
        ] {
            let mut a = NodeArgs::default();
            match flag {
                "stream" => a.stream_receive_window = Some(bad.into()),
                "send" => a.send_window = Some(bad.into()),
                "socket" => a.socket_buffer = Some(bad.into()),
                _ => a.max_streams_per_client = Some(bad.into()),
            }
            let e = resolve(&a, &no_env).unwrap_err().to_string();
            assert!(e.contains(bad), "{flag}: {e}");
        }
    }

    #[test]
    fn pubsub_queue_bounds_are_refused_naming_the_key() {
        // In range at both ends, through every layer.
        let args = NodeArgs {
            pubsub_queue_bytes: Some("64KiB".into()),
            pubsub_peer_queue_capacity: Some("10000000".into()),
            pubsub_peer_queue_bytes: Some("16384MiB".into()),
            ..Default::default()
        };
        let s = resolve(&args, &no_env).unwrap();
        assert_eq!(s.pubsub_queue_bytes, 64 << 10);
        assert_eq!(s.pubsub_peer_queue_capacity, 10_000_000);
        assert_eq!(s.pubsub_peer_queue_bytes as u64, 16 << 30);

        // Out of range: the flag, the variable or the file key is named with
        // the value.
        let over = (16u64 << 30) + 1;
        // (flags, environment, expected start of the message)
        type Case = (NodeArgs, Vec<(&'static str, String)>, String);
        let cases: Vec<Case> = vec![
            (
                NodeArgs {
                    pubsub_queue_bytes: Some("65535".into()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"65535\" for --pubsub-queue-bytes: must be from 65536 to 17179869184 bytes".into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_PUBSUB_QUEUE_BYTES", over.to_string())],
                format!("invalid value \"{over}\" for MACULA_PUBSUB_QUEUE_BYTES: must be from 65536"),
            ),
            (
                NodeArgs {
                    pubsub_peer_queue_capacity: Some("15".into()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"15\" for --pubsub-peer-queue-capacity: expected a whole number from 16 to 10000000".into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_PUBSUB_PEER_QUEUE_CAPACITY", "10000001".into())],
                "invalid value \"10000001\" for MACULA_PUBSUB_PEER_QUEUE_CAPACITY: expected a whole number".into(),
            ),
            (
                NodeArgs {
                    pubsub_peer_queue_bytes: Some("1KiB".into()),
                    ..Default::default()
                },
                vec![],
                "invalid value \"1KiB\" for --pubsub-peer-queue-bytes: must be from 65536 to 17179869184 bytes".into(),
            ),
            (
                NodeArgs::default(),
                vec![("MACULA_PUBSUB_PEER_QUEUE_BYTES", "lots".into())],
                "invalid value \"lots\" for MACULA_PUBSUB_PEER_QUEUE_BYTES: expected a size".into(),
            ),
        ];
        for (args, env, want) in cases {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let got = err_of(&args, &env_of(&env));
            assert!(got.starts_with(&want), "\n got: {got}\nwant: {want}...");
        }
        for (key, bad) in [
            ("pubsub_queue_bytes", "0"),
            ("pubsub_peer_queue_capacity", "0"),
            ("pubsub_peer_queue_bytes", "\"32GiB\""),
        ] {
            let f = toml_file(&format!("[limits]\n{key} = {bad}\n"));
            let got = err_of(&args_with_config(&f), &no_env);
            let want = format!(
                "invalid value {:?} for `limits.{key}` in {}",
                bad.trim_matches('"'),
                f.path().display()
            );
            assert!(got.starts_with(&want), "\n got: {got}\nwant: {want}...");
        }
    }
}
