//! This node's subscriptions: the sublist that matches topics to them, the
//! per-segment index of distinct patterns that interest records are built
//! from, and the client feeds a gateway holds for its attached clients.
//!
//! A subscription delivers either to a local sink (the driver's queue for
//! one `Subscription`) or to a feed (one attached client: its events go to
//! the client's outbound queue). This module must not know about the
//! network; it only says who matches.

use std::collections::{BTreeMap, HashMap};

use macula_wire::NodeId;

use crate::rendezvous::interest_segment;
use crate::sublist::Sublist;
use crate::topic::{Pattern, Topic};
use crate::Limits;

/// Subscriptions one node holds; a bound on memory and on fan-out cost.
pub const MAX_SUBSCRIPTIONS: usize = 100_000;

/// Names one subscription of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubId(pub u64);

/// Names one attached client's feed at its gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FeedId(pub u64);

/// Where one subscription's events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target<S> {
    Local(S),
    Feed(FeedId),
}

pub(crate) struct Sub<S> {
    pub(crate) pattern: Pattern,
    pub(crate) target: Target<S>,
}

/// One attached client's feed.
pub(crate) struct Feed {
    pub(crate) client: NodeId,
    /// Pattern → its subscription.
    pub(crate) patterns: BTreeMap<String, SubId>,
}

pub(crate) struct Local<S> {
    pub(crate) sublist: Sublist<SubId>,
    pub(crate) subs: HashMap<SubId, Sub<S>>,
    next_id: u64,
    /// Per interest segment (`interest_segment`): each distinct pattern,
    /// sorted, with how many subscriptions hold it. What an interest record
    /// lists, read without scanning every subscription.
    pub(crate) index: HashMap<Box<str>, BTreeMap<Pattern, usize>>,
    pub(crate) feeds: HashMap<FeedId, Feed>,
    next_feed: u64,
    pub(crate) max_subscriptions: usize,
}

impl<S: Clone> Local<S> {
    pub(crate) fn new(limits: &Limits) -> Self {
        Local {
            sublist: Sublist::with_limits(limits),
            subs: HashMap::new(),
            next_id: 1,
            index: HashMap::new(),
            feeds: HashMap::new(),
            next_feed: 1,
            max_subscriptions: limits.max_subscriptions,
        }
    }

    /// Adds a subscription; `None` when at the limit.
    pub(crate) fn add(&mut self, pattern: &Pattern, target: Target<S>) -> Option<SubId> {
        if self.subs.len() >= self.max_subscriptions {
            return None;
        }
        let id = SubId(self.next_id);
        self.next_id += 1;
        self.sublist.insert(pattern, id);
        *self
            .index
            .entry(interest_segment(pattern).into())
            .or_default()
            .entry(pattern.clone())
            .or_default() += 1;
        self.subs.insert(
            id,
            Sub {
                pattern: pattern.clone(),
                target,
            },
        );
        Some(id)
    }

    /// Removes subscription `id`; returns its pattern.
    pub(crate) fn remove(&mut self, id: SubId) -> Option<Pattern> {
        let sub = self.subs.remove(&id)?;
        let p = sub.pattern;
        self.sublist.remove(&p, &id);
        let segment = interest_segment(&p);
        if let Some(by_pattern) = self.index.get_mut(segment) {
            if let Some(n) = by_pattern.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    by_pattern.remove(&p);
                }
            }
            if by_pattern.is_empty() {
                self.index.remove(segment);
            }
        }
        Some(p)
    }

    /// Live subscriptions to exactly `pattern`.
    pub(crate) fn holders(&self, pattern: &Pattern) -> usize {
        self.index
            .get(interest_segment(pattern))
            .and_then(|m| m.get(pattern))
            .copied()
            .unwrap_or(0)
    }

    /// The distinct patterns under `segment`, sorted.
    pub(crate) fn patterns_of(&self, segment: &str) -> Vec<Pattern> {
        self.index
            .get(segment)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Subscriptions matching `topic`.
    pub(crate) fn matches(&mut self, topic: &Topic) -> Vec<SubId> {
        self.sublist.matches(topic)
    }

    /// Patterns currently subscribed, with how many subscriptions each.
    pub(crate) fn summary(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = self
            .index
            .values()
            .flat_map(|m| m.iter().map(|(p, n)| (p.as_str().to_string(), *n)))
            .collect();
        v.sort();
        v
    }

    pub(crate) fn open_feed(&mut self, client: NodeId) -> FeedId {
        let id = FeedId(self.next_feed);
        self.next_feed += 1;
        self.feeds.insert(
            id,
            Feed {
                client,
                patterns: BTreeMap::new(),
            },
        );
        id
    }
}
