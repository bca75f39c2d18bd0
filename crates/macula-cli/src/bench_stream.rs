//! `macula bench stream`: durable streams against NATS JetStream (Debian's
//! `nats-server -js`, file storage) on the same machine, in one run:
//! acknowledged publish throughput (async: `--window` publishes in flight)
//! at 64 B and 1 KiB, acknowledged publish latency with one in flight,
//! replay throughput of `--replay` stored messages, restart time with
//! them stored, and a work queue emptied by one consumer acknowledging each
//! of `--msgs` stored messages (64 B) on its own. With `--replicas 3` both run three servers: three Macula
//! nodes in this process with a replicated stream (one Raft group; the
//! bench publishes and reads on the leader), and a three-server
//! `nats-server -js` cluster with `num_replicas: 3` (the client connected to
//! the first server); restart is the whole cluster's, until the stream
//! answers with everything stored.
//!
//! Macula runs in this process (a node with a data directory in a temp
//! dir; the application API `node.streams()`, the path an embedding
//! application takes); JetStream runs as a `nats-server -js` child on
//! 127.0.0.1 and is driven by a minimal NATS protocol client here (`PUB`
//! with a reply inbox, JetStream's JSON API for stream and consumer, pull
//! batches), so its figures include a loopback TCP hop ours do not.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use macula::stream::{
    AckKind, AckPolicy, ConsumerConfig, PersistOptions, Retention, StreamConfig, StreamHandle,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::bench_stats::{build_kind, latency, Latency};

#[derive(clap::Args, Debug)]
pub struct StreamArgs {
    /// Messages per throughput run (1..=10000000).
    #[arg(long, default_value_t = 100_000)]
    msgs: usize,
    /// Acknowledged publishes in flight in the throughput runs.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Sequential publishes for the latency run.
    #[arg(long, default_value_t = 2_000)]
    latency_count: usize,
    /// Stored messages (64 B) for the replay and restart runs.
    #[arg(long, default_value_t = 1_000_000)]
    replay: usize,
    /// The nats-server binary (JetStream is skipped, and said so, when it
    /// cannot be run).
    #[arg(long, default_value = "nats-server")]
    nats_server: String,
    /// Only Macula.
    #[arg(long)]
    no_nats: bool,
    /// Replicas of every stream: 1 (one server each) or 3 (three each).
    #[arg(long, default_value_t = 1)]
    replicas: u8,
    /// Macula's runs, one per stream sync setting (`sync_interval`; of the
    /// store with R1, of the Raft log with R3): always (synced before each
    /// acknowledgement) and/or a DURATION (acknowledged once written,
    /// synced at least that often: JetStream 2.9's file store and Raft log
    /// sync every 2m).
    #[arg(
        long,
        value_name = "always|DURATION",
        value_delimiter = ',',
        default_value = "always,2m"
    )]
    sync: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Time the phases of each replicated publish of the latency run
    /// (proposer, openraft, log writes, AppendEntries, apply, answer) and
    /// print their p50/p90 since the publish started (R3 only; the probes
    /// cost a clock read and a lock per phase while on).
    #[arg(long)]
    phases: bool,
}

/// One phase of the latency run's publishes (`--phases`): microseconds
/// since the publish started.
#[derive(Debug, Default, serde::Serialize)]
struct PhaseRow {
    phase: &'static str,
    count: usize,
    p50_us: u32,
    p90_us: u32,
}

#[derive(Debug, Default, serde::Serialize)]
struct Side {
    target: String,
    publish_64_per_s: f64,
    publish_1k_per_s: f64,
    publish_latency_64: Option<Latency>,
    /// `--phases`: where the latency run's publishes spent their time.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    phases: Vec<PhaseRow>,
    replay_per_s: f64,
    replayed: usize,
    /// Of the replay: until its first batch (Macula: a read waits for the
    /// commit of the messages it reads).
    replay_first_batch_ms: f64,
    restart_ms: f64,
    /// Messages of a work queue stream pulled and acknowledged one by one
    /// per second, until the acknowledgements removed them all.
    work_acked_per_s: f64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    benchmark: &'static str,
    build: &'static str,
    replicas: u8,
    msgs: usize,
    window: usize,
    replay: usize,
    sides: Vec<Side>,
}

pub async fn run(a: StreamArgs) -> anyhow::Result<()> {
    if !(1..=10_000_000).contains(&a.msgs) || !(1..=10_000_000).contains(&a.replay) {
        bail!("--msgs and --replay must be 1..=10000000");
    }
    if !(1..=65_536).contains(&a.window) {
        bail!("--window must be 1..=65536");
    }
    if !matches!(a.replicas, 1 | 3) {
        bail!("--replicas must be 1 or 3");
    }
    let mut syncs = Vec::new();
    for w in &a.sync {
        syncs.push(match w.as_str() {
            "always" => None,
            d => Some(macula::stream::Millis::from_duration(
                crate::config::parse_duration(d)
                    .map_err(|e| anyhow::anyhow!("--sync {d:?}: {e}"))?,
            )),
        });
    }
    let mut sides = Vec::new();
    for sync in syncs {
        sides.push(macula_side(&a, sync).await?);
    }
    if !a.no_nats {
        match nats_side(&a).await {
            Ok(s) => sides.push(s),
            Err(e) => eprintln!("JetStream skipped: {e:#}"),
        }
    }
    let report = Report {
        benchmark: "stream",
        build: build_kind(),
        replicas: a.replicas,
        msgs: a.msgs,
        window: a.window,
        replay: a.replay,
        sides,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "durable streams ({} build), R{}, {} msgs per throughput run, {} in flight, {} stored for replay/restart",
        report.build, report.replicas, report.msgs, report.window, report.replay
    );
    println!(
        "{:<20} {:>12} {:>12} {:>8} {:>8} {:>13} {:>11} {:>11}",
        "target",
        "pub 64B/s",
        "pub 1KiB/s",
        "p50 us",
        "p99 us",
        "replay msg/s",
        "restart ms",
        "work ack/s"
    );
    for s in &report.sides {
        let (p50, p99) = s
            .publish_latency_64
            .as_ref()
            .map_or((0.0, 0.0), |l| (l.p50_us, l.p99_us));
        println!(
            "{:<20} {:>12.0} {:>12.0} {:>8.0} {:>8.0} {:>13.0} {:>11.1} {:>11.0}",
            s.target,
            s.publish_64_per_s,
            s.publish_1k_per_s,
            p50,
            p99,
            s.replay_per_s,
            s.restart_ms,
            s.work_acked_per_s
        );
    }
    for s in report.sides.iter().filter(|s| !s.phases.is_empty()) {
        println!(
            "{}: one-in-flight publish, time since it started (us; step = p50 minus the previous p50)",
            s.target
        );
        println!(
            "  {:<28} {:>7} {:>8} {:>8} {:>8}",
            "phase", "count", "p50", "step", "p90"
        );
        let mut prev = 0u32;
        for p in &s.phases {
            println!(
                "  {:<28} {:>7} {:>8} {:>8} {:>8}",
                p.phase,
                p.count,
                p.p50_us,
                i64::from(p.p50_us) - i64::from(prev),
                p.p90_us
            );
            if p.count > 0 {
                prev = p.p50_us;
            }
        }
    }
    let Some(n) = report
        .sides
        .iter()
        .find(|s| s.target.starts_with("jetstream"))
    else {
        return Ok(());
    };
    for m in report
        .sides
        .iter()
        .filter(|s| !s.target.starts_with("jetstream"))
    {
        println!(
            "ratio {}/{}: pub 64B {:.2}, pub 1KiB {:.2}, p50 latency {:.2} (lower is better), replay {:.2}, restart {:.2} (lower is better), work ack {:.2}",
            m.target,
            n.target,
            m.publish_64_per_s / n.publish_64_per_s,
            m.publish_1k_per_s / n.publish_1k_per_s,
            m.publish_latency_64.as_ref().map_or(0.0, |l| l.p50_us)
                / n.publish_latency_64.as_ref().map_or(1.0, |l| l.p50_us),
            m.replay_per_s / n.replay_per_s,
            m.restart_ms / n.restart_ms,
            m.work_acked_per_s / n.work_acked_per_s,
        );
    }
    Ok(())
}

async fn start_node(dir: &Path, boot: Option<String>) -> anyhow::Result<macula::Node> {
    let mut b = macula::Node::builder()
        .listen("127.0.0.1:0".parse()?)
        .data_dir(dir);
    if let Some(addr) = boot {
        b = b.bootstrap([addr]);
    }
    Ok(b.start().await?)
}

/// One node, or three in this process (the others bootstrapped through
/// the first, which sees both before the bench goes on).
struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    nodes: Vec<macula::Node>,
    replicas: u8,
    sync_interval: Option<macula::stream::Millis>,
}

impl Cluster {
    async fn start(
        replicas: u8,
        sync_interval: Option<macula::stream::Millis>,
    ) -> anyhow::Result<Cluster> {
        let dirs: Vec<tempfile::TempDir> = (0..replicas)
            .map(|_| tempfile::tempdir())
            .collect::<Result<_, _>>()?;
        let mut c = Cluster {
            dirs,
            nodes: Vec::new(),
            replicas,
            sync_interval,
        };
        c.boot().await?;
        Ok(c)
    }

    async fn boot(&mut self) -> anyhow::Result<()> {
        self.nodes.clear();
        for (i, d) in self.dirs.iter().enumerate() {
            let boot = (i > 0).then(|| self.nodes[0].local_addr().to_string());
            self.nodes.push(start_node(d.path(), boot).await?);
        }
        let want = self.nodes.len() - 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.nodes[0].peers().len() < want {
            if Instant::now() > deadline {
                bail!("the bench's nodes did not connect");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn shutdown(&mut self) {
        for n in self.nodes.drain(..) {
            n.shutdown().await;
        }
    }

    /// Adds stream `name` (on the first node) and returns it as the node
    /// that serves it (the leader of a replicated one) sees it.
    async fn add(&self, name: &str) -> anyhow::Result<StreamHandle> {
        self.add_with(name, Retention::Limits).await
    }

    /// [`Cluster::add`] with `retention`.
    async fn add_with(&self, name: &str, retention: Retention) -> anyhow::Result<StreamHandle> {
        let cfg = StreamConfig {
            replicas: self.replicas,
            sync_interval: self.sync_interval,
            retention,
            ..StreamConfig::new(name, &[&format!("{name}.**")])
        };
        self.nodes[0].streams().add(cfg).await?;
        self.serving(name).await
    }

    /// Stream `name` on the node that serves it, waiting for one (a
    /// handle on that node: if leadership moves, its operations go to the
    /// new leader).
    async fn serving(&self, name: &str) -> anyhow::Result<StreamHandle> {
        if self.replicas == 1 {
            return Ok(self.nodes[0].stream(name, Duration::from_secs(30)));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(n) = self
                .nodes
                .iter()
                .find(|n| n.streams().replica_status(name).is_some_and(|r| r.serving))
            {
                return Ok(n.stream(name, Duration::from_secs(30)));
            }
            if Instant::now() > deadline {
                bail!("no node serves stream {name}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Times one publish is asked again while a replicated stream's
/// leadership moves ([`publish_acked`]).
const PUBLISH_RETRIES: u32 = 100;

/// One acknowledged publish. Under load a replicated stream's leadership
/// can move in the middle of a run (heartbeats time out); a publish
/// refused meanwhile (`not_leader`, `replication`, `unreachable`) is asked
/// again after 20 ms with the same message ID, so the stream stores it
/// once, at most [`PUBLISH_RETRIES`] times. Without an ID (one node) a
/// refusal ends the run. Counts the retries in `retried`.
async fn publish_acked(
    s: &StreamHandle,
    topic: &str,
    payload: Bytes,
    id: Option<String>,
    retried: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        let opts = PersistOptions {
            msg_id: id.clone(),
            ..PersistOptions::new()
        };
        match s.publish(topic, payload.clone(), opts).await {
            Ok(_) => return Ok(()),
            Err(e)
                if id.is_some()
                    && tries < PUBLISH_RETRIES
                    && matches!(e.kind(), "not_leader" | "replication" | "unreachable") =>
            {
                tries += 1;
                retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A publish's message ID in a run on a replicated stream (see
/// [`publish_acked`]); none on one node.
fn run_msg_id(cluster: &Cluster, stream: &str, i: usize) -> Option<String> {
    (cluster.replicas > 1).then(|| format!("{stream}-{i}"))
}

async fn macula_publish(
    cluster: &Cluster,
    stream: &str,
    n: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let s = cluster.add(stream).await?;
    macula_fill(cluster, &s, stream, n, size, window).await
}

/// Publishes `n` messages of `size` bytes on stream `s` (named `stream`),
/// `window` in flight; acknowledged publishes per second.
async fn macula_fill(
    cluster: &Cluster,
    s: &StreamHandle,
    stream: &str,
    n: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let payload = Bytes::from(vec![b'x'; size]);
    let topic = format!("{stream}.x");
    let retried = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    let mut acks = futures::stream::iter(0..n)
        .map(|i| {
            let id = run_msg_id(cluster, stream, i);
            publish_acked(s, &topic, payload.clone(), id, &retried)
        })
        .buffer_unordered(window);
    let mut done = 0usize;
    while let Some(r) = acks.next().await {
        r?;
        done += 1;
    }
    let per_s = done as f64 / started.elapsed().as_secs_f64();
    drop(acks);
    let retried = retried.into_inner();
    if retried > 0 {
        eprintln!("macula stream {stream}: {retried} publishes asked again while leadership moved");
    }
    // How often the store's bounded writer queue held the publishers.
    if let Ok(i) = s.info().await {
        let k = i.counters;
        if k.write_queue_waits > 0 || k.write_queue_refused > 0 {
            eprintln!(
                "macula stream {stream}: {} publishes waited for room in the store's write queue, {} refused",
                k.write_queue_waits, k.write_queue_refused
            );
        }
    }
    Ok(per_s)
}

/// Messages a work queue consumer pulls at a time (both sides; also its
/// `max_ack_pending`, JetStream's default and ours).
const WORK_PULL: usize = 1_000;

/// A work queue stream holding `n` messages of 64 B, emptied by one
/// consumer that pulls [`WORK_PULL`] at a time and acknowledges each on its
/// own (`window` acknowledgements in flight): acknowledged messages per
/// second, until the stream holds none.
async fn macula_workqueue(cluster: &Cluster, n: usize, window: usize) -> anyhow::Result<f64> {
    let s = cluster.add_with("work", Retention::Workqueue).await?;
    macula_fill(cluster, &s, "work", n, 64, window).await?;
    let c = s
        .add_consumer(ConsumerConfig {
            ack: AckPolicy::Explicit,
            max_ack_pending: WORK_PULL as u32,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut acked = 0usize;
    while acked < n {
        let batch = s
            .next(&c, WORK_PULL.min(n - acked), None, Duration::from_secs(5))
            .await?;
        if batch.is_empty() {
            bail!("macula work queue: no message after {acked} of {n}");
        }
        let (s, c) = (&s, &c);
        let mut acks = futures::stream::iter(batch)
            .map(|m| async move { s.ack(c, m.seq, AckKind::Ack).await })
            .buffer_unordered(window);
        while let Some(r) = acks.next().await {
            r?;
            acked += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = s.info().await?.messages;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("macula work queue: {left} messages left 30 s after the last ack");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let per_s = acked as f64 / started.elapsed().as_secs_f64();
    // Removed, so that its group (a log of `n` acks) does nothing beside
    // the runs after it.
    cluster.nodes[0].streams().delete("work").await?;
    Ok(per_s)
}

async fn macula_side(
    a: &StreamArgs,
    sync_interval: Option<macula::stream::Millis>,
) -> anyhow::Result<Side> {
    let mut cluster = Cluster::start(a.replicas, sync_interval).await?;
    let mut side = Side {
        target: match (a.replicas, sync_interval) {
            (1, None) => "macula".into(),
            (1, Some(d)) => format!("macula/{}ms", d.0),
            (r, None) => format!("macula-r{r}"),
            (r, Some(d)) => format!("macula-r{r}/{}ms", d.0),
        },
        ..Default::default()
    };
    side.publish_64_per_s = macula_publish(&cluster, "t64", a.msgs, 64, a.window).await?;
    side.publish_1k_per_s = macula_publish(&cluster, "t1k", a.msgs, 1024, a.window).await?;
    side.work_acked_per_s = macula_workqueue(&cluster, a.msgs, a.window).await?;
    let s = cluster.add("lat").await?;
    let mut ns = Vec::with_capacity(a.latency_count);
    let payload = Bytes::from(vec![b'x'; 64]);
    let retried = std::sync::atomic::AtomicU64::new(0);
    let phases = a.phases && a.replicas > 1;
    if phases {
        macula::stream::Streams::phase_timing(true);
    }
    for i in 0..a.latency_count {
        let id = run_msg_id(&cluster, "lat", i);
        let t = Instant::now();
        publish_acked(&s, "lat.x", payload.clone(), id, &retried).await?;
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    if phases {
        macula::stream::Streams::phase_timing(false);
        side.phases = macula::stream::Streams::phase_report()
            .into_iter()
            .map(|(phase, count, p50_us, p90_us)| PhaseRow {
                phase,
                count,
                p50_us,
                p90_us,
            })
            .collect();
    }
    let retried = retried.into_inner();
    if retried > 0 {
        eprintln!("macula stream lat: {retried} publishes asked again while leadership moved (their latency includes it)");
    }
    side.publish_latency_64 = Some(latency(&mut ns));
    // A handle holds its node (and so the stores' files) open: none may
    // outlive the shutdown before the restart.
    drop(s);
    // Replay: fill, then read everything through one consumer.
    macula_publish(&cluster, "replay", a.replay, 64, a.window).await?;
    let s = cluster.serving("replay").await?;
    let c = s
        .add_consumer(ConsumerConfig {
            ack: AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut got = 0usize;
    while got < a.replay {
        let batch = s.next(&c, 10_000, None, Duration::from_secs(5)).await?;
        if batch.is_empty() {
            bail!("macula replay stopped at {got} of {}", a.replay);
        }
        if got == 0 {
            side.replay_first_batch_ms = started.elapsed().as_secs_f64() * 1e3;
        }
        got += batch.len();
    }
    side.replay_per_s = got as f64 / started.elapsed().as_secs_f64();
    side.replayed = got;
    eprintln!(
        "{}: first replay batch after {:.1} ms",
        side.target, side.replay_first_batch_ms
    );
    drop(s);
    cluster.shutdown().await;
    // Restart with everything stored: until a node serves the stream.
    let started = Instant::now();
    cluster.boot().await?;
    // Leadership may still move right after the first election (a loaded
    // machine): until a serving node answers, within a bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        match cluster.serving("replay").await?.info().await {
            Ok(info) => break info,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{}: restart: {e}; asking again", side.target);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    side.restart_ms = started.elapsed().as_secs_f64() * 1e3;
    if info.messages as usize != a.replay {
        bail!(
            "after restart the stream holds {} of {}",
            info.messages,
            a.replay
        );
    }
    cluster.shutdown().await;
    Ok(side)
}

// ---------------------------------------------------------------------------
// NATS JetStream
// ---------------------------------------------------------------------------

/// A message received on the client's inbox.
struct NatsMsg {
    subject: String,
    /// The reply subject (a pulled JetStream message's ack subject).
    reply: Option<String>,
    /// The status of a JetStream status message (`NATS/1.0 404`), if any.
    status: Option<u16>,
    payload: Vec<u8>,
}

struct Nats {
    w: BufWriter<OwnedWriteHalf>,
    rx: mpsc::Receiver<NatsMsg>,
}

impl Nats {
    async fn connect(addr: &str) -> anyhow::Result<Nats> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut info = String::new();
        r.read_line(&mut info).await?;
        if !info.starts_with("INFO ") {
            bail!("not a NATS server at {addr}: {info:?}");
        }
        let (tx, rx) = mpsc::channel(1 << 16);
        let mut w = BufWriter::new(w);
        w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true}\r\nSUB _INBOX.b.> 1\r\n")
            .await?;
        w.flush().await?;
        let (pong_tx, mut pong_rx) = mpsc::channel::<()>(16);
        tokio::spawn(async move {
            let _ = read_loop(r, tx, pong_tx).await;
        });
        let mut n = Nats { w, rx };
        n.w.write_all(b"PING\r\n").await?;
        n.w.flush().await?;
        tokio::time::timeout(Duration::from_secs(5), pong_rx.recv())
            .await
            .context("no PONG from nats-server")?;
        Ok(n)
    }

    /// `PUB`; no reply subject when `reply` is empty.
    async fn publish(&mut self, subject: &str, reply: &str, payload: &[u8]) -> anyhow::Result<()> {
        let head = if reply.is_empty() {
            format!("PUB {subject} {}\r\n", payload.len())
        } else {
            format!("PUB {subject} {reply} {}\r\n", payload.len())
        };
        self.w.write_all(head.as_bytes()).await?;
        self.w.write_all(payload).await?;
        self.w.write_all(b"\r\n").await?;
        Ok(())
    }

    async fn request(
        &mut self,
        subject: &str,
        payload: &[u8],
    ) -> anyhow::Result<serde_json::Value> {
        self.publish(subject, "_INBOX.b.req", payload).await?;
        self.w.flush().await?;
        let m = self.recv().await?;
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        if v.get("error").is_some() {
            bail!("{subject}: {v}");
        }
        Ok(v)
    }

    /// Asks `subject` once every `per_try` until an answer passes
    /// `accept` (a cluster answers nothing until its meta group, or the
    /// stream's group, has a leader), each try on its own inbox so that a
    /// late answer is told apart; at most 60 tries.
    async fn ask_until(
        &mut self,
        subject: &str,
        payload: &[u8],
        per_try: Duration,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        for attempt in 0..60 {
            let inbox = format!("_INBOX.b.ask.{attempt}");
            self.publish(subject, &inbox, payload).await?;
            self.w.flush().await?;
            let until = tokio::time::Instant::now() + per_try;
            while let Ok(Some(m)) = tokio::time::timeout_at(until, self.rx.recv()).await {
                if m.subject != inbox || m.status.is_some() {
                    continue;
                }
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                    if v.get("error").is_none() && accept(&v) {
                        return Ok(v);
                    }
                }
            }
        }
        bail!("{subject}: no acceptable answer within 60 tries")
    }

    async fn recv(&mut self) -> anyhow::Result<NatsMsg> {
        tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
            .await
            .context("nats-server did not answer within 30 s")?
            .context("connection to nats-server closed")
    }
}

async fn read_loop(
    mut r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    tx: mpsc::Sender<NatsMsg>,
    pong: mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.first().copied() {
            Some("MSG") => {
                let len: usize = parts.last().context("MSG")?.parse()?;
                let mut buf = vec![0u8; len + 2];
                r.read_exact(&mut buf).await?;
                buf.truncate(len);
                // MSG <subject> <sid> [reply-to] <#bytes>
                let m = NatsMsg {
                    subject: parts.get(1).unwrap_or(&"").to_string(),
                    reply: (parts.len() == 5).then(|| parts[3].to_string()),
                    status: None,
                    payload: buf,
                };
                if tx.send(m).await.is_err() {
                    return Ok(());
                }
            }
            Some("HMSG") => {
                let total: usize = parts.last().context("HMSG")?.parse()?;
                let hdr: usize = parts[parts.len() - 2].parse()?;
                let mut buf = vec![0u8; total + 2];
                r.read_exact(&mut buf).await?;
                let head = String::from_utf8_lossy(&buf[..hdr]).to_string();
                let status = head
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|c| c.parse().ok());
                let payload = buf[hdr..total].to_vec();
                // HMSG <subject> <sid> [reply-to] <#header bytes> <#bytes>
                let m = NatsMsg {
                    subject: parts.get(1).unwrap_or(&"").to_string(),
                    reply: (parts.len() == 6).then(|| parts[3].to_string()),
                    status,
                    payload,
                };
                if tx.send(m).await.is_err() {
                    return Ok(());
                }
            }
            Some("PING") => {
                // The writer half belongs to the client; a bench run never
                // idles long enough for the server's ping interval (2 min).
            }
            Some("PONG") => {
                let _ = pong.send(()).await;
            }
            Some("-ERR") => bail!("nats-server: {}", line.trim()),
            _ => {}
        }
    }
}

/// A `nats-server -js` child on 127.0.0.1 with its store in `dir`.
struct NatsServer {
    child: tokio::process::Child,
    addr: String,
}

impl NatsServer {
    async fn start(
        bin: &str,
        dir: &Path,
        port: u16,
        cluster: Option<&NatsCluster>,
        index: usize,
    ) -> anyhow::Result<NatsServer> {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir);
        if let Some(c) = cluster {
            let routes: Vec<String> = c
                .cluster_ports
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args([
                "--server_name",
                &format!("s{index}"),
                "--cluster_name",
                "bench",
                "--cluster",
                &format!("nats://127.0.0.1:{}", c.cluster_ports[index]),
                "--routes",
                &routes.join(","),
            ]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {bin} (Debian package nats-server)"))?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("{bin} did not listen on {addr} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(NatsServer { child, addr })
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // SIGTERM: a clean shutdown, as ours in the restart run.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }
}

/// The cluster ports of a three-server JetStream cluster.
struct NatsCluster {
    cluster_ports: Vec<u16>,
}

/// One `nats-server -js`, or a cluster of `replicas` of them.
struct NatsServers {
    bin: String,
    dirs: Vec<tempfile::TempDir>,
    ports: Vec<u16>,
    cluster: Option<NatsCluster>,
    servers: Vec<NatsServer>,
}

impl NatsServers {
    async fn start(bin: &str, replicas: u8) -> anyhow::Result<NatsServers> {
        let n = usize::from(replicas);
        let mut s = NatsServers {
            bin: bin.to_string(),
            dirs: (0..n)
                .map(|_| tempfile::tempdir())
                .collect::<Result<_, _>>()?,
            ports: (0..n).map(|_| free_port()).collect::<Result<_, _>>()?,
            cluster: (n > 1)
                .then(|| -> anyhow::Result<NatsCluster> {
                    Ok(NatsCluster {
                        cluster_ports: (0..n).map(|_| free_port()).collect::<Result<_, _>>()?,
                    })
                })
                .transpose()?,
            servers: Vec::new(),
        };
        s.boot().await?;
        Ok(s)
    }

    async fn boot(&mut self) -> anyhow::Result<()> {
        for (i, (d, p)) in self.dirs.iter().zip(&self.ports).enumerate() {
            let srv = NatsServer::start(&self.bin, d.path(), *p, self.cluster.as_ref(), i).await?;
            self.servers.push(srv);
        }
        Ok(())
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        for s in self.servers.drain(..) {
            s.stop().await?;
        }
        Ok(())
    }

    fn addr(&self) -> &str {
        &self.servers[0].addr
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn js_add_stream(
    c: &mut Nats,
    name: &str,
    replicas: u8,
    retention: &str,
) -> anyhow::Result<()> {
    let cfg = format!(
        r#"{{"name":"{name}","subjects":["{name}.>"],"storage":"file","num_replicas":{replicas},"retention":"{retention}","discard":"old"}}"#
    );
    // A cluster answers "temporarily unavailable" until its meta group
    // has a leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c
            .request(&format!("$JS.API.STREAM.CREATE.{name}"), cfg.as_bytes())
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "JetStream stream create retried");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn js_publish(
    c: &mut Nats,
    name: &str,
    replicas: u8,
    n: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    js_add_stream(c, name, replicas, "limits").await?;
    js_fill(c, name, n, size, window).await
}

/// Publishes `n` messages of `size` bytes on stream `name`, `window` in
/// flight; acknowledged publishes per second.
async fn js_fill(
    c: &mut Nats,
    name: &str,
    n: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let payload = vec![b'x'; size];
    let subject = format!("{name}.x");
    let started = Instant::now();
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < n {
        while sent < n && sent - acked < window {
            c.publish(&subject, "_INBOX.b.ack", &payload).await?;
            sent += 1;
        }
        c.w.flush().await?;
        let m = c.recv().await?;
        if m.status.is_some() || m.payload.starts_with(b"{\"error\"") {
            bail!(
                "JetStream refused a publish: {}",
                String::from_utf8_lossy(&m.payload)
            );
        }
        acked += 1;
    }
    Ok(acked as f64 / started.elapsed().as_secs_f64())
}

/// [`macula_workqueue`] on JetStream: a `workqueue` stream, a durable pull
/// consumer with explicit acks, each message acknowledged on its own (an
/// ack is a publish to its reply subject, not answered), until the stream
/// info says it holds none.
async fn js_workqueue(c: &mut Nats, r: u8, n: usize, window: usize) -> anyhow::Result<f64> {
    js_add_stream(c, "work", r, "workqueue").await?;
    js_fill(c, "work", n, 64, window).await?;
    c.request(
        "$JS.API.CONSUMER.DURABLE.CREATE.work.w",
        format!(
            r#"{{"stream_name":"work","config":{{"durable_name":"w","deliver_policy":"all","ack_policy":"explicit","max_ack_pending":{WORK_PULL},"max_waiting":512}}}}"#
        )
        .as_bytes(),
    )
    .await?;
    let started = Instant::now();
    let mut acked = 0usize;
    while acked < n {
        let want = WORK_PULL.min(n - acked);
        c.publish(
            "$JS.API.CONSUMER.MSG.NEXT.work.w",
            "_INBOX.b.work",
            format!(r#"{{"batch":{want},"expires":5000000000}}"#).as_bytes(),
        )
        .await?;
        c.w.flush().await?;
        let mut got = 0;
        while got < want {
            let m = c.recv().await?;
            match m.status {
                None => {
                    let reply = m
                        .reply
                        .context("a pulled JetStream message without its ack subject")?;
                    c.publish(&reply, "", b"").await?;
                    got += 1;
                }
                Some(s) => bail!(
                    "JetStream work queue: status {s} after {} of {n}",
                    acked + got
                ),
            }
        }
        c.w.flush().await?;
        acked += got;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = c.request("$JS.API.STREAM.INFO.work", b"").await?;
        let left = info["state"]["messages"].as_u64().unwrap_or(u64::MAX);
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("JetStream work queue: {left} messages left 30 s after the last ack");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let per_s = acked as f64 / started.elapsed().as_secs_f64();
    // Removed, as on Macula's side.
    let deleted = c.request("$JS.API.STREAM.DELETE.work", b"").await?;
    if deleted["success"].as_bool() != Some(true) {
        bail!("JetStream did not remove the work queue stream: {deleted}");
    }
    Ok(per_s)
}

async fn nats_side(a: &StreamArgs) -> anyhow::Result<Side> {
    let r = a.replicas;
    let mut servers = NatsServers::start(&a.nats_server, r).await?;
    let mut c = Nats::connect(servers.addr()).await?;
    c.ask_until("$JS.API.INFO", b"", Duration::from_secs(1), |_| true)
        .await?;
    let mut side = Side {
        target: if r == 1 {
            "jetstream".into()
        } else {
            format!("jetstream-r{r}")
        },
        ..Default::default()
    };
    side.publish_64_per_s = js_publish(&mut c, "t64", r, a.msgs, 64, a.window).await?;
    side.publish_1k_per_s = js_publish(&mut c, "t1k", r, a.msgs, 1024, a.window).await?;
    side.work_acked_per_s = js_workqueue(&mut c, r, a.msgs, a.window).await?;
    js_add_stream(&mut c, "lat", r, "limits").await?;
    let payload = vec![b'x'; 64];
    let mut ns = Vec::with_capacity(a.latency_count);
    for _ in 0..a.latency_count {
        let t = Instant::now();
        c.publish("lat.x", "_INBOX.b.ack", &payload).await?;
        c.w.flush().await?;
        c.recv().await?;
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    side.publish_latency_64 = Some(latency(&mut ns));
    js_publish(&mut c, "replay", r, a.replay, 64, a.window).await?;
    c.request(
        "$JS.API.CONSUMER.DURABLE.CREATE.replay.r",
        br#"{"stream_name":"replay","config":{"durable_name":"r","deliver_policy":"all","ack_policy":"none","max_waiting":512}}"#,
    )
    .await?;
    let started = Instant::now();
    let mut got = 0usize;
    let mut pending: VecDeque<()> = VecDeque::new();
    while got < a.replay {
        if pending.is_empty() {
            c.publish(
                "$JS.API.CONSUMER.MSG.NEXT.replay.r",
                "_INBOX.b.pull",
                br#"{"batch":10000,"expires":5000000000}"#,
            )
            .await?;
            c.w.flush().await?;
            pending.push_back(());
        }
        let m = c.recv().await?;
        match m.status {
            None => {
                got += 1;
                if got.is_multiple_of(10_000) {
                    pending.pop_front();
                }
            }
            Some(408) | Some(404) => {
                pending.pop_front();
            }
            Some(s) => bail!("JetStream pull: status {s} on {}", m.subject),
        }
    }
    side.replay_per_s = got as f64 / started.elapsed().as_secs_f64();
    side.replayed = got;
    drop(c);
    servers.stop().await?;
    // Restart with everything stored: until the stream answers its info
    // with every message.
    let started = Instant::now();
    servers.boot().await?;
    let mut c = Nats::connect(servers.addr()).await?;
    let want = a.replay as u64;
    let info = c
        .ask_until(
            "$JS.API.STREAM.INFO.replay",
            b"",
            Duration::from_millis(500),
            |v| v["state"]["messages"].as_u64() == Some(want),
        )
        .await?;
    side.restart_ms = started.elapsed().as_secs_f64() * 1e3;
    let stored = info["state"]["messages"].as_u64().unwrap_or(0) as usize;
    if stored != a.replay {
        bail!("after restart JetStream holds {stored} of {}", a.replay);
    }
    drop(c);
    servers.stop().await?;
    Ok(side)
}
