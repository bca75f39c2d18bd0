//! The relay on 127.0.0.1: two private nodes (configured as behind NAT, so
//! they refuse every direct inbound connection, as behind a symmetric NAT) reach each other through a public node; pub/sub and RPC run over
//! the relayed connection unchanged; the relay's limits (sessions, bytes
//! per second, idle timeout) are enforced with their metric and a clear
//! error.

mod common;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use macula_runtime::config::{ReachabilityMode, RelayLimits};
use macula_runtime::pubsub::SubscriptionItem;
use macula_runtime::relay::CloseReason;
use macula_runtime::rpc::{AdvertiseOptions, HandlerError, Request};
use macula_runtime::tunnel::RelayError;
use macula_runtime::{ConnectError, NodeConfig, NodeRuntime, Peer};
use macula_wire::relay::RelayCode;

async fn echo(req: Request) -> Result<Bytes, HandlerError> {
    Ok(req.payload)
}

fn relay_config(relay: RelayLimits) -> NodeConfig {
    NodeConfig { relay, ..config() }
}

/// A node behind (emulated) NAT, bootstrapped through `relay`.
fn private(relay: &NodeRuntime) -> NodeConfig {
    NodeConfig {
        reachability: ReachabilityMode::Private,
        ..boot(relay)
    }
}

/// Waits until `n` holds a reservation at `relay`.
async fn reserved(n: &NodeRuntime, relay: &NodeRuntime) {
    let rid = relay.node_id();
    eventually(STEP, "reservation at the relay", || {
        n.tunnel().reserved_relays().contains(&rid)
    })
    .await;
}

fn relay_peer(n: &NodeRuntime, relay: &NodeRuntime) -> Peer {
    n.peer(&relay.node_id()).expect("connected to the relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_nodes_talk_through_the_relay() {
    init_tracing();
    let r = start(config()).await;
    let c = start(private(&r)).await;
    joined(&c).await;
    let a = start(private(&r)).await;
    joined(&a).await;
    reserved(&c, &r).await;
    reserved(&a, &r).await;

    // A direct connection to C is refused.
    let direct = within(
        STEP,
        "direct dial",
        a.dial_unpooled(c.local_addr(), Some(c.node_id())),
    )
    .await;
    assert!(
        direct.is_err(),
        "a direct dial to a private node must fail: {direct:?}"
    );

    // RPC: the provider is private; the caller finds it through the DHT and
    // reaches it through its relay, transparently.
    let _reg = within(
        STEP,
        "advertise",
        c.rpc()
            .advertise("svc.echo", AdvertiseOptions::default(), echo),
    )
    .await
    .expect("advertise");
    let mut answer = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while answer.is_none() && Instant::now() < deadline {
        match tokio::time::timeout(
            STEP,
            a.rpc().call("svc.echo", "through the relay").into_future(),
        )
        .await
        {
            Ok(Ok(r)) => answer = Some(r),
            Ok(Err(e)) => tracing::debug!(error = %e, "call not through yet"),
            Err(_) => tracing::debug!("call timed out"),
        }
        if answer.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let answer = answer.expect("the call through the relay answers");
    assert_eq!(answer.payload, Bytes::from("through the relay"));
    assert_eq!(answer.provider, c.node_id());

    // The connection between A and C is relayed by R, on both sides.
    let ac = a.peer(&c.node_id()).expect("A is connected to C");
    assert_eq!(ac.relayed_via(), Some(r.node_id()));
    let ca = c.peer(&a.node_id()).expect("C is connected to A");
    assert_eq!(ca.relayed_via(), Some(r.node_id()));
    let rc = r.relay().counters();
    assert!(rc.sessions_total.get() >= 1);
    assert!(rc.bytes_total.get() > 0);

    // Pub/sub both ways over the same relayed connection.
    let mut sub_c = within(STEP, "subscribe", c.pubsub().subscribe_mesh("relay.*"))
        .await
        .expect("subscribe");
    let mut sub_a = within(STEP, "subscribe", a.pubsub().subscribe_mesh("back.*"))
        .await
        .expect("subscribe");
    for (from, sub, topic) in [
        (&a, &mut sub_c, "relay.hello"),
        (&c, &mut sub_a, "back.hello"),
    ] {
        let got = within(Duration::from_secs(20), "relayed pub/sub", async {
            loop {
                publish(from, topic, "hi").await;
                if let Ok(Some(SubscriptionItem::Event(e))) =
                    tokio::time::timeout(Duration::from_millis(300), sub.next()).await
                {
                    return e;
                }
            }
        })
        .await;
        assert_eq!(got.topic, topic);
        assert_eq!(got.payload, Bytes::from("hi"));
    }
    // Still the relayed connection: nothing went direct.
    assert_eq!(
        a.peer(&c.node_id()).and_then(|p| p.relayed_via()),
        Some(r.node_id())
    );
    assert_eq!(
        a.metrics().connections_outbound_total.get() + a.metrics().connections_inbound_total.get(),
        2,
        "A has exactly two connections: to R (direct) and to C (relayed)"
    );
    // The direct rate counts both: one of two connections was direct.
    assert_eq!(a.reachability().direct_rate(), (2, 1));

    // The admin view shows it.
    let report = peers_report(&a).await;
    let row = report
        .iter()
        .find(|p| p["node_id"] == c.node_id().to_string())
        .expect("C in /admin/peers");
    assert_eq!(row["relayed_via"], r.node_id().to_string());

    for n in [&a, &c, &r] {
        n.shutdown().await;
    }
}

/// GET /admin/peers through the admin router.
async fn peers_report(n: &NodeRuntime) -> Vec<serde_json::Value> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = macula_runtime::admin::router(n.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!(
                "GET /admin/peers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                common::ADMIN_TOKEN
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut body = Vec::new();
    within(STEP, "admin answer", stream.read_to_end(&mut body))
        .await
        .unwrap();
    server.abort();
    let text = String::from_utf8_lossy(&body);
    let json = text.split("\r\n\r\n").nth(1).expect("HTTP body");
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON body");
    v["peers"].as_array().expect("peers array").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_and_missing_reservation_are_refused_clearly() {
    init_tracing();
    let r = start(relay_config(RelayLimits {
        max_sessions: 1,
        ..RelayLimits::default()
    }))
    .await;
    let c = start(private(&r)).await;
    let a = start(private(&r)).await;
    let b = start(private(&r)).await;
    for n in [&c, &a, &b] {
        reserved(n, &r).await;
    }

    let first = within(
        STEP,
        "first session",
        a.connect_via(&relay_peer(&a, &r), c.node_id()),
    )
    .await
    .expect("the first session is admitted");
    assert_eq!(first.relayed_via(), Some(r.node_id()));

    let second = within(
        STEP,
        "second session",
        b.connect_via(&relay_peer(&b, &r), c.node_id()),
    )
    .await;
    match &second {
        Err(ConnectError::Relay(RelayError::Refused { code, message, .. })) => {
            assert_eq!(*code, RelayCode::SessionLimit);
            assert!(message.contains("relay_max_sessions"), "{message}");
        }
        other => panic!("expected a session-limit refusal, got {other:?}"),
    }
    let text = second.unwrap_err().to_string();
    assert!(text.contains("session_limit"), "{text}");
    assert_eq!(r.relay().counters().refused(RelayCode::SessionLimit), 1);

    // A (private) node without a reservation cannot be reached through the
    // relay.
    let plain = start(NodeConfig {
        relay: RelayLimits {
            reserve_at: 0,
            ..RelayLimits::default()
        },
        ..private(&r)
    })
    .await;
    joined(&plain).await;
    let to_plain = within(
        STEP,
        "no reservation",
        a.connect_via(&relay_peer(&a, &r), plain.node_id()),
    )
    .await;
    assert!(
        matches!(
            to_plain,
            Err(ConnectError::Relay(RelayError::Refused {
                code: RelayCode::NoReservation,
                ..
            }))
        ),
        "{to_plain:?}"
    );
    assert_eq!(r.relay().counters().refused(RelayCode::NoReservation), 1);

    // The metric families are exported.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &macula_runtime::admin::registry(&r))
        .unwrap();
    assert!(
        text.contains("macula_relay_refused_total{reason=\"session_limit\"} 1"),
        "{text}"
    );
    assert!(text.contains("macula_relay_sessions 1"), "{text}");

    for n in [&a, &b, &c, &plain, &r] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_its_byte_rate_is_throttled() {
    init_tracing();
    const RATE: u64 = 256 * 1024;
    const BURST: u64 = 32 * 1024;
    let r = start(relay_config(RelayLimits {
        bytes_per_second: RATE,
        burst_bytes: BURST,
        ..RelayLimits::default()
    }))
    .await;
    let c = start(private(&r)).await;
    let a = start(private(&r)).await;
    reserved(&c, &r).await;
    reserved(&a, &r).await;
    let _reg = within(
        STEP,
        "advertise",
        c.rpc()
            .advertise("svc.echo", AdvertiseOptions::default(), echo),
    )
    .await
    .expect("advertise");
    within(
        STEP,
        "relayed connection",
        a.connect_via(&relay_peer(&a, &r), c.node_id()),
    )
    .await
    .expect("relayed connection");

    let counters = r.relay().counters().clone();
    let bytes = || counters.bytes_total.get();
    let throttled = || counters.throttled_total.get();
    let (bytes0, throttled0) = (bytes(), throttled());
    let start_at = Instant::now();
    // 4 x 64 KiB each way: 512 KiB through a 256 KiB/s session.
    let payload = Bytes::from(vec![7u8; 64 * 1024]);
    for _ in 0..4 {
        let res = within(
            Duration::from_secs(30),
            "large call through the relay",
            a.rpc()
                .call_to(c.node_id(), "svc.echo", payload.clone())
                .timeout(Duration::from_secs(25))
                .into_future(),
        )
        .await
        .expect("call answers");
        assert_eq!(res.payload.len(), payload.len());
    }
    let elapsed = start_at.elapsed();
    let moved = bytes() - bytes0;
    assert!(
        moved >= 512 * 1024,
        "the payloads went through the relay: {moved}"
    );
    assert!(throttled() > throttled0, "the relay throttled the session");
    // The relay never let more through than the bucket allows (an upper
    // bound: slowness cannot break it): burst + rate * elapsed, plus one
    // forwarded chunk per direction read before paying.
    let allowed = BURST + (RATE as f64 * elapsed.as_secs_f64()) as u64 + 2 * 16 * 1024;
    assert!(
        moved <= allowed,
        "moved {moved} bytes in {elapsed:?}, the bucket allows {allowed}"
    );

    for n in [&a, &c, &r] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed() {
    init_tracing();
    let r = start(relay_config(RelayLimits {
        idle_timeout: Duration::from_millis(300),
        ..RelayLimits::default()
    }))
    .await;
    let c = start(private(&r)).await;
    let a = start(private(&r)).await;
    reserved(&c, &r).await;
    reserved(&a, &r).await;
    let peer = within(
        STEP,
        "relayed connection",
        a.connect_via(&relay_peer(&a, &r), c.node_id()),
    )
    .await
    .expect("relayed connection");
    let counters = r.relay().counters().clone();
    // QUIC keep-alives (every 10 s) are the only traffic once the
    // handshake is over; the 300 ms idle timeout fires between them.
    eventually(Duration::from_secs(15), "idle close", || {
        counters.closed(CloseReason::Idle) >= 1
    })
    .await;
    // The endpoint learns it at once and drops the dead connection.
    eventually(STEP, "relayed peer gone", || peer.is_closed()).await;
    eventually(STEP, "pool entry gone", || {
        a.peer(&c.node_id()).is_none_or(|p| p.is_closed())
    })
    .await;
    assert_eq!(counters.sessions.get(), 0);

    for n in [&a, &c, &r] {
        n.shutdown().await;
    }
}
