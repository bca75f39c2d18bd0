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

mod lifecycle {
    //! Random interleavings of calls, time, answers (right and wrong),
    //! link failures, probes and drops against one node's core.

    use macula_rpc::{
        Action, BreakerState, CallId, CallSpec, Config, Millis, ProviderInfo, Role, RpcCore,
        Started, Strategy as Pick,
    };
    use macula_wire::rpc::{CallError, RpcErrorKind};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Ev {
        Start {
            timeout: u64,
            retries: u32,
            strategy: u8,
            target: Option<u32>,
        },
        Advance(u64),
        Providers {
            call: usize,
            set: Vec<u32>,
        },
        Connected {
            call: usize,
        },
        LinkFailed {
            call: usize,
            lost: bool,
        },
        Answer {
            call: usize,
            kind: u16,
            wrong_from: bool,
            wrong_wire: bool,
        },
        Pong {
            call: usize,
        },
        ProbeFailed {
            call: usize,
        },
        Drop {
            call: usize,
        },
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (
                0u64..3000,
                0u32..4,
                0u8..4,
                prop::option::weighted(0.1, 1u32..5)
            )
                .prop_map(|(timeout, retries, strategy, target)| Ev::Start {
                    timeout,
                    retries,
                    strategy,
                    target
                }),
            (0u64..700).prop_map(Ev::Advance),
            (0usize..8, prop::collection::vec(0u32..6, 0..5))
                .prop_map(|(call, set)| Ev::Providers { call, set }),
            (0usize..8).prop_map(|call| Ev::Connected { call }),
            (0usize..8, any::<bool>()).prop_map(|(call, lost)| Ev::LinkFailed { call, lost }),
            (
                0usize..8,
                0u16..11,
                prop::bool::weighted(0.2),
                prop::bool::weighted(0.2)
            )
                .prop_map(|(call, kind, wrong_from, wrong_wire)| Ev::Answer {
                    call,
                    kind,
                    wrong_from,
                    wrong_wire
                }),
            (0usize..8).prop_map(|call| Ev::Pong { call }),
            (0usize..8).prop_map(|call| Ev::ProbeFailed { call }),
            (0usize..8).prop_map(|call| Ev::Drop { call }),
        ]
    }

    /// What the test knows of one live call.
    #[derive(Debug)]
    struct Live {
        id: CallId,
        deadline: Millis,
        mesh: bool,
        tried: Vec<u32>,
        connecting: Option<u32>,
        /// The CALL out and not yet resolved: (provider, wire ID).
        out: Option<(u32, u64)>,
    }

    fn info(node: u32) -> ProviderInfo<u32> {
        ProviderInfo {
            node,
            weight: node,
            metadata: Vec::new(),
            addrs: Vec::new(),
            seq: 0,
        }
    }

    /// Polls every live call at `now`, checking each action.
    fn drain(
        c: &mut RpcCore<u32, ()>,
        live: &mut Vec<Live>,
        now: Millis,
    ) -> Result<(), TestCaseError> {
        let mut i = 0;
        while i < live.len() {
            let mut finished = false;
            while let Some(a) = c.poll_call(live[i].id, now) {
                let l = &mut live[i];
                match a {
                    Action::Connect { provider, .. } => {
                        // Never an excluded provider, never an open breaker.
                        if l.mesh {
                            prop_assert!(
                                !l.tried.contains(&provider),
                                "{provider} tried again: {l:?}"
                            );
                        }
                        prop_assert_ne!(
                            c.balancer().breaker_state(&provider, now),
                            BreakerState::Open
                        );
                        prop_assert!(now < l.deadline);
                        l.tried.push(provider);
                        l.connecting = Some(provider);
                    }
                    Action::Send {
                        provider,
                        wire_id,
                        timeout_ms,
                        ..
                    } => {
                        prop_assert_eq!(l.connecting.take(), Some(provider));
                        prop_assert!(l.out.is_none());
                        prop_assert_eq!(u64::from(timeout_ms), l.deadline.saturating_sub(now).0);
                        l.out = Some((provider, wire_id));
                    }
                    Action::Close { .. }
                    | Action::Cancel { .. }
                    | Action::Retrying { .. }
                    | Action::Resending { .. } => {
                        l.out = None;
                        l.connecting = None;
                    }
                    Action::Done(r) => {
                        if r.is_ok() {
                            prop_assert!(now < l.deadline, "answered at {now} past {}", l.deadline);
                        }
                        finished = true;
                        break;
                    }
                    Action::Probe { .. } | Action::Lookup { .. } => {}
                    other => prop_assert!(false, "a node's mesh call never asks for {other:?}"),
                }
            }
            if finished {
                live.remove(i);
            } else {
                // A call never outlives its deadline.
                prop_assert!(now < live[i].deadline, "{:?} alive at {now}", live[i]);
                prop_assert!(c
                    .poll_timeout(live[i].id)
                    .is_some_and(|t| t <= live[i].deadline));
                i += 1;
            }
        }
        prop_assert_eq!(c.inflight(), live.len());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn calls_keep_their_invariants(seed in any::<u64>(), evs in prop::collection::vec(ev(), 1..120)) {
            let cfg = Config { max_inflight_calls: 6, ..Config::default() };
            let mut c: RpcCore<u32, ()> = RpcCore::new(0, Role::Node, cfg, seed);
            let mut live: Vec<Live> = Vec::new();
            let mut now = Millis(0);
            for e in evs {
                let pick = |live: &Vec<Live>, k: usize| (!live.is_empty()).then(|| k % live.len());
                match e {
                    Ev::Start { timeout, retries, strategy, target } => {
                        let strategy = [Pick::RoundRobin, Pick::Random, Pick::LeastLatency, Pick::Weighted][strategy as usize];
                        let spec = CallSpec { procedure: "p".into(), timeout: Millis(timeout), retries, strategy, target };
                        match c.start_call(now, spec) {
                            Ok(Started::Remote(id)) => live.push(Live {
                                id,
                                deadline: now.saturating_add(Millis(timeout)),
                                mesh: target.is_none(),
                                tried: Vec::new(),
                                connecting: None,
                                out: None,
                            }),
                            Ok(Started::Local { .. }) => prop_assert!(false, "nothing is served here"),
                            Err(_) => prop_assert!(live.len() >= 6 || target == Some(0)),
                        }
                    }
                    Ev::Advance(d) => now = now.saturating_add(Millis(d)),
                    Ev::Providers { call, set } => if let Some(i) = pick(&live, call) {
                        c.handle_providers(live[i].id, now, Ok(set.into_iter().map(info).collect()));
                    },
                    Ev::Connected { call } => if let Some(i) = pick(&live, call) {
                        c.handle_connected(live[i].id, now);
                    },
                    Ev::LinkFailed { call, lost } => if let Some(i) = pick(&live, call) {
                        c.handle_link_failed(live[i].id, now, "x".into(), lost);
                        if live[i].out.is_some() || live[i].connecting.is_some() {
                            live[i].out = None;
                            live[i].connecting = None;
                        }
                    },
                    Ev::Answer { call, kind, wrong_from, wrong_wire } => if let Some(i) = pick(&live, call) {
                        let Some((p, w)) = live[i].out.or(Some((1, 1))) else { continue };
                        let from = if wrong_from { p + 100 } else { p };
                        let wire = if wrong_wire { w + 1000 } else { w };
                        let answer = match kind {
                            0 => Ok(b"ok".to_vec()),
                            k => Err(CallError { id: wire, kind: RpcErrorKind::from(k), code: 0, message: "e".into() }),
                        };
                        let got = c.handle_answer(now, &from, wire, answer);
                        // Never answers the wrong call: exactly the call whose
                        // CALL out is (from, wire), or nothing.
                        let owner = live.iter().position(|l| l.out == Some((from, wire)));
                        prop_assert_eq!(got, owner.map(|j| live[j].id));
                        if let Some(j) = owner {
                            live[j].out = None;
                        }
                    },
                    Ev::Pong { call } => if let Some(i) = pick(&live, call) {
                        if let Some((_, w)) = live[i].out {
                            c.handle_pong(live[i].id, now, w);
                        }
                    },
                    Ev::ProbeFailed { call } => if let Some(i) = pick(&live, call) {
                        if let Some((_, w)) = live[i].out {
                            c.handle_probe_failed(live[i].id, now, w, "dead".into());
                        }
                    },
                    Ev::Drop { call } => if let Some(i) = pick(&live, call) {
                        let l = live.remove(i);
                        let cancel = c.drop_call(l.id, now);
                        match l.out {
                            Some((p, w)) => prop_assert_eq!(cancel, Some(Action::Cancel { provider: p, wire_id: w })),
                            None => prop_assert_eq!(cancel, None),
                        }
                    },
                }
                drain(&mut c, &mut live, now)?;
                prop_assert_eq!(c.n_pending(), live.iter().filter(|l| l.out.is_some()).count());
            }
        }
    }
}
