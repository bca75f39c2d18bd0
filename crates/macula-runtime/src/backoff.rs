//! Reconnect delays on the mesh's one backoff schedule
//! ([`macula_wire::backoff`]), jittered by an RNG seeded from system
//! entropy, and that seed for the runtime's other RNGs.

use std::time::Duration;

use macula_wire::backoff::{Backoff, Retries};
use macula_wire::rng::Rng;
use macula_wire::time::Millis;

/// Reconnect retries: the first waits `min`, each later one twice as long up
/// to `max`, every delay drawn from its upper half so that peers restarted
/// together spread out.
pub(crate) fn reconnects(min: Duration, max: Duration) -> Retries {
    Retries::new(
        Backoff {
            base: Millis::from_duration(min),
            max: Millis::from_duration(max.max(min)),
        },
        Rng::new(seed()),
    )
}

/// A seed from system entropy. The RNGs seeded here only spread load and
/// retries, so a fixed seed is an acceptable fallback.
pub(crate) fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_double_up_to_the_cap_and_reset() {
        let ms = Duration::from_millis;
        let mut r = reconnects(ms(100), ms(1000));
        for cap in [100, 200, 400, 800, 1000, 1000] {
            let d = r.next_delay().to_duration();
            assert!(d >= ms(cap / 2) && d <= ms(cap), "{d:?} for cap {cap}");
        }
        r.reset();
        assert!(r.next_delay().to_duration() <= ms(100));
        // A max below the min is the min.
        let mut r = reconnects(ms(100), ms(10));
        assert!(r.next_delay().to_duration() <= ms(100));
        assert!(r.next_delay().to_duration() <= ms(100));
    }
}
