//! Macula workloads as WebAssembly components (issue 25; docs/WASM.md).
//!
//! A workload is a component of world `macula:mesh/workload`
//! (`wit/mesh.wit`): it imports the node's `host` interface (log, publish,
//! call, advertise, subscribe, KV) and exports `handlers` (`init`,
//! `handle-call`, `handle-event`). [`WasmHost`] compiles components
//! (wasmtime, Cranelift) and runs them under [`WasmLimits`] (memory,
//! tables, fuel per call); [`WasmHost::start`] makes a [`Workload`] on a
//! node: its procedures advertised through the node's RPC and its
//! subscriptions made through the node's pub/sub, like any application's.
//!
//! Around it, the mesh's workload service (items 2-4): [`artifact`]
//! (content-addressed, chunked component files fetched from peers),
//! [`rollout`] (the records and the rollout plan's rules: the pure core
//! `macula-rollout`, re-exported),
//! [`agent`] (one per node: runs what it is ordered to; the leader of
//! group `_workloads` coordinates rollouts) and [`admin`] (its HTTP
//! routes on the node's admin API).
//!
//! Modules, one way: `error` <- `limits` <- `metrics` <- `state` (the
//! store's data, the WIT host) <- `host` (engine, compile, instantiate) <-
//! `workload` (serving) <- `artifact` <- `agent` <- `admin`.

pub mod admin;
pub mod agent;
pub mod artifact;
mod bindings;
mod error;
mod host;
mod limits;
mod metrics;
mod state;
mod workload;

pub use agent::{Agent, AgentError, AgentOptions};
pub use error::{Limit, LimitHit, WasmError};
pub use host::{Compiled, WasmHost};
pub use limits::WasmLimits;
/// The records, plan rules and wire types of rollouts (the pure core).
pub use macula_rollout::records as rollout;
pub use metrics::WasmMetrics;
pub use workload::{Workload, CODE_LIMIT, CODE_TRAP, CODE_UNAVAILABLE};

/// The WIT of world `macula:mesh/workload`, for tools that build guests.
pub const WIT: &str = include_str!("../wit/mesh.wit");
