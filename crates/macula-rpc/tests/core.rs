//! The call lifecycle, serve admission and gateway forwarding of `RpcCore`,
//! step by step on a virtual clock. Node 0 is "us"; providers are 1, 2, 3...

use macula_rpc::{
    Action, Admission, Advert, AdvertiseError, Answer, BreakerState, CallFailure, CallId, CallSpec,
    ClientAd, Config, Millis, ProviderInfo, Role, RpcCore, Started, Strategy,
};
use macula_wire::rpc::{CallError, RpcErrorKind};

type Core = RpcCore<u32, &'static str>;

fn core(role: Role) -> Core {
    RpcCore::new(0, role, Config::default(), 7)
}

fn spec(procedure: &str) -> CallSpec<u32> {
    CallSpec {
        procedure: procedure.to_string(),
        timeout: Millis(5000),
        retries: 2,
        strategy: Strategy::RoundRobin,
        target: None,
    }
}

fn info(node: u32) -> ProviderInfo<u32> {
    ProviderInfo {
        node,
        weight: 1,
        metadata: Vec::new(),
        addrs: vec![format!("127.0.0.{node}:4000")],
        seq: 1,
    }
}

fn remote(started: Result<Started<&'static str>, CallFailure<u32>>) -> CallId {
    match started {
        Ok(Started::Remote(id)) => id,
        other => panic!("expected a remote call, got {other:?}"),
    }
}

/// Every action ready at `now`.
fn drain(c: &mut Core, id: CallId, now: u64) -> Vec<Action<u32>> {
    let mut out = Vec::new();
    while let Some(a) = c.poll_call(id, Millis(now)) {
        let done = matches!(a, Action::Done(_));
        out.push(a);
        if done {
            break;
        }
    }
    out
}

/// The only action ready at `now`.
fn one(c: &mut Core, id: CallId, now: u64) -> Action<u32> {
    let mut v = drain(c, id, now);
    assert_eq!(v.len(), 1, "expected one action, got {v:?}");
    v.remove(0)
}

fn err(kind: RpcErrorKind, message: &str) -> CallError {
    CallError {
        id: 0,
        kind,
        code: 0,
        message: message.to_string(),
    }
}

/// Connects the pending `Connect` and returns the CALL's wire ID.
fn send(c: &mut Core, id: CallId, now: u64) -> u64 {
    c.handle_connected(id, Millis(now));
    match one(c, id, now) {
        Action::Send { wire_id, .. } => wire_id,
        other => panic!("expected Send, got {other:?}"),
    }
}

fn connect_to(a: &Action<u32>) -> u32 {
    match a {
        Action::Connect { provider, .. } => *provider,
        other => panic!("expected Connect, got {other:?}"),
    }
}

/// A mesh call whose lookup found `providers`; returns it and the first
/// provider picked.
fn started(c: &mut Core, providers: &[u32], s: CallSpec<u32>, now: u64) -> (CallId, u32) {
    let id = remote(c.start_call(Millis(now), s));
    let mut first = drain(c, id, now);
    if first
        == vec![Action::Lookup {
            procedure: "p".into(),
        }]
    {
        let found = providers.iter().map(|n| info(*n)).collect();
        c.handle_providers(id, Millis(now), Ok(found));
        first = drain(c, id, now);
    }
    assert_eq!(first.len(), 1, "{first:?}");
    (id, connect_to(&first[0]))
}

#[test]
fn a_cache_miss_looks_up_and_a_hit_does_not_until_the_ttl() {
    let mut c = core(Role::Node);
    let id = remote(c.start_call(Millis(0), spec("p")));
    assert_eq!(
        one(&mut c, id, 0),
        Action::Lookup {
            procedure: "p".into()
        }
    );
    assert_eq!(
        c.poll_call(id, Millis(0)),
        None,
        "nothing until the lookup answers"
    );
    c.handle_providers(id, Millis(10), Ok(vec![info(1)]));
    assert_eq!(
        one(&mut c, id, 10),
        Action::Connect {
            provider: 1,
            addrs: vec!["127.0.0.1:4000".into()]
        }
    );
    c.handle_connected(id, Millis(12));
    assert_eq!(
        one(&mut c, id, 12),
        Action::Send {
            provider: 1,
            wire_id: 1,
            timeout_ms: 4988,
            attempt: 1
        }
    );
    assert_eq!(
        c.handle_answer(Millis(19), &1, 1, Ok(b"hi".to_vec())),
        Some(id)
    );
    assert_eq!(
        one(&mut c, id, 19),
        Action::Done(Ok(Answer {
            payload: b"hi".to_vec(),
            provider: 1,
            attempts: 1
        }))
    );
    assert_eq!(c.poll_call(id, Millis(19)), None, "forgotten after Done");
    assert_eq!(c.inflight(), 0);
    // The attempt's latency (connect to answer) fed the estimate.
    assert_eq!(c.balancer().latency_us(&1), Some(9000));

    // Within the TTL: straight to the provider.
    let (id2, p) = started(&mut c, &[], spec("p"), 5009);
    assert_eq!(p, 1);
    c.drop_call(id2, Millis(5009));
    // At the TTL: a new lookup.
    let id3 = remote(c.start_call(Millis(5010), spec("p")));
    assert_eq!(
        one(&mut c, id3, 5010),
        Action::Lookup {
            procedure: "p".into()
        }
    );
}

#[test]
fn unreachable_fails_over_after_backoff_and_forgets_the_provider() {
    let mut c = core(Role::Node);
    let (id, first) = started(&mut c, &[1, 2], spec("p"), 0);
    c.handle_link_failed(id, Millis(3), "could not connect".into(), false);
    let after = CallFailure::Unreachable {
        tried: vec![first],
        reason: "could not connect".into(),
    };
    assert_eq!(one(&mut c, id, 3), Action::Retrying { after });
    // Backoff before retry 1: 5 ms base, equal jitter: 2..=5 ms.
    let at = c.poll_timeout(id).expect("waiting").0;
    assert!((5..=8).contains(&at), "{at}");
    assert_eq!(c.poll_call(id, Millis(at - 1)), None);
    let second = connect_to(&one(&mut c, id, at));
    assert_ne!(second, first);
    assert_eq!(c.cache().addrs_of("p", &first), Vec::<String>::new());
    assert!(!c.cache().addrs_of("p", &second).is_empty());
    let w = send(&mut c, id, at);
    c.handle_answer(Millis(at + 1), &second, w, Ok(Vec::new()));
    match one(&mut c, id, at + 1) {
        Action::Done(Ok(a)) => assert_eq!((a.provider, a.attempts), (second, 2)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn overloaded_and_not_found_fail_over_handler_errors_do_not() {
    for (kind, retried) in [
        (RpcErrorKind::Overloaded, true),
        (RpcErrorKind::NotFound, true),
        (RpcErrorKind::ShuttingDown, true),
        (RpcErrorKind::Unreachable, true),
        (RpcErrorKind::Handler, false),
        (RpcErrorKind::Panicked, false),
        (RpcErrorKind::Timeout, false),
        (RpcErrorKind::Cancelled, false),
        (RpcErrorKind::NoProviders, false),
        (RpcErrorKind::Invalid, false),
    ] {
        let mut c = core(Role::Node);
        let (id, p) = started(&mut c, &[1, 2], spec("p"), 0);
        let w = send(&mut c, id, 0);
        assert_eq!(
            c.handle_answer(Millis(1), &p, w, Err(err(kind, "no"))),
            Some(id)
        );
        match one(&mut c, id, 1) {
            Action::Retrying { .. } => assert!(retried, "{kind:?} must not be retried"),
            Action::Done(Err(e)) => assert!(!retried, "{kind:?} must be retried, got {e:?}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn retries_are_bounded_and_unreachable_names_every_provider_tried() {
    let mut c = core(Role::Node);
    let s = CallSpec {
        retries: 1,
        ..spec("p")
    };
    let (id, a) = started(&mut c, &[1, 2, 3], s, 0);
    c.handle_link_failed(id, Millis(0), "x".into(), false);
    assert!(matches!(one(&mut c, id, 0), Action::Retrying { .. }));
    let b = connect_to(&one(&mut c, id, 10));
    c.handle_link_failed(id, Millis(10), "y".into(), false);
    assert_eq!(
        one(&mut c, id, 10),
        Action::Done(Err(CallFailure::Unreachable {
            tried: vec![a, b],
            reason: "y".into()
        }))
    );
}

#[test]
fn retries_zero_means_one_attempt() {
    let mut c = core(Role::Node);
    let s = CallSpec {
        retries: 0,
        ..spec("p")
    };
    let (id, p) = started(&mut c, &[1, 2], s, 0);
    let w = send(&mut c, id, 0);
    c.handle_answer(Millis(1), &p, w, Err(err(RpcErrorKind::Overloaded, "busy")));
    assert_eq!(
        one(&mut c, id, 1),
        Action::Done(Err(CallFailure::Overloaded { provider: Some(p) }))
    );
}

#[test]
fn when_every_provider_was_tried_the_last_error_is_returned() {
    let mut c = core(Role::Node);
    let (id, p) = started(&mut c, &[1], spec("p"), 0);
    let w = send(&mut c, id, 0);
    c.handle_answer(Millis(1), &p, w, Err(err(RpcErrorKind::Overloaded, "busy")));
    assert!(matches!(one(&mut c, id, 1), Action::Retrying { .. }));
    assert_eq!(
        one(&mut c, id, 20),
        Action::Done(Err(CallFailure::Overloaded { provider: Some(1) }))
    );
}

#[test]
fn the_deadline_ends_the_call_and_cancels_the_call_out() {
    let mut c = core(Role::Node);
    let s = CallSpec {
        timeout: Millis(200),
        ..spec("p")
    };
    let (id, p) = started(&mut c, &[1], s, 0);
    let w = send(&mut c, id, 0);
    assert_eq!(
        c.poll_timeout(id),
        Some(Millis(200)),
        "deadline before the first probe"
    );
    assert_eq!(c.poll_call(id, Millis(199)), None);
    assert_eq!(
        drain(&mut c, id, 200),
        vec![
            Action::Cancel {
                provider: p,
                wire_id: w
            },
            Action::Done(Err(CallFailure::Timeout))
        ]
    );
    assert_eq!(c.n_pending(), 0);
    assert_eq!(c.inflight(), 0);
    assert_eq!(
        c.handle_answer(Millis(201), &p, w, Ok(Vec::new())),
        None,
        "late"
    );
}

#[test]
fn the_deadline_cuts_a_backoff_short() {
    let mut c = core(Role::Node);
    let s = CallSpec {
        timeout: Millis(4),
        ..spec("p")
    };
    let (id, _) = started(&mut c, &[1, 2], s, 0);
    c.handle_link_failed(id, Millis(3), "x".into(), false);
    assert!(matches!(one(&mut c, id, 3), Action::Retrying { .. }));
    assert_eq!(c.poll_timeout(id), Some(Millis(4)));
    assert_eq!(one(&mut c, id, 4), Action::Done(Err(CallFailure::Timeout)));
}

#[test]
fn an_answer_at_the_deadline_is_too_late() {
    let mut c = core(Role::Node);
    let s = CallSpec {
        timeout: Millis(100),
        ..spec("p")
    };
    let (id, p) = started(&mut c, &[1], s, 0);
    let w = send(&mut c, id, 0);
    assert_eq!(
        c.handle_answer(Millis(100), &p, w, Ok(Vec::new())),
        Some(id)
    );
    assert_eq!(
        one(&mut c, id, 100),
        Action::Done(Err(CallFailure::Timeout))
    );
}

#[test]
fn a_silent_provider_is_probed_and_dropped_when_the_probe_times_out() {
    let mut c = core(Role::Node);
    let (id, p) = started(&mut c, &[1, 2], spec("p"), 0);
    let w = send(&mut c, id, 0);
    assert_eq!(c.poll_timeout(id), Some(Millis(250)));
    assert_eq!(c.poll_call(id, Millis(249)), None);
    assert_eq!(
        one(&mut c, id, 250),
        Action::Probe {
            provider: p,
            wire_id: w
        }
    );
    assert_eq!(c.poll_timeout(id), Some(Millis(1250)));
    // A pong: probe again a second later.
    c.handle_pong(id, Millis(300), w + 1);
    assert_eq!(
        c.poll_timeout(id),
        Some(Millis(1250)),
        "a pong for another attempt is ignored"
    );
    c.handle_pong(id, Millis(300), w);
    assert_eq!(c.poll_timeout(id), Some(Millis(1300)));
    c.handle_pong(id, Millis(400), w);
    assert_eq!(
        c.poll_timeout(id),
        Some(Millis(1300)),
        "no probe out: nothing to answer"
    );
    assert_eq!(
        one(&mut c, id, 1300),
        Action::Probe {
            provider: p,
            wire_id: w
        }
    );
    assert_eq!(c.poll_call(id, Millis(2299)), None);
    let v = drain(&mut c, id, 2300);
    assert_eq!(
        v[0],
        Action::Close {
            provider: p,
            reason: "liveness probe failed".into()
        }
    );
    match &v[1] {
        Action::Retrying {
            after: CallFailure::Unreachable { reason, .. },
        } => assert_eq!(reason, "liveness probe failed: no answer within 1s"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.handle_answer(Millis(2301), &p, w, Ok(Vec::new())), None);
}

#[test]
fn a_failed_probe_fails_the_attempt_at_once() {
    let mut c = core(Role::Node);
    let (id, p) = started(&mut c, &[1, 2], spec("p"), 0);
    let w = send(&mut c, id, 0);
    assert!(matches!(one(&mut c, id, 250), Action::Probe { .. }));
    c.handle_probe_failed(id, Millis(260), w + 1, "stale".into());
    assert_eq!(
        c.poll_call(id, Millis(260)),
        None,
        "another attempt's probe"
    );
    c.handle_probe_failed(id, Millis(260), w, "closed".into());
    let v = drain(&mut c, id, 260);
    assert!(matches!(v[0], Action::Close { provider, .. } if provider == p));
    assert!(matches!(v[1], Action::Retrying { .. }));
}

#[test]
fn dropping_a_call_cancels_it_and_frees_a_half_open_probe() {
    let mut c = core(Role::Node);
    // Open provider 1's breaker, then let the open period pass.
    for _ in 0..5 {
        let (id, p) = started(
            &mut c,
            &[1],
            CallSpec {
                retries: 0,
                ..spec("p")
            },
            0,
        );
        assert_eq!(p, 1);
        let w = send(&mut c, id, 0);
        c.handle_answer(Millis(0), &1, w, Err(err(RpcErrorKind::Overloaded, "busy")));
        assert!(matches!(one(&mut c, id, 0), Action::Done(Err(_))));
    }
    assert_eq!(
        c.balancer().breaker_state(&1, Millis(0)),
        BreakerState::Open
    );
    let s = CallSpec {
        retries: 0,
        ..spec("p")
    };
    let id = remote(c.start_call(Millis(10), s.clone()));
    assert!(matches!(
        one(&mut c, id, 10),
        Action::Done(Err(CallFailure::Unreachable { ref reason, .. })) if reason == "every provider's circuit breaker is open"
    ));
    // Half-open at 1000: one probe call goes through, a second finds none.
    let (probe, p) = started(&mut c, &[], s.clone(), 1000);
    assert_eq!(p, 1);
    let w = send(&mut c, probe, 1000);
    let other = remote(c.start_call(Millis(1000), s.clone()));
    assert!(matches!(one(&mut c, other, 1000), Action::Done(Err(_))));
    // The caller gives up: CANCEL, and the probe slot is free again.
    assert_eq!(
        c.drop_call(probe, Millis(1001)),
        Some(Action::Cancel {
            provider: 1,
            wire_id: w
        })
    );
    assert_eq!(c.drop_call(probe, Millis(1001)), None);
    assert_eq!(c.inflight(), 0);
    assert_eq!(c.n_pending(), 0);
    let (again, p) = started(&mut c, &[], s, 1002);
    assert_eq!(p, 1);
    // Dropped before the CALL went out: nothing to cancel.
    assert_eq!(c.drop_call(again, Millis(1003)), None);
}

#[test]
fn the_breaker_opens_after_consecutive_failures_and_closes_on_a_good_probe() {
    let mut c = core(Role::Node);
    let s = CallSpec {
        retries: 0,
        ..spec("p")
    };
    let mut picks = Vec::new();
    for t in 0..10 {
        let (id, p) = started(&mut c, &[1, 2], s.clone(), t);
        picks.push(p);
        let w = send(&mut c, id, t);
        if p == 1 {
            c.handle_answer(Millis(t), &1, w, Err(err(RpcErrorKind::Overloaded, "busy")));
        } else {
            c.handle_answer(Millis(t), &p, w, Ok(Vec::new()));
        }
        assert!(matches!(one(&mut c, id, t), Action::Done(_)));
    }
    // Round robin alternates until 1 has failed 5 times, then only 2.
    assert_eq!(picks, [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]);
    assert_eq!(
        c.balancer().breaker_state(&1, Millis(10)),
        BreakerState::Open
    );
    for t in 10..14 {
        let (id, p) = started(&mut c, &[1, 2], s.clone(), t);
        assert_eq!(p, 2);
        c.drop_call(id, Millis(t));
    }
    assert_eq!(
        c.balancer().breaker_state(&1, Millis(1009)),
        BreakerState::HalfOpen
    );
    let mut saw_probe = false;
    for t in 1009..1013 {
        let (id, p) = started(&mut c, &[1, 2], s.clone(), t);
        if p == 1 {
            saw_probe = true;
            let w = send(&mut c, id, t);
            c.handle_answer(Millis(t), &1, w, Ok(Vec::new()));
        } else {
            c.drop_call(id, Millis(t));
        }
    }
    assert!(saw_probe);
    assert_eq!(
        c.balancer().breaker_state(&1, Millis(1013)),
        BreakerState::Closed
    );
}

#[test]
fn only_the_provider_a_call_went_to_can_answer_it() {
    let mut c = core(Role::Node);
    let (id, p) = started(&mut c, &[1], spec("p"), 0);
    let w = send(&mut c, id, 0);
    assert_eq!(c.handle_answer(Millis(1), &9, w, Ok(Vec::new())), None);
    assert_eq!(c.handle_answer(Millis(1), &p, w + 5, Ok(Vec::new())), None);
    assert_eq!(c.n_pending(), 1);
    assert_eq!(c.handle_answer(Millis(1), &p, w, Ok(Vec::new())), Some(id));
    assert_eq!(
        c.handle_answer(Millis(1), &p, w, Ok(Vec::new())),
        None,
        "answered once"
    );
}

#[test]
fn reaching_a_provider_is_bounded() {
    let mut c = core(Role::Node);
    let (id, _) = started(&mut c, &[1, 2], spec("p"), 0);
    assert_eq!(c.poll_timeout(id), Some(Millis(1000)));
    match &drain(&mut c, id, 1000)[0] {
        Action::Retrying {
            after: CallFailure::Unreachable { reason, .. },
        } => assert_eq!(reason, "not reached within 1s"),
        other => panic!("{other:?}"),
    }
    // A late "connected" for a call that moved on sends nothing.
    c.handle_connected(id, Millis(1001));
    assert_eq!(c.n_pending(), 0);
}

#[test]
fn lookup_failures_and_empty_lookups() {
    let mut c = core(Role::Node);
    let id = remote(c.start_call(Millis(0), spec("p")));
    assert!(matches!(one(&mut c, id, 0), Action::Lookup { .. }));
    c.handle_providers(id, Millis(1), Err("dht down".into()));
    assert_eq!(
        one(&mut c, id, 1),
        Action::Done(Err(CallFailure::Unreachable {
            tried: vec![],
            reason: "provider lookup failed: dht down".into()
        }))
    );
    let id = remote(c.start_call(Millis(0), spec("p")));
    let _ = drain(&mut c, id, 0);
    // Only this node advertises it (its record): no one else to call.
    c.handle_providers(id, Millis(1), Ok(vec![info(0)]));
    assert_eq!(
        one(&mut c, id, 1),
        Action::Done(Err(CallFailure::NoProviders))
    );
    // Lookups are cut to the per-procedure limit.
    let mut small = core(Role::Node);
    let cfg = Config {
        max_providers_per_procedure: 2,
        ..Config::default()
    };
    small = RpcCore::new(*small.me(), Role::Node, cfg, 1);
    let kept = small.cache_providers(Millis(0), "p", vec![info(1), info(2), info(3)]);
    assert_eq!(kept.len(), 2);
    assert_eq!(small.cache().get("p", Millis(0)).map(<[_]>::len), Some(2));
}

#[test]
fn named_providers_and_roles_without_a_mesh() {
    let mut c = core(Role::Node);
    c.cache_providers(Millis(0), "p", vec![info(4)]);
    let s = CallSpec {
        target: Some(4),
        ..spec("p")
    };
    let id = remote(c.start_call(Millis(0), s.clone()));
    assert_eq!(
        one(&mut c, id, 0),
        Action::Connect {
            provider: 4,
            addrs: vec!["127.0.0.4:4000".into()]
        }
    );
    // call_to does not fail over.
    c.handle_link_failed(id, Millis(0), "gone".into(), false);
    assert_eq!(
        one(&mut c, id, 0),
        Action::Done(Err(CallFailure::Unreachable {
            tried: vec![4],
            reason: "gone".into()
        }))
    );
    let me = CallSpec {
        target: Some(0),
        ..spec("p")
    };
    assert_eq!(
        c.start_call(Millis(0), me.clone()),
        Err(CallFailure::NoProviders)
    );
    let mut alone = core(Role::Alone);
    assert_eq!(
        alone.start_call(Millis(0), spec("p")),
        Err(CallFailure::NoProviders)
    );
    assert_eq!(
        alone.start_call(Millis(0), me),
        Err(CallFailure::NoProviders)
    );
    assert_eq!(
        alone.start_call(Millis(0), s),
        Err(CallFailure::Unreachable {
            tried: vec![4],
            reason: "this node is not in a mesh".into()
        })
    );
    assert_eq!(alone.inflight(), 0);
}

#[test]
fn local_calls_take_a_handler_slot_and_an_inflight_place() {
    let mut c = RpcCore::new(
        0,
        Role::Node,
        Config {
            max_inflight_calls: 3,
            ..Config::default()
        },
        1,
    );
    let ad = Advert {
        handler: "h",
        weight: 1,
        metadata: vec![],
        max_concurrent: Some(1),
    };
    c.advertise("p", ad).expect("advertise");
    let slot = match c.start_call(Millis(10), spec("p")) {
        Ok(Started::Local {
            handler,
            slot,
            deadline,
        }) => {
            assert_eq!((handler, deadline), ("h", Millis(5010)));
            slot
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(slot.procedure(), "p");
    assert_eq!(c.inflight(), 1);
    assert_eq!(c.config().max_inflight_calls, 3);
    assert_eq!(c.calls().count(), 0, "a local call is not driven");
    assert_eq!(
        c.start_call(Millis(10), spec("p")),
        Err(CallFailure::Overloaded { provider: Some(0) })
    );
    assert_eq!(c.serving().advertised(), vec![("p".to_string(), 1, 0)]);
    c.release(slot);
    assert_eq!(c.inflight(), 0);
    assert_eq!(c.serving().advertised(), vec![("p".to_string(), 1, 1)]);
    // The in-flight limit answers before anything else.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(c.start_call(Millis(0), spec("q")).expect("room"));
    }
    assert_eq!(
        c.start_call(Millis(0), spec("q")),
        Err(CallFailure::Overloaded { provider: None })
    );
    if let Started::Remote(id) = &ids[0] {
        c.drop_call(*id, Millis(0));
    }
    assert!(c.start_call(Millis(0), spec("q")).is_ok());
}

#[test]
fn serve_admission() {
    let mut c = core(Role::Node);
    let ad = |n| Advert {
        handler: "h",
        weight: 7,
        metadata: vec![("k".into(), "v".into())],
        max_concurrent: Some(n),
    };
    let token = c.advertise("p", ad(2)).expect("advertise");
    assert_eq!(
        c.advertise("p", ad(2)),
        Err(AdvertiseError::AlreadyAdvertised)
    );
    assert!(matches!(
        c.advertise("a..b", ad(1)),
        Err(AdvertiseError::InvalidProcedure(_))
    ));
    assert_eq!(
        c.serving().advertisement("p"),
        Some((7, vec![("k".into(), "v".into())]))
    );
    let serve = |c: &mut Core| match c.admit(Millis(100), "p", 250, false) {
        Admission::Serve {
            handler,
            slot,
            deadline,
        } => {
            assert_eq!((handler, deadline), ("h", Millis(350)));
            Some(slot)
        }
        Admission::Refuse { kind, message } => {
            assert_eq!(kind, RpcErrorKind::Overloaded);
            assert_eq!(message, "p is at its concurrency limit");
            None
        }
        other => panic!("{other:?}"),
    };
    let a = serve(&mut c).expect("first");
    let _b = serve(&mut c).expect("second");
    assert!(serve(&mut c).is_none(), "third is over the limit of 2");
    c.release(a);
    let _c = serve(&mut c).expect("a slot came back");
    assert_eq!(
        c.admit(Millis(0), "q", 1, false),
        Admission::Refuse {
            kind: RpcErrorKind::NotFound,
            message: "q is not served by this node".into()
        }
    );
    assert!(matches!(
        c.admit(Millis(0), "bad name", 1, false),
        Admission::Refuse {
            kind: RpcErrorKind::Invalid,
            ..
        }
    ));
    // A stale slot after re-advertising changes nothing.
    let stale = serve(&mut c);
    assert!(stale.is_none());
    assert!(!c.withdraw("p", macula_rpc::Token(token.0 + 100)));
    assert!(c.withdraw("p", token));
    let t2 = c.advertise("p", ad(1)).expect("again");
    assert_ne!(t2, token);
    let held = serve(&mut c).expect("new advertisement, fresh limit");
    assert!(!c.serving().is_empty());
    assert!(!c.serving().is_shutting_down());
    assert_eq!(c.begin_shutdown(), vec![("p".to_string(), t2)]);
    c.release(held);
    assert!(c.serving().is_empty());
    assert!(c.serving().is_shutting_down());
    assert_eq!(
        c.admit(Millis(0), "p", 1, false),
        Admission::Refuse {
            kind: RpcErrorKind::ShuttingDown,
            message: "node is shutting down".into()
        }
    );
    assert_eq!(c.advertise("z", ad(1)), Err(AdvertiseError::ShuttingDown));
}

#[test]
fn advertisements_are_bounded() {
    let mut c: Core = RpcCore::new(
        0,
        Role::Node,
        Config {
            max_advertised: 2,
            ..Config::default()
        },
        1,
    );
    let ad = Advert {
        handler: "h",
        weight: 1,
        metadata: vec![],
        max_concurrent: None,
    };
    c.advertise("a", ad.clone()).expect("a");
    c.advertise_for_client("b", 5, 1, 1, vec![]).expect("b");
    assert_eq!(
        c.advertise("c", ad),
        Err(AdvertiseError::TooManyAdvertised { max: 2 })
    );
    assert_eq!(c.serving().len(), 2);
    // The default limit applies when none is given.
    assert_eq!(c.serving().advertised()[0], ("a".to_string(), 1, 1024));
}

#[test]
fn a_gateway_forwards_to_its_clients_in_turn_and_moves_on_from_a_lost_one() {
    let mut c = core(Role::Node);
    let t = match c.advertise_for_client("p", 9, 100, 0, vec![]) {
        Ok(ClientAd::Created(t)) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        c.serving().advertisement("p"),
        Some((1, vec![])),
        "weight at least 1"
    );
    assert_eq!(
        c.advertise_for_client("p", 8, 200, 5, vec![]),
        Ok(ClientAd::Joined)
    );
    // A client that reconnected replaces its old connection.
    assert_eq!(
        c.advertise_for_client("p", 9, 101, 5, vec![]),
        Ok(ClientAd::Joined)
    );
    assert_eq!(
        c.admit(Millis(0), "p", 300, false),
        Admission::Forward {
            timeout: Millis(300)
        }
    );

    let mut firsts = Vec::new();
    for n in 0..2 {
        let id = remote(c.start_call(Millis(n), spec("p")));
        match one(&mut c, id, n) {
            Action::ConnectClient { client, conn } => firsts.push((client, conn)),
            other => panic!("{other:?}"),
        }
        c.drop_call(id, Millis(n));
    }
    assert_eq!(firsts, [(8, 200), (9, 101)], "round robin over the clients");

    let id = remote(c.start_call(Millis(10), spec("p")));
    assert!(matches!(
        one(&mut c, id, 10),
        Action::ConnectClient { client: 8, .. }
    ));
    let w = send(&mut c, id, 10);
    c.handle_link_failed(id, Millis(11), "connection closed".into(), true);
    assert_eq!(
        one(&mut c, id, 11),
        Action::ConnectClient {
            client: 9,
            conn: 101
        }
    );
    let w2 = send(&mut c, id, 11);
    assert_ne!(w, w2);
    c.handle_answer(Millis(12), &9, w2, Ok(b"ok".to_vec()));
    assert_eq!(
        one(&mut c, id, 12),
        Action::Done(Ok(Answer {
            payload: b"ok".to_vec(),
            provider: 0,
            attempts: 2
        }))
    );
    // A client's own error is final.
    let id = remote(c.start_call(Millis(20), spec("p")));
    assert_eq!(
        one(&mut c, id, 20),
        Action::ConnectClient {
            client: 9,
            conn: 101
        }
    );
    let w = send(&mut c, id, 20);
    c.handle_answer(Millis(21), &9, w, Err(err(RpcErrorKind::Handler, "bad")));
    assert!(matches!(
        one(&mut c, id, 21),
        Action::Done(Err(CallFailure::Handler { provider: 9, .. }))
    ));
    // All clients lost: the last error.
    let id = remote(c.start_call(Millis(30), spec("p")));
    let _ = drain(&mut c, id, 30);
    c.handle_link_failed(id, Millis(30), "a".into(), true);
    let _ = drain(&mut c, id, 30);
    c.handle_link_failed(id, Millis(30), "b".into(), true);
    assert!(matches!(
        one(&mut c, id, 30),
        Action::Done(Err(CallFailure::Unreachable { ref reason, .. })) if reason == "b"
    ));

    // Withdrawals: by connection; the advertisement goes with its last client.
    assert_eq!(
        c.withdraw_client(100, None),
        vec![],
        "an old connection holds nothing"
    );
    assert_eq!(c.withdraw_client(101, Some("q")), vec![]);
    assert_eq!(c.withdraw_client(101, Some("p")), vec![]);
    assert_eq!(c.withdraw_client(200, None), vec![("p".to_string(), t)]);
    assert_eq!(
        c.admit(Millis(0), "p", 1, false),
        Admission::Refuse {
            kind: RpcErrorKind::NotFound,
            message: "p is not served by this node".into()
        }
    );
    // Withdrawing another procedure leaves a client's only one alone.
    c.advertise_for_client("x", 6, 7, 1, vec![]).expect("x");
    assert_eq!(c.withdraw_client(7, Some("y")), vec![]);
    assert_eq!(c.serving().advertised().len(), 1);
    // Nobody left between start and send: no providers.
    c.advertise_for_client("r", 7, 1, 1, vec![]).expect("r");
    assert_eq!(c.withdraw_client(1, None).len(), 1);
    let id = remote(c.start_call(Millis(0), spec("q")));
    assert!(matches!(one(&mut c, id, 0), Action::Lookup { .. }));
}

#[test]
fn a_full_node_forwards_its_clients_calls_into_the_mesh() {
    let mut node = core(Role::Node);
    assert_eq!(
        node.admit(Millis(0), "p", 40, true),
        Admission::Forward {
            timeout: Millis(40)
        }
    );
    assert!(matches!(
        node.admit(Millis(0), "p", 40, false),
        Admission::Refuse {
            kind: RpcErrorKind::NotFound,
            ..
        }
    ));
    // A client never forwards.
    let mut client = core(Role::Client);
    assert!(matches!(
        client.admit(Millis(0), "p", 40, true),
        Admission::Refuse {
            kind: RpcErrorKind::NotFound,
            ..
        }
    ));
}

#[test]
fn a_client_calls_through_its_gateway_and_retries_only_the_gateways_loss() {
    let mut c = core(Role::Client);
    let s = CallSpec {
        timeout: Millis(8000),
        target: Some(5),
        ..spec("p")
    };
    let id = remote(c.start_call(Millis(0), s));
    assert_eq!(
        one(&mut c, id, 0),
        Action::AwaitGateway { wait: Millis(5000) }
    );
    c.handle_gateway(id, Millis(1), Some(100));
    assert!(matches!(
        one(&mut c, id, 1),
        Action::Send {
            provider: 100,
            attempt: 1,
            ..
        }
    ));
    c.handle_link_failed(id, Millis(2), "connection closed".into(), true);
    assert!(matches!(one(&mut c, id, 2), Action::Retrying { .. }));
    let at = c.poll_timeout(id).expect("backoff").0;
    assert!((4..=7).contains(&at), "{at}");
    assert_eq!(
        one(&mut c, id, at),
        Action::AwaitGateway { wait: Millis(5000) }
    );
    c.handle_gateway(id, Millis(7000), Some(101));
    let w = match one(&mut c, id, 7000) {
        Action::Send {
            provider: 101,
            wire_id,
            attempt: 2,
            timeout_ms: 1000,
        } => wire_id,
        other => panic!("{other:?}"),
    };
    // The mesh's answer is final, even "unreachable".
    c.handle_answer(
        Millis(7001),
        &101,
        w,
        Err(err(RpcErrorKind::Unreachable, "no one")),
    );
    assert_eq!(
        one(&mut c, id, 7001),
        Action::Done(Err(CallFailure::Unreachable {
            tried: vec![101],
            reason: "no one".into()
        }))
    );
    // The wait for a gateway never passes the deadline; none: unreachable.
    let id = remote(c.start_call(
        Millis(0),
        CallSpec {
            timeout: Millis(300),
            ..spec("p")
        },
    ));
    assert_eq!(
        one(&mut c, id, 0),
        Action::AwaitGateway { wait: Millis(300) }
    );
    c.handle_gateway(id, Millis(300), Some(100));
    assert_eq!(
        one(&mut c, id, 300),
        Action::Done(Err(CallFailure::Timeout))
    );
    let id = remote(c.start_call(Millis(0), spec("p")));
    let _ = drain(&mut c, id, 0);
    c.handle_gateway(id, Millis(10), None);
    assert_eq!(
        one(&mut c, id, 10),
        Action::Done(Err(CallFailure::Unreachable {
            tried: vec![],
            reason: "not attached to a gateway (client mode)".into()
        }))
    );
    // A send failure that did not lose the gateway (too large) is final.
    let id = remote(c.start_call(Millis(0), spec("p")));
    let _ = drain(&mut c, id, 0);
    c.handle_gateway(id, Millis(0), Some(100));
    let _ = drain(&mut c, id, 0);
    c.handle_link_failed(id, Millis(0), "too large".into(), false);
    assert!(matches!(
        one(&mut c, id, 0),
        Action::Done(Err(CallFailure::Unreachable { .. }))
    ));
    // Out of retries: final.
    let id = remote(c.start_call(
        Millis(0),
        CallSpec {
            retries: 0,
            ..spec("p")
        },
    ));
    let _ = drain(&mut c, id, 0);
    c.handle_gateway(id, Millis(0), Some(100));
    let _ = drain(&mut c, id, 0);
    c.handle_link_failed(id, Millis(0), "closed".into(), true);
    assert!(matches!(
        one(&mut c, id, 0),
        Action::Done(Err(CallFailure::Unreachable { .. }))
    ));
}

#[test]
fn remote_errors_map_to_failures() {
    use macula_rpc::remote_failure;
    let f = |kind, code| {
        remote_failure(
            3u32,
            CallError {
                id: 1,
                kind,
                code,
                message: "m".into(),
            },
        )
    };
    let unreachable = CallFailure::Unreachable {
        tried: vec![3],
        reason: "m".into(),
    };
    assert_eq!(
        f(RpcErrorKind::Handler, 42),
        CallFailure::Handler {
            provider: 3,
            code: 42,
            message: "m".into()
        }
    );
    assert_eq!(
        f(RpcErrorKind::Panicked, 0),
        CallFailure::Panicked { provider: 3 }
    );
    assert_eq!(f(RpcErrorKind::Timeout, 0), CallFailure::Timeout);
    assert_eq!(
        f(RpcErrorKind::Overloaded, 0),
        CallFailure::Overloaded { provider: Some(3) }
    );
    assert_eq!(f(RpcErrorKind::Cancelled, 0), CallFailure::Cancelled);
    assert_eq!(f(RpcErrorKind::NoProviders, 0), CallFailure::NoProviders);
    assert_eq!(f(RpcErrorKind::Unreachable, 0), unreachable);
    assert_eq!(f(RpcErrorKind::NotFound, 0), unreachable);
    assert_eq!(f(RpcErrorKind::ShuttingDown, 0), unreachable);
    assert_eq!(
        f(RpcErrorKind::Invalid, 0),
        CallFailure::Handler {
            provider: 3,
            code: 8,
            message: "m".into()
        }
    );
    assert_eq!(
        f(RpcErrorKind::Other(77), 0),
        CallFailure::Handler {
            provider: 3,
            code: 77,
            message: "m".into()
        }
    );
    assert!(unreachable.retryable());
    assert!(CallFailure::<u32>::Overloaded { provider: None }.retryable());
    assert!(!CallFailure::<u32>::Timeout.retryable());
}

#[test]
fn the_same_seed_replays_the_same_choices() {
    let run = |seed| {
        let mut c: Core = RpcCore::new(0, Role::Node, Config::default(), seed);
        let mut picks = Vec::new();
        for t in 0..20 {
            let s = CallSpec {
                strategy: Strategy::Random,
                ..spec("p")
            };
            let (id, p) = started(&mut c, &[1, 2, 3, 4], s, t);
            picks.push(p);
            c.handle_link_failed(id, Millis(t), "x".into(), false);
            let _ = drain(&mut c, id, t);
            picks.push(c.poll_timeout(id).map_or(0, |m| m.0 as u32));
            c.drop_call(id, Millis(t));
        }
        picks
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}

#[test]
fn a_named_provider_is_called_even_when_this_node_serves_the_procedure() {
    let mut c = core(Role::Node);
    let ad = Advert {
        handler: "h",
        weight: 1,
        metadata: vec![],
        max_concurrent: None,
    };
    c.advertise("p", ad).expect("advertise");
    let to = |t| CallSpec {
        target: Some(t),
        ..spec("p")
    };
    let id = remote(c.start_call(Millis(0), to(4)));
    assert_eq!(c.calls().collect::<Vec<_>>(), vec![id]);
    assert!(matches!(
        one(&mut c, id, 0),
        Action::Connect { provider: 4, .. }
    ));
    assert!(matches!(
        c.start_call(Millis(0), to(0)),
        Ok(Started::Local { .. })
    ));
    assert_eq!((*c.me(), c.role()), (0, Role::Node));
}

/// Answers call `id`'s CALL out to the provider it connects to now; returns
/// that provider.
fn answered(c: &mut Core, id: CallId, first: Option<u32>, now: u64) -> u32 {
    let provider = match first {
        Some(p) => p,
        None => connect_to(&one(c, id, now)),
    };
    let w = send(c, id, now);
    c.handle_answer(Millis(now), &provider, w, Ok(Vec::new()));
    match one(c, id, now) {
        Action::Done(Ok(a)) => assert_eq!(a.provider, provider),
        other => panic!("{other:?}"),
    }
    provider
}

/// Issue 17: a call waiting on a node the failure detector declares down
/// moves on at once, and later calls (after the provider cache expired and
/// the dead node's advertisement came back from the DHT) go to the live
/// provider first, until the dead one is heard from again.
#[test]
fn a_provider_declared_down_is_left_at_once_and_tried_last() {
    let mut c = core(Role::Node);
    let (id, first) = started(&mut c, &[1, 2], spec("p"), 0);
    let _w = send(&mut c, id, 0);
    let woken = c.handle_peer_down(&first, Millis(100));
    assert_eq!(woken, vec![id]);
    assert!(c.is_down(&first, Millis(100)));
    assert!(matches!(one(&mut c, id, 100), Action::Retrying { .. }));
    let at = c.poll_timeout(id).expect("backing off").0;
    let second = answered(&mut c, id, None, at);
    assert_ne!(second, first);
    // Round robin would alternate; the suspect is never picked while the
    // other provider is there, also after the cache expired (lookups still
    // return both: the dead node's record outlives it).
    for n in 0..6u64 {
        let now = 1_000 + n * 3_000;
        let (id, picked) = started(&mut c, &[1, 2], spec("p"), now);
        assert_eq!(picked, second, "call {n} at {now} ms");
        answered(&mut c, id, Some(picked), now);
    }
    // Heard from again: back in the rotation.
    c.handle_peer_up(&first);
    assert!(!c.is_down(&first, Millis(20_000)));
    let picks: Vec<u32> = (0..2u64)
        .map(|n| {
            let (id, p) = started(&mut c, &[1, 2], spec("p"), 20_000 + n);
            answered(&mut c, id, Some(p), 20_000 + n)
        })
        .collect();
    assert!(picks.contains(&first), "{picks:?}");
}

/// A provider that could not be reached is remembered as down beyond the
/// provider cache; when it is the only provider it is still tried (a
/// suspicion must not fail a call), and the suspicion ends with its TTL or
/// an answer.
#[test]
fn an_unreachable_provider_is_tried_last_but_still_tried() {
    let mut c = core(Role::Node);
    let (id, first) = started(&mut c, &[1, 2], spec("p"), 0);
    c.handle_link_failed(id, Millis(3), "could not connect".into(), false);
    assert!(c.is_down(&first, Millis(3)));
    assert_eq!(c.down_stats(), (1, 1));
    drain(&mut c, id, 3);
    let at = c.poll_timeout(id).expect("backing off").0;
    answered(&mut c, id, None, at);
    // Alone: still called, and its answer clears the suspicion.
    let (id, picked) = started(&mut c, &[first], spec("p"), 10_000);
    assert_eq!(picked, first);
    answered(&mut c, id, Some(picked), 10_000);
    assert!(!c.is_down(&first, Millis(10_000)));
    // Suspected again; the suspicion expires with `down_ttl`.
    let (id, picked) = started(&mut c, &[first], spec("p"), 20_000);
    c.handle_link_failed(id, Millis(20_000), "no".into(), false);
    assert!(c.is_down(&picked, Millis(20_000)));
    let ttl = Config::default().down_ttl.0;
    assert!(c.is_down(&picked, Millis(20_000 + ttl - 1)));
    assert!(!c.is_down(&picked, Millis(20_000 + ttl)));
}

/// A suspect that restarted re-advertises (a higher record `seq`): the
/// suspicion ends with the lookup that finds the new record, not with its
/// TTL; the old record, found again, changes nothing.
#[test]
fn a_re_advertised_provider_is_no_longer_suspected() {
    let mut c = core(Role::Node);
    let (id, first) = started(&mut c, &[1, 2], spec("p"), 0);
    c.handle_link_failed(id, Millis(3), "could not connect".into(), false);
    drain(&mut c, id, 3);
    let at = c.poll_timeout(id).expect("backing off").0;
    answered(&mut c, id, None, at);
    let lookup = |c: &mut Core, now: u64, seq: u64| {
        let found = vec![ProviderInfo { seq, ..info(first) }, info(3 - first)];
        c.cache_providers(Millis(now), "p", found);
    };
    lookup(&mut c, 6_000, 1);
    assert!(c.is_down(&first, Millis(6_000)), "the same record");
    lookup(&mut c, 12_000, 2);
    assert!(!c.is_down(&first, Millis(12_000)), "a newer record");
    // Declared down by the detector (no seq known): the next record seen
    // is the baseline, a later one ends it.
    c.handle_peer_down(&first, Millis(13_000));
    lookup(&mut c, 13_001, 2);
    assert!(c.is_down(&first, Millis(13_001)));
    lookup(&mut c, 20_000, 3);
    assert!(!c.is_down(&first, Millis(20_000)));
}

/// After the backoff of a mesh call whose only provider failed: its new
/// lookup finds that provider again (tried), so the call ends.
fn after_backoff(c: &mut Core, id: CallId, provider: u32) -> Vec<Action<u32>> {
    let v = drain(c, id, 1000);
    if !matches!(v[..], [Action::Lookup { .. }]) {
        return v;
    }
    c.handle_providers(id, Millis(1000), Ok(vec![info(provider)]));
    drain(c, id, 1000)
}

/// Reaches the pending `Connect` over a replaceable connection (relayed,
/// or direct by hole punching) and returns the CALL's wire ID.
fn send_replaceable(c: &mut Core, id: CallId, now: u64) -> u64 {
    c.handle_reached(id, Millis(now), true);
    match one(c, id, now) {
        Action::Send { wire_id, .. } => wire_id,
        other => panic!("expected Send, got {other:?}"),
    }
}

#[test]
fn a_call_whose_replaceable_connection_dies_is_re_sent_with_the_same_id() {
    let mut c = core(Role::Node);
    // The only provider: today's failover would have nowhere to go.
    let (id, p) = started(&mut c, &[1], spec("p"), 0);
    let w = send_replaceable(&mut c, id, 1);
    // The direct path dies under the CALL.
    c.handle_link_failed(id, Millis(100), "connection closed".into(), true);
    assert_eq!(
        drain(&mut c, id, 100),
        vec![
            Action::Resending {
                provider: p,
                wire_id: w
            },
            Action::Connect {
                provider: p,
                addrs: vec!["127.0.0.1:4000".into()]
            }
        ]
    );
    // The new route (the relay): the same CALL, same wire ID and attempt.
    c.handle_reached(id, Millis(120), true);
    assert_eq!(
        one(&mut c, id, 120),
        Action::Send {
            provider: p,
            wire_id: w,
            timeout_ms: 4880,
            attempt: 1
        }
    );
    assert_eq!(c.n_pending(), 1);
    assert_eq!(
        c.handle_answer(Millis(130), &p, w, Ok(b"once".to_vec())),
        Some(id)
    );
    match one(&mut c, id, 130) {
        Action::Done(Ok(a)) => {
            assert_eq!(a.payload, b"once".to_vec());
            assert_eq!(a.attempts, 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.n_pending(), 0);
    assert_eq!(c.inflight(), 0);
}

#[test]
fn a_failed_probe_on_a_replaceable_connection_closes_it_and_re_sends() {
    let mut c = core(Role::Node);
    let (id, p) = started(&mut c, &[1], spec("p"), 0);
    let w = send_replaceable(&mut c, id, 0);
    let probe_after = Config::default().probe_after.0;
    assert!(matches!(one(&mut c, id, probe_after), Action::Probe { .. }));
    c.handle_probe_failed(id, Millis(probe_after + 5), w, "timed out".into());
    let v = drain(&mut c, id, probe_after + 5);
    assert!(
        matches!(v[0], Action::Close { provider, .. } if provider == p),
        "{v:?}"
    );
    assert_eq!(
        v[1],
        Action::Resending {
            provider: p,
            wire_id: w
        }
    );
    assert_eq!(connect_to(&v[2]), p);
}

#[test]
fn re_sends_are_bounded_then_the_call_fails_as_before() {
    let mut c = core(Role::Node);
    let (id, _) = started(&mut c, &[1], spec("p"), 0);
    let w = send_replaceable(&mut c, id, 0);
    for n in 0..Config::default().max_resends {
        c.handle_link_failed(id, Millis(10), "closed".into(), true);
        assert!(
            matches!(
                drain(&mut c, id, 10).first(),
                Some(Action::Resending { .. })
            ),
            "re-send {n}"
        );
        assert_eq!(send_replaceable(&mut c, id, 10), w);
    }
    c.handle_link_failed(id, Millis(20), "closed".into(), true);
    // Nothing re-sent: the one provider failed; no other to try (after
    // the backoff).
    let v = drain(&mut c, id, 20);
    assert!(matches!(v[..], [Action::Retrying { .. }]), "{v:?}");
    let v = after_backoff(&mut c, id, 1);
    assert!(
        matches!(
            v.last(),
            Some(Action::Done(Err(CallFailure::Unreachable { .. })))
        ),
        "{v:?}"
    );
    assert_eq!(c.n_pending(), 0);
}

#[test]
fn a_connection_that_is_not_replaceable_is_not_re_sent_and_a_failed_reach_ends_the_re_send() {
    // Not replaceable: the old behaviour (no other provider: it fails).
    let mut c = core(Role::Node);
    let (id, _) = started(&mut c, &[1], spec("p"), 0);
    send(&mut c, id, 0);
    c.handle_link_failed(id, Millis(10), "closed".into(), true);
    let v = drain(&mut c, id, 10);
    assert!(matches!(v[..], [Action::Retrying { .. }]), "{v:?}");
    let v = after_backoff(&mut c, id, 1);
    assert!(
        matches!(
            v.last(),
            Some(Action::Done(Err(CallFailure::Unreachable { .. })))
        ),
        "{v:?}"
    );

    // Replaceable, but the provider cannot be reached again: the pending
    // CALL is forgotten and the call fails over (here: nowhere).
    let mut c = core(Role::Node);
    let (id, p) = started(&mut c, &[2], spec("p"), 100);
    let w = send_replaceable(&mut c, id, 100);
    c.handle_link_failed(id, Millis(110), "closed".into(), true);
    assert_eq!(drain(&mut c, id, 110).len(), 2);
    c.handle_link_failed(id, Millis(120), "could not connect".into(), false);
    let v = drain(&mut c, id, 120);
    assert!(matches!(v[..], [Action::Retrying { .. }]), "{v:?}");
    let v = after_backoff(&mut c, id, 2);
    assert!(matches!(v.last(), Some(Action::Done(Err(_)))), "{v:?}");
    assert_eq!(c.n_pending(), 0);
    // A late answer to it completes nothing.
    assert_eq!(c.handle_answer(Millis(130), &p, w, Ok(Vec::new())), None);
}

#[test]
fn a_call_given_up_while_re_sending_cancels_the_call_out() {
    let mut c = core(Role::Node);
    let (id, p) = started(&mut c, &[1], spec("p"), 0);
    let w = send_replaceable(&mut c, id, 0);
    c.handle_link_failed(id, Millis(10), "closed".into(), true);
    drain(&mut c, id, 10);
    assert_eq!(
        c.drop_call(id, Millis(20)),
        Some(Action::Cancel {
            provider: p,
            wire_id: w
        })
    );
    assert_eq!(c.n_pending(), 0);
    assert_eq!(c.inflight(), 0);
}

#[test]
fn the_old_connections_loss_seen_twice_does_not_end_the_re_send() {
    let mut c = core(Role::Node);
    let (id, p) = started(&mut c, &[1], spec("p"), 0);
    let w = send_replaceable(&mut c, id, 0);
    // The call sees its connection close; then the failure detector
    // reports the same loss (or the other way round).
    c.handle_link_failed(id, Millis(10), "connection closed".into(), true);
    assert_eq!(drain(&mut c, id, 10).len(), 2);
    assert!(c.handle_peer_down(&p, Millis(11)).is_empty());
    c.handle_link_failed(id, Millis(12), "connection closed".into(), true);
    assert_eq!(drain(&mut c, id, 12), vec![]);
    assert_eq!(send_replaceable(&mut c, id, 20), w);
    assert_eq!(c.handle_answer(Millis(30), &p, w, Ok(Vec::new())), Some(id));
    assert!(matches!(one(&mut c, id, 30), Action::Done(Ok(_))));
}

#[test]
fn wire_ids_start_where_the_driver_says() {
    let mut c = core(Role::Node);
    c.start_wire_ids_at(1 << 40);
    let (id, _) = started(&mut c, &[1], spec("p"), 0);
    assert_eq!(send(&mut c, id, 0), 1 << 40);
}
