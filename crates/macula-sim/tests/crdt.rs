//! CRDT replication in the simulator: every CRDT type converges under loss,
//! duplication and reordering; 20 replicas converge after a partition heals
//! to the join of both sides' updates (with the OR-set's add-wins outcome);
//! the 100-replica convergence figure. `MACULA_SIM_SEED=<seed>` replays one
//! seed.

use macula_crdt::{
    Crdt, CrdtError, GCounter, LwwElementSet, LwwMap, LwwRegister, Millis, OrSet, PnCounter,
    Timestamp,
};
use macula_sim::crdt::{measure_convergence, CrdtSim, CrdtSimConfig};
use macula_sim::{Latency, NetConfig};
use proptest::prelude::*;

fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("MACULA_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MACULA_SIM_SEED must be a number")],
        Err(_) => default.to_vec(),
    }
}

/// A bad network: a fifth of the frames lost, a tenth duplicated, almost a
/// third held back past later ones.
fn harsh(nodes: usize) -> CrdtSimConfig {
    let mut c = CrdtSimConfig::new(nodes);
    c.net = NetConfig {
        latency: Latency::Uniform {
            min: Millis(5),
            max: Millis(200),
        },
        loss: 0.2,
        duplicate: 0.1,
        reorder: 0.3,
        ..NetConfig::default()
    };
    c
}

/// `n` updates at random times in the next `window`, each on a random
/// replica of `replicas` (all when empty); `op` gets a random word.
fn churn<C, F>(sim: &mut CrdtSim<C>, replicas: &[usize], n: usize, window: Millis, mut op: F)
where
    C: Crdt,
    F: FnMut(u64, &mut C, Timestamp) -> Result<C, CrdtError>,
{
    let all: Vec<usize> = (0..sim.len()).collect();
    let replicas = if replicas.is_empty() { &all } else { replicas };
    let start = sim.now();
    let mut plan: Vec<(u64, usize, u64)> = (0..n)
        .map(|_| {
            let rng = sim.rng();
            let at = rng.below(window.0.max(1));
            let who = replicas[rng.below(replicas.len() as u64) as usize];
            (at, who, rng.next_u64())
        })
        .collect();
    plan.sort_unstable();
    for (at, i, word) in plan {
        let due = start.saturating_add(Millis(at));
        sim.run_for(due.saturating_sub(sim.now()));
        sim.update(i, |s, ts| op(word, s, ts))
            .expect("updates stay under the limits");
    }
}

/// Runs until converged and checks every replica against the join of
/// every update; returns the time it took.
fn assert_converges<C: Crdt>(sim: &mut CrdtSim<C>, limit: Millis, what: &str) -> Millis {
    let took = sim
        .run_until_converged(limit)
        .unwrap_or_else(|| panic!("{what}: not converged {limit} after the last update"));
    for i in 0..sim.len() {
        assert_eq!(sim.state(i), sim.expected(), "{what}: replica {i}");
    }
    assert_eq!(sim.stats().decode_errors, 0, "{what}");
    took
}

fn or_set_op(w: u64, s: &mut OrSet<u16>, ts: Timestamp) -> Result<OrSet<u16>, CrdtError> {
    let x = (w >> 8) as u16 % 24;
    match w % 3 {
        0 | 1 => s.add(ts.node, x),
        _ => Ok(s.remove(ts.node, &x)),
    }
}

fn converge_under_faults<C: Crdt>(
    seed: u64,
    what: &str,
    op: impl FnMut(u64, &mut C, Timestamp) -> Result<C, CrdtError>,
) {
    let mut sim = CrdtSim::<C>::new(seed, harsh(8));
    churn(&mut sim, &[], 150, Millis::from_secs(3), op);
    let what = format!("{what}, seed {seed} (replay: MACULA_SIM_SEED={seed})");
    let took = assert_converges(&mut sim, Millis::from_secs(60), &what);
    let st = sim.stats();
    assert!(
        st.lost > 0 && st.duplicated > 0,
        "{what}: faults injected: {st:?}"
    );
    // Anti-entropy did the repair work: deltas went out in answer to digests.
    let answers: u64 = (0..sim.len())
        .map(|i| sim.replica(i).stats().digests_received)
        .sum();
    assert!(answers > 0, "{what}");
    eprintln!("{what}: converged {took} after the last update; {st:?}");
}

#[test]
fn every_crdt_converges_under_loss_duplication_and_reordering() {
    for seed in seeds(&[1, 2, 3, 4, 5]) {
        converge_under_faults::<OrSet<u16>>(seed, "or-set", or_set_op);
        converge_under_faults::<LwwElementSet<u16>>(seed, "lww-element-set", |w, s, ts| {
            let x = (w >> 8) as u16 % 24;
            match w % 3 {
                0 | 1 => s.add(ts, x),
                _ => Ok(s.remove(ts, &x)),
            }
        });
        converge_under_faults::<LwwMap<u8, u32>>(seed, "lww-map", |w, s, ts| {
            let k = (w >> 8) as u8 % 16;
            match w % 3 {
                0 | 1 => s.insert(ts, k, (w >> 16) as u32),
                _ => Ok(s.remove(ts, &k)),
            }
        });
        converge_under_faults::<LwwRegister<u32>>(seed, "lww-register", |w, s, ts| {
            Ok(s.set(ts, w as u32))
        });
        converge_under_faults::<GCounter>(seed, "g-counter", |w, s, ts| {
            s.increment(ts.node, w % 5)
        });
        converge_under_faults::<PnCounter>(seed, "pn-counter", |w, s, ts| {
            if w % 2 == 0 {
                s.increment(ts.node, (w >> 8) % 7)
            } else {
                s.decrement(ts.node, (w >> 8) % 7)
            }
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any fault rates short of total loss: the OR-set still converges.
    #[test]
    fn or_set_converges_for_any_fault_rates(
        seed: u64,
        loss in 0.0f64..0.6,
        duplicate in 0.0f64..0.6,
        reorder in 0.0f64..1.0,
        nodes in 2usize..8,
    ) {
        let mut c = CrdtSimConfig::new(nodes);
        c.net.loss = loss;
        c.net.duplicate = duplicate;
        c.net.reorder = reorder;
        let mut sim = CrdtSim::<OrSet<u16>>::new(seed, c);
        churn(&mut sim, &[], 60, Millis::from_secs(2), or_set_op);
        prop_assert!(sim.run_until_converged(Millis::from_secs(120)).is_some());
        for i in 0..sim.len() {
            prop_assert_eq!(sim.state(i), sim.expected());
        }
    }
}

/// Checks, during a partition, that each side agreed within itself and
/// the two sides differ.
fn assert_sides_apart<C: Crdt>(sim: &CrdtSim<C>, a: &[usize], b: &[usize], what: &str) {
    for side in [a, b] {
        for &i in side {
            assert_eq!(sim.state(i), sim.state(side[0]), "{what}: replica {i}");
        }
    }
    assert_ne!(sim.state(a[0]), sim.state(b[0]), "{what}");
    assert!(!sim.converged(), "{what}");
}

#[test]
fn twenty_or_set_replicas_converge_after_a_partition_heals() {
    for seed in seeds(&[1, 2, 3]) {
        let what = format!("or-set, seed {seed} (replay: MACULA_SIM_SEED={seed})");
        let mut c = CrdtSimConfig::new(20);
        c.net.loss = 0.05;
        c.net.duplicate = 0.02;
        c.net.reorder = 0.1;
        let mut sim = CrdtSim::<OrSet<u32>>::new(seed, c);
        // Everyone learns 0..10.
        for x in 0..10u32 {
            sim.update(x as usize * 2, |s, ts| s.add(ts.node, x))
                .unwrap();
        }
        assert_converges(&mut sim, Millis::from_secs(30), &what);
        let a: Vec<usize> = (0..10).collect();
        let b: Vec<usize> = (10..20).collect();
        sim.partition(&[a.clone(), b.clone()]);
        // Side A removes 0..5 and adds 100..110; side B adds 0..3 again
        // (concurrently with A's removes), removes 5..8 and adds 200..210.
        for x in 0..5u32 {
            sim.update(x as usize, |s, ts| Ok(s.remove(ts.node, &x)))
                .unwrap();
        }
        for x in 0..3u32 {
            sim.update(10 + x as usize, |s, ts| s.add(ts.node, x))
                .unwrap();
        }
        for x in 5..8u32 {
            sim.update(15 + x as usize - 5, |s, ts| Ok(s.remove(ts.node, &x)))
                .unwrap();
        }
        for x in 0..10u32 {
            sim.update(x as usize, |s, ts| s.add(ts.node, 100 + x))
                .unwrap();
            sim.update(10 + x as usize, |s, ts| s.add(ts.node, 200 + x))
                .unwrap();
        }
        sim.run_for(Millis::from_secs(10));
        assert_sides_apart(&sim, &a, &b, &what);
        sim.heal();
        let took = assert_converges(&mut sim, Millis::from_secs(30), &what);
        eprintln!("{what}: 20 replicas converged {took} after the heal");
        let got: Vec<u32> = sim.state(0).iter().copied().collect();
        let want: Vec<u32> = (0..3)
            .chain(8..10)
            .chain(100..110)
            .chain(200..210)
            .collect();
        assert_eq!(got, want, "{what}: add wins over the concurrent remove");
    }
}

#[test]
fn twenty_replicas_of_every_lww_type_and_counter_converge_after_a_partition_heals() {
    fn run<C: Crdt>(
        seed: u64,
        what: &str,
        mut op: impl FnMut(u64, &mut C, Timestamp) -> Result<C, CrdtError>,
    ) {
        let what = format!("{what}, seed {seed} (replay: MACULA_SIM_SEED={seed})");
        let mut c = CrdtSimConfig::new(20);
        c.net.loss = 0.05;
        let mut sim = CrdtSim::<C>::new(seed, c);
        churn(&mut sim, &[], 40, Millis::from_secs(1), &mut op);
        assert_converges(&mut sim, Millis::from_secs(30), &what);
        let a: Vec<usize> = (0..10).collect();
        let b: Vec<usize> = (10..20).collect();
        sim.partition(&[a.clone(), b.clone()]);
        churn(&mut sim, &a, 60, Millis::from_secs(3), &mut op);
        churn(&mut sim, &b, 60, Millis::from_secs(3), &mut op);
        sim.run_for(Millis::from_secs(10));
        assert_sides_apart(&sim, &a, &b, &what);
        sim.heal();
        let took = assert_converges(&mut sim, Millis::from_secs(30), &what);
        eprintln!("{what}: 20 replicas converged {took} after the heal");
    }
    for seed in seeds(&[1, 2]) {
        run::<LwwMap<u8, u32>>(seed, "lww-map", |w, s, ts| {
            let k = (w >> 8) as u8 % 16;
            match w % 4 {
                0..=2 => s.insert(ts, k, (w >> 16) as u32),
                _ => Ok(s.remove(ts, &k)),
            }
        });
        run::<LwwElementSet<u8>>(seed, "lww-element-set", |w, s, ts| {
            let x = (w >> 8) as u8 % 32;
            match w % 3 {
                0 | 1 => s.add(ts, x),
                _ => Ok(s.remove(ts, &x)),
            }
        });
        run::<LwwRegister<u64>>(seed, "lww-register", |w, s, ts| Ok(s.set(ts, w)));
        run::<PnCounter>(seed, "pn-counter", |w, s, ts| {
            if w % 3 == 0 {
                s.decrement(ts.node, w >> 60)
            } else {
                s.increment(ts.node, (w >> 60) + 1)
            }
        });
        run::<GCounter>(seed, "g-counter", |w, s, ts| {
            s.increment(ts.node, w % 3 + 1)
        });
    }
}

#[test]
fn a_hundred_replicas_converge_and_the_figure_replays() {
    let seed = seeds(&[1])[0];
    let r = measure_convergence(CrdtSimConfig::new(100), seed)
        .expect("100 replicas converge within a minute");
    eprintln!(
        "100 replicas, seed {seed}, digests to 3 peers: {} updates, converged {} after the \
         last one; idle: {} frames/s, {} bytes/s; {:?}",
        r.updates, r.converged_after, r.idle_frames_per_sec, r.idle_bytes_per_sec, r.network
    );
    assert!(r.updates >= 300, "{r:?}");
    // A lost delta waits for a digest: about one interval (1 s) plus round
    // trips, a few intervals when the answers are lost too.
    assert!(r.converged_after <= Millis::from_secs(10), "{r:?}");
    assert!(r.network.lost > 0, "{r:?}");
    // Idle, each replica sends 3 digests a second and nothing else.
    // (Give or take a tick at the window's edges.)
    assert!((290..=310).contains(&r.idle_frames_per_sec), "{r:?}");
    // Broadcast digests: faster repair, quadratic idle traffic.
    let mut c = CrdtSimConfig::new(100);
    c.replica.digest_fanout = None;
    let b = measure_convergence(c, seed).expect("converges");
    eprintln!(
        "100 replicas, seed {seed}, digests broadcast: converged {} after the last one; \
         idle: {} frames/s, {} bytes/s",
        b.converged_after, b.idle_frames_per_sec, b.idle_bytes_per_sec
    );
    assert!((9_800..=10_000).contains(&b.idle_frames_per_sec), "{b:?}");
    let small = measure_convergence(CrdtSimConfig::new(30), seed);
    assert_eq!(
        small,
        measure_convergence(CrdtSimConfig::new(30), seed),
        "one seed, one run"
    );
}
