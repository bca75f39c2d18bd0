//! Counters: [`GCounter`] (grow only) and [`PnCounter`] (up and down).
//!
//! One entry per node; only that node raises its own entry, so entries of
//! one node seen by different replicas are points of one chain and the join
//! is the pointwise maximum. A delta is the node's whole new entry, so a
//! state never mixes two points of one node's chain. The digest is the
//! state itself (the counts are the version vector).

use std::collections::BTreeMap;

use macula_wire::NodeId;
use serde::{Deserialize, Serialize};

use crate::{Cap, Crdt, CrdtError};

/// A grow-only counter: the sum of per-node counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GCounter {
    counts: BTreeMap<NodeId, u64>,
    #[serde(skip)]
    cap: Cap,
}

impl GCounter {
    /// Zero, with the default limit on nodes.
    pub fn new() -> GCounter {
        GCounter::default()
    }

    /// Zero, holding at most `max` nodes' entries.
    pub fn with_max_entries(max: usize) -> GCounter {
        GCounter {
            counts: BTreeMap::new(),
            cap: Cap(max),
        }
    }

    /// Adds `by` to `node`'s entry; returns the delta (empty when `by` is 0).
    pub fn increment(&mut self, node: NodeId, by: u64) -> Result<GCounter, CrdtError> {
        if by == 0 {
            return Ok(GCounter::default());
        }
        let current = self.counts.get(&node).copied();
        if current.is_none() && self.counts.len() >= self.cap.0 {
            return Err(CrdtError::LimitExceeded {
                what: "nodes",
                limit: self.cap.0,
            });
        }
        let new = current
            .unwrap_or(0)
            .checked_add(by)
            .ok_or(CrdtError::Overflow)?;
        self.counts.insert(node, new);
        let mut delta = GCounter::default();
        delta.counts.insert(node, new);
        Ok(delta)
    }

    /// The counter's value: the sum of every node's count.
    pub fn value(&self) -> u128 {
        self.counts.values().map(|&c| u128::from(c)).sum()
    }

    /// `node`'s count (0 when unknown).
    pub fn get(&self, node: &NodeId) -> u64 {
        self.counts.get(node).copied().unwrap_or(0)
    }

    /// Every node's count, in node order.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &u64)> {
        self.counts.iter()
    }
}

impl Crdt for GCounter {
    /// Every node's count.
    type Digest = BTreeMap<NodeId, u64>;

    fn merge(&mut self, other: &GCounter) {
        for (node, &c) in &other.counts {
            let e = self.counts.entry(*node).or_insert(0);
            *e = (*e).max(c);
        }
    }

    fn digest(&self) -> Self::Digest {
        self.counts.clone()
    }

    fn delta_since(&self, theirs: &Self::Digest) -> Option<GCounter> {
        let counts: BTreeMap<NodeId, u64> = self
            .counts
            .iter()
            .filter(|(n, &c)| theirs.get(n).is_none_or(|&t| t < c))
            .map(|(n, &c)| (*n, c))
            .collect();
        (!counts.is_empty()).then(|| GCounter {
            counts,
            cap: Cap::default(),
        })
    }

    fn lacks(&self, theirs: &Self::Digest) -> bool {
        theirs.iter().any(|(n, &t)| t > self.get(n))
    }

    fn size(&self) -> usize {
        self.counts.len()
    }

    fn max_size(&self) -> usize {
        self.cap.0
    }
}

/// One node's entry of a [`PnCounter`]: what it added and what it took away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PnEntry {
    /// Sum of its increments.
    pub inc: u64,
    /// Sum of its decrements.
    pub dec: u64,
}

impl PnEntry {
    /// Whether `self` is at or behind `other` on both counts.
    fn le(&self, other: &PnEntry) -> bool {
        self.inc <= other.inc && self.dec <= other.dec
    }
}

/// A counter that goes up and down: per node, increments and decrements.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PnCounter {
    entries: BTreeMap<NodeId, PnEntry>,
    #[serde(skip)]
    cap: Cap,
}

impl PnCounter {
    /// Zero, with the default limit on nodes.
    pub fn new() -> PnCounter {
        PnCounter::default()
    }

    /// Zero, holding at most `max` nodes' entries.
    pub fn with_max_entries(max: usize) -> PnCounter {
        PnCounter {
            entries: BTreeMap::new(),
            cap: Cap(max),
        }
    }

    /// Adds `by`; returns the delta (empty when `by` is 0).
    pub fn increment(&mut self, node: NodeId, by: u64) -> Result<PnCounter, CrdtError> {
        self.change(node, by, |e| &mut e.inc)
    }

    /// Subtracts `by`; returns the delta (empty when `by` is 0).
    pub fn decrement(&mut self, node: NodeId, by: u64) -> Result<PnCounter, CrdtError> {
        self.change(node, by, |e| &mut e.dec)
    }

    fn change(
        &mut self,
        node: NodeId,
        by: u64,
        field: impl Fn(&mut PnEntry) -> &mut u64,
    ) -> Result<PnCounter, CrdtError> {
        if by == 0 {
            return Ok(PnCounter::default());
        }
        let current = self.entries.get(&node).copied();
        if current.is_none() && self.entries.len() >= self.cap.0 {
            return Err(CrdtError::LimitExceeded {
                what: "nodes",
                limit: self.cap.0,
            });
        }
        let mut e = current.unwrap_or_default();
        let f = field(&mut e);
        *f = f.checked_add(by).ok_or(CrdtError::Overflow)?;
        self.entries.insert(node, e);
        let mut delta = PnCounter::default();
        delta.entries.insert(node, e);
        Ok(delta)
    }

    /// The counter's value: increments minus decrements, over every node.
    pub fn value(&self) -> i128 {
        self.entries
            .values()
            .map(|e| i128::from(e.inc) - i128::from(e.dec))
            .sum()
    }

    /// `node`'s entry (zero when unknown).
    pub fn get(&self, node: &NodeId) -> PnEntry {
        self.entries.get(node).copied().unwrap_or_default()
    }

    /// Every node's entry, in node order.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &PnEntry)> {
        self.entries.iter()
    }
}

impl Crdt for PnCounter {
    /// Every node's entry.
    type Digest = BTreeMap<NodeId, PnEntry>;

    fn merge(&mut self, other: &PnCounter) {
        for (node, theirs) in &other.entries {
            let e = self.entries.entry(*node).or_default();
            e.inc = e.inc.max(theirs.inc);
            e.dec = e.dec.max(theirs.dec);
        }
    }

    fn digest(&self) -> Self::Digest {
        self.entries.clone()
    }

    fn delta_since(&self, theirs: &Self::Digest) -> Option<PnCounter> {
        let entries: BTreeMap<NodeId, PnEntry> = self
            .entries
            .iter()
            .filter(|(n, e)| theirs.get(n).is_none_or(|t| !e.le(t)))
            .map(|(n, e)| (*n, *e))
            .collect();
        (!entries.is_empty()).then(|| PnCounter {
            entries,
            cap: Cap::default(),
        })
    }

    fn lacks(&self, theirs: &Self::Digest) -> bool {
        theirs.iter().any(|(n, t)| !t.le(&self.get(n)))
    }

    fn size(&self) -> usize {
        self.entries.len()
    }

    fn max_size(&self) -> usize {
        self.cap.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    #[test]
    fn g_counter_counts_and_merges_by_maximum() {
        let (mut a, mut b) = (GCounter::new(), GCounter::new());
        let d1 = a.increment(id(1), 3).unwrap();
        a.increment(id(1), 2).unwrap();
        b.increment(id(2), 7).unwrap();
        assert_eq!(a.value(), 5);
        b.merge(&d1);
        assert_eq!(b.value(), 10);
        b.merge(&a);
        assert_eq!(b.value(), 12);
        assert_eq!(b.get(&id(1)), 5);
        assert_eq!(b.get(&id(3)), 0);
        assert_eq!(b.iter().count(), 2);
        assert_eq!(a.increment(id(1), 0).unwrap(), GCounter::default());
        assert_eq!(a.increment(id(1), u64::MAX), Err(CrdtError::Overflow));
        assert_eq!(a.value(), 5);
    }

    #[test]
    fn pn_counter_goes_both_ways() {
        let mut a = PnCounter::new();
        a.increment(id(1), 10).unwrap();
        let d = a.decrement(id(1), 4).unwrap();
        assert_eq!(d.get(&id(1)), PnEntry { inc: 10, dec: 4 });
        a.decrement(id(2), 9).unwrap();
        assert_eq!(a.value(), -3);
        assert_eq!(a.iter().count(), 2);
        assert_eq!(a.decrement(id(2), 0).unwrap(), PnCounter::default());
        assert_eq!(a.decrement(id(2), u64::MAX), Err(CrdtError::Overflow));
        assert_eq!(a.value(), -3);
    }

    #[test]
    fn counters_refuse_a_node_past_their_limit() {
        let mut g = GCounter::with_max_entries(1);
        g.increment(id(1), 1).unwrap();
        g.increment(id(1), 1).unwrap();
        let err = g.increment(id(2), 1).unwrap_err();
        assert_eq!(
            err,
            CrdtError::LimitExceeded {
                what: "nodes",
                limit: 1
            }
        );
        assert_eq!(g.value(), 2);
        assert_eq!(g.max_size(), 1);
        let mut other = GCounter::new();
        other.increment(id(2), 1).unwrap();
        assert!(g.try_merge(&other).is_err());
        assert_eq!(g.value(), 2);
        let mut p = PnCounter::with_max_entries(1);
        p.decrement(id(1), 1).unwrap();
        assert!(p.increment(id(2), 1).is_err());
        assert_eq!(p.value(), -1);
        assert_eq!(p.max_size(), 1);
    }

    #[test]
    fn pn_digest_compares_both_counts() {
        let mut a = PnCounter::new();
        a.increment(id(1), 5).unwrap();
        let mut b = a.clone();
        b.decrement(id(1), 1).unwrap();
        // b has a decrement a lacks, with the same increments.
        assert!(a.lacks(&b.digest()));
        assert!(!b.lacks(&a.digest()));
        assert_eq!(a.delta_since(&b.digest()), None);
        let d = b.delta_since(&a.digest()).unwrap();
        a.merge(&d);
        assert_eq!(a, b);
    }
}
