//! The admin HTTP server against real nodes on 127.0.0.1: every endpoint is
//! fetched over a real TCP connection with a hand-written HTTP/1.1 client
//! (independent of the CLI's), and the content is checked. Every wait is
//! bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{config, start, within, ADMIN_TOKEN, STEP};
use macula_runtime::admin::{self, HealthReport, PeersReport, ReadyReport};
use macula_runtime::{NodeRuntime, PeerAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// A running admin server; stops it (and waits, bounded) on `stop`.
struct Admin {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Admin {
    async fn start(node: &NodeRuntime) -> Admin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin listener");
        let addr = listener.local_addr().expect("admin addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(admin::serve(listener, node.clone(), async move {
            let _ = rx.await;
        }));
        Admin {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        within(STEP, path, http(self.addr, "GET", path)).await
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        r.json()
    }

    async fn metrics(&self) -> String {
        let r = self.get("/metrics").await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        within(STEP, "admin server stops", &mut self.task)
            .await
            .expect("join admin task")
            .expect("admin server result");
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close` and the admin token;
/// reads to EOF.
async fn http(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to admin server");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let reply = Reply {
        status,
        headers,
        body: body.to_string(),
    };
    // Every admin answer has a known length (no chunked streaming).
    let len: usize = reply
        .header("content-length")
        .expect("content-length")
        .parse()
        .expect("numeric content-length");
    assert_eq!(len, reply.body.len());
    reply
}

/// The value of an unlabelled or labelled sample line, e.g.
/// `sample(text, "macula_connections_total{direction=\"inbound\"}")`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().expect("numeric sample"))
        })
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// Families every node exports, as (name in `# TYPE`, type).
const FAMILIES: &[(&str, &str)] = &[
    ("macula_e2e_keyset_version", "gauge"),
    ("macula_e2e_keysets", "counter"),
    ("macula_e2e_payloads", "counter"),
    ("macula_trace_spans_exported", "counter"),
    ("macula_trace_spans_dropped", "counter"),
    ("macula_streams", "gauge"),
    ("macula_streams_broken", "gauge"),
    ("macula_stream_publishes", "counter"),
    ("macula_stream_pulls", "counter"),
    ("macula_stream_delivered", "counter"),
    ("macula_stream_messages", "gauge"),
    ("macula_stream_removed", "counter"),
    ("macula_connections", "counter"),
    ("macula_connections_current", "gauge"),
    ("macula_connections_closed", "counter"),
    ("macula_connections_refused", "counter"),
    ("macula_pool_hits", "counter"),
    ("macula_pool_misses", "counter"),
    ("macula_pool_evictions", "counter"),
    ("macula_pool_idle_closed", "counter"),
    ("macula_pool_duplicates_closed", "counter"),
    ("macula_reconnect_attempts", "counter"),
    ("macula_frames_received", "counter"),
    ("macula_frames_sent", "counter"),
    ("macula_pings_received", "counter"),
    ("macula_pongs_received", "counter"),
    ("macula_pongs_unmatched", "counter"),
    ("macula_protocol_errors", "counter"),
    ("macula_handshake_failures", "counter"),
    ("macula_uptime_seconds", "gauge"),
    ("macula_peers", "gauge"),
    ("macula_messages", "counter"),
    ("macula_pubsub_published", "counter"),
    ("macula_pubsub_dropped_slow", "counter"),
    ("macula_pubsub_subscriptions", "gauge"),
    ("macula_messages_sent", "counter"),
    ("macula_dht_records", "gauge"),
    ("macula_dht_routing_table_size", "gauge"),
    ("macula_dht_lookups", "counter"),
    ("macula_dht_request_timeouts", "counter"),
    ("macula_dht_resends", "counter"),
    ("macula_dht_cache_hits", "counter"),
    ("macula_ready", "gauge"),
    ("macula_dht_routing_hops", "histogram"),
    ("macula_dht_lookup_duration_seconds", "histogram"),
    ("macula_pubsub_delivery_wait_seconds", "histogram"),
    ("macula_rpc_calls", "counter"),
    ("macula_rpc_served", "counter"),
    ("macula_rpc_inflight_calls", "gauge"),
    ("macula_rpc_advertised", "gauge"),
    ("macula_rpc_duration_seconds", "histogram"),
    ("macula_pubsub_unproved_dropped", "counter"),
    ("macula_rpc_unproved_callers", "counter"),
    ("macula_node", "info"),
    ("macula_nat_mapping", "gauge"),
    ("macula_nat_observers", "gauge"),
    ("macula_nat_address_changes", "counter"),
    ("macula_nat_connections_opened", "counter"),
    ("macula_nat_connections_direct", "counter"),
    ("macula_holepunch_attempts", "counter"),
    ("macula_holepunch_rounds", "counter"),
    ("macula_holepunch_first_round", "counter"),
    ("macula_holepunch_responder_dials", "counter"),
];

#[tokio::test]
async fn every_endpoint_of_a_first_node() {
    common::init_tracing();
    let node = start(config()).await;
    let admin = Admin::start(&node).await;

    let live = admin.get("/live").await;
    assert_eq!(live.status, 200);

    // No bootstrap peers: the first node is ready at once.
    let ready = admin.get("/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let ready: ReadyReport = ready.json();
    assert!(ready.ready);
    assert!(ready.reason.contains("first node"), "{}", ready.reason);

    let health: HealthReport = admin.json("/health").await;
    assert_eq!(health.status, "ok");
    assert!(health.ready);
    assert_eq!(health.node_id, node.node_id().to_string());
    assert_eq!(health.realm, node.realm());
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(health.peers, 0);
    assert_eq!(health.listen, node.local_addr());
    assert!(health.uptime_secs < 60);
    assert_eq!(health.dht_records, 0);
    // Alone: nobody has observed it yet.
    assert_eq!(health.nat.mapping, "unknown");
    assert_eq!(health.nat.behind_nat, None);
    assert_eq!(health.nat.connections_opened, 0);
    assert_eq!(health.nat.direct_percent, None);

    let peers: PeersReport = admin.json("/admin/peers").await;
    assert_eq!(peers.node_id, node.node_id().to_string());
    assert!(peers.peers.is_empty());

    let sub = node.pubsub().subscribe("orders.**").unwrap();
    let mut twice = node.pubsub().subscribe("orders.**").unwrap();
    let subs: serde_json::Value = admin.json("/admin/subscriptions").await;
    assert_eq!(subs["node_id"], node.node_id().to_string());
    assert_eq!(subs["subscriptions"][0]["pattern"], "orders.**");
    assert_eq!(subs["subscriptions"][0]["count"], 2);
    drop(sub);
    let subs: serde_json::Value = admin.json("/admin/subscriptions").await;
    assert_eq!(subs["subscriptions"][0]["count"], 1);

    // An event waits in the subscription's queue until taken: its wait is
    // observed (the first event a subscription takes always is).
    node.pubsub()
        .publish(
            "orders.new",
            bytes::Bytes::from_static(b"o1"),
            Default::default(),
        )
        .expect("publish");
    let got = within(STEP, "pub/sub event", twice.recv()).await;
    assert!(
        matches!(
            got,
            Some(macula_runtime::pubsub::SubscriptionItem::Event(_))
        ),
        "{got:?}"
    );
    // A lookup that finishes (alone: nothing to ask) is timed and its
    // rounds counted.
    within(
        STEP,
        "DHT lookup",
        node.dht()
            .get_fresh(macula_wire::NodeId::from_bytes([7; 32])),
    )
    .await
    .expect("lookup");

    // A procedure served and called on this node (in process).
    let reg = node
        .rpc()
        .advertise(
            "svc.echo",
            macula_runtime::rpc::AdvertiseOptions::default(),
            |r: macula_runtime::rpc::Request| async move {
                Ok::<_, macula_runtime::rpc::HandlerError>(r.payload)
            },
        )
        .await
        .expect("advertise");
    let reply = node.rpc().call("svc.echo", "hi").await.expect("call");
    assert_eq!(reply.payload, "hi");
    let services: serde_json::Value = admin.json("/admin/services").await;
    assert_eq!(services["node_id"], node.node_id().to_string());
    assert_eq!(services["local"][0]["procedure"], "svc.echo");
    assert_eq!(services["mesh"][0]["procedure"], "svc.echo");
    assert_eq!(
        services["mesh"][0]["providers"][0]["node_id"],
        node.node_id().to_string()
    );
    assert!(services["mesh_error"].is_null(), "{services}");

    let m = admin.get("/metrics").await;
    assert_eq!(sample(&m.body, "macula_rpc_calls_total"), 1.0);
    assert_eq!(sample(&m.body, "macula_rpc_advertised"), 1.0);
    assert_eq!(
        sample(
            &m.body,
            "macula_rpc_duration_seconds_count{procedure=\"svc.echo\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&m.body, "macula_pubsub_delivery_wait_seconds_count"),
        1.0
    );
    assert!(sample(&m.body, "macula_dht_lookup_duration_seconds_count") >= 1.0);
    assert!(sample(&m.body, "macula_dht_routing_hops_count") >= 1.0);
    assert!(
        sample(
            &m.body,
            "macula_messages_total{type=\"ping\",direction=\"out\"}"
        ) >= 0.0
    );
    drop(reg);
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        m.headers
    );
    for (name, kind) in FAMILIES {
        assert!(
            m.body.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{}",
            m.body
        );
        assert!(
            m.body.contains(&format!("# TYPE {name} {kind}\n")),
            "no TYPE {kind} for {name}:\n{}",
            m.body
        );
    }
    assert_eq!(sample(&m.body, "macula_peers"), 0.0);
    assert_eq!(sample(&m.body, "macula_ready"), 1.0);
    assert_eq!(
        sample(
            &m.body,
            "macula_protocol_errors_total{kind=\"frame_too_large\"}"
        ),
        0.0
    );
    assert!(m.body.contains(&format!(
        "macula_node_info{{node_id=\"{}\",realm=\"{}\",version=\"{}\"}} 1",
        node.node_id(),
        node.realm(),
        env!("CARGO_PKG_VERSION")
    )));
    assert!(m.body.ends_with("# EOF\n"));

    // Unknown paths and other methods: JSON errors.
    let missing = admin.get("/nope").await;
    assert_eq!(missing.status, 404);
    let err: serde_json::Value = missing.json();
    assert_eq!(err["status"], 404);
    assert!(err["error"].as_str().unwrap().contains("/nope"));
    let post = within(STEP, "POST", http(admin.addr, "POST", "/health")).await;
    assert_eq!(post.status, 405);
    let err: serde_json::Value = post.json();
    assert_eq!(err["status"], 405);

    // Once shutdown has begun, readiness is withdrawn (the daemon keeps the
    // admin server up while the node says goodbye).
    node.shutdown().await;
    let r = admin.get("/ready").await;
    assert_eq!(r.status, 503);
    let report: ReadyReport = r.json();
    assert_eq!(report.reason, "shutting down");

    let addr = admin.addr;
    admin.stop().await;
    // Stopped means stopped: the port no longer answers.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn metrics_and_peers_follow_traffic_and_stay_per_node() {
    common::init_tracing();
    let a = start(config()).await;
    let b = start(config()).await;
    let admin_a = Admin::start(&a).await;
    let admin_b = Admin::start(&b).await;

    let before = admin_a.metrics().await;
    let inbound = "macula_connections_total{direction=\"inbound\"}";
    assert_eq!(sample(&before, inbound), 0.0);
    let pings_before = sample(&before, "macula_pings_received_total");
    let frames_before = sample(&before, "macula_frames_received_total");

    let peer = within(
        STEP,
        "B connects to A",
        b.connect(a.local_addr(), Some(a.node_id())),
    )
    .await
    .expect("B connects to A");
    within(STEP, "B pings A", peer.ping(STEP))
        .await
        .expect("ping answered");

    // A lists B once its side registered the connection.
    let b_id = b.node_id().to_string();
    let peers: PeersReport = eventually_json(&admin_a, "/admin/peers", |p: &PeersReport| {
        p.peers.iter().any(|x| x.node_id == b_id)
    })
    .await;
    let listed = &peers.peers[0];
    assert_eq!(peers.peers.len(), 1);
    assert_eq!(listed.direction, "inbound");
    assert_eq!(listed.listen_addrs, vec![b.local_addr().to_string()]);
    assert!(listed.agent.starts_with("macula/"), "{}", listed.agent);
    assert!(!listed.kept);

    let at_b: PeersReport = admin_b.json("/admin/peers").await;
    assert_eq!(at_b.peers.len(), 1);
    assert_eq!(at_b.peers[0].node_id, a.node_id().to_string());
    assert_eq!(at_b.peers[0].direction, "outbound");
    assert_eq!(at_b.peers[0].addr, a.local_addr());

    let after = admin_a.metrics().await;
    assert_eq!(sample(&after, inbound), 1.0);
    assert!(sample(&after, "macula_pings_received_total") > pings_before);
    assert!(sample(&after, "macula_frames_received_total") > frames_before);
    assert_eq!(sample(&after, "macula_peers"), 1.0);
    assert_eq!(sample(&after, "macula_connections_current"), 1.0);
    // Per-type message counters: the pings B sent, and the HELLO.
    assert!(
        sample(
            &after,
            "macula_messages_total{type=\"ping\",direction=\"in\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &after,
            "macula_messages_total{type=\"pong\",direction=\"out\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &after,
            "macula_messages_total{type=\"unknown\",direction=\"in\"}"
        ),
        0.0
    );
    assert!(sample(&after, "macula_messages_sent_total{type=\"pong\"}") >= 1.0);

    // Each node has its own registry: B dialed, A accepted.
    let mb = admin_b.metrics().await;
    assert_eq!(sample(&mb, inbound), 0.0);
    assert_eq!(
        sample(&mb, "macula_connections_total{direction=\"outbound\"}"),
        1.0
    );
    assert_eq!(sample(&mb, "macula_pool_misses_total"), 1.0);
    assert!(mb.contains(&format!("node_id=\"{}\"", b.node_id())));
    assert!(!mb.contains(&format!("node_id=\"{}\"", a.node_id())));

    let health: HealthReport = admin_a.json("/health").await;
    assert_eq!(health.peers, 1);

    admin_a.stop().await;
    admin_b.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn ready_flips_when_the_bootstrap_peer_connects() {
    common::init_tracing();
    // B bootstraps to a port where nothing listens yet.
    let port = common::free_port();
    let mut cfg = config();
    cfg.bootstrap = vec![format!("127.0.0.1:{port}")
        .parse::<PeerAddr>()
        .expect("peer addr")];
    cfg.limits.handshake_timeout = Duration::from_millis(500);
    cfg.limits.reconnect_backoff_min = Duration::from_millis(50);
    cfg.limits.reconnect_backoff_max = Duration::from_millis(200);
    let b = start(cfg).await;
    let admin = Admin::start(&b).await;

    let not_yet = admin.get("/ready").await;
    assert_eq!(not_yet.status, 503, "{}", not_yet.body);
    let report: ReadyReport = not_yet.json();
    assert!(!report.ready);
    assert!(report.reason.contains("joining"), "{}", report.reason);
    let health: HealthReport = admin.json("/health").await;
    assert_eq!(health.status, "degraded");
    assert!(!health.ready);
    assert_eq!(sample(&admin.metrics().await, "macula_ready"), 0.0);
    // Live regardless.
    assert_eq!(admin.get("/live").await.status, 200);

    // The bootstrap node appears; B's supervisor reaches it.
    let a = common::start_on_port(config(), port).await;
    let ready: ReadyReport = eventually_status(&admin, "/ready", 200).await.json();
    assert!(ready.ready);
    assert!(ready.reason.contains("joined"), "{}", ready.reason);
    let peers: PeersReport = admin.json("/admin/peers").await;
    assert_eq!(peers.peers.len(), 1);
    assert_eq!(peers.peers[0].node_id, a.node_id().to_string());
    assert!(peers.peers[0].kept, "bootstrap connections are kept");
    let health: HealthReport = admin.json("/health").await;
    assert_eq!(health.status, "ok");

    // Once B has joined the DHT, its routing table lists A.
    within(STEP, "join", b.dht().wait_bootstrapped())
        .await
        .expect("joins");
    let routing: serde_json::Value = admin.json("/admin/routing").await;
    assert_eq!(routing["node_id"], b.node_id().to_string());
    let contacts = routing["contacts"].as_array().expect("contacts");
    let a_entry = contacts
        .iter()
        .find(|c| c["node_id"] == a.node_id().to_string().as_str())
        .unwrap_or_else(|| panic!("A not in B's routing table: {routing}"));
    assert_eq!(a_entry["addr"], a.local_addr().to_string().as_str());
    assert!(a_entry["bucket"].as_u64().is_some(), "{routing}");

    admin.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// Polls `path` until it answers `status` (bounded).
async fn eventually_status(admin: &Admin, path: &str, status: u16) -> Reply {
    let deadline = tokio::time::Instant::now() + STEP * 2;
    loop {
        let r = admin.get(path).await;
        if r.status == status {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} still {} after {:?}: {}",
            r.status,
            STEP * 2,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a JSON endpoint until `cond` holds (bounded).
async fn eventually_json<T: serde::de::DeserializeOwned>(
    admin: &Admin,
    path: &str,
    cond: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let v: T = admin.json(path).await;
        if cond(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: condition not reached within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
