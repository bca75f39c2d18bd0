//! Suspected nodes: what a core remembers of the failure detector's verdicts.
//!
//! A node declared down (the runtime's failure detector closed its
//! connection for silence, a request to it timed out, a dial failed) is
//! *suspected* until it is heard from again or the suspicion expires. A core
//! consults the list so that it does not wait on a dead node: the DHT does
//! not ask it in lookups, RPC tries every other provider first. Bounded by
//! count (oldest suspicion out) and by age. Pure: time is an argument.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

use crate::time::Millis;

/// Suspected nodes (see the module docs), each kept for `ttl` at most, at
/// most `capacity` of them (the oldest suspicion goes first).
#[derive(Clone, Debug)]
pub struct SuspectList<K> {
    ttl: Millis,
    capacity: usize,
    since: HashMap<K, Millis>,
    /// (declared at, node): the oldest first.
    order: BTreeSet<(Millis, K)>,
    declared: u64,
    cleared: u64,
}

impl<K: Ord + Hash + Clone> SuspectList<K> {
    /// A list remembering at most `capacity` nodes for `ttl` each.
    pub fn new(ttl: Millis, capacity: usize) -> SuspectList<K> {
        SuspectList {
            ttl,
            capacity,
            since: HashMap::new(),
            order: BTreeSet::new(),
            declared: 0,
            cleared: 0,
        }
    }

    /// `node` was declared down at `now` (the detector, a transport timeout,
    /// a dial that failed). True when it was not already suspected.
    pub fn declare_down(&mut self, node: K, now: Millis) -> bool {
        self.expire(now);
        if self.capacity == 0 || self.since.contains_key(&node) {
            return false;
        }
        while self.since.len() >= self.capacity {
            match self.order.pop_first() {
                Some((_, oldest)) => {
                    self.since.remove(&oldest);
                }
                None => break,
            }
        }
        self.order.insert((now, node.clone()));
        self.since.insert(node, now);
        self.declared += 1;
        true
    }

    /// `node` answered (a connection to it came up): no longer suspected.
    /// True when it was.
    pub fn heard_from(&mut self, node: &K) -> bool {
        match self.since.remove(node) {
            Some(at) => {
                self.order.remove(&(at, node.clone()));
                self.cleared += 1;
                true
            }
            None => false,
        }
    }

    /// Is `node` suspected to be down at `now`?
    pub fn is_down(&self, node: &K, now: Millis) -> bool {
        self.since
            .get(node)
            .is_some_and(|at| now.saturating_sub(*at) < self.ttl)
    }

    /// Forgets suspicions older than the TTL.
    pub fn expire(&mut self, now: Millis) {
        while let Some((at, _)) = self.order.first() {
            if now.saturating_sub(*at) < self.ttl {
                break;
            }
            if let Some((_, node)) = self.order.pop_first() {
                self.since.remove(&node);
            }
        }
    }

    /// Nodes suspected now (some may be past their TTL until `expire`).
    pub fn len(&self) -> usize {
        self.since.len()
    }

    /// No node is suspected.
    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
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
