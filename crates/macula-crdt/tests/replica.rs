//! The replication helper: deltas, digest repair, overflow, refusals, GC.

use macula_crdt::{
    Crdt, CrdtError, GCounter, HlcConfig, LwwMap, Message, Millis, NodeId, OrSet, Out, PnCounter,
    Replica, ReplicaConfig, Target,
};

fn id(b: u8) -> NodeId {
    NodeId::from_bytes([b; 32])
}

fn pair<C: Crdt>(config: ReplicaConfig) -> (Replica<C>, Replica<C>) {
    (
        Replica::new("s", id(1), C::default(), config.clone(), Millis(0)),
        Replica::new("s", id(2), C::default(), config, Millis(0)),
    )
}

/// Delivers `outs` from one replica to the other, and the answers back,
/// until nothing is left; returns how many messages went.
fn exchange<C: Crdt>(
    now: Millis,
    a: &mut Replica<C>,
    b: &mut Replica<C>,
    outs: Vec<Out<C>>,
) -> usize {
    let mut to_b: Vec<Out<C>> = outs;
    let mut to_a: Vec<Out<C>> = Vec::new();
    let mut n = 0;
    while !to_a.is_empty() || !to_b.is_empty() {
        for o in std::mem::take(&mut to_b) {
            assert_ne!(o.to, Target::Node(a.node()));
            n += 1;
            to_a.extend(b.handle_message(now, o.msg));
        }
        for o in std::mem::take(&mut to_a) {
            assert_ne!(o.to, Target::Node(b.node()));
            n += 1;
            to_b.extend(a.handle_message(now, o.msg));
        }
        assert!(n < 100, "no ping-pong");
    }
    n
}

#[test]
fn deltas_are_grouped_and_converge() {
    let (mut a, mut b) = pair::<OrSet<u8>>(ReplicaConfig::default());
    a.update(Millis(1), |s, ts| s.add(ts.node, 1)).unwrap();
    a.update(Millis(2), |s, ts| s.add(ts.node, 2)).unwrap();
    assert_eq!(a.version(), 2);
    let out = a.poll_transmit().expect("a delta group");
    assert_eq!(out.to, Target::All);
    assert!(matches!(out.msg, Message::Delta { .. }));
    assert_eq!(a.poll_transmit(), None);
    assert!(b.handle_message(Millis(3), out.msg.clone()).is_empty());
    assert_eq!(a.state(), b.state());
    assert_eq!(b.version(), 1);
    // A duplicate teaches nothing.
    b.handle_message(Millis(3), out.msg);
    assert_eq!(b.version(), 1);
    assert_eq!(b.stats().merged, 2);
    assert_eq!(b.stats().merged_new, 1);
    assert_eq!(a.stats().deltas_sent, 1);
    assert_eq!(a.stats().updates, 2);
}

#[test]
fn a_lost_delta_is_repaired_by_digests() {
    let (mut a, mut b) = pair::<OrSet<u8>>(ReplicaConfig::default());
    a.update(Millis(1), |s, ts| s.add(ts.node, 1)).unwrap();
    let _lost = a.poll_transmit();
    assert!(a.tick(Millis(999)).is_empty());
    assert_eq!(a.poll_timeout(), Millis(1000));
    let outs = a.tick(Millis(1000));
    assert_eq!(a.poll_timeout(), Millis(2000));
    assert_eq!(outs.len(), 1);
    assert!(matches!(outs[0].msg, Message::Digest { .. }));
    // b lacks what a has: it answers with its digest; a, seeing b's empty
    // digest, sends its whole state.
    exchange(Millis(1000), &mut a, &mut b, outs);
    assert_eq!(a.state(), b.state());
    assert_eq!(a.stats().states_sent, 1);
    // Both have updates the other lacks: a digest brings deltas both ways.
    a.update(Millis(5), |s, ts| s.add(ts.node, 2)).unwrap();
    b.update(Millis(5), |s, ts| Ok(s.remove(ts.node, &1)))
        .unwrap();
    let _ = (a.poll_transmit(), b.poll_transmit());
    let outs = b.tick(Millis(1000));
    exchange(Millis(1000), &mut b, &mut a, outs);
    assert_eq!(a.state(), b.state());
    assert_eq!(a.state().iter().copied().collect::<Vec<_>>(), vec![2]);
    assert!(a.stats().deltas_sent >= 1 && b.stats().deltas_sent >= 1);
    // Caught up: a digest gets no answer.
    let outs = a.tick(Millis(5000));
    assert_eq!(exchange(Millis(5000), &mut a, &mut b, outs), 1);
}

#[test]
fn an_overflowing_delta_group_falls_back_to_digest_sync() {
    let config = ReplicaConfig {
        max_pending: 2,
        ..ReplicaConfig::default()
    };
    let (mut a, mut b) = pair::<OrSet<u8>>(config);
    for x in 0..5 {
        a.update(Millis(1), |s, ts| s.add(ts.node, x)).unwrap();
    }
    assert_eq!(a.stats().overflows, 1);
    let out = a
        .poll_transmit()
        .expect("the digest that replaces the group");
    assert!(matches!(out.msg, Message::Digest { .. }));
    assert_eq!(a.poll_transmit(), None);
    exchange(Millis(2), &mut a, &mut b, vec![out]);
    assert_eq!(a.state(), b.state());
    assert_eq!(b.state().len(), 5);
    // After the fallback, grouping resumes.
    a.update(Millis(3), |s, ts| s.add(ts.node, 9)).unwrap();
    assert!(matches!(
        a.poll_transmit().map(|o| o.msg),
        Some(Message::Delta { .. })
    ));
}

#[test]
fn a_timestamp_too_far_ahead_is_refused_until_the_clock_catches_up() {
    let config = ReplicaConfig {
        hlc: HlcConfig {
            max_drift: Millis(1_000),
        },
        ..ReplicaConfig::default()
    };
    let (mut a, mut b) = pair::<LwwMap<u8, u8>>(config);
    a.update(Millis(10_000), |s, ts| s.insert(ts, 1, 1))
        .unwrap();
    let msg = a.poll_transmit().unwrap().msg;
    b.handle_message(Millis(8_999), msg.clone());
    assert_eq!(b.stats().refused_drift, 1);
    assert_eq!(b.hlc().refused(), 1);
    assert!(b.state().is_empty());
    b.handle_message(Millis(9_000), msg);
    assert_eq!(b.state().get(&1), Some(&1));
    // b's next write is after a's, although its wall clock is behind.
    b.update(Millis(9_000), |s, ts| s.insert(ts, 1, 2)).unwrap();
    a.handle_message(Millis(10_000), b.poll_transmit().unwrap().msg);
    assert_eq!(a.state().get(&1), Some(&2));
}

#[test]
fn limits_refuse_local_updates_and_remote_merges() {
    let mut a = Replica::new(
        "s",
        id(1),
        OrSet::new(),
        ReplicaConfig::default(),
        Millis(0),
    );
    let mut b = Replica::new(
        "s",
        id(2),
        OrSet::with_max_entries(1),
        ReplicaConfig::default(),
        Millis(0),
    );
    b.update(Millis(1), |s, ts| s.add(ts.node, 0u8)).unwrap();
    let err = b.update(Millis(1), |s, ts| s.add(ts.node, 1)).unwrap_err();
    assert!(matches!(err, CrdtError::LimitExceeded { limit: 1, .. }));
    assert_eq!(b.stats().updates_refused, 1);
    a.update(Millis(1), |s, ts| s.add(ts.node, 5)).unwrap();
    b.handle_message(Millis(2), a.poll_transmit().unwrap().msg);
    assert_eq!(b.stats().refused_limit, 1);
    assert!(!b.state().contains(&5));
}

#[test]
fn messages_for_another_name_or_from_itself_are_ignored() {
    let (mut a, _) = pair::<PnCounter>(ReplicaConfig::default());
    let mut other = Replica::new(
        "t",
        id(2),
        PnCounter::new(),
        ReplicaConfig::default(),
        Millis(0),
    );
    other
        .update(Millis(1), |s, ts| s.increment(ts.node, 3))
        .unwrap();
    let msg = other.poll_transmit().unwrap().msg;
    assert_eq!(msg.name(), "t");
    assert_eq!(msg.from(), id(2));
    assert!(a.handle_message(Millis(2), msg).is_empty());
    a.update(Millis(1), |s, ts| s.decrement(ts.node, 1))
        .unwrap();
    let own = a.poll_transmit().unwrap().msg;
    a.handle_message(Millis(2), own);
    assert_eq!(a.stats().ignored, 2);
    assert_eq!(a.state().value(), -1);
    assert_eq!(a.name(), "s");
    // An empty delta is not sent.
    a.update(Millis(3), |s, ts| s.increment(ts.node, 0))
        .unwrap();
    assert_eq!(a.poll_transmit(), None);
    assert_eq!(a.version(), 1);
}

#[test]
fn tombstones_are_collected_once_every_member_acknowledged_them() {
    let config = ReplicaConfig {
        gc_horizon: Some(Millis(5_000)),
        members: vec![id(1), id(2)],
        ..ReplicaConfig::default()
    };
    let (mut a, mut b) = pair::<LwwMap<u8, u8>>(config);
    a.update(Millis(100), |s, ts| s.insert(ts, 1, 1)).unwrap();
    a.update(Millis(200), |s, ts| Ok(s.remove(ts, &1))).unwrap();
    let _lost = a.poll_transmit();
    // Past the horizon, but b has not acknowledged (no digest from it yet).
    let outs = a.tick(Millis(6_000));
    assert_eq!(a.state().tombstones(), 1);
    // The exchange gives b the tombstone; b's digest reaches a.
    exchange(Millis(6_000), &mut a, &mut b, outs);
    assert_eq!(b.state().tombstones(), 1);
    let outs = b.tick(Millis(7_000));
    exchange(Millis(7_000), &mut b, &mut a, outs);
    let outs = a.tick(Millis(7_000));
    assert_eq!(a.state().tombstones(), 0);
    assert_eq!(a.stats().collected, 1);
    exchange(Millis(7_000), &mut a, &mut b, outs);
    b.tick(Millis(8_000));
    assert_eq!(b.state().tombstones(), 0);
    assert_eq!(a.state(), b.state());
    // Without members, nothing is ever collected.
    let (mut c, _) = pair::<LwwMap<u8, u8>>(ReplicaConfig::default());
    c.update(Millis(1), |s, ts| s.insert(ts, 1, 1)).unwrap();
    c.update(Millis(2), |s, ts| Ok(s.remove(ts, &1))).unwrap();
    c.tick(Millis(1 << 40));
    assert_eq!(c.state().tombstones(), 1);
}

#[test]
fn digests_go_to_known_peers_in_turn() {
    let config = ReplicaConfig {
        digest_fanout: Some(2),
        max_peers: 3,
        members: vec![id(9), id(1)],
        ..ReplicaConfig::default()
    };
    let mut a = Replica::new("s", id(1), GCounter::new(), config, Millis(0));
    // Members are known from the start (never itself).
    assert_eq!(a.peers(), &[id(9)]);
    let targets =
        |outs: Vec<Out<GCounter>>| -> Vec<Target> { outs.into_iter().map(|o| o.to).collect() };
    // Fewer peers than the fanout: each once.
    assert_eq!(targets(a.tick(Millis(1_000))), vec![Target::Node(id(9))]);
    // Senders are learned, up to the limit, in node order.
    for b in [5u8, 3, 7] {
        let mut other = Replica::new(
            "s",
            id(b),
            GCounter::new(),
            ReplicaConfig::default(),
            Millis(0),
        );
        other
            .update(Millis(1), |s, ts| s.increment(ts.node, 1))
            .unwrap();
        a.handle_message(Millis(1), other.poll_transmit().unwrap().msg);
    }
    assert_eq!(a.peers(), &[id(3), id(5), id(9)]);
    assert_eq!(a.state().value(), 3);
    let t1 = targets(a.tick(Millis(2_000)));
    let t2 = targets(a.tick(Millis(3_000)));
    assert_eq!(t1.len(), 2);
    assert_eq!(t2.len(), 2);
    let mut all = t1.clone();
    all.extend(t2);
    for p in [id(3), id(5), id(9)] {
        assert!(
            all.contains(&Target::Node(p)),
            "every peer in turn: {all:?}"
        );
    }
    assert_eq!(a.stats().digests_sent, 5);
    // Without a fanout, digests are broadcast.
    let mut b = Replica::new(
        "s",
        id(2),
        GCounter::new(),
        ReplicaConfig {
            digest_fanout: None,
            ..ReplicaConfig::default()
        },
        Millis(0),
    );
    b.handle_message(
        Millis(1),
        Message::Digest {
            name: "s".into(),
            from: id(4),
            digest: Default::default(),
        },
    );
    assert_eq!(b.peers(), &[id(4)]);
    assert_eq!(targets(b.tick(Millis(1_000))), vec![Target::All]);
}

#[test]
fn or_set_answers_carry_what_the_receiver_applied() {
    let (mut a, mut b) = pair::<OrSet<u8>>(ReplicaConfig::default());
    a.update(Millis(1), |s, ts| s.add(ts.node, 1)).unwrap();
    a.update(Millis(1), |s, ts| s.add(ts.node, 1)).unwrap();
    let _lost = a.poll_transmit();
    let outs = a.tick(Millis(1_000));
    exchange(Millis(1_000), &mut a, &mut b, outs);
    assert_eq!(b.state().applied(), a.state().applied());
    assert_eq!(b.state(), a.state());
}
