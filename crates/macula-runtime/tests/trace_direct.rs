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
    spans.0.lock().unwrap().clear();

    // The application's current `tracing` span is the parent: its sampling
    // decides (parent-based), whatever the ratio. The publish sees it
    // through the OpenTelemetry context that the `tracing-opentelemetry`
    // layer makes current while the span is entered.
    // (An application span's OpenTelemetry span starts, and is sampled,
    // when first asked for or entered: each is asked for at its ratio.)
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    trace::enable(1.0);
    let sampled = tracing::info_span!(target: trace::TARGET, "app.order");
    let app_sc = sampled.context().span().span_context().clone();
    assert!(app_sc.is_sampled());
    trace::enable(0.0);
    let unsampled = tracing::info_span!(target: trace::TARGET, "app.audit");
    assert!(!unsampled.context().span().span_context().is_sampled());
    let mut inside = Vec::new();
    let child = sampled
        .in_scope(|| trace::publish_span(&mut inside, "orders.new", &node))
        .expect("a child of the sampled application span, at ratio 0");
    let child_tp = child.traceparent();
    drop(child);
    let mut outside = Vec::new();
    assert!(
        trace::publish_span(&mut outside, "orders.new", &node).is_none(),
        "ratio 0, no parent: not traced"
    );
    trace::enable(1.0);
    let mut under = Vec::new();
    assert!(
        unsampled
            .in_scope(|| trace::publish_span(&mut under, "orders.new", &node))
            .is_none(),
        "an unsampled parent is followed, even at ratio 1"
    );
    assert!(under.is_empty() && outside.is_empty());
    drop((sampled, unsampled));
    trace::disable();
    provider.force_flush().expect("flush");
    let got = spans.0.lock().unwrap().clone();
    let publish = got
        .iter()
        .find(|s| s.name == "macula.publish")
        .expect("the publish span");
    assert_eq!(publish.parent_span_id, app_sc.span_id(), "its parent");
    assert_eq!(publish.span_context.trace_id(), app_sc.trace_id());
    assert_eq!(child_tp.trace_id, app_sc.trace_id().to_bytes());
    assert_eq!(trace::find(&inside), Some(child_tp));
    assert_eq!(
        got.iter().filter(|s| s.name == "macula.publish").count(),
        1,
        "{got:?}"
    );
}
