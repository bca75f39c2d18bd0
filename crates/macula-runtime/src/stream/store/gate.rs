//! The gate between acknowledgements from the journal and reads from redb
//! (see the store's module docs, "Acknowledged from the journal").

use super::*;

/// The last job acknowledged ahead of its redb commit, and the last job
/// committed: a read waits until what was acknowledged before it is in
/// redb (see the module docs, "Acknowledged from the journal"). Both are
/// tickets (a job's place in the queue), which the writer commits in
/// order, so an acknowledgement that comes after the commit (a journal
/// flush that ran late) waits for nothing.
#[derive(Debug, Default)]
pub(super) struct Gate {
    /// The highest ticket acknowledged from the journal (raised before
    /// the answers, and before `durable`).
    acked: AtomicU64,
    /// The highest ticket committed to redb (raised after the commit).
    committed: AtomicU64,
    /// The highest sequence put by a committed job (raised after the
    /// commit): puts are queued in ascending sequence order, so every put
    /// up to it is in redb.
    committed_seq: AtomicU64,
    /// Held to wait on and to notify `moved`.
    lock: parking_lot::Mutex<()>,
    /// Notified when `committed` moves or a commit fails.
    moved: parking_lot::Condvar,
    /// A commit of acknowledged writes failed: reads that wait for it fail
    /// (the journal holds them; the next open replays them).
    failed: parking_lot::Mutex<Option<String>>,
}

/// How long a read waits at most for the commit of writes acknowledged
/// before it (a commit takes microseconds to milliseconds; this bounds a
/// stuck disk).
pub const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Gate {
    /// Waits until every group acknowledged so far is committed, or every
    /// put up to sequence `seq` is (enough for a read of messages up to
    /// `seq`); whether it had to wait.
    pub(super) fn settle_for(&self, path: &Path, seq: u64) -> Result<bool, StoreError> {
        let want = self.acked.load(Ordering::Acquire);
        let done = || {
            self.committed.load(Ordering::Acquire) >= want
                || self.committed_seq.load(Ordering::Acquire) >= seq
        };
        if done() {
            return Ok(false);
        }
        let deadline = std::time::Instant::now() + READ_WAIT;
        let mut guard = self.lock.lock();
        while !done() {
            if let Some(f) = &*self.failed.lock() {
                return Err(io(path)(format!("commit of acknowledged writes: {f}")));
            }
            if self.moved.wait_until(&mut guard, deadline).timed_out() {
                return Err(io(path)(format!(
                    "acknowledged writes not committed within {READ_WAIT:?}"
                )));
            }
        }
        Ok(true)
    }

    pub(super) fn failed(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    /// Acknowledged up to `ticket` (before `durable` rises and before the
    /// answers).
    pub(super) fn acked_to(&self, ticket: u64) {
        self.acked.fetch_max(ticket, Ordering::AcqRel);
    }

    /// Committed up to `ticket`, with puts up to sequence `seq`.
    pub(super) fn committed_to(&self, ticket: u64, seq: u64) {
        self.committed_seq.fetch_max(seq, Ordering::AcqRel);
        self.committed.fetch_max(ticket, Ordering::AcqRel);
        let _guard = self.lock.lock();
        self.moved.notify_all();
    }

    pub(super) fn fail(&self, e: &str) {
        self.failed.lock().get_or_insert_with(|| e.to_string());
        let _guard = self.lock.lock();
        self.moved.notify_all();
    }
}
