//! The whole-mesh simulation in the normal test suite: 200 nodes through
//! crashes, restarts, a partition, loss, duplicates and reordering, for a few
//! seeds; and a deliberately injected safety violation that must be caught
//! and reported with its seed. `MACULA_SIM_SEED=<seed>` replays one seed.

use macula_sim::mesh::{run_mesh, Forgery, MeshScenario};
use macula_sim::Violation;

/// The seeds to run: `MACULA_SIM_SEED` if set (replaying a failure), else
/// `default`.
fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("MACULA_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MACULA_SIM_SEED must be a number")],
        Err(_) => default.to_vec(),
    }
}

fn scenario(seed: u64, test: &str) -> MeshScenario {
    let mut s = MeshScenario::new(200, seed);
    s.replay =
        format!("MACULA_SIM_SEED={seed} cargo test -p macula-sim --test mesh -- {test} --exact");
    s
}

#[test]
fn mesh_survives_faults() {
    for seed in seeds(&[1, 2, 3]) {
        let s = scenario(seed, "mesh_survives_faults");
        match run_mesh(&s) {
            Ok(report) => {
                // Visible with `cargo test -- --nocapture`.
                println!("{report}");
                assert!(report.n_crashed >= 5, "seed {seed}: {report}");
                assert!(report.n_restarted >= 2, "seed {seed}: {report}");
                assert_eq!(report.n_partitioned, 40, "seed {seed}: {report}");
                assert!(report.n_interest_checked > 0, "seed {seed}: {report}");
                assert!(report.n_providers_checked > 0, "seed {seed}: {report}");
                assert!(report.counters.messages_duplicated > 0, "seed {seed}");
                assert!(report.counters.messages_partitioned > 0, "seed {seed}");
            }
            Err(failure) => panic!("{failure}"),
        }
    }
}

#[test]
fn a_run_replays_bit_for_bit() {
    let mut s = scenario(11, "a_run_replays_bit_for_bit");
    s.n_nodes = 60;
    s.n_subscribers = 15;
    s.n_providers = 6;
    s.n_probes = 60;
    let a = run_mesh(&s).expect("seed 11 passes");
    let b = run_mesh(&s).expect("seed 11 passes");
    assert_eq!(a, b, "seed 11 did not replay");
    s.seed = 12;
    let c = run_mesh(&s).expect("seed 12 passes");
    assert_ne!(
        a.counters, c.counters,
        "different seeds gave identical runs"
    );
}

#[test]
fn an_injected_forgery_is_caught_with_its_seed() {
    for seed in seeds(&[5]) {
        // Node 7 accepts any record; a peer sends it a forged one.
        let mut s = scenario(seed, "an_injected_forgery_is_caught_with_its_seed");
        s.inject_forgery = Some(Forgery {
            victim: 7,
            broken_verifier: true,
        });
        s.crash_percent = 0;
        let failure = run_mesh(&s).expect_err("the forged record must be caught");
        assert!(
            matches!(
                *failure.violation,
                Violation::RecordDoesNotVerify { node: 7, .. }
            ),
            "{failure}"
        );
        let text = failure.to_string();
        assert!(text.contains(&format!("seed {seed}")), "{text}");
        assert!(
            text.contains(&format!("replay: MACULA_SIM_SEED={seed} cargo test")),
            "{text}"
        );
        // The same forgery against honest verifiers is refused: no failure.
        let mut honest = scenario(seed, "an_injected_forgery_is_caught_with_its_seed");
        honest.inject_forgery = Some(Forgery {
            victim: 7,
            broken_verifier: false,
        });
        honest.crash_percent = 0;
        let report = run_mesh(&honest).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(report.n_forged, 1, "seed {seed}: the forgery was sent");
    }
}
