//! Dots and dot sets: the causal context of the dotted CRDTs ([`OrSet`],
//! [`LwwMap`], [`LwwElementSet`]).
//!
//! A [`Dot`] names one update: the `seq`-th update a replica made (`seq`
//! counts from 1). A [`DotSet`] is the set of updates a state has seen,
//! kept per node as sorted, disjoint, non-adjacent inclusive ranges, so a
//! replica that has seen everything of a node holds one range for it
//! (`1..=max`, the classic version vector) and one that missed some holds a
//! few more (the "dot cloud" of the literature, without a separate type).
//!
//! [`OrSet`]: crate::OrSet
//! [`LwwMap`]: crate::LwwMap
//! [`LwwElementSet`]: crate::LwwElementSet

use std::collections::BTreeMap;

use macula_wire::NodeId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One update: the `seq`-th update replica `node` made (from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The replica that made the update.
    pub node: NodeId,
    /// Its number among that replica's updates, from 1.
    pub seq: u64,
}

/// Inclusive ranges of sequence numbers: sorted, disjoint, non-adjacent,
/// every `lo` at least 1 and at most its `hi`.
type Ranges = Vec<(u64, u64)>;

/// A set of dots. Canonical: two equal sets have equal representations, so
/// the derived `PartialEq` is set equality.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DotSet {
    ranges: BTreeMap<NodeId, Ranges>,
}

impl DotSet {
    /// The empty set.
    pub fn new() -> DotSet {
        DotSet::default()
    }

    /// True when no dot is in the set.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `dot` is in the set.
    pub fn contains(&self, dot: &Dot) -> bool {
        let Some(r) = self.ranges.get(&dot.node) else {
            return false;
        };
        let i = r.partition_point(|&(_, hi)| hi < dot.seq);
        i < r.len() && r[i].0 <= dot.seq
    }

    /// Adds one dot.
    pub fn insert(&mut self, dot: Dot) {
        if dot.seq == 0 {
            return;
        }
        let merged = match self.ranges.get(&dot.node) {
            Some(r) => union(r, &[(dot.seq, dot.seq)]),
            None => vec![(dot.seq, dot.seq)],
        };
        self.ranges.insert(dot.node, merged);
    }

    /// Adds the dots `node:lo..=node:hi` (nothing when `lo > hi`; seq 0 is
    /// not a dot and is skipped).
    pub fn insert_range(&mut self, node: NodeId, lo: u64, hi: u64) {
        let lo = lo.max(1);
        if lo > hi {
            return;
        }
        let merged = match self.ranges.get(&node) {
            Some(r) => union(r, &[(lo, hi)]),
            None => vec![(lo, hi)],
        };
        self.ranges.insert(node, merged);
    }

    /// The highest seq seen of `node` (0 when none).
    pub fn max(&self, node: &NodeId) -> u64 {
        self.ranges
            .get(node)
            .and_then(|r| r.last())
            .map_or(0, |&(_, hi)| hi)
    }

    /// The dot `node`'s next update takes: one past the highest seen.
    pub fn next(&self, node: NodeId) -> Dot {
        Dot {
            node,
            seq: self.max(&node).saturating_add(1),
        }
    }

    /// Adds every dot of `other`.
    pub fn union_with(&mut self, other: &DotSet) {
        for (node, theirs) in &other.ranges {
            match self.ranges.get_mut(node) {
                Some(mine) => *mine = union(mine, theirs),
                None => {
                    self.ranges.insert(*node, theirs.clone());
                }
            }
        }
    }

    /// The dots of `self` that are not in `other`.
    pub fn difference(&self, other: &DotSet) -> DotSet {
        let mut out = BTreeMap::new();
        for (node, mine) in &self.ranges {
            let left = match other.ranges.get(node) {
                Some(theirs) => subtract(mine, theirs),
                None => mine.clone(),
            };
            if !left.is_empty() {
                out.insert(*node, left);
            }
        }
        DotSet { ranges: out }
    }

    /// The dots in both `self` and `other`.
    pub fn intersection(&self, other: &DotSet) -> DotSet {
        let mut out = BTreeMap::new();
        for (node, mine) in &self.ranges {
            if let Some(theirs) = other.ranges.get(node) {
                let both = intersect(mine, theirs);
                if !both.is_empty() {
                    out.insert(*node, both);
                }
            }
        }
        DotSet { ranges: out }
    }

    /// Whether every dot of `self` is in `other`.
    pub fn is_subset(&self, other: &DotSet) -> bool {
        self.ranges.iter().all(|(node, mine)| {
            other
                .ranges
                .get(node)
                .is_some_and(|theirs| subtract(mine, theirs).is_empty())
        })
    }

    /// Number of ranges held: the size of this set's representation.
    pub fn n_ranges(&self) -> usize {
        self.ranges.values().map(Vec::len).sum()
    }

    /// The ranges of each node, `(node, lo, hi)` inclusive, in order.
    pub fn iter_ranges(&self) -> impl Iterator<Item = (NodeId, u64, u64)> + '_ {
        self.ranges
            .iter()
            .flat_map(|(node, r)| r.iter().map(move |&(lo, hi)| (*node, lo, hi)))
    }

    /// Builds the canonical form of arbitrary ranges (what a peer sent):
    /// drops empty and zero ranges, sorts, merges overlaps.
    fn from_raw(raw: BTreeMap<NodeId, Ranges>) -> DotSet {
        let mut ranges = BTreeMap::new();
        for (node, mut r) in raw {
            r.retain(|&(lo, hi)| lo >= 1 && lo <= hi);
            r.sort_unstable();
            let r = union(&r, &[]);
            if !r.is_empty() {
                ranges.insert(node, r);
            }
        }
        DotSet { ranges }
    }
}

impl FromIterator<Dot> for DotSet {
    fn from_iter<I: IntoIterator<Item = Dot>>(iter: I) -> DotSet {
        let mut s = DotSet::new();
        for d in iter {
            s.insert(d);
        }
        s
    }
}

impl Serialize for DotSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.ranges.serialize(s)
    }
}

impl<'de> Deserialize<'de> for DotSet {
    /// Accepts any ranges and makes them canonical, so a peer's malformed
    /// set cannot break the laws or the equality of states.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DotSet, D::Error> {
        BTreeMap::<NodeId, Ranges>::deserialize(d).map(DotSet::from_raw)
    }
}

/// Union of two canonical range lists (or of a sorted list with `[]`, which
/// makes it canonical).
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out: Ranges = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = if j >= b.len() || (i < a.len() && a[i].0 <= b[j].0) {
            i += 1;
            a[i - 1]
        } else {
            j += 1;
            b[j - 1]
        };
        match out.last_mut() {
            Some(last) if last.1.saturating_add(1) >= next.0 => last.1 = last.1.max(next.1),
            _ => out.push(next),
        }
    }
    out
}

/// `a` minus `b`, both canonical.
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let mut j = 0;
    for &(lo, hi) in a {
        let mut lo = lo;
        while j < b.len() && b[j].1 < lo {
            j += 1;
        }
        let mut k = j;
        let mut alive = true;
        while k < b.len() && b[k].0 <= hi {
            let (blo, bhi) = b[k];
            if blo > lo {
                out.push((lo, blo - 1));
            }
            if bhi >= hi {
                alive = false;
                break;
            }
            lo = bhi + 1;
            k += 1;
        }
        if alive {
            out.push((lo, hi));
        }
    }
    out
}

/// `a` and `b`, both canonical.
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if lo <= hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn node(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn set_of(dots: &BTreeSet<(u8, u64)>) -> DotSet {
        dots.iter()
            .map(|&(n, seq)| Dot { node: node(n), seq })
            .collect()
    }

    fn dots_of(s: &DotSet) -> BTreeSet<(u8, u64)> {
        s.iter_ranges()
            .flat_map(|(n, lo, hi)| (lo..=hi).map(move |q| (n.as_bytes()[0], q)))
            .collect()
    }

    fn arb_dots() -> impl Strategy<Value = BTreeSet<(u8, u64)>> {
        proptest::collection::btree_set((0u8..3, 1u64..40), 0..40)
    }

    proptest! {
        #[test]
        fn set_operations_match_a_plain_set(a in arb_dots(), b in arb_dots()) {
            let (sa, sb) = (set_of(&a), set_of(&b));
            prop_assert_eq!(dots_of(&sa), a.clone());
            let mut u = sa.clone();
            u.union_with(&sb);
            prop_assert_eq!(dots_of(&u), a.union(&b).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(u.clone(), set_of(&a.union(&b).copied().collect()));
            prop_assert_eq!(
                dots_of(&sa.difference(&sb)),
                a.difference(&b).copied().collect::<BTreeSet<_>>()
            );
            prop_assert_eq!(
                dots_of(&sa.intersection(&sb)),
                a.intersection(&b).copied().collect::<BTreeSet<_>>()
            );
            prop_assert_eq!(sa.is_subset(&sb), a.is_subset(&b));
            for n in 0..3u8 {
                for seq in 0..42 {
                    let d = Dot { node: node(n), seq };
                    prop_assert_eq!(sa.contains(&d), a.contains(&(n, seq)));
                }
                let max = a.iter().filter(|x| x.0 == n).map(|x| x.1).max().unwrap_or(0);
                prop_assert_eq!(sa.max(&node(n)), max);
                prop_assert_eq!(sa.next(node(n)).seq, max + 1);
            }
            let bytes = rmp_serde::to_vec(&sa).unwrap();
            prop_assert_eq!(rmp_serde::from_slice::<DotSet>(&bytes).unwrap(), sa);
        }
    }

    #[test]
    fn ranges_stay_compact_and_raw_input_is_normalised() {
        let mut s = DotSet::new();
        for seq in 1..=100 {
            s.insert(Dot { node: node(1), seq });
        }
        assert_eq!(s.n_ranges(), 1);
        s.insert(Dot {
            node: node(1),
            seq: 0,
        });
        assert_eq!(s.n_ranges(), 1);
        s.insert_range(node(1), 0, 0);
        s.insert_range(node(2), 5, 4);
        assert_eq!(s.n_ranges(), 1);
        s.insert_range(node(1), 0, 150);
        assert_eq!(s.max(&node(1)), 150);
        assert_eq!(s.n_ranges(), 1);
        let mut raw = BTreeMap::new();
        raw.insert(
            node(1),
            vec![(9, 12), (0, 3), (5, 2), (1, 4), (13, 13), (20, 25)],
        );
        raw.insert(node(2), vec![(3, 1)]);
        let bytes = rmp_serde::to_vec(&raw).unwrap();
        let s: DotSet = rmp_serde::from_slice(&bytes).unwrap();
        let got: Vec<_> = s.iter_ranges().map(|(_, lo, hi)| (lo, hi)).collect();
        assert_eq!(got, vec![(1, 4), (9, 13), (20, 25)]);
        assert!(!s.is_empty());
        assert!(DotSet::new().is_empty());
        assert!(DotSet::new().is_subset(&s));
        assert!(!s.is_subset(&DotSet::new()));
    }
}
