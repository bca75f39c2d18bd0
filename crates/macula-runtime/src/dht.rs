//! The DHT service: runs one `macula_dht::Dht` state machine in a task and
//! connects it to the mesh.
//!
//! The task is the only owner of the state machine (no lock): DHT frames from
//! peers, API calls and timer expiries all arrive as `Command`s on one bounded
//! channel, and the task drains the core's outputs in the documented order
//! (transmits, events, timer). DHT messages travel on each connection's
//! control stream; requests go out over the pool (dialing the contact with
//! its node ID expected), responses go back on the connection the request
//! came on. This module converts between wire and core types and must not
//! make Kademlia decisions itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use macula_dht::{
    Contact, CorrelationId, Dht, Ed25519Auth, Event, LookupError, LookupId, LookupKind, Millis,
    Outgoing, PutError, PutId, Record, RecordError, Request, Response, Stats,
};
use macula_wire::dht::*;
use macula_wire::{Message, NodeId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::clock::Clock;
use crate::dht_cache::{GetCache, DHT_CACHE_CAPACITY, DHT_CACHE_MAX_AGE};
use crate::identity::Identity;
use crate::metrics::{register, CountGauge};
use crate::peer::Peer;
use crate::service::{Answer, PeerDown, Serves, Service};

/// Commands queued for the DHT task; past this, inbound DHT frames are
/// dropped (and counted) rather than buffered without bound.
pub const DHT_QUEUE_CAPACITY: usize = 4096;
/// Requests being sent at once (each may have to dial first); past this a
/// request is dropped and the core times it out like a lost packet.
pub const MAX_INFLIGHT_SENDS: usize = 1024;
/// Upper bound on one API call (put, get, closest); the core's own lookups
/// end sooner, this only guards against a stuck task.
pub const DHT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests on relayed or hole-punched connections watched at once for a
/// re-send (see [`Task::transmit`]); past this a request is sent
/// unwatched, and times out as before if its connection closes.
pub const MAX_WATCHED_REQUESTS: usize = 1024;
/// Times a re-send asks the pool for a route other than the closed
/// connection, [`RESEND_ROUTE_WAIT`] apart.
const RESEND_ROUTE_TRIES: usize = 5;
const RESEND_ROUTE_WAIT: Duration = Duration::from_millis(20);

/// Why a DHT call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DhtError {
    #[error(transparent)]
    Put(#[from] PutError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("the DHT is overloaded ({DHT_QUEUE_CAPACITY} commands queued); try again")]
    Overloaded,
    #[error("the DHT did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the node is shutting down")]
    Stopped,
}

pub use crate::dht_cache::DhtRecord;

/// A point-in-time view of the DHT, for health and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtStatus {
    pub routing_table_size: usize,
    pub records: usize,
    /// Keys whose last `get` result is cached.
    pub cached_keys: usize,
    /// A join finished (or this is a first node).
    pub bootstrapped: bool,
    pub stats: Stats,
}

/// One contact of the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingEntry {
    pub node_id: NodeId,
    /// Where the DHT reaches it (the address it was seen at).
    pub addr: String,
    /// Bucket index: the length of the common prefix of its ID and ours.
    pub bucket: usize,
    /// Time since we last heard from it directly.
    pub last_seen: Duration,
}

/// Counters kept outside the task (readable without a round trip),
/// registered in the node's metrics registry.
#[derive(Debug, Default)]
pub struct DhtCounters {
    /// Inbound DHT frames dropped because the queue was full.
    pub inbound_dropped_total: Counter,
    /// Requests dropped because `MAX_INFLIGHT_SENDS` were in flight.
    pub sends_dropped_total: Counter,
    /// Requests that could not be delivered (dial or write failed).
    pub sends_failed_total: Counter,
    /// Requests re-sent over a new route because the relayed or
    /// hole-punched connection carrying them closed before the answer
    /// (issue 22: the relayed connection closes after a direct one
    /// replaced it).
    pub resends_total: Counter,
    /// Contacts whose address could not be parsed (not exported).
    pub bad_contact_addr_total: AtomicU64,
    /// `get` calls answered from the local cache.
    pub cache_hits_total: Counter,
    /// `get` calls that ran an iterative lookup.
    pub cache_misses_total: Counter,
    /// Mirrors of the core's state, refreshed by the task after each step.
    pub records: CountGauge,
    pub routing_table_size: CountGauge,
    pub lookups_finished_total: Counter,
    pub requests_received_total: Counter,
    pub requests_rate_limited_total: Counter,
    pub request_timeouts_total: Counter,
    pub responses_unmatched_total: Counter,
    pub lost_contacts: CountGauge,
    pub lost_contacts_probed_total: Counter,
    pub lost_contacts_restored_total: Counter,
    pub suspects: CountGauge,
    pub suspects_not_waited_total: Counter,
    pub records_rejected_total: Counter,
    pub records_expired_total: Counter,
    pub puts_succeeded_total: Counter,
    pub puts_failed_total: Counter,
    /// Request rounds of each completed lookup (`macula_dht_routing_hops`).
    pub lookup_rounds: LookupRounds,
    /// Lookups observed in `lookup_rounds` and the sum of their rounds
    /// (not exported: the histogram's `_count` and `_sum`; read by the
    /// node status for the dashboard's mean hops).
    pub lookups_observed: AtomicU64,
    pub lookup_rounds_sum: AtomicU64,
    /// Seconds from start to end of each completed lookup, by the runtime's
    /// clock (`macula_dht_lookup_duration_seconds`, millisecond resolution).
    pub lookup_duration: LookupDuration,
    /// Snapshots written (`dht_snapshot.rs`).
    pub snapshot_saves_total: Counter,
    /// Snapshots that could not be written or read back (the node started
    /// cold).
    pub snapshot_failures_total: Counter,
    /// Records and contacts taken back from the snapshot at start.
    pub snapshot_restored_records_total: Counter,
    pub snapshot_restored_contacts_total: Counter,
}

/// Histogram of lookup durations in seconds: 1 ms .. ~16 s.
#[derive(Debug)]
pub struct LookupDuration(pub prometheus_client::metrics::histogram::Histogram);

impl Default for LookupDuration {
    fn default() -> Self {
        LookupDuration(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        ))
    }
}

/// Histogram of request rounds per lookup: how many sequential hops through
/// the DHT a lookup took (0 = answered from our own table).
#[derive(Debug)]
pub struct LookupRounds(pub prometheus_client::metrics::histogram::Histogram);

impl Default for LookupRounds {
    fn default() -> Self {
        LookupRounds(prometheus_client::metrics::histogram::Histogram::new([
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0,
        ]))
    }
}

impl DhtCounters {
    fn sync(&self, dht: &Dht) {
        let st = dht.stats();
        // The core counts; these mirror its counts (a counter's value is
        // stored, not added: the core's is the running total).
        let set = |c: &Counter, v: u64| c.inner().store(v, Relaxed);
        self.records.set(dht.store().len() as u64);
        self.routing_table_size.set(dht.routing().len() as u64);
        set(&self.lookups_finished_total, st.lookups_finished);
        set(&self.requests_received_total, st.requests_received);
        set(&self.requests_rate_limited_total, st.requests_rate_limited);
        set(&self.request_timeouts_total, st.request_timeouts);
        set(&self.responses_unmatched_total, st.responses_unmatched);
        set(&self.records_rejected_total, st.records_rejected);
        set(&self.records_expired_total, st.records_expired);
        set(&self.puts_succeeded_total, st.puts_succeeded);
        set(&self.puts_failed_total, st.puts_failed);
        self.lost_contacts.set(st.lost_contacts);
        set(&self.lost_contacts_probed_total, st.lost_contacts_probed);
        set(
            &self.lost_contacts_restored_total,
            st.lost_contacts_restored,
        );
        self.suspects.set(st.suspects);
        set(&self.suspects_not_waited_total, st.suspects_not_waited);
    }

    /// Registers every metric in the node's registry.
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_dht_records",
            "Records held by this node.",
            self.records.clone(),
        );
        register(
            r,
            "macula_dht_routing_table_size",
            "Contacts in the routing table.",
            self.routing_table_size.clone(),
        );
        register(
            r,
            "macula_dht_lookups",
            "Iterative lookups finished.",
            self.lookups_finished_total.clone(),
        );
        register(
            r,
            "macula_dht_requests_received",
            "DHT requests from peers.",
            self.requests_received_total.clone(),
        );
        register(
            r,
            "macula_dht_requests_rate_limited",
            "DHT requests refused by the per-peer rate limit.",
            self.requests_rate_limited_total.clone(),
        );
        register(
            r,
            "macula_dht_resends",
            "DHT requests re-sent over a new route after the relayed or hole-punched connection carrying them closed.",
            self.resends_total.clone(),
        );
        register(
            r,
            "macula_dht_request_timeouts",
            "DHT requests that got no answer in time.",
            self.request_timeouts_total.clone(),
        );
        register(
            r,
            "macula_dht_responses_unmatched",
            "DHT answers matching no outstanding request.",
            self.responses_unmatched_total.clone(),
        );
        register(
            r,
            "macula_dht_records_rejected",
            "Records refused (limits, signature, stale).",
            self.records_rejected_total.clone(),
        );
        register(
            r,
            "macula_dht_records_expired",
            "Records dropped at their TTL.",
            self.records_expired_total.clone(),
        );
        register(
            r,
            "macula_dht_puts_succeeded",
            "Puts and republishes that reached quorum.",
            self.puts_succeeded_total.clone(),
        );
        register(
            r,
            "macula_dht_puts_failed",
            "Puts and republishes that did not.",
            self.puts_failed_total.clone(),
        );
        register(
            r,
            "macula_dht_lost_contacts",
            "Contacts dropped for not answering, still being probed again.",
            self.lost_contacts.clone(),
        );
        register(
            r,
            "macula_dht_lost_contacts_probed",
            "Pings sent to lost contacts.",
            self.lost_contacts_probed_total.clone(),
        );
        register(
            r,
            "macula_dht_lost_contacts_restored",
            "Lost contacts heard from again (back in the routing table).",
            self.lost_contacts_restored_total.clone(),
        );
        register(
            r,
            "macula_dht_suspects",
            "Nodes suspected dead (silent, or declared down): asked in lookups but not waited on.",
            self.suspects.clone(),
        );
        register(
            r,
            "macula_dht_suspects_not_waited",
            "Lookup requests to suspected nodes that no lookup waited for.",
            self.suspects_not_waited_total.clone(),
        );
        register(
            r,
            "macula_dht_inbound_dropped",
            "DHT frames dropped because the DHT queue was full.",
            self.inbound_dropped_total.clone(),
        );
        register(
            r,
            "macula_dht_sends_dropped",
            "DHT requests dropped at the in-flight send limit.",
            self.sends_dropped_total.clone(),
        );
        register(
            r,
            "macula_dht_sends_failed",
            "DHT requests that could not be delivered.",
            self.sends_failed_total.clone(),
        );
        register(
            r,
            "macula_dht_cache_hits",
            "Gets answered from the local cache.",
            self.cache_hits_total.clone(),
        );
        register(
            r,
            "macula_dht_cache_misses",
            "Gets that ran a lookup.",
            self.cache_misses_total.clone(),
        );
        register(
            r,
            "macula_dht_routing_hops",
            "Request rounds (hops) per completed DHT lookup.",
            self.lookup_rounds.0.clone(),
        );
        register(
            r,
            "macula_dht_lookup_duration_seconds",
            "Seconds from start to end of each completed DHT lookup.",
            self.lookup_duration.0.clone(),
        );
        register(
            r,
            "macula_dht_snapshot_saves",
            "DHT snapshots (routing table and records) written to the data directory.",
            self.snapshot_saves_total.clone(),
        );
        register(
            r,
            "macula_dht_snapshot_failures",
            "DHT snapshots that could not be written, or read back at start (started cold).",
            self.snapshot_failures_total.clone(),
        );
        register(
            r,
            "macula_dht_snapshot_restored_records",
            "Records taken back from the DHT snapshot at start.",
            self.snapshot_restored_records_total.clone(),
        );
        register(
            r,
            "macula_dht_snapshot_restored_contacts",
            "Contacts of the DHT snapshot used as seeds at start.",
            self.snapshot_restored_contacts_total.clone(),
        );
    }
}

enum Command {
    Inbound {
        peer: Peer,
        msg: DhtMessage,
    },
    Seed(Contact),
    PeerLeft(NodeId),
    /// Went silent: dropped, and probed again later.
    PeerSilent(NodeId),
    Put {
        key: NodeId,
        value: Vec<u8>,
        ttl: Duration,
        reply: oneshot::Sender<Result<Vec<NodeId>, DhtError>>,
    },
    Get {
        key: NodeId,
        /// Skip the cache and run a lookup.
        fresh: bool,
        reply: oneshot::Sender<Result<Vec<DhtRecord>, DhtError>>,
    },
    Closest {
        key: NodeId,
        reply: oneshot::Sender<Result<Vec<Contact>, DhtError>>,
    },
    Unpublish {
        key: NodeId,
        reply: oneshot::Sender<bool>,
    },
    Status {
        reply: oneshot::Sender<DhtStatus>,
    },
    Routing {
        reply: oneshot::Sender<Vec<RoutingEntry>>,
    },
    WaitBootstrapped {
        reply: oneshot::Sender<()>,
    },
    /// Write the snapshot now; answered once it is on disk (or failed).
    SaveSnapshot {
        reply: oneshot::Sender<()>,
    },
}

impl Command {
    /// What a request asks (the `macula.op` attribute of its span).
    fn name(&self) -> &'static str {
        match self {
            Command::Put { .. } => "put",
            Command::Get { fresh: false, .. } => "get",
            Command::Get { fresh: true, .. } => "get_fresh",
            Command::Closest { .. } => "closest",
            Command::Unpublish { .. } => "unpublish",
            _ => "other",
        }
    }

    fn key(&self) -> Option<NodeId> {
        match self {
            Command::Put { key, .. }
            | Command::Get { key, .. }
            | Command::Closest { key, .. }
            | Command::Unpublish { key, .. } => Some(*key),
            _ => None,
        }
    }
}

/// The application's handle on the node's DHT. Cheap to clone.
#[derive(Clone)]
pub struct DhtHandle {
    tx: mpsc::Sender<Command>,
    counters: Arc<DhtCounters>,
}

impl std::fmt::Debug for DhtHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhtHandle")
            .field("queued", &(DHT_QUEUE_CAPACITY - self.tx.capacity()))
            .finish()
    }
}

impl DhtHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, DhtError> {
        let (reply, rx) = oneshot::channel();
        let cmd = make(reply);
        // Tracing: a lookup made for a traced publish or call is a span of
        // that trace (never a trace of its own).
        if crate::trace::on() {
            if let Some(span) = crate::trace::child(|| {
                tracing::info_span!(target: crate::trace::TARGET, "macula.dht",
                    macula.op = cmd.name(),
                    macula.key = cmd.key().map(tracing::field::display))
            }) {
                return tracing::Instrument::instrument(self.send_and_wait(cmd, rx), span).await;
            }
        }
        self.send_and_wait(cmd, rx).await
    }

    async fn send_and_wait<T>(
        &self,
        cmd: Command,
        rx: oneshot::Receiver<T>,
    ) -> Result<T, DhtError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DhtError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => DhtError::Stopped,
        })?;
        match tokio::time::timeout(DHT_CALL_TIMEOUT, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(DhtError::Stopped),
            Err(_) => Err(DhtError::Timeout(DHT_CALL_TIMEOUT)),
        }
    }

    /// Stores `value` under `key` on the k closest nodes, signed by this node,
    /// and keeps republishing it before `ttl` runs out until `unpublish`.
    /// Returns the nodes that confirmed; fails below a majority of them.
    pub async fn put(
        &self,
        key: NodeId,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Vec<NodeId>, DhtError> {
        self.call(|reply| Command::Put {
            key,
            value,
            ttl,
            reply,
        })
        .await?
    }

    /// Every record stored under `key` that the reachable replicas hold, one
    /// per publisher (newest), each with a verified signature. A repeated get
    /// may be answered from a local cache up to `DHT_CACHE_MAX_AGE` old (never
    /// past a record's TTL); use `get_fresh` to always ask the mesh.
    pub async fn get(&self, key: NodeId) -> Result<Vec<DhtRecord>, DhtError> {
        self.call(|reply| Command::Get {
            key,
            fresh: false,
            reply,
        })
        .await?
    }

    /// Like `get`, but always runs an iterative lookup (and refreshes the cache).
    pub async fn get_fresh(&self, key: NodeId) -> Result<Vec<DhtRecord>, DhtError> {
        self.call(|reply| Command::Get {
            key,
            fresh: true,
            reply,
        })
        .await?
    }

    /// The nodes closest to `key` that answered an iterative lookup, nearest
    /// first, as `(node ID, address)`; at most `n`.
    pub async fn closest(&self, key: NodeId, n: usize) -> Result<Vec<(NodeId, String)>, DhtError> {
        let found = self.call(|reply| Command::Closest { key, reply }).await??;
        Ok(found
            .into_iter()
            .take(n)
            .map(|c| (c.id, c.addr.to_string()))
            .collect())
    }

    /// Stops republishing `key`; replicas drop it at its TTL. False if this
    /// node was not publishing it.
    pub async fn unpublish(&self, key: NodeId) -> Result<bool, DhtError> {
        self.call(|reply| Command::Unpublish { key, reply }).await
    }

    pub async fn status(&self) -> Result<DhtStatus, DhtError> {
        self.call(|reply| Command::Status { reply }).await
    }

    /// Every contact in the routing table, nearest bucket last.
    pub async fn routing_table(&self) -> Result<Vec<RoutingEntry>, DhtError> {
        self.call(|reply| Command::Routing { reply }).await
    }

    /// Resolves once the node has joined the DHT (or knows it is the first).
    pub async fn wait_bootstrapped(&self) -> Result<(), DhtError> {
        self.call(|reply| Command::WaitBootstrapped { reply }).await
    }

    pub fn counters(&self) -> &Arc<DhtCounters> {
        &self.counters
    }

    /// Hands a DHT frame from `peer` to the task; drops it when the queue is
    /// full (the sender will time out and retry elsewhere).
    pub(crate) fn deliver(&self, peer: &Peer, msg: DhtMessage) {
        let cmd = Command::Inbound {
            peer: peer.clone(),
            msg,
        };
        if self.tx.try_send(cmd).is_err() {
            self.counters.inbound_dropped_total.inc();
        }
    }

    /// Tells the DHT that `peer` announced its shutdown: forget it now.
    pub(crate) fn peer_left(&self, peer: &Peer) {
        let _ = self.tx.try_send(Command::PeerLeft(peer.node_id()));
    }

    /// Drops `peer` from the routing table (it cannot be dialed: it just
    /// reserved at this node as a relay, or is reached through a relay).
    pub(crate) fn unlist(&self, peer: &Peer) {
        peer.set_unlisted();
        let _ = self.tx.try_send(Command::PeerLeft(peer.node_id()));
    }

    /// Writes the DHT snapshot (routing table and records) now, if the node
    /// keeps one, and waits until it is on disk: called at a clean
    /// shutdown. Failures are logged and counted, never returned.
    pub async fn save_snapshot(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::SaveSnapshot { reply }).await.is_ok() {
            let _ = tokio::time::timeout(DHT_CALL_TIMEOUT, rx).await;
        }
    }

    /// Tells the DHT about a bootstrap peer that just connected.
    pub(crate) fn seed(&self, peer: &Peer) {
        let _ = self.tx.try_send(Command::Seed(contact_of(peer)));
    }
}

/// How the node dials a contact: implemented by `NodeRuntime`.
pub(crate) trait Dialer: Clone + Send + Sync + 'static {
    fn dial(
        &self,
        addr: SocketAddr,
        id: NodeId,
    ) -> impl std::future::Future<Output = Option<Peer>> + Send;
}

/// The DHT as a service: DHT_* frames go to the task; a node that left
/// the mesh is dropped from the routing table at once.
impl Service for DhtHandle {
    fn name(&self) -> &'static str {
        "dht"
    }

    fn serves(&self) -> Serves {
        use macula_wire::MessageType as T;
        Serves {
            messages: &[
                T::DhtPing,
                T::DhtFindNode,
                T::DhtFindValue,
                T::DhtStore,
                T::DhtPong,
                T::DhtNodes,
                T::DhtValue,
                T::DhtStored,
                T::DhtStoreRejected,
            ],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        if let Message::Dht(msg) = msg {
            self.deliver(peer, msg);
        }
        Answer::Done
    }

    fn peer_down(&self, peer: &Peer, why: PeerDown) {
        match why {
            PeerDown::Left => self.peer_left(peer),
            // Re-probed with backoff: a partition heals without waiting for
            // the hourly bucket refresh.
            PeerDown::Silent => {
                let _ = self.tx.try_send(Command::PeerSilent(peer.node_id()));
            }
            PeerDown::Closed | PeerDown::Superseded => {}
        }
    }
}

/// A contact for a connected peer: with one UDP socket per node, the address
/// we see it at is the address it listens on.
pub(crate) fn contact_of(peer: &Peer) -> Contact {
    Contact::new(peer.node_id(), peer.remote_addr().to_string())
}

fn wire_record(r: &Record) -> WireRecord {
    WireRecord {
        key: r.key,
        publisher: r.publisher,
        seq: r.seq,
        ttl_ms: r.ttl.0,
        value: r.value.clone(),
        signature: r.signature.clone(),
    }
}

fn core_record(r: WireRecord) -> Record {
    Record {
        key: r.key,
        publisher: r.publisher,
        seq: r.seq,
        ttl: Millis(r.ttl_ms),
        value: r.value,
        signature: r.signature,
    }
}

fn wire_contacts(c: &[Contact]) -> Vec<WireContact> {
    c.iter()
        .map(|c| WireContact {
            id: c.id,
            addr: c.addr.to_string(),
        })
        .collect()
}

fn core_contacts(c: Vec<WireContact>) -> Vec<Contact> {
    c.into_iter().map(|c| Contact::new(c.id, c.addr)).collect()
}

fn reject_code(e: &RecordError) -> (StoreRejectCode, u64, u64) {
    match e {
        RecordError::ValueTooLarge { len, max } => {
            (StoreRejectCode::ValueTooLarge, *len as u64, *max as u64)
        }
        RecordError::SignatureTooLarge { len, max } => {
            (StoreRejectCode::SignatureTooLarge, *len as u64, *max as u64)
        }
        RecordError::TtlZero => (StoreRejectCode::TtlZero, 0, 0),
        RecordError::TtlTooLong { ttl, max } => (StoreRejectCode::TtlTooLong, ttl.0, max.0),
        RecordError::BadSignature => (StoreRejectCode::BadSignature, 0, 0),
        RecordError::Stale { offered, stored } => (StoreRejectCode::Stale, *offered, *stored),
        RecordError::PublisherFull { max } => (StoreRejectCode::PublisherFull, 0, *max as u64),
        RecordError::StoreFull { max } => (StoreRejectCode::StoreFull, 0, *max as u64),
        _ => (StoreRejectCode::Other(0), 0, 0),
    }
}

fn record_error(m: &DhtStoreRejected) -> RecordError {
    match m.code {
        StoreRejectCode::ValueTooLarge => RecordError::ValueTooLarge {
            len: m.value as usize,
            max: m.limit as usize,
        },
        StoreRejectCode::SignatureTooLarge => RecordError::SignatureTooLarge {
            len: m.value as usize,
            max: m.limit as usize,
        },
        StoreRejectCode::TtlZero => RecordError::TtlZero,
        StoreRejectCode::TtlTooLong => RecordError::TtlTooLong {
            ttl: Millis(m.value),
            max: Millis(m.limit),
        },
        StoreRejectCode::Stale => RecordError::Stale {
            offered: m.value,
            stored: m.limit,
        },
        StoreRejectCode::PublisherFull => RecordError::PublisherFull {
            max: m.limit as usize,
        },
        StoreRejectCode::StoreFull => RecordError::StoreFull {
            max: m.limit as usize,
        },
        // Unknown codes: the peer refused; the exact reason is not ours to keep.
        StoreRejectCode::BadSignature | StoreRejectCode::Other(_) => RecordError::BadSignature,
    }
}

/// Core request -> wire message.
fn wire_request(id: CorrelationId, req: &Request) -> DhtMessage {
    let id = id.0;
    match req {
        Request::Ping => DhtMessage::Ping(DhtPing { id }),
        Request::FindNode { target } => DhtMessage::FindNode(DhtFindNode {
            id,
            target: *target,
        }),
        Request::FindValue { key } => DhtMessage::FindValue(DhtFindValue { id, key: *key }),
        Request::Store { record, ttl } => DhtMessage::Store(DhtStore {
            id,
            record: wire_record(record),
            ttl_ms: ttl.0,
        }),
    }
}

/// Core response -> wire message.
fn wire_response(id: u64, resp: &Response) -> DhtMessage {
    match resp {
        Response::Pong => DhtMessage::Pong(DhtPong { id }),
        Response::Nodes { closer } => DhtMessage::Nodes(DhtNodes {
            id,
            closer: wire_contacts(closer),
        }),
        Response::Value { records, closer } => DhtMessage::Value(DhtValue {
            id,
            records: records.iter().map(wire_record).collect(),
            closer: wire_contacts(closer),
        }),
        Response::Stored => DhtMessage::Stored(DhtStored { id }),
        Response::StoreRejected(e) => {
            let (code, value, limit) = reject_code(e);
            DhtMessage::StoreRejected(DhtStoreRejected {
                id,
                code,
                value,
                limit,
            })
        }
    }
}

/// Wire message -> core request or response.
enum Incoming {
    Request(u64, Request),
    Response(CorrelationId, Response),
}

fn incoming(msg: DhtMessage) -> Incoming {
    use DhtMessage as M;
    match msg {
        M::Ping(m) => Incoming::Request(m.id, Request::Ping),
        M::FindNode(m) => Incoming::Request(m.id, Request::FindNode { target: m.target }),
        M::FindValue(m) => Incoming::Request(m.id, Request::FindValue { key: m.key }),
        M::Store(m) => Incoming::Request(
            m.id,
            Request::Store {
                record: core_record(m.record),
                ttl: Millis(m.ttl_ms),
            },
        ),
        M::Pong(m) => Incoming::Response(CorrelationId(m.id), Response::Pong),
        M::Nodes(m) => Incoming::Response(
            CorrelationId(m.id),
            Response::Nodes {
                closer: core_contacts(m.closer),
            },
        ),
        M::Value(m) => Incoming::Response(
            CorrelationId(m.id),
            Response::Value {
                records: m.records.into_iter().map(core_record).collect(),
                closer: core_contacts(m.closer),
            },
        ),
        M::Stored(m) => Incoming::Response(CorrelationId(m.id), Response::Stored),
        M::StoreRejected(m) => Incoming::Response(
            CorrelationId(m.id),
            Response::StoreRejected(record_error(&m)),
        ),
    }
}

enum LookupWaiter {
    Get(NodeId, oneshot::Sender<Result<Vec<DhtRecord>, DhtError>>),
    Closest(oneshot::Sender<Result<Vec<Contact>, DhtError>>),
}

struct Task<D: Dialer> {
    dht: Dht,
    dialer: D,
    counters: Arc<DhtCounters>,
    sends: Arc<Semaphore>,
    lookups: HashMap<LookupId, LookupWaiter>,
    puts: HashMap<PutId, oneshot::Sender<Result<Vec<NodeId>, DhtError>>>,
    bootstrapped: bool,
    first_node: bool,
    bootstrap_waiters: Vec<oneshot::Sender<()>>,
    cache: GetCache,
    /// The node's monotonic clock: every `now` the core is given.
    clock: Clock,
    /// Where the snapshot is kept, if the node has a data directory.
    snapshot: Option<SnapshotSetup>,
    /// A periodic save is being written (the next tick skips).
    saving: Arc<std::sync::atomic::AtomicBool>,
    /// Requests sent and not answered yet, by correlation ID: the answer
    /// wakes the task watching the request's connection
    /// ([`Task::transmit`]). An entry whose watcher is gone is pruned.
    answers: HashMap<u64, oneshot::Sender<()>>,
    /// The core's request timeout: how long a request is watched.
    request_timeout: Duration,
}

/// Where and how often the DHT task writes its snapshot (`dht_snapshot.rs`).
#[derive(Debug, Clone)]
pub(crate) struct SnapshotSetup {
    pub path: std::path::PathBuf,
    /// Zero: only at a clean shutdown.
    pub interval: Duration,
}

/// Starts the DHT task for a node. `first_node`: no bootstrap peers are
/// configured, so the node does not wait for seeds. `snapshot`: where the
/// routing table and records are kept across restarts (read back first).
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn<D: Dialer>(
    identity: Identity,
    own_addr: SocketAddr,
    config: macula_dht::Config,
    clock: Clock,
    first_node: bool,
    dialer: D,
    snapshot: Option<SnapshotSetup>,
    mut shutdown: watch::Receiver<bool>,
) -> DhtHandle {
    let (tx, mut rx) = mpsc::channel(DHT_QUEUE_CAPACITY);
    let counters = Arc::new(DhtCounters::default());
    let request_timeout = config.request_timeout.to_duration();
    let own = Contact::new(identity.node_id(), own_addr.to_string());
    let seed = u64::from_le_bytes(
        identity.node_id().as_bytes()[..8]
            .try_into()
            .unwrap_or([0; 8]),
    ) ^ crate::clock::wall_ms();
    let mut task = Task {
        dht: Dht::new(
            config,
            own,
            Box::new(Ed25519Auth::new(identity.signing_key().clone())),
            seed,
        ),
        clock,
        dialer,
        counters: counters.clone(),
        sends: Arc::new(Semaphore::new(MAX_INFLIGHT_SENDS)),
        lookups: HashMap::new(),
        puts: HashMap::new(),
        bootstrapped: false,
        first_node,
        bootstrap_waiters: Vec::new(),
        cache: GetCache::new(DHT_CACHE_CAPACITY, DHT_CACHE_MAX_AGE),
        snapshot,
        saving: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        answers: HashMap::new(),
        request_timeout,
    };
    if first_node {
        task.dht.bootstrap(Vec::new(), task.clock.now());
    }
    tokio::spawn(async move {
        task.restore_snapshot().await;
        let mut saves = task
            .snapshot
            .as_ref()
            .filter(|s| !s.interval.is_zero())
            .map(|s| {
                let mut i =
                    tokio::time::interval_at(tokio::time::Instant::now() + s.interval, s.interval);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
        loop {
            task.drain();
            task.counters.sync(&task.dht);
            let sleep = task
                .dht
                .poll_timeout()
                .map(|at| tokio::time::Instant::from_std(task.clock.instant(at)));
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => task.apply(cmd),
                    None => break,
                },
                () = async {
                    match sleep {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => task.dht.handle_timeout(task.clock.now()),
                _ = async {
                    match saves.as_mut() {
                        Some(i) => i.tick().await,
                        None => std::future::pending().await,
                    }
                } => task.save_snapshot(None),
                _ = shutdown.changed() => break,
            }
        }
        tracing::debug!("DHT task stopped");
    });
    DhtHandle { tx, counters }
}

impl<D: Dialer> Task<D> {
    /// Takes back the snapshot a previous run left (records checked like a
    /// STORE, contacts as the join's seeds). A file that cannot be used is
    /// reported and the node starts cold.
    async fn restore_snapshot(&mut self) {
        let Some(setup) = self.snapshot.clone() else {
            return;
        };
        let path = setup.path.clone();
        let read = tokio::task::spawn_blocking(move || crate::dht_snapshot::load(&path)).await;
        let bytes = match read {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                self.counters.snapshot_failures_total.inc();
                tracing::warn!(file = %setup.path.display(), error = %e, "DHT snapshot not read; starting with an empty routing table");
                return;
            }
            Err(_) => return,
        };
        let own = self.dht.own().id;
        let max_records = self.dht.config().max_records;
        match crate::dht_snapshot::decode(&bytes, &own, crate::clock::wall_ms(), max_records) {
            Ok(loaded) => {
                let restored = self.dht.restore(loaded.snapshot, self.clock.now());
                self.counters
                    .snapshot_restored_records_total
                    .inc_by(restored.records as u64);
                self.counters
                    .snapshot_restored_contacts_total
                    .inc_by(restored.contacts as u64);
                tracing::info!(
                    contacts = restored.contacts,
                    records = restored.records,
                    rejected = restored.records_rejected,
                    expired = loaded.expired,
                    age_ms = crate::clock::wall_ms().saturating_sub(loaded.saved_at_ms),
                    "DHT restored from its snapshot"
                );
            }
            Err(e) => {
                self.counters.snapshot_failures_total.inc();
                tracing::warn!(file = %setup.path.display(), error = %e, "DHT snapshot not used; starting with an empty routing table");
            }
        }
    }

    /// Writes the snapshot on a blocking thread: periodic saves (`reply`
    /// `None`) skip while one is being written; a save asked for at
    /// shutdown always writes and answers when done.
    fn save_snapshot(&mut self, reply: Option<oneshot::Sender<()>>) {
        use std::sync::atomic::Ordering;
        let Some(setup) = &self.snapshot else {
            if let Some(r) = reply {
                let _ = r.send(());
            }
            return;
        };
        if reply.is_none() && self.saving.swap(true, Ordering::AcqRel) {
            return;
        }
        let bytes = crate::dht_snapshot::encode(
            self.dht.own().id,
            &self.dht.snapshot(self.clock.now()),
            crate::clock::wall_ms(),
        );
        let path = setup.path.clone();
        let counters = self.counters.clone();
        let saving = self.saving.clone();
        let periodic = reply.is_none();
        tokio::spawn(async move {
            let p = path.clone();
            match tokio::task::spawn_blocking(move || crate::dht_snapshot::save(&p, &bytes)).await {
                Ok(Ok(())) => {
                    counters.snapshot_saves_total.inc();
                }
                Ok(Err(e)) => {
                    counters.snapshot_failures_total.inc();
                    tracing::warn!(file = %path.display(), error = %e, "DHT snapshot not written");
                }
                Err(_) => {
                    counters.snapshot_failures_total.inc();
                }
            }
            if periodic {
                saving.store(false, Ordering::Release);
            }
            if let Some(r) = reply {
                let _ = r.send(());
            }
        });
    }

    fn apply(&mut self, cmd: Command) {
        let now = self.clock.now();
        match cmd {
            Command::Inbound { peer, msg } => self.inbound(peer, msg, now),
            Command::Seed(contact) => self.dht.bootstrap(vec![contact], now),
            Command::SaveSnapshot { reply } => self.save_snapshot(Some(reply)),
            Command::PeerLeft(id) => {
                tracing::debug!(peer = %id, "peer left the mesh; dropping it from the DHT");
                self.dht.peer_left(&id, now)
            }
            Command::PeerSilent(id) => {
                tracing::debug!(peer = %id, "peer went silent; dropping it from the DHT, to be probed again");
                self.dht.peer_unreachable(&id, now)
            }
            Command::Put {
                key,
                value,
                ttl,
                reply,
            } => {
                // Our own write makes any cached answer for the key stale.
                self.cache.invalidate(&key);
                match self
                    .dht
                    .put(key, value, Millis(ttl.as_millis() as u64), now)
                {
                    Ok(id) => {
                        self.puts.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Get { key, fresh, reply } => {
                if !fresh {
                    if let Some(records) = self.cache.get(&key, std::time::Instant::now()) {
                        self.counters.cache_hits_total.inc();
                        let _ = reply.send(Ok(records));
                        return;
                    }
                }
                self.counters.cache_misses_total.inc();
                match self.dht.get(key, now) {
                    Ok(id) => {
                        self.lookups.insert(id, LookupWaiter::Get(key, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Closest { key, reply } => {
                match self.dht.start_lookup(key, LookupKind::FindNode, now) {
                    Ok(id) => {
                        self.lookups.insert(id, LookupWaiter::Closest(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Unpublish { key, reply } => {
                let _ = reply.send(self.dht.unpublish(&key));
            }
            Command::Routing { reply } => {
                let now = self.clock.now().0;
                let table = self.dht.routing();
                let entries = table
                    .iter()
                    .map(|e| RoutingEntry {
                        node_id: e.contact.id,
                        addr: e.contact.addr.to_string(),
                        bucket: table.bucket_index(&e.contact.id).unwrap_or(0),
                        last_seen: Duration::from_millis(now.saturating_sub(e.last_seen.0)),
                    })
                    .collect();
                let _ = reply.send(entries);
            }
            Command::Status { reply } => {
                let _ = reply.send(DhtStatus {
                    routing_table_size: self.dht.routing().len(),
                    records: self.dht.store().len(),
                    cached_keys: self.cache.len(),
                    bootstrapped: self.bootstrapped,
                    stats: self.dht.stats(),
                });
            }
            Command::WaitBootstrapped { reply } => {
                if self.bootstrapped {
                    let _ = reply.send(());
                } else {
                    self.bootstrap_waiters.push(reply);
                }
            }
        }
    }

    fn inbound(&mut self, peer: Peer, msg: DhtMessage, now: Millis) {
        let from = contact_of(&peer);
        match incoming(msg) {
            Incoming::Request(id, req) => match if peer.is_unlisted() {
                self.dht.handle_request_unlisted(&from, req, now)
            } else {
                self.dht.handle_request(&from, req, now)
            } {
                Ok(resp) => {
                    let msg = Message::Dht(wire_response(id, &resp));
                    tokio::spawn(async move {
                        if let Err(e) = peer.send(&msg).await {
                            tracing::debug!(peer = %peer.node_id(), error = %e, "could not send DHT response");
                        }
                    });
                }
                Err(e) => {
                    tracing::debug!(peer = %from.id, error = %e, "DHT request refused");
                }
            },
            Incoming::Response(id, resp) => {
                tracing::trace!(from = %from.id, id = id.0, "DHT response");
                if let Some(answered) = self.answers.remove(&id.0) {
                    let _ = answered.send(());
                }
                self.dht.handle_response(&from.id, id, resp, now)
            }
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.dht.poll_transmit() {
            self.transmit(out);
        }
        while let Some(ev) = self.dht.poll_event() {
            self.on_event(ev);
        }
    }

    /// Sends a request over the pool. One sent on a relayed or
    /// hole-punched connection is watched until its answer comes (or the
    /// core's request timeout): when that connection closes first (the
    /// relayed one closes after the duplicate grace once a direct one
    /// replaced it; a punched path dies), the request is re-sent once,
    /// with the same correlation ID, over the pool's route to the node
    /// now. DHT requests are idempotent (a STORE of the same record again
    /// refreshes it), and the core takes the first answer and counts a
    /// second as unmatched. Nothing times out because of the switch.
    fn transmit(&mut self, out: Outgoing) {
        tracing::trace!(to = %out.to.id, addr = %out.to.addr, request = out.request.name(), id = out.correlation_id.0, "DHT request");
        let Ok(addr) = out.to.addr.parse::<SocketAddr>() else {
            self.counters.bad_contact_addr_total.fetch_add(1, Relaxed);
            return;
        };
        let Ok(permit) = self.sends.clone().try_acquire_owned() else {
            self.counters.sends_dropped_total.inc();
            return;
        };
        let cid = out.correlation_id.0;
        let msg = Message::Dht(wire_request(out.correlation_id, &out.request));
        let dialer = self.dialer.clone();
        let counters = self.counters.clone();
        let id = out.to.id;
        let answered = self.watch_answer(cid);
        let watch_for = self.request_timeout;
        tokio::spawn(async move {
            let peer = match dialer.dial(addr, id).await {
                Some(peer) if peer.send(&msg).await.is_ok() => peer,
                _ => {
                    // The core times the request out and retries or gives up.
                    counters.sends_failed_total.inc();
                    return;
                }
            };
            drop(permit);
            let Some(answered) = answered.filter(|_| peer.is_replaceable()) else {
                return;
            };
            let closed = tokio::select! {
                _ = answered => false,
                _ = peer.connection().closed() => true,
                _ = tokio::time::sleep(watch_for) => false,
            };
            if !closed {
                return;
            }
            counters.resends_total.inc();
            tracing::debug!(peer = %id, id = cid, "the connection carrying a DHT request closed before its answer; re-sending it over a new route");
            // The pool may still hand out the closed connection for a
            // moment (until its driver has seen the close): ask again,
            // a bounded number of times.
            let mut sent = false;
            for _ in 0..RESEND_ROUTE_TRIES {
                match dialer.dial(addr, id).await {
                    Some(p) if p.connection_id() != peer.connection_id() => {
                        sent = p.send(&msg).await.is_ok();
                        break;
                    }
                    Some(_) => tokio::time::sleep(RESEND_ROUTE_WAIT).await,
                    None => break,
                }
            }
            if !sent {
                counters.sends_failed_total.inc();
            }
        });
    }

    /// Registers a request for its answer; `None` past
    /// [`MAX_WATCHED_REQUESTS`] (after pruning entries whose watcher is
    /// gone: answered elsewhere, timed out, or on a connection that is not
    /// replaceable).
    fn watch_answer(&mut self, cid: u64) -> Option<oneshot::Receiver<()>> {
        if self.answers.len() >= MAX_WATCHED_REQUESTS {
            self.answers.retain(|_, tx| !tx.is_closed());
            if self.answers.len() >= MAX_WATCHED_REQUESTS {
                return None;
            }
        }
        let (tx, rx) = oneshot::channel();
        self.answers.insert(cid, tx);
        Some(rx)
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::LookupFinished { id, outcome } => {
                self.counters
                    .lookup_rounds
                    .0
                    .observe(f64::from(outcome.stats.rounds));
                self.counters.lookups_observed.fetch_add(1, Relaxed);
                self.counters
                    .lookup_rounds_sum
                    .fetch_add(u64::from(outcome.stats.rounds), Relaxed);
                let took = outcome.stats.finished.saturating_sub(outcome.stats.started);
                // Milliseconds of the runtime's clock (`now` given to the core).
                self.counters
                    .lookup_duration
                    .0
                    .observe(took.0 as f64 / 1000.0);
                match self.lookups.remove(&id) {
                    Some(LookupWaiter::Get(key, reply)) => {
                        let records: Vec<DhtRecord> =
                            outcome.records.into_iter().map(DhtRecord::from).collect();
                        self.cache
                            .insert(key, records.clone(), std::time::Instant::now());
                        let _ = reply.send(Ok(records));
                    }
                    Some(LookupWaiter::Closest(reply)) => {
                        let _ = reply.send(Ok(outcome.closest));
                    }
                    None => {}
                }
            }
            Event::PutFinished { id, result, .. } => {
                if let Some(reply) = self.puts.remove(&id) {
                    let _ = reply.send(result.map_err(DhtError::from));
                }
            }
            Event::Bootstrapped { n_contacts } => {
                // A first node is bootstrapped by definition; a joining node
                // once its join reached somebody (0 means it will retry).
                if n_contacts > 0 || self.first_node {
                    if !self.bootstrapped {
                        tracing::info!(contacts = n_contacts, "joined the DHT");
                    }
                    self.bootstrapped = true;
                } else {
                    tracing::debug!("DHT join reached nobody yet; retrying");
                }
                if self.bootstrapped {
                    for w in self.bootstrap_waiters.drain(..) {
                        let _ = w.send(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_codes_round_trip() {
        let cases = [
            RecordError::ValueTooLarge { len: 9, max: 8 },
            RecordError::SignatureTooLarge { len: 300, max: 256 },
            RecordError::TtlZero,
            RecordError::TtlTooLong {
                ttl: Millis(5),
                max: Millis(4),
            },
            RecordError::BadSignature,
            RecordError::Stale {
                offered: 1,
                stored: 2,
            },
            RecordError::PublisherFull { max: 256 },
            RecordError::StoreFull { max: 16384 },
        ];
        for e in cases {
            let m = wire_response(7, &Response::StoreRejected(e.clone()));
            let DhtMessage::StoreRejected(r) = m else {
                panic!("not a rejection")
            };
            assert_eq!(record_error(&r), e);
        }
    }
}
