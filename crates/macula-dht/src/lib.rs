//! Macula's Kademlia DHT as a pure, deterministic state machine, and its
//! Ed25519 record signatures. The simulator that drives many of them over a
//! virtual network is `macula-sim`.
//!
//! **Invariant:** no I/O, no clock, no threads, no async, no global state. Time
//! comes in as [`Millis`] arguments, randomness from a seeded [`rng::Rng`], and
//! record signatures are checked by a caller-supplied [`RecordAuth`]. The same
//! code runs in the simulator and (wrapped by the runtime) in the real node;
//! the wire mapping of [`Request`]/[`Response`] lives in another crate.
//!
//! # Driving a [`Dht`] (the order matters)
//!
//! 1. Feed one input: [`Dht::handle_request`] (send the returned response back
//!    under the request's correlation ID), [`Dht::handle_response`],
//!    [`Dht::handle_timeout`], or a command ([`Dht::bootstrap`],
//!    [`Dht::start_lookup`], [`Dht::get`], [`Dht::put`], [`Dht::unpublish`],
//!    [`Dht::report_malformed`]).
//! 2. Drain [`Dht::poll_transmit`] until `None` and send each [`Outgoing`].
//! 3. Drain [`Dht::poll_event`] until `None`.
//! 4. Re-arm the single timer with [`Dht::poll_timeout`]; when it fires, call
//!    [`Dht::handle_timeout`] with the current time and go to 2.
//!
//! Requests that get no answer need no report: the core times them out, retries
//! once, then marks the peer unresponsive. A peer that said goodbye goes to
//! [`Dht::peer_left`]; one whose connection timed out can go to
//! [`Dht::peer_unreachable`] (dropped the same way, but re-probed later).
//!
//! # Design decisions (defaults in [`config`], each with its reason)
//! - **Buckets**: 256 fixed k-buckets (k = 20) with least-recently-seen
//!   ping-evict and a replacement cache, not bucket splitting; see [`routing`].
//! - **Lookups**: alpha = 3 in flight; done when the k closest non-failed
//!   candidates have all answered. Request timeout 1 s, one retry under a new
//!   correlation ID, then the peer is evicted (unless heard from since).
//! - **Lost contacts**: a peer evicted because its requests timed out (or
//!   reported with [`Dht::peer_unreachable`]) is not forgotten: it goes on a
//!   bounded lost list (256, oldest loss dropped first) and is pinged 15 s
//!   after the loss, then after doubling waits capped at 120 s (15 s, 45 s,
//!   105 s, 225 s, ...), until it answers (back into the table) or is heard
//!   from some other way, or for 1 h (then the bucket refresh takes over).
//!   After a partition both sides evicted each other, and a refresh lookup
//!   only asks its own side: the probes are what bring them back within a
//!   probe interval of the heal. A peer reported with [`Dht::peer_left`]
//!   (goodbye, or unlisted) is not re-probed.
//! - **Puts**: lookup, then STORE to the k closest (ourselves included when we
//!   are among them); success needs a strict majority (51%) of that replica
//!   set, so a later read reaching a majority of the same nodes overlaps it.
//!   Republish at 75% of the TTL, retried after 30 s if below quorum.
//! - **Records**: one per (key, publisher); higher `seq` wins; every record
//!   has a TTL (max 24 h) counted from each store; a replica forwards only the
//!   remaining lifetime. Newly seen nodes closer to a key get it from the
//!   closest current holder.
//! - **Abuse**: per-peer token bucket (burst 200, 100/s) on requests; a
//!   malformed message empties the sender's bucket; responses over a limit are
//!   truncated and counted. Everything dropped is counted in [`Stats`].
//! - **Join**: seeds, self-lookup, then one lookup per bucket farther than the
//!   closest neighbour; a join that reaches nobody is retried after 1 s,
//!   doubling to 60 s.
//!
//! Known limits: a relay can replay a still-valid signed record to extend its
//! life (the TTL is relative, as there is no shared clock); STOREs are accepted
//! from anyone without checking that we are among the key's k closest; there
//! is no FIND_VALUE result caching along the lookup path.
//!
//! # Code map
//! - [`config`]: every limit and timer, with the reason for its default.
//! - [`routing`]: k-buckets (ping-evict with replacement cache; why is there).
//! - `lookup`: one iterative FIND_NODE / FIND_VALUE.
//! - `lost`: contacts evicted for not answering, with their probe schedule.
//! - [`store`]: records held, with TTL expiry and per-node/per-publisher limits.
//! - [`record`]: the signed record, its errors, the injected [`RecordAuth`].
//! - [`message`]: requests, responses, contacts, the outgoing envelope.
//! - `dht`: the [`Dht`] state machine tying them together.
//! - `auth`: [`Ed25519Auth`], the real [`RecordAuth`] (runtime and simulator).

mod auth;
pub mod config;
mod dht;
mod lookup;
mod lost;
pub mod message;
mod ratelimit;
pub mod record;
pub use macula_wire::rng;
pub mod routing;
pub mod store;

pub use auth::{verify_record_signature, Ed25519Auth, SIGNATURE_LEN};
pub use config::Config;
pub use dht::{Dht, Event, LookupError, PutError, PutId, RequestError, Restored, Snapshot, Stats};
pub use lookup::{LookupId, LookupKind, LookupOutcome, LookupStats};
pub use macula_wire::time::Millis;
pub use macula_wire::NodeId;
pub use message::{Contact, CorrelationId, Outgoing, Request, Response};
pub use record::{InsecureNoAuth, Record, RecordAuth, RecordError};
