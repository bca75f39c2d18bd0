//! `macula deploy` and `macula upgrade` across five `macula start`
//! processes (issue 25, items 2-4): a first version deployed through one
//! node and started on all five (the others fetch the artifact from their
//! peers), a second deployed through another, then a rolling upgrade whose
//! coordinator (the leader of Raft group `_workloads`) is killed with
//! SIGKILL right after the rollout is planned. The surviving members elect
//! a new leader, which takes the rollout over from its record; the killed
//! node is restarted and rejoins. The rollout ends on record (history,
//! status) with every node on the version the record names.
#![cfg(feature = "wasm")]

mod common;

use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "test.upgrade";

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn cli(args: &[&str]) -> (Option<i32>, String) {
    run(command(args))
}

/// `GET /admin/workloads/node` of one node.
fn node_report(http: &str) -> Option<serde_json::Value> {
    match admin_http(http, "GET", "/admin/workloads/node", "") {
        Ok((200, body)) => Some(json(&body)),
        _ => None,
    }
}

/// The version of `app` a node runs.
fn runs(http: &str, app: &str) -> Option<String> {
    node_report(http)?["apps"]
        .as_array()?
        .iter()
        .find(|a| a["app"] == app)
        .and_then(|a| a["version"].as_str().map(str::to_string))
}

#[test]
fn a_coordinator_killed_mid_upgrade_is_replaced_and_the_rollout_ends_on_record() {
    let v1 = std::fs::read(example()).expect("example component");
    let dir = tempfile::tempdir().expect("tempdir");
    let v2_path = dir.path().join("v2.wasm");
    std::fs::write(&v2_path, macula_wasm::artifact::tagged(&v1, "2")).expect("write v2");
    let v1_path = example();
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let Mesh {
        mut procs,
        ids,
        https,
        listens,
    } = Mesh::start(REALM, &dirs);

    // Version 1 through node 0, on every node; node 0 must see the others
    // first (placement takes the agents in reach).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agents = admin_http(&https[0], "GET", "/admin/workloads/agents", "")
            .map(|(_, b)| json(&b).as_array().map_or(0, Vec::len))
            .unwrap_or(0);
        if agents == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "agents in reach: {agents}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, out) = cli(&[
        "deploy",
        "up",
        "1",
        v1_path.to_str().unwrap(),
        "--config",
        "prefix=up",
        "--config",
        "version=1",
        "--wait",
        "--http",
        &https[0],
    ]);
    assert_eq!(code, Some(0), "deploy 1: {out}");
    assert!(out.contains("rollout 1: 5 nodes"), "{out}");
    for h in &https {
        assert_eq!(runs(h, "up").as_deref(), Some("1"), "on {h}");
    }
    // A tampered file is refused before anything is stored.
    let (code, out) = cli(&[
        "deploy",
        "up",
        "2",
        v2_path.to_str().unwrap(),
        "--blake3",
        &"0".repeat(64),
        "--http",
        &https[1],
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("refused"), "{out}");
    let (code, out) = cli(&[
        "deploy",
        "up",
        "2",
        v2_path.to_str().unwrap(),
        "--config",
        "version=2",
        "--http",
        &https[1],
    ]);
    assert_eq!(code, Some(0), "deploy 2: {out}");
    assert!(out.contains("macula upgrade up 2"), "{out}");

    // Rolling, one node per batch, through node 1.
    let via = 1;
    let (code, out) = cli(&[
        "upgrade",
        "up",
        "2",
        "--strategy",
        "rolling",
        "--batch-size",
        "1",
        "--health-check",
        "up.health",
        "--rollback-on-fail",
        "--http",
        &https[via],
    ]);
    assert_eq!(code, Some(0), "upgrade: {out}");
    assert!(
        out.contains("rollout 2 of up: 1 -> 2, rolling, 5 batches"),
        "{out}"
    );
    // Once its first batch is done, the coordinator driving it (the last
    // `coordinator` event of the record) is killed.
    let rollout_of = |http: &str| -> Option<serde_json::Value> {
        match admin_http(http, "GET", "/admin/workloads/apps/up", "") {
            Ok((200, body)) => Some(json(&body)["rollout"].clone()),
            _ => None,
        }
    };
    let drivers_of = |r: &serde_json::Value| -> Vec<String> {
        r["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter_map(|e| e[1].as_str()?.strip_prefix("coordinator "))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let killed_id = loop {
        if let Some(r) = rollout_of(&https[via]) {
            assert_eq!(r["phase"], "running", "ended before the kill: {r}");
            if r["done"].as_u64().unwrap_or(0) >= 1 {
                break drivers_of(&r).last().cloned().expect("a coordinator");
            }
        }
        assert!(Instant::now() < deadline, "first batch not done");
        std::thread::sleep(Duration::from_millis(50));
    };
    let coordinator = ids.iter().position(|i| *i == killed_id).expect("a member");
    let via = if coordinator == via { 2 } else { via };
    procs[coordinator].child.kill().expect("kill -9");
    procs[coordinator].child.wait().expect("reaped");
    // A surviving member takes the rollout over from its record...
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = rollout_of(&https[via]) {
            if drivers_of(&r).last().is_some_and(|d| *d != killed_id) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no member took the rollout over");
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...and the killed node comes back with the same identity and data
    // (it rejoins the group; the new coordinator's order reaches it).
    let mut again = Proc::spawn(&start_args(
        REALM,
        dirs[coordinator].path(),
        &["--bootstrap", &listens[via]],
    ));
    let new_http = again.field("http");
    procs[coordinator] = again;
    let mut https = https.clone();
    https[coordinator] = new_http;

    // The rollout ends, on record.
    let deadline = Instant::now() + Duration::from_secs(120);
    let rollout = loop {
        let (code, out) = cli(&["upgrade", "status", "up", "--json", "--http", &https[via]]);
        if code == Some(0) {
            let r = json(&out)["rollout"].clone();
            let phase = r["phase"].as_str().unwrap_or("").to_string();
            if r["id"] == 2 && !matches!(phase.as_str(), "running" | "rolling_back") {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "rollout did not end: {out}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let phase = rollout["phase"].as_str().unwrap();
    assert!(
        phase == "completed" || phase == "rolled_back",
        "ended {phase}: {rollout}"
    );
    let drivers = drivers_of(&rollout);
    assert!(
        drivers.len() >= 2 && drivers[0] == killed_id && drivers[1] != killed_id,
        "the killed coordinator, then a survivor, drove it: {rollout}"
    );
    let want = if phase == "completed" { "2" } else { "1" };
    let deadline = Instant::now() + Duration::from_secs(30);
    for h in &https {
        while runs(h, "up").as_deref() != Some(want) {
            assert!(Instant::now() < deadline, "{h} runs {:?}", runs(h, "up"));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (code, out) = cli(&["upgrade", "history", "up", "--http", &https[via]]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("all-at-once") && out.contains("rolling"),
        "{out}"
    );
    let (code, out) = cli(&["upgrade", "status", "--http", &https[via]]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("5 on {want}")), "{out}");
    eprintln!("rollout after the coordinator's kill: {phase}; drivers {drivers:?}");
}
