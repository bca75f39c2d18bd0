//! Proved publishers over real QUIC on 127.0.0.1 (PROTOCOL.md §5.3,
//! "Proved publishers"): a client's messages reach other nodes and other
//! gateways' clients with its signature verified; a full node that forwards
//! a batch naming another publisher without that publisher's seal is not
//! believed: the batch is dropped and counted, never delivered.

mod common;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use macula_runtime::pubsub::{Event, Proof, Subscription, SubscriptionItem};
use macula_runtime::{Client, ClientConfig, NodeRuntime, PeerAddr};
use macula_wire::pubsub::{BatchMessage, PublishBatch};
use macula_wire::Message;

fn addr_of(n: &NodeRuntime) -> PeerAddr {
    format!("{}@{}", n.node_id(), n.local_addr())
        .parse()
        .expect("address")
}

async fn client(gateway: &NodeRuntime) -> Client {
    within(
        STEP,
        "client attaches",
        Client::connect(ClientConfig::new(vec![addr_of(gateway)])),
    )
    .await
    .expect("client attaches")
}

async fn next_event(sub: &mut Subscription) -> Event {
    match within(STEP, "event", sub.next()).await {
        Some(SubscriptionItem::Event(e)) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_events_arrive_proved_and_a_forged_publisher_is_dropped() {
    init_tracing();
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let c1 = client(&a).await;
    let c2 = client(&b).await;
    let mut on_c2 = c2.subscribe("orders.**").await.expect("subscribe");
    let mut on_b = b
        .pubsub()
        .subscribe_mesh("orders.*")
        .await
        .expect("node subscribes");
    for i in 1..=20u32 {
        c1.publish("orders.new", format!("m{i}"))
            .await
            .expect("publish");
    }
    for i in 1..=20u32 {
        // Through gateway A to node B: A forwarded, C1's seal proves it.
        let e = next_event(&mut on_b).await;
        assert_eq!(e.payload, Bytes::from(format!("m{i}")));
        assert_eq!((e.publisher, e.proof), (c1.node_id(), Proof::Signed));
        // On to C2 through its gateway B, seal and all.
        let e = next_event(&mut on_c2).await;
        assert_eq!((e.publisher, e.proof), (c1.node_id(), Proof::Signed));
    }
    // A full node's own message: proved by the connection to B, asserted
    // by B to its client.
    a.pubsub()
        .publish_mesh("orders.a", Bytes::from("from a"), Default::default())
        .await
        .expect("node publishes");
    let e = next_event(&mut on_b).await;
    assert_eq!((e.publisher, e.proof), (a.node_id(), Proof::Connection));
    let e = next_event(&mut on_c2).await;
    assert_eq!((e.publisher, e.proof), (a.node_id(), Proof::Asserted));
    assert_eq!(b.pubsub().counters().unproved_dropped_total.get(), 0);

    // A full node (a hand-driven peer) puts words in C1's mouth: a batch
    // naming C1 as publisher, without C1's seal. B drops it; the batch
    // the peer then sends as itself (a fence) is delivered.
    let raw = RawClient::connect(&b).await;
    let _ctl = raw.handshake(&b).await;
    let mut send = within(STEP, "open_uni", raw.conn.open_uni())
        .await
        .expect("open a data stream");
    send.write_all(&[macula_runtime::pubsub::STREAM_KIND_PUBSUB])
        .await
        .expect("kind byte");
    let mut data = macula_runtime::framed::FrameWriter::new(send, 1 << 20);
    let batch = |publisher, seq: u64, body: &str| {
        Message::PublishBatch(PublishBatch {
            publisher,
            epoch: 1,
            messages: vec![BatchMessage {
                seq,
                topic: "orders.new".into(),
                payload: body.as_bytes().to_vec(),
                headers: vec![],
                message_id: None,
            }],
            seals: vec![],
        })
    };
    for m in [
        batch(c1.node_id(), 1_000, "forged"),
        batch(raw.identity.node_id(), 1, "fence"),
    ] {
        within(STEP, "send batch", data.send(&m))
            .await
            .expect("send a batch");
    }
    let e = next_event(&mut on_b).await;
    assert_eq!(e.payload, Bytes::from("fence"), "the forgery was not delivered");
    assert_eq!(e.proof, Proof::Connection);
    assert_eq!(b.pubsub().counters().unproved_dropped_total.get(), 1);
    assert_eq!(on_b.pending(), 0);
}
