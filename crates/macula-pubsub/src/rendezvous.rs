//! Where interest is registered in the DHT, so that publishers can find
//! subscribers without flooding the mesh.
//!
//! A subscription registers under the name derived from its pattern's first
//! segment when that segment is literal (`sensor.*.room1` -> `ps:R:sensor`):
//! every topic it can match starts with that segment, so a publisher of
//! `sensor.temp.room1` finds it by looking up `ps:R:sensor`. A pattern that
//! starts with a wildcard (`*.alarm`, `**.alarm`, `**`) can match a topic
//! with *any* first segment, so it registers under the realm-wide name
//! `ps:R:*`, and every publisher must also consult that name. Spreading
//! interest by first segment keeps one hot prefix from concentrating all
//! interest records on the same DHT nodes; the realm-wide name is the price
//! of leading wildcards (which should therefore be rare).
//!
//! Names cannot collide: `*` is never a literal segment (topics reject it),
//! and a DHT holds one realm only (peers of other realms are refused in
//! HELLO), so the realm prefix never has to be parsed back.
//!
//! One interest record holds all of a node's patterns under one name, and a
//! DHT record value is bounded (8 KiB by default). When the exact list does
//! not fit, [`summarize`] generalizes it: deep patterns are cut to a prefix
//! followed by `**`, so the record matches a superset of what the node
//! subscribes to. Publishers then send the node a few messages it does not
//! want, which it drops locally; nothing it wants is missed.
//!
//! It must only name things and compute what a record says: hashing the
//! names into DHT keys, TTLs and refreshes belong to the runtime.

use std::borrow::Cow;
use std::collections::HashSet;

use crate::topic::{Pattern, Topic, MAX_DOUBLE_WILDCARDS};

/// Prefix of every pub/sub rendezvous name (keeps them apart from other DHT
/// users of the same realm).
pub const PREFIX: &str = "ps";

/// The last part of the realm-wide name. Cannot be a topic segment.
pub const REALM_WIDE: &str = "*";

/// The DHT name under which a subscription with `pattern` registers interest.
pub fn interest_name(realm: &str, pattern: &Pattern) -> String {
    segment_name(realm, interest_segment(pattern))
}

/// The last part of `pattern`'s rendezvous name: its first segment when that
/// is literal, else [`REALM_WIDE`]. Two patterns share a name exactly when
/// they share this; comparing it allocates nothing.
pub fn interest_segment(pattern: &Pattern) -> &str {
    pattern.first_literal().unwrap_or(REALM_WIDE)
}

/// The rendezvous name whose last part is `segment` (a first segment, or
/// [`REALM_WIDE`]): `interest_name(r, p) == segment_name(r, interest_segment(p))`.
pub fn segment_name(realm: &str, segment: &str) -> String {
    name(realm, segment)
}

/// The DHT names a publisher of `topic` must look up, in this order: the one
/// of its first segment, then the realm-wide one (subscribers whose pattern
/// starts with a wildcard may match it too).
pub fn lookup_names(realm: &str, topic: &Topic) -> [String; 2] {
    [name(realm, topic.first_segment()), name(realm, REALM_WIDE)]
}

fn name(realm: &str, last: &str) -> String {
    format!("{PREFIX}:{realm}:{last}")
}

/// Smallest record size that [`summarize`] always fits: its coarsest
/// summary is the single pattern `**` (or `*`).
pub const MIN_SUMMARY_BYTES: usize = 2;

/// What one interest record says: the patterns to publish under one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Sorted, without duplicates. Every topic an input pattern matches is
    /// matched by one of these, and their encoding ([`encoded_len`]) fits
    /// the limit given to [`summarize`] when it is at least
    /// [`MIN_SUMMARY_BYTES`].
    pub patterns: Vec<String>,
    /// The patterns are exactly the input (sorted, deduplicated); false
    /// when they were generalized to fit.
    pub exact: bool,
}

/// Bytes of the record value that lists `patterns`: `patterns.join("\n")`.
pub fn encoded_len<S: AsRef<str>>(patterns: &[S]) -> usize {
    let text: usize = patterns.iter().map(|p| p.as_ref().len()).sum();
    text + patterns.len().saturating_sub(1)
}

/// The patterns one interest record should list so that its value
/// (`patterns.join("\n")`) fits in `max_bytes`.
///
/// The exact list (sorted, deduplicated) when it fits. Otherwise the
/// largest `k` (below the deepest pattern's segment count) for which this
/// generalization fits: every pattern with more than `k` segments becomes
/// its first `k` segments followed by `**` (with `k = 0`: just `**`).
/// Three details keep every result a valid [`Pattern`] that matches at
/// least what the original did, and never longer than it:
/// - a prefix that already ends in `**` is kept as it is (`**` at the end
///   already matches any rest);
/// - a prefix that already holds [`MAX_DOUBLE_WILDCARDS`] `**` is cut back
///   to end at its last `**` instead of getting another;
/// - when the only segment cut is one character long, `*` replaces it
///   (`a.b` -> `a.*`, not the longer `a.**`).
///
/// Duplicates and patterns covered by another one's `P.**` (`a`, `a.b`
/// and `a.*.c` by `a.**`) are then dropped. Below [`MIN_SUMMARY_BYTES`] the
/// result is the coarsest summary even though it does not fit.
///
/// Patterns under one rendezvous name share their first segment (or all
/// start with a wildcard), so `k = 1` leaves at most `first.**` (or `**`):
/// `k = 0` is only reached for inputs that mix first segments.
pub fn summarize(patterns: &[Pattern], max_bytes: usize) -> Summary {
    let mut exact: Vec<&str> = patterns.iter().map(Pattern::as_str).collect();
    exact.sort_unstable();
    exact.dedup();
    if encoded_len(&exact) <= max_bytes {
        return Summary {
            patterns: exact.into_iter().map(str::to_owned).collect(),
            exact: true,
        };
    }
    // Not empty here (the empty list encodes to 0 bytes), so `deepest >= 1`
    // and the loop runs at least once (`k = 0`).
    let deepest = patterns.iter().map(Pattern::n_segments).max().unwrap_or(1);
    let mut coarse = Vec::new();
    for k in (0..deepest).rev() {
        coarse = generalize_all(&exact, k);
        if encoded_len(&coarse) <= max_bytes {
            break;
        }
    }
    Summary {
        patterns: coarse.into_iter().map(Cow::into_owned).collect(),
        exact: false,
    }
}

/// Every pattern of `texts` generalized at depth `k`, sorted, without
/// duplicates or covered patterns.
fn generalize_all<'a>(texts: &[&'a str], k: usize) -> Vec<Cow<'a, str>> {
    let mut out: Vec<Cow<'a, str>> = texts.iter().map(|t| generalize(t, k)).collect();
    out.sort_unstable();
    out.dedup();
    drop_covered(&mut out);
    out
}

/// `text` (a valid pattern) cut to its first `k` segments plus `**`, as
/// [`summarize`] describes; unchanged with `k` or fewer segments.
fn generalize(text: &str, k: usize) -> Cow<'_, str> {
    let prefix = match k {
        0 => "",
        _ => match text.match_indices('.').nth(k - 1) {
            Some((dot, _)) => &text[..dot],
            None => return Cow::Borrowed(text),
        },
    };
    if prefix == "**" || prefix.ends_with(".**") {
        return Cow::Borrowed(prefix);
    }
    let mut n_double = 0;
    let mut last_double_end = 0;
    let mut pos = 0;
    for seg in prefix.split('.').filter(|_| !prefix.is_empty()) {
        pos += seg.len();
        if seg == "**" {
            n_double += 1;
            last_double_end = pos;
        }
        pos += 1;
    }
    if n_double >= MAX_DOUBLE_WILDCARDS {
        // Another `**` would break the limit; the last one already
        // matches whatever follows it.
        return Cow::Borrowed(&prefix[..last_double_end]);
    }
    let wide_len = if prefix.is_empty() {
        2
    } else {
        prefix.len() + 3
    };
    // Longer than the original only when exactly one one-character segment
    // was cut; `*` matches that segment and keeps the length.
    let tail = if wide_len <= text.len() { "**" } else { "*" };
    Cow::Owned(if prefix.is_empty() {
        tail.to_owned()
    } else {
        format!("{prefix}.{tail}")
    })
}

/// `P` when `pattern` is `P.**` (the empty string for `**` itself): the
/// pattern matches every topic some pattern starting with `P` matches.
fn open_prefix(pattern: &str) -> Option<&str> {
    if pattern == "**" {
        Some("")
    } else {
        pattern.strip_suffix(".**")
    }
}

/// Drops every pattern that another one of `sorted` covers: `P.**` covers
/// each pattern whose first segments are `P` (`**` matches any rest,
/// including none). A pattern ending in `**` is not considered covered by
/// itself followed by `**` (the two are equivalent, and one must stay).
/// The relation has no cycles, so every dropped pattern stays covered by a
/// kept one.
fn drop_covered(sorted: &mut Vec<Cow<'_, str>>) {
    let keep: Vec<bool> = {
        let open: HashSet<&str> = sorted.iter().filter_map(|p| open_prefix(p)).collect();
        if open.is_empty() {
            return;
        }
        sorted
            .iter()
            .map(|p| {
                let own = open_prefix(p);
                let whole = (!p.ends_with("**")).then_some(&p[..]);
                let prefixes = std::iter::once("")
                    .chain(p.match_indices('.').map(|(dot, _)| &p[..dot]))
                    .chain(whole);
                !prefixes
                    .filter(|pre| Some(*pre) != own)
                    .any(|pre| open.contains(pre))
            })
            .collect()
    };
    let mut keep = keep.into_iter();
    sorted.retain(|_| keep.next().unwrap_or(true));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_interest(pattern: &str, expected: &str) {
        let p = Pattern::new(pattern).unwrap_or_else(|e| panic!("{pattern:?}: {e}"));
        assert_eq!(interest_name("io.example", &p), expected, "{pattern}");
    }

    #[test]
    fn interest_by_first_literal_else_realm_wide() {
        check_interest("sensor.*.room1", "ps:io.example:sensor");
        check_interest("sensor.**", "ps:io.example:sensor");
        check_interest("sensor", "ps:io.example:sensor");
        check_interest("*.alarm", "ps:io.example:*");
        check_interest("**.alarm", "ps:io.example:*");
        check_interest("**", "ps:io.example:*");
    }

    #[test]
    fn segment_names_agree_with_interest_names() {
        for text in ["sensor.*.room1", "sensor", "*.alarm", "**"] {
            let p = Pattern::new(text).expect("valid");
            assert_eq!(
                segment_name("r", interest_segment(&p)),
                interest_name("r", &p),
                "{text}"
            );
        }
        let p = Pattern::new("sensor.**").expect("valid");
        assert_eq!(interest_segment(&p), "sensor");
        let p = Pattern::new("*.x").expect("valid");
        assert_eq!(interest_segment(&p), REALM_WIDE);
    }

    fn patterns(texts: &[&str]) -> Vec<Pattern> {
        texts
            .iter()
            .map(|t| Pattern::new(t).unwrap_or_else(|e| panic!("{t:?}: {e}")))
            .collect()
    }

    /// Summarizes `input` into `max_bytes` and checks the result.
    #[track_caller]
    fn check_summary(input: &[&str], max_bytes: usize, expected: &[&str], exact: bool) {
        let got = summarize(&patterns(input), max_bytes);
        assert_eq!(got.patterns, expected, "{input:?} into {max_bytes} bytes");
        assert_eq!(got.exact, exact, "{input:?} into {max_bytes} bytes");
    }

    #[test]
    fn a_list_that_fits_is_published_exactly() {
        check_summary(&[], 0, &[], true);
        check_summary(&["b", "a.*", "b"], 8, &["a.*", "b"], true);
        // `a.*\nb` is 5 bytes: one less and it is generalized.
        check_summary(&["b", "a.*"], 5, &["a.*", "b"], true);
        // `a.*` cannot be cut without growing, `b` neither: only `**` fits.
        check_summary(&["b", "a.*"], 4, &["**"], false);
    }

    #[test]
    fn ten_thousand_bench_topics_become_one_pattern() {
        let texts: Vec<String> = (0..10_000).map(|i| format!("bench.conn.{i}")).collect();
        let input: Vec<Pattern> = texts
            .iter()
            .map(|t| Pattern::new(t).expect("valid"))
            .collect();
        let got = summarize(&input, 8192);
        assert!(!got.exact);
        assert_eq!(got.patterns, ["bench.conn.**"]);
        // 550 of them fit as they are.
        let got = summarize(&input[..550], 8192);
        assert!(got.exact);
        assert_eq!(got.patterns.len(), 550);
    }

    #[test]
    fn the_deepest_cut_that_fits_wins() {
        let input = [
            "s.a.x.10", "s.a.x.20", "s.a.y.10", "s.b.x.10", "s.b", "s.c.*", "s",
        ];
        // Exact: 41 bytes of patterns, 6 newlines.
        check_summary(&input, 47, &sorted(&input), true);
        // k = 3 (38 bytes): `s.a.x.**` stands for both `s.a.x.*0`.
        let k3 = ["s", "s.a.x.**", "s.a.y.**", "s.b", "s.b.x.**", "s.c.*"];
        check_summary(&input, 46, &k3, false);
        check_summary(&input, 38, &k3, false);
        // k = 2 (21 bytes): `s.b.**` covers `s.b`; `s.c.*` stays (`s.c.**`
        // would be longer).
        let k2 = ["s", "s.a.**", "s.b.**", "s.c.*"];
        check_summary(&input, 37, &k2, false);
        check_summary(&input, 21, &k2, false);
        // k = 1: `s.**` covers everything, `s` included.
        check_summary(&input, 20, &["s.**"], false);
        check_summary(&input, 4, &["s.**"], false);
        // k = 0 only when even that does not fit.
        check_summary(&input, 3, &["**"], false);
        check_summary(&input, 0, &["**"], false);
    }

    #[test]
    fn mixed_depths_keep_what_is_shallow_enough() {
        let mut input: Vec<String> = (0..400).map(|i| format!("m.deep.x.y.{i}")).collect();
        input.extend(["m.one", "m.two.*", "m"].map(String::from));
        let texts: Vec<&str> = input.iter().map(String::as_str).collect();
        check_summary(
            &texts,
            100,
            &["m", "m.deep.x.y.**", "m.one", "m.two.*"],
            false,
        );
    }

    fn sorted<'a>(v: &[&'a str]) -> Vec<&'a str> {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    }

    #[test]
    fn double_wildcards_are_kept_within_the_limit() {
        // The cut already ends in `**`: kept as it is.
        assert_eq!(generalize("a.**.b.c", 2), "a.**");
        // Two `**` in the prefix: cut back to the last one.
        assert_eq!(generalize("**.a.**.b.c", 4), "**.a.**");
        assert_eq!(generalize("a.**.b.**.c.d", 4), "a.**.b.**");
        // One `**` in the prefix: a second one is allowed.
        assert_eq!(generalize("a.**.b.cc", 3), "a.**.b.**");
        // A one-character cut becomes `*`, never a longer pattern.
        assert_eq!(generalize("a.**.b.c", 3), "a.**.b.*");
        assert_eq!(generalize("a", 0), "*");
        assert_eq!(generalize("ab", 0), "**");
        // Nothing to cut.
        assert_eq!(generalize("a.b", 2), "a.b");
        assert_eq!(generalize("a.b", 5), "a.b");
    }

    #[test]
    fn covered_patterns_are_dropped_but_one_of_equivalent_ones_stays() {
        let mut v: Vec<Cow<'_, str>> = ["a", "a.*", "a.**", "a.**.**", "a.b.c", "b", "*"]
            .into_iter()
            .map(Cow::Borrowed)
            .collect();
        drop_covered(&mut v);
        assert_eq!(v, ["a.**", "b", "*"]);
        let mut v: Vec<Cow<'_, str>> = ["**", "*.**", "*", "a.b"]
            .into_iter()
            .map(Cow::Borrowed)
            .collect();
        drop_covered(&mut v);
        assert_eq!(v, ["**"]);
    }

    #[test]
    fn publishers_look_up_first_segment_and_realm_wide() {
        let t = Topic::new("sensor.temp.room1").expect("valid");
        assert_eq!(
            lookup_names("r", &t),
            ["ps:r:sensor".to_owned(), "ps:r:*".to_owned()]
        );
        let t = Topic::new("alarm").expect("valid");
        assert_eq!(
            lookup_names("r", &t),
            ["ps:r:alarm".to_owned(), "ps:r:*".to_owned()]
        );
    }
}
