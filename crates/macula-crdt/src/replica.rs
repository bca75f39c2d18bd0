//! [`Replica`]: one named CRDT on one node and the protocol that keeps it
//! in step with the other replicas of that name. Pure, in the shape of the
//! other cores: `update` and `handle_message` in, `poll_transmit` and `tick`
//! out, time as an argument.
//!
//! # Protocol
//! Three [`Message`]s, all for one name, all from one node:
//! - `Delta`: local updates, joined into one delta (a *delta group*) until
//!   the caller polls ([`Replica::poll_transmit`]); sent to every replica.
//!   Also the answer to a digest: exactly what its sender lacks.
//! - `Digest`: what the sender has seen. Sent every
//!   [`ReplicaConfig::digest_interval`] ([`Replica::tick`]) to a few known
//!   peers in turn ([`ReplicaConfig::digest_fanout`]), or to every replica
//!   while none is known. A receiver
//!   answers the sender with the delta it lacks (a `State` when the digest
//!   is the empty state's), and with its own digest when the sender has
//!   seen something it has not, which the sender answers in turn.
//! - `State`: a full state; merged like a delta.
//!
//! Deltas may be lost, duplicated or reordered: merging is idempotent and
//! order-free, and the digest exchange repairs losses. The outgoing delta
//! group is bounded ([`ReplicaConfig::max_pending`] entries): when an update
//! would overflow it, the group is dropped, counted, and replaced by a
//! digest broadcast, which makes every replica that lacks something answer
//! with its digest and so receive exactly what it lacks; nothing is lost
//! silently.
//!
//! Received deltas and states pass two checks: their latest timestamp must
//! be within the clock's drift bound ([`HlcError`]), and the merge must
//! stay within the state's entry limit ([`Crdt::try_merge`]). A refused one
//! is counted and dropped; the first comes back by anti-entropy once the
//! local clock has caught up.
//!
//! [`HlcError`]: crate::HlcError

use std::collections::BTreeMap;

use macula_wire::time::Millis;
use macula_wire::NodeId;
use serde::{Deserialize, Serialize};

use crate::{Crdt, CrdtError, Hlc, HlcConfig, Timestamp};

/// One message of the replication protocol for the CRDT `C`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "C: Crdt", deserialize = "C: Crdt"))]
pub enum Message<C: Crdt> {
    /// Updates the receiver may lack.
    Delta {
        /// The CRDT's name.
        name: String,
        /// The sending node.
        from: NodeId,
        /// Merged into the receiver's state.
        delta: C,
    },
    /// What the sender has seen.
    Digest {
        /// The CRDT's name.
        name: String,
        /// The sending node.
        from: NodeId,
        /// The sender's digest.
        digest: C::Digest,
    },
    /// The sender's whole state.
    State {
        /// The CRDT's name.
        name: String,
        /// The sending node.
        from: NodeId,
        /// Merged into the receiver's state.
        state: C,
    },
}

/// Why a message could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Serialisation failed.
    #[error("cannot encode CRDT message: {0}")]
    Encode(String),
    /// The bytes are not a message of this CRDT type.
    #[error("cannot decode CRDT message: {0}")]
    Decode(String),
}

impl<C: Crdt> Message<C> {
    /// The CRDT's name.
    pub fn name(&self) -> &str {
        match self {
            Message::Delta { name, .. }
            | Message::Digest { name, .. }
            | Message::State { name, .. } => name,
        }
    }

    /// The sending node.
    pub fn from(&self) -> NodeId {
        match self {
            Message::Delta { from, .. }
            | Message::Digest { from, .. }
            | Message::State { from, .. } => *from,
        }
    }

    /// MessagePack with named fields (the encoding of `macula-wire`).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        rmp_serde::to_vec_named(self).map_err(|e| CodecError::Encode(e.to_string()))
    }

    /// The inverse of [`Message::encode`]; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Message<C>, CodecError> {
        rmp_serde::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
    }
}

/// Where an outgoing message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every replica of the name (the CRDT's topic).
    All,
    /// One replica (an answer to its digest).
    Node(NodeId),
}

/// An outgoing message and where it goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Out<C: Crdt> {
    /// Its destination.
    pub to: Target,
    /// The message.
    pub msg: Message<C>,
}

/// A replica's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaConfig {
    /// How often [`Replica::tick`] sends a digest.
    pub digest_interval: Millis,
    /// Peers each tick's digest goes to, one message each, taken in turn
    /// from the replicas this one knows (the members and every sender
    /// seen); `None`, or no peer known yet, broadcasts it instead. A
    /// broadcast costs every replica a digest from every other per
    /// interval (quadratic); a fanout of `k` costs `k` per replica and
    /// still reaches each peer within `peers / k` intervals, while
    /// the digests a replica receives repair it as fast.
    pub digest_fanout: Option<usize>,
    /// Most peers remembered for the fanout; senders past it are not
    /// added.
    pub max_peers: usize,
    /// Entries the outgoing delta group may hold before it overflows into a
    /// digest broadcast.
    pub max_pending: usize,
    /// The hybrid logical clock's drift bound.
    pub hlc: HlcConfig,
    /// Tombstones older than this, acknowledged by every member, are
    /// dropped on ticks; `None` never collects.
    pub gc_horizon: Option<Millis>,
    /// Every replica of the name, this one included or not: tombstones are
    /// collected only once each has acknowledged them. Empty: never collect.
    pub members: Vec<NodeId>,
}

impl Default for ReplicaConfig {
    /// A digest every second to 3 peers in turn (4,096 remembered), 1,024
    /// pending entries, the clock's default
    /// drift, a one-hour tombstone horizon, no members (so no collection).
    fn default() -> ReplicaConfig {
        ReplicaConfig {
            digest_interval: Millis::from_secs(1),
            digest_fanout: Some(3),
            max_peers: 4096,
            max_pending: 1024,
            hlc: HlcConfig::default(),
            gc_horizon: Some(Millis::from_secs(3600)),
            members: Vec::new(),
        }
    }
}

/// What a replica has done, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Local updates applied.
    pub updates: u64,
    /// Local updates refused (limits, overflow).
    pub updates_refused: u64,
    /// `Delta` messages sent.
    pub deltas_sent: u64,
    /// `Digest` messages sent.
    pub digests_sent: u64,
    /// `State` messages sent.
    pub states_sent: u64,
    /// Deltas and states merged.
    pub merged: u64,
    /// Of those, merges that taught this replica something.
    pub merged_new: u64,
    /// Digests received.
    pub digests_received: u64,
    /// Messages for another name, or from this node.
    pub ignored: u64,
    /// Deltas or states refused: a timestamp too far ahead.
    pub refused_drift: u64,
    /// Deltas or states refused: the merge would pass the entry limit.
    pub refused_limit: u64,
    /// Times the outgoing delta group overflowed into a digest broadcast.
    pub overflows: u64,
    /// Tombstones collected.
    pub collected: u64,
}

/// One named CRDT on one node, with its replication protocol.
#[derive(Clone, Debug)]
pub struct Replica<C: Crdt> {
    name: String,
    node: NodeId,
    state: C,
    hlc: Hlc,
    config: ReplicaConfig,
    pending: Option<C>,
    overflowed: bool,
    next_tick: Millis,
    /// The latest digest of each member (for tombstone collection).
    acked: BTreeMap<NodeId, C::Digest>,
    /// Replicas known for the digest fanout, and where the turn is.
    peers: Vec<NodeId>,
    next_peer: usize,
    version: u64,
    stats: ReplicaStats,
}

impl<C: Crdt> Replica<C> {
    /// Replica `node` of the CRDT `name`, starting from `state` (empty, or
    /// what was persisted) at wall reading `now`; its first digest goes out
    /// one interval later.
    pub fn new(
        name: impl Into<String>,
        node: NodeId,
        state: C,
        config: ReplicaConfig,
        now: Millis,
    ) -> Replica<C> {
        let mut r = Replica {
            name: name.into(),
            node,
            state,
            hlc: Hlc::new(node, config.hlc),
            next_tick: now.saturating_add(config.digest_interval),
            config,
            pending: None,
            overflowed: false,
            acked: BTreeMap::new(),
            peers: Vec::new(),
            next_peer: 0,
            version: 0,
            stats: ReplicaStats::default(),
        };
        for m in r.config.members.clone() {
            r.learn(m);
        }
        r
    }

    /// The CRDT's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The current state.
    pub fn state(&self) -> &C {
        &self.state
    }

    /// Counts what this replica has done.
    pub fn stats(&self) -> ReplicaStats {
        self.stats
    }

    /// Bumped whenever the state learns something (a local update or a
    /// merge that changed its digest): a change stream polls it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The clock local updates are stamped with.
    pub fn hlc(&self) -> &Hlc {
        &self.hlc
    }

    /// A local update at wall reading `now`: `op` gets the state and a fresh
    /// timestamp (its node is this node), changes the state and returns the
    /// delta (what every operation of the CRDT types does), for example
    /// `replica.update(now, |s, ts| s.add(ts.node, x))`. The delta joins the
    /// outgoing group.
    pub fn update<F>(&mut self, now: Millis, op: F) -> Result<(), CrdtError>
    where
        F: FnOnce(&mut C, Timestamp) -> Result<C, CrdtError>,
    {
        let ts = self.hlc.now(now);
        let delta = match op(&mut self.state, ts) {
            Ok(d) => d,
            Err(e) => {
                self.stats.updates_refused += 1;
                return Err(e);
            }
        };
        self.stats.updates += 1;
        if delta == C::default() {
            return Ok(());
        }
        self.version += 1;
        if self.overflowed {
            return Ok(());
        }
        let pending = self.pending.get_or_insert_with(C::default);
        if pending.size().saturating_add(delta.size()) > self.config.max_pending {
            tracing::debug!(name = %self.name, "outgoing delta group overflowed; digest sync");
            self.pending = None;
            self.overflowed = true;
            self.stats.overflows += 1;
        } else {
            pending.merge(&delta);
        }
        Ok(())
    }

    /// The next message to send, if any: the outgoing delta group, or the
    /// digest that replaces it after an overflow.
    pub fn poll_transmit(&mut self) -> Option<Out<C>> {
        if self.overflowed {
            self.overflowed = false;
            return Some(self.digest_to(Target::All));
        }
        let delta = self.pending.take()?;
        self.stats.deltas_sent += 1;
        Some(Out {
            to: Target::All,
            msg: Message::Delta {
                name: self.name.clone(),
                from: self.node,
                delta,
            },
        })
    }

    /// When [`Replica::tick`] next has something to do.
    pub fn poll_timeout(&self) -> Millis {
        self.next_tick
    }

    /// Periodic work at wall reading `now`: when due, collects tombstones
    /// (see [`ReplicaConfig::gc_horizon`]) and sends this replica's digest
    /// (see [`ReplicaConfig::digest_fanout`]).
    pub fn tick(&mut self, now: Millis) -> Vec<Out<C>> {
        if now < self.next_tick {
            return Vec::new();
        }
        self.next_tick = now.saturating_add(self.config.digest_interval);
        self.collect_garbage(now);
        let k = match self.config.digest_fanout {
            Some(k) if !self.peers.is_empty() => k.min(self.peers.len()),
            _ => return vec![self.digest_to(Target::All)],
        };
        (0..k)
            .map(|_| {
                let peer = self.peers[self.next_peer % self.peers.len()];
                self.next_peer = (self.next_peer + 1) % self.peers.len();
                self.digest_to(Target::Node(peer))
            })
            .collect()
    }

    /// The replicas known for the digest fanout, in node order.
    pub fn peers(&self) -> &[NodeId] {
        &self.peers
    }

    /// Remembers `peer` for the fanout (up to [`ReplicaConfig::max_peers`]).
    fn learn(&mut self, peer: NodeId) {
        if peer == self.node || self.peers.len() >= self.config.max_peers {
            return;
        }
        if let Err(at) = self.peers.binary_search(&peer) {
            self.peers.insert(at, peer);
        }
    }

    /// Takes in a message at wall reading `now`; returns the answers.
    pub fn handle_message(&mut self, now: Millis, msg: Message<C>) -> Vec<Out<C>> {
        if msg.name() != self.name || msg.from() == self.node {
            self.stats.ignored += 1;
            return Vec::new();
        }
        self.learn(msg.from());
        match msg {
            Message::Delta { from, delta, .. } => {
                self.merge_remote(now, from, &delta);
                Vec::new()
            }
            Message::State { from, state, .. } => {
                self.merge_remote(now, from, &state);
                Vec::new()
            }
            Message::Digest { from, digest, .. } => self.on_digest(from, digest),
        }
    }

    fn on_digest(&mut self, from: NodeId, digest: C::Digest) -> Vec<Out<C>> {
        self.stats.digests_received += 1;
        let mut out = Vec::new();
        if let Some(delta) = self.state.delta_since(&digest) {
            let msg = if digest == C::default().digest() {
                self.stats.states_sent += 1;
                Message::State {
                    name: self.name.clone(),
                    from: self.node,
                    state: self.state.clone(),
                }
            } else {
                self.stats.deltas_sent += 1;
                Message::Delta {
                    name: self.name.clone(),
                    from: self.node,
                    delta,
                }
            };
            out.push(Out {
                to: Target::Node(from),
                msg,
            });
        }
        if self.state.lacks(&digest) {
            out.push(self.digest_to(Target::Node(from)));
        }
        if self.config.members.contains(&from) {
            self.acked.insert(from, digest);
        }
        out
    }

    fn merge_remote(&mut self, now: Millis, from: NodeId, delta: &C) {
        if let Some(ts) = delta.latest() {
            if let Err(e) = self.hlc.observe(now, ts) {
                tracing::warn!(name = %self.name, from = %from.short(), error = %e, "CRDT update refused");
                self.stats.refused_drift += 1;
                return;
            }
        }
        let before = self.state.digest();
        if let Err(e) = self.state.try_merge(delta) {
            tracing::warn!(name = %self.name, from = %from.short(), error = %e, "CRDT update refused");
            self.stats.refused_limit += 1;
            return;
        }
        self.stats.merged += 1;
        if self.state.digest() != before {
            self.stats.merged_new += 1;
            self.version += 1;
        }
    }

    fn collect_garbage(&mut self, now: Millis) {
        let Some(horizon) = self.config.gc_horizon else {
            return;
        };
        let members = &self.config.members;
        if members.is_empty() {
            return;
        }
        let own = self.state.digest();
        let mut acked = Vec::with_capacity(members.len() + 1);
        acked.push(&own);
        for m in members {
            if *m == self.node {
                continue;
            }
            match self.acked.get(m) {
                Some(d) => acked.push(d),
                None => return,
            }
        }
        let n = self.state.collect_garbage(now, horizon, &acked);
        if n > 0 {
            tracing::debug!(name = %self.name, collected = n, "tombstones collected");
            self.stats.collected += n as u64;
        }
    }

    fn digest_to(&mut self, to: Target) -> Out<C> {
        self.stats.digests_sent += 1;
        Out {
            to,
            msg: Message::Digest {
                name: self.name.clone(),
                from: self.node,
                digest: self.state.digest(),
            },
        }
    }
}
