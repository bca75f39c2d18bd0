//! A full node's view of interest in the mesh: its own interest records
//! (one per rendezvous name, puts coalesced), what it learned of others'
//! (a cache per rendezvous name, refreshed while stale), the route cache
//! per topic built from that, and the nodes set aside as unreachable.
//!
//! The core emits "put this record" and "look this name up" actions and is
//! fed their results; it never waits. This module must not know about
//! subscriptions' delivery or the wire; time is an argument.
//!
//! **Invariant:** a route is never used more than `cache_ttl` after the
//! oldest lookup it was built from *started* (the delivery bound), except
//! while a refresh is running and the entry is younger than `stale_max`.
//! A route built from such a stale entry is cached until the next lookup
//! finishes (or the entry reaches `stale_max`), so publishes meanwhile do
//! not each rebuild it.
//!
//! **Invariant:** a node set aside as unreachable gets no route until it
//! comes back (reconnects, or its interest record is newer than the one it
//! had when set aside) or its hold expires; the hold doubles each time it
//! is set aside again, from `down_hold_min` to `down_hold_max`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use macula_wire::ttl_cache::TtlCache;
use macula_wire::{Millis, NodeId};

use crate::counters::Counters;
use crate::event::{PubSubError, TopicName};
use crate::local::Local;
use crate::outbound::{Outbound, PeerRef};
use crate::rendezvous::{lookup_names, segment_name, summarize};
use crate::topic::{Pattern, Topic};
use crate::Limits;

/// Lifetime of an interest record in the DHT; the DHT republishes it at 75%
/// while the subscription lives, and it lapses this long after a crash
/// (publishers stop sending to a crashed node long before: see
/// [`DOWN_HOLD_MIN`]).
pub const INTEREST_TTL: Millis = Millis::from_secs(600);
/// How long a publisher reuses what it learned about interest in a topic.
/// This is the delivery bound: a publish that starts more than this long
/// after `subscribe` returned reaches the new subscriber, and one that starts
/// more than this long after the subscription was dropped is not sent to its
/// node for it.
pub const INTEREST_CACHE_TTL: Millis = Millis(1000);
/// An expired interest entry younger than this is still used while a
/// background lookup refreshes it, so a slow DHT delays what publishers learn
/// (by the lookup's duration) instead of stalling every publish.
pub const INTEREST_STALE_MAX: Millis = Millis::from_secs(30);
/// How long the publish that starts the refresh of an expired entry waits
/// for it before using the expired one (the refresh goes on regardless).
pub const INTEREST_REFRESH_WAIT: Millis = Millis(250);
/// Rendezvous names whose interest a publisher caches at once.
pub const INTEREST_CACHE_CAPACITY: usize = 1024;
/// Topics whose interested nodes a publisher remembers at once.
pub const ROUTE_CACHE_CAPACITY: usize = 4096;
/// Rendezvous names whose last interest put a node remembers beyond those
/// it has a live record under (the rest only save a redundant empty put).
pub const INTEREST_PUTS_REMEMBERED: usize = 4096;
/// How long a node found unreachable is left out of routes the first time
/// (it is tried again after that, or at once when it reconnects or puts a
/// newer interest record). Doubles each time it is found unreachable again.
pub const DOWN_HOLD_MIN: Millis = Millis::from_secs(30);
/// Longest hold of an unreachable node: its record's TTL, after which the
/// record has lapsed anyway.
pub const DOWN_HOLD_MAX: Millis = INTEREST_TTL;
/// Unreachable nodes remembered at once; past it the oldest is forgotten
/// (and may cost one more failed attempt).
pub const MAX_DOWN_NODES: usize = 4096;

/// Bounds and timers of interest handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterestLimits {
    /// See [`INTEREST_TTL`].
    pub ttl: Millis,
    /// See [`INTEREST_CACHE_TTL`].
    pub cache_ttl: Millis,
    /// See [`INTEREST_STALE_MAX`].
    pub stale_max: Millis,
    /// See [`INTEREST_REFRESH_WAIT`].
    pub refresh_wait: Millis,
    /// Largest record value (the DHT's value limit); a longer list is
    /// summarized.
    pub record_max: usize,
    /// See [`INTEREST_CACHE_CAPACITY`].
    pub cache_capacity: usize,
    /// See [`ROUTE_CACHE_CAPACITY`].
    pub route_cache_capacity: usize,
    /// See [`INTEREST_PUTS_REMEMBERED`].
    pub puts_remembered: usize,
    /// See [`DOWN_HOLD_MIN`].
    pub down_hold_min: Millis,
    /// See [`DOWN_HOLD_MAX`].
    pub down_hold_max: Millis,
    /// See [`MAX_DOWN_NODES`].
    pub max_down: usize,
}

impl Default for InterestLimits {
    fn default() -> Self {
        InterestLimits {
            ttl: INTEREST_TTL,
            cache_ttl: INTEREST_CACHE_TTL,
            stale_max: INTEREST_STALE_MAX,
            refresh_wait: INTEREST_REFRESH_WAIT,
            record_max: 8 * 1024,
            cache_capacity: INTEREST_CACHE_CAPACITY,
            route_cache_capacity: ROUTE_CACHE_CAPACITY,
            puts_remembered: INTEREST_PUTS_REMEMBERED,
            down_hold_min: DOWN_HOLD_MIN,
            down_hold_max: DOWN_HOLD_MAX,
            max_down: MAX_DOWN_NODES,
        }
    }
}

/// One interest record as the DHT returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterestRecord {
    /// The node that put (and signed) it.
    pub publisher: NodeId,
    /// Its record sequence number: a node that restarts and subscribes
    /// again puts a higher one.
    pub seq: u64,
    /// Its patterns, one per line.
    pub value: Vec<u8>,
}

/// Put this node's interest record under `name` (an empty value withdraws
/// it: put it, then stop republishing the key). Report the result with
/// `handle_interest_put(name, changes, ..)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterestPut {
    pub name: String,
    pub key: NodeId,
    pub value: Vec<u8>,
    pub ttl: Millis,
    /// Which subscription changes this put carries.
    pub changes: u64,
    /// Patterns subscribed under the name.
    pub n_patterns: usize,
    /// The value lists them exactly (not a summary).
    pub exact: bool,
}

impl InterestPut {
    /// The record is being withdrawn.
    pub fn is_withdrawal(&self) -> bool {
        self.value.is_empty()
    }
}

/// A change of how this node's record under one name is written, for the
/// driver to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordForm {
    /// It became a summary: publishers may send what this node drops.
    BecameSummary,
    /// It fits again and lists the patterns exactly.
    BecameExact,
}

/// Where one topic's messages go: cached per topic for at most the cache
/// TTL after the oldest lookup it was built from.
#[derive(Debug)]
pub struct Route {
    /// Used until then: `cache_ttl` after the oldest lookup it was built
    /// from started, or, for a route built from a stale entry while its
    /// refresh runs, the entry's `stale_max` (and only until a lookup
    /// finishes: `Mesh::provisional`).
    pub(crate) until: Millis,
    pub(crate) topic: Topic,
    pub(crate) name: TopicName,
    /// Interested nodes and their queues (`None`: no queue, the
    /// outbound-peer limit was reached; messages to it are dropped).
    pub(crate) targets: Vec<(NodeId, Option<PeerRef>)>,
}

impl Route {
    /// The interested nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.targets.iter().map(|(n, _)| n)
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        self.topic.as_str()
    }
}

/// What `route` says.
#[derive(Debug)]
pub enum RouteStep {
    /// Publish along this route.
    Ready(Arc<Route>),
    /// Lookups are running: ask again when one finishes, or at `until`
    /// (`None`: only when one finishes; lookups always finish).
    Wait { until: Option<Millis> },
}

/// How long a `route` caller is prepared to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patience {
    /// Wait for lookups as described in [`RouteStep::Wait`].
    Wait,
    /// Build a route from what is known now.
    Now,
}

struct Interested {
    node: NodeId,
    seq: u64,
    patterns: Vec<Pattern>,
}

struct Entry {
    /// When the lookup that produced it started.
    fetched: Millis,
    /// The lookup failed: no nodes, fresh for the cache TTL only (so a
    /// failing DHT is not asked on every publish), never used stale.
    failed: bool,
    nodes: Vec<Interested>,
}

#[derive(Clone, Copy, Debug)]
struct Down {
    since: Millis,
    until: Millis,
    hold: Millis,
    /// Highest record seq of the node known when it was set aside.
    seq: u64,
}

#[derive(Clone, Copy)]
struct Put {
    changes: u64,
    live: bool,
    summarized: bool,
}

struct NamePuts {
    segment: Box<str>,
    in_flight: Option<Put>,
    /// A change happened that no started put carries.
    dirty: bool,
    ok: Option<Put>,
    failed: Option<(u64, String)>,
}

/// What puts of this node's records are built from and where they go.
pub(crate) struct PutCtx<'a, S> {
    /// The current subscription change count.
    pub(crate) changes: u64,
    pub(crate) local: &'a Local<S>,
    pub(crate) actions: &'a mut VecDeque<MeshAction>,
    pub(crate) counters: &'a Counters,
}

/// A full node's interest state (see the module docs).
pub(crate) struct Mesh {
    node_id: NodeId,
    realm: String,
    pub(crate) limits: InterestLimits,
    topic_limits: Limits,
    /// Interest by name, expiring `stale_max` after its lookup started (too
    /// old to use while refreshing). Read with `peek`: an entry is still
    /// used past that while nothing newer is known (a refresh failed, or the
    /// route is built without waiting); the expiry only orders eviction.
    cache: TtlCache<String, Entry>,
    /// Lookups running, by name: when each started.
    lookups: HashMap<String, Millis>,
    /// Routes by topic, expiring `cache_ttl` after `Route::fetched`.
    routes: TtlCache<Box<str>, Arc<Route>>,
    last: Option<Arc<Route>>,
    /// Some cached route was built from a stale entry while its refresh
    /// runs: the next lookup to finish forgets the routes.
    provisional: bool,
    down: HashMap<NodeId, Down>,
    puts: HashMap<String, NamePuts>,
    leaving: bool,
}

/// What the mesh asks for (pushed into the core's action queue).
pub(crate) enum MeshAction {
    Lookup { name: String, key: NodeId },
    Put(InterestPut),
}

impl Mesh {
    pub(crate) fn new(
        node_id: NodeId,
        realm: String,
        limits: InterestLimits,
        topic_limits: Limits,
    ) -> Self {
        Mesh {
            node_id,
            realm,
            limits,
            topic_limits,
            // A capacity of 0 has always kept one entry.
            cache: TtlCache::new(limits.cache_capacity.max(1)),
            lookups: HashMap::new(),
            routes: TtlCache::new(limits.route_cache_capacity.max(1)),
            last: None,
            provisional: false,
            down: HashMap::new(),
            puts: HashMap::new(),
            leaving: false,
        }
    }

    // ----- routes ------------------------------------------------------

    /// The cached route of `topic` if still fresh and every queue it names
    /// is alive.
    pub(crate) fn cached_route<W: Clone + Default>(
        &mut self,
        topic: &str,
        now: Millis,
        out: &Outbound<W>,
    ) -> Option<Arc<Route>> {
        let r = match &self.last {
            Some(r) if r.topic.as_str() == topic => r.clone(),
            _ => {
                let r = self.routes.get(topic, now)?.clone();
                self.last = Some(r.clone());
                r
            }
        };
        if now >= r.until
            || r.targets
                .iter()
                .any(|(_, q)| q.is_some_and(|q| !out.is_live(q)))
        {
            return None;
        }
        Some(r)
    }

    /// See `PubSubCore::route`.
    pub(crate) fn route<W: Clone + Default>(
        &mut self,
        topic: &str,
        now: Millis,
        patience: Patience,
        out: &mut Outbound<W>,
        frame_limit: u32,
        actions: &mut VecDeque<MeshAction>,
    ) -> Result<RouteStep, PubSubError> {
        if let Some(r) = self.cached_route(topic, now, out) {
            return Ok(RouteStep::Ready(r));
        }
        let parsed = Topic::with_limits(topic, &self.topic_limits).map_err(|source| {
            PubSubError::InvalidTopic {
                topic: topic.to_string(),
                source,
            }
        })?;
        let names = lookup_names(&self.realm, &parsed);
        // Forever (None) beats any deadline; a deadline beats no wait.
        let mut wait: Option<Option<Millis>> = None;
        // The earliest a stale entry used here gets too old to use.
        let mut stale_until: Option<Millis> = None;
        for name in &names {
            let age = self
                .cache
                .peek(name)
                .map(|e| (now.saturating_sub(e.fetched), e.failed));
            match age {
                Some((age, _)) if age < self.limits.cache_ttl => {}
                Some((age, false)) if age < self.limits.stale_max => {
                    // Stale: refresh it. Only the publish that starts the
                    // refresh waits for it (a little); the others use the
                    // stale entry meanwhile.
                    let end = now
                        .saturating_sub(age)
                        .saturating_add(self.limits.stale_max);
                    stale_until = Some(stale_until.map_or(end, |u| u.min(end)));
                    if !self.lookups.contains_key(name) {
                        self.start_lookup(name, now, actions);
                        let until = now.saturating_add(self.limits.refresh_wait);
                        if wait.is_none() {
                            wait = Some(Some(until));
                        }
                    }
                }
                _ => {
                    if !self.lookups.contains_key(name) {
                        self.start_lookup(name, now, actions);
                    }
                    wait = Some(None);
                }
            }
        }
        if let (Some(until), Patience::Wait) = (wait, patience) {
            return Ok(RouteStep::Wait { until });
        }
        let mut route = self.build_route(parsed, &names, now, out, frame_limit);
        if let Some(until) = stale_until {
            // Built from a stale entry while its refresh runs: kept (not
            // rebuilt by every publish meanwhile) until a lookup finishes.
            route.until = until;
            self.provisional = true;
        }
        let route = Arc::new(route);
        self.cache_route(route.clone(), now);
        Ok(RouteStep::Ready(route))
    }

    fn build_route<W: Clone + Default>(
        &self,
        topic: Topic,
        names: &[String],
        now: Millis,
        out: &mut Outbound<W>,
        frame_limit: u32,
    ) -> Route {
        let mut fetched = now;
        let mut nodes: Vec<NodeId> = Vec::new();
        for name in names {
            let Some(e) = self.cache.peek(name) else {
                continue;
            };
            fetched = fetched.min(e.fetched);
            for n in &e.nodes {
                if n.node != self.node_id
                    && !nodes.contains(&n.node)
                    && !self.is_down(&n.node, now)
                    && n.patterns.iter().any(|p| p.matches(&topic))
                {
                    nodes.push(n.node);
                }
            }
        }
        let targets = nodes
            .into_iter()
            .map(|n| (n, out.queue_for(n, frame_limit, now)))
            .collect();
        Route {
            until: fetched.saturating_add(self.limits.cache_ttl),
            name: TopicName::from(topic.as_str()),
            topic,
            targets,
        }
    }

    fn cache_route(&mut self, route: Arc<Route>, now: Millis) {
        let expires = route.until;
        self.last = Some(route.clone());
        self.routes
            .insert(route.topic.as_str().into(), route, expires, now);
    }

    fn forget_routes(&mut self) {
        self.routes.clear();
        self.last = None;
        self.provisional = false;
    }

    // ----- lookups -----------------------------------------------------

    fn start_lookup(&mut self, name: &str, now: Millis, actions: &mut VecDeque<MeshAction>) {
        self.lookups.insert(name.to_string(), now);
        actions.push_back(MeshAction::Lookup {
            name: name.to_string(),
            key: macula_wire::dht_key(name.as_bytes()),
        });
    }

    /// Lookups running now.
    pub(crate) fn n_lookups(&self) -> usize {
        self.lookups.len()
    }

    /// How full each bounded table is: (interest entries, routes,
    /// remembered puts).
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        (self.cache.len(), self.routes.len(), self.puts.len())
    }

    /// The lookup of `name` finished.
    pub(crate) fn handle_lookup(
        &mut self,
        name: &str,
        result: Result<Vec<InterestRecord>, String>,
        now: Millis,
        counters: &Counters,
    ) {
        // A result nobody asked for (or a repeated one) still carries news;
        // its age is counted from now.
        let started = self.lookups.remove(name).unwrap_or(now);
        if self.provisional {
            // Routes built from stale entries were kept while refreshes
            // ran: rebuilt now, from what this one found.
            self.forget_routes();
        }
        let entry = match result {
            Ok(records) => {
                let mut nodes = Vec::with_capacity(records.len());
                for r in records {
                    if let Some(d) = self.down.get(&r.publisher) {
                        if r.seq > d.seq {
                            // A newer record: the node is back.
                            self.down.remove(&r.publisher);
                            counters.peers_restored_total.inc();
                            self.forget_routes();
                        }
                    }
                    let text = String::from_utf8_lossy(&r.value);
                    let patterns: Vec<Pattern> = text
                        .lines()
                        .filter_map(|l| Pattern::with_limits(l, &self.topic_limits).ok())
                        .collect();
                    if !patterns.is_empty() {
                        nodes.push(Interested {
                            node: r.publisher,
                            seq: r.seq,
                            patterns,
                        });
                    }
                }
                Entry {
                    fetched: started,
                    failed: false,
                    nodes,
                }
            }
            Err(_) => {
                if self.cache.peek(name).is_some_and(|e| !e.failed) {
                    // Keep what we knew; the next publish past the TTL
                    // tries again.
                    return;
                }
                Entry {
                    fetched: started,
                    failed: true,
                    nodes: Vec::new(),
                }
            }
        };
        // Full: what is too old to use goes first, then the oldest.
        let expires = entry.fetched.saturating_add(self.limits.stale_max);
        self.cache.insert(name.to_string(), entry, expires, now);
    }

    // ----- unreachable nodes -------------------------------------------

    fn is_down(&self, node: &NodeId, now: Millis) -> bool {
        self.down.get(node).is_some_and(|d| now < d.until)
    }

    /// Nodes set aside now.
    pub(crate) fn n_down(&self, now: Millis) -> usize {
        self.down.values().filter(|d| now < d.until).count()
    }

    /// Sets `node` aside (see the module docs) if it is one this node
    /// routes to or has interest records of. Returns whether it did.
    pub(crate) fn set_down(&mut self, node: &NodeId, known: bool, now: Millis) -> bool {
        let seq = self
            .cache
            .peek_iter()
            .flat_map(|(_, e)| e.nodes.iter())
            .filter(|n| n.node == *node)
            .map(|n| n.seq)
            .max();
        if seq.is_none() && !known {
            return false;
        }
        let hold = match self.down.get(node) {
            Some(d) => d.hold.saturating_add(d.hold).min(self.limits.down_hold_max),
            None => self.limits.down_hold_min,
        };
        if self.down.len() >= self.limits.max_down && !self.down.contains_key(node) {
            let oldest = self
                .down
                .iter()
                .min_by_key(|(_, d)| d.since)
                .map(|(n, _)| *n);
            if let Some(n) = oldest {
                self.down.remove(&n);
            }
        }
        self.down.insert(
            *node,
            Down {
                since: now,
                until: now.saturating_add(hold),
                hold,
                seq: seq.unwrap_or(0),
            },
        );
        self.forget_routes();
        true
    }

    /// `node` is reachable again (it connected). Returns whether it had
    /// been set aside.
    pub(crate) fn set_up(&mut self, node: &NodeId) -> bool {
        if self.down.remove(node).is_some() {
            self.forget_routes();
            return true;
        }
        false
    }

    // ----- this node's records -----------------------------------------

    /// A subscription under `segment` changed: put the record again (now,
    /// or after the put under way).
    pub(crate) fn changed<S: Clone>(&mut self, segment: &str, ctx: PutCtx<'_, S>) {
        if self.leaving {
            return;
        }
        let name = segment_name(&self.realm, segment);
        let p = self.puts.entry(name.clone()).or_insert_with(|| NamePuts {
            segment: segment.into(),
            in_flight: None,
            dirty: false,
            ok: None,
            failed: None,
        });
        p.dirty = true;
        if p.in_flight.is_none() {
            self.emit_put(&name, ctx);
        }
    }

    fn emit_put<S: Clone>(&mut self, name: &str, ctx: PutCtx<'_, S>) {
        let PutCtx {
            changes,
            local,
            actions,
            counters,
        } = ctx;
        let leaving = self.leaving;
        let record_max = self.limits.record_max;
        let ttl = self.limits.ttl;
        let Some(p) = self.puts.get_mut(name) else {
            return;
        };
        let patterns = match leaving {
            true => Vec::new(),
            false => local.patterns_of(&p.segment),
        };
        let summary = summarize(&patterns, record_max);
        let value = summary.patterns.join("\n").into_bytes();
        p.dirty = false;
        p.in_flight = Some(Put {
            changes,
            live: !value.is_empty(),
            summarized: !summary.exact,
        });
        counters.interest_puts_total.inc();
        actions.push_back(MeshAction::Put(InterestPut {
            name: name.to_string(),
            key: macula_wire::dht_key(name.as_bytes()),
            value,
            ttl,
            changes,
            n_patterns: patterns.len(),
            exact: summary.exact,
        }));
    }

    /// The put of `name` carrying `changes` finished.
    pub(crate) fn handle_put<S: Clone>(
        &mut self,
        name: &str,
        changes: u64,
        result: Result<(), String>,
        ctx: PutCtx<'_, S>,
    ) -> Option<RecordForm> {
        let counters = ctx.counters;
        let p = self.puts.get_mut(name)?;
        let put = p.in_flight.filter(|f| f.changes == changes)?;
        p.in_flight = None;
        let mut form = None;
        match result {
            Ok(()) => {
                let was = p.ok.is_some_and(|o| o.summarized);
                if put.summarized {
                    counters.interest_summarized_total.inc();
                    if !was {
                        form = Some(RecordForm::BecameSummary);
                    }
                } else if was && put.live {
                    form = Some(RecordForm::BecameExact);
                }
                p.ok = Some(put);
            }
            Err(reason) => p.failed = Some((changes, reason)),
        }
        if p.dirty {
            self.emit_put(name, ctx);
        }
        if self.puts.len() > self.limits.puts_remembered {
            self.puts
                .retain(|_, p| p.in_flight.is_some() || p.dirty || p.ok.is_some_and(|o| o.live));
        }
        form
    }

    /// Whether the subscription changes up to `wanted` are in the record
    /// under `name`: `None` while a put is still due.
    pub(crate) fn outcome(&self, name: &str, wanted: u64) -> Option<Result<(), String>> {
        if self.leaving {
            return Some(Ok(()));
        }
        let Some(p) = self.puts.get(name) else {
            return Some(Ok(()));
        };
        if p.ok.is_some_and(|o| o.changes >= wanted) {
            return Some(Ok(()));
        }
        match &p.failed {
            Some((c, reason)) if *c >= wanted => Some(Err(reason.clone())),
            _ => None,
        }
    }

    /// Graceful shutdown: withdraw every record (after the puts under way).
    pub(crate) fn leave<S: Clone>(&mut self, ctx: PutCtx<'_, S>) {
        let PutCtx {
            changes,
            local,
            actions,
            counters,
        } = ctx;
        self.leaving = true;
        let names: Vec<String> = self
            .puts
            .iter()
            .filter(|(_, p)| p.in_flight.is_some() || p.dirty || p.ok.is_some_and(|o| o.live))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(p) = self.puts.get_mut(&name) else {
                continue;
            };
            p.dirty = true;
            if p.in_flight.is_none() {
                let ctx = PutCtx {
                    changes,
                    local,
                    actions: &mut *actions,
                    counters,
                };
                self.emit_put(&name, ctx);
            }
        }
    }

    /// No put is running or due.
    pub(crate) fn settled(&self) -> bool {
        self.puts
            .values()
            .all(|p| p.in_flight.is_none() && !p.dirty)
    }

    /// Names with a live record of this node.
    pub(crate) fn live_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .puts
            .iter()
            .filter(|(_, p)| p.ok.is_some_and(|o| o.live))
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    pub(crate) fn realm(&self) -> &str {
        &self.realm
    }
}
