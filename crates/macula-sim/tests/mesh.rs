//! The whole-mesh simulation in the normal test suite: 200 nodes running
//! their real DHT, pub/sub and RPC cores through crashes, restarts, a
//! partition, loss, duplicates and reordering, for three seeds; and
//! deliberately injected safety violations (a forged record, a replayed
//! publish) that must be caught and reported with their seed.
//! `MACULA_SIM_SEED=<seed>` replays one seed.

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

/// One seed of the fault scenario at 200 nodes (a test per seed, so they
/// run in parallel and each stays well under a minute).
fn survives_faults(default_seed: u64, test: &str) {
    for seed in seeds(&[default_seed]) {
        let s = scenario(seed, test);
        match run_mesh(&s) {
            Ok(report) => {
                // Visible with `cargo test -- --nocapture`.
                println!("{report}");
                let c = &report.counters;
                assert!(report.n_crashed >= 5, "seed {seed}: {report}");
                assert!(report.n_restarted >= 2, "seed {seed}: {report}");
                assert_eq!(report.n_partitioned, 40, "seed {seed}: {report}");
                assert!(report.n_interest_checked > 0, "seed {seed}: {report}");
                assert!(report.n_providers_checked > 0, "seed {seed}: {report}");
                assert!(report.n_delivery_checked > 0, "seed {seed}: {report}");
                assert!(report.n_calls_checked > 0, "seed {seed}: {report}");
                assert!(c.messages_duplicated > 0, "seed {seed}");
                assert!(c.messages_partitioned > 0, "seed {seed}");
                // The cores really ran: messages published and delivered,
                // calls answered, handlers run (each checked on its step).
                assert!(
                    c.published > 100 && c.deliveries > 100,
                    "seed {seed}: {report}"
                );
                assert!(
                    c.calls_ok > 50 && c.handler_runs > 50,
                    "seed {seed}: {report}"
                );
            }
            Err(failure) => panic!("{failure}"),
        }
    }
}

#[test]
fn mesh_survives_faults_seed_1() {
    survives_faults(1, "mesh_survives_faults_seed_1");
}

#[test]
fn mesh_survives_faults_seed_2() {
    survives_faults(2, "mesh_survives_faults_seed_2");
}

#[test]
fn mesh_survives_faults_seed_3() {
    survives_faults(3, "mesh_survives_faults_seed_3");
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

/// Three nodes on a lossless network: 0 subscribes, 1 and 2 publish, then a
/// peer replays 1's first message to 0. An honest core drops the copy; a
/// core whose dedup remembers one publisher (`Sim::break_dedup`) delivers
/// it again, and the per-step delivery check must stop the run there, with
/// its seed.
fn replay_a_publish(seed: u64, broken: bool) -> Option<macula_sim::Failure> {
    use macula_sim::node::Frame;
    use macula_sim::pubsub::PubSubMsg;
    use macula_sim::{Millis, NetConfig, OnViolation, Sim};

    let mut sim = Sim::new(NetConfig::lossless(Millis(5), Millis(20)), seed);
    sim.set_on_violation(OnViolation::Stop);
    sim.set_replay(format!(
        "MACULA_SIM_SEED={seed} cargo test -p macula-sim --test mesh -- a_replayed_publish"
    ));
    for _ in 0..3 {
        sim.add_node(macula_dht::Config::default());
    }
    if broken {
        sim.break_dedup(0);
    }
    sim.schedule_start(0, &[], Millis::ZERO);
    sim.schedule_start(1, &[0], Millis(10));
    sim.schedule_start(2, &[0], Millis(20));
    sim.run_until(Millis(5_000));
    sim.subscribe(0, "orders.*").expect("subscribe");
    sim.run_until(Millis(10_000));
    sim.set_app_log(true);
    sim.publish(1, "orders.new", b"first");
    sim.run_until(Millis(15_000));
    sim.publish(2, "orders.new", b"other");
    sim.run_until(Millis(20_000));
    let published = sim.take_publishes();
    assert_eq!(published.len(), 2, "{published:?}");
    assert_eq!(sim.take_deliveries().len(), 2, "both delivered once");
    // The copy: 1's first message, as its data stream carried it.
    let (_, topic, epoch, seq) = &published[0];
    let mut buf = Vec::new();
    let item = macula_wire::BatchItem {
        seq: *seq,
        topic_index: 0,
        payload: b"first",
        headers: &[],
        message_id: None,
    };
    macula_wire::encode_batch_frame(
        &mut buf,
        macula_wire::DEFAULT_MAX_FRAME_SIZE,
        &sim.id(1),
        *epoch,
        &[topic.as_str()],
        std::iter::once(item),
    )
    .expect("encode");
    let body = bytes::Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..]);
    sim.inject_frame(1, 0, Frame::PubSub(PubSubMsg::Batch(body)));
    sim.run_until(Millis(25_000));
    sim.failure().cloned()
}

#[test]
fn a_replayed_publish_is_dropped_or_caught_with_its_seed() {
    for seed in seeds(&[9]) {
        assert_eq!(replay_a_publish(seed, false), None, "honest dedup drops it");
        let failure = replay_a_publish(seed, true).expect("the duplicate must be caught");
        assert!(
            matches!(
                *failure.violation,
                Violation::DuplicateDelivery { node: 0, .. }
            ),
            "{failure}"
        );
        let text = failure.to_string();
        assert!(text.contains(&format!("seed {seed}")), "{text}");
        assert!(text.contains("replay: MACULA_SIM_SEED="), "{text}");
    }
}

/// Without faults the cores must do everything asked of them: every call
/// answered, every publish of the liveness phase delivered.
#[test]
fn without_faults_every_call_is_answered() {
    for seed in seeds(&[4]) {
        let mut s = scenario(seed, "without_faults_every_call_is_answered");
        s.n_nodes = 60;
        s.n_subscribers = 15;
        s.n_providers = 6;
        s.n_probes = 0;
        s.crash_percent = 0;
        s.partition_percent = 0;
        s.calm = macula_sim::NetConfig::lossless(macula_sim::Millis(5), macula_sim::Millis(50));
        s.faulty = s.calm.clone();
        let report = run_mesh(&s).unwrap_or_else(|f| panic!("{f}"));
        let c = &report.counters;
        assert!(
            c.calls > 0 && c.published > 0 && c.deliveries > 0,
            "{report}"
        );
        assert_eq!(c.calls_failed, 0, "seed {seed}: {report}");
        assert_eq!(c.calls_ok, c.calls, "seed {seed}: {report}");
    }
}
