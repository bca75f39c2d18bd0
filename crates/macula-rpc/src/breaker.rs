//! A circuit breaker per provider.
//!
//! - **Closed**: calls flow; consecutive failures are counted and a success
//!   resets the count. At [`BreakerConfig::failure_threshold`] it opens.
//! - **Open**: no calls until the open period ends. The first period is
//!   [`BreakerConfig::open_for`]; each failed probe doubles it, up to
//!   [`BreakerConfig::max_open_for`].
//! - **Half-open**: after the period, exactly one call (the probe) is let
//!   through. Success closes the breaker and resets the period; failure
//!   reopens it. A probe abandoned without an outcome (the caller gave up)
//!   frees the slot for another probe.

use crate::Millis;

/// Breaker settings. Defaults: open after 5 consecutive failures, for 1 s
/// at first, doubling per failed probe up to 30 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_for: Millis,
    pub max_open_for: Millis,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_for: Millis(1_000),
            max_open_for: Millis(30_000),
        }
    }
}

/// The state as seen from outside (for metrics and admin output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Millis },
    HalfOpen { probing: bool },
}

/// One provider's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Inner,
    /// Length of the current (or next) open period.
    period: Millis,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg,
            inner: Inner::Closed { failures: 0 },
            period: cfg.open_for,
        }
    }

    /// The state at `now` (an open breaker whose period has ended reads as
    /// half-open).
    pub fn state(&self, now: Millis) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call could go through at `now`, without taking the probe.
    pub fn available(&self, now: Millis) -> bool {
        match self.inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } => now >= until,
            Inner::HalfOpen { probing } => !probing,
        }
    }

    /// Lets one call through if the breaker allows it at `now`; in the
    /// half-open state this takes the single probe slot.
    pub fn acquire(&mut self, now: Millis) -> bool {
        match self.inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } if now < until => false,
            Inner::Open { .. } | Inner::HalfOpen { probing: false } => {
                self.inner = Inner::HalfOpen { probing: true };
                true
            }
            Inner::HalfOpen { probing: true } => false,
        }
    }

    /// The call succeeded: close and reset.
    pub fn on_success(&mut self) {
        self.inner = Inner::Closed { failures: 0 };
        self.period = self.cfg.open_for;
    }

    /// The call failed at `now`.
    pub fn on_failure(&mut self, now: Millis) {
        match self.inner {
            Inner::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.cfg.failure_threshold.max(1) {
                    self.inner = Inner::Open {
                        until: now.saturating_add(self.period),
                    };
                } else {
                    self.inner = Inner::Closed { failures };
                }
            }
            Inner::HalfOpen { .. } | Inner::Open { .. } => {
                // A failed probe (or a late failure of a call let through
                // before opening): open again for twice as long.
                self.period = Millis(self.period.0.saturating_mul(2))
                    .min(self.cfg.max_open_for.max(self.cfg.open_for));
                self.inner = Inner::Open {
                    until: now.saturating_add(self.period),
                };
            }
        }
    }

    /// The call ended without telling anything about the provider (the
    /// caller cancelled it): free the probe slot if it held it.
    pub fn on_abandon(&mut self) {
        if let Inner::HalfOpen { probing: true } = self.inner {
            self.inner = Inner::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_once() {
        let cfg = BreakerConfig {
            failure_threshold: 3,
            open_for: Millis(100),
            max_open_for: Millis(350),
        };
        let mut b = Breaker::new(cfg);
        for t in 0..2 {
            assert!(b.acquire(Millis(t)));
            b.on_failure(Millis(t));
            assert_eq!(b.state(Millis(t)), BreakerState::Closed);
        }
        // A success in between resets the count.
        b.on_success();
        for _ in 0..2 {
            b.on_failure(Millis(10));
        }
        assert_eq!(b.state(Millis(10)), BreakerState::Closed);
        b.on_failure(Millis(10));
        assert_eq!(b.state(Millis(10)), BreakerState::Open);
        assert!(!b.available(Millis(109)));
        assert_eq!(b.state(Millis(109)), BreakerState::Open);
        assert_eq!(
            b.state(Millis(110)),
            BreakerState::HalfOpen,
            "exactly at the end"
        );
        assert!(!b.acquire(Millis(109)));
        assert!(b.available(Millis(110)));
        assert!(b.acquire(Millis(110)), "the probe");
        assert!(!b.acquire(Millis(110)), "only one probe");
        b.on_failure(Millis(120));
        // Period doubled: 200.
        assert!(!b.acquire(Millis(319)));
        assert!(b.acquire(Millis(320)));
        b.on_failure(Millis(320));
        // Capped at 350.
        assert!(!b.acquire(Millis(669)));
        assert!(b.acquire(Millis(670)));
        b.on_abandon();
        assert!(b.acquire(Millis(671)), "abandoned probe frees the slot");
        b.on_success();
        assert_eq!(b.state(Millis(671)), BreakerState::Closed);
        // Period reset after closing.
        for _ in 0..3 {
            b.on_failure(Millis(1000));
        }
        assert!(b.acquire(Millis(1100)));
    }
}
