//! openraft's network over the mesh: every Raft RPC is one bidirectional
//! QUIC stream on the pooled connection to the target member (dialed
//! through the pool, found through the DHT), opened with RAFT_REQUEST and
//! answered with one RAFT_RESPONSE (`docs/PROTOCOL.md` §5.8).

use std::sync::Arc;
use std::time::Duration;

use macula_raft::openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use macula_raft::openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use macula_raft::openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use macula_raft::openraft::{EmptyNode, RPCTypes};
use macula_raft::{Durable, MemberId, TypeConfig};
use macula_wire::{Message, NodeId, RaftKind, RaftMessage, RaftRequest, RaftResponse, RaftStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::watchdog::Heard;
use super::RaftCounters;
use crate::framed::{FrameReader, FrameWriter};
use crate::peer::Peer;
use crate::quiet::LogLimit;

/// Bytes a RAFT_REQUEST frame adds around its body (type, group name,
/// MessagePack map keys), with room to spare.
const REQUEST_OVERHEAD: usize = 512;

/// How the Raft service reaches a member: the pooled connection to `id`,
/// else a dial to the address the DHT knows for it. Implemented by the
/// node's pool dialer.
pub(crate) trait Reach: Send + Sync + 'static {
    fn reach(&self, id: NodeId) -> futures::future::BoxFuture<'static, Option<Peer>>;
}

/// Why a request to a member failed before an answer came back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("member {0} is not reachable (no connection, and no dial succeeded)")]
    Unreachable(NodeId),
    #[error("stream to {peer} failed: {error}")]
    Stream { peer: NodeId, error: String },
    #[error("request of {len} bytes exceeds {peer}'s frame limit of {max} bytes")]
    TooLarge { peer: NodeId, len: usize, max: u32 },
    #[error("no answer from {0} in time")]
    Timeout(NodeId),
    #[error("{peer} answered {status:?}: {reason}")]
    Refused {
        peer: NodeId,
        status: RaftStatus,
        reason: String,
    },
    #[error("could not encode or decode a Raft body: {0}")]
    Codec(String),
}

/// Sends one request on a stream of its own and waits for the answer.
#[derive(Clone)]
pub(crate) struct Transport {
    pub(crate) reach: Arc<dyn Reach>,
    /// Our own frame limit (what we accept in answers).
    pub(crate) max_frame: u32,
    pub(crate) counters: Arc<RaftCounters>,
    /// Fault injection for tests (`RaftGroups::partition`): members this
    /// node neither sends Raft requests to nor answers.
    pub(crate) cut_off: Arc<std::sync::RwLock<std::collections::HashSet<NodeId>>>,
}

impl Transport {
    /// Whether `peer` is cut off by `RaftGroups::partition`.
    pub(crate) fn is_cut_off(&self, peer: &NodeId) -> bool {
        self.cut_off
            .read()
            .map(|s| s.contains(peer))
            .unwrap_or(false)
    }

    /// One request to `group` on `target`; the answer's body when its status
    /// is `Ok`.
    pub(crate) async fn request(
        &self,
        target: NodeId,
        group: &str,
        kind: RaftKind,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        if self.is_cut_off(&target) {
            self.counters.requests_failed_total.inc();
            return Err(TransportError::Unreachable(target));
        }
        self.counters.requests_sent_total.inc();
        let r = tokio::time::timeout(timeout, self.exchange(target, group, kind, body)).await;
        let r = r.unwrap_or(Err(TransportError::Timeout(target)));
        if r.is_err() {
            self.counters.requests_failed_total.inc();
        }
        r
    }

    async fn exchange(
        &self,
        target: NodeId,
        group: &str,
        kind: RaftKind,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        let peer = self
            .reach
            .reach(target)
            .await
            .ok_or(TransportError::Unreachable(target))?;
        let max = peer.hello().max_frame_size;
        if body.len() + REQUEST_OVERHEAD > max as usize {
            return Err(TransportError::TooLarge {
                peer: target,
                len: body.len(),
                max,
            });
        }
        let stream_err = |e: String| TransportError::Stream {
            peer: target,
            error: e,
        };
        let (send, recv) = peer
            .connection()
            .open_bi()
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let mut w = FrameWriter::new(send, max);
        let mut r = FrameReader::new(recv, self.max_frame);
        let msg = Message::Raft(RaftMessage::Request(RaftRequest {
            group: group.to_string(),
            kind,
            body,
        }));
        w.send(&msg).await.map_err(|e| stream_err(e.to_string()))?;
        w.finish();
        let frame = r
            .read()
            .await
            .map_err(|e| stream_err(e.to_string()))?
            .ok_or_else(|| stream_err("stream ended without an answer".into()))?;
        match frame.decode() {
            Ok(Message::Raft(RaftMessage::Response(RaftResponse {
                status: RaftStatus::Ok,
                body,
                ..
            }))) => Ok(body),
            Ok(Message::Raft(RaftMessage::Response(RaftResponse { status, reason, .. }))) => {
                Err(TransportError::Refused {
                    peer: target,
                    status,
                    reason,
                })
            }
            Ok(other) => Err(stream_err(format!(
                "unexpected {}",
                other.msg_type().name()
            ))),
            Err(e) => Err(stream_err(e.to_string())),
        }
    }
}

/// MessagePack with field names (what every Raft body is).
pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, TransportError> {
    rmp_serde::to_vec_named(v).map_err(|e| TransportError::Codec(e.to_string()))
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, TransportError> {
    rmp_serde::from_slice(b).map_err(|e| TransportError::Codec(e.to_string()))
}

/// openraft's network factory for one group.
pub(crate) struct MeshNetworkFactory {
    pub(crate) transport: Transport,
    pub(crate) group: Arc<str>,
    /// This member's log on disk: the commit index sent to followers never
    /// runs ahead of it (see `macula_raft::Durable`).
    pub(crate) durable: Durable,
    /// Greater logs seen in vote answers, for the election watchdog.
    pub(crate) heard: Arc<Heard>,
}

impl RaftNetworkFactory<TypeConfig> for MeshNetworkFactory {
    type Network = MeshNetwork;

    async fn new_client(&mut self, target: MemberId, _node: &EmptyNode) -> MeshNetwork {
        MeshNetwork {
            transport: self.transport.clone(),
            group: self.group.clone(),
            target,
            quiet: LogLimit::new(UNREACHABLE_LOG_EVERY),
            durable: self.durable.clone(),
            heard: self.heard.clone(),
            no_group: Arc::default(),
        }
    }
}

/// openraft's connection to one member.
pub(crate) struct MeshNetwork {
    transport: Transport,
    group: Arc<str>,
    target: MemberId,
    /// openraft retries an unreachable member every 200 ms: one warning
    /// per interval says so (the daemon's default log filter hides
    /// openraft's own line per retry).
    quiet: LogLimit,
    durable: Durable,
    heard: Arc<Heard>,
    /// The last failure was "no such group" (the back-off is short).
    no_group: Arc<std::sync::atomic::AtomicBool>,
}

/// At most one "member unreachable" warning per member and interval.
const UNREACHABLE_LOG_EVERY: Duration = Duration::from_secs(30);

/// How often a member that is down is tried again.
const UNREACHABLE_RETRY: Duration = Duration::from_millis(200);

/// How often a member that answered it does not run the group (yet) is
/// tried again: well within an election timeout, so that a member whose
/// group starts a little after the others hears from their leader before
/// its own election timer fires.
const NO_GROUP_RETRY: Duration = Duration::from_millis(20);

type RpcErr<E = macula_raft::openraft::error::Infallible> =
    RPCError<MemberId, EmptyNode, RaftError<MemberId, E>>;

impl MeshNetwork {
    async fn call<Req, Resp, E>(
        &self,
        kind: RaftKind,
        req: &Req,
        option: &RPCOption,
        action: RPCTypes,
        entries: usize,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let len = body.len();
        let timeout = option.hard_ttl();
        let answer = self
            .transport
            .request(self.target.0, &self.group, kind, body, timeout)
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(TransportError::TooLarge { max, .. }) if action == RPCTypes::AppendEntries => {
                // Ask openraft for fewer entries: a share that fits, at
                // least one.
                let fit = (entries as u64 * u64::from(max) / (2 * len.max(1) as u64)).max(1);
                self.transport.counters.payload_too_large_total.inc();
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(fit),
                ));
            }
            Err(TransportError::Timeout(_)) => {
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: MemberId::default(),
                    target: self.target,
                    timeout,
                }))
            }
            Err(
                e @ TransportError::Refused {
                    status: RaftStatus::NoGroup,
                    ..
                },
            ) => {
                // Up, but not running the group yet: a member of a group
                // just created (or a node still opening its groups) that
                // starts it within milliseconds. Retried after a short
                // back-off ([`NO_GROUP_RETRY`], see `backoff`), not the
                // 200 ms of a member that is down: the member's election
                // timer, not hearing from this leader, could fire first
                // and unseat it.
                self.no_group
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.transport.counters.no_group_answers_total.inc();
                tracing::debug!(group = %self.group, member = %self.target, error = %e, "raft member not running the group yet");
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Err(
                e @ (TransportError::Unreachable(_)
                | TransportError::Refused { .. }
                | TransportError::Stream { .. }),
            ) => {
                // A member that is down, cut off, or refusing: back off
                // before trying again.
                self.no_group
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                if let Some(held) = self.quiet.allow() {
                    tracing::warn!(group = %self.group, member = %self.target, error = %e, repeats = held, "raft member unreachable; retrying every 200 ms");
                }
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        let result: Result<Resp, RaftError<MemberId, E>> =
            decode(&answer).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for MeshNetwork {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RpcErr> {
        // The leader counts its own copy of an entry before that copy is on
        // disk; followers hear of a commit only once it is. A message that
        // only carries the commit waits for the disk (a fraction of an
        // fsync: it was started before the entry was replicated); one that
        // carries entries is not held back and says what is on disk.
        if let Some(commit) = rpc.leader_commit {
            if self.durable.last().map(|l| l.index) < Some(commit.index) {
                if rpc.entries.is_empty() {
                    let _ =
                        tokio::time::timeout(option.soft_ttl(), self.durable.wait(commit.index))
                            .await;
                }
                rpc.leader_commit = self.durable.clamp(rpc.leader_commit);
            }
        }
        let n = rpc.entries.len();
        if n > 0 {
            macula_raft::probe::mark(macula_raft::probe::Phase::AppendSent);
        }
        let r = self
            .call(
                RaftKind::AppendEntries,
                &rpc,
                &option,
                RPCTypes::AppendEntries,
                n,
            )
            .await;
        if n > 0 {
            macula_raft::probe::mark(macula_raft::probe::Phase::AnswerGot);
        }
        r
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<MemberId>, RpcErr<InstallSnapshotError>> {
        self.call(
            RaftKind::InstallSnapshot,
            &rpc,
            &option,
            RPCTypes::InstallSnapshot,
            0,
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MemberId>,
        option: RPCOption,
    ) -> Result<VoteResponse<MemberId>, RpcErr> {
        let answer: Result<VoteResponse<MemberId>, RpcErr> = self
            .call(RaftKind::Vote, &rpc, &option, RPCTypes::Vote, 0)
            .await;
        if let Ok(resp) = &answer {
            // The watchdog backs off while this node's log is smaller.
            if let Some(theirs) = resp
                .last_log_id
                .filter(|_| resp.last_log_id > rpc.last_log_id)
            {
                self.heard.greater_log(theirs);
            }
        }
        answer
    }

    fn backoff(&self) -> macula_raft::openraft::network::Backoff {
        // A member that is down is retried every 200 ms (openraft's default
        // is 500 ms): a restarted member catches up sooner. One that
        // answered it does not run the group yet, every `NO_GROUP_RETRY`.
        let no_group = self.no_group.clone();
        macula_raft::openraft::network::Backoff::new(std::iter::repeat_with(move || {
            if no_group.load(std::sync::atomic::Ordering::Relaxed) {
                NO_GROUP_RETRY
            } else {
                UNREACHABLE_RETRY
            }
        }))
    }
}
