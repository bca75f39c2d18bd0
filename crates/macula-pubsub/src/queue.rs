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

/// Messages a subscription may hold unread. About a second of a busy topic at
/// a thousand messages per second; memory grows only as messages actually
/// queue (nothing is preallocated).
pub const QUEUE_CAPACITY: usize = 1024;

/// A FIFO queue of at most `capacity` items that drops its oldest when full.
#[derive(Clone, Debug)]
pub struct BoundedQueue<T> {
    items: VecDeque<T>,
    capacity: usize,
    /// Dropped since the last `take_lagged`.
    lagged: u64,
    dropped_total: u64,
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
            lagged: 0,
            dropped_total: 0,
        }
    }

    /// An empty queue sized by [`Limits::queue_capacity`].
    pub fn with_limits(limits: &Limits) -> Self {
        Self::new(limits.queue_capacity)
    }

    /// Appends `item`. When the queue was full, the oldest item is removed,
    /// counted as dropped, and returned (the caller may count or log it).
    pub fn push(&mut self, item: T) -> Option<T> {
        let dropped = if self.items.len() >= self.capacity {
            self.lagged += 1;
            self.dropped_total += 1;
            self.items.pop_front()
        } else {
            None
        };
        self.items.push_back(item);
        debug_assert!(self.items.len() <= self.capacity);
        dropped
    }

    /// Removes and returns the oldest item.
    pub fn pop(&mut self) -> Option<T> {
        self.items.pop_front()
    }

    /// How many items were dropped since the last call (and resets that
    /// count). A non-zero answer should reach the subscriber as a "lagged"
    /// event before its next message.
    pub fn take_lagged(&mut self) -> u64 {
        std::mem::take(&mut self.lagged)
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
    fn never_exceeds_capacity() {
        let mut q = BoundedQueue::new(QUEUE_CAPACITY);
        for i in 0..10_000u32 {
            q.push(i);
            assert!(q.len() <= QUEUE_CAPACITY);
        }
        assert_eq!(q.dropped_total(), 10_000 - QUEUE_CAPACITY as u64);
        assert_eq!(q.pop(), Some(10_000 - QUEUE_CAPACITY as u32));
    }
}
