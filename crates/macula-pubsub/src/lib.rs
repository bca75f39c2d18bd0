//! The pure core of Macula pub/sub: topics and patterns, wildcard matching,
//! per-publisher ordering and dedup, bounded queues, the names under which
//! interest is registered in the DHT, and [`PubSubCore`], the state machine
//! that decides everything a node's pub/sub does.
//!
//! # The state machine
//!
//! [`PubSubCore<S, W>`] is driven like `quinn-proto`'s connection or
//! `macula_dht::Dht`: inputs are method calls taking `now: Millis` (a
//! reading of the driver's monotonic clock), outputs are returned or
//! drained. `S` is the driver's handle of one local subscription's queue
//! and `W` its handle to wake one peer's sender; the core only clones them.
//! It has one of three [`Role`]s: a full node (interest records in the DHT,
//! routes, and the gateway of attached clients), a lightweight client
//! (everything through its gateway), or local-only.
//!
//! Inputs:
//! - application: `subscribe` / `unsubscribe`, `publish_local`,
//!   `route` then `publish_routed` (a full node), `publish_upstream` (a
//!   client), `leave` and `begin_finish` (graceful shutdown);
//! - a gateway's attached clients: `open_feed`, `feed_add`, `feed_remove`,
//!   `close_feed`, `forward_from_client`;
//! - the network: `handle_batch` (a PUBLISH_BATCH from a data stream),
//!   `handle_publish` (a single PUBLISH), `handle_peer_up` (with the peer's
//!   HELLO frame limit), `handle_peer_down`;
//! - results of actions: `handle_interest_found`, `handle_interest_put`;
//! - each peer's sender: `poll_transmit`, `handle_written`,
//!   `handle_send_failed`, `handle_progress`, `handle_stall`,
//!   `handle_unreachable`, `retire_if_idle`, `handle_finished`.
//!
//! Outputs:
//! - deliveries: a publish fills a [`Deliveries`] list, a batch fills its
//!   [`BatchReceiver`]; the driver pushes them into subscription queues
//!   *after* releasing whatever guards the core (never waking a subscriber
//!   under it);
//! - [`Action`]s from [`PubSubCore::poll_action`]: start or wake a peer's
//!   sender, look interest up, put an interest record;
//! - typed outcomes: [`Published`] and [`Enqueued`] (queued or why not),
//!   [`Stall`] (wait or cut off), [`Transmit`] (a batch to encode, finish,
//!   nothing, exit), [`RouteStep`] (a route, or wait for lookups).
//!
//! Order: after every input, drain `poll_action` and do what it says (the
//! order of actions is the order they arose). A sender loops
//! `poll_transmit` → `Batch::encode` (outside the lock; one encode per
//! batch) → write, reporting progress, then `handle_written`. There is no
//! core-wide timer: interest ages are checked when a route is asked for, a
//! stall when its write's deadline (`stall_deadline`) passes, idleness when
//! a sender has waited `SENDER_IDLE`.
//!
//! # Stale interest
//!
//! A node's interest record lives `INTEREST_TTL` (600 s) in the DHT even
//! after the node crashed. A full node therefore sets aside the interest of
//! a node it finds unreachable — its connection ended with `PeerDown::Left`
//! (the node said goodbye, or the transport timed out: no packet for the
//! transport idle timeout, 30 s by default), or a sender could not reach it
//! — and queues nothing more to it: **a crashed subscriber stops receiving
//! copies within the transport idle timeout of its last packet (plus the
//! 1 s interest bound for routes being rebuilt), or at once when a sender
//! fails to reach it.** The node is routed to again when it connects again,
//! when a lookup returns a newer record of it (it restarted and subscribed
//! again), or after a hold (`DOWN_HOLD_MIN`, 30 s, doubling to
//! `DOWN_HOLD_MAX`) when one attempt is made again.
//!
//! # Invariants
//!
//! **Invariant:** no I/O, no clock, no threads, no async, no locks, no
//! global state. The counters are relaxed atomics only so a metrics scrape
//! reads them without the driver's lock.
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
//! **Invariant:** one peer's queue sees one publisher's messages in
//! sequence order, and a batch is never larger than the frame limit the
//! receiving node announced in its HELLO (property-tested); a message that
//! cannot fit is dropped and counted, never silently lost.
//!
//! **Invariant:** a full peer queue does what the publish's [`Overflow`]
//! says, and nothing else: `Block` publishes nothing until the driver saw
//! room ([`PubSubCore::blocked`]), `DropOldest` evicts the oldest queued
//! messages, `DropNewest` drops the new copy, `FailFast` publishes nothing
//! and uses no sequence number. An empty queue always takes one message.
//!
//! **Invariant:** everything is bounded: subscriptions, peer queues (count
//! and bytes), outbound peers, interest and route caches, remembered puts
//! and unreachable nodes, the result cache, the publishers tracked, each
//! subscription queue. Every drop is counted ([`Counters`], [`SublistStats`],
//! [`SeqStats`], [`BoundedQueue::dropped_total`]).
//!
//! # Code map
//! - [`core`]: `PubSubCore`, its roles, actions and outcomes.
//! - [`inbound`]: batches received (check, dedup, match, group), feeds and
//!   forwarding of a gateway's attached clients.
//! - [`interest`]: records, lookups, the route cache, unreachable nodes.
//! - [`outbound`]: per-peer queues, stall and idle decisions, finishing.
//! - [`batch`]: outbound messages and their encoding sized to the receiver.
//! - [`proof`]: seals: publishers proved by one signature per batch.
//! - [`event`]: events, options, errors, the shared topic name.
//! - [`local`]: subscriptions, the per-segment index, client feeds.
//! - [`topic`]: `Topic`, `Pattern`, validation errors, the reference matcher.
//! - [`sublist`]: the token trie with its result cache (after NATS's sublist).
//! - [`dedup`]: per-publisher sequence tracking (epochs, gaps, duplicates).
//! - [`queue`]: the drop-oldest queue of one subscription.
//! - [`rendezvous`]: DHT names for interest, and the summary of what one
//!   interest record lists when the exact list is over the record limit.
//! - [`limits`]: every count limit in one overridable struct.
//! - [`counters`]: what the core did, dropped or refused.

pub mod batch;
pub mod core;
pub mod counters;
pub mod dedup;
pub mod event;
pub mod inbound;
pub mod interest;
pub mod limits;
pub mod local;
pub mod loss;
pub mod outbound;
pub mod proof;
pub mod queue;
pub mod rendezvous;
pub mod sublist;
pub mod topic;

pub use crate::core::{
    Action, Batch, Config, Deliveries, Interest, PeerDown, PubSubCore, Published, Role, Sizes,
    Subscribed, Transmit,
};
pub use batch::{
    encode_batches, encode_batches_marked, Encoded, Mark, Origin, OutMsg, BATCH_BYTES,
};
pub use counters::Counters;
pub use dedup::{Observed, SeqStats, SeqTracker};
pub use event::{Event, Overflow, PubSubError, PublishOptions, SubscriptionItem, TopicName};
pub use inbound::BatchReceiver;
pub use interest::{
    InterestLimits, InterestPut, InterestRecord, Patience, RecordForm, Route, RouteStep,
};
pub use limits::Limits;
pub use local::{FeedId, SubId};
pub use loss::LossReport;
pub use macula_wire::Millis;
pub use outbound::{Enqueued, OutLimits, PeerRef, Stall};
pub use proof::{KeyCache, Proof, ProofError, SealPlace, SealPlaces, SealedRun, Signer};
pub use queue::BoundedQueue;
pub use rendezvous::{
    interest_name, interest_segment, lookup_names, segment_name, summarize, Summary,
};
pub use sublist::{Sublist, SublistStats};
pub use topic::{Pattern, Segment, Topic, TopicError};
