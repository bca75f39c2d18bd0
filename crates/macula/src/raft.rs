//! Raft groups: leader election, a consistent key-value store, leases,
//! locks and elections (the recipes of etcd's `concurrency` package).
//!
//! A group is a set of nodes (its members) that agree on one log through
//! Raft ([openraft](https://docs.rs/openraft)); its state machine is a
//! key-value store with etcd v3 semantics: one revision per group that
//! grows with every change, and per key a create revision, a mod revision
//! and a version. A member joins with [`crate::Node::raft_group`]; any node
//! or lightweight client reaches a group through one of its members with
//! [`crate::Node::kv`] / [`crate::Client::kv`] (RPC procedure
//! `_raft.<group>`, served by every member).
//!
//! ```no_run
//! # async fn demo(node: macula::Node, others: Vec<macula::NodeId>) -> Result<(), macula::Error> {
//! use std::time::Duration;
//! let group = node.raft_group("config", others).await?;
//! let kv = group.kv();
//! kv.put("feature.x", "on").await?;
//! assert_eq!(kv.get("feature.x").await?.map(|kv| kv.value), Some(b"on".to_vec()));
//! let session = kv.session(Duration::from_secs(10)).await?;
//! let lock = macula::raft::Mutex::new(kv.clone(), "locks/report");
//! let guard = lock.lock(&session).await?;
//! // ... only one holder at a time, mesh-wide ...
//! guard.unlock().await?;
//! # Ok(()) }
//! ```
//!
//! Guarantees: writes are linearizable and acknowledged once a majority of
//! voters has them on disk; reads are linearizable by default (ReadIndex on
//! the leader) or, with [`ReadConsistency::Stale`], served by the member
//! at hand. A write whose answer was lost after it reached the leader fails
//! with [`GroupError::Uncertain`]: it may have been applied (check with a
//! read); writes are never retried behind the caller's back once sent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use macula_raft::Request as KvRequest;
pub use macula_raft::{Event, Expect, KeyValue, KvError, Response as KvResponse};
pub use macula_runtime::raft::{
    validate_group_name, GroupError, GroupOptions, LeaderState, RaftLimits, ReadConsistency,
    MAX_GROUP_NAME_LEN,
};

use crate::{Error, HandlerError, NodeId, Registration};

/// The RPC procedure every member of `group` serves for non-members.
pub fn procedure(group: &str) -> String {
    format!("_raft.{group}")
}

/// A group this node is a member of.
#[derive(Clone, Debug)]
pub struct Group {
    inner: macula_runtime::raft::Group,
    me: NodeId,
    _served: Arc<Registration>,
}

impl Group {
    pub(crate) fn new(
        inner: macula_runtime::raft::Group,
        me: NodeId,
        served: Arc<Registration>,
    ) -> Self {
        Group {
            inner,
            me,
            _served: served,
        }
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The leader this member knows, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.leader()
    }

    /// This node leads the group.
    pub fn is_leader(&self) -> bool {
        self.inner.is_leader()
    }

    /// Voters and learners, the term and the leader, as this member sees
    /// them.
    pub fn members(&self) -> LeaderState {
        self.inner.leader_state()
    }

    /// Leadership changes: `borrow()` is the current state at once;
    /// `changed().await` wakes on every change.
    pub fn watch_leader(&self) -> watch::Receiver<LeaderState> {
        self.inner.watch_leader()
    }

    /// Adds `id` as a non-voting member; returns once it has caught up.
    pub async fn add_learner(&self, id: NodeId) -> Result<(), Error> {
        Ok(self.inner.add_learner(id).await?)
    }

    /// Adds `id` as a voter (a learner until it has caught up, then
    /// promoted).
    pub async fn add_voter(&self, id: NodeId) -> Result<(), Error> {
        Ok(self.inner.add_voter(id).await?)
    }

    /// Removes `id` from the group.
    pub async fn remove(&self, id: NodeId) -> Result<(), Error> {
        Ok(self.inner.remove(id).await?)
    }

    /// Registers this node as running workload `name` with `capabilities`
    /// (replacing an earlier registration), as the seeds' platform API did.
    pub async fn register_workload(
        &self,
        name: &str,
        capabilities: Vec<String>,
    ) -> Result<Registered, Error> {
        let r = self
            .inner
            .write(KvRequest::Register {
                name: name.to_string(),
                member: macula_raft::MemberId(self.me),
                capabilities,
            })
            .await?;
        match r {
            KvResponse::Registered { members, revision } => {
                let state = self.members();
                Ok(Registered {
                    leader: state.leader,
                    cluster_size: state.voters.len() + state.learners.len(),
                    registered: members,
                    revision,
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// The group's key-value store, through this member.
    pub fn kv(&self) -> Kv {
        Kv {
            backend: Backend::Local(self.inner.clone()),
        }
    }
}

/// What [`Group::register_workload`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The group's leader as this member knows it.
    pub leader: Option<NodeId>,
    /// Members of the group (voters and learners).
    pub cluster_size: usize,
    /// Members now registered for the workload's name.
    pub registered: usize,
    /// The revision the registration was stored at.
    pub revision: u64,
}

/// A group's key-value store: through a local member ([`Group::kv`]) or
/// over RPC through any member ([`crate::Node::kv`]).
#[derive(Clone)]
pub struct Kv {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Local(macula_runtime::raft::Group),
    Remote(Remote),
}

/// How a non-member reaches a group: an RPC call to `_raft.<group>`.
#[derive(Clone)]
pub(crate) struct Remote {
    pub(crate) procedure: String,
    pub(crate) timeout: Duration,
    /// Calls the procedure on the given member, or on any provider.
    pub(crate) call:
        Arc<dyn Fn(Option<NodeId>, String, Bytes, Duration) -> CallFuture + Send + Sync>,
    /// The leader the last answer named: calls go straight to it (no
    /// forwarding hop) while it answers.
    pub(crate) leader: Arc<parking_lot::Mutex<Option<NodeId>>>,
}

/// The reply to a `RemoteOp`: the result, and the leader as the answering
/// member knows it (so the caller can call the leader directly next time).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RemoteReply {
    pub result: Result<RemoteAnswer, GroupError>,
    #[serde(default)]
    pub leader: Option<NodeId>,
}

pub(crate) type CallFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, Error>> + Send>>;

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Local(g) => f.debug_tuple("Kv::Local").field(&g.name()).finish(),
            Backend::Remote(r) => f.debug_tuple("Kv::Remote").field(&r.procedure).finish(),
        }
    }
}

/// A key-value operation carried over RPC (MessagePack, field names).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RemoteOp {
    Write(KvRequest),
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        stale: bool,
    },
    Range {
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        limit: usize,
        stale: bool,
    },
    KeepAlive(u64),
    Status,
}

/// The answer to a `RemoteOp`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RemoteAnswer {
    Write(KvResponse),
    Read {
        revision: u64,
        kvs: Vec<KeyValue>,
    },
    KeepAlive(u64),
    Status {
        leader: Option<NodeId>,
        term: u64,
        voters: Vec<NodeId>,
        learners: Vec<NodeId>,
    },
}

fn unexpected(r: impl std::fmt::Debug) -> Error {
    Error::Raft(GroupError::Stopped(format!("unexpected answer {r:?}")))
}

fn consistency(stale: bool) -> ReadConsistency {
    if stale {
        ReadConsistency::Stale
    } else {
        ReadConsistency::Linearizable
    }
}

/// Serves `RemoteOp`s for `group` (the handler behind `_raft.<group>`).
pub(crate) async fn serve(
    group: macula_runtime::raft::Group,
    payload: Bytes,
) -> Result<Bytes, HandlerError> {
    let op: RemoteOp = rmp_serde::from_slice(&payload)
        .map_err(|e| HandlerError::new(400, format!("bad request: {e}")))?;
    let answer: Result<RemoteAnswer, GroupError> = match op {
        RemoteOp::Write(req) => group.write(req).await.map(RemoteAnswer::Write),
        RemoteOp::Get { key, stale } => {
            group
                .get(&key, consistency(stale))
                .await
                .map(|(revision, kv)| RemoteAnswer::Read {
                    revision,
                    kvs: kv.into_iter().collect(),
                })
        }
        RemoteOp::Range {
            prefix,
            limit,
            stale,
        } => group
            .range(&prefix, limit, consistency(stale))
            .await
            .map(|(revision, kvs)| RemoteAnswer::Read { revision, kvs }),
        RemoteOp::KeepAlive(id) => group.keep_alive(id).await.map(RemoteAnswer::KeepAlive),
        RemoteOp::Status => {
            let s = group.leader_state();
            Ok(RemoteAnswer::Status {
                leader: s.leader,
                term: s.term,
                voters: s.voters,
                learners: s.learners,
            })
        }
    };
    let reply = RemoteReply {
        result: answer,
        leader: group.leader(),
    };
    rmp_serde::to_vec_named(&reply)
        .map(Bytes::from)
        .map_err(|e| HandlerError::new(500, e.to_string()))
}

impl Kv {
    pub(crate) fn remote(remote: Remote) -> Kv {
        Kv {
            backend: Backend::Remote(remote),
        }
    }

    async fn remote_op(r: &Remote, op: &RemoteOp) -> Result<RemoteAnswer, Error> {
        let body = Bytes::from(
            rmp_serde::to_vec_named(op)
                .map_err(|e| Error::Raft(GroupError::Stopped(e.to_string())))?,
        );
        let leader = *r.leader.lock();
        let reply = match (r.call)(leader, r.procedure.clone(), body.clone(), r.timeout).await {
            Ok(reply) => reply,
            Err(e) => {
                // The leader we knew may be gone: forget it. A write is not
                // sent again (it may have reached the group); a read is,
                // through any member.
                *r.leader.lock() = None;
                let is_write = matches!(op, RemoteOp::Write(_));
                if leader.is_none() || is_write {
                    return Err(e);
                }
                (r.call)(None, r.procedure.clone(), body, r.timeout).await?
            }
        };
        let reply: RemoteReply = rmp_serde::from_slice(&reply)
            .map_err(|e| Error::Raft(GroupError::Stopped(format!("bad answer: {e}"))))?;
        *r.leader.lock() = reply.leader;
        Ok(reply.result?)
    }

    /// Proposes a raw request; the state machine's answer. A refused
    /// request (limits, a missing lease) is `Err(Error::Raft(GroupError::Kv))`.
    pub async fn write(&self, req: KvRequest) -> Result<KvResponse, Error> {
        let r = match &self.backend {
            Backend::Local(g) => g.write(req).await?,
            Backend::Remote(r) => match Self::remote_op(r, &RemoteOp::Write(req)).await? {
                RemoteAnswer::Write(w) => w,
                other => return Err(unexpected(other)),
            },
        };
        match r {
            KvResponse::Error(e) => Err(Error::Raft(GroupError::Kv(e))),
            ok => Ok(ok),
        }
    }

    /// `key`'s value and metadata (linearizable).
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<KeyValue>, Error> {
        self.get_with(key, ReadConsistency::Linearizable).await
    }

    /// `key` with the given consistency.
    pub async fn get_with(
        &self,
        key: impl AsRef<[u8]>,
        c: ReadConsistency,
    ) -> Result<Option<KeyValue>, Error> {
        let key = key.as_ref();
        match &self.backend {
            Backend::Local(g) => Ok(g.get(key, c).await?.1),
            Backend::Remote(r) => {
                let op = RemoteOp::Get {
                    key: key.to_vec(),
                    stale: c == ReadConsistency::Stale,
                };
                match Self::remote_op(r, &op).await? {
                    RemoteAnswer::Read { mut kvs, .. } => Ok(kvs.pop()),
                    other => Err(unexpected(other)),
                }
            }
        }
    }

    /// Up to `limit` keys under `prefix` in key order (0: all), with the
    /// revision they were read at (linearizable).
    pub async fn range(
        &self,
        prefix: impl AsRef<[u8]>,
        limit: usize,
    ) -> Result<(u64, Vec<KeyValue>), Error> {
        self.range_with(prefix, limit, ReadConsistency::Linearizable)
            .await
    }

    /// `range` with the given consistency.
    pub async fn range_with(
        &self,
        prefix: impl AsRef<[u8]>,
        limit: usize,
        c: ReadConsistency,
    ) -> Result<(u64, Vec<KeyValue>), Error> {
        let prefix = prefix.as_ref();
        match &self.backend {
            Backend::Local(g) => Ok(g.range(prefix, limit, c).await?),
            Backend::Remote(r) => {
                let op = RemoteOp::Range {
                    prefix: prefix.to_vec(),
                    limit,
                    stale: c == ReadConsistency::Stale,
                };
                match Self::remote_op(r, &op).await? {
                    RemoteAnswer::Read { revision, kvs } => Ok((revision, kvs)),
                    other => Err(unexpected(other)),
                }
            }
        }
    }

    /// Sets `key`; the revision of the change.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<u64, Error> {
        self.put_with_lease(key, value, None).await
    }

    /// Sets `key`, attached to `lease` (deleted with it).
    pub async fn put_with_lease(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lease: Option<u64>,
    ) -> Result<u64, Error> {
        match self
            .write(KvRequest::Put {
                key: key.as_ref().to_vec(),
                value: value.as_ref().to_vec(),
                lease,
                prev_kv: false,
            })
            .await?
        {
            KvResponse::Put { revision, .. } => Ok(revision),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes `key`; how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<u64, Error> {
        self.delete_inner(key.as_ref(), false).await
    }

    /// Deletes every key under `prefix`; how many.
    pub async fn delete_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<u64, Error> {
        self.delete_inner(prefix.as_ref(), true).await
    }

    async fn delete_inner(&self, key: &[u8], prefix: bool) -> Result<u64, Error> {
        match self
            .write(KvRequest::Delete {
                key: key.to_vec(),
                prefix,
                prev_kv: false,
            })
            .await?
        {
            KvResponse::Deleted { deleted, .. } => Ok(deleted),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` to `value` if it is as `expect`ed. `Ok(Ok(new))` on
    /// success, `Ok(Err(current))` (the key as it is) when the comparison
    /// failed.
    pub async fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expect: Expect,
        value: impl AsRef<[u8]>,
    ) -> Result<Result<KeyValue, Option<KeyValue>>, Error> {
        let r = self
            .write(KvRequest::Cas {
                key: key.as_ref().to_vec(),
                expect,
                value: value.as_ref().to_vec(),
                lease: None,
            })
            .await?;
        cas_result(r)
    }

    /// Creates `key` unless it exists, optionally attached to `lease`;
    /// results as [`Kv::compare_and_swap`].
    pub async fn put_if_absent(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lease: Option<u64>,
    ) -> Result<Result<KeyValue, Option<KeyValue>>, Error> {
        let r = self
            .write(KvRequest::PutIfAbsent {
                key: key.as_ref().to_vec(),
                value: value.as_ref().to_vec(),
                lease,
            })
            .await?;
        cas_result(r)
    }

    /// Creates a lease of `ttl` (at least 1 ms); its id. Keys attached to
    /// it are deleted when it expires (no keep-alive for `ttl`) or is
    /// revoked. The leader measures the TTL and restarts it at full length
    /// when leadership changes, so a lease never ends early; it may end up
    /// to one election later than `ttl`.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<u64, Error> {
        let id = loop {
            let id = rand_u64();
            if id != 0 {
                break id;
            }
        };
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        match self.write(KvRequest::LeaseGrant { id, ttl_ms }).await? {
            KvResponse::Lease { id, .. } => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    /// Restarts lease `id`'s TTL; the TTL. `GroupError::NoLease` when it
    /// has expired.
    pub async fn keep_alive(&self, id: u64) -> Result<Duration, Error> {
        let ms = match &self.backend {
            Backend::Local(g) => g.keep_alive(id).await?,
            Backend::Remote(r) => match Self::remote_op(r, &RemoteOp::KeepAlive(id)).await? {
                RemoteAnswer::KeepAlive(ms) => ms,
                other => return Err(unexpected(other)),
            },
        };
        Ok(Duration::from_millis(ms))
    }

    /// Revokes lease `id`, deleting its keys; how many.
    pub async fn revoke(&self, id: u64) -> Result<u64, Error> {
        match self.write(KvRequest::LeaseRevoke { id }).await? {
            KvResponse::LeaseRevoked { deleted, .. } => Ok(deleted),
            other => Err(unexpected(other)),
        }
    }

    /// A lease kept alive in the background (every third of `ttl`) until
    /// the session is closed or dropped.
    pub async fn session(&self, ttl: Duration) -> Result<Session, Error> {
        let id = self.grant_lease(ttl).await?;
        let (lost_tx, lost) = watch::channel(false);
        let kv = self.clone();
        let period = (ttl / 3).max(Duration::from_millis(10));
        let keeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                match kv.keep_alive(id).await {
                    Ok(_) => {}
                    Err(Error::Raft(GroupError::NoLease(_))) => {
                        let _ = lost_tx.send(true);
                        return;
                    }
                    // A leader change or a slow answer: try again next tick
                    // (the TTL leaves two more).
                    Err(e) => tracing::debug!(lease = id, error = %e, "keep-alive failed"),
                }
            }
        });
        Ok(Session {
            kv: self.clone(),
            id,
            ttl,
            keeper,
            lost,
        })
    }

    /// Watches keys under `prefix` from revision `from` (0: only changes
    /// from now): past events the member still holds, then live ones.
    /// Only through a local member ([`Group::kv`]); a remote `Kv` gets
    /// `GroupError::Stopped`.
    pub fn watch(&self, prefix: impl AsRef<[u8]>, from: u64) -> Result<Watch, Error> {
        match &self.backend {
            Backend::Local(g) => {
                let prefix = prefix.as_ref().to_vec();
                let (backlog, live) = g.watch(&prefix, from)?;
                Ok(Watch {
                    group: g.clone(),
                    backlog: backlog.into(),
                    live,
                    prefix,
                    last: 0,
                    last_keys: Vec::new(),
                })
            }
            Backend::Remote(_) => Err(Error::Raft(GroupError::Stopped(
                "watch needs a local member of the group".into(),
            ))),
        }
    }

    /// Waits until `key` no longer exists (watch when local, else
    /// linearizable polls every 50 ms).
    async fn wait_gone(&self, key: &[u8]) -> Result<(), Error> {
        if let Backend::Local(_) = &self.backend {
            let mut w = self.watch(key, 0)?;
            if self.get(key).await?.is_none() {
                return Ok(());
            }
            loop {
                match w.next().await {
                    Some(WatchItem::Event(Event::Delete { key: k, .. })) if k == key => {
                        return Ok(())
                    }
                    Some(WatchItem::Lagged(_)) => {
                        if self.get(key).await?.is_none() {
                            return Ok(());
                        }
                    }
                    Some(_) => {}
                    None => return Err(Error::Raft(GroupError::Stopped("watch ended".into()))),
                }
            }
        }
        while self.get(key).await?.is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

fn cas_result(r: KvResponse) -> Result<Result<KeyValue, Option<KeyValue>>, Error> {
    match r {
        KvResponse::Cas {
            succeeded: true,
            current: Some(kv),
            ..
        } => Ok(Ok(kv)),
        KvResponse::Cas {
            succeeded: false,
            current,
            ..
        } => Ok(Err(current)),
        other => Err(unexpected(other)),
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // getrandom failing means no OS randomness at all; fall back to time.
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 | 1;
    }
    u64::from_le_bytes(b)
}

/// What a [`Watch`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// A change under the prefix.
    Event(Event),
    /// The watcher fell behind and `n` changes of the group (not all under
    /// the prefix) were skipped: re-read with `range` and go on.
    Lagged(u64),
}

/// Changes under a prefix, in revision order, each once. When the watcher
/// falls behind the live channel (or the member installs a snapshot) it
/// re-reads the missed events from the member's history; only when those
/// are no longer held does it yield [`WatchItem::Lagged`].
pub struct Watch {
    group: macula_runtime::raft::Group,
    backlog: std::collections::VecDeque<Event>,
    live: tokio::sync::broadcast::Receiver<(u64, Event)>,
    prefix: Vec<u8>,
    /// Revision of the last event handed out, and the keys handed out at
    /// it (one revision can change many keys).
    last: u64,
    last_keys: Vec<Vec<u8>>,
}

impl Watch {
    fn admit(&mut self, e: &Event) -> bool {
        let rev = e.revision();
        if rev < self.last || (rev == self.last && self.last_keys.iter().any(|k| k == e.key())) {
            return false;
        }
        if rev > self.last {
            self.last = rev;
            self.last_keys.clear();
        }
        self.last_keys.push(e.key().to_vec());
        true
    }

    /// Re-subscribes from the last revision handed out; false when those
    /// events are gone from the member's history.
    fn resubscribe(&mut self) -> bool {
        match self.group.watch(&self.prefix, self.last.max(1)) {
            Ok((backlog, live)) => {
                self.backlog = backlog.into();
                self.live = live;
                true
            }
            Err(_) => false,
        }
    }

    /// The next change; `None` once the group stopped here.
    pub async fn next(&mut self) -> Option<WatchItem> {
        let mut closed_again = false;
        loop {
            while let Some(e) = self.backlog.pop_front() {
                if self.admit(&e) {
                    return Some(WatchItem::Event(e));
                }
            }
            match self.live.recv().await {
                Ok((_, e)) => {
                    closed_again = false;
                    if macula_raft::kv::matches_prefix(&self.prefix, e.key()) && self.admit(&e) {
                        return Some(WatchItem::Event(e));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    if !self.resubscribe() {
                        // Resume live from here; the caller re-reads.
                        self.live = self.live.resubscribe();
                        return Some(WatchItem::Lagged(n));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    // A snapshot install replaces the channel; a stopped
                    // group closes it for good.
                    if closed_again || !self.resubscribe() {
                        return None;
                    }
                    closed_again = true;
                }
            }
        }
    }
}

/// A lease kept alive in the background ([`Kv::session`]). Dropping it
/// stops the keep-alives and revokes the lease (in the background); keys
/// attached to it are deleted.
pub struct Session {
    kv: Kv,
    id: u64,
    ttl: Duration,
    keeper: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("lease", &self.id)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Session {
    /// The lease's id.
    pub fn lease(&self) -> u64 {
        self.id
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Resolves when the lease has expired (keep-alives did not get
    /// through in time): whatever was held with it is gone.
    pub async fn lost(&self) {
        let mut l = self.lost.clone();
        let _ = l.wait_for(|lost| *lost).await;
    }

    /// Revokes the lease now; its keys are deleted.
    pub async fn close(self) -> Result<(), Error> {
        self.keeper.abort();
        let r = self.kv.revoke(self.id).await.map(drop);
        std::mem::forget(self);
        r
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keeper.abort();
        let kv = self.kv.clone();
        let id = self.id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = kv.revoke(id).await;
            });
        }
    }
}

/// A mesh-wide mutex (etcd's `concurrency.Mutex`): waiters queue in
/// `create_revision` order under `prefix`; each waits only for the one
/// before it, so an unlock wakes one waiter. A holder whose session's
/// lease expires loses the lock (its key is deleted with the lease).
#[derive(Debug, Clone)]
pub struct Mutex {
    kv: Kv,
    prefix: String,
}

/// A held [`Mutex`]. Dropping it without `unlock` keeps the key until the
/// session ends.
#[derive(Debug)]
pub struct MutexGuard {
    kv: Kv,
    key: String,
}

impl Mutex {
    /// A mutex named by `prefix` (keys `prefix/<lease>`).
    pub fn new(kv: Kv, prefix: impl Into<String>) -> Self {
        Mutex {
            kv,
            prefix: prefix.into(),
        }
    }

    /// Waits until this session holds the lock.
    pub async fn lock(&self, session: &Session) -> Result<MutexGuard, Error> {
        let key = format!("{}/{:016x}", self.prefix, session.lease());
        let mine = queue(&self.kv, &key, b"", session.lease()).await?;
        wait_turn(&self.kv, &self.prefix, mine).await?;
        Ok(MutexGuard {
            kv: self.kv.clone(),
            key,
        })
    }
}

impl MutexGuard {
    /// Releases the lock (the next waiter takes it).
    pub async fn unlock(self) -> Result<(), Error> {
        self.kv.delete(&self.key).await.map(drop)
    }

    /// The key that holds the lock.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Puts `key` (if absent) with `lease`; its create revision.
async fn queue(kv: &Kv, key: &str, value: &[u8], lease: u64) -> Result<u64, Error> {
    match kv.put_if_absent(key, value, Some(lease)).await? {
        Ok(created) => Ok(created.create_revision),
        Err(Some(existing)) => Ok(existing.create_revision),
        Err(None) => Err(unexpected("a failed put-if-absent with no key")),
    }
}

/// Waits until no key under `prefix/` was created before `mine`.
async fn wait_turn(kv: &Kv, prefix: &str, mine: u64) -> Result<(), Error> {
    let dir = format!("{prefix}/");
    loop {
        let (_, kvs) = kv.range(&dir, 0).await?;
        let before = kvs
            .iter()
            .filter(|k| k.create_revision < mine)
            .max_by_key(|k| k.create_revision);
        match before {
            None => return Ok(()),
            Some(prev) => kv.wait_gone(&prev.key).await?,
        }
    }
}

/// Leader election among candidates (etcd's `concurrency.Election`): the
/// candidate whose key under `prefix` was created first leads; its value
/// is the leader's proclamation.
#[derive(Debug, Clone)]
pub struct Election {
    kv: Kv,
    prefix: String,
}

/// This candidate leads until it resigns or its session ends.
#[derive(Debug)]
pub struct Leadership {
    kv: Kv,
    key: String,
}

impl Election {
    /// An election named by `prefix`.
    pub fn new(kv: Kv, prefix: impl Into<String>) -> Self {
        Election {
            kv,
            prefix: prefix.into(),
        }
    }

    /// Runs for leader with `value`; returns once elected.
    pub async fn campaign(
        &self,
        session: &Session,
        value: impl AsRef<[u8]>,
    ) -> Result<Leadership, Error> {
        let key = format!("{}/{:016x}", self.prefix, session.lease());
        let mine = queue(&self.kv, &key, value.as_ref(), session.lease()).await?;
        wait_turn(&self.kv, &self.prefix, mine).await?;
        Ok(Leadership {
            kv: self.kv.clone(),
            key,
        })
    }

    /// The current leader's key and value, if there is one.
    pub async fn leader(&self) -> Result<Option<KeyValue>, Error> {
        let (_, kvs) = self.kv.range(format!("{}/", self.prefix), 0).await?;
        Ok(kvs.into_iter().min_by_key(|k| k.create_revision))
    }
}

impl Leadership {
    /// Steps down (the next candidate leads).
    pub async fn resign(self) -> Result<(), Error> {
        self.kv.delete(&self.key).await.map(drop)
    }

    /// Changes the leader's value without an election.
    pub async fn proclaim(&self, value: impl AsRef<[u8]>) -> Result<(), Error> {
        let lost = || Error::Raft(GroupError::Stopped("no longer leading".into()));
        let cur = self.kv.get(&self.key).await?.ok_or_else(lost)?;
        let r = self
            .kv
            .write(KvRequest::Cas {
                key: self.key.as_bytes().to_vec(),
                expect: Expect::ModRevision(cur.mod_revision),
                value: value.as_ref().to_vec(),
                // Stay attached to the session's lease.
                lease: cur.lease,
            })
            .await?;
        match cas_result(r)? {
            Ok(_) => Ok(()),
            Err(_) => Err(lost()),
        }
    }

    /// The key that holds the leadership.
    pub fn key(&self) -> &str {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forms docs/PROTOCOL.md §5.8 promises for `Status`.
    #[test]
    fn status_decodes_from_a_string_or_a_map() {
        let named = rmp_serde::to_vec_named(&RemoteOp::Status).expect("encode");
        assert!(matches!(
            rmp_serde::from_slice::<RemoteOp>(&named),
            Ok(RemoteOp::Status)
        ));
        // "Status" as a bare string: a4 'S' 't' 'a' 't' 'u' 's' -> fixstr of 6.
        let string = [&[0xa6u8][..], b"Status"].concat();
        assert!(matches!(
            rmp_serde::from_slice::<RemoteOp>(&string),
            Ok(RemoteOp::Status)
        ));
        // {"Status": nil}
        let map = [&[0x81u8, 0xa6][..], b"Status", &[0xc0]].concat();
        assert!(matches!(
            rmp_serde::from_slice::<RemoteOp>(&map),
            Ok(RemoteOp::Status)
        ));
    }
}
