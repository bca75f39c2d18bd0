//! Mesh simulator: many [`Dht`] cores in one process on a virtual network.
//!
//! One seed determines everything: node IDs, start times, latencies, losses,
//! which nodes die and which pairs are looked up. Events run in (time, sequence)
//! order from a priority queue, so a run is exact and replayable; every report
//! and every assertion message carries the seed. Nodes are driven only through
//! the public `handle_*`/`poll_*` API, the way the runtime drives them.
//!
//! This module must not use threads or the wall clock, and must not reach into
//! core internals: what works here must work in the real node.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use macula_wire::NodeId;

use crate::rng::Rng;
use crate::{
    Config, Contact, CorrelationId, Dht, Event, InsecureNoAuth, LookupId, LookupKind,
    LookupOutcome, Millis, RecordAuth, Request, Response,
};

/// The virtual network.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    /// Smallest one-way latency.
    pub latency_min: Millis,
    /// Largest one-way latency (uniform in between).
    pub latency_max: Millis,
    /// Probability that one message (request or response) is lost, 0.0..=1.0.
    pub loss: f64,
}

impl Default for NetConfig {
    /// 10-100 ms one way (a WAN spread) with 1% loss each way.
    fn default() -> NetConfig {
        NetConfig {
            latency_min: Millis(10),
            latency_max: Millis(100),
            loss: 0.01,
        }
    }
}

/// Message and event counts of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Requests and responses put on the network.
    pub messages_sent: u64,
    /// Of those, lost by the network.
    pub messages_lost: u64,
    /// Of those, delivered to a dead node.
    pub messages_to_dead: u64,
    /// Queue events processed.
    pub events_processed: u64,
}

#[derive(Debug)]
enum Ev {
    Start {
        node: usize,
        seeds: Vec<Contact>,
    },
    Request {
        from: usize,
        to: usize,
        cid: CorrelationId,
        request: Request,
    },
    Response {
        from: usize,
        to: usize,
        cid: CorrelationId,
        response: Response,
    },
    Kill {
        node: usize,
    },
    Timer {
        node: usize,
    },
    Lookup {
        node: usize,
        target: NodeId,
        kind: LookupKind,
        tag: u64,
    },
}

#[derive(Debug)]
struct Queued {
    at: Millis,
    seq: u64,
    // Boxed: the heap moves entries on every push and pop, and an inline `Ev`
    // (a STORE carries a whole record) would make that the dominant cost.
    ev: Box<Ev>,
}

// Ordered by (time, insertion sequence) only: ties resolve in insertion order,
// which keeps runs deterministic.
impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct SimNode {
    dht: Dht,
    alive: bool,
    armed: Option<Millis>,
}

/// N nodes, one virtual clock, one seed.
pub struct Sim {
    net: NetConfig,
    seed: u64,
    rng: Rng,
    now: Millis,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: Vec<SimNode>,
    by_id: HashMap<NodeId, usize>,
    tags: HashMap<(usize, LookupId), u64>,
    next_tag: u64,
    results: Vec<(u64, LookupOutcome)>,
    events: Vec<(usize, Event)>,
    counters: SimCounters,
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
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: Vec::new(),
            by_id: HashMap::new(),
            tags: HashMap::new(),
            next_tag: 0,
            results: Vec::new(),
            events: Vec::new(),
            counters: SimCounters::default(),
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

    /// Counters so far.
    pub fn counters(&self) -> &SimCounters {
        &self.counters
    }

    /// The simulator's own random stream (for scenario choices).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Adds a node with a random ID and no signatures; returns its index.
    pub fn add_node(&mut self, config: Config) -> usize {
        let id = self.rng.node_id();
        self.add_node_with(id, config, Box::new(InsecureNoAuth))
    }

    /// Adds a node with a chosen ID and record authenticator.
    pub fn add_node_with(
        &mut self,
        id: NodeId,
        config: Config,
        auth: Box<dyn RecordAuth + Send>,
    ) -> usize {
        let i = self.nodes.len();
        assert!(
            self.by_id.insert(id, i).is_none(),
            "sim seed {}: duplicate node ID",
            self.seed
        );
        let contact = Contact::new(id, format!("sim:{i}"));
        let node_seed = self.rng.next_u64();
        self.nodes.push(SimNode {
            dht: Dht::new(config, contact, auth, node_seed),
            alive: true,
            armed: None,
        });
        i
    }

    /// Node `i`'s ID.
    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].dht.own().id
    }

    /// Node `i`'s contact.
    pub fn contact(&self, i: usize) -> Contact {
        self.nodes[i].dht.own().clone()
    }

    /// Node `i`'s core (read-only).
    pub fn dht(&self, i: usize) -> &Dht {
        &self.nodes[i].dht
    }

    /// True unless node `i` was killed (a node added but not yet started
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
        let seeds = seeds.iter().map(|&s| self.contact(s)).collect();
        self.push(at, Ev::Start { node: i, seeds });
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

    /// Runs `f` on node `i` now (a command such as `put`), then sends what it
    /// produced.
    pub fn command<R>(&mut self, i: usize, f: impl FnOnce(&mut Dht, Millis) -> R) -> R {
        let now = self.now;
        let r = f(&mut self.nodes[i].dht, now);
        self.service(i);
        r
    }

    /// Kills node `i` at once: it stops answering and its timers stop.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Kills node `i` at time `at`.
    pub fn schedule_kill(&mut self, i: usize, at: Millis) {
        self.push(at, Ev::Kill { node: i });
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

    /// Processes events up to and including time `t`, then sets the clock to `t`.
    pub fn run_until(&mut self, t: Millis) {
        while self.queue.peek().is_some_and(|q| q.0.at <= t) {
            self.step();
        }
        self.now = self.now.max(t);
    }

    /// Processes events until `done` holds or the clock would pass `deadline`.
    /// Returns whether `done` held.
    pub fn run_until_or(&mut self, deadline: Millis, mut done: impl FnMut(&Sim) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if self.queue.peek().is_none_or(|q| q.0.at > deadline) {
                self.now = self.now.max(deadline);
                return done(self);
            }
            self.step();
        }
    }

    fn push(&mut self, at: Millis, ev: Ev) {
        let seq = self.seq;
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at: at.max(self.now),
            seq,
            ev: Box::new(ev),
        }));
    }

    fn send(&mut self, ev: Ev) {
        self.counters.messages_sent += 1;
        if self.rng.chance(self.net.loss) {
            self.counters.messages_lost += 1;
            return;
        }
        let latency = self
            .rng
            .range_inclusive(self.net.latency_min.0, self.net.latency_max.0);
        self.push(self.now.saturating_add(Millis(latency)), ev);
    }

    fn step(&mut self) {
        let Some(Reverse(q)) = self.queue.pop() else {
            return;
        };
        debug_assert!(
            q.at >= self.now,
            "sim seed {}: time went backwards",
            self.seed
        );
        self.now = q.at;
        self.counters.events_processed += 1;
        match *q.ev {
            Ev::Start { node, seeds } => {
                if self.nodes[node].alive {
                    let now = self.now;
                    self.nodes[node].dht.bootstrap(seeds, now);
                    self.service(node);
                }
            }
            Ev::Request {
                from,
                to,
                cid,
                request,
            } => {
                if !self.nodes[to].alive {
                    self.counters.messages_to_dead += 1;
                    return;
                }
                let from_contact = self.contact(from);
                let now = self.now;
                if let Ok(response) = self.nodes[to]
                    .dht
                    .handle_request(&from_contact, request, now)
                {
                    self.send(Ev::Response {
                        from: to,
                        to: from,
                        cid,
                        response,
                    });
                }
                self.service(to);
            }
            Ev::Response {
                from,
                to,
                cid,
                response,
            } => {
                if !self.nodes[to].alive {
                    self.counters.messages_to_dead += 1;
                    return;
                }
                let from_id = self.id(from);
                let now = self.now;
                self.nodes[to]
                    .dht
                    .handle_response(&from_id, cid, response, now);
                self.service(to);
            }
            Ev::Kill { node } => self.nodes[node].alive = false,
            Ev::Timer { node } => {
                let n = &mut self.nodes[node];
                if !n.alive || n.armed != Some(q.at) {
                    return; // dead, or superseded by a re-arm
                }
                n.armed = None;
                let now = self.now;
                n.dht.handle_timeout(now);
                self.service(node);
            }
            Ev::Lookup {
                node,
                target,
                kind,
                tag,
            } => {
                if !self.nodes[node].alive {
                    self.results
                        .push((tag, failed_outcome(target, kind, self.now)));
                    return;
                }
                let now = self.now;
                match self.nodes[node].dht.start_lookup(target, kind, now) {
                    Ok(id) => {
                        self.tags.insert((node, id), tag);
                    }
                    Err(_) => self.results.push((tag, failed_outcome(target, kind, now))),
                }
                self.service(node);
            }
        }
    }

    /// Drains node `i`'s transmits and events and re-arms its timer.
    fn service(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].dht.poll_transmit() {
            // Addresses are `sim:<index>`, but the ID is what the transport
            // authenticates, so route by ID.
            match self.by_id.get(&out.to.id) {
                Some(&to) => self.send(Ev::Request {
                    from: i,
                    to,
                    cid: out.correlation_id,
                    request: out.request,
                }),
                None => self.counters.messages_to_dead += 1,
            }
        }
        while let Some(ev) = self.nodes[i].dht.poll_event() {
            match ev {
                Event::LookupFinished { id, outcome } => match self.tags.remove(&(i, id)) {
                    Some(tag) => self.results.push((tag, outcome)),
                    None => self.events.push((i, Event::LookupFinished { id, outcome })),
                },
                other => self.events.push((i, other)),
            }
        }
        let t = self.nodes[i].dht.poll_timeout();
        if t != self.nodes[i].armed {
            self.nodes[i].armed = t;
            if let Some(t) = t {
                self.push(t, Ev::Timer { node: i });
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
        // Whatever did not finish by the deadline counts as failed.
        self.tags.retain(|_, tag| !targets.contains_key(tag));
        failed.extend(targets.into_values());
        (LookupFigures::from_outcomes(&outcomes, pairs.len()), failed)
    }
}

fn failed_outcome(target: NodeId, kind: LookupKind, now: Millis) -> LookupOutcome {
    LookupOutcome {
        target,
        kind,
        closest: Vec::new(),
        records: Vec::new(),
        stats: crate::LookupStats {
            rounds: 0,
            hops: None,
            n_requests: 0,
            n_failed: 0,
            started: now,
            finished: now,
        },
    }
}

/// Median, 99th percentile and maximum of a sample (nearest-rank).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// 50th percentile.
    pub median: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest value.
    pub max: u64,
}

impl Percentiles {
    /// Of `values` (any order); all zero when empty.
    pub fn of(mut values: Vec<u64>) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_unstable();
        let rank = |p: usize| values[(values.len() * p).div_ceil(100).max(1) - 1];
        Percentiles {
            median: rank(50),
            p99: rank(99),
            max: values[values.len() - 1],
        }
    }
}

/// Aggregated figures of a batch of FIND_NODE lookups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LookupFigures {
    /// Lookups launched.
    pub n: usize,
    /// Of those, the target answered.
    pub n_found: usize,
    /// Rounds until termination (see [`crate::LookupStats::rounds`]).
    pub rounds: Percentiles,
    /// Rounds until the target was learned, over found lookups (see
    /// [`crate::LookupStats::hops`]).
    pub hops: Percentiles,
    /// Mean requests per lookup, retries included (each request also has a
    /// response unless lost).
    pub requests_mean: f64,
    /// Simulated lookup duration in ms.
    pub duration_ms: Percentiles,
}

impl LookupFigures {
    fn from_outcomes(outcomes: &[LookupOutcome], n: usize) -> LookupFigures {
        let found: Vec<&LookupOutcome> = outcomes.iter().filter(|o| o.found_target()).collect();
        let n_requests: u64 = outcomes.iter().map(|o| u64::from(o.stats.n_requests)).sum();
        LookupFigures {
            n,
            n_found: found.len(),
            rounds: Percentiles::of(outcomes.iter().map(|o| u64::from(o.stats.rounds)).collect()),
            hops: Percentiles::of(
                found
                    .iter()
                    .filter_map(|o| o.stats.hops.map(u64::from))
                    .collect(),
            ),
            requests_mean: if outcomes.is_empty() {
                0.0
            } else {
                n_requests as f64 / outcomes.len() as f64
            },
            duration_ms: Percentiles::of(
                outcomes
                    .iter()
                    .map(|o| o.stats.finished.saturating_sub(o.stats.started).0)
                    .collect(),
            ),
        }
    }

    /// Share of lookups that found their target (1.0 when none ran).
    pub fn success_rate(&self) -> f64 {
        if self.n == 0 {
            1.0
        } else {
            self.n_found as f64 / self.n as f64
        }
    }
}

/// A whole experiment: start a fresh mesh, wait for convergence, measure
/// lookups, kill a share of the nodes at once, measure again.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Replays the run.
    pub seed: u64,
    /// Mesh size.
    pub n_nodes: usize,
    /// The virtual network.
    pub net: NetConfig,
    /// Every node's DHT configuration.
    pub dht: Config,
    /// Node 0 starts alone at t = 0 (a first node); every other node starts at
    /// a uniform random time in `0..=join_spread` with node 0 as its only seed.
    pub join_spread: Millis,
    /// Convergence is checked at `join_spread`, then this often. A check runs
    /// one lookup per live node, from a random other node
    /// ([`Sim::coverage_pairs`]); it passes when every target is found (a
    /// failed pair is tried once more at once, so that loss alone cannot fail
    /// a check but a hole in the routing tables does).
    pub converge_check_every: Millis,
    /// Stop checking for convergence after this (simulated) time.
    pub converge_give_up: Millis,
    /// Lookups measured in steady state, and again after the kill.
    pub n_lookups: usize,
    /// Those lookups start at random times within this window.
    pub lookup_spread: Millis,
    /// Percentage of nodes killed at once.
    pub kill_percent: usize,
    /// A lookup batch still running this long after its window counts as failed.
    pub lookup_give_up: Millis,
    /// Continuous churn after the kill: this percentage of the mesh is replaced
    /// per minute (a random node dies, a fresh one joins through three random
    /// live nodes), for `churn_window`, while `n_lookups` lookups run between
    /// nodes that survive the window. 0 disables the phase.
    pub churn_percent_per_min: usize,
    /// Length of the churn phase.
    pub churn_window: Millis,
}

impl Scenario {
    /// Defaults for an `n_nodes` mesh replayed by `seed`.
    pub fn new(n_nodes: usize, seed: u64) -> Scenario {
        Scenario {
            seed,
            n_nodes,
            net: NetConfig::default(),
            dht: Config::default(),
            join_spread: Millis(1_000),
            converge_check_every: Millis(1_000),
            converge_give_up: Millis(120_000),
            n_lookups: 2_000,
            lookup_spread: Millis(5_000),
            kill_percent: 10,
            lookup_give_up: Millis(60_000),
            churn_percent_per_min: 5,
            churn_window: Millis(60_000),
        }
    }
}

/// What [`run`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Replays the run.
    pub seed: u64,
    /// Mesh size.
    pub n_nodes: usize,
    /// Network used.
    pub net: NetConfig,
    /// Simulated time at which a convergence check's lookups, all started
    /// then, all found their targets. `None` if it never happened.
    pub converged_at: Option<Millis>,
    /// When the lookups of that passing check had all finished.
    pub converge_batch_done: Millis,
    /// Convergence checks run.
    pub n_converge_checks: u32,
    /// Lookups per check (one per live node).
    pub n_converge_pairs: usize,
    /// Steady-state lookups.
    pub lookups: LookupFigures,
    /// Nodes killed at once.
    pub n_killed: usize,
    /// Lookups among survivors right after the kill.
    pub after_kill: LookupFigures,
    /// Nodes replaced during the churn phase.
    pub n_churned: usize,
    /// Lookups during the churn phase (`None` if disabled).
    pub under_churn: Option<LookupFigures>,
    /// Network counters for the whole run.
    pub counters: SimCounters,
    /// Simulated time at the end.
    pub sim_end: Millis,
}

/// Runs a [`Scenario`].
pub fn run(s: &Scenario) -> Report {
    let mut sim = Sim::new(s.net.clone(), s.seed);
    for _ in 0..s.n_nodes {
        sim.add_node(s.dht.clone());
    }
    if s.n_nodes > 0 {
        sim.schedule_start(0, &[], Millis::ZERO);
    }
    for i in 1..s.n_nodes {
        let at = Millis(sim.rng.below(s.join_spread.0.saturating_add(1)));
        sim.schedule_start(i, &[0], at);
    }

    let mut t = s.join_spread;
    let mut converged_at = None;
    let mut n_converge_checks = 0;
    let mut converge_batch_done = Millis::ZERO;
    let mut n_converge_pairs = 0;
    while t <= s.converge_give_up {
        sim.run_until(t);
        let pairs = sim.coverage_pairs();
        n_converge_pairs = pairs.len();
        let (_, failed) = sim.run_lookups_detailed(&pairs, Millis::ZERO, s.lookup_give_up);
        n_converge_checks += 1;
        // A pair that failed is tried again at once: a lost datagram (to the
        // target, twice) fails one lookup, a hole in the routing tables both.
        let (_, failed) = sim.run_lookups_detailed(&failed, Millis::ZERO, s.lookup_give_up);
        if failed.is_empty() {
            converged_at = Some(t);
            converge_batch_done = sim.now();
            break;
        }
        t = sim.now().max(t.saturating_add(s.converge_check_every));
    }

    let pairs = sim.random_pairs(s.n_lookups);
    let lookups = sim.run_lookups(&pairs, s.lookup_spread, s.lookup_give_up);

    let mut victims = sim.alive_nodes();
    sim.rng.shuffle(&mut victims);
    victims.truncate(s.n_nodes * s.kill_percent / 100);
    for &v in &victims {
        sim.kill(v);
    }
    let pairs = sim.random_pairs(s.n_lookups);
    let after_kill = sim.run_lookups(&pairs, s.lookup_spread, s.lookup_give_up);

    let (n_churned, under_churn) = churn(&mut sim, s);

    Report {
        seed: s.seed,
        n_nodes: s.n_nodes,
        net: s.net.clone(),
        converged_at,
        converge_batch_done,
        n_converge_checks,
        n_converge_pairs,
        lookups,
        n_killed: victims.len(),
        after_kill,
        n_churned,
        under_churn,
        counters: sim.counters.clone(),
        sim_end: sim.now(),
    }
}

/// The churn phase of [`run`]: returns the number of nodes replaced and the
/// lookups measured meanwhile.
fn churn(sim: &mut Sim, s: &Scenario) -> (usize, Option<LookupFigures>) {
    let n_replace = s.n_nodes * s.churn_percent_per_min * s.churn_window.0 as usize / 100 / 60_000;
    if n_replace == 0 {
        return (0, None);
    }
    let start = sim.now();
    let mut alive = sim.alive_nodes();
    sim.rng.shuffle(&mut alive);
    // Victims are chosen up front so that the measured lookups run between
    // nodes that live through the window: a lookup for a node that has just
    // died cannot succeed, and says nothing about routing.
    let (victims, survivors) = alive.split_at(n_replace.min(alive.len() / 2));
    let survivors = survivors.to_vec();
    if survivors.len() < 2 {
        return (0, None);
    }
    let step = s.churn_window.0 / victims.len().max(1) as u64;
    for (k, &victim) in victims.iter().enumerate() {
        let at = start.saturating_add(Millis(step * k as u64));
        sim.schedule_kill(victim, at);
        let fresh = sim.add_node(s.dht.clone());
        let seeds: Vec<usize> = (0..3)
            .map(|_| survivors[sim.rng.below(survivors.len() as u64) as usize])
            .collect();
        sim.schedule_start(fresh, &seeds, at);
    }
    let pairs: Vec<(usize, usize)> = (0..s.n_lookups)
        .map(|_| {
            let a = survivors[sim.rng.below(survivors.len() as u64) as usize];
            loop {
                let b = survivors[sim.rng.below(survivors.len() as u64) as usize];
                if b != a {
                    return (a, b);
                }
            }
        })
        .collect();
    let figures = sim.run_lookups(&pairs, s.churn_window, s.lookup_give_up);
    (victims.len(), Some(figures))
}

fn fmt_figures(f: &mut fmt::Formatter<'_>, name: &str, l: &LookupFigures) -> fmt::Result {
    writeln!(
        f,
        "{name}: n={} success={:.3}% rounds median={} p99={} max={} | hops median={} p99={} max={} | requests/lookup={:.1} | time median={}ms p99={}ms",
        l.n,
        100.0 * l.success_rate(),
        l.rounds.median,
        l.rounds.p99,
        l.rounds.max,
        l.hops.median,
        l.hops.p99,
        l.hops.max,
        l.requests_mean,
        l.duration_ms.median,
        l.duration_ms.p99,
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dht sim: seed={} nodes={} latency={}..{}ms loss={:.1}%",
            self.seed,
            self.n_nodes,
            self.net.latency_min.0,
            self.net.latency_max.0,
            100.0 * self.net.loss
        )?;
        match self.converged_at {
            Some(t) => writeln!(
                f,
                "converged: at {:.1}s simulated (lookups started then all found their target, done by {:.1}s; {} checks of {} lookups, every node a target once)",
                t.0 as f64 / 1000.0,
                self.converge_batch_done.0 as f64 / 1000.0,
                self.n_converge_checks,
                self.n_converge_pairs
            )?,
            None => writeln!(f, "converged: NO ({} checks)", self.n_converge_checks)?,
        }
        fmt_figures(f, "lookups", &self.lookups)?;
        fmt_figures(
            f,
            &format!("after {} killed", self.n_killed),
            &self.after_kill,
        )?;
        if let Some(c) = &self.under_churn {
            fmt_figures(f, &format!("under churn ({} replaced)", self.n_churned), c)?;
        }
        write!(
            f,
            "network: {} messages, {} lost, {} to dead nodes; {} events; ended at {:.1}s simulated",
            self.counters.messages_sent,
            self.counters.messages_lost,
            self.counters.messages_to_dead,
            self.counters.events_processed,
            self.sim_end.0 as f64 / 1000.0
        )
    }
}

fn json_figures(l: &LookupFigures) -> String {
    format!(
        "{{\"n\":{},\"success\":{:.6},\"rounds_median\":{},\"rounds_p99\":{},\"hops_median\":{},\"hops_p99\":{},\"requests_per_lookup\":{:.2},\"time_ms_median\":{},\"time_ms_p99\":{}}}",
        l.n,
        l.success_rate(),
        l.rounds.median,
        l.rounds.p99,
        l.hops.median,
        l.hops.p99,
        l.requests_mean,
        l.duration_ms.median,
        l.duration_ms.p99
    )
}

impl Report {
    /// One line of JSON with the headline figures.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"seed\":{},\"nodes\":{},\"converged_ms\":{},\"lookups\":{},\"killed\":{},\"after_kill\":{},\"churned\":{},\"under_churn\":{},\"messages\":{}}}",
            self.seed,
            self.n_nodes,
            self.converged_at.map_or("null".to_string(), |t| t.0.to_string()),
            json_figures(&self.lookups),
            self.n_killed,
                        json_figures(&self.after_kill),
            self.n_churned,
            self.under_churn.as_ref().map_or("null".to_string(), json_figures),
            self.counters.messages_sent
        )
    }
}
