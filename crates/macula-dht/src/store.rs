//! The records this node holds, for others and for itself: bounded in count per
//! node and per publisher, and dropped when their TTL passes.
//!
//! It must not verify signatures (the caller does, through `RecordAuth`, before
//! inserting) and must not talk to the network or read a clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use macula_wire::NodeId;

use crate::record::{Record, RecordError};
use crate::Millis;

/// A record with the time it expires on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The record as received.
    pub record: Record,
    /// When this node drops it.
    pub expires: Millis,
}

/// Records keyed by `(key, publisher)`, with an expiry index so that expiring is
/// O(expired · log n) and the next deadline is O(log n).
#[derive(Debug)]
pub struct RecordStore {
    records: BTreeMap<(NodeId, NodeId), StoredRecord>,
    expiries: BTreeSet<(Millis, NodeId, NodeId)>,
    per_publisher: HashMap<NodeId, usize>,
    max_records: usize,
    max_per_publisher: usize,
}

impl RecordStore {
    /// An empty store with the given limits.
    pub fn new(max_records: usize, max_per_publisher: usize) -> RecordStore {
        RecordStore {
            records: BTreeMap::new(),
            expiries: BTreeSet::new(),
            per_publisher: HashMap::new(),
            max_records,
            max_per_publisher,
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Inserts or refreshes a record (already checked and verified by the
    /// caller). A record with the same `seq` only extends the lifetime, so a
    /// republish or a replica's push renews it; an older `seq` is refused.
    pub fn insert(&mut self, record: Record, expires: Millis) -> Result<(), RecordError> {
        let slot = (record.key, record.publisher);
        if let Some(old) = self.records.get_mut(&slot) {
            if record.seq < old.record.seq {
                return Err(RecordError::Stale {
                    offered: record.seq,
                    stored: old.record.seq,
                });
            }
            let expires = if record.seq == old.record.seq {
                expires.max(old.expires)
            } else {
                expires
            };
            self.expiries.remove(&(old.expires, slot.0, slot.1));
            self.expiries.insert((expires, slot.0, slot.1));
            *old = StoredRecord { record, expires };
            return Ok(());
        }
        let n_publisher = self
            .per_publisher
            .get(&record.publisher)
            .copied()
            .unwrap_or(0);
        if n_publisher >= self.max_per_publisher {
            return Err(RecordError::PublisherFull {
                max: self.max_per_publisher,
            });
        }
        if self.records.len() >= self.max_records {
            return Err(RecordError::StoreFull {
                max: self.max_records,
            });
        }
        *self.per_publisher.entry(record.publisher).or_insert(0) += 1;
        self.expiries.insert((expires, slot.0, slot.1));
        self.records.insert(slot, StoredRecord { record, expires });
        Ok(())
    }

    /// Up to `max` records for `key`, one per publisher.
    pub fn get(&self, key: &NodeId, max: usize) -> Vec<Record> {
        let lo = (*key, NodeId::from_bytes([0; 32]));
        let hi = (*key, NodeId::from_bytes([0xff; 32]));
        self.records
            .range(lo..=hi)
            .take(max)
            .map(|(_, s)| s.record.clone())
            .collect()
    }

    /// The stored copy of `publisher`'s record under `key`.
    pub fn get_one(&self, key: &NodeId, publisher: &NodeId) -> Option<&StoredRecord> {
        self.records.get(&(*key, *publisher))
    }

    /// Drops every record whose expiry is at or before `now`; returns how many.
    pub fn expire(&mut self, now: Millis) -> usize {
        let mut n = 0;
        while let Some(&(at, key, publisher)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.remove(&(at, key, publisher));
            if self.records.remove(&(key, publisher)).is_some() {
                n += 1;
                if let Some(c) = self.per_publisher.get_mut(&publisher) {
                    *c -= 1;
                    if *c == 0 {
                        self.per_publisher.remove(&publisher);
                    }
                }
            }
        }
        n
    }

    /// The earliest expiry, if any record is held.
    pub fn next_expiry(&self) -> Option<Millis> {
        self.expiries.first().map(|e| e.0)
    }

    /// All records, ordered by key then publisher.
    pub fn iter(&self) -> impl Iterator<Item = &StoredRecord> {
        self.records.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: u8, publisher: u8, seq: u64) -> Record {
        Record {
            key: NodeId::from_bytes([key; 32]),
            publisher: NodeId::from_bytes([publisher; 32]),
            seq,
            ttl: Millis(1000),
            value: vec![key],
            signature: vec![],
        }
    }

    #[test]
    fn expiry_and_refresh() {
        let mut s = RecordStore::new(10, 10);
        s.insert(rec(1, 1, 1), Millis(100)).unwrap();
        // Same seq extends, never shortens.
        s.insert(rec(1, 1, 1), Millis(50)).unwrap();
        assert_eq!(s.next_expiry(), Some(Millis(100)));
        s.insert(rec(1, 1, 1), Millis(200)).unwrap();
        assert_eq!(s.expire(Millis(150)), 0);
        assert_eq!(s.expire(Millis(200)), 1);
        assert!(s.is_empty());
        assert_eq!(s.next_expiry(), None);
    }

    #[test]
    fn stale_and_limits() {
        let mut s = RecordStore::new(3, 2);
        s.insert(rec(1, 1, 5), Millis(100)).unwrap();
        assert_eq!(
            s.insert(rec(1, 1, 4), Millis(100)),
            Err(RecordError::Stale {
                offered: 4,
                stored: 5
            })
        );
        s.insert(rec(2, 1, 1), Millis(100)).unwrap();
        assert_eq!(
            s.insert(rec(3, 1, 1), Millis(100)),
            Err(RecordError::PublisherFull { max: 2 })
        );
        s.insert(rec(3, 2, 1), Millis(100)).unwrap();
        assert_eq!(
            s.insert(rec(4, 3, 1), Millis(100)),
            Err(RecordError::StoreFull { max: 3 })
        );
        // Two publishers under one key are both returned.
        s.expire(Millis(100));
        s.insert(rec(9, 1, 1), Millis(300)).unwrap();
        s.insert(rec(9, 2, 1), Millis(300)).unwrap();
        assert_eq!(s.get(&NodeId::from_bytes([9; 32]), 10).len(), 2);
        assert_eq!(s.get(&NodeId::from_bytes([9; 32]), 1).len(), 1);
    }
}
