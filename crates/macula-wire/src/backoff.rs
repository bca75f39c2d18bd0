//! Exponential backoff with jitter between retry attempts: the one
//! schedule the mesh uses (RPC retries, reconnects). Pure: the caller
//! supplies the randomness and sleeps for what it is told.

use crate::rng::Rng;
use crate::time::Millis;

/// Delay before retry `n` (1-based) is drawn uniformly from
/// `[d/2, d]` where `d = min(max, base * 2^(n-1))` ("equal jitter": it always
/// grows, and callers that failed together spread out). Defaults: base 5 ms,
/// max 500 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Millis,
    pub max: Millis,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Millis(5),
            max: Millis(500),
        }
    }
}

impl Backoff {
    /// The delay before retry `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32, rng: &mut Rng) -> Millis {
        let shift = retry.saturating_sub(1).min(32);
        let d = self.base.0.saturating_mul(1u64 << shift).min(self.max.0);
        let half = d / 2;
        Millis(half + rng.below(d - half + 1))
    }
}

/// A run of retries on one [`Backoff`]: each [`Retries::next_delay`] is the
/// next retry's delay; [`Retries::reset`] starts over after a success.
#[derive(Debug, Clone)]
pub struct Retries {
    schedule: Backoff,
    retry: u32,
    rng: Rng,
}

impl Retries {
    /// Retries on `schedule`, jittered by `rng`.
    pub fn new(schedule: Backoff, rng: Rng) -> Retries {
        Retries {
            schedule,
            retry: 0,
            rng,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Millis {
        self.retry = self.retry.saturating_add(1);
        self.schedule.delay(self.retry, &mut self.rng)
    }

    /// Back to the shortest delay.
    pub fn reset(&mut self) {
        self.retry = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest and largest delay seen over many draws.
    fn range(b: Backoff, retry: u32) -> (u64, u64) {
        let mut rng = Rng::new(u64::from(retry));
        let draws: Vec<u64> = (0..4000).map(|_| b.delay(retry, &mut rng).0).collect();
        (
            draws.iter().copied().min().unwrap_or(0),
            draws.iter().copied().max().unwrap_or(0),
        )
    }

    #[test]
    fn each_retry_draws_from_half_to_all_of_a_doubling_capped_delay() {
        let b = Backoff {
            base: Millis(10),
            max: Millis(100),
        };
        // Both ends of [d/2, d] are reached: d = 10, 20, 40, 80, then 100.
        assert_eq!(range(b, 1), (5, 10));
        assert_eq!(range(b, 2), (10, 20));
        assert_eq!(range(b, 3), (20, 40));
        assert_eq!(range(b, 4), (40, 80));
        assert_eq!(range(b, 5), (50, 100));
        assert_eq!(range(b, 40), (50, 100));
        // Retry 0 is treated as the first.
        assert_eq!(range(b, 0), (5, 10));
        // An odd delay: [3, 7] (half rounded down).
        let odd = Backoff {
            base: Millis(7),
            max: Millis(7),
        };
        assert_eq!(range(odd, 1), (3, 7));
        let zero = Backoff {
            base: Millis(0),
            max: Millis(0),
        };
        assert_eq!(range(zero, 3), (0, 0));
        // Huge retry counts and bases saturate instead of overflowing.
        let huge = Backoff {
            base: Millis(u64::MAX / 2),
            max: Millis(u64::MAX),
        };
        assert!(huge.delay(u32::MAX, &mut Rng::new(1)) >= Millis(u64::MAX / 2));
        assert_eq!(
            Backoff::default(),
            Backoff {
                base: Millis(5),
                max: Millis(500)
            }
        );
    }

    #[test]
    fn retries_walk_the_schedule_and_reset() {
        let b = Backoff {
            base: Millis(100),
            max: Millis(1000),
        };
        let mut r = Retries::new(b, Rng::new(7));
        let caps = [100, 200, 400, 800, 1000, 1000];
        for cap in caps {
            let d = r.next_delay().0;
            assert!(
                (cap / 2..=cap).contains(&d),
                "{d} not in [{}, {cap}]",
                cap / 2
            );
        }
        r.reset();
        assert!(r.next_delay().0 <= 100);
    }
}
