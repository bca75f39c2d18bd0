//! Per-publisher ordering and duplicate suppression on the receiving side.
//!
//! Every publisher numbers its messages 1, 2, 3, ... within an *epoch*, a
//! number it raises each time it restarts (so a restarted publisher starting
//! again at 1 is not mistaken for a replay). The receiver remembers, per
//! publisher, the epoch and the highest sequence number delivered, and
//! classifies each arrival. Order is kept by never delivering anything older
//! than what was already delivered: a late arrival after a gap is dropped as
//! a duplicate (its loss was already reported with the gap).
//!
//! It must not buffer or reorder messages (delivery stays in arrival order, so
//! memory is one small entry per publisher), do I/O or read a clock. The
//! number of publishers remembered is bounded; the least recently heard one
//! is forgotten first (see [`SeqTracker`] for what that costs).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use crate::Limits;

/// Publishers remembered per tracker. A publisher is one entry of a few words,
/// so this is generous; past it the least recently heard publisher is
/// forgotten, which costs at most re-accepting its old duplicates once.
pub const MAX_PUBLISHERS: usize = 65_536;

/// What to do with one arrival. Not `#[non_exhaustive]` on purpose: a new
/// outcome must make every caller's `match` fail to compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Deliver: the next in sequence, or the first message seen from this
    /// publisher (a subscriber is owed nothing from before it first heard one).
    Next,
    /// Deliver, and tell the subscriber that `missing` earlier messages of
    /// this epoch were lost.
    Gap { missing: u64 },
    /// Deliver: the publisher restarted (higher epoch). `missing` counts the
    /// messages of the new epoch before this one that never arrived
    /// (`seq - 1`), so a loss right after a restart is not silent.
    Restarted { missing: u64 },
    /// Drop: already delivered, older than something delivered, or from an
    /// older epoch.
    Duplicate,
    /// Drop: sequence number 0, which no correct publisher sends. The caller
    /// may penalise the sender.
    Invalid,
}

/// Counters, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqStats {
    /// Arrivals classified `Next`.
    pub n_next: u64,
    /// Arrivals classified `Gap`.
    pub n_gaps: u64,
    /// Messages reported missing by `Gap` and `Restarted`.
    pub n_missing: u64,
    /// Arrivals classified `Restarted`.
    pub n_restarts: u64,
    /// Arrivals classified `Duplicate`.
    pub n_duplicates: u64,
    /// Arrivals classified `Invalid`.
    pub n_invalid: u64,
    /// Publishers forgotten to stay within the limit.
    pub n_evicted: u64,
}

impl SeqStats {
    fn count(&mut self, outcome: Observed) {
        match outcome {
            Observed::Next => self.n_next += 1,
            Observed::Gap { missing } => {
                self.n_gaps += 1;
                self.n_missing += missing;
            }
            Observed::Restarted { missing } => {
                self.n_restarts += 1;
                self.n_missing += missing;
            }
            Observed::Duplicate => self.n_duplicates += 1,
            Observed::Invalid => self.n_invalid += 1,
        }
    }
}

/// Classifies `seq` (non-zero) against a known publisher's entry.
fn step(entry: &mut Entry, epoch: u64, seq: u64) -> Observed {
    if epoch < entry.epoch || (epoch == entry.epoch && seq <= entry.last_seq) {
        Observed::Duplicate
    } else if epoch > entry.epoch {
        entry.epoch = epoch;
        entry.last_seq = seq;
        Observed::Restarted { missing: seq - 1 }
    } else if seq == entry.last_seq + 1 {
        entry.last_seq = seq;
        Observed::Next
    } else {
        let missing = seq - entry.last_seq - 1;
        entry.last_seq = seq;
        Observed::Gap { missing }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    epoch: u64,
    /// Highest sequence number delivered in `epoch`.
    last_seq: u64,
    /// Position in the recency order (a logical tick, not time).
    tick: u64,
}

/// Tracks the sequence of each publisher, keyed by `K` (a node ID, or a
/// node ID plus a stream ID).
///
/// Bounded: at most `max_publishers` are remembered, least recently heard
/// evicted first. An evicted publisher is treated as new when heard again:
/// its next message is `Next`, so a duplicate still in flight from before the
/// eviction could be delivered once more. The `n_evicted` counter shows when
/// the limit is too low.
#[derive(Clone, Debug)]
pub struct SeqTracker<K> {
    max_publishers: usize,
    entries: HashMap<K, Entry>,
    /// tick -> publisher, oldest first; exactly mirrors `entries`.
    recency: BTreeMap<u64, K>,
    next_tick: u64,
    stats: SeqStats,
}

impl<K: Clone + Eq + Hash> Default for SeqTracker<K> {
    fn default() -> Self {
        Self::new(MAX_PUBLISHERS)
    }
}

impl<K: Clone + Eq + Hash> SeqTracker<K> {
    /// A tracker remembering at most `max_publishers` (at least 1 is used).
    pub fn new(max_publishers: usize) -> Self {
        SeqTracker {
            max_publishers: max_publishers.max(1),
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            next_tick: 0,
            stats: SeqStats::default(),
        }
    }

    /// A tracker sized by [`Limits::max_publishers`].
    pub fn with_limits(limits: &Limits) -> Self {
        Self::new(limits.max_publishers)
    }

    /// Classifies message `seq` of `publisher`'s `epoch` and records it.
    pub fn observe(&mut self, publisher: &K, epoch: u64, seq: u64) -> Observed {
        let outcome = self.classify(publisher, epoch, seq);
        self.stats.count(outcome);
        outcome
    }

    fn classify(&mut self, publisher: &K, epoch: u64, seq: u64) -> Observed {
        if seq == 0 {
            return Observed::Invalid;
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        let Some(entry) = self.entries.get_mut(publisher) else {
            self.admit(
                publisher.clone(),
                Entry {
                    epoch,
                    last_seq: seq,
                    tick,
                },
            );
            return Observed::Next;
        };
        let outcome = step(entry, epoch, seq);
        // Any arrival, duplicates included, shows the publisher is alive.
        let old_tick = std::mem::replace(&mut entry.tick, tick);
        self.recency.remove(&old_tick);
        self.recency.insert(tick, publisher.clone());
        outcome
    }

    /// Classifies a run of messages of one publisher, exactly as `observe`
    /// called once per `seq` would (outcomes, state and stats), but finds the
    /// publisher's entry and updates the recency order once for the run:
    /// what a receiver does with a batch. `each` gets the outcomes in order.
    pub fn observe_batch(
        &mut self,
        publisher: &K,
        epoch: u64,
        seqs: impl IntoIterator<Item = u64>,
        mut each: impl FnMut(Observed),
    ) {
        let mut seqs = seqs.into_iter();
        // The first arrival may admit (or evict): the general path.
        let Some(first) = seqs.next() else { return };
        each(self.observe(publisher, epoch, first));
        let tick = self.next_tick;
        let Some(entry) = self.entries.get_mut(publisher) else {
            // seq 0 is Invalid and not admitted: the rest one by one.
            for seq in seqs {
                each(self.observe(publisher, epoch, seq));
            }
            return;
        };
        let mut touched = false;
        for seq in seqs {
            let outcome = if seq == 0 {
                Observed::Invalid
            } else {
                touched = true;
                step(entry, epoch, seq)
            };
            self.stats.count(outcome);
            each(outcome);
        }
        if touched {
            // One tick for the run: it only orders publishers by recency,
            // and this one is now the most recent either way.
            let last = tick;
            self.next_tick += 1;
            let old = std::mem::replace(&mut entry.tick, last);
            self.recency.remove(&old);
            self.recency.insert(last, publisher.clone());
        }
    }

    fn admit(&mut self, publisher: K, entry: Entry) {
        while self.entries.len() >= self.max_publishers {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
            self.stats.n_evicted += 1;
        }
        self.recency.insert(entry.tick, publisher.clone());
        self.entries.insert(publisher, entry);
    }

    /// Forgets `publisher` (for example when it has unsubscribed from
    /// everything or left the mesh). Returns whether it was remembered.
    pub fn forget(&mut self, publisher: &K) -> bool {
        match self.entries.remove(publisher) {
            Some(entry) => {
                self.recency.remove(&entry.tick);
                true
            }
            None => false,
        }
    }

    /// Publishers currently remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no publisher is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Counters since creation.
    pub fn stats(&self) -> SeqStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observed::*;

    /// Feeds `(publisher, epoch, seq)` arrivals to a fresh tracker and checks
    /// each outcome.
    #[track_caller]
    fn check(max_publishers: usize, arrivals: &[(char, u64, u64, Observed)]) -> SeqTracker<char> {
        let mut tracker = SeqTracker::new(max_publishers);
        for (i, &(publisher, epoch, seq, expected)) in arrivals.iter().enumerate() {
            assert_eq!(
                tracker.observe(&publisher, epoch, seq),
                expected,
                "arrival {i}: {publisher} epoch {epoch} seq {seq}"
            );
        }
        tracker
    }

    #[test]
    fn emptiness_follows_what_is_remembered() {
        let mut t: SeqTracker<char> = SeqTracker::new(8);
        assert!(t.is_empty());
        t.observe(&'a', 0, 1);
        assert!(!t.is_empty());
        assert_eq!(t.len(), 1);
        assert!(t.forget(&'a'));
        assert!(t.is_empty());
    }

    #[test]
    fn in_order_is_next() {
        check(
            8,
            &[('a', 0, 1, Next), ('a', 0, 2, Next), ('a', 0, 3, Next)],
        );
    }

    #[test]
    fn first_contact_mid_stream_is_next() {
        check(8, &[('a', 3, 500, Next), ('a', 3, 501, Next)]);
    }

    #[test]
    fn repeats_and_older_are_duplicates() {
        check(
            8,
            &[
                ('a', 0, 1, Next),
                ('a', 0, 2, Next),
                ('a', 0, 2, Duplicate),
                ('a', 0, 1, Duplicate),
            ],
        );
    }

    #[test]
    fn gaps_are_reported_and_late_arrivals_dropped() {
        let t = check(
            8,
            &[
                ('a', 0, 1, Next),
                ('a', 0, 4, Gap { missing: 2 }),
                ('a', 0, 3, Duplicate),
                ('a', 0, 5, Next),
            ],
        );
        let s = t.stats();
        assert_eq!(
            (s.n_next, s.n_gaps, s.n_missing, s.n_duplicates),
            (2, 1, 2, 1)
        );
    }

    #[test]
    fn higher_epoch_is_a_restart_and_older_epochs_are_stale() {
        let t = check(
            8,
            &[
                ('a', 1, 7, Next),
                ('a', 2, 1, Restarted { missing: 0 }),
                ('a', 2, 2, Next),
                ('a', 1, 8, Duplicate),
                ('a', 5, 4, Restarted { missing: 3 }),
                ('a', 5, 6, Gap { missing: 1 }),
            ],
        );
        let s = t.stats();
        assert_eq!((s.n_restarts, s.n_missing, s.n_duplicates), (2, 4, 1));
    }

    #[test]
    fn sequence_zero_is_invalid_and_changes_nothing() {
        let t = check(
            8,
            &[
                ('a', 0, 0, Invalid),
                ('a', 0, 1, Next),
                ('a', 0, 0, Invalid),
                ('a', 0, 2, Next),
            ],
        );
        assert_eq!(t.stats().n_invalid, 2);
    }

    #[test]
    fn publishers_are_independent() {
        check(
            8,
            &[
                ('a', 0, 1, Next),
                ('b', 0, 1, Next),
                ('a', 0, 2, Next),
                ('b', 0, 1, Duplicate),
                ('b', 0, 3, Gap { missing: 1 }),
            ],
        );
    }

    #[test]
    fn extreme_sequence_numbers() {
        check(
            8,
            &[
                ('a', 0, 1, Next),
                (
                    'a',
                    0,
                    u64::MAX,
                    Gap {
                        missing: u64::MAX - 2,
                    },
                ),
                ('a', 0, u64::MAX, Duplicate),
            ],
        );
    }

    #[test]
    fn least_recently_heard_publisher_is_evicted() {
        let t = check(
            2,
            &[
                ('a', 0, 1, Next),
                ('b', 0, 1, Next),
                // A duplicate still counts as hearing from `a`.
                ('a', 0, 1, Duplicate),
                // `c` evicts `b`, the least recently heard.
                ('c', 0, 1, Next),
                ('a', 0, 2, Next),
                // `b` is new again: its old duplicate is accepted (the
                // documented cost of the bound), and it evicts `c`.
                ('b', 0, 1, Next),
                ('a', 0, 3, Next),
            ],
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.stats().n_evicted, 2);
        assert_eq!(t.recency.len(), t.entries.len());
    }

    #[test]
    fn forget_and_limits() {
        let mut t = SeqTracker::with_limits(&Limits {
            max_publishers: 0,
            ..Default::default()
        });
        assert!(t.is_empty());
        assert_eq!(t.observe(&'a', 0, 1), Next);
        assert_eq!(
            t.observe(&'b', 0, 1),
            Next,
            "a limit of 0 still remembers one"
        );
        assert_eq!(t.len(), 1);
        assert!(t.forget(&'b'));
        assert!(!t.forget(&'b'));
        assert!(t.is_empty());
        assert!(t.recency.is_empty());
        assert_eq!(SeqTracker::<char>::default().max_publishers, MAX_PUBLISHERS);
    }

    #[test]
    fn bounded_under_many_publishers() {
        let mut t = SeqTracker::new(100);
        for p in 0..10_000u32 {
            t.observe(&p, 0, 1);
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.recency.len(), 100);
        assert_eq!(t.stats().n_evicted, 9_900);
    }

    proptest::proptest! {
        /// A batch is classified exactly as the same arrivals one by one.
        #[test]
        fn batch_equals_one_by_one(
            pre in proptest::collection::vec((0u8..3, 0u64..3, 0u64..40), 0..20),
            who in 0u8..4,
            epoch in 0u64..3,
            seqs in proptest::collection::vec(0u64..40, 0..20),
            max in 1usize..4,
        ) {
            let mut a = SeqTracker::new(max);
            let mut b = SeqTracker::new(max);
            for (p, e, s) in &pre {
                a.observe(p, *e, *s);
                b.observe(p, *e, *s);
            }
            let one: Vec<Observed> = seqs.iter().map(|s| a.observe(&who, epoch, *s)).collect();
            let mut batch = Vec::new();
            b.observe_batch(&who, epoch, seqs.iter().copied(), |o| batch.push(o));
            proptest::prop_assert_eq!(one, batch);
            proptest::prop_assert_eq!(a.stats(), b.stats());
            proptest::prop_assert_eq!(a.len(), b.len());
            // Same state afterwards: the same next arrivals classify alike.
            for p in 0u8..4 {
                proptest::prop_assert_eq!(a.observe(&p, epoch, 20), b.observe(&p, epoch, 20));
            }
        }
    }
}
