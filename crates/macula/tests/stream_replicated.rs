//! Replicated streams (issue 21 item 3): a stream with three replicas is
//! one Raft group over three nodes; every acknowledged message is on a
//! majority, the leader serves, the others forward; when the leader
//! stops, another takes office with every acknowledged message and the
//! stream goes on.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use macula::stream::{ConsumerConfig, PersistOptions, StreamConfig, StreamError, StreamHandle};
use macula::Node;

const STEP: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(5);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn node(dir: &tempfile::TempDir, boot: Option<&Node>) -> Node {
    let mut b = Node::builder()
        .realm("test.stream")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .data_dir(dir.path());
    if let Some(first) = boot {
        b = b.bootstrap([first.local_addr().to_string()]);
    }
    within("start", b.start()).await.expect("starts")
}

/// Publishes with message ID `id` until acknowledged (a leader change in
/// between is retried: the ID makes a repeat a duplicate). The sequence.
async fn publish(s: &StreamHandle, id: &str) -> u64 {
    within("publish", async {
        loop {
            let opts = PersistOptions {
                msg_id: Some(id.to_string()),
                ..PersistOptions::new()
            };
            match s
                .publish("orders.eu", Bytes::from(id.to_string()), opts)
                .await
            {
                Ok(a) => return a.seq,
                Err(
                    e @ (StreamError::NotLeader { .. }
                    | StreamError::Replication(_)
                    | StreamError::Unreachable(_)),
                ) => {
                    tracing::debug!(error = %e, "publish retried");
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(StreamError::Remote { kind, .. })
                    if kind == "not_leader" || kind == "replication" || kind == "unreachable" =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("publish {id}: {e}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicated_stream_keeps_every_acknowledged_message_when_its_leader_stops() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(&dirs[0], None).await;
    let b = node(&dirs[1], Some(&a)).await;
    let c = node(&dirs[2], Some(&a)).await;
    let nodes = [a, b, c];
    within("the first node sees both others", async {
        while nodes[0].peers().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let cfg = StreamConfig {
        replicas: 3,
        ..StreamConfig::new("orders", &["orders.**"])
    };
    let info = within("add", nodes[0].streams().add(cfg.clone()))
        .await
        .expect("add");
    let rep = info.replication.expect("replication report");
    assert_eq!(rep.members.len(), 3, "{rep:?}");
    // Adding it again is the same answer.
    within("add again", nodes[0].streams().add(cfg))
        .await
        .expect("add again");

    // Publishes through each member: the leader stores, the others
    // forward to it.
    let mut acked = BTreeSet::new();
    for i in 0..60u64 {
        let s = nodes[(i % 3) as usize].stream("orders", TIMEOUT);
        let seq = publish(&s, &format!("m{i}")).await;
        assert!(acked.insert(seq), "sequence {seq} acknowledged twice");
    }
    assert_eq!(acked, (1..=60).collect());
    // Every member's store has them (committed on a majority, applied by
    // all three shortly after).
    within("every member applies", async {
        loop {
            let stored: Vec<u64> = nodes
                .iter()
                .map(|n| n.streams().replica_status("orders").map_or(0, |r| r.stored))
                .collect();
            if stored.iter().all(|&n| n == 60) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let leader = nodes
        .iter()
        .position(|n| {
            n.streams()
                .replica_status("orders")
                .is_some_and(|r| r.serving)
        })
        .expect("a member serves");
    let survivors: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, n)| n)
        .collect();

    // The leader stops; another takes office with everything acknowledged.
    within("leader shutdown", nodes[leader].shutdown()).await;
    for i in 60..90u64 {
        let s = survivors[(i % 2) as usize].stream("orders", TIMEOUT);
        let seq = publish(&s, &format!("m{i}")).await;
        assert!(acked.insert(seq), "sequence {seq} acknowledged twice");
    }
    assert_eq!(acked.len(), 90);
    let s = survivors[0].stream("orders", TIMEOUT);
    let info = within("info", s.info()).await.expect("info");
    assert_eq!(info.messages, 90, "{info:?}");
    assert_ne!(
        info.replication.as_ref().map(|r| r.leader.clone()),
        Some(nodes[leader].id().to_string())
    );
    // Read back in order, each once, with its payload.
    let c = within("consumer", s.add_consumer(ConsumerConfig::durable("audit")))
        .await
        .expect("consumer");
    let mut seen = Vec::new();
    while seen.len() < 90 {
        let got = within("next", s.next(&c, 50, None, Duration::from_secs(1)))
            .await
            .expect("next");
        assert!(!got.is_empty(), "messages missing after {}", seen.len());
        for m in got {
            seen.push((m.seq, String::from_utf8_lossy(&m.payload).to_string()));
        }
    }
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, acked.iter().copied().collect::<Vec<_>>());
    let ids: BTreeSet<String> = seen.into_iter().map(|(_, p)| p).collect();
    assert_eq!(ids.len(), 90, "each message once");

    // Removed from every member that is up.
    within("delete", survivors[1].streams().delete("orders"))
        .await
        .expect_err("the stopped member is not reached");
    for n in &survivors {
        assert!(!n.streams().hosts("orders"));
    }
    for n in survivors {
        within("shutdown", n.shutdown()).await;
    }
}
