//! Exponential backoff with jitter between retry attempts.

use crate::{Millis, Rng};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let b = Backoff {
            base: Millis(10),
            max: Millis(100),
        };
        let mut rng = Rng::new(7);
        for _ in 0..100 {
            let d1 = b.delay(1, &mut rng);
            assert!((5..=10).contains(&d1.0), "{d1}");
            let d3 = b.delay(3, &mut rng);
            assert!((20..=40).contains(&d3.0), "{d3}");
            let d9 = b.delay(40, &mut rng);
            assert!((50..=100).contains(&d9.0), "{d9}");
        }
    }
}
