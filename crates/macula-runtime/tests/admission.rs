//! A realm with an authority (issue 18): nodes are admitted only with a
//! valid grant for the node ID they prove in TLS. Real nodes, real QUIC on
//! 127.0.0.1.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{config, start, within, STEP};
use ed25519_dalek::SigningKey;
use macula_auth::{Key, Subject};
use macula_runtime::config::Admission;
use macula_runtime::metrics::HandshakeFailure;
use macula_runtime::{Identity, IdentitySource, NodeConfig, NodeRuntime, PeerAddr};
use macula_wire::NodeId;

fn id_in(dir: &Path) -> NodeId {
    Identity::load_or_create(dir).expect("identity").node_id()
}

fn grant(authority: &SigningKey, serial: u8, subject: NodeId, expires_ms: u64) -> Vec<u8> {
    common::signed_grant(
        authority,
        serial,
        Subject::Node(subject),
        "allow publish **",
        0,
        expires_ms,
    )
}

fn member(dir: &Path, realm: Key, grant: Option<Vec<u8>>) -> NodeConfig {
    NodeConfig {
        identity: IdentitySource::DataDir(dir.to_path_buf()),
        admission: Some(Admission::new(realm, grant)),
        ..config()
    }
}

async fn dial(from: &NodeRuntime, to: &NodeRuntime) -> Result<(), String> {
    let addr = PeerAddr::from(to.local_addr());
    within(STEP, "dial", from.connect_addr(&addr))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

fn unauthorized(n: &NodeRuntime) -> u64 {
    n.metrics()
        .handshake_failures(HandshakeFailure::Unauthorized)
}

#[tokio::test]
async fn only_nodes_with_a_valid_grant_for_their_id_are_admitted() {
    let authority = SigningKey::from_bytes(&[1; 32]);
    let realm = Key::of(&authority);
    let far = u64::MAX / 2;
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().expect("dir")).collect();
    let ids: Vec<NodeId> = dirs.iter().map(|d| id_in(d.path())).collect();

    let a = start(member(
        dirs[0].path(),
        realm,
        Some(grant(&authority, 1, ids[0], far)),
    ))
    .await;
    let b = start(member(
        dirs[1].path(),
        realm,
        Some(grant(&authority, 2, ids[1], far)),
    ))
    .await;
    dial(&b, &a).await.expect("a granted node is admitted");

    // No grant at all.
    let c = start(member(dirs[2].path(), realm, None)).await;
    let err = dial(&c, &a).await.expect_err("no grant");
    assert!(err.contains("grant"), "{err}");
    // Another node's grant.
    let d = start(member(
        dirs[3].path(),
        realm,
        Some(grant(&authority, 3, ids[0], far)),
    ))
    .await;
    let err = dial(&d, &a).await.expect_err("someone else's grant");
    assert!(err.contains("wrong_subject"), "{err}");
    // An expired grant.
    let e = start(member(
        dirs[4].path(),
        realm,
        Some(grant(&authority, 4, ids[4], 1_000)),
    ))
    .await;
    let err = dial(&e, &a).await.expect_err("expired");
    assert!(err.contains("expired"), "{err}");
    common::eventually(Duration::from_secs(5), "refusals counted", || {
        unauthorized(&a) >= 3
    })
    .await;
    // A grant from another authority.
    let forger = SigningKey::from_bytes(&[2; 32]);
    let f_dir = tempfile::tempdir().expect("dir");
    let f_id = id_in(f_dir.path());
    let f = start(member(
        f_dir.path(),
        realm,
        Some(grant(&forger, 5, f_id, far)),
    ))
    .await;
    let err = dial(&f, &a).await.expect_err("forged");
    assert!(
        err.contains("wrong_realm") || err.contains("bad_signature"),
        "{err}"
    );
    // An open node (no authority) is refused by the realm's nodes too.
    let open = start(config()).await;
    assert!(dial(&open, &a).await.is_err());
    // The admitted pair is still connected.
    assert!(a.peers().iter().any(|p| p.node_id() == ids[1]));
}
