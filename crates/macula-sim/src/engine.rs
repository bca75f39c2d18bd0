//! The engine: N nodes, one virtual clock, one seed, one event queue.
//!
//! One seed determines everything: keys (hence node IDs), start times,
//! latencies, losses, duplicates, which nodes crash and which pairs are
//! looked up. Events run in (time, sequence) order from a priority queue, so
//! a run is exact and replayable; nothing iterates a hash map where the
//! order could reach the event queue. Nodes are driven only through their
//! services' public `handle_*`/`poll_*` API, the way the runtime drives them.
//!
//! Connections are modelled because the pool is: a frame to a peer the
//! node's [`PoolTable`] does not hold starts a dial
//! (one round trip; frames wait, bounded, until it completes); both ends
//! admit the connection into their pools, whose answers (evict, replace,
//! keep the duplicate, refuse) are carried out: evicted and losing
//! connections are closed, the other end learns after one latency, or after
//! the failure detector's bound when it cannot be reached. A crashed node's
//! peers learn at that bound; a restarted node answers frames of
//! its previous life with a reset.
//!
//! This module must not use threads or the wall clock, and must not reach
//! into core internals: what works here must work in the real node.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use macula_dht::{
    verify_record_signature, Config, Contact, Dht, Event, LookupId, LookupKind, LookupOutcome,
    LookupStats, RecordAuth,
};
use macula_pool::{Admit, PoolTable};
use macula_wire::rng::Rng;
use macula_wire::time::Millis;
use macula_wire::NodeId;

use crate::check::{CallChecker, DeliveryChecker, Failure, Violation};
use crate::figures::LookupFigures;
use crate::net::NetConfig;
use crate::node::{
    AppEvent, CryptoMemo, Dialing, DownReason, Frame, Identity, Process, SharedAuth, SimConn,
    SimNode,
};
use crate::queue::EventQueue;
use crate::rpc::{CallResult, Handler};

/// Record verifications remembered (by hash of signed bytes and signature)
/// so that a store audit verifies each distinct record once; past this the
/// memory is cleared and records are verified again.
const MAX_VERIFIED_RECORDS: usize = 1 << 20;
/// Events queued at once; past this the run fails (a flood is a bug in a
/// core, and must not exhaust memory instead). A 10,000-node run peaks far
/// below.
pub const MAX_QUEUED_EVENTS: usize = 50_000_000;
/// Events processed at one instant of simulated time; past this the run
/// fails as a livelock instead of spinning forever.
pub const MAX_EVENTS_PER_INSTANT: u64 = 10_000_000;
/// First retransmission delay of a lost handshake message (QUIC's initial
/// probe timeout, three times the 333 ms initial RTT estimate).
const HANDSHAKE_PTO: Millis = Millis(1_000);
/// The runtime's reconnect backoff to bootstrap peers (`reconnect_backoff_min`
/// and `_max`).
const RECONNECT_MIN: Millis = Millis(250);
const RECONNECT_MAX: Millis = Millis(30_000);

/// One logged delivery: (node, subscription, publisher, epoch, seq).
pub type Delivery = (usize, u64, NodeId, u64, u64);

/// Message and event counts of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Frames and handshake messages put on the network (copies included).
    pub messages_sent: u64,
    /// Of those, lost by the network.
    pub messages_lost: u64,
    /// Frames the network delivered twice.
    pub messages_duplicated: u64,
    /// Frames and handshake messages dropped by a partition.
    pub messages_partitioned: u64,
    /// Arrived at a dead node, or at a restarted one on an old connection.
    pub messages_to_dead: u64,
    /// Frames handed to a service.
    pub frames_delivered: u64,
    /// Frames for a node ID the simulation does not know.
    pub frames_unroutable: u64,
    /// Dials started.
    pub dials: u64,
    /// Dials refused or timed out (their queued frames dropped).
    pub dials_failed: u64,
    /// Frames dropped because a dial's queue was full, or because the dial
    /// they waited for failed.
    pub dial_queue_dropped: u64,
    /// Connections closed (evicted, duplicate, timed out, reset, goodbye).
    pub connections_closed: u64,
    /// Times a node seeded its DHT again on reconnecting to a bootstrap peer
    /// (each is a join: a self-lookup and bucket refreshes).
    pub reseeds: u64,
    /// Crashes and goodbyes.
    pub stops: u64,
    /// Restarts after a stop.
    pub restarts: u64,
    /// Queue events processed.
    pub events_processed: u64,
    /// Events not queued because the queue was full (the run fails).
    pub events_dropped: u64,
    /// Most events queued at once.
    pub peak_queued: u64,
    /// Timer events that found their node's timer re-armed for another time.
    pub timers_stale: u64,
    /// Safety checks run (each per-step check of a node, each record
    /// verified, each lookup result checked, each delivery and call
    /// outcome checked).
    pub checks: u64,
    /// Messages published (sent by a pub/sub core).
    pub published: u64,
    /// Deliveries to subscriptions, each checked by the
    /// [`DeliveryChecker`].
    pub deliveries: u64,
    /// RPC calls started by applications.
    pub calls: u64,
    /// Of those, answered (each answer checked by the [`CallChecker`]).
    pub calls_ok: u64,
    /// Of those, failed (no providers, unreachable, timeout, ...).
    pub calls_failed: u64,
    /// Handler runs (each checked for at-most-once).
    pub handler_runs: u64,
    /// Failed calls by why (`Timeout`, `Unreachable`, ...).
    pub call_failures: std::collections::BTreeMap<&'static str, u64>,
}

/// What the engine does when a safety check fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnViolation {
    /// Panic with the [`Failure`] (seed and replay command): for protocol
    /// tests that drive the engine by hand.
    Panic,
    /// Record the first failure and stop processing events: for scenarios,
    /// which return it ([`Sim::failure`]).
    Stop,
}

#[derive(Debug)]
enum Ev {
    Start {
        node: usize,
        seeds: Vec<usize>,
    },
    Frame {
        from: usize,
        from_inc: u32,
        to: usize,
        to_inc: u32,
        conn: usize,
        frame: Frame,
    },
    Dial {
        from: usize,
        from_inc: u32,
        to: usize,
        conn: usize,
    },
    Accept {
        acceptor: usize,
        acceptor_inc: u32,
        dialer: usize,
        dialer_inc: u32,
        conn: usize,
    },
    Refuse {
        acceptor: usize,
        dialer: usize,
        dialer_inc: u32,
        conn: usize,
    },
    DialTimeout {
        node: usize,
        inc: u32,
        peer: usize,
        conn: usize,
    },
    Closed {
        node: usize,
        inc: u32,
        peer: usize,
        conn: usize,
        reason: DownReason,
    },
    Timer {
        node: usize,
        inc: u32,
    },
    Lookup {
        node: usize,
        target: NodeId,
        kind: LookupKind,
        tag: u64,
    },
    Crash {
        node: usize,
    },
    Shutdown {
        node: usize,
    },
    Restart {
        node: usize,
        seeds: Vec<usize>,
    },
    Partition {
        groups: Vec<u16>,
    },
    Heal,
    PartitionExpire {
        generation: u64,
    },
    Supervise {
        node: usize,
        inc: u32,
        peer: usize,
        backoff: Millis,
    },
}

impl Ev {
    /// The pair of nodes a connection event is about (for the pool
    /// agreement check, which must not fire while one is in flight).
    fn conn_pair(&self) -> Option<(usize, usize)> {
        let (a, b) = match *self {
            Ev::Dial { from, to, .. } => (from, to),
            Ev::Accept {
                acceptor, dialer, ..
            }
            | Ev::Refuse {
                acceptor, dialer, ..
            } => (acceptor, dialer),
            Ev::Closed { node, peer, .. } => (node, peer),
            _ => return None,
        };
        Some((a.min(b), a.max(b)))
    }
}

/// An event taken off the queue.
struct Queued {
    at: Millis,
    ev: Box<Ev>,
}

/// N nodes, one virtual clock, one seed.
pub struct Sim {
    net: NetConfig,
    seed: u64,
    rng: Rng,
    now: Millis,
    // Boxed: a STORE carries a whole record, and slots keep capacity.
    queue: EventQueue<Box<Ev>>,
    nodes: Vec<SimNode>,
    by_id: HashMap<NodeId, usize>,
    tags: HashMap<(usize, LookupId), u64>,
    next_tag: u64,
    next_conn: usize,
    results: Vec<(u64, LookupOutcome)>,
    events: Vec<(usize, Event)>,
    counters: SimCounters,
    /// Node i's group while a partition is in force (nodes past the end are
    /// in group 0), and the partition's generation.
    partition: Option<(u64, Vec<u16>)>,
    partition_generation: u64,
    /// Connection events in flight per pair of nodes (smaller index first).
    conn_events: HashMap<(usize, usize), u32>,
    verified: HashSet<[u8; 32]>,
    /// Signatures and verifications the nodes' real keys already made.
    memo: CryptoMemo,
    on_violation: OnViolation,
    failure: Option<Failure>,
    replay: String,
    supervise: bool,
    /// Events processed at the current instant.
    same_instant: u64,
    /// Pub/sub realm of every node.
    realm: String,
    deliveries: DeliveryChecker,
    calls: CallChecker,
    next_sub: u64,
    next_call: u64,
    /// (node, subscription, publisher, epoch, seq) of every delivery, while
    /// logging is on.
    delivery_log: Option<Vec<Delivery>>,
    /// (publisher node, topic, epoch, seq) of every publish, while logging
    /// is on.
    publish_log: Option<Vec<(usize, String, u64, u64)>>,
    /// Finished calls: (caller node, call, outcome).
    call_outcomes: Vec<(usize, u64, CallResult)>,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.seed)
            .field("now", &self.now)
            .field("n_nodes", &self.nodes.len())
            .field("n_queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// An empty network whose every random choice comes from `seed`.
    pub fn new(net: NetConfig, seed: u64) -> Sim {
        Sim {
            net,
            seed,
            rng: Rng::new(seed),
            now: Millis::ZERO,
            queue: EventQueue::default(),
            nodes: Vec::new(),
            by_id: HashMap::new(),
            tags: HashMap::new(),
            next_tag: 0,
            next_conn: 1,
            results: Vec::new(),
            events: Vec::new(),
            counters: SimCounters::default(),
            partition: None,
            partition_generation: 0,
            conn_events: HashMap::new(),
            verified: HashSet::new(),
            memo: CryptoMemo::default(),
            on_violation: OnViolation::Panic,
            failure: None,
            replay: format!("(replay with seed {seed})"),
            supervise: false,
            same_instant: 0,
            realm: "io.macula.sim".into(),
            deliveries: DeliveryChecker::new(),
            calls: CallChecker::new(),
            next_sub: 0,
            next_call: 0,
            delivery_log: None,
            publish_log: None,
            call_outcomes: Vec::new(),
        }
    }

    /// The seed that replays this run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Current virtual time.
    pub fn now(&self) -> Millis {
        self.now
    }

    /// Nodes created (alive or dead).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True if no node was created.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Events queued now.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Counters so far.
    pub fn counters(&self) -> &SimCounters {
        &self.counters
    }

    /// The network in force.
    pub fn net(&self) -> &NetConfig {
        &self.net
    }

    /// Changes the network from now on (frames in flight keep their fate).
    pub fn set_net(&mut self, net: NetConfig) {
        self.net = net;
    }

    /// The simulator's own random stream (for scenario choices).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// What to do on a safety violation (default: panic).
    pub fn set_on_violation(&mut self, on: OnViolation) {
        self.on_violation = on;
    }

    /// Nodes keep a connection to each of their bootstrap peers (the seeds
    /// they started or restarted with) and seed their DHT again whenever it
    /// comes back, with the runtime's reconnect backoff: that is how a real
    /// mesh heals a partition. Off by default: the DHT experiment measures
    /// the core alone, its seeds used once.
    pub fn set_supervise_bootstrap(&mut self, on: bool) {
        self.supervise = on;
    }

    /// The command that replays this run, printed with any failure.
    pub fn set_replay(&mut self, command: String) {
        self.replay = command;
    }

    /// The first safety violation, if one happened (with
    /// [`OnViolation::Stop`]; no event ran after it).
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Reports a violation found outside the engine (a scenario's liveness
    /// check): recorded, or a panic, as [`Sim::set_on_violation`] says.
    pub fn fail(&mut self, violation: Violation) {
        if self.failure.is_some() {
            return;
        }
        let failure = Failure {
            seed: self.seed,
            at: self.now,
            violation: Box::new(violation),
            replay: self.replay.clone(),
        };
        match self.on_violation {
            OnViolation::Panic => panic!("{failure}"),
            OnViolation::Stop => self.failure = Some(failure),
        }
    }

    /// Adds a node with a fresh Ed25519 key (its ID derived from the key,
    /// its records really signed); returns its index.
    pub fn add_node(&mut self, config: Config) -> usize {
        let mut secret = [0u8; 32];
        self.rng.fill_bytes(&mut secret);
        let public = SigningKey::from_bytes(&secret).verifying_key().to_bytes();
        let id = NodeId::from_public_key(&public);
        self.push_node(id, config, Identity::Key(secret))
    }

    /// Adds a node with a chosen ID and record authenticator (protocol tests,
    /// injected faults). Its records are exempt from the signature audit:
    /// only records claiming a publisher with a real key must verify.
    pub fn add_node_with(
        &mut self,
        id: NodeId,
        config: Config,
        auth: Box<dyn RecordAuth + Send>,
    ) -> usize {
        self.push_node(
            id,
            config,
            Identity::Custom(SharedAuth(Arc::new(Mutex::new(auth)))),
        )
    }

    fn push_node(&mut self, id: NodeId, config: Config, identity: Identity) -> usize {
        let i = self.nodes.len();
        assert!(
            self.by_id.insert(id, i).is_none(),
            "sim seed {}: duplicate node ID",
            self.seed
        );
        let contact = Contact::new(id, format!("sim:{i}"));
        let node_seed = self.rng.next_u64();
        let process = Process::new(
            config.clone(),
            contact.clone(),
            identity.auth(&self.memo),
            node_seed,
            self.net.max_connections,
            1,
            &self.realm,
        );
        self.nodes.push(SimNode {
            contact,
            identity,
            config,
            epoch: 1,
            incarnation: 1,
            process,
            alive: true,
        });
        i
    }

    /// A node whose verifier accepts everything while it signs with its real
    /// key: a deliberately broken node, for tests that the checks catch what
    /// it lets in.
    pub fn break_verifier(&mut self, i: usize) {
        struct SignsButAcceptsAll(Ed25519Signer);
        impl RecordAuth for SignsButAcceptsAll {
            fn sign(&self, msg: &[u8]) -> Vec<u8> {
                self.0.sign(msg)
            }
            fn verify(&self, _: &NodeId, _: &[u8], _: &[u8]) -> bool {
                true
            }
        }
        struct Ed25519Signer(macula_dht::Ed25519Auth);
        impl Ed25519Signer {
            fn sign(&self, msg: &[u8]) -> Vec<u8> {
                self.0.sign(msg)
            }
        }
        let Identity::Key(secret) = self.nodes[i].identity else {
            return;
        };
        let auth = macula_dht::Ed25519Auth::new(SigningKey::from_bytes(&secret));
        let node = &mut self.nodes[i];
        let seed = self.rng.next_u64();
        node.process = Process::new(
            node.config.clone(),
            node.contact.clone(),
            Box::new(SignsButAcceptsAll(Ed25519Signer(auth))),
            seed,
            self.net.max_connections,
            node.epoch,
            &self.realm,
        );
    }

    /// A node whose pub/sub remembers one publisher only: after a message
    /// of another, a copy of an old message is new to it again (the
    /// documented limit of a bounded `SeqTracker`, made as bad as it gets),
    /// for tests that the delivery checks catch what it lets through.
    pub fn break_dedup(&mut self, i: usize) {
        let limits = macula_pubsub::Limits {
            max_publishers: 1,
            ..macula_pubsub::Limits::default()
        };
        let node = &mut self.nodes[i];
        node.process.pubsub = crate::pubsub::PubSubService::with_limits(
            node.contact.id,
            node.epoch,
            &self.realm,
            limits,
        );
    }

    /// Node `i`'s ID.
    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].contact.id
    }

    /// Node `i`'s contact.
    pub fn contact(&self, i: usize) -> Contact {
        self.nodes[i].contact.clone()
    }

    /// The index of the node with ID `id`.
    pub fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Node `i`'s DHT core (read-only; the last process's after a crash).
    pub fn dht(&self, i: usize) -> &Dht {
        self.nodes[i].process.dht.core()
    }

    /// Node `i`'s pool.
    pub fn pool(&self, i: usize) -> &PoolTable<SimConn> {
        &self.nodes[i].process.pool
    }

    /// Node `i`'s epoch: persisted, raised at every restart.
    pub fn epoch(&self, i: usize) -> u64 {
        self.nodes[i].epoch
    }

    /// True unless node `i` crashed or left (a node added but not yet started
    /// counts as alive).
    pub fn alive(&self, i: usize) -> bool {
        self.nodes[i].alive
    }

    /// Indices of live nodes.
    pub fn alive_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive)
            .collect()
    }

    /// Node `i` calls `bootstrap` with `seeds` at time `at`.
    pub fn schedule_start(&mut self, i: usize, seeds: &[usize], at: Millis) {
        self.push(
            at,
            Ev::Start {
                node: i,
                seeds: seeds.to_vec(),
            },
        );
    }

    /// Node `i` starts a lookup at time `at`; its outcome is returned by
    /// [`Sim::take_results`] under the returned tag.
    pub fn schedule_lookup(
        &mut self,
        i: usize,
        target: NodeId,
        kind: LookupKind,
        at: Millis,
    ) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.push(
            at,
            Ev::Lookup {
                node: i,
                target,
                kind,
                tag,
            },
        );
        tag
    }

    /// Runs `f` on node `i`'s DHT now (a command such as `put`), then sends
    /// what it produced.
    pub fn command<R>(&mut self, i: usize, f: impl FnOnce(&mut Dht, Millis) -> R) -> R {
        let now = self.now;
        let r = f(self.nodes[i].process.dht.core_mut(), now);
        self.service(i);
        r
    }

    /// The pub/sub realm of every node (set before adding nodes).
    pub fn set_realm(&mut self, realm: &str) {
        self.realm = realm.to_string();
    }

    /// Node `i`'s application subscribes to `pattern`; returns the
    /// subscription's number (unique in the run), or why the core refused.
    pub fn subscribe(&mut self, i: usize, pattern: &str) -> Result<u64, String> {
        let p = macula_pubsub::Pattern::new(pattern).map_err(|e| e.to_string())?;
        self.next_sub += 1;
        let sub = self.next_sub;
        self.nodes[i].process.pubsub.subscribe(pattern, sub)?;
        self.deliveries.subscribed(i, sub, p);
        self.service(i);
        Ok(sub)
    }

    /// Node `i`'s application publishes `payload` on `topic` (in order
    /// after its publishes still waiting for a route).
    pub fn publish(&mut self, i: usize, topic: &str, payload: &[u8]) {
        let now = self.now;
        let payload = bytes::Bytes::copy_from_slice(payload);
        self.nodes[i].process.pubsub.publish(topic, payload, now);
        self.service(i);
    }

    /// Node `i` serves `procedure` with `handler` and advertises it.
    pub fn advertise(&mut self, i: usize, procedure: &str, handler: Handler) -> Result<(), String> {
        let r = self.nodes[i].process.rpc.advertise(procedure, handler);
        self.service(i);
        r
    }

    /// Node `i`'s application calls `procedure` within `timeout`, with
    /// `retries` retries; returns the call's number (unique in the run).
    /// Its outcome comes back through [`Sim::take_call_outcomes`].
    pub fn call(&mut self, i: usize, procedure: &str, timeout: Millis, retries: u32) -> u64 {
        self.next_call += 1;
        let app = self.next_call;
        self.counters.calls += 1;
        self.calls.started(i, app, retries);
        let now = self.now;
        self.nodes[i]
            .process
            .rpc
            .call(app, procedure, timeout, retries, now);
        self.service(i);
        app
    }

    /// Finished calls since the last call: (caller, call, outcome).
    pub fn take_call_outcomes(&mut self) -> Vec<(usize, u64, CallResult)> {
        std::mem::take(&mut self.call_outcomes)
    }

    /// Keeps a log of every publish and delivery from now on (`false`:
    /// stops and drops it).
    pub fn set_app_log(&mut self, on: bool) {
        self.delivery_log = on.then(Vec::new);
        self.publish_log = on.then(Vec::new);
    }

    /// Deliveries logged since the last call: (node, subscription,
    /// publisher, epoch, seq).
    pub fn take_deliveries(&mut self) -> Vec<Delivery> {
        self.delivery_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Publishes logged since the last call: (node, topic, epoch, seq).
    pub fn take_publishes(&mut self) -> Vec<(usize, String, u64, u64)> {
        self.publish_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The pub/sub oracle.
    pub fn deliveries(&mut self) -> &mut DeliveryChecker {
        &mut self.deliveries
    }

    /// The RPC oracle.
    pub fn call_checker(&self) -> &CallChecker {
        &self.calls
    }

    /// Node `i`'s pub/sub service (the last process's after a crash).
    pub fn pubsub(&self, i: usize) -> &crate::pubsub::PubSubService {
        &self.nodes[i].process.pubsub
    }

    /// Node `i`'s RPC service (the last process's after a crash).
    pub fn rpc(&self, i: usize) -> &crate::rpc::RpcService {
        &self.nodes[i].process.rpc
    }

    /// Crashes node `i` now: its process and everything in it is lost; its
    /// key and epoch are kept for a restart. Peers notice when their failure
    /// detector declares it down ([`NetConfig::detect_after`]).
    pub fn kill(&mut self, i: usize) {
        self.crash(i);
    }

    /// Crashes node `i` at time `at`.
    pub fn schedule_kill(&mut self, i: usize, at: Millis) {
        self.push(at, Ev::Crash { node: i });
    }

    /// Node `i` says goodbye to its peers and stops at time `at`.
    pub fn schedule_shutdown(&mut self, i: usize, at: Millis) {
        self.push(at, Ev::Shutdown { node: i });
    }

    /// Restarts a stopped node `i` at time `at`, with its key, its next
    /// epoch and empty state, joining through `seeds`.
    pub fn schedule_restart(&mut self, i: usize, seeds: &[usize], at: Millis) {
        self.push(
            at,
            Ev::Restart {
                node: i,
                seeds: seeds.to_vec(),
            },
        );
    }

    /// Restarts stopped node `i` now (see [`Sim::schedule_restart`]).
    pub fn restart_now(&mut self, i: usize, seeds: &[usize]) {
        self.restart(i, seeds);
    }

    /// Delivers `frame` from node `from` to node `to` after one latency, as
    /// if a core of `from` had sent it: a buggy or hostile peer, for fault
    /// injection. No loss or partition applies (the injected fault is the
    /// frame, and a test must not depend on the network letting it through).
    pub fn inject_frame(&mut self, from: usize, to: usize, frame: Frame) {
        self.counters.messages_sent += 1;
        let latency = self.net.latency.sample(&mut self.rng);
        let (from_inc, to_inc) = (self.nodes[from].incarnation, self.nodes[to].incarnation);
        let conn = self.next_conn;
        self.next_conn += 1;
        self.push(
            self.now.saturating_add(latency),
            Ev::Frame {
                from,
                from_inc,
                to,
                to_inc,
                conn,
                frame,
            },
        );
    }

    /// From `at`, node i can reach node j only if `groups[i] == groups[j]`
    /// (nodes past the end of `groups` are in group 0), until
    /// [`Sim::schedule_heal`]. Connections across the cut are declared down
    /// at the failure detector's bound if it lasts that long.
    pub fn schedule_partition(&mut self, groups: Vec<u16>, at: Millis) {
        self.push(at, Ev::Partition { groups });
    }

    /// Ends the partition at `at`.
    pub fn schedule_heal(&mut self, at: Millis) {
        self.push(at, Ev::Heal);
    }

    /// Finished tagged lookups since the last call.
    pub fn take_results(&mut self) -> Vec<(u64, LookupOutcome)> {
        std::mem::take(&mut self.results)
    }

    /// Other events (puts, bootstraps, untagged lookups) since the last call.
    pub fn take_events(&mut self) -> Vec<(usize, Event)> {
        std::mem::take(&mut self.events)
    }

    /// Finished tagged lookups collected so far (not drained).
    pub fn results(&self) -> &[(u64, LookupOutcome)] {
        &self.results
    }

    /// Other events collected so far (not drained).
    pub fn events(&self) -> &[(usize, Event)] {
        &self.events
    }

    /// Tagged lookups scheduled or running whose outcome has not arrived.
    pub fn n_tagged_running(&self) -> usize {
        self.tags.len()
    }

    /// Processes events up to and including time `t`, then sets the clock to
    /// `t`. Stops early at a failure (with [`OnViolation::Stop`]).
    pub fn run_until(&mut self, t: Millis) {
        while self.failure.is_none() && self.queue.peek_time().is_some_and(|at| at <= t.0) {
            self.step();
        }
        if self.failure.is_none() {
            self.now = self.now.max(t);
        }
    }

    /// Processes events until `done` holds or the clock would pass `deadline`.
    /// Returns whether `done` held (false after a failure).
    pub fn run_until_or(&mut self, deadline: Millis, mut done: impl FnMut(&Sim) -> bool) -> bool {
        loop {
            if self.failure.is_some() {
                return false;
            }
            if done(self) {
                return true;
            }
            if self.queue.peek_time().is_none_or(|at| at > deadline.0) {
                self.now = self.now.max(deadline);
                return done(self);
            }
            self.step();
        }
    }

    fn push(&mut self, at: Millis, ev: Ev) {
        if self.queue.len() >= MAX_QUEUED_EVENTS {
            self.counters.events_dropped += 1;
            self.fail(Violation::EventQueueFull {
                max: MAX_QUEUED_EVENTS,
            });
            return;
        }
        if let Some(pair) = ev.conn_pair() {
            *self.conn_events.entry(pair).or_insert(0) += 1;
        }
        self.counters.peak_queued = self.counters.peak_queued.max(self.queue.len() as u64 + 1);
        self.queue.push(at.max(self.now).0, Box::new(ev));
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        match &self.partition {
            None => true,
            Some((_, groups)) => {
                let g = |i: usize| groups.get(i).copied().unwrap_or(0);
                g(a) == g(b)
            }
        }
    }

    /// A handshake message: latency and partitions, no duplicates. A loss
    /// costs a retransmission (QUIC's probe timeout, 1 s doubling), as the
    /// real handshake does; it is lost for good only when the retransmissions
    /// would outlast the dial timeout.
    fn send_handshake(&mut self, from: usize, to: usize, ev: Ev) {
        self.counters.messages_sent += 1;
        if !self.reachable(from, to) {
            self.counters.messages_partitioned += 1;
            return;
        }
        let mut delay = self.net.latency.sample(&mut self.rng);
        let mut pto = HANDSHAKE_PTO;
        while self.net.loss > 0.0 && self.rng.chance(self.net.loss) {
            self.counters.messages_lost += 1;
            delay = delay.saturating_add(pto);
            pto = pto.saturating_add(pto);
            if delay > self.net.dial_timeout {
                return;
            }
        }
        self.push(self.now.saturating_add(delay), ev);
    }

    /// A frame on connection `conn`: every fault applies.
    fn transmit(&mut self, from: usize, to: usize, to_inc: u32, conn: usize, frame: Frame) {
        self.counters.messages_sent += 1;
        if !self.reachable(from, to) {
            self.counters.messages_partitioned += 1;
            return;
        }
        if self.net.loss > 0.0 && self.rng.chance(self.net.loss) {
            self.counters.messages_lost += 1;
            return;
        }
        let from_inc = self.nodes[from].incarnation;
        if frame.may_duplicate() && self.net.duplicate > 0.0 && self.rng.chance(self.net.duplicate)
        {
            self.counters.messages_sent += 1;
            self.counters.messages_duplicated += 1;
            self.push_frame(from, from_inc, to, to_inc, conn, frame.clone());
        }
        self.push_frame(from, from_inc, to, to_inc, conn, frame);
    }

    /// One copy of a frame on its way, arriving after a latency drawn now.
    fn push_frame(
        &mut self,
        from: usize,
        from_inc: u32,
        to: usize,
        to_inc: u32,
        conn: usize,
        frame: Frame,
    ) {
        let at = self.frame_arrival();
        self.push(
            at,
            Ev::Frame {
                from,
                from_inc,
                to,
                to_inc,
                conn,
                frame,
            },
        );
    }

    fn frame_arrival(&mut self) -> Millis {
        let mut latency = self.net.latency.sample(&mut self.rng);
        if self.net.reorder > 0.0 && self.rng.chance(self.net.reorder) {
            let extra = self.rng.below(self.net.latency.max().0.saturating_add(1));
            latency = latency.saturating_add(Millis(extra));
        }
        self.now.saturating_add(latency)
    }

    /// Sends `frame` from node `from` to `to`: on the pooled connection, or
    /// queued on a dial.
    fn send_frame(&mut self, from: usize, to: &NodeId, frame: Frame) {
        let Some(&to_index) = self.by_id.get(to) else {
            self.counters.frames_unroutable += 1;
            return;
        };
        debug_assert_ne!(to_index, from, "sim seed {}: a frame to self", self.seed);
        let max_queued = self.net.max_queued_per_dial;
        let process = &mut self.nodes[from].process;
        if let Some(c) = process.pool.get(to) {
            self.transmit(from, to_index, c.peer_incarnation, c.conn, frame);
            return;
        }
        if let Some(d) = process.dialing.get_mut(&to_index) {
            if d.queued.len() < max_queued {
                d.queued.push(frame);
            } else {
                self.counters.dial_queue_dropped += 1;
            }
            return;
        }
        self.dial(from, to_index, vec![frame]);
    }

    /// Node `from` dials node `to`; `queued` frames wait for the connection.
    fn dial(&mut self, from: usize, to: usize, queued: Vec<Frame>) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.nodes[from]
            .process
            .dialing
            .insert(to, Dialing { conn, queued });
        self.counters.dials += 1;
        let inc = self.nodes[from].incarnation;
        self.send_handshake(
            from,
            to,
            Ev::Dial {
                from,
                from_inc: inc,
                to,
                conn,
            },
        );
        let at = self.now.saturating_add(self.net.dial_timeout);
        self.push(
            at,
            Ev::DialTimeout {
                node: from,
                inc,
                peer: to,
                conn,
            },
        );
    }

    /// Offers `c` to node `i`'s pool and carries out the answer.
    fn admit(&mut self, i: usize, mut c: SimConn) {
        let now = self.now;
        let j = c.peer_index;
        let peer = self.nodes[j].contact.clone();
        c.kept = self.supervise && self.nodes[i].process.bootstrap.iter().any(|b| b.0 == j);
        match self.nodes[i].process.pool.admit(c.clone()) {
            Admit::Inserted { evicted } => {
                if let Some(e) = evicted {
                    self.close_remote(i, &e);
                    self.peer_down(i, e.peer_index, DownReason::Evicted);
                }
                self.nodes[i].process.peer_up(&peer, now);
            }
            Admit::Replaced { old } => self.close_remote(i, &old),
            Admit::Duplicate { kept } => {
                if kept.conn != c.conn {
                    self.close_remote(i, &c);
                }
            }
            Admit::Refused(_) => self.close_remote(i, &c),
        }
        // A bootstrap peer's connection is (back) up: seed the DHT with it,
        // as the runtime's supervisor does on every reconnection.
        let p = &mut self.nodes[i].process;
        let connected = p.pool.peek(&peer.id).is_some();
        if let Some(b) = p.bootstrap.iter_mut().find(|b| b.0 == j) {
            if connected && !b.1 {
                b.1 = true;
                self.counters.reseeds += 1;
                p.dht.core_mut().bootstrap(vec![peer], now);
            }
        }
    }

    /// Node `i` lost its last connection to node `j`: its services learn
    /// why; a bootstrap peer is reconnected after the backoff.
    fn peer_down(&mut self, i: usize, j: usize, reason: DownReason) {
        let now = self.now;
        let id = self.nodes[j].contact.id;
        self.nodes[i].process.peer_down(&id, reason, now);
        if !self.supervise {
            return;
        }
        let inc = self.nodes[i].incarnation;
        if let Some(b) = self.nodes[i]
            .process
            .bootstrap
            .iter_mut()
            .find(|b| b.0 == j)
        {
            b.1 = false;
            self.push(
                now.saturating_add(RECONNECT_MIN),
                Ev::Supervise {
                    node: i,
                    inc,
                    peer: j,
                    backoff: RECONNECT_MIN,
                },
            );
        }
    }

    /// Node `i` closed `c` (already out of its pool): the other end learns
    /// after one latency, or at its detector's bound if it cannot be reached.
    fn close_remote(&mut self, i: usize, c: &SimConn) {
        self.counters.connections_closed += 1;
        let j = c.peer_index;
        let ev = Ev::Closed {
            node: j,
            inc: c.peer_incarnation,
            peer: i,
            conn: c.conn,
            reason: DownReason::Closed,
        };
        if self.nodes[j].alive && self.reachable(i, j) {
            let latency = self.net.latency.sample(&mut self.rng);
            self.push(self.now.saturating_add(latency), ev);
        } else {
            self.timed_out_later(i, c);
        }
    }

    /// The other end of `c` (held by node `i`) notices nothing gets through,
    /// when its failure detector declares the node down.
    fn timed_out_later(&mut self, i: usize, c: &SimConn) {
        let at = self.now.saturating_add(self.net.detect_after());
        self.push(
            at,
            Ev::Closed {
                node: c.peer_index,
                inc: c.peer_incarnation,
                peer: i,
                conn: c.conn,
                reason: DownReason::TimedOut,
            },
        );
    }

    fn crash(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        self.nodes[i].alive = false;
        self.deliveries.node_down(i);
        self.counters.stops += 1;
        for c in self.sorted_conns(i) {
            self.timed_out_later(i, &c);
        }
        self.nodes[i].process.dialing.clear();
        self.nodes[i].process.armed = None;
    }

    fn sorted_conns(&self, i: usize) -> Vec<SimConn> {
        let mut conns = self.nodes[i].process.pool.all();
        conns.sort_by_key(|c| c.conn);
        conns
    }

    fn restart(&mut self, i: usize, seeds: &[usize]) {
        if self.nodes[i].alive {
            return;
        }
        self.counters.restarts += 1;
        let seed = self.rng.next_u64();
        let max = self.net.max_connections;
        let node = &mut self.nodes[i];
        node.alive = true;
        node.incarnation += 1;
        node.epoch += 1;
        node.process = Process::new(
            node.config.clone(),
            node.contact.clone(),
            node.identity.auth(&self.memo),
            seed,
            max,
            node.epoch,
            &self.realm,
        );
        self.bootstrap(i, seeds);
    }

    fn bootstrap(&mut self, i: usize, seeds: &[usize]) {
        let mut seeds: Vec<usize> = seeds.iter().copied().filter(|&s| s != i).collect();
        seeds.sort_unstable();
        seeds.dedup();
        let contacts = seeds.iter().map(|&s| self.contact(s)).collect();
        let now = self.now;
        self.nodes[i]
            .process
            .dht
            .core_mut()
            .bootstrap(contacts, now);
        if self.supervise {
            // Seeded just now; the supervisor checks on each connection once
            // the join had time to make it.
            let inc = self.nodes[i].incarnation;
            self.nodes[i].process.bootstrap = seeds.iter().map(|&s| (s, true)).collect();
            for &s in &seeds {
                self.push(
                    now.saturating_add(self.net.dial_timeout),
                    Ev::Supervise {
                        node: i,
                        inc,
                        peer: s,
                        backoff: RECONNECT_MIN,
                    },
                );
            }
        }
        self.service(i);
    }

    /// The current process of node `i` is `inc` and running.
    fn live(&self, i: usize, inc: u32) -> bool {
        self.nodes[i].alive && self.nodes[i].incarnation == inc
    }

    fn step(&mut self) {
        let Some((at, ev)) = self.queue.pop() else {
            return;
        };
        let q = Queued { at: Millis(at), ev };
        debug_assert!(
            q.at >= self.now,
            "sim seed {}: time went backwards",
            self.seed
        );
        if q.at == self.now {
            self.same_instant += 1;
            if self.same_instant > MAX_EVENTS_PER_INSTANT {
                return self.fail(Violation::Livelock {
                    max: MAX_EVENTS_PER_INSTANT,
                });
            }
        } else {
            self.same_instant = 0;
        }
        self.now = q.at;
        self.counters.events_processed += 1;
        if let Some(pair) = q.ev.conn_pair() {
            if let Some(n) = self.conn_events.get_mut(&pair) {
                *n -= 1;
                if *n == 0 {
                    self.conn_events.remove(&pair);
                }
            }
        }
        let now = self.now;
        match *q.ev {
            Ev::Start { node, seeds } => {
                if self.nodes[node].alive {
                    self.bootstrap(node, &seeds);
                }
            }
            Ev::Frame {
                from,
                from_inc,
                to,
                to_inc,
                conn,
                frame,
            } => {
                if !self.live(to, to_inc) {
                    self.counters.messages_to_dead += 1;
                    if self.nodes[to].alive && self.live(from, from_inc) {
                        // A new process got a packet of the old one's
                        // connection: stateless reset.
                        let latency = self.net.latency.sample(&mut self.rng);
                        self.push(
                            now.saturating_add(latency),
                            Ev::Closed {
                                node: from,
                                inc: from_inc,
                                peer: to,
                                conn,
                                reason: DownReason::Reset,
                            },
                        );
                    }
                    return;
                }
                self.counters.frames_delivered += 1;
                let from_contact = self.nodes[from].contact.clone();
                if let Some(reply) = self.nodes[to].process.deliver(&from_contact, frame, now) {
                    // Answers go back on the arriving connection, as in the
                    // runtime, not through the pool.
                    self.transmit(to, from, from_inc, conn, reply);
                }
                self.service(to);
            }
            Ev::Dial {
                from,
                from_inc,
                to,
                conn,
            } => {
                if !self.nodes[to].alive {
                    self.counters.messages_to_dead += 1;
                    return;
                }
                let dialer = self.id(from);
                if self.nodes[to]
                    .process
                    .pool
                    .refusal(&dialer, false)
                    .is_some()
                {
                    self.send_handshake(
                        to,
                        from,
                        Ev::Refuse {
                            acceptor: to,
                            dialer: from,
                            dialer_inc: from_inc,
                            conn,
                        },
                    );
                    return;
                }
                let acceptor_inc = self.nodes[to].incarnation;
                self.admit(
                    to,
                    SimConn {
                        peer: dialer,
                        peer_index: from,
                        peer_incarnation: from_inc,
                        conn,
                        outbound: false,
                        kept: false,
                    },
                );
                self.send_handshake(
                    to,
                    from,
                    Ev::Accept {
                        acceptor: to,
                        acceptor_inc,
                        dialer: from,
                        dialer_inc: from_inc,
                        conn,
                    },
                );
                self.service(to);
                self.check_node(to);
            }
            Ev::Accept {
                acceptor,
                acceptor_inc,
                dialer,
                dialer_inc,
                conn,
            } => {
                let c = SimConn {
                    peer: self.id(acceptor),
                    peer_index: acceptor,
                    peer_incarnation: acceptor_inc,
                    conn,
                    outbound: true,
                    kept: false,
                };
                let current = self.live(dialer, dialer_inc)
                    && self.nodes[dialer]
                        .process
                        .dialing
                        .get(&acceptor)
                        .is_some_and(|d| d.conn == conn);
                if !current {
                    // The dialer died, or gave up on this dial: the
                    // acceptor's end is closed (at once if the dialer runs,
                    // else at the acceptor's detector bound).
                    if self.nodes[dialer].alive {
                        self.close_remote(dialer, &c);
                    } else {
                        self.timed_out_later(dialer, &c);
                    }
                    return;
                }
                let queued = self.nodes[dialer]
                    .process
                    .dialing
                    .remove(&acceptor)
                    .map(|d| d.queued)
                    .unwrap_or_default();
                self.admit(dialer, c);
                let to = self.id(acceptor);
                for frame in queued {
                    if self.nodes[dialer].process.pool.peek(&to).is_some() {
                        self.send_frame(dialer, &to, frame);
                    } else {
                        self.counters.dial_queue_dropped += 1;
                    }
                }
                self.service(dialer);
                self.check_node(dialer);
            }
            Ev::Refuse {
                acceptor,
                dialer,
                dialer_inc,
                conn,
            } => self.dial_refused_or_timed_out(dialer, dialer_inc, acceptor, conn),
            Ev::DialTimeout {
                node,
                inc,
                peer,
                conn,
            } => self.dial_refused_or_timed_out(node, inc, peer, conn),
            Ev::Closed {
                node,
                inc,
                peer,
                conn,
                reason,
            } => {
                if !self.live(node, inc) {
                    return;
                }
                let peer_id = self.id(peer);
                let p = &mut self.nodes[node].process;
                if p.pool.remove_if(&peer_id, conn).is_some() {
                    self.counters.connections_closed += 1;
                    self.peer_down(node, peer, reason);
                    self.service(node);
                } else if p.dialing.get(&peer).is_some_and(|d| d.conn == conn) {
                    // The close overtook the accept (the acceptor kept
                    // another connection, or dropped this one at once): the
                    // dial is over; its frames take the pooled connection if
                    // there is one. The late accept finds no dial and is
                    // closed back.
                    let queued = p.dialing.remove(&peer).map(|d| d.queued);
                    self.counters.dials_failed += 1;
                    for frame in queued.unwrap_or_default() {
                        if self.nodes[node].process.pool.peek(&peer_id).is_some() {
                            self.send_frame(node, &peer_id, frame);
                        } else {
                            self.counters.dial_queue_dropped += 1;
                        }
                    }
                    self.nodes[node].process.dial_failed(&peer_id, now);
                    self.service(node);
                }
            }
            Ev::Timer { node, inc } => {
                let n = &mut self.nodes[node];
                if !n.alive || n.incarnation != inc || n.process.armed != Some(q.at) {
                    self.counters.timers_stale += 1;
                    return; // dead, or superseded by a re-arm
                }
                n.process.armed = None;
                n.process.timeout(now);
                self.service(node);
            }
            Ev::Lookup {
                node,
                target,
                kind,
                tag,
            } => {
                if !self.nodes[node].alive {
                    self.results.push((tag, failed_outcome(target, kind, now)));
                    return;
                }
                match self.nodes[node]
                    .process
                    .dht
                    .core_mut()
                    .start_lookup(target, kind, now)
                {
                    Ok(id) => {
                        self.tags.insert((node, id), tag);
                    }
                    Err(_) => self.results.push((tag, failed_outcome(target, kind, now))),
                }
                self.service(node);
            }
            Ev::Crash { node } => self.crash(node),
            Ev::Shutdown { node } => {
                if !self.nodes[node].alive {
                    return;
                }
                for c in self.sorted_conns(node) {
                    self.counters.connections_closed += 1;
                    let j = c.peer_index;
                    let ev = Ev::Closed {
                        node: j,
                        inc: c.peer_incarnation,
                        peer: node,
                        conn: c.conn,
                        reason: DownReason::Shutdown,
                    };
                    if self.reachable(node, j) {
                        let latency = self.net.latency.sample(&mut self.rng);
                        self.push(now.saturating_add(latency), ev);
                    } else {
                        self.timed_out_later(node, &c);
                    }
                }
                self.nodes[node].alive = false;
                self.deliveries.node_down(node);
                self.counters.stops += 1;
                self.nodes[node].process.dialing.clear();
                self.nodes[node].process.armed = None;
            }
            Ev::Restart { node, seeds } => self.restart(node, &seeds),
            Ev::Partition { groups } => {
                self.partition_generation += 1;
                let generation = self.partition_generation;
                self.partition = Some((generation, groups));
                let at = now.saturating_add(self.net.detect_after());
                self.push(at, Ev::PartitionExpire { generation });
            }
            Ev::Heal => self.partition = None,
            Ev::Supervise {
                node,
                inc,
                peer,
                backoff,
            } => {
                if !self.live(node, inc)
                    || self.nodes[node].process.pool.peek(&self.id(peer)).is_some()
                {
                    // Dead, or connected: a disconnection re-arms it.
                    return;
                }
                if !self.nodes[node].process.dialing.contains_key(&peer) {
                    self.dial(node, peer, Vec::new());
                }
                // Check again once this dial is decided, backing off.
                let jitter = self.rng.below(backoff.0 / 2 + 1);
                let next = Millis((backoff.0 * 2).min(RECONNECT_MAX.0));
                self.push(
                    now.saturating_add(self.net.dial_timeout)
                        .saturating_add(Millis(backoff.0 / 2 + jitter)),
                    Ev::Supervise {
                        node,
                        inc,
                        peer,
                        backoff: next,
                    },
                );
            }
            Ev::PartitionExpire { generation } => {
                if self
                    .partition
                    .as_ref()
                    .is_some_and(|(g, _)| *g == generation)
                {
                    self.cut_partitioned_connections();
                }
            }
        }
    }

    /// The partition lasted the failure detector's bound: every connection
    /// across it is declared down, at both ends.
    fn cut_partitioned_connections(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            let mut touched = false;
            for c in self.sorted_conns(i) {
                if self.reachable(i, c.peer_index) {
                    continue;
                }
                if self.nodes[i]
                    .process
                    .pool
                    .remove_if(&c.peer, c.conn)
                    .is_some()
                {
                    self.counters.connections_closed += 1;
                    self.peer_down(i, c.peer_index, DownReason::TimedOut);
                    touched = true;
                }
            }
            if touched {
                self.service(i);
            }
        }
    }

    /// Drains node `i`'s services (application events, frames, connection
    /// requests, DHT events) until they settle, re-arms its timer, and runs
    /// the per-step safety checks on it.
    fn service(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        let now = self.now;
        loop {
            self.nodes[i].process.pump(now);
            let mut any = false;
            while let Some(ev) = self.nodes[i].process.poll_app() {
                any = true;
                self.check_app(i, ev);
            }
            for outcome in std::mem::take(&mut self.nodes[i].process.handed) {
                self.check_lookup(i, &outcome);
            }
            while let Some((to, frame)) = self.nodes[i].process.drain() {
                any = true;
                self.send_frame(i, &to, frame);
            }
            while let Some(peer) = self.nodes[i].process.poll_dial() {
                any = true;
                self.want_dial(i, &peer);
            }
            while let Some(peer) = self.nodes[i].process.poll_close() {
                any = true;
                self.close_conn(i, &peer);
            }
            while let Some(ev) = self.nodes[i].process.poll_dht_event() {
                match ev {
                    Event::LookupFinished { id, outcome } => {
                        self.check_lookup(i, &outcome);
                        match self.tags.remove(&(i, id)) {
                            Some(tag) => self.results.push((tag, outcome)),
                            None => self.events.push((i, Event::LookupFinished { id, outcome })),
                        }
                    }
                    other => self.events.push((i, other)),
                }
            }
            if !any || self.failure.is_some() {
                break;
            }
        }
        let t = self.nodes[i].process.poll_timeout();
        if t != self.nodes[i].process.armed {
            self.nodes[i].process.armed = t;
            if let Some(t) = t {
                let inc = self.nodes[i].incarnation;
                self.push(t, Ev::Timer { node: i, inc });
            }
        }
        self.check_node(i);
    }

    /// Checks one thing node `i`'s application saw against the oracles.
    fn check_app(&mut self, i: usize, ev: AppEvent) {
        self.counters.checks += 1;
        let me = self.nodes[i].contact.id;
        let verdict = match ev {
            AppEvent::Published { topic, epoch, seq } => {
                self.counters.published += 1;
                if let Ok(t) = macula_pubsub::Topic::new(&topic) {
                    self.deliveries.published(me, epoch, seq, &t);
                }
                if let Some(log) = &mut self.publish_log {
                    log.push((i, topic, epoch, seq));
                }
                Ok(())
            }
            AppEvent::Delivered {
                sub,
                publisher,
                epoch,
                seq,
                topic,
            } => {
                self.counters.deliveries += 1;
                if let Some(log) = &mut self.delivery_log {
                    log.push((i, sub, publisher, epoch, seq));
                }
                match macula_pubsub::Topic::new(&topic) {
                    Ok(t) => self.deliveries.delivered(i, sub, publisher, epoch, seq, &t),
                    Err(_) => Err(Violation::NeverPublished {
                        node: i,
                        publisher,
                        epoch,
                        seq,
                        topic,
                    }),
                }
            }
            AppEvent::CallSent { app, provider } => {
                self.calls.sent(i, app, provider);
                Ok(())
            }
            AppEvent::Ran { caller, app } => {
                self.counters.handler_runs += 1;
                match self.by_id.get(&caller) {
                    Some(&c) => self.calls.ran(me, c, app),
                    None => Ok(()),
                }
            }
            AppEvent::CallDone { app, result } => {
                let v = match &result {
                    Ok((from, answered)) => {
                        self.counters.calls_ok += 1;
                        self.calls.answered(i, app, *from, *answered)
                    }
                    Err(f) => {
                        self.counters.calls_failed += 1;
                        *self
                            .counters
                            .call_failures
                            .entry(failure_name(f))
                            .or_insert(0) += 1;
                        self.calls.failed(i, app)
                    }
                };
                self.call_outcomes.push((i, app, result));
                v
            }
        };
        if let Err(v) = verdict {
            self.fail(v);
        }
    }

    /// A service of node `i` wants a connection to `peer`: dial unless one
    /// is pooled or being dialed.
    fn want_dial(&mut self, i: usize, peer: &NodeId) {
        let Some(&j) = self.by_id.get(peer) else {
            let now = self.now;
            self.nodes[i].process.dial_failed(peer, now);
            return;
        };
        let p = &self.nodes[i].process;
        if j == i || p.pool.peek(peer).is_some() || p.dialing.contains_key(&j) {
            return;
        }
        self.dial(i, j, Vec::new());
    }

    /// A service of node `i` closes its connection to `peer` (a provider
    /// that failed its liveness probe).
    fn close_conn(&mut self, i: usize, peer: &NodeId) {
        let Some(&j) = self.by_id.get(peer) else {
            return;
        };
        let Some(c) = self.nodes[i].process.pool.peek(peer).cloned() else {
            return;
        };
        if self.nodes[i].process.pool.remove_if(peer, c.conn).is_some() {
            self.close_remote(i, &c);
            self.peer_down(i, j, DownReason::Closed);
        }
    }

    /// Node `i` (in incarnation `inc`) was refused by node `j`, or its dial
    /// `conn` to `j` timed out: the dial fails unless a newer one replaced it.
    fn dial_refused_or_timed_out(&mut self, i: usize, inc: u32, j: usize, conn: usize) {
        if !self.live(i, inc) {
            return;
        }
        let p = &mut self.nodes[i].process;
        if let Some(d) = p.dialing.remove(&j) {
            if d.conn == conn {
                self.counters.dials_failed += 1;
                self.counters.dial_queue_dropped += d.queued.len() as u64;
                self.dial_failed(i, j);
            } else {
                p.dialing.insert(j, d);
            }
        }
    }

    /// Node `i`'s dial to node `j` failed: its services learn it.
    fn dial_failed(&mut self, i: usize, j: usize) {
        let now = self.now;
        let id = self.id(j);
        self.nodes[i].process.dial_failed(&id, now);
        self.service(i);
    }

    /// Per-step safety: the routing table and pool never hold the node
    /// itself, the pool stays within its maximum, and every record newly
    /// stored verifies.
    fn check_node(&mut self, i: usize) {
        self.counters.checks += 1;
        let node = &self.nodes[i];
        let own = node.contact.id;
        let p = &node.process;
        if p.dht.core().routing().contains(&own) {
            return self.fail(Violation::RoutingHoldsSelf { node: i });
        }
        if p.pool.peek(&own).is_some() {
            return self.fail(Violation::PoolHoldsSelf { node: i });
        }
        if p.pool.len() > p.pool.max() {
            let (n, max) = (p.pool.len(), p.pool.max());
            return self.fail(Violation::PoolOverMax { node: i, n, max });
        }
        let stored = p.dht.core().stats().records_stored;
        if stored != p.audited_stores {
            self.nodes[i].process.audited_stores = stored;
            self.audit_store(i);
        }
    }

    /// True if `record` must verify and does not. Records of publishers with
    /// a caller-supplied authenticator are exempt (see
    /// [`Sim::add_node_with`]).
    fn record_is_bad(&mut self, record: &macula_dht::Record) -> bool {
        if let Some(&p) = self.by_id.get(&record.publisher) {
            if matches!(self.nodes[p].identity, Identity::Custom(_)) {
                return false;
            }
        }
        let signed = record.signed_bytes();
        let mut h = blake3::Hasher::new();
        h.update(&signed);
        h.update(&record.signature);
        let digest = *h.finalize().as_bytes();
        if self.verified.contains(&digest) {
            return false;
        }
        self.counters.checks += 1;
        if !verify_record_signature(&record.publisher, &signed, &record.signature) {
            return true;
        }
        if self.verified.len() >= MAX_VERIFIED_RECORDS {
            self.verified.clear();
        }
        self.verified.insert(digest);
        false
    }

    /// Every record node `i` stores verifies.
    pub fn audit_store(&mut self, i: usize) {
        let records: Vec<macula_dht::Record> = self.nodes[i]
            .process
            .dht
            .core()
            .store()
            .iter()
            .map(|s| s.record.clone())
            .collect();
        for r in records {
            if self.record_is_bad(&r) {
                return self.fail(Violation::RecordDoesNotVerify {
                    node: i,
                    place: "stores",
                    key: r.key,
                    publisher: r.publisher,
                });
            }
        }
    }

    fn check_lookup(&mut self, i: usize, outcome: &LookupOutcome) {
        self.counters.checks += 1;
        for r in &outcome.records {
            if r.key != outcome.target {
                return self.fail(Violation::RecordUnderWrongKey {
                    node: i,
                    asked: outcome.target,
                    got: r.key,
                });
            }
            if self.record_is_bad(r) {
                return self.fail(Violation::RecordDoesNotVerify {
                    node: i,
                    place: "was handed",
                    key: r.key,
                    publisher: r.publisher,
                });
            }
        }
    }

    /// Whole-mesh audit (run at phase ends): every live store verifies, and
    /// two live nodes holding connections to each other hold the same one
    /// unless a handshake or close between them is still in flight.
    pub fn audit(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive {
                self.audit_store(i);
            }
        }
        for a in 0..self.nodes.len() {
            if !self.nodes[a].alive {
                continue;
            }
            let a_id = self.id(a);
            for c in self.sorted_conns(a) {
                let b = c.peer_index;
                if b < a || !self.live(b, c.peer_incarnation) {
                    continue;
                }
                self.counters.checks += 1;
                let Some(cb) = self.nodes[b].process.pool.peek(&a_id) else {
                    continue;
                };
                if cb.conn != c.conn && !self.conn_events.contains_key(&(a, b)) {
                    let conn_b = cb.conn;
                    return self.fail(Violation::PoolsDisagree {
                        a,
                        b,
                        conn_a: c.conn,
                        conn_b,
                    });
                }
            }
        }
    }

    /// One (source, target) pair per live node, such that every live node is
    /// the target of exactly one lookup and the source of about one: the
    /// convergence check. Sampling all N² pairs is out of reach at 10,000
    /// nodes; this covers every node on both sides, so an isolated node (say,
    /// one whose join was lost) cannot hide from the check.
    pub fn coverage_pairs(&mut self) -> Vec<(usize, usize)> {
        let alive = self.alive_nodes();
        if alive.len() < 2 {
            return Vec::new();
        }
        let mut sources = alive.clone();
        self.rng.shuffle(&mut sources);
        alive
            .iter()
            .zip(sources)
            .map(|(&target, source)| {
                if source != target {
                    return (source, target);
                }
                loop {
                    let s = alive[self.rng.below(alive.len() as u64) as usize];
                    if s != target {
                        return (s, target);
                    }
                }
            })
            .collect()
    }

    /// `n` random (source, target) pairs of distinct live nodes.
    pub fn random_pairs(&mut self, n: usize) -> Vec<(usize, usize)> {
        let alive = self.alive_nodes();
        if alive.len() < 2 {
            return Vec::new();
        }
        (0..n)
            .map(|_| {
                let a = alive[self.rng.below(alive.len() as u64) as usize];
                loop {
                    let b = alive[self.rng.below(alive.len() as u64) as usize];
                    if b != a {
                        return (a, b);
                    }
                }
            })
            .collect()
    }

    /// Runs FIND_NODE lookups for `pairs`, started at random times within
    /// `spread` from now, until all finish (or `give_up` passes), and measures
    /// them. A lookup succeeds when the target itself answered.
    pub fn run_lookups(
        &mut self,
        pairs: &[(usize, usize)],
        spread: Millis,
        give_up: Millis,
    ) -> LookupFigures {
        self.run_lookups_detailed(pairs, spread, give_up).0
    }

    /// [`Sim::run_lookups`], also returning the pairs whose target was not found.
    pub fn run_lookups_detailed(
        &mut self,
        pairs: &[(usize, usize)],
        spread: Millis,
        give_up: Millis,
    ) -> (LookupFigures, Vec<(usize, usize)>) {
        let start = self.now;
        let mut targets = HashMap::new();
        for &(src, dst) in pairs {
            let at = start.saturating_add(Millis(self.rng.below(spread.0.saturating_add(1))));
            let tag = self.schedule_lookup(src, self.id(dst), LookupKind::FindNode, at);
            targets.insert(tag, (src, dst));
        }
        let deadline = start.saturating_add(spread).saturating_add(give_up);
        let mut outcomes = Vec::with_capacity(pairs.len());
        let n = pairs.len();
        self.run_until_or(deadline, |sim| sim.results.len() >= n);
        let mut failed = Vec::new();
        for (tag, outcome) in self.take_results() {
            if let Some(pair) = targets.remove(&tag) {
                if !outcome.found_target() {
                    failed.push(pair);
                }
                outcomes.push(outcome);
            }
        }
        // Whatever did not finish by the deadline counts as failed, in pair
        // order (the map's order must not leak into the run).
        self.tags.retain(|_, tag| !targets.contains_key(tag));
        let mut unfinished: Vec<(u64, (usize, usize))> = targets.into_iter().collect();
        unfinished.sort_unstable();
        failed.extend(unfinished.into_iter().map(|(_, p)| p));
        (LookupFigures::from_outcomes(&outcomes, pairs.len()), failed)
    }
}

/// The name of a call failure's kind.
fn failure_name(f: &macula_rpc::CallFailure<NodeId>) -> &'static str {
    use macula_rpc::CallFailure as F;
    match f {
        F::NoProviders => "NoProviders",
        F::Timeout => "Timeout",
        F::Handler { .. } => "Handler",
        F::Panicked { .. } => "Panicked",
        F::Overloaded { .. } => "Overloaded",
        F::Unreachable { .. } => "Unreachable",
        F::Cancelled => "Cancelled",
        F::Unauthorized { .. } => "Unauthorized",
    }
}

fn failed_outcome(target: NodeId, kind: LookupKind, now: Millis) -> LookupOutcome {
    LookupOutcome {
        target,
        kind,
        closest: Vec::new(),
        records: Vec::new(),
        stats: LookupStats {
            rounds: 0,
            hops: None,
            n_requests: 0,
            n_failed: 0,
            started: now,
            finished: now,
        },
    }
}
