//! Pub/sub across real nodes over QUIC on 127.0.0.1: interest registered in
//! the DHT, one copy per interested node, per-publisher order, no
//! duplicates, withdrawal on drop.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use macula_runtime::pubsub::{PublishOptions, Subscription, SubscriptionItem, INTEREST_CACHE_TTL};
use macula_runtime::{NodeConfig, NodeRuntime, PeerAddr};

fn boot(to: &NodeRuntime) -> NodeConfig {
    NodeConfig {
        bootstrap: vec![PeerAddr::from(to.local_addr())],
        ..config()
    }
}

async fn joined(n: &NodeRuntime) {
    within(STEP, "DHT join", n.dht().wait_bootstrapped())
        .await
        .expect("joins");
}

async fn next_event(sub: &mut Subscription) -> macula_runtime::pubsub::Event {
    match within(STEP, "an event", sub.next()).await {
        Some(SubscriptionItem::Event(e)) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn publish(n: &NodeRuntime, topic: &str, body: &str) {
    n.pubsub()
        .publish_mesh(
            topic,
            Bytes::from(body.to_string()),
            PublishOptions::default(),
        )
        .await
        .expect("publish");
}

/// A - B - C in a line: C joins only through B, B through A.
async fn line() -> (NodeRuntime, NodeRuntime, NodeRuntime) {
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let c = start(boot(&b)).await;
    joined(&c).await;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_two_hops_away_gets_every_message_once_in_order() {
    init_tracing();
    let (a, b, c) = line().await;
    let mut on_c = within(STEP, "subscribe", c.pubsub().subscribe_mesh("sensor.**"))
        .await
        .expect("subscribe on C");
    let mut on_b = within(
        STEP,
        "subscribe",
        b.pubsub().subscribe_mesh("sensor.*.room1"),
    )
    .await
    .expect("subscribe on B");

    for i in 0..100 {
        publish(&a, "sensor.temp.room1", &i.to_string()).await;
    }
    publish(&a, "sensor.humidity", "h").await;
    publish(&a, "other.topic", "nobody").await;

    let mut last = 0;
    for i in 0..100 {
        let e = next_event(&mut on_c).await;
        assert_eq!(e.publisher, a.node_id());
        assert_eq!(e.payload, Bytes::from(i.to_string()), "in publish order");
        assert!(e.seq > last, "seq increases");
        last = e.seq;
    }
    assert_eq!(next_event(&mut on_c).await.topic, "sensor.humidity");
    for _ in 0..100 {
        assert_eq!(next_event(&mut on_b).await.topic, "sensor.temp.room1");
    }
    // Nothing else: no duplicate, and nothing for the unmatched topic.
    assert!(on_c.pending() == 0 && on_b.pending() == 0);
    let cc = c.pubsub().counters();
    assert_eq!(cc.received_remote_total.load(Relaxed), 101);
    assert_eq!(cc.duplicates_dropped_total.load(Relaxed), 0);
    // One copy per interested node: 101 to C and 100 to B.
    assert_eq!(a.pubsub().counters().sent_remote_total.load(Relaxed), 201);
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_remote_subscribers_and_withdrawal() {
    init_tracing();
    let (a, b, c) = line().await;
    let mut local = within(STEP, "subscribe", a.pubsub().subscribe_mesh("orders.*"))
        .await
        .unwrap();
    let remote = within(STEP, "subscribe", c.pubsub().subscribe_mesh("*.new"))
        .await
        .unwrap();
    publish(&a, "orders.new", "x").await;
    assert_eq!(next_event(&mut local).await.topic, "orders.new");
    let mut remote = remote;
    assert_eq!(next_event(&mut remote).await.topic, "orders.new");
    let sent = a.pubsub().counters().sent_remote_total.load(Relaxed);
    assert_eq!(sent, 1, "local delivery used no network");

    // Drop the remote subscription: once the withdrawal is stored and the
    // publisher's interest cache has expired, nothing more is sent to C.
    drop(remote);
    let withdrawn = async {
        loop {
            tokio::time::sleep(INTEREST_CACHE_TTL + Duration::from_millis(100)).await;
            let before = a.pubsub().counters().sent_remote_total.load(Relaxed);
            publish(&a, "orders.new", "y").await;
            if a.pubsub().counters().sent_remote_total.load(Relaxed) == before {
                return;
            }
        }
    };
    within(STEP, "withdrawal reaches the publisher", withdrawn).await;
    // Bad input from the application is refused with the reason.
    let err = a
        .pubsub()
        .publish_mesh("orders.*", Bytes::new(), PublishOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("orders.*"), "{err}");
    let _ = b;
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}
