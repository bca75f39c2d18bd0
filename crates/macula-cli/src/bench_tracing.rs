//! `macula bench tracing`: pub/sub and RPC between two in-process nodes over
//! QUIC on 127.0.0.1 with tracing off, on at 1% sampling and on at 100%,
//! rounds alternating, side by side. Spans are really exported: to an
//! OTLP/HTTP sink on 127.0.0.1 in this process that reads every request and
//! counts it (`spans_exported_bytes`).
//!
//! Figures per mode: publish throughput (64 B, flat out, until the
//! subscriber has them all), publish-to-receive latency (one message in
//! flight), calls per second (`--concurrency` callers) and call latency
//! (one call in flight). Then, with `--mixed-count`, the latencies again
//! with off, 0% and 1% taking turns every 100 operations: a mode's figure
//! then comes from the whole run's time, so a difference of a few percent
//! is the mode's, not the machine's drift between rounds.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use macula::{Identity, Node, Subscription, SubscriptionItem};

use crate::bench_stats::{build_kind, debug_note, median};
use crate::otlp::TraceArgs;

#[derive(clap::Args, Debug)]
pub struct TracingArgs {
    /// Messages per throughput run.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Messages (one in flight) per latency run, and calls per latency run.
    #[arg(long, default_value_t = 2_000)]
    latency_count: usize,
    /// Calls per throughput run.
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Concurrent callers in the throughput run.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Rounds (each runs every mode; medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Messages and calls per mode (one in flight) for the interleaved
    /// latency run: off, 0% and 1% take turns every `MIXED_BLOCK`
    /// operations, so the machine's drift weighs on each alike (0: none).
    #[arg(long, default_value_t = 20_000)]
    mixed_count: usize,
    /// Messages per mode for the interleaved throughput run (turns of
    /// 100,000 flat out, each ending with its spans exported, so a
    /// turn's CPU is its mode's own; 0: none).
    #[arg(long, default_value_t = 600_000)]
    mixed_messages: usize,
    /// The modes the rounds run, of off, 0%, 1% and 100% (ratios are to
    /// the first given). One mode alone, run under `valgrind --tool=callgrind`
    /// at two message counts, gives its instructions per message.
    #[arg(long, value_delimiter = ',', default_value = "off,0%,1%,100%")]
    modes: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The modes (each round runs them all, starting one further): off (the default), on
/// but sampling nothing (the cost of the hooks and the decision), 1% and
/// 100% of the operations traced.
const MODES: [(&str, Option<f64>); 4] = [
    ("off", None),
    ("0%", Some(0.0)),
    ("1%", Some(0.01)),
    ("100%", Some(1.0)),
];

/// Operations per turn of a mode in the interleaved latency run.
const MIXED_BLOCK: usize = 100;

/// Messages per turn of a mode in the interleaved throughput run: at 1%
/// about 2,000 spans, one export batch, so the flush that ends a turn
/// sends what the exporter would send anyway (smaller turns would charge
/// 1% with more, smaller requests than it makes when running).
const MIXED_FLAT: usize = 100_000;

/// The modes of the interleaved latency run (100% is left out: its
/// export's backlog would run into the next mode's turn).
const MIXED_MODES: [usize; 3] = [0, 1, 2];

/// The in-process OTLP sink: requests and bytes received, and the CPU
/// time its threads spent receiving them (left out of the figures: it
/// stands in for a collector, which runs on a machine of its own).
#[derive(Default)]
struct Sink {
    requests: AtomicU64,
    bytes: AtomicU64,
    cpu_ns: AtomicU64,
}

/// CPU time of the calling thread, nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

static SINK: OnceLock<Arc<Sink>> = OnceLock::new();

/// The tracing flags `bench tracing` runs with: its own sink as the
/// collector (started here, before logging is set up).
pub fn trace_args() -> anyhow::Result<TraceArgs> {
    anyhow::ensure!(
        cfg!(feature = "otlp"),
        "bench tracing needs a macula built with the `otlp` cargo feature \
         (cargo build --release -p macula-cli --features otlp)"
    );
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the OTLP sink")?;
    let addr = listener.local_addr()?;
    let sink = Arc::new(Sink::default());
    let _ = SINK.set(sink.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let sink = sink.clone();
            std::thread::spawn(move || serve_sink(conn, &sink));
        }
    });
    Ok(TraceArgs {
        otlp: Some(format!("http://{addr}")),
        trace_sample: 0.0,
    })
}

/// Answers OTLP/HTTP export requests on one keep-alive connection with an
/// empty success, counting what arrived. Ends on any malformed request.
fn serve_sink(conn: std::net::TcpStream, sink: &Sink) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let mut cpu = thread_cpu_ns();
    loop {
        // What this thread spent since the last request (reading this
        // one included) is the sink's.
        let now = thread_cpu_ns();
        sink.cpu_ns.fetch_add(now.saturating_sub(cpu), Relaxed);
        cpu = now;
        let mut len = None;
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let Some(len) = len.filter(|&n| n <= 64 << 20) else {
            return;
        };
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        sink.requests.fetch_add(1, Relaxed);
        sink.bytes.fetch_add(len as u64, Relaxed);
        let now = thread_cpu_ns();
        sink.cpu_ns.fetch_add(now.saturating_sub(cpu), Relaxed);
        cpu = now;
        let ok =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if w.write_all(ok.as_bytes()).is_err() {
            return;
        }
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Round {
    publish_msgs_per_s: f64,
    publish_p50_us: f64,
    publish_p99_us: f64,
    calls_per_s: f64,
    call_p50_us: f64,
    call_p99_us: f64,
    /// CPU time of this process (both nodes and the exporter, not the
    /// in-process sink) per publish of the throughput run, its export
    /// included: less
    /// sensitive than throughput to what else runs on the machine.
    publish_cpu_us: f64,
    /// The same per call of the 32-caller run.
    call_cpu_us: f64,
    spans_exported_bytes: u64,
    /// Spans the exporter dropped (queue full, export failed).
    spans_dropped: u64,
}

type Figure = fn(&Round) -> f64;

/// A figure of the interleaved runs.
type MixedFigure = fn(&Mixed) -> f64;

/// The interleaved runs' figures.
const MIXED_ROWS: [(&str, MixedFigure); 6] = [
    ("publish_msgs_per_s", |m| {
        m.messages as f64 / m.secs.max(1e-9)
    }),
    ("publish_cpu_us", |m| {
        m.cpu_secs * 1e6 / (m.messages.max(1) as f64)
    }),
    ("publish_p50_us", |m| pct(&m.publish, 0.5)),
    ("publish_p99_us", |m| pct(&m.publish, 0.99)),
    ("call_p50_us", |m| pct(&m.call, 0.5)),
    ("call_p99_us", |m| pct(&m.call, 0.99)),
];

const FIGURES: [(&str, Figure); 8] = [
    ("publish_msgs_per_s", |r| r.publish_msgs_per_s),
    ("publish_cpu_us", |r| r.publish_cpu_us),
    ("publish_p50_us", |r| r.publish_p50_us),
    ("publish_p99_us", |r| r.publish_p99_us),
    ("calls_per_s", |r| r.calls_per_s),
    ("call_cpu_us", |r| r.call_cpu_us),
    ("call_p50_us", |r| r.call_p50_us),
    ("call_p99_us", |r| r.call_p99_us),
];

/// CPU time this process has used (user and system), seconds, less what
/// the in-process OTLP sink used (the collector's work, not Macula's).
fn cpu_secs() -> f64 {
    let sink = SINK.get().map_or(0, |s| s.cpu_ns.load(Relaxed)) as f64 / 1e9;
    process_cpu_secs() - sink
}

/// CPU time this process has used (user and system), seconds.
fn process_cpu_secs() -> f64 {
    // SAFETY: getrusage writes the struct it is given; zeroed is valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Spans the exporter dropped so far, for any reason.
fn spans_dropped() -> u64 {
    macula::trace::SpanLoss::ALL
        .iter()
        .map(|w| macula::trace::spans_lost(*w))
        .sum()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

async fn round(a: &Node, b: &Node, args: &TracingArgs) -> anyhow::Result<Round> {
    let limit = Duration::from_secs(30);
    let sink = SINK.get().context("no OTLP sink")?.clone();
    let before = sink.bytes.load(Relaxed);
    let dropped_before = spans_dropped();
    let sub = b.subscribe("bench.**").await?;
    a.wait_for_subscribers("bench.t", Duration::from_secs(10))
        .await?;
    let payload = Bytes::from(vec![7u8; 64]);
    // Throughput.
    let n = args.messages;
    let cpu = cpu_secs();
    let t = Instant::now();
    let mut sub = flat_out(a, "bench.t", sub, n, &payload, limit).await?;
    let publish_msgs_per_s = n as f64 / t.elapsed().as_secs_f64();
    // Their spans exported too (the CPU of the idle wait is the nodes'
    // timers: the same in every mode).
    quiesce(&sink).await;
    let publish_cpu_us = (cpu_secs() - cpu) * 1e6 / n as f64;
    // Latency: one message in flight.
    let mut lat = Vec::with_capacity(args.latency_count);
    for _ in 0..args.latency_count {
        let t = Instant::now();
        a.publish("bench.t", payload.clone()).await?;
        match tokio::time::timeout(limit, sub.next()).await {
            Ok(Some(SubscriptionItem::Event(_))) => lat.push(t.elapsed()),
            other => anyhow::bail!("latency run: {other:?}"),
        }
    }
    drop(sub);
    lat.sort_unstable();
    let reg = b
        .advertise("bench.echo", |r: macula::Request| async move {
            Ok::<_, macula::HandlerError>(r.payload)
        })
        .await?;
    a.call("bench.echo", Bytes::from_static(b"warm")).await?;
    quiesce(&sink).await;
    let left = Arc::new(AtomicUsize::new(args.calls));
    let cpu = cpu_secs();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (a, left) = (a.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                a.call("bench.echo", Bytes::from_static(b"x")).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let calls_per_s = args.calls as f64 / t.elapsed().as_secs_f64();
    quiesce(&sink).await;
    let call_cpu_us = (cpu_secs() - cpu) * 1e6 / args.calls as f64;
    let mut clat = Vec::with_capacity(args.latency_count);
    for _ in 0..args.latency_count {
        let t = Instant::now();
        a.call("bench.echo", Bytes::from_static(b"x")).await?;
        clat.push(t.elapsed());
    }
    clat.sort_unstable();
    drop(reg);
    // What this mode exported: everything, before the next mode starts
    // (the processor sends every 500 ms; a backlog of spans being encoded
    // and sent would steal the next mode's CPU).
    quiesce(&sink).await;
    Ok(Round {
        publish_msgs_per_s,
        publish_p50_us: pct(&lat, 0.5),
        publish_p99_us: pct(&lat, 0.99),
        calls_per_s,
        call_p50_us: pct(&clat, 0.5),
        call_p99_us: pct(&clat, 0.99),
        publish_cpu_us,
        call_cpu_us,
        spans_exported_bytes: sink.bytes.load(Relaxed) - before,
        spans_dropped: spans_dropped() - dropped_before,
    })
}

fn set_mode(ratio: Option<f64>) -> anyhow::Result<()> {
    match ratio {
        None => macula::trace::disable(),
        #[cfg(feature = "otlp")]
        Some(x) => macula::trace::enable(x),
        #[cfg(not(feature = "otlp"))]
        Some(_) => anyhow::bail!("built without the `otlp` feature"),
    }
    Ok(())
}

/// One mode's share of the interleaved runs.
#[derive(Debug, Clone, Default)]
struct Mixed {
    /// Sorted publish and call latencies (one in flight).
    publish: Vec<Duration>,
    call: Vec<Duration>,
    /// Messages published flat out, their time, and the process's CPU
    /// time meanwhile (their spans' export included, the sink left out).
    messages: usize,
    secs: f64,
    cpu_secs: f64,
}

/// Publishes `n` messages on `topic` flat out and returns once `sub` has
/// them all (a `Lagged` item counts what it skipped), or fails after
/// `limit` without one.
async fn flat_out(
    a: &Node,
    topic: &str,
    mut sub: Subscription,
    n: usize,
    payload: &Bytes,
    limit: Duration,
) -> anyhow::Result<Subscription> {
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while got < n {
            match tokio::time::timeout(limit, sub.next()).await {
                Ok(Some(SubscriptionItem::Event(_))) => got += 1,
                Ok(Some(SubscriptionItem::Lagged(k))) => got += k as usize,
                Ok(None) | Err(_) => anyhow::bail!("only {got} of {n} messages arrived"),
            }
        }
        Ok(sub)
    });
    for _ in 0..n {
        a.publish(topic, payload.clone()).await?;
    }
    reader.await?
}

/// Flat-out turns of [`MIXED_MODES`], [`MIXED_FLAT`] messages each, every
/// turn ending once the subscriber has them all and their spans are
/// exported; adds each turn's time and CPU to its mode.
async fn mixed_flat(a: &Node, b: &Node, count: usize, out: &mut [Mixed]) -> anyhow::Result<()> {
    let limit = Duration::from_secs(30);
    let mut sub = b.subscribe("bench.flat").await?;
    a.wait_for_subscribers("bench.flat", Duration::from_secs(10))
        .await?;
    let payload = Bytes::from(vec![7u8; 64]);
    for turn in 0..count.div_ceil(MIXED_FLAT) {
        let n = MIXED_FLAT.min(count - turn * MIXED_FLAT);
        for k in 0..MIXED_MODES.len() {
            let i = (k + turn) % MIXED_MODES.len();
            set_mode(MODES[MIXED_MODES[i]].1)?;
            let cpu = cpu_secs();
            let t = Instant::now();
            sub = flat_out(a, "bench.flat", sub, n, &payload, limit).await?;
            let secs = t.elapsed().as_secs_f64();
            // Its spans exported now, on its own turn.
            tokio::task::block_in_place(crate::otlp::flush);
            out[i].messages += n;
            out[i].secs += secs;
            out[i].cpu_secs += cpu_secs() - cpu;
        }
    }
    Ok(())
}

/// Publish and call latencies (one in flight) of [`MIXED_MODES`], taking
/// turns every [`MIXED_BLOCK`] operations, each turn starting with the
/// next mode: per mode, sorted publish and call latencies.
async fn mixed(a: &Node, b: &Node, count: usize, out: &mut [Mixed]) -> anyhow::Result<()> {
    let limit = Duration::from_secs(30);
    let mut sub = b.subscribe("bench.mixed").await?;
    a.wait_for_subscribers("bench.mixed", Duration::from_secs(10))
        .await?;
    let reg = b
        .advertise("bench.mixed.echo", |r: macula::Request| async move {
            Ok::<_, macula::HandlerError>(r.payload)
        })
        .await?;
    a.call("bench.mixed.echo", Bytes::from_static(b"warm"))
        .await?;
    let payload = Bytes::from(vec![7u8; 64]);
    for turn in 0..count.div_ceil(MIXED_BLOCK) {
        let n = MIXED_BLOCK.min(count - turn * MIXED_BLOCK);
        for k in 0..MIXED_MODES.len() {
            let i = (k + turn) % MIXED_MODES.len();
            set_mode(MODES[MIXED_MODES[i]].1)?;
            for _ in 0..n {
                let t = Instant::now();
                a.publish("bench.mixed", payload.clone()).await?;
                match tokio::time::timeout(limit, sub.next()).await {
                    Ok(Some(SubscriptionItem::Event(_))) => out[i].publish.push(t.elapsed()),
                    other => anyhow::bail!("interleaved latency run: {other:?}"),
                }
                let t = Instant::now();
                a.call("bench.mixed.echo", Bytes::from_static(b"x")).await?;
                out[i].call.push(t.elapsed());
            }
        }
    }
    drop(reg);
    for m in out.iter_mut() {
        m.publish.sort_unstable();
        m.call.sort_unstable();
    }
    Ok(())
}

/// A table's head: the modes, then each other's ratio to the first.
fn table_head(modes: &[&str]) -> String {
    let mut head = format!("  {:<20}", "");
    for mode in modes {
        head.push_str(&format!(" {mode:>12}"));
    }
    for mode in modes.iter().skip(1) {
        head.push_str(&format!(" {:>9}", format!("{mode}/{}", modes[0])));
    }
    head
}

/// A table's row: figure `name` per mode, then each other's ratio to the
/// first.
fn table_row(name: &str, v: &[f64]) -> String {
    let mut line = format!("  {name:<20}");
    for x in v {
        if name.ends_with("_cpu_us") {
            line.push_str(&format!(" {x:>12.3}"));
        } else {
            line.push_str(&format!(" {x:>12.1}"));
        }
    }
    let off = v.first().copied().unwrap_or(0.0);
    for x in v.iter().skip(1) {
        line.push_str(&format!(" {:>9.3}", x / off));
    }
    line
}

/// Waits until the sink has received nothing new for 1.5 s (at most 60 s).
async fn quiesce(sink: &Sink) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut still) = (sink.bytes.load(Relaxed), 0);
    while still < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = sink.bytes.load(Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
}

struct Dirs(Vec<PathBuf>);

impl Drop for Dirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub async fn run(args: TracingArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=2_000_000).contains(&args.messages),
        "--messages must be 1..=2000000"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&args.latency_count),
        "--latency-count must be 1..=100000"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.calls),
        "--calls must be 1..=1000000"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.concurrency),
        "--concurrency must be 1..=1024"
    );
    anyhow::ensure!((1..=10).contains(&args.rounds), "--rounds must be 1..=10");
    anyhow::ensure!(
        args.mixed_count <= 200_000,
        "--mixed-count must be 0..=200000"
    );
    anyhow::ensure!(
        args.mixed_messages <= 2_000_000,
        "--mixed-messages must be 0..=2000000"
    );
    let mut chosen = Vec::new();
    for name in &args.modes {
        let m = MODES
            .iter()
            .position(|(mode, _)| mode == name)
            .with_context(|| format!("--modes: no mode {name:?} (off, 0%, 1%, 100%)"))?;
        anyhow::ensure!(!chosen.contains(&m), "--modes: {name} given twice");
        chosen.push(m);
    }
    anyhow::ensure!(!chosen.is_empty(), "--modes: none given");
    let mut dirs = Dirs(Vec::new());
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..2 {
        let dir =
            std::env::temp_dir().join(format!("macula-bench-tracing-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        dirs.0.push(dir.clone());
        Identity::load_or_create(&dir)?;
        let mut b = Node::builder()
            .realm("bench.tracing")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .data_dir(&dir);
        if let Some(first) = nodes.first() {
            b = b.bootstrap([format!("{}@{}", first.id(), first.local_addr()).as_str()]);
        }
        nodes.push(b.start().await?);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); MODES.len()];
    for r in 0..args.rounds {
        // Each round starts with the next mode (a mode's place in a round
        // must not weigh on its figures).
        for m in (0..chosen.len()).map(|k| chosen[(k + r) % chosen.len()]) {
            let (name, ratio) = MODES[m];
            eprintln!(
                "bench tracing: round {}/{} tracing {name}...",
                r + 1,
                args.rounds
            );
            set_mode(ratio)?;
            rounds[m].push(round(a, b, &args).await?);
        }
    }
    let mut mixed_out = vec![Mixed::default(); MIXED_MODES.len()];
    if args.mixed_messages > 0 {
        eprintln!(
            "bench tracing: interleaved throughput, {} per mode...",
            args.mixed_messages
        );
        mixed_flat(a, b, args.mixed_messages, &mut mixed_out).await?;
    }
    if args.mixed_count > 0 {
        eprintln!(
            "bench tracing: interleaved latency, {} per mode...",
            args.mixed_count
        );
        mixed(a, b, args.mixed_count, &mut mixed_out).await?;
    }
    let mixed = if args.mixed_messages > 0 || args.mixed_count > 0 {
        mixed_out
    } else {
        Vec::new()
    };
    macula::trace::disable();
    for n in nodes {
        n.shutdown().await;
    }
    let sink = SINK.get().context("no OTLP sink")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::json!({
            "benchmark": "tracing",
            "build": build_kind(),
            "modes": chosen.iter().map(|&m| MODES[m].0).collect::<Vec<_>>(),
            "otlp_requests": sink.requests.load(Relaxed),
            "otlp_bytes": sink.bytes.load(Relaxed),
        });
        for (name, f) in FIGURES {
            let mut o = serde_json::Map::new();
            for &m in &chosen {
                o.insert(
                    MODES[m].0.to_string(),
                    median(rounds[m].iter().map(f)).into(),
                );
            }
            v[name] = o.into();
        }
        for &m in &chosen {
            v["rounds"][MODES[m].0] = serde_json::to_value(&rounds[m])?;
        }
        for (i, m) in mixed.iter().enumerate() {
            let mode = MODES[MIXED_MODES[i]].0;
            let mut o = serde_json::Map::new();
            for (name, f) in MIXED_ROWS {
                o.insert(name.to_string(), f(m).into());
            }
            v["interleaved"][mode] = o.into();
        }
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "tracing benchmark: two nodes over QUIC on 127.0.0.1, spans exported to a local OTLP/HTTP sink, median of {} rounds{}",
            args.rounds,
            debug_note()
        )?;
        let names: Vec<&str> = chosen.iter().map(|&m| MODES[m].0).collect();
        writeln!(out, "{}", table_head(&names))?;
        for (name, f) in FIGURES {
            let v: Vec<f64> = chosen
                .iter()
                .map(|&m| median(rounds[m].iter().map(f)))
                .collect();
            writeln!(out, "{}", table_row(name, &v))?;
        }
        let mut line = "  OTLP bytes exported:".to_string();
        for &m in &chosen {
            let bytes: u64 = rounds[m].iter().map(|r| r.spans_exported_bytes).sum();
            line.push_str(&format!(" {} {bytes},", MODES[m].0));
        }
        writeln!(
            out,
            "{line} {} requests in all",
            sink.requests.load(Relaxed)
        )?;
        let mut line = "  spans dropped by the exporter:".to_string();
        for &m in &chosen {
            let n: u64 = rounds[m].iter().map(|r| r.spans_dropped).sum();
            line.push_str(&format!(" {} {n},", MODES[m].0));
        }
        writeln!(out, "{}", line.trim_end_matches(','))?;
        if !mixed.is_empty() {
            writeln!(
                out,
                "interleaved (off, 0% and 1% taking turns: {} messages flat out in turns of {MIXED_FLAT}, \
                 each turn's spans exported in it; {} one in flight in turns of {MIXED_BLOCK}):",
                args.mixed_messages, args.mixed_count
            )?;
            let names: Vec<&str> = MIXED_MODES.iter().map(|&m| MODES[m].0).collect();
            writeln!(out, "{}", table_head(&names))?;
            for (name, f) in MIXED_ROWS {
                let v: Vec<f64> = mixed.iter().map(f).collect();
                writeln!(out, "{}", table_row(name, &v))?;
            }
        }
    }
    Ok(())
}
