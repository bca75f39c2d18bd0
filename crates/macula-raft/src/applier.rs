//! A second state machine beside the key space: a group whose entries are
//! [`Request::Opaque`](crate::Request::Opaque) hands them to an
//! [`Applier`] (a replicated stream's store, in the runtime).
//!
//! The contract that keeps it exactly once across crashes:
//!
//! * [`Applier::apply`] gets every opaque payload of the entries being
//!   applied, in log order, with its log index (a batch entry gives several
//!   payloads the same index), and returns once they are applied, one
//!   answer per payload. It is called **before** the key space advances
//!   `last_applied`, so the applier is never behind what the store reports
//!   applied.
//! * It keeps its own applied index, written with the changes, and skips
//!   what it already holds (after a crash openraft re-applies the log from
//!   the state machine's persisted `last_applied`, which may be behind).
//! * Its changes need not be durable when `apply` returns (the log is):
//!   [`Applier::synced`] then names the last index whose changes survive a
//!   crash, and the store reports openraft, at start, the lower of that and
//!   its own `last_applied`, so the log is re-applied from there. Only for
//!   groups whose key space re-applies harmlessly (no key writes: a
//!   stream's group), and the applier must be synced up to any snapshot it
//!   makes (the log before it may be purged).
//! * With a log sync interval (`Options::log_sync_interval`) the log
//!   itself may be behind the disk, so before such an applier makes an
//!   applied index durable it syncs the log up to that index with the
//!   [`LogSync`] given to [`Applier::attach_log`] (the store's
//!   `LogSyncer`): after a power loss its synced index is then never ahead
//!   of the log it replays from.
//! * [`Applier::snapshot`] is its state as of some index at or after the
//!   key space's `last_applied` (snapshots are built beside applies), and
//!   [`Applier::install`] makes a lagging member's applier equal to that
//!   state: the data may be a summary (a stream's bounds) that the applier
//!   completes by fetching from the leader.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::StoreError;

/// A boxed future of the applier.
pub type ApplierFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// The state machine of a group's opaque entries (see the module docs).
pub trait Applier: Send + Sync + 'static {
    /// Applies `(log index, payload)` in order; returns once applied, with
    /// one answer per payload (an empty one for a payload already held).
    /// An error stops the group (its store can no longer be trusted).
    fn apply(&self, entries: Vec<(u64, Vec<u8>)>) -> ApplierFuture<'_, Vec<Vec<u8>>>;

    /// The last log index whose changes survive a crash, if that can be
    /// behind what [`Applier::apply`] returned (see the module docs);
    /// `None` (the default): every apply is durable when it returns.
    fn synced(&self) -> Option<u64> {
        None
    }

    /// Gives the applier its group's log once, when it is set
    /// (`StateMachineStore::set_applier`): an applier that makes its
    /// applied index durable on its own schedule ([`Applier::synced`])
    /// calls [`LogSync::sync_to`] with that index first (see the module
    /// docs). Default: not kept.
    fn attach_log(&self, _log: Arc<dyn LogSync>) {}

    /// The applier's state for a snapshot.
    fn snapshot(&self) -> Result<Vec<u8>, String>;

    /// Replaces this member's state with a snapshot's (`data` as
    /// [`Applier::snapshot`] made it on another member).
    fn install(&self, data: Vec<u8>) -> ApplierFuture<'_, ()>;
}

/// Syncs a group's log up to an index on demand (the store's
/// `LogSyncer`; see the module docs).
pub trait LogSync: Send + Sync + 'static {
    /// Returns once every entry the log holds up to `index` is on disk.
    /// **Blocks** the calling thread: call it from a thread that may block
    /// (a store's writer thread), never from an async task.
    fn sync_to(&self, index: u64) -> Result<(), StoreError>;
}
