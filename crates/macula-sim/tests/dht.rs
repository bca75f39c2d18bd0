//! The DHT experiment in the normal test suite: 1,000 nodes must meet the
//! product targets, and a run must replay exactly from its seed. (10,000 nodes
//! run in `benches/sim.rs`.) Every assertion message carries the seed.

use macula_sim::dht::{run, Scenario};
use macula_sim::Millis;

#[test]
fn thousand_node_mesh_meets_the_targets() {
    let seed = 1;
    let report = run(&Scenario::new(1_000, seed));
    // Visible with `cargo test -- --nocapture`.
    println!("{report}");
    let ctx = format!("replay with seed {seed}:\n{report}");
    assert!(
        report
            .converged_at
            .is_some_and(|t| t < Millis::from_secs(30)),
        "convergence: {ctx}"
    );
    let l = &report.lookups;
    // 99.8%, not the 99.9% of the connectionless model this replaced (seed
    // 1: 4 of 2,000; each failure is a target that answered neither
    // attempt). Connections are modelled now: a first contact waits for a
    // handshake, and a lost handshake packet costs QUIC's 1 s probe
    // timeout, as long as the DHT's request timeout.
    assert!(l.success_rate() >= 0.998, "success: {ctx}");
    assert!(l.rounds.median <= 4, "median rounds: {ctx}");
    assert!(l.rounds.p99 <= 6, "p99 rounds: {ctx}");
    assert_eq!(report.n_killed, 100, "{ctx}");
    assert!(
        report.after_kill.success_rate() >= 0.99,
        "after kill: {ctx}"
    );
}

#[test]
fn a_run_replays_exactly_from_its_seed() {
    let mut scenario = Scenario::new(150, 7);
    scenario.n_lookups = 200;
    scenario.churn_percent_per_min = 10;
    let a = run(&scenario);
    let b = run(&scenario);
    assert_eq!(a, b, "seed 7 did not replay");
    scenario.seed = 8;
    let c = run(&scenario);
    assert_ne!(
        a.counters, c.counters,
        "different seeds gave identical runs"
    );
}
