//! Proved publishers over real QUIC on 127.0.0.1 (PROTOCOL.md §5.3,
//! "Proved publishers"): a client's messages reach other nodes and other
//! gateways' clients with its signature verified; a full node that forwards
//! a batch naming another publisher without that publisher's seal is not
//! believed: the batch is dropped and counted, never delivered.

mod common;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use std::future::IntoFuture;

use macula_runtime::pubsub::{Event, Proof, Subscription, SubscriptionItem};
use macula_runtime::rpc::{AdvertiseOptions, HandlerError, Request};
use macula_runtime::{Client, ClientConfig, NodeRuntime, PeerAddr};
use macula_wire::pubsub::{BatchMessage, PublishBatch};
use macula_wire::rpc::{Call, RpcMessage};
use macula_wire::{Message, RpcErrorKind};

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
    assert_eq!(
        e.payload,
        Bytes::from("fence"),
        "the forgery was not delivered"
    );
    assert_eq!(e.proof, Proof::Connection);
    assert_eq!(b.pubsub().counters().unproved_dropped_total.get(), 1);
    assert_eq!(on_b.pending(), 0);
}

/// The handler's view of who called: (caller, origin).
fn who(r: &Request) -> Bytes {
    Bytes::from(format!(
        "{} {}",
        r.caller,
        r.origin.map(|o| o.to_string()).unwrap_or_default()
    ))
}

async fn whoami(r: Request) -> Result<Bytes, HandlerError> {
    Ok(who(&r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_calls_name_it_proved_and_a_forged_origin_is_refused() {
    init_tracing();
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let c1 = client(&a).await;
    let c2 = client(&b).await;
    let _on_b = b
        .rpc()
        .advertise("svc.who", AdvertiseOptions::default(), whoami)
        .await
        .expect("advertise on b");
    let _on_c2 = c2
        .advertise("svc.who2", AdvertiseOptions::default(), whoami)
        .await
        .expect("advertise on c2");
    // C1 -> gateway A -> B: B's connection names A, the signature C1.
    let r = within(STEP, "call b", c1.call("svc.who", "x").into_future())
        .await
        .expect("call b");
    assert_eq!(
        r.payload,
        Bytes::from(format!("{} {}", a.node_id(), c1.node_id()))
    );
    // C1 -> A -> B -> C2 (a client's procedure, through its gateway B).
    let r = within(STEP, "call c2", c1.call("svc.who2", "x").into_future())
        .await
        .expect("call c2");
    assert_eq!(
        r.payload,
        Bytes::from(format!("{} {}", b.node_id(), c1.node_id()))
    );
    // A node's own call needs no origin: its connection proves it.
    let r = within(
        STEP,
        "a calls b",
        a.rpc().call("svc.who", "x").into_future(),
    )
    .await
    .expect("a calls b");
    assert_eq!(r.payload, Bytes::from(format!("{} ", a.node_id())));

    // A full node hands over a call with C1's origin taken from another
    // call (it cannot sign as C1): refused, counted, the handler not run.
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let genuine = macula_auth::origin::sign_call(&key, "svc.who", b"real", &[]);
    let raw = RawClient::connect(&b).await;
    let mut ctl = raw.handshake(&b).await;
    ctl.send(&Message::Rpc(RpcMessage::Call(Call {
        id: 1,
        procedure: "svc.who".into(),
        payload: b"forged".to_vec(),
        timeout_ms: 5_000,
        headers: vec![],
        origin: Some(genuine.clone()),
    })))
    .await;
    match ctl.recv().await {
        Message::Rpc(RpcMessage::Error(e)) => {
            assert_eq!((e.id, e.kind), (1, RpcErrorKind::Unauthorized));
            assert!(e.message.contains("not proved"), "{}", e.message);
        }
        other => panic!("expected CALL_ERROR, got {other:?}"),
    }
    assert_eq!(b.rpc().counters().unproved_callers_total.get(), 1);
    // The genuine one is served, naming the key's node as origin.
    ctl.send(&Message::Rpc(RpcMessage::Call(Call {
        id: 2,
        procedure: "svc.who".into(),
        payload: b"real".to_vec(),
        timeout_ms: 5_000,
        headers: vec![],
        origin: Some(genuine),
    })))
    .await;
    let signer = macula_wire::NodeId::from_public_key(key.verifying_key().as_bytes());
    match ctl.recv().await {
        Message::Rpc(RpcMessage::Reply(r)) => {
            assert_eq!(
                r.payload,
                format!("{} {signer}", raw.identity.node_id()).into_bytes()
            );
        }
        other => panic!("expected REPLY, got {other:?}"),
    }
}
