//! [`LwwMap`] and [`LwwElementSet`]: last-writer-wins per key, deletes are
//! tombstones.
//!
//! Each key holds its latest write: a value, or a tombstone for a delete,
//! with the write's [`Timestamp`] and [`Dot`]. The join keeps, per key, the
//! write with the greater timestamp, and unites the causal contexts (every
//! write's dot a state has seen, superseded ones included), which only the
//! digests use. Keeping the latest write is the classic add-set/remove-set
//! pair with "present when the latest add is after the latest remove":
//! only the comparison of the two maxima ever matters.
//!
//! Tombstones go under the rule of the crate docs ([`Crdt::collect_garbage`]).

use std::collections::BTreeMap;

use macula_wire::time::Millis;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::{Cap, Crdt, CrdtError, Dot, DotSet, Timestamp};

/// One key's latest write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry<V> {
    ts: Timestamp,
    /// The write's dot is `(ts.node, seq)`.
    seq: u64,
    /// `None`: a delete (a tombstone). Sent as `Put(v)` or `Delete`, so a
    /// map of `()` (the element set) can tell the two apart.
    #[serde(with = "put_or_delete")]
    #[serde(bound(serialize = "V: Serialize", deserialize = "V: Deserialize<'de>"))]
    value: Option<V>,
}

/// The wire form of an entry's value: `Option<()>` would not survive
/// MessagePack (`Some(())` and `None` are both nil).
mod put_or_delete {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    enum Ref<'a, V> {
        Put(&'a V),
        Delete,
    }

    #[derive(Deserialize)]
    enum Owned<V> {
        Put(V),
        Delete,
    }

    pub(super) fn serialize<V: Serialize, S: Serializer>(
        v: &Option<V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => Ref::Put(v),
            None => Ref::Delete,
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, V: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<V>, D::Error> {
        Ok(match Owned::deserialize(d)? {
            Owned::Put(v) => Some(v),
            Owned::Delete => None,
        })
    }
}

impl<V> Entry<V> {
    fn dot(&self) -> Dot {
        Dot {
            node: self.ts.node,
            seq: self.seq,
        }
    }
}

/// A map of last-writer-wins registers, with delete tombstones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LwwMap<K: Ord, V> {
    entries: BTreeMap<K, Entry<V>>,
    context: DotSet,
    #[serde(skip)]
    cap: Cap,
}

impl<K: Ord, V> Default for LwwMap<K, V> {
    fn default() -> Self {
        LwwMap {
            entries: BTreeMap::new(),
            context: DotSet::new(),
            cap: Cap::default(),
        }
    }
}

impl<K: Ord + Clone, V: Clone> LwwMap<K, V> {
    /// An empty map with the default limit.
    pub fn new() -> Self {
        LwwMap::default()
    }

    /// An empty map holding at most `max` entries, tombstones included.
    pub fn with_max_entries(max: usize) -> Self {
        LwwMap {
            cap: Cap(max),
            ..LwwMap::default()
        }
    }

    /// Writes `value` under `key` at `ts` (take it from the node's
    /// [`Hlc`](crate::Hlc); the dot's node is `ts.node`); returns the delta.
    /// Fails, changing nothing, when `key` is new and the map is full.
    pub fn insert(&mut self, ts: Timestamp, key: K, value: V) -> Result<Self, CrdtError> {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.cap.0 {
            return Err(CrdtError::LimitExceeded {
                what: "entries",
                limit: self.cap.0,
            });
        }
        Ok(self.write(ts, key, Some(value)))
    }

    /// Deletes `key` at `ts`, leaving a tombstone; returns the delta (empty
    /// when `key` is absent here).
    pub fn remove(&mut self, ts: Timestamp, key: &K) -> Self {
        if self.get(key).is_none() {
            return LwwMap::default();
        }
        self.write(ts, key.clone(), None)
    }

    fn write(&mut self, ts: Timestamp, key: K, value: Option<V>) -> Self {
        let dot = self.context.next(ts.node);
        let mut delta = LwwMap::default();
        delta.context.insert(dot);
        delta.entries.insert(
            key,
            Entry {
                ts,
                seq: dot.seq,
                value,
            },
        );
        self.merge_from(&delta);
        delta
    }

    /// The value under `key`, if present (not deleted).
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).and_then(|e| e.value.as_ref())
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// The present keys and values, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.value.as_ref().map(|v| (k, v)))
    }

    /// Number of present keys.
    pub fn len(&self) -> usize {
        self.entries.values().filter(|e| e.value.is_some()).count()
    }

    /// True when no key is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tombstones held.
    pub fn tombstones(&self) -> usize {
        self.entries.values().filter(|e| e.value.is_none()).count()
    }

    /// The timestamp of `key`'s latest write (a delete included).
    pub fn timestamp(&self, key: &K) -> Option<Timestamp> {
        self.entries.get(key).map(|e| e.ts)
    }

    /// The causal context: every write this state has seen.
    pub fn context(&self) -> &DotSet {
        &self.context
    }

    /// Drops the tombstones whose timestamp is at least `horizon` older
    /// than `now` and whose dot is in `stable` (acknowledged by every
    /// replica); returns how many. See the crate docs for the rule.
    pub fn gc(&mut self, now: Millis, horizon: Millis, stable: &DotSet) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| {
            let old = e.ts.physical().saturating_add(horizon) <= now;
            !(e.value.is_none() && old && stable.contains(&e.dot()))
        });
        before - self.entries.len()
    }

    fn merge_from(&mut self, other: &Self) {
        for (k, theirs) in &other.entries {
            match self.entries.get_mut(k) {
                Some(mine) if mine.ts >= theirs.ts => {}
                Some(mine) => *mine = theirs.clone(),
                None => {
                    self.entries.insert(k.clone(), theirs.clone());
                }
            }
        }
        self.context.union_with(&other.context);
    }
}

impl<K, V> Crdt for LwwMap<K, V>
where
    K: Ord + Clone + std::fmt::Debug + Serialize + DeserializeOwned,
    V: Clone + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned,
{
    /// The causal context.
    type Digest = DotSet;

    fn merge(&mut self, other: &Self) {
        self.merge_from(other);
    }

    fn digest(&self) -> DotSet {
        self.context.clone()
    }

    /// The latest writes they have not seen, and the dots they have not.
    fn delta_since(&self, theirs: &DotSet) -> Option<Self> {
        if self.context.is_subset(theirs) {
            return None;
        }
        let entries = self
            .entries
            .iter()
            .filter(|(_, e)| !theirs.contains(&e.dot()))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        Some(LwwMap {
            entries,
            context: self.context.difference(theirs),
            cap: Cap::default(),
        })
    }

    fn lacks(&self, theirs: &DotSet) -> bool {
        !theirs.is_subset(&self.context)
    }

    fn size(&self) -> usize {
        self.entries.len()
    }

    fn max_size(&self) -> usize {
        self.cap.0
    }

    fn latest(&self) -> Option<Timestamp> {
        self.entries.values().map(|e| e.ts).max()
    }

    fn collect_garbage(&mut self, now: Millis, horizon: Millis, acked: &[&DotSet]) -> usize {
        let Some((first, rest)) = acked.split_first() else {
            return 0;
        };
        let stable = rest.iter().fold((*first).clone(), |s, d| s.intersection(d));
        self.gc(now, horizon, &stable)
    }
}

/// What a peer sends, before it is made a valid state: every entry's dot is
/// put in the context.
#[derive(Deserialize)]
struct RawLwwMap<K: Ord, V> {
    entries: BTreeMap<K, Entry<V>>,
    context: DotSet,
}

impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for LwwMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let RawLwwMap {
            entries,
            mut context,
        } = RawLwwMap::deserialize(d)?;
        for e in entries.values() {
            context.insert(e.dot());
        }
        Ok(LwwMap {
            entries,
            context,
            cap: Cap::default(),
        })
    }
}

/// A last-writer-wins element set: an element is present when its latest
/// add is later than its latest remove. An [`LwwMap`] of `T` to `()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "T: Ord + Serialize",
    deserialize = "T: Ord + Deserialize<'de>"
))]
pub struct LwwElementSet<T: Ord> {
    map: LwwMap<T, ()>,
}

impl<T: Ord> Default for LwwElementSet<T> {
    fn default() -> Self {
        LwwElementSet {
            map: LwwMap::default(),
        }
    }
}

impl<T: Ord + Clone> LwwElementSet<T> {
    /// An empty set with the default limit.
    pub fn new() -> Self {
        LwwElementSet::default()
    }

    /// An empty set holding at most `max` elements, tombstones included.
    pub fn with_max_entries(max: usize) -> Self {
        LwwElementSet {
            map: LwwMap::with_max_entries(max),
        }
    }

    /// Adds `elem` at `ts`; returns the delta. Fails, changing nothing,
    /// when `elem` is new and the set is full.
    pub fn add(&mut self, ts: Timestamp, elem: T) -> Result<Self, CrdtError> {
        self.map
            .insert(ts, elem, ())
            .map(|map| LwwElementSet { map })
    }

    /// Removes `elem` at `ts`, leaving a tombstone; returns the delta
    /// (empty when `elem` is absent here).
    pub fn remove(&mut self, ts: Timestamp, elem: &T) -> Self {
        LwwElementSet {
            map: self.map.remove(ts, elem),
        }
    }

    /// Whether `elem` is present.
    pub fn contains(&self, elem: &T) -> bool {
        self.map.contains_key(elem)
    }

    /// The present elements, in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.map.iter().map(|(k, _)| k)
    }

    /// Number of present elements.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no element is present.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of tombstones held.
    pub fn tombstones(&self) -> usize {
        self.map.tombstones()
    }

    /// The causal context: every add and remove this state has seen.
    pub fn context(&self) -> &DotSet {
        self.map.context()
    }

    /// [`LwwMap::gc`].
    pub fn gc(&mut self, now: Millis, horizon: Millis, stable: &DotSet) -> usize {
        self.map.gc(now, horizon, stable)
    }
}

impl<T> Crdt for LwwElementSet<T>
where
    T: Ord + Clone + std::fmt::Debug + Serialize + DeserializeOwned,
{
    /// The causal context.
    type Digest = DotSet;

    fn merge(&mut self, other: &Self) {
        self.map.merge(&other.map);
    }

    fn digest(&self) -> DotSet {
        self.map.digest()
    }

    fn delta_since(&self, theirs: &DotSet) -> Option<Self> {
        self.map
            .delta_since(theirs)
            .map(|map| LwwElementSet { map })
    }

    fn lacks(&self, theirs: &DotSet) -> bool {
        self.map.lacks(theirs)
    }

    fn size(&self) -> usize {
        self.map.size()
    }

    fn max_size(&self) -> usize {
        self.map.max_size()
    }

    fn latest(&self) -> Option<Timestamp> {
        self.map.latest()
    }

    fn collect_garbage(&mut self, now: Millis, horizon: Millis, acked: &[&DotSet]) -> usize {
        self.map.collect_garbage(now, horizon, acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use macula_wire::NodeId;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn ts(physical: u64, node: u8) -> Timestamp {
        Timestamp {
            physical,
            logical: 0,
            node: id(node),
        }
    }

    #[test]
    fn a_later_remove_beats_an_earlier_add_in_any_order() {
        let mut a = LwwElementSet::new();
        let add = a.add(ts(10, 1), 'x').unwrap();
        let rm = a.remove(ts(20, 1), &'x');
        assert!(!a.contains(&'x'));
        assert_eq!(a.tombstones(), 1);
        let mut b = LwwElementSet::new();
        b.merge(&rm);
        b.merge(&add);
        assert!(!b.contains(&'x'));
        assert_eq!(a, b);
        // A later add brings it back.
        let again = b.add(ts(30, 2), 'x').unwrap();
        a.merge(&again);
        assert!(a.contains(&'x'));
        assert_eq!(a.iter().count(), 1);
        assert_eq!(a.len(), 1);
        assert!(!a.is_empty());
        assert_eq!(a.tombstones(), 0);
    }

    #[test]
    fn concurrent_add_and_remove_resolve_by_timestamp_then_node() {
        let mut a = LwwElementSet::new();
        let mut b = LwwElementSet::new();
        let d = a.add(ts(10, 1), 5u8).unwrap();
        b.merge(&d);
        // Same millisecond: node 2's remove beats node 1's re-add.
        let add = a.add(ts(50, 1), 5).unwrap();
        let rm = b.remove(ts(50, 2), &5);
        a.merge(&rm);
        b.merge(&add);
        assert_eq!(a, b);
        assert!(!a.contains(&5));
    }

    #[test]
    fn map_remove_and_overwrite() {
        let mut m = LwwMap::new();
        m.insert(ts(1, 1), 'k', 1).unwrap();
        m.insert(ts(2, 1), 'k', 2).unwrap();
        assert_eq!(m.get(&'k'), Some(&2));
        assert_eq!(m.timestamp(&'k'), Some(ts(2, 1)));
        // An older write loses, but its delta still carries it.
        let old = m.insert(ts(1, 2), 'k', 9).unwrap();
        assert_eq!(m.get(&'k'), Some(&2));
        assert_eq!(old.get(&'k'), Some(&9));
        let rm = m.remove(ts(3, 1), &'k');
        assert_eq!(m.get(&'k'), None);
        assert!(!m.contains_key(&'k'));
        assert!(m.is_empty());
        assert_eq!(m.len(), 0);
        assert_eq!(m.tombstones(), 1);
        assert_eq!(m.remove(ts(4, 1), &'k'), LwwMap::default());
        assert_eq!(m.remove(ts(4, 1), &'z'), LwwMap::default());
        let mut n = LwwMap::new();
        n.insert(ts(2, 3), 'k', 7).unwrap();
        n.merge(&rm);
        assert_eq!(n.get(&'k'), None);
        assert_eq!(m.latest(), Some(ts(3, 1)));
    }

    #[test]
    fn the_entry_limit_counts_tombstones() {
        let mut m = LwwMap::with_max_entries(2);
        m.insert(ts(1, 1), 1u8, ()).unwrap();
        m.insert(ts(2, 1), 2, ()).unwrap();
        m.remove(ts(3, 1), &1);
        let before = m.clone();
        assert_eq!(
            m.insert(ts(4, 1), 3, ()),
            Err(CrdtError::LimitExceeded {
                what: "entries",
                limit: 2
            })
        );
        assert_eq!(m, before);
        assert_eq!(m.context(), before.context());
        // Overwriting a key (a tombstone too) is fine.
        m.insert(ts(5, 1), 1, ()).unwrap();
        let mut s = LwwElementSet::with_max_entries(1);
        s.add(ts(1, 1), 'a').unwrap();
        assert!(s.add(ts(2, 1), 'b').is_err());
        assert_eq!(s.max_size(), 1);
    }

    #[test]
    fn gc_drops_only_old_acknowledged_tombstones() {
        let mut a = LwwMap::new();
        let d1 = a.insert(ts(100, 1), 'o', 1).unwrap();
        let d2 = a.insert(ts(100, 1), 'n', 1).unwrap();
        let d3 = a.insert(ts(100, 1), 'l', 1).unwrap();
        let r1 = a.remove(ts(1_000, 1), &'o');
        let r2 = a.remove(ts(5_000, 1), &'n');
        let mut b = LwwMap::new();
        for d in [&d1, &d2, &d3, &r1] {
            b.merge(d);
        }
        // b has not seen the removal of 'n'.
        let horizon = Millis(2_000);
        let now = Millis(7_500);
        let (da, db) = (a.digest(), b.digest());
        let mut a2 = a.clone();
        // Nothing acknowledged by nobody: nothing collected.
        assert_eq!(a2.collect_garbage(now, horizon, &[]), 0);
        // 'o': old enough and acknowledged by both. 'n': old enough but b
        // has not seen it. 'l' is no tombstone.
        assert_eq!(a2.collect_garbage(now, horizon, &[&da, &db]), 1);
        assert_eq!(a2.tombstones(), 1);
        assert_eq!(a2.timestamp(&'o'), None);
        assert_eq!(a2.timestamp(&'n'), Some(ts(5_000, 1)));
        // Once b has seen it, 'n' goes too, but only past the horizon.
        b.merge(&r2);
        let db = b.digest();
        let mut a3 = a2.clone();
        assert_eq!(a3.collect_garbage(Millis(6_999), horizon, &[&da, &db]), 0);
        assert_eq!(a3.collect_garbage(Millis(7_000), horizon, &[&da, &db]), 1);
        assert_eq!(a3.tombstones(), 0);
        assert_eq!(a3.get(&'l'), Some(&1));
        // The collected keys stay gone: b, which still has the tombstones,
        // sends nothing for them, and the old adds it re-sends lose to nothing
        // they have not already seen.
        assert_eq!(b.delta_since(&a3.digest()), None);
        // The set's wrapper collects the same way.
        let mut s = LwwElementSet::new();
        s.add(ts(1, 1), 1u8).unwrap();
        s.remove(ts(2, 1), &1);
        let st = s.digest();
        assert_eq!(s.gc(Millis(10), Millis(5), &DotSet::new()), 0);
        assert_eq!(s.collect_garbage(Millis(10), Millis(5), &[&st]), 1);
        assert_eq!(s.tombstones(), 0);
    }
}
