//! Property tests: the sublist against the reference matcher, parsing against
//! arbitrary input, rendezvous names against matching, and interest
//! summaries against the patterns they stand for.

use std::collections::HashSet;

use macula_pubsub::rendezvous::{encoded_len, MIN_SUMMARY_BYTES};
use macula_pubsub::{
    interest_name, lookup_names, summarize, Limits, Pattern, Segment, Sublist, Topic,
};
use proptest::prelude::*;

/// A small alphabet makes overlaps, repeats and backtracking common.
fn segment() -> impl Strategy<Value = &'static str> {
    prop_oneof![3 => Just("a"), 3 => Just("b"), 2 => Just("c"), 2 => Just("*"), 2 => Just("**")]
}

fn pattern() -> impl Strategy<Value = Pattern> {
    prop::collection::vec(segment(), 1..5)
        .prop_map(|segs| segs.join("."))
        // Only the `**` limit can fail here; keep the patterns that pass it.
        .prop_filter_map("over the ** limit", |s| Pattern::new(&s).ok())
}

fn topic() -> impl Strategy<Value = Topic> {
    prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..6)
        .prop_map(|segs| Topic::new(&segs.join(".")).expect("alphabet topics are valid"))
}

/// Deeper patterns with longer segments, so summaries cut at many depths.
fn deep_pattern() -> impl Strategy<Value = Pattern> {
    let seg = prop_oneof![
        3 => Just("a"), 2 => Just("bb"), 2 => Just("ccc"), 2 => Just("*"), 1 => Just("**")
    ];
    prop::collection::vec(seg, 1..9)
        .prop_map(|segs| segs.join("."))
        .prop_filter_map("over the ** limit", |s| Pattern::new(&s).ok())
}

/// Topics that `p` matches: each `*` becomes `fill`, each `**` becomes
/// nothing or `fill.fill` (by `wide`). `None` when nothing is left (`**`).
fn instance(p: &Pattern, fill: &str, wide: bool) -> Option<Topic> {
    let mut segs: Vec<&str> = Vec::new();
    for s in p.segments() {
        match s {
            Segment::Literal(l) => segs.push(l),
            Segment::Star => segs.push(fill),
            Segment::DoubleStar if wide => segs.extend([fill, fill]),
            Segment::DoubleStar => {}
        }
    }
    Topic::new(&segs.join(".")).ok()
}

/// Checks one summary of `input` into `max_bytes` against the properties
/// `summarize` promises, probing with `topics` and instances of the input.
fn check_summary(
    input: &[Pattern],
    max_bytes: usize,
    topics: &[Topic],
) -> Result<(), TestCaseError> {
    let got = summarize(input, max_bytes);
    let out: Vec<Pattern> = got
        .patterns
        .iter()
        .map(|t| Pattern::new(t).map_err(|e| TestCaseError::fail(format!("{t:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    let mut exact: Vec<&str> = input.iter().map(Pattern::as_str).collect();
    exact.sort_unstable();
    exact.dedup();
    // (c) exact whenever the exact list fits, and only then.
    let fits = encoded_len(&exact) <= max_bytes;
    prop_assert_eq!(got.exact, fits);
    if fits {
        prop_assert_eq!(&got.patterns, &exact);
    }
    // (b) fits the limit from the documented minimum on.
    if max_bytes >= MIN_SUMMARY_BYTES {
        prop_assert!(
            encoded_len(&got.patterns) <= max_bytes,
            "{:?} over {}",
            got.patterns,
            max_bytes
        );
    }
    // Sorted, no duplicates, never longer than the longest input pattern.
    prop_assert!(
        got.patterns.windows(2).all(|w| w[0] < w[1]),
        "{:?}",
        got.patterns
    );
    let longest = input.iter().map(|p| p.as_str().len()).max().unwrap_or(0);
    prop_assert!(
        got.patterns.iter().all(|p| p.len() <= longest),
        "{:?}",
        got.patterns
    );
    // (a) every topic an input pattern matches, some output pattern matches.
    let probes = input
        .iter()
        .flat_map(|p| [instance(p, "a", false), instance(p, "zz", true)])
        .flatten()
        .chain(topics.iter().cloned());
    for t in probes {
        if input.iter().any(|p| p.matches(&t)) {
            prop_assert!(
                out.iter().any(|p| p.matches(&t)),
                "topic {} lost: {:?} summarized as {:?}",
                t,
                exact,
                got.patterns
            );
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Op {
    Insert(Pattern, u8),
    Remove(Pattern, u8),
    Match(Topic),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (pattern(), 0..4u8).prop_map(|(p, v)| Op::Insert(p, v)),
        2 => (pattern(), 0..4u8).prop_map(|(p, v)| Op::Remove(p, v)),
        4 => topic().prop_map(Op::Match),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Every sublist (cache off, default cache, a 2-entry cache that evicts
    /// constantly) answers exactly what filtering every pattern with the
    /// naive matcher answers, each value once, all in the same order.
    #[test]
    fn sublist_equals_naive_filter(ops in prop::collection::vec(op(), 1..60)) {
        let mut model: HashSet<(Pattern, u8)> = HashSet::new();
        let mut lists = [
            Sublist::with_cache(false),
            Sublist::with_cache(true),
            Sublist::with_limits(&Limits { cache_capacity: 2, ..Default::default() }),
        ];
        for op in ops {
            match op {
                Op::Insert(p, v) => {
                    let fresh = model.insert((p.clone(), v));
                    for list in &mut lists {
                        prop_assert_eq!(list.insert(&p, v), fresh);
                    }
                }
                Op::Remove(p, v) => {
                    let present = model.remove(&(p.clone(), v));
                    for list in &mut lists {
                        prop_assert_eq!(list.remove(&p, &v), present);
                    }
                }
                Op::Match(t) => {
                    let mut want: Vec<u8> = model
                        .iter()
                        .filter(|(p, _)| p.matches(&t))
                        .map(|(_, v)| *v)
                        .collect::<HashSet<_>>()
                        .into_iter()
                        .collect();
                    want.sort_unstable();
                    let reference = lists[0].matches(&t);
                    for list in &mut lists {
                        let got = list.matches(&t);
                        prop_assert_eq!(&got, &reference, "order differs between cache settings");
                        let mut sorted = got.clone();
                        sorted.sort_unstable();
                        prop_assert_eq!(&sorted, &want, "topic {}", t);
                    }
                }
            }
            for list in &lists {
                prop_assert_eq!(list.len(), model.len());
            }
        }
        // Removing everything leaves only the root.
        for (p, v) in &model {
            for list in &mut lists {
                prop_assert!(list.remove(p, v));
            }
        }
        for list in &lists {
            prop_assert!(list.is_empty());
            prop_assert_eq!(list.node_count(), 1);
        }
    }

    /// A publisher consulting `lookup_names` always finds the name a
    /// matching subscriber registered under.
    #[test]
    fn rendezvous_finds_every_matching_subscriber(p in pattern(), t in topic()) {
        if p.matches(&t) {
            let names = lookup_names("realm", &t);
            prop_assert!(names.contains(&interest_name("realm", &p)));
        }
    }

    /// Summaries of small-alphabet patterns: covers, fits, exact when
    /// possible.
    #[test]
    fn summaries_cover_fit_and_are_exact_when_possible(
        input in prop::collection::vec(pattern(), 0..24),
        max_bytes in 0usize..48,
        topics in prop::collection::vec(topic(), 0..24),
    ) {
        check_summary(&input, max_bytes, &topics)?;
    }

    /// The same for deep patterns, cut at every depth.
    #[test]
    fn summaries_of_deep_patterns_cover_and_fit(
        input in prop::collection::vec(deep_pattern(), 0..32),
        max_bytes in 0usize..160,
        topics in prop::collection::vec(topic(), 0..16),
    ) {
        check_summary(&input, max_bytes, &topics)?;
    }

    /// Patterns under one rendezvous name (one first segment) summarize
    /// into a limit of one pattern plus `.**` without reaching `**`.
    #[test]
    fn one_name_never_summarizes_to_everything(
        input in prop::collection::vec(deep_pattern(), 1..32),
        max_bytes in 0usize..64,
    ) {
        let input: Vec<Pattern> = input
            .iter()
            .filter_map(|p| Pattern::new(&format!("first.{p}")).ok())
            .collect();
        let got = summarize(&input, max_bytes.max("first.**".len()));
        prop_assert!(
            got.patterns.iter().all(|p| p.starts_with("first")),
            "{:?}", got.patterns
        );
    }

    #[test]
    fn parsing_arbitrary_strings_never_panics(s in any::<String>()) {
        check_parse(&s)?;
    }

    /// Strings near the grammar reach the interesting error paths.
    #[test]
    fn parsing_near_valid_strings_never_panics(s in "[ab.* \t\u{0}é]{0,24}") {
        check_parse(&s)?;
    }

    #[test]
    fn parsing_long_strings_never_panics(s in "[a.*]{200,400}") {
        check_parse(&s)?;
    }
}

/// Parsing is total, and what it accepts is consistent: a valid topic is a
/// literal pattern matching itself, a literal pattern is a valid topic.
fn check_parse(s: &str) -> Result<(), TestCaseError> {
    let topic = Topic::new(s);
    let pattern = Pattern::new(s);
    if let Ok(t) = &topic {
        prop_assert_eq!(t.as_str(), s);
        let p = pattern
            .clone()
            .map_err(|e| TestCaseError::fail(format!("topic but not pattern: {e}")))?;
        prop_assert!(p.is_literal());
        prop_assert!(p.matches(t));
    }
    if let Ok(p) = &pattern {
        prop_assert_eq!(p.as_str(), s);
        prop_assert_eq!(p.is_literal(), topic.is_ok());
    }
    if let (Err(a), Err(b)) = (&topic, &pattern) {
        // Both rejected: for the same reason unless it is about wildcards.
        if !s.contains('*') {
            prop_assert_eq!(a, b);
        }
    }
    Ok(())
}
