//! Replicated streams over real QUIC between nodes in this process
//! (issue 21 item 3): a member that was down while the leader wrote far
//! past its log (snapshots every 50 entries, no log kept after one)
//! catches up by installing the group's snapshot and fetching the records
//! from the leader; its copy is then the leader's, byte for byte, and it
//! applies what comes next from the log. A member asked for records up to
//! a snapshot's index answers only once it has applied that far. A publish
//! is answered at its commit, before the leader's apply, and a read of it
//! waits for that apply.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use macula_runtime::stream::PersistOptions;
use macula_runtime::{IdentitySource, NodeConfig, NodeRuntime};
use macula_stream::StreamConfig;

fn with_dir(cfg: NodeConfig, dir: &tempfile::TempDir) -> NodeConfig {
    NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        raft: macula_runtime::RaftLimits {
            snapshot_every: 50,
            log_kept_after_snapshot: 0,
            ..Default::default()
        },
        ..cfg
    }
}

const STEP: Duration = Duration::from_secs(30);

async fn copy(n: &NodeRuntime) -> Vec<(u64, Vec<u8>)> {
    let mut all = Vec::new();
    let mut from = 0;
    loop {
        let got = n
            .streams()
            .fetch_local("orders", from, 0)
            .await
            .expect("local copy");
        let Some(&(last, _)) = got.last() else {
            return all;
        };
        all.extend(got);
        from = last + 1;
    }
}

async fn publish(n: &NodeRuntime, i: u64) -> u64 {
    within(STEP, "publish", async {
        loop {
            let opts = PersistOptions {
                msg_id: Some(format!("m{i}")),
                ..PersistOptions::new()
            };
            match n
                .stream("orders", Duration::from_secs(5))
                .publish("orders.eu", Bytes::from(format!("payload {i}")), opts)
                .await
            {
                Ok(a) => return a.seq,
                Err(e) => {
                    tracing::debug!(error = %e, "publish retried");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await
}

/// Data directories for three nodes.
fn three_dirs() -> Vec<tempfile::TempDir> {
    (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect()
}

/// Three nodes (the others bootstrapped through the first, which sees
/// both) and stream `orders` added on the first with three replicas.
async fn replicated_orders(dirs: &[tempfile::TempDir]) -> Vec<NodeRuntime> {
    let mut nodes = vec![start(with_dir(config(), &dirs[0])).await];
    for d in &dirs[1..] {
        let n = start(with_dir(boot(&nodes[0]), d)).await;
        joined(&n).await;
        nodes.push(n);
    }
    eventually(STEP, "full mesh", || nodes[0].peers().len() >= 2).await;
    let cfg = StreamConfig {
        replicas: 3,
        ..StreamConfig::new("orders", &["orders.**"])
    };
    within(STEP, "add", nodes[0].streams().add(cfg))
        .await
        .expect("add");
    nodes
}

/// The node that serves `orders` (its leader).
fn serving(nodes: &[NodeRuntime]) -> usize {
    nodes
        .iter()
        .position(|n| {
            n.streams()
                .replica_status("orders")
                .is_some_and(|r| r.serving)
        })
        .expect("a member serves")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_far_behind_installs_a_snapshot_and_fetches_the_records() {
    init_tracing();
    let dirs = three_dirs();
    let mut nodes = replicated_orders(&dirs).await;
    for i in 1..=20 {
        assert_eq!(publish(&nodes[0], i).await, i);
    }
    let leader = serving(&nodes);
    let f = (leader + 1) % 3;
    let anchor = nodes[(f + 1) % 3].clone();
    let port = nodes[f].local_addr().port();
    eventually(STEP, "the follower has the first 20", || {
        nodes[f]
            .streams()
            .replica_status("orders")
            .is_some_and(|r| r.stored == 20)
    })
    .await;
    // Stop it and drop every handle (as a process that exited).
    let stopped = std::mem::replace(&mut nodes[f], anchor.clone());
    stopped.shutdown().await;
    drop(stopped);

    // One entry per publish (one in flight): 300 entries, six snapshots,
    // and the log the follower lacks is purged.
    for i in 21..=300 {
        assert_eq!(publish(&nodes[leader], i).await, i);
    }
    let restarted = start_on_port(with_dir(boot(&anchor), &dirs[f]), port).await;
    eventually(STEP, "caught up through a snapshot", || {
        restarted
            .streams()
            .replica_status("orders")
            .is_some_and(|r| r.stored == 300 && r.last_seq == 300)
    })
    .await;
    let want = copy(&nodes[leader]).await;
    assert_eq!(want.len(), 300);
    assert_eq!(copy(&restarted).await, want, "the same records");
    // And it goes on from the log.
    for i in 301..=310 {
        assert_eq!(publish(&nodes[leader], i).await, i);
    }
    eventually(STEP, "applies new entries", || {
        restarted
            .streams()
            .replica_status("orders")
            .is_some_and(|r| r.stored == 310)
    })
    .await;
    assert_eq!(copy(&restarted).await, copy(&nodes[leader]).await);
    restarted.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_its_majority_refuses_in_time_and_nothing_acknowledged_is_lost() {
    init_tracing();
    let dirs = three_dirs();
    let nodes = replicated_orders(&dirs).await;
    let mut acked = Vec::new();
    for i in 1..=10 {
        acked.push((publish(&nodes[0], i).await, i));
    }
    let l = serving(&nodes);
    let ids: Vec<_> = nodes.iter().map(|n| n.node_id()).collect();
    let others: Vec<_> = ids.iter().copied().filter(|i| *i != ids[l]).collect();
    // Cut the leader's Raft traffic both ways.
    nodes[l].raft().partition(&others);
    for (i, n) in nodes.iter().enumerate() {
        if i != l {
            n.raft().partition(&[ids[l]]);
        }
    }
    // The old leader cannot commit: its publish fails within the request
    // timeout instead of hanging.
    let r = within(
        STEP,
        "a refused publish",
        nodes[l].streams().publish(
            "orders.eu",
            Bytes::from("cut off"),
            PersistOptions {
                msg_id: Some("cut".into()),
                ..PersistOptions::new()
            },
        ),
    )
    .await;
    let e = r.expect_err("no quorum: not acknowledged");
    assert!(
        matches!(e.kind(), "replication" | "not_leader"),
        "{e} ({})",
        e.kind()
    );
    // The majority elects a leader and goes on.
    let survivor = &nodes[(l + 1) % 3];
    for i in 11..=20 {
        acked.push((publish(survivor, i).await, i));
    }
    // Heal: the old leader follows, its copy becomes the majority's.
    for n in &nodes {
        n.raft().partition(&[]);
    }
    for i in 21..=30 {
        acked.push((publish(&nodes[l], i).await, i));
    }
    // Every member ends with exactly the acknowledged records (a follower
    // may apply the last ones a moment after the leader acknowledged them).
    let total = acked.len() as u64;
    for n in &nodes {
        eventually(STEP, "every copy converges", || {
            n.streams()
                .replica_status("orders")
                .is_some_and(|r| r.stored == total)
        })
        .await;
    }
    let want = copy(survivor).await;
    assert_eq!(copy(&nodes[l]).await, want);
    // Every acknowledged publish is stored once, under its sequence.
    let mut seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), acked.len(), "a sequence acknowledged twice");
    for (seq, i) in &acked {
        let rec = want
            .iter()
            .find(|(s, _)| s == seq)
            .unwrap_or_else(|| panic!("acknowledged seq {seq} lost"));
        let text = String::from_utf8_lossy(&rec.1);
        assert!(text.contains(&format!("payload {i}")), "seq {seq}: {text}");
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A member asked for the records of a snapshot (by a member installing
/// it) answers only once it has applied the log up to the snapshot's
/// index: a leader just elected may lag, and a record it has not stored
/// yet would be missing from the installer for good (CI once saw a
/// restarted member end with `last_seq` 405 and 404 records).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_behind_the_snapshot_index_waits_before_it_answers_a_fetch() {
    init_tracing();
    let dirs = three_dirs();
    let nodes = replicated_orders(&dirs).await;
    for i in 1..=10 {
        assert_eq!(publish(&nodes[0], i).await, i);
    }
    let l = serving(&nodes);
    let f = (l + 1) % 3;
    eventually(STEP, "the follower has the first 10", || {
        nodes[f]
            .streams()
            .replica_status("orders")
            .is_some_and(|r| r.stored == 10)
    })
    .await;
    // Cut the follower's Raft traffic both ways: the others go on.
    let ids: Vec<_> = nodes.iter().map(|n| n.node_id()).collect();
    let others: Vec<_> = ids.iter().copied().filter(|i| *i != ids[f]).collect();
    nodes[f].raft().partition(&others);
    for (i, n) in nodes.iter().enumerate() {
        if i != f {
            n.raft().partition(&[ids[f]]);
        }
    }
    for i in 11..=20 {
        assert_eq!(publish(&nodes[l], i).await, i);
    }
    // A publish is answered at its commit, maybe before the leader's
    // apply: its local read waits for that.
    assert_eq!(copy(&nodes[l]).await.len(), 20);
    let index = nodes[l]
        .streams()
        .replica_status("orders")
        .expect("leader status")
        .applied;
    let behind = nodes[f]
        .streams()
        .replica_status("orders")
        .expect("follower status")
        .applied;
    assert!(behind < index, "the follower applied {behind} of {index}");
    let fetch = {
        let n = nodes[f].clone();
        tokio::spawn(async move { n.streams().fetch_local("orders", 0, index).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !fetch.is_finished(),
        "answered at applied {behind}, before the index asked for ({index})"
    );
    for n in &nodes {
        n.raft().partition(&[]);
    }
    // Healed, it catches up and answers with every record (asked again,
    // as an installer does, if it took longer than one fetch waits).
    let mut first = Some(fetch);
    let got = within(STEP, "the fetch", async {
        loop {
            let res = match first.take() {
                Some(t) => t.await.expect("fetch task"),
                None => nodes[f].streams().fetch_local("orders", 0, index).await,
            };
            match res {
                Ok(records) => return records,
                Err(e) => {
                    assert_eq!(e.kind(), "replication", "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    assert_eq!(got.len(), 20, "every record up to the index");
    assert_eq!(got, copy(&nodes[l]).await, "the leader's records");
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A publish is acknowledged once its entry is committed, before the
/// leader's store applied it (the applies are held here), and a read of
/// that sequence on the leader waits until the apply, then finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_is_answered_at_its_commit_and_a_read_of_it_waits_for_the_apply() {
    init_tracing();
    let dirs = three_dirs();
    let nodes = replicated_orders(&dirs).await;
    assert_eq!(publish(&nodes[0], 1).await, 1);
    let l = serving(&nodes);
    let status = || {
        nodes[l]
            .streams()
            .replica_status("orders")
            .expect("leader status")
    };
    // The first publish is applied (its read waits for that).
    assert_eq!(copy(&nodes[l]).await.len(), 1);
    let before = status();
    let direct = nodes[l].raft().counters().proposed_directly_total.get();
    assert!(nodes[l].streams().hold_applies("orders", true));
    let opts = PersistOptions {
        msg_id: Some("m2".into()),
        ..PersistOptions::new()
    };
    let ack = within(
        STEP,
        "the publish, answered at its commit",
        nodes[l].stream("orders", Duration::from_secs(5)).publish(
            "orders.eu",
            Bytes::from("payload 2"),
            opts,
        ),
    )
    .await
    .expect("acknowledged while the leader's applies are held");
    assert_eq!(ack.seq, 2);
    let after = status();
    assert_eq!(after.applied, before.applied, "nothing applied meanwhile");
    assert_eq!(after.acked_at_commit, before.acked_at_commit + 1);
    // Alone, it went to openraft without the proposer task's hop.
    assert!(nodes[l].raft().counters().proposed_directly_total.get() > direct);
    let read = {
        let n = nodes[l].clone();
        tokio::spawn(async move { n.streams().get_msg("orders", 2).await })
    };
    eventually(STEP, "the read waits for the apply", || {
        status().apply_waits > before.apply_waits
    })
    .await;
    assert!(!read.is_finished(), "read before the apply");
    assert!(nodes[l].streams().hold_applies("orders", false));
    let msg = within(STEP, "the read", read)
        .await
        .expect("read task")
        .expect("read")
        .expect("the acknowledged message");
    assert_eq!(msg.payload, Bytes::from("payload 2"));
    assert!(status().applied > before.applied);
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Publishes in flight together, some handed to openraft directly and
/// some batched by the proposer: log order stays sequence order, so every
/// member ends with the same records, each acknowledged sequence holding
/// its own publish's payload, and `last_seq` the highest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_are_stored_in_sequence_order_on_every_member() {
    init_tracing();
    let dirs = three_dirs();
    let nodes = replicated_orders(&dirs).await;
    assert_eq!(publish(&nodes[0], 1).await, 1);
    let l = serving(&nodes);
    let tasks: Vec<_> = (2..=201u64)
        .map(|i| {
            let n = nodes[l].clone();
            tokio::spawn(async move { (publish(&n, i).await, i) })
        })
        .collect();
    let mut acked = std::collections::BTreeMap::new();
    for t in tasks {
        let (seq, i) = t.await.expect("publish task");
        assert!(acked.insert(seq, i).is_none(), "sequence {seq} twice");
    }
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (2..=201).collect::<Vec<_>>()
    );
    for (&seq, &i) in &acked {
        let m = nodes[l]
            .streams()
            .get_msg("orders", seq)
            .await
            .expect("read")
            .expect("an acknowledged message");
        assert_eq!(
            m.payload,
            Bytes::from(format!("payload {i}")),
            "sequence {seq}"
        );
    }
    let want = copy(&nodes[l]).await;
    assert_eq!(want.len(), 201);
    for n in &nodes {
        eventually(STEP, "every member has every record", || {
            n.streams()
                .replica_status("orders")
                .is_some_and(|r| r.stored == 201 && r.last_seq == 201)
        })
        .await;
        assert_eq!(copy(n).await, want, "the leader's copy");
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A replicated stream removed while one member is behind in its applies
/// (it has a backlog of acknowledged entries to apply): the removal
/// succeeds, every member drops the stream, its store file and its
/// group's files, and a stream of the same name added afterwards starts
/// over at sequence 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicated_stream_removed_with_applies_behind_is_gone_from_every_member() {
    init_tracing();
    let dirs = three_dirs();
    let nodes = replicated_orders(&dirs).await;
    assert_eq!(publish(&nodes[0], 1).await, 1);
    let l = serving(&nodes);
    let f = (l + 1) % nodes.len();
    assert!(nodes[f].streams().hold_applies("orders", true));
    for i in 2..=100 {
        publish(&nodes[l], i).await;
    }
    // The held member applies its backlog while the removal goes on.
    assert!(nodes[f].streams().hold_applies("orders", false));
    within(STEP, "remove", nodes[l].streams().delete("orders"))
        .await
        .expect("removed from every member");
    for (n, d) in nodes.iter().zip(&dirs) {
        assert!(!n.streams().names().contains(&"orders".to_string()));
        assert!(n.streams().replica_status("orders").is_none());
        assert!(!d.path().join("streams/orders.redb").exists());
        assert!(!d.path().join("raft/_stream.orders.redb").exists());
    }
    let cfg = StreamConfig {
        replicas: 3,
        ..StreamConfig::new("orders", &["orders.**"])
    };
    within(STEP, "add again", nodes[0].streams().add(cfg))
        .await
        .expect("added again");
    assert_eq!(publish(&nodes[0], 1000).await, 1, "a new stream");
    for n in &nodes {
        n.shutdown().await;
    }
}
