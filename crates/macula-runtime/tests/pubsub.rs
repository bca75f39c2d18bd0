//! Pub/sub across real nodes over QUIC on 127.0.0.1: interest registered in
//! the DHT, one copy per interested node, per-publisher order, no
//! duplicates, withdrawal on drop.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use macula_runtime::pubsub::{PublishOptions, Subscription, SubscriptionItem, INTEREST_CACHE_TTL};

async fn next_event(sub: &mut Subscription) -> macula_runtime::pubsub::Event {
    match within(STEP, "an event", sub.next()).await {
        Some(SubscriptionItem::Event(e)) => e,
        other => panic!("expected an event, got {other:?}"),
    }
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
    assert_eq!(cc.received_remote_total.get(), 101);
    assert_eq!(cc.duplicates_dropped_total.get(), 0);
    // One copy per interested node: 101 to C and 100 to B.
    assert_eq!(a.pubsub().counters().sent_remote_total.get(), 201);
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
    let sent = a.pubsub().counters().sent_remote_total.get();
    assert_eq!(sent, 1, "local delivery used no network");

    // Drop the remote subscription: once the withdrawal is stored and the
    // publisher's interest cache has expired, nothing more is sent to C.
    drop(remote);
    let withdrawn = async {
        loop {
            tokio::time::sleep(INTEREST_CACHE_TTL + Duration::from_millis(100)).await;
            let before = a.pubsub().counters().sent_remote_total.get();
            publish(&a, "orders.new", "y").await;
            if a.pubsub().counters().sent_remote_total.get() == before {
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

/// A peer that completes the handshake, registers interest, and then never
/// reads its streams: once its data stream accepts nothing for the stall
/// timeout, the publisher cuts it off (stream reset, queue dropped, metric)
/// and keeps the connection, whose control stream still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_cut_off() {
    use macula_wire::dht::{DhtStore, WireRecord};
    use macula_wire::{DhtMessage, Message, Ping};

    init_tracing();
    let mut cfg = config();
    cfg.limits.pubsub_stall_timeout = Duration::from_millis(300);
    let a = start(cfg).await;
    let raw = RawClient::connect(&a).await;
    let mut control = raw.handshake(&a).await;

    // Interest as the raw peer: its signed record under the rendezvous name.
    let pattern = macula_pubsub::Pattern::new("stall.*").expect("pattern");
    let name = macula_pubsub::interest_name(macula_runtime::config::DEFAULT_REALM, &pattern);
    let mut record = macula_dht::Record {
        key: macula_wire::dht_key(name.as_bytes()),
        publisher: raw.identity.node_id(),
        seq: 1,
        ttl: macula_dht::Millis(600_000),
        value: b"stall.*".to_vec(),
        signature: Vec::new(),
    };
    let mut signature = raw.identity.public_key().to_vec();
    signature.extend_from_slice(&raw.identity.sign(&record.signed_bytes()));
    record.signature = signature;
    let store = DhtStore {
        id: 7,
        record: WireRecord {
            key: record.key,
            publisher: record.publisher,
            seq: record.seq,
            ttl_ms: record.ttl.0,
            value: record.value.clone(),
            signature: record.signature.clone(),
        },
        ttl_ms: 600_000,
    };
    control.send(&Message::Dht(DhtMessage::Store(store))).await;
    loop {
        match control.recv().await {
            Message::Dht(DhtMessage::Stored(s)) if s.id == 7 => break,
            Message::Dht(DhtMessage::StoreRejected(r)) => panic!("store refused: {r:?}"),
            _ => {}
        }
    }

    // Far more than one stream's flow-control window, well under the queue's
    // byte limit: the writes block once the window is full.
    let c = a.pubsub().counters().clone();
    let payload = Bytes::from(vec![0u8; 60 * 1024]);
    for _ in 0..100 {
        a.pubsub()
            .publish_mesh("stall.data", payload.clone(), PublishOptions::default())
            .await
            .expect("publish");
    }
    assert!(c.sent_remote_total.get() > 0, "routed to the raw peer");
    // A flush cannot finish while the peer reads nothing: it says what is
    // pending when its time is up.
    match a.pubsub().flush(Duration::from_millis(50)).await {
        Err(macula_runtime::pubsub::PubSubError::FlushTimeout { pending, .. }) => {
            assert!(pending > 0)
        }
        other => panic!("flush: {other:?}"),
    }
    eventually(STEP, "the stalled peer is cut off", || {
        c.peers_cut_off_total.get() == 1
    })
    .await;
    assert!(c.remote_dropped_total.get() > 0, "its queue was dropped");
    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &macula_runtime::admin::registry(&a))
        .expect("encode metrics");
    assert!(
        metrics.contains("macula_pubsub_peers_cut_off_total 1"),
        "{metrics}"
    );

    // The loss is reported on a new data stream: what was written on the
    // reset one (in flight: the raw peer read none of it), and per topic
    // what was queued or being written. Every message is accounted for.
    let first = within(STEP, "accept the stalled stream", raw.conn.accept_uni())
        .await
        .expect("the stalled stream");
    let mut next = within(STEP, "accept the report's stream", raw.conn.accept_uni())
        .await
        .expect("a new data stream");
    drop(first);
    let mut bytes = Vec::new();
    let decoder = macula_wire::FrameDecoder::new(1 << 20);
    let report = loop {
        let chunk = within(STEP, "read the report", next.read_chunk(4096, true))
            .await
            .expect("read")
            .expect("more bytes");
        bytes.extend_from_slice(&chunk.bytes);
        if bytes.len() > 1 {
            if let Ok(Some((f, _))) = decoder.decode(&bytes[1..]) {
                assert_eq!(bytes[0], 0x01, "a pub/sub data stream");
                break Message::decode(f.header.msg_type, f.body).expect("a frame");
            }
        }
    };
    let Message::PublishDropped(d) = report else {
        panic!("not a loss report: {report:?}")
    };
    assert_eq!(d.publisher, a.node_id());
    assert_eq!(d.topics.len(), 1);
    assert_eq!(d.topics[0].0, "stall.data");
    assert_eq!(d.in_flight + d.topics[0].1, 100, "{d:?}");
    eventually(STEP, "the report is counted", || {
        c.loss_reported_total.get() == 100
    })
    .await;
    // Everything was written or given up on (and reported): flushed.
    a.pubsub()
        .flush(Duration::from_secs(5))
        .await
        .expect("nothing pending");

    // Only the data path was cut: the connection and its control stream live.
    assert!(raw.conn.close_reason().is_none(), "connection kept");
    control
        .send(&Message::Ping(Ping {
            nonce: 99,
            sent_at_us: 1,
            keep: false,
        }))
        .await;
    loop {
        if let Message::Pong(p) = control.recv().await {
            assert_eq!(p.nonce, 99);
            break;
        }
    }
    a.shutdown().await;
}

/// A malformed PUBLISH_BATCH on a data stream closes that stream, is
/// counted, and leaves the connection up; a stream of unknown kind likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_batch_closes_only_its_data_stream() {
    use macula_wire::{FrameHeader, Message, MessageType, Ping};

    init_tracing();
    let a = start(config()).await;
    let raw = RawClient::connect(&a).await;
    let mut control = raw.handshake(&a).await;
    let c = a.pubsub().counters().clone();

    let mut data = within(STEP, "open_uni", raw.conn.open_uni())
        .await
        .expect("open a data stream");
    let body = [1u8, 2, 3]; // batch format 1, then a truncated publisher
    let mut bytes = vec![macula_runtime::pubsub::STREAM_KIND_PUBSUB];
    bytes.extend_from_slice(&FrameHeader::new(MessageType::PublishBatch as u8, 3).encode());
    bytes.extend_from_slice(&body);
    within(STEP, "write", data.write_all(&bytes))
        .await
        .expect("write");
    eventually(STEP, "the bad stream is counted", || {
        c.data_streams_rejected_total.get() == 1
    })
    .await;
    // The node stops the stream: our side learns it.
    let stopped = within(STEP, "stream stopped", data.stopped()).await;
    assert!(matches!(stopped, Ok(Some(_))), "{stopped:?}");

    let mut other = within(STEP, "open_uni", raw.conn.open_uni())
        .await
        .expect("open a stream");
    within(STEP, "write", other.write_all(&[0x7f, 0, 0]))
        .await
        .expect("write");
    let stopped = within(STEP, "unknown kind stopped", other.stopped()).await;
    assert!(matches!(stopped, Ok(Some(_))), "{stopped:?}");

    assert!(raw.conn.close_reason().is_none(), "connection kept");
    control
        .send(&Message::Ping(Ping {
            nonce: 5,
            sent_at_us: 1,
            keep: false,
        }))
        .await;
    loop {
        if let Message::Pong(p) = control.recv().await {
            assert_eq!(p.nonce, 5);
            break;
        }
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_withdraws_interest_at_once() {
    init_tracing();
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let _sub = within(STEP, "subscribe", b.pubsub().subscribe_mesh("news.**"))
        .await
        .expect("subscribe");
    let pattern = macula_pubsub::Pattern::new("news.**").expect("pattern");
    let name = macula_pubsub::rendezvous::interest_name(b.realm(), &pattern);
    let key = macula_wire::dht_key(name.as_bytes());
    let live = |records: &[macula_runtime::dht::DhtRecord]| {
        records
            .iter()
            .filter(|r| r.publisher == b.node_id() && !r.value.is_empty())
            .count()
    };
    let before = within(STEP, "lookup", a.dht().get_fresh(key))
        .await
        .expect("lookup");
    assert_eq!(live(&before), 1, "B's interest is in the DHT");

    // Shutdown with the subscription still alive: the record is emptied
    // before B leaves, not left to expire.
    within(STEP, "shutdown", b.shutdown()).await;
    let after = within(STEP, "lookup", a.dht().get_fresh(key))
        .await
        .expect("lookup");
    assert_eq!(live(&after), 0, "B's interest was withdrawn: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_queue_bound_is_a_node_setting() {
    init_tracing();
    let node = start(macula_runtime::NodeConfig {
        pubsub: macula_pubsub::Limits {
            queue_capacity: 4,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let mut sub = node.pubsub().subscribe("q.*").expect("subscribe");
    for i in 0..10 {
        node.pubsub()
            .publish("q.x", Bytes::from(i.to_string()), PublishOptions::default())
            .expect("publish");
    }
    assert_eq!(sub.pending(), 4);
    match within(STEP, "lag", sub.next()).await {
        Some(SubscriptionItem::Lagged(n)) => assert_eq!(n, 6),
        other => panic!("expected Lagged(6), got {other:?}"),
    }
}

/// B's interest record under `name`, as A reads it from the DHT (`None`:
/// no record of B's).
async fn record_of(
    a: &macula_runtime::NodeRuntime,
    b: &macula_runtime::NodeRuntime,
    name: &str,
) -> Option<String> {
    let key = macula_wire::dht_key(name.as_bytes());
    let records = within(STEP, "lookup", a.dht().get_fresh(key))
        .await
        .expect("lookup");
    records
        .iter()
        .find(|r| r.publisher == b.node_id())
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
}

/// More patterns under one first segment than one interest record holds
/// (1,000 × `wide.topic.<i>`: about 14 KiB against the 8 KiB DHT value
/// limit). Every subscription succeeds, concurrent ones share DHT puts, the
/// record is a summary, and a message from another node reaches exactly the
/// subscription it is for; one the summary lets through that nobody wants
/// is dropped quietly (and counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_over_the_record_limit_are_summarized_and_still_delivered() {
    init_tracing();
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let ps = b.pubsub();
    let subscribing = futures::future::join_all((0..1000).map(|i| {
        let pattern = format!("wide.topic.{i}");
        async move { ps.subscribe_mesh(&pattern).await }
    }));
    let mut subs: Vec<Subscription> = within(STEP, "1,000 subscriptions", subscribing)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every subscription succeeds");
    let c = ps.counters();
    assert!(c.interest_summarized_total.get() > 0);
    let puts = c.interest_puts_total.get();
    assert!(puts < 100, "concurrent subscriptions share puts: {puts}");
    let name = macula_pubsub::segment_name(b.realm(), "wide");
    assert_eq!(
        record_of(&a, &b, &name).await.as_deref(),
        Some("wide.topic.**")
    );

    publish(&a, "wide.topic.777", "hit").await;
    publish(&a, "wide.topic.5000", "nobody's").await;
    publish(&a, "wide.topic.778", "fence").await;
    assert_eq!(next_event(&mut subs[777]).await.payload, "hit");
    // One publisher's messages arrive in order: past the fence, the
    // unwanted one has arrived too.
    assert_eq!(next_event(&mut subs[778]).await.payload, "fence");
    eventually(STEP, "the unwanted message is counted", || {
        c.unmatched_total.get() == 1
    })
    .await;
    assert!(
        subs.iter().all(|s| s.pending() == 0),
        "nothing else arrived"
    );
    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &macula_runtime::admin::registry(&b))
        .expect("encode metrics");
    for metric in [
        "macula_pubsub_interest_summarized_total",
        "macula_pubsub_interest_puts_total",
        "macula_pubsub_unmatched_total 1",
    ] {
        assert!(metrics.contains(metric), "{metric} in {metrics}");
    }

    // Dropping them all withdraws the record, again with shared puts.
    drop(subs);
    let withdrawn = async {
        while record_of(&a, &b, &name)
            .await
            .is_some_and(|v| !v.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    within(STEP, "the record is withdrawn", withdrawn).await;
    eventually(STEP, "every drop's update is done", || {
        ps.subscriptions().is_empty()
    })
    .await;
    let puts = c.interest_puts_total.get() - puts;
    assert!(puts < 200, "drops share puts: {puts}");
    a.shutdown().await;
    b.shutdown().await;
}
