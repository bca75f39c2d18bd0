//! Pub/sub through the public API, on one node: the embedding experience.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use macula::{Node, PublishOptions, SubscriptionItem};

async fn node() -> Node {
    Node::builder()
        .realm("test.pubsub")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .start()
        .await
        .expect("node starts")
}

async fn next(sub: &mut macula::Subscription) -> SubscriptionItem {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("an event in time")
        .expect("subscription open")
}

#[tokio::test]
async fn publish_reaches_matching_subscribers_in_order() {
    let node = node().await;
    let mut all = node.subscribe("orders.**").await.unwrap();
    let mut eu = node.subscribe("orders.*.eu").await.unwrap();
    node.publish("orders.new.eu", "first").await.unwrap();
    node.publish("orders.new.us", "second").await.unwrap();
    let opts = PublishOptions {
        headers: vec![("trace".into(), "abc".into())],
        message_id: Some("id-3".into()),
        ..Default::default()
    };
    node.publish_with("orders.paid.eu", "third", opts)
        .await
        .unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        match next(&mut all).await {
            SubscriptionItem::Event(e) => {
                assert_eq!(e.publisher, node.id());
                seen.push((e.topic, e.seq));
            }
            other => panic!("{other:?}"),
        }
    }
    let topics: Vec<_> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["orders.new.eu", "orders.new.us", "orders.paid.eu"]);
    assert!(
        seen.windows(2).all(|w| w[1].1 == w[0].1 + 1),
        "per-publisher order: {seen:?}"
    );

    let SubscriptionItem::Event(e) = next(&mut eu).await else {
        panic!("event expected")
    };
    assert_eq!(
        (e.topic.as_str(), &e.payload[..]),
        ("orders.new.eu", &b"first"[..])
    );
    let SubscriptionItem::Event(e) = next(&mut eu).await else {
        panic!("event expected")
    };
    assert_eq!(e.message_id.as_deref(), Some("id-3"));
    assert_eq!(e.headers, vec![("trace".to_string(), "abc".to_string())]);
    node.shutdown().await;
}

#[tokio::test]
async fn invalid_topics_and_patterns_say_why() {
    let node = node().await;
    let err = node.subscribe("orders..new").await.unwrap_err();
    assert!(err.to_string().contains("orders..new"), "{err}");
    let err = node.publish("orders.*", "x").await.unwrap_err();
    assert!(err.to_string().contains("orders.*"), "{err}");
    node.shutdown().await;
}
