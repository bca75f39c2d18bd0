//! The node status service's pure core: what this node knows of itself and
//! its peers (their last STATUS_REPORT), the rates computed from their
//! running totals, which peers to ask next, and the per-peer answer limit.
//! No I/O, no clock: every call takes the time as [`Millis`].

use std::collections::{HashMap, VecDeque};

use macula_wire::status::{NodeStatus, StatusReport, StatusTotals};
use macula_wire::{Millis, NodeId};

/// The rates a dashboard shows, in this order.
pub const RATE_NAMES: [&str; RATES] = [
    "messages_in",
    "messages_out",
    "pubsub_in",
    "pubsub_out",
    "published",
    "delivered",
    "rpc_calls",
    "rpc_served",
];

/// How many rates.
pub const RATES: usize = 8;

/// The totals [`RATE_NAMES`] are computed from.
pub fn rate_totals(t: &StatusTotals) -> [u64; RATES] {
    [
        t.messages_in,
        t.messages_out,
        t.pubsub_in,
        t.pubsub_out,
        t.published,
        t.delivered,
        t.rpc_calls,
        t.rpc_served,
    ]
}

/// Running totals sampled over time, and their rates per second over the
/// last `window`. Deterministic: time is an argument.
#[derive(Debug, Clone)]
pub struct RateWindow<const N: usize> {
    window: Millis,
    samples: VecDeque<(Millis, [u64; N])>,
}

/// Samples kept at most, however often [`RateWindow::record`] is called.
pub const MAX_RATE_SAMPLES: usize = 64;

impl<const N: usize> RateWindow<N> {
    pub fn new(window: Millis) -> Self {
        RateWindow {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Adds the totals read at `now`. A total lower than before (the node
    /// restarted) or a time before the last sample starts over.
    pub fn record(&mut self, now: Millis, totals: [u64; N]) {
        if let Some((at, last)) = self.samples.back() {
            if now < *at || totals.iter().zip(last).any(|(new, old)| new < old) {
                self.samples.clear();
            } else if now == *at {
                self.samples.pop_back();
            }
        }
        self.samples.push_back((now, totals));
        // Keep one sample at or before the window's start, so a rate always
        // spans the whole window once there is that much history.
        let start = now.saturating_sub(self.window);
        while self.samples.len() > 2 && self.samples.get(1).is_some_and(|(t, _)| *t <= start) {
            self.samples.pop_front();
        }
        while self.samples.len() > MAX_RATE_SAMPLES {
            self.samples.pop_front();
        }
    }

    /// Per second, between the oldest and newest samples kept; zeros with
    /// fewer than two samples.
    pub fn rates(&self) -> [f64; N] {
        let (Some((t0, first)), Some((t1, last))) = (self.samples.front(), self.samples.back())
        else {
            return [0.0; N];
        };
        let span = t1.saturating_sub(*t0).0;
        if span == 0 {
            return [0.0; N];
        }
        let secs = span as f64 / 1000.0;
        std::array::from_fn(|i| last[i].saturating_sub(first[i]) as f64 / secs)
    }
}

/// What the view knows of one node.
#[derive(Debug, Clone)]
pub struct Known {
    /// Its last status; `None` when it refused (see `refused`) or has not
    /// answered yet.
    pub status: Option<NodeStatus>,
    /// Why it refused to report, when it did.
    pub refused: Option<String>,
    /// When the last report (or refusal) arrived.
    pub at: Millis,
    pub rates: RateWindow<RATES>,
}

/// Why a STATUS_REPORT was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportError {
    /// No request to that peer with that nonce is waiting.
    Unsolicited,
    /// The status names another node than the one that sent it.
    Mismatched,
}

/// Outcome of a STATUS_REPORT, as the `outcome` label of
/// `macula_status_reports_received_total`.
pub const REPORT_OUTCOMES: [&str; 4] = ["stored", "refused", "unsolicited", "mismatched"];

/// The view of the mesh from one node. See the module docs.
#[derive(Debug)]
pub struct View {
    me: NodeId,
    max_peers: usize,
    stale_after: Millis,
    min_answer_interval: Millis,
    rate_window: Millis,
    known: HashMap<NodeId, Known>,
    /// Requests sent and not answered: peer -> (nonce, sent at).
    pending: HashMap<NodeId, (u64, Millis)>,
    /// When each peer's last request was answered (the answer limit).
    answered: HashMap<NodeId, Millis>,
    next_nonce: u64,
    /// Where the next round starts in the sorted peer list.
    turn: usize,
    watched_until: Option<Millis>,
}

/// Limits of a [`View`] (from `config::DashboardLimits`).
#[derive(Debug, Clone, Copy)]
pub struct ViewLimits {
    pub max_peers: usize,
    pub stale_after: Millis,
    pub min_answer_interval: Millis,
    pub rate_window: Millis,
}

impl View {
    pub fn new(me: NodeId, limits: ViewLimits, first_nonce: u64) -> View {
        View {
            me,
            max_peers: limits.max_peers,
            stale_after: limits.stale_after,
            min_answer_interval: limits.min_answer_interval,
            rate_window: limits.rate_window,
            known: HashMap::new(),
            pending: HashMap::new(),
            answered: HashMap::new(),
            next_nonce: first_nonce,
            turn: 0,
            watched_until: None,
        }
    }

    /// A dashboard read the view at `now`: peers are asked for the next
    /// `stale_after`.
    pub fn watch(&mut self, now: Millis) {
        self.watched_until = Some(now.saturating_add(self.stale_after));
    }

    /// Whether a dashboard read the view lately.
    pub fn is_watched(&self, now: Millis) -> bool {
        self.watched_until.is_some_and(|until| now <= until)
    }

    /// This node's own status, read at `now`.
    pub fn record_local(&mut self, now: Millis, status: NodeStatus) {
        let window = self.rate_window;
        let k = self.known.entry(self.me).or_insert_with(|| Known {
            status: None,
            refused: None,
            at: now,
            rates: RateWindow::new(window),
        });
        k.rates.record(now, rate_totals(&status.totals));
        k.status = Some(status);
        k.at = now;
    }

    /// A round at `now` over the connected full-node `peers`: forgets
    /// reports older than `stale_after` and peers no longer connected,
    /// and returns the requests to send (at most `max_peers`, taking turns
    /// when there are more) with the number of earlier requests that went
    /// unanswered.
    pub fn round(&mut self, now: Millis, peers: &[NodeId]) -> (Vec<(NodeId, u64)>, u64) {
        let stale = self.stale_after;
        let me = self.me;
        self.known
            .retain(|id, k| *id == me || (peers.contains(id) && now.saturating_sub(k.at) < stale));
        let before = self.pending.len();
        self.pending
            .retain(|id, (_, sent)| peers.contains(id) && now.saturating_sub(*sent) < stale);
        let mut unanswered = (before - self.pending.len()) as u64;
        let mut sorted: Vec<NodeId> = peers.iter().copied().filter(|p| *p != me).collect();
        sorted.sort();
        sorted.dedup();
        let mut out = Vec::new();
        if sorted.is_empty() {
            return (out, unanswered);
        }
        let n = sorted.len().min(self.max_peers);
        let start = self.turn % sorted.len();
        for i in 0..n {
            let id = sorted[(start + i) % sorted.len()];
            let nonce = self.next_nonce;
            self.next_nonce = self.next_nonce.wrapping_add(1);
            if self.pending.insert(id, (nonce, now)).is_some() {
                // The previous request to it is still unanswered.
                unanswered += 1;
            }
            out.push((id, nonce));
        }
        self.turn = (start + n) % sorted.len();
        (out, unanswered)
    }

    /// A STATUS_REPORT from `from` at `now`.
    pub fn on_report(
        &mut self,
        from: NodeId,
        report: StatusReport,
        now: Millis,
    ) -> Result<(), ReportError> {
        match self.pending.get(&from) {
            Some((nonce, _)) if *nonce == report.nonce => {}
            _ => return Err(ReportError::Unsolicited),
        }
        if report.status.as_ref().is_some_and(|s| s.node_id != from) {
            return Err(ReportError::Mismatched);
        }
        self.pending.remove(&from);
        let window = self.rate_window;
        let k = self.known.entry(from).or_insert_with(|| Known {
            status: None,
            refused: None,
            at: now,
            rates: RateWindow::new(window),
        });
        k.at = now;
        match report.status {
            Some(s) => {
                k.rates.record(now, rate_totals(&s.totals));
                k.status = Some(*s);
                k.refused = None;
            }
            None => {
                k.status = None;
                k.refused = Some(report.refused);
            }
        }
        Ok(())
    }

    /// Whether a STATUS_REQUEST from `from` at `now` may be answered (at
    /// most one per `min_answer_interval`); records the answer if so.
    pub fn may_answer(&mut self, from: NodeId, now: Millis) -> bool {
        if let Some(last) = self.answered.get(&from) {
            if now.saturating_sub(*last) < self.min_answer_interval && now >= *last {
                return false;
            }
        }
        self.answered.insert(from, now);
        true
    }

    /// `id`'s connection ended: forget it.
    pub fn peer_gone(&mut self, id: &NodeId) {
        self.known.remove(id);
        self.pending.remove(id);
        self.answered.remove(id);
    }

    /// Everything known, this node first, then by node ID.
    pub fn known(&self) -> Vec<(NodeId, &Known)> {
        let mut v: Vec<(NodeId, &Known)> = self.known.iter().map(|(id, k)| (*id, k)).collect();
        v.sort_by_key(|(id, _)| (*id != self.me, *id));
        v
    }

    /// Peers whose report is held (this node not counted).
    pub fn peers_known(&self) -> usize {
        self.known.keys().filter(|id| **id != self.me).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn status(of: NodeId, messages_in: u64) -> NodeStatus {
        NodeStatus {
            node_id: of,
            addrs: vec![],
            agent: String::new(),
            uptime_ms: 0,
            ready: true,
            reachability: "public".into(),
            links: vec![],
            links_omitted: 0,
            clients: 0,
            totals: StatusTotals {
                messages_in,
                ..StatusTotals::default()
            },
        }
    }

    fn limits() -> ViewLimits {
        ViewLimits {
            max_peers: 2,
            stale_after: Millis(10_000),
            min_answer_interval: Millis(250),
            rate_window: Millis(10_000),
        }
    }

    #[test]
    fn rates_are_per_second_over_the_window() {
        let mut w = RateWindow::<2>::new(Millis(10_000));
        assert_eq!(w.rates(), [0.0, 0.0], "no sample");
        w.record(Millis(1_000), [100, 0]);
        assert_eq!(w.rates(), [0.0, 0.0], "one sample");
        w.record(Millis(3_000), [300, 10]);
        assert_eq!(w.rates(), [100.0, 5.0]);
        // Samples older than the window go, but one at its start stays.
        for s in 4..=20u64 {
            w.record(Millis(s * 1_000), [300 + (s - 3) * 50, 10]);
        }
        let r = w.rates();
        assert_eq!(r, [50.0, 0.0], "only the last 10 s count: {r:?}");
        assert!(w.samples.len() <= 12, "{}", w.samples.len());
    }

    #[test]
    fn rates_restart_after_a_counter_reset_or_a_step_back() {
        let mut w = RateWindow::<1>::new(Millis(10_000));
        w.record(Millis(0), [1000]);
        w.record(Millis(1_000), [2000]);
        assert_eq!(w.rates(), [1000.0]);
        // The node restarted: its totals start again from zero.
        w.record(Millis(2_000), [5]);
        assert_eq!(w.rates(), [0.0]);
        w.record(Millis(3_000), [15]);
        assert_eq!(w.rates(), [10.0]);
        // Same instant twice: the later reading replaces the earlier.
        w.record(Millis(3_000), [25]);
        assert_eq!(w.rates(), [20.0]);
        w.record(Millis(1), [30]);
        assert_eq!(w.rates(), [0.0], "time went back");
    }

    #[test]
    fn rates_keep_a_bounded_history() {
        let mut w = RateWindow::<1>::new(Millis(u64::MAX));
        for t in 0..1000u64 {
            w.record(Millis(t), [t * 2]);
        }
        assert_eq!(w.samples.len(), MAX_RATE_SAMPLES);
        assert_eq!(w.rates(), [2000.0]);
    }

    #[test]
    fn rounds_take_turns_and_count_unanswered_requests() {
        let mut v = View::new(id(0), limits(), 7);
        let peers = [id(3), id(1), id(2), id(0)];
        let (asked, lost) = v.round(Millis(0), &peers);
        assert_eq!(asked, vec![(id(1), 7), (id(2), 8)]);
        assert_eq!(lost, 0);
        let (asked, lost) = v.round(Millis(1_000), &peers);
        assert_eq!(asked, vec![(id(3), 9), (id(1), 10)]);
        assert_eq!(lost, 1, "id(1) never answered nonce 7");
        // Answers: the right nonce is stored, a wrong one is not.
        assert_eq!(
            v.on_report(
                id(3),
                StatusReport {
                    nonce: 1,
                    status: Some(Box::new(status(id(3), 1))),
                    refused: String::new(),
                },
                Millis(1_100),
            ),
            Err(ReportError::Unsolicited)
        );
        assert_eq!(
            v.on_report(
                id(3),
                StatusReport {
                    nonce: 9,
                    status: Some(Box::new(status(id(9), 1))),
                    refused: String::new(),
                },
                Millis(1_100),
            ),
            Err(ReportError::Mismatched)
        );
        v.on_report(
            id(3),
            StatusReport {
                nonce: 9,
                status: Some(Box::new(status(id(3), 1))),
                refused: String::new(),
            },
            Millis(1_100),
        )
        .expect("stored");
        assert_eq!(
            v.on_report(
                id(3),
                StatusReport {
                    nonce: 9,
                    status: Some(Box::new(status(id(3), 1))),
                    refused: String::new(),
                },
                Millis(1_200),
            ),
            Err(ReportError::Unsolicited),
            "answered once"
        );
        v.on_report(
            id(1),
            StatusReport {
                nonce: 10,
                status: None,
                refused: "no grant".into(),
            },
            Millis(1_100),
        )
        .expect("a refusal is stored too");
        assert_eq!(v.peers_known(), 2);
        // A peer that left is forgotten at the next round; stale ones too.
        let (_, _) = v.round(Millis(2_000), &[id(3)]);
        assert_eq!(v.peers_known(), 1);
        let (_, _) = v.round(Millis(20_000), &[id(3)]);
        assert_eq!(v.peers_known(), 0);
    }

    #[test]
    fn reports_make_rates() {
        let mut v = View::new(id(0), limits(), 0);
        for (i, t) in [0u64, 1_000, 2_000].into_iter().enumerate() {
            let (asked, _) = v.round(Millis(t), &[id(1)]);
            let nonce = asked[0].1;
            v.on_report(
                id(1),
                StatusReport {
                    nonce,
                    status: Some(Box::new(status(id(1), 40 * i as u64))),
                    refused: String::new(),
                },
                Millis(t + 10),
            )
            .expect("stored");
            v.record_local(Millis(t), status(id(0), 0));
        }
        let known = v.known();
        assert_eq!(known[0].0, id(0), "this node first");
        assert_eq!(known[1].1.rates.rates()[0], 40.0);
        assert_eq!(known[0].1.rates.rates()[0], 0.0);
    }

    #[test]
    fn answers_are_rate_limited_per_peer() {
        let mut v = View::new(id(0), limits(), 0);
        assert!(v.may_answer(id(1), Millis(1_000)));
        assert!(!v.may_answer(id(1), Millis(1_100)));
        assert!(v.may_answer(id(2), Millis(1_100)), "another peer");
        assert!(v.may_answer(id(1), Millis(1_250)));
        v.peer_gone(&id(1));
        assert!(
            v.may_answer(id(1), Millis(1_260)),
            "forgotten with its connection"
        );
    }

    #[test]
    fn watched_for_stale_after() {
        let mut v = View::new(id(0), limits(), 0);
        assert!(!v.is_watched(Millis(0)));
        v.watch(Millis(1_000));
        assert!(v.is_watched(Millis(11_000)));
        assert!(!v.is_watched(Millis(11_001)));
    }
}
