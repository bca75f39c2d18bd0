//! Macula workload rollouts as a pure core (issue 25, items 2-4;
//! docs/WASM.md "Deploying and upgrading"): no I/O, no clock.
//!
//! - [`manifest`]: an artifact's name (BLAKE3) and its chunks' hashes,
//!   checked on arrival;
//! - [`records`]: apps, releases and rollouts as kept in the KV of Raft
//!   group `_workloads`, and the rollout plan's rules (batches by
//!   strategy, pause, failure, rollback, abort, history);
//! - [`control`]: the agents' control procedure (`_node.workloads`) and
//!   the admin API's reports.
//!
//! The node side (artifact store, agent, coordinator, admin routes) is in
//! `macula-wasm`, which drives these with the mesh and the disk.
//!
//! Modules, one way: `manifest` <- `records` <- `control`.

pub mod control;
pub mod manifest;
pub mod records;
