//! Property tests: breaker laws and balancer choice invariants.

use macula_rpc::{
    Balancer, BalancerLimits, Breaker, BreakerConfig, BreakerState, Millis, Outcome,
    Strategy as Pick,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Success,
    Failure,
    Abandon,
    Advance(u64),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Acquire),
        Just(Op::Success),
        Just(Op::Failure),
        Just(Op::Abandon),
        (0u64..3000).prop_map(Op::Advance),
    ]
}

fn strategy() -> impl proptest::strategy::Strategy<Value = Pick> {
    prop_oneof![
        Just(Pick::RoundRobin),
        Just(Pick::Random),
        Just(Pick::LeastLatency),
        Just(Pick::Weighted),
    ]
}

proptest! {
    /// An open breaker never lets a call through before its period ends;
    /// a half-open one lets exactly one through until an outcome arrives;
    /// success always closes.
    #[test]
    fn breaker_laws(ops in proptest::collection::vec(op(), 0..200), threshold in 1u32..6) {
        let cfg = BreakerConfig { failure_threshold: threshold, open_for: Millis(500), max_open_for: Millis(4000) };
        let mut b = Breaker::new(cfg);
        let mut now = Millis(0);
        let mut probe_out = false;
        for op in ops {
            match op {
                Op::Acquire => {
                    let before = b.state(now);
                    let ok = b.acquire(now);
                    match before {
                        BreakerState::Closed => prop_assert!(ok),
                        BreakerState::Open => prop_assert!(!ok),
                        BreakerState::HalfOpen => {
                            prop_assert_eq!(ok, !probe_out);
                            if ok { probe_out = true; }
                        }
                    }
                }
                Op::Success => { b.on_success(); probe_out = false; prop_assert_eq!(b.state(now), BreakerState::Closed); }
                Op::Failure => {
                    let was = b.state(now);
                    b.on_failure(now);
                    probe_out = false;
                    if was != BreakerState::Closed {
                        prop_assert_eq!(b.state(now), BreakerState::Open);
                    }
                }
                Op::Abandon => { b.on_abandon(); probe_out = false; }
                Op::Advance(d) => now = now.saturating_add(Millis(d)),
            }
            prop_assert_eq!(b.available(now), b.state(now) == BreakerState::Closed || (b.state(now) == BreakerState::HalfOpen && !probe_out));
        }
    }

    /// `pick` returns a candidate, never an excluded one, never one whose
    /// breaker is open; and None only when nothing is usable.
    #[test]
    fn pick_only_returns_usable_candidates(
        cands in proptest::collection::vec((0u32..20, 0u32..5), 0..10),
        exclude in proptest::collection::vec(0u32..20, 0..5),
        failures in proptest::collection::vec(0u32..20, 0..30),
        strat in strategy(),
        seed in any::<u64>(),
    ) {
        let mut b: Balancer<u32> = Balancer::new(BreakerConfig::default(), BalancerLimits::default(), seed);
        for f in &failures {
            b.record(f, Outcome::Failure, Millis(0));
        }
        let usable: Vec<u32> = cands.iter().map(|c| c.0)
            .filter(|k| !exclude.contains(k) && b.breaker_state(k, Millis(10)) != BreakerState::Open)
            .collect();
        match b.pick("p", strat, &cands, &exclude, Millis(10)) {
            Some(k) => prop_assert!(usable.contains(&k)),
            None => prop_assert!(usable.is_empty()),
        }
    }
}
