//! Raft groups and their key-value store through the `macula` binary: real
//! daemons with data directories on 127.0.0.1 found a group with
//! `--raft-group`/`--raft-members`; `macula kv` round trips through
//! different daemons; `macula raft status` agrees on one leader; the leader
//! is killed with SIGKILL under a writer loop, a new leader takes over and no
//! acknowledged write is lost; the killed daemon restarts on its data
//! directory and catches up. Also membership changes (`macula raft
//! add|remove`), the watch, metrics and configuration errors. Every wait is
//! bounded; every process is killed on drop, also when an assertion fails.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "test.raft";

/// The tests start several daemons each and time a failover: one at a time
/// on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new leader must be seen within this long of the kill (elections start
/// after 400-800 ms of silence; margin for a busy machine).
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

/// `macula args...` must exit 0; its output.
fn ok(args: &[&str]) -> String {
    let (code, out) = run(command(args));
    assert_eq!(code, Some(0), "macula {args:?} failed:\n{out}");
    out
}

/// `macula args... --json` must exit 0; its JSON (the last output line).
fn json(args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = ok(&args);
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad JSON ({e}) from {args:?}:\n{out}"))
}

/// The node ID of the identity in `dir` (created if missing).
fn identity(dir: &Path) -> String {
    let out = ok(&["identity", "--data-dir", dir.to_str().unwrap()]);
    out.trim().to_string()
}

/// A started daemon and what its banner said.
struct Daemon {
    proc: Proc,
    id: String,
    listen: String,
    http: String,
}

/// The value of the banner line `key: value` (a line that starts with it:
/// openraft's logs contain `node_id: ` too).
fn banner(proc: &mut Proc, key: &str) -> String {
    let prefix = format!("{key}: ");
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    loop {
        while i < proc.seen.len() {
            if let Some(v) = proc.seen[i].strip_prefix(&prefix) {
                return v.trim().to_string();
            }
            i += 1;
        }
        match proc.next_line(deadline) {
            Some(line) => proc.seen.push(line),
            None => panic!(
                "no banner line {prefix:?} within {WAIT:?}; output so far:\n{}",
                proc.seen.join("\n")
            ),
        }
    }
}

fn daemon(dir: &Path, extra: &[&str]) -> Daemon {
    let mut proc = Proc::spawn(&start_args(REALM, dir, extra));
    let id = banner(&mut proc, "node_id");
    let listen = banner(&mut proc, "listen");
    let http = banner(&mut proc, "http");
    Daemon {
        proc,
        id,
        listen,
        http,
    }
}

impl Daemon {
    fn boot(&self) -> String {
        format!("{}@{}", self.id, self.listen)
    }
}

/// `(leader, is_leader)` of `group` as the daemon at `http` sees it.
fn leader_at(http: &str, group: &str) -> (Option<String>, bool) {
    let v = json(&["raft", "status", "--http", http]);
    let g = v["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["name"] == group)
        .unwrap_or_else(|| panic!("no group {group} at {http}: {v}"));
    (
        g["leader"].as_str().map(str::to_string),
        g["is_leader"] == true,
    )
}

/// Waits (bounded) until every daemon names the same leader and exactly one
/// of them is it; the leader's node ID.
fn agreed_leader(https: &[&str], group: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let seen: Vec<(Option<String>, bool)> = https.iter().map(|h| leader_at(h, group)).collect();
        let first = seen[0].0.clone();
        let leaders = seen.iter().filter(|(_, is)| *is).count();
        if let Some(leader) = &first {
            if seen.iter().all(|(l, _)| *l == first) && leaders == 1 {
                return leader.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no agreed leader of {group} within {within:?}: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `macula kv get` through `http` (linearizable unless `stale`): the value,
/// or None when the key does not exist (exit code 1, "no key").
fn kv_get(http: &str, group: &str, key: &str, stale: bool) -> Option<String> {
    let mut args = vec!["kv", "get", group, key, "--http", http];
    if stale {
        args.push("--stale");
    }
    let (code, out) = run(command(&args));
    match code {
        Some(0) => Some(out.lines().last().unwrap_or_default().to_string()),
        Some(1) if out.contains("no key") => None,
        _ => panic!("macula {args:?} failed:\n{out}"),
    }
}

#[test]
fn kv_round_trips_and_survives_a_killed_leader() {
    let _serial = serial();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // The founders' IDs are known before any daemon starts.
    let ids: Vec<String> = dirs.iter().map(|d| identity(d.path())).collect();
    let members = ids.join(",");
    let raft = ["--raft-group", "cfg", "--raft-members", &members];
    let mut nodes: Vec<Daemon> = Vec::new();
    nodes.push(daemon(dirs[0].path(), &raft));
    let boot = nodes[0].boot();
    for d in &dirs[1..] {
        let mut extra = raft.to_vec();
        extra.extend_from_slice(&["--bootstrap", &boot]);
        nodes.push(daemon(d.path(), &extra));
    }
    for (n, id) in nodes.iter_mut().zip(&ids) {
        assert_eq!(&n.id, id);
        n.proc.wait_for(&["raft_groups: cfg"]);
    }
    let https: Vec<String> = nodes.iter().map(|n| n.http.clone()).collect();
    let all: Vec<&str> = https.iter().map(String::as_str).collect();
    let leader = agreed_leader(&all, "cfg", WAIT);

    // Status: a table with one leader row among the three daemons.
    let roles: Vec<String> = all
        .iter()
        .map(|h| {
            let out = ok(&["raft", "status", "--http", h]);
            assert!(out.contains("GROUP") && out.contains("cfg"), "{out}");
            assert!(out.contains(&leader), "{out}");
            let row = out.lines().find(|l| l.starts_with("cfg")).unwrap();
            row.split_whitespace().nth(1).unwrap().to_string()
        })
        .collect();
    assert_eq!(
        roles.iter().filter(|r| *r == "leader").count(),
        1,
        "{roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| *r == "follower").count(),
        2,
        "{roles:?}"
    );
    let members_out = ok(&["raft", "members", "cfg", "--http", all[1]]);
    for id in &ids {
        assert!(members_out.contains(id), "{members_out}");
    }

    // put / get / cas / del through different daemons.
    let out = ok(&["kv", "put", "cfg", "feature/x", "on", "--http", all[0]]);
    assert!(out.contains("OK revision"), "{out}");
    assert_eq!(
        kv_get(all[1], "cfg", "feature/x", false).as_deref(),
        Some("on")
    );
    let got = json(&["kv", "get", "cfg", "feature/x", "--http", all[2]]);
    assert_eq!(got["kv"]["value"], "on");
    assert_eq!(got["kv"]["version"], 1);
    let mod_rev = got["kv"]["mod_revision"].as_u64().unwrap();
    ok(&[
        "kv",
        "cas",
        "cfg",
        "feature/x",
        "--expect-value",
        "on",
        "off",
        "--http",
        all[2],
    ]);
    // The same comparison again fails: exit code 3, nothing written.
    let (code, out) = run(command(&[
        "kv",
        "cas",
        "cfg",
        "feature/x",
        "--expect-value",
        "on",
        "again",
        "--http",
        all[1],
    ]));
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("compare failed") && out.contains("off"),
        "{out}"
    );
    let (code, out) = run(command(&[
        "kv",
        "cas",
        "cfg",
        "feature/x",
        "--expect-mod-revision",
        &mod_rev.to_string(),
        "stale",
        "--http",
        all[0],
    ]));
    assert_eq!(code, Some(3), "{out}");
    ok(&[
        "kv",
        "cas",
        "cfg",
        "feature/y",
        "--expect-absent",
        "new",
        "--http",
        all[0],
    ]);
    assert_eq!(
        kv_get(all[1], "cfg", "feature/x", false).as_deref(),
        Some("off")
    );
    assert_eq!(
        kv_get(all[2], "cfg", "feature/y", false).as_deref(),
        Some("new")
    );
    let ls = ok(&["kv", "ls", "cfg", "feature/", "--http", all[1]]);
    assert!(ls.contains("feature/x") && ls.contains("feature/y"), "{ls}");
    let out = ok(&["kv", "del", "cfg", "feature/", "--prefix", "--http", all[1]]);
    assert!(out.contains("deleted 2 key(s)"), "{out}");
    assert_eq!(kv_get(all[0], "cfg", "feature/x", false), None);

    // Kill -9 the leader while a writer loop runs through the survivors.
    let l = nodes.iter().position(|n| n.id == leader).unwrap();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let writer_https: Vec<String> = survivors.iter().map(|i| https[*i].clone()).collect();
    let acked = Arc::new(Mutex::new(Vec::<(usize, Instant)>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    const WRITES: usize = 60;
    let writer = {
        let acked = acked.clone();
        let count = count.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut failed = Vec::new();
            for i in 0..WRITES {
                if started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let http = &writer_https[i % 2];
                let key = format!("w/{i:03}");
                let value = format!("v{i}");
                let (code, out) = run(command(&["kv", "put", "cfg", &key, &value, "--http", http]));
                if code == Some(0) {
                    acked.lock().unwrap().push((i, Instant::now()));
                    count.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.push(format!("{key}: {}", out.trim()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            failed
        })
    };
    let deadline = Instant::now() + WAIT;
    while count.load(Ordering::SeqCst) < 10 {
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    nodes[l].proc.child.kill().expect("SIGKILL the leader");
    let _ = nodes[l].proc.child.wait();
    let killed = Instant::now();
    // A new leader, seen by both survivors in /admin/raft.
    let new_leader;
    loop {
        let seen: Vec<(Option<String>, bool)> = survivors
            .iter()
            .map(|i| leader_at(&https[*i], "cfg"))
            .collect();
        let first = seen[0].0.clone();
        match &first {
            Some(new) if *new != leader && seen.iter().all(|(x, _)| *x == first) => {
                new_leader = new.clone();
                break;
            }
            _ => {}
        }
        assert!(
            killed.elapsed() < FAILOVER_BOUND,
            "no new leader within {FAILOVER_BOUND:?} of the kill: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let failover = killed.elapsed();
    eprintln!("raft failover: new leader {new_leader} seen {failover:?} after SIGKILL of {leader}");
    let failed = writer.join().expect("writer thread");
    let acked = acked.lock().unwrap().clone();
    let after_kill = acked.iter().filter(|(_, at)| *at > killed).count();
    eprintln!(
        "writer: {} of {WRITES} writes acknowledged ({after_kill} after the kill), failed: {failed:?}",
        acked.len()
    );
    assert!(
        after_kill >= 5,
        "writes through the survivors resumed: {failed:?}"
    );

    // Every acknowledged write is there (linearizable read through each survivor).
    for i in &survivors {
        let v = json(&[
            "kv", "ls", "cfg", "w/", "--limit", "1000", "--http", &https[*i],
        ]);
        let got: BTreeMap<String, String> = v["kvs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| {
                (
                    kv["key"].as_str().unwrap().to_string(),
                    kv["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for (n, _) in &acked {
            let key = format!("w/{n:03}");
            assert_eq!(
                got.get(&key).map(String::as_str),
                Some(format!("v{n}").as_str()),
                "acknowledged write {key} lost (read through {})",
                https[*i]
            );
        }
    }

    // The killed daemon restarts on its data directory (same address) and
    // catches up: its own stale copy gets the latest writes.
    let (last, _) = *acked.last().unwrap();
    ok(&[
        "kv",
        "put",
        "cfg",
        "after",
        "restart",
        "--http",
        &https[survivors[0]],
    ]);
    let listen = nodes[l].listen.clone();
    let boot = nodes[survivors[0]].boot();
    let mut extra = raft.to_vec();
    extra.extend_from_slice(&["--listen", &listen, "--bootstrap", &boot]);
    let restart = Instant::now();
    let restarted = daemon(dirs[l].path(), &extra);
    assert_eq!(restarted.id, ids[l]);
    let deadline = Instant::now() + WAIT;
    let caught_up = loop {
        let latest = kv_get(&restarted.http, "cfg", &format!("w/{last:03}"), true);
        let after = kv_get(&restarted.http, "cfg", "after", true);
        if latest.as_deref() == Some(format!("v{last}").as_str())
            && after.as_deref() == Some("restart")
        {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the restarted daemon did not catch up within {WAIT:?}: {latest:?} {after:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "restarted member caught up {:?} after its start",
        caught_up.duration_since(restart)
    );
    let (seen, is) = leader_at(&restarted.http, "cfg");
    assert_eq!(seen.as_deref(), Some(new_leader.as_str()));
    assert!(!is);
    nodes[l] = restarted;
    drop(nodes);
}

#[test]
fn membership_watch_metrics_and_errors() {
    let _serial = serial();
    // Configuration errors: exit code 2, the key named.
    let d = tempfile::tempdir().unwrap();
    let a_id = identity(d.path());
    let (code, out) = run(command(&start_args(
        REALM,
        d.path(),
        &["--raft-members", &a_id],
    )));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("--raft-members") && out.contains("--raft-group"),
        "{out}"
    );
    let (code, out) = run(command(&start_args(
        REALM,
        d.path(),
        &["--raft-group", "no/slash"],
    )));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--raft-group"), "{out}");

    // A one-voter group on A; B runs the group without members: it waits to
    // be added.
    let mut a = daemon(
        d.path(),
        &[
            "--raft-group",
            "m",
            "--raft-members",
            &a_id,
            "--raft-timeout",
            "3s",
        ],
    );
    let db = tempfile::tempdir().unwrap();
    let mut b = daemon(
        db.path(),
        &[
            "--raft-group",
            "m",
            "--bootstrap",
            &a.boot(),
            "--raft-timeout",
            "3s",
        ],
    );
    a.proc.wait_for(&["peer connected", &b.id]);
    assert_eq!(agreed_leader(&[&a.http], "m", WAIT), a.id);
    let v = json(&["raft", "members", "m", "--http", &b.http]);
    assert_eq!(v["voters"].as_array().map(Vec::len), Some(0), "{v}");
    let st = ok(&["raft", "status", "--http", &b.http]);
    assert!(st.contains("not-a-member"), "{st}");

    // Add B as a learner, then as a voter; remove it again.
    let out = ok(&["raft", "add", "m", &b.id, "--learner", "--http", &a.http]);
    assert!(out.contains("as a learner"), "{out}");
    let v = json(&["raft", "members", "m", "--http", &a.http]);
    assert_eq!(v["learners"][0], b.id.as_str(), "{v}");
    ok(&["raft", "add", "m", &b.id, "--http", &a.http]);
    let deadline = Instant::now() + WAIT;
    loop {
        let v = json(&["raft", "members", "m", "--http", &b.http]);
        let voters = v["voters"].as_array().map(Vec::len);
        if voters == Some(2) && v["leader"] == a.id.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "B never saw itself a voter: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Writes through B are forwarded to the leader A.
    let put = json(&["kv", "put", "m", "app/a", "1", "--http", &b.http]);
    let rev = put["revision"].as_u64().unwrap();

    // Watch from that revision through B: the put, then a delete.
    let rev_text = rev.to_string();
    let mut watch = Proc::spawn(&[
        "kv", "watch", "m", "app/", "--from", &rev_text, "--count", "3", "--http", &b.http,
    ]);
    watch.wait_for(&[&rev_text, "PUT app/a = 1"]);
    ok(&["kv", "put", "m", "other/x", "ignored", "--http", &a.http]);
    ok(&["kv", "put", "m", "app/b", "2", "--http", &a.http]);
    ok(&["kv", "del", "m", "app/a", "--http", &b.http]);
    watch.wait_for(&["PUT app/b = 2"]);
    watch.wait_for(&["DELETE app/a"]);
    assert_eq!(watch.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    assert!(!watch.seen.iter().any(|l| l.contains("other/x")));
    // JSON events, from the beginning of the retained history.
    let out = ok(&[
        "kv", "watch", "m", "app/", "--from", "1", "--count", "1", "--json", "--http", &a.http,
    ]);
    let ev: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(ev["event"], "put");
    assert_eq!(ev["kv"]["key"], "app/a");

    // Errors: a deleted key, a group the node does not run, a bad node ID.
    assert_eq!(kv_get(&a.http, "m", "app/a", false), None);
    assert_eq!(kv_get(&b.http, "m", "app/b", true).as_deref(), Some("2"));
    let (code, out) = run(command(&["kv", "get", "nope", "k", "--http", &a.http]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("raft.no_group"), "{out}");
    let (code, out) = run(command(&[
        "raft",
        "add",
        "m",
        "not-an-id",
        "--http",
        &a.http,
    ]));
    assert_eq!(code, Some(2), "{out}");

    // Metrics: the group count, leadership and the counters.
    let metric = |http: &str, series: &str| -> String {
        let m = ok(&["metrics", "raft", "--http", http]);
        m.lines()
            .find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next() == Some(series)).then(|| cols.next().unwrap_or_default().to_string())
            })
            .unwrap_or_else(|| panic!("no {series} in:\n{m}"))
    };
    assert_eq!(metric(&a.http, "macula_raft_groups"), "1");
    assert_eq!(metric(&a.http, "macula_raft_is_leader{group=\"m\"}"), "1");
    assert_eq!(metric(&b.http, "macula_raft_is_leader{group=\"m\"}"), "0");
    let served = metric(&a.http, "macula_raft_requests_served_total");
    assert!(served.parse::<u64>().unwrap() > 0, "{served}");
    let forwarded = metric(&b.http, "macula_raft_forwarded_total");
    assert!(forwarded.parse::<u64>().unwrap() > 0, "{forwarded}");

    // Remove B: A is the only voter again.
    ok(&["raft", "remove", "m", &b.id, "--http", &a.http]);
    let v = json(&["raft", "members", "m", "--http", &a.http]);
    assert_eq!(v["voters"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(a.proc.terminate(), Some(0));
    assert_eq!(b.proc.terminate(), Some(0));
}
