//! Macula runtime: drives the pure protocol code over tokio and quinn.
//!
//! It owns everything with side effects — the identity file, the TLS
//! configuration, the one UDP socket, the connection pool, tasks and timers —
//! and keeps each of them thin: protocol decisions live in `macula-wire` and
//! in the pure crates (`macula-pool`'s `PoolTable`, the protocol cores) and
//! modules here (`backoff`).
//!
//! **Invariant:** nothing reaches a peer-facing API before the peer has
//! proved its node ID in TLS *and* completed the HELLO exchange.

pub mod admin;
pub mod apikey;
pub mod apikey_gate;
pub mod audit_log;
pub mod authz;
mod backoff;
pub mod client;
pub mod clock;
pub mod config;
pub mod datadir;
pub mod dht;
pub mod dht_cache;
pub mod dht_snapshot;
mod driver;
pub mod e2e;
pub mod framed;
pub mod gateway;
pub mod handshake_error;
pub mod identity;
pub mod metrics;
pub mod mqtt;
pub mod nat;
pub mod node;
pub mod peer;
pub mod peer_addr;
pub mod pubsub;
pub mod punch;
pub mod quiet;
pub mod raft;
pub mod reachability;
pub mod realm;
pub mod relay;
pub mod rpc;
mod service;
pub mod status;
pub mod stream;
pub mod tls;
pub mod trace;
pub mod trust;
pub mod tunnel;

pub use client::{Client, ClientConfig, ClientError};
pub use config::{IdentitySource, Limits, NodeConfig, RaftLimits, ReachabilityMode, RelayLimits};
pub use identity::Identity;
pub use node::{ConnectError, NodeRuntime, PeerEvent, StartError};
pub use peer::{Direction, Peer};
pub use peer_addr::PeerAddr;
