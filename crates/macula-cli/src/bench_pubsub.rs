//! `macula bench pubsub`: pub/sub between node *processes* on 127.0.0.1.
//!
//! The bench process is the publishing node. It starts every subscribing node
//! as a child process (`macula bench pubsub-node`, hidden) that joins through
//! it, subscribes to `<prefix>.**` and measures what arrives; so with no
//! arguments the benchmark needs nothing else, and it stops every child it
//! started on every exit path (children are killed when their handle drops,
//! on errors, on Ctrl-C/SIGTERM, and exit by themselves when their stdin
//! closes, which also happens if the bench process dies).
//!
//! Each measurement is a *phase* with topics `<prefix>.<phase>.data` (or
//! `.echo`) and a final `<prefix>.<phase>.end`, on which the child prints
//! one JSON report line on its stdout:
//!
//! - `ping`: one message in flight. The child echoes each message to
//!   `ack.<index>` and the publisher waits for the echo before the next.
//! - `rate`: the same latency at a paced rate (default 10,000 msgs/s).
//! - `t64`, `t1k`: throughput, publisher flat out, 64-byte and 1 KiB
//!   payloads: events delivered to the child's subscription per second, from
//!   the first publish to the last receive.
//! - `t16k`: the same with 16 KiB payloads (`--large-count` messages).
//! - `slow`: a subscriber process that reads at a tenth of the rate the
//!   `t64` phase delivered: the publisher (default `Overflow::Block`) must
//!   slow down to it and lose nothing; the child's peak memory shows that
//!   nothing grows without bound.
//! - fan-out: `t64` to N subscriber processes at once.
//!
//! Every throughput phase says whether it was lossless: delivered = sent, in
//! order, nothing lagged at the subscriber or dropped at the publisher.
//!
//! Latency is one-way, from the publish call to the event leaving the
//! subscriber's stream, both read from CLOCK_MONOTONIC (one clock for all
//! processes on the machine): the send time travels in the first 8 bytes of
//! the payload. The echo only paces the `ping` phase; it is not measured.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bench_stats::mono_ns;
use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use macula::{Node, SubscriptionItem};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::bench_stats::{build_kind, debug_note, latency, Latency};

/// Realm of the benchmark's nodes.
const REALM: &str = "bench.pubsub";
/// Upper bound on `--count` (messages per throughput run).
const MAX_COUNT: usize = 1_000_000;
/// Upper bound on `--latency-count`.
const MAX_LATENCY_COUNT: usize = 100_000;
/// Upper bound on `--rate`.
const MAX_RATE: u32 = 1_000_000;
/// Upper bound on `--fanout` (child processes at once).
const MAX_FANOUT: usize = 32;
/// Longest paced run `--latency-count / --rate` may ask for.
const MAX_PACED_RUN: Duration = Duration::from_secs(120);
/// Latency samples a child keeps per phase (8 bytes each); past this it
/// still counts events but samples no more.
const MAX_SAMPLES: usize = 1_000_000;
/// Echoed messages before the `ping` phase (connections, interest caches).
const WARMUP: usize = 200;
/// Messages of the fan-out warm-up.
const FANOUT_WARMUP: usize = 100;
/// A child must have joined and subscribed within this.
const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// One echo must come back within this.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// A phase's reports must arrive within this after its end marker.
const REPORT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the publisher waits for its outbound queues to drain before it
/// sends a phase's end marker.
const FLUSH_LIMIT: Duration = Duration::from_secs(60);
/// A child gets this long to leave the mesh after its stdin closes; then it
/// is killed.
const CHILD_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long dropping the children waits for killed ones to be reaped.
const CHILD_REAP_WAIT: Duration = Duration::from_secs(2);
/// Progress lines on stderr at most this often during a long phase.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The two payload sizes measured.
const SMALL: usize = 64;
const LARGE: usize = 1024;
const HUGE: usize = 16 * 1024;
/// Upper bound on `--large-count` (16 KiB messages per run).
const MAX_LARGE_COUNT: usize = 200_000;
/// The slow subscriber reads at this fraction of the flat-out rate.
const SLOW_FRACTION: f64 = 0.1;

#[derive(clap::Args, Debug)]
pub struct PubsubArgs {
    /// Messages per throughput run: 64 B, 1 KiB and fan-out (1..=1000000).
    #[arg(long, default_value_t = 500_000)]
    count: usize,
    /// Messages per latency run: one in flight, and paced (1..=100000).
    #[arg(long, default_value_t = 20_000)]
    latency_count: usize,
    /// Messages per second in the paced latency run (1..=1000000).
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// Subscriber processes in the fan-out run (0 skips it; at most 32).
    #[arg(long, default_value_t = 10)]
    fanout: usize,
    /// Messages of 16 KiB in their throughput run (0 skips it; at most
    /// 200000).
    #[arg(long, default_value_t = 50_000)]
    large_count: usize,
    /// Messages in the slow-subscriber run (0 skips it; at most 1000000).
    #[arg(long, default_value_t = 400_000)]
    slow_count: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The hidden child: one subscribing node for `macula bench pubsub`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The bench process's node (a QUIC address on 127.0.0.0/8).
    #[arg(long)]
    connect: SocketAddr,
    /// Subscribe to `<prefix>.**` (one topic segment).
    #[arg(long)]
    prefix: String,
    /// This child's number; echoes go to `ack.<index>`.
    #[arg(long)]
    index: usize,
    /// Read at most this many events per second (0: as fast as they come).
    #[arg(long, default_value_t = 0)]
    read_rate: u64,
}

/// A payload of `size` bytes (at least 8) carrying the send time.
fn stamped(size: usize) -> Bytes {
    let mut v = vec![0x5a; size.max(8)];
    v[..8].copy_from_slice(&mono_ns().to_le_bytes());
    Bytes::from(v)
}

/// Stamped payloads (see [`stamped`]) cut from one shared buffer, so a
/// flat-out publisher does not allocate per message: what an application
/// that cares about throughput does, and the benchmark should not measure
/// the allocator.
struct Stamper {
    buf: bytes::BytesMut,
}

impl Stamper {
    /// Bytes allocated at a time.
    const CHUNK: usize = 256 << 10;

    fn new() -> Self {
        Stamper {
            buf: bytes::BytesMut::new(),
        }
    }

    fn next(&mut self, size: usize) -> Bytes {
        let size = size.max(8);
        if self.buf.capacity() < size {
            self.buf = bytes::BytesMut::with_capacity(Self::CHUNK.max(size));
        }
        self.buf.extend_from_slice(&mono_ns().to_le_bytes());
        self.buf.resize(size, 0x5a);
        self.buf.split().freeze()
    }
}

fn sent_at(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
}

/// What a child measured in one phase.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Report {
    phase: String,
    index: usize,
    /// Events received.
    got: u64,
    /// Events the subscription reported lost (`Lagged`).
    lagged: u64,
    /// Events whose sequence number was not above the previous one (must
    /// be 0: per-publisher order).
    out_of_order: u64,
    /// When the last event arrived (CLOCK_MONOTONIC ns).
    last_recv_ns: u64,
    latency: Latency,
    /// The child process's peak resident memory so far (VmHWM, KiB).
    #[serde(default)]
    rss_peak_kib: u64,
}

/// One line a child prints on its stdout.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum ChildLine {
    Ready { index: usize, node_id: String },
    Report(Report),
}

/// This process's peak resident memory (VmHWM in /proc/self/status), KiB;
/// 0 where it cannot be read.
fn rss_peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn emit(line: &ChildLine) -> anyhow::Result<()> {
    let text = serde_json::to_string(line)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

// ---------------------------------------------------------------- child ---

/// `macula bench pubsub-node`: joins, subscribes, reports each phase, and
/// leaves when its stdin closes.
pub async fn node(args: NodeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.connect.ip().is_loopback(),
        "--connect must be a loopback address (benchmarks stay on 127.0.0.0/8)"
    );
    anyhow::ensure!(
        !args.prefix.contains('.') && macula::names::validate_topic(&args.prefix).is_ok(),
        "--prefix must be one topic segment"
    );
    let node = Node::builder()
        .realm(REALM)
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .bootstrap([args.connect.to_string()])
        .start()
        .await?;
    let result = serve(&node, &args).await;
    if tokio::time::timeout(CHILD_STOP_GRACE, node.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("bench subscriber did not shut down in time");
    }
    result
}

async fn serve(node: &Node, args: &NodeArgs) -> anyhow::Result<()> {
    tokio::time::timeout(CHILD_READY_TIMEOUT, node.dht().wait_bootstrapped())
        .await
        .context("could not join the bench node in time")??;
    let sub = node.subscribe(&format!("{}.**", args.prefix)).await?;
    emit(&ChildLine::Ready {
        index: args.index,
        node_id: node.id().to_string(),
    })?;
    // The bench process never writes to our stdin: it closes when it is done
    // with us, or when it dies. A plain thread, so exiting never waits on it.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    tokio::select! {
        r = consume(node, sub, args) => r,
        _ = closed_rx => Ok(()),
    }
}

/// One phase's running totals in a child.
#[derive(Default)]
struct Phase {
    name: String,
    got: u64,
    lagged: u64,
    out_of_order: u64,
    last_seq: u64,
    last_recv_ns: u64,
    samples: Vec<u64>,
}

async fn consume(
    node: &Node,
    mut sub: macula::Subscription,
    args: &NodeArgs,
) -> anyhow::Result<()> {
    let ack = format!("ack.{}", args.index);
    let mut phase = Phase::default();
    let paced_from = Instant::now();
    let mut taken = 0u64;
    while let Some(item) = sub.next().await {
        if args.read_rate > 0 {
            // A slow reader: no faster than `read_rate` events per second
            // (checked every 64 events; tokio's timer has 1 ms steps).
            taken += 1;
            if taken.is_multiple_of(64) {
                let due =
                    paced_from + Duration::from_secs_f64(taken as f64 / args.read_rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let e = match item {
            SubscriptionItem::Event(e) => e,
            SubscriptionItem::Lagged(n) => {
                phase.lagged += n;
                continue;
            }
        };
        let now = mono_ns();
        let Some((name, kind)) = e
            .topic
            .strip_prefix(args.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.split_once('.'))
        else {
            tracing::warn!(topic = %e.topic, "unexpected topic");
            continue;
        };
        if name != phase.name {
            phase = Phase {
                name: name.to_string(),
                lagged: phase.lagged,
                ..Phase::default()
            };
        }
        if kind == "end" {
            let report = Report {
                phase: phase.name.clone(),
                index: args.index,
                got: phase.got,
                lagged: phase.lagged,
                out_of_order: phase.out_of_order,
                last_recv_ns: phase.last_recv_ns,
                latency: latency(&mut phase.samples),
                rss_peak_kib: rss_peak_kib(),
            };
            emit(&ChildLine::Report(report))?;
            phase = Phase::default();
            continue;
        }
        phase.got += 1;
        phase.last_recv_ns = now;
        if e.seq <= phase.last_seq {
            phase.out_of_order += 1;
        }
        phase.last_seq = e.seq;
        if let Some(sent) = sent_at(&e.payload) {
            if phase.samples.len() < MAX_SAMPLES {
                phase.samples.push(now.saturating_sub(sent));
            }
        }
        if kind == "echo" {
            node.publish(&ack, e.payload.slice(..8.min(e.payload.len())))
                .await
                .context("echo failed")?;
        }
    }
    bail!("the subscription ended")
}

// --------------------------------------------------------------- parent ---

enum FromChild {
    Line(ChildLine),
    /// The child's stdout ended (it exited) or said something unreadable.
    Gone(usize, String),
}

/// Child processes of one group (same prefix). Dropping it kills them.
struct Children {
    prefix: String,
    procs: Vec<tokio::process::Child>,
    tx: mpsc::UnboundedSender<FromChild>,
    rx: mpsc::UnboundedReceiver<FromChild>,
}

impl Children {
    /// Starts `n` subscriber processes joining through `connect`, and waits
    /// until each has subscribed.
    async fn start(connect: SocketAddr, prefix: &str, n: usize) -> anyhow::Result<Children> {
        Self::start_reading(connect, prefix, n, 0).await
    }

    /// `start`, each child reading at most `read_rate` events per second
    /// (0: unlimited).
    async fn start_reading(
        connect: SocketAddr,
        prefix: &str,
        n: usize,
        read_rate: u64,
    ) -> anyhow::Result<Children> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut kids = Children {
            prefix: prefix.to_string(),
            procs: Vec::with_capacity(n),
            tx,
            rx,
        };
        let exe = std::env::current_exe().context("cannot find the macula executable")?;
        for index in 0..n {
            let mut child = tokio::process::Command::new(&exe)
                .args(["bench", "pubsub-node", "--connect"])
                .arg(connect.to_string())
                .args(["--prefix", prefix, "--index"])
                .arg(index.to_string())
                .arg("--read-rate")
                .arg(read_rate.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a subscriber process")?;
            let stdout = child
                .stdout
                .take()
                .context("subscriber process has no stdout")?;
            kids.procs.push(child);
            let tx = kids.tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                let gone = loop {
                    match lines.next_line().await {
                        Ok(Some(l)) => match serde_json::from_str::<ChildLine>(&l) {
                            Ok(m) => {
                                if tx.send(FromChild::Line(m)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => break format!("printed an unreadable line {l:?}: {e}"),
                        },
                        Ok(None) => break "exited".to_string(),
                        Err(e) => break format!("could not be read: {e}"),
                    }
                };
                let _ = tx.send(FromChild::Gone(index, gone));
            });
        }
        let until = tokio::time::Instant::now() + CHILD_READY_TIMEOUT;
        let mut ready = 0;
        while ready < n {
            match kids.next(until, "subscriber processes to join").await? {
                ChildLine::Ready { .. } => ready += 1,
                ChildLine::Report(r) => bail!("unexpected report before start: {r:?}"),
            }
        }
        Ok(kids)
    }

    async fn next(&mut self, until: tokio::time::Instant, what: &str) -> anyhow::Result<ChildLine> {
        match tokio::time::timeout_at(until, self.rx.recv()).await {
            Err(_) => bail!("timed out waiting for {what}"),
            Ok(None) => bail!("lost the subscriber processes' output"),
            Ok(Some(FromChild::Line(l))) => Ok(l),
            Ok(Some(FromChild::Gone(i, why))) => {
                bail!(
                    "subscriber process {}/{i} {why} while waiting for {what}",
                    self.prefix
                )
            }
        }
    }

    /// Every child's report for `phase`, by index.
    async fn reports(&mut self, phase: &str) -> anyhow::Result<Vec<Report>> {
        let until = tokio::time::Instant::now() + REPORT_TIMEOUT;
        let what = format!("the reports of phase {phase}");
        let mut out: Vec<Report> = Vec::with_capacity(self.procs.len());
        while out.len() < self.procs.len() {
            match self.next(until, &what).await? {
                ChildLine::Report(r) if r.phase == phase => out.push(r),
                other => bail!("unexpected line while waiting for {what}: {other:?}"),
            }
        }
        out.sort_by_key(|r| r.index);
        Ok(out)
    }

    /// Closes every child's stdin (they leave the mesh and exit), waits a
    /// bounded time, kills what is left.
    async fn stop(mut self) {
        for c in &mut self.procs {
            drop(c.stdin.take());
        }
        for c in &mut self.procs {
            if tokio::time::timeout(CHILD_STOP_GRACE, c.wait())
                .await
                .is_err()
            {
                tracing::warn!("a bench subscriber did not exit in time; killing it");
                let _ = c.kill().await;
            }
        }
    }
}

impl Drop for Children {
    /// Kills whatever is still running and reaps it (bounded), so no child
    /// outlives the benchmark on any exit path: errors, timeouts, Ctrl-C.
    fn drop(&mut self) {
        for c in &mut self.procs {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.start_kill();
            }
        }
        let deadline = Instant::now() + CHILD_REAP_WAIT;
        for c in &mut self.procs {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Outbound PUBLISH frames the publisher dropped so far (queue full or node
/// unreachable).
fn dropped_at_publisher(node: &Node) -> u64 {
    node.stats().dropped_outbound
}

/// Lets the publisher's outbound queues drain, then ends the phase.
async fn end_phase(publisher: &Node, prefix: &str, phase: &str) -> anyhow::Result<()> {
    if let Err(e) = publisher.flush(FLUSH_LIMIT).await {
        eprintln!("  warning: {e}");
    }
    publisher
        .publish(&format!("{prefix}.{phase}.end"), Bytes::new())
        .await?;
    Ok(())
}

fn per_sec(n: u64, from_ns: u64, to_ns: u64) -> f64 {
    let secs = to_ns.saturating_sub(from_ns) as f64 / 1e9;
    if n == 0 || secs <= 0.0 {
        0.0
    } else {
        n as f64 / secs
    }
}

/// A throughput run's figures for one subscriber.
#[derive(Debug, Clone, serde::Serialize)]
struct Delivered {
    index: usize,
    delivered: u64,
    delivered_per_sec: f64,
    lagged_at_subscriber: u64,
    out_of_order: u64,
    latency_under_load: Latency,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Throughput {
    payload_bytes: usize,
    messages: usize,
    subscribers: usize,
    published_per_sec: f64,
    /// Sum over subscribers, from the first publish to the last receive.
    delivered_per_sec: f64,
    delivered: u64,
    dropped_at_publisher: u64,
    /// Every subscriber got every message, in order; nothing lagged or
    /// dropped anywhere.
    lossless: bool,
    /// The subscriber processes' largest peak resident memory (KiB).
    subscriber_rss_peak_kib: u64,
    per_subscriber: Vec<Delivered>,
}

/// Publishes `n` stamped messages of `size` bytes flat out on `phase`, ends
/// the phase and collects every child's report.
async fn throughput(
    publisher: &Node,
    kids: &mut Children,
    phase: &str,
    n: usize,
    size: usize,
) -> anyhow::Result<Throughput> {
    let topic = format!("{}.{phase}.data", kids.prefix);
    let dropped_before = dropped_at_publisher(publisher);
    let t = Instant::now();
    let start_ns = mono_ns();
    let mut progress = Instant::now();
    let mut stamper = Stamper::new();
    for i in 0..n {
        publisher.publish(&topic, stamper.next(size)).await?;
        if i % 1024 == 0 && progress.elapsed() >= PROGRESS_EVERY {
            eprintln!("  published {i}/{n}");
            progress = Instant::now();
        }
    }
    let published_per_sec = n as f64 / t.elapsed().as_secs_f64();
    end_phase(publisher, &kids.prefix, phase).await?;
    let reports = kids.reports(phase).await?;
    let dropped = dropped_at_publisher(publisher) - dropped_before;
    let per_subscriber: Vec<Delivered> = reports
        .iter()
        .map(|r| Delivered {
            index: r.index,
            delivered: r.got,
            delivered_per_sec: per_sec(r.got, start_ns, r.last_recv_ns),
            lagged_at_subscriber: r.lagged,
            out_of_order: r.out_of_order,
            latency_under_load: r.latency,
        })
        .collect();
    let delivered: u64 = reports.iter().map(|r| r.got).sum();
    let last = reports.iter().map(|r| r.last_recv_ns).max().unwrap_or(0);
    let lossless = dropped == 0
        && reports
            .iter()
            .all(|r| r.got == n as u64 && r.lagged == 0 && r.out_of_order == 0);
    Ok(Throughput {
        lossless,
        subscriber_rss_peak_kib: reports.iter().map(|r| r.rss_peak_kib).max().unwrap_or(0),
        payload_bytes: size,
        messages: n,
        subscribers: reports.len(),
        published_per_sec,
        delivered_per_sec: per_sec(delivered, start_ns, last),
        delivered,
        dropped_at_publisher: dropped,
        per_subscriber,
    })
}

/// Waits for the next echo on `acks`.
async fn echo(acks: &mut macula::Subscription) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(ECHO_TIMEOUT, acks.next()).await {
            Ok(Some(SubscriptionItem::Event(_))) => return Ok(()),
            Ok(Some(SubscriptionItem::Lagged(_))) => continue,
            Ok(None) => bail!("the echo subscription ended"),
            Err(_) => bail!("no echo within {ECHO_TIMEOUT:?}"),
        }
    }
}

/// Sends `n` messages on `phase`, one in flight: each waits for its echo.
/// Returns the round-trip times (for reference; the child measures the
/// one-way latency).
async fn one_in_flight(
    publisher: &Node,
    acks: &mut macula::Subscription,
    phase: &str,
    n: usize,
) -> anyhow::Result<Vec<u64>> {
    let topic = format!("pair.{phase}.echo");
    let mut rtt = Vec::with_capacity(n);
    let mut progress = Instant::now();
    for i in 0..n {
        let t = mono_ns();
        publisher.publish(&topic, stamped(SMALL)).await?;
        echo(acks).await?;
        rtt.push(mono_ns().saturating_sub(t));
        if progress.elapsed() >= PROGRESS_EVERY {
            eprintln!("  {i}/{n}");
            progress = Instant::now();
        }
    }
    end_phase(publisher, "pair", phase).await?;
    Ok(rtt)
}

/// Publishes `n` messages at `rate` per second from a thread of its own
/// (tokio's timers have a 1 ms granularity; a thread's sleep is finer).
/// Each carries its actual send time. Returns the achieved rate.
async fn paced(publisher: &Node, phase: &str, n: usize, rate: u32) -> anyhow::Result<f64> {
    /// Tells the publishing thread to stop if this future is dropped.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let stopped = stop.0.clone();
    let node = publisher.clone();
    let handle = tokio::runtime::Handle::current();
    let topic = format!("pair.{phase}.data");
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> anyhow::Result<f64> {
            let start = Instant::now();
            let mut progress = Instant::now();
            for i in 0..n {
                if stopped.load(Relaxed) {
                    bail!("stopped");
                }
                let due = start + Duration::from_nanos(i as u64 * 1_000_000_000 / u64::from(rate));
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                handle.block_on(node.publish(&topic, stamped(SMALL)))?;
                if progress.elapsed() >= PROGRESS_EVERY {
                    eprintln!("  {i}/{n}");
                    progress = Instant::now();
                }
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        };
        let _ = done_tx.send(run());
    });
    let achieved = done_rx.await.context("the paced publisher thread died")??;
    drop(stop);
    end_phase(publisher, "pair", phase).await?;
    Ok(achieved)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub async fn run(args: PubsubArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_COUNT).contains(&args.count),
        "--count must be between 1 and {MAX_COUNT}"
    );
    anyhow::ensure!(
        (1..=MAX_LATENCY_COUNT).contains(&args.latency_count),
        "--latency-count must be between 1 and {MAX_LATENCY_COUNT}"
    );
    anyhow::ensure!(
        (1..=MAX_RATE).contains(&args.rate),
        "--rate must be between 1 and {MAX_RATE}"
    );
    anyhow::ensure!(
        Duration::from_secs_f64(args.latency_count as f64 / f64::from(args.rate)) <= MAX_PACED_RUN,
        "--latency-count / --rate must be at most {} s",
        MAX_PACED_RUN.as_secs()
    );
    anyhow::ensure!(
        args.fanout <= MAX_FANOUT,
        "--fanout must be at most {MAX_FANOUT}"
    );
    anyhow::ensure!(
        args.large_count <= MAX_LARGE_COUNT,
        "--large-count must be at most {MAX_LARGE_COUNT}"
    );
    anyhow::ensure!(
        args.slow_count <= MAX_COUNT,
        "--slow-count must be at most {MAX_COUNT}"
    );
    let load_before = loadavg();
    let publisher = Node::builder()
        .realm(REALM)
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .start()
        .await?;
    let result = measure(&publisher, &args).await;
    publisher.shutdown().await;
    let m = result?;
    print(&args, &m, &load_before)
}

struct Measured {
    rtt: Latency,
    ping: Report,
    paced: Report,
    achieved_rate: f64,
    t64: Throughput,
    t1k: Throughput,
    t16k: Option<Throughput>,
    /// The slow-subscriber run and the rate its subscriber read at.
    slow: Option<(Throughput, u64)>,
    fanout: Option<Throughput>,
}

async fn measure(publisher: &Node, args: &PubsubArgs) -> anyhow::Result<Measured> {
    let addr = publisher.local_addr();
    eprintln!("bench pubsub: starting a subscriber node process...");
    let mut pair = Children::start(addr, "pair", 1).await?;
    let mut acks = publisher.subscribe("ack.*").await?;

    eprintln!("bench pubsub: warm-up, {WARMUP} echoed messages...");
    one_in_flight(publisher, &mut acks, "warm", WARMUP).await?;
    pair.reports("warm").await?;

    let n = args.latency_count;
    eprintln!("bench pubsub: latency, {n} messages one in flight...");
    let mut rtt = one_in_flight(publisher, &mut acks, "ping", n).await?;
    let ping = pair.reports("ping").await?.remove(0);
    drop(acks);

    eprintln!(
        "bench pubsub: latency, {n} messages at {} msgs/s...",
        args.rate
    );
    let achieved_rate = paced(publisher, "rate", n, args.rate).await?;
    let paced = pair.reports("rate").await?.remove(0);

    eprintln!(
        "bench pubsub: throughput, {} messages of {SMALL} B...",
        args.count
    );
    let t64 = throughput(publisher, &mut pair, "t64", args.count, SMALL).await?;
    eprintln!(
        "bench pubsub: throughput, {} messages of {LARGE} B...",
        args.count
    );
    let t1k = throughput(publisher, &mut pair, "t1k", args.count, LARGE).await?;
    let t16k = if args.large_count > 0 {
        eprintln!(
            "bench pubsub: throughput, {} messages of {HUGE} B...",
            args.large_count
        );
        Some(throughput(publisher, &mut pair, "t16k", args.large_count, HUGE).await?)
    } else {
        None
    };
    pair.stop().await;

    let slow = if args.slow_count > 0 {
        let read_rate = ((t64.delivered_per_sec * SLOW_FRACTION) as u64).max(1_000);
        eprintln!(
            "bench pubsub: slow subscriber, {} messages of {SMALL} B to a process reading {read_rate} msgs/s...",
            args.slow_count
        );
        let mut slow = Children::start_reading(addr, "slow", 1, read_rate).await?;
        let t = throughput(publisher, &mut slow, "t64", args.slow_count, SMALL).await?;
        slow.stop().await;
        Some((t, read_rate))
    } else {
        None
    };

    let fanout = if args.fanout > 0 {
        eprintln!(
            "bench pubsub: fan-out, starting {} subscriber node processes...",
            args.fanout
        );
        let mut fan = Children::start(addr, "fan", args.fanout).await?;
        let topic = "fan.warm.data";
        for _ in 0..FANOUT_WARMUP {
            publisher.publish(topic, stamped(SMALL)).await?;
        }
        end_phase(publisher, "fan", "warm").await?;
        fan.reports("warm").await?;
        eprintln!(
            "bench pubsub: fan-out, {} messages of {SMALL} B to {} subscribers...",
            args.count, args.fanout
        );
        let t = throughput(publisher, &mut fan, "t64", args.count, SMALL).await?;
        fan.stop().await;
        Some(t)
    } else {
        None
    };
    Ok(Measured {
        rtt: latency(&mut rtt),
        ping,
        paced,
        achieved_rate,
        t64,
        t1k,
        t16k,
        slow,
        fanout,
    })
}

fn print(args: &PubsubArgs, m: &Measured, load: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let first = |t: &Throughput| t.per_subscriber.first().cloned();
    if args.json {
        let fanout = m.fanout.as_ref().map(|f| {
            let rates: Vec<f64> = f
                .per_subscriber
                .iter()
                .map(|d| d.delivered_per_sec)
                .collect();
            let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
            serde_json::json!({
                "subscribers": f.subscribers,
                "messages": f.messages,
                "payload_bytes": f.payload_bytes,
                "published_per_sec": f.published_per_sec,
                "total_delivered_per_sec": f.delivered_per_sec,
                "min_per_subscriber_per_sec": if rates.is_empty() { 0.0 } else { min },
                "mean_per_subscriber_per_sec": mean,
                "delivered": f.delivered,
                "dropped_at_publisher": f.dropped_at_publisher,
                "lossless": f.lossless,
                "subscriber_rss_peak_kib": f.subscriber_rss_peak_kib,
                "per_subscriber": f.per_subscriber,
            })
        });
        let lossless = [
            Some(&m.t64),
            Some(&m.t1k),
            m.t16k.as_ref(),
            m.slow.as_ref().map(|s| &s.0),
            m.fanout.as_ref(),
        ]
        .into_iter()
        .flatten()
        .all(|t| t.lossless);
        let v = serde_json::json!({
            "bench": "pubsub",
            "build": build_kind(),
            "processes": 2,
            "loadavg_at_start": load,
            "msgs_per_sec": m.t64.delivered_per_sec,
            "p50_us": m.paced.latency.p50_us,
            "p99_us": m.paced.latency.p99_us,
            "p999_us": m.paced.latency.p999_us,
            "latency_basis": format!(
                "one-way publish to receive in another process, {SMALL}-byte payloads, paced at {} msgs/s",
                args.rate
            ),
            "throughput_64": m.t64,
            "throughput_1k": m.t1k,
            "throughput_16k": m.t16k,
            "slow_subscriber": m.slow.as_ref().map(|(t, rate)| serde_json::json!({
                "read_rate": rate,
                "run": t,
            })),
            "lossless": lossless,
            "latency_one_in_flight": {
                "messages": args.latency_count,
                "one_way": m.ping.latency,
                "round_trip": m.rtt,
                "out_of_order": m.ping.out_of_order,
            },
            "latency_paced": {
                "messages": args.latency_count,
                "rate": args.rate,
                "achieved_rate": m.achieved_rate,
                "one_way": m.paced.latency,
                "delivered": m.paced.got,
                "lagged_at_subscriber": m.paced.lagged,
                "out_of_order": m.paced.out_of_order,
            },
            "fanout": fanout,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let build = debug_note();
    writeln!(
        out,
        "pub/sub benchmark: node processes over QUIC on 127.0.0.1 (load average at start: {load}){build}"
    )?;
    let lat = |l: &Latency| {
        format!(
            "p50 {:>8.1} us   p99 {:>8.1} us   p99.9 {:>8.1} us",
            l.p50_us, l.p99_us, l.p999_us
        )
    };
    writeln!(
        out,
        "  latency, one in flight ({SMALL} B)      {}   ({} messages; round trip p50 {:.1} us)",
        lat(&m.ping.latency),
        args.latency_count,
        m.rtt.p50_us
    )?;
    writeln!(
        out,
        "  latency at {:>7} msgs/s ({SMALL} B)   {}   (achieved {:.0} msgs/s)",
        args.rate,
        lat(&m.paced.latency),
        m.achieved_rate
    )?;
    let verdict = |t: &Throughput| if t.lossless { "lossless" } else { "LOSSY" };
    for t in [Some(&m.t64), Some(&m.t1k), m.t16k.as_ref()]
        .into_iter()
        .flatten()
    {
        let d = first(t);
        writeln!(
            out,
            "  throughput, {:>5} B payloads   {:>10.0} delivered/s ({:.1} MB/s)   {:>10.0} published/s   {}: delivered {} of {}, {} lagged at the subscriber, {} dropped at the publisher",
            t.payload_bytes,
            t.delivered_per_sec,
            t.delivered_per_sec * t.payload_bytes as f64 / 1e6,
            t.published_per_sec,
            verdict(t),
            t.delivered,
            t.messages,
            d.map_or(0, |d| d.lagged_at_subscriber),
            t.dropped_at_publisher
        )?;
    }
    if let Some((t, rate)) = &m.slow {
        let d = first(t);
        writeln!(
            out,
            "  slow subscriber reading {rate} msgs/s ({SMALL} B)   {:>10.0} delivered/s   {:>10.0} published/s   {}: delivered {} of {}, {} lagged, {} dropped; subscriber peak RSS {:.1} MiB",
            t.delivered_per_sec,
            t.published_per_sec,
            verdict(t),
            t.delivered,
            t.messages,
            d.map_or(0, |d| d.lagged_at_subscriber),
            t.dropped_at_publisher,
            t.subscriber_rss_peak_kib as f64 / 1024.0
        )?;
    }
    if let Some(f) = &m.fanout {
        let rates: Vec<f64> = f
            .per_subscriber
            .iter()
            .map(|d| d.delivered_per_sec)
            .collect();
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
        writeln!(
            out,
            "  fan-out to {} subscriber processes ({SMALL} B)   {:>10.0} delivered/s in total   per subscriber min {min:.0} / mean {mean:.0} / max {max:.0}   {}: {} dropped at the publisher",
            f.subscribers, f.delivered_per_sec, verdict(f), f.dropped_at_publisher
        )?;
    }
    Ok(())
}
