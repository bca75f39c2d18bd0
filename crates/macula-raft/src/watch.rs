//! The bounded history of recent events that watches start from.
//!
//! The state machine keeps the last N events ([`crate::Options::history_events`],
//! also bounded by their size, [`crate::Options::history_bytes`]) and a `tokio::sync::broadcast` channel of `(revision, Event)` for every
//! applied change. [`crate::StateMachineStore::watch`] takes the backlog from
//! the history and subscribes to the channel under the same lock that
//! `apply` holds while it appends to both, so the backlog ends exactly where
//! the receiver begins: nothing is skipped or delivered twice.
//!
//! ## How a caller watches
//!
//! 1. `let (backlog, mut rx) = sm.watch(prefix, from)?;` deliver `backlog`
//!    (already filtered by `prefix`, revisions `>= from`).
//! 2. Loop on `rx.recv()`: the receiver carries **every** change of the
//!    group, so keep only events with [`crate::kv::matches_prefix`]`(prefix,
//!    event.key())` and (only needed when `from` was in the future)
//!    `revision >= from`. Remember the last delivered revision `last`.
//! 3. `Err(Lagged(_))`: the receiver fell behind. Re-subscribe with
//!    `sm.watch(prefix, last + 1)`; that fills the gap from the history, or
//!    fails with [`crate::KvError::Compacted`] when the gap is older than
//!    the history (the caller then reports compaction, like etcd, and the
//!    client re-reads the range and watches from the revision it read at).
//! 4. `Err(Closed)`: the state machine was replaced by an installed
//!    snapshot (or the store was dropped). Re-subscribe the same way; a
//!    snapshot resets the history, so a gap means `Compacted`.

use std::collections::VecDeque;

use crate::kv::{matches_prefix, Event, KvError};

/// Bytes an event is charged in the history: key, value and a fixed overhead.
pub fn event_size(event: &Event) -> usize {
    const OVERHEAD: usize = 64;
    match event {
        Event::Put(kv) => kv.key.len() + kv.value.len() + OVERHEAD,
        Event::Delete { key, .. } => key.len() + OVERHEAD,
    }
}

/// Recent events in revision order, bounded by count and by size.
#[derive(Debug, Clone)]
pub struct History {
    events: VecDeque<(u64, Event)>,
    /// The history holds every event of every revision `>= start`.
    start: u64,
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
}

impl History {
    /// An empty history for a state at `revision`, holding at most
    /// `capacity` events of at most `max_bytes` in total ([`event_size`]).
    pub fn new(revision: u64, capacity: usize, max_bytes: usize) -> Self {
        History {
            events: VecDeque::new(),
            start: revision + 1,
            capacity,
            max_bytes,
            bytes: 0,
        }
    }

    /// Forgets everything: the state jumped to `revision` (a snapshot).
    pub fn reset(&mut self, revision: u64) {
        self.events.clear();
        self.bytes = 0;
        self.start = revision + 1;
    }

    /// Appends an event, dropping the oldest beyond the bounds.
    pub fn push(&mut self, event: Event) {
        self.bytes += event_size(&event);
        self.events.push_back((event.revision(), event));
        while self.events.len() > self.capacity || self.bytes > self.max_bytes {
            let Some((rev, old)) = self.events.pop_front() else {
                break;
            };
            self.bytes -= event_size(&old);
            // Later events of the same revision may remain, but that
            // revision is no longer complete.
            self.start = self.start.max(rev + 1);
        }
    }

    /// Bytes charged for the retained events.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The oldest revision a watch can start from.
    pub fn oldest(&self) -> u64 {
        self.start
    }

    /// Number of retained events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event is retained.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The retained events matching `prefix` with revision `>= from`.
    /// `from == 0` means "from now": an empty backlog.
    pub fn backlog(&self, prefix: &[u8], from: u64) -> Result<Vec<Event>, KvError> {
        if from == 0 {
            return Ok(Vec::new());
        }
        if from < self.start {
            return Err(KvError::Compacted { oldest: self.start });
        }
        // Events are in revision order: skip to the first one >= from.
        let first = self.events.partition_point(|(rev, _)| *rev < from);
        Ok(self
            .events
            .range(first..)
            .filter(|(_, e)| matches_prefix(prefix, e.key()))
            .map(|(_, e)| e.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KeyValue;

    fn put(key: &str, rev: u64) -> Event {
        Event::Put(KeyValue {
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: None,
        })
    }

    fn del(key: &str, rev: u64) -> Event {
        Event::Delete {
            key: key.as_bytes().to_vec(),
            mod_revision: rev,
        }
    }

    #[test]
    fn backlog_filters_and_compacts() {
        let mut h = History::new(0, 4, usize::MAX);
        assert_eq!(h.backlog(b"", 1), Ok(vec![]));
        h.push(put("a", 1));
        h.push(put("b", 2));
        h.push(del("a", 3));
        h.push(del("b", 3));
        assert_eq!(h.oldest(), 1);
        assert_eq!(h.backlog(b"a", 1).map(|v| v.len()), Ok(2));
        assert_eq!(h.backlog(b"", 3).map(|v| v.len()), Ok(2));
        assert_eq!(h.backlog(b"", 0), Ok(vec![]));
        assert_eq!(h.backlog(b"", 9), Ok(vec![]));
        // Pushing a fifth event evicts revision 1.
        h.push(put("c", 4));
        assert_eq!(h.oldest(), 2);
        assert_eq!(h.backlog(b"", 1), Err(KvError::Compacted { oldest: 2 }));
        // Evicting half of revision 3 makes revision 3 incomplete.
        h.push(put("d", 5));
        h.push(put("e", 6));
        assert_eq!(h.oldest(), 4);
        assert_eq!(h.len(), 4);
        assert_eq!(
            h.backlog(b"", 4)
                .map(|v| v.iter().map(Event::revision).collect::<Vec<_>>()),
            Ok(vec![4, 5, 6])
        );
        h.reset(6);
        assert!(h.is_empty());
        assert_eq!(h.backlog(b"", 6), Err(KvError::Compacted { oldest: 7 }));
        assert_eq!(h.backlog(b"", 7), Ok(vec![]));
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut h = History::new(0, 0, usize::MAX);
        h.push(put("a", 1));
        assert!(h.is_empty());
        assert_eq!(h.oldest(), 2);
        assert_eq!(h.backlog(b"", 2), Ok(vec![]));
    }

    #[test]
    fn size_bound_evicts_big_events() {
        let big = |key: &str, rev: u64| {
            Event::Put(KeyValue {
                key: key.as_bytes().to_vec(),
                value: vec![0; 1000],
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                lease: None,
            })
        };
        let mut h = History::new(0, 100, 2500);
        h.push(big("a", 1));
        h.push(big("b", 2));
        assert_eq!(h.len(), 2);
        h.push(big("c", 3));
        assert_eq!(h.len(), 2);
        assert_eq!(h.oldest(), 2);
        assert!(h.bytes() <= 2500);
        // An event bigger than the whole bound is not retained.
        let mut tiny = History::new(0, 100, 10);
        tiny.push(big("a", 1));
        assert!(tiny.is_empty());
        assert_eq!(tiny.bytes(), 0);
        assert_eq!(tiny.oldest(), 2);
    }

    #[test]
    fn reserved_keys_need_reserved_prefix() {
        let mut h = History::new(0, 10, usize::MAX);
        h.push(put("\0workloads/x", 1));
        h.push(put("x", 2));
        assert_eq!(h.backlog(b"", 1).map(|v| v.len()), Ok(1));
        assert_eq!(h.backlog(b"\0", 1).map(|v| v.len()), Ok(1));
    }
}
