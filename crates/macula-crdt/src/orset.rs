//! [`OrSet`]: the optimised observed-remove set (add wins).
//!
//! State: for each present element the dots of the adds that put it there
//! (usually one), and the causal context: every dot this state has seen.
//! A dot seen but not held is an add that was removed (or superseded by a
//! later add of the same element), so removals keep no tombstone.
//!
//! Join of `(S1, C1)` and `(S2, C2)`, per element: keep the dots in both
//! stores, plus the dots of one store the other's context has not seen;
//! contexts are united. A remove only covers the dots it observed, so an
//! add concurrent with it (a dot the remover never saw) survives: add wins.
//!
//! The context alone cannot serve as the digest. An update's delta names
//! in its context the dots it supersedes, and a replica that merges it
//! then "knows" those dots (as dead) without having the effects of the
//! updates that made them. Example: an add of `x` supersedes another
//! node's add of `x`; a re-add of `x` supersedes the first add. A replica
//! that lost the first add's delta and merges the re-add's has the first
//! add's dot in its context (dead) while the other node's dot is still
//! live there; with contexts as digests, no peer would ever send it the
//! first add again and it would hold that stale dot forever (the simulator
//! found this). Without causal delivery of deltas (which the delta-CRDT
//! paper assumes and a lossy mesh does not give) the state therefore also
//! keeps the set of updates it has *applied* in full: an update's own
//! delta applies it, a merge unites the sets, and the answer to a digest
//! carries the sender's set, because merged into the digest's owner it
//! brings all of the sender's state. That set is the digest: one range per
//! node once caught up, like the context.

use std::collections::{BTreeMap, BTreeSet};

use macula_wire::NodeId;
use serde::{Deserialize, Deserializer, Serialize};

use crate::{Cap, Crdt, CrdtError, Dot, DotSet};

/// An add-wins observed-remove set of `T`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrSet<T: Ord> {
    entries: BTreeMap<T, BTreeSet<Dot>>,
    context: DotSet,
    /// The updates whose whole effect this state holds (within `context`).
    applied: DotSet,
    #[serde(skip)]
    cap: Cap,
}

impl<T: Ord> Default for OrSet<T> {
    fn default() -> Self {
        OrSet {
            entries: BTreeMap::new(),
            context: DotSet::new(),
            applied: DotSet::new(),
            cap: Cap::default(),
        }
    }
}

impl<T: Ord + Clone> OrSet<T> {
    /// An empty set with the default limit.
    pub fn new() -> Self {
        OrSet::default()
    }

    /// An empty set holding at most `max` elements.
    pub fn with_max_entries(max: usize) -> Self {
        OrSet {
            cap: Cap(max),
            ..OrSet::default()
        }
    }

    /// Adds `elem` as replica `node`; returns the delta. Fails, changing
    /// nothing, when `elem` is new and the set is full.
    pub fn add(&mut self, node: NodeId, elem: T) -> Result<Self, CrdtError> {
        let old = self.entries.get(&elem);
        if old.is_none() && self.entries.len() >= self.cap.0 {
            return Err(CrdtError::LimitExceeded {
                what: "elements",
                limit: self.cap.0,
            });
        }
        let dot = self.context.next(node);
        let mut context: DotSet = old.into_iter().flatten().copied().collect();
        context.insert(dot);
        let mut delta = OrSet {
            context,
            applied: DotSet::from_iter([dot]),
            ..OrSet::default()
        };
        delta.entries.insert(elem, BTreeSet::from([dot]));
        self.merge_from(&delta);
        Ok(delta)
    }

    /// Removes `elem` as replica `node`: the adds this replica has seen are
    /// undone, a concurrent add elsewhere is not. Returns the delta (empty
    /// when `elem` is absent).
    pub fn remove(&mut self, node: NodeId, elem: &T) -> Self {
        match self.entries.get(elem) {
            Some(dots) => {
                let dots = dots.clone();
                self.remove_dots(node, dots)
            }
            None => OrSet::default(),
        }
    }

    /// Removes every element this replica has seen; returns the delta.
    pub fn clear(&mut self, node: NodeId) -> Self {
        if self.entries.is_empty() {
            return OrSet::default();
        }
        let dots = self.entries.values().flatten().copied().collect();
        self.remove_dots(node, dots)
    }

    /// The removal's delta: the removed dots and one fresh dot of its own
    /// (so that digests tell who has seen the removal) in the context,
    /// nothing in the store.
    fn remove_dots(&mut self, node: NodeId, dots: BTreeSet<Dot>) -> Self {
        let own = self.context.next(node);
        let mut context: DotSet = dots.into_iter().collect();
        context.insert(own);
        let delta = OrSet {
            context,
            applied: DotSet::from_iter([own]),
            ..OrSet::default()
        };
        self.merge_from(&delta);
        delta
    }

    /// Whether `elem` is present.
    pub fn contains(&self, elem: &T) -> bool {
        self.entries.contains_key(elem)
    }

    /// The present elements, in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.entries.keys()
    }

    /// Number of present elements.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no element is present.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The causal context: every dot this state has seen.
    pub fn context(&self) -> &DotSet {
        &self.context
    }

    /// The updates this state holds in full: its digest.
    pub fn applied(&self) -> &DotSet {
        &self.applied
    }

    fn merge_from(&mut self, other: &Self) {
        let (entries, context) = (&mut self.entries, &self.context);
        entries.retain(|elem, dots| {
            let theirs = other.entries.get(elem);
            dots.retain(|d| theirs.is_some_and(|t| t.contains(d)) || !other.context.contains(d));
            if let Some(t) = theirs {
                dots.extend(t.iter().filter(|d| !context.contains(d)));
            }
            !dots.is_empty()
        });
        for (elem, theirs) in &other.entries {
            if self.entries.contains_key(elem) {
                continue;
            }
            let fresh: BTreeSet<Dot> = theirs
                .iter()
                .filter(|d| !self.context.contains(d))
                .copied()
                .collect();
            if !fresh.is_empty() {
                self.entries.insert(elem.clone(), fresh);
            }
        }
        self.context.union_with(&other.context);
        self.applied.union_with(&other.applied);
    }
}

impl<T> Crdt for OrSet<T>
where
    T: Ord + Clone + std::fmt::Debug + Serialize + serde::de::DeserializeOwned,
{
    /// The updates applied in full.
    type Digest = DotSet;

    fn merge(&mut self, other: &Self) {
        self.merge_from(other);
    }

    fn digest(&self) -> DotSet {
        self.applied.clone()
    }

    /// The adds they have not applied, and a context of every dot this
    /// replica has seen except its present adds that they have applied:
    /// those they must keep as they have them; every other dot they hold
    /// and this context names is gone. Merged into the digest's owner it
    /// brings all of this state, so it carries this state's applied set;
    /// it is meant for that replica only.
    fn delta_since(&self, theirs: &DotSet) -> Option<Self> {
        if self.applied.is_subset(theirs) {
            return None;
        }
        let mut entries = BTreeMap::new();
        let mut kept = DotSet::new();
        for (elem, dots) in &self.entries {
            let (seen, fresh): (BTreeSet<Dot>, BTreeSet<Dot>) =
                dots.iter().partition(|d| theirs.contains(d));
            kept.extend_dots(seen);
            if !fresh.is_empty() {
                entries.insert(elem.clone(), fresh);
            }
        }
        Some(OrSet {
            entries,
            context: self.context.difference(&kept),
            applied: self.applied.clone(),
            cap: Cap::default(),
        })
    }

    fn lacks(&self, theirs: &DotSet) -> bool {
        !theirs.is_subset(&self.applied)
    }

    fn size(&self) -> usize {
        self.entries.len()
    }

    fn max_size(&self) -> usize {
        self.cap.0
    }
}

impl DotSet {
    fn extend_dots(&mut self, dots: impl IntoIterator<Item = Dot>) {
        for d in dots {
            self.insert(d);
        }
    }
}

/// What a peer sends, before it is made a valid state: empty entries are
/// dropped and every held dot is put in the context. (Not every applied
/// one: the answer to a digest leaves holes in its context for dots the
/// receiver applied.)
#[derive(Deserialize)]
struct RawOrSet<T: Ord> {
    entries: BTreeMap<T, BTreeSet<Dot>>,
    context: DotSet,
    applied: DotSet,
}

impl<'de, T: Ord + Deserialize<'de>> Deserialize<'de> for OrSet<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let RawOrSet {
            mut entries,
            mut context,
            applied,
        } = RawOrSet::deserialize(d)?;
        entries.retain(|_, dots| !dots.is_empty());
        context.extend_dots(entries.values().flatten().copied());
        Ok(OrSet {
            entries,
            context,
            applied,
            cap: Cap::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    #[test]
    fn a_concurrent_add_wins_over_a_remove() {
        let mut a = OrSet::new();
        let d = a.add(id(1), 'x').unwrap();
        let mut b = OrSet::new();
        b.merge(&d);
        // Concurrently: a removes x, b adds x again.
        let rm = a.remove(id(1), &'x');
        let add = b.add(id(2), 'x').unwrap();
        assert!(!a.contains(&'x'));
        a.merge(&add);
        b.merge(&rm);
        assert!(a.contains(&'x'));
        assert_eq!(a, b);
    }

    #[test]
    fn a_remove_after_the_add_removes() {
        let mut a = OrSet::new();
        let add = a.add(id(1), 7u32).unwrap();
        let mut b = OrSet::new();
        b.merge(&add);
        let rm = b.remove(id(2), &7);
        a.merge(&rm);
        assert!(!a.contains(&7));
        assert!(a.is_empty());
        // A duplicated, late add does not bring it back.
        a.merge(&add);
        assert!(!a.contains(&7));
        assert_eq!(a, b);
        // The remove took a dot, so the digests differ until it is seen.
        assert_eq!(a.context().max(&id(2)), 1);
    }

    #[test]
    fn removing_an_absent_element_is_an_empty_delta() {
        let mut a = OrSet::<u8>::new();
        assert_eq!(a.remove(id(1), &3), OrSet::default());
        assert_eq!(a.clear(id(1)), OrSet::default());
        a.add(id(1), 1).unwrap();
        a.add(id(1), 2).unwrap();
        let c = a.clear(id(1));
        assert!(a.is_empty());
        assert_eq!(a.len(), 0);
        let mut b = OrSet::new();
        b.add(id(2), 9).unwrap();
        b.merge(&c);
        assert_eq!(b.iter().copied().collect::<Vec<_>>(), vec![9]);
    }

    #[test]
    fn re_adding_collapses_to_one_dot() {
        let mut a = OrSet::new();
        a.add(id(1), 'x').unwrap();
        a.add(id(1), 'x').unwrap();
        a.add(id(1), 'x').unwrap();
        assert_eq!(a.entries[&'x'].len(), 1);
        assert_eq!(a.context().n_ranges(), 1);
    }

    #[test]
    fn the_element_limit_refuses_new_elements_only() {
        let mut a = OrSet::with_max_entries(2);
        a.add(id(1), 1u8).unwrap();
        a.add(id(1), 2).unwrap();
        a.add(id(1), 2).unwrap();
        let before = a.clone();
        assert_eq!(
            a.add(id(1), 3),
            Err(CrdtError::LimitExceeded {
                what: "elements",
                limit: 2
            })
        );
        assert_eq!(a, before);
        assert_eq!(a.context(), before.context());
        let mut b = OrSet::new();
        b.add(id(2), 3).unwrap();
        assert!(a.try_merge(&b).is_err());
        assert_eq!(a, before);
        a.remove(id(1), &1);
        a.try_merge(&b).unwrap();
        assert!(a.contains(&3));
    }

    #[test]
    fn a_malformed_state_from_a_peer_is_made_valid() {
        let mut raw = OrSet::<u8>::new();
        raw.entries.insert(1, BTreeSet::new());
        raw.entries.insert(
            2,
            BTreeSet::from([Dot {
                node: id(1),
                seq: 4,
            }]),
        );
        let bytes = rmp_serde::to_vec_named(&raw).unwrap();
        let got: OrSet<u8> = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(got.iter().copied().collect::<Vec<_>>(), vec![2]);
        assert!(got.context().contains(&Dot {
            node: id(1),
            seq: 4
        }));
    }
}
