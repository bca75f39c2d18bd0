//! Client mode over real QUIC on 127.0.0.1: clients attached to different
//! gateways exchange pub/sub messages and RPC calls, keep the publisher's
//! identity and order, and fail over to their next node with their
//! subscriptions and advertisements replayed; a client subscribed through
//! two gateways gets each event once and loses none when one goes.

mod common;

use std::future::IntoFuture;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use macula_runtime::pubsub::{Event, Subscription, SubscriptionItem};
use macula_runtime::rpc::{AdvertiseOptions, HandlerError, Request, RpcError};
use macula_runtime::{Client, ClientConfig, NodeRuntime, PeerAddr};

fn addr_of(n: &NodeRuntime) -> PeerAddr {
    format!("{}@{}", n.node_id(), n.local_addr())
        .parse()
        .expect("peer address")
}

async fn client(gateways: &[&NodeRuntime]) -> Client {
    let cfg = ClientConfig::new(gateways.iter().map(|g| addr_of(g)).collect());
    within(STEP, "client attaches", Client::connect(cfg))
        .await
        .expect("client attaches")
}

async fn next_event(sub: &mut Subscription) -> Event {
    match within(STEP, "event", sub.next()).await {
        Some(SubscriptionItem::Event(e)) => e,
        Some(SubscriptionItem::Lagged(n)) => panic!("lagged by {n}"),
        None => panic!("subscription ended"),
    }
}

async fn echo(req: Request) -> Result<Bytes, HandlerError> {
    Ok(req.payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_gateways_exchange_messages_and_calls() {
    init_tracing();
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let c1 = client(&[&a]).await;
    let c2 = client(&[&b]).await;
    assert_eq!(c1.gateway(), Some(a.node_id()));
    assert_eq!(c2.gateway(), Some(b.node_id()));
    // Clients stay out of the DHT routing tables.
    let routing: Vec<_> = a.dht().routing_table().await.expect("routing table");
    assert!(routing.iter().all(|e| e.node_id != c1.node_id()));

    let mut sub = c2.subscribe("orders.**").await.expect("subscribe");
    let mut on_a = a
        .pubsub()
        .subscribe_mesh("orders.*")
        .await
        .expect("node subscribes");
    for i in 1..=50u32 {
        c1.publish("orders.new", format!("m{i}"))
            .await
            .expect("publish");
    }
    for i in 1..=50u32 {
        let e = next_event(&mut sub).await;
        assert_eq!(e.payload, Bytes::from(format!("m{i}")), "in order");
        assert_eq!(e.publisher, c1.node_id(), "the client is the publisher");
        assert_eq!(e.seq, u64::from(i));
        let e = next_event(&mut on_a).await;
        assert_eq!(e.publisher, c1.node_id());
    }
    // A full node's message reaches the client too.
    b.pubsub()
        .publish_mesh("orders.x.y", Bytes::from("from b"), Default::default())
        .await
        .expect("node publishes");
    let e = next_event(&mut sub).await;
    assert_eq!(
        (e.payload, e.publisher),
        (Bytes::from("from b"), b.node_id())
    );
    // The client's own messages are not echoed back to it.
    let mut own = c1.subscribe("orders.new").await.expect("subscribe own");
    c1.publish("orders.new", "self").await.expect("publish");
    let e = next_event(&mut own).await;
    assert_eq!(e.payload, Bytes::from("self"));
    // An echo through the gateway would follow one loopback round trip
    // (under 1 ms here) after the local delivery: 200 ms of nothing is
    // hundreds of round trips, so a duplicate would have shown.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(own.pending(), 0, "delivered once, locally");
    assert!(a
        .client_subscriptions()
        .iter()
        .any(|(_, p)| p == &["orders.new".to_string()]));

    // RPC: a client serves, another client and a node call it.
    let reg = c2
        .advertise("svc.echo", AdvertiseOptions::default(), echo)
        .await
        .expect("advertise");
    let r = within(
        STEP,
        "client calls client",
        c1.call("svc.echo", "hi").into_future(),
    )
    .await
    .expect("answer");
    assert_eq!(r.payload, Bytes::from("hi"));
    let r = within(
        STEP,
        "node calls client",
        a.rpc().call("svc.echo", "yo").into_future(),
    )
    .await
    .expect("answer");
    assert_eq!((r.payload, r.provider), (Bytes::from("yo"), b.node_id()));
    // Typed errors survive the gateway hop.
    let e = within(STEP, "no provider", c1.call("svc.none", "x").into_future())
        .await
        .expect_err("nobody serves it");
    assert!(matches!(e, RpcError::NoProviders { .. }), "{e:?}");
    let _fail = c2
        .advertise(
            "svc.fail",
            AdvertiseOptions::default(),
            |_r: Request| async { Err::<Bytes, _>(HandlerError::new(7, "nope")) },
        )
        .await
        .expect("advertise");
    let e = within(
        STEP,
        "handler error",
        c1.call("svc.fail", "x").into_future(),
    )
    .await
    .expect_err("handler fails");
    assert!(matches!(e, RpcError::Handler { code: 7, .. }), "{e:?}");
    // Withdrawn: the gateway stops advertising it.
    drop(reg);
    eventually(STEP, "withdrawn", || {
        !b.rpc().advertised().iter().any(|(p, _, _)| p == "svc.echo")
    })
    .await;
    assert_eq!(b.gateway_counters().clients.get(), 1);

    c1.shutdown().await;
    c2.shutdown().await;
    eventually(STEP, "client detached", || {
        b.gateway_counters().clients.get() == 0
    })
    .await;
    eventually(STEP, "client ads withdrawn", || {
        b.rpc().advertised().is_empty()
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fails_over_and_replays_without_duplicates() {
    init_tracing();
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let pubr = start(boot(&b)).await;
    joined(&pubr).await;
    let c = client(&[&a, &b]).await;
    assert_eq!(c.gateway(), Some(a.node_id()));
    let mut sub = c.subscribe("feed.*").await.expect("subscribe");
    let _reg = c
        .advertise("svc.c", AdvertiseOptions::default(), echo)
        .await
        .expect("advertise");
    pubr.pubsub()
        .publish_mesh("feed.a", Bytes::from("1"), Default::default())
        .await
        .expect("publish");
    assert_eq!(next_event(&mut sub).await.seq, 1);

    a.shutdown().await;
    within(STEP, "failover", async {
        while c.gateway() != Some(b.node_id()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(c.failovers(), 1);
    // The replayed subscription receives, once per message, in order.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + STEP;
    let mut seq = 2;
    while seen.len() < 20 && tokio::time::Instant::now() < deadline {
        pubr.pubsub()
            .publish_mesh("feed.a", Bytes::from(seq.to_string()), Default::default())
            .await
            .expect("publish");
        seq += 1;
        if let Ok(Some(SubscriptionItem::Event(e))) =
            tokio::time::timeout(Duration::from_millis(200), sub.next()).await
        {
            seen.push(e.seq);
            while let Ok(Some(SubscriptionItem::Event(e))) =
                tokio::time::timeout(Duration::from_millis(1), sub.next()).await
            {
                seen.push(e.seq);
            }
        }
    }
    assert!(seen.len() >= 20, "receives after failover: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "no duplicates, in order: {seen:?}"
    );
    // The replayed advertisement answers through the new gateway.
    let r = within(
        STEP,
        "call after failover",
        pubr.rpc().call("svc.c", "z").into_future(),
    )
    .await
    .expect("answer");
    assert_eq!(r.provider, b.node_id());
    c.shutdown().await;
    b.shutdown().await;
    pubr.shutdown().await;
}

/// Every event of `sub` until `n` have arrived: seqs in order, each once,
/// never `Lagged`.
async fn take_seqs(sub: &mut Subscription, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    while seqs.len() < n {
        seqs.push(next_event(sub).await.seq);
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_subscribes_through_two_gateways_and_loses_nothing_when_one_goes() {
    init_tracing();
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let p = start(boot(&a)).await;
    joined(&p).await;
    let c = client(&[&a, &b, &p]).await;
    assert_eq!(c.gateway(), Some(a.node_id()));
    // No subscription, no second gateway. A second gateway is attached as
    // soon as there is a subscription (`keep_second` waits on that event, no
    // timer), in one loopback handshake (a few ms): 300 ms without one
    // shows none is coming.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.second_gateway(), None);
    let mut sub = c.subscribe("feed.*").await.expect("subscribe");
    within(STEP, "second gateway", async {
        while c.second_gateway() != Some(b.node_id()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Both gateways carry it: each event arrives twice, is delivered once.
    for g in [&a, &b] {
        assert!(g
            .client_subscriptions()
            .iter()
            .any(|(_, ps)| ps == &["feed.*".to_string()]));
    }
    let publish = |n: u64| {
        let ps = p.pubsub().clone();
        tokio::spawn(async move {
            for i in 0..n {
                ps.publish_mesh("feed.x", Bytes::from(i.to_string()), Default::default())
                    .await
                    .expect("publish");
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    publish(200).await.expect("publisher");
    assert_eq!(
        take_seqs(&mut sub, 200).await,
        (1..=200).collect::<Vec<_>>()
    );
    eventually(STEP, "the second copies arrive and are dropped", || {
        c.pubsub().counters().duplicates_dropped_total.get() == 200
    })
    .await;
    assert_eq!(sub.pending(), 0, "delivered once");

    // The primary goes while events flow: the second one is promoted, a
    // new second gateway (p) attached, and every event arrives once.
    let flow = publish(400);
    a.shutdown().await;
    flow.await.expect("publisher");
    assert_eq!(
        take_seqs(&mut sub, 400).await,
        (201..=600).collect::<Vec<_>>()
    );
    within(STEP, "promoted and replaced", async {
        while c.gateway() != Some(b.node_id()) || c.second_gateway() != Some(p.node_id()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(c.failovers(), 1);
    assert_eq!(c.second_gateways_attached(), 2);
    assert_eq!(c.missed_after_failover(), 0);
    // Publishing goes on through the new primary, once per message.
    let mut own = c.subscribe("mine.*").await.expect("subscribe own");
    let mut on_p = p
        .pubsub()
        .subscribe_mesh("mine.*")
        .await
        .expect("node subscribes");
    c.publish("mine.x", "hello").await.expect("publish");
    assert_eq!(next_event(&mut own).await.payload, Bytes::from("hello"));
    let e = next_event(&mut on_p).await;
    assert_eq!((e.publisher, e.seq), (c.node_id(), 1));
    // A second copy (through another gateway) would arrive within a
    // loopback round trip of the first: 200 ms of nothing rules it out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        on_p.pending(),
        0,
        "published once, through the primary only"
    );
    c.shutdown().await;
    b.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_gateway_client_keeps_one_connection() {
    init_tracing();
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let mut cfg = ClientConfig::new(vec![addr_of(&a), addr_of(&b)]);
    cfg.redundant_subscriptions = false;
    let c = within(STEP, "client attaches", Client::connect(cfg))
        .await
        .expect("client attaches");
    let _sub = c.subscribe("feed.*").await.expect("subscribe");
    // With redundancy on, the second gateway would be attached right after
    // this subscription, in one loopback handshake (a few ms); 300 ms
    // without one shows redundancy is really off.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.second_gateway(), None);
    assert!(b.client_subscriptions().is_empty());
    c.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// PROTOCOL.md 6.2: the idle close does not apply to a client's connection,
/// on either side; the client's QUIC keep-alives are what keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_client_is_not_closed_as_idle() {
    init_tracing();
    let idle = Duration::from_millis(300);
    let mut gw = config();
    gw.limits.idle_timeout = idle;
    let a = start(gw).await;
    let mut cfg = ClientConfig::new(vec![addr_of(&a)]);
    cfg.limits.idle_timeout = idle;
    let c = within(STEP, "client attaches", Client::connect(cfg))
        .await
        .expect("client attaches");
    // An absence check: four idle timeouts without traffic. An idle close
    // would be due after one, so this wait cannot be too short to see it.
    tokio::time::sleep(idle * 4).await;
    assert_eq!(a.metrics().pool_idle_closed_total.get(), 0);
    assert_eq!(c.metrics().pool_idle_closed_total.get(), 0);
    assert_eq!(c.failovers(), 0);
    assert_eq!(c.gateway(), Some(a.node_id()));
    // And it still works.
    let mut sub = c.subscribe("quiet.*").await.expect("subscribe");
    a.pubsub()
        .publish_mesh("quiet.x", Bytes::from("hi"), Default::default())
        .await
        .expect("publish");
    assert_eq!(next_event(&mut sub).await.payload, Bytes::from("hi"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_no_reachable_node_fails_clearly() {
    let port = free_port();
    let mut cfg = ClientConfig::new(vec![format!("127.0.0.1:{port}").parse().expect("addr")]);
    cfg.attach_timeout = Duration::from_millis(500);
    cfg.limits.handshake_timeout = Duration::from_millis(200);
    let e = within(STEP, "connect fails", Client::connect(cfg))
        .await
        .expect_err("nobody listens");
    let text = e.to_string();
    assert!(text.contains("no node accepted the client"), "{text}");
}
