//! Macula: a zero-config application mesh.
//!
//! This crate is the public face of the mesh for applications, and the only
//! crate the `macula` binary itself uses: whatever the daemon, the CLI and
//! the benchmarks need is here, so an embedding application can do all they
//! do. A node is one call away:
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
//! Publish, subscribe, advertise and call on one node (local delivery and
//! local calls take no network hop):
//!
//! ```
//! use futures::StreamExt;
//! use macula::{HandlerError, Request, SubscriptionItem};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let node = macula::Node::builder()
//!     .realm("io.example.docs")
//!     .listen("127.0.0.1:0".parse()?)
//!     .start()
//!     .await?;
//!
//! let mut orders = node.subscribe("orders.*").await?;
//! node.publish("orders.new", "42 apples").await?;
//! let Some(SubscriptionItem::Event(e)) = orders.next().await else { panic!() };
//! assert_eq!(&e.payload[..], b"42 apples");
//!
//! async fn quote(req: Request) -> Result<bytes::Bytes, HandlerError> {
//!     Ok(req.payload)
//! }
//! let _served = node.advertise("pricing.quote", quote).await?;
//! let reply = node.call("pricing.quote", "apples").await?;
//! assert_eq!(&reply.payload[..], b"apples");
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Everything has a default: realm `default`, QUIC on `0.0.0.0:4433`, an
//! in-memory identity unless `data_dir` is set (the `macula` daemon always
//! persists one). Settings, their defaults and bounds are in [`config`];
//! name rules in [`names`]; the admin HTTP API in [`admin`].
//!
//! This crate only assembles, wraps and re-exports: protocol logic lives in
//! the protocol crates and the runtime in `macula-runtime`. It must not
//! grow behaviour of its own; where a runtime type would leak its internals
//! (sockets, QUIC connections, service modules) it is wrapped here.

#![warn(missing_docs)]

pub mod admin;
mod call;
mod client;
pub mod config;
pub mod crdt;
pub mod names;
mod node;
pub mod raft;
pub mod stream;

pub use call::CallBuilder;
pub use client::{connect_client, Client, ClientBuilder, ClientSocket};
pub use crdt::{Crdt, CrdtError, CrdtOptions};
pub use node::{Node, NodeBuilder, NodeStats, Peer, PeerInfo, JOIN_WAIT};

/// Realm admission and authorization (issue 18): grants, revocation
/// lists, policies; admission at the handshake and admin grants use them.
pub use macula_auth as auth;

/// API keys for lightweight clients: the key, the gateway's store of
/// hashes and grants (its file's lines), the failure limits.
pub mod apikey {
    pub use macula_runtime::apikey::{
        ApiKey, ApiKeyEntry, ApiKeyError, ApiKeyLimits, ApiKeyStore, KeyHash, API_KEY_BYTES,
        API_KEY_PREFIX, DEFAULT_FAILURE_WINDOW, DEFAULT_MAX_FAILURES_PER_ADDRESS,
        DEFAULT_MAX_FAILURES_PER_REALM, DEFAULT_MAX_TRACKED_ADDRESSES, MAX_API_KEYS,
    };
}
pub use macula_rpc::Strategy;
/// The node's audit trail file: [`audit_log::AuditLog`] (see
/// [`Node::audit`]) and [`audit_log::files`] (a directory's rotated set,
/// oldest first).
pub use macula_runtime::audit_log;
pub use macula_runtime::dht::{DhtError, DhtHandle, DhtRecord, DhtStatus};
/// End-to-end payload encryption at the edges (issue 19).
pub use macula_runtime::e2e;
pub use macula_runtime::identity::{Identity, IdentityError};
pub use macula_runtime::metrics::Metrics;
pub use macula_runtime::peer::PingError;
pub use macula_runtime::peer_addr::{parse_list as parse_peer_addrs, PeerAddrError};
pub use macula_runtime::pubsub::{
    Event, Overflow, Proof, PubSubError, PublishOptions, Subscription, SubscriptionItem, TopicName,
};
pub use macula_runtime::rpc::{
    AdvertiseOptions, CallOptions, Handler, HandlerError, HandlerResult, ProviderInfo,
    Registration, Request, Response, RpcError,
};
/// Distributed tracing: trace context in PUBLISH and CALL headers, and
/// (cargo feature `otlp`) OpenTelemetry spans for publish, delivery, calls,
/// handlers, DHT lookups, relay hops and gateway forwarding.
pub use macula_runtime::trace;
pub use macula_runtime::{ClientError, ConnectError, Direction, PeerAddr, PeerEvent, StartError};
/// A small seedable PRNG (xoshiro256**), for tests and benchmarks that
/// must pick the same things every run.
pub use macula_wire::rng;
pub use macula_wire::{dht_key, DisconnectReason, NodeId};

/// Errors from the public API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder value is invalid; names the setting and the value.
    #[error("invalid value {value:?} for {key}: {reason}")]
    Config {
        /// The setting, e.g. `bootstrap`.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
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
    /// A lightweight client could not attach, or its socket not be bound.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An RPC call, advertisement or service listing failed (see
    /// [`RpcError::kind`]).
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The node started but none of its bootstrap peers answered within the
    /// wait; it was shut down again.
    #[error("could not join the mesh through {peers} within {waited:?}: no bootstrap peer answered (NodeBuilder::wait_for_join(None) starts anyway and keeps retrying)")]
    Join {
        /// The bootstrap peers, as given.
        peers: String,
        /// How long the start waited.
        waited: std::time::Duration,
    },
    /// Every bootstrap peer answered and refused this node for good
    /// (another realm, protocol version or node identity): the start ended
    /// at once instead of retrying, and the node was shut down again.
    #[error("could not join the mesh: every bootstrap peer refused this node: {refusals}")]
    JoinRefused {
        /// Each peer and its refusal, `; `-separated.
        refusals: String,
    },
    /// A Raft group operation failed (see [`raft::GroupError`]).
    #[error(transparent)]
    Raft(#[from] raft::GroupError),
    /// A replicated CRDT could not be opened or updated (see
    /// [`crdt::CrdtError`]).
    #[error(transparent)]
    Crdt(#[from] crdt::CrdtError),
}

impl Error {
    /// A short stable name for what failed, for metrics, logs and matching
    /// without the variant's fields: `config`, `start`, `connect`, `join`,
    /// `join_refused`, `client`, `pubsub.<kind>` (e.g. `pubsub.queue_full`) or
    /// `rpc.<kind>` (e.g. `rpc.timeout`, see [`RpcError::kind`]), `raft.<kind>`
    /// or `crdt.<kind>` (see [`crdt::CrdtError::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config { .. } => "config",
            Error::Start(_) => "start",
            Error::Connect(_) => "connect",
            Error::Join { .. } => "join",
            Error::JoinRefused { .. } => "join_refused",
            Error::Client(_) => "client",
            Error::PubSub(e) => pubsub_kind(e),
            Error::Rpc(e) => rpc_kind(e),
            Error::Raft(e) => raft_kind(e),
            Error::Crdt(e) => e.kind(),
        }
    }

    /// The RPC failure, if this is one.
    pub fn as_rpc(&self) -> Option<&RpcError> {
        match self {
            Error::Rpc(e) => Some(e),
            _ => None,
        }
    }

    /// The pub/sub failure, if this is one.
    pub fn as_pubsub(&self) -> Option<&PubSubError> {
        match self {
            Error::PubSub(e) => Some(e),
            _ => None,
        }
    }
}

fn pubsub_kind(e: &PubSubError) -> &'static str {
    match e {
        PubSubError::InvalidTopic { .. } => "pubsub.invalid_topic",
        PubSubError::InvalidPattern { .. } => "pubsub.invalid_pattern",
        PubSubError::PayloadTooLarge { .. } => "pubsub.payload_too_large",
        PubSubError::TooManyHeaders { .. } | PubSubError::HeaderTooLong { .. } => {
            "pubsub.bad_headers"
        }
        PubSubError::TooManySubscriptions { .. } => "pubsub.too_many_subscriptions",
        PubSubError::Interest { .. } => "pubsub.interest",
        PubSubError::Detached => "pubsub.detached",
        PubSubError::NeedsFullNode { .. } => "pubsub.needs_full_node",
        PubSubError::QueueFull { .. } => "pubsub.queue_full",
        PubSubError::FlushTimeout { .. } => "pubsub.flush_timeout",
        PubSubError::Unauthorized { .. } => "pubsub.unauthorized",
        _ => "pubsub.other",
    }
}

fn raft_kind(e: &raft::GroupError) -> &'static str {
    use raft::GroupError as G;
    match e {
        G::NoDataDir => "raft.no_data_dir",
        G::BadName(_) => "raft.bad_name",
        G::TooManyGroups { .. } => "raft.too_many_groups",
        G::Store(_) => "raft.store",
        G::NoLeader(_) => "raft.no_leader",
        G::Uncertain { .. } => "raft.uncertain",
        G::Kv(_) => "raft.kv",
        G::Membership(_) => "raft.membership",
        G::Stopped(_) => "raft.stopped",
        G::NoLease(_) => "raft.no_lease",
        _ => "raft.other",
    }
}

fn rpc_kind(e: &RpcError) -> &'static str {
    match e {
        RpcError::InvalidProcedure { .. } => "rpc.invalid_procedure",
        RpcError::NoProviders { .. } => "rpc.no_providers",
        RpcError::Timeout { .. } => "rpc.timeout",
        RpcError::Handler { .. } => "rpc.handler_error",
        RpcError::Panicked { .. } => "rpc.panicked",
        RpcError::Overloaded { .. } => "rpc.overloaded",
        RpcError::Unreachable { .. } => "rpc.unreachable",
        RpcError::Cancelled { .. } => "rpc.cancelled",
        RpcError::ShuttingDown => "rpc.shutting_down",
        RpcError::AlreadyAdvertised { .. } => "rpc.already_advertised",
        RpcError::PayloadTooLarge { .. } => "rpc.payload_too_large",
        RpcError::Unauthorized { .. } => "rpc.unauthorized",
        RpcError::TooManyHeaders { .. } => "rpc.too_many_headers",
        RpcError::TooManyAdvertised { .. } => "rpc.too_many_advertised",
        RpcError::Advertise { .. } => "rpc.advertise_failed",
        RpcError::Sealing { .. } => "rpc.sealing",
        _ => "rpc.other",
    }
}

/// Parses a user-given peer address for the setting `key`.
fn parse_peer(key: &'static str, s: &str) -> Result<PeerAddr, Error> {
    s.parse().map_err(|e: PeerAddrError| Error::Config {
        key,
        value: s.to_string(),
        reason: e.to_string(),
    })
}
