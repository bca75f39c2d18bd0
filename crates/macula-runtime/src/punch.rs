//! Hole punching (issue 22): two nodes connected through a relay try a
//! direct connection from their own QUIC sockets, as libp2p's DCUtR does
//! (PROTOCOL.md 5.5.2).
//!
//! The node that dialed the relayed connection (the initiator), once it is
//! up, sends HOLE_PUNCH with its candidates (reflexive addresses from
//! `nat.rs`, then listen addresses) and its NAT mapping; the other answers
//! HOLE_PUNCH (`reply`) with its own. The initiator measures the round
//! trip, skips a pair that cannot work (`nat::should_punch`), sends
//! HOLE_PUNCH_SYNC and dials the other's candidates half a round trip
//! later; the other dials the initiator's on receiving the sync. Each
//! side's first packet opens its own NAT for the other's, so one of the
//! dials gets through. The direct connection is pooled like any other and
//! replaces the relayed one on both sides (`macula_pool`: a direct
//! connection always wins over a relayed one), which closes after the
//! duplicate grace period; the relay stays whenever punching fails.
//!
//! The decisions are `macula-nat`'s (`punch::on_answer`, `dial_targets`,
//! `round_wait`), shared with the simulator's pair matrix.
//!
//! Limits (`NatLimits`): `punch_rounds` rounds per attempt, each waiting
//! for a direct connection `punch::round_wait` (8 round trips, at least
//! 1.2 s, at most `punch_round_timeout`) after its dials leave, then
//! `punch_backoff` (doubling) before the next round, whose dials leave
//! anew from both sides;
//! one attempt per peer at a time; at most [`MAX_PENDING`] answers waiting
//! for their sync. Every attempt ends in one outcome of
//! `macula_holepunch_attempts_total{outcome}`. A `failed` attempt (the
//! pair looked punchable) is tried again while the relayed connection
//! lives, at most `punch_retries` times, after `punch_retry_after`
//! (doubling).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use macula_wire::nat::{HolePunch, HolePunchSync, MAX_PUNCH_ADDRS};
use macula_wire::time::Millis;
use macula_wire::{Message, NodeId};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, watch};

use crate::metrics::{register, LabelledCounters};
use crate::nat::{self, punch, NatLimits};
use crate::peer::{Direction, Peer};
use crate::reachability::Reachability;
use crate::service::{Answer, Serves, Service};

/// Answers (the responder's side) waiting for their sync at once.
pub const MAX_PENDING: usize = 64;

/// How an attempt ended.
const OUTCOMES: [&str; 5] = [
    "direct",
    "failed",
    "unpunchable",
    "no_candidates",
    "relay_closed",
];

/// Hole-punching counters.
#[derive(Debug)]
pub struct PunchCounters {
    /// Attempts by outcome (`OUTCOMES`).
    pub attempts: LabelledCounters<5>,
    /// Rounds run (each an exchange and dials).
    pub rounds_total: Counter,
    /// Direct connections that succeeded in the first round.
    pub first_round_total: Counter,
    /// Dials made for a peer's sync (the responder's side).
    pub responder_dials_total: Counter,
}

impl Default for PunchCounters {
    fn default() -> Self {
        PunchCounters {
            attempts: LabelledCounters::new("outcome", OUTCOMES),
            rounds_total: Counter::default(),
            first_round_total: Counter::default(),
            responder_dials_total: Counter::default(),
        }
    }
}

impl PunchCounters {
    pub fn register(&self, r: &mut Registry) {
        self.attempts.register(
            r,
            "macula_holepunch_attempts",
            "Hole-punching attempts over relayed connections, by outcome.",
        );
        register(
            r,
            "macula_holepunch_rounds",
            "Hole-punching rounds run (candidate exchange, then simultaneous dials).",
            self.rounds_total.clone(),
        );
        register(
            r,
            "macula_holepunch_first_round",
            "Hole-punching attempts that went direct in their first round.",
            self.first_round_total.clone(),
        );
        register(
            r,
            "macula_holepunch_responder_dials",
            "Dials this node made when a peer's hole-punching sync arrived.",
            self.responder_dials_total.clone(),
        );
    }

    /// The count of `outcome`.
    pub fn outcome(&self, outcome: &str) -> u64 {
        OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.attempts.at(i).get())
    }

    fn count(&self, outcome: &'static str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.attempts.at(i).inc();
        }
    }
}

/// Dials `addr` expecting `id` and pools the connection (direct, from the
/// node's own socket).
pub type DirectDial =
    Box<dyn Fn(SocketAddr, NodeId) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;
/// Whether the pool holds a direct connection to a node.
pub type IsDirect = Box<dyn Fn(NodeId) -> bool + Send + Sync>;

struct Inner {
    limits: NatLimits,
    reach: Reachability,
    listen: Vec<String>,
    dial: DirectDial,
    is_direct: IsDirect,
    /// The initiator's attempts waiting for the answer, by nonce.
    waiting: Mutex<HashMap<u64, oneshot::Sender<HolePunch>>>,
    /// The responder's answers waiting for the sync: nonce, the peer, its
    /// candidates (oldest first, bounded).
    answered: Mutex<VecDeque<(u64, NodeId, Vec<String>)>>,
    /// Peers with an attempt running.
    running: Mutex<HashSet<NodeId>>,
    /// Raised by `start_now`: the attempts begun before it stop waiting
    /// out `punch_start_delay` (each watches from its beginning, so one
    /// not yet running when it is raised does not miss it).
    start_now: watch::Sender<u64>,
    next_nonce: AtomicU64,
    started: Instant,
    counters: Arc<PunchCounters>,
}

/// The hole-punching service. Cheap to clone.
#[derive(Clone)]
pub struct HolePunching(Arc<Inner>);

impl std::fmt::Debug for HolePunching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HolePunching")
            .field("running", &self.0.running.lock().len())
            .finish()
    }
}

impl HolePunching {
    pub(crate) fn new(
        limits: NatLimits,
        reach: Reachability,
        listen: Vec<String>,
        dial: DirectDial,
        is_direct: IsDirect,
    ) -> HolePunching {
        HolePunching(Arc::new(Inner {
            limits,
            reach,
            listen,
            dial,
            is_direct,
            waiting: Mutex::new(HashMap::new()),
            answered: Mutex::new(VecDeque::new()),
            running: Mutex::new(HashSet::new()),
            start_now: watch::Sender::new(0),
            next_nonce: AtomicU64::new(crate::backoff::seed() | 1),
            started: Instant::now(),
            counters: Arc::new(PunchCounters::default()),
        }))
    }

    pub fn counters(&self) -> &Arc<PunchCounters> {
        &self.0.counters
    }

    /// Starts at once the attempts begun so far that are waiting out
    /// `punch_start_delay` (those begun later wait as usual): for an
    /// operator who wants the direct path without waiting, and for tests
    /// that start punching at a chosen moment rather than after a delay a
    /// loaded machine may overrun.
    pub fn start_now(&self) {
        self.0.start_now.send_modify(|g| *g += 1);
    }

    fn now(&self) -> Millis {
        Millis::from_duration(self.0.started.elapsed())
    }

    /// This node's HOLE_PUNCH (candidates and mapping).
    fn offer(&self, nonce: u64, reply: bool) -> HolePunch {
        let nat = self.0.reach.nat(self.now());
        HolePunch {
            nonce,
            addrs: nat::candidates(&nat.report, &self.0.listen, MAX_PUNCH_ADDRS),
            mapping: nat.report.mapping.name().to_string(),
            filtering: nat.filtering.name().to_string(),
            reply,
            predicted: !nat.report.predicted.is_empty(),
        }
    }

    /// Dials every candidate at once; true when a direct connection is
    /// pooled within `within`.
    async fn dial_all(&self, id: NodeId, targets: Vec<SocketAddr>, within: Duration) -> bool {
        let dials = targets.into_iter().map(|a| {
            let fut = (self.0.dial)(a, id);
            async move {
                if let Err(e) = fut.await {
                    tracing::debug!(peer = %id, addr = %a, error = %e, "hole-punching dial failed");
                }
            }
        });
        // The dials run to their end in their own task (each bounded by
        // the handshake timeout): one dropped in the middle of its
        // handshake would close a connection the other side may just have
        // pooled as its winner, leaving neither side direct.
        let all = tokio::spawn(futures::future::join_all(dials));
        // Done when a direct connection is pooled (ours or the peer's
        // dial), not when the last dial to a dead candidate gives up.
        let pooled = async {
            while !(self.0.is_direct)(id) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(within, async {
            tokio::select! {
                _ = all => {}
                _ = pooled => {}
            }
        })
        .await;
        (self.0.is_direct)(id)
    }

    /// One attempt over the relayed connection `peer` (the initiator's
    /// side): rounds until a direct connection exists or they run out.
    async fn attempt(self, peer: Peer, mut start_now: watch::Receiver<u64>) {
        let id = peer.node_id();
        let l = self.0.limits;
        tokio::select! {
            _ = tokio::time::sleep(l.punch_start_delay.to_duration()) => {}
            _ = start_now.changed() => {}
        }
        let mut retry = 0;
        loop {
            let began = Instant::now();
            let (outcome, rounds) = self.rounds(&peer).await;
            if outcome == "direct" {
                tracing::info!(peer = %id, after_ms = began.elapsed().as_millis() as u64, rounds, retry, "direct connection by hole punching; leaving the relay");
            } else {
                tracing::info!(peer = %id, outcome, "hole punching did not connect directly; staying on the relay");
            }
            self.0.counters.count(outcome);
            // Only a pair that could have worked is tried again, later,
            // while its relayed connection lives.
            if outcome != "failed" || retry >= l.punch_retries {
                break;
            }
            let wait = nat::round_delay(retry + 1, l.punch_retry_after).to_duration();
            retry += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = peer.connection().closed() => break,
            }
        }
        self.0.running.lock().remove(&id);
    }

    /// The rounds of one attempt; returns its outcome and the rounds run.
    async fn rounds(&self, peer: &Peer) -> (&'static str, u32) {
        let id = peer.node_id();
        let l = self.0.limits;
        let c = self.0.counters.clone();
        let mut outcome = "failed";
        let mut ran = 0;
        for round in 0..l.punch_rounds {
            ran = round + 1;
            tokio::time::sleep(nat::round_delay(round, l.punch_backoff).to_duration()).await;
            if (self.0.is_direct)(id) {
                outcome = "direct";
                break;
            }
            if peer.is_closed() {
                outcome = "relay_closed";
                break;
            }
            c.rounds_total.inc();
            let nonce = self.0.next_nonce.fetch_add(1, Relaxed);
            let offer = self.offer(nonce, false);
            if offer.addrs.is_empty() {
                outcome = "no_candidates";
                break;
            }
            let (tx, rx) = oneshot::channel();
            self.0.waiting.lock().insert(nonce, tx);
            let sent = Instant::now();
            let timeout = l.punch_round_timeout.to_duration();
            let answer = match peer.send(&Message::HolePunch(offer)).await {
                Ok(()) => tokio::time::timeout(timeout, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            };
            self.0.waiting.lock().remove(&nonce);
            let Some(answer) = answer else {
                continue;
            };
            let rtt = Millis::from_duration(sent.elapsed());
            let nat = self.0.reach.nat(self.now());
            let mine = punch::Side {
                mapping: nat.report.mapping,
                filtering: nat.filtering,
                predicted: !nat.report.predicted.is_empty(),
            };
            let theirs = punch::Side {
                mapping: nat::mapping_named(&answer.mapping),
                filtering: nat::filtering_named(&answer.filtering),
                predicted: answer.predicted,
            };
            let targets = punch::dial_targets(&answer.addrs, MAX_PUNCH_ADDRS);
            let after = match punch::on_answer(mine, theirs, targets.len(), rtt) {
                punch::Step::Unpunchable => {
                    tracing::info!(peer = %id, mine = mine.mapping.name(), theirs = theirs.mapping.name(), "not punchable; staying on the relay");
                    outcome = "unpunchable";
                    break;
                }
                punch::Step::NoCandidates => {
                    outcome = "no_candidates";
                    break;
                }
                punch::Step::Dial { after } => after,
            };
            if peer
                .send(&Message::HolePunchSync(HolePunchSync { nonce }))
                .await
                .is_err()
            {
                outcome = "relay_closed";
                break;
            }
            tokio::time::sleep(after.to_duration()).await;
            // Not the whole round timeout: a round whose first packets
            // crossed is retried (new dials from both sides at once) after
            // a few round trips and the backoff.
            let wait = punch::round_wait(rtt, l.punch_round_timeout).to_duration();
            if self.dial_all(id, targets, wait).await {
                outcome = "direct";
                if round == 0 {
                    c.first_round_total.inc();
                }
                break;
            }
            tracing::debug!(peer = %id, round, "hole-punching round failed");
        }
        (outcome, ran)
    }

    /// A HOLE_PUNCH from `peer`: an answer to our attempt, or an offer to
    /// answer (returned, for the driver to send).
    fn on_punch(&self, peer: &Peer, msg: HolePunch) -> Option<Message> {
        if msg.reply {
            if let Some(tx) = self.0.waiting.lock().remove(&msg.nonce) {
                let _ = tx.send(msg);
            }
            return None;
        }
        if !self.0.limits.punch || peer.relayed_via().is_none() {
            // Already direct (or punching is off): nothing to answer with.
            return Some(Message::HolePunch(HolePunch {
                nonce: msg.nonce,
                addrs: Vec::new(),
                mapping: String::new(),
                filtering: String::new(),
                reply: true,
                predicted: false,
            }));
        }
        {
            let mut a = self.0.answered.lock();
            while a.len() >= MAX_PENDING {
                a.pop_front();
            }
            a.push_back((msg.nonce, peer.node_id(), msg.addrs));
        }
        Some(Message::HolePunch(self.offer(msg.nonce, true)))
    }

    /// A HOLE_PUNCH_SYNC: dial the initiator's candidates now.
    fn on_sync(&self, peer: &Peer, nonce: u64) {
        let found = {
            let mut a = self.0.answered.lock();
            let i = a
                .iter()
                .position(|(n, id, _)| *n == nonce && *id == peer.node_id());
            i.and_then(|i| a.remove(i))
        };
        let Some((_, id, addrs)) = found else {
            return;
        };
        self.0.counters.responder_dials_total.inc();
        let this = self.clone();
        let within = self.0.limits.punch_round_timeout.to_duration();
        let targets = punch::dial_targets(&addrs, MAX_PUNCH_ADDRS);
        tokio::spawn(async move {
            this.dial_all(id, targets, within).await;
        });
    }
}

impl Service for HolePunching {
    fn name(&self) -> &'static str {
        "holepunch"
    }

    fn serves(&self) -> Serves {
        use macula_wire::MessageType as T;
        Serves {
            messages: &[T::HolePunch, T::HolePunchSync],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        match msg {
            Message::HolePunch(h) => match self.on_punch(peer, h) {
                Some(reply) => Answer::Reply(reply),
                None => Answer::Done,
            },
            Message::HolePunchSync(s) => {
                self.on_sync(peer, s.nonce);
                Answer::Done
            }
            _ => Answer::Done,
        }
    }

    /// A relayed connection this node dialed to a full node: try to go
    /// direct, in the background (once per peer at a time).
    fn peer_up(&self, peer: &Peer) {
        if !self.0.limits.punch
            || self.0.limits.punch_rounds == 0
            || peer.relayed_via().is_none()
            || peer.direction() != Direction::Outbound
            || peer.is_client()
        {
            return;
        }
        if !self.0.running.lock().insert(peer.node_id()) {
            return;
        }
        let start_now = self.0.start_now.subscribe();
        tokio::spawn(self.clone().attempt(peer.clone(), start_now));
    }
}
