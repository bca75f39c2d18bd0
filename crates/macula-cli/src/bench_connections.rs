//! `macula bench connections`: many lightweight clients on one node.
//!
//! Without `--node` this starts its own `macula start` process on loopback
//! (so its memory and CPU are the node's alone, read from `/proc`), then
//! opens `--count` client connections from this one process. Clients share
//! a few client-only QUIC sockets (`--per-socket` clients each; socket k is
//! bound to 127.0.0.(2+k)), so the run needs neither a port nor a file
//! descriptor per connection. Each client subscribes to its own topic
//! (`bench.conn.<i>`), which is what makes it cost the node a subscription
//! and a client feed, not just a connection.
//!
//! Two of the clients are probes: client 1 advertises `bench.conn.echo` and
//! publishes to `bench.conn.0`, client 0 calls and receives. Their RPC and
//! pub/sub round trips (both through the node, as a gateway) are measured
//! once with only the probes attached and again with every client attached
//! and idle. Between the two, the node's resident memory and CPU time are
//! read before and after an idle window.
//!
//! Bounded: at most `MAX_CONNECTIONS` clients, the bench-wide time limit,
//! a deadline on every connect and round trip; loopback only. The node
//! process is killed on every exit path (`kill_on_drop`).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use macula::{
    Client, ClientSocket, HandlerError, PeerAddr, Request, Subscription, SubscriptionItem,
};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::bench::{build_kind, debug_note};
use crate::bench_pubsub::{latency, Latency};

/// Upper bound on `--count`.
const MAX_CONNECTIONS: usize = 50_000;
/// The probes' procedure.
const ECHO: &str = "bench.conn.echo";
/// Deadline of one probe round trip.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the node process may take to start.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after the last connect before the idle window, so handshake
/// leftovers (retransmits, acknowledgements) are not counted as idle.
const SETTLE: Duration = Duration::from_secs(2);
/// Connections the started node may hold beyond `--count`.
const NODE_HEADROOM: usize = 64;

#[derive(clap::Args, Debug)]
pub struct ConnectionsArgs {
    /// Client connections to open (2..=50000).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Load this running node (host:port) instead of starting one. Its
    /// `max_connections` must allow `--count` connections.
    #[arg(long, value_name = "IP:PORT")]
    node: Option<String>,
    /// Realm of `--node`.
    #[arg(long, default_value = "default")]
    realm: String,
    /// PID of the `--node` process, to read its memory and CPU from /proc
    /// (without it those figures are not reported).
    #[arg(long, value_name = "PID")]
    node_pid: Option<u32>,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Clients sharing one client UDP socket.
    #[arg(long, default_value_t = 2500)]
    per_socket: usize,
    /// Seconds over which the idle node's CPU use is measured (1..=300).
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Round trips per latency measurement (1..=100000).
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// The clients' QUIC keep-alive interval in milliseconds (default: the
    /// client default, which also sets how fast a dead gateway is noticed).
    #[arg(long, value_name = "MS")]
    keep_alive_ms: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The node under load: a child process this run started, or one given.
struct Target {
    addr: SocketAddr,
    realm: String,
    pid: Option<u32>,
    /// Keeps the started node alive (killed on drop).
    _child: Option<tokio::process::Child>,
    data_dir: Option<std::path::PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(d) = &self.data_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Starts `macula start` on 127.0.0.1 with room for `count` connections.
async fn start_node(count: usize) -> anyhow::Result<Target> {
    let exe = std::env::current_exe().context("cannot find the macula binary")?;
    let realm = format!("bench-conn-{}", std::process::id());
    let data_dir = std::env::temp_dir().join(format!("macula-{realm}"));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let max = (count + NODE_HEADROOM).to_string();
    let spawned = tokio::process::Command::new(exe)
        .args(["start", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--realm", &realm, "--max-connections", &max])
        .arg("--data-dir")
        .arg(&data_dir)
        // Ten thousand "peer connected" lines would cost the node CPU.
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&data_dir);
            return Err(e).context("cannot start the node process");
        }
    };
    let mut target = Target {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        realm,
        pid: child.id(),
        _child: None,
        data_dir: Some(data_dir),
    };
    let stdout = child.stdout.take().context("node stdout")?;
    target._child = Some(child);
    let mut lines = BufReader::new(stdout).lines();
    let listen = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(a) = line.strip_prefix("listen: ") {
                return Ok::<_, std::io::Error>(a.trim().parse::<SocketAddr>().ok());
            }
        }
        Ok(None)
    };
    target.addr = match tokio::time::timeout(NODE_START_TIMEOUT, listen).await {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) => anyhow::bail!("the node process exited before listening"),
        Ok(Err(e)) => return Err(e).context("reading the node's output"),
        Err(_) => anyhow::bail!("the node did not start within {NODE_START_TIMEOUT:?}"),
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(target)
}

/// Resident memory of `pid`, bytes (VmRSS in /proc/PID/status).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system) `pid` has used so far.
fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant of the system; no memory is shared.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Percent of one core used between two CPU-time readings `wall` apart.
fn cpu_percent(before: Option<Duration>, after: Option<Duration>, wall: Duration) -> Option<f64> {
    let used = after?.checked_sub(before?)?;
    Some(used.as_secs_f64() / wall.as_secs_f64() * 100.0)
}

async fn echo(req: Request) -> Result<Bytes, HandlerError> {
    Ok(req.payload)
}

/// One round trip of each kind, `n` times, between the probes.
struct Probes {
    caller: Client,
    inbox: Subscription,
    publisher: Client,
}

impl Probes {
    async fn rpc(&self, n: usize) -> anyhow::Result<Latency> {
        let payload = Bytes::from_static(&[0x5a; 64]);
        let mut ns = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let call = self.caller.call(ECHO, payload.clone());
            let r = tokio::time::timeout(ROUND_TRIP_TIMEOUT, call)
                .await
                .context("an RPC round trip timed out")??;
            ns.push(t.elapsed().as_nanos() as u64);
            anyhow::ensure!(r.payload == payload, "the echo answered something else");
        }
        Ok(latency(&mut ns))
    }

    async fn pubsub(&mut self, n: usize) -> anyhow::Result<Latency> {
        let mut ns = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let t = Instant::now();
            self.publisher
                .publish("bench.conn.0", Bytes::copy_from_slice(&i.to_be_bytes()))
                .await?;
            loop {
                let item = tokio::time::timeout(ROUND_TRIP_TIMEOUT, self.inbox.next())
                    .await
                    .context("a published message did not arrive in time")?
                    .context("the probe's subscription ended")?;
                match item {
                    SubscriptionItem::Event(e) if e.payload[..] == i.to_be_bytes() => break,
                    // An earlier message that arrived late: keep waiting.
                    SubscriptionItem::Event(_) => {}
                    SubscriptionItem::Lagged(k) => anyhow::bail!("the probe lost {k} messages"),
                }
            }
            ns.push(t.elapsed().as_nanos() as u64);
        }
        Ok(latency(&mut ns))
    }
}

/// Everything one run measured.
#[derive(serde::Serialize)]
struct Figures {
    benchmark: &'static str,
    build: &'static str,
    /// Client connections the node held at the end of the connect phase.
    connections: usize,
    requested: usize,
    failed: usize,
    first_error: Option<String>,
    connect_secs: f64,
    /// Per client: connect (TLS + HELLO) plus its acknowledged subscription.
    connect_latency: Latency,
    client_sockets: usize,
    keep_alive_ms: u64,
    rss_before_bytes: Option<u64>,
    rss_bytes: Option<u64>,
    bytes_per_connection: Option<u64>,
    idle_secs: u64,
    idle_cpu_percent: Option<f64>,
    /// This process (the clients' side) over the same idle window.
    loadgen_idle_cpu_percent: Option<f64>,
    rpc_baseline: Latency,
    rpc_loaded: Latency,
    pubsub_baseline: Latency,
    pubsub_loaded: Latency,
}

pub async fn run(args: ConnectionsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (2..=MAX_CONNECTIONS).contains(&args.count),
        "--count must be between 2 and {MAX_CONNECTIONS}"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.concurrency),
        "--concurrency must be between 1 and 1024"
    );
    anyhow::ensure!(
        (1..=300).contains(&args.idle_secs),
        "--idle-secs must be between 1 and 300"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&args.samples),
        "--samples must be between 1 and 100000"
    );
    anyhow::ensure!(args.per_socket >= 1, "--per-socket must be at least 1");
    let sockets = args.count.div_ceil(args.per_socket);
    anyhow::ensure!(
        sockets <= 250,
        "--per-socket is too small: {sockets} sockets (at most 250 loopback source addresses)"
    );
    anyhow::ensure!(
        args.keep_alive_ms
            .is_none_or(|ms| (100..=60_000).contains(&ms)),
        "--keep-alive-ms must be between 100 and 60000"
    );
    let target = match &args.node {
        None => {
            eprintln!("bench connections: starting a node process...");
            start_node(args.count).await?
        }
        Some(a) => Target {
            addr: loopback(a)?,
            realm: args.realm.clone(),
            pid: args.node_pid,
            _child: None,
            data_dir: None,
        },
    };
    measure(&args, &target, sockets).await
}

/// `--node`: a node on this machine (the benchmark is loopback only).
fn loopback(a: &str) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = a
        .parse()
        .with_context(|| format!("--node {a:?} is not an IP:port address"))?;
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "--node must be a loopback address (the benchmark loads this machine only)"
    );
    Ok(addr)
}

async fn measure(args: &ConnectionsArgs, target: &Target, sockets: usize) -> anyhow::Result<()> {
    let endpoints = (0..sockets)
        .map(|k| {
            let ip = Ipv4Addr::new(127, 0, 0, 2 + k as u8);
            ClientSocket::bind(SocketAddr::from((ip, 0)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut template = Client::builder([PeerAddr::from(target.addr)]).realm(target.realm.clone());
    if let Some(ms) = args.keep_alive_ms {
        template = template.keep_alive(Duration::from_millis(ms));
    }
    let keep_alive_ms = template.keep_alive_interval().as_millis() as u64;
    let config = |i: usize| template.clone().socket(&endpoints[i / args.per_socket]);
    let rss_before = target.pid.and_then(rss_bytes);

    // The probes, and their round trips with nobody else attached.
    let caller = config(0).connect().await.context("probe client 0")?;
    let inbox = caller.subscribe("bench.conn.0").await?;
    let publisher = config(1).connect().await.context("probe client 1")?;
    let _echo = publisher.advertise(ECHO, echo).await?;
    let _sub1 = publisher.subscribe("bench.conn.1").await?;
    let mut probes = Probes {
        caller,
        inbox,
        publisher,
    };
    let warm = args.samples.min(200);
    probes.rpc(warm).await?;
    probes.pubsub(warm).await?;
    eprintln!("bench connections: round trips with 2 clients attached...");
    let rpc_baseline = probes.rpc(args.samples).await?;
    let pubsub_baseline = probes.pubsub(args.samples).await?;

    eprintln!(
        "bench connections: opening {} client connections ({} at a time, {sockets} client sockets)...",
        args.count, args.concurrency
    );
    let started = Instant::now();
    let mut opened = futures::stream::iter(2..args.count)
        .map(|i| {
            let cfg = config(i);
            async move {
                let t = Instant::now();
                let c = cfg.connect().await.map_err(|e| e.to_string())?;
                match c.subscribe(&format!("bench.conn.{i}")).await {
                    Ok(s) => Ok((c, s, t.elapsed())),
                    Err(e) => {
                        c.shutdown().await;
                        Err(e.to_string())
                    }
                }
            }
        })
        .buffer_unordered(args.concurrency);
    let mut clients = Vec::with_capacity(args.count);
    let mut connect_ns = Vec::with_capacity(args.count);
    let (mut failed, mut first_error) = (0usize, None);
    let progress = (args.count / 5).max(1);
    while let Some(r) = opened.next().await {
        match r {
            Ok((c, s, took)) => {
                clients.push((c, s));
                connect_ns.push(took.as_nanos() as u64);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        let done = clients.len() + failed;
        if done % progress == 0 {
            eprintln!("bench connections:   {done}/{}", args.count - 2);
        }
    }
    drop(opened);
    let connect_secs = started.elapsed().as_secs_f64();
    let connections = clients.len() + 2;
    if let Some(e) = &first_error {
        eprintln!("bench connections: {failed} connections failed; the first: {e}");
    }

    tokio::time::sleep(SETTLE).await;
    eprintln!(
        "bench connections: {connections} connected; measuring the idle node for {} s...",
        args.idle_secs
    );
    let idle = Duration::from_secs(args.idle_secs);
    let (node0, self0, t0) = (cpu_time(target.pid), cpu_time(None), Instant::now());
    tokio::time::sleep(idle).await;
    let wall = t0.elapsed();
    let idle_cpu_percent = target
        .pid
        .and_then(|p| cpu_percent(node0, cpu_time(Some(p)), wall));
    let loadgen_idle_cpu_percent = cpu_percent(self0, cpu_time(None), wall);
    let rss_after = target.pid.and_then(rss_bytes);

    eprintln!("bench connections: round trips with {connections} clients attached...");
    let rpc_loaded = probes.rpc(args.samples).await?;
    let pubsub_loaded = probes.pubsub(args.samples).await?;

    eprintln!("bench connections: closing the clients...");
    let closing = futures::stream::iter(clients)
        .map(|(c, s)| async move {
            drop(s);
            c.shutdown().await
        })
        .buffer_unordered(1024)
        .collect::<Vec<()>>();
    let _ = tokio::time::timeout(Duration::from_secs(60), closing).await;
    probes.caller.shutdown().await;
    probes.publisher.shutdown().await;
    for e in &endpoints {
        e.close("benchmark done");
    }

    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) / connections as u64),
        _ => None,
    };
    let f = Figures {
        benchmark: "connections",
        build: build_kind(),
        connections,
        requested: args.count,
        failed,
        first_error,
        connect_secs,
        connect_latency: latency(&mut connect_ns),
        client_sockets: endpoints.len(),
        keep_alive_ms,
        rss_before_bytes: rss_before,
        rss_bytes: rss_after,
        bytes_per_connection: per_conn,
        idle_secs: args.idle_secs,
        idle_cpu_percent,
        loadgen_idle_cpu_percent,
        rpc_baseline,
        rpc_loaded,
        pubsub_baseline,
        pubsub_loaded,
    };
    print(&f, args.json)
}

fn mib(b: Option<u64>) -> String {
    b.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn pct(p: Option<f64>) -> String {
    p.map_or("n/a".into(), |p| format!("{p:.1}%"))
}

fn print(f: &Figures, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(f)?)?;
        return Ok(());
    }
    let note = debug_note();
    writeln!(
        out,
        "{} client connections to one node on 127.0.0.1{note}",
        f.connections
    )?;
    if f.failed > 0 {
        writeln!(
            out,
            "  FAILED: {} of {} (first: {})",
            f.failed,
            f.requested,
            f.first_error.as_deref().unwrap_or("?")
        )?;
    }
    writeln!(
        out,
        "  connect all: {:.1} s  (per client, connect + subscribe: p50 {:.1} ms  p99 {:.1} ms)",
        f.connect_secs,
        f.connect_latency.p50_us / 1e3,
        f.connect_latency.p99_us / 1e3
    )?;
    writeln!(
        out,
        "  node memory: {} before, {} with every client  ({} per connection)",
        mib(f.rss_before_bytes),
        mib(f.rss_bytes),
        f.bytes_per_connection
            .map_or("n/a".into(), |b| format!("{:.1} KiB", b as f64 / 1024.0))
    )?;
    writeln!(
        out,
        "  idle CPU over {} s: node {}, clients' process {}  (client keep-alive {} ms)",
        f.idle_secs,
        pct(f.idle_cpu_percent),
        pct(f.loadgen_idle_cpu_percent),
        f.keep_alive_ms
    )?;
    for (what, base, loaded) in [
        ("rpc    ", &f.rpc_baseline, &f.rpc_loaded),
        ("pub/sub", &f.pubsub_baseline, &f.pubsub_loaded),
    ] {
        writeln!(
            out,
            "  {what} round trip: p50 {:.0} us  p99 {:.0} us  (2 clients: p50 {:.0} us  p99 {:.0} us)",
            loaded.p50_us, loaded.p99_us, base.p50_us, base.p99_us
        )?;
    }
    Ok(())
}
