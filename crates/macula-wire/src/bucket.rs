//! The one token bucket: units per second, time in microseconds passed in
//! (no clock), exact fixed-point arithmetic (no float drift). Used for a
//! relay session's bytes (a reader that has already read takes on debt and
//! is told how long to wait) and a DHT peer's requests (refused when the
//! bucket is empty).

/// Scale of the fixed-point tokens (micro-units), so refills at any rate
/// are exact in integer arithmetic.
const SCALE: i128 = 1_000_000;

/// A token bucket holding up to `burst` units, refilled at `rate` units per
/// second. The balance may go negative ([`TokenBucket::take`]: debt), so
/// over any window `T` at most `burst + rate * T` units pass.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Units per second; 0 means unlimited.
    rate: u64,
    burst: i128,
    tokens: i128,
    last_us: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now_us: u64) -> TokenBucket {
        let burst = i128::from(burst) * SCALE;
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last_us: now_us,
        }
    }

    fn refill(&mut self, now_us: u64) {
        let elapsed = now_us.saturating_sub(self.last_us);
        self.last_us = self.last_us.max(now_us);
        self.tokens = (self.tokens + i128::from(elapsed) * i128::from(self.rate)).min(self.burst);
    }

    /// Consumes `n` units at `now_us` whatever the balance; returns the wait
    /// (microseconds) until the balance is back to zero, 0 if it did not go
    /// negative.
    pub fn take(&mut self, n: u64, now_us: u64) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        self.refill(now_us);
        self.tokens -= i128::from(n) * SCALE;
        if self.tokens >= 0 {
            return 0;
        }
        let debt = -self.tokens;
        let rate = i128::from(self.rate);
        u64::try_from((debt + rate - 1) / rate).unwrap_or(u64::MAX)
    }

    /// Consumes `n` units at `now_us` if the bucket holds them; false (and
    /// nothing consumed) if not.
    pub fn try_take(&mut self, n: u64, now_us: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now_us);
        let want = i128::from(n) * SCALE;
        if self.tokens >= want {
            self.tokens -= want;
            true
        } else {
            false
        }
    }

    /// Empties the bucket at `now_us` (debt is kept).
    pub fn drain(&mut self, now_us: u64) {
        self.refill(now_us);
        self.tokens = self.tokens.min(0);
    }

    /// Whether the bucket is full again at `now_us` (it then carries no
    /// state a fresh bucket would not).
    pub fn is_full(&mut self, now_us: u64) -> bool {
        self.refill(now_us);
        self.tokens >= self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn take_allows_burst_then_paces() {
        let mut b = TokenBucket::new(1000, 500, 0);
        assert_eq!(b.take(500, 0), 0);
        // 100 units of debt at 1000/s: 100 ms.
        assert_eq!(b.take(100, 0), 100_000);
        // After 100 ms the debt is paid.
        assert_eq!(b.take(0, 100_000), 0);
        // Refill never exceeds the burst.
        assert_eq!(b.take(500, 10_000_000), 0);
        assert!(b.take(1, 10_000_000) > 0);
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let mut b = TokenBucket::new(0, 0, 0);
        assert_eq!(b.take(u64::MAX, 0), 0);
        assert!(b.try_take(u64::MAX, 0));
    }

    #[test]
    fn try_take_refuses_without_consuming() {
        // 3 at once, then 10 per second: one every 100 ms.
        let mut b = TokenBucket::new(10, 3, 1_000_000);
        assert!(b.try_take(1, 1_000_000));
        assert!(b.try_take(1, 1_000_000));
        assert!(b.try_take(1, 1_000_000));
        assert!(!b.try_take(1, 1_000_000));
        assert!(!b.try_take(1, 1_099_000));
        assert!(b.try_take(1, 1_200_000));
        assert!(!b.is_full(1_200_000));
        assert!(b.is_full(1_500_000));
        b.drain(1_500_000);
        assert!(!b.try_take(1, 1_500_000));
        // A clock that steps back refills nothing.
        assert!(!b.try_take(1, 0));
    }

    proptest! {
        /// Over any run, units passed by a reader that waits as told never
        /// exceed burst + rate * elapsed, and it is not slower than the rate.
        #[test]
        fn take_bounds_throughput(
            rate in 1u64..10_000_000,
            burst in 2048u64..1_000_000,
            chunks in proptest::collection::vec(1u64..20_000, 1..200),
        ) {
            let mut b = TokenBucket::new(rate, burst, 0);
            let mut now = 0u64;
            let mut passed: u128 = 0;
            for n in chunks {
                passed += u128::from(n);
                let allowed = u128::from(burst) + u128::from(rate) * u128::from(now) / 1_000_000 + u128::from(n) + 20_000;
                prop_assert!(passed <= allowed, "passed {passed} allowed {allowed}");
                now += b.take(n, now);
            }
            let need = passed.saturating_sub(u128::from(burst)) * 1_000_000 / u128::from(rate);
            prop_assert!(u128::from(now) <= need + 200);
        }
    }
}
