//! A caller's cache of each procedure's providers, as the last lookup found
//! them.
//!
//! Discovery costs a DHT lookup (several round trips); most calls go to a
//! procedure called a moment ago, so its providers are kept for a short TTL.
//! A provider that proves unreachable is dropped at once, so the next attempt
//! does not pick it again from a stale list. Bounded by a capacity: past it,
//! expired entries go first, then the one fetched longest ago (the
//! [`TtlCache`] rule: with one TTL for all, the closest to expiry).
//!
//! **Invariant:** no entry is served at or past `fetched + ttl` (the
//! addresses of [`ProviderCache::addrs_of`] are dial hints of any age); no
//! entry is empty (an empty list is a miss); at most `capacity` procedures.

use macula_wire::time::Millis;
use macula_wire::ttl_cache::TtlCache;

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

/// Providers by procedure, each list trusted for `ttl`.
#[derive(Debug, Clone)]
pub struct ProviderCache<K> {
    ttl: Millis,
    entries: TtlCache<String, Vec<ProviderInfo<K>>>,
}

impl<K: Clone + PartialEq> ProviderCache<K> {
    pub fn new(ttl: Millis, capacity: usize) -> ProviderCache<K> {
        ProviderCache {
            ttl,
            entries: TtlCache::new(capacity),
        }
    }

    /// The providers of `procedure` if fetched less than `ttl` before `now`.
    pub fn get(&self, procedure: &str, now: Millis) -> Option<&[ProviderInfo<K>]> {
        self.entries.get(procedure, now).map(Vec::as_slice)
    }

    /// Stores what a lookup at `now` found (an empty list is not stored).
    pub fn insert(&mut self, procedure: &str, providers: Vec<ProviderInfo<K>>, now: Millis) {
        if providers.is_empty() {
            return;
        }
        let expires = now.saturating_add(self.ttl);
        self.entries
            .insert(procedure.to_string(), providers, expires, now);
    }

    /// Forgets `provider` for `procedure` until the next lookup.
    pub fn drop_provider(&mut self, procedure: &str, provider: &K) {
        if let Some(providers) = self.entries.peek_mut(procedure) {
            providers.retain(|p| p.node != *provider);
            if providers.is_empty() {
                self.entries.remove(procedure);
            }
        }
    }

    /// Addresses `provider` advertised for `procedure` (empty if unknown).
    pub fn addrs_of(&self, procedure: &str, provider: &K) -> Vec<String> {
        self.entries
            .peek(procedure)
            .and_then(|providers| providers.iter().find(|p| p.node == *provider))
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
    fn capacity_evicts_expired_entries_first_then_the_oldest() {
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
        // Both fresh: "b", fetched longest ago, goes.
        c.insert("d", vec![p(1)], Millis(130));
        assert_eq!(c.len(), 2);
        assert!(c.get("b", Millis(130)).is_none());
        assert!(c.get("c", Millis(130)).is_some());
        assert!(c.get("d", Millis(130)).is_some());
        let mut none = ProviderCache::new(Millis(100), 0);
        none.insert("a", vec![p(1)], Millis(0));
        assert!(none.is_empty());
    }
}
