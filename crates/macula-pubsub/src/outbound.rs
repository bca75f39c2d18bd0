//! Per-peer outbound queues: bounded by count and bytes, each drained by
//! one sender the driver runs, with the stall cut-off and the graceful
//! finish decided here.
//!
//! Queues live in a slab addressed by [`PeerRef`] (index and generation), so
//! a cached route reaches its targets' queues without hashing a node ID,
//! and a retired queue is recognised by its generation. A sender is only
//! asked to run while its queue has work ([`Enqueued::Started`]). This module
//! must not know about topics, interest or time sources; `now` is always an
//! argument.

use std::collections::{HashMap, VecDeque};

use macula_wire::{Millis, NodeId};

use crate::batch::OutMsg;
use crate::loss::LossReport;

/// Messages queued for one remote node; past this a publish does what its
/// `Overflow` says: waits for room (`Block`, the default; the stall cut-off
/// bounds the wait), drops the oldest or the newest (counted, and reported
/// to the node), or fails (`FailFast`).
pub const PEER_QUEUE_CAPACITY: usize = 65_536;
/// Payload bytes queued for one remote node; past this, as for
/// `PEER_QUEUE_CAPACITY`.
pub const PEER_QUEUE_BYTES: usize = 32 << 20;
/// Remote nodes with an outbound queue at once.
pub const MAX_OUTBOUND_PEERS: usize = 65_536;
/// A peer whose pub/sub data stream accepts no bytes for this long is cut
/// off (stream reset, queue dropped, counted).
pub const PEER_STALL_TIMEOUT: Millis = Millis::from_secs(10);
/// An outbound queue to one node is retired (its sender exits) after this
/// long without traffic.
pub const SENDER_IDLE: Millis = Millis::from_secs(60);

/// One peer's queue: slab index and generation. A retired queue's slot gets
/// a new generation, so a stale `PeerRef` never reaches its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerRef {
    idx: u32,
    gen: u32,
}

/// What happened to one message offered to a peer's queue. Not
/// `#[non_exhaustive]`: a flow-control policy (wait for room, drop oldest)
/// must see every outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued behind others; the sender already has work.
    Queued,
    /// Queued into an empty queue whose sender is idle: wake it
    /// ([`crate::Action::Wake`] was emitted).
    Woke,
    /// Queued into a queue with no sender yet: start one
    /// ([`crate::Action::Start`] was emitted).
    Started,
    /// Dropped: the queue holds its limit of messages.
    FullCount,
    /// Dropped: the queue holds its limit of bytes.
    FullBytes,
    /// Dropped: there is no queue (the outbound-peer limit is reached, or
    /// the peer was retired).
    NoQueue,
}

impl Enqueued {
    /// The message is in the queue.
    pub fn is_queued(self) -> bool {
        matches!(self, Enqueued::Queued | Enqueued::Woke | Enqueued::Started)
    }
}

/// What a sender finds when it asks for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// This many messages were appended to the sender's buffer: encode and
    /// write them, then report with `handle_written`.
    Msgs(usize),
    /// Nothing queued, and graceful shutdown asked for the end: finish the
    /// stream, wait (bounded) for the peer to acknowledge it, report with
    /// `handle_finished`.
    Finish,
    /// Nothing queued: wait for a wake (or the idle timeout).
    Empty,
    /// The queue was retired (cut off, unreachable, idle): exit.
    Retired,
}

/// The verdict on a write that has made no progress for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// Still within the stall timeout: wait until this time at most.
    Wait(Millis),
    /// Cut off: reset the stream and exit. The queue is retired and the
    /// messages it held, and those being written, were counted dropped.
    CutOff { dropped: u64 },
}

/// Bounds of the outbound side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutLimits {
    /// See [`PEER_QUEUE_CAPACITY`].
    pub queue_capacity: usize,
    /// See [`PEER_QUEUE_BYTES`].
    pub queue_bytes: usize,
    /// See [`MAX_OUTBOUND_PEERS`].
    pub max_peers: usize,
    /// Payload bytes per batch before the receiver's frame limit (see
    /// [`crate::batch::BATCH_BYTES`]).
    pub batch_bytes: usize,
    /// See [`PEER_STALL_TIMEOUT`].
    pub stall_timeout: Millis,
    /// See [`SENDER_IDLE`].
    pub sender_idle: Millis,
}

impl Default for OutLimits {
    fn default() -> Self {
        OutLimits {
            queue_capacity: PEER_QUEUE_CAPACITY,
            queue_bytes: PEER_QUEUE_BYTES,
            max_peers: MAX_OUTBOUND_PEERS,
            batch_bytes: crate::batch::BATCH_BYTES,
            stall_timeout: PEER_STALL_TIMEOUT,
            sender_idle: SENDER_IDLE,
        }
    }
}

pub(crate) struct PeerOut<W> {
    pub(crate) node: NodeId,
    msgs: VecDeque<OutMsg>,
    bytes: usize,
    /// Messages handed to the sender and not yet reported.
    taken: usize,
    /// The receiver's frame limit (its HELLO); the wire default until known.
    frame_limit: u32,
    /// The driver's handle to wake this queue's sender.
    sender: W,
    /// A sender was asked to start and has not exited.
    running: bool,
    last_active: Millis,
    /// Set while a write is pending: when it last made progress.
    progress: Option<Millis>,
    /// Graceful shutdown: finish the stream once the queue is empty.
    finish: bool,
}

impl<W> PeerOut<W> {
    /// An empty queue takes any one message (a payload larger than the byte
    /// limit must not block forever); otherwise both limits apply.
    fn full(&self, limits: &OutLimits, len: usize) -> Option<Enqueued> {
        if self.msgs.is_empty() {
            None
        } else if self.msgs.len() >= limits.queue_capacity {
            Some(Enqueued::FullCount)
        } else if self.bytes + len > limits.queue_bytes {
            Some(Enqueued::FullBytes)
        } else {
            None
        }
    }
}

struct Slot<W> {
    gen: u32,
    peer: Option<PeerOut<W>>,
}

/// What the outbound side asks of the driver (through the core's actions).
pub(crate) enum Wake<W> {
    Start(PeerRef, NodeId, W),
    Wake(W),
}

/// Every outbound queue of one node.
pub(crate) struct Outbound<W> {
    slots: Vec<Slot<W>>,
    free: Vec<u32>,
    by_node: HashMap<NodeId, u32>,
    pub(crate) limits: OutLimits,
    /// Messages queued or being written, not yet reported.
    inflight: u64,
    /// What each receiver missed and has not been told yet (see
    /// [`crate::loss`]); kept across a cut-off, dropped with the node.
    reports: HashMap<NodeId, LossReport>,
    /// Drops that could not be put in a report (the report table was full).
    pub(crate) unreported: u64,
}

/// What retiring a queue dropped.
pub(crate) struct Retired {
    pub(crate) dropped: u64,
}

impl<W: Clone + Default> Outbound<W> {
    pub(crate) fn new(limits: OutLimits) -> Self {
        Outbound {
            slots: Vec::new(),
            free: Vec::new(),
            by_node: HashMap::new(),
            limits,
            inflight: 0,
            reports: HashMap::new(),
            unreported: 0,
        }
    }

    fn peer(&self, r: PeerRef) -> Option<&PeerOut<W>> {
        let slot = self.slots.get(r.idx as usize)?;
        (slot.gen == r.gen).then_some(slot.peer.as_ref()?)
    }

    fn peer_mut(&mut self, r: PeerRef) -> Option<&mut PeerOut<W>> {
        let slot = self.slots.get_mut(r.idx as usize)?;
        if slot.gen != r.gen {
            return None;
        }
        slot.peer.as_mut()
    }

    /// The live queue to `node`, if any.
    pub(crate) fn get(&self, node: &NodeId) -> Option<PeerRef> {
        let idx = *self.by_node.get(node)?;
        let gen = self.slots[idx as usize].gen;
        Some(PeerRef { idx, gen })
    }

    /// The node `r` sends to, if `r` is live.
    pub(crate) fn node_of(&self, r: PeerRef) -> Option<NodeId> {
        self.peer(r).map(|p| p.node)
    }

    /// `r` still names a live queue.
    pub(crate) fn is_live(&self, r: PeerRef) -> bool {
        self.peer(r).is_some()
    }

    /// The queue to `node`, created if there is room (`None`: the
    /// outbound-peer limit is reached).
    pub(crate) fn queue_for(
        &mut self,
        node: NodeId,
        frame_limit: u32,
        now: Millis,
    ) -> Option<PeerRef> {
        if let Some(r) = self.get(&node) {
            return Some(r);
        }
        if self.by_node.len() >= self.limits.max_peers {
            return None;
        }
        let peer = PeerOut {
            node,
            msgs: VecDeque::new(),
            bytes: 0,
            taken: 0,
            frame_limit,
            sender: W::default(),
            running: false,
            last_active: now,
            progress: None,
            finish: false,
        };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slots[idx as usize].peer = Some(peer);
                idx
            }
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    peer: Some(peer),
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.by_node.insert(node, idx);
        Some(PeerRef {
            idx,
            gen: self.slots[idx as usize].gen,
        })
    }

    /// Offers `msg` to `r`'s queue. On `Started`/`Woke`, `wake` holds what
    /// the driver must do.
    pub(crate) fn enqueue(
        &mut self,
        r: PeerRef,
        msg: OutMsg,
        now: Millis,
        wake: &mut Option<Wake<W>>,
    ) -> Enqueued {
        let limits = self.limits;
        let len = msg.payload.len();
        let Some(p) = self.peer_mut(r) else {
            return Enqueued::NoQueue;
        };
        if let Some(full) = p.full(&limits, len) {
            let node = p.node;
            self.note_loss(node, |rep| rep.add(&msg, 1));
            return full;
        }
        let was_empty = p.msgs.is_empty();
        p.msgs.push_back(msg);
        p.bytes += len;
        p.last_active = now;
        let outcome = if !p.running {
            p.running = true;
            *wake = Some(Wake::Start(r, p.node, p.sender.clone()));
            Enqueued::Started
        } else if was_empty {
            *wake = Some(Wake::Wake(p.sender.clone()));
            Enqueued::Woke
        } else {
            Enqueued::Queued
        };
        self.inflight += 1;
        outcome
    }

    /// Why `r`'s queue cannot take a message of `len` payload bytes now
    /// (`None`: it can, or `r` is not live).
    pub(crate) fn full(&self, r: PeerRef, len: usize) -> Option<Enqueued> {
        self.peer(r)?.full(&self.limits, len)
    }

    /// Messages and payload bytes queued to `r` now.
    pub(crate) fn queued(&self, r: PeerRef) -> (usize, usize) {
        self.peer(r).map_or((0, 0), |p| (p.msgs.len(), p.bytes))
    }

    /// Drops the oldest messages queued to `r` until a message of `len`
    /// payload bytes fits; returns how many were dropped.
    pub(crate) fn evict_for(&mut self, r: PeerRef, len: usize) -> u64 {
        let limits = self.limits;
        let Some(p) = self.peer_mut(r) else {
            return 0;
        };
        let node = p.node;
        let mut evicted = Vec::new();
        while p.full(&limits, len).is_some() {
            let Some(old) = p.msgs.pop_front() else { break };
            p.bytes -= old.payload.len();
            evicted.push(old);
        }
        let n = evicted.len() as u64;
        self.inflight -= n;
        if n > 0 {
            self.note_loss(node, |rep| evicted.iter().for_each(|m| rep.add(m, 1)));
        }
        n
    }

    /// Records in `node`'s pending report what `add` adds (if the report
    /// table has room; else the drops are counted in `unreported`).
    pub(crate) fn note_loss(&mut self, node: NodeId, add: impl FnOnce(&mut LossReport)) {
        let room = self.reports.len() < self.limits.max_peers;
        match self.reports.get_mut(&node) {
            Some(rep) => add(rep),
            None if room => {
                let mut rep = LossReport::default();
                add(&mut rep);
                if !rep.is_empty() {
                    self.reports.insert(node, rep);
                }
            }
            None => {
                let mut rep = LossReport::default();
                add(&mut rep);
                self.unreported += rep.dropped() + rep.in_flight;
            }
        }
    }

    /// Takes `node`'s pending report, if any.
    pub(crate) fn take_report(&mut self, node: &NodeId) -> Option<LossReport> {
        self.reports.remove(node)
    }

    /// Whether `node` has a report waiting.
    pub(crate) fn has_report(&self, node: &NodeId) -> bool {
        self.reports.contains_key(node)
    }

    /// Forgets `node`'s pending report (the node is gone, or this node is
    /// shutting down); returns the messages it named.
    pub(crate) fn forget_report(&mut self, node: &NodeId) -> u64 {
        self.reports
            .remove(node)
            .map_or(0, |r| r.dropped() + r.in_flight)
    }

    /// Makes sure a sender runs for `r` (a report waits for it): like a
    /// message into an empty queue.
    pub(crate) fn kick(&mut self, r: PeerRef, wake: &mut Option<Wake<W>>) {
        let Some(p) = self.peer_mut(r) else { return };
        if !p.running {
            p.running = true;
            *wake = Some(Wake::Start(r, p.node, p.sender.clone()));
        } else if p.msgs.is_empty() {
            *wake = Some(Wake::Wake(p.sender.clone()));
        }
    }

    /// Moves what `r` has queued into `out` (see [`Take`]).
    pub(crate) fn take(&mut self, r: PeerRef, out: &mut Vec<OutMsg>, now: Millis) -> Take {
        let report = self
            .node_of(r)
            .is_some_and(|n| self.reports.contains_key(&n));
        let Some(p) = self.peer_mut(r) else {
            return Take::Retired;
        };
        if p.msgs.is_empty() {
            return if p.finish {
                Take::Finish
            } else if report {
                // Only a loss report to write.
                Take::Msgs(0)
            } else {
                Take::Empty
            };
        }
        let n = p.msgs.len();
        out.extend(p.msgs.drain(..));
        p.bytes = 0;
        p.taken += n;
        p.last_active = now;
        p.progress.get_or_insert(now);
        Take::Msgs(n)
    }

    /// The receiver's frame limit for `r`'s messages.
    pub(crate) fn frame_limit(&self, r: PeerRef) -> Option<u32> {
        self.peer(r).map(|p| p.frame_limit)
    }

    /// `node` announced `limit` (its HELLO).
    pub(crate) fn set_frame_limit(&mut self, node: &NodeId, limit: u32) {
        if let Some(r) = self.get(node) {
            if let Some(p) = self.peer_mut(r) {
                p.frame_limit = limit;
            }
        }
    }

    /// The sender wrote `n` taken messages (or gave up on them); returns how
    /// many of them it had taken at all (a retired queue: 0).
    pub(crate) fn written(&mut self, r: PeerRef, n: usize, now: Millis) -> usize {
        let Some(p) = self.peer_mut(r) else {
            return 0;
        };
        let n = n.min(p.taken);
        p.taken -= n;
        p.last_active = now;
        p.progress = None;
        self.inflight -= n as u64;
        n
    }

    /// The pending write accepted bytes.
    pub(crate) fn progress(&mut self, r: PeerRef, now: Millis) {
        if let Some(p) = self.peer_mut(r) {
            p.progress = Some(now);
        }
    }

    /// When the pending write of `r` is cut off unless it progresses.
    pub(crate) fn stall_deadline(&self, r: PeerRef) -> Option<Millis> {
        let p = self.peer(r)?;
        Some(p.progress?.saturating_add(self.limits.stall_timeout))
    }

    /// The stall verdict at `now` (see [`Stall`]).
    pub(crate) fn check_stall(&mut self, r: PeerRef, now: Millis) -> Stall {
        match self.stall_deadline(r) {
            Some(deadline) if now < deadline => Stall::Wait(deadline),
            Some(_) => Stall::CutOff {
                dropped: self.retire_reporting(r).dropped,
            },
            // No write pending (or already retired): nothing to cut.
            None => Stall::Wait(now.saturating_add(self.limits.stall_timeout)),
        }
    }

    /// Retires `r`'s queue if it has been idle for `sender_idle`.
    pub(crate) fn retire_if_idle(&mut self, r: PeerRef, now: Millis) -> bool {
        let idle = self.limits.sender_idle;
        let Some(p) = self.peer(r) else {
            return true;
        };
        if p.msgs.is_empty()
            && p.taken == 0
            && !self.reports.contains_key(&p.node)
            && now.saturating_sub(p.last_active) >= idle
        {
            self.retire(r);
            return true;
        }
        false
    }

    /// Removes `r`'s queue like `retire`, noting the messages it held in
    /// its node's report (the node is still there: it will be told).
    pub(crate) fn retire_reporting(&mut self, r: PeerRef) -> Retired {
        let queued: Vec<OutMsg> = match self.peer_mut(r) {
            Some(p) => p.msgs.drain(..).collect(),
            None => Vec::new(),
        };
        let node = self.node_of(r);
        let mut retired = self.retire(r);
        retired.dropped += queued.len() as u64;
        self.inflight -= queued.len() as u64;
        if let (Some(node), false) = (node, queued.is_empty()) {
            self.note_loss(node, |rep| queued.iter().for_each(|m| rep.add(m, 1)));
        }
        retired
    }

    /// Removes `r`'s queue; what it held or was writing is dropped.
    pub(crate) fn retire(&mut self, r: PeerRef) -> Retired {
        let Some(slot) = self.slots.get_mut(r.idx as usize) else {
            return Retired { dropped: 0 };
        };
        if slot.gen != r.gen {
            return Retired { dropped: 0 };
        }
        let Some(p) = slot.peer.take() else {
            return Retired { dropped: 0 };
        };
        slot.gen = slot.gen.wrapping_add(1);
        self.free.push(r.idx);
        self.by_node.remove(&p.node);
        let dropped = (p.msgs.len() + p.taken) as u64;
        self.inflight -= dropped;
        Retired { dropped }
    }

    /// Graceful shutdown: every queue finishes once empty. Returns the
    /// wakes to deliver; queues whose sender never started are retired.
    pub(crate) fn begin_finish(&mut self) -> Vec<W> {
        let mut wakes = Vec::new();
        let mut idle = Vec::new();
        for (idx, slot) in self.slots.iter_mut().enumerate() {
            if let Some(p) = &mut slot.peer {
                p.finish = true;
                if p.running {
                    wakes.push(p.sender.clone());
                } else {
                    idle.push(PeerRef {
                        idx: idx as u32,
                        gen: slot.gen,
                    });
                }
            }
        }
        for r in idle {
            self.retire(r);
        }
        wakes
    }

    /// Queues asked to finish that have not yet.
    pub(crate) fn n_finishing(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.peer.as_ref().is_some_and(|p| p.finish))
            .count()
    }

    /// Messages queued or being written.
    pub(crate) fn inflight(&self) -> u64 {
        self.inflight
    }

    /// Live queues.
    pub(crate) fn len(&self) -> usize {
        self.by_node.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TopicName;
    use bytes::Bytes;

    type W = std::rc::Rc<()>;

    fn m(seq: u64, len: usize) -> OutMsg {
        OutMsg {
            seq,
            topic: TopicName::from("t"),
            payload: Bytes::from(vec![0; len]),
            extra: None,
            origin: None,
            seal: None,
        }
    }

    fn node(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn out(limits: OutLimits) -> Outbound<W> {
        Outbound::new(limits)
    }

    #[test]
    fn the_first_message_starts_a_sender_then_an_empty_queue_wakes_it() {
        let mut o = out(OutLimits::default());
        let r = o.queue_for(node(1), 1000, Millis(0)).unwrap();
        let mut wake = None;
        assert_eq!(
            o.enqueue(r, m(1, 1), Millis(0), &mut wake),
            Enqueued::Started
        );
        assert!(matches!(wake.take(), Some(Wake::Start(rr, n, _)) if rr == r && n == node(1)));
        assert_eq!(
            o.enqueue(r, m(2, 1), Millis(0), &mut wake),
            Enqueued::Queued
        );
        assert!(wake.is_none());
        let mut buf = Vec::new();
        assert_eq!(o.take(r, &mut buf, Millis(1)), Take::Msgs(2));
        assert_eq!(o.take(r, &mut buf, Millis(1)), Take::Empty);
        assert_eq!(o.enqueue(r, m(3, 1), Millis(2), &mut wake), Enqueued::Woke);
        assert!(matches!(wake.take(), Some(Wake::Wake(_))));
        assert_eq!(o.inflight(), 3);
        assert_eq!(o.written(r, 2, Millis(3)), 2);
        assert_eq!(o.inflight(), 1);
        // A report for more than was taken counts only what was.
        assert_eq!(o.take(r, &mut buf, Millis(3)), Take::Msgs(1));
        assert_eq!(o.written(r, 5, Millis(3)), 1);
        assert_eq!(o.inflight(), 0);
    }

    #[test]
    fn queues_are_bounded_by_count_and_bytes() {
        let mut o = out(OutLimits {
            queue_capacity: 3,
            queue_bytes: 100,
            ..OutLimits::default()
        });
        let r = o.queue_for(node(1), 1000, Millis(0)).unwrap();
        let mut w = None;
        assert!(o.enqueue(r, m(1, 60), Millis(0), &mut w).is_queued());
        assert_eq!(
            o.enqueue(r, m(2, 41), Millis(0), &mut w),
            Enqueued::FullBytes
        );
        assert!(o.enqueue(r, m(3, 40), Millis(0), &mut w).is_queued());
        assert!(o.enqueue(r, m(4, 0), Millis(0), &mut w).is_queued());
        assert_eq!(
            o.enqueue(r, m(5, 0), Millis(0), &mut w),
            Enqueued::FullCount
        );
        assert_eq!(o.inflight(), 3);
        // Taking frees the room.
        let mut buf = Vec::new();
        assert_eq!(o.take(r, &mut buf, Millis(0)), Take::Msgs(3));
        assert!(o.enqueue(r, m(6, 100), Millis(0), &mut w).is_queued());
        assert!(!Enqueued::FullCount.is_queued());
        assert!(!Enqueued::NoQueue.is_queued());
    }

    #[test]
    fn the_outbound_peer_limit_holds_and_retired_slots_are_reused() {
        let mut o = out(OutLimits {
            max_peers: 2,
            ..OutLimits::default()
        });
        let a = o.queue_for(node(1), 1000, Millis(0)).unwrap();
        let b = o.queue_for(node(2), 1000, Millis(0)).unwrap();
        assert_eq!(o.queue_for(node(1), 1000, Millis(0)), Some(a));
        assert_eq!(o.queue_for(node(3), 1000, Millis(0)), None);
        assert_eq!(o.len(), 2);
        o.retire(a);
        assert!(!o.is_live(a) && o.is_live(b));
        let c = o.queue_for(node(3), 1000, Millis(0)).unwrap();
        assert_ne!(c, a, "same slot, new generation");
        let mut w = None;
        assert_eq!(o.enqueue(a, m(1, 1), Millis(0), &mut w), Enqueued::NoQueue);
        let mut buf = Vec::new();
        assert_eq!(o.take(a, &mut buf, Millis(0)), Take::Retired);
        assert_eq!(o.get(&node(3)), Some(c));
        assert_eq!(o.get(&node(1)), None);
    }

    #[test]
    fn a_write_without_progress_is_cut_off_at_the_stall_timeout() {
        let mut o = out(OutLimits {
            stall_timeout: Millis(100),
            ..OutLimits::default()
        });
        let r = o.queue_for(node(1), 1000, Millis(0)).unwrap();
        let mut w = None;
        for s in 1..=3 {
            o.enqueue(r, m(s, 1), Millis(0), &mut w);
        }
        assert_eq!(o.stall_deadline(r), None, "no write pending");
        let mut buf = Vec::new();
        assert_eq!(o.take(r, &mut buf, Millis(10)), Take::Msgs(3));
        assert_eq!(o.stall_deadline(r), Some(Millis(110)));
        assert_eq!(o.check_stall(r, Millis(109)), Stall::Wait(Millis(110)));
        o.progress(r, Millis(50));
        assert_eq!(o.check_stall(r, Millis(110)), Stall::Wait(Millis(150)));
        o.enqueue(r, m(4, 1), Millis(120), &mut w);
        assert_eq!(o.check_stall(r, Millis(150)), Stall::CutOff { dropped: 4 });
        assert!(!o.is_live(r));
        assert_eq!(o.inflight(), 0);
        // The sender's late report changes nothing.
        assert_eq!(o.written(r, 3, Millis(151)), 0);
        assert_eq!(o.inflight(), 0);
        assert_eq!(o.check_stall(r, Millis(151)), Stall::Wait(Millis(251)));
    }

    #[test]
    fn an_idle_queue_is_retired_only_when_empty_and_quiet() {
        let mut o = out(OutLimits {
            sender_idle: Millis(1000),
            ..OutLimits::default()
        });
        let r = o.queue_for(node(1), 1000, Millis(0)).unwrap();
        let mut w = None;
        o.enqueue(r, m(1, 1), Millis(0), &mut w);
        assert!(!o.retire_if_idle(r, Millis(5000)), "a message waits");
        let mut buf = Vec::new();
        o.take(r, &mut buf, Millis(100));
        assert!(!o.retire_if_idle(r, Millis(5000)), "a write is pending");
        o.written(r, 1, Millis(200));
        assert!(!o.retire_if_idle(r, Millis(1199)));
        assert!(o.retire_if_idle(r, Millis(1200)));
        assert!(!o.is_live(r));
        assert!(o.retire_if_idle(r, Millis(1200)), "already gone");
    }

    #[test]
    fn finishing_drains_first_and_retires_unstarted_queues() {
        let mut o = out(OutLimits::default());
        let a = o.queue_for(node(1), 1000, Millis(0)).unwrap();
        let b = o.queue_for(node(2), 1000, Millis(0)).unwrap();
        let mut w = None;
        o.enqueue(a, m(1, 1), Millis(0), &mut w);
        let wakes = o.begin_finish();
        assert_eq!(wakes.len(), 1, "only a running sender is woken");
        assert!(!o.is_live(b), "never started: retired at once");
        assert_eq!(o.n_finishing(), 1);
        let mut buf = Vec::new();
        assert_eq!(o.take(a, &mut buf, Millis(1)), Take::Msgs(1));
        assert_eq!(o.take(a, &mut buf, Millis(1)), Take::Finish);
        o.retire(a);
        assert_eq!(o.n_finishing(), 0);
    }

    #[test]
    fn frame_limits_follow_the_peer() {
        let mut o = out(OutLimits::default());
        let r = o.queue_for(node(1), 1000, Millis(0)).unwrap();
        assert_eq!(o.frame_limit(r), Some(1000));
        o.set_frame_limit(&node(1), 4096);
        o.set_frame_limit(&node(9), 1);
        assert_eq!(o.frame_limit(r), Some(4096));
        o.retire(r);
        assert_eq!(o.frame_limit(r), None);
    }
}
