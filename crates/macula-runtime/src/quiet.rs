//! Quiet logs under attack: a warning that can repeat once per junk packet
//! or failed handshake is written at most once per interval, with the
//! number of lines held back since the last one it wrote (the metrics count
//! every occurrence; the log only has to say that it is happening).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// One warning's limiter. Cheap: two atomics, no lock.
#[derive(Debug)]
pub struct LogLimit {
    start: Instant,
    every_ms: u64,
    /// When a line may be written next (ms since `start`, plus one so that
    /// 0 means "never written").
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> LogLimit {
        LogLimit {
            start: Instant::now(),
            every_ms: every.as_millis().max(1) as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now: `Some(n)` with the lines held
    /// back since the last one written, else `None` (this one is counted
    /// as held back).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(self.start.elapsed().as_millis() as u64)
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Relaxed);
        if next != 0 && now_ms + 1 < next {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        // One writer wins the slot; the others count as held back.
        match self
            .next_ms
            .compare_exchange(next, now_ms + 1 + self.every_ms, Relaxed, Relaxed)
        {
            Ok(_) => Some(self.suppressed.swap(0, Relaxed)),
            Err(_) => {
                self.suppressed.fetch_add(1, Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let l = LogLimit::new(Duration::from_millis(1000));
        assert_eq!(l.allow_at(0), Some(0), "the first is written");
        for t in [1, 10, 500, 999] {
            assert_eq!(l.allow_at(t), None);
        }
        assert_eq!(
            l.allow_at(1000),
            Some(4),
            "then one with what was held back"
        );
        assert_eq!(l.allow_at(1500), None);
        assert_eq!(l.allow_at(5000), Some(1));
        assert_eq!(l.allow_at(5001), None);
    }
}
