//! A stream with its consumers: the index ([`StreamState`]) and the
//! retention rules that need both (interest: a message goes once every
//! consumer it matches is done with it; work queue: once one consumer
//! acknowledged it, each message going to one consumer only).
//!
//! Every operation returns the sequences it removed from the stream, for
//! the caller to delete from its store.

use std::collections::BTreeMap;

use macula_wire::Millis;

use crate::config::{ConfigError, ConsumerConfig, DeliverPolicy, Retention, StreamConfig};
use crate::consumer::{
    AckError, Consumer, ConsumerInfo, ConsumerState, Exhausted, Next, PullError, PullEvent,
    PullRequest,
};
use crate::state::{AppendError, Appended, Incoming, Purge, StreamState};

/// Why a consumer operation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerError {
    /// Its configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No consumer of that name.
    #[error("no consumer {0:?} on this stream")]
    NotFound(String),
    /// A durable consumer of that name exists with another configuration.
    #[error("consumer {0:?} exists with another configuration")]
    Exists(String),
    /// `max_consumers` reached.
    #[error("the stream has {0} consumers, its maximum")]
    TooMany(usize),
    /// On a work queue: its filter overlaps another consumer's.
    #[error("on a work queue, consumer filters may not overlap ({0:?} does)")]
    WorkqueueOverlap(String),
    /// On a work queue: deliver policy other than `all`, or no acks.
    #[error("a work-queue consumer must deliver all and take acks")]
    WorkqueuePolicy,
    /// An acknowledgement that did nothing.
    #[error(transparent)]
    Ack(#[from] AckError),
    /// A pull request that was refused.
    #[error(transparent)]
    Pull(#[from] PullError),
}

/// A stream and its consumers (see the module docs).
#[derive(Debug)]
pub struct Stream {
    state: StreamState,
    consumers: BTreeMap<String, Consumer>,
    next_ephemeral: u64,
}

impl Stream {
    /// An empty stream.
    pub fn new(cfg: StreamConfig) -> Result<Self, ConfigError> {
        Ok(Stream::from_state(StreamState::new(cfg)?))
    }

    /// A stream around a restored index (see [`StreamState::restore`]);
    /// add its durable consumers back with [`Stream::restore_consumer`].
    pub fn from_state(state: StreamState) -> Self {
        Stream {
            state,
            consumers: BTreeMap::new(),
            next_ephemeral: 0,
        }
    }

    /// The index.
    pub fn state(&self) -> &StreamState {
        &self.state
    }

    /// Its configuration.
    pub fn config(&self) -> &StreamConfig {
        self.state.config()
    }

    /// Replaces the configuration; returns what the new limits removed.
    pub fn edit(&mut self, cfg: StreamConfig) -> Result<Vec<u64>, ConfigError> {
        self.state.edit(cfg)
    }

    /// Stores a publish at wall-clock time `now` (Unix ms). On an interest
    /// stream no consumer matches, the message is removed at once: its own
    /// sequence is then the last of `removed`.
    pub fn append(&mut self, now: u64, m: Incoming<'_>) -> Result<Appended, AppendError> {
        let mut out = self.state.append(now, m)?;
        if let Appended::Stored { seq, removed, .. } = &mut out {
            if self.config().retention == Retention::Interest
                && !self.consumers.values().any(|c| c.matches_topic(m.subject))
                && self.state.remove_acked(*seq)
            {
                removed.push(*seq);
            }
        }
        Ok(out)
    }

    /// Removes what is due at wall-clock time `now` (age, TTL).
    pub fn expire(&mut self, now: u64) -> Vec<u64> {
        self.state.expire(now)
    }

    /// Removes the messages `p` names.
    pub fn purge(&mut self, p: &Purge) -> Vec<u64> {
        self.state.purge(p)
    }

    /// Removes one message.
    pub fn delete(&mut self, seq: u64) -> bool {
        self.state.delete(seq)
    }

    /// Adds a consumer; returns its name (an ephemeral one gets
    /// `eph-<n>`). Adding a durable consumer again with the same
    /// configuration is a no-op.
    pub fn add_consumer(
        &mut self,
        cfg: ConsumerConfig,
        now: Millis,
    ) -> Result<String, ConsumerError> {
        cfg.validate()?;
        if let Some(name) = &cfg.durable {
            if let Some(c) = self.consumers.get(name) {
                return if c.config() == &cfg {
                    Ok(name.clone())
                } else {
                    Err(ConsumerError::Exists(name.clone()))
                };
            }
        }
        if self.consumers.len() >= self.config().max_consumers {
            return Err(ConsumerError::TooMany(self.consumers.len()));
        }
        let consumer = Consumer::new(cfg, &self.state, now)?;
        if self.config().retention == Retention::Workqueue {
            let c = consumer.config();
            if c.deliver != DeliverPolicy::All || c.ack == crate::config::AckPolicy::None {
                return Err(ConsumerError::WorkqueuePolicy);
            }
            for (name, other) in &self.consumers {
                if filters_overlap(&consumer, other) {
                    return Err(ConsumerError::WorkqueueOverlap(name.clone()));
                }
            }
        }
        let name = match &consumer.config().durable {
            Some(n) => n.clone(),
            None => loop {
                self.next_ephemeral += 1;
                let n = format!("eph-{}", self.next_ephemeral);
                if !self.consumers.contains_key(&n) {
                    break n;
                }
            },
        };
        self.consumers.insert(name.clone(), consumer);
        Ok(name)
    }

    /// Puts a durable consumer back from its stored state.
    pub fn restore_consumer(
        &mut self,
        cfg: ConsumerConfig,
        state: ConsumerState,
        now: Millis,
    ) -> Result<String, ConsumerError> {
        let Some(name) = cfg.durable.clone() else {
            return Err(ConsumerError::Config(ConfigError::Zero("durable name")));
        };
        let c = Consumer::restore(cfg, state, now)?;
        self.consumers.insert(name.clone(), c);
        Ok(name)
    }

    /// Removes a consumer; on an interest stream, returns the messages
    /// nobody is interested in any more (removed).
    pub fn delete_consumer(&mut self, name: &str) -> Result<Vec<u64>, ConsumerError> {
        if self.consumers.remove(name).is_none() {
            return Err(ConsumerError::NotFound(name.to_string()));
        }
        Ok(if self.config().retention == Retention::Interest {
            self.sweep_interest()
        } else {
            Vec::new()
        })
    }

    /// Removes the ephemeral consumers idle past their threshold; returns
    /// their names and what their going removed (interest).
    pub fn remove_inactive(&mut self, now: Millis) -> (Vec<String>, Vec<u64>) {
        let idle: Vec<String> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.inactive(now))
            .map(|(n, _)| n.clone())
            .collect();
        let mut removed = Vec::new();
        for n in &idle {
            if let Ok(r) = self.delete_consumer(n) {
                removed.extend(r);
            }
        }
        (idle, removed)
    }

    fn sweep_interest(&mut self) -> Vec<u64> {
        let seqs: Vec<u64> = self.state.iter_from(0).map(|m| m.seq).collect();
        seqs.into_iter()
            .filter(|&s| self.nobody_needs(s, None) && self.state.remove_acked(s))
            .collect()
    }

    /// Whether every consumer (but `except`) is done with `seq`.
    fn nobody_needs(&mut self, seq: u64, except: Option<&str>) -> bool {
        let Some(m) = self.state.get(seq) else {
            return false;
        };
        let state = &self.state;
        self.consumers
            .iter_mut()
            .filter(|(n, _)| Some(n.as_str()) != except)
            .all(|(_, c)| c.done_with(state, &m))
    }

    /// A consumer.
    pub fn consumer(&self, name: &str) -> Option<&Consumer> {
        self.consumers.get(name)
    }

    /// The consumers' names, sorted.
    pub fn consumer_names(&self) -> impl Iterator<Item = &str> {
        self.consumers.keys().map(String::as_str)
    }

    /// How many consumers.
    pub fn num_consumers(&self) -> usize {
        self.consumers.len()
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut Consumer, ConsumerError> {
        self.consumers
            .get_mut(name)
            .ok_or_else(|| ConsumerError::NotFound(name.to_string()))
    }

    /// The next delivery of consumer `name` (a push consumer's driver calls
    /// this while its subscriber has room).
    pub fn next(&mut self, name: &str, now: Millis) -> Result<Next, ConsumerError> {
        let c = self
            .consumers
            .get_mut(name)
            .ok_or_else(|| ConsumerError::NotFound(name.to_string()))?;
        Ok(c.next(now, &self.state))
    }

    /// The next delivery of consumer `name` of a message no larger than
    /// `max_size` bytes (a pull with bytes left).
    pub fn next_within(
        &mut self,
        name: &str,
        now: Millis,
        max_size: Option<u64>,
    ) -> Result<Next, ConsumerError> {
        let c = self
            .consumers
            .get_mut(name)
            .ok_or_else(|| ConsumerError::NotFound(name.to_string()))?;
        Ok(c.next_within(now, &self.state, max_size))
    }

    /// Consumer `name`'s numbers.
    pub fn consumer_info(&mut self, name: &str) -> Result<ConsumerInfo, ConsumerError> {
        let c = self
            .consumers
            .get_mut(name)
            .ok_or_else(|| ConsumerError::NotFound(name.to_string()))?;
        Ok(c.info(&self.state))
    }

    /// Whether some consumer has deliveries due again (its pullers should
    /// be woken).
    pub fn has_redeliveries(&self) -> bool {
        self.consumers.values().any(Consumer::has_redeliveries)
    }

    /// Consumers see messages up to `seq` only (see
    /// [`StreamState::set_visible_upto`]); once set, the bound only rises (a
    /// durable sequence reported late never hides what was shown).
    pub fn set_visible_upto(&mut self, seq: u64) {
        match self.state.visible_bound() {
            Some(v) if v >= seq => {}
            _ => self.state.set_visible_upto(Some(seq)),
        }
    }

    /// Acknowledges for consumer `name`; returns the messages the ack
    /// removed from the stream (work queue, interest).
    pub fn ack(&mut self, name: &str, seq: u64, now: Millis) -> Result<Vec<u64>, ConsumerError> {
        let acked = self.get_mut(name)?.ack(seq, now)?;
        Ok(self.retire(name, acked))
    }

    /// Terminates a message for consumer `name` (delivered no more, as if
    /// acknowledged); returns what that removed from the stream.
    pub fn term(&mut self, name: &str, seq: u64, now: Millis) -> Result<Vec<u64>, ConsumerError> {
        self.get_mut(name)?.term(seq, now)?;
        Ok(self.retire(name, vec![seq]))
    }

    /// A negative acknowledgement for consumer `name`.
    pub fn nak(
        &mut self,
        name: &str,
        seq: u64,
        delay: Millis,
        now: Millis,
    ) -> Result<Option<Exhausted>, ConsumerError> {
        Ok(self.get_mut(name)?.nak(seq, delay, now)?)
    }

    /// Work in progress for consumer `name`.
    pub fn in_progress(&mut self, name: &str, seq: u64, now: Millis) -> Result<(), ConsumerError> {
        Ok(self.get_mut(name)?.in_progress(seq, now)?)
    }

    /// Queues a pull request on consumer `name`.
    pub fn pull(&mut self, name: &str, req: PullRequest, now: Millis) -> Result<(), ConsumerError> {
        Ok(self.get_mut(name)?.pull(req, now)?)
    }

    /// Serves consumer `name`'s pull requests (see [`Consumer::poll_pull`]).
    pub fn poll_pull(
        &mut self,
        name: &str,
        now: Millis,
    ) -> Result<Option<PullEvent>, ConsumerError> {
        let c = self
            .consumers
            .get_mut(name)
            .ok_or_else(|| ConsumerError::NotFound(name.to_string()))?;
        Ok(c.poll_pull(now, &self.state))
    }

    /// Runs every consumer's timers; returns what was given up, by
    /// consumer.
    pub fn handle_timeout(&mut self, now: Millis) -> Vec<(String, Exhausted)> {
        let mut out = Vec::new();
        for (name, c) in &mut self.consumers {
            out.extend(c.handle_timeout(now).into_iter().map(|e| (name.clone(), e)));
        }
        out
    }

    /// The earliest consumer timer.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.consumers
            .values()
            .filter_map(Consumer::poll_timeout)
            .min()
    }

    fn retire(&mut self, name: &str, acked: Vec<u64>) -> Vec<u64> {
        match self.config().retention {
            Retention::Limits => Vec::new(),
            Retention::Workqueue => acked
                .into_iter()
                .filter(|&s| self.state.remove_acked(s))
                .collect(),
            Retention::Interest => acked
                .into_iter()
                .filter(|&s| self.nobody_needs(s, Some(name)) && self.state.remove_acked(s))
                .collect(),
        }
    }
}

fn filters_overlap(a: &Consumer, b: &Consumer) -> bool {
    if a.filter().is_empty() || b.filter().is_empty() {
        return true;
    }
    a.filter().iter().any(|x| {
        b.filter()
            .iter()
            .any(|y| macula_auth::policy::overlaps(x, y))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AckPolicy;
    use macula_pubsub::Topic;

    fn put(s: &mut Stream, subject: &str) -> Appended {
        let t = Topic::new(subject).unwrap();
        s.append(
            0,
            Incoming {
                subject: &t,
                size: 1,
                msg_id: None,
                ttl: None,
            },
        )
        .unwrap()
    }

    fn stream(retention: Retention) -> Stream {
        let mut c = StreamConfig::new("s", &["a.**"]);
        c.retention = retention;
        Stream::new(c).unwrap()
    }

    fn filtered(name: &str, filter: &[&str]) -> ConsumerConfig {
        ConsumerConfig {
            filter: filter.iter().map(|f| f.to_string()).collect(),
            ..ConsumerConfig::durable(name)
        }
    }

    fn take(s: &mut Stream, name: &str) -> Vec<u64> {
        std::iter::from_fn(|| match s.next(name, Millis(0)).unwrap() {
            Next::Deliver(d) => Some(d.stream_seq),
            _ => None,
        })
        .collect()
    }

    #[test]
    fn limits_retention_keeps_acked_messages() {
        let mut s = stream(Retention::Limits);
        put(&mut s, "a.x");
        let c = s
            .add_consumer(ConsumerConfig::durable("c"), Millis(0))
            .unwrap();
        take(&mut s, &c);
        assert_eq!(s.ack(&c, 1, Millis(0)), Ok(vec![]));
        assert_eq!(s.state().msgs(), 1);
    }

    #[test]
    fn workqueue_gives_each_message_to_one_consumer_and_removes_it_on_ack() {
        let mut s = stream(Retention::Workqueue);
        s.add_consumer(filtered("x", &["a.x.*"]), Millis(0))
            .unwrap();
        s.add_consumer(filtered("y", &["a.y.*"]), Millis(0))
            .unwrap();
        assert_eq!(
            s.add_consumer(filtered("z", &["a.*.1"]), Millis(0)),
            Err(ConsumerError::WorkqueueOverlap("x".into()))
        );
        assert_eq!(
            s.add_consumer(ConsumerConfig::durable("all"), Millis(0)),
            Err(ConsumerError::WorkqueueOverlap("x".into()))
        );
        assert_eq!(
            s.add_consumer(
                ConsumerConfig {
                    ack: AckPolicy::None,
                    ..filtered("n", &["a.n"])
                },
                Millis(0)
            ),
            Err(ConsumerError::WorkqueuePolicy)
        );
        for subj in ["a.x.1", "a.y.1", "a.x.2"] {
            put(&mut s, subj);
        }
        assert_eq!(take(&mut s, "x"), vec![1, 3]);
        assert_eq!(take(&mut s, "y"), vec![2]);
        assert_eq!(s.ack("x", 3, Millis(0)), Ok(vec![3]));
        assert_eq!(s.term("y", 2, Millis(0)), Ok(vec![2]));
        assert_eq!(s.state().msgs(), 1);
        // Unacked work stays until it is done.
        assert_eq!(s.ack("x", 1, Millis(0)), Ok(vec![1]));
        assert_eq!(s.state().msgs(), 0);
    }

    #[test]
    fn interest_keeps_a_message_until_every_interested_consumer_acked() {
        let mut s = stream(Retention::Interest);
        // No consumer: nothing is kept.
        assert_eq!(
            put(&mut s, "a.x"),
            Appended::Stored {
                seq: 1,
                ts: 0,
                removed: vec![1]
            }
        );
        s.add_consumer(ConsumerConfig::durable("all"), Millis(0))
            .unwrap();
        s.add_consumer(filtered("x", &["a.x"]), Millis(0)).unwrap();
        put(&mut s, "a.x"); // 2: both
        put(&mut s, "a.y"); // 3: only `all`
        assert_eq!(take(&mut s, "all"), vec![2, 3]);
        assert_eq!(take(&mut s, "x"), vec![2]);
        assert_eq!(s.ack("all", 2, Millis(0)), Ok(vec![]));
        assert_eq!(s.ack("all", 3, Millis(0)), Ok(vec![3]));
        assert_eq!(s.ack("x", 2, Millis(0)), Ok(vec![2]));
        assert_eq!(s.state().msgs(), 0);
        // A consumer that goes away gives up its interest.
        put(&mut s, "a.x"); // 4
        take(&mut s, "all");
        s.ack("all", 4, Millis(0)).unwrap();
        assert_eq!(s.state().msgs(), 1);
        assert_eq!(s.delete_consumer("x"), Ok(vec![4]));
        assert_eq!(
            s.delete_consumer("x"),
            Err(ConsumerError::NotFound("x".into()))
        );
    }

    #[test]
    fn durable_consumers_are_unique_and_bounded() {
        let mut c = StreamConfig::new("s", &["a.**"]);
        c.max_consumers = 2;
        let mut s = Stream::new(c).unwrap();
        s.add_consumer(ConsumerConfig::durable("d"), Millis(0))
            .unwrap();
        // Same configuration: a no-op.
        assert_eq!(
            s.add_consumer(ConsumerConfig::durable("d"), Millis(0)),
            Ok("d".into())
        );
        let other = ConsumerConfig {
            ack_wait: Millis(1),
            ..ConsumerConfig::durable("d")
        };
        assert_eq!(
            s.add_consumer(other, Millis(0)),
            Err(ConsumerError::Exists("d".into()))
        );
        assert_eq!(
            s.add_consumer(ConsumerConfig::default(), Millis(0)),
            Ok("eph-1".into())
        );
        assert_eq!(
            s.add_consumer(ConsumerConfig::default(), Millis(0)),
            Err(ConsumerError::TooMany(2))
        );
        assert_eq!(s.consumer_names().collect::<Vec<_>>(), ["d", "eph-1"]);
    }

    #[test]
    fn idle_ephemeral_consumers_are_removed() {
        let mut s = stream(Retention::Interest);
        let e = s
            .add_consumer(
                ConsumerConfig {
                    inactive_threshold: Millis(100),
                    ..Default::default()
                },
                Millis(0),
            )
            .unwrap();
        put(&mut s, "a.x");
        assert_eq!(s.state().msgs(), 1);
        assert_eq!(s.remove_inactive(Millis(99)), (vec![], vec![]));
        assert_eq!(s.remove_inactive(Millis(100)), (vec![e], vec![1]));
        assert_eq!(s.num_consumers(), 0);
    }

    #[test]
    fn the_visible_bound_only_rises() {
        let mut s = stream(Retention::Limits);
        for _ in 0..3 {
            put(&mut s, "a.x");
        }
        s.set_visible_upto(2);
        s.set_visible_upto(1);
        assert_eq!(s.state().visible_upto(), 2);
        s.add_consumer(ConsumerConfig::durable("c"), Millis(0))
            .unwrap();
        assert_eq!(take(&mut s, "c"), vec![1, 2]);
        s.set_visible_upto(3);
        assert_eq!(take(&mut s, "c"), vec![3]);
    }

    #[test]
    fn timers_of_every_consumer_run() {
        let mut s = stream(Retention::Limits);
        let c = ConsumerConfig {
            ack_wait: Millis(10),
            max_deliver: Some(1),
            ..ConsumerConfig::durable("c")
        };
        s.add_consumer(c, Millis(0)).unwrap();
        put(&mut s, "a.x");
        take(&mut s, "c");
        assert_eq!(s.poll_timeout(), Some(Millis(10)));
        let gone = s.handle_timeout(Millis(10));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, "c");
        assert_eq!(s.poll_timeout(), None);
    }
}
