//! RPC across real processes: a `macula start` seed, `macula serve`
//! providers and `macula call` callers, all joining through the seed.
//! Round robin, failover when a provider is killed, reuse of a restarted
//! provider, graceful SIGTERM during load, and the `services` listing.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const REALM: &str = "test.rpc";
const PROC: &str = "svc.who";

struct Seed {
    _proc: Proc,
    addr: String,
    http: String,
    _dir: tempfile::TempDir,
}

fn seed() -> Seed {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(&start_args(REALM, dir.path(), &[]));
    let addr = p.field("listen");
    let http = p.field("http");
    Seed {
        _proc: p,
        addr,
        http,
        _dir: dir,
    }
}

/// `macula serve PROC --reply TAG` with its identity in `dir`; returns the
/// process and its node ID once it is serving.
fn provider(seed: &Seed, dir: &std::path::Path, tag: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "serve",
        PROC,
        "--reply",
        tag,
        "--data-dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--realm",
        REALM,
        "--connect",
        &seed.addr,
        // Full nodes: the mesh sees each provider (a client's calls reach
        // the mesh through its gateway, see tests/client.rs).
        "--full-node",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&args);
    let line = p.wait_for(&["serving", PROC]);
    let id = line.rsplit(' ').next().unwrap().to_string();
    (p, id)
}

fn call_args<'a>(seed: &'a Seed, count: &'a str, interval: &'a str) -> Vec<&'a str> {
    vec![
        "call",
        PROC,
        "x",
        "--count",
        count,
        "--interval",
        interval,
        "--json",
        "--realm",
        REALM,
        "--connect",
        &seed.addr,
        "--full-node",
    ]
}

/// Polls `macula services --json` on the seed until `PROC` lists `n`
/// providers.
fn wait_for_providers(seed: &Seed, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, out) = run(command(&["services", "--json", "--http", &seed.http]));
        if code == Some(0) {
            let v: Value = serde_json::from_str(out.lines().next().unwrap_or("{}")).unwrap();
            let found = v["mesh"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["procedure"] == PROC)
                .and_then(|s| s["providers"].as_array().map(Vec::len))
                .unwrap_or(0);
            if found == n {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "services never listed {n} providers: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads a running `call --json` process's lines until its summary.
fn read_calls(p: &mut Proc, mut on_line: impl FnMut(usize, &Value, &mut Proc)) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match p.lines.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => panic!("caller stalled after {n} calls:\n{}", p.seen.join("\n")),
        };
        p.seen.push(line.clone());
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue; // a log line
        };
        if v["summary"] == true {
            return v;
        }
        n += 1;
        on_line(n, &v, p);
    }
}

#[test]
fn round_robin_failover_and_a_restarted_provider() {
    let seed = seed();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut providers: Vec<(Proc, String)> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| provider(&seed, d.path(), &format!("p{i}"), &[]))
        .collect();
    wait_for_providers(&seed, 3);

    // Round robin spreads 300 calls evenly.
    let (code, out) = run(command(&call_args(&seed, "300", "0")));
    assert_eq!(code, Some(0), "{out}");
    let summary: Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["summary"] == true)
        .expect("summary line");
    assert_eq!(summary["ok"], 300, "{summary}");
    let by: BTreeMap<String, u64> = serde_json::from_value(summary["by_provider"].clone()).unwrap();
    assert_eq!(by.len(), 3, "{summary}");
    for (id, n) in &by {
        assert!((95..=105).contains(n), "{id} got {n} of 300: {summary}");
    }

    // 1,000 calls; provider 0 is killed (SIGKILL: no goodbye) after 200.
    // Every call still succeeds: the one that finds it dead fails over after
    // the liveness probe. Then it is restarted with the same identity and
    // answers again before the run ends.
    let victim = providers[0].1.clone();
    let mut caller = Proc::spawn(&call_args(&seed, "1000", "8"));
    let mut killed = false;
    let mut restarted = false;
    let mut failed_over = 0;
    let mut after_restart = 0;
    let summary = read_calls(&mut caller, |n, v, _| {
        assert_eq!(v["ok"], true, "call {n} failed: {v}");
        if n == 200 {
            let (old, _) = &mut providers[0];
            old.child.kill().expect("SIGKILL provider 0");
            let _ = old.child.wait();
            killed = true;
        }
        if killed && v["attempts"].as_u64().unwrap_or(1) > 1 {
            failed_over += 1;
            if !restarted {
                let (p, id) = provider(&seed, dirs[0].path(), "p0", &[]);
                assert_eq!(id, victim, "same identity after restart");
                providers[0] = (p, id);
                restarted = true;
            }
        }
        if restarted && v["provider"] == victim.as_str() {
            after_restart += 1;
        }
    });
    assert_eq!(summary["ok"], 1000, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert!(
        failed_over > 0,
        "no call failed over after the kill: {summary}"
    );
    assert!(
        after_restart > 0,
        "the restarted provider was never used again: {summary}"
    );
}

#[test]
fn sigterm_during_load_drains_and_callers_fail_over() {
    let seed = seed();
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    // Slow handlers, so calls are in flight when SIGTERM arrives.
    let (mut p1, id1) = provider(&seed, d1.path(), "p1", &["--delay", "40"]);
    let (_p2, _id2) = provider(&seed, d2.path(), "p2", &["--delay", "40"]);
    wait_for_providers(&seed, 2);

    let mut caller = Proc::spawn(&call_args(&seed, "120", "0"));
    let mut code = None;
    let summary = read_calls(&mut caller, |n, v, _| {
        assert_eq!(v["ok"], true, "call {n} failed: {v}");
        if n == 20 {
            code = Some(p1.terminate());
        }
    });
    assert_eq!(code, Some(Some(0)), "provider exits 0 after SIGTERM");
    assert_eq!(summary["ok"], 120, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    let stderr = p1.seen.join("\n");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = id1;
}

#[test]
fn call_errors_have_kinds_and_exit_codes() {
    let seed = seed();
    let (code, out) = run(command(&[
        "call",
        "svc.nobody",
        "x",
        "--realm",
        REALM,
        "--connect",
        &seed.addr,
    ]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no_providers"), "{out}");

    let (code, out) = run(command(&[
        "call",
        "bad name",
        "x",
        "--realm",
        REALM,
        "--connect",
        &seed.addr,
    ]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid procedure"), "{out}");

    // A slow provider and a short deadline: a timeout, named as such.
    let d = tempfile::tempdir().unwrap();
    let (_p, _) = provider(&seed, d.path(), "slow", &["--delay", "2000"]);
    wait_for_providers(&seed, 1);
    let (code, out) = run(command(&[
        "call",
        PROC,
        "x",
        "--timeout",
        "300",
        "--json",
        "--realm",
        REALM,
        "--connect",
        &seed.addr,
    ]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("\"error\":\"timeout\""), "{out}");

    // Text listing names the procedure and its provider.
    let (code, out) = run(command(&["services", "--http", &seed.http]));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(PROC), "{out}");
}
