//! Durable streams reached from other nodes and from a lightweight client
//! (issue 21 item 4): the hosting node serves `_stream.<name>`; a node that
//! does not host the stream publishes with an acknowledgement, reads,
//! adds consumers, pulls, acks and subscribes from an offset through
//! `Node::stream`, a client through its gateway with `Client::stream`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use macula::stream::{
    AckKind, ConsumerConfig, DeliverPolicy, PersistOptions, StreamConfig, StreamError, StreamHandle,
};
use macula::Node;

const STEP: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(5);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn node(dir: &tempfile::TempDir, boot: Option<&Node>) -> Node {
    let mut b = Node::builder()
        .realm("test.stream")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .data_dir(dir.path());
    if let Some(first) = boot {
        b = b.bootstrap([first.local_addr().to_string()]);
    }
    within("start", b.start()).await.expect("starts")
}

/// Retries `publish` until the host's advertisement is found (it is made
/// in the background once the stream is added).
async fn first_publish(s: &StreamHandle, topic: &str, body: &str) -> u64 {
    within("the stream is found", async {
        loop {
            match s
                .publish(topic, Bytes::from(body.to_string()), PersistOptions::new())
                .await
            {
                Ok(a) => return a.seq,
                Err(StreamError::Unreachable(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("publish: {e}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_is_used_from_another_node_and_from_a_client() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let host = node(&dirs[0], None).await;
    let other = node(&dirs[1], Some(&host)).await;
    within(
        "add",
        host.streams()
            .add(StreamConfig::new("orders", &["orders.**"])),
    )
    .await
    .expect("add");

    // Another node: acknowledged publishes, stored on the host.
    let s = other.stream("orders", TIMEOUT);
    assert_eq!(s.name(), "orders");
    assert_eq!(first_publish(&s, "orders.eu", "o1").await, 1);
    for i in 2..=20u64 {
        let opts = PersistOptions {
            msg_id: Some(format!("m{i}")),
            ..PersistOptions::new()
        };
        let ack = s
            .publish("orders.eu", Bytes::from(format!("o{i}")), opts)
            .await
            .expect("publish");
        assert_eq!((ack.seq, ack.duplicate), (i, false));
    }
    // A publish with a message ID already stored is a duplicate.
    let dup = PersistOptions {
        msg_id: Some("m20".into()),
        ..PersistOptions::new()
    };
    let ack = s
        .publish("orders.eu", Bytes::from("again"), dup)
        .await
        .expect("dup");
    assert_eq!((ack.seq, ack.duplicate), (20, true));
    assert_eq!(host.streams().info("orders").unwrap().messages, 20);
    let info = s.info().await.expect("info");
    assert_eq!((info.messages, info.last_seq), (20, 20));
    let m = s.get_msg(7).await.expect("get").expect("stored");
    assert_eq!(
        (m.seq, &m.payload[..], m.stream.as_str()),
        (7, &b"o7"[..], "orders")
    );
    assert!(s.get_msg(99).await.expect("get").is_none());

    // Errors of the host reach the caller with their kind.
    let e = s
        .publish("billing.eu", Bytes::from("x"), PersistOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "not_captured", "{e}");
    let e = s.consumer_info("nobody").await.unwrap_err();
    assert_eq!(e.kind(), "no_consumer", "{e}");

    // A durable consumer: pull, ack some, the rest comes again after the
    // ack wait; its state is the host's.
    let cfg = ConsumerConfig {
        ack_wait: macula::stream::Millis(300),
        ..ConsumerConfig::durable("billing")
    };
    let c = s.add_consumer(cfg).await.expect("consumer");
    assert_eq!(c, "billing");
    let got = s.next(&c, 10, None, Duration::ZERO).await.expect("next");
    assert_eq!(
        got.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    for m in &got[..5] {
        s.ack(&c, m.seq, AckKind::Ack).await.expect("ack");
    }
    let ci = s.consumer_info(&c).await.expect("info");
    assert_eq!((ci.ack_floor, ci.num_ack_pending), (5, 5));
    // New messages first, then (after the ack wait) the unacknowledged.
    let rest = s.next(&c, 10, None, Duration::ZERO).await.expect("next");
    assert_eq!(
        rest.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (11..=20).collect::<Vec<_>>()
    );
    for m in &rest {
        s.ack(&c, m.seq, AckKind::Ack).await.expect("ack");
    }
    let again = s
        .next(&c, 20, None, Duration::from_secs(3))
        .await
        .expect("next");
    assert_eq!(again.first().map(|m| (m.seq, m.deliveries)), Some((6, 2)));
    assert_eq!(s.consumers().await.expect("consumers").len(), 1);

    // A subscription from an offset on the other node sees the stored
    // messages, then a new one.
    let mut sub = s
        .subscribe(&[], DeliverPolicy::ByStartSeq(18))
        .await
        .expect("subscribe");
    for want in 18..=20u64 {
        let m = within("recv", sub.recv()).await.expect("recv");
        assert_eq!(m.seq, want);
    }
    s.publish("orders.us", Bytes::from("o21"), PersistOptions::new())
        .await
        .expect("publish");
    let m = within("recv new", sub.recv()).await.expect("recv");
    assert_eq!((m.seq, m.subject.as_str()), (21, "orders.us"));
    drop(sub);

    // A lightweight client through its gateway (the other node).
    let client = within(
        "client",
        macula::Client::builder([other.local_addr().to_string().parse().unwrap()])
            .realm("test.stream")
            .connect(),
    )
    .await
    .expect("client connects");
    let cs = client.stream("orders", TIMEOUT);
    let ack = cs
        .publish(
            "orders.eu",
            Bytes::from("from a client"),
            PersistOptions::new(),
        )
        .await
        .expect("client publish");
    assert_eq!(ack.seq, 22);
    let mut sub = cs
        .subscribe(&["orders.eu"], DeliverPolicy::ByStartSeq(20))
        .await
        .expect("client subscribe");
    assert_eq!(within("recv", sub.recv()).await.expect("recv").seq, 20);
    assert_eq!(within("recv", sub.recv()).await.expect("recv").seq, 22);
    drop(sub);

    // The host's own handle is direct.
    assert!(matches!(
        host.stream("orders", TIMEOUT),
        StreamHandle::Local { .. }
    ));

    // Once the stream is deleted its procedure is withdrawn: callers get an
    // error, not a hang.
    within("delete", host.streams().delete("orders"))
        .await
        .expect("delete");
    let e = within(
        "publish after delete",
        s.publish("orders.eu", Bytes::from("x"), PersistOptions::new()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e.kind(), "not_found" | "unreachable"),
        "{e} ({})",
        e.kind()
    );
    client.shutdown().await;
    other.shutdown().await;
    host.shutdown().await;
}
