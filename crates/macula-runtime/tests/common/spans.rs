//! Spans collected in the test (feature `otlp`): an exporter that keeps
//! every finished span, installed as the global `tracing` subscriber.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Every span exported so far.
#[derive(Debug, Clone, Default)]
pub struct Collect(pub Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collect {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// Installs the runtime's spans (its sampler, a simple exporter into the
/// returned `Collect`) as this process's subscriber.
pub fn collect() -> (Collect, SdkTracerProvider) {
    let spans = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .with_sampler(macula_runtime::trace::Sampler)
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("test"))
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(macula_runtime::trace::TARGET, tracing::Level::INFO),
        );
    tracing_subscriber::registry().with(layer).init();
    // The pub/sub hot path's spans (`trace::Direct`) go to the same place.
    let direct = spans.clone();
    macula_runtime::trace::set_sink(move |d| direct.0.lock().unwrap().push(d));
    (spans, provider)
}

/// A span's attribute as text.
pub fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}
