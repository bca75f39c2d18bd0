//! The Raft API as an application uses it: a three-member group, its KV
//! from a member and from a node that is not one (over RPC), sessions,
//! the mutex and election recipes, workload registration.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use macula::raft::{Election, Expect, Group, Mutex};
use macula::{Error, Node, NodeId};

const STEP: Duration = Duration::from_secs(15);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

struct Mesh {
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Node>,
}

async fn mesh(n: usize) -> Mesh {
    let mut dirs = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    for _ in 0..n {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Node::builder()
            .realm("test.raft")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .data_dir(dir.path());
        if let Some(first) = nodes.first() {
            b = b.bootstrap([first.local_addr().to_string()]);
        }
        nodes.push(within("start", b.start()).await.expect("starts"));
        dirs.push(dir);
    }
    Mesh { _dirs: dirs, nodes }
}

async fn group(nodes: &[Node], name: &str) -> Vec<Group> {
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id()).collect();
    let mut v = Vec::new();
    for n in nodes {
        v.push(
            within("join", n.raft_group(name, ids.clone()))
                .await
                .expect("joins"),
        );
    }
    let first = v[0].clone();
    within("leader", async {
        while first.leader().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_and_non_members_share_one_consistent_store() {
    let m = mesh(4).await;
    let groups = group(&m.nodes[..3], "app").await;
    let kv = groups[0].kv();
    let rev = within("put", kv.put("config/a", "1")).await.expect("put");
    // A non-member reaches the group over RPC through any member.
    let outside = m.nodes[3].kv("app", Duration::from_secs(5));
    let got = within("remote get", outside.get("config/a"))
        .await
        .expect("get")
        .expect("present");
    assert_eq!(got.value, b"1");
    assert_eq!(got.mod_revision, rev);
    let cas = within(
        "remote cas",
        outside.compare_and_swap("config/a", Expect::Value(b"1".to_vec()), "2"),
    )
    .await
    .expect("cas");
    assert!(cas.is_ok(), "{cas:?}");
    let lost = within(
        "second cas",
        kv.compare_and_swap("config/a", Expect::Value(b"1".to_vec()), "3"),
    )
    .await
    .expect("cas");
    assert_eq!(
        lost.expect_err("compare fails").map(|k| k.value),
        Some(b"2".to_vec())
    );
    let (_, all) = groups[2].kv().range("config/", 0).await.expect("range");
    assert_eq!(all.len(), 1);
    // A refused request is an error with its reason.
    let e = outside.put("", "x").await.expect_err("empty key");
    assert_eq!(e.kind(), "raft.kv", "{e}");

    let r = groups[1]
        .register_workload("billing", vec!["v2".into()])
        .await
        .expect("register");
    assert!(r.leader.is_some());
    assert_eq!(r.cluster_size, 3);
    assert_eq!(r.registered, 1);
    let r = groups[2]
        .register_workload("billing", vec!["v2".into()])
        .await
        .expect("register");
    assert_eq!(r.registered, 2);
    assert_eq!(groups[0].members().voters.len(), 3);
    // Joining again is another handle to the same group.
    let again = m.nodes[0]
        .raft_group("app", Vec::new())
        .await
        .expect("join again");
    assert_eq!(
        again
            .kv()
            .get("config/a")
            .await
            .expect("get")
            .map(|k| k.value),
        Some(b"2".to_vec())
    );
    for n in &m.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mutex_admits_one_holder_at_a_time_across_nodes() {
    let m = mesh(3).await;
    let groups = group(&m.nodes, "locks").await;
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        for _ in 0..2 {
            let kv = g.kv();
            let inside = inside.clone();
            let max_inside = max_inside.clone();
            tasks.push(tokio::spawn(async move {
                let session = kv.session(Duration::from_secs(5)).await?;
                let lock = Mutex::new(kv.clone(), "locks/job");
                for _ in 0..3 {
                    let guard = lock.lock(&session).await?;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max_inside.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5 + i as u64)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    guard.unlock().await?;
                }
                session.close().await?;
                Ok::<(), Error>(())
            }));
        }
    }
    for t in tasks {
        within("lockers", t).await.expect("task").expect("locks");
    }
    assert_eq!(max_inside.load(Ordering::SeqCst), 1, "two holders at once");
    for n in &m.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_election_moves_on_when_the_leader_resigns_or_its_session_ends() {
    let m = mesh(3).await;
    let groups = group(&m.nodes, "elect").await;
    let a = groups[0].kv();
    let b = groups[1].kv();
    let sa = a
        .session(Duration::from_millis(800))
        .await
        .expect("session");
    let sb = b.session(Duration::from_secs(5)).await.expect("session");
    let ea = Election::new(a.clone(), "leader/svc");
    let eb = Election::new(b.clone(), "leader/svc");
    let la = within("a campaigns", ea.campaign(&sa, "a"))
        .await
        .expect("a leads");
    la.proclaim("a2").await.expect("proclaim");
    assert_eq!(
        eb.leader().await.expect("leader").map(|k| k.value),
        Some(b"a2".to_vec())
    );
    // b waits while a leads; a's session dies (dropped: revoked), b leads.
    let waiting = tokio::spawn(async move {
        let l = eb.campaign(&sb, "b").await;
        (l, sb)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "b leads while a does");
    drop(la);
    drop(sa);
    let (lb, _sb) = within("b elected", waiting).await.expect("task");
    let lb = lb.expect("b leads");
    assert_eq!(
        ea.leader().await.expect("leader").map(|k| k.value),
        Some(b"b".to_vec())
    );
    lb.resign().await.expect("resign");
    assert_eq!(ea.leader().await.expect("leader"), None);
    for n in &m.nodes {
        n.shutdown().await;
    }
}
