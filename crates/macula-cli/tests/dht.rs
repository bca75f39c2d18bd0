//! The DHT across real processes: five `macula start` nodes on 127.0.0.1, and
//! `macula dht put|get` as separate processes joining through any of them.
//! A value put through one node is found through every other; still found
//! after a node is killed; gone once its TTL passes without republish.

mod common;

use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "test.dht";

struct Mesh {
    nodes: Vec<(Proc, String)>,
    _dirs: Vec<tempfile::TempDir>,
}

/// Five nodes: the first, and four bootstrapping through it. Returns once
/// every node has joined the DHT.
fn mesh(n: usize) -> Mesh {
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let boot = nodes.first().map(|(_, a): &(Proc, String)| a.clone());
        let mut extra = vec![];
        if let Some(b) = boot.as_deref() {
            extra.extend_from_slice(&["--bootstrap", b]);
        }
        let mut p = Proc::spawn(&start_args(REALM, dir.path(), &extra));
        let addr = p.field("listen");
        if i > 0 {
            p.wait_for(&["joined the DHT"]);
        }
        nodes.push((p, addr));
        dirs.push(dir);
    }
    Mesh { nodes, _dirs: dirs }
}

fn dht(args: &[&str]) -> (Option<i32>, String) {
    let mut v = vec!["dht"];
    v.extend_from_slice(args);
    v.extend_from_slice(&["--realm", REALM]);
    run(command(&v))
}

fn get(key: &str, via: &str) -> (Option<i32>, String) {
    dht(&["get", key, "--connect", via])
}

#[test]
fn values_are_found_from_every_node_survive_a_crash_and_expire() {
    let mut m = mesh(5);
    let addrs: Vec<String> = m.nodes.iter().map(|(_, a)| a.clone()).collect();

    let (code, out) = dht(&["put", "greeting", "hello mesh", "--connect", &addrs[1]]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("stored \"greeting\" on"), "{out}");

    for a in &addrs {
        let (code, out) = get("greeting", a);
        assert_eq!(code, Some(0), "get via {a}: {out}");
        assert!(out.contains("hello mesh"), "get via {a}: {out}");
    }

    // JSON output carries the publisher and the value.
    let (code, out) = dht(&["get", "greeting", "--connect", &addrs[3], "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with('['))
        .expect("a JSON line");
    let json: serde_json::Value = serde_json::from_str(line).expect("json");
    assert_eq!(json[0]["value"], "hello mesh");
    assert_eq!(json[0]["publisher"].as_str().map(str::len), Some(52));

    // A missing key: exit code 1 and a message.
    let (code, out) = get("no-such-key", &addrs[0]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no records"), "{out}");

    // TTL: found right away, gone once 3 s pass without a republish (the
    // CLI publisher has exited). Poll with a deadline; never sleep-then-check.
    let put_at = Instant::now();
    let (code, out) = dht(&["put", "brief", "v", "--ttl", "3s", "--connect", &addrs[0]]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = get("brief", &addrs[4]);
    assert_eq!(code, Some(0), "brief record present at first: {out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out) = get("brief", &addrs[3]);
        if code == Some(1) {
            assert!(
                put_at.elapsed() >= Duration::from_secs(3),
                "expired early, after {:?}",
                put_at.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "record still there after 30 s: {out}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // A crash (SIGKILL: no goodbye) of one replica loses nothing.
    let (mut dead, _) = m.nodes.remove(2);
    let _ = dead.child.kill();
    let _ = dead.child.wait();
    for a in addrs.iter().filter(|a| **a != addrs[2]) {
        let (code, out) = get("greeting", a);
        assert_eq!(code, Some(0), "get via {a} after a crash: {out}");
        assert!(out.contains("hello mesh"), "{out}");
    }

    for (p, _) in &mut m.nodes {
        assert_eq!(p.terminate(), Some(0));
    }
}

#[test]
fn dht_commands_report_bad_input_and_unreachable_meshes() {
    let (code, out) = dht(&[
        "put",
        "k",
        "v",
        "--ttl",
        "forever",
        "--connect",
        "127.0.0.1:9",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--ttl") && out.contains("forever"), "{out}");
    let (code, out) = dht(&["closest", "nonsense", "--node", "--connect", "127.0.0.1:9"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid node ID"), "{out}");
}

/// Issue 21 item 5: a restarted node takes its routing table and the
/// records it held back from `dht.snapshot`, so it serves again although
/// its only bootstrap peer is gone: after a clean restart (the snapshot
/// written at shutdown) and after `kill -9` (the last periodic one).
#[test]
fn a_restarted_node_whose_bootstrap_peer_is_gone_serves_from_its_snapshot() {
    let realm = "test.dht.snapshot";
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = Proc::spawn(&start_args(realm, dirs[0].path(), &[]));
    let a_addr = a.field("listen");
    let start = |dir: &tempfile::TempDir| {
        Proc::spawn(&start_args(
            realm,
            dir.path(),
            &["--bootstrap", &a_addr, "--dht-snapshot-interval", "1s"],
        ))
    };
    let mut b = start(&dirs[1]);
    b.wait_for(&["joined the DHT"]);
    let mut c = start(&dirs[2]);
    let c_addr = c.field("listen");
    c.wait_for(&["joined the DHT"]);
    let b_addr = b.field("listen");

    let dht_in = |args: &[&str]| {
        let mut v = vec!["dht"];
        v.extend_from_slice(args);
        v.extend_from_slice(&["--realm", realm]);
        run(command(&v))
    };
    let (code, out) = dht_in(&["put", "greeting", "hello again", "--connect", &b_addr]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = dht_in(&["get", "greeting", "--connect", &c_addr]);
    assert_eq!(code, Some(0), "{out}");

    // C stops cleanly (its snapshot is written at shutdown); A, its only
    // bootstrap peer, is killed for good.
    assert_eq!(c.terminate(), Some(0));
    drop(a);
    let snapshot = dirs[2].path().join("dht.snapshot");
    assert!(snapshot.exists(), "written at shutdown");

    let mut c = start(&dirs[2]);
    let c_addr = c.field("listen");
    let line = c.wait_for(&["DHT restored from its snapshot"]);
    assert!(
        line.contains("records=") && !line.contains("records=0"),
        "{line}"
    );
    c.wait_for(&["joined the DHT"]);
    let (code, out) = dht_in(&["get", "greeting", "--connect", &c_addr]);
    assert_eq!(code, Some(0), "after a clean restart: {out}");
    assert!(out.contains("hello again"), "{out}");

    // kill -9 once a periodic snapshot has been written since the start.
    let written = std::fs::metadata(&snapshot).unwrap().modified().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&snapshot).unwrap().modified().unwrap() == written {
        assert!(
            Instant::now() < deadline,
            "no periodic snapshot within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(c);
    let mut c = start(&dirs[2]);
    let c_addr = c.field("listen");
    c.wait_for(&["DHT restored from its snapshot"]);
    c.wait_for(&["joined the DHT"]);
    let (code, out) = dht_in(&["get", "greeting", "--connect", &c_addr]);
    assert_eq!(code, Some(0), "after kill -9: {out}");
    assert!(out.contains("hello again"), "{out}");

    // Without the snapshot C would be alone: its bootstrap peer is dead.
    drop(c);
    std::fs::remove_file(&snapshot).unwrap();
    let mut c = start(&dirs[2]);
    assert!(
        c.poll_for(&["joined the DHT"], Duration::from_secs(3))
            .is_none(),
        "a cold node whose bootstrap peer is gone cannot join"
    );
    drop(b);
}
