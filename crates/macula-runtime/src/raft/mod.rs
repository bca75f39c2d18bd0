//! Raft groups as a service: openraft (`macula-raft`) over the mesh.
//!
//! A node runs any number of named groups ([`RaftGroups::join`]); each has
//! its own openraft instance and its own redb file
//! (`<data dir>/raft/<group>.redb`). Members are node IDs: openraft's RPCs
//! travel as RAFT_REQUEST streams on the pooled connections
//! (`network.rs`), so a group needs no addresses of its own and works
//! through relays like everything else.
//!
//! Clients of a group (the facade's KV, election and lock API) may call any
//! member: writes, linearizable reads, membership changes and lease
//! keep-alives are forwarded to the leader over the same streams
//! (`RaftKind::Write` etc.), retried on a leader change until the request's
//! deadline. Stale reads and watches are served from the local state
//! machine.
//!
//! Leases: the state machine never reads a clock. The leader keeps every
//! lease's deadline in memory, restarts all of them at full TTL when it
//! takes office (as etcd does: a lease never expires early because the
//! leader changed) and proposes `LeaseRevoke` for the ones that ran out.
//!
//! Elections: openraft's own timer, and beside it a watchdog per group
//! (`watchdog.rs`) that campaigns on openraft 0.9's rule without its stale
//! smaller-log backoff (an extra 800 ms of failover, fixed upstream after
//! 0.9.25 by openraft PR #2087); `macula_raft_watchdog_elections_total`
//! counts the elections it started.

mod group;
mod network;
mod watchdog;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use macula_wire::{Message, NodeId, RaftMessage, RaftRequest, RaftResponse, RaftStatus};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

pub use crate::config::RaftLimits;
pub(crate) use group::Proposed;
pub use group::{
    check_name as validate_group_name, Group, GroupError, GroupOptions, LeaderState, LogProgress,
    ReadConsistency, MAX_GROUP_NAME_LEN,
};
pub(crate) use network::Reach;
use network::Transport;

use crate::framed::{FrameReader, FrameWriter};
use crate::metrics::register;
use crate::peer::Peer;
use crate::service::{Serves, Service, ServiceFuture};

/// Counters of the Raft service (`/metrics`: `macula_raft_*`).
#[derive(Debug, Default)]
pub struct RaftCounters {
    pub requests_sent_total: Counter,
    pub requests_failed_total: Counter,
    pub requests_served_total: Counter,
    pub requests_refused_total: Counter,
    pub forwarded_total: Counter,
    pub payload_too_large_total: Counter,
    /// Requests a member answered with "no such group" (not created or
    /// opened there yet), tried again after 20 ms, not 200.
    pub no_group_answers_total: Counter,
    pub leader_changes_total: Counter,
    pub leases_expired_total: Counter,
    pub groups_refused_total: Counter,
    /// Elections the watchdog started (`watchdog.rs`).
    pub watchdog_elections_total: Counter,
    /// Times a group's proposer found all `proposals_in_flight` slots
    /// taken and writes waited in its queue.
    pub proposer_full_total: Counter,
    /// Writes handed to openraft directly, without the proposer's task
    /// (nothing queued for it, a slot free: `Group::propose_committed`).
    pub proposed_directly_total: Counter,
    /// Writes answered at their commit, before their apply
    /// (`macula_raft::commit`).
    pub answered_at_commit_total: Counter,
}

impl RaftCounters {
    /// Registers every counter in the node's registry.
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_raft_requests_sent",
            "Raft requests (openraft RPCs and forwarded client requests) sent to other members.",
            self.requests_sent_total.clone(),
        );
        register(
            r,
            "macula_raft_requests_failed",
            "Raft requests sent that got no answer (unreachable member, stream error, timeout).",
            self.requests_failed_total.clone(),
        );
        register(
            r,
            "macula_raft_requests_served",
            "Raft requests from other members answered successfully.",
            self.requests_served_total.clone(),
        );
        register(
            r,
            "macula_raft_requests_refused",
            "Raft requests from other members refused (no such group, not the leader, malformed, failed).",
            self.requests_refused_total.clone(),
        );
        register(
            r,
            "macula_raft_forwarded",
            "Client requests (writes, linearizable reads, membership changes, keep-alives) forwarded to the leader.",
            self.forwarded_total.clone(),
        );
        register(
            r,
            "macula_raft_payload_too_large",
            "Log batches too large for a member's frame limit (sent again in smaller batches).",
            self.payload_too_large_total.clone(),
        );
        register(
            r,
            "macula_raft_no_group_answers",
            "Raft requests a member answered with no such group (not created or opened there yet): tried again after 20 ms, not the 200 ms back-off of an unreachable member.",
            self.no_group_answers_total.clone(),
        );
        register(
            r,
            "macula_raft_leader_changes",
            "Leader changes seen, all groups.",
            self.leader_changes_total.clone(),
        );
        register(
            r,
            "macula_raft_leases_expired",
            "Leases this node revoked as leader because their TTL ran out.",
            self.leases_expired_total.clone(),
        );
        register(
            r,
            "macula_raft_watchdog_elections",
            "Elections started by the election watchdog (no leader heard for openraft's election timeout, without openraft 0.9's stale smaller-log backoff), all groups.",
            self.watchdog_elections_total.clone(),
        );
        register(
            r,
            "macula_raft_proposer_full",
            "Times a group's proposer had raft_proposals_in_flight entries on their way and writes waited in its queue, all groups.",
            self.proposer_full_total.clone(),
        );
        register(
            r,
            "macula_raft_proposed_directly",
            "Writes handed to openraft directly by their writer, without the proposer task (nothing queued for it and an in-flight slot free), all groups.",
            self.proposed_directly_total.clone(),
        );
        register(
            r,
            "macula_raft_answered_at_commit",
            "Writes answered once committed and on the leader's disk, before the leader applied them (replicated stream publishes), all groups.",
            self.answered_at_commit_total.clone(),
        );
        register(
            r,
            "macula_raft_groups_refused",
            "Group joins refused at the raft_max_groups limit.",
            self.groups_refused_total.clone(),
        );
    }
}

/// Every Raft group of one node. Cheap to clone.
#[derive(Clone)]
pub struct RaftGroups(Arc<Inner>);

struct Inner {
    node_id: NodeId,
    /// Where group files live; `None` for a node without a data directory
    /// (it cannot join groups: a Raft log must survive a restart).
    dir: Option<PathBuf>,
    limits: RaftLimits,
    transport: Transport,
    groups: Mutex<HashMap<String, Group>>,
    joining: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RaftGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftGroups")
            .field("groups", &self.names())
            .finish()
    }
}

impl RaftGroups {
    pub(crate) fn new(
        node_id: NodeId,
        dir: Option<PathBuf>,
        limits: RaftLimits,
        max_frame: u32,
        reach: Arc<dyn Reach>,
    ) -> Self {
        RaftGroups(Arc::new(Inner {
            node_id,
            dir,
            limits,
            transport: Transport {
                reach,
                max_frame,
                counters: Arc::new(RaftCounters::default()),
                cut_off: Arc::default(),
            },
            groups: Mutex::new(HashMap::new()),
            joining: tokio::sync::Mutex::new(()),
        }))
    }

    /// Joins (or re-opens) the group `name`. With `options.members` set and
    /// a fresh log, the group is initialized with those voters (every
    /// founding member may do so with the same list: openraft makes the
    /// repeats no-ops). A member added later joins with no members and is
    /// added by the leader (`Group::add_learner`, `Group::add_voter`).
    /// Joining a group this node already runs returns the running one.
    pub async fn join(&self, name: &str, options: GroupOptions) -> Result<Group, GroupError> {
        // One join at a time: two of the same name would open one file twice.
        let _joining = self.0.joining.lock().await;
        if let Some(g) = self.0.groups.lock().get(name) {
            return Ok(g.clone());
        }
        group::check_name(name)?;
        let dir = self.0.dir.clone().ok_or(GroupError::NoDataDir)?;
        if self.0.groups.lock().len() >= self.0.limits.max_groups {
            self.0.transport.counters.groups_refused_total.inc();
            return Err(GroupError::TooManyGroups {
                max: self.0.limits.max_groups,
            });
        }
        let g = Group::open(
            self.0.node_id,
            name,
            &dir.join("raft"),
            &self.0.limits,
            self.0.transport.clone(),
            options,
        )
        .await?;
        self.0.groups.lock().insert(name.to_string(), g.clone());
        Ok(g)
    }

    /// The running group `name`.
    pub fn get(&self, name: &str) -> Option<Group> {
        self.0.groups.lock().get(name).cloned()
    }

    /// Names of the groups this node runs.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.groups.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Stops the group `name` here (its file stays; joining again resumes
    /// it). Membership is unchanged: remove the member first to leave.
    pub async fn leave(&self, name: &str) -> bool {
        let g = self.0.groups.lock().remove(name);
        match g {
            Some(g) => {
                g.shutdown().await;
                true
            }
            None => false,
        }
    }

    /// Stops the group `name` here and deletes its files (this node leaves
    /// it for good: remove it from the membership first, or remove the
    /// whole group everywhere). `false` if it did not run here.
    pub async fn destroy(&self, name: &str) -> Result<bool, GroupError> {
        let ran = self.leave(name).await;
        let Some(dir) = self.0.dir.as_ref().map(|d| d.join("raft")) else {
            return Ok(ran);
        };
        let file = dir.join(format!("{name}.redb"));
        let log = macula_raft::store::log_dir(&file);
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(GroupError::Store(format!("{}: {e}", file.display())))
            }
            _ => Ok(()),
        };
        gone(std::fs::remove_file(&file))?;
        gone(std::fs::remove_dir_all(&log))?;
        Ok(ran)
    }

    /// This node's ID (its member ID in every group).
    pub fn node_id(&self) -> NodeId {
        self.0.node_id
    }

    /// Stops every group (node shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<Group> = self.0.groups.lock().drain().map(|(_, g)| g).collect();
        for g in all {
            g.shutdown().await;
        }
    }

    /// Fault injection for tests of partitions: from now on this node's
    /// groups neither send Raft requests to the nodes in `peers` nor answer
    /// theirs (an empty list heals). Call it on both sides for a clean cut.
    #[doc(hidden)]
    pub fn partition(&self, peers: &[NodeId]) {
        if let Ok(mut set) = self.0.transport.cut_off.write() {
            *set = peers.iter().copied().collect();
        }
    }

    pub fn counters(&self) -> &Arc<RaftCounters> {
        &self.0.transport.counters
    }

    pub fn limits(&self) -> &RaftLimits {
        &self.0.limits
    }

    async fn serve(&self, peer: Peer, req: RaftRequest, mut w: FrameWriter) {
        let counters = &self.0.transport.counters;
        if self.0.transport.is_cut_off(&peer.node_id()) {
            // Partitioned (tests): no answer at all, as if lost.
            w.finish();
            return;
        }
        let resp = match self.get(&req.group) {
            None => RaftResponse {
                status: RaftStatus::NoGroup,
                body: Vec::new(),
                reason: format!("no group {:?} runs here", req.group),
            },
            Some(g) => g.serve(peer.node_id(), req.kind, &req.body).await,
        };
        if resp.status == RaftStatus::Ok {
            counters.requests_served_total.inc();
        } else {
            counters.requests_refused_total.inc();
            tracing::debug!(peer = %peer.node_id(), group = %req.group, kind = ?req.kind, status = ?resp.status, reason = %resp.reason, "raft request refused");
        }
        if let Err(e) = w.send(&Message::Raft(RaftMessage::Response(resp))).await {
            tracing::debug!(peer = %peer.node_id(), error = %e, "could not answer a raft request");
        }
        w.finish();
    }
}

/// Raft groups as a service: streams opened with RAFT_REQUEST.
impl Service for RaftGroups {
    fn name(&self) -> &'static str {
        "raft"
    }

    fn serves(&self) -> Serves {
        Serves {
            streams: &[macula_wire::MessageType::RaftRequest],
            ..Serves::default()
        }
    }

    fn on_stream(
        &self,
        peer: Peer,
        first: Message,
        _reader: FrameReader,
        writer: FrameWriter,
    ) -> ServiceFuture {
        let groups = self.clone();
        Box::pin(async move {
            if peer.is_client() {
                // Lightweight clients are not members of anything.
                return;
            }
            if let Message::Raft(RaftMessage::Request(req)) = first {
                groups.serve(peer, req, writer).await;
            }
        })
    }
}
