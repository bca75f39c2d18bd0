//! The simulator at scale, printing the figures that go into BENCHMARKS.md.
//!
//! `cargo bench -p macula-sim --bench sim -- [--nodes N] [--seed S] [--json]`
//! runs the fault scenario (`macula_sim::mesh`: the DHT, pub/sub and RPC
//! cores of every node; safety under faults, then liveness after the heal)
//! on N nodes (1,000 by default, about 15 s; 10,000 takes about an hour and
//! 9 GB, see BENCHMARKS.md), and prints nodes, simulated seconds, wall
//! time and the messages checked (deliveries, calls, handler runs).
//! `... -- --dht-only [--nodes N] [--seed S] [--loss P] [--json]` runs the
//! DHT experiment (`macula_sim::dht`, the figures of the former
//! `cargo bench -p macula-dht --bench sim`).
//! `--subscribers N` and `--providers N` override the scenario's counts
//! (past 32 under one name, the liveness check fails: see the crate docs);
//! `--max-connections N` every node's pool size (1,000 by default).
//!
//! Figures are in simulated time, so they do not depend on the machine; the
//! wall time printed last does. A failure prints its seed and the command
//! that replays it, and the bench exits with status 1.

use std::time::Instant;

use macula_sim::dht::{run, Scenario};
use macula_sim::mesh::{run_mesh_report, MeshReport, MeshScenario};

struct Args {
    nodes: usize,
    seed: u64,
    json: bool,
    dht_only: bool,
    loss: Option<f64>,
    subscribers: Option<usize>,
    providers: Option<usize>,
    max_connections: Option<usize>,
}

fn parse() -> Args {
    let mut a = Args {
        nodes: 1_000,
        seed: 1,
        json: false,
        dht_only: false,
        loss: None,
        subscribers: None,
        providers: None,
        max_connections: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(x) = args.next() {
        match x.as_str() {
            "--nodes" => a.nodes = args.next().and_then(|v| v.parse().ok()).unwrap_or(a.nodes),
            "--seed" => a.seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(a.seed),
            "--json" => a.json = true,
            "--dht-only" => a.dht_only = true,
            "--loss" => a.loss = args.next().and_then(|v| v.parse().ok()),
            "--subscribers" => a.subscribers = args.next().and_then(|v| v.parse().ok()),
            "--providers" => a.providers = args.next().and_then(|v| v.parse().ok()),
            "--max-connections" => a.max_connections = args.next().and_then(|v| v.parse().ok()),
            // `cargo bench` passes `--bench`; ignore it and anything unknown.
            _ => {}
        }
    }
    a
}

fn main() {
    // Progress (phases of the run) on stderr; `RUST_LOG=warn` silences it.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let a = parse();
    if a.dht_only {
        let mut scenario = Scenario::new(a.nodes, a.seed);
        if let Some(loss) = a.loss {
            scenario.net.loss = loss;
        }
        let started = Instant::now();
        let report = run(&scenario);
        let wall = started.elapsed();
        if a.json {
            println!("{}", report.to_json());
        } else {
            println!("{report}");
        }
        println!("wall time: {:.1}s", wall.as_secs_f64());
        return;
    }
    let mut s = MeshScenario::new(a.nodes, a.seed);
    if let Some(loss) = a.loss {
        s.calm.loss = loss;
    }
    if let Some(n) = a.subscribers {
        s.n_subscribers = n;
    }
    if let Some(n) = a.providers {
        s.n_providers = n;
    }
    if let Some(n) = a.max_connections {
        s.calm.max_connections = n;
        s.faulty.max_connections = n;
    }
    let mut replay = format!(
        "cargo bench -p macula-sim --bench sim -- --nodes {} --seed {}",
        a.nodes, a.seed
    );
    for (flag, v) in [
        ("--loss", a.loss.map(|l| l.to_string())),
        ("--subscribers", a.subscribers.map(|n| n.to_string())),
        ("--providers", a.providers.map(|n| n.to_string())),
        (
            "--max-connections",
            a.max_connections.map(|n| n.to_string()),
        ),
    ] {
        if let Some(v) = v {
            replay.push_str(&format!(" {flag} {v}"));
        }
    }
    s.replay = replay;
    let started = Instant::now();
    let (report, failure) = run_mesh_report(&s);
    let wall = started.elapsed().as_secs_f64();
    if a.json {
        println!("{}", json(&report, wall, failure.is_some()));
    } else {
        println!("{report}");
    }
    match &failure {
        None => println!("failures: none"),
        Some(f) => println!("failures: {f}"),
    }
    if !a.json {
        let c = &report.counters;
        println!(
            "figures: nodes={} simulated={:.1}s wall={wall:.1}s messages checked: {} deliveries ({} published), {} calls ({} answered), {} handler runs, {} frames, {} safety checks",
            report.n_nodes,
            report.sim_end.0 as f64 / 1000.0,
            c.deliveries,
            c.published,
            c.calls,
            c.calls_ok,
            c.handler_runs,
            c.frames_delivered,
            c.checks
        );
    }
    println!("wall time: {wall:.1}s");
    if failure.is_some() {
        std::process::exit(1);
    }
}

fn json(r: &MeshReport, wall: f64, failed: bool) -> String {
    format!(
        "{{\"seed\":{},\"nodes\":{},\"simulated_s\":{:.1},\"wall_s\":{:.1},\"frames_checked\":{},\"safety_checks\":{},\"crashed\":{},\"restarted\":{},\"partitioned\":{},\"faults_lookup_success\":{:.6},\"faults_rounds_median\":{},\"faults_rounds_p99\":{},\"healed_lookup_success\":{:.6},\"healed_rounds_median\":{},\"healed_rounds_p99\":{},\"not_found\":{},\"interest_pairs\":{},\"interest_missing\":{},\"provider_pairs\":{},\"providers_missing\":{},\"published\":{},\"deliveries\":{},\"calls\":{},\"calls_ok\":{},\"calls_failed\":{},\"handler_runs\":{},\"delivery_pairs\":{},\"delivery_missing\":{},\"calls_checked\":{},\"calls_missing\":{},\"failed\":{}}}",
        r.seed,
        r.n_nodes,
        r.sim_end.0 as f64 / 1000.0,
        wall,
        r.counters.frames_delivered,
        r.counters.checks,
        r.n_crashed,
        r.n_restarted,
        r.n_partitioned,
        r.probes.success_rate(),
        r.probes.rounds.median,
        r.probes.rounds.p99,
        r.coverage.success_rate(),
        r.coverage.rounds.median,
        r.coverage.rounds.p99,
        r.n_not_found,
        r.n_interest_checked,
        r.n_interest_missing,
        r.n_providers_checked,
        r.n_providers_missing,
        r.counters.published,
        r.counters.deliveries,
        r.counters.calls,
        r.counters.calls_ok,
        r.counters.calls_failed,
        r.counters.handler_runs,
        r.n_delivery_checked,
        r.n_delivery_missing,
        r.n_calls_checked,
        r.n_calls_missing,
        failed,
    )
}
