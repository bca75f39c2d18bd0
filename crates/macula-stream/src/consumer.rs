//! A consumer: a cursor over a stream with acknowledgements.
//!
//! It decides which stored message is delivered next (redeliveries due
//! first, lowest sequence first; then new messages its filter matches),
//! holds what was delivered and not yet acknowledged (at most
//! `max_ack_pending`; at that bound nothing new is delivered: that is its
//! flow control, nothing is buffered for a slow consumer, the stream holds
//! the messages), redelivers what waited too long (`ack_wait` or the backoff
//! schedule) up to `max_deliver` times, and paces replay at the original
//! speed when asked. Pull requests wait in a bounded queue and are served
//! in order. Timers are the caller's monotonic clock (`Millis`); message
//! timestamps are the stream's.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use macula_pubsub::{Pattern, Topic};
use macula_wire::Millis;
use serde::{Deserialize, Serialize};

use crate::config::{AckPolicy, ConfigError, ConsumerConfig, DeliverPolicy, ReplayPolicy};
use crate::state::{MsgMeta, StreamState};

/// Subject ids whose filter decision is cached at most.
const MATCH_CACHE: usize = 4096;

/// One delivery the caller makes: read message `stream_seq` from the store
/// and hand it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message's stream sequence.
    pub stream_seq: u64,
    /// This delivery's number in the consumer (redeliveries count).
    pub consumer_seq: u64,
    /// How many times this message was delivered, this time included.
    pub deliveries: u32,
    /// Its stored size.
    pub size: u32,
}

/// What [`Consumer::next`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Deliver this.
    Deliver(Delivery),
    /// The next message is due at this time (replay at the original pace).
    Wait(Millis),
    /// `max_ack_pending` deliveries wait for acks: nothing new until one
    /// is acknowledged (a redelivery may still come when one times out).
    Blocked,
    /// The next message is larger than the bytes asked for.
    TooBig(u32),
    /// Nothing to deliver now.
    Idle,
}

/// A delivered message that was not acknowledged after `max_deliver`
/// deliveries: it is delivered no more (the caller reports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// Its stream sequence.
    pub stream_seq: u64,
    /// Deliveries made.
    pub deliveries: u32,
}

/// Why an acknowledgement did nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The consumer's ack policy is `none`.
    #[error("this consumer takes no acknowledgements")]
    NoAcks,
    /// The sequence is not waiting for an ack (already acknowledged,
    /// never delivered, or given up).
    #[error("message {0} is not pending")]
    NotPending(u64),
}

/// A pull request: up to `batch` messages (and `max_bytes`), waiting until
/// `expires` for them, or answering at once with what there is when
/// `no_wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullRequest {
    /// The caller's id for it (answers name it).
    pub id: u64,
    /// Messages at most (at least 1).
    pub batch: u32,
    /// Bytes at most.
    pub max_bytes: Option<u64>,
    /// When it gives up (the caller's clock).
    pub expires: Option<Millis>,
    /// Answer at once with what is there, instead of waiting.
    pub no_wait: bool,
}

/// Why a pull request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// `max_waiting` requests wait already.
    #[error("{0} pull requests already waiting on this consumer")]
    TooManyWaiting(usize),
    /// A batch of 0.
    #[error("a pull request's batch must be at least 1")]
    EmptyBatch,
}

/// How a pull request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullEnd {
    /// It got its batch (or its bytes).
    Complete,
    /// It expired; `delivered` messages were sent for it.
    Expired,
    /// `no_wait` and nothing more was there.
    NoMessages,
    /// The next message is larger than the bytes it had left.
    MaxBytes,
}

/// What [`Consumer::poll_pull`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullEvent {
    /// Deliver this for request `request`.
    Deliver {
        /// The request.
        request: u64,
        /// The message.
        delivery: Delivery,
    },
    /// Request `request` is over.
    Done {
        /// The request.
        request: u64,
        /// Why.
        end: PullEnd,
        /// Messages delivered for it.
        delivered: u32,
    },
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    req: PullRequest,
    delivered: u32,
    bytes: u64,
    /// Got its batch or bytes: it ends at the next poll.
    answered: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pending {
    consumer_seq: u64,
    deliveries: u32,
    deadline: Millis,
}

/// What a consumer counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerCounters {
    /// First deliveries.
    pub delivered: u64,
    /// Redeliveries.
    pub redelivered: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Negative acknowledgements.
    pub naked: u64,
    /// Messages terminated (no more deliveries).
    pub terminated: u64,
    /// Messages given up after `max_deliver` deliveries.
    pub exhausted: u64,
    /// Pending messages that left the stream before their ack (limits,
    /// age, purge).
    pub gone: u64,
    /// Pull requests that expired.
    pub pulls_expired: u64,
    /// Pull requests refused (too many waiting).
    pub pulls_refused: u64,
}

/// A durable consumer's position, as stored: enough to resume after a
/// restart with nothing acknowledged delivered again and nothing
/// unacknowledged lost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    /// Where it started.
    pub start_seq: u64,
    /// Next stream sequence to look at for a first delivery.
    pub next_seq: u64,
    /// Deliveries made.
    pub consumer_seq: u64,
    /// Last-per-subject sequences still to deliver first.
    pub initial: Vec<u64>,
    /// Delivered and not acknowledged: (stream seq, consumer seq,
    /// deliveries).
    pub pending: Vec<(u64, u64, u32)>,
    /// Of those, the ones waiting to be delivered again.
    pub redeliver: Vec<u64>,
}

/// A consumer's numbers, as `macula consumer info` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// Deliveries made.
    pub delivered_consumer_seq: u64,
    /// Last stream sequence delivered for the first time.
    pub delivered_stream_seq: u64,
    /// Every stream sequence up to this one is acknowledged or not its.
    pub ack_floor: u64,
    /// Delivered and waiting for an ack.
    pub num_ack_pending: usize,
    /// Waiting to be delivered again.
    pub num_redelivered: usize,
    /// Stored messages it has yet to deliver a first time.
    pub num_pending: u64,
    /// Pull requests waiting.
    pub num_waiting: usize,
}

/// A consumer (see the module docs).
#[derive(Debug)]
pub struct Consumer {
    cfg: ConsumerConfig,
    filter: Vec<Pattern>,
    start_seq: u64,
    next_seq: u64,
    initial: VecDeque<u64>,
    consumer_seq: u64,
    pending: BTreeMap<u64, Pending>,
    redeliver: BTreeSet<u64>,
    timers: BTreeSet<(Millis, u64)>,
    waiting: VecDeque<Waiting>,
    matches: HashMap<u32, bool>,
    matches_generation: u64,
    replay_base: Option<(u64, Millis)>,
    last_active: Millis,
    counters: ConsumerCounters,
}

impl Consumer {
    /// A new consumer on `stream`, positioned by its deliver policy.
    pub fn new(
        cfg: ConsumerConfig,
        stream: &StreamState,
        now: Millis,
    ) -> Result<Self, ConfigError> {
        let filter = cfg.validate()?;
        let mut c = Consumer::empty(cfg, filter, now);
        let last = stream.last_seq();
        let (start, initial) = match c.cfg.deliver {
            DeliverPolicy::All => (stream.first_seq(), VecDeque::new()),
            DeliverPolicy::New => (last + 1, VecDeque::new()),
            DeliverPolicy::ByStartSeq(s) => (s.max(1), VecDeque::new()),
            DeliverPolicy::ByStartTime(t) => (stream.seq_at_time(t), VecDeque::new()),
            DeliverPolicy::Last => {
                let seq = stream
                    .iter_from(0)
                    .rev()
                    .find(|m| c.wants(stream, m))
                    .map_or(last + 1, |m| m.seq);
                (seq, VecDeque::new())
            }
            DeliverPolicy::LastPerSubject => {
                let mut seen = BTreeSet::new();
                let mut seqs: Vec<u64> = Vec::new();
                for m in stream.iter_from(0).rev() {
                    if seen.insert(m.subject_id) && c.wants(stream, &m) {
                        seqs.push(m.seq);
                    }
                }
                seqs.reverse();
                (seqs.first().copied().unwrap_or(last + 1), seqs.into())
            }
        };
        c.start_seq = start;
        c.next_seq = if initial.is_empty() { start } else { last + 1 };
        c.initial = initial;
        Ok(c)
    }

    /// A durable consumer resumed from its stored state; every pending
    /// delivery waits a full ack wait from `now` again.
    pub fn restore(
        cfg: ConsumerConfig,
        state: ConsumerState,
        now: Millis,
    ) -> Result<Self, ConfigError> {
        let filter = cfg.validate()?;
        let mut c = Consumer::empty(cfg, filter, now);
        c.start_seq = state.start_seq;
        c.next_seq = state.next_seq;
        c.consumer_seq = state.consumer_seq;
        c.initial = state.initial.into();
        for (seq, consumer_seq, deliveries) in state.pending {
            let deadline = now.saturating_add(c.wait(deliveries));
            c.pending.insert(
                seq,
                Pending {
                    consumer_seq,
                    deliveries,
                    deadline,
                },
            );
            c.timers.insert((deadline, seq));
        }
        for seq in state.redeliver {
            if let Some(p) = c.pending.get(&seq) {
                c.timers.remove(&(p.deadline, seq));
                c.redeliver.insert(seq);
            }
        }
        Ok(c)
    }

    fn empty(cfg: ConsumerConfig, filter: Vec<Pattern>, now: Millis) -> Self {
        Consumer {
            cfg,
            filter,
            start_seq: 1,
            next_seq: 1,
            initial: VecDeque::new(),
            consumer_seq: 0,
            pending: BTreeMap::new(),
            redeliver: BTreeSet::new(),
            timers: BTreeSet::new(),
            waiting: VecDeque::new(),
            matches: HashMap::new(),
            matches_generation: 0,
            replay_base: None,
            last_active: now,
            counters: ConsumerCounters::default(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.cfg
    }

    /// Its parsed filter (empty: every message).
    pub fn filter(&self) -> &[Pattern] {
        &self.filter
    }

    /// Whether its filter takes `topic`.
    pub fn matches_topic(&self, topic: &Topic) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|p| p.matches(topic))
    }

    fn wants(&mut self, stream: &StreamState, m: &MsgMeta<'_>) -> bool {
        if self.filter.is_empty() {
            return true;
        }
        if self.matches_generation != stream.subjects_generation()
            || self.matches.len() >= MATCH_CACHE
        {
            self.matches.clear();
            self.matches_generation = stream.subjects_generation();
        }
        if let Some(&w) = self.matches.get(&m.subject_id) {
            return w;
        }
        let w = Topic::new(m.subject).is_ok_and(|t| self.matches_topic(&t));
        self.matches.insert(m.subject_id, w);
        w
    }

    fn wait(&self, deliveries: u32) -> Millis {
        let i = deliveries.saturating_sub(1) as usize;
        match self.cfg.backoff.get(i).or(self.cfg.backoff.last()) {
            Some(&w) => w,
            None => self.cfg.ack_wait,
        }
    }

    /// Notes activity at `now` (an ephemeral consumer idle past its
    /// threshold is removed by its stream).
    pub fn touch(&mut self, now: Millis) {
        self.last_active = self.last_active.max(now);
    }

    /// Whether an ephemeral consumer has been idle past its threshold with
    /// no pull request waiting.
    pub fn inactive(&self, now: Millis) -> bool {
        self.cfg.durable.is_none()
            && self.waiting.is_empty()
            && now >= self.last_active.saturating_add(self.cfg.inactive_threshold)
    }

    /// The next delivery (see [`Next`]).
    pub fn next(&mut self, now: Millis, stream: &StreamState) -> Next {
        self.next_within(now, stream, None)
    }

    /// The next delivery of a message no larger than `max_size` bytes.
    pub fn next_within(
        &mut self,
        now: Millis,
        stream: &StreamState,
        max_size: Option<u64>,
    ) -> Next {
        self.touch(now);
        // Due redeliveries first, lowest sequence first.
        while let Some(&seq) = self.redeliver.first() {
            let Some(m) = stream.get(seq) else {
                self.redeliver.remove(&seq);
                self.pending.remove(&seq);
                self.counters.gone += 1;
                continue;
            };
            if max_size.is_some_and(|max| u64::from(m.size) > max) {
                return Next::TooBig(m.size);
            }
            self.redeliver.remove(&seq);
            let Some(deliveries) = self
                .pending
                .get(&seq)
                .map(|p| p.deliveries.saturating_add(1))
            else {
                continue;
            };
            self.consumer_seq += 1;
            let consumer_seq = self.consumer_seq;
            let deadline = now.saturating_add(self.wait(deliveries));
            if let Some(p) = self.pending.get_mut(&seq) {
                *p = Pending {
                    consumer_seq,
                    deliveries,
                    deadline,
                };
            }
            self.timers.insert((deadline, seq));
            self.counters.redelivered += 1;
            return Next::Deliver(Delivery {
                stream_seq: seq,
                consumer_seq,
                deliveries,
                size: m.size,
            });
        }
        let acks = self.cfg.ack != AckPolicy::None;
        if acks && self.pending.len() >= self.cfg.max_ack_pending as usize {
            return Next::Blocked;
        }
        loop {
            let from_initial = !self.initial.is_empty();
            let m = if let Some(&seq) = self.initial.front() {
                if seq > stream.visible_upto() {
                    return Next::Idle;
                }
                match stream.get(seq) {
                    Some(m) => m,
                    None => {
                        self.initial.pop_front();
                        continue;
                    }
                }
            } else {
                let Some(m) = stream.next_from(self.next_seq) else {
                    self.next_seq = self.next_seq.max(stream.visible_upto() + 1);
                    return Next::Idle;
                };
                if !self.wants(stream, &m) {
                    self.next_seq = m.seq + 1;
                    continue;
                }
                m
            };
            if self.cfg.replay == ReplayPolicy::Original {
                let (ts0, t0) = *self.replay_base.get_or_insert((m.ts, now));
                let due = t0.saturating_add(Millis(m.ts.saturating_sub(ts0)));
                if due > now {
                    return Next::Wait(due);
                }
            }
            if max_size.is_some_and(|max| u64::from(m.size) > max) {
                return Next::TooBig(m.size);
            }
            if from_initial {
                self.initial.pop_front();
            } else {
                self.next_seq = m.seq + 1;
            }
            self.consumer_seq += 1;
            self.counters.delivered += 1;
            if acks {
                let deadline = now.saturating_add(self.wait(1));
                self.pending.insert(
                    m.seq,
                    Pending {
                        consumer_seq: self.consumer_seq,
                        deliveries: 1,
                        deadline,
                    },
                );
                self.timers.insert((deadline, m.seq));
            }
            return Next::Deliver(Delivery {
                stream_seq: m.seq,
                consumer_seq: self.consumer_seq,
                deliveries: 1,
                size: m.size,
            });
        }
    }

    /// Acknowledges `seq` (and, with ack policy `all`, every earlier
    /// pending delivery). Returns the stream sequences acknowledged,
    /// ascending.
    pub fn ack(&mut self, seq: u64, now: Millis) -> Result<Vec<u64>, AckError> {
        self.touch(now);
        let done: Vec<u64> = match self.cfg.ack {
            AckPolicy::None => return Err(AckError::NoAcks),
            AckPolicy::Explicit => {
                if !self.pending.contains_key(&seq) {
                    return Err(AckError::NotPending(seq));
                }
                vec![seq]
            }
            AckPolicy::All => {
                let seqs: Vec<u64> = self.pending.range(..=seq).map(|(&s, _)| s).collect();
                if seqs.is_empty() {
                    return Err(AckError::NotPending(seq));
                }
                seqs
            }
        };
        for &s in &done {
            self.forget(s);
        }
        self.counters.acked += done.len() as u64;
        Ok(done)
    }

    /// Terminates `seq`: it is delivered no more, as if acknowledged.
    pub fn term(&mut self, seq: u64, now: Millis) -> Result<(), AckError> {
        self.touch(now);
        if self.cfg.ack == AckPolicy::None {
            return Err(AckError::NoAcks);
        }
        if !self.forget(seq) {
            return Err(AckError::NotPending(seq));
        }
        self.counters.terminated += 1;
        Ok(())
    }

    /// A negative acknowledgement: deliver `seq` again after `delay` (at
    /// once when zero), unless it reached `max_deliver` (then it is given
    /// up and returned).
    pub fn nak(
        &mut self,
        seq: u64,
        delay: Millis,
        now: Millis,
    ) -> Result<Option<Exhausted>, AckError> {
        let p = self.awaiting_ack(seq, now)?;
        self.counters.naked += 1;
        self.timers.remove(&(p.deadline, seq));
        if delay == Millis::ZERO {
            return Ok(self.due(seq));
        }
        let deadline = now.saturating_add(delay);
        if let Some(p) = self.pending.get_mut(&seq) {
            p.deadline = deadline;
        }
        self.timers.insert((deadline, seq));
        Ok(None)
    }

    /// The pending delivery of `seq` whose ack wait is running (not one
    /// queued for redelivery), for a nak or an in-progress.
    fn awaiting_ack(&mut self, seq: u64, now: Millis) -> Result<Pending, AckError> {
        self.touch(now);
        if self.cfg.ack == AckPolicy::None {
            return Err(AckError::NoAcks);
        }
        match self.pending.get(&seq) {
            Some(p) if !self.redeliver.contains(&seq) => Ok(*p),
            _ => Err(AckError::NotPending(seq)),
        }
    }

    /// Work in progress on `seq`: its ack wait starts again from `now`.
    pub fn in_progress(&mut self, seq: u64, now: Millis) -> Result<(), AckError> {
        let p = self.awaiting_ack(seq, now)?;
        self.timers.remove(&(p.deadline, seq));
        let deadline = now.saturating_add(self.wait(p.deliveries));
        if let Some(p) = self.pending.get_mut(&seq) {
            p.deadline = deadline;
        }
        self.timers.insert((deadline, seq));
        Ok(())
    }

    fn forget(&mut self, seq: u64) -> bool {
        let Some(p) = self.pending.remove(&seq) else {
            return false;
        };
        self.timers.remove(&(p.deadline, seq));
        self.redeliver.remove(&seq);
        true
    }

    /// `seq` waited its time: queue it for redelivery, or give it up.
    fn due(&mut self, seq: u64) -> Option<Exhausted> {
        let p = self.pending.get(&seq).copied()?;
        if self.cfg.max_deliver.is_some_and(|max| p.deliveries >= max) {
            self.forget(seq);
            self.counters.exhausted += 1;
            return Some(Exhausted {
                stream_seq: seq,
                deliveries: p.deliveries,
            });
        }
        self.redeliver.insert(seq);
        None
    }

    /// Runs the timers due at `now`: deliveries whose ack wait ended are
    /// queued for redelivery (or given up: returned), expired pull
    /// requests end (see [`Consumer::poll_pull`]).
    pub fn handle_timeout(&mut self, now: Millis) -> Vec<Exhausted> {
        let mut out = Vec::new();
        while let Some(&(at, seq)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, seq));
            out.extend(self.due(seq));
        }
        out
    }

    /// When [`Consumer::handle_timeout`] or [`Consumer::poll_pull`] next
    /// has something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let ack = self.timers.first().map(|&(at, _)| at);
        let pull = self
            .waiting
            .iter()
            .filter(|w| !w.answered)
            .filter_map(|w| w.req.expires)
            .min();
        match (ack, pull) {
            (Some(a), Some(p)) => Some(a.min(p)),
            (a, p) => a.or(p),
        }
    }

    /// Queues a pull request.
    pub fn pull(&mut self, req: PullRequest, now: Millis) -> Result<(), PullError> {
        self.touch(now);
        if req.batch == 0 {
            return Err(PullError::EmptyBatch);
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            self.counters.pulls_refused += 1;
            return Err(PullError::TooManyWaiting(self.waiting.len()));
        }
        self.waiting.push_back(Waiting {
            req,
            delivered: 0,
            bytes: 0,
            answered: false,
        });
        Ok(())
    }

    /// Serves the waiting pull requests in order; call until `None` after
    /// anything changed (a publish, an ack, a timer, a new request).
    pub fn poll_pull(&mut self, now: Millis, stream: &StreamState) -> Option<PullEvent> {
        let expired = self
            .waiting
            .iter()
            .position(|w| !w.answered && w.req.expires.is_some_and(|e| e <= now));
        if let Some(w) = expired.and_then(|i| self.waiting.remove(i)) {
            self.counters.pulls_expired += 1;
            return Some(PullEvent::Done {
                request: w.req.id,
                end: PullEnd::Expired,
                delivered: w.delivered,
            });
        }
        let w = *self.waiting.front()?;
        let end = if w.answered {
            PullEnd::Complete
        } else {
            let left = w.req.max_bytes.map(|m| m.saturating_sub(w.bytes));
            match self.next_within(now, stream, left) {
                Next::Deliver(d) => {
                    let front = self.waiting.front_mut()?;
                    front.delivered += 1;
                    front.bytes += u64::from(d.size);
                    front.answered = front.delivered >= front.req.batch
                        || front.req.max_bytes.is_some_and(|m| front.bytes >= m);
                    return Some(PullEvent::Deliver {
                        request: w.req.id,
                        delivery: d,
                    });
                }
                Next::TooBig(_) => PullEnd::MaxBytes,
                _ if w.req.no_wait => PullEnd::NoMessages,
                _ => return None,
            }
        };
        let w = self.waiting.pop_front()?;
        Some(PullEvent::Done {
            request: w.req.id,
            end,
            delivered: w.delivered,
        })
    }

    /// Its stored position (for a durable consumer's record).
    pub fn state(&self) -> ConsumerState {
        ConsumerState {
            start_seq: self.start_seq,
            next_seq: self.next_seq,
            consumer_seq: self.consumer_seq,
            initial: self.initial.iter().copied().collect(),
            pending: self
                .pending
                .iter()
                .map(|(&s, p)| (s, p.consumer_seq, p.deliveries))
                .collect(),
            redeliver: self.redeliver.iter().copied().collect(),
        }
    }

    /// Whether this consumer no longer needs message `m` (for interest
    /// and work-queue retention): not its (filter, before its start), or
    /// delivered and no longer pending.
    pub fn done_with(&mut self, stream: &StreamState, m: &MsgMeta<'_>) -> bool {
        if !self.wants(stream, m) || m.seq < self.start_seq {
            return true;
        }
        if self.pending.contains_key(&m.seq) || self.initial.binary_search(&m.seq).is_ok() {
            return false;
        }
        m.seq < self.next_seq
    }

    /// Its numbers.
    pub fn info(&mut self, stream: &StreamState) -> ConsumerInfo {
        let initial = self.initial.len() as u64;
        let from = self.next_seq;
        let fresh: Vec<MsgMeta<'_>> = stream.iter_from(from).collect();
        let new = fresh.iter().filter(|m| self.wants(stream, m)).count() as u64;
        ConsumerInfo {
            delivered_consumer_seq: self.consumer_seq,
            delivered_stream_seq: self.next_seq.saturating_sub(1),
            ack_floor: self.ack_floor(),
            num_ack_pending: self.pending.len(),
            num_redelivered: self.redeliver.len(),
            num_pending: initial + new,
            num_waiting: self.waiting.len(),
        }
    }

    /// Every stream sequence up to this one is acknowledged or not its.
    pub fn ack_floor(&self) -> u64 {
        let first_open = [
            self.pending.keys().next().copied(),
            self.initial.front().copied(),
            Some(self.next_seq),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.next_seq);
        first_open.saturating_sub(1)
    }

    /// Whether deliveries are due again.
    pub fn has_redeliveries(&self) -> bool {
        !self.redeliver.is_empty()
    }

    /// Delivered and waiting for an ack.
    pub fn num_pending_acks(&self) -> usize {
        self.pending.len()
    }

    /// Pull requests waiting.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// What it counted.
    pub fn counters(&self) -> ConsumerCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamConfig;
    use crate::state::Incoming;
    use proptest::prelude::*;

    fn stream() -> StreamState {
        StreamState::new(StreamConfig::new("s", &["a.**"])).unwrap()
    }

    fn put(s: &mut StreamState, ts: u64, subject: &str) -> u64 {
        let t = Topic::new(subject).unwrap();
        match s
            .append(
                ts,
                Incoming {
                    subject: &t,
                    size: 10,
                    msg_id: None,
                    ttl: None,
                },
            )
            .unwrap()
        {
            crate::Appended::Stored { seq, .. } => seq,
            crate::Appended::Duplicate { seq } => seq,
        }
    }

    fn deliver(c: &mut Consumer, now: u64, s: &StreamState) -> Option<u64> {
        match c.next(Millis(now), s) {
            Next::Deliver(d) => Some(d.stream_seq),
            _ => None,
        }
    }

    fn drain(c: &mut Consumer, now: u64, s: &StreamState) -> Vec<u64> {
        std::iter::from_fn(|| deliver(c, now, s)).collect()
    }

    fn consumer(s: &StreamState, f: impl FnOnce(&mut ConsumerConfig)) -> Consumer {
        let mut cfg = ConsumerConfig::default();
        f(&mut cfg);
        Consumer::new(cfg, s, Millis(0)).unwrap()
    }

    #[test]
    fn deliver_policies_pick_the_start() {
        let mut s = stream();
        for (ts, subj) in [(10, "a.x"), (20, "a.y"), (30, "a.x"), (40, "a.z")] {
            put(&mut s, ts, subj);
        }
        let cases: Vec<(DeliverPolicy, Vec<u64>)> = vec![
            (DeliverPolicy::All, vec![1, 2, 3, 4]),
            (DeliverPolicy::Last, vec![4]),
            (DeliverPolicy::LastPerSubject, vec![2, 3, 4]),
            (DeliverPolicy::New, vec![]),
            (DeliverPolicy::ByStartSeq(3), vec![3, 4]),
            (DeliverPolicy::ByStartSeq(0), vec![1, 2, 3, 4]),
            (DeliverPolicy::ByStartTime(25), vec![3, 4]),
            (DeliverPolicy::ByStartTime(99), vec![]),
        ];
        for (policy, want) in cases {
            let mut c = consumer(&s, |c| c.deliver = policy);
            assert_eq!(drain(&mut c, 0, &s), want, "{policy:?}");
        }
        // Every one of them goes on with what is stored later.
        for policy in [DeliverPolicy::New, DeliverPolicy::LastPerSubject] {
            let mut c = consumer(&s, |c| c.deliver = policy);
            drain(&mut c, 0, &s);
            let seq = put(&mut s, 50, "a.w");
            assert_eq!(drain(&mut c, 0, &s), vec![seq]);
        }
    }

    #[test]
    fn filters_select_and_last_respects_them() {
        let mut s = stream();
        for subj in ["a.x", "a.y", "a.x", "a.y.z"] {
            put(&mut s, 0, subj);
        }
        let mut c = consumer(&s, |c| c.filter = vec!["a.y.**".into()]);
        assert_eq!(drain(&mut c, 0, &s), vec![2, 4]);
        let mut c = consumer(&s, |c| {
            c.filter = vec!["a.x".into()];
            c.deliver = DeliverPolicy::Last;
        });
        assert_eq!(drain(&mut c, 0, &s), vec![3]);
        let mut c = consumer(&s, |c| {
            c.filter = vec!["a.x".into(), "a.y".into()];
            c.deliver = DeliverPolicy::LastPerSubject;
        });
        assert_eq!(drain(&mut c, 0, &s), vec![2, 3]);
    }

    #[test]
    fn unacked_deliveries_come_back_after_ack_wait() {
        let mut s = stream();
        put(&mut s, 0, "a.x");
        put(&mut s, 0, "a.x");
        let mut c = consumer(&s, |c| c.ack_wait = Millis(100));
        assert_eq!(drain(&mut c, 0, &s), vec![1, 2]);
        c.ack(2, Millis(10)).unwrap();
        assert_eq!(c.poll_timeout(), Some(Millis(100)));
        assert!(c.handle_timeout(Millis(99)).is_empty());
        assert_eq!(deliver(&mut c, 99, &s), None);
        assert!(c.handle_timeout(Millis(100)).is_empty());
        match c.next(Millis(100), &s) {
            Next::Deliver(d) => {
                assert_eq!((d.stream_seq, d.deliveries, d.consumer_seq), (1, 2, 3));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.counters().redelivered, 1);
        c.ack(1, Millis(150)).unwrap();
        assert_eq!(c.ack(1, Millis(150)), Err(AckError::NotPending(1)));
        assert_eq!(c.ack_floor(), 2);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn backoff_sets_each_wait_and_max_deliver_gives_up() {
        let mut s = stream();
        put(&mut s, 0, "a.x");
        let mut c = consumer(&s, |c| {
            c.backoff = vec![Millis(10), Millis(50)];
            c.max_deliver = Some(3);
        });
        assert_eq!(deliver(&mut c, 0, &s), Some(1));
        assert_eq!(c.poll_timeout(), Some(Millis(10)));
        c.handle_timeout(Millis(10));
        assert_eq!(deliver(&mut c, 10, &s), Some(1));
        assert_eq!(c.poll_timeout(), Some(Millis(60)));
        c.handle_timeout(Millis(60));
        assert_eq!(deliver(&mut c, 60, &s), Some(1));
        // The last step repeats.
        assert_eq!(c.poll_timeout(), Some(Millis(110)));
        let gone = c.handle_timeout(Millis(110));
        assert_eq!(
            gone,
            vec![Exhausted {
                stream_seq: 1,
                deliveries: 3
            }]
        );
        assert_eq!(deliver(&mut c, 200, &s), None);
        assert_eq!(c.counters().exhausted, 1);
        assert_eq!(c.num_pending_acks(), 0);
    }

    #[test]
    fn max_ack_pending_stops_new_deliveries() {
        let mut s = stream();
        for _ in 0..5 {
            put(&mut s, 0, "a.x");
        }
        let mut c = consumer(&s, |c| c.max_ack_pending = 2);
        assert_eq!(drain(&mut c, 0, &s), vec![1, 2]);
        assert_eq!(c.next(Millis(0), &s), Next::Blocked);
        c.ack(1, Millis(0)).unwrap();
        assert_eq!(drain(&mut c, 0, &s), vec![3]);
        // A redelivery is not new: it comes even at the bound.
        c.handle_timeout(DEFAULT_ACK_WAIT_FOR_TEST);
        assert_eq!(drain(&mut c, 30_000, &s), vec![2, 3]);
    }

    const DEFAULT_ACK_WAIT_FOR_TEST: Millis = crate::config::DEFAULT_ACK_WAIT;

    #[test]
    fn ack_all_acknowledges_everything_before() {
        let mut s = stream();
        for _ in 0..4 {
            put(&mut s, 0, "a.x");
        }
        let mut c = consumer(&s, |c| c.ack = AckPolicy::All);
        drain(&mut c, 0, &s);
        assert_eq!(c.ack(3, Millis(1)), Ok(vec![1, 2, 3]));
        assert_eq!(c.ack_floor(), 3);
        assert_eq!(c.ack(2, Millis(1)), Err(AckError::NotPending(2)));
    }

    #[test]
    fn ack_none_needs_no_acks() {
        let mut s = stream();
        for _ in 0..3 {
            put(&mut s, 0, "a.x");
        }
        let mut c = consumer(&s, |c| c.ack = AckPolicy::None);
        assert_eq!(drain(&mut c, 0, &s), vec![1, 2, 3]);
        assert_eq!(c.ack(1, Millis(0)), Err(AckError::NoAcks));
        assert_eq!(c.ack_floor(), 3);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn nak_in_progress_and_term() {
        let mut s = stream();
        for _ in 0..3 {
            put(&mut s, 0, "a.x");
        }
        let mut c = consumer(&s, |c| c.ack_wait = Millis(100));
        drain(&mut c, 0, &s);
        // Nak without delay: back at once.
        assert_eq!(c.nak(1, Millis::ZERO, Millis(5)), Ok(None));
        assert_eq!(deliver(&mut c, 5, &s), Some(1));
        c.ack(1, Millis(5)).unwrap();
        // Nak with delay: back after it.
        c.nak(2, Millis(20), Millis(5)).unwrap();
        assert_eq!(deliver(&mut c, 6, &s), None);
        c.handle_timeout(Millis(25));
        assert_eq!(deliver(&mut c, 25, &s), Some(2));
        c.ack(2, Millis(25)).unwrap();
        // In progress pushes the deadline out.
        c.in_progress(3, Millis(90)).unwrap();
        c.handle_timeout(Millis(150));
        assert_eq!(deliver(&mut c, 150, &s), None);
        c.handle_timeout(Millis(190));
        assert_eq!(deliver(&mut c, 190, &s), Some(3));
        // Term: never again.
        c.term(3, Millis(191)).unwrap();
        c.handle_timeout(Millis(10_000));
        assert_eq!(drain(&mut c, 10_000, &s), Vec::<u64>::new());
        assert_eq!(c.term(3, Millis(0)), Err(AckError::NotPending(3)));
        assert_eq!(c.counters().terminated, 1);
        assert_eq!(c.counters().naked, 2);
    }

    #[test]
    fn messages_that_left_the_stream_are_not_redelivered() {
        let mut s = stream();
        put(&mut s, 0, "a.x");
        put(&mut s, 0, "a.x");
        let mut c = consumer(&s, |c| c.ack_wait = Millis(10));
        drain(&mut c, 0, &s);
        s.delete(1);
        c.handle_timeout(Millis(10));
        assert_eq!(drain(&mut c, 10, &s), vec![2]);
        assert_eq!(c.counters().gone, 1);
        assert_eq!(c.num_pending_acks(), 1);
    }

    #[test]
    fn replay_original_keeps_the_gaps() {
        let mut s = stream();
        for ts in [1_000, 1_050, 1_300] {
            put(&mut s, ts, "a.x");
        }
        let mut c = consumer(&s, |c| {
            c.replay = ReplayPolicy::Original;
            c.ack = AckPolicy::None;
        });
        assert_eq!(deliver(&mut c, 7, &s), Some(1));
        assert_eq!(c.next(Millis(8), &s), Next::Wait(Millis(57)));
        assert_eq!(deliver(&mut c, 57, &s), Some(2));
        assert_eq!(c.next(Millis(100), &s), Next::Wait(Millis(307)));
        assert_eq!(deliver(&mut c, 400, &s), Some(3));
    }

    #[test]
    fn pull_requests_get_batches_wait_and_expire() {
        let mut s = stream();
        for _ in 0..3 {
            put(&mut s, 0, "a.x");
        }
        let mut c = consumer(&s, |_| {});
        let req = |id, batch| PullRequest {
            id,
            batch,
            max_bytes: None,
            expires: Some(Millis(100)),
            no_wait: false,
        };
        c.pull(req(1, 2), Millis(0)).unwrap();
        c.pull(req(2, 5), Millis(0)).unwrap();
        let events: Vec<PullEvent> = std::iter::from_fn(|| c.poll_pull(Millis(0), &s)).collect();
        let seqs: Vec<(u64, u64)> = events
            .iter()
            .filter_map(|e| match e {
                PullEvent::Deliver { request, delivery } => Some((*request, delivery.stream_seq)),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![(1, 1), (1, 2), (2, 3)]);
        assert!(events.contains(&PullEvent::Done {
            request: 1,
            end: PullEnd::Complete,
            delivered: 2
        }));
        // Request 2 waits for more; a new message goes to it.
        put(&mut s, 0, "a.x");
        assert!(matches!(
            c.poll_pull(Millis(1), &s),
            Some(PullEvent::Deliver { request: 2, .. })
        ));
        assert_eq!(c.poll_pull(Millis(1), &s), None);
        assert_eq!(c.poll_timeout(), Some(Millis(100)));
        assert_eq!(
            c.poll_pull(Millis(100), &s),
            Some(PullEvent::Done {
                request: 2,
                end: PullEnd::Expired,
                delivered: 2
            })
        );
        // No wait: answered at once.
        c.pull(
            PullRequest {
                no_wait: true,
                expires: None,
                ..req(3, 1)
            },
            Millis(100),
        )
        .unwrap();
        assert_eq!(
            c.poll_pull(Millis(100), &s),
            Some(PullEvent::Done {
                request: 3,
                end: PullEnd::NoMessages,
                delivered: 0
            })
        );
        assert_eq!(c.counters().pulls_expired, 1);
    }

    #[test]
    fn pull_requests_are_bounded_by_bytes_and_count() {
        let mut s = stream();
        for _ in 0..3 {
            put(&mut s, 0, "a.x");
        }
        let mut c = consumer(&s, |c| c.max_waiting = 1);
        c.pull(
            PullRequest {
                id: 1,
                batch: 10,
                max_bytes: Some(15),
                expires: None,
                no_wait: false,
            },
            Millis(0),
        )
        .unwrap();
        assert_eq!(
            c.pull(
                PullRequest {
                    id: 2,
                    batch: 1,
                    max_bytes: None,
                    expires: None,
                    no_wait: false
                },
                Millis(0)
            ),
            Err(PullError::TooManyWaiting(1))
        );
        assert!(matches!(
            c.poll_pull(Millis(0), &s),
            Some(PullEvent::Deliver { .. })
        ));
        // 5 bytes left, messages are 10: the request ends.
        assert_eq!(
            c.poll_pull(Millis(0), &s),
            Some(PullEvent::Done {
                request: 1,
                end: PullEnd::MaxBytes,
                delivered: 1
            })
        );
        assert_eq!(
            c.pull(
                PullRequest {
                    id: 3,
                    batch: 0,
                    max_bytes: None,
                    expires: None,
                    no_wait: false
                },
                Millis(0)
            ),
            Err(PullError::EmptyBatch)
        );
    }

    #[test]
    fn a_message_of_exactly_the_bytes_left_is_delivered() {
        let mut s = stream();
        put(&mut s, 0, "a.x");
        let mut c = consumer(&s, |c| c.ack_wait = Millis(10));
        assert!(matches!(
            c.next_within(Millis(0), &s, Some(10)),
            Next::Deliver(_)
        ));
        c.handle_timeout(Millis(10));
        // The redelivery too, and one byte less is too big.
        assert_eq!(c.next_within(Millis(10), &s, Some(9)), Next::TooBig(10));
        assert!(
            matches!(c.next_within(Millis(10), &s, Some(10)), Next::Deliver(d) if d.deliveries == 2)
        );
    }

    #[test]
    fn state_round_trips_through_restore() {
        let mut s = stream();
        for _ in 0..5 {
            put(&mut s, 0, "a.x");
        }
        let mut c = consumer(&s, |c| c.ack_wait = Millis(10));
        drain(&mut c, 0, &s);
        c.ack(2, Millis(1)).unwrap();
        c.handle_timeout(Millis(10));
        // A late ack (the message was already queued again) still counts.
        assert_eq!(c.ack(4, Millis(10)), Ok(vec![4]));
        let st = c.state();
        assert_eq!(st.pending.len(), 3);
        assert_eq!(st.redeliver, vec![1, 3, 5]);
        let mut r = Consumer::restore(c.config().clone(), st.clone(), Millis(1000)).unwrap();
        assert_eq!(r.state(), st);
        assert_eq!(drain(&mut r, 1000, &s), vec![1, 3, 5]);
        put(&mut s, 0, "a.x");
        assert_eq!(drain(&mut r, 1000, &s), vec![6]);
    }

    #[test]
    fn ephemeral_consumers_go_inactive() {
        let s = stream();
        let mut c = consumer(&s, |c| c.inactive_threshold = Millis(50));
        assert!(!c.inactive(Millis(49)));
        assert!(c.inactive(Millis(50)));
        c.touch(Millis(60));
        assert!(!c.inactive(Millis(100)));
        c.pull(
            PullRequest {
                id: 1,
                batch: 1,
                max_bytes: None,
                expires: None,
                no_wait: false,
            },
            Millis(60),
        )
        .unwrap();
        assert!(!c.inactive(Millis(1_000)));
        let d = Consumer::new(ConsumerConfig::durable("d"), &s, Millis(0)).unwrap();
        assert!(!d.inactive(Millis(1_000_000)));
    }

    #[test]
    fn info_counts_what_is_left() {
        let mut s = stream();
        for subj in ["a.x", "a.y", "a.x", "a.x"] {
            put(&mut s, 0, subj);
        }
        let mut c = consumer(&s, |c| c.filter = vec!["a.x".into()]);
        deliver(&mut c, 0, &s);
        let i = c.info(&s);
        assert_eq!(i.num_pending, 2);
        assert_eq!(i.num_ack_pending, 1);
        assert_eq!(i.delivered_stream_seq, 1);
        assert_eq!(i.ack_floor, 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(u8),
        Next,
        Ack(u8),
        Nak(u8),
        Tick(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..3).prop_map(Op::Put),
            4 => Just(Op::Next),
            3 => any::<u8>().prop_map(Op::Ack),
            1 => any::<u8>().prop_map(Op::Nak),
            1 => (0u16..300).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Whatever the order of publishes, deliveries, acks, naks and
        /// timeouts: nothing is delivered a first time twice, pending stays
        /// within its bound, and once everything is delivered and acked
        /// every matching message was acknowledged exactly once.
        #[test]
        fn nothing_is_lost_or_delivered_twice(
            ops in proptest::collection::vec(op(), 1..200),
            max_ack_pending in 1u32..5,
            filtered in any::<bool>(),
        ) {
            let mut s = stream();
            let mut c = consumer(&s, |c| {
                c.ack_wait = Millis(100);
                c.max_ack_pending = max_ack_pending;
                if filtered { c.filter = vec!["a.s0".into(), "a.s1".into()]; }
            });
            let mut now = 0u64;
            let mut firsts = BTreeSet::new();
            let mut acked = BTreeSet::new();
            let mut outstanding: Vec<u64> = Vec::new();
            let wanted = |subject: u8| !filtered || subject < 2;
            let mut want = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Put(k) => {
                        let seq = put(&mut s, now, &format!("a.s{k}"));
                        if wanted(k) { want.insert(seq); }
                    }
                    Op::Next => {
                        if let Next::Deliver(d) = c.next(Millis(now), &s) {
                            prop_assert!(want.contains(&d.stream_seq));
                            prop_assert!(!acked.contains(&d.stream_seq));
                            if d.deliveries == 1 {
                                prop_assert!(firsts.insert(d.stream_seq), "first delivery twice");
                            }
                            outstanding.push(d.stream_seq);
                        }
                    }
                    Op::Ack(i) if !outstanding.is_empty() => {
                        let seq = outstanding.remove(i as usize % outstanding.len());
                        if c.ack(seq, Millis(now)).is_ok() {
                            prop_assert!(acked.insert(seq));
                        }
                    }
                    Op::Nak(i) if !outstanding.is_empty() => {
                        let seq = outstanding[i as usize % outstanding.len()];
                        let _ = c.nak(seq, Millis::ZERO, Millis(now));
                    }
                    Op::Tick(dt) => {
                        now += u64::from(dt);
                        c.handle_timeout(Millis(now));
                    }
                    _ => {}
                }
                prop_assert!(c.num_pending_acks() <= max_ack_pending as usize);
            }
            // Drain: deliver and ack everything, letting timers run.
            for _ in 0..10_000 {
                match c.next(Millis(now), &s) {
                    Next::Deliver(d) => {
                        if c.ack(d.stream_seq, Millis(now)).is_ok() {
                            prop_assert!(acked.insert(d.stream_seq));
                        }
                    }
                    _ => {
                        if c.num_pending_acks() == 0 { break; }
                        now += 100;
                        c.handle_timeout(Millis(now));
                    }
                }
            }
            prop_assert_eq!(acked, want);
        }
    }
}
