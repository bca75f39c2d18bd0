//! Raft groups over real QUIC between nodes in this process: election,
//! writes and linearizable reads through any member, watches, leases,
//! membership changes, a leader that stops, a member that restarts.

mod common;

use std::time::Duration;

use common::*;
use macula_raft::{Expect, Request, Response};
use macula_runtime::raft::{Group, GroupError, GroupOptions, ReadConsistency};
use macula_runtime::{IdentitySource, NodeConfig, NodeRuntime};
use macula_wire::NodeId;

fn with_dir(cfg: NodeConfig, dir: &tempfile::TempDir) -> NodeConfig {
    NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        ..cfg
    }
}

struct Mesh {
    dirs: Vec<tempfile::TempDir>,
    nodes: Vec<NodeRuntime>,
}

/// `n` nodes with data directories, all bootstrapped through the first.
async fn mesh(n: usize) -> Mesh {
    let dirs: Vec<_> = (0..n)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let first = start(with_dir(config(), &dirs[0])).await;
    let mut nodes = vec![first.clone()];
    for d in &dirs[1..] {
        let node = start(with_dir(boot(&first), d)).await;
        joined(&node).await;
        nodes.push(node);
    }
    Mesh { dirs, nodes }
}

async fn join_all(nodes: &[NodeRuntime], name: &str) -> Vec<Group> {
    let members: Vec<NodeId> = nodes.iter().map(|n| n.node_id()).collect();
    let mut groups = Vec::new();
    for n in nodes {
        let g = within(
            STEP,
            "join",
            n.raft().join(
                name,
                GroupOptions {
                    members: members.clone(),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("joins");
        groups.push(g);
    }
    groups
}

/// Waits until every group agrees on one leader; its index.
async fn agreed_leader(groups: &[Group]) -> usize {
    let mut leader = None;
    eventually(STEP, "one leader all members agree on", || {
        let seen: Vec<Option<NodeId>> = groups.iter().map(|g| g.leader()).collect();
        leader = seen[0];
        leader.is_some() && seen.iter().all(|l| *l == leader)
    })
    .await;
    let leader = leader.expect("a leader");
    groups
        .iter()
        .position(|g| g.is_leader() && g.leader() == Some(leader))
        .expect("the leader is a member")
}

fn put(key: &str, value: &str) -> Request {
    Request::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        lease: None,
        prev_kv: false,
    }
}

async fn value(g: &Group, key: &str, c: ReadConsistency) -> Option<Vec<u8>> {
    let (_, kv) = within(STEP, "get", g.get(key.as_bytes(), c))
        .await
        .expect("get");
    kv.map(|kv| kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_elect_replicate_and_read_through_any_member() {
    init_tracing();
    let m = mesh(3).await;
    let groups = join_all(&m.nodes, "kv").await;
    let l = agreed_leader(&groups).await;
    let follower = &groups[(l + 1) % 3];
    let other = &groups[(l + 2) % 3];

    // A write through a follower is forwarded to the leader.
    let r = within(STEP, "put", follower.write(put("a", "1")))
        .await
        .expect("put");
    let Response::Put { revision, .. } = r else {
        panic!("unexpected {r:?}")
    };
    assert!(revision >= 1);
    // A linearizable read through the other follower sees it at once.
    assert_eq!(
        value(other, "a", ReadConsistency::Linearizable).await,
        Some(b"1".to_vec())
    );
    // And every member's own state machine gets it.
    for g in &groups {
        eventually(STEP, "replicated", || g.local_revision() >= revision).await;
        assert_eq!(
            value(g, "a", ReadConsistency::Stale).await,
            Some(b"1".to_vec())
        );
    }

    // Compare-and-swap: the first wins, the second sees the new value.
    let cas = |expect: &str, to: &str| Request::Cas {
        key: b"a".to_vec(),
        expect: Expect::Value(expect.as_bytes().to_vec()),
        value: to.as_bytes().to_vec(),
        lease: None,
    };
    let first = follower.write(cas("1", "2")).await.expect("cas");
    assert!(
        matches!(
            first,
            Response::Cas {
                succeeded: true,
                ..
            }
        ),
        "{first:?}"
    );
    let second = other.write(cas("1", "3")).await.expect("cas");
    match second {
        Response::Cas {
            succeeded: false,
            current: Some(kv),
            ..
        } => assert_eq!(kv.value, b"2"),
        other => panic!("unexpected {other:?}"),
    }

    // A watch from revision 1 sees the history, then live changes. The
    // history is what `other` has applied: wait until that includes the
    // CAS, or its live events would start with it, not with `b`.
    let Response::Cas { revision: cas, .. } = first else {
        panic!("unexpected {first:?}")
    };
    eventually(STEP, "cas applied", || other.local_revision() >= cas).await;
    let (backlog, mut live) = other.watch(b"", 1).expect("watch");
    assert!(backlog.iter().any(|e| e.key() == b"a"), "{backlog:?}");
    follower.write(put("b", "x")).await.expect("put b");
    let (_, ev) = within(STEP, "watch event", live.recv())
        .await
        .expect("event");
    assert_eq!(ev.key(), b"b", "{ev:?}");

    // Membership as every member sees it.
    let state = groups[l].leader_state();
    assert_eq!(state.voters.len(), 3);
    for n in &m.nodes {
        assert!(state.voters.contains(&n.node_id()));
    }
    for n in &m.nodes {
        n.shutdown().await;
    }
    drop(m.dirs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_leader_is_replaced_and_no_acknowledged_write_is_lost() {
    init_tracing();
    let m = mesh(3).await;
    let groups = join_all(&m.nodes, "failover").await;
    let l = agreed_leader(&groups).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("k{i}");
        groups[(l + 1) % 3]
            .write(put(&key, "v"))
            .await
            .expect("put");
        acked.push(key);
    }
    let old = groups[l].leader().expect("leader");
    let stopped = std::time::Instant::now();
    m.nodes[l].shutdown().await;
    let rest: Vec<Group> = (0..3)
        .filter(|i| *i != l)
        .map(|i| groups[i].clone())
        .collect();
    let mut new = None;
    eventually(Duration::from_secs(10), "a new leader", || {
        new = rest[0].leader().filter(|n| *n != old);
        new.is_some() && rest[1].leader() == new
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("new leader after {took:?}");
    for key in &acked {
        assert_eq!(
            value(&rest[0], key, ReadConsistency::Linearizable).await,
            Some(b"v".to_vec()),
            "{key} lost"
        );
    }
    rest[1]
        .write(put("after", "1"))
        .await
        .expect("write after failover");
    for n in &m.nodes {
        n.shutdown().await;
    }
}

/// With openraft's own election timer off on the followers, only the
/// election watchdog (`raft/watchdog.rs`) can start an election: it must
/// replace a stopped leader, and the group must take writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_election_watchdog_alone_replaces_a_stopped_leader() {
    init_tracing();
    let m = mesh(3).await;
    let groups = join_all(&m.nodes, "watchdog").await;
    let l = agreed_leader(&groups).await;
    groups[l].write(put("before", "1")).await.expect("put");
    let rest: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    for &i in &rest {
        groups[i].set_election_timer(false);
    }
    let started = |i: usize| m.nodes[i].raft().counters().watchdog_elections_total.get();
    let before: u64 = rest.iter().map(|&i| started(i)).sum();
    let old = m.nodes[l].node_id();
    m.nodes[l].shutdown().await;
    let stopped = std::time::Instant::now();
    let mut new = None;
    eventually(
        Duration::from_secs(3),
        "a new leader, elected by the watchdog",
        || {
            new = groups[rest[0]].leader().filter(|n| *n != old);
            new.is_some() && groups[rest[1]].leader() == new
        },
    )
    .await;
    eprintln!("new leader after {:?}", stopped.elapsed());
    let after: u64 = rest.iter().map(|&i| started(i)).sum();
    assert!(after > before, "no election came from the watchdog");
    within(
        STEP,
        "write after failover",
        groups[rest[1]].write(put("after", "1")),
    )
    .await
    .expect("write after failover");
    assert_eq!(
        value(&groups[rest[0]], "before", ReadConsistency::Linearizable).await,
        Some(b"1".to_vec())
    );
    for n in &m.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_expires_on_the_leader_and_takes_its_keys() {
    init_tracing();
    let m = mesh(3).await;
    let groups = join_all(&m.nodes, "leases").await;
    agreed_leader(&groups).await;
    let g = &groups[0];
    g.write(Request::LeaseGrant { id: 7, ttl_ms: 600 })
        .await
        .expect("grant");
    g.write(Request::Put {
        key: b"session".to_vec(),
        value: b"me".to_vec(),
        lease: Some(7),
        prev_kv: false,
    })
    .await
    .expect("put with lease");
    // Kept alive past its TTL...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(g.keep_alive(7).await.expect("keep alive"), 600);
    }
    assert_eq!(
        value(g, "session", ReadConsistency::Linearizable).await,
        Some(b"me".to_vec())
    );
    // ...then left alone: revoked by the leader, key gone everywhere.
    let left = std::time::Instant::now();
    for g in &groups {
        within(Duration::from_secs(5), "lease expiry", async {
            while value(g, "session", ReadConsistency::Stale).await.is_some() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    assert!(
        left.elapsed() >= Duration::from_millis(300),
        "expired early"
    );
    assert!(matches!(g.keep_alive(7).await, Err(GroupError::NoLease(7))));
    for n in &m.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_a_data_directory_cannot_join() {
    let n = start(config()).await;
    let e = n
        .raft()
        .join("x", GroupOptions::default())
        .await
        .expect_err("no data dir");
    assert_eq!(e, GroupError::NoDataDir);
    n.shutdown().await;
}

/// Six clients (two per member) run random puts, deletes, CAS and
/// linearizable reads on three keys while the leader stops halfway; the
/// recorded history must be linearizable (`macula_raft::linearizability`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn histories_stay_linearizable_across_a_leader_change() {
    use macula_raft::linearizability::{check, Op, Record, Verdict};
    use std::sync::{Arc, Mutex};
    init_tracing();
    let m = mesh(3).await;
    let groups = join_all(&m.nodes, "lin").await;
    let l = agreed_leader(&groups).await;
    let t0 = std::time::Instant::now();
    let ns = move || t0.elapsed().as_nanos() as u64;
    let history: Arc<Mutex<Vec<Record>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..6usize {
        let g = groups[c % 3].clone();
        // Clients of the member that stops end at their first error.
        let on_stopped = c % 3 == l;
        let history = history.clone();
        clients.push(tokio::spawn(async move {
            let mut rng = macula_wire::rng::Rng::new(c as u64 + 1);
            for i in 0..60u64 {
                let key = format!("k{}", rng.below(3)).into_bytes();
                let value = format!("{c}-{i}").into_bytes();
                let invoked = ns();
                let (op, outcome) = match rng.below(4) {
                    0 => {
                        let r = g
                            .write(Request::Put {
                                key: key.clone(),
                                value: value.clone(),
                                lease: None,
                                prev_kv: false,
                            })
                            .await;
                        (Op::Put(value), r.map(|_| None::<()>))
                    }
                    1 => {
                        let r = g
                            .write(Request::Delete {
                                key: key.clone(),
                                prefix: false,
                                prev_kv: false,
                            })
                            .await;
                        (Op::Delete, r.map(|_| None))
                    }
                    2 => {
                        let r = g.get(&key, ReadConsistency::Linearizable).await;
                        match r {
                            Ok((_, kv)) => (Op::Get(kv.map(|kv| kv.value)), Ok(None)),
                            Err(e) => (Op::Get(None), Err(e)),
                        }
                    }
                    _ => {
                        let expect =
                            format!("{}-{}", rng.below(6), i.saturating_sub(1)).into_bytes();
                        let r = g
                            .write(Request::Cas {
                                key: key.clone(),
                                expect: Expect::Value(expect.clone()),
                                value: value.clone(),
                                lease: None,
                            })
                            .await;
                        let ok = matches!(
                            r,
                            Ok(Response::Cas {
                                succeeded: true,
                                ..
                            })
                        );
                        (
                            Op::Cas {
                                expect: Some(expect),
                                new: value,
                                succeeded: ok,
                            },
                            r.map(|_| None),
                        )
                    }
                };
                let returned = ns();
                let failed = outcome.is_err();
                let record = match outcome {
                    Ok(_) => Some(Record {
                        key,
                        op,
                        invoked,
                        returned: Some(returned),
                    }),
                    // Never proposed: it did not happen.
                    Err(GroupError::NoLeader(_)) => None,
                    // A failed read tells nothing.
                    Err(_) if matches!(op, Op::Get(_)) => None,
                    // Anything else may or may not have been applied.
                    Err(_) => Some(Record {
                        key,
                        op,
                        invoked,
                        returned: None,
                    }),
                };
                if let Some(r) = record {
                    history.lock().expect("history").push(r);
                }
                if failed && on_stopped {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.nodes[l].shutdown().await;
    for c in clients {
        within(Duration::from_secs(60), "clients", c)
            .await
            .expect("client");
    }
    let history = history.lock().expect("history").clone();
    let done = history.iter().filter(|r| r.returned.is_some()).count();
    eprintln!(
        "{} operations recorded, {done} with an answer",
        history.len()
    );
    assert!(done > 100, "too few operations completed: {done}");
    assert_eq!(check(&history, 2_000_000), Verdict::Linearizable);
    for n in &m.nodes {
        n.shutdown().await;
    }
}

/// Records every (term, leader) any member reports, to check that no term
/// ever had two leaders.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(u64, NodeId)>>>;

fn record_leaders(groups: &[Group]) -> (Seen, Vec<tokio::task::JoinHandle<()>>) {
    let seen: Seen = Default::default();
    let tasks = groups
        .iter()
        .map(|g| {
            let mut rx = g.watch_leader();
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let s = rx.borrow_and_update().clone();
                    if s.is_leader {
                        if let Some(l) = s.leader {
                            seen.lock().expect("seen").push((s.term, l));
                        }
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    (seen, tasks)
}

fn one_leader_per_term(seen: &[(u64, NodeId)]) {
    let mut by_term = std::collections::BTreeMap::new();
    for (term, leader) in seen {
        let prev = by_term.insert(*term, *leader);
        assert!(
            prev.is_none() || prev == Some(*leader),
            "two leaders in term {term}: {prev:?} and {leader}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_leader_cannot_commit_and_the_majority_moves_on() {
    init_tracing();
    let m = mesh(3).await;
    let groups = join_all(&m.nodes, "split").await;
    let (seen, watchers) = record_leaders(&groups);
    let l = agreed_leader(&groups).await;
    groups[l].write(put("before", "1")).await.expect("put");
    let old = m.nodes[l].node_id();
    let others: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    // Cut the leader off from both others, both ways.
    m.nodes[l]
        .raft()
        .partition(&[m.nodes[others[0]].node_id(), m.nodes[others[1]].node_id()]);
    for &o in &others {
        m.nodes[o].raft().partition(&[old]);
    }
    // The minority (the old leader alone) cannot commit: its write never
    // succeeds.
    let minority = groups[l].clone();
    let stuck = tokio::spawn(async move { minority.write(put("minority", "x")).await });
    // The majority elects a new leader and commits.
    let mut new = None;
    eventually(
        Duration::from_secs(10),
        "a new leader in the majority",
        || {
            new = groups[others[0]].leader().filter(|n| *n != old);
            new.is_some() && groups[others[1]].leader() == new
        },
    )
    .await;
    groups[others[0]]
        .write(put("majority", "1"))
        .await
        .expect("the majority commits");
    let r = within(Duration::from_secs(10), "the minority write ends", stuck)
        .await
        .expect("task");
    assert!(r.is_err(), "a partitioned minority committed: {r:?}");
    // Heal: the old leader follows the new one and never shows its write.
    m.nodes[l].raft().partition(&[]);
    for &o in &others {
        m.nodes[o].raft().partition(&[]);
    }
    eventually(Duration::from_secs(10), "the old leader follows", || {
        groups[l].leader() == new && !groups[l].is_leader()
    })
    .await;
    assert_eq!(
        value(&groups[l], "majority", ReadConsistency::Linearizable).await,
        Some(b"1".to_vec())
    );
    for g in &groups {
        assert_eq!(
            value(g, "minority", ReadConsistency::Linearizable).await,
            None
        );
    }
    one_leader_per_term(&seen.lock().expect("seen"));
    for w in watchers {
        w.abort();
    }
    for n in &m.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_member_catches_up_from_a_snapshot_and_the_log() {
    init_tracing();
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let small = |cfg: NodeConfig| NodeConfig {
        raft: macula_runtime::RaftLimits {
            snapshot_every: 50,
            log_kept_after_snapshot: 0,
            ..Default::default()
        },
        ..cfg
    };
    let mut nodes = vec![start(small(with_dir(config(), &dirs[0]))).await];
    for d in &dirs[1..] {
        let n = start(small(with_dir(boot(&nodes[0]), d))).await;
        joined(&n).await;
        nodes.push(n);
    }
    // Two groups on the same nodes.
    let groups = join_all(&nodes, "snap").await;
    let others = join_all(&nodes, "second").await;
    let l = agreed_leader(&groups).await;
    agreed_leader(&others).await;
    // Stop a follower, write well past two snapshots, restart it.
    let f = (l + 1) % 3;
    let port = nodes[f].local_addr().port();
    let members: Vec<NodeId> = nodes.iter().map(|n| n.node_id()).collect();
    // Stop it and drop every handle to it (they keep its socket and its
    // group files open, as a process that exited would not).
    let anchor = nodes[(f + 1) % 3].clone();
    let stopped = std::mem::replace(&mut nodes[f], anchor.clone());
    stopped.shutdown().await;
    drop(stopped);
    let mut groups = groups;
    let mut others = others;
    drop(groups.remove(f));
    drop(others.remove(f));
    let l = groups
        .iter()
        .position(|g| g.is_leader())
        .expect("the leader is still there");
    for i in 0..160 {
        groups[l]
            .write(put(&format!("k{i}"), &i.to_string()))
            .await
            .expect("put");
    }
    others[0]
        .write(put("other", "1"))
        .await
        .expect("put in the second group");
    // The leader has purged the entries the stopped member lacks: it can
    // only catch up by installing a snapshot.
    let before = groups[l].progress();
    assert!(
        before.purged.unwrap_or(0) > 10,
        "the leader kept its whole log: {before:?}"
    );
    let restarted = start_on_port(small(with_dir(boot(&anchor), &dirs[f])), port).await;
    assert_eq!(restarted.node_id(), members[f], "same identity");
    let back = restarted
        .raft()
        .join(
            "snap",
            GroupOptions {
                members: members.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("rejoin");
    let back2 = restarted
        .raft()
        .join(
            "second",
            GroupOptions {
                members,
                ..Default::default()
            },
        )
        .await
        .expect("rejoin");
    let want = groups[l].local_revision();
    eventually(Duration::from_secs(15), "caught up", || {
        back.local_revision() >= want
    })
    .await;
    for i in [0, 77, 159] {
        assert_eq!(
            value(&back, &format!("k{i}"), ReadConsistency::Stale).await,
            Some(i.to_string().into_bytes())
        );
    }
    eventually(Duration::from_secs(15), "second group caught up", || {
        back2.local_revision() >= 1
    })
    .await;
    assert!(back.progress().snapshot.unwrap_or(0) >= before.purged.unwrap_or(0));
    restarted.shutdown().await;
    for (i, n) in nodes.iter().enumerate() {
        if i != f {
            n.shutdown().await;
        }
    }
}

/// A member whose group starts after the others elected a leader (a
/// group just created, the last member's join still on its way) answers
/// "no such group" meanwhile. The leader tries it again every
/// 20 ms, not after the 200 ms back-off of an unreachable
/// member (which let the late member's election timer fire first and
/// unseat a healthy leader of a just-created replicated stream): it
/// counts those answers, several per 200 ms. The late member (the lowest
/// ID, the founder that initializes first when it is there from the
/// start) does not initialize the group again once it runs it: it hears
/// from the leader first and follows it, in the same term.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_starts_its_group_late_is_tried_again_within_an_election_timeout() {
    init_tracing();
    let m = mesh(3).await;
    let members: Vec<NodeId> = m.nodes.iter().map(|n| n.node_id()).collect();
    let opts = || GroupOptions {
        members: members.clone(),
        ..Default::default()
    };
    // The late one is the lowest ID, the founder that initializes first
    // (after two heartbeats) when it is there from the start.
    let late_i = (0..3)
        .min_by_key(|&i| m.nodes[i].node_id())
        .expect("three nodes");
    let early: Vec<&NodeRuntime> = (0..3)
        .filter(|&i| i != late_i)
        .map(|i| &m.nodes[i])
        .collect();
    let mut groups = Vec::new();
    for n in &early {
        groups.push(
            within(STEP, "join", n.raft().join("late", opts()))
                .await
                .expect("joins"),
        );
    }
    let l = agreed_leader(&groups).await;
    let term = groups[l].leader_state().term;
    let counted = || -> u64 {
        m.nodes
            .iter()
            .map(|n| n.raft().counters().no_group_answers_total.get())
            .sum()
    };
    let before = counted();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let answers = counted() - before;
    // Every 20 ms: up to 50 in a second (the vote requests before the
    // election besides); with a 200 ms back-off at most 5 or 6.
    assert!(
        answers >= 8,
        "{answers} no-group answers in a second: backing off"
    );
    let late = within(
        STEP,
        "late join",
        m.nodes[late_i].raft().join("late", opts()),
    )
    .await
    .expect("joins");
    groups.push(late);
    let leader = groups[l].leader();
    eventually(STEP, "the late member follows the leader", || {
        groups[2].leader() == leader
    })
    .await;
    assert_eq!(
        groups[l].leader_state().term,
        term,
        "the leader kept its term"
    );
    for n in &m.nodes {
        n.shutdown().await;
    }
}
