//! One hole-punching round's decisions, pure (time as an argument): what
//! the initiator does with the other side's HOLE_PUNCH answer
//! ([`on_answer`]), which of the other's candidates it dials
//! ([`dial_targets`]), when the next round starts ([`round_delay`],
//! [`round_wait`]). The runtime's `punch.rs` sends, sleeps and dials as
//! these say; `macula-sim`'s pair matrix runs them over simulated NAT
//! boxes.

use std::net::SocketAddr;

use macula_wire::time::Millis;

use crate::{dial_delay, is_tunnel_addr, should_punch_predicted, Filtering, Mapping};

/// A side of a hole-punching pair as its HOLE_PUNCH describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub mapping: Mapping,
    pub filtering: Filtering,
    /// Its symmetric mapping hands ports out in order (it offers its
    /// predicted next ports first among its candidates).
    pub predicted: bool,
}

/// What the initiator does once the answer of a round came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The pair cannot go direct (`should_punch_predicted`): the attempt
    /// ends `unpunchable`, the relay stays.
    Unpunchable,
    /// The other side offered nothing to dial: `no_candidates`.
    NoCandidates,
    /// Send HOLE_PUNCH_SYNC, then dial the other's candidates `after`
    /// (half the measured round trip: the other dials when the sync
    /// arrives, so both first packets leave at about the same time).
    Dial { after: Millis },
}

/// The initiator's step for an answer: `mine` and `theirs` as the two
/// HOLE_PUNCH messages say, `their_candidates` the number of addresses the
/// answer offers that can be dialed ([`dial_targets`]), `rtt` the round
/// trip of the exchange (over the relay).
pub fn on_answer(mine: Side, theirs: Side, their_candidates: usize, rtt: Millis) -> Step {
    if !should_punch_predicted(
        (mine.mapping, mine.filtering),
        (theirs.mapping, theirs.filtering),
        (mine.predicted, theirs.predicted),
    ) {
        return Step::Unpunchable;
    }
    if their_candidates == 0 {
        return Step::NoCandidates;
    }
    Step::Dial {
        after: dial_delay(rtt),
    }
}

/// The candidates of a HOLE_PUNCH worth dialing: those that parse, name
/// an IP (not unspecified) and are not a relayed placeholder
/// ([`is_tunnel_addr`]), at most `max`, in the offered order.
pub fn dial_targets(addrs: &[String], max: usize) -> Vec<SocketAddr> {
    addrs
        .iter()
        .take(max)
        .filter_map(|a| a.parse().ok())
        .filter(|a: &SocketAddr| !a.ip().is_unspecified() && !is_tunnel_addr(a))
        .collect()
}

/// Round trips a round waits for a direct connection after its dials
/// leave, before the next round (whose dials leave anew, from both sides
/// at once) starts: a handshake takes one or two round trips, its first
/// packet lost costs QUIC a probe timeout (about 3 initial RTTs).
pub const ROUND_WAIT_RTTS: u64 = 8;
/// The shortest such wait: past QUIC's first probe timeout (about 1 s:
/// three times quinn's 333 ms initial RTT), so a first packet that
/// arrived before the other side's NAT had sent (dropped there) is sent
/// again within the round.
pub const MIN_ROUND_WAIT: Millis = Millis(1_200);

/// How long a round waits for a direct connection after its dials leave
/// before the next round starts: [`ROUND_WAIT_RTTS`] round trips of the
/// exchange, at least [`MIN_ROUND_WAIT`], at most `round_timeout`
/// (`NatLimits::punch_round_timeout`). A round whose first packets crossed
/// (each dropped by the other's NAT before that NAT had sent) is retried
/// within the attempt, well before the attempt's retry
/// (`punch_retry_after`); the earlier round's dials keep running and still
/// count if they get through.
pub fn round_wait(rtt: Millis, round_timeout: Millis) -> Millis {
    let w = Millis(rtt.0.saturating_mul(ROUND_WAIT_RTTS)).max(MIN_ROUND_WAIT);
    w.min(round_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(mapping: Mapping, filtering: Filtering) -> Side {
        Side {
            mapping,
            filtering,
            predicted: false,
        }
    }

    #[test]
    fn an_answer_decides_the_round() {
        use Filtering as F;
        use Mapping as M;
        let pr = side(M::EndpointIndependent, F::AddressAndPortDependent);
        let sym = side(M::AddressAndPortDependent, F::AddressAndPortDependent);
        assert_eq!(on_answer(pr, sym, 3, Millis(10)), Step::Unpunchable);
        assert_eq!(on_answer(sym, pr, 3, Millis(10)), Step::Unpunchable);
        assert_eq!(on_answer(pr, pr, 0, Millis(10)), Step::NoCandidates);
        assert_eq!(
            on_answer(pr, pr, 2, Millis(41)),
            Step::Dial { after: Millis(20) }
        );
        // A predictable symmetric side counts as endpoint-independent.
        let seq = Side {
            predicted: true,
            ..sym
        };
        assert_eq!(
            on_answer(pr, seq, 1, Millis(0)),
            Step::Dial { after: Millis(0) }
        );
    }

    #[test]
    fn only_dialable_candidates_are_dialed() {
        let offered: Vec<String> = [
            "198.18.1.2:4433",
            "0.0.0.0:4433",
            "[2001:db8::1]:9",
            "not an address",
            "127.0.0.1:4433",
            "198.19.0.1:1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t = dial_targets(&offered, 5);
        let want: Vec<SocketAddr> = vec![
            "198.18.1.2:4433".parse().unwrap(),
            "127.0.0.1:4433".parse().unwrap(),
        ];
        assert_eq!(t, want);
    }

    #[test]
    fn a_round_waits_some_round_trips_within_bounds() {
        let to = Millis(3_000);
        assert_eq!(round_wait(Millis(1), to), MIN_ROUND_WAIT);
        assert_eq!(round_wait(Millis(100), to), MIN_ROUND_WAIT);
        assert_eq!(round_wait(Millis(200), to), Millis(1_600));
        assert_eq!(round_wait(Millis(10_000), to), to);
        assert_eq!(round_wait(Millis(u64::MAX), to), to);
        // Never past the round's own timeout, even a short one.
        assert_eq!(round_wait(Millis(1), Millis(100)), Millis(100));
    }
}
