//! Conflict-free replicated data types, replicated across the nodes of a
//! realm that open them by name.
//!
//! ```no_run
//! # async fn demo(node: macula::Node) -> Result<(), macula::Error> {
//! use futures::StreamExt;
//! use macula::crdt::{ChangeItem, OrSet, PnCounter};
//!
//! let cart = node.crdt::<OrSet<String>>("cart").await?;
//! cart.add("apples".to_string())?;             // typed helper
//! cart.update(|set, ts| set.add(ts.node, "pears".to_string()))?; // any operation
//! assert!(cart.read(|set| set.contains(&"apples".to_string())));
//!
//! let stock = node.crdt::<PnCounter>("stock").await?;
//! stock.increment(10)?;
//! stock.decrement(3)?;
//! println!("stock {}", stock.read(|c| c.value()));
//!
//! let mut changes = cart.changes();
//! while let Some(item) = changes.next().await {
//!     match item {
//!         ChangeItem::Changed(c) => println!("cart is at version {} ({:?})", c.version, c.origin),
//!         ChangeItem::Lagged(n) => println!("{n} notifications missed; read the state again"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # The types
//! Any [`CrdtType`] of `macula-crdt` (its crate docs state every type's
//! semantics and laws): [`LwwRegister`] (last writer wins by [`Timestamp`],
//! a hybrid logical clock with a node-ID tie break), [`GCounter`],
//! [`PnCounter`], [`OrSet`] (add wins), [`LwwElementSet`] and [`LwwMap`].
//! One name is one CRDT of one type in the whole realm: open it with the
//! same `T` on every node (a message of another type does not decode and is
//! counted in [`CrdtStats::decode_errors`]; on one node, opening a name
//! that is open as another type fails with [`CrdtError::TypeMismatch`]).
//! Opening a name that is already open on the node returns another handle
//! to the same replica. The replica stops when its last handle is dropped
//! or its node shuts down.
//!
//! # Guarantees
//! **Strong eventual consistency**: two replicas that have received the
//! same updates, in any order, any number of times, hold equal states (the
//! merge of every type is a join: commutative, associative, idempotent),
//! and every update made on a replica that keeps running reaches every
//! other running replica of the name. Local operations never wait for the
//! network: [`Crdt::update`] applies at once and returns.
//!
//! **Convergence bound.** An update is published as a delta at once and
//! reaches the replicas the publisher knows to be subscribed in about one
//! network delay. What a delta misses (a replica that subscribed within
//! the last second, the interest cache of pub/sub; a loss; a replica that
//! was down) is repaired by **anti-entropy**: every replica sends its
//! digest every [`CrdtOptions::digest_interval`] (1 s) to
//! [`CrdtOptions::digest_fanout`] (3) peers in turn, and a receiver
//! answers with exactly the delta the sender lacks, and with its own digest
//! when the sender knows something it does not. A replica lacking an
//! update is therefore repaired within about `peers / fanout` digest
//! intervals of the update reaching any replica that sends it a digest,
//! and usually within one interval (every replica that holds the update
//! also answers its digests). A replica that opens (or reopens after a
//! restart) broadcasts its digest at once and is answered by every replica
//! that holds something it lacks. A subscription that reports lost events
//! (`Lagged`, counted in [`CrdtStats::lagged`]) makes the replica broadcast
//! its digest at once, so a loss costs one exchange, not one interval.
//!
//! **Tombstones.** Only [`LwwElementSet`] and [`LwwMap`] keep them (a
//! delete is a tombstone); the OR-set and the counters need none. A
//! tombstone is collected when it is older than
//! [`CrdtOptions::gc_horizon`] (1 h) **and** every replica listed in
//! [`CrdtOptions::members`] has acknowledged it in a digest. With no
//! members listed (the default, since replicas come and go) tombstones are
//! never collected and count toward the entry limit (`DEFAULT_MAX_ENTRIES`,
//! 100,000 entries per state). An update delayed for longer than the
//! horizon, or a replica not in the member list, can bring a collected key
//! back: choose the horizon above the longest partition to be survived.
//!
//! # Wire
//! Replication rides the public pub/sub API (docs/PROTOCOL.md §5.9); every
//! payload is one [`Message`] of `macula-crdt`, MessagePack with field
//! names:
//! - `_crdt.<name>.delta`: `Delta` messages, local updates, to every
//!   replica;
//! - `_crdt.<name>.digest`: `Digest` messages broadcast (a replica's first
//!   digest, and after a loss);
//! - `_crdt.<name>.to.<node-id>`: point-to-point messages for the replica
//!   on that node: periodic digests of the fanout and the answers to a
//!   digest (`Delta` computed from it, `State` when it was empty, the
//!   answering digest).
//!
//! Answers are per-node **topics**, not RPC calls: they are one-way like
//! every other message of the protocol (a lost one is repaired by the
//! next exchange, so nothing waits for a reply), they cost no
//! advertisement per replica (an RPC procedure would put one DHT record
//! per replica and list it in `macula services`), and every `_crdt.*`
//! topic shares one pub/sub rendezvous name (`_crdt`), so the interest a
//! publisher has looked up once for the deltas also routes every answer.
//! A delta computed from one replica's digest is sent to that replica only
//! (merged elsewhere it could claim more than it brings).
//!
//! # Restarts and persistence
//! Updates are numbered per node (the dots of the dotted types, each
//! node's own entry of the counters); an empty replica would number its
//! updates from 1 again and every peer would ignore them as already seen.
//! A replica therefore restarts from its own last state:
//! - On a node with a data directory (the daemon always has one) the state
//!   is kept in `<data_dir>/crdt/<name>.state` and loaded on open. The file
//!   is written (to a temporary file, fsynced, renamed) **before** any
//!   message that may carry a local update is sent, so every update a peer
//!   may have seen is on disk: after a crash, even kill -9, the replica
//!   resumes above every number it has used. Updates learned from peers
//!   are saved at most once per digest interval (losing them costs only an
//!   anti-entropy exchange). An unwritable file stops sending (counted in
//!   [`CrdtStats::save_errors`]) rather than send an update that could be
//!   forgotten.
//! - On a node without a data directory the identity is new on every
//!   start, so a new process is a new replica and numbers from 1 safely;
//!   within one process, a name reopened on the same node resumes from
//!   the state its last replica left in memory.
//!
//! A counter or dot that grew from the node's epoch instead would only fix
//! the dotted types (a counter's own entry must continue from its last
//! value, not jump), and the state is needed anyway to answer digests, so
//! the state file is the one mechanism. Deleting `<data_dir>/crdt` while
//! keeping `node.key` makes the next updates of that node invisible to
//! peers that saw the old ones: delete both or neither.
//!
//! # Limits
//! Every bound has a default in [`CrdtOptions`] and an error:
//! - [`CrdtOptions::max_crdts`] replicas per node ([`CrdtError::TooManyCrdts`]);
//! - a whole state must fit one pub/sub payload, less
//!   [`ENVELOPE_HEADROOM`] (about 959 KiB with the default 1 MiB frames),
//!   so that it can be sent to a new replica: a local update that would make
//!   the encoded state larger fails with [`CrdtError::StateTooLarge`] and
//!   changes nothing. States are not chunked. (Updates made concurrently on
//!   several nodes can together pass it; then a new replica cannot be sent
//!   the whole state, counted in [`CrdtStats::oversized`], and receives
//!   what deltas it can.) Checking costs a copy of the state per update.
//! - entries per state (`DEFAULT_MAX_ENTRIES`): [`CrdtError::Op`];
//! - [`CrdtOptions::send_queue`] messages waiting to be published; past it
//!   a message is dropped ([`CrdtStats::send_dropped`]) and the next digest
//!   exchange repairs it; publishing never blocks on a slow peer (the
//!   overflow policy is `DropNewest`, and the peer is told of the loss);
//! - [`CrdtOptions::changes_capacity`] notifications per change stream:
//!   a slow reader gets [`ChangeItem::Lagged`];
//! - the outgoing delta group ([`CrdtOptions::max_pending`] entries), which
//!   overflows into a digest broadcast;
//! - names: [`validate_name`] ([`CrdtError::BadName`]).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};
use macula_crdt::{Out, Replica, ReplicaConfig, Target};
use macula_runtime::config::IdentitySource;
use macula_runtime::metrics::Metrics;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch, Notify};

pub use macula_crdt::{
    Crdt as CrdtType, CrdtError as OpError, Dot, DotSet, GCounter, LwwElementSet, LwwMap,
    LwwRegister, Message, Millis, OrSet, PnCounter, PnEntry, ReplicaStats, Timestamp,
    DEFAULT_MAX_ENTRIES,
};

use crate::{Error, Node, NodeId, Overflow, PublishOptions, Subscription, SubscriptionItem};

/// First segment of every CRDT topic.
pub const TOPIC_PREFIX: &str = "_crdt";
/// Longest CRDT name, bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Default most CRDT replicas one node runs at once.
pub const DEFAULT_MAX_CRDTS: usize = 64;
/// Default notifications a change stream holds before its reader lags.
pub const DEFAULT_CHANGES_CAPACITY: usize = 1024;
/// Default messages waiting to be published, per CRDT.
pub const DEFAULT_SEND_QUEUE: usize = 256;
/// Default digest interval.
pub const DEFAULT_DIGEST_INTERVAL: Duration = Duration::from_secs(1);
/// Default peers each periodic digest goes to.
pub const DEFAULT_DIGEST_FANOUT: usize = 3;
/// Bytes of a pub/sub payload kept for a message's envelope (its kind, the
/// name, the sender) when a state's size is checked against it.
pub const ENVELOPE_HEADROOM: usize = 1024;
/// Directory of the state files in a node's data directory.
pub const STATE_DIR: &str = "crdt";
/// How long an open waits for the previous replica of the name (closing,
/// or of a node that was shut down on the same data directory) to save
/// its last state.
pub const PREVIOUS_WAIT: Duration = Duration::from_secs(10);
/// How often a replica checks whether its node is shutting down.
const SHUTDOWN_POLL: Duration = Duration::from_millis(250);
/// Version of the state file's format.
const STATE_FORMAT: u32 = 1;

/// Checks a CRDT name: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters,
/// digits, `_` and `-` (one topic segment, and a file name).
pub fn validate_name(name: &str) -> Result<(), CrdtError> {
    let bad = |reason| {
        Err(CrdtError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return bad("only ASCII letters, digits, '_' and '-' are allowed");
    }
    Ok(())
}

/// The topic of `name`'s deltas.
pub fn delta_topic(name: &str) -> String {
    format!("{TOPIC_PREFIX}.{name}.delta")
}

/// The topic of `name`'s broadcast digests.
pub fn digest_topic(name: &str) -> String {
    format!("{TOPIC_PREFIX}.{name}.digest")
}

/// The topic of messages for `name`'s replica on `node`.
pub fn node_topic(name: &str, node: NodeId) -> String {
    format!("{TOPIC_PREFIX}.{name}.to.{node}")
}

/// Why a CRDT could not be opened or updated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrdtError {
    /// The name is not a valid CRDT name ([`validate_name`]).
    #[error("invalid CRDT name {name:?}: {reason}")]
    BadName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The node already runs [`CrdtOptions::max_crdts`] replicas.
    #[error("this node already runs {max} CRDTs (CrdtOptions::max_crdts)")]
    TooManyCrdts {
        /// The limit.
        max: usize,
    },
    /// The name is open on this node as another type.
    #[error("CRDT {name:?} is open on this node as {open}")]
    TypeMismatch {
        /// The name.
        name: String,
        /// The type it is open as.
        open: &'static str,
    },
    /// The update would make the encoded state larger than one pub/sub
    /// payload can carry (states are not chunked); nothing changed.
    #[error("CRDT {name:?}: the update would make the state {len} bytes, over the limit of {max} (a whole state must fit one pub/sub payload)")]
    StateTooLarge {
        /// The name.
        name: String,
        /// The state's encoded size with the update.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The operation refused (an entry limit, a counter overflow); nothing
    /// changed.
    #[error("CRDT {name:?}: {source}")]
    Op {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: OpError,
    },
    /// The state file could not be read, decoded or written.
    #[error("CRDT {name:?}: cannot {what} {}: {reason}", .path.display())]
    Store {
        /// The name.
        name: String,
        /// The state file.
        path: PathBuf,
        /// `read`, `decode` or `write`.
        what: &'static str,
        /// The cause.
        reason: String,
    },
    /// The replica stopped (its node shut down); open it again on a
    /// running node.
    #[error("CRDT {name:?} is stopped (its node shut down)")]
    Stopped {
        /// The name.
        name: String,
    },
    /// The previous replica of the name did not finish saving its state
    /// within [`PREVIOUS_WAIT`].
    #[error("CRDT {name:?}: the previous replica did not save its state within {waited:?}")]
    Busy {
        /// The name.
        name: String,
        /// How long the open waited.
        waited: Duration,
    },
}

impl CrdtError {
    /// A short stable name: `crdt.bad_name`, `crdt.too_many`,
    /// `crdt.type_mismatch`, `crdt.state_too_large`, `crdt.op`,
    /// `crdt.store`, `crdt.stopped`, `crdt.busy`.
    pub fn kind(&self) -> &'static str {
        match self {
            CrdtError::BadName { .. } => "crdt.bad_name",
            CrdtError::TooManyCrdts { .. } => "crdt.too_many",
            CrdtError::TypeMismatch { .. } => "crdt.type_mismatch",
            CrdtError::StateTooLarge { .. } => "crdt.state_too_large",
            CrdtError::Op { .. } => "crdt.op",
            CrdtError::Store { .. } => "crdt.store",
            CrdtError::Stopped { .. } => "crdt.stopped",
            CrdtError::Busy { .. } => "crdt.busy",
        }
    }
}

/// Settings of one replica ([`open`]); [`Node::crdt`] uses the defaults.
/// Override single fields with struct update syntax.
#[derive(Clone, Debug)]
pub struct CrdtOptions {
    /// How often the replica sends its digest (default 1 s).
    pub digest_interval: Duration,
    /// Peers each periodic digest goes to, in turn (default 3); `None`
    /// broadcasts it (every replica answers every other: quadratic).
    pub digest_fanout: Option<usize>,
    /// Entries the outgoing delta group holds before it overflows into a
    /// digest broadcast (default 1,024).
    pub max_pending: usize,
    /// How far ahead of the local clock a remote timestamp may be (default
    /// 5 s); further ahead, the update waits (see the hybrid logical clock
    /// of `macula-crdt`).
    pub max_drift: Duration,
    /// Every replica of the name, for tombstone collection (default none:
    /// never collect).
    pub members: Vec<NodeId>,
    /// Age past which a tombstone every member acknowledged is collected
    /// (default 1 h).
    pub gc_horizon: Duration,
    /// Largest encoded state, bytes; `None` (the default) and any larger
    /// value mean the node's pub/sub payload limit less
    /// [`ENVELOPE_HEADROOM`].
    pub max_state_bytes: Option<usize>,
    /// Notifications a change stream holds (default
    /// [`DEFAULT_CHANGES_CAPACITY`]).
    pub changes_capacity: usize,
    /// Messages waiting to be published (default [`DEFAULT_SEND_QUEUE`]).
    pub send_queue: usize,
    /// Replicas this node may run at once, this one included (default
    /// [`DEFAULT_MAX_CRDTS`]).
    pub max_crdts: usize,
    /// Keep the state in the node's data directory, when it has one
    /// (default `true`). Without it a restarted node's updates are ignored
    /// by peers that saw its earlier ones (see the module docs): turn it off
    /// only for a name whose replicas never outlive their process's
    /// identity.
    pub persist: bool,
}

impl Default for CrdtOptions {
    fn default() -> CrdtOptions {
        let r = ReplicaConfig::default();
        CrdtOptions {
            digest_interval: DEFAULT_DIGEST_INTERVAL,
            digest_fanout: Some(DEFAULT_DIGEST_FANOUT),
            max_pending: r.max_pending,
            max_drift: r.hlc.max_drift.to_duration(),
            members: Vec::new(),
            gc_horizon: r
                .gc_horizon
                .unwrap_or(Millis::from_secs(3600))
                .to_duration(),
            max_state_bytes: None,
            changes_capacity: DEFAULT_CHANGES_CAPACITY,
            send_queue: DEFAULT_SEND_QUEUE,
            max_crdts: DEFAULT_MAX_CRDTS,
            persist: true,
        }
    }
}

/// A CRDT type the mesh can replicate: every [`CrdtType`] whose state and
/// digest can move between threads.
pub trait Replicated: CrdtType<Digest: Send + Sync> + Send + Sync + 'static {}

impl<T> Replicated for T where T: CrdtType<Digest: Send + Sync> + Send + Sync + 'static {}

/// Where a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A local update, through any handle of this node.
    Local,
    /// A delta or state from that node.
    Remote(NodeId),
}

/// One change of the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The replica's version after it: grows by one with every change.
    pub version: u64,
    /// Who made it.
    pub origin: Origin,
}

/// An item of a change stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeItem {
    /// The state changed.
    Changed(Change),
    /// This many notifications were dropped because the reader was slow
    /// (the state itself lost nothing: read it again).
    Lagged(u64),
}

/// The changes of one replica ([`Crdt::changes`]): a `Stream` of
/// [`ChangeItem`]s that ends when the replica stops.
pub struct Changes {
    inner: BoxStream<'static, ChangeItem>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes").finish_non_exhaustive()
    }
}

impl Stream for Changes {
    type Item = ChangeItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ChangeItem>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// What a replica has done, read now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CrdtStats {
    /// The protocol's counters (updates, merges, messages sent, refusals).
    pub replica: ReplicaStats,
    /// The replica's version (see [`Change::version`]).
    pub version: u64,
    /// Events its subscriptions reported lost (`Lagged`).
    pub lagged: u64,
    /// Digests broadcast outside the schedule: at open, after a loss, after
    /// a dropped message.
    pub extra_digests: u64,
    /// Received payloads that were not a message of this type, or whose
    /// sender was not their publisher.
    pub decode_errors: u64,
    /// Messages dropped because the send queue was full.
    pub send_dropped: u64,
    /// Messages not sent because they exceeded the pub/sub payload limit.
    pub oversized: u64,
    /// Publishes that failed.
    pub publish_errors: u64,
    /// State files written.
    pub saves: u64,
    /// State files that could not be written.
    pub save_errors: u64,
}

#[derive(Default)]
struct Counters {
    lagged: AtomicU64,
    extra_digests: AtomicU64,
    decode_errors: AtomicU64,
    send_dropped: AtomicU64,
    oversized: AtomicU64,
    publish_errors: AtomicU64,
    saves: AtomicU64,
    save_errors: AtomicU64,
}

/// A replica's state, shared by its handles and its task.
struct Shared<T: Replicated> {
    name: String,
    /// This node's ID.
    id: NodeId,
    /// The node, to publish and to look subscribers up.
    mesh: Node,
    inner: Mutex<Inner<T>>,
    /// A local update: the task has something to send.
    wake: Notify,
    /// Set (and `wake` notified) when the last handle is dropped.
    closing: AtomicBool,
    /// Test hook (`Crdt::pause`): the task waits here, without blocking a
    /// runtime thread, between two rounds.
    pause: Arc<tokio::sync::Mutex<()>>,
    max_state_bytes: usize,
    counters: Counters,
}

struct Inner<T: Replicated> {
    replica: Replica<T>,
    /// The task ended: updates are refused.
    stopped: bool,
    /// Local updates not yet in the state file.
    own_dirty: bool,
    /// Changes (local or remote) not yet in the state file.
    dirty: bool,
    /// An upper bound of the encoded state's size; `None` when unknown.
    state_bytes: Option<usize>,
    /// `None` once the replica stopped (the streams end).
    changes: Option<broadcast::Sender<Change>>,
}

impl<T: Replicated> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock()
    }
}

impl<T: Replicated> Inner<T> {
    fn notify(&self, origin: Origin) {
        if let Some(tx) = &self.changes {
            let _ = tx.send(Change {
                version: self.replica.version(),
                origin,
            });
        }
    }
}

/// Stops the replica's task when the last handle goes.
struct HandleCore<T: Replicated> {
    shared: Arc<Shared<T>>,
}

impl<T: Replicated> Drop for HandleCore<T> {
    fn drop(&mut self) {
        self.shared.closing.store(true, Relaxed);
        self.shared.wake.notify_one();
    }
}

/// A handle to the replica of one named CRDT on one node. Cheap to clone:
/// clones share the replica, which stops when the last is dropped.
pub struct Crdt<T: Replicated> {
    core: Arc<HandleCore<T>>,
}

impl<T: Replicated> Clone for Crdt<T> {
    fn clone(&self) -> Self {
        Crdt {
            core: self.core.clone(),
        }
    }
}

impl<T: Replicated> std::fmt::Debug for Crdt<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crdt")
            .field("name", &self.shared().name)
            .field("type", &std::any::type_name::<T>())
            .field("version", &self.version())
            .finish()
    }
}

impl<T: Replicated> Crdt<T> {
    fn shared(&self) -> &Shared<T> {
        &self.core.shared
    }

    /// The CRDT's name.
    pub fn name(&self) -> &str {
        &self.shared().name
    }

    /// Test hook: the replica's task stops taking messages (its
    /// subscriptions fill up and lose the oldest, as a slow replica's do)
    /// until the guard is dropped.
    #[doc(hidden)]
    pub async fn pause(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.shared().pause.clone().lock_owned().await
    }

    /// This replica's node: the `node` of the timestamps its updates get.
    pub fn node_id(&self) -> NodeId {
        self.shared().id
    }

    /// A local update: `op` gets the state and a fresh timestamp (whose
    /// `node` is this node), changes the state and returns the delta, which
    /// is what every operation of the CRDT types does:
    /// `crdt.update(|set, ts| set.add(ts.node, x))`. Applied at once and
    /// replicated in the background. Fails, changing nothing, when the
    /// operation refuses ([`CrdtError::Op`]), when the state would pass
    /// its size limit ([`CrdtError::StateTooLarge`]) or when the replica
    /// stopped.
    pub fn update<F>(&self, op: F) -> Result<(), Error>
    where
        F: FnOnce(&mut T, Timestamp) -> Result<T, OpError>,
    {
        let shared = self.shared();
        let now = wall();
        let mut g = shared.lock();
        if g.stopped {
            return Err(stopped(&shared.name));
        }
        let max = shared.max_state_bytes;
        let known = match g.state_bytes {
            Some(n) => n,
            None => encoded_len(g.replica.state()),
        };
        let mut too_large = None;
        let mut new_size = known;
        let before = g.replica.version();
        let r = g.replica.update(now, |state, ts| {
            let backup = state.clone();
            let delta = op(state, ts)?;
            // msgpack map and array headers grow by at most 4 bytes each
            // time a count passes 15, 65,535: a generous slack per update.
            let bound = known.saturating_add(encoded_len(&delta)).saturating_add(64);
            new_size = if bound <= max {
                bound
            } else {
                encoded_len(state)
            };
            if new_size > max {
                *state = backup;
                too_large = Some(new_size);
                return Err(OpError::LimitExceeded {
                    what: "bytes",
                    limit: max,
                });
            }
            Ok(delta)
        });
        match (r, too_large) {
            (_, Some(len)) => {
                g.state_bytes = Some(known);
                Err(CrdtError::StateTooLarge {
                    name: shared.name.clone(),
                    len,
                    max,
                }
                .into())
            }
            (Err(source), None) => {
                g.state_bytes = Some(known);
                Err(CrdtError::Op {
                    name: shared.name.clone(),
                    source,
                }
                .into())
            }
            (Ok(()), None) => {
                g.state_bytes = Some(new_size);
                if g.replica.version() != before {
                    g.own_dirty = true;
                    g.dirty = true;
                    g.notify(Origin::Local);
                    drop(g);
                    shared.wake.notify_one();
                }
                Ok(())
            }
        }
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(self.shared().lock().replica.state())
    }

    /// A copy of the state.
    pub fn value(&self) -> T {
        self.read(T::clone)
    }

    /// The replica's version: grows by one with every change of the state,
    /// local or remote.
    pub fn version(&self) -> u64 {
        self.shared().lock().replica.version()
    }

    /// A stream of the changes from now on (bounded: a slow reader gets
    /// [`ChangeItem::Lagged`]); it ends when the replica stops.
    pub fn changes(&self) -> Changes {
        let rx = self
            .shared()
            .lock()
            .changes
            .as_ref()
            .map(|tx| tx.subscribe());
        let Some(rx) = rx else {
            return Changes {
                inner: futures::stream::empty().boxed(),
            };
        };
        let inner = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(c) => Some((ChangeItem::Changed(c), rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((ChangeItem::Lagged(n), rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .boxed();
        Changes { inner }
    }

    /// Counters of this replica, read now.
    pub fn stats(&self) -> CrdtStats {
        let s = self.shared();
        let (replica, version) = {
            let g = s.lock();
            (g.replica.stats(), g.replica.version())
        };
        let c = &s.counters;
        CrdtStats {
            replica,
            version,
            lagged: c.lagged.load(Relaxed),
            extra_digests: c.extra_digests.load(Relaxed),
            decode_errors: c.decode_errors.load(Relaxed),
            send_dropped: c.send_dropped.load(Relaxed),
            oversized: c.oversized.load(Relaxed),
            publish_errors: c.publish_errors.load(Relaxed),
            saves: c.saves.load(Relaxed),
            save_errors: c.save_errors.load(Relaxed),
        }
    }

    /// Waits, at most `timeout`, until `n` nodes (this one included) run a
    /// replica of this name as far as this node's pub/sub knows; returns
    /// how many do. Updates made before that still reach late replicas,
    /// by anti-entropy.
    pub async fn wait_for_replicas(&self, n: usize, timeout: Duration) -> Result<usize, Error> {
        if self.shared().lock().stopped {
            return Err(stopped(&self.shared().name));
        }
        let node = &self.shared().mesh;
        let topic = delta_topic(self.name());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let seen = node
                .wait_for_subscribers(&topic, left.min(Duration::from_millis(500)))
                .await?;
            if seen >= n || left.is_zero() {
                return Ok(seen);
            }
            tokio::time::sleep(Duration::from_millis(50).min(left)).await;
        }
    }
}

impl<E> Crdt<OrSet<E>>
where
    OrSet<E>: Replicated,
    E: Ord + Clone,
{
    /// Adds `elem` (add wins over a concurrent remove).
    pub fn add(&self, elem: E) -> Result<(), Error> {
        self.update(|s, ts| s.add(ts.node, elem))
    }

    /// Removes `elem` as this replica has seen it.
    pub fn remove(&self, elem: &E) -> Result<(), Error> {
        self.update(|s, ts| Ok(s.remove(ts.node, elem)))
    }

    /// Removes every element this replica has seen.
    pub fn clear(&self) -> Result<(), Error> {
        self.update(|s, ts| Ok(s.clear(ts.node)))
    }

    /// Whether `elem` is present.
    pub fn contains(&self, elem: &E) -> bool {
        self.read(|s| s.contains(elem))
    }
}

impl<E> Crdt<LwwElementSet<E>>
where
    LwwElementSet<E>: Replicated,
    E: Ord + Clone,
{
    /// Adds `elem` (the latest of add and remove wins).
    pub fn add(&self, elem: E) -> Result<(), Error> {
        self.update(|s, ts| s.add(ts, elem))
    }

    /// Removes `elem`, leaving a tombstone.
    pub fn remove(&self, elem: &E) -> Result<(), Error> {
        self.update(|s, ts| Ok(s.remove(ts, elem)))
    }

    /// Whether `elem` is present.
    pub fn contains(&self, elem: &E) -> bool {
        self.read(|s| s.contains(elem))
    }
}

impl<K, V> Crdt<LwwMap<K, V>>
where
    LwwMap<K, V>: Replicated,
    K: Ord + Clone,
    V: Clone,
{
    /// Writes `value` under `key` (the latest write wins).
    pub fn insert(&self, key: K, value: V) -> Result<(), Error> {
        self.update(|s, ts| s.insert(ts, key, value))
    }

    /// Deletes `key`, leaving a tombstone.
    pub fn remove(&self, key: &K) -> Result<(), Error> {
        self.update(|s, ts| Ok(s.remove(ts, key)))
    }

    /// The value under `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        self.read(|s| s.get(key).cloned())
    }
}

impl<V> Crdt<LwwRegister<V>>
where
    LwwRegister<V>: Replicated,
    V: Clone,
{
    /// Writes `value` (the latest write wins).
    pub fn set(&self, value: V) -> Result<(), Error> {
        self.update(|s, ts| Ok(s.set(ts, value)))
    }

    /// The current value.
    pub fn get(&self) -> Option<V> {
        self.read(|s| s.get().cloned())
    }
}

impl Crdt<GCounter> {
    /// Adds `by`.
    pub fn increment(&self, by: u64) -> Result<(), Error> {
        self.update(|s, ts| s.increment(ts.node, by))
    }
}

impl Crdt<PnCounter> {
    /// Adds `by`.
    pub fn increment(&self, by: u64) -> Result<(), Error> {
        self.update(|s, ts| s.increment(ts.node, by))
    }

    /// Subtracts `by`.
    pub fn decrement(&self, by: u64) -> Result<(), Error> {
        self.update(|s, ts| s.decrement(ts.node, by))
    }
}

// ---------------------------------------------------------------------
// The registry: which replicas run where, and the state left by stopped
// ones on nodes without a data directory.

/// Whose replicas a registry entry is: a data directory (shared by the
/// successive runs of a node on it) or one node instance (no directory).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Owner {
    Dir(PathBuf),
    Instance(usize),
}

struct Slot {
    type_id: TypeId,
    type_name: &'static str,
    /// The node instance that runs (or ran) it: its metrics' address.
    instance: usize,
    /// Keeps the instance's address from being reused while the slot lives.
    alive: Weak<Metrics>,
    /// The replica's handles (a `HandleCore<T>`); dead once all dropped.
    live: Weak<dyn Any + Send + Sync>,
    /// Changed when the replica has started; closed when its task has
    /// ended and saved its last state.
    done: watch::Receiver<()>,
    /// The last state of a stopped replica of an instance without a data
    /// directory.
    saved: Option<Vec<u8>>,
}

type Registry = HashMap<(Owner, String), Slot>;

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn lock_registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock()
}

fn is_done(rx: &watch::Receiver<()>) -> bool {
    rx.has_changed().is_err()
}

/// Where a replica keeps its state between runs.
#[derive(Clone, Debug)]
enum Store {
    /// The state file in the data directory.
    File(PathBuf),
    /// The registry's slot (a node without a data directory).
    Memory,
}

/// What the state file holds.
#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "T: Replicated", deserialize = "T: Replicated"))]
struct Saved<T: Replicated> {
    format: u32,
    node: NodeId,
    state: T,
}

/// Opens the replica of `name` on `node` with `options` (see
/// [`Node::crdt`], which uses the defaults).
pub async fn open<T: Replicated>(
    node: &Node,
    name: &str,
    options: CrdtOptions,
) -> Result<Crdt<T>, Error> {
    validate_name(name)?;
    let metrics = node.metrics();
    let instance = Arc::as_ptr(metrics) as usize;
    let dir = match (&node.config().identity, options.persist) {
        (IdentitySource::DataDir(d), true) => Some(d.clone()),
        _ => None,
    };
    let owner = match &dir {
        Some(d) => Owner::Dir(d.clone()),
        None => Owner::Instance(instance),
    };
    let key = (owner.clone(), name.to_string());
    let deadline = tokio::time::Instant::now() + PREVIOUS_WAIT;
    // Claim the name, share its running replica, or wait for the previous
    // one to finish.
    let (done_tx, saved) = loop {
        let mut wait = {
            let mut reg = lock_registry();
            reg.retain(|_, s| !is_done(&s.done) || s.alive.strong_count() > 0);
            match reg.get(&key) {
                Some(slot) if !is_done(&slot.done) => {
                    if slot.instance == instance && slot.type_id != TypeId::of::<T>() {
                        return Err(CrdtError::TypeMismatch {
                            name: name.to_string(),
                            open: slot.type_name,
                        }
                        .into());
                    }
                    let shared = (slot.instance == instance)
                        .then(|| slot.live.upgrade())
                        .flatten()
                        .and_then(|a| a.downcast::<HandleCore<T>>().ok());
                    if let Some(core) = shared {
                        return Ok(Crdt { core });
                    }
                    let mut rx = slot.done.clone();
                    rx.borrow_and_update();
                    rx
                }
                _ => {
                    let live = reg
                        .values()
                        .filter(|s| s.instance == instance && !is_done(&s.done))
                        .count();
                    if live >= options.max_crdts {
                        return Err(CrdtError::TooManyCrdts {
                            max: options.max_crdts,
                        }
                        .into());
                    }
                    // Kept in the slot until the new replica stops, so an
                    // open that fails or is cancelled loses nothing.
                    let saved = reg.remove(&key).and_then(|s| s.saved);
                    let (tx, rx) = watch::channel(());
                    reg.insert(
                        key.clone(),
                        Slot {
                            type_id: TypeId::of::<T>(),
                            type_name: std::any::type_name::<T>(),
                            instance,
                            alive: Arc::downgrade(metrics),
                            live: Weak::<HandleCore<T>>::new(),
                            done: rx,
                            saved: saved.clone(),
                        },
                    );
                    break (tx, saved);
                }
            }
        };
        if tokio::time::timeout_at(deadline, wait.changed())
            .await
            .is_err()
        {
            return Err(CrdtError::Busy {
                name: name.to_string(),
                waited: PREVIOUS_WAIT,
            }
            .into());
        }
    };
    let store = match &dir {
        Some(d) => Store::File(d.join(STATE_DIR).join(format!("{name}.state"))),
        None => Store::Memory,
    };
    start::<T>(node, &key, &options, store, saved.as_deref(), done_tx).await
}

async fn start<T: Replicated>(
    node: &Node,
    key: &(Owner, String),
    options: &CrdtOptions,
    store: Store,
    saved: Option<&[u8]>,
    done: watch::Sender<()>,
) -> Result<Crdt<T>, Error> {
    let name = key.1.as_str();
    let me = node.id();
    let state: T = match &store {
        Store::File(path) => load(name, path, me).await?.unwrap_or_default(),
        Store::Memory => match saved {
            Some(bytes) => decode_saved(name, Path::new("(memory)"), bytes, me)?,
            None => T::default(),
        },
    };
    let all = node.subscribe(&format!("{TOPIC_PREFIX}.{name}.*")).await?;
    let mine = node.subscribe(&node_topic(name, me)).await?;
    let payload_max = node.runtime().pubsub().max_payload();
    let state_max = payload_max.saturating_sub(ENVELOPE_HEADROOM);
    let config = ReplicaConfig {
        digest_interval: Millis::from_duration(options.digest_interval).max(Millis(1)),
        digest_fanout: options.digest_fanout,
        max_pending: options.max_pending,
        hlc: macula_crdt::HlcConfig {
            max_drift: Millis::from_duration(options.max_drift),
        },
        gc_horizon: Some(Millis::from_duration(options.gc_horizon)),
        members: options.members.clone(),
        ..ReplicaConfig::default()
    };
    let replica = Replica::new(name, me, state, config, wall());
    let (changes, _) = broadcast::channel(options.changes_capacity.max(1));
    let shared = Arc::new(Shared {
        name: name.to_string(),
        id: me,
        mesh: node.clone(),
        inner: Mutex::new(Inner {
            replica,
            stopped: false,
            own_dirty: false,
            dirty: false,
            state_bytes: None,
            changes: Some(changes),
        }),
        wake: Notify::new(),
        closing: AtomicBool::new(false),
        pause: Arc::default(),
        max_state_bytes: options.max_state_bytes.unwrap_or(usize::MAX).min(state_max),
        counters: Counters::default(),
    });
    let core = Arc::new(HandleCore {
        shared: shared.clone(),
    });
    if let Some(slot) = lock_registry().get_mut(key) {
        let live: Arc<dyn Any + Send + Sync> = core.clone();
        slot.live = Arc::downgrade(&live);
    }
    done.send_replace(());
    let (tx, rx) = mpsc::channel(options.send_queue.max(1));
    let sender = tokio::spawn(send_loop(rx, shared.clone()));
    let driver = Driver {
        shared,
        key: key.clone(),
        tx,
        store,
        payload_max,
        outbox: Vec::new(),
        need_digest: true,
        save_due: false,
    };
    tokio::spawn(driver.run(all, mine, done, sender));
    Ok(Crdt { core })
}

/// One replica's background task: feeds the replica what arrives, ticks
/// it, saves its state and hands what it sends to the sender task.
struct Driver<T: Replicated> {
    shared: Arc<Shared<T>>,
    /// The registry slot.
    key: (Owner, String),
    tx: mpsc::Sender<(String, Bytes)>,
    store: Store,
    payload_max: usize,
    /// Answers produced by received messages, sent at the next flush.
    outbox: Vec<Out<T>>,
    /// Broadcast the digest at the next flush (at open, after a loss).
    need_digest: bool,
    /// Save the state at the next flush even without a local update.
    save_due: bool,
}

impl<T: Replicated> Driver<T> {
    async fn run(
        mut self,
        mut all: Subscription,
        mut mine: Subscription,
        done: watch::Sender<()>,
        sender: tokio::task::JoinHandle<()>,
    ) {
        let shared = self.shared.clone();
        loop {
            drop(shared.pause.lock().await);
            self.flush().await;
            if shared.closing.load(Relaxed) || shared.mesh.runtime().is_shutting_down() {
                break;
            }
            let now = wall();
            let due = shared.lock().replica.poll_timeout();
            let wait = Duration::from_millis(due.0.saturating_sub(now.0)).min(SHUTDOWN_POLL);
            tokio::select! {
                _ = shared.wake.notified() => {}
                item = all.next() => if !self.on_item(item) { break },
                item = mine.next() => if !self.on_item(item) { break },
                _ = tokio::time::sleep(wait) => self.tick(),
            }
        }
        // Stop: refuse updates, send what is pending, save the last state.
        shared.lock().stopped = true;
        self.flush().await;
        self.save_due = true;
        self.save_if_due(true).await;
        drop((all, mine));
        let last = {
            let mut g = shared.lock();
            g.changes = None;
            match &self.store {
                Store::Memory => encode_saved(shared.id, g.replica.state()).ok(),
                Store::File(_) => None,
            }
        };
        // The slot is this replica's: a new one waits for `done`.
        if let (Some(slot), Some(last)) = (lock_registry().get_mut(&self.key), last) {
            slot.saved = Some(last);
        }
        drop(self.tx);
        drop(done);
        // The sender ends once it has published what is queued.
        let _ = sender.await;
        tracing::debug!(name = %shared.name, "CRDT replica stopped");
    }

    /// A subscription item; false when the subscription ended.
    fn on_item(&mut self, item: Option<SubscriptionItem>) -> bool {
        let shared = &self.shared;
        let e = match item {
            None => return false,
            Some(SubscriptionItem::Lagged(n)) => {
                shared.counters.lagged.fetch_add(n, Relaxed);
                self.need_digest = true;
                return true;
            }
            Some(SubscriptionItem::Event(e)) => e,
        };
        if e.publisher == shared.id {
            return true;
        }
        let msg = match Message::<T>::decode(&e.payload) {
            Ok(m) if m.from() == e.publisher => m,
            Ok(m) => {
                tracing::debug!(name = %shared.name, from = %m.from().short(), publisher = %e.publisher.short(), "CRDT message not from its publisher");
                shared.counters.decode_errors.fetch_add(1, Relaxed);
                return true;
            }
            Err(err) => {
                tracing::debug!(name = %shared.name, publisher = %e.publisher.short(), error = %err, "CRDT message refused");
                shared.counters.decode_errors.fetch_add(1, Relaxed);
                return true;
            }
        };
        let from = msg.from();
        let mut g = shared.lock();
        let before = g.replica.version();
        let outs = g.replica.handle_message(wall(), msg);
        if g.replica.version() != before {
            g.dirty = true;
            g.state_bytes = None;
            g.notify(Origin::Remote(from));
        }
        drop(g);
        self.outbox.extend(outs);
        true
    }

    fn tick(&mut self) {
        let mut g = self.shared.lock();
        let due = g.replica.poll_timeout();
        let now = wall();
        if now < due {
            return;
        }
        let outs = g.replica.tick(now);
        if g.dirty {
            self.save_due = true;
        }
        drop(g);
        self.outbox.extend(outs);
    }

    /// Sends what the replica has to send, after saving the state when a
    /// message may carry a local update the file does not hold.
    async fn flush(&mut self) {
        let shared = self.shared.clone();
        let mut outs = std::mem::take(&mut self.outbox);
        let (save, dirty) = {
            let mut g = shared.lock();
            while let Some(o) = g.replica.poll_transmit() {
                outs.push(o);
            }
            if self.need_digest {
                self.need_digest = false;
                shared.counters.extra_digests.fetch_add(1, Relaxed);
                outs.push(Out {
                    to: Target::All,
                    msg: Message::Digest {
                        name: shared.name.clone(),
                        from: shared.id,
                        digest: g.replica.state().digest(),
                    },
                });
            }
            (g.own_dirty && !outs.is_empty(), g.dirty)
        };
        if save || (self.save_due && dirty) {
            self.save_due = true;
            if !self.save_if_due(save).await {
                // Never send an update the file may not hold; the next
                // digest exchange sends it once the file can be written.
                shared
                    .counters
                    .send_dropped
                    .fetch_add(outs.len() as u64, Relaxed);
                return;
            }
        }
        for out in outs {
            self.send(out);
        }
    }

    /// Writes the state file when a save is due; false when it failed and
    /// `required` (a local update waits for it).
    async fn save_if_due(&mut self, required: bool) -> bool {
        if !std::mem::take(&mut self.save_due) {
            return true;
        }
        let Store::File(path) = &self.store else {
            return true;
        };
        let shared = self.shared.clone();
        let bytes = {
            let mut g = shared.lock();
            if !g.dirty && !g.own_dirty {
                return true;
            }
            match encode_saved(shared.id, g.replica.state()) {
                Ok(b) => {
                    g.dirty = false;
                    g.own_dirty = false;
                    b
                }
                Err(e) => {
                    tracing::warn!(name = %shared.name, error = %e, "cannot encode CRDT state");
                    shared.counters.save_errors.fetch_add(1, Relaxed);
                    return !required;
                }
            }
        };
        let p = path.clone();
        let r = tokio::task::spawn_blocking(move || write_atomic(&p, &bytes))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match r {
            Ok(()) => {
                shared.counters.saves.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(name = %shared.name, path = %path.display(), error = %e, "cannot save CRDT state; not sending local updates until it can");
                shared.counters.save_errors.fetch_add(1, Relaxed);
                let mut g = shared.lock();
                g.dirty = true;
                g.own_dirty |= required;
                !required
            }
        }
    }

    fn send(&mut self, out: Out<T>) {
        let c = &self.shared.counters;
        let name = &self.shared.name;
        let topic = match (out.to, &out.msg) {
            (Target::Node(id), _) => node_topic(name, id),
            (Target::All, Message::Digest { .. }) => digest_topic(name),
            (Target::All, _) => delta_topic(name),
        };
        let bytes = match out.msg.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(name = %name, error = %e, "cannot encode CRDT message");
                c.oversized.fetch_add(1, Relaxed);
                return;
            }
        };
        if bytes.len() > self.payload_max {
            tracing::warn!(name = %name, len = bytes.len(), max = self.payload_max, "CRDT message larger than a pub/sub payload: not sent");
            c.oversized.fetch_add(1, Relaxed);
            return;
        }
        if self.tx.try_send((topic, Bytes::from(bytes))).is_err() {
            c.send_dropped.fetch_add(1, Relaxed);
            // The peers repair it when they next hear our digest.
            self.need_digest = true;
        }
    }
}

/// Publishes a replica's messages in order; a full queue to a peer drops
/// the message for that peer (told to it as a loss), never waits.
async fn send_loop<T: Replicated>(mut rx: mpsc::Receiver<(String, Bytes)>, shared: Arc<Shared<T>>) {
    while let Some((topic, payload)) = rx.recv().await {
        let opts = PublishOptions {
            overflow: Overflow::DropNewest,
            ..PublishOptions::default()
        };
        if let Err(e) = shared.mesh.publish_with(&topic, payload, opts).await {
            tracing::debug!(name = %shared.name, topic, error = %e, "CRDT publish failed");
            shared.counters.publish_errors.fetch_add(1, Relaxed);
        }
    }
}

fn stopped(name: &str) -> Error {
    CrdtError::Stopped {
        name: name.to_string(),
    }
    .into()
}

/// Milliseconds since the Unix epoch: the hybrid logical clock's wall
/// reading must be comparable across nodes.
fn wall() -> Millis {
    Millis(macula_runtime::clock::wall_ms())
}

/// Counts bytes written.
struct Count(usize);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The MessagePack size of `v` (as a message carries it), without
/// allocating it.
fn encoded_len<V: Serialize>(v: &V) -> usize {
    let mut c = Count(0);
    match rmp_serde::encode::write_named(&mut c, v) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

fn encode_saved<T: Replicated>(node: NodeId, state: &T) -> Result<Vec<u8>, String> {
    #[derive(Serialize)]
    struct SavedRef<'a, T> {
        format: u32,
        node: NodeId,
        state: &'a T,
    }
    rmp_serde::to_vec_named(&SavedRef {
        format: STATE_FORMAT,
        node,
        state,
    })
    .map_err(|e| e.to_string())
}

fn decode_saved<T: Replicated>(
    name: &str,
    path: &Path,
    bytes: &[u8],
    me: NodeId,
) -> Result<T, Error> {
    let err = |reason: String| -> Error {
        CrdtError::Store {
            name: name.to_string(),
            path: path.to_path_buf(),
            what: "decode",
            reason,
        }
        .into()
    };
    let saved: Saved<T> = rmp_serde::from_slice(bytes).map_err(|e| {
        err(format!(
            "{e} (not a state of {})",
            std::any::type_name::<T>()
        ))
    })?;
    if saved.format != STATE_FORMAT {
        return Err(err(format!("unknown format {}", saved.format)));
    }
    if saved.node != me {
        return Err(err(format!(
            "saved by node {}, this node is {} (the data directory's identity changed)",
            saved.node, me
        )));
    }
    Ok(saved.state)
}

async fn load<T: Replicated>(name: &str, path: &Path, me: NodeId) -> Result<Option<T>, Error> {
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || std::fs::read(&p))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    match read {
        Ok(bytes) => decode_saved(name, path, &bytes, me).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CrdtError::Store {
            name: name.to_string(),
            path: path.to_path_buf(),
            what: "read",
            reason: e.to_string(),
        }
        .into()),
    }
}

/// Writes `bytes` to `path` whole or not at all: a temporary file, fsynced,
/// renamed over it, and the directory fsynced.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("state.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
