//! What the simulator checks, and how a failure is reported.
//!
//! Safety checks run on every step (after each event, on the node it
//! touched): they must hold at every instant, faults or not. Liveness checks
//! run after the faults heal (see [`crate::mesh`]). The first violation stops
//! the run and comes back as a [`Failure`] naming the seed and the command
//! that replays it.
//!
//! The pub/sub and RPC checkers ([`DeliveryChecker`], [`CallChecker`]) are
//! independent oracles: they never reuse the code under test for the verdict
//! (matching is checked with the reference matcher `Pattern::matches`, not
//! the `Sublist` trie the cores use). The adapters of those cores report each
//! publish, subscription, delivery, call, handler run and answer to them.

use std::collections::HashMap;
use std::fmt;

use macula_pubsub::{Pattern, Sublist, Topic};
use macula_wire::time::Millis;
use macula_wire::NodeId;

/// Publishes a [`DeliveryChecker`] remembers; past this it stops checking
/// that a delivery was published (order, duplicates and matching still are).
pub const MAX_TRACKED_PUBLISHES: usize = 1 << 20;
/// Calls a [`CallChecker`] remembers; past this new calls are not checked.
pub const MAX_TRACKED_CALLS: usize = 1 << 20;
/// Providers one call may be sent to (first try plus retries); the RPC core
/// retries far fewer times.
pub const MAX_ATTEMPTS_PER_CALL: usize = 64;

/// A broken safety property. Node numbers are indices in the simulation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A routing table lists the node itself.
    #[error("node {node}: its routing table holds its own ID")]
    RoutingHoldsSelf {
        /// The node.
        node: usize,
    },
    /// A record whose signature does not verify (Ed25519 over the signed
    /// bytes, key deriving the publisher's ID), held or handed out.
    #[error("node {node}: {place} a record under {key} from {publisher} whose signature does not verify")]
    RecordDoesNotVerify {
        /// The node holding or returning it.
        node: usize,
        /// "stores" or "was handed".
        place: &'static str,
        /// Record key.
        key: NodeId,
        /// Claimed publisher.
        publisher: NodeId,
    },
    /// A lookup for one key returned a record under another.
    #[error("node {node}: a lookup for {asked} returned a record under {got}")]
    RecordUnderWrongKey {
        /// The node that looked up.
        node: usize,
        /// The key asked for.
        asked: NodeId,
        /// The record's key.
        got: NodeId,
    },
    /// A pool holds a connection to its own node.
    #[error("node {node}: its pool holds a connection to itself")]
    PoolHoldsSelf {
        /// The node.
        node: usize,
    },
    /// A pool holds more connections than its maximum.
    #[error("node {node}: its pool holds {n} connections, the maximum is {max}")]
    PoolOverMax {
        /// The node.
        node: usize,
        /// Held.
        n: usize,
        /// Maximum.
        max: usize,
    },
    /// Two nodes each hold a connection to the other, but not the same one,
    /// with no handshake or close between them in flight.
    #[error("nodes {a} and {b} disagree on their connection ({conn_a} vs {conn_b}) with nothing in flight")]
    PoolsDisagree {
        /// One node.
        a: usize,
        /// The other.
        b: usize,
        /// The connection `a` holds.
        conn_a: usize,
        /// The connection `b` holds.
        conn_b: usize,
    },
    /// A subscription got an event its pattern does not match.
    #[error("node {node} subscription {sub} ({pattern}) got an event on {topic}")]
    NotMatching {
        /// Subscriber node.
        node: usize,
        /// Subscription.
        sub: u64,
        /// Its pattern.
        pattern: String,
        /// The event's topic.
        topic: String,
    },
    /// A subscription got an event for a subscription it does not have.
    #[error("node {node}: delivery to unknown subscription {sub}")]
    UnknownSubscription {
        /// Subscriber node.
        node: usize,
        /// Subscription.
        sub: u64,
    },
    /// The same event twice on one subscription.
    #[error(
        "node {node} subscription {sub}: event ({epoch}, {seq}) of {publisher} delivered twice"
    )]
    DuplicateDelivery {
        /// Subscriber node.
        node: usize,
        /// Subscription.
        sub: u64,
        /// Publisher.
        publisher: NodeId,
        /// Publisher epoch.
        epoch: u64,
        /// Sequence number.
        seq: u64,
    },
    /// A publisher's events out of order on one subscription.
    #[error(
        "node {node} subscription {sub}: event {got:?} of {publisher} delivered after {after:?}"
    )]
    OutOfOrder {
        /// Subscriber node.
        node: usize,
        /// Subscription.
        sub: u64,
        /// Publisher.
        publisher: NodeId,
        /// (epoch, seq) delivered now.
        got: (u64, u64),
        /// (epoch, seq) delivered before it.
        after: (u64, u64),
    },
    /// A delivery of something nobody published (or on another topic).
    #[error("node {node}: delivered ({epoch}, {seq}) of {publisher} on {topic}, which was not published")]
    NeverPublished {
        /// Subscriber node.
        node: usize,
        /// Publisher.
        publisher: NodeId,
        /// Publisher epoch.
        epoch: u64,
        /// Sequence number.
        seq: u64,
        /// The delivered topic.
        topic: String,
    },
    /// An answer that is not for the call it was given to: another call ID,
    /// or from a node the call was never sent to.
    #[error("node {caller} call {call}: answered by {from} for call {answered}")]
    WrongCall {
        /// Calling node.
        caller: usize,
        /// The call the answer was handed to.
        call: u64,
        /// Who answered.
        from: NodeId,
        /// The call ID the answer carried.
        answered: u64,
    },
    /// A handler ran for a call that was never sent to its node.
    #[error(
        "node {caller} call {call}: handler ran on {provider}, which the call was not sent to"
    )]
    RanUnsent {
        /// Calling node.
        caller: usize,
        /// The call.
        call: u64,
        /// Where the handler ran.
        provider: NodeId,
    },
    /// One call ended twice for the application.
    #[error("node {caller} call {call}: answered twice")]
    AnsweredTwice {
        /// Calling node.
        caller: usize,
        /// The call.
        call: u64,
    },
    /// A handler ran more than once for one call (RPC is at-most-once: only
    /// errors that prove the handler did not run are retried).
    #[error("node {caller} call {call}: handler ran again on {provider}")]
    HandlerRanTwice {
        /// Calling node.
        caller: usize,
        /// The call.
        call: u64,
        /// Where it ran the second time.
        provider: NodeId,
    },
    /// The event queue outgrew its bound: something floods the network.
    #[error("the event queue holds more than {max} events")]
    EventQueueFull {
        /// The bound (`engine::MAX_QUEUED_EVENTS`).
        max: usize,
    },
    /// Too many events at one instant of simulated time: a livelock (a
    /// timer re-armed for now, forever, or a message storm at zero latency).
    #[error("more than {max} events at one instant")]
    Livelock {
        /// The bound (`engine::MAX_EVENTS_PER_INSTANT`).
        max: u64,
    },
    /// A liveness property did not hold after the faults healed.
    #[error("liveness: {0}")]
    Liveness(String),
}

/// A failed run: what broke, when, and how to replay it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The seed that replays the run.
    pub seed: u64,
    /// Simulated time of the violation.
    pub at: Millis,
    /// What broke (boxed: failures travel in `Result`s and must stay small).
    pub violation: Box<Violation>,
    /// The command that replays the run bit for bit.
    pub replay: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "macula-sim: {} at {:.3} s simulated (seed {})\nreplay: {}",
            self.violation,
            self.at.0 as f64 / 1000.0,
            self.seed,
            self.replay
        )
    }
}

impl std::error::Error for Failure {}

/// The pub/sub oracle: per-publisher order and no duplicates on every
/// subscription, nothing delivered that its pattern does not match or that
/// was never published; and, for liveness, who should get a topic.
#[derive(Debug, Default)]
pub struct DeliveryChecker {
    published: HashMap<(NodeId, u64, u64), String>,
    subs: HashMap<(usize, u64), Pattern>,
    last: HashMap<(usize, u64, NodeId), (u64, u64)>,
    // The trie only answers "who should get this" for liveness; verdicts use
    // `Pattern::matches`.
    interest: Sublist<(usize, u64)>,
    n_checked: u64,
    n_untracked: u64,
}

impl DeliveryChecker {
    /// An empty oracle.
    pub fn new() -> DeliveryChecker {
        DeliveryChecker::default()
    }

    /// `publisher` published `topic` as `(epoch, seq)`.
    pub fn published(&mut self, publisher: NodeId, epoch: u64, seq: u64, topic: &Topic) {
        if self.published.len() >= MAX_TRACKED_PUBLISHES {
            self.n_untracked += 1;
            return;
        }
        self.published
            .insert((publisher, epoch, seq), topic.as_str().to_owned());
    }

    /// Node `node` subscribed `pattern` as subscription `sub`.
    pub fn subscribed(&mut self, node: usize, sub: u64, pattern: Pattern) {
        self.interest.insert(&pattern, (node, sub));
        if let Some(old) = self.subs.insert((node, sub), pattern) {
            self.interest.remove(&old, &(node, sub));
        }
    }

    /// Subscription `sub` of `node` ended (unsubscribed, or the node
    /// crashed).
    pub fn unsubscribed(&mut self, node: usize, sub: u64) {
        if let Some(p) = self.subs.remove(&(node, sub)) {
            self.interest.remove(&p, &(node, sub));
        }
        self.last.retain(|(n, s, _), _| !(*n == node && *s == sub));
    }

    /// Every subscription of `node` ended (it crashed).
    pub fn node_down(&mut self, node: usize) {
        let subs: Vec<u64> = self
            .subs
            .keys()
            .filter(|(n, _)| *n == node)
            .map(|(_, s)| *s)
            .collect();
        for s in subs {
            self.unsubscribed(node, s);
        }
    }

    /// Checks one delivery to the application.
    pub fn delivered(
        &mut self,
        node: usize,
        sub: u64,
        publisher: NodeId,
        epoch: u64,
        seq: u64,
        topic: &Topic,
    ) -> Result<(), Violation> {
        self.n_checked += 1;
        let Some(pattern) = self.subs.get(&(node, sub)) else {
            return Err(Violation::UnknownSubscription { node, sub });
        };
        if !pattern.matches(topic) {
            return Err(Violation::NotMatching {
                node,
                sub,
                pattern: pattern.as_str().to_owned(),
                topic: topic.as_str().to_owned(),
            });
        }
        match self.published.get(&(publisher, epoch, seq)) {
            Some(t) if t == topic.as_str() => {}
            None if self.n_untracked > 0 => {}
            _ => {
                return Err(Violation::NeverPublished {
                    node,
                    publisher,
                    epoch,
                    seq,
                    topic: topic.as_str().to_owned(),
                })
            }
        }
        let got = (epoch, seq);
        match self.last.insert((node, sub, publisher), got) {
            Some(after) if after == got => Err(Violation::DuplicateDelivery {
                node,
                sub,
                publisher,
                epoch,
                seq,
            }),
            Some(after) if after > got => Err(Violation::OutOfOrder {
                node,
                sub,
                publisher,
                got,
                after,
            }),
            _ => Ok(()),
        }
    }

    /// The subscriptions (node, sub) whose pattern matches `topic`: who a
    /// publish must reach once the mesh is healed.
    pub fn expected(&mut self, topic: &Topic) -> Vec<(usize, u64)> {
        let mut v = self.interest.matches(topic);
        v.sort_unstable();
        v
    }

    /// Deliveries checked.
    pub fn n_checked(&self) -> u64 {
        self.n_checked
    }
}

#[derive(Debug)]
struct CallState {
    sent_to: Vec<NodeId>,
    ran_on: Vec<NodeId>,
    /// Made with no retries: its handler runs at most once (with retries,
    /// a failover after an unreachable provider may run it again elsewhere:
    /// docs/PROTOCOL.md section 5.4, "Liveness").
    at_most_once: bool,
    /// Answered or failed (the application has its outcome).
    done: bool,
}

/// The RPC oracle: an answer belongs to the call it is handed to and comes
/// from a provider the call was sent to; each call ends at most once; a
/// handler runs only for a call sent to its node, never twice on one node
/// for one call (the core never sends a call to a provider twice, and the
/// transport delivers a CALL at most once), and only once in all for a
/// call made without retries.
#[derive(Debug, Default)]
pub struct CallChecker {
    calls: HashMap<(usize, u64), CallState>,
    n_checked: u64,
}

impl CallChecker {
    /// An empty oracle.
    pub fn new() -> CallChecker {
        CallChecker::default()
    }

    /// Node `caller` starts call `call` with `retries` retries.
    pub fn started(&mut self, caller: usize, call: u64, retries: u32) {
        if self.calls.len() >= MAX_TRACKED_CALLS {
            return;
        }
        self.calls.insert(
            (caller, call),
            CallState {
                sent_to: Vec::new(),
                ran_on: Vec::new(),
                at_most_once: retries == 0,
                done: false,
            },
        );
    }

    /// Node `caller` sent call `call` to `provider` (first try or retry).
    pub fn sent(&mut self, caller: usize, call: u64, provider: NodeId) {
        if let Some(state) = self.calls.get_mut(&(caller, call)) {
            if state.sent_to.len() < MAX_ATTEMPTS_PER_CALL && !state.sent_to.contains(&provider) {
                state.sent_to.push(provider);
            }
        }
    }

    /// `provider` ran the handler for `caller`'s call `call`.
    pub fn ran(&mut self, provider: NodeId, caller: usize, call: u64) -> Result<(), Violation> {
        self.n_checked += 1;
        let Some(state) = self.calls.get_mut(&(caller, call)) else {
            return Ok(());
        };
        if !state.sent_to.contains(&provider) && state.sent_to.len() < MAX_ATTEMPTS_PER_CALL {
            return Err(Violation::RanUnsent {
                caller,
                call,
                provider,
            });
        }
        if state.ran_on.contains(&provider) || (state.at_most_once && !state.ran_on.is_empty()) {
            return Err(Violation::HandlerRanTwice {
                caller,
                call,
                provider,
            });
        }
        state.ran_on.push(provider);
        Ok(())
    }

    /// The application of `caller` got an answer to `call`, from `from`,
    /// carrying call ID `answered`.
    pub fn answered(
        &mut self,
        caller: usize,
        call: u64,
        from: NodeId,
        answered: u64,
    ) -> Result<(), Violation> {
        self.n_checked += 1;
        let wrong = Violation::WrongCall {
            caller,
            call,
            from,
            answered,
        };
        let Some(state) = self.calls.get_mut(&(caller, call)) else {
            return Err(wrong);
        };
        if answered != call || !state.sent_to.contains(&from) {
            return Err(wrong);
        }
        if state.done {
            return Err(Violation::AnsweredTwice { caller, call });
        }
        state.done = true;
        Ok(())
    }

    /// The application of `caller` learned that `call` failed.
    pub fn failed(&mut self, caller: usize, call: u64) -> Result<(), Violation> {
        self.n_checked += 1;
        match self.calls.get_mut(&(caller, call)) {
            Some(state) if state.done => Err(Violation::AnsweredTwice { caller, call }),
            Some(state) => {
                state.done = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Checks made.
    pub fn n_checked(&self) -> u64 {
        self.n_checked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }
    fn t(s: &str) -> Topic {
        Topic::new(s).expect("topic")
    }

    #[test]
    fn deliveries_in_order_pass_and_every_broken_property_is_caught() {
        let mut c = DeliveryChecker::new();
        c.subscribed(1, 7, Pattern::new("orders.*").expect("pattern"));
        for seq in 1..=3 {
            c.published(id(9), 1, seq, &t("orders.new"));
        }
        c.published(id(9), 1, 4, &t("audit.x"));
        c.published(id(9), 2, 1, &t("orders.new"));
        assert_eq!(c.delivered(1, 7, id(9), 1, 1, &t("orders.new")), Ok(()));
        // A gap is fine (loss, a slow consumer); going back is not.
        assert_eq!(c.delivered(1, 7, id(9), 1, 3, &t("orders.new")), Ok(()));
        assert!(matches!(
            c.delivered(1, 7, id(9), 1, 3, &t("orders.new")),
            Err(Violation::DuplicateDelivery { seq: 3, .. })
        ));
        assert!(matches!(
            c.delivered(1, 7, id(9), 1, 2, &t("orders.new")),
            Err(Violation::OutOfOrder { .. })
        ));
        assert!(matches!(
            c.delivered(1, 7, id(9), 1, 4, &t("audit.x")),
            Err(Violation::NotMatching { .. })
        ));
        assert!(matches!(
            c.delivered(1, 7, id(9), 1, 9, &t("orders.new")),
            Err(Violation::NeverPublished { .. })
        ));
        // Wrong topic for a published (epoch, seq).
        assert!(matches!(
            c.delivered(1, 7, id(9), 1, 1, &t("orders.old")),
            Err(Violation::NeverPublished { .. })
        ));
        assert!(matches!(
            c.delivered(1, 8, id(9), 1, 1, &t("orders.new")),
            Err(Violation::UnknownSubscription { .. })
        ));
        // A new epoch (the publisher restarted) starts again at seq 1.
        assert_eq!(c.delivered(1, 7, id(9), 2, 1, &t("orders.new")), Ok(()));
        assert_eq!(c.expected(&t("orders.new")), vec![(1, 7)]);
        assert!(c.expected(&t("audit.x")).is_empty());
        c.node_down(1);
        assert!(c.expected(&t("orders.new")).is_empty());
    }

    #[test]
    fn answers_must_belong_to_their_call() {
        let mut c = CallChecker::new();
        c.started(1, 10, 0);
        c.started(1, 11, 2);
        c.sent(1, 10, id(5));
        c.sent(1, 11, id(6));
        assert!(matches!(
            c.answered(1, 10, id(6), 10),
            Err(Violation::WrongCall { .. })
        ));
        assert!(matches!(
            c.answered(1, 10, id(5), 11),
            Err(Violation::WrongCall { .. })
        ));
        assert!(matches!(
            c.answered(2, 10, id(5), 10),
            Err(Violation::WrongCall { .. })
        ));
        // A handler runs only where the call was sent.
        assert!(matches!(
            c.ran(id(6), 1, 10),
            Err(Violation::RanUnsent { .. })
        ));
        assert_eq!(c.ran(id(5), 1, 10), Ok(()));
        // No retries: at most once, anywhere.
        c.sent(1, 10, id(6));
        assert!(matches!(
            c.ran(id(6), 1, 10),
            Err(Violation::HandlerRanTwice { .. })
        ));
        assert_eq!(c.answered(1, 10, id(5), 10), Ok(()));
        assert_eq!(
            c.answered(1, 10, id(5), 10),
            Err(Violation::AnsweredTwice {
                caller: 1,
                call: 10
            })
        );
        assert!(matches!(
            c.failed(1, 10),
            Err(Violation::AnsweredTwice { .. })
        ));
        // With retries a failover may run it again elsewhere, never twice
        // on one provider.
        assert_eq!(c.ran(id(6), 1, 11), Ok(()));
        c.sent(1, 11, id(7));
        assert_eq!(c.ran(id(7), 1, 11), Ok(()));
        assert!(matches!(
            c.ran(id(7), 1, 11),
            Err(Violation::HandlerRanTwice { .. })
        ));
        assert_eq!(c.answered(1, 11, id(7), 11), Ok(()));
    }

    #[test]
    fn a_failure_names_its_seed_and_replay_command() {
        let f = Failure {
            seed: 42,
            at: Millis(1500),
            violation: Box::new(Violation::RoutingHoldsSelf { node: 3 }),
            replay: "MACULA_SIM_SEED=42 cargo test".into(),
        };
        let text = f.to_string();
        assert!(text.contains("seed 42"), "{text}");
        assert!(text.contains("1.500 s"), "{text}");
        assert!(
            text.contains("replay: MACULA_SIM_SEED=42 cargo test"),
            "{text}"
        );
        assert!(text.contains("node 3"), "{text}");
    }
}
