//! Durable streams: topics whose events are kept on disk, with consumers
//! that acknowledge what they processed and replay from an offset or a time.
//!
//! A stream lives on the node that added it. Every event published on a
//! topic its subjects match (anywhere in the mesh) reaches that node and is
//! stored; an **acknowledged publish** ([`Streams::publish`]) is answered
//! only once the event is on disk. Consumers pull batches and acknowledge
//! them; what is not acknowledged within the ack wait comes again.
//!
//! Any node or lightweight client reaches a stream hosted elsewhere with
//! [`crate::Node::stream`] / [`crate::Client::stream`]: a [`StreamHandle`]
//! that calls the hosting node's procedure `_stream.<name>` (advertised
//! by it; the realm's `call` permissions apply), with the same operations
//! as the local one, and [`StreamHandle::subscribe`] to read from an
//! offset, a time, the last or only new messages.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use macula::stream::{AckKind, ConsumerConfig, PersistOptions, StreamConfig};
//! use std::time::Duration;
//!
//! let dir = tempfile::tempdir()?;
//! let node = macula::Node::builder()
//!     .listen("127.0.0.1:0".parse()?)
//!     .data_dir(dir.path())
//!     .start()
//!     .await?;
//! let streams = node.streams();
//! streams.add(StreamConfig::new("orders", &["orders.**"])).await?;
//! let ack = streams.publish("orders.eu", "42 apples".into(), PersistOptions::new()).await?;
//! assert_eq!(ack.seq, 1);
//!
//! let billing = streams.add_consumer("orders", ConsumerConfig::durable("billing")).await?;
//! for m in streams.next("orders", &billing, 100, None, Duration::from_secs(1)).await? {
//!     assert_eq!(&m.payload[..], b"42 apples");
//!     streams.ack("orders", &billing, m.seq, AckKind::Ack).await?;
//! }
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Semantics, limits and retention are `macula-stream`'s (re-exported
//! here): [`StreamConfig`], [`ConsumerConfig`], [`DeliverPolicy`],
//! [`AckPolicy`], [`ReplayPolicy`], [`Retention`], [`Discard`].

pub use macula_runtime::stream::remote::{procedure, DEFAULT_REMOTE_TIMEOUT};
pub use macula_runtime::stream::{
    AckKind, ConsumerReport, PersistOptions, PubAck, ReplicaStatus, ReplicationReport, StreamError,
    StreamHandle, StreamInfo, StreamMsg, StreamSubscription, Streams, CONSUMER_HEADER,
    DELIVERIES_HEADER, SEQ_HEADER, STREAM_HEADER,
};
pub use macula_stream::{
    AckPolicy, ConfigError, ConsumerConfig, DeliverPolicy, Discard, Purge, ReplayPolicy, Retention,
    StreamConfig,
};
pub use macula_wire::Millis;
