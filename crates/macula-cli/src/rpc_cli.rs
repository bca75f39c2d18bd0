//! `macula call` and `macula serve`: RPC from the command line.
//!
//! Like `macula pub`/`sub`, each attaches as a lightweight client to one of
//! the `--connect` nodes, or joins as a short-lived full node with
//! `--full-node`. `call` prints the reply (or, with `--count`, one
//! line per call and a summary) and exits 1 naming the error kind on
//! failure; `serve` advertises a procedure until SIGINT/SIGTERM, then
//! withdraws it and leaves. This module only parses, calls and prints.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use macula::{AdvertiseOptions, HandlerError, Request, Strategy};

use crate::dht_cli::MeshArgs;
use crate::member::{Member, ModeArgs};

/// Upper bound on `--count`.
const MAX_CALLS: u64 = 1_000_000;

#[derive(clap::Args, Debug)]
pub struct CallArgs {
    /// Procedure name (e.g. `billing.invoice.create`).
    procedure: String,
    /// Request payload (UTF-8 text).
    data: String,
    /// Deadline per call in milliseconds, retries included.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    timeout: u64,
    /// Retries on other providers after a retryable failure.
    #[arg(long, default_value_t = macula::config::DEFAULT_CALL_RETRIES)]
    retries: u32,
    /// Provider choice: round-robin, random, least-latency, weighted.
    #[arg(long, default_value = "round-robin")]
    strategy: String,
    /// Make this many calls, one after another, and print a summary.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Pause between calls with --count, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    interval: u64,
    /// Keep a persistent identity in DIR (a grant names it); default: a
    /// fresh identity.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub(crate) mesh: MeshArgs,
    #[command(flatten)]
    mode: ModeArgs,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("answer").required(true).args(["echo", "reply"])))]
pub struct ServeArgs {
    /// Procedure name to advertise.
    procedure: String,
    /// Answer every request with its own payload.
    #[arg(long)]
    echo: bool,
    /// Answer every request with DATA.
    #[arg(long, value_name = "DATA")]
    reply: Option<String>,
    /// Wait this long before answering (for demos and tests).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay: u64,
    /// Weight for weighted load balancing.
    #[arg(long, default_value_t = macula::config::DEFAULT_WEIGHT)]
    weight: u32,
    /// Requests served at once; more get `overloaded`.
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// Keep a persistent identity in DIR (a restarted server is the same
    /// provider); default: a fresh identity.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on with --full-node (it goes into the
    /// advertisement); a client dials from it.
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    #[command(flatten)]
    pub(crate) mesh: MeshArgs,
    #[command(flatten)]
    mode: ModeArgs,
}

/// How `call` ended.
pub enum CallOutcome {
    Ok,
    /// Some call failed; the message names the error kind.
    Failed(String),
}

pub async fn call(a: CallArgs) -> anyhow::Result<CallOutcome> {
    anyhow::ensure!(
        (1..=MAX_CALLS).contains(&a.count),
        "--count must be between 1 and {MAX_CALLS}"
    );
    anyhow::ensure!(a.timeout > 0, "--timeout must be positive");
    let strategy: Strategy = a.strategy.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    macula::names::validate_procedure(&a.procedure)
        .map_err(|e| anyhow::anyhow!("invalid procedure {:?}: {e}", a.procedure))?;
    let node = Member::start(&a.mesh, &a.mode, a.data_dir.clone(), None).await?;
    let result = calls(&node, &a, strategy).await;
    node.shutdown().await;
    result
}

async fn calls(node: &Member, a: &CallArgs, strategy: Strategy) -> anyhow::Result<CallOutcome> {
    let payload = Bytes::from(a.data.clone().into_bytes());
    let mut out = std::io::stdout().lock();
    let mut by_provider: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut last_error = None;
    let mut latencies = Vec::with_capacity(a.count.min(100_000) as usize);
    let interrupted = crate::bench::interrupted();
    tokio::pin!(interrupted);
    for i in 0..a.count {
        if i > 0 && a.interval > 0 {
            tokio::time::sleep(Duration::from_millis(a.interval)).await;
        }
        let started = Instant::now();
        let res = tokio::select! {
            r = node
                .call(&a.procedure, payload.clone())
                .timeout(Duration::from_millis(a.timeout))
                .retries(a.retries)
                .strategy(strategy) => r,
            _ = &mut interrupted => break,
        };
        let us = started.elapsed().as_micros() as u64;
        match res {
            Ok(r) => {
                latencies.push(us);
                *by_provider.entry(r.provider.to_string()).or_default() += 1;
                if a.mesh.json {
                    let v = serde_json::json!({
                        "ok": true,
                        "reply": String::from_utf8_lossy(&r.payload),
                        "provider": r.provider.to_string(),
                        "attempts": r.attempts,
                        "latency_us": us,
                    });
                    writeln!(out, "{v}")?;
                } else if a.count == 1 {
                    writeln!(out, "{}", String::from_utf8_lossy(&r.payload))?;
                }
            }
            Err(e) => {
                // The RPC kind as the CLI has always printed it (`timeout`).
                let kind = e.as_rpc().map_or(e.kind(), macula::RpcError::kind);
                *errors.entry(kind).or_default() += 1;
                if a.mesh.json {
                    let v = serde_json::json!({
                        "ok": false,
                        "error": kind,
                        "message": e.to_string(),
                    });
                    writeln!(out, "{v}")?;
                }
                last_error = Some(format!("{kind}: {e}"));
            }
        }
        out.flush()?;
    }
    if a.count > 1 {
        latencies.sort_unstable();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let ok: u64 = by_provider.values().sum();
        let failed: u64 = errors.values().sum();
        if a.mesh.json {
            let v = serde_json::json!({
                "summary": true,
                "calls": ok + failed,
                "ok": ok,
                "failed": failed,
                "errors": errors,
                "by_provider": by_provider,
                "p50_us": pct(0.5),
                "p99_us": pct(0.99),
            });
            writeln!(out, "{v}")?;
        } else {
            writeln!(
                out,
                "{} calls: {ok} ok, {failed} failed; p50 {} us, p99 {} us",
                ok + failed,
                pct(0.5),
                pct(0.99)
            )?;
            for (p, n) in &by_provider {
                writeln!(out, "  {p}\t{n}")?;
            }
            for (k, n) in &errors {
                writeln!(out, "  error {k}\t{n}")?;
            }
        }
    }
    Ok(match last_error {
        None => CallOutcome::Ok,
        Some(e) => CallOutcome::Failed(e),
    })
}

pub async fn serve(
    a: ServeArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    macula::names::validate_procedure(&a.procedure)
        .map_err(|e| anyhow::anyhow!("invalid procedure {:?}: {e}", a.procedure))?;
    let node = Member::start(&a.mesh, &a.mode, a.data_dir.clone(), Some(a.listen)).await?;
    let reply = a.reply.clone().map(|r| Bytes::from(r.into_bytes()));
    let delay = Duration::from_millis(a.delay);
    let handler = move |req: Request| {
        let reply = reply.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<Bytes, HandlerError>(reply.unwrap_or(req.payload))
        }
    };
    let opts = AdvertiseOptions {
        weight: Some(a.weight),
        max_concurrent: a.max_concurrent,
        ..Default::default()
    };
    let reg = match node.advertise_with(&a.procedure, opts, handler).await {
        Ok(r) => r,
        Err(e) => {
            node.shutdown().await;
            return Err(e).context("advertise failed");
        }
    };
    eprintln!("serving {} as {}", a.procedure, node.id());
    stop.await;
    // Graceful: withdraw, let requests in progress finish, say goodbye.
    let withdrawn = reg.withdraw().await;
    node.shutdown().await;
    withdrawn.context("withdrawing the advertisement failed")?;
    Ok(())
}
