//! One iterative lookup (FIND_NODE or FIND_VALUE): its shortlist, whom to ask
//! next, and when it is done.
//!
//! Pure bookkeeping: it must not send anything, touch the routing table or know
//! about timers; [`crate::Dht`] drives it. Termination rule: the lookup ends when
//! the k closest candidates that have not failed have all answered (or nobody is
//! left to ask, or the request budget is spent).

use macula_wire::NodeId;

use crate::message::Contact;
use crate::record::Record;
use crate::routing::{distance, Distance};
use crate::Millis;

/// Names one lookup on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LookupId(pub u64);

/// What a lookup asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LookupKind {
    /// The k closest nodes to the target.
    FindNode,
    /// The records stored under the target key, from every reachable replica
    /// (and the k closest nodes, as for `FindNode`).
    FindValue,
}

/// Figures about one finished lookup (what the simulator aggregates).
///
/// Depth: contacts from our own table have depth 0; contacts first learned
/// from a depth-d node's answer have depth d + 1. Asking a depth-d node is
/// round d + 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LookupStats {
    /// Sequential request rounds until termination: the largest round of any
    /// answered request.
    pub rounds: u32,
    /// Round in which the answer first arrived: for `FindNode`, when the
    /// target's contact was first learned (0 if already in our table); for
    /// `FindValue`, when the first record arrived (0 if we hold one). `None` if
    /// never.
    pub hops: Option<u32>,
    /// Requests sent, retries included.
    pub n_requests: u32,
    /// Peers that never answered (after the retry).
    pub n_failed: u32,
    /// When the lookup started.
    pub started: Millis,
    /// When it finished.
    pub finished: Millis,
}

/// The result of a finished lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupOutcome {
    /// The looked-up ID or key.
    pub target: NodeId,
    /// What was asked.
    pub kind: LookupKind,
    /// Up to k closest nodes that answered, nearest first.
    pub closest: Vec<Contact>,
    /// `FindValue` only: records found, one per publisher (highest seq), each
    /// already checked against its signature.
    pub records: Vec<Record>,
    /// How it went.
    pub stats: LookupStats,
}

impl LookupOutcome {
    /// `FindNode`: true if the target itself answered.
    pub fn found_target(&self) -> bool {
        self.closest.first().is_some_and(|c| c.id == self.target)
    }
}

/// Why the lookup runs; decides what happens when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Started by the application: report an event.
    User,
    /// Self-lookup of a joining node: then refresh far buckets.
    Join,
    /// Bucket refresh: nothing to report.
    Refresh,
    /// First phase of a put: then STORE to the closest.
    Put(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    InFlight,
    Answered,
    Failed,
    /// Asked, but suspected dead: counted as failed (not in flight, not
    /// among the k closest the lookup waits for) unless it answers.
    Unwaited,
}

impl State {
    /// Failed, or asked without being waited on: out of the running.
    fn out(self) -> bool {
        matches!(self, State::Failed | State::Unwaited)
    }
}

#[derive(Clone, Debug)]
struct Candidate {
    contact: Contact,
    distance: Distance,
    depth: u32,
    state: State,
}

#[derive(Debug)]
pub(crate) struct Lookup {
    pub(crate) target: NodeId,
    pub(crate) kind: LookupKind,
    pub(crate) purpose: Purpose,
    /// Nearest first, unique (distance to the target is unique per ID); bounded
    /// by `max_candidates` (in-flight ones are never dropped).
    ///
    /// No separate "seen" set is needed: a dropped candidate had at least
    /// `max_candidates` closer ones, candidates only leave the list the same
    /// way, so it could never re-enter within the bound.
    candidates: Vec<Candidate>,
    own: NodeId,
    pub(crate) in_flight: usize,
    n_requests: u32,
    n_failed: u32,
    rounds: u32,
    hops: Option<u32>,
    records: Vec<Record>,
    started: Millis,
    max_candidates: usize,
    max_records: usize,
}

impl Lookup {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        target: NodeId,
        kind: LookupKind,
        purpose: Purpose,
        own: &NodeId,
        seeds: Vec<Contact>,
        now: Millis,
        max_candidates: usize,
        max_records: usize,
    ) -> Lookup {
        let mut l = Lookup {
            target,
            kind,
            purpose,
            candidates: Vec::new(),
            own: *own,
            in_flight: 0,
            n_requests: 0,
            n_failed: 0,
            rounds: 0,
            hops: None,
            records: Vec::new(),
            started: now,
            max_candidates,
            max_records,
        };
        l.add(seeds, 0);
        l
    }

    /// Records we hold ourselves count as found in round 0.
    pub(crate) fn add_local_records(&mut self, records: Vec<Record>) {
        if !records.is_empty() {
            self.hops = Some(0);
            self.merge_records(records);
        }
    }

    fn add(&mut self, contacts: Vec<Contact>, depth: u32) {
        for c in contacts {
            if c.id == self.own {
                continue;
            }
            let d = distance(&c.id, &self.target);
            let pos = self.candidates.partition_point(|x| x.distance < d);
            if pos >= self.max_candidates
                || self.candidates.get(pos).is_some_and(|x| x.distance == d)
            {
                continue; // too far to matter, or already known
            }
            if self.kind == LookupKind::FindNode && c.id == self.target && self.hops.is_none() {
                self.hops = Some(depth);
            }
            self.candidates.insert(
                pos,
                Candidate {
                    contact: c,
                    distance: d,
                    depth,
                    state: State::Waiting,
                },
            );
        }
        // Drop the farthest that are not awaiting an answer; in-flight ones stay
        // so that their answers can still be recorded.
        while self.candidates.len() > self.max_candidates {
            match self
                .candidates
                .iter()
                .rposition(|c| c.state != State::InFlight)
            {
                Some(i) => {
                    self.candidates.remove(i);
                }
                None => break,
            }
        }
    }

    fn merge_records(&mut self, records: Vec<Record>) {
        for r in records {
            match self.records.iter().position(|x| x.publisher == r.publisher) {
                Some(i) if self.records[i].seq < r.seq => self.records[i] = r,
                Some(_) => {}
                None if self.records.len() < self.max_records => self.records.push(r),
                None => {}
            }
        }
    }

    /// True when the k closest non-failed candidates have all answered.
    pub(crate) fn is_done(&self, k: usize) -> bool {
        self.candidates
            .iter()
            .filter(|c| !c.state.out())
            .take(k)
            .all(|c| c.state == State::Answered)
    }

    /// The next peer to ask, marked in flight: the nearest waiting candidate
    /// among the k closest non-failed ones, while fewer than `alpha` are in
    /// flight and the request budget lasts.
    pub(crate) fn next(&mut self, alpha: usize, k: usize, max_requests: usize) -> Option<Contact> {
        if self.in_flight >= alpha || self.n_requests as usize >= max_requests {
            return None;
        }
        for c in self
            .candidates
            .iter_mut()
            .filter(|c| !c.state.out())
            .take(k)
        {
            if c.state == State::Waiting {
                c.state = State::InFlight;
                self.in_flight += 1;
                self.n_requests += 1;
                return Some(c.contact.clone());
            }
        }
        None
    }

    /// A retry went out for a peer already in flight.
    pub(crate) fn count_retry(&mut self) {
        self.n_requests += 1;
    }

    /// `from` answered with `closer` contacts and (FIND_VALUE) `records`.
    pub(crate) fn on_answer(&mut self, from: &NodeId, closer: Vec<Contact>, records: Vec<Record>) {
        let Some(c) = self.candidates.iter_mut().find(|c| c.contact.id == *from) else {
            return;
        };
        match c.state {
            State::InFlight => self.in_flight -= 1,
            // A suspect that answered after all: its answer counts.
            State::Unwaited => {}
            _ => return,
        }
        c.state = State::Answered;
        let depth = c.depth;
        self.rounds = self.rounds.max(depth + 1);
        if !records.is_empty() {
            if self.hops.is_none() {
                self.hops = Some(depth + 1);
            }
            self.merge_records(records);
        }
        self.add(closer, depth + 1);
    }

    /// `from` did not answer (after the retry) or answered nonsense.
    pub(crate) fn on_failure(&mut self, from: &NodeId) {
        if let Some(c) = self.candidates.iter_mut().find(|c| c.contact.id == *from) {
            match c.state {
                State::InFlight => {
                    c.state = State::Failed;
                    self.in_flight -= 1;
                    self.n_failed += 1;
                }
                State::Unwaited => c.state = State::Failed,
                _ => {}
            }
        }
    }

    /// `from`, just taken by [`Lookup::next`], is suspected dead: its request
    /// goes out, but the lookup goes on as if it had failed (the next
    /// candidate takes its slot, termination does not wait for it). An
    /// answer still counts.
    pub(crate) fn not_waited(&mut self, from: &NodeId) {
        if let Some(c) = self.candidates.iter_mut().find(|c| c.contact.id == *from) {
            if c.state == State::InFlight {
                c.state = State::Unwaited;
                self.in_flight -= 1;
                self.n_failed += 1;
            }
        }
    }

    pub(crate) fn finish(self, k: usize, now: Millis) -> LookupOutcome {
        let closest = self
            .candidates
            .iter()
            .filter(|c| c.state == State::Answered)
            .take(k)
            .map(|c| c.contact.clone())
            .collect();
        LookupOutcome {
            target: self.target,
            kind: self.kind,
            closest,
            records: self.records,
            stats: LookupStats {
                rounds: self.rounds,
                hops: self.hops,
                n_requests: self.n_requests,
                n_failed: self.n_failed,
                started: self.started,
                finished: now,
            },
        }
    }
}
