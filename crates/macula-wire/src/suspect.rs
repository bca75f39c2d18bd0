//! Suspected nodes: what a core remembers of the failure detector's verdicts.
//!
//! A node declared down (the runtime's failure detector closed its
//! connection for silence, a request to it timed out, a dial failed) is
//! *suspected* until it is heard from again or the suspicion expires. A core
//! consults the list so that it does not wait on a dead node: the DHT does
//! not ask it in lookups, RPC tries every other provider first. Bounded by
//! count (oldest suspicion out) and by age: a [`TtlCache`] whose entries
//! expire `ttl` after they were declared. Pure: time is an argument.

use std::hash::Hash;

use crate::time::Millis;
use crate::ttl_cache::TtlCache;

/// Suspected nodes (see the module docs), each kept for `ttl` at most, at
/// most `capacity` of them (the oldest suspicion goes first: with one TTL
/// for all, it is the closest to expiry).
#[derive(Clone, Debug)]
pub struct SuspectList<K> {
    ttl: Millis,
    suspects: TtlCache<K, ()>,
    declared: u64,
    cleared: u64,
}

impl<K: Hash + Eq + Clone> SuspectList<K> {
    /// A list remembering at most `capacity` nodes for `ttl` each.
    pub fn new(ttl: Millis, capacity: usize) -> SuspectList<K> {
        SuspectList {
            ttl,
            suspects: TtlCache::new(capacity),
            declared: 0,
            cleared: 0,
        }
    }

    /// `node` was declared down at `now` (the detector, a transport timeout,
    /// a dial that failed). True when it was not already suspected.
    pub fn declare_down(&mut self, node: K, now: Millis) -> bool {
        self.expire(now);
        if self.suspects.capacity() == 0 || self.suspects.peek(&node).is_some() {
            return false;
        }
        let until = now.saturating_add(self.ttl);
        self.suspects.insert(node, (), until, now);
        self.declared += 1;
        true
    }

    /// `node` answered (a connection to it came up): no longer suspected.
    /// True when it was.
    pub fn heard_from(&mut self, node: &K) -> bool {
        let was = self.suspects.remove(node).is_some();
        self.cleared += u64::from(was);
        was
    }

    /// Is `node` suspected to be down at `now`?
    pub fn is_down(&self, node: &K, now: Millis) -> bool {
        self.suspects.get(node, now).is_some()
    }

    /// Forgets suspicions older than the TTL.
    pub fn expire(&mut self, now: Millis) {
        self.suspects.expire(now);
    }

    /// Nodes suspected now (some may be past their TTL until `expire`).
    pub fn len(&self) -> usize {
        self.suspects.len()
    }

    /// No node is suspected.
    pub fn is_empty(&self) -> bool {
        self.suspects.is_empty()
    }

    /// Nodes declared down so far (each new suspicion counts once).
    pub fn declared_total(&self) -> u64 {
        self.declared
    }

    /// Suspicions cleared because the node answered again.
    pub fn cleared_total(&self) -> u64 {
        self.cleared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Millis {
        Millis(v)
    }

    fn node(b: u8) -> u8 {
        b
    }

    #[test]
    fn suspects_are_remembered_until_heard_from_or_expired() {
        let mut s = SuspectList::new(ms(1_000), 8);
        assert!(s.declare_down(node(1), ms(0)));
        assert!(!s.declare_down(node(1), ms(10)), "already suspected");
        assert!(s.is_down(&node(1), ms(999)));
        assert!(!s.is_down(&node(1), ms(1_000)), "past the TTL");
        assert!(!s.is_down(&node(2), ms(0)));
        assert!(s.heard_from(&node(1)));
        assert!(!s.heard_from(&node(1)));
        assert!(!s.is_down(&node(1), ms(10)));
        assert_eq!((s.declared_total(), s.cleared_total()), (1, 1));
        s.declare_down(node(3), ms(100));
        s.expire(ms(1_099));
        assert_eq!(s.len(), 1);
        s.expire(ms(1_100));
        assert!(s.is_empty());
        // Expired, so it can be declared again.
        assert!(s.declare_down(node(3), ms(1_200)));
    }

    #[test]
    fn suspects_are_bounded_oldest_out() {
        let mut s = SuspectList::new(ms(60_000), 3);
        for b in 1..=5 {
            s.declare_down(node(b), ms(u64::from(b)));
        }
        assert_eq!(s.len(), 3);
        assert!(!s.is_down(&node(1), ms(10)));
        assert!(!s.is_down(&node(2), ms(10)));
        assert!((3..=5).all(|b| s.is_down(&node(b), ms(10))));
        let mut none = SuspectList::new(ms(60_000), 0);
        assert!(!none.declare_down(node(1), ms(0)));
        assert!(none.is_empty());
    }
}
