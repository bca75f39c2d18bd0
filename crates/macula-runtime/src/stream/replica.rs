//! Replicated streams (`replicas: 3`): one Raft group per stream,
//! `_stream.<name>`, on the node's Raft service (`raft/`).
//!
//! **The leader decides, every member stores.** The leader runs the
//! stream's core as an unreplicated stream does (sequence, timestamp,
//! de-duplication, limits, consumers), but instead of queueing the
//! resulting store writes (`store::Write`) to its own file it proposes them
//! as one opaque Raft entry (`Request::Opaque`, MessagePack of the writes,
//! PROTOCOL.md 5.12), under the core's lock so that log order is sequence
//! order. Every member, the leader included, applies committed entries to
//! its own store with the entry's log index (`Write::Applied`) in the same
//! group commit ([`StreamApplier`]): a replay after a crash skips what the
//! store holds. A publish is acknowledged once its entry is committed (on
//! disk on a majority) and applied on the leader. The applier's commits
//! are not synced (`StreamStore::apply_unsynced`, which answers once they
//! are queued; reads wait for their commit): the Raft log is the
//! durable copy. The store syncs at least every `store::SYNC_EVERY` and
//! before each snapshot (so the log it lets the group purge is never
//! needed again), each time after syncing the group's Raft log up to the
//! applied index it makes durable (`macula_raft::LogSyncer`, skipped
//! when the log is synced that far: with a `sync_interval` the log may
//! be behind the disk, and the store must never be ahead of the log
//! after a power loss), and the group, at start, reports the lower of its own
//! applied index and the store's last synced one
//! (`macula_raft::Applier::synced`): openraft replays the log from there,
//! and the applier takes again what a crash lost.
//!
//! **Leadership.** Only the leader serves. When a member takes office (or
//! after one of its writes was not committed) it first proposes an entry
//! with no writes and waits until it is applied, so that every write it
//! queued earlier is applied or has failed; it then waits until it has
//! applied everything committed before ([`Group::barrier`]), rebuilds its
//! core from its store (the store holds
//! exactly the committed writes: whatever a deposed leader's core decided
//! and never committed is gone), and then starts the stream's tasks
//! (capture, timers, push consumers). A member that loses office stops
//! them. Every member advertises `_stream.<name>`; one that does not serve
//! forwards the operation to the leader, once (`remote.rs` for calls from
//! other nodes, `handle.rs` for this node's own handles and admin API).
//!
//! **Catch-up.** A member that was down replays the log it missed. One
//! too far behind (the leader purged that log after a snapshot) installs
//! the group's snapshot, whose applier part is a summary
//! ([`ReplicaState`]: bounds, configuration, consumers, applied index);
//! the member then fetches the records from the leader in batches
//! (`Op::Fetch`) and writes them before it reports the install done.
//!
//! **Members** are the node that adds the stream and the two other
//! connected full nodes nearest (XOR) to the BLAKE3 hash of its name; they
//! are asked with the unlisted control procedure `_node.streams.replica`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use macula_raft::ApplierFuture;
use macula_wire::NodeId;
use serde::{Deserialize, Serialize};

use super::remote::{RemoteStream, DEFAULT_REMOTE_TIMEOUT};
use super::store::Write;
use super::{Hosted, Inner, Replica, StreamError, Streams};

/// The unlisted control procedure that makes a node a member of a
/// replicated stream ([`ReplicaRequest`]).
pub const REPLICA_PROCEDURE: &str = "_node.streams.replica";
/// The unlisted control procedure that removes a replicated stream from a
/// member (its name as the payload).
pub const DROP_PROCEDURE: &str = "_node.streams.drop";

/// Decodes a replicated stream's log entry payload: the store writes the
/// leader decided (fuzz target `stream_replica`).
pub fn decode_writes(bytes: &[u8]) -> Result<Vec<Write>, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Decodes the applier part of a replicated stream's snapshot (fuzz
/// target `stream_replica`).
pub fn decode_state(bytes: &[u8]) -> Result<ReplicaState, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Decodes a `_node.streams.replica` request (fuzz target
/// `stream_replica`).
pub fn decode_request(bytes: &[u8]) -> Result<ReplicaRequest, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// The Raft group of stream `name`.
pub fn group_name(name: &str) -> String {
    format!("_stream.{name}")
}

/// Asks a node to become a member of a replicated stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaRequest {
    /// The stream's configuration (JSON, as stored).
    #[serde(with = "serde_bytes")]
    pub config: Vec<u8>,
    /// The founding members.
    pub members: Vec<NodeId>,
}

/// What a replicated stream's snapshot carries of the stream: its bounds,
/// not its messages (the installing member fetches those).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaState {
    /// The log index the store had applied.
    pub applied: u64,
    #[serde(with = "serde_bytes")]
    pub config: Vec<u8>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_ts: u64,
    /// Durable consumers: name -> record.
    pub consumers: Vec<(String, serde_bytes::ByteBuf)>,
}

/// The Raft applier of one replicated stream: applies committed writes to
/// this member's store (see the module docs).
pub(super) struct StreamApplier {
    pub(super) hosted: Weak<Hosted>,
    pub(super) streams: Weak<Inner>,
}

impl StreamApplier {
    fn hosted(&self) -> Result<Arc<Hosted>, String> {
        self.hosted
            .upgrade()
            .ok_or_else(|| "the stream was removed".to_string())
    }
}

/// Takes a replicated stream's `sync_interval` from a configuration it
/// applies (an edit) to this member's Raft log.
fn follow_sync_interval(h: &Hosted, json: &[u8]) {
    let Some(r) = h.replica.get() else {
        // Not joined yet: `join_group` reads the configuration.
        return;
    };
    match serde_json::from_slice::<macula_stream::StreamConfig>(json) {
        Ok(cfg) => r
            .group
            .set_log_sync_interval(cfg.sync_interval.map(macula_stream::Millis::to_duration)),
        Err(e) => {
            tracing::warn!(stream = %h.name, error = %e, "a replicated configuration does not decode")
        }
    }
}

impl macula_raft::Applier for StreamApplier {
    fn apply(&self, entries: Vec<(u64, Vec<u8>)>) -> ApplierFuture<'_, Vec<Vec<u8>>> {
        Box::pin(async move {
            let h = self.hosted()?;
            while h.apply_held.load(Ordering::Acquire) {
                // A test holds this member's applies (`hold_applies`).
                let moved = h.applied_moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                if !h.apply_held.load(Ordering::Acquire) {
                    break;
                }
                moved.await;
            }
            let applied = h.applied.load(Ordering::Acquire);
            let mut answers = Vec::with_capacity(entries.len());
            let mut writes = Vec::new();
            let mut top = applied;
            for (index, bytes) in entries {
                answers.push(Vec::new());
                if index <= applied {
                    tracing::trace!(stream = %h.name, index, applied, "entry applied before: skipped");
                    continue;
                }
                let ws = decode_writes(&bytes)
                    .map_err(|e| format!("entry {index} does not decode: {e}"))?;
                tracing::trace!(stream = %h.name, index, puts = ?ws.iter().filter_map(|w| match w { Write::Put(s, _) => Some(*s), _ => None }).collect::<Vec<_>>(), "applying entry");
                for w in &ws {
                    if let Write::Config(json) = w {
                        follow_sync_interval(&h, json);
                    }
                }
                writes.extend(
                    ws.into_iter()
                        .filter(|w| !matches!(w, Write::Index(_) | Write::Applied(_))),
                );
                top = top.max(index);
            }
            if top > applied {
                writes.push(Write::Applied(top));
                // Unsynced: the entries are in the Raft log on a majority
                // already; a crash before the store's next synced commit
                // replays them (`synced`). Applied once queued: the
                // store's reads wait for the commit (`Gate`), so the
                // publisher's answer does not.
                if let Err(e) = h.store.apply_unsynced(writes) {
                    // Reads waiting for this apply fail now, not at their
                    // deadline.
                    h.fail(format!("applying entry {top} failed: {e}"));
                    return Err(e.to_string());
                }
                h.set_applied(top);
            }
            Ok(answers)
        })
    }

    fn synced(&self) -> Option<u64> {
        self.hosted().ok().map(|h| h.store.synced_applied())
    }

    fn attach_log(&self, log: Arc<dyn macula_raft::LogSync>) {
        // Each checkpoint of the store syncs the log up to the applied
        // index it makes durable, first (with a sync interval the log may
        // be behind the disk): a power loss then never leaves the store
        // ahead of the log. Called on the store's writer thread.
        if let Ok(h) = self.hosted() {
            h.store.set_log_sync(Arc::new(move |index| {
                log.sync_to(index).map_err(|e| e.to_string())
            }));
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        let h = self.hosted()?;
        // Synced first: the log up to this snapshot may be purged, and a
        // crash must not need it.
        h.store.sync().map_err(|e| e.to_string())?;
        let state = replica_state(&h).map_err(|e| e.to_string())?;
        rmp_serde::to_vec_named(&state).map_err(|e| e.to_string())
    }

    fn install(&self, data: Vec<u8>) -> ApplierFuture<'_, ()> {
        Box::pin(async move {
            let h = self.hosted()?;
            let state =
                decode_state(&data).map_err(|e| format!("replica state does not decode: {e}"))?;
            let streams = self
                .streams
                .upgrade()
                .map(Streams)
                .ok_or_else(|| "the node is stopping".to_string())?;
            install(&streams, &h, state).await?;
            streams.count_install();
            Ok(())
        })
    }
}

impl Streams {
    /// Records of `h` from `from` on, from the group's leader once it has
    /// applied the log up to `applied`.
    async fn fetch_from_leader(
        &self,
        h: &Hosted,
        from: u64,
        applied: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StreamError> {
        let group = self
            .raft()
            .and_then(|r| r.get(&group_name(&h.name)))
            .ok_or_else(|| StreamError::Replication("the stream's group is not running".into()))?;
        let leader = group
            .leader()
            .filter(|_| !group.is_leader())
            .ok_or(StreamError::NotLeader { leader: None })?;
        let rpc = self
            .rpc()
            .ok_or_else(|| StreamError::Unreachable("the node is not running yet".into()))?;
        RemoteStream::on_member(rpc, &h.name, leader, DEFAULT_REMOTE_TIMEOUT)
            .fetch(from, applied)
            .await
    }
}

/// This member's store as a [`ReplicaState`].
fn replica_state(h: &Hosted) -> Result<ReplicaState, StreamError> {
    let applied = h.store.applied()?;
    let (config, last_seq, last_ts) = h.store.meta()?;
    let first_seq = h
        .store
        .raw_range(0, 1, 1)?
        .first()
        .map(|(s, _)| *s)
        .unwrap_or(last_seq + 1);
    let consumers = h
        .store
        .consumers()?
        .into_iter()
        .map(|(n, b)| (n, serde_bytes::ByteBuf::from(b)))
        .collect();
    Ok(ReplicaState {
        applied,
        config,
        first_seq,
        last_seq,
        last_ts,
        consumers,
    })
}

/// How long an install keeps trying to fetch from the leader.
const INSTALL_PATIENCE: Duration = Duration::from_secs(30);

/// Makes `h`'s store the state a snapshot summarizes: everything cleared,
/// the configuration, bounds and consumers written, the records fetched
/// from the leader, and last the applied index (a crash before that
/// leaves the old index, and the leader sends the snapshot again).
async fn install(streams: &Streams, h: &Arc<Hosted>, state: ReplicaState) -> Result<(), String> {
    follow_sync_interval(h, &state.config);
    tracing::info!(stream = %h.name, applied = state.applied, first = state.first_seq, last = state.last_seq, "installing a replicated stream's snapshot");
    let mut writes = vec![
        Write::Clear,
        Write::Config(state.config.clone()),
        Write::Last(state.last_seq, state.last_ts),
    ];
    for (n, b) in &state.consumers {
        writes.push(Write::Consumer(n.clone(), Some(b.to_vec())));
    }
    h.store.write(writes).await.map_err(|e| e.to_string())?;
    let mut from = state.first_seq;
    let deadline = tokio::time::Instant::now() + INSTALL_PATIENCE;
    while from <= state.last_seq {
        // The leader's copy once it has applied up to the snapshot: a
        // record it has not stored yet would be missing here for good.
        // Past that, a record it lacks was removed by a later entry, which
        // this member applies after the install.
        let batch = match streams.fetch_from_leader(h, from, state.applied).await {
            Ok(b) => b,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(stream = %h.name, error = %e, "fetch from the leader failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(format!("could not fetch the stream from its leader: {e}")),
        };
        let Some(&(last, _)) = batch.last() else {
            break;
        };
        let puts: Vec<Write> = batch
            .into_iter()
            .filter(|(s, _)| *s <= state.last_seq)
            .map(|(s, r)| Write::Put(s, r))
            .collect();
        h.store.write(puts).await.map_err(|e| e.to_string())?;
        from = last + 1;
    }
    h.store
        .write(vec![Write::Applied(state.applied)])
        .await
        .map_err(|e| e.to_string())?;
    h.set_applied(state.applied);
    Ok(())
}

/// Follows the group's leadership: takes office (barrier, rebuild, tasks)
/// and leaves it (tasks stopped). Runs as long as the stream is hosted.
pub(super) async fn lead(streams: Weak<Inner>, hosted: Weak<Hosted>, replica: Arc<Replica>) {
    let mut leader = replica.group.watch_leader();
    loop {
        let state = leader.borrow_and_update().clone();
        let (Some(h), Some(inner)) = (hosted.upgrade(), streams.upgrade()) else {
            return;
        };
        let streams = Streams(inner);
        let term_served = replica
            .serving()
            .then(|| replica.term.load(Ordering::Acquire));
        // A write decided but not committed: the core is rebuilt from
        // what the store holds.
        let resync = replica.take_resync();
        if state.is_leader && (term_served != Some(state.term) || resync) {
            if replica.serving() {
                streams.stop_serving(&h);
                replica.set_serving(false, 0);
            }
            // Writes this member queued before (in this term or an earlier
            // one) may still be proposed and committed: an empty entry
            // behind them, once applied, means each of them is applied or
            // failed, so the rebuilt core cannot hand out a sequence one of
            // them holds.
            if let Err(e) = drain_proposals(&replica).await {
                tracing::debug!(stream = %h.name, error = %e, "not taking office yet");
                drop((h, streams));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            match replica.group.barrier().await {
                Ok(()) => match streams.rebuild(&h) {
                    Ok(n) => {
                        streams.start_serving(&h);
                        replica.set_serving(true, state.term);
                        tracing::info!(stream = %h.name, term = state.term, messages = n, "leading the replicated stream");
                    }
                    Err(e) => h.fail(format!("could not rebuild the stream as its leader: {e}")),
                },
                Err(e) => {
                    tracing::debug!(stream = %h.name, error = %e, "not taking office yet");
                    drop((h, streams));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        } else if !state.is_leader && replica.serving() {
            streams.stop_serving(&h);
            replica.set_serving(false, 0);
            tracing::info!(stream = %h.name, leader = ?state.leader, "no longer leading the replicated stream");
        }
        drop((h, streams));
        tokio::select! {
            changed = leader.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = replica.wake.notified() => {}
        }
    }
}

/// Proposes an entry with no writes and waits until it is applied here.
async fn drain_proposals(replica: &Replica) -> Result<(), StreamError> {
    let no_writes: Vec<Write> = Vec::new();
    let bytes = rmp_serde::to_vec(&no_writes).map_err(|e| StreamError::Invalid(e.to_string()))?;
    let applied = replica
        .group
        .propose_now(macula_raft::Request::Opaque(bytes.into()))
        .map_err(|e| StreamError::Replication(e.to_string()))?;
    match tokio::time::timeout(replica.group.request_timeout(), applied).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(StreamError::Replication(e.to_string())),
        Err(_) => Err(StreamError::Replication(
            "the draining entry was not committed in time".into(),
        )),
    }
}

/// The `count` nodes of `candidates` nearest (XOR) to the hash of
/// `stream`, in that order.
pub(super) fn nearest(stream: &str, candidates: &[NodeId], count: usize) -> Vec<NodeId> {
    let key = NodeId::from_bytes(*blake3::hash(stream.as_bytes()).as_bytes());
    let mut v: Vec<NodeId> = candidates.to_vec();
    v.sort_by_key(|n| n.distance(&key));
    v.dedup();
    v.truncate(count);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_the_nearest_to_the_name_and_stable() {
        let ids: Vec<NodeId> = (0u8..10)
            .map(|i| NodeId::from_public_key(&[i; 32]))
            .collect();
        let a = nearest("orders", &ids, 2);
        assert_eq!(a.len(), 2);
        let mut rev = ids.clone();
        rev.reverse();
        assert_eq!(
            nearest("orders", &rev, 2),
            a,
            "order of candidates does not matter"
        );
        let key = NodeId::from_bytes(*blake3::hash(b"orders").as_bytes());
        let best = ids.iter().min_by_key(|n| n.distance(&key)).copied();
        assert_eq!(a.first().copied(), best);
        assert_eq!(nearest("orders", &ids[..1], 2).len(), 1);
    }

    #[test]
    fn writes_and_state_round_trip() {
        let writes = vec![
            Write::Put(7, vec![1, 2, 3]),
            Write::Delete(vec![1, 2]),
            Write::Last(7, 99),
            Write::Consumer("c".into(), Some(b"{}".to_vec())),
            Write::Consumer("d".into(), None),
            Write::Config(b"{}".to_vec()),
        ];
        let bytes = rmp_serde::to_vec(&writes).unwrap();
        let back: Vec<Write> = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, writes);
        let st = ReplicaState {
            applied: 3,
            config: b"{}".to_vec(),
            first_seq: 2,
            last_seq: 9,
            last_ts: 5,
            consumers: vec![("c".into(), serde_bytes::ByteBuf::from(b"x".to_vec()))],
        };
        let bytes = rmp_serde::to_vec_named(&st).unwrap();
        assert_eq!(rmp_serde::from_slice::<ReplicaState>(&bytes).unwrap(), st);
        assert!(rmp_serde::from_slice::<Vec<Write>>(b"\x91\xc1").is_err());
    }
}
