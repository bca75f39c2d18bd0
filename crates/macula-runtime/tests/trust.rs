//! Trust on first use in an open realm (issue 18): a node with a data
//! directory pins the node ID first seen at an address it was given without
//! one, refuses another node there later, and takes a new one once the pin
//! is revoked. Real nodes, real QUIC on 127.0.0.1.

mod common;

use common::{config, free_port, start, start_on_port, within, STEP};
use macula_runtime::config::TrustLimits;
use macula_runtime::trust::Pins;
use macula_runtime::{ConnectError, IdentitySource, NodeConfig, PeerAddr};

#[tokio::test]
async fn a_changed_key_at_a_pinned_address_is_refused_until_the_pin_is_revoked() {
    let port = free_port();
    let target = PeerAddr::new("127.0.0.1".to_string(), port);
    let first = start_on_port(config(), port).await;
    let dir = tempfile::tempdir().expect("dir");
    let me = start(NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        ..config()
    })
    .await;
    let p = within(STEP, "first use", me.connect_addr(&target))
        .await
        .expect("first use connects");
    assert_eq!(p.node_id(), first.node_id());
    let pins = Pins::load(dir.path()).expect("pins");
    assert_eq!(pins.pins[&target.authority()].node_id, first.node_id());
    assert_eq!(me.trust().counters().pinned_total.get(), 1);

    // Another node (another key) takes the address.
    let first_id = first.node_id();
    within(STEP, "shutdown", first.shutdown()).await;
    drop(first);
    drop(p);
    let second = start_on_port(config(), port).await;
    assert_ne!(second.node_id(), first_id);
    let e = within(STEP, "changed key", me.connect_addr(&target))
        .await
        .expect_err("a changed key is refused");
    assert!(matches!(e, ConnectError::Untrusted { .. }), "{e}");
    assert!(e.is_permanent());
    assert!(e.to_string().contains("macula trust revoke"), "{e}");
    assert_eq!(me.trust().counters().refused_total.get(), 1);

    // The operator accepts the new key (what `macula trust revoke` does).
    let mut pins = Pins::load(dir.path()).expect("pins");
    pins.pins.remove(&target.authority());
    pins.save(dir.path()).expect("save");
    let p = within(STEP, "after revoke", me.connect_addr(&target))
        .await
        .expect("connects after the pin is revoked");
    assert_eq!(p.node_id(), second.node_id());
    assert_eq!(
        Pins::load(dir.path()).expect("pins").pins[&target.authority()].node_id,
        second.node_id()
    );
}

#[tokio::test]
async fn nodes_without_a_data_directory_or_with_tofu_off_pin_nothing() {
    let a = start(config()).await;
    let dir = tempfile::tempdir().expect("dir");
    let off = start(NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        trust: TrustLimits {
            enabled: false,
            max_pins: 10,
        },
        ..config()
    })
    .await;
    within(
        STEP,
        "dial",
        off.connect_addr(&PeerAddr::from(a.local_addr())),
    )
    .await
    .expect("connects");
    assert!(Pins::load(dir.path()).expect("pins").pins.is_empty());
    let ephemeral = start(config()).await;
    within(
        STEP,
        "dial",
        ephemeral.connect_addr(&PeerAddr::from(a.local_addr())),
    )
    .await
    .expect("connects");
    assert_eq!(ephemeral.trust().counters().pinned_total.get(), 0);
}
