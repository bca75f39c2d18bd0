//! A caller's cache of each procedure's providers, as the last lookup found
//! them.
//!
//! Discovery costs a DHT lookup (several round trips); most calls go to a
//! procedure called a moment ago, so its providers are kept for a short TTL.
//! A provider that proves unreachable is dropped at once, so the next attempt
//! does not pick it again from a stale list. Bounded by a capacity: past it,
//! expired entries go first, and if all are fresh the whole cache is cleared
//! (cheap, and a burst of distinct procedures only costs lookups).
//!
//! **Invariant:** no entry is served at or past `fetched + ttl`; no entry is
//! empty (an empty list is a miss); at most `capacity` procedures.

use std::collections::HashMap;

use macula_wire::time::Millis;

/// One provider as found in the DHT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderInfo<K> {
    pub node: K,
    pub weight: u32,
    pub metadata: Vec<(String, String)>,
    pub addrs: Vec<String>,
    /// The advertisement record's sequence number: a provider that
    /// restarted publishes a higher one (0 when unknown).
    pub seq: u64,
}

#[derive(Debug, Clone)]
struct Entry<K> {
    fetched: Millis,
    providers: Vec<ProviderInfo<K>>,
}

/// Providers by procedure, each list trusted for `ttl`.
#[derive(Debug, Clone)]
pub struct ProviderCache<K> {
    ttl: Millis,
    capacity: usize,
    entries: HashMap<String, Entry<K>>,
}

impl<K: Clone + PartialEq> ProviderCache<K> {
    pub fn new(ttl: Millis, capacity: usize) -> ProviderCache<K> {
        ProviderCache {
            ttl,
            capacity,
            entries: HashMap::new(),
        }
    }

    /// The providers of `procedure` if fetched less than `ttl` before `now`.
    pub fn get(&self, procedure: &str, now: Millis) -> Option<&[ProviderInfo<K>]> {
        self.entries
            .get(procedure)
            .filter(|e| self.fresh(e, now))
            .map(|e| e.providers.as_slice())
    }

    fn fresh(&self, e: &Entry<K>, now: Millis) -> bool {
        now < e.fetched.saturating_add(self.ttl)
    }

    /// Stores what a lookup at `now` found (an empty list is not stored).
    pub fn insert(&mut self, procedure: &str, providers: Vec<ProviderInfo<K>>, now: Millis) {
        if providers.is_empty() || self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(procedure) {
            let (ttl, entries) = (self.ttl, &mut self.entries);
            entries.retain(|_, e| now < e.fetched.saturating_add(ttl));
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        self.entries.insert(
            procedure.to_string(),
            Entry {
                fetched: now,
                providers,
            },
        );
    }

    /// Forgets `provider` for `procedure` until the next lookup.
    pub fn drop_provider(&mut self, procedure: &str, provider: &K) {
        if let Some(e) = self.entries.get_mut(procedure) {
            e.providers.retain(|p| p.node != *provider);
            if e.providers.is_empty() {
                self.entries.remove(procedure);
            }
        }
    }

    /// Addresses `provider` advertised for `procedure` (empty if unknown).
    pub fn addrs_of(&self, procedure: &str, provider: &K) -> Vec<String> {
        self.entries
            .get(procedure)
            .and_then(|e| e.providers.iter().find(|p| p.node == *provider))
            .map(|p| p.addrs.clone())
            .unwrap_or_default()
    }

    /// Procedures cached (fresh or not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(node: u32) -> ProviderInfo<u32> {
        ProviderInfo {
            node,
            weight: 1,
            metadata: Vec::new(),
            addrs: vec![format!("198.18.0.{node}:1")],
            seq: 0,
        }
    }

    #[test]
    fn entries_expire_exactly_at_the_ttl() {
        let mut c = ProviderCache::new(Millis(5000), 8);
        c.insert("a", vec![p(1)], Millis(100));
        assert_eq!(c.get("a", Millis(100)).map(<[_]>::len), Some(1));
        assert_eq!(c.get("a", Millis(5099)).map(<[_]>::len), Some(1));
        assert!(c.get("a", Millis(5100)).is_none());
        assert!(c.get("b", Millis(100)).is_none());
    }

    #[test]
    fn empty_lists_are_misses_and_dropping_the_last_provider_removes_the_entry() {
        let mut c = ProviderCache::new(Millis(5000), 8);
        c.insert("a", Vec::new(), Millis(0));
        assert!(c.is_empty());
        c.insert("a", vec![p(1), p(2)], Millis(0));
        assert_eq!(c.addrs_of("a", &2), vec!["198.18.0.2:1".to_string()]);
        assert!(c.addrs_of("a", &3).is_empty());
        assert!(c.addrs_of("b", &1).is_empty());
        c.drop_provider("a", &1);
        assert_eq!(c.get("a", Millis(1)), Some(&[p(2)][..]));
        c.drop_provider("b", &1);
        c.drop_provider("a", &2);
        assert!(c.get("a", Millis(1)).is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn capacity_evicts_expired_entries_first_then_everything() {
        let mut c = ProviderCache::new(Millis(100), 2);
        c.insert("a", vec![p(1)], Millis(0));
        c.insert("b", vec![p(1)], Millis(50));
        assert!(!c.is_empty());
        // "a" expires exactly at 100: it makes room, "b" stays.
        c.insert("c", vec![p(1)], Millis(100));
        assert_eq!(c.len(), 2);
        assert!(c.get("b", Millis(100)).is_some());
        assert!(c.get("c", Millis(100)).is_some());
        // Updating a present entry never evicts.
        c.insert("c", vec![p(2)], Millis(121));
        assert_eq!(c.len(), 2);
        // Both fresh: the cache starts over.
        c.insert("d", vec![p(1)], Millis(130));
        assert_eq!(c.len(), 1);
        assert!(c.get("d", Millis(130)).is_some());
        let mut none = ProviderCache::new(Millis(100), 0);
        none.insert("a", vec![p(1)], Millis(0));
        assert!(none.is_empty());
    }
}
