//! A lightweight client's core across gateways: the same events arriving
//! through two gateways are delivered once (dedup by publisher, epoch and
//! sequence number), a gateway that runs ahead joins only once the stream
//! caught up with it, and after a failover with no gateway left the gap is
//! told to every subscription as `Lagged` (`gateway_lost`).

use bytes::Bytes;
use macula_pubsub::{BatchReceiver, Config, Event, PubSubCore, Role};
use macula_wire::NodeId;

type Core = PubSubCore<u32, ()>;

fn id(b: u8) -> NodeId {
    NodeId::from_bytes([b; 32])
}

fn client() -> Core {
    let mut c = Config::new(id(50), 1, "r", Role::Client, 1 << 20);
    c.require_proof = false;
    PubSubCore::new(c)
}

/// One PUBLISH_BATCH body of `publisher` (epoch 7): `(seq, topic)` each.
fn batch(publisher: NodeId, items: &[(u64, &str)]) -> Bytes {
    let mut topics: Vec<&str> = Vec::new();
    for (_, t) in items {
        if !topics.contains(t) {
            topics.push(t);
        }
    }
    let mut buf = Vec::new();
    macula_wire::encode_batch_frame(
        &mut buf,
        1 << 20,
        &publisher,
        7,
        &topics,
        items.iter().map(|&(seq, t)| macula_wire::BatchItem {
            seq,
            topic_index: topics.iter().position(|x| *x == t).unwrap(),
            payload: b"x",
            headers: &[],
            message_id: None,
        }),
    )
    .unwrap();
    Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..])
}

/// What one subscription received: its events' seqs, and its lag told.
#[derive(Default, Debug, PartialEq)]
struct Got {
    seqs: Vec<u64>,
    lagged: u64,
}

/// Feeds `body` from gateway `from` through `rx` and collects per sink.
fn feed(c: &mut Core, from: NodeId, body: &Bytes, rx: &mut BatchReceiver<u32>, got: &mut [Got]) {
    c.handle_batch(
        from,
        macula_wire::MessageType::PublishBatch as u8,
        body,
        rx,
        macula_pubsub::Millis(0),
    )
    .unwrap();
    rx.deliver_lagged(|s, n| got[*s as usize].lagged += n);
    rx.deliver(|s, e: &mut Vec<Event>| got[*s as usize].seqs.extend(e.drain(..).map(|e| e.seq)));
}

#[test]
fn two_gateways_deliver_each_event_once_whatever_the_interleaving() {
    let (p, ga, gb) = (id(1), id(2), id(3));
    let mut c = client();
    c.subscribe("t.*", 0).unwrap();
    let (mut ra, mut rb) = (BatchReceiver::new(false), BatchReceiver::new(false));
    let mut got = vec![Got::default()];
    let all: Vec<(u64, &str)> = (1..=30).map(|s| (s, "t.x")).collect();
    // A runs ahead, B catches up and overtakes: the union in order, once.
    feed(&mut c, ga, &batch(p, &all[0..10]), &mut ra, &mut got);
    feed(&mut c, gb, &batch(p, &all[0..5]), &mut rb, &mut got);
    feed(&mut c, gb, &batch(p, &all[5..20]), &mut rb, &mut got);
    feed(&mut c, ga, &batch(p, &all[10..25]), &mut ra, &mut got);
    feed(&mut c, gb, &batch(p, &all[20..30]), &mut rb, &mut got);
    feed(&mut c, ga, &batch(p, &all[25..30]), &mut ra, &mut got);
    assert_eq!(got[0].seqs, (1..=30).collect::<Vec<_>>());
    assert_eq!(got[0].lagged, 0, "copies are not losses");
}

#[test]
fn after_a_failover_with_no_gateway_left_the_gap_is_told_once() {
    let (p, q, ga, gb) = (id(1), id(4), id(2), id(3));
    let mut c = client();
    c.subscribe("t.*", 0).unwrap();
    c.subscribe("u.*", 1).unwrap();
    let (mut ra, mut rb) = (BatchReceiver::new(false), BatchReceiver::new(false));
    let mut got = vec![Got::default(), Got::default()];
    // p publishes on t.x only, q on u.y only.
    feed(
        &mut c,
        ga,
        &batch(p, &[(1, "t.x"), (2, "t.x")]),
        &mut ra,
        &mut got,
    );
    feed(&mut c, ga, &batch(q, &[(1, "u.y")]), &mut ra, &mut got);
    // A normal gap (q's other topics) is not a loss.
    feed(&mut c, ga, &batch(q, &[(4, "u.y")]), &mut ra, &mut got);
    assert_eq!((got[0].lagged, got[1].lagged), (0, 0));

    // A died and was the only one: watch. A late frame from A settles
    // nothing; through B, p's first event skipped 3..=5.
    c.gateway_lost(ga, true);
    assert_eq!(c.n_watched(), 2);
    feed(&mut c, ga, &batch(p, &[(3, "t.x")]), &mut ra, &mut got);
    assert_eq!(got[0].lagged, 0);
    feed(
        &mut c,
        gb,
        &batch(p, &[(7, "t.x"), (8, "t.x")]),
        &mut rb,
        &mut got,
    );
    // The lost events' topics are unknown: every subscription is told.
    assert_eq!((got[0].lagged, got[1].lagged), (3, 3));
    assert_eq!(got[0].seqs, [1, 2, 3, 7, 8]);
    // q resumes in sequence through B: nothing more to tell.
    feed(&mut c, gb, &batch(q, &[(5, "u.y")]), &mut rb, &mut got);
    assert_eq!((got[0].lagged, got[1].lagged), (3, 3));
    assert_eq!(c.n_watched(), 0);
    // Later gaps are normal again.
    feed(&mut c, gb, &batch(p, &[(20, "t.x")]), &mut rb, &mut got);
    assert_eq!(got[0].lagged, 3);
    let s = c.seq_stats();
    assert_eq!((s.n_watch_settled, s.n_watch_missing), (2, 3));
}

#[test]
fn a_full_node_never_watches() {
    let mut cfg = Config::new(id(9), 1, "r", Role::Node, 1 << 20);
    cfg.require_proof = false;
    let mut n: Core = PubSubCore::new(cfg);
    n.subscribe("t.*", 0).unwrap();
    let mut rx = BatchReceiver::new(false);
    let mut got = vec![Got::default()];
    feed(
        &mut n,
        id(1),
        &batch(id(1), &[(1, "t.x")]),
        &mut rx,
        &mut got,
    );
    n.gateway_lost(id(1), true);
    assert_eq!(n.n_watched(), 0);
    feed(
        &mut n,
        id(1),
        &batch(id(1), &[(9, "t.x")]),
        &mut rx,
        &mut got,
    );
    assert_eq!(got[0].lagged, 0);
}

/// The failure the join rule prevents (seen under a real kill -9): a new
/// gateway B, closer to the publisher, delivers 8.. while the old one (A)
/// still has 5..=7 in flight; accepting B's 8 would drop A's 5..=7 as old.
#[test]
fn a_gateway_attached_later_that_runs_ahead_loses_nothing() {
    let (p, ga, gb) = (id(1), id(2), id(3));
    let mut c = client();
    c.subscribe("t.*", 0).unwrap();
    let (mut ra, mut rb) = (BatchReceiver::new(false), BatchReceiver::new(false));
    let mut got = vec![Got::default()];
    let s =
        |r: std::ops::RangeInclusive<u64>| -> Vec<(u64, &str)> { r.map(|s| (s, "t.x")).collect() };
    feed(&mut c, ga, &batch(p, &s(1..=4)), &mut ra, &mut got);
    feed(&mut c, gb, &batch(p, &s(8..=9)), &mut rb, &mut got);
    feed(&mut c, ga, &batch(p, &s(5..=7)), &mut ra, &mut got);
    feed(&mut c, gb, &batch(p, &s(10..=10)), &mut rb, &mut got);
    feed(&mut c, ga, &batch(p, &s(8..=10)), &mut ra, &mut got);
    feed(&mut c, gb, &batch(p, &s(11..=12)), &mut rb, &mut got);
    feed(&mut c, ga, &batch(p, &s(11..=13)), &mut ra, &mut got);
    assert_eq!(got[0].seqs, (1..=13).collect::<Vec<_>>());
    // A dies: B had joined, so nothing is watched, nothing told.
    c.gateway_lost(ga, false);
    assert_eq!(c.n_watched(), 0);
    feed(&mut c, gb, &batch(p, &s(13..=15)), &mut rb, &mut got);
    assert_eq!(got[0].seqs, (1..=15).collect::<Vec<_>>());
    assert_eq!(got[0].lagged, 0);
}

#[test]
fn the_old_gateway_dying_before_the_new_one_joined_is_a_gap_told() {
    let (p, ga, gb) = (id(1), id(2), id(3));
    let mut c = client();
    c.subscribe("t.*", 0).unwrap();
    let (mut ra, mut rb) = (BatchReceiver::new(false), BatchReceiver::new(false));
    let mut got = vec![Got::default()];
    feed(
        &mut c,
        ga,
        &batch(p, &[(1, "t.x"), (2, "t.x")]),
        &mut ra,
        &mut got,
    );
    feed(&mut c, gb, &batch(p, &[(6, "t.x")]), &mut rb, &mut got);
    assert_eq!(got[0].seqs, [1, 2], "B ahead: not joined");
    // A dies with 3..=5 in flight; the client thought B covered it.
    c.gateway_lost(ga, false);
    assert_eq!(c.n_watched(), 1, "B had not joined p's stream");
    feed(&mut c, gb, &batch(p, &[(7, "t.x")]), &mut rb, &mut got);
    assert_eq!(got[0].seqs, [1, 2, 7]);
    assert_eq!(
        got[0].lagged, 4,
        "3..=6 told (6 was B's, dropped while waiting)"
    );
}
