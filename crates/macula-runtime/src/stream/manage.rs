//! Adding and removing streams, replicated ones included, and what a node
//! does for streams once it runs: serve them to the mesh, answer the
//! control procedures of replicated streams, rejoin their groups.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_stream::StreamConfig;
use macula_wire::NodeId;

use super::remote::DEFAULT_REMOTE_TIMEOUT;
use super::replica::{
    decode_request, group_name, lead, nearest, ReplicaRequest, StreamApplier, DROP_PROCEDURE,
    REPLICA_PROCEDURE,
};
use super::{Hosted, PeerList, Replica, StreamError, StreamInfo, Streams};
use crate::raft::{GroupOptions, RaftGroups};
use crate::rpc::{HandlerError, Rpc};

/// How long adding a replicated stream waits for its members to answer
/// and for a leader to serve it.
const ADD_PATIENCE: Duration = Duration::from_secs(15);

impl Streams {
    /// Starts what streams need of a running node: each hosted stream is
    /// served to the mesh (`_stream.<name>`), replicated streams rejoin
    /// their groups, and the control procedures of replicated streams are
    /// served (`_node.streams.replica`, `_node.streams.drop`). `peers`
    /// lists the connected full nodes (replica placement).
    pub fn start(&self, rpc: Rpc, raft: RaftGroups, peers: PeerList) {
        if self.0.raft.set(raft).is_err() {
            return;
        }
        let _ = self.0.peers.set(peers);
        self.serve_remote(rpc.clone());
        let weak = Arc::downgrade(&self.0);
        let create = move |req: crate::rpc::Request| {
            let weak = weak.clone();
            async move {
                let streams = weak
                    .upgrade()
                    .map(Streams)
                    .ok_or_else(|| HandlerError::new(503, "the node is stopping"))?;
                let r: ReplicaRequest = decode_request(&req.payload)
                    .map_err(|e| HandlerError::new(400, format!("bad replica request: {e}")))?;
                let cfg: StreamConfig = serde_json::from_slice(&r.config)
                    .map_err(|e| HandlerError::new(400, format!("bad configuration: {e}")))?;
                streams
                    .create_replica(&cfg, r.members)
                    .await
                    .map_err(|e| HandlerError::new(409, format!("{}: {e}", e.kind())))?;
                Ok(Bytes::new())
            }
        };
        let weak = Arc::downgrade(&self.0);
        let drop_one = move |req: crate::rpc::Request| {
            let weak = weak.clone();
            async move {
                let streams = weak
                    .upgrade()
                    .map(Streams)
                    .ok_or_else(|| HandlerError::new(503, "the node is stopping"))?;
                let name = String::from_utf8(req.payload.to_vec())
                    .map_err(|_| HandlerError::new(400, "bad stream name"))?;
                match streams.drop_replica(&name).await {
                    Ok(()) | Err(StreamError::NotFound(_)) => Ok(Bytes::new()),
                    Err(e) => Err(HandlerError::new(500, e.to_string())),
                }
            }
        };
        let mut control = self.0.control.lock();
        for (procedure, r) in [
            (
                REPLICA_PROCEDURE,
                rpc.serve_unlisted(REPLICA_PROCEDURE, create),
            ),
            (DROP_PROCEDURE, rpc.serve_unlisted(DROP_PROCEDURE, drop_one)),
        ] {
            match r {
                Ok(reg) => control.push(reg),
                Err(e) => {
                    tracing::warn!(procedure, error = %e, "replicated streams' control procedure not served")
                }
            }
        }
        drop(control);
        let replicated: Vec<Arc<Hosted>> = self
            .0
            .hosted
            .lock()
            .values()
            .filter(|h| h.replicated)
            .cloned()
            .collect();
        for h in replicated {
            let streams = self.clone();
            tokio::spawn(async move {
                if let Err(e) = streams.join_group(&h, Vec::new()).await {
                    h.fail(format!("could not rejoin the stream's group: {e}"));
                }
            });
        }
    }

    /// Creates a stream (its file and its capture). Adding a stream again
    /// with the same configuration is a no-op. With `replicas: 3` the
    /// stream is created on this node and the two other connected full
    /// nodes nearest to its name, as one Raft group (`replica.rs`); the
    /// answer comes once a leader serves it.
    pub async fn add(&self, cfg: StreamConfig) -> Result<StreamInfo, StreamError> {
        if cfg.replicas > 1 {
            return self.add_replicated(cfg).await;
        }
        let name = cfg.name.clone();
        let streams = self.clone();
        tokio::task::spawn_blocking(move || streams.create(&cfg))
            .await
            .map_err(|e| StreamError::Invalid(e.to_string()))??;
        self.info(&name)
    }

    async fn add_replicated(&self, cfg: StreamConfig) -> Result<StreamInfo, StreamError> {
        cfg.validate()?;
        let (Some(raft), Some(rpc)) = (self.raft(), self.rpc()) else {
            return Err(StreamError::Replication(
                "the node is not running yet".into(),
            ));
        };
        if let Some(r) = self.replica(&cfg.name) {
            // Added before: the same answer as for one replica.
            let same = self
                .0
                .hosted
                .lock()
                .get(&cfg.name)
                .is_some_and(|h| h.core.lock().config() == &cfg);
            if !same {
                return Err(StreamError::Exists(cfg.name.clone()));
            }
            return self.replicated_info(&cfg.name, &r).await;
        }
        let me = raft.node_id();
        let candidates: Vec<NodeId> = self
            .0
            .peers
            .get()
            .map(|p| p())
            .unwrap_or_default()
            .into_iter()
            .filter(|p| *p != me)
            .collect();
        let want = usize::from(cfg.replicas) - 1;
        let others = nearest(&cfg.name, &candidates, want);
        if others.len() < want {
            return Err(StreamError::Invalid(format!(
                "a stream with {} replicas needs {want} other full nodes connected; {} are",
                cfg.replicas,
                others.len()
            )));
        }
        let mut members = vec![me];
        members.extend(others.iter().copied());
        let json = serde_json::to_vec(&cfg).map_err(|e| StreamError::Invalid(e.to_string()))?;
        let request = rmp_serde::to_vec_named(&ReplicaRequest {
            config: json,
            members: members.clone(),
        })
        .map_err(|e| StreamError::Invalid(e.to_string()))?;
        self.create_replica(&cfg, members.clone()).await?;
        let mut created = vec![me];
        for o in &others {
            let r = rpc
                .call_to(*o, REPLICA_PROCEDURE, request.clone())
                .timeout(ADD_PATIENCE)
                .retries(0)
                .await;
            match r {
                Ok(_) => created.push(*o),
                Err(e) => {
                    // Undo: a stream on fewer members than it says is
                    // worse than none.
                    self.drop_everywhere(&cfg.name, &created).await;
                    return Err(StreamError::Replication(format!(
                        "member {o} could not create its replica: {e}"
                    )));
                }
            }
        }
        tracing::info!(stream = %cfg.name, members = ?members, "replicated stream added");
        let r = self
            .replica(&cfg.name)
            .ok_or_else(|| StreamError::NotFound(cfg.name.clone()))?;
        self.replicated_info(&cfg.name, &r).await
    }

    /// A replicated stream's state from its leader, waiting (bounded) for
    /// one to serve.
    async fn replicated_info(&self, name: &str, r: &Replica) -> Result<StreamInfo, StreamError> {
        let deadline = tokio::time::Instant::now() + ADD_PATIENCE;
        loop {
            let answer = self.handle(name).info().await;
            match answer {
                Ok(i) => return Ok(i),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    r.wait_serving(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Makes this node a member of replicated stream `cfg` (its file, its
    /// group with `members` as founders). Idempotent.
    pub(crate) async fn create_replica(
        &self,
        cfg: &StreamConfig,
        members: Vec<NodeId>,
    ) -> Result<(), StreamError> {
        if cfg.replicas < 2 {
            return Err(StreamError::Invalid("not a replicated stream".into()));
        }
        let streams = self.clone();
        let owned = cfg.clone();
        let created = tokio::task::spawn_blocking(move || streams.create(&owned))
            .await
            .map_err(|e| StreamError::Invalid(e.to_string()))??;
        let Some(h) = created else {
            // Hosted already (a repeated request).
            return Ok(());
        };
        if let Err(e) = self.join_group(&h, members).await {
            let _ = self.remove_local(&cfg.name).await;
            return Err(e);
        }
        Ok(())
    }

    /// Joins (or rejoins) `h`'s group and starts following its leadership.
    async fn join_group(&self, h: &Arc<Hosted>, members: Vec<NodeId>) -> Result<(), StreamError> {
        let raft = self
            .raft()
            .ok_or_else(|| StreamError::Replication("the node is not running yet".into()))?;
        let applier = Arc::new(StreamApplier {
            hosted: Arc::downgrade(h),
            streams: Arc::downgrade(&self.0),
        });
        let log_sync_interval = h
            .core
            .lock()
            .config()
            .sync_interval
            .map(macula_stream::Millis::to_duration);
        let group = raft
            .join(
                &group_name(&h.name),
                GroupOptions {
                    members,
                    applier: Some(applier),
                    log_sync_interval,
                },
            )
            .await
            .map_err(|e| StreamError::Replication(e.to_string()))?;
        let replica = Arc::new(Replica::new(group));
        if h.replica.set(replica.clone()).is_err() {
            return Ok(());
        }
        tokio::spawn(lead(Arc::downgrade(&self.0), Arc::downgrade(h), replica));
        Ok(())
    }

    /// Removes a stream, its consumers and its file; a replicated stream
    /// from every member (those out of reach keep their copy and are
    /// named in the error: remove it there too).
    pub async fn delete(&self, name: &str) -> Result<(), StreamError> {
        let Some(r) = self.replica(name) else {
            return self.remove_local(name).await.map(drop);
        };
        let state = r.group.leader_state();
        let me = self.raft().map(|g| g.node_id());
        let others: Vec<NodeId> = state
            .voters
            .iter()
            .chain(state.learners.iter())
            .copied()
            .filter(|m| Some(*m) != me)
            .collect();
        self.drop_replica(name).await?;
        let missed = self.drop_on(name, &others).await;
        if missed.is_empty() {
            Ok(())
        } else {
            Err(StreamError::Replication(format!(
                "stream removed here; members not reached (remove it there too): {}",
                missed
                    .iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }

    /// Removes a replicated stream from this member: its group (and the
    /// group's files) and its stream file.
    ///
    /// The group stops first: an entry it still applied after the store
    /// was closed (a member behind in its applies has many) would fail the
    /// stream, with errors logged for a removal that went as asked.
    pub(crate) async fn drop_replica(&self, name: &str) -> Result<(), StreamError> {
        let raft = self.raft();
        if let Some(raft) = &raft {
            raft.leave(&group_name(name)).await;
        }
        let removed = self.remove_local(name).await;
        if let Some(raft) = &raft {
            raft.destroy(&group_name(name))
                .await
                .map_err(|e| StreamError::Replication(e.to_string()))?;
        }
        if removed?.is_none() {
            return Err(StreamError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Asks `members` to drop `name`; those that did not answer.
    async fn drop_on(&self, name: &str, members: &[NodeId]) -> Vec<NodeId> {
        let Some(rpc) = self.rpc() else {
            return members.to_vec();
        };
        let mut missed = Vec::new();
        for m in members {
            let r = rpc
                .call_to(*m, DROP_PROCEDURE, name.as_bytes().to_vec())
                .timeout(DEFAULT_REMOTE_TIMEOUT)
                .retries(0)
                .await;
            if let Err(e) = r {
                tracing::warn!(stream = %name, member = %m, error = %e, "member did not remove its replica");
                missed.push(*m);
            }
        }
        missed
    }

    /// Undoes a half-made replicated stream (this node included if listed).
    async fn drop_everywhere(&self, name: &str, members: &[NodeId]) {
        let me = self.raft().map(|g| g.node_id());
        if members.iter().any(|m| Some(*m) == me) {
            if let Err(e) = self.drop_replica(name).await {
                tracing::warn!(stream = %name, error = %e, "could not undo the local replica");
            }
        }
        let others: Vec<NodeId> = members.iter().copied().filter(|m| Some(*m) != me).collect();
        self.drop_on(name, &others).await;
    }
}
