//! `macula bench ...`: benchmarks that print their figures (text or JSON).
//!
//! Each benchmark starts what it needs itself on loopback, is bounded in
//! count and time, and stops everything it started. Figures belong in
//! BENCHMARKS.md together with the command that produced them.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use macula::{Node, NodeId};
use macula_wire::DisconnectReason;

/// Upper bound on `--count`, so a typo cannot run for hours.
const MAX_COUNT: usize = 100_000;
/// Every benchmark gives up after this long.
const MAX_RUNTIME: Duration = Duration::from_secs(600);

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Request/response over one pooled connection versus a new connection
    /// per exchange, and the handshake time (two nodes on 127.0.0.1).
    Pool(PoolArgs),
}

#[derive(clap::Args, Debug)]
pub struct PoolArgs {
    /// Exchanges per mode (1..=100000).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Pool(args) => tokio::time::timeout(MAX_RUNTIME, pool(args))
            .await
            .context("benchmark exceeded its time limit")?,
    }
}

/// Percentile summary of a set of durations, in microseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Summary {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    total_ms: f64,
}

fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        us(samples[i])
    };
    Summary {
        p50_us: at(0.50),
        p99_us: at(0.99),
        max_us: samples.last().map(|d| us(*d)).unwrap_or(0.0),
        total_ms: samples.iter().sum::<Duration>().as_secs_f64() * 1e3,
    }
}

async fn local_node() -> anyhow::Result<Node> {
    Ok(Node::builder()
        .realm("bench")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .start()
        .await?)
}

async fn pool(args: PoolArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_COUNT).contains(&args.count),
        "--count must be between 1 and {MAX_COUNT}"
    );
    let n = args.count;
    let server = local_node().await?;
    let client = local_node().await?;
    let addr = server.local_addr();
    let server_id: NodeId = server.id();
    let rt = client.runtime();
    let timeout = Duration::from_secs(5);

    // Warm up: first connection, caches, allocator.
    let warm = rt.connect(addr, Some(server_id)).await?;
    for _ in 0..50 {
        warm.ping(timeout).await?;
    }

    eprintln!("bench pool: {n} exchanges over the pooled connection...");
    let mut pooled = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let peer = rt.connect(addr, Some(server_id)).await?;
        peer.ping(timeout).await?;
        pooled.push(t.elapsed());
    }

    eprintln!("bench pool: {n} exchanges with a new connection each...");
    let mut fresh = Vec::with_capacity(n);
    let mut handshakes = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let peer = rt.dial_unpooled(addr, Some(server_id)).await?;
        handshakes.push(t.elapsed());
        peer.ping(timeout).await?;
        fresh.push(t.elapsed());
        peer.connection().close(
            macula_runtime::peer::close_code(DisconnectReason::Shutdown),
            b"bench",
        );
        if (i + 1) % 250 == 0 {
            eprintln!("  {}/{n}", i + 1);
        }
    }
    let pooled = summarize(&mut pooled);
    let fresh = summarize(&mut fresh);
    let handshake = summarize(&mut handshakes);
    let speedup = fresh.total_ms / pooled.total_ms.max(f64::MIN_POSITIVE);
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "bench": "pool",
            "count": n,
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "pooled": pooled,
            "new_connection": fresh,
            "handshake": handshake,
            "speedup": speedup,
        });
        writeln!(out, "{v}")?;
    } else {
        let build = if cfg!(debug_assertions) {
            " (DEBUG build: use --release for figures)"
        } else {
            ""
        };
        writeln!(
            out,
            "pool benchmark: {n} request/response exchanges (PING/PONG) on 127.0.0.1{build}"
        )?;
        writeln!(
            out,
            "  pooled connection      total {:>9.1} ms   p50 {:>8.1} us   p99 {:>8.1} us",
            pooled.total_ms, pooled.p50_us, pooled.p99_us
        )?;
        writeln!(
            out,
            "  new connection each    total {:>9.1} ms   p50 {:>8.1} us   p99 {:>8.1} us",
            fresh.total_ms, fresh.p50_us, fresh.p99_us
        )?;
        writeln!(
            out,
            "  handshake (TLS+HELLO)  total {:>9.1} ms   p50 {:>8.1} us   p99 {:>8.1} us",
            handshake.total_ms, handshake.p50_us, handshake.p99_us
        )?;
        writeln!(out, "  connection reuse is {speedup:.1}x faster")?;
    }
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}
