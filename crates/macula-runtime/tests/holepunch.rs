//! Hole punching's upgrade over loopback (issue 22): A reaches C through
//! the relay R; the punching service then finds C's listen address among
//! its candidates, both dial, and the direct connection replaces the
//! relayed one on both sides while A publishes without pause to C's
//! subscription: C receives every message from the first on, in order,
//! once. (Real NATs: `macula-cli/tests/nat_types.rs`.)

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use macula_runtime::pubsub::{PublishOptions, SubscriptionItem};
use macula_runtime::NodeConfig;
use macula_wire::time::Millis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_connection_goes_direct_without_losing_a_message() {
    init_tracing();
    let r = start(config()).await;
    let c = start(boot(&r)).await;
    joined(&c).await;
    // A waits a second on the relay before punching: the stream below
    // starts on the relayed connection and moves to the direct one.
    let mut cfg: NodeConfig = boot(&r);
    cfg.nat.punch_start_delay = Millis(1_000);
    let a = start(cfg).await;
    joined(&a).await;

    let mut sub = within(STEP, "subscribe", c.pubsub().subscribe_mesh("up.*"))
        .await
        .expect("subscribe");
    // C reserves at R (it is public: it would not by itself).
    let cr = c.peer(&r.node_id()).expect("C is connected to R");
    within(STEP, "reservation", c.tunnel().reserve(&cr))
        .await
        .expect("reserve at R");
    // Joining may have connected A and C directly: close that (as idle),
    // so that A reaches C through R.
    if let Some(p) = a.peer(&c.node_id()) {
        p.disconnect(
            macula_wire::DisconnectReason::Idle,
            "test: go through the relay",
        )
        .await;
    }
    eventually(STEP, "A and C apart", || {
        a.peer(&c.node_id()).is_none() && c.peer(&a.node_id()).is_none()
    })
    .await;
    let relay = a.peer(&r.node_id()).expect("A is connected to R");
    let relayed = within(
        STEP,
        "relayed connection",
        a.connect_via(&relay, c.node_id()),
    )
    .await
    .expect("connect through R");
    assert_eq!(relayed.relayed_via(), Some(r.node_id()));
    // Connections A opened (to R, to C when joining, to C through R), and
    // the direct ones so far: all but the relayed one.
    let (opened, direct) = a.reachability().direct_rate();
    assert_eq!(opened, direct + 1);

    // Publish 0, 1, 2, ... every 2 ms (bounded: at most 3,000 messages or
    // 10 s) until C has received one and the connection is direct, and
    // 200 more after that.
    let publisher = {
        let a = a.clone();
        let cid = c.node_id();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut direct_at: Option<u64> = None;
            let mut i: u64 = 0;
            while i < 3_000 && started.elapsed() < Duration::from_secs(10) {
                a.pubsub()
                    .publish_mesh(
                        "up.x",
                        Bytes::from(i.to_string()),
                        PublishOptions::default(),
                    )
                    .await
                    .expect("publish");
                i += 1;
                let direct = a.peer(&cid).is_some_and(|p| p.relayed_via().is_none());
                if direct && direct_at.is_none() {
                    direct_at = Some(i);
                }
                if direct_at.is_some_and(|d| i >= d + 200) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (i, direct_at)
        })
    };
    let mut got: Vec<u64> = Vec::new();
    let (sent, direct_at) = within(Duration::from_secs(20), "the stream", async {
        let mut done: Option<(u64, Option<u64>)> = None;
        let mut publisher = Some(publisher);
        loop {
            if let Some((sent, _)) = done {
                if got.last().is_some_and(|l| l + 1 >= sent) {
                    return done.expect("done");
                }
            }
            tokio::select! {
                item = sub.recv() => match item {
                    Some(SubscriptionItem::Event(e)) => {
                        let n: u64 = std::str::from_utf8(&e.payload).expect("utf8").parse().expect("number");
                        got.push(n);
                    }
                    Some(other) => panic!("lost or dropped on the way: {other:?}"),
                    None => panic!("subscription ended"),
                },
                res = async { publisher.as_mut().expect("publisher").await }, if publisher.is_some() => {
                    publisher = None;
                    done = Some(res.expect("publisher task"));
                }
            }
        }
    })
    .await;
    let direct_at = direct_at.expect("the connection never went direct");
    let first = got[0];
    eprintln!("sent {sent}: from {first} received, direct after {direct_at}");
    assert!(
        first < direct_at,
        "nothing went over the relay (first received {first}, direct after {direct_at})"
    );
    let want: Vec<u64> = (first..sent).collect();
    assert_eq!(
        got, want,
        "C must receive every message from the first on, in order, once"
    );

    // Both sides hold the direct connection; the relayed one is gone.
    let ac = a.peer(&c.node_id()).expect("A-C");
    assert_eq!(ac.relayed_via(), None);
    eventually(STEP, "C holds the direct connection", || {
        c.peer(&a.node_id())
            .is_some_and(|p| p.relayed_via().is_none())
    })
    .await;
    let pc = a.hole_punching().counters();
    assert_eq!(pc.outcome("direct"), 1);
    assert_eq!(pc.first_round_total.get(), 1);
    assert!(c.hole_punching().counters().responder_dials_total.get() >= 1);
    // The relayed connection counts as direct now: it went direct.
    assert_eq!(a.reachability().direct_rate(), (opened, opened));

    for n in [&a, &c, &r] {
        n.shutdown().await;
    }
}
