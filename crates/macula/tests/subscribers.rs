//! `wait_for_subscribers`: a publisher waits for its audience instead of
//! publishing to nobody (counts asserted; the waits are bounds, not timings).

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use macula::{Node, SubscriptionItem};

async fn node(bootstrap: Option<SocketAddr>) -> Node {
    let mut b = Node::builder()
        .realm("test.subscribers")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)));
    if let Some(addr) = bootstrap {
        b = b.bootstrap([addr.to_string()]);
    }
    b.start().await.expect("node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_waits_for_a_subscriber_that_comes_later() {
    let a = node(None).await;
    let b = node(Some(a.local_addr())).await;
    // Nobody yet: the wait ends empty-handed at its timeout.
    let none = a
        .wait_for_subscribers("news.today", Duration::from_millis(1_500))
        .await
        .expect("valid topic");
    assert_eq!(none, 0);
    // A subscriber appears on B while A waits.
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move {
            a.wait_for_subscribers("news.today", Duration::from_secs(20))
                .await
        })
    };
    let mut sub = b.subscribe("news.*").await.expect("subscribe");
    let n = waiter.await.expect("task").expect("valid topic");
    assert_eq!(n, 1, "one node, B, has a matching subscription");
    // The first publish after the wait reaches it.
    a.publish("news.today", "first").await.expect("publish");
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(SubscriptionItem::Event(e))) => assert_eq!(e.payload, "first"),
        other => panic!("expected the first event, got {other:?}"),
    }
    // Its own subscription counts too, once.
    let _mine = a.subscribe("news.**").await.expect("subscribe");
    let n = a
        .wait_for_subscribers("news.today", Duration::from_secs(5))
        .await
        .expect("valid topic");
    assert_eq!(n, 2);
    assert!(
        a.wait_for_subscribers("news.*", Duration::ZERO)
            .await
            .is_err(),
        "a pattern is not a topic"
    );
    b.shutdown().await;
    a.shutdown().await;
}
