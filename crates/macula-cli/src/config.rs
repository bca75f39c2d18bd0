//! The daemon's layered configuration: command-line flags, then `MACULA_*`
//! environment variables, then an optional TOML file, then defaults.
//!
//! Every setting is declared once, in the `settings!` table below: its
//! field, type, default, parser, kind, flag, environment variable, TOML key
//! and help. The table generates the [`keys`] constants, the clap flags of
//! [`NodeArgs`], the fields of [`Settings`] and their resolution; nothing
//! else names a setting unless it needs that one (cross-checks, tests).
//!
//! [`resolve`] turns [`NodeArgs`] (the flags of `macula start`) plus an
//! environment lookup into validated [`Settings`]. Every error names the key
//! as the user wrote it (`--listen`, `MACULA_REALM`, `` `limits.max_frame_size`
//! in FILE``) and the value.
//!
//! This module must not start anything, bind sockets, read TLS files or touch
//! the process environment: the environment comes in through a closure so
//! tests stay hermetic (which is why the flags do not use clap's `env`: it
//! reads the process environment itself, and counts a set-but-blank variable
//! as a value). The only I/O is reading the config file, and only when one
//! is named (`--config` / `MACULA_CONFIG`): zero config stays zero config.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use macula::config::{Limits, MqttLimits, RaftLimits, ReachabilityMode, RelayLimits, StreamLimits};
use macula::{NodeId, PeerAddr};

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
/// Accepted `dht_request_timeout` range.
pub const DHT_REQUEST_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));
/// Accepted `dht_snapshot_interval` range (0: only at a clean shutdown).
pub const DHT_SNAPSHOT_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::ZERO, Duration::from_secs(24 * 3600));
/// Default silence after which the failure detector declares a full node
/// down (on a fast path; slow paths get more).
pub const DEFAULT_PEER_DOWN_AFTER: Duration = Duration::from_secs(2);
/// Accepted `peer_down_after` range: at least two probes (500 ms apart),
/// below the transport idle timeout (30 s).
pub const PEER_DOWN_AFTER_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(20));
/// Accepted `relay_max_sessions` and `relay_max_reservations` range.
pub const RELAY_COUNT_RANGE: (usize, usize) = (1, 100_000);
/// Range of `--trust-max-pins` (0: trust on first use off).
pub const TRUST_PINS_RANGE: (usize, usize) = (0, 1_000_000);
/// Accepted `nat.max_observations` range.
pub const NAT_OBSERVATIONS_RANGE: (usize, usize) = (2, 4096);
/// Accepted `relay_idle_timeout` range.
pub const RELAY_IDLE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// Accepted `api_key_max_failures` and `api_key_realm_max_failures` range.
pub const API_KEY_FAILURES_RANGE: (usize, usize) = (1, 1_000_000);
/// Accepted `api_key_failure_window` range.
pub const API_KEY_WINDOW_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// Accepted `api_key_max_tracked` range.
pub const API_KEY_TRACKED_RANGE: (usize, usize) = (1, 10_000_000);
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
/// Accepted `raft_proposals_in_flight` range.
pub const RAFT_PROPOSALS_RANGE: (usize, usize) = (1, 1024);
/// Accepted `raft_max_groups` range.
pub const RAFT_MAX_GROUPS_RANGE: (usize, usize) = (1, 4096);
/// Accepted `max_streams` range.
pub const MAX_STREAMS_RANGE: (usize, usize) = (1, 4096);
/// Accepted `stream_write_queue` range.
pub const STREAM_WRITE_QUEUE_RANGE: (u64, u64) = (64 << 10, 16 << 30);
/// Accepted `stream_write_timeout` range.
pub const STREAM_WRITE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(3600));
/// Accepted `admin_request_window` and `admin_failure_window` range.
pub const ADMIN_WINDOW_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
/// Accepted `dashboard_max_streams` range.
pub const DASHBOARD_STREAMS_RANGE: (usize, usize) = (1, 1024);
/// Accepted `dashboard_interval` range (a stream must write within the
/// admin server's 5 s request deadline).
pub const DASHBOARD_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(4));
/// Accepted `dashboard_max_peers` range.
pub const DASHBOARD_PEERS_RANGE: (usize, usize) = (0, 4096);
/// Accepted `admin_failure_sources` and `admin_replay_cache` range.
pub const ADMIN_TABLE_RANGE: (usize, usize) = (1, 10_000_000);
/// Accepted `admin_max_failures` range.
pub const ADMIN_MAX_FAILURES_RANGE: (usize, usize) = (1, 100_000);
/// Accepted `audit_max_bytes` range: 64 KiB to 16 GiB.
pub const AUDIT_MAX_BYTES_RANGE: (u64, u64) = (64 << 10, 16 << 30);
/// Accepted `audit_files` range.
pub const AUDIT_FILES_RANGE: (usize, usize) = (1, 10_000);
/// Accepted `audit_checkpoint_every` range.
pub const AUDIT_CHECKPOINT_EVERY_RANGE: (usize, usize) = (1, 1_000_000);
/// Accepted `audit_checkpoint_interval` range.
pub const AUDIT_CHECKPOINT_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// Accepted `raft_election_timeout` range (the heartbeat is a quarter of it).
pub const RAFT_ELECTION_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));
/// Accepted MQTT client, session and subscription counts.
pub const MQTT_COUNT_RANGE: (usize, usize) = (1, 1_000_000);
/// Accepted `mqtt_max_packet_size` range: 1 KiB to 16 MiB.
pub const MQTT_PACKET_RANGE: (u64, u64) = (1 << 10, 16 << 20);
/// Accepted `mqtt_max_inflight` range.
pub const MQTT_INFLIGHT_RANGE: (usize, usize) = (1, 65_535);
/// Accepted `mqtt_queue_len` range.
pub const MQTT_QUEUE_RANGE: (usize, usize) = (1, 10_000_000);
/// Accepted `mqtt_session_expiry` range.
pub const MQTT_EXPIRY_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600));
/// Default log format.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// Default share of the operations that start a trace (with `--otlp`).
pub const DEFAULT_TRACE_SAMPLE: f64 = 1.0;
/// Data directory used when the platform has no user data directory.
pub const FALLBACK_DATA_DIR: &str = "./.macula";
/// Longest realm name.
pub const MAX_REALM_LEN: usize = macula::names::MAX_REALM_LEN;

/// Default data directory: the platform's user data directory joined with
/// `macula` (e.g. `~/.local/share/macula`), or [`FALLBACK_DATA_DIR`].
/// `given` (a `--data-dir`), else `MACULA_DATA_DIR`, else
/// [`default_data_dir`]: where the offline commands look.
pub fn data_dir_or_env(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("MACULA_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(default_data_dir)
}

pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("macula"))
        .unwrap_or_else(|| PathBuf::from(FALLBACK_DATA_DIR))
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// The names of one setting and its default, as shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The command-line flag, e.g. `--listen`.
    pub flag: &'static str,
    /// The environment variable, e.g. `MACULA_LISTEN`.
    pub env: &'static str,
    /// The dotted TOML key, e.g. `limits.max_frame_size`.
    pub toml: &'static str,
    /// The default as `--help` shows it (`none` for an empty list, a
    /// description where it depends on the machine); empty: none shown.
    pub default: &'static str,
    /// The flag's value in `--help`, e.g. `IP:PORT`.
    pub value_name: &'static str,
    /// The flag's help, before `[env: ...] [default: ...]`.
    pub help: &'static str,
}

/// Declares every setting, one entry each:
///
/// ```text
/// field KEY: Type = default, Kind(parser...),
///     flag "--flag" "VALUE", env "MACULA_X", toml "section.key", default "shown",
///     "help";
/// ```
///
/// `Kind` is [`Text`], [`Number`], [`FilePath`] or [`List`]: how the value is
/// written in each layer. The parser turns the text into the value (`Type`
/// must be `From` it); [`FilePath`] has none, [`List`] two (a comma-separated
/// list, and one item of a TOML array).
macro_rules! settings {
    ($(
        $field:ident $KEY:ident: $ty:ty = $default:expr, $kind:ident($($parse:expr),*),
        flag $flag:literal $value_name:literal, env $env:literal, toml $toml:literal,
        default $shown:literal, $help:literal;
    )*) => {
        /// The names of every setting, for code, docs and tests.
        pub mod keys {
            use super::Key;

            /// The config file itself (no TOML key: a file cannot name another).
            pub const CONFIG: Key = Key {
                flag: "--config",
                env: "MACULA_CONFIG",
                toml: "",
                default: "",
                value_name: "PATH",
                help: "TOML config file; none is read unless given",
            };
            $(
                #[doc = $help]
                pub const $KEY: Key = Key {
                    flag: $flag,
                    env: $env,
                    toml: $toml,
                    default: $shown,
                    value_name: $value_name,
                    help: $help,
                };
            )*

            /// Every setting that can appear in the TOML file, in documentation order.
            pub const ALL: &[Key] = &[$($KEY),*];
        }

        /// The node's settings as command-line flags. Every flag is optional;
        /// an unset flag falls back to its environment variable, then to the
        /// config file, then to the default.
        #[derive(Debug, Default, Clone)]
        pub struct NodeArgs {
            /// TOML config file; none is read unless given.
            pub config: Option<PathBuf>,
            $(
                #[doc = $help]
                pub $field: <$kind as Kind>::Flag,
            )*
        }

        impl clap::Args for NodeArgs {
            fn augment_args(cmd: clap::Command) -> clap::Command {
                cmd.arg(FilePath::arg(&keys::CONFIG, "config"))
                    $(.arg($kind::arg(&keys::$KEY, stringify!($field))))*
            }

            fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
                Self::augment_args(cmd)
            }
        }

        impl clap::FromArgMatches for NodeArgs {
            fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
                let mut args = NodeArgs::default();
                args.update_from_arg_matches(m)?;
                Ok(args)
            }

            fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
                FilePath::update(&mut self.config, m, "config");
                $($kind::update(&mut self.$field, m, stringify!($field));)*
                Ok(())
            }
        }

        /// The resolved, validated configuration of a node.
        #[derive(Debug, Clone)]
        pub struct Settings {
            $(
                #[doc = $help]
                pub $field: $ty,
            )*
            /// The config file that was read, if any.
            pub config_file: Option<PathBuf>,
        }

        impl Default for Settings {
            /// Every setting at its default; what `macula start` runs with
            /// when nothing is configured.
            fn default() -> Self {
                Settings {
                    $($field: $default,)*
                    config_file: None,
                }
            }
        }

        /// Every setting from the highest layer that has it (or its
        /// default), and where each set one came from.
        fn resolve_keys(layers: &Layers, args: &NodeArgs) -> Result<(Settings, Origins), ConfigError> {
            let mut s = Settings::default();
            let mut origins = Origins::new();
            $(
                if let Some((value, origin)) =
                    $kind::get(layers, &args.$field, &keys::$KEY, $($parse),*)?
                {
                    set(&mut s.$field, value);
                    origins.insert(keys::$KEY.flag, origin);
                }
            )*
            Ok((s, origins))
        }

        #[cfg(test)]
        impl Settings {
            /// The setting named by `key`, debug-formatted (for tests over
            /// every key).
            fn field_debug(&self, key: &Key) -> String {
                $(if key == &keys::$KEY {
                    return format!("{:?}", self.$field);
                })*
                panic!("no setting {key:?}")
            }
        }
    };
}

settings! {
    listen LISTEN: SocketAddr = DEFAULT_LISTEN, Text(parse_socket_addr),
        flag "--listen" "IP:PORT", env "MACULA_LISTEN", toml "listen",
        default "0.0.0.0:4433", "QUIC (UDP) listen address";
    realm REALM: String = DEFAULT_REALM.to_string(), Text(parse_realm),
        flag "--realm" "REALM", env "MACULA_REALM", toml "realm",
        default "default", "Realm to join: dot-separated labels of a-z, 0-9, '-'";
    bootstrap BOOTSTRAP: Vec<PeerAddr> = Vec::new(), List(parse_peers, parse_peer),
        flag "--bootstrap" "ADDR[,ADDR...]", env "MACULA_BOOTSTRAP_PEERS", toml "bootstrap",
        default "none",
        "Bootstrap peers: HOST:PORT, quic://HOST:PORT or NODEID@HOST:PORT; comma-separated, \
         repeatable";
    data_dir DATA_DIR: PathBuf = default_data_dir(), FilePath(),
        flag "--data-dir" "DIR", env "MACULA_DATA_DIR", toml "data_dir",
        default "<user data dir>/macula", "Directory for the node key and state";
    http HTTP: SocketAddr = DEFAULT_HTTP, Text(parse_socket_addr),
        flag "--http" "IP:PORT", env "MACULA_HTTP", toml "http",
        default "127.0.0.1:8080", "Admin HTTP address (/metrics, /health, /admin/*, the live \
        dashboard at /dashboard)";
    tls_mode TLS_MODE: TlsModeSetting = DEFAULT_TLS_MODE, Text(str::parse::<TlsModeSetting>),
        flag "--tls-mode" "self|ca", env "MACULA_TLS_MODE", toml "tls.mode",
        default "self",
        "TLS mode: \"self\" (self-certifying node IDs) or \"ca\" (also require a chain to a CA)";
    tls_ca_cert_file TLS_CA_CERT_FILE: Option<PathBuf> = None, FilePath(),
        flag "--tls-ca-cert-file" "PATH", env "MACULA_TLS_CACERTFILE", toml "tls.ca_cert_file",
        default "", "CA certificate (PEM) peers must chain to; required with --tls-mode ca";
    tls_cert_file TLS_CERT_FILE: Option<PathBuf> = None, FilePath(),
        flag "--tls-cert-file" "PATH", env "MACULA_TLS_CERTFILE", toml "tls.cert_file",
        default "",
        "This node's certificate chain (PEM), issued by the CA for the node key; required with \
         --tls-mode ca";
    tls_pinned TLS_PINNED: Vec<NodeId> = Vec::new(), List(parse_node_ids, parse_node_id),
        flag "--tls-pinned" "NODEID[,NODEID...]", env "MACULA_TLS_PINNED", toml "tls.pinned",
        default "none", "Only accept peers with these node IDs; comma-separated, repeatable";
    max_frame_size MAX_FRAME_SIZE: u32 = DEFAULT_MAX_FRAME_SIZE, Number(parse_max_frame_size),
        flag "--max-frame-size" "SIZE", env "MACULA_MAX_FRAME_SIZE",
        toml "limits.max_frame_size", default "1MiB",
        "Maximum frame body size, in bytes or with KiB/MiB, 1KiB..16MiB";
    max_connections MAX_CONNECTIONS: usize = DEFAULT_MAX_CONNECTIONS,
        Number(|s| parse_count(s, (MIN_MAX_CONNECTIONS, MAX_MAX_CONNECTIONS))),
        flag "--max-connections" "N", env "MACULA_MAX_CONNECTIONS",
        toml "limits.max_connections", default "1000",
        "Maximum pooled peer connections, 1..100000";
    idle_timeout IDLE_TIMEOUT: Duration = DEFAULT_IDLE_TIMEOUT,
        Number(|s| parse_duration_in(s, (MIN_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT))),
        flag "--idle-timeout" "DURATION", env "MACULA_IDLE_TIMEOUT",
        toml "limits.idle_timeout", default "5m",
        "Close a pooled connection idle this long: 300, 300s, 5m, 1h, 1500ms; 1s..24h";
    pubsub_queue_capacity PUBSUB_QUEUE_CAPACITY: usize = DEFAULT_PUBSUB_QUEUE_CAPACITY,
        Number(|s| parse_count(s, PUBSUB_QUEUE_CAPACITY_RANGE)),
        flag "--pubsub-queue-capacity" "N", env "MACULA_PUBSUB_QUEUE_CAPACITY",
        toml "limits.pubsub_queue_capacity", default "65536",
        "Events queued per subscription before the oldest are dropped, 16..10000000";
    pubsub_queue_bytes PUBSUB_QUEUE_BYTES: usize = DEFAULT_PUBSUB_QUEUE_BYTES,
        Number(|s| parse_size_usize(s, PUBSUB_QUEUE_BYTES_RANGE)),
        flag "--pubsub-queue-bytes" "SIZE", env "MACULA_PUBSUB_QUEUE_BYTES",
        toml "limits.pubsub_queue_bytes", default "64MiB",
        "Payload bytes queued per subscription before the oldest are dropped, in bytes or with \
         KiB/MiB, 64KiB..16384MiB";
    pubsub_peer_queue_capacity PUBSUB_PEER_QUEUE_CAPACITY: usize =
        DEFAULT_PUBSUB_PEER_QUEUE_CAPACITY,
        Number(|s| parse_count(s, PUBSUB_PEER_QUEUE_CAPACITY_RANGE)),
        flag "--pubsub-peer-queue-capacity" "N", env "MACULA_PUBSUB_PEER_QUEUE_CAPACITY",
        toml "limits.pubsub_peer_queue_capacity", default "65536",
        "Messages queued for one remote node before a publish waits (or drops, as it asks), \
         16..10000000";
    pubsub_peer_queue_bytes PUBSUB_PEER_QUEUE_BYTES: usize = DEFAULT_PUBSUB_PEER_QUEUE_BYTES,
        Number(|s| parse_size_usize(s, PUBSUB_PEER_QUEUE_BYTES_RANGE)),
        flag "--pubsub-peer-queue-bytes" "SIZE", env "MACULA_PUBSUB_PEER_QUEUE_BYTES",
        toml "limits.pubsub_peer_queue_bytes", default "32MiB",
        "Payload bytes queued for one remote node before a publish waits (or drops, as it \
         asks), in bytes or with KiB/MiB, 64KiB..16384MiB";
    pubsub_stall_timeout PUBSUB_STALL_TIMEOUT: Duration = DEFAULT_PUBSUB_STALL_TIMEOUT,
        Number(|s| parse_duration_in(s, PUBSUB_STALL_TIMEOUT_RANGE)),
        flag "--pubsub-stall-timeout" "DURATION", env "MACULA_PUBSUB_STALL_TIMEOUT",
        toml "limits.pubsub_stall_timeout", default "10s",
        "Cut off a peer whose pub/sub data stream accepts nothing this long; 1s..1h";
    dht_snapshot_interval DHT_SNAPSHOT_INTERVAL: Duration =
        macula::config::DEFAULT_DHT_SNAPSHOT_INTERVAL,
        Number(|s| parse_duration_in(s, DHT_SNAPSHOT_INTERVAL_RANGE)),
        flag "--dht-snapshot-interval" "DURATION", env "MACULA_DHT_SNAPSHOT_INTERVAL",
        toml "limits.dht_snapshot_interval", default "30s",
        "Write the DHT's routing table and records to the data directory this often (and at a \
         clean shutdown), read back at start so a restarted node serves at once; 0s: only at \
         shutdown; 0s..24h";
    dht_request_timeout DHT_REQUEST_TIMEOUT: Duration =
        macula::config::DEFAULT_DHT_REQUEST_TIMEOUT,
        Number(|s| parse_duration_in(s, DHT_REQUEST_TIMEOUT_RANGE)),
        flag "--dht-request-timeout" "DURATION", env "MACULA_DHT_REQUEST_TIMEOUT",
        toml "limits.dht_request_timeout", default "1s",
        "A DHT request unanswered this long is counted lost and sent again or elsewhere; \
         raise it on slow or loaded paths; 100ms..60s";
    peer_down_after PEER_DOWN_AFTER: Duration = DEFAULT_PEER_DOWN_AFTER,
        Number(|s| parse_duration_in(s, PEER_DOWN_AFTER_RANGE)),
        flag "--peer-down-after" "DURATION", env "MACULA_PEER_DOWN_AFTER",
        toml "limits.peer_down_after", default "2s",
        "Failure detector: a full node silent this long (no packet, no answer to probes) is \
         declared down, its connection closed and every service told; raised on slow paths; \
         1s..20s";
    peer_slots PEER_SLOTS: usize = Limits::default().peer_slots,
        Number(|s| parse_count(s, PEER_SLOTS_RANGE)),
        flag "--peer-slots" "N", env "MACULA_PEER_SLOTS", toml "limits.peer_slots",
        default "64",
        "Connections of --max-connections that clients can never take, kept for full nodes (at \
         most half), 0..100000";
    stream_receive_window STREAM_RECEIVE_WINDOW: u32 = Limits::default().stream_receive_window,
        Number(|s| parse_size_in(s, WINDOW_RANGE).map(|n| n as u32)),
        flag "--stream-receive-window" "SIZE", env "MACULA_STREAM_RECEIVE_WINDOW",
        toml "limits.stream_receive_window", default "1MiB",
        "Bytes a peer may send on one stream ahead of the node's reading, 16KiB..1GiB";
    connection_receive_window CONNECTION_RECEIVE_WINDOW: u32 =
        Limits::default().connection_receive_window,
        Number(|s| parse_size_in(s, WINDOW_RANGE).map(|n| n as u32)),
        flag "--connection-receive-window" "SIZE", env "MACULA_CONNECTION_RECEIVE_WINDOW",
        toml "limits.connection_receive_window", default "8MiB",
        "Bytes a peer may send on one connection ahead of the node's reading, 16KiB..1GiB";
    send_window SEND_WINDOW: u64 = Limits::default().send_window,
        Number(|s| parse_size_in(s, WINDOW_RANGE)),
        flag "--send-window" "SIZE", env "MACULA_SEND_WINDOW", toml "limits.send_window",
        default "8MiB", "Bytes buffered per connection for sending, unacknowledged, 16KiB..1GiB";
    socket_buffer SOCKET_BUFFER: usize = Limits::default().socket_buffer,
        Number(|s| parse_size_in(s, SOCKET_BUFFER_RANGE).map(|n| n as usize)),
        flag "--socket-buffer" "SIZE", env "MACULA_SOCKET_BUFFER", toml "limits.socket_buffer",
        default "4MiB",
        "Kernel receive and send buffer of the UDP socket (capped by net.core.rmem_max), \
         64KiB..256MiB";
    max_streams_per_client MAX_STREAMS_PER_CLIENT: u32 = Limits::default().max_streams_per_client,
        Number(|s| parse_count(s, CLIENT_STREAMS_RANGE).map(|n| n as u32)),
        flag "--max-streams-per-client" "N", env "MACULA_MAX_STREAMS_PER_CLIENT",
        toml "limits.max_streams_per_client", default "4",
        "Streams of each kind a client may open at once, 2..256";
    relay_max_sessions RELAY_MAX_SESSIONS: usize = RelayLimits::default().max_sessions,
        Number(|s| parse_count(s, RELAY_COUNT_RANGE)),
        flag "--relay-max-sessions" "N", env "MACULA_RELAY_MAX_SESSIONS",
        toml "relay.max_sessions", default "128", "Relayed sessions carried at once, 1..100000";
    relay_max_reservations RELAY_MAX_RESERVATIONS: usize = RelayLimits::default().max_reservations,
        Number(|s| parse_count(s, RELAY_COUNT_RANGE)),
        flag "--relay-max-reservations" "N", env "MACULA_RELAY_MAX_RESERVATIONS",
        toml "relay.max_reservations", default "128",
        "Reservations held for private peers at once, 1..100000";
    relay_bytes_per_second RELAY_BYTES_PER_SECOND: u64 = RelayLimits::default().bytes_per_second,
        Number(parse_relay_bytes_per_second),
        flag "--relay-bytes-per-second" "SIZE", env "MACULA_RELAY_BYTES_PER_SECOND",
        toml "relay.bytes_per_second", default "1MiB",
        "Bytes per second of one relayed session (over it: throttled), bytes or KiB/MiB, 0 = \
         unlimited";
    relay_idle_timeout RELAY_IDLE_TIMEOUT: Duration = RelayLimits::default().idle_timeout,
        Number(|s| parse_duration_in(s, RELAY_IDLE_TIMEOUT_RANGE)),
        flag "--relay-idle-timeout" "DURATION", env "MACULA_RELAY_IDLE_TIMEOUT",
        toml "relay.idle_timeout", default "60s", "Close a relayed session idle this long; 1s..24h";
    reachability REACHABILITY: ReachabilityMode = ReachabilityMode::Auto, Text(parse_reachability),
        flag "--reachability" "auto|private", env "MACULA_REACHABILITY", toml "reachability",
        default "auto",
        "\"auto\" (peers dial back to tell) or \"private\" (behind NAT: use relays, accept no \
         direct inbound connection)";
    hole_punch HOLE_PUNCH: bool = macula::config::NatLimits::default().punch, Text(parse_on_off),
        flag "--hole-punch" "on|off", env "MACULA_HOLE_PUNCH", toml "nat.hole_punch",
        default "on",
        "Try a direct connection by hole punching over every relayed connection this node \
         opens (`macula_holepunch_attempts_total`); off: relayed connections stay relayed";
    nat_max_observations NAT_MAX_OBSERVATIONS: usize =
        macula::config::NatLimits::default().max_observations,
        Number(|s| parse_count(s, NAT_OBSERVATIONS_RANGE)),
        flag "--nat-max-observations" "N", env "MACULA_NAT_MAX_OBSERVATIONS",
        toml "nat.max_observations", default "32",
        "Peers whose view of this node's address (HELLO observed_addr) is kept to classify its \
         NAT (`macula nat`), 2..4096; the oldest is forgotten beyond";
    trust_max_pins TRUST_MAX_PINS: usize = macula::config::DEFAULT_MAX_PINS,
        Number(|s| parse_count(s, TRUST_PINS_RANGE)),
        flag "--trust-max-pins" "N", env "MACULA_TRUST_MAX_PINS", toml "trust.max_pins",
        default "4096",
        "Trust on first use in an open realm: a --bootstrap address given without a node ID is \
         pinned to the node first seen there (<data dir>/trust.json; `macula trust list|revoke`) \
         and another node there later refused; at most N pins, 0 = off";
    realm_authority REALM_AUTHORITY: Option<macula::auth::Key> = None,
        Text(|s: &str| s.parse::<macula::auth::Key>().map_err(|e| e.to_string())),
        flag "--realm-authority" "KEY", env "MACULA_REALM_AUTHORITY", toml "realm_authority",
        default "none (an open realm)",
        "The realm authority's key (`macula realm key`): only peers presenting a valid grant for \
         their node ID are admitted";
    grant_file GRANT_FILE: Option<PathBuf> = None, FilePath(),
        flag "--grant-file" "PATH", env "MACULA_GRANT_FILE", toml "grant_file",
        default "",
        "This node's grant token (from `macula realm grant`), presented to peers; with \
         --realm-authority";
    revocations_file REVOCATIONS_FILE: Option<PathBuf> = None, FilePath(),
        flag "--revocations" "PATH", env "MACULA_REVOCATIONS", toml "revocations",
        default "",
        "The realm's signed revocation list to start with (the file `macula realm revoke` \
         writes); a newer one from peers or the data directory replaces it; with \
         --realm-authority";
    api_keys API_KEYS: Option<PathBuf> = None, FilePath(),
        flag "--api-keys" "PATH", env "MACULA_API_KEYS", toml "api_keys.file",
        default "",
        "API keys file (`macula realm apikeys NAME --export FILE`: hashes of client API keys \
         with their grants, never the keys): a client presenting one of the keys instead of a \
         grant is admitted with its grant; with --realm-authority";
    api_key_max_failures API_KEY_MAX_FAILURES: u32 =
        macula::apikey::DEFAULT_MAX_FAILURES_PER_ADDRESS,
        Number(|s| parse_count(s, API_KEY_FAILURES_RANGE).map(|n| n as u32)),
        flag "--api-key-max-failures" "N", env "MACULA_API_KEY_MAX_FAILURES",
        toml "api_keys.max_failures_per_address", default "5",
        "Failed API-key attempts from one address (an IPv6 /64) within the window after which \
         its attempts are refused (rate_limited) until the window passes, 1..1000000";
    api_key_realm_max_failures API_KEY_REALM_MAX_FAILURES: u32 =
        macula::apikey::DEFAULT_MAX_FAILURES_PER_REALM,
        Number(|s| parse_count(s, API_KEY_FAILURES_RANGE).map(|n| n as u32)),
        flag "--api-key-realm-max-failures" "N", env "MACULA_API_KEY_REALM_MAX_FAILURES",
        toml "api_keys.max_failures_per_realm", default "100",
        "Failed API-key attempts at this node, from anywhere, within the window after which \
         every API-key attempt is refused until it passes, 1..1000000";
    api_key_failure_window API_KEY_FAILURE_WINDOW: Duration =
        macula::apikey::DEFAULT_FAILURE_WINDOW,
        Number(|s| parse_duration_in(s, API_KEY_WINDOW_RANGE)),
        flag "--api-key-failure-window" "DURATION", env "MACULA_API_KEY_FAILURE_WINDOW",
        toml "api_keys.failure_window", default "60s",
        "The window of the API-key failure limits, from the first failure; 1s..24h";
    api_key_max_tracked API_KEY_MAX_TRACKED: usize =
        macula::apikey::DEFAULT_MAX_TRACKED_ADDRESSES,
        Number(|s| parse_count(s, API_KEY_TRACKED_RANGE)),
        flag "--api-key-max-tracked" "N", env "MACULA_API_KEY_MAX_TRACKED",
        toml "api_keys.max_tracked_addresses", default "10000",
        "Source addresses the API-key failure limiter remembers at once (the oldest forgotten \
         beyond), 1..10000000";
    admin_token_file ADMIN_TOKEN_FILE: Option<PathBuf> = None, FilePath(),
        flag "--admin-token-file" "PATH", env "MACULA_ADMIN_TOKEN_FILE", toml "admin.token_file",
        default "<data dir>/admin-token (created at first start)",
        "The admin API's bearer token (one line, mode 0600); `macula` admin commands send it";
    admin_request_window ADMIN_REQUEST_WINDOW: Duration =
        macula::config::DEFAULT_ADMIN_REQUEST_WINDOW,
        Number(|s| parse_duration_in(s, ADMIN_WINDOW_RANGE)),
        flag "--admin-request-window" "DURATION", env "MACULA_ADMIN_REQUEST_WINDOW",
        toml "admin.request_window", default "30s",
        "A request signed under an admin grant must be stamped within this of the node's \
         clock; 1s..1h";
    admin_max_failures ADMIN_MAX_FAILURES: usize =
        macula::config::DEFAULT_ADMIN_MAX_FAILURES as usize,
        Number(|s| parse_count(s, ADMIN_MAX_FAILURES_RANGE)),
        flag "--admin-max-failures" "N", env "MACULA_ADMIN_MAX_FAILURES",
        toml "admin.max_failures", default "5",
        "Failed admin requests one address may make per --admin-failure-window before it gets \
         429; 1..100000";
    admin_failure_window ADMIN_FAILURE_WINDOW: Duration =
        macula::config::DEFAULT_ADMIN_FAILURE_WINDOW,
        Number(|s| parse_duration_in(s, ADMIN_WINDOW_RANGE)),
        flag "--admin-failure-window" "DURATION", env "MACULA_ADMIN_FAILURE_WINDOW",
        toml "admin.failure_window", default "60s",
        "The window of --admin-max-failures; 1s..1h";
    admin_failure_sources ADMIN_FAILURE_SOURCES: usize =
        macula::config::DEFAULT_ADMIN_FAILURE_SOURCES,
        Number(|s| parse_count(s, ADMIN_TABLE_RANGE)),
        flag "--admin-failure-sources" "N", env "MACULA_ADMIN_FAILURE_SOURCES",
        toml "admin.failure_sources", default "4096",
        "Addresses whose failed admin requests are tracked at once (the oldest is forgotten to \
         make room: macula_admin_failure_sources_evicted_total), 1..10000000";
    admin_replay_cache ADMIN_REPLAY_CACHE: usize = macula::config::DEFAULT_ADMIN_REPLAY_CACHE,
        Number(|s| parse_count(s, ADMIN_TABLE_RANGE)),
        flag "--admin-replay-cache" "N", env "MACULA_ADMIN_REPLAY_CACHE",
        toml "admin.replay_cache", default "16384",
        "Grant-signed admin requests remembered to refuse replays; when full of live ones, new \
         signed requests are refused (reason=replayed) until some expire, 1..10000000";
    dashboard_max_streams DASHBOARD_MAX_STREAMS: usize =
        macula::config::DEFAULT_DASHBOARD_MAX_STREAMS,
        Number(|s| parse_count(s, DASHBOARD_STREAMS_RANGE)),
        flag "--dashboard-max-streams" "N", env "MACULA_DASHBOARD_MAX_STREAMS",
        toml "dashboard.max_streams", default "8",
        "Live dashboard event streams (/admin/dashboard/events) open at once; one more gets 503 \
         (macula_dashboard_streams_refused_total), 1..1024";
    dashboard_interval DASHBOARD_INTERVAL: Duration = macula::config::DEFAULT_DASHBOARD_INTERVAL,
        Number(|s| parse_duration_in(s, DASHBOARD_INTERVAL_RANGE)),
        flag "--dashboard-interval" "DURATION", env "MACULA_DASHBOARD_INTERVAL",
        toml "dashboard.interval", default "1s",
        "Between two dashboard updates, and two rounds of status requests to peers while a \
         dashboard is open; 100ms..4s";
    dashboard_max_peers DASHBOARD_MAX_PEERS: usize = macula::config::DEFAULT_DASHBOARD_MAX_PEERS,
        Number(|s| parse_count(s, DASHBOARD_PEERS_RANGE)),
        flag "--dashboard-max-peers" "N", env "MACULA_DASHBOARD_MAX_PEERS",
        toml "dashboard.max_peers", default "64",
        "Peers asked for their status per round while a dashboard is open (the others in later \
         rounds, in turn), 0..4096";
    audit_max_bytes AUDIT_MAX_BYTES: u64 = macula::config::DEFAULT_AUDIT_MAX_BYTES,
        Number(|s| parse_size_in(s, AUDIT_MAX_BYTES_RANGE)),
        flag "--audit-max-bytes" "SIZE", env "MACULA_AUDIT_MAX_BYTES", toml "audit.max_bytes",
        default "16MiB",
        "Rotate <data dir>/audit/audit.log when it grows over this, in bytes or with KiB/MiB, \
         64KiB..16384MiB";
    audit_files AUDIT_FILES: usize = macula::config::DEFAULT_AUDIT_FILES,
        Number(|s| parse_count(s, AUDIT_FILES_RANGE)),
        flag "--audit-files" "N", env "MACULA_AUDIT_FILES", toml "audit.files", default "8",
        "Audit log files kept (audit.log and its rotated predecessors), 1..10000";
    audit_checkpoint_every AUDIT_CHECKPOINT_EVERY: usize =
        macula::config::DEFAULT_AUDIT_CHECKPOINT_EVERY as usize,
        Number(|s| parse_count(s, AUDIT_CHECKPOINT_EVERY_RANGE)),
        flag "--audit-checkpoint-every" "N", env "MACULA_AUDIT_CHECKPOINT_EVERY",
        toml "audit.checkpoint_every", default "1000",
        "A checkpoint signed with the node key after this many audit entries, 1..1000000";
    audit_checkpoint_interval AUDIT_CHECKPOINT_INTERVAL: Duration =
        macula::config::DEFAULT_AUDIT_CHECKPOINT_INTERVAL,
        Number(|s| parse_duration_in(s, AUDIT_CHECKPOINT_INTERVAL_RANGE)),
        flag "--audit-checkpoint-interval" "DURATION", env "MACULA_AUDIT_CHECKPOINT_INTERVAL",
        toml "audit.checkpoint_interval", default "5m",
        "...or this long after the last checkpoint, once there are new entries; 1s..24h";
    workloads WORKLOADS: bool = true, Text(parse_on_off),
        flag "--workloads" "on|off", env "MACULA_WORKLOADS", toml "workloads.enabled",
        default "on",
        "The WebAssembly workload agent (docs/WASM.md): runs what `macula deploy` and `macula \
         upgrade` place on this node and serves the artifacts it holds to peers; needs the \
         `wasm` cargo feature (on by default)";
    labels LABELS: Vec<String> = Vec::new(), List(parse_labels, parse_label),
        flag "--label" "KEY=VALUE[,...]", env "MACULA_LABELS", toml "labels", default "none",
        "Labels of this node, matched by a deployment's placement (`macula deploy --label`); \
         comma-separated, repeatable";
    raft_groups RAFT_GROUPS: Vec<String> = Vec::new(), List(parse_raft_groups, parse_raft_group),
        flag "--raft-group" "NAME[,NAME...]", env "MACULA_RAFT_GROUPS", toml "raft_groups",
        default "none",
        "Raft group to be a member of (consistent KV, leader election); the log is kept in \
         <data dir>/raft; comma-separated, repeatable";
    raft_members RAFT_MEMBERS: Vec<NodeId> = Vec::new(), List(parse_node_ids, parse_node_id),
        flag "--raft-members" "NODEID[,NODEID...]", env "MACULA_RAFT_MEMBERS", toml "raft_members",
        default "none",
        "Founding voters of the --raft-group groups: node IDs, this node's own among them; every \
         founder passes the same list. Without it the node joins as a not-yet-member and waits \
         for `macula raft add`; comma-separated, repeatable";
    raft_timeout RAFT_TIMEOUT: Duration = RaftLimits::default().request_timeout,
        Number(|s| parse_duration_in(s, RAFT_TIMEOUT_RANGE)),
        flag "--raft-timeout" "DURATION", env "MACULA_RAFT_TIMEOUT", toml "raft_timeout",
        default "5s",
        "Time a Raft group request (write, linearizable read, membership change) may take, \
         leader changes included; 100ms..60s";
    raft_max_groups RAFT_MAX_GROUPS: usize = RaftLimits::default().max_groups,
        Number(|s| parse_count(s, RAFT_MAX_GROUPS_RANGE)),
        flag "--raft-max-groups" "N", env "MACULA_RAFT_MAX_GROUPS", toml "raft_max_groups",
        default "64", "Raft groups this node may run at once, 1..4096";
    raft_proposals_in_flight RAFT_PROPOSALS_IN_FLIGHT: usize =
        RaftLimits::default().proposals_in_flight,
        Number(|s| parse_count(s, RAFT_PROPOSALS_RANGE)),
        flag "--raft-proposals-in-flight" "N", env "MACULA_RAFT_PROPOSALS_IN_FLIGHT",
        toml "raft_proposals_in_flight", default "8",
        "Log entries a Raft group's leader has proposed and not yet committed at most (pipelining; \
         writes queue meanwhile and share the next entry: macula_raft_proposer_full_total), 1..1024";
    max_streams MAX_STREAMS: usize = StreamLimits::default().max_streams,
        Number(|s| parse_count(s, MAX_STREAMS_RANGE)),
        flag "--max-streams" "N", env "MACULA_MAX_STREAMS", toml "max_streams",
        default "64", "Durable streams this node may host (`macula stream add`), 1..4096";
    stream_write_queue STREAM_WRITE_QUEUE: u64 = StreamLimits::default().write_queue_bytes,
        Number(|s| parse_size_in(s, STREAM_WRITE_QUEUE_RANGE)),
        flag "--stream-write-queue" "SIZE", env "MACULA_STREAM_WRITE_QUEUE",
        toml "stream_write_queue", default "64MiB",
        "Bytes of writes each stream's store may hold queued for its disk (redb) at most; a \
         publish that finds it full waits for room (macula_stream_write_queue_waits_total), \
         64KiB..16384MiB";
    stream_write_timeout STREAM_WRITE_TIMEOUT: Duration = StreamLimits::default().write_queue_timeout,
        Number(|s| parse_duration_in(s, STREAM_WRITE_TIMEOUT_RANGE)),
        flag "--stream-write-timeout" "DURATION", env "MACULA_STREAM_WRITE_TIMEOUT",
        toml "stream_write_timeout", default "10s",
        "How long a publish waits for room in a full stream write queue before it is refused \
         (error kind busy, macula_stream_write_queue_refused_total), 10ms..1h";
    raft_election_timeout RAFT_ELECTION_TIMEOUT: Duration = RaftLimits::default().election_min,
        Number(|s| parse_duration_in(s, RAFT_ELECTION_TIMEOUT_RANGE)),
        flag "--raft-election-timeout" "DURATION", env "MACULA_RAFT_ELECTION_TIMEOUT",
        toml "raft_election_timeout", default "200ms",
        "A member that hears no leader for a random time between this and twice this starts an \
         election; the leader's heartbeat is a quarter of it; 100ms..60s; raise it on links \
         slower than 20 ms round trip";
    mqtt MQTT: Option<SocketAddr> = None, Text(parse_socket_addr),
        flag "--mqtt" "IP:PORT", env "MACULA_MQTT", toml "mqtt.listen", default "off",
        "MQTT 3.1.1 and 5.0 listener (TCP) for devices and tools: their publishes go into the \
         mesh and their subscriptions take from it (docs/MQTT.md); e.g. 127.0.0.1:1883";
    mqtt_tls MQTT_TLS: bool = false, Text(parse_on_off),
        flag "--mqtt-tls" "on|off", env "MACULA_MQTT_TLS", toml "mqtt.tls", default "off",
        "TLS 1.3 on the MQTT listener: with --mqtt-cert-file and --mqtt-key-file, else the \
         node's own self-signed certificate";
    mqtt_cert_file MQTT_CERT_FILE: Option<PathBuf> = None, FilePath(),
        flag "--mqtt-cert-file" "PATH", env "MACULA_MQTT_CERT_FILE", toml "mqtt.cert_file",
        default "", "Certificate chain (PEM) of the MQTT listener, with --mqtt-tls on";
    mqtt_key_file MQTT_KEY_FILE: Option<PathBuf> = None, FilePath(),
        flag "--mqtt-key-file" "PATH", env "MACULA_MQTT_KEY_FILE", toml "mqtt.key_file",
        default "", "Private key (PEM) of --mqtt-cert-file";
    mqtt_users MQTT_USERS: Vec<(String, String)> = Vec::new(), List(parse_mqtt_users, parse_mqtt_user),
        flag "--mqtt-user" "NAME:PASSWORD[,...]", env "MACULA_MQTT_USERS", toml "mqtt.users",
        default "none (anyone)",
        "MQTT usernames and passwords accepted in a realm without an authority (none: any client \
         is accepted); with --realm-authority the password is an API key instead; \
         comma-separated, repeatable";
    mqtt_max_clients MQTT_MAX_CLIENTS: usize = MqttLimits::default().max_clients,
        Number(|s| parse_count(s, MQTT_COUNT_RANGE)),
        flag "--mqtt-max-clients" "N", env "MACULA_MQTT_MAX_CLIENTS", toml "mqtt.max_clients",
        default "10000",
        "MQTT clients connected at once; more are refused (CONNACK server busy), 1..1000000";
    mqtt_max_sessions MQTT_MAX_SESSIONS: usize = MqttLimits::default().max_sessions,
        Number(|s| parse_count(s, MQTT_COUNT_RANGE)),
        flag "--mqtt-max-sessions" "N", env "MACULA_MQTT_MAX_SESSIONS", toml "mqtt.max_sessions",
        default "20000",
        "MQTT sessions kept, connected or not (past it the disconnected one expiring first is \
         dropped), at least --mqtt-max-clients, 1..1000000";
    mqtt_max_packet_size MQTT_MAX_PACKET_SIZE: u32 = MqttLimits::default().max_packet_size,
        Number(|s| parse_size_in(s, MQTT_PACKET_RANGE).map(|n| n as u32)),
        flag "--mqtt-max-packet-size" "SIZE", env "MACULA_MQTT_MAX_PACKET_SIZE",
        toml "mqtt.max_packet_size", default "256KiB",
        "Largest MQTT packet accepted (larger closes that client: packet too large), 1KiB..16MiB";
    mqtt_max_inflight MQTT_MAX_INFLIGHT: u16 = MqttLimits::default().max_inflight,
        Number(|s| parse_count(s, MQTT_INFLIGHT_RANGE).map(|n| n as u16)),
        flag "--mqtt-max-inflight" "N", env "MACULA_MQTT_MAX_INFLIGHT", toml "mqtt.max_inflight",
        default "32",
        "QoS 1 messages sent to one MQTT client and not yet acknowledged (also the receive \
         maximum announced to 5.0 clients), 1..65535";
    mqtt_queue_len MQTT_QUEUE_LEN: usize = MqttLimits::default().queue_len,
        Number(|s| parse_count(s, MQTT_QUEUE_RANGE)),
        flag "--mqtt-queue-len" "N", env "MACULA_MQTT_QUEUE_LEN", toml "mqtt.queue_len",
        default "1000",
        "Messages queued for one MQTT client (also while a persistent session is disconnected); \
         a QoS 0 message finding it full is dropped, a QoS 1 message waits in the mesh, \
         1..10000000";
    mqtt_max_subscriptions MQTT_MAX_SUBSCRIPTIONS: usize = MqttLimits::default().max_subscriptions,
        Number(|s| parse_count(s, MQTT_COUNT_RANGE)),
        flag "--mqtt-max-subscriptions" "N", env "MACULA_MQTT_MAX_SUBSCRIPTIONS",
        toml "mqtt.max_subscriptions", default "100",
        "Topic filters one MQTT session may subscribe to, 1..1000000";
    mqtt_max_retained MQTT_MAX_RETAINED: usize = MqttLimits::default().max_retained,
        Number(|s| parse_count(s, (0, 10_000_000))),
        flag "--mqtt-max-retained" "N", env "MACULA_MQTT_MAX_RETAINED", toml "mqtt.max_retained",
        default "10000", "Retained MQTT messages this node keeps, 0..10000000";
    mqtt_max_retained_bytes MQTT_MAX_RETAINED_BYTES: usize =
        MqttLimits::default().max_retained_bytes,
        Number(|s| parse_size_usize(s, (0, 16 << 30))),
        flag "--mqtt-max-retained-bytes" "SIZE", env "MACULA_MQTT_MAX_RETAINED_BYTES",
        toml "mqtt.max_retained_bytes", default "64MiB",
        "Payload bytes of the retained MQTT messages this node keeps, 0..16384MiB";
    mqtt_session_expiry MQTT_SESSION_EXPIRY: Duration =
        MqttLimits::default().session_expiry_max.to_duration(),
        Number(|s| parse_duration_in(s, MQTT_EXPIRY_RANGE)),
        flag "--mqtt-session-expiry" "DURATION", env "MACULA_MQTT_SESSION_EXPIRY",
        toml "mqtt.session_expiry", default "1h",
        "Longest a disconnected persistent MQTT session is kept (3.1.1 sessions get this, 5.0 \
         ones at most this); 1s..30d";
    log_format LOG_FORMAT: LogFormat = DEFAULT_LOG_FORMAT, Text(str::parse::<LogFormat>),
        flag "--log-format" "text|json", env "MACULA_LOG_FORMAT", toml "log.format",
        default "text", "Log format: \"text\" or \"json\"";
    otlp OTLP: Option<String> = None, Text(parse_otlp),
        flag "--otlp" "URL", env "MACULA_OTLP", toml "trace.otlp",
        default "none (no spans)",
        "Export spans (publish, deliver, call, handle, reply, DHT lookups, relay hops, gateway \
         forwarding) to this OpenTelemetry collector over OTLP/HTTP, http://HOST:PORT (needs \
         the `otlp` cargo feature)";
    trace_sample TRACE_SAMPLE: f64 = DEFAULT_TRACE_SAMPLE, Number(parse_ratio),
        flag "--trace-sample" "RATIO", env "MACULA_TRACE_SAMPLE", toml "trace.sample",
        default "1",
        "With --otlp: share of the operations starting here that start a trace, 0..1; a message \
         or call from a traced parent follows its parent's decision";
}

/// An OTLP/HTTP collector: `http://HOST:PORT` (no TLS in the exporter).
pub fn parse_otlp(s: &str) -> Result<String, String> {
    let base = s.trim_end_matches('/');
    match base.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
            Ok(base.to_string())
        }
        _ => Err(
            "expected http://HOST:PORT (OTLP/HTTP; no TLS: run a collector on this host \
                  or its network)"
                .to_string(),
        ),
    }
}

/// A share between 0 and 1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("expected a number from 0 to 1".to_string()),
    }
}

/// Stores a resolved value (`Option<PathBuf>` settings take a `PathBuf`).
fn set<T, U: From<T>>(slot: &mut U, value: T) {
    *slot = U::from(value);
}

// ---------------------------------------------------------------------------
// Kinds: how a setting is written in each layer
// ---------------------------------------------------------------------------

/// The clap side of a kind of setting: the type of its [`NodeArgs`] field
/// and its argument. (Each kind's `get` is where [`Layers`] looks for it.)
pub trait Kind {
    /// The [`NodeArgs`] field.
    type Flag: Clone + Default + fmt::Debug;
    /// The flag of `key`, whose clap id is `id` (the field name).
    fn arg(key: &Key, id: &'static str) -> clap::Arg;
    /// Sets `flag` from the command line, if it was given there.
    fn update(flag: &mut Self::Flag, m: &clap::ArgMatches, id: &str);
}

/// A word or address: a TOML string in the file.
pub struct Text;
/// A count, size or duration: a TOML integer or string in the file.
pub struct Number;
/// A path: in the file, a non-empty string, relative to the file's directory.
pub struct FilePath;
/// A list: comma-separated in flags (also repeatable) and the environment;
/// in the file, an array of strings or one comma-separated string.
pub struct List;

/// Result of looking a setting up: its value and where it came from.
type Found<T> = Result<Option<(T, Origin)>, ConfigError>;

/// A flag with its help: `HELP [env: VAR] [default: X]`.
fn flag_arg(key: &Key, id: &'static str) -> clap::Arg {
    let mut help = format!("{} [env: {}]", key.help, key.env);
    if !key.default.is_empty() {
        help.push_str(&format!(" [default: {}]", key.default));
    }
    clap::Arg::new(id)
        .long(key.flag.trim_start_matches('-'))
        .value_name(key.value_name)
        .help(help)
}

/// One optional value of type `T` (a flag given twice is a usage error).
fn single<T: Clone + Send + Sync + 'static>(flag: &mut Option<T>, m: &clap::ArgMatches, id: &str) {
    if let Some(v) = m.get_one::<T>(id) {
        *flag = Some(v.clone());
    }
}

impl Kind for Text {
    type Flag = Option<String>;
    fn arg(key: &Key, id: &'static str) -> clap::Arg {
        flag_arg(key, id)
            .action(clap::ArgAction::Set)
            .value_parser(clap::value_parser!(String))
    }
    fn update(flag: &mut Self::Flag, m: &clap::ArgMatches, id: &str) {
        single(flag, m, id);
    }
}

impl Kind for Number {
    type Flag = Option<String>;
    fn arg(key: &Key, id: &'static str) -> clap::Arg {
        Text::arg(key, id)
    }
    fn update(flag: &mut Self::Flag, m: &clap::ArgMatches, id: &str) {
        single(flag, m, id);
    }
}

impl Kind for FilePath {
    type Flag = Option<PathBuf>;
    fn arg(key: &Key, id: &'static str) -> clap::Arg {
        flag_arg(key, id)
            .action(clap::ArgAction::Set)
            .value_parser(clap::value_parser!(PathBuf))
    }
    fn update(flag: &mut Self::Flag, m: &clap::ArgMatches, id: &str) {
        single(flag, m, id);
    }
}

impl Kind for List {
    type Flag = Vec<String>;
    fn arg(key: &Key, id: &'static str) -> clap::Arg {
        flag_arg(key, id)
            .action(clap::ArgAction::Append)
            .value_parser(clap::value_parser!(String))
    }
    fn update(flag: &mut Self::Flag, m: &clap::ArgMatches, id: &str) {
        if let Some(values) = m.get_many::<String>(id) {
            *flag = values.cloned().collect();
        }
    }
}

impl Text {
    fn get<T>(
        layers: &Layers,
        flag: &Option<String>,
        key: &Key,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Found<T> {
        layers.value(flag, key, false, parse)
    }
}

impl Number {
    fn get<T>(
        layers: &Layers,
        flag: &Option<String>,
        key: &Key,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Found<T> {
        layers.value(flag, key, true, parse)
    }
}

impl FilePath {
    fn get(layers: &Layers, flag: &Option<PathBuf>, key: &Key) -> Found<PathBuf> {
        layers.path(flag, key)
    }
}

impl List {
    fn get<T>(
        layers: &Layers,
        flags: &[String],
        key: &Key,
        parse_list: fn(&str) -> Result<Vec<T>, String>,
        parse_one: fn(&str) -> Result<Vec<T>, String>,
    ) -> Found<Vec<T>> {
        layers.list(flags, key, parse_list, parse_one)
    }
}

// ---------------------------------------------------------------------------
// Setting types
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
/// suffix (`64KiB`, `1MiB`, `1GiB`, case-insensitive, optional space).
/// `KB`/`MB`/`GB` are rejected as ambiguous.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const EXPECTED: &str =
        "expected a size in bytes or with a KiB/MiB suffix, e.g. 1048576 or 1MiB";
    let (n, unit) = split_number(s).ok_or(EXPECTED)?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "k" | "kb" | "m" | "mb" | "g" | "gb" => {
            return Err(format!(
                "ambiguous unit {unit:?}: use KiB (1024 bytes), MiB (1048576 bytes) or GiB"
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

/// A size in `min..=max` bytes that also fits this platform's `usize`.
fn parse_size_usize(s: &str, range: (u64, u64)) -> Result<usize, String> {
    let n = parse_size_in(s, range)?;
    usize::try_from(n).map_err(|_| format!("must be at most {} bytes on this platform", usize::MAX))
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

fn parse_relay_bytes_per_second(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n > MAX_RELAY_BYTES_PER_SECOND {
        return Err(format!(
            "must be at most {MAX_RELAY_BYTES_PER_SECOND} bytes (1GiB); 0 means unlimited"
        ));
    }
    Ok(n)
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

fn parse_label(s: &str) -> Result<Vec<String>, String> {
    let s = s.trim();
    let ok = s.split_once('=').is_some_and(|(k, v)| {
        let fine = |t: &str| {
            !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        fine(k) && fine(v)
    });
    if !ok {
        return Err(format!(
            "label {s:?}: expected KEY=VALUE, each 1 to 64 of A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(vec![s.to_string()])
}

fn parse_labels(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in s.split(',').filter(|i| !i.trim().is_empty()) {
        out.extend(parse_label(item)?);
    }
    Ok(out)
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

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err("expected \"on\" or \"off\"".to_string()),
    }
}

fn parse_mqtt_user(s: &str) -> Result<Vec<(String, String)>, String> {
    match s.split_once(':') {
        Some((u, p)) if !u.is_empty() && !u.contains(',') => {
            Ok(vec![(u.to_string(), p.to_string())])
        }
        _ => Err("expected NAME:PASSWORD (a non-empty name, no comma)".to_string()),
    }
}

fn parse_mqtt_users(s: &str) -> Result<Vec<(String, String)>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in s.split(',') {
        out.extend(parse_mqtt_user(item)?);
    }
    Ok(out)
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

/// A loaded config file: its path and its table, whose keys are all known
/// (checked on load). Values are looked up by dotted key and kept as raw TOML
/// so that a wrong type is reported like any other invalid value (key and
/// value named).
struct FileLayer {
    path: PathBuf,
    table: toml::Table,
}

impl FileLayer {
    fn load(path: &Path) -> Result<FileLayer, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        // Syntax first, then unknown keys (with their full dotted name).
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::ParseFile {
                    path: path.to_path_buf(),
                    message: e.to_string().trim_end().to_string(),
                })?;
        check_keys(&table, path)?;
        Ok(FileLayer {
            path: path.to_path_buf(),
            table,
        })
    }

    /// The value of a dotted key (`listen`, `tls.mode`), if the file sets it.
    fn get(&self, key: &Key) -> Option<&toml::Value> {
        match key.toml.split_once('.') {
            None => self.table.get(key.toml),
            Some((section, name)) => self.table.get(section)?.as_table()?.get(name),
        }
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
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let value = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) if allow_int => i.to_string(),
            toml::Value::Float(f) if allow_int => f.to_string(),
            _ if allow_int => return Err(self.invalid(key, v, "expected an integer or a string")),
            _ => return Err(self.invalid(key, v, "expected a string")),
        };
        Ok(Some(Raw {
            value,
            origin: self.origin(key),
        }))
    }

    /// A path-valued key; relative paths are taken from the file's directory.
    fn path(&self, key: &Key) -> Found<PathBuf> {
        let Some(v) = self.get(key) else {
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
    fn list(&self, key: &Key) -> Result<Option<Vec<(String, bool)>>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v {
            toml::Value::String(s) => Ok(Some(vec![(s.clone(), true)])),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok((s.clone(), false)),
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

/// Rejects keys the file format does not have, naming them in dotted form,
/// and sections that are not tables.
fn check_keys(table: &toml::Table, path: &Path) -> Result<(), ConfigError> {
    let known = |k: &str| keys::ALL.iter().any(|key| key.toml == k);
    let unknown = |k: String| ConfigError::UnknownKey {
        key: k,
        path: path.to_path_buf(),
    };
    for (k, v) in table {
        if k.contains('.') {
            // A quoted `"tls.mode"` is not `mode` in `[tls]`: the file has the
            // wrong shape, as a serde struct would say.
            let mut top: Vec<&str> = Vec::new();
            for key in keys::ALL {
                let name = key.toml.split('.').next().unwrap_or(key.toml);
                if !top.contains(&name) {
                    top.push(name);
                }
            }
            return Err(ConfigError::ParseFile {
                path: path.to_path_buf(),
                message: format!(
                    "unknown field `{k}`, expected one of `{}`",
                    top.join("`, `")
                ),
            });
        }
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

/// Where each setting that is not at its default came from, by flag.
type Origins = BTreeMap<&'static str, Origin>;

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
    /// The environment variable, treating set-but-blank as unset.
    fn env(&self, key: &Key) -> Option<Raw> {
        (self.env)(key.env)
            .filter(|v| !v.trim().is_empty())
            .map(|value| Raw {
                value,
                origin: Origin::Env(key.env),
            })
    }

    /// A scalar setting: the flag, else the variable, else the file.
    fn value<T>(
        &self,
        flag: &Option<String>,
        key: &Key,
        file_allows_int: bool,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Found<T> {
        let raw = match flag {
            Some(v) => Some(Raw {
                value: v.clone(),
                origin: Origin::Flag(key.flag),
            }),
            None => match (self.env(key), &self.file) {
                (Some(raw), _) => Some(raw),
                (None, Some(file)) => file.scalar(key, file_allows_int)?,
                (None, None) => None,
            },
        };
        match raw {
            Some(raw) => Ok(Some((raw.parse(parse)?, raw.origin))),
            None => Ok(None),
        }
    }

    /// A path setting; flags and the environment are taken as given.
    fn path(&self, flag: &Option<PathBuf>, key: &Key) -> Found<PathBuf> {
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

    /// A list setting, layered as a whole. Flags and env are comma-separated
    /// (flags repeatable); the file has an array of strings or one
    /// comma-separated string.
    fn list<T>(
        &self,
        flags: &[String],
        key: &Key,
        parse_list: fn(&str) -> Result<Vec<T>, String>,
        parse_one: fn(&str) -> Result<Vec<T>, String>,
    ) -> Found<Vec<T>> {
        let (items, origin) = if !flags.is_empty() {
            let items = flags.iter().map(|v| (v.clone(), true)).collect();
            (items, Origin::Flag(key.flag))
        } else if let Some(raw) = self.env(key) {
            (vec![(raw.value, true)], raw.origin)
        } else {
            match &self.file {
                Some(file) => match file.list(key)? {
                    Some(items) => (items, file.origin(key)),
                    None => return Ok(None),
                },
                None => return Ok(None),
            }
        };
        let mut out = Vec::new();
        for (value, is_list) in items {
            let raw = Raw {
                value,
                origin: origin.clone(),
            };
            out.extend(raw.parse(if is_list { parse_list } else { parse_one })?);
        }
        Ok(Some((out, origin)))
    }
}

/// Resolves the node's settings: flag > `MACULA_*` environment variable >
/// config file (`--config` / `MACULA_CONFIG`, read only when given) > default.
///
/// `env` looks up an environment variable; the binary passes
/// `|k| std::env::var(k).ok()`. A variable that is set but blank counts as
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
    let (mut settings, origins) = resolve_keys(&layers, args)?;
    check_tls(&settings, &origins)?;
    check_raft(&mut settings)?;
    settings.config_file = config_file;
    Ok(settings)
}

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
fn check_raft(s: &mut Settings) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    s.raft_groups.retain(|g| seen.insert(g.clone()));
    let mut seen = std::collections::BTreeSet::new();
    s.raft_members.retain(|m| seen.insert(*m));
    if s.raft_groups.is_empty() && !s.raft_members.is_empty() {
        let list: Vec<String> = s.raft_members.iter().map(|m| m.to_string()).collect();
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
    if s.raft_groups.len() > s.raft_max_groups {
        return Err(ConfigError::Conflict {
            key: all_names(&keys::RAFT_GROUPS),
            value: s.raft_groups.join(","),
            reason: format!(
                "that is {} groups and a node runs at most {} ({})",
                s.raft_groups.len(),
                s.raft_max_groups,
                keys::RAFT_MAX_GROUPS.flag
            ),
        });
    }
    Ok(())
}

/// CA mode needs both files; self mode must not be given them (they would be
/// silently ignored, which looks like CA verification but is not).
fn check_tls(s: &Settings, origins: &Origins) -> Result<(), ConfigError> {
    let mode_origin = match origins.get(keys::TLS_MODE.flag) {
        Some(origin) => format!("set by {origin}"),
        None => "the default".to_string(),
    };
    let files = [
        (&keys::TLS_CA_CERT_FILE, &s.tls_ca_cert_file),
        (&keys::TLS_CERT_FILE, &s.tls_cert_file),
    ];
    match s.tls_mode {
        TlsModeSetting::Ca => {
            let needs = [
                "the CA certificate (PEM) that every peer's chain must lead to",
                "this node's certificate chain (PEM), issued by the CA for the node key",
            ];
            for ((key, file), what) in files.into_iter().zip(needs) {
                if file.is_none() {
                    return Err(ConfigError::Missing {
                        key: all_names(key),
                        reason: format!("TLS mode \"ca\" ({mode_origin}) needs {what}"),
                    });
                }
            }
            Ok(())
        }
        TlsModeSetting::SelfCertifying => {
            for (key, file) in files {
                if let (Some(path), Some(origin)) = (file, origins.get(key.flag)) {
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
            }
            Ok(())
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

    /// `macula start`'s flags alone, as clap parses them.
    #[derive(clap::Parser)]
    struct StartFlags {
        #[command(flatten)]
        node: NodeArgs,
    }

    /// `--flag=value` for `key` (through clap), nothing else set.
    fn flag_args(key: &Key, value: &str) -> NodeArgs {
        use clap::Parser;
        let flag = format!("{}={value}", key.flag);
        match StartFlags::try_parse_from(["macula", &flag]) {
            Ok(cli) => cli.node,
            Err(e) => panic!("{flag}: {e}"),
        }
    }

    /// Resolves `key` given as a flag, nothing else set.
    fn with_flag(key: &Key, value: &str) -> Result<Settings, ConfigError> {
        resolve(&flag_args(key, value), &no_env)
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
        // Every default `--help` shows is the value the node runs with, but
        // for those that describe what is not a value: an empty list, a
        // per-machine directory, a file only CA mode needs.
        let described = [
            keys::BOOTSTRAP,
            keys::DATA_DIR,
            keys::TLS_CA_CERT_FILE,
            keys::TLS_CERT_FILE,
            keys::TLS_PINNED,
            keys::RAFT_GROUPS,
            keys::LABELS,
            keys::RAFT_MEMBERS,
            keys::REALM_AUTHORITY,
            keys::GRANT_FILE,
            keys::API_KEYS,
            keys::REVOCATIONS_FILE,
            keys::ADMIN_TOKEN_FILE,
            keys::MQTT,
            keys::MQTT_CERT_FILE,
            keys::MQTT_KEY_FILE,
            keys::MQTT_USERS,
            keys::OTLP,
        ];
        for k in keys::ALL.iter().filter(|k| !described.contains(k)) {
            let s = with_flag(k, k.default).unwrap_or_else(|e| panic!("{}: {e}", k.flag));
            assert_eq!(
                s.field_debug(k),
                d.field_debug(k),
                "{} {}",
                k.flag,
                k.default
            );
        }
        assert_eq!(
            keys::ALL.len() - described.len(),
            65,
            "keys with a value default"
        );
        assert_eq!(d.listen, "0.0.0.0:4433".parse().unwrap());
        assert_eq!(keys::REALM.default, d.realm);
        assert_eq!(keys::DATA_DIR.default, "<user data dir>/macula");
        assert!(d.bootstrap.is_empty() && d.tls_pinned.is_empty());
        assert!(d.tls_ca_cert_file.is_none() && d.tls_cert_file.is_none());
        // The daemon's defaults are the pub/sub core's.
        let pubsub = macula::config::PubSubLimits::default();
        assert_eq!(d.pubsub_queue_capacity, pubsub.queue_capacity);
        assert_eq!(d.pubsub_queue_bytes, pubsub.queue_bytes);
        assert_eq!(d.pubsub_peer_queue_capacity, pubsub.peer_queue_capacity);
        assert_eq!(d.pubsub_peer_queue_bytes, pubsub.peer_queue_bytes);
        assert_eq!(
            d.peer_down_after,
            macula::config::Limits::default().peer_down_after
        );
        // The daemon's defaults are the runtime's (heartbeat: a quarter).
        let raft = macula::config::RaftLimits::default();
        assert_eq!(d.raft_election_timeout / 4, raft.heartbeat);
        assert!(d.raft_groups.is_empty() && d.raft_members.is_empty());
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
        for bad in ["", "MiB", "1.5MiB", "-1", "1 M iB", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size("1MB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("1G").unwrap_err().contains("ambiguous"));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
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
        let idle = |v: &str| with_flag(&keys::IDLE_TIMEOUT, v).map(|s| s.idle_timeout);
        assert_eq!(idle("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(idle("1000ms").unwrap(), Duration::from_secs(1));
        assert_eq!(idle("24h").unwrap(), Duration::from_secs(86_400));
        assert!(idle("999ms").is_err());
        assert!(idle("0").is_err());
        assert!(idle("25h").is_err());
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

    /// A setting is one entry of the `settings!` table. From that entry
    /// alone it has names no other setting has, a flag in `--help` with its
    /// variable and default, and is read from every layer under its own name
    /// (or refused, naming it); a neighbour of its TOML key is refused.
    #[test]
    fn a_new_key_is_one_declaration() {
        use clap::CommandFactory;
        let all: Vec<&Key> = std::iter::once(&keys::CONFIG).chain(keys::ALL).collect();
        let help = StartFlags::command().render_long_help().to_string();
        for (i, k) in all.iter().enumerate() {
            for other in &all[i + 1..] {
                assert!(
                    k.flag != other.flag
                        && k.env != other.env
                        && (k.toml.is_empty() || k.toml != other.toml),
                    "{k:?} and {other:?} share a name"
                );
            }
            assert!(
                k.flag.starts_with("--") && k.env.starts_with("MACULA_"),
                "{k:?}"
            );
            assert!(
                help.contains(&format!("{} <{}>", k.flag, k.value_name)),
                "help lists {}",
                k.flag
            );
            let mut shown = format!("{} [env: {}]", k.help, k.env);
            if !k.default.is_empty() {
                shown = format!("{shown} [default: {}]", k.default);
            }
            assert!(help.contains(&format!("{shown}\n")), "help of {}", k.flag);
        }

        let bogus = "bogus!";
        for k in keys::ALL {
            let (section, name) = match k.toml.split_once('.') {
                Some((section, name)) => (format!("[{section}]\n"), name),
                None => (String::new(), k.toml),
            };
            assert!(
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{k:?}"
            );
            let file = toml_file(&format!("{section}{name} = \"{bogus}\"\n"));
            let in_file = format!("`{}` in {}", k.toml, file.path().display());
            let env = env_of(&[(k.env, bogus)]);
            type Env<'a> = &'a dyn Fn(&str) -> Option<String>;
            let layers: [(NodeArgs, Env, &str); 3] = [
                (flag_args(k, bogus), &no_env, k.flag),
                (NodeArgs::default(), &env, k.env),
                (args_with_config(&file), &no_env, &in_file),
            ];
            for (args, env, given) in layers {
                match resolve(&args, env) {
                    Ok(s) => assert!(s.field_debug(k).contains(bogus), "{given} is ignored"),
                    Err(e) => {
                        let msg = e.to_string();
                        assert!(
                            msg.starts_with(&format!("invalid value \"{bogus}\" for {given}: "))
                                || msg.starts_with(&format!("{given} is set to ")),
                            "{given}: {msg}"
                        );
                    }
                }
            }
            let f = toml_file(&format!("{section}{name}x = 1\n"));
            match resolve(&args_with_config(&f), &no_env) {
                Err(ConfigError::UnknownKey { key, .. }) => assert_eq!(key, format!("{}x", k.toml)),
                other => panic!("`{}x` is not refused: {other:?}", k.toml),
            }
        }
    }
}
