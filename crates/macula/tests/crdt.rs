//! Replicated CRDTs between real nodes (QUIC on 127.0.0.1, one process):
//! convergence under concurrent updates, a late joiner and a restarted node
//! repaired by anti-entropy, ten nodes, and the limits. Every wait is
//! bounded; convergence is waited for on the change streams, never slept
//! for.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use macula::crdt::{self, ChangeItem, CrdtOptions, OrSet, PnCounter, Replicated};
use macula::{Crdt, Node};

const LIMIT: Duration = Duration::from_secs(30);

async fn node(bootstrap: Option<SocketAddr>, dir: Option<&Path>) -> Node {
    let mut b = Node::builder()
        .realm("test.crdt")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)));
    if let Some(addr) = bootstrap {
        b = b.bootstrap([addr.to_string()]);
    }
    if let Some(d) = dir {
        b = b.data_dir(d);
    }
    b.start().await.expect("node starts")
}

/// `n` nodes, every one bootstrapped through the first.
async fn mesh(n: usize) -> Vec<Node> {
    let first = node(None, None).await;
    let seed = first.local_addr();
    let mut nodes = vec![first];
    for _ in 1..n {
        nodes.push(node(Some(seed), None).await);
    }
    nodes
}

async fn open_all<T: Replicated>(nodes: &[Node], name: &str) -> Vec<Crdt<T>> {
    let mut v = Vec::new();
    for n in nodes {
        v.push(n.crdt::<T>(name).await.expect("crdt opens"));
    }
    v
}

/// Waits until every replica has seen `n` replicas subscribed (so the
/// deltas of what follows go straight to every one).
async fn wait_replicas<T: Replicated>(handles: &[Crdt<T>], n: usize) {
    for h in handles {
        let seen = h.wait_for_replicas(n, LIMIT).await.expect("lookup");
        assert_eq!(
            seen,
            n,
            "replicas of {} seen from {}",
            h.name(),
            h.node_id()
        );
    }
}

/// Waits (at most `limit`) until `done` holds on every replica; returns
/// when the last one got there. Waits on each change stream, so the time
/// is exact.
async fn converge<T, F>(handles: &[Crdt<T>], done: F, limit: Duration) -> Instant
where
    T: Replicated,
    F: Fn(&T) -> bool + Clone,
{
    let waits = handles.iter().map(|h| {
        let done = done.clone();
        async move {
            let mut changes = h.changes();
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                if h.read(&done) {
                    return Ok(Instant::now());
                }
                match tokio::time::timeout_at(deadline, changes.next()).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(format!("{}: replica stopped", h.node_id())),
                    Err(_) => {
                        return Err(format!(
                            "{} did not converge within {limit:?}: {:?}\n{:?}",
                            h.node_id(),
                            h.value(),
                            h.stats()
                        ))
                    }
                }
            }
        }
    });
    let ends = futures::future::join_all(waits).await;
    let mut last = None;
    for e in ends {
        let t = e.unwrap_or_else(|m| panic!("{m}"));
        last = Some(last.map_or(t, |l: Instant| l.max(t)));
    }
    last.expect("at least one replica")
}

fn set_of(s: &OrSet<String>) -> BTreeSet<String> {
    s.iter().cloned().collect()
}

fn strings<I: IntoIterator<Item = S>, S: Into<String>>(i: I) -> BTreeSet<String> {
    i.into_iter().map(Into::into).collect()
}

async fn shutdown(nodes: Vec<Node>) {
    futures::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_on_an_or_set_and_a_pn_counter_with_concurrent_updates() {
    let nodes = mesh(3).await;
    let carts = open_all::<OrSet<String>>(&nodes, "cart").await;
    let stock = open_all::<PnCounter>(&nodes, "stock").await;
    wait_replicas(&carts, 3).await;
    wait_replicas(&stock, 3).await;

    // One element every replica has seen, then removed on one replica
    // while another adds it again concurrently: the add wins.
    carts[0].add("shared".into()).unwrap();
    converge(&carts, |s| s.contains(&"shared".to_string()), LIMIT).await;

    let start = Instant::now();
    carts[1].remove(&"shared".to_string()).unwrap();
    carts[2].add("shared".into()).unwrap();
    let mut expected = strings(["shared"]);
    let writers = (0..3).map(|i| {
        let cart = carts[i].clone();
        let counter = stock[i].clone();
        async move {
            for k in 0..20 {
                cart.add(format!("item-{i}-{k}")).unwrap();
                counter.increment(i as u64 + 1).unwrap();
                tokio::task::yield_now().await;
            }
            cart.remove(&format!("item-{i}-0")).unwrap();
            counter.decrement(i as u64 + 1).unwrap();
        }
    });
    futures::future::join_all(writers).await;
    for i in 0..3 {
        for k in 1..20 {
            expected.insert(format!("item-{i}-{k}"));
        }
    }
    // 20 increments and one decrement of i + 1 on each node i.
    let total: i128 = (1..=3).map(|x| 19 * x).sum();
    let set_done = {
        let expected = expected.clone();
        move |s: &OrSet<String>| set_of(s) == expected
    };
    let (a, b) = tokio::join!(
        converge(&carts, set_done, LIMIT),
        converge(&stock, move |c: &PnCounter| c.value() == total, LIMIT),
    );
    eprintln!(
        "crdt: 3 nodes converged (OR-set {:?}, PN-counter {:?} after the last update)",
        a - start,
        b - start
    );
    for c in &carts {
        assert_eq!(set_of(&c.value()), expected);
        assert!(c.stats().replica.updates >= 21);
    }
    for c in &stock {
        assert_eq!(c.read(|c| c.value()), total);
    }
    drop((carts, stock));
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_late_converges_by_anti_entropy() {
    let mut nodes = mesh(2).await;
    let mut sets = open_all::<OrSet<String>>(&nodes, "late").await;
    sets[0].add("a".into()).unwrap();
    sets[1].add("b".into()).unwrap();
    sets[1].add("gone".into()).unwrap();
    converge(&sets, |s| s.len() == 3, LIMIT).await;
    sets[0].remove(&"gone".to_string()).unwrap();
    converge(&sets, |s| s.len() == 2, LIMIT).await;

    // The third node missed every delta: it catches up by digest exchange,
    // and its own update reaches the others.
    let late = node(Some(nodes[0].local_addr()), None).await;
    let start = Instant::now();
    let h = late.crdt::<OrSet<String>>("late").await.unwrap();
    nodes.push(late);
    converge(std::slice::from_ref(&h), |s| s.len() == 2, LIMIT).await;
    eprintln!("crdt: a late joiner caught up in {:?}", start.elapsed());
    h.add("c".into()).unwrap();
    sets.push(h);
    converge(&sets, |s| set_of(s) == strings(["a", "b", "c"]), LIMIT).await;
    assert!(sets[2].stats().replica.merged_new >= 1);
    drop(sets);
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_from_its_saved_state_and_its_new_updates_count() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(None, None).await;
    let b = node(Some(a.local_addr()), None).await;
    let c = node(Some(a.local_addr()), Some(dir.path())).await;
    let c_id = c.id();
    let nodes = [a.clone(), b.clone(), c.clone()];
    let sets = open_all::<OrSet<String>>(&nodes, "cart").await;
    let hits = open_all::<PnCounter>(&nodes, "hits").await;

    sets[2].add("c1".into()).unwrap();
    sets[2].add("c2".into()).unwrap();
    hits[2].increment(5).unwrap();
    sets[0].add("a1".into()).unwrap();
    converge(&sets, |s| set_of(s) == strings(["a1", "c1", "c2"]), LIMIT).await;
    converge(&hits, |h| h.value() == 5, LIMIT).await;
    assert!(sets[2].stats().saves >= 1, "C saved before it sent");

    // C stops; A and B go on without it.
    let mut sets: Vec<_> = sets.into_iter().take(2).collect();
    let mut hits: Vec<_> = hits.into_iter().take(2).collect();
    c.shutdown().await;
    drop(c);
    sets[0].add("a2".into()).unwrap();
    sets[0].remove(&"a1".to_string()).unwrap();
    hits[1].increment(7).unwrap();
    converge(&sets, |s| set_of(s) == strings(["a2", "c1", "c2"]), LIMIT).await;

    // C restarts on its data directory: same node ID, its own state back
    // before it hears from anyone.
    let c = node(Some(a.local_addr()), Some(dir.path())).await;
    assert_eq!(c.id(), c_id);
    let start = Instant::now();
    let cs = c.crdt::<OrSet<String>>("cart").await.unwrap();
    let ch = c.crdt::<PnCounter>("hits").await.unwrap();
    assert!(cs.contains(&"c1".to_string()) && cs.contains(&"c2".to_string()));
    assert_eq!(ch.read(|h| h.get(&c_id).inc), 5, "its own count is back");

    // Its new updates take numbers above the old ones: the others apply
    // them instead of ignoring them as already seen.
    cs.add("c3".into()).unwrap();
    cs.remove(&"c1".to_string()).unwrap();
    ch.increment(3).unwrap();
    sets.push(cs);
    hits.push(ch);
    let expected = strings(["a2", "c2", "c3"]);
    let s_at = converge(&sets, move |s| set_of(s) == expected, LIMIT).await;
    let h_at = converge(&hits, |h| h.value() == 15, LIMIT).await;
    eprintln!(
        "crdt: a restarted node and its peers converged in {:?}",
        s_at.max(h_at) - start
    );
    drop((sets, hits));
    shutdown(vec![a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_converge() {
    const N: usize = 10;
    let nodes = mesh(N).await;
    let sets = open_all::<OrSet<String>>(&nodes, "ten").await;
    let counters = open_all::<PnCounter>(&nodes, "ten-count").await;
    wait_replicas(&sets, N).await;
    wait_replicas(&counters, N).await;

    let start = Instant::now();
    for (i, (s, c)) in sets.iter().zip(&counters).enumerate() {
        for k in 0..10 {
            s.add(format!("n{i}-{k}")).unwrap();
        }
        c.increment(10).unwrap();
        c.decrement(i as u64).unwrap();
    }
    let updated = start.elapsed();
    let total = (10 * N as i128) - (0..N as i128).sum::<i128>();
    let (s_at, c_at) = tokio::join!(
        converge(&sets, |s| s.len() == N * 10, LIMIT),
        converge(&counters, move |c| c.value() == total, LIMIT),
    );
    eprintln!(
        "crdt: {N} nodes converged in {:?} (OR-set of {} elements, 10 adds per node; PN-counter {:?}); updates took {updated:?}",
        s_at - start,
        N * 10,
        c_at - start,
    );
    drop((sets, counters));
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_types_and_limits_are_checked() {
    let n = node(None, None).await;
    for bad in ["", "a.b", "a b", "*", &"x".repeat(65)] {
        let e = n.crdt::<PnCounter>(bad).await.unwrap_err();
        assert_eq!(e.kind(), "crdt.bad_name", "{bad:?}: {e}");
    }
    // The same name twice: one replica; as another type: refused.
    let a = n.crdt::<PnCounter>("count").await.unwrap();
    let b = n.crdt::<PnCounter>("count").await.unwrap();
    a.increment(2).unwrap();
    assert_eq!(b.read(|c| c.value()), 2);
    let e = n.crdt::<OrSet<String>>("count").await.unwrap_err();
    assert_eq!(e.kind(), "crdt.type_mismatch", "{e}");

    // At most `max_crdts` replicas per node.
    let opts = CrdtOptions {
        max_crdts: 2,
        ..CrdtOptions::default()
    };
    let _second = crdt::open::<PnCounter>(&n, "second", opts.clone())
        .await
        .unwrap();
    let e = crdt::open::<PnCounter>(&n, "third", opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "crdt.too_many", "{e}");

    // A state must fit one payload: the update that would pass the limit
    // is refused and changes nothing.
    let small = CrdtOptions {
        max_state_bytes: Some(2_000),
        ..CrdtOptions::default()
    };
    let set = crdt::open::<OrSet<String>>(&n, "small", small)
        .await
        .unwrap();
    let mut refused = None;
    for i in 0..1_000 {
        if let Err(e) = set.add(format!("element-{i:04}")) {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("the limit is reached");
    assert_eq!(e.kind(), "crdt.state_too_large", "{e}");
    assert_eq!(set.read(|s| s.len()), i, "the refused add changed nothing");
    assert!(set.read(rmp_len) <= 2_000);
    n.shutdown().await;
}

/// The encoded size of a state (the limit's measure).
fn rmp_len(s: &OrSet<String>) -> usize {
    rmp_serde::to_vec_named(s).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_bounded_and_a_reopened_replica_keeps_its_state() {
    let n = node(None, None).await;
    let opts = CrdtOptions {
        changes_capacity: 4,
        ..CrdtOptions::default()
    };
    let c = crdt::open::<PnCounter>(&n, "events", opts.clone())
        .await
        .unwrap();
    let mut changes = c.changes();
    for _ in 0..10 {
        c.increment(1).unwrap();
    }
    let first = tokio::time::timeout(LIMIT, changes.next()).await.unwrap();
    assert_eq!(first, Some(ChangeItem::Lagged(6)), "a slow reader is told");
    let next = tokio::time::timeout(LIMIT, changes.next()).await.unwrap();
    assert!(matches!(next, Some(ChangeItem::Changed(ch)) if ch.version == 7));

    // Without a data directory the node keeps a closed replica's state in
    // memory: reopened, it numbers its updates after the old ones.
    drop(c);
    assert_eq!(
        tokio::time::timeout(LIMIT, async { while changes.next().await.is_some() {} }).await,
        Ok(()),
        "the stream ends when the replica stops"
    );
    let c = crdt::open::<PnCounter>(&n, "events", opts).await.unwrap();
    assert_eq!(c.read(|c| c.value()), 10);
    c.increment(1).unwrap();
    assert_eq!(c.read(|c| c.get(&n.id()).inc), 11);
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_deltas_are_told_as_lagged_and_repaired_by_a_digest_exchange() {
    let a = node(None, None).await;
    // B's subscriptions hold 2 events: a stalled reader loses the oldest.
    let b = Node::builder()
        .realm("test.crdt")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .bootstrap([a.local_addr().to_string()])
        .pubsub_limits(macula::config::PubSubLimits {
            queue_capacity: 2,
            ..Default::default()
        })
        .start()
        .await
        .unwrap();
    let sa = a.crdt::<OrSet<String>>("lossy").await.unwrap();
    let sb = b.crdt::<OrSet<String>>("lossy").await.unwrap();
    wait_replicas(&[sa.clone(), sb.clone()], 2).await;

    // Stall B's replica (its task waits on a test hook, no runtime thread
    // blocked): A's deltas pile up in B's subscription queue.
    let paused = sb.pause().await;
    let dropped_before = b.stats().dropped_slow_subscriber;
    for k in 0..20 {
        let sent = sa.stats().replica.deltas_sent;
        sa.add(format!("e{k}")).unwrap();
        // One delta per add: wait (bounded) for it to go out.
        tokio::time::timeout(LIMIT, async {
            while sa.stats().replica.deltas_sent == sent {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the delta is sent");
    }
    tokio::time::timeout(LIMIT, async {
        while b.stats().dropped_slow_subscriber == dropped_before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("B's queue overflowed");
    drop(paused);

    let start = Instant::now();
    converge(&[sa.clone(), sb.clone()], |s| s.len() == 20, LIMIT).await;
    let st = sb.stats();
    eprintln!(
        "crdt: repaired after a loss in {:?} (lagged {}, extra digests {})",
        start.elapsed(),
        st.lagged,
        st.extra_digests
    );
    assert!(st.lagged > 0, "the loss was told: {st:?}");
    assert!(
        st.extra_digests >= 2,
        "a digest at open and one after the loss: {st:?}"
    );
    drop((sa, sb));
    shutdown(vec![a, b]).await;
}
