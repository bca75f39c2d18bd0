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
    use opentelemetry_sdk::trace::SdkTracerProvider;
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
    // 65,536 spans wait, past that they are dropped and counted.
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Batcher::start(exporter, BATCHING)?)
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

/// How [`Batcher`] batches.
#[cfg(feature = "otlp")]
#[derive(Debug, Clone, Copy)]
struct Batching {
    /// Spans waiting for export at most; past it they are dropped.
    max_queue: usize,
    /// Spans per export request at most.
    max_batch: usize,
    /// Longest a span waits for its batch.
    delay: std::time::Duration,
}

#[cfg(feature = "otlp")]
const BATCHING: Batching = Batching {
    max_queue: 65_536,
    max_batch: 2_048,
    delay: std::time::Duration::from_millis(500),
};

#[cfg(feature = "otlp")]
enum Job {
    Span(Box<opentelemetry_sdk::trace::SpanData>),
    Resource(opentelemetry_sdk::Resource),
    Flush(std::sync::mpsc::SyncSender<()>),
    Shutdown(std::sync::mpsc::SyncSender<()>),
}

/// The span processor: ended spans wait in a bounded queue; one thread
/// exports them in batches (`max_batch` or every `delay`). It does what the
/// SDK's `BatchSpanProcessor` does, and counts what that one only logs:
/// every span is exported or counted lost
/// (`macula::trace::count_exported` / `count_lost`, the metrics
/// `macula_trace_spans_exported_total` and
/// `macula_trace_spans_dropped_total{reason}`).
#[cfg(feature = "otlp")]
#[derive(Debug)]
struct Batcher {
    tx: std::sync::mpsc::SyncSender<Job>,
    worker: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[cfg(feature = "otlp")]
impl Batcher {
    fn start<E>(exporter: E, b: Batching) -> anyhow::Result<Batcher>
    where
        E: opentelemetry_sdk::trace::SpanExporter + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(b.max_queue);
        let worker = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(exporter, rx, b))?;
        Ok(Batcher {
            tx,
            worker: std::sync::Mutex::new(Some(worker)),
        })
    }

    /// Sends `job` and waits (at most `timeout`) for the worker's answer.
    fn ask(
        &self,
        job: impl FnOnce(std::sync::mpsc::SyncSender<()>) -> Job,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        use opentelemetry_sdk::error::OTelSdkError;
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(job(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        answer
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

#[cfg(feature = "otlp")]
fn export_loop<E: opentelemetry_sdk::trace::SpanExporter>(
    mut exporter: E,
    rx: std::sync::mpsc::Receiver<Job>,
    b: Batching,
) {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::Instant;
    let mut batch = Vec::with_capacity(b.max_batch);
    let mut due = Instant::now() + b.delay;
    let export = |exporter: &E, batch: &mut Vec<_>| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        match futures::executor::block_on(exporter.export(std::mem::take(batch))) {
            Ok(()) => macula::trace::count_exported(n),
            Err(e) => {
                macula::trace::count_lost(macula::trace::SpanLoss::ExportFailed, n);
                tracing::debug!(spans = n, error = %e, "OTLP export failed; spans dropped");
            }
        }
    };
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Job::Span(s)) => {
                batch.push(*s);
                if batch.len() >= b.max_batch {
                    export(&exporter, &mut batch);
                }
            }
            Ok(Job::Resource(r)) => exporter.set_resource(&r),
            Ok(Job::Flush(done)) => {
                export(&exporter, &mut batch);
                let _ = exporter.force_flush();
                let _ = done.send(());
            }
            Ok(Job::Shutdown(done)) => {
                export(&exporter, &mut batch);
                let _ = exporter.shutdown();
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                export(&exporter, &mut batch);
                return;
            }
        }
        if Instant::now() >= due {
            export(&exporter, &mut batch);
            due = Instant::now() + b.delay;
        }
    }
}

#[cfg(feature = "otlp")]
impl opentelemetry_sdk::trace::SpanProcessor for Batcher {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        use std::sync::mpsc::TrySendError;
        match self.tx.try_send(Job::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                macula::trace::count_lost(macula::trace::SpanLoss::QueueFull, 1)
            }
            Err(TrySendError::Disconnected(_)) => {
                macula::trace::count_lost(macula::trace::SpanLoss::ShutDown, 1)
            }
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.ask(Job::Flush, std::time::Duration::from_secs(30))
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let worker = self.worker.lock().ok().and_then(|mut w| w.take());
        let Some(worker) = worker else {
            return Err(opentelemetry_sdk::error::OTelSdkError::AlreadyShutdown);
        };
        let r = self.ask(Job::Shutdown, timeout);
        if r.is_ok() {
            let _ = worker.join();
        }
        r
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        let _ = self.tx.send(Job::Resource(resource.clone()));
    }
}

#[cfg(all(test, feature = "otlp"))]
mod tests {
    use super::*;
    use macula::trace::{spans_exported, spans_lost, SpanLoss};
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// An exporter that fails while `fail` is set, and holds its first
    /// export until `gate` is released (so the queue fills behind it).
    #[derive(Debug, Clone)]
    struct TestExporter {
        fail: Arc<AtomicBool>,
        gate: Arc<Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
        got: Arc<AtomicU64>,
    }

    impl SpanExporter for TestExporter {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let gate = self.gate.lock().unwrap().take();
            if let Some(g) = gate {
                let _ = g.recv_timeout(Duration::from_secs(30));
            }
            if self.fail.load(SeqCst) {
                return Err(OTelSdkError::InternalFailure("collector down".into()));
            }
            self.got.fetch_add(batch.len() as u64, SeqCst);
            Ok(())
        }
    }

    /// Every span is exported or counted dropped, with its reason: a full
    /// queue behind a stuck export, a failed export.
    #[test]
    fn every_span_is_exported_or_counted_dropped() {
        let (open, gate) = std::sync::mpsc::channel();
        let e = TestExporter {
            fail: Arc::new(AtomicBool::new(false)),
            gate: Arc::new(Mutex::new(Some(gate))),
            got: Arc::new(AtomicU64::new(0)),
        };
        let b = Batching {
            max_queue: 8,
            max_batch: 1,
            delay: Duration::from_millis(10),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Batcher::start(e.clone(), b).unwrap())
            .build();
        let tracer = provider.tracer("test");
        let (exported0, full0, failed0, shut0) = (
            spans_exported(),
            spans_lost(SpanLoss::QueueFull),
            spans_lost(SpanLoss::ExportFailed),
            spans_lost(SpanLoss::ShutDown),
        );
        // The first span's export is held: 8 more wait, the rest are
        // dropped: 91, one more if the first was still queued, one more
        // if the provider's resource was (it goes through the queue too).
        for _ in 0..100 {
            tracer.start("s").end();
        }
        let full = spans_lost(SpanLoss::QueueFull) - full0;
        assert!((91..=93).contains(&full), "{full} dropped for a full queue");
        open.send(()).unwrap();
        provider.force_flush().unwrap();
        assert_eq!(e.got.load(SeqCst), 100 - full);
        assert_eq!(spans_exported() - exported0, 100 - full);
        // The collector refuses: counted as export_failed.
        e.fail.store(true, SeqCst);
        for _ in 0..5 {
            tracer.start("s").end();
        }
        provider.force_flush().unwrap();
        assert_eq!(spans_lost(SpanLoss::ExportFailed) - failed0, 5);
        assert_eq!(spans_exported() - exported0, 100 - full);
        provider.shutdown().unwrap();
        assert_eq!(spans_lost(SpanLoss::ShutDown), shut0);
    }
}
