//! What a stream and a consumer are configured with, and the checks that
//! refuse a configuration before anything is stored.
//!
//! Every limit has a default here, next to the reason for its value; the
//! runtime exposes them as knobs.

use std::collections::BTreeSet;

use macula_pubsub::Pattern;
use macula_wire::Millis;
use serde::{Deserialize, Serialize};

/// Longest stream or consumer name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most subject patterns one stream captures (each publish is matched
/// against every stream's patterns, so they are kept few).
pub const MAX_SUBJECTS: usize = 64;
/// Default largest message a stream accepts (1 MiB, as JetStream's default
/// payload limit).
pub const DEFAULT_MAX_MSG_SIZE: u32 = 1 << 20;
/// Hard ceiling of `max_msg_size` (a stored message is read back whole).
pub const MAX_MSG_SIZE_CEILING: u32 = 16 << 20;
/// Default de-duplication window (JetStream's default: two minutes).
pub const DEFAULT_DUPLICATE_WINDOW: Millis = Millis(120_000);
/// Message IDs a stream remembers at most, whatever the window: beyond it
/// the oldest are forgotten early (counted in [`crate::StreamCounters`]), so
/// a publisher flooding unique IDs cannot grow memory without bound.
pub const DEFAULT_MAX_DEDUP_IDS: usize = 100_000;
/// Longest message ID, in bytes (the pub/sub wire limit).
pub const MAX_MSG_ID_LEN: usize = 256;
/// Default time a delivered message may stay unacknowledged before it is
/// delivered again (JetStream's default: 30 s).
pub const DEFAULT_ACK_WAIT: Millis = Millis(30_000);
/// Default messages delivered and not yet acknowledged per consumer (as
/// JetStream). A consumer at this bound gets nothing new until it acks.
pub const DEFAULT_MAX_ACK_PENDING: u32 = 1_000;
/// Hard ceiling of `max_ack_pending` (the pending table lives in memory).
pub const MAX_ACK_PENDING_CEILING: u32 = 100_000;
/// Default pull requests one consumer keeps waiting at once.
pub const DEFAULT_MAX_WAITING: usize = 512;
/// Default number of consumers on one stream.
pub const DEFAULT_MAX_CONSUMERS: usize = 256;
/// Most steps in a redelivery backoff schedule.
pub const MAX_BACKOFF_STEPS: usize = 32;
/// Longest `sync_interval` (JetStream's server default is two minutes; a
/// longer window of writes that a power loss may take is refused).
pub const MAX_SYNC_INTERVAL: Millis = Millis(120_000);
/// Default time an ephemeral consumer lives without being asked for a
/// message before it is removed (JetStream's default: 5 s).
pub const DEFAULT_INACTIVE_THRESHOLD: Millis = Millis(5_000);

/// What happens when a publish would break a stream's limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// Remove the oldest messages to make room (the default).
    #[default]
    Old,
    /// Refuse the new message; the publisher gets an error.
    New,
}

/// When a stored message goes away (besides the limits, which always apply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Only the limits remove messages (the default).
    #[default]
    Limits,
    /// A message is removed once every consumer whose filter matches it has
    /// acknowledged it; one that no consumer matches is not kept at all.
    Interest,
    /// A message is removed once one consumer acknowledged it; consumers'
    /// filters may not overlap, so each message goes to one consumer.
    Workqueue,
}

/// A stream's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// The stream's name: ASCII letters, digits, `-` and `_`.
    pub name: String,
    /// The topics it captures: every event published on a topic one of
    /// these patterns matches is appended.
    pub subjects: Vec<String>,
    /// Copies kept (1 or 3; more is refused).
    pub replicas: u8,
    /// Messages older than this are removed. `None`: no age limit.
    pub max_age: Option<Millis>,
    /// Total stored bytes (subject + payload + headers). `None`: unlimited.
    pub max_bytes: Option<u64>,
    /// Stored messages. `None`: unlimited.
    pub max_msgs: Option<u64>,
    /// Largest message accepted.
    pub max_msg_size: u32,
    /// What a publish over the limits does.
    pub discard: Discard,
    /// When messages go away besides the limits.
    pub retention: Retention,
    /// How long a message ID is remembered to drop a second publish of it.
    pub duplicate_window: Millis,
    /// Message IDs remembered at most (see [`DEFAULT_MAX_DEDUP_IDS`]).
    pub max_dedup_ids: usize,
    /// Whether a publish may set its own time to live.
    pub allow_msg_ttl: bool,
    /// Consumers at most.
    pub max_consumers: usize,
    /// When an acknowledged publish is on disk. `None` (the default): before
    /// its acknowledgement (the store's journal is synced first). `Some(d)`:
    /// the acknowledgement follows the journal's write to the operating
    /// system, so it survives a crash or `kill -9` of the process but not a
    /// power loss of the last `d`; the journal is synced at least every
    /// `d` (JetStream's file store behaves this way, with two minutes).
    /// On a replicated stream it is the interval of the group's Raft log on
    /// every member: a publish is acknowledged once a majority has written
    /// its entry (not synced it), the log is synced at least every `d`, and
    /// votes are always synced at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_interval: Option<Millis>,
}

impl StreamConfig {
    /// A stream capturing `subjects` with every other setting at its default.
    pub fn new(name: impl Into<String>, subjects: &[&str]) -> Self {
        StreamConfig {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            replicas: 1,
            max_age: None,
            max_bytes: None,
            max_msgs: None,
            max_msg_size: DEFAULT_MAX_MSG_SIZE,
            discard: Discard::Old,
            retention: Retention::Limits,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            max_dedup_ids: DEFAULT_MAX_DEDUP_IDS,
            allow_msg_ttl: true,
            max_consumers: DEFAULT_MAX_CONSUMERS,
            sync_interval: None,
        }
    }

    /// Checks every field and returns the parsed subject patterns.
    pub fn validate(&self) -> Result<Vec<Pattern>, ConfigError> {
        check_name(&self.name)?;
        if self.subjects.is_empty() {
            return Err(ConfigError::NoSubjects);
        }
        if self.subjects.len() > MAX_SUBJECTS {
            return Err(ConfigError::TooManySubjects {
                count: self.subjects.len(),
                max: MAX_SUBJECTS,
            });
        }
        let patterns = parse_patterns(&self.subjects)?;
        for (i, a) in patterns.iter().enumerate() {
            for b in &patterns[i + 1..] {
                if macula_auth::policy::overlaps(a, b) {
                    return Err(ConfigError::OverlappingSubjects {
                        a: a.to_string(),
                        b: b.to_string(),
                    });
                }
            }
        }
        if !matches!(self.replicas, 1 | 3) {
            return Err(ConfigError::Replicas(self.replicas));
        }
        if self.max_msg_size == 0 || self.max_msg_size > MAX_MSG_SIZE_CEILING {
            return Err(ConfigError::MaxMsgSize {
                value: self.max_msg_size,
                max: MAX_MSG_SIZE_CEILING,
            });
        }
        if self.max_age == Some(Millis::ZERO) {
            return Err(ConfigError::Zero("max_age"));
        }
        if self.max_bytes == Some(0) {
            return Err(ConfigError::Zero("max_bytes"));
        }
        if self.max_msgs == Some(0) {
            return Err(ConfigError::Zero("max_msgs"));
        }
        if self.max_consumers == 0 {
            return Err(ConfigError::Zero("max_consumers"));
        }
        if self.max_dedup_ids == 0 && self.duplicate_window > Millis::ZERO {
            return Err(ConfigError::Zero("max_dedup_ids"));
        }
        if let Some(d) = self.sync_interval {
            if d == Millis::ZERO || d > MAX_SYNC_INTERVAL {
                return Err(ConfigError::SyncInterval(format!(
                    "{} ms out of range 1..={} ms",
                    d.0, MAX_SYNC_INTERVAL.0
                )));
            }
        }
        Ok(patterns)
    }

    /// Whether `next` may replace this configuration on a live stream:
    /// the name, replica count and retention are fixed at creation (a work
    /// queue's messages are not an interest stream's).
    pub fn check_edit(&self, next: &StreamConfig) -> Result<(), ConfigError> {
        if next.name != self.name {
            return Err(ConfigError::Immutable("name"));
        }
        if next.replicas != self.replicas {
            return Err(ConfigError::Immutable("replicas"));
        }
        if next.retention != self.retention {
            return Err(ConfigError::Immutable("retention"));
        }
        next.validate().map(drop)
    }
}

/// Where a new consumer starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy", content = "at")]
pub enum DeliverPolicy {
    /// Every stored message (the default).
    #[default]
    All,
    /// The last stored message its filter matches, then new ones.
    Last,
    /// For each subject its filter matches, the last stored message, then
    /// new ones.
    LastPerSubject,
    /// Only messages stored after it was created.
    New,
    /// From this stream sequence on.
    ByStartSeq(u64),
    /// From the first message stored at or after this time (Unix ms).
    ByStartTime(u64),
}

/// How a consumer's deliveries are acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicy {
    /// A delivery needs no ack: delivered is done.
    None,
    /// Acknowledging a message acknowledges every earlier one delivered.
    All,
    /// Each delivery is acknowledged on its own (the default).
    #[default]
    Explicit,
}

/// How fast stored messages are delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayPolicy {
    /// As fast as the consumer takes them (the default).
    #[default]
    Instant,
    /// At the pace they were stored: the gaps between their timestamps.
    Original,
}

/// A consumer's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerConfig {
    /// Durable consumers have a name and keep their position across
    /// restarts; ephemeral ones (`None`) are removed when idle.
    pub durable: Option<String>,
    /// Where it starts.
    pub deliver: DeliverPolicy,
    /// How deliveries are acknowledged.
    pub ack: AckPolicy,
    /// How long a delivery may wait for its ack before it is delivered again.
    pub ack_wait: Millis,
    /// Deliveries of one message at most; `None`: unlimited.
    pub max_deliver: Option<u32>,
    /// How long the 1st, 2nd, ... delivery of a message waits for its ack
    /// before the message is delivered again (instead of `ack_wait`; the
    /// last step repeats). At most `max_deliver` steps.
    pub backoff: Vec<Millis>,
    /// Deliveries not yet acknowledged at most.
    pub max_ack_pending: u32,
    /// Only messages whose topic one of these patterns matches; empty: all.
    pub filter: Vec<String>,
    /// Instant or at the original pace.
    pub replay: ReplayPolicy,
    /// Pull requests waiting at once at most.
    pub max_waiting: usize,
    /// An ephemeral consumer nobody asked anything of for this long is
    /// removed.
    pub inactive_threshold: Millis,
    /// A **push** consumer: its node publishes each delivery to this topic
    /// (pull requests are refused); `None`: a pull consumer. Push
    /// consumers are durable.
    #[serde(default)]
    pub deliver_subject: Option<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            durable: None,
            deliver: DeliverPolicy::All,
            ack: AckPolicy::Explicit,
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliver: None,
            backoff: Vec::new(),
            max_ack_pending: DEFAULT_MAX_ACK_PENDING,
            filter: Vec::new(),
            replay: ReplayPolicy::Instant,
            max_waiting: DEFAULT_MAX_WAITING,
            inactive_threshold: DEFAULT_INACTIVE_THRESHOLD,
            deliver_subject: None,
        }
    }
}

impl ConsumerConfig {
    /// A durable consumer named `name` with every other setting at its
    /// default.
    pub fn durable(name: impl Into<String>) -> Self {
        ConsumerConfig {
            durable: Some(name.into()),
            ..Default::default()
        }
    }

    /// Checks every field and returns the parsed filter patterns.
    pub fn validate(&self) -> Result<Vec<Pattern>, ConfigError> {
        if let Some(name) = &self.durable {
            check_name(name)?;
        }
        if self.filter.len() > MAX_SUBJECTS {
            return Err(ConfigError::TooManySubjects {
                count: self.filter.len(),
                max: MAX_SUBJECTS,
            });
        }
        let filter = parse_patterns(&self.filter)?;
        if self.ack != AckPolicy::None {
            if self.ack_wait == Millis::ZERO {
                return Err(ConfigError::Zero("ack_wait"));
            }
            if self.max_ack_pending == 0 || self.max_ack_pending > MAX_ACK_PENDING_CEILING {
                return Err(ConfigError::MaxAckPending {
                    value: self.max_ack_pending,
                    max: MAX_ACK_PENDING_CEILING,
                });
            }
        }
        if self.max_deliver == Some(0) {
            return Err(ConfigError::Zero("max_deliver"));
        }
        if self.backoff.len() > MAX_BACKOFF_STEPS {
            return Err(ConfigError::Backoff(format!(
                "{} steps, at most {MAX_BACKOFF_STEPS}",
                self.backoff.len()
            )));
        }
        if self.backoff.contains(&Millis::ZERO) {
            return Err(ConfigError::Backoff("a step of 0".into()));
        }
        if let Some(max) = self.max_deliver {
            if self.backoff.len() > max as usize {
                return Err(ConfigError::Backoff(format!(
                    "{} steps but max_deliver {max} makes at most {max} deliveries",
                    self.backoff.len()
                )));
            }
        }
        if self.max_waiting == 0 {
            return Err(ConfigError::Zero("max_waiting"));
        }
        if self.durable.is_none() && self.inactive_threshold == Millis::ZERO {
            return Err(ConfigError::Zero("inactive_threshold"));
        }
        if let Some(subject) = &self.deliver_subject {
            macula_pubsub::Topic::new(subject).map_err(|e| ConfigError::Subject {
                subject: subject.clone(),
                reason: e.to_string(),
            })?;
            if self.durable.is_none() {
                return Err(ConfigError::Push(
                    "a push consumer must be durable (give it a name; delete it when done)".into(),
                ));
            }
        }
        Ok(filter)
    }
}

fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Name(
            name.chars().take(MAX_NAME_LEN + 8).collect(),
        ))
    }
}

fn parse_patterns(texts: &[String]) -> Result<Vec<Pattern>, ConfigError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(texts.len());
    for t in texts {
        let p = Pattern::new(t).map_err(|e| ConfigError::Subject {
            subject: t.clone(),
            reason: e.to_string(),
        })?;
        if seen.insert(t.as_str()) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The name is empty, too long or has a character other than ASCII
    /// letters, digits, `-` and `_`.
    #[error("invalid name {0:?}: 1 to 64 ASCII letters, digits, '-' or '_'")]
    Name(String),
    /// A stream must capture at least one subject.
    #[error("a stream needs at least one subject")]
    NoSubjects,
    /// Too many subject or filter patterns.
    #[error("{count} subjects, at most {max}")]
    TooManySubjects {
        /// Given.
        count: usize,
        /// Allowed.
        max: usize,
    },
    /// A subject or filter is not a valid pattern.
    #[error("invalid subject {subject:?}: {reason}")]
    Subject {
        /// The text given.
        subject: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Two subjects of one stream match a common topic.
    #[error("subjects {a:?} and {b:?} overlap")]
    OverlappingSubjects {
        /// One.
        a: String,
        /// The other.
        b: String,
    },
    /// Replicas other than 1 or 3.
    #[error("replicas must be 1 or 3, not {0}")]
    Replicas(u8),
    /// `max_msg_size` of 0 or over the ceiling.
    #[error("max_msg_size {value} out of range 1..={max}")]
    MaxMsgSize {
        /// Given.
        value: u32,
        /// Ceiling.
        max: u32,
    },
    /// `max_ack_pending` of 0 or over the ceiling.
    #[error("max_ack_pending {value} out of range 1..={max}")]
    MaxAckPending {
        /// Given.
        value: u32,
        /// Ceiling.
        max: u32,
    },
    /// A limit that must not be zero is.
    #[error("{0} must not be 0")]
    Zero(&'static str),
    /// A bad redelivery backoff schedule.
    #[error("invalid backoff: {0}")]
    Backoff(String),
    /// A push consumer's settings do not hold together.
    #[error("invalid push consumer: {0}")]
    Push(String),
    /// A field that cannot change on a live stream.
    #[error("{0} cannot be changed on an existing stream")]
    Immutable(&'static str),
    /// A `sync_interval` out of range.
    #[error("invalid sync_interval: {0}")]
    SyncInterval(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = StreamConfig::new("orders", &["orders.**"]);
        assert_eq!(c.validate().unwrap().len(), 1);
        assert!(ConsumerConfig::default().validate().unwrap().is_empty());
        assert!(ConsumerConfig::durable("worker-1").validate().is_ok());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a b", "a.b", "ü", &"x".repeat(65)] {
            let c = StreamConfig::new(bad, &["a"]);
            assert!(matches!(c.validate(), Err(ConfigError::Name(_))), "{bad:?}");
        }
        assert!(StreamConfig::new("A-z_09", &["a"]).validate().is_ok());
        assert!(StreamConfig::new("x".repeat(64), &["a"]).validate().is_ok());
    }

    #[test]
    fn subjects_are_checked() {
        assert_eq!(
            StreamConfig::new("s", &[]).validate(),
            Err(ConfigError::NoSubjects)
        );
        assert!(matches!(
            StreamConfig::new("s", &["a..b"]).validate(),
            Err(ConfigError::Subject { .. })
        ));
        assert!(matches!(
            StreamConfig::new("s", &["a.*", "a.b"]).validate(),
            Err(ConfigError::OverlappingSubjects { .. })
        ));
        // The same pattern twice is one.
        assert_eq!(
            StreamConfig::new("s", &["a.b", "a.b"])
                .validate()
                .unwrap()
                .len(),
            1
        );
        let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            StreamConfig::new("s", &refs).validate(),
            Err(ConfigError::TooManySubjects { count: 65, .. })
        ));
    }

    #[test]
    fn limits_are_checked() {
        let base = StreamConfig::new("s", &["a"]);
        let cases: Vec<(StreamConfig, ConfigError)> = vec![
            (
                StreamConfig {
                    replicas: 2,
                    ..base.clone()
                },
                ConfigError::Replicas(2),
            ),
            (
                StreamConfig {
                    max_msg_size: 0,
                    ..base.clone()
                },
                ConfigError::MaxMsgSize {
                    value: 0,
                    max: MAX_MSG_SIZE_CEILING,
                },
            ),
            (
                StreamConfig {
                    max_age: Some(Millis::ZERO),
                    ..base.clone()
                },
                ConfigError::Zero("max_age"),
            ),
            (
                StreamConfig {
                    max_bytes: Some(0),
                    ..base.clone()
                },
                ConfigError::Zero("max_bytes"),
            ),
            (
                StreamConfig {
                    max_msgs: Some(0),
                    ..base.clone()
                },
                ConfigError::Zero("max_msgs"),
            ),
        ];
        for (c, e) in cases {
            assert_eq!(c.validate(), Err(e));
        }
        for bad in [Millis::ZERO, Millis(MAX_SYNC_INTERVAL.0 + 1)] {
            let c = StreamConfig {
                sync_interval: Some(bad),
                ..base.clone()
            };
            assert!(
                matches!(c.validate(), Err(ConfigError::SyncInterval(_))),
                "{bad:?}"
            );
        }
        let r3 = StreamConfig {
            replicas: 3,
            sync_interval: Some(Millis(100)),
            ..base.clone()
        };
        // A replicated stream takes it too (for its Raft log).
        assert!(r3.validate().is_ok());
        let r1 = StreamConfig {
            sync_interval: Some(MAX_SYNC_INTERVAL),
            ..base.clone()
        };
        assert!(r1.validate().is_ok());
        // Left out of the JSON when unset, so older readers take it; read
        // back as unset from JSON without it.
        let json = serde_json::to_string(&base).unwrap();
        assert!(!json.contains("sync_interval"), "{json}");
        let back: StreamConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.sync_interval, None);
        let json = serde_json::to_string(&r1).unwrap();
        let back: StreamConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r1);
        assert!(StreamConfig {
            replicas: 3,
            max_msg_size: MAX_MSG_SIZE_CEILING,
            ..base
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn limits_hold_exactly_at_their_bounds() {
        let many: Vec<String> = (0..MAX_SUBJECTS).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(StreamConfig::new("s", &refs).validate().is_ok());
        let mut c = StreamConfig::new("s", &["a"]);
        c.max_dedup_ids = 0;
        assert_eq!(c.validate(), Err(ConfigError::Zero("max_dedup_ids")));
        c.duplicate_window = Millis::ZERO;
        assert!(c.validate().is_ok(), "no window, no IDs to keep");
        let ok = |c: ConsumerConfig| c.validate().is_ok();
        assert!(ok(ConsumerConfig {
            filter: many.clone(),
            ..Default::default()
        }));
        let mut more = many.clone();
        more.push("t-extra".into());
        assert!(!ok(ConsumerConfig {
            filter: more,
            ..Default::default()
        }));
        assert!(ok(ConsumerConfig {
            max_ack_pending: MAX_ACK_PENDING_CEILING,
            ..Default::default()
        }));
        assert!(ok(ConsumerConfig {
            backoff: vec![Millis(1); MAX_BACKOFF_STEPS],
            ..Default::default()
        }));
        assert!(!ok(ConsumerConfig {
            backoff: vec![Millis(1); MAX_BACKOFF_STEPS + 1],
            ..Default::default()
        }));
        // A refused name is quoted, cut to a readable length.
        let long = "é".repeat(200);
        match StreamConfig::new(long, &["a"]).validate() {
            Err(ConfigError::Name(n)) => assert_eq!(n.chars().count(), MAX_NAME_LEN + 8),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn edits_keep_what_is_fixed() {
        let a = StreamConfig::new("s", &["a"]);
        let mut b = a.clone();
        b.max_msgs = Some(10);
        b.subjects.push("b".into());
        assert!(a.check_edit(&b).is_ok());
        b.retention = Retention::Workqueue;
        assert_eq!(a.check_edit(&b), Err(ConfigError::Immutable("retention")));
        let mut c = a.clone();
        c.replicas = 3;
        assert_eq!(a.check_edit(&c), Err(ConfigError::Immutable("replicas")));
        let mut d = a.clone();
        d.name = "t".into();
        assert_eq!(a.check_edit(&d), Err(ConfigError::Immutable("name")));
    }

    #[test]
    fn consumer_limits_are_checked() {
        let bad = [
            ConsumerConfig {
                ack_wait: Millis::ZERO,
                ..Default::default()
            },
            ConsumerConfig {
                max_ack_pending: 0,
                ..Default::default()
            },
            ConsumerConfig {
                max_ack_pending: MAX_ACK_PENDING_CEILING + 1,
                ..Default::default()
            },
            ConsumerConfig {
                max_deliver: Some(0),
                ..Default::default()
            },
            ConsumerConfig {
                backoff: vec![Millis(5), Millis::ZERO],
                ..Default::default()
            },
            ConsumerConfig {
                backoff: vec![Millis(5); 4],
                max_deliver: Some(3),
                ..Default::default()
            },
            ConsumerConfig {
                max_waiting: 0,
                ..Default::default()
            },
            ConsumerConfig {
                inactive_threshold: Millis::ZERO,
                ..Default::default()
            },
            ConsumerConfig {
                filter: vec!["a.**.**.**".into()],
                ..Default::default()
            },
            ConsumerConfig::durable("bad name"),
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        // Without acks the ack limits do not apply.
        assert!(ConsumerConfig {
            ack: AckPolicy::None,
            ack_wait: Millis::ZERO,
            max_ack_pending: 0,
            ..Default::default()
        }
        .validate()
        .is_ok());
        // A durable consumer is never removed for inactivity.
        assert!(ConsumerConfig {
            inactive_threshold: Millis::ZERO,
            ..ConsumerConfig::durable("d")
        }
        .validate()
        .is_ok());
        assert!(ConsumerConfig {
            backoff: vec![Millis(5); 3],
            max_deliver: Some(3),
            ..Default::default()
        }
        .validate()
        .is_ok());
    }
}
