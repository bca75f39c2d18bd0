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
//!
//! **Several sources.** A lightweight client may receive one publisher's
//! stream through two gateways (sources) at once. Each source's stream is
//! in order and, from its first event on, complete; but a source attached
//! later may run *ahead* of the older one (it is closer to the publisher),
//! and an arrival from it would raise the high-water mark over events the
//! older source still has in flight and the newer one never carried. So a
//! source *joins* a publisher's stream only once it overlaps what was
//! delivered ([`SeqTracker::admit_source`]): until then its arrivals are
//! dropped as copies (the older source delivers them).
//!
//! **Failover gaps.** A gap is normally not a loss: a publisher's `seq`
//! counts its messages on every topic, and a receiver is only sent those it
//! subscribed to. But when a lightweight client lost the last source that
//! carried a publisher's stream, what that publisher sent until another
//! source carried it is lost without a trace (nobody is left to report
//! it). [`SeqTracker::source_gone`] (or [`SeqTracker::watch_all`], when the
//! client cannot tell that another source carried everything) marks those
//! publishers; [`SeqTracker::settle`] turns the first delivered arrival of
//! each through another source into the count of sequence numbers skipped,
//! which the client reports as `Lagged`: exact when the client subscribes
//! to every topic the publisher publishes on, an upper bound otherwise.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use crate::Limits;

/// Sources (the gateways a client lost) remembered as gone at once; past
/// this the oldest is forgotten (its late arrivals would then settle a
/// watch early, see [`SeqTracker::settle`]).
pub const MAX_GONE_SOURCES: usize = 8;

/// Sources tracked per publisher stream (joined or waiting to join); past
/// this the oldest waiting one is forgotten (a client has two gateways).
pub const MAX_SOURCES: usize = 4;

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
    /// Failover watches settled (see [`SeqTracker::settle`]).
    pub n_watch_settled: u64,
    /// Sequence numbers skipped across failovers: what settled watches
    /// reported as possibly lost.
    pub n_watch_missing: u64,
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
    /// Under a failover watch: the next delivered arrival through a source
    /// that is not gone is checked for a gap ([`SeqTracker::settle`]).
    watch: bool,
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
    /// Entries with `watch` set.
    n_watched: usize,
    /// Sources lost (oldest first, at most `MAX_GONE_SOURCES`) until they
    /// come back ([`SeqTracker::source_up`]).
    gone: Vec<K>,
    /// Per publisher fed through several sources (a client's gateways):
    /// which have joined its stream, which wait to (see the module docs).
    /// Only [`SeqTracker::admit_source`] fills it; bounded with `entries`.
    streams: HashMap<K, Streams<K>>,
}

/// The sources of one publisher's stream.
#[derive(Clone, Debug)]
struct Streams<K> {
    /// Sources whose stream overlaps what was delivered.
    joined: Vec<K>,
    /// Sources heard from that have not joined: `(source, epoch, highest
    /// seq of their runs dropped so far)`.
    waiting: Vec<(K, u64, u64)>,
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
            n_watched: 0,
            gone: Vec::new(),
            streams: HashMap::new(),
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
                    watch: false,
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
            if self.entries.remove(&oldest).is_some_and(|e| e.watch) {
                self.unwatched();
            }
            self.streams.remove(&oldest);
            self.stats.n_evicted += 1;
        }
        self.recency.insert(entry.tick, publisher.clone());
        self.entries.insert(publisher, entry);
    }

    /// Forgets `publisher` (for example when it has unsubscribed from
    /// everything or left the mesh). Returns whether it was remembered.
    pub fn forget(&mut self, publisher: &K) -> bool {
        self.streams.remove(publisher);
        match self.entries.remove(publisher) {
            Some(entry) => {
                self.recency.remove(&entry.tick);
                if entry.watch {
                    self.unwatched();
                }
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

    /// Whether a run of `publisher`'s `epoch` through `source`, seqs
    /// `first..=last`, may be observed (a receiver fed through several
    /// sources carrying the same stream: a client's gateways). `false`:
    /// `source` has not joined the stream yet (it runs ahead of what was
    /// delivered, and an older source may still carry events in between):
    /// drop the run as copies, observing nothing; the older source delivers
    /// them. A source joins when a run of it overlaps or continues what was
    /// delivered (`first` at most one past the last delivered seq), when
    /// every run of it dropped so far has been delivered through the others
    /// (its next run then continues its own complete stream), or when no
    /// joined source is left ([`SeqTracker::source_gone`]). A publisher
    /// heard first through `source` (or restarted there) is joined by it.
    /// A source that is gone is admitted without joining (what it sent
    /// before it went is in order with what it delivered).
    pub fn admit_source(
        &mut self,
        publisher: &K,
        source: &K,
        epoch: u64,
        first: u64,
        last: u64,
    ) -> bool {
        if first == 0 || self.gone.contains(source) {
            // Invalid (classified so), or in order with what it delivered.
            return true;
        }
        let Some(&Entry {
            epoch: e, last_seq, ..
        }) = self.entries.get(publisher)
        else {
            self.streams.insert(
                publisher.clone(),
                Streams {
                    joined: vec![source.clone()],
                    waiting: Vec::new(),
                },
            );
            return true;
        };
        let st = self
            .streams
            .entry(publisher.clone())
            .or_insert_with(|| Streams {
                joined: Vec::new(),
                waiting: Vec::new(),
            });
        if epoch < e || st.joined.contains(source) {
            // Stale (classified as duplicates), or joined.
            return true;
        }
        let waited = st
            .waiting
            .iter()
            .position(|w| &w.0 == source && w.1 == epoch);
        let caught_up = waited.is_some_and(|i| st.waiting[i].2 <= last_seq);
        let joins =
            st.joined.is_empty() || epoch > e || first <= last_seq.saturating_add(1) || caught_up;
        if !joins {
            match waited {
                Some(i) => st.waiting[i].2 = st.waiting[i].2.max(last),
                None => {
                    st.waiting.retain(|w| &w.0 != source);
                    if st.waiting.len() >= MAX_SOURCES {
                        st.waiting.remove(0);
                    }
                    st.waiting.push((source.clone(), epoch, last));
                }
            }
            return false;
        }
        st.waiting.retain(|w| &w.0 != source);
        if epoch > e {
            // A new run of the publisher: the sources join it afresh.
            st.joined.clear();
        }
        if st.joined.len() >= MAX_SOURCES {
            st.joined.remove(0);
        }
        st.joined.push(source.clone());
        true
    }

    /// `source` is gone (a client lost that gateway): it leaves every
    /// publisher's stream, and a publisher left with no joined source is
    /// watched (the gap before its next delivered arrival through another
    /// source is what [`SeqTracker::settle`] reports). Arrivals still read
    /// from `source`'s connection settle nothing, until it comes back
    /// ([`SeqTracker::source_up`]).
    pub fn source_gone(&mut self, source: K) {
        self.remember_gone(source.clone());
        for (publisher, st) in self.streams.iter_mut() {
            st.waiting.retain(|w| w.0 != source);
            let had = st.joined.len();
            st.joined.retain(|j| *j != source);
            if had > 0 && st.joined.is_empty() {
                if let Some(e) = self.entries.get_mut(publisher).filter(|e| !e.watch) {
                    e.watch = true;
                    self.n_watched += 1;
                }
            }
        }
    }

    /// `source` (a gateway lost earlier) is a source again.
    pub fn source_up(&mut self, source: &K) {
        self.gone.retain(|g| g != source);
    }

    fn remember_gone(&mut self, source: K) {
        if !self.gone.contains(&source) {
            if self.gone.len() >= MAX_GONE_SOURCES {
                self.gone.remove(0);
            }
            self.gone.push(source);
        }
    }

    /// [`SeqTracker::source_gone`], and every publisher remembered now is
    /// watched: the receiver cannot tell that another source carried every
    /// event `gone` did (a client whose other gateway had only just taken
    /// its subscriptions). Publishers first heard after this call are owed
    /// nothing, as always.
    pub fn watch_all(&mut self, gone: K) {
        self.source_gone(gone);
        for e in self.entries.values_mut() {
            e.watch = true;
        }
        self.n_watched = self.entries.len();
    }

    /// Whether `publisher` is under a failover watch.
    pub fn is_watched(&self, publisher: &K) -> bool {
        self.entries.get(publisher).is_some_and(|e| e.watch)
    }

    /// Publishers under a failover watch.
    pub fn n_watched(&self) -> usize {
        self.n_watched
    }

    /// `outcome` is what [`SeqTracker::observe`] (or the first delivered
    /// arrival of an [`SeqTracker::observe_batch`] run) answered for
    /// `publisher`'s arrival through `source`. When that publisher is
    /// watched, the arrival is delivered (`Next`, `Gap`, `Restarted`) and
    /// `source` is not gone, the watch ends: returns the sequence numbers
    /// skipped before it (`Gap`/`Restarted` `missing`, 0 for `Next`), which
    /// the receiver reports as possibly lost. `None` otherwise (not watched,
    /// a duplicate, or read late from a gone source: still watched).
    pub fn settle(&mut self, publisher: &K, source: &K, outcome: Observed) -> Option<u64> {
        let missing = match outcome {
            Observed::Next => 0,
            Observed::Gap { missing } | Observed::Restarted { missing } => missing,
            Observed::Duplicate | Observed::Invalid => return None,
        };
        if self.gone.contains(source) {
            return None;
        }
        let entry = self.entries.get_mut(publisher).filter(|e| e.watch)?;
        entry.watch = false;
        self.unwatched();
        self.stats.n_watch_settled += 1;
        self.stats.n_watch_missing += missing;
        Some(missing)
    }

    /// One watched entry fewer.
    fn unwatched(&mut self) {
        self.n_watched = self.n_watched.saturating_sub(1);
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

    /// A client's failover, one publisher `a` on one topic: 1..=3 came
    /// through gateway `G`, which died; 4..=6 were lost; 7.. come through
    /// gateway `H`. The watch reports exactly the 3 skipped.
    #[test]
    fn a_watch_reports_the_gap_of_the_first_arrival_after_a_failover() {
        let mut t = SeqTracker::new(8);
        for seq in 1..=3 {
            assert_eq!(t.observe(&'a', 1, seq), Next);
        }
        t.observe(&'b', 1, 10);
        t.watch_all('G');
        assert!(t.is_watched(&'a') && t.is_watched(&'b'));
        assert_eq!(t.n_watched(), 2);
        let o = t.observe(&'a', 1, 7);
        assert_eq!(o, Gap { missing: 3 });
        assert_eq!(t.settle(&'a', &'H', o), Some(3));
        assert!(!t.is_watched(&'a'), "settled once");
        let o = t.observe(&'a', 1, 9);
        assert_eq!(t.settle(&'a', &'H', o), None, "later gaps are not losses");
        // `b` resumes in sequence: settled, nothing lost.
        let o = t.observe(&'b', 1, 11);
        assert_eq!(t.settle(&'b', &'H', o), Some(0));
        assert_eq!(t.n_watched(), 0);
        let s = t.stats();
        assert_eq!((s.n_watch_settled, s.n_watch_missing), (2, 3));
    }

    #[test]
    fn late_arrivals_from_the_lost_gateway_and_duplicates_settle_nothing() {
        let mut t = SeqTracker::new(8);
        t.observe(&'a', 1, 1);
        t.watch_all('G');
        // Read late from G's connection: delivered, but the watch stays.
        let o = t.observe(&'a', 1, 2);
        assert_eq!(t.settle(&'a', &'G', o), None);
        assert!(t.is_watched(&'a'));
        // H repeats what G delivered: a duplicate settles nothing.
        let o = t.observe(&'a', 1, 2);
        assert_eq!(o, Duplicate);
        assert_eq!(t.settle(&'a', &'H', o), None);
        let o = t.observe(&'a', 1, 0);
        assert_eq!(t.settle(&'a', &'H', o), None, "invalid");
        // The first new one through H: 3 and 4 were skipped.
        let o = t.observe(&'a', 1, 5);
        assert_eq!(t.settle(&'a', &'H', o), Some(2));
    }

    #[test]
    fn a_publisher_that_restarted_during_the_failover_reports_its_new_run() {
        let mut t = SeqTracker::new(8);
        t.observe(&'a', 1, 50);
        t.watch_all('G');
        let o = t.observe(&'a', 2, 4);
        assert_eq!(t.settle(&'a', &'H', o), Some(3));
    }

    #[test]
    fn publishers_first_heard_after_the_failover_are_not_watched() {
        let mut t = SeqTracker::new(8);
        t.watch_all('G');
        assert_eq!(t.n_watched(), 0);
        let o = t.observe(&'a', 1, 40);
        assert_eq!(t.settle(&'a', &'G', o), None);
        assert!(!t.is_watched(&'a'));
    }

    #[test]
    fn watches_end_with_their_publishers_and_gone_sources_are_bounded() {
        let mut t = SeqTracker::new(2);
        t.observe(&'a', 1, 1);
        t.observe(&'b', 1, 1);
        for g in 0..20u8 {
            t.watch_all(char::from(b'A' + g));
        }
        assert_eq!(t.gone.len(), MAX_GONE_SOURCES);
        assert_eq!(t.n_watched(), 2);
        // `c` evicts `a` (watched), `forget` ends `b`'s watch.
        t.observe(&'c', 1, 1);
        assert_eq!(t.n_watched(), 1);
        assert!(t.forget(&'b'));
        assert_eq!(t.n_watched(), 0);
        // Gone sources are forgotten when they come back.
        for g in 0..20u8 {
            t.source_up(&char::from(b'A' + g));
        }
        assert!(t.gone.is_empty());
        // A second failover before the first settled: both gone sources
        // are ignored, every publisher watched again.
        t.observe(&'d', 1, 1);
        t.watch_all('G');
        let o = t.observe(&'c', 1, 2);
        assert_eq!(t.settle(&'c', &'H', o), Some(0));
        t.watch_all('H');
        assert_eq!(t.n_watched(), 2);
        let o = t.observe(&'c', 1, 5);
        assert_eq!(t.settle(&'c', &'G', o), None);
        assert_eq!(t.settle(&'c', &'H', o), None);
        let o = t.observe(&'c', 1, 6);
        assert_eq!(t.settle(&'c', &'K', o), Some(0));
    }

    /// Observes one run through `admit_source` + `observe`, as a client's
    /// receiver does: the outcomes, or `None` when the run was dropped.
    fn run(t: &mut SeqTracker<char>, p: char, src: char, seqs: &[u64]) -> Option<Vec<Observed>> {
        if !t.admit_source(&p, &src, 1, seqs[0], seqs[seqs.len() - 1]) {
            return None;
        }
        Some(seqs.iter().map(|&s| t.observe(&p, 1, s)).collect())
    }

    /// The failure mode this guards against: gateway `N`, attached later and
    /// closer to the publisher, runs ahead of `O`, which still has 5..=7 in
    /// flight. Were `N`'s 8 accepted, `O`'s 5..=7 would be dropped as old.
    #[test]
    fn a_source_that_runs_ahead_joins_only_once_the_stream_caught_up() {
        let mut t = SeqTracker::new(8);
        assert_eq!(run(&mut t, 'p', 'O', &[1, 2, 3, 4]), Some(vec![Next; 4]));
        assert_eq!(
            run(&mut t, 'p', 'N', &[8, 9]),
            None,
            "ahead of what O delivered"
        );
        assert_eq!(run(&mut t, 'p', 'O', &[5, 6, 7]), Some(vec![Next; 3]));
        // Still ahead: O has not delivered N's 8 and 9 yet.
        assert_eq!(run(&mut t, 'p', 'N', &[10]), None);
        assert_eq!(run(&mut t, 'p', 'O', &[8, 9, 10]), Some(vec![Next; 3]));
        // Everything N carried was delivered: N's next run (ahead, after a
        // normal gap) continues its own complete stream. N joins; O and N
        // are plain copies from now on.
        assert_eq!(run(&mut t, 'p', 'N', &[12]), Some(vec![Gap { missing: 1 }]));
        assert_eq!(
            run(&mut t, 'p', 'O', &[12, 13]),
            Some(vec![Duplicate, Next])
        );
        assert_eq!(
            run(&mut t, 'p', 'N', &[13, 14]),
            Some(vec![Duplicate, Next])
        );
    }

    #[test]
    fn an_overlapping_source_joins_at_once() {
        let mut t = SeqTracker::new(8);
        run(&mut t, 'p', 'O', &[1, 2, 3]);
        assert_eq!(run(&mut t, 'p', 'N', &[3, 4]), Some(vec![Duplicate, Next]));
        assert_eq!(run(&mut t, 'p', 'N', &[9]), Some(vec![Gap { missing: 4 }]));
        // A publisher heard first through N is N's to deliver.
        assert_eq!(run(&mut t, 'q', 'N', &[40]), Some(vec![Next]));
    }

    #[test]
    fn when_the_only_joined_source_goes_the_waiting_one_joins_and_the_gap_is_told() {
        let mut t = SeqTracker::new(8);
        run(&mut t, 'p', 'O', &[1, 2, 3]);
        assert_eq!(run(&mut t, 'p', 'N', &[8]), None);
        // O dies with 4..=7 in flight: they are lost; N takes over.
        t.source_gone('O');
        assert!(t.is_watched(&'p'), "no joined source left");
        // A late frame from O is delivered (in order) but settles nothing.
        let out = run(&mut t, 'p', 'O', &[4]).unwrap();
        assert_eq!(t.settle(&'p', &'O', out[0]), None);
        let out = run(&mut t, 'p', 'N', &[9]).unwrap();
        assert_eq!(out, [Gap { missing: 4 }]);
        assert_eq!(t.settle(&'p', &'N', out[0]), Some(4));
        // O comes back later as a source like any other.
        t.source_up(&'O');
        assert_eq!(run(&mut t, 'p', 'O', &[20]), None);
    }

    #[test]
    fn a_publisher_still_carried_by_another_source_is_not_watched() {
        let mut t = SeqTracker::new(8);
        run(&mut t, 'p', 'O', &[1, 2]);
        run(&mut t, 'p', 'N', &[2, 3]);
        t.source_gone('O');
        assert!(!t.is_watched(&'p'), "N carried every event O did");
        assert_eq!(run(&mut t, 'p', 'N', &[4]), Some(vec![Next]));
    }

    #[test]
    fn a_restarted_publisher_is_joined_afresh() {
        let mut t = SeqTracker::new(8);
        run(&mut t, 'p', 'O', &[1, 2]);
        // N is first with the new run (epoch 2): it joins; O joins the new
        // run when it overlaps.
        assert!(t.admit_source(&'p', &'N', 2, 1, 1));
        assert_eq!(t.observe(&'p', 2, 1), Restarted { missing: 0 });
        assert!(t.admit_source(&'p', &'O', 2, 1, 1));
        assert_eq!(t.observe(&'p', 2, 1), Duplicate);
        // The old run from a source that lags: stale, classified so.
        assert!(t.admit_source(&'p', &'O', 1, 3, 3));
        assert_eq!(t.observe(&'p', 1, 3), Duplicate);
    }

    #[test]
    fn sources_per_stream_are_bounded_and_forgotten_with_their_publisher() {
        let mut t = SeqTracker::new(2);
        run(&mut t, 'p', 'O', &[1]);
        for (i, src) in ['a', 'b', 'c', 'd', 'e', 'f'].into_iter().enumerate() {
            assert_eq!(run(&mut t, 'p', src, &[10 + i as u64]), None);
        }
        assert_eq!(t.streams[&'p'].waiting.len(), MAX_SOURCES);
        // A seq-0 run for a new publisher creates nothing.
        assert!(t.admit_source(&'z', &'O', 1, 0, 0));
        assert!(!t.streams.contains_key(&'z'));
        run(&mut t, 'q', 'O', &[1]);
        run(&mut t, 'r', 'O', &[1]);
        assert!(!t.streams.contains_key(&'p'), "evicted with its entry");
        assert!(t.forget(&'q'));
        assert!(!t.streams.contains_key(&'q'));
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
