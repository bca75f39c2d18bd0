//! One stream's store: a redb file (`<data dir>/streams/<name>.redb`) with
//! the messages (`msgs`: sequence -> record, see `record.rs`), the stream's
//! configuration and last sequence (`meta`), and its durable consumers
//! (`consumers`: name -> configuration and position).
//!
//! **Group commit.** Writes are queued to one writer thread, which puts
//! everything queued meanwhile into one transaction committed with
//! `Durability::Immediate` (one `fsync` for the group), then answers each
//! waiter and raises `durable`: the highest sequence on disk, which the
//! host makes the consumers' visibility bound. A publish acknowledged to its
//! publisher is on disk.
//!
//! **Unsynced writes** ([`StreamStore::submit_unsynced`]) are a replicated
//! stream's applier's: what it writes is already in the Raft log on a
//! majority of disks, so its commits skip the `fsync`
//! (`Durability::None`: a crash of the process loses them, and the group
//! replays them from the log). A group with only such writes commits
//! without syncing, unless the last synced commit is older than
//! [`SYNC_EVERY`]; [`StreamStore::synced_applied`] is the applied index
//! (`Write::Applied`) of the last synced commit, what survives a crash.
//!
//! **Corruption.** A file that redb cannot open, or a record that does not
//! decode, is an error naming the file; nothing is written over it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{oneshot, watch};

use super::record::{self, CorruptRecord, StoredMsg};

const MSGS: TableDefinition<u64, &[u8]> = TableDefinition::new("msgs");
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

/// Writes one group commit takes at most (more wait for the next).
const MAX_GROUP: usize = 8192;
/// Record bytes one group commit takes at most.
const MAX_GROUP_BYTES: usize = 16 << 20;
/// Unsynced writes are synced at least this often (redb frees pages only
/// in synced commits, and a crash replays less).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

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
}

/// One write of a group. A replicated stream's writes travel in its Raft
/// log as MessagePack (`replica.rs`, PROTOCOL.md 5.12), so the enum is
/// serializable; `Index` and `Applied` are the member's own and never
/// travel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Write {
    /// Store a record under a sequence.
    Put(u64, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Delete records.
    Delete(Vec<u64>),
    /// Set the last sequence and timestamp.
    Last(u64, u64),
    /// Set the configuration (JSON).
    Config(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Set (`Some`) or delete a consumer's record.
    Consumer(String, #[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Set (`Some`) or delete the index snapshot.
    Index(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Set the Raft log index a replicated stream's store has applied
    /// (written with the entry's changes: a replay skips them).
    Applied(u64),
    /// Delete every message and consumer (a replica installing another
    /// member's state).
    Clear,
}

/// Who waits for a group commit: an async caller or a blocking one.
enum Done {
    Async(oneshot::Sender<Result<(), String>>),
    Blocking(mpsc::Sender<Result<(), String>>),
}

struct Job {
    writes: Vec<Write>,
    done: Option<Done>,
    /// Committed with an `fsync` (else see the module docs).
    sync: bool,
}

/// What the writer counted.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Writes committed.
    pub writes: AtomicU64,
    /// Transactions committed with an `fsync`.
    pub syncs: AtomicU64,
}

/// A stream's store (see the module docs).
pub struct StreamStore {
    path: PathBuf,
    db: Arc<Database>,
    jobs: parking_lot::Mutex<Option<mpsc::Sender<Job>>>,
    durable: watch::Receiver<u64>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<StoreStats>,
    /// The applied index (`Write::Applied`) of the last synced commit.
    synced_applied: Arc<AtomicU64>,
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
        let s = StreamStore::start(path, db, 0, 0);
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
        let (last, _) = read_last(&db, path)?;
        let applied = read_applied(&db, path)?;
        Ok(StreamStore::start(path, db, last, applied))
    }

    fn start(path: &Path, db: Database, durable: u64, applied: u64) -> Self {
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel::<Job>();
        let (dtx, drx) = watch::channel(durable);
        let stats = Arc::new(StoreStats::default());
        let synced_applied = Arc::new(AtomicU64::new(applied));
        let thread = {
            let db = db.clone();
            let path = path.to_path_buf();
            let stats = stats.clone();
            let synced = synced_applied.clone();
            std::thread::Builder::new()
                .name("macula-stream-store".into())
                .spawn(move || {
                    writer(
                        &db,
                        &path,
                        &rx,
                        &Progress {
                            durable: &dtx,
                            stats: &stats,
                            synced_applied: &synced,
                        },
                    )
                })
                .ok()
        };
        StreamStore {
            path: path.to_path_buf(),
            db,
            jobs: parking_lot::Mutex::new(thread.as_ref().map(|_| tx)),
            durable: drx,
            thread: parking_lot::Mutex::new(thread),
            stats,
            synced_applied,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues writes; `done` is answered once they are on disk.
    pub fn submit(
        &self,
        writes: Vec<Write>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), StoreError> {
        self.queue(writes, done.map(Done::Async), true)
    }

    /// Queues writes committed without an `fsync` (a replicated stream's
    /// applier: see the module docs); `done` is answered once they are
    /// committed (readable; lost by a crash until the next synced commit).
    pub fn submit_unsynced(
        &self,
        writes: Vec<Write>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), StoreError> {
        self.queue(writes, done.map(Done::Async), false)
    }

    fn queue(&self, writes: Vec<Write>, done: Option<Done>, sync: bool) -> Result<(), StoreError> {
        let jobs = self.jobs.lock();
        let Some(tx) = jobs.as_ref() else {
            return Err(StoreError::Closed(self.path.clone()));
        };
        tx.send(Job { writes, done, sync })
            .map_err(|_| StoreError::Closed(self.path.clone()))
    }

    /// Makes everything committed so far durable (one synced commit) and
    /// waits for it.
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
        let (tx, rx) = mpsc::channel();
        self.queue(writes, Some(Done::Blocking(tx)), true)?;
        rx.recv()
            .map_err(|_| StoreError::Closed(self.path.clone()))?
            .map_err(io(&self.path))
    }

    /// Writes and waits until they are on disk.
    pub async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(writes, Some(tx))?;
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
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let t = match txn.open_table(MSGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(x) => return Err(e(x.to_string())),
        };
        let Some(v) = t.get(seq).map_err(|x| e(x.to_string()))? else {
            return Ok(None);
        };
        record::decode(v.value())
            .map(Some)
            .map_err(|c| self.corrupt(seq, &c))
    }

    /// Reads several messages in one read transaction (one range scan when
    /// they are ascending, as a consumer's batch is); a sequence not stored
    /// is left out.
    pub fn get_batch(&self, seqs: &[u64]) -> Result<Vec<(u64, StoredMsg)>, StoreError> {
        let (Some(&lo), Some(&hi)) = (seqs.iter().min(), seqs.iter().max()) else {
            return Ok(Vec::new());
        };
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let t = match txn.open_table(MSGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x.to_string())),
        };
        let mut out = Vec::with_capacity(seqs.len());
        let ascending = seqs.windows(2).all(|w| w[0] < w[1]);
        // A dense ascending batch is one range scan; anything else is one
        // lookup per sequence.
        if ascending && hi - lo < 4 * seqs.len() as u64 {
            let mut want = seqs.iter().copied().peekable();
            for item in t.range(lo..=hi).map_err(|x| e(x.to_string()))? {
                let (k, v) = item.map_err(|x| e(x.to_string()))?;
                let seq = k.value();
                while want.peek().is_some_and(|&w| w < seq) {
                    want.next();
                }
                if want.peek() == Some(&seq) {
                    want.next();
                    let m = record::decode(v.value()).map_err(|c| self.corrupt(seq, &c))?;
                    out.push((seq, m));
                }
            }
        } else {
            for &seq in seqs {
                if let Some(v) = t.get(seq).map_err(|x| e(x.to_string()))? {
                    let m = record::decode(v.value()).map_err(|c| self.corrupt(seq, &c))?;
                    out.push((seq, m));
                }
            }
        }
        Ok(out)
    }

    fn corrupt(&self, seq: u64, c: &CorruptRecord) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: format!("message {seq}: {c}"),
        }
    }

    /// Reads the configuration (JSON) and the last sequence and timestamp.
    pub fn meta(&self) -> Result<(Vec<u8>, u64, u64), StoreError> {
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
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let t = txn.open_table(META).map_err(|x| e(x.to_string()))?;
        let v = t.get(META_INDEX).map_err(|x| e(x.to_string()))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn last(&self) -> Result<(u64, u64), StoreError> {
        read_last(&self.db, &self.path)
    }

    /// Calls `f` with every stored message's sequence, record size and
    /// head, ascending (to rebuild the index).
    pub fn scan(&self, mut f: impl FnMut(u64, u32, record::Head<'_>)) -> Result<u64, StoreError> {
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let t = match txn.open_table(MSGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(x) => return Err(e(x.to_string())),
        };
        let mut n = 0;
        for item in t.iter().map_err(|x| e(x.to_string()))? {
            let (k, v) = item.map_err(|x| e(x.to_string()))?;
            let seq = k.value();
            let bytes = v.value();
            let head = record::decode_head(bytes).map_err(|c| self.corrupt(seq, &c))?;
            let size = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            f(seq, size, head);
            n += 1;
        }
        Ok(n)
    }

    /// The Raft log index a replicated stream's store has applied (0:
    /// none, or not replicated).
    pub fn applied(&self) -> Result<u64, StoreError> {
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
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        let t = match txn.open_table(MSGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x.to_string())),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in t.range(from..).map_err(|x| e(x.to_string()))? {
            let (k, v) = item.map_err(|x| e(x.to_string()))?;
            if out.len() >= max || (!out.is_empty() && bytes + v.value().len() > max_bytes) {
                break;
            }
            bytes += v.value().len();
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Stored messages (as redb counts them).
    pub fn stored_messages(&self) -> Result<u64, StoreError> {
        let e = io(&self.path);
        let txn = self.db.begin_read().map_err(|x| e(x.to_string()))?;
        match txn.open_table(MSGS) {
            Ok(t) => t.len().map_err(|x| e(x.to_string())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(x) => Err(e(x.to_string())),
        }
    }

    /// Every consumer record: name -> bytes.
    pub fn consumers(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
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
    pub fn close(&self) {
        if self.jobs.lock().is_some() {
            if let Err(e) = self.sync() {
                tracing::warn!(path = %self.path.display(), error = %e, "stream store not synced at close");
            }
        }
        self.jobs.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
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

fn read_applied(db: &Database, path: &Path) -> Result<u64, StoreError> {
    let e = io(path);
    let txn = db.begin_read().map_err(|x| e(x.to_string()))?;
    let t = txn.open_table(META).map_err(|x| e(x.to_string()))?;
    let v = t.get(META_APPLIED).map_err(|x| e(x.to_string()))?;
    match v.map(|v| <[u8; 8]>::try_from(v.value())) {
        None => Ok(0),
        Some(Ok(b)) => Ok(u64::from_le_bytes(b)),
        Some(Err(_)) => Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            what: "applied index".into(),
        }),
    }
}

/// What the writer reports.
struct Progress<'a> {
    durable: &'a watch::Sender<u64>,
    stats: &'a StoreStats,
    synced_applied: &'a AtomicU64,
}

fn writer(db: &Database, path: &Path, rx: &mpsc::Receiver<Job>, progress: &Progress<'_>) {
    let Progress {
        durable,
        stats,
        synced_applied,
    } = *progress;
    // The applied index written so far (synced or not), and when the last
    // synced commit was.
    let mut applied = synced_applied.load(Ordering::Acquire);
    let mut last_sync = std::time::Instant::now();
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        let mut bytes = 0usize;
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
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
        let sync = group.iter().any(|j| j.sync) || last_sync.elapsed() >= SYNC_EVERY;
        let result = commit(db, &group, sync);
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, "stream store write failed");
        } else {
            let n: usize = group.iter().map(|j| j.writes.len()).sum();
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.writes.fetch_add(n as u64, Ordering::Relaxed);
            for w in group.iter().flat_map(|j| j.writes.iter()) {
                if let Write::Applied(i) = w {
                    applied = *i;
                }
            }
            if sync {
                stats.syncs.fetch_add(1, Ordering::Relaxed);
                last_sync = std::time::Instant::now();
                synced_applied.store(applied, Ordering::Release);
            }
            let top = group
                .iter()
                .flat_map(|j| j.writes.iter())
                .filter_map(|w| match w {
                    Write::Put(seq, _) => Some(*seq),
                    _ => None,
                })
                .max();
            if let Some(top) = top {
                durable.send_if_modified(|d| {
                    let raise = top > *d;
                    *d = (*d).max(top);
                    raise
                });
            }
        }
        for j in group {
            match j.done {
                Some(Done::Async(tx)) => {
                    let _ = tx.send(result.clone());
                }
                Some(Done::Blocking(tx)) => {
                    let _ = tx.send(result.clone());
                }
                None => {}
            }
        }
    }
}

fn commit(db: &Database, group: &[Job], sync: bool) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(if sync {
        Durability::Immediate
    } else {
        Durability::None
    });
    {
        let mut msgs = txn.open_table(MSGS).map_err(|e| e.to_string())?;
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        let mut consumers = txn.open_table(CONSUMERS).map_err(|e| e.to_string())?;
        for w in group.iter().flat_map(|j| j.writes.iter()) {
            match w {
                Write::Put(seq, r) => {
                    msgs.insert(*seq, r.as_slice()).map_err(|e| e.to_string())?;
                }
                Write::Delete(seqs) => {
                    for s in seqs {
                        msgs.remove(*s).map_err(|e| e.to_string())?;
                    }
                }
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
                    msgs.retain(|_, _| false).map_err(|e| e.to_string())?;
                    consumers.retain(|_, _| false).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}
