//! The simulated network: latency distributions, per-frame faults, and the
//! timeouts of the transport it stands in for.
//!
//! The network is deliberately worse than QUIC: frames can be lost,
//! duplicated and reordered even on one connection, so a core that leans on
//! the transport for ordering or exactly-once delivery fails its checks here
//! instead of in production under a reset or a reconnect.

use macula_pool::LivenessConfig;
use macula_wire::rng::Rng;
use macula_wire::time::Millis;

/// One-way latency of a frame (or a handshake message), drawn per frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Latency {
    /// Always the same.
    Fixed(Millis),
    /// Uniform in `min..=max`.
    Uniform {
        /// Smallest.
        min: Millis,
        /// Largest.
        max: Millis,
    },
    /// Two populations, as a mesh spanning a LAN and a WAN has: `near` most of
    /// the time, `far` with probability `far_chance`.
    Bimodal {
        /// Usual range (`min`, `max`), uniform.
        near: (Millis, Millis),
        /// Occasional range, uniform.
        far: (Millis, Millis),
        /// Probability of the far range, 0.0..=1.0.
        far_chance: f64,
    },
}

impl Latency {
    /// One draw.
    pub fn sample(&self, rng: &mut Rng) -> Millis {
        match self {
            Latency::Fixed(t) => *t,
            Latency::Uniform { min, max } => Millis(rng.range_inclusive(min.0, max.0)),
            Latency::Bimodal {
                near,
                far,
                far_chance,
            } => {
                let (lo, hi) = if rng.chance(*far_chance) { far } else { near };
                Millis(rng.range_inclusive(lo.0, hi.0))
            }
        }
    }

    /// The largest value a draw can take.
    pub fn max(&self) -> Millis {
        match self {
            Latency::Fixed(t) => *t,
            Latency::Uniform { max, .. } => *max,
            Latency::Bimodal { near, far, .. } => near.1.max(far.1),
        }
    }
}

/// The network every node shares. Faults apply to protocol frames; the
/// connection handshake (dial, accept, refuse) suffers latency, loss and
/// partitions but is never duplicated (QUIC's handshake deduplicates).
#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    /// One-way latency.
    pub latency: Latency,
    /// Probability that one frame or handshake message is lost, 0.0..=1.0.
    pub loss: f64,
    /// Probability that a frame is delivered twice (the copy with its own
    /// latency), 0.0..=1.0.
    pub duplicate: f64,
    /// Probability that a frame is held back by an extra delay of up to the
    /// largest latency, so later frames overtake it, 0.0..=1.0.
    pub reorder: f64,
    /// A dial with no answer by then fails and drops the frames queued on it
    /// (the runtime's connect timeout).
    pub dial_timeout: Millis,
    /// The failure detector every full-node connection runs (the runtime's
    /// `Limits::liveness`): a connection whose other end died, or that a
    /// partition cuts, is declared down [`NetConfig::detect_after`] after
    /// the last packet got through.
    pub liveness: LivenessConfig,
    /// Every node's pool size (the runtime's `max_connections`, 1000).
    pub max_connections: usize,
    /// Frames queued on one dial in progress; past this they are dropped and
    /// counted (the runtime bounds its per-peer queues the same way).
    pub max_queued_per_dial: usize,
}

impl NetConfig {
    /// When the failure detector declares a silent peer down: its bound for
    /// the slowest round trip this network has (twice the largest one-way
    /// latency), plus one look (the detector looks every tick, so a
    /// silence is noticed at most a tick late).
    pub fn detect_after(&self) -> Millis {
        let rtt = Millis(self.latency.max().0.saturating_mul(2));
        self.liveness.bound(rtt).saturating_add(self.liveness.tick)
    }
}

impl Default for NetConfig {
    /// 10-100 ms one way (a WAN spread) with 1% loss, no duplication or
    /// extra reordering, and the runtime's default timeouts and pool size.
    fn default() -> NetConfig {
        NetConfig {
            latency: Latency::Uniform {
                min: Millis(10),
                max: Millis(100),
            },
            loss: 0.01,
            duplicate: 0.0,
            reorder: 0.0,
            dial_timeout: Millis(5_000),
            liveness: LivenessConfig::default(),
            max_connections: 1000,
            max_queued_per_dial: 256,
        }
    }
}

impl NetConfig {
    /// `latency` uniform in `min..=max`, no loss, no faults: for protocol
    /// tests that want exact outcomes.
    pub fn lossless(min: Millis, max: Millis) -> NetConfig {
        NetConfig {
            latency: Latency::Uniform { min, max },
            loss: 0.0,
            ..NetConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_range_and_replay() {
        let l = Latency::Bimodal {
            near: (Millis(1), Millis(5)),
            far: (Millis(100), Millis(200)),
            far_chance: 0.2,
        };
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let mut n_far = 0;
        for _ in 0..1000 {
            let t = l.sample(&mut a);
            assert_eq!(t, l.sample(&mut b));
            assert!(
                (Millis(1)..=Millis(5)).contains(&t) || (Millis(100)..=Millis(200)).contains(&t)
            );
            n_far += usize::from(t >= Millis(100));
        }
        assert!((100..300).contains(&n_far), "far draws: {n_far}");
        assert_eq!(l.max(), Millis(200));
        assert_eq!(Latency::Fixed(Millis(7)).sample(&mut a), Millis(7));
    }
}
