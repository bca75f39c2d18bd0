//! The node runtime over real QUIC on loopback: pooling, identity and realm
//! checks, the simultaneous-dial tie-break, LRU eviction, idle timeout,
//! bad input, reconnect and shutdown.
//!
//! Every await is bounded (`within`, `next_event`, `eventually`) so a broken
//! runtime fails a test rather than hanging it. Set `RUST_LOG=debug` to see
//! the runtime's logs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use macula_runtime::metrics::{HandshakeFailure, ProtocolErrorKind};
use macula_runtime::peer::HandshakeError;
use macula_runtime::{
    ConnectError, Direction, Identity, NodeConfig, NodeRuntime, PeerAddr, PeerEvent,
};
use macula_wire::{
    DisconnectReason, ErrorCode, FrameHeader, Message, MessageType, Ping, DEFAULT_MAX_FRAME_SIZE,
};

const PING: Duration = Duration::from_secs(5);

fn code(reason: DisconnectReason) -> u64 {
    u64::from(u16::from(reason))
}

fn ping(nonce: u64) -> Message {
    Message::Ping(Ping {
        nonce,
        sent_at_us: 42,
        keep: false,
    })
}

fn expect_error(msg: Message, want: ErrorCode) -> macula_wire::ErrorFrame {
    match msg {
        Message::Error(e) if e.code == want => e,
        other => panic!("expected ERROR({want:?}), got {other:?}"),
    }
}

fn expect_pong(msg: Message, nonce: u64) {
    match msg {
        Message::Pong(p) => {
            assert_eq!(p.nonce, nonce, "pong answers our ping");
            assert_eq!(p.echo_sent_at_us, 42, "pong echoes sent_at_us");
        }
        other => panic!("expected PONG, got {other:?}"),
    }
}

// 1. connect + reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reuses_the_pooled_connection() {
    init_tracing();
    let a = start(config()).await;
    let b = start(config()).await;
    let mut ea = a.subscribe_events();
    let mut eb = b.subscribe_events();

    let first = within(
        STEP,
        "first connect",
        a.connect(b.local_addr(), Some(b.node_id())),
    )
    .await
    .expect("first connect");
    let second = within(
        STEP,
        "second connect",
        a.connect(b.local_addr(), Some(b.node_id())),
    )
    .await
    .expect("second connect");
    assert_eq!(first.connection_id(), second.connection_id());
    assert_eq!(first.node_id(), b.node_id());
    assert_eq!(first.direction(), Direction::Outbound);
    assert_eq!(a.metrics().pool_misses_total.get(), 1);
    assert_eq!(a.metrics().pool_hits_total.get(), 1);

    // By address alone (no expected ID) it is the same connection too.
    let third = within(STEP, "connect by addr", a.connect(b.local_addr(), None))
        .await
        .expect("connect by address");
    assert_eq!(third.connection_id(), first.connection_id());
    assert_eq!(a.metrics().pool_hits_total.get(), 2);
    assert_eq!(a.metrics().pool_misses_total.get(), 1);

    let ev = next_event(&mut ea, STEP, "A: Connected", |e| {
        is_connected(e, b.node_id())
    })
    .await;
    assert_eq!(
        ev,
        PeerEvent::Connected {
            node_id: b.node_id(),
            addr: b.local_addr(),
            direction: Direction::Outbound,
        }
    );
    let ev = next_event(&mut eb, STEP, "B: Connected", |e| {
        is_connected(e, a.node_id())
    })
    .await;
    // One UDP socket serves both directions: B sees A dial from A's listen address.
    assert_eq!(
        ev,
        PeerEvent::Connected {
            node_id: a.node_id(),
            addr: a.local_addr(),
            direction: Direction::Inbound,
        }
    );

    let ids = |n: &NodeRuntime| n.peers().iter().map(|p| p.node_id()).collect::<Vec<_>>();
    assert_eq!(ids(&a), vec![b.node_id()]);
    assert_eq!(ids(&b), vec![a.node_id()]);
    let at_b = b.peer(&a.node_id()).expect("B pooled A");
    assert_eq!(at_b.direction(), Direction::Inbound);
    assert_eq!(at_b.hello().node_id, a.node_id());
    assert_eq!(a.metrics().connections_current.get(), 1);
    assert_eq!(b.metrics().connections_current.get(), 1);

    first.ping(PING).await.expect("A pings B");
    at_b.ping(PING).await.expect("B pings A");
    assert!(drain(&mut ea).is_empty() && drain(&mut eb).is_empty());
}

// 2. Wrong expected node ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_expected_node_id_is_an_identity_error() {
    init_tracing();
    let a = start(config()).await;
    let b = start(config()).await;
    let wrong = Identity::generate().node_id();

    let err = within(
        STEP,
        "dial with wrong ID",
        a.connect(b.local_addr(), Some(wrong)),
    )
    .await
    .expect_err("a different node must be rejected");
    match &err {
        ConnectError::IdentityMismatch { addr, expected, .. } => {
            assert_eq!(*addr, b.local_addr());
            assert_eq!(*expected, wrong);
        }
        other => panic!("expected IdentityMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("identity"), "{err}");
    assert_eq!(
        a.metrics()
            .handshake_failures(HandshakeFailure::IdentityMismatch),
        1
    );
    assert!(a.peers().is_empty());

    // The right ID still works afterwards.
    let p = within(
        STEP,
        "dial with right ID",
        a.connect(b.local_addr(), Some(b.node_id())),
    )
    .await
    .expect("right ID connects");
    assert_eq!(p.node_id(), b.node_id());
}

// 3. Realm mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realm_mismatch_is_refused_with_both_realms_named() {
    init_tracing();
    let mut ca = config();
    ca.realm = "io.alpha".into();
    let mut cb = config();
    cb.realm = "io.beta".into();
    let a = start(ca).await;
    let b = start(cb).await;
    let mut ea = a.subscribe_events();
    let mut eb = b.subscribe_events();

    let err = within(
        STEP,
        "dial other realm",
        a.connect(b.local_addr(), Some(b.node_id())),
    )
    .await
    .expect_err("other realm must be refused");
    match &err {
        ConnectError::Handshake {
            addr,
            source: HandshakeError::Rejected { code, message },
        } => {
            assert_eq!(*addr, b.local_addr());
            assert_eq!(*code, ErrorCode::RealmMismatch);
            assert!(
                message.contains("io.alpha") && message.contains("io.beta"),
                "{message}"
            );
        }
        other => panic!("expected Handshake(Rejected(RealmMismatch)), got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("io.alpha") && text.contains("io.beta"),
        "{text}"
    );

    assert_eq!(
        a.metrics()
            .handshake_failures(HandshakeFailure::RealmMismatch),
        1
    );
    eventually(STEP, "acceptor counts the realm mismatch", || {
        b.metrics()
            .handshake_failures(HandshakeFailure::RealmMismatch)
            == 1
    })
    .await;
    assert!(a.peers().is_empty(), "dialer pooled nothing");
    assert!(b.peers().is_empty(), "acceptor pooled nothing");
    assert!(drain(&mut ea).is_empty(), "no events on the dialer");
    assert!(drain(&mut eb).is_empty(), "no events on the acceptor");
}

// 4. Simultaneous dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dial_keeps_the_smaller_nodes_connection() {
    init_tracing();
    let grace = Duration::from_millis(100);
    let mut raced = 0;
    for round in 0..4 {
        let mut c = config();
        c.limits.duplicate_close_grace = grace;
        let a = start(c.clone()).await;
        let b = start(c).await;
        let mut ea = a.subscribe_events();
        let mut eb = b.subscribe_events();

        let (ra, rb) = within(STEP, "simultaneous dial", async {
            tokio::join!(
                a.connect(b.local_addr(), Some(b.node_id())),
                b.connect(a.local_addr(), Some(a.node_id()))
            )
        })
        .await;
        let (pa, pb) = (ra.expect("A dials B"), rb.expect("B dials A"));

        // Both must have dialed for the tie-break to apply. On a loaded
        // machine one `connect` may start late and find the other's
        // connection already pooled: then that is the only connection.
        let misses = |n: &NodeRuntime| n.metrics().pool_misses_total.get();
        let (a_wants, b_wants) = if misses(&a) + misses(&b) < 2 {
            assert_ne!(pa.direction(), pb.direction(), "one shared connection");
            (pa.direction(), pb.direction())
        } else if a.node_id() < b.node_id() {
            // The winner is the connection dialed by the node with the smaller ID.
            raced += 1;
            (Direction::Outbound, Direction::Inbound)
        } else {
            raced += 1;
            (Direction::Inbound, Direction::Outbound)
        };
        // A connect that returned the losing connection sees it closed after the grace.
        for (p, want) in [(&pa, a_wants), (&pb, b_wants)] {
            if p.direction() != want {
                within(STEP, "loser closes", p.connection().closed()).await;
            }
        }
        for (n, other, want, who) in [(&a, &b, a_wants, "A"), (&b, &a, b_wants, "B")] {
            eventually(STEP, "one live pooled connection", || {
                let peers = n.peers();
                peers.len() == 1 && peers[0].direction() == want && !peers[0].is_closed()
            })
            .await;
            let p = n.peer(&other.node_id()).expect("pooled");
            assert_eq!(
                p.direction(),
                want,
                "round {round}: {who} kept the wrong one"
            );
            p.ping(PING)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {who} pings over the winner: {e}"));
        }
        // Past the grace, the loser is gone on both sides and the winner stays.
        // What could wrongly close the winner is the duplicate timer, which
        // fires once at `grace`: waiting three graces lets it have fired.
        tokio::time::sleep(grace * 3).await;
        for (n, other, want, who) in [(&a, &b, a_wants, "A"), (&b, &a, b_wants, "B")] {
            let peers = n.peers();
            assert_eq!(peers.len(), 1, "round {round}: {who} has one connection");
            assert_eq!(peers[0].node_id(), other.node_id());
            assert_eq!(peers[0].direction(), want);
            assert!(
                !peers[0].is_closed(),
                "round {round}: {who}'s winner is open"
            );
            // Normally each side sees both connections and closes one. On a
            // starved machine the loser can be closed before the slower side
            // registers it, so that side saw no duplicate.
            assert!(
                n.metrics().pool_duplicates_closed_total.get() <= 1,
                "round {round}: {who} closed more than one duplicate"
            );
            // A later connect returns the winner.
            let again = within(STEP, "connect again", n.connect(other.local_addr(), None))
                .await
                .expect("connect again");
            assert_eq!(again.connection_id(), peers[0].connection_id());
        }
        // Subscribers' view ends consistent: the peer is connected. Normally
        // that is exactly one Connected; if the winner registered only after
        // the loser closed (a starved machine), a Disconnected/Connected pair
        // in between is accurate too.
        for (rx, other, who) in [(&mut ea, &b, "A"), (&mut eb, &a, "B")] {
            let evs = drain(rx);
            let ups = evs
                .iter()
                .filter(|e| is_connected(e, other.node_id()))
                .count();
            let downs = evs
                .iter()
                .filter(|e| is_disconnected(e, other.node_id()))
                .count();
            assert_eq!(ups, downs + 1, "round {round}: {who} events {evs:?}");
            assert_eq!(
                ups + downs,
                evs.len(),
                "round {round}: {who} events {evs:?}"
            );
            assert!(
                evs.last().is_some_and(|e| is_connected(e, other.node_id())),
                "{evs:?}"
            );
        }
    }
    assert!(raced > 0, "no round actually dialed simultaneously");
}

// 5. LRU eviction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_connection_is_evicted_at_the_limit() {
    init_tracing();
    let mut cn = config();
    cn.limits.max_connections = 2;
    let n = start(cn).await;
    let mut en = n.subscribe_events();
    let p1 = start(config()).await;
    let p2 = start(config()).await;
    let p3 = start(config()).await;
    let mut e2 = p2.subscribe_events();

    for p in [&p1, &p2] {
        within(
            STEP,
            "peer dials N",
            p.connect(n.local_addr(), Some(n.node_id())),
        )
        .await
        .expect("dial N");
        next_event(&mut en, STEP, "N: Connected", |e| {
            is_connected(e, p.node_id())
        })
        .await;
    }
    // N uses its connection to p1: p2 becomes the least recently used.
    let used = within(
        STEP,
        "N uses p1",
        n.connect(p1.local_addr(), Some(p1.node_id())),
    )
    .await
    .expect("pooled p1");
    assert_eq!(used.direction(), Direction::Inbound, "reused, not redialed");
    assert_eq!(n.metrics().pool_hits_total.get(), 1);

    within(
        STEP,
        "p3 dials N",
        p3.connect(n.local_addr(), Some(n.node_id())),
    )
    .await
    .expect("dial N");
    // N makes room (p2 gone), then admits p3, and says so in that order.
    let evs = [
        next_event(&mut en, STEP, "N: next event", |_| true).await,
        next_event(&mut en, STEP, "N: next event", |_| true).await,
    ];
    assert!(is_disconnected(&evs[0], p2.node_id()), "{evs:?}");
    assert!(is_connected(&evs[1], p3.node_id()), "{evs:?}");
    assert_eq!(n.metrics().pool_evictions_total.get(), 1);

    let ev = next_event(&mut e2, STEP, "p2: Disconnected", |e| {
        is_disconnected(e, n.node_id())
    })
    .await;
    let PeerEvent::Disconnected { reason, .. } = ev else {
        unreachable!()
    };
    assert!(reason.contains("Evicted"), "reason: {reason}");

    let mut ids: Vec<_> = n.peers().iter().map(|p| p.node_id()).collect();
    ids.sort();
    let mut want = vec![p1.node_id(), p3.node_id()];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(n.metrics().connections_current.get(), 2);
    for p in [&p1, &p3] {
        let conn = p.peer(&n.node_id()).expect("still pooled");
        conn.ping(PING).await.expect("survivor still works");
    }
    eventually(STEP, "p2 forgets N", || p2.peers().is_empty()).await;
}

// 6. Idle timeout, and kept connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_but_kept_ones_stay() {
    init_tracing();
    let idle = Duration::from_millis(300);
    let mut ci = config();
    ci.limits.idle_timeout = idle;

    // Idle: closed, with Disconnected on both sides.
    let a = start(ci.clone()).await;
    let b = start(config()).await;
    let mut ea = a.subscribe_events();
    let mut eb = b.subscribe_events();
    let t0 = Instant::now();
    let p = within(STEP, "dial", a.connect(b.local_addr(), Some(b.node_id())))
        .await
        .expect("dial");
    next_event(&mut ea, STEP, "A: Disconnected (idle)", |e| {
        is_disconnected(e, b.node_id())
    })
    .await;
    let waited = t0.elapsed();
    assert!(
        waited >= idle - Duration::from_millis(20),
        "closed after {waited:?}"
    );
    assert!(p.is_closed());
    assert_eq!(a.metrics().pool_idle_closed_total.get(), 1);
    let ev = next_event(&mut eb, STEP, "B: Disconnected", |e| {
        is_disconnected(e, a.node_id())
    })
    .await;
    let PeerEvent::Disconnected { reason, .. } = ev else {
        unreachable!()
    };
    assert!(reason.contains("Idle"), "reason: {reason}");
    assert!(a.peers().is_empty());

    // Kept: survives three idle timeouts.
    let c = start(ci).await;
    let d = start(config()).await;
    let mut ec = c.subscribe_events();
    let kept = within(STEP, "dial", c.connect(d.local_addr(), Some(d.node_id())))
        .await
        .expect("dial");
    kept.set_kept(true);
    let quiet = tokio::time::timeout(
        idle * 3,
        next_event(&mut ec, STEP, "C: Disconnected", |e| {
            is_disconnected(e, d.node_id())
        }),
    )
    .await;
    assert!(quiet.is_err(), "kept connection was closed: {quiet:?}");
    assert!(!kept.is_closed());
    assert_eq!(c.metrics().pool_idle_closed_total.get(), 0);
    kept.ping(PING).await.expect("kept connection works");
    // Un-keeping it lets the idle timer close it: the flag is what held it.
    kept.set_kept(false);
    next_event(&mut ec, STEP, "C: Disconnected after unkeep", |e| {
        is_disconnected(e, d.node_id())
    })
    .await;
}

// 7a/b/c. Bad input on an established connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_answered_and_contained() {
    init_tracing();
    let n = start(config()).await;
    let mut en = n.subscribe_events();
    let raw = RawClient::connect(&n).await;
    let mut control = raw.handshake(&n).await;
    next_event(&mut en, STEP, "N: Connected raw", |e| {
        is_connected(e, raw.identity.node_id())
    })
    .await;

    // (a) Unknown type: ERROR(UnknownMessageType), connection stays up.
    control.send_raw(&FrameHeader::new(0x7e, 3).encode()).await;
    control.send_raw(&[1, 2, 3]).await;
    let e = expect_error(control.recv().await, ErrorCode::UnknownMessageType);
    assert_eq!(e.msg_type, 0x7e);
    control.send(&ping(1)).await;
    expect_pong(control.recv().await, 1);
    assert_eq!(
        n.metrics().protocol_errors(ProtocolErrorKind::UnknownType),
        1
    );

    // (b) Oversized frame on a second stream: only that stream ends.
    let mut side = raw.open().await;
    side.send_raw(&FrameHeader::new(MessageType::Ping as u8, DEFAULT_MAX_FRAME_SIZE + 1).encode())
        .await;
    expect_error(side.recv().await, ErrorCode::FrameTooLarge);
    assert!(
        matches!(side.try_recv().await, Ok(None)),
        "node finishes the stream after the error"
    );
    assert_eq!(
        n.metrics()
            .protocol_errors(ProtocolErrorKind::FrameTooLarge),
        1
    );
    control.send(&ping(2)).await;
    expect_pong(control.recv().await, 2);
    assert!(raw.conn.close_reason().is_none(), "connection stays up");
    // A well-formed ping on yet another stream is still served.
    let mut third = raw.open().await;
    third.send(&ping(3)).await;
    expect_pong(third.recv().await, 3);

    // (c) Garbage PING body on the control stream: ERROR(Malformed), then
    // the connection closes with ProtocolError.
    control
        .send_raw(&FrameHeader::new(MessageType::Ping as u8, 3).encode())
        .await;
    control.send_raw(&[0xc1, 0xc1, 0xc1]).await;
    let e = expect_error(control.recv().await, ErrorCode::Malformed);
    assert_eq!(e.msg_type, MessageType::Ping as u8);
    assert_eq!(
        raw.closed_code().await,
        code(DisconnectReason::ProtocolError)
    );
    assert_eq!(n.metrics().protocol_errors(ProtocolErrorKind::Malformed), 1);
    next_event(&mut en, STEP, "N: Disconnected raw", |e| {
        is_disconnected(e, raw.identity.node_id())
    })
    .await;
    assert!(n.peers().is_empty());
}

// 7d. Bad HELLOs and messages before HELLO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_refused() {
    init_tracing();
    let n = start(config()).await;
    let mut en = n.subscribe_events();

    // Version 2 in HELLO.
    let raw = RawClient::connect(&n).await;
    let mut s = raw.open().await;
    let mut hello = raw.hello();
    hello.version = 2;
    s.send(&Message::Hello(hello)).await;
    let e = expect_error(s.recv().await, ErrorCode::UnsupportedVersion);
    assert!(e.message.contains('2'), "{}", e.message);
    assert_eq!(
        raw.closed_code().await,
        code(DisconnectReason::UnsupportedVersion)
    );
    eventually(STEP, "unsupported version counted", || {
        n.metrics()
            .handshake_failures(HandshakeFailure::UnsupportedVersion)
            == 1
    })
    .await;

    // HELLO naming another node than the certificate proves.
    let raw = RawClient::connect(&n).await;
    let mut s = raw.open().await;
    let mut hello = raw.hello();
    hello.node_id = Identity::generate().node_id();
    s.send(&Message::Hello(hello)).await;
    expect_error(s.recv().await, ErrorCode::IdentityMismatch);
    assert_eq!(
        raw.closed_code().await,
        code(DisconnectReason::IdentityMismatch)
    );
    eventually(STEP, "identity mismatch counted", || {
        n.metrics()
            .handshake_failures(HandshakeFailure::IdentityMismatch)
            == 1
    })
    .await;

    // PING before HELLO.
    let raw = RawClient::connect(&n).await;
    let mut s = raw.open().await;
    s.send(&ping(9)).await;
    let e = expect_error(s.recv().await, ErrorCode::HandshakeRequired);
    assert_eq!(e.msg_type, MessageType::Ping as u8);
    assert_eq!(
        raw.closed_code().await,
        code(DisconnectReason::ProtocolError)
    );
    eventually(STEP, "ping-before-hello counted", || {
        n.metrics().handshake_failures(HandshakeFailure::Protocol) == 1
            && n.metrics().protocol_errors(ProtocolErrorKind::Unexpected) == 1
    })
    .await;

    // None of them was ever a peer.
    assert!(n.peers().is_empty());
    assert!(drain(&mut en).is_empty(), "no peer events");
    // The node still serves a well-behaved client.
    let raw = RawClient::connect(&n).await;
    let mut control = raw.handshake(&n).await;
    control.send(&ping(10)).await;
    expect_pong(control.recv().await, 10);
}

// 8. Bootstrap reconnect with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_peer_is_reconnected_with_backoff() {
    init_tracing();
    let port = free_port();
    let mut cb = config();
    cb.bootstrap = vec![PeerAddr::new("127.0.0.1", port)];
    cb.limits.reconnect_backoff_min = Duration::from_millis(50);
    cb.limits.reconnect_backoff_max = Duration::from_millis(500);
    // Nothing answers at first; fail attempts fast so the retries show.
    cb.limits.handshake_timeout = Duration::from_millis(500);
    let b = start(cb).await;
    let mut eb = b.subscribe_events();
    eventually(STEP, "B retries the missing bootstrap peer", || {
        b.metrics().reconnect_attempts_total.get() > 0
    })
    .await;

    let a1 = start_on_port(config(), port).await;
    let ev = next_event(&mut eb, STEP, "B: Connected to A1", |e| {
        is_connected(e, a1.node_id())
    })
    .await;
    assert!(
        matches!(ev, PeerEvent::Connected { direction: Direction::Outbound, addr, .. } if addr == a1.local_addr())
    );
    let before = b.metrics().reconnect_attempts_total.get();
    assert!(before > 0);
    // The supervisor marks its connection kept right after `connect` returns.
    eventually(STEP, "bootstrap connection is kept", || {
        b.peer(&a1.node_id()).is_some_and(|p| p.is_kept())
    })
    .await;

    within(STEP, "A1 shutdown", a1.shutdown()).await;
    let a1_id = a1.node_id();
    drop(a1);
    next_event(&mut eb, STEP, "B: Disconnected from A1", |e| {
        is_disconnected(e, a1_id)
    })
    .await;

    let a2 = start_on_port(config(), port).await;
    assert_ne!(a2.node_id(), a1_id);
    next_event(&mut eb, STEP, "B: Connected to A2", |e| {
        is_connected(e, a2.node_id())
    })
    .await;
    assert!(b.metrics().reconnect_attempts_total.get() > before);
    let p = b.peer(&a2.node_id()).expect("pooled A2");
    p.ping(PING).await.expect("B pings A2");
    assert!(b.peer(&a1_id).is_none(), "A1 is forgotten");
}

// 9. Graceful shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_tells_peers() {
    init_tracing();
    let a = start(config()).await;
    let b = start(config()).await;
    let mut eb = b.subscribe_events();
    within(
        STEP,
        "B dials A",
        b.connect(a.local_addr(), Some(a.node_id())),
    )
    .await
    .expect("dial");
    next_event(&mut eb, STEP, "B: Connected", |e| {
        is_connected(e, a.node_id())
    })
    .await;

    let t0 = Instant::now();
    within(Duration::from_secs(5), "shutdown", a.shutdown()).await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");

    let ev = next_event(&mut eb, STEP, "B: Disconnected", |e| {
        is_disconnected(e, a.node_id())
    })
    .await;
    let PeerEvent::Disconnected { reason, .. } = ev else {
        unreachable!()
    };
    assert!(reason.contains("Shutdown"), "reason: {reason}");
    assert!(b.peers().is_empty());
    let res = within(
        STEP,
        "connect after shutdown",
        a.connect(b.local_addr(), None),
    )
    .await;
    assert!(matches!(res, Err(ConnectError::ShuttingDown)), "{res:?}");
    // Shutting down twice is harmless and immediate.
    within(Duration::from_secs(1), "second shutdown", a.shutdown()).await;
}

// 10. Self-connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_never_connects_to_itself() {
    init_tracing();
    let port = free_port();
    let mut c = config();
    c.bootstrap = vec![PeerAddr::new("127.0.0.1", port)];
    c.limits.reconnect_backoff_min = Duration::from_millis(50);
    c.limits.reconnect_backoff_max = Duration::from_millis(100);
    let n = start_on_port(c, port).await;
    let mut en = n.subscribe_events();
    let own = n.local_addr();

    // Give the bootstrap supervisor time to (not) spin: with its backoff at
    // 50-100 ms, one second is ten or more retry periods, so a supervisor
    // that retried its own address would show many attempts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(n.peers().is_empty(), "a node must not pool itself");
    let attempts = n.metrics().reconnect_attempts_total.get();
    assert!(attempts <= 1, "supervisor spins: {attempts} attempts");
    assert!(drain(&mut en).is_empty());

    for expected in [None, Some(n.node_id())] {
        let res = within(STEP, "connect to self", n.connect(own, expected)).await;
        assert!(
            matches!(res, Err(ConnectError::SelfConnect { addr }) if addr == own),
            "{res:?}"
        );
    }
    assert!(n.peers().is_empty());
}

// 11. The epoch orders a node's runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_publishes_under_a_higher_epoch_even_when_the_clock_stepped_back() {
    use futures::StreamExt;
    use macula_runtime::clock::{EPOCH_FILE_NAME, EPOCH_SAVE_INTERVAL};
    use macula_runtime::pubsub::{PublishOptions, SubscriptionItem};

    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let epoch_of_one_event = |n: NodeRuntime| async move {
        let mut sub = n.pubsub().subscribe("epoch.check").expect("subscribe");
        n.pubsub()
            .publish(
                "epoch.check",
                bytes::Bytes::from_static(b"x"),
                PublishOptions::default(),
            )
            .expect("publish");
        let epoch = match within(STEP, "the event", sub.next()).await {
            Some(SubscriptionItem::Event(e)) => e.epoch,
            other => panic!("expected an event, got {other:?}"),
        };
        within(STEP, "shutdown", n.shutdown()).await;
        epoch
    };
    let with_dir = || NodeConfig {
        identity: macula_runtime::IdentitySource::DataDir(dir.path().to_path_buf()),
        ..config()
    };
    let first = epoch_of_one_event(start(with_dir()).await).await;
    // Pretend the last run reached an hour past now: the wall clock of the
    // next start reads earlier than what that run used.
    let mark = first + 3_600_000;
    std::fs::write(dir.path().join(EPOCH_FILE_NAME), format!("{mark}\n")).expect("write mark");
    let second = epoch_of_one_event(start(with_dir()).await).await;
    assert!(
        second > mark,
        "epoch {second} not above the last run's mark {mark}"
    );
    assert!(second <= mark + EPOCH_SAVE_INTERVAL.as_millis() as u64 + 1);
    // Shutdown recorded this run's mark, so a third run is above it too.
    let third = epoch_of_one_event(start(with_dir()).await).await;
    assert!(third > second);
}
