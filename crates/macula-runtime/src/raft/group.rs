//! One Raft group on this node: the openraft instance, its store, the
//! forwarding of client requests to the leader, the leader's lease timers,
//! the leadership watch and the election watchdog (`watchdog.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use macula_raft::openraft::error::{
    CheckIsLeaderError, ClientWriteError, Fatal, ForwardToLeader, RaftError,
};
use macula_raft::openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, ClientWriteResponse, ClientWriteResult,
    InstallSnapshotRequest,
};
use macula_raft::openraft::{ChangeMembers, Config, EmptyNode, ServerState, SnapshotPolicy};
use macula_raft::{
    Event, KeyValue, KvError, MemberId, Raft, Request, Response, StateMachineStore, TypeConfig,
};
use macula_wire::{NodeId, RaftKind, RaftResponse, RaftStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::network::{decode, encode, MeshNetworkFactory, Transport, TransportError};
use super::watchdog::{Heard, Timing, Watchdog};
use super::RaftLimits;

/// Longest group name; names are `[A-Za-z0-9._-]` (they name files).
pub const MAX_GROUP_NAME_LEN: usize = macula_wire::raft::MAX_RAFT_GROUP_LEN;

/// Bytes of a frame that are not a value's: the largest key (4 KiB), the
/// entry's and the request's framing, with room to spare.
const ENTRY_OVERHEAD: usize = 8 * 1024;

/// How a group was asked to start.
#[derive(Clone, Default)]
pub struct GroupOptions {
    /// The founding voters. A node in this list with an empty log
    /// initializes the group with exactly these voters unless a leader's
    /// membership reaches it first: the lowest ID after two heartbeats,
    /// the others after two election timeouts (all founders may, with the
    /// same list). Empty: join an existing group, as a learner
    /// until the leader promotes this node.
    pub members: Vec<NodeId>,
    /// The state machine of the group's opaque entries (a replicated
    /// stream's store), set before openraft applies anything.
    pub applier: Option<Arc<dyn macula_raft::Applier>>,
    /// The log's sync interval (`macula_raft::Options::log_sync_interval`;
    /// a replicated stream's `sync_interval`). `None`: every log write is
    /// synced before it is acknowledged.
    pub log_sync_interval: Option<Duration>,
}

/// Initializes a founder's group with `founders` after `grace`, unless it
/// is initialized by then (the membership came from a leader, or a
/// restart found it in the log). Errors are another founder's success or
/// a group that stopped meanwhile: logged at debug.
async fn initialize_unless_joined(
    raft: Raft,
    founders: BTreeSet<MemberId>,
    grace: Duration,
    name: Arc<str>,
) {
    if !grace.is_zero() {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match raft.is_initialized().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(group = %name, error = %e, "raft stopped before its initialization");
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(INIT_POLL).await;
        }
        tracing::debug!(group = %name, "no leader replicated the membership in time: initializing");
    }
    if let Err(e) = raft.initialize(founders).await {
        // Another founder got there first: that is the goal.
        tracing::debug!(group = %name, error = %e, "raft initialize");
    }
}

/// How often a founder waiting to initialize looks whether a leader's
/// membership reached it.
const INIT_POLL: Duration = Duration::from_millis(10);

impl std::fmt::Debug for GroupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupOptions")
            .field("members", &self.members)
            .field("applier", &self.applier.is_some())
            .field("log_sync_interval", &self.log_sync_interval)
            .finish()
    }
}

/// Who leads a group, as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderState {
    /// The leader this member follows (itself included), if it knows one.
    pub leader: Option<NodeId>,
    /// The Raft term.
    pub term: u64,
    /// Voting members.
    pub voters: Vec<NodeId>,
    /// Non-voting members (catching up, or kept as read replicas).
    pub learners: Vec<NodeId>,
    /// This node is the leader.
    pub is_leader: bool,
}

/// Where this member's log and state machine are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogProgress {
    /// Index of the last entry in the log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to the state machine.
    pub last_applied: Option<u64>,
    /// Index the last snapshot covers (built here or installed from the
    /// leader).
    pub snapshot: Option<u64>,
    /// Entries up to here were purged from the log (covered by a snapshot).
    pub purged: Option<u64>,
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Linearizable: the leader confirms it still leads (ReadIndex, one
    /// heartbeat round to a quorum) and answers once its state machine has
    /// applied everything committed before the read began.
    #[default]
    Linearizable,
    /// This member's own state machine, possibly behind the leader.
    Stale,
}

/// Why a group operation failed. Serializable: the facade carries it to
/// callers that reach a group through RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GroupError {
    #[error("a Raft group needs a data directory (its log must survive a restart); this node runs without one")]
    NoDataDir,
    #[error("invalid group name {0:?}: 1 to 128 characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("this node already runs {max} Raft groups (raft_max_groups)")]
    TooManyGroups { max: usize },
    #[error("the group's store failed: {0}")]
    Store(String),
    #[error("no leader answered within {0:?} (no quorum reachable, or an election is under way)")]
    NoLeader(Duration),
    #[error("the request was sent to the leader {leader} but no answer came back in time: it may or may not have been applied")]
    Uncertain { leader: NodeId },
    #[error("the key-value request failed: {0}")]
    Kv(KvError),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("the group has stopped: {0}")]
    Stopped(String),
    #[error("no lease {0} (expired or revoked)")]
    NoLease(u64),
    /// Only the leader proposes this way; the leader as this member knows
    /// it.
    #[error("this member is not the group's leader (leader: {0:?})")]
    NotLeader(Option<NodeId>),
    /// The proposer's queue is full (4,096 writes wait already).
    #[error("the group's proposal queue is full")]
    Busy,
}

/// Checks a group name: 1 to [`MAX_GROUP_NAME_LEN`] bytes of
/// `A-Z a-z 0-9 . _ -`, not starting with `.` (it names the group's file).
pub fn check_name(name: &str) -> Result<(), GroupError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_GROUP_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(GroupError::BadName(name.to_string()))
    }
}

/// A read the leader serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ReadOp {
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Range {
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        limit: usize,
    },
}

/// The answer to a read: the state machine's revision when it was served.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReadAnswer {
    pub revision: u64,
    pub kvs: Vec<KeyValue>,
}

/// A membership change the leader makes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum MembershipOp {
    AddLearner(NodeId),
    AddVoter(NodeId),
    Remove(NodeId),
}

/// What a member asks the leader for.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Write(Request),
    Read(ReadOp),
    Membership(MembershipOp),
    KeepAlive(u64),
}

impl Op {
    fn kind(&self) -> RaftKind {
        match self {
            Op::Write(_) => RaftKind::Write,
            Op::Read(_) => RaftKind::Read,
            Op::Membership(_) => RaftKind::Membership,
            Op::KeepAlive(_) => RaftKind::KeepAlive,
        }
    }

    fn body(&self) -> Result<Vec<u8>, TransportError> {
        match self {
            Op::Write(r) => encode(r),
            Op::Read(r) => encode(r),
            Op::Membership(m) => encode(m),
            Op::KeepAlive(id) => encode(id),
        }
    }

    fn decode(kind: RaftKind, body: &[u8]) -> Option<Op> {
        match kind {
            RaftKind::Write => decode(body).ok().map(Op::Write),
            RaftKind::Read => decode(body).ok().map(Op::Read),
            RaftKind::Membership => decode(body).ok().map(Op::Membership),
            RaftKind::KeepAlive => decode(body).ok().map(Op::KeepAlive),
            _ => None,
        }
    }
}

/// Why the leader-side of an `Op` did not produce an answer.
enum LocalError {
    /// Not (or no longer) the leader: nothing was proposed.
    NotLeader(Option<NodeId>),
    Failed(GroupError),
}

/// One group. Cheap to clone.
#[derive(Clone)]
pub struct Group(Arc<Inner>);

struct Inner {
    name: Arc<str>,
    me: NodeId,
    raft: Raft,
    sm: StateMachineStore,
    transport: Transport,
    timeout: Duration,
    leader: watch::Receiver<LeaderState>,
    /// The leader's lease deadlines (empty on followers).
    leases: Mutex<HashMap<u64, Instant>>,
    stop: watch::Sender<bool>,
    /// Writes waiting for the proposer (`propose`), which puts everything
    /// queued while the previous entry was being committed into one entry.
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    /// The largest batch entry, in bytes of keys and values (well inside a
    /// frame: an entry travels in one AppendEntries).
    batch_bytes: usize,
    /// Entries the proposer has on their way at most
    /// (`RaftLimits::proposals_in_flight`): one permit each, the
    /// proposer's and a writer's handed directly alike.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Proposals queued for the proposer and not yet handed to openraft
    /// (lowered once they are): while there are any, a write may not be
    /// handed to openraft directly ([`Group::propose_committed`]), or it
    /// could overtake them.
    queued: std::sync::atomic::AtomicUsize,
    /// News of a leader, for the election watchdog.
    heard: Arc<Heard>,
    /// Sets this member's log sync interval.
    log_sync: macula_raft::LogSyncInterval,
    /// Writes answered at their commit wait here (`macula_raft::commit`).
    commits: Arc<macula_raft::Commits>,
    /// How far this member's log is on disk.
    durable: macula_raft::Durable,
    /// openraft's answers to writes answered at their commit, kept until
    /// openraft sends them (the apply's answer to a dropped receiver is a
    /// warning in openraft's log); the sent ones are dropped whenever one
    /// more is kept.
    unanswered: Mutex<Vec<RaftAnswer>>,
}

/// openraft's answer to one entry (`client_write_ff`'s receiver).
type RaftAnswer = tokio::sync::oneshot::Receiver<ClientWriteResult<TypeConfig>>;

/// Why openraft did not commit a write.
type WriteError = RaftError<MemberId, ClientWriteError<MemberId, EmptyNode>>;

/// A write waiting to be proposed.
struct Proposal {
    request: Request,
    answer: tokio::sync::oneshot::Sender<Answer>,
}

/// openraft's answer to one entry, as the proposer got it
/// (`client_write_ff`).
type Committed = Result<RaftAnswer, Box<Fatal<MemberId>>>;

/// Waits for openraft's answer to one entry (after its apply).
async fn raft_answer(committed: Committed) -> Result<ClientWriteResponse<TypeConfig>, WriteError> {
    match committed {
        Err(fatal) => Err(RaftError::Fatal(*fatal)),
        Ok(rx) => raft_result(rx.await),
    }
}

/// openraft's answer as received (openraft's error type is what it is).
#[allow(clippy::result_large_err)]
fn raft_result(
    r: Result<ClientWriteResult<TypeConfig>, tokio::sync::oneshot::error::RecvError>,
) -> Result<ClientWriteResponse<TypeConfig>, WriteError> {
    macula_raft::probe::mark(macula_raft::probe::Phase::ProposerAnswered);
    match r {
        Ok(Ok(w)) => Ok(w),
        Ok(Err(e)) => Err(RaftError::APIError(e)),
        Err(_) => Err(RaftError::Fatal(Fatal::Stopped)),
    }
}

/// What the proposer tells a writer.
enum Answer {
    /// Its result (a write of a batch entry, or one openraft refused).
    Done(Box<Result<Response, WriteError>>),
    /// Its entry, its own, was handed to openraft: the writer awaits
    /// openraft's answer itself (one task hand-off less between the commit
    /// and the writer), holding the proposer's slot until then. A writer
    /// that stops waiting frees the slot early.
    Own(Committed, tokio::sync::OwnedSemaphorePermit),
}

impl Answer {
    /// The write's result.
    async fn result(self) -> Result<Response, WriteError> {
        match self {
            Answer::Done(r) => *r,
            Answer::Own(committed, permit) => {
                let r = raft_answer(committed).await.map(|w| w.data);
                drop(permit);
                r
            }
        }
    }
}

/// openraft's answer to a queued write, after the apply.
async fn applied(rx: tokio::sync::oneshot::Receiver<Answer>) -> Result<Proposed, GroupError> {
    let Ok(answer) = rx.await else {
        return Err(stopped());
    };
    answer
        .result()
        .await
        .map(Proposed::Applied)
        .map_err(group_error)
}

/// Where a write proposed with [`Group::propose_committed`] went.
enum Start {
    /// To openraft directly (`Group::hand_directly`).
    Direct((Committed, tokio::sync::OwnedSemaphorePermit)),
    /// To the proposer's queue.
    Queued(tokio::sync::oneshot::Receiver<Answer>),
}

/// How a write proposed with [`Group::propose_committed`] was answered.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Proposed {
    /// Committed (on a majority's log, this member's included), at this
    /// log index; not yet known applied here.
    Committed(u64),
    /// Applied here, with the state machine's answer (a payload that is
    /// not tagged, or whose commit this member's log store did not see).
    Applied(Response),
}

/// Writes in one batch entry at most.
const MAX_BATCH: usize = 1024;

/// Bytes of a request's keys and values, to bound a batch.
fn request_bytes(r: &Request) -> usize {
    64 + match r {
        Request::Put { key, value, .. }
        | Request::Cas { key, value, .. }
        | Request::PutIfAbsent { key, value, .. } => key.len() + value.len(),
        Request::Delete { key, .. } => key.len(),
        Request::Register {
            name, capabilities, ..
        } => name.len() + capabilities.iter().map(String::len).sum::<usize>(),
        Request::Unregister { name, .. } => name.len(),
        Request::Batch(v) => v.iter().map(request_bytes).sum(),
        Request::Opaque(b) => b.as_bytes().len(),
        Request::LeaseGrant { .. } | Request::LeaseRevoke { .. } => 0,
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("name", &self.0.name).finish()
    }
}

fn ids(set: impl IntoIterator<Item = MemberId>) -> Vec<NodeId> {
    set.into_iter().map(|m| m.0).collect()
}

impl Group {
    pub(crate) async fn open(
        me: NodeId,
        name: &str,
        dir: &Path,
        limits: &RaftLimits,
        transport: Transport,
        options: GroupOptions,
    ) -> Result<Group, GroupError> {
        let max_frame = transport.max_frame;
        std::fs::create_dir_all(dir)
            .map_err(|e| GroupError::Store(format!("{}: {e}", dir.display())))?;
        let store = macula_raft::Options {
            limits: macula_raft::Limits {
                // A value travels in one log entry, and an entry in one frame.
                max_value_bytes: (max_frame as usize).saturating_sub(ENTRY_OVERHEAD),
                ..macula_raft::Limits::default()
            },
            // The log is fsynced; the state machine is rebuilt from the
            // last snapshot and the log after a crash, so its own commits
            // need not wait for the disk (one fsync per write batch, not two).
            durable_apply: false,
            // The leader's appends overlap its fsync with replication.
            member: Some(MemberId(me)),
            log_sync_interval: options.log_sync_interval,
            ..macula_raft::Options::default()
        };
        let (log, sm) = macula_raft::open_with(&dir.join(format!("{name}.redb")), store)
            .map_err(|e| GroupError::Store(e.to_string()))?;
        if let Some(applier) = options.applier.clone() {
            sm.set_applier(applier);
        }
        let heartbeat = limits.heartbeat.as_millis().max(1) as u64;
        let election = limits.election_min.as_millis().max(2) as u64;
        let config = Config {
            cluster_name: name.to_string(),
            heartbeat_interval: heartbeat,
            election_timeout_min: election,
            election_timeout_max: election * 2,
            // Chunks well inside the default 1 MiB frame.
            snapshot_max_chunk_size: 256 * 1024,
            max_payload_entries: 256,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(limits.snapshot_every),
            max_in_snapshot_log_to_keep: limits.log_kept_after_snapshot,
            ..Config::default()
        }
        .validate()
        .map_err(|e| GroupError::Store(format!("raft config: {e}")))?;
        let log_sync = log.sync_interval();
        let commits = log.commits();
        let durable = log.durable();
        let heard = Arc::new(Heard::new());
        let factory = MeshNetworkFactory {
            transport: transport.clone(),
            group: Arc::from(name),
            durable: log.durable(),
            heard: heard.clone(),
        };
        let raft = Raft::new(MemberId(me), Arc::new(config), factory, log, sm.clone())
            .await
            .map_err(|e| GroupError::Stopped(e.to_string()))?;
        if options.members.contains(&me) {
            let founders: BTreeSet<MemberId> =
                options.members.iter().copied().map(MemberId).collect();
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| GroupError::Stopped(e.to_string()))?;
            if !initialized {
                // openraft's `initialize` starts an election: from a
                // founder that joined after the others had elected a
                // leader, it unseated that leader (a new replicated
                // stream lost its leader for up to 1.5 s in one bench run
                // in six). So a founder initializes only if no leader's
                // membership reached it within a grace: two heartbeats
                // for the lowest ID (a leader elsewhere tries a member
                // without the group every 20 ms), two election timeouts
                // for the others (that founder down or late).
                let first = founders.first() == Some(&MemberId(me));
                let grace = if first {
                    2 * limits.heartbeat
                } else {
                    2 * limits.election_min
                };
                tokio::spawn(initialize_unless_joined(
                    raft.clone(),
                    founders,
                    grace,
                    Arc::from(name),
                ));
            }
        }
        let (leader_tx, leader_rx) = watch::channel(LeaderState::default());
        let (stop, _) = watch::channel(false);
        let (proposals, proposals_rx) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
        let g = Group(Arc::new(Inner {
            name: Arc::from(name),
            me,
            raft,
            sm,
            transport,
            timeout: limits.request_timeout,
            leader: leader_rx,
            leases: Mutex::new(HashMap::new()),
            stop,
            proposals,
            batch_bytes: (max_frame as usize / 2).max(1),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                limits.proposals_in_flight.max(1),
            )),
            queued: std::sync::atomic::AtomicUsize::new(0),
            heard: heard.clone(),
            log_sync,
            commits,
            durable,
            unanswered: Mutex::new(Vec::new()),
        }));
        tokio::spawn(g.clone().propose(proposals_rx));
        tokio::spawn(g.clone().watch_leadership(leader_tx));
        tokio::spawn(g.clone().expire_leases());
        tokio::spawn(
            Watchdog {
                raft: g.0.raft.clone(),
                me: MemberId(me),
                group: g.0.name.clone(),
                heard,
                timing: Timing::new(election, heartbeat),
                counters: g.0.transport.counters.clone(),
                stop: g.0.stop.subscribe(),
            }
            .run(),
        );
        tracing::info!(group = name, "raft group running");
        Ok(g)
    }

    /// How long a request waits for its answer (`raft_request_timeout`).
    pub fn request_timeout(&self) -> Duration {
        self.0.timeout
    }

    /// Changes this member's log sync interval
    /// ([`GroupOptions::log_sync_interval`]).
    pub fn set_log_sync_interval(&self, interval: Option<Duration>) {
        self.0.log_sync.set(interval);
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The current leadership as this member sees it.
    pub fn leader_state(&self) -> LeaderState {
        self.0.leader.borrow().clone()
    }

    /// The leader this member knows, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.0.leader.borrow().leader
    }

    /// This node leads the group.
    pub fn is_leader(&self) -> bool {
        self.0.leader.borrow().is_leader
    }

    /// Leadership changes: the receiver holds the current state at once
    /// (`borrow`) and wakes on every change.
    pub fn watch_leader(&self) -> watch::Receiver<LeaderState> {
        self.0.leader.clone()
    }

    /// Where this member's log, state machine and snapshot are.
    pub fn progress(&self) -> LogProgress {
        let m = self.0.raft.metrics();
        let m = m.borrow();
        LogProgress {
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot: m.snapshot.map(|l| l.index),
            purged: m.purged.map(|l| l.index),
        }
    }

    /// The state machine's revision on this member.
    pub fn local_revision(&self) -> u64 {
        self.0.sm.revision()
    }

    /// Watches keys under `prefix` from revision `from` (0: from now): the
    /// events since `from` that this member still holds, then every later
    /// one. Served from this member's state machine (events arrive as this
    /// member applies them). Fails with `KvError::Compacted` when `from` is
    /// older than the history kept.
    pub fn watch(
        &self,
        prefix: &[u8],
        from: u64,
    ) -> Result<(Vec<Event>, macula_raft::store::EventReceiver), GroupError> {
        self.0.sm.watch(prefix, from).map_err(GroupError::Kv)
    }

    /// Proposes `req` (through the leader) and returns its result once it is
    /// committed and applied. Retried on a leader change only while nothing
    /// was proposed; an answer lost after it was sent is `Uncertain`.
    pub async fn write(&self, req: Request) -> Result<Response, GroupError> {
        let answer = self.on_leader(Op::Write(req)).await?;
        decode(&answer).map_err(|e| GroupError::Stopped(e.to_string()))
    }

    /// Reads `key`.
    pub async fn get(
        &self,
        key: &[u8],
        consistency: ReadConsistency,
    ) -> Result<(u64, Option<KeyValue>), GroupError> {
        let (rev, mut kvs) = self
            .read(ReadOp::Get { key: key.to_vec() }, consistency)
            .await?;
        Ok((rev, kvs.pop()))
    }

    /// Reads up to `limit` keys under `prefix`, in key order.
    pub async fn range(
        &self,
        prefix: &[u8],
        limit: usize,
        consistency: ReadConsistency,
    ) -> Result<(u64, Vec<KeyValue>), GroupError> {
        self.read(
            ReadOp::Range {
                prefix: prefix.to_vec(),
                limit,
            },
            consistency,
        )
        .await
    }

    async fn read(
        &self,
        op: ReadOp,
        consistency: ReadConsistency,
    ) -> Result<(u64, Vec<KeyValue>), GroupError> {
        let a = match consistency {
            ReadConsistency::Stale => self.read_local(&op),
            ReadConsistency::Linearizable => {
                let answer = self.on_leader(Op::Read(op)).await?;
                decode::<ReadAnswer>(&answer).map_err(|e| GroupError::Stopped(e.to_string()))?
            }
        };
        Ok((a.revision, a.kvs))
    }

    fn read_local(&self, op: &ReadOp) -> ReadAnswer {
        let sm = &self.0.sm;
        match op {
            ReadOp::Get { key } => ReadAnswer {
                revision: sm.revision(),
                kvs: sm.get(key).into_iter().collect(),
            },
            ReadOp::Range { prefix, limit } => ReadAnswer {
                revision: sm.revision(),
                kvs: sm.range(prefix, *limit),
            },
        }
    }

    /// Keeps lease `id` alive for another full TTL; its TTL in ms.
    pub async fn keep_alive(&self, id: u64) -> Result<u64, GroupError> {
        let answer = self.on_leader(Op::KeepAlive(id)).await?;
        let ttl: Option<u64> = decode(&answer).map_err(|e| GroupError::Stopped(e.to_string()))?;
        ttl.ok_or(GroupError::NoLease(id))
    }

    /// Adds `id` as a learner (it replicates but does not vote). Returns
    /// once it has caught up with the leader's log.
    pub async fn add_learner(&self, id: NodeId) -> Result<(), GroupError> {
        self.on_leader(Op::Membership(MembershipOp::AddLearner(id)))
            .await
            .map(drop)
    }

    /// Adds `id` as a voter: first as a learner until it has caught up, then
    /// promoted (joint consensus).
    pub async fn add_voter(&self, id: NodeId) -> Result<(), GroupError> {
        self.on_leader(Op::Membership(MembershipOp::AddVoter(id)))
            .await
            .map(drop)
    }

    /// Removes `id` from the group (voter or learner).
    pub async fn remove(&self, id: NodeId) -> Result<(), GroupError> {
        self.on_leader(Op::Membership(MembershipOp::Remove(id)))
            .await
            .map(drop)
    }

    /// Turns openraft's own election timer off or on (on by default). With
    /// it off, only the election watchdog starts elections: the tests use
    /// this to show that the watchdog alone replaces a lost leader.
    #[doc(hidden)]
    pub fn set_election_timer(&self, on: bool) {
        self.0.raft.runtime_config().elect(on);
    }

    pub(crate) async fn shutdown(&self) {
        let _ = self.0.stop.send(true);
        if let Err(e) = self.0.raft.shutdown().await {
            tracing::debug!(group = %self.0.name, error = %e, "raft shutdown");
        }
    }

    /// Runs `op` on the leader: here when this node leads, else forwarded.
    /// Queues `request` for the proposer now, in call order (a replicated
    /// stream proposes under its core's lock, so its log order is its
    /// sequence order); the future answers once the entry is committed and
    /// applied here. Only on the leader; a full queue is refused at once.
    pub(crate) fn propose_now(
        &self,
        request: Request,
    ) -> Result<impl std::future::Future<Output = Result<Response, GroupError>> + Send, GroupError>
    {
        let rx = self.enqueue(request)?;
        Ok(async move {
            let Ok(answer) = rx.await else {
                return Err(stopped());
            };
            answer.result().await.map_err(group_error)
        })
    }

    /// [`Group::propose_now`] answered at the commit: an opaque payload
    /// is tagged (`macula_raft::commit`), and the future answers
    /// [`Proposed::Committed`] with the entry's log index as soon as this
    /// member's log store sees it committed and its own copy is on disk,
    /// before the state machine applies it. The caller must make reads of
    /// what it wrote wait for the apply. When the commit is not seen (the
    /// entry left the log, leadership moved) the answer is openraft's, after
    /// the apply ([`Proposed::Applied`]) or its error.
    pub(crate) fn propose_committed(
        &self,
        mut request: Request,
    ) -> Result<impl std::future::Future<Output = Result<Proposed, GroupError>> + Send, GroupError>
    {
        let ticket = match &mut request {
            Request::Opaque(p) => Some(self.0.commits.tag(p, self.0.durable.clone())),
            _ => None,
        };
        let start = if ticket.is_some() {
            match self.hand_directly(request) {
                Ok(own) => Start::Direct(own),
                Err(request) => Start::Queued(self.enqueue(request)?),
            }
        } else {
            Start::Queued(self.enqueue(request)?)
        };
        let g = self.clone();
        Ok(async move {
            let (mut ticket, mut rx) = match (ticket, start) {
                (Some(ticket), Start::Queued(rx)) => (ticket, rx),
                (Some(mut ticket), Start::Direct((committed, permit))) => {
                    return g.own_answer(&mut ticket, committed, permit).await;
                }
                (None, Start::Queued(rx)) => return applied(rx).await,
                (None, Start::Direct(_)) => return Err(stopped()),
            };
            // The proposer's answer (right after openraft took the entry),
            // or the commit if it comes first (a batch entry's writers
            // hear from the proposer only after the apply).
            let first = tokio::select! {
                biased;
                c = ticket.committed() => Err(c),
                a = &mut rx => Ok(a),
            };
            let answer = match first {
                Err(Ok(id)) => {
                    g.forget_answer(rx);
                    g.0.transport.counters.answered_at_commit_total.inc();
                    return Ok(Proposed::Committed(id.index));
                }
                // Not seen: openraft answers.
                Err(Err(_)) => return applied(rx).await,
                Ok(Err(_)) => return Err(stopped()),
                Ok(Ok(answer)) => answer,
            };
            match answer {
                Answer::Done(r) => (*r).map(Proposed::Applied).map_err(group_error),
                Answer::Own(committed, permit) => {
                    g.own_answer(&mut ticket, committed, permit).await
                }
            }
        })
    }

    /// Hands a lone write to openraft directly, without the proposer's
    /// task hop, when nothing is queued for the proposer (log order stays
    /// call order: everything queued before is in openraft's queue
    /// already) and an in-flight slot is free; else gives it back. The
    /// caller serializes its writes (a stream's core lock), as for
    /// [`Group::propose_now`].
    fn hand_directly(
        &self,
        request: Request,
    ) -> Result<(Committed, tokio::sync::OwnedSemaphorePermit), Request> {
        use futures::FutureExt;
        if !self.is_leader() || self.0.queued.load(Ordering::Acquire) > 0 {
            return Err(request);
        }
        let Ok(permit) = self.0.in_flight.clone().try_acquire_owned() else {
            return Err(request);
        };
        macula_raft::probe::mark(macula_raft::probe::Phase::ProposerTook);
        // An unbounded channel send: ready at once unless openraft's core
        // has stopped (then it waits for the core's error, which this
        // does not: the group has stopped either way).
        let committed = self
            .0
            .raft
            .client_write_ff(request)
            .now_or_never()
            .unwrap_or(Err(Fatal::Stopped))
            .map_err(Box::new);
        macula_raft::probe::mark(macula_raft::probe::Phase::RaftTook);
        self.0.transport.counters.proposed_directly_total.inc();
        Ok((committed, permit))
    }

    /// Awaits a lone entry's answer: the commit as the log store sees it
    /// (`ticket`), or openraft's after the apply if that comes first or
    /// the commit is not seen. Holds the in-flight slot until then.
    async fn own_answer(
        &self,
        ticket: &mut macula_raft::CommitTicket,
        committed: Committed,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Proposed, GroupError> {
        let mut orx = match committed {
            Ok(orx) => orx,
            Err(fatal) => return Err(group_error(RaftError::Fatal(*fatal))),
        };
        let seen = tokio::select! {
            biased;
            c = ticket.committed() => c.ok(),
            // openraft answered first (the apply ran before this task).
            r = &mut orx => {
                drop(permit);
                return raft_result(r).map(|w| Proposed::Applied(w.data)).map_err(group_error);
            }
        };
        match seen {
            Some(id) => {
                // The slot is free at the commit: the next entry is on
                // its way while this one is applied.
                drop(permit);
                self.keep_answer(orx);
                self.0.transport.counters.answered_at_commit_total.inc();
                Ok(Proposed::Committed(id.index))
            }
            None => {
                let r = raft_answer(Ok(orx)).await;
                drop(permit);
                r.map(|w| Proposed::Applied(w.data)).map_err(group_error)
            }
        }
    }

    /// Queues `request` for the proposer (only on the leader).
    fn enqueue(
        &self,
        request: Request,
    ) -> Result<tokio::sync::oneshot::Receiver<Answer>, GroupError> {
        if !self.is_leader() {
            return Err(GroupError::NotLeader(self.leader()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.queued.fetch_add(1, Ordering::AcqRel);
        self.0
            .proposals
            .try_send(Proposal {
                request,
                answer: tx,
            })
            .map_err(|e| {
                self.0.queued.fetch_sub(1, Ordering::AcqRel);
                match e {
                    tokio::sync::mpsc::error::TrySendError::Full(_) => GroupError::Busy,
                    tokio::sync::mpsc::error::TrySendError::Closed(_) => stopped(),
                }
            })?;
        Ok(rx)
    }

    /// Keeps openraft's answer to a write answered at its commit until
    /// openraft sends it (see `Inner::unanswered`).
    fn keep_answer(&self, mut rx: RaftAnswer) {
        if !matches!(
            rx.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ) {
            return;
        }
        let mut kept = self.0.unanswered.lock();
        kept.retain_mut(|r| {
            matches!(
                r.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            )
        });
        kept.push(rx);
    }

    /// The writer answered at the commit before the proposer's answer
    /// came: openraft's receiver, if the proposer sent it, is kept (the
    /// proposer keeps it itself once the channel is closed).
    fn forget_answer(&self, mut rx: tokio::sync::oneshot::Receiver<Answer>) {
        rx.close();
        if let Ok(Answer::Own(Ok(orx), _permit)) = rx.try_recv() {
            self.keep_answer(orx);
        }
    }

    /// Returns once this member leads and has applied every entry
    /// committed before (`ensure_linearizable`): a new leader's state
    /// machine is then complete.
    pub(crate) async fn barrier(&self) -> Result<(), GroupError> {
        match self.0.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(GroupError::NotLeader(f.leader_id.map(|m| m.0)))
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                Err(GroupError::NoLeader(self.0.timeout))
            }
            Err(RaftError::Fatal(f)) => Err(GroupError::Stopped(f.to_string())),
        }
    }

    /// Retries (until the request timeout) while the leader is unknown,
    /// unreachable or has just stepped down, i.e. while nothing was
    /// proposed.
    async fn on_leader(&self, op: Op) -> Result<Vec<u8>, GroupError> {
        let deadline = Instant::now() + self.0.timeout;
        let mut leader_rx = self.0.leader.clone();
        let body = op.body().map_err(|e| GroupError::Stopped(e.to_string()))?;
        let mut hint: Option<NodeId> = None;
        loop {
            let leader = hint.take().or_else(|| leader_rx.borrow_and_update().leader);
            match leader {
                Some(l) if l == self.0.me => match self.execute_until(op.clone(), deadline).await {
                    Ok(answer) => return Ok(answer),
                    Err(LocalError::Failed(e)) => return Err(e),
                    Err(LocalError::NotLeader(h)) => hint = h.filter(|h| *h != self.0.me),
                },
                Some(l) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    self.0.transport.counters.forwarded_total.inc();
                    let request = self.0.transport.request(
                        l,
                        &self.0.name,
                        op.kind(),
                        body.clone(),
                        remaining,
                    );
                    // A leader that dies with our request in flight never
                    // answers: once another leader is known, stop waiting.
                    let mut moved = self.0.leader.clone();
                    let term = moved.borrow_and_update().term;
                    let replaced = async move {
                        let _ = moved
                            .wait_for(|s| {
                                s.term > term && s.leader.is_some() && s.leader != Some(l)
                            })
                            .await;
                    };
                    let answer = tokio::select! {
                        r = request => r,
                        _ = replaced => Err(TransportError::Timeout(l)),
                    };
                    match answer {
                        Ok(answer) => return Ok(answer),
                        Err(TransportError::Refused {
                            status: RaftStatus::NotLeader,
                            reason,
                            ..
                        }) => hint = reason.parse().ok().filter(|h| *h != l),
                        Err(TransportError::Refused {
                            status: RaftStatus::Failed,
                            reason,
                            ..
                        }) => return Err(failed_from_remote(&reason, l)),
                        // Nothing was sent: safe to try again.
                        Err(TransportError::Unreachable(_))
                        | Err(TransportError::Refused { .. }) => {}
                        Err(TransportError::Timeout(_)) | Err(TransportError::Stream { .. })
                            if matches!(op, Op::Write(_) | Op::Membership(_)) =>
                        {
                            return Err(GroupError::Uncertain { leader: l })
                        }
                        Err(_) => {}
                    }
                }
                None => {}
            }
            if hint.is_some() {
                continue;
            }
            // Wait for news of a leader, or a short while, before trying
            // again.
            let pause = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                _ = leader_rx.changed() => {}
                _ = pause => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
            if Instant::now() >= deadline {
                return Err(GroupError::NoLeader(self.0.timeout));
            }
        }
    }

    /// `execute` with a deadline: a leader cut off from its majority
    /// cannot commit and would wait for ever. A write or membership change
    /// proposed but not committed in time is `Uncertain` (a later leader
    /// may still commit it, or drop it); a read or keep-alive, `NoLeader`.
    async fn execute_until(&self, op: Op, deadline: Instant) -> Result<Vec<u8>, LocalError> {
        let proposes = matches!(op, Op::Write(_) | Op::Membership(_));
        match tokio::time::timeout_at(deadline, self.execute(op)).await {
            Ok(r) => r,
            Err(_) if proposes => Err(LocalError::Failed(GroupError::Uncertain {
                leader: self.0.me,
            })),
            Err(_) => Err(LocalError::Failed(GroupError::NoLeader(self.0.timeout))),
        }
    }

    /// The leader's side of `op`.
    async fn execute(&self, op: Op) -> Result<Vec<u8>, LocalError> {
        let failed = |e: GroupError| LocalError::Failed(e);
        let enc = |r: Result<Vec<u8>, TransportError>| {
            r.map_err(|e| LocalError::Failed(GroupError::Stopped(e.to_string())))
        };
        match op {
            Op::Write(req) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let queued = self.0.proposals.send(Proposal {
                    request: req,
                    answer: tx,
                });
                if queued.await.is_err() {
                    return Err(failed(GroupError::Stopped("the group has stopped".into())));
                }
                let Ok(answer) = rx.await else {
                    return Err(failed(GroupError::Stopped("the group has stopped".into())));
                };
                match answer.result().await {
                    Ok(resp) => enc(encode(&resp)),
                    Err(e) => Err(write_error(e)),
                }
            }
            Op::Read(read) => match self.0.raft.ensure_linearizable().await {
                Ok(_) => enc(encode(&self.read_local(&read))),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(LocalError::NotLeader(f.leader_id.map(|m| m.0)))
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                    tracing::debug!(group = %self.0.name, why = %q, "linearizable read: no quorum");
                    Err(failed(GroupError::NoLeader(self.0.timeout)))
                }
                Err(RaftError::Fatal(f)) => Err(failed(GroupError::Stopped(f.to_string()))),
            },
            Op::KeepAlive(id) => {
                if !self.is_leader() {
                    return Err(LocalError::NotLeader(self.leader()));
                }
                let ttl = self
                    .0
                    .sm
                    .leases()
                    .into_iter()
                    .find(|l| l.id == id)
                    .map(|l| l.ttl_ms);
                if let Some(ttl) = ttl {
                    self.0
                        .leases
                        .lock()
                        .insert(id, Instant::now() + Duration::from_millis(ttl));
                }
                enc(encode(&ttl))
            }
            Op::Membership(m) => {
                let raft = &self.0.raft;
                let r = match m {
                    MembershipOp::AddLearner(id) => raft
                        .add_learner(MemberId(id), EmptyNode::default(), true)
                        .await
                        .map(drop),
                    MembershipOp::AddVoter(id) => {
                        match raft
                            .add_learner(MemberId(id), EmptyNode::default(), true)
                            .await
                        {
                            Ok(_) => raft
                                .change_membership(
                                    ChangeMembers::AddVoterIds(BTreeSet::from([MemberId(id)])),
                                    false,
                                )
                                .await
                                .map(drop),
                            Err(e) => Err(e),
                        }
                    }
                    MembershipOp::Remove(id) => {
                        let state = self.leader_state();
                        let change = if state.voters.contains(&id) {
                            ChangeMembers::RemoveVoters(BTreeSet::from([MemberId(id)]))
                        } else {
                            ChangeMembers::RemoveNodes(BTreeSet::from([MemberId(id)]))
                        };
                        raft.change_membership(change, false).await.map(drop)
                    }
                };
                match r {
                    Ok(()) => enc(encode(&())),
                    Err(e) => Err(write_error(e)),
                }
            }
        }
    }

    /// A request from member `from` (openraft's own RPCs, or an `Op`
    /// forwarded to us as the leader).
    pub(crate) async fn serve(&self, from: NodeId, kind: RaftKind, body: &[u8]) -> RaftResponse {
        let ok = |body: Vec<u8>| RaftResponse {
            status: RaftStatus::Ok,
            body,
            reason: String::new(),
        };
        let refuse = |status: RaftStatus, reason: String| RaftResponse {
            status,
            body: Vec::new(),
            reason,
        };
        let malformed = |e: TransportError| refuse(RaftStatus::Malformed, e.to_string());
        let raft = &self.0.raft;
        let answer = match kind {
            RaftKind::AppendEntries => match decode::<AppendEntriesRequest<TypeConfig>>(body) {
                Ok(req) => {
                    let entries = !req.entries.is_empty();
                    if entries {
                        macula_raft::probe::mark(macula_raft::probe::Phase::FollowerGot);
                    }
                    let r = raft.append_entries(req).await;
                    if entries {
                        macula_raft::probe::mark(macula_raft::probe::Phase::FollowerAnswered);
                    }
                    // Anything but "higher vote" means this node follows
                    // the sender (heartbeats are AppendEntries too).
                    if matches!(&r, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                        self.0.heard.leader();
                    }
                    encode(&r)
                }
                Err(e) => return malformed(e),
            },
            RaftKind::Vote => match decode(body) {
                Ok(req) => encode(&raft.vote(req).await),
                Err(e) => return malformed(e),
            },
            RaftKind::InstallSnapshot => match decode::<InstallSnapshotRequest<TypeConfig>>(body) {
                Ok(req) => {
                    let vote = req.vote;
                    let r = raft.install_snapshot(req).await;
                    // Accepted: the sender's vote is not below ours.
                    if matches!(&r, Ok(a) if vote >= a.vote) {
                        self.0.heard.leader();
                    }
                    encode(&r)
                }
                Err(e) => return malformed(e),
            },
            RaftKind::Other(k) => {
                return refuse(RaftStatus::Unsupported, format!("unknown raft kind {k}"))
            }
            kind => {
                let Some(op) = Op::decode(kind, body) else {
                    return refuse(RaftStatus::Malformed, format!("bad {kind:?} body"));
                };
                tracing::trace!(group = %self.0.name, %from, ?kind, "forwarded request");
                match self
                    .execute_until(op, Instant::now() + self.0.timeout)
                    .await
                {
                    Ok(answer) => Ok(answer),
                    Err(LocalError::NotLeader(l)) => {
                        return refuse(
                            RaftStatus::NotLeader,
                            l.map(|l| l.to_string()).unwrap_or_default(),
                        )
                    }
                    Err(LocalError::Failed(e)) => {
                        return refuse(RaftStatus::Failed, remote_text(&e))
                    }
                }
            }
        };
        match answer {
            Ok(body) => ok(body),
            Err(e) => refuse(RaftStatus::Failed, e.to_string()),
        }
    }

    /// The proposer: takes the writes that queued up while earlier
    /// entries were being committed and proposes them as one entry (a
    /// `Request::Batch` when there are several), like etcd's batching: many
    /// concurrent writers share one log entry, one fsync per member and one
    /// AppendEntries per follower. Up to `RaftLimits::proposals_in_flight` entries
    /// are on their way at once (pipelined: the next is appended while the
    /// previous ones replicate); a lone write is proposed as itself at once.
    async fn propose(self, mut rx: tokio::sync::mpsc::Receiver<Proposal>) {
        let mut stop = self.0.stop.subscribe();
        let mut carry: Option<Proposal> = None;
        let in_flight = self.0.in_flight.clone();
        loop {
            let permit = match in_flight.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // Every slot is on its way: writes wait in the queue.
                    self.0.transport.counters.proposer_full_total.inc();
                    tokio::select! {
                        p = in_flight.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return,
                        },
                        _ = stop.changed() => return,
                    }
                }
            };
            let first = match carry.take() {
                Some(p) => p,
                None => tokio::select! {
                    p = rx.recv() => match p {
                        Some(p) => p,
                        None => return,
                    },
                    _ = stop.changed() => return,
                },
            };
            macula_raft::probe::mark(macula_raft::probe::Phase::ProposerTook);
            let mut bytes = request_bytes(&first.request);
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => {
                        let b = request_bytes(&p.request);
                        if bytes + b > self.0.batch_bytes {
                            carry = Some(p);
                            break;
                        }
                        bytes += b;
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
            let (request, answers) = if batch.len() == 1 {
                let p = batch.remove(0);
                (p.request, vec![p.answer])
            } else {
                let (requests, answers): (Vec<Request>, Vec<_>) =
                    batch.into_iter().map(|p| (p.request, p.answer)).unzip();
                (Request::Batch(requests), answers)
            };
            let single = answers.len() == 1;
            // Handed to openraft here, in queue order (so log order is
            // call order); answered by a task of its own.
            let committed: Committed = self.0.raft.client_write_ff(request).await.map_err(Box::new);
            // In openraft's queue now: a write handed directly after this
            // comes after them.
            self.0.queued.fetch_sub(answers.len(), Ordering::AcqRel);
            macula_raft::probe::mark(macula_raft::probe::Phase::RaftTook);
            if single {
                // The writer awaits openraft's answer itself.
                if let Some(a) = answers.into_iter().next() {
                    if let Err(Answer::Own(Ok(rx), _)) = a.send(Answer::Own(committed, permit)) {
                        // The writer was answered at the commit already.
                        self.keep_answer(rx);
                    }
                }
                continue;
            }
            let name = self.0.name.clone();
            tokio::spawn(async move {
                let r = raft_answer(committed).await;
                drop(permit);
                Self::answer_batch(&name, answers, r);
            });
        }
    }

    /// Answers the writers of one proposed entry.
    fn answer_batch(
        group: &str,
        answers: Vec<tokio::sync::oneshot::Sender<Answer>>,
        r: Result<ClientWriteResponse<TypeConfig>, WriteError>,
    ) {
        match r {
            Ok(w) => match w.data {
                Response::Batch(responses) if responses.len() == answers.len() => {
                    for (a, r) in answers.into_iter().zip(responses) {
                        let _ = a.send(Answer::Done(Box::new(Ok(r))));
                    }
                }
                other => {
                    // Not what a batch answers: tell every writer.
                    tracing::error!(group = %group, answer = ?other, "unexpected answer to a batch");
                    for a in answers {
                        let _ = a.send(Answer::Done(Box::new(Ok(Response::Error(
                            KvError::NestedBatch,
                        )))));
                    }
                }
            },
            Err(e) => {
                for a in answers {
                    let _ = a.send(Answer::Done(Box::new(Err(e.clone()))));
                }
            }
        }
    }

    /// Maps openraft's metrics to `LeaderState` for the watch, counts
    /// leader changes, and restarts lease timers when this node takes
    /// office.
    async fn watch_leadership(self, tx: watch::Sender<LeaderState>) {
        let mut metrics = self.0.raft.metrics();
        let mut stop = self.0.stop.subscribe();
        let mut failed = false;
        loop {
            let state = {
                let m = metrics.borrow_and_update();
                let membership = m.membership_config.membership();
                let voters: BTreeSet<MemberId> = membership.voter_ids().collect();
                let learners: Vec<NodeId> = ids(membership.learner_ids());
                LeaderState {
                    leader: m.current_leader.map(|l| l.0),
                    term: m.current_term,
                    voters: ids(voters),
                    learners,
                    is_leader: m.state == ServerState::Leader,
                }
            };
            if let Err(fatal) = &metrics.borrow().running_state {
                // A storage error or a panic inside openraft: the group is
                // dead on this node until it restarts (say it once).
                if !matches!(fatal, Fatal::Stopped) && !std::mem::replace(&mut failed, true) {
                    tracing::error!(group = %self.0.name, error = %fatal, "raft group failed on this node");
                }
            }
            let before = tx.borrow().clone();
            if before.leader != state.leader || before.term != state.term {
                if state.leader.is_some() && before.leader != state.leader {
                    self.0.transport.counters.leader_changes_total.inc();
                    tracing::info!(group = %self.0.name, leader = ?state.leader, term = state.term, "raft leader");
                }
                if state.is_leader && !before.is_leader {
                    self.restart_lease_timers();
                }
                if !state.is_leader {
                    self.0.leases.lock().clear();
                }
            }
            tx.send_if_modified(|cur| {
                if *cur != state {
                    *cur = state;
                    true
                } else {
                    false
                }
            });
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
        }
    }

    fn restart_lease_timers(&self) {
        let now = Instant::now();
        let mut leases = self.0.leases.lock();
        leases.clear();
        for l in self.0.sm.leases() {
            leases.insert(l.id, now + Duration::from_millis(l.ttl_ms));
        }
    }

    /// On the leader: every 100 ms, start timers for new leases and revoke
    /// the expired ones through the log.
    async fn expire_leases(self) {
        let mut stop = self.0.stop.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if !self.is_leader() {
                continue;
            }
            let now = Instant::now();
            let expired: Vec<u64> = {
                let live = self.0.sm.leases();
                let mut leases = self.0.leases.lock();
                let known: BTreeMap<u64, u64> =
                    live.into_iter().map(|l| (l.id, l.ttl_ms)).collect();
                leases.retain(|id, _| known.contains_key(id));
                for (id, ttl) in &known {
                    leases
                        .entry(*id)
                        .or_insert_with(|| now + Duration::from_millis(*ttl));
                }
                leases
                    .iter()
                    .filter(|(_, d)| **d <= now)
                    .map(|(id, _)| *id)
                    .collect()
            };
            for id in expired {
                match self.0.raft.client_write(Request::LeaseRevoke { id }).await {
                    Ok(_) => {
                        self.0.leases.lock().remove(&id);
                        self.0.transport.counters.leases_expired_total.inc();
                        tracing::debug!(group = %self.0.name, lease = id, "lease expired");
                    }
                    Err(e) => {
                        tracing::debug!(group = %self.0.name, lease = id, error = %e, "could not revoke an expired lease");
                        break;
                    }
                }
            }
        }
    }
}

fn stopped() -> GroupError {
    GroupError::Stopped("the group has stopped".into())
}

/// A write's error as the group's.
fn group_error(e: WriteError) -> GroupError {
    match write_error(e) {
        LocalError::NotLeader(l) => GroupError::NotLeader(l),
        LocalError::Failed(e) => e,
    }
}

fn write_error(e: WriteError) -> LocalError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(ForwardToLeader {
            leader_id,
            ..
        })) => LocalError::NotLeader(leader_id.map(|m| m.0)),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            LocalError::Failed(GroupError::Membership(c.to_string()))
        }
        RaftError::Fatal(f) => LocalError::Failed(GroupError::Stopped(f.to_string())),
    }
}

/// A `GroupError` as the text a remote caller turns back into one.
fn remote_text(e: &GroupError) -> String {
    match e {
        GroupError::Membership(m) => format!("membership: {m}"),
        GroupError::NoLeader(_) => "no-quorum".to_string(),
        GroupError::Uncertain { .. } => "uncertain".to_string(),
        other => other.to_string(),
    }
}

fn failed_from_remote(reason: &str, leader: NodeId) -> GroupError {
    if let Some(m) = reason.strip_prefix("membership: ") {
        GroupError::Membership(m.to_string())
    } else if reason == "no-quorum" {
        GroupError::NoLeader(Duration::ZERO)
    } else if reason == "uncertain" {
        GroupError::Uncertain { leader }
    } else {
        GroupError::Stopped(reason.to_string())
    }
}
