//! Tracing through a gateway to its client, in process (feature `otlp`):
//! a message published by a full node A reaches client C through its
//! gateway B, which forwards it: one trace of A's `macula.publish`, B's
//! `macula.gateway.forward` (direction `to_clients`, a child of the
//! publish) and C's `macula.deliver` (a child of B's forwarding span).
//! (A client's own publishes through its gateway are in
//! `macula-cli/tests/tracing.rs`.) Spans are collected by an exporter in
//! this test.
#![cfg(feature = "otlp")]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::spans::attr;
use common::*;
use futures::StreamExt;
use macula_runtime::pubsub::SubscriptionItem;
use macula_runtime::{Client, ClientConfig, PeerAddr};
use opentelemetry_sdk::trace::SpanData;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_forwarding_a_nodes_message_to_its_client_is_a_span() {
    let (spans, provider) = common::spans::collect();

    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let gateway: PeerAddr = format!("{}@{}", b.node_id(), b.local_addr())
        .parse()
        .expect("peer address");
    let c = within(
        STEP,
        "client attaches",
        Client::connect(ClientConfig::new(vec![gateway])),
    )
    .await
    .expect("client attaches");
    let mut sub = c.subscribe("orders.**").await.expect("subscribe");

    macula_runtime::trace::enable(1.0);
    // A publishes until the client has one (A learns of B's interest on
    // the client's behalf within its interest bound).
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        a.pubsub()
            .publish_mesh("orders.new", Bytes::from("o1"), Default::default())
            .await
            .expect("publish");
        if let Ok(Some(SubscriptionItem::Event(e))) =
            tokio::time::timeout(Duration::from_millis(300), sub.next()).await
        {
            break e;
        }
        assert!(Instant::now() < deadline, "the client never got a message");
    };
    assert_eq!(got.publisher, a.node_id());
    let id = |s: &SpanData| s.span_context.span_id();
    // A span is exported when it ends: the gateway's forwarding span may
    // end a moment after the client already has the message (it covers the
    // write). Wait (bounded) until the client's delivery span and its
    // parent are both in.
    let is_delivery = |s: &SpanData| {
        s.name == "macula.deliver" && attr(s, "macula.node") == Some(c.node_id().to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = provider.force_flush();
        let done = {
            let got = spans.0.lock().unwrap();
            got.iter()
                .find(|s| is_delivery(s))
                .is_some_and(|d| got.iter().any(|s| id(s) == d.parent_span_id))
        };
        if done || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    macula_runtime::trace::disable();

    let got = spans.0.lock().unwrap().clone();
    let deliver = got
        .iter()
        .find(|s| is_delivery(s))
        .unwrap_or_else(|| panic!("no delivery span on the client: {got:#?}"));
    let forward = got
        .iter()
        .find(|s| id(s) == deliver.parent_span_id)
        .unwrap_or_else(|| panic!("the delivery's parent was not exported: {got:#?}"));
    assert_eq!(forward.name, "macula.gateway.forward", "{got:#?}");
    assert_eq!(attr(forward, "macula.node"), Some(b.node_id().to_string()));
    assert_eq!(
        attr(forward, "macula.direction").as_deref(),
        Some("to_clients")
    );
    assert_eq!(
        attr(forward, "macula.publisher"),
        Some(a.node_id().to_string())
    );
    assert!(forward.parent_span_is_remote);
    let publish = got
        .iter()
        .find(|s| id(s) == forward.parent_span_id)
        .unwrap_or_else(|| panic!("the forwarding span's parent was not exported: {got:#?}"));
    assert_eq!(publish.name, "macula.publish");
    assert_eq!(attr(publish, "macula.node"), Some(a.node_id().to_string()));
    for s in [deliver, forward] {
        assert_eq!(s.span_context.trace_id(), publish.span_context.trace_id());
    }
    // B has no subscriber of its own: no forwarding span for messages its
    // clients did not want, and exactly one per message forwarded.
    let forwards = got
        .iter()
        .filter(|s| s.name == "macula.gateway.forward")
        .count();
    let delivered = got
        .iter()
        .filter(|s| {
            s.name == "macula.deliver" && attr(s, "macula.node") == Some(c.node_id().to_string())
        })
        .count();
    assert!(
        forwards >= delivered && forwards >= 1,
        "{forwards} forwards, {delivered} deliveries"
    );
    drop(sub);
    c.shutdown().await;
}
