//! The pub/sub state machine of one node: [`PubSubCore`].
//!
//! Inputs are method calls (`subscribe`, `publish_*`, `handle_*`), each
//! taking `now`; outputs are deliveries returned to the caller (local
//! subscribers' events, to push after releasing whatever lock guards the
//! core) and [`Action`]s drained with [`PubSubCore::poll_action`]. It must
//! not do I/O, read a clock, spawn, block or panic on anything a peer
//! sends. See the crate docs for the driving order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use macula_wire::{Millis, NodeId, Publish};

use crate::batch::{batch_budget, fits, Encoded, Mark, Origin, OutMsg};
use crate::counters::Counters;
use crate::dedup::{Observed, SeqTracker};
use crate::event::{check_headers, Event, Overflow, PubSubError, PublishOptions, TopicName};
use crate::interest::{
    InterestLimits, InterestPut, InterestRecord, Mesh, MeshAction, Patience, PutCtx, RecordForm,
    Route, RouteStep,
};
use crate::local::{FeedId, Local, SubId, Target};
use crate::loss::LossReport;
use crate::outbound::{Enqueued, OutLimits, Outbound, PeerRef, Stall, Take, Wake};
use crate::proof::Signer;
use crate::topic::{Pattern, Topic};
use crate::Limits;

/// Which of the three behaviours a node's pub/sub has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// No mesh: in-process delivery only.
    Local,
    /// A full node: interest records in the DHT, routes to interested
    /// nodes, and the gateway of attached clients (their feeds and their
    /// publishes into the mesh).
    Node,
    /// A lightweight client: interest is registered by its gateway and
    /// every publish goes to the gateway.
    Client,
}

/// How to build a core.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: NodeId,
    /// This run's epoch: must grow across restarts of the node, so that
    /// receivers tell a restart (sequence numbers from 1 again) from a
    /// replay.
    pub epoch: u64,
    pub realm: String,
    pub role: Role,
    pub limits: Limits,
    /// Largest payload accepted (this node's frame limit less headroom).
    pub max_payload: usize,
    /// Frame limit assumed for a peer whose HELLO is not known yet.
    pub default_frame_limit: u32,
    /// The stall timeout and other timers of the outbound side; its count
    /// and byte limits come from `limits`.
    pub out: OutLimits,
    pub interest: InterestLimits,
    /// Seals (signs) every batch of this node's own messages (a client,
    /// whose messages its gateway forwards); `None`: unsigned.
    pub signer: Option<Arc<Signer>>,
    /// Drop forwarded batches (publisher not the sender) whose publisher a
    /// seal does not prove. On by default; a client receiving events
    /// through its gateway accepts unsealed ones as asserted.
    pub require_proof: bool,
}

impl Config {
    /// A configuration with every default, for `node_id` in `realm`.
    pub fn new(node_id: NodeId, epoch: u64, realm: &str, role: Role, max_frame_size: u32) -> Self {
        Config {
            node_id,
            epoch,
            realm: realm.to_string(),
            role,
            limits: Limits::default(),
            max_payload: (max_frame_size as usize).saturating_sub(crate::event::FRAME_HEADROOM),
            default_frame_limit: max_frame_size,
            out: OutLimits::default(),
            interest: InterestLimits::default(),
            signer: None,
            require_proof: true,
        }
    }
}

/// Something the driver must do.
#[derive(Debug)]
pub enum Action<W> {
    /// Start the sender of `node`'s queue (its first message is queued):
    /// it drains the queue through `poll_transmit(peer, ..)` and waits on
    /// `sender` for wakes.
    Start {
        peer: PeerRef,
        node: NodeId,
        sender: W,
    },
    /// Wake this sender: its queue went from empty to not.
    Wake(W),
    /// Look up the interest records under `name` (DHT key `key`); report
    /// with `handle_interest_found`.
    LookupInterest { name: String, key: NodeId },
    /// Put (or withdraw) this node's interest record; report with
    /// `handle_interest_put`.
    PutInterest(InterestPut),
}

/// What a subscription change needs from the mesh before it counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Nothing (no mesh, or nothing changed for it).
    None,
    /// A full node: wait until `interest_outcome(name, changes)` says the
    /// record carrying it is in the DHT.
    Record { name: String, changes: u64 },
    /// A client: tell the gateway (`on`: subscribe, else unsubscribe), and
    /// wait for its answer.
    Upstream { pattern: String, on: bool },
}

/// A new subscription.
#[derive(Debug)]
pub struct Subscribed {
    pub id: SubId,
    pub pattern: Pattern,
    pub interest: Interest,
}

/// What one publish did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    /// Copies queued to other nodes.
    pub queued: u32,
    /// Copies dropped (queue full, no queue); counted.
    pub dropped: u32,
    /// Older messages dropped to make room for this one
    /// ([`crate::Overflow::DropOldest`]); counted.
    pub evicted: u64,
}

/// Why the connection to a peer ended (from the connection driver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerDown {
    /// Closed normally (idle, replaced by another connection): the node is
    /// presumed alive and is dialed again when needed.
    Closed,
    /// The node left (said goodbye) or stopped answering (transport
    /// timeout): its interest is set aside until it comes back.
    Left,
}

/// How full the core's bounded tables are (see [`PubSubCore::sizes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sizes {
    pub subscriptions: usize,
    pub feeds: usize,
    pub queues: usize,
    pub interest_entries: usize,
    pub routes: usize,
    pub remembered_puts: usize,
}

/// One batch ready to encode (see [`PubSubCore::poll_transmit`]).
#[derive(Clone, Debug)]
pub struct Batch {
    /// Messages taken.
    pub n: usize,
    pub frame_limit: u32,
    pub batch_bytes: usize,
    pub publisher: NodeId,
    pub epoch: u64,
    /// What the receiver missed: written as PUBLISH_DROPPED frames before
    /// the messages. Hand it back (`handle_send_failed`,
    /// `handle_cut_off`) when the write fails.
    pub report: Option<LossReport>,
    /// Messages taken but removed from `msgs` before encoding because the
    /// receiver may not have them (the realm's permissions): neither sent
    /// nor counted lost.
    pub refused: usize,
    /// Seals this node's own messages (see `Config::signer`).
    pub signer: Option<Arc<Signer>>,
}

impl Batch {
    /// Encodes the loss report, then `msgs` (what was taken), into `out`:
    /// one encode per batch, outside any lock.
    pub fn encode(&self, out: &mut Vec<u8>, msgs: &[OutMsg]) -> Encoded {
        self.encode_marked(out, msgs, &mut Vec::new())
    }

    /// [`Self::encode`], appending to `marks` where each frame ends (the
    /// report's frames first, as one mark): `Mark::messages` counts what a
    /// receiver counts on the stream (see [`Self::carried`]). A write cut
    /// off part-way uses them for [`PubSubCore::handle_cut_off`].
    pub fn encode_marked(
        &self,
        out: &mut Vec<u8>,
        msgs: &[OutMsg],
        marks: &mut Vec<Mark>,
    ) -> Encoded {
        let mut done = Encoded::default();
        let mut base = 0;
        if let Some(r) = &self.report {
            done.frames += r.encode(out, self.publisher, self.epoch, self.frame_limit);
            base = r.dropped();
            marks.push(Mark {
                end: out.len(),
                consumed: 0,
                messages: base,
            });
        }
        let first = marks.len();
        done += crate::batch::encode_batches_marked(
            out,
            msgs,
            &self.publisher,
            self.epoch,
            self.frame_limit,
            self.batch_bytes,
            Some(marks),
            self.signer.as_deref(),
        );
        for m in &mut marks[first..] {
            m.messages += base;
        }
        done
    }

    /// What this batch, written whole, adds to the count a receiver keeps
    /// of its data stream: the messages in its frames and the dropped
    /// messages its report names (see `BatchReceiver::messages`).
    pub fn carried(&self, encoded: &Encoded) -> u64 {
        encoded.messages as u64 + self.report.as_ref().map_or(0, LossReport::dropped)
    }

    /// Takes what `more` (a later poll of the same sender) adds.
    pub fn merge(&mut self, more: Batch) {
        self.n += more.n;
        self.refused += more.refused;
        if let Some(r) = more.report {
            self.report.get_or_insert_with(LossReport::default).merge(r);
        }
    }
}

/// What a sender must do next.
#[derive(Clone, Debug)]
pub enum Transmit {
    Batch(Batch),
    /// See [`Take::Finish`].
    Finish,
    /// See [`Take::Empty`].
    Empty,
    /// See [`Take::Retired`].
    Retired,
}

pub(crate) struct ClientState {
    gateway: Option<NodeId>,
}

pub(crate) enum RoleState {
    Local,
    Node(Box<Mesh>),
    Client(ClientState),
}

/// Local deliveries of one publish: (sink, event) pairs to push once the
/// core is released.
pub type Deliveries<S> = Vec<(S, Event)>;

/// One node's pub/sub state machine. `S` is the driver's handle of a local
/// subscription's queue; `W` its handle to wake one peer's sender (created
/// here with `Default`, never used by the core).
pub struct PubSubCore<S, W> {
    pub(crate) node_id: NodeId,
    pub(crate) epoch: u64,
    next_seq: u64,
    pub(crate) max_payload: usize,
    pub(crate) limits: Limits,
    pub(crate) frame_limit: u32,
    pub(crate) local: Local<S>,
    pub(crate) out: Outbound<W>,
    pub(crate) seen: SeqTracker<NodeId>,
    pub(crate) role: RoleState,
    actions: VecDeque<Action<W>>,
    mesh_actions: VecDeque<MeshAction>,
    /// Bumped on every subscription added or removed (feeds included).
    changes: u64,
    pub(crate) counters: Arc<Counters>,
    /// Per peer whose data stream was reset: (messages read on it, messages
    /// its sender says it wrote), until both are known.
    pub(crate) in_flight: HashMap<NodeId, (Option<u64>, Option<u64>)>,
    pub(crate) signer: Option<Arc<Signer>>,
    pub(crate) require_proof: bool,
}

impl<S: Clone, W: Clone + Default> PubSubCore<S, W> {
    pub fn new(config: Config) -> Self {
        let limits = config.limits;
        let out = OutLimits {
            queue_capacity: limits.peer_queue_capacity,
            queue_bytes: limits.peer_queue_bytes,
            max_peers: limits.max_outbound_peers,
            ..config.out
        };
        let role = match config.role {
            Role::Local => RoleState::Local,
            Role::Node => RoleState::Node(Box::new(Mesh::new(
                config.node_id,
                config.realm,
                config.interest,
                limits,
            ))),
            Role::Client => RoleState::Client(ClientState { gateway: None }),
        };
        PubSubCore {
            node_id: config.node_id,
            epoch: config.epoch,
            next_seq: 1,
            max_payload: config.max_payload,
            limits,
            frame_limit: config.default_frame_limit,
            local: Local::new(&limits),
            out: Outbound::new(out),
            seen: SeqTracker::with_limits(&limits),
            role,
            actions: VecDeque::new(),
            mesh_actions: VecDeque::new(),
            changes: 0,
            counters: Arc::new(Counters::default()),
            in_flight: HashMap::new(),
            signer: config.signer,
            require_proof: config.require_proof,
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Largest payload a publish accepts.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    pub fn role(&self) -> Role {
        match self.role {
            RoleState::Local => Role::Local,
            RoleState::Node(_) => Role::Node,
            RoleState::Client(_) => Role::Client,
        }
    }

    /// The next thing for the driver to do, oldest first.
    pub fn poll_action(&mut self) -> Option<Action<W>> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        Some(match self.mesh_actions.pop_front()? {
            MeshAction::Lookup { name, key } => Action::LookupInterest { name, key },
            MeshAction::Put(p) => Action::PutInterest(p),
        })
    }

    /// Whether `poll_action` has something (cheap; for the hot path).
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty() || !self.mesh_actions.is_empty()
    }

    // ----- subscriptions -----------------------------------------------

    fn parse_pattern(&self, pattern: &str) -> Result<Pattern, PubSubError> {
        Pattern::with_limits(pattern, &self.limits).map_err(|source| PubSubError::InvalidPattern {
            pattern: pattern.to_string(),
            source,
        })
    }

    pub(crate) fn add_sub(
        &mut self,
        pattern: &Pattern,
        target: Target<S>,
    ) -> Result<SubId, PubSubError> {
        let id = self
            .local
            .add(pattern, target)
            .ok_or(PubSubError::TooManySubscriptions {
                max: self.local.max_subscriptions,
            })?;
        self.changes += 1;
        self.count_subs();
        Ok(id)
    }

    fn count_subs(&self) {
        self.counters
            .subscriptions
            .set(self.local.subs.len() as u64);
    }

    /// The record change a subscription change under `pattern` needs.
    pub(crate) fn interest_changed(&mut self, pattern: &Pattern, on: bool) -> Interest {
        match &mut self.role {
            RoleState::Local => Interest::None,
            RoleState::Node(mesh) => {
                let segment = crate::rendezvous::interest_segment(pattern);
                let ctx = PutCtx {
                    changes: self.changes,
                    local: &self.local,
                    actions: &mut self.mesh_actions,
                    counters: &self.counters,
                };
                mesh.changed(segment, ctx);
                Interest::Record {
                    name: crate::rendezvous::segment_name(mesh.realm(), segment),
                    changes: self.changes,
                }
            }
            RoleState::Client(_) => {
                // The gateway holds one subscription per pattern: tell it
                // about the first and the last holder only.
                let holders = self.local.holders(pattern);
                if (on && holders == 1) || (!on && holders == 0) {
                    Interest::Upstream {
                        pattern: pattern.as_str().to_string(),
                        on,
                    }
                } else {
                    Interest::None
                }
            }
        }
    }

    /// Subscribes `sink` to `pattern` (`*` one segment, `**` any number).
    /// Events published after this returns are delivered locally; see
    /// [`Subscribed::interest`] for what the mesh must learn first.
    pub fn subscribe(&mut self, pattern: &str, sink: S) -> Result<Subscribed, PubSubError> {
        let parsed = self.parse_pattern(pattern)?;
        let id = self.add_sub(&parsed, Target::Local(sink))?;
        let interest = self.interest_changed(&parsed, true);
        Ok(Subscribed {
            id,
            pattern: parsed,
            interest,
        })
    }

    /// Removes subscription `id` (`None` if unknown).
    pub fn unsubscribe(&mut self, id: SubId) -> Option<Interest> {
        let p = self.local.remove(id)?;
        self.changes += 1;
        self.count_subs();
        Some(self.interest_changed(&p, false))
    }

    /// Whether the record carrying subscription change `changes` under
    /// `name` is in the DHT: `Some(Ok)` yes, `Some(Err)` its put failed,
    /// `None` not yet.
    pub fn interest_outcome(&self, name: &str, changes: u64) -> Option<Result<(), String>> {
        match &self.role {
            RoleState::Node(mesh) => mesh.outcome(name, changes),
            _ => Some(Ok(())),
        }
    }

    /// A put of this node's record finished. Returns a change of the
    /// record's form worth logging.
    pub fn handle_interest_put(
        &mut self,
        name: &str,
        changes: u64,
        result: Result<(), String>,
    ) -> Option<RecordForm> {
        let RoleState::Node(mesh) = &mut self.role else {
            return None;
        };
        let ctx = PutCtx {
            changes: self.changes,
            local: &self.local,
            actions: &mut self.mesh_actions,
            counters: &self.counters,
        };
        mesh.handle_put(name, changes, result, ctx)
    }

    /// Graceful shutdown: withdraw every interest record (puts are emitted
    /// now or after the ones under way); later changes touch no record.
    pub fn leave(&mut self) {
        if let RoleState::Node(mesh) = &mut self.role {
            mesh.leave(PutCtx {
                changes: self.changes,
                local: &self.local,
                actions: &mut self.mesh_actions,
                counters: &self.counters,
            });
        }
    }

    /// No interest put is running or due.
    pub fn interest_settled(&self) -> bool {
        match &self.role {
            RoleState::Node(mesh) => mesh.settled(),
            _ => true,
        }
    }

    /// Rendezvous names under which this node has a live record.
    pub fn live_interest_names(&self) -> Vec<String> {
        match &self.role {
            RoleState::Node(mesh) => mesh.live_names(),
            _ => Vec::new(),
        }
    }

    /// Patterns currently subscribed (client feeds included), with how
    /// many subscriptions each.
    pub fn subscriptions(&self) -> Vec<(String, usize)> {
        self.local.summary()
    }

    /// Live subscriptions, client feeds' patterns included.
    pub fn n_subscriptions(&self) -> usize {
        self.local.subs.len()
    }

    // ----- publishing --------------------------------------------------

    /// Checks payload and options of a publish.
    pub fn check(&self, payload: &Bytes, opts: &PublishOptions) -> Result<(), PubSubError> {
        if payload.len() > self.max_payload {
            return Err(PubSubError::PayloadTooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        check_headers(&opts.headers)
    }

    fn parse_topic(&self, topic: &str) -> Result<Topic, PubSubError> {
        Topic::with_limits(topic, &self.limits).map_err(|source| PubSubError::InvalidTopic {
            topic: topic.to_string(),
            source,
        })
    }

    /// How many of this node's subscriptions (and attached clients' feeds)
    /// match `topic` now.
    pub fn local_matches(&mut self, topic: &str) -> Result<usize, PubSubError> {
        let parsed = self.parse_topic(topic)?;
        Ok(self.local.matches(&parsed).len())
    }

    /// Publishes to this node's own subscriptions (and attached clients)
    /// only.
    pub fn publish_local(
        &mut self,
        topic: &str,
        payload: Bytes,
        opts: PublishOptions,
        now: Millis,
        out: &mut Deliveries<S>,
    ) -> Result<Published, PubSubError> {
        let parsed = self.parse_topic(topic)?;
        self.check(&payload, &opts)?;
        let name = TopicName::from(parsed.as_str());
        self.send(&parsed, &name, payload, opts, &[], now, out)
    }

    /// Where `topic`'s messages go (a full node). See [`RouteStep`]; other
    /// roles get an empty route.
    pub fn route(
        &mut self,
        topic: &str,
        now: Millis,
        patience: Patience,
    ) -> Result<RouteStep, PubSubError> {
        match &mut self.role {
            RoleState::Node(mesh) => mesh.route(
                topic,
                now,
                patience,
                &mut self.out,
                self.frame_limit,
                &mut self.mesh_actions,
            ),
            _ => {
                let parsed = self.parse_topic(topic)?;
                Ok(RouteStep::Ready(Arc::new(Route {
                    until: now,
                    name: TopicName::from(parsed.as_str()),
                    topic: parsed,
                    targets: Vec::new(),
                })))
            }
        }
    }

    /// The cached route of `topic`, if fresh and all its queues alive (the
    /// hot path of a full node's publish: one lock, no lookup).
    pub fn cached_route(&mut self, topic: &str, now: Millis) -> Option<Arc<Route>> {
        match &mut self.role {
            RoleState::Node(mesh) => mesh.cached_route(topic, now, &self.out),
            _ => None,
        }
    }

    /// Publishes along `route` (from [`Self::route`]): local delivery plus
    /// one copy per interested node.
    pub fn publish_routed(
        &mut self,
        route: &Route,
        payload: Bytes,
        opts: PublishOptions,
        now: Millis,
        out: &mut Deliveries<S>,
    ) -> Result<Published, PubSubError> {
        self.check(&payload, &opts)?;
        self.send(
            &route.topic,
            &route.name,
            payload,
            opts,
            &route.targets,
            now,
            out,
        )
    }

    /// A client: the gateway is now `gateway` (`None`: detached).
    pub fn set_gateway(&mut self, gateway: Option<NodeId>) {
        if let RoleState::Client(c) = &mut self.role {
            c.gateway = gateway;
        }
    }

    /// A client: publishes through the gateway (local subscriptions get it
    /// at once, the gateway routes it into the mesh).
    pub fn publish_upstream(
        &mut self,
        topic: &str,
        payload: Bytes,
        opts: PublishOptions,
        now: Millis,
        out: &mut Deliveries<S>,
    ) -> Result<Published, PubSubError> {
        let parsed = self.parse_topic(topic)?;
        self.check(&payload, &opts)?;
        let gateway = match &self.role {
            RoleState::Client(c) => c.gateway.ok_or(PubSubError::Detached)?,
            _ => return Err(PubSubError::Detached),
        };
        let q = self.out.queue_for(gateway, self.frame_limit, now);
        let name = TopicName::from(parsed.as_str());
        self.send(&parsed, &name, payload, opts, &[(gateway, q)], now, out)
    }

    /// The first interested node of `route` whose queue cannot take a
    /// message of `len` payload bytes now: under [`crate::Overflow::Block`]
    /// the driver waits (outside the lock) until a sender takes its queue,
    /// or the node is cut off, then publishes.
    pub fn blocked(&self, route: &Route, len: usize) -> Option<NodeId> {
        self.first_full(&route.targets, len).map(|(node, _)| node)
    }

    /// A client: the gateway's queue cannot take a message of `len` payload
    /// bytes now (see [`Self::blocked`]).
    pub fn blocked_upstream(&self, len: usize) -> Option<NodeId> {
        let RoleState::Client(c) = &self.role else {
            return None;
        };
        let gateway = c.gateway?;
        let q = self.out.get(&gateway)?;
        self.out.full(q, len).map(|_| gateway)
    }

    fn first_full(
        &self,
        targets: &[(NodeId, Option<PeerRef>)],
        len: usize,
    ) -> Option<(NodeId, PeerRef)> {
        targets.iter().find_map(|(node, q)| {
            let q = (*q)?;
            self.out.full(q, len).map(|_| (*node, q))
        })
    }

    /// Assigns the sequence number, queues one copy per target (as
    /// `opts.overflow` says when a queue is full) and delivers locally.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        topic: &Topic,
        name: &TopicName,
        payload: Bytes,
        opts: PublishOptions,
        targets: &[(NodeId, Option<PeerRef>)],
        now: Millis,
        out: &mut Deliveries<S>,
    ) -> Result<Published, PubSubError> {
        let overflow = opts.overflow;
        let len = payload.len();
        if overflow == Overflow::FailFast {
            if let Some((node, q)) = self.first_full(targets, len) {
                self.counters.publish_refused_total.inc();
                let (queued, bytes) = self.out.queued(q);
                return Err(PubSubError::QueueFull {
                    node,
                    queued,
                    bytes,
                });
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.counters.published_total.inc();
        let msg = OutMsg {
            seq,
            topic: name.clone(),
            payload,
            extra: opts.shared(),
            origin: None,
            seal: None,
        };
        let mut done = Published {
            seq,
            queued: 0,
            dropped: 0,
            evicted: 0,
        };
        for (_, q) in targets {
            if let (Overflow::DropOldest, Some(q)) = (overflow, q) {
                let n = self.out.evict_for(*q, len);
                done.evicted += n;
                Counters::add(&self.counters.remote_evicted_total, n);
                Counters::add(&self.counters.remote_dropped_total, n);
            }
            match self.enqueue(*q, msg.clone(), now).is_queued() {
                true => done.queued += 1,
                false => done.dropped += 1,
            }
        }
        if !self.local.subs.is_empty() {
            let me = self.node_id;
            self.deliver_local(topic, msg, me, self.epoch, now, out);
        }
        Ok(done)
    }

    /// Offers `msg` to a peer's queue; counts the outcome and emits the
    /// sender's start or wake.
    pub(crate) fn enqueue(&mut self, q: Option<PeerRef>, msg: OutMsg, now: Millis) -> Enqueued {
        let mut wake = None;
        let outcome = match q {
            Some(q) => self.out.enqueue(q, msg, now, &mut wake),
            None => Enqueued::NoQueue,
        };
        let counted = match outcome.is_queued() {
            true => &self.counters.sent_remote_total,
            false => &self.counters.remote_dropped_total,
        };
        counted.inc();
        self.push_wake(wake);
        self.count_unreported();
        outcome
    }

    /// Delivers `msg` of `publisher` to every local subscription matching
    /// `topic` (into `out`) and every attached client's feed (into its
    /// queue). Returns how many subscriptions and feeds matched.
    pub(crate) fn deliver_local(
        &mut self,
        topic: &Topic,
        msg: OutMsg,
        publisher: NodeId,
        epoch: u64,
        now: Millis,
        out: &mut Deliveries<S>,
    ) -> usize {
        let ids = self.local.matches(topic);
        let mut feeds: Vec<FeedId> = Vec::new();
        let mut n = 0;
        for id in &ids {
            match self.local.subs.get(id).map(|s| &s.target) {
                Some(Target::Local(sink)) => {
                    n += 1;
                    let o = msg.extra.as_deref();
                    out.push((
                        sink.clone(),
                        Event {
                            topic: msg.topic.clone(),
                            payload: msg.payload.clone(),
                            publisher,
                            seq: msg.seq,
                            epoch,
                            headers: o.map(|o| o.headers.clone()).unwrap_or_default(),
                            message_id: o.and_then(|o| o.message_id.clone()),
                            proof: crate::proof::Proof::Connection,
                        },
                    ));
                }
                Some(Target::Feed(f)) if !feeds.contains(f) => feeds.push(*f),
                _ => {}
            }
        }
        n += feeds.len();
        if !feeds.is_empty() {
            let origin =
                (publisher != self.node_id).then(|| Arc::new(Origin::new(publisher, epoch)));
            for f in feeds {
                let fwd = OutMsg {
                    origin: origin.clone(),
                    ..msg.clone()
                };
                self.forward_to_feed(f, publisher, fwd, now);
            }
        }
        n
    }

    /// Queues a matching event for an attached client (not its own
    /// messages: a client is not echoed).
    pub(crate) fn forward_to_feed(
        &mut self,
        feed: FeedId,
        publisher: NodeId,
        msg: OutMsg,
        now: Millis,
    ) {
        let Some(client) = self.local.feeds.get(&feed).map(|f| f.client) else {
            return;
        };
        if client == publisher {
            return;
        }
        self.counters.forwarded_sent_total.inc();
        let q = self.out.queue_for(client, self.frame_limit, now);
        self.enqueue(q, msg, now);
    }

    /// A PUBLISH from node `from` (the single-message form): checked,
    /// deduplicated, delivered. `Err` names what was wrong (the driver
    /// reports it to the peer).
    pub fn handle_publish(
        &mut self,
        from: NodeId,
        p: Publish,
        now: Millis,
        out: &mut Deliveries<S>,
    ) -> Result<(), String> {
        let c = self.counters.clone();
        if p.publisher != from {
            c.remote_rejected_total.inc();
            return Err(format!(
                "PUBLISH names publisher {} but came from {from}",
                p.publisher
            ));
        }
        let topic = Topic::with_limits(&p.topic, &self.limits).map_err(|e| {
            c.remote_rejected_total.inc();
            format!("invalid topic {:?}: {e}", p.topic)
        })?;
        if p.payload.len() > self.max_payload {
            c.remote_rejected_total.inc();
            return Err(format!("payload of {} bytes", p.payload.len()));
        }
        match self.seen.observe(&from, p.epoch, p.seq) {
            Observed::Next => {}
            Observed::Gap { missing } | Observed::Restarted { missing } => {
                Counters::add(&c.gaps_total, missing);
            }
            Observed::Duplicate | Observed::Invalid => {
                c.duplicates_dropped_total.inc();
                return Ok(());
            }
        }
        c.received_remote_total.inc();
        let extra = PublishOptions {
            headers: p.headers,
            message_id: p.message_id,
            overflow: Overflow::default(),
        }
        .shared();
        let msg = OutMsg {
            seq: p.seq,
            topic: TopicName::from(p.topic),
            payload: Bytes::from(p.payload),
            extra,
            origin: None,
            seal: None,
        };
        if self.deliver_local(&topic, msg, from, p.epoch, now, out) == 0 {
            // Sent for a summarized interest record, or just after an
            // unsubscribe: not an error.
            c.unmatched_total.inc();
        }
        Ok(())
    }

    // ----- senders -----------------------------------------------------

    /// The sender of `peer` asks for work: messages are appended to `msgs`
    /// (hand the same buffer back each time; it is swapped, not copied),
    /// with the node's pending loss report.
    pub fn poll_transmit(
        &mut self,
        peer: PeerRef,
        msgs: &mut Vec<OutMsg>,
        now: Millis,
    ) -> Transmit {
        match self.out.take(peer, msgs, now) {
            Take::Msgs(n) => {
                let report = match self.out.node_of(peer) {
                    Some(node) => self.out.take_report(&node),
                    None => None,
                };
                Transmit::Batch(Batch {
                    n,
                    frame_limit: self.out.frame_limit(peer).unwrap_or(self.frame_limit),
                    batch_bytes: self.out.limits.batch_bytes,
                    publisher: self.node_id,
                    epoch: self.epoch,
                    report,
                    refused: 0,
                    signer: self.signer.clone(),
                })
            }
            Take::Finish => Transmit::Finish,
            Take::Empty => Transmit::Empty,
            Take::Retired => Transmit::Retired,
        }
    }

    /// The sender of `peer` wrote the `msgs` it took in `batch`, as
    /// `encoded` says: what could not be encoded is counted dropped, and
    /// what was too large for the node is put in its next loss report.
    pub fn handle_written(
        &mut self,
        peer: PeerRef,
        batch: &Batch,
        msgs: &[OutMsg],
        encoded: Encoded,
        now: Millis,
    ) {
        let c = self.counters.clone();
        let taken = self.out.written(peer, batch.n, now);
        Counters::add(&c.batches_sent_total, encoded.frames);
        if let Some(r) = &batch.report {
            Counters::add(&c.loss_reported_total, r.dropped() + r.in_flight);
        }
        if taken == 0 {
            return;
        }
        let lost = (taken.saturating_sub(encoded.messages + batch.refused)) as u64;
        Counters::add(&c.remote_dropped_total, lost);
        Counters::add(&c.too_large_for_peer_total, encoded.too_large as u64);
        if encoded.too_large > 0 {
            if let Some(node) = self.out.node_of(peer) {
                let budget = batch_budget(batch.frame_limit, batch.batch_bytes);
                self.out.note_loss(node, |r| {
                    msgs.iter()
                        .filter(|m| !fits(m, budget))
                        .for_each(|m| r.add(m, 1))
                });
                self.count_unreported();
            }
        }
        if encoded.ungrouped > 0 {
            // Forwarded messages left out because their frame would have
            // carried only part of their topic group (a seal of kind 3):
            // reported lost, by topic, like any other drop.
            if let Some(node) = self.out.node_of(peer) {
                let left = crate::batch::ungrouped_messages(
                    msgs,
                    &batch.publisher,
                    batch.epoch,
                    batch.frame_limit,
                    batch.batch_bytes,
                );
                Counters::add(&c.ungrouped_total, left.len() as u64);
                self.out.note_loss(node, |r| {
                    left.iter()
                        .filter_map(|&i| msgs.get(i))
                        .for_each(|m| r.add(m, 1))
                });
                self.count_unreported();
            }
        }
    }

    /// The sender of `peer` could not write the `msgs` it took, nor the
    /// report of that batch (the stream or connection failed): they are
    /// dropped, counted, and put in the node's next report; the next batch
    /// reaches the node again.
    pub fn handle_send_failed(
        &mut self,
        peer: PeerRef,
        msgs: &[OutMsg],
        report: Option<LossReport>,
        now: Millis,
    ) {
        let taken = self.out.written(peer, msgs.len(), now);
        Counters::add(&self.counters.remote_dropped_total, taken as u64);
        if let Some(node) = self.out.node_of(peer) {
            self.note_lost(node, &msgs[..taken.min(msgs.len())], report, 0);
        }
    }

    /// The sender of `node` was cut off (see [`Self::handle_stall`]) while
    /// writing `batch` (taking `msgs`) on a stream where it had written
    /// `in_flight` messages before (see [`Batch::carried`]); `written` is
    /// the last mark of the batch whose frames were written whole (none:
    /// nothing of it). What went out in whole frames joins `in_flight` (the
    /// receiver compares it with what it read); the rest of the messages,
    /// and the report if it did not go out, go into the node's next report
    /// by topic, and a new sender starts to deliver it (the connection is
    /// kept).
    pub fn handle_cut_off(
        &mut self,
        node: NodeId,
        batch: Batch,
        msgs: &[OutMsg],
        written: Option<Mark>,
        in_flight: u64,
        now: Millis,
    ) {
        let (consumed, carried) = written.map_or((0, 0), |m| (m.consumed, m.messages));
        // The report went out whole if any mark was reached (it comes first).
        let report = if written.is_some() {
            None
        } else {
            batch.report.clone()
        };
        let budget = batch_budget(batch.frame_limit, batch.batch_bytes);
        let consumed = consumed.min(msgs.len());
        let lost: Vec<OutMsg> = msgs[..consumed]
            .iter()
            .filter(|m| !fits(m, budget))
            .chain(&msgs[consumed..])
            .cloned()
            .collect();
        if let Some(r) = &batch.report {
            if report.is_none() {
                Counters::add(
                    &self.counters.loss_reported_total,
                    r.dropped() + r.in_flight,
                );
            }
        }
        self.note_lost(node, &lost, report, in_flight + carried);
        if self.out.has_report(&node) {
            self.send_report(node, now);
        }
    }

    /// Makes sure a sender runs for `node` to write its pending report: its
    /// queue (created if needed) gets a sender started or woken.
    pub(crate) fn send_report(&mut self, node: NodeId, now: Millis) {
        let frame_limit = self.frame_limit;
        if let Some(q) = self.out.queue_for(node, frame_limit, now) {
            let mut wake = None;
            self.out.kick(q, &mut wake);
            self.push_wake(wake);
        }
    }

    fn note_lost(
        &mut self,
        node: NodeId,
        msgs: &[OutMsg],
        report: Option<LossReport>,
        in_flight: u64,
    ) {
        self.out.note_loss(node, |r| {
            msgs.iter().for_each(|m| r.add(m, 1));
            r.in_flight += in_flight;
            if let Some(back) = report {
                r.merge(back);
            }
        });
        self.count_unreported();
    }

    pub(crate) fn count_unreported(&mut self) {
        let n = std::mem::take(&mut self.out.unreported);
        Counters::add(&self.counters.loss_unreported_total, n);
    }

    pub(crate) fn push_wake(&mut self, wake: Option<Wake<W>>) {
        match wake {
            Some(Wake::Start(peer, node, sender)) => {
                self.actions.push_back(Action::Start { peer, node, sender })
            }
            Some(Wake::Wake(w)) => self.actions.push_back(Action::Wake(w)),
            None => {}
        }
    }

    /// The write of `peer` starts, or accepted bytes: returns when it is
    /// cut off unless it progresses again (`None`: the queue was retired
    /// meanwhile; stop writing).
    pub fn handle_progress(&mut self, peer: PeerRef, now: Millis) -> Option<Millis> {
        self.out.progress(peer, now);
        self.out.stall_deadline(peer)
    }

    /// When the pending write of `peer` is cut off unless it progresses.
    pub fn stall_deadline(&self, peer: PeerRef) -> Option<Millis> {
        self.out.stall_deadline(peer)
    }

    /// The pending write of `peer` has not progressed until `now`: the
    /// verdict (see [`Stall`]). A cut-off peer keeps its connection; a
    /// later publish starts a new queue and stream.
    pub fn handle_stall(&mut self, peer: PeerRef, now: Millis) -> Stall {
        let verdict = self.out.check_stall(peer, now);
        if let Stall::CutOff { dropped } = verdict {
            self.counters.peers_cut_off_total.inc();
            Counters::add(&self.counters.remote_dropped_total, dropped);
        }
        verdict
    }

    /// The sender of `peer` found nothing for the idle time: retires the
    /// queue if it is still idle (`true`: the sender exits).
    pub fn retire_if_idle(&mut self, peer: PeerRef, now: Millis) -> bool {
        self.out.retire_if_idle(peer, now)
    }

    /// The sender of `peer` could not reach its node (no connection, no
    /// address, dial failed): what it took and what is queued is dropped
    /// and counted, the queue retired, and a full node sets the node's
    /// interest aside (see the crate docs, stale interest).
    pub fn handle_unreachable(&mut self, peer: PeerRef, now: Millis) {
        let Some(node) = self.out.node_of(peer) else {
            return;
        };
        self.node_unreachable(&node, now);
    }

    fn node_unreachable(&mut self, node: &NodeId, now: Millis) {
        let known = match self.out.get(node) {
            Some(q) => {
                let r = self.out.retire(q);
                Counters::add(&self.counters.remote_dropped_total, r.dropped);
                true
            }
            None => false,
        };
        // Nobody left to tell.
        let unreported = self.out.forget_report(node);
        Counters::add(&self.counters.loss_unreported_total, unreported);
        if let RoleState::Node(mesh) = &mut self.role {
            if mesh.set_down(node, known, now) {
                self.counters.peers_unreachable_total.inc();
            }
        }
    }

    /// A connection to `node` is up; it announced `frame_limit` (its
    /// HELLO). A node set aside as unreachable is routed to again.
    pub fn handle_peer_up(&mut self, node: &NodeId, frame_limit: u32) {
        self.out.set_frame_limit(node, frame_limit);
        if let RoleState::Node(mesh) = &mut self.role {
            if mesh.set_up(node) {
                self.counters.peers_restored_total.inc();
            }
        }
    }

    /// The connection to `node` ended, for `why`.
    pub fn handle_peer_down(&mut self, node: &NodeId, why: PeerDown, now: Millis) {
        // A new connection's streams start their counts afresh.
        self.in_flight.remove(node);
        if why == PeerDown::Left {
            self.node_unreachable(node, now);
        }
    }

    /// Nodes whose interest is set aside now.
    pub fn n_unreachable(&self, now: Millis) -> usize {
        match &self.role {
            RoleState::Node(mesh) => mesh.n_down(now),
            _ => 0,
        }
    }

    /// The interest lookup of `name` finished (records, or why not).
    pub fn handle_interest_found(
        &mut self,
        name: &str,
        result: Result<Vec<InterestRecord>, String>,
        now: Millis,
    ) {
        if let RoleState::Node(mesh) = &mut self.role {
            mesh.handle_lookup(name, result, now, &self.counters);
        }
    }

    /// Interest lookups running.
    pub fn n_lookups(&self) -> usize {
        match &self.role {
            RoleState::Node(mesh) => mesh.n_lookups(),
            _ => 0,
        }
    }

    /// Graceful shutdown: every sender finishes its stream once its queue
    /// is empty (wakes are emitted as actions).
    pub fn begin_finish(&mut self) {
        for w in self.out.begin_finish() {
            self.actions.push_back(Action::Wake(w));
        }
    }

    /// The sender of `peer` finished its stream (acknowledged or not).
    pub fn handle_finished(&mut self, peer: PeerRef) {
        let node = self.out.node_of(peer);
        let r = self.out.retire(peer);
        Counters::add(&self.counters.remote_dropped_total, r.dropped);
        if let Some(node) = node {
            let unreported = self.out.forget_report(&node);
            Counters::add(&self.counters.loss_unreported_total, unreported);
        }
    }

    /// Queues asked to finish that have not yet.
    pub fn n_finishing(&self) -> usize {
        self.out.n_finishing()
    }

    /// Messages queued to other nodes and not yet written (or given up on).
    pub fn inflight(&self) -> u64 {
        self.out.inflight()
    }

    /// Live outbound queues.
    pub fn n_peers(&self) -> usize {
        self.out.len()
    }

    /// Whether any client feed (a gateway's client) subscribes to `topic`:
    /// a message on it is forwarded to a client (tracing names that hop).
    pub fn feeds_topic(&mut self, topic: &str) -> bool {
        if self.local.feeds.is_empty() {
            return false;
        }
        let Ok(topic) = Topic::new(topic) else {
            return false;
        };
        let ids = self.local.matches(&topic);
        ids.iter().any(|id| {
            matches!(
                self.local.subs.get(id).map(|s| &s.target),
                Some(Target::Feed(_))
            )
        })
    }

    /// Whether this node has client feeds at all (it is a gateway).
    pub fn has_feeds(&self) -> bool {
        !self.local.feeds.is_empty()
    }

    /// How full every bounded table is (for gauges and tests).
    pub fn sizes(&self) -> Sizes {
        let (interest_entries, routes, remembered_puts) = match &self.role {
            RoleState::Node(mesh) => mesh.sizes(),
            _ => (0, 0, 0),
        };
        Sizes {
            subscriptions: self.local.subs.len(),
            feeds: self.local.feeds.len(),
            queues: self.out.len(),
            interest_entries,
            routes,
            remembered_puts,
        }
    }
}
