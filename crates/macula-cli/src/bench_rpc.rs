//! `macula bench rpc`: request/reply between two node processes on
//! loopback.
//!
//! This process is the caller's node; it starts a second `macula serve
//! --echo` process (the provider) that joins through it, waits until the
//! procedure is found, then measures: sequential round trips over the
//! pooled connection (latency), concurrent callers (throughput), and a new
//! connection per call. The child is killed on every exit path
//! (`kill_on_drop`), and the whole run is bounded by the bench time limit.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use macula::{DisconnectReason, Node};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::bench_stats::{build_kind, debug_note};
use crate::bench_stats::{latency, Latency};

const PROCEDURE: &str = "bench.echo";
/// Upper bound on `--count`.
const MAX_COUNT: usize = 1_000_000;
/// How long the provider process may take to start and be found.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct RpcArgs {
    /// Sequential calls for the latency run (the concurrent run makes 4x).
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Concurrent callers in the throughput run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Calls over a new connection each (the rest share the pooled one).
    #[arg(long, default_value_t = 200)]
    fresh: usize,
    /// Request payload size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Latency percentiles (the same summary `bench pubsub` prints).
fn percentiles(samples: &[Duration]) -> Latency {
    let mut ns: Vec<u64> = samples.iter().map(|d| d.as_nanos() as u64).collect();
    latency(&mut ns)
}

/// Starts `macula serve bench.echo --echo` joining through `via`; returns
/// the child once it is serving.
async fn start_provider(via: SocketAddr, realm: &str) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("cannot find the macula binary")?;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "serve",
            PROCEDURE,
            "--echo",
            // A full node of its own: measured is node-to-node RPC (as a
            // client it would be served through this node, its gateway).
            "--full-node",
            "--listen",
            "127.0.0.1:0",
            "--realm",
            realm,
            "--connect",
            &via.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the provider process")?;
    let stderr = child.stderr.take().context("provider stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("serving") {
                return Ok::<_, std::io::Error>(true);
            }
            tracing::debug!(line, "provider");
        }
        Ok(false)
    };
    match tokio::time::timeout(SETUP_TIMEOUT, ready).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => anyhow::bail!("the provider process exited before serving"),
        Ok(Err(e)) => return Err(e).context("reading the provider's output"),
        Err(_) => anyhow::bail!("the provider process did not start within {SETUP_TIMEOUT:?}"),
    }
    // Keep draining its stderr so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

pub async fn run(args: RpcArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_COUNT).contains(&args.count),
        "--count must be between 1 and {MAX_COUNT}"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.concurrency),
        "--concurrency must be between 1 and 1024"
    );
    anyhow::ensure!(args.fresh <= 10_000, "--fresh must be at most 10000");
    let realm = format!("bench-rpc-{}", std::process::id());
    let node = Node::builder()
        .realm(realm.clone())
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .start()
        .await?;
    let res = measure(&node, &realm, &args).await;
    node.shutdown().await;
    res
}

async fn measure(node: &Node, realm: &str, args: &RpcArgs) -> anyhow::Result<()> {
    eprintln!("bench rpc: starting the provider process...");
    let mut child = start_provider(node.local_addr(), realm).await?;
    let payload = Bytes::from(vec![0x5a; args.size]);

    // Wait until the advertisement is found and the pooled connection is up.
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let provider = loop {
        match node.call(PROCEDURE, payload.clone()).await {
            Ok(r) => break r.provider,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "provider not found yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("the provider was never found"),
        }
    };
    let addr: SocketAddr = node
        .services()
        .await?
        .into_iter()
        .find(|(p, _)| p == PROCEDURE)
        .and_then(|(_, ps)| ps.into_iter().find(|p| p.node == provider))
        .and_then(|p| p.addrs.into_iter().find_map(|a| a.parse().ok()))
        .context("the provider's advertisement has no address")?;

    // Warm-up.
    for _ in 0..args.count.min(1000) {
        node.call(PROCEDURE, payload.clone()).await?;
    }

    eprintln!("bench rpc: {} sequential calls...", args.count);
    let mut seq = Vec::with_capacity(args.count);
    let started = Instant::now();
    for i in 0..args.count {
        let t = Instant::now();
        let r = node.call(PROCEDURE, payload.clone()).await?;
        seq.push(t.elapsed());
        anyhow::ensure!(r.payload.len() == args.size, "echo returned the wrong size");
        if i > 0 && i % (args.count / 4).max(1) == 0 {
            eprintln!("bench rpc:   {i}/{}", args.count);
        }
    }
    let seq_rate = args.count as f64 / started.elapsed().as_secs_f64();
    let seq_p = percentiles(&seq);

    let total = args.count * 4;
    eprintln!(
        "bench rpc: {total} calls from {} concurrent callers...",
        args.concurrency
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let node = node.clone();
            let next = next.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    let t = Instant::now();
                    node.call(PROCEDURE, payload.clone()).await?;
                    lat.push(t.elapsed());
                }
                Ok::<_, macula::Error>(lat)
            })
        })
        .collect();
    let mut conc = Vec::with_capacity(total);
    for w in workers {
        conc.extend(w.await.context("caller task")??);
    }
    let conc_rate = total as f64 / started.elapsed().as_secs_f64();
    let conc_p = percentiles(&conc);

    eprintln!(
        "bench rpc: {} calls on a new connection each...",
        args.fresh
    );
    let mut fresh = Vec::with_capacity(args.fresh);
    for _ in 0..args.fresh {
        let t = Instant::now();
        let peer = node
            .dial_unpooled(addr, Some(provider))
            .await
            .context("dialing the provider")?;
        node.call_via(&peer, PROCEDURE, payload.clone(), Duration::from_secs(5))
            .await?;
        fresh.push(t.elapsed());
        peer.disconnect(DisconnectReason::Idle, "benchmark call done")
            .await;
    }
    let fresh_p = percentiles(&fresh);

    let _ = child.kill().await;

    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "benchmark": "rpc",
            "build": build_kind(),
            "processes": 2,
            "payload_bytes": args.size,
            "calls_per_sec": conc_rate,
            "p50_us": seq_p.p50_us,
            "p99_us": seq_p.p99_us,
            "p999_us": seq_p.p999_us,
            "sequential": { "calls": args.count, "calls_per_sec": seq_rate, "latency": seq_p },
            "concurrent": { "callers": args.concurrency, "calls": total, "calls_per_sec": conc_rate, "latency": conc_p },
            "new_connection_per_call": { "calls": args.fresh, "latency": fresh_p },
        });
        writeln!(out, "{v}")?;
    } else {
        let note = debug_note();
        writeln!(
            out,
            "rpc between two processes on 127.0.0.1, {}-byte requests{note}",
            args.size
        )?;
        writeln!(
            out,
            "  sequential ({} calls): p50 {:.0} us  p99 {:.0} us  p99.9 {:.0} us  ({:.0} calls/s)",
            args.count, seq_p.p50_us, seq_p.p99_us, seq_p.p999_us, seq_rate
        )?;
        writeln!(
            out,
            "  {} concurrent callers ({total} calls): {:.0} calls/s  p50 {:.0} us  p99 {:.0} us",
            args.concurrency, conc_rate, conc_p.p50_us, conc_p.p99_us
        )?;
        writeln!(
            out,
            "  new connection per call ({}): p50 {:.0} us  p99 {:.0} us (pooled p50 {:.0} us)",
            args.fresh, fresh_p.p50_us, fresh_p.p99_us, seq_p.p50_us
        )?;
    }
    Ok(())
}
