//! Exponential backoff with jitter, as a pure value: the caller supplies the
//! randomness and sleeps for what it is told. No clock, no tasks.

use std::time::Duration;

/// Reconnect delay schedule: `min`, doubling up to `max`, each delay spread by
/// ±20% jitter so that peers restarted together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay to wait now; `jitter` is a uniform random value in `[0, 1)`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        base.mul_f64(factor)
    }

    /// Back to the shortest delay, after a connection that worked.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A cheap jitter source for runtime use: not cryptographic, only spreads
/// reconnect times.
pub fn jitter() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let seq: Vec<_> = (0..6).map(|_| b.next_delay(0.5)).collect();
        assert_eq!(
            seq,
            vec![ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        b.reset();
        assert_eq!(b.next_delay(0.5), ms(100));
        assert_eq!(b.next_delay(0.0), ms(160));
        assert_eq!(b.next_delay(1.0), ms(480));
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }
}
