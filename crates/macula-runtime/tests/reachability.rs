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
    assert!(
        a.reachability()
            .counters()
            .served_reached_total
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // The pool still holds exactly one connection per peer.
    assert_eq!(a.peers().len(), 1);
    assert_eq!(b.peers().len(), 1);
}
