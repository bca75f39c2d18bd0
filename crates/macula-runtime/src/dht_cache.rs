//! A bounded cache of recent DHT `get` results, so a repeated lookup of the
//! same key is answered locally instead of by an iterative lookup.
//!
//! Pure bookkeeping: time comes in as an argument, no I/O. An entry lives at
//! most `max_age` and never past the shortest remaining TTL of its records;
//! empty results are not cached (a record published a moment later must be
//! found). The local node invalidates a key when it puts to it.

use std::time::{Duration, Instant};

use macula_wire::ttl_cache::TtlCache;
use macula_wire::NodeId;

use macula_dht::Record;

/// A record as returned to applications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtRecord {
    pub key: NodeId,
    /// The node that published and signed it (verified).
    pub publisher: NodeId,
    pub seq: u64,
    pub ttl: Duration,
    pub value: Vec<u8>,
}

impl From<Record> for DhtRecord {
    fn from(r: Record) -> Self {
        DhtRecord {
            key: r.key,
            publisher: r.publisher,
            seq: r.seq,
            ttl: Duration::from_millis(r.ttl.0),
            value: r.value,
        }
    }
}

/// Keys cached at once; past this expired entries are dropped, then the one
/// closest to expiry.
pub const DHT_CACHE_CAPACITY: usize = 1024;
/// How stale a cached answer may be: other publishers' updates to the same
/// key become visible after at most this long.
pub const DHT_CACHE_MAX_AGE: Duration = Duration::from_secs(30);

struct Entry {
    records: Vec<DhtRecord>,
    stored: Instant,
}

pub(crate) struct GetCache {
    /// Each entry expires `max_age` after it was stored, or earlier at its
    /// shortest record TTL.
    entries: TtlCache<NodeId, Entry, Instant>,
    max_age: Duration,
}

impl GetCache {
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        GetCache {
            entries: TtlCache::new(capacity.max(1)),
            max_age,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The cached records for `key`, their TTLs reduced by the time spent in
    /// the cache; `None` when absent or expired.
    pub fn get(&mut self, key: &NodeId, now: Instant) -> Option<Vec<DhtRecord>> {
        let Some(e) = self.entries.get(key, now) else {
            self.entries.remove(key);
            return None;
        };
        let age = now.saturating_duration_since(e.stored);
        Some(
            e.records
                .iter()
                .map(|r| DhtRecord {
                    ttl: r.ttl.saturating_sub(age),
                    ..r.clone()
                })
                .collect(),
        )
    }

    pub fn insert(&mut self, key: NodeId, records: Vec<DhtRecord>, now: Instant) {
        let Some(shortest) = records.iter().map(|r| r.ttl).min() else {
            return;
        };
        let life = shortest.min(self.max_age);
        if life.is_zero() {
            return;
        }
        let stored = Entry {
            records,
            stored: now,
        };
        self.entries.insert(key, stored, now + life, now);
    }

    pub fn invalidate(&mut self, key: &NodeId) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ttl_s: u64, v: u8) -> DhtRecord {
        DhtRecord {
            key: NodeId::from_bytes([1; 32]),
            publisher: NodeId::from_bytes([v; 32]),
            seq: 1,
            ttl: Duration::from_secs(ttl_s),
            value: vec![v],
        }
    }

    fn key(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    #[test]
    fn entries_expire_at_max_age_or_shortest_ttl() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = GetCache::new(8, s(30));
        c.insert(key(1), vec![rec(3600, 1)], t0);
        c.insert(key(2), vec![rec(3600, 1), rec(5, 2)], t0);
        let got = c.get(&key(1), t0 + s(10)).unwrap();
        assert_eq!(got[0].ttl, s(3590), "TTL ages in the cache");
        assert!(c.get(&key(1), t0 + s(30)).is_none(), "max age");
        assert!(c.get(&key(2), t0 + s(4)).is_some());
        assert!(c.get(&key(2), t0 + s(5)).is_none(), "shortest TTL");
        assert_eq!(c.len(), 0, "expired entries are dropped");
    }

    #[test]
    fn empty_results_are_not_cached_and_puts_invalidate() {
        let t0 = Instant::now();
        let mut c = GetCache::new(8, DHT_CACHE_MAX_AGE);
        c.insert(key(1), vec![], t0);
        assert!(c.get(&key(1), t0).is_none());
        c.insert(key(1), vec![rec(60, 1)], t0);
        c.invalidate(&key(1));
        assert!(c.get(&key(1), t0).is_none());
    }

    #[test]
    fn capacity_is_a_hard_bound() {
        let t0 = Instant::now();
        let mut c = GetCache::new(3, DHT_CACHE_MAX_AGE);
        for n in 0..10u8 {
            c.insert(key(n), vec![rec(10 + u64::from(n), n)], t0);
            assert!(c.len() <= 3);
        }
        // The survivors are the ones furthest from expiry.
        assert!(c.get(&key(9), t0).is_some());
        assert!(c.get(&key(0), t0).is_none());
    }
}
