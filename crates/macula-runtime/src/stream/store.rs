//! One stream's store: a redb file (`<data dir>/streams/<name>.redb`) with
//! the messages (`blocks`: runs of up to [`BLOCK_MSGS`] records under their
//! first sequence, see `store/blocks.rs` and `record.rs`), the stream's
//! configuration, last sequence and message count (`meta`), and its
//! durable consumers (`consumers`: name -> configuration and position).
//!
//! **Group commit through a journal.** A durable write is staged in the
//! stream's journal (`journal.rs`) as it is queued, by the submitter,
//! under the journal's lock (so the journal's order is the queue's, which
//! the caller's lock on the stream's core makes the sequence order). The
//! writes staged together are appended as one checksummed record by one
//! `pwrite` (a flush). One writer thread takes everything queued meanwhile
//! as one group: it flushes what is staged, syncs the journal once for the
//! group (one `fdatasync`, outside the lock), raises `durable` (the
//! highest sequence stored, which the host makes the consumers' visibility
//! bound), answers each waiter, and then commits the group to redb without
//! syncing (`Durability::None`). A publish acknowledged to its publisher is
//! on disk, in the journal.
//!
//! **Sync interval** ([`StreamStore::set_sync_interval`], a stream's
//! `sync_interval`): a write is acknowledged as soon as its record is
//! written (to the operating system), with no hand-off to the writer,
//! which syncs the journal at least every interval; so an acknowledged
//! write survives a crash or `kill -9` of the process, not a power loss of
//! the last interval. The flush is the submitter's
//! ([`StreamStore::flush_staged`]): it yields once, so the other publishes
//! ready to run stage theirs, then writes everything staged as one record
//! and answers every write in it (leader and followers: whoever resumes
//! first writes for all). A flush dropped in its yield still flushes;
//! staged writes nobody flushed are flushed by the writer thread when it
//! idles ([`FLUSH_LATE`]); past [`FLUSH_BYTES`] staged, the submitter
//! flushes at once.
//!
//! **Acknowledged from the journal.** As the answers go out before the
//! redb commit, every read first waits until the writes acknowledged before
//! it are committed (`Gate`: the highest ticket (queue place) acknowledged
//! and the highest committed; two atomic loads when nothing is pending, at
//! most [`READ_WAIT`] otherwise), so a publisher, a consumer or `get` reads
//! an acknowledged message at once. A read of messages (`get`,
//! `get_batch`) waits only until the highest sequence it reads is
//! committed (`Gate::committed_seq`: puts are queued in sequence order, so
//! every put up to it is in redb), not for everything acknowledged since:
//! a consumer reading the start of a stream right after a burst is not
//! held behind the burst's commits. The writer may commit a write before
//! its flush; `durable` rises only at the acknowledgement. A commit that
//! fails after its acknowledgement fails the store (nothing more is
//! acknowledged) and the reads waiting for it; the journal holds the writes
//! and the next open replays them.
//!
//! **Checkpoints.** A checkpoint (a redb commit with
//! `Durability::Immediate`) runs at least every [`SYNC_EVERY`] while redb
//! holds unsynced commits, when the journal passes [`JOURNAL_MAX`], on
//! [`StreamStore::sync`] and at close. Under the journal's lock it flushes
//! what is staged and takes everything queued into its commit. Then,
//! usually, it releases the lock and its commit records the journal's end
//! as the replay's start offset (`meta.journal_at`): publishers go on
//! appending during its sync. Past [`JOURNAL_MAX`], or after unjournaled
//! writes, it keeps the lock through the commit, which moves the journal
//! to its next epoch at offset 0, so every record the new epoch drops is
//! in redb, synced. At open, the journal's records of the current epoch
//! from the start offset are replayed into redb (one checkpoint) before
//! anything reads the file.
//!
//! **Unsynced writes** ([`StreamStore::submit_unsynced`]) are a replicated
//! stream's applier's: what it writes is already in the Raft log on a
//! majority of disks, so its commits skip the `fsync`
//! (`Durability::None`: a crash of the process loses them, and the group
//! replays them from the log) and skip the journal. A group with only such
//! writes commits without syncing, unless the last checkpoint is older than
//! [`SYNC_EVERY`]; [`StreamStore::synced_applied`] is the applied index
//! (`Write::Applied`) of what survives a crash. Once such writes are
//! queued, a write that must be durable is not journaled but made durable
//! by a checkpoint (the journal alone would replay it without them), until
//! a checkpoint.
//!
//! **Backpressure.** The writer's queue is bounded
//! ([`StreamStore::set_queue_limit`], `StreamLimits::write_queue_bytes`
//! and `write_queue_timeout`): each queued job is charged its record bytes
//! plus [`JOB_OVERHEAD`] until the writer has committed it to redb. A
//! publisher first takes room for its write ([`StreamStore::admit`],
//! before the stream's core lock); with the queue full it waits, without
//! a thread, until commits make room, and past the timeout gets
//! [`StoreError::Busy`]. With a sync interval this is what keeps
//! publishers that the journal acknowledges at once from outrunning redb's
//! commits. Other writes (consumer positions, removals, configuration,
//! a replica's applied entries, which its applier awaits one batch at a
//! time) never wait but are charged: the queue can pass the bound by
//! them, never by publishes. A single write larger than the bound is let
//! in alone, when the queue is empty. Counted: the bytes queued (a
//! gauge), the publishes that waited and those refused.
//!
//! **Corruption.** A file that redb cannot open, or a record that does not
//! decode, is an error naming the file; nothing is written over it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch};

use super::journal::{self, Journal};
use super::record::{self, CorruptRecord, StoredMsg};
pub use super::write::Write;

mod blocks;
mod gate;
mod queue;
mod staging;

use blocks::{BadBlock, BlockWriter, BLOCKS};
pub use blocks::{BLOCK_BYTES, BLOCK_MSGS, META_COUNT};
use gate::Gate;
pub use gate::READ_WAIT;
use queue::Room;
pub use queue::{
    charge, Admission, QueueStats, DEFAULT_QUEUE_BYTES, DEFAULT_QUEUE_TIMEOUT, JOB_OVERHEAD,
};
use staging::{flush_side, Side, Waiter, FLUSH_BYTES, FLUSH_LATE};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CONSUMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("consumers");

/// `meta` key of the stream's configuration (JSON).
pub const META_CONFIG: &str = "config";
/// `meta` key of the last sequence and timestamp (16 bytes, LE).
pub const META_LAST: &str = "last";
/// `meta` key of the index snapshot written at a clean shutdown (removed by
/// the first write after the next start, so a crash never leaves a stale
/// one).
pub const META_INDEX: &str = "index";
/// `meta` key of a replicated stream's applied Raft log index (8 bytes, LE).
pub const META_APPLIED: &str = "applied";
/// `meta` key of the journal's epoch (8 bytes, LE; absent: 0).
pub const META_JOURNAL: &str = "journal";
/// `meta` key of the offset the journal's replay starts from (8 bytes, LE;
/// absent: 0): what the last checkpoint left of its epoch.
pub const META_JOURNAL_AT: &str = "journal_at";
/// `meta` key of the checksum the journal's record at `journal_at` links
/// to (16 bytes: that offset, LE, and the 8-byte checksum; absent, or for
/// another offset: a store of an earlier version, see `journal.rs`).
pub const META_JOURNAL_LINK: &str = "journal_link";

/// Writes one group commit takes at most (more wait for the next).
const MAX_GROUP: usize = 8192;
/// Record bytes one group commit takes at most.
const MAX_GROUP_BYTES: usize = 16 << 20;
/// Unsynced writes are synced at least this often (redb frees pages only
/// in synced commits, and a crash replays less).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// A journal this long is checkpointed at the next group (it is replayed
/// whole at open, so its length bounds the replay after a crash).
pub const JOURNAL_MAX: u64 = 64 << 20;

/// Syncs a replicated stream's Raft log up to a log index, blocking
/// ([`StreamStore::set_log_sync`]).
pub type LogSync = Arc<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened (corrupt, locked, unreadable).
    #[error("stream store {path}: {message}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What redb said.
        message: String,
    },
    /// A read or write failed.
    #[error("stream store {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A stored record or value that does not decode.
    #[error("stream store {path}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What.
        what: String,
    },
    /// The writer stopped (the store is closing or failed earlier).
    #[error("stream store {0}: closed")]
    Closed(PathBuf),
    /// The writer's queue stayed full for the whole timeout: the disk
    /// takes the stream's writes more slowly than they come.
    #[error("stream store {path}: the writer's queue stayed full ({queued} of {limit} bytes queued) for {waited:?}: the disk is slower than the publishers; the publish was not stored")]
    Busy {
        /// The file.
        path: PathBuf,
        /// Bytes queued when it gave up.
        queued: u64,
        /// The bound.
        limit: u64,
        /// How long it waited.
        waited: std::time::Duration,
    },
}

/// Who waits for a group commit: an async caller or a blocking one.
enum Done {
    Async(oneshot::Sender<Result<(), String>>),
    Blocking(mpsc::Sender<Result<(), String>>),
}

struct Job {
    writes: Vec<Write>,
    done: Option<Done>,
    /// Its room in the queue, given back when the job is dropped (after
    /// its commit).
    room: Option<Admission>,
    /// Its place in the queue (from 1): what `Gate` counts.
    ticket: u64,
    /// Answered by the journal flush that writes it (sync interval), not
    /// by the writer.
    early: bool,
    /// Committed with an `fsync` (else see the module docs).
    sync: bool,
    /// Appended to the journal when it was queued.
    journaled: bool,
    /// Acknowledged (and counted in `Gate::acked`) ahead of its commit.
    acked: bool,
    /// A checkpoint that moves the journal to its next epoch (at close).
    wrap: bool,
}

/// How a job is queued ([`StreamStore::queue_as`]).
#[derive(Debug, Clone, Copy)]
struct Queued {
    /// Made durable before it is answered (journal or checkpoint); else
    /// committed without an `fsync`, skipping the journal.
    sync: bool,
    /// A checkpoint that moves the journal to its next epoch.
    wrap: bool,
    /// Counted acknowledged by the caller as it is queued (a replica's
    /// applied writes): refused once the store failed, never answered by
    /// the writer.
    acked: bool,
}

impl Queued {
    const DURABLE: Queued = Queued {
        sync: true,
        wrap: false,
        acked: false,
    };
    const WRAP: Queued = Queued {
        sync: true,
        wrap: true,
        acked: false,
    };
    const UNSYNCED: Queued = Queued {
        sync: false,
        wrap: false,
        acked: false,
    };
    const ACKED: Queued = Queued {
        sync: false,
        wrap: false,
        acked: true,
    };
}

/// What the writer counted.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Writes committed.
    pub writes: AtomicU64,
    /// Transactions committed with an `fsync` (checkpoints).
    pub syncs: AtomicU64,
    /// Groups appended to the journal.
    pub journal_appends: AtomicU64,
    /// `fdatasync`s of the journal.
    pub journal_syncs: AtomicU64,
    /// Groups acknowledged from the journal before their redb commit.
    pub early_acks: AtomicU64,
    /// Reads that waited for the commit of acknowledged writes.
    pub read_waits: AtomicU64,
}

/// A stream's store (see the module docs).
pub struct StreamStore {
    path: PathBuf,
    db: Arc<Database>,
    jobs: parking_lot::Mutex<Option<mpsc::Sender<Job>>>,
    side: Arc<parking_lot::Mutex<Side>>,
    durable: watch::Receiver<u64>,
    durable_tx: Arc<watch::Sender<u64>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<StoreStats>,
    gate: Arc<Gate>,
    room: Arc<Room>,
    /// The applied index (`Write::Applied`) of the last synced commit.
    synced_applied: Arc<AtomicU64>,
    /// Syncs the Raft log before a checkpoint makes an applied index
    /// durable (a replicated stream's).
    log_sync: Arc<parking_lot::RwLock<Option<LogSync>>>,
    /// The sync interval in milliseconds (0: sync before every
    /// acknowledgement).
    sync_interval_ms: Arc<AtomicU64>,
    /// Checkpoints at least this often while redb holds unsynced commits
    /// ([`SYNC_EVERY`]; tests stretch it).
    #[cfg(test)]
    checkpoint_every_ms: Arc<AtomicU64>,
    #[cfg(test)]
    hooks: Arc<TestHooks>,
}

/// What tests make the writer do between an early acknowledgement and the
/// redb commit.
#[cfg(test)]
#[derive(Debug, Default)]
struct TestHooks {
    /// Sleep this long before each commit of an acknowledged group.
    commit_delay_ms: AtomicU64,
    /// Fail the next commit of an acknowledged group.
    fail_commit: std::sync::atomic::AtomicBool,
    /// Sleep this long in each checkpoint before its commit (after the
    /// journal's lock is released, unless it wraps).
    checkpoint_delay_ms: AtomicU64,
    /// Set while a checkpoint sleeps for `checkpoint_delay_ms`.
    in_checkpoint: std::sync::atomic::AtomicBool,
    /// While set, the writer takes no group (a stalled disk).
    hold: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for StreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamStore")
            .field("path", &self.path)
            .finish()
    }
}

fn io(path: &Path) -> impl Fn(String) -> StoreError + '_ {
    move |message| StoreError::Io {
        path: path.to_path_buf(),
        message,
    }
}

impl StreamStore {
    /// Creates a new store file (refusing an existing one) holding `config`.
    pub fn create(path: &Path, config: &[u8], cache_bytes: usize) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                message: "exists already".into(),
            });
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(path)(e.to_string()))?;
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let journal = Journal::create(&journal::path_of(path), 0).map_err(journal_err)?;
        let s = StreamStore::start(path, db, journal, 0, 0);
        s.write_now(vec![Write::Config(config.to_vec()), Write::Last(0, 0)])?;
        Ok(s)
    }

    /// Opens an existing store file; never creates or repairs one.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                message: "no such file".into(),
            });
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .open(path)
            .map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        migrate(&db, path)?;
        let start = read_start(&db, path)?;
        let epoch = start.epoch;
        let (mut journal, groups) =
            Journal::open(&journal::path_of(path), start).map_err(journal_err)?;
        if !groups.is_empty() {
            // What the journal holds beyond the last checkpoint goes into
            // redb first, as one checkpoint.
            let writes: Vec<&Write> = groups.iter().flatten().collect();
            tracing::info!(path = %path.display(), groups = groups.len(), writes = writes.len(), "stream store: replaying its journal");
            commit(
                &db,
                writes.into_iter(),
                Some(journal::Start::epoch(epoch + 1)),
            )
            .map_err(io(path))?;
            journal.restart(epoch + 1);
        }
        let (last, _) = read_last(&db, path)?;
        let applied = read_applied(&db, path)?;
        Ok(StreamStore::start(path, db, journal, last, applied))
    }

    fn start(path: &Path, db: Database, journal: Journal, durable: u64, applied: u64) -> Self {
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel::<Job>();
        let (dtx, drx) = watch::channel(durable);
        let dtx = Arc::new(dtx);
        let side = Arc::new(parking_lot::Mutex::new(Side {
            journal,
            unjournaled: false,
            ticket: 0,
            waiters: Vec::new(),
        }));
        let stats = Arc::new(StoreStats::default());
        let gate = Arc::new(Gate::default());
        let synced_applied = Arc::new(AtomicU64::new(applied));
        let log_sync = Arc::new(parking_lot::RwLock::new(None));
        let sync_interval_ms = Arc::new(AtomicU64::new(0));
        let checkpoint_every_ms = Arc::new(AtomicU64::new(SYNC_EVERY.as_millis() as u64));
        #[cfg(test)]
        let hooks = Arc::new(TestHooks::default());
        let thread = {
            let mut w = Writer {
                db: db.clone(),
                path: path.to_path_buf(),
                durable: dtx.clone(),
                rx,
                side: side.clone(),
                stats: stats.clone(),
                gate: gate.clone(),
                synced_applied: synced_applied.clone(),
                log_sync: log_sync.clone(),
                sync_interval_ms: sync_interval_ms.clone(),
                checkpoint_every_ms: checkpoint_every_ms.clone(),
                #[cfg(test)]
                hooks: hooks.clone(),
                applied,
                last_checkpoint: std::time::Instant::now(),
                last_journal_sync: std::time::Instant::now(),
                dirty: false,
                unjournaled: false,
            };
            std::thread::Builder::new()
                .name("macula-stream-store".into())
                .spawn(move || w.run())
                .ok()
        };
        StreamStore {
            path: path.to_path_buf(),
            db,
            jobs: parking_lot::Mutex::new(thread.as_ref().map(|_| tx)),
            side,
            durable: drx,
            durable_tx: dtx,
            thread: parking_lot::Mutex::new(thread),
            stats,
            gate,
            room: Arc::new(Room::new()),
            synced_applied,
            log_sync,
            sync_interval_ms,
            #[cfg(test)]
            checkpoint_every_ms,
            #[cfg(test)]
            hooks,
        }
    }

    /// Sets how often a checkpoint runs at least while redb holds unsynced
    /// commits (default [`SYNC_EVERY`]).
    #[cfg(test)]
    pub(crate) fn set_checkpoint_every(&self, every: std::time::Duration) {
        self.checkpoint_every_ms
            .store(every.as_millis() as u64, Ordering::Release);
    }

    /// Sets when acknowledged writes are synced: `None`, before each
    /// acknowledgement; `Some(d)`, at least every `d` (see the module
    /// docs).
    pub fn set_sync_interval(&self, interval: Option<std::time::Duration>) {
        let ms = interval.map_or(0, |d| (d.as_millis() as u64).max(1));
        self.sync_interval_ms.store(ms, Ordering::Release);
    }

    /// Sets what syncs a replicated stream's Raft log: before a checkpoint
    /// makes an applied index (`Write::Applied`) durable, the writer calls
    /// it with that index and waits, so that after a power loss the store
    /// is never ahead of the log it replays from (see the module docs).
    pub fn set_log_sync(&self, sync: LogSync) {
        *self.log_sync.write() = Some(sync);
    }

    /// Sets the bound of the writer's queue (charged bytes) and how long
    /// a publisher waits for room in it (see the module docs).
    pub fn set_queue_limit(&self, bytes: u64, timeout: std::time::Duration) {
        self.room.limit.store(bytes.max(1), Ordering::Release);
        self.room
            .timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Release);
        // A raised bound makes room.
        self.room.notify.notify_waiters();
    }

    /// The writer queue's figures.
    pub fn queue_stats(&self) -> QueueStats {
        QueueStats {
            queued: self.room.queued.load(Ordering::Acquire),
            high: self.room.high.load(Ordering::Relaxed),
            limit: self.room.limit.load(Ordering::Acquire),
            waits: self.room.waits.load(Ordering::Relaxed),
            refused: self.room.refused.load(Ordering::Relaxed),
        }
    }

    /// Takes room for a write of `bytes` (see [`charge`]) in the writer's
    /// queue: at once while the queue is under its bound; else waits for
    /// the writer's commits to make room, and past the queue's timeout
    /// fails with [`StoreError::Busy`]. Call before taking the lock the
    /// write is decided under; hand the room to
    /// [`StreamStore::submit_admitted`].
    pub async fn admit(&self, bytes: u64) -> Result<Admission, StoreError> {
        let room = &self.room;
        if let Some(a) = room.try_take(bytes) {
            return Ok(a);
        }
        room.waits.fetch_add(1, Ordering::Relaxed);
        struct Waiting<'a>(&'a Room);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.waiting.fetch_sub(1, Ordering::AcqRel);
            }
        }
        room.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(room);
        let timeout = std::time::Duration::from_millis(room.timeout_ms.load(Ordering::Acquire));
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        loop {
            let notified = room.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(a) = room.try_take(bytes) {
                return Ok(a);
            }
            if self.jobs.lock().is_none() {
                return Err(StoreError::Closed(self.path.clone()));
            }
            if let Some(f) = self.gate.failed() {
                return Err(io(&self.path)(f));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                room.refused.fetch_add(1, Ordering::Relaxed);
                let queued = room.queued.load(Ordering::Acquire);
                let limit = room.limit.load(Ordering::Acquire);
                tracing::warn!(path = %self.path.display(), queued, limit, ?timeout, "stream store: a publish refused, the writer's queue stayed full");
                return Err(StoreError::Busy {
                    path: self.path.clone(),
                    queued,
                    limit,
                    waited: started.elapsed(),
                });
            }
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues writes; `done` is answered once they are on disk. Charged
    /// in the queue without waiting for room (see
    /// [`StreamStore::submit_admitted`]).
    pub fn submit(
        &self,
        writes: Vec<Write>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), StoreError> {
        let room = self.room.force(charge(&writes));
        self.queue(writes, done.map(Done::Async), true, room)
    }

    /// [`StreamStore::submit`] with room taken by [`StreamStore::admit`].
    pub fn submit_admitted(
        &self,
        writes: Vec<Write>,
        done: Option<oneshot::Sender<Result<(), String>>>,
        room: Admission,
    ) -> Result<(), StoreError> {
        self.queue(writes, done.map(Done::Async), true, room)
    }

    /// Queues writes committed without an `fsync` (a replicated stream's
    /// applier: see the module docs); `done` is answered once they are
    /// committed (readable; lost by a crash until the next synced commit).
    pub fn submit_unsynced(
        &self,
        writes: Vec<Write>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), StoreError> {
        let room = self.room.force(charge(&writes));
        self.queue(writes, done.map(Done::Async), false, room)
    }

    /// Queues a replicated stream's applied writes, committed without an
    /// `fsync`, and counts them acknowledged at once: `durable` rises and
    /// reads wait for their commit (`Gate`), as for a write acknowledged
    /// from the journal, but nothing waits for the writer. The Raft log
    /// holds them on a majority; a failed commit fails the store (reads
    /// waiting for it fail, nothing more is written) and the next open
    /// replays the log from the store's last synced applied index.
    pub fn apply_unsynced(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let room = self.room.force(charge(&writes));
        let top = top_put(&writes);
        let ticket = self.queue_as(writes, None, room, Queued::ACKED)?;
        // Counted before `durable` rises (a read must then wait).
        self.gate.acked_to(ticket);
        raise_durable_to(&self.durable_tx, top);
        self.stats.early_acks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn queue(
        &self,
        writes: Vec<Write>,
        done: Option<Done>,
        sync: bool,
        room: Admission,
    ) -> Result<(), StoreError> {
        let how = if sync {
            Queued::DURABLE
        } else {
            Queued::UNSYNCED
        };
        self.queue_as(writes, done, room, how).map(|_| ())
    }

    /// Queues a job for the writer (staged in the journal first when it
    /// is durable and journaled) and returns its ticket.
    fn queue_as(
        &self,
        writes: Vec<Write>,
        done: Option<Done>,
        room: Admission,
        how: Queued,
    ) -> Result<u64, StoreError> {
        let Queued { sync, wrap, acked } = how;
        let jobs = self.jobs.lock();
        let Some(tx) = jobs.as_ref() else {
            return Err(StoreError::Closed(self.path.clone()));
        };
        if acked {
            if let Some(f) = self.gate.failed() {
                return Err(io(&self.path)(f));
            }
        }
        // Staged and queued under the journal's lock: the journal's order
        // is the queue's (tickets in queue order), and a checkpoint (which
        // takes the lock and everything queued) covers every record it
        // drops.
        let mut side = self.side.lock();
        side.ticket += 1;
        let ticket = side.ticket;
        let mut job = Job {
            writes,
            done,
            room: Some(room),
            ticket,
            // Acknowledged by the caller, not by the writer.
            early: acked,
            sync,
            journaled: false,
            acked,
            wrap,
        };
        let closed = |_| StoreError::Closed(self.path.clone());
        if !sync {
            side.unjournaled = true;
            return tx.send(job).map(|()| ticket).map_err(closed);
        }
        if job.writes.is_empty() || side.unjournaled || wrap {
            return tx.send(job).map(|()| ticket).map_err(closed);
        }
        if let Some(f) = self.gate.failed() {
            return Err(io(&self.path)(f));
        }
        if let Err(e) = side.journal.stage(job.writes.iter()) {
            let e = e.to_string();
            self.gate.fail(&e);
            return Err(io(&self.path)(e));
        }
        job.journaled = true;
        if self.sync_interval_ms.load(Ordering::Acquire) == 0 {
            // Written, synced and acknowledged by the writer, once per
            // group.
            return tx.send(job).map(|()| ticket).map_err(closed);
        }
        // With a sync interval, written is acknowledged: by the journal
        // flush that writes this record (`flush_staged`: the submitter's,
        // after letting the publishes ready meanwhile stage theirs), before
        // the writer commits it to redb (reads wait: `Gate`).
        job.early = true;
        let waiter = Waiter {
            ticket: job.ticket,
            top: top_put(&job.writes),
            done: job.done.take(),
        };
        if tx.send(job).is_err() {
            // Staged but never committed: nothing is acknowledged any more.
            self.gate.fail("the store's writer stopped");
            return Err(StoreError::Closed(self.path.clone()));
        }
        side.waiters.push(waiter);
        if side.journal.staged_bytes() >= FLUSH_BYTES {
            // Bounds what is staged: flushed now, whoever waits.
            let _ = flush_side(&mut side, &self.gate, &self.durable_tx, &self.stats);
        }
        Ok(ticket)
    }

    /// Writes what was staged in the journal and answers its waiters (see
    /// [`StreamStore::flush_staged`]).
    pub fn flush(&self) {
        let mut side = self.side.lock();
        // A failure fails the store and is the waiters' answer.
        let _ = flush_side(&mut side, &self.gate, &self.durable_tx, &self.stats);
    }

    /// With a sync interval, a submitted write is answered by the journal
    /// flush that writes it: call this after [`StreamStore::submit`],
    /// before awaiting the answer. It first lets the other tasks ready to
    /// run stage their writes (one yield), then writes everything staged
    /// as one journal record and answers every write in it, so publishes
    /// in flight together cost one `pwrite` and one checksum. At once
    /// when nothing waits for a flush; dropped during its yield, it
    /// flushes all the same.
    pub async fn flush_staged(&self) {
        if self.side.lock().waiters.is_empty() {
            return;
        }
        struct FlushOnDrop<'a>(&'a StreamStore);
        impl Drop for FlushOnDrop<'_> {
            fn drop(&mut self) {
                self.0.flush();
            }
        }
        let _flush = FlushOnDrop(self);
        tokio::task::yield_now().await;
    }

    /// Makes everything committed so far durable (a checkpoint) and waits
    /// for it.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.write_now(Vec::new())
    }

    /// The applied index (`Write::Applied`) as of the last synced commit:
    /// what a crash of the process leaves.
    pub fn synced_applied(&self) -> u64 {
        self.synced_applied.load(Ordering::Acquire)
    }

    /// Writes and waits (blocking the thread; also from inside a runtime)
    /// until they are on disk.
    pub fn write_now(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.write_now_as(writes, false)
    }

    /// [`StreamStore::write_now`]; `wrap`: as a checkpoint that moves the
    /// journal to its next epoch at offset 0.
    fn write_now_as(&self, writes: Vec<Write>, wrap: bool) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel();
        let room = self.room.force(charge(&writes));
        let how = if wrap { Queued::WRAP } else { Queued::DURABLE };
        self.queue_as(writes, Some(Done::Blocking(tx)), room, how)?;
        self.flush();
        rx.recv()
            .map_err(|_| StoreError::Closed(self.path.clone()))?
            .map_err(io(&self.path))
    }

    /// Writes and waits until they are on disk.
    pub async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(writes, Some(tx))?;
        self.flush_staged().await;
        rx.await
            .map_err(|_| StoreError::Closed(self.path.clone()))?
            .map_err(io(&self.path))
    }

    /// The highest sequence on disk, as a watch.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }

    /// What the writer counted.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Reads one message.
    pub fn get(&self, seq: u64) -> Result<Option<StoredMsg>, StoreError> {
        self.settled_upto(seq)?;
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let Some(t) = self.blocks(&txn)? else {
            return Ok(None);
        };
        self.lookup(&t, seq)
    }

    /// Message `seq` in table `t`.
    fn lookup(
        &self,
        t: &redb::ReadOnlyTable<u64, &'static [u8]>,
        seq: u64,
    ) -> Result<Option<StoredMsg>, StoreError> {
        let e = io(&self.path);
        let Some((key, v)) = blocks::block_of(t, seq).map_err(|x| e(x.to_string()))? else {
            return Ok(None);
        };
        let Some(rec) = blocks::find(key, v.value(), seq).map_err(|b| self.bad(&b))? else {
            return Ok(None);
        };
        record::decode(rec)
            .map(Some)
            .map_err(|c| self.corrupt(seq, &c))
    }

    /// The blocks table (`None`: the file holds no message yet).
    fn blocks(
        &self,
        txn: &redb::ReadTransaction,
    ) -> Result<Option<redb::ReadOnlyTable<u64, &'static [u8]>>, StoreError> {
        match txn.open_table(BLOCKS) {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(x) => Err(io(&self.path)(x.to_string())),
        }
    }

    fn bad(&self, b: &BadBlock) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: b.to_string(),
        }
    }

    /// Reads several messages in one read transaction (one range scan when
    /// they are ascending, as a consumer's batch is); a sequence not stored
    /// is left out.
    pub fn get_batch(&self, seqs: &[u64]) -> Result<Vec<(u64, StoredMsg)>, StoreError> {
        let (Some(&lo), Some(&hi)) = (seqs.iter().min(), seqs.iter().max()) else {
            return Ok(Vec::new());
        };
        self.settled_upto(hi)?;
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let Some(t) = self.blocks(&txn)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(seqs.len());
        let ascending = seqs.windows(2).all(|w| w[0] < w[1]);
        // A dense ascending batch is one range scan over the blocks;
        // anything else is one lookup per sequence.
        if ascending && hi - lo < 4 * seqs.len() as u64 {
            let mut want = seqs.iter().copied().peekable();
            let start = blocks::start_key(&t, lo).map_err(|x| e(x.to_string()))?;
            'blocks: for item in t.range(start..=hi).map_err(|x| e(x.to_string()))? {
                let (k, v) = item.map_err(|x| e(x.to_string()))?;
                for entry in blocks::entries(k.value(), v.value()) {
                    let (seq, rec) = entry.map_err(|b| self.bad(&b))?;
                    if seq > hi {
                        break 'blocks;
                    }
                    while want.peek().is_some_and(|&w| w < seq) {
                        want.next();
                    }
                    if want.peek() == Some(&seq) {
                        want.next();
                        let m = record::decode(rec).map_err(|c| self.corrupt(seq, &c))?;
                        out.push((seq, m));
                    }
                }
            }
        } else {
            for &seq in seqs {
                if let Some(m) = self.lookup(&t, seq)? {
                    out.push((seq, m));
                }
            }
        }
        Ok(out)
    }

    /// Waits until the writes acknowledged before this read are committed
    /// to redb (at once unless a group was acknowledged from the journal
    /// and its commit is still running).
    fn settled(&self) -> Result<(), StoreError> {
        self.settled_upto(u64::MAX)
    }

    /// [`StreamStore::settled`] for a read of messages up to `seq`: waits
    /// only until the puts up to `seq` are committed.
    fn settled_upto(&self, seq: u64) -> Result<(), StoreError> {
        if self.gate.settle_for(&self.path, seq)? {
            self.stats.read_waits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn corrupt(&self, seq: u64, c: &CorruptRecord) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: format!("message {seq}: {c}"),
        }
    }

    /// Reads the configuration (JSON) and the last sequence and timestamp.
    pub fn meta(&self) -> Result<(Vec<u8>, u64, u64), StoreError> {
        self.settled()?;
        let (last, ts) = self.last()?;
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let t = txn.open_table(META).map_err(|x| e(x.to_string()))?;
        let cfg = t
            .get(META_CONFIG)
            .map_err(|x| e(x.to_string()))?
            .map(|v| v.value().to_vec())
            .ok_or_else(|| StoreError::Corrupt {
                path: self.path.clone(),
                what: "no configuration".into(),
            })?;
        Ok((cfg, last, ts))
    }

    /// The index snapshot of the last clean shutdown, if there is one.
    pub fn index_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.settled()?;
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let t = txn.open_table(META).map_err(|x| e(x.to_string()))?;
        let v = t.get(META_INDEX).map_err(|x| e(x.to_string()))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn last(&self) -> Result<(u64, u64), StoreError> {
        self.settled()?;
        read_last(&self.db, &self.path)
    }

    /// Calls `f` with every stored message's sequence, record size and
    /// head, ascending (to rebuild the index).
    pub fn scan(&self, mut f: impl FnMut(u64, u32, record::Head<'_>)) -> Result<u64, StoreError> {
        self.settled()?;
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let Some(t) = self.blocks(&txn)? else {
            return Ok(0);
        };
        let mut n = 0;
        for item in t.iter().map_err(|x| e(x.to_string()))? {
            let (k, v) = item.map_err(|x| e(x.to_string()))?;
            for entry in blocks::entries(k.value(), v.value()) {
                let (seq, bytes) = entry.map_err(|b| self.bad(&b))?;
                let head = record::decode_head(bytes).map_err(|c| self.corrupt(seq, &c))?;
                let size = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                f(seq, size, head);
                n += 1;
            }
        }
        Ok(n)
    }

    /// The Raft log index a replicated stream's store has applied (0:
    /// none, or not replicated).
    pub fn applied(&self) -> Result<u64, StoreError> {
        self.settled()?;
        read_applied(&self.db, &self.path)
    }

    /// Stored records from `from` on, ascending, as stored (record bytes),
    /// until `max_bytes` of records (at least one) or `max` records.
    pub fn raw_range(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.settled()?;
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let Some(t) = self.blocks(&txn)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let start = blocks::start_key(&t, from).map_err(|x| e(x.to_string()))?;
        'blocks: for item in t.range(start..).map_err(|x| e(x.to_string()))? {
            let (k, v) = item.map_err(|x| e(x.to_string()))?;
            for entry in blocks::entries(k.value(), v.value()) {
                let (seq, rec) = entry.map_err(|b| self.bad(&b))?;
                if seq < from {
                    continue;
                }
                if out.len() >= max || (!out.is_empty() && bytes + rec.len() > max_bytes) {
                    break 'blocks;
                }
                bytes += rec.len();
                out.push((seq, rec.to_vec()));
            }
        }
        Ok(out)
    }

    /// Stored messages (`meta.count`, kept with every commit).
    pub fn stored_messages(&self) -> Result<u64, StoreError> {
        self.settled()?;
        read_u64(&self.db, &self.path, META_COUNT)
    }

    /// Every consumer record: name -> bytes.
    pub fn consumers(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.settled()?;
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let t = match txn.open_table(CONSUMERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x.to_string())),
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|x| e(x.to_string()))? {
            let (k, v) = item.map_err(|x| e(x.to_string()))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Stops the writer after what is queued is written (and synced).
    /// The last checkpoint moves the journal to its next epoch, and the
    /// journal file is then emptied: the next open has nothing to read in
    /// it, and the pages of the records it held, which a sync interval
    /// leaves unwritten (up to [`JOURNAL_MAX`]), are dropped rather than
    /// written back while the next start reads its files.
    pub fn close(&self) {
        let mut clean = false;
        if self.jobs.lock().is_some() {
            match self.write_now_as(Vec::new(), true) {
                Ok(()) => clean = true,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "stream store not synced at close")
                }
            }
        }
        self.jobs.lock().take();
        // Publishers waiting for room find the store closed.
        self.room.notify.notify_waiters();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if clean {
            // Nothing was appended after the wrapping checkpoint (the queue
            // is closed and the writer gone); its epoch is in redb, synced,
            // so a crash that loses this truncation finds older epochs'
            // records only, which it does not replay.
            let mut side = self.side.lock();
            if side.journal.is_empty() && side.journal.staged_bytes() == 0 {
                if let Err(e) = side.journal.truncate() {
                    tracing::warn!(path = %self.path.display(), error = %e, "stream journal not emptied at close");
                }
            }
        }
    }
}

impl Drop for StreamStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn read_last(db: &Database, path: &Path) -> Result<(u64, u64), StoreError> {
    let e = io(path);
    let txn = db.begin_read().map_err(|x| e(x.to_string()))?;
    let t = txn.open_table(META).map_err(|x| e(x.to_string()))?;
    let v = t.get(META_LAST).map_err(|x| e(x.to_string()))?;
    let bytes = v.as_ref().map(|v| v.value()).unwrap_or(&[]);
    if bytes.len() != 16 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            what: "no last sequence".into(),
        });
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&bytes[..8]);
    b.copy_from_slice(&bytes[8..]);
    Ok((u64::from_le_bytes(a), u64::from_le_bytes(b)))
}

/// Where the journal's replay starts: `meta.journal`, `journal_at` and
/// `journal_link` (see [`META_JOURNAL_LINK`]).
fn read_start(db: &Database, path: &Path) -> Result<journal::Start, StoreError> {
    let epoch = read_u64(db, path, META_JOURNAL)?;
    let at = read_u64(db, path, META_JOURNAL_AT)?;
    let e = io(path);
    let txn = db.begin_read().map_err(|x| e(x.to_string()))?;
    let link = match txn.open_table(META) {
        Ok(t) => t
            .get(META_JOURNAL_LINK)
            .map_err(|x| e(x.to_string()))?
            .and_then(|v| {
                let b = v.value();
                let (o, l) = (b.get(..8)?, b.get(8..16)?);
                (b.len() == 16 && u64::from_le_bytes(o.try_into().ok()?) == at)
                    .then(|| <[u8; 8]>::try_from(l).ok())
                    .flatten()
            }),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(x) => return Err(e(x.to_string())),
    };
    Ok(journal::Start { epoch, at, link })
}

/// Moves an earlier version's records (table `msgs`) into blocks, in one
/// synced commit; nothing is written when there are none.
fn migrate(db: &Database, path: &Path) -> Result<(), StoreError> {
    let e = io(path);
    let count = read_u64(db, path, META_COUNT)?;
    let txn = db.begin_write().map_err(|x| e(x.to_string()))?;
    let moved = blocks::migrate(&txn, count).map_err(|x| match x {
        blocks::BlockError::Bad(b) => StoreError::Corrupt {
            path: path.to_path_buf(),
            what: b.to_string(),
        },
        blocks::BlockError::Redb(m) => e(m),
    })?;
    match moved {
        None => txn.abort().map_err(|x| e(x.to_string())),
        Some(n) => {
            {
                let mut meta = txn.open_table(META).map_err(|x| e(x.to_string()))?;
                meta.insert(META_COUNT, n.to_le_bytes().as_slice())
                    .map_err(|x| e(x.to_string()))?;
            }
            tracing::info!(path = %path.display(), messages = n, "stream store: records moved into blocks");
            txn.commit().map_err(|x| e(x.to_string()))
        }
    }
}

fn read_applied(db: &Database, path: &Path) -> Result<u64, StoreError> {
    read_u64(db, path, META_APPLIED)
}

/// A `meta` value of 8 bytes (LE); 0 when absent.
fn read_u64(db: &Database, path: &Path, key: &str) -> Result<u64, StoreError> {
    let e = io(path);
    let txn = db.begin_read().map_err(|x| e(x.to_string()))?;
    // A file whose first commit is still in its journal has no table yet.
    let t = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(x) => return Err(e(x.to_string())),
    };
    let v = t.get(key).map_err(|x| e(x.to_string()))?;
    match v.map(|v| <[u8; 8]>::try_from(v.value())) {
        None => Ok(0),
        Some(Ok(b)) => Ok(u64::from_le_bytes(b)),
        Some(Err(_)) => Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            what: format!("meta {key}"),
        }),
    }
}

fn journal_err(e: journal::JournalError) -> StoreError {
    match e {
        journal::JournalError::Io { path, message } => StoreError::Io { path, message },
        journal::JournalError::Corrupt {
            path,
            offset,
            message,
        } => StoreError::Corrupt {
            path,
            what: format!("record at offset {offset}: {message}"),
        },
    }
}

/// The writer thread's state (see the module docs).
struct Writer {
    db: Arc<Database>,
    path: PathBuf,
    durable: Arc<watch::Sender<u64>>,
    rx: mpsc::Receiver<Job>,
    side: Arc<parking_lot::Mutex<Side>>,
    stats: Arc<StoreStats>,
    gate: Arc<Gate>,
    synced_applied: Arc<AtomicU64>,
    log_sync: Arc<parking_lot::RwLock<Option<LogSync>>>,
    sync_interval_ms: Arc<AtomicU64>,
    checkpoint_every_ms: Arc<AtomicU64>,
    #[cfg(test)]
    hooks: Arc<TestHooks>,
    /// The applied index written so far (synced or not).
    applied: u64,
    last_checkpoint: std::time::Instant,
    last_journal_sync: std::time::Instant,
    /// redb holds commits made since the last checkpoint.
    dirty: bool,
    /// ... of which some are in neither the journal nor a checkpoint (a
    /// replicated stream's applier's).
    unjournaled: bool,
}

impl Writer {
    fn run(&mut self) {
        loop {
            let first = match self.due() {
                None => match self.rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                },
                Some(at) => {
                    let wait = at.saturating_duration_since(std::time::Instant::now());
                    match self.rx.recv_timeout(wait) {
                        Ok(j) => j,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.housekeeping();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let mut group = vec![first];
            let mut bytes = 0usize;
            while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
                match self.rx.try_recv() {
                    Ok(j) => {
                        bytes += j
                            .writes
                            .iter()
                            .map(|w| match w {
                                Write::Put(_, r) => r.len(),
                                _ => 0,
                            })
                            .sum::<usize>();
                        group.push(j);
                    }
                    Err(_) => break,
                }
            }
            let result = self.write(&mut group);
            if let Err(e) = &result {
                tracing::error!(path = %self.path.display(), error = %e, "stream store write failed");
            }
            answer(&mut group, &result);
        }
        // What was acknowledged is in the journal; sync what an interval
        // left unsynced (a close checkpoints before this).
        if let Err(e) = self.sync_journal() {
            tracing::warn!(path = %self.path.display(), error = %e, "stream journal not synced at close");
        }
    }

    fn checkpoint_every(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.checkpoint_every_ms.load(Ordering::Acquire))
    }

    fn interval(&self) -> Option<std::time::Duration> {
        match self.sync_interval_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// When the writer must act without a job: the next checkpoint while
    /// redb holds unsynced commits, the next journal sync in interval mode.
    fn due(&self) -> Option<std::time::Instant> {
        if self.gate.failed().is_some() {
            return None;
        }
        let checkpoint = self
            .dirty
            .then(|| self.last_checkpoint + self.checkpoint_every());
        let (unsynced, staged) = {
            let side = self.side.lock();
            (side.journal.unsynced(), !side.waiters.is_empty())
        };
        let journal = match (unsynced, self.interval()) {
            (true, Some(d)) => Some(self.last_journal_sync + d),
            (true, None) => Some(std::time::Instant::now()),
            _ => None,
        };
        let flush = staged.then(|| std::time::Instant::now() + FLUSH_LATE);
        [checkpoint, journal, flush].into_iter().flatten().min()
    }

    fn housekeeping(&mut self) {
        if self.gate.failed().is_some() {
            return;
        }
        {
            // Staged writes nobody flushed (their publishers went away).
            let mut side = self.side.lock();
            if !side.waiters.is_empty() {
                let _ = flush_side(&mut side, &self.gate, &self.durable, &self.stats);
            }
        }
        let now = std::time::Instant::now();
        let result = if self.dirty && now >= self.last_checkpoint + self.checkpoint_every() {
            // What the checkpoint takes from the queue is answered here.
            let mut group = Vec::new();
            let result = self.checkpoint(&mut group);
            answer(&mut group, &result);
            result
        } else if self
            .interval()
            .is_none_or(|d| now >= self.last_journal_sync + d)
        {
            self.sync_journal()
        } else {
            Ok(())
        };
        if let Err(e) = result {
            // Tried again a checkpoint interval later.
            self.last_checkpoint = now;
            tracing::error!(path = %self.path.display(), error = %e, "stream store sync failed");
        }
    }

    /// Fails the store: nothing more is acknowledged, and reads waiting
    /// for acknowledged writes fail.
    fn fail(&self, e: &str) {
        self.gate.fail(e);
    }

    fn write(&mut self, group: &mut Vec<Job>) -> Result<(), String> {
        #[cfg(test)]
        while self.hooks.hold.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if let Some(f) = self.gate.failed() {
            return Err(f);
        }
        let durable = group.iter().any(|j| j.sync);
        let has_writes = group.iter().any(|j| !j.writes.is_empty());
        if !has_writes && !durable {
            return Ok(());
        }
        let checkpoint_due = self.last_checkpoint.elapsed() >= self.checkpoint_every();
        // A durable job not in the journal (a sync, or one queued after
        // unsynced writes) is made durable by a checkpoint, as is
        // everything when one is due.
        let journal_full = self.side.lock().journal.len() >= JOURNAL_MAX;
        if group.iter().any(|j| j.sync && !j.journaled)
            || journal_full
            || (checkpoint_due && self.dirty)
        {
            return self.checkpoint(group);
        }
        if let Some(ticket) = group
            .iter()
            .filter(|j| j.journaled && !j.early)
            .map(|j| j.ticket)
            .max()
        {
            // Queued without a sync interval: written (one record for
            // everything staged), synced, then acknowledged.
            {
                let mut side = self.side.lock();
                flush_side(&mut side, &self.gate, &self.durable, &self.stats)?;
            }
            self.sync_journal()?;
            // Counted before `durable` rises: the visibility task makes
            // the writes readable when it does, and a read must then wait
            // for their commit.
            self.gate.acked_to(ticket);
            for j in group.iter_mut().filter(|j| j.journaled && !j.early) {
                raise_durable(&self.durable, &j.writes);
                self.stats.early_acks.fetch_add(1, Ordering::Relaxed);
                j.acked = true;
                answer_one(j.done.take(), &Ok(()));
            }
        }
        #[cfg(test)]
        {
            let ms = self.hooks.commit_delay_ms.load(Ordering::Acquire);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            if self.hooks.fail_commit.swap(false, Ordering::AcqRel) {
                let e = "commit failed (test)".to_string();
                self.fail(&e);
                return Err(e);
            }
        }
        match commit(&self.db, group.iter().flat_map(|j| j.writes.iter()), None) {
            Ok(()) => {
                self.dirty = true;
                if group.iter().any(|j| !j.sync) {
                    self.unjournaled = true;
                }
                self.committed(group);
                Ok(())
            }
            Err(e) => {
                if group.iter().any(|j| j.journaled || j.acked) {
                    // Acknowledged (or to be, by a journal flush) but not
                    // in redb: nothing more is written, reads waiting for
                    // it fail, the next open replays the journal.
                    self.fail(&e);
                }
                Err(e)
            }
        }
    }

    /// Syncs the journal (outside its lock: submitters go on appending).
    fn sync_journal(&mut self) -> Result<(), String> {
        let (file, upto) = {
            let side = self.side.lock();
            if !side.journal.unsynced() {
                return Ok(());
            }
            side.journal.sync_handle()
        };
        if let Err(e) = file.sync_data() {
            let e = format!("journal {}: {e}", self.path.display());
            self.fail(&e);
            return Err(e);
        }
        self.side.lock().journal.mark_synced(upto);
        self.stats.journal_syncs.fetch_add(1, Ordering::Relaxed);
        self.last_journal_sync = std::time::Instant::now();
        if !self.unjournaled {
            self.synced_applied.store(self.applied, Ordering::Release);
        }
        Ok(())
    }

    /// One synced redb commit of `group`, of everything queued meanwhile
    /// (taken into `group`) and of everything before, under the journal's
    /// lock. Then either:
    /// - the journal goes on in its epoch from where it stands, and the
    ///   commit records that offset as the journal's start: the lock is
    ///   released before the commit, so publishers stage and flush during
    ///   its sync;
    /// - or, past [`JOURNAL_MAX`] or after unjournaled writes (which the
    ///   journal alone would replay wrongly), it restarts at offset 0 in
    ///   its next epoch, and the lock is held throughout: every record the
    ///   new epoch drops is then in this commit or an earlier one.
    fn checkpoint(&mut self, group: &mut Vec<Job>) -> Result<(), String> {
        // The Raft log first, up to the applied index this commit makes
        // durable: outside the journal's lock (the applier queues under
        // it), so that the check under the lock, for what is queued
        // meanwhile, usually finds the log synced already.
        self.sync_log(self.applied_after(group))?;
        let side = self.side.clone();
        let mut side = side.lock();
        while let Ok(j) = self.rx.try_recv() {
            group.push(j);
        }
        self.sync_log(self.applied_after(group))?;
        // Staged writes are written and answered first (they are in this
        // commit too).
        flush_side(&mut side, &self.gate, &self.durable, &self.stats)?;
        let started = std::time::Instant::now();
        let wrap =
            side.unjournaled || side.journal.len() >= JOURNAL_MAX || group.iter().any(|j| j.wrap);
        let (start, upto) = if wrap {
            (journal::Start::epoch(side.journal.epoch() + 1), 0)
        } else {
            (
                journal::Start {
                    epoch: side.journal.epoch(),
                    at: side.journal.len(),
                    link: Some(side.journal.link()),
                },
                side.journal.sync_handle().1,
            )
        };
        let epoch = start.epoch;
        // Unless it wraps, the lock goes now: records appended from here on
        // are after `at`, where the journal's replay starts.
        let held = wrap.then_some(side);
        #[cfg(test)]
        {
            self.hooks.in_checkpoint.store(true, Ordering::Release);
            std::thread::sleep(std::time::Duration::from_millis(
                self.hooks.checkpoint_delay_ms.load(Ordering::Acquire),
            ));
            self.hooks.in_checkpoint.store(false, Ordering::Release);
        }
        if let Err(e) = commit(
            &self.db,
            group.iter().flat_map(|j| j.writes.iter()),
            Some(start),
        ) {
            // The journal may already hold later records that need this
            // commit: nothing more is written.
            self.fail(&e);
            return Err(e);
        }
        match held {
            Some(mut side) => {
                side.journal.restart(epoch);
                side.unjournaled = false;
            }
            None => self.side.lock().journal.mark_synced(upto),
        }
        self.dirty = false;
        self.unjournaled = false;
        self.last_checkpoint = std::time::Instant::now();
        // What was appended during the commit is synced an interval after
        // its start at the latest.
        self.last_journal_sync = started;
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.committed(group);
        self.synced_applied.store(self.applied, Ordering::Release);
        Ok(())
    }

    /// The applied index once `group` is committed.
    fn applied_after(&self, group: &[Job]) -> u64 {
        group
            .iter()
            .flat_map(|j| j.writes.iter())
            .filter_map(|w| match w {
                Write::Applied(i) => Some(*i),
                _ => None,
            })
            .fold(self.applied, u64::max)
    }

    /// Makes the Raft log durable up to `applied` before a checkpoint
    /// makes that applied index durable (invariant: the store's synced
    /// applied index is never ahead of the synced log; see
    /// [`StreamStore::set_log_sync`]). Nothing to do at or below the
    /// index synced already, or without a log (an unreplicated stream).
    /// A failure fails the store: the applied writes it holds unsynced
    /// were acknowledged and can no longer be made durable.
    fn sync_log(&self, applied: u64) -> Result<(), String> {
        if applied <= self.synced_applied.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(sync) = self.log_sync.read().clone() else {
            return Ok(());
        };
        sync(applied).map_err(|e| {
            let e = format!("raft log not synced up to {applied}: {e}");
            self.fail(&e);
            e
        })
    }

    /// Counts a committed group, follows its applied index, raises
    /// `durable` (for the jobs a journal flush does not answer: the
    /// flush raises it for those once they are written) and the gate's
    /// committed ticket.
    fn committed(&mut self, group: &[Job]) {
        let n: usize = group.iter().map(|j| j.writes.len()).sum();
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats.writes.fetch_add(n as u64, Ordering::Relaxed);
        let (mut ticket, mut seq) = (0, 0);
        for j in group {
            for w in &j.writes {
                if let Write::Applied(i) = w {
                    self.applied = *i;
                }
            }
            if !j.early {
                raise_durable(&self.durable, &j.writes);
            }
            ticket = ticket.max(j.ticket);
            seq = seq.max(top_put(&j.writes));
        }
        self.gate.committed_to(ticket, seq);
    }
}

/// The highest sequence `writes` put (0: none).
fn top_put(writes: &[Write]) -> u64 {
    writes
        .iter()
        .filter_map(|w| match w {
            Write::Put(seq, _) => Some(*seq),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Raises `durable` to the highest sequence `writes` put.
fn raise_durable(durable: &watch::Sender<u64>, writes: &[Write]) {
    raise_durable_to(durable, top_put(writes));
}

fn raise_durable_to(durable: &watch::Sender<u64>, top: u64) {
    if top > 0 {
        durable.send_if_modified(|d| {
            let raise = top > *d;
            *d = (*d).max(top);
            raise
        });
    }
}

/// Answers one waiter.
fn answer_one(done: Option<Done>, result: &Result<(), String>) {
    match done {
        Some(Done::Async(tx)) => {
            let _ = tx.send(result.clone());
        }
        Some(Done::Blocking(tx)) => {
            let _ = tx.send(result.clone());
        }
        None => {}
    }
}

/// Gives back the group's room in the queue (it is committed, or failed),
/// then answers the waiters not answered yet.
fn answer(group: &mut [Job], result: &Result<(), String>) {
    for j in group.iter_mut() {
        j.room.take();
    }
    for j in group {
        answer_one(j.done.take(), result);
    }
}

/// Commits writes in one transaction: unsynced, or with `checkpoint`
/// (where the journal's replay starts from then on) synced and recording
/// it.
fn commit<'a>(
    db: &Database,
    writes: impl Iterator<Item = &'a Write>,
    checkpoint: Option<journal::Start>,
) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(if checkpoint.is_some() {
        Durability::Immediate
    } else {
        Durability::None
    });
    {
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        let count = match meta.get(META_COUNT).map_err(|e| e.to_string())? {
            None => 0,
            Some(v) => u64::from_le_bytes(
                <[u8; 8]>::try_from(v.value()).map_err(|_| "meta count is not 8 bytes")?,
            ),
        };
        let mut msgs = BlockWriter::new(txn.open_table(BLOCKS).map_err(|e| e.to_string())?, count);
        let mut consumers = txn.open_table(CONSUMERS).map_err(|e| e.to_string())?;
        // Each publish sets the last sequence: only a group's final one is
        // written (the others would be overwritten in this transaction).
        let writes: Vec<&Write> = writes.collect();
        let final_last = writes.iter().rposition(|w| matches!(w, Write::Last(..)));
        for (i, w) in writes.into_iter().enumerate() {
            if matches!(w, Write::Last(..)) && Some(i) != final_last {
                continue;
            }
            match w {
                Write::Put(seq, r) => msgs.put(*seq, r).map_err(|e| e.to_string())?,
                Write::Delete(seqs) => msgs.delete(seqs).map_err(|e| e.to_string())?,
                Write::Last(seq, ts) => {
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&seq.to_le_bytes());
                    b[8..].copy_from_slice(&ts.to_le_bytes());
                    meta.insert(META_LAST, b.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Write::Config(c) => {
                    meta.insert(META_CONFIG, c.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Write::Consumer(name, Some(v)) => {
                    consumers
                        .insert(name.as_str(), v.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Write::Consumer(name, None) => {
                    consumers.remove(name.as_str()).map_err(|e| e.to_string())?;
                }
                Write::Index(Some(v)) => {
                    meta.insert(META_INDEX, v.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Write::Index(None) => {
                    meta.remove(META_INDEX).map_err(|e| e.to_string())?;
                }
                Write::Applied(index) => {
                    meta.insert(META_APPLIED, index.to_le_bytes().as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Write::Clear => {
                    msgs.clear().map_err(|e| e.to_string())?;
                    consumers.retain(|_, _| false).map_err(|e| e.to_string())?;
                }
            }
        }
        let count = msgs.finish().map_err(|e| e.to_string())?;
        meta.insert(META_COUNT, count.to_le_bytes().as_slice())
            .map_err(|e| e.to_string())?;
        if let Some(start) = checkpoint {
            meta.insert(META_JOURNAL, start.epoch.to_le_bytes().as_slice())
                .map_err(|e| e.to_string())?;
            meta.insert(META_JOURNAL_AT, start.at.to_le_bytes().as_slice())
                .map_err(|e| e.to_string())?;
            let mut link = [0u8; 16];
            link[..8].copy_from_slice(&start.at.to_le_bytes());
            link[8..].copy_from_slice(&start.link.unwrap_or(journal::NO_LINK));
            meta.insert(META_JOURNAL_LINK, link.as_slice())
                .map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn put(seq: u64) -> Write {
        Write::Put(
            seq,
            record::encode(seq, None, "s.x", None, &[], &seq.to_le_bytes()).unwrap(),
        )
    }

    /// What a crash leaves on disk: the files as they are now (the page
    /// cache is what a `kill -9` leaves), copied while the store is open.
    fn crash_image(store: &StreamStore, to: &Path) -> PathBuf {
        let copy = to.join("s.redb");
        std::fs::copy(store.path(), &copy).unwrap();
        std::fs::copy(journal::path_of(store.path()), journal::path_of(&copy)).unwrap();
        copy
    }

    /// The groups a crash image's journal replays (from the store's start
    /// offset, in its epoch).
    fn journal_groups(s: &StreamStore, copy: &Path) -> Vec<Vec<Write>> {
        let start = read_start(&s.db, s.path()).unwrap();
        Journal::open(&journal::path_of(copy), start).unwrap().1
    }

    fn open_store(dir: &Path) -> StreamStore {
        let s = StreamStore::create(&dir.join("s.redb"), b"{}", 1 << 20).unwrap();
        s.set_checkpoint_every(Duration::from_secs(3600));
        s
    }

    #[test]
    fn acknowledged_writes_are_in_the_journal_and_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        let syncs = s.stats().syncs.load(Ordering::Relaxed);
        for seq in 1..=50 {
            s.write_now(vec![put(seq), Write::Last(seq, seq)]).unwrap();
        }
        // Acknowledged through the journal: one sync each, no checkpoint.
        assert_eq!(s.stats().syncs.load(Ordering::Relaxed), syncs);
        assert!(s.stats().journal_syncs.load(Ordering::Relaxed) >= 50);
        let crashed = tempfile::tempdir().unwrap();
        let copy = crash_image(&s, crashed.path());
        let epoch = read_u64(&s.db, s.path(), META_JOURNAL).unwrap();
        let groups = journal_groups(&s, &copy);
        assert_eq!(
            groups.len(),
            51,
            "the creation's group and every acknowledged one are in the journal"
        );
        // Reopened, the copy holds every acknowledged write.
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        for seq in 1..=50 {
            assert!(back.get(seq).unwrap().is_some(), "message {seq}");
        }
        assert_eq!(back.last().unwrap(), (50, 50));
        // The replay was a checkpoint: the journal moved to the next epoch.
        assert_eq!(
            read_u64(&back.db, back.path(), META_JOURNAL).unwrap(),
            epoch + 1
        );
    }

    #[test]
    fn a_checkpoint_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        for seq in 1..=5 {
            s.write_now(vec![put(seq)]).unwrap();
        }
        s.sync().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let copy = crash_image(&s, crashed.path());
        assert!(journal_groups(&s, &copy).is_empty());
        // Writes after it go on in the same epoch, after the checkpoint's
        // start offset.
        let at = read_u64(&s.db, s.path(), META_JOURNAL_AT).unwrap();
        assert!(at > 0);
        s.write_now(vec![put(6)]).unwrap();
        let copy = crash_image(&s, crashed.path());
        assert_eq!(journal_groups(&s, &copy), vec![vec![put(6)]]);
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 6);
    }

    #[test]
    fn with_a_sync_interval_writes_are_acknowledged_before_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        let synced = s.stats().journal_syncs.load(Ordering::Relaxed);
        for seq in 1..=20 {
            s.write_now(vec![put(seq)]).unwrap();
        }
        // At most the first one found the interval elapsed.
        assert!(s.stats().journal_syncs.load(Ordering::Relaxed) <= synced + 1);
        // Written to the file all the same: a crash of the process keeps them.
        let crashed = tempfile::tempdir().unwrap();
        let copy = crash_image(&s, crashed.path());
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 20);
    }

    #[test]
    fn a_durable_write_after_unjournaled_ones_is_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.submit_unsynced(vec![put(1), Write::Applied(7)], Some(tx))
            .unwrap();
        rx.blocking_recv().unwrap().unwrap();
        assert_eq!(s.synced_applied(), 0);
        let syncs = s.stats().syncs.load(Ordering::Relaxed);
        let epoch = read_u64(&s.db, s.path(), META_JOURNAL).unwrap();
        s.write_now(vec![put(2)]).unwrap();
        // The journal alone would replay 2 without 1: redb was synced, and
        // the journal restarted in its next epoch.
        assert_eq!(s.stats().syncs.load(Ordering::Relaxed), syncs + 1);
        assert_eq!(read_u64(&s.db, s.path(), META_JOURNAL).unwrap(), epoch + 1);
        assert_eq!(read_u64(&s.db, s.path(), META_JOURNAL_AT).unwrap(), 0);
        assert_eq!(s.synced_applied(), 7);
        let crashed = tempfile::tempdir().unwrap();
        let back = StreamStore::open(&crash_image(&s, crashed.path()), 1 << 20).unwrap();
        assert!(back.get(1).unwrap().is_some() && back.get(2).unwrap().is_some());
        assert_eq!(back.applied().unwrap(), 7);
    }

    #[test]
    fn a_groups_last_sequence_is_its_final_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.write_now(vec![put(1), Write::Last(1, 10), put(2), Write::Last(2, 20)])
            .unwrap();
        assert_eq!(s.last().unwrap(), (2, 20));
        // Also when several publishers' jobs form one group.
        let rxs: Vec<_> = (3..=9)
            .map(|seq| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                s.submit(vec![put(seq), Write::Last(seq, seq * 10)], Some(tx))
                    .unwrap();
                rx
            })
            .collect();
        for rx in rxs {
            rx.blocking_recv().unwrap().unwrap();
        }
        assert_eq!(s.last().unwrap(), (9, 90));
        let crashed = tempfile::tempdir().unwrap();
        let back = StreamStore::open(&crash_image(&s, crashed.path()), 1 << 20).unwrap();
        assert_eq!(back.last().unwrap(), (9, 90));
    }

    #[test]
    fn a_store_from_before_journals_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let s = open_store(dir.path());
            s.write_now(vec![put(1)]).unwrap();
            s.close();
            s.path().to_path_buf()
        };
        std::fs::remove_file(journal::path_of(&path)).unwrap();
        let back = StreamStore::open(&path, 1 << 20).unwrap();
        assert!(back.get(1).unwrap().is_some());
        assert!(journal::path_of(&path).is_file());
    }

    #[test]
    fn a_read_after_an_acknowledgement_waits_for_its_commit() {
        for interval in [None, Some(Duration::from_secs(3600))] {
            let dir = tempfile::tempdir().unwrap();
            let s = open_store(dir.path());
            s.set_sync_interval(interval);
            // Each acknowledged group's commit lands 500 ms after its answer.
            s.hooks.commit_delay_ms.store(500, Ordering::Release);
            for seq in 1..=3 {
                // Answered before the commit: counted where the writer
                // answers ahead of it (no wall-clock bound, which a loaded
                // machine's slow `fsync` can pass).
                let early = s.stats().early_acks.load(Ordering::Relaxed);
                s.write_now(vec![put(seq), Write::Last(seq, seq)]).unwrap();
                assert_eq!(
                    s.stats().early_acks.load(Ordering::Relaxed),
                    early + 1,
                    "answered before the commit ({interval:?})"
                );
                assert!(
                    s.get(seq).unwrap().is_some(),
                    "read back {seq} ({interval:?})"
                );
                assert_eq!(s.get_batch(&[seq]).unwrap().len(), 1);
                assert_eq!(s.last().unwrap(), (seq, seq));
            }
            assert!(s.stats().early_acks.load(Ordering::Relaxed) >= 3);
            assert!(s.stats().read_waits.load(Ordering::Relaxed) >= 3);
        }
    }

    #[test]
    fn a_read_of_committed_messages_does_not_wait_for_later_commits() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        s.write_now(vec![put(1), Write::Last(1, 1)]).unwrap();
        assert!(s.get(1).unwrap().is_some());
        let waits = s.stats().read_waits.load(Ordering::Relaxed);
        // The disk stalls: 2 is acknowledged (from the journal), not
        // committed.
        let held = Held::new(&s);
        s.write_now(vec![put(2), Write::Last(2, 2)]).unwrap();
        // Reads of 1 go on at once.
        assert!(s.get(1).unwrap().is_some());
        assert_eq!(s.get_batch(&[1]).unwrap().len(), 1);
        assert_eq!(s.stats().read_waits.load(Ordering::Relaxed), waits);
        // A read of 2 waits for its commit: released 200 ms later.
        std::thread::scope(|t| {
            t.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                drop(held);
            });
            let started = std::time::Instant::now();
            assert_eq!(s.get_batch(&[1, 2]).unwrap().len(), 2);
            assert!(started.elapsed() >= Duration::from_millis(150));
        });
        assert_eq!(s.stats().read_waits.load(Ordering::Relaxed), waits + 1);
        assert_eq!(s.last().unwrap(), (2, 2));
    }

    #[test]
    fn a_write_acknowledged_before_its_commit_survives_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        s.write_now(vec![put(1), Write::Last(1, 1)]).unwrap();
        // The next commit hangs for a second: the crash image is taken
        // after the answer and before redb holds the write.
        s.hooks.commit_delay_ms.store(1000, Ordering::Release);
        s.write_now(vec![put(2), Write::Last(2, 2)]).unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let copy = crash_image(&s, crashed.path());
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        assert!(back.get(2).unwrap().is_some(), "replayed from the journal");
        assert_eq!(back.last().unwrap(), (2, 2));
    }

    #[test]
    fn a_failed_commit_of_acknowledged_writes_fails_reads_and_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.write_now(vec![put(1)]).unwrap();
        // Committed (the read waits for it) before the hook is armed.
        assert!(s.get(1).unwrap().is_some());
        s.hooks.fail_commit.store(true, Ordering::Release);
        // In the journal (synced): acknowledged.
        s.write_now(vec![put(2)]).unwrap();
        // Not in redb: a read does not miss it quietly, it fails.
        let err = s.get(2).unwrap_err();
        assert!(err.to_string().contains("commit failed (test)"), "{err}");
        assert!(s.write_now(vec![put(3)]).is_err());
        // The journal has it: the next open replays it.
        let crashed = tempfile::tempdir().unwrap();
        let back = StreamStore::open(&crash_image(&s, crashed.path()), 1 << 20).unwrap();
        assert!(back.get(2).unwrap().is_some());
        assert!(back.get(3).unwrap().is_none());
    }

    #[test]
    fn applied_writes_are_answered_before_their_commit_and_read_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.write_now(vec![put(1), Write::Last(1, 1)]).unwrap();
        let durable = s.durable();
        // The writer is held (a stalled disk): the call returns all the
        // same (it would never, had it waited for the commit), `durable`
        // is up, and once the writer goes on the write reads back.
        let held = Held::new(&s);
        s.apply_unsynced(vec![put(2), Write::Last(2, 2), Write::Applied(5)])
            .unwrap();
        assert_eq!(*durable.borrow(), 2);
        drop(held);
        assert!(
            s.get(2).unwrap().is_some(),
            "the read waited for the commit"
        );
        assert_eq!(s.applied().unwrap(), 5);
        // Not synced.
        assert!(s.synced_applied() < 5);
        // A failed commit of such writes fails reads and later writes.
        s.hooks.commit_delay_ms.store(0, Ordering::Release);
        s.hooks.fail_commit.store(true, Ordering::Release);
        s.apply_unsynced(vec![put(3), Write::Applied(6)]).unwrap();
        let err = s.get(3).unwrap_err();
        assert!(err.to_string().contains("commit failed (test)"), "{err}");
        assert!(s.apply_unsynced(vec![put(4)]).is_err());
    }

    /// Before a checkpoint makes an applied index durable, the Raft log is
    /// synced up to it (and only then); nothing is asked when nothing new
    /// is applied; a log that cannot be synced fails the checkpoint and
    /// the store, and the applied index stays where it was.
    #[test]
    fn a_checkpoint_syncs_the_raft_log_up_to_its_applied_index_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open_store(dir.path()));
        // Each call: the index asked for, and the store's synced applied
        // index at that moment.
        let calls: Arc<parking_lot::Mutex<Vec<(u64, u64)>>> = Arc::default();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (calls, fail, store) = (calls.clone(), fail.clone(), Arc::downgrade(&s));
            s.set_log_sync(Arc::new(move |index| {
                let synced = store.upgrade().map_or(0, |s| s.synced_applied());
                calls.lock().push((index, synced));
                if fail.load(Ordering::Acquire) {
                    Err("disk gone (test)".into())
                } else {
                    Ok(())
                }
            }));
        }
        // A durable write without applied entries: no log to sync.
        s.write_now(vec![put(1), Write::Last(1, 1)]).unwrap();
        s.sync().unwrap();
        assert!(calls.lock().is_empty(), "{:?}", calls.lock());
        s.apply_unsynced(vec![put(2), Write::Last(2, 2), Write::Applied(5)])
            .unwrap();
        s.apply_unsynced(vec![put(3), Write::Last(3, 3), Write::Applied(7)])
            .unwrap();
        assert_eq!(s.synced_applied(), 0);
        s.sync().unwrap();
        assert_eq!(s.synced_applied(), 7);
        {
            let calls = calls.lock();
            assert!(!calls.is_empty(), "the log was not synced");
            // Every request came before the commit that made 7 durable,
            // and the last one covered it.
            assert!(calls.iter().all(|&(_, synced)| synced == 0), "{calls:?}");
            assert_eq!(calls.last().map(|c| c.0), Some(7), "{calls:?}");
        }
        // Nothing applied since: nothing asked.
        let n = calls.lock().len();
        s.sync().unwrap();
        assert_eq!(calls.lock().len(), n);
        // A log that does not sync: the checkpoint fails, 8 is not made
        // durable, and the store is failed.
        fail.store(true, Ordering::Release);
        s.apply_unsynced(vec![put(4), Write::Last(4, 4), Write::Applied(8)])
            .unwrap();
        let err = s.sync().unwrap_err();
        assert!(err.to_string().contains("disk gone (test)"), "{err}");
        assert_eq!(s.synced_applied(), 7);
        assert_eq!(calls.lock().last().map(|c| c.0), Some(8));
        assert!(s.apply_unsynced(vec![put(5)]).is_err());
    }

    #[test]
    fn checkpoints_amid_appends_keep_every_acknowledged_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open_store(dir.path()));
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        // A checkpoint at nearly every group, while four threads append
        // (each acknowledged when written, before the writer sees it). They
        // go on until the writer has checkpointed a few times amid them (a
        // starved writer, or a slow sync on a busy disk, may take a burst
        // as one group): bounded at 10 s, which only a writer that never
        // checkpoints reaches.
        s.set_checkpoint_every(Duration::from_millis(1));
        let syncs = s.stats().syncs.load(Ordering::Relaxed);
        let amid = move |s: &StreamStore| s.stats().syncs.load(Ordering::Relaxed) >= syncs + 3;
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let give_up = std::time::Instant::now() + Duration::from_secs(10);
                    let mut i = 0u64;
                    while (i < 150 || !amid(&s)) && std::time::Instant::now() < give_up {
                        s.write_now(vec![put(1 + t * 1_000_000 + i)]).unwrap();
                        i += 1;
                        // Spread over a few checkpoint intervals.
                        if i.is_multiple_of(10) {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                    i
                })
            })
            .collect();
        let written: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(amid(&s), "no checkpoints amid {written} appends");
        let crashed = tempfile::tempdir().unwrap();
        let back = StreamStore::open(&crash_image(&s, crashed.path()), 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), written);
        assert_eq!(s.stored_messages().unwrap(), written);
    }

    fn submit_rx(s: &StreamStore, seq: u64) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        s.submit(vec![put(seq), Write::Last(seq, seq)], Some(tx))
            .unwrap();
        rx
    }

    #[test]
    fn writes_staged_together_are_one_journal_record_answered_by_its_flush() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        let appends = s.stats().journal_appends.load(Ordering::Relaxed);
        // The writer held: it flushes what nobody did 1 ms after it idles,
        // which a slow test thread could let it do amid the submits.
        let held = Held::new(&s);
        let mut rxs: Vec<_> = (1..=40).map(|seq| submit_rx(&s, seq)).collect();
        // Staged, not written: nobody is answered, nothing is durable.
        for rx in &mut rxs {
            assert!(rx.try_recv().is_err());
        }
        assert_eq!(*s.durable().borrow(), 0);
        s.flush();
        for rx in rxs {
            rx.blocking_recv().unwrap().unwrap();
        }
        drop(held);
        assert_eq!(*s.durable().borrow(), 40);
        assert_eq!(
            s.stats().journal_appends.load(Ordering::Relaxed),
            appends + 1,
            "one record for the forty"
        );
        assert_eq!(s.stats().early_acks.load(Ordering::Relaxed), 40 + 1);
        // The record holds all forty, and a crash keeps them.
        let crashed = tempfile::tempdir().unwrap();
        let copy = crash_image(&s, crashed.path());
        let groups = journal_groups(&s, &copy);
        assert_eq!(groups.last().map(Vec::len), Some(80));
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 40);
        assert_eq!(back.last().unwrap(), (40, 40));
        // Reads see every answered write.
        assert_eq!(
            s.get_batch(&(1..=40).collect::<Vec<_>>()).unwrap().len(),
            40
        );
    }

    #[test]
    fn a_flush_after_the_commit_makes_no_read_wait() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        let commits = s.stats().commits.load(Ordering::Relaxed);
        let appends = s.stats().journal_appends.load(Ordering::Relaxed);
        let rx = submit_rx(&s, 1);
        // The writer commits the job before its record is written (it does
        // not wait for the flush); bounded wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.stats().commits.load(Ordering::Relaxed) == commits {
            assert!(std::time::Instant::now() < deadline, "not committed");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Committed, but not acknowledged: not durable yet (a kill -9
        // could lose it), so consumers do not see it, unless its record
        // was written meanwhile (the writer flushes what nobody did 1 ms
        // after it idles: a slow test thread may look only after that).
        let durable = *s.durable().borrow();
        assert!(
            durable == 0 || s.stats().journal_appends.load(Ordering::Relaxed) > appends,
            "durable before its record was written"
        );
        s.flush();
        rx.blocking_recv().unwrap().unwrap();
        assert_eq!(*s.durable().borrow(), 1);
        let waits = s.stats().read_waits.load(Ordering::Relaxed);
        assert!(s.get(1).unwrap().is_some());
        assert_eq!(s.stats().read_waits.load(Ordering::Relaxed), waits);
    }

    #[test]
    fn staged_writes_nobody_flushes_are_written_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        // The publisher went away before flushing.
        drop(submit_rx(&s, 1));
        let rx = submit_rx(&s, 2);
        rx.blocking_recv().unwrap().unwrap();
        assert_eq!(*s.durable().borrow(), 2);
        let crashed = tempfile::tempdir().unwrap();
        let back = StreamStore::open(&crash_image(&s, crashed.path()), 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 2);
    }

    #[tokio::test]
    async fn flush_staged_dropped_in_its_yield_flushes_all_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        let rx = submit_rx(&s, 1);
        {
            let mut f = std::pin::pin!(s.flush_staged());
            // Its first poll yields; it is dropped there.
            assert!(futures::poll!(f.as_mut()).is_pending());
        }
        rx.await.unwrap().unwrap();
        assert_eq!(*s.durable().borrow(), 1);
        // With nothing staged it does not yield.
        let f = std::pin::pin!(s.flush_staged());
        assert!(futures::poll!(f).is_ready());
    }

    #[tokio::test]
    async fn async_writes_in_flight_together_share_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        let appends = s.stats().journal_appends.load(Ordering::Relaxed);
        // As the bench publishes: many futures polled by one task.
        use futures::StreamExt;
        let n = futures::stream::iter(1..=64u64)
            .map(|seq| {
                let s = &s;
                async move { s.write(vec![put(seq), Write::Last(seq, seq)]).await }
            })
            .buffer_unordered(64)
            .filter(|r| std::future::ready(r.is_ok()))
            .count()
            .await;
        assert_eq!(n, 64);
        let records = s.stats().journal_appends.load(Ordering::Relaxed) - appends;
        assert!(records < 8, "{records} journal records for 64 writes");
        assert_eq!(s.stored_messages().unwrap(), 64);
    }

    #[test]
    fn a_checkpoint_answers_what_was_staged() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        let rx = submit_rx(&s, 1);
        s.sync().unwrap();
        rx.blocking_recv().unwrap().unwrap();
        // In the checkpoint: the new epoch's journal is empty.
        let crashed = tempfile::tempdir().unwrap();
        let copy = crash_image(&s, crashed.path());
        assert!(journal_groups(&s, &copy).is_empty());
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        assert!(back.get(1).unwrap().is_some());
    }

    #[test]
    fn without_an_interval_a_group_is_written_and_synced_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        let rxs: Vec<_> = (1..=30).map(|seq| submit_rx(&s, seq)).collect();
        for rx in rxs {
            rx.blocking_recv().unwrap().unwrap();
        }
        // Answered only once synced; at most one record per sync.
        let st = s.stats();
        assert!(
            st.journal_appends.load(Ordering::Relaxed) <= st.journal_syncs.load(Ordering::Relaxed)
        );
        let crashed = tempfile::tempdir().unwrap();
        let back = StreamStore::open(&crash_image(&s, crashed.path()), 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 30);
    }

    #[test]
    fn writes_go_on_during_a_checkpoints_sync_and_survive_a_crash_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open_store(dir.path()));
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        for seq in 1..=10 {
            s.write_now(vec![put(seq), Write::Last(seq, seq)]).unwrap();
        }
        let syncs = s.stats().syncs.load(Ordering::Relaxed);
        // The next checkpoint stalls for 3 s before its commit, without
        // the journal's lock.
        s.hooks.checkpoint_delay_ms.store(3000, Ordering::Release);
        let checkpoint = {
            let s = s.clone();
            std::thread::spawn(move || s.sync())
        };
        // Bounded wait until the checkpoint has taken the queue.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !s.hooks.in_checkpoint.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        for seq in 11..=20 {
            s.write_now(vec![put(seq), Write::Last(seq, seq)]).unwrap();
        }
        // Acknowledged while the checkpoint still waits for its commit.
        assert_eq!(s.stats().syncs.load(Ordering::Relaxed), syncs);
        // A crash now: redb has neither the checkpoint nor the later
        // writes; the journal, from the old start offset, has them all.
        let crashed = tempfile::tempdir().unwrap();
        let back = StreamStore::open(&crash_image(&s, crashed.path()), 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 20);
        assert_eq!(back.last().unwrap(), (20, 20));
        drop(back);
        checkpoint.join().unwrap().unwrap();
        assert_eq!(s.stats().syncs.load(Ordering::Relaxed), syncs + 1);
        // After it, the journal replays only what followed the checkpoint.
        s.hooks.checkpoint_delay_ms.store(0, Ordering::Release);
        let copy = crash_image(&s, crashed.path());
        let replayed: usize = journal_groups(&s, &copy).iter().map(Vec::len).sum();
        assert_eq!(
            replayed, 20,
            "only the writes after the checkpoint's offset"
        );
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 20);
        assert_eq!(back.last().unwrap(), (20, 20));
    }

    /// Holds the writer (a stalled disk) until dropped, also when the test
    /// panics (a store dropped with its writer held would wait forever).
    struct Held<'a>(&'a StreamStore);
    impl<'a> Held<'a> {
        fn new(s: &'a StreamStore) -> Self {
            s.hooks.hold.store(true, Ordering::Release);
            Held(s)
        }
    }
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.hooks.hold.store(false, Ordering::Release);
        }
    }

    /// Submits through the queue's admission, as a publish does.
    async fn publish(s: &StreamStore, seq: u64) -> Result<(), StoreError> {
        let writes = vec![put(seq), Write::Last(seq, seq)];
        let room = s.admit(charge(&writes)).await?;
        let (tx, rx) = oneshot::channel();
        s.submit_admitted(writes, Some(tx), room)?;
        s.flush_staged().await;
        rx.await
            .map_err(|_| StoreError::Closed(s.path().to_path_buf()))?
            .map_err(io(s.path()))
    }

    /// Bounded wait for a condition another thread or task brings about.
    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if f() {
                return;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("{what} never happened");
    }

    #[tokio::test]
    async fn a_full_writer_queue_holds_publishers_until_commits_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open_store(dir.path()));
        // Acknowledged once written: only the bound keeps publishers from
        // outrunning the writer.
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        let one = charge(&[put(1), Write::Last(1, 1)]);
        s.set_queue_limit(4 * one, Duration::from_secs(3600));
        // The creation's write is committed (its room given back).
        until("an empty queue", || s.queue_stats().queued == 0).await;
        // The disk stalls: the writer commits nothing.
        let held = Held::new(&s);
        for seq in 1..=4 {
            publish(&s, seq).await.unwrap();
        }
        assert_eq!(s.queue_stats().queued, 4 * one);
        // The fifth and sixth wait for room, acknowledged by nobody.
        let waiting: Vec<_> = (5..=6)
            .map(|seq| {
                let s = s.clone();
                tokio::spawn(async move { publish(&s, seq).await })
            })
            .collect();
        until("two publishers waiting", || s.queue_stats().waits == 2).await;
        assert!(waiting.iter().all(|t| !t.is_finished()));
        assert!(s.queue_stats().queued <= s.queue_stats().limit);
        // Acknowledged writes are in the journal though not in redb: a
        // crash now keeps them.
        let crashed = tempfile::tempdir().unwrap();
        let back = StreamStore::open(&crash_image(&s, crashed.path()), 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 4);
        drop(back);
        // The disk comes back: the waiting publishers go on.
        drop(held);
        for t in waiting {
            t.await.unwrap().unwrap();
        }
        until("the queue drained", || s.queue_stats().queued == 0).await;
        let q = s.queue_stats();
        assert!(q.high <= q.limit, "{q:?}");
        assert_eq!((q.waits, q.refused), (2, 0));
        assert_eq!(s.stored_messages().unwrap(), 6);
        assert_eq!(s.last().unwrap(), (6, 6));
    }

    #[tokio::test]
    async fn a_publisher_that_finds_no_room_in_time_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open_store(dir.path()));
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        let one = charge(&[put(1), Write::Last(1, 1)]);
        s.set_queue_limit(2 * one, Duration::from_secs(5));
        until("an empty queue", || s.queue_stats().queued == 0).await;
        let held = Held::new(&s);
        publish(&s, 1).await.unwrap();
        publish(&s, 2).await.unwrap();
        // Simulated time: the wait runs out at once, nothing else moves.
        tokio::time::pause();
        let err = publish(&s, 3).await.unwrap_err();
        tokio::time::resume();
        match &err {
            StoreError::Busy {
                queued,
                limit,
                waited,
                ..
            } => {
                assert_eq!((*queued, *limit), (2 * one, 2 * one));
                assert!(*waited >= Duration::from_secs(5), "{waited:?}");
            }
            e => panic!("{e}"),
        }
        assert!(err.to_string().contains("queue stayed full"), "{err}");
        assert_eq!(s.queue_stats().refused, 1);
        // Nothing of the refused publish was queued; the others commit.
        drop(held);
        until("the queue drained", || s.queue_stats().queued == 0).await;
        assert_eq!(s.stored_messages().unwrap(), 2);
        // A write larger than the whole bound goes in alone.
        s.set_queue_limit(1, Duration::from_secs(5));
        publish(&s, 3).await.unwrap();
        assert_eq!(s.stored_messages().unwrap(), 3);
    }

    #[test]
    fn writes_that_are_not_publishes_are_charged_but_never_held() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.set_queue_limit(1, Duration::from_secs(3600));
        for seq in 1..=3 {
            s.write_now(vec![put(seq)]).unwrap();
        }
        // Given back at the commit, which may follow the answer.
        for _ in 0..10_000 {
            if s.queue_stats().queued == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let held = Held::new(&s);
        s.submit(vec![Write::Consumer("c".into(), Some(vec![1; 100]))], None)
            .unwrap();
        assert!(s.queue_stats().queued >= JOB_OVERHEAD + 100);
        drop(held);
        s.sync().unwrap();
        // Given back as the writer drops the group, just after answering.
        for _ in 0..10_000 {
            if s.queue_stats().queued == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(s.queue_stats().queued, 0);
    }

    /// Item of issue 21: a power loss tears the first record after the
    /// checkpoint's offset and leaves later ones whole. The next pass
    /// appends the same-sized records over the torn one and closes
    /// cleanly; the record of the earlier pass that follows them must not
    /// come back.
    #[test]
    fn a_torn_record_after_the_checkpoint_never_brings_back_the_ones_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        for seq in 1..=5 {
            s.write_now(vec![put(seq), Write::Last(seq, seq)]).unwrap();
        }
        s.sync().unwrap();
        let at = read_u64(&s.db, s.path(), META_JOURNAL_AT).unwrap();
        for seq in 6..=8 {
            s.write_now(vec![put(seq), Write::Last(seq, seq)]).unwrap();
        }
        let crashed = tempfile::tempdir().unwrap();
        let copy = crash_image(&s, crashed.path());
        drop(s);
        // 6's record never reached the disk; 7's and 8's did.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(journal::path_of(&copy))
                .unwrap();
            f.write_all_at(&[0u8; 8], at + 4).unwrap();
        }
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        // Stopped at the torn record: nothing after it.
        assert_eq!(back.stored_messages().unwrap(), 5);
        assert_eq!(back.last().unwrap(), (5, 5));
        // The next pass stores other 6 and 7, of the same sizes.
        let other = |seq: u64| {
            Write::Put(
                seq,
                record::encode(
                    seq + 100,
                    None,
                    "s.x",
                    None,
                    &[],
                    &(seq + 1000).to_le_bytes(),
                )
                .unwrap(),
            )
        };
        for seq in 6..=7 {
            back.write_now(vec![other(seq), Write::Last(seq, seq + 100)])
                .unwrap();
        }
        drop(back);
        let again = StreamStore::open(&copy, 1 << 20).unwrap();
        assert_eq!(again.stored_messages().unwrap(), 7);
        assert!(again.get(8).unwrap().is_none(), "the earlier pass's 8");
        assert_eq!(again.last().unwrap(), (7, 107));
        assert_eq!(again.get(7).unwrap().unwrap().ts, 107);
    }

    #[test]
    fn a_clean_close_leaves_an_empty_journal_in_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = open_store(dir.path());
        s.set_sync_interval(Some(Duration::from_secs(3600)));
        for seq in 1..=20 {
            s.write_now(vec![put(seq), Write::Last(seq, seq)]).unwrap();
        }
        let epoch = read_u64(&s.db, s.path(), META_JOURNAL).unwrap();
        drop(s);
        // Emptied: nothing to read at the next open, nothing left to
        // write back.
        assert_eq!(std::fs::metadata(journal::path_of(&path)).unwrap().len(), 0);
        let s = StreamStore::open(&path, 1 << 20).unwrap();
        assert_eq!(
            read_start(&s.db, s.path()).unwrap(),
            journal::Start::epoch(epoch + 1)
        );
        assert_eq!(s.stored_messages().unwrap(), 20);
        // The next pass journals as before, and a crash replays it.
        for seq in 21..=25 {
            s.write_now(vec![put(seq), Write::Last(seq, seq)]).unwrap();
        }
        let crashed = tempfile::tempdir().unwrap();
        let copy = crash_image(&s, crashed.path());
        assert_eq!(journal_groups(&s, &copy).len(), 5);
        let back = StreamStore::open(&copy, 1 << 20).unwrap();
        assert_eq!(back.stored_messages().unwrap(), 25);
        assert_eq!(back.last().unwrap(), (25, 25));
    }

    /// A record for `seq` of `size` payload bytes, the payload telling
    /// which put wrote it (`tag`).
    fn sized(seq: u64, size: usize, tag: u8) -> Vec<u8> {
        let mut payload = vec![tag; size];
        for (i, b) in seq.to_le_bytes().iter().enumerate().take(size) {
            payload[i] = *b;
        }
        record::encode(seq, None, "s.x", None, &[], &payload).unwrap()
    }

    #[derive(Debug, Clone)]
    enum BlockOp {
        /// `n` new sequences after the highest ever put, `size` bytes each,
        /// in one group.
        Append(u64, usize),
        /// Sequence `at` (an offset into 1..=highest) put again, or below
        /// the lowest stored.
        PutAgain(u64, usize),
        /// These offsets into 1..=highest removed, in one group.
        Delete(Vec<u64>),
        Clear,
        /// Closed and opened again.
        Reopen,
    }

    fn block_op() -> impl proptest::strategy::Strategy<Value = BlockOp> {
        use proptest::prelude::*;
        prop_oneof![
            5 => (1u64..150, prop_oneof![0usize..64, 900usize..1100])
                .prop_map(|(n, size)| BlockOp::Append(n, size)),
            1 => (1u64..8, 20_000usize..40_000).prop_map(|(n, size)| BlockOp::Append(n, size)),
            2 => (any::<u64>(), 0usize..2000).prop_map(|(at, size)| BlockOp::PutAgain(at, size)),
            3 => proptest::collection::vec(any::<u64>(), 0..40).prop_map(BlockOp::Delete),
            1 => Just(BlockOp::Clear),
            1 => Just(BlockOp::Reopen),
        ]
    }

    /// Every read of the store answers what a map of sequence -> record
    /// holds, through appends that fill blocks by count and by bytes, puts
    /// again at or below the highest sequence, removals and clears, and
    /// across reopens (the count is kept).
    fn check_against(s: &StreamStore, model: &std::collections::BTreeMap<u64, Vec<u8>>) {
        assert_eq!(s.stored_messages().unwrap(), model.len() as u64);
        let mut scanned = Vec::new();
        let n = s
            .scan(|seq, size, _| scanned.push((seq, size as usize)))
            .unwrap();
        assert_eq!(n, model.len() as u64);
        let want: Vec<(u64, usize)> = model.iter().map(|(k, v)| (*k, v.len())).collect();
        assert_eq!(scanned, want);
        let top = model.keys().next_back().copied().unwrap_or(0) + 2;
        for seq in (0..=top).step_by(usize::try_from(top / 37 + 1).unwrap()) {
            let got = s.get(seq).unwrap().map(|m| m.payload.to_vec());
            let want = model
                .get(&seq)
                .map(|r| record::decode(r).unwrap().payload.to_vec());
            assert_eq!(got, want, "get({seq})");
        }
        // Dense ascending (one scan over the blocks) and sparse batches.
        for (lo, step) in [(1, 1), (top / 3, 1), (1, 7)] {
            let seqs: Vec<u64> = (lo..lo + 60).map(|i| lo + (i - lo) * step).collect();
            let got: Vec<(u64, Vec<u8>)> = s
                .get_batch(&seqs)
                .unwrap()
                .into_iter()
                .map(|(k, m)| (k, m.payload.to_vec()))
                .collect();
            let want: Vec<(u64, Vec<u8>)> = seqs
                .iter()
                .filter_map(|k| {
                    model
                        .get(k)
                        .map(|r| (*k, record::decode(r).unwrap().payload.to_vec()))
                })
                .collect();
            assert_eq!(got, want, "get_batch from {lo} step {step}");
        }
        for (from, max, max_bytes) in [(0, 10, usize::MAX), (top / 2, 1000, 5000), (top, 5, 1)] {
            let got = s.raw_range(from, max, max_bytes).unwrap();
            let mut want = Vec::new();
            let mut bytes = 0;
            for (k, v) in model.range(from..) {
                if want.len() >= max || (!want.is_empty() && bytes + v.len() > max_bytes) {
                    break;
                }
                bytes += v.len();
                want.push((*k, v.clone()));
            }
            assert_eq!(got, want, "raw_range({from}, {max}, {max_bytes})");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]
        #[test]
        fn blocks_answer_what_a_map_of_records_holds(
            ops in proptest::collection::vec(block_op(), 1..10)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.redb");
            let mut s = open_store(dir.path());
            s.set_sync_interval(Some(Duration::from_secs(3600)));
            let mut model = std::collections::BTreeMap::new();
            let mut highest = 0u64;
            for (i, op) in ops.into_iter().enumerate() {
                let tag = i as u8;
                match op {
                    BlockOp::Append(n, size) => {
                        let mut writes = Vec::new();
                        for seq in highest + 1..=highest + n {
                            let r = sized(seq, size, tag);
                            model.insert(seq, r.clone());
                            writes.push(Write::Put(seq, r));
                        }
                        highest += n;
                        s.write_now(writes).unwrap();
                    }
                    BlockOp::PutAgain(at, size) => {
                        let seq = match highest {
                            0 => 1 + at % 5,
                            h => 1 + at % h,
                        };
                        highest = highest.max(seq);
                        let r = sized(seq, size, tag);
                        model.insert(seq, r.clone());
                        s.write_now(vec![Write::Put(seq, r)]).unwrap();
                    }
                    BlockOp::Delete(at) => {
                        let seqs: Vec<u64> =
                            at.iter().map(|a| 1 + a % highest.max(1)).collect();
                        for q in &seqs {
                            model.remove(q);
                        }
                        s.write_now(vec![Write::Delete(seqs)]).unwrap();
                    }
                    BlockOp::Clear => {
                        model.clear();
                        s.write_now(vec![Write::Clear]).unwrap();
                    }
                    BlockOp::Reopen => {
                        drop(s);
                        s = StreamStore::open(&path, 1 << 20).unwrap();
                        s.set_sync_interval(Some(Duration::from_secs(3600)));
                    }
                }
                check_against(&s, &model);
            }
        }
    }

    #[test]
    fn a_group_of_puts_is_stored_in_blocks_bounded_by_count_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        // 200 small records: blocks of BLOCK_MSGS.
        s.write_now((1..=200).map(|q| Write::Put(q, sized(q, 10, 1))).collect())
            .unwrap();
        // 40 records of 20 KiB: three to a block of BLOCK_BYTES.
        s.write_now(
            (201..=240)
                .map(|q| Write::Put(q, sized(q, 20 << 10, 2)))
                .collect(),
        )
        .unwrap();
        // Read past the store: its commits first.
        s.sync().unwrap();
        let txn = s.db.begin_read().unwrap();
        let t = txn.open_table(BLOCKS).unwrap();
        let sizes: Vec<(u64, usize)> = t
            .iter()
            .unwrap()
            .map(|i| {
                let (k, v) = i.unwrap();
                (k.value(), blocks::entries(k.value(), v.value()).count())
            })
            .collect();
        let small = 200usize.div_ceil(BLOCK_MSGS);
        assert_eq!(sizes.len(), small + 40usize.div_ceil(3), "{sizes:?}");
        assert_eq!(sizes[0], (1, BLOCK_MSGS));
        assert_eq!(sizes[small], (201, 3));
        assert!(sizes.iter().all(|(_, n)| *n <= BLOCK_MSGS));
        assert_eq!(s.stored_messages().unwrap(), 240);
    }

    #[test]
    fn puts_below_the_highest_sequence_keep_blocks_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path());
        s.write_now(vec![Write::Put(1_000_000, sized(1_000_000, 10, 1))])
            .unwrap();
        // Every one below what is stored: each goes into the block that
        // covers it, which splits past twice the bound.
        s.write_now((1..=1000).map(|q| Write::Put(q, sized(q, 10, 2))).collect())
            .unwrap();
        s.sync().unwrap();
        let txn = s.db.begin_read().unwrap();
        let t = txn.open_table(BLOCKS).unwrap();
        let sizes: Vec<usize> = t
            .iter()
            .unwrap()
            .map(|i| {
                let (k, v) = i.unwrap();
                blocks::entries(k.value(), v.value()).count()
            })
            .collect();
        assert!(sizes.iter().all(|n| *n <= 2 * BLOCK_MSGS), "{sizes:?}");
        assert!(sizes.len() > 1000 / (2 * BLOCK_MSGS), "{sizes:?}");
        let model: std::collections::BTreeMap<u64, Vec<u8>> = (1..=1000)
            .map(|q| (q, sized(q, 10, 2)))
            .chain([(1_000_000, sized(1_000_000, 10, 1))])
            .collect();
        drop((t, txn));
        check_against(&s, &model);
    }

    #[test]
    fn an_earlier_versions_records_are_moved_into_blocks_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(open_store(dir.path()));
        {
            // What an earlier version wrote: one record per key in `msgs`,
            // no count.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut msgs = txn.open_table(blocks::MSGS).unwrap();
                for q in (1..=300).filter(|q| q % 7 != 0) {
                    msgs.insert(q, sized(q, 100, 9).as_slice()).unwrap();
                }
                let mut meta = txn.open_table(META).unwrap();
                meta.remove(META_COUNT).unwrap();
                let mut last = [0u8; 16];
                last[..8].copy_from_slice(&300u64.to_le_bytes());
                meta.insert(META_LAST, last.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = StreamStore::open(&path, 1 << 20).unwrap();
        let model: std::collections::BTreeMap<u64, Vec<u8>> = (1..=300)
            .filter(|q| q % 7 != 0)
            .map(|q| (q, sized(q, 100, 9)))
            .collect();
        check_against(&s, &model);
        // Moved, not copied: the old table is gone, and a second open
        // writes nothing.
        let txn = s.db.begin_read().unwrap();
        assert!(matches!(
            txn.open_table(blocks::MSGS),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
        drop(txn);
        s.write_now(vec![Write::Put(301, sized(301, 5, 1))])
            .unwrap();
        drop(s);
        let s = StreamStore::open(&path, 1 << 20).unwrap();
        assert_eq!(s.stored_messages().unwrap(), model.len() as u64 + 1);
    }

    #[test]
    fn a_block_that_does_not_decode_is_reported_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = open_store(dir.path());
        s.write_now((1..=10).map(|q| Write::Put(q, sized(q, 10, 1))).collect())
            .unwrap();
        drop(s);
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(BLOCKS).unwrap();
                let cut = t.get(1).unwrap().unwrap().value()[..30].to_vec();
                t.insert(1, cut.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = StreamStore::open(&path, 1 << 20).unwrap();
        let e = s.get(5).unwrap_err().to_string();
        assert!(e.contains("block 1") && e.contains("cut short"), "{e}");
        assert!(s.scan(|_, _, _| {}).is_err());
        // Out of order is refused too.
        let mut b = Vec::new();
        for q in [3u64, 2] {
            b.extend_from_slice(&q.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        let got: Vec<_> = blocks::entries(2, &b).collect();
        assert!(got[1].is_err(), "{got:?}");
        let below: Vec<_> = blocks::entries(5, &b).collect();
        assert!(below[0].is_err(), "a sequence below its block's key");
    }
}
