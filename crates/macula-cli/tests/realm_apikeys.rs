//! API keys with real processes, real QUIC on 127.0.0.1: `macula realm
//! apikey` issues keys bound to grants, `realm apikeys --export` writes the
//! gateway's file (hashes, never keys), `macula start --api-keys FILE`
//! admits `macula sub`/`pub` clients presenting a key (`--api-key` or
//! `MACULA_API_KEY`), refuses unknown and other-realm keys naming why, and
//! cuts off an address after five failures.

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

const REALM: &str = "acme.keys";

/// A client grant of realm `name` and an API key bound to it.
fn issue(root: &str, name: &str, label: &str) -> String {
    let realm_key = out(&["realm", "key", name, "--data-dir", root]);
    let token = out(&[
        "realm",
        "grant",
        name,
        "--data-dir",
        root,
        "--subject",
        &format!("client:{realm_key}"),
        "--allow",
        "publish **",
        "--allow",
        "subscribe **",
    ]);
    out(&[
        "realm",
        "apikey",
        name,
        "--data-dir",
        root,
        "--grant",
        &token,
        "--label",
        label,
    ])
}

fn publish(gateway: &str, key: &str) -> (Option<i32>, String) {
    run(command(&[
        "pub",
        "news.today",
        "hello",
        "--realm",
        REALM,
        "--connect",
        gateway,
        "--api-key",
        key,
    ]))
}

fn metric(http: &str, series: &str) -> u64 {
    out(&["metrics", "--raw", "--http", http])
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn clients_with_api_keys_attach_and_bad_keys_are_refused_then_rate_limited() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let realm_key = out(&["realm", "init", "acme", "--data-dir", r]);
    out(&["realm", "init", "other", "--data-dir", r]);
    let alice = issue(r, "acme", "alice");
    let bob = issue(r, "acme", "bob");
    let foreign = issue(r, "other", "mallory");
    assert!(alice.starts_with("mk_") && alice.len() == 67, "{alice}");
    assert_ne!(alice, bob);

    // The list names labels and hash prefixes, never keys.
    let list = out(&["realm", "apikeys", "acme", "--data-dir", r]);
    assert!(list.contains("alice") && list.contains("bob"), "{list}");
    assert!(list.contains("valid"), "{list}");
    assert!(!list.contains(&alice[3..]), "{list}");
    // The gateway's file: acme's keys, plus (by mistake) one of another realm.
    let file = root.path().join("gateway.apikeys");
    let f = file.to_str().unwrap();
    out(&["realm", "apikeys", "acme", "--data-dir", r, "--export", f]);
    let other = out(&[
        "realm",
        "apikeys",
        "other",
        "--data-dir",
        r,
        "--export",
        "-",
    ]);
    let mut text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(!text.contains(&alice[3..]) && !text.contains(&bob[3..]));
    text.push_str(&other);
    text.push('\n');
    std::fs::write(&file, text).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut gw = Proc::spawn(&start_args(
        REALM,
        dir.path(),
        &["--realm-authority", &realm_key, "--api-keys", f],
    ));
    let gw_id = gw.field("node_id");
    let gw_addr = format!("{gw_id}@{}", gw.field("listen"));
    let http = gw.field("http");
    // /health tells how many keys the gateway takes.
    let health: serde_json::Value =
        serde_json::from_str(&out(&["health", "--http", &http, "--json"])).unwrap();
    assert_eq!(health["api_keys"], 3);

    // Alice subscribes, Bob publishes (his key from the environment).
    let mut sub = Proc::spawn(&[
        "sub",
        "news.*",
        "--count",
        "1",
        "--json",
        "--realm",
        REALM,
        "--connect",
        &gw_addr,
        "--api-key",
        &alice,
    ]);
    sub.wait_for(&["subscribed to news.*"]);
    let mut cmd = command(&[
        "pub",
        "news.today",
        "hello",
        "--realm",
        REALM,
        "--connect",
        &gw_addr,
    ]);
    cmd.env("MACULA_API_KEY", &bob);
    let (code, text) = run(cmd);
    assert_eq!(code, Some(0), "{text}");
    sub.wait_for(&["\"topic\":\"news.today\""]);
    assert_eq!(metric(&http, "macula_api_key_admitted_total"), 2);

    // Refusals, each naming why (two failures at the gateway from
    // 127.0.0.1).
    let unknown = format!("mk_{}", "ab".repeat(32));
    let (code, text) = publish(&gw_addr, &unknown);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("unknown_key"), "{text}");
    let (code, text) = publish(&gw_addr, &foreign);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("wrong_realm"), "{text}");
    let (code, text) = publish(&gw_addr, "not-a-key");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not an API key"), "{text}");
    // Three more bad keys make five failures (the malformed key never left
    // the client); the sixth attempt, even with a good key, is refused at
    // once.
    for _ in 0..3 {
        let (code, text) = publish(&gw_addr, &unknown);
        assert_eq!(code, Some(1), "{text}");
        assert!(text.contains("unknown_key"), "{text}");
    }
    let (code, text) = publish(&gw_addr, &alice);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("too many failed API-key attempts"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&http, "macula_api_key_rate_limited_total") < 1 {
        assert!(Instant::now() < deadline, "rate limiting not counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metric(
            &http,
            "macula_api_key_failures_total{reason=\"unknown_key\"}"
        ),
        4
    );
    assert_eq!(
        metric(&http, "macula_api_key_failures_total{reason=\"bad_grant\"}"),
        1
    );
    assert_eq!(
        metric(
            &http,
            "macula_handshake_failures_total{reason=\"rate_limited\"}"
        ),
        1
    );

    // --api-keys without an authority is a usage error.
    let other_dir = tempfile::tempdir().unwrap();
    let (code, text) = run(command(&start_args(
        REALM,
        other_dir.path(),
        &["--api-keys", f],
    )));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--realm-authority"), "{text}");
    let _ = sub.wait_exit(Duration::from_secs(5));
    assert_eq!(gw.terminate(), Some(0));
}
