//! Issue 17's fault schedule in the simulator (the real-process twin is
//! `macula-cli/tests/failure_detector.rs`): a full node that provides a
//! procedure and sits in every routing table crashes (no goodbye). Its
//! peers' failure detectors declare it down after the bound
//! (`NetConfig::detect_after`); from then on every call with a 500 ms
//! deadline succeeds on the other provider, and no DHT lookup waits on the
//! dead node. Every figure is simulated time, so the assertions are exact
//! for a seed.

use std::collections::HashMap;

use macula_dht::{Config, LookupKind};
use macula_sim::rpc::Handler;
use macula_sim::{Latency, Millis, NetConfig, Sim};

const PROC: &str = "svc.alive";
const REALM: &str = "test.sim";
const N: usize = 12;

/// Calls from every node but the providers, one every 25 ms, between `from`
/// and `to`; returns (call, started at).
fn calls(sim: &mut Sim, from: u64, to: u64) -> HashMap<u64, Millis> {
    let mut started = HashMap::new();
    let mut t = from;
    let mut caller = 3;
    while t < to {
        sim.run_until(Millis(t));
        let id = sim.call(caller, PROC, Millis(500), 2);
        started.insert(id, Millis(t));
        caller = if caller + 1 >= N { 3 } else { caller + 1 };
        t += 25;
    }
    started
}

#[test]
fn calls_with_a_500_ms_deadline_survive_a_providers_crash() {
    for seed in [1, 2, 3] {
        let net = NetConfig {
            latency: Latency::Uniform {
                min: Millis(5),
                max: Millis(40),
            },
            loss: 0.0,
            ..NetConfig::default()
        };
        let detect = net.detect_after();
        // Issue 17's target: a dead peer declared down within 3 s.
        assert!(detect < Millis(3_000), "{detect:?}");
        let mut sim = Sim::new(net, seed);
        sim.set_realm(REALM);
        sim.set_supervise_bootstrap(true);
        for _ in 0..N {
            sim.add_node(Config::default());
        }
        sim.schedule_start(0, &[], Millis::ZERO);
        for i in 1..N {
            sim.schedule_start(i, &[0], Millis(10 * i as u64));
        }
        sim.run_until(Millis(5_000));
        let handler = Handler {
            min: Millis(1),
            max: Millis(5),
        };
        sim.advertise(1, PROC, handler).expect("advertise on 1");
        sim.advertise(2, PROC, handler).expect("advertise on 2");
        sim.run_until(Millis(8_000));
        // Warm up: everyone calls both providers (connections to node 1).
        let warm = calls(&mut sim, 8_000, 12_000);
        sim.run_until(Millis(13_000));
        let outcomes = sim.take_call_outcomes();
        let ok = outcomes.iter().filter(|(_, _, r)| r.is_ok()).count();
        assert_eq!(ok, warm.len(), "seed {seed}: warm-up calls failed");
        let victim = sim.id(1);
        assert!(
            (3..N).all(|i| sim.dht(i).routing().contains(&victim)),
            "seed {seed}: node 1 is in every routing table"
        );

        // Crash node 1 at 13 s. Node 0 (its bootstrap peer, which calls
        // nothing) learns from its failure detector alone: it still holds
        // the connection just before the bound, and has dropped it and the
        // routing-table entry just after.
        let crash = Millis(13_000);
        sim.kill(1);
        let spoke = crash.saturating_add(detect);
        // Calls every 25 ms from the crash on, for 20 s.
        let mut started = calls(&mut sim, crash.0, spoke.0);
        sim.run_until(Millis(spoke.0 - 1));
        assert!(
            sim.pool(0).peek(&victim).is_some(),
            "seed {seed}: too early"
        );
        assert!(sim.dht(0).routing().contains(&victim));
        sim.run_until(spoke);
        assert!(
            sim.pool(0).peek(&victim).is_none(),
            "seed {seed}: not detected"
        );
        assert!(!sim.dht(0).routing().contains(&victim));
        assert!(sim.dht(0).is_suspected(&victim, spoke));
        started.extend(calls(&mut sim, spoke.0, crash.0 + 20_000));
        sim.run_until(Millis(crash.0 + 21_000));
        let outcomes = sim.take_call_outcomes();
        assert_eq!(
            outcomes.len(),
            started.len(),
            "seed {seed}: every call ends"
        );
        let n_err = outcomes.iter().filter(|(_, _, r)| r.is_err()).count();
        let to_victim = outcomes
            .iter()
            .filter(|(_, _, r)| matches!(r, Ok((p, _)) if *p == victim))
            .count();
        eprintln!(
            "seed {seed}: {} calls after the crash, {n_err} failed, {to_victim} answered by the dead node; detected after {detect:?}",
            outcomes.len()
        );
        let mut failed_before = 0;
        for (caller, id, r) in &outcomes {
            let at = started[id];
            match r {
                Ok((provider, _)) => assert_ne!(*provider, victim, "seed {seed}: dead provider"),
                Err(e) if at < spoke => {
                    failed_before += 1;
                    let _ = e;
                }
                Err(e) => panic!(
                    "seed {seed}: call {id} from node {caller} at {at:?} (detector spoke at \
                     {spoke:?}) failed: {e:?}"
                ),
            }
        }
        // Calls in flight to node 1, or routed to it before the detector
        // spoke, may fail: bounded by what the window holds.
        assert!(
            failed_before <= (detect.0 / 25 + 1) as usize,
            "seed {seed}: {failed_before} failures"
        );
        // No node keeps the dead one in its routing table, and a provider
        // lookup after the detector spoke never waits on it.
        for i in 3..N {
            assert!(
                !sim.dht(i).routing().contains(&victim),
                "seed {seed}: node {i} still lists node 1"
            );
        }
        let key = macula_wire::dht_key(macula_rpc::ad_name(REALM, PROC).as_bytes());
        let now = sim.now();
        let tags: Vec<u64> = (3..N)
            .map(|i| sim.schedule_lookup(i, key, LookupKind::FindValue, now))
            .collect();
        sim.run_until(now.saturating_add(Millis(5_000)));
        let results = sim.take_results();
        for tag in tags {
            let (_, outcome) = results
                .iter()
                .find(|(t, _)| *t == tag)
                .unwrap_or_else(|| panic!("seed {seed}: lookup {tag} did not finish"));
            let took = outcome.stats.finished.saturating_sub(outcome.stats.started);
            assert!(
                took < Millis(1_000),
                "seed {seed}: a lookup took {took:?}, waiting on a request timeout"
            );
        }
        assert!(sim.failure().is_none(), "seed {seed}: {:?}", sim.failure());
    }
}

/// Issue 17, "interest follows liveness", in the simulator: a subscriber
/// node crashes; the publisher's node stops queueing copies to it once its
/// failure detector declares it down (plus the 1 s interest bound), not
/// when its interest record expires (600 s), while a live subscriber keeps
/// getting every message.
#[test]
fn publishers_stop_sending_to_a_crashed_subscriber_node() {
    for seed in [1, 2, 3] {
        let net = NetConfig {
            latency: Latency::Uniform {
                min: Millis(5),
                max: Millis(40),
            },
            loss: 0.0,
            ..NetConfig::default()
        };
        let detect = net.detect_after();
        // Issue 17's target: a dead peer declared down within 3 s.
        assert!(detect < Millis(3_000), "{detect:?}");
        let mut sim = Sim::new(net, seed);
        sim.set_realm(REALM);
        sim.set_supervise_bootstrap(true);
        sim.set_app_log(true);
        for _ in 0..N {
            sim.add_node(Config::default());
        }
        sim.schedule_start(0, &[], Millis::ZERO);
        for i in 1..N {
            sim.schedule_start(i, &[0], Millis(10 * i as u64));
        }
        sim.run_until(Millis(5_000));
        let (dead, live, publisher) = (4, 6, 5);
        sim.subscribe(dead, "t.**")
            .expect("subscribe on the doomed node");
        let live_sub = sim
            .subscribe(live, "t.**")
            .expect("subscribe on a live node");
        sim.run_until(Millis(8_000));
        let sent = |sim: &Sim| {
            sim.pubsub(publisher)
                .core()
                .counters()
                .sent_remote_total
                .get()
        };
        let mut t = 8_000;
        let mut publish_until = |sim: &mut Sim, to: u64| {
            while t < to {
                sim.run_until(Millis(t));
                sim.publish(publisher, "t.x", b"tick");
                t += 50;
            }
        };
        publish_until(&mut sim, 10_000);
        let before = sent(&sim);
        assert!(before > 0, "seed {seed}: copies go out");
        let crash = Millis(10_000);
        // Count the live subscriber's deliveries from the crash on.
        sim.take_deliveries();
        sim.take_publishes();
        sim.kill(dead);
        // Detector bound, then the interest bound (1 s), and one publish.
        let settled = crash.0 + detect.0 + 1_000 + 50;
        publish_until(&mut sim, settled);
        let flat = sent(&sim);
        publish_until(&mut sim, settled + 5_000);
        sim.run_until(Millis(settled + 5_500));
        let after = sent(&sim);
        let published_after = (settled + 5_000 - settled).div_ceil(50);
        // From then on the only copies are the live subscriber's.
        assert_eq!(
            after - flat,
            published_after,
            "seed {seed}: copies still queued to the crashed node"
        );
        let unreachable = sim
            .pubsub(publisher)
            .core()
            .counters()
            .peers_unreachable_total
            .get();
        assert!(unreachable >= 1, "seed {seed}: never set aside");
        let seqs: Vec<u64> = sim
            .take_deliveries()
            .iter()
            .filter(|d| d.1 == live_sub)
            .map(|d| d.4)
            .collect();
        let published: Vec<u64> = sim
            .take_publishes()
            .iter()
            .filter(|p| p.0 == publisher)
            .map(|p| p.3)
            .collect();
        let missed: Vec<&u64> = published.iter().filter(|p| !seqs.contains(p)).collect();
        assert!(
            missed.is_empty(),
            "seed {seed}: the live subscriber missed {missed:?} while the other node was dead"
        );
        assert_eq!(
            published.len() as u64,
            (settled + 5_000 - crash.0).div_ceil(50)
        );
        assert!(sim.failure().is_none(), "seed {seed}: {:?}", sim.failure());
    }
}
