//! End-to-end tests of the admin HTTP server inside `macula start` and of the
//! read commands (`macula nodes`, `macula health`, `macula metrics`): real
//! processes on 127.0.0.1, text and `--json` output, exit codes. Every wait
//! is bounded; every process is killed on drop even when an assertion fails.

mod common;

use std::path::Path;

use common::*;

/// Runs a read command, expecting exit code 0; returns its output.
fn read_ok(args: &[&str]) -> String {
    let (code, out) = run(command(args));
    assert_eq!(code, Some(0), "macula {args:?} failed:\n{out}");
    out
}

/// Runs a read command with `--json`, expecting exit code 0; parses stdout.
fn read_json(args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = read_ok(&args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{out}"))
}

fn start_args<'a>(dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    common::start_args("test.admin", dir, extra)
}

/// A started node and what its banner said.
struct Node {
    proc: Proc,
    id: String,
    listen: String,
    http: String,
    _dir: tempfile::TempDir,
}

fn node(extra: &[&str]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut proc = Proc::spawn(&start_args(dir.path(), extra));
    let id = proc.field("node_id");
    let listen = proc.field("listen");
    let http = proc.field("http");
    Node {
        proc,
        id,
        listen,
        http,
        _dir: dir,
    }
}

/// The value column of the metrics table row for exactly `series`.
fn table_value(out: &str, series: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let mut cols = l.split_whitespace();
        (cols.next() == Some(series)).then(|| cols.next().unwrap_or_default().to_string())
    })
}

#[test]
fn read_commands_against_a_three_node_mesh() {
    let mut a = node(&[]);
    assert!(a.http.starts_with("127.0.0.1:"), "{}", a.http);
    assert!(
        !a.http.ends_with(":0"),
        "the bound port is printed: {}",
        a.http
    );
    let boot = format!("{}@{}", a.id, a.listen);
    let mut b = node(&["--bootstrap", &boot]);
    let mut c = node(&["--bootstrap", &boot]);
    a.proc.wait_for(&["peer connected", &b.id]);
    a.proc.wait_for(&["peer connected", &c.id]);
    b.proc.wait_for(&["peer connected", &a.id]);
    c.proc.wait_for(&["peer connected", &a.id]);

    // nodes: A lists B and C (inbound); B lists A (outbound, kept).
    let out = read_ok(&["nodes", "--http", &a.http]);
    assert!(
        out.contains(&format!("node {} has 2 peer(s)", a.id)),
        "{out}"
    );
    assert!(
        out.contains("NODE ID") && out.contains("DIRECTION"),
        "{out}"
    );
    for peer in [&b.id, &c.id] {
        let row = out
            .lines()
            .find(|l| l.starts_with(peer.as_str()))
            .unwrap_or_else(|| panic!("{peer} not listed:\n{out}"));
        assert!(row.contains("inbound") && row.contains("macula/"), "{row}");
    }
    // nodes --routing: A's DHT routing table lists B and C (text and JSON).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = read_json(&["nodes", "--routing", "--http", &a.http]);
        let ids: Vec<&str> = v["contacts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["node_id"].as_str())
            .collect();
        if ids.contains(&b.id.as_str()) && ids.contains(&c.id.as_str()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "routing table: {v}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let routing = read_ok(&["nodes", "--routing", "--http", &a.http]);
    assert!(
        routing.contains("BUCKET") && routing.contains(&b.id) && routing.contains(&c.id),
        "{routing}"
    );
    let json = read_json(&["nodes", "--http", &a.http]);
    assert_eq!(json["node_id"], a.id.as_str());
    let peers = json["peers"].as_array().expect("peers array");
    let mut ids: Vec<&str> = peers
        .iter()
        .map(|p| p["node_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![b.id.as_str(), c.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    for p in peers {
        assert_eq!(p["direction"], "inbound");
        assert!(p["rtt_us"].is_u64() && p["idle_secs"].is_u64(), "{p}");
        assert!(p["listen_addrs"].is_array() && p["addr"].is_string(), "{p}");
    }
    let at_b = read_json(&["nodes", "--http", &b.http]);
    let at_b = at_b["peers"].as_array().unwrap();
    // B may also have found C through the DHT; its bootstrap link to A is
    // the one it dialed and keeps.
    let to_a = at_b
        .iter()
        .find(|p| p["node_id"] == a.id.as_str())
        .unwrap_or_else(|| panic!("B does not list A: {at_b:?}"));
    assert_eq!(to_a["direction"], "outbound");
    assert_eq!(to_a["kept"], true);
    assert_eq!(to_a["listen_addrs"][0], a.listen.as_str());

    // health: text and JSON.
    let out = read_ok(&["health", "--http", &a.http]);
    for line in [
        "status: ok".to_string(),
        "ready: yes".to_string(),
        format!("node_id: {}", a.id),
        "realm: test.admin".to_string(),
        "peers: 2".to_string(),
        format!("listen: {}", a.listen),
        format!("version: {}", env!("CARGO_PKG_VERSION")),
        "admin_auth: token".to_string(),
    ] {
        assert!(out.contains(&line), "{line:?} missing:\n{out}");
    }
    let h = read_json(&["health", "--http", &c.http]);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["ready"], true);
    assert_eq!(h["node_id"], c.id.as_str());
    assert_eq!(h["realm"], "test.admin");
    // A, and B once C's DHT join has found it.
    let n = h["peers"].as_u64().unwrap_or(0);
    assert!((1..=2).contains(&n), "{h}");
    assert!(h["uptime_secs"].is_u64(), "{h}");

    // metrics: a table, JSON samples, the raw exposition, a filter.
    let out = read_ok(&["metrics", "--http", &a.http]);
    let inbound = "macula_connections_total{direction=\"inbound\"}";
    assert_eq!(table_value(&out, inbound).as_deref(), Some("2"), "{out}");
    assert_eq!(table_value(&out, "macula_peers").as_deref(), Some("2"));
    assert!(out.lines().next().unwrap().starts_with("SERIES"), "{out}");
    let samples = read_json(&["metrics", "--http", &a.http]);
    let samples = samples.as_array().expect("array of samples");
    let find = |name: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|s| s["name"] == name && label.is_none_or(|(k, v)| s["labels"][k] == v))
            .unwrap_or_else(|| panic!("no sample {name} {label:?}"))["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(
        find("macula_connections_total", Some(("direction", "inbound"))),
        2.0
    );
    assert_eq!(find("macula_connections_current", None), 2.0);
    assert_eq!(
        find("macula_handshake_failures_total", Some(("reason", "tls"))),
        0.0
    );
    assert!(find("macula_uptime_seconds", None) >= 0.0);
    assert_eq!(find("macula_ready", None), 1.0);
    let raw = read_ok(&["metrics", "--raw", "--http", &a.http]);
    assert!(raw.contains("# TYPE macula_connections counter"), "{raw}");
    assert!(raw.contains("# HELP macula_handshake_failures "), "{raw}");
    assert!(raw.trim_end().ends_with("# EOF"), "{raw}");
    let pool = read_ok(&["metrics", "pool", "--http", &a.http]);
    let series: Vec<&str> = pool.lines().skip(1).collect();
    assert!(series.len() >= 5, "{pool}");
    assert!(
        series.iter().all(|l| l.starts_with("macula_pool_")),
        "{pool}"
    );

    // services: a provider joins through C; A lists it (text and JSON).
    let mut serve = Proc::spawn(&[
        "serve",
        "svc.admin",
        "--echo",
        "--realm",
        "test.admin",
        "--connect",
        &c.listen,
        // A full node is its own provider (a client's gateway would be).
        "--full-node",
    ]);
    let serving = serve.wait_for(&["serving svc.admin"]);
    let provider = serving.rsplit(' ').next().unwrap().to_string();
    let deadline = std::time::Instant::now() + WAIT;
    let listed = loop {
        let v = read_json(&["services", "--http", &a.http]);
        if v["mesh"][0]["procedure"] == "svc.admin" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "never listed: {v}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(
        listed["mesh"][0]["providers"][0]["node_id"],
        provider.as_str()
    );
    assert_eq!(listed["local"].as_array().map(Vec::len), Some(0));
    let text = read_ok(&["services", "--http", &a.http]);
    assert!(
        text.contains("svc.admin") && text.contains(&provider),
        "{text}"
    );
    assert_eq!(serve.terminate(), Some(0));

    // The admin server stops with the node: SIGTERM still exits 0.
    assert_eq!(b.proc.terminate(), Some(0));
    assert_eq!(c.proc.terminate(), Some(0));
    assert_eq!(a.proc.terminate(), Some(0));
    let (code, out) = run(command(&["health", "--http", &a.http]));
    assert_eq!(code, Some(1), "{out}");
}

#[test]
fn unreachable_node_exits_1_naming_the_address() {
    // A port that was free a moment ago and has no listener now.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    for cmd in ["nodes", "health", "metrics"] {
        for json in [false, true] {
            let mut args = vec![cmd, "--http", dead.as_str()];
            if json {
                args.push("--json");
            }
            let (code, out) = run(command(&args));
            assert_eq!(code, Some(1), "{args:?}: {out}");
            assert!(out.contains(&dead), "{args:?} must name {dead}: {out}");
            assert!(out.contains("cannot reach"), "{out}");
        }
    }
    // MACULA_HTTP is the default address.
    let mut cmd = command(&["health"]);
    cmd.env("MACULA_HTTP", &dead);
    let (code, out) = run(cmd);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&dead), "{out}");
    // A malformed address is a usage error.
    let (code, out) = run(command(&["nodes", "--http", "nowhere"]));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("nowhere") && out.contains("--http"), "{out}");
    let (code, _) = run(command(&["metrics", "--raw", "--json"]));
    assert_eq!(code, Some(2));
}

/// A stand-in admin server on 127.0.0.1 that answers one request with
/// `answer` (status line, headers and body); returns its address.
fn answer_once(answer: String) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let _ = conn.set_read_timeout(Some(WAIT));
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn.write_all(answer.as_bytes());
    });
    addr
}

fn http_answer(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn error_answers_exit_1_naming_the_address() {
    // An HTTP error: the node's message, the status and a hint.
    let error = r#"{"error":"no route for GET /admin/peers","status":404}"#;
    let addr = answer_once(http_answer("404 Not Found", error));
    let (code, out) = run(command(&["nodes", "--http", &addr]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "the node at {addr} answered HTTP 404 for /admin/peers: no route for GET /admin/peers (is this a macula admin address?)"
        )),
        "{out}"
    );
    let addr = answer_once(http_answer("500 Internal Server Error", "boom"));
    let (code, out) = run(command(&["health", "--json", "--http", &addr]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("answered HTTP 500 for /health: boom"), "{out}");
    // Metrics text that is not the exposition format.
    let addr = answer_once(http_answer("200 OK", "# TYPE x gauge\nx one\n"));
    let (code, out) = run(command(&["metrics", "--http", &addr]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("the node at {addr} sent unreadable metrics"))
            && out.contains("line 2: bad value"),
        "{out}"
    );
    // JSON that is not what the endpoint serves.
    let addr = answer_once(http_answer("200 OK", "<html></html>"));
    let (code, out) = run(command(&["services", "--http", &addr]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "unexpected answer from {addr} for /admin/services"
        )),
        "{out}"
    );
    // Not HTTP at all.
    let addr = answer_once("SSH-2.0-OpenSSH_9.6\r\n\r\n".to_string());
    let (code, out) = run(command(&["health", "--http", &addr]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("cannot reach the node's admin API at {addr}")),
        "{out}"
    );
    // --raw prints the text as served, unparsed.
    let addr = answer_once(http_answer("200 OK", "x one\n"));
    let (code, out) = run(command(&["metrics", "--raw", "--http", &addr]));
    assert_eq!((code, out.trim()), (Some(0), "x one"));
}

#[test]
fn health_of_a_node_that_has_not_joined_exits_1() {
    // Bootstrap to a UDP port where nothing listens: never joins.
    let nobody = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().to_string()
    };
    let n = node(&["--bootstrap", &nobody]);
    let (code, out) = run(command(&["health", "--http", &n.http]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("status: degraded"), "{out}");
    assert!(out.contains("ready: no"), "{out}");
    assert!(out.contains("not ready") && out.contains(&n.http), "{out}");
    let (code, out) = run(command(&["health", "--json", "--http", &n.http]));
    assert_eq!(code, Some(1), "{out}");
    let json_line = out.lines().find(|l| l.starts_with('{')).expect("JSON line");
    let h: serde_json::Value = serde_json::from_str(json_line).unwrap();
    assert_eq!(h["ready"], false);
    // Reading peers works regardless of readiness.
    let peers = read_json(&["nodes", "--http", &n.http]);
    assert_eq!(peers["peers"].as_array().unwrap().len(), 0);
}

#[test]
fn admin_port_in_use_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (code, out) = run(command(&start_args(d.path(), &["--http", &addr])));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("cannot listen for admin HTTP on {addr}")),
        "{out}"
    );
    assert!(out.to_lowercase().contains("in use"), "{out}");
    drop(busy);
}

#[test]
fn read_commands_have_complete_help() {
    let out = read_ok(&["--help"]);
    for sub in [
        "start", "identity", "bench", "nodes", "health", "metrics", "services", "pub", "sub",
        "trace", "call", "serve", "dht",
    ] {
        assert!(out.contains(sub), "{sub} missing from help:\n{out}");
    }
    for sub in ["nodes", "health", "metrics", "services"] {
        let out = read_ok(&[sub, "--help"]);
        for needle in ["--http", "--json", "MACULA_HTTP", "127.0.0.1:8080"] {
            assert!(
                out.contains(needle),
                "{needle} missing from {sub} help:\n{out}"
            );
        }
    }
    let out = read_ok(&["metrics", "--help"]);
    assert!(out.contains("--raw") && out.contains("FILTER"), "{out}");
    // Mesh commands document how they join and what they print.
    for (sub, needles) in [
        (
            "call",
            &[
                "--timeout",
                "--retries",
                "--strategy",
                "--connect",
                "--json",
            ][..],
        ),
        (
            "serve",
            &[
                "--echo",
                "--reply",
                "--weight",
                "--max-concurrent",
                "--connect",
            ][..],
        ),
        ("trace", &["PATTERN", "--count", "--connect", "--json"][..]),
    ] {
        let out = read_ok(&[sub, "--help"]);
        for needle in needles {
            assert!(
                out.contains(needle),
                "{needle} missing from {sub} help:\n{out}"
            );
        }
    }
}
