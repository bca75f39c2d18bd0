//! Raft groups for Macula, on [openraft] 0.9 (storage v2).
//!
//! This crate holds everything a Raft group needs except the network: the
//! type configuration ([`TypeConfig`], members are [`MemberId`]s), the
//! key-value state machine with etcd-v3 semantics ([`kv`]: one revision per
//! group, per-key create/mod revision and version, leases, a workload
//! registry), bounded watch history ([`watch`]) and the store: the log in
//! files of its own ([`wal`]), the state machine in redb ([`store`]). The runtime (`macula-runtime`) carries
//! openraft's RPCs over the mesh and decides lease expiry; it reads the state
//! machine directly through [`StateMachineStore`] after
//! `raft.ensure_linearizable()`.
//!
//! # On-disk layout
//!
//! Per group, a directory of log files and one [redb] database file (the
//! runtime uses `<data_dir>/raft/<group>.wal/` and
//! `<data_dir>/raft/<group>.redb`; [`store::log_dir`]). The log files hold
//! the entries, the vote, the commit hint and the last purged id as
//! checksummed records ([`wal`] documents the format). Earlier versions
//! kept the log in the redb file (tables `log` and `log_meta`); [`open`]
//! moves such a log into the log files, whole, and drops those tables.
//! The database holds these tables:
//!
//! | table        | key                      | value                                             |
//! |--------------|--------------------------|---------------------------------------------------|
//! | `sm_meta`    | `&str`: `format`, `last_applied`, `last_membership`, `revision`, `snapshot_seq` | see below |
//! | `kv`         | key bytes                | [`store::StoredValue`]: value, revisions, version, lease |
//! | `leases`     | `u64` lease id           | [`store::StoredLease`]: `ttl_ms`                 |
//! | `snapshot`   | `&str`: `meta`, `data`   | `SnapshotMeta`, the snapshot bytes                |
//!
//! Every value is MessagePack written by `rmp_serde::to_vec_named` (structs
//! as maps with field names, enums externally tagged), so fields can be added
//! later with `#[serde(default)]` without breaking old files. `format` is a
//! `u32` format version ([`store::FORMAT_VERSION`]); a file with another
//! version is refused. Snapshot data is a named-form
//! [`kv::KvSnapshot`] (revision, every key with its metadata, every lease).
//! Keys starting with byte `0x00` are reserved for the system (the workload
//! registry lives under [`kv::WORKLOADS_PREFIX`]).
//!
//! # Durability
//!
//! * `append` writes a whole batch of entries (and whatever else was queued
//!   meanwhile) to the log files with one `fdatasync` (group commit) and
//!   calls openraft's callback only after it returned; a leader's own
//!   entries are the exception described at [`store::LogStore`].
//! * `save_vote`, `truncate`, `purge` (with `last_purged`) return once
//!   their record is synced; `save_committed` is a hint written with the
//!   next record (losing it only means re-applying more on restart).
//! * With a sync interval ([`store::Options::log_sync_interval`]), appends,
//!   truncations, purges and commit hints are acknowledged once written
//!   (to the operating system) and synced within the interval and at close;
//!   `save_vote` is still synced before it returns. The log then survives
//!   a crash of the process, not a power loss within the interval. An
//!   applier that syncs its own store syncs the log first
//!   ([`store::LogSyncer`], [`Applier::attach_log`]), so after a power
//!   loss it is never ahead of the log. An existing log is not known
//!   synced when it is opened (an earlier process may have been killed
//!   with writes in the page cache): its first sync request syncs it.
//! * `apply` writes the changed keys, leases, `last_applied`,
//!   `last_membership` and `revision` in one transaction, by default
//!   `Durability::Immediate` (see [`store::Options::durable_apply`]).
//! * A built or installed snapshot is persisted (`Immediate`) before it is
//!   returned, so a restarted member serves it. When the persisted snapshot
//!   is newer than the persisted state machine (possible after a crash with
//!   `durable_apply = false`, or a crash between a snapshot build and the
//!   state-machine commit), [`store::open`] restores the state machine from
//!   the snapshot; openraft then re-applies the log after it.
//!
//! Decoding errors of anything read from disk become openraft
//! [`openraft::StorageError`]s (never a panic).

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use openraft;

pub mod applier;
pub mod commit;
mod durable;
mod error;
pub mod kv;
pub mod linearizability;
pub mod probe;
pub mod store;
pub mod wal;
pub mod watch;

pub use applier::{Applier, ApplierFuture, LogSync};
pub use commit::{CommitTicket, Commits, NotCommitted};
pub use kv::{
    Event, Expect, KeyValue, Kv, KvError, Lease, Limits, OpaqueBytes, Request, Response, Workload,
};
pub use store::{
    open, open_with, Durable, LogStore, LogSyncInterval, LogSyncer, Options, SnapshotBuilder,
    StateMachineStore, StoreError,
};

/// A group member: a Macula node ID.
///
/// openraft needs `Default` (all zeros, never a real member's ID) and
/// `Display`; both `Display` and `Debug` print the node ID's text form.
/// On the wire and on disk it is the node ID's 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemberId(pub macula_wire::NodeId);

impl Default for MemberId {
    fn default() -> Self {
        MemberId(macula_wire::NodeId::from_bytes(
            [0; macula_wire::node_id::NODE_ID_LEN],
        ))
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<macula_wire::NodeId> for MemberId {
    fn from(id: macula_wire::NodeId) -> Self {
        MemberId(id)
    }
}

/// A synthetic member ID for tests (openraft's storage test suite builds
/// member IDs from numbers): 24 zero bytes then `n` big-endian. Never the ID
/// of a real node (a real ID is a BLAKE3 hash).
impl From<u64> for MemberId {
    fn from(n: u64) -> Self {
        let mut bytes = [0u8; macula_wire::node_id::NODE_ID_LEN];
        bytes[macula_wire::node_id::NODE_ID_LEN - 8..].copy_from_slice(&n.to_be_bytes());
        MemberId(macula_wire::NodeId::from_bytes(bytes))
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for a Macula Raft group.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = MemberId,
        Node = openraft::EmptyNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A running Raft group member.
pub type Raft = openraft::Raft<TypeConfig>;

/// A log id of this type configuration.
pub type LogId = openraft::LogId<MemberId>;

/// The membership as stored by the state machine.
pub type StoredMembership = openraft::StoredMembership<MemberId, openraft::EmptyNode>;

/// openraft's storage error for this type configuration.
pub type StorageError = openraft::StorageError<MemberId>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_id_text_and_default() {
        let zero = MemberId::default();
        assert_eq!(zero.0.as_bytes(), &[0u8; 32]);
        assert_eq!(zero, MemberId::from(0u64));
        let id = MemberId(macula_wire::NodeId::from_public_key(&[1; 32]));
        assert_eq!(format!("{id}"), id.0.to_string());
        assert_eq!(format!("{id:?}"), id.0.to_string());
        let bytes = rmp_serde::to_vec_named(&id).expect("encode");
        let back: MemberId = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, id);
        assert!(MemberId::from(1u64) < MemberId::from(2u64));
    }
}
