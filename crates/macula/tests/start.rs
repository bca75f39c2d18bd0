//! `start()` of a node with bootstrap peers returns a joined node: what it
//! publishes next reaches the mesh; with no peer answering it fails, naming
//! them, instead of returning a node that is alone.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use macula::{Error, Node, SubscriptionItem};

fn builder() -> macula::NodeBuilder {
    Node::builder()
        .realm("test.start")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_node_is_joined_and_its_first_publish_arrives() {
    let a = builder().start().await.expect("a first node starts alone");
    let mut sub = a.subscribe("greet.*").await.expect("subscribe");
    let b = builder()
        .bootstrap([a.local_addr().to_string()])
        .start()
        .await
        .expect("b joins through a");
    // At once, no wait: the node is in the mesh when start returns.
    b.publish("greet.hello", "hi").await.expect("publish");
    let item = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the first publish arrives")
        .expect("subscription open");
    match item {
        SubscriptionItem::Event(e) => assert_eq!(e.payload, "hi"),
        other => panic!("{other:?}"),
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bootstrap_peer_answering_fails_the_start_and_names_them() {
    // A port nobody listens on (bound, then released).
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port");
    let err = builder()
        .bootstrap([dead.to_string()])
        .wait_for_join(Some(Duration::from_secs(2)))
        .start()
        .await
        .expect_err("nobody to join through");
    match &err {
        Error::Join { peers, waited } => {
            assert!(peers.contains(&dead.to_string()), "{err}");
            assert_eq!(*waited, Duration::from_secs(2));
        }
        other => panic!("expected Error::Join, got {other}"),
    }
    assert!(err.to_string().contains("wait_for_join(None)"), "{err}");
    // Without the wait it starts alone and keeps trying.
    let alone = builder()
        .bootstrap([dead.to_string()])
        .wait_for_join(None)
        .start()
        .await
        .expect("starts without waiting");
    alone.shutdown().await;
}

/// A bootstrap peer in another realm answers with a refusal: `start()` ends
/// with `JoinRefused` (not the join timeout), naming the realms the right
/// way round for this node: "you" is this node, "this node" the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_peer_in_another_realm_refuses_at_once_with_the_reason() {
    let a = builder().start().await.expect("a starts alone");
    let err = Node::builder()
        .realm("test.other")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .bootstrap([a.local_addr().to_string()])
        // Far longer than a refusal takes: the variant says it did not wait.
        .wait_for_join(Some(Duration::from_secs(60)))
        .start()
        .await
        .expect_err("another realm");
    let Error::JoinRefused { refusals } = &err else {
        panic!("not a refusal: {err}");
    };
    assert_eq!(err.kind(), "join_refused");
    assert!(refusals.contains(&a.local_addr().to_string()), "{refusals}");
    assert!(
        refusals.contains("you are in \"test.other\", this node is in \"test.start\""),
        "{refusals}"
    );
    a.shutdown().await;
}
