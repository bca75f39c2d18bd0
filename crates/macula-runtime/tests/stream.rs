//! The stream host over a real store: acknowledged publishes, capture of
//! plain publishes, pulls with acks and redelivery, durable consumers across
//! a restart, limits, and a corrupt file left alone.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use macula_pubsub::{Limits, PublishOptions};
use macula_runtime::clock::Clock;
use macula_runtime::pubsub::PubSub;
use macula_runtime::stream::{AckKind, PersistOptions, StreamError, StreamLimits, Streams};
use macula_stream::{AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig};
use macula_wire::NodeId;

fn pubsub() -> PubSub {
    PubSub::new(NodeId::from_bytes([7; 32]), 1 << 20, Limits::default())
}

fn open(dir: &Path, ps: &PubSub) -> Streams {
    Streams::open(
        Some(dir.to_path_buf()),
        ps.clone(),
        StreamLimits::default(),
        Clock::new(),
    )
}

fn orders() -> StreamConfig {
    StreamConfig::new("orders", &["orders.**"])
}

async fn publish(s: &Streams, topic: &str, body: &str) -> u64 {
    s.publish(topic, Bytes::from(body.to_string()), PersistOptions::new())
        .await
        .expect("publish")
        .seq
}

#[tokio::test]
async fn acknowledged_publishes_are_stored_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    s.add(orders()).await.unwrap();
    for i in 1..=100u64 {
        assert_eq!(publish(&s, "orders.eu", &format!("o{i}")).await, i);
    }
    let info = s.info("orders").unwrap();
    assert_eq!(
        (info.messages, info.last_seq, info.durable_seq),
        (100, 100, 100)
    );
    let c = s
        .add_consumer("orders", ConsumerConfig::durable("billing"))
        .await
        .unwrap();
    let got = s
        .next("orders", &c, 60, None, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(got.len(), 60);
    assert_eq!(got[0].payload, Bytes::from("o1"));
    assert_eq!(got[59].seq, 60);
    for m in &got[..50] {
        s.ack("orders", &c, m.seq, AckKind::Ack).await.unwrap();
    }
    s.shutdown().await;
    drop(s);

    let s = open(dir.path(), &ps);
    let info = s.info("orders").unwrap();
    assert_eq!(
        (info.messages, info.first_seq, info.last_seq),
        (100, 1, 100)
    );
    let ci = s.consumer_info("orders", "billing").unwrap();
    assert_eq!(ci.ack_floor, 50);
    assert_eq!(ci.num_ack_pending, 10);
    // The 10 unacknowledged come again, then the rest; nothing acked does.
    let mut seqs = Vec::new();
    loop {
        let got = s
            .next("orders", "billing", 100, None, Duration::ZERO)
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        seqs.extend(got.iter().map(|m| m.seq));
    }
    // The pending ones wait for their ack wait (30 s) before redelivery: the
    // first pull after a restart gets the undelivered rest.
    assert_eq!(seqs, (61..=100).collect::<Vec<_>>());
    assert_eq!(publish(&s, "orders.eu", "next").await, 101);
    s.shutdown().await;
    drop(s);

    // A clean shutdown left the index as one snapshot; the next start
    // reads it and removes it, so a crash after that start scans.
    let file = dir.path().join("streams").join("orders.redb");
    let snapshot = |path: &Path| {
        let store = macula_runtime::stream::store::StreamStore::open(path, 1 << 20).unwrap();
        let snap = store.index_snapshot().unwrap();
        store.close();
        snap
    };
    let snap = snapshot(&file).expect("a snapshot after a clean shutdown");
    let state = macula_stream::StreamState::from_snapshot(orders(), &snap)
        .unwrap()
        .expect("it decodes");
    assert_eq!((state.msgs(), state.last_seq()), (101, 101));
    let s = open(dir.path(), &ps);
    assert_eq!(s.info("orders").unwrap().messages, 101);
    drop(s); // as after a crash: no shutdown
    assert!(snapshot(&file).is_none(), "removed when it was read");
    let s = open(dir.path(), &ps);
    assert_eq!(s.info("orders").unwrap().last_seq, 101);
    s.shutdown().await;
}

/// The stream's own acknowledged publishes, republished live, are never
/// queued to its capture: a burst of them larger than the capture's queue
/// loses nothing and counts nothing as lost (before, the capture took each
/// and skipped it, and a burst overflowed its queue: `capture_lost` counted
/// events the stream held). A plain publish after the burst is captured.
#[tokio::test]
async fn a_burst_of_acknowledged_publishes_is_not_counted_lost_by_the_capture() {
    let dir = tempfile::tempdir().unwrap();
    let ps = PubSub::new(
        NodeId::from_bytes([7; 32]),
        1 << 20,
        Limits {
            queue_capacity: 4,
            ..Limits::default()
        },
    );
    let s = open(dir.path(), &ps);
    s.add(orders()).await.unwrap();
    // All in flight at once: one group commit answers many, and their
    // republishes are pushed before the capture task runs again.
    let s2 = &s;
    let acked = futures::future::join_all(
        (0..200).map(|i| async move { publish(s2, "orders.eu", &format!("a{i}")).await }),
    )
    .await;
    assert_eq!(acked.len(), 200);
    ps.publish(
        "orders.us",
        Bytes::from_static(b"plain"),
        PublishOptions::default(),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.info("orders").unwrap().messages < 201 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "plain publish not captured"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let info = s.info("orders").unwrap();
    assert_eq!(
        (info.messages, info.last_seq),
        (201, 201),
        "each stored once"
    );
    assert_eq!(info.counters.capture_lost, 0);
    s.shutdown().await;
}

#[tokio::test]
async fn plain_publishes_are_captured_and_acked_ones_are_published_once() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    s.add(orders()).await.unwrap();
    let mut live = ps.subscribe("orders.**").unwrap();
    ps.publish(
        "orders.us",
        Bytes::from_static(b"plain"),
        PublishOptions::default(),
    )
    .unwrap();
    let seq = publish(&s, "orders.us", "acked").await;
    // The live subscriber sees both, the acked one with its stream and seq.
    let a = live.recv().await.unwrap();
    let b = live.recv().await.unwrap();
    let events: Vec<_> = [a, b]
        .into_iter()
        .map(|i| match i {
            macula_pubsub::SubscriptionItem::Event(e) => e,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(events[0].payload, Bytes::from_static(b"plain"));
    assert!(events[1]
        .headers
        .contains(&("macula-stream".to_string(), "orders".to_string())));
    // Both are stored, once each.
    let c = s
        .add_consumer("orders", ConsumerConfig::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(
            s.next("orders", &c, 10, None, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    let payloads: Vec<&[u8]> = got.iter().map(|m| &m.payload[..]).collect();
    assert!(payloads.contains(&&b"plain"[..]) && payloads.contains(&&b"acked"[..]));
    assert!(got.iter().any(|m| m.seq == seq));
    assert!(s
        .next("orders", &c, 10, None, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn a_pull_waits_for_the_next_publish() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    s.add(orders()).await.unwrap();
    let c = s
        .add_consumer(
            "orders",
            ConsumerConfig {
                deliver: DeliverPolicy::New,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let s2 = s.clone();
    let c2 = c.clone();
    let pull = tokio::spawn(async move {
        s2.next("orders", &c2, 5, None, Duration::from_secs(10))
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    publish(&s, "orders.x", "late").await;
    let got = pull.await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, Bytes::from_static(b"late"));
    s.shutdown().await;
}

#[tokio::test]
async fn unacknowledged_messages_are_redelivered_and_duplicates_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    s.add(orders()).await.unwrap();
    let opts = |id: &str| PersistOptions {
        msg_id: Some(id.into()),
        ..PersistOptions::new()
    };
    let a = s
        .publish("orders.a", Bytes::from_static(b"1"), opts("k"))
        .await
        .unwrap();
    let b = s
        .publish("orders.a", Bytes::from_static(b"1"), opts("k"))
        .await
        .unwrap();
    assert!(!a.duplicate && b.duplicate && a.seq == b.seq);
    let c = s
        .add_consumer(
            "orders",
            ConsumerConfig {
                ack_wait: macula_wire::Millis(200),
                ..ConsumerConfig::durable("w")
            },
        )
        .await
        .unwrap();
    let first = s.next("orders", &c, 1, None, Duration::ZERO).await.unwrap();
    assert_eq!(first[0].deliveries, 1);
    let again = s
        .next("orders", &c, 1, None, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((again[0].seq, again[0].deliveries), (a.seq, 2));
    s.ack("orders", &c, a.seq, AckKind::Ack).await.unwrap();
    assert!(matches!(
        s.ack("orders", &c, a.seq, AckKind::Ack).await,
        Err(StreamError::Consumer(_))
    ));
    s.shutdown().await;
}

#[tokio::test]
async fn limits_and_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    let mut cfg = orders();
    cfg.max_msgs = Some(3);
    cfg.discard = macula_stream::Discard::New;
    s.add(cfg.clone()).await.unwrap();
    // The same configuration again is fine, another one is not.
    s.add(cfg.clone()).await.unwrap();
    assert!(matches!(
        s.add(StreamConfig::new("orders", &["x"])).await,
        Err(StreamError::Exists(_))
    ));
    assert!(matches!(
        s.add(StreamConfig::new("eu", &["orders.eu.*"])).await,
        Err(StreamError::Overlap(name)) if name == "orders"
    ));
    for _ in 0..3 {
        publish(&s, "orders.a", "x").await;
    }
    let full = s
        .publish("orders.a", Bytes::from_static(b"x"), PersistOptions::new())
        .await
        .unwrap_err();
    assert_eq!(full.kind(), "full");
    assert!(matches!(
        s.publish("other.a", Bytes::new(), PersistOptions::new())
            .await,
        Err(StreamError::NotCaptured(_))
    ));
    assert_eq!(s.purge("orders", Default::default()).await.unwrap(), 3);
    assert_eq!(publish(&s, "orders.a", "x").await, 4);
    s.delete("orders").await.unwrap();
    assert!(!dir.path().join("streams/orders.redb").exists());
    assert!(matches!(s.info("orders"), Err(StreamError::NotFound(_))));
    let none = Streams::open(None, ps.clone(), StreamLimits::default(), Clock::new());
    assert!(matches!(
        none.add(orders()).await,
        Err(StreamError::NoDataDir)
    ));
    s.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_store_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    s.add(orders()).await.unwrap();
    publish(&s, "orders.a", "x").await;
    s.shutdown().await;
    drop(s);
    let path = dir.path().join("streams/orders.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let s = open(dir.path(), &ps);
    let err = s.info("orders").unwrap_err();
    assert_eq!(err.kind(), "failed");
    assert!(err.to_string().contains("orders"), "{err}");
    assert_eq!(s.names(), vec!["orders".to_string()]);
    assert!(matches!(s.add(orders()).await, Err(StreamError::Exists(_))));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the file was written over"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn workqueue_consumers_share_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    let mut cfg = StreamConfig::new("jobs", &["jobs.*"]);
    cfg.retention = macula_stream::Retention::Workqueue;
    s.add(cfg).await.unwrap();
    let c = s
        .add_consumer(
            "jobs",
            ConsumerConfig {
                ack: AckPolicy::Explicit,
                ..ConsumerConfig::durable("workers")
            },
        )
        .await
        .unwrap();
    for i in 0..10 {
        publish(&s, "jobs.x", &i.to_string()).await;
    }
    // Two pullers on one consumer: each message to one of them.
    let (a, b) = tokio::join!(
        s.next("jobs", &c, 5, None, Duration::ZERO),
        s.next("jobs", &c, 5, None, Duration::ZERO)
    );
    let mut all: Vec<u64> = a
        .unwrap()
        .iter()
        .chain(b.unwrap().iter())
        .map(|m| m.seq)
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=10).collect::<Vec<_>>());
    for seq in all {
        s.ack("jobs", &c, seq, AckKind::Ack).await.unwrap();
    }
    assert_eq!(s.info("jobs").unwrap().messages, 0);
    s.shutdown().await;
}

#[tokio::test]
async fn old_messages_leave_the_store_and_replay_starts_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    let mut cfg = orders();
    cfg.max_age = Some(macula_wire::Millis(300));
    s.add(cfg).await.unwrap();
    publish(&s, "orders.a", "old").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mid = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    publish(&s, "orders.a", "new").await;
    // From a time: only what was stored at or after it.
    let mut sub = s
        .subscribe("orders", &[], DeliverPolicy::ByStartTime(mid))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.seq, &m.payload[..]), (2, &b"new"[..]));
    publish(&s, "orders.b", "live").await;
    let m = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"live");
    drop(sub);
    // The age limit empties the stream, store included.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.info("orders").unwrap().messages > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "messages never aged out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.info("orders").unwrap().counters.removed_age, 3);
    assert!(s.get_msg("orders", 1).await.unwrap().is_none());
    s.shutdown().await;
    drop(s);
    // And the store agrees after a restart.
    let s = open(dir.path(), &ps);
    let info = s.info("orders").unwrap();
    assert_eq!((info.messages, info.last_seq, info.first_seq), (0, 3, 4));
    s.shutdown().await;
}

fn header<'a>(e: &'a macula_pubsub::Event, name: &str) -> &'a str {
    e.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no header {name} in {:?}", e.headers))
}

async fn delivery(sub: &mut macula_runtime::pubsub::Subscription) -> (u64, u32, Bytes) {
    let item = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("a push delivery within 10 s")
        .expect("subscription open");
    match item {
        macula_pubsub::SubscriptionItem::Event(e) => {
            assert_eq!(header(&e, "macula-stream"), "orders");
            assert_eq!(header(&e, "macula-stream-consumer"), "pusher");
            (
                header(&e, "macula-stream-seq").parse().unwrap(),
                header(&e, "macula-stream-deliveries").parse().unwrap(),
                e.payload.clone(),
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_push_consumer_publishes_deliveries_within_its_ack_pending_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ps = pubsub();
    let s = open(dir.path(), &ps);
    s.add(orders()).await.unwrap();
    for i in 1..=5 {
        publish(&s, "orders.eu", &format!("o{i}")).await;
    }
    // An ephemeral push consumer is refused (nothing would ever remove it).
    let eph = ConsumerConfig {
        deliver_subject: Some("deliveries.orders".into()),
        ..ConsumerConfig::default()
    };
    let e = s.add_consumer("orders", eph).await.unwrap_err();
    assert!(
        e.to_string().contains("push consumer must be durable"),
        "{e}"
    );
    let mut sub = ps.subscribe("deliveries.orders").unwrap();
    let cfg = ConsumerConfig {
        deliver_subject: Some("deliveries.orders".into()),
        ack_wait: macula_wire::Millis(300),
        max_ack_pending: 3,
        ..ConsumerConfig::durable("pusher")
    };
    s.add_consumer("orders", cfg).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(delivery(&mut sub).await);
    }
    assert_eq!(
        got.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(),
        vec![(1, 1), (2, 1), (3, 1)]
    );
    assert_eq!(got[0].2, Bytes::from("o1"));
    // Flow control: three wait for their ack, the fourth is not sent.
    let ci = s.consumer_info("orders", "pusher").unwrap();
    assert_eq!((ci.num_ack_pending, ci.delivered_stream_seq), (3, 3));
    // A push consumer takes no pulls.
    let e = s
        .next("orders", "pusher", 1, None, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("push consumer"), "{e}");
    for seq in 1..=3 {
        s.ack("orders", "pusher", seq, AckKind::Ack).await.unwrap();
    }
    assert_eq!(delivery(&mut sub).await.0, 4);
    assert_eq!(delivery(&mut sub).await.0, 5);
    s.ack("orders", "pusher", 4, AckKind::Ack).await.unwrap();
    // 5 is not acknowledged: it comes again after the ack wait.
    let again = delivery(&mut sub).await;
    assert_eq!((again.0, again.1), (5, 2));
    s.ack("orders", "pusher", 5, AckKind::Ack).await.unwrap();

    // After a restart the durable push consumer runs again.
    s.shutdown().await;
    drop(s);
    let s = open(dir.path(), &ps);
    publish(&s, "orders.eu", "o6").await;
    let d = delivery(&mut sub).await;
    assert_eq!((d.0, d.1, d.2), (6, 1, Bytes::from("o6")));
    // Deleting it stops the deliveries.
    s.delete_consumer("orders", "pusher").await.unwrap();
    publish(&s, "orders.eu", "o7").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.recv())
            .await
            .is_err(),
        "no delivery after the consumer is gone"
    );
    s.shutdown().await;
}
