//! The hole-punching pair matrix in the simulator (issue 22): every
//! ordered pair of NAT kinds, 20 attempts each, with the runtime's
//! decisions (`macula-nat`). Pairs punchable in principle (one side with
//! endpoint-independent mapping, the other not symmetric against
//! port-restricted filtering; a symmetric NAT with sequential ports
//! counts as endpoint-independent through port prediction) end direct in
//! every attempt; the others are judged unpunchable without dialing and
//! stay on the relay. Every assertion message carries the seed
//! (`MACULA_SIM_SEED` replaces it).

use macula_sim::nat::NatKind;
use macula_sim::punch::{run, Outcome, Scenario};
use macula_sim::Millis;

fn seed() -> u64 {
    std::env::var("MACULA_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// The expected result, written out (not derived from `macula-nat`).
fn punchable(a: NatKind, b: NatKind) -> bool {
    use NatKind::*;
    !matches!(
        (a, b),
        (Symmetric, Symmetric)
            | (Symmetric, PortRestricted)
            | (PortRestricted, Symmetric)
            | (Symmetric, SymmetricSequential)
            | (SymmetricSequential, Symmetric)
    )
}

#[test]
fn every_punchable_pair_goes_direct_and_the_others_stay_relayed() {
    let seed = seed();
    let report = run(&Scenario::new(seed));
    println!("{report}");
    let ctx = format!("replay with MACULA_SIM_SEED={seed}:\n{report}");
    assert_eq!(report.pairs.len(), 36, "{ctx}");
    let (mut punched, mut first) = (0, 0);
    for p in &report.pairs {
        let n = p.outcomes.len();
        assert_eq!(n, 20, "{ctx}");
        if punchable(p.initiator, p.responder) {
            assert_eq!(
                p.direct(),
                n,
                "{:?} -> {:?} must always go direct: {:?}\n{ctx}",
                p.initiator,
                p.responder,
                p.outcomes
            );
            punched += n;
            first += p.first_round();
        } else {
            assert!(
                p.outcomes.iter().all(|o| *o == Outcome::Unpunchable),
                "{:?} -> {:?} must be judged unpunchable: {:?}\n{ctx}",
                p.initiator,
                p.responder,
                p.outcomes
            );
        }
    }
    // The target: >= 97% on the first attempt.
    assert!(
        first * 100 >= punched * 97,
        "first round {first} of {punched}\n{ctx}"
    );
    // Time to direct: within the first round's wait, but for the few
    // attempts whose packets were lost.
    for p in report.pairs.iter().filter(|p| p.direct() > 0) {
        assert!(
            p.time_to_direct().median < Millis::from_secs(1).0,
            "{:?} -> {:?}\n{ctx}",
            p.initiator,
            p.responder
        );
    }
}

#[test]
fn without_loss_every_punchable_pair_is_direct_in_its_first_round() {
    let seed = seed();
    let mut s = Scenario::new(seed);
    s.loss = 0.0;
    let report = run(&s);
    let ctx = format!("replay with MACULA_SIM_SEED={seed}:\n{report}");
    for p in &report.pairs {
        if punchable(p.initiator, p.responder) {
            assert_eq!(p.first_round(), p.outcomes.len(), "{ctx}");
        }
    }
}

#[test]
fn a_failed_round_is_retried_within_the_attempt() {
    // Half the direct packets lost: rounds fail, and the attempt's later
    // rounds (new dials from both sides) still get most pairs through.
    let seed = seed();
    let mut s = Scenario::new(seed);
    s.loss = 0.5;
    let report = run(&s);
    println!("{report}");
    let ctx = format!("replay with MACULA_SIM_SEED={seed}:\n{report}");
    let later = report
        .pairs
        .iter()
        .flat_map(|p| p.outcomes.iter())
        .filter(|o| matches!(o, Outcome::Direct { rounds, .. } if *rounds > 1))
        .count();
    assert!(later > 0, "no attempt went direct after round 1\n{ctx}");
}

#[test]
fn a_run_replays_exactly_from_its_seed() {
    let s = Scenario::new(seed());
    assert_eq!(run(&s), run(&s));
    let mut other = s.clone();
    other.seed += 1;
    assert_ne!(run(&s), run(&other));
}

#[test]
fn on_near_zero_latency_links_a_dropped_first_packet_is_resent_within_the_round() {
    // As in the namespace harness: links of 0-1 ms, so which side's first
    // packet leaves first is chance. A symmetric initiator's first packet
    // to a restricted cone that has not sent to it yet is dropped, and
    // QUIC's resend 1 s later gets through: within the round, since a
    // round waits at least `punch::MIN_ROUND_WAIT` (1.2 s).
    let seed = seed();
    let mut s = Scenario::new(seed);
    s.link = (Millis(0), Millis(1));
    s.jitter = Millis(2);
    s.loss = 0.0;
    let report = run(&s);
    println!("{report}");
    let ctx = format!("replay with MACULA_SIM_SEED={seed}:\n{report}");
    let p = report
        .pair(NatKind::Symmetric, NatKind::RestrictedCone)
        .expect("pair");
    assert!(
        p.outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Direct { rounds: 1, after } if *after >= Millis(1_000))),
        "no first packet needed its resend: {:?}\n{ctx}",
        p.outcomes
    );
    for p in &report.pairs {
        if punchable(p.initiator, p.responder) {
            assert_eq!(p.first_round(), p.outcomes.len(), "{ctx}");
        }
    }
}
