//! The live web dashboard in a real browser: three `macula start` daemons
//! (A; B through A; C through A and B), a subscriber attached to C and a
//! publisher attached to A, and headless Chromium loading A's `/dashboard`.
//! The test drives Chromium over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: no port, no WebSocket), waits (bounded) until
//! the page shows the three nodes, their three links and non-zero rates,
//! asserts on the DOM and keeps a screenshot and the DOM as artifacts in
//! `<target dir>/test-artifacts/`.
//!
//! Without Chromium (`/usr/bin/chromium`, Debian's `chromium`) the test is
//! skipped with a loud line (`MACULA_TEST_CHROMIUM` names another binary),
//! unless `MACULA_TEST_REQUIRE_CHROMIUM=1` (CI,
//! `.ci/run`), where it fails.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const REALM: &str = "test.dashboard";
/// The browser binary (Debian's `chromium` package), unless
/// `MACULA_TEST_CHROMIUM` names another.
const CHROMIUM: &str = "/usr/bin/chromium";

fn chromium() -> String {
    std::env::var("MACULA_TEST_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_string())
}
/// Set to 1 to make a missing browser fail the test instead of skipping it.
const REQUIRE_ENV: &str = "MACULA_TEST_REQUIRE_CHROMIUM";
/// Until the page shows the whole mesh with traffic.
const PAGE_DEADLINE: Duration = Duration::from_secs(45);
/// For each browser command after that (screenshot, DOM, close).
const STEP_DEADLINE: Duration = Duration::from_secs(20);

/// True when the test must return early (then it passes as skipped, saying
/// so on stderr); panics instead when `MACULA_TEST_REQUIRE_CHROMIUM=1`.
fn skip() -> bool {
    let browser = chromium();
    if Path::new(&browser).exists() {
        return false;
    }
    let why = format!("needs {browser} (apt-get install chromium)");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("dashboard browser test cannot run: {why} ({REQUIRE_ENV}=1)");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of a
    // passing test, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\nSKIPPED dashboard browser test: {why}; set {REQUIRE_ENV}=1 to make this a failure\n"
    );
    true
}

/// One HTTP/1.1 GET on loopback with the test admin token: (status, body).
fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the admin port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read answer");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Where artifacts go: `<target dir>/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    // BIN is <target dir>/<profile>/macula.
    let dir = Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create test-artifacts");
    dir
}

/// Headless Chromium driven over `--remote-debugging-pipe` (fd 3 carries
/// commands to it, fd 4 its answers, each a JSON text ending in NUL).
/// Killed on drop.
struct Browser {
    child: Child,
    to: ChildStdin,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let user_data = format!("--user-data-dir={}", profile.path().display());
        let browser = chromium();
        // The shell puts our pipes on fds 3 and 4 and gets out of the way.
        let mut child = Command::new("sh")
            .args([
                "-c",
                "exec \"$0\" \"$@\" 3<&0 4>&1 0</dev/null 1>/dev/null",
                &browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--window-size=1280,1100",
                "--remote-debugging-pipe",
                &user_data,
                "about:blank",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromium");
        let to = child.stdin.take().expect("stdin");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
                buf.clear();
            }
        });
        Browser {
            child,
            to,
            from: rx,
            next_id: 1,
            _profile: profile,
        }
    }

    /// Sends one command (to `session` when given) and waits for its
    /// answer, skipping events; panics on an error answer or at `deadline`.
    fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
        deadline: Instant,
    ) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        self.to.flush().expect("flush");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer from chromium to {method} in time"));
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("chromium refused {method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test reads from the page: the graph's nodes and links, the
/// table's rates and clients, the connection state.
const READ_DOM: &str = r#"JSON.stringify({
  conn: document.getElementById('conn').dataset.state,
  nodes: [...document.querySelectorAll('#graph g.node')].map(g => ({
    id: g.dataset.nodeId, cls: g.getAttribute('class') })),
  links: [...document.querySelectorAll('#graph line.link')].map(l => ({
    a: l.dataset.a, b: l.dataset.b, kind: l.dataset.kind })),
  rows: [...document.querySelectorAll('#nodes tbody tr')].map(tr => ({
    id: tr.dataset.nodeId, source: tr.dataset.source,
    clients: Number((tr.querySelector('[data-clients]') || {dataset: {clients: '-1'}}).dataset.clients),
    rates: Object.fromEntries([...tr.querySelectorAll('td.rate')].map(td =>
      [td.dataset.rate, Number(td.dataset.value)])) })),
  subscriptions: document.getElementById('subscriptions').textContent,
})"#;

fn rate(row: &Value, name: &str) -> f64 {
    row["rates"][name].as_f64().unwrap_or(0.0)
}

/// The page is complete: the three nodes reporting, three direct links,
/// and traffic in every node's rates.
fn complete(dom: &Value, ids: &[String]) -> bool {
    let nodes = dom["nodes"].as_array().map_or(0, Vec::len);
    let links = dom["links"].as_array().map_or(0, Vec::len);
    let rows = dom["rows"].as_array().cloned().unwrap_or_default();
    nodes == 3
        && links == 3
        && rows.len() == 3
        && ids.iter().all(|id| {
            rows.iter()
                .any(|r| r["id"] == json!(id) && rate(r, "messages_in") > 0.0)
        })
        && rows.iter().any(|r| rate(r, "pubsub_in") > 0.0)
}

#[test]
fn dashboard_in_headless_chromium_shows_the_mesh() {
    if skip() {
        return;
    }
    // The mesh: A; B through A; C through A and B (a triangle).
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = Proc::spawn(&start_args(REALM, dirs[0].path(), &[]));
    let a_addr = a.field("listen");
    let a_http = a.field("http");
    let a_id = a.field("node_id");
    assert_eq!(a.field("dashboard"), format!("http://{a_http}/dashboard"));
    let mut b = Proc::spawn(&start_args(
        REALM,
        dirs[1].path(),
        &["--bootstrap", &a_addr],
    ));
    let b_addr = b.field("listen");
    let b_id = b.field("node_id");
    b.wait_for(&["joined the DHT"]);
    let both = format!("{a_addr},{b_addr}");
    let mut c = Proc::spawn(&start_args(REALM, dirs[2].path(), &["--bootstrap", &both]));
    let c_addr = c.field("listen");
    let c_id = c.field("node_id");
    c.wait_for(&["joined the DHT"]);
    let ids = vec![a_id.clone(), b_id.clone(), c_id.clone()];

    // The page is public, its data is not.
    let (status, page) = http_get(&a_http, "/dashboard", None);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("/dashboard/app.js"), "{page}");
    let (status, body) = http_get(&a_http, "/admin/dashboard", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = http_get(&a_http, "/admin/dashboard", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).expect("report");
    assert_eq!(report["node_id"], json!(a_id));

    // Traffic: a subscriber attached to C, a publisher attached to A
    // publishing for the whole browser part (bounded count and rate).
    let mut sub = Proc::spawn(&["sub", "dash.**", "--realm", REALM, "--connect", &c_addr]);
    sub.wait_for(&["subscribed to dash.**"]);
    let publisher = Proc::spawn(&[
        "pub",
        "dash.temp",
        "21.5",
        "--count",
        "600",
        "--rate",
        "10",
        "--realm",
        REALM,
        "--connect",
        &a_addr,
    ]);

    // The browser.
    let deadline = Instant::now() + PAGE_DEADLINE;
    let mut browser = Browser::start();
    let url = format!("http://{a_http}/dashboard#token={ADMIN_TOKEN}");
    let target = browser.call(None, "Target.createTarget", json!({ "url": url }), deadline);
    let target_id = target["targetId"].as_str().expect("targetId").to_string();
    let attached = browser.call(
        None,
        "Target.attachToTarget",
        json!({ "targetId": target_id, "flatten": true }),
        deadline,
    );
    let session = attached["sessionId"]
        .as_str()
        .expect("sessionId")
        .to_string();
    let read = |browser: &mut Browser| -> Value {
        let r = browser.call(
            Some(&session),
            "Runtime.evaluate",
            json!({ "expression": READ_DOM, "returnByValue": true }),
            deadline,
        );
        r["result"]["value"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null)
    };
    let mut dom = Value::Null;
    while Instant::now() < deadline {
        dom = read(&mut browser);
        if complete(&dom, &ids) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    // Artifacts first, so a failure can be looked at.
    let dir = artifacts_dir();
    let deadline = Instant::now() + STEP_DEADLINE;
    let shot = browser.call(
        Some(&session),
        "Page.captureScreenshot",
        json!({ "format": "png", "captureBeyondViewport": true }),
        deadline,
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("base64 png");
    let png_path = dir.join("dashboard.png");
    std::fs::write(&png_path, &png).expect("write screenshot");
    let html = browser.call(
        Some(&session),
        "Runtime.evaluate",
        json!({ "expression": "document.documentElement.outerHTML", "returnByValue": true }),
        deadline,
    );
    let html_path = dir.join("dashboard.html");
    std::fs::write(&html_path, html["result"]["value"].as_str().unwrap_or("")).expect("write DOM");
    // Not captured by libtest, so the path shows in every run.
    let _ = writeln!(
        std::io::stderr(),
        "dashboard artifacts: {} ({} bytes), {}",
        png_path.display(),
        png.len(),
        html_path.display()
    );
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );

    // The DOM: three nodes (A itself, B and C reporting), three direct
    // links among them, traffic everywhere, the subscriber counted as C's
    // client.
    assert!(
        complete(&dom, &ids),
        "the page never showed the mesh: {dom:#}"
    );
    assert_eq!(dom["conn"], "live", "{dom:#}");
    let nodes = dom["nodes"].as_array().expect("nodes");
    let class_of = |id: &str| {
        nodes
            .iter()
            .find(|n| n["id"] == json!(id))
            .and_then(|n| n["cls"].as_str())
            .unwrap_or("")
            .to_string()
    };
    assert!(class_of(&a_id).contains("self"), "{dom:#}");
    assert!(class_of(&b_id).contains("peer"), "{dom:#}");
    assert!(class_of(&c_id).contains("peer"), "{dom:#}");
    let mut pairs: Vec<(String, String)> = dom["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| {
            assert_eq!(l["kind"], "direct", "{l}");
            let (x, y) = (l["a"].as_str().unwrap(), l["b"].as_str().unwrap());
            (x.min(y).to_string(), x.max(y).to_string())
        })
        .collect();
    pairs.sort();
    let mut want: Vec<(String, String)> = [(&a_id, &b_id), (&a_id, &c_id), (&b_id, &c_id)]
        .iter()
        .map(|(x, y)| ((*x).min(*y).clone(), (*x).max(*y).clone()))
        .collect();
    want.sort();
    assert_eq!(
        pairs, want,
        "the triangle, B-C learned from B's or C's report"
    );
    let rows = dom["rows"].as_array().expect("rows");
    let row = |id: &str| rows.iter().find(|r| r["id"] == json!(id)).expect("row");
    assert_eq!(row(&c_id)["clients"], 1, "the subscriber: {dom:#}");
    // A takes its client's messages and passes them on towards C, which
    // takes them and hands them to its client.
    assert!(
        rate(row(&a_id), "pubsub_in") > 0.0,
        "A's publisher: {dom:#}"
    );
    assert!(rate(row(&a_id), "pubsub_out") > 0.0, "A forwards: {dom:#}");
    assert!(rate(row(&c_id), "pubsub_in") > 0.0, "C receives: {dom:#}");
    assert!(
        rate(row(&c_id), "pubsub_out") > 0.0,
        "C to its subscriber: {dom:#}"
    );
    for id in &ids {
        assert!(rate(row(id), "messages_in") > 0.0, "{id}: {dom:#}");
        assert!(rate(row(id), "messages_out") > 0.0, "{id}: {dom:#}");
    }

    // The stream limit: the page holds one of A's 8 streams.
    let (status, body) = http_get(&a_http, "/admin/dashboard", Some(ADMIN_TOKEN));
    assert_eq!(status, 200);
    let report: Value = serde_json::from_str(&body).expect("report");
    assert_eq!(report["streams_open"], 1, "{report:#}");

    // A wrong token: the page says the node refused it and asks for one.
    let deadline = Instant::now() + STEP_DEADLINE;
    let wrong = format!("http://{a_http}/dashboard#token=not-the-token");
    let target = browser.call(
        None,
        "Target.createTarget",
        json!({ "url": wrong }),
        deadline,
    );
    let attached = browser.call(
        None,
        "Target.attachToTarget",
        json!({ "targetId": target["targetId"], "flatten": true }),
        deadline,
    );
    let refused_session = attached["sessionId"]
        .as_str()
        .expect("sessionId")
        .to_string();
    let ask = r#"JSON.stringify({ conn: document.getElementById('conn').dataset.state,
        form: !document.getElementById('auth').hidden,
        why: document.getElementById('auth-why').textContent })"#;
    let mut page = Value::Null;
    while Instant::now() < deadline {
        let r = browser.call(
            Some(&refused_session),
            "Runtime.evaluate",
            json!({ "expression": ask, "returnByValue": true }),
            deadline,
        );
        page = r["result"]["value"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        if page["conn"] == "unauthorized" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(page["conn"], "unauthorized", "{page:#}");
    assert_eq!(page["form"], true, "{page:#}");
    assert!(
        page["why"]
            .as_str()
            .unwrap_or("")
            .contains("refused the token"),
        "{page:#}"
    );

    // A stops cleanly and at once with the page still streaming from it:
    // the stream ends at the node's shutdown.
    drop(publisher);
    drop(sub);
    let stopping = Instant::now();
    assert_eq!(a.terminate(), Some(0));
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
    let rest: Vec<String> = a.lines.try_iter().collect();
    assert!(
        !rest.iter().any(|l| l.contains("did not stop in time")),
        "{rest:#?}"
    );
    browser.call(
        None,
        "Browser.close",
        json!({}),
        Instant::now() + STEP_DEADLINE,
    );
    drop(browser);
    for p in [&mut b, &mut c] {
        p.terminate();
    }
}
