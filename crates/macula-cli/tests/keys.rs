//! End-to-end payload encryption as operators meet it (issue 19): two
//! `macula start` daemons of a realm with an authority, `macula keys
//! rotate` (the authority, offline, pushing to one node's admin API) and
//! `macula keys status`, and `macula pub` / `macula sub` as lightweight
//! clients: a member reads, a revoked member reads nothing published
//! after the rotation. Real processes, real QUIC on 127.0.0.1.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "acme.keys";

fn out(args: &[&str]) -> String {
    let o = command(args).output().expect("run macula");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn identity(dir: &Path) -> serde_json::Value {
    let text = out(&["identity", "--json", "--data-dir", dir.to_str().unwrap()]);
    serde_json::from_str(&text).expect("identity JSON")
}

fn grant_file(realm_root: &str, dir: &Path, rules: &[&str]) -> String {
    let id = identity(dir)["node_id"].as_str().unwrap().to_string();
    let mut args = vec![
        "realm".to_string(),
        "grant".into(),
        "acme".into(),
        "--data-dir".into(),
        realm_root.into(),
        "--subject".into(),
        format!("node:{id}"),
    ];
    for r in rules {
        args.push("--allow".into());
        args.push(r.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let path = dir.join("grant");
    std::fs::write(&path, out(&args)).unwrap();
    path.to_str().unwrap().to_string()
}

fn member_key(dir: &Path) -> String {
    identity(dir)["member_key"].as_str().unwrap().to_string()
}

fn client_args<'a>(
    args: &[&'a str],
    gateway: &'a str,
    dir: &'a Path,
    grant: &'a str,
) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend_from_slice(&[
        "--realm",
        REALM,
        "--connect",
        gateway,
        "--data-dir",
        dir.to_str().unwrap(),
        "--grant-file",
        grant,
    ]);
    all
}

/// Waits (bounded) until the node at `http` holds key set `version`.
fn holds(http: &str, version: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&out(&["keys", "status", "--json", "--http", http])).unwrap();
        if v["version"].as_u64() == Some(version) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no key set {version} at {http}: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn keys_rotate_reaches_the_mesh_and_a_revoked_member_reads_nothing_after() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let key = out(&["realm", "init", "acme", "--data-dir", r]);
    let all = ["publish **", "subscribe **", "relay **"];
    let (ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ga = grant_file(r, ad.path(), &all);
    let mut a = Proc::spawn(&start_args(
        REALM,
        ad.path(),
        &["--realm-authority", &key, "--grant-file", &ga],
    ));
    let (a_id, a_addr, a_http) = (a.field("node_id"), a.field("listen"), a.field("http"));
    let gb = grant_file(r, bd.path(), &all);
    let boot = format!("{a_id}@{a_addr}");
    let mut b = Proc::spawn(&start_args(
        REALM,
        bd.path(),
        &[
            "--realm-authority",
            &key,
            "--grant-file",
            &gb,
            "--bootstrap",
            &boot,
        ],
    ));
    let (b_addr, b_http) = (b.field("listen"), b.field("http"));
    b.wait_for(&["joined the DHT"]);

    // Publisher P (client of A), subscribers S and X (clients of B).
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (pd, sd, xd) = (dirs[0].path(), dirs[1].path(), dirs[2].path());
    let pg = grant_file(r, pd, &["publish secret.*"]);
    let sg = grant_file(r, sd, &["subscribe secret.*"]);
    let xg = grant_file(r, xd, &["subscribe secret.*"]);
    let (pk, sk, xk) = (member_key(pd), member_key(sd), member_key(xd));

    // The first rotation starts encrypting secret.*: pushed to A only.
    let id1 = out(&[
        "keys",
        "rotate",
        "secret.*",
        "--realm",
        "acme",
        "--data-dir",
        r,
        "--member",
        &pk,
        "--member",
        &sk,
        "--member",
        &xk,
        "--activate-in",
        "0s",
        "--http",
        &a_http,
    ]);
    assert!(id1.starts_with("secret.* "), "{id1}");
    let v = holds(&b_http, 1);
    assert_eq!(v["keys"][0]["pattern"], "secret.*");
    // Nodes are not members: they hold no key.
    assert_eq!(v["keys"][0]["held"], false);
    assert_eq!(v["keys"][0]["members"], 3);
    let table = out(&["keys", "status", "--http", &b_http]);
    assert!(
        table.contains("secret.*") && table.contains("key set version 1"),
        "{table}"
    );

    let mut s = Proc::spawn(&client_args(
        &["sub", "secret.*", "--json"],
        &b_addr,
        sd,
        &sg,
    ));
    s.wait_for(&["subscribed to secret.*"]);
    let mut x = Proc::spawn(&client_args(
        &["sub", "secret.*", "--json"],
        &b_addr,
        xd,
        &xg,
    ));
    x.wait_for(&["subscribed to secret.*"]);
    let (code, text) = run(command(&client_args(
        &["pub", "secret.a", "before"],
        &a_addr,
        pd,
        &pg,
    )));
    assert_eq!(code, Some(0), "{text}");
    s.wait_for(&["\"payload\":\"before\""]);
    x.wait_for(&["\"payload\":\"before\""]);

    // X is revoked: the next key goes to P and S only.
    out(&[
        "keys",
        "rotate",
        "secret.*",
        "--realm",
        "acme",
        "--data-dir",
        r,
        "--revoke",
        &xk,
        "--activate-in",
        "0s",
        "--http",
        &b_http,
    ]);
    let v = holds(&a_http, 2);
    assert_eq!(v["keys"].as_array().unwrap().len(), 2, "{v}");
    // Clients take the set from their gateway a moment later.
    std::thread::sleep(Duration::from_millis(500));
    let (code, text) = run(command(&client_args(
        &["pub", "secret.b", "after"],
        &a_addr,
        pd,
        &pg,
    )));
    assert_eq!(code, Some(0), "{text}");
    s.wait_for(&["\"payload\":\"after\""]);
    assert!(
        x.poll_for(&["after"], Duration::from_secs(2)).is_none(),
        "the revoked member read a message published after the rotation"
    );

    // The same text as a procedure pattern is another entry with its own
    // key and members (RPC arguments and replies).
    let line = out(&[
        "keys",
        "rotate",
        "secret.*",
        "--procedure",
        "--realm",
        "acme",
        "--data-dir",
        r,
        "--member",
        &sk,
        "--activate-in",
        "0s",
        "--http",
        &a_http,
    ]);
    assert!(line.starts_with("secret.* "), "{line}");
    let v = holds(&b_http, 3);
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3, "{v}");
    let procedure: Vec<_> = keys.iter().filter(|k| k["kind"] == "procedure").collect();
    assert_eq!(procedure.len(), 1, "{v}");
    assert_eq!(procedure[0]["members"], 1);
    assert_eq!(procedure[0]["number"], 1, "a first key of its own");
    let table = out(&["keys", "status", "--http", &b_http]);
    assert!(table.contains("procedure"), "{table}");
    for p in [&mut s, &mut x, &mut b, &mut a] {
        p.terminate();
    }
}
