//! The fault scenario, TigerBeetle-style: a safety phase under faults, then
//! a liveness phase once they heal.
//!
//! 1. **Join**: every node starts within `join_spread`, through one of the
//!    first 16 nodes and a random earlier node, and keeps both connected
//!    (the runtime's bootstrap supervisor).
//! 2. **Register**: subscribers subscribe a wildcard pattern through their
//!    real pub/sub core (which puts the interest record under its real
//!    rendezvous name through the node's DHT core), providers advertise a
//!    procedure through their real RPC core (a signed `Advertisement`
//!    record).
//! 3. **Faults** for `fault_window`: the faulty network (loss, duplicates,
//!    reordering), a partition cutting off a share of the nodes for longer
//!    than the failure detector's bound, crashes at random times (half of the
//!    crashed nodes restart, with their key and a higher epoch, and
//!    register again), and lookups and gets from random live nodes
//!    throughout. Meanwhile publishers publish sequences on random topics
//!    and callers call random procedures (with and without retries).
//!    Safety is checked on every step: the DHT checks of [`crate::engine`],
//!    and every delivery and call outcome against the oracles of
//!    [`crate::check`] as it happens.
//! 4. **Heal**: the partition ends, the network calms down, and the mesh
//!    settles for `heal_settle` (longer than the detector's bound and the put
//!    retry, so stale connections are gone and failed puts retried).
//! 5. **Liveness**: every live node is found by a lookup; for every topic, a
//!    publisher's lookups of `lookup_names` find every live subscriber whose
//!    pattern matches (as the [`DeliveryChecker`](crate::DeliveryChecker)
//!    computes with a `Sublist`);
//!    for every procedure, a caller finds every live provider and the real
//!    `Balancer` picks one of them; a publish on every topic from a random
//!    live node reaches every live subscription whose pattern matches; a
//!    call of every procedure with a live provider, from a random live
//!    node, is answered. A check that fails is tried once more (the calm
//!    network still loses 1% of frames: a loss can fail one attempt, a hole
//!    in the mesh fails both). Then the whole-mesh audit.

use std::collections::HashMap;

use macula_dht::{Config, CorrelationId, Event, LookupId, Millis, Record, Request, SIGNATURE_LEN};
use macula_pubsub::{lookup_names, Pattern, Topic};
use macula_rpc::{ad_name, Balancer, BalancerLimits, BreakerConfig, Strategy};
use macula_wire::dht::dht_key;
use macula_wire::NodeId;

use crate::check::{Failure, Violation};
use crate::dht::LookupFigures;
use crate::engine::{OnViolation, Sim, SimCounters};
use crate::net::{Latency, NetConfig};
use crate::node::{DhtMsg, Frame};
use crate::rpc::Handler;

/// Patterns subscribers choose from: literal, `*`, `**`, and leading
/// wildcards (registered under the realm-wide name).
pub const PATTERNS: &[&str] = &[
    "orders.*",
    "orders.**",
    "orders.eu.new",
    "*.new",
    "audit.**",
    "metrics.cpu.*",
    "**",
];
/// Topics publishers check for.
pub const TOPICS: &[&str] = &[
    "orders.new",
    "orders.eu.new",
    "audit.login",
    "metrics.cpu.load",
    "billing.new",
    "billing.paid",
];
/// Procedures providers advertise.
pub const PROCEDURES: &[&str] = &["pricing.quote", "stock.check", "orders.create"];

/// Lifetime of interest records and advertisements (the runtime's 600 s).
const RECORD_TTL: Millis = Millis(600_000);
/// A node that restarts registers again this long after.
const REREGISTER_AFTER: Millis = Millis(5_000);
/// Nodes others join through (each node names one of them).
const BOOTSTRAP_NODES: usize = 16;
/// A batch of gets still running this long after it started counts as
/// failed.
const GET_GIVE_UP: Millis = Millis(30_000);
/// How long a liveness publish has to reach every subscriber (its route's
/// lookups, then one latency; the runtime bounds the route wait at 15 s).
const DELIVERY_GIVE_UP: Millis = Millis(20_000);
/// Timeout of the calls made during the faults and after the heal.
const CALL_TIMEOUT: Millis = Millis(5_000);
/// Retries of a call with retries (the runtime's default).
const CALL_RETRIES: u32 = 2;
/// Simulated handlers take this long: some past the 250 ms probe point.
const HANDLER: Handler = Handler {
    min: Millis(1),
    max: Millis(400),
};

/// A whole run: sizes, networks, faults, and the command that replays it.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshScenario {
    /// Replays the run.
    pub seed: u64,
    /// Mesh size.
    pub n_nodes: usize,
    /// Every node's DHT configuration.
    pub dht: Config,
    /// The network outside the fault window.
    pub calm: NetConfig,
    /// The network during the fault window.
    pub faulty: NetConfig,
    /// Nodes start at random times within this.
    pub join_spread: Millis,
    /// Quiet time after the join, before registering.
    pub settle: Millis,
    /// Nodes subscribing (one pattern each).
    pub n_subscribers: usize,
    /// Nodes advertising (one procedure each).
    pub n_providers: usize,
    /// Length of the fault phase.
    pub fault_window: Millis,
    /// Percentage of nodes that crash during it (half of them restart).
    pub crash_percent: usize,
    /// Percentage of nodes on the minority side of the partition (0: none).
    pub partition_percent: usize,
    /// How long the partition lasts (from a random point of the first half
    /// of the window).
    pub partition_for: Millis,
    /// Lookups and gets from random live nodes during the window.
    pub n_probes: usize,
    /// Nodes publishing during the window.
    pub n_publishers: usize,
    /// Each publisher publishes this many messages, at random times of the
    /// window (on random topics).
    pub publishes_each: usize,
    /// Nodes calling during the window.
    pub n_callers: usize,
    /// Each caller makes this many calls, at random times of the window
    /// (half without retries: those must run their handler at most once).
    pub calls_each: usize,
    /// Quiet time after the heal, before the liveness checks.
    pub heal_settle: Millis,
    /// A peer sends a forged record to a node during the window.
    pub inject_forgery: Option<Forgery>,
    /// Pub/sub realm (part of the rendezvous names).
    pub realm: String,
    /// The command that replays this run (printed with a failure).
    pub replay: String,
}

impl MeshScenario {
    /// Defaults for an `n_nodes` mesh replayed by `seed`: 10-100 ms, 1%
    /// loss when calm; during 60 s of faults 3% loss, 2% duplicates, 5%
    /// reordered, 5% of nodes crashed, 20% cut off for 40 s.
    pub fn new(n_nodes: usize, seed: u64) -> MeshScenario {
        let calm = NetConfig::default();
        let faulty = NetConfig {
            latency: Latency::Bimodal {
                near: (Millis(5), Millis(60)),
                far: (Millis(100), Millis(400)),
                far_chance: 0.1,
            },
            loss: 0.03,
            duplicate: 0.02,
            reorder: 0.05,
            ..NetConfig::default()
        };
        MeshScenario {
            seed,
            n_nodes,
            dht: Config::default(),
            calm,
            faulty,
            join_spread: Millis(2_000),
            settle: Millis(10_000),
            // Capped: a FIND_VALUE returns at most 32 records per key
            // (`MAX_RECORDS_PER_RESPONSE`, and every replica truncates to
            // the same 32), so past 32 subscribers under one rendezvous name,
            // or 32 providers of one procedure, some are never found. The
            // liveness check finds exactly that; see the crate docs.
            n_subscribers: (n_nodes / 10).min(40),
            n_providers: (n_nodes / 10).min(45),
            fault_window: Millis(60_000),
            crash_percent: 5,
            partition_percent: 20,
            partition_for: Millis(40_000),
            n_probes: n_nodes,
            n_publishers: (n_nodes / 20).clamp(1, 100),
            publishes_each: 30,
            n_callers: (n_nodes / 20).clamp(1, 100),
            calls_each: 20,
            heal_settle: Millis(60_000),
            inject_forgery: None,
            realm: "io.macula.sim".into(),
            replay: format!("MACULA_SIM_SEED={seed} cargo test -p macula-sim --test mesh"),
        }
    }
}

/// A forged STORE (a record claiming an honest publisher, with a garbage
/// signature) sent to `victim`. With `broken_verifier` the victim accepts
/// any record, and the checks must catch what it let in: the test that the
/// simulator can fail. Without, the victim's real verifier refuses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forgery {
    /// The node that receives it.
    pub victim: usize,
    /// The victim's verifier accepts everything.
    pub broken_verifier: bool,
}

/// What a [`run_mesh`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshReport {
    /// Replays the run.
    pub seed: u64,
    /// Mesh size (at the start).
    pub n_nodes: usize,
    /// Nodes crashed during the window, and of those restarted.
    pub n_crashed: usize,
    /// Of the crashed nodes, restarted.
    pub n_restarted: usize,
    /// Nodes cut off by the partition.
    pub n_partitioned: usize,
    /// Forged records sent (see [`Forgery`]).
    pub n_forged: usize,
    /// Lookups of live nodes during the faults (a safety exercise; their
    /// success is not required while the faults last).
    pub probes: LookupFigures,
    /// Gets of registered names during the faults (every record they
    /// returned was checked).
    pub n_probe_gets: usize,
    /// Liveness: every live node looked up once after the heal.
    pub coverage: LookupFigures,
    /// Liveness: live nodes not found by a lookup, twice.
    pub n_not_found: usize,
    /// Liveness: (topic, live matching subscriber) pairs checked.
    pub n_interest_checked: usize,
    /// Of those, not found twice.
    pub n_interest_missing: usize,
    /// Liveness: (procedure, live provider) pairs checked.
    pub n_providers_checked: usize,
    /// Of those, not found twice.
    pub n_providers_missing: usize,
    /// Liveness: (topic, live matching subscription) pairs a publish after
    /// the heal had to reach.
    pub n_delivery_checked: usize,
    /// Of those, not reached twice.
    pub n_delivery_missing: usize,
    /// Liveness: procedures with a live provider called after the heal.
    pub n_calls_checked: usize,
    /// Of those, not answered twice.
    pub n_calls_missing: usize,
    /// Simulated time at the end.
    pub sim_end: Millis,
    /// Network and check counters.
    pub counters: SimCounters,
}

impl std::fmt::Display for MeshReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = |x: &LookupFigures| {
            format!(
                "n={} success={:.2}% rounds median={} p99={}",
                x.n,
                100.0 * x.success_rate(),
                x.rounds.median,
                x.rounds.p99
            )
        };
        writeln!(
            f,
            "mesh sim: seed={} nodes={} crashed={} (restarted {}) partitioned={} simulated={:.1}s",
            self.seed,
            self.n_nodes,
            self.n_crashed,
            self.n_restarted,
            self.n_partitioned,
            self.sim_end.0 as f64 / 1000.0
        )?;
        writeln!(
            f,
            "during faults: lookups {}; {} gets",
            l(&self.probes),
            self.n_probe_gets
        )?;
        writeln!(
            f,
            "after heal: every live node looked up {} (not found twice: {})",
            l(&self.coverage),
            self.n_not_found
        )?;
        writeln!(
            f,
            "after heal: {} (topic, live subscriber) pairs, {} not found; {} (procedure, live provider) pairs, {} not found",
            self.n_interest_checked,
            self.n_interest_missing,
            self.n_providers_checked,
            self.n_providers_missing
        )?;
        let c = &self.counters;
        writeln!(
            f,
            "after heal: {} (topic, live subscription) deliveries, {} missing; {} procedures called, {} not answered",
            self.n_delivery_checked,
            self.n_delivery_missing,
            self.n_calls_checked,
            self.n_calls_missing
        )?;
        writeln!(
            f,
            "messages checked: {} published, {} deliveries; {} calls ({} answered, {} failed: {:?}), {} handler runs",
            c.published,
            c.deliveries,
            c.calls,
            c.calls_ok,
            c.calls_failed,
            c.call_failures,
            c.handler_runs
        )?;
        write!(
            f,
            "checked: {} frames delivered, {} safety checks; network: {} messages, {} lost, {} duplicated, {} cut by the partition, {} to dead nodes; {} dials ({} failed), {} connections closed, {} bootstrap re-seeds; engine: {} events ({} at most queued, {} stale timers)",
            c.frames_delivered,
            c.checks,
            c.messages_sent,
            c.messages_lost,
            c.messages_duplicated,
            c.messages_partitioned,
            c.messages_to_dead,
            c.dials,
            c.dials_failed,
            c.connections_closed,
            c.reseeds,
            c.events_processed,
            c.peak_queued,
            c.timers_stale
        )
    }
}

/// Runs a [`MeshScenario`]; a violation comes back as the error: the first
/// safety violation (the run stops there), or every liveness check that
/// failed (they all run).
pub fn run_mesh(s: &MeshScenario) -> Result<MeshReport, Failure> {
    match run_mesh_report(s) {
        (report, None) => Ok(report),
        (_, Some(failure)) => Err(failure),
    }
}

/// [`run_mesh`], with the figures measured up to the end or the failure.
pub fn run_mesh_report(s: &MeshScenario) -> (MeshReport, Option<Failure>) {
    let mut m = Mesh::new(s);
    let failure = m.run().err();
    m.report.sim_end = m.sim.now();
    m.report.counters = m.sim.counters().clone();
    (m.report, failure)
}

enum Action {
    Crash(usize),
    Restart(usize),
    Register(usize),
    Partition,
    Heal,
    Probe,
    Forge,
    Publish(usize),
    Call(usize, u32),
}

struct Mesh<'a> {
    s: &'a MeshScenario,
    sim: Sim,
    /// Node -> its subscription pattern.
    patterns: HashMap<usize, Pattern>,
    /// Node -> its procedure.
    procedures: HashMap<usize, &'static str>,
    probe_outcomes: Vec<macula_dht::LookupOutcome>,
    /// Probe lookups running: (node, lookup) -> a FIND_NODE (measured) or a
    /// get (only checked).
    probe_lookups: HashMap<(usize, LookupId), bool>,
    /// What happened to each node, for failure messages.
    history: HashMap<usize, Vec<String>>,
    report: MeshReport,
}

impl<'a> Mesh<'a> {
    fn new(s: &'a MeshScenario) -> Mesh<'a> {
        let mut sim = Sim::new(s.calm.clone(), s.seed);
        sim.set_realm(&s.realm);
        sim.set_on_violation(OnViolation::Stop);
        sim.set_supervise_bootstrap(true);
        sim.set_replay(s.replay.clone());
        for _ in 0..s.n_nodes {
            sim.add_node(s.dht.clone());
        }
        if let Some(f) = s.inject_forgery {
            if f.broken_verifier {
                sim.break_verifier(f.victim);
            }
        }
        Mesh {
            s,
            sim,
            patterns: HashMap::new(),
            procedures: HashMap::new(),
            probe_outcomes: Vec::new(),
            probe_lookups: HashMap::new(),
            history: HashMap::new(),
            report: MeshReport {
                seed: s.seed,
                n_nodes: s.n_nodes,
                n_crashed: 0,
                n_restarted: 0,
                n_partitioned: 0,
                probes: LookupFigures::default(),
                n_probe_gets: 0,
                n_forged: 0,
                coverage: LookupFigures::default(),
                n_not_found: 0,
                n_interest_checked: 0,
                n_interest_missing: 0,
                n_providers_checked: 0,
                n_providers_missing: 0,
                n_delivery_checked: 0,
                n_delivery_missing: 0,
                n_calls_checked: 0,
                n_calls_missing: 0,
                sim_end: Millis::ZERO,
                counters: SimCounters::default(),
            },
        }
    }

    fn ok(&self) -> Result<(), Failure> {
        match self.sim.failure() {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }

    fn fail(&mut self, what: String) -> Result<(), Failure> {
        self.sim.fail(Violation::Liveness(what));
        self.ok()
    }

    /// Logs how far the run got (a 10,000-node run takes minutes).
    fn progress(&self, phase: &str) {
        let c = self.sim.counters();
        tracing::info!(
            phase,
            simulated_s = self.sim.now().0 as f64 / 1000.0,
            events = c.events_processed,
            queued = self.sim.queued(),
            "mesh scenario"
        );
    }

    fn run(&mut self) -> Result<(), Failure> {
        let s = self.s;
        let n = s.n_nodes;
        if n < 2 {
            return Ok(());
        }
        // 1. Join: through one of the first `BOOTSTRAP_NODES` (as operators
        // give a large mesh a few bootstrap nodes: each is kept connected
        // by everyone who named it, which must fit its pool) and one random
        // earlier node.
        self.sim.schedule_start(0, &[], Millis::ZERO);
        for i in 1..n {
            let at = Millis(self.sim.rng().below(s.join_spread.0 + 1));
            let boot = self.sim.rng().below(i.min(BOOTSTRAP_NODES) as u64) as usize;
            let other = self.sim.rng().below(i as u64) as usize;
            self.sim.schedule_start(i, &[boot, other], at);
        }
        self.sim.run_until(s.join_spread.saturating_add(s.settle));
        self.progress("joined");
        self.ok()?;

        // 2. Register.
        let mut nodes: Vec<usize> = (0..n).collect();
        self.sim.rng().shuffle(&mut nodes);
        for &i in nodes.iter().take(s.n_subscribers) {
            let p = PATTERNS[self.sim.rng().below(PATTERNS.len() as u64) as usize];
            let pattern = Pattern::new(p).expect("valid pattern");
            self.patterns.insert(i, pattern);
        }
        // In turn, so that every procedure has a provider (from three
        // providers on): a call to one nobody serves fails `NoProviders`,
        // rightly, and would only blur what the checks measure.
        for (k, &i) in nodes.iter().rev().take(s.n_providers).enumerate() {
            self.procedures.insert(i, PROCEDURES[k % PROCEDURES.len()]);
        }
        for i in 0..n {
            self.register(i);
        }
        let t = self.sim.now().saturating_add(Millis(10_000));
        self.sim.run_until(t);
        self.sim.take_events();
        self.ok()?;

        // 3. Faults.
        self.progress("registered");
        let start = self.sim.now();
        self.sim.set_net(s.faulty.clone());
        let mut actions = self.plan_faults(start);
        actions.sort_by_key(|(t, k, _)| (*t, *k));
        for (t, _, action) in actions {
            self.sim.run_until(t);
            self.ok()?;
            self.act(action);
            self.collect_probes();
        }
        let end = start.saturating_add(s.fault_window);
        self.sim.run_until(end);
        self.collect_probes();
        let n_unfinished = self.probe_lookups.values().filter(|&&f| f).count();
        self.report.probes = LookupFigures::from_outcomes(
            &self.probe_outcomes,
            self.probe_outcomes.len() + n_unfinished,
        );
        self.ok()?;

        // 4. Heal.
        self.progress("faults over");
        self.act(Action::Heal);
        self.sim.set_net(s.calm.clone());
        let t = self.sim.now().saturating_add(s.heal_settle);
        self.sim.run_until(t);
        self.sim.take_events();
        self.ok()?;
        self.sim.audit();
        self.ok()?;

        // 5. Liveness: every check runs, and all that failed are reported.
        self.progress("healed");
        let mut failed = Vec::new();
        failed.extend(self.check_coverage()?);
        failed.extend(self.check_interest()?);
        failed.extend(self.check_providers()?);
        failed.extend(self.check_deliveries()?);
        failed.extend(self.check_calls()?);
        self.sim.audit();
        self.ok()?;
        if !failed.is_empty() {
            return self.fail(failed.join("; "));
        }
        Ok(())
    }

    /// The fault window's actions: (time, tie-break, action).
    fn plan_faults(&mut self, start: Millis) -> Vec<(Millis, u64, Action)> {
        let s = self.s;
        let window = s.fault_window.0.max(1);
        let mut actions = Vec::new();
        let mut k = 0u64;
        let mut at = |sim: &mut Sim, lo: u64, hi: u64| {
            k += 1;
            (
                start.saturating_add(Millis(lo + sim.rng().below(hi - lo + 1))),
                k,
            )
        };
        let mut candidates: Vec<usize> = (1..s.n_nodes).collect();
        self.sim.rng().shuffle(&mut candidates);
        let n_crash = s.n_nodes * s.crash_percent / 100;
        for (j, &v) in candidates.iter().take(n_crash).enumerate() {
            let (t, k1) = at(&mut self.sim, 0, window * 2 / 3);
            actions.push((t, k1, Action::Crash(v)));
            if j % 2 == 0 {
                // Restart within the window, then register again.
                let delay = Millis(1_000 + self.sim.rng().below(window / 3));
                let t2 = t.saturating_add(delay);
                actions.push((t2, k1 + 1_000_000, Action::Restart(v)));
                actions.push((
                    t2.saturating_add(REREGISTER_AFTER),
                    k1 + 2_000_000,
                    Action::Register(v),
                ));
            }
        }
        if s.partition_percent > 0 {
            let (t, k1) = at(&mut self.sim, 0, window / 2);
            actions.push((t, k1, Action::Partition));
            actions.push((
                t.saturating_add(s.partition_for),
                k1 + 3_000_000,
                Action::Heal,
            ));
        }
        for _ in 0..s.n_probes {
            let (t, k1) = at(&mut self.sim, 0, window);
            actions.push((t, k1, Action::Probe));
        }
        if s.inject_forgery.is_some() {
            let (t, k1) = at(&mut self.sim, window / 4, window / 2);
            actions.push((t, k1, Action::Forge));
        }
        let mut nodes: Vec<usize> = (0..s.n_nodes).collect();
        self.sim.rng().shuffle(&mut nodes);
        for &p in nodes.iter().take(s.n_publishers) {
            for _ in 0..s.publishes_each {
                let (t, k1) = at(&mut self.sim, 0, window);
                actions.push((t, k1, Action::Publish(p)));
            }
        }
        self.sim.rng().shuffle(&mut nodes);
        for &c in nodes.iter().take(s.n_callers) {
            for j in 0..s.calls_each {
                let (t, k1) = at(&mut self.sim, 0, window);
                let retries = if j % 2 == 0 { 0 } else { CALL_RETRIES };
                actions.push((t, k1, Action::Call(c, retries)));
            }
        }
        actions
    }

    fn act(&mut self, action: Action) {
        let s = self.s;
        match action {
            Action::Crash(v) => {
                if self.sim.alive(v) {
                    self.note(v, "crashed");
                    self.sim.kill(v);
                    self.report.n_crashed += 1;
                }
            }
            Action::Restart(v) => {
                self.note(v, "restarted");
                let seeds = self.random_live(3, v);
                self.sim.restart_now(v, &seeds);
                self.report.n_restarted += 1;
            }
            Action::Register(v) => {
                if self.sim.alive(v) {
                    self.register(v);
                }
            }
            Action::Partition => {
                let mut side: Vec<usize> = (0..s.n_nodes).collect();
                self.sim.rng().shuffle(&mut side);
                side.truncate(s.n_nodes * s.partition_percent / 100);
                let mut groups = vec![0u16; self.sim.len()];
                for &i in &side {
                    groups[i] = 1;
                    self.note(i, "cut off");
                }
                self.report.n_partitioned = side.len();
                let now = self.sim.now();
                self.sim.schedule_partition(groups, now);
            }
            Action::Heal => {
                let now = self.sim.now();
                self.sim.schedule_heal(now);
            }
            Action::Probe => {
                let live = self.random_live(1, usize::MAX);
                let Some(&i) = live.first() else { return };
                // Half lookups of random live nodes, half gets of the
                // registered names: both hand records and contacts back
                // through every fault, and the engine checks them.
                let find_node = self.sim.rng().below(2) == 0;
                let (key, kind) = if find_node {
                    let t = self.random_live(1, i);
                    match t.first() {
                        Some(&t) => (self.sim.id(t), macula_dht::LookupKind::FindNode),
                        None => return,
                    }
                } else {
                    let topic = TOPICS[self.sim.rng().below(TOPICS.len() as u64) as usize];
                    let topic = Topic::new(topic).expect("valid topic");
                    let name = &lookup_names(&s.realm, &topic)[0];
                    (dht_key(name.as_bytes()), macula_dht::LookupKind::FindValue)
                };
                if let Ok(id) = self.sim.command(i, |d, now| d.start_lookup(key, kind, now)) {
                    self.probe_lookups.insert((i, id), find_node);
                    self.report.n_probe_gets += usize::from(!find_node);
                }
            }
            Action::Forge => self.forge(),
            Action::Publish(i) => {
                if self.sim.alive(i) {
                    let t = TOPICS[self.sim.rng().below(TOPICS.len() as u64) as usize];
                    self.sim.publish(i, t, b"sim");
                }
            }
            Action::Call(i, retries) => {
                if self.sim.alive(i) {
                    let p = PROCEDURES[self.sim.rng().below(PROCEDURES.len() as u64) as usize];
                    self.sim.call(i, p, CALL_TIMEOUT, retries);
                }
            }
        }
    }

    /// A peer sends the broken node a STORE of a record that claims an
    /// honest publisher but carries a garbage signature.
    fn forge(&mut self) {
        let Some(Forgery { victim, .. }) = self.s.inject_forgery else {
            return;
        };
        let live = self.random_live(2, victim);
        let (Some(&forger), Some(&claimed)) = (live.first(), live.get(1)) else {
            return;
        };
        let record = Record {
            key: dht_key(b"forged"),
            publisher: self.sim.id(claimed),
            seq: 1,
            ttl: RECORD_TTL,
            value: b"not what the publisher said".to_vec(),
            signature: vec![7; SIGNATURE_LEN],
        };
        let frame = Frame::Dht(DhtMsg::Request(
            CorrelationId(u64::MAX),
            Request::Store {
                record,
                ttl: RECORD_TTL,
            },
        ));
        if self.sim.alive(victim) {
            self.sim.inject_frame(forger, victim, frame);
            self.report.n_forged += 1;
        }
    }

    fn collect_probes(&mut self) {
        // Other events (puts, joins) need no answer: the application here
        // registers and moves on, as a subscriber does.
        for (i, e) in self.sim.take_events() {
            if let Event::LookupFinished { id, outcome } = e {
                if self.probe_lookups.remove(&(i, id)) == Some(true) {
                    self.probe_outcomes.push(outcome);
                }
            }
        }
    }

    /// Records what happened to node `i` (shown when a check about it fails).
    fn note(&mut self, i: usize, what: &str) {
        let t = self.sim.now().0 as f64 / 1000.0;
        let h = self.history.entry(i).or_default();
        if h.len() < 16 {
            h.push(format!("{what} at {t:.1}s"));
        }
    }

    /// Node `i` for a failure message: what happened to it, its DHT's view.
    fn describe(&self, i: usize) -> String {
        let st = self.sim.dht(i).stats();
        format!(
            "node {i} ({}; routing {} contacts, pool {}, puts ok {} failed {}, epoch {})",
            self.history
                .get(&i)
                .map_or("no faults".to_string(), |h| h.join(", ")),
            self.sim.dht(i).routing().len(),
            self.sim.pool(i).len(),
            st.puts_succeeded,
            st.puts_failed,
            self.sim.epoch(i)
        )
    }

    /// Up to `n` distinct random live nodes other than `except`.
    fn random_live(&mut self, n: usize, except: usize) -> Vec<usize> {
        let mut live: Vec<usize> = self
            .sim
            .alive_nodes()
            .into_iter()
            .filter(|&i| i != except)
            .collect();
        self.sim.rng().shuffle(&mut live);
        live.truncate(n);
        live
    }

    /// Node `i`'s application (re)subscribes and (re)advertises, through
    /// its pub/sub and RPC cores.
    fn register(&mut self, i: usize) {
        if let Some(p) = self.patterns.get(&i).cloned() {
            if let Err(e) = self.sim.subscribe(i, p.as_str()) {
                tracing::warn!(node = i, error = %e, "subscribe refused");
            }
        }
        if let Some(proc_name) = self.procedures.get(&i).copied() {
            if let Err(e) = self.sim.advertise(i, proc_name, HANDLER) {
                tracing::warn!(node = i, error = %e, "advertise refused");
            }
        }
    }

    /// Gets every `(node, key)`; the records found, or `None` for a get that
    /// did not finish.
    fn gets(&mut self, asks: &[(usize, NodeId)]) -> Vec<Option<Vec<Record>>> {
        let mut ids = HashMap::new();
        let mut out = vec![None; asks.len()];
        for (j, &(i, key)) in asks.iter().enumerate() {
            match self.sim.command(i, |d, now| d.get(key, now)) {
                Ok(id) => {
                    ids.insert((i, id), j);
                }
                Err(_) => out[j] = Some(Vec::new()),
            }
        }
        let deadline = self.sim.now().saturating_add(GET_GIVE_UP);
        let mut remaining = ids.len();
        while remaining > 0 && self.sim.failure().is_none() && self.sim.now() < deadline {
            let step = self.sim.now().saturating_add(Millis(500)).min(deadline);
            self.sim.run_until(step);
            for (i, e) in self.sim.take_events() {
                if let Event::LookupFinished { id, outcome } = e {
                    if let Some(j) = ids.remove(&(i, id)) {
                        out[j] = Some(outcome.records);
                        remaining -= 1;
                    }
                }
            }
        }
        out
    }

    /// `Err`: a safety failure; `Ok(Some(_))`: this liveness check failed.
    fn check_coverage(&mut self) -> Result<Option<String>, Failure> {
        let pairs = self.sim.coverage_pairs();
        let (first, failed) = self
            .sim
            .run_lookups_detailed(&pairs, Millis::ZERO, Millis(60_000));
        self.ok()?;
        let (_, failed) = self
            .sim
            .run_lookups_detailed(&failed, Millis::ZERO, Millis(60_000));
        self.ok()?;
        self.report.coverage = first;
        if !failed.is_empty() {
            let ids: Vec<String> = failed
                .iter()
                .take(5)
                .map(|(a, b)| format!("{} -> {}", self.describe(*a), self.describe(*b)))
                .collect();
            self.report.n_not_found = failed.len();
            return Ok(Some(format!(
                "{} live nodes not found by a lookup after the heal (twice), e.g. {}",
                failed.len(),
                ids.join(", ")
            )));
        }
        Ok(None)
    }

    /// `Err`: a safety failure; `Ok(Some(_))`: this liveness check failed.
    fn check_interest(&mut self) -> Result<Option<String>, Failure> {
        let realm = self.s.realm.clone();
        let mut missing: Vec<(String, usize)> = Vec::new();
        for attempt in 0..2 {
            let mut asks = Vec::new();
            let mut want = Vec::new();
            for &t in TOPICS {
                let topic = Topic::new(t).expect("valid topic");
                let expected: Vec<usize> = self
                    .sim
                    .deliveries()
                    .expected(&topic)
                    .into_iter()
                    .map(|(node, _)| node)
                    .filter(|&node| self.sim.alive(node))
                    .filter(|node| attempt == 0 || missing.iter().any(|(m, n)| m == t && n == node))
                    .collect();
                if expected.is_empty() {
                    continue;
                }
                let Some(&publisher) = self.random_live(1, usize::MAX).first() else {
                    continue;
                };
                for name in lookup_names(&realm, &topic) {
                    asks.push((publisher, dht_key(name.as_bytes())));
                }
                want.push((t, topic, expected));
            }
            let got = self.gets(&asks);
            self.ok()?;
            let mut still = Vec::new();
            for (k, (t, topic, expected)) in want.into_iter().enumerate() {
                let records = got[2 * k..2 * k + 2]
                    .iter()
                    .flatten()
                    .flatten()
                    .filter(|r| {
                        String::from_utf8_lossy(&r.value)
                            .lines()
                            .filter_map(|p| Pattern::new(p).ok())
                            .any(|p| p.matches(&topic))
                    })
                    .map(|r| r.publisher)
                    .collect::<Vec<NodeId>>();
                for node in expected {
                    if attempt == 0 {
                        self.report.n_interest_checked += 1;
                    }
                    if !records.contains(&self.sim.id(node)) {
                        still.push((t.to_string(), node));
                    }
                }
            }
            missing = still;
            if missing.is_empty() {
                return Ok(None);
            }
        }
        self.report.n_interest_missing = missing.len();
        Ok(Some(self.not_found(
            &missing,
            "live subscribers not found by a publisher",
        )))
    }

    /// The failure text of a liveness check: how many `what`, and the first
    /// five (name -> node).
    fn not_found<T: std::fmt::Display>(&self, missing: &[(T, usize)], what: &str) -> String {
        let e: Vec<String> = missing
            .iter()
            .take(5)
            .map(|(t, n)| format!("{t} -> {}", self.describe(*n)))
            .collect();
        format!(
            "{} {what} after the heal (twice), e.g. {}",
            missing.len(),
            e.join(", ")
        )
    }

    /// `Err`: a safety failure; `Ok(Some(_))`: this liveness check failed.
    fn check_providers(&mut self) -> Result<Option<String>, Failure> {
        let realm = self.s.realm.clone();
        let mut balancer: Balancer<NodeId> = Balancer::new(
            BreakerConfig::default(),
            BalancerLimits::default(),
            self.s.seed,
        );
        let mut missing: Vec<(&'static str, usize)> = Vec::new();
        for attempt in 0..2 {
            let mut asks = Vec::new();
            let mut want = Vec::new();
            for &p in PROCEDURES {
                let mut live: Vec<usize> = self
                    .procedures
                    .iter()
                    .filter(|(&i, &q)| q == p && self.sim.alive(i))
                    .map(|(&i, _)| i)
                    .filter(|i| attempt == 0 || missing.contains(&(p, *i)))
                    .collect();
                live.sort_unstable();
                if live.is_empty() {
                    continue;
                }
                let Some(&caller) = self.random_live(1, usize::MAX).first() else {
                    continue;
                };
                asks.push((caller, dht_key(ad_name(&realm, p).as_bytes())));
                want.push((p, live));
            }
            let got = self.gets(&asks);
            self.ok()?;
            let mut still = Vec::new();
            for (k, (p, live)) in want.into_iter().enumerate() {
                let found: Vec<NodeId> = got[k]
                    .iter()
                    .flatten()
                    .filter(|r| !r.value.is_empty())
                    .map(|r| r.publisher)
                    .collect();
                let candidates: Vec<(NodeId, u32)> = found.iter().map(|&f| (f, 1)).collect();
                let now = self.sim.now();
                if let Some(pick) = balancer.pick(p, Strategy::RoundRobin, &candidates, &[], now) {
                    if !found.contains(&pick) {
                        return Ok(Some(format!(
                            "the balancer picked {pick}, not a provider of {p}"
                        )));
                    }
                }
                for i in live {
                    if attempt == 0 {
                        self.report.n_providers_checked += 1;
                    }
                    if !found.contains(&self.sim.id(i)) {
                        still.push((p, i));
                    }
                }
            }
            missing = still;
            if missing.is_empty() {
                return Ok(None);
            }
        }
        self.report.n_providers_missing = missing.len();
        Ok(Some(self.not_found(
            &missing,
            "live providers not found by a caller",
        )))
    }

    /// `Err`: a safety failure; `Ok(Some(_))`: this liveness check failed.
    /// A publish on every topic, from a random live node, reaches every
    /// live subscription whose pattern matches.
    fn check_deliveries(&mut self) -> Result<Option<String>, Failure> {
        self.sim.set_app_log(true);
        // (topic, node, subscription) still to reach.
        let mut missing: Vec<(&'static str, usize, u64)> = Vec::new();
        for attempt in 0..2 {
            // (topic, publisher, subscriptions it must reach)
            type Want = (&'static str, usize, Vec<(usize, u64)>);
            let mut want: Vec<Want> = Vec::new();
            for &t in TOPICS {
                let topic = Topic::new(t).expect("valid topic");
                let expected: Vec<(usize, u64)> = self
                    .sim
                    .deliveries()
                    .expected(&topic)
                    .into_iter()
                    .filter(|&(node, sub)| attempt == 0 || missing.contains(&(t, node, sub)))
                    .collect();
                if expected.is_empty() {
                    continue;
                }
                let Some(&publisher) = self.random_live(1, usize::MAX).first() else {
                    continue;
                };
                if attempt == 0 {
                    self.report.n_delivery_checked += expected.len();
                }
                self.sim.publish(publisher, t, b"liveness");
                want.push((t, publisher, expected));
            }
            let until = self.sim.now().saturating_add(DELIVERY_GIVE_UP);
            self.sim.run_until(until);
            self.ok()?;
            let published = self.sim.take_publishes();
            let delivered: std::collections::HashSet<crate::engine::Delivery> =
                self.sim.take_deliveries().into_iter().collect();
            let mut still = Vec::new();
            for (t, publisher, expected) in want {
                let sent = published
                    .iter()
                    .find(|(p, topic, _, _)| *p == publisher && topic == t);
                let pid = self.sim.id(publisher);
                for (node, sub) in expected {
                    // A subscription that ended meanwhile (a crash) is not
                    // owed anything.
                    if !self.sim.alive(node) {
                        continue;
                    }
                    let got = sent.is_some_and(|&(_, _, epoch, seq)| {
                        delivered.contains(&(node, sub, pid, epoch, seq))
                    });
                    if !got {
                        still.push((t, node, sub));
                    }
                }
            }
            missing = still;
            if missing.is_empty() {
                break;
            }
        }
        self.sim.set_app_log(false);
        if missing.is_empty() {
            return Ok(None);
        }
        let e: Vec<String> = missing
            .iter()
            .take(5)
            .map(|(t, n, _)| format!("{t} -> {}", self.describe(*n)))
            .collect();
        self.report.n_delivery_missing = missing.len();
        Ok(Some(format!(
            "{} live subscriptions not reached by a publish after the heal (twice), e.g. {}",
            missing.len(),
            e.join(", ")
        )))
    }

    /// `Err`: a safety failure; `Ok(Some(_))`: this liveness check failed.
    /// A call of every procedure with a live provider, from a random live
    /// node, is answered by a live provider of it.
    fn check_calls(&mut self) -> Result<Option<String>, Failure> {
        self.sim.take_call_outcomes();
        let mut missing: Vec<&'static str> = Vec::new();
        let mut last_error: Vec<String> = Vec::new();
        for attempt in 0..2 {
            let mut calls: HashMap<u64, &'static str> = HashMap::new();
            for &p in PROCEDURES {
                let live = self
                    .procedures
                    .iter()
                    .any(|(&i, &q)| q == p && self.sim.alive(i));
                if !live || (attempt > 0 && !missing.contains(&p)) {
                    continue;
                }
                let Some(&caller) = self.random_live(1, usize::MAX).first() else {
                    continue;
                };
                if attempt == 0 {
                    self.report.n_calls_checked += 1;
                }
                let app = self.sim.call(caller, p, CALL_TIMEOUT, CALL_RETRIES);
                calls.insert(app, p);
            }
            let n = calls.len();
            let until = self
                .sim
                .now()
                .saturating_add(CALL_TIMEOUT)
                .saturating_add(Millis(1_000));
            let mut outcomes = Vec::new();
            while outcomes.len() < n && self.sim.now() < until && self.sim.failure().is_none() {
                let step = self.sim.now().saturating_add(Millis(500)).min(until);
                self.sim.run_until(step);
                outcomes.extend(
                    self.sim
                        .take_call_outcomes()
                        .into_iter()
                        .filter(|(_, app, _)| calls.contains_key(app)),
                );
            }
            self.ok()?;
            let mut answered = Vec::new();
            last_error.clear();
            for (_, app, result) in outcomes {
                let Some(&p) = calls.get(&app) else { continue };
                match result {
                    Ok((from, _)) => {
                        let served_by_live = self.sim.index_of(&from).is_some_and(|i| {
                            self.sim.alive(i) && self.procedures.get(&i) == Some(&p)
                        });
                        if !served_by_live {
                            return self
                                .fail(format!(
                                    "{p} was answered by {from}, not a live provider of it"
                                ))
                                .map(|()| None);
                        }
                        answered.push(p);
                    }
                    Err(e) => last_error.push(format!("{p}: {e:?}")),
                }
            }
            missing = calls
                .values()
                .copied()
                .filter(|p| !answered.contains(p))
                .collect();
            missing.sort_unstable();
            if missing.is_empty() {
                return Ok(None);
            }
        }
        self.report.n_calls_missing = missing.len();
        Ok(Some(format!(
            "calls of {} not answered after the heal (twice): {}",
            missing.join(", "),
            last_error.join("; ")
        )))
    }
}
