//! The node status service and the dashboard's data over real QUIC and
//! real HTTP on 127.0.0.1: a raw peer's STATUS_REQUEST answered, refused
//! when too fast, reports not asked for dropped; a node's dashboard report
//! holding what its peers reported (the line A - B - C seen from A: C only
//! through B's links); the event stream's limit. Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{config, eventually, line, start, within, RawClient, ADMIN_TOKEN, STEP};
use macula_runtime::admin::{self, DashboardReport};
use macula_runtime::NodeRuntime;
use macula_wire::status::{StatusMessage, StatusReport, StatusRequest};
use macula_wire::{ErrorCode, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves the admin API of `node` on an ephemeral port until the test ends.
async fn admin(node: &NodeRuntime) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin listener");
    let addr = listener.local_addr().expect("admin addr");
    tokio::spawn(admin::serve(
        listener,
        node.clone(),
        std::future::pending::<()>(),
    ));
    addr
}

/// Sends a GET with the admin token and returns the connection after
/// reading the response head (status and headers as text).
async fn open(addr: SocketAddr, path: &str) -> (tokio::net::TcpStream, u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the admin server");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within(STEP, "response head", s.read(&mut byte))
            .await
            .expect("read head");
        assert!(n == 1, "connection closed in the head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("UTF-8 head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (s, status, head)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (mut s, status, _) = open(addr, path).await;
    let mut body = String::new();
    within(STEP, "response body", s.read_to_string(&mut body))
        .await
        .expect("read body");
    (status, body)
}

async fn report(addr: SocketAddr) -> DashboardReport {
    let (status, body) = get(addr, "/admin/dashboard").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("bad report ({e}): {body}"))
}

#[tokio::test]
async fn status_request_is_answered_rate_limited_and_checked() {
    common::init_tracing();
    let node = start(config()).await;
    let raw = RawClient::connect(&node).await;
    let mut s = raw.handshake(&node).await;
    s.send(&Message::Status(StatusMessage::Request(StatusRequest {
        nonce: 41,
    })))
    .await;
    let status = loop {
        match s.recv().await {
            Message::Status(StatusMessage::Report(r)) => {
                assert_eq!(r.nonce, 41);
                assert!(r.refused.is_empty(), "{r:?}");
                break r.status.expect("a status");
            }
            // Pings, DHT traffic: not ours.
            _ => continue,
        }
    };
    assert_eq!(status.node_id, node.node_id());
    assert!(status.ready);
    assert!(
        status.addrs.contains(&node.local_addr().to_string()),
        "{status:?}"
    );
    assert!(
        status
            .links
            .iter()
            .any(|l| l.node_id == raw.identity.node_id() && l.relayed_via.is_none() && !l.outbound),
        "the raw peer is a direct inbound link: {status:?}"
    );
    assert!(status.totals.messages_in >= 1, "{:?}", status.totals);

    // At once again: over the answer limit.
    s.send(&Message::Status(StatusMessage::Request(StatusRequest {
        nonce: 42,
    })))
    .await;
    loop {
        match s.recv().await {
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
                break;
            }
            Message::Status(m) => panic!("answered over the limit: {m:?}"),
            _ => continue,
        }
    }
    // A report nobody asked for is dropped and counted.
    s.send(&Message::Status(StatusMessage::Report(StatusReport {
        nonce: 7,
        status: Some(status.clone()),
        refused: String::new(),
    })))
    .await;
    let counters = node.status_service().counters().clone();
    eventually(STEP, "unsolicited report counted", || {
        counters.reports_received.at(2).get() == 1
    })
    .await;
    assert_eq!(counters.requests_received.at(0).get(), 1);
    assert_eq!(counters.requests_received.at(2).get(), 1);
    // After the interval, answered again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.send(&Message::Status(StatusMessage::Request(StatusRequest {
        nonce: 43,
    })))
    .await;
    loop {
        if let Message::Status(StatusMessage::Report(r)) = s.recv().await {
            assert_eq!(r.nonce, 43);
            assert!(r.status.is_some());
            break;
        }
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_dashboard_shows_what_peers_report() {
    common::init_tracing();
    let (a, b, c) = line().await;
    let addr = admin(&a).await;
    // The first read starts the rounds; B reports within a few intervals.
    let mut last = report(addr).await;
    assert_eq!(last.nodes[0].node_id, a.node_id().to_string());
    assert_eq!(last.nodes[0].source, "self");
    let (bid, cid) = (b.node_id().to_string(), c.node_id().to_string());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let complete = |r: &DashboardReport| {
        let b_peer = r
            .nodes
            .iter()
            .any(|n| n.node_id == bid && n.source == "peer" && n.status.is_some());
        let bc = r
            .links
            .iter()
            .any(|l| (l.a == bid && l.b == cid) || (l.a == cid && l.b == bid));
        b_peer && bc
    };
    while !complete(&last) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = report(addr).await;
    }
    assert!(complete(&last), "{last:#?}");
    // C is not A's peer (a line), unless the DHT connected them: either it
    // reports, or it is only seen in B's links.
    let c_node = last
        .nodes
        .iter()
        .find(|n| n.node_id == cid)
        .expect("C is in the view");
    assert!(
        ["peer", "seen"].contains(&c_node.source.as_str()),
        "{c_node:?}"
    );
    let b_status = last
        .nodes
        .iter()
        .find(|n| n.node_id == bid)
        .and_then(|n| n.status.clone())
        .expect("B's status");
    assert!(b_status.ready && b_status.peers >= 2, "{b_status:?}");
    assert!(b_status.uptime_secs < 60);
    assert_eq!(b_status.rates.len(), 8);
    assert!(a.status_service().counters().requests_sent.get() >= 1);
    assert!(b.status_service().counters().requests_received.at(0).get() >= 1);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn event_streams_are_bounded() {
    common::init_tracing();
    let mut cfg = config();
    cfg.dashboard.max_streams = 1;
    cfg.dashboard.interval = Duration::from_millis(100);
    let node = start(cfg).await;
    let addr = admin(&node).await;
    let (mut first, status, head) = open(addr, "/admin/dashboard/events").await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    // Two snapshots arrive on the stream.
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("event: snapshot").count() < 2 {
        let n = within(STEP, "stream events", first.read(&mut buf))
            .await
            .expect("read events");
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let data = seen
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let r: DashboardReport = serde_json::from_str(data).expect("a report");
    assert_eq!(r.node_id, node.node_id().to_string());
    assert_eq!(r.streams_open, 1);
    // The second stream is refused, clearly, and counted.
    let (status, body) = get(addr, "/admin/dashboard/events").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("dashboard.too_many_streams") && body.contains("dashboard_max_streams"),
        "{body}"
    );
    let counters = node.status_service().counters().clone();
    assert_eq!(counters.streams_refused.get(), 1);
    // The one-shot report is not a stream: still answered.
    let (status, _) = get(addr, "/admin/dashboard").await;
    assert_eq!(status, 200);
    // Closing the first frees its place.
    drop(first);
    eventually(STEP, "the stream's place freed", || {
        counters.streams.get() == 0
    })
    .await;
    let (_again, status, head) = open(addr, "/admin/dashboard/events").await;
    assert_eq!(status, 200, "{head}");
    // The page and its assets need no credentials; the data does.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /dashboard HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut page = String::new();
    within(STEP, "page", s.read_to_string(&mut page))
        .await
        .expect("read page");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("content-security-policy"), "{page}");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /admin/dashboard HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut refused = String::new();
    within(STEP, "refusal", s.read_to_string(&mut refused))
        .await
        .expect("read refusal");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    node.shutdown().await;
}

/// A node of a realm with an authority whose grant has `rules`, joined
/// through `via`.
async fn member(
    authority: &ed25519_dalek::SigningKey,
    serial: u8,
    rules: &str,
    via: Option<&NodeRuntime>,
) -> (NodeRuntime, tempfile::TempDir) {
    use macula_runtime::{config::Admission, Identity, IdentitySource, NodeConfig};
    let dir = tempfile::tempdir().expect("dir");
    let id = Identity::load_or_create(dir.path())
        .expect("identity")
        .node_id();
    let g = common::signed_grant(
        authority,
        serial,
        macula_auth::Subject::Node(id),
        rules,
        0,
        u64::MAX / 2,
    );
    let node = start(NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        admission: Some(Admission::new(macula_auth::Key::of(authority), Some(g))),
        ..via.map(common::boot).unwrap_or_else(config)
    })
    .await;
    if via.is_some() {
        common::joined(&node).await;
    }
    (node, dir)
}

/// In a realm with an authority a node reports only to peers whose grant
/// allows `admin admin.dashboard`; the other's dashboard shows why not.
#[tokio::test]
async fn with_an_authority_only_allowed_peers_get_a_report() {
    common::init_tracing();
    let authority = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (ops, _od) = member(
        &authority,
        1,
        "allow publish **\nallow admin admin.dashboard",
        None,
    )
    .await;
    let (plain, _pd) = member(&authority, 2, "allow publish **", Some(&ops)).await;
    let (ops_http, plain_http) = (admin(&ops).await, admin(&plain).await);
    let (ops_id, plain_id) = (ops.node_id().to_string(), plain.node_id().to_string());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut at_ops, mut at_plain) = (report(ops_http).await, report(plain_http).await);
    let reported = |r: &DashboardReport, id: &str| {
        r.nodes
            .iter()
            .find(|n| n.node_id == id)
            .map(|n| (n.status.is_some(), n.refused.clone()))
    };
    while tokio::time::Instant::now() < deadline
        && !(reported(&at_ops, &plain_id).is_some_and(|(s, _)| s)
            && reported(&at_plain, &ops_id).is_some_and(|(_, r)| r.is_some()))
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        at_ops = report(ops_http).await;
        at_plain = report(plain_http).await;
    }
    assert_eq!(
        reported(&at_ops, &plain_id),
        Some((true, None)),
        "the allowed node gets the report: {at_ops:#?}"
    );
    let (has_status, refused) = reported(&at_plain, &ops_id).expect("ops in plain's view");
    assert!(!has_status);
    let why = refused.expect("the refusal");
    assert!(why.contains("admin.dashboard"), "{why}");
    assert!(
        ops.status_service()
            .counters()
            .requests_received
            .at(1)
            .get()
            >= 1
    );
    assert!(
        plain
            .status_service()
            .counters()
            .reports_received
            .at(1)
            .get()
            >= 1
    );
    for n in [ops, plain] {
        n.shutdown().await;
    }
}
