//! `--otlp URL` and `--trace-sample RATIO`: exporting the mesh's spans to an
//! OpenTelemetry collector over OTLP/HTTP (protobuf), and the logging setup
//! they share a subscriber with.
//!
//! The spans themselves are the runtime's (`macula::trace`); this module
//! installs the `tracing-opentelemetry` layer that turns them into
//! OpenTelemetry spans, the span processor (`Batcher`, its own thread) and
//! the exporter (`otlp_encode`: protobuf written straight from the spans,
//! sent with `ureq`, already the CLI's admin client: plain HTTP, no second
//! TLS stack). Built with the cargo feature `otlp`;
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

/// The exporting provider, for [`flush`].
#[cfg(feature = "otlp")]
static PROVIDER: std::sync::OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> =
    std::sync::OnceLock::new();

/// Exports every span ended so far and waits until the collector took
/// them (`macula bench tracing`, to charge a mode's turn with its own
/// export). False without an exporter.
pub fn flush() -> bool {
    #[cfg(feature = "otlp")]
    if let Some(p) = PROVIDER.get() {
        return p.force_flush().is_ok();
    }
    false
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
    use opentelemetry_sdk::trace::SdkTracerProvider;

    let base =
        crate::config::parse_otlp(url).map_err(|e| anyhow::anyhow!("--otlp {url:?}: {e}"))?;
    let exporter = crate::otlp_encode::Exporter::new(&base);
    // Exported every 500 ms (short-lived commands flush at exit); up to
    // 65,536 spans wait, past that they are dropped and counted.
    let batcher = Batcher::start(exporter, BATCHING)?;
    let ends = batcher.ends.clone();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batcher)
        .with_sampler(macula::trace::Sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("macula")
                .build(),
        )
        .build();
    // Only the spans' own fields as attributes: no source location, thread,
    // target or busy/idle time (each would cost every span allocations and
    // export bytes). An entered span's OpenTelemetry context is made
    // current (context activation, the default): that is where a publish
    // looks for its parent, in one thread-local read instead of a `tracing`
    // lookup per publish (`macula::trace::sampled_here`). Only sampled
    // spans exist here, so only traced work pays for it.
    let layer = tracing_opentelemetry::layer()
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(true)
        .with_tracer(provider.tracer("macula"))
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(macula::trace::TARGET, tracing::Level::INFO),
        );
    layers.push(layer.boxed());
    // The pub/sub hot path's spans are made by the runtime itself and
    // handed to the same queue.
    macula::trace::set_sink(move |span| ends.push(span));
    macula::trace::enable(ratio);
    let _ = PROVIDER.set(provider.clone());
    Ok(TraceGuard {
        provider: Some(provider),
    })
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

/// What the exporter's thread is asked besides exporting spans.
#[cfg(feature = "otlp")]
enum Job {
    Resource(opentelemetry_sdk::Resource),
    Flush(std::sync::mpsc::SyncSender<()>),
    Shutdown(std::sync::mpsc::SyncSender<()>),
}

/// Ended spans waiting for the exporter, and its jobs.
#[cfg(feature = "otlp")]
#[derive(Default)]
struct Queue {
    spans: Vec<opentelemetry_sdk::trace::SpanData>,
    jobs: Vec<Job>,
    /// Shut down (spans ending now are lost, counted `shut_down`).
    closed: bool,
    /// The processor was dropped: export what is left and stop.
    gone: bool,
}

#[cfg(feature = "otlp")]
struct Shared {
    queue: std::sync::Mutex<Queue>,
    /// Wakes the thread: a job, a full batch, the processor dropped.
    wake: std::sync::Condvar,
}

#[cfg(feature = "otlp")]
impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The span processor: ended spans wait in a bounded queue; one thread
/// exports them in batches (`max_batch` or every `delay`). It does what the
/// SDK's `BatchSpanProcessor` does, and counts what that one only logs:
/// every span is exported or counted lost
/// (`macula::trace::count_exported` / `count_lost`, the metrics
/// `macula_trace_spans_exported_total` and
/// `macula_trace_spans_dropped_total{reason}`).
///
/// Ending a span is a push under a mutex: the thread is only woken when a
/// batch is full (else it wakes every `delay`), so a few sampled spans a
/// second (1% sampling) do not each pay a thread wake-up.
#[cfg(feature = "otlp")]
struct Batcher {
    /// Where ended spans are queued (`on_end`, and the runtime's direct
    /// spans: `macula::trace::set_sink`), with the queue the worker reads.
    ends: Ends,
    worker: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Queues ended spans for the export thread (bounded: past `max_queue`
/// they are dropped and counted).
#[cfg(feature = "otlp")]
#[derive(Clone)]
struct Ends {
    shared: std::sync::Arc<Shared>,
    batching: Batching,
}

#[cfg(feature = "otlp")]
impl Ends {
    fn push(&self, span: opentelemetry_sdk::trace::SpanData) {
        let full = {
            let mut q = self.shared.lock();
            if q.closed || q.gone {
                drop(q);
                macula::trace::count_lost(macula::trace::SpanLoss::ShutDown, 1);
                return;
            }
            if q.spans.len() >= self.batching.max_queue {
                drop(q);
                macula::trace::count_lost(macula::trace::SpanLoss::QueueFull, 1);
                return;
            }
            q.spans.push(span);
            q.spans.len() == self.batching.max_batch
        };
        if full {
            self.shared.wake.notify_one();
        }
    }
}

#[cfg(feature = "otlp")]
impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("batching", &self.ends.batching)
            .finish()
    }
}

#[cfg(feature = "otlp")]
impl Batcher {
    fn start<E>(exporter: E, b: Batching) -> anyhow::Result<Batcher>
    where
        E: opentelemetry_sdk::trace::SpanExporter + 'static,
    {
        let shared = std::sync::Arc::new(Shared {
            queue: std::sync::Mutex::new(Queue::default()),
            wake: std::sync::Condvar::new(),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(exporter, &s, b))?;
        Ok(Batcher {
            ends: Ends {
                shared,
                batching: b,
            },
            worker: std::sync::Mutex::new(Some(worker)),
        })
    }

    /// Queues `job` and waits (at most `timeout`) for the worker's answer.
    fn ask(
        &self,
        job: impl FnOnce(std::sync::mpsc::SyncSender<()>) -> Job,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        use opentelemetry_sdk::error::OTelSdkError;
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        {
            let mut q = self.ends.shared.lock();
            if q.closed {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            q.jobs.push(job(done));
        }
        self.ends.shared.wake.notify_one();
        answer
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

#[cfg(feature = "otlp")]
impl Drop for Batcher {
    fn drop(&mut self) {
        self.ends.shared.lock().gone = true;
        self.ends.shared.wake.notify_one();
    }
}

#[cfg(feature = "otlp")]
fn export_loop<E: opentelemetry_sdk::trace::SpanExporter>(
    mut exporter: E,
    shared: &Shared,
    b: Batching,
) {
    use std::time::Instant;
    let export_one = |exporter: &E, spans: Vec<_>| {
        let n = spans.len() as u64;
        match futures::executor::block_on(exporter.export(spans)) {
            Ok(()) => macula::trace::count_exported(n),
            Err(e) => {
                macula::trace::count_lost(macula::trace::SpanLoss::ExportFailed, n);
                tracing::debug!(spans = n, error = %e, "OTLP export failed; spans dropped");
            }
        }
    };
    // A queue longer than a batch goes in batches taken from its front,
    // each span moved once (splitting the rest off for every batch copied
    // the whole remaining queue each time: quadratic in a backlog).
    let export = |exporter: &E, spans: Vec<_>| {
        if spans.len() <= b.max_batch {
            if !spans.is_empty() {
                export_one(exporter, spans);
            }
            return;
        }
        let mut rest = spans.into_iter();
        loop {
            let batch: Vec<_> = rest.by_ref().take(b.max_batch).collect();
            if batch.is_empty() {
                break;
            }
            export_one(exporter, batch);
        }
    };
    let mut due = Instant::now() + b.delay;
    loop {
        let (spans, jobs, gone) = {
            let mut q = shared.lock();
            loop {
                let now = Instant::now();
                if !q.jobs.is_empty() || q.gone || q.spans.len() >= b.max_batch || now >= due {
                    break;
                }
                q = match shared.wake.wait_timeout(q, due - now) {
                    Ok((q, _)) => q,
                    Err(p) => p.into_inner().0,
                };
            }
            let now = Instant::now();
            let timed_out = now >= due;
            if timed_out {
                due = now + b.delay;
            }
            let shutting = q.jobs.iter().any(|j| matches!(j, Job::Shutdown(_)));
            let flushing = q.jobs.iter().any(|j| matches!(j, Job::Flush(_)));
            // From a shutdown on, spans ending are lost (counted).
            q.closed |= shutting;
            // The spans go when a batch is full, at the delay, and on a
            // flush or shutdown (not for a new resource).
            // The queue keeps room for as many as went now (up to a
            // batch), so spans ending meanwhile do not regrow it (each
            // regrowth copies it under the lock).
            let spans =
                if timed_out || shutting || flushing || q.gone || q.spans.len() >= b.max_batch {
                    let room = q.spans.len().min(b.max_batch);
                    std::mem::replace(&mut q.spans, Vec::with_capacity(room))
                } else {
                    Vec::new()
                };
            (spans, std::mem::take(&mut q.jobs), q.gone)
        };
        // The resource first (it comes before any span), then the spans
        // queued before a flush or shutdown, then those.
        let mut done = Vec::new();
        for job in jobs {
            match job {
                Job::Resource(r) => exporter.set_resource(&r),
                other => done.push(other),
            }
        }
        export(&exporter, spans);
        for job in done {
            match job {
                Job::Resource(_) => {}
                Job::Flush(tx) => {
                    let _ = exporter.force_flush();
                    let _ = tx.send(());
                }
                Job::Shutdown(tx) => {
                    let _ = exporter.shutdown();
                    let _ = tx.send(());
                    return;
                }
            }
        }
        if gone {
            return;
        }
    }
}

#[cfg(feature = "otlp")]
impl opentelemetry_sdk::trace::SpanProcessor for Batcher {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        self.ends.push(span);
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
        self.ends
            .shared
            .lock()
            .jobs
            .push(Job::Resource(resource.clone()));
        self.ends.shared.wake.notify_one();
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
        /// The largest batch exported.
        biggest: Arc<AtomicU64>,
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
            self.biggest.fetch_max(batch.len() as u64, SeqCst);
            Ok(())
        }
    }

    /// Ending a span does not wake the exporter's thread: spans wait for a
    /// full batch (or the delay, or a flush), so a trickle of sampled
    /// spans costs no thread wake-up each.
    #[test]
    fn spans_wait_for_a_full_batch() {
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let e = TestExporter {
            fail: Arc::new(AtomicBool::new(false)),
            gate: Arc::new(Mutex::new(None)),
            got: Arc::new(AtomicU64::new(0)),
            biggest: Arc::new(AtomicU64::new(0)),
        };
        let b = Batching {
            max_queue: 64,
            max_batch: 4,
            delay: Duration::from_secs(3600),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Batcher::start(e.clone(), b).unwrap())
            .build();
        let tracer = provider.tracer("test");
        for _ in 0..3 {
            tracer.start("s").end();
        }
        // Time for an export the thread was (wrongly) woken for.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(e.got.load(SeqCst), 0, "exported before a batch was full");
        // The fourth fills the batch: exported without a flush.
        tracer.start("s").end();
        let t = std::time::Instant::now();
        while e.got.load(SeqCst) < 4 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(e.got.load(SeqCst), 4);
        // Fewer than a batch go out on a flush.
        tracer.start("s").end();
        provider.force_flush().unwrap();
        assert_eq!(e.got.load(SeqCst), 5);
        provider.shutdown().unwrap();
    }

    /// The tests here read the process's span counters: one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Every span is exported or counted dropped, with its reason: a full
    /// queue behind a stuck export, a failed export.
    #[test]
    fn every_span_is_exported_or_counted_dropped() {
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let (open, gate) = std::sync::mpsc::channel();
        let e = TestExporter {
            fail: Arc::new(AtomicBool::new(false)),
            gate: Arc::new(Mutex::new(Some(gate))),
            got: Arc::new(AtomicU64::new(0)),
            biggest: Arc::new(AtomicU64::new(0)),
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
        // The first span's export is held (waited for: the thread has taken
        // the gate): of 99 more, 8 wait and 91 are dropped.
        tracer.start("s").end();
        let t = std::time::Instant::now();
        while e.gate.lock().unwrap().is_some() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(e.gate.lock().unwrap().is_none(), "the first export began");
        for _ in 0..99 {
            tracer.start("s").end();
        }
        let full = spans_lost(SpanLoss::QueueFull) - full0;
        assert_eq!(full, 91, "dropped for a full queue");
        open.send(()).unwrap();
        provider.force_flush().unwrap();
        assert_eq!(e.got.load(SeqCst), 100 - full);
        assert_eq!(spans_exported() - exported0, 100 - full);
        // The backlog behind the held export went in batches of one.
        assert_eq!(e.biggest.load(SeqCst), 1);
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
