//! `macula start --realm-authority KEY --grant-file FILE`: real processes,
//! real QUIC on 127.0.0.1. Granted nodes join each other; a node without a
//! grant is refused, and the refusal is counted and shown.

mod common;

use std::time::{Duration, Instant};

use common::*;

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

#[test]
fn granted_nodes_join_and_others_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let key = out(&["realm", "init", "acme", "--data-dir", r]);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let grant_file = |i: usize| -> String {
        let d = dirs[i].path().to_str().unwrap();
        let id = out(&["identity", "--data-dir", d]);
        let token = out(&[
            "realm",
            "grant",
            "acme",
            "--data-dir",
            r,
            "--subject",
            &format!("node:{id}"),
            "--allow",
            "publish **",
        ]);
        let path = dirs[i].path().join("node.grant");
        std::fs::write(&path, token).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (g0, g1) = (grant_file(0), grant_file(1));
    let mut a = Proc::spawn(&start_args(
        "acme.realm",
        dirs[0].path(),
        &["--realm-authority", &key, "--grant-file", &g0],
    ));
    let a_id = a.field("node_id");
    let a_addr = a.field("listen");
    let a_http = a.field("http");
    let boot = format!("{a_id}@{a_addr}");
    let mut b = Proc::spawn(&start_args(
        "acme.realm",
        dirs[1].path(),
        &[
            "--realm-authority",
            &key,
            "--grant-file",
            &g1,
            "--bootstrap",
            &boot,
        ],
    ));
    let b_id = b.field("node_id");
    a.wait_for(&["peer connected", &b_id]);
    // /health names the authority.
    let health: serde_json::Value =
        serde_json::from_str(&out(&["health", "--http", &a_http, "--json"])).unwrap();
    assert_eq!(health["realm_authority"], key.as_str());
    // A node of the realm without a grant: refused, counted at A.
    let mut c = Proc::spawn(&start_args(
        "acme.realm",
        dirs[2].path(),
        &["--realm-authority", &key, "--bootstrap", &boot],
    ));
    let c_id = c.field("node_id");
    let series = "macula_handshake_failures_total{reason=\"unauthorized\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let raw = out(&["metrics", "--raw", "--http", &a_http]);
        let n: u64 = raw
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if n >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no refusal counted: {raw}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let peers = out(&["nodes", "--http", &a_http]);
    assert!(peers.contains(&b_id) && !peers.contains(&c_id), "{peers}");
    // A grant file without an authority is a usage error.
    let (code, text) = run(command(&start_args(
        "acme.realm",
        dirs[2].path(),
        &["--grant-file", &g0],
    )));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--realm-authority"), "{text}");
    for p in [&mut c, &mut b, &mut a] {
        assert_eq!(p.terminate(), Some(0));
    }
}
