//! The hole-punching pair matrix in the simulator (issue 22): for every
//! ordered pair of NAT kinds ([`NatKind`]), attempts by an initiator A
//! behind one kind to go direct to a responder B behind the other, both
//! holding a relayed connection through a public relay R.
//!
//! What runs is `macula-nat`, the runtime's own decisions: each node
//! learns its NAT from what R and two more public peers saw of it
//! (`Observations::record`, `classify`: three observers at two IPs, as a
//! joining node has) and from a dial-back from R's IP
//! (`macula_nat::filtering`); candidates are `macula_nat::candidates`; each
//! round is `punch::on_answer` (punch or not, dial after half the relay's
//! round trip), `punch::dial_targets`, `punch::round_wait`, with the
//! runtime's `NatLimits` (rounds, backoff, round timeout). Only the
//! network is simulated: the NAT boxes (`crate::nat`), seeded one-way
//! latencies per link with per-packet jitter, per-packet loss on the
//! direct path (the relay carries the exchange reliably, as QUIC does),
//! QUIC's dial as a first packet resent after its probe timeout
//! ([`PTO`], doubling) while the round lasts. A packet that gets through
//! the other's NAT opens the connection two one-way trips later.
//!
//! Not modelled: the attempt's later retries (`punch_retry_after`, 30 s),
//! the traffic moving to the direct connection (the loss-free upgrade is
//! tested over loopback, `macula-runtime/tests/holepunch.rs`, and between
//! real NATs, `macula-cli/tests/nat_types.rs`), a Linux conntrack entry
//! left by a dropped packet (the harness's routers drop before confirming,
//! and so does [`NatBox::inbound`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use macula_nat::punch::{self, Side, Step};
use macula_nat::{NatLimits, Observations};
use macula_wire::nat::MAX_PUNCH_ADDRS;
use macula_wire::rng::Rng;
use macula_wire::time::Millis;

use crate::figures::Percentiles;
use crate::nat::{NatBox, NatKind};

/// QUIC's first probe timeout for a new connection (three times quinn's
/// 333 ms initial RTT): a dial's first packet is sent again after it,
/// then after twice as long, and so on.
pub const PTO: Millis = Millis(1_000);
/// Packets one dial sends at most in a round (the first and its resends).
pub const MAX_SENDS_PER_DIAL: usize = 16;

/// The pair matrix's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub seed: u64,
    /// Attempts per ordered pair, each with fresh routers.
    pub attempts: u32,
    /// One-way latency of a link (node to relay, node to node), drawn per
    /// link and attempt, uniform.
    pub link: (Millis, Millis),
    /// Extra delay per packet, uniform in 0..=jitter.
    pub jitter: Millis,
    /// Probability that a packet on the direct path is lost.
    pub loss: f64,
    /// The runtime's limits (rounds, backoff, round timeout).
    pub limits: NatLimits,
}

impl Scenario {
    /// 20 attempts per pair, links of 2-60 ms, 5 ms jitter, 1% loss, the
    /// runtime's default limits.
    pub fn new(seed: u64) -> Scenario {
        Scenario {
            seed,
            attempts: 20,
            link: (Millis(2), Millis(60)),
            jitter: Millis(5),
            loss: 0.01,
            limits: NatLimits::default(),
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Direct, in round `rounds` (from 1), `after` the attempt began.
    Direct { rounds: u32, after: Millis },
    /// The pair was judged not punchable: the relay stays.
    Unpunchable,
    /// Nothing to dial.
    NoCandidates,
    /// Every round ran without a direct connection: the relay stays.
    Failed,
}

/// One ordered pair's attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct PairResult {
    pub initiator: NatKind,
    pub responder: NatKind,
    pub outcomes: Vec<Outcome>,
}

impl PairResult {
    /// Attempts that went direct.
    pub fn direct(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Direct { .. }))
            .count()
    }

    /// Attempts direct in their first round.
    pub fn first_round(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Direct { rounds: 1, .. }))
            .count()
    }

    /// Attempts judged not punchable.
    pub fn unpunchable(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| **o == Outcome::Unpunchable)
            .count()
    }

    /// Rounds of the direct attempts (largest).
    pub fn max_rounds(&self) -> u32 {
        self.outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Direct { rounds, .. } => Some(*rounds),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Simulated time to direct (ms) over the direct attempts.
    pub fn time_to_direct(&self) -> Percentiles {
        Percentiles::of(
            self.outcomes
                .iter()
                .filter_map(|o| match o {
                    Outcome::Direct { after, .. } => Some(after.0),
                    _ => None,
                })
                .collect(),
        )
    }
}

/// The matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub scenario: Scenario,
    pub pairs: Vec<PairResult>,
}

impl Report {
    /// The result of one ordered pair.
    pub fn pair(&self, initiator: NatKind, responder: NatKind) -> Option<&PairResult> {
        self.pairs
            .iter()
            .find(|p| p.initiator == initiator && p.responder == responder)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.scenario;
        writeln!(
            f,
            "pair matrix (simulated), seed {}, {} attempts per pair, links {}-{} ms, jitter {} ms, loss {}",
            s.seed, s.attempts, s.link.0 .0, s.link.1 .0, s.jitter.0, s.loss
        )?;
        writeln!(
            f,
            "| initiator -> responder | direct | first round | unpunchable | max rounds | to direct p50 / p99 / max (ms) |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|")?;
        for p in &self.pairs {
            let t = p.time_to_direct();
            let n = p.outcomes.len();
            let times = if p.direct() > 0 {
                format!("{} / {} / {}", t.median, t.p99, t.max)
            } else {
                "-".to_string()
            };
            writeln!(
                f,
                "| {} -> {} | {}/{n} | {}/{} | {}/{n} | {} | {times} |",
                p.initiator.name(),
                p.responder.name(),
                p.direct(),
                p.first_round(),
                p.direct(),
                p.unpunchable(),
                p.max_rounds(),
            )?;
        }
        Ok(())
    }
}

/// Runs every ordered pair of [`NatKind::ALL`].
pub fn run(s: &Scenario) -> Report {
    let mut rng = Rng::new(s.seed);
    let mut pairs = Vec::new();
    for initiator in NatKind::ALL {
        for responder in NatKind::ALL {
            let outcomes = (0..s.attempts)
                .map(|_| attempt(s, initiator, responder, &mut rng))
                .collect();
            pairs.push(PairResult {
                initiator,
                responder,
                outcomes,
            });
        }
    }
    Report {
        scenario: s.clone(),
        pairs,
    }
}

const PORT: u16 = 4433;

fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// A node: its socket's LAN address, its router, what it learned.
struct Node {
    local: SocketAddr,
    nat: NatBox,
    /// Link to the relay (and the observers), one way.
    to_relay: Millis,
    side: Side,
    candidates: Vec<String>,
}

impl Node {
    /// Node `k` (1 or 2) behind `kind`; learns its NAT at `now`.
    fn new(k: u8, kind: NatKind, to_relay: Millis, now: Millis, rng: &mut Rng) -> Node {
        let nat = NatBox::new(kind, v4(198, 18, k, 1), rng);
        let local = match kind {
            NatKind::Public => SocketAddr::new(IpAddr::V4(v4(198, 18, k, 2)), PORT),
            _ => SocketAddr::new(IpAddr::V4(v4(10, 0, k, 2)), PORT),
        };
        let mut node = Node {
            local,
            nat,
            to_relay,
            side: Side {
                mapping: macula_nat::Mapping::Unknown,
                filtering: macula_nat::Filtering::Unknown,
                predicted: false,
            },
            candidates: Vec::new(),
        };
        node.learn(now, rng);
        node
    }

    /// What the relay R and two more public peers (one at R's IP, one at
    /// another) see of this node, then a dial-back from R's IP (another
    /// port) to the local port at the observed IP.
    fn learn(&mut self, now: Millis, rng: &mut Rng) {
        let relay = SocketAddr::new(IpAddr::V4(v4(198, 18, 0, 1)), PORT);
        let observers = [
            relay,
            SocketAddr::new(IpAddr::V4(v4(198, 18, 0, 2)), PORT),
            SocketAddr::new(IpAddr::V4(v4(198, 18, 0, 1)), PORT + 1),
        ];
        let mut obs = Observations::new(NatLimits::default());
        let mut observed_ip = None;
        for (i, o) in observers.into_iter().enumerate() {
            let t = Millis(now.0 + i as u64);
            if let Some(seen) = self.nat.outbound(self.local, o, t, rng) {
                obs.record(o, self.local, seen, t);
                observed_ip = Some(seen.ip());
            }
        }
        let report = obs.classify();
        let dial_back = SocketAddr::new(IpAddr::V4(v4(198, 18, 0, 1)), PORT + 2);
        let reached = match (self.nat.kind(), observed_ip) {
            (NatKind::Public, _) => true,
            (_, Some(_)) => self
                .nat
                .inbound(dial_back, self.local.port(), Millis(now.0 + 10))
                .is_some(),
            (_, None) => false,
        };
        let filtering = macula_nat::filtering(&report, Some(reached));
        self.side = Side {
            mapping: report.mapping,
            filtering,
            predicted: !report.predicted.is_empty(),
        };
        self.candidates =
            macula_nat::candidates(&report, &[self.local.to_string()], MAX_PUNCH_ADDRS);
    }
}

fn draw(rng: &mut Rng, range: (Millis, Millis)) -> Millis {
    Millis(rng.range_inclusive(range.0 .0, range.1 .0))
}

/// One attempt with fresh routers: rounds as the runtime's
/// `HolePunching::rounds` runs them.
fn attempt(s: &Scenario, ka: NatKind, kb: NatKind, rng: &mut Rng) -> Outcome {
    let mut a = Node::new(1, ka, draw(rng, s.link), Millis(0), rng);
    let mut b = Node::new(2, kb, draw(rng, s.link), Millis(0), rng);
    let direct_link = draw(rng, s.link);
    let l = s.limits;
    // The relayed connection is up; the attempt begins.
    let began = Millis(100);
    let mut t = began;
    let mut direct_at: Option<Millis> = None;
    for round in 0..l.punch_rounds {
        t = t.saturating_add(macula_nat::round_delay(round, l.punch_backoff));
        if let Some(at) = direct_at.filter(|at| *at <= t) {
            return Outcome::Direct {
                rounds: round,
                after: at.saturating_sub(began),
            };
        }
        let leg = |one_way: Millis, rng: &mut Rng| {
            one_way.saturating_add(Millis(rng.range_inclusive(0, s.jitter.0)))
        };
        // A -> R -> B (the offer), B -> R -> A (the answer).
        let a_to_b = leg(a.to_relay, rng).saturating_add(leg(b.to_relay, rng));
        let b_to_a = leg(b.to_relay, rng).saturating_add(leg(a.to_relay, rng));
        let rtt = a_to_b.saturating_add(b_to_a);
        let answered = t.saturating_add(rtt);
        let targets_b = punch::dial_targets(&b.candidates, MAX_PUNCH_ADDRS);
        let after = match punch::on_answer(a.side, b.side, targets_b.len(), rtt) {
            Step::Unpunchable => return Outcome::Unpunchable,
            Step::NoCandidates => return Outcome::NoCandidates,
            Step::Dial { after } => after,
        };
        // The sync reaches B, which dials at once; A dials `after`.
        let sync_at = answered
            .saturating_add(leg(a.to_relay, rng))
            .saturating_add(leg(b.to_relay, rng));
        let a_dials = answered.saturating_add(after);
        let round_end = a_dials.saturating_add(punch::round_wait(rtt, l.punch_round_timeout));
        let targets_a = punch::dial_targets(&a.candidates, MAX_PUNCH_ADDRS);
        // Every packet of the round: (sent, from A?, target), the
        // retransmissions of each dial while the round lasts.
        let mut sends: Vec<(Millis, bool, SocketAddr)> = Vec::new();
        for (from_a, start, targets) in [(true, a_dials, &targets_b), (false, sync_at, &targets_a)]
        {
            for target in targets.iter() {
                let (mut at, mut pto) = (start, PTO);
                // The wait doubles until the round ends (at most
                // MAX_SENDS_PER_DIAL packets, whatever the limits).
                for _ in 0..MAX_SENDS_PER_DIAL {
                    if at > round_end {
                        break;
                    }
                    sends.push((at, from_a, *target));
                    at = at.saturating_add(pto);
                    pto = Millis(pto.0.saturating_mul(2));
                }
            }
        }
        // Stable: ties keep A's, then B's, candidate order.
        sends.sort_by_key(|(at, _, _)| *at);
        // Outbound first (each packet records what its NAT sent to, and
        // when), then each arrival against the other's NAT at its time.
        let mut arrivals: Vec<(Millis, bool, SocketAddr, SocketAddr)> = Vec::new();
        for (at, from_a, target) in sends {
            let me = if from_a { &mut a } else { &mut b };
            let Some(src) = me.nat.outbound(me.local, target, at, rng) else {
                continue;
            };
            if rng.chance(s.loss) {
                continue;
            }
            arrivals.push((
                leg(direct_link, rng).saturating_add(at),
                from_a,
                src,
                target,
            ));
        }
        arrivals.sort_by_key(|(at, _, _, _)| *at);
        for (at, from_a, src, target) in arrivals {
            let other = if from_a { &mut b } else { &mut a };
            let reached = if other.nat.kind() == NatKind::Public {
                target == other.local
            } else {
                target.ip() == other.nat.public_ip()
                    && other.nat.inbound(src, target.port(), at) == Some(other.local)
            };
            if reached {
                // The reply and the client's last handshake packet.
                let up = at.saturating_add(Millis(direct_link.0.saturating_mul(2)));
                direct_at = Some(direct_at.map_or(up, |d| d.min(up)));
            }
        }
        if let Some(at) = direct_at.filter(|at| *at <= round_end) {
            return Outcome::Direct {
                rounds: round + 1,
                after: at.saturating_sub(began),
            };
        }
        t = round_end;
    }
    Outcome::Failed
}
