//! The subscription index: which values (subscription IDs, interested nodes)
//! want a topic. Modelled on nats-server's `sublist.go`.
//!
//! A token trie: each level has a map of literal children plus one `*` child
//! and one `**` child, so matching a topic walks only the branches that can
//! match instead of testing every pattern. In front of it sits a bounded
//! cache of results keyed by the literal topic, invalidated wholesale by a
//! generation counter that every change bumps (publishers repeat topics far
//! more often than subscriptions change).
//!
//! It must not do I/O, read a clock, lock, or know what the values mean. It is
//! owned by one task: [`Sublist::matches`] takes `&mut self` because it fills
//! the cache; there is no interior mutability.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

use crate::topic::{Pattern, Segment, Topic, MAX_SEGMENTS};
use crate::Limits;

/// Result-cache entries. Enough for the hot topics of a busy node; each entry
/// is a topic string plus its result list, so the memory is bounded by this
/// times the largest fan-out.
pub const CACHE_CAPACITY: usize = 4096;

/// Up to this many matches, duplicates are removed by a linear scan, which
/// beats hashing for the usual handful of results.
const DEDUP_LINEAR_MAX: usize = 32;

/// Counters of the result cache, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SublistStats {
    /// Matches answered from the cache.
    pub cache_hits: u64,
    /// Matches that walked the trie with the cache enabled (absent or stale entry).
    pub cache_misses: u64,
    /// Entries dropped to make room (FIFO).
    pub cache_evictions: u64,
}

/// Values subscribed with patterns, matched against literal topics.
///
/// Set semantics: a `(pattern, value)` pair is either present or not;
/// inserting it twice keeps one copy, and one `remove` takes it out.
#[derive(Debug)]
pub struct Sublist<T> {
    root: Node<T>,
    /// Number of `(pattern, value)` pairs.
    len: usize,
    /// Bumped on every change; a cache entry from another generation is stale.
    generation: u64,
    cache: Option<Cache<T>>,
    stats: SublistStats,
}

#[derive(Debug)]
struct Node<T> {
    literal: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    double_star: Option<Box<Node<T>>>,
    /// Values whose pattern ends at this node.
    subs: Subs<T>,
}

/// An insertion-ordered set: a `Vec` for deterministic iteration (result
/// order never depends on hash seeds) plus an index for O(1) removal.
#[derive(Debug)]
struct Subs<T> {
    items: Vec<T>,
    index: HashMap<T, usize>,
}

/// Bounded FIFO result cache. FIFO rather than LRU: a hit then costs no
/// write, eviction is O(1), and behaviour is deterministic. A stale entry is
/// refreshed in place and keeps its queue position.
#[derive(Debug)]
struct Cache<T> {
    capacity: usize,
    map: HashMap<Box<str>, CacheEntry<T>>,
    /// Keys in insertion order; exactly the keys of `map`.
    order: VecDeque<Box<str>>,
}

#[derive(Debug)]
struct CacheEntry<T> {
    generation: u64,
    result: Vec<T>,
}

impl<T: Clone + Eq + Hash> Default for Sublist<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone + Eq + Hash> Sublist<T> {
    /// An empty sublist with a cache of [`CACHE_CAPACITY`] entries.
    pub fn new() -> Self {
        Self::with_cache_capacity(CACHE_CAPACITY)
    }

    /// An empty sublist with the default cache (`true`) or none (`false`).
    pub fn with_cache(enabled: bool) -> Self {
        Self::with_cache_capacity(if enabled { CACHE_CAPACITY } else { 0 })
    }

    /// An empty sublist sized by [`Limits::cache_capacity`].
    pub fn with_limits(limits: &Limits) -> Self {
        Self::with_cache_capacity(limits.cache_capacity)
    }

    fn with_cache_capacity(capacity: usize) -> Self {
        let cache = (capacity > 0).then(|| Cache {
            capacity,
            map: HashMap::new(),
            order: VecDeque::new(),
        });
        Sublist {
            root: Node::default(),
            len: 0,
            generation: 0,
            cache,
            stats: SublistStats::default(),
        }
    }

    /// Adds `value` under `pattern`. Returns false (and changes nothing) if
    /// the pair was already present.
    pub fn insert(&mut self, pattern: &Pattern, value: T) -> bool {
        let mut node = &mut self.root;
        for seg in pattern.segments() {
            node = match seg {
                // Allocating the key on every insert is fine: inserts are rare
                // next to matches, and `entry` keeps this loop simple.
                Segment::Literal(s) => node.literal.entry(s.into()).or_default(),
                Segment::Star => node.star.get_or_insert_with(Default::default),
                Segment::DoubleStar => node.double_star.get_or_insert_with(Default::default),
            };
        }
        let added = node.subs.insert(value);
        if added {
            self.len += 1;
            self.generation = self.generation.wrapping_add(1);
        }
        added
    }

    /// Removes `value` from `pattern`, pruning trie nodes left empty so that
    /// churn cannot grow the trie. Returns whether the pair was present.
    pub fn remove(&mut self, pattern: &Pattern, value: &T) -> bool {
        let segs: Vec<Segment<'_>> = pattern.segments().collect();
        let removed = self.root.remove(&segs, value);
        if removed {
            self.len -= 1;
            self.generation = self.generation.wrapping_add(1);
        }
        removed
    }

    /// Every value whose pattern matches `topic`, each once.
    ///
    /// Order: the trie is walked depth-first, at each level the literal child
    /// first, then `*`, then `**` (absorbing as few segments as possible
    /// first); values of one pattern come in insertion order, except that a
    /// removal moves the last value into the gap. A value matched by several
    /// patterns appears at its first position. The order depends only on the
    /// sequence of inserts and removes (never on hash seeds or the cache), so
    /// simulations replay exactly; callers should rely on nothing more.
    pub fn matches(&mut self, topic: &Topic) -> Vec<T> {
        let Some(cache) = self.cache.as_mut() else {
            return self.root.matches(topic);
        };
        if let Some(entry) = cache.map.get(topic.as_str()) {
            if entry.generation == self.generation {
                self.stats.cache_hits += 1;
                return entry.result.clone();
            }
        }
        self.stats.cache_misses += 1;
        let result = self.root.matches(topic);
        if cache.put(topic.as_str(), self.generation, result.clone()) {
            self.stats.cache_evictions += 1;
        }
        result
    }

    /// Like [`Sublist::matches`] but never reads or fills the cache, so it
    /// needs only `&self`.
    pub fn matches_uncached(&self, topic: &Topic) -> Vec<T> {
        self.root.matches(topic)
    }

    /// Number of `(pattern, value)` pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Trie nodes, the root included (1 when empty): shows that removal prunes.
    pub fn node_count(&self) -> usize {
        self.root.node_count()
    }

    /// Entries currently in the result cache (stale ones included).
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.map.len())
    }

    /// Cache counters.
    pub fn stats(&self) -> SublistStats {
        self.stats
    }
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            star: None,
            double_star: None,
            subs: Subs::default(),
        }
    }
}

impl<T: Clone + Eq + Hash> Node<T> {
    fn is_empty(&self) -> bool {
        self.subs.items.is_empty()
            && self.literal.is_empty()
            && self.star.is_none()
            && self.double_star.is_none()
    }

    fn node_count(&self) -> usize {
        1 + self.literal.values().map(Node::node_count).sum::<usize>()
            + self.star.as_ref().map_or(0, |n| n.node_count())
            + self.double_star.as_ref().map_or(0, |n| n.node_count())
    }

    /// Recursion depth is bounded by the pattern's segment count.
    fn remove(&mut self, segs: &[Segment<'_>], value: &T) -> bool {
        let Some((head, rest)) = segs.split_first() else {
            return self.subs.remove(value);
        };
        match *head {
            Segment::Literal(s) => {
                let Some(child) = self.literal.get_mut(s) else {
                    return false;
                };
                let removed = child.remove(rest, value);
                if removed && child.is_empty() {
                    self.literal.remove(s);
                    if self.literal.is_empty() {
                        // A map keeps its peak capacity; give it back once empty.
                        self.literal = HashMap::new();
                    }
                }
                removed
            }
            Segment::Star => prune_remove(&mut self.star, rest, value),
            Segment::DoubleStar => prune_remove(&mut self.double_star, rest, value),
        }
    }

    fn matches(&self, topic: &Topic) -> Vec<T> {
        // Split into a fixed-size array on the stack (no allocation per
        // segment); only topics validated under raised limits fall back to
        // a Vec.
        let mut buf = [""; MAX_SEGMENTS];
        let mut n = 0;
        let mut out = Vec::new();
        for seg in topic.segments() {
            if n == MAX_SEGMENTS {
                let tokens: Vec<&str> = topic.segments().collect();
                self.collect(&tokens, &mut out);
                dedup(&mut out);
                return out;
            }
            buf[n] = seg;
            n += 1;
        }
        self.collect(&buf[..n], &mut out);
        dedup(&mut out);
        out
    }

    /// Appends the values of every pattern under this node that matches
    /// `tokens`. Recursion depth is bounded by the trie depth; the number of
    /// calls by `(tokens + 1)^k` per path for `k` `**` segments on it.
    fn collect(&self, tokens: &[&str], out: &mut Vec<T>) {
        match tokens.split_first() {
            None => {
                out.extend(self.subs.items.iter().cloned());
                // `**` also matches zero segments, so patterns ending in one
                // (or several) `**` match here too.
                if let Some(child) = &self.double_star {
                    child.collect(tokens, out);
                }
            }
            Some((head, rest)) => {
                if let Some(child) = self.literal.get(*head) {
                    child.collect(rest, out);
                }
                if let Some(child) = &self.star {
                    child.collect(rest, out);
                }
                if let Some(child) = &self.double_star {
                    // Absorb 0, 1, ... all remaining segments. A pattern like
                    // `**.**` reaches the same node several ways; `dedup`
                    // removes the repeats.
                    for skip in 0..=tokens.len() {
                        child.collect(&tokens[skip..], out);
                    }
                }
            }
        }
    }
}

/// Removes from a wildcard child and drops the child once it is empty.
fn prune_remove<T: Clone + Eq + Hash>(
    slot: &mut Option<Box<Node<T>>>,
    rest: &[Segment<'_>],
    value: &T,
) -> bool {
    let Some(child) = slot.as_deref_mut() else {
        return false;
    };
    let removed = child.remove(rest, value);
    if removed && child.is_empty() {
        *slot = None;
    }
    removed
}

/// Keeps the first occurrence of each value, preserving order.
fn dedup<T: Eq + Hash>(values: &mut Vec<T>) {
    if values.len() <= DEDUP_LINEAR_MAX {
        let mut kept = 0;
        for i in 0..values.len() {
            if !values[..kept].contains(&values[i]) {
                values.swap(kept, i);
                kept += 1;
            }
        }
        values.truncate(kept);
    } else {
        let keep: Vec<bool> = {
            let mut seen = HashSet::with_capacity(values.len());
            values.iter().map(|v| seen.insert(v)).collect()
        };
        // `retain` visits elements in order, once each.
        let mut keep = keep.into_iter();
        values.retain(|_| keep.next().unwrap_or(false));
    }
}

impl<T> Default for Subs<T> {
    fn default() -> Self {
        Subs {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<T: Clone + Eq + Hash> Subs<T> {
    fn insert(&mut self, value: T) -> bool {
        if self.index.contains_key(&value) {
            return false;
        }
        self.index.insert(value.clone(), self.items.len());
        self.items.push(value);
        true
    }

    fn remove(&mut self, value: &T) -> bool {
        let Some(i) = self.index.remove(value) else {
            return false;
        };
        self.items.swap_remove(i);
        if let Some(moved) = self.items.get(i) {
            self.index.insert(moved.clone(), i);
        }
        if self.items.is_empty() {
            // Release peak capacity so a once-popular pattern costs nothing.
            *self = Subs::default();
        }
        true
    }
}

impl<T> Cache<T> {
    /// Stores `result` for `topic`; returns whether an entry was evicted.
    fn put(&mut self, topic: &str, generation: u64, result: Vec<T>) -> bool {
        if let Some(entry) = self.map.get_mut(topic) {
            *entry = CacheEntry { generation, result };
            return false;
        }
        let mut evicted = false;
        if self.map.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.map.remove(&oldest);
                evicted = true;
            }
        }
        self.order.push_back(topic.into());
        self.map
            .insert(topic.into(), CacheEntry { generation, result });
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emptiness_and_the_cache_size_are_reported() {
        let mut s: Sublist<u32> = Sublist::with_cache(true);
        assert!(s.is_empty());
        assert_eq!(s.cache_len(), 0);
        s.insert(&Pattern::new("a.*").unwrap(), 1);
        assert!(!s.is_empty());
        assert_eq!(s.matches(&Topic::new("a.b").unwrap()), vec![1]);
        assert_eq!(s.cache_len(), 1);
        let mut off: Sublist<u32> = Sublist::with_cache(false);
        off.insert(&Pattern::new("a.*").unwrap(), 1);
        off.matches(&Topic::new("a.b").unwrap());
        assert_eq!(off.cache_len(), 0);
    }
}
