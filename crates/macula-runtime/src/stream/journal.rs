//! A stream store's journal: the write-ahead file that makes an
//! acknowledged write durable with one append and one `fdatasync`, while
//! the redb file behind it is committed without syncing and checkpointed
//! now and then (`store.rs`).
//!
//! Why: a redb commit with `Durability::Immediate` rewrites B-tree and
//! allocator pages at scattered offsets and syncs them (300-450 µs on this
//! project's benchmark machine), where an append and `fdatasync` of a
//! preallocated file costs about 125-150 µs (`macula-raft`'s `wal.rs`
//! measured the same for the Raft log).
//!
//! # Layout
//!
//! One file, `<stream>.journal` beside `<stream>.redb`: records back to
//! back from offset 0, then whatever an earlier epoch left, then zeros.
//!
//! ```text
//! record   = len:u32le  checksum:[u8; 8]  body[len]
//! len      = the body's length, with bit 31 set (a chained record)
//! checksum = the first 8 bytes of BLAKE3(link || body), link being the
//!            previous record's checksum (the first record of an epoch,
//!            at offset 0: eight zero bytes; the first after a
//!            checkpoint's start offset: `meta.journal_link`)
//! body     = epoch:u64le  writes (MessagePack of Vec<Write>, PROTOCOL.md 5.12)
//! ```
//!
//! **Chained records.** A record's checksum covers the previous record's
//! checksum, so a replay only reads records written one after the other
//! in one pass. Without it, a power loss could leave a torn (unsynced)
//! record followed by intact ones of the same epoch; the next open stops at
//! the torn one and appends over it, and if its new records end exactly
//! where an old one starts (same-sized publishes make that likely), a later
//! open would replay the old, never acknowledged records after the new
//! ones, with sequences the new ones reused. Records of earlier versions
//! (bit 31 clear, checksum of the body alone) are read while no chained
//! record came before them in the replay and the store records no link
//! (`Start::link` is `None`).
//!
//! **Group append.** Writes are staged in memory ([`Journal::stage`]) and
//! a [`Journal::flush`] appends everything staged since the last one as
//! one record: one `pwrite` and one checksum for a whole group of
//! publishes. A flushed record's array head is always an array 32 (`0xdd`
//! and a big-endian `u32` count, written once the count is known);
//! records of earlier versions (any array head) read the same.
//!
//! **Epochs and the start offset.** The redb file stores the epoch its
//! journal is in and the offset its replay starts from (`meta.journal`,
//! `meta.journal_at`). A checkpoint (a synced redb commit of everything so
//! far) usually stores the journal's current end as the new start offset:
//! the journal goes on appending in the same epoch, and the records before
//! that offset are never read again. Past a size bound (`JOURNAL_MAX`) a
//! checkpoint stores the next epoch and offset 0 instead, and only then
//! does the journal start again at offset 0 with that epoch. Replay at open
//! reads records from the start offset while they are whole, their
//! checksum holds and their epoch is the file's: the first that is not
//! ends the journal (a torn append, never acknowledged, or a record of an
//! older epoch the new one has not overwritten yet). So the file is never
//! truncated, and an `fdatasync` after an append rarely has a size to
//! update: it grows by zero-filled chunks up to its high-water mark.
//!
//! A record whose checksum holds but whose body does not decode is
//! corruption: the store refuses to open, and nothing is written over it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::write::Write;

/// `len` and checksum.
const HEADER: usize = 4 + 8;
/// The header, the epoch and a MessagePack array 32's head (`0xdd` and a
/// `u32` count): what a staged record starts with.
const PREFIX: usize = HEADER + 8 + 5;
/// The file grows by zero-filled chunks of this size.
const CHUNK: u64 = 1 << 20;
/// No record is larger (a record is one queued write: a publish's writes,
/// bounded well below by the stream's message size limit).
const MAX_RECORD: usize = 1 << 30;
/// A record buffer up to this size is kept for the next append.
const KEEP_BUFFER: usize = 4 << 20;
/// Bit 31 of `len`: a chained record (see the module docs).
const CHAINED: u32 = 1 << 31;
/// The link of an epoch's first record (at offset 0).
pub const NO_LINK: [u8; 8] = [0; 8];

/// Where a replay starts (what the last checkpoint recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    /// The epoch.
    pub epoch: u64,
    /// The offset.
    pub at: u64,
    /// The checksum of the record that ends at `at` ([`NO_LINK`] at offset
    /// 0); `None` for a store that recorded none (an earlier version's:
    /// records of the earlier format are read too, and a chained record
    /// links to [`NO_LINK`]).
    pub link: Option<[u8; 8]>,
}

impl Start {
    /// An epoch's start, at offset 0.
    pub fn epoch(epoch: u64) -> Start {
        Start {
            epoch,
            at: 0,
            link: Some(NO_LINK),
        }
    }
}

/// Why the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading, writing or syncing the file failed.
    #[error("journal {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A whole record with a valid checksum whose writes do not decode.
    #[error("journal {path}: record at offset {offset} does not decode: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// What the decoder said.
        message: String,
    },
}

/// One stream's journal (see the module docs); owned by the store's
/// writer thread.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: std::sync::Arc<File>,
    epoch: u64,
    /// Where the next record goes.
    offset: u64,
    /// The file's size: zero-filled past `offset`, or older records.
    allocated: u64,
    /// Appended since the last `fdatasync`.
    /// Records appended (ever, across epochs) and of those synced.
    appended: u64,
    synced: u64,
    /// The next record, staged (empty, or [`PREFIX`] and the writes'
    /// MessagePack; reused from one record to the next).
    pending: Vec<u8>,
    /// Writes in `pending`.
    pending_writes: u32,
    /// The last record's checksum: the next record's link.
    link: [u8; 8],
}

/// An earlier version's checksum: of the body alone.
fn checksum(body: &[u8]) -> [u8; 8] {
    let mut c = [0u8; 8];
    c.copy_from_slice(&blake3::hash(body).as_bytes()[..8]);
    c
}

/// A chained record's checksum: of the previous record's and the body.
fn chained(link: &[u8; 8], body: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(link);
    h.update(body);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h.finalize().as_bytes()[..8]);
    c
}

/// The journal file of a store file.
pub fn path_of(store: &Path) -> PathBuf {
    store.with_extension("journal")
}

impl Journal {
    /// Creates an empty journal, replacing any file at `path` (a new
    /// stream's: a journal left by a removed stream of the same name must
    /// not be replayed into it).
    pub fn create(path: &Path, epoch: u64) -> Result<Self, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        Ok(Journal {
            path: path.to_path_buf(),
            file: std::sync::Arc::new(file),
            epoch,
            offset: 0,
            allocated: 0,
            appended: 0,
            synced: 0,
            pending: Vec::new(),
            pending_writes: 0,
            link: NO_LINK,
        })
    }

    /// Opens the journal (creating an empty one if there is none) and
    /// returns it with the groups of writes it holds from `start` on (what
    /// the last checkpoint left), in order. The journal then appends after
    /// them.
    pub fn open(path: &Path, start: Start) -> Result<(Self, Vec<Vec<Write>>), JournalError> {
        let Start { epoch, at, link } = start;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        let allocated = file.metadata().map_err(|e| io_err(path, e))?.len();
        let mut j = Journal {
            path: path.to_path_buf(),
            file: std::sync::Arc::new(file),
            epoch,
            offset: at,
            allocated,
            appended: 0,
            synced: 0,
            pending: Vec::new(),
            pending_writes: 0,
            link: link.unwrap_or(NO_LINK),
        };
        let groups = j.replay(link.is_none())?;
        Ok((j, groups))
    }

    /// Reads records from `offset` while they are whole, chained to the
    /// one before and of the journal's epoch; `plain`: records of the
    /// earlier format are read too until the first chained one.
    fn replay(&mut self, mut plain: bool) -> Result<Vec<Vec<Write>>, JournalError> {
        let mut groups = Vec::new();
        let mut head = [0u8; HEADER];
        loop {
            let at = self.offset;
            if at + HEADER as u64 > self.allocated {
                break;
            }
            self.file
                .read_exact_at(&mut head, at)
                .map_err(|e| io_err(&self.path, e))?;
            let len =
                (u32::from_le_bytes([head[0], head[1], head[2], head[3]]) & !CHAINED) as usize;
            if len > MAX_RECORD || at + (HEADER + len) as u64 > self.allocated {
                break;
            }
            let mut record = vec![0u8; HEADER + len];
            self.file
                .read_exact_at(&mut record, at)
                .map_err(|e| io_err(&self.path, e))?;
            match parse(&record, self.epoch, &self.link, plain) {
                Parsed::End => break,
                Parsed::Record(writes, n, sum, was_chained) => {
                    groups.push(writes);
                    self.offset = at + n as u64;
                    self.link = sum;
                    plain &= !was_chained;
                }
                Parsed::Corrupt(message) => {
                    return Err(JournalError::Corrupt {
                        path: self.path.clone(),
                        offset: at,
                        message,
                    })
                }
            }
        }
        Ok(groups)
    }

    /// The epoch records are written in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Where the next record goes (the bytes of this epoch so far).
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// The last record's checksum (what the next record links to, and
    /// what a checkpoint that starts the replay at [`Journal::len`]
    /// records).
    pub fn link(&self) -> [u8; 8] {
        self.link
    }

    /// Whether this epoch holds no record.
    pub fn is_empty(&self) -> bool {
        self.offset == 0
    }

    /// Whether something was appended since the last [`Journal::sync`].
    pub fn unsynced(&self) -> bool {
        self.appended > self.synced
    }

    /// Appends one record of writes (not synced: see [`Journal::sync`]):
    /// [`Journal::stage`] and [`Journal::flush`].
    pub fn append<'a, I>(&mut self, writes: I) -> Result<(), JournalError>
    where
        I: IntoIterator<Item = &'a Write>,
    {
        self.stage(writes)?;
        self.flush().map(|_| ())
    }

    /// Adds writes to the record the next [`Journal::flush`] appends (in
    /// memory: nothing is written yet). Every write staged until then
    /// goes into that one record, so a group of publishes costs one
    /// `pwrite` and one checksum.
    pub fn stage<'a, I>(&mut self, writes: I) -> Result<(), JournalError>
    where
        I: IntoIterator<Item = &'a Write>,
    {
        if self.pending.is_empty() {
            // The header, the epoch and the array's head are filled in by
            // `flush`, once the count is known.
            self.pending.resize(PREFIX, 0);
        }
        let at = self.pending.len();
        let mut n = 0u32;
        for w in writes {
            if let Err(e) = rmp_serde::encode::write(&mut self.pending, w) {
                self.pending.truncate(at);
                return Err(JournalError::Io {
                    path: self.path.clone(),
                    message: format!("encoding: {e}"),
                });
            }
            n += 1;
        }
        if self.pending.len() - HEADER > MAX_RECORD {
            self.pending.truncate(at);
            return Err(JournalError::Io {
                path: self.path.clone(),
                message: format!("a group over the record limit of {MAX_RECORD} bytes"),
            });
        }
        self.pending_writes += n;
        if self.pending.len() == PREFIX {
            // Nothing staged after all.
            self.pending.clear();
        }
        Ok(())
    }

    /// Drops what was staged.
    pub fn discard_staged(&mut self) {
        self.pending.clear();
        self.pending_writes = 0;
    }

    /// Bytes staged for the next [`Journal::flush`] (0: nothing staged).
    pub fn staged_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Appends what was staged as one record (not synced); whether there
    /// was anything. What was staged is dropped either way.
    pub fn flush(&mut self) -> Result<bool, JournalError> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        let mut record = std::mem::take(&mut self.pending);
        let n = std::mem::take(&mut self.pending_writes);
        let len = record.len() - HEADER;
        record[HEADER..HEADER + 8].copy_from_slice(&self.epoch.to_le_bytes());
        // The writes as one MessagePack array (what a `Vec<Write>` encodes
        // to), its length always as an array 32.
        record[HEADER + 8] = 0xdd;
        record[HEADER + 9..PREFIX].copy_from_slice(&n.to_be_bytes());
        let sum = chained(&self.link, &record[HEADER..]);
        record[..4].copy_from_slice(&(len as u32 | CHAINED).to_le_bytes());
        record[4..HEADER].copy_from_slice(&sum);
        let end = self.offset + record.len() as u64;
        let written = if end > self.allocated {
            self.grow(end)
        } else {
            Ok(())
        }
        .and_then(|()| {
            self.file
                .write_all_at(&record, self.offset)
                .map_err(|e| io_err(&self.path, e))
        });
        // A buffer grown by an unusually large group is not kept.
        if record.capacity() <= KEEP_BUFFER {
            record.clear();
            self.pending = record;
        }
        written?;
        self.offset = end;
        self.link = sum;
        self.appended += 1;
        Ok(true)
    }

    /// Zero-fills the file up to at least `end`, by whole chunks.
    fn grow(&mut self, end: u64) -> Result<(), JournalError> {
        let target = end.div_ceil(CHUNK) * CHUNK;
        let zeros = vec![0u8; CHUNK as usize];
        while self.allocated < target {
            let n = (target - self.allocated).min(CHUNK) as usize;
            self.file
                .write_all_at(&zeros[..n], self.allocated)
                .map_err(|e| io_err(&self.path, e))?;
            self.allocated += n as u64;
        }
        Ok(())
    }

    /// Makes what was appended durable (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.unsynced() {
            self.file.sync_data().map_err(|e| io_err(&self.path, e))?;
            self.synced = self.appended;
        }
        Ok(())
    }

    /// What a sync outside the journal's lock needs: the file, and the
    /// count of records appended so far, to give [`Journal::mark_synced`]
    /// once the file's `fdatasync` returned.
    pub fn sync_handle(&self) -> (std::sync::Arc<File>, u64) {
        (self.file.clone(), self.appended)
    }

    /// Records the sync of what was appended up to `upto` (see
    /// [`Journal::sync_handle`]).
    pub fn mark_synced(&mut self, upto: u64) {
        self.synced = self.synced.max(upto);
    }

    /// The path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Empties the file (at a clean close, after a checkpoint moved the
    /// journal to an epoch with no record yet).
    pub fn truncate(&mut self) -> Result<(), JournalError> {
        self.file.set_len(0).map_err(|e| io_err(&self.path, e))?;
        self.allocated = 0;
        self.offset = 0;
        self.link = NO_LINK;
        Ok(())
    }

    /// Starts epoch `epoch` at offset 0: call once the store holds
    /// everything the journal did, durably, and records `epoch` as its
    /// journal's.
    pub fn restart(&mut self, epoch: u64) {
        // Staged writes are in the checkpoint too.
        self.discard_staged();
        self.epoch = epoch;
        self.offset = 0;
        self.link = NO_LINK;
        self.synced = self.appended;
    }
}

/// What the bytes at a record's start hold.
enum Parsed {
    /// The journal's end: no whole record of this epoch with a valid
    /// checksum.
    End,
    /// A record's writes, its length, its checksum and whether it is
    /// chained.
    Record(Vec<Write>, usize, [u8; 8], bool),
    /// A whole record with a valid checksum that does not decode.
    Corrupt(String),
}

/// The record at the start of `bytes`, if it is whole, of `epoch` and
/// chained to `link` (or, with `plain`, of the earlier unchained format).
fn parse(bytes: &[u8], epoch: u64, link: &[u8; 8], plain: bool) -> Parsed {
    let Some(head) = bytes.get(..HEADER) else {
        return Parsed::End;
    };
    let raw = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let is_chained = raw & CHAINED != 0;
    let len = (raw & !CHAINED) as usize;
    if !(8..=MAX_RECORD).contains(&len) || !(is_chained || plain) {
        return Parsed::End;
    }
    let Some(body) = bytes.get(HEADER..HEADER + len) else {
        return Parsed::End;
    };
    let sum = if is_chained {
        chained(link, body)
    } else {
        checksum(body)
    };
    if head[4..] != sum {
        return Parsed::End;
    }
    let mut e = [0u8; 8];
    e.copy_from_slice(&body[..8]);
    if u64::from_le_bytes(e) != epoch {
        return Parsed::End;
    }
    match rmp_serde::from_slice::<Vec<Write>>(&body[8..]) {
        Ok(writes) => Parsed::Record(writes, HEADER + len, sum, is_chained),
        Err(e) => Parsed::Corrupt(e.to_string()),
    }
}

/// Replays a journal's bytes (as a file would hold them) in any epoch
/// found at their start: the fuzz target `stream_journal`. Never panics.
pub fn fuzz_replay(bytes: &[u8]) -> usize {
    let epoch = bytes
        .get(HEADER..HEADER + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let mut at = 0;
    let mut groups = 0;
    let mut link = NO_LINK;
    let mut plain = true;
    while let Parsed::Record(_, n, sum, c) = parse(&bytes[at..], epoch, &link, plain) {
        at += n;
        link = sum;
        plain &= !c;
        groups += 1;
    }
    groups
}

fn io_err(path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(seq: u64) -> Write {
        Write::Put(seq, vec![seq as u8; 10])
    }

    #[test]
    fn appended_groups_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut j = Journal::create(&p, 7).unwrap();
        j.append(&[put(1), put(2)]).unwrap();
        j.append(&[Write::Last(2, 9)]).unwrap();
        j.sync().unwrap();
        drop(j);
        let (j, groups) = Journal::open(&p, Start::epoch(7)).unwrap();
        assert_eq!(groups, vec![vec![put(1), put(2)], vec![Write::Last(2, 9)]]);
        assert!(!j.is_empty());
        // Another epoch's records are not this one's.
        let (_, groups) = Journal::open(&p, Start::epoch(8)).unwrap();
        assert!(groups.is_empty());
    }

    #[test]
    fn a_restarted_epoch_ends_where_its_records_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut j = Journal::create(&p, 1).unwrap();
        for s in 1..=20 {
            j.append(&[put(s)]).unwrap();
        }
        j.restart(2);
        j.append(&[put(21)]).unwrap();
        drop(j);
        // Epoch 1's later records still follow epoch 2's first one.
        let (mut j, groups) = Journal::open(&p, Start::epoch(2)).unwrap();
        assert_eq!(groups, vec![vec![put(21)]]);
        // Appending goes on after it.
        j.append(&[put(22)]).unwrap();
        drop(j);
        let (_, groups) = Journal::open(&p, Start::epoch(2)).unwrap();
        assert_eq!(groups, vec![vec![put(21)], vec![put(22)]]);
    }

    #[test]
    fn a_torn_last_record_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut j = Journal::create(&p, 1).unwrap();
        j.append(&[put(1)]).unwrap();
        let first = j.len();
        j.append(&[put(2)]).unwrap();
        drop(j);
        // Flip a byte of the second record's body.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], first + HEADER as u64 + 9).unwrap();
        let (j, groups) = Journal::open(&p, Start::epoch(1)).unwrap();
        assert_eq!(groups, vec![vec![put(1)]]);
        assert_eq!(j.len(), first);
    }

    #[test]
    fn a_whole_record_that_does_not_decode_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut body = 3u64.to_le_bytes().to_vec();
        body.extend_from_slice(&[0xc1, 0xc1, 0xc1]); // never valid MessagePack
        let mut rec = (body.len() as u32 | CHAINED).to_le_bytes().to_vec();
        rec.extend_from_slice(&chained(&NO_LINK, &body));
        rec.extend_from_slice(&body);
        std::fs::write(&p, &rec).unwrap();
        let err = Journal::open(&p, Start::epoch(3)).unwrap_err();
        assert!(
            matches!(err, JournalError::Corrupt { offset: 0, .. }),
            "{err}"
        );
        // Nothing was written over it.
        assert_eq!(std::fs::read(&p).unwrap(), rec);
    }

    #[test]
    fn create_drops_a_left_over_journal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut j = Journal::create(&p, 0).unwrap();
        j.append(&[put(1)]).unwrap();
        drop(j);
        drop(Journal::create(&p, 0).unwrap());
        let (_, groups) = Journal::open(&p, Start::epoch(0)).unwrap();
        assert!(groups.is_empty());
    }

    #[test]
    fn staged_writes_are_one_record_at_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut j = Journal::create(&p, 4).unwrap();
        assert!(!j.flush().unwrap(), "nothing staged");
        j.stage(&[put(1)]).unwrap();
        j.stage(&[put(2), Write::Last(2, 2)]).unwrap();
        j.stage(&[]).unwrap();
        assert!(j.is_empty(), "nothing written before the flush");
        assert!(j.flush().unwrap());
        assert_eq!(j.staged_bytes(), 0);
        // A staged write dropped by a restart is not written.
        j.stage(&[put(3)]).unwrap();
        j.discard_staged();
        assert!(!j.flush().unwrap());
        j.stage(&[put(4)]).unwrap();
        j.flush().unwrap();
        drop(j);
        let (_, groups) = Journal::open(&p, Start::epoch(4)).unwrap();
        assert_eq!(
            groups,
            vec![vec![put(1), put(2), Write::Last(2, 2)], vec![put(4)]]
        );
    }

    /// An earlier version's record: unchained, checksum of the body alone.
    fn plain_record(epoch: u64, writes: &[Write]) -> Vec<u8> {
        let mut body = epoch.to_le_bytes().to_vec();
        body.extend_from_slice(&rmp_serde::to_vec(writes).unwrap());
        let mut rec = (body.len() as u32).to_le_bytes().to_vec();
        rec.extend_from_slice(&checksum(&body));
        rec.extend_from_slice(&body);
        rec
    }

    /// A power loss can leave an unsynced record torn and a later one
    /// whole: the replay stops at the torn one and never skips it to
    /// replay the later one (no hole in the sequence).
    #[test]
    fn a_torn_record_hides_the_whole_ones_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut j = Journal::create(&p, 1).unwrap();
        j.append(&[put(1)]).unwrap();
        let second = j.len();
        j.append(&[put(2)]).unwrap();
        j.append(&[put(3)]).unwrap();
        j.append(&[put(4)]).unwrap();
        drop(j);
        // The second record's page never reached the disk.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0u8; 8], second + 4).unwrap();
        let (_, groups) = Journal::open(&p, Start::epoch(1)).unwrap();
        assert_eq!(groups, vec![vec![put(1)]]);
    }

    /// After a torn record, the next pass appends over it in the same
    /// epoch. Its records end where an old, never acknowledged record of
    /// the earlier pass starts (same sizes): the chain keeps that record
    /// out of every later replay.
    #[test]
    fn an_earlier_pass_is_never_replayed_after_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut j = Journal::create(&p, 1).unwrap();
        j.append(&[put(1)]).unwrap();
        let second = j.len();
        j.append(&[put(2)]).unwrap();
        j.append(&[put(3)]).unwrap();
        drop(j);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0u8; 8], second + 4).unwrap();
        // The second pass: replays 1, then writes another 2 of the same
        // size where the torn one was.
        let (mut j, groups) = Journal::open(&p, Start::epoch(1)).unwrap();
        assert_eq!(groups, vec![vec![put(1)]]);
        let other = Write::Put(2, vec![0xee; 10]);
        j.append(std::slice::from_ref(&other)).unwrap();
        assert_eq!(j.len(), second * 2, "the new record ends where 3 starts");
        let link = j.link();
        let end = j.len();
        drop(j);
        // Replayed from the start, and from a checkpoint at its end (what
        // a clean close records): the old 3 is never read.
        let (_, groups) = Journal::open(&p, Start::epoch(1)).unwrap();
        assert_eq!(groups, vec![vec![put(1)], vec![other]]);
        let start = Start {
            epoch: 1,
            at: end,
            link: Some(link),
        };
        let (_, groups) = Journal::open(&p, start).unwrap();
        assert!(groups.is_empty(), "{groups:?}");
    }

    /// A journal of the earlier, unchained format replays (a store that
    /// recorded no link), and appends chained records after it; an
    /// unchained record after a chained one is an earlier pass's.
    #[test]
    fn an_earlier_format_journal_replays_and_goes_on_chained() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.journal");
        let mut bytes = plain_record(6, &[put(1)]);
        bytes.extend(plain_record(6, &[put(2)]));
        let after_two = bytes.len() as u64;
        bytes.extend(plain_record(6, &[put(3)]));
        std::fs::write(&p, &bytes).unwrap();
        let old = Start {
            epoch: 6,
            at: 0,
            link: None,
        };
        // A store that records a link reads no unchained record.
        let (_, groups) = Journal::open(&p, Start::epoch(6)).unwrap();
        assert!(groups.is_empty());
        let (_, groups) = Journal::open(&p, old).unwrap();
        assert_eq!(groups, vec![vec![put(1)], vec![put(2)], vec![put(3)]]);
        // Torn third record: the new version appends a chained one over it.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0u8; 8], after_two + 4).unwrap();
        let (mut j, groups) = Journal::open(&p, old).unwrap();
        assert_eq!(groups.len(), 2);
        j.append(&[put(9)]).unwrap();
        drop(j);
        let (_, groups) = Journal::open(&p, old).unwrap();
        assert_eq!(groups, vec![vec![put(1)], vec![put(2)], vec![put(9)]]);
        // An unchained record after the chained one is not read.
        let mut bytes = std::fs::read(&p).unwrap();
        let (j, _) = Journal::open(&p, old).unwrap();
        let end = j.len() as usize;
        drop(j);
        let stale = plain_record(6, &[put(10)]);
        bytes[end..end + stale.len()].copy_from_slice(&stale);
        std::fs::write(&p, &bytes).unwrap();
        let (_, groups) = Journal::open(&p, old).unwrap();
        assert_eq!(groups.len(), 3);
    }

    proptest::proptest! {
        /// Whatever bytes the file holds, opening it never panics, and
        /// the groups it returns are a prefix of what was appended.
        #[test]
        fn any_damage_leaves_a_prefix(n in 1usize..12, at in 0usize..2000, byte: u8) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s.journal");
            let mut j = Journal::create(&p, 5).unwrap();
            let appended: Vec<Vec<Write>> = (0..n as u64).map(|s| vec![put(s), Write::Last(s, s)]).collect();
            for g in &appended {
                j.append(g).unwrap();
            }
            drop(j);
            let mut bytes = std::fs::read(&p).unwrap();
            let at = at % bytes.len();
            bytes[at] ^= byte | 1;
            std::fs::write(&p, &bytes).unwrap();
            if let Ok((_, groups)) = Journal::open(&p, Start::epoch(5)) {
                proptest::prop_assert!(groups.len() <= appended.len());
                proptest::prop_assert_eq!(&groups[..], &appended[..groups.len()]);
            }
        }
    }
}
