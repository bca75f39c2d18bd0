//! The bounded queue between delivery and one subscriber.
//!
//! A slow subscriber must never slow the others or grow memory without
//! bound, and must never lose messages silently. So: past the capacity the
//! *oldest* message is dropped (the subscriber is behind; fresh data is worth
//! more than stale), every drop is counted, and [`BoundedQueue::take_lagged`]
//! tells the subscriber how many it missed since it last asked.
//!
//! It must not block, wait, wake tasks or know about async: the runtime wraps
//! it and decides how to signal readiness.

use std::collections::VecDeque;

use crate::Limits;

/// Messages a subscription may hold unread. A remote node delivers in
/// batches of up to about a thousand small messages, and a subscriber must
/// absorb a few batches between two of its polls, so this is well above one
/// batch (NATS's default pending limit per subscription is of this order).
/// Memory grows only as messages actually queue (nothing is preallocated),
/// and `QUEUE_BYTES` bounds it whatever the message size.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Bytes a subscription may hold unread (as weighed by the caller of
/// [`BoundedQueue::push_sized`]); past this the oldest are dropped too.
pub const QUEUE_BYTES: usize = 64 << 20;

/// A FIFO queue of at most `capacity` items that drops its oldest when full.
#[derive(Clone, Debug)]
pub struct BoundedQueue<T> {
    /// (item, size, messages missed just before it: see `note_gap`).
    items: VecDeque<(T, usize, u64)>,
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
    /// Dropped since the last `take_lagged`.
    lagged: u64,
    dropped_total: u64,
    /// Missed upstream (`note_gap`) after the last item pushed.
    gap_next: u64,
}

impl<T> Default for BoundedQueue<T> {
    fn default() -> Self {
        Self::new(QUEUE_CAPACITY)
    }
}

impl<T> BoundedQueue<T> {
    /// An empty queue holding at most `capacity` items (at least 1 is used:
    /// a queue that can hold nothing would drop every message).
    pub fn new(capacity: usize) -> Self {
        BoundedQueue {
            items: VecDeque::new(),
            capacity: capacity.max(1),
            max_bytes: usize::MAX,
            bytes: 0,
            lagged: 0,
            dropped_total: 0,
            gap_next: 0,
        }
    }

    /// An empty queue sized by [`Limits::queue_capacity`].
    pub fn with_limits(limits: &Limits) -> Self {
        let mut q = Self::new(limits.queue_capacity);
        q.max_bytes = limits.queue_bytes.max(1);
        q
    }

    /// Appends `item`. When the queue was full, the oldest item is removed,
    /// counted as dropped, and returned (the caller may count or log it).
    pub fn push(&mut self, item: T) -> Option<T> {
        let mut dropped = None;
        self.push_sized_with(item, 0, |d| dropped = Some(d));
        dropped
    }

    /// Appends `item` weighing `size` bytes. Drops the oldest items (counted,
    /// and returned as their number) while the queue holds more than its
    /// capacity in items or its byte limit in bytes; the newest item always
    /// stays, even if it alone is over the byte limit.
    pub fn push_sized(&mut self, item: T, size: usize) -> u64 {
        let mut n = 0;
        self.push_sized_with(item, size, |_| n += 1);
        n
    }

    fn push_sized_with(&mut self, item: T, size: usize, mut dropped: impl FnMut(T)) {
        self.items
            .push_back((item, size, std::mem::take(&mut self.gap_next)));
        self.bytes += size;
        while self.items.len() > self.capacity
            || (self.bytes > self.max_bytes && self.items.len() > 1)
        {
            let Some((old, old_size, gap)) = self.items.pop_front() else {
                break;
            };
            self.bytes -= old_size;
            self.lagged += 1 + gap;
            self.dropped_total += 1;
            dropped(old);
        }
        debug_assert!(self.items.len() <= self.capacity);
    }

    /// Removes and returns the oldest item.
    pub fn pop(&mut self) -> Option<T> {
        let (item, size, _) = self.items.pop_front()?;
        self.bytes -= size;
        Some(item)
    }

    /// `n` messages were missed before whatever is pushed next (lost
    /// upstream: a loss report). They are told by `take_lagged` exactly
    /// where they were missed: after the items queued now.
    pub fn note_gap(&mut self, n: u64) {
        self.gap_next += n;
    }

    /// Whether `n` more items weighing `bytes` in all fit without dropping
    /// any (an empty queue always takes one item: the newest always stays).
    pub fn room_for(&self, n: usize, bytes: usize) -> bool {
        (self.items.is_empty() && n <= 1)
            || (self.items.len() + n <= self.capacity
                && self.bytes.saturating_add(bytes) <= self.max_bytes)
    }

    /// Bytes held (as weighed by `push_sized`).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many items were missed before the next one `pop` returns (and
    /// resets that count): dropped from this full queue since the last
    /// call, plus those noted with `note_gap` just before the oldest item
    /// (or, with the queue empty, after the last one). A non-zero answer
    /// should reach the subscriber as a "lagged" event before its next
    /// message.
    pub fn take_lagged(&mut self) -> u64 {
        let mut n = std::mem::take(&mut self.lagged);
        match self.items.front_mut() {
            Some(front) => n += std::mem::take(&mut front.2),
            None => n += std::mem::take(&mut self.gap_next),
        }
        n
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The most items held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Items dropped since creation.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_bound_keeps_the_newest_and_holds_exactly_its_limit() {
        assert_eq!(QUEUE_BYTES, 64 * 1024 * 1024);
        let limits = Limits {
            queue_capacity: 10,
            queue_bytes: 100,
            ..Limits::default()
        };
        let mut q = BoundedQueue::with_limits(&limits);
        // Alone over the limit: kept, so the subscriber still gets it.
        assert_eq!(q.push_sized('a', 500), 0);
        assert_eq!((q.len(), q.is_empty()), (1, false));
        assert_eq!(q.push_sized('b', 50), 1);
        // Exactly at the limit: nothing dropped.
        assert_eq!(q.push_sized('c', 50), 0);
        assert_eq!(q.bytes(), 100);
        assert_eq!(q.push_sized('d', 1), 1);
        assert_eq!(q.pop(), Some('c'));
    }

    #[test]
    fn room_for_counts_items_and_bytes() {
        let mut q = BoundedQueue::with_limits(&Limits {
            queue_capacity: 3,
            queue_bytes: 10,
            ..Limits::default()
        });
        assert!(q.room_for(1, 100), "empty: any one item");
        assert!(!q.room_for(4, 0), "but not more than it holds");
        q.push_sized('a', 4);
        assert!(q.room_for(2, 6));
        assert!(!q.room_for(3, 0), "count");
        assert!(!q.room_for(1, 7), "bytes");
    }

    #[test]
    fn gaps_are_told_where_they_happened() {
        let mut q = BoundedQueue::new(3);
        q.push('a');
        q.note_gap(2);
        q.push('b');
        q.note_gap(1);
        // 'a' first, with nothing missed before it; then the gap of 2.
        assert_eq!(q.take_lagged(), 0);
        assert_eq!(q.pop(), Some('a'));
        assert_eq!(q.take_lagged(), 2);
        assert_eq!(q.take_lagged(), 0, "told once");
        assert_eq!(q.pop(), Some('b'));
        // The gap after the last item is told once the queue is empty.
        assert_eq!(q.take_lagged(), 1);
        assert_eq!(q.take_lagged(), 0);
        // An item dropped for room takes its gap with it into the count.
        q.note_gap(5);
        q.push('c');
        q.push('d');
        q.push('e');
        q.push('f');
        assert_eq!(q.take_lagged(), 6, "'c' and the 5 before it");
        assert_eq!(q.pop(), Some('d'));
    }

    #[test]
    fn fifo_until_full() {
        let mut q = BoundedQueue::new(3);
        assert!(q.is_empty());
        for i in 0..3 {
            assert_eq!(q.push(i), None);
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(), Some(0));
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), None);
        assert_eq!(q.dropped_total(), 0);
        assert_eq!(q.take_lagged(), 0);
    }

    #[test]
    fn full_queue_drops_oldest_and_reports_lag() {
        let mut q = BoundedQueue::new(2);
        q.push(1);
        q.push(2);
        assert_eq!(q.push(3), Some(1));
        assert_eq!(q.push(4), Some(2));
        assert_eq!(q.len(), 2);
        assert_eq!(q.take_lagged(), 2);
        assert_eq!(q.take_lagged(), 0, "taking resets the lag");
        assert_eq!(q.push(5), Some(3));
        assert_eq!(q.take_lagged(), 1);
        assert_eq!(q.dropped_total(), 3);
        assert_eq!(q.pop(), Some(4));
        assert_eq!(q.pop(), Some(5));
    }

    #[test]
    fn capacity_defaults_and_floor() {
        assert_eq!(BoundedQueue::<u8>::default().capacity(), QUEUE_CAPACITY);
        assert_eq!(
            BoundedQueue::<u8>::with_limits(&Limits {
                queue_capacity: 7,
                ..Default::default()
            })
            .capacity(),
            7
        );
        let mut q = BoundedQueue::new(0);
        assert_eq!(q.capacity(), 1);
        assert_eq!(q.push('a'), None);
        assert_eq!(q.push('b'), Some('a'));
        assert_eq!(q.pop(), Some('b'));
    }

    #[test]
    fn byte_limit_drops_oldest_but_keeps_the_newest() {
        let mut q = BoundedQueue::with_limits(&Limits {
            queue_capacity: 100,
            queue_bytes: 10,
            ..Default::default()
        });
        assert_eq!(q.push_sized('a', 4), 0);
        assert_eq!(q.push_sized('b', 4), 0);
        assert_eq!(q.bytes(), 8);
        assert_eq!(q.push_sized('c', 4), 1, "a is dropped");
        assert_eq!(q.take_lagged(), 1);
        assert_eq!(q.push_sized('d', 50), 2, "b and c go; d stays alone");
        assert_eq!((q.len(), q.bytes()), (1, 50));
        assert_eq!(q.pop(), Some('d'));
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn never_exceeds_capacity() {
        let mut q = BoundedQueue::new(QUEUE_CAPACITY);
        for i in 0..100_000u32 {
            q.push(i);
            assert!(q.len() <= QUEUE_CAPACITY);
        }
        assert_eq!(q.dropped_total(), 100_000 - QUEUE_CAPACITY as u64);
        assert_eq!(q.pop(), Some(100_000 - QUEUE_CAPACITY as u32));
    }
}
