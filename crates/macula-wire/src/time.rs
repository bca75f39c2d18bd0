//! Time as plain numbers: the one clock type of every core (DHT, pub/sub,
//! RPC, the simulator).
//!
//! The core never reads a clock: every entry point takes `now: Millis`, a reading
//! of the caller's monotonic clock in milliseconds (the simulator's virtual clock,
//! or the runtime's). This module must not know where that clock comes from.

use std::fmt;

/// Milliseconds: a reading of the caller's clock, or a span between two readings.
///
/// One type for both keeps the arithmetic simple. Every operation saturates, so a
/// huge TTL sent by a peer can never wrap around into the past. Serialized
/// as the bare number of milliseconds.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// Zero: the start of the clock, or an empty span.
    pub const ZERO: Millis = Millis(0);

    /// A span of whole seconds.
    pub const fn from_secs(secs: u64) -> Millis {
        Millis(secs.saturating_mul(1000))
    }

    /// `self + other`, saturating at `u64::MAX`.
    pub const fn saturating_add(self, other: Millis) -> Millis {
        Millis(self.0.saturating_add(other.0))
    }

    /// `self - other`, saturating at zero.
    pub const fn saturating_sub(self, other: Millis) -> Millis {
        Millis(self.0.saturating_sub(other.0))
    }

    /// A span from a `Duration`, rounded down to whole milliseconds and
    /// saturating at `u64::MAX`.
    pub fn from_duration(d: std::time::Duration) -> Millis {
        Millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// This span as a `Duration`.
    pub const fn to_duration(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }

    /// `percent`% of this span, rounded down, without overflowing.
    pub const fn percent(self, percent: u64) -> Millis {
        Millis(self.0 / 100 * percent + self.0 % 100 * percent / 100)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Millis(u64::MAX).saturating_add(Millis(1)), Millis(u64::MAX));
        assert_eq!(Millis(1).saturating_sub(Millis(2)), Millis::ZERO);
        assert_eq!(Millis(1000).percent(75), Millis(750));
        assert_eq!(Millis(u64::MAX).percent(100), Millis(u64::MAX));
        assert_eq!(Millis::from_secs(3), Millis(3000));
        let d = std::time::Duration::from_micros(2_999);
        assert_eq!(Millis::from_duration(d), Millis(2));
        assert_eq!(Millis(7).to_duration(), std::time::Duration::from_millis(7));
        assert_eq!(
            Millis::from_duration(std::time::Duration::MAX),
            Millis(u64::MAX)
        );
    }
}
