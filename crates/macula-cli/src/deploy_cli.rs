//! `macula deploy` and `macula upgrade`: WebAssembly workloads across the
//! mesh (issue 25; docs/WASM.md), through a node's admin API
//! (`/admin/workloads`, served by its workload agent).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use macula_wasm::agent::{AppReport, DeployReport, DeployRequest};
use macula_wasm::artifact::Manifest;
use macula_wasm::rollout::{Phase, Placement, Rollout, Strategy, UpgradeRequest};

use crate::admin_cli::{write_table, ReadArgs, Target};
use crate::raft_cli::{encode, print_json, refused, send};
use crate::{usage, Failure};

/// Time one admin request of these commands may take (a deploy may found
/// the workloads group and wait for its first leader).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// The app's name (1 to 64 of A-Z a-z 0-9 . _ -).
    app: String,
    /// The version's name (same characters).
    #[arg(value_name = "VERSION")]
    release: String,
    /// The component file (.wasm).
    file: PathBuf,
    /// Configuration handed to the component's init, KEY=VALUE
    /// (repeatable); carried to later versions, whose own keys win.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// A first deployment runs on this many nodes (default: every node
    /// with a workload agent that matches --label).
    #[arg(long, value_name = "N")]
    replicas: Option<u32>,
    /// A first deployment runs only on nodes with this label (repeatable;
    /// nodes get labels with `macula start --label`).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Refuse the file unless its BLAKE3 hash is this (hex).
    #[arg(long, value_name = "HEX")]
    blake3: Option<String>,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct WaitArgs {
    /// Wait until the rollout ends (or pauses); exit 1 unless it completed
    /// (or paused, for a canary).
    #[arg(long)]
    wait: bool,
    /// Longest wait with --wait.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::config::parse_duration)]
    wait_timeout: Duration,
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct UpgradeCommand {
    #[command(subcommand)]
    sub: Option<UpgradeSub>,
    /// The app to upgrade.
    app: Option<String>,
    /// The deployed version to roll out (`macula deploy APP VERSION FILE`).
    #[arg(value_name = "VERSION")]
    release: Option<String>,
    /// rolling (batch after batch), canary (a first batch, then a pause
    /// until `promote` or `abort`) or all-at-once.
    #[arg(long, default_value = "rolling")]
    strategy: String,
    /// Nodes per batch.
    #[arg(long, value_name = "N", default_value_t = 1)]
    batch_size: u32,
    /// A procedure called on each upgraded node after its batch; an error
    /// or no answer fails the batch.
    #[arg(long, value_name = "PROC")]
    health_check: Option<String>,
    /// Roll every upgraded node back when a batch fails (otherwise the
    /// rollout stops where it is, recorded as failed).
    #[arg(long)]
    rollback_on_fail: bool,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(clap::Subcommand, Debug)]
enum UpgradeSub {
    /// Apps, the version each node runs, and their last rollout.
    Status(StatusArgs),
    /// The ended rollouts of an app (the audit record).
    History(AppArgs),
    /// A paused canary goes on to the remaining batches.
    Promote(ActArgs),
    /// A running or paused rollout rolls back.
    Abort(ActArgs),
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// One app (default: all).
    app: Option<String>,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(clap::Args, Debug)]
struct AppArgs {
    app: String,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(clap::Args, Debug)]
struct ActArgs {
    app: String,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    read: ReadArgs,
}

fn pairs(flag: &str, items: &[String]) -> Result<Vec<(String, String)>, Failure> {
    items
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| usage(anyhow!("{flag} {p:?}: expected KEY=VALUE")))
        })
        .collect()
}

fn app_path(app: &str, what: &str) -> String {
    let base = format!("/admin/workloads/apps/{}", encode(app.as_bytes()));
    if what.is_empty() {
        base
    } else {
        format!("{base}/{what}")
    }
}

/// `method path` with a body; the answer's body if 200 or 201.
fn request(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Result<String, Failure> {
    let reply = send(target, method, path, body, REQUEST_TIMEOUT)?;
    if reply.status != 200 && reply.status != 201 {
        return Err(refused(target, method, path, &reply));
    }
    Ok(reply.body)
}

fn post<T: serde::Serialize>(target: &Target, path: &str, body: &T) -> Result<String, Failure> {
    let json = serde_json::to_vec(body)?;
    request(target, "POST", path, Some(("application/json", &json)))
}

/// Runs `macula deploy`.
pub fn deploy(a: DeployArgs) -> Result<(), Failure> {
    let config = pairs("--config", &a.config)?;
    let labels = pairs("--label", &a.labels)?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    if let Some(want) = &a.blake3 {
        if !want.eq_ignore_ascii_case(&hash) {
            return Err(anyhow!(
                "{} refused: its BLAKE3 hash is {hash}, expected {want}",
                a.file.display()
            )
            .into());
        }
    }
    let target = Target::of(&a.read)?;
    let body = request(
        &target,
        "PUT",
        "/admin/workloads/artifacts",
        Some(("application/wasm", &bytes)),
    )?;
    let manifest: Manifest = target.decode("/admin/workloads/artifacts", &body)?;
    if manifest.hash != hash {
        return Err(anyhow!(
            "the node stored {} for a file whose hash is {hash}: refused",
            manifest.hash
        )
        .into());
    }
    let req = DeployRequest {
        version: a.release.clone(),
        hash,
        config,
        placement: Placement {
            replicas: a.replicas,
            labels: labels.into_iter().collect(),
        },
    };
    let path = app_path(&a.app, "deploy");
    let body = post(&target, &path, &req)?;
    let report: DeployReport = target.decode(&path, &body)?;
    if a.read.json && !a.wait.wait {
        return print_json(&body);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "deployed {} {} (artifact {}, {} bytes)",
        report.app, report.version, report.hash, report.size
    )?;
    match &report.rollout {
        Some(r) => writeln!(
            out,
            "rollout {}: {} nodes, all at once",
            r.id,
            r.batches.iter().map(Vec::len).sum::<usize>()
        )?,
        None => writeln!(
            out,
            "{} already runs; roll this version out with: macula upgrade {} {}",
            report.app, report.app, report.version
        )?,
    }
    drop(out);
    if a.wait.wait && report.rollout.is_some() {
        return wait_for(&target, &a.app, &a.wait, a.read.json);
    }
    Ok(())
}

/// Runs `macula upgrade ...`.
pub fn upgrade(c: UpgradeCommand) -> Result<(), Failure> {
    match c.sub {
        Some(UpgradeSub::Status(s)) => status(&s),
        Some(UpgradeSub::History(h)) => history(&h),
        Some(UpgradeSub::Promote(p)) => act(&p, "promote"),
        Some(UpgradeSub::Abort(p)) => act(&p, "abort"),
        None => {
            let (Some(app), Some(version)) = (c.app, c.release) else {
                return Err(usage(anyhow!(
                    "usage: macula upgrade APP VERSION [--strategy ...] (or status, history, promote, abort)"
                )));
            };
            let strategy = Strategy::parse(&c.strategy).map_err(|e| usage(anyhow!(e)))?;
            if c.batch_size == 0 {
                return Err(usage(anyhow!("--batch-size must be at least 1")));
            }
            let req = UpgradeRequest {
                version,
                strategy,
                batch_size: c.batch_size,
                health_check: c.health_check,
                rollback_on_fail: c.rollback_on_fail,
            };
            let target = Target::of(&c.read)?;
            let path = app_path(&app, "upgrade");
            let body = post(&target, &path, &req)?;
            let r: Rollout = target.decode(&path, &body)?;
            if c.read.json && !c.wait.wait {
                return print_json(&body);
            }
            println!(
                "rollout {} of {}: {} -> {}, {}, {} batches",
                r.id,
                r.app,
                r.from.as_deref().unwrap_or("nothing"),
                r.to,
                r.strategy.as_str(),
                r.batches.len()
            );
            if c.wait.wait {
                return wait_for(&target, &app, &c.wait, c.read.json);
            }
            Ok(())
        }
    }
}

fn act(a: &ActArgs, what: &str) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let path = app_path(&a.app, what);
    let body = request(&target, "POST", &path, None)?;
    let r: Rollout = target.decode(&path, &body)?;
    if a.read.json && !a.wait.wait {
        return print_json(&body);
    }
    println!("rollout {} of {}: {}", r.id, r.app, r.phase.as_str());
    if a.wait.wait {
        return wait_for(&target, &a.app, &a.wait, a.read.json);
    }
    Ok(())
}

/// Polls the app until its rollout ends or pauses; exit 1 unless it
/// completed (or paused).
fn wait_for(target: &Target, app: &str, w: &WaitArgs, json: bool) -> Result<(), Failure> {
    let path = app_path(app, "");
    let deadline = Instant::now() + w.wait_timeout;
    loop {
        let body = request(target, "GET", &path, None)?;
        let report: AppReport = target.decode(&path, &body)?;
        if let Some(r) = &report.rollout {
            if !r.phase.is_active() {
                if json {
                    print_json(&body)?;
                } else {
                    println!(
                        "rollout {} of {}: {}{}",
                        r.id,
                        r.app,
                        r.phase.as_str(),
                        if r.detail.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", r.detail)
                        }
                    );
                }
                return match r.phase {
                    Phase::Completed | Phase::Paused => Ok(()),
                    other => Err(anyhow!(
                        "rollout {} of {app} ended {}: {}",
                        r.id,
                        other.as_str(),
                        r.detail
                    )
                    .into()),
                };
            }
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "rollout of {app} still in progress after {:?} (macula upgrade status {app})",
                w.wait_timeout
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn status(s: &StatusArgs) -> Result<(), Failure> {
    let target = Target::of(&s.read)?;
    let path = match &s.app {
        Some(app) => app_path(app, ""),
        None => "/admin/workloads".to_string(),
    };
    let body = request(&target, "GET", &path, None)?;
    if s.read.json {
        return print_json(&body);
    }
    let reports: Vec<AppReport> = if s.app.is_some() {
        vec![target.decode(&path, &body)?]
    } else {
        target.decode(&path, &body)?
    };
    let mut out = std::io::stdout().lock();
    let mut rows = Vec::new();
    for r in &reports {
        let mut by_version: std::collections::BTreeMap<&str, usize> = Default::default();
        for v in r.spec.nodes.values() {
            *by_version.entry(v.as_str()).or_default() += 1;
        }
        let nodes = by_version
            .iter()
            .map(|(v, n)| format!("{n} on {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rollout = r.rollout.as_ref().map_or("-".to_string(), |ro| {
            format!(
                "{} {} -> {} {} ({}/{} batches)",
                ro.id,
                ro.from.as_deref().unwrap_or("nothing"),
                ro.to,
                ro.phase.as_str(),
                ro.done,
                ro.batches.len()
            )
        });
        rows.push([
            r.spec.app.clone(),
            r.spec.version.clone().unwrap_or_else(|| "-".into()),
            nodes,
            r.versions.join(","),
            rollout,
        ]);
    }
    write_table(
        &mut out,
        &[
            "APP".into(),
            "VERSION".into(),
            "NODES".into(),
            "DEPLOYED".into(),
            "LAST ROLLOUT".into(),
        ],
        &rows,
    )?;
    Ok(())
}

fn history(h: &AppArgs) -> Result<(), Failure> {
    let target = Target::of(&h.read)?;
    let path = app_path(&h.app, "history");
    let body = request(&target, "GET", &path, None)?;
    if h.read.json {
        return print_json(&body);
    }
    let items: Vec<Rollout> = target.decode(&path, &body)?;
    let mut out = std::io::stdout().lock();
    let rows: Vec<[String; 7]> = items
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.from.clone().unwrap_or_else(|| "-".into()),
                r.to.clone(),
                r.strategy.as_str().to_string(),
                r.phase.as_str().to_string(),
                crate::text::rfc3339(Duration::from_millis(r.started_ms)),
                r.ended_ms.map_or("-".to_string(), |e| {
                    format!("{:.1}s", e.saturating_sub(r.started_ms) as f64 / 1000.0)
                }),
            ]
        })
        .collect();
    write_table(
        &mut out,
        &[
            "ID".into(),
            "FROM".into(),
            "TO".into(),
            "STRATEGY".into(),
            "OUTCOME".into(),
            "STARTED".into(),
            "TOOK".into(),
        ],
        &rows,
    )?;
    for r in items.iter().filter(|r| !r.detail.is_empty()) {
        writeln!(out, "{}: {}", r.id, r.detail)?;
    }
    Ok(())
}
