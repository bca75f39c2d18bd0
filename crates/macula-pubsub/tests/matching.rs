//! Topic validation and wildcard matching through small data-driven helpers:
//! every `check` runs the reference matcher and the sublist (cache on and
//! off, cold and warm), so the two can never disagree on a listed case.

use macula_pubsub::{Limits, Pattern, Sublist, Topic, TopicError};

/// `pattern` matches `topic` exactly when `expected`, by every matcher.
#[track_caller]
fn check(pattern: &str, topic: &str, expected: bool) {
    let p = Pattern::new(pattern).unwrap_or_else(|e| panic!("pattern {pattern:?}: {e}"));
    let t = Topic::new(topic).unwrap_or_else(|e| panic!("topic {topic:?}: {e}"));
    assert_eq!(p.matches(&t), expected, "naive: {pattern:?} vs {topic:?}");
    let want: Vec<u32> = if expected { vec![7] } else { vec![] };
    for cache in [false, true] {
        let mut list = Sublist::with_cache(cache);
        assert!(list.insert(&p, 7));
        assert_eq!(
            list.matches(&t),
            want,
            "sublist cold, cache {cache}: {pattern:?} vs {topic:?}"
        );
        assert_eq!(
            list.matches(&t),
            want,
            "sublist warm, cache {cache}: {pattern:?} vs {topic:?}"
        );
        assert_eq!(list.matches_uncached(&t), want);
    }
}

#[test]
fn wildcard_matrix_from_the_issue() {
    check("sensor.**", "sensor", true);
    check("sensor.**", "sensor.temp", true);
    check("sensor.**", "sensor.temp.room1", true);
    check("sensor.**", "sensors", false);
    check("sensor.**", "other.sensor", false);
    check("sensor.*.room1", "sensor.temp.room1", true);
    check("sensor.*.room1", "sensor.temp.room1.extra", false);
    check("sensor.*.room1", "sensor.room1", false);
    check("sensor.*.room1", "sensor.a.b.room1", false);
    check("sensor.*.room1", "sensor.temp.room2", false);
    check("**.alarm", "alarm", true);
    check("**.alarm", "a.b.alarm", true);
    check("**.alarm", "a.alarm.b", false);
    check("**.alarm", "alarms", false);
}

#[test]
fn literal_and_single_segment() {
    check("a", "a", true);
    check("a", "b", false);
    check("a", "a.b", false);
    check("a.b.c", "a.b.c", true);
    check("a.b.c", "a.b", false);
    check("a.b.c", "a.b.c.d", false);
    check("a.b", "b.a", false);
    check("*", "a", true);
    check("*", "a.b", false);
    check("**", "a", true);
    check("**", "a.b.c", true);
    check("温度.*", "温度.x", true);
}

#[test]
fn star_is_exactly_one_segment() {
    check("*.*", "a.b", true);
    check("*.*", "a", false);
    check("*.*", "a.b.c", false);
    check("a.*", "a", false);
    check("*.b", "a.b", true);
    check("*.b", "b", false);
}

#[test]
fn double_star_zero_or_more_anywhere() {
    // Zero segments, at the end, the start and in the middle.
    check("a.**", "a", true);
    check("**.a", "a", true);
    check("a.**.b", "a.b", true);
    check("a.**.b", "a.x.b", true);
    check("a.**.b", "a.x.y.b", true);
    check("a.**.b", "a.b.c", false);
    check("a.**.b", "a", false);
    check("a.**.b", "b", false);
    check("**.a.**", "a", true);
    check("**.a.**", "x.a.y", true);
    check("**.a.**", "x.y", false);
    // Backtracking: the first candidate for `a` is not the right one.
    check("**.a.b", "a.a.b", true);
    check("**.a.b", "a.a.a.b", true);
    check("**.a.b", "a.b.a", false);
    check("a.**.b.**", "a.b", true);
    check("a.**.b.**", "a.x.b.y.z", true);
    check("a.**.b.**", "a.x", false);
}

#[test]
fn adjacent_wildcards() {
    check("*.**", "a", true);
    check("*.**", "a.b.c", true);
    check("**.*", "a", true);
    check("**.*", "a.b", true);
    check("*.**.*", "a", false);
    check("*.**.*", "a.b", true);
    check("*.**.*", "a.b.c.d", true);
    check("**.**", "a", true);
    check("**.**", "a.b.c", true);
    check("a.**.**.b", "a.b", true);
    check("a.**.**.b", "a.x.y.z.b", true);
    check("a.**.**.b", "a.x.y.z", false);
    check("a.*.**", "a", false);
    check("a.*.**", "a.b", true);
    check("a.*.**", "a.b.c", true);
}

fn topic_err(s: &str) -> TopicError {
    match Topic::new(s) {
        Ok(t) => panic!("topic {s:?} accepted as {t}"),
        Err(e) => e,
    }
}

fn pattern_err(s: &str) -> TopicError {
    match Pattern::new(s) {
        Ok(p) => panic!("pattern {p} accepted"),
        Err(e) => e,
    }
}

/// `s` is rejected with `expected` both as a topic and as a pattern.
#[track_caller]
fn check_both_err(s: &str, expected: TopicError) {
    assert_eq!(topic_err(s), expected, "topic {s:?}");
    assert_eq!(pattern_err(s), expected, "pattern {s:?}");
}

#[test]
fn validation_errors_say_why_and_where() {
    use TopicError::*;
    check_both_err("", Empty);
    check_both_err(&"a".repeat(257), TooLong { len: 257, max: 256 });
    check_both_err(
        &["a"; 17].join("."),
        TooManySegments {
            n_segments: 17,
            max: 16,
        },
    );
    check_both_err("a..b", EmptySegment { index: 1 });
    check_both_err(".a", EmptySegment { index: 0 });
    check_both_err("a.", EmptySegment { index: 1 });
    check_both_err(".", EmptySegment { index: 0 });
    check_both_err("a b", ForbiddenChar { index: 0, ch: ' ' });
    check_both_err("a.b\n", ForbiddenChar { index: 1, ch: '\n' });
    check_both_err("a.\tb", ForbiddenChar { index: 1, ch: '\t' });
    check_both_err(
        "a.b.\u{7f}",
        ForbiddenChar {
            index: 2,
            ch: '\u{7f}',
        },
    );
    check_both_err(
        "a.\u{a0}",
        ForbiddenChar {
            index: 1,
            ch: '\u{a0}',
        },
    );
    check_both_err("a.\0", ForbiddenChar { index: 1, ch: '\0' });

    assert_eq!(topic_err("a.*"), WildcardInTopic { index: 1 });
    assert_eq!(topic_err("**"), WildcardInTopic { index: 0 });
    assert_eq!(topic_err("x.y.a*"), WildcardInTopic { index: 2 });

    assert_eq!(pattern_err("a*"), PartialWildcard { index: 0 });
    assert_eq!(pattern_err("a.**b"), PartialWildcard { index: 1 });
    assert_eq!(pattern_err("a.*b.c"), PartialWildcard { index: 1 });
    assert_eq!(pattern_err("***"), PartialWildcard { index: 0 });
    assert_eq!(
        pattern_err("**.a.**.**"),
        TooManyDoubleWildcards {
            index: 3,
            n: 3,
            max: 2
        }
    );
}

#[test]
fn whole_string_limits_come_before_segment_errors() {
    // Length bounds the work, so it is reported even when a segment is bad too.
    assert_eq!(
        topic_err(&format!("a..{}", "b".repeat(300))),
        TopicError::TooLong { len: 303, max: 256 }
    );
    assert_eq!(
        pattern_err("a..b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q"),
        TopicError::TooManySegments {
            n_segments: 18,
            max: 16
        }
    );
}

#[test]
fn limits_are_accepted_at_the_boundary() {
    assert!(Topic::new(&"a".repeat(256)).is_ok());
    assert!(Topic::new(&["a"; 16].join(".")).is_ok());
    assert!(Pattern::new("**.a.**").is_ok());
}

#[test]
fn errors_read_well() {
    assert_eq!(
        topic_err("sensor..temp").to_string(),
        "segment 1 is empty (leading, trailing or doubled dot)"
    );
    assert_eq!(
        topic_err("sensor.*").to_string(),
        "segment 1 contains '*'; a publish topic cannot contain wildcards"
    );
}

#[test]
fn limits_can_be_overridden() {
    let tight = Limits {
        max_segments: 2,
        max_topic_len: 8,
        max_double_wildcards: 0,
        ..Default::default()
    };
    assert_eq!(
        Topic::with_limits("a.b.c", &tight),
        Err(TopicError::TooManySegments {
            n_segments: 3,
            max: 2
        })
    );
    assert_eq!(
        Topic::with_limits("abcdefghi", &tight),
        Err(TopicError::TooLong { len: 9, max: 8 })
    );
    assert_eq!(
        Pattern::with_limits("a.**", &tight),
        Err(TopicError::TooManyDoubleWildcards {
            index: 1,
            n: 1,
            max: 0
        })
    );

    // Raised limits: a topic deeper than the matcher's on-stack array still
    // matches (it takes the allocating path).
    let loose = Limits {
        max_segments: 40,
        max_double_wildcards: 3,
        ..Default::default()
    };
    let deep: Vec<String> = (0..30).map(|i| format!("s{i}")).collect();
    let topic = Topic::with_limits(&deep.join("."), &loose).expect("valid under loose limits");
    assert!(Topic::new(topic.as_str()).is_err());
    for (pattern, expected) in [
        ("s0.**", true),
        ("**.s29", true),
        ("**.s10.**.s29", true),
        ("**.s10.**.s28.**", true),
        ("s0.*", false),
        (&deep.join(".") as &str, true),
    ] {
        let p = Pattern::with_limits(pattern, &loose).expect("valid pattern");
        assert_eq!(p.matches(&topic), expected, "{pattern}");
        let mut list = Sublist::new();
        list.insert(&p, 1u8);
        assert_eq!(
            list.matches(&topic),
            if expected { vec![1] } else { vec![] },
            "{pattern}"
        );
    }
}

#[test]
fn pattern_accessors() {
    let p = Pattern::new("sensor.*.room1").expect("valid");
    assert!(!p.is_literal());
    assert_eq!(p.first_literal(), Some("sensor"));
    assert_eq!(p.n_segments(), 3);
    assert_eq!(Pattern::new("*.a").expect("valid").first_literal(), None);
    assert_eq!(Pattern::new("**").expect("valid").first_literal(), None);
    let lit = Pattern::new("a.b").expect("valid");
    assert!(lit.is_literal());
    let t = Topic::new("a.b").expect("valid");
    assert_eq!(t.first_segment(), "a");
    assert_eq!(t.n_segments(), 2);
    assert_eq!(Pattern::from(t.clone()), lit);
    assert_eq!("a.b".parse::<Topic>(), Ok(t));
    assert_eq!(lit.to_string(), "a.b");
}

// ---- Sublist behaviour beyond single-pattern matching ----

fn pat(s: &str) -> Pattern {
    Pattern::new(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn top(s: &str) -> Topic {
    Topic::new(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[test]
fn a_value_with_overlapping_patterns_appears_once() {
    for cache in [false, true] {
        let mut list = Sublist::with_cache(cache);
        for p in ["a.b", "a.*", "**", "a.**", "**.b", "**.**"] {
            assert!(list.insert(&pat(p), 1u32));
        }
        list.insert(&pat("a.*"), 2);
        assert_eq!(list.len(), 7);
        let mut got = list.matches(&top("a.b"));
        got.sort_unstable();
        assert_eq!(got, vec![1, 2]);
        assert_eq!(list.matches(&top("c")), vec![1]);
    }
}

#[test]
fn set_semantics_for_insert_and_remove() {
    let mut list = Sublist::with_cache(false);
    assert!(list.is_empty());
    assert!(list.insert(&pat("a.*"), 1u32));
    assert!(!list.insert(&pat("a.*"), 1), "same pair twice");
    assert_eq!(list.len(), 1);
    assert!(!list.remove(&pat("a.*"), &2), "value not there");
    assert!(!list.remove(&pat("a.b"), &1), "pattern not there");
    assert!(!list.remove(&pat("a.**"), &1), "wildcard child not there");
    assert!(list.remove(&pat("a.*"), &1));
    assert!(!list.remove(&pat("a.*"), &1), "already removed");
    assert!(list.is_empty());
}

#[test]
fn removal_prunes_every_empty_node() {
    let mut list = Sublist::new();
    assert_eq!(list.node_count(), 1);
    let patterns: Vec<Pattern> = [
        "a.b.c",
        "a.b",
        "a.*.c",
        "a.**",
        "**.c",
        "*.*.*.*",
        "x.**.y.**",
        "a.b.c.d",
    ]
    .iter()
    .map(|p| pat(p))
    .collect();
    for round in 0..3 {
        for (i, p) in patterns.iter().enumerate() {
            for v in 0..3u32 {
                list.insert(p, v + i as u32 * 10 + round);
            }
        }
        assert!(list.node_count() > 10);
        // Remove in a different order from the inserts.
        for (i, p) in patterns.iter().enumerate().rev() {
            for v in (0..3u32).rev() {
                assert!(list.remove(p, &(v + i as u32 * 10 + round)));
            }
        }
        assert!(list.is_empty());
        assert_eq!(list.node_count(), 1, "round {round}");
    }
}

#[test]
fn partial_removal_keeps_shared_prefixes() {
    let mut list = Sublist::with_cache(false);
    list.insert(&pat("a.b.c"), 1u32);
    list.insert(&pat("a.b"), 2);
    assert_eq!(list.node_count(), 4);
    list.remove(&pat("a.b"), &2);
    assert_eq!(list.node_count(), 4, "a.b is still on the path to a.b.c");
    assert_eq!(list.matches(&top("a.b.c")), vec![1]);
    list.insert(&pat("a.b"), 2);
    list.remove(&pat("a.b.c"), &1);
    assert_eq!(list.node_count(), 3);
    assert_eq!(list.matches(&top("a.b")), vec![2]);
}

#[test]
fn every_change_invalidates_the_cache() {
    let mut list = Sublist::new();
    let t = top("sensor.temp");
    assert!(list.matches(&t).is_empty());
    list.insert(&pat("sensor.*"), 1u32);
    assert_eq!(list.matches(&t), vec![1]);
    assert_eq!(list.matches(&t), vec![1]);
    list.insert(&pat("**"), 2);
    assert_eq!(list.matches(&t), vec![1, 2]);
    list.remove(&pat("sensor.*"), &1);
    assert_eq!(list.matches(&t), vec![2]);
    let stats = list.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (1, 4));
}

#[test]
fn no_op_changes_keep_the_cache() {
    let mut list = Sublist::new();
    list.insert(&pat("a"), 1u32);
    let t = top("a");
    list.matches(&t);
    assert!(!list.insert(&pat("a"), 1));
    assert!(!list.remove(&pat("b"), &1));
    list.matches(&t);
    assert_eq!(list.stats().cache_hits, 1);
}

#[test]
fn cache_is_bounded_fifo() {
    let limits = Limits {
        cache_capacity: 2,
        ..Default::default()
    };
    let mut list = Sublist::with_limits(&limits);
    list.insert(&pat("**"), 1u32);
    for t in ["a", "b", "a", "c", "a"] {
        assert_eq!(list.matches(&top(t)), vec![1]);
        assert!(list.cache_len() <= 2);
    }
    // a (miss), b (miss), a (hit), c (miss: evicts a, the oldest), a (miss: evicts b).
    let stats = list.stats();
    assert_eq!(
        (stats.cache_hits, stats.cache_misses, stats.cache_evictions),
        (1, 4, 2)
    );

    let mut off = Sublist::with_cache(false);
    off.insert(&pat("**"), 1u32);
    off.matches(&top("a"));
    assert_eq!(off.cache_len(), 0);
    assert_eq!(off.stats(), Default::default());
}

#[test]
fn result_order_is_deterministic_and_documented() {
    let build = || {
        let mut list = Sublist::with_cache(false);
        list.insert(&pat("**"), 5u32);
        list.insert(&pat("a.*"), 4);
        list.insert(&pat("a.b"), 3);
        list.insert(&pat("a.b"), 2);
        list.insert(&pat("a.b"), 1);
        list
    };
    // Literal child first, then `*`, then `**`; one pattern's values in
    // insertion order.
    assert_eq!(build().matches(&top("a.b")), vec![3, 2, 1, 4, 5]);
    // A removal moves the last value of that pattern into the gap.
    let mut list = build();
    list.remove(&pat("a.b"), &3);
    assert_eq!(list.matches(&top("a.b")), vec![1, 2, 4, 5]);
}
