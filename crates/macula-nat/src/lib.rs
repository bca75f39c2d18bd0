//! `macula-nat`: NAT traversal's pure core (issue 22): no I/O, no clock
//! (time is an argument). The runtime (`macula-runtime`'s `nat.rs`,
//! `reachability.rs`, `punch.rs`) drives it over QUIC; the simulator
//! (`macula-sim`'s pair matrix) runs the same decisions over simulated NAT
//! boxes. [`punch`] holds one hole-punching round's decision.
//!
//! # NAT type detection from observed addresses
//!
//! Every HELLO carries `observed_addr`, the address its sender sees the
//! receiver at (docs/PROTOCOL.md, HELLO). A node records, per **observer**
//! (the peer's address as the node sees it), what that observer saw and
//! which local address the connection used, and classifies its NAT from
//! the set ([`Observations::classify`]), as RFC 4787 names the behaviours:
//!
//! - an observation whose observed address equals the local address went
//!   through no NAT (a peer on the same LAN, or a public node);
//! - the **mapping** is told from the translated observations: two
//!   observers at one IP (different ports) that see different addresses
//!   make it *address-and-port-dependent*; otherwise two observers at
//!   different IPs that see different addresses make it *address-dependent*
//!   (reported so also when no two observers share an IP, which could have
//!   told it apart from address-and-port-dependent); observers at two or
//!   more IPs that all agree make it *endpoint-independent*; fewer
//!   observers leave it unknown;
//! - **port preservation**: every translated observation kept the local
//!   port;
//! - **filtering** needs a packet from a socket the node never sent to:
//!   [`filtering`] derives it from the dial-back check (reachability.rs),
//!   valid only while ports are preserved (the dial-back dials the local
//!   port at the observed IP).
//!
//! An observer that sees the node at another IP than before means the
//! node's address changed (a new network, a NAT reboot): every older
//! observation is forgotten and classification starts over. The set is
//! bounded ([`NatLimits::max_observations`], oldest forgotten first) and
//! observations expire ([`NatLimits::observation_ttl`]).
//!
//! **Port prediction.** A NAT that maps per destination (address-dependent
//! or address-and-port-dependent: symmetric) but hands ports out in order
//! shows it in the observations: the ports one local socket was seen at,
//! sorted, are at least [`PREDICT_MIN_PORTS`] and no two consecutive ones
//! are more than [`PREDICT_MAX_STEP`] apart ([`sequential_ports`]). Its
//! next mapping (for the next destination, a hole-punching peer) is then
//! one of the next few ports: [`predicted`] names a window of
//! [`PREDICT_WINDOW`] of them, which come first among the node's
//! hole-punching candidates ([`candidates`]), so the peer dials them;
//! [`should_punch_predicted`] lets such a node punch towards
//! port-restricted filtering.

use std::net::{IpAddr, SocketAddr};

use macula_wire::time::Millis;

pub mod punch;

/// True for the placeholder addresses of relayed sessions (2001:db8::/32,
/// made by `tunnel.rs`): they are never dialed directly, and what a peer
/// sees of them is no observation of this node's address.
pub fn is_tunnel_addr(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V6(ip) => ip.segments()[0] == 0x2001 && ip.segments()[1] == 0x0db8,
        IpAddr::V4(_) => false,
    }
}

/// Bounds of the observation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatLimits {
    /// Observers remembered at once; the oldest is forgotten for a new one.
    pub max_observations: usize,
    /// An observation not renewed for this long is forgotten.
    pub observation_ttl: Millis,
    /// Try hole punching over relayed connections this node dialed.
    pub punch: bool,
    /// Rounds of one hole-punching attempt (each: exchange candidates,
    /// measure the round trip, dial at once from both sides).
    pub punch_rounds: u32,
    /// How long one round waits for the answer and then for a direct
    /// connection.
    pub punch_round_timeout: Millis,
    /// Wait before the second round; doubled for each further one.
    pub punch_backoff: Millis,
    /// Wait after a relayed connection comes up before the first round
    /// (traffic flows over the relay meanwhile).
    pub punch_start_delay: Millis,
    /// Attempts after a failed one (while the relayed connection lives).
    pub punch_retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub punch_retry_after: Millis,
}

impl Default for NatLimits {
    fn default() -> Self {
        NatLimits {
            max_observations: 32,
            observation_ttl: Millis::from_secs(600),
            punch: true,
            punch_rounds: 3,
            punch_round_timeout: Millis(3_000),
            punch_backoff: Millis(500),
            punch_start_delay: Millis::ZERO,
            punch_retries: 3,
            punch_retry_after: Millis::from_secs(30),
        }
    }
}

/// How a NAT maps a local socket to public addresses (RFC 4787, 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mapping {
    /// Too few observations to tell.
    Unknown,
    /// Peers see the local address itself: no NAT on the way.
    NoNat,
    /// One public address for every destination (full, restricted and
    /// port-restricted cone NATs).
    EndpointIndependent,
    /// A public address per destination IP.
    AddressDependent,
    /// A public address per destination IP and port (symmetric NATs).
    AddressAndPortDependent,
}

impl Mapping {
    /// Name in `/health`, `macula nat` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Mapping::Unknown => "unknown",
            Mapping::NoNat => "none",
            Mapping::EndpointIndependent => "endpoint_independent",
            Mapping::AddressDependent => "address_dependent",
            Mapping::AddressAndPortDependent => "address_and_port_dependent",
        }
    }

    /// Value of the `macula_nat_mapping` gauge.
    pub fn code(self) -> u64 {
        match self {
            Mapping::Unknown => 0,
            Mapping::NoNat => 1,
            Mapping::EndpointIndependent => 2,
            Mapping::AddressDependent => 3,
            Mapping::AddressAndPortDependent => 4,
        }
    }
}

/// Which inbound packets a NAT lets through to a mapping (RFC 4787, 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filtering {
    /// Not known (no dial-back answer, or ports not preserved).
    Unknown,
    /// No NAT, and peers could dial this node.
    NoNat,
    /// A dial from a socket this node never sent to got through the
    /// mapping: endpoint-independent or address-dependent filtering (the
    /// dialer shares an IP with a peer this node talks to).
    EndpointOrAddressDependent,
    /// It did not: address-and-port-dependent filtering (Linux
    /// masquerade's), or a firewall.
    AddressAndPortDependent,
}

impl Filtering {
    /// Name in `/health`, `macula nat` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Filtering::Unknown => "unknown",
            Filtering::NoNat => "none",
            Filtering::EndpointOrAddressDependent => "endpoint_or_address_dependent",
            Filtering::AddressAndPortDependent => "address_and_port_dependent",
        }
    }
}

/// What one observer saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// The observer's address as this node sees it.
    pub observer: SocketAddr,
    /// This node's address on that connection (local IP, socket port).
    pub local: SocketAddr,
    /// Where the observer sees this node.
    pub observed: SocketAddr,
    /// When it was recorded or last confirmed.
    pub at: Millis,
}

impl Observation {
    /// Whether a NAT translated this node's address on the way.
    pub fn translated(&self) -> bool {
        !same_addr(self.observed, self.local)
    }
}

/// What [`Observations::record`] made of an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new observer.
    New,
    /// An observer saw the same address again.
    Confirmed,
    /// An observer saw another port at the same IP (its mapping was made
    /// anew): its entry replaced.
    Remapped,
    /// An observer saw another IP: this node's address changed, every
    /// older observation was forgotten.
    AddressChanged,
}

/// Ports seen at once for one local socket before allocation is called
/// sequential (two could be chance).
pub const PREDICT_MIN_PORTS: usize = 3;
/// The largest gap between consecutive ports a sequential allocator may
/// leave (other flows of the host take ports in between).
pub const PREDICT_MAX_STEP: u16 = 8;
/// Predicted ports offered as candidates (HOLE_PUNCH carries at most 8
/// addresses in all).
pub const PREDICT_WINDOW: usize = 4;

/// The classification of the current observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatReport {
    pub mapping: Mapping,
    /// Whether any observer saw a translated address; `None` without
    /// observations.
    pub behind_nat: Option<bool>,
    /// Whether every translated observation kept the local port; `None`
    /// when nothing was translated.
    pub port_preserved: Option<bool>,
    /// The distinct translated (reflexive) addresses, sorted.
    pub reflexive: Vec<SocketAddr>,
    /// Observers remembered.
    pub observers: usize,
    /// A symmetric mapping whose ports are handed out in order: where
    /// this node's next mappings are expected (see "Port prediction");
    /// empty otherwise.
    pub predicted: Vec<SocketAddr>,
}

/// IPv4-mapped IPv6 addresses compare equal to their IPv4 form.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    canonical(a) == canonical(b)
}

/// The observations a node holds. Deterministic: the same calls in the
/// same order give the same state.
#[derive(Debug, Clone)]
pub struct Observations {
    limits: NatLimits,
    /// One entry per observer, oldest `at` first is not guaranteed.
    entries: Vec<Observation>,
}

impl Observations {
    pub fn new(limits: NatLimits) -> Observations {
        Observations {
            limits,
            entries: Vec::new(),
        }
    }

    /// Every observation held.
    pub fn entries(&self) -> &[Observation] {
        &self.entries
    }

    /// Forgets observations older than the TTL.
    pub fn expire(&mut self, now: Millis) {
        let ttl = self.limits.observation_ttl;
        self.entries.retain(|e| e.at.saturating_add(ttl) > now);
    }

    /// Records that `observer` sees this node (whose connection to it uses
    /// `local`) at `observed`.
    pub fn record(
        &mut self,
        observer: SocketAddr,
        local: SocketAddr,
        observed: SocketAddr,
        now: Millis,
    ) -> Recorded {
        self.expire(now);
        let (observer, local, observed) =
            (canonical(observer), canonical(local), canonical(observed));
        let new = Observation {
            observer,
            local,
            observed,
            at: now,
        };
        if let Some(i) = self.entries.iter().position(|e| e.observer == observer) {
            let old = self.entries[i];
            if old.observed == observed && old.local == local {
                self.entries[i].at = now;
                return Recorded::Confirmed;
            }
            if old.observed.ip() != observed.ip() || old.local.ip() != local.ip() {
                self.entries.clear();
                self.entries.push(new);
                return Recorded::AddressChanged;
            }
            self.entries[i] = new;
            return Recorded::Remapped;
        }
        if self.limits.max_observations == 0 {
            return Recorded::New;
        }
        while self.entries.len() >= self.limits.max_observations {
            // The oldest goes; among equals the first recorded.
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.at)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.entries.remove(oldest);
        }
        self.entries.push(new);
        Recorded::New
    }

    /// Classifies the observations (see the module documentation).
    pub fn classify(&self) -> NatReport {
        let translated: Vec<&Observation> =
            self.entries.iter().filter(|e| e.translated()).collect();
        let behind_nat = (!self.entries.is_empty()).then_some(!translated.is_empty());
        let mapping = if self.entries.is_empty() {
            Mapping::Unknown
        } else if translated.is_empty() {
            Mapping::NoNat
        } else {
            mapping_of(&translated)
        };
        let port_preserved = (!translated.is_empty()).then(|| {
            translated
                .iter()
                .all(|e| e.observed.port() == e.local.port())
        });
        let mut reflexive: Vec<SocketAddr> = translated.iter().map(|e| e.observed).collect();
        reflexive.sort();
        reflexive.dedup();
        let symmetric = matches!(
            mapping,
            Mapping::AddressDependent | Mapping::AddressAndPortDependent
        );
        let predicted = match symmetric {
            true => sequential_ports(&translated, PREDICT_MAX_STEP)
                .map(|(last, step)| predicted(last, step, PREDICT_WINDOW))
                .unwrap_or_default(),
            false => Vec::new(),
        };
        NatReport {
            mapping,
            behind_nat,
            port_preserved,
            reflexive,
            observers: self.entries.len(),
            predicted,
        }
    }
}

/// Whether the NAT hands ports out in order, from translated observations:
/// for the local socket seen at the most distinct ports (at least
/// [`PREDICT_MIN_PORTS`], at one IP), the ports sorted never jump by more
/// than `max_step`. Returns the highest mapping seen and the smallest step;
/// `None` for ports spread at random, preserved, or too few to tell.
pub fn sequential_ports(translated: &[&Observation], max_step: u16) -> Option<(SocketAddr, u16)> {
    let mut locals: Vec<SocketAddr> = translated.iter().map(|o| o.local).collect();
    locals.sort();
    locals.dedup();
    let mut best: Option<(usize, SocketAddr, u16)> = None;
    for local in locals {
        let seen: Vec<SocketAddr> = translated
            .iter()
            .filter(|o| o.local == local)
            .map(|o| o.observed)
            .collect();
        let ip = seen[0].ip();
        if seen.iter().any(|a| a.ip() != ip) {
            continue;
        }
        let mut ports: Vec<u16> = seen.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() < PREDICT_MIN_PORTS {
            continue;
        }
        let gaps = ports.windows(2).map(|w| w[1] - w[0]);
        if gaps.clone().any(|g| g > max_step) {
            continue;
        }
        let step = gaps.min().unwrap_or(1).max(1);
        let last = SocketAddr::new(ip, ports[ports.len() - 1]);
        if best.as_ref().is_none_or(|(n, _, _)| ports.len() > *n) {
            best = Some((ports.len(), last, step));
        }
    }
    best.map(|(_, last, step)| (last, step))
}

/// The `window` mappings after `last`, `step` apart (none past port
/// 65535).
pub fn predicted(last: SocketAddr, step: u16, window: usize) -> Vec<SocketAddr> {
    (1..=window as u32)
        .map_while(|k| {
            let port = u32::from(last.port()) + k * u32::from(step);
            u16::try_from(port)
                .ok()
                .map(|p| SocketAddr::new(last.ip(), p))
        })
        .collect()
}

/// The mapping told by translated observations (at least one).
fn mapping_of(t: &[&Observation]) -> Mapping {
    let mut same_ip_differ = false;
    let mut other_ip_differ = false;
    let mut other_ip_pair = false;
    for (i, a) in t.iter().enumerate() {
        for b in &t[i + 1..] {
            // Only observations of the same local socket say anything
            // about its mapping.
            if a.local != b.local {
                continue;
            }
            let differ = a.observed != b.observed;
            if a.observer.ip() == b.observer.ip() {
                same_ip_differ |= differ;
            } else {
                other_ip_pair = true;
                other_ip_differ |= differ;
            }
        }
    }
    if same_ip_differ {
        Mapping::AddressAndPortDependent
    } else if other_ip_differ {
        Mapping::AddressDependent
    } else if other_ip_pair {
        Mapping::EndpointIndependent
    } else {
        Mapping::Unknown
    }
}

/// Filtering as the dial-back check shows it: `dialed_back` is whether a
/// peer's dial-back (from a socket this node never sent to, to the local
/// port at the observed IP) reached this node; `None` while unknown.
pub fn filtering(report: &NatReport, dialed_back: Option<bool>) -> Filtering {
    match (report.behind_nat, report.port_preserved, dialed_back) {
        (Some(false), _, Some(true)) => Filtering::NoNat,
        // Ports preserved: the dial-back went to the mapping itself.
        (Some(true), Some(true), Some(true)) => Filtering::EndpointOrAddressDependent,
        (Some(true), Some(true), Some(false)) => Filtering::AddressAndPortDependent,
        _ => Filtering::Unknown,
    }
}

/// Whether two nodes with these behaviours can be expected to reach each
/// other directly by punching holes from their own sockets (the issue's
/// definition): at least one side maps endpoint-independently, and the
/// other is not a symmetric NAT facing port-restricted filtering. A node
/// without NAT counts as endpoint-independent with open filtering.
pub fn punchable(a: (Mapping, Filtering), b: (Mapping, Filtering)) -> bool {
    let eim = |m: Mapping| matches!(m, Mapping::NoNat | Mapping::EndpointIndependent);
    let symmetric = |m: Mapping| {
        matches!(
            m,
            Mapping::AddressDependent | Mapping::AddressAndPortDependent
        )
    };
    let strict = |f: Filtering| f == Filtering::AddressAndPortDependent;
    let one_way = |x: (Mapping, Filtering), y: (Mapping, Filtering)| {
        eim(x.0) && !(symmetric(y.0) && strict(x.1))
    };
    one_way(a, b) || one_way(b, a)
}

/// Whether this node (`mine`: its mapping and filtering) should try to
/// punch to a peer whose HOLE_PUNCH says `theirs`: [`punchable`], with
/// what is not known yet taken at its best (an unknown mapping as
/// endpoint-independent), so only pairs known not to work are skipped.
pub fn should_punch(mine: (Mapping, Filtering), theirs: (Mapping, Filtering)) -> bool {
    let hope = |m: Mapping| match m {
        Mapping::Unknown => Mapping::EndpointIndependent,
        m => m,
    };
    punchable((hope(mine.0), mine.1), (hope(theirs.0), theirs.1))
}

/// Filtering named as in HOLE_PUNCH (`Filtering::name`); unknown names
/// are `Unknown`.
pub fn filtering_named(name: &str) -> Filtering {
    [
        Filtering::NoNat,
        Filtering::EndpointOrAddressDependent,
        Filtering::AddressAndPortDependent,
    ]
    .into_iter()
    .find(|f| f.name() == name)
    .unwrap_or(Filtering::Unknown)
}

/// Mapping named as in HOLE_PUNCH (`Mapping::name`); unknown names are
/// `Unknown`.
pub fn mapping_named(name: &str) -> Mapping {
    [
        Mapping::NoNat,
        Mapping::EndpointIndependent,
        Mapping::AddressDependent,
        Mapping::AddressAndPortDependent,
    ]
    .into_iter()
    .find(|m| m.name() == name)
    .unwrap_or(Mapping::Unknown)
}

/// The wait before round `round` (from 0) of a hole-punching attempt: none
/// before the first, `backoff` before the second, doubling after.
pub fn round_delay(round: u32, backoff: Millis) -> Millis {
    match round {
        0 => Millis::ZERO,
        r => Millis(backoff.0.saturating_mul(1u64 << (r - 1).min(16))),
    }
}

/// How long the initiator waits after sending the sync before it dials:
/// half the round trip, so both dials leave at about the same time.
pub fn dial_delay(rtt: Millis) -> Millis {
    Millis(rtt.0 / 2)
}

/// Whether this node (`mine`) should try to punch to a peer (`theirs`),
/// as [`should_punch`], where a side whose symmetric mapping is
/// predictable (`predicted`: mine, theirs; it offers its next mappings as
/// candidates, so the other's dials reach the mapping its own dial will
/// make) counts as endpoint-independent. Its filtering, unknown because
/// its ports are not preserved, counts as address-and-port-dependent
/// (a symmetric NAT's, Linux masquerade's): the other side's dials reach
/// its new mapping only from the address that mapping was made for, so a
/// peer that is itself symmetric and unpredictable (dialing from ports
/// nobody can name) is not tried. The simulator's pair matrix found that
/// pair punched in vain before (`macula-sim/tests/punch.rs`).
pub fn should_punch_predicted(
    mine: (Mapping, Filtering),
    theirs: (Mapping, Filtering),
    predicted: (bool, bool),
) -> bool {
    let as_eim = |side: (Mapping, Filtering), p: bool| match (p, side) {
        (true, (Mapping::AddressDependent | Mapping::AddressAndPortDependent, f)) => (
            Mapping::EndpointIndependent,
            match f {
                Filtering::Unknown => Filtering::AddressAndPortDependent,
                f => f,
            },
        ),
        (_, side) => side,
    };
    should_punch(as_eim(mine, predicted.0), as_eim(theirs, predicted.1))
}

/// A node's hole-punching candidates: its predicted next mappings (a
/// sequential symmetric NAT), its reflexive addresses, then its listen
/// addresses that name an IP (for peers on the same LAN), without
/// duplicates, at most `max`.
pub fn candidates(report: &NatReport, listen: &[String], max: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let listed = listen
        .iter()
        .filter_map(|a| a.parse::<SocketAddr>().ok())
        .filter(|a| !a.ip().is_unspecified() && a.port() != 0);
    let known = report.predicted.iter().chain(report.reflexive.iter());
    for a in known.copied().chain(listed) {
        let a = a.to_string();
        if out.len() < max && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const LOCAL: &str = "198.19.1.10:4433";

    fn obs(o: &mut Observations, observer: &str, observed: &str, t: u64) -> Recorded {
        o.record(a(observer), a(LOCAL), a(observed), Millis(t))
    }

    #[test]
    fn tunnel_addresses_are_2001_db8_only() {
        assert!(is_tunnel_addr(&a("[2001:db8::1]:4433")));
        assert!(!is_tunnel_addr(&a("[2001:db9::1]:4433")));
        assert!(!is_tunnel_addr(&a("[2002:db8::1]:4433")));
        assert!(!is_tunnel_addr(&a("198.18.0.1:4433")));
    }

    #[test]
    fn mapping_gauge_codes_are_distinct_and_documented() {
        let codes: Vec<u64> = [
            Mapping::Unknown,
            Mapping::NoNat,
            Mapping::EndpointIndependent,
            Mapping::AddressDependent,
            Mapping::AddressAndPortDependent,
        ]
        .into_iter()
        .map(Mapping::code)
        .collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4]);
    }

    fn seen(local: &str, observed: &str) -> Observation {
        Observation {
            observer: a("198.18.0.10:4433"),
            local: a(local),
            observed: a(observed),
            at: Millis(0),
        }
    }

    #[test]
    fn sequential_ports_take_a_step_of_max_step_and_the_most_seen_socket() {
        // Gaps of exactly `max_step` are sequential; one more is not.
        let at_max = [
            seen(LOCAL, "198.18.0.101:1000"),
            seen(LOCAL, "198.18.0.101:1008"),
            seen(LOCAL, "198.18.0.101:1016"),
        ];
        let refs: Vec<&Observation> = at_max.iter().collect();
        assert_eq!(
            sequential_ports(&refs, 8),
            Some((a("198.18.0.101:1016"), 8))
        );
        assert_eq!(sequential_ports(&refs, 7), None);
        // Two local sockets: the one seen at more ports wins, whichever
        // comes first; on a tie the first (lowest local address) stays.
        let two = [
            seen("198.19.1.10:4000", "198.18.0.101:2000"),
            seen("198.19.1.10:4000", "198.18.0.101:2001"),
            seen("198.19.1.10:4000", "198.18.0.101:2002"),
            seen("198.19.1.10:4000", "198.18.0.101:2003"),
            seen("198.19.1.10:5000", "198.18.0.101:3000"),
            seen("198.19.1.10:5000", "198.18.0.101:3002"),
            seen("198.19.1.10:5000", "198.18.0.101:3004"),
        ];
        let refs: Vec<&Observation> = two.iter().collect();
        assert_eq!(
            sequential_ports(&refs, 8),
            Some((a("198.18.0.101:2003"), 1))
        );
        let refs: Vec<&Observation> = two.iter().rev().collect();
        assert_eq!(
            sequential_ports(&refs, 8),
            Some((a("198.18.0.101:2003"), 1))
        );
        let refs: Vec<&Observation> = two[1..].iter().collect();
        assert_eq!(
            sequential_ports(&refs, 8),
            Some((a("198.18.0.101:2003"), 1))
        );
    }

    #[test]
    fn predicted_ports_are_steps_apart_and_stop_at_65535() {
        assert_eq!(
            predicted(a("198.18.0.101:1000"), 3, 3),
            vec![
                a("198.18.0.101:1003"),
                a("198.18.0.101:1006"),
                a("198.18.0.101:1009")
            ]
        );
        assert_eq!(
            predicted(a("198.18.0.101:65530"), 4, 4),
            vec![a("198.18.0.101:65534")]
        );
    }

    #[test]
    fn nothing_observed_is_unknown() {
        let o = Observations::new(NatLimits::default());
        let r = o.classify();
        assert_eq!(r.mapping, Mapping::Unknown);
        assert_eq!(r.behind_nat, None);
        assert_eq!(r.port_preserved, None);
        assert!(r.reflexive.is_empty());
    }

    #[test]
    fn untranslated_observations_mean_no_nat() {
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", LOCAL, 0);
        let r = o.classify();
        assert_eq!(r.mapping, Mapping::NoNat);
        assert_eq!(r.behind_nat, Some(false));
        assert_eq!(r.port_preserved, None);
        // An IPv4-mapped IPv6 form of the local address is the same address.
        let mut o = Observations::new(NatLimits::default());
        o.record(
            a("198.18.0.10:4433"),
            a(LOCAL),
            a("[::ffff:198.19.1.10]:4433"),
            Millis(0),
        );
        assert_eq!(o.classify().mapping, Mapping::NoNat);
    }

    #[test]
    fn one_observer_cannot_tell_the_mapping() {
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:4433", 0);
        let r = o.classify();
        assert_eq!(r.mapping, Mapping::Unknown);
        assert_eq!(r.behind_nat, Some(true));
        assert_eq!(r.port_preserved, Some(true));
        assert_eq!(r.reflexive, vec![a("198.18.0.101:4433")]);
    }

    #[test]
    fn agreeing_observers_at_two_ips_mean_endpoint_independent() {
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:4433", 0);
        obs(&mut o, "198.18.0.11:5000", "198.18.0.101:4433", 1);
        // A LAN peer sees the local address: it does not count.
        obs(&mut o, "198.19.1.11:4433", LOCAL, 2);
        let r = o.classify();
        assert_eq!(r.mapping, Mapping::EndpointIndependent);
        assert_eq!(r.port_preserved, Some(true));
        assert_eq!(r.observers, 3);
    }

    #[test]
    fn ports_differing_by_observer_ip_mean_address_dependent() {
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:30000", 0);
        obs(&mut o, "198.18.0.10:5000", "198.18.0.101:30000", 1);
        obs(&mut o, "198.18.0.11:4433", "198.18.0.101:30001", 2);
        let r = o.classify();
        assert_eq!(r.mapping, Mapping::AddressDependent);
        assert_eq!(r.port_preserved, Some(false));
        assert_eq!(
            r.reflexive,
            vec![a("198.18.0.101:30000"), a("198.18.0.101:30001")]
        );
    }

    #[test]
    fn ports_differing_at_one_observer_ip_mean_address_and_port_dependent() {
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:30000", 0);
        obs(&mut o, "198.18.0.10:5000", "198.18.0.101:30001", 1);
        assert_eq!(o.classify().mapping, Mapping::AddressAndPortDependent);
    }

    #[test]
    fn an_address_change_starts_over() {
        let mut o = Observations::new(NatLimits::default());
        assert_eq!(
            obs(&mut o, "198.18.0.10:4433", "198.18.0.101:4433", 0),
            Recorded::New
        );
        obs(&mut o, "198.18.0.11:4433", "198.18.0.101:4433", 0);
        assert_eq!(
            obs(&mut o, "198.18.0.10:4433", "198.18.0.101:4433", 5),
            Recorded::Confirmed
        );
        assert_eq!(
            obs(&mut o, "198.18.0.10:4433", "198.18.0.101:4444", 6),
            Recorded::Remapped
        );
        assert_eq!(o.entries().len(), 2);
        assert_eq!(
            obs(&mut o, "198.18.0.10:4433", "198.18.0.102:4433", 7),
            Recorded::AddressChanged
        );
        assert_eq!(o.entries().len(), 1);
        assert_eq!(o.classify().reflexive, vec![a("198.18.0.102:4433")]);
    }

    #[test]
    fn observations_expire_and_are_bounded() {
        let limits = NatLimits {
            max_observations: 2,
            observation_ttl: Millis(100),
            ..NatLimits::default()
        };
        let mut o = Observations::new(limits);
        obs(&mut o, "198.18.0.10:1", "198.18.0.101:1", 0);
        obs(&mut o, "198.18.0.11:1", "198.18.0.101:1", 10);
        obs(&mut o, "198.18.0.12:1", "198.18.0.101:1", 20);
        let observers: Vec<_> = o.entries().iter().map(|e| e.observer).collect();
        assert_eq!(observers, vec![a("198.18.0.11:1"), a("198.18.0.12:1")]);
        o.expire(Millis(110));
        assert_eq!(o.entries().len(), 1);
        o.expire(Millis(120));
        assert!(o.entries().is_empty());
    }

    #[test]
    fn filtering_needs_preserved_ports() {
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:4433", 0);
        let r = o.classify();
        assert_eq!(filtering(&r, None), Filtering::Unknown);
        assert_eq!(
            filtering(&r, Some(true)),
            Filtering::EndpointOrAddressDependent
        );
        assert_eq!(
            filtering(&r, Some(false)),
            Filtering::AddressAndPortDependent
        );
        obs(&mut o, "198.18.0.11:4433", "198.18.0.101:5000", 1);
        assert_eq!(filtering(&o.classify(), Some(false)), Filtering::Unknown);
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", LOCAL, 0);
        assert_eq!(filtering(&o.classify(), Some(true)), Filtering::NoNat);
    }

    #[test]
    fn punchable_pairs() {
        use Filtering as F;
        use Mapping as M;
        let full = (M::EndpointIndependent, F::EndpointOrAddressDependent);
        let port_restricted = (M::EndpointIndependent, F::AddressAndPortDependent);
        let symmetric = (M::AddressAndPortDependent, F::AddressAndPortDependent);
        assert!(punchable(full, full));
        assert!(punchable(port_restricted, port_restricted));
        assert!(punchable(full, symmetric));
        assert!(!punchable(port_restricted, symmetric));
        assert!(!punchable(symmetric, symmetric));
        assert!(punchable((M::NoNat, F::NoNat), symmetric));
    }

    #[test]
    fn punch_decisions_and_schedule() {
        use Filtering as F;
        use Mapping as M;
        // Nothing known: try.
        let unknown = (M::Unknown, F::Unknown);
        assert!(should_punch(unknown, unknown));
        // Port-restricted cone against a symmetric NAT, either side: skip.
        let pr = (M::EndpointIndependent, F::AddressAndPortDependent);
        let sym = (M::AddressAndPortDependent, F::Unknown);
        assert!(!should_punch(pr, sym));
        assert!(!should_punch(sym, pr));
        assert!(!should_punch(sym, (M::AddressDependent, F::Unknown)));
        assert!(should_punch(sym, unknown));
        // A restricted cone against a symmetric NAT works.
        assert!(should_punch(
            sym,
            (M::EndpointIndependent, F::EndpointOrAddressDependent)
        ));
        for f in [
            F::Unknown,
            F::NoNat,
            F::EndpointOrAddressDependent,
            F::AddressAndPortDependent,
        ] {
            assert_eq!(filtering_named(f.name()), f);
        }
        for m in [
            M::Unknown,
            M::NoNat,
            M::EndpointIndependent,
            M::AddressDependent,
            M::AddressAndPortDependent,
        ] {
            assert_eq!(mapping_named(m.name()), m);
        }
        assert_eq!(mapping_named("something new"), M::Unknown);
        assert_eq!(round_delay(0, Millis(500)), Millis(0));
        assert_eq!(round_delay(1, Millis(500)), Millis(500));
        assert_eq!(round_delay(3, Millis(500)), Millis(2000));
        assert_eq!(round_delay(u32::MAX, Millis(u64::MAX)), Millis(u64::MAX));
        assert_eq!(dial_delay(Millis(41)), Millis(20));
    }

    #[test]
    fn candidates_are_reflexive_first_then_listen_addresses() {
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:4433", 0);
        let r = o.classify();
        let listen = vec![
            LOCAL.to_string(),
            "0.0.0.0:4433".to_string(),
            "198.18.0.101:4433".to_string(),
        ];
        assert_eq!(
            candidates(&r, &listen, 8),
            vec!["198.18.0.101:4433".to_string(), LOCAL.to_string()]
        );
        assert_eq!(candidates(&r, &listen, 1).len(), 1);
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        (0u8..4, 0u16..4)
            .prop_map(|(h, p)| SocketAddr::new(IpAddr::from([198, 18, 0, 10 + h]), 4000 + p))
    }

    #[test]
    fn a_sequential_symmetric_nat_predicts_its_next_ports() {
        let mut o = Observations::new(NatLimits::default());
        // Three observers, two at one IP: a port per destination, handed
        // out in order (two apart: another flow took one between).
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:40001", 0);
        obs(&mut o, "198.18.0.10:4434", "198.18.0.101:40002", 1);
        obs(&mut o, "198.18.0.11:4433", "198.18.0.101:40004", 2);
        let r = o.classify();
        assert_eq!(r.mapping, Mapping::AddressAndPortDependent);
        assert_eq!(
            r.predicted,
            vec![
                a("198.18.0.101:40005"),
                a("198.18.0.101:40006"),
                a("198.18.0.101:40007"),
                a("198.18.0.101:40008"),
            ]
        );
        // They come first among the candidates, within the limit.
        let c = candidates(&r, &[LOCAL.to_string()], 8);
        assert_eq!(c[0], "198.18.0.101:40005");
        assert_eq!(c.len(), 8);
        assert_eq!(c[7], LOCAL);
        // Such a node punches towards port-restricted filtering; without
        // prediction it does not.
        let mine = (r.mapping, Filtering::Unknown);
        let theirs = (
            Mapping::EndpointIndependent,
            Filtering::AddressAndPortDependent,
        );
        assert!(!should_punch(mine, theirs));
        assert!(should_punch_predicted(mine, theirs, (true, false)));
        assert!(!should_punch_predicted(mine, theirs, (false, false)));
        // The other way round: the answer says the peer is predictable.
        assert!(should_punch_predicted(theirs, mine, (false, true)));
        // Two symmetric NATs filtering by port: only when both are
        // predictable.
        let strict = (
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
        );
        assert!(!should_punch_predicted(strict, strict, (true, false)));
        assert!(should_punch_predicted(strict, strict, (true, true)));
        // A predictable symmetric NAT (filtering unknown: ports not
        // preserved) and an unpredictable one: not tried, either way.
        let unknown = (Mapping::AddressAndPortDependent, Filtering::Unknown);
        assert!(!should_punch_predicted(unknown, unknown, (true, false)));
        assert!(!should_punch_predicted(unknown, unknown, (false, true)));
        assert!(should_punch_predicted(unknown, unknown, (true, true)));
        // Against a full cone it still is.
        let full = (
            Mapping::EndpointIndependent,
            Filtering::EndpointOrAddressDependent,
        );
        assert!(should_punch_predicted(unknown, full, (true, false)));
    }

    #[test]
    fn random_preserved_or_too_few_ports_predict_nothing() {
        // Spread at random (masquerade fully-random).
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:40001", 0);
        obs(&mut o, "198.18.0.10:4434", "198.18.0.101:51377", 1);
        obs(&mut o, "198.18.0.11:4433", "198.18.0.101:33012", 2);
        let r = o.classify();
        assert_eq!(r.mapping, Mapping::AddressAndPortDependent);
        assert!(r.predicted.is_empty());
        // Two ports only.
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:40001", 0);
        obs(&mut o, "198.18.0.10:4434", "198.18.0.101:40002", 1);
        assert!(o.classify().predicted.is_empty());
        // Endpoint-independent: one mapping, nothing to predict.
        let mut o = Observations::new(NatLimits::default());
        obs(&mut o, "198.18.0.10:4433", "198.18.0.101:4433", 0);
        obs(&mut o, "198.18.0.11:4433", "198.18.0.101:4433", 1);
        assert!(o.classify().predicted.is_empty());
        // No port past 65535.
        assert_eq!(
            predicted(a("198.18.0.101:65534"), 1, 4),
            vec![a("198.18.0.101:65535")]
        );
    }

    proptest! {
        /// Prediction is bounded (at most the window, each after the
        /// highest port seen, in order, at the mapping's IP) and only ever
        /// for a symmetric mapping whose ports never jump by more than the
        /// step limit.
        #[test]
        fn prediction_is_bounded_and_only_for_sequential_symmetric_nats(
            ports in proptest::collection::vec(1024u16..65535, 0..10),
        ) {
            let mut o = Observations::new(NatLimits::default());
            for (i, p) in ports.iter().enumerate() {
                let observer = format!("198.18.0.{}:{}", 10 + i % 2, 4433 + i);
                obs(&mut o, &observer, &format!("198.18.0.101:{p}"), i as u64);
            }
            let r = o.classify();
            prop_assert!(r.predicted.len() <= PREDICT_WINDOW);
            if !r.predicted.is_empty() {
                prop_assert!(matches!(r.mapping, Mapping::AddressDependent | Mapping::AddressAndPortDependent));
                let mut seen: Vec<u16> = ports.clone();
                seen.sort_unstable();
                seen.dedup();
                prop_assert!(seen.len() >= PREDICT_MIN_PORTS);
                prop_assert!(seen.windows(2).all(|w| w[1] - w[0] <= PREDICT_MAX_STEP));
                let top = *seen.last().unwrap();
                let mut prev = top;
                for p in &r.predicted {
                    prop_assert_eq!(p.ip(), a("198.18.0.101:1").ip());
                    prop_assert!(p.port() > prev && p.port() - prev <= PREDICT_MAX_STEP);
                    prev = p.port();
                }
            }
        }
    }

    proptest! {
        /// The set stays bounded, one entry per observer; classification
        /// does not depend on the order observers were first seen when no
        /// observer is seen twice, and an endpoint-independent verdict
        /// always has one reflexive address.
        #[test]
        fn classification_invariants(
            steps in proptest::collection::vec((arb_addr(), arb_addr(), 0u64..50), 0..40),
            max in 1usize..8,
        ) {
            let limits = NatLimits { max_observations: max, observation_ttl: Millis(1_000), ..NatLimits::default() };
            let mut o = Observations::new(limits);
            let mut now = 0;
            for (observer, observed, dt) in &steps {
                now += dt;
                o.record(*observer, a(LOCAL), *observed, Millis(now));
                prop_assert!(o.entries().len() <= max);
                let mut seen: Vec<_> = o.entries().iter().map(|e| e.observer).collect();
                seen.sort();
                seen.dedup();
                prop_assert_eq!(seen.len(), o.entries().len());
                let r = o.classify();
                if r.mapping == Mapping::EndpointIndependent {
                    prop_assert_eq!(r.reflexive.len(), 1);
                }
                if r.reflexive.len() == 1 && r.mapping != Mapping::Unknown {
                    prop_assert_eq!(r.mapping, Mapping::EndpointIndependent);
                }
            }
            // Distinct observers only, recorded at one instant, in reverse.
            let mut distinct = Vec::new();
            for (observer, observed, _) in &steps {
                if !distinct.iter().any(|(o, _): &(SocketAddr, SocketAddr)| o == observer) {
                    distinct.push((*observer, *observed));
                }
            }
            let big = NatLimits { max_observations: 64, observation_ttl: Millis(1_000), ..NatLimits::default() };
            let (mut x, mut y) = (Observations::new(big), Observations::new(big));
            for (ob, seen) in &distinct {
                x.record(*ob, a(LOCAL), *seen, Millis(0));
            }
            for (ob, seen) in distinct.iter().rev() {
                y.record(*ob, a(LOCAL), *seen, Millis(0));
            }
            // An IP change clears the set, so only compare when all
            // observed IPs agree.
            if distinct.iter().all(|(_, s)| s.ip() == distinct[0].1.ip()) {
                prop_assert_eq!(x.classify(), y.classify());
            }
        }
    }
}
