//! Durable streams for Macula, as a pure core.
//!
//! A **stream** captures every event published on the topics its subject
//! patterns match and keeps them under a per-stream sequence number and
//! timestamp, within limits (age, bytes, count, message size, per-message
//! TTL) and a retention policy (limits, interest, work queue), dropping a
//! second publish of the same message ID within the de-duplication window.
//! A **consumer** is a cursor over a stream with acknowledgements: deliver
//! policies (all, last, last per subject, new, from a sequence, from a
//! time), ack policies (none, all, explicit), ack wait and redelivery with
//! backoff up to `max_deliver`, `max_ack_pending` as flow control, pull
//! requests, replay at the original pace, subject filters.
//!
//! Nothing here does I/O or reads a clock: the index ([`StreamState`]) says
//! which sequence a message gets and which to delete, and the caller's
//! store keeps the payloads; stream timestamps are the caller's wall clock
//! (Unix ms) and consumer timers its monotonic clock ([`Millis`]), both
//! passed in. The same inputs give the same outputs on every replica, which
//! is what replicating a stream through a Raft log needs.
//!
//! ```
//! use macula_stream::{Appended, ConsumerConfig, Incoming, Next, Stream, StreamConfig};
//! use macula_pubsub::Topic;
//! use macula_wire::Millis;
//!
//! let mut s = Stream::new(StreamConfig::new("orders", &["orders.**"])).unwrap();
//! let t = Topic::new("orders.eu.42").unwrap();
//! let put = s.append(1_000, Incoming { subject: &t, size: 64, msg_id: None, ttl: None }).unwrap();
//! assert!(matches!(put, Appended::Stored { seq: 1, .. }));
//! let c = s.add_consumer(ConsumerConfig::durable("billing"), Millis(0)).unwrap();
//! let Next::Deliver(d) = s.next(&c, Millis(0)).unwrap() else { panic!() };
//! assert_eq!(d.stream_seq, 1);
//! s.ack(&c, 1, Millis(5)).unwrap();
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod consumer;
mod index;
pub mod state;
pub mod stream;

pub use config::{
    AckPolicy, ConfigError, ConsumerConfig, DeliverPolicy, Discard, ReplayPolicy, Retention,
    StreamConfig,
};
pub use consumer::{
    AckError, Consumer, ConsumerCounters, ConsumerInfo, ConsumerState, Delivery, Exhausted, Next,
    PullEnd, PullError, PullEvent, PullRequest,
};
pub use macula_wire::Millis;
pub use state::{
    AppendError, Appended, Incoming, Limit, MsgMeta, Purge, Restored, StreamCounters, StreamState,
};
pub use stream::{ConsumerError, Stream};
