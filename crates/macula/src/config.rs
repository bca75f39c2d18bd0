//! Settings of a node or client, their defaults and their bounds.
//!
//! [`NodeConfig`] is everything a node can be told; [`crate::NodeBuilder`]
//! sets the common parts one at a time, and takes a whole `NodeConfig` when
//! an application (such as the `macula` daemon, which layers flags,
//! environment and a TOML file) builds its own. Each field of each struct
//! has a default a production mesh runs with; override single fields with
//! struct update syntax:
//!
//! ```
//! use macula::config::{Limits, NodeConfig, ReachabilityMode};
//!
//! let config = NodeConfig {
//!     realm: "io.example.shop".into(),
//!     reachability: ReachabilityMode::Private,
//!     limits: Limits { max_connections: 200, ..Limits::default() },
//!     ..NodeConfig::default()
//! };
//! assert!(config.validate().is_ok());
//! ```
//!
//! The constants are the defaults and bounds the runtime applies, under
//! stable names here: where a limit lives inside the runtime may change,
//! these names do not. This module only names things; it must not hold
//! behaviour.

use std::time::Duration;

pub use macula_runtime::config::{
    AdminAuthConfig, Admission, AuditLimits, ConfigError, IdentitySource, Limits, NodeConfig,
    RaftLimits, ReachabilityMode, RelayLimits, RpcLimits, StreamLimits,
    DEFAULT_ADMIN_FAILURE_SOURCES, DEFAULT_ADMIN_FAILURE_WINDOW, DEFAULT_ADMIN_MAX_FAILURES,
    DEFAULT_ADMIN_REPLAY_CACHE, DEFAULT_ADMIN_REQUEST_WINDOW, DEFAULT_AUDIT_CHECKPOINT_EVERY,
    DEFAULT_AUDIT_CHECKPOINT_INTERVAL, DEFAULT_AUDIT_FILES, DEFAULT_AUDIT_MAX_BYTES,
    DEFAULT_AUDIT_QUEUE,
};
pub use macula_runtime::config::{
    DashboardLimits, DEFAULT_DASHBOARD_INTERVAL, DEFAULT_DASHBOARD_MAX_PEERS,
    DEFAULT_DASHBOARD_MAX_STREAMS, DEFAULT_DASHBOARD_RATE_WINDOW, DEFAULT_DASHBOARD_STALE_AFTER,
    DEFAULT_DASHBOARD_STREAM_MAX, DEFAULT_STATUS_MAX_LINKS, DEFAULT_STATUS_MIN_ANSWER_INTERVAL,
};
pub use macula_runtime::config::{MqttConfig, MqttLimits, MqttMillis, MqttTls};
pub use macula_runtime::config::{
    TrustLimits, DEFAULT_DHT_REQUEST_TIMEOUT, DEFAULT_DHT_SNAPSHOT_INTERVAL, DEFAULT_MAX_PINS,
};
pub use macula_runtime::nat::NatLimits;
pub use macula_runtime::tls::{TlsError, TlsMode, TlsOptions};
pub use macula_runtime::trust::{Pin, Pins};

/// The limits of pub/sub: subscription queue capacity and bytes, topic and
/// pattern sizes, the match cache, publishers tracked
/// ([`NodeConfig::pubsub`]).
pub type PubSubLimits = macula_pubsub::Limits;

/// Realm of a node or client that names none: nodes that configure nothing
/// find each other.
pub const DEFAULT_REALM: &str = macula_runtime::config::DEFAULT_REALM;

/// Name of the identity file in a node's data directory (an Ed25519 key,
/// PKCS#8 PEM, mode 0600).
pub const KEY_FILE_NAME: &str = macula_runtime::identity::KEY_FILE_NAME;

/// Default largest frame body ([`Limits::max_frame_size`]), bytes.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = macula_wire::DEFAULT_MAX_FRAME_SIZE;
/// Smallest accepted [`Limits::max_frame_size`], bytes.
pub const MIN_MAX_FRAME_SIZE: u32 = macula_wire::MIN_MAX_FRAME_SIZE;
/// Largest accepted [`Limits::max_frame_size`], bytes.
pub const MAX_MAX_FRAME_SIZE: u32 = macula_wire::MAX_MAX_FRAME_SIZE;

/// Smallest accepted flow-control window or send buffer
/// ([`Limits::stream_receive_window`], `connection_receive_window`,
/// `send_window`), bytes.
pub const MIN_WINDOW: u64 = macula_runtime::config::MIN_WINDOW;

/// Default events a subscription queues before the oldest are dropped
/// ([`PubSubLimits::queue_capacity`]).
pub const DEFAULT_PUBSUB_QUEUE_CAPACITY: usize = macula_pubsub::queue::QUEUE_CAPACITY;
/// Default payload bytes a subscription queues before the oldest are
/// dropped ([`PubSubLimits::queue_bytes`]).
pub const DEFAULT_PUBSUB_QUEUE_BYTES: usize = macula_pubsub::queue::QUEUE_BYTES;
/// Default messages queued for one remote node before a publish waits or
/// drops, as its [`crate::Overflow`] says
/// ([`PubSubLimits::peer_queue_capacity`]).
pub const DEFAULT_PUBSUB_PEER_QUEUE_CAPACITY: usize = macula_pubsub::outbound::PEER_QUEUE_CAPACITY;
/// Default payload bytes queued for one remote node before a publish waits
/// or drops ([`PubSubLimits::peer_queue_bytes`]).
pub const DEFAULT_PUBSUB_PEER_QUEUE_BYTES: usize = macula_pubsub::outbound::PEER_QUEUE_BYTES;

/// Default time a peer's pub/sub data stream may accept nothing before the
/// peer is cut off ([`Limits::pubsub_stall_timeout`]).
pub const DEFAULT_PUBSUB_STALL_TIMEOUT: Duration = macula_runtime::config::PEER_STALL_TIMEOUT;

/// Default deadline of a call, retries included ([`crate::CallBuilder`]).
pub const DEFAULT_CALL_TIMEOUT: Duration = macula_runtime::rpc::DEFAULT_CALL_TIMEOUT;
/// Default retries of a call on another provider (at-least-once: see
/// [`crate::CallBuilder::retries`]).
pub const DEFAULT_CALL_RETRIES: u32 = macula_runtime::rpc::DEFAULT_RETRIES;
/// Default load-balancing weight of an advertisement
/// ([`crate::AdvertiseOptions`]).
pub const DEFAULT_WEIGHT: u32 = macula_runtime::rpc::DEFAULT_WEIGHT;
