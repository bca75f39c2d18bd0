//! The node's audit trail and admin credentials end to end: a `macula
//! start` process creates `<data dir>/admin-token`, admin commands find it
//! through `--data-dir`, refused requests are recorded in
//! `<data dir>/audit/`, `macula audit tail` prints them and `macula audit
//! verify --data-dir` checks the chain and the node-signed checkpoints,
//! naming the exact line of an edit, a deletion or a reordering.

mod common;

use std::path::Path;

use common::*;

/// `macula start` without a token file: the node makes its own.
fn own_token_node(dir: &Path) -> (Proc, String) {
    let mut p = Proc::spawn(&[
        "start",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--realm",
        "test.audit",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    let http = p.field("http");
    (p, http)
}

/// A command without the test token in its environment.
fn bare(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = command(args);
    cmd.env_remove("MACULA_ADMIN_TOKEN");
    run(cmd)
}

fn verify(dir: &Path) -> (Option<i32>, String) {
    bare(&["audit", "verify", "--data-dir", dir.to_str().unwrap()])
}

#[test]
fn refusals_are_audited_and_the_trail_verifies_to_the_line() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (mut node, http) = own_token_node(dir);
    let token = std::fs::read_to_string(dir.join("admin-token")).expect("admin-token");
    assert_eq!(token.trim().len(), 64);

    // The data directory's token is found and sent.
    let (code, out) = bare(&[
        "nodes",
        "--http",
        &http,
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}");
    // No credentials, or the wrong ones: exit 1 naming the 401 and the way out.
    let empty = tempfile::tempdir().unwrap();
    let (code, out) = bare(&[
        "nodes",
        "--http",
        &http,
        "--data-dir",
        empty.path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("HTTP 401") && out.contains("--admin-token-file"),
        "{out}"
    );
    for _ in 0..2 {
        let mut cmd = command(&["raft", "status", "--http", &http]);
        cmd.env("MACULA_ADMIN_TOKEN", "wrong");
        let (code, out) = run(cmd);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains("HTTP 401") && out.contains("bad_token"),
            "{out}"
        );
    }
    // `/health` needs nothing and says the API is protected.
    let (code, out) = bare(&["health", "--json", "--http", &http]);
    assert_eq!(code, Some(0), "{out}");
    let h: serde_json::Value = serde_json::from_str(out.trim()).expect("health JSON");
    assert_eq!(h["admin_auth"], true);
    assert_eq!(h["admin_auth_methods"], serde_json::json!(["token"]));

    assert_eq!(node.terminate(), Some(0), "graceful stop");

    // Three refusals and the closing checkpoint.
    let (code, out) = bare(&[
        "audit",
        "tail",
        "--data-dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let kinds: Vec<String> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("entry JSON");
            v["kind"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        ["admin_denied", "admin_denied", "admin_denied", "checkpoint"],
        "{out}"
    );
    let (code, out) = bare(&[
        "audit",
        "tail",
        "--data-dir",
        dir.to_str().unwrap(),
        "-n",
        "2",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("GET /admin/raft: bad_token"), "{out}");
    assert_eq!(out.lines().count(), 3, "header and two entries:\n{out}");

    let (code, out) = verify(dir);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("intact: 4 entries, 1 checkpoints verified"),
        "{out}"
    );

    let log = dir.join("audit").join("audit.log");
    let original = std::fs::read_to_string(&log).expect("audit.log");
    let lines: Vec<&str> = original.lines().collect();
    let check = |text: String, want: &str| {
        std::fs::write(&log, text).expect("tamper");
        let (code, out) = verify(dir);
        assert_eq!(code, Some(1), "{want}: {out}");
        assert!(out.contains(want), "expected {want:?} in:\n{out}");
    };
    // An edited detail: line 2 no longer matches its hash.
    let edited = lines[1].replace("bad_token", "all good");
    assert_ne!(edited, lines[1]);
    check(
        [lines[0], &edited, lines[2], lines[3]].join("\n") + "\n",
        "line 2 (seq Some(1)): its hash does not match its content (edited)",
    );
    // A deleted line: line 2 now holds seq 2.
    check(
        [lines[0], lines[2], lines[3]].join("\n") + "\n",
        "line 2 (seq Some(2)): expected seq 1",
    );
    // Two lines swapped.
    check(
        [lines[0], lines[2], lines[1], lines[3]].join("\n") + "\n",
        "line 2 (seq Some(2)): expected seq 1",
    );
    // The checkpoint does not verify with another key.
    std::fs::write(&log, &original).expect("restore");
    let keys = tempfile::tempdir().unwrap();
    let (code, other) = bare(&[
        "realm",
        "init",
        "other",
        "--data-dir",
        keys.path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{other}");
    let other = other.lines().last().unwrap_or_default().trim().to_string();
    let (code, out) = bare(&["audit", "verify", "--key", &other, log.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("line 4") && out.contains("checkpoint signature"),
        "{out}"
    );
    // Intact again once restored.
    assert_eq!(verify(dir).0, Some(0));
}

/// Exit 0 expected; the longest output line without a space (a key or a
/// token: the logs and notes around it have spaces).
fn last_line(args: &[&str]) -> String {
    let (code, out) = bare(args);
    assert_eq!(code, Some(0), "macula {args:?}:\n{out}");
    out.lines()
        .map(str::trim)
        .filter(|l| !l.contains(' '))
        .max_by_key(|l| l.len())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn admin_commands_sign_requests_under_an_admin_grant() {
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path().to_str().unwrap();
    let realm = last_line(&["realm", "init", "acme", "--data-dir", k]);
    // The operator's key: any Ed25519 key file (here made as `realm init` makes them).
    let ops = last_line(&["realm", "init", "ops", "--data-dir", k]);
    let ops_key = keys.path().join("realms/ops/authority.key");
    let write = |name: &str, rules: &[&str]| -> String {
        let mut args = vec!["realm", "grant", "acme", "--data-dir", k];
        let subject = format!("client:{ops}");
        args.extend_from_slice(&["--subject", &subject]);
        for r in rules {
            args.extend_from_slice(&["--allow", r]);
        }
        let token = last_line(&args);
        let path = keys.path().join(name);
        std::fs::write(&path, token).unwrap();
        path.to_str().unwrap().to_string()
    };
    let all = write("all.grant", &["admin admin.**"]);
    let peers_only = write("peers.grant", &["admin admin.peers"]);

    let d = tempfile::tempdir().unwrap();
    let mut node = Proc::spawn(&common::start_args(
        "test.audit",
        d.path(),
        &["--realm-authority", &realm],
    ));
    let http = node.field("http");
    let key = ops_key.to_str().unwrap();
    let signed = |grant: &str, cmd: &[&str]| {
        let mut args = cmd.to_vec();
        args.extend_from_slice(&["--http", &http, "--admin-grant", grant, "--admin-key", key]);
        bare(&args)
    };
    let (code, out) = signed(&all, &["nodes"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = signed(&all, &["raft", "status"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = signed(&peers_only, &["nodes"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = signed(&peers_only, &["nodes", "--routing"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("HTTP 401") && out.contains("admin admin.routing"),
        "{out}"
    );
    // --admin-grant needs --admin-key.
    let (code, out) = bare(&["nodes", "--http", &http, "--admin-grant", &all]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(node.terminate(), Some(0));
}

/// One request without credentials (refused, so audited) by hand.
fn refused_get(http: &str, path: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.0 401"), "{answer}");
}

#[test]
fn tail_follows_across_rotations_and_the_rotated_set_verifies() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let mut node = Proc::spawn(&common::start_args(
        "test.audit",
        d.path(),
        &[
            "--audit-max-bytes",
            "64KiB",
            "--audit-files",
            "3",
            "--admin-max-failures",
            "100000",
        ],
    ));
    let http = node.field("http");
    let mut tail = Proc::spawn(&[
        "audit",
        "tail",
        "--data-dir",
        dir,
        "-n",
        "0",
        "--follow",
        "--json",
    ]);
    // The follower is reading before the first entry is written.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let n = 600;
    for i in 0..n {
        refused_get(&http, &format!("/admin/r{i}"));
    }
    tail.wait_for(&[&format!("GET /admin/r{}: missing", n - 1)]);
    let entries: Vec<serde_json::Value> = tail
        .seen
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let seqs: Vec<u64> = entries
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    let denied = entries
        .iter()
        .filter(|e| e["kind"] == "admin_denied")
        .count();
    assert_eq!(denied, n, "every refusal followed");
    assert!(
        entries.iter().any(|e| e["kind"] == "checkpoint"),
        "a rotated file ends with a checkpoint"
    );
    let audit = d.path().join("audit");
    assert!(audit.join("audit.log.2").exists() && !audit.join("audit.log.3").exists());
    assert_eq!(node.terminate(), Some(0));
    let (code, out) = verify(d.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("intact"), "{out}");
}
