//! The engine's event queue: items ordered by (time, insertion), in O(1)
//! per push and pop for the near future.
//!
//! A run at 10,000 nodes keeps millions of events queued; a binary heap of
//! them spent a fifth of the run sifting. Simulated time is whole
//! milliseconds and almost every event is due within a minute, so the queue
//! is a *timing wheel*: one FIFO slot per millisecond for the next
//! [`WHEEL_MS`] milliseconds (a bitmap finds the next occupied slot), and a
//! heap for anything further out, moved into its slot as the wheel turns.
//!
//! Order is exactly the heap's: by time, then by insertion. Within a slot
//! that is FIFO order, provided every far item for a slot enters it before
//! any item pushed straight into it; both follow from one invariant: far
//! items are due at or after `base + WHEEL_MS`, where `base` only moves when
//! an item is popped (so it never passes the clock, and no push is ever due
//! before it), and moving `base` first moves every far item that came into
//! range.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

/// Milliseconds the wheel covers (64 s: the network's latencies, request,
/// dial and idle timeouts; only long timers go to the heap).
const WHEEL_MS: u64 = 1 << 16;
const WORDS: usize = (WHEEL_MS / 64) as usize;
/// A drained slot keeps at most this much capacity (a burst at one instant
/// must not pin its memory for the rest of the run).
const KEEP_CAPACITY: usize = 64;

/// Items due at a time, popped earliest first and in insertion order at
/// equal times.
pub(crate) struct EventQueue<T> {
    slots: Vec<VecDeque<T>>,
    /// Bit `i` set: slot `i` holds items.
    occupied: Vec<u64>,
    /// Every wheel item is due in `[base, base + WHEEL_MS)`.
    base: u64,
    in_wheel: usize,
    far: BinaryHeap<Reverse<Far<T>>>,
    seq: u64,
}

struct Far<T> {
    at: u64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Far<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Far<T> {}
impl<T> PartialOrd for Far<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Far<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        EventQueue {
            slots: (0..WHEEL_MS).map(|_| VecDeque::new()).collect(),
            occupied: vec![0; WORDS],
            base: 0,
            in_wheel: 0,
            far: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> EventQueue<T> {
    /// Items queued.
    pub(crate) fn len(&self) -> usize {
        self.in_wheel + self.far.len()
    }

    /// Queues `item` at `at`, which must not be before the time of the last
    /// item popped (a push into the past is queued at that time instead).
    pub(crate) fn push(&mut self, at: u64, item: T) {
        let at = at.max(self.base);
        if at - self.base < WHEEL_MS {
            self.put(at, item);
        } else {
            let seq = self.seq;
            self.seq += 1;
            self.far.push(Reverse(Far { at, seq, item }));
        }
    }

    fn put(&mut self, at: u64, item: T) {
        let s = (at % WHEEL_MS) as usize;
        self.slots[s].push_back(item);
        self.occupied[s / 64] |= 1 << (s % 64);
        self.in_wheel += 1;
    }

    /// The time of the next item, if any.
    pub(crate) fn peek_time(&self) -> Option<u64> {
        match self.next_in_wheel() {
            Some(at) => Some(at),
            None => self.far.peek().map(|f| f.0.at),
        }
    }

    /// The earliest item, with its time.
    pub(crate) fn pop(&mut self) -> Option<(u64, T)> {
        let at = match self.next_in_wheel() {
            Some(at) => at,
            None => self.far.peek()?.0.at,
        };
        self.advance(at);
        let s = (at % WHEEL_MS) as usize;
        let slot = &mut self.slots[s];
        let item = slot.pop_front()?;
        if slot.is_empty() {
            self.occupied[s / 64] &= !(1 << (s % 64));
            if slot.capacity() > KEEP_CAPACITY {
                slot.shrink_to(KEEP_CAPACITY);
            }
        }
        self.in_wheel -= 1;
        Some((at, item))
    }

    /// Moves `base` to `at` (the next item's time), bringing far items that
    /// came into range into their slots, in order.
    fn advance(&mut self, at: u64) {
        debug_assert!(at >= self.base);
        self.base = at;
        while let Some(f) = self.far.peek() {
            if f.0.at - self.base >= WHEEL_MS {
                break;
            }
            if let Some(Reverse(f)) = self.far.pop() {
                self.put(f.at, f.item);
            }
        }
    }

    /// The earliest time held in the wheel: the first occupied slot at or
    /// after `base`'s, wrapping around.
    fn next_in_wheel(&self) -> Option<u64> {
        if self.in_wheel == 0 {
            return None;
        }
        let start = (self.base % WHEEL_MS) as usize;
        let (w0, b0) = (start / 64, start % 64);
        // The first word from `base`'s bit on, then whole words, wrapping,
        // then the first word's bits before `base`'s.
        let first = self.occupied[w0] & (!0u64 << b0);
        let slot = if first != 0 {
            w0 * 64 + first.trailing_zeros() as usize
        } else {
            let mut found = None;
            for k in 1..=WORDS {
                let w = (w0 + k) % WORDS;
                let mut bits = self.occupied[w];
                if k == WORDS {
                    bits &= !(!0u64 << b0);
                }
                if bits != 0 {
                    found = Some(w * 64 + bits.trailing_zeros() as usize);
                    break;
                }
            }
            found?
        };
        let offset = (slot + WHEEL_MS as usize - start) as u64 % WHEEL_MS;
        Some(self.base + offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: a heap ordered by (time, insertion).
    #[derive(Default)]
    struct Model {
        heap: BinaryHeap<Reverse<(u64, u64, u32)>>,
        seq: u64,
        last: u64,
    }

    impl Model {
        fn push(&mut self, at: u64, v: u32) {
            let at = at.max(self.last);
            self.heap.push(Reverse((at, self.seq, v)));
            self.seq += 1;
        }
        fn pop(&mut self) -> Option<(u64, u32)> {
            let Reverse((at, _, v)) = self.heap.pop()?;
            self.last = at;
            Some((at, v))
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Push at last-popped time plus this.
        Push(u64),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Same instant, near, across the wheel's edge, far.
            3 => (0u64..3).prop_map(Op::Push),
            3 => (0u64..2_000).prop_map(Op::Push),
            2 => (WHEEL_MS - 3..WHEEL_MS + 3).prop_map(Op::Push),
            1 => (0u64..5 * WHEEL_MS).prop_map(Op::Push),
            4 => Just(Op::Pop),
        ]
    }

    proptest! {
        #[test]
        fn pops_in_the_heaps_order(ops in proptest::collection::vec(op(), 1..400)) {
            let mut q = EventQueue::default();
            let mut m = Model::default();
            for (v, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Push(d) => {
                        let at = m.last + d;
                        q.push(at, v as u32);
                        m.push(at, v as u32);
                    }
                    Op::Pop => {
                        prop_assert_eq!(q.peek_time(), m.heap.peek().map(|r| r.0 .0));
                        prop_assert_eq!(q.pop(), m.pop());
                    }
                }
                prop_assert_eq!(q.len(), m.heap.len());
            }
            while let Some(x) = m.pop() {
                prop_assert_eq!(q.pop(), Some(x));
            }
            prop_assert_eq!(q.pop(), None);
            prop_assert_eq!(q.peek_time(), None);
        }
    }

    #[test]
    fn equal_times_pop_in_insertion_order_across_the_far_heap() {
        let mut q = EventQueue::default();
        // Far when pushed, then the same time pushed straight into the
        // wheel once it is in range: the far one still comes first.
        q.push(WHEEL_MS + 10, "far");
        q.push(20, "near");
        assert_eq!(q.pop(), Some((20, "near")));
        q.push(WHEEL_MS + 10, "later");
        q.push(WHEEL_MS + 10, "last");
        assert_eq!(q.pop(), Some((WHEEL_MS + 10, "far")));
        assert_eq!(q.pop(), Some((WHEEL_MS + 10, "later")));
        assert_eq!(q.pop(), Some((WHEEL_MS + 10, "last")));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_push_into_the_past_is_due_now() {
        let mut q = EventQueue::default();
        q.push(500, 1);
        assert_eq!(q.pop(), Some((500, 1)));
        q.push(100, 2);
        assert_eq!(q.peek_time(), Some(500));
        assert_eq!(q.pop(), Some((500, 2)));
    }

    #[test]
    fn wraps_around_the_wheel() {
        let mut q = EventQueue::default();
        let mut t = 0;
        for i in 0..10u64 {
            t += WHEEL_MS / 3 + i;
            q.push(t, i);
            q.push(t, i + 100);
            assert_eq!(q.pop(), Some((t, i)));
            assert_eq!(q.pop(), Some((t, i + 100)));
        }
        assert_eq!(q.len(), 0);
    }
}
