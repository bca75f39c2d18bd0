//! The messages a stream holds, as runs: consecutive sequences with one
//! subject, one size and one timestamp are one 32-byte [`Run`], not an
//! entry per message. A stream filled in bursts (many messages per
//! millisecond on a subject) holds a million messages in a few thousand
//! runs, and a restart loads its index without touching a per-message
//! entry. Worst case (every message its own run: alternating subjects or
//! sizes, or one message per millisecond) is 32 bytes a message.
//!
//! Removing a message trims its run at either end, marks a run of one
//! dead, or splits the run in two (reusing a dead neighbour's slot when
//! there is one). Dead runs at either end are dropped at once; the rest
//! are compacted away once they outnumber the live ones (past
//! [`COMPACT_AFTER`]).

use std::collections::VecDeque;

/// A subject id meaning "this run was removed".
pub(crate) const DEAD: u32 = u32::MAX;
/// Dead runs kept before the index may compact (and only when they
/// outnumber the live ones).
pub(crate) const COMPACT_AFTER: usize = 1024;

/// One stored message, as the index knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub seq: u64,
    pub ts: u64,
    pub size: u32,
    pub subject: u32,
}

/// `len` messages from `seq` on, all with this timestamp, size and
/// subject (32 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub seq: u64,
    pub ts: u64,
    pub len: u32,
    pub size: u32,
    pub subject: u32,
}

impl Run {
    fn live(&self) -> bool {
        self.subject != DEAD
    }

    /// One past its last sequence.
    fn end(&self) -> u64 {
        self.seq + u64::from(self.len)
    }

    fn entry(&self, seq: u64) -> Entry {
        Entry {
            seq,
            ts: self.ts,
            size: self.size,
            subject: self.subject,
        }
    }
}

/// The runs, ascending by sequence (and so by timestamp).
#[derive(Debug, Default)]
pub(crate) struct Index {
    runs: VecDeque<Run>,
    /// Dead runs among `runs` (never at either end).
    dead: usize,
}

impl Index {
    /// The run holding `seq` (live or dead), if any.
    fn run_of(&self, seq: u64) -> Option<usize> {
        let i = self.runs.partition_point(|r| r.end() <= seq);
        (self.runs.get(i)?.seq <= seq).then_some(i)
    }

    /// The last sequence held (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.runs.back().map_or(0, |r| r.end() - 1)
    }

    /// Adds a message after every one held (`seq` above [`Index::last_seq`]:
    /// the caller checks): it extends the last run when it continues it.
    pub fn push(&mut self, e: Entry) {
        self.push_run(Run {
            seq: e.seq,
            ts: e.ts,
            len: 1,
            size: e.size,
            subject: e.subject,
        });
    }

    /// Adds a run after every message held (a snapshot's; the caller checks
    /// the order and that `len` is not 0).
    pub fn push_run(&mut self, r: Run) {
        if let Some(b) = self.runs.back_mut() {
            if b.live()
                && b.end() == r.seq
                && b.ts == r.ts
                && b.size == r.size
                && b.subject == r.subject
                && u64::from(b.len) + u64::from(r.len) <= u64::from(u32::MAX)
            {
                b.len += r.len;
                return;
            }
        }
        self.runs.push_back(r);
    }

    /// Room for `n` more runs.
    pub fn reserve(&mut self, n: usize) {
        self.runs.reserve(n);
    }

    /// A held message.
    pub fn get(&self, seq: u64) -> Option<Entry> {
        let r = &self.runs[self.run_of(seq)?];
        r.live().then(|| r.entry(seq))
    }

    /// The first message held.
    pub fn first(&self) -> Option<Entry> {
        self.runs.iter().find(|r| r.live()).map(|r| r.entry(r.seq))
    }

    /// Messages with a sequence of at least `seq`, ascending.
    pub fn iter_from(&self, seq: u64) -> impl DoubleEndedIterator<Item = Entry> + '_ {
        let i = self.runs.partition_point(|r| r.end() <= seq);
        self.runs
            .range(i..)
            .filter(|r| r.live())
            .flat_map(move |r| (r.seq.max(seq)..r.end()).map(move |s| r.entry(s)))
    }

    /// The sequence of the first message with a timestamp of at least `t`.
    pub fn seq_at_time(&self, t: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.ts < t);
        self.runs.range(i..).find(|r| r.live()).map(|r| r.seq)
    }

    /// Removes a held message; what it was.
    pub fn remove(&mut self, seq: u64) -> Option<Entry> {
        let i = self.run_of(seq)?;
        let r = self.runs[i];
        if !r.live() {
            return None;
        }
        let e = r.entry(seq);
        if r.len == 1 {
            self.runs[i].subject = DEAD;
            self.dead += 1;
        } else if seq == r.seq {
            let run = &mut self.runs[i];
            run.seq += 1;
            run.len -= 1;
        } else if seq == r.end() - 1 {
            self.runs[i].len -= 1;
        } else {
            // Split: the head keeps slot i, the tail takes a dead
            // neighbour's slot after it, or a new one.
            let head = u32::try_from(seq - r.seq).unwrap_or(u32::MAX);
            let tail = Run {
                seq: seq + 1,
                len: r.len - head - 1,
                ..r
            };
            self.runs[i].len = head;
            match self.runs.get_mut(i + 1) {
                Some(next) if !next.live() => {
                    *next = tail;
                    self.dead -= 1;
                }
                _ => self.runs.insert(i + 1, tail),
            }
        }
        self.tidy();
        Some(e)
    }

    /// Drops dead runs at either end, and compacts when they outnumber the
    /// live ones.
    fn tidy(&mut self) {
        while self.runs.front().is_some_and(|r| !r.live()) {
            self.runs.pop_front();
            self.dead -= 1;
        }
        while self.runs.back().is_some_and(|r| !r.live()) {
            self.runs.pop_back();
            self.dead -= 1;
        }
        if self.dead > COMPACT_AFTER && self.dead > self.runs.len() - self.dead {
            self.runs.retain(Run::live);
            self.dead = 0;
        }
    }

    /// The live runs, ascending.
    pub fn runs(&self) -> impl Iterator<Item = &Run> + '_ {
        self.runs.iter().filter(|r| r.live())
    }

    /// The live runs, to change their subjects (renumbering).
    pub fn runs_mut(&mut self) -> impl Iterator<Item = &mut Run> + '_ {
        self.runs.iter_mut().filter(|r| r.live())
    }

    /// Runs held, dead ones included.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Bytes the runs take (their buffer's capacity).
    pub fn mem_bytes(&self) -> usize {
        self.runs.capacity() * std::mem::size_of::<Run>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The representation the runs replaced: one 24-byte entry per message,
    /// removed ones marked dead until the ends drop them or a compaction
    /// (the index as it was through branch `strm5`).
    #[derive(Default)]
    struct PerMessage {
        entries: VecDeque<Entry>,
        dead: usize,
    }

    impl PerMessage {
        fn position(&self, seq: u64) -> Option<usize> {
            let i = self.entries.partition_point(|e| e.seq < seq);
            (self.entries.get(i)?.seq == seq).then_some(i)
        }

        fn push(&mut self, e: Entry) {
            self.entries.push_back(e);
        }

        fn get(&self, seq: u64) -> Option<Entry> {
            let e = self.entries[self.position(seq)?];
            (e.subject != DEAD).then_some(e)
        }

        fn first(&self) -> Option<Entry> {
            self.entries.iter().find(|e| e.subject != DEAD).copied()
        }

        fn iter_from(&self, seq: u64) -> impl DoubleEndedIterator<Item = Entry> + '_ {
            let i = self.entries.partition_point(|e| e.seq < seq);
            self.entries
                .range(i..)
                .filter(|e| e.subject != DEAD)
                .copied()
        }

        fn seq_at_time(&self, t: u64) -> Option<u64> {
            let i = self.entries.partition_point(|e| e.ts < t);
            self.entries
                .range(i..)
                .find(|e| e.subject != DEAD)
                .map(|e| e.seq)
        }

        fn remove(&mut self, seq: u64) -> Option<Entry> {
            let i = self.position(seq)?;
            let e = self.entries[i];
            if e.subject == DEAD {
                return None;
            }
            self.entries[i].subject = DEAD;
            self.dead += 1;
            while self.entries.front().is_some_and(|e| e.subject == DEAD) {
                self.entries.pop_front();
                self.dead -= 1;
            }
            while self.entries.back().is_some_and(|e| e.subject == DEAD) {
                self.entries.pop_back();
                self.dead -= 1;
            }
            if self.dead > COMPACT_AFTER && self.dead > self.entries.len() - self.dead {
                self.entries.retain(|e| e.subject != DEAD);
                self.dead = 0;
            }
            Some(e)
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A message: subject, size, timestamp step.
        Push(u32, u32, u64),
        /// Removes the message at this sequence (taken modulo the range
        /// held, so most removals hit).
        Remove(u64),
        /// Removes this many from the front (a work queue's acks).
        RemoveFront(u8),
        /// Removes every other message from here (out-of-order acks).
        RemoveEveryOther(u64, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u32..3, 1u32..3, prop_oneof![3 => Just(0u64), 1 => 0u64..3])
                .prop_map(|(s, z, t)| Op::Push(s, z, t)),
            3 => any::<u64>().prop_map(Op::Remove),
            1 => (1u8..20).prop_map(Op::RemoveFront),
            1 => (any::<u64>(), 1u8..30).prop_map(|(a, n)| Op::RemoveEveryOther(a, n)),
        ]
    }

    /// Every read of both representations agrees.
    fn agree(runs: &Index, old: &PerMessage, probe: &[u64]) -> Result<(), TestCaseError> {
        let all: Vec<Entry> = runs.iter_from(0).collect();
        prop_assert_eq!(&all, &old.iter_from(0).collect::<Vec<_>>());
        prop_assert_eq!(runs.first(), old.first());
        prop_assert_eq!(
            runs.last_seq(),
            old.entries.back().map_or(0, |e| e.seq),
            "last"
        );
        for &s in probe {
            prop_assert_eq!(runs.get(s), old.get(s), "get {}", s);
            prop_assert_eq!(
                runs.iter_from(s).collect::<Vec<_>>(),
                old.iter_from(s).collect::<Vec<_>>()
            );
            prop_assert_eq!(
                runs.iter_from(s).rev().take(3).collect::<Vec<_>>(),
                old.iter_from(s).rev().take(3).collect::<Vec<_>>()
            );
            prop_assert_eq!(
                runs.seq_at_time(s / 2),
                old.seq_at_time(s / 2),
                "time {}",
                s / 2
            );
        }
        // No two neighbouring live runs that should be one were left
        // apart by a push, and no run is empty.
        prop_assert!(runs.runs.iter().all(|r| r.len > 0));
        prop_assert!(runs.runs.front().is_none_or(Run::live));
        prop_assert!(runs.runs.back().is_none_or(Run::live));
        prop_assert_eq!(runs.dead, runs.runs.iter().filter(|r| !r.live()).count());
        Ok(())
    }

    proptest! {
        /// Runs against the per-message entries they replaced (model
        /// based): pushes, removals at either end, in the middle, in
        /// order and out of order; every lookup agrees after every step.
        #[test]
        fn runs_agree_with_per_message_entries(ops in proptest::collection::vec(op(), 1..300)) {
            let (mut runs, mut old) = (Index::default(), PerMessage::default());
            let (mut seq, mut ts) = (0u64, 0u64);
            for op in ops {
                match op {
                    Op::Push(subject, size, dt) => {
                        // Sometimes a gap, as after a removal at the end.
                        seq += if dt == 2 { 2 } else { 1 };
                        ts += dt;
                        let e = Entry { seq, ts, size, subject };
                        runs.push(e);
                        old.push(e);
                    }
                    Op::Remove(s) => {
                        let s = s % (seq + 2);
                        prop_assert_eq!(runs.remove(s), old.remove(s), "remove {}", s);
                    }
                    Op::RemoveFront(n) => {
                        for _ in 0..n {
                            let Some(f) = old.first() else { break };
                            prop_assert_eq!(runs.remove(f.seq), Some(f));
                            old.remove(f.seq);
                        }
                    }
                    Op::RemoveEveryOther(a, n) => {
                        let mut s = a % (seq + 2);
                        for _ in 0..n {
                            prop_assert_eq!(runs.remove(s), old.remove(s), "remove {}", s);
                            s += 2;
                        }
                    }
                }
                let probe: Vec<u64> = (0..seq + 2).step_by(((seq / 8) as usize).max(1)).collect();
                agree(&runs, &old, &probe)?;
            }
        }
    }

    #[test]
    fn a_burst_is_one_run_and_a_split_reuses_a_dead_slot() {
        let mut ix = Index::default();
        for seq in 1..=1000 {
            ix.push(Entry {
                seq,
                ts: 7,
                size: 64,
                subject: 0,
            });
        }
        assert_eq!(ix.len(), 1);
        // Every other one from the middle: a split each.
        for seq in (500..600).step_by(2) {
            assert!(ix.remove(seq).is_some());
        }
        assert_eq!(ix.iter_from(0).count(), 950);
        assert_eq!(ix.len(), 51);
        assert_eq!(ix.get(500), None);
        assert_eq!(ix.get(501).map(|e| e.ts), Some(7));
        // A run of one removed leaves a dead slot, which the next split
        // before it takes: no insertion.
        assert!(ix.remove(503).is_some());
        assert_eq!((ix.len(), ix.dead), (51, 1));
        assert!(ix.remove(200).is_some());
        assert_eq!((ix.len(), ix.dead), (52, 1));
        let mut ix2 = Index::default();
        for seq in 1..=5 {
            ix2.push(Entry {
                seq,
                ts: 7,
                size: 64,
                subject: 0,
            });
        }
        ix2.push(Entry {
            seq: 6,
            ts: 7,
            size: 64,
            subject: 1,
        });
        ix2.push(Entry {
            seq: 7,
            ts: 7,
            size: 64,
            subject: 0,
        });
        assert!(ix2.remove(6).is_some());
        assert_eq!((ix2.len(), ix2.dead), (3, 1));
        assert!(ix2.remove(3).is_some());
        assert_eq!((ix2.len(), ix2.dead), (3, 0));
        assert_eq!(
            ix2.iter_from(0).map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 4, 5, 7]
        );
        assert_eq!(ix.mem_bytes() / ix.runs.capacity(), 32);
    }

    #[test]
    fn compacts_when_dead_runs_outnumber_live_ones() {
        let mut ix = Index::default();
        for seq in 1..=5000u64 {
            ix.push(Entry {
                seq,
                ts: seq,
                size: 1,
                subject: 0,
            });
        }
        for seq in 2..5000 {
            ix.remove(seq);
        }
        assert!(ix.len() < 2 * COMPACT_AFTER, "{}", ix.len());
        assert_eq!(
            ix.iter_from(0).map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 5000]
        );
    }
}
