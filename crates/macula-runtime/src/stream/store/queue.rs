//! The store writer's bounded queue: the room each queued write is
//! charged, a publish's admission (waiting for room, refused after the
//! timeout) and the figures (see the store's module docs, "Backpressure").

use super::*;

/// What a queued job is charged beyond its record bytes (the job, its
/// writes and answer).
pub const JOB_OVERHEAD: u64 = 128;
/// Default bound of the writer's queue, in charged bytes
/// (`StreamLimits::write_queue_bytes`).
pub const DEFAULT_QUEUE_BYTES: u64 = 64 << 20;
/// Default time a publisher waits for room in a full queue
/// (`StreamLimits::write_queue_timeout`).
pub const DEFAULT_QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The writer's queue bound (see the module docs, "Backpressure").
#[derive(Debug)]
pub(super) struct Room {
    /// Bytes charged by the jobs queued and not committed yet.
    pub(super) queued: AtomicU64,
    /// The bound.
    pub(super) limit: AtomicU64,
    /// The publisher's wait for room, in milliseconds.
    pub(super) timeout_ms: AtomicU64,
    /// Publishers waiting for room (notified only when there are some).
    pub(super) waiting: AtomicU64,
    pub(super) notify: tokio::sync::Notify,
    /// Publishes that waited for room, and those refused after the wait.
    pub(super) waits: AtomicU64,
    pub(super) refused: AtomicU64,
    /// The most bytes queued so far.
    pub(super) high: AtomicU64,
}

impl Room {
    pub(super) fn new() -> Room {
        Room {
            queued: AtomicU64::new(0),
            limit: AtomicU64::new(DEFAULT_QUEUE_BYTES),
            timeout_ms: AtomicU64::new(DEFAULT_QUEUE_TIMEOUT.as_millis() as u64),
            waiting: AtomicU64::new(0),
            notify: tokio::sync::Notify::new(),
            waits: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            high: AtomicU64::new(0),
        }
    }

    /// Charges `bytes` if they fit (or the queue is empty).
    pub(super) fn try_take(self: &Arc<Self>, bytes: u64) -> Option<Admission> {
        let limit = self.limit.load(Ordering::Acquire);
        let now = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q == 0 || q.saturating_add(bytes) <= limit).then(|| q + bytes)
            })
            .ok()?;
        self.high.fetch_max(now + bytes, Ordering::Relaxed);
        Some(Admission {
            room: self.clone(),
            bytes,
        })
    }

    /// Charges `bytes` whether they fit or not.
    pub(super) fn force(self: &Arc<Self>, bytes: u64) -> Admission {
        let now = self.queued.fetch_add(bytes, Ordering::AcqRel);
        self.high.fetch_max(now + bytes, Ordering::Relaxed);
        Admission {
            room: self.clone(),
            bytes,
        }
    }
}

/// Room taken in a store's writer queue ([`StreamStore::admit`]): handed
/// to the write it was taken for ([`StreamStore::submit_admitted`]), and
/// given back when the writer has committed it (or when dropped unused).
#[derive(Debug)]
pub struct Admission {
    room: Arc<Room>,
    bytes: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        // SeqCst with the waiter's `waiting` increment and retry: one of
        // the two sees the other's write, so no wake-up is lost.
        self.room.queued.fetch_sub(self.bytes, Ordering::SeqCst);
        if self.room.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify.notify_waiters();
        }
    }
}

/// What a write is charged in the queue.
pub fn charge(writes: &[Write]) -> u64 {
    JOB_OVERHEAD
        + writes
            .iter()
            .map(|w| match w {
                Write::Put(_, r) => r.len() as u64,
                Write::Config(b) | Write::Consumer(_, Some(b)) | Write::Index(Some(b)) => {
                    b.len() as u64
                }
                Write::Delete(seqs) => 8 * seqs.len() as u64,
                _ => 0,
            })
            .sum::<u64>()
}

/// The writer queue's figures ([`StreamStore::queue_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Bytes charged by the writes queued and not committed yet.
    pub queued: u64,
    /// The most ever queued.
    pub high: u64,
    /// The bound.
    pub limit: u64,
    /// Publishes that waited for room.
    pub waits: u64,
    /// Publishes refused after waiting the whole timeout.
    pub refused: u64,
}
