//! A linearizability checker for recorded key-value histories (Wing & Gong's
//! search with Lowe's memoization, as in Knossos and Porcupine), used by the
//! tests that run real groups under concurrent clients and failures.
//!
//! A history is a list of operations on single keys, each with the time it
//! was invoked and the time its answer came back. It is linearizable when
//! some total order of the operations (a) respects real time: an operation
//! that returned before another was invoked comes first, and (b) replays
//! on a sequential register to exactly the answers the clients saw.
//! Operations on different keys are independent (a register per key), so
//! each key is checked alone (P-compositionality).
//!
//! An operation whose outcome is unknown (a write that timed out after it
//! was sent) has no return time: it may take effect at any point after its
//! invocation, or never.
//!
//! The search is exponential in the worst case; it is meant for test
//! histories of a few hundred operations per key with modest concurrency,
//! and gives up (returning [`Verdict::Unknown`]) past `max_states`.

use std::collections::{BTreeMap, HashSet};

/// What an operation did, with what its caller saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set the key (acknowledged, or unknown outcome).
    Put(Vec<u8>),
    /// Delete the key.
    Delete,
    /// A linearizable read that returned this value (`None`: absent).
    Get(Option<Vec<u8>>),
    /// Compare-and-swap: `expect` (`None`: absent) -> `new`; whether it
    /// succeeded (ignored when the outcome is unknown).
    Cas {
        expect: Option<Vec<u8>>,
        new: Vec<u8>,
        succeeded: bool,
    },
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub op: Op,
    /// When it was invoked (any monotonic unit, e.g. ns since the start).
    pub invoked: u64,
    /// When its answer arrived; `None` when the outcome is unknown.
    pub returned: Option<u64>,
}

/// The checker's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No valid order exists for this key.
    Violation {
        key: Vec<u8>,
    },
    /// The search for this key passed `max_states` without an answer.
    Unknown {
        key: Vec<u8>,
    },
}

/// Checks every key's history; the first failure found, else
/// `Linearizable`.
pub fn check(history: &[Record], max_states: usize) -> Verdict {
    let mut by_key: BTreeMap<&[u8], Vec<&Record>> = BTreeMap::new();
    for r in history {
        by_key.entry(&r.key).or_default().push(r);
    }
    for (key, ops) in by_key {
        match check_key(&ops, max_states) {
            Some(true) => {}
            Some(false) => return Verdict::Violation { key: key.to_vec() },
            None => return Verdict::Unknown { key: key.to_vec() },
        }
    }
    Verdict::Linearizable
}

/// Applies `op` to `state`; the new state, or `None` when the answer the
/// caller saw is impossible from `state`.
fn step(state: &Option<Vec<u8>>, op: &Op, known: bool) -> Option<Option<Vec<u8>>> {
    match op {
        Op::Put(v) => Some(Some(v.clone())),
        Op::Delete => Some(None),
        Op::Get(seen) => (seen == state).then(|| state.clone()),
        Op::Cas {
            expect,
            new,
            succeeded,
        } => {
            let matches = expect == state;
            if !known {
                // Unknown outcome: it did whatever the state allowed.
                return Some(if matches {
                    Some(new.clone())
                } else {
                    state.clone()
                });
            }
            match (matches, succeeded) {
                (true, true) => Some(Some(new.clone())),
                (false, false) => Some(state.clone()),
                _ => None,
            }
        }
    }
}

/// `Some(true)`: linearizable; `Some(false)`: not; `None`: gave up.
fn check_key(ops: &[&Record], max_states: usize) -> Option<bool> {
    let n = ops.len();
    // Every state of the search: which ops are linearized, and the value.
    let mut seen: HashSet<(Vec<u64>, Option<Vec<u8>>)> = HashSet::new();
    let words = n.div_ceil(64);
    let mut stack: Vec<(Vec<u64>, Option<Vec<u8>>)> = vec![(vec![0; words], None)];
    let done = |set: &[u64], i: usize| set[i / 64] & (1 << (i % 64)) != 0;
    while let Some((set, state)) = stack.pop() {
        // Remaining ops; finished when all that remain have unknown
        // outcomes (they may never have happened).
        let remaining: Vec<usize> = (0..n).filter(|i| !done(&set, *i)).collect();
        if remaining.iter().all(|i| ops[*i].returned.is_none()) {
            return Some(true);
        }
        // An op may go next only if it was invoked before every remaining
        // op returned (otherwise that one must come first).
        let horizon = remaining
            .iter()
            .filter_map(|i| ops[*i].returned)
            .min()
            .unwrap_or(u64::MAX);
        for &i in &remaining {
            let r = ops[i];
            if r.invoked > horizon {
                continue;
            }
            if let Some(next) = step(&state, &r.op, r.returned.is_some()) {
                let mut s = set.clone();
                s[i / 64] |= 1 << (i % 64);
                let key = (s, next);
                if seen.insert(key.clone()) {
                    if seen.len() > max_states {
                        return None;
                    }
                    stack.push(key);
                }
            }
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(op: Op, invoked: u64, returned: Option<u64>) -> Record {
        Record {
            key: b"k".to_vec(),
            op,
            invoked,
            returned,
        }
    }

    fn put(v: &str) -> Op {
        Op::Put(v.as_bytes().to_vec())
    }

    fn get(v: Option<&str>) -> Op {
        Op::Get(v.map(|v| v.as_bytes().to_vec()))
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            rec(get(None), 0, Some(1)),
            rec(put("a"), 2, Some(3)),
            rec(get(Some("a")), 4, Some(5)),
            rec(Op::Delete, 6, Some(7)),
            rec(get(None), 8, Some(9)),
        ];
        assert_eq!(check(&h, 10_000), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_a_violation() {
        let h = vec![
            rec(put("a"), 0, Some(1)),
            rec(put("b"), 2, Some(3)),
            rec(get(Some("a")), 4, Some(5)),
        ];
        assert_eq!(check(&h, 10_000), Verdict::Violation { key: b"k".to_vec() });
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // The read overlaps both writes: either value (or none) is fine...
        for seen in [None, Some("a"), Some("b")] {
            let h = vec![
                rec(put("a"), 0, Some(10)),
                rec(put("b"), 1, Some(10)),
                rec(get(seen), 2, Some(10)),
            ];
            assert_eq!(check(&h, 10_000), Verdict::Linearizable, "{seen:?}");
        }
        // ...but two reads after both writes must agree.
        let h = vec![
            rec(put("a"), 0, Some(10)),
            rec(put("b"), 1, Some(10)),
            rec(get(Some("a")), 11, Some(12)),
            rec(get(Some("b")), 13, Some(14)),
        ];
        assert!(matches!(check(&h, 10_000), Verdict::Violation { .. }));
    }

    #[test]
    fn cas_outcomes_must_match_the_state() {
        let cas = |expect: Option<&str>, new: &str, succeeded| Op::Cas {
            expect: expect.map(|e| e.as_bytes().to_vec()),
            new: new.as_bytes().to_vec(),
            succeeded,
        };
        let ok = vec![
            rec(put("a"), 0, Some(1)),
            rec(cas(Some("a"), "b", true), 2, Some(3)),
            rec(cas(Some("a"), "c", false), 4, Some(5)),
            rec(get(Some("b")), 6, Some(7)),
        ];
        assert_eq!(check(&ok, 10_000), Verdict::Linearizable);
        // Two sequential CAS from the same expected value cannot both win.
        let bad = vec![
            rec(put("a"), 0, Some(1)),
            rec(cas(Some("a"), "b", true), 2, Some(3)),
            rec(cas(Some("a"), "c", true), 4, Some(5)),
        ];
        assert!(matches!(check(&bad, 10_000), Verdict::Violation { .. }));
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened() {
        for seen in [Some("a"), Some("b")] {
            let h = vec![
                rec(put("a"), 0, Some(1)),
                rec(put("b"), 2, None),
                rec(get(seen), 5, Some(6)),
            ];
            assert_eq!(check(&h, 10_000), Verdict::Linearizable, "{seen:?}");
        }
        // But once seen, it cannot be undone by nothing.
        let h = vec![
            rec(put("a"), 0, Some(1)),
            rec(put("b"), 2, None),
            rec(get(Some("b")), 5, Some(6)),
            rec(get(Some("a")), 7, Some(8)),
        ];
        assert!(matches!(check(&h, 10_000), Verdict::Violation { .. }));
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = vec![rec(put("a"), 0, Some(1)), rec(get(Some("a")), 2, Some(3))];
        h.push(Record {
            key: b"other".to_vec(),
            op: get(Some("x")),
            invoked: 0,
            returned: Some(1),
        });
        assert_eq!(
            check(&h, 10_000),
            Verdict::Violation {
                key: b"other".to_vec()
            }
        );
    }

    #[test]
    fn touching_intervals_are_concurrent() {
        // The read was invoked the instant the write returned: it may still
        // be ordered before it.
        let h = vec![rec(put("a"), 0, Some(5)), rec(get(None), 5, Some(6))];
        assert_eq!(check(&h, 10_000), Verdict::Linearizable);
    }

    #[test]
    fn a_budget_of_exactly_the_states_needed_is_enough() {
        // A sequential history visits one state per operation.
        let h = vec![
            rec(put("a"), 0, Some(1)),
            rec(get(Some("a")), 2, Some(3)),
            rec(Op::Delete, 4, Some(5)),
        ];
        assert_eq!(check(&h, 3), Verdict::Linearizable);
        assert!(matches!(check(&h, 2), Verdict::Unknown { .. }));
    }

    #[test]
    fn the_search_gives_up_past_its_budget() {
        // Many fully concurrent writes and no reads: a huge order space
        // before the first (impossible) read.
        let mut h: Vec<Record> = (0..20)
            .map(|i| rec(put(&i.to_string()), 0, Some(100)))
            .collect();
        h.push(rec(get(Some("nope")), 101, Some(102)));
        assert!(matches!(check(&h, 1_000), Verdict::Unknown { .. }));
    }
}
