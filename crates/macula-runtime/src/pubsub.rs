//! Pub/sub on one node: subscriptions, matching and in-process delivery.
//!
//! `publish` matches the topic against every local subscription (through the
//! `macula_pubsub::Sublist` trie and its cache) and pushes one event into each
//! matching subscription's bounded queue; a `Subscription` is a
//! `futures::Stream` that drains it. Local delivery never touches the
//! network. Delivery to other nodes builds on this: one interest record in
//! the DHT per rendezvous name this node's patterns use (a summary when the
//! exact list is over the DHT's value limit; messages the summary lets
//! through are dropped here and counted), one copy per interested node.
//!
//! Flow control: each queue is bounded (`Limits::queue_capacity`, default
//! 1024). A subscriber that falls behind loses its *oldest* events, never
//! blocks the publisher or other subscribers, and is told: the stream yields
//! `SubscriptionItem::Lagged(n)` before the next event. Every drop is counted.
//!
//! This module must not block on a subscriber, and must not hold its lock
//! while waking one.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use macula_pubsub::{
    interest_segment, lookup_names, segment_name, summarize, BoundedQueue, Limits, Observed,
    Pattern, SeqTracker, Sublist, Topic, TopicError,
};
use macula_wire::{
    BatchItem, DisconnectReason, ErrorCode, Message, MessageType, NodeId, Publish, PublishBatchView,
};
use tokio::sync::Notify;

use crate::dht::DhtHandle;
use crate::framed::FrameReader;
use crate::metrics::ProtocolErrorKind;
use crate::peer::Peer;
use crate::service::{Answer, Serves, Service, ServiceFuture};

/// Headers on one message; more is `PubSubError::TooManyHeaders`.
pub const MAX_HEADERS: usize = 32;
/// Length of one header name.
pub const MAX_HEADER_NAME_LEN: usize = 64;
/// Length of one header value.
pub const MAX_HEADER_VALUE_LEN: usize = 1024;
/// Room kept in a frame for topic, headers and framing, so any payload we
/// accept locally also fits one frame when it is sent to another node.
pub const FRAME_HEADROOM: usize = 64 * 1024;
/// Subscriptions one node holds; a bound on memory and on fan-out cost.
pub const MAX_SUBSCRIPTIONS: usize = 100_000;
/// Lifetime of an interest record in the DHT; the DHT republishes it at 75%
/// while the subscription lives, and it lapses this long after a crash.
pub const INTEREST_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// Largest interest record value: the DHT's record limit. A node whose
/// patterns under one name do not fit publishes a summary
/// (`macula_pubsub::summarize`) and drops what it did not ask for.
pub const INTEREST_RECORD_MAX: usize = macula_dht::config::MAX_VALUE_LEN;
/// Rendezvous names whose last interest put a node remembers beyond those
/// it has a live record under (the rest only save a redundant empty put).
const INTEREST_PUTS_REMEMBERED: usize = 4096;
/// How long a publisher reuses what it learned about interest in a topic.
/// This is the delivery bound: a publish that starts more than this long
/// after `subscribe` returned reaches the new subscriber, and one that starts
/// more than this long after the subscription was dropped is not sent to its
/// node for it.
pub const INTEREST_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// An expired interest entry younger than this is still used while a
/// background lookup refreshes it, so a slow DHT delays what publishers learn
/// (by the lookup's duration) instead of stalling every publish.
pub const INTEREST_STALE_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a publish waits for the refresh of an expired interest entry
/// before using the expired one (the refresh goes on in the background).
pub const INTEREST_REFRESH_WAIT: std::time::Duration = std::time::Duration::from_millis(250);
/// Rendezvous names whose interest a publisher caches at once.
pub const INTEREST_CACHE_CAPACITY: usize = 1024;
/// Messages queued for one remote node; past this, new ones to it are
/// dropped and counted (a peer that cannot keep up never stalls publishers).
pub const PEER_QUEUE_CAPACITY: usize = 65_536;
/// Payload bytes queued for one remote node; past this, new messages to it
/// are dropped and counted, like `PEER_QUEUE_CAPACITY`.
pub const PEER_QUEUE_BYTES: usize = 32 << 20;
pub use crate::config::PEER_STALL_TIMEOUT;
/// Topics whose interested nodes a publisher remembers at once (the route
/// cache in front of the interest cache).
pub const ROUTE_CACHE_CAPACITY: usize = 4096;
/// First byte of a unidirectional stream that carries pub/sub data
/// (PUBLISH_BATCH frames from the opener). See docs/PROTOCOL.md §3.
pub const STREAM_KIND_PUBSUB: u8 = 0x01;
/// Target size of one PUBLISH_BATCH body: bounds the write buffer and how
/// much one frame pins in memory at the receiver (events slice the frame).
pub const BATCH_BYTES: usize = 64 * 1024;
/// Remote nodes with an outbound queue at once.
pub const MAX_OUTBOUND_PEERS: usize = 65_536;

/// What one queued event weighs besides its payload, for the byte limit of
/// subscription queues (`Limits::queue_bytes`).
const EVENT_OVERHEAD: usize = std::mem::size_of::<Event>();

/// Why a publish or subscribe was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PubSubError {
    #[error("invalid topic {topic:?}: {source}")]
    InvalidTopic { topic: String, source: TopicError },
    #[error("invalid pattern {pattern:?}: {source}")]
    InvalidPattern { pattern: String, source: TopicError },
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("{n} headers, the limit is {MAX_HEADERS}")]
    TooManyHeaders { n: usize },
    #[error("header {name:?} is too long (name <= {MAX_HEADER_NAME_LEN}, value <= {MAX_HEADER_VALUE_LEN} bytes)")]
    HeaderTooLong { name: String },
    #[error("this node already has {max} subscriptions")]
    TooManySubscriptions { max: usize },
    /// The subscription could not be announced to the mesh (DHT put failed);
    /// it was not created.
    #[error("could not register interest in {pattern:?} with the mesh: {reason}")]
    Interest { pattern: String, reason: String },
    /// Client mode: no gateway connection right now (it is failing over to
    /// another configured node); the message was not sent.
    #[error("not attached to a gateway (client mode); retry once it reconnects")]
    Detached,
}

/// A topic name as events carry it: shared (cloning it is a reference-count
/// increment, not a copy), compares with `&str` and `String`, and derefs to
/// `str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TopicName {
    fn from(s: &str) -> Self {
        TopicName(Arc::from(s))
    }
}

impl From<String> for TopicName {
    fn from(s: String) -> Self {
        TopicName(Arc::from(s))
    }
}

impl From<TopicName> for String {
    fn from(t: TopicName) -> String {
        t.0.to_string()
    }
}

impl PartialEq<str> for TopicName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for TopicName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for TopicName {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl serde::Serialize for TopicName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Shared between the events of one topic (see `TopicName`).
    pub topic: TopicName,
    pub payload: Bytes,
    /// The node that published it.
    pub publisher: NodeId,
    /// Publisher's sequence number (per publisher epoch, from 1): events of
    /// one publisher arrive in this order, without duplicates.
    pub seq: u64,
    /// Identifies the publisher's run (Unix ms of its start): `seq` restarts
    /// at 1 when it changes.
    pub epoch: u64,
    pub headers: Vec<(String, String)>,
    /// Application message ID, if the publisher set one.
    pub message_id: Option<String>,
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionItem {
    Event(Event),
    /// The subscriber was too slow: this many older events were dropped.
    Lagged(u64),
}

/// Options of `publish_with`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
}

/// Counters, read by the metrics collector.
#[derive(Debug, Default)]
pub struct PubSubCounters {
    pub published_total: AtomicU64,
    /// Events pushed into local subscription queues.
    pub delivered_local_total: AtomicU64,
    /// Events dropped from full queues (slow subscribers).
    pub dropped_slow_total: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Messages queued to other nodes (one per interested node).
    pub sent_remote_total: AtomicU64,
    /// Messages received from other nodes and delivered.
    pub received_remote_total: AtomicU64,
    /// Received duplicates (or stale sequence numbers) dropped.
    pub duplicates_dropped_total: AtomicU64,
    /// Messages the receiver saw as missing (sequence gaps).
    pub gaps_total: AtomicU64,
    /// Outbound messages dropped: peer queue full, or peer unreachable.
    pub remote_dropped_total: AtomicU64,
    /// Received messages refused (bad topic, publisher mismatch, oversized).
    pub remote_rejected_total: AtomicU64,
    /// PUBLISH_BATCH frames written to data streams.
    pub batches_sent_total: AtomicU64,
    /// PUBLISH_BATCH frames received.
    pub batches_received_total: AtomicU64,
    /// Peers cut off because their data stream accepted nothing for the
    /// stall timeout.
    pub peers_cut_off_total: AtomicU64,
    /// Inbound data streams closed for bad input (malformed frame, wrong
    /// kind, publisher mismatch).
    pub data_streams_rejected_total: AtomicU64,
    /// Messages received that another node forwarded for their publisher
    /// (a gateway for its client).
    pub forwarded_received_total: AtomicU64,
    /// Messages this node forwarded as a gateway: clients' messages into
    /// the mesh and matching events to clients (one per target).
    pub forwarded_sent_total: AtomicU64,
    /// Received messages (new, valid) that matched no subscription or
    /// client feed here: dropped quietly. Expected after an interest record
    /// was summarized, and briefly after an unsubscribe.
    pub unmatched_total: AtomicU64,
    /// Interest record puts into the DHT, failed ones included (concurrent
    /// updates of one name share a put).
    pub interest_puts_total: AtomicU64,
    /// Interest records put as a summary (generalized patterns) because the
    /// exact list was over `INTEREST_RECORD_MAX`.
    pub interest_summarized_total: AtomicU64,
}

impl PubSubCounters {
    fn rows(&self) -> [(&'static str, &'static str, u64); 19] {
        let g = |a: &AtomicU64| a.load(Relaxed);
        [
            (
                "macula_pubsub_published_total",
                "Messages published on this node.",
                g(&self.published_total),
            ),
            (
                "macula_pubsub_delivered_local_total",
                "Events queued to local subscriptions.",
                g(&self.delivered_local_total),
            ),
            (
                "macula_pubsub_dropped_slow_total",
                "Events dropped from full subscription queues (slow subscribers).",
                g(&self.dropped_slow_total),
            ),
            (
                "macula_pubsub_subscriptions",
                "Live subscriptions on this node.",
                g(&self.subscriptions),
            ),
            (
                "macula_pubsub_sent_remote_total",
                "Messages queued to interested nodes (one per node).",
                g(&self.sent_remote_total),
            ),
            (
                "macula_pubsub_received_remote_total",
                "Messages received from other nodes and delivered.",
                g(&self.received_remote_total),
            ),
            (
                "macula_pubsub_duplicates_dropped_total",
                "Received duplicates dropped.",
                g(&self.duplicates_dropped_total),
            ),
            (
                "macula_pubsub_gaps_total",
                "Messages seen missing from a publisher's sequence.",
                g(&self.gaps_total),
            ),
            (
                "macula_pubsub_remote_dropped_total",
                "Outbound messages dropped (queue full or node unreachable).",
                g(&self.remote_dropped_total),
            ),
            (
                "macula_pubsub_remote_rejected_total",
                "Received messages refused (bad topic, wrong publisher, oversized).",
                g(&self.remote_rejected_total),
            ),
            (
                "macula_pubsub_batches_sent_total",
                "PUBLISH_BATCH frames written to pub/sub data streams.",
                g(&self.batches_sent_total),
            ),
            (
                "macula_pubsub_batches_received_total",
                "PUBLISH_BATCH frames received.",
                g(&self.batches_received_total),
            ),
            (
                "macula_pubsub_peers_cut_off_total",
                "Peers whose pub/sub data stream was reset because it accepted nothing for the stall timeout.",
                g(&self.peers_cut_off_total),
            ),
            (
                "macula_pubsub_data_streams_rejected_total",
                "Inbound pub/sub data streams closed for bad input.",
                g(&self.data_streams_rejected_total),
            ),
            (
                "macula_pubsub_forwarded_received_total",
                "Messages received that another node forwarded for their publisher (a gateway for its client).",
                g(&self.forwarded_received_total),
            ),
            (
                "macula_pubsub_forwarded_sent_total",
                "Messages this node forwarded as a gateway: clients' messages into the mesh and events to clients.",
                g(&self.forwarded_sent_total),
            ),
            (
                "macula_pubsub_unmatched_total",
                "Received messages that matched no subscription here, dropped (expected when an interest record is a summary, or just after an unsubscribe).",
                g(&self.unmatched_total),
            ),
            (
                "macula_pubsub_interest_puts_total",
                "Interest record puts into the DHT, failed ones included (concurrent updates of one name share a put).",
                g(&self.interest_puts_total),
            ),
            (
                "macula_pubsub_interest_summarized_total",
                "Interest records put as a summary (generalized patterns) because the exact list was over the DHT record size limit.",
                g(&self.interest_summarized_total),
            ),
        ]
    }
}

/// Exposes a node's pub/sub counters to its metrics registry.
#[derive(Debug, Clone)]
pub struct PubSubCollector(pub Arc<PubSubCounters>);

impl prometheus_client::collector::Collector for PubSubCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        crate::metrics::encode_rows(&mut encoder, &self.0.rows())
    }
}

struct SubQueue {
    queue: Mutex<BoundedQueue<Event>>,
    waker: AtomicWaker,
    closed: AtomicBool,
}

impl SubQueue {
    fn lock(&self) -> MutexGuard<'_, BoundedQueue<Event>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    sublist: Sublist<u64>,
    subs: HashMap<u64, (Pattern, Arc<SubQueue>)>,
    next_id: u64,
    /// Per interest segment (`macula_pubsub::interest_segment`): each
    /// distinct pattern, sorted, with how many subscriptions hold it. What
    /// an interest record lists, read without scanning every subscription.
    interest: HashMap<Box<str>, BTreeMap<Pattern, usize>>,
    /// Bumped on every subscription added or removed (client feeds
    /// included). An interest put whose snapshot was taken at or after a
    /// change carries it (see `PubSub::update_interest`).
    changes: u64,
}

impl State {
    /// Adds subscription `id` (the caller checked `MAX_SUBSCRIPTIONS`).
    fn add(&mut self, id: u64, pattern: &Pattern, queue: Arc<SubQueue>) {
        self.sublist.insert(pattern, id);
        *self
            .interest
            .entry(interest_segment(pattern).into())
            .or_default()
            .entry(pattern.clone())
            .or_default() += 1;
        self.subs.insert(id, (pattern.clone(), queue));
        self.changes += 1;
    }

    /// Removes subscription `id`; returns its pattern.
    fn remove(&mut self, id: u64) -> Option<Pattern> {
        let (p, _) = self.subs.remove(&id)?;
        self.sublist.remove(&p, &id);
        let segment = interest_segment(&p);
        if let Some(by_pattern) = self.interest.get_mut(segment) {
            if let Some(n) = by_pattern.get_mut(&p) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    by_pattern.remove(&p);
                }
            }
            if by_pattern.is_empty() {
                self.interest.remove(segment);
            }
        }
        self.changes += 1;
        Some(p)
    }

    /// Live subscriptions to exactly `pattern`.
    fn holders(&self, pattern: &Pattern) -> usize {
        self.interest
            .get(interest_segment(pattern))
            .and_then(|m| m.get(pattern))
            .copied()
            .unwrap_or(0)
    }
}

/// What this node last put into the DHT under each rendezvous name. Behind
/// the async lock that serialises interest updates.
#[derive(Default)]
struct InterestPuts {
    by_name: HashMap<String, InterestPut>,
}

impl InterestPuts {
    /// Records a successful put under `name`. Beyond
    /// `INTEREST_PUTS_REMEMBERED` names, those without a live record are
    /// forgotten (a late update of one then repeats an empty put).
    fn remember(&mut self, name: String, put: InterestPut) {
        if self.by_name.len() >= INTEREST_PUTS_REMEMBERED && !self.by_name.contains_key(&name) {
            self.by_name.retain(|_, p| p.live);
        }
        self.by_name.insert(name, put);
    }
}

/// The last successful interest put under one name.
#[derive(Clone, Copy)]
struct InterestPut {
    /// `State::changes` when its snapshot was taken: it carries every
    /// subscription change up to this one.
    changes: u64,
    /// It listed patterns (an empty one withdrew the record).
    live: bool,
    /// It was a summary rather than the exact list.
    summarized: bool,
}

/// How pub/sub reaches other nodes: implemented by the node runtime.
pub(crate) trait Mesh: Send + Sync {
    /// A connection to `id`, dialing (after finding it in the DHT) if needed.
    fn reach(&self, id: NodeId) -> BoxFuture<'static, Option<Peer>>;
}

/// A client's link to its gateway (client mode): interest is registered by
/// the gateway instead of in the DHT, and every publish goes to the gateway,
/// which forwards it into the mesh.
pub(crate) trait Upstream: Send + Sync {
    /// The gateway's node ID, if attached now.
    fn gateway(&self) -> Option<NodeId>;
    /// The client's first subscription to `pattern` appeared (`on`) or its
    /// last one went away: tell the gateway (and wait for its answer).
    fn interest(&self, pattern: String, on: bool) -> BoxFuture<'static, Result<(), String>>;
}

pub(crate) struct MeshLink {
    /// Interest records (a full node). `None` for a client.
    pub dht: Option<DhtHandle>,
    /// The gateway (a client). `None` for a full node.
    pub upstream: Option<Arc<dyn Upstream>>,
    pub realm: String,
    pub mesh: Box<dyn Mesh>,
    /// A peer whose data stream accepts nothing for this long is cut off
    /// (`Limits::pubsub_stall_timeout`).
    pub stall_timeout: std::time::Duration,
}

/// One message waiting for a peer's sender task. Cloning it for another
/// target copies no payload or topic bytes.
#[derive(Clone)]
struct OutMsg {
    seq: u64,
    topic: TopicName,
    payload: Bytes,
    /// Headers and message ID, when the publisher set any.
    extra: Option<Arc<PublishOptions>>,
    /// Another publisher's message this node forwards (a gateway, for or to
    /// its clients); `None`: this node's own.
    origin: Option<Arc<Origin>>,
}

/// The publisher of a forwarded message.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    publisher: NodeId,
    epoch: u64,
}

/// The duplicate-suppression key of a batch that node `from` sent on behalf
/// of `publisher` (a gateway forwarding its client's messages). Keyed by
/// both, so a node naming another publisher can only ever disturb its own
/// stream of that publisher's messages, never the publisher's direct one.
fn forwarded_key(publisher: &NodeId, from: &NodeId) -> NodeId {
    let mut h = blake3::Hasher::new();
    h.update(b"macula forwarded publisher");
    h.update(publisher.as_bytes());
    h.update(from.as_bytes());
    NodeId::from_bytes(*h.finalize().as_bytes())
}

#[derive(Default)]
struct PeerQueueState {
    msgs: Vec<OutMsg>,
    bytes: usize,
    /// The sender task has exited; a new one must be started.
    closed: bool,
    /// Graceful shutdown asked the sender to finish its data stream once
    /// the queue is empty (see `PubSub::flush`).
    finish: bool,
}

/// The outbound queue to one node, drained by its sender task.
struct PeerQueue {
    state: Mutex<PeerQueueState>,
    notify: Notify,
    /// Mirrors `PeerQueueState::closed` for lock-free checks by publishers.
    retired: AtomicBool,
    /// The sender finished its data stream after a `finish` request and
    /// the peer acknowledged everything on it (or the wait timed out).
    finished: AtomicBool,
}

impl PeerQueue {
    fn lock(&self) -> MutexGuard<'_, PeerQueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the queue as having no sender; returns what was still queued.
    fn close(&self) -> Vec<OutMsg> {
        let mut st = self.lock();
        st.closed = true;
        self.retired.store(true, Relaxed);
        st.bytes = 0;
        std::mem::take(&mut st.msgs)
    }
}

/// The route cache, with the last route used in front of it (a publisher
/// that repeats a topic skips hashing it).
#[derive(Default)]
struct Routes {
    map: HashMap<Box<str>, Arc<Route>>,
    last: Option<Arc<Route>>,
}

/// Where a topic's messages go, cached per topic for at most
/// `INTEREST_CACHE_TTL` after the oldest interest record it was built from.
struct Route {
    /// Oldest fetch time of the interest entries this route was built from.
    fetched: std::time::Instant,
    topic: Topic,
    name: TopicName,
    targets: Vec<(NodeId, Arc<PeerQueue>)>,
}

struct InterestEntry {
    fetched: std::time::Instant,
    /// Interested nodes and their patterns under one rendezvous name.
    nodes: Vec<(NodeId, Vec<Pattern>)>,
}

struct Inner {
    node_id: NodeId,
    epoch: u64,
    next_seq: AtomicU64,
    max_payload: usize,
    limits: Limits,
    state: Mutex<State>,
    counters: Arc<PubSubCounters>,
    mesh: Option<MeshLink>,
    /// Serialises interest updates so the last DHT put carries the full
    /// set, and remembers what each name's last put carried (so waiting
    /// updates already covered by it skip their own put). Its live names
    /// are what graceful shutdown withdraws.
    interest_puts: tokio::sync::Mutex<InterestPuts>,
    interest_cache: Mutex<HashMap<String, InterestEntry>>,
    /// Set by `withdraw_all`: the node is leaving; interest is not updated.
    leaving: AtomicBool,
    /// Rendezvous names being refreshed in the background (one lookup each).
    refreshing: Mutex<std::collections::HashSet<String>>,
    /// Held while assigning a sequence number and queueing the message to
    /// every target, so each peer queue sees a publisher's messages in order.
    order: Mutex<()>,
    outbound: Mutex<HashMap<NodeId, Arc<PeerQueue>>>,
    routes: Mutex<Routes>,
    seen: Mutex<SeqTracker<NodeId>>,
    /// Live subscriptions, readable without the state lock (publishing with
    /// no local subscriber skips local matching).
    n_subs: std::sync::atomic::AtomicUsize,
    /// Messages queued to other nodes and not yet sent (or given up on).
    inflight: AtomicU64,
}

impl Inner {
    /// Publishes the subscription count after a change.
    fn count_subs(&self, st: &State) {
        self.counters
            .subscriptions
            .store(st.subs.len() as u64, Relaxed);
        self.n_subs.store(st.subs.len(), Relaxed);
    }
}

/// Topics a data stream's receiver remembers as validated.
const RECEIVER_TOPIC_CACHE: usize = 256;

/// Per-data-stream receive state: topics already validated (so a topic seen
/// in every batch is checked and allocated once) and buffers reused from one
/// batch to the next.
#[derive(Default)]
pub(crate) struct BatchReceiver {
    topics: HashMap<Box<str>, (TopicName, Arc<Topic>)>,
    /// Per topic of the current batch: name, parsed topic, indices into
    /// `targets` of the subscriptions it matches. `None`: invalid topic.
    #[allow(clippy::type_complexity)]
    resolved: Vec<Option<(TopicName, Arc<Topic>, Vec<usize>)>>,
    keep: Vec<bool>,
    idx: Vec<usize>,
    targets: Vec<(Arc<SubQueue>, Vec<Event>)>,
    /// Event vectors kept for the next batch (their capacity is reused).
    spare: Vec<Vec<Event>>,
    /// The sender is an attached client (this node is its gateway): its
    /// messages go on into the mesh, so one that matches nothing here is
    /// not counted as unmatched.
    from_client: bool,
}

impl BatchReceiver {
    /// Receive state for the data stream of `peer`; `from_client` when it is
    /// an attached client.
    pub(crate) fn new(from_client: bool) -> BatchReceiver {
        BatchReceiver {
            from_client,
            ..BatchReceiver::default()
        }
    }

    fn topic(&mut self, t: &str, limits: &Limits) -> Option<(TopicName, Arc<Topic>)> {
        if let Some(hit) = self.topics.get(t) {
            return Some(hit.clone());
        }
        let topic = Topic::with_limits(t, limits).ok()?;
        if self.topics.len() >= RECEIVER_TOPIC_CACHE {
            self.topics.clear();
        }
        let entry = (TopicName::from(t), Arc::new(topic));
        self.topics.insert(t.into(), entry.clone());
        Some(entry)
    }
}

/// A node's pub/sub. Cheap to clone.
#[derive(Clone)]
pub struct PubSub(Arc<Inner>);

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field(
                "subscriptions",
                &self.0.counters.subscriptions.load(Relaxed),
            )
            .finish()
    }
}

fn check_headers(headers: &[(String, String)]) -> Result<(), PubSubError> {
    if headers.len() > MAX_HEADERS {
        return Err(PubSubError::TooManyHeaders { n: headers.len() });
    }
    match headers
        .iter()
        .find(|(k, v)| k.len() > MAX_HEADER_NAME_LEN || v.len() > MAX_HEADER_VALUE_LEN)
    {
        Some((k, _)) => Err(PubSubError::HeaderTooLong { name: k.clone() }),
        None => Ok(()),
    }
}

impl PubSub {
    /// Pub/sub for node `node_id`; payloads up to `max_frame_size` minus
    /// `FRAME_HEADROOM`. Without a mesh link it delivers locally only.
    pub fn new(node_id: NodeId, max_frame_size: u32, limits: Limits) -> PubSub {
        Self::with_mesh(
            node_id,
            crate::clock::wall_ms(),
            max_frame_size,
            limits,
            None,
        )
    }

    /// A pub/sub instance publishing under `epoch` (the node's epoch: it
    /// grows across restarts, see `clock.rs`).
    pub(crate) fn with_mesh(
        node_id: NodeId,
        epoch: u64,
        max_frame_size: u32,
        limits: Limits,
        mesh: Option<MeshLink>,
    ) -> PubSub {
        PubSub(Arc::new(Inner {
            node_id,
            epoch,
            next_seq: AtomicU64::new(1),
            max_payload: (max_frame_size as usize).saturating_sub(FRAME_HEADROOM),
            state: Mutex::new(State {
                sublist: Sublist::with_limits(&limits),
                subs: HashMap::new(),
                next_id: 1,
                interest: HashMap::new(),
                changes: 0,
            }),
            seen: Mutex::new(SeqTracker::with_limits(&limits)),
            limits,
            counters: Arc::new(PubSubCounters::default()),
            mesh,
            interest_puts: tokio::sync::Mutex::new(InterestPuts::default()),
            interest_cache: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(std::collections::HashSet::new()),
            leaving: AtomicBool::new(false),
            order: Mutex::new(()),
            outbound: Mutex::new(HashMap::new()),
            routes: Mutex::new(Routes::default()),
            n_subs: std::sync::atomic::AtomicUsize::new(0),
            inflight: AtomicU64::new(0),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counters(&self) -> &Arc<PubSubCounters> {
        &self.0.counters
    }

    /// Largest payload `publish` accepts.
    pub fn max_payload(&self) -> usize {
        self.0.max_payload
    }

    /// Subscribes to `pattern` (`*` one segment, `**` any number). Events
    /// published after this returns are delivered; dropping the subscription
    /// unsubscribes.
    pub fn subscribe(&self, pattern: &str) -> Result<Subscription, PubSubError> {
        let parsed = self.parse_pattern(pattern)?;
        let queue = self.new_queue();
        let id = self.insert_sub(&mut self.state(), &parsed, queue.clone())?;
        Ok(Subscription {
            id,
            pattern: parsed,
            queue,
            owner: Arc::downgrade(&self.0),
        })
    }

    fn parse_pattern(&self, pattern: &str) -> Result<Pattern, PubSubError> {
        Pattern::with_limits(pattern, &self.0.limits).map_err(|source| {
            PubSubError::InvalidPattern {
                pattern: pattern.to_string(),
                source,
            }
        })
    }

    fn new_queue(&self) -> Arc<SubQueue> {
        Arc::new(SubQueue {
            queue: Mutex::new(BoundedQueue::with_limits(&self.0.limits)),
            waker: AtomicWaker::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// Adds a subscription to `pattern` delivering into `queue`; returns
    /// its ID.
    fn insert_sub(
        &self,
        st: &mut State,
        parsed: &Pattern,
        queue: Arc<SubQueue>,
    ) -> Result<u64, PubSubError> {
        if st.subs.len() >= MAX_SUBSCRIPTIONS {
            return Err(PubSubError::TooManySubscriptions {
                max: MAX_SUBSCRIPTIONS,
            });
        }
        let id = st.next_id;
        st.next_id += 1;
        st.add(id, parsed, queue);
        self.0.count_subs(st);
        Ok(id)
    }

    /// Waits (at most `limit`) until every message queued to other nodes has
    /// been written or given up on. Graceful shutdown calls this first, so
    /// what was published before it began is delivered. True if drained.
    pub async fn flush(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.0.inflight.load(Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // Written is not delivered: a connection closed now would discard
        // stream data the peer has not acknowledged. Ask every sender to
        // finish its data stream and wait for the acknowledgements.
        let queues: Vec<Arc<PeerQueue>> = self
            .0
            .outbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for q in &queues {
            q.lock().finish = true;
            q.notify.notify_one();
        }
        loop {
            let pending = queues
                .iter()
                .filter(|q| !q.finished.load(Relaxed) && !q.retired.load(Relaxed))
                .count();
            if pending == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!(pending, "pub/sub data streams not all acknowledged in time");
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Checks a publish and parses its topic.
    fn prepare(
        &self,
        topic: &str,
        payload: &Bytes,
        opts: &PublishOptions,
    ) -> Result<Topic, PubSubError> {
        let parsed = Topic::with_limits(topic, &self.0.limits).map_err(|source| {
            PubSubError::InvalidTopic {
                topic: topic.to_string(),
                source,
            }
        })?;
        if payload.len() > self.0.max_payload {
            return Err(PubSubError::PayloadTooLarge {
                len: payload.len(),
                max: self.0.max_payload,
            });
        }
        check_headers(&opts.headers)?;
        Ok(parsed)
    }

    /// Publishes `payload` on `topic` (no wildcards) to the matching
    /// subscriptions **of this node only**. Returns the sequence number.
    pub fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PublishOptions,
    ) -> Result<u64, PubSubError> {
        let parsed = self.prepare(topic, &payload, &opts)?;
        let name = TopicName::from(parsed.as_str());
        Ok(self.send(&parsed, &name, payload, opts, &[]))
    }

    /// Publishes to every matching subscription in the mesh: local ones in
    /// process, and one copy per other interested node (found through the
    /// DHT, cached for `INTEREST_CACHE_TTL`). Returns the sequence number.
    pub async fn publish_mesh(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PublishOptions,
    ) -> Result<u64, PubSubError> {
        let Some(link) = &self.0.mesh else {
            return self.publish(topic, payload, opts);
        };
        if let Some(up) = &link.upstream {
            // A client: everything goes to the gateway, which routes it.
            let parsed = self.prepare(topic, &payload, &opts)?;
            let gateway = up.gateway().ok_or(PubSubError::Detached)?;
            let name = TopicName::from(parsed.as_str());
            let target = [(gateway, self.queue_for(gateway))];
            return Ok(self.send(&parsed, &name, payload, opts, &target));
        }
        if payload.len() > self.0.max_payload {
            return Err(PubSubError::PayloadTooLarge {
                len: payload.len(),
                max: self.0.max_payload,
            });
        }
        check_headers(&opts.headers)?;
        let route = self.route(link, topic).await?;
        Ok(self.send(&route.topic, &route.name, payload, opts, &route.targets))
    }

    /// Where `topic`'s messages go: the cached route of a topic published
    /// recently (validated, routed), else one built from the interest
    /// records.
    async fn route(&self, link: &MeshLink, topic: &str) -> Result<Arc<Route>, PubSubError> {
        if let Some(route) = self.cached_route(topic) {
            return Ok(route);
        }
        let parsed = Topic::with_limits(topic, &self.0.limits).map_err(|source| {
            PubSubError::InvalidTopic {
                topic: topic.to_string(),
                source,
            }
        })?;
        let (nodes, fetched) = self.interested_nodes(link, &parsed).await;
        let targets = nodes.into_iter().map(|n| (n, self.queue_for(n))).collect();
        let route = Arc::new(Route {
            fetched,
            name: TopicName::from(parsed.as_str()),
            topic: parsed,
            targets,
        });
        self.cache_route(route.clone());
        Ok(route)
    }

    /// The cached route of `topic`, if still fresh and every target's
    /// sender is alive.
    fn cached_route(&self, topic: &str) -> Option<Arc<Route>> {
        let mut routes = self.0.routes.lock().unwrap_or_else(|e| e.into_inner());
        let r = match &routes.last {
            Some(r) if r.topic.as_str() == topic => r.clone(),
            _ => {
                let r = routes.map.get(topic)?.clone();
                routes.last = Some(r.clone());
                r
            }
        };
        if r.fetched.elapsed() >= INTEREST_CACHE_TTL
            || r.targets.iter().any(|(_, q)| q.retired.load(Relaxed))
        {
            return None;
        }
        Some(r)
    }

    fn cache_route(&self, route: Arc<Route>) {
        let mut routes = self.0.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.map.len() >= ROUTE_CACHE_CAPACITY {
            routes
                .map
                .retain(|_, r| r.fetched.elapsed() < INTEREST_CACHE_TTL);
            if routes.map.len() >= ROUTE_CACHE_CAPACITY {
                routes.map.clear();
            }
        }
        routes.last = Some(route.clone());
        routes.map.insert(route.topic.as_str().into(), route);
    }

    /// Assigns the sequence number, delivers locally and queues one copy per
    /// remote target, all under `order` so every queue sees seq order.
    fn send(
        &self,
        topic: &Topic,
        name: &TopicName,
        payload: Bytes,
        opts: PublishOptions,
        targets: &[(NodeId, Arc<PeerQueue>)],
    ) -> u64 {
        let c = &self.0.counters;
        let extra = (!opts.headers.is_empty() || opts.message_id.is_some()).then(|| Arc::new(opts));
        let _order = self.0.order.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.0.next_seq.fetch_add(1, Relaxed);
        c.published_total.fetch_add(1, Relaxed);
        let msg = OutMsg {
            seq,
            topic: name.clone(),
            payload,
            extra,
            origin: None,
        };
        for (node, q) in targets {
            self.enqueue(*node, q, msg.clone());
        }
        if self.0.n_subs.load(Relaxed) > 0 {
            let opts = msg.extra.as_deref();
            let event = Event {
                topic: msg.topic,
                payload: msg.payload,
                publisher: self.0.node_id,
                seq,
                epoch: self.0.epoch,
                headers: opts.map(|o| o.headers.clone()).unwrap_or_default(),
                message_id: opts.and_then(|o| o.message_id.clone()),
            };
            self.deliver_local(topic, event);
        }
        seq
    }

    /// The outbound queue to `target`, starting its sender task if needed.
    fn queue_for(&self, target: NodeId) -> Arc<PeerQueue> {
        let mut map = self.0.outbound.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = map.get(&target) {
            if !q.lock().closed {
                return q.clone();
            }
        }
        let q = Arc::new(PeerQueue {
            state: Mutex::new(PeerQueueState::default()),
            notify: Notify::new(),
            retired: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        });
        if map.len() >= MAX_OUTBOUND_PEERS && !map.contains_key(&target) {
            // Over the limit: a queue with no sender, so everything sent to
            // it is dropped (and counted) until a slot frees up.
            tracing::warn!(peer = %target, limit = MAX_OUTBOUND_PEERS, "too many outbound pub/sub peers; dropping");
            q.close();
            return q;
        }
        map.insert(target, q.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sender(Arc::downgrade(&self.0), target, q.clone()));
        } else {
            q.close();
        }
        q
    }

    /// Queues `msg` for one target; drops (and counts) it when the queue is
    /// full or its sender has gone.
    fn enqueue(&self, target: NodeId, q: &PeerQueue, msg: OutMsg) {
        let c = &self.0.counters;
        let len = msg.payload.len();
        let mut st = q.lock();
        if st.closed || st.msgs.len() >= PEER_QUEUE_CAPACITY || st.bytes + len > PEER_QUEUE_BYTES {
            drop(st);
            c.remote_dropped_total.fetch_add(1, Relaxed);
            tracing::trace!(peer = %target, "pub/sub queue full or closed; message dropped");
            return;
        }
        let was_empty = st.msgs.is_empty();
        st.msgs.push(msg);
        st.bytes += len;
        drop(st);
        self.0.inflight.fetch_add(1, Relaxed);
        c.sent_remote_total.fetch_add(1, Relaxed);
        if was_empty {
            q.notify.notify_one();
        }
    }

    /// Nodes other than this one with a pattern matching `topic`, and the
    /// oldest fetch time of the interest entries used. The topic's two
    /// rendezvous names are read concurrently.
    async fn interested_nodes(
        &self,
        link: &MeshLink,
        topic: &Topic,
    ) -> (Vec<NodeId>, std::time::Instant) {
        let names = lookup_names(&link.realm, topic);
        let found =
            futures::future::join_all(names.into_iter().map(|n| self.interest_for(link, n))).await;
        let mut out: Vec<NodeId> = Vec::new();
        let mut oldest = std::time::Instant::now();
        for (nodes, fetched) in found {
            oldest = oldest.min(fetched);
            for (node, pats) in nodes {
                if node != self.0.node_id
                    && !out.contains(&node)
                    && pats.iter().any(|p| p.matches(topic))
                {
                    out.push(node);
                }
            }
        }
        (out, oldest)
    }

    /// Interest under one rendezvous name: fresh from the cache; else, if
    /// the cached entry is younger than `INTEREST_STALE_MAX`, a refresh
    /// awaited for at most `INTEREST_REFRESH_WAIT` and the old entry if it
    /// takes longer (a DHT slower than the cache TTL must not stall every
    /// publish); else a lookup.
    #[allow(clippy::type_complexity)]
    async fn interest_for(
        &self,
        link: &MeshLink,
        name: String,
    ) -> (Vec<(NodeId, Vec<Pattern>)>, std::time::Instant) {
        match self.cached_interest(&name) {
            Some((nodes, fetched)) if fetched.elapsed() < INTEREST_CACHE_TTL => (nodes, fetched),
            Some((nodes, fetched)) if fetched.elapsed() < INTEREST_STALE_MAX => {
                let first = self
                    .0
                    .refreshing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone());
                if !first {
                    // Another publish is refreshing it right now.
                    return (nodes, fetched);
                }
                let this = self.clone();
                let refresh = tokio::spawn(async move {
                    let res = match &this.0.mesh {
                        Some(link) => Some(this.lookup_interest(link, name.clone()).await),
                        None => None,
                    };
                    this.0
                        .refreshing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&name);
                    res
                });
                // A healthy DHT answers well within the wait: the bound of
                // `INTEREST_CACHE_TTL` holds. A slow one finishes in the
                // background while this publish uses the previous answer.
                match tokio::time::timeout(INTEREST_REFRESH_WAIT, refresh).await {
                    Ok(Ok(Some(fresh))) => fresh,
                    _ => (nodes, fetched),
                }
            }
            _ => self.lookup_interest(link, name).await,
        }
    }

    /// Reads the interest records under `name` from the DHT and caches them
    /// (a failed lookup caches nothing and yields no nodes).
    #[allow(clippy::type_complexity)]
    async fn lookup_interest(
        &self,
        link: &MeshLink,
        name: String,
    ) -> (Vec<(NodeId, Vec<Pattern>)>, std::time::Instant) {
        let key = macula_wire::dht_key(name.as_bytes());
        let fetched = std::time::Instant::now();
        let Some(dht) = &link.dht else {
            return (Vec::new(), fetched);
        };
        match dht.get_fresh(key).await {
            Ok(records) => {
                let nodes: Vec<(NodeId, Vec<Pattern>)> = records
                    .into_iter()
                    .map(|r| {
                        let text = String::from_utf8_lossy(&r.value);
                        let pats = text
                            .lines()
                            .filter_map(|l| Pattern::with_limits(l, &self.0.limits).ok())
                            .collect();
                        (r.publisher, pats)
                    })
                    .collect();
                tracing::debug!(name = %name, nodes = ?nodes.iter().map(|(n, p)| (n.short(), p.len())).collect::<Vec<_>>(), "interest looked up");
                self.cache_interest(name, nodes.clone(), fetched);
                (nodes, fetched)
            }
            Err(e) => {
                tracing::debug!(name = %name, error = %e, "interest lookup failed");
                (Vec::new(), fetched)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn cached_interest(
        &self,
        name: &str,
    ) -> Option<(Vec<(NodeId, Vec<Pattern>)>, std::time::Instant)> {
        let cache = self
            .0
            .interest_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        cache.get(name).map(|e| (e.nodes.clone(), e.fetched))
    }

    fn cache_interest(
        &self,
        name: String,
        nodes: Vec<(NodeId, Vec<Pattern>)>,
        fetched: std::time::Instant,
    ) {
        let mut cache = self
            .0
            .interest_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if cache.len() >= INTEREST_CACHE_CAPACITY && !cache.contains_key(&name) {
            cache.retain(|_, e| e.fetched.elapsed() < INTEREST_STALE_MAX);
            if cache.len() >= INTEREST_CACHE_CAPACITY {
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, e)| e.fetched)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(name, InterestEntry { fetched, nodes });
    }

    /// Subscribes and, when the node is in a mesh, announces the interest in
    /// the DHT before returning (so publishers can find this node).
    pub async fn subscribe_mesh(&self, pattern: &str) -> Result<Subscription, PubSubError> {
        let sub = self.subscribe(pattern)?;
        if let Some(up) = self.0.mesh.as_ref().and_then(|l| l.upstream.as_ref()) {
            // A client: the gateway subscribes for it (once per pattern).
            if self.pattern_count(&sub.pattern) == 1 {
                if let Err(reason) = up.interest(sub.pattern.as_str().to_string(), true).await {
                    return Err(PubSubError::Interest {
                        pattern: pattern.to_string(),
                        reason,
                    });
                }
            }
            return Ok(sub);
        }
        if self.0.mesh.is_some() {
            if let Err(reason) = self.update_interest(interest_segment(&sub.pattern)).await {
                return Err(PubSubError::Interest {
                    pattern: pattern.to_string(),
                    reason,
                });
            }
        }
        Ok(sub)
    }

    /// Puts this node's patterns under the rendezvous name of `segment`
    /// (`macula_pubsub::interest_segment`) into the DHT; with none left,
    /// puts the empty list (which replaces the old one on every replica) and
    /// stops republishing it. When the exact list is over
    /// `INTEREST_RECORD_MAX`, the record is a summary that matches more
    /// (`macula_pubsub::summarize`); what this node did not ask for is
    /// dropped on arrival.
    ///
    /// Concurrent updates share puts: one returns at once when a put that
    /// completed while it waited was built from a snapshot taken after its
    /// own change (`State::changes`). A failed put records nothing, so the
    /// next waiter puts again.
    async fn update_interest(&self, segment: &str) -> Result<(), String> {
        let Some((link, dht)) = self
            .0
            .mesh
            .as_ref()
            .and_then(|l| Some((l, l.dht.as_ref()?)))
        else {
            return Ok(());
        };
        let name = segment_name(&link.realm, segment);
        // Every change this update is for happened before this read.
        let wanted = self.state().changes;
        let mut puts = self.0.interest_puts.lock().await;
        if self.0.leaving.load(Relaxed) {
            // `withdraw_all` has withdrawn (or is withdrawing) everything.
            return Ok(());
        }
        let last = puts.by_name.get(&name).copied();
        if last.is_some_and(|l| l.changes >= wanted) {
            return Ok(());
        }
        let (changes, patterns) = {
            let st = self.state();
            let patterns: Vec<Pattern> = st
                .interest
                .get(segment)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            (st.changes, patterns)
        };
        let summary = summarize(&patterns, INTEREST_RECORD_MAX);
        let key = macula_wire::dht_key(name.as_bytes());
        tracing::debug!(name = %name, n_patterns = patterns.len(), n_published = summary.patterns.len(), exact = summary.exact, "updating interest");
        let c = &self.0.counters;
        c.interest_puts_total.fetch_add(1, Relaxed);
        dht.put(key, summary.patterns.join("\n").into_bytes(), INTEREST_TTL)
            .await
            .map_err(|e| e.to_string())?;
        let summarized = !summary.exact;
        if summarized {
            c.interest_summarized_total.fetch_add(1, Relaxed);
        }
        let was_summarized = last.is_some_and(|l| l.summarized);
        if summarized && !was_summarized {
            tracing::info!(name = %name, patterns = patterns.len(), published = summary.patterns.len(),
                limit = INTEREST_RECORD_MAX, "interest record over the DHT value limit; publishing a summary (publishers may send messages this node drops)");
        } else if was_summarized && !summarized && !patterns.is_empty() {
            tracing::info!(name = %name, patterns = patterns.len(), limit = INTEREST_RECORD_MAX,
                "interest record fits the DHT value limit again; publishing it exactly");
        }
        let live = !summary.patterns.is_empty();
        puts.remember(
            name,
            InterestPut {
                changes,
                live,
                summarized,
            },
        );
        if !live {
            dht.unpublish(key).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Graceful shutdown: withdraws every interest record this node has in
    /// the DHT (bounded by `limit`), so publishers stop sending here at once
    /// instead of until the records expire. Later subscription changes no
    /// longer touch the DHT.
    pub async fn withdraw_all(&self, limit: std::time::Duration) {
        let Some(dht) = self.0.mesh.as_ref().and_then(|l| l.dht.as_ref()) else {
            return;
        };
        let work = async {
            let mut puts = self.0.interest_puts.lock().await;
            self.0.leaving.store(true, Relaxed);
            let names: Vec<String> = puts
                .by_name
                .drain()
                .filter(|(_, p)| p.live)
                .map(|(name, _)| name)
                .collect();
            for name in names {
                let key = macula_wire::dht_key(name.as_bytes());
                if let Err(e) = dht.put(key, Vec::new(), INTEREST_TTL).await {
                    tracing::debug!(name = %name, error = %e, "could not withdraw interest");
                }
                let _ = dht.unpublish(key).await;
            }
        };
        if tokio::time::timeout(limit, work).await.is_err() {
            tracing::warn!("shutdown: pub/sub interest not all withdrawn in time");
        }
    }

    /// A PUBLISH from node `from`: checked, deduplicated, delivered locally.
    pub(crate) fn deliver_remote(&self, from: NodeId, p: Publish) -> Result<(), String> {
        let c = &self.0.counters;
        if p.publisher != from {
            c.remote_rejected_total.fetch_add(1, Relaxed);
            return Err(format!(
                "PUBLISH names publisher {} but came from {from}",
                p.publisher
            ));
        }
        let topic = Topic::with_limits(&p.topic, &self.0.limits).map_err(|e| {
            c.remote_rejected_total.fetch_add(1, Relaxed);
            format!("invalid topic {:?}: {e}", p.topic)
        })?;
        if p.payload.len() > self.0.max_payload {
            c.remote_rejected_total.fetch_add(1, Relaxed);
            return Err(format!("payload of {} bytes", p.payload.len()));
        }
        let observed = self
            .0
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(&from, p.epoch, p.seq);
        match observed {
            Observed::Next => {}
            Observed::Gap { missing } | Observed::Restarted { missing } => {
                c.gaps_total.fetch_add(missing, Relaxed);
            }
            Observed::Duplicate | Observed::Invalid => {
                c.duplicates_dropped_total.fetch_add(1, Relaxed);
                return Ok(());
            }
        }
        c.received_remote_total.fetch_add(1, Relaxed);
        let event = Event {
            topic: TopicName::from(p.topic),
            payload: Bytes::from(p.payload),
            publisher: p.publisher,
            seq: p.seq,
            epoch: p.epoch,
            headers: p.headers,
            message_id: p.message_id,
        };
        if self.deliver_local(&topic, event) == 0 {
            // Sent for a summarized interest record, or just after an
            // unsubscribe: not an error.
            c.unmatched_total.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// A frame from a peer's pub/sub data stream. `Err` means the stream
    /// must be closed (malformed frame, a frame not allowed there, or a batch
    /// that names another publisher); bad messages inside a well-formed batch
    /// (invalid topic, oversized payload) are dropped and counted instead.
    pub(crate) fn on_data_frame(
        &self,
        from: NodeId,
        frame: &crate::framed::InFrame,
        rx: &mut BatchReceiver,
    ) -> Result<(), String> {
        let c = &self.0.counters;
        let fail = |reason: String| {
            c.data_streams_rejected_total.fetch_add(1, Relaxed);
            Err(reason)
        };
        if frame.msg_type != macula_wire::MessageType::PublishBatch as u8 {
            return fail(format!(
                "message type {:#04x} on a pub/sub data stream",
                frame.msg_type
            ));
        }
        let view = match PublishBatchView::decode(&frame.body) {
            Ok(v) => v,
            Err(reason) => return fail(format!("malformed PUBLISH_BATCH: {reason}")),
        };
        c.batches_received_total.fetch_add(1, Relaxed);
        // A batch naming another publisher is forwarded: by a gateway for
        // its client, or (to a client) by its gateway. A client trusts the
        // gateways it chose; a full node keeps such a stream apart from the
        // publisher's own (see `forwarded_key`).
        let upstream = self.0.mesh.as_ref().is_some_and(|l| l.upstream.is_some());
        let key = if view.publisher == from || upstream {
            view.publisher
        } else {
            c.forwarded_received_total
                .fetch_add(view.entries.len() as u64, Relaxed);
            forwarded_key(&view.publisher, &from)
        };
        self.deliver_batch(&view, &frame.body, rx, key);
        Ok(())
    }

    /// Delivers a checked batch: one dedup lock for the batch, one sublist
    /// match per distinct topic, one queue lock and one wake per matching
    /// subscription; payloads are slices of `body` (no copy).
    fn deliver_batch(
        &self,
        view: &PublishBatchView<'_>,
        body: &Bytes,
        rx: &mut BatchReceiver,
        key: NodeId,
    ) {
        let c = &self.0.counters;
        let from = view.publisher;
        rx.resolved.clear();
        for t in &view.topics {
            let r = rx.topic(t, &self.0.limits);
            rx.resolved
                .push(r.map(|(name, topic)| (name, topic, Vec::new())));
        }
        // Which messages are new: one lock on the tracker for the batch.
        rx.keep.clear();
        rx.idx.clear();
        let mut rejected = 0u64;
        for (i, e) in view.entries.iter().enumerate() {
            let ok = rx.resolved[e.topic_index].is_some() && e.payload.len() <= self.0.max_payload;
            rx.keep.push(ok);
            if ok {
                rx.idx.push(i);
            } else {
                rejected += 1;
            }
        }
        let (mut dups, mut gaps) = (0u64, 0u64);
        {
            let mut seen = self.0.seen.lock().unwrap_or_else(|e| e.into_inner());
            let (keep, idx) = (&mut rx.keep, &rx.idx);
            let mut at = idx.iter();
            seen.observe_batch(
                &key,
                view.epoch,
                idx.iter().map(|&i| view.entries[i].seq),
                |o| {
                    let Some(&i) = at.next() else { return };
                    match o {
                        Observed::Next => {}
                        Observed::Gap { missing } | Observed::Restarted { missing } => {
                            gaps += missing
                        }
                        Observed::Duplicate | Observed::Invalid => {
                            dups += 1;
                            keep[i] = false;
                        }
                    }
                },
            );
        }
        if rejected > 0 {
            c.remote_rejected_total.fetch_add(rejected, Relaxed);
            tracing::debug!(peer = %from, rejected, "dropped messages with an invalid topic or oversized payload");
        }
        if dups > 0 {
            c.duplicates_dropped_total.fetch_add(dups, Relaxed);
        }
        if gaps > 0 {
            c.gaps_total.fetch_add(gaps, Relaxed);
        }
        let accepted = view.entries.len() as u64 - rejected - dups;
        c.received_remote_total.fetch_add(accepted, Relaxed);
        if accepted == 0 {
            return;
        }
        if self.0.n_subs.load(Relaxed) == 0 {
            if !rx.from_client {
                c.unmatched_total.fetch_add(accepted, Relaxed);
            }
            return;
        }
        // Matching subscriptions per distinct topic: one state lock.
        rx.targets.clear();
        {
            let mut st = self.state();
            for slot in rx.resolved.iter_mut().flatten() {
                let ids = st.sublist.matches(&slot.1);
                for id in ids {
                    let Some((_, q)) = st.subs.get(&id) else {
                        continue;
                    };
                    let i = match rx.targets.iter().position(|(t, _)| Arc::ptr_eq(t, q)) {
                        Some(i) => i,
                        None => {
                            let v = rx.spare.pop().unwrap_or_default();
                            rx.targets.push((q.clone(), v));
                            rx.targets.len() - 1
                        }
                    };
                    slot.2.push(i);
                }
            }
        }
        // Events in batch order, grouped per subscription. A message that
        // matches nothing here (sent for a summarized interest record, or
        // just after an unsubscribe) is dropped quietly.
        let mut unmatched = 0u64;
        for (e, keep) in view.entries.iter().zip(&rx.keep) {
            if !keep {
                continue;
            }
            let Some((name, _, subs)) = &rx.resolved[e.topic_index] else {
                continue;
            };
            let Some((&last, rest)) = subs.split_last() else {
                unmatched += 1;
                continue;
            };
            let event = Event {
                topic: name.clone(),
                payload: body.slice_ref(e.payload),
                publisher: from,
                seq: e.seq,
                epoch: view.epoch,
                headers: e
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                message_id: e.message_id.map(str::to_string),
            };
            for &i in rest {
                rx.targets[i].1.push(event.clone());
            }
            rx.targets[last].1.push(event);
        }
        let (mut delivered, mut dropped) = (0u64, 0u64);
        for (q, mut events) in rx.targets.drain(..) {
            delivered += events.len() as u64;
            {
                let mut g = q.lock();
                for ev in events.drain(..) {
                    let size = ev.payload.len() + EVENT_OVERHEAD;
                    dropped += g.push_sized(ev, size);
                }
            }
            q.waker.wake();
            if rx.spare.len() < 16 {
                rx.spare.push(events);
            }
        }
        c.delivered_local_total.fetch_add(delivered, Relaxed);
        if dropped > 0 {
            c.dropped_slow_total.fetch_add(dropped, Relaxed);
        }
        if unmatched > 0 && !rx.from_client {
            c.unmatched_total.fetch_add(unmatched, Relaxed);
        }
    }

    /// Pushes `event` into every local subscription matching `topic`. The
    /// queues to wake are collected under the lock; waking happens after.
    /// Returns how many subscriptions matched.
    fn deliver_local(&self, topic: &Topic, event: Event) -> usize {
        let targets: Vec<Arc<SubQueue>> = {
            let mut st = self.state();
            let ids = st.sublist.matches(topic);
            ids.iter()
                .filter_map(|id| st.subs.get(id).map(|(_, q)| q.clone()))
                .collect()
        };
        let c = &self.0.counters;
        let size = event.payload.len() + EVENT_OVERHEAD;
        let n = targets.len();
        for q in targets {
            let dropped = q.lock().push_sized(event.clone(), size);
            if dropped > 0 {
                c.dropped_slow_total.fetch_add(dropped, Relaxed);
            }
            c.delivered_local_total.fetch_add(1, Relaxed);
            q.waker.wake();
        }
        n
    }

    /// Patterns currently subscribed, with how many subscriptions each.
    pub fn subscriptions(&self) -> Vec<(String, usize)> {
        let st = self.state();
        let mut by: HashMap<&str, usize> = HashMap::new();
        for (p, _) in st.subs.values() {
            *by.entry(p.as_str()).or_default() += 1;
        }
        let mut v: Vec<_> = by.into_iter().map(|(p, n)| (p.to_string(), n)).collect();
        v.sort();
        v
    }

    /// Live subscriptions to exactly `pattern`.
    fn pattern_count(&self, pattern: &Pattern) -> usize {
        self.state().holders(pattern)
    }

    // ----- gateway: forwarding for attached clients ---------------------

    /// The feed of events for attached client `client`: its patterns all
    /// fill one queue, so each publisher's events reach the client in the
    /// order this node received them (per-pattern queues would interleave
    /// them arbitrarily, and the client's sequence check would drop the
    /// late ones). Dropping the feed removes every pattern.
    pub(crate) fn client_feed(&self, client: NodeId) -> Arc<ClientFeed> {
        Arc::new(ClientFeed {
            client,
            owner: Arc::downgrade(&self.0),
            queue: self.new_queue(),
            ids: Mutex::new(HashMap::new()),
        })
    }

    /// Subscribes `feed` to `pattern` (idempotent) and registers the
    /// interest in the mesh before returning, like `subscribe_mesh`.
    pub(crate) async fn feed_add(
        &self,
        feed: &ClientFeed,
        pattern: &str,
    ) -> Result<(), PubSubError> {
        let parsed = self.parse_pattern(pattern)?;
        {
            let mut ids = lock_map(&feed.ids);
            if ids.contains_key(parsed.as_str()) {
                return Ok(());
            }
            let id = self.insert_sub(&mut self.state(), &parsed, feed.queue.clone())?;
            ids.insert(parsed.as_str().to_string(), id);
        }
        if self.0.mesh.is_some() {
            if let Err(reason) = self.update_interest(interest_segment(&parsed)).await {
                self.feed_remove(feed, pattern).await;
                return Err(PubSubError::Interest {
                    pattern: pattern.to_string(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Unsubscribes `feed` from `pattern` and updates the interest record.
    pub(crate) async fn feed_remove(&self, feed: &ClientFeed, pattern: &str) {
        let Some(id) = lock_map(&feed.ids).remove(pattern) else {
            return;
        };
        if let Some(p) = self.remove_sub(id) {
            if self.0.mesh.is_some() {
                let segment = interest_segment(&p);
                if let Err(e) = self.update_interest(segment).await {
                    tracing::debug!(segment, error = %e, "could not update interest after a client unsubscribed");
                }
            }
        }
    }

    /// Removes subscription `id`; returns its pattern.
    fn remove_sub(&self, id: u64) -> Option<Pattern> {
        let mut st = self.state();
        let p = st.remove(id)?;
        self.0.count_subs(&st);
        Some(p)
    }

    /// Forwards what `feed` receives to its client over the client's data
    /// stream, keeping each event's publisher, epoch and sequence number
    /// (the client's own messages are not echoed back). Runs until the feed
    /// is dropped.
    pub(crate) async fn forward_feed(&self, feed: Arc<ClientFeed>) {
        let client = feed.client;
        let mut events: Vec<Event> = Vec::new();
        let mut last: Option<Arc<Origin>> = None;
        loop {
            let open = futures::future::poll_fn(|cx| feed.poll_drain(cx, &mut events)).await;
            if !events.is_empty() {
                let q = self.queue_for(client);
                let _order = self.0.order.lock().unwrap_or_else(|e| e.into_inner());
                for ev in events.drain(..) {
                    if ev.publisher == client {
                        continue;
                    }
                    let origin = match &last {
                        Some(o) if o.publisher == ev.publisher && o.epoch == ev.epoch => o.clone(),
                        _ => {
                            let o = Arc::new(Origin {
                                publisher: ev.publisher,
                                epoch: ev.epoch,
                            });
                            last = Some(o.clone());
                            o
                        }
                    };
                    let extra = (!ev.headers.is_empty() || ev.message_id.is_some()).then(|| {
                        Arc::new(PublishOptions {
                            headers: ev.headers,
                            message_id: ev.message_id,
                        })
                    });
                    self.0.counters.forwarded_sent_total.fetch_add(1, Relaxed);
                    self.enqueue(
                        client,
                        &q,
                        OutMsg {
                            seq: ev.seq,
                            topic: ev.topic,
                            payload: ev.payload,
                            extra,
                            origin: Some(origin),
                        },
                    );
                }
            }
            if !open {
                return;
            }
        }
    }

    /// A batch that attached client `from` published (already delivered
    /// here): forwards each message to the other interested nodes, keeping
    /// the client as publisher with its epoch and sequence numbers.
    pub(crate) async fn forward_from_client(&self, from: NodeId, body: &Bytes) {
        let Some(link) = self.0.mesh.as_ref().filter(|l| l.dht.is_some()) else {
            return;
        };
        let Ok(view) = PublishBatchView::decode(body) else {
            return;
        };
        if view.publisher != from {
            // A client publishes only its own messages.
            self.0
                .counters
                .remote_rejected_total
                .fetch_add(view.entries.len() as u64, Relaxed);
            return;
        }
        let mut routes = Vec::with_capacity(view.topics.len());
        for t in &view.topics {
            routes.push(self.route(link, t).await.ok());
        }
        let origin = Arc::new(Origin {
            publisher: from,
            epoch: view.epoch,
        });
        let _order = self.0.order.lock().unwrap_or_else(|e| e.into_inner());
        for e in &view.entries {
            let Some(route) = &routes[e.topic_index] else {
                continue;
            };
            if e.payload.len() > self.0.max_payload {
                continue;
            }
            let extra = (!e.headers.is_empty() || e.message_id.is_some()).then(|| {
                Arc::new(PublishOptions {
                    headers: e
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    message_id: e.message_id.map(str::to_string),
                })
            });
            let msg = OutMsg {
                seq: e.seq,
                topic: route.name.clone(),
                payload: body.slice_ref(e.payload),
                extra,
                origin: Some(origin.clone()),
            };
            for (node, q) in &route.targets {
                if *node != from {
                    self.0.counters.forwarded_sent_total.fetch_add(1, Relaxed);
                    self.enqueue(*node, q, msg.clone());
                }
            }
        }
    }
}

fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The events for one attached client (see `PubSub::client_feed`).
pub(crate) struct ClientFeed {
    client: NodeId,
    owner: Weak<Inner>,
    queue: Arc<SubQueue>,
    /// Pattern → subscription ID in the owner's sublist.
    ids: Mutex<HashMap<String, u64>>,
}

impl ClientFeed {
    /// The client this feed serves.
    pub(crate) fn client(&self) -> NodeId {
        self.client
    }

    /// Patterns the feed is subscribed to.
    pub(crate) fn patterns(&self) -> Vec<String> {
        let mut v: Vec<String> = lock_map(&self.ids).keys().cloned().collect();
        v.sort();
        v
    }

    /// Moves every queued event into `out`. Ready with `false` once the
    /// feed is closed, with `true` when events arrived.
    fn poll_drain(&self, cx: &mut Context<'_>, out: &mut Vec<Event>) -> Poll<bool> {
        self.queue.waker.register(cx.waker());
        let mut q = self.queue.lock();
        let lagged = q.take_lagged();
        if lagged > 0 {
            tracing::debug!(client = %self.client, lagged, "client too slow; events dropped at its gateway");
        }
        while let Some(e) = q.pop() {
            out.push(e);
        }
        if !out.is_empty() {
            return Poll::Ready(true);
        }
        if self.queue.closed.load(Relaxed) {
            return Poll::Ready(false);
        }
        Poll::Pending
    }

    /// Ends the feed: its forwarder stops and every pattern is removed
    /// (the interest records are updated in the background).
    pub(crate) fn close(&self) {
        self.queue.closed.store(true, Relaxed);
        self.queue.waker.wake();
        let ids: Vec<u64> = lock_map(&self.ids).drain().map(|(_, id)| id).collect();
        let Some(inner) = self.owner.upgrade() else {
            return;
        };
        let ps = PubSub(inner);
        let mut segments: Vec<String> = Vec::new();
        for id in ids {
            if let Some(p) = ps.remove_sub(id) {
                if ps.0.mesh.is_some() {
                    segments.push(interest_segment(&p).to_string());
                }
            }
        }
        segments.sort();
        segments.dedup();
        if segments.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for segment in segments {
                    if let Err(e) = ps.update_interest(&segment).await {
                        tracing::debug!(segment = %segment, error = %e, "could not update interest after a client left");
                    }
                }
            });
        }
    }
}

impl Drop for ClientFeed {
    fn drop(&mut self) {
        self.close();
    }
}

/// A sender that finds fewer messages than this yields (at most
/// `COALESCE_YIELDS` times, while more keep arriving) before writing.
const COALESCE_TARGET: usize = 512;
const COALESCE_YIELDS: usize = 4;

/// An outbound queue to one node is closed after this long without traffic.
const SENDER_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a batch could not be written.
enum WriteFailure {
    /// The peer accepted no bytes for the stall timeout.
    Stalled,
    /// The stream or connection failed.
    Failed(String),
}

/// The open data stream to one peer.
struct DataStream {
    peer: Peer,
    send: quinn::SendStream,
}

/// Opens the pub/sub data stream on `peer`'s connection: a unidirectional
/// stream whose first byte is `STREAM_KIND_PUBSUB`.
async fn open_data_stream(peer: Peer) -> Result<DataStream, String> {
    let mut send = peer
        .connection()
        .open_uni()
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(&[STREAM_KIND_PUBSUB])
        .await
        .map_err(|e| e.to_string())?;
    Ok(DataStream { peer, send })
}

/// Writes `buf`, failing with `Stalled` if no byte is accepted for `stall`.
async fn write_with_progress(
    send: &mut quinn::SendStream,
    buf: &[u8],
    stall: std::time::Duration,
) -> Result<(), WriteFailure> {
    let mut off = 0;
    while off < buf.len() {
        match tokio::time::timeout(stall, send.write(&buf[off..])).await {
            Ok(Ok(n)) => off += n,
            Ok(Err(e)) => return Err(WriteFailure::Failed(e.to_string())),
            Err(_) => return Err(WriteFailure::Stalled),
        }
    }
    Ok(())
}

/// Encodes `msgs` (in seq order) as PUBLISH_BATCH frames into `out`: one
/// frame per `BATCH_BYTES` of payload or `MAX_BATCH_TOPICS` distinct topics.
/// Returns (frames, messages encoded); a message that cannot be encoded (it
/// breaks the peer's frame limit) is skipped.
fn encode_batches(
    out: &mut Vec<u8>,
    msgs: &[OutMsg],
    publisher: &NodeId,
    epoch: u64,
    peer_max: u32,
) -> (u64, usize) {
    // One batch names one publisher: split into runs of the same origin
    // (a node sending only its own messages has one run).
    let (mut frames, mut encoded) = (0u64, 0usize);
    let mut rest = msgs;
    while let Some(first) = rest.first() {
        let same = |m: &OutMsg| match (&m.origin, &first.origin) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        };
        let n = rest.iter().position(|m| !same(m)).unwrap_or(rest.len());
        let (run, tail) = rest.split_at(n);
        rest = tail;
        let (p, e) = match &first.origin {
            Some(o) => (&o.publisher, o.epoch),
            None => (publisher, epoch),
        };
        let (f, k) = encode_run(out, run, p, e, peer_max);
        frames += f;
        encoded += k;
    }
    (frames, encoded)
}

/// `encode_batches` for messages of one publisher.
fn encode_run(
    out: &mut Vec<u8>,
    msgs: &[OutMsg],
    publisher: &NodeId,
    epoch: u64,
    peer_max: u32,
) -> (u64, usize) {
    let (mut frames, mut encoded) = (0u64, 0usize);
    let mut rest = msgs;
    let mut topics: Vec<&str> = Vec::new();
    let mut index: Vec<usize> = Vec::with_capacity(rest.len().min(4096));
    while !rest.is_empty() {
        topics.clear();
        index.clear();
        let mut bytes = 0usize;
        let mut take = 0;
        for m in rest {
            let extra = m.extra.as_deref().map_or(0, |o| {
                o.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 4)
                    .sum::<usize>()
                    + o.message_id.as_ref().map_or(0, |id| id.len() + 2)
            });
            let size = m.payload.len() + extra + 24;
            // Same topic as the last message: the common case, no search.
            let t = match topics.last() {
                Some(last) if std::ptr::eq(*last, m.topic.as_str()) => topics.len() - 1,
                _ => match topics.iter().position(|t| *t == m.topic.as_str()) {
                    Some(i) => i,
                    None if topics.len() == macula_wire::pubsub::MAX_BATCH_TOPICS => break,
                    None => {
                        bytes += m.topic.len() + 2;
                        topics.push(m.topic.as_str());
                        topics.len() - 1
                    }
                },
            };
            if take > 0
                && (bytes + size > BATCH_BYTES || take == macula_wire::pubsub::MAX_BATCH_MESSAGES)
            {
                break;
            }
            bytes += size;
            index.push(t);
            take += 1;
        }
        let (batch, tail) = rest.split_at(take);
        rest = tail;
        let items = batch.iter().zip(&index).map(|(m, &topic_index)| {
            let o = m.extra.as_deref();
            BatchItem {
                seq: m.seq,
                topic_index,
                payload: &m.payload,
                headers: o.map_or(&[][..], |o| &o.headers),
                message_id: o.and_then(|o| o.message_id.as_deref()),
            }
        });
        match macula_wire::encode_batch_frame(out, peer_max, publisher, epoch, &topics, items) {
            Ok(n) => {
                frames += 1;
                encoded += n;
            }
            Err(e) => {
                tracing::debug!(error = %e, messages = take, "could not encode a PUBLISH_BATCH");
            }
        }
    }
    (frames, encoded)
}

/// Sends one node's messages in order over a pub/sub data stream on its
/// connection, reaching (and re-reaching) the node as needed. Cuts the peer
/// off when its stream accepts nothing for the stall timeout. Exits when idle
/// or when the node's pub/sub is gone.
async fn sender(owner: Weak<Inner>, target: NodeId, q: Arc<PeerQueue>) {
    let mut stream: Option<DataStream> = None;
    let mut batch: Vec<OutMsg> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH_BYTES + 1024);
    loop {
        {
            let mut st = q.lock();
            std::mem::swap(&mut st.msgs, &mut batch);
            st.bytes = 0;
        }
        if batch.is_empty() {
            if q.lock().finish {
                // Graceful shutdown: end the stream and wait (bounded) until
                // the peer has acknowledged all of it.
                if let Some(mut s) = stream.take() {
                    if s.send.finish().is_ok() {
                        let _ = tokio::time::timeout(STREAM_FINISH_WAIT, s.send.stopped()).await;
                    }
                }
                // Retire the queue: a later publish starts a new one.
                let queued = q.close();
                if let Some(inner) = owner.upgrade() {
                    inner.inflight.fetch_sub(queued.len() as u64, Relaxed);
                    inner
                        .counters
                        .remote_dropped_total
                        .fetch_add(queued.len() as u64, Relaxed);
                }
                q.finished.store(true, Relaxed);
                break;
            }
            if tokio::time::timeout(SENDER_IDLE, q.notify.notified())
                .await
                .is_ok()
            {
                continue;
            }
            // Idle: retire this queue (unless a message raced in).
            let Some(inner) = owner.upgrade() else { break };
            let mut map = inner.outbound.lock().unwrap_or_else(|e| e.into_inner());
            let mut st = q.lock();
            if st.msgs.is_empty() {
                st.closed = true;
                q.retired.store(true, Relaxed);
                drop(st);
                if map.get(&target).is_some_and(|m| Arc::ptr_eq(m, &q)) {
                    map.remove(&target);
                }
                break;
            }
            continue;
        }
        // Coalesce: while the publisher keeps adding, let it (a few yields,
        // no timer). Under load this turns many small writes (a packet
        // each) into few large ones; with one message in flight the queue
        // stays empty and the message goes at once.
        for _ in 0..COALESCE_YIELDS {
            if batch.len() >= COALESCE_TARGET {
                break;
            }
            tokio::task::yield_now().await;
            let mut st = q.lock();
            if st.msgs.is_empty() {
                break;
            }
            batch.append(&mut st.msgs);
            st.bytes = 0;
        }
        let Some(inner) = owner.upgrade() else { break };
        let Some(link) = &inner.mesh else { break };
        let c = &inner.counters;
        let n = batch.len();
        if stream.as_ref().is_none_or(|s| s.peer.is_closed()) {
            stream = None;
            if let Some(peer) = link.mesh.reach(target).await {
                match open_data_stream(peer).await {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        tracing::debug!(peer = %target, error = %e, "could not open a pub/sub data stream")
                    }
                }
            }
        }
        let mut sent = 0;
        if let Some(s) = &mut stream {
            buf.clear();
            let peer_max = s.peer.hello().max_frame_size;
            let (frames, encoded) =
                encode_batches(&mut buf, &batch, &inner.node_id, inner.epoch, peer_max);
            match write_with_progress(&mut s.send, &buf, link.stall_timeout).await {
                Ok(()) => {
                    sent = encoded;
                    c.batches_sent_total.fetch_add(frames, Relaxed);
                    s.peer.touch();
                }
                Err(WriteFailure::Stalled) => {
                    // Cut off: reset the stream (the peer learns why from the
                    // code) and drop everything queued for it.
                    let _ = s
                        .send
                        .reset(quinn::VarInt::from_u32(u32::from(STREAM_RESET_STALLED)));
                    let queued = q.close().len();
                    c.peers_cut_off_total.fetch_add(1, Relaxed);
                    c.remote_dropped_total
                        .fetch_add((n + queued) as u64, Relaxed);
                    inner.inflight.fetch_sub((n + queued) as u64, Relaxed);
                    tracing::warn!(peer = %target, stall = ?link.stall_timeout, dropped = n + queued,
                        "pub/sub peer accepted no data for the stall timeout; cut off (data stream reset, queue dropped)");
                    // A later publish starts a new queue and stream.
                    inner
                        .outbound
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|_, m| !Arc::ptr_eq(m, &q));
                    break;
                }
                Err(WriteFailure::Failed(e)) => {
                    tracing::debug!(peer = %target, error = %e, "pub/sub data stream failed");
                    stream = None;
                }
            }
        }
        if sent < n {
            c.remote_dropped_total.fetch_add((n - sent) as u64, Relaxed);
            tracing::debug!(peer = %target, dropped = n - sent, "could not deliver pub/sub messages");
        }
        inner.inflight.fetch_sub(n as u64, Relaxed);
        batch.clear();
    }
}

/// How long graceful shutdown waits for a peer to acknowledge the end of
/// its data stream.
pub const STREAM_FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Stream reset code for a peer cut off for not reading (data stream).
pub const STREAM_RESET_STALLED: u16 = 0x100;

/// A live subscription: a `Stream` of `SubscriptionItem`s. Dropping it
/// unsubscribes.
pub struct Subscription {
    id: u64,
    pattern: Pattern,
    queue: Arc<SubQueue>,
    owner: Weak<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern.as_str())
            .finish()
    }
}

impl Subscription {
    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    /// Events waiting in this subscription's queue.
    pub fn pending(&self) -> usize {
        self.queue.lock().len()
    }
}

impl futures::Stream for Subscription {
    type Item = SubscriptionItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Register first, then look: a push between the two wakes us.
        this.queue.waker.register(cx.waker());
        let mut q = this.queue.lock();
        let lagged = q.take_lagged();
        if lagged > 0 {
            return Poll::Ready(Some(SubscriptionItem::Lagged(lagged)));
        }
        if let Some(e) = q.pop() {
            return Poll::Ready(Some(SubscriptionItem::Event(e)));
        }
        if this.queue.closed.load(Relaxed) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.queue.closed.store(true, Relaxed);
        let Some(inner) = self.owner.upgrade() else {
            return;
        };
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.remove(self.id);
        inner.count_subs(&st);
        let others = st.holders(&self.pattern) > 0;
        drop(st);
        if let (Some(up), Ok(rt)) = (
            inner.mesh.as_ref().and_then(|l| l.upstream.clone()),
            tokio::runtime::Handle::try_current(),
        ) {
            // A client: the gateway unsubscribes once the last one is gone.
            if !others {
                let pattern = self.pattern.as_str().to_string();
                rt.spawn(async move {
                    if let Err(e) = up.interest(pattern.clone(), false).await {
                        tracing::debug!(pattern = %pattern, error = %e, "gateway did not confirm the unsubscribe");
                    }
                });
            }
            return;
        }
        // Tell the mesh: update (or withdraw) this node's interest record.
        if let (Some(_), Ok(rt)) = (&inner.mesh, tokio::runtime::Handle::try_current()) {
            let segment = interest_segment(&self.pattern).to_string();
            let ps = PubSub(inner.clone());
            rt.spawn(async move {
                if let Err(e) = ps.update_interest(&segment).await {
                    if ps.0.leaving.load(Relaxed) {
                        tracing::debug!(segment = %segment, error = %e, "interest update skipped: leaving");
                    } else {
                        tracing::warn!(segment = %segment, error = %e, "could not withdraw pub/sub interest");
                    }
                }
            });
        }
    }
}

/// Pub/sub as a service: PUBLISH on the control stream, and the pub/sub
/// data streams (kind `STREAM_KIND_PUBSUB`) carrying PUBLISH_BATCH frames.
impl Service for PubSub {
    fn name(&self) -> &'static str {
        "pubsub"
    }

    fn serves(&self) -> Serves {
        Serves {
            messages: &[MessageType::Publish, MessageType::PublishBatch],
            uni_kinds: &[STREAM_KIND_PUBSUB],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        match msg {
            Message::Publish(p) => match self.deliver_remote(peer.node_id(), p) {
                Ok(()) => Answer::Done,
                Err(reason) => Answer::Refuse {
                    code: ErrorCode::Malformed,
                    reason,
                },
            },
            // Batches travel on pub/sub data streams only.
            other => Answer::Refuse {
                code: ErrorCode::UnexpectedMessage,
                reason: format!(
                    "{} belongs on a pub/sub data stream",
                    other.msg_type().name()
                ),
            },
        }
    }

    fn on_uni_stream(&self, peer: Peer, _kind: u8, reader: FrameReader) -> ServiceFuture {
        Box::pin(self.clone().read_data_stream(peer, reader))
    }
}

impl PubSub {
    /// Reads one pub/sub data stream from `peer` until it ends. Bad input
    /// stops this stream only; the connection stays up.
    async fn read_data_stream(self, peer: Peer, mut reader: FrameReader) {
        let m = peer.metrics().clone();
        let stop_code = u32::from(u16::from(DisconnectReason::ProtocolError));
        let from_client = peer.is_client();
        let mut rx = BatchReceiver::new(from_client);
        loop {
            let frame = match reader.read().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    if let Some(kind) = e.protocol_kind() {
                        m.protocol_error(kind);
                        self.counters()
                            .data_streams_rejected_total
                            .fetch_add(1, Relaxed);
                        reader.stop(stop_code);
                        tracing::debug!(peer = %peer.node_id(), error = %e, "closed a pub/sub data stream after a protocol error");
                    }
                    break;
                }
            };
            m.frames_received_total.fetch_add(1, Relaxed);
            m.message_received(frame.msg_type);
            peer.touch();
            if let Err(reason) = self.on_data_frame(peer.node_id(), &frame, &mut rx) {
                m.protocol_error(ProtocolErrorKind::Malformed);
                reader.stop(stop_code);
                tracing::debug!(peer = %peer.node_id(), reason = %reason, "closed a pub/sub data stream after bad input");
                break;
            }
            if from_client {
                // A gateway passes its client's messages on into the mesh.
                self.forward_from_client(peer.node_id(), &frame.body).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn ps(queue_capacity: usize) -> PubSub {
        PubSub::new(
            NodeId::from_bytes([1; 32]),
            macula_wire::DEFAULT_MAX_FRAME_SIZE,
            Limits {
                queue_capacity,
                ..Limits::default()
            },
        )
    }

    fn publish(p: &PubSub, topic: &str, body: &str) {
        p.publish(
            topic,
            Bytes::from(body.to_string()),
            PublishOptions::default(),
        )
        .unwrap();
    }

    fn drain(s: &mut Subscription) -> Vec<SubscriptionItem> {
        let mut out = Vec::new();
        while let Some(Some(item)) = s.next().now_or_never() {
            out.push(item);
        }
        out
    }

    fn topics(items: &[SubscriptionItem]) -> Vec<String> {
        items
            .iter()
            .filter_map(|i| match i {
                SubscriptionItem::Event(e) => Some(e.topic.to_string()),
                SubscriptionItem::Lagged(_) => None,
            })
            .collect()
    }

    use futures::FutureExt;

    #[test]
    fn wildcard_matrix_through_subscriptions() {
        let p = ps(64);
        let cases: &[(&str, &[&str])] = &[
            (
                "sensor.**",
                &[
                    "sensor",
                    "sensor.temp",
                    "sensor.temp.room1",
                    "sensor.temp.room1.extra",
                ],
            ),
            ("sensor.*.room1", &["sensor.temp.room1"]),
            ("sensor.*", &["sensor.temp"]),
            (
                "**",
                &[
                    "sensor",
                    "sensor.temp",
                    "sensor.temp.room1",
                    "sensor.temp.room1.extra",
                    "orders.new",
                ],
            ),
            ("orders.new", &["orders.new"]),
        ];
        let mut subs: Vec<_> = cases
            .iter()
            .map(|(pat, _)| p.subscribe(pat).unwrap())
            .collect();
        for t in [
            "sensor",
            "sensor.temp",
            "sensor.temp.room1",
            "sensor.temp.room1.extra",
            "orders.new",
        ] {
            publish(&p, t, "x");
        }
        for ((pat, want), sub) in cases.iter().zip(subs.iter_mut()) {
            assert_eq!(topics(&drain(sub)), *want, "pattern {pat}");
        }
    }

    #[test]
    fn events_carry_publisher_order_and_options() {
        let p = ps(64);
        let mut s = p.subscribe("a.*").unwrap();
        let opts = PublishOptions {
            headers: vec![("k".into(), "v".into())],
            message_id: Some("m-1".into()),
        };
        p.publish("a.b", Bytes::from_static(b"1"), opts.clone())
            .unwrap();
        publish(&p, "a.c", "2");
        let items = drain(&mut s);
        let SubscriptionItem::Event(first) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(first.headers, opts.headers);
        assert_eq!(first.message_id.as_deref(), Some("m-1"));
        assert_eq!(first.publisher, NodeId::from_bytes([1; 32]));
        let SubscriptionItem::Event(second) = &items[1] else {
            panic!("{items:?}")
        };
        assert_eq!(second.seq, first.seq + 1);
        assert_eq!(second.epoch, first.epoch);
    }

    #[test]
    fn slow_subscriber_lags_without_slowing_others() {
        let p = ps(4);
        let mut slow = p.subscribe("t").unwrap();
        let mut fast = p.subscribe("t").unwrap();
        // The fast one reads after every publish; the slow one never does.
        let mut fast_got = 0;
        for i in 0..10 {
            publish(&p, "t", &i.to_string());
            fast_got += drain(&mut fast).len();
        }
        assert_eq!(fast_got, 10, "the fast one lost nothing");
        // The slow one lost the 6 oldest, is told so, then gets the newest 4.
        let items = drain(&mut slow);
        assert_eq!(items[0], SubscriptionItem::Lagged(6));
        let bodies: Vec<_> = items[1..]
            .iter()
            .map(|i| match i {
                SubscriptionItem::Event(e) => String::from_utf8_lossy(&e.payload).into_owned(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(bodies, ["6", "7", "8", "9"]);
        assert_eq!(p.counters().dropped_slow_total.load(Relaxed), 6);
    }

    #[test]
    fn dropping_unsubscribes() {
        let p = ps(8);
        let s = p.subscribe("x.**").unwrap();
        let _other = p.subscribe("x.**").unwrap();
        assert_eq!(p.subscriptions(), vec![("x.**".to_string(), 2)]);
        drop(s);
        assert_eq!(p.subscriptions(), vec![("x.**".to_string(), 1)]);
        assert_eq!(p.counters().subscriptions.load(Relaxed), 1);
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let p = ps(8);
        let err = p.subscribe("a..b").unwrap_err();
        assert!(matches!(err, PubSubError::InvalidPattern { .. }), "{err}");
        let err = p
            .publish("a.*", Bytes::new(), PublishOptions::default())
            .unwrap_err();
        assert!(matches!(err, PubSubError::InvalidTopic { .. }), "{err}");
        let big = Bytes::from(vec![0u8; p.max_payload() + 1]);
        let err = p.publish("a", big, PublishOptions::default()).unwrap_err();
        assert!(matches!(err, PubSubError::PayloadTooLarge { .. }), "{err}");
        let opts = PublishOptions {
            headers: vec![("h".into(), "v".into()); MAX_HEADERS + 1],
            message_id: None,
        };
        let err = p.publish("a", Bytes::new(), opts).unwrap_err();
        assert_eq!(err, PubSubError::TooManyHeaders { n: MAX_HEADERS + 1 });
        assert_eq!(p.counters().published_total.load(Relaxed), 0);
    }

    fn wire(publisher: NodeId, topic: &str, epoch: u64, seq: u64) -> Publish {
        Publish {
            topic: topic.into(),
            payload: b"p".to_vec(),
            publisher,
            epoch,
            seq,
            headers: vec![],
            message_id: None,
        }
    }

    #[test]
    fn remote_messages_are_checked_deduplicated_and_delivered() {
        let p = ps(64);
        let mut s = p.subscribe("t.**").unwrap();
        let from = NodeId::from_bytes([9; 32]);
        // Delivered once, in order; a replay and a stale seq are dropped.
        p.deliver_remote(from, wire(from, "t.a", 5, 1)).unwrap();
        p.deliver_remote(from, wire(from, "t.a", 5, 2)).unwrap();
        p.deliver_remote(from, wire(from, "t.a", 5, 2)).unwrap();
        p.deliver_remote(from, wire(from, "t.a", 5, 1)).unwrap();
        // A gap is counted, the message still delivered.
        p.deliver_remote(from, wire(from, "t.b", 5, 5)).unwrap();
        let got = drain(&mut s);
        assert_eq!(topics(&got), ["t.a", "t.a", "t.b"]);
        let c = p.counters();
        assert_eq!(c.duplicates_dropped_total.load(Relaxed), 2);
        assert_eq!(c.gaps_total.load(Relaxed), 2);
        assert_eq!(c.received_remote_total.load(Relaxed), 3);
        // Refused: a publisher other than the sender, a bad topic.
        let other = NodeId::from_bytes([8; 32]);
        assert!(p.deliver_remote(from, wire(other, "t.a", 1, 1)).is_err());
        assert!(p.deliver_remote(from, wire(from, "t..a", 5, 6)).is_err());
        assert!(p.deliver_remote(from, wire(from, "t.*", 5, 7)).is_err());
        assert_eq!(c.remote_rejected_total.load(Relaxed), 3);
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn the_interest_index_follows_subscriptions() {
        let p = ps(8);
        let segments = |p: &PubSub| {
            let st = p.state();
            let mut v: Vec<(String, Vec<(String, usize)>)> = st
                .interest
                .iter()
                .map(|(seg, m)| {
                    let pats = m.iter().map(|(p, n)| (p.to_string(), *n)).collect();
                    (seg.to_string(), pats)
                })
                .collect();
            v.sort();
            (v, st.changes)
        };
        let a1 = p.subscribe("a.x").unwrap();
        let a2 = p.subscribe("a.x").unwrap();
        let a3 = p.subscribe("a.*").unwrap();
        let w = p.subscribe("**.z").unwrap();
        let (v, changes) = segments(&p);
        assert_eq!(
            v,
            [
                ("*".into(), vec![("**.z".into(), 1)]),
                ("a".into(), vec![("a.*".into(), 1), ("a.x".into(), 2)]),
            ]
        );
        assert_eq!(changes, 4);
        assert_eq!(p.pattern_count(&Pattern::new("a.x").unwrap()), 2);
        drop((a1, w));
        let (v, changes) = segments(&p);
        assert_eq!(
            v,
            [("a".into(), vec![("a.*".into(), 1), ("a.x".into(), 1)])]
        );
        assert_eq!(changes, 6);
        drop((a2, a3));
        assert_eq!(segments(&p), (vec![], 8));
    }

    #[test]
    fn unmatched_remote_messages_are_dropped_and_counted() {
        let p = ps(8);
        let mut s = p.subscribe("wanted.one").unwrap();
        let from = NodeId::from_bytes([9; 32]);
        p.deliver_remote(from, wire(from, "wanted.two", 5, 1))
            .expect("not an error");
        p.deliver_remote(from, wire(from, "wanted.one", 5, 2))
            .expect("delivered");
        assert_eq!(topics(&drain(&mut s)), ["wanted.one"]);
        let c = p.counters();
        assert_eq!(c.unmatched_total.load(Relaxed), 1);
        assert_eq!(c.remote_rejected_total.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_waiting_subscriber_is_woken() {
        let p = ps(8);
        let mut s = p.subscribe("wake.up").unwrap();
        let waiter = tokio::spawn(async move { s.next().await });
        tokio::task::yield_now().await;
        publish(&p, "wake.up", "now");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken in time")
            .expect("task");
        assert!(matches!(got, Some(SubscriptionItem::Event(e)) if e.payload == "now"));
    }
}
