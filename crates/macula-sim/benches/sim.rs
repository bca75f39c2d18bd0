//! The DHT simulation at scale (10,000 nodes by default), printing the figures
//! that go into BENCHMARKS.md.
//!
//! `cargo bench -p macula-dht --bench sim [-- [--nodes N] [--seed S] [--loss P] [--json]]`
//! Figures are in simulated time, so they do not depend on the machine; the
//! wall time printed last does.

use std::time::Instant;

use macula_sim::dht::{run, Scenario};

fn main() {
    let mut nodes = 10_000usize;
    let mut seed = 1u64;
    let mut json = false;
    let mut loss: Option<f64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => nodes = args.next().and_then(|v| v.parse().ok()).unwrap_or(nodes),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(seed),
            "--json" => json = true,
            "--loss" => loss = args.next().and_then(|v| v.parse().ok()),
            // `cargo bench` passes `--bench`; ignore it and anything unknown.
            _ => {}
        }
    }
    let mut scenario = Scenario::new(nodes, seed);
    if let Some(loss) = loss {
        scenario.net.loss = loss;
    }
    let started = Instant::now();
    let report = run(&scenario);
    let wall = started.elapsed();
    if json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    println!("wall time: {:.1}s", wall.as_secs_f64());
}
