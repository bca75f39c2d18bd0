//! `--otlp URL` and `--trace-sample RATIO`: exporting the mesh's spans to an
//! OpenTelemetry collector over OTLP/HTTP (protobuf), and the logging setup
//! they share a subscriber with.
//!
//! The spans themselves are the runtime's (`macula::trace`); this module
//! installs the `tracing-opentelemetry` layer that turns them into
//! OpenTelemetry spans, the SDK's batch processor (its own thread) and an
//! exporter whose HTTP client is `ureq` (already the CLI's admin client:
//! plain HTTP, no second TLS stack). Built with the cargo feature `otlp`;
//! without it `--otlp` is refused with an error naming the feature.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::LogFormat;

/// The tracing flags of the mesh client commands (`pub`, `sub`, `trace`,
/// `call`, `serve`, `dht`); `macula start` has the same ones as settings
/// (`config::keys::OTLP` and `TRACE_SAMPLE`, also in its config file).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TraceArgs {
    /// Export spans (publish, deliver, call, handle, reply, DHT lookups, relay
    /// hops, gateway forwarding) to this OTLP/HTTP collector, http://HOST:PORT
    /// (needs a macula built with the `otlp` cargo feature).
    #[arg(long, env = "MACULA_OTLP", value_name = "URL", value_parser = crate::config::parse_otlp)]
    pub otlp: Option<String>,
    /// With --otlp: share of the operations starting here that start a
    /// trace, 0..1; a message or call from a traced parent follows its
    /// parent's decision.
    #[arg(
        long,
        env = "MACULA_TRACE_SAMPLE",
        value_name = "RATIO",
        default_value_t = crate::config::DEFAULT_TRACE_SAMPLE,
        value_parser = crate::config::parse_ratio
    )]
    pub trace_sample: f64,
}

/// Keeps the exporter alive; dropping it flushes the spans not sent yet.
pub struct TraceGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            macula::trace::disable();
            if let Err(e) = p.shutdown() {
                eprintln!("warning: spans not exported at exit: {e}");
            }
        }
    }
}

/// Installs logging on stderr (`RUST_LOG` wins over `default_level`) and,
/// with `--otlp`, the span exporter.
pub fn init(
    format: LogFormat,
    default_level: &str,
    trace: &TraceArgs,
) -> anyhow::Result<TraceGuard> {
    // openraft logs every failed RPC to a member that is down (5 a second,
    // at ERROR) and dumps whole state structs at INFO; the Raft service
    // warns once per member and 30 s instead (`raft/network.rs`).
    let default = format!(
        "{default_level},openraft=warn,openraft::replication=off,openraft::core::raft_core=off"
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    }];
    let guard = match &trace.otlp {
        None => TraceGuard {
            #[cfg(feature = "otlp")]
            provider: None,
        },
        Some(url) => exporter(url, trace.trace_sample, &mut layers)?,
    };
    // A second init (only possible in tests) is harmless; ignore it.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(guard)
}

#[cfg(not(feature = "otlp"))]
fn exporter(
    _url: &str,
    _ratio: f64,
    _layers: &mut Vec<Box<dyn Layer<Registry> + Send + Sync>>,
) -> anyhow::Result<TraceGuard> {
    anyhow::bail!(
        "--otlp needs a macula built with the `otlp` cargo feature \
         (cargo build --release -p macula-cli --features otlp)"
    )
}

#[cfg(feature = "otlp")]
fn exporter(
    url: &str,
    ratio: f64,
    layers: &mut Vec<Box<dyn Layer<Registry> + Send + Sync>>,
) -> anyhow::Result<TraceGuard> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
    use std::time::Duration;

    let base =
        crate::config::parse_otlp(url).map_err(|e| anyhow::anyhow!("--otlp {url:?}: {e}"))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(UreqClient(agent))
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("{base}/v1/traces"))
        .build()
        .map_err(|e| anyhow::anyhow!("--otlp {url}: {e}"))?;
    // Exported every 500 ms (short-lived commands flush at exit); up to
    // 65,536 spans wait, past that the SDK drops them.
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(Duration::from_millis(500))
        .with_max_queue_size(65_536)
        .with_max_export_batch_size(2_048)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
        )
        .with_sampler(macula::trace::Sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("macula")
                .build(),
        )
        .build();
    // Only the spans' own fields as attributes: no source location, thread,
    // target or busy/idle time (each would cost every span allocations and
    // export bytes), and no OpenTelemetry context activated on each entry
    // (nothing else here reads it).
    let layer = tracing_opentelemetry::layer()
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_tracer(provider.tracer("macula"))
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(macula::trace::TARGET, tracing::Level::INFO),
        );
    layers.push(layer.boxed());
    macula::trace::enable(ratio);
    Ok(TraceGuard {
        provider: Some(provider),
    })
}

/// The exporter's HTTP client: a blocking `ureq` agent, called from the
/// batch processor's own thread.
#[cfg(feature = "otlp")]
#[derive(Debug)]
struct UreqClient(ureq::Agent);

#[cfg(feature = "otlp")]
#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for UreqClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut resp = self
            .0
            .run(http::Request::from_parts(parts, body.to_vec()))?;
        let status = resp.status();
        let body = resp.body_mut().with_config().limit(1 << 20).read_to_vec()?;
        Ok(http::Response::builder()
            .status(status)
            .body(bytes::Bytes::from(body))?)
    }
}
