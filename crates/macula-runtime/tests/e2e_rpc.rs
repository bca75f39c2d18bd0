//! End-to-end encryption of RPC (issue 19) with real nodes and clients
//! over real QUIC on 127.0.0.1: a realm key set names the procedure
//! pattern `billing.**`; a client calls a procedure another client serves
//! through both their gateways. The caller seals the arguments and opens
//! the reply, the provider opens the arguments before its handler and
//! seals the reply; both gateways carry only envelopes. A principal
//! without the key cannot call, and a call in the clear on the encrypted
//! procedure is refused by the gateway, with a clear error and a metric.
//! And with a relay in the path (two private nodes reaching each other
//! through a public one): what the relay forwards holds no plaintext of an
//! encrypted event or call, and the event crosses the relayed connection
//! as an envelope.

mod common;

use std::future::IntoFuture;
use std::time::Duration;

use bytes::Bytes;
use common::realm::*;
use common::{boot, init_tracing, joined, start, within, STEP};
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use macula_auth::keys::{rotate, Envelope, KeySet, PatternKind, Rotation, ENVELOPE_OVERHEAD};
use macula_auth::Key;
use macula_runtime::config::{Admission, ReachabilityMode};
use macula_runtime::pubsub::SubscriptionItem;
use macula_runtime::rpc::{AdvertiseOptions, Carried, HandlerResult, Request, RpcError};
use macula_runtime::{Client, IdentitySource, NodeConfig, NodeRuntime};

/// A key set encrypting calls of `billing.**` (and, with `topics`, events
/// on `orders.**`) for `members`.
fn procedure_set(authority: &SigningKey, members: &[Key]) -> Vec<u8> {
    key_set(authority, members, false)
}

fn key_set(authority: &SigningKey, members: &[Key], topics: bool) -> Vec<u8> {
    let rotation = |pattern: &str, kind| Rotation {
        pattern: pattern.into(),
        kind,
        members: members.to_vec(),
        now_ms: now_ms(),
        activate_in_ms: 0,
        grace_ms: 60_000,
        rotate_every_ms: None,
    };
    let mut rng = macula_runtime::e2e::SysRng;
    let (mut body, _) = rotate(
        None,
        Key::of(authority),
        &rotation("billing.**", PatternKind::Procedure),
        &mut rng,
    )
    .expect("rotate");
    if topics {
        body = rotate(
            Some(body),
            Key::of(authority),
            &rotation("orders.**", PatternKind::Topic),
            &mut rng,
        )
        .expect("rotate")
        .0;
    }
    KeySet::sign(&body, authority)
        .expect("sign")
        .to_bytes()
        .expect("encode")
}

async fn holds(v: u64, clients: &[&Client], nodes: &[&NodeRuntime]) {
    within(STEP, "key set spreads", async {
        loop {
            let c = clients.iter().all(|c| c.e2e().version() == v);
            let n = nodes.iter().all(|n| n.realm_service().e2e().version() == v);
            if c && n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn receipt(req: Request) -> HandlerResult {
    // The handler gets the arguments opened.
    assert!(req.payload.starts_with(b"secret card"), "{:?}", req.payload);
    let mut out = b"receipt for ".to_vec();
    out.extend_from_slice(&req.payload);
    Ok(Bytes::from(out))
}

fn no_plaintext(b: &[u8]) -> bool {
    !b.windows(6).any(|w| w == b"secret" || w == b"receip")
}

async fn carried(rx: &mut tokio::sync::mpsc::Receiver<Carried>) -> Carried {
    within(STEP, "a carried call", rx.recv())
        .await
        .expect("the tap is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_calls_cross_gateways_as_ciphertext_and_clear_calls_are_refused() {
    init_tracing();
    let authority = SigningKey::from_bytes(&[44; 32]);
    let (a, _ad) = member(&authority, 1, None).await;
    let (b, _bd) = member(&authority, 2, Some(&a)).await;
    let (caller, _c1d) = client_of(&a, &authority, 3).await;
    let (provider, _c2d) = client_of(&b, &authority, 4).await;
    let (stranger, _c3d) = client_of(&a, &authority, 5).await;
    let set = procedure_set(
        &authority,
        &[caller.e2e().member_key(), provider.e2e().member_key()],
    );
    a.realm_service().install_keys(&set, None).expect("install");
    holds(1, &[&caller, &provider, &stranger], &[&a, &b]).await;

    let _reg = provider
        .advertise("billing.charge", AdvertiseOptions::default(), receipt)
        .await
        .expect("advertise");
    let mut tap_a = a.rpc().tap_carried(64);
    let mut tap_b = b.rpc().tap_carried(64);

    let n = 5u32;
    for i in 0..n {
        let args = format!("secret card {i}");
        let r = within(
            STEP,
            "call",
            caller.call("billing.charge", args.clone()).into_future(),
        )
        .await
        .expect("the call succeeds");
        assert_eq!(r.payload, Bytes::from(format!("receipt for {args}")));
        // Both gateways (the caller's, calling into the mesh, and the
        // provider's, calling its client) carried envelopes both ways.
        for tap in [&mut tap_a, &mut tap_b] {
            let c = carried(tap).await;
            assert_eq!(c.procedure, "billing.charge");
            assert_eq!(c.arguments.len(), args.len() + ENVELOPE_OVERHEAD);
            assert!(
                no_plaintext(&c.arguments),
                "a gateway carried the arguments in the clear"
            );
            Envelope::decode(&c.arguments).expect("the arguments are an envelope");
            let reply = c.reply.expect("a reply");
            assert_eq!(reply.len(), r.payload.len() + ENVELOPE_OVERHEAD);
            assert!(
                no_plaintext(&reply),
                "a gateway carried the reply in the clear"
            );
            Envelope::decode(&reply).expect("the reply is an envelope");
        }
    }
    let (cc, pc) = (caller.e2e().counters(), provider.e2e().counters());
    assert_eq!(cc.e2e_calls.at(0).get(), u64::from(n), "caller sealed");
    assert_eq!(cc.e2e_calls.at(1).get(), u64::from(n), "caller opened");
    assert_eq!(pc.e2e_calls.at(1).get(), u64::from(n), "provider opened");
    assert_eq!(pc.e2e_calls.at(0).get(), u64::from(n), "provider sealed");

    // A handler's error message is sealed like a reply: the caller gets
    // it opened, both gateways carried only the envelope.
    let _refuse = provider
        .advertise(
            "billing.refuse",
            AdvertiseOptions::default(),
            |_r: Request| async move {
                Err(macula_runtime::rpc::HandlerError::new(
                    402,
                    "secret card declined",
                ))
            },
        )
        .await
        .expect("advertise");
    match within(
        STEP,
        "refused call",
        caller.call("billing.refuse", "secret card r").into_future(),
    )
    .await
    {
        Err(RpcError::Handler { code, message, .. }) => {
            assert_eq!((code, message.as_str()), (402, "secret card declined"))
        }
        other => panic!("expected the handler's error, got {other:?}"),
    }
    for tap in [&mut tap_a, &mut tap_b] {
        let c = carried(tap).await;
        assert_eq!(c.procedure, "billing.refuse");
        let e = c.error.expect("the call failed");
        assert!(
            e.starts_with(macula_runtime::e2e::SEALED_ERROR) && no_plaintext(e.as_bytes()),
            "a gateway carried the error message in the clear: {e}"
        );
        assert!(!e.contains("declined"), "{e}");
    }
    assert_eq!(
        cc.e2e_calls.at(1).get(),
        u64::from(n) + 1,
        "caller opened the error"
    );
    assert_eq!(
        pc.e2e_calls.at(0).get(),
        u64::from(n) + 1,
        "provider sealed the error"
    );
    // A message too long for CALL_ERROR once sealed is cut (at a
    // character boundary) before it is sealed.
    let _long = provider
        .advertise(
            "billing.long",
            AdvertiseOptions::default(),
            |_r: Request| async move {
                Err(macula_runtime::rpc::HandlerError::new(1, "é".repeat(2_000)))
            },
        )
        .await
        .expect("advertise");
    match within(
        STEP,
        "long error",
        caller.call("billing.long", "x").into_future(),
    )
    .await
    {
        Err(RpcError::Handler { message, .. }) => assert_eq!(message, "é".repeat(351)),
        other => panic!("expected the handler's error, got {other:?}"),
    }
    for tap in [&mut tap_a, &mut tap_b] {
        let e = carried(tap).await.error.expect("the call failed");
        assert!(e.len() <= 1_024 && e.starts_with(macula_runtime::e2e::SEALED_ERROR));
    }

    // A client the key is not wrapped to cannot call: a clear error here,
    // nothing sent.
    match within(
        STEP,
        "stranger",
        stranger
            .call("billing.charge", "secret card x")
            .into_future(),
    )
    .await
    {
        Err(RpcError::Sealing {
            provider: None,
            reason,
            ..
        }) => {
            assert!(reason.contains("billing.**"), "{reason}")
        }
        other => panic!("expected a sealing error, got {other:?}"),
    }
    assert_eq!(stranger.e2e().counters().e2e_calls.at(4).get(), 1);
    // Nor can a gateway node that is not a member, for itself.
    match within(
        STEP,
        "node a",
        a.rpc()
            .call("billing.charge", "secret card y")
            .into_future(),
    )
    .await
    {
        Err(RpcError::Sealing { provider: None, .. }) => {}
        other => panic!("expected a sealing error, got {other:?}"),
    }

    // A call in the clear on the encrypted procedure is refused by the
    // caller's gateway, counted there, and never reaches the handler.
    let served = pc.e2e_calls.at(1).get();
    match within(
        STEP,
        "clear call",
        caller
            .call("billing.charge", "secret card z")
            .as_carried()
            .into_future(),
    )
    .await
    {
        Err(RpcError::Sealing {
            provider: Some(p),
            reason,
            ..
        }) => {
            assert_eq!(p, a.node_id());
            assert!(reason.contains("encrypted end to end"), "{reason}");
        }
        other => panic!("expected a sealing refusal, got {other:?}"),
    }
    assert_eq!(a.realm_service().counters().e2e_calls.at(5).get(), 1);
    assert_eq!(pc.e2e_calls.at(1).get(), served, "the handler saw nothing");
    // A procedure outside the pattern is carried in the clear as before.
    let _echo = provider
        .advertise(
            "plain.echo",
            AdvertiseOptions::default(),
            |r: Request| async move { Ok(r.payload) },
        )
        .await
        .expect("advertise");
    let r = within(
        STEP,
        "plain",
        caller.call("plain.echo", "hello").into_future(),
    )
    .await
    .expect("plain call");
    assert_eq!(r.payload, Bytes::from("hello"));
}

/// A member node behind (emulated) NAT, bootstrapped through `relay`: it
/// refuses every direct inbound connection.
async fn private_member(
    authority: &SigningKey,
    serial: u8,
    relay: &NodeRuntime,
) -> (NodeRuntime, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let g = grant(authority, serial, identity_in(dir.path()).node_id());
    let node = start(NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        admission: Some(Admission::new(Key::of(authority), Some(g))),
        reachability: ReachabilityMode::Private,
        ..boot(relay)
    })
    .await;
    joined(&node).await;
    let rid = relay.node_id();
    common::eventually(STEP, "reservation at the relay", || {
        node.tunnel().reserved_relays().contains(&rid)
    })
    .await;
    (node, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_in_the_path_forwards_no_plaintext_of_encrypted_events_and_calls() {
    init_tracing();
    let authority = SigningKey::from_bytes(&[46; 32]);
    let (r, _rd) = member(&authority, 1, None).await;
    let (a, _ad) = private_member(&authority, 2, &r).await;
    let (c, _cd) = private_member(&authority, 3, &r).await;
    // The edges are the two private nodes' own applications.
    let members = [
        a.realm_service().e2e().member_key(),
        c.realm_service().e2e().member_key(),
    ];
    let set = key_set(&authority, &members, true);
    r.realm_service().install_keys(&set, None).expect("install");
    // Two rotations: version 2.
    holds(2, &[], &[&r, &a, &c]).await;
    let mut forwarded = r.relay().tap_bytes(1 << 16);

    let mut on_c = c
        .pubsub()
        .subscribe_mesh("orders.**")
        .await
        .expect("subscribe");
    let mut tap_c = c.pubsub().tap_mesh("orders.**").await.expect("tap");
    let _reg = c
        .rpc()
        .advertise("billing.charge", AdvertiseOptions::default(), receipt)
        .await
        .expect("advertise");
    // The first publish finds C (the DHT), fails to dial it directly and
    // goes through its relay: repeated until one arrives.
    let got = within(
        Duration::from_secs(20),
        "an event through the relay",
        async {
            loop {
                a.pubsub()
                    .publish_mesh(
                        "orders.new",
                        Bytes::from("secret order"),
                        Default::default(),
                    )
                    .await
                    .expect("publish");
                if let Ok(Some(SubscriptionItem::Event(e))) =
                    tokio::time::timeout(Duration::from_millis(300), on_c.next()).await
                {
                    return e;
                }
            }
        },
    )
    .await;
    assert_eq!(got.payload, Bytes::from("secret order"));
    assert_eq!(
        a.peer(&c.node_id()).and_then(|p| p.relayed_via()),
        Some(r.node_id()),
        "A reached C through R"
    );
    // What crossed the relayed connection was the envelope.
    let carried = within(STEP, "tap", tap_c.next()).await;
    match carried {
        Some(SubscriptionItem::Event(e)) => {
            assert_eq!(e.payload.len(), "secret order".len() + ENVELOPE_OVERHEAD);
            assert!(no_plaintext(&e.payload));
        }
        other => panic!("expected an event, got {other:?}"),
    }
    // An encrypted call over the same relayed connection.
    let reply = within(
        STEP,
        "a call through the relay",
        a.rpc()
            .call("billing.charge", "secret card r")
            .into_future(),
    )
    .await
    .expect("the call succeeds");
    assert_eq!(reply.payload, Bytes::from("receipt for secret card r"));
    assert_eq!(reply.provider, c.node_id());
    assert_eq!(
        c.realm_service().counters().e2e_calls.at(1).get(),
        1,
        "C opened the call"
    );

    // Every byte the relay forwarded, both ways: some, none of them the
    // plaintext of the event, the call or the reply.
    let mut seen = 0usize;
    let mut all = Vec::new();
    while let Ok(chunk) = forwarded.try_recv() {
        seen += chunk.len();
        all.extend_from_slice(&chunk);
    }
    assert!(seen > 0, "the relay forwarded nothing");
    assert!(no_plaintext(&all), "the relay forwarded plaintext");
    for n in [&a, &c, &r] {
        n.shutdown().await;
    }
}
