//! The log store and state machine of one Raft group (openraft storage v2:
//! [`RaftLogStorage`] and [`RaftStateMachine`]).
//!
//! [`open`] opens (or creates) one group's database file and log files
//! ([`crate::wal`]) and returns both halves. The layout, encoding and
//! durability rules are in the crate documentation.
//!
//! The state machine keeps the key space in memory ([`Kv`]) and writes every
//! change through to redb. `apply` updates memory, the watch history and the
//! broadcast channel under one write lock, then commits the changed rows
//! outside the lock, so readers are never blocked by an fsync. Entries being
//! applied are committed in the Raft sense, so readers may see them before
//! the state-machine commit: after a crash the same entries are re-applied.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::applier::{Applier, LogSync};
use crate::commit::Commits;
pub use crate::durable::Durable;
use crate::durable::{clamp_to, DurableState};
pub use crate::error::StoreError;
use crate::error::{decode, encode};
use crate::kv::{
    Event, KeyValue, Kv, KvError, KvSnapshot, Lease, LeaseRecord, Limits, Request, Response,
    Workload,
};
use crate::wal::{Record, Wal, WalReader};
use crate::watch::History;
use crate::{LogId, MemberId, StorageError, StoredMembership, TypeConfig};

/// One log entry of this type configuration.
pub type Entry = openraft::Entry<TypeConfig>;
/// A snapshot of this type configuration.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// The live receiver of a watch: every change of the group as `(revision, event)`.
pub type EventReceiver = broadcast::Receiver<(u64, Event)>;
/// Snapshot metadata of this type configuration.
pub type Meta = SnapshotMeta<MemberId, openraft::EmptyNode>;

/// The on-disk format version stored under `sm_meta/format`.
pub const FORMAT_VERSION: u32 = 1;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("log_meta");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const FORMAT: &str = "format";
const LAST_APPLIED: &str = "last_applied";
const LAST_MEMBERSHIP: &str = "last_membership";
const REVISION: &str = "revision";
const SNAPSHOT_SEQ: &str = "snapshot_seq";
const SNAPSHOT_META: &str = "meta";
const SNAPSHOT_DATA: &str = "data";

/// A key's row in the `kv` table (the key is the row's key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredValue {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    pub lease: Option<u64>,
}

/// A lease's row in the `leases` table (the id is the row's key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    pub ttl_ms: u64,
}

/// Tuning of one group's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Limits of the key space.
    pub limits: Limits,
    /// Events kept for watches that start in the past (default 10,000).
    pub history_events: usize,
    /// Bound of the same history by size: key and value bytes plus 64 per
    /// event (default 64 MiB).
    pub history_bytes: usize,
    /// Capacity of the live event channel: how far a receiver may fall
    /// behind before it sees `Lagged` (default 1,024; at least 1). A slow
    /// receiver pins up to this many events in memory.
    pub broadcast_capacity: usize,
    /// Commit every `apply` with `Durability::Immediate` (default `true`).
    /// With `false` the state machine commits without fsync and relies on
    /// the log (always durable) and the persisted snapshot: after a crash
    /// openraft re-applies the committed log.
    pub durable_apply: bool,
    /// redb page cache in bytes (default 16 MiB).
    pub cache_bytes: usize,
    /// This member's ID, if known: the log store then reports the leader's
    /// own appends flushed before their fsync (see [`LogStore`]), and the
    /// state machine applies an entry only once the log has it on disk
    /// ([`Durable`]); whoever sends AppendEntries must clamp the commit
    /// index with [`Durable::clamp`]. `None` (the default) makes every
    /// append wait for the disk.
    pub member: Option<MemberId>,
    /// `None` (the default): every log write is synced (`fdatasync`)
    /// before it is acknowledged. `Some(d)`: appends, truncations, purges
    /// and commit hints are acknowledged once written to the operating
    /// system, and synced within `d` of the first unsynced write and at a
    /// clean close; a vote is always synced before it is acknowledged
    /// (with whatever is written before it). Such a log survives a crash
    /// of the process, not a power loss within `d` (see
    /// [`LogStore::set_sync_interval`], which changes it later).
    pub log_sync_interval: Option<std::time::Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits::default(),
            history_events: 10_000,
            history_bytes: 64 * 1024 * 1024,
            broadcast_capacity: 1_024,
            durable_apply: true,
            cache_bytes: 16 * 1024 * 1024,
            member: None,
            log_sync_interval: None,
        }
    }
}

/// Wraps a store error as openraft's storage error.
fn sto(
    subject: ErrorSubject<MemberId>,
    verb: ErrorVerb,
) -> impl FnOnce(StoreError) -> StorageError {
    move |e| StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

/// Runs blocking redb work (write transactions, fsync) off the async threads.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

fn get_meta<T, R>(table: &R, key: &str, what: &'static str) -> Result<Option<T>, StoreError>
where
    T: DeserializeOwned,
    R: ReadableTable<&'static str, &'static [u8]>,
{
    match table.get(key)? {
        Some(v) => Ok(Some(decode(what, v.value())?)),
        None => Ok(None),
    }
}

fn read_meta<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    let txn = db.begin_read()?;
    let t = txn.open_table(table)?;
    get_meta(&t, key, what)
}

/// Opens (or creates) the store of one group at `path` with default
/// [`Options`]. Blocking: call it from `spawn_blocking` or before the
/// runtime is busy.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    open_with(path, Options::default())
}

/// Opens (or creates) the store of one group at `path`, creating the parent
/// directory if needed. Refuses a file of another format version; restores
/// the state machine from the persisted snapshot when that is newer.
pub fn open_with(
    path: &Path,
    options: Options,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let member = options.member;
    let log_sync_interval = options.log_sync_interval;
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)?;
        }
    }
    let shown = path.display().to_string();
    let db = Database::builder()
        .set_cache_size(options.cache_bytes)
        .set_repair_callback(move |session| {
            tracing::warn!(
                path = %shown,
                progress = session.progress(),
                "repairing the raft store after an unclean shutdown"
            );
        })
        .create(path)?;
    let txn = db.begin_write()?;
    {
        txn.open_table(KV)?;
        txn.open_table(LEASES)?;
        txn.open_table(SNAPSHOT)?;
        let mut meta = txn.open_table(SM_META)?;
        let found: Option<u32> = get_meta(&meta, FORMAT, "format version")?;
        match found {
            Some(v) if v != FORMAT_VERSION => {
                return Err(StoreError::Format {
                    found: v,
                    expected: FORMAT_VERSION,
                })
            }
            Some(_) => {}
            None => {
                meta.insert(
                    FORMAT,
                    encode("format version", &FORMAT_VERSION)?.as_slice(),
                )?;
            }
        }
    }
    txn.commit()?;
    let db = Arc::new(db);
    let (writer, sm_thread) = if options.durable_apply {
        (None, None)
    } else {
        let (tx, rx) = std::sync::mpsc::channel();
        let writer_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("raft-sm-writer".into())
            .spawn(move || sm_writer(writer_db, rx))?;
        (Some(Mutex::new(tx)), Some(thread))
    };

    let (mut kv, mut last_applied, mut last_membership, seq) =
        load_state_machine(&db, &options.limits)?;
    let snap_meta: Option<Meta> = read_meta(&db, SNAPSHOT, SNAPSHOT_META, "snapshot meta")?;
    if let Some(meta) = snap_meta {
        if meta.last_log_id.map(|l| l.index) > last_applied.map(|l| l.index) {
            tracing::warn!(
                path = %path.display(),
                snapshot = %meta,
                "state machine older than its snapshot: restoring from the snapshot"
            );
            let data: Vec<u8> = {
                let txn = db.begin_read()?;
                let t = txn.open_table(SNAPSHOT)?;
                let data = t.get(SNAPSHOT_DATA)?;
                match data {
                    Some(d) => d.value().to_vec(),
                    None => return Err(StoreError::Corrupt("snapshot meta without data".into())),
                }
            };
            kv = install_state(&db, &meta, &data, &options.limits)?;
            last_applied = meta.last_log_id;
            last_membership = meta.last_membership.clone();
        }
    }
    tracing::debug!(
        path = %path.display(),
        revision = kv.revision(),
        keys = kv.len(),
        last_applied = ?last_applied,
        "raft store opened"
    );
    let wal = open_log(&db, &log_dir(path))?;
    let durable_tx = tokio::sync::watch::Sender::new(DurableState {
        last: wal.reader().last(),
        failed: None,
    });
    let durable = Durable {
        rx: durable_tx.subscribe(),
    };
    let log_reader = wal.reader();
    let log = LogStore::new(wal, member, (durable_tx, durable.clone()))?;
    log.set_sync_interval(log_sync_interval);
    let (tx, _) = broadcast::channel(options.broadcast_capacity.max(1));
    let state = SmState {
        history: History::new(kv.revision(), options.history_events, options.history_bytes),
        kv,
        last_applied,
        last_membership,
        events: tx,
    };
    let sm = StateMachineStore {
        shared: Arc::new(SmShared {
            db: db.clone(),
            options,
            state: RwLock::new(state),
            snapshot_seq: AtomicU64::new(seq),
            writer,
            thread: Mutex::new(sm_thread),
            durable,
            applier: RwLock::new(None),
            log: log_reader,
            log_syncer: log.syncer(),
        }),
    };
    Ok((log, sm))
}

type Loaded = (Kv, Option<LogId>, StoredMembership, u64);

/// Where the log of the store at `path` lives: `<group>.wal` beside
/// `<group>.redb` (see [`crate::wal`]).
pub fn log_dir(path: &Path) -> std::path::PathBuf {
    path.with_extension("wal")
}

/// Opens the log files in `dir`. A store written by an earlier version
/// kept its log in the redb file (tables `log` and `log_meta`): that log is
/// first copied into a new directory, which is renamed into place once
/// durable, and only then are the old tables dropped, so a crash at any
/// point leaves one whole copy.
fn open_log(db: &Database, dir: &Path) -> Result<Wal, StoreError> {
    let staging = dir.with_extension("wal.migrating");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    if !dir.exists() {
        if let Some(old) = old_log(db)? {
            tracing::info!(path = %dir.display(), entries = old.entries.len(), "moving the raft log out of the redb file");
            let mut wal = Wal::open(&staging)?;
            let mut records: Vec<Record<'_>> = Vec::new();
            if let Some(p) = old.last_purged {
                records.push(Record::Purge { upto: p });
            }
            if let Some(v) = old.vote {
                records.push(Record::Vote(v));
            }
            records.push(Record::Committed(old.committed));
            records.extend(old.entries.iter().map(|(log_id, bytes)| Record::Entry {
                log_id: *log_id,
                bytes,
            }));
            wal.write(&records)?;
            drop(wal);
            std::fs::rename(&staging, dir)?;
            if let Some(parent) = dir.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
        }
    }
    let wal = Wal::open(dir)?;
    // The old tables, once the log files hold their content (a write
    // transaction only when there are any: opening costs no commit).
    let old_tables = db
        .begin_read()?
        .list_tables()?
        .any(|t| t.name() == LOG.name() || t.name() == LOG_META.name());
    if old_tables {
        let txn = db.begin_write()?;
        txn.delete_table(LOG)?;
        txn.delete_table(LOG_META)?;
        txn.commit()?;
        tracing::info!(path = %dir.display(), "dropped the raft log tables of the redb file");
    }
    Ok(wal)
}

/// A log as earlier versions kept it in the redb file.
struct OldLog {
    entries: Vec<(LogId, Vec<u8>)>,
    vote: Option<Vote<MemberId>>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

/// The log in the redb file's `log` and `log_meta` tables, if there is one.
fn old_log(db: &Database) -> Result<Option<OldLog>, StoreError> {
    let txn = db.begin_read()?;
    let (log, meta) = match (txn.open_table(LOG), txn.open_table(LOG_META)) {
        (Ok(log), Ok(meta)) => (log, meta),
        (Err(redb::TableError::TableDoesNotExist(_)), _)
        | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(None),
        (Err(e), _) | (_, Err(e)) => return Err(e.into()),
    };
    let mut entries = Vec::new();
    for row in log.iter()? {
        let (_, v) = row?;
        let e: Entry = decode("log entry", v.value())?;
        entries.push((e.log_id, v.value().to_vec()));
    }
    Ok(Some(OldLog {
        entries,
        vote: get_meta(&meta, VOTE, "vote")?,
        committed: get_meta::<Option<LogId>, _>(&meta, COMMITTED, "committed")?.flatten(),
        last_purged: get_meta(&meta, LAST_PURGED, "last purged")?,
    }))
}

fn load_state_machine(db: &Database, limits: &Limits) -> Result<Loaded, StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(SM_META)?;
    let last_applied: Option<LogId> =
        get_meta::<Option<LogId>, _>(&meta, LAST_APPLIED, "last applied")?.flatten();
    let last_membership: StoredMembership =
        get_meta(&meta, LAST_MEMBERSHIP, "last membership")?.unwrap_or_default();
    let revision: u64 = get_meta(&meta, REVISION, "revision")?.unwrap_or(0);
    let seq: u64 = get_meta(&meta, SNAPSHOT_SEQ, "snapshot sequence")?.unwrap_or(0);
    let mut entries = Vec::new();
    for row in txn.open_table(KV)?.iter()? {
        let (k, v) = row?;
        let s: StoredValue = decode("kv row", v.value())?;
        entries.push(KeyValue {
            key: k.value().to_vec(),
            value: s.value,
            create_revision: s.create_revision,
            mod_revision: s.mod_revision,
            version: s.version,
            lease: s.lease,
        });
    }
    let mut leases = Vec::new();
    for row in txn.open_table(LEASES)?.iter()? {
        let (k, v) = row?;
        let s: StoredLease = decode("lease row", v.value())?;
        leases.push(LeaseRecord {
            id: k.value(),
            ttl_ms: s.ttl_ms,
        });
    }
    let kv = Kv::from_snapshot(
        KvSnapshot {
            revision,
            entries,
            leases,
            applier: None,
        },
        limits.clone(),
    )
    .map_err(|e| StoreError::Corrupt(e.0))?;
    Ok((kv, last_applied, last_membership, seq))
}

/// Replaces the whole persisted state machine with a snapshot's content and
/// makes it the current snapshot, in one durable transaction. Returns the
/// key space.
fn install_state(
    db: &Database,
    meta: &Meta,
    data: &[u8],
    limits: &Limits,
) -> Result<Kv, StoreError> {
    let snap: KvSnapshot = decode("snapshot data", data)?;
    let txn = db.begin_write()?;
    txn.delete_table(KV)?;
    txn.delete_table(LEASES)?;
    {
        let mut kv_t = txn.open_table(KV)?;
        for e in &snap.entries {
            let row = StoredValue {
                value: e.value.clone(),
                create_revision: e.create_revision,
                mod_revision: e.mod_revision,
                version: e.version,
                lease: e.lease,
            };
            kv_t.insert(e.key.as_slice(), encode("kv row", &row)?.as_slice())?;
        }
        let mut lease_t = txn.open_table(LEASES)?;
        for l in &snap.leases {
            lease_t.insert(
                l.id,
                encode("lease row", &StoredLease { ttl_ms: l.ttl_ms })?.as_slice(),
            )?;
        }
        let mut m = txn.open_table(SM_META)?;
        m.insert(
            LAST_APPLIED,
            encode("last applied", &meta.last_log_id)?.as_slice(),
        )?;
        m.insert(
            LAST_MEMBERSHIP,
            encode("last membership", &meta.last_membership)?.as_slice(),
        )?;
        m.insert(REVISION, encode("revision", &snap.revision)?.as_slice())?;
        let mut s = txn.open_table(SNAPSHOT)?;
        s.insert(SNAPSHOT_META, encode("snapshot meta", meta)?.as_slice())?;
        s.insert(SNAPSHOT_DATA, data)?;
    }
    txn.commit()?;
    Kv::from_snapshot(snap, limits.clone()).map_err(|e| StoreError::Corrupt(e.0))
}

// ---------------------------------------------------------------------------
// Log store
// ---------------------------------------------------------------------------

/// Sets a log's sync interval ([`LogStore::sync_interval`]).
#[derive(Clone, Debug)]
pub struct LogSyncInterval(Arc<AtomicU64>);

impl LogSyncInterval {
    /// `None`: every log write is synced before it is acknowledged (from
    /// the next one on). A duration under 1 ms is taken as 1 ms.
    pub fn set(&self, interval: Option<std::time::Duration>) {
        let ms = interval.map_or(0, |d| (d.as_millis() as u64).max(1));
        self.0.store(ms, Ordering::Release);
    }
}

/// Syncs a log up to an index on demand ([`LogStore::syncer`]): what an
/// applier whose own store is synced on its own schedule
/// ([`Applier::synced`]) calls before it makes an applied index durable,
/// so that with a sync interval a power loss can never leave the applier
/// ahead of the log it replays from. Cheap to clone.
#[derive(Clone)]
pub struct LogSyncer {
    synced_upto: Arc<AtomicU64>,
    shared: std::sync::Weak<LogShared>,
}

impl Debug for LogSyncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSyncer")
            .field("synced_upto", &self.synced_upto())
            .finish()
    }
}

impl LogSyncer {
    /// Every entry the log holds at an index up to this one is synced.
    pub fn synced_upto(&self) -> u64 {
        self.synced_upto.load(Ordering::Acquire)
    }

    /// Returns once every entry the log holds up to `index` is synced: at
    /// once when it is (an atomic load), else after one `fdatasync` of the
    /// log's writer (with whatever it writes meanwhile). **Blocks** the
    /// calling thread: call it from a thread that may block (a store's
    /// writer thread), never from an async task. An error when the log's
    /// writer failed or stopped without syncing.
    pub fn sync_to(&self, index: u64) -> Result<(), StoreError> {
        if self.synced_upto() >= index {
            return Ok(());
        }
        if let Some(shared) = self.shared.upgrade() {
            if sync_beside(&shared.writing, index)? {
                return Ok(());
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let Some(shared) = self.shared.upgrade() else {
                // Closed: its writer synced everything at the close (then
                // `synced_upto` is at its maximum) or could not.
                return if self.synced_upto() >= index {
                    Ok(())
                } else {
                    Err(StoreError::Task(format!(
                        "the raft log is closed, not synced up to index {index}"
                    )))
                };
            };
            shared.send(LogOp::Sync { done: tx })?;
        }
        rx.recv()
            .map_err(|_| StoreError::Task("the raft log writer has stopped".into()))?
            .map_err(StoreError::Task)
    }
}

/// [`LogSyncer::sync_to`] without the writer thread: when every entry up
/// to `index` is written, one `fdatasync` of the active segment on the
/// calling thread, outside the log's lock, so that the writer (and the
/// appends behind it: the leader's own copy, which its commit waits for,
/// and a follower's answer) goes on meanwhile instead of waiting for the
/// disk. Then, under the lock again, `synced_upto` rises to the last entry
/// written before the sync, unless a rewrite (truncation) came between
/// (then false: the writer syncs). A failed sync fails the log, as the
/// writer's does.
fn sync_beside(w: &Writing, index: u64) -> Result<bool, StoreError> {
    let (point, last, rewrites, reader) = {
        let wal = w.wal.lock();
        if w.on_disk.borrow().failed.is_some() {
            return Ok(false);
        }
        let last = last_index(&w.on_disk);
        if last < index {
            // Not all written yet: the writer syncs after writing them.
            return Ok(false);
        }
        let rewrites = w.rewrites.load(Ordering::Acquire);
        match wal.sync_point() {
            Some(p) => (p, last, rewrites, wal.reader()),
            None => {
                // Written and synced (by the writer, or at a rotation).
                w.synced_upto.fetch_max(last, Ordering::AcqRel);
                return Ok(true);
            }
        }
    };
    if let Err(e) = point.sync(&reader) {
        tracing::error!(error = %e, "raft log sync failed");
        let e = e.to_string();
        w.on_disk.send_modify(|d| {
            d.failed.get_or_insert(e.clone());
        });
        return Err(StoreError::Task(e));
    }
    let mut wal = w.wal.lock();
    if w.rewrites.load(Ordering::Acquire) != rewrites {
        return Ok(false);
    }
    if wal.synced_at(&point) {
        *w.dirty_since.lock() = None;
    }
    w.synced_upto.fetch_max(last, Ordering::AcqRel);
    Ok(true)
}

impl LogSync for LogSyncer {
    fn sync_to(&self, index: u64) -> Result<(), StoreError> {
        LogSyncer::sync_to(self, index)
    }
}

/// The Raft log and vote of one group ([`RaftLogStorage`]); also its own
/// [`RaftLogReader`]. Cheap to clone (shares the log files and the writer).
///
/// **Writes go through one writer thread** that takes every operation
/// queued while the previous write was being synced and writes them
/// together (group commit: one `fdatasync` for many appends). Appends are
/// readable at once (held in `pending` until they are on disk).
///
/// **The leader does not wait for its own fsync** (with
/// [`Options::member`] set): an append of entries of the leader this
/// member voted for itself is reported flushed to openraft at once, so
/// that openraft 0.9, which sends an entry to followers only after the
/// leader's flush callback, replicates it while the leader's copy is being
/// written: the leader's fsync and the followers' overlap instead of
/// following each other (Raft thesis §10.2.1). What keeps this safe is
/// [`Durable`]: nothing of an entry leaves the leader before its copy is
/// on disk. Every other append (a follower's) is reported, and returns,
/// only once durable, because openraft 0.9 answers AppendEntries when
/// `append` returns. Since followers may hold entries the leader's own log
/// lost in a crash, a restarted member never leads its old term again
/// ([`restarted_vote`]).
#[derive(Clone)]
pub struct LogStore {
    wal: WalReader,
    shared: Arc<LogShared>,
}

struct LogShared {
    /// Appended entries not yet known to be on disk, by index.
    /// Shared with the writer thread (which never holds `LogShared`, so the
    /// last handle is always dropped, and the writer joined, off it).
    pending: Arc<Mutex<BTreeMap<u64, Entry>>>,
    /// The last commit openraft reported, not yet written: the writer
    /// writes it with its next transaction (shared like `pending`).
    committed: Arc<Mutex<Option<LogId>>>,
    /// The last vote saved (to recognise this member's own leader entries).
    vote: Mutex<Option<Vote<MemberId>>>,
    /// This member, when known ([`Options::member`]).
    member: Option<MemberId>,
    writer: Mutex<Option<std::sync::mpsc::Sender<LogOp>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    durable: Durable,
    /// The log's sync interval in ms, 0 for none (shared with the writer).
    sync_interval_ms: Arc<AtomicU64>,
    /// Every entry this log holds at an index up to this one is synced
    /// (set by the writer; see [`LogSyncer`]).
    synced_upto: Arc<AtomicU64>,
    /// The writer's state (its thread's and inline appends').
    writing: Arc<Writing>,
    /// Proposers waiting for the commit of their tagged payloads
    /// (`crate::commit`).
    commits: Arc<Commits>,
}

impl LogShared {
    fn send(&self, op: LogOp) -> Result<(), StoreError> {
        let counted = !matches!(op, LogOp::Wake);
        let writer = self.writer.lock();
        let tx = writer
            .as_ref()
            .ok_or_else(|| StoreError::Task("the raft log writer has stopped".into()))?;
        if counted {
            self.writing.queued.fetch_add(1, Ordering::AcqRel);
        }
        tx.send(op).map_err(|_| {
            if counted {
                self.writing.queued.fetch_sub(1, Ordering::AcqRel);
            }
            StoreError::Task("the raft log writer has stopped".into())
        })
    }
}

impl Drop for LogShared {
    /// Stops the writer and waits for it, so that the database file is
    /// closed when the last handle is gone (a reopen right after works).
    fn drop(&mut self) {
        self.writer.lock().take();
        join_unless_self(self.thread.lock().take());
    }
}

/// Joins `thread` unless the caller is that thread (a writer may drop the
/// last handle itself).
fn join_unless_self(thread: Option<std::thread::JoinHandle<()>>) {
    if let Some(t) = thread {
        if t.thread().id() != std::thread::current().id() {
            let _ = t.join();
        }
    }
}

/// One write for the writer thread.
enum LogOp {
    Append {
        rows: Vec<(u64, Vec<u8>, LogId)>,
        /// `None` when already told (a leader's own entries).
        callback: Option<LogFlushed<TypeConfig>>,
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    },
    Truncate {
        from: u64,
        /// The log id left last (at `from - 1`), if any.
        keep: Option<LogId>,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    Purge {
        upto: LogId,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    Vote {
        vote: Vote<MemberId>,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Sync the log (with whatever else is in the batch): every entry
    /// written is then on disk ([`LogSyncer::sync_to`]; an applier asks
    /// only for entries written, which it has applied).
    Sync {
        done: std::sync::mpsc::Sender<Result<(), String>>,
    },
    /// Nothing to write: the writer looks at `dirty_since` again (an
    /// inline append left the log unsynced).
    Wake,
}

/// Most operations committed in one transaction.
const MAX_GROUP_COMMIT: usize = 4096;

impl LogOp {
    /// Adds this operation's log records to `out`.
    fn records<'a>(&'a self, out: &mut Vec<Record<'a>>) {
        match self {
            LogOp::Append { rows, .. } => {
                out.extend(rows.iter().map(|(_, bytes, log_id)| Record::Entry {
                    log_id: *log_id,
                    bytes,
                }));
            }
            LogOp::Truncate { from, .. } => out.push(Record::Truncate { from: *from }),
            LogOp::Purge { upto, .. } => out.push(Record::Purge { upto: *upto }),
            LogOp::Vote { vote, .. } => out.push(Record::Vote(*vote)),
            LogOp::Sync { .. } | LogOp::Wake => {}
        }
    }
}

/// The log's last entry once `batch` is committed, from `last` before it.
fn last_after(batch: &[LogOp], mut last: Option<LogId>) -> Option<LogId> {
    for op in batch {
        match op {
            LogOp::Append { rows, .. } => last = rows.last().map(|r| r.2).or(last),
            LogOp::Truncate { from, keep, .. } => {
                if last.is_some_and(|l| l.index >= *from) {
                    last = *keep;
                }
            }
            LogOp::Purge { .. } | LogOp::Vote { .. } | LogOp::Sync { .. } | LogOp::Wake => {}
        }
    }
    last
}

/// `synced_upto` lowered below what `batch` rewrites: a truncation, or an
/// append at an index the log held (only uncommitted entries are ever
/// rewritten, but a sync must not be skipped for their replacements).
fn synced_before(batch: &[LogOp], mut synced: u64) -> u64 {
    for op in batch {
        let from = match op {
            LogOp::Append { rows, .. } => rows.first().map(|r| r.0),
            LogOp::Truncate { from, .. } => Some(*from),
            _ => None,
        };
        if let Some(from) = from {
            synced = synced.min(from.saturating_sub(1));
        }
    }
    synced
}

/// Whether `batch` replaces entries the log held up to `last` (a
/// truncation, or an append at an index at or below it).
fn rewrites_held(batch: &[LogOp], last: u64) -> bool {
    batch.iter().any(|op| match op {
        LogOp::Append { rows, .. } => rows.first().is_some_and(|r| r.0 <= last),
        LogOp::Truncate { .. } => true,
        _ => false,
    })
}

/// Syncs what an interval left unsynced; a failure fails the log (what
/// was acknowledged may not reach the disk).
fn sync_late(
    wal: &mut Wal,
    on_disk: &tokio::sync::watch::Sender<DurableState>,
    synced_upto: &AtomicU64,
) {
    match wal.sync() {
        Ok(()) => synced_upto.store(last_index(on_disk), Ordering::Release),
        Err(e) => {
            tracing::error!(error = %e, "raft log sync failed");
            let e = e.to_string();
            on_disk.send_modify(|d| {
                d.failed.get_or_insert(e);
            });
        }
    }
}

/// The index of the last entry written (or purged), 0 for none.
fn last_index(on_disk: &tokio::sync::watch::Sender<DurableState>) -> u64 {
    on_disk.borrow().last.map_or(0, |l| l.index)
}

/// The log writer's state, shared by its thread and the appends written
/// inline (a follower's, with a sync interval: see [`LogStore`]).
struct Writing {
    wal: Mutex<Wal>,
    on_disk: tokio::sync::watch::Sender<DurableState>,
    /// When the oldest write not yet synced was made.
    dirty_since: Mutex<Option<std::time::Instant>>,
    /// Operations sent to the writer thread and not yet written: an append
    /// is written inline only when there are none (log order).
    queued: std::sync::atomic::AtomicUsize,
    pending: Arc<Mutex<BTreeMap<u64, Entry>>>,
    committed: Arc<Mutex<Option<LogId>>>,
    interval_ms: Arc<AtomicU64>,
    /// The interval (ms) the writer thread last waited with: an inline
    /// append wakes it when the interval has changed since.
    interval_seen: AtomicU64,
    synced_upto: Arc<AtomicU64>,
    /// Raised (under `wal`'s lock) by every write that replaces entries
    /// the log held (a truncation, an append at an index it held): a sync
    /// made outside the writer ([`LogSyncer::sync_to`]) then covers the
    /// entries it saw only if this did not move meanwhile.
    rewrites: AtomicU64,
    /// Appends written by their caller ([`LogStore::append_inline`]).
    inline_appends: AtomicU64,
}

impl Writing {
    fn interval(&self) -> Option<std::time::Duration> {
        match self.interval_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }
}

/// The writer thread: group commits until every `LogStore` clone is gone.
/// With a sync interval (`interval_ms` > 0) a batch without a vote is
/// written unsynced, and the writer syncs once the oldest unsynced write
/// is `interval_ms` old (waking up for it when idle) and at close.
fn log_writer(w: Arc<Writing>, rx: std::sync::mpsc::Receiver<LogOp>) {
    loop {
        w.interval_seen
            .store(w.interval_ms.load(Ordering::Acquire), Ordering::Release);
        let interval = w.interval();
        let due = w
            .dirty_since
            .lock()
            .map(|t| t + interval.unwrap_or_default());
        let first = match due {
            Some(due) => {
                match rx.recv_timeout(due.saturating_duration_since(std::time::Instant::now())) {
                    Ok(op) => op,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        let mut wal = w.wal.lock();
                        sync_late(&mut wal, &w.on_disk, &w.synced_upto);
                        if !wal.unsynced() {
                            *w.dirty_since.lock() = None;
                        }
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            None => match rx.recv() {
                Ok(op) => op,
                Err(_) => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP_COMMIT {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let counted = batch.iter().filter(|op| !matches!(op, LogOp::Wake)).count();
        let err = {
            // Held through the write: inline appends wait their turn.
            let mut wal = w.wal.lock();
            let last = last_after(&batch, w.on_disk.borrow().last);
            let mut records = Vec::new();
            for op in &batch {
                op.records(&mut records);
            }
            // The commit hint rides along, never ahead of the log it names.
            if let Some(c) = w.committed.lock().take() {
                records.push(Record::Committed(clamp_to(Some(c), last)));
            }
            let now = std::time::Instant::now();
            // As it stands now (it may have changed while the writer waited).
            let interval = w.interval();
            let mut dirty_since = w.dirty_since.lock();
            let asked = batch.iter().any(|op| matches!(op, LogOp::Sync { .. }));
            let sync = interval.is_none()
                || asked
                || batch.iter().any(|op| matches!(op, LogOp::Vote { .. }))
                || dirty_since.is_some_and(|t| now >= t + interval.unwrap_or_default());
            // Lowered before the write: nothing may skip a sync for entries
            // this batch rewrites.
            w.synced_upto.store(
                synced_before(&batch, w.synced_upto.load(Ordering::Acquire)),
                Ordering::Release,
            );
            if rewrites_held(&batch, last_index(&w.on_disk)) {
                w.rewrites.fetch_add(1, Ordering::AcqRel);
            }
            let result = if records.is_empty() {
                if sync {
                    wal.sync()
                } else {
                    Ok(())
                }
            } else {
                wal.write_with(&records, sync)
            };
            if result.is_ok() && !wal.unsynced() {
                // Every entry written, by this process or an earlier one.
                w.synced_upto
                    .store(last.map_or(0, |l| l.index), Ordering::Release);
            }
            if result.is_ok() {
                *dirty_since = if wal.unsynced() {
                    dirty_since.or(Some(now))
                } else {
                    None
                };
            }
            drop(dirty_since);
            drop(records);
            let err = result.as_ref().err().map(|e| e.to_string());
            w.on_disk.send_modify(|d| match &err {
                Some(e) => {
                    d.failed.get_or_insert_with(|| e.clone());
                }
                None => d.last = last,
            });
            // Written (or failed): an inline append may follow.
            w.queued.fetch_sub(counted, Ordering::AcqRel);
            err
        };
        if let Some(e) = &err {
            tracing::error!(error = %e, "raft log write failed");
        }
        for op in batch {
            let answer = match &err {
                None => Ok(()),
                Some(e) => Err(e.clone()),
            };
            match op {
                LogOp::Append {
                    rows,
                    callback,
                    done,
                } => {
                    crate::probe::mark(if callback.is_none() {
                        crate::probe::Phase::LeaderWritten
                    } else {
                        crate::probe::Phase::FollowerWritten
                    });
                    if answer.is_ok() {
                        {
                            let mut pending = w.pending.lock();
                            for (index, _, log_id) in &rows {
                                // Unless truncated and appended anew since.
                                if pending.get(index).is_some_and(|e| e.log_id == *log_id) {
                                    pending.remove(index);
                                }
                            }
                        }
                    }
                    if let Some(callback) = callback {
                        callback.log_io_completed(answer.clone().map_err(std::io::Error::other));
                    }
                    if let Some(done) = done {
                        let _ = done.send(answer);
                    }
                }
                LogOp::Truncate { done, .. }
                | LogOp::Purge { done, .. }
                | LogOp::Vote { done, .. } => {
                    let _ = done.send(answer);
                }
                LogOp::Sync { done, .. } => {
                    let _ = done.send(answer);
                }
                LogOp::Wake => {}
            }
        }
    }
    // Closed: the last commit hint, if it is not written yet, and what an
    // interval left unsynced.
    let mut wal = w.wal.lock();
    if let Some(c) = w.committed.lock().take() {
        let last = w.on_disk.borrow().last;
        if let Err(e) = wal.write(&[Record::Committed(clamp_to(Some(c), last))]) {
            tracing::warn!(error = %e, "could not save the raft commit index at close");
        }
    }
    match wal.sync() {
        // Nothing is written after this: every entry is synced.
        Ok(()) => w.synced_upto.store(u64::MAX, Ordering::Release),
        Err(e) => tracing::error!(error = %e, "raft log not synced at close"),
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    fn new(
        wal: Wal,
        member: Option<MemberId>,
        durable: (tokio::sync::watch::Sender<DurableState>, Durable),
    ) -> Result<Self, StoreError> {
        let reader = wal.reader();
        let vote = reader.vote().map(restarted_vote);
        let (tx, rx) = std::sync::mpsc::channel();
        let (durable_tx, durable) = durable;
        let sync_interval_ms = Arc::new(AtomicU64::new(0));
        // Nothing known synced: what an earlier process wrote may not be
        // (`Wal::unsynced`).
        let synced_upto = Arc::new(AtomicU64::new(0));
        let pending: Arc<Mutex<BTreeMap<u64, Entry>>> = Arc::default();
        let committed: Arc<Mutex<Option<LogId>>> = Arc::default();
        let writing = Arc::new(Writing {
            wal: Mutex::new(wal),
            on_disk: durable_tx,
            dirty_since: Mutex::new(None),
            queued: std::sync::atomic::AtomicUsize::new(0),
            pending: pending.clone(),
            committed: committed.clone(),
            interval_ms: sync_interval_ms.clone(),
            interval_seen: AtomicU64::new(0),
            synced_upto: synced_upto.clone(),
            rewrites: AtomicU64::new(0),
            inline_appends: AtomicU64::new(0),
        });
        let shared = Arc::new(LogShared {
            pending,
            committed,
            vote: Mutex::new(vote),
            member,
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(None),
            durable,
            sync_interval_ms,
            synced_upto,
            writing: writing.clone(),
            commits: Arc::default(),
        });
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || log_writer(writing, rx))?;
        *shared.thread.lock() = Some(thread);
        Ok(LogStore {
            wal: reader,
            shared,
        })
    }

    /// Sets the log's sync interval ([`Options::log_sync_interval`]);
    /// `None` syncs every write again from the next one on.
    pub fn set_sync_interval(&self, interval: Option<std::time::Duration>) {
        self.sync_interval().set(interval);
    }

    /// A handle that sets the sync interval later without keeping the log
    /// (or its writer) alive.
    pub fn sync_interval(&self) -> LogSyncInterval {
        LogSyncInterval(self.shared.sync_interval_ms.clone())
    }

    /// How many times the log was synced (`fdatasync`) since it was opened.
    pub fn syncs(&self) -> u64 {
        self.wal.syncs()
    }

    /// A handle that syncs this log up to an index on demand, without
    /// keeping the log (or its writer) alive.
    pub fn syncer(&self) -> LogSyncer {
        LogSyncer {
            synced_upto: self.shared.synced_upto.clone(),
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// How many appends their caller wrote itself, without the writer
    /// thread (with a sync interval, when the writer was idle).
    pub fn inline_appends(&self) -> u64 {
        self.shared.writing.inline_appends.load(Ordering::Relaxed)
    }

    /// How far this log is on disk.
    pub fn durable(&self) -> Durable {
        self.shared.durable.clone()
    }

    /// The waits for the commit of tagged payloads proposed on this member
    /// (`crate::commit`).
    pub fn commits(&self) -> Arc<Commits> {
        self.shared.commits.clone()
    }

    /// This member's leader id, if its saved vote is committed for itself.
    fn leading(&self) -> Option<openraft::LeaderId<MemberId>> {
        let me = self.shared.member?;
        let vote = self.shared.vote.lock();
        let vote = vote.as_ref()?;
        (vote.is_committed() && vote.leader_id().voted_for() == Some(me)).then(|| *vote.leader_id())
    }

    fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>, StoreError> {
        let bounds = || (range.start_bound().cloned(), range.end_bound().cloned());
        // Entries not yet on disk first: one the writer commits (and drops
        // from `pending`) after this is then in the disk's view read next.
        // The other order could miss it in both.
        let pending: Vec<(u64, Entry)> = self
            .shared
            .pending
            .lock()
            .range(bounds())
            .map(|(i, e)| (*i, e.clone()))
            .collect();
        let mut out: BTreeMap<u64, Entry> = self
            .wal
            .entries(bounds())?
            .into_iter()
            .map(|e| (e.log_id.index, e))
            .collect();
        // A pending entry is newer than what the disk holds at its index
        // (a truncated tail appended anew).
        out.extend(pending);
        Ok(out.into_values().collect())
    }

    fn log_state(&self) -> LogState<TypeConfig> {
        // Pending first, as in `entries`.
        let pending_last = self
            .shared
            .pending
            .lock()
            .last_key_value()
            .map(|(_, e)| e.log_id);
        LogState {
            last_log_id: pending_last.or(self.wal.last()),
            last_purged_log_id: self.wal.last_purged(),
        }
    }

    fn send(&self, op: LogOp) -> Result<(), StoreError> {
        self.shared.send(op)
    }

    /// Queues `make(done)` and waits for its commit.
    async fn write_wait(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), String>>) -> LogOp,
    ) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(make(tx))?;
        rx.await
            .map_err(|_| StoreError::Task("the raft log writer has stopped".into()))?
            .map_err(StoreError::Task)
    }

    /// Whether these entries are this member's own, as the leader it voted
    /// for itself: then `append` need not wait for the disk.
    fn own_leader_entries(&self, rows: &[(u64, Vec<u8>, LogId)]) -> bool {
        let Some(me) = self.shared.member else {
            return false;
        };
        let vote = self.shared.vote.lock();
        let Some(vote) = vote.as_ref() else {
            return false;
        };
        if !vote.is_committed() || vote.leader_id().voted_for() != Some(me) {
            return false;
        }
        // Without `single-term-leader`, a log id's leader is a `LeaderId`.
        let leader = vote.leader_id();
        rows.iter().all(|(_, _, id)| id.leader_id == *leader)
    }
}

/// The vote a member starts with: the one it saved, never committed.
///
/// openraft 0.9 restores a member whose saved vote is committed for itself
/// as the leader of that term at once, with the log it finds. But a leader
/// here sends its entries before its own copy is written (see
/// [`LogStore`]): a `kill -9` can take entries from its log that followers
/// hold. Leading that term again, it would append different entries under
/// the same log ids, which followers take for the ones they hold (Raft
/// matches entries by log id), and apply them in their place: one member
/// loses an entry a majority committed. Reported uncommitted, the vote
/// still bars voting for anyone else in that term, and the member leads
/// again only after winning an election in a later term.
fn restarted_vote(mut vote: Vote<MemberId>) -> Vote<MemberId> {
    vote.committed = false;
    vote
}

/// What [`LogStore::append_inline`] did.
enum Inline {
    /// Written (or failed), and the callback told.
    Done(Result<(), StorageError>),
    /// Left to the writer thread.
    Not(LogFlushed<TypeConfig>),
}

impl LogStore {
    /// With a sync interval, an append is only a write (no `fdatasync`):
    /// the caller (openraft's core) writes it itself when the writer
    /// thread has nothing queued and is not writing (log order), saving
    /// the hand-off to the thread and back: on a follower, on the path of
    /// every AppendEntries answer; on the leader (`leader`: its own
    /// entries), before the commit it may send and its own apply, which
    /// wait for its copy ([`Durable`]). Not when the write would start a
    /// segment (that syncs the closing one). The writer thread is woken
    /// when this leaves the log unsynced, to sync it within the interval.
    fn append_inline(
        &self,
        rows: &[(u64, Vec<u8>, LogId)],
        callback: LogFlushed<TypeConfig>,
        leader: bool,
    ) -> Inline {
        let w = &self.shared.writing;
        if w.interval().is_none() || w.queued.load(Ordering::Acquire) > 0 {
            return Inline::Not(callback);
        }
        let Some(mut wal) = w.wal.try_lock() else {
            return Inline::Not(callback);
        };
        // Under the lock: the thread decrements after its write, holding
        // it, so none is queued before this one.
        if w.queued.load(Ordering::Acquire) > 0 || wal.would_rotate() {
            return Inline::Not(callback);
        }
        let last = rows.last().map(|r| r.2).or(w.on_disk.borrow().last);
        let mut records: Vec<Record<'_>> = rows
            .iter()
            .map(|(_, bytes, log_id)| Record::Entry {
                log_id: *log_id,
                bytes,
            })
            .collect();
        if let Some(c) = w.committed.lock().take() {
            records.push(Record::Committed(clamp_to(Some(c), last)));
        }
        if let Some(first) = rows.first() {
            let synced = w.synced_upto.load(Ordering::Acquire);
            w.synced_upto
                .store(synced.min(first.0.saturating_sub(1)), Ordering::Release);
            if first.0 <= last_index(&w.on_disk) {
                w.rewrites.fetch_add(1, Ordering::AcqRel);
            }
        }
        let now = std::time::Instant::now();
        let result = wal.write_with(&records, false);
        drop(records);
        let wake = match &result {
            Ok(()) => {
                let mut dirty = w.dirty_since.lock();
                // The writer waits for the interval only once told of an
                // unsynced write; one that is due (the interval may have
                // been shortened) is synced now.
                let interval = w.interval().unwrap_or_default();
                let wake = dirty.is_none_or(|t| now >= t + interval)
                    || w.interval_seen.load(Ordering::Acquire)
                        != w.interval_ms.load(Ordering::Acquire);
                dirty.get_or_insert(now);
                w.on_disk.send_modify(|d| d.last = last);
                wake
            }
            Err(e) => {
                let e = e.to_string();
                tracing::error!(error = %e, "raft log write failed");
                w.on_disk.send_modify(|d| {
                    d.failed.get_or_insert(e);
                });
                false
            }
        };
        drop(wal);
        w.inline_appends.fetch_add(1, Ordering::Relaxed);
        crate::probe::mark(if leader {
            crate::probe::Phase::LeaderWritten
        } else {
            crate::probe::Phase::FollowerWritten
        });
        if wake {
            // Not counted, not awaited: the writer looks at the interval.
            let _ = self.send(LogOp::Wake);
        }
        let answer = result.map_err(|e| e.to_string());
        callback.log_io_completed(answer.clone().map_err(std::io::Error::other));
        Inline::Done(
            answer
                .map_err(StoreError::Task)
                .map_err(sto(ErrorSubject::Logs, ErrorVerb::Write)),
        )
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.entries(range)
            .map_err(sto(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        Ok(self.log_state())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<MemberId>) -> Result<(), StorageError> {
        self.write_wait(|done| LogOp::Vote { vote: *vote, done })
            .await
            .map_err(sto(ErrorSubject::Vote, ErrorVerb::Write))?;
        *self.shared.vote.lock() = Some(*vote);
        self.shared.commits.voted(self.leading());
        Ok(())
    }

    /// openraft reads it once, at start. A vote this member's leadership
    /// committed comes back uncommitted ([`restarted_vote`]).
    async fn read_vote(&mut self) -> Result<Option<Vote<MemberId>>, StorageError> {
        Ok(self.wal.vote().map(restarted_vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint for restarts (re-apply less): written with the writer's
        // next transaction, not one of its own (a follower hears of a
        // commit after every write; a transaction each would cost it CPU
        // on the path of the next write).
        if let Some(c) = committed {
            *self.shared.committed.lock() = committed;
            // Proposers waiting for this commit are answered now, before
            // the state machine applies it (`crate::commit`).
            self.shared.commits.committed(c, self.leading());
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.wal.committed())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        let mut fresh = Vec::new();
        for e in entries {
            let bytes =
                encode("log entry", &e).map_err(sto(ErrorSubject::Logs, ErrorVerb::Write))?;
            rows.push((e.log_id.index, bytes, e.log_id));
            fresh.push(e);
        }
        if rows.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        // Before openraft hears of the append (it may commit then).
        self.shared.commits.appended(&fresh);
        let early = self.own_leader_entries(&rows);
        crate::probe::mark(if early {
            crate::probe::Phase::LeaderAppend
        } else {
            crate::probe::Phase::FollowerAppend
        });
        // A leader's own entries too: written inline, they are on disk
        // before openraft hears of them, so neither the replication (for
        // the commit it sends) nor the state machine waits for the writer.
        let callback = match self.append_inline(&rows, callback, early) {
            Inline::Done(r) => return r,
            Inline::Not(callback) => callback,
        };
        {
            // Readable from now on, before they reach the disk.
            let mut pending = self.shared.pending.lock();
            for e in fresh {
                pending.insert(e.log_id.index, e);
            }
        }
        let (callback, done, wait) = if early {
            // Reported flushed now; see the type's documentation and
            // `Durable` for why this is safe.
            callback.log_io_completed(Ok(()));
            (None, None, None)
        } else {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(callback), Some(tx), Some(rx))
        };
        self.send(LogOp::Append {
            rows,
            callback,
            done,
        })
        .map_err(sto(ErrorSubject::Logs, ErrorVerb::Write))?;
        if let Some(rx) = wait {
            rx.await
                .map_err(|_| StoreError::Task("the raft log writer has stopped".into()))
                .and_then(|r| r.map_err(StoreError::Task))
                .map_err(sto(ErrorSubject::Logs, ErrorVerb::Write))?;
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating raft log");
        self.shared.commits.truncated(log_id.index);
        self.shared.pending.lock().retain(|i, _| *i < log_id.index);
        let keep = match log_id.index.checked_sub(1) {
            None => None,
            Some(i) => self
                .entries(i..=i)
                .map_err(sto(ErrorSubject::Log(log_id), ErrorVerb::Read))?
                .last()
                .map(|e| e.log_id)
                .or(self.wal.last_purged()),
        };
        self.write_wait(|done| LogOp::Truncate {
            from: log_id.index,
            keep,
            done,
        })
        .await
        .map_err(sto(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging raft log");
        self.shared.commits.purged(log_id.index);
        self.shared.pending.lock().retain(|i, _| *i > log_id.index);
        self.write_wait(|done| LogOp::Purge { upto: log_id, done })
            .await
            .map_err(sto(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}

// ---------------------------------------------------------------------------
// State machine
// ---------------------------------------------------------------------------

struct SmState {
    kv: Kv,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    history: History,
    events: broadcast::Sender<(u64, Event)>,
}

struct SmShared {
    db: Arc<Database>,
    options: Options,
    state: RwLock<SmState>,
    snapshot_seq: AtomicU64,
    /// With `durable_apply = false`: the thread that writes applied changes
    /// behind `apply`, merging whatever queued up into one transaction.
    writer: Option<Mutex<std::sync::mpsc::Sender<SmOp>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The log's progress to disk: with `Options::member` set, entries are
    /// applied only once on disk here (see [`Durable`]).
    durable: Durable,
    /// Where opaque entries go ([`crate::applier`]).
    applier: RwLock<Option<Arc<dyn Applier>>>,
    /// The log, to name the entry an unsynced applier is back to
    /// ([`Applier::synced`]).
    log: crate::wal::WalReader,
    /// Syncs the log for an applier ([`Applier::attach_log`]).
    log_syncer: LogSyncer,
}

impl Drop for SmShared {
    fn drop(&mut self) {
        self.writer.take();
        join_unless_self(self.thread.lock().take());
    }
}

/// One state-machine write for the writer thread.
enum SmOp {
    Write(Box<SmWrite>),
    /// Answered once everything queued before it is committed.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

struct SmWrite {
    writes: Writes,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    revision: u64,
}

impl SmWrite {
    /// Folds a later write into this one (the later value of a key wins).
    fn absorb(&mut self, later: SmWrite) {
        self.writes.kv.extend(later.writes.kv);
        self.writes.leases.extend(later.writes.leases);
        self.writes.membership_changed |= later.writes.membership_changed;
        self.last_applied = later.last_applied;
        self.membership = later.membership;
        self.revision = later.revision;
    }
}

/// The state machine's writer thread: runs until the store is dropped.
fn sm_writer(db: Arc<Database>, rx: std::sync::mpsc::Receiver<SmOp>) {
    let flush = |w: &mut Option<SmWrite>| {
        if let Some(w) = w.take() {
            if let Err(e) = StateMachineStore::persist_writes(
                &db,
                false,
                &w.writes,
                w.last_applied,
                &w.membership,
                w.revision,
            ) {
                // Not lost: after a restart the state machine is rebuilt
                // from the last snapshot and the log.
                tracing::error!(error = %e, "raft state machine write failed");
            }
        }
    };
    let mut last_flush: Option<std::time::Instant> = None;
    while let Ok(first) = rx.recv() {
        let mut merged: Option<SmWrite> = None;
        let mut next = Some(first);
        let mut waited = false;
        loop {
            while let Some(op) = next.take() {
                match op {
                    SmOp::Write(w) => match &mut merged {
                        Some(m) => m.absorb(*w),
                        None => merged = Some(*w),
                    },
                    SmOp::Barrier(done) => {
                        flush(&mut merged);
                        last_flush = Some(std::time::Instant::now());
                        let _ = done.send(());
                    }
                }
                next = rx.try_recv().ok();
            }
            // At most one transaction per SM_FLUSH_EVERY: what applies
            // meanwhile is merged into it (less CPU beside the writes).
            let due = last_flush.map(|t| t + SM_FLUSH_EVERY);
            match due {
                Some(due) if !waited && merged.is_some() => {
                    let now = std::time::Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    waited = true;
                    next = rx.try_recv().ok();
                }
                _ => break,
            }
        }
        if merged.is_some() {
            flush(&mut merged);
            last_flush = Some(std::time::Instant::now());
        }
    }
}

/// Replaces the key space's placeholder answers to opaque requests (in a
/// batch too) with the applier's, in order.
fn fill_opaque(response: &mut Response, answers: &mut impl Iterator<Item = Response>) {
    match response {
        Response::Opaque(_) => {
            if let Some(a) = answers.next() {
                *response = a;
            }
        }
        Response::Batch(v) => {
            for r in v.iter_mut() {
                if let Response::Opaque(_) = r {
                    if let Some(a) = answers.next() {
                        *r = a;
                    }
                }
            }
        }
        _ => {}
    }
}

/// The state machine writer's pace: at most one transaction this often.
const SM_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(5);

/// The KV state machine of one group ([`RaftStateMachine`]) and its read
/// side. Cheap to clone: every clone shares the same state; give one to
/// openraft and keep others for reads and watches.
///
/// Reads are local: for a linearizable read call
/// `raft.ensure_linearizable().await` first; without it a read is stale
/// by however far this member is behind.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<SmShared>,
}

impl Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("StateMachineStore")
            .field("revision", &st.kv.revision())
            .field("keys", &st.kv.len())
            .field("last_applied", &st.last_applied)
            .finish_non_exhaustive()
    }
}

/// Rows changed by one `apply` call, written after the in-memory apply.
#[derive(Default)]
struct Writes {
    kv: BTreeMap<Vec<u8>, Option<KeyValue>>,
    leases: BTreeMap<u64, Option<u64>>,
    membership_changed: bool,
}

impl StateMachineStore {
    fn state(&self) -> RwLockReadGuard<'_, SmState> {
        self.shared.state.read()
    }

    /// Sets the applier of the group's opaque entries. Set it before the
    /// store is given to openraft: an opaque entry applied without one is
    /// answered [`KvError::NoApplier`] and lost to the applier.
    pub fn set_applier(&self, applier: Arc<dyn Applier>) {
        applier.attach_log(Arc::new(self.shared.log_syncer.clone()));
        *self.shared.applier.write() = Some(applier);
    }

    fn applier(&self) -> Option<Arc<dyn Applier>> {
        self.shared.applier.read().clone()
    }

    /// Takes the opaque payloads out of `entries` (leaving empty ones) and
    /// hands them to the applier; returns one answer per payload, in
    /// order (`NoApplier` errors without one).
    async fn apply_opaque(&self, entries: &mut [Entry]) -> Result<Vec<Response>, StorageError> {
        let mut taken: Vec<(u64, Vec<u8>)> = Vec::new();
        for entry in entries.iter_mut() {
            let index = entry.log_id.index;
            match &mut entry.payload {
                EntryPayload::Normal(Request::Opaque(bytes)) => {
                    taken.push((index, bytes.take_bytes()))
                }
                EntryPayload::Normal(Request::Batch(requests)) => {
                    for r in requests.iter_mut() {
                        if let Request::Opaque(bytes) = r {
                            taken.push((index, bytes.take_bytes()));
                        }
                    }
                }
                _ => {}
            }
        }
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let Some(applier) = self.applier() else {
            return Ok(taken
                .iter()
                .map(|_| Response::Error(KvError::NoApplier))
                .collect());
        };
        let n = taken.len();
        let answers = applier.apply(taken).await.map_err(|e| {
            tracing::error!(error = %e, "raft applier failed");
            Self::io_sm(ErrorVerb::Write)(StoreError::Task(format!("applier: {e}")))
        })?;
        if answers.len() != n {
            return Err(Self::io_sm(ErrorVerb::Write)(StoreError::Task(format!(
                "applier answered {} of {n} entries",
                answers.len()
            ))));
        }
        Ok(answers.into_iter().map(Response::Opaque).collect())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, SmState> {
        self.shared.state.write()
    }

    /// One key (reserved keys included).
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.state().kv.get(key)
    }

    /// Keys starting with `prefix` in key order, at most `limit` (0: all).
    /// Reserved keys only when `prefix` starts with `0x00`.
    pub fn range(&self, prefix: &[u8], limit: usize) -> Vec<KeyValue> {
        self.state().kv.range(prefix, limit)
    }

    /// Number of keys starting with `prefix` (same visibility as `range`).
    pub fn count(&self, prefix: &[u8]) -> usize {
        self.state().kv.count(prefix)
    }

    /// The group's current revision.
    pub fn revision(&self) -> u64 {
        self.state().kv.revision()
    }

    /// Runs `f` on the key space under one read lock, for consistent
    /// multi-key reads (e.g. a range together with its revision).
    pub fn read<R>(&self, f: impl FnOnce(&Kv) -> R) -> R {
        f(&self.state().kv)
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId> {
        self.state().last_applied
    }

    /// The last applied membership.
    pub fn membership(&self) -> StoredMembership {
        self.state().last_membership.clone()
    }

    /// Every lease with its keys; a new leader restarts each timer at the
    /// full `ttl_ms`.
    pub fn leases(&self) -> Vec<Lease> {
        self.state().kv.leases()
    }

    /// One lease.
    pub fn lease(&self, id: u64) -> Option<Lease> {
        self.state().kv.lease(id)
    }

    /// The members registered for workload `name`.
    pub fn workloads(&self, name: &str) -> Vec<Workload> {
        self.state().kv.workloads(name)
    }

    /// Every workload registration, by name then member.
    pub fn all_workloads(&self) -> Vec<Workload> {
        self.state().kv.all_workloads()
    }

    /// The oldest revision a watch can start from.
    pub fn oldest_watchable(&self) -> u64 {
        self.state().history.oldest()
    }

    /// Starts a watch of `prefix` from `from_revision` (0: from now).
    ///
    /// Returns the retained events matching `prefix` with revision `>=
    /// from_revision`, and a receiver of every later change of the group
    /// (not filtered: keep those where
    /// [`crate::kv::matches_prefix`]`(prefix, event.key())`). The backlog
    /// ends exactly where the receiver starts. See [`crate::watch`] for
    /// `Lagged` and `Closed`. Fails with [`KvError::Compacted`] when
    /// `from_revision` is older than the history.
    pub fn watch(
        &self,
        prefix: &[u8],
        from_revision: u64,
    ) -> Result<(Vec<Event>, EventReceiver), KvError> {
        let st = self.state();
        let backlog = st.history.backlog(prefix, from_revision)?;
        Ok((backlog, st.events.subscribe()))
    }

    /// The log id of the entry at `index` (`None` for 0): in the log, its
    /// last purged entry, or the current snapshot's last.
    fn log_id_at(&self, index: u64) -> Result<Option<LogId>, StoreError> {
        if index == 0 {
            return Ok(None);
        }
        let log = &self.shared.log;
        if let Some(id) = log.log_id(index) {
            return Ok(Some(id));
        }
        if let Some(p) = log.last_purged().filter(|p| p.index == index) {
            return Ok(Some(p));
        }
        let snap: Option<Meta> =
            read_meta(&self.shared.db, SNAPSHOT, SNAPSHOT_META, "snapshot meta")?;
        if let Some(l) = snap
            .and_then(|m| m.last_log_id)
            .filter(|l| l.index == index)
        {
            return Ok(Some(l));
        }
        Err(StoreError::Corrupt(format!(
            "the applier is synced up to log index {index}, which the log no longer holds (purged up to {:?})",
            log.last_purged().map(|p| p.index)
        )))
    }

    fn io_sm(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError {
        sto(ErrorSubject::StateMachine, verb)
    }

    fn persist_writes(
        db: &Database,
        durable: bool,
        writes: &Writes,
        last_applied: Option<LogId>,
        membership: &StoredMembership,
        revision: u64,
    ) -> Result<(), StoreError> {
        let mut txn = db.begin_write()?;
        if !durable {
            txn.set_durability(Durability::None);
        }
        {
            let mut kv_t = txn.open_table(KV)?;
            for (key, kv) in &writes.kv {
                match kv {
                    Some(kv) => {
                        let row = StoredValue {
                            value: kv.value.clone(),
                            create_revision: kv.create_revision,
                            mod_revision: kv.mod_revision,
                            version: kv.version,
                            lease: kv.lease,
                        };
                        kv_t.insert(key.as_slice(), encode("kv row", &row)?.as_slice())?;
                    }
                    None => {
                        kv_t.remove(key.as_slice())?;
                    }
                }
            }
            let mut lease_t = txn.open_table(LEASES)?;
            for (&id, ttl) in &writes.leases {
                match ttl {
                    Some(ttl_ms) => {
                        lease_t.insert(
                            id,
                            encode("lease row", &StoredLease { ttl_ms: *ttl_ms })?.as_slice(),
                        )?;
                    }
                    None => {
                        lease_t.remove(id)?;
                    }
                }
            }
            let mut m = txn.open_table(SM_META)?;
            m.insert(
                LAST_APPLIED,
                encode("last applied", &last_applied)?.as_slice(),
            )?;
            if writes.membership_changed {
                m.insert(
                    LAST_MEMBERSHIP,
                    encode("last membership", membership)?.as_slice(),
                )?;
            }
            m.insert(REVISION, encode("revision", &revision)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    /// openraft asks this at start only. With an applier whose changes
    /// are synced behind ([`Applier::synced`]), the lower of the two applied
    /// indexes: openraft re-applies the log from there, the key space
    /// takes those entries again (harmless for a group of opaque entries
    /// only) and the applier takes what a crash lost.
    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let (mut last, membership) = {
            let st = self.state();
            (st.last_applied, st.last_membership.clone())
        };
        let synced = self.applier().and_then(|a| a.synced());
        if let (Some(synced), Some(l)) = (synced, last) {
            if synced < l.index {
                last = self
                    .log_id_at(synced)
                    .map_err(Self::io_sm(ErrorVerb::Read))?;
                tracing::info!(
                    applied = l.index,
                    synced,
                    "the applier is synced behind the state machine: the log is re-applied from its index"
                );
            }
        }
        Ok((last, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // The leader's apply of its own entries only (a follower applies
        // the previous entry when the next one tells it of its commit).
        let own = crate::probe::on()
            && entries.last().is_some_and(|e| {
                self.shared.options.member.is_some()
                    && e.log_id.leader_id.voted_for() == self.shared.options.member
            });
        if own {
            crate::probe::mark(crate::probe::Phase::ApplyStart);
        }
        if let (Some(last), Some(_)) = (entries.last(), self.shared.options.member) {
            // A leader's own entries may be committed before its copy is
            // on disk: applied (and so answered) only once it is.
            self.shared
                .durable
                .wait(last.log_id.index)
                .await
                .map_err(Self::io_sm(ErrorVerb::Write))?;
        }
        let mut entries = entries;
        // The applier's entries go first, before `last_applied` moves (see
        // `crate::applier`); their answers replace the key space's
        // placeholders below, in the same order.
        let mut opaque_answers = self.apply_opaque(&mut entries).await?.into_iter();
        if own {
            crate::probe::mark(crate::probe::Phase::Applied);
        }
        let mut responses = Vec::new();
        let mut writes = Writes::default();
        let (last_applied, membership, revision) = {
            let mut guard = self.state_mut();
            let st = &mut *guard;
            for entry in entries {
                st.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => responses.push(Response::Empty),
                    EntryPayload::Normal(request) => {
                        let mut applied = st.kv.apply(request);
                        fill_opaque(&mut applied.response, &mut opaque_answers);
                        for event in applied.events {
                            match &event {
                                Event::Put(kv) => {
                                    writes.kv.insert(kv.key.clone(), Some(kv.clone()))
                                }
                                Event::Delete { key, .. } => writes.kv.insert(key.clone(), None),
                            };
                            st.history.push(event.clone());
                            // No receivers is not an error.
                            let _ = st.events.send((event.revision(), event));
                        }
                        for (id, ttl) in applied.lease_changes {
                            writes.leases.insert(id, ttl);
                        }
                        responses.push(applied.response);
                    }
                    EntryPayload::Membership(m) => {
                        st.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        writes.membership_changed = true;
                        responses.push(Response::Empty);
                    }
                }
            }
            (
                st.last_applied,
                st.last_membership.clone(),
                st.kv.revision(),
            )
        };
        if responses.is_empty() {
            return Ok(responses);
        }
        if let Some(writer) = &self.shared.writer {
            // Committed in the Raft sense already: persisted behind, merged
            // with the next applies (see `Options::durable_apply`).
            let op = SmOp::Write(Box::new(SmWrite {
                writes,
                last_applied,
                membership,
                revision,
            }));
            writer
                .lock()
                .send(op)
                .map_err(|_| StoreError::Task("the state machine writer has stopped".into()))
                .map_err(Self::io_sm(ErrorVerb::Write))?;
            if own {
                crate::probe::mark(crate::probe::Phase::ApplyDone);
            }
            return Ok(responses);
        }
        let db = self.shared.db.clone();
        let durable = self.shared.options.durable_apply;
        blocking(move || {
            Self::persist_writes(&db, durable, &writes, last_applied, &membership, revision)
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "raft state machine commit failed");
            Self::io_sm(ErrorVerb::Write)(e)
        })?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        tracing::info!(snapshot = %meta, "installing raft snapshot");
        // Changes applied before the snapshot reach the disk first; the
        // snapshot then replaces them.
        if let Some(writer) = &self.shared.writer {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if writer.lock().send(SmOp::Barrier(tx)).is_ok() {
                let _ = rx.await;
            }
        }
        let data = snapshot.into_inner();
        // The applier first: it is never behind what the store reports
        // applied (a failed install leaves the old state machine).
        if let Some(applier) = self.applier() {
            let snap: KvSnapshot = decode("snapshot data", &data).map_err(sto(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
            ))?;
            if let Some(state) = snap.applier {
                applier.install(state).await.map_err(|e| {
                    tracing::error!(error = %e, "raft applier could not install a snapshot");
                    sto(
                        ErrorSubject::Snapshot(Some(meta.signature())),
                        ErrorVerb::Write,
                    )(StoreError::Task(format!("applier install: {e}")))
                })?;
            }
        }
        let db = self.shared.db.clone();
        let limits = self.shared.options.limits.clone();
        let owned_meta = meta.clone();
        let kv = blocking(move || install_state(&db, &owned_meta, &data, &limits))
            .await
            .map_err(sto(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
            ))?;
        let mut st = self.state_mut();
        st.history.reset(kv.revision());
        st.kv = kv;
        st.last_applied = meta.last_log_id;
        st.last_membership = meta.last_membership.clone();
        // Receivers of the old channel see `Closed` and re-subscribe.
        st.events = broadcast::channel(self.shared.options.broadcast_capacity.max(1)).0;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let read = || -> Result<Option<Snapshot>, StoreError> {
            let txn = self.shared.db.begin_read()?;
            let t = txn.open_table(SNAPSHOT)?;
            let Some(meta) = get_meta::<Meta, _>(&t, SNAPSHOT_META, "snapshot meta")? else {
                return Ok(None);
            };
            let data = match t.get(SNAPSHOT_DATA)? {
                Some(d) => d.value().to_vec(),
                None => return Err(StoreError::Corrupt("snapshot meta without data".into())),
            };
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
        };
        read().map_err(sto(ErrorSubject::Snapshot(None), ErrorVerb::Read))
    }
}

/// Builds a snapshot of the whole state machine and persists it as the
/// current snapshot ([`RaftSnapshotBuilder`]).
pub struct SnapshotBuilder {
    sm: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (mut snap, last_applied, last_membership) = {
            let st = self.sm.state();
            (
                st.kv.to_snapshot(),
                st.last_applied,
                st.last_membership.clone(),
            )
        };
        // Taken after `last_applied`: the applier is at or past it.
        if let Some(applier) = self.sm.applier() {
            let state = applier.snapshot().map_err(|e| {
                sto(ErrorSubject::Snapshot(None), ErrorVerb::Read)(StoreError::Task(format!(
                    "applier snapshot: {e}"
                )))
            })?;
            snap.applier = Some(state);
        }
        let seq = self.sm.shared.snapshot_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
            None => format!("0-0-{seq}"),
        };
        let meta = Meta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        let db = self.sm.shared.db.clone();
        let owned_meta = meta.clone();
        let data = blocking(move || {
            let data = encode("snapshot data", &snap)?;
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(SNAPSHOT)?;
                let current: Option<Meta> = get_meta(&t, SNAPSHOT_META, "snapshot meta")?;
                let newer = current.is_none_or(|c| {
                    c.last_log_id.map(|l| l.index) <= owned_meta.last_log_id.map(|l| l.index)
                });
                if newer {
                    t.insert(
                        SNAPSHOT_META,
                        encode("snapshot meta", &owned_meta)?.as_slice(),
                    )?;
                    t.insert(SNAPSHOT_DATA, data.as_slice())?;
                } else {
                    tracing::debug!(snapshot = %owned_meta, "a newer snapshot is already current");
                }
                txn.open_table(SM_META)?
                    .insert(SNAPSHOT_SEQ, encode("snapshot sequence", &seq)?.as_slice())?;
            }
            txn.commit()?;
            Ok(data)
        })
        .await
        .map_err(sto(
            ErrorSubject::Snapshot(Some(meta.signature())),
            ErrorVerb::Write,
        ))?;
        tracing::info!(snapshot = %meta, bytes = data.len(), "raft snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use openraft::CommittedLeaderId;

    use super::*;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, MemberId::from(1)), index)
    }

    fn put(index: u64, key: &str) -> Entry {
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(Request::Put {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                lease: None,
                prev_kv: false,
            }),
        }
    }

    #[tokio::test]
    async fn only_the_members_own_leader_entries_skip_the_fsync_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = MemberId::from(1u64);
        let other = MemberId::from(2u64);
        let opts = |member| Options {
            member,
            ..Options::default()
        };
        let (mut log, _sm) = open_with(&dir.path().join("a.redb"), opts(Some(me))).expect("open");
        let rows = |leader: MemberId| {
            vec![(
                1u64,
                Vec::new(),
                LogId::new(openraft::CommittedLeaderId::new(3, leader), 1),
            )]
        };
        // No vote yet, then a vote not yet committed: wait.
        assert!(!log.own_leader_entries(&rows(me)));
        log.save_vote(&Vote::new(3, me)).await.expect("vote");
        assert!(!log.own_leader_entries(&rows(me)));
        // Leader of term 3: its own entries need not wait; another's must.
        log.save_vote(&Vote::new_committed(3, me))
            .await
            .expect("vote");
        assert!(log.own_leader_entries(&rows(me)));
        assert!(!log.own_leader_entries(&rows(other)));
        // A follower of `other`.
        log.save_vote(&Vote::new_committed(4, other))
            .await
            .expect("vote");
        assert!(!log.own_leader_entries(&rows(other)));
        // Without a member ID, always wait.
        let (mut anon, _sm2) = open_with(&dir.path().join("b.redb"), opts(None)).expect("open");
        anon.save_vote(&Vote::new_committed(3, me))
            .await
            .expect("vote");
        assert!(!anon.own_leader_entries(&rows(me)));
        // Appends are readable at once and on disk after the callback.
        log.save_vote(&Vote::new_committed(1, me))
            .await
            .expect("vote");
        let leader_put = |index: u64| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, me), index),
            payload: EntryPayload::Blank,
        };
        log.blocking_append((1..=3).map(leader_put))
            .await
            .expect("append");
        assert_eq!(log.try_get_log_entries(1..=3).await.expect("read").len(), 3);
        drop((log, _sm, anon, _sm2));
        let (mut again, _sm) =
            open_with(&dir.path().join("a.redb"), opts(Some(me))).expect("reopen");
        assert_eq!(
            again.try_get_log_entries(1..=3).await.expect("read").len(),
            3
        );
        // A truncate drops what it covers, pending or not.
        again
            .truncate(LogId::new(openraft::CommittedLeaderId::new(1, me), 2))
            .await
            .expect("truncate");
        assert_eq!(
            again.try_get_log_entries(1..=3).await.expect("read").len(),
            1
        );
        assert_eq!(
            again
                .get_log_state()
                .await
                .expect("state")
                .last_log_id
                .map(|l| l.index),
            Some(1)
        );
    }

    /// Whether the ticket is still unanswered (call only while nothing
    /// is committed for it: see `CommitTicket::committed`).
    async fn unanswered(t: &mut crate::CommitTicket) -> bool {
        tokio::time::timeout(std::time::Duration::ZERO, t.committed())
            .await
            .is_err()
    }

    /// `crate::commit`: a tagged payload's proposer hears of the commit
    /// from the log store (alone in its entry or in a batch), not before;
    /// not when the entry was truncated, when this member no longer leads,
    /// or from another member's store that got the same entry; the tag is
    /// not encoded.
    #[tokio::test]
    async fn tagged_payloads_are_answered_at_their_commit_by_their_leader_only() {
        use crate::{NotCommitted, OpaqueBytes};
        let dir = tempfile::tempdir().expect("tempdir");
        let me = MemberId::from(1u64);
        let other = MemberId::from(2u64);
        let opts = |member| Options {
            member: Some(member),
            ..Options::default()
        };
        let (mut log, _sm) = open_with(&dir.path().join("a.redb"), opts(me)).expect("open");
        log.save_vote(&Vote::new_committed(1, me))
            .await
            .expect("vote");
        let commits = log.commits();
        let id = |term: u64, leader: MemberId, index: u64| {
            LogId::new(openraft::CommittedLeaderId::new(term, leader), index)
        };
        let durable = log.durable();
        let tagged = |b: &[u8]| {
            let mut p = OpaqueBytes::new(b.to_vec());
            let t = commits.tag(&mut p, durable.clone());
            (p, t)
        };
        let entry = |log_id: LogId, r: Request| Entry {
            log_id,
            payload: EntryPayload::Normal(r),
        };
        // One payload alone at 1, two in a batch entry at 2.
        let (a, mut ta) = tagged(b"a");
        let (b, mut tb) = tagged(b"b");
        let (c, mut tc) = tagged(b"c");
        log.blocking_append([
            entry(id(1, me, 1), Request::Opaque(a)),
            entry(
                id(1, me, 2),
                Request::Batch(vec![Request::Opaque(b), Request::Opaque(c)]),
            ),
        ])
        .await
        .expect("append");
        assert!(unanswered(&mut ta).await, "answered before the commit");
        log.save_committed(Some(id(1, me, 1)))
            .await
            .expect("commit");
        assert_eq!(ta.committed().await, Ok(id(1, me, 1)));
        assert!(unanswered(&mut tb).await, "2 is not committed yet");
        log.save_committed(Some(id(1, me, 2)))
            .await
            .expect("commit");
        assert_eq!(tb.committed().await, Ok(id(1, me, 2)));
        assert_eq!(tc.committed().await, Ok(id(1, me, 2)));
        assert_eq!(commits.answered(), 3);
        // Truncated before its commit: not committed, and a later commit
        // of that index (another entry) answers nobody.
        let (d, mut td) = tagged(b"d");
        log.blocking_append([entry(id(1, me, 3), Request::Opaque(d))])
            .await
            .expect("append");
        log.truncate(id(1, me, 3)).await.expect("truncate");
        assert_eq!(td.committed().await, Err(NotCommitted));
        log.blocking_append([entry(id(1, me, 3), Request::Opaque(b"x".to_vec().into()))])
            .await
            .expect("append");
        log.save_committed(Some(id(1, me, 3)))
            .await
            .expect("commit");
        assert_eq!(commits.answered(), 3);
        // Appended, then this member votes for another leader: a follower's
        // commit index may come from a snapshot its log need not match.
        let (e, mut te) = tagged(b"e");
        log.blocking_append([entry(id(1, me, 4), Request::Opaque(e))])
            .await
            .expect("append");
        log.save_vote(&Vote::new_committed(2, other))
            .await
            .expect("vote");
        log.save_committed(Some(id(1, me, 4)))
            .await
            .expect("commit");
        assert_eq!(te.committed().await, Err(NotCommitted));
        assert_eq!(commits.answered(), 3);
        // Appended while it follows (its tag in memory, as in a test's
        // network): a follower's commit answers nobody.
        let (h, mut th) = tagged(b"h");
        log.blocking_append([entry(id(2, other, 5), Request::Opaque(h))])
            .await
            .expect("append");
        log.save_committed(Some(id(2, other, 5)))
            .await
            .expect("commit");
        assert_eq!(th.committed().await, Err(NotCommitted));
        assert_eq!(commits.answered(), 3);
        // Another member's store (a test network hands it the entry with
        // its tag) answers none of this member's proposers.
        let (mut b_log, _b_sm) = open_with(&dir.path().join("b.redb"), opts(other)).expect("open");
        b_log
            .save_vote(&Vote::new_committed(3, other))
            .await
            .expect("vote");
        let (f, mut tf) = tagged(b"f");
        b_log
            .blocking_append([entry(id(3, other, 1), Request::Opaque(f))])
            .await
            .expect("append");
        b_log
            .save_committed(Some(id(3, other, 1)))
            .await
            .expect("commit");
        assert_eq!(b_log.commits().answered(), 0);
        assert!(unanswered(&mut tf).await);
        drop(tf);
        assert!(
            format!("{commits:?}").contains("proposed: 0"),
            "{commits:?}"
        );
        // The tag is never encoded: the log's and the wire's bytes are
        // the untagged payload's.
        let (g, _tg) = tagged(b"g");
        let bytes = rmp_serde::to_vec_named(&Request::Opaque(g.clone())).expect("encode");
        assert_eq!(
            bytes,
            rmp_serde::to_vec_named(&Request::Opaque(OpaqueBytes::new(b"g".to_vec())))
                .expect("encode")
        );
        assert_eq!(
            rmp_serde::to_vec_named(&g).expect("encode"),
            rmp_serde::to_vec_named(&serde_bytes::Bytes::new(b"g")).expect("encode")
        );
        match rmp_serde::from_slice::<Request>(&bytes).expect("decode") {
            Request::Opaque(p) => assert_eq!((p.as_bytes(), p.tag()), (&b"g"[..], 0)),
            other => panic!("decoded {other:?}"),
        }
    }

    /// With a log sync interval, appends (a follower's too: no member ID
    /// here), truncations and commit hints are acknowledged unsynced and
    /// readable after a reopen (the page cache, as after `kill -9`); a
    /// vote is synced before it returns; the interval's end and the close
    /// sync what is left.
    #[tokio::test]
    async fn with_a_sync_interval_only_votes_wait_for_a_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = MemberId::from(1u64);
        let path = dir.path().join("a.redb");
        let opts = || Options {
            log_sync_interval: Some(std::time::Duration::from_secs(3600)),
            ..Options::default()
        };
        let put = |index: u64| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, me), index),
            payload: EntryPayload::Blank,
        };
        {
            let (mut log, _sm) = open_with(&path, opts()).expect("open");
            log.save_vote(&Vote::new_committed(1, me))
                .await
                .expect("vote");
            let after_vote = log.syncs();
            assert!(after_vote >= 1, "the vote is synced");
            log.blocking_append((1..=3).map(put)).await.expect("append");
            log.save_committed(Some(put(2).log_id))
                .await
                .expect("committed");
            log.truncate(put(3).log_id).await.expect("truncate");
            log.blocking_append([put(3)]).await.expect("append");
            assert_eq!(
                log.syncs(),
                after_vote,
                "appends, hints, truncations unsynced"
            );
            // A vote syncs at once, with everything written before it.
            log.save_vote(&Vote::new_committed(2, me))
                .await
                .expect("vote");
            assert_eq!(log.syncs(), after_vote + 1);
            log.blocking_append([put(4)]).await.expect("append");
            assert_eq!(log.syncs(), after_vote + 1);
            // A shorter interval: the writer syncs when it is due, idle.
            log.set_sync_interval(Some(std::time::Duration::from_millis(1)));
            log.blocking_append([put(5)]).await.expect("append");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while log.syncs() < after_vote + 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the interval's sync never came"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            // Back to none: every write syncs.
            log.set_sync_interval(None);
            let before = log.syncs();
            log.blocking_append([put(6)]).await.expect("append");
            assert_eq!(log.syncs(), before + 1);
            log.set_sync_interval(Some(std::time::Duration::from_secs(3600)));
            log.blocking_append([put(7)]).await.expect("append");
            assert_eq!(log.syncs(), before + 1);
            // A clean close syncs what is left (the writer is joined).
            let reader = log.wal.clone();
            drop((log, _sm));
            assert!(reader.syncs() > before + 1, "synced at close");
        }
        let (mut again, _sm) = open_with(&path, opts()).expect("reopen");
        let got: Vec<u64> = again
            .try_get_log_entries(1..=10)
            .await
            .expect("read")
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6, 7]);
        // Read back at start uncommitted (`restarted_vote`).
        assert_eq!(
            again.read_vote().await.expect("vote"),
            Some(Vote::new(2, me))
        );
    }

    /// With a sync interval and the writer idle, a leader's own entries
    /// are written by the append itself, as a follower's are: on disk
    /// ([`Durable`]) when `append` returns, with no hand-off to the writer
    /// thread. Without an interval they go to the writer (an fsync each)
    /// and are reported early, as before.
    #[tokio::test]
    async fn with_a_sync_interval_a_leaders_own_append_is_written_inline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = MemberId::from(1u64);
        let other = MemberId::from(2u64);
        let (mut log, _sm) = open_with(
            &dir.path().join("a.redb"),
            Options {
                member: Some(me),
                log_sync_interval: Some(std::time::Duration::from_secs(3600)),
                ..Options::default()
            },
        )
        .expect("open");
        let entry = |leader: MemberId, term: u64, index: u64| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, leader), index),
            payload: EntryPayload::Blank,
        };
        log.save_vote(&Vote::new_committed(1, me))
            .await
            .expect("vote");
        assert!(log.own_leader_entries(&[(1, Vec::new(), entry(me, 1, 1).log_id)]));
        let durable = log.durable();
        for i in 1..=3 {
            log.blocking_append([entry(me, 1, i)])
                .await
                .expect("append");
            assert_eq!(log.inline_appends(), i, "own entry {i} written inline");
            assert_eq!(durable.last().map(|l| l.index), Some(i), "on disk at once");
        }
        // A follower's entries, as before.
        log.save_vote(&Vote::new_committed(2, other))
            .await
            .expect("vote");
        log.blocking_append([entry(other, 2, 4)])
            .await
            .expect("append");
        assert_eq!(log.inline_appends(), 4);
        // Without an interval every append goes to the writer (and syncs).
        log.save_vote(&Vote::new_committed(3, me))
            .await
            .expect("vote");
        log.set_sync_interval(None);
        let syncs = log.syncs();
        log.blocking_append([entry(me, 3, 5)])
            .await
            .expect("append");
        durable.wait(5).await.expect("written");
        assert_eq!(log.inline_appends(), 4, "not inline without an interval");
        assert!(log.syncs() > syncs, "synced by the writer");
        let got: Vec<u64> = log
            .try_get_log_entries(1..=5)
            .await
            .expect("read")
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
    }

    /// An applier syncing its own store first syncs the log up to the
    /// index it makes durable: one `fdatasync` when the log is behind,
    /// none when it is not, again when entries were rewritten, and none
    /// after a close (which syncs).
    #[tokio::test]
    async fn a_syncer_syncs_the_log_up_to_an_index_only_when_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = MemberId::from(1u64);
        let path = dir.path().join("a.redb");
        let opts = || Options {
            log_sync_interval: Some(std::time::Duration::from_secs(3600)),
            ..Options::default()
        };
        let entry = |term: u64, index: u64| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, me), index),
            payload: EntryPayload::Blank,
        };
        let syncer = {
            let (mut log, _sm) = open_with(&path, opts()).expect("open");
            let syncer = log.syncer();
            log.save_vote(&Vote::new_committed(1, me))
                .await
                .expect("vote");
            log.blocking_append((1..=3).map(|i| entry(1, i)))
                .await
                .expect("append");
            let before = log.syncs();
            assert!(syncer.synced_upto() < 2, "appended unsynced");
            // As an applier holds it (`Applier::attach_log`).
            let held: Arc<dyn LogSync> = Arc::new(syncer.clone());
            held.sync_to(2).expect("sync");
            assert_eq!(log.syncs(), before + 1, "one sync for what is behind");
            assert!(syncer.synced_upto() >= 3, "everything written is synced");
            syncer.sync_to(3).expect("sync");
            assert_eq!(log.syncs(), before + 1, "already synced: no sync");
            log.blocking_append([entry(1, 4)]).await.expect("append");
            syncer.sync_to(3).expect("sync");
            assert_eq!(log.syncs(), before + 1, "an unsynced tail past 3");
            syncer.sync_to(4).expect("sync");
            assert_eq!(log.syncs(), before + 2);
            // A rewritten entry (truncated, appended anew) is not synced.
            log.truncate(entry(1, 4).log_id).await.expect("truncate");
            log.blocking_append([entry(2, 4)]).await.expect("append");
            assert!(syncer.synced_upto() < 4);
            syncer.sync_to(4).expect("sync");
            assert_eq!(log.syncs(), before + 3);
            // The interval's own sync counts too (a changed interval
            // applies from the next write on).
            log.set_sync_interval(Some(std::time::Duration::from_millis(1)));
            log.blocking_append([entry(2, 5)]).await.expect("append");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while syncer.synced_upto() < 5 {
                assert!(std::time::Instant::now() < deadline, "no interval sync");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let synced = log.syncs();
            syncer.sync_to(5).expect("sync");
            assert_eq!(log.syncs(), synced);
            syncer
        };
        // Closed: the close synced everything; the syncer does not keep
        // the log open.
        syncer.sync_to(1_000).expect("synced at close");
        let (log, _sm) = open_with(&path, opts()).expect("reopen");
        // What an earlier process wrote is not known synced: the first
        // request syncs the log whatever the writer did.
        let syncer = log.syncer();
        let before = log.syncs();
        syncer.sync_to(5).expect("sync");
        assert_eq!(log.syncs(), before + 1);
        syncer.sync_to(5).expect("sync");
        assert_eq!(log.syncs(), before + 1);
    }

    /// A sync asked by an applier (`LogSyncer::sync_to`) is made beside
    /// the log's writer, not on it: while its `fdatasync` is under way
    /// (held here), appends are still written and answered, and the sync,
    /// once done, counts only what was written before it.
    // The held gate is the point: the sync waits on it on another thread.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_appliers_sync_does_not_hold_the_logs_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = MemberId::from(1u64);
        let (mut log, _sm) = open_with(
            &dir.path().join("a.redb"),
            Options {
                log_sync_interval: Some(std::time::Duration::from_secs(3600)),
                ..Options::default()
            },
        )
        .expect("open");
        let entry = |index: u64| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, me), index),
            payload: EntryPayload::Blank,
        };
        log.save_vote(&Vote::new_committed(1, me))
            .await
            .expect("vote");
        log.blocking_append((1..=3).map(entry))
            .await
            .expect("append");
        let reader = log.shared.writing.wal.lock().reader();
        let held = reader.sync_gate.lock();
        let waiting = reader
            .syncs_waiting
            .load(std::sync::atomic::Ordering::Acquire);
        let syncer = log.syncer();
        let syncing = std::thread::spawn(move || syncer.sync_to(3));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reader
            .syncs_waiting
            .load(std::sync::atomic::Ordering::Acquire)
            == waiting
        {
            assert!(std::time::Instant::now() < deadline, "no sync started");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // The sync is under way: an append is written and answered.
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            log.blocking_append([entry(4)]),
        )
        .await
        .expect("an append waited for the sync")
        .expect("append");
        drop(held);
        syncing.join().expect("join").expect("sync");
        let syncer = log.syncer();
        assert!(syncer.synced_upto() >= 3, "synced what was written before");
        assert!(syncer.synced_upto() < 4, "not what was written during it");
        let before = log.syncs();
        syncer.sync_to(4).expect("sync");
        assert_eq!(log.syncs(), before + 1, "the later write is synced");
        assert!(syncer.synced_upto() >= 4);
    }

    /// A truncation during a sync made beside the writer: the entry it
    /// replaced was synced, its replacement may not be, so the sync does
    /// not count it and the writer syncs again before `sync_to` returns.
    // The held gate is the point: the sync waits on it on another thread.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_beside_the_writer_does_not_count_an_entry_rewritten_during_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = MemberId::from(1u64);
        let (mut log, _sm) = open_with(
            &dir.path().join("a.redb"),
            Options {
                log_sync_interval: Some(std::time::Duration::from_secs(3600)),
                ..Options::default()
            },
        )
        .expect("open");
        let entry = |term: u64, index: u64| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, me), index),
            payload: EntryPayload::Blank,
        };
        log.save_vote(&Vote::new_committed(1, me))
            .await
            .expect("vote");
        log.blocking_append((1..=3).map(|i| entry(1, i)))
            .await
            .expect("append");
        let reader = log.shared.writing.wal.lock().reader();
        let held = reader.sync_gate.lock();
        let waiting = reader
            .syncs_waiting
            .load(std::sync::atomic::Ordering::Acquire);
        let syncer = log.syncer();
        let before = log.syncs();
        let syncing = std::thread::spawn(move || syncer.sync_to(3));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reader
            .syncs_waiting
            .load(std::sync::atomic::Ordering::Acquire)
            == waiting
        {
            assert!(std::time::Instant::now() < deadline, "no sync started");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Entry 3 replaced while the sync is under way.
        log.truncate(entry(1, 3).log_id).await.expect("truncate");
        log.blocking_append([entry(2, 3)]).await.expect("append");
        drop(held);
        syncing.join().expect("join").expect("sync");
        assert_eq!(
            log.syncs(),
            before + 2,
            "the sync beside the writer, then the writer's for the new 3"
        );
        assert!(log.syncer().synced_upto() >= 3);
    }

    /// A closed log's syncer answers from what the close synced: up to it,
    /// done; past it (a close whose sync failed), an error.
    #[test]
    fn a_closed_logs_syncer_answers_from_what_was_synced() {
        let syncer = LogSyncer {
            synced_upto: Arc::new(AtomicU64::new(3)),
            shared: std::sync::Weak::new(),
        };
        syncer.sync_to(3).expect("synced up to 3");
        assert!(syncer.sync_to(4).is_err(), "4 was never synced");
    }

    /// What a batch rewrites lowers the synced mark below it: a truncation
    /// from its index, an append from its first row; other operations
    /// leave it.
    #[test]
    fn rewrites_lower_the_synced_mark_below_them() {
        let me = MemberId::from(1u64);
        let id = |index| LogId::new(CommittedLeaderId::new(1, me), index);
        let done = || tokio::sync::oneshot::channel().0;
        let truncate = LogOp::Truncate {
            from: 4,
            keep: Some(id(3)),
            done: done(),
        };
        assert_eq!(synced_before(&[truncate], 10), 3);
        let append = LogOp::Append {
            rows: vec![(6, Vec::new(), id(6)), (7, Vec::new(), id(7))],
            callback: None,
            done: None,
        };
        assert_eq!(synced_before(&[append], 10), 5);
        let append_past = LogOp::Append {
            rows: vec![(11, Vec::new(), id(11))],
            callback: None,
            done: None,
        };
        assert_eq!(synced_before(&[append_past], 10), 10, "not a rewrite");
        let others = [
            LogOp::Purge {
                upto: id(2),
                done: done(),
            },
            LogOp::Vote {
                vote: Vote::new_committed(1, me),
                done: done(),
            },
            LogOp::Wake,
        ];
        assert_eq!(synced_before(&others, 10), 10);
    }

    /// A leader's own entries are reported flushed before they are on disk
    /// (so openraft replicates them meanwhile), but nothing of them leaves
    /// the leader before they are: the state machine applies them only
    /// then, and `Durable::clamp` keeps the commit index sent to followers
    /// at what is on disk.
    #[tokio::test]
    // The gate is held across awaits on purpose: it stands for a disk that
    // has not finished the write (the writer is another OS thread).
    #[allow(clippy::await_holding_lock)]
    async fn a_leaders_own_entries_are_applied_only_once_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = MemberId::from(1u64);
        let opts = Options {
            member: Some(me),
            // As the runtime runs it: `apply` itself does not write.
            durable_apply: false,
            ..Options::default()
        };
        let (mut log, mut sm) = open_with(&dir.path().join("a.redb"), opts.clone()).expect("open");
        log.save_vote(&Vote::new_committed(1, me))
            .await
            .expect("vote");
        let durable = log.durable();
        let id = move |index| LogId::new(CommittedLeaderId::new(1, me), index);
        let entry = move |index: u64| Entry {
            log_id: id(index),
            ..put(index, "k")
        };
        // Hold the log's write gate: the log writer cannot write until it
        // is released.
        let gate = log.wal.gate.clone();
        let blocker = gate.lock();
        // Reported flushed at once (this returns although nothing can
        // reach the disk) and readable, for replication.
        log.blocking_append([entry(1), entry(2)])
            .await
            .expect("append");
        assert_eq!(log.try_get_log_entries(1..=2).await.expect("read").len(), 2);
        assert_eq!(durable.last(), None);
        assert_eq!(durable.clamp(Some(id(2))), None);
        assert_eq!(durable.clamp(None), None);
        let applying = tokio::spawn(async move {
            let r = sm.apply([entry(1), entry(2)]).await;
            (r, sm)
        });
        // Not applied while the writer is held (an absence check: the
        // writer cannot commit before `blocker` is dropped, so no wait is
        // long enough for the apply to finish).
        let held = tokio::time::timeout(std::time::Duration::from_millis(100), async {
            while !applying.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        drop(blocker);
        assert!(held.is_err(), "applied before on disk");
        durable.wait(2).await.expect("on disk");
        let (r, sm) = applying.await.expect("join");
        assert_eq!(r.expect("apply").len(), 2);
        assert_eq!(sm.get(b"k").map(|kv| kv.mod_revision), Some(2));
        assert_eq!(durable.last(), Some(id(2)));
        assert_eq!(durable.clamp(Some(id(5))), Some(id(2)));
        assert_eq!(durable.clamp(Some(id(1))), Some(id(1)));
        // A truncate lowers it; a reopen starts from what the file holds.
        log.truncate(id(2)).await.expect("truncate");
        assert_eq!(durable.last(), Some(id(1)));
        drop((log, sm));
        let (log, _sm) = open_with(&dir.path().join("a.redb"), opts).expect("reopen");
        assert_eq!(log.durable().last(), Some(id(1)));
    }

    /// Rewrites rows of a closed store's file.
    fn poke(path: &Path, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>) {
        let db = Database::create(path).expect("db");
        let txn = db.begin_write().expect("txn");
        f(&txn).expect("poke");
        txn.commit().expect("commit");
    }

    #[tokio::test]
    async fn undecodable_rows_are_storage_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.redb");
        {
            let (mut log, _sm) = open(&p).expect("open");
            log.blocking_append([put(1, "a"), put(2, "b")])
                .await
                .expect("append");
        }
        {
            // An intact record whose entry does not decode.
            let mut wal = Wal::open(&log_dir(&p)).expect("wal");
            wal.write(&[Record::Entry {
                log_id: log_id(2),
                bytes: &[0xc1, 0xff],
            }])
            .expect("write");
        }
        let (mut log, _sm) = open(&p).expect("open");
        assert!(log
            .try_get_log_entries(0..1)
            .await
            .expect("before")
            .is_empty());
        assert_eq!(log.try_get_log_entries(1..2).await.expect("one").len(), 1);
        assert!(log.try_get_log_entries(1..3).await.is_err());
        drop((log, _sm));

        poke(&p, |txn| {
            txn.open_table(KV)?
                .insert(b"x".as_slice(), [0xc1u8].as_slice())?;
            Ok(())
        });
        assert!(matches!(
            open(&p),
            Err(StoreError::Decode { what: "kv row", .. })
        ));
    }

    /// A store of an earlier version kept its log in the redb file: it is
    /// moved into the log files at open, whole.
    #[tokio::test]
    async fn a_log_in_the_redb_file_is_moved_to_the_log_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.redb");
        drop(open(&p).expect("open"));
        std::fs::remove_dir_all(log_dir(&p)).expect("rm wal");
        let vote = Vote::new_committed(3, MemberId::from(1u64));
        poke(&p, |txn| {
            let mut log = txn.open_table(LOG)?;
            for i in 2..=4 {
                log.insert(i, encode("log entry", &put(i, "k"))?.as_slice())?;
            }
            let mut meta = txn.open_table(LOG_META)?;
            meta.insert(VOTE, encode("vote", &vote)?.as_slice())?;
            meta.insert(COMMITTED, encode("c", &Some(log_id(3)))?.as_slice())?;
            meta.insert(LAST_PURGED, encode("p", &log_id(1))?.as_slice())?;
            Ok(())
        });
        // A half-done earlier attempt is thrown away.
        std::fs::create_dir_all(log_dir(&p).with_extension("wal.migrating")).expect("mkdir");
        let (mut log, _sm) = open(&p).expect("open");
        let ids: Vec<u64> = log
            .try_get_log_entries(..)
            .await
            .expect("read")
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(ids, vec![2, 3, 4]);
        // Moved whole; openraft gets it uncommitted (`restarted_vote`).
        assert_eq!(log.wal.vote(), Some(vote));
        assert_eq!(
            log.read_vote().await.expect("vote"),
            Some(Vote::new(3, MemberId::from(1u64)))
        );
        assert_eq!(log.read_committed().await.expect("c"), Some(log_id(3)));
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1)));
        assert_eq!(state.last_log_id, Some(log_id(4)));
        assert!(!log_dir(&p).with_extension("wal.migrating").exists());
        drop((log, _sm));
        // The old tables are gone.
        let db = Database::create(&p).expect("db");
        let txn = db.begin_read().expect("txn");
        assert!(txn.open_table(LOG).is_err());
        assert!(txn.open_table(LOG_META).is_err());
    }

    #[test]
    fn other_format_versions_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.redb");
        drop(open(&p).expect("open"));
        poke(&p, |txn| {
            txn.open_table(SM_META)?
                .insert(FORMAT, encode("format", &99u32)?.as_slice())?;
            Ok(())
        });
        assert!(matches!(
            open(&p),
            Err(StoreError::Format {
                found: 99,
                expected: FORMAT_VERSION
            })
        ));
    }

    #[tokio::test]
    async fn state_machine_behind_its_snapshot_is_restored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.redb");
        let expected = {
            let (_log, mut sm) = open(&p).expect("open");
            sm.apply([put(1, "a"), put(2, "b"), put(3, "c")])
                .await
                .expect("apply");
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("snapshot");
            sm.read(|kv| kv.clone())
        };
        // Simulate a crash that lost the last state-machine commits.
        poke(&p, |txn| {
            txn.open_table(KV)?.remove(b"c".as_slice())?;
            let mut m = txn.open_table(SM_META)?;
            m.insert(
                LAST_APPLIED,
                encode("last applied", &Some(log_id(2)))?.as_slice(),
            )?;
            m.insert(REVISION, encode("revision", &2u64)?.as_slice())?;
            Ok(())
        });
        let (_log, sm) = open(&p).expect("reopen");
        assert_eq!(sm.last_applied(), Some(log_id(3)));
        assert_eq!(sm.read(|kv| kv.clone()), expected);
        drop((_log, sm));
        // The restore was written back.
        let db = Database::create(&p).expect("db");
        let (kv, applied, _, _) = load_state_machine(&db, &Limits::default()).expect("load");
        assert_eq!(kv, expected);
        assert_eq!(applied, Some(log_id(3)));
    }

    #[tokio::test]
    async fn older_snapshot_does_not_replace_newer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_log, mut sm) = open(&dir.path().join("g.redb")).expect("open");
        sm.apply([put(1, "a")]).await.expect("apply");
        let mut stale_builder = sm.get_snapshot_builder().await;
        sm.apply([put(2, "b")]).await.expect("apply");
        let newer = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("newer");
        // Simulate the stale builder having read the state at index 1.
        {
            let mut st = sm.state_mut();
            st.last_applied = Some(log_id(1));
        }
        stale_builder.build_snapshot().await.expect("stale");
        let current = sm
            .get_current_snapshot()
            .await
            .expect("read")
            .expect("some");
        assert_eq!(current.meta, newer.meta);
    }

    /// An applier that records what it got and keeps its state in memory.
    #[derive(Default)]
    struct Recorder {
        got: Mutex<Vec<(u64, Vec<u8>)>>,
        installed: Mutex<Vec<Vec<u8>>>,
    }

    impl Applier for Recorder {
        fn apply(&self, entries: Vec<(u64, Vec<u8>)>) -> crate::ApplierFuture<'_, Vec<Vec<u8>>> {
            let answers = entries
                .iter()
                .map(|(i, b)| [&i.to_be_bytes()[..], b].concat())
                .collect();
            self.got.lock().extend(entries);
            Box::pin(async move { Ok(answers) })
        }

        fn snapshot(&self) -> Result<Vec<u8>, String> {
            Ok(format!("state after {}", self.got.lock().len()).into_bytes())
        }

        fn install(&self, data: Vec<u8>) -> crate::ApplierFuture<'_, ()> {
            self.installed.lock().push(data);
            Box::pin(async { Ok(()) })
        }
    }

    fn opaque(index: u64, request: Request) -> Entry {
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(request),
        }
    }

    #[tokio::test]
    async fn opaque_entries_go_to_the_applier_in_order_with_their_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_log, mut sm) = open(&dir.path().join("g.redb")).expect("open");
        // Without an applier: refused, nothing changes.
        let r = sm
            .apply(vec![opaque(1, Request::Opaque(b"a".to_vec().into()))])
            .await
            .expect("apply");
        assert_eq!(r, vec![Response::Error(KvError::NoApplier)]);
        let rec = Arc::new(Recorder::default());
        sm.set_applier(rec.clone());
        let r = sm
            .apply(vec![
                opaque(2, Request::Opaque(b"b".to_vec().into())),
                put(3, "k"),
                opaque(
                    4,
                    Request::Batch(vec![
                        Request::Opaque(b"c".to_vec().into()),
                        Request::Put {
                            key: b"j".to_vec(),
                            value: b"v".to_vec(),
                            lease: None,
                            prev_kv: false,
                        },
                        Request::Opaque(b"d".to_vec().into()),
                    ]),
                ),
            ])
            .await
            .expect("apply");
        assert_eq!(
            *rec.got.lock(),
            vec![(2, b"b".to_vec()), (4, b"c".to_vec()), (4, b"d".to_vec())]
        );
        let answer = |i: u64, b: &[u8]| Response::Opaque([&i.to_be_bytes()[..], b].concat());
        assert_eq!(r[0], answer(2, b"b"));
        assert!(matches!(r[1], Response::Put { revision: 1, .. }));
        match &r[2] {
            Response::Batch(v) => {
                assert_eq!(v[0], answer(4, b"c"));
                assert!(matches!(v[1], Response::Put { revision: 2, .. }));
                assert_eq!(v[2], answer(4, b"d"));
            }
            other => panic!("not a batch: {other:?}"),
        }
        // Opaque payloads change no key and no revision.
        assert_eq!(sm.revision(), 2);
        assert_eq!(sm.last_applied().map(|l| l.index), Some(4));
    }

    #[tokio::test]
    async fn a_snapshot_carries_the_applier_state_to_another_member() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_log, mut sm) = open(&dir.path().join("a.redb")).expect("open");
        let rec = Arc::new(Recorder::default());
        sm.set_applier(rec.clone());
        sm.apply(vec![
            opaque(1, Request::Opaque(b"x".to_vec().into())),
            opaque(2, Request::Opaque(b"y".to_vec().into())),
        ])
        .await
        .expect("apply");
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("snapshot");
        let (_log2, mut other) = open(&dir.path().join("b.redb")).expect("open");
        let rec2 = Arc::new(Recorder::default());
        other.set_applier(rec2.clone());
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .expect("install");
        assert_eq!(*rec2.installed.lock(), vec![b"state after 2".to_vec()]);
        assert_eq!(other.last_applied().map(|l| l.index), Some(2));
    }

    /// An applier whose changes reach the disk behind its applies (a
    /// replicated stream's store): `synced` is what a crash leaves.
    #[derive(Default)]
    struct Unsynced {
        rec: Recorder,
        synced: AtomicU64,
    }

    impl Applier for Unsynced {
        fn apply(&self, entries: Vec<(u64, Vec<u8>)>) -> crate::ApplierFuture<'_, Vec<Vec<u8>>> {
            self.rec.apply(entries)
        }

        fn synced(&self) -> Option<u64> {
            Some(self.synced.load(Ordering::SeqCst))
        }

        fn snapshot(&self) -> Result<Vec<u8>, String> {
            self.rec.snapshot()
        }

        fn install(&self, data: Vec<u8>) -> crate::ApplierFuture<'_, ()> {
            self.rec.install(data)
        }
    }

    /// A crash after the log's fsync and the applier's unsynced commit:
    /// at start the store reports the applier's synced index, and openraft
    /// re-applies the rest of the committed log to it.
    #[tokio::test]
    async fn an_applier_synced_behind_gets_the_log_again_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.redb");
        let entries = |r: std::ops::RangeInclusive<u64>| -> Vec<Entry> {
            r.map(|i| opaque(i, Request::Opaque(vec![i as u8].into())))
                .collect()
        };
        {
            let (mut log, mut sm) = open(&p).expect("open");
            let a = Arc::new(Unsynced::default());
            sm.set_applier(a.clone());
            // From index 0, where a group's log starts (its first
            // membership).
            log.blocking_append(entries(0..=4)).await.expect("append");
            log.save_committed(Some(log_id(4))).await.expect("commit");
            // The commit hint rides with the next write.
            log.save_vote(&Vote::new_committed(1, MemberId::from(1u64)))
                .await
                .expect("vote");
            sm.apply(entries(0..=4)).await.expect("apply");
            assert_eq!(sm.last_applied(), Some(log_id(4)));
            assert_eq!(a.rec.got.lock().len(), 5);
            // The process dies with the applier synced up to entry 2.
        }
        let (mut log, mut sm) = open(&p).expect("reopen");
        assert_eq!(
            sm.last_applied(),
            Some(log_id(4)),
            "the state machine is ahead"
        );
        let a = Arc::new(Unsynced::default());
        a.synced.store(2, Ordering::SeqCst);
        sm.set_applier(a.clone());
        assert_eq!(sm.applied_state().await.expect("state").0, Some(log_id(2)));
        openraft::storage::StorageHelper::new(&mut log, &mut sm)
            .get_initial_state()
            .await
            .expect("initial state");
        assert_eq!(
            *a.rec.got.lock(),
            vec![(3, vec![3]), (4, vec![4])],
            "what the crash lost is applied again, nothing before it"
        );
        assert_eq!(sm.last_applied(), Some(log_id(4)));
        // Synced at or past the state machine: reported as it is.
        a.synced.store(4, Ordering::SeqCst);
        assert_eq!(sm.applied_state().await.expect("state").0, Some(log_id(4)));
        a.synced.store(0, Ordering::SeqCst);
        assert_eq!(sm.applied_state().await.expect("state").0, None);
        a.synced.store(1, Ordering::SeqCst);
        assert_eq!(sm.applied_state().await.expect("state").0, Some(log_id(1)));
        // Synced behind a purged log: it cannot be replayed, and says so.
        log.purge(log_id(3)).await.expect("purge");
        a.synced.store(1, Ordering::SeqCst);
        assert!(sm.applied_state().await.is_err());
        a.synced.store(3, Ordering::SeqCst);
        assert_eq!(sm.applied_state().await.expect("state").0, Some(log_id(3)));
    }
}
