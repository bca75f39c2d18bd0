//! The one bounded expiring cache: values by key, each with its own expiry
//! instant, at most `capacity` of them. RPC providers by procedure, pub/sub
//! routes and interest, DHT `get` results, relay routes and suspected nodes
//! all keep theirs in one. Pure: time is an argument (no clock), of any
//! ordered type: [`Millis`] in the cores, `Instant` in the runtime (the cache
//! only compares instants, the caller computes them).
//!
//! **Eviction rule:** inserting a key not held into a full cache first drops
//! every expired entry, then, if it is still full, the entry closest to
//! expiry (of equal expiries, the one inserted first). Replacing a held key
//! never evicts. Otherwise an expired entry stays (and counts in `len`) until
//! it is evicted, removed or [`TtlCache::expire`]d.
//!
//! **Invariant:** [`TtlCache::get`] never returns an entry at or past its
//! expiry; at most `capacity` entries (none if it is 0); every entry has
//! exactly one slot in the expiry index. Every operation is O(log n) (plus
//! O(log n) per entry it drops); nothing depends on hashing order.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use crate::time::Millis;

#[derive(Clone, Debug)]
struct Slot<V, T> {
    value: V,
    expires: T,
    /// Insertion order: the tie-break between equal expiries.
    seq: u64,
}

/// Values by key, each served until its own expiry, at most `capacity` of
/// them (see the module docs for what is evicted). `T` is the time type.
#[derive(Clone, Debug)]
pub struct TtlCache<K, V, T = Millis> {
    capacity: usize,
    entries: HashMap<K, Slot<V, T>>,
    /// `(expires, seq) -> key`: the entry closest to expiry first; exactly
    /// mirrors `entries`.
    by_expiry: BTreeMap<(T, u64), K>,
    next_seq: u64,
}

impl<K: Eq + Hash + Clone, V, T: Ord + Copy> TtlCache<K, V, T> {
    /// An empty cache of at most `capacity` entries (0: it stores nothing).
    pub fn new(capacity: usize) -> Self {
        TtlCache {
            capacity,
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// The most entries it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held, expired ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `key` if it has not expired at `now`.
    pub fn get<Q>(&self, key: &Q, now: T) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries
            .get(key)
            .filter(|s| now < s.expires)
            .map(|s| &s.value)
    }

    /// The value of `key` whether or not it has expired: for callers that
    /// deliberately use what they last knew (a hint, a stale answer while a
    /// refresh runs), never as a fresh answer.
    pub fn peek<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).map(|s| &s.value)
    }

    /// [`TtlCache::peek`], to change the value in place (its expiry stays).
    pub fn peek_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get_mut(key).map(|s| &mut s.value)
    }

    /// Every entry held, expired ones included (as [`TtlCache::peek`]), in
    /// no particular order.
    pub fn peek_iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, s)| (k, &s.value))
    }

    /// Stores `value` under `key` until `expires` (exclusive), at `now`:
    /// evicts as the module docs say if `key` is new and the cache is full.
    /// Returns the value it replaced. An entry already expired is stored
    /// too (never served; the first to go).
    pub fn insert(&mut self, key: K, value: V, expires: T, now: T) -> Option<V> {
        if self.capacity == 0 {
            return None;
        }
        let old = self.entries.remove(&key).map(|s| {
            self.by_expiry.remove(&(s.expires, s.seq));
            s.value
        });
        if old.is_none() && self.entries.len() >= self.capacity {
            self.expire(now);
            if self.entries.len() >= self.capacity {
                if let Some((_, k)) = self.by_expiry.pop_first() {
                    self.entries.remove(&k);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_expiry.insert((expires, seq), key.clone());
        self.entries.insert(
            key,
            Slot {
                value,
                expires,
                seq,
            },
        );
        old
    }

    /// Removes `key`, returning its value (expired or not).
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let s = self.entries.remove(key)?;
        self.by_expiry.remove(&(s.expires, s.seq));
        Some(s.value)
    }

    /// Keeps only the entries (expired or not) for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let by_expiry = &mut self.by_expiry;
        self.entries.retain(|k, s| {
            let kept = keep(k, &mut s.value);
            if !kept {
                by_expiry.remove(&(s.expires, s.seq));
            }
            kept
        });
    }

    /// Drops every entry expired at `now`; returns how many.
    pub fn expire(&mut self, now: T) -> usize {
        let mut dropped = 0;
        while let Some(first) = self.by_expiry.first_entry() {
            if first.key().0 > now {
                break;
            }
            self.entries.remove(&first.remove());
            dropped += 1;
        }
        dropped
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.by_expiry.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Millis {
        Millis(v)
    }

    #[test]
    fn entries_are_served_until_their_own_expiry() {
        let mut c = TtlCache::new(8);
        assert_eq!(c.insert("a", 1, ms(100), ms(0)), None);
        c.insert("b", 2, ms(50), ms(0));
        assert_eq!(c.get("a", ms(99)), Some(&1));
        assert_eq!(c.get("a", ms(100)), None, "expiry is exclusive");
        assert_eq!(c.get("b", ms(49)), Some(&2));
        assert_eq!(c.get("b", ms(50)), None);
        assert_eq!(c.get("c", ms(0)), None);
        // Expired entries stay until evicted, removed or expired.
        assert_eq!((c.len(), c.peek("b")), (2, Some(&2)));
        *c.peek_mut("b").unwrap() = 3;
        assert_eq!(c.peek_iter().count(), 2);
        assert_eq!(c.expire(ms(50)), 1);
        assert_eq!((c.len(), c.peek("b")), (1, None));
        // Replacing sets the new expiry and returns the old value.
        assert_eq!(c.insert("a", 4, ms(200), ms(60)), Some(1));
        assert_eq!(c.get("a", ms(150)), Some(&4));
        assert_eq!(c.remove("a"), Some(4));
        assert_eq!(c.remove("a"), None);
        assert!(c.is_empty());
        // Stored already expired: held, never served.
        c.insert("d", 5, ms(10), ms(10));
        assert_eq!((c.len(), c.get("d", ms(10))), (1, None));
    }

    #[test]
    fn a_full_cache_drops_the_expired_then_the_closest_to_expiry() {
        let mut c = TtlCache::new(3);
        c.insert(1, (), ms(10), ms(0));
        c.insert(2, (), ms(20), ms(0));
        c.insert(3, (), ms(30), ms(0));
        // Full: 1 and 2 have expired at 20; both go.
        c.insert(4, (), ms(100), ms(20));
        assert_eq!(c.len(), 2);
        assert!(c.peek(&1).is_none() && c.peek(&2).is_none());
        c.insert(5, (), ms(100), ms(20));
        // Nothing expired: 3 is the closest to expiry.
        c.insert(6, (), ms(200), ms(20));
        assert!(c.peek(&3).is_none());
        // 4 and 5 expire together: 4 was inserted first.
        c.insert(7, (), ms(200), ms(20));
        assert!(c.peek(&4).is_none() && c.peek(&5).is_some());
        // Replacing a held key never evicts.
        c.insert(5, (), ms(300), ms(20));
        assert_eq!(c.len(), 3);
        c.retain(|k, _| *k != 6);
        assert_eq!(c.len(), 2);
        c.clear();
        assert!(c.is_empty());
        let mut none = TtlCache::new(0);
        assert_eq!(none.insert(1, (), ms(10), ms(0)), None);
        assert!(none.is_empty());
    }

    #[test]
    fn any_ordered_time_type_works() {
        let t0 = std::time::Instant::now();
        let s = std::time::Duration::from_secs;
        let mut c = TtlCache::new(1);
        c.insert(String::from("k"), 1, t0 + s(5), t0);
        assert_eq!(c.get("k", t0 + s(4)), Some(&1));
        assert_eq!(c.get("k", t0 + s(5)), None);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert { key: u8, ttl: u64 },
        Get(u8),
        Remove(u8),
        RetainEven,
        Expire,
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..12, 0u64..40).prop_map(|(key, ttl)| Op::Insert { key, ttl }),
            4 => (0u8..12).prop_map(Op::Get),
            1 => (0u8..12).prop_map(Op::Remove),
            1 => Just(Op::RetainEven),
            1 => Just(Op::Expire),
            2 => (0u64..15).prop_map(Op::Advance),
        ]
    }

    /// The simplest cache with the same rule: a list, scanned.
    #[derive(Default)]
    struct Model {
        /// (key, value, expires, inserted): in insertion order.
        entries: Vec<(u8, u64, u64, u64)>,
        inserted: u64,
    }

    impl Model {
        fn get(&self, key: u8, now: u64) -> Option<u64> {
            self.entries
                .iter()
                .find(|e| e.0 == key && now < e.2)
                .map(|e| e.1)
        }

        fn insert(&mut self, cap: usize, key: u8, value: u64, expires: u64, now: u64) {
            if cap == 0 {
                return;
            }
            let held = self.entries.iter().any(|e| e.0 == key);
            self.entries.retain(|e| e.0 != key);
            if !held && self.entries.len() >= cap {
                self.entries.retain(|e| now < e.2);
                if self.entries.len() >= cap {
                    let i = (0..self.entries.len())
                        .min_by_key(|&i| (self.entries[i].2, self.entries[i].3))
                        .unwrap();
                    self.entries.remove(i);
                }
            }
            self.inserted += 1;
            self.entries.push((key, value, expires, self.inserted));
        }
    }

    proptest! {
        /// The cache matches the model, never serves an expired entry,
        /// never exceeds its capacity, and serves what was inserted until
        /// its expiry unless it was removed or evicted by capacity.
        #[test]
        fn behaves_as_the_model(cap in 0usize..6, ops in proptest::collection::vec(op(), 1..200)) {
            let mut c: TtlCache<u8, u64> = TtlCache::new(cap);
            let mut m = Model::default();
            // The last value inserted per key, its expiry, and whether it
            // may have left since (removed, retained out, evicted).
            let mut last: HashMap<u8, (u64, u64, bool)> = HashMap::new();
            let mut now = 0u64;
            for (i, op) in ops.into_iter().enumerate() {
                let value = i as u64;
                match op {
                    Op::Insert { key, ttl } => {
                        let full = c.len() >= cap && c.peek(&key).is_none();
                        c.insert(key, value, ms(now + ttl), ms(now));
                        m.insert(cap, key, value, now + ttl, now);
                        if full {
                            for l in last.values_mut() {
                                l.2 = true;
                            }
                        }
                        last.insert(key, (value, now + ttl, cap == 0));
                    }
                    Op::Get(key) => {
                        let got = c.get(&key, ms(now)).copied();
                        prop_assert_eq!(got, m.get(key, now));
                        if let Some(v) = got {
                            let (lv, exp, _) = last[&key];
                            prop_assert_eq!(v, lv);
                            prop_assert!(now < exp, "served expired");
                        }
                        if let Some(&(lv, exp, gone)) = last.get(&key) {
                            if now < exp && !gone {
                                prop_assert_eq!(got, Some(lv));
                            }
                        }
                    }
                    Op::Remove(key) => {
                        let had = m.entries.iter().find(|e| e.0 == key).map(|e| e.1);
                        prop_assert_eq!(c.remove(&key), had);
                        m.entries.retain(|e| e.0 != key);
                        if let Some(l) = last.get_mut(&key) {
                            l.2 = true;
                        }
                    }
                    Op::RetainEven => {
                        c.retain(|_, v| *v % 2 == 0);
                        m.entries.retain(|e| e.1 % 2 == 0);
                        for l in last.values_mut() {
                            l.2 |= l.0 % 2 == 1;
                        }
                    }
                    Op::Expire => {
                        let before = m.entries.len();
                        m.entries.retain(|e| now < e.2);
                        prop_assert_eq!(c.expire(ms(now)), before - m.entries.len());
                    }
                    Op::Advance(d) => now += d,
                }
                prop_assert!(c.len() <= cap);
                prop_assert_eq!(c.len(), m.entries.len());
                prop_assert_eq!(c.by_expiry.len(), c.entries.len());
            }
        }
    }
}
