//! The failure detector across real processes (issue 17): a full node
//! killed with SIGKILL (no goodbye) is declared down by the nodes it was
//! connected to, removed from their routing tables, and RPC with a 500 ms
//! deadline keeps succeeding on the remaining provider.
//!
//! A is a `macula start` daemon; X and Y are full nodes serving the same
//! procedure (`macula serve --full-node`), both joined through A and so in
//! everyone's routing table; C is a full-node caller (`macula call
//! --full-node`) making calls one after another with a 500 ms deadline,
//! round robin over X and Y. X is killed mid-run.
//!
//! Counts are asserted, not timings: at most a handful of calls may fail
//! (the ones in flight to X, or routed to it before the detector spoke),
//! and every one of the last several hundred calls succeeds.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const REALM: &str = "test.detector";
const PROC: &str = "svc.alive";

/// One metric's value from an admin server (0 when absent).
fn metric(http: &str, name: &str) -> u64 {
    let Ok(mut s) = std::net::TcpStream::connect(http) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").is_err() {
        return 0;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// A's `/admin/routing` body.
fn routing(http: &str) -> String {
    let mut s = std::net::TcpStream::connect(http).expect("connect to the admin server");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /admin/routing HTTP/1.0\r\nHost: {http}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    )
    .expect("send request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read /admin/routing");
    body
}

fn provider(seed: &str, tag: &str) -> (Proc, String) {
    let mut p = Proc::spawn(&[
        "serve",
        PROC,
        "--reply",
        tag,
        "--listen",
        "127.0.0.1:0",
        "--realm",
        REALM,
        "--connect",
        seed,
        "--full-node",
    ]);
    let line = p.wait_for(&["serving", PROC]);
    let id = line.rsplit(' ').next().unwrap().to_string();
    (p, id)
}

#[test]
fn rpc_with_a_500_ms_deadline_survives_the_kill_of_a_providers_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Proc::spawn(&start_args(REALM, dir.path(), &[]));
    let seed = a.field("listen");
    let http = a.field("http");
    let (mut x, x_id) = provider(&seed, "x");
    let (_y, y_id) = provider(&seed, "y");

    // 4,000 calls at most, 5 ms apart: about 25 s, killed on drop anyway.
    let mut c = Proc::spawn(&[
        "call",
        PROC,
        "ping",
        "--count",
        "4000",
        "--interval",
        "5",
        "--timeout",
        "500",
        "--retries",
        "2",
        "--json",
        "--full-node",
        "--realm",
        REALM,
        "--connect",
        &seed,
    ]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen_x = false;
    let mut seen_y = false;
    // Before the kill: wait until both providers answer (and the caller is
    // connected to both, so it has a connection to X to watch).
    while !(seen_x && seen_y) {
        let line = c
            .next_line(deadline)
            .unwrap_or_else(|| panic!("caller ended before both providers answered"));
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        assert_eq!(v["ok"], true, "a call failed before the kill: {v}");
        seen_x |= v["provider"] == x_id.as_str();
        seen_y |= v["provider"] == y_id.as_str();
    }
    assert!(routing(&http).contains(&x_id), "X is in A's routing table");

    unsafe {
        libc::kill(x.child.id() as i32, libc::SIGKILL);
    }
    let _ = x.child.wait();
    let killed = Instant::now();

    // After the kill: every call's outcome, in order.
    let mut after: Vec<Value> = Vec::new();
    let mut summary = Value::Null;
    let mut detected = None;
    // The longest time between two successful answers (for BENCHMARKS.md).
    let mut last_ok = killed;
    let mut longest_gap = Duration::ZERO;
    while let Some(line) = c.next_line(deadline) {
        if detected.is_none() && metric(&http, "macula_peers_declared_down_total") >= 1 {
            detected = Some(killed.elapsed());
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["summary"] == true {
            summary = v;
            break;
        }
        if v["ok"] == true {
            longest_gap = longest_gap.max(last_ok.elapsed());
            last_ok = Instant::now();
        }
        after.push(v);
    }
    assert!(summary.is_object(), "no summary from the caller");
    let failed: Vec<usize> = after
        .iter()
        .enumerate()
        .filter(|(_, v)| v["ok"] != true)
        .map(|(i, _)| i)
        .collect();
    let to_x_late = after
        .iter()
        .skip(100)
        .filter(|v| v["provider"] == x_id.as_str())
        .count();
    eprintln!(
        "{} calls after the kill, {} failed (at {:?}), longest time without an answer {:?}; \
         A declared X down after {:?}",
        after.len(),
        failed.len(),
        failed,
        longest_gap,
        detected
    );
    assert!(after.len() >= 1_000, "{} calls after the kill", after.len());
    // Calls to X in flight at the kill, or sent before the detector spoke
    // (about 2 s: a few 500 ms timeouts), may fail; nothing after.
    assert!(
        failed.len() <= 8,
        "{} calls failed: {failed:?}",
        failed.len()
    );
    assert!(
        failed.iter().all(|&i| i < 100),
        "a call failed long after the kill: {failed:?}"
    );
    assert_eq!(to_x_late, 0, "calls still went to the dead node");

    // A saw X go: declared down, out of its routing table.
    let gone = {
        let limit = Instant::now() + Duration::from_secs(20);
        loop {
            let r = routing(&http);
            if !r.contains(&x_id) || Instant::now() > limit {
                break !r.contains(&x_id);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(gone, "X is still in A's routing table");
    assert!(metric(&http, "macula_peers_declared_down_total") >= 1);
    assert!(metric(&http, "macula_peers_suspected") >= 1);
}

/// A node killed and restarted at once (same data directory, same port)
/// answers its peers' next packets on the old connection with a QUIC
/// stateless reset (its reset key comes from its node key, so it is the
/// same in every run), and they learn of the restart from that, not from
/// their failure detector. A runs with a 20 s detector bound here, so only
/// the reset can end the connection in time. A dials B: QUIC gives a reset
/// token for every connection ID the accepting side issues, but none for
/// the dialer's first one, so a peer of a restarted node learns at once
/// when it had dialed that node (a client of its gateway, a node that
/// bootstrapped through it) and, when the restarted node had dialed, only
/// once it uses a later connection ID.
#[test]
fn a_restarted_node_resets_its_old_connections() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let mut b = Proc::spawn(&start_args(REALM, dir_b.path(), &[]));
    let b_addr = b.field("listen");
    let b_id = b.field("node_id");
    let mut a = Proc::spawn(&start_args(
        REALM,
        dir_a.path(),
        &["--peer-down-after", "20s", "--bootstrap", &b_addr],
    ));
    let http = a.field("http");
    a.wait_for(&["peer connected", &b_id]);

    unsafe {
        libc::kill(b.child.id() as i32, libc::SIGKILL);
    }
    let _ = b.child.wait();
    let _b2 = Proc::spawn(&start_args(REALM, dir_b.path(), &["--listen", &b_addr]));
    let line = a
        .poll_for(&["peer disconnected", &b_id], Duration::from_secs(15))
        .unwrap_or_else(|| panic!("A never saw B's old connection end:\n{}", a.seen.join("\n")));
    eprintln!("A saw: {line}");
    assert!(line.contains("reset"), "ended otherwise: {line}");
    assert_eq!(metric(&http, "macula_peers_declared_down_total"), 0);
}
