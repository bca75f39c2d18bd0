//! The pub/sub core (`macula_pubsub::PubSubCore`, role `Node`) as a
//! [`Service`], fed the way the runtime's driver (`runtime/src/pubsub/`)
//! feeds it:
//!
//! - **Interest** ([`Action::LookupInterest`], [`Action::PutInterest`]) goes
//!   through the node's own DHT core (`DhtReq`s); results
//!   come back as `handle_interest_found` / `handle_interest_put`, a
//!   withdrawal is followed by `unpublish`.
//! - **Publishing** is one application task publishing in order: the head
//!   of the queue takes the cached route, else asks `route` with
//!   `Patience::Wait` until the lookups it started finish or
//!   `ROUTE_WAIT_MAX` passes, then `Patience::Now` (the runtime's bound).
//! - **Senders** ([`Action::Start`], [`Action::Wake`]): one per peer queue.
//!   A woken sender with a connection to its node drains `poll_transmit`,
//!   encodes each batch with `Batch::encode` (sized to the receiver) and
//!   sends every PUBLISH_BATCH frame, then `handle_written`; without a
//!   connection it asks the engine to dial, and a failed dial is
//!   `handle_unreachable` (the stale-interest path). An idle sender asks
//!   `retire_if_idle` after `SENDER_IDLE`.
//! - **Frames in**: PUBLISH_BATCH bodies go to `handle_batch` with one
//!   `BatchReceiver` per sending peer (the runtime's per-stream state);
//!   deliveries become [`AppEvent::Delivered`].
//! - **Peers**: up is `handle_peer_up` with the default frame limit (every
//!   simulated node announces it), down is `handle_peer_down`, `Left` for a
//!   goodbye or a transport timeout, `Closed` otherwise (as the runtime's
//!   connection driver maps it).
//!
//! Writes complete at once (the simulated network has no flow control), so
//! the stall cut-off is not exercised here; the pub/sub core's own tests
//! cover it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use macula_dht::{Contact, Record};
use macula_pool::PoolTable;
use macula_pubsub::outbound::SENDER_IDLE;
use macula_pubsub::{
    Action, BatchReceiver, Config, Deliveries, InterestRecord, Limits, OutMsg, Patience, PeerDown,
    PeerRef, PubSubCore, PublishOptions, Role, RouteStep, Transmit,
};
use macula_wire::time::Millis;
use macula_wire::{FrameDecoder, MessageType, NodeId, DEFAULT_MAX_FRAME_SIZE};

pub use crate::service::PubSubMsg;
use crate::service::{AppEvent, DhtDone, DhtReq, DownReason, Service, SimConn};

/// How long a publish waits for the interest lookups its route needs
/// before it is routed with what is known (the runtime's `ROUTE_WAIT_MAX`).
pub const ROUTE_WAIT_MAX: Millis = Millis(15_000);
/// Publishes one node's application may have waiting; past it a publish is
/// refused (counted), as an application awaiting each publish would not
/// queue without bound.
pub const MAX_WAITING_PUBLISHES: usize = 1024;

/// A subscription's sink in the core: the application's subscription tag.
type Sink = u64;
/// A sender's wake handle: set when its queue has work.
type Wake = Arc<AtomicBool>;
type Core = PubSubCore<Sink, Wake>;

struct Sender {
    peer: PeerRef,
    wake: Wake,
    /// A dial was asked for and has not been decided.
    dialing: bool,
    /// Found its queue empty at this time (`retire_if_idle` is asked
    /// `SENDER_IDLE` later).
    idle_since: Option<Millis>,
}

struct Waiting {
    topic: String,
    payload: Bytes,
    give_up: Millis,
}

/// What a DHT request of this service was for.
enum Pending {
    Lookup(String),
    Put {
        name: String,
        changes: u64,
        key: NodeId,
        withdraw: bool,
    },
}

/// The pub/sub core of one simulated node, and the driver around it.
pub struct PubSubService {
    core: Core,
    senders: BTreeMap<NodeId, Sender>,
    receivers: HashMap<NodeId, BatchReceiver<Sink>>,
    waiting: VecDeque<Waiting>,
    /// When the head of `waiting` asks for its route again.
    retry_route: Option<Millis>,
    dht: VecDeque<DhtReq>,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    /// Unpublish after these withdrawals' puts.
    unpublish: VecDeque<NodeId>,
    frames: VecDeque<(NodeId, PubSubMsg)>,
    dials: VecDeque<NodeId>,
    app: VecDeque<AppEvent>,
    msgs: Vec<OutMsg>,
    buf: Vec<u8>,
    /// Publishes refused because the application queue was full.
    pub refused: u64,
    /// Batches refused by `handle_batch` (the runtime closes the stream).
    pub bad_batches: u64,
    /// Missed events told to subscriptions from loss reports.
    pub missed_told: u64,
}

impl PubSubService {
    pub(crate) fn new(node_id: NodeId, epoch: u64, realm: &str) -> PubSubService {
        Self::with_limits(node_id, epoch, realm, Limits::default())
    }

    /// A core with these limits (tests shrink them to break it on purpose).
    pub(crate) fn with_limits(
        node_id: NodeId,
        epoch: u64,
        realm: &str,
        limits: Limits,
    ) -> PubSubService {
        let mut config = Config::new(node_id, epoch, realm, Role::Node, DEFAULT_MAX_FRAME_SIZE);
        config.interest.record_max = macula_dht::config::MAX_VALUE_LEN;
        config.limits = limits;
        PubSubService {
            core: Core::new(config),
            senders: BTreeMap::new(),
            receivers: HashMap::new(),
            waiting: VecDeque::new(),
            retry_route: None,
            dht: VecDeque::new(),
            pending: HashMap::new(),
            next_tag: 0,
            unpublish: VecDeque::new(),
            frames: VecDeque::new(),
            dials: VecDeque::new(),
            app: VecDeque::new(),
            msgs: Vec::new(),
            buf: Vec::new(),
            refused: 0,
            bad_batches: 0,
            missed_told: 0,
        }
    }

    /// The core, read-only.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Subscribes `pattern` for the application's subscription `sub`.
    pub(crate) fn subscribe(&mut self, pattern: &str, sub: u64) -> Result<(), String> {
        self.core
            .subscribe(pattern, sub)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The application publishes `payload` on `topic` (after the publishes
    /// it is still waiting for).
    pub(crate) fn publish(&mut self, topic: &str, payload: Bytes, now: Millis) {
        if self.waiting.len() >= MAX_WAITING_PUBLISHES {
            self.refused += 1;
            return;
        }
        self.waiting.push_back(Waiting {
            topic: topic.to_string(),
            payload,
            give_up: now.saturating_add(ROUTE_WAIT_MAX),
        });
    }

    /// Publishes waiting for their route.
    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn poll_dht(&mut self) -> Option<DhtReq> {
        self.dht.pop_front()
    }

    pub(crate) fn poll_unpublish(&mut self) -> Option<NodeId> {
        self.unpublish.pop_front()
    }

    pub(crate) fn poll_dial(&mut self) -> Option<NodeId> {
        self.dials.pop_front()
    }

    pub(crate) fn poll_app(&mut self) -> Option<AppEvent> {
        self.app.pop_front()
    }

    fn tag(&mut self, p: Pending) -> u64 {
        self.next_tag += 1;
        self.pending.insert(self.next_tag, p);
        self.next_tag
    }

    /// A DHT request of this service finished.
    pub(crate) fn handle_dht(&mut self, done: DhtDone, now: Millis) {
        let (tag, result) = match done {
            DhtDone::Got { tag, result } => (tag, result.map(Some)),
            DhtDone::Put { tag, result } => (tag, result.map(|()| None)),
        };
        match (self.pending.remove(&tag), result) {
            (Some(Pending::Lookup(name)), r) => {
                let records = r.map(|records| {
                    records
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r: Record| InterestRecord {
                            publisher: r.publisher,
                            seq: r.seq,
                            value: r.value,
                        })
                        .collect()
                });
                self.core.handle_interest_found(&name, records, now);
            }
            (
                Some(Pending::Put {
                    name,
                    changes,
                    key,
                    withdraw,
                }),
                r,
            ) => {
                let r = r.map(|_| ());
                if withdraw && r.is_ok() {
                    self.unpublish.push_back(key);
                }
                self.core.handle_interest_put(&name, changes, r);
            }
            (None, _) => {}
        }
    }

    /// A dial to `node` failed (refused, timed out): its sender could not
    /// reach it.
    pub(crate) fn handle_dial_failed(&mut self, node: &NodeId, now: Millis) {
        if let Some(s) = self.senders.get_mut(node) {
            if s.dialing {
                s.dialing = false;
                let peer = s.peer;
                self.core.handle_unreachable(peer, now);
                self.senders.remove(node);
            }
        }
    }

    /// Does what the core asked for and moves the application's publishes
    /// and the senders on, until nothing changes.
    pub(crate) fn pump(&mut self, now: Millis, pool: &PoolTable<SimConn>) {
        loop {
            self.publish_waiting(now);
            let mut acted = false;
            while let Some(a) = self.core.poll_action() {
                acted = true;
                self.act(a);
            }
            self.run_senders(now, pool);
            if !acted && !self.core.has_actions() {
                break;
            }
        }
    }

    fn act(&mut self, a: Action<Wake>) {
        match a {
            Action::Start { peer, node, sender } => {
                sender.store(true, Relaxed);
                self.senders.insert(
                    node,
                    Sender {
                        peer,
                        wake: sender,
                        dialing: false,
                        idle_since: None,
                    },
                );
            }
            Action::Wake(w) => w.store(true, Relaxed),
            Action::LookupInterest { name, key } => {
                let tag = self.tag(Pending::Lookup(name));
                self.dht.push_back(DhtReq::Get { key, tag });
            }
            Action::PutInterest(put) => {
                let withdraw = put.is_withdrawal();
                let tag = self.tag(Pending::Put {
                    name: put.name,
                    changes: put.changes,
                    key: put.key,
                    withdraw,
                });
                self.dht.push_back(DhtReq::Put {
                    key: put.key,
                    value: put.value,
                    ttl: put.ttl,
                    tag,
                });
            }
        }
    }

    /// Publishes the waiting head while it has a route.
    fn publish_waiting(&mut self, now: Millis) {
        while let Some(w) = self.waiting.front() {
            let route = match self.core.cached_route(&w.topic, now) {
                Some(r) => r,
                None => {
                    let patience = match now < w.give_up {
                        true => Patience::Wait,
                        false => Patience::Now,
                    };
                    match self.core.route(&w.topic, now, patience) {
                        Ok(RouteStep::Ready(r)) => r,
                        Ok(RouteStep::Wait { until }) => {
                            let give_up = w.give_up;
                            self.retry_route = Some(until.map_or(give_up, |u| u.min(give_up)));
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(topic = %w.topic, error = %e, "publish refused");
                            self.refused += 1;
                            self.waiting.pop_front();
                            continue;
                        }
                    }
                }
            };
            self.retry_route = None;
            let Some(w) = self.waiting.pop_front() else {
                return;
            };
            let mut out: Deliveries<Sink> = Vec::new();
            match self.core.publish_routed(
                &route,
                w.payload,
                PublishOptions::default(),
                now,
                &mut out,
            ) {
                Ok(p) => {
                    self.app.push_back(AppEvent::Published {
                        topic: w.topic,
                        epoch: self.core.epoch(),
                        seq: p.seq,
                    });
                    for (sub, e) in out {
                        self.app.push_back(AppEvent::Delivered {
                            sub,
                            publisher: e.publisher,
                            epoch: e.epoch,
                            seq: e.seq,
                            topic: e.topic.as_str().to_string(),
                        });
                    }
                }
                Err(e) => {
                    tracing::debug!(topic = %w.topic, error = %e, "publish refused");
                    self.refused += 1;
                }
            }
        }
        self.retry_route = None;
    }

    /// Runs every woken sender: sends what its queue holds if its node is
    /// connected, else asks for a dial.
    fn run_senders(&mut self, now: Millis, pool: &PoolTable<SimConn>) {
        let nodes: Vec<NodeId> = self
            .senders
            .iter()
            .filter(|(_, s)| s.wake.load(Relaxed))
            .map(|(n, _)| *n)
            .collect();
        for node in nodes {
            let Some(s) = self.senders.get_mut(&node) else {
                continue;
            };
            if pool.peek(&node).is_none() {
                if !s.dialing {
                    s.dialing = true;
                    self.dials.push_back(node);
                }
                continue;
            }
            s.dialing = false;
            s.wake.store(false, Relaxed);
            let peer = s.peer;
            let retired = self.drain_sender(peer, node, now);
            if retired {
                self.senders.remove(&node);
            } else if let Some(s) = self.senders.get_mut(&node) {
                s.idle_since = Some(now);
            }
        }
    }

    /// Sends everything queued for `node`; true if the queue was retired.
    fn drain_sender(&mut self, peer: PeerRef, node: NodeId, now: Millis) -> bool {
        loop {
            self.msgs.clear();
            let batch = match self.core.poll_transmit(peer, &mut self.msgs, now) {
                Transmit::Batch(b) => b,
                Transmit::Empty => return false,
                Transmit::Retired => return true,
                Transmit::Finish => {
                    self.core.handle_finished(peer);
                    return true;
                }
            };
            if self.core.handle_progress(peer, now).is_none() {
                return true;
            }
            self.buf.clear();
            let encoded = batch.encode(&mut self.buf, &self.msgs);
            let decoder = FrameDecoder::new(u32::MAX);
            let mut at = 0;
            while let Ok(Some((f, used))) = decoder.decode(&self.buf[at..]) {
                let body = Bytes::copy_from_slice(f.body);
                let msg = match f.header.msg_type {
                    t if t == MessageType::PublishDropped as u8 => PubSubMsg::Dropped(body),
                    _ => PubSubMsg::Batch(body),
                };
                self.frames.push_back((node, msg));
                at += used;
            }
            self.core
                .handle_written(peer, &batch, &self.msgs, encoded, now);
        }
    }
}

impl Service for PubSubService {
    type Msg = PubSubMsg;

    fn handle_frame(&mut self, from: &Contact, msg: PubSubMsg, now: Millis) -> Option<PubSubMsg> {
        let (msg_type, body) = match msg {
            PubSubMsg::Batch(b) => (MessageType::PublishBatch, b),
            PubSubMsg::Dropped(b) => (MessageType::PublishDropped, b),
        };
        let rx = self
            .receivers
            .entry(from.id)
            .or_insert_with(|| BatchReceiver::new(false));
        let r = self
            .core
            .handle_batch(from.id, msg_type as u8, &body, rx, now);
        if let Err(reason) = r {
            tracing::debug!(peer = %from.id, %reason, "bad pub/sub batch");
            self.bad_batches += 1;
            self.receivers.remove(&from.id);
            return None;
        }
        self.missed_told += rx.deliver_lagged(|_, _| {});
        let app = &mut self.app;
        rx.deliver(|sub, events| {
            for e in events.drain(..) {
                app.push_back(AppEvent::Delivered {
                    sub: *sub,
                    publisher: e.publisher,
                    epoch: e.epoch,
                    seq: e.seq,
                    topic: e.topic.as_str().to_string(),
                });
            }
        });
        None
    }

    fn handle_peer_up(&mut self, peer: &Contact, _now: Millis) {
        self.core.handle_peer_up(&peer.id, DEFAULT_MAX_FRAME_SIZE);
    }

    fn handle_peer_down(&mut self, peer: &NodeId, reason: DownReason, now: Millis) {
        let why = match reason {
            DownReason::Shutdown | DownReason::TimedOut => PeerDown::Left,
            DownReason::Evicted | DownReason::Closed | DownReason::Reset => PeerDown::Closed,
        };
        self.core.handle_peer_down(peer, why, now);
        // A new connection gets a new data stream, and its receive state.
        self.receivers.remove(peer);
    }

    fn handle_timeout(&mut self, now: Millis) {
        let idle: Vec<(NodeId, PeerRef)> = self
            .senders
            .iter()
            .filter(|(_, s)| {
                s.idle_since
                    .is_some_and(|t| now >= t.saturating_add(SENDER_IDLE))
            })
            .map(|(n, s)| (*n, s.peer))
            .collect();
        for (node, peer) in idle {
            if self.core.retire_if_idle(peer, now) {
                self.senders.remove(&node);
            } else if let Some(s) = self.senders.get_mut(&node) {
                s.idle_since = None;
            }
        }
    }

    fn poll_transmit(&mut self) -> Option<(NodeId, PubSubMsg)> {
        self.frames.pop_front()
    }

    fn poll_timeout(&self) -> Option<Millis> {
        let idle = self
            .senders
            .values()
            .filter_map(|s| s.idle_since)
            .min()
            .map(|t| t.saturating_add(SENDER_IDLE));
        match (idle, self.retry_route) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
