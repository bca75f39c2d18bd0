//! The headers stream deliveries carry (PROTOCOL.md 5.12): a leaf, so that
//! the end-to-end keys (`e2e.rs`) can name them without importing the
//! streams.

/// The header an acknowledged publish carries to the mesh: the stream that
/// stored it (its capture skips it).
pub const STREAM_HEADER: &str = "macula-stream";
/// The header naming the stored sequence of an acknowledged publish.
pub const SEQ_HEADER: &str = "macula-stream-seq";
/// The topic a push consumer's delivery was captured from (the
/// delivery goes out on the consumer's deliver subject). On an encrypted
/// topic the payload is the envelope as stored, sealed with this topic as
/// additional data: the subscriber opens it with it
/// (`E2e::open_event` in `e2e.rs`).
pub const SUBJECT_HEADER: &str = "macula-stream-subject";
/// The push consumer a delivery comes from (with [`STREAM_HEADER`] and
/// [`SEQ_HEADER`]: what to ack).
pub const CONSUMER_HEADER: &str = "macula-stream-consumer";
/// How many times a push delivery's message was delivered, this one
/// included.
pub const DELIVERIES_HEADER: &str = "macula-stream-deliveries";
