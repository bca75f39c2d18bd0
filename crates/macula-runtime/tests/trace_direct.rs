//! The pub/sub hot path's spans are made with the SDK tracer directly
//! (`trace::Direct`), without a `tracing` span (feature `otlp`). Checked
//! here: a publish span's context goes into the message's headers, and work
//! run for it (a DHT lookup, a relay session: `trace::child`, and a dial
//! that carries the caller's span, `trace::Current`) makes spans that are
//! its children, in its trace; without a traced publish, none.
#![cfg(feature = "otlp")]

mod common;

use common::spans::attr;
use macula_runtime::trace::{self, Current, TraceParent};
use macula_wire::NodeId;

#[tokio::test]
async fn work_for_a_direct_publish_span_is_its_child() {
    let (spans, provider) = common::spans::collect();
    let node = NodeId::from_bytes([9; 32]);
    let mut headers = Vec::new();

    // Off: no span, headers untouched.
    assert!(trace::publish_span(&mut headers, "orders.new", &node).is_none());
    assert!(headers.is_empty());

    trace::enable(1.0);
    let span = trace::publish_span(&mut headers, "orders.new", &node).expect("sampled at 100%");
    let tp: TraceParent = span.traceparent();
    assert_eq!(
        trace::find(&headers),
        Some(tp),
        "its context is in the headers"
    );
    let (inside, carried) = span
        .in_context(async {
            let inside = trace::child(
                || tracing::info_span!(target: trace::TARGET, "macula.dht", macula.op = "lookup"),
            );
            // A dial started later with the caller's spans.
            let current = Current::get();
            let carried = tokio::spawn(current.scope(async {
                trace::child(|| tracing::info_span!(target: trace::TARGET, "macula.relay.open"))
            }))
            .await
            .expect("task");
            (inside, carried)
        })
        .await;
    let (inside, carried) = (
        inside.expect("a child of the publish"),
        carried.expect("a child of the publish, in another task"),
    );
    drop((inside, carried));
    // Outside the publish: no parent, no span.
    assert!(trace::child(|| tracing::info_span!(target: trace::TARGET, "macula.dht")).is_none());
    trace::disable();
    provider.force_flush().expect("flush");

    let got = spans.0.lock().unwrap().clone();
    let publish = got
        .iter()
        .find(|s| s.name == "macula.publish")
        .expect("the publish span");
    assert_eq!(publish.span_context.span_id().to_bytes(), tp.parent_id);
    assert_eq!(publish.span_context.trace_id().to_bytes(), tp.trace_id);
    assert_eq!(
        publish.parent_span_id,
        opentelemetry::trace::SpanId::INVALID,
        "a new trace"
    );
    assert!(publish.span_context.is_sampled());
    assert_eq!(attr(publish, "macula.topic").as_deref(), Some("orders.new"));
    assert_eq!(attr(publish, "macula.node"), Some(node.to_string()));
    for name in ["macula.dht", "macula.relay.open"] {
        let s = got
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {got:?}"));
        assert_eq!(
            s.parent_span_id,
            publish.span_context.span_id(),
            "{name}'s parent"
        );
        assert_eq!(s.span_context.trace_id(), publish.span_context.trace_id());
        assert!(
            !s.parent_span_is_remote,
            "{name}'s parent is in this process"
        );
    }
    assert_eq!(got.len(), 3, "{got:?}");
}
