//! Reachability over loopback: two nodes dial each other back from a
//! separate socket and both learn they are public, at their real address.

mod common;

use common::*;
use macula_runtime::reachability::ReachState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_loopback_are_public_at_their_address() {
    init_tracing();
    let a = start(config()).await;
    assert_eq!(a.reachability().state(), ReachState::Unknown);
    let b = start(boot(&a)).await;
    for n in [&a, &b] {
        let want = n.local_addr().to_string();
        eventually(STEP, "public", || {
            matches!(n.reachability().state(), ReachState::Public { ref addrs } if addrs.contains(&want))
        })
        .await;
    }
    // Dial-backs are not handshake failures on the receiving side.
    for n in [&a, &b] {
        let failures: u64 = macula_runtime::metrics::HandshakeFailure::ALL
            .into_iter()
            .map(|f| n.metrics().handshake_failures(f))
            .sum();
        assert_eq!(failures, 0);
    }
    assert!(a.reachability().counters().served_reached_total.get() >= 1);
    // The pool still holds exactly one connection per peer.
    assert_eq!(a.peers().len(), 1);
    assert_eq!(b.peers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertisements_carry_the_address_peers_reached() {
    init_tracing();
    let a = start(config()).await;
    // Listening on every interface: the listen address alone is not
    // dialable, so advertisements start without one.
    let b = start(macula_runtime::NodeConfig {
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        ..boot(&a)
    })
    .await;
    joined(&b).await;
    let _reg = b
        .rpc()
        .advertise(
            "svc.where",
            macula_runtime::rpc::AdvertiseOptions::default(),
            |r: macula_runtime::rpc::Request| async move {
                Ok::<_, macula_runtime::rpc::HandlerError>(r.payload)
            },
        )
        .await
        .expect("advertise");
    let want = format!("127.0.0.1:{}", b.local_addr().port());
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let services = a.rpc().services().await.expect("services");
        let addrs: Vec<String> = services
            .iter()
            .filter(|(p, _)| p == "svc.where")
            .flat_map(|(_, ps)| ps.iter().flat_map(|p| p.addrs.clone()))
            .collect();
        if addrs.contains(&want) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "advertisement never carried {want}: {addrs:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Every HELLO tells the peer where it is seen: on loopback nobody is
/// translated, so every node finds itself behind no NAT, from each peer it
/// connected to, and every connection was direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observed_addresses_show_no_nat_on_loopback() {
    use macula_runtime::nat::Mapping;
    init_tracing();
    let a = start(config()).await;
    assert_eq!(
        a.reachability().nat(a.now()).report.mapping,
        Mapping::Unknown
    );
    let b = start(boot(&a)).await;
    let c = start(macula_runtime::NodeConfig {
        bootstrap: vec![
            macula_runtime::PeerAddr::from(a.local_addr()),
            macula_runtime::PeerAddr::from(b.local_addr()),
        ],
        ..config()
    })
    .await;
    eventually(STEP, "C observed by A and B", || {
        c.reachability().nat(c.now()).report.observers >= 2
    })
    .await;
    for n in [&a, &b, &c] {
        let nat = n.reachability().nat(n.now());
        assert_eq!(nat.report.mapping, Mapping::NoNat, "{nat:?}");
        assert_eq!(nat.report.behind_nat, Some(false), "{nat:?}");
        assert!(nat.report.reflexive.is_empty(), "{nat:?}");
        let (opened, direct) = n.reachability().direct_rate();
        assert!(opened >= 1);
        assert_eq!(opened, direct, "every connection on loopback is direct");
        // Nothing to relay for: no NAT.
        assert!(!n.reachability().wants_relay(n.now()));
    }
    let counters = c.reachability().counters();
    assert_eq!(counters.nat_mapping.get(), Mapping::NoNat.code());
    assert_eq!(counters.nat_observers.get(), 2);
}
