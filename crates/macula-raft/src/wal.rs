//! The Raft log's own append-only files: entries, truncations, purges, the
//! vote and the commit hint, written as checksummed records and made
//! durable by one `fdatasync` per group commit (or, with a sync interval,
//! written per group commit and synced later: [`Wal::write_with`]).
//!
//! Why not redb, like the state machine: a redb commit with
//! `Durability::Immediate` rewrites B-tree and allocator pages at scattered
//! offsets and syncs them; on this project's benchmark machine it cost
//! 300-450 µs when the three members of a group synced at once on one disk,
//! where an append to a zero-filled file and `fdatasync` cost ~150 µs
//! (BENCHMARKS.md, "Raft groups and KV beside etcd"). A Raft log is
//! append-mostly, read near its tail and cut at both ends: a log of
//! records is its natural shape (etcd keeps its WAL beside bbolt the same
//! way).
//!
//! # Layout
//!
//! A directory (`<group>.wal` beside `<group>.redb`) of segment files named
//! by a 20-digit decimal sequence number (`00000000000000000001.wal`).
//! Each holds records back to back, then zeros:
//!
//! ```text
//! record   = len:u32le  checksum:[u8; 8]  body[len]
//! checksum = the first 8 bytes of BLAKE3(body)
//! body     = kind:u8  payload
//!   1 entry      id_len:u16le  LogId (MessagePack)  Entry (MessagePack)
//!   2 truncate   from:u64le           remove every entry at index >= from
//!   3 purge      LogId (MessagePack)  remove every entry up to it; last purged
//!   4 vote       Vote (MessagePack)
//!   5 committed  Option<LogId> (MessagePack)
//! ```
//!
//! A `len` of 0 ends a segment's records (files grow by zero-filled 1 MiB
//! chunks, so that an `fdatasync` after an append has no file size to
//! update most of the time). Replaying every segment in order rebuilds the
//! log. A record whose checksum fails, or that runs past the file, ends
//! the **last** segment's records (a write torn by a crash: it was never
//! acknowledged, since acknowledgement follows the `fdatasync`); the rest
//! of that segment is zeroed before anything is appended. The same in an
//! earlier segment is corruption and refuses to open.
//!
//! A new segment starts once the active one passes [`SEGMENT_BYTES`]; it
//! opens with the vote, commit hint and last purged id as they stand, so
//! older segments hold nothing but entries. After a purge, the oldest
//! segments whose entries are all purged are deleted (only ever a prefix
//! of the sequence, so no truncation is lost that a kept entry needs).
//!
//! One writer ([`Wal`], owned by the log store's writer thread) appends;
//! any number of readers ([`WalReader`]) read entries with `pread` from an
//! in-memory index of where each live entry is.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::Vote;
use parking_lot::{Mutex, RwLock};

use crate::error::{decode, encode, StoreError};
use crate::{LogId, MemberId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

/// A segment is closed, and the next one started, past this size.
pub const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Files grow by zero-filled chunks of this size.
const CHUNK: u64 = 1024 * 1024;
/// `len` and checksum.
const HEADER: usize = 4 + 8;
/// No record is larger (an entry is bounded by the frame size long before).
const MAX_RECORD: usize = 1 << 30;

const ENTRY: u8 = 1;
const TRUNCATE: u8 = 2;
const PURGE: u8 = 3;
const VOTE: u8 = 4;
const COMMITTED: u8 = 5;

/// One change of the log, as the writer hands it over.
#[derive(Debug)]
pub enum Record<'a> {
    /// An entry (`bytes` is its MessagePack form).
    Entry { log_id: LogId, bytes: &'a [u8] },
    /// Remove every entry at `from` and after.
    Truncate { from: u64 },
    /// Remove every entry up to `upto`, which becomes the last purged id.
    Purge { upto: LogId },
    /// The vote.
    Vote(Vote<MemberId>),
    /// The commit hint.
    Committed(Option<LogId>),
}

/// Where one live entry is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    /// Of the entry's MessagePack bytes in the segment file.
    offset: u64,
    len: u32,
    log_id: LogId,
}

/// What replaying the records builds, shared by the writer and readers.
#[derive(Debug, Default)]
struct State {
    vote: Option<Vote<MemberId>>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    index: BTreeMap<u64, Loc>,
    files: BTreeMap<u64, Arc<File>>,
}

impl State {
    fn last(&self) -> Option<LogId> {
        self.index
            .last_key_value()
            .map(|(_, l)| l.log_id)
            .or(self.last_purged)
    }
}

/// A decoded record, located in its segment.
enum Parsed {
    Entry(Loc),
    Truncate(u64),
    Purge(LogId),
    Vote(Vote<MemberId>),
    Committed(Option<LogId>),
}

impl State {
    fn apply(&mut self, p: Parsed) {
        match p {
            Parsed::Entry(loc) => {
                self.index.insert(loc.log_id.index, loc);
            }
            Parsed::Truncate(from) => {
                self.index.split_off(&from);
            }
            Parsed::Purge(upto) => {
                self.index = self.index.split_off(&(upto.index + 1));
                self.last_purged = Some(upto);
            }
            Parsed::Vote(v) => self.vote = Some(v),
            Parsed::Committed(c) => self.committed = c,
        }
    }
}

/// Reads the log: cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct WalReader {
    state: Arc<RwLock<State>>,
    /// Held by the writer while it writes; tests hold it to keep a write
    /// from reaching the disk.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) gate: Arc<Mutex<()>>,
    /// `fdatasync`s of segments by the writer (diagnostics and tests).
    syncs: Arc<std::sync::atomic::AtomicU64>,
    /// Tests: every `fdatasync` of a segment waits for this, after
    /// counting itself in `syncs_waiting` (a test holds it to keep a sync
    /// under way).
    #[cfg(test)]
    pub(crate) sync_gate: Arc<Mutex<()>>,
    #[cfg(test)]
    pub(crate) syncs_waiting: Arc<std::sync::atomic::AtomicU64>,
}

/// Where the active segment stood when [`Wal::sync_point`] was taken: an
/// `fdatasync` of `file` made outside the writer's lock covers every
/// record written before ([`Wal::synced_at`]).
#[derive(Debug, Clone)]
pub struct SyncPoint {
    file: Arc<File>,
    segment: u64,
    pos: u64,
}

impl SyncPoint {
    /// `fdatasync`s the segment (blocking; the writer goes on meanwhile).
    pub fn sync(&self, reader: &WalReader) -> Result<(), StoreError> {
        reader.sync_file(&self.file)?;
        reader.counted_sync();
        Ok(())
    }
}

impl WalReader {
    /// `fdatasync`s a segment (tests may hold it: `sync_gate`).
    fn sync_file(&self, file: &File) -> std::io::Result<()> {
        #[cfg(test)]
        let _held = {
            self.syncs_waiting
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            self.sync_gate.lock()
        };
        file.sync_data()
    }

    fn counted_sync(&self) {
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The entries in `range` that are on disk, in index order.
    pub fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>, StoreError> {
        let locs: Vec<(Loc, Arc<File>)> = {
            let s = self.state.read();
            s.index
                .range((range.start_bound().cloned(), range.end_bound().cloned()))
                .map(|(_, loc)| {
                    s.files
                        .get(&loc.segment)
                        .map(|f| (*loc, f.clone()))
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "log entry {} in a missing segment {}",
                                loc.log_id.index, loc.segment
                            ))
                        })
                })
                .collect::<Result<_, _>>()?
        };
        // Read outside the lock (a segment deleted meanwhile stays readable
        // through its open file).
        let mut out = Vec::with_capacity(locs.len());
        for (loc, file) in locs {
            let mut buf = vec![0u8; loc.len as usize];
            file.read_exact_at(&mut buf, loc.offset)?;
            out.push(decode("log entry", &buf)?);
        }
        Ok(out)
    }

    /// The last entry's id on disk, or the last purged one.
    pub fn last(&self) -> Option<LogId> {
        self.state.read().last()
    }

    /// The log id at `index`, if that entry is on disk.
    pub fn log_id(&self, index: u64) -> Option<LogId> {
        self.state.read().index.get(&index).map(|l| l.log_id)
    }

    pub fn last_purged(&self) -> Option<LogId> {
        self.state.read().last_purged
    }

    pub fn vote(&self) -> Option<Vote<MemberId>> {
        self.state.read().vote
    }

    pub fn committed(&self) -> Option<LogId> {
        self.state.read().committed
    }

    /// How many times the writer synced a segment (`fdatasync`) since open.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The writer: appends records to the active segment.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    reader: WalReader,
    active: u64,
    file: Arc<File>,
    /// Where the next record goes in the active segment.
    pos: u64,
    /// The active segment's length (zeros past `pos`).
    len: u64,
    /// The highest entry index each segment ever held (`None`: no entries).
    highest: BTreeMap<u64, Option<u64>>,
    /// Records were written to the active segment since its last sync.
    unsynced: bool,
}

fn segment_name(id: u64) -> String {
    format!("{id:020}.wal")
}

fn segment_id(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".wal")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

fn checksum(body: &[u8]) -> [u8; 8] {
    let h = blake3::hash(body);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

/// Appends `r` to `buf` (which starts at file offset `base`); what a
/// replay of it reads.
fn put_record(
    buf: &mut Vec<u8>,
    base: u64,
    segment: u64,
    r: &Record<'_>,
) -> Result<Parsed, StoreError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER]);
    let parsed = match r {
        Record::Entry { log_id, bytes } => {
            buf.push(ENTRY);
            let id = encode("log id", log_id)?;
            let id_len = u16::try_from(id.len())
                .map_err(|_| StoreError::Corrupt("log id too long".into()))?;
            buf.extend_from_slice(&id_len.to_le_bytes());
            buf.extend_from_slice(&id);
            let len = u32::try_from(bytes.len())
                .map_err(|_| StoreError::Corrupt("log entry too large".into()))?;
            let loc = Loc {
                segment,
                offset: base + buf.len() as u64,
                len,
                log_id: *log_id,
            };
            buf.extend_from_slice(bytes);
            Parsed::Entry(loc)
        }
        Record::Truncate { from } => {
            buf.push(TRUNCATE);
            buf.extend_from_slice(&from.to_le_bytes());
            Parsed::Truncate(*from)
        }
        Record::Purge { upto } => {
            buf.push(PURGE);
            buf.extend_from_slice(&encode("last purged", upto)?);
            Parsed::Purge(*upto)
        }
        Record::Vote(v) => {
            buf.push(VOTE);
            buf.extend_from_slice(&encode("vote", v)?);
            Parsed::Vote(*v)
        }
        Record::Committed(c) => {
            buf.push(COMMITTED);
            buf.extend_from_slice(&encode("committed", c)?);
            Parsed::Committed(*c)
        }
    };
    let body_len = buf.len() - start - HEADER;
    if body_len > MAX_RECORD {
        return Err(StoreError::Corrupt(format!(
            "log record of {body_len} bytes (at most {MAX_RECORD})"
        )));
    }
    let sum = checksum(&buf[start + HEADER..]);
    buf[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    buf[start + 4..start + HEADER].copy_from_slice(&sum);
    Ok(parsed)
}

/// Decodes one record's body found at `body_at` in `segment`.
fn parse_body(segment: u64, body_at: u64, body: &[u8]) -> Result<Parsed, StoreError> {
    let (&kind, rest) = body
        .split_first()
        .ok_or_else(|| StoreError::Corrupt("empty log record".into()))?;
    Ok(match kind {
        ENTRY => {
            let (len, rest) = rest
                .split_first_chunk::<2>()
                .ok_or_else(|| StoreError::Corrupt("short log entry record".into()))?;
            let id_len = u16::from_le_bytes(*len) as usize;
            if rest.len() < id_len {
                return Err(StoreError::Corrupt("short log entry record".into()));
            }
            let (id, entry) = rest.split_at(id_len);
            let log_id: LogId = decode("log id", id)?;
            Parsed::Entry(Loc {
                segment,
                offset: body_at + 1 + 2 + id_len as u64,
                len: entry.len() as u32,
                log_id,
            })
        }
        TRUNCATE => {
            let from = rest
                .first_chunk::<8>()
                .ok_or_else(|| StoreError::Corrupt("short truncate record".into()))?;
            Parsed::Truncate(u64::from_le_bytes(*from))
        }
        PURGE => Parsed::Purge(decode("last purged", rest)?),
        VOTE => Parsed::Vote(decode("vote", rest)?),
        COMMITTED => Parsed::Committed(decode("committed", rest)?),
        other => {
            return Err(StoreError::Corrupt(format!(
                "unknown log record kind {other}"
            )))
        }
    })
}

/// Where one segment's records end: after the last whole, intact record.
struct Scan {
    end: u64,
    /// Whether the records ended at a torn or damaged one (not at zeros or
    /// the end of the file).
    torn: bool,
}

/// Replays one segment's records into `state`.
fn scan(
    segment: u64,
    data: &[u8],
    state: &mut State,
    highest: &mut Option<u64>,
) -> Result<Scan, StoreError> {
    let mut off = 0usize;
    loop {
        let Some(header) = data.get(off..off + HEADER) else {
            // Fewer bytes than a header left: zeros, or a torn header.
            let torn = data[off..].iter().any(|b| *b != 0);
            return Ok(Scan {
                end: off as u64,
                torn,
            });
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len == 0 {
            return Ok(Scan {
                end: off as u64,
                torn: header.iter().any(|b| *b != 0),
            });
        }
        let body_at = off + HEADER;
        let intact = len <= MAX_RECORD
            && data
                .get(body_at..body_at + len)
                .is_some_and(|body| checksum(body) == header[4..HEADER]);
        if !intact {
            return Ok(Scan {
                end: off as u64,
                torn: true,
            });
        }
        let parsed = parse_body(segment, body_at as u64, &data[body_at..body_at + len])?;
        if let Parsed::Entry(loc) = &parsed {
            *highest = Some(highest.map_or(loc.log_id.index, |h| h.max(loc.log_id.index)));
        }
        state.apply(parsed);
        off = body_at + len;
    }
}

/// Replays `data` as one segment's bytes and decodes every entry it
/// locates: the decoder the fuzz target `raft_log` drives (no I/O).
#[doc(hidden)]
pub fn fuzz_scan(data: &[u8]) {
    let mut state = State::default();
    let mut highest = None;
    if scan(1, data, &mut state, &mut highest).is_ok() {
        for loc in state.index.values() {
            let start = loc.offset as usize;
            if let Some(bytes) = data.get(start..start + loc.len as usize) {
                let _ = decode::<Entry>("log entry", bytes);
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes zeros over `[from, to)` of `file`.
fn zero(file: &File, from: u64, to: u64) -> Result<(), StoreError> {
    let chunk = vec![0u8; CHUNK.min(to.saturating_sub(from)) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl Wal {
    /// Opens the log in `dir`, creating it if needed, and replays it.
    pub fn open(dir: &Path) -> Result<Wal, StoreError> {
        std::fs::create_dir_all(dir)?;
        let mut ids = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if let Some(id) = e.file_name().to_str().and_then(segment_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut state = State::default();
        let mut highest = BTreeMap::new();
        let mut tail = None;
        for (i, &id) in ids.iter().enumerate() {
            let path = dir.join(segment_name(id));
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let data = std::fs::read(&path)?;
            let mut high = None;
            let found = scan(id, &data, &mut state, &mut high)?;
            highest.insert(id, high);
            let last = i + 1 == ids.len();
            if found.torn && !last {
                return Err(StoreError::Corrupt(format!(
                    "raft log segment {} is damaged at byte {} (not the last segment)",
                    path.display(),
                    found.end
                )));
            }
            if found.torn {
                tracing::warn!(
                    path = %path.display(),
                    at = found.end,
                    "raft log ends in a torn record (a write cut by a crash, never acknowledged): dropping it"
                );
                zero(&file, found.end, data.len() as u64)?;
                file.sync_data()?;
            }
            let file = Arc::new(file);
            state.files.insert(id, file.clone());
            if last {
                tail = Some((id, file, found.end, data.len() as u64));
            }
        }
        // An existing active segment may hold what an earlier process
        // wrote unsynced (in the page cache only, after a `kill -9`): not
        // known synced until this writer syncs it.
        let existing = tail.is_some();
        let (active, file, pos, len) = match tail {
            Some(t) => t,
            None => {
                let file = Arc::new(create_segment(dir, 1)?);
                state.files.insert(1, file.clone());
                highest.insert(1, None);
                (1, file, 0, 0)
            }
        };
        Ok(Wal {
            dir: dir.to_path_buf(),
            reader: WalReader {
                state: Arc::new(RwLock::new(state)),
                gate: Arc::default(),
                syncs: Arc::default(),
                #[cfg(test)]
                sync_gate: Arc::default(),
                #[cfg(test)]
                syncs_waiting: Arc::default(),
            },
            active,
            file,
            pos,
            len,
            highest,
            unsynced: existing,
        })
    }

    pub fn reader(&self) -> WalReader {
        self.reader.clone()
    }

    fn counted_sync(&self) {
        self.reader.counted_sync();
    }

    /// Appends `records` and makes them durable (one `fdatasync`, and a
    /// directory sync when a segment was started); only then are they
    /// visible to readers. On an error nothing of them is visible (what
    /// reached the file is overwritten by the next write).
    pub fn write(&mut self, records: &[Record<'_>]) -> Result<(), StoreError> {
        self.write_with(records, true)
    }

    /// Whether the next write starts a new segment (and so syncs the one
    /// it closes).
    pub fn would_rotate(&self) -> bool {
        self.pos >= SEGMENT_BYTES
    }

    /// Whether records were written since the last `fdatasync` of the
    /// active segment ([`Wal::write_with`] without a sync), or may have
    /// been (by an earlier process: true after opening an existing log
    /// until the first sync).
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Syncs the active segment if records were written to it unsynced.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced {
            self.reader.sync_file(&self.file)?;
            self.counted_sync();
            self.unsynced = false;
        }
        Ok(())
    }

    /// What a sync made without this writer ([`SyncPoint::sync`], which
    /// needs no `&mut`, so the caller can release the writer's lock for
    /// it) must cover now; `None` when nothing is unsynced. Only the
    /// active segment can hold unsynced records (see [`Wal::write_with`]).
    pub fn sync_point(&self) -> Option<SyncPoint> {
        self.unsynced.then(|| SyncPoint {
            file: self.file.clone(),
            segment: self.active,
            pos: self.pos,
        })
    }

    /// A [`SyncPoint`] was synced: if nothing was written since it was
    /// taken, the log holds no unsynced record any more (true returned).
    /// Otherwise what was written since is still unsynced (false).
    pub fn synced_at(&mut self, point: &SyncPoint) -> bool {
        if self.active == point.segment && self.pos == point.pos {
            self.unsynced = false;
        }
        !self.unsynced
    }

    /// [`Wal::write`], with `sync == false` written to the operating system
    /// only (page cache) and visible to readers at once: such records
    /// survive a crash of the process, not a power loss before the next
    /// [`Wal::sync`] (or synced write). Starting a segment always syncs the
    /// one it closes first, so only the active segment ever holds unsynced
    /// records, and a torn record after a power loss can only be in the
    /// last segment (which a replay cuts there, as after a torn write).
    pub fn write_with(&mut self, records: &[Record<'_>], sync: bool) -> Result<(), StoreError> {
        let gate = self.reader.gate.clone();
        let _held = gate.lock();
        let rotate = self.pos >= SEGMENT_BYTES;
        let (segment, base) = if rotate {
            (self.active + 1, 0)
        } else {
            (self.active, self.pos)
        };
        let mut buf = Vec::new();
        if rotate {
            // The new segment restates what older ones said besides entries.
            let s = self.reader.state.read();
            let mut head = Vec::new();
            if let Some(v) = s.vote {
                head.push(Record::Vote(v));
            }
            if s.committed.is_some() {
                head.push(Record::Committed(s.committed));
            }
            if let Some(p) = s.last_purged {
                head.push(Record::Purge { upto: p });
            }
            drop(s);
            for r in &head {
                put_record(&mut buf, base, segment, r)?;
            }
        }
        let mut parsed = Vec::with_capacity(records.len());
        for r in records {
            parsed.push(put_record(&mut buf, base, segment, r)?);
        }
        if rotate {
            // The closing segment's unsynced tail first (see `write_with`).
            self.sync()?;
        }
        let (file, len) = if rotate {
            (Arc::new(create_segment(&self.dir, segment)?), 0)
        } else {
            (self.file.clone(), self.len)
        };
        let end = base + buf.len() as u64;
        let mut new_len = len;
        if end > len {
            // Grow by zero-filled chunks: most syncs then have no size to
            // update.
            new_len = end.div_ceil(CHUNK) * CHUNK;
            zero(&file, len, new_len)?;
        }
        file.write_all_at(&buf, base)?;
        if sync {
            self.reader.sync_file(&file)?;
            self.counted_sync();
        }
        if rotate {
            sync_dir(&self.dir)?;
            self.active = segment;
            self.file = file.clone();
            self.highest.insert(segment, None);
        }
        self.pos = end;
        self.len = new_len;
        self.unsynced = !sync;
        let mut purged = false;
        {
            let mut s = self.reader.state.write();
            if rotate {
                s.files.insert(segment, file);
            }
            for p in parsed {
                match &p {
                    Parsed::Entry(loc) => {
                        let h = self.highest.entry(segment).or_default();
                        *h = Some(h.map_or(loc.log_id.index, |x| x.max(loc.log_id.index)));
                    }
                    Parsed::Purge(_) => purged = true,
                    _ => {}
                }
                s.apply(p);
            }
        }
        if purged {
            self.drop_purged_segments();
        }
        Ok(())
    }

    /// Deletes the oldest segments whose entries are all purged (never the
    /// active one; only a prefix of the sequence).
    fn drop_purged_segments(&mut self) {
        let purged = self.reader.state.read().last_purged.map(|l| l.index);
        let doomed: Vec<u64> = self
            .highest
            .iter()
            .take_while(|(id, high)| {
                **id != self.active && high.is_none_or(|h| purged.is_some_and(|p| h <= p))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in doomed {
            let path = self.dir.join(segment_name(id));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete a purged raft log segment");
                break;
            }
            self.highest.remove(&id);
            self.reader.state.write().files.remove(&id);
            tracing::debug!(path = %path.display(), "deleted a purged raft log segment");
        }
    }

    /// The segments on disk, oldest first (for tests and diagnostics).
    pub fn segments(&self) -> Vec<u64> {
        self.highest.keys().copied().collect()
    }
}

fn create_segment(dir: &Path, id: u64) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(segment_name(id)))?;
    sync_dir(dir)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, MemberId::from(1u64)), index)
    }

    fn entry_bytes(log_id: LogId) -> Vec<u8> {
        let e = Entry {
            log_id,
            payload: EntryPayload::Blank,
        };
        encode("log entry", &e).expect("encode")
    }

    fn append(wal: &mut Wal, ids: &[LogId]) {
        let bytes: Vec<Vec<u8>> = ids.iter().map(|i| entry_bytes(*i)).collect();
        let records: Vec<Record<'_>> = ids
            .iter()
            .zip(&bytes)
            .map(|(i, b)| Record::Entry {
                log_id: *i,
                bytes: b,
            })
            .collect();
        wal.write(&records).expect("write");
    }

    fn indexes(r: &WalReader) -> Vec<(u64, u64)> {
        r.entries(..)
            .expect("read")
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    #[test]
    fn replays_entries_truncations_purges_and_meta() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.wal");
        {
            let mut wal = Wal::open(&p).expect("open");
            append(&mut wal, &[id(1, 1), id(1, 2), id(1, 3), id(1, 4)]);
            wal.write(&[
                Record::Truncate { from: 3 },
                Record::Vote(Vote::new_committed(2, MemberId::from(1u64))),
            ])
            .expect("write");
            append(&mut wal, &[id(2, 3)]);
            wal.write(&[
                Record::Purge { upto: id(1, 1) },
                Record::Committed(Some(id(2, 3))),
            ])
            .expect("write");
            let r = wal.reader();
            assert_eq!(indexes(&r), vec![(1, 2), (2, 3)]);
        }
        let wal = Wal::open(&p).expect("reopen");
        let r = wal.reader();
        assert_eq!(indexes(&r), vec![(1, 2), (2, 3)]);
        assert_eq!(r.entries(3..).expect("read").len(), 1);
        assert_eq!(r.last(), Some(id(2, 3)));
        assert_eq!(r.last_purged(), Some(id(1, 1)));
        assert_eq!(r.committed(), Some(id(2, 3)));
        assert_eq!(r.log_id(2), Some(id(1, 2)));
        assert_eq!(r.log_id(4), None);
        assert_eq!(r.vote(), Some(Vote::new_committed(2, MemberId::from(1u64))));
    }

    #[test]
    fn a_torn_tail_is_dropped_and_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.wal");
        {
            let mut wal = Wal::open(&p).expect("open");
            append(&mut wal, &[id(1, 1), id(1, 2), id(1, 3)]);
        }
        let seg = p.join(segment_name(1));
        let data = std::fs::read(&seg).expect("read");
        // Damage the second record's last byte, as a crash mid-write would
        // (the third, written in the same write, reached the disk whole).
        let len_at = |at: usize| {
            u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize
        };
        let second = HEADER + len_at(0);
        let last_byte = second + HEADER + len_at(second) - 1;
        let f = OpenOptions::new().write(true).open(&seg).expect("open");
        f.write_all_at(&[data[last_byte] ^ 0xff], last_byte as u64)
            .expect("poke");
        drop(f);
        let mut wal = Wal::open(&p).expect("reopen");
        assert_eq!(indexes(&wal.reader()), vec![(1, 1)]);
        // A record of the same size where the torn one was: the whole
        // third record behind it must not come back.
        append(&mut wal, &[id(2, 2)]);
        drop(wal);
        let wal = Wal::open(&p).expect("reopen");
        assert_eq!(indexes(&wal.reader()), vec![(1, 1), (2, 2)]);
    }

    #[test]
    fn unsynced_writes_are_read_back_and_synced_on_demand_or_at_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.wal");
        {
            let mut wal = Wal::open(&p).expect("open");
            let bytes = entry_bytes(id(1, 1));
            wal.write_with(
                &[Record::Entry {
                    log_id: id(1, 1),
                    bytes: &bytes,
                }],
                false,
            )
            .expect("write");
            assert!(wal.unsynced());
            assert_eq!(wal.reader().syncs(), 0);
            // Readable at once.
            assert_eq!(indexes(&wal.reader()), vec![(1, 1)]);
            wal.sync().expect("sync");
            assert!(!wal.unsynced());
            assert_eq!(wal.reader().syncs(), 1);
            wal.sync().expect("nothing to sync");
            assert_eq!(wal.reader().syncs(), 1);
            // A new segment syncs the one it closes first.
            let bytes = entry_bytes(id(1, 2));
            wal.write_with(
                &[Record::Entry {
                    log_id: id(1, 2),
                    bytes: &bytes,
                }],
                false,
            )
            .expect("write");
            wal.pos = SEGMENT_BYTES;
            let bytes = entry_bytes(id(1, 3));
            wal.write_with(
                &[Record::Entry {
                    log_id: id(1, 3),
                    bytes: &bytes,
                }],
                false,
            )
            .expect("write");
            assert_eq!(wal.segments(), vec![1, 2]);
            assert_eq!(wal.reader().syncs(), 2);
            assert!(wal.unsynced());
            // Dropped unsynced, as a killed process leaves it: the page
            // cache has the records.
        }
        let wal = Wal::open(&p).expect("reopen");
        assert_eq!(indexes(&wal.reader()), vec![(1, 1), (1, 2), (1, 3)]);
    }

    #[test]
    fn damage_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.wal");
        {
            let mut wal = Wal::open(&p).expect("open");
            append(&mut wal, &[id(1, 1)]);
            wal.pos = SEGMENT_BYTES; // start a second segment
            append(&mut wal, &[id(1, 2)]);
            assert_eq!(wal.segments(), vec![1, 2]);
        }
        let seg = p.join(segment_name(1));
        let f = OpenOptions::new().write(true).open(&seg).expect("open");
        f.write_all_at(&[0xff], (HEADER + 2) as u64).expect("poke");
        drop(f);
        assert!(matches!(Wal::open(&p), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn new_segments_restate_the_meta_and_purged_ones_are_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.wal");
        let vote = Vote::new_committed(1, MemberId::from(1u64));
        {
            let mut wal = Wal::open(&p).expect("open");
            wal.write(&[Record::Vote(vote)]).expect("vote");
            append(&mut wal, &[id(1, 1), id(1, 2)]);
            wal.pos = SEGMENT_BYTES;
            append(&mut wal, &[id(1, 3)]);
            wal.pos = SEGMENT_BYTES;
            append(&mut wal, &[id(1, 4)]);
            assert_eq!(wal.segments(), vec![1, 2, 3]);
            // Segment 2 still holds a live entry: only segment 1 goes.
            wal.write(&[Record::Purge { upto: id(1, 2) }])
                .expect("purge");
            assert_eq!(wal.segments(), vec![2, 3]);
            assert!(!p.join(segment_name(1)).exists());
            wal.write(&[Record::Purge { upto: id(1, 3) }])
                .expect("purge");
            assert_eq!(wal.segments(), vec![3]);
            // The active segment stays, however purged.
            wal.write(&[Record::Purge { upto: id(1, 4) }])
                .expect("purge");
            assert_eq!(wal.segments(), vec![3]);
        }
        // The vote was written in segment 1 only, and restated in 2 and 3.
        let wal = Wal::open(&p).expect("reopen");
        let r = wal.reader();
        assert_eq!(r.vote(), Some(vote));
        assert_eq!(r.last_purged(), Some(id(1, 4)));
        assert_eq!(r.last(), Some(id(1, 4)));
        assert!(indexes(&r).is_empty());
    }

    #[test]
    fn an_intact_record_that_does_not_decode_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.wal");
        drop(Wal::open(&p).expect("open"));
        let body = [VOTE, 0x93];
        let mut rec = (body.len() as u32).to_le_bytes().to_vec();
        rec.extend_from_slice(&checksum(&body));
        rec.extend_from_slice(&body);
        std::fs::write(p.join(segment_name(1)), rec).expect("write");
        assert!(matches!(
            Wal::open(&p),
            Err(StoreError::Decode { what: "vote", .. })
        ));
        // An unknown kind, likewise.
        let body = [9u8];
        let mut rec = (body.len() as u32).to_le_bytes().to_vec();
        rec.extend_from_slice(&checksum(&body));
        rec.extend_from_slice(&body);
        std::fs::write(p.join(segment_name(1)), rec).expect("write");
        assert!(matches!(Wal::open(&p), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn other_files_in_the_directory_are_not_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.wal");
        {
            let mut wal = Wal::open(&p).expect("open");
            append(&mut wal, &[id(1, 1)]);
        }
        for stray in [
            "notes.txt",
            "123.wal",
            "0000000000000000000x.wal",
            "00000000000000000002.wal.tmp",
        ] {
            std::fs::write(p.join(stray), b"garbage").expect("write");
        }
        let wal = Wal::open(&p).expect("reopen");
        assert_eq!(wal.segments(), vec![1]);
        assert_eq!(indexes(&wal.reader()), vec![(1, 1)]);
    }

    #[test]
    fn an_entry_record_shorter_than_its_log_id_is_corrupt() {
        // Intact (checksum and all) but its log id runs past the record.
        let body = [ENTRY, 200, 0, 1, 2, 3];
        assert!(matches!(
            parse_body(1, 0, &body),
            Err(StoreError::Corrupt(_))
        ));
        // A zero length with anything after it is damage, not the end.
        let mut state = State::default();
        let mut high = None;
        let mut header = [0u8; HEADER + 4];
        header[5] = 1;
        let found = scan(1, &header, &mut state, &mut high).expect("scan");
        assert!(found.torn);
        let zeros = [0u8; HEADER + 4];
        assert!(!scan(1, &zeros, &mut state, &mut high).expect("scan").torn);
    }

    #[test]
    fn files_grow_in_zeroed_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.wal");
        let mut wal = Wal::open(&p).expect("open");
        append(&mut wal, &[id(1, 1)]);
        let seg = p.join(segment_name(1));
        // The sizes the module documentation promises.
        assert_eq!((CHUNK, SEGMENT_BYTES), (1 << 20, 32 << 20));
        assert_eq!(std::fs::metadata(&seg).expect("meta").len(), CHUNK);
        let big = vec![7u8; CHUNK as usize];
        wal.write(&[Record::Entry {
            log_id: id(1, 2),
            bytes: &big,
        }])
        .expect("write");
        assert_eq!(std::fs::metadata(&seg).expect("meta").len(), 2 * CHUNK);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Truncate(u8),
        Purge(u8),
        Vote(u8),
        Rotate,
        Reopen,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1u8..6).prop_map(Op::Append),
            1 => any::<u8>().prop_map(Op::Truncate),
            1 => any::<u8>().prop_map(Op::Purge),
            1 => any::<u8>().prop_map(Op::Vote),
            1 => Just(Op::Rotate),
            1 => Just(Op::Reopen),
        ]
    }

    proptest::proptest! {
        /// A segment cut short or with bytes changed anywhere replays
        /// without a panic: a cut tail or damaged record ends the records.
        #[test]
        fn damaged_segments_replay_without_panic(
            cut in 0usize..2000,
            flips in proptest::collection::vec((0usize..2000, 1u8..=255), 0..4),
        ) {
            let mut buf = Vec::new();
            let bytes = entry_bytes(id(1, 1));
            for r in [
                Record::Vote(Vote::new(1, MemberId::from(1u64))),
                Record::Entry { log_id: id(1, 1), bytes: &bytes },
                Record::Truncate { from: 1 },
                Record::Purge { upto: id(1, 1) },
                Record::Committed(Some(id(1, 1))),
            ] {
                put_record(&mut buf, 0, 1, &r).expect("record");
            }
            buf.truncate(cut.min(buf.len()));
            for (at, x) in flips {
                if let Some(b) = buf.get_mut(at) {
                    *b ^= x;
                }
            }
            fuzz_scan(&buf);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any sequence of appends, truncations, purges, votes, segment
        /// changes and reopens reads back as a plain model of the log.
        #[test]
        fn reads_back_as_the_model(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("g.wal");
            let mut wal = Wal::open(&p).expect("open");
            let mut model: BTreeMap<u64, LogId> = BTreeMap::new();
            let mut purged: Option<LogId> = None;
            let mut vote = None;
            let mut term = 1;
            for op in ops {
                let last = model.keys().last().copied().or(purged.map(|l| l.index)).unwrap_or(0);
                let first = purged.map_or(1, |l| l.index + 1);
                match op {
                    Op::Append(n) => {
                        let ids: Vec<LogId> =
                            (last + 1..=last + u64::from(n)).map(|i| id(term, i)).collect();
                        append(&mut wal, &ids);
                        model.extend(ids.iter().map(|i| (i.index, *i)));
                    }
                    Op::Truncate(at) => {
                        let from = first + u64::from(at) % (last + 2 - first);
                        wal.write(&[Record::Truncate { from }]).expect("truncate");
                        model.split_off(&from);
                        term += 1;
                    }
                    Op::Purge(at) => {
                        if let Some(upto) = model.values().nth(usize::from(at) % model.len().max(1)).copied() {
                            wal.write(&[Record::Purge { upto }]).expect("purge");
                            model = model.split_off(&(upto.index + 1));
                            purged = Some(upto);
                        }
                    }
                    Op::Vote(t) => {
                        let v = Vote::new(u64::from(t), MemberId::from(1u64));
                        wal.write(&[Record::Vote(v)]).expect("vote");
                        vote = Some(v);
                    }
                    Op::Rotate => wal.pos = SEGMENT_BYTES,
                    Op::Reopen => {
                        drop(wal);
                        wal = Wal::open(&p).expect("reopen");
                    }
                }
                let r = wal.reader();
                let got: Vec<LogId> = r.entries(..).expect("read").iter().map(|e| e.log_id).collect();
                let want: Vec<LogId> = model.values().copied().collect();
                proptest::prop_assert_eq!(got, want);
                proptest::prop_assert_eq!(r.last_purged(), purged);
                proptest::prop_assert_eq!(r.vote(), vote);
                proptest::prop_assert_eq!(r.last(), model.values().last().copied().or(purged));
            }
            drop(wal);
            let r = Wal::open(&p).expect("reopen").reader();
            let got: Vec<LogId> = r.entries(..).expect("read").iter().map(|e| e.log_id).collect();
            proptest::prop_assert_eq!(got, model.values().copied().collect::<Vec<_>>());
        }
    }
}
