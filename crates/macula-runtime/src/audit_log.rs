//! The node's audit trail on disk: `<data dir>/audit/audit.log` and its
//! rotated predecessors `audit.log.1` (newer) .. `audit.log.K-1` (oldest),
//! one hash chain across all of them (`macula_auth::audit`), checkpoints
//! signed with the node's key.
//!
//! [`AuditLog::record`] never blocks: it puts the entry on a bounded queue
//! to one writer thread, which writes each batch and flushes it. An entry
//! that finds the queue full is counted (`macula_audit_dropped_total`) and
//! the writer records one `audit_dropped` entry with the count as soon as
//! it gets to it: nothing is lost without a trace in the chain itself.
//!
//! At open the chain resumes from the last complete entry; a torn last line
//! (a crash mid-write) is cut off and an `audit_torn_tail` entry says so. A
//! checkpoint is written every [`AuditLimits::checkpoint_every`] entries,
//! after [`AuditLimits::checkpoint_interval`], before each rotation and at
//! close. A failed write is counted (`macula_audit_write_errors_total`),
//! logged, and undone (the file is cut back, the chain rewound), so the file
//! stays verifiable.
//!
//! This module must not decide what is audited: callers name the kind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use macula_auth::audit::{Chain, Entry};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

pub use crate::config::AuditLimits;
use crate::metrics::register;

/// The current file's name inside the audit directory.
pub const FILE_NAME: &str = "audit.log";
/// The kind of the entry recording entries dropped at a full queue.
pub const DROPPED: &str = "audit_dropped";
/// The kind of the entry recording a torn last line cut off at open.
pub const TORN_TAIL: &str = "audit_torn_tail";
/// Entries the writer takes off the queue before writing them out.
const MAX_BATCH: usize = 1024;

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("audit log {path}: cannot {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// What the audit log counts.
#[derive(Debug, Default)]
pub struct AuditCounters {
    /// Entries written (checkpoints and the log's own notes included).
    pub entries: Counter,
    /// Entries dropped at a full queue.
    pub dropped: Counter,
    /// Failed writes (each batch lost is counted once).
    pub write_errors: Counter,
}

impl AuditCounters {
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_audit_entries",
            "Audit log entries written, checkpoints included.",
            self.entries.clone(),
        );
        register(
            r,
            "macula_audit_dropped",
            "Audit entries dropped because the writer's queue was full (recorded as one audit_dropped entry).",
            self.dropped.clone(),
        );
        register(
            r,
            "macula_audit_write_errors",
            "Failed writes to the audit log.",
            self.write_errors.clone(),
        );
    }
}

/// Wall-clock milliseconds, injectable for tests.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

enum Msg {
    Entry {
        time_ms: u64,
        kind: String,
        detail: String,
    },
    /// Answered once everything queued before it is written.
    Flush(mpsc::Sender<()>),
}

struct Shared {
    dir: PathBuf,
    tx: Mutex<Option<SyncSender<Msg>>>,
    /// Dropped entries not yet recorded in the chain.
    pending_dropped: AtomicU64,
    counters: Arc<AuditCounters>,
    thread: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    clock: WallClock,
}

/// The node's audit trail. Cheap to clone; all clones write to one file.
#[derive(Clone)]
pub struct AuditLog(Arc<Shared>);

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.0.dir)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (creating it, mode 0700) the audit directory `dir` and resumes
    /// its chain; checkpoints are signed with `key`.
    pub fn open(dir: &Path, key: SigningKey, limits: AuditLimits) -> Result<AuditLog, AuditError> {
        Self::open_with_clock(dir, key, limits, Arc::new(system_ms))
    }

    /// [`AuditLog::open`] with another wall clock (tests).
    pub fn open_with_clock(
        dir: &Path,
        key: SigningKey,
        limits: AuditLimits,
        clock: WallClock,
    ) -> Result<AuditLog, AuditError> {
        create_private_dir(dir).map_err(io_err(dir, "create the directory"))?;
        let (writer, torn) = Writer::open(dir, key, limits.clone())?;
        let counters = Arc::new(AuditCounters::default());
        let (tx, rx) = mpsc::sync_channel(limits.queue.max(1));
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            pending_dropped: AtomicU64::new(0),
            counters: counters.clone(),
            thread: Mutex::new(None),
            closed: AtomicBool::new(false),
            clock: clock.clone(),
        });
        let log = AuditLog(shared);
        if let Some(cut) = torn {
            log.record(
                TORN_TAIL,
                &format!("cut off a torn last line of {cut} bytes at open"),
            );
        }
        let weak = Arc::downgrade(&log.0);
        let handle = std::thread::Builder::new()
            .name("macula-audit".into())
            .spawn(move || run(writer, rx, weak, counters, clock))
            .map_err(io_err(dir, "start the writer thread"))?;
        *log.0.thread.lock() = Some(handle);
        tracing::debug!(dir = %dir.display(), "audit log open");
        Ok(log)
    }

    /// The audit directory.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// The counters (`macula_audit_*`).
    pub fn counters(&self) -> &Arc<AuditCounters> {
        &self.0.counters
    }

    /// Appends an entry stamped with the wall clock. Never blocks: at a
    /// full queue the entry is counted as dropped (see the module doc).
    pub fn record(&self, kind: &str, detail: &str) {
        let msg = Msg::Entry {
            time_ms: (self.0.clock)(),
            kind: kind.to_string(),
            detail: detail.to_string(),
        };
        let sent = match self.0.tx.lock().as_ref() {
            Some(tx) => tx.try_send(msg),
            None => Err(TrySendError::Disconnected(msg)),
        };
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.0.pending_dropped.fetch_add(1, Ordering::Relaxed);
                self.0.counters.dropped.inc();
            }
            Err(TrySendError::Disconnected(_)) => {
                self.0.counters.dropped.inc();
                tracing::warn!(kind, "audit entry after the audit log was closed: dropped");
            }
        }
    }

    /// Waits until everything recorded before this call is written (a
    /// blocking call: not for async tasks).
    pub fn flush(&self) {
        let (reply, done) = mpsc::channel();
        let tx = self.0.tx.lock().clone();
        if let Some(tx) = tx {
            if tx.send(Msg::Flush(reply)).is_ok() {
                let _ = done.recv();
            }
        }
    }

    /// Writes the final checkpoint and stops the writer (blocking; later
    /// records are dropped and counted). Idempotent.
    pub fn close(&self) {
        if self.0.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Dropping the sender ends the writer's loop after what is queued.
        drop(self.0.tx.lock().take());
        if let Some(h) = self.0.thread.lock().take() {
            if h.join().is_err() {
                tracing::warn!("the audit writer thread panicked");
            }
        }
    }
}

/// The writer thread's loop: batches, drop notes, timed checkpoints.
fn run(
    mut w: Writer,
    rx: Receiver<Msg>,
    shared: std::sync::Weak<Shared>,
    counters: Arc<AuditCounters>,
    clock: WallClock,
) {
    let mut open = true;
    while open {
        let wait = w.until_checkpoint(clock());
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                open = false;
                None
            }
        };
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut push = |m: Msg, batch: &mut Vec<(u64, String, String)>| match m {
            Msg::Entry {
                time_ms,
                kind,
                detail,
            } => batch.push((time_ms, kind, detail)),
            Msg::Flush(reply) => flushes.push(reply),
        };
        if let Some(m) = first {
            push(m, &mut batch);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => push(m, &mut batch),
                    Err(_) => break,
                }
            }
        }
        if let Some(s) = shared.upgrade() {
            let n = s.pending_dropped.swap(0, Ordering::Relaxed);
            if n > 0 {
                batch.push((
                    clock(),
                    DROPPED.to_string(),
                    format!("{n} entries dropped: the audit queue was full"),
                ));
            }
        }
        w.write_batch(&batch, clock(), &counters);
        if !open {
            w.close(clock(), &counters);
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }
}

/// The file side: the chain, the current file, rotation, checkpoints.
struct Writer {
    dir: PathBuf,
    key: SigningKey,
    limits: AuditLimits,
    chain: Chain,
    file: Option<File>,
    size: u64,
    since_checkpoint: u64,
    last_checkpoint_ms: Option<u64>,
    warn: crate::quiet::LogLimit,
}

impl Writer {
    /// Opens the current file, resuming its chain; the number of bytes of
    /// a torn last line cut off, if any.
    fn open(
        dir: &Path,
        key: SigningKey,
        limits: AuditLimits,
    ) -> Result<(Writer, Option<u64>), AuditError> {
        let path = dir.join(FILE_NAME);
        let mut file = open_append(&path).map_err(io_err(&path, "open"))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io_err(&path, "read"))?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let torn = (complete < text.len()).then(|| (text.len() - complete) as u64);
        if torn.is_some() {
            file.set_len(complete as u64)
                .map_err(io_err(&path, "cut off the torn last line of"))?;
            file.seek(SeekFrom::End(0)).map_err(io_err(&path, "seek"))?;
            tracing::warn!(path = %path.display(), "audit log: cut off a torn last line");
        }
        let mut chain = last_entry(&text[..complete]);
        if chain.is_none() {
            // A fresh current file after a rotation: the chain goes on from
            // the newest rotated one.
            let older = dir.join(format!("{FILE_NAME}.1"));
            if let Ok(bytes) = fs::read(&older) {
                chain = last_entry(&bytes);
            }
        }
        let w = Writer {
            dir: dir.to_path_buf(),
            key,
            limits,
            chain: chain.unwrap_or_default(),
            file: Some(file),
            size: complete as u64,
            since_checkpoint: 0,
            last_checkpoint_ms: None,
            warn: crate::quiet::LogLimit::new(Duration::from_secs(10)),
        };
        Ok((w, torn))
    }

    /// How long until a timed checkpoint is due (only once something was
    /// written since the last one).
    fn until_checkpoint(&self, now_ms: u64) -> Duration {
        let interval = self.limits.checkpoint_interval;
        match self.last_checkpoint_ms {
            Some(at) if self.since_checkpoint > 0 => {
                let due =
                    at.saturating_add(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX));
                Duration::from_millis(due.saturating_sub(now_ms).max(1))
            }
            _ => interval,
        }
    }

    fn checkpoint_due(&self, now_ms: u64) -> bool {
        if self.since_checkpoint == 0 {
            return false;
        }
        if self.since_checkpoint >= self.limits.checkpoint_every {
            return true;
        }
        let interval =
            u64::try_from(self.limits.checkpoint_interval.as_millis()).unwrap_or(u64::MAX);
        self.last_checkpoint_ms
            .is_some_and(|at| now_ms.saturating_sub(at) >= interval)
    }

    /// Writes `batch` (time, kind, detail) and the checkpoints that come
    /// due, then flushes. A failed write is counted and undone.
    fn write_batch(
        &mut self,
        batch: &[(u64, String, String)],
        now_ms: u64,
        counters: &AuditCounters,
    ) {
        if self.last_checkpoint_ms.is_none() {
            // The interval runs from the first write of this run.
            self.last_checkpoint_ms = Some(now_ms);
        }
        for (time_ms, kind, detail) in batch {
            let line = self.chain.clone().append(*time_ms, kind, detail);
            self.rotate_if_needed(line.len() as u64 + 1, now_ms, counters);
            let line = self.chain.clone().append(*time_ms, kind, detail);
            self.write_line(|c| c.append(*time_ms, kind, detail), &line, counters);
            if self.checkpoint_due(now_ms) {
                self.checkpoint(now_ms, counters);
            }
        }
        if batch.is_empty() && self.checkpoint_due(now_ms) {
            self.checkpoint(now_ms, counters);
        }
    }

    fn checkpoint(&mut self, now_ms: u64, counters: &AuditCounters) {
        let key = self.key.clone();
        let line = self.chain.clone().checkpoint(now_ms, &key);
        if self.write_line(|c| c.checkpoint(now_ms, &key), &line, counters) {
            self.since_checkpoint = 0;
            self.last_checkpoint_ms = Some(now_ms);
            if let Some(f) = &self.file {
                let _ = f.sync_data();
            }
        }
    }

    /// Writes one line that `advance` appends to the chain; true if written.
    fn write_line(
        &mut self,
        advance: impl FnOnce(&mut Chain) -> String,
        line: &str,
        counters: &AuditCounters,
    ) -> bool {
        let Some(file) = self.file.as_mut() else {
            counters.write_errors.inc();
            return false;
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        match file.write_all(&bytes).and_then(|()| file.flush()) {
            Ok(()) => {
                advance(&mut self.chain);
                self.size += bytes.len() as u64;
                self.since_checkpoint += 1;
                counters.entries.inc();
                true
            }
            Err(e) => {
                counters.write_errors.inc();
                // Undo a partial line so the file stays a chain.
                let _ = file.set_len(self.size);
                if let Some(suppressed) = self.warn.allow() {
                    tracing::warn!(dir = %self.dir.display(), error = %e, suppressed, "cannot write to the audit log");
                }
                false
            }
        }
    }

    /// Rotates when `incoming` more bytes would take the file over the limit.
    fn rotate_if_needed(&mut self, incoming: u64, now_ms: u64, counters: &AuditCounters) {
        if self.size == 0 || self.size + incoming <= self.limits.max_bytes {
            return;
        }
        // The rotated file ends signed.
        if self.since_checkpoint > 0 {
            self.checkpoint(now_ms, counters);
        }
        if let Err(e) = self.rotate() {
            counters.write_errors.inc();
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot rotate the audit log");
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        let name = |i: usize| self.dir.join(format!("{FILE_NAME}.{i}"));
        let keep = self.limits.files.max(1);
        self.file = None;
        // audit.log.{keep-1} is the oldest kept; anything from there on goes.
        if keep >= 2 {
            match fs::remove_file(name(keep - 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            for i in (1..keep - 1).rev() {
                match fs::rename(name(i), name(i + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            fs::rename(self.dir.join(FILE_NAME), name(1))?;
        } else {
            fs::remove_file(self.dir.join(FILE_NAME))?;
        }
        let file = open_append(&self.dir.join(FILE_NAME))?;
        self.file = Some(file);
        self.size = 0;
        Ok(())
    }

    fn close(&mut self, now_ms: u64, counters: &AuditCounters) {
        if self.since_checkpoint > 0 {
            self.checkpoint(now_ms, counters);
        }
        if let Some(f) = self.file.take() {
            let _ = f.sync_all();
        }
    }
}

/// Where the chain stands after the last entry of `text` that parses.
fn last_entry(text: &[u8]) -> Option<Chain> {
    let text = String::from_utf8_lossy(text);
    text.lines().rev().find_map(|l| {
        let e: Entry = serde_json::from_str(l).ok()?;
        Some(Chain {
            next_seq: e.seq.checked_add(1)?,
            last_hash: e.hash,
        })
    })
}

/// The files of an audit directory, oldest first (`audit.log.N` ..
/// `audit.log.1`, `audit.log`): the order `macula audit verify` takes them.
pub fn files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut rotated = Vec::new();
    let mut current = None;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == FILE_NAME {
            current = Some(e.path());
        } else if let Some(n) = name
            .strip_prefix(FILE_NAME)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|n| n.parse::<u64>().ok())
        {
            rotated.push((n, e.path()));
        }
    }
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    out.extend(current);
    Ok(out)
}

/// Opens (creating it, mode 0600) an audit file for appending.
fn open_append(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use macula_auth::audit::{verify, BreakReason};
    use std::sync::atomic::AtomicU64;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn limits() -> AuditLimits {
        AuditLimits {
            checkpoint_every: 1_000_000,
            checkpoint_interval: Duration::from_secs(3600),
            ..AuditLimits::default()
        }
    }

    fn fixed_clock() -> WallClock {
        let t = Arc::new(AtomicU64::new(1_000));
        Arc::new(move || t.fetch_add(1, Ordering::Relaxed))
    }

    fn open(dir: &Path, limits: AuditLimits) -> AuditLog {
        AuditLog::open_with_clock(dir, key(), limits, fixed_clock()).expect("open")
    }

    /// Every file of `dir` oldest first, verified as one chain with the
    /// key: (entries, checkpoints).
    fn check(dir: &Path) -> Result<(Vec<Entry>, usize), String> {
        let vk = key().verifying_key();
        let mut chain = None;
        let mut entries = Vec::new();
        let mut checkpoints = 0;
        for f in files(dir).expect("list") {
            let text = fs::read_to_string(&f).expect("read");
            let (end, n) = verify(text.lines(), chain.take(), Some(&vk))
                .map_err(|b| format!("{}: {b}", f.display()))?;
            chain = Some(end);
            checkpoints += n;
            entries.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<Entry>(l).expect("entry")),
            );
        }
        Ok((entries, checkpoints))
    }

    fn kinds(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn audit_log_resumes_the_chain_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), limits());
        log.record("a", "one");
        log.record("b", "two");
        log.close();
        let log = open(dir.path(), limits());
        log.record("c", "three");
        log.close();
        let (entries, checkpoints) = check(dir.path()).expect("intact");
        assert_eq!(kinds(&entries), ["a", "b", "checkpoint", "c", "checkpoint"]);
        assert_eq!(checkpoints, 2);
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        assert_eq!(log.counters().entries.get(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode(&dir.path().join(FILE_NAME)), 0o600);
        }
    }

    #[test]
    fn audit_log_cuts_a_torn_tail_and_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), limits());
        log.record("a", "one");
        log.close();
        let path = dir.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"seq\":2,\"time_ms\":5,\"ki")
            .expect("torn write");
        drop(f);
        assert!(check(dir.path()).is_err(), "the torn line breaks the chain");
        let log = open(dir.path(), limits());
        log.close();
        let (entries, _) = check(dir.path()).expect("intact again");
        assert_eq!(
            kinds(&entries),
            ["a", "checkpoint", TORN_TAIL, "checkpoint"]
        );
        assert!(
            entries[2].detail.contains("24 bytes"),
            "{}",
            entries[2].detail
        );
    }

    #[test]
    fn audit_log_rotation_keeps_one_verifiable_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lim = AuditLimits {
            max_bytes: 4096,
            files: 3,
            ..limits()
        };
        let log = open(dir.path(), lim);
        for i in 0..200 {
            log.record("event", &format!("entry number {i} with some padding text"));
        }
        log.close();
        let names = files(dir.path()).expect("list");
        let names: Vec<String> = names
            .iter()
            .map(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["audit.log.2", "audit.log.1", "audit.log"]);
        for f in files(dir.path()).expect("list") {
            let len = fs::metadata(&f).expect("stat").len();
            // A rotated file may exceed the limit by its closing checkpoint.
            assert!(len <= 4096 + 400, "{} is {len} bytes", f.display());
        }
        let (entries, checkpoints) = check(dir.path()).expect("intact across files");
        assert!(checkpoints >= 2, "each rotated file ends with a checkpoint");
        let last = entries
            .iter()
            .rev()
            .find(|e| e.kind == "event")
            .expect("event");
        assert_eq!(last.detail, "entry number 199 with some padding text");
        // The oldest files are gone: the kept ones start mid-chain.
        assert!(entries[0].seq > 0);
        // Reopening resumes after the rotated set.
        let log = open(
            dir.path(),
            AuditLimits {
                max_bytes: 4096,
                files: 3,
                ..limits()
            },
        );
        log.record("after", "reopen");
        log.close();
        check(dir.path()).expect("still intact");
    }

    #[test]
    fn audit_log_resumes_from_the_rotated_file_when_the_current_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), limits());
        log.record("a", "one");
        log.close();
        fs::rename(dir.path().join(FILE_NAME), dir.path().join("audit.log.1")).expect("rename");
        let log = open(dir.path(), limits());
        log.record("b", "two");
        log.close();
        let (entries, _) = check(dir.path()).expect("intact");
        assert_eq!(kinds(&entries), ["a", "checkpoint", "b", "checkpoint"]);
    }

    #[test]
    fn audit_log_counts_and_records_drops() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A tiny queue, filled before the writer thread can drain it: the
        // writer is held up by a flush waiting behind a blocked clock.
        let gate = Arc::new(parking_lot::Mutex::new(()));
        let held = gate.lock();
        let g = gate.clone();
        let t = Arc::new(AtomicU64::new(1_000));
        let clock: WallClock = Arc::new(move || {
            // The writer thread calls the clock too: it waits here while
            // the test holds the gate (the test thread's own calls happen
            // before `record` takes the lock, so skip them).
            if std::thread::current().name() == Some("macula-audit") {
                drop(g.lock());
            }
            t.fetch_add(1, Ordering::Relaxed)
        });
        let lim = AuditLimits {
            queue: 2,
            ..limits()
        };
        let log = AuditLog::open_with_clock(dir.path(), key(), lim, clock).expect("open");
        for i in 0..10 {
            log.record("burst", &i.to_string());
        }
        // The writer has taken at most one entry off the queue (it is
        // blocked in the clock before writing): at least 7 dropped.
        let dropped = log.counters().dropped.get();
        assert!((7..=8).contains(&dropped), "dropped {dropped}");
        drop(held);
        log.close();
        let (entries, _) = check(dir.path()).expect("intact");
        let note = entries
            .iter()
            .find(|e| e.kind == DROPPED)
            .expect("a drop note");
        assert_eq!(
            note.detail,
            format!("{dropped} entries dropped: the audit queue was full")
        );
        let written = entries.iter().filter(|e| e.kind == "burst").count() as u64;
        assert_eq!(written + dropped, 10, "every entry written or counted");
    }

    #[test]
    fn audit_log_checkpoints_by_count_and_by_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key();
        let mut w = Writer::open(
            dir.path(),
            key.clone(),
            AuditLimits {
                checkpoint_every: 3,
                checkpoint_interval: Duration::from_secs(10),
                ..AuditLimits::default()
            },
        )
        .expect("open")
        .0;
        let c = AuditCounters::default();
        let e = |n: &str| (0u64, "e".to_string(), n.to_string());
        w.write_batch(&[e("1"), e("2"), e("3")], 1_000, &c);
        // Three entries: a checkpoint.
        w.write_batch(&[e("4")], 2_000, &c);
        assert_eq!(w.until_checkpoint(2_000), Duration::from_millis(9_000));
        // Nothing due before the interval...
        w.write_batch(&[], 10_999, &c);
        // ...and a checkpoint once it passed, with no new entry needed.
        w.write_batch(&[], 11_000, &c);
        w.write_batch(&[], 30_000, &c);
        let text = fs::read_to_string(dir.path().join(FILE_NAME)).expect("read");
        let (_, n) = verify(text.lines(), None, Some(&key.verifying_key())).expect("intact");
        let kinds: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Entry>(l).expect("entry").kind)
            .collect();
        assert_eq!(kinds, ["e", "e", "e", "checkpoint", "e", "checkpoint"]);
        assert_eq!(n, 2);
        assert_eq!(c.entries.get(), 6);
        // A checkpoint by another key does not verify.
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        let broken = verify(text.lines(), None, Some(&other)).expect_err("wrong key");
        assert_eq!(broken.reason, BreakReason::BadCheckpoint);
        assert_eq!(broken.line, 4);
    }
}
