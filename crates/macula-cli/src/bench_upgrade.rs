//! `macula bench upgrade`: rolling out a new version of a WebAssembly
//! workload across a mesh (issue 25; docs/WASM.md). In one process, on
//! 127.0.0.1: `--nodes` nodes with a workload agent each, the example
//! component deployed on all of them, and a caller node (no agent) calling
//! `bench.echo` with one call in flight throughout. For each strategy in
//! turn (all-at-once, rolling with `--batch-size`, canary with
//! `--batch-size` promoted at once), a new version (the same component
//! tagged, so another artifact every node fetches) is rolled out with a
//! health check; the figures are the time from `upgrade` to the rollout's
//! end, and the call latency while it runs against the latency before.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use macula::Node;
use macula_wasm::agent::DeployRequest;
use macula_wasm::rollout::{Phase, Placement, Strategy, UpgradeRequest};
use macula_wasm::{Agent, AgentOptions, WasmHost, WasmLimits};

use crate::bench_stats::{build_kind, debug_note, latency, Latency, TempDirs};

#[derive(clap::Args, Debug)]
pub struct UpgradeArgs {
    /// The example component (`cargo build --release --target
    /// wasm32-wasip2 --manifest-path
    /// crates/macula-wasm/guests/example/Cargo.toml`).
    #[arg(long, value_name = "FILE.wasm")]
    component: PathBuf,
    /// Nodes running the workload (2..=16).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Nodes per batch for rolling and canary.
    #[arg(long, default_value_t = 1)]
    batch_size: u32,
    /// Steady-state calls measured before each rollout (1..=100000).
    #[arg(long, default_value_t = 2_000)]
    steady: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    strategy: &'static str,
    batches: usize,
    upgrade_ms: f64,
    steady: Latency,
    during: Latency,
    failed_calls: u64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    build: &'static str,
    nodes: usize,
    batch_size: u32,
    component_bytes: usize,
    rows: Vec<Row>,
}

struct Member {
    node: Node,
    agent: Agent,
}

pub async fn run(a: UpgradeArgs) -> anyhow::Result<()> {
    anyhow::ensure!((2..=16).contains(&a.nodes), "--nodes must be 2..=16");
    anyhow::ensure!(a.batch_size >= 1, "--batch-size must be at least 1");
    anyhow::ensure!(
        (1..=100_000).contains(&a.steady),
        "--steady must be 1..=100000"
    );
    let bytes = std::fs::read(&a.component)
        .with_context(|| format!("reading {}", a.component.display()))?;
    let mut dirs = TempDirs::new("upgrade");
    let mut members: Vec<Member> = Vec::new();
    for _ in 0..a.nodes {
        let dir = dirs.make()?;
        let mut b = Node::builder()
            .realm("bench.upgrade")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .data_dir(&dir);
        if let Some(first) = members.first() {
            b = b.bootstrap([first.node.local_addr().to_string()]);
        }
        let node = b.start().await?;
        let mut opts = AgentOptions::new(dir.join("workloads"));
        opts.poll = Duration::from_millis(20);
        opts.health_interval = Duration::from_millis(100);
        let agent = Agent::start(&node, WasmHost::new(WasmLimits::default())?, opts).await?;
        members.push(Member { node, agent });
    }
    let caller = Node::builder()
        .realm("bench.upgrade")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .bootstrap([members[0].node.local_addr().to_string()])
        .start()
        .await?;
    let r = measure(&a, &bytes, &members, &caller).await;
    caller.shutdown().await;
    for m in members {
        m.agent.stop().await;
        m.node.shutdown().await;
    }
    let report = r?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "upgrade of a {}-byte component on {} nodes, batch size {} ({} build{})",
        report.component_bytes,
        report.nodes,
        report.batch_size,
        report.build,
        debug_note()
    )?;
    for r in &report.rows {
        writeln!(
            out,
            "{:<12} {} batches: {:>8.1} ms; call p50/p99 steady {:.0}/{:.0} us, during {:.0}/{:.0} us ({} calls); failed calls {}",
            r.strategy,
            r.batches,
            r.upgrade_ms,
            r.steady.p50_us,
            r.steady.p99_us,
            r.during.p50_us,
            r.during.p99_us,
            r.during.samples,
            r.failed_calls
        )?;
    }
    Ok(())
}

/// Waits (bounded) until every member sees the others.
async fn connect_all(members: &[Member]) -> anyhow::Result<()> {
    for a in members {
        for b in members {
            if a.node.id() != b.node.id() && a.node.peer(b.node.id()).is_none() {
                a.node.connect(&b.node.local_addr().to_string()).await?;
            }
        }
    }
    Ok(())
}

async fn wait_for(agent: &Agent, app: &str, id: u64) -> anyhow::Result<Phase> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(mut v) = agent.status(Some(app)).await {
            if let Some(r) = v.pop().and_then(|r| r.rollout) {
                if r.id == id && !r.phase.is_active() {
                    return Ok(r.phase);
                }
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "rollout {id} did not end");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn deploy(agent: &Agent, version: &str, bytes: &[u8]) -> anyhow::Result<Option<u64>> {
    let m = agent.store_artifact(bytes)?;
    let r = agent
        .deploy(
            "bench",
            DeployRequest {
                version: version.into(),
                hash: m.hash,
                config: vec![("prefix".into(), "bench".into())],
                placement: Placement::default(),
            },
        )
        .await?;
    Ok(r.rollout.map(|r| r.id))
}

/// One call in flight until `stop`; each call's time in ns and the
/// number of failures.
fn load(
    caller: Node,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let payload = Bytes::from(vec![7u8; 64]);
        let mut ns = Vec::new();
        while !stop.load(Ordering::Relaxed) && ns.len() < 10_000_000 {
            let t = Instant::now();
            match caller
                .call("bench.echo", payload.clone())
                .timeout(Duration::from_secs(5))
                .await
            {
                Ok(_) => ns.push(t.elapsed().as_nanos() as u64),
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        ns
    })
}

async fn measure(
    a: &UpgradeArgs,
    bytes: &[u8],
    members: &[Member],
    caller: &Node,
) -> anyhow::Result<Report> {
    connect_all(members).await?;
    let first = &members[0].agent;
    let id = deploy(first, "0", &macula_wasm::artifact::tagged(bytes, "0"))
        .await?
        .context("a first deployment starts a rollout")?;
    anyhow::ensure!(
        wait_for(first, "bench", id).await? == Phase::Completed,
        "the first deployment did not complete"
    );
    let mut rows = Vec::new();
    let strategies = [
        (Strategy::AllAtOnce, "all-at-once"),
        (Strategy::Rolling, "rolling"),
        (Strategy::Canary, "canary"),
    ];
    for (i, (strategy, name)) in strategies.into_iter().enumerate() {
        let version = (i + 1).to_string();
        // Stored on the last node: the others fetch it from their peers
        // during the rollout, as they would.
        deploy(
            &members[a.nodes - 1].agent,
            &version,
            &macula_wasm::artifact::tagged(bytes, &version),
        )
        .await?;
        // Steady state first.
        let mut ns = Vec::with_capacity(a.steady);
        for _ in 0..a.steady {
            let t = Instant::now();
            caller
                .call("bench.echo", Bytes::from(vec![7u8; 64]))
                .timeout(Duration::from_secs(5))
                .await?;
            ns.push(t.elapsed().as_nanos() as u64);
        }
        let steady = latency(&mut ns);
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let calls = load(caller.clone(), stop.clone(), failed.clone());
        let t = Instant::now();
        let plan = first
            .upgrade(
                "bench",
                UpgradeRequest {
                    version: version.clone(),
                    strategy,
                    batch_size: a.batch_size,
                    health_check: Some("bench.health".into()),
                    rollback_on_fail: true,
                },
            )
            .await?;
        let mut phase = wait_for(first, "bench", plan.id).await?;
        if phase == Phase::Paused {
            first.promote("bench").await?;
            phase = wait_for(first, "bench", plan.id).await?;
        }
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut during = calls.await?;
        anyhow::ensure!(
            phase == Phase::Completed,
            "{name} rollout ended {}",
            phase.as_str()
        );
        rows.push(Row {
            strategy: name,
            batches: plan.batches.len(),
            upgrade_ms: took.as_secs_f64() * 1e3,
            steady,
            during: latency(&mut during),
            failed_calls: failed.load(Ordering::Relaxed),
        });
    }
    Ok(Report {
        build: build_kind(),
        nodes: a.nodes,
        batch_size: a.batch_size,
        component_bytes: bytes.len(),
        rows,
    })
}
