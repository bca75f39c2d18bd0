//! Pub/sub within one process: local delivery through real subscription
//! queues and wakers, lag, unsubscribe, refusals. (The core's decisions are
//! unit-tested in `macula-pubsub`; these go through the driver.)

use bytes::Bytes;
use futures::StreamExt;
use macula_pubsub::event::MAX_HEADERS;
use macula_pubsub::Limits;
use macula_runtime::pubsub::{PubSub, PubSubError, PublishOptions, Subscription, SubscriptionItem};
use macula_wire::NodeId;

fn ps(queue_capacity: usize) -> PubSub {
    PubSub::new(
        NodeId::from_bytes([1; 32]),
        macula_wire::DEFAULT_MAX_FRAME_SIZE,
        Limits {
            queue_capacity,
            ..Limits::default()
        },
    )
}

fn publish(p: &PubSub, topic: &str, body: &str) {
    p.publish(
        topic,
        Bytes::from(body.to_string()),
        PublishOptions::default(),
    )
    .unwrap();
}

fn drain(s: &mut Subscription) -> Vec<SubscriptionItem> {
    let mut out = Vec::new();
    while let Some(Some(item)) = s.next().now_or_never() {
        out.push(item);
    }
    out
}

fn topics(items: &[SubscriptionItem]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| match i {
            SubscriptionItem::Event(e) => Some(e.topic.to_string()),
            SubscriptionItem::Lagged(_) => None,
        })
        .collect()
}

use futures::FutureExt;

#[test]
fn wildcard_matrix_through_subscriptions() {
    let p = ps(64);
    let cases: &[(&str, &[&str])] = &[
        (
            "sensor.**",
            &[
                "sensor",
                "sensor.temp",
                "sensor.temp.room1",
                "sensor.temp.room1.extra",
            ],
        ),
        ("sensor.*.room1", &["sensor.temp.room1"]),
        ("sensor.*", &["sensor.temp"]),
        (
            "**",
            &[
                "sensor",
                "sensor.temp",
                "sensor.temp.room1",
                "sensor.temp.room1.extra",
                "orders.new",
            ],
        ),
        ("orders.new", &["orders.new"]),
    ];
    let mut subs: Vec<_> = cases
        .iter()
        .map(|(pat, _)| p.subscribe(pat).unwrap())
        .collect();
    for t in [
        "sensor",
        "sensor.temp",
        "sensor.temp.room1",
        "sensor.temp.room1.extra",
        "orders.new",
    ] {
        publish(&p, t, "x");
    }
    for ((pat, want), sub) in cases.iter().zip(subs.iter_mut()) {
        assert_eq!(topics(&drain(sub)), *want, "pattern {pat}");
    }
}

#[test]
fn events_carry_publisher_order_and_options() {
    let p = ps(64);
    let mut s = p.subscribe("a.*").unwrap();
    let opts = PublishOptions {
        headers: vec![("k".into(), "v".into())],
        message_id: Some("m-1".into()),
        ..Default::default()
    };
    p.publish("a.b", Bytes::from_static(b"1"), opts.clone())
        .unwrap();
    publish(&p, "a.c", "2");
    let items = drain(&mut s);
    let SubscriptionItem::Event(first) = &items[0] else {
        panic!("{items:?}")
    };
    assert_eq!(first.headers, opts.headers);
    assert_eq!(first.message_id.as_deref(), Some("m-1"));
    assert_eq!(first.publisher, NodeId::from_bytes([1; 32]));
    let SubscriptionItem::Event(second) = &items[1] else {
        panic!("{items:?}")
    };
    assert_eq!(second.seq, first.seq + 1);
    assert_eq!(second.epoch, first.epoch);
}

#[test]
fn slow_subscriber_lags_without_slowing_others() {
    let p = ps(4);
    let mut slow = p.subscribe("t").unwrap();
    let mut fast = p.subscribe("t").unwrap();
    // The fast one reads after every publish; the slow one never does.
    let mut fast_got = 0;
    for i in 0..10 {
        publish(&p, "t", &i.to_string());
        fast_got += drain(&mut fast).len();
    }
    assert_eq!(fast_got, 10, "the fast one lost nothing");
    // The slow one lost the 6 oldest, is told so, then gets the newest 4.
    let items = drain(&mut slow);
    assert_eq!(items[0], SubscriptionItem::Lagged(6));
    let bodies: Vec<_> = items[1..]
        .iter()
        .map(|i| match i {
            SubscriptionItem::Event(e) => String::from_utf8_lossy(&e.payload).into_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(bodies, ["6", "7", "8", "9"]);
    assert_eq!(p.counters().dropped_slow_total.get(), 6);
}

#[test]
fn dropping_unsubscribes() {
    let p = ps(8);
    let s = p.subscribe("x.**").unwrap();
    let _other = p.subscribe("x.**").unwrap();
    assert_eq!(p.subscriptions(), vec![("x.**".to_string(), 2)]);
    drop(s);
    assert_eq!(p.subscriptions(), vec![("x.**".to_string(), 1)]);
    assert_eq!(p.counters().subscriptions.get(), 1);
}

#[test]
fn bad_input_is_refused_with_the_reason() {
    let p = ps(8);
    let err = p.subscribe("a..b").unwrap_err();
    assert!(matches!(err, PubSubError::InvalidPattern { .. }), "{err}");
    let err = p
        .publish("a.*", Bytes::new(), PublishOptions::default())
        .unwrap_err();
    assert!(matches!(err, PubSubError::InvalidTopic { .. }), "{err}");
    let big = Bytes::from(vec![0u8; p.max_payload() + 1]);
    let err = p.publish("a", big, PublishOptions::default()).unwrap_err();
    assert!(matches!(err, PubSubError::PayloadTooLarge { .. }), "{err}");
    let opts = PublishOptions {
        headers: vec![("h".into(), "v".into()); MAX_HEADERS + 1],
        message_id: None,
        ..Default::default()
    };
    let err = p.publish("a", Bytes::new(), opts).unwrap_err();
    assert_eq!(err, PubSubError::TooManyHeaders { n: MAX_HEADERS + 1 });
    assert_eq!(p.counters().published_total.get(), 0);
}

#[tokio::test]
async fn a_waiting_subscriber_is_woken() {
    let p = ps(8);
    let mut s = p.subscribe("wake.up").unwrap();
    let waiter = tokio::spawn(async move { s.next().await });
    tokio::task::yield_now().await;
    publish(&p, "wake.up", "now");
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
        .await
        .expect("woken in time")
        .expect("task");
    assert!(matches!(got, Some(SubscriptionItem::Event(e)) if e.payload == "now"));
}

#[tokio::test]
async fn recv_gives_lag_then_events_in_order() {
    let p = ps(2);
    let mut s = p.subscribe("r.*").unwrap();
    for body in ["a", "b", "c", "d"] {
        publish(&p, "r.x", body);
    }
    assert_eq!(s.recv().await, Some(SubscriptionItem::Lagged(2)));
    for want in ["c", "d"] {
        match s.recv().await {
            Some(SubscriptionItem::Event(e)) => assert_eq!(e.payload, want),
            other => panic!("expected {want}, got {other:?}"),
        }
    }
    let waiter = tokio::spawn(async move { s.recv().await });
    tokio::task::yield_now().await;
    publish(&p, "r.y", "e");
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
        .await
        .expect("woken in time")
        .expect("task");
    assert!(matches!(got, Some(SubscriptionItem::Event(e)) if e.payload == "e"));
}
