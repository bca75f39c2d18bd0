//! Permissions and revocation in a realm with an authority, as operators
//! meet them (issue 18): three `macula start` daemons, and `macula pub`,
//! `sub`, `serve` and `call` as lightweight clients with grants of their
//! own; real processes, real QUIC on 127.0.0.1.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "acme.authz";

/// What `args` prints on stdout (stderr is for people).
fn out(args: &[&str]) -> String {
    let o = command(args).output().expect("run macula");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A grant token file in `dir` for the identity kept there, with `rules`.
fn grant_file(realm_root: &str, dir: &Path, rules: &[&str]) -> String {
    let d = dir.to_str().unwrap();
    let id = out(&["identity", "--data-dir", d]);
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
    let token = out(&args);
    let path = dir.join("grant");
    std::fs::write(&path, token).unwrap();
    path.to_str().unwrap().to_string()
}

struct Daemon {
    proc: Proc,
    id: String,
    addr: String,
    http: String,
}

/// Runs `args` as a client of `gateway` with the identity and grant in
/// `dir`; returns (exit code, output).
fn as_client(args: &[&str], gateway: &Daemon, dir: &Path, grant: &str) -> (Option<i32>, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend_from_slice(&[
        "--realm",
        REALM,
        "--connect",
        &gateway.addr,
        "--data-dir",
        dir.to_str().unwrap(),
        "--grant-file",
        grant,
    ]);
    run(command(&all))
}

fn peers_of(d: &Daemon) -> String {
    out(&["nodes", "--http", &d.http])
}

#[test]
fn principals_do_only_what_their_grants_allow_and_revocation_cuts_them_off() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let key = out(&["realm", "init", "acme", "--data-dir", r]);
    // Three full nodes that may do everything, carrying their clients'
    // traffic (`relay`).
    let all = [
        "publish **",
        "subscribe **",
        "call **",
        "advertise **",
        "relay **",
    ];
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Daemon> = Vec::new();
    for dir in &dirs {
        let g = grant_file(r, dir.path(), &all);
        let mut extra = vec!["--realm-authority", key.as_str(), "--grant-file", &g];
        let boot = nodes
            .first()
            .map(|a: &Daemon| format!("{}@{}", a.id, a.addr));
        if let Some(b) = &boot {
            extra.extend_from_slice(&["--bootstrap", b]);
        }
        let mut proc = Proc::spawn(&start_args(REALM, dir.path(), &extra));
        let id = proc.field("node_id");
        let addr = proc.field("listen");
        let http = proc.field("http");
        if boot.is_some() {
            proc.wait_for(&["joined the DHT"]);
        }
        nodes.push(Daemon {
            proc,
            id,
            addr,
            http,
        });
    }

    // The principal: may publish orders.*, nothing else.
    let p_dir = tempfile::tempdir().unwrap();
    let p_grant = grant_file(r, p_dir.path(), &["publish orders.*"]);
    // A subscriber through C.
    let s_dir = tempfile::tempdir().unwrap();
    let s_grant = grant_file(r, s_dir.path(), &["subscribe orders.*"]);
    let sub_args = vec![
        "sub".to_string(),
        "orders.*".into(),
        "--count".into(),
        "1".into(),
        "--json".into(),
        "--realm".into(),
        REALM.into(),
        "--connect".into(),
        nodes[2].addr.clone(),
        "--data-dir".into(),
        s_dir.path().to_str().unwrap().into(),
        "--grant-file".into(),
        s_grant.clone(),
    ];
    let mut sub = Proc::spawn(&sub_args.iter().map(String::as_str).collect::<Vec<_>>());
    sub.wait_for(&["subscribed to orders.*"]);

    let (code, text) = as_client(
        &["pub", "orders.1", "o1"],
        &nodes[0],
        p_dir.path(),
        &p_grant,
    );
    assert_eq!(code, Some(0), "{text}");
    sub.wait_for(&["\"topic\":\"orders.1\""]);
    let (code, text) = as_client(
        &["pub", "payments.x", "p"],
        &nodes[0],
        p_dir.path(),
        &p_grant,
    );
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains("may not publish") && text.contains("payments.x"),
        "{text}"
    );
    let (code, text) = as_client(
        &["sub", "orders.*", "--count", "1"],
        &nodes[0],
        p_dir.path(),
        &p_grant,
    );
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("may not subscribe"), "{text}");

    // A provider without `advertise` cannot take calls; one with it can.
    let v_dir = tempfile::tempdir().unwrap();
    let v_grant = grant_file(r, v_dir.path(), &["subscribe orders.*"]);
    let (code, text) = as_client(
        &["serve", "orders.get", "--echo"],
        &nodes[1],
        v_dir.path(),
        &v_grant,
    );
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("may not advertise"), "{text}");
    let w_dir = tempfile::tempdir().unwrap();
    let w_grant = grant_file(r, w_dir.path(), &["advertise orders.get"]);
    let mut w_args: Vec<String> = [
        "serve",
        "orders.get",
        "--echo",
        "--realm",
        REALM,
        "--connect",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    w_args.extend([
        nodes[1].addr.clone(),
        "--data-dir".into(),
        w_dir.path().to_str().unwrap().into(),
        "--grant-file".into(),
        w_grant,
    ]);
    let mut serve = Proc::spawn(&w_args.iter().map(String::as_str).collect::<Vec<_>>());
    serve.wait_for(&["serving orders.get"]);
    let q_dir = tempfile::tempdir().unwrap();
    let q_grant = grant_file(r, q_dir.path(), &["call orders.*"]);
    let (code, text) = as_client(
        &["call", "orders.get", "hi"],
        &nodes[0],
        q_dir.path(),
        &q_grant,
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("hi"), "{text}");
    // The principal may not call at all.
    let (code, text) = as_client(
        &["call", "orders.get", "hi"],
        &nodes[0],
        p_dir.path(),
        &p_grant,
    );
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("may not call"), "{text}");

    // Revoke node C's grant and tell A only: the mesh closes C out.
    let c_id = nodes[2].id.clone();
    assert!(peers_of(&nodes[0]).contains(&c_id) || peers_of(&nodes[1]).contains(&c_id));
    let t = Instant::now();
    let (code, text) = run(command(&[
        "realm",
        "revoke",
        "acme",
        "--data-dir",
        r,
        "--subject",
        &format!("node:{c_id}"),
        "--push",
        &nodes[0].http,
    ]));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("adopted (version 1)"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while peers_of(&nodes[0]).contains(&c_id) || peers_of(&nodes[1]).contains(&c_id) {
        assert!(Instant::now() < deadline, "C still connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "revoked node disconnected from the mesh {:?} after `realm revoke --push`",
        t.elapsed()
    );
    let realm: serde_json::Value = serde_json::from_str(
        &out(&["metrics", "--raw", "--http", &nodes[1].http])
            .lines()
            .find(|l| l.starts_with("macula_realm_revocations_version "))
            .map(|l| format!("{{\"v\":{}}}", l.rsplit(' ').next().unwrap()))
            .expect("version metric"),
    )
    .unwrap();
    assert_eq!(realm["v"], 1, "B took the list from A");
    let (code, _) = run(command(&[
        "realm",
        "push",
        "acme",
        "--data-dir",
        r,
        "--http",
        &nodes[1].http,
    ]));
    assert_eq!(code, Some(0));
    drop(serve);
    drop(sub);
    for n in nodes.iter_mut().rev() {
        n.proc.terminate();
    }
}
