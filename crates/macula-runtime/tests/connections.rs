//! The connection limits with a few hundred real QUIC client connections on
//! 127.0.0.1, all from one shared client socket: the node holds exactly as
//! many clients as `max_connections` less `peer_slots` allows, turns the
//! next ones away in the handshake with a reason that says so, still takes
//! full nodes in the slots kept for them, keeps serving the clients it
//! holds, and admits again once connections close. A pool full of
//! connections it may not evict turns anyone away. (The 10,000-connection
//! run is a benchmark: `macula bench connections`.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use macula_runtime::peer::HandshakeError;
use macula_runtime::pubsub::SubscriptionItem;
use macula_runtime::{Client, ClientConfig, ClientError, ConnectError, NodeRuntime, PeerAddr};
use macula_wire::DisconnectReason;

/// Clients the node takes.
const LIMIT: usize = 300;
/// Slots kept for full nodes.
const PEER_SLOTS: usize = 8;

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
    cfg.limits.max_connections = LIMIT + PEER_SLOTS;
    cfg.limits.peer_slots = PEER_SLOTS;
    let node = start(cfg).await;
    let endpoint = Client::endpoint("127.0.0.1:0".parse().expect("addr")).expect("endpoint");

    let mut clients = within(
        Duration::from_secs(120),
        "the first clients attach",
        attach(&node, &endpoint, 0..LIMIT),
    )
    .await;
    let m = node.metrics();
    assert_eq!(m.connections_current.get(), LIMIT as u64);
    assert_eq!(node.gateway_counters().clients.get(), LIMIT as u64);

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
        text.contains("ConnectionLimit") && text.contains(&format!("at most {LIMIT} clients")),
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
    assert_eq!(m.connections_refused_total.get(), 11);
    assert_eq!(m.connections_current.get(), LIMIT as u64);

    // A full node still gets in: slots are kept for the mesh.
    let peer = start(config()).await;
    within(
        STEP,
        "a full node connects",
        peer.connect(node.local_addr(), Some(node.node_id())),
    )
    .await
    .expect("a peer slot is free");
    // The node counts the peer on its own side of the handshake, a moment
    // after the peer's connect returns.
    common::eventually(STEP, "the peer counted", || {
        m.connections_current.get() == LIMIT as u64 + 1
    })
    .await;
    assert_eq!(m.connections_current.get(), LIMIT as u64 + 1);

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
        m.connections_current.get() <= (LIMIT + 1 - 11) as u64
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
async fn a_full_pool_evicts_mesh_connections_and_turns_away_when_nothing_may_go() {
    init_tracing();
    let mut cfg = config();
    // At most 2 clients (the peer slots are capped at half the pool).
    cfg.limits.max_connections = 4;
    let node = start(cfg).await;
    let m = node.metrics();
    let endpoint = Client::endpoint("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let dial = |p: &NodeRuntime| {
        let (p, n) = (p.clone(), node.clone());
        async move { p.connect(n.local_addr(), Some(n.node_id())).await }
    };
    let p1 = start(config()).await;
    let p2 = start(config()).await;
    within(STEP, "p1 dials", dial(&p1)).await.expect("p1 in");
    let clients = attach(&node, &endpoint, 0..2).await;
    within(STEP, "p2 dials", dial(&p2)).await.expect("p2 in");
    // The node counts p2 on its own side of the handshake, a moment after
    // p2's connect returns.
    common::eventually(STEP, "p2 counted", || m.connections_current.get() == 4).await;
    assert_eq!(m.connections_current.get(), 4);

    // A third client: over the client cap, turned away at once.
    let e = within(
        STEP,
        "third client",
        Client::connect(client_config(&node, &endpoint)),
    )
    .await
    .expect_err("client cap");
    assert!(e.to_string().contains("at most 2 clients"), "{e}");

    // A full node: the least recently used mesh connection makes room.
    let p3 = start(config()).await;
    within(STEP, "p3 dials", dial(&p3)).await.expect("p3 in");
    // The node admits p3 (and evicts) on its own side of the handshake,
    // a moment after p3's connect returns.
    eventually(STEP, "an eviction", || m.pool_evictions_total.get() >= 1).await;
    assert_eq!(m.pool_evictions_total.get(), 1);
    assert!(node.peer(&p1.node_id()).is_none(), "p1 was the LRU");
    assert_eq!(m.connections_current.get(), 4);

    // With every connection kept, a new full node is turned away in the
    // handshake, and its dialer counts why.
    for p in [&p2, &p3] {
        node.peer(&p.node_id()).expect("pooled").set_kept(true);
    }
    let p4 = start(config()).await;
    let e = within(STEP, "p4 dials", dial(&p4)).await.expect_err("full");
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
    assert!(e.to_string().contains("maximum of 4 connections"), "{e}");
    assert_eq!(
        p4.metrics()
            .handshake_failures(macula_runtime::metrics::HandshakeFailure::ConnectionLimit),
        1
    );
    assert_eq!(m.connections_refused_total.get(), 2);

    for (c, s) in clients {
        drop(s);
        c.shutdown().await;
    }
    for p in [p1, p2, p3, p4] {
        p.shutdown().await;
    }
    node.shutdown().await;
}
