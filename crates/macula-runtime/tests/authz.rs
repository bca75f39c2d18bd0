//! Permissions in a realm with an authority (issue 18), with real nodes,
//! clients and a hand-driven peer over real QUIC on 127.0.0.1: checked
//! where a request enters the mesh (a node's own application, a gateway's
//! client) and again where it is delivered or served (a batch from a peer
//! that may not publish it, a peer that may not receive it, a caller that
//! may not call, a provider that may not serve).

mod common;

use std::future::IntoFuture;
use std::path::Path;

use bytes::Bytes;
use common::{boot, config, joined, start, within, RawClient, STEP};
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use macula_auth::{Key, Subject};
use macula_runtime::config::Admission;
use macula_runtime::pubsub::{Subscription, SubscriptionItem};
use macula_runtime::rpc::{AdvertiseOptions, HandlerError, Request, RpcError};
use macula_runtime::{
    Client, ClientConfig, Identity, IdentitySource, NodeConfig, NodeRuntime, PeerAddr,
};
use macula_wire::client::{ClientMessage, ClientSubscribe};
use macula_wire::pubsub::{BatchMessage, Publish, PublishBatch};
use macula_wire::rpc::{Call, RpcMessage};
use macula_wire::{ErrorCode, Message, NodeId, RpcErrorKind};

const FAR: u64 = u64::MAX / 2;

fn id_in(dir: &Path) -> NodeId {
    Identity::load_or_create(dir).expect("identity").node_id()
}

fn grant(authority: &SigningKey, serial: u8, subject: NodeId, rules: &str) -> Vec<u8> {
    common::signed_grant(authority, serial, Subject::Node(subject), rules, 0, FAR)
}

/// A node of the realm with a grant of `rules`, joined through `via`.
async fn member(
    authority: &SigningKey,
    serial: u8,
    rules: &str,
    via: Option<&NodeRuntime>,
) -> (NodeRuntime, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let g = grant(authority, serial, id_in(dir.path()), rules);
    let node = start(NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        admission: Some(Admission::new(Key::of(authority), Some(g))),
        ..via.map(boot).unwrap_or_else(config)
    })
    .await;
    if via.is_some() {
        joined(&node).await;
    }
    (node, dir)
}

async fn client_of(
    gateway: &NodeRuntime,
    authority: &SigningKey,
    serial: u8,
    rules: &str,
) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let addr: PeerAddr = format!("{}@{}", gateway.node_id(), gateway.local_addr())
        .parse()
        .expect("address");
    let mut cfg = ClientConfig::new(vec![addr]);
    cfg.identity = IdentitySource::DataDir(dir.path().to_path_buf());
    cfg.grant = Some(grant(authority, serial, id_in(dir.path()), rules));
    let c = within(STEP, "client attaches", Client::connect(cfg))
        .await
        .expect("client attaches");
    (c, dir)
}

async fn next_payload(sub: &mut Subscription) -> String {
    match within(STEP, "event", sub.next()).await {
        Some(SubscriptionItem::Event(e)) => String::from_utf8_lossy(&e.payload).into_owned(),
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn echo(req: Request) -> Result<Bytes, HandlerError> {
    Ok(req.payload)
}

#[tokio::test]
async fn pubsub_is_checked_where_it_enters_and_where_it_is_delivered() {
    let authority = SigningKey::from_bytes(&[1; 32]);
    // S: a subscriber that may also publish anything.
    let (s, _sd) = member(&authority, 1, "allow subscribe **\nallow publish **", None).await;
    // P: may publish orders.* and nothing else.
    let (p, _pd) = member(&authority, 2, "allow publish orders.*", Some(&s)).await;
    // G: a gateway that may receive orders.* (for itself or its clients),
    // and has no `relay`.
    let (g, _gd) = member(&authority, 3, "allow subscribe orders.*", Some(&s)).await;

    // Where requests enter: P's own application.
    let e = p
        .pubsub()
        .subscribe("orders.*")
        .expect_err("P may not subscribe");
    assert!(e.to_string().contains("may not subscribe"), "{e}");
    let e = p
        .pubsub()
        .publish_mesh("payments.x", Bytes::from("no"), Default::default())
        .await
        .expect_err("P may not publish payments");
    assert!(e.to_string().contains("payments.x"), "{e}");
    assert_eq!(p.realm_service().counters().denied.at(0).get(), 1);
    assert_eq!(p.realm_service().counters().denied.at(1).get(), 1);

    let mut on_s = s.pubsub().subscribe_mesh("**").await.expect("S subscribes");
    p.pubsub()
        .publish_mesh("orders.1", Bytes::from("o1"), Default::default())
        .await
        .expect("P publishes orders");
    assert_eq!(next_payload(&mut on_s).await, "o1");

    // Where it is delivered: a peer that skips its own checks (a raw
    // connection with a grant for `publish orders.*`) is refused at S.
    let raw = RawClient::connect(&s).await;
    let mut hello = raw.hello();
    hello.grant = Some(serde_bytes::ByteBuf::from(grant(
        &authority,
        4,
        raw.identity.node_id(),
        "allow publish orders.*",
    )));
    let mut ctl = raw.open().await;
    ctl.send(&Message::Hello(hello)).await;
    assert!(matches!(ctl.recv().await, Message::Hello(_)));
    let publish = |topic: &str, seq: u64| {
        Message::Publish(Publish {
            topic: topic.into(),
            payload: topic.as_bytes().to_vec(),
            publisher: raw.identity.node_id(),
            epoch: 1,
            seq,
            headers: vec![],
            message_id: None,
        })
    };
    ctl.send(&publish("payments.x", 1)).await;
    match ctl.recv().await {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.message.contains("payments.x"), "{}", e.message);
        }
        other => panic!("expected an ERROR, got {other:?}"),
    }
    ctl.send(&publish("orders.2", 2)).await;
    // Same publisher, in order: payments.x was never delivered.
    assert_eq!(next_payload(&mut on_s).await, "orders.2");
    assert_eq!(s.pubsub().counters().unauthorized_dropped_total.get(), 1);
    // The same on a pub/sub data stream: a batch with a topic its sender
    // may not publish is refused whole.
    let mut send = within(STEP, "open_uni", raw.conn.open_uni())
        .await
        .expect("open a data stream");
    send.write_all(&[macula_runtime::pubsub::STREAM_KIND_PUBSUB])
        .await
        .expect("kind byte");
    let mut data = macula_runtime::framed::FrameWriter::new(send, 1 << 20);
    let batch = |msgs: &[(&str, u64)]| {
        Message::PublishBatch(PublishBatch {
            publisher: raw.identity.node_id(),
            epoch: 1,
            messages: msgs
                .iter()
                .map(|(topic, seq)| BatchMessage {
                    seq: *seq,
                    topic: topic.to_string(),
                    payload: topic.as_bytes().to_vec(),
                    headers: vec![],
                    message_id: None,
                })
                .collect(),
            seals: vec![],
        })
    };
    for b in [
        batch(&[("orders.3", 3), ("payments.y", 4)]),
        batch(&[("orders.5", 5)]),
    ] {
        within(STEP, "send batch", data.send(&b))
            .await
            .expect("send a batch");
    }
    assert_eq!(next_payload(&mut on_s).await, "orders.5");
    assert_eq!(s.pubsub().counters().unauthorized_dropped_total.get(), 3);

    // A gateway passes on only what it may receive: G may receive
    // orders.*, not payments.*, so its client's payments subscription
    // (allowed by the client's own grant) gets nothing from S.
    let (c, _cd) = client_of(
        &g,
        &authority,
        5,
        "allow subscribe orders.*\nallow subscribe payments.*",
    )
    .await;
    // The client refuses itself what its grant does not allow ...
    let e = c
        .subscribe("secret.*")
        .await
        .expect_err("outside the client's grant");
    assert!(e.to_string().contains("may not subscribe"), "{e}");
    // ... and its gateway refuses a client that does not (a raw one).
    let raw_client = RawClient::connect(&g).await;
    let mut hello = raw_client.hello();
    hello.capabilities = vec![macula_wire::client::CLIENT_CAPABILITY.to_string()];
    hello.grant = Some(serde_bytes::ByteBuf::from(grant(
        &authority,
        6,
        raw_client.identity.node_id(),
        "allow subscribe orders.*",
    )));
    let mut rc = raw_client.open().await;
    rc.send(&Message::Hello(hello)).await;
    assert!(matches!(rc.recv().await, Message::Hello(_)));
    for (id, pattern) in [(1, "secret.*"), (2, "orders.*")] {
        rc.send(&Message::Client(ClientMessage::Subscribe(
            ClientSubscribe {
                id,
                pattern: pattern.into(),
            },
        )))
        .await;
    }
    let mut acks = Vec::new();
    while acks.len() < 2 {
        if let Message::Client(ClientMessage::Ack(a)) = rc.recv().await {
            acks.push(a);
        }
    }
    assert_eq!(acks[0].id, 1);
    assert!(
        acks[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("may not subscribe")),
        "{acks:?}"
    );
    assert_eq!((acks[1].id, acks[1].error.clone()), (2, None));
    let pay = c.subscribe("payments.*").await.expect("client subscribes");
    let mut orders = c.subscribe("orders.*").await.expect("client subscribes");
    s.pubsub()
        .publish_mesh("payments.1", Bytes::from("p1"), Default::default())
        .await
        .expect("S publishes");
    s.pubsub()
        .publish_mesh("orders.9", Bytes::from("o9"), Default::default())
        .await
        .expect("S publishes");
    assert_eq!(next_payload(&mut orders).await, "o9");
    // payments.1 came first from the same publisher: had it been sent, it
    // would be queued by now.
    assert_eq!(pay.pending(), 0);
    assert_eq!(s.pubsub().counters().unauthorized_dropped_total.get(), 4);
    // Denials are in the audit trail (each distinct one once a minute).
    let trail = audit_text(&s);
    assert!(trail.contains("\"kind\":\"denied\""), "{trail}");
    assert_eq!(trail.matches("payments.1").count(), 1, "{trail}");
}

#[tokio::test]
async fn rpc_is_checked_where_it_enters_and_where_it_is_served() {
    let authority = SigningKey::from_bytes(&[1; 32]);
    let (s, _sd) = member(&authority, 1, "allow advertise orders.get", None).await;
    let (p, _pd) = member(&authority, 2, "allow call orders.*", Some(&s)).await;
    // G: a gateway that may carry nothing for its clients.
    let (g, _gd) = member(&authority, 3, "allow call orders.*", Some(&s)).await;

    // Entry: S may not serve what it was not granted; P may not call
    // outside orders.*.
    let e = s
        .rpc()
        .advertise("payments.pay", AdvertiseOptions::default(), echo)
        .await
        .expect_err("S may not advertise payments.pay");
    assert!(
        matches!(e, RpcError::Unauthorized { provider: None, .. }),
        "{e:?}"
    );
    let _reg = s
        .rpc()
        .advertise("orders.get", AdvertiseOptions::default(), echo)
        .await
        .expect("S advertises orders.get");
    let e = within(
        STEP,
        "call",
        p.rpc().call("payments.pay", "x").into_future(),
    )
    .await
    .expect_err("P may not call payments.pay");
    assert!(
        matches!(e, RpcError::Unauthorized { provider: None, .. }),
        "{e:?}"
    );
    let r = within(STEP, "call", p.rpc().call("orders.get", "o").into_future())
        .await
        .expect("P calls orders.get");
    assert_eq!(r.payload, Bytes::from("o"));

    // Served: a raw peer without `call` is refused by the provider.
    let raw = RawClient::connect(&s).await;
    let mut hello = raw.hello();
    hello.grant = Some(serde_bytes::ByteBuf::from(grant(
        &authority,
        4,
        raw.identity.node_id(),
        "allow publish orders.*",
    )));
    let mut ctl = raw.open().await;
    ctl.send(&Message::Hello(hello)).await;
    assert!(matches!(ctl.recv().await, Message::Hello(_)));
    ctl.send(&Message::Rpc(RpcMessage::Call(Call {
        id: 7,
        procedure: "orders.get".into(),
        payload: b"sneak".to_vec(),
        timeout_ms: 5_000,
        headers: vec![],
        origin: None,
    })))
    .await;
    match ctl.recv().await {
        Message::Rpc(RpcMessage::Error(e)) => {
            assert_eq!((e.id, e.kind), (7, RpcErrorKind::Unauthorized));
            assert!(e.message.contains("may not call"), "{}", e.message);
        }
        other => panic!("expected CALL_ERROR, got {other:?}"),
    }

    // A client of G may advertise orders.audit (its own grant says so),
    // but G may not serve it for anyone (no `advertise` nor `relay`):
    // callers do not send it calls.
    let (_c, _cd) = client_of(&g, &authority, 5, "allow advertise orders.audit").await;
    let _cr = _c
        .advertise("orders.audit", AdvertiseOptions::default(), echo)
        .await
        .expect("the client's gateway takes its advertisement");
    let e = within(
        STEP,
        "call",
        p.rpc().call("orders.audit", "x").into_future(),
    )
    .await
    .expect_err("G may not serve orders.audit");
    assert!(e.to_string().contains("may not advertise"), "{e}");
}

fn revocations(authority: &SigningKey, version: u64, serials: &[u8]) -> Vec<u8> {
    macula_auth::RevocationList::sign(
        &macula_auth::RevocationBody {
            realm: Key::of(authority),
            version,
            issued_ms: 0,
            grants: serials.iter().map(|s| [*s; 16]).collect(),
            subjects: vec![],
        },
        authority,
    )
    .expect("sign")
    .to_bytes()
    .expect("encode")
}

/// The node's audit trail so far, as text (flushed first).
fn audit_text(n: &NodeRuntime) -> String {
    let log = n
        .audit()
        .expect("a node with a data directory keeps an audit trail");
    log.flush();
    let mut text = String::new();
    for f in macula_runtime::audit_log::files(log.dir()).expect("audit files") {
        text.push_str(&std::fs::read_to_string(f).expect("read"));
    }
    text
}

fn connected(n: &NodeRuntime, id: NodeId) -> bool {
    n.peers()
        .iter()
        .any(|p| p.node_id() == id && !p.is_closed())
}

#[tokio::test]
async fn a_revocation_spreads_through_the_mesh_and_closes_the_revoked() {
    use macula_runtime::authz::Installed;
    let authority = SigningKey::from_bytes(&[1; 32]);
    let all = "allow publish **\nallow subscribe **";
    let (a, ad) = member(&authority, 1, all, None).await;
    let (b, bd) = member(&authority, 2, all, Some(&a)).await;
    let (c, _cd) = member(&authority, 3, all, Some(&b)).await;
    let (k, _kd) = client_of(&b, &authority, 4, all).await;
    common::eventually(STEP, "b connected to c and k", || {
        connected(&b, c.node_id()) && connected(&b, k.node_id())
    })
    .await;

    // Revoke c's grant and k's, at a only.
    let list = revocations(&authority, 1, &[3, 4]);
    let t = std::time::Instant::now();
    assert_eq!(
        a.realm_service().install(&list),
        Ok(Installed::Adopted { version: 1 })
    );
    common::eventually(STEP, "the revoked are disconnected everywhere", || {
        !connected(&a, c.node_id()) && !connected(&b, c.node_id()) && !connected(&b, k.node_id())
    })
    .await;
    let took = t.elapsed();
    eprintln!("revoked principals disconnected {took:?} after the list reached one node");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    for n in [&a, &b] {
        let held = n.realm_service().authz().expect("authz").revoked();
        assert_eq!(held.list.version, 1);
    }
    assert!(b.realm_service().counters().closed.at(0).get() >= 1);
    // In the audit trails: the adoption, and the closings.
    let trail = audit_text(&b);
    assert!(trail.contains("\"kind\":\"revocations\""), "{trail}");
    assert!(trail.contains("\"kind\":\"revoked_closed\""), "{trail}");
    assert!(trail.contains("\"kind\":\"admitted\""), "{trail}");
    // Kept in the data directory; an older or equal list changes nothing.
    for d in [&ad, &bd] {
        assert_eq!(
            std::fs::read(d.path().join(macula_runtime::realm::REVOCATIONS_FILE)).expect("kept"),
            list
        );
    }
    assert_eq!(
        b.realm_service().install(&revocations(&authority, 1, &[])),
        Ok(Installed::Stale { have: 1 })
    );
    assert!(b.realm_service().install(b"forged").is_err());
    // c cannot come back.
    let e = within(
        STEP,
        "redial",
        c.connect_addr(&PeerAddr::from(a.local_addr())),
    )
    .await
    .expect_err("revoked");
    assert!(e.to_string().contains("revoked"), "{e}");
    // A node that joins later gets the list from its first peer.
    let (d, _dd) = member(&authority, 5, all, Some(&b)).await;
    common::eventually(STEP, "d learns the list", || {
        d.realm_service()
            .authz()
            .is_some_and(|z| z.revoked().list.version == 1)
    })
    .await;
}

#[tokio::test]
async fn a_list_over_a_peers_frame_limit_is_not_sent_and_counted() {
    let authority = SigningKey::from_bytes(&[1; 32]);
    let all = "allow publish **";
    let (a, _ad) = member(&authority, 1, all, None).await;
    let dir = tempfile::tempdir().expect("dir");
    let g = grant(&authority, 2, id_in(dir.path()), all);
    let mut cfg = NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        admission: Some(Admission::new(Key::of(&authority), Some(g))),
        ..common::boot(&a)
    };
    cfg.limits.max_frame_size = 16 * 1024;
    let b = start(cfg).await;
    joined(&b).await;
    // 2,000 serials: about 36 KB, over b's 16 KiB frames.
    let serials: Vec<u8> = (0..=255).collect();
    let big = macula_auth::RevocationList::sign(
        &macula_auth::RevocationBody {
            realm: Key::of(&authority),
            version: 1,
            issued_ms: 0,
            grants: (0..2000u32)
                .map(|i| {
                    let mut id = [serials[(i % 256) as usize]; 16];
                    id[0..4].copy_from_slice(&i.to_be_bytes());
                    id
                })
                .collect(),
            subjects: vec![],
        },
        &authority,
    )
    .expect("sign")
    .to_bytes()
    .expect("encode");
    assert!(big.len() > 16 * 1024);
    a.realm_service().install(&big).expect("adopted");
    common::eventually(STEP, "counted as too large", || {
        a.realm_service().counters().revocation_lists.at(3).get() >= 1
    })
    .await;
    assert_eq!(
        b.realm_service().authz().map(|z| z.revoked().list.version),
        Some(0)
    );
}
