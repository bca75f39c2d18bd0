//! The election watchdog: one task per group, beside openraft's own
//! election timer, that starts an election when this voter has heard no
//! leader for as long as openraft's rule says it should have.
//!
//! Why: openraft 0.9 adds `smaller_log_timeout` (twice the largest
//! election timeout: 800 ms by default) to a node's election timeout once
//! a vote answer showed it a greater log, and clears that flag only when
//! that node's own timer starts an election. A survivor with the longest
//! log may carry the flag from an election long ago and wait 0.4 + 0.4 +
//! 0.8 s after the leader dies, where 0.6 to 0.8 s is the norm. Upstream
//! fixed it after 0.9.25 (openraft PR #2087: the backoff applies only while
//! this node's log is still smaller than the greater one it saw); this
//! module can go when a 0.9 release ships that fix, or on the move to 0.10.
//!
//! The rule, as openraft's (`RaftCore::handle_tick_election`) but with the
//! backoff of PR #2087: a voter that is not the leader campaigns once
//! `now - last_heard` exceeds its own random timeout `T` in
//! `[election_timeout_min, election_timeout_max)`, plus the leader lease
//! (`election_timeout_max`) while its vote is committed (it follows a
//! leader), plus `smaller_log_timeout` while its last log is smaller than
//! the greatest one a vote answer showed it. `last_heard` is the last
//! AppendEntries or InstallSnapshot this node accepted from a leader, the
//! last change of its vote (an election started by openraft's timer, by
//! this watchdog, or a vote granted), or the last moment it led.
//!
//! Safety never depends on it: an election is always safe in Raft, a voter
//! refuses a candidate with a shorter log without changing its own vote,
//! and one whose leader lease still runs refuses every candidate. The
//! smaller-log backoff keeps liveness: a node that is behind does not keep
//! raising the term under the one that could win.

use std::sync::Arc;
use std::time::Duration;

use macula_raft::openraft::{LogId, ServerState, Vote};
use macula_raft::{MemberId, Raft};
use macula_wire::rng::Rng;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use super::RaftCounters;

/// What the group's RPCs tell its watchdog: the server side when it
/// accepts a leader's request, the client side when a vote answer shows a
/// greater log.
#[derive(Debug)]
pub(crate) struct Heard(Mutex<HeardState>);

#[derive(Debug)]
struct HeardState {
    /// The last time this node heard from a leader (or changed its vote,
    /// or led).
    at: Instant,
    /// The greatest last log a vote answer showed this node since its last
    /// election, when greater than its own then.
    greater_log: Option<LogId<MemberId>>,
}

impl Heard {
    pub(crate) fn new() -> Heard {
        Heard(Mutex::new(HeardState {
            at: Instant::now(),
            greater_log: None,
        }))
    }

    /// A leader was heard from (or the clock restarts for another reason).
    pub(crate) fn leader(&self) {
        self.reset(Instant::now());
    }

    fn reset(&self, now: Instant) {
        let mut s = self.0.lock();
        if s.at < now {
            s.at = now;
        }
    }

    /// A vote answer carried `theirs`, greater than the last log this node
    /// campaigned with. The greatest is kept.
    pub(crate) fn greater_log(&self, theirs: LogId<MemberId>) {
        let mut s = self.0.lock();
        if s.greater_log < Some(theirs) {
            s.greater_log = Some(theirs);
        }
    }

    /// This node starts an election: what it saw before is forgotten (the
    /// answers to this one tell it again if it is still behind).
    fn campaigns(&self) {
        self.0.lock().greater_log = None;
    }

    /// Time since the last news of a leader, and whether `mine` (this
    /// node's last log) is still smaller than a greater log it saw.
    fn read(&self, now: Instant, mine: Option<LogId<MemberId>>) -> (Duration, bool) {
        let s = self.0.lock();
        (
            now.saturating_duration_since(s.at),
            s.greater_log.is_some() && s.greater_log > mine,
        )
    }
}

/// openraft's election timings of one group (`Config` in `group.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// `election_timeout_min`.
    pub min: Duration,
    /// `election_timeout_max`, also openraft's leader lease.
    pub max: Duration,
    /// openraft's `smaller_log_timeout`: twice `election_timeout_max`.
    pub smaller_log: Duration,
    /// How often the watchdog looks.
    pub poll: Duration,
}

impl Timing {
    /// The timings of a group with `election_timeout_min = election_ms`,
    /// `election_timeout_max = 2 * election_ms` and a heartbeat every
    /// `heartbeat_ms`.
    pub(crate) fn new(election_ms: u64, heartbeat_ms: u64) -> Timing {
        let min = Duration::from_millis(election_ms);
        let max = 2 * min;
        Timing {
            min,
            max,
            smaller_log: 2 * max,
            poll: Duration::from_millis(heartbeat_ms)
                .min(min / 4)
                .max(Duration::from_millis(1)),
        }
    }

    /// This node's own election timeout, drawn in `[min, max)`.
    fn draw(&self, rng: &mut Rng) -> Duration {
        let min = self.min.as_millis() as u64;
        let max = self.max.as_millis() as u64;
        Duration::from_millis(min + rng.below(max.saturating_sub(min)))
    }

    /// How long a voter waits without news of a leader before it
    /// campaigns: its own timeout, plus the leader lease while its vote is
    /// committed, plus the smaller-log backoff while it is behind.
    pub(crate) fn patience(&self, own: Duration, committed: bool, behind: bool) -> Duration {
        let mut d = own;
        if committed {
            d += self.max;
        }
        if behind {
            d += self.smaller_log;
        }
        d
    }
}

/// What the watchdog needs of the group.
pub(crate) struct Watchdog {
    pub raft: Raft,
    pub me: MemberId,
    pub group: Arc<str>,
    pub heard: Arc<Heard>,
    pub timing: Timing,
    pub counters: Arc<RaftCounters>,
    pub stop: watch::Receiver<bool>,
}

impl Watchdog {
    /// Runs until the group stops (or openraft does).
    pub(crate) async fn run(mut self) {
        let mut rng = Rng::new(crate::backoff::seed());
        let mut own = self.timing.draw(&mut rng);
        let metrics = self.raft.metrics();
        let data = self.raft.data_metrics();
        let mut tick = tokio::time::interval(self.timing.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut vote: Option<Vote<MemberId>> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = self.stop.changed() => if r.is_err() || *self.stop.borrow() { return },
            }
            let now = Instant::now();
            let (current, state, voter) = {
                let m = metrics.borrow();
                if m.running_state.is_err() {
                    return;
                }
                let voter = m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == self.me);
                (m.vote, m.state, voter)
            };
            if vote != Some(current) {
                vote = Some(current);
                self.heard.reset(now);
                if !current.is_committed() && current.leader_id().voted_for() == Some(self.me) {
                    // Our own election (openraft's timer or ours).
                    self.heard.campaigns();
                }
            }
            if state == ServerState::Leader || !voter {
                self.heard.reset(now);
                continue;
            }
            let mine = data.borrow().last_log;
            let (silent, behind) = self.heard.read(now, mine);
            let patience = self.timing.patience(own, current.is_committed(), behind);
            if silent <= patience {
                continue;
            }
            self.counters.watchdog_elections_total.inc();
            tracing::info!(group = %self.group, term = current.leader_id().term, silent_ms = silent.as_millis() as u64, "no leader heard: the watchdog starts an election");
            // The clock restarts now (and again when the vote changes):
            // at most one election per `own`.
            self.heard.reset(now);
            self.heard.campaigns();
            own = self.timing.draw(&mut rng);
            if let Err(e) = self.raft.trigger().elect().await {
                tracing::debug!(group = %self.group, error = %e, "watchdog: raft stopped");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use macula_raft::openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId<MemberId>> {
        Some(LogId::new(
            CommittedLeaderId::new(term, MemberId::default()),
            index,
        ))
    }

    #[test]
    fn timings_follow_openraft() {
        let t = Timing::new(200, 50);
        let ms = Duration::from_millis;
        assert_eq!(
            (t.min, t.max, t.smaller_log, t.poll),
            (ms(200), ms(400), ms(800), ms(50))
        );
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let d = t.draw(&mut rng);
            assert!(d >= ms(200) && d < ms(400), "{d:?}");
        }
        // Following a leader: lease + own; a candidate: own; behind: + 800.
        assert_eq!(t.patience(ms(300), true, false), ms(700));
        assert_eq!(t.patience(ms(300), false, false), ms(300));
        assert_eq!(t.patience(ms(300), true, true), ms(1500));
        // The poll is never slower than a quarter of the election timeout.
        assert_eq!(Timing::new(200, 500).poll, ms(50));
    }

    #[test]
    fn the_smaller_log_backoff_applies_only_while_behind() {
        let h = Heard::new();
        let now = Instant::now();
        assert!(!h.read(now, log(1, 5)).1);
        h.greater_log(log(2, 10).expect("log"));
        h.greater_log(log(2, 7).expect("log"));
        assert!(h.read(now, log(2, 9)).1, "behind the greatest seen");
        assert!(h.read(now, log(1, 20)).1, "a lower term is smaller");
        assert!(!h.read(now, log(2, 10)).1, "caught up");
        assert!(!h.read(now, log(3, 1)).1, "past it");
        h.greater_log(log(2, 10).expect("log"));
        h.campaigns();
        assert!(!h.read(now, log(1, 1)).1, "forgotten at an election");
    }

    #[test]
    fn news_of_a_leader_restarts_the_clock() {
        let h = Heard::new();
        let later = Instant::now() + Duration::from_secs(1);
        assert!(h.read(later, None).0 >= Duration::from_millis(900));
        h.reset(later);
        assert_eq!(h.read(later, None).0, Duration::ZERO);
        // Never backwards.
        h.reset(later - Duration::from_millis(500));
        assert_eq!(h.read(later, None).0, Duration::ZERO);
    }
}
