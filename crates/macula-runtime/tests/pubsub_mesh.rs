//! Pub/sub through real nodes over QUIC on 127.0.0.1: the wildcard matrix
//! (positive and negative cases, publisher and subscribers on different
//! nodes), withdrawal of interest when a subscription is dropped, and a
//! stalled subscriber that must not hold back another one on the same node.
//!
//! Negative cases are checked with fences: after the topics under test, the
//! publisher sends one more topic that the subscription does match. Events of
//! one publisher arrive in publish order, so once a subscription has its
//! fence, anything else it was ever going to get has arrived too.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use macula_pubsub::queue::QUEUE_CAPACITY;
use macula_runtime::pubsub::{
    Event, Overflow, PublishOptions, Subscription, SubscriptionItem, INTEREST_CACHE_TTL,
};
use macula_runtime::NodeRuntime;

async fn subscribe(n: &NodeRuntime, pattern: &str) -> Subscription {
    within(STEP, "subscribe", n.pubsub().subscribe_mesh(pattern))
        .await
        .unwrap_or_else(|e| panic!("subscribe {pattern:?}: {e}"))
}

async fn next_event(sub: &mut Subscription, what: &str) -> Event {
    match within(STEP, what, sub.next()).await {
        Some(SubscriptionItem::Event(e)) => e,
        other => panic!("{what}: expected an event, got {other:?}"),
    }
}

fn close_all(nodes: &[&NodeRuntime]) -> impl std::future::Future<Output = ()> {
    let nodes: Vec<NodeRuntime> = nodes.iter().map(|n| (*n).clone()).collect();
    async move {
        futures::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
    }
}

/// Topics published, in this order, before the fences.
const TOPICS: &[&str] = &[
    "sensor",
    "sensor.temp",
    "sensor.temp.room1",
    "sensor.temp.room1.extra",
    "sensor.room1",
    "sensor.temp.room2",
    "sensor.a.b.room1",
    "sensors",
    "other.sensor",
    "alarm",
    "a.b.alarm",
    "a.alarm.b",
    "alarms",
    "orders",
    "orders.new",
    "orders.new.eu",
    "a.b",
    "a.x.y.b",
    "a.b.c",
];

/// (pattern, the topics of `TOPICS` it matches in publish order, its fence).
/// Written out by hand, not computed with the matcher under test. The issue's
/// cases come first; `orders.*` is the pattern the seeds use (an ACL resource
/// and `macula trace subscribe "orders.*"`); the rest cover `**` at the
/// start, in the middle and alone, and `*` alone and first.
const MATRIX: &[(&str, &[&str], &str)] = &[
    (
        "sensor.**",
        &[
            "sensor",
            "sensor.temp",
            "sensor.temp.room1",
            "sensor.temp.room1.extra",
            "sensor.room1",
            "sensor.temp.room2",
            "sensor.a.b.room1",
        ],
        "sensor.fence0",
    ),
    (
        "sensor.*.room1",
        &["sensor.temp.room1"],
        "sensor.fence1.room1",
    ),
    (
        "sensor.*",
        &["sensor.temp", "sensor.room1"],
        "sensor.fence2",
    ),
    ("**.alarm", &["alarm", "a.b.alarm"], "fence3.alarm"),
    ("orders.*", &["orders.new"], "orders.fence4"),
    ("*.new", &["orders.new"], "fence5.new"),
    ("a.**.b", &["a.alarm.b", "a.b", "a.x.y.b"], "a.fence6.b"),
    ("**", TOPICS, "fence7"),
    (
        "*",
        &["sensor", "sensors", "alarm", "alarms", "orders"],
        "fence8",
    ),
];

/// Reads `sub` until its own fence; returns the other topics it got, in
/// order (fences of other patterns are skipped).
async fn until_fence(sub: &mut Subscription, fence: &str, where_: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let what = format!("{where_} {} waiting for its fence {fence}", sub.pattern());
        let e = next_event(sub, &what).await;
        if e.topic == fence {
            return got;
        }
        if !e.topic.contains("fence") {
            got.push(e.topic.to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_matrix_across_nodes_positive_and_negative() {
    init_tracing();
    let (a, b, c) = line().await;
    // The same patterns on the publisher's own node (in-process delivery)
    // and two hops away (over QUIC).
    let mut remote = Vec::new();
    let mut local = Vec::new();
    for (pattern, _, _) in MATRIX {
        remote.push(subscribe(&c, pattern).await);
        local.push(subscribe(&a, pattern).await);
    }
    for (i, t) in TOPICS.iter().enumerate() {
        publish(&a, t, &i.to_string()).await;
    }
    for (_, _, fence) in MATRIX {
        publish(&a, fence, "fence").await;
    }
    for (((pattern, want, fence), r), l) in MATRIX.iter().zip(&mut remote).zip(&mut local) {
        let got = until_fence(r, fence, "remote").await;
        assert_eq!(got, *want, "pattern {pattern:?} on another node");
        let got = until_fence(l, fence, "local").await;
        assert_eq!(got, *want, "pattern {pattern:?} on the publisher's node");
    }
    // One copy per interested node: every topic and fence was matched by at
    // least one pattern on C (`**`), so exactly one PUBLISH each went out.
    let sent = a.pubsub().counters().sent_remote_total.get();
    assert_eq!(sent, (TOPICS.len() + MATRIX.len()) as u64);
    let cc = c.pubsub().counters();
    assert_eq!(cc.duplicates_dropped_total.get(), 0);
    assert_eq!(cc.gaps_total.get(), 0);
    drop((remote, local));
    close_all(&[&a, &b, &c]).await;
}

/// How long after a subscription is dropped its node may still be sent
/// messages for it: the publisher's interest cache (`INTEREST_CACHE_TTL`)
/// plus the time the withdrawal takes to be stored in the DHT (a put on
/// loopback: milliseconds; generous here for debug builds on a busy machine).
const WITHDRAW_GRACE: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery_to_that_node() {
    init_tracing();
    let (a, b, c) = line().await;
    let orders = subscribe(&c, "orders.*").await;
    let mut payments = subscribe(&c, "payments.*").await;
    let mut orders = orders;
    publish(&a, "orders.new", "o1").await;
    publish(&a, "payments.new", "p1").await;
    assert_eq!(next_event(&mut orders, "orders").await.payload, "o1");
    assert_eq!(next_event(&mut payments, "payments").await.payload, "p1");

    let sent = || a.pubsub().counters().sent_remote_total.get();
    let received = || c.pubsub().counters().received_remote_total.get();
    assert_eq!((sent(), received()), (2, 2));

    // Drop `orders.*` and keep publishing on it. Until the bound a publish
    // may still go to C (where it matches nothing); after it, none may.
    drop(orders);
    let dropped_at = Instant::now();
    let bound = INTEREST_CACHE_TTL + WITHDRAW_GRACE;
    let watch_until = dropped_at + bound + Duration::from_secs(1);
    let mut last_sent_after: Option<Duration> = None;
    let (mut late_publishes, mut i) = (0u64, 0u64);
    while Instant::now() < watch_until {
        let before = sent();
        let at = dropped_at.elapsed();
        publish(&a, "orders.new", &format!("late {i}")).await;
        i += 1;
        if sent() > before {
            last_sent_after = Some(at);
        }
        if at > bound {
            late_publishes += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        late_publishes >= 10,
        "watched too little past the bound: {late_publishes}"
    );
    if let Some(t) = last_sent_after {
        assert!(
            t <= bound,
            "a publish {t:?} after the unsubscribe still went to the node (bound {bound:?})"
        );
    }
    // C, which still subscribes to `payments.*`, received nothing more than
    // what was sent to it, and is still reachable for its other pattern.
    let sent_for_orders = sent() - 2;
    assert_eq!(
        received(),
        2 + sent_for_orders,
        "C received only what A sent"
    );
    publish(&a, "payments.new", "p2").await;
    assert_eq!(next_event(&mut payments, "payments").await.payload, "p2");
    assert_eq!(sent(), 2 + sent_for_orders + 1);
    assert_eq!(payments.pending(), 0);
    drop(payments);
    close_all(&[&a, &b, &c]).await;
}

/// Messages published past the stalled subscription's bound.
const STALL_TOTAL: usize = 3 * QUEUE_CAPACITY;
/// The publisher stays at most this far ahead of the live subscriber, so the
/// live one never overflows its own queue (that would be legitimate loss).
const LIVE_WINDOW: u64 = (QUEUE_CAPACITY / 4) as u64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_hold_back_another_on_the_same_node() {
    init_tracing();
    let p = start(config()).await;
    let s = start(boot(&p)).await;
    joined(&s).await;
    let mut stalled = subscribe(&s, "feed.*").await;
    let live = subscribe(&s, "feed.*").await;

    // The live subscriber drains in its own task and reports progress.
    let progress = Arc::new(AtomicU64::new(0));
    let reader = {
        let progress = progress.clone();
        let mut live = live;
        tokio::spawn(async move {
            let mut bodies = Vec::with_capacity(STALL_TOTAL);
            let mut lagged = 0u64;
            while bodies.len() < STALL_TOTAL {
                match live.next().await {
                    Some(SubscriptionItem::Event(e)) => {
                        bodies.push(String::from_utf8_lossy(&e.payload).into_owned());
                        progress.store(bodies.len() as u64, Relaxed);
                    }
                    Some(SubscriptionItem::Lagged(n)) => lagged += n,
                    None => break,
                }
            }
            (bodies, lagged)
        })
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut max_pending = 0usize;
    for i in 0..STALL_TOTAL {
        while i as u64 >= progress.load(Relaxed) + LIVE_WINDOW {
            assert!(
                Instant::now() < deadline,
                "the live subscriber stopped at {} of {i} published; stalled one holds {}",
                progress.load(Relaxed),
                stalled.pending()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        publish(&p, "feed.data", &i.to_string()).await;
        max_pending = max_pending.max(stalled.pending());
    }
    let (bodies, lagged) = within(Duration::from_secs(60), "live subscriber", reader)
        .await
        .expect("reader task");
    let want: Vec<String> = (0..STALL_TOTAL).map(|i| i.to_string()).collect();
    assert_eq!(lagged, 0, "the live subscriber never lagged");
    let first_bad = bodies.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        bodies.len() == want.len() && first_bad.is_none(),
        "the live subscriber got {} of {} events, first out of place at {first_bad:?}",
        bodies.len(),
        want.len()
    );

    // Memory stayed bounded: the stalled queue never held more than its bound.
    assert!(
        max_pending <= QUEUE_CAPACITY,
        "{max_pending} > {QUEUE_CAPACITY}"
    );
    assert_eq!(stalled.pending(), QUEUE_CAPACITY);
    // Once polled it is told what it lost, then gets the newest, in order.
    let dropped = (STALL_TOTAL - QUEUE_CAPACITY) as u64;
    match within(STEP, "stalled first item", stalled.next()).await {
        Some(SubscriptionItem::Lagged(n)) => assert_eq!(n, dropped),
        other => panic!("expected Lagged({dropped}), got {other:?}"),
    }
    for i in STALL_TOTAL - QUEUE_CAPACITY..STALL_TOTAL {
        let e = next_event(&mut stalled, "stalled backlog").await;
        assert_eq!(e.payload, Bytes::from(i.to_string()));
    }
    assert_eq!(stalled.pending(), 0);
    let sc = s.pubsub().counters();
    assert_eq!(sc.dropped_slow_total.get(), dropped);
    assert_eq!(sc.received_remote_total.get(), STALL_TOTAL as u64);
    assert_eq!(sc.gaps_total.get(), 0);
    let pc = p.pubsub().counters();
    assert_eq!(pc.remote_dropped_total.get(), 0);
    drop(stalled);
    close_all(&[&p, &s]).await;
}

/// Messages of the flat-out publish: well past the small peer queue below,
/// so the publisher must wait for room many times.
const FLAT_OUT: usize = 50_000;
/// The publisher's queue to the subscriber's node, kept small.
const SMALL_PEER_QUEUE: usize = 256;

/// A publisher whose node has a small queue to the subscriber's node
/// (`SMALL_PEER_QUEUE`) and a subscriber draining in its own task.
///
/// The stall timeout is raised on both nodes: on a loaded machine, filling
/// the queues can take longer than half the default (when a subscription
/// that takes nothing goes lossy), and these tests are about queues, not
/// about the stall cut-off.
async fn small_queue_pair() -> (NodeRuntime, NodeRuntime, Subscription) {
    let mut cfg = config();
    cfg.pubsub.peer_queue_capacity = SMALL_PEER_QUEUE;
    cfg.limits.pubsub_stall_timeout = Duration::from_secs(600);
    let p = start(cfg).await;
    let mut scfg = boot(&p);
    scfg.limits.pubsub_stall_timeout = Duration::from_secs(600);
    let s = start(scfg).await;
    joined(&s).await;
    let sub = subscribe(&s, "flat.*").await;
    (p, s, sub)
}

async fn publish_with(
    n: &NodeRuntime,
    body: String,
    overflow: Overflow,
) -> Result<u64, macula_runtime::pubsub::PubSubError> {
    let opts = PublishOptions {
        overflow,
        ..Default::default()
    };
    n.pubsub()
        .publish_mesh("flat.data", Bytes::from(body), opts)
        .await
}

/// The default policy waits for room: every message of a flat-out publisher
/// arrives, in order, and nothing is dropped anywhere (counts asserted, not
/// timings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_out_publisher_loses_nothing_by_default() {
    init_tracing();
    let (p, s, mut sub) = small_queue_pair().await;
    let reader = tokio::spawn(async move {
        let mut next = 0usize;
        while next < FLAT_OUT {
            match sub.next().await {
                Some(SubscriptionItem::Event(e)) => {
                    assert_eq!(e.payload, Bytes::from(next.to_string()), "in order");
                    next += 1;
                }
                other => panic!("after {next} events: {other:?}"),
            }
        }
        next
    });
    for i in 0..FLAT_OUT {
        publish_with(&p, i.to_string(), Overflow::Block)
            .await
            .expect("Block never fails for a full queue");
    }
    let got = within(Duration::from_secs(120), "subscriber", reader)
        .await
        .expect("reader");
    assert_eq!(got, FLAT_OUT);
    let pc = p.pubsub().counters();
    assert_eq!(pc.remote_dropped_total.get(), 0);
    assert_eq!(pc.sent_remote_total.get(), FLAT_OUT as u64);
    assert!(
        pc.publish_blocked_total.get() > 0,
        "a {SMALL_PEER_QUEUE}-message queue never filled: the test proves nothing"
    );
    let sc = s.pubsub().counters();
    assert_eq!(sc.received_remote_total.get(), FLAT_OUT as u64);
    assert_eq!(sc.dropped_slow_total.get(), 0);
    close_all(&[&p, &s]).await;
}

/// A subscriber slower than its publisher, with a small subscription queue:
/// its node's reader waits for room instead of dropping (QUIC flow control
/// carries the wait back to the publisher's queue, where `Block` waits), so
/// every event arrives in order and nothing is lagged (counts asserted, no
/// timings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_slows_its_publisher_and_loses_nothing() {
    const N: usize = 20_000;
    init_tracing();
    let mut pcfg = config();
    pcfg.pubsub.peer_queue_capacity = SMALL_PEER_QUEUE;
    let p = start(pcfg).await;
    let mut scfg = boot(&p);
    scfg.pubsub.queue_capacity = 128;
    let s = start(scfg).await;
    joined(&s).await;
    let mut sub = subscribe(&s, "flat.*").await;
    let reader = tokio::spawn(async move {
        let mut next = 0usize;
        while next < N {
            match sub.next().await {
                Some(SubscriptionItem::Event(e)) => {
                    assert_eq!(e.payload, Bytes::from(next.to_string()), "in order");
                    next += 1;
                    if next.is_multiple_of(200) {
                        // A reader far slower than a flat-out publisher.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                other => panic!("after {next} events: {other:?}"),
            }
        }
        next
    });
    for i in 0..N {
        publish_with(&p, i.to_string(), Overflow::Block)
            .await
            .expect("Block never fails for a full queue");
    }
    let got = within(Duration::from_secs(120), "subscriber", reader)
        .await
        .expect("reader");
    assert_eq!(got, N);
    let sc = s.pubsub().counters();
    assert_eq!(sc.dropped_slow_total.get(), 0);
    assert_eq!(sc.subscriber_overruns_total.get(), 0);
    assert_eq!(p.pubsub().counters().remote_dropped_total.get(), 0);
    close_all(&[&p, &s]).await;
}

/// `FailFast` refuses a publish while the queue is full (nothing published,
/// the node named); `DropNewest` drops and counts instead. Neither waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fast_and_drop_newest_never_wait() {
    init_tracing();
    let (p, s, sub) = small_queue_pair().await;
    // The subscriber reads nothing; the queue to its node fills as soon as
    // QUIC's flow-control window is full.
    let mut refused = None;
    for i in 0..200_000 {
        match publish_with(&p, format!("{i:0>1000}"), Overflow::FailFast).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, err) = refused.expect("a full queue refuses a FailFast publish");
    assert!(
        matches!(err, macula_runtime::pubsub::PubSubError::QueueFull { node, .. } if node == s.node_id()),
        "{err}"
    );
    let pc = p.pubsub().counters();
    assert_eq!(pc.publish_refused_total.get(), 1);
    assert_eq!(pc.remote_dropped_total.get(), 0);
    assert_eq!(pc.published_total.get(), at as u64);
    // DropNewest on the same full queue: published, dropped for that node.
    // The queue may still give up a message or two after the refusal (the
    // subscriber's node reads until its own queue is full), so DropNewest
    // publishes until one is dropped; those queued before it are owed.
    let mut queued_late = 0u64;
    while pc.remote_dropped_total.get() == 0 {
        assert!(queued_late < 1_000, "DropNewest never dropped");
        publish_with(&p, "late".into(), Overflow::DropNewest)
            .await
            .expect("DropNewest publishes");
        if pc.remote_dropped_total.get() == 0 {
            queued_late += 1;
        }
    }
    assert_eq!(pc.remote_dropped_total.get(), 1);
    // The subscriber reads again: every message arrives but the dropped
    // one, which is told as Lagged(1) (a loss report), before the events
    // still queued behind it.
    let mut sub = sub;
    let (mut events, mut lagged) = (0u64, 0u64);
    let want = at as u64 + queued_late;
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while events < want || lagged < 1 {
            match sub.next().await {
                Some(SubscriptionItem::Event(_)) => events += 1,
                Some(SubscriptionItem::Lagged(n)) => lagged += n,
                None => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{events} of {want} events, lagged {lagged}");
    assert_eq!((events, lagged), (want, 1));
    assert_eq!(pc.loss_reported_total.get(), 1);
    assert_eq!(
        s.pubsub().counters().loss_told_total.get(),
        1,
        "told to the one subscription"
    );
    drop(sub);
    close_all(&[&p, &s]).await;
}
