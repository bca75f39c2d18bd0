//! One stream's index: which messages are stored, under which sequence
//! number, subject, time and size, and every decision that adds or removes
//! one (limits, age, per-message TTL, de-duplication, purge, delete).
//!
//! The payloads live in the caller's store: [`StreamState::append`] says
//! what sequence a message gets and which older messages to delete; the
//! caller writes and deletes accordingly. The messages are held as runs
//! (see the `index` module): consecutive sequences with one subject, size
//! and timestamp take 32 bytes together, so memory is 32 bytes per run
//! (at most one per message; a burst of many messages in a millisecond on
//! one subject is one run).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use macula_pubsub::{Pattern, Topic};
use macula_wire::Millis;

use crate::config::{ConfigError, Discard, StreamConfig, MAX_MSG_ID_LEN};
use crate::index::{Entry, Index, Run, DEAD};

/// The first bytes of a [`StreamState::snapshot`] (its format's version;
/// a snapshot of another version is not read, the store is scanned).
const SNAPSHOT_MAGIC: &[u8] = b"macula-stream-index-3\0";
/// The previous version, still read (a store closed by an earlier
/// release): runs of one size and subject with a timestamp step per
/// further message.
const SNAPSHOT_MAGIC_2: &[u8] = b"macula-stream-index-2\0";

/// A reader over a snapshot that never reads past its end.
struct Snap<'a> {
    buf: &'a [u8],
}

impl<'a> Snap<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    /// A LEB128 varint (at most 10 bytes).
    fn var(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first()?;
            self.buf = rest;
            v |= u64::from(b & 0x7f).checked_shl(7 * i)?;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
}

/// Appends `v` as a LEB128 varint.
#[cfg(test)]
fn put_var(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// What [`StreamState::get`] and the iterators say of a stored message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgMeta<'a> {
    /// Its stream sequence.
    pub seq: u64,
    /// When it was stored (Unix ms; never lower than an earlier message's).
    pub ts: u64,
    /// Its stored size in bytes.
    pub size: u32,
    /// Its subject.
    pub subject: &'a str,
    /// The subject's interned id (stable while any message has it).
    pub subject_id: u32,
}

/// A publish offered to a stream.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    /// The topic it was published on.
    pub subject: &'a Topic,
    /// Bytes it takes stored: subject, payload and headers.
    pub size: u32,
    /// The publisher's message ID, for de-duplication.
    pub msg_id: Option<&'a str>,
    /// Its own time to live.
    pub ttl: Option<Millis>,
}

/// What an accepted publish became.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored under `seq` at `ts`; `removed` are older messages the limits
    /// pushed out (to delete from the store, ascending).
    Stored {
        /// Its stream sequence.
        seq: u64,
        /// Its timestamp (Unix ms).
        ts: u64,
        /// Sequences removed to make room.
        removed: Vec<u64>,
    },
    /// A message with the same ID was stored within the window, as `seq`;
    /// nothing was stored.
    Duplicate {
        /// The sequence of the first one.
        seq: u64,
    },
}

/// Which limit refused a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `max_msgs`.
    Msgs,
    /// `max_bytes`.
    Bytes,
}

/// Why a publish was not stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// None of the stream's subjects matches the topic.
    #[error("the stream does not capture topic {0:?}")]
    NotCaptured(String),
    /// Larger than `max_msg_size`, or than `max_bytes` on its own.
    #[error("message of {size} bytes is over the stream's limit of {max}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The stream is full and discards new messages.
    #[error("stream is full ({0:?} limit) and discards new messages")]
    Full(Limit),
    /// A TTL on a stream that does not allow them, or a TTL of 0.
    #[error("per-message TTL not allowed here")]
    TtlNotAllowed,
    /// A message ID over the length limit.
    #[error("message ID of {0} bytes, at most {MAX_MSG_ID_LEN}")]
    MsgIdTooLong(usize),
}

/// Why messages left the stream, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// Messages stored.
    pub stored: u64,
    /// Publishes dropped as duplicates of a message ID in the window.
    pub duplicates: u64,
    /// Publishes refused (full with discard new, too large, TTL, ID).
    pub refused: u64,
    /// Messages removed to keep `max_msgs` / `max_bytes` (discard old).
    pub removed_limits: u64,
    /// Messages removed for `max_age`.
    pub removed_age: u64,
    /// Messages removed at the end of their own TTL.
    pub removed_ttl: u64,
    /// Messages removed by acknowledgements (interest, work queue) or for
    /// lack of interest.
    pub removed_acked: u64,
    /// Messages removed by purge or delete.
    pub removed_purged: u64,
    /// Message IDs forgotten before the end of their window because
    /// `max_dedup_ids` was reached.
    pub dedup_forgotten_early: u64,
}

/// Which messages a purge removes.
#[derive(Clone, Debug, Default)]
pub struct Purge {
    /// Only messages on topics this pattern matches.
    pub filter: Option<Pattern>,
    /// Only messages with a sequence below this one.
    pub upto: Option<u64>,
    /// Keep this many of the newest (matching) messages.
    pub keep: Option<u64>,
}

/// A message read back from the store at start, to rebuild the index.
#[derive(Clone, Copy, Debug)]
pub struct Restored<'a> {
    /// Its stream sequence (ascending across the restore).
    pub seq: u64,
    /// Its timestamp.
    pub ts: u64,
    /// Its stored size.
    pub size: u32,
    /// Its subject.
    pub subject: &'a str,
    /// Its message ID, if it had one.
    pub msg_id: Option<&'a str>,
    /// When it expires (Unix ms), if it had a TTL.
    pub expires: Option<u64>,
}

/// Interned subjects with the number of stored messages on each.
#[derive(Debug, Default)]
struct Subjects {
    ids: HashMap<Box<str>, u32>,
    names: HashMap<u32, (Box<str>, u64)>,
    next: u32,
    /// Bumped when ids are renumbered (never in practice: after 4 billion
    /// distinct subjects), so holders of ids can drop what they cached.
    generation: u64,
}

impl Subjects {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            if let Some(e) = self.names.get_mut(&id) {
                e.1 += 1;
            }
            return id;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(s.into(), id);
        self.names.insert(id, (s.into(), 1));
        id
    }

    fn release(&mut self, id: u32) {
        if let Some(e) = self.names.get_mut(&id) {
            e.1 -= 1;
            if e.1 == 0 {
                if let Some((name, _)) = self.names.remove(&id) {
                    self.ids.remove(&name);
                }
            }
        }
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(&id).map_or("", |e| &e.0)
    }

    fn needs_renumbering(&self) -> bool {
        self.next >= DEAD - 1
    }
}

/// Message IDs seen within the window.
#[derive(Debug, Default)]
struct Dedup {
    ids: HashMap<Box<str>, (u64, u64)>,
    order: VecDeque<(u64, Box<str>)>,
}

impl Dedup {
    fn prune(&mut self, now: u64, window: Millis) {
        while let Some((ts, _)) = self.order.front() {
            if ts.saturating_add(window.0) > now {
                break;
            }
            if let Some((ts, id)) = self.order.pop_front() {
                if self.ids.get(&id).is_some_and(|e| e.1 == ts) {
                    self.ids.remove(&id);
                }
            }
        }
    }

    fn insert(&mut self, id: &str, seq: u64, ts: u64, max: usize) -> u64 {
        self.ids.insert(id.into(), (seq, ts));
        self.order.push_back((ts, id.into()));
        let mut forgotten = 0;
        while self.ids.len() > max {
            let Some((ts, id)) = self.order.pop_front() else {
                break;
            };
            if self.ids.get(&id).is_some_and(|e| e.1 == ts) {
                self.ids.remove(&id);
                forgotten += 1;
            }
        }
        forgotten
    }
}

/// One stream's index and limits (see the module docs).
#[derive(Debug)]
pub struct StreamState {
    cfg: StreamConfig,
    patterns: Vec<Pattern>,
    index: Index,
    last_seq: u64,
    last_ts: u64,
    msgs: u64,
    bytes: u64,
    subjects: Subjects,
    dedup: Dedup,
    ttl: BTreeSet<(u64, u64)>,
    ttl_of: BTreeMap<u64, u64>,
    counters: StreamCounters,
    visible: Option<u64>,
}

impl StreamState {
    /// An empty stream.
    pub fn new(cfg: StreamConfig) -> Result<Self, ConfigError> {
        let patterns = cfg.validate()?;
        Ok(StreamState {
            cfg,
            patterns,
            index: Index::default(),
            last_seq: 0,
            last_ts: 0,
            msgs: 0,
            bytes: 0,
            subjects: Subjects::default(),
            dedup: Dedup::default(),
            ttl: BTreeSet::new(),
            ttl_of: BTreeMap::new(),
            counters: StreamCounters::default(),
            visible: None,
        })
    }

    /// An empty index to rebuild from the store at start: its last
    /// sequence and last timestamp (kept beside the messages, since every
    /// message may have been removed); then [`StreamState::restore_msg`]
    /// for each stored message, ascending.
    pub fn restore(cfg: StreamConfig, last_seq: u64, last_ts: u64) -> Result<Self, ConfigError> {
        let mut s = StreamState::new(cfg)?;
        s.last_seq = last_seq;
        s.last_ts = last_ts;
        Ok(s)
    }

    /// Puts back one stored message; `now` (Unix ms) decides whether its
    /// message ID is still in the de-duplication window. False (and nothing
    /// changed) when it breaks the order: a sequence not above the last one
    /// restored, above `last_seq`, or a timestamp above `last_ts`.
    pub fn restore_msg(&mut self, now: u64, m: Restored<'_>) -> bool {
        let prev = self.index.last_seq();
        if m.seq <= prev || m.seq > self.last_seq || m.ts > self.last_ts {
            return false;
        }
        let subject = self.subjects.intern(m.subject);
        self.index.push(Entry {
            seq: m.seq,
            ts: m.ts,
            size: m.size,
            subject,
        });
        self.msgs += 1;
        self.bytes += u64::from(m.size);
        if let Some(at) = m.expires {
            self.ttl.insert((at, m.seq));
            self.ttl_of.insert(m.seq, at);
        }
        if let Some(id) = m.msg_id {
            let window = self.cfg.duplicate_window;
            if window > Millis::ZERO && m.ts.saturating_add(window.0) > now {
                let forgotten = self.dedup.insert(id, m.seq, m.ts, self.cfg.max_dedup_ids);
                self.counters.dedup_forgotten_early += forgotten;
            }
        }
        true
    }

    /// The whole index as bytes, to store at a clean shutdown so the next
    /// start reads one value instead of every message's head (see
    /// [`StreamState::from_snapshot`]): the subjects, the runs as they are
    /// held (32 bytes each: a burst of messages on one subject in one
    /// millisecond is one), the TTLs and the message IDs in the window.
    pub fn snapshot(&self) -> Vec<u8> {
        self.snapshot_with(|out, index| {
            // The live runs: (first sequence, length, size, subject,
            // timestamp).
            for r in index.runs() {
                out.extend_from_slice(&r.seq.to_le_bytes());
                out.extend_from_slice(&u64::from(r.len).to_le_bytes());
                out.extend_from_slice(&r.size.to_le_bytes());
                out.extend_from_slice(&r.subject.to_le_bytes());
                out.extend_from_slice(&r.ts.to_le_bytes());
            }
        })
    }

    /// A snapshot in the previous format (version 2), as an earlier
    /// release wrote it: runs of one size and subject whose timestamps do
    /// not go back, with each further timestamp's step as a varint.
    #[cfg(test)]
    fn snapshot_v2(&self) -> Vec<u8> {
        let mut out = self.snapshot_with(|out, index| {
            let mut live = index.iter_from(0).peekable();
            let mut steps = Vec::new();
            while let Some(first) = live.next() {
                let mut last = first;
                steps.clear();
                while let Some(e) = live.next_if(|e| {
                    e.seq == last.seq + 1
                        && e.size == first.size
                        && e.subject == first.subject
                        && e.ts >= last.ts
                }) {
                    put_var(&mut steps, e.ts - last.ts);
                    last = e;
                }
                out.extend_from_slice(&first.seq.to_le_bytes());
                out.extend_from_slice(&(last.seq - first.seq + 1).to_le_bytes());
                out.extend_from_slice(&first.size.to_le_bytes());
                out.extend_from_slice(&first.subject.to_le_bytes());
                out.extend_from_slice(&first.ts.to_le_bytes());
                out.extend_from_slice(&steps);
            }
        });
        out[..SNAPSHOT_MAGIC_2.len()].copy_from_slice(SNAPSHOT_MAGIC_2);
        out
    }

    /// A snapshot with the runs written by `runs`.
    fn snapshot_with(&self, runs: impl FnOnce(&mut Vec<u8>, &Index)) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.index.len() * 32);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        out.extend_from_slice(&self.last_ts.to_le_bytes());
        let subjects: Vec<(&u32, &(Box<str>, u64))> = self.subjects.names.iter().collect();
        out.extend_from_slice(&(subjects.len() as u64).to_le_bytes());
        for (id, (name, _)) in subjects {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&self.msgs.to_le_bytes());
        runs(&mut out, &self.index);
        out.extend_from_slice(&(self.ttl_of.len() as u64).to_le_bytes());
        for (seq, at) in &self.ttl_of {
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&at.to_le_bytes());
        }
        let ids: Vec<&(u64, Box<str>)> = self
            .dedup
            .order
            .iter()
            .filter(|(ts, id)| self.dedup.ids.get(id).is_some_and(|e| e.1 == *ts))
            .collect();
        out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        for (ts, id) in ids {
            let seq = self.dedup.ids.get(id).map_or(0, |e| e.0);
            out.extend_from_slice(&ts.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&(id.len() as u64).to_le_bytes());
            out.extend_from_slice(id.as_bytes());
        }
        out
    }

    /// The index [`StreamState::snapshot`] wrote (or an earlier release's,
    /// version 2), checked throughout (ascending sequences and timestamps,
    /// known subjects, nothing past the last sequence); `None` when it is
    /// not a valid snapshot (rebuild from the messages instead). A version
    /// 3 snapshot loads in time proportional to its runs, not its
    /// messages.
    pub fn from_snapshot(cfg: StreamConfig, bytes: &[u8]) -> Result<Option<Self>, ConfigError> {
        let mut s = StreamState::new(cfg)?;
        Ok(s.load_snapshot(bytes).map(|()| s))
    }

    fn load_snapshot(&mut self, bytes: &[u8]) -> Option<()> {
        let mut r = Snap { buf: bytes };
        let v2 = match r.take(SNAPSHOT_MAGIC.len())? {
            m if m == SNAPSHOT_MAGIC => false,
            m if m == SNAPSHOT_MAGIC_2 => true,
            _ => return None,
        };
        self.last_seq = r.u64()?;
        self.last_ts = r.u64()?;
        let n = r.u64()?;
        let mut names: HashMap<u32, Box<str>> = HashMap::new();
        let mut max_id = 0u32;
        for _ in 0..n {
            let id = r.u32()?;
            let len = usize::try_from(r.u64()?).ok()?;
            let name = std::str::from_utf8(r.take(len)?).ok()?;
            if id == DEAD || names.insert(id, name.into()).is_some() {
                return None;
            }
            max_id = max_id.max(id);
        }
        for (id, name) in &names {
            self.subjects.ids.insert(name.clone(), *id);
            self.subjects.names.insert(*id, (name.clone(), 0));
        }
        let n = r.u64()?;
        let mut prev = 0u64;
        let mut prev_ts = 0u64;
        let mut read = 0u64;
        if !v2 {
            // A run takes 32 bytes.
            self.index
                .reserve(usize::try_from(n).unwrap_or(0).min(r.buf.len() / 32));
        }
        while read < n {
            let (seq, len, size, subject, mut ts) =
                (r.u64()?, r.u64()?, r.u32()?, r.u32()?, r.u64()?);
            if seq <= prev
                || len == 0
                || len > n - read
                || seq.checked_add(len - 1)? > self.last_seq
                || ts > self.last_ts
                || ts < prev_ts
            {
                return None;
            }
            self.subjects.names.get_mut(&subject)?.1 += len;
            if v2 {
                for i in 0..len {
                    if i > 0 {
                        ts = ts.checked_add(r.var()?)?;
                        if ts > self.last_ts {
                            return None;
                        }
                    }
                    self.index.push(Entry {
                        seq: seq + i,
                        ts,
                        size,
                        subject,
                    });
                }
            } else {
                // Longer than a run holds: in pieces.
                let mut at = 0u64;
                while at < len {
                    let piece = (len - at).min(u64::from(u32::MAX));
                    self.index.push_run(Run {
                        seq: seq + at,
                        ts,
                        len: u32::try_from(piece).ok()?,
                        size,
                        subject,
                    });
                    at += piece;
                }
            }
            prev = seq + len - 1;
            prev_ts = ts;
            read += len;
            self.msgs += len;
            self.bytes += u64::from(size).saturating_mul(len);
        }
        // A subject no message has is not kept.
        let unused: Vec<u32> = self
            .subjects
            .names
            .iter()
            .filter(|(_, (_, count))| *count == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in unused {
            if let Some((name, _)) = self.subjects.names.remove(&id) {
                self.subjects.ids.remove(&name);
            }
        }
        self.subjects.next = max_id.checked_add(1)?;
        let n = r.u64()?;
        for _ in 0..n {
            let (seq, at) = (r.u64()?, r.u64()?);
            self.index.get(seq)?;
            self.ttl.insert((at, seq));
            self.ttl_of.insert(seq, at);
        }
        let n = r.u64()?;
        for _ in 0..n {
            let (ts, seq) = (r.u64()?, r.u64()?);
            let len = usize::try_from(r.u64()?).ok()?;
            let id = std::str::from_utf8(r.take(len)?).ok()?;
            self.dedup.ids.insert(id.into(), (seq, ts));
            self.dedup.order.push_back((ts, id.into()));
        }
        r.buf.is_empty().then_some(())
    }

    /// Its configuration.
    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// Replaces the configuration (checked with [`StreamConfig::check_edit`])
    /// and applies the new limits at once: returns what they removed.
    pub fn edit(&mut self, cfg: StreamConfig) -> Result<Vec<u64>, ConfigError> {
        self.cfg.check_edit(&cfg)?;
        self.patterns = cfg.validate()?;
        self.cfg = cfg;
        let mut removed = Vec::new();
        self.enforce_limits(&mut removed);
        Ok(removed)
    }

    /// Whether this stream captures `topic`.
    pub fn captures(&self, topic: &Topic) -> bool {
        self.patterns.iter().any(|p| p.matches(topic))
    }

    /// The parsed subject patterns.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Stores a publish at wall-clock time `now` (Unix ms), or says why not.
    pub fn append(&mut self, now: u64, m: Incoming<'_>) -> Result<Appended, AppendError> {
        match self.try_append(now, m) {
            Err(e) => {
                self.counters.refused += 1;
                Err(e)
            }
            ok => ok,
        }
    }

    fn try_append(&mut self, now: u64, m: Incoming<'_>) -> Result<Appended, AppendError> {
        if !self.captures(m.subject) {
            return Err(AppendError::NotCaptured(m.subject.as_str().to_string()));
        }
        if m.size > self.cfg.max_msg_size {
            return Err(AppendError::TooLarge {
                size: m.size.into(),
                max: self.cfg.max_msg_size.into(),
            });
        }
        if let Some(max) = self.cfg.max_bytes {
            if u64::from(m.size) > max {
                return Err(AppendError::TooLarge {
                    size: m.size.into(),
                    max,
                });
            }
        }
        if let Some(ttl) = m.ttl {
            if !self.cfg.allow_msg_ttl || ttl == Millis::ZERO {
                return Err(AppendError::TtlNotAllowed);
            }
        }
        if let Some(id) = m.msg_id {
            if id.len() > MAX_MSG_ID_LEN {
                return Err(AppendError::MsgIdTooLong(id.len()));
            }
        }
        let ts = now.max(self.last_ts);
        let window = self.cfg.duplicate_window;
        if window > Millis::ZERO {
            self.dedup.prune(ts, window);
            if let Some(&(seq, _)) = m.msg_id.and_then(|id| self.dedup.ids.get(id)) {
                self.counters.duplicates += 1;
                return Ok(Appended::Duplicate { seq });
            }
        }
        if self.cfg.discard == Discard::New {
            if self.cfg.max_msgs.is_some_and(|max| self.msgs >= max) {
                return Err(AppendError::Full(Limit::Msgs));
            }
            if self
                .cfg
                .max_bytes
                .is_some_and(|max| self.bytes + u64::from(m.size) > max)
            {
                return Err(AppendError::Full(Limit::Bytes));
            }
        }
        if self.subjects.needs_renumbering() {
            self.renumber_subjects();
        }
        self.last_seq += 1;
        self.last_ts = ts;
        let seq = self.last_seq;
        let subject = self.subjects.intern(m.subject.as_str());
        self.index.push(Entry {
            seq,
            ts,
            size: m.size,
            subject,
        });
        self.msgs += 1;
        self.bytes += u64::from(m.size);
        self.counters.stored += 1;
        if let Some(ttl) = m.ttl {
            let at = ts.saturating_add(ttl.0);
            self.ttl.insert((at, seq));
            self.ttl_of.insert(seq, at);
        }
        if let (Some(id), true) = (m.msg_id, window > Millis::ZERO) {
            self.counters.dedup_forgotten_early +=
                self.dedup.insert(id, seq, ts, self.cfg.max_dedup_ids);
        }
        let mut removed = Vec::new();
        self.enforce_limits(&mut removed);
        Ok(Appended::Stored { seq, ts, removed })
    }

    fn enforce_limits(&mut self, removed: &mut Vec<u64>) {
        let over = |s: &Self| {
            s.cfg.max_msgs.is_some_and(|m| s.msgs > m)
                || s.cfg.max_bytes.is_some_and(|m| s.bytes > m)
        };
        while over(self) {
            let Some(seq) = self.first_live() else { break };
            if self.remove(seq) {
                self.counters.removed_limits += 1;
                removed.push(seq);
            }
        }
    }

    /// Removes what is due at wall-clock time `now` (Unix ms): messages
    /// older than `max_age` and messages past their own TTL. Returns their
    /// sequences, ascending.
    pub fn expire(&mut self, now: u64) -> Vec<u64> {
        let mut removed = Vec::new();
        if let Some(age) = self.cfg.max_age {
            while let Some(e) = self.index.first() {
                if e.ts.saturating_add(age.0) > now {
                    break;
                }
                if self.remove(e.seq) {
                    self.counters.removed_age += 1;
                    removed.push(e.seq);
                }
            }
        }
        while let Some(&(at, seq)) = self.ttl.first() {
            if at > now {
                break;
            }
            if self.remove(seq) {
                self.counters.removed_ttl += 1;
                removed.push(seq);
            }
        }
        removed.sort_unstable();
        removed
    }

    /// When [`StreamState::expire`] next has something to do (Unix ms).
    pub fn next_expiry(&self) -> Option<u64> {
        let age = self
            .cfg
            .max_age
            .and_then(|a| self.index.first().map(|e| e.ts.saturating_add(a.0)));
        let ttl = self.ttl.first().map(|&(at, _)| at);
        match (age, ttl) {
            (Some(a), Some(t)) => Some(a.min(t)),
            (a, t) => a.or(t),
        }
    }

    /// Removes the messages `p` names; returns them, ascending.
    pub fn purge(&mut self, p: &Purge) -> Vec<u64> {
        let matching: Vec<u64> = self
            .iter_from(0)
            .filter(|m| {
                p.filter
                    .as_ref()
                    .is_none_or(|f| Topic::new(m.subject).is_ok_and(|t| f.matches(&t)))
            })
            .map(|m| m.seq)
            .collect();
        let keep_from = match p.keep {
            Some(k) => matching
                .len()
                .saturating_sub(usize::try_from(k).unwrap_or(usize::MAX)),
            None => matching.len(),
        };
        let doomed: Vec<u64> = matching[..keep_from]
            .iter()
            .copied()
            .filter(|&s| p.upto.is_none_or(|u| s < u))
            .collect();
        for &seq in &doomed {
            if self.remove(seq) {
                self.counters.removed_purged += 1;
            }
        }
        doomed
    }

    /// Removes one message; false when it is not stored.
    pub fn delete(&mut self, seq: u64) -> bool {
        let removed = self.remove(seq);
        if removed {
            self.counters.removed_purged += 1;
        }
        removed
    }

    /// Removes one message because it was acknowledged (interest, work
    /// queue) or nobody is interested; false when it is not stored.
    pub fn remove_acked(&mut self, seq: u64) -> bool {
        let removed = self.remove(seq);
        if removed {
            self.counters.removed_acked += 1;
        }
        removed
    }

    fn remove(&mut self, seq: u64) -> bool {
        let Some(e) = self.index.remove(seq) else {
            return false;
        };
        self.msgs -= 1;
        self.bytes -= u64::from(e.size);
        self.subjects.release(e.subject);
        if let Some(at) = self.ttl_of.remove(&seq) {
            self.ttl.remove(&(at, seq));
        }
        true
    }

    fn renumber_subjects(&mut self) {
        let mut fresh = Subjects {
            generation: self.subjects.generation + 1,
            ..Subjects::default()
        };
        let mut map = HashMap::new();
        for r in self.index.runs_mut() {
            let id = *map.entry(r.subject).or_insert_with(|| {
                let name = self.subjects.name(r.subject);
                let id = fresh.next;
                fresh.next += 1;
                fresh.ids.insert(name.into(), id);
                fresh.names.insert(id, (name.into(), 0));
                id
            });
            if let Some(n) = fresh.names.get_mut(&id) {
                n.1 += u64::from(r.len);
            }
            r.subject = id;
        }
        self.subjects = fresh;
    }

    /// Changes whenever subject ids were renumbered (see
    /// [`MsgMeta::subject_id`]); holders of ids drop what they cached.
    pub fn subjects_generation(&self) -> u64 {
        self.subjects.generation
    }

    fn first_live(&self) -> Option<u64> {
        self.index.first().map(|e| e.seq)
    }

    fn meta(&self, e: Entry) -> MsgMeta<'_> {
        MsgMeta {
            seq: e.seq,
            ts: e.ts,
            size: e.size,
            subject: self.subjects.name(e.subject),
            subject_id: e.subject,
        }
    }

    /// A stored message's index entry.
    pub fn get(&self, seq: u64) -> Option<MsgMeta<'_>> {
        self.index.get(seq).map(|e| self.meta(e))
    }

    /// Stored messages with a sequence of at least `seq`, ascending.
    pub fn iter_from(&self, seq: u64) -> impl DoubleEndedIterator<Item = MsgMeta<'_>> + '_ {
        self.index.iter_from(seq).map(|e| self.meta(e))
    }

    /// The first stored message at or after `seq` that consumers may see
    /// (see [`StreamState::set_visible_upto`]).
    pub fn next_from(&self, seq: u64) -> Option<MsgMeta<'_>> {
        self.iter_from(seq)
            .next()
            .filter(|m| self.visible.is_none_or(|v| m.seq <= v))
    }

    /// Consumers see messages up to `seq` only (`None`: all): the caller
    /// stores a message after the index took it, and raises this once the
    /// store has it (durable on its disk, or committed by its replicas), so
    /// no consumer is handed a message that a crash could still lose.
    pub fn set_visible_upto(&mut self, seq: Option<u64>) {
        self.visible = seq;
    }

    /// The bound [`StreamState::set_visible_upto`] set (`None`: all).
    pub fn visible_bound(&self) -> Option<u64> {
        self.visible
    }

    /// The last sequence consumers may see.
    pub fn visible_upto(&self) -> u64 {
        self.visible.map_or(self.last_seq, |v| v.min(self.last_seq))
    }

    /// The sequence of the first message stored at or after `t` (Unix
    /// ms), or `last_seq + 1` when none is.
    pub fn seq_at_time(&self, t: u64) -> u64 {
        self.index.seq_at_time(t).unwrap_or(self.last_seq + 1)
    }

    /// The first stored sequence (`last_seq + 1` when empty).
    pub fn first_seq(&self) -> u64 {
        self.first_live().unwrap_or(self.last_seq + 1)
    }

    /// The last sequence ever assigned (0 before the first message).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The last timestamp assigned.
    pub fn last_ts(&self) -> u64 {
        self.last_ts
    }

    /// Messages stored.
    pub fn msgs(&self) -> u64 {
        self.msgs
    }

    /// Bytes stored.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Distinct subjects stored.
    pub fn subjects(&self) -> usize {
        self.subjects.names.len()
    }

    /// Message IDs remembered for de-duplication.
    pub fn dedup_ids(&self) -> usize {
        self.dedup.ids.len()
    }

    /// Messages with a TTL of their own.
    pub fn msgs_with_ttl(&self) -> usize {
        self.ttl_of.len()
    }

    /// When a stored message with a TTL of its own expires (Unix ms).
    pub fn expires(&self, seq: u64) -> Option<u64> {
        self.ttl_of.get(&seq).copied()
    }

    /// What the stream counted.
    pub fn counters(&self) -> StreamCounters {
        self.counters
    }

    /// Runs the index holds, removed ones included (see the module docs:
    /// consecutive messages of one subject, size and timestamp are one).
    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    /// Bytes the index's runs take (32 per run held).
    pub fn index_bytes(&self) -> usize {
        self.index.mem_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Discard;
    use crate::index::COMPACT_AFTER;
    use proptest::prelude::*;

    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    fn put(s: &mut StreamState, now: u64, subject: &str, size: u32) -> Appended {
        let t = topic(subject);
        s.append(
            now,
            Incoming {
                subject: &t,
                size,
                msg_id: None,
                ttl: None,
            },
        )
        .unwrap()
    }

    fn seq(a: &Appended) -> u64 {
        match a {
            Appended::Stored { seq, .. } | Appended::Duplicate { seq } => *seq,
        }
    }

    fn stream(f: impl FnOnce(&mut StreamConfig)) -> StreamState {
        let mut c = StreamConfig::new("s", &["a.**"]);
        f(&mut c);
        StreamState::new(c).unwrap()
    }

    #[test]
    fn sequences_and_timestamps_grow() {
        let mut s = stream(|_| {});
        assert_eq!(s.first_seq(), 1);
        assert_eq!(seq(&put(&mut s, 100, "a.x", 10)), 1);
        // A clock that steps back does not lower timestamps.
        let a = put(&mut s, 50, "a.y", 10);
        assert_eq!(
            a,
            Appended::Stored {
                seq: 2,
                ts: 100,
                removed: vec![]
            }
        );
        assert_eq!((s.msgs(), s.bytes(), s.subjects()), (2, 20, 2));
        assert_eq!(s.get(2).unwrap().subject, "a.y");
        assert_eq!(s.last_ts(), 100);
    }

    #[test]
    fn refuses_what_it_does_not_capture_or_cannot_hold() {
        let mut s = stream(|c| {
            c.max_msg_size = 100;
            c.allow_msg_ttl = false;
        });
        let b = topic("b.x");
        let a = topic("a.x");
        let m = |subject, size, msg_id, ttl| Incoming {
            subject,
            size,
            msg_id,
            ttl,
        };
        assert!(matches!(
            s.append(1, m(&b, 1, None, None)),
            Err(AppendError::NotCaptured(_))
        ));
        assert_eq!(
            s.append(1, m(&a, 101, None, None)),
            Err(AppendError::TooLarge {
                size: 101,
                max: 100
            })
        );
        assert_eq!(
            s.append(1, m(&a, 1, None, Some(Millis(5)))),
            Err(AppendError::TtlNotAllowed)
        );
        let long = "x".repeat(257);
        assert_eq!(
            s.append(1, m(&a, 1, Some(&long), None)),
            Err(AppendError::MsgIdTooLong(257))
        );
        assert_eq!(s.counters().refused, 4);
        assert_eq!(s.msgs(), 0);
        assert_eq!(s.last_seq(), 0);
    }

    #[test]
    fn discard_old_removes_the_oldest() {
        let mut s = stream(|c| c.max_msgs = Some(3));
        for i in 1..=3 {
            put(&mut s, i, "a.x", 1);
        }
        assert_eq!(
            put(&mut s, 4, "a.x", 1),
            Appended::Stored {
                seq: 4,
                ts: 4,
                removed: vec![1]
            }
        );
        assert_eq!(s.first_seq(), 2);
        let mut s = stream(|c| c.max_bytes = Some(100));
        put(&mut s, 1, "a.x", 40);
        put(&mut s, 2, "a.x", 40);
        let a = put(&mut s, 3, "a.x", 90);
        assert_eq!(
            a,
            Appended::Stored {
                seq: 3,
                ts: 3,
                removed: vec![1, 2]
            }
        );
        assert_eq!(s.bytes(), 90);
        assert_eq!(s.counters().removed_limits, 2);
        // One message larger than the whole stream is refused, not stored
        // after emptying the stream.
        let t = topic("a.x");
        let big = Incoming {
            subject: &t,
            size: 101,
            msg_id: None,
            ttl: None,
        };
        assert!(matches!(
            s.append(4, big),
            Err(AppendError::TooLarge { .. })
        ));
        assert_eq!(s.msgs(), 1);
    }

    #[test]
    fn discard_new_refuses_when_full() {
        let mut s = stream(|c| {
            c.max_msgs = Some(2);
            c.discard = Discard::New;
        });
        put(&mut s, 1, "a.x", 1);
        put(&mut s, 1, "a.x", 1);
        let t = topic("a.x");
        let m = Incoming {
            subject: &t,
            size: 1,
            msg_id: None,
            ttl: None,
        };
        assert_eq!(s.append(1, m), Err(AppendError::Full(Limit::Msgs)));
        let mut s = stream(|c| {
            c.max_bytes = Some(10);
            c.discard = Discard::New;
        });
        put(&mut s, 1, "a.x", 6);
        let m = Incoming { size: 5, ..m };
        assert_eq!(s.append(1, m), Err(AppendError::Full(Limit::Bytes)));
        assert_eq!(s.last_seq(), 1);
    }

    #[test]
    fn duplicates_within_the_window_are_dropped() {
        let mut s = stream(|c| c.duplicate_window = Millis(1000));
        let t = topic("a.x");
        let m = |id| Incoming {
            subject: &t,
            size: 1,
            msg_id: Some(id),
            ttl: None,
        };
        assert_eq!(seq(&s.append(0, m("k1")).unwrap()), 1);
        assert_eq!(s.append(999, m("k1")), Ok(Appended::Duplicate { seq: 1 }));
        assert_eq!(seq(&s.append(999, m("k2")).unwrap()), 2);
        // After the window the ID is new again.
        assert_eq!(seq(&s.append(1000, m("k1")).unwrap()), 3);
        assert_eq!(s.counters().duplicates, 1);
        assert_eq!(s.dedup_ids(), 2);
    }

    #[test]
    fn dedup_memory_is_bounded() {
        let mut s = stream(|c| c.max_dedup_ids = 3);
        let t = topic("a.x");
        for i in 0..5 {
            let id = format!("id{i}");
            let m = Incoming {
                subject: &t,
                size: 1,
                msg_id: Some(&id),
                ttl: None,
            };
            s.append(0, m).unwrap();
        }
        assert_eq!(s.dedup_ids(), 3);
        assert_eq!(s.counters().dedup_forgotten_early, 2);
        // The newest are remembered.
        let m = Incoming {
            subject: &t,
            size: 1,
            msg_id: Some("id4"),
            ttl: None,
        };
        assert_eq!(s.append(0, m), Ok(Appended::Duplicate { seq: 5 }));
    }

    #[test]
    fn age_and_ttl_expire() {
        let mut s = stream(|c| c.max_age = Some(Millis(100)));
        put(&mut s, 0, "a.x", 1);
        put(&mut s, 50, "a.x", 1);
        let t = topic("a.y");
        s.append(
            60,
            Incoming {
                subject: &t,
                size: 1,
                msg_id: None,
                ttl: Some(Millis(10)),
            },
        )
        .unwrap();
        assert_eq!(s.next_expiry(), Some(70));
        assert_eq!(s.expire(69), Vec::<u64>::new());
        assert_eq!(s.expire(70), vec![3]);
        assert_eq!(s.next_expiry(), Some(100));
        assert_eq!(s.expire(100), vec![1]);
        assert_eq!(s.expire(1000), vec![2]);
        assert_eq!(s.next_expiry(), None);
        let c = s.counters();
        assert_eq!((c.removed_age, c.removed_ttl), (2, 1));
        assert_eq!(s.first_seq(), 4);
        assert_eq!(s.msgs(), 0);
    }

    #[test]
    fn removing_a_message_with_a_ttl_forgets_its_timer() {
        let mut s = stream(|_| {});
        let t = topic("a.y");
        s.append(
            0,
            Incoming {
                subject: &t,
                size: 1,
                msg_id: None,
                ttl: Some(Millis(10)),
            },
        )
        .unwrap();
        assert!(s.delete(1));
        assert!(!s.delete(1));
        assert_eq!(s.next_expiry(), None);
        assert_eq!(s.msgs_with_ttl(), 0);
    }

    #[test]
    fn purge_by_filter_upto_and_keep() {
        let mut s = stream(|_| {});
        for (i, subj) in ["a.x", "a.y", "a.x", "a.y", "a.x"].iter().enumerate() {
            put(&mut s, i as u64, subj, 1);
        }
        let x = Pattern::new("a.x").unwrap();
        assert_eq!(
            s.purge(&Purge {
                filter: Some(x.clone()),
                keep: Some(1),
                upto: None
            }),
            vec![1, 3]
        );
        assert_eq!(
            s.purge(&Purge {
                upto: Some(4),
                ..Default::default()
            }),
            vec![2]
        );
        assert_eq!(s.purge(&Purge::default()), vec![4, 5]);
        assert_eq!((s.msgs(), s.first_seq(), s.last_seq()), (0, 6, 5));
        assert_eq!(seq(&put(&mut s, 9, "a.z", 1)), 6);
    }

    #[test]
    fn time_index_finds_the_first_message_at_or_after() {
        let mut s = stream(|_| {});
        for ts in [10, 20, 20, 30] {
            put(&mut s, ts, "a.x", 1);
        }
        assert_eq!(s.seq_at_time(0), 1);
        assert_eq!(s.seq_at_time(20), 2);
        assert_eq!(s.seq_at_time(21), 4);
        assert_eq!(s.seq_at_time(31), 5);
        s.delete(2);
        assert_eq!(s.seq_at_time(20), 3);
    }

    #[test]
    fn restore_rebuilds_the_index_and_the_dedup_window() {
        let mut c = StreamConfig::new("s", &["a.**"]);
        c.duplicate_window = Millis(100);
        let msgs = [
            Restored {
                seq: 3,
                ts: 10,
                size: 5,
                subject: "a.x",
                msg_id: Some("old"),
                expires: None,
            },
            Restored {
                seq: 7,
                ts: 950,
                size: 6,
                subject: "a.y",
                msg_id: Some("new"),
                expires: Some(2000),
            },
            // Out of order: skipped.
            Restored {
                seq: 5,
                ts: 20,
                size: 1,
                subject: "a.z",
                msg_id: None,
                expires: None,
            },
        ];
        let mut s = StreamState::restore(c, 9, 950).unwrap();
        let restored: Vec<bool> = msgs.into_iter().map(|m| s.restore_msg(1000, m)).collect();
        assert_eq!(restored, [true, true, false]);
        assert_eq!(
            (s.first_seq(), s.last_seq(), s.msgs(), s.bytes()),
            (3, 9, 2, 11)
        );
        assert_eq!(s.next_expiry(), Some(2000));
        let t = topic("a.x");
        let m = |id| Incoming {
            subject: &t,
            size: 1,
            msg_id: Some(id),
            ttl: None,
        };
        assert_eq!(s.append(1000, m("new")), Ok(Appended::Duplicate { seq: 7 }));
        assert_eq!(seq(&s.append(1000, m("old")).unwrap()), 10);
    }

    #[test]
    fn consumers_see_only_what_is_visible() {
        let mut s = stream(|_| {});
        put(&mut s, 0, "a.x", 1);
        put(&mut s, 0, "a.x", 1);
        s.set_visible_upto(Some(1));
        assert_eq!(s.next_from(1).map(|m| m.seq), Some(1));
        assert_eq!(s.next_from(2), None);
        assert_eq!(s.visible_upto(), 1);
        s.set_visible_upto(Some(2));
        assert_eq!(s.next_from(2).map(|m| m.seq), Some(2));
        s.set_visible_upto(None);
        assert_eq!(s.visible_upto(), 2);
    }

    #[test]
    fn a_snapshot_restores_the_same_index() {
        let mut s = stream(|c| c.duplicate_window = Millis(1000));
        let t = topic("a.x");
        for i in 0..10u64 {
            let id = format!("id{i}");
            s.append(
                i * 10,
                Incoming {
                    subject: &t,
                    size: 5,
                    msg_id: Some(&id),
                    ttl: (i % 3 == 0).then_some(Millis(500)),
                },
            )
            .unwrap();
        }
        put(&mut s, 100, "a.y", 7);
        s.delete(4);
        let snap = s.snapshot();
        let mut r = StreamState::from_snapshot(s.config().clone(), &snap)
            .unwrap()
            .expect("valid snapshot");
        let view = |s: &StreamState| {
            s.iter_from(0)
                .map(|m| (m.seq, m.ts, m.size, m.subject.to_string(), s.expires(m.seq)))
                .collect::<Vec<_>>()
        };
        assert_eq!(view(&r), view(&s));
        assert_eq!(
            (
                r.msgs(),
                r.bytes(),
                r.last_seq(),
                r.last_ts(),
                r.subjects(),
                r.dedup_ids()
            ),
            (
                s.msgs(),
                s.bytes(),
                s.last_seq(),
                s.last_ts(),
                s.subjects(),
                s.dedup_ids()
            )
        );
        assert_eq!(r.next_expiry(), s.next_expiry());
        // Both go on the same way.
        let dup = Incoming {
            subject: &t,
            size: 5,
            msg_id: Some("id9"),
            ttl: None,
        };
        assert_eq!(r.append(150, dup), s.append(150, dup));
        assert_eq!(put(&mut r, 160, "a.z", 1), put(&mut s, 160, "a.z", 1));
        // Anything else is not a snapshot.
        for bad in [
            &snap[..snap.len() - 1],
            &snap[1..],
            b"",
            &[snap.clone(), vec![0]].concat()[..],
        ] {
            assert!(StreamState::from_snapshot(s.config().clone(), bad)
                .unwrap()
                .is_none());
        }
    }

    #[test]
    fn a_burst_is_held_and_snapshotted_as_a_few_runs() {
        let mut s = stream(|_| {});
        for i in 0..100_000u64 {
            // 1,000 a millisecond; runs broken by a subject, a size and a
            // deleted message.
            let subject = if i == 50_000 { "a.y" } else { "a.x" };
            let size = if i == 70_000 { 9 } else { 5 };
            put(&mut s, i / 1000, subject, size);
        }
        s.delete(80_000);
        // 100 milliseconds, plus one run each for the subject and the size
        // (each the first message of its millisecond); the deleted message
        // ended its run.
        assert_eq!(s.index_len(), 102);
        assert!(s.index_bytes() < 8 * 1024, "{} bytes", s.index_bytes());
        let snap = s.snapshot();
        assert!(snap.len() < 4_000, "{} bytes", snap.len());
        let r = StreamState::from_snapshot(s.config().clone(), &snap)
            .unwrap()
            .expect("valid snapshot");
        assert_eq!(r.index_len(), 102);
        let view = |s: &StreamState| {
            s.iter_from(0)
                .map(|m| (m.seq, m.ts, m.size, m.subject.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(view(&r), view(&s));
        assert_eq!(
            (r.msgs(), r.bytes(), r.subjects()),
            (s.msgs(), s.bytes(), s.subjects())
        );
        // An earlier release's snapshot (version 2) gives the same runs.
        let old = s.snapshot_v2();
        assert!(old.starts_with(SNAPSHOT_MAGIC_2));
        let r = StreamState::from_snapshot(s.config().clone(), &old)
            .unwrap()
            .expect("valid version 2 snapshot");
        assert_eq!(r.index_len(), 102);
        assert_eq!(view(&r), view(&s));
    }

    #[test]
    fn a_snapshot_with_timestamps_going_back_is_not_read() {
        let mut s = stream(|_| {});
        put(&mut s, 10, "a.x", 5);
        put(&mut s, 20, "a.y", 5);
        let mut snap = s.snapshot();
        // The second run's timestamp is the last 8 bytes before the TTL and
        // ID counts (16 bytes).
        let at = snap.len() - 16 - 8;
        snap[at..at + 8].copy_from_slice(&5u64.to_le_bytes());
        assert!(StreamState::from_snapshot(s.config().clone(), &snap)
            .unwrap()
            .is_none());
    }

    proptest! {
        #[test]
        fn snapshot_decoding_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = SNAPSHOT_MAGIC.to_vec();
            bytes.extend_from_slice(&b);
            let _ = StreamState::from_snapshot(StreamConfig::new("s", &["a.**"]), &bytes);
            let mut bytes = SNAPSHOT_MAGIC_2.to_vec();
            bytes.extend_from_slice(&b);
            let _ = StreamState::from_snapshot(StreamConfig::new("s", &["a.**"]), &bytes);
        }
    }

    #[test]
    fn edit_applies_new_limits() {
        let mut s = stream(|_| {});
        for i in 0..5 {
            put(&mut s, i, "a.x", 1);
        }
        let mut c = s.config().clone();
        c.max_msgs = Some(2);
        assert_eq!(s.edit(c).unwrap(), vec![1, 2, 3]);
        let mut bad = s.config().clone();
        bad.replicas = 3;
        assert!(s.edit(bad).is_err());
    }

    #[test]
    fn the_index_compacts_removed_entries() {
        let mut s = stream(|_| {});
        for i in 0..5000 {
            put(&mut s, i, "a.x", 1);
        }
        // Remove all but the first and the last: the middle compacts.
        for seq in 2..5000 {
            s.remove_acked(seq);
        }
        assert!(s.index_len() < 2 * COMPACT_AFTER, "{}", s.index_len());
        assert_eq!(
            s.iter_from(0).map(|m| m.seq).collect::<Vec<_>>(),
            vec![1, 5000]
        );
        assert_eq!(s.next_from(2).unwrap().seq, 5000);
        assert_eq!(s.get(4999), None);
    }

    #[test]
    fn subjects_are_forgotten_with_their_last_message() {
        let mut s = stream(|_| {});
        put(&mut s, 0, "a.x", 1);
        put(&mut s, 0, "a.y", 1);
        put(&mut s, 0, "a.x", 1);
        s.delete(1);
        assert_eq!(s.subjects(), 2);
        s.delete(3);
        assert_eq!(s.subjects(), 1);
        assert_eq!(s.get(2).unwrap().subject, "a.y");
    }

    #[test]
    fn renumbering_keeps_every_subject() {
        let mut s = stream(|_| {});
        put(&mut s, 0, "a.x", 1);
        put(&mut s, 0, "a.y", 1);
        s.subjects.next = DEAD - 1;
        let g = s.subjects_generation();
        put(&mut s, 0, "a.z", 1);
        assert_eq!(s.subjects_generation(), g + 1);
        let names: Vec<&str> = s.iter_from(0).map(|m| m.subject).collect();
        assert_eq!(names, ["a.x", "a.y", "a.z"]);
        assert_eq!(s.subjects(), 3);
    }

    /// One operation on a stream, for the model test.
    #[derive(Clone, Debug)]
    enum Op {
        Put {
            subject: u8,
            size: u32,
            id: Option<u8>,
            ttl: Option<u64>,
            dt: u64,
        },
        Expire {
            dt: u64,
        },
        Delete(u64),
        Purge {
            upto: Option<u64>,
            keep: Option<u64>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..4, 1u32..60, proptest::option::of(0u8..6), proptest::option::of(1u64..50), 0u64..20)
                .prop_map(|(subject, size, id, ttl, dt)| Op::Put { subject, size, id, ttl, dt }),
            1 => (0u64..40).prop_map(|dt| Op::Expire { dt }),
            1 => (0u64..40).prop_map(Op::Delete),
            1 => (proptest::option::of(0u64..40), proptest::option::of(0u64..5))
                .prop_map(|(upto, keep)| Op::Purge { upto, keep }),
        ]
    }

    /// A stored message in the model.
    #[derive(Clone, Debug, PartialEq)]
    struct M {
        ts: u64,
        size: u32,
        subject: String,
        expires: Option<u64>,
    }

    proptest! {
        /// The index agrees with a plain ordered map of what should be
        /// stored, whatever the operations: limits, age, TTL, dedup, purge.
        #[test]
        fn agrees_with_a_model(
            ops in proptest::collection::vec(op(), 1..120),
            max_msgs in proptest::option::of(1u64..10),
            max_bytes in proptest::option::of(60u64..300),
            max_age in proptest::option::of(1u64..80),
            discard_new in any::<bool>(),
        ) {
            let mut c = StreamConfig::new("s", &["a.*"]);
            c.max_msgs = max_msgs;
            c.max_bytes = max_bytes;
            c.max_age = max_age.map(Millis);
            c.duplicate_window = Millis(30);
            c.discard = if discard_new { Discard::New } else { Discard::Old };
            let mut s = StreamState::new(c).unwrap();
            let mut model: BTreeMap<u64, M> = BTreeMap::new();
            let mut ids: HashMap<u8, (u64, u64)> = HashMap::new();
            let (mut now, mut last) = (0u64, 0u64);
            for op in ops {
                match op {
                    Op::Put { subject, size, id, ttl, dt } => {
                        now += dt;
                        let subj = format!("a.s{subject}");
                        let t = Topic::new(&subj).unwrap();
                        let idtext = id.map(|i| format!("id{i}"));
                        let got = s.append(now, Incoming { subject: &t, size, msg_id: idtext.as_deref(), ttl: ttl.map(Millis) });
                        // The model's answer.
                        let dup = id.and_then(|i| ids.get(&i)).filter(|(_, ts)| ts + 30 > now).map(|(seq, _)| *seq);
                        let bytes: u64 = model.values().map(|m| u64::from(m.size)).sum();
                        if max_bytes.is_some_and(|mb| u64::from(size) > mb) {
                            prop_assert!(matches!(got, Err(AppendError::TooLarge { .. })), "{:?}", got);
                        } else if let Some(seq) = dup {
                            prop_assert_eq!(got, Ok(Appended::Duplicate { seq }));
                        } else if discard_new && max_msgs.is_some_and(|m| model.len() as u64 >= m) {
                            prop_assert_eq!(got, Err(AppendError::Full(Limit::Msgs)));
                        } else if discard_new && max_bytes.is_some_and(|m| bytes + u64::from(size) > m) {
                            prop_assert_eq!(got, Err(AppendError::Full(Limit::Bytes)));
                        } else {
                            last += 1;
                            model.insert(last, M { ts: now, size, subject: subj, expires: ttl.map(|t| now + t) });
                            if let Some(i) = id { ids.insert(i, (last, now)); }
                            let mut removed = vec![];
                            while max_msgs.is_some_and(|m| model.len() as u64 > m)
                                || max_bytes.is_some_and(|m| model.values().map(|m| u64::from(m.size)).sum::<u64>() > m)
                            {
                                let (&k, _) = model.iter().next().unwrap();
                                model.remove(&k);
                                removed.push(k);
                            }
                            prop_assert_eq!(got, Ok(Appended::Stored { seq: last, ts: now, removed }));
                        }
                    }
                    Op::Expire { dt } => {
                        now += dt;
                        let mut want: Vec<u64> = model.iter()
                            .filter(|(_, m)| max_age.is_some_and(|a| m.ts + a <= now) || m.expires.is_some_and(|e| e <= now))
                            .map(|(&k, _)| k).collect();
                        want.sort_unstable();
                        for k in &want { model.remove(k); }
                        prop_assert_eq!(s.expire(now), want);
                    }
                    Op::Delete(seq) => {
                        prop_assert_eq!(s.delete(seq), model.remove(&seq).is_some());
                    }
                    Op::Purge { upto, keep } => {
                        let keys: Vec<u64> = model.keys().copied().collect();
                        let keep_from = keys.len().saturating_sub(keep.map_or(0, |k| k as usize));
                        let keep_from = if keep.is_some() { keep_from } else { keys.len() };
                        let want: Vec<u64> = keys[..keep_from].iter().copied().filter(|&k| upto.is_none_or(|u| k < u)).collect();
                        for k in &want { model.remove(k); }
                        prop_assert_eq!(s.purge(&Purge { filter: None, upto, keep }), want);
                    }
                }
                // The whole index agrees after every step.
                let got: Vec<(u64, u64, u32, String)> = s.iter_from(0).map(|m| (m.seq, m.ts, m.size, m.subject.to_string())).collect();
                let want: Vec<(u64, u64, u32, String)> = model.iter().map(|(&k, m)| (k, m.ts, m.size, m.subject.clone())).collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(s.msgs(), model.len() as u64);
                prop_assert_eq!(s.bytes(), model.values().map(|m| u64::from(m.size)).sum::<u64>());
                prop_assert_eq!(s.last_seq(), last);
                prop_assert_eq!(s.first_seq(), model.keys().next().copied().unwrap_or(last + 1));
                for (&k, m) in &model {
                    prop_assert_eq!(s.expires(k), m.expires);
                }
                // A snapshot of either format restores the same index.
                for snap in [s.snapshot(), s.snapshot_v2()] {
                    let r = StreamState::from_snapshot(s.config().clone(), &snap).unwrap();
                    prop_assert!(r.is_some(), "snapshot not read back");
                    let r = r.unwrap();
                    let view = |s: &StreamState| {
                        s.iter_from(0)
                            .map(|m| (m.seq, m.ts, m.size, m.subject.to_string(), s.expires(m.seq)))
                            .collect::<Vec<_>>()
                    };
                    prop_assert_eq!(view(&r), view(&s));
                    prop_assert_eq!(
                        (r.msgs(), r.bytes(), r.last_seq(), r.last_ts(), r.subjects(), r.dedup_ids(), r.next_expiry()),
                        (s.msgs(), s.bytes(), s.last_seq(), s.last_ts(), s.subjects(), s.dedup_ids(), s.next_expiry())
                    );
                    prop_assert_eq!(r.seq_at_time(now / 2), s.seq_at_time(now / 2));
                }
            }
        }
    }
}
