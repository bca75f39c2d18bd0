//! [`RecentCalls`]: a provider's memory of the calls it received on
//! connections that may be replaced under a call (relayed, or direct by
//! hole punching), so that a caller re-sending a call over a new route
//! after its connection died gets the one execution's answer: the handler
//! runs once, a re-sent call still running is answered when it ends (on the
//! connection it last came in on), one already answered gets the kept
//! answer.
//!
//! A call is named by its caller (the node ID proved on the connection) and
//! its wire ID (unique per caller for the caller's lifetime; the runtime
//! starts them at a random value, so a restarted caller does not meet its
//! previous run's IDs). The procedure must match too.
//!
//! Bounded: at most `max_calls` entries (running and answered), answers of
//! at most `max_bytes` in all, each answer kept `keep` after it was sent.
//! Answered entries are given up oldest first to make room; when every
//! entry is still running a new call is refused ([`Full`]). An answer too
//! large to keep is replaced by an error saying so (a re-sent call gets
//! it: the handler is never run twice). Pure: time is an argument.

use std::collections::{HashMap, VecDeque};

use macula_wire::rpc::{CallError, RpcErrorKind};
use macula_wire::time::Millis;

use crate::core::Key;

/// Limits of a [`RecentCalls`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentLimits {
    /// Calls remembered at once, running and answered (1024: a busy
    /// provider's calls over replaceable connections for `keep`).
    pub max_calls: usize,
    /// Bytes of kept answers in all (16 MiB).
    pub max_bytes: usize,
    /// How long an answer is kept after it was sent: longer than a caller
    /// takes to notice a dead path (its probe, at most 1.25 s, or the
    /// failure detector's bound, at most 10 s) and reach the provider again
    /// (1 s). 15 s.
    pub keep: Millis,
}

impl Default for RecentLimits {
    fn default() -> Self {
        RecentLimits {
            max_calls: 1024,
            max_bytes: 16 << 20,
            keep: Millis::from_secs(15),
        }
    }
}

/// What to do with an incoming CALL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Not a call this table knows: serve it (it is remembered if asked).
    New,
    /// The same call is running: its answer will go to the route given
    /// now. Do nothing else.
    Running,
    /// The same call was answered: send this answer again.
    Answered(Result<Vec<u8>, CallError>),
}

/// The table is full of running calls: the new one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the recent-calls table is full ({max} calls running on replaceable connections)")]
pub struct Full {
    pub max: usize,
}

#[derive(Debug, Clone)]
enum Entry<R> {
    Running {
        procedure: String,
        route: R,
        /// Forgotten after this even if never completed (a driver that
        /// lost the task): the call's deadline plus `keep`.
        until: Millis,
    },
    Answered {
        procedure: String,
        answer: Result<Vec<u8>, CallError>,
        size: usize,
        /// Its place in `order`.
        seq: u64,
    },
}

/// Calls received on replaceable connections, by (caller, wire ID); `R` is
/// where a running call's answer goes (the connection it last came in on).
#[derive(Debug, Clone)]
pub struct RecentCalls<K, R> {
    limits: RecentLimits,
    entries: HashMap<(K, u64), Entry<R>>,
    /// Answered entries in the order they were answered (so of expiry):
    /// key, seq, expiry.
    order: VecDeque<((K, u64), u64, Millis)>,
    bytes: usize,
    next_seq: u64,
}

impl<K: Key, R: Clone> RecentCalls<K, R> {
    pub fn new(limits: RecentLimits) -> Self {
        RecentCalls {
            limits,
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            next_seq: 0,
        }
    }

    pub fn limits(&self) -> RecentLimits {
        self.limits
    }

    /// Calls remembered now (running and answered).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of answers kept now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A CALL for `procedure` named `key` (its caller, its wire ID),
    /// arriving on `route` with `timeout` left. A known call is
    /// [`Seen::Running`] (its answer will go to `route` from now on) or
    /// [`Seen::Answered`]. A new one is remembered as running when
    /// `remember` (it came on a replaceable connection); `Err(Full)` when
    /// there is no room: refuse it.
    pub fn admit(
        &mut self,
        now: Millis,
        key: (K, u64),
        procedure: &str,
        route: R,
        timeout: Millis,
        remember: bool,
    ) -> Result<Seen, Full> {
        self.expire(now);
        match self.entries.get_mut(&key) {
            Some(Entry::Running {
                procedure: p,
                route: r,
                ..
            }) if p == procedure => {
                *r = route;
                return Ok(Seen::Running);
            }
            Some(Entry::Answered {
                procedure: p,
                answer,
                ..
            }) if p == procedure => return Ok(Seen::Answered(answer.clone())),
            _ => {}
        }
        if !remember {
            return Ok(Seen::New);
        }
        self.remove(&key);
        if self.entries.len() >= self.limits.max_calls {
            self.make_room(now);
        }
        if self.entries.len() >= self.limits.max_calls {
            return Err(Full {
                max: self.limits.max_calls,
            });
        }
        self.entries.insert(
            key,
            Entry::Running {
                procedure: procedure.to_string(),
                route,
                until: now.saturating_add(timeout).saturating_add(self.limits.keep),
            },
        );
        Ok(Seen::New)
    }

    /// Call `id` of `caller` ended with `answer`: kept for re-sent copies;
    /// returns where to send it (the route it last came in on), `None` if
    /// the table does not know the call (forgotten: send it where it came).
    pub fn complete(
        &mut self,
        now: Millis,
        caller: &K,
        id: u64,
        answer: Result<Vec<u8>, CallError>,
    ) -> Option<R> {
        self.expire(now);
        let key = (caller.clone(), id);
        let (procedure, route) = match self.entries.remove(&key) {
            Some(Entry::Running {
                procedure, route, ..
            }) => (procedure, route),
            Some(other) => {
                self.entries.insert(key, other);
                return None;
            }
            None => return None,
        };
        let mut size = match &answer {
            Ok(p) => p.len(),
            Err(e) => e.message.len(),
        };
        let mut answer = answer;
        if size > self.limits.max_bytes {
            answer = Err(CallError {
                id,
                kind: RpcErrorKind::Invalid,
                code: 0,
                message: format!(
                    "the answer ({size} bytes) to this re-sent call was not kept (limit {} bytes); the handler ran once",
                    self.limits.max_bytes
                ),
            });
            size = 0;
        }
        while self.bytes + size > self.limits.max_bytes && self.drop_oldest() {}
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += size;
        self.order
            .push_back((key.clone(), seq, now.saturating_add(self.limits.keep)));
        self.entries.insert(
            key,
            Entry::Answered {
                procedure,
                answer,
                size,
                seq,
            },
        );
        Some(route)
    }

    /// Forgets call `id` of `caller` (refused after all, or cancelled).
    pub fn forget(&mut self, caller: &K, id: u64) {
        self.remove(&(caller.clone(), id));
    }

    fn remove(&mut self, key: &(K, u64)) {
        if let Some(Entry::Answered { size, .. }) = self.entries.remove(key) {
            self.bytes -= size;
        }
    }

    /// Drops answers kept past their time.
    fn expire(&mut self, now: Millis) {
        while let Some((_, _, until)) = self.order.front() {
            if *until > now {
                break;
            }
            self.drop_oldest();
        }
    }

    /// Drops the oldest answered entry; false if there is none.
    fn drop_oldest(&mut self) -> bool {
        while let Some((key, seq, _)) = self.order.pop_front() {
            if matches!(self.entries.get(&key), Some(Entry::Answered { seq: s, .. }) if *s == seq) {
                self.remove(&key);
                return true;
            }
        }
        false
    }

    /// Room for one more entry: the oldest answer goes, else running
    /// entries past their time (never completed).
    fn make_room(&mut self, now: Millis) {
        if self.drop_oldest() {
            return;
        }
        self.entries
            .retain(|_, e| !matches!(e, Entry::Running { until, .. } if *until <= now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(max_calls: usize, max_bytes: usize) -> RecentCalls<u32, &'static str> {
        RecentCalls::new(RecentLimits {
            max_calls,
            max_bytes,
            keep: Millis(1000),
        })
    }

    const T: Millis = Millis(5000);

    #[test]
    fn a_resent_call_is_attached_while_running_and_replayed_once_answered() {
        let mut t = table(8, 1024);
        assert_eq!(
            t.admit(Millis(0), (1, 7), "p", "direct", T, true),
            Ok(Seen::New)
        );
        // Re-sent over the relay while the handler runs: not run again,
        // and the answer goes to the new route.
        assert_eq!(
            t.admit(Millis(10), (1, 7), "p", "relay", T, false),
            Ok(Seen::Running)
        );
        assert_eq!(
            t.complete(Millis(20), &1, 7, Ok(b"hi".to_vec())),
            Some("relay")
        );
        // Re-sent again after the answer: the same answer, not run.
        assert_eq!(
            t.admit(Millis(30), (1, 7), "p", "relay2", T, true),
            Ok(Seen::Answered(Ok(b"hi".to_vec())))
        );
        assert_eq!(t.bytes(), 2);
        // Kept `keep` after the answer, then forgotten.
        assert_eq!(
            t.admit(Millis(1020), (1, 7), "p", "x", T, false),
            Ok(Seen::New)
        );
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn another_caller_or_procedure_is_another_call() {
        let mut t = table(8, 1024);
        t.admit(Millis(0), (1, 7), "p", "a", T, true).unwrap();
        assert_eq!(
            t.admit(Millis(0), (2, 7), "p", "b", T, false),
            Ok(Seen::New)
        );
        assert_eq!(
            t.admit(Millis(0), (1, 7), "q", "b", T, false),
            Ok(Seen::New)
        );
        // Not remembered: not known later.
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_full_table_gives_up_old_answers_then_refuses() {
        let mut t = table(2, 1024);
        t.admit(Millis(0), (1, 1), "p", "a", T, true).unwrap();
        t.admit(Millis(0), (1, 2), "p", "a", T, true).unwrap();
        // Both running: no room.
        assert_eq!(
            t.admit(Millis(0), (1, 3), "p", "a", T, true),
            Err(Full { max: 2 })
        );
        // One answered: its entry makes room.
        t.complete(Millis(1), &1, 1, Ok(vec![0; 10]));
        assert_eq!(t.admit(Millis(2), (1, 3), "p", "a", T, true), Ok(Seen::New));
        assert_eq!(t.len(), 2);
        assert_eq!(t.bytes(), 0);
        // A running entry never completed is dropped after its deadline
        // plus `keep`.
        assert_eq!(
            t.admit(Millis(6001), (1, 4), "p", "a", T, true),
            Ok(Seen::New)
        );
    }

    #[test]
    fn answers_stay_within_the_byte_limit_and_a_huge_one_becomes_an_error() {
        let mut t = table(8, 100);
        for id in 0..3 {
            t.admit(Millis(0), (1, id), "p", "a", T, true).unwrap();
        }
        t.complete(Millis(1), &1, 0, Ok(vec![0; 60]));
        t.complete(Millis(2), &1, 1, Ok(vec![0; 60]));
        // The older answer went to make room.
        assert_eq!(t.bytes(), 60);
        assert_eq!(
            t.admit(Millis(3), (1, 0), "p", "a", T, false),
            Ok(Seen::New)
        );
        t.complete(Millis(4), &1, 2, Ok(vec![0; 500]));
        match t.admit(Millis(5), (1, 2), "p", "a", T, false) {
            Ok(Seen::Answered(Err(e))) => {
                assert_eq!(e.kind, RpcErrorKind::Invalid);
                assert!(e.message.contains("not kept"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        /// Whatever happens, the table stays within its limits, its byte
        /// count is the sum of what it keeps, and a call admitted as new
        /// and still remembered is never admitted as new again.
        #[test]
        fn bounded_and_exactly_once(ops in proptest::collection::vec((0u8..4, 0u64..6, 0u64..400), 1..200)) {
            let mut t: RecentCalls<u32, u8> = RecentCalls::new(RecentLimits {
                max_calls: 4,
                max_bytes: 300,
                keep: Millis(50),
            });
            let mut now = Millis(0);
            for (op, id, x) in ops {
                now = now.saturating_add(Millis(x % 20));
                match op {
                    0 | 1 => {
                        t.expire(now);
                        let before = t.entries.contains_key(&(1, id));
                        let r = t.admit(now, (1, id), "p", 0, Millis(100), true);
                        if before && t.entries.contains_key(&(1, id)) {
                            prop_assert_ne!(r, Ok(Seen::New));
                        }
                    }
                    2 => {
                        t.complete(now, &1, id, Ok(vec![0; x as usize]));
                    }
                    _ => t.forget(&1, id),
                }
                prop_assert!(t.len() <= 4);
                prop_assert!(t.bytes() <= 300);
                let sum: usize = t.entries.values().map(|e| match e {
                    Entry::Answered { size, .. } => *size,
                    _ => 0,
                }).sum();
                prop_assert_eq!(sum, t.bytes());
            }
        }
    }
}
