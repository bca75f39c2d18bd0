//! The DHT experiment (formerly `macula-dht`'s simulator): start a fresh
//! mesh, wait for convergence, measure lookups, kill a share of the nodes at
//! once, measure again, then replace nodes continuously while measuring.
//! Its figures are the ones `BENCHMARKS.md` quotes (`cargo bench -p
//! macula-sim --bench sim -- --dht-only`), and its 1,000-node run is a test.
//!
//! Nodes have real Ed25519 keys and the network models connections and
//! the pool (see [`crate::engine`]), so a first contact costs a handshake
//! round trip before the request, as in the real node.

use std::fmt;

use macula_dht::Config;
use macula_wire::time::Millis;

use crate::engine::{Sim, SimCounters};
pub use crate::figures::{LookupFigures, Percentiles};
use crate::net::{Latency, NetConfig};

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
    sim.set_replay(format!(
        "cargo bench -p macula-sim --bench sim -- --dht-only --nodes {} --seed {}",
        s.n_nodes, s.seed
    ));
    for _ in 0..s.n_nodes {
        sim.add_node(s.dht.clone());
    }
    if s.n_nodes > 0 {
        sim.schedule_start(0, &[], Millis::ZERO);
    }
    for i in 1..s.n_nodes {
        let at = Millis(sim.rng().below(s.join_spread.0.saturating_add(1)));
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
    sim.rng().shuffle(&mut victims);
    victims.truncate(s.n_nodes * s.kill_percent / 100);
    for &v in &victims {
        sim.kill(v);
    }
    let pairs = sim.random_pairs(s.n_lookups);
    let after_kill = sim.run_lookups(&pairs, s.lookup_spread, s.lookup_give_up);

    let (n_churned, under_churn) = churn(&mut sim, s);
    sim.audit();

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
        counters: sim.counters().clone(),
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
    sim.rng().shuffle(&mut alive);
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
            .map(|_| survivors[sim.rng().below(survivors.len() as u64) as usize])
            .collect();
        sim.schedule_start(fresh, &seeds, at);
    }
    let pairs: Vec<(usize, usize)> = (0..s.n_lookups)
        .map(|_| {
            let a = survivors[sim.rng().below(survivors.len() as u64) as usize];
            loop {
                let b = survivors[sim.rng().below(survivors.len() as u64) as usize];
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
            "dht sim: seed={} nodes={} latency={} loss={:.1}%",
            self.seed,
            self.n_nodes,
            latency_text(&self.net.latency),
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
            "network: {} messages, {} lost, {} to dead nodes; {} dials ({} failed, {} frames dropped with them), {} connections closed; {} frames delivered, {} safety checks; {} events; ended at {:.1}s simulated",
            self.counters.messages_sent,
            self.counters.messages_lost,
            self.counters.messages_to_dead,
            self.counters.dials,
            self.counters.dials_failed,
            self.counters.dial_queue_dropped,
            self.counters.connections_closed,
            self.counters.frames_delivered,
            self.counters.checks,
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

fn latency_text(l: &Latency) -> String {
    match l {
        Latency::Fixed(t) => format!("{}ms", t.0),
        Latency::Uniform { min, max } => format!("{}..{}ms", min.0, max.0),
        Latency::Bimodal {
            near,
            far,
            far_chance,
        } => format!(
            "{}..{}ms ({:.0}%: {}..{}ms)",
            near.0 .0,
            near.1 .0,
            100.0 * far_chance,
            far.0 .0,
            far.1 .0
        ),
    }
}
