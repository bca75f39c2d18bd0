//! `macula bench relay`: a relayed path versus a direct one on the same
//! topology. Four in-process nodes on 127.0.0.1: a public relay R, two
//! private nodes A and C (configured as behind NAT: they refuse direct
//! connections, so A reaches C only through R) and a public node D that A
//! reaches directly. The same RPC echo is measured A -> C (relayed) and
//! A -> D (direct): sequential round trips (latency percentiles) and bulk
//! throughput (large payloads, several calls in flight). The relay's byte
//! rate limit is off for the run (`bytes_per_second = 0`).

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use macula::config::{ReachabilityMode, RelayLimits};
use macula::{HandlerError, Node, NodeId, Request};

use crate::bench::{build_kind, debug_note};
use crate::bench_pubsub::{latency, Latency};

const PROCEDURE: &str = "bench.relay.echo";
const MAX_COUNT: usize = 1_000_000;
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    /// Sequential calls per path for the latency run (1..=1000000).
    #[arg(long, default_value_t = 5_000)]
    count: usize,
    /// Request payload size of the latency run, bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Payload size of the throughput run, bytes (echoed back).
    #[arg(long, default_value_t = 64 * 1024)]
    bulk_size: usize,
    /// Calls per path in the throughput run.
    #[arg(long, default_value_t = 1_000)]
    bulk_count: usize,
    /// Calls in flight in the throughput run.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct PathFigures {
    latency: Latency,
    /// Request payload bytes per second (the same comes back).
    throughput_mb_s: f64,
    calls_per_s: f64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    build: &'static str,
    size: usize,
    bulk_size: usize,
    concurrency: usize,
    direct: PathFigures,
    relayed: PathFigures,
    relay_bytes: u64,
}

/// Starts one node of the topology on 127.0.0.1 (an in-memory identity).
async fn node(bootstrap: Option<SocketAddr>, private: bool) -> anyhow::Result<Node> {
    Ok(Node::builder()
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .realm("bench.relay")
        .bootstrap(bootstrap.map(|a| a.to_string()))
        .reachability(if private {
            ReachabilityMode::Private
        } else {
            ReachabilityMode::Auto
        })
        .relay(RelayLimits {
            bytes_per_second: 0,
            ..RelayLimits::default()
        })
        .start()
        .await?)
}

async fn echo(req: Request) -> Result<Bytes, HandlerError> {
    Ok(req.payload)
}

pub async fn run(a: RelayArgs) -> anyhow::Result<()> {
    for (name, v) in [
        ("--count", a.count),
        ("--bulk-count", a.bulk_count),
        ("--concurrency", a.concurrency),
    ] {
        anyhow::ensure!(
            (1..=MAX_COUNT).contains(&v),
            "{name} must be 1..={MAX_COUNT}"
        );
    }
    anyhow::ensure!(
        a.bulk_size <= 512 * 1024,
        "--bulk-size must be at most 512 KiB"
    );
    let r = node(None, false).await?;
    let ra = Some(r.local_addr());
    let c = node(ra, true).await?;
    let d = node(ra, false).await?;
    let caller = node(ra, true).await?;
    let nodes = [caller.clone(), c.clone(), d.clone(), r.clone()];
    let res = measure(&a, &r, &caller, &c, &d).await;
    futures::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
    let report = res?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "relayed vs direct RPC on 127.0.0.1 ({} build){}",
        report.build,
        debug_note()
    )?;
    for (name, f) in [("direct", &report.direct), ("relayed", &report.relayed)] {
        writeln!(
            out,
            "  {name:8} round trip ({} B): p50 {:.0} us  p99 {:.0} us  p99.9 {:.0} us   bulk ({} B x{} in flight): {:.1} MB/s each way, {:.0} calls/s",
            report.size,
            f.latency.p50_us,
            f.latency.p99_us,
            f.latency.p999_us,
            report.bulk_size,
            report.concurrency,
            f.throughput_mb_s,
            f.calls_per_s
        )?;
    }
    writeln!(out, "  relay forwarded {} bytes", report.relay_bytes)?;
    Ok(())
}

async fn measure(
    a: &RelayArgs,
    r: &Node,
    caller: &Node,
    c: &Node,
    d: &Node,
) -> anyhow::Result<Report> {
    let _rc = c.advertise(PROCEDURE, echo).await?;
    let _rd = d.advertise(PROCEDURE, echo).await?;
    // Wait until C holds a reservation, then connect both paths.
    let setup = async {
        while !c.reserved_relays().contains(&r.id()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let relay = loop {
            if let Some(p) = caller.peer(r.id()) {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let relayed = caller.connect_via(&relay, c.id()).await?;
        anyhow::ensure!(relayed.relayed_via().is_some(), "the C path is not relayed");
        let direct = caller.connect_to(d.local_addr(), Some(d.id())).await?;
        anyhow::ensure!(direct.relayed_via().is_none(), "the D path is relayed");
        Ok(())
    };
    tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .context("setup timed out")??;
    let bytes0 = r.stats().relayed_bytes;
    // The two paths are measured in turns (alternating calls for latency,
    // alternating rounds for throughput) so neither gains from running
    // second on a busy 2-core machine.
    let [direct, relayed] = paths(a, caller, [d.id(), c.id()]).await?;
    let relay_bytes = r.stats().relayed_bytes - bytes0;
    // The relayed path really was relayed the whole time.
    anyhow::ensure!(
        caller.peer(c.id()).and_then(|p| p.relayed_via()).is_some(),
        "the relayed connection was replaced"
    );
    Ok(Report {
        build: build_kind(),
        size: a.size,
        bulk_size: a.bulk_size,
        concurrency: a.concurrency,
        direct,
        relayed,
        relay_bytes,
    })
}

const ROUNDS: usize = 4;

async fn paths(a: &RelayArgs, caller: &Node, to: [NodeId; 2]) -> anyhow::Result<[PathFigures; 2]> {
    let small = Bytes::from(vec![1u8; a.size]);
    for t in to {
        for _ in 0..100.min(a.count) {
            caller.call_to(t, PROCEDURE, small.clone()).await?;
        }
    }
    let mut ns = [Vec::with_capacity(a.count), Vec::with_capacity(a.count)];
    for _ in 0..a.count {
        for (i, t) in to.iter().enumerate() {
            let start = Instant::now();
            caller.call_to(*t, PROCEDURE, small.clone()).await?;
            ns[i].push(start.elapsed().as_nanos() as u64);
        }
    }
    let big = Bytes::from(vec![2u8; a.bulk_size]);
    let per_worker = a.bulk_count.div_ceil(a.concurrency * ROUNDS);
    let mut secs = [0f64; 2];
    for _ in 0..ROUNDS {
        for (i, t) in to.iter().enumerate() {
            secs[i] += bulk(caller, *t, &big, a.concurrency, per_worker).await?;
        }
    }
    let calls = (per_worker * a.concurrency * ROUNDS) as f64;
    let figures = |i: usize, ns: &mut Vec<u64>| PathFigures {
        latency: latency(ns),
        throughput_mb_s: calls * a.bulk_size as f64 / secs[i] / 1e6,
        calls_per_s: calls / secs[i],
    };
    let [mut n0, mut n1] = ns;
    Ok([figures(0, &mut n0), figures(1, &mut n1)])
}

/// `concurrency` workers making `per_worker` calls each; the seconds taken.
async fn bulk(
    caller: &Node,
    to: NodeId,
    big: &Bytes,
    concurrency: usize,
    per_worker: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let workers = (0..concurrency).map(|_| async move {
        for _ in 0..per_worker {
            caller
                .call_to(to, PROCEDURE, big.clone())
                .timeout(Duration::from_secs(30))
                .await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    for r in futures::future::join_all(workers).await {
        r?;
    }
    Ok(started.elapsed().as_secs_f64())
}
