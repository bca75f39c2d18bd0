//! Durable streams hosted by this node (issue 21): the driver of
//! `macula_stream`'s pure core.
//!
//! Each stream is one `Hosted`: the core (`macula_stream::Stream`: index,
//! limits, retention, consumers) behind one mutex never held across an
//! await, and its store (`store.rs`, one redb file with group commit).
//!
//! **Capture.** Every event published on a topic a stream's subjects match
//! reaches this node through an ordinary subscription and is appended (no
//! one waits for it; if the subscription's queue overflows, the loss is
//! counted in `macula_stream_capture_lost_total`). An **acknowledged
//! publish** ([`Streams::publish`]) is appended directly, answered once it
//! is on disk, and then published to the mesh's live subscribers with the
//! header `macula-stream: <name>` (never queued to the capture's own
//! subscription: `PubSub::subscribe_carried`'s `skip`).
//!
//! **Visibility.** A message enters the index when it is appended and the
//! store's writer raises the durable sequence after its group commit;
//! consumers only see messages up to that sequence
//! (`StreamState::set_visible_upto`), so nothing a crash can lose is ever
//! delivered.
//!
//! **Consumers** are pulled ([`Streams::next`]): a batch of up to `batch`
//! messages, waiting up to `wait` for the first. Flow control is the core's
//! `max_ack_pending`; nothing is buffered for a slow consumer. Durable
//! consumers' positions are written to the store at most every
//! `StreamLimits::flush_every` (a crash may redeliver what was acked in
//! that window: delivery is at least once).
//!
//! **Timers.** One task per stream runs the core's timers (age and TTL
//! expiry, ack waits, idle ephemeral consumers) at their deadlines, at
//! least every `StreamLimits::tick`.

mod handle;
pub mod headers;
pub mod journal;
mod manage;
pub mod metrics;
pub mod record;
pub mod remote;
pub mod replica;
mod sealed;
pub mod store;
pub mod write;

pub use handle::{StreamHandle, StreamSubscription};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_pubsub::{PublishOptions, SubscriptionItem, Topic};
use macula_stream::{
    AppendError, Appended, ConfigError, ConsumerConfig, ConsumerError, ConsumerInfo, Incoming,
    Next, Purge, Restored, Stream, StreamConfig,
};
use macula_wire::Millis;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::clock::{wall_ms, Clock};
pub use crate::config::StreamLimits;
use crate::pubsub::PubSub;
use crate::raft::{Group, GroupError, Proposed};
use macula_raft::{Request, Response};
use store::{StoreError, StreamStore, Write};

pub use headers::{CONSUMER_HEADER, DELIVERIES_HEADER, SEQ_HEADER, STREAM_HEADER, SUBJECT_HEADER};
pub use macula_stream::{AckPolicy, DeliverPolicy, Discard, ReplayPolicy, Retention};

/// Messages a push consumer's task pulls at once.
const PUSH_BATCH: usize = 256;

/// Why a stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The node has no data directory (an ephemeral node keeps no streams).
    #[error("streams need a data directory (this node is ephemeral)")]
    NoDataDir,
    /// No stream of that name on this node.
    #[error("no stream {0:?} on this node")]
    NotFound(String),
    /// A stream of that name exists.
    #[error("stream {0:?} exists")]
    Exists(String),
    /// `max_streams` reached.
    #[error("this node hosts {0} streams, its maximum")]
    TooMany(usize),
    /// Two streams of this node would capture a common topic.
    #[error("subjects overlap stream {0:?}'s")]
    Overlap(String),
    /// No stream of this node captures the topic.
    #[error("no stream on this node captures topic {0:?}")]
    NotCaptured(String),
    /// An invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The publish was refused by the stream.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// A consumer operation was refused.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The store failed (the stream stops taking publishes).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stream could not be opened at start or failed since; its file is
    /// left as it is.
    #[error("stream {name:?} failed: {reason}")]
    Failed {
        /// The stream.
        name: String,
        /// Why.
        reason: String,
    },
    /// An invalid argument (topic, header, batch).
    #[error("{0}")]
    Invalid(String),
    /// Refused by the node hosting the stream, reached over RPC; `kind` is
    /// [`StreamError::kind`] there.
    #[error("{message}")]
    Remote {
        /// The cause, as the hosting node names it.
        kind: String,
        /// Its message.
        message: String,
    },
    /// The node hosting the stream could not be found or reached, or did
    /// not answer in time.
    #[error("the stream's node could not be reached: {0}")]
    Unreachable(String),
    /// A replicated stream's member that does not lead (or does not serve
    /// yet) was asked to change it.
    #[error("this member does not lead the replicated stream (leader: {})", leader.as_deref().unwrap_or("unknown"))]
    NotLeader {
        /// The leader as this member knows it.
        leader: Option<String>,
    },
    /// A replicated stream's group did not commit the change (no quorum,
    /// leader change, queue full): it may or may not be stored.
    #[error("replication failed: {0}")]
    Replication(String),
}

impl StreamError {
    /// A short name of the cause, for metrics and the admin API.
    pub fn kind(&self) -> &'static str {
        match self {
            StreamError::NoDataDir => "no_data_dir",
            StreamError::NotFound(_) => "not_found",
            StreamError::Exists(_) => "exists",
            StreamError::TooMany(_) => "too_many",
            StreamError::Overlap(_) => "overlap",
            StreamError::NotCaptured(_) => "not_captured",
            StreamError::Config(_) => "config",
            StreamError::Append(AppendError::Full(_)) => "full",
            StreamError::Append(AppendError::TooLarge { .. }) => "too_large",
            StreamError::Append(_) => "refused",
            StreamError::Consumer(ConsumerError::NotFound(_)) => "no_consumer",
            StreamError::Consumer(_) => "consumer",
            StreamError::Store(StoreError::Busy { .. }) => "busy",
            StreamError::Store(_) => "store",
            StreamError::Failed { .. } => "failed",
            StreamError::Invalid(_) => "invalid",
            StreamError::Remote { kind, .. } => remote_kind(kind),
            StreamError::Unreachable(_) => "unreachable",
            StreamError::NotLeader { .. } => "not_leader",
            StreamError::Replication(_) => "replication",
        }
    }
}

/// A remote node's error kind as one of ours (`remote` when unknown).
fn remote_kind(kind: &str) -> &'static str {
    const KINDS: &[&str] = &[
        "no_data_dir",
        "not_found",
        "exists",
        "too_many",
        "overlap",
        "not_captured",
        "config",
        "full",
        "too_large",
        "refused",
        "no_consumer",
        "consumer",
        "busy",
        "store",
        "failed",
        "invalid",
        "unreachable",
        "not_leader",
        "replication",
    ];
    KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("remote")
}

/// Options of an acknowledged publish.
#[derive(Debug, Clone, Default)]
pub struct PersistOptions {
    /// Headers stored and published with the message.
    pub headers: Vec<(String, String)>,
    /// De-duplication ID: a second publish with it within the stream's
    /// window is acknowledged as a duplicate and not stored again.
    pub msg_id: Option<String>,
    /// The message's own time to live.
    pub ttl: Option<Duration>,
    /// Also publish to the mesh's live subscribers once stored (default
    /// true through [`PersistOptions::new`]).
    pub publish: bool,
}

impl PersistOptions {
    /// Stored, then published to live subscribers.
    pub fn new() -> Self {
        PersistOptions {
            publish: true,
            ..Default::default()
        }
    }
}

/// The answer to an acknowledged publish: on disk as `seq` of `stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PubAck {
    /// The stream.
    pub stream: String,
    /// Its sequence in the stream.
    pub seq: u64,
    /// A publish of the same message ID was stored before (as `seq`).
    pub duplicate: bool,
}

/// A message read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMsg {
    /// The stream.
    pub stream: String,
    /// Its stream sequence (what to ack).
    pub seq: u64,
    /// Its delivery number in the consumer (0 for a direct read).
    pub consumer_seq: u64,
    /// Deliveries of it so far, this one included.
    pub deliveries: u32,
    /// When it was stored (Unix ms).
    pub ts: u64,
    /// Its topic.
    pub subject: String,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// The publisher's message ID.
    pub msg_id: Option<String>,
    /// The payload.
    pub payload: Bytes,
}

/// An acknowledgement of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckKind {
    /// Done.
    Ack,
    /// Deliver again, after this delay.
    Nak(Duration),
    /// Still working: restart the ack wait.
    InProgress,
    /// Never deliver again.
    Term,
}

/// A stream's state, as `macula stream info` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamInfo {
    /// Its configuration.
    pub config: StreamConfig,
    /// Stored messages.
    pub messages: u64,
    /// Stored bytes.
    pub bytes: u64,
    /// First stored sequence.
    pub first_seq: u64,
    /// Last sequence assigned.
    pub last_seq: u64,
    /// Last timestamp (Unix ms).
    pub last_ts: u64,
    /// Highest sequence on disk.
    pub durable_seq: u64,
    /// Distinct subjects stored.
    pub subjects: usize,
    /// Consumers' names.
    pub consumers: Vec<String>,
    /// What the stream counted.
    pub counters: StreamCountersReport,
    /// A replicated stream's group, as its leader sees it.
    #[serde(default)]
    pub replication: Option<ReplicationReport>,
}

/// A replicated stream's group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicationReport {
    /// The leader (the member that answered).
    pub leader: String,
    /// Voting members.
    pub members: Vec<String>,
    /// The Raft term.
    pub term: u64,
}

/// What `/metrics` shows of a replicated stream's member
/// (`Streams::replicas`; the fields mean what [`ReplicaStatus`]'s do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaCounters {
    pub serving: bool,
    pub applied: u64,
    pub replication_failures: u64,
    pub acked_at_commit: u64,
    pub apply_waits: u64,
}

/// One member's view of a replicated stream it holds
/// (`Streams::replica_status`, `GET /admin/streams/{name}/replica`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// This member leads and serves the stream.
    pub serving: bool,
    /// The leader it knows.
    pub leader: Option<String>,
    /// The Raft log index its store has applied.
    pub applied: u64,
    /// Messages in its store.
    pub stored: u64,
    /// The last sequence in its store.
    pub last_seq: u64,
    /// Writes this member, as leader, proposed that were not committed
    /// (refused, leadership lost, no quorum in time).
    #[serde(default)]
    pub replication_failures: u64,
    /// Writes this member, as leader, acknowledged at their commit,
    /// before it applied them.
    #[serde(default)]
    pub acked_at_commit: u64,
    /// Reads on this member that waited for the apply of a write
    /// acknowledged at its commit.
    #[serde(default)]
    pub apply_waits: u64,
}

/// A stream's counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamCountersReport {
    /// Stored.
    pub stored: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Publishes refused.
    pub refused: u64,
    /// Removed by the message and byte limits.
    pub removed_limits: u64,
    /// Removed by age.
    pub removed_age: u64,
    /// Removed by their TTL.
    pub removed_ttl: u64,
    /// Removed by acknowledgements (interest, work queue).
    pub removed_acked: u64,
    /// Removed by purge or delete.
    pub removed_purged: u64,
    /// Captured events lost before they could be stored (subscription
    /// queue overflow).
    pub capture_lost: u64,
    /// Group commits.
    pub commits: u64,
    /// Bytes in the store's writer queue (charged, not committed yet).
    #[serde(default)]
    pub write_queue_bytes: u64,
    /// Publishes that waited for room in the writer queue.
    #[serde(default)]
    pub write_queue_waits: u64,
    /// Publishes refused after waiting `write_queue_timeout` for room.
    #[serde(default)]
    pub write_queue_refused: u64,
    /// The queue's bound (`write_queue_bytes`).
    #[serde(default)]
    pub write_queue_limit: u64,
    /// The most bytes the queue held at once.
    #[serde(default)]
    pub write_queue_high: u64,
}

/// A consumer's state, as `macula consumer info` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsumerReport {
    /// The stream.
    pub stream: String,
    /// Its name.
    pub name: String,
    /// Its configuration.
    pub config: ConsumerConfig,
    /// Deliveries made.
    pub delivered_consumer_seq: u64,
    /// Last stream sequence delivered a first time.
    pub delivered_stream_seq: u64,
    /// Every sequence up to this one is acknowledged or not its.
    pub ack_floor: u64,
    /// Waiting for an ack.
    pub num_ack_pending: usize,
    /// Waiting to be delivered again.
    pub num_redelivered: usize,
    /// Stored messages not yet delivered.
    pub num_pending: u64,
    /// Deliveries given up after `max_deliver`.
    pub exhausted: u64,
}

/// A durable consumer as stored.
#[derive(Serialize, Deserialize)]
struct ConsumerRecord {
    config: ConsumerConfig,
    state: macula_stream::ConsumerState,
}

struct Hosted {
    name: String,
    core: Mutex<Stream>,
    store: StreamStore,
    /// Woken when messages become visible or deliveries become due.
    changed: Notify,
    /// Durable consumers whose position changed since the last flush.
    dirty: Mutex<BTreeSet<String>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    failed: Mutex<Option<String>>,
    capture_lost: AtomicU64,
    /// The advertisement of `_stream.<name>` (withdrawn when dropped), and
    /// the task that makes it (retried until the mesh takes it).
    registration: Mutex<Option<crate::rpc::Registration>>,
    advertising: Mutex<Option<JoinHandle<()>>>,
    /// One task per push consumer, by consumer name.
    pushers: Mutex<BTreeMap<String, JoinHandle<()>>>,
    /// `replicas > 1`: every change goes through the group below.
    replicated: bool,
    /// A replicated stream's group (`replica.rs`), once joined.
    replica: std::sync::OnceLock<Arc<Replica>>,
    /// The Raft log index the store has applied (replicated streams).
    applied: AtomicU64,
    /// Writes of a replicated stream its group did not take or commit.
    replication_failures: AtomicU64,
    /// The highest Raft log index acknowledged at its commit, before this
    /// member applied it (raised before the answer goes out): reads wait
    /// until `applied` reaches it ([`settle_applied`]).
    promised: AtomicU64,
    /// Notified when `applied` moves or the stream fails.
    applied_moved: Notify,
    /// Writes acknowledged at their commit (`promised`), and reads that
    /// waited for an apply.
    acked_at_commit: AtomicU64,
    apply_waits: AtomicU64,
    /// Fault injection for tests: the applier waits while this is set
    /// ([`Streams::hold_applies`]).
    apply_held: AtomicBool,
}

impl Hosted {
    fn check(&self) -> Result<(), StreamError> {
        match &*self.failed.lock() {
            Some(reason) => Err(StreamError::Failed {
                name: self.name.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(stream = %self.name, %reason, "stream failed: it takes no more publishes");
        self.failed.lock().get_or_insert(reason);
        self.applied_moved.notify_waiters();
    }

    /// The store has applied up to Raft log index `index` (reads waiting
    /// for it go on).
    pub(super) fn set_applied(&self, index: u64) {
        self.applied.store(index, Ordering::Release);
        self.applied_moved.notify_waiters();
    }

    fn stop(&self) {
        self.stop_tasks();
        if let Some(t) = self.advertising.lock().take() {
            t.abort();
        }
    }

    /// Stops capture, timers, visibility and push consumers.
    fn stop_tasks(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        for (_, t) in std::mem::take(&mut *self.pushers.lock()) {
            t.abort();
        }
    }

    /// Queues writes the core decided (call under the core's lock: the
    /// order of calls is the order on disk): to the store, or for a
    /// replicated stream to its group. Dropping the answer does not cancel
    /// the write.
    fn submit(&self, writes: Vec<Write>) -> Result<Pending, StreamError> {
        self.submit_in(writes, None)
    }

    /// [`Hosted::submit`] with room taken in the store's queue
    /// ([`StreamStore::admit`]; a replicated stream's group has bounds of
    /// its own and gives the room back at once).
    fn submit_in(
        &self,
        writes: Vec<Write>,
        room: Option<store::Admission>,
    ) -> Result<Pending, StreamError> {
        match self.replica.get() {
            Some(r) => r.propose(writes).inspect_err(|_| {
                self.replication_failures.fetch_add(1, Ordering::Relaxed);
                r.request_resync();
            }),
            None if self.replicated => Err(StreamError::NotLeader { leader: None }),
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                match room {
                    Some(room) => self.store.submit_admitted(writes, Some(tx), room)?,
                    None => self.store.submit(writes, Some(tx))?,
                }
                Ok(Pending::Store(rx))
            }
        }
    }
}

/// A queued write's answer.
pub(crate) enum Pending {
    /// The store's group commit.
    Store(tokio::sync::oneshot::Receiver<Result<(), String>>),
    /// A replicated stream's entry, committed: at its log index, not yet
    /// known applied here (`Some`), or applied here (`None`).
    Raft(
        std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Option<u64>, StreamError>> + Send>,
        >,
    ),
}

/// A replicated stream on this member: its group and whether it serves.
pub(crate) struct Replica {
    pub(super) group: Group,
    /// This member leads and has rebuilt its core: it takes writes.
    serving: AtomicBool,
    /// The term it serves in.
    pub(super) term: AtomicU64,
    /// Woken when `serving` changes.
    changed: tokio::sync::Notify,
    /// A write the core decided was not committed: the leader's core may
    /// hold what the store does not, so it is rebuilt (`replica::lead`).
    resync: AtomicBool,
    /// Wakes the leadership task for a resync.
    pub(super) wake: tokio::sync::Notify,
}

impl Replica {
    pub(super) fn new(group: Group) -> Replica {
        Replica {
            group,
            serving: AtomicBool::new(false),
            term: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            resync: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    pub(super) fn set_serving(&self, on: bool, term: u64) {
        self.term.store(term, Ordering::Release);
        self.serving.store(on, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Asks the leadership task to rebuild the leader's core from the
    /// store (after a write that was decided but not committed).
    pub(super) fn request_resync(&self) {
        if self.serving() {
            self.resync.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// Whether a resync was asked for (and clears the request).
    pub(super) fn take_resync(&self) -> bool {
        self.resync.swap(false, Ordering::AcqRel)
    }

    /// Waits up to `wait` for this member to serve.
    pub(super) async fn wait_serving(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.serving() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.serving();
            }
        }
    }

    /// Proposes `writes` (the leader's core decided them, under its lock).
    pub(super) fn propose(&self, writes: Vec<Write>) -> Result<Pending, StreamError> {
        if !self.serving() {
            return Err(StreamError::NotLeader {
                leader: self.group.leader().map(|l| l.to_string()),
            });
        }
        let bytes = rmp_serde::to_vec(&writes).map_err(|e| StreamError::Invalid(e.to_string()))?;
        // Answered at the commit: the writes were decided (sequence,
        // timestamp, de-duplication) before the proposal, and reads wait
        // for the apply (`settle_applied`).
        let committed = self
            .group
            .propose_committed(Request::Opaque(bytes.into()))
            .map_err(replication)?;
        macula_raft::probe::mark(macula_raft::probe::Phase::Proposed);
        let timeout = self.group.request_timeout();
        Ok(Pending::Raft(Box::pin(async move {
            // A leader cut off from its majority cannot commit: the writer
            // is told (the entry may still commit later, or be dropped).
            let answer = tokio::time::timeout(timeout, committed)
                .await
                .map_err(|_| {
                    StreamError::Replication(format!(
                        "not committed within {timeout:?} (no quorum reachable?); it may or may not be stored"
                    ))
                })?;
            match answer.map_err(replication)? {
                Proposed::Committed(index) => Ok(Some(index)),
                Proposed::Applied(Response::Opaque(_)) => Ok(None),
                Proposed::Applied(other) => Err(StreamError::Replication(format!(
                    "unexpected answer of the stream's group: {other:?}"
                ))),
            }
        })))
    }
}

/// A group error as the stream's.
pub(super) fn replication(e: GroupError) -> StreamError {
    match e {
        GroupError::NotLeader(l) => StreamError::NotLeader {
            leader: l.map(|l| l.to_string()),
        },
        e => StreamError::Replication(e.to_string()),
    }
}

struct Inner {
    dir: Option<PathBuf>,
    pubsub: PubSub,
    limits: StreamLimits,
    clock: Clock,
    hosted: Mutex<BTreeMap<String, Arc<Hosted>>>,
    /// Streams whose file could not be opened at start: name -> why.
    broken: Mutex<BTreeMap<String, String>>,
    publishes: AtomicU64,
    pulls: AtomicU64,
    delivered: AtomicU64,
    /// Operations on a replicated stream sent on to its leader.
    forwarded: AtomicU64,
    /// Replicated streams' snapshots installed (records fetched from the
    /// leader).
    installs: AtomicU64,
    /// Set once the node runs: hosted streams are served over it.
    rpc: std::sync::OnceLock<crate::rpc::Rpc>,
    /// Set once the node runs: replicated streams' groups.
    raft: std::sync::OnceLock<crate::raft::RaftGroups>,
    /// Set once the node runs: the connected full nodes (replica
    /// placement).
    peers: std::sync::OnceLock<PeerList>,
    /// The unlisted control procedures (`replica.rs`).
    control: Mutex<Vec<crate::rpc::Registration>>,
}

/// The connected full nodes, asked when a replicated stream is added.
pub type PeerList = Box<dyn Fn() -> Vec<macula_wire::NodeId> + Send + Sync>;

/// The streams this node hosts (see the module docs).
#[derive(Clone)]
pub struct Streams(Arc<Inner>);

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("dir", &self.0.dir)
            .field("streams", &self.0.hosted.lock().len())
            .finish()
    }
}

fn now_wall() -> u64 {
    wall_ms()
}

impl Streams {
    /// The streams of a node whose data directory is `data_dir` (`None`:
    /// an ephemeral node, which hosts none); opens every stream file in
    /// `<data dir>/streams/`. A file that does not open is reported (log,
    /// [`Streams::broken`]) and left untouched.
    pub fn open(
        data_dir: Option<PathBuf>,
        pubsub: PubSub,
        limits: StreamLimits,
        clock: Clock,
    ) -> Streams {
        let streams = Streams(Arc::new(Inner {
            dir: data_dir.map(|d| d.join("streams")),
            pubsub,
            limits,
            clock,
            hosted: Mutex::new(BTreeMap::new()),
            broken: Mutex::new(BTreeMap::new()),
            publishes: AtomicU64::new(0),
            pulls: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            installs: AtomicU64::new(0),
            rpc: std::sync::OnceLock::new(),
            raft: std::sync::OnceLock::new(),
            peers: std::sync::OnceLock::new(),
            control: Mutex::new(Vec::new()),
        }));
        if let Some(dir) = streams.0.dir.clone() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "redb"))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            // The stores open and their indexes load in parallel (a few
            // threads); they are hosted in name order on this thread.
            for (path, opened) in streams.open_all(files) {
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                match opened {
                    Ok(o) => {
                        tracing::info!(
                            stream = %name,
                            messages = o.messages,
                            took_ms = o.took.as_millis() as u64,
                            store_ms = o.store_took.as_millis() as u64,
                            from_index = o.from_index,
                            index_runs = o.stream.state().index_len(),
                            index_bytes = o.stream.state().index_bytes(),
                            "stream opened"
                        );
                        streams.host_opened(o);
                    }
                    Err(e) => {
                        tracing::error!(stream = %name, error = %e, "stream could not be opened; its file is left as it is");
                        streams.0.broken.lock().insert(name, e.to_string());
                    }
                }
            }
        }
        streams
    }

    /// Opens stream files, at most [`OPEN_THREADS`] at a time; each file
    /// with what came of it, in the order given.
    fn open_all(&self, files: Vec<PathBuf>) -> Vec<(PathBuf, Result<Opened, StreamError>)> {
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, OPEN_THREADS)
            .min(files.len());
        if threads <= 1 {
            return files
                .into_iter()
                .map(|p| {
                    let o = self.open_one(&p);
                    (p, o)
                })
                .collect();
        }
        let next = AtomicU64::new(0);
        let results: Mutex<Vec<Option<Result<Opened, StreamError>>>> =
            Mutex::new((0..files.len()).map(|_| None).collect());
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(path) = files.get(i) else { break };
                    let o = self.open_one(path);
                    results.lock()[i] = Some(o);
                });
            }
        });
        files
            .into_iter()
            .zip(results.into_inner())
            .map(|(p, o)| {
                let o =
                    o.unwrap_or_else(|| Err(StreamError::Invalid("stream file not opened".into())));
                (p, o)
            })
            .collect()
    }

    /// Opens one stream's store and restores its core (no task started).
    fn open_one(&self, path: &std::path::Path) -> Result<Opened, StreamError> {
        let started = std::time::Instant::now();
        let store = StreamStore::open(path, self.0.limits.cache_bytes)?;
        let store_took = started.elapsed();
        let (stream, messages, from_index) = self.restore(&store, true)?;
        // The snapshot goes before anything else is written: this removal
        // is the writer's first job, so it is in the first commit (or an
        // earlier one) and a crash after any change scans. Not waited for:
        // until that commit the file is as the snapshot describes it.
        store.submit(vec![Write::Index(None)], None)?;
        let applied = store.applied()?;
        Ok(Opened {
            store,
            stream,
            messages,
            applied,
            from_index,
            took: started.elapsed(),
            store_took,
        })
    }

    /// Hosts a stream [`Streams::open_one`] opened.
    fn host_opened(&self, o: Opened) {
        let h = self.host(o.stream, o.store);
        h.applied.store(o.applied, Ordering::Release);
    }

    /// A stream's core as its store holds it (with the clean shutdown's
    /// index snapshot when `use_index` and it matches, else by a scan of
    /// every message's head) and the number of messages.
    fn restore(
        &self,
        store: &StreamStore,
        use_index: bool,
    ) -> Result<(Stream, u64, bool), StreamError> {
        let path = store.path();
        let (cfg, last_seq, last_ts) = store.meta()?;
        let cfg: StreamConfig = serde_json::from_slice(&cfg).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            what: format!("configuration: {e}"),
        })?;
        let now = now_wall();
        // A clean shutdown left the index: one read instead of every
        // message's head.
        let snapshot = match use_index {
            true => store.index_snapshot()?,
            false => None,
        }
        .and_then(|b| {
            macula_stream::StreamState::from_snapshot(cfg.clone(), &b)
                .ok()
                .flatten()
        })
        .filter(|s| s.last_seq() == last_seq && s.last_ts() == last_ts);
        let from_index = snapshot.is_some();
        let (mut state, n) = match snapshot {
            Some(state) => {
                let n = state.msgs();
                (state, n)
            }
            None => {
                let mut state = macula_stream::StreamState::restore(cfg, last_seq, last_ts)?;
                let mut skipped = 0u64;
                let n = store.scan(|seq, size, h| {
                    let ok = state.restore_msg(
                        now,
                        Restored {
                            seq,
                            ts: h.ts,
                            size,
                            subject: h.subject,
                            msg_id: h.msg_id,
                            expires: h.expires,
                        },
                    );
                    skipped += u64::from(!ok);
                })?;
                if skipped > 0 {
                    return Err(StoreError::Corrupt {
                        path: path.to_path_buf(),
                        what: format!("{skipped} messages out of order or past the last sequence"),
                    }
                    .into());
                }
                (state, n)
            }
        };
        state.set_visible_upto(Some(last_seq));
        let mut stream = Stream::from_state(state);
        let mono = self.0.clock.now();
        for (name, bytes) in store.consumers()? {
            let rec: ConsumerRecord =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: path.to_path_buf(),
                    what: format!("consumer {name}: {e}"),
                })?;
            stream.restore_consumer(rec.config, rec.state, mono)?;
        }
        Ok((stream, n, from_index))
    }

    /// Hosts a stream: served to the mesh and, unless it is replicated
    /// (then its leadership task does it, `replica.rs`), running.
    fn host(&self, stream: Stream, store: StreamStore) -> Arc<Hosted> {
        let name = stream.config().name.clone();
        let replicated = stream.config().replicas > 1;
        if !replicated {
            // A replicated stream's interval is its Raft log's
            // (`manage.rs`, `join_group`); its store is unsynced anyway.
            store.set_sync_interval(stream.config().sync_interval.map(Millis::to_duration));
        }
        store.set_queue_limit(
            self.0.limits.write_queue_bytes,
            self.0.limits.write_queue_timeout,
        );
        let h = Arc::new(Hosted {
            name: name.clone(),
            core: Mutex::new(stream),
            store,
            changed: Notify::new(),
            dirty: Mutex::new(BTreeSet::new()),
            tasks: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            capture_lost: AtomicU64::new(0),
            registration: Mutex::new(None),
            advertising: Mutex::new(None),
            pushers: Mutex::new(BTreeMap::new()),
            replicated,
            replica: std::sync::OnceLock::new(),
            applied: AtomicU64::new(0),
            replication_failures: AtomicU64::new(0),
            promised: AtomicU64::new(0),
            applied_moved: Notify::new(),
            acked_at_commit: AtomicU64::new(0),
            apply_waits: AtomicU64::new(0),
            apply_held: AtomicBool::new(false),
        });
        self.0.hosted.lock().insert(name, h.clone());
        self.advertise(&h);
        if !replicated {
            self.start_serving(&h);
        }
        h
    }

    /// Starts a stream's tasks: capture, timers, visibility, push
    /// consumers.
    fn start_serving(&self, h: &Arc<Hosted>) {
        self.start_tasks(h);
        let push: Vec<(String, String)> = {
            let core = h.core.lock();
            core.consumer_names()
                .filter_map(|c| {
                    let subject = core.consumer(c)?.config().deliver_subject.clone()?;
                    Some((c.to_string(), subject))
                })
                .collect()
        };
        for (consumer, subject) in push {
            self.start_push(h, consumer, subject);
        }
    }

    /// Runs push consumer `consumer` of `h`: pulls batches as the consumer
    /// allows (its `max_ack_pending` is the flow control) and publishes
    /// each message to `subject` with the headers naming stream, sequence,
    /// consumer and delivery count; acknowledgements come back like any
    /// (`ack`, locally or over `_stream.<name>`).
    fn start_push(&self, h: &Arc<Hosted>, consumer: String, subject: String) {
        let weak = Arc::downgrade(&self.0);
        let stream = h.name.clone();
        let c = consumer.clone();
        let task = tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let streams = Streams(inner);
                let wait = streams.0.limits.max_wait;
                let msgs = match streams
                    .pull(&stream, &c, PUSH_BATCH, None, wait, true)
                    .await
                {
                    Ok(m) => m,
                    Err(StreamError::NotFound(_))
                    | Err(StreamError::Consumer(ConsumerError::NotFound(_))) => return,
                    Err(e) => {
                        tracing::warn!(stream = %stream, consumer = %c, error = %e, "push consumer paused");
                        drop(streams);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                for m in msgs {
                    let mut headers = m.headers;
                    headers.push((STREAM_HEADER.into(), stream.clone()));
                    headers.push((SUBJECT_HEADER.into(), m.subject.clone()));
                    headers.push((SEQ_HEADER.into(), m.seq.to_string()));
                    headers.push((CONSUMER_HEADER.into(), c.clone()));
                    headers.push((DELIVERIES_HEADER.into(), m.deliveries.to_string()));
                    let opts = PublishOptions {
                        headers,
                        ..Default::default()
                    };
                    if let Err(e) = streams
                        .0
                        .pubsub
                        .publish_mesh(&subject, m.payload, opts)
                        .await
                    {
                        // Not acknowledged: delivered again after the ack
                        // wait (with acks); counted by the pub/sub layer.
                        tracing::debug!(stream = %stream, consumer = %c, error = %e, "push delivery not published");
                    }
                }
            }
        });
        if let Some(old) = h.pushers.lock().insert(consumer, task) {
            old.abort();
        }
    }

    /// Whether this node hosts `name` (broken files included).
    pub fn hosts(&self, name: &str) -> bool {
        self.0.hosted.lock().contains_key(name) || self.0.broken.lock().contains_key(name)
    }

    /// `Ok` if stream `name` captures `topic` (a publish over RPC names
    /// its stream).
    pub(crate) fn check_captures(&self, name: &str, topic: &str) -> Result<(), StreamError> {
        let t = Topic::new(topic).map_err(|e| StreamError::Invalid(e.to_string()))?;
        let h = self.get(name)?;
        if h.core.lock().state().captures(&t) {
            Ok(())
        } else {
            Err(StreamError::NotCaptured(topic.to_string()))
        }
    }

    fn start_tasks(&self, h: &Arc<Hosted>) {
        let mut tasks = vec![
            tokio::spawn(visibility(Arc::downgrade(h))),
            tokio::spawn(timers(
                Arc::downgrade(h),
                self.0.limits.clone(),
                self.0.clock,
            )),
        ];
        let patterns: Vec<String> = h.core.lock().config().subjects.clone();
        for p in patterns {
            // Not opened: a stream stores events on encrypted topics as
            // they were carried (sealed); its readers open them. The
            // stream's own republished events are never queued to it.
            let own = Some((STREAM_HEADER.to_string(), h.name.clone()));
            match self.0.pubsub.subscribe_carried(&p, own) {
                Ok(sub) => tasks.push(tokio::spawn(capture(Arc::downgrade(h), sub))),
                Err(e) => {
                    tracing::warn!(stream = %h.name, pattern = %p, error = %e, "stream cannot capture its subject")
                }
            }
        }
        *h.tasks.lock() = tasks;
    }

    /// Stream `name`, refused with `NotLeader` on a member of a replicated
    /// stream that does not serve it (the caller routes to the leader:
    /// `handle.rs`, `remote.rs`).
    fn serving(&self, name: &str) -> Result<Arc<Hosted>, StreamError> {
        let h = self.get(name)?;
        check_serving(&h)?;
        Ok(h)
    }

    /// The node's RPC, once it runs.
    pub(crate) fn rpc(&self) -> Option<crate::rpc::Rpc> {
        self.0.rpc.get().cloned()
    }

    /// The node's Raft groups, once it runs.
    pub(crate) fn raft(&self) -> Option<crate::raft::RaftGroups> {
        self.0.raft.get().cloned()
    }

    /// Stops a stream's tasks (a replica leaving office).
    fn stop_serving(&self, h: &Hosted) {
        h.stop_tasks();
    }

    /// Rebuilds a replica's core from its store (when it takes office);
    /// the number of messages.
    fn rebuild(&self, h: &Hosted) -> Result<u64, StreamError> {
        let (stream, n, _) = self.restore(&h.store, false)?;
        *h.core.lock() = stream;
        h.changed.notify_waiters();
        Ok(n)
    }

    /// This member's view of replicated stream `name` (`None`: not a
    /// replicated stream hosted here, or its group is not joined yet).
    pub fn replica_status(&self, name: &str) -> Option<ReplicaStatus> {
        let h = self.0.hosted.lock().get(name).cloned()?;
        let r = h.replica.get()?;
        let (_, last_seq, _) = h.store.meta().ok()?;
        Some(ReplicaStatus {
            serving: r.serving(),
            leader: r.group.leader().map(|l| l.to_string()),
            applied: h.applied.load(Ordering::Acquire),
            stored: h.store.stored_messages().ok()?,
            last_seq,
            replication_failures: h.replication_failures.load(Ordering::Relaxed),
            acked_at_commit: h.acked_at_commit.load(Ordering::Relaxed),
            apply_waits: h.apply_waits.load(Ordering::Relaxed),
        })
    }

    /// Fault injection for tests: while `held`, this member's applier of
    /// replicated stream `name` waits before it applies anything (a slow
    /// state machine). Whether the stream is hosted here.
    #[doc(hidden)]
    pub fn hold_applies(&self, name: &str, held: bool) -> bool {
        let Some(h) = self.0.hosted.lock().get(name).cloned() else {
            return false;
        };
        h.apply_held.store(held, Ordering::Release);
        h.applied_moved.notify_waiters();
        true
    }

    /// The group of stream `name` if it is a replicated stream hosted
    /// here.
    pub(crate) fn replica(&self, name: &str) -> Option<Arc<Replica>> {
        self.0
            .hosted
            .lock()
            .get(name)
            .and_then(|h| h.replica.get().cloned())
    }

    /// This node's own copy of stream `name`'s records from `from` on,
    /// as stored (what a replica installing a snapshot fetches from the
    /// leader; also how to compare replicas): at most [`FETCH_MAX`] of
    /// them and about [`FETCH_MAX_BYTES`]. Read once this member has
    /// applied the log up to `applied` (a snapshot's index): a leader
    /// just elected may not have yet, and records it has not stored would
    /// be missing from the installing member for good (its applied index
    /// says it has them). Waits at most [`FETCH_APPLIED_WAIT`], then
    /// fails (`replication`: the installer asks again).
    pub async fn fetch_local(
        &self,
        name: &str,
        from: u64,
        applied: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StreamError> {
        let h = self.get(name)?;
        let deadline = tokio::time::Instant::now() + FETCH_APPLIED_WAIT;
        while h.replicated && h.applied.load(Ordering::Acquire) < applied {
            if tokio::time::Instant::now() >= deadline {
                return Err(StreamError::Replication(format!(
                    "this member has applied the log up to {}, not yet {applied}",
                    h.applied.load(Ordering::Acquire)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And what this member acknowledged at its commit.
        settle_applied(&h).await?;
        tokio::task::spawn_blocking(move || {
            h.store
                .raw_range(from, FETCH_MAX, FETCH_MAX_BYTES)
                .map_err(StreamError::from)
        })
        .await
        .map_err(|e| StreamError::Invalid(e.to_string()))?
    }

    fn dir(&self) -> Result<&PathBuf, StreamError> {
        self.0.dir.as_ref().ok_or(StreamError::NoDataDir)
    }

    fn get(&self, name: &str) -> Result<Arc<Hosted>, StreamError> {
        if let Some(reason) = self.0.broken.lock().get(name) {
            return Err(StreamError::Failed {
                name: name.to_string(),
                reason: reason.clone(),
            });
        }
        self.0
            .hosted
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| StreamError::NotFound(name.to_string()))
    }

    fn check_overlap(&self, cfg: &StreamConfig) -> Result<(), StreamError> {
        let mine = cfg.validate()?;
        for (name, h) in self.0.hosted.lock().iter() {
            if *name == cfg.name {
                continue;
            }
            let core = h.core.lock();
            let theirs = core.state().patterns();
            if mine
                .iter()
                .any(|a| theirs.iter().any(|b| macula_auth::policy::overlaps(a, b)))
            {
                return Err(StreamError::Overlap(name.clone()));
            }
        }
        Ok(())
    }

    /// Creates a stream's file and hosts it (`manage.rs` adds streams);
    /// `Ok(None)` if it is hosted already with this configuration.
    fn create(&self, cfg: &StreamConfig) -> Result<Option<Arc<Hosted>>, StreamError> {
        let dir = self.dir()?.clone();
        cfg.validate()?;
        if let Ok(h) = self.get(&cfg.name) {
            let same = h.core.lock().config() == cfg;
            return if same {
                Ok(None)
            } else {
                Err(StreamError::Exists(cfg.name.clone()))
            };
        }
        if self.0.broken.lock().contains_key(&cfg.name) {
            return Err(StreamError::Exists(cfg.name.clone()));
        }
        let count = self.0.hosted.lock().len();
        if count >= self.0.limits.max_streams {
            return Err(StreamError::TooMany(count));
        }
        self.check_overlap(cfg)?;
        let mut stream = Stream::new(cfg.clone())?;
        let json = serde_json::to_vec(cfg).map_err(|e| StreamError::Invalid(e.to_string()))?;
        let path = dir.join(format!("{}.redb", cfg.name));
        let store = StreamStore::create(&path, &json, self.0.limits.cache_bytes)?;
        stream.set_visible_upto(0);
        let h = self.host(stream, store);
        tracing::info!(stream = %cfg.name, subjects = ?cfg.subjects, replicas = cfg.replicas, "stream added");
        Ok(Some(h))
    }

    /// Changes a stream's configuration (name, replicas and retention are
    /// fixed); the new limits apply at once.
    pub async fn edit(&self, cfg: StreamConfig) -> Result<StreamInfo, StreamError> {
        let h = self.serving(&cfg.name)?;
        h.check()?;
        self.check_overlap(&cfg)?;
        let json = serde_json::to_vec(&cfg).map_err(|e| StreamError::Invalid(e.to_string()))?;
        let (rx, subjects_changed) = {
            let mut core = h.core.lock();
            let changed = core.config().subjects != cfg.subjects;
            let removed = core.edit(cfg.clone())?;
            (
                h.submit(vec![Write::Config(json), Write::Delete(removed)])?,
                changed,
            )
        };
        wait_written(&h, rx).await?;
        match h.replica.get() {
            // Every member takes it as it applies the entry
            // (`replica.rs`); the leader already has.
            Some(r) => r
                .group
                .set_log_sync_interval(cfg.sync_interval.map(Millis::to_duration)),
            None => h
                .store
                .set_sync_interval(cfg.sync_interval.map(Millis::to_duration)),
        }
        if subjects_changed {
            self.stop_serving(&h);
            self.start_serving(&h);
        }
        self.info(&cfg.name)
    }

    /// Removes a stream, its consumers and its file from this node
    /// (`manage.rs` deletes streams); the removed stream.
    async fn remove_local(&self, name: &str) -> Result<Option<Arc<Hosted>>, StreamError> {
        if self.0.broken.lock().remove(name).is_some() {
            let path = self.dir()?.join(format!("{name}.redb"));
            remove_journal(&path)?;
            return std::fs::remove_file(&path).map(|_| None).map_err(|e| {
                StoreError::Io {
                    path,
                    message: e.to_string(),
                }
                .into()
            });
        }
        let h = self
            .0
            .hosted
            .lock()
            .remove(name)
            .ok_or_else(|| StreamError::NotFound(name.to_string()))?;
        h.stop();
        drop(h.registration.lock().take());
        h.changed.notify_waiters();
        let path = h.store.path().to_path_buf();
        let h2 = h.clone();
        tokio::task::spawn_blocking(move || {
            h2.store.close();
            remove_journal(&path)?;
            std::fs::remove_file(&path).map_err(|e| StoreError::Io {
                path: path.clone(),
                message: e.to_string(),
            })
        })
        .await
        .map_err(|e| StreamError::Invalid(e.to_string()))??;
        tracing::info!(stream = %name, "stream deleted");
        Ok(Some(h))
    }

    /// Removes the messages `p` names; returns how many.
    pub async fn purge(&self, name: &str, p: Purge) -> Result<u64, StreamError> {
        let h = self.serving(name)?;
        h.check()?;
        let rx = {
            let mut core = h.core.lock();
            let removed = core.purge(&p);
            let n = removed.len() as u64;
            (h.submit(vec![Write::Delete(removed)])?, n)
        };
        wait_written(&h, rx.0).await?;
        Ok(rx.1)
    }

    /// The names of the streams, sorted, with the broken ones.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.hosted.lock().keys().cloned().collect();
        v.extend(self.0.broken.lock().keys().cloned());
        v.sort();
        v
    }

    /// Streams that could not be opened: name -> why.
    pub fn broken(&self) -> BTreeMap<String, String> {
        self.0.broken.lock().clone()
    }

    /// A stream's state.
    pub fn info(&self, name: &str) -> Result<StreamInfo, StreamError> {
        let h = self.serving(name)?;
        let durable_seq = *h.store.durable().borrow();
        let q = h.store.queue_stats();
        let core = h.core.lock();
        let st = core.state();
        let c = st.counters();
        Ok(StreamInfo {
            config: core.config().clone(),
            messages: st.msgs(),
            bytes: st.bytes(),
            first_seq: st.first_seq(),
            last_seq: st.last_seq(),
            last_ts: st.last_ts(),
            durable_seq,
            subjects: st.subjects(),
            consumers: core.consumer_names().map(str::to_string).collect(),
            replication: h.replica.get().map(|r| {
                let st = r.group.leader_state();
                ReplicationReport {
                    leader: st.leader.map(|l| l.to_string()).unwrap_or_default(),
                    members: st.voters.iter().map(|v| v.to_string()).collect(),
                    term: st.term,
                }
            }),
            counters: StreamCountersReport {
                stored: c.stored,
                duplicates: c.duplicates,
                refused: c.refused,
                removed_limits: c.removed_limits,
                removed_age: c.removed_age,
                removed_ttl: c.removed_ttl,
                removed_acked: c.removed_acked,
                removed_purged: c.removed_purged,
                capture_lost: h.capture_lost.load(Ordering::Relaxed),
                commits: h.store.stats().commits.load(Ordering::Relaxed),
                write_queue_bytes: q.queued,
                write_queue_waits: q.waits,
                write_queue_refused: q.refused,
                write_queue_limit: q.limit,
                write_queue_high: q.high,
            },
        })
    }

    fn capturing(&self, topic: &Topic) -> Option<Arc<Hosted>> {
        self.0
            .hosted
            .lock()
            .values()
            .find(|h| h.core.lock().state().captures(topic))
            .cloned()
    }

    /// An acknowledged publish: stored by the stream of this node that
    /// captures `topic`, answered once on disk, then (with
    /// `opts.publish`) published to the mesh's live subscribers. On an
    /// end-to-end encrypted topic the payload is sealed here (this node's
    /// application is the edge) and stored sealed.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PersistOptions,
    ) -> Result<PubAck, StreamError> {
        let payload = self
            .0
            .pubsub
            .seal(topic, payload)
            .map_err(|e| StreamError::Invalid(format!("end-to-end: {e}")))?;
        self.publish_carried(topic, payload, opts).await
    }

    /// [`Streams::publish`] of a payload as given (sealed at its edge, on
    /// an encrypted topic): what a stream's node does for a remote
    /// publisher.
    pub(crate) async fn publish_carried(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PersistOptions,
    ) -> Result<PubAck, StreamError> {
        let t = Topic::new(topic).map_err(|e| StreamError::Invalid(e.to_string()))?;
        macula_pubsub::event::check_headers(&opts.headers)
            .map_err(|e| StreamError::Invalid(e.to_string()))?;
        let h = self
            .capturing(&t)
            .ok_or_else(|| StreamError::NotCaptured(topic.to_string()))?;
        self.publish_hosted(h, t, payload, opts).await
    }

    /// [`Streams::publish`] on stream `name`, which must capture `topic`
    /// (a [`StreamHandle`]'s publish: the stream is known, so the topic is
    /// parsed once and no other stream is looked at).
    pub(crate) async fn publish_on(
        &self,
        name: &str,
        topic: &str,
        payload: Bytes,
        opts: PersistOptions,
    ) -> Result<PubAck, StreamError> {
        let t = Topic::new(topic).map_err(|e| StreamError::Invalid(e.to_string()))?;
        let h = self.get(name)?;
        if !h.core.lock().state().captures(&t) {
            return Err(StreamError::NotCaptured(topic.to_string()));
        }
        let payload = self
            .0
            .pubsub
            .seal(topic, payload)
            .map_err(|e| StreamError::Invalid(format!("end-to-end: {e}")))?;
        macula_pubsub::event::check_headers(&opts.headers)
            .map_err(|e| StreamError::Invalid(e.to_string()))?;
        self.publish_hosted(h, t, payload, opts).await
    }

    /// Turns the phase timing of replicated publishes on (clearing what
    /// it recorded) or off, process-wide (`macula_raft::probe`: one write
    /// at a time, every member in this process; for `macula bench
    /// stream --phases`). Off by default.
    pub fn phase_timing(on: bool) {
        macula_raft::probe::set(on);
    }

    /// What the phase timing recorded: per point on a replicated
    /// publish's way, in order, its name, how many publishes reached it
    /// and the p50 and p90 of the time since the publish started (µs).
    pub fn phase_report() -> Vec<(&'static str, usize, u32, u32)> {
        macula_raft::probe::report()
            .into_iter()
            .map(|p| (p.phase.name(), p.count, p.p50_us, p.p90_us))
            .collect()
    }

    /// Stores a publish in `h`, which captures `t`, and answers once it is
    /// on disk (see [`Streams::publish`]).
    async fn publish_hosted(
        &self,
        h: Arc<Hosted>,
        t: Topic,
        payload: Bytes,
        opts: PersistOptions,
    ) -> Result<PubAck, StreamError> {
        if h.replicated {
            macula_raft::probe::start();
        }
        h.check()?;
        check_serving(&h)?;
        let room = admit(&h, &t, &payload, &opts.headers, opts.msg_id.as_deref()).await?;
        let ack = append(
            &h,
            &t,
            &payload,
            &opts.headers,
            opts.msg_id.as_deref(),
            opts.ttl,
            room,
        )?;
        let ack = match ack {
            Appending::Duplicate(seq) => PubAck {
                stream: h.name.clone(),
                seq,
                duplicate: true,
            },
            Appending::Stored(seq, rx) => {
                wait_written(&h, rx).await?;
                macula_raft::probe::mark(macula_raft::probe::Phase::Acked);
                // On disk: visible at once, so a consumer reads what its
                // own acknowledged publish stored (the visibility task
                // would raise the bound too, a moment later).
                h.core.lock().set_visible_upto(seq);
                h.changed.notify_waiters();
                self.0.publishes.fetch_add(1, Ordering::Relaxed);
                PubAck {
                    stream: h.name.clone(),
                    seq,
                    duplicate: false,
                }
            }
        };
        if opts.publish && !ack.duplicate {
            let mut headers = opts.headers;
            headers.push((STREAM_HEADER.into(), h.name.clone()));
            headers.push((SEQ_HEADER.into(), ack.seq.to_string()));
            let popts = PublishOptions {
                headers,
                message_id: opts.msg_id,
                ..Default::default()
            };
            if let Err(e) = self
                .0
                .pubsub
                .publish_carried(t.as_str(), payload, popts)
                .await
            {
                tracing::debug!(stream = %h.name, error = %e, "stored message not published to live subscribers");
            }
        }
        Ok(ack)
    }

    /// Reads one stored message (opened, on an encrypted topic: an error
    /// if this node cannot).
    pub async fn get_msg(&self, name: &str, seq: u64) -> Result<Option<StreamMsg>, StreamError> {
        let m = self.get_msg_stored(name, seq).await?;
        sealed::open_one(self.0.pubsub.e2e(), m)
    }

    /// One stored message as stored (sealed, on an encrypted topic).
    pub(crate) async fn get_msg_stored(
        &self,
        name: &str,
        seq: u64,
    ) -> Result<Option<StreamMsg>, StreamError> {
        let h = self.serving(name)?;
        let visible = h.core.lock().state().visible_upto();
        if seq > visible {
            return Ok(None);
        }
        let mut got = read(&h, vec![(seq, 0, 0)]).await?;
        Ok(got.pop())
    }

    /// Adds a consumer; returns its name (ephemeral ones get `eph-<n>`).
    pub async fn add_consumer(
        &self,
        stream: &str,
        cfg: ConsumerConfig,
    ) -> Result<String, StreamError> {
        let h = self.serving(stream)?;
        let now = self.0.clock.now();
        let push = cfg.deliver_subject.clone();
        let name = h.core.lock().add_consumer(cfg, now)?;
        self.flush_consumer(&h, &name).await?;
        if let Some(subject) = push {
            if !h.pushers.lock().contains_key(&name) {
                self.start_push(&h, name.clone(), subject);
            }
        }
        Ok(name)
    }

    /// Removes a consumer.
    pub async fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), StreamError> {
        let h = self.serving(stream)?;
        let rx = {
            let mut core = h.core.lock();
            let removed = core.delete_consumer(name)?;
            h.submit(vec![
                Write::Delete(removed),
                Write::Consumer(name.to_string(), None),
            ])?
        };
        h.dirty.lock().remove(name);
        if let Some(t) = h.pushers.lock().remove(name) {
            t.abort();
        }
        wait_written(&h, rx).await
    }

    /// A consumer's state.
    pub fn consumer_info(&self, stream: &str, name: &str) -> Result<ConsumerReport, StreamError> {
        let h = self.serving(stream)?;
        let mut core = h.core.lock();
        let (cfg, exhausted) = {
            let c = core
                .consumer(name)
                .ok_or_else(|| ConsumerError::NotFound(name.to_string()))?;
            (c.config().clone(), c.counters().exhausted)
        };
        let i: ConsumerInfo = core.consumer_info(name)?;
        Ok(ConsumerReport {
            stream: stream.to_string(),
            name: name.to_string(),
            config: cfg,
            delivered_consumer_seq: i.delivered_consumer_seq,
            delivered_stream_seq: i.delivered_stream_seq,
            ack_floor: i.ack_floor,
            num_ack_pending: i.num_ack_pending,
            num_redelivered: i.num_redelivered,
            num_pending: i.num_pending,
            exhausted,
        })
    }

    /// The consumers of a stream.
    pub fn consumers(&self, stream: &str) -> Result<Vec<ConsumerReport>, StreamError> {
        let names: Vec<String> = {
            let h = self.serving(stream)?;
            let core = h.core.lock();
            core.consumer_names().map(str::to_string).collect()
        };
        names
            .iter()
            .map(|n| self.consumer_info(stream, n))
            .collect()
    }

    /// Pulls up to `batch` messages (and `max_bytes`) from a consumer,
    /// waiting up to `wait` for the first one; an empty answer means none
    /// came in time. Messages on encrypted topics are opened; one this
    /// node cannot open is left out (counted in
    /// `macula_e2e_payloads{outcome="no_key"|"refused"}`).
    pub async fn next(
        &self,
        stream: &str,
        consumer: &str,
        batch: usize,
        max_bytes: Option<u64>,
        wait: Duration,
    ) -> Result<Vec<StreamMsg>, StreamError> {
        let msgs = self
            .next_stored(stream, consumer, batch, max_bytes, wait)
            .await?;
        Ok(sealed::open_all(self.0.pubsub.e2e(), msgs))
    }

    /// [`Streams::next`] as stored (sealed, on an encrypted topic).
    pub(crate) async fn next_stored(
        &self,
        stream: &str,
        consumer: &str,
        batch: usize,
        max_bytes: Option<u64>,
        wait: Duration,
    ) -> Result<Vec<StreamMsg>, StreamError> {
        self.pull(stream, consumer, batch, max_bytes, wait, false)
            .await
    }

    /// [`Streams::next`]; `push`: the push task's own pulls (anyone
    /// else's pull of a push consumer is refused).
    async fn pull(
        &self,
        stream: &str,
        consumer: &str,
        batch: usize,
        max_bytes: Option<u64>,
        wait: Duration,
        push: bool,
    ) -> Result<Vec<StreamMsg>, StreamError> {
        if batch == 0 || batch > self.0.limits.max_batch {
            return Err(StreamError::Invalid(format!(
                "batch must be 1..={}",
                self.0.limits.max_batch
            )));
        }
        let h = self.serving(stream)?;
        if !push {
            let core = h.core.lock();
            if let Some(subject) = core
                .consumer(consumer)
                .and_then(|c| c.config().deliver_subject.as_deref())
            {
                return Err(StreamError::Invalid(format!(
                    "consumer {consumer:?} is a push consumer: its messages go to topic {subject:?}"
                )));
            }
        }
        self.0.pulls.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + wait.min(self.0.limits.max_wait);
        loop {
            let notified = h.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.0.clock.now();
            let (picked, wait_until) = {
                let mut core = h.core.lock();
                let mut picked = Vec::new();
                let mut bytes = 0u64;
                let mut wait_until = None;
                while picked.len() < batch {
                    let left = max_bytes.map(|m| m.saturating_sub(bytes));
                    match core.next_within(consumer, now, left)? {
                        Next::Deliver(d) => {
                            bytes += u64::from(d.size);
                            picked.push((d.stream_seq, d.consumer_seq, d.deliveries));
                        }
                        Next::Wait(at) => {
                            wait_until = Some(at);
                            break;
                        }
                        Next::TooBig(size) if picked.is_empty() => {
                            return Err(StreamError::Invalid(format!(
                                "the next message is {size} bytes, over max_bytes"
                            )));
                        }
                        _ => break,
                    }
                }
                (picked, wait_until)
            };
            if !picked.is_empty() {
                self.mark_dirty(&h, consumer);
                let msgs = read(&h, picked).await?;
                self.0
                    .delivered
                    .fetch_add(msgs.len() as u64, Ordering::Relaxed);
                if !msgs.is_empty() {
                    return Ok(msgs);
                }
                // All removed since they were picked (retention): the
                // pull goes on waiting for the next ones.
                continue;
            }
            let mut until = deadline;
            if let Some(at) = wait_until {
                let at = tokio::time::Instant::from_std(self.0.clock.instant(at));
                until = until.min(at);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Acknowledges (or naks, ...) a delivered message.
    pub async fn ack(
        &self,
        stream: &str,
        consumer: &str,
        seq: u64,
        kind: AckKind,
    ) -> Result<(), StreamError> {
        let h = self.serving(stream)?;
        let now = self.0.clock.now();
        {
            let mut core = h.core.lock();
            let removed = match kind {
                AckKind::Ack => core.ack(consumer, seq, now)?,
                AckKind::Term => core.term(consumer, seq, now)?,
                AckKind::Nak(d) => {
                    core.nak(consumer, seq, Millis::from_duration(d), now)?;
                    Vec::new()
                }
                AckKind::InProgress => {
                    core.in_progress(consumer, seq, now)?;
                    Vec::new()
                }
            };
            if !removed.is_empty() {
                // Not waited for: the next write is queued behind it.
                drop(h.submit(vec![Write::Delete(removed)])?);
            }
        }
        self.mark_dirty(&h, consumer);
        if !matches!(kind, AckKind::InProgress) {
            // A nak makes a message due again; an ack or term frees a place
            // under max_ack_pending: a pull (or push task) waiting on a
            // full consumer goes on now, not at its deadline.
            h.changed.notify_waiters();
        }
        Ok(())
    }

    fn mark_dirty(&self, h: &Hosted, consumer: &str) {
        let durable = h
            .core
            .lock()
            .consumer(consumer)
            .is_some_and(|c| c.config().durable.is_some());
        if durable {
            h.dirty.lock().insert(consumer.to_string());
        }
    }

    async fn flush_consumer(&self, h: &Arc<Hosted>, name: &str) -> Result<(), StreamError> {
        let rx = {
            let core = h.core.lock();
            let Some(c) = core.consumer(name) else {
                return Ok(());
            };
            if c.config().durable.is_none() {
                return Ok(());
            }
            let rec = ConsumerRecord {
                config: c.config().clone(),
                state: c.state(),
            };
            let bytes =
                serde_json::to_vec(&rec).map_err(|e| StreamError::Invalid(e.to_string()))?;
            h.submit(vec![Write::Consumer(name.to_string(), Some(bytes))])?
        };
        wait_written(h, rx).await
    }

    /// Writes every durable consumer's position and closes the stores
    /// (at shutdown).
    pub async fn shutdown(&self) {
        let hosted: Vec<Arc<Hosted>> = self.0.hosted.lock().values().cloned().collect();
        for h in hosted {
            h.stop();
            // Nothing changes the stream from here on (publishes and acks
            // still running are refused).
            h.failed
                .lock()
                .get_or_insert_with(|| "the node is shutting down".into());
            flush_dirty(&h);
            // The index as one snapshot, written after every queued write
            // (so it matches what is on disk): the next start reads it
            // instead of every message's head, and removes it before it
            // writes anything (a crash after that falls back to the scan).
            // Not for a replicated stream: a member's core is only rebuilt
            // when it takes office, from the store.
            if h.replica.get().is_none() {
                let index = h.core.lock().state().snapshot();
                if h.store
                    .submit(vec![Write::Index(Some(index))], None)
                    .is_err()
                {
                    tracing::warn!(stream = %h.name, "index snapshot not written: store closed");
                }
            }
            tokio::task::spawn_blocking(move || h.store.close())
                .await
                .ok();
        }
    }

    /// Node-wide counters of replicated streams: (operations forwarded to
    /// a leader, snapshots installed).
    pub fn replication_totals(&self) -> (u64, u64) {
        (
            self.0.forwarded.load(Ordering::Relaxed),
            self.0.installs.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn count_forwarded(&self) {
        self.0.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_install(&self) {
        self.0.installs.fetch_add(1, Ordering::Relaxed);
    }

    /// Every replicated stream this node holds a replica of, with what
    /// `/metrics` shows of it (read from memory: a scrape reads no store).
    pub fn replicas(&self) -> Vec<(String, ReplicaCounters)> {
        self.0
            .hosted
            .lock()
            .iter()
            .filter_map(|(n, h)| {
                let r = h.replica.get()?;
                Some((
                    n.clone(),
                    ReplicaCounters {
                        serving: r.serving(),
                        applied: h.applied.load(Ordering::Acquire),
                        replication_failures: h.replication_failures.load(Ordering::Relaxed),
                        acked_at_commit: h.acked_at_commit.load(Ordering::Relaxed),
                        apply_waits: h.apply_waits.load(Ordering::Relaxed),
                    },
                ))
            })
            .collect()
    }

    /// Node-wide counters: (acknowledged publishes, pulls, messages
    /// delivered).
    pub fn totals(&self) -> (u64, u64, u64) {
        (
            self.0.publishes.load(Ordering::Relaxed),
            self.0.pulls.load(Ordering::Relaxed),
            self.0.delivered.load(Ordering::Relaxed),
        )
    }
}

/// Stream files opened in parallel at a node's start at most.
pub const OPEN_THREADS: usize = 4;

/// A stream [`Streams::open_one`] opened, to host.
struct Opened {
    store: StreamStore,
    stream: Stream,
    messages: u64,
    applied: u64,
    from_index: bool,
    took: Duration,
    store_took: Duration,
}

enum Appending {
    Duplicate(u64),
    Stored(u64, Pending),
}

/// Takes room in the stream store's writer queue for a publish (before the
/// core's lock: a full queue makes the publisher wait, `store.rs`,
/// "Backpressure"); `None` for a replicated stream (its group bounds its
/// proposals).
async fn admit(
    h: &Hosted,
    t: &Topic,
    payload: &[u8],
    headers: &[(String, String)],
    msg_id: Option<&str>,
) -> Result<Option<store::Admission>, StreamError> {
    if h.replicated {
        return Ok(None);
    }
    // What the record will take, close enough (`record.rs`): its fixed
    // head, subject, message ID, headers and payload, plus the put's
    // neighbours (last sequence).
    let bytes = store::JOB_OVERHEAD
        + 23
        + (t.as_str().len()
            + msg_id.map_or(0, str::len)
            + headers
                .iter()
                .map(|(k, v)| 6 + k.len() + v.len())
                .sum::<usize>()
            + payload.len()) as u64;
    Ok(Some(h.store.admit(bytes).await?))
}

/// Appends under the core's lock and queues the write in sequence order
/// (in `room`, if taken: [`admit`]).
fn append(
    h: &Hosted,
    t: &Topic,
    payload: &[u8],
    headers: &[(String, String)],
    msg_id: Option<&str>,
    ttl: Option<Duration>,
    room: Option<store::Admission>,
) -> Result<Appending, StreamError> {
    let now = now_wall();
    let ttl = ttl.map(Millis::from_duration);
    // The record's size is what the stream accounts; its timestamp is only
    // known after the append, so it is encoded with the final one below
    // (the size does not depend on it).
    let probe = record::encode(0, None, t.as_str(), msg_id, headers, payload)
        .map_err(|e| StreamError::Invalid(e.to_string()))?;
    let size = u32::try_from(probe.len()).unwrap_or(u32::MAX);
    let mut core = h.core.lock();
    let out = core.append(
        now,
        Incoming {
            subject: t,
            size,
            msg_id,
            ttl,
        },
    )?;
    match out {
        Appended::Duplicate { seq } => Ok(Appending::Duplicate(seq)),
        Appended::Stored { seq, ts, removed } => {
            let expires = core.state().expires(seq);
            let mut rec = probe;
            rec[1..9].copy_from_slice(&ts.to_le_bytes());
            rec[9..17].copy_from_slice(&expires.unwrap_or(0).to_le_bytes());
            let mut writes = Vec::with_capacity(3);
            // On an interest stream nobody wants, the message is removed at
            // once: it is never written.
            if !removed.contains(&seq) {
                writes.push(Write::Put(seq, rec));
            }
            if !removed.is_empty() {
                writes.push(Write::Delete(removed));
            }
            writes.push(Write::Last(core.state().last_seq(), core.state().last_ts()));
            Ok(Appending::Stored(seq, h.submit_in(writes, room)?))
        }
    }
}

/// `NotLeader` on a member of a replicated stream that does not serve.
fn check_serving(h: &Hosted) -> Result<(), StreamError> {
    match h.replica.get() {
        Some(r) if !r.serving() => Err(StreamError::NotLeader {
            leader: r.group.leader().map(|l| l.to_string()),
        }),
        None if h.replicated => Err(StreamError::NotLeader { leader: None }),
        _ => Ok(()),
    }
}

/// Records one fetch answers at most (a replica installing a snapshot).
pub const FETCH_MAX: usize = 1024;
/// Record bytes one fetch answers at most (beyond its first record).
pub const FETCH_MAX_BYTES: usize = 256 * 1024;
/// How long a member asked for records waits until it has applied the
/// installer's snapshot index ([`Streams::fetch_local`]); less than the
/// call's timeout, so the installer hears why and asks again.
pub const FETCH_APPLIED_WAIT: Duration = Duration::from_secs(5);

/// Waits for a queued write. A failed store write fails the stream; a
/// replicated stream's refused or uncommitted entry is only this write's
/// error.
async fn wait_written(h: &Hosted, pending: Pending) -> Result<(), StreamError> {
    let rx = match pending {
        Pending::Store(rx) => rx,
        Pending::Raft(committed) => {
            let index = committed.await.inspect_err(|_| {
                h.replication_failures.fetch_add(1, Ordering::Relaxed);
                if let Some(r) = h.replica.get() {
                    r.request_resync();
                }
            })?;
            if let Some(index) = index {
                // Committed, maybe not applied here yet: reads from now
                // on wait for its apply (before anyone hears of it).
                h.promised.fetch_max(index, Ordering::AcqRel);
                h.acked_at_commit.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
    };
    // With a sync interval the answer comes from the journal flush that
    // writes this record: this task's, after the other publishes in flight
    // staged theirs (one `pwrite` for them all), unless another's came
    // first.
    h.store.flush_staged().await;
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            h.fail(e.clone());
            Err(StoreError::Io {
                path: h.store.path().to_path_buf(),
                message: e,
            }
            .into())
        }
        Err(_) => Err(StoreError::Closed(h.store.path().to_path_buf()).into()),
    }
}

/// Reads delivered messages from the store: (stream seq, consumer seq,
/// deliveries). A message that left the store meanwhile is skipped.
async fn read(
    h: &Arc<Hosted>,
    picked: Vec<(u64, u64, u32)>,
) -> Result<Vec<StreamMsg>, StreamError> {
    settle_applied(h).await?;
    let h2 = h.clone();
    tokio::task::spawn_blocking(move || {
        let seqs: Vec<u64> = picked.iter().map(|p| p.0).collect();
        // `get_batch` keeps the batch's order and leaves out what is no
        // longer stored (removed since it was picked).
        let mut found = h2.store.get_batch(&seqs)?.into_iter().peekable();
        let mut out = Vec::with_capacity(picked.len());
        for (seq, consumer_seq, deliveries) in picked {
            let Some((_, m)) = found.next_if(|(s, _)| *s == seq) else {
                continue;
            };
            out.push(StreamMsg {
                stream: h2.name.clone(),
                seq,
                consumer_seq,
                deliveries,
                ts: m.ts,
                subject: m.subject,
                headers: m.headers,
                msg_id: m.msg_id,
                payload: m.payload,
            });
        }
        Ok(out)
    })
    .await
    .map_err(|e| StreamError::Invalid(e.to_string()))?
}

/// Waits until this member's store has applied every write of a
/// replicated stream acknowledged at its commit so far (`Hosted::promised`):
/// a read then finds what was acknowledged before it (the store's own
/// `Gate` then waits for its redb commit). Two atomic loads when nothing
/// is pending; at most `store::READ_WAIT`. Asynchronous: the apply is an
/// async task (openraft's state machine worker), so no thread blocks on it.
async fn settle_applied(h: &Hosted) -> Result<(), StreamError> {
    let want = h.promised.load(Ordering::Acquire);
    if h.applied.load(Ordering::Acquire) >= want {
        return Ok(());
    }
    h.apply_waits.fetch_add(1, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + store::READ_WAIT;
    loop {
        let moved = h.applied_moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        if h.applied.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        h.check()?;
        if tokio::time::timeout_at(deadline, moved).await.is_err() {
            return Err(StreamError::Replication(format!(
                "writes acknowledged at their commit not applied here within {:?}",
                store::READ_WAIT
            )));
        }
    }
}

/// Removes the journal beside a store file being removed (there is none
/// beside a file from before journals).
fn remove_journal(store: &std::path::Path) -> Result<(), StoreError> {
    let path = journal::path_of(store);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
            path,
            message: e.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Raises the consumers' visibility bound as group commits land.
async fn visibility(h: std::sync::Weak<Hosted>) {
    let Some(mut durable) = h.upgrade().map(|h| h.store.durable()) else {
        return;
    };
    loop {
        let d = *durable.borrow_and_update();
        {
            let Some(h) = h.upgrade() else { return };
            h.core.lock().set_visible_upto(d);
            h.changed.notify_waiters();
        }
        if durable.changed().await.is_err() {
            return;
        }
    }
}

/// Captures the events published on one of the stream's subjects.
async fn capture(h: std::sync::Weak<Hosted>, mut sub: crate::pubsub::Subscription) {
    while let Some(item) = sub.recv().await {
        let Some(h) = h.upgrade() else { return };
        match item {
            // The stream's own republished events (header `macula-stream:
            // <name>`) are not queued to this subscription at all.
            SubscriptionItem::Event(e) => {
                if h.check().is_err() {
                    h.capture_lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Ok(t) = Topic::new(e.topic.as_str()) else {
                    continue;
                };
                // A full writer queue holds the capture (its subscription
                // queue then drops its oldest events, counted below).
                let room = match admit(&h, &t, &e.payload, &e.headers, e.message_id.as_deref())
                    .await
                {
                    Ok(r) => r,
                    Err(err) => {
                        h.capture_lost.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(stream = %h.name, topic = %e.topic, error = %err, "captured event not stored");
                        continue;
                    }
                };
                match append(
                    &h,
                    &t,
                    &e.payload,
                    &e.headers,
                    e.message_id.as_deref(),
                    None,
                    room,
                ) {
                    Ok(Appending::Stored(_, rx)) => {
                        // Nobody waits; a failed write fails the stream.
                        let h2 = h.clone();
                        tokio::spawn(async move {
                            let _ = wait_written(&h2, rx).await;
                        });
                    }
                    Ok(Appending::Duplicate(_)) => {}
                    Err(err) => {
                        tracing::debug!(stream = %h.name, topic = %e.topic, error = %err, "captured event not stored");
                    }
                }
            }
            SubscriptionItem::Lagged(n) => {
                h.capture_lost.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(stream = %h.name, lost = n, "stream capture fell behind: events lost before they were stored");
            }
        }
    }
}

/// Runs the stream's timers: expiry, ack waits, idle consumers, and the
/// durable consumers' positions.
async fn timers(h: std::sync::Weak<Hosted>, limits: StreamLimits, clock: Clock) {
    let mut last_flush = tokio::time::Instant::now();
    loop {
        let sleep = {
            let Some(h) = h.upgrade() else { return };
            let core = h.core.lock();
            let mut d = limits.tick;
            if let Some(at) = core.state().next_expiry() {
                d = d.min(Duration::from_millis(at.saturating_sub(now_wall())));
            }
            if let Some(at) = core.poll_timeout() {
                d = d.min(at.saturating_sub(clock.now()).to_duration());
            }
            d
        };
        tokio::time::sleep(sleep).await;
        let Some(h) = h.upgrade() else { return };
        let now = clock.now();
        let (removed, woke) = {
            let mut core = h.core.lock();
            let mut removed = core.expire(now_wall());
            let exhausted = core.handle_timeout(now);
            for (consumer, e) in &exhausted {
                tracing::warn!(stream = %h.name, consumer = %consumer, seq = e.stream_seq, deliveries = e.deliveries, "message given up after max_deliver deliveries");
            }
            let (idle, gone) = core.remove_inactive(now);
            for n in &idle {
                tracing::debug!(stream = %h.name, consumer = %n, "idle ephemeral consumer removed");
            }
            removed.extend(gone);
            let woke = core.has_redeliveries();
            (removed, woke)
        };
        if !removed.is_empty() {
            match h.submit(vec![Write::Delete(removed)]) {
                Ok(_) => {}
                // A replica that just left office: the new leader expires.
                Err(StreamError::NotLeader { .. }) => {}
                Err(e) => h.fail(format!("expired messages not removed: {e}")),
            }
        }
        if woke {
            h.changed.notify_waiters();
        }
        if last_flush.elapsed() >= limits.flush_every {
            flush_dirty(&h);
            last_flush = tokio::time::Instant::now();
        }
    }
}

/// Queues the positions of the durable consumers that changed.
fn flush_dirty(h: &Hosted) {
    let names: Vec<String> = std::mem::take(&mut *h.dirty.lock()).into_iter().collect();
    if names.is_empty() {
        return;
    }
    let core = h.core.lock();
    let writes: Vec<Write> = names
        .into_iter()
        .filter_map(|n| {
            let c = core.consumer(&n)?;
            let rec = ConsumerRecord {
                config: c.config().clone(),
                state: c.state(),
            };
            serde_json::to_vec(&rec)
                .ok()
                .map(|b| Write::Consumer(n, Some(b)))
        })
        .collect();
    if let Err(e) = h.submit(writes) {
        tracing::warn!(stream = %h.name, error = %e, "consumer positions not written");
    }
}
