//! The failure detector: is the node behind a connection still there?
//!
//! One [`Liveness`] per connection to a full node. The runtime's driver
//! looks at it every [`LivenessConfig::tick`] with what the transport saw:
//! a count of datagrams received from the peer (anything at all: data,
//! acknowledgements, pongs) and the smoothed round-trip time. The answer is a
//! [`Verdict`]:
//!
//! - **Alive** while datagrams keep arriving;
//! - **Probe** once the peer has been silent for `probe_after`: the driver
//!   sends a PING, whose acknowledgement and PONG are datagrams, so a live
//!   but idle peer is heard again one round trip later (probes repeat every
//!   `probe_after` while the silence lasts);
//! - **Down** once the silence reaches the bound: `down_after`, raised to
//!   `probe_after + rtt_factor · rtt` on a slow path so a live peer across a
//!   long link is not taken for a dead one, and capped at `down_after_max`.
//!
//! With the defaults a peer killed with `kill -9` is declared down 2 to
//! 2.25 s after the last datagram it sent on a fast network (the bound plus
//! at most one tick).
//!
//! **Our own stalls are not the peer's fault.** When a look comes much later
//! than the tick (the process was descheduled, the runtime starved), the
//! datagrams that arrived meanwhile may not have been processed yet, so the
//! silence is unknown: the window starts over. A node that is starved for
//! good falls back to the transport's idle timeout.
//!
//! What the detector says reaches every service as `PeerDown::Silent`; each
//! core remembers it in a [`macula_wire::suspect::SuspectList`] so that it
//! does not wait on the dead node (a DHT contact, an RPC provider) until the
//! node is heard from again.
//!
//! Pure: no clock, no I/O; time is an argument.

use macula_wire::time::Millis;

/// How often the driver looks (see the module docs).
pub const TICK: Millis = Millis(250);
/// Silence before a probe is sent: twice the tick, so an idle but healthy
/// connection costs one PING (and its PONG) per half second at most.
pub const PROBE_AFTER: Millis = Millis(500);
/// Silence that declares a node down on a fast path: three probes go
/// unanswered first, so one lost datagram (retransmitted by QUIC well inside
/// this) never kills a connection, and a crashed node is forgotten in
/// about two seconds.
pub const DOWN_AFTER: Millis = Millis(2_000);
/// On a slow path the bound is at least `PROBE_AFTER + RTT_FACTOR · rtt`:
/// a probe and eight round trips (300 ms across an ocean gives 2.9 s).
pub const RTT_FACTOR: u64 = 8;
/// Ceiling of the bound however slow the path looks (a bloated RTT estimate
/// must not make a dead node immortal); under the transport idle timeout.
pub const DOWN_AFTER_MAX: Millis = Millis(10_000);

/// Timers of the failure detector. `Default` is what a node runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessConfig {
    /// See [`TICK`].
    pub tick: Millis,
    /// See [`PROBE_AFTER`].
    pub probe_after: Millis,
    /// See [`DOWN_AFTER`].
    pub down_after: Millis,
    /// See [`RTT_FACTOR`].
    pub rtt_factor: u64,
    /// See [`DOWN_AFTER_MAX`].
    pub down_after_max: Millis,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            tick: TICK,
            probe_after: PROBE_AFTER,
            down_after: DOWN_AFTER,
            rtt_factor: RTT_FACTOR,
            down_after_max: DOWN_AFTER_MAX,
        }
    }
}

impl LivenessConfig {
    /// The silence that declares a node down on a path with round-trip time
    /// `rtt`: `down_after`, raised for slow paths, capped at `down_after_max`
    /// (and never below `down_after` even if the cap is set lower).
    pub fn bound(&self, rtt: Millis) -> Millis {
        let slow = self
            .probe_after
            .0
            .saturating_add(rtt.0.saturating_mul(self.rtt_factor));
        Millis(slow.min(self.down_after_max.0).max(self.down_after.0))
    }

    /// A look this late after the previous one means our own process
    /// stalled (see the module docs): four ticks, and at least a probe
    /// interval.
    fn stall(&self) -> Millis {
        Millis(self.tick.0.saturating_mul(4).max(self.probe_after.0))
    }
}

/// What the driver should do after a look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The peer was heard from recently enough.
    Alive,
    /// Silent for `probe_after`: send a probe (a PING).
    Probe,
    /// Silent for the bound: the node is down. `silent_for` is how long.
    Down { silent_for: Millis },
}

/// The failure detector of one connection (see the module docs).
#[derive(Clone, Debug)]
pub struct Liveness {
    cfg: LivenessConfig,
    /// When a new datagram was last seen (or the window last started over).
    heard_at: Millis,
    /// The transport's received-datagram count at that time.
    rx_seen: u64,
    /// When the driver last looked.
    looked_at: Millis,
    /// When the last probe of the current silence was sent.
    probed_at: Option<Millis>,
    down: bool,
}

impl Liveness {
    /// A detector for a connection that was just established (its
    /// handshake counts as hearing from the peer) with `rx` datagrams seen.
    pub fn new(cfg: LivenessConfig, now: Millis, rx: u64) -> Liveness {
        Liveness {
            cfg,
            heard_at: now,
            rx_seen: rx,
            looked_at: now,
            probed_at: None,
            down: false,
        }
    }

    /// The timers this detector runs with.
    pub fn config(&self) -> &LivenessConfig {
        &self.cfg
    }

    /// How long the peer has been silent, as of the last look.
    pub fn silent_for(&self, now: Millis) -> Millis {
        now.saturating_sub(self.heard_at)
    }

    /// Looks at the connection: `rx` is the transport's count of datagrams
    /// received from the peer so far, `rtt` its smoothed round-trip time.
    /// Once `Down` has been answered it stays the answer.
    pub fn look(&mut self, now: Millis, rx: u64, rtt: Millis) -> Verdict {
        if self.down {
            return Verdict::Down {
                silent_for: self.silent_for(now),
            };
        }
        let late = now.saturating_sub(self.looked_at) >= self.cfg.stall();
        self.looked_at = now;
        if rx != self.rx_seen || late {
            // Heard from the peer; or we were stalled ourselves and cannot
            // tell: either way the silence starts over.
            self.rx_seen = rx;
            self.heard_at = now;
            self.probed_at = None;
            return Verdict::Alive;
        }
        let silent = self.silent_for(now);
        if silent >= self.cfg.bound(rtt) {
            self.down = true;
            return Verdict::Down { silent_for: silent };
        }
        if silent < self.cfg.probe_after {
            return Verdict::Alive;
        }
        match self.probed_at {
            Some(at) if now.saturating_sub(at) < self.cfg.probe_after => Verdict::Alive,
            _ => {
                self.probed_at = Some(now);
                Verdict::Probe
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Millis {
        Millis(v)
    }

    /// Looks every tick from `from` to `to` with a fixed rx count; returns
    /// the first non-Alive verdict and when.
    fn silent_until(l: &mut Liveness, from: u64, to: u64, rx: u64) -> Vec<(u64, Verdict)> {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            let v = l.look(ms(t), rx, ms(1));
            if v != Verdict::Alive {
                out.push((t, v));
            }
            t += 250;
        }
        out
    }

    #[test]
    fn a_silent_peer_is_probed_then_declared_down_at_the_bound() {
        let mut l = Liveness::new(LivenessConfig::default(), ms(0), 7);
        let got = silent_until(&mut l, 250, 2_500, 7);
        assert_eq!(
            got,
            vec![
                (500, Verdict::Probe),
                (1_000, Verdict::Probe),
                (1_500, Verdict::Probe),
                (
                    2_000,
                    Verdict::Down {
                        silent_for: ms(2_000)
                    }
                ),
                (
                    2_250,
                    Verdict::Down {
                        silent_for: ms(2_250)
                    }
                ),
                (
                    2_500,
                    Verdict::Down {
                        silent_for: ms(2_500)
                    }
                ),
            ]
        );
    }

    #[test]
    fn any_datagram_restarts_the_silence() {
        let mut l = Liveness::new(LivenessConfig::default(), ms(0), 0);
        assert_eq!(l.look(ms(250), 0, ms(1)), Verdict::Alive);
        assert_eq!(l.look(ms(500), 0, ms(1)), Verdict::Probe);
        // The probe was answered.
        assert_eq!(l.look(ms(750), 1, ms(1)), Verdict::Alive);
        assert_eq!(l.silent_for(ms(750)), ms(0));
        assert_eq!(l.look(ms(1_000), 1, ms(1)), Verdict::Alive);
        assert_eq!(l.look(ms(1_250), 1, ms(1)), Verdict::Probe);
        // Silent again from 750: down at 2,750, not before.
        let got = silent_until(&mut l, 1_500, 2_750, 1);
        assert_eq!(got.first().map(|g| g.0), Some(1_750));
        assert_eq!(
            got.iter()
                .find(|(_, v)| matches!(v, Verdict::Down { .. }))
                .map(|g| g.0),
            Some(2_750)
        );
    }

    #[test]
    fn a_slow_path_gets_a_longer_bound_but_never_past_the_cap() {
        let c = LivenessConfig::default();
        assert_eq!(c.bound(ms(0)), ms(2_000));
        assert_eq!(c.bound(ms(100)), ms(2_000));
        assert_eq!(c.bound(ms(300)), ms(2_900));
        assert_eq!(c.bound(ms(5_000)), ms(10_000));
        assert_eq!(c.bound(ms(u64::MAX)), ms(10_000));
        let low_cap = LivenessConfig {
            down_after_max: ms(1_000),
            ..c
        };
        assert_eq!(low_cap.bound(ms(300)), ms(2_000));
        let mut l = Liveness::new(c, ms(0), 0);
        let custom = LivenessConfig {
            down_after: ms(3_000),
            ..c
        };
        assert_eq!(Liveness::new(custom, ms(0), 0).config(), &custom);
        let down_at = (1..=80u64)
            .map(|n| n * 250)
            .find(|t| matches!(l.look(ms(*t), 0, ms(300)), Verdict::Down { .. }));
        assert_eq!(down_at, Some(3_000));
    }

    #[test]
    fn our_own_stall_does_not_blame_the_peer() {
        let mut l = Liveness::new(LivenessConfig::default(), ms(0), 0);
        assert_eq!(l.look(ms(250), 0, ms(1)), Verdict::Alive);
        // The process was descheduled for 5 s: no verdict from that.
        assert_eq!(l.look(ms(5_250), 0, ms(1)), Verdict::Alive);
        assert_eq!(l.silent_for(ms(5_250)), ms(0));
        // Then it is looked at on time again: the peer gets a full window.
        let got = silent_until(&mut l, 5_500, 7_500, 0);
        assert_eq!(got.first(), Some(&(5_750, Verdict::Probe)));
        assert_eq!(
            got.iter()
                .find(|(_, v)| matches!(v, Verdict::Down { .. }))
                .map(|g| g.0),
            Some(7_250)
        );
        // A look just under the stall threshold still counts the silence.
        let mut l = Liveness::new(LivenessConfig::default(), ms(0), 0);
        assert_eq!(l.look(ms(999), 0, ms(1)), Verdict::Probe);
        assert_eq!(
            l.look(ms(1_998), 0, ms(1)),
            Verdict::Probe,
            "probes repeat while silent"
        );
        assert_eq!(
            l.look(ms(2_100), 0, ms(1)),
            Verdict::Down {
                silent_for: ms(2_100)
            }
        );
    }

    #[test]
    fn down_is_final() {
        let mut l = Liveness::new(LivenessConfig::default(), ms(0), 0);
        for t in (250..=2_000).step_by(250) {
            l.look(ms(t), 0, ms(1));
        }
        assert!(matches!(l.look(ms(2_250), 9, ms(1)), Verdict::Down { .. }));
    }

    proptest! {
        /// Whatever the schedule of looks and datagrams: a peer heard from
        /// at the current look is never down, the detector never declares
        /// down before the bound, and a peer that stays silent while the
        /// looks come on time is declared down within the bound plus one
        /// tick.
        #[test]
        fn never_early_never_late(
            steps in proptest::collection::vec((1u64..400, any::<bool>()), 1..200),
            rtt in 0u64..600,
        ) {
            let cfg = LivenessConfig::default();
            let bound = cfg.bound(ms(rtt));
            let mut l = Liveness::new(cfg, ms(0), 0);
            let (mut now, mut rx, mut heard, mut down) = (0u64, 0u64, 0u64, false);
            for (dt, hear) in steps {
                let late = dt >= cfg.stall().0;
                now += dt;
                if hear {
                    rx += 1;
                }
                let v = l.look(ms(now), rx, ms(rtt));
                if (hear || late) && !down {
                    heard = now;
                    prop_assert_eq!(v, Verdict::Alive);
                }
                match v {
                    Verdict::Down { silent_for } => {
                        prop_assert!(now - heard >= bound.0 || down);
                        prop_assert_eq!(silent_for.0, now - heard);
                        down = true;
                    }
                    _ => prop_assert!(now - heard < bound.0),
                }
            }
            if !down {
                // Silent from here, looked at every tick.
                let start = heard;
                let mut declared = false;
                for _ in 0..100 {
                    now += cfg.tick.0;
                    if let Verdict::Down { .. } = l.look(ms(now), rx, ms(rtt)) {
                        declared = true;
                        break;
                    }
                }
                prop_assert!(declared, "never declared down");
                prop_assert!(now - start <= bound.0 + cfg.tick.0);
            }
        }
    }
}
