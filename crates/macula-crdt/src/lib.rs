//! Conflict-free replicated data types for Macula. Pure: no I/O, no clock,
//! no randomness, no threads; time is an argument ([`Millis`]), as in every
//! core of the mesh.
//!
//! # The types
//! - [`LwwRegister`]: one value, last writer wins by [`Timestamp`].
//! - [`GCounter`] (grow-only) and [`PnCounter`] (up and down): one entry per
//!   node, keyed by [`NodeId`].
//! - [`OrSet`]: observed-remove set, add wins over a concurrent remove. The
//!   "optimised OR-set" of Bieniusa et al.: every add is tagged with a
//!   [`Dot`], the state keeps the dots of present elements and a causal
//!   context ([`DotSet`]) of every dot it has seen, so a removal is "I saw
//!   these dots and they are gone": no per-element tombstone.
//! - [`LwwElementSet`]: add/remove by timestamp per element; a removal is a
//!   tombstone (the element with its remove timestamp).
//! - [`LwwMap`]: a last-writer-wins register per key; a delete is a
//!   tombstone. `LwwElementSet<T>` is an `LwwMap<T, ()>`.
//!
//! # Delta-state replication (Almeida, Shoker, Baquero, 2018)
//! Every type is a join semilattice: [`Crdt::merge`] is the join, so it is
//! **commutative**, **associative** and **idempotent**, and replicas that
//! have merged the same updates, in any order, any number of times, hold
//! equal states. Every local operation (`add`, `insert`, `increment`, ...)
//! changes the state and returns a **delta**: a (small) value of the same
//! type whose merge into any replica applies the operation there. Deltas
//! can therefore be lost, duplicated and reordered; a replica that missed
//! some still converges by anti-entropy.
//!
//! # Anti-entropy
//! [`Crdt::digest`] summarises what a state has seen: the counters' own
//! entries, the register's timestamp, the dotted types' causal context (one
//! range of sequence numbers per node when caught up). A replica given a
//! peer's digest computes [`Crdt::delta_since`], the smallest delta it
//! knows that brings the peer up to date (`None` when the peer misses
//! nothing of it), and [`Crdt::lacks`] tells whether the peer knows
//! something it does not. [`Replica`] runs the exchange: it sends its
//! digest every [`ReplicaConfig::digest_interval`] to a few peers in turn
//! (to all while it knows none); a receiver answers with
//! the delta the sender lacks, and with its own digest when it lacks
//! something of the sender's.
//!
//! Every update of a dotted type, a removal included, takes a fresh dot, and
//! the digest is the set of updates a state holds in full (the LWW types'
//! causal context; the OR-set keeps that set beside its context, see
//! [`OrSet`]), so "my digest is within yours" means "you have every update
//! I have": the comparison is exact, not a hash that can only say
//! "differs". Deltas need no causal delivery.
//!
//! # Time
//! Last-writer-wins uses a hybrid logical clock ([`Hlc`]). Its wall reading
//! must be comparable across nodes (milliseconds since the Unix epoch, as
//! the runtime's epoch-based clock gives), unlike the per-node monotonic
//! readings other cores take. A remote timestamp more than
//! [`HlcConfig::max_drift`] ahead of the local wall is refused (the delta
//! is dropped and counted, and arrives again by anti-entropy once the local
//! clock has caught up), so one wrong clock cannot win every race.
//!
//! # Bounded metadata
//! **Limits.** [`OrSet`], [`LwwElementSet`], [`LwwMap`], [`GCounter`] and
//! [`PnCounter`] hold at most a configured number of entries (elements,
//! tombstones included, or counter nodes; [`DEFAULT_MAX_ENTRIES`] unless
//! set with `with_max_entries`). A local operation that would pass it fails
//! with [`CrdtError::LimitExceeded`] and changes nothing; a remote delta
//! that would pass it is refused ([`Crdt::try_merge`]) and counted by the
//! [`Replica`]. The limit is local configuration, never sent. Concurrent
//! adds under the limit on two replicas can together pass it: a replica
//! then refuses the other's delta and the two stay apart until entries are
//! removed: a hard limit trades convergence for bounded memory, so set it
//! well above the expected size and equal on every replica.
//!
//! **Tombstone GC rule.** Only the LWW set and map keep tombstones. A
//! tombstone may be dropped ([`Crdt::collect_garbage`]) when
//! 1. its timestamp's physical part is at least the **horizon** older than
//!    the local wall reading, and
//! 2. **every known replica has acknowledged it**: its dot is in the causal
//!    context of every replica's latest digest (the *stable* context, the
//!    intersection of those digests). [`Replica`] runs the rule on every
//!    tick when [`ReplicaConfig::gc_horizon`] is set and every member of
//!    [`ReplicaConfig::members`] has sent a digest; with no members given it
//!    never collects.
//!
//! A replica that has acknowledged a tombstone holds, for that key, the
//! tombstone or something newer, and a delta computed from its digest never
//! carries an entry the receiver has already seen, so collection cannot
//! bring the old value back through anti-entropy. **Caveat:** a replica
//! unknown to the member list, or an update delayed in the network for
//! longer than the horizon (a replica partitioned away that made, before
//! the partition, a write the others never saw), can resurrect a deleted
//! key or element after the tombstone is gone: choose the horizon well
//! above the longest partition to be survived (the default is one hour).
//! The OR-set needs no rule: removals leave only their dots in the causal
//! context, which stays one range per node once replicas are caught up.
//!
//! # Restarts
//! Dots count a node's updates from 1. A replica must restart from its
//! persisted state (or from a peer's full state) before it makes a local
//! update: an update made by an empty replica reuses a dot its peers have
//! seen, and they ignore it.
//!
//! # Wire
//! Every state, delta, digest and [`Message`] is `serde`; [`Message::encode`]
//! and [`Message::decode`] use MessagePack with named fields, the encoding of
//! `macula-wire`. Decoding never panics and makes dot sets canonical.

#![warn(missing_docs)]

mod counter;
mod dots;
mod hlc;
mod lww;
mod orset;
mod register;
mod replica;

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use counter::{GCounter, PnCounter, PnEntry};
pub use dots::{Dot, DotSet};
pub use hlc::{Hlc, HlcConfig, HlcError, Timestamp};
pub use lww::{LwwElementSet, LwwMap};
pub use macula_wire::time::Millis;
pub use macula_wire::NodeId;
pub use orset::OrSet;
pub use register::LwwRegister;
pub use replica::{CodecError, Message, Out, Replica, ReplicaConfig, ReplicaStats, Target};

/// Entries a bounded type holds unless configured otherwise.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// Why an operation or a merge was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    /// The operation or merge would make the state hold more than its limit.
    #[error("{what} limit reached: at most {limit}")]
    LimitExceeded {
        /// What is counted: "elements", "entries", "nodes".
        what: &'static str,
        /// The configured limit.
        limit: usize,
    },
    /// A counter would pass `u64::MAX`.
    #[error("counter overflow")]
    Overflow,
}

/// A delta-state CRDT: a join semilattice whose deltas are values of the
/// type itself.
///
/// Laws, for all valid states `a`, `b`, `c` (states built by operations and
/// merges), checked by the property tests:
/// - `merge` is commutative, associative and idempotent;
/// - `b.merge(&a.delta_since(&b.digest()).unwrap_or_default())` gives the
///   same state as `b.merge(&a)`, and `delta_since` is `None` exactly when
///   merging `a` leaves `b` unchanged;
/// - `b.lacks(&a.digest())` is true exactly when merging `a` changes `b`.
pub trait Crdt: Clone + Default + PartialEq + fmt::Debug + Serialize + DeserializeOwned {
    /// What a replica tells its peers of what it has seen.
    type Digest: Clone + PartialEq + fmt::Debug + Serialize + DeserializeOwned;

    /// Joins `other` (a state or a delta) into `self`.
    fn merge(&mut self, other: &Self);

    /// This state's digest.
    fn digest(&self) -> Self::Digest;

    /// A delta that brings a replica whose digest is `theirs` up to date
    /// with `self`; `None` when it misses nothing of `self`. Meant for that
    /// replica only: merged into another it may claim more than it brings
    /// (the OR-set's applied set, see [`OrSet`]).
    fn delta_since(&self, theirs: &Self::Digest) -> Option<Self>;

    /// Whether the replica whose digest is `theirs` has seen something
    /// `self` has not.
    fn lacks(&self, theirs: &Self::Digest) -> bool;

    /// Entries held, as the limits count them.
    fn size(&self) -> usize;

    /// The configured limit on [`Crdt::size`] (local, never sent).
    fn max_size(&self) -> usize {
        usize::MAX
    }

    /// The largest timestamp in this state, for the receiver's clock to
    /// observe (types without timestamps: `None`).
    fn latest(&self) -> Option<Timestamp> {
        None
    }

    /// Drops tombstones under the GC rule of the crate docs: older than
    /// `horizon` at wall reading `now`, and in the causal context of every
    /// digest of `acked` (every known replica's, this one's included).
    /// Returns how many were dropped. Types without tombstones: 0.
    fn collect_garbage(&mut self, now: Millis, horizon: Millis, acked: &[&Self::Digest]) -> usize {
        let _ = (now, horizon, acked);
        0
    }

    /// [`Crdt::merge`], unless the result would hold more than
    /// [`Crdt::max_size`] entries: then `self` is unchanged.
    fn try_merge(&mut self, other: &Self) -> Result<(), CrdtError> {
        let limit = self.max_size();
        if self.size().saturating_add(other.size()) <= limit {
            self.merge(other);
            return Ok(());
        }
        let mut joined = self.clone();
        joined.merge(other);
        if joined.size() > limit {
            return Err(CrdtError::LimitExceeded {
                what: "entries",
                limit,
            });
        }
        *self = joined;
        Ok(())
    }
}

/// A limit kept in a state but not part of its value: never serialised,
/// ignored by equality (two replicas with different limits hold equal
/// states when they have seen the same updates).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cap(pub(crate) usize);

impl Default for Cap {
    fn default() -> Cap {
        Cap(DEFAULT_MAX_ENTRIES)
    }
}

impl PartialEq for Cap {
    fn eq(&self, _: &Cap) -> bool {
        true
    }
}

impl Eq for Cap {}
