//! CRDT replication over a simulated faulty network: N
//! [`macula_crdt::Replica`]s of one named CRDT exchanging deltas, digests
//! and states, every message encoded and decoded (MessagePack) as it will
//! be on the mesh.
//!
//! A dedicated, small simulation rather than a service in the whole-mesh
//! [`Sim`](crate::Sim): replication rides pub/sub (a broadcast to every
//! replica of the name) and answers to one replica, so what matters is a
//! network that loses, duplicates and reorders frames and partitions the
//! replicas, not connections, dials or DHT lookups. The network is the
//! mesh simulator's [`NetConfig`] (latency, loss, duplication, reordering;
//! its pool and liveness fields are unused), with the same rules: every
//! copy draws its own latency, a reordered frame waits up to one more
//! maximum latency, and a frame crossing a partition (when sent or when
//! due) is dropped.
//!
//! Each replica reads its own wall clock: the virtual clock plus a fixed
//! per-node skew drawn in `0..=max_skew`, so the hybrid logical clocks and
//! their drift bound are exercised. Replicas start at staggered times so
//! their digest ticks do not all fall on one millisecond.
//!
//! [`CrdtSim::expected`] is the join of every delta a local update
//! produced: the value every replica must reach. [`CrdtSim::converged`] is
//! exact (every state equal to it), kept up to date per event, so
//! [`CrdtSim::run_until_converged`] reports the millisecond it happened.
//! One seed replays a run bit for bit.

use std::rc::Rc;

use macula_crdt::{Crdt, CrdtError, Message, Out, Replica, ReplicaConfig, Target, Timestamp};
use macula_wire::rng::Rng;
use macula_wire::time::Millis;
use macula_wire::NodeId;

use crate::net::{Latency, NetConfig};
use crate::queue::EventQueue;

/// A replication scenario's settings.
#[derive(Clone, Debug)]
pub struct CrdtSimConfig {
    /// Number of replicas.
    pub nodes: usize,
    /// The network (latency and per-frame faults).
    pub net: NetConfig,
    /// Every replica's settings.
    pub replica: ReplicaConfig,
    /// Largest clock skew of a node (each draws one in `0..=max_skew`).
    pub max_skew: Millis,
}

impl CrdtSimConfig {
    /// `nodes` replicas on the default network (10-100 ms, 1% loss) with 1%
    /// duplication and 5% reordering, default replicas, up to 50 ms skew.
    pub fn new(nodes: usize) -> CrdtSimConfig {
        CrdtSimConfig {
            nodes,
            net: NetConfig {
                duplicate: 0.01,
                reorder: 0.05,
                ..NetConfig::default()
            },
            replica: ReplicaConfig::default(),
            max_skew: Millis(50),
        }
    }
}

/// What the network did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrdtSimStats {
    /// Messages the replicas sent (a broadcast counts once).
    pub sent: u64,
    /// Copies put on the network (a broadcast: one per receiver).
    pub frames: u64,
    /// Encoded bytes put on the network, over every copy.
    pub bytes: u64,
    /// Copies delivered.
    pub delivered: u64,
    /// Copies lost.
    pub lost: u64,
    /// Extra copies from duplication.
    pub duplicated: u64,
    /// Copies dropped by a partition.
    pub cut: u64,
    /// Copies that failed to decode (a bug: always 0).
    pub decode_errors: u64,
}

enum Event {
    Deliver { to: usize, bytes: Rc<Vec<u8>> },
    Tick(usize),
}

struct Node<C: Crdt> {
    replica: Replica<C>,
    skew: Millis,
    group: u32,
    /// Whether the state equals [`CrdtSim::expected`].
    caught_up: bool,
}

/// N replicas of one CRDT over a simulated network.
pub struct CrdtSim<C: Crdt> {
    rng: Rng,
    now: Millis,
    net: NetConfig,
    nodes: Vec<Node<C>>,
    ids: Vec<NodeId>,
    queue: EventQueue<Event>,
    expected: C,
    n_caught_up: usize,
    stats: CrdtSimStats,
}

/// The CRDT's name in every scenario.
const NAME: &str = "sim";

impl<C: Crdt> CrdtSim<C> {
    /// `config.nodes` empty replicas; everything random comes from `seed`.
    pub fn new(seed: u64, config: CrdtSimConfig) -> CrdtSim<C> {
        let mut rng = Rng::new(seed);
        let mut ids: Vec<NodeId> = (0..config.nodes).map(|_| rng.node_id()).collect();
        ids.sort();
        let mut queue = EventQueue::default();
        let interval = config.replica.digest_interval;
        let mut nodes = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let skew = Millis(rng.range_inclusive(0, config.max_skew.0));
            // Staggered start: the first tick falls anywhere in the first interval.
            let start = Millis(rng.below(interval.0.max(1)));
            let replica = Replica::new(
                NAME,
                *id,
                C::default(),
                config.replica.clone(),
                start.saturating_add(skew),
            );
            queue.push(start.saturating_add(interval).0, Event::Tick(i));
            nodes.push(Node {
                replica,
                skew,
                group: 0,
                caught_up: true,
            });
        }
        CrdtSim {
            rng,
            now: Millis::ZERO,
            net: config.net,
            n_caught_up: nodes.len(),
            nodes,
            ids,
            queue,
            expected: C::default(),
            stats: CrdtSimStats::default(),
        }
    }

    /// The virtual clock.
    pub fn now(&self) -> Millis {
        self.now
    }

    /// Number of replicas.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when there is no replica.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Replica `i`'s node ID.
    pub fn node(&self, i: usize) -> NodeId {
        self.ids[i]
    }

    /// Replica `i`.
    pub fn replica(&self, i: usize) -> &Replica<C> {
        &self.nodes[i].replica
    }

    /// Replica `i`'s state.
    pub fn state(&self, i: usize) -> &C {
        self.nodes[i].replica.state()
    }

    /// The join of every delta a local update produced.
    pub fn expected(&self) -> &C {
        &self.expected
    }

    /// What the network did.
    pub fn stats(&self) -> CrdtSimStats {
        self.stats
    }

    /// The simulation's random source (for scenarios choosing operations,
    /// so one seed replays the whole run).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Whether every replica holds [`CrdtSim::expected`].
    pub fn converged(&self) -> bool {
        self.n_caught_up == self.nodes.len()
    }

    /// A local update on replica `i` now (see [`Replica::update`]); its
    /// delta goes out at once.
    pub fn update<F>(&mut self, i: usize, op: F) -> Result<(), CrdtError>
    where
        F: FnOnce(&mut C, Timestamp) -> Result<C, CrdtError>,
    {
        let wall = self.wall(i);
        let mut delta = None;
        self.nodes[i].replica.update(wall, |state, ts| {
            let d = op(state, ts)?;
            delta = Some(d.clone());
            Ok(d)
        })?;
        if let Some(d) = delta {
            self.expected.merge(&d);
            self.n_caught_up = 0;
            for n in &mut self.nodes {
                n.caught_up = *n.replica.state() == self.expected;
                self.n_caught_up += usize::from(n.caught_up);
            }
        }
        self.flush(i);
        Ok(())
    }

    /// Cuts the network into `groups` (replica indices); replicas in no
    /// group form one more group. Frames in flight across a cut are lost.
    pub fn partition(&mut self, groups: &[Vec<usize>]) {
        for n in &mut self.nodes {
            n.group = 0;
        }
        for (g, members) in groups.iter().enumerate() {
            for &i in members {
                self.nodes[i].group = g as u32 + 1;
            }
        }
    }

    /// Ends every partition.
    pub fn heal(&mut self) {
        self.partition(&[]);
    }

    /// Runs every event due by `now + d`; the clock ends there.
    pub fn run_for(&mut self, d: Millis) {
        let until = self.now.saturating_add(d);
        while self.queue.peek_time().is_some_and(|t| t <= until.0) {
            self.step();
        }
        self.now = until;
    }

    /// Runs until every replica holds [`CrdtSim::expected`], for at most
    /// `limit`; returns the time it took (zero when already converged), or
    /// `None` if it did not happen within `limit`.
    pub fn run_until_converged(&mut self, limit: Millis) -> Option<Millis> {
        let start = self.now;
        let until = start.saturating_add(limit);
        while !self.converged() {
            if self.queue.peek_time().is_none_or(|t| t > until.0) {
                self.now = until;
                return None;
            }
            self.step();
        }
        Some(self.now.saturating_sub(start))
    }

    /// Replica `i`'s wall clock.
    fn wall(&self, i: usize) -> Millis {
        self.now.saturating_add(self.nodes[i].skew)
    }

    fn step(&mut self) {
        let Some((at, event)) = self.queue.pop() else {
            return;
        };
        self.now = Millis(at);
        match event {
            Event::Tick(i) => {
                let wall = self.wall(i);
                let outs = self.nodes[i].replica.tick(wall);
                self.send_all(i, outs);
                self.flush(i);
                let next = self.nodes[i]
                    .replica
                    .poll_timeout()
                    .saturating_sub(self.nodes[i].skew);
                self.queue.push(next.0.max(at + 1), Event::Tick(i));
            }
            Event::Deliver { to, bytes } => {
                self.stats.delivered += 1;
                let msg = match Message::<C>::decode(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(error = %e, "CRDT message did not decode");
                        self.stats.decode_errors += 1;
                        return;
                    }
                };
                let wall = self.wall(to);
                let outs = self.nodes[to].replica.handle_message(wall, msg);
                self.refresh(to);
                self.send_all(to, outs);
            }
        }
    }

    fn refresh(&mut self, i: usize) {
        let now_caught_up = *self.nodes[i].replica.state() == self.expected;
        let n = &mut self.nodes[i];
        match (n.caught_up, now_caught_up) {
            (false, true) => self.n_caught_up += 1,
            (true, false) => self.n_caught_up -= 1,
            _ => {}
        }
        n.caught_up = now_caught_up;
    }

    fn flush(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].replica.poll_transmit() {
            self.send(i, out);
        }
    }

    fn send_all(&mut self, from: usize, outs: Vec<Out<C>>) {
        for out in outs {
            self.send(from, out);
        }
    }

    fn send(&mut self, from: usize, out: Out<C>) {
        self.stats.sent += 1;
        let bytes = match out.msg.encode() {
            Ok(b) => Rc::new(b),
            Err(e) => {
                tracing::error!(error = %e, "CRDT message did not encode");
                self.stats.decode_errors += 1;
                return;
            }
        };
        match out.to {
            Target::All => {
                for to in 0..self.nodes.len() {
                    if to != from {
                        self.transmit(from, to, &bytes);
                    }
                }
            }
            Target::Node(id) => {
                if let Ok(to) = self.ids.binary_search(&id) {
                    self.transmit(from, to, &bytes);
                }
            }
        }
    }

    fn transmit(&mut self, from: usize, to: usize, bytes: &Rc<Vec<u8>>) {
        self.stats.frames += 1;
        self.stats.bytes += bytes.len() as u64;
        if self.nodes[from].group != self.nodes[to].group {
            self.stats.cut += 1;
            return;
        }
        let copies = if self.rng.chance(self.net.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.rng.chance(self.net.loss) {
                self.stats.lost += 1;
                continue;
            }
            let mut delay = self.net.latency.sample(&mut self.rng);
            if self.rng.chance(self.net.reorder) {
                let extra = Latency::Uniform {
                    min: Millis::ZERO,
                    max: self.net.latency.max(),
                };
                delay = delay.saturating_add(extra.sample(&mut self.rng));
            }
            let at = self.now.saturating_add(delay).saturating_add(Millis(1));
            self.queue.push(
                at.0,
                Event::Deliver {
                    to,
                    bytes: Rc::clone(bytes),
                },
            );
        }
    }
}

/// What [`measure_convergence`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvergenceReport {
    /// Replicas.
    pub nodes: usize,
    /// Local updates made.
    pub updates: usize,
    /// Simulated time from the last update until every replica held the
    /// joined state.
    pub converged_after: Millis,
    /// What the network carried and did until then.
    pub network: CrdtSimStats,
    /// Once converged, frames per simulated second (anti-entropy only).
    pub idle_frames_per_sec: u64,
    /// Once converged, encoded bytes per simulated second.
    pub idle_bytes_per_sec: u64,
}

/// The convergence figure: `config.nodes` replicas of an OR-set. For the
/// first second every replica adds three random elements and removes one
/// it sees, at random times; the figure is the simulated time from the
/// last update until every replica holds the join of all of them, then
/// the anti-entropy traffic of 10 idle seconds. `None` when convergence
/// takes more than a minute. [`CrdtSimConfig::new`] is the reference
/// setting (10-100 ms, 1% loss, 1% duplication, 5% reordering, a digest
/// every second to 3 peers).
pub fn measure_convergence(config: CrdtSimConfig, seed: u64) -> Option<ConvergenceReport> {
    let nodes = config.nodes;
    let mut sim: CrdtSim<macula_crdt::OrSet<u32>> = CrdtSim::new(seed, config);
    let mut plan: Vec<(u64, usize, u32, bool)> = Vec::new();
    for i in 0..nodes {
        for k in 0..4 {
            let at = sim.rng().below(1_000);
            let elem = sim.rng().below(1_000) as u32;
            plan.push((at, i, elem, k == 3));
        }
    }
    plan.sort_unstable();
    let mut updates = 0;
    for (at, i, elem, remove) in plan {
        sim.run_for(Millis(at).saturating_sub(sim.now()));
        let done = if remove {
            // Remove something this replica sees, if anything.
            let seen = sim.state(i).iter().next().copied();
            match seen {
                Some(x) => sim.update(i, |s, ts| Ok(s.remove(ts.node, &x))),
                None => continue,
            }
        } else {
            sim.update(i, |s, ts| s.add(ts.node, elem))
        };
        updates += usize::from(done.is_ok());
    }
    let converged_after = sim.run_until_converged(Millis::from_secs(60))?;
    let network = sim.stats();
    sim.run_for(Millis::from_secs(10));
    let idle = sim.stats();
    Some(ConvergenceReport {
        nodes,
        updates,
        converged_after,
        network,
        idle_frames_per_sec: (idle.frames - network.frames) / 10,
        idle_bytes_per_sec: (idle.bytes - network.bytes) / 10,
    })
}
