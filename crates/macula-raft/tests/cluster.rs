//! Three members of one group in one process, through real openraft, over an
//! in-memory router (every RPC goes through a MessagePack round trip, as on
//! the mesh). Checks that writes replicate, that a member restarted from its
//! redb file catches up from a snapshot after the leader purged its log, and
//! that leases and watches behave through Raft.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use macula_raft::openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use macula_raft::openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use macula_raft::openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use macula_raft::openraft::{Config, EmptyNode, SnapshotPolicy};
use macula_raft::{open, MemberId, Raft, Request, Response, StateMachineStore, TypeConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<MemberId, Raft>>>,
}

impl Router {
    fn get(&self, id: MemberId) -> Option<Raft> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }
    fn set(&self, id: MemberId, raft: Option<Raft>) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        match raft {
            Some(r) => nodes.insert(id, r),
            None => nodes.remove(&id),
        };
    }
}

struct Conn {
    router: Router,
    target: MemberId,
}

/// Sends a value through the wire encoding.
fn wire<T: Serialize + DeserializeOwned>(value: T) -> Result<T, NetworkError> {
    let bytes = rmp_serde::to_vec_named(&value).map_err(|e| NetworkError::new(&e))?;
    rmp_serde::from_slice(&bytes).map_err(|e| NetworkError::new(&e))
}

impl Conn {
    fn raft(&self) -> Option<Raft> {
        self.router.get(self.target)
    }
}

fn down<E: std::error::Error>() -> RPCError<MemberId, EmptyNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other("member down")))
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RPCError<MemberId, EmptyNode, RaftError<MemberId>>>
    {
        let raft = self.raft().ok_or_else(down)?;
        let rpc = wire(rpc)?;
        let resp = raft
            .append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))?;
        Ok(wire(resp)?)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<MemberId>,
        RPCError<MemberId, EmptyNode, RaftError<MemberId, InstallSnapshotError>>,
    > {
        let raft = self.raft().ok_or_else(down)?;
        let rpc = wire(rpc)?;
        let resp = raft
            .install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))?;
        Ok(wire(resp)?)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MemberId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<MemberId>, RPCError<MemberId, EmptyNode, RaftError<MemberId>>> {
        let raft = self.raft().ok_or_else(down)?;
        let rpc = wire(rpc)?;
        let resp = raft
            .vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))?;
        Ok(wire(resp)?)
    }
}

impl RaftNetworkFactory<TypeConfig> for Router {
    type Network = Conn;

    async fn new_client(&mut self, target: MemberId, _node: &EmptyNode) -> Conn {
        Conn {
            router: self.clone(),
            target,
        }
    }
}

fn config() -> Arc<Config> {
    let config = Config {
        cluster_name: "test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(20),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..Config::default()
    };
    Arc::new(config.validate().expect("valid config"))
}

async fn start(router: &Router, dir: &std::path::Path, n: u64) -> (Raft, StateMachineStore) {
    let id = MemberId::from(n);
    let (log, sm) = open(&dir.join(format!("{n}.redb"))).expect("open store");
    let raft = Raft::new(id, config(), router.clone(), log, sm.clone())
        .await
        .expect("raft");
    router.set(id, Some(raft.clone()));
    (raft, sm)
}

fn put(key: &str, value: &str) -> Request {
    Request::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        lease: None,
        prev_kv: false,
    }
}

async fn leader(router: &Router) -> Raft {
    for _ in 0..200 {
        if let Some(raft) = router.get(MemberId::from(1)) {
            if let Some(l) = raft.metrics().borrow().current_leader {
                if let Some(r) = router.get(l) {
                    return r;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no leader");
}

/// Members 1, 2 and 3 of a new group in `dir`, and its leader once elected.
async fn three_members(
    router: &Router,
    dir: &std::path::Path,
) -> (Vec<(Raft, StateMachineStore)>, Raft) {
    let mut members = Vec::new();
    for n in 1..=3 {
        members.push(start(router, dir, n).await);
    }
    let ids: BTreeSet<MemberId> = (1..=3).map(MemberId::from).collect();
    members[0].0.initialize(ids).await.expect("initialize");
    let lead = leader(router).await;
    (members, lead)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_restart_and_catch_up_from_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::default();
    let (mut members, lead) = three_members(&router, dir.path()).await;

    // Writes, a lease and a watch through Raft.
    let (_, mut rx) = members[1].1.watch(b"k/", 0).expect("watch");
    for i in 0..10 {
        let resp = lead
            .client_write(put(&format!("k/{i:02}"), "v"))
            .await
            .expect("write");
        assert_eq!(
            resp.data,
            Response::Put {
                revision: i + 1,
                prev: None
            }
        );
    }
    let granted = lead
        .client_write(Request::LeaseGrant {
            id: 77,
            ttl_ms: 1000,
        })
        .await
        .expect("grant");
    assert_eq!(
        granted.data,
        Response::Lease {
            id: 77,
            ttl_ms: 1000
        }
    );
    lead.client_write(Request::Put {
        key: b"session".to_vec(),
        value: b"me".to_vec(),
        lease: Some(77),
        prev_kv: false,
    })
    .await
    .expect("leased put");
    let revoked = lead
        .client_write(Request::LeaseRevoke { id: 77 })
        .await
        .expect("revoke");
    assert_eq!(
        revoked.data,
        Response::LeaseRevoked {
            revision: 12,
            deleted: 1
        }
    );

    // A linearizable read on the leader's state machine.
    lead.ensure_linearizable().await.expect("read index");
    let leader_sm = members
        .iter()
        .find(|(r, _)| r.metrics().borrow().id == lead.metrics().borrow().id)
        .map(|(_, sm)| sm.clone())
        .expect("leader sm");
    assert_eq!(leader_sm.count(b"k/"), 10);
    assert_eq!(leader_sm.revision(), 12);

    // The follower's watch saw the ten puts, in order, once each.
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let (rev, event) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("event");
        if macula_raft::kv::matches_prefix(b"k/", event.key()) {
            seen.push(rev);
        }
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());

    // Stop member 3 (not the leader if we can help it), write enough for
    // snapshots and purges, then restart it from its file.
    let lead_id = lead.metrics().borrow().id;
    let victim = (1..=3)
        .map(MemberId::from)
        .find(|id| *id != lead_id)
        .expect("a follower");
    let victim_n = (1..=3).find(|n| MemberId::from(*n) == victim).expect("n");
    let (raft, _) = members.remove((victim_n - 1) as usize);
    router.set(victim, None);
    let victim_last_log = raft
        .metrics()
        .borrow()
        .last_log_index
        .expect("victim has a log");
    raft.shutdown().await.expect("shutdown");
    drop(raft);

    for i in 0..60 {
        lead.client_write(put(&format!("more/{i:02}"), "w"))
            .await
            .expect("write");
    }
    let last = lead.metrics().borrow().last_applied.expect("applied").index;
    lead.trigger().snapshot().await.expect("trigger snapshot");
    lead.wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index + 20 > last),
            "leader purged its log",
        )
        .await
        .expect("purged");
    // The restarted member's log ends before the leader's first entry: it
    // can only catch up through a snapshot.
    let purged = lead.metrics().borrow().purged.expect("purged").index;
    assert!(
        purged > victim_last_log,
        "purged {purged} <= {victim_last_log}"
    );

    // Give the store a moment to be released, then reopen it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (raft, sm) = start(&router, dir.path(), victim_n).await;
    raft.wait(Some(Duration::from_secs(20)))
        .applied_index_at_least(Some(last), "restarted member caught up")
        .await
        .expect("caught up");
    assert_eq!(sm.read(|kv| kv.clone()), leader_sm.read(|kv| kv.clone()));
    assert_eq!(sm.count(b"more/"), 60);
    assert!(sm.get(b"session").is_none());
    let installed = raft
        .metrics()
        .borrow()
        .snapshot
        .expect("snapshot on the restarted member");
    assert!(installed.index > victim_last_log);

    for (raft, _) in members {
        raft.shutdown().await.expect("shutdown");
    }
    raft.shutdown().await.expect("shutdown");
}

/// A member that led, stopped and started again, does not lead its old
/// term again: a leader sends entries before its own copy is written, so a
/// crash can take from its log entries that followers hold, and leading
/// that term again it would append other entries under the same log ids
/// (which followers take for theirs). It leads again only after winning an
/// election in a later term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_leads_again_only_in_a_later_term() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::default();
    let (mut members, lead) = three_members(&router, dir.path()).await;
    for i in 0..5 {
        lead.client_write(put(&format!("k/{i}"), "v"))
            .await
            .expect("write");
    }
    let (lead_id, term) = {
        let m = lead.metrics().borrow().clone();
        (m.id, m.current_term)
    };
    let lead_n = (1..=3)
        .find(|n| MemberId::from(*n) == lead_id)
        .expect("leader n");
    drop(lead);
    // Every member stops.
    for (raft, _) in members.drain(..) {
        let id = raft.metrics().borrow().id;
        router.set(id, None);
        raft.shutdown().await.expect("shutdown");
    }
    // Give the stores a moment to be released, then the leader comes back
    // alone: its term and log are loaded, and it does not lead.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (back, back_sm) = start(&router, dir.path(), lead_n).await;
    let m = back
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_term >= term, "state loaded")
        .await
        .expect("loaded");
    assert_ne!(
        (m.current_term, m.current_leader),
        (term, Some(lead_id)),
        "leads its old term again: {m:?}"
    );
    // With the others back, a leader is elected in a later term, and every
    // write is there.
    let mut now = vec![(back, back_sm)];
    for n in (1..=3).filter(|n| *n != lead_n) {
        now.push(start(&router, dir.path(), n).await);
    }
    let lead = leader(&router).await;
    let lead_now = lead.metrics().borrow().clone();
    assert!(
        lead_now.current_term > term,
        "term {} <= {term}",
        lead_now.current_term
    );
    lead.client_write(put("k/after", "v"))
        .await
        .expect("write after");
    let (_, sm) = now
        .iter()
        .find(|(r, _)| r.metrics().borrow().id == lead_now.id)
        .expect("the leader's state machine");
    assert_eq!(sm.count(b"k/"), 6);
    for (raft, _) in now {
        raft.shutdown().await.expect("shutdown");
    }
}
