//! The connection limit with a few hundred real QUIC client connections on
//! 127.0.0.1, all from one shared client socket: the node holds exactly its
//! `max_connections`, turns the next ones away in the handshake with a
//! reason that says so, keeps serving the ones it holds, and admits again
//! once connections close. (The 10,000-connection run is a benchmark:
//! `macula bench connections`.)

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use macula_runtime::peer::HandshakeError;
use macula_runtime::pubsub::SubscriptionItem;
use macula_runtime::{Client, ClientConfig, ClientError, ConnectError, NodeRuntime, PeerAddr};
use macula_wire::DisconnectReason;

const LIMIT: usize = 300;

fn client_config(node: &NodeRuntime, endpoint: &quinn::Endpoint) -> ClientConfig {
    let gw: PeerAddr = format!("{}@{}", node.node_id(), node.local_addr())
        .parse()
        .expect("peer address");
    ClientConfig {
        endpoint: Some(endpoint.clone()),
        ..ClientConfig::new(vec![gw])
    }
}

/// Attaches `range.len()` clients at once (32 in flight), each subscribed to
/// its own topic.
async fn attach(
    node: &NodeRuntime,
    endpoint: &quinn::Endpoint,
    range: std::ops::Range<usize>,
) -> Vec<(Client, macula_runtime::pubsub::Subscription)> {
    futures::stream::iter(range)
        .map(|i| {
            let cfg = client_config(node, endpoint);
            async move {
                let c = Client::connect(cfg).await.expect("client attaches");
                let s = c
                    .subscribe(&format!("limit.c.{i}"))
                    .await
                    .expect("subscribe");
                (c, s)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_connection_limit_are_turned_away() {
    init_tracing();
    let mut cfg = config();
    cfg.limits.max_connections = LIMIT;
    let node = start(cfg).await;
    let endpoint = Client::endpoint("127.0.0.1:0".parse().expect("addr")).expect("endpoint");

    let mut clients = within(
        Duration::from_secs(120),
        "the first clients attach",
        attach(&node, &endpoint, 0..LIMIT),
    )
    .await;
    let m = node.metrics();
    assert_eq!(m.connections_current.load(Relaxed), LIMIT as u64);
    assert_eq!(node.gateway_counters().clients.load(Relaxed), LIMIT as u64);

    // One more: turned away in the handshake, at once (not after the
    // 15 s attach timeout), saying why.
    let started = Instant::now();
    let e = within(
        STEP,
        "an extra client is refused",
        Client::connect(client_config(&node, &endpoint)),
    )
    .await
    .expect_err("the node is full");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(e, ClientError::TurnedAway { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("ConnectionLimit")
            && text.contains(&format!("maximum of {LIMIT} connections")),
        "{text}"
    );
    // Several more, concurrently: each refused and counted.
    let refused = futures::future::join_all(
        (0..10).map(|_| Client::connect(client_config(&node, &endpoint))),
    );
    let refused = within(STEP, "more extra clients", refused).await;
    assert!(refused
        .iter()
        .all(|r| matches!(r, Err(ClientError::TurnedAway { .. }))));
    assert_eq!(m.connections_refused_total.load(Relaxed), 11);
    assert_eq!(m.connections_current.load(Relaxed), LIMIT as u64);

    // A full node dialing in is turned away too (clients are never evicted
    // for it), and its dialer counts why.
    let peer = start(config()).await;
    let e = within(
        STEP,
        "a full node is refused",
        peer.connect(node.local_addr(), Some(node.node_id())),
    )
    .await
    .expect_err("the node is full");
    assert!(
        matches!(
            &e,
            ConnectError::Handshake {
                source: HandshakeError::TurnedAway {
                    reason: DisconnectReason::ConnectionLimit,
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        peer.metrics()
            .handshake_failures(macula_runtime::metrics::HandshakeFailure::ConnectionLimit),
        1
    );

    // The clients it holds are served as before.
    let (last, mut inbox) = clients.pop().expect("a client");
    let topic = inbox.pattern().to_string();
    clients[0]
        .0
        .publish(&topic, &b"still here"[..])
        .await
        .expect("publish");
    match within(STEP, "event through the full node", inbox.next()).await {
        Some(SubscriptionItem::Event(ev)) => assert_eq!(&ev.payload[..], b"still here"),
        other => panic!("{other:?}"),
    }
    drop(inbox);
    last.shutdown().await;

    // Ten leave: ten new ones get in.
    let leaving: Vec<_> = clients.drain(..10).collect();
    for (c, s) in leaving {
        drop(s);
        c.shutdown().await;
    }
    eventually(STEP, "slots free up", || {
        m.connections_current.load(Relaxed) <= (LIMIT - 11) as u64
    })
    .await;
    let again = within(
        Duration::from_secs(60),
        "clients attach again",
        attach(&node, &endpoint, LIMIT..LIMIT + 10),
    )
    .await;
    assert_eq!(again.len(), 10);

    for (c, s) in clients.into_iter().chain(again) {
        drop(s);
        c.shutdown().await;
    }
    peer.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_room_for_a_client_by_evicting_a_mesh_connection() {
    init_tracing();
    let mut cfg = config();
    cfg.limits.max_connections = 3;
    let node = start(cfg).await;
    let endpoint = Client::endpoint("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    // One evictable mesh connection, two clients: full.
    let peer = start(config()).await;
    within(
        STEP,
        "peer dials",
        peer.connect(node.local_addr(), Some(node.node_id())),
    )
    .await
    .expect("peer connects");
    let clients = attach(&node, &endpoint, 0..2).await;
    assert_eq!(node.metrics().connections_current.load(Relaxed), 3);
    // A third client gets in: the mesh connection (redialed when needed)
    // makes room; clients are never the ones evicted.
    let third = within(STEP, "third client", attach(&node, &endpoint, 2..3)).await;
    assert_eq!(node.metrics().pool_evictions_total.load(Relaxed), 1);
    assert!(node.peer(&peer.node_id()).is_none());
    assert_eq!(node.metrics().connections_current.load(Relaxed), 3);
    for (c, s) in clients.into_iter().chain(third) {
        drop(s);
        c.shutdown().await;
    }
    peer.shutdown().await;
    node.shutdown().await;
}
