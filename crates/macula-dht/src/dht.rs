//! The Kademlia node as a state machine: routing table, iterative lookups,
//! confirmed puts, record expiry and republish, replication, rate limiting,
//! and re-probing of lost contacts.
//!
//! **Lost contacts:** a peer the routing table drops because it stopped
//! answering (a request's last attempt timed out and `mark_unresponsive` really
//! removed it, or [`Dht::peer_unreachable`]) goes on a bounded lost list and
//! is pinged (the same PING as a bucket-head probe, through `send`, so within
//! `max_pending_requests`) after `lost_probe_min`, then after doubling waits
//! capped at `lost_probe_max`, until `lost_probe_horizon` after the loss. An
//! answer goes through `observe` like any other, which re-inserts the contact
//! (table or replacement cache, as `seen` decides) and takes it off the list;
//! so does hearing from it any other way. A failed probe only grows its
//! backoff: the contact is not in the table, so it is not evicted or counted
//! again.
//!
//! Inputs are `handle_*` calls and commands, each taking `now`; outputs are
//! drained with `poll_*`. It must not do I/O, read a clock, spawn, or block; it
//! must not panic on anything a peer sends. See the crate docs for the driving
//! order.

use std::collections::{BTreeSet, HashMap, VecDeque};

use macula_wire::suspect::SuspectList;
use macula_wire::NodeId;

use crate::config::Config;
use crate::lookup::{Lookup, LookupId, LookupKind, LookupOutcome, Purpose as LookupPurpose};
use crate::lost::{Due, LostContacts};
use crate::message::{Contact, CorrelationId, Outgoing, Request, Response};
use crate::ratelimit::RateLimiter;
use crate::record::{Record, RecordAuth, RecordError};
use crate::rng::Rng;
use crate::routing::{common_prefix_len, distance, Insert, RoutingTable};
use crate::store::RecordStore;
use crate::Millis;

/// Names one put on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PutId(pub u64);

/// Something the application (or runtime) should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A lookup started with [`Dht::start_lookup`] or [`Dht::get`] finished.
    LookupFinished {
        /// Which one.
        id: LookupId,
        /// What it found.
        outcome: LookupOutcome,
    },
    /// A put started with [`Dht::put`] finished.
    PutFinished {
        /// Which one.
        id: PutId,
        /// The record key.
        key: NodeId,
        /// The nodes that confirmed the STORE (this node included if it is a
        /// replica), or why the put failed.
        result: Result<Vec<NodeId>, PutError>,
    },
    /// The join (self-lookup) ended, or, for a first node, bootstrap was called
    /// with no seeds. `n_contacts` is the routing table size; 0 after a join
    /// means no seed answered and the join is retried with backoff.
    Bootstrapped {
        /// Routing-table entries after the join.
        n_contacts: usize,
    },
}

/// Why a put was refused or failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PutError {
    /// The record breaks a record limit.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// This node already publishes `Config::max_records_per_publisher` keys.
    #[error("this node already publishes {max} records")]
    TooManyPublished {
        /// Limit.
        max: usize,
    },
    /// Too many puts or lookups are running; try again later.
    #[error("too many DHT operations in progress")]
    Busy,
    /// Fewer than the quorum of the replica set confirmed the STORE.
    #[error("only {} of the {needed} required replicas confirmed the store", stored.len())]
    QuorumNotReached {
        /// Who did confirm.
        stored: Vec<NodeId>,
        /// How many were needed.
        needed: usize,
    },
}

/// Why a lookup could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// `Config::max_active_lookups` are running.
    #[error("too many lookups in progress (limit {max})")]
    TooManyLookups {
        /// Limit.
        max: usize,
    },
}

/// Why a request got no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The peer exceeded its request rate; drop the request.
    #[error("peer is rate limited")]
    RateLimited,
    /// A request claiming to come from our own ID.
    #[error("request from our own node ID")]
    FromSelf,
}

/// The part of a node's DHT state worth keeping across a restart
/// ([`Dht::snapshot`], [`Dht::restore`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Routing table contacts, nearest to the node first.
    pub contacts: Vec<Contact>,
    /// Records held, each with the lifetime it has left.
    pub records: Vec<(Record, Millis)>,
}

/// What [`Dht::restore`] took back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Contacts used as the join's seeds.
    pub contacts: usize,
    /// Records stored again.
    pub records: usize,
    /// Records refused (bad signature, over a limit, expired, stale).
    pub records_rejected: usize,
}

/// Counters of everything the core did, dropped or refused: the runtime exports
/// them as metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests handed to `handle_request`.
    pub requests_received: u64,
    /// Of those, refused by the per-peer token bucket.
    pub requests_rate_limited: u64,
    /// Malformed requests reported by the runtime, or claiming our own ID.
    pub requests_malformed: u64,
    /// Requests queued for sending (retries included).
    pub requests_sent: u64,
    /// Of those, retries after a timeout.
    pub retries: u64,
    /// Request attempts that timed out.
    pub request_timeouts: u64,
    /// Requests not sent because `max_pending_requests` were outstanding.
    pub requests_dropped_pending_full: u64,
    /// Responses handed to `handle_response`.
    pub responses_received: u64,
    /// Of those, late (after the retry replaced them) or matching nothing.
    pub responses_unmatched: u64,
    /// Of those, of the wrong kind or over a limit (truncated or discarded).
    pub responses_malformed: u64,
    /// Peers removed from the routing table after failing to answer.
    pub peers_evicted: u64,
    /// Pings sent to lost contacts (peers evicted for not answering, kept on
    /// the bounded lost list to be re-probed on a backoff).
    pub lost_contacts_probed: u64,
    /// Lost contacts heard from again (they answered a probe, or reached us
    /// another way) and taken off the list: back in the routing table or its
    /// replacement cache (unless they came unlisted).
    pub lost_contacts_restored: u64,
    /// Lost contacts given up `Config::lost_probe_horizon` after their loss.
    pub lost_contacts_expired: u64,
    /// Lost contacts dropped, oldest loss first, to keep the list within
    /// `Config::lost_contacts_len`.
    pub lost_contacts_dropped: u64,
    /// Gauge, not a counter: contacts on the lost list now.
    pub lost_contacts: u64,
    /// Nodes suspected (stopped answering, or declared down by the runtime).
    pub suspects_declared: u64,
    /// Lookup requests to suspected nodes, sent but not waited on: each is
    /// a request timeout (1 s, twice) no lookup waited for.
    pub suspects_not_waited: u64,
    /// Gauge: nodes suspected now.
    pub suspects: u64,
    /// Times the rate limiter's peer table had to be cleared under a flood.
    pub rate_limiter_resets: u64,
    /// Records accepted into the local store (new or refreshed).
    pub records_stored: u64,
    /// Records refused (STORE requests, own puts, lookup answers).
    pub records_rejected: u64,
    /// Records dropped at their TTL.
    pub records_expired: u64,
    /// Records pushed to newly seen closer nodes.
    pub records_replicated: u64,
    /// Lookups started (all purposes).
    pub lookups_started: u64,
    /// Lookups finished (all purposes).
    pub lookups_finished: u64,
    /// Puts (and republishes) that reached quorum.
    pub puts_succeeded: u64,
    /// Puts (and republishes) that did not.
    pub puts_failed: u64,
    /// Republishes started.
    pub republishes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Lookup(LookupId),
    /// A ping to a full bucket's least recently seen entry.
    Probe,
    /// A ping to a contact on the lost list.
    LostProbe,
    Store(PutId),
    Replicate,
}

#[derive(Debug)]
struct Pending {
    to: Contact,
    request: Request,
    first_sent: Millis,
    deadline: Millis,
    attempt: u8,
    purpose: Purpose,
}

#[derive(Debug)]
enum PutPhase {
    Lookup,
    Storing { waiting: usize, needed: usize },
}

#[derive(Debug)]
struct PutOp {
    record: Record,
    phase: PutPhase,
    stored: Vec<NodeId>,
    /// Report an event (user put) or not (republish).
    user: bool,
}

#[derive(Debug)]
struct Published {
    record: Record,
    republish_at: Millis,
}

/// One node's Kademlia state machine.
pub struct Dht {
    config: Config,
    own: Contact,
    auth: Box<dyn RecordAuth + Send>,
    rng: Rng,
    routing: RoutingTable,
    /// Contacts evicted for not answering, re-probed on a backoff.
    lost: LostContacts,
    /// Nodes that stopped answering (or the runtime declared down): lookups
    /// do not wait on them until they are heard from (`Config::suspect_ttl`).
    suspects: SuspectList<NodeId>,
    store: RecordStore,
    limiter: RateLimiter,
    pending: HashMap<u64, Pending>,
    deadlines: BTreeSet<(Millis, u64)>,
    next_cid: u64,
    lookups: HashMap<LookupId, Lookup>,
    next_lookup_id: u64,
    puts: HashMap<PutId, PutOp>,
    next_put_id: u64,
    published: HashMap<NodeId, Published>,
    /// The last seq of keys unpublished while it was still above the seq
    /// floor (`seq_base + now`): a put of the key again must go above it.
    /// Entries leave once the floor has passed them.
    retired: HashMap<NodeId, u64>,
    republish_queue: BTreeSet<(Millis, NodeId)>,
    seeds: Vec<Contact>,
    /// Re-join at this time (set when a join reached nobody).
    next_join: Option<Millis>,
    /// Wait before the next re-join after that one (doubles up to the max).
    join_backoff: Millis,
    next_refresh: Option<Millis>,
    transmits: VecDeque<Outgoing>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl std::fmt::Debug for Dht {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dht")
            .field("own", &self.own)
            .field("n_contacts", &self.routing.len())
            .field("n_lost", &self.lost.len())
            .field("n_records", &self.store.len())
            .field("n_pending", &self.pending.len())
            .field("n_lookups", &self.lookups.len())
            .finish_non_exhaustive()
    }
}

impl Dht {
    /// A node with identity `own`, record signing/verification `auth`, and all
    /// randomness drawn from `seed`. Panics if `config` is unusable.
    pub fn new(config: Config, own: Contact, auth: Box<dyn RecordAuth + Send>, seed: u64) -> Dht {
        config.assert_valid();
        let mut rng = Rng::new(seed);
        // A random start makes a restarted node's IDs unlikely to match answers
        // still in flight to its previous incarnation.
        let next_cid = rng.next_u64();
        Dht {
            routing: RoutingTable::new(
                own.id,
                config.k,
                config.replacement_cache_len,
                config.probe_after,
            ),
            lost: LostContacts::new(
                config.lost_contacts_len,
                config.lost_probe_min,
                config.lost_probe_max,
                config.lost_probe_horizon,
            ),
            suspects: SuspectList::new(config.suspect_ttl, config.max_suspects),
            store: RecordStore::new(config.max_records, config.max_records_per_publisher),
            limiter: RateLimiter::new(
                config.rate_limit_burst,
                config.rate_limit_per_sec,
                config.max_rate_limited_peers,
            ),
            config,
            own,
            auth,
            rng,
            pending: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_cid,
            lookups: HashMap::new(),
            next_lookup_id: 0,
            puts: HashMap::new(),
            next_put_id: 0,
            published: HashMap::new(),
            retired: HashMap::new(),
            republish_queue: BTreeSet::new(),
            seeds: Vec::new(),
            next_join: None,
            join_backoff: Millis::ZERO,
            next_refresh: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// This node's contact.
    pub fn own(&self) -> &Contact {
        &self.own
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The routing table (read-only).
    pub fn routing(&self) -> &RoutingTable {
        &self.routing
    }

    /// The local record store (read-only).
    pub fn store(&self) -> &RecordStore {
        &self.store
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.rate_limiter_resets = self.limiter.n_resets;
        s.lost_contacts = self.lost.len() as u64;
        s.suspects = self.suspects.len() as u64;
        s
    }

    /// True if `id` is on the lost list: evicted for not answering, and still
    /// being re-probed.
    pub fn is_lost(&self, id: &NodeId) -> bool {
        self.lost.contains(id)
    }

    /// Requests awaiting a response.
    pub fn n_pending(&self) -> usize {
        self.pending.len()
    }

    /// Lookups running (all purposes).
    pub fn n_lookups(&self) -> usize {
        self.lookups.len()
    }

    /// What a restarted node needs to serve again without a cold table
    /// (issue 21 item 5): every contact of the routing table, nearest to us
    /// first, and every record held with the lifetime it has left at `now`.
    /// The runtime writes it to disk and gives it back to [`Dht::restore`].
    pub fn snapshot(&self, now: Millis) -> Snapshot {
        let own = self.own.id;
        let mut contacts: Vec<Contact> = self.routing.iter().map(|e| e.contact.clone()).collect();
        contacts.sort_by_key(|c| distance(&own, &c.id));
        let records = self
            .store
            .iter()
            .filter(|s| s.expires > now)
            .map(|s| (s.record.clone(), Millis(s.expires.0 - now.0)))
            .collect();
        Snapshot { contacts, records }
    }

    /// Takes back what [`Dht::snapshot`] saved before a restart: each record
    /// goes through the checks of a STORE (limits, signature, capacity, the
    /// publisher's own TTL) with the lifetime it had left; the contacts are
    /// the join's seeds, nearest first, at most `k` of them (the others are
    /// learned again by the join's lookups), like [`Dht::bootstrap`]. A node
    /// with no seeds of its own joins through them; a first node (no seeds
    /// configured) is bootstrapped at once as always, and its join still
    /// asks them. Returns what was restored.
    pub fn restore(&mut self, snapshot: Snapshot, now: Millis) -> Restored {
        let mut restored = Restored::default();
        for (record, left) in snapshot.records {
            match self.check_and_insert(record, left, now) {
                Ok(()) => restored.records += 1,
                Err(_) => restored.records_rejected += 1,
            }
        }
        let own = self.own.id;
        let mut seeds: Vec<Contact> = snapshot
            .contacts
            .into_iter()
            .filter(|c| c.id != own)
            .collect();
        seeds.sort_by_key(|c| distance(&own, &c.id));
        seeds.dedup_by(|a, b| a.id == b.id);
        seeds.truncate(self.config.k);
        restored.contacts = seeds.len();
        if seeds.is_empty() {
            return restored;
        }
        self.bootstrap(seeds, now);
        restored
    }

    /// Up to `n` known contacts closest to `key`, from the routing table only.
    pub fn closest_local(&self, key: &NodeId, n: usize) -> Vec<Contact> {
        self.routing.closest(key, n)
    }

    // ----- commands -------------------------------------------------------

    /// Joins the mesh through `seeds` (whose IDs the runtime learned in the TLS
    /// handshake): adds them, then looks up our own ID. With no seeds this is a
    /// first node: it emits `Bootstrapped { n_contacts: 0 }` and waits for others
    /// to contact it. Also starts the refresh timer.
    pub fn bootstrap(&mut self, seeds: Vec<Contact>, now: Millis) {
        self.seeds = seeds.into_iter().filter(|s| s.id != self.own.id).collect();
        self.join_backoff = self.config.join_retry_min;
        self.next_refresh = Some(now.saturating_add(self.config.refresh_check_interval));
        if self.seeds.is_empty() {
            self.events.push_back(Event::Bootstrapped {
                n_contacts: self.routing.len(),
            });
            return;
        }
        self.join(now);
    }

    fn join(&mut self, now: Millis) {
        self.next_join = None;
        for s in self.seeds.clone() {
            self.observe(s, now);
        }
        let own = self.own.id;
        if self
            .start_lookup_inner(own, LookupKind::FindNode, LookupPurpose::Join, now)
            .is_err()
        {
            // Too busy to join now: try again later.
            self.schedule_rejoin(now);
        }
    }

    /// The join reached nobody: try again after a doubling backoff.
    fn schedule_rejoin(&mut self, now: Millis) {
        self.next_join = Some(now.saturating_add(self.join_backoff));
        self.join_backoff = self
            .join_backoff
            .saturating_add(self.join_backoff)
            .min(self.config.join_retry_max);
    }

    /// Starts an iterative lookup; its result arrives as
    /// [`Event::LookupFinished`]. Our own record copies count for `FindValue`.
    pub fn start_lookup(
        &mut self,
        target: NodeId,
        kind: LookupKind,
        now: Millis,
    ) -> Result<LookupId, LookupError> {
        self.start_lookup_inner(target, kind, LookupPurpose::User, now)
    }

    /// `start_lookup(key, FindValue)`: the records under `key` from every
    /// reachable replica.
    pub fn get(&mut self, key: NodeId, now: Millis) -> Result<LookupId, LookupError> {
        self.start_lookup(key, LookupKind::FindValue, now)
    }

    /// Publishes `value` under `key` for `ttl`: signs a record, finds the k
    /// closest nodes, STOREs to them, and reports [`Event::PutFinished`] with the
    /// nodes that confirmed. Succeeds when at least `Config::store_quorum` of the
    /// replica set confirmed. Until [`Dht::unpublish`], the record is
    /// republished after `republish_percent` of its TTL.
    ///
    /// `Config::seq_base + now` also seeds the record's `seq` (a later put
    /// must carry a higher one), so that it keeps growing across restarts of
    /// a process whose monotonic clock restarts at zero.
    pub fn put(
        &mut self,
        key: NodeId,
        value: Vec<u8>,
        ttl: Millis,
        now: Millis,
    ) -> Result<PutId, PutError> {
        let floor = self.config.seq_base.saturating_add(now.0);
        self.retired.retain(|_, seq| *seq >= floor);
        let last = self
            .published
            .get(&key)
            .map(|p| p.record.seq)
            .or_else(|| self.retired.get(&key).copied());
        let seq = last.map_or(floor, |s| s.saturating_add(1).max(floor));
        let mut record = Record {
            key,
            publisher: self.own.id,
            seq,
            ttl,
            value,
            signature: Vec::new(),
        };
        record.check_limits(&self.config)?;
        if !self.published.contains_key(&key)
            && self.published.len() >= self.config.max_records_per_publisher
        {
            return Err(PutError::TooManyPublished {
                max: self.config.max_records_per_publisher,
            });
        }
        if self.puts.len() >= self.config.max_active_puts
            || self.lookups.len() >= self.config.max_active_lookups
        {
            return Err(PutError::Busy);
        }
        record.signature = self.auth.sign(&record.signed_bytes());
        record.check_limits(&self.config)?;
        if let Some(old) = self.published.remove(&key) {
            self.republish_queue.remove(&(old.republish_at, key));
        }
        self.retired.remove(&key);
        let republish_at =
            now.saturating_add(ttl.percent(u64::from(self.config.republish_percent)));
        self.republish_queue.insert((republish_at, key));
        self.published.insert(
            key,
            Published {
                record: record.clone(),
                republish_at,
            },
        );
        self.start_put(record, true, now)
    }

    /// Stops republishing `key`; replicas drop it when its TTL runs out.
    /// Returns false if this node was not publishing it.
    pub fn unpublish(&mut self, key: &NodeId) -> bool {
        match self.published.remove(key) {
            Some(p) => {
                self.republish_queue.remove(&(p.republish_at, *key));
                // A put of this key soon after must still carry a higher seq
                // (puts within one millisecond count up past the floor).
                self.retired.insert(*key, p.record.seq);
                true
            }
            None => false,
        }
    }

    fn start_put(&mut self, record: Record, user: bool, now: Millis) -> Result<PutId, PutError> {
        if self.puts.len() >= self.config.max_active_puts {
            return Err(PutError::Busy);
        }
        let id = PutId(self.next_put_id);
        self.next_put_id += 1;
        let key = record.key;
        self.puts.insert(
            id,
            PutOp {
                record,
                phase: PutPhase::Lookup,
                stored: Vec::new(),
                user,
            },
        );
        // The lookup may finish at once (empty table) and start storing: the
        // operation must be registered first.
        if self
            .start_lookup_inner(key, LookupKind::FindNode, LookupPurpose::Put(id.0), now)
            .is_err()
        {
            self.puts.remove(&id);
            return Err(PutError::Busy);
        }
        Ok(id)
    }

    /// The transport learned that `id` is leaving the mesh (it said goodbye
    /// before closing its connection): drop it from the routing table now and
    /// fail its outstanding requests without retry, instead of waiting for
    /// every one of them to time out twice.
    ///
    /// The peer is not put on the lost list (a peer that said goodbye, or one
    /// the runtime unlists, must not be pinged back into the table); if it is
    /// already there (it stopped answering earlier) it stays.
    pub fn peer_left(&mut self, id: &NodeId, now: Millis) {
        self.drop_peer(id, now, false);
    }

    /// Like [`Dht::peer_left`], for a peer the transport found unreachable (a
    /// connection that timed out, not a goodbye): it is dropped now, and, if
    /// it was in the routing table, put on the lost list to be re-probed like
    /// a peer whose requests timed out, so a partition heals by itself.
    pub fn peer_unreachable(&mut self, id: &NodeId, now: Millis) {
        self.drop_peer(id, now, true);
    }

    fn drop_peer(&mut self, id: &NodeId, now: Millis, remember: bool) {
        if remember {
            self.suspect(*id, now);
        }
        let known = self.routing.get(id).map(|e| e.contact.clone());
        if self.routing.mark_unresponsive(id, now) {
            self.stats.peers_evicted += 1;
            if let (true, Some(contact)) = (remember, known) {
                self.remember_lost(contact, now);
            }
        }
        let mut cids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.to.id == *id)
            .map(|(cid, _)| *cid)
            .collect();
        // In a fixed order (deadline, then ID), not the map's: what the
        // lookups send next must not depend on hashing (replayable runs).
        cids.sort_unstable_by_key(|cid| self.pending.get(cid).map(|p| (p.deadline, *cid)));
        for cid in cids {
            if let Some(mut p) = self.pending.remove(&cid) {
                self.deadlines.remove(&(p.deadline, cid));
                // Same path as a final timeout: no retry, peer marked failed.
                p.attempt = self.config.request_attempts;
                self.on_request_timeout(p, now);
            }
        }
    }

    /// The runtime could not decode a DHT message from `from` (malformed or
    /// oversized): count it and empty the peer's token bucket.
    pub fn report_malformed(&mut self, from: &NodeId, now: Millis) {
        self.stats.requests_malformed += 1;
        self.limiter.penalise(from, now);
    }

    // ----- inputs ---------------------------------------------------------

    /// A request from `from` (ID proved by the transport). Returns the response
    /// to send back under the request's correlation ID, or why none is sent.
    pub fn handle_request(
        &mut self,
        from: &Contact,
        request: Request,
        now: Millis,
    ) -> Result<Response, RequestError> {
        self.serve_request(from, request, now, true)
    }

    /// Like `handle_request`, but `from` is not added to the routing table:
    /// a peer others cannot dial (behind NAT, or reached through a relay)
    /// is answered but never handed out as a contact.
    pub fn handle_request_unlisted(
        &mut self,
        from: &Contact,
        request: Request,
        now: Millis,
    ) -> Result<Response, RequestError> {
        self.serve_request(from, request, now, false)
    }

    fn serve_request(
        &mut self,
        from: &Contact,
        request: Request,
        now: Millis,
        list: bool,
    ) -> Result<Response, RequestError> {
        self.stats.requests_received += 1;
        if from.id == self.own.id {
            self.stats.requests_malformed += 1;
            return Err(RequestError::FromSelf);
        }
        if !self.limiter.allow(&from.id, now) {
            self.stats.requests_rate_limited += 1;
            return Err(RequestError::RateLimited);
        }
        // It spoke to us directly, so it is alive and worth a routing slot
        // (unless it cannot be dialed: then it must not be pinged back into
        // the table either, so it leaves the lost list too).
        if list {
            self.observe(from.clone(), now);
        } else if self.lost.remove(&from.id) {
            self.stats.lost_contacts_restored += 1;
        }
        let k = self.config.k;
        Ok(match request {
            Request::Ping => Response::Pong,
            Request::FindNode { target } => Response::Nodes {
                closer: self.routing.closest_excluding(&target, k, Some(&from.id)),
            },
            Request::FindValue { key } => Response::Value {
                records: self.store.get(&key, self.config.max_records_per_response),
                closer: self.routing.closest_excluding(&key, k, Some(&from.id)),
            },
            Request::Store { record, ttl } => match self.accept_record(record, ttl, now) {
                Ok(()) => Response::Stored,
                Err(e) => Response::StoreRejected(e),
            },
        })
    }

    /// The response from `from` to our request `correlation_id`. Responses that
    /// match no outstanding request (late, duplicated, or from the wrong peer)
    /// are dropped and counted.
    pub fn handle_response(
        &mut self,
        from: &NodeId,
        correlation_id: CorrelationId,
        response: Response,
        now: Millis,
    ) {
        self.stats.responses_received += 1;
        let cid = correlation_id.0;
        let p = match self.pending.remove(&cid) {
            Some(p) if p.to.id == *from => p,
            Some(p) => {
                // Another peer must not be able to cancel our request.
                self.pending.insert(cid, p);
                self.stats.responses_unmatched += 1;
                return;
            }
            None => {
                self.stats.responses_unmatched += 1;
                return;
            }
        };
        self.deadlines.remove(&(p.deadline, cid));
        self.observe(p.to.clone(), now);
        match p.purpose {
            Purpose::Lookup(id) => self.on_lookup_response(id, &p.to.id, response, now),
            Purpose::Probe | Purpose::LostProbe => {
                // `observe` above already moved the probed entry to the tail,
                // or put the lost contact back and took it off the lost list.
                if response != Response::Pong {
                    self.stats.responses_malformed += 1;
                }
            }
            Purpose::Store(put) => {
                let ok = match response {
                    Response::Stored => true,
                    Response::StoreRejected(_) => false,
                    _ => {
                        self.stats.responses_malformed += 1;
                        false
                    }
                };
                self.on_store_result(put, from, ok, now);
            }
            Purpose::Replicate => {}
        }
    }

    /// Fires every timer due at or before `now`: request timeouts (retry once,
    /// then mark the peer unresponsive), lost-contact probes and expiry, record
    /// expiry, republish, and bucket refresh. Harmless to call early or often.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.stats.records_expired += self.store.expire(now) as u64;
        self.suspects.expire(now);

        while let Some(&(at, cid)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, cid));
            if let Some(p) = self.pending.remove(&cid) {
                self.on_request_timeout(p, now);
            }
        }

        self.probe_lost(now);

        while let Some(&(at, key)) = self.republish_queue.first() {
            if at > now {
                break;
            }
            self.republish_queue.remove(&(at, key));
            let Some(p) = self.published.get_mut(&key) else {
                continue;
            };
            let next = now.saturating_add(
                p.record
                    .ttl
                    .percent(u64::from(self.config.republish_percent)),
            );
            p.republish_at = next;
            let record = p.record.clone();
            self.republish_queue.insert((next, key));
            self.stats.republishes += 1;
            if self.start_put(record, false, now).is_err() {
                self.schedule_republish_retry(&key, now);
            }
        }

        if self.next_join.is_some_and(|t| t <= now) {
            self.join(now);
        }

        if self.next_refresh.is_some_and(|t| t <= now) {
            self.next_refresh = Some(now.saturating_add(self.config.refresh_check_interval));
            self.refresh(now);
        }
    }

    // ----- outputs --------------------------------------------------------

    /// The next request to send. Drain until `None` after every input.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.transmits.pop_front()
    }

    /// The next event. Drain until `None` after every input.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Dht::handle_timeout`] next needs to run, if ever.
    pub fn poll_timeout(&self) -> Option<Millis> {
        [
            self.deadlines.first().map(|d| d.0),
            self.store.next_expiry(),
            self.republish_queue.first().map(|r| r.0),
            self.next_refresh,
            self.next_join,
            self.lost.next_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- internals ------------------------------------------------------

    /// We heard from `contact` directly: update the routing table, probe a full
    /// bucket's stale head, hand records to a newly added closer node, and take
    /// the contact off the lost list if it was there.
    fn observe(&mut self, contact: Contact, now: Millis) {
        self.suspects.heard_from(&contact.id);
        let insert = self.routing.seen(contact.clone(), now);
        if insert != Insert::IsSelf && self.lost.remove(&contact.id) {
            self.stats.lost_contacts_restored += 1;
        }
        match insert {
            Insert::Added => self.replicate_to(&contact, now),
            Insert::Cached { probe: Some(head) } => {
                let id = head.id;
                if !self.send(head, Request::Ping, Purpose::Probe, now) {
                    self.routing.probe_abandoned(&id);
                }
            }
            Insert::Cached { probe: None } | Insert::Updated | Insert::IsSelf => {}
        }
    }

    fn send(&mut self, to: Contact, request: Request, purpose: Purpose, now: Millis) -> bool {
        if self.pending.len() >= self.config.max_pending_requests {
            self.stats.requests_dropped_pending_full += 1;
            return false;
        }
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        let deadline = now.saturating_add(self.config.request_timeout);
        self.transmits.push_back(Outgoing {
            to: to.clone(),
            correlation_id: CorrelationId(cid),
            request: request.clone(),
        });
        self.pending.insert(
            cid,
            Pending {
                to,
                request,
                first_sent: now,
                deadline,
                attempt: 1,
                purpose,
            },
        );
        self.deadlines.insert((deadline, cid));
        self.stats.requests_sent += 1;
        true
    }

    fn on_request_timeout(&mut self, mut p: Pending, now: Millis) {
        self.stats.request_timeouts += 1;
        if p.attempt < self.config.request_attempts {
            // Retry under a new correlation ID: a late answer to the first
            // attempt is then recognisably late, and counted as such.
            let cid = self.next_cid;
            self.next_cid = self.next_cid.wrapping_add(1);
            p.attempt += 1;
            p.deadline = now.saturating_add(self.config.request_timeout);
            self.transmits.push_back(Outgoing {
                to: p.to.clone(),
                correlation_id: CorrelationId(cid),
                request: p.request.clone(),
            });
            self.deadlines.insert((p.deadline, cid));
            if let Purpose::Lookup(id) = p.purpose {
                if let Some(l) = self.lookups.get_mut(&id) {
                    l.count_retry();
                }
            }
            self.pending.insert(cid, p);
            self.stats.requests_sent += 1;
            self.stats.retries += 1;
            return;
        }
        self.suspect(p.to.id, now);
        // The table's entry may carry a newer address than the request did.
        let known = self.routing.get(&p.to.id).map(|e| e.contact.clone());
        if self.routing.mark_unresponsive(&p.to.id, p.first_sent) {
            self.stats.peers_evicted += 1;
            self.remember_lost(known.unwrap_or_else(|| p.to.clone()), now);
        }
        match p.purpose {
            Purpose::Lookup(id) => {
                if let Some(l) = self.lookups.get_mut(&id) {
                    l.on_failure(&p.to.id);
                }
                self.advance_lookup(id, now);
            }
            Purpose::Store(put) => self.on_store_result(put, &p.to.id, false, now),
            // Still lost (not in the table, so not removed or counted again):
            // it keeps its place and its grown backoff.
            Purpose::LostProbe => self.lost.set_probing(&p.to.id, false),
            Purpose::Probe | Purpose::Replicate => {}
        }
    }

    fn suspect(&mut self, id: NodeId, now: Millis) {
        if self.suspects.declare_down(id, now) {
            self.stats.suspects_declared += 1;
        }
    }

    /// Is `id` suspected (see [`crate::config::SUSPECT_TTL`]) at `now`?
    pub fn is_suspected(&self, id: &NodeId, now: Millis) -> bool {
        self.suspects.is_down(id, now)
    }

    /// `contact` was just evicted for not answering: keep it on the bounded
    /// lost list, to be pinged on a backoff until it answers or the horizon.
    fn remember_lost(&mut self, contact: Contact, now: Millis) {
        self.stats.lost_contacts_dropped += self.lost.insert(contact, now) as u64;
    }

    /// Pings every lost contact whose probe is due and gives up those past the
    /// horizon, earliest first. The pings go through `send`, so they count
    /// against `max_pending_requests` like any request; one that cannot be
    /// sent waits for its next (already scheduled) turn.
    fn probe_lost(&mut self, now: Millis) {
        while let Some(due) = self.lost.pop_due(now) {
            match due {
                Due::Probe(contact) => {
                    let id = contact.id;
                    if self.send(contact, Request::Ping, Purpose::LostProbe, now) {
                        self.stats.lost_contacts_probed += 1;
                        self.lost.set_probing(&id, true);
                    }
                }
                Due::Expired(_) => self.stats.lost_contacts_expired += 1,
                Due::StillProbing => {}
            }
        }
    }

    fn start_lookup_inner(
        &mut self,
        target: NodeId,
        kind: LookupKind,
        purpose: LookupPurpose,
        now: Millis,
    ) -> Result<LookupId, LookupError> {
        if self.lookups.len() >= self.config.max_active_lookups {
            return Err(LookupError::TooManyLookups {
                max: self.config.max_active_lookups,
            });
        }
        let id = LookupId(self.next_lookup_id);
        self.next_lookup_id += 1;
        self.routing.touch(&target, now);
        let seeds = self.routing.closest(&target, self.config.k);
        let mut lookup = Lookup::new(
            target,
            kind,
            purpose,
            &self.own.id,
            seeds,
            now,
            self.config.max_lookup_candidates,
            self.config.max_records_per_response,
        );
        if kind == LookupKind::FindValue {
            lookup.add_local_records(
                self.store
                    .get(&target, self.config.max_records_per_response),
            );
        }
        self.lookups.insert(id, lookup);
        self.stats.lookups_started += 1;
        self.advance_lookup(id, now);
        Ok(id)
    }

    /// Sends as many requests as the lookup may have in flight, or finishes it.
    fn advance_lookup(&mut self, id: LookupId, now: Millis) {
        let (alpha, k, max_requests) = (
            self.config.alpha,
            self.config.k,
            self.config.max_lookup_requests,
        );
        loop {
            let Some(l) = self.lookups.get_mut(&id) else {
                return;
            };
            if l.is_done(k) {
                break;
            }
            let Some(contact) = l.next(alpha, k, max_requests) else {
                if l.in_flight == 0 {
                    // Nobody left to ask, or the budget is spent.
                    break;
                }
                return;
            };
            let request = match l.kind {
                LookupKind::FindNode => Request::FindNode { target: l.target },
                LookupKind::FindValue => Request::FindValue { key: l.target },
            };
            let peer = contact.id;
            let suspected = self.suspects.is_down(&peer, now);
            let sent = self.send(contact, request, Purpose::Lookup(id), now);
            if let Some(l) = self.lookups.get_mut(&id) {
                if !sent {
                    l.on_failure(&peer);
                } else if suspected {
                    // Asked (an answer puts it back), never waited on.
                    self.stats.suspects_not_waited += 1;
                    l.not_waited(&peer);
                }
            }
        }
        self.finish_lookup(id, now);
    }

    fn finish_lookup(&mut self, id: LookupId, now: Millis) {
        let Some(l) = self.lookups.remove(&id) else {
            return;
        };
        self.stats.lookups_finished += 1;
        let purpose = l.purpose;
        let outcome = l.finish(self.config.k, now);
        match purpose {
            LookupPurpose::User => self.events.push_back(Event::LookupFinished { id, outcome }),
            LookupPurpose::Join => {
                self.events.push_back(Event::Bootstrapped {
                    n_contacts: self.routing.len(),
                });
                if outcome.closest.is_empty() {
                    // Every seed stayed silent (or was lost twice on the way).
                    self.schedule_rejoin(now);
                } else {
                    self.join_backoff = self.config.join_retry_min;
                    self.refresh_far_buckets(now);
                }
            }
            LookupPurpose::Refresh => {}
            LookupPurpose::Put(put) => self.start_storing(PutId(put), outcome.closest, now),
        }
    }

    fn on_lookup_response(&mut self, id: LookupId, from: &NodeId, response: Response, now: Millis) {
        let Some(kind) = self.lookups.get(&id).map(|l| l.kind) else {
            // The lookup already ended: the answer was useful to the routing
            // table only.
            return;
        };
        let (mut closer, mut records) = match (kind, response) {
            (_, Response::Nodes { closer }) => (closer, Vec::new()),
            (LookupKind::FindValue, Response::Value { records, closer }) => (closer, records),
            _ => {
                self.stats.responses_malformed += 1;
                self.limiter.penalise(from, now);
                if let Some(l) = self.lookups.get_mut(&id) {
                    l.on_failure(from);
                }
                self.advance_lookup(id, now);
                return;
            }
        };
        if closer.len() > self.config.max_contacts_per_response {
            self.stats.responses_malformed += 1;
            closer.truncate(self.config.max_contacts_per_response);
        }
        if records.len() > self.config.max_records_per_response {
            self.stats.responses_malformed += 1;
            records.truncate(self.config.max_records_per_response);
        }
        let target = self.lookups.get(&id).map(|l| l.target);
        let n_before = records.len();
        records.retain(|r| {
            Some(r.key) == target
                && r.check_limits(&self.config).is_ok()
                && self
                    .auth
                    .verify(&r.publisher, &r.signed_bytes(), &r.signature)
        });
        self.stats.records_rejected += (n_before - records.len()) as u64;
        if let Some(l) = self.lookups.get_mut(&id) {
            l.on_answer(from, closer, records);
        }
        self.advance_lookup(id, now);
    }

    fn start_storing(&mut self, put: PutId, closest: Vec<Contact>, now: Millis) {
        let Some(op) = self.puts.get(&put) else {
            return;
        };
        let record = op.record.clone();
        let key = record.key;
        // The replica set: the k closest that answered, plus ourselves if we are
        // among the k closest.
        let mut replicas = closest;
        replicas.push(self.own.clone());
        replicas.sort_by_key(|c| distance(&c.id, &key));
        replicas.truncate(self.config.k);
        let needed = self.config.store_quorum(replicas.len());
        let mut waiting = 0;
        let mut stored = Vec::new();
        for r in replicas {
            if r.id == self.own.id {
                if self.accept_record(record.clone(), record.ttl, now).is_ok() {
                    stored.push(self.own.id);
                }
            } else if self.send(
                r,
                Request::Store {
                    record: record.clone(),
                    ttl: record.ttl,
                },
                Purpose::Store(put),
                now,
            ) {
                waiting += 1;
            }
        }
        if let Some(op) = self.puts.get_mut(&put) {
            op.stored = stored;
            op.phase = PutPhase::Storing { waiting, needed };
        }
        if waiting == 0 {
            self.finish_put(put, now);
        }
    }

    fn on_store_result(&mut self, put: PutId, from: &NodeId, ok: bool, now: Millis) {
        let Some(op) = self.puts.get_mut(&put) else {
            return;
        };
        let PutPhase::Storing { waiting, .. } = &mut op.phase else {
            return;
        };
        *waiting = waiting.saturating_sub(1);
        let done = *waiting == 0;
        if ok {
            op.stored.push(*from);
        }
        if done {
            self.finish_put(put, now);
        }
    }

    fn finish_put(&mut self, put: PutId, now: Millis) {
        let Some(op) = self.puts.remove(&put) else {
            return;
        };
        let needed = match op.phase {
            PutPhase::Storing { needed, .. } => needed,
            PutPhase::Lookup => 1,
        };
        let key = op.record.key;
        let result = if op.stored.len() >= needed {
            self.stats.puts_succeeded += 1;
            Ok(op.stored)
        } else {
            self.stats.puts_failed += 1;
            if !op.user {
                self.schedule_republish_retry(&key, now);
            }
            Err(PutError::QuorumNotReached {
                stored: op.stored,
                needed,
            })
        };
        if op.user {
            self.events.push_back(Event::PutFinished {
                id: put,
                key,
                result,
            });
        }
    }

    fn schedule_republish_retry(&mut self, key: &NodeId, now: Millis) {
        if let Some(p) = self.published.get_mut(key) {
            let retry = now.saturating_add(self.config.republish_retry);
            if retry < p.republish_at {
                self.republish_queue.remove(&(p.republish_at, *key));
                p.republish_at = retry;
                self.republish_queue.insert((retry, *key));
            }
        }
    }

    /// Checks and stores a record offered by a peer (or ourselves), keeping it
    /// for at most `ttl` (never longer than the TTL the publisher signed).
    fn accept_record(
        &mut self,
        record: Record,
        ttl: Millis,
        now: Millis,
    ) -> Result<(), RecordError> {
        let result = self.check_and_insert(record, ttl, now);
        match result {
            Ok(()) => self.stats.records_stored += 1,
            Err(_) => self.stats.records_rejected += 1,
        }
        result
    }

    fn check_and_insert(
        &mut self,
        record: Record,
        ttl: Millis,
        now: Millis,
    ) -> Result<(), RecordError> {
        // Cheap limits first, the signature (expensive) next, capacity last.
        record.check_limits(&self.config)?;
        let ttl = ttl.min(record.ttl);
        if ttl == Millis::ZERO {
            return Err(RecordError::TtlZero);
        }
        if !self
            .auth
            .verify(&record.publisher, &record.signed_bytes(), &record.signature)
        {
            return Err(RecordError::BadSignature);
        }
        self.store.insert(record, now.saturating_add(ttl))
    }

    /// Kademlia's replication to a newcomer: for each key we hold where no known
    /// node is closer than us (so exactly one node, the closest, pushes) and the
    /// newcomer now belongs to the key's k closest, send it the record with what
    /// is left of its lifetime.
    fn replicate_to(&mut self, newcomer: &Contact, now: Millis) {
        if self.store.is_empty() {
            return;
        }
        let k = self.config.k;
        let mut batch = Vec::new();
        let mut last_key: Option<(NodeId, bool)> = None;
        for s in self.store.iter() {
            if batch.len() >= self.config.max_replicate_per_contact {
                break;
            }
            let key = s.record.key;
            let wanted = match last_key {
                Some((k0, w)) if k0 == key => w,
                _ => {
                    let w = !self.routing.has_closer_than_self(&key, &newcomer.id)
                        && (distance(&newcomer.id, &key) < distance(&self.own.id, &key)
                            || self
                                .routing
                                .closest(&key, k.saturating_sub(1))
                                .iter()
                                .any(|c| c.id == newcomer.id));
                    last_key = Some((key, w));
                    w
                }
            };
            let ttl = s.expires.saturating_sub(now);
            if wanted && ttl > Millis::ZERO {
                batch.push((s.record.clone(), ttl));
            }
        }
        for (record, ttl) in batch {
            if self.send(
                newcomer.clone(),
                Request::Store { record, ttl },
                Purpose::Replicate,
                now,
            ) {
                self.stats.records_replicated += 1;
            }
        }
    }

    /// After the join: look up a random ID in every bucket farther than our
    /// closest neighbour, so those buckets fill up before anyone needs them.
    fn refresh_far_buckets(&mut self, now: Millis) {
        let Some(nearest) = self.routing.closest(&self.own.id, 1).pop() else {
            return;
        };
        let depth = common_prefix_len(&self.own.id, &nearest.id);
        for i in 0..depth {
            let target = self.routing.random_id_in_bucket(i, &mut self.rng);
            if self
                .start_lookup_inner(target, LookupKind::FindNode, LookupPurpose::Refresh, now)
                .is_err()
            {
                break;
            }
        }
    }

    /// Periodic: re-join if we lost every contact, else refresh stale buckets.
    fn refresh(&mut self, now: Millis) {
        if self.routing.is_empty() {
            if !self.seeds.is_empty() && self.next_join.is_none() {
                self.join(now);
            }
            return;
        }
        for i in self
            .routing
            .stale_buckets(now, self.config.refresh_interval)
        {
            let target = self.routing.random_id_in_bucket(i, &mut self.rng);
            if self
                .start_lookup_inner(target, LookupKind::FindNode, LookupPurpose::Refresh, now)
                .is_err()
            {
                break;
            }
        }
    }
}
