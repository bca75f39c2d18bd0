//! Phase timing of one write at a time through a group, for benchmarks
//! (`macula bench stream --phases`): where a one-in-flight replicated
//! publish spends its time. **Off by default**: each probe point is then
//! one relaxed atomic load. On, a point records, the first time it is
//! reached for the current write, the time since [`start`] (microseconds)
//! into its phase's samples; [`report`] gives each phase's percentiles.
//! Meant for a single process running every member (the bench's three
//! nodes): the points of leader and followers share one clock and one
//! current write. Writes in flight together, or heartbeats between, would
//! blur it: the bench has one in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use parking_lot::Mutex;

/// A point on a write's way, in the order it is normally reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Phase {
    /// The stream's leader proposed its writes (encoded, queued for the
    /// group's proposer task).
    Proposed,
    /// The proposer task took the write.
    ProposerTook,
    /// openraft took the entry (`client_write_ff` returned).
    RaftTook,
    /// The leader's log store got the entry (`append`).
    LeaderAppend,
    /// The leader's log writer wrote it.
    LeaderWritten,
    /// The leader sent an AppendEntries carrying entries.
    AppendSent,
    /// A follower got it (its group's `serve`).
    FollowerGot,
    /// The follower's log store got the entries (`append`).
    FollowerAppend,
    /// The follower's log writer wrote them.
    FollowerWritten,
    /// The follower answered (its `serve` returned).
    FollowerAnswered,
    /// The leader got the answer.
    AnswerGot,
    /// The leader's log store saw the commit and answered the proposer
    /// (`crate::commit`).
    CommitSeen,
    /// The leader's state machine began applying the entry.
    ApplyStart,
    /// Its applier (the stream store) applied it.
    Applied,
    /// The state machine's apply returned.
    ApplyDone,
    /// The proposer's task got openraft's answer.
    ProposerAnswered,
    /// The publisher got its acknowledgement.
    Acked,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 17] = [
        Phase::Proposed,
        Phase::ProposerTook,
        Phase::RaftTook,
        Phase::LeaderAppend,
        Phase::LeaderWritten,
        Phase::AppendSent,
        Phase::FollowerGot,
        Phase::FollowerAppend,
        Phase::FollowerWritten,
        Phase::FollowerAnswered,
        Phase::AnswerGot,
        Phase::CommitSeen,
        Phase::ApplyStart,
        Phase::Applied,
        Phase::ApplyDone,
        Phase::ProposerAnswered,
        Phase::Acked,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Proposed => "proposed (encoded, queued)",
            Phase::ProposerTook => "proposer task took it",
            Phase::RaftTook => "openraft took it",
            Phase::LeaderAppend => "leader log append",
            Phase::LeaderWritten => "leader log written",
            Phase::AppendSent => "AppendEntries sent",
            Phase::FollowerGot => "follower got it",
            Phase::FollowerAppend => "follower log append",
            Phase::FollowerWritten => "follower log written",
            Phase::FollowerAnswered => "follower answered",
            Phase::AnswerGot => "leader got the answer",
            Phase::CommitSeen => "leader saw the commit",
            Phase::ApplyStart => "leader apply started",
            Phase::Applied => "stream store applied",
            Phase::ApplyDone => "leader apply done",
            Phase::ProposerAnswered => "proposer got the answer",
            Phase::Acked => "publisher answered",
        }
    }
}

const N: usize = Phase::ALL.len();

static ON: AtomicBool = AtomicBool::new(false);
/// The current write's number (0: none yet).
static WRITE: AtomicU64 = AtomicU64::new(0);
/// Its start, in ns since `base()`.
static STARTED: AtomicU64 = AtomicU64::new(0);
/// Per phase: the write it last recorded.
static SEEN: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static SAMPLES: Mutex<Vec<Vec<u32>>> = Mutex::new(Vec::new());
/// Samples kept per phase at most.
const MAX_SAMPLES: usize = 1 << 20;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// Turns the probes on (clearing earlier samples) or off.
pub fn set(on: bool) {
    if on {
        let mut s = SAMPLES.lock();
        *s = vec![Vec::new(); N];
    }
    ON.store(on, Ordering::Release);
}

/// Whether the probes are on.
#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// A new write starts now.
pub fn start() {
    if !on() {
        return;
    }
    STARTED.store(now_ns(), Ordering::Release);
    WRITE.fetch_add(1, Ordering::AcqRel);
}

/// The current write reached `phase` (recorded the first time only).
#[inline]
pub fn mark(phase: Phase) {
    if on() {
        record(phase);
    }
}

#[cold]
fn record(phase: Phase) {
    let write = WRITE.load(Ordering::Acquire);
    if write == 0 || SEEN[phase as usize].swap(write, Ordering::AcqRel) == write {
        return;
    }
    let us = now_ns().saturating_sub(STARTED.load(Ordering::Acquire)) / 1_000;
    let mut s = SAMPLES.lock();
    if let Some(v) = s.get_mut(phase as usize) {
        if v.len() < MAX_SAMPLES {
            v.push(us.min(u64::from(u32::MAX)) as u32);
        }
    }
}

/// One phase's figures: microseconds since the write started.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseStats {
    pub phase: Phase,
    /// Writes that reached it.
    pub count: usize,
    pub p50_us: u32,
    pub p90_us: u32,
}

/// Each phase's percentiles (time since the write's start), in order.
pub fn report() -> Vec<PhaseStats> {
    let s = SAMPLES.lock();
    Phase::ALL
        .iter()
        .map(|&phase| {
            let mut v = s.get(phase as usize).cloned().unwrap_or_default();
            v.sort_unstable();
            let at = |q: f64| {
                v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0)
            };
            PhaseStats {
                phase,
                count: v.len(),
                p50_us: at(0.5),
                p90_us: at(0.9),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_records_nothing_on_records_each_phase_once_per_write() {
        set(false);
        start();
        mark(Phase::Proposed);
        set(true);
        assert!(report().iter().all(|p| p.count == 0));
        for _ in 0..3 {
            start();
            mark(Phase::Proposed);
            mark(Phase::Proposed);
            mark(Phase::Acked);
        }
        set(false);
        mark(Phase::Applied);
        let r = report();
        assert_eq!(r[Phase::Proposed as usize].count, 3);
        assert_eq!(r[Phase::Acked as usize].count, 3);
        assert_eq!(r[Phase::Applied as usize].count, 0);
        assert!(r[Phase::Acked as usize].p50_us >= r[Phase::Proposed as usize].p50_us);
    }
}
