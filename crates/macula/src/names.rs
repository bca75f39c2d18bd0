//! The rules for names: topics, subscription patterns, procedures, realms.
//!
//! Every call that takes a name checks it too; these functions let an
//! application refuse a bad name before it starts a node or joins a mesh
//! (the `macula` CLI does, so a typo fails at once).
//!
//! ```
//! use macula::names;
//!
//! assert!(names::validate_topic("orders.new.eu").is_ok());
//! assert!(names::validate_topic("orders.*").is_err()); // wildcards only in patterns
//! assert!(names::validate_pattern("orders.*.eu").is_ok());
//! assert!(names::validate_procedure("pricing.quote").is_ok());
//! assert!(names::validate_realm("io.example.shop").is_ok());
//! ```

pub use macula_pubsub::topic::{TopicError, MAX_SEGMENTS, MAX_TOPIC_LEN};
pub use macula_rpc::name::{NameError as ProcedureError, MAX_PROCEDURE_LEN};
pub use macula_wire::MAX_REALM_LEN;

/// Checks a topic to publish on: dot-separated segments, no wildcards, at
/// most [`MAX_TOPIC_LEN`] bytes and [`MAX_SEGMENTS`] segments.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    macula_pubsub::Topic::new(topic).map(drop)
}

/// Checks a subscription pattern: a topic where a segment may be `*` (any
/// one segment) or `**` (any number of segments).
pub fn validate_pattern(pattern: &str) -> Result<(), TopicError> {
    macula_pubsub::Pattern::new(pattern).map(drop)
}

/// Checks a procedure name: dot-separated segments of ASCII letters,
/// digits, `_`, `-`, `:` and `/`, at most [`MAX_PROCEDURE_LEN`] bytes.
pub fn validate_procedure(procedure: &str) -> Result<(), ProcedureError> {
    macula_rpc::validate_procedure(procedure)
}

/// Checks a realm: 1 to [`MAX_REALM_LEN`] bytes of dot-separated DNS-style
/// labels (`a-z`, `0-9`, `-`; no empty label; no label starting or ending
/// with `-`). The error says what is wrong.
pub fn validate_realm(realm: &str) -> Result<(), String> {
    macula_runtime::config::validate_realm(realm)
}
