//! Topics (what a publisher names) and patterns (what a subscriber asks for),
//! validated once at the boundary so the rest of the core can trust them.
//!
//! A topic is one or more non-empty segments separated by dots:
//! `sensor.temp.room1`. A pattern is the same, except that a whole segment may
//! be a wildcard: `*` matches exactly one segment and `**` matches zero or
//! more segments, anywhere in the pattern (`sensor.**` matches `sensor`;
//! `**.alarm` matches `alarm` and `a.b.alarm`).
//!
//! `*` is reserved: it never appears in a topic, and in a pattern only as a
//! whole segment. That keeps the two languages unambiguous (every topic is
//! also a literal pattern that matches exactly itself).
//!
//! [`Pattern::matches`] is the reference matcher: written to be obviously
//! right, not fast. [`crate::Sublist`] is the fast one and is property-tested
//! against it. This module must not grow a second, clever matcher.

use std::fmt;
use std::str::FromStr;

use crate::Limits;

/// Longest topic or pattern in bytes. Long enough for deep, descriptive names;
/// short enough that topics stay cheap as cache keys and in every frame.
pub const MAX_TOPIC_LEN: usize = 256;

/// Most segments in a topic or pattern. Bounds trie depth, recursion in
/// matching and the matcher's on-stack segment array.
pub const MAX_SEGMENTS: usize = 16;

/// Most `**` segments per pattern. Each `**` can absorb any number of
/// segments, so the ways one pattern can match a topic grow like
/// `(segments + 1)^k`; with 2 the worst case is 17^2 = 289 paths.
pub const MAX_DOUBLE_WILDCARDS: usize = 2;

/// Why a topic or pattern was rejected. `index` is the 0-based segment.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The string is empty.
    #[error("topic is empty")]
    Empty,
    /// Over [`Limits::max_topic_len`] bytes.
    #[error("topic is {len} bytes long, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    /// Over [`Limits::max_segments`] segments.
    #[error("topic has {n_segments} segments, over the limit of {max}")]
    TooManySegments { n_segments: usize, max: usize },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("segment {index} is empty (leading, trailing or doubled dot)")]
    EmptySegment { index: usize },
    /// Whitespace or a control character.
    #[error("segment {index} contains {ch:?}; whitespace and control characters are not allowed")]
    ForbiddenChar { index: usize, ch: char },
    /// A `*` in a publish topic (topics are literal; `*` is reserved).
    #[error("segment {index} contains '*'; a publish topic cannot contain wildcards")]
    WildcardInTopic { index: usize },
    /// A pattern segment that mixes `*` with other characters (`a*`, `**b`, `***`).
    #[error("segment {index} mixes '*' with other characters; a wildcard must be a whole segment, '*' or '**'")]
    PartialWildcard { index: usize },
    /// More `**` segments than [`Limits::max_double_wildcards`]; `index` is
    /// the first one over the limit.
    #[error("segment {index} is '**' number {n}, over the limit of {max} per pattern")]
    TooManyDoubleWildcards { index: usize, n: usize, max: usize },
}

/// A validated publish topic: literal segments only.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Box<str>);

/// A validated subscription pattern: literal segments, `*` and `**`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern {
    text: Box<str>,
    /// Cached so the sublist and rendezvous code never rescan the text.
    literal: bool,
}

/// One segment of a pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Segment<'a> {
    /// Matches exactly this text.
    Literal(&'a str),
    /// `*`: exactly one segment.
    Star,
    /// `**`: zero or more segments.
    DoubleStar,
}

impl<'a> Segment<'a> {
    fn parse(s: &'a str) -> Self {
        match s {
            "*" => Segment::Star,
            "**" => Segment::DoubleStar,
            _ => Segment::Literal(s),
        }
    }
}

/// Whether a `*` may appear (as a whole segment) in what is being validated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Topic,
    Pattern,
}

/// The one validator behind both types, so they cannot drift apart.
/// Whole-string limits come first: they bound the work done on the rest.
/// Returns whether the text is free of wildcards.
fn validate(s: &str, kind: Kind, limits: &Limits) -> Result<bool, TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_topic_len {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: limits.max_topic_len,
        });
    }
    let n_segments = s.bytes().filter(|&b| b == b'.').count() + 1;
    if n_segments > limits.max_segments {
        return Err(TopicError::TooManySegments {
            n_segments,
            max: limits.max_segments,
        });
    }
    let mut n_double = 0usize;
    let mut literal = true;
    for (index, seg) in s.split('.').enumerate() {
        if seg.is_empty() {
            return Err(TopicError::EmptySegment { index });
        }
        if let Some(ch) = seg.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(TopicError::ForbiddenChar { index, ch });
        }
        if !seg.contains('*') {
            continue;
        }
        literal = false;
        match (kind, seg) {
            (Kind::Topic, _) => return Err(TopicError::WildcardInTopic { index }),
            (Kind::Pattern, "*") => {}
            (Kind::Pattern, "**") => {
                n_double += 1;
                if n_double > limits.max_double_wildcards {
                    return Err(TopicError::TooManyDoubleWildcards {
                        index,
                        n: n_double,
                        max: limits.max_double_wildcards,
                    });
                }
            }
            (Kind::Pattern, _) => return Err(TopicError::PartialWildcard { index }),
        }
    }
    Ok(literal)
}

impl Topic {
    /// Validates `s` as a publish topic under the default [`Limits`].
    pub fn new(s: &str) -> Result<Self, TopicError> {
        Self::with_limits(s, &Limits::default())
    }

    /// Validates `s` as a publish topic under `limits`.
    pub fn with_limits(s: &str, limits: &Limits) -> Result<Self, TopicError> {
        validate(s, Kind::Topic, limits)?;
        Ok(Topic(s.into()))
    }

    /// The topic text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments, in order; never empty, no segment is empty.
    pub fn segments(&self) -> std::str::Split<'_, char> {
        self.0.split('.')
    }

    /// Number of segments (at least 1).
    pub fn n_segments(&self) -> usize {
        self.segments().count()
    }

    /// The first segment (a topic always has one).
    pub fn first_segment(&self) -> &str {
        // `split` always yields at least one item; the fallback is unreachable
        // but cheaper to state than to assert.
        self.segments().next().unwrap_or(&self.0)
    }
}

impl Pattern {
    /// Validates `s` as a subscription pattern under the default [`Limits`].
    pub fn new(s: &str) -> Result<Self, TopicError> {
        Self::with_limits(s, &Limits::default())
    }

    /// Validates `s` as a subscription pattern under `limits`.
    pub fn with_limits(s: &str, limits: &Limits) -> Result<Self, TopicError> {
        let literal = validate(s, Kind::Pattern, limits)?;
        Ok(Pattern {
            text: s.into(),
            literal,
        })
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The segments, in order; never empty.
    pub fn segments(&self) -> impl Iterator<Item = Segment<'_>> + Clone {
        self.text.split('.').map(Segment::parse)
    }

    /// Number of segments (at least 1).
    pub fn n_segments(&self) -> usize {
        self.text.split('.').count()
    }

    /// True when the pattern has no wildcard, so it matches exactly one topic.
    pub fn is_literal(&self) -> bool {
        self.literal
    }

    /// The first segment when it is literal. Rendezvous keys are derived from
    /// it: every topic this pattern matches starts with that segment.
    pub fn first_literal(&self) -> Option<&str> {
        match self.segments().next() {
            Some(Segment::Literal(s)) => Some(s),
            _ => None,
        }
    }

    /// The reference matcher: does this pattern match `topic`? Tries every
    /// split for `**` by recursion, which is exponential in the number of
    /// `**` (bounded by [`MAX_DOUBLE_WILDCARDS`]). Use [`crate::Sublist`] to
    /// match many patterns fast.
    pub fn matches(&self, topic: &Topic) -> bool {
        let pattern: Vec<Segment<'_>> = self.segments().collect();
        let topic: Vec<&str> = topic.segments().collect();
        match_naive(&pattern, &topic)
    }
}

fn match_naive(pattern: &[Segment<'_>], topic: &[&str]) -> bool {
    match pattern.split_first() {
        None => topic.is_empty(),
        Some((Segment::DoubleStar, rest)) => {
            (0..=topic.len()).any(|k| match_naive(rest, &topic[k..]))
        }
        Some((Segment::Star, rest)) => !topic.is_empty() && match_naive(rest, &topic[1..]),
        Some((Segment::Literal(lit), rest)) => {
            topic.first() == Some(lit) && match_naive(rest, &topic[1..])
        }
    }
}

impl From<Topic> for Pattern {
    /// A topic is a literal pattern that matches exactly itself.
    fn from(topic: Topic) -> Self {
        Pattern {
            text: topic.0,
            literal: true,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Topic::new(s)
    }
}

impl FromStr for Pattern {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::new(s)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Pattern {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}
