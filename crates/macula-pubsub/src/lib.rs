//! The pure core of Macula pub/sub: topics and patterns, wildcard matching,
//! per-publisher ordering and dedup, bounded subscriber queues, and the names
//! under which interest is registered in the DHT.
//!
//! **Invariant:** no I/O, no clock, no threads, no async, no global state.
//! Everything here is a plain data structure driven by method calls; the
//! runtime owns the sockets, tasks and timers, and the simulator can drive the
//! same code.
//!
//! **Invariant:** every [`Topic`] and [`Pattern`] was validated against a
//! [`Limits`] when it was built; the rest of the core trusts them (bounded
//! length, segment count and `**` count, hence bounded matching cost).
//!
//! **Invariant:** [`Sublist::matches`] returns exactly the values whose
//! pattern [`Pattern::matches`] the topic, each once, with the cache on or
//! off (property-tested), in an order that depends only on the sequence of
//! inserts and removes.
//!
//! **Invariant:** everything is bounded: the result cache by
//! [`Limits::cache_capacity`], the publishers tracked by
//! [`Limits::max_publishers`], each queue by [`Limits::queue_capacity`], and
//! the trie by what is subscribed (empty nodes are pruned). Every drop is
//! counted ([`SublistStats`], [`SeqStats`], [`BoundedQueue::dropped_total`]).
//!
//! # Code map
//! - [`topic`]: `Topic`, `Pattern`, validation errors, the reference matcher.
//! - [`sublist`]: the token trie with its result cache (after NATS's sublist).
//! - [`dedup`]: per-publisher sequence tracking (epochs, gaps, duplicates).
//! - [`queue`]: the drop-oldest queue of one subscription.
//! - [`rendezvous`]: DHT names for interest, and the summary of what one
//!   interest record lists when the exact list is over the record limit.
//! - [`limits`]: every limit in one overridable struct.

pub mod dedup;
pub mod limits;
pub mod queue;
pub mod rendezvous;
pub mod sublist;
pub mod topic;

pub use dedup::{Observed, SeqStats, SeqTracker};
pub use limits::Limits;
pub use queue::BoundedQueue;
pub use rendezvous::{
    interest_name, interest_segment, lookup_names, segment_name, summarize, Summary,
};
pub use sublist::{Sublist, SublistStats};
pub use topic::{Pattern, Segment, Topic, TopicError};
