//! Inbound batches: checked, deduplicated once per batch, matched once per
//! topic, grouped per subscription, payloads sliced from the frame.
//!
//! [`BatchReceiver`] is the per-stream state (validated topics, buffers
//! reused from batch to batch) and, after [`PubSubCore::handle_batch`],
//! holds the events for local subscriptions until the driver pushes them
//! with [`BatchReceiver::deliver`] (outside its lock). Events for attached
//! clients go straight into the clients' outbound queues. This module must
//! not trust anything in the batch beyond what the wire decoder checked.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use macula_wire::{Millis, NodeId, PublishBatchView, PublishDropped};

use crate::batch::{forwarded_key, Origin, OutMsg};
use crate::core::{PubSubCore, RoleState};
use crate::counters::Counters;
use crate::dedup::Observed;
use crate::event::{Event, Overflow, PublishOptions, TopicName};
use crate::interest::Route;
use crate::local::{FeedId, SubId, Target};
use crate::proof::{KeyCache, Proof, ProofError, SealPlaces, Verified};
use crate::topic::Topic;
use crate::Limits;

/// Topics a data stream's receiver remembers as validated.
pub const RECEIVER_TOPIC_CACHE: usize = 256;
/// Peers whose reset data stream waits for its in-flight count (or the
/// reverse) at once; past this the table starts over.
pub const MAX_IN_FLIGHT_PEERS: usize = 4096;

struct Resolved {
    name: TopicName,
    topic: Arc<Topic>,
    /// Indices into `targets` of the local subscriptions it matches.
    locals: Vec<usize>,
    feeds: Vec<FeedId>,
}

/// Per-data-stream receive state (see the module docs).
pub struct BatchReceiver<S> {
    topics: HashMap<Box<str>, (TopicName, Arc<Topic>)>,
    /// Per topic of the current batch (`None`: invalid topic).
    resolved: Vec<Option<Resolved>>,
    keep: Vec<bool>,
    idx: Vec<usize>,
    targets: Vec<(SubId, S, Vec<Event>)>,
    /// Event vectors kept for the next batch (their capacity is reused).
    spare: Vec<Vec<Event>>,
    /// The sender is an attached client (this node is its gateway): its
    /// messages go on into the mesh, so one that matches nothing here is
    /// not counted as unmatched.
    from_client: bool,
    /// Missed events to tell local subscriptions (from loss reports), per
    /// subscription: pushed with [`BatchReceiver::deliver_lagged`].
    lagged: Vec<(SubId, S, u64)>,
    /// Messages in the batches read on this stream, plus the dropped
    /// messages its loss reports named (compared with what a sender that
    /// reset the stream says it wrote).
    messages: u64,
    /// Trace context for the copies this node forwards of the next batch
    /// (to attached clients' feeds): entry index and the `traceparent` its
    /// copies carry instead of the publisher's (a gateway's forwarding
    /// span). Set by the driver before it hands the batch over, when it
    /// traces; empty: copies carry the publisher's headers unchanged.
    pub retrace: Vec<(usize, String)>,
    /// The last batch's entries' places in their seals (empty: it was not
    /// sealed): what a gateway forwarding it sends along
    /// ([`PubSubCore::forward_from_client`]).
    pub seals: SealPlaces,
    /// Why the last batch's publisher was not proved, if it (or, for a
    /// batch with several seals, some of its messages) was dropped for
    /// that (the driver logs it).
    pub unproved: Option<ProofError>,
    /// The entries of the last batch whose seal did not verify (a batch
    /// with several seals, others of which did): dropped and counted.
    failed: Vec<std::ops::Range<usize>>,
    /// Publishers' keys decoded for the seals of this stream's batches.
    keys: KeyCache,
    /// The seals of the next batch, verified by [`BatchReceiver::prove_ahead`]
    /// before the core was locked: the body's address and length, and the
    /// outcome.
    ahead: Option<Ahead>,
}

/// A batch's seals verified ahead: its body's address and length, and the
/// outcome.
type Ahead = (usize, usize, Result<Verified, ProofError>);

impl<S> BatchReceiver<S> {
    /// Receive state for one data stream; `from_client` when its sender is
    /// an attached client.
    pub fn new(from_client: bool) -> Self {
        BatchReceiver {
            topics: HashMap::new(),
            resolved: Vec::new(),
            keep: Vec::new(),
            idx: Vec::new(),
            targets: Vec::new(),
            spare: Vec::new(),
            from_client,
            lagged: Vec::new(),
            messages: 0,
            retrace: Vec::new(),
            seals: SealPlaces::default(),
            unproved: None,
            failed: Vec::new(),
            keys: KeyCache::default(),
            ahead: None,
        }
    }

    /// Verifies the seals of a forwarded batch from `from` (a
    /// PUBLISH_BATCH naming another publisher), `view` decoded from `body`,
    /// now, so that the driver can do it before it locks the core: the
    /// signature check, the costly part of a sealed batch, then holds
    /// nothing up. The next [`PubSubCore::handle_batch_view`] (or
    /// [`PubSubCore::handle_batch`]) of this very `body` takes the outcome
    /// (and drops the batch if it did not verify); anything else is
    /// verified there as before. Nothing to do for other batches. The
    /// driver decodes each frame once and hands the same view to both.
    pub fn prove_ahead(&mut self, from: NodeId, view: &PublishBatchView<'_>, body: &Bytes) {
        self.ahead = None;
        if self.from_client || view.publisher == from || view.seals.is_empty() {
            return;
        }
        let proved = crate::proof::verify_each_with(view, Some(body), &mut self.keys);
        self.ahead = Some((body.as_ptr() as usize, body.len(), proved));
    }

    /// The seals of `view` (from `body`) verified: by
    /// [`BatchReceiver::prove_ahead`] if it saw this body, else now.
    fn verified(
        &mut self,
        ahead: Option<Ahead>,
        view: &PublishBatchView<'_>,
        body: &Bytes,
    ) -> Result<Verified, ProofError> {
        match ahead {
            Some((at, len, proved)) if at == body.as_ptr() as usize && len == body.len() => proved,
            _ => crate::proof::verify_each_with(view, Some(body), &mut self.keys),
        }
    }

    /// Messages in the batches read on this stream so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// A batch of `n` messages was read but refused whole before the core
    /// saw it (the realm's permissions): it still counts as read, so a
    /// stream reset does not report it lost in flight.
    pub fn count_refused(&mut self, n: u64) {
        self.messages += n;
    }

    fn tell(&mut self, id: SubId, sink: &S, n: u64)
    where
        S: Clone,
    {
        match self.lagged.iter_mut().find(|l| l.0 == id) {
            Some(l) => l.2 += n,
            None => self.lagged.push((id, sink.clone(), n)),
        }
    }

    /// Hands each local subscription's count of missed events (from loss
    /// reports, see [`PubSubCore::handle_batch`] and
    /// [`PubSubCore::handle_stream_reset`]) to `push`; returns the sum.
    /// The driver adds them to the subscription's `Lagged` count, so the
    /// application learns of the gap before the events that follow it.
    pub fn deliver_lagged(&mut self, mut push: impl FnMut(&S, u64)) -> u64 {
        let mut n = 0;
        for (_, sink, missed) in self.lagged.drain(..) {
            n += missed;
            push(&sink, missed);
        }
        n
    }

    fn topic(&mut self, t: &str, limits: &Limits) -> Option<(TopicName, Arc<Topic>)> {
        if let Some(hit) = self.topics.get(t) {
            return Some(hit.clone());
        }
        let topic = Topic::with_limits(t, limits).ok()?;
        if self.topics.len() >= RECEIVER_TOPIC_CACHE {
            self.topics.clear();
        }
        let entry = (TopicName::from(t), Arc::new(topic));
        self.topics.insert(t.into(), entry.clone());
        Some(entry)
    }

    /// Topics remembered as validated (at most `RECEIVER_TOPIC_CACHE`).
    pub fn n_topics(&self) -> usize {
        self.topics.len()
    }

    /// Each local subscription the last batch goes to, with how many events
    /// and payload bytes it gets (before `deliver`): a driver that applies
    /// backpressure waits for room for them.
    pub fn pending(&self) -> impl Iterator<Item = (&S, usize, usize)> + '_ {
        self.targets.iter().map(|(_, sink, events)| {
            let bytes = events.iter().map(|e| e.payload.len()).sum();
            (sink, events.len(), bytes)
        })
    }

    /// Hands each local subscription's events of the last batch to `push`
    /// (in batch order; `push` drains them). Returns how many there were.
    pub fn deliver(&mut self, mut push: impl FnMut(&S, &mut Vec<Event>)) -> u64 {
        let mut n = 0;
        for (_, sink, mut events) in self.targets.drain(..) {
            n += events.len() as u64;
            push(&sink, &mut events);
            events.clear();
            if self.spare.len() < 16 {
                self.spare.push(events);
            }
        }
        n
    }
}

impl<S: Clone, W: Clone + Default> PubSubCore<S, W> {
    /// A frame from `from`'s pub/sub data stream. `Err` means the stream
    /// must be closed (not a PUBLISH_BATCH, or malformed); bad messages
    /// inside a well-formed batch (invalid topic, oversized payload) are
    /// dropped and counted instead. Local events wait in `rx` (see
    /// [`BatchReceiver::deliver`]).
    pub fn handle_batch(
        &mut self,
        from: NodeId,
        msg_type: u8,
        body: &Bytes,
        rx: &mut BatchReceiver<S>,
        now: Millis,
    ) -> Result<(), String> {
        if msg_type == macula_wire::MessageType::PublishBatch as u8 {
            let view = PublishBatchView::decode_shared(body);
            return self.handle_batch_view(
                from,
                body,
                view.as_ref().map_err(String::as_str),
                rx,
                now,
            );
        }
        // What `prove_ahead` verified holds for the next batch only.
        rx.ahead = None;
        if msg_type == macula_wire::MessageType::PublishDropped as u8 {
            return self.handle_dropped(from, body, rx, now);
        }
        self.counters.data_streams_rejected_total.inc();
        Err(format!(
            "message type {msg_type:#04x} on a pub/sub data stream"
        ))
    }

    /// [`PubSubCore::handle_batch`] of a PUBLISH_BATCH `body` the driver
    /// has decoded already (`view`: the decoder's answer, `Err` with why it
    /// is malformed), so that one decode serves
    /// [`BatchReceiver::prove_ahead`], this call and a gateway's forwarding.
    pub fn handle_batch_view(
        &mut self,
        from: NodeId,
        body: &Bytes,
        view: Result<&PublishBatchView<'_>, &str>,
        rx: &mut BatchReceiver<S>,
        now: Millis,
    ) -> Result<(), String> {
        let c = self.counters.clone();
        // What `prove_ahead` verified holds for this call only.
        let ahead = rx.ahead.take();
        let view = match view {
            Ok(v) => v,
            Err(reason) => {
                c.data_streams_rejected_total.inc();
                return Err(format!("malformed PUBLISH_BATCH: {reason}"));
            }
        };
        if rx.from_client && view.publisher != from {
            // A client publishes only as itself: a batch naming another
            // publisher is a forgery, refused whole (neither delivered here
            // nor to other clients, nor forwarded).
            c.data_streams_rejected_total.inc();
            return Err(format!(
                "PUBLISH_BATCH from client {from} names publisher {}",
                view.publisher
            ));
        }
        c.batches_received_total.inc();
        rx.messages += view.entries.len() as u64;
        // Who published it: proved by a seal, by the connection (the
        // sender is the publisher), or asserted by a client's gateway; a
        // forwarded batch whose publisher nothing proves is dropped whole.
        rx.unproved = None;
        let client = matches!(self.role, RoleState::Client(_));
        let proof = match self.prove(from, view, body, client, rx, ahead) {
            Ok(p) => p,
            Err(e) => {
                Counters::add(&c.unproved_dropped_total, view.entries.len() as u64);
                rx.seals.clear();
                rx.unproved = Some(e);
                return Ok(());
            }
        };
        // A batch naming another publisher is forwarded: by a gateway for
        // its client, or (to a client) by its gateway. A client trusts the
        // gateway it chose; a full node keeps such a stream apart from the
        // publisher's own (see `forwarded_key`).
        let key = if view.publisher == from || client {
            view.publisher
        } else {
            Counters::add(&c.forwarded_received_total, view.entries.len() as u64);
            forwarded_key(&view.publisher, &from)
        };
        self.deliver_batch(view, body, rx, (key, proof), from, now);
        Ok(())
    }

    /// How `view`'s publisher is known (see [`Proof`]); its seals' places
    /// go to `rx.seals`.
    fn prove(
        &self,
        from: NodeId,
        view: &PublishBatchView<'_>,
        body: &Bytes,
        client: bool,
        rx: &mut BatchReceiver<S>,
        ahead: Option<Ahead>,
    ) -> Result<Proof, ProofError> {
        rx.seals.clear();
        rx.failed.clear();
        if view.publisher == from && !client {
            // From the publisher itself (a client to its gateway): its
            // connection proves it; its seal goes on with the copies,
            // unverified here (their receivers verify it).
            rx.seals = match crate::proof::adopt(view, body) {
                Some(refs) => refs,
                None if !view.seals.is_empty() => crate::proof::verify(view).unwrap_or_default(),
                None => SealPlaces::default(),
            };
            return Ok(Proof::Connection);
        }
        if !view.seals.is_empty() {
            // Each seal on its own: a failed one drops its messages (in
            // `deliver_batch`), the whole batch if every seal failed.
            let v = rx.verified(ahead, view, body)?;
            if v.failed_entries() == view.entries.len() {
                return Err(v.failed.into_iter().next().map_or(
                    ProofError::BadSignature {
                        publisher: view.publisher,
                    },
                    |(_, e)| e,
                ));
            }
            rx.seals = v.refs;
            let mut failed = v.failed.into_iter();
            if let Some((r, e)) = failed.next() {
                rx.unproved = Some(e);
                rx.failed.push(r);
                rx.failed.extend(failed.map(|(r, _)| r));
            }
            return Ok(Proof::Signed);
        }
        if view.publisher == from {
            return Ok(Proof::Connection);
        }
        if client || !self.require_proof {
            return Ok(Proof::Asserted);
        }
        Err(ProofError::Unsealed {
            publisher: view.publisher,
        })
    }

    // ----- client: gateway failover ---------------------------------------

    /// A client lost gateway `gone`. Each publisher whose stream no other
    /// gateway had joined (see [`crate::SeqTracker::admit_source`]), or
    /// every publisher with `uncovered` (the client cannot tell that another
    /// gateway carried every event: its subscriptions there were too new),
    /// is watched: what it sent until another gateway carried it is lost
    /// without a report, so its next event through another gateway tells
    /// every local subscription `Lagged(n)`, `n` the sequence numbers
    /// skipped (exact when the client subscribes to all the publisher's
    /// topics, an upper bound otherwise). Not a client: nothing.
    pub fn gateway_lost(&mut self, gone: NodeId, uncovered: bool) {
        if matches!(self.role, RoleState::Client(_)) {
            match uncovered {
                true => self.seen.watch_all(gone),
                false => self.seen.source_gone(gone),
            }
        }
    }

    /// A client attached to `gateway` (again): its events may join the
    /// publishers' streams.
    pub fn gateway_up(&mut self, gateway: &NodeId) {
        self.seen.source_up(gateway);
    }

    /// Publishers under a failover watch (see [`Self::gateway_lost`]).
    pub fn n_watched(&self) -> usize {
        self.seen.n_watched()
    }

    /// The sequence tracker's counters (failover watches included).
    pub fn seq_stats(&self) -> crate::SeqStats {
        self.seen.stats()
    }

    /// A watched publisher's first delivered arrival through `from` ended
    /// its watch with `missing` sequence numbers skipped: every local
    /// subscription is told (their topics are not known).
    fn tell_failover_gap(&mut self, missing: u64, rx: &mut BatchReceiver<S>) {
        for (id, sub) in &self.local.subs {
            if let Target::Local(sink) = &sub.target {
                rx.tell(*id, sink, missing);
            }
        }
    }

    /// A PUBLISH_DROPPED from `from`'s data stream: each local subscription
    /// matching a named topic is told of the messages it missed (all of
    /// them for a report naming no topic); attached clients get a report of
    /// their own; a gateway passes its client's report on to the nodes it
    /// routes that topic to.
    fn handle_dropped(
        &mut self,
        from: NodeId,
        body: &Bytes,
        rx: &mut BatchReceiver<S>,
        now: Millis,
    ) -> Result<(), String> {
        let c = self.counters.clone();
        let d = match PublishDropped::decode(body) {
            Ok(d) => d,
            Err(reason) => {
                c.data_streams_rejected_total.inc();
                return Err(format!("malformed PUBLISH_DROPPED: {reason}"));
            }
        };
        if rx.from_client && d.publisher != from {
            // A client reports only its own messages.
            c.data_streams_rejected_total.inc();
            return Err(format!(
                "PUBLISH_DROPPED from client {from} names publisher {}",
                d.publisher
            ));
        }
        let origin =
            (d.publisher != self.node_id).then(|| Arc::new(Origin::new(d.publisher, d.epoch)));
        // What the report names counts as carried on the stream, like the
        // messages of a batch (a reset stream's count includes it).
        rx.messages += d.topics.iter().map(|t| t.1).sum::<u64>();
        if d.in_flight > 0 {
            self.in_flight_reported(from, None, Some(d.in_flight), rx, now);
        }
        for (t, n) in &d.topics {
            if t.is_empty() {
                self.tell_all(origin.clone(), *n, rx, now);
                continue;
            }
            let Some((name, topic)) = rx.topic(t, &self.limits) else {
                c.remote_rejected_total.inc();
                continue;
            };
            for id in self.local.matches(&topic) {
                match self.local.subs.get(&id).map(|s| &s.target) {
                    Some(Target::Local(sink)) => {
                        let sink = sink.clone();
                        rx.tell(id, &sink, *n);
                    }
                    Some(Target::Feed(f)) => {
                        let f = *f;
                        self.report_to_feed(f, origin.clone(), &name, *n, now);
                    }
                    None => {}
                }
            }
            if rx.from_client {
                self.report_onward(from, origin.clone(), &name, *n, now);
            }
        }
        Ok(())
    }

    /// The data stream from `from` that `rx` read was reset by its sender
    /// for stalling (stream reset code 0x100): what the sender wrote on it
    /// beyond what was read was lost in flight. The sender says how much it
    /// wrote in its next loss report; whichever of the two comes second
    /// tells every local subscription (the lost messages' topics are not
    /// known).
    pub fn handle_stream_reset(&mut self, from: NodeId, rx: &mut BatchReceiver<S>, now: Millis) {
        let read = rx.messages;
        self.in_flight_reported(from, Some(read), None, rx, now);
    }

    fn in_flight_reported(
        &mut self,
        from: NodeId,
        read: Option<u64>,
        written: Option<u64>,
        rx: &mut BatchReceiver<S>,
        now: Millis,
    ) {
        if self.in_flight.len() >= MAX_IN_FLIGHT_PEERS && !self.in_flight.contains_key(&from) {
            self.in_flight.clear();
        }
        let slot = self.in_flight.entry(from).or_default();
        if read.is_some() {
            slot.0 = read;
        }
        if written.is_some() {
            slot.1 = written;
        }
        if let (Some(read), Some(written)) = *slot {
            self.in_flight.remove(&from);
            let lost = written.saturating_sub(read);
            if lost > 0 {
                self.tell_all(None, lost, rx, now);
            }
        }
    }

    /// Tells every local subscription and attached client that it may have
    /// missed `n` events (of `origin`'s, `None`: of the sender's).
    fn tell_all(
        &mut self,
        origin: Option<Arc<Origin>>,
        n: u64,
        rx: &mut BatchReceiver<S>,
        now: Millis,
    ) {
        let mut feeds = Vec::new();
        for (id, sub) in &self.local.subs {
            match &sub.target {
                Target::Local(sink) => rx.tell(*id, sink, n),
                Target::Feed(f) if !feeds.contains(f) => feeds.push(*f),
                Target::Feed(_) => {}
            }
        }
        let unnamed = TopicName::from("");
        for f in feeds {
            self.report_to_feed(f, origin.clone(), &unnamed, n, now);
        }
    }

    /// An attached client misses `n` events of `origin` on `topic` (`""`:
    /// any): its queue gets a loss report and its sender is woken.
    fn report_to_feed(
        &mut self,
        feed: FeedId,
        origin: Option<Arc<Origin>>,
        topic: &TopicName,
        n: u64,
        now: Millis,
    ) {
        let Some(client) = self.local.feeds.get(&feed).map(|f| f.client) else {
            return;
        };
        if origin.as_ref().is_some_and(|o| o.publisher == client) {
            return;
        }
        self.report_to(client, origin, topic, n, now);
    }

    /// A gateway: its client `from` dropped `n` messages on `topic` before
    /// they reached this node; the nodes this node routes `topic` to (a
    /// fresh cached route; none: nobody was interested lately) are told.
    fn report_onward(
        &mut self,
        from: NodeId,
        origin: Option<Arc<Origin>>,
        topic: &TopicName,
        n: u64,
        now: Millis,
    ) {
        let Some(route) = self.cached_route(topic, now) else {
            return;
        };
        for (node, _) in &route.targets {
            if *node != from {
                self.report_to(*node, origin.clone(), topic, n, now);
            }
        }
    }

    fn report_to(
        &mut self,
        node: NodeId,
        origin: Option<Arc<Origin>>,
        topic: &TopicName,
        n: u64,
        now: Millis,
    ) {
        self.out.note_loss(node, |r| r.add_topic(origin, topic, n));
        self.send_report(node, now);
        self.count_unreported();
    }

    fn deliver_batch(
        &mut self,
        view: &PublishBatchView<'_>,
        body: &Bytes,
        rx: &mut BatchReceiver<S>,
        (key, proof): (NodeId, Proof),
        from: NodeId,
        now: Millis,
    ) {
        let c = self.counters.clone();
        rx.resolved.clear();
        for t in &view.topics {
            let r = rx.topic(t, &self.limits);
            rx.resolved.push(r.map(|(name, topic)| Resolved {
                name,
                topic,
                locals: Vec::new(),
                feeds: Vec::new(),
            }));
        }
        rx.keep.clear();
        rx.idx.clear();
        let mut rejected = 0u64;
        let mut unproved = 0u64;
        for (i, e) in view.entries.iter().enumerate() {
            // A message whose seal failed (others of the batch verified)
            // is dropped and counted, never delivered nor seen.
            if !rx.failed.is_empty() && rx.failed.iter().any(|r| r.contains(&i)) {
                rx.keep.push(false);
                unproved += 1;
                continue;
            }
            let ok = rx.resolved[e.topic_index].is_some() && e.payload.len() <= self.max_payload;
            rx.keep.push(ok);
            if ok {
                rx.idx.push(i);
            } else {
                rejected += 1;
            }
        }
        Counters::add(&c.unproved_dropped_total, unproved);
        // A client's gateway that runs ahead of the publisher's stream as
        // delivered has not joined it yet: its copies are dropped (the
        // gateway that has joined delivers them).
        if let (RoleState::Client(_), Some(&f), Some(&l)) =
            (&self.role, rx.idx.first(), rx.idx.last())
        {
            let (first, last) = (view.entries[f].seq, view.entries[l].seq);
            if !self.seen.admit_source(&key, &from, view.epoch, first, last) {
                Counters::add(&c.remote_rejected_total, rejected);
                Counters::add(&c.duplicates_dropped_total, rx.idx.len() as u64);
                return;
            }
        }
        // Which messages are new: one pass over the tracker for the batch.
        let (mut dups, mut gaps) = (0u64, 0u64);
        // A client's publisher under a failover watch: the first delivered
        // arrival's gap may be a loss (see `gateway_lost`).
        let watched = self.seen.is_watched(&key);
        let mut first: Option<Observed> = None;
        {
            let (keep, idx) = (&mut rx.keep, &rx.idx);
            let mut at = idx.iter();
            self.seen.observe_batch(
                &key,
                view.epoch,
                idx.iter().map(|&i| view.entries[i].seq),
                |o| {
                    let Some(&i) = at.next() else { return };
                    match o {
                        Observed::Next => {}
                        Observed::Gap { missing } | Observed::Restarted { missing } => {
                            gaps += missing
                        }
                        Observed::Duplicate | Observed::Invalid => {
                            dups += 1;
                            keep[i] = false;
                            return;
                        }
                    }
                    if first.is_none() {
                        first = Some(o);
                    }
                },
            );
        }
        if let (true, Some(o)) = (watched, first) {
            match self.seen.settle(&key, &from, o) {
                Some(missing) if missing > 0 => self.tell_failover_gap(missing, rx),
                _ => {}
            }
        }
        Counters::add(&c.remote_rejected_total, rejected);
        Counters::add(&c.duplicates_dropped_total, dups);
        Counters::add(&c.gaps_total, gaps);
        let accepted = view.entries.len() as u64 - rejected - dups - unproved;
        Counters::add(&c.received_remote_total, accepted);
        if accepted == 0 {
            return;
        }
        if self.local.subs.is_empty() {
            if !rx.from_client {
                Counters::add(&c.unmatched_total, accepted);
            }
            return;
        }
        // Matching subscriptions per distinct topic.
        rx.targets.clear();
        for slot in rx.resolved.iter_mut().flatten() {
            for id in self.local.matches(&slot.topic) {
                match self.local.subs.get(&id).map(|s| &s.target) {
                    Some(Target::Local(sink)) => {
                        let i = match rx.targets.iter().position(|t| t.0 == id) {
                            Some(i) => i,
                            None => {
                                let v = rx.spare.pop().unwrap_or_default();
                                rx.targets.push((id, sink.clone(), v));
                                rx.targets.len() - 1
                            }
                        };
                        slot.locals.push(i);
                    }
                    Some(Target::Feed(f)) if !slot.feeds.contains(f) => slot.feeds.push(*f),
                    _ => {}
                }
            }
        }
        // Events in batch order, grouped per subscription. A message that
        // matches nothing here (sent for a summarized interest record, or
        // just after an unsubscribe) is dropped and counted.
        let publisher = view.publisher;
        let mut origin: Option<Arc<Origin>> = None;
        let mut unmatched = 0u64;
        for (i, (e, keep)) in view.entries.iter().zip(&rx.keep).enumerate() {
            if !keep {
                continue;
            }
            let Some(r) = &rx.resolved[e.topic_index] else {
                continue;
            };
            if r.locals.is_empty() && r.feeds.is_empty() {
                unmatched += 1;
                continue;
            }
            let event = Event {
                topic: r.name.clone(),
                payload: body.slice_ref(e.payload),
                publisher,
                seq: e.seq,
                epoch: view.epoch,
                headers: e
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                message_id: e.message_id.map(str::to_string),
                proof,
            };
            if !r.feeds.is_empty() {
                let o = origin
                    .get_or_insert_with(|| {
                        Arc::new(Origin {
                            publisher,
                            epoch: view.epoch,
                            seals: rx.seals.runs.clone(),
                        })
                    })
                    .clone();
                let msg = OutMsg {
                    seq: e.seq,
                    topic: r.name.clone(),
                    payload: event.payload.clone(),
                    extra: PublishOptions {
                        headers: if rx.retrace.is_empty() {
                            event.headers.clone()
                        } else {
                            forwarded_headers(&e.headers, i, &rx.retrace)
                        },
                        message_id: event.message_id.clone(),
                        overflow: Overflow::default(),
                    }
                    .shared(),
                    origin: Some(o),
                    seal: rx.seals.places.get(i).copied(),
                };
                for &f in &r.feeds {
                    self.forward_to_feed(f, publisher, msg.clone(), now);
                }
            }
            if let Some((&last, rest)) = r.locals.split_last() {
                for &i in rest {
                    rx.targets[i].2.push(event.clone());
                }
                rx.targets[last].2.push(event);
            }
        }
        if !rx.from_client {
            Counters::add(&c.unmatched_total, unmatched);
        }
    }

    // ----- gateway: attached clients -------------------------------------

    /// A feed for attached client `client`: its patterns' events go to its
    /// outbound queue in the order this node receives them.
    pub fn open_feed(&mut self, client: NodeId) -> FeedId {
        self.local.open_feed(client)
    }

    /// Subscribes `feed` to `pattern` (idempotent: a pattern it has already
    /// needs nothing).
    pub fn feed_add(
        &mut self,
        feed: FeedId,
        pattern: &str,
    ) -> Result<crate::core::Interest, crate::event::PubSubError> {
        let parsed =
            crate::topic::Pattern::with_limits(pattern, &self.limits).map_err(|source| {
                crate::event::PubSubError::InvalidPattern {
                    pattern: pattern.to_string(),
                    source,
                }
            })?;
        match self.local.feeds.get(&feed) {
            Some(f) if !f.patterns.contains_key(parsed.as_str()) => {}
            _ => return Ok(crate::core::Interest::None),
        }
        let id = self.add_sub(&parsed, Target::Feed(feed))?;
        if let Some(f) = self.local.feeds.get_mut(&feed) {
            f.patterns.insert(parsed.as_str().to_string(), id);
        }
        Ok(self.interest_changed(&parsed, true))
    }

    /// Unsubscribes `feed` from `pattern`.
    pub fn feed_remove(&mut self, feed: FeedId, pattern: &str) -> crate::core::Interest {
        let Some(id) = self
            .local
            .feeds
            .get_mut(&feed)
            .and_then(|f| f.patterns.remove(pattern))
        else {
            return crate::core::Interest::None;
        };
        self.unsubscribe(id).unwrap_or(crate::core::Interest::None)
    }

    /// Ends `feed` (its client left): every pattern is removed and the
    /// records updated in the background.
    pub fn close_feed(&mut self, feed: FeedId) {
        let Some(f) = self.local.feeds.remove(&feed) else {
            return;
        };
        for id in f.patterns.into_values() {
            self.unsubscribe(id);
        }
    }

    /// The patterns of `feed`, sorted.
    pub fn feed_patterns(&self, feed: FeedId) -> Vec<String> {
        self.local
            .feeds
            .get(&feed)
            .map(|f| f.patterns.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A batch that attached client `from` published (already delivered
    /// here through `handle_batch`): forwards each message to the other
    /// interested nodes along `routes` (one per topic of the batch, from
    /// [`PubSubCore::route`]; `None`: not routable), keeping the client as
    /// publisher with its epoch and sequence numbers. `retrace`: as
    /// [`BatchReceiver::retrace`], for these copies. `seals`: each entry's
    /// place in the client's seal ([`BatchReceiver::seals`]), sent along so
    /// receivers verify the client's signature; a batch the client did not
    /// seal is not forwarded (receivers would drop it as unproved): it is
    /// counted in `unproved_dropped_total`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_from_client(
        &mut self,
        from: NodeId,
        view: &PublishBatchView<'_>,
        body: &Bytes,
        routes: &[Option<Arc<Route>>],
        retrace: &[(usize, String)],
        seals: &SealPlaces,
        now: Millis,
    ) {
        let c = self.counters.clone();
        if view.publisher != from {
            // A client publishes only its own messages.
            Counters::add(&c.remote_rejected_total, view.entries.len() as u64);
            return;
        }
        if seals.len() != view.entries.len() && self.require_proof {
            Counters::add(&c.unproved_dropped_total, view.entries.len() as u64);
            return;
        }
        let origin = Arc::new(Origin {
            publisher: from,
            epoch: view.epoch,
            seals: seals.runs.clone(),
        });
        for (i, e) in view.entries.iter().enumerate() {
            let Some(Some(route)) = routes.get(e.topic_index) else {
                continue;
            };
            if e.payload.len() > self.max_payload {
                continue;
            }
            let extra = PublishOptions {
                headers: forwarded_headers(&e.headers, i, retrace),
                message_id: e.message_id.map(str::to_string),
                overflow: Overflow::default(),
            }
            .shared();
            let msg = OutMsg {
                seq: e.seq,
                topic: route.name.clone(),
                payload: body.slice_ref(e.payload),
                extra,
                origin: Some(origin.clone()),
                seal: seals.places.get(i).copied(),
            };
            for (node, q) in &route.targets {
                if *node != from {
                    c.forwarded_sent_total.inc();
                    self.enqueue(*q, msg.clone(), now);
                }
            }
        }
    }
}

/// The headers a forwarded copy of batch entry `i` carries: the
/// publisher's, with the `traceparent` that `retrace` names for `i` (a
/// forwarding node's span) instead of the publisher's.
fn forwarded_headers(
    headers: &[(&str, &str)],
    i: usize,
    retrace: &[(usize, String)],
) -> Vec<(String, String)> {
    let new = retrace
        .iter()
        .find(|(j, _)| *j == i)
        .map(|(_, v)| v.as_str());
    headers
        .iter()
        .map(|&(k, v)| {
            let v = match new {
                Some(n) if k.eq_ignore_ascii_case(macula_wire::trace::TRACEPARENT) => n,
                _ => v,
            };
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[cfg(test)]
mod retrace_tests {
    use super::forwarded_headers;

    #[test]
    fn a_forwarded_copy_carries_the_forwarding_span_as_parent() {
        let h = [("a", "1"), ("TraceParent", "old"), ("tracestate", "k=v")];
        let retrace = [(3, "other".to_string()), (1, "new".to_string())];
        let got = forwarded_headers(&h, 1, &retrace);
        assert_eq!(
            got,
            vec![
                ("a".to_string(), "1".to_string()),
                ("TraceParent".to_string(), "new".to_string()),
                ("tracestate".to_string(), "k=v".to_string()),
            ]
        );
        // Entries the driver did not trace keep the publisher's context.
        assert_eq!(forwarded_headers(&h, 0, &retrace)[1].1, "old");
        assert_eq!(forwarded_headers(&h, 1, &[])[1].1, "old");
    }
}
