//! The session core on a virtual clock: CONNECT, sessions, QoS 1 windows
//! and redelivery, retained messages, wills, keep-alive, limits.

use bytes::Bytes;
use macula_mqtt::*;
use proptest::prelude::*;

fn ms(n: u64) -> Millis {
    Millis(n)
}

fn connect(id: &str, clean: bool) -> Connect {
    Connect {
        client_id: id.into(),
        clean_start: clean,
        keep_alive: 10,
        ..Connect::default()
    }
}

fn drain(b: &mut Broker, conn: ConnId) -> Vec<Out> {
    std::iter::from_fn(|| b.poll_transmit(conn)).collect()
}

fn events(b: &mut Broker) -> Vec<Event> {
    std::iter::from_fn(|| b.poll_event()).collect()
}

fn small() -> Limits {
    Limits {
        max_clients: 2,
        max_sessions: 3,
        max_inflight: 2,
        queue_len: 3,
        max_subscriptions: 2,
        max_retained: 2,
        max_retained_bytes: 100,
        ..Limits::default()
    }
}

/// Subscribes `conn` to `filter` (as the runtime does: plan, then record).
fn sub(b: &mut Broker, conn: ConnId, filter: &str, qos: u8) -> Vec<SubCode> {
    let plan = b.plan_subscribe(conn, &[(filter.to_string(), qos)]);
    b.subscribe(conn, 1, plan);
    match drain(b, conn).into_iter().find_map(|o| match o {
        Out::SubAck { codes, .. } => Some(codes),
        _ => None,
    }) {
        Some(c) => c,
        None => panic!("no SUBACK"),
    }
}

fn publishes(outs: &[Out]) -> Vec<(String, Option<u16>, bool)> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Publish {
                msg,
                packet_id,
                dup,
            } => Some((
                String::from_utf8_lossy(&msg.payload).into_owned(),
                *packet_id,
                *dup,
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn connack_then_clean_session_ends_with_its_connection() {
    let mut b = Broker::new(small());
    let sid = b
        .connect(1, Version::V3, connect("a", true), ms(0))
        .unwrap();
    assert_eq!(
        drain(&mut b, 1),
        vec![Out::ConnAck {
            session_present: false,
            assigned_client_id: None
        }]
    );
    assert_eq!(b.clients(), 1);
    b.closed(1, ms(5));
    assert_eq!(b.clients(), 0);
    assert_eq!(b.sessions(), 0);
    assert!(events(&mut b).contains(&Event::SessionGone(sid)));
}

#[test]
fn max_clients_refuses_with_server_busy_and_counts() {
    let mut b = Broker::new(small());
    b.connect(1, Version::V3, connect("a", true), ms(0))
        .unwrap();
    b.connect(2, Version::V5, connect("b", true), ms(0))
        .unwrap();
    assert_eq!(
        b.connect(3, Version::V5, connect("c", true), ms(0)),
        Err(Refusal::ServerBusy)
    );
    assert_eq!(b.stats().refused[Refusal::ServerBusy as usize], 1);
    // Taking over an existing client's session is not a new client.
    assert!(b.connect(4, Version::V3, connect("a", true), ms(1)).is_ok());
    assert!(drain(&mut b, 1).contains(&Out::Disconnect(Reason::TakenOver)));
    assert!(events(&mut b).contains(&Event::Close(1)));
}

#[test]
fn empty_client_id() {
    let mut b = Broker::new(small());
    assert_eq!(
        b.connect(1, Version::V3, connect("", false), ms(0)),
        Err(Refusal::ClientIdRejected)
    );
    b.connect(2, Version::V5, connect("", true), ms(0)).unwrap();
    match &drain(&mut b, 2)[0] {
        Out::ConnAck {
            assigned_client_id: Some(id),
            ..
        } => assert!(!id.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn qos1_window_queue_and_redelivery_on_reconnect() {
    let mut b = Broker::new(small());
    let sid = b
        .connect(1, Version::V3, connect("dev", false), ms(0))
        .unwrap();
    assert_eq!(sub(&mut b, 1, "t/#", 2), vec![SubCode::Granted(1)]);
    for i in 0..3 {
        assert_eq!(
            b.deliver(sid, "t.x", Bytes::from(format!("m{i}")), 1),
            Delivery::Queued
        );
    }
    // Window of 2: two sent, one waits.
    let sent = publishes(&drain(&mut b, 1));
    assert_eq!(
        sent,
        vec![("m0".into(), Some(1), false), ("m1".into(), Some(2), false)]
    );
    b.puback(1, 1);
    assert_eq!(
        publishes(&drain(&mut b, 1)),
        vec![("m2".into(), Some(3), false)]
    );
    // Lost connection: the session stays; m1 and m2 are unacknowledged.
    b.closed(1, ms(10));
    assert_eq!(b.sessions(), 1);
    b.deliver(sid, "t.y", Bytes::from("m3"), 1);
    let again = b
        .connect(2, Version::V3, connect("dev", false), ms(20))
        .unwrap();
    assert_eq!(again, sid);
    let outs = drain(&mut b, 2);
    assert_eq!(
        outs[0],
        Out::ConnAck {
            session_present: true,
            assigned_client_id: None
        }
    );
    // Resent with DUP in order; m3 waits for the window.
    assert_eq!(
        publishes(&outs),
        vec![("m1".into(), Some(2), true), ("m2".into(), Some(3), true)]
    );
    b.puback(2, 2);
    b.puback(2, 3);
    assert_eq!(
        publishes(&drain(&mut b, 2)),
        vec![("m3".into(), Some(4), false)]
    );
    assert_eq!(b.stats().redelivered, 2);
}

/// A persistent session saved by one broker and restored by another (a
/// node restart): subscriptions, the unacknowledged QoS 1 message (sent
/// again with DUP), the queue, the time left; `changes` moves when saved
/// state moves; clean sessions are not saved; the new broker's limits
/// apply to what it takes back.
#[test]
fn persistent_sessions_are_saved_and_restored() {
    let mut b = Broker::new(small());
    b.connect(1, Version::V3, connect("keep", false), ms(0))
        .unwrap();
    b.connect(2, Version::V3, connect("clean", true), ms(0))
        .unwrap();
    drain(&mut b, 1);
    let c0 = b.changes();
    assert_eq!(sub(&mut b, 1, "jobs/#", 1), vec![SubCode::Granted(1)]);
    assert_ne!(b.changes(), c0, "a subscription is saved state");
    let sid = b.session_of(1).unwrap();
    for p in ["a", "b", "c"] {
        b.deliver(sid, "jobs.x", Bytes::from(p), 1);
    }
    // Window 2: a and b in flight, c queued; a acknowledged.
    assert_eq!(publishes(&drain(&mut b, 1)).len(), 2);
    b.puback(1, 1);
    let c1 = b.changes();
    b.closed(1, ms(1000));
    assert_ne!(b.changes(), c1);
    let saved = b.saved_sessions(ms(1000));
    assert_eq!(saved.len(), 1, "only the persistent session: {saved:?}");
    let s = &saved[0];
    assert_eq!(s.client_id, "keep");
    assert_eq!(s.subs, vec![("jobs/#".to_string(), 1)]);
    assert_eq!(s.inflight.len(), 1);
    assert_eq!(s.inflight[0].1.payload, b"b");
    assert_eq!(s.queue.len(), 1);
    assert_eq!(s.left_ms, Limits::default().session_expiry_max.0);

    // The next process: a fresh broker, its clock starting again.
    let mut r = Broker::new(small());
    let restored = r.restore(saved.clone(), ms(5));
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].1[0].0, "jobs/#");
    assert_eq!(restored[0].1[0].1.as_str(), "jobs.**");
    assert_eq!(r.saved_sessions(ms(5)), saved, "restored as saved");
    // Messages keep arriving for it while its client is away.
    r.deliver(restored[0].0, "jobs.y", Bytes::from("d"), 1);
    let c = r.connect(7, Version::V3, connect("keep", false), ms(10));
    assert_eq!(c, Ok(restored[0].0));
    let outs = drain(&mut r, 7);
    assert_eq!(
        outs[0],
        Out::ConnAck {
            session_present: true,
            assigned_client_id: None
        }
    );
    assert_eq!(
        publishes(&outs),
        vec![
            ("b".to_string(), Some(2), true),
            ("c".to_string(), Some(3), false)
        ]
    );
    r.puback(7, 2);
    r.puback(7, 3);
    assert_eq!(
        publishes(&drain(&mut r, 7)),
        vec![("d".to_string(), Some(4), false)]
    );

    // Expired, duplicate, empty or unusable entries are left out; limits
    // of the new broker cut what is too much.
    let mut r = Broker::new(small());
    let big = SavedSession {
        client_id: "big".into(),
        subs: vec![
            ("a/+".into(), 2),
            ("a/+".into(), 1),
            ("bad/#/x".into(), 1),
            ("b".into(), 0),
            ("c".into(), 0),
        ],
        inflight: (1..=5)
            .map(|p| {
                (
                    p,
                    SavedMsg {
                        topic: "a/b".into(),
                        payload: vec![1],
                        qos: 1,
                        retain: false,
                    },
                )
            })
            .collect(),
        queue: vec![SavedMsg::default(); 10],
        next_pid: 0,
        expiry_ms: 60_000,
        left_ms: 120_000,
    };
    let gone = SavedSession {
        client_id: "gone".into(),
        expiry_ms: 60_000,
        left_ms: 0,
        ..SavedSession::default()
    };
    let anonymous = SavedSession {
        expiry_ms: 60_000,
        left_ms: 10,
        ..SavedSession::default()
    };
    let restored = r.restore(vec![big.clone(), big, gone, anonymous], ms(0));
    assert_eq!(restored.len(), 1);
    let subs: Vec<(&str, u8)> = restored[0]
        .1
        .iter()
        .map(|(f, _, q)| (f.as_str(), *q))
        .collect();
    assert_eq!(subs, vec![("a/+", 1), ("b", 0)], "limit 2, invalid dropped");
    let s = &r.saved_sessions(ms(0))[0];
    assert_eq!((s.inflight.len(), s.queue.len()), (2, 3));
    assert_eq!(s.left_ms, 60_000, "never more than its expiry");
    assert_eq!(s.next_pid, 1);
    // It expires after its time left, counted like any other.
    r.expire(ms(60_000));
    assert_eq!(r.sessions(), 0);
    assert_eq!(r.stats().sessions_expired, 1);
}

#[test]
fn full_queue_drops_qos0_and_holds_qos1() {
    let mut b = Broker::new(small());
    let sid = b
        .connect(1, Version::V3, connect("d", false), ms(0))
        .unwrap();
    drain(&mut b, 1);
    b.closed(1, ms(1));
    for i in 0..3 {
        assert_eq!(
            b.deliver(sid, "a", Bytes::from(format!("{i}")), 0),
            Delivery::Queued
        );
    }
    assert_eq!(b.deliver(sid, "a", Bytes::from("x"), 0), Delivery::Dropped);
    assert_eq!(b.deliver(sid, "a", Bytes::from("y"), 1), Delivery::Full);
    assert_eq!(b.stats().dropped_queue_full, 1);
    assert_eq!(b.stats().queue_full_waits, 1);
}

#[test]
fn persistent_session_expires() {
    let limits = Limits {
        session_expiry_max: Millis::from_secs(60),
        ..small()
    };
    let mut b = Broker::new(limits);
    let sid = b
        .connect(
            1,
            Version::V5,
            Connect {
                session_expiry: Some(3600),
                ..connect("p", false)
            },
            ms(0),
        )
        .unwrap();
    b.closed(1, ms(1000));
    b.expire(ms(60_999));
    assert_eq!(b.sessions(), 1);
    b.expire(ms(61_000));
    assert_eq!(b.sessions(), 0);
    assert!(events(&mut b).contains(&Event::SessionGone(sid)));
    assert_eq!(b.stats().sessions_expired, 1);
}

#[test]
fn retained_messages_replay_on_subscribe_and_empty_deletes() {
    let mut b = Broker::new(small());
    b.connect(1, Version::V3, connect("p", true), ms(0))
        .unwrap();
    drain(&mut b, 1);
    let publish = |b: &mut Broker, topic: &str, body: &'static str| {
        let f = b
            .publish(
                1,
                Publish {
                    topic: topic.into(),
                    payload: Bytes::from(body),
                    qos: 0,
                    retain: true,
                    dup: false,
                    packet_id: None,
                },
                ms(1),
            )
            .unwrap();
        b.published(1, &f, Outcome::Published, ms(1));
    };
    publish(&mut b, "s/1", "on");
    publish(&mut b, "s/2", "off");
    publish(&mut b, "s/3", "over the count");
    assert_eq!(b.retained().0, 2);
    assert_eq!(b.stats().retained_refused, 1);
    publish(&mut b, "s/2", "");
    assert_eq!(b.retained().0, 1);
    b.connect(2, Version::V3, connect("s", true), ms(2))
        .unwrap();
    drain(&mut b, 2);
    let plan = b.plan_subscribe(2, &[("s/+".into(), 1)]);
    b.subscribe(2, 7, plan);
    let outs = drain(&mut b, 2);
    assert!(matches!(outs[0], Out::SubAck { id: 7, .. }));
    match &outs[1] {
        Out::Publish { msg, .. } => {
            assert_eq!(msg.topic, "s/1");
            assert!(msg.retain);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(outs.len(), 2);
}

#[test]
fn will_on_lost_connection_and_keep_alive_not_on_disconnect() {
    let mut b = Broker::new(small());
    let will = Will {
        topic: "lwt/a".into(),
        payload: Bytes::from("gone"),
        qos: 1,
        retain: false,
    };
    b.connect(
        1,
        Version::V3,
        Connect {
            will: Some(will.clone()),
            ..connect("a", true)
        },
        ms(0),
    )
    .unwrap();
    b.disconnect(1, false, ms(1));
    b.closed(1, ms(1));
    assert!(!events(&mut b)
        .iter()
        .any(|e| matches!(e, Event::Will { .. })));

    b.connect(
        2,
        Version::V3,
        Connect {
            will: Some(will),
            ..connect("b", true)
        },
        ms(0),
    )
    .unwrap();
    assert_eq!(b.poll_timeout(2), Some(ms(15_000)));
    b.received(2, ms(10_000));
    b.handle_timeout(2, ms(15_000));
    assert!(!b.is_closing(2));
    b.handle_timeout(2, ms(25_000));
    assert!(b.is_closing(2));
    assert!(events(&mut b)
        .iter()
        .any(|e| matches!(e, Event::Will { topic, .. } if topic.as_str() == "lwt.a")));
    assert_eq!(b.stats().disconnects[Reason::KeepAlive as usize], 1);
}

#[test]
fn one_sweep_times_out_every_silent_client() {
    let mut b = Broker::new(small());
    b.connect(1, Version::V5, connect("a", true), ms(0))
        .unwrap();
    b.connect(2, Version::V5, connect("b", true), ms(0))
        .unwrap();
    b.received(2, ms(14_000));
    b.handle_timeouts(ms(15_000));
    assert!(b.is_closing(1) && !b.is_closing(2));
    assert!(events(&mut b).contains(&Event::Close(1)));
    assert!(drain(&mut b, 1).contains(&Out::Disconnect(Reason::KeepAlive)));
}

#[test]
fn subscription_limit_and_invalid_filters() {
    let mut b = Broker::new(small());
    b.connect(1, Version::V5, connect("a", true), ms(0))
        .unwrap();
    drain(&mut b, 1);
    let plan = b.plan_subscribe(
        1,
        &[
            ("a".into(), 0),
            ("a/#/b".into(), 0),
            ("b".into(), 0),
            ("c".into(), 0),
            ("a".into(), 1),
        ],
    );
    let codes: Vec<_> = plan
        .iter()
        .map(|p| p.pattern.as_ref().err().copied())
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            Some(SubCode::FilterInvalid),
            None,
            Some(SubCode::Quota),
            None
        ]
    );
}

#[test]
fn qos2_inbound_is_published_once_and_completed() {
    let mut b = Broker::new(small());
    b.connect(1, Version::V5, connect("a", true), ms(0))
        .unwrap();
    drain(&mut b, 1);
    let p = Publish {
        topic: "x".into(),
        payload: Bytes::from("once"),
        qos: 2,
        retain: false,
        dup: false,
        packet_id: Some(9),
    };
    let f = b.publish(1, p.clone(), ms(1)).unwrap();
    b.published(1, &f, Outcome::Published, ms(1));
    // The client resends before PUBREL: not published again.
    assert!(b.publish(1, Publish { dup: true, ..p }, ms(2)).is_none());
    b.pubrel(1, 9);
    assert_eq!(
        drain(&mut b, 1),
        vec![
            Out::PubRec {
                id: 9,
                code: AckCode::Success
            },
            Out::PubRec {
                id: 9,
                code: AckCode::Success
            },
            Out::PubComp { id: 9, found: true },
        ]
    );
}

#[test]
fn refused_publishes_by_version() {
    let mut b = Broker::new(small());
    b.connect(1, Version::V5, connect("five", true), ms(0))
        .unwrap();
    b.connect(2, Version::V3, connect("three", true), ms(0))
        .unwrap();
    drain(&mut b, 1);
    drain(&mut b, 2);
    let p = |id| Publish {
        topic: "a/b".into(),
        payload: Bytes::new(),
        qos: 1,
        retain: false,
        dup: false,
        packet_id: Some(id),
    };
    let f = b.publish(1, p(3), ms(1)).unwrap();
    b.published(1, &f, Outcome::NotAuthorized, ms(1));
    assert_eq!(
        drain(&mut b, 1),
        vec![Out::PubAck {
            id: 3,
            code: AckCode::NotAuthorized
        }]
    );
    let f = b.publish(2, p(4), ms(1)).unwrap();
    b.published(2, &f, Outcome::NotAuthorized, ms(1));
    assert!(b.is_closing(2), "3.1.1 cannot refuse in PUBACK: closed");
    // An unmappable topic (too many levels).
    let deep = "a/".repeat(20) + "a";
    assert!(b
        .publish(
            1,
            Publish {
                topic: deep,
                ..p(5)
            },
            ms(2)
        )
        .is_none());
    assert_eq!(
        drain(&mut b, 1),
        vec![Out::PubAck {
            id: 5,
            code: AckCode::TopicInvalid
        }]
    );
}

#[derive(Debug, Clone)]
enum Op {
    Deliver(u8),
    Ack,
    Send,
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..2).prop_map(Op::Deliver),
        2 => Just(Op::Ack),
        2 => Just(Op::Send),
        1 => Just(Op::Reconnect),
    ]
}

proptest! {
    /// Under any mix of deliveries, acknowledgements, sends and reconnects:
    /// the inflight window and the queue stay within their limits; every
    /// QoS 1 message that was queued is eventually acknowledged, first
    /// sent in queue order, and nothing is lost but QoS 0 messages that
    /// found the queue full (counted).
    #[test]
    fn qos1_is_never_lost_and_limits_hold(ops in proptest::collection::vec(op(), 1..200)) {
        let limits = small();
        let mut b = Broker::new(limits);
        let mut conn = 1;
        let sid = b.connect(conn, Version::V3, connect("p", false), ms(0)).unwrap();
        let mut next = 0u32;
        let mut queued_qos1 = Vec::new();
        let mut unacked: Vec<u16> = Vec::new();
        let mut first_sent: Vec<String> = Vec::new();
        let mut acked = std::collections::BTreeSet::new();
        let mut by_pid: std::collections::HashMap<u16, String> = Default::default();
        let mut all_ops = ops;
        // Then drain: ack everything until quiet.
        all_ops.extend(std::iter::repeat_n(Op::Send, 1).chain(std::iter::repeat_n(Op::Ack, 1)).cycle().take(400));
        for op in all_ops {
            match op {
                Op::Deliver(qos) => {
                    let body = format!("{next}");
                    next += 1;
                    let d = b.deliver(sid, "t", Bytes::from(body.clone()), qos);
                    if qos == 1 && d == Delivery::Queued {
                        queued_qos1.push(body);
                    }
                }
                Op::Ack => {
                    for pid in unacked.drain(..) {
                        b.puback(conn, pid);
                        if let Some(m) = by_pid.remove(&pid) {
                            acked.insert(m);
                        }
                    }
                }
                Op::Send => {
                    for o in drain(&mut b, conn) {
                        if let Out::Publish { msg, packet_id: Some(pid), dup } = o {
                            let body = String::from_utf8_lossy(&msg.payload).into_owned();
                            if !dup {
                                first_sent.push(body.clone());
                            }
                            by_pid.insert(pid, body);
                            unacked.push(pid);
                        }
                    }
                }
                Op::Reconnect => {
                    b.closed(conn, ms(1));
                    unacked.clear();
                    conn += 1;
                    prop_assert_eq!(b.connect(conn, Version::V3, connect("p", false), ms(2)), Ok(sid));
                }
            }
            prop_assert!(b.queued() <= limits.queue_len + usize::from(limits.max_inflight));
        }
        let expected: std::collections::BTreeSet<String> = queued_qos1.iter().cloned().collect();
        prop_assert_eq!(&acked, &expected);
        let order: Vec<&String> = first_sent.iter().filter(|m| expected.contains(*m)).collect();
        let want: Vec<&String> = queued_qos1.iter().collect();
        prop_assert_eq!(order, want);
    }
}
