//! `macula bench crdt`: CRDT convergence across node *processes* on
//! 127.0.0.1. This process and `--nodes - 1` children (`macula bench
//! crdt-node`) each start a node, open one OR-set, and wait until all see
//! every replica subscribed; then all add `--adds` elements at once and
//! each reports when its set holds every element. The figure is the time
//! from "go" to the last replica converged (CLOCK_MONOTONIC, shared by the
//! processes of one machine).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use crate::bench_stats::mono_ns;
use anyhow::{bail, Context};
use futures::StreamExt;
use macula::crdt::OrSet;
use macula::Node;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Every step (start, subscribe, converge) must finish within this.
const STEP: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct CrdtArgs {
    /// Node processes in all, this one included (2..=50).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Elements each node adds (1..=1000).
    #[arg(long, default_value_t = 10)]
    adds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct CrdtNodeArgs {
    /// The bench process's node (a QUIC address on 127.0.0.0/8).
    #[arg(long)]
    connect: SocketAddr,
    /// The CRDT's name.
    #[arg(long)]
    name: String,
    /// This child's number (its elements are `<index>/<n>`).
    #[arg(long)]
    index: usize,
    /// Node processes in all.
    #[arg(long)]
    nodes: usize,
    /// Elements each node adds.
    #[arg(long)]
    adds: usize,
}

/// Adds this replica's elements, then waits until the set holds all
/// `total`; the CLOCK_MONOTONIC time it did.
async fn add_and_converge(
    set: &macula::crdt::Crdt<OrSet<String>>,
    index: usize,
    adds: usize,
    total: usize,
) -> anyhow::Result<u64> {
    let mut changes = set.changes();
    for n in 0..adds {
        set.add(format!("{index}/{n}"))?;
    }
    tokio::time::timeout(STEP, async {
        while set.read(|s| s.len()) < total {
            if changes.next().await.is_none() {
                bail!("the replica stopped");
            }
        }
        Ok(mono_ns())
    })
    .await
    .context("did not converge within 60 s")?
}

async fn start_node(bootstrap: Option<SocketAddr>) -> anyhow::Result<Node> {
    let mut b = Node::builder()
        .realm("bench.crdt")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)));
    if let Some(addr) = bootstrap {
        b = b.bootstrap([addr.to_string()]);
    }
    Ok(b.start().await?)
}

/// One line to the parent (this child's stdout is the parent's pipe).
fn say(line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// One line from the parent (empty when it closed the pipe).
async fn read_line() -> anyhow::Result<String> {
    tokio::task::spawn_blocking(|| {
        let mut l = String::new();
        std::io::stdin().read_line(&mut l).map(|_| l)
    })
    .await?
    .map_err(Into::into)
}

/// A child: start, open, report ready, wait for "go", add, converge, report.
pub async fn node(args: CrdtNodeArgs) -> anyhow::Result<()> {
    let node = start_node(Some(args.connect)).await?;
    let set = node.crdt::<OrSet<String>>(&args.name).await?;
    set.wait_for_replicas(args.nodes, STEP).await?;
    say("ready")?;
    match tokio::time::timeout(STEP, read_line()).await {
        Ok(Ok(l)) if l.trim() == "go" => {}
        other => bail!("expected \"go\", got {other:?}"),
    }
    let done = add_and_converge(&set, args.index, args.adds, args.nodes * args.adds).await?;
    say(&format!("done {done}"))?;
    // Stay until told to stop (stdin closes), so the others still hear us.
    let _ = tokio::time::timeout(STEP, read_line()).await;
    node.shutdown().await;
    Ok(())
}

pub async fn run(args: CrdtArgs) -> anyhow::Result<()> {
    if !(2..=50).contains(&args.nodes) || !(1..=1000).contains(&args.adds) {
        bail!("--nodes must be 2..=50 and --adds 1..=1000");
    }
    let node = start_node(None).await?;
    let name = format!("bench-{}", std::process::id());
    let set = node.crdt::<OrSet<String>>(&name).await?;
    let exe = std::env::current_exe().context("cannot find the macula executable")?;
    let mut kids = Vec::new();
    for index in 1..args.nodes {
        let mut child = tokio::process::Command::new(&exe)
            .args(["bench", "crdt-node", "--connect"])
            .arg(node.local_addr().to_string())
            .args(["--name", &name, "--index"])
            .arg(index.to_string())
            .arg("--nodes")
            .arg(args.nodes.to_string())
            .arg("--adds")
            .arg(args.adds.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a node process")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        kids.push((child, stdin, stdout));
    }
    set.wait_for_replicas(args.nodes, STEP).await?;
    for (_, _, out) in &mut kids {
        match tokio::time::timeout(STEP, out.next_line()).await {
            Ok(Ok(Some(l))) if l == "ready" => {}
            other => bail!("a node process did not get ready: {other:?}"),
        }
    }
    let go = mono_ns();
    for (_, stdin, _) in &mut kids {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let mut last = add_and_converge(&set, 0, args.adds, args.nodes * args.adds).await?;
    for (_, _, out) in &mut kids {
        match tokio::time::timeout(STEP, out.next_line()).await {
            Ok(Ok(Some(l))) => {
                let t: u64 = l
                    .strip_prefix("done ")
                    .and_then(|t| t.parse().ok())
                    .with_context(|| format!("unexpected line {l:?}"))?;
                last = last.max(t);
            }
            other => bail!("a node process did not converge: {other:?}"),
        }
    }
    let ms = last.saturating_sub(go) as f64 / 1e6;
    for (mut child, stdin, _) in kids {
        drop(stdin);
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }
    node.shutdown().await;
    if args.json {
        println!(
            "{{\"benchmark\":\"crdt\",\"nodes\":{},\"adds_per_node\":{},\"converged_ms\":{ms:.3},\"build\":\"{}\"}}",
            args.nodes,
            args.adds,
            crate::bench_stats::build_kind()
        );
    } else {
        println!(
            "{} node processes, {} concurrent adds each: every replica converged {:.1} ms after the start{}",
            args.nodes,
            args.adds,
            ms,
            crate::bench_stats::debug_note()
        );
    }
    Ok(())
}
