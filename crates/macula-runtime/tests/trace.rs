//! Tracing through a relay, in process (feature `otlp`): a call from a
//! private node to a private provider reached through a relay makes one
//! trace: the caller's `macula.call`, its `macula.relay.open` (the dial
//! through the relay), the relay's `macula.relay.hop` (a child of that, from
//! RELAY_CONNECT's `traceparent`), and the provider's `macula.handle` and
//! `macula.reply`. Spans are collected by an exporter in this test.
#![cfg(feature = "otlp")]

mod common;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::spans::attr;
use common::*;
use macula_runtime::config::ReachabilityMode;
use macula_runtime::rpc::{AdvertiseOptions, HandlerError, Request};
use macula_runtime::{NodeConfig, NodeRuntime};
use opentelemetry_sdk::trace::SpanData;

fn private(relay: &NodeRuntime) -> NodeConfig {
    NodeConfig {
        reachability: ReachabilityMode::Private,
        ..boot(relay)
    }
}

async fn echo(req: Request) -> Result<Bytes, HandlerError> {
    Ok(req.payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_through_a_relay_is_one_trace() {
    let (spans, provider) = common::spans::collect();

    let r = start(config()).await;
    let c = start(private(&r)).await;
    joined(&c).await;
    let a = start(private(&r)).await;
    joined(&a).await;
    for n in [&c, &a] {
        let rid = r.node_id();
        eventually(STEP, "reservation at the relay", || {
            n.tunnel().reserved_relays().contains(&rid)
        })
        .await;
    }
    let _reg = within(
        STEP,
        "advertise",
        c.rpc()
            .advertise("svc.echo", AdvertiseOptions::default(), echo),
    )
    .await
    .expect("advertise");

    macula_runtime::trace::enable(1.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = tokio::time::timeout(STEP, a.rpc().call("svc.echo", "x").into_future()).await;
        if matches!(r, Ok(Ok(_))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the call through the relay never answered: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    macula_runtime::trace::disable();
    let _ = provider.force_flush();

    let got = spans.0.lock().unwrap().clone();
    fn named<'a>(got: &'a [SpanData], name: &'a str) -> impl Iterator<Item = &'a SpanData> {
        got.iter().filter(move |s| s.name == name)
    }
    let named = |name: &'static str| named(&got, name);
    let id = |s: &SpanData| s.span_context.span_id();
    let open = named("macula.relay.open")
        .find(|o| named("macula.call").any(|c| id(c) == o.parent_span_id))
        .unwrap_or_else(|| panic!("no relay.open inside a call: {got:#?}"));
    assert_eq!(attr(open, "macula.relay"), Some(r.node_id().to_string()));
    assert_eq!(attr(open, "macula.target"), Some(c.node_id().to_string()));
    let hop = named("macula.relay.hop")
        .find(|h| h.parent_span_id == id(open))
        .unwrap_or_else(|| panic!("no relay.hop under the relay.open: {got:#?}"));
    assert!(hop.parent_span_is_remote);
    assert_eq!(hop.span_context.trace_id(), open.span_context.trace_id());
    assert_eq!(attr(hop, "macula.node"), Some(r.node_id().to_string()));
    assert_eq!(attr(hop, "macula.source"), Some(a.node_id().to_string()));
    // The answered call: handled on C as a child of A's call, then replied.
    let handle = named("macula.handle")
        .find(|h| named("macula.call").any(|c| id(c) == h.parent_span_id))
        .unwrap_or_else(|| panic!("no handle under a call: {got:#?}"));
    assert_eq!(attr(handle, "macula.node"), Some(c.node_id().to_string()));
    assert_eq!(attr(handle, "macula.caller"), Some(a.node_id().to_string()));
    assert!(named("macula.reply").any(|s| s.parent_span_id == id(handle)));
    // DHT lookups made for the call are spans of its trace.
    assert!(
        named("macula.dht").any(|d| got
            .iter()
            .any(|c| c.name == "macula.call" && id(c) == d.parent_span_id)),
        "{got:#?}"
    );
}
