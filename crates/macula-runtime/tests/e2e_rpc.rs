//! End-to-end encryption of RPC (issue 19) with real nodes and clients
//! over real QUIC on 127.0.0.1: a realm key set names the procedure
//! pattern `billing.**`; a client calls a procedure another client serves
//! through both their gateways. The caller seals the arguments and opens
//! the reply, the provider opens the arguments before its handler and
//! seals the reply; both gateways carry only envelopes. A principal
//! without the key cannot call, and a call in the clear on the encrypted
//! procedure is refused by the gateway, with a clear error and a metric.

mod common;

use std::future::IntoFuture;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{boot, config, init_tracing, joined, start, within, STEP};
use ed25519_dalek::SigningKey;
use macula_auth::keys::{rotate, Envelope, KeySet, PatternKind, Rotation, ENVELOPE_OVERHEAD};
use macula_auth::{Key, Subject};
use macula_runtime::config::Admission;
use macula_runtime::rpc::{AdvertiseOptions, Carried, HandlerResult, Request, RpcError};
use macula_runtime::{
    Client, ClientConfig, Identity, IdentitySource, NodeConfig, NodeRuntime, PeerAddr,
};
use macula_wire::NodeId;

const FAR: u64 = u64::MAX / 2;
const ALL: &str = "allow subscribe **\nallow publish **\nallow call **\nallow advertise **";

fn identity_in(dir: &Path) -> Identity {
    Identity::load_or_create(dir).expect("identity")
}

fn grant(authority: &SigningKey, serial: u8, subject: NodeId) -> Vec<u8> {
    common::signed_grant(authority, serial, Subject::Node(subject), ALL, 0, FAR)
}

async fn member(
    authority: &SigningKey,
    serial: u8,
    via: Option<&NodeRuntime>,
) -> (NodeRuntime, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let g = grant(authority, serial, identity_in(dir.path()).node_id());
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
) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let addr: PeerAddr = format!("{}@{}", gateway.node_id(), gateway.local_addr())
        .parse()
        .expect("address");
    let mut cfg = ClientConfig::new(vec![addr]);
    cfg.identity = IdentitySource::DataDir(dir.path().to_path_buf());
    cfg.grant = Some(grant(authority, serial, identity_in(dir.path()).node_id()));
    let c = within(STEP, "client attaches", Client::connect(cfg))
        .await
        .expect("client attaches");
    (c, dir)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A key set encrypting calls of `billing.**` for `members`.
fn procedure_set(authority: &SigningKey, members: &[Key]) -> Vec<u8> {
    let (body, _) = rotate(
        None,
        Key::of(authority),
        &Rotation {
            pattern: "billing.**".into(),
            kind: PatternKind::Procedure,
            members: members.to_vec(),
            now_ms: now_ms(),
            activate_in_ms: 0,
            grace_ms: 60_000,
            rotate_every_ms: None,
        },
        &mut macula_runtime::e2e::SysRng,
    )
    .expect("rotate");
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
