//! Outbound messages and their encoding as PUBLISH_BATCH frames sized to
//! the receiver.
//!
//! A message waiting for a peer is an [`OutMsg`]: topic, payload and options
//! are shared (`Arc`, `Bytes`), so queueing one message for many peers
//! copies no bytes. [`encode_batches`] turns a run of them into frames in
//! one pass (topics interned per frame), never writing a frame larger than
//! the receiving node announced in its HELLO. This module must not know
//! about queues, peers or time.

use std::sync::Arc;

use bytes::Bytes;
use macula_wire::pubsub::{
    MAX_BATCH_MESSAGES, MAX_BATCH_TOPICS, MAX_SEAL_ENTRIES, SEALS_COUNT_LEN, SEAL_OVERHEAD,
};
use macula_wire::{
    event_digest, event_digest_aligned, seal_tree_depth, BatchItem, NodeId, Seal, SealHashes,
    SealTree, WholeHasher,
};

use crate::event::{PublishOptions, TopicName};
use crate::proof::{SealPlace, SealedRun, Signer};

/// Target size of one PUBLISH_BATCH body: bounds the write buffer and how
/// much one frame pins in memory at the receiver (events slice the frame).
/// A receiver with a smaller frame limit gets smaller batches.
pub const BATCH_BYTES: usize = 64 * 1024;

/// Upper bound of a batch body's bytes besides its topics and messages:
/// format (1), publisher (32), epoch (varint, 10), topic count (varint, 2),
/// message count (3).
pub const BATCH_BODY_OVERHEAD: usize = 1 + 32 + 10 + 2 + 3;

/// Upper bound of one message's bytes in a batch besides payload, headers
/// and message ID: seq delta (10), topic index (2), flags (1), payload
/// length (10), header count (1).
const MESSAGE_OVERHEAD: usize = 24;

/// One message waiting for a peer's sender. Cloning it for another target
/// copies no payload or topic bytes.
#[derive(Clone, Debug)]
pub struct OutMsg {
    pub seq: u64,
    pub topic: TopicName,
    pub payload: Bytes,
    /// Headers and message ID, when the publisher set any.
    pub extra: Option<Arc<PublishOptions>>,
    /// Another publisher's message this node forwards (a gateway, for or to
    /// its clients); `None`: this node's own.
    pub origin: Option<Arc<Origin>>,
    /// A forwarded message's proof: its place in the seal its publisher
    /// signed it in, one of those its `origin` holds (sent along, with
    /// the digests of the seal's other messages).
    pub seal: Option<SealPlace>,
}

impl OutMsg {
    /// Its seal (held by its origin) and its index in it.
    pub fn sealed(&self) -> Option<(&Arc<SealedRun>, u32)> {
        let p = self.seal?;
        let run = self.origin.as_deref()?.seals.get(p.seal as usize)?;
        Some((run, p.index))
    }

    /// Its headers and message ID, as a seal's hashes read them.
    fn signed_extra(&self) -> (impl Iterator<Item = (&str, &str)>, Option<&str>) {
        let o = self.extra.as_deref();
        let headers = o
            .map_or(&[][..], |o| &o.headers)
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        (headers, o.and_then(|o| o.message_id.as_deref()))
    }

    /// Upper bound of the bytes this message takes in a batch body, its
    /// topic table entry excluded.
    pub fn encoded_size(&self) -> usize {
        let extra = self.extra.as_deref().map_or(0, |o| {
            o.headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
                + o.message_id.as_ref().map_or(0, |id| id.len() + 2)
        });
        self.payload.len() + extra + MESSAGE_OVERHEAD
    }

    /// Bytes the seal of a forwarded message adds to a frame it starts a
    /// seal in (every other message of its seal sent as a digest).
    fn seal_cost(&self) -> usize {
        self.sealed().map_or(0, |(run, _)| {
            let n = run.len();
            match run.is_groups_kind() {
                // One digest per group left out (at most one per group
                // but this one's), and their count.
                true => {
                    SEAL_OVERHEAD + n.div_ceil(8) + 3 + 32 * run.group_count().saturating_sub(1)
                }
                // Kind 4: one message leaves at most one subtree per
                // level of the tree (its siblings on the way up).
                false if run.is_aligned_kind() => {
                    SEAL_OVERHEAD + n.div_ceil(8) + 32 * n.saturating_sub(1).min(seal_tree_depth(n))
                }
                false => SEAL_OVERHEAD + n.div_ceil(8) + 32 * n.saturating_sub(1),
            }
        })
    }

    /// Bytes each further message of its seal adds to a frame (after
    /// [`OutMsg::seal_cost`] for the first): kind 1 one digest less; kind
    /// 4 at most one subtree per level but one more (the subtree it was
    /// in is replaced by its siblings on the way down to it); kind 3
    /// nothing (its group's digest, if left out, was counted).
    fn further_seal_cost(&self) -> isize {
        match self.sealed() {
            Some((run, _)) if run.is_groups_kind() => 0,
            Some((run, _)) if run.is_aligned_kind() => {
                32 * seal_tree_depth(run.len()).saturating_sub(1) as isize
            }
            _ => -32,
        }
    }

    /// A forwarded message of a seal of kind 3 (topic groups).
    fn groups_seal(&self) -> bool {
        self.sealed().is_some_and(|(run, _)| run.is_groups_kind())
    }

    /// Whether `next`, after this message in a frame, goes in the same
    /// seal entry: the same seal, or another frame's copy of the same
    /// signature (a seal spanning its publisher's frames, kinds 1 and 4)
    /// whose message comes later in it. A forwarder's frame that holds
    /// messages of several of the publisher's frames so carries one entry
    /// per signature (one key, signature and bitmap; the hashes of the
    /// subtrees, or digests, of the messages none of them has), and its
    /// receiver checks one seal, not one per publisher's frame.
    fn continues_seal(&self, next: &OutMsg) -> bool {
        self.same_seal(next)
            || match (self.sealed(), next.sealed()) {
                (Some((a, i)), Some((b, j))) => j > i && a.same_signature(b),
                _ => false,
            }
    }

    fn same_seal(&self, other: &OutMsg) -> bool {
        match (self.seal, other.seal, &self.origin, &other.origin) {
            // The same seal of the same batch: no need to look further.
            (Some(a), Some(b), Some(oa), Some(ob)) if Arc::ptr_eq(oa, ob) => a.seal == b.seal,
            (Some(_), Some(_), _, _) => match (self.sealed(), other.sealed()) {
                (Some((a, _)), Some((b, _))) => Arc::ptr_eq(a, b),
                _ => false,
            },
            _ => false,
        }
    }
}

/// Messages one seal of this node's own covers at most: a node forwarding
/// some of them to a receiver sends the digests of the others (32 bytes
/// each), so a seal of 256 fits any frame limit from 16 KiB up, at 3
/// signatures per 64 KiB batch of 64-byte messages.
pub const OWN_SEAL_MAX: usize = 256;

/// Average payload bytes of the messages of a chunk sealed as kind 2
/// (their whole hash signed, besides their digests): larger ones are
/// sealed as kind 1.
const WHOLE_MAX_AVERAGE: usize = 1024;

/// Bytes a frame signed by this node reserves for its seal (and the seal
/// count); each further seal of the frame takes this less the count.
const OWN_SEAL_BYTES: usize = SEALS_COUNT_LEN + SEAL_OVERHEAD + OWN_SEAL_MAX / 8;

/// Messages of one own seal, as a `usize` bounded by the wire's limit.
const OWN_SEAL_CHUNK: usize = if OWN_SEAL_MAX < MAX_SEAL_ENTRIES {
    OWN_SEAL_MAX
} else {
    MAX_SEAL_ENTRIES
};

/// The publisher of a forwarded message, and the seals of the batch it
/// came in (shared by that batch's messages and their copies; their
/// [`OutMsg::seal`] says which). Equal when publisher and epoch are.
#[derive(Debug)]
pub struct Origin {
    pub publisher: NodeId,
    pub epoch: u64,
    /// The seals of the batch its messages came in (empty: unsealed).
    pub seals: Vec<Arc<SealedRun>>,
}

impl Origin {
    /// The origin of unsealed messages.
    pub fn new(publisher: NodeId, epoch: u64) -> Origin {
        Origin {
            publisher,
            epoch,
            seals: Vec::new(),
        }
    }
}

impl PartialEq for Origin {
    fn eq(&self, o: &Origin) -> bool {
        self.publisher == o.publisher && self.epoch == o.epoch
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.publisher.hash(h);
        self.epoch.hash(h);
    }
}

/// What [`encode_batches`] did with the messages it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Frames appended.
    pub frames: u64,
    /// Messages in those frames.
    pub messages: usize,
    /// Messages skipped because even alone they do not fit the receiver's
    /// frame limit.
    pub too_large: usize,
    /// Messages skipped because the wire codec refused them (a limit of the
    /// wire format the core did not check; a bug if it ever happens).
    pub refused: usize,
    /// Forwarded messages left out because the frame would have carried
    /// only part of their topic group in a seal of kind 3 (the rest of the
    /// group was dropped before, or went to another frame): they would
    /// not verify at the receiver (counted, and reported lost to it).
    pub ungrouped: usize,
}

impl std::ops::AddAssign for Encoded {
    fn add_assign(&mut self, o: Encoded) {
        self.frames += o.frames;
        self.messages += o.messages;
        self.too_large += o.too_large;
        self.refused += o.refused;
        self.ungrouped += o.ungrouped;
    }
}

/// The payload budget of one frame for a receiver whose frame limit is
/// `frame_limit`: at most `batch_bytes`, and never more than its frame holds.
pub fn batch_budget(frame_limit: u32, batch_bytes: usize) -> usize {
    batch_bytes.min((frame_limit as usize).saturating_sub(BATCH_BODY_OVERHEAD))
}

/// Whether `m` fits a frame whose payload budget is `budget` (see
/// [`batch_budget`]); one that does not is skipped by [`encode_batches`].
pub fn fits(m: &OutMsg, budget: usize) -> bool {
    let seal = match m.seal {
        Some(_) => SEALS_COUNT_LEN + m.seal_cost(),
        None => 0,
    };
    m.encoded_size() + m.topic.len() + 2 + seal <= budget
}

/// Encodes `msgs` (in seq order per publisher) as PUBLISH_BATCH frames into
/// `out`: a new frame after `batch_budget(frame_limit, batch_bytes)` bytes,
/// `MAX_BATCH_TOPICS` distinct topics or `MAX_BATCH_MESSAGES` messages.
/// Every frame's body is at most `frame_limit` bytes. A message that cannot
/// fit any frame for this receiver is skipped and counted.
pub fn encode_batches(
    out: &mut Vec<u8>,
    msgs: &[OutMsg],
    publisher: &NodeId,
    epoch: u64,
    frame_limit: u32,
    batch_bytes: usize,
) -> Encoded {
    encode_batches_marked(
        out,
        msgs,
        publisher,
        epoch,
        frame_limit,
        batch_bytes,
        None,
        None,
    )
}

/// Where one frame of [`encode_batches_marked`] ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    /// Bytes of `out` up to the end of this frame.
    pub end: usize,
    /// Messages of `msgs` dealt with (in this frame or an earlier one, or
    /// skipped) once this frame is written.
    pub consumed: usize,
    /// Messages in this frame and the earlier ones.
    pub messages: u64,
}

/// [`encode_batches`], also appending to `marks` where each frame ends: a
/// write that stops part-way tells from them which messages went out in
/// whole frames. With `signer`, every frame of this node's own messages is
/// sealed (signed); forwarded messages carry their publisher's seals.
#[allow(clippy::too_many_arguments)]
pub fn encode_batches_marked(
    out: &mut Vec<u8>,
    msgs: &[OutMsg],
    publisher: &NodeId,
    epoch: u64,
    frame_limit: u32,
    batch_bytes: usize,
    marks: Option<&mut Vec<Mark>>,
    signer: Option<&Signer>,
) -> Encoded {
    encode_all(
        out,
        msgs,
        publisher,
        epoch,
        frame_limit,
        batch_bytes,
        marks,
        signer,
        None,
    )
}

/// Which of `msgs` (indices) [`encode_batches_marked`] left out for the
/// same receiver because a frame would have carried only part of their
/// topic group (see [`Encoded::ungrouped`]): encodes them again (only
/// forwarded messages can be left out so, and their frames do not depend
/// on a signer). For the loss report of a batch that left some out.
pub fn ungrouped_messages(
    msgs: &[OutMsg],
    publisher: &NodeId,
    epoch: u64,
    frame_limit: u32,
    batch_bytes: usize,
) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = Vec::new();
    encode_all(
        &mut out,
        msgs,
        publisher,
        epoch,
        frame_limit,
        batch_bytes,
        None,
        None,
        Some(&mut left),
    );
    left
}

#[allow(clippy::too_many_arguments)]
fn encode_all(
    out: &mut Vec<u8>,
    msgs: &[OutMsg],
    publisher: &NodeId,
    epoch: u64,
    frame_limit: u32,
    batch_bytes: usize,
    mut marks: Option<&mut Vec<Mark>>,
    signer: Option<&Signer>,
    mut ungrouped: Option<&mut Vec<usize>>,
) -> Encoded {
    let budget = batch_budget(frame_limit, batch_bytes);
    // One batch names one publisher: split into runs of the same origin
    // (a node sending only its own messages has one run).
    let mut done = Encoded::default();
    let mut rest = msgs;
    while let Some(first) = rest.first() {
        let same = |m: &OutMsg| match (&m.origin, &first.origin) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        };
        let n = rest.iter().position(|m| !same(m)).unwrap_or(rest.len());
        let (run, tail) = rest.split_at(n);
        let base = msgs.len() - rest.len();
        rest = tail;
        let (p, e, own) = match &first.origin {
            Some(o) => (&o.publisher, o.epoch, None),
            None => (publisher, epoch, signer),
        };
        let at = Marker {
            base,
            messages: done.messages as u64,
        };
        done += encode_run(
            out,
            run,
            p,
            e,
            frame_limit,
            budget,
            at,
            marks.as_deref_mut(),
            own,
            ungrouped.as_deref_mut(),
        );
    }
    done
}

/// Where a run starts, for its marks.
#[derive(Clone, Copy)]
struct Marker {
    base: usize,
    messages: u64,
}

/// Digest bytes a frame of this node's own messages may carry for the
/// messages of its seal sent in other frames (a seal spanning frames), as a
/// share of the frame's payload budget: 1/16 (4 KiB of 64 KiB, 128
/// digests), outside the budget, so spanning never makes frames hold
/// fewer messages.
const SPAN_SHARE: usize = 16;

/// One frame being put together: its messages and topic table, as ranges
/// of the run's lists, and how many of the run's messages it accounts for.
struct Frame {
    picked: std::ops::Range<usize>,
    topics: std::ops::Range<usize>,
    consumed: usize,
}

/// `encode_batches` for messages of one publisher. With `signer` (this
/// node's own messages), one signature covers the messages of consecutive
/// frames, up to [`OWN_SEAL_MAX`]: each frame carries the seal with the
/// digests of the messages sent in the others (at most 1/[`SPAN_SHARE`]
/// of the budget, and only when the receiver's frame limit has that room
/// beyond the budget). Frames are written as soon as their messages are
/// known (nothing waits for more): a lone message is sealed alone.
#[allow(clippy::too_many_arguments)]
fn encode_run(
    out: &mut Vec<u8>,
    msgs: &[OutMsg],
    publisher: &NodeId,
    epoch: u64,
    frame_limit: u32,
    budget: usize,
    at: Marker,
    mut marks: Option<&mut Vec<Mark>>,
    signer: Option<&Signer>,
    ungrouped: Option<&mut Vec<usize>>,
) -> Encoded {
    let mut done = Encoded::default();
    let mut topics: Vec<&str> = Vec::new();
    // (index into msgs, index into the frame's topics), frame after frame.
    let mut picked: Vec<(usize, usize)> = Vec::with_capacity(msgs.len().min(4096));
    // The frames one seal of this node's will cover (one without signer).
    let mut group: Vec<Frame> = Vec::new();
    let span_bytes = match signer {
        Some(_)
            if (frame_limit as usize)
                >= budget + BATCH_BODY_OVERHEAD + OWN_SEAL_BYTES + budget / SPAN_SHARE =>
        {
            budget / SPAN_SHARE
        }
        _ => 0,
    };
    let mut w = FrameWriter {
        out,
        msgs,
        publisher,
        epoch,
        frame_limit,
        at,
        digests: Vec::new(),
        order: Vec::new(),
        sigs: Vec::new(),
        seals: Vec::new(),
        drop: Vec::new(),
        ungrouped,
    };
    let mut i = 0;
    while i < msgs.len() {
        let p0 = picked.len();
        let t0 = topics.len();
        i = pick_frame(
            msgs,
            i,
            budget,
            signer.is_some(),
            &mut picked,
            &mut topics,
            t0,
            &mut done,
        );
        if picked.len() == p0 {
            continue;
        }
        let frame = Frame {
            picked: p0..picked.len(),
            topics: t0..topics.len(),
            consumed: i,
        };
        let Some(signer) = signer else {
            group.push(frame);
            w.flush(
                &mut group,
                &picked,
                &topics,
                None,
                &mut done,
                marks.as_deref_mut(),
            );
            picked.clear();
            topics.clear();
            continue;
        };
        // Does this frame join the seal of the frames before it? Every
        // frame of a seal carries the digests of the others' messages.
        let k = frame.picked.len();
        let n: usize = group.iter().map(|f| f.picked.len()).sum::<usize>() + k;
        let smallest = group
            .iter()
            .map(|f| f.picked.len())
            .min()
            .unwrap_or(k)
            .min(k);
        // A seal of large messages is of kind 4: a frame of it carries
        // the hashes of at most two subtrees per level of its tree.
        let large = signer.seals_aligned() && {
            let bytes = |f: &Frame| -> usize {
                picked[f.picked.clone()]
                    .iter()
                    .map(|&(mi, _)| msgs[mi].payload.len())
                    .sum()
            };
            group.iter().map(bytes).sum::<usize>() + bytes(&frame) > WHOLE_MAX_AVERAGE * n
        };
        let carried = match large {
            true => (n - smallest).min(2 * seal_tree_depth(n)),
            false => n - smallest,
        };
        let joins = !group.is_empty() && n <= OWN_SEAL_MAX && 32 * carried <= span_bytes;
        if !group.is_empty() && !joins {
            // Written first; this frame's entries move to the front.
            let (fp, ft) = (frame.picked.clone(), frame.topics.clone());
            w.flush(
                &mut group,
                &picked,
                &topics,
                Some(signer),
                &mut done,
                marks.as_deref_mut(),
            );
            picked.drain(..fp.start);
            topics.drain(..ft.start);
            group.push(Frame {
                picked: 0..fp.len(),
                topics: 0..ft.len(),
                consumed: frame.consumed,
            });
        } else {
            group.push(frame);
        }
    }
    if !group.is_empty() {
        w.flush(&mut group, &picked, &topics, signer, &mut done, marks);
    }
    done
}

/// Picks the messages of one frame from `msgs[i..]` (appended to `picked`,
/// new topics to `topics` from `t0`); returns where the next frame starts.
/// Messages that can never fit this receiver are skipped and counted.
#[allow(clippy::too_many_arguments)]
fn pick_frame<'a>(
    msgs: &'a [OutMsg],
    mut i: usize,
    budget: usize,
    own_seal: bool,
    picked: &mut Vec<(usize, usize)>,
    topics: &mut Vec<&'a str>,
    t0: usize,
    done: &mut Encoded,
) -> usize {
    // A frame of this node's own carries one seal per `OWN_SEAL_MAX` of
    // its messages, so it holds as many messages as an unsealed one.
    let max_msgs = MAX_BATCH_MESSAGES;
    let p0 = picked.len();
    let mut bytes = if own_seal { OWN_SEAL_BYTES } else { 0 };
    while let Some(m) = msgs.get(i) {
        let size = m.encoded_size();
        let topic_entry = m.topic.len() + 2;
        let fits_own = !own_seal || m.encoded_size() + topic_entry + OWN_SEAL_BYTES <= budget;
        if !fits(m, budget) || !fits_own {
            // Never fits this receiver: skip it (counted) rather than
            // fail the frame it would be in.
            done.too_large += 1;
            i += 1;
            continue;
        }
        let frame_topics = &topics[t0..];
        // Same topic as the last message: the common case, no search.
        let known = match frame_topics.last() {
            Some(last) if std::ptr::eq(*last, m.topic.as_str()) => Some(frame_topics.len() - 1),
            _ => frame_topics.iter().position(|t| *t == m.topic.as_str()),
        };
        // A forwarded message's seal: the first of its seal in this
        // frame brings the seal (all other digests); each further one
        // replaces its digest.
        let prev = picked[p0..].last().map(|&(pi, _)| &msgs[pi]);
        let seal_cost = match (prev, &m.seal) {
            (_, None) => 0isize,
            (Some(p), Some(_)) if p.continues_seal(m) => m.further_seal_cost(),
            (Some(_), Some(_)) => m.seal_cost() as isize,
            (None, Some(_)) => (SEALS_COUNT_LEN + m.seal_cost()) as isize,
        };
        let n = picked.len() - p0;
        // A seal of topic groups is not split between frames when it
        // fits one (each frame would carry part of a group): a frame ends
        // before it instead.
        let starts_groups = m.groups_seal() && !prev.is_some_and(|p| p.same_seal(m));
        if n > 0 && starts_groups {
            // A topic table entry counted at each change of topic (at
            // least once per topic: never less than the frame needs).
            // The same for its topics (at most one new per change) and
            // messages: the frame's other limits must not split it either.
            let (mut run_bytes, mut run_msgs, mut changes) = (0usize, 0usize, 0usize);
            let mut last: Option<&str> = None;
            for x in msgs[i..].iter().take_while(|x| x.same_seal(m)) {
                run_bytes += x.encoded_size();
                run_msgs += 1;
                if last != Some(x.topic.as_str()) {
                    run_bytes += x.topic.len() + 2;
                    changes += 1;
                    last = Some(x.topic.as_str());
                }
            }
            if (bytes + run_bytes).saturating_add_signed(seal_cost) > budget
                || n + run_msgs > max_msgs
                || frame_topics.len() + changes > MAX_BATCH_TOPICS
            {
                break;
            }
        }
        // Every `OWN_SEAL_MAX` own messages start another seal.
        let own_cost = match own_seal && n > 0 && n.is_multiple_of(OWN_SEAL_CHUNK) {
            true => OWN_SEAL_BYTES - SEALS_COUNT_LEN,
            false => 0,
        };
        let cost = size + own_cost + if known.is_some() { 0 } else { topic_entry };
        let after = (bytes + cost).saturating_add_signed(seal_cost);
        if n > 0
            && (after > budget
                || n == max_msgs
                || prev.is_some_and(|p| p.seal.is_some() != m.seal.is_some())
                || (known.is_none() && frame_topics.len() == MAX_BATCH_TOPICS))
        {
            break;
        }
        let t = match known {
            Some(t) => t,
            None => {
                topics.push(m.topic.as_str());
                topics.len() - 1 - t0
            }
        };
        bytes = after;
        picked.push((i, t));
        i += 1;
    }
    i
}

/// Writes frames of one run: what `encode_run` hands it, with their seals.
struct FrameWriter<'a, 'o> {
    out: &'o mut Vec<u8>,
    msgs: &'a [OutMsg],
    publisher: &'a NodeId,
    epoch: u64,
    frame_limit: u32,
    at: Marker,
    digests: Vec<[u8; 32]>,
    /// The group's messages (indices into `msgs`), in order.
    order: Vec<usize>,
    /// The seals of a group's chunks of `OWN_SEAL_CHUNK` messages.
    sigs: Vec<OwnSeal>,
    seals: Vec<Seal>,
    /// Places in the frame being written of forwarded messages left out
    /// (only part of their topic group in it: see [`forwarded_seals`]).
    drop: Vec<usize>,
    /// Where those messages (indices into `msgs`) are collected, if asked.
    ungrouped: Option<&'o mut Vec<usize>>,
}

/// One of a signing node's own seals (a chunk of `OWN_SEAL_CHUNK`
/// messages): its signature and what its kind needs to write its frames'
/// seals. Neither `digests_hash` nor `tree`: kind 1
/// ([`macula_wire::event_digest`] digests).
#[derive(Debug)]
struct OwnSeal {
    sig: [u8; 64],
    /// Kind 2 (within one frame): the digests' hash it carries.
    digests_hash: Option<[u8; 32]>,
    /// Kind 4 (large messages): the tree over the aligned digests
    /// ([`macula_wire::event_digest_aligned`]) whose root it signs.
    tree: Option<SealTree>,
}

/// The seals of the frame carrying the group's messages `range`: one per
/// chunk of `OWN_SEAL_CHUNK` messages (`sigs[c]`) that it overlaps, with
/// the bits of its messages and what stands for the chunk's others (kind
/// 1 their digests, kind 4 the hashes of its tree's subtrees with none of
/// the frame's); a chunk within the frame is a seal of kind 2 (its
/// digests' hash).
fn own_seals(
    signer: &Signer,
    sigs: &[OwnSeal],
    digests: &[[u8; 32]],
    range: std::ops::Range<usize>,
    seals: &mut Vec<Seal>,
) {
    for (c, (own, chunk)) in sigs.iter().zip(digests.chunks(OWN_SEAL_CHUNK)).enumerate() {
        let start = c * OWN_SEAL_CHUNK;
        let (lo, hi) = (range.start.max(start), range.end.min(start + chunk.len()));
        if lo < hi {
            seals.push(match (&own.digests_hash, &own.tree) {
                (Some(dh), _) => signer.seal_complete(own.sig, chunk.len(), *dh),
                (None, Some(tree)) => signer.seal_tree_part(own.sig, tree, lo - start..hi - start),
                (None, None) => signer.seal_part(own.sig, chunk, lo - start..hi - start),
            });
        }
    }
}

impl FrameWriter<'_, '_> {
    /// Writes the frames of `group` (emptied): with `signer`, all under
    /// one signature over every message of the group; else each with the
    /// seals of its forwarded messages, if any.
    fn flush(
        &mut self,
        group: &mut Vec<Frame>,
        picked: &[(usize, usize)],
        topics: &[&str],
        signer: Option<&Signer>,
        done: &mut Encoded,
        mut marks: Option<&mut Vec<Mark>>,
    ) {
        let msgs = self.msgs;
        // One frame of small messages: sealed by topic groups (kind 3),
        // in chunks of up to `MAX_SEAL_ENTRIES`, no digest per message.
        if let (Some(signer), [f]) = (signer.filter(|s| s.seals_groups()), &group[..]) {
            let frame = &picked[f.picked.clone()];
            let small = frame
                .iter()
                .map(|&(mi, _)| msgs[mi].payload.len())
                .sum::<usize>()
                <= WHOLE_MAX_AVERAGE * frame.len();
            if small {
                self.seals.clear();
                for chunk in frame.chunks(MAX_SEAL_ENTRIES) {
                    let mut groups = group_digests_out(msgs, chunk);
                    let sig =
                        signer.sign_groups(self.publisher, self.epoch, chunk.len(), &mut groups);
                    self.seals
                        .push(signer.seal_groups_complete(sig, chunk.len()));
                }
                self.drop.clear();
                let f = group.remove(0);
                self.write_frame(&f, picked, topics, done, marks);
                return;
            }
        }
        // The group's messages are signed in consecutive chunks of
        // `OWN_SEAL_CHUNK`: one seal for a group of small frames, several
        // for one frame of more messages.
        self.sigs.clear();
        if let Some(signer) = signer {
            self.digests.clear();
            self.order.clear();
            // Where each frame of the group ends (in group order).
            let mut ends = Vec::with_capacity(group.len());
            for f in group.iter() {
                let frame = &picked[f.picked.clone()];
                self.order.extend(frame.iter().map(|&(mi, _)| mi));
                ends.push(self.order.len());
            }
            for start in (0..self.order.len()).step_by(OWN_SEAL_CHUNK) {
                let end = (start + OWN_SEAL_CHUNK).min(self.order.len());
                let chunk = &self.order[start..end];
                // A chunk within one frame: its receiver gets all of it
                // (or its gateway, the copies' digests), a seal of kind 2
                // it checks over the messages hashed whole. One spanning
                // frames: kind 1 (each frame's receiver computes digests).
                let within = ends.iter().find(|&&e| e > start).is_some_and(|&e| end <= e);
                // Large messages gain nothing from kind 2 (a digest of
                // each already hashes its 1 KiB chunks in parallel) and
                // would cost the client a second pass over them; they are
                // sealed over aligned digests (kind 4), whose payloads
                // BLAKE3 takes from their own byte 0.
                let small = chunk
                    .iter()
                    .map(|&mi| msgs[mi].payload.len())
                    .sum::<usize>()
                    <= WHOLE_MAX_AVERAGE * chunk.len();
                // Two booleans pick the kind: kind 2 (whole), kind 4
                // (aligned), else kind 1.
                let whole = within && small;
                let aligned = !small && signer.seals_aligned();
                self.digests.extend(chunk.iter().map(|&mi| match aligned {
                    true => aligned_digest_of(&msgs[mi]),
                    false => digest_of(&msgs[mi]),
                }));
                let digests = &self.digests[start..end];
                self.sigs.push(match (whole, aligned) {
                    (true, _) => {
                        let whole = whole_of_out(
                            self.publisher,
                            self.epoch,
                            chunk.iter().map(|&mi| &msgs[mi]),
                        );
                        let (sig, dh) =
                            signer.sign_whole(self.publisher, self.epoch, &whole, digests);
                        OwnSeal {
                            sig,
                            digests_hash: Some(dh),
                            tree: None,
                        }
                    }
                    (false, true) => {
                        let tree = SealTree::new(digests);
                        OwnSeal {
                            sig: signer.sign_tree(self.publisher, self.epoch, &tree),
                            digests_hash: None,
                            tree: Some(tree),
                        }
                    }
                    (false, false) => OwnSeal {
                        sig: signer.sign(self.publisher, self.epoch, digests),
                        digests_hash: None,
                        tree: None,
                    },
                });
            }
        }
        let mut offset = 0;
        for f in group.drain(..) {
            let frame = &picked[f.picked.clone()];
            self.seals.clear();
            self.drop.clear();
            match signer {
                Some(signer) => {
                    let k = frame.len();
                    own_seals(
                        signer,
                        &self.sigs,
                        &self.digests,
                        offset..offset + k,
                        &mut self.seals,
                    );
                    offset += k;
                }
                None if msgs[frame[0].0].seal.is_some() => {
                    forwarded_seals(msgs, frame, &mut self.seals, &mut self.drop)
                }
                None => {}
            }
            self.write_frame(&f, picked, topics, done, marks.as_deref_mut());
        }
    }

    /// Writes one frame of `picked` with the seals in `self.seals`
    /// (leaving out the places in `self.drop`).
    fn write_frame(
        &mut self,
        f: &Frame,
        picked: &[(usize, usize)],
        topics: &[&str],
        done: &mut Encoded,
        marks: Option<&mut Vec<Mark>>,
    ) {
        let msgs = self.msgs;
        let frame = &picked[f.picked.clone()];
        if !self.drop.is_empty() {
            self.drop.sort_unstable();
            done.ungrouped += self.drop.len();
            if let Some(u) = self.ungrouped.as_deref_mut() {
                u.extend(self.drop.iter().map(|&p| self.at.base + frame[p].0));
            }
        }
        let drop = &self.drop;
        // Every message left out: no frame (a batch has at least one).
        let all_left = drop.len() == frame.len();
        let items = frame
            .iter()
            .enumerate()
            .filter(|(p, _)| drop.binary_search(p).is_err())
            .map(|(_, &(mi, topic_index))| {
                let m = &msgs[mi];
                let o = m.extra.as_deref();
                BatchItem {
                    seq: m.seq,
                    topic_index,
                    payload: &m.payload,
                    headers: o.map_or(&[][..], |o| &o.headers),
                    message_id: o.and_then(|o| o.message_id.as_deref()),
                }
            });
        let written = match all_left {
            true => Ok(0),
            false => macula_wire::encode_sealed_batch_frame(
                self.out,
                self.frame_limit,
                self.publisher,
                self.epoch,
                &topics[f.topics.clone()],
                items,
                &self.seals,
            ),
        };
        match written {
            Ok(0) => {}
            Ok(n) => {
                done.frames += 1;
                done.messages += n;
            }
            Err(_) => done.refused += frame.len() - self.drop.len(),
        }
        if let Some(marks) = marks {
            marks.push(Mark {
                end: self.out.len(),
                consumed: self.at.base + f.consumed,
                messages: self.at.messages + done.messages as u64,
            });
        }
    }
}

/// The digests of the topic groups of the frame's messages `chunk`
/// (index into `msgs`, index of its topic in the frame), in the order the
/// groups first appear ([`macula_wire::WholeHasher::group`]).
fn group_digests_out(msgs: &[OutMsg], chunk: &[(usize, usize)]) -> Vec<[u8; 32]> {
    // Two passes: each group's size (so its hasher gathers with no buffer
    // growth), then the hashing. (topic index, bytes) per group, in the
    // order they first appear; the last one used first looked at.
    let mut sizes: Vec<(usize, usize)> = Vec::new();
    let mut of: Vec<u32> = Vec::with_capacity(chunk.len());
    let mut last = 0usize;
    for &(mi, t) in chunk {
        let g = match sizes.get(last) {
            Some((lt, _)) if *lt == t => last,
            _ => match sizes.iter().position(|(lt, _)| *lt == t) {
                Some(p) => p,
                None => {
                    sizes.push((t, 0));
                    sizes.len() - 1
                }
            },
        };
        last = g;
        let m = &msgs[mi];
        let (headers, id) = m.signed_extra();
        sizes[g].1 += WholeHasher::added_len(&m.topic, m.payload.len(), headers, id);
        of.push(g as u32);
    }
    let mut hashers: Vec<WholeHasher> = sizes
        .iter()
        .map(|&(_, b)| WholeHasher::group_sized(b))
        .collect();
    for (&(mi, _), &g) in chunk.iter().zip(&of) {
        let m = &msgs[mi];
        let (headers, id) = m.signed_extra();
        hashers[g as usize].add(m.seq, &m.topic, &m.payload, headers, id);
    }
    hashers.into_iter().map(WholeHasher::finish).collect()
}

/// The whole hash ([`macula_wire::seal_whole`]) of `msgs`, in order.
pub fn whole_of_out<'m>(
    publisher: &NodeId,
    epoch: u64,
    msgs: impl ExactSizeIterator<Item = &'m OutMsg>,
) -> [u8; 32] {
    let mut h = WholeHasher::new(publisher, epoch, msgs.len());
    for m in msgs {
        let (headers, id) = m.signed_extra();
        h.add(m.seq, &m.topic, &m.payload, headers, id);
    }
    h.finish()
}

/// The digest a seal signs of message `m` (see [`macula_wire::event_digest`]).
pub fn digest_of(m: &OutMsg) -> [u8; 32] {
    let (headers, id) = m.signed_extra();
    event_digest(m.seq, &m.topic, &m.payload, headers, id)
}

/// The digest a seal of kind 4 signs of message `m` (see
/// [`macula_wire::event_digest_aligned`]).
pub fn aligned_digest_of(m: &OutMsg) -> [u8; 32] {
    let (headers, id) = m.signed_extra();
    event_digest_aligned(m.seq, &m.topic, &m.payload, headers, id)
}

/// The seals of a frame of forwarded messages (`picked`, all sealed): one
/// per run of messages of one seal, with the digests of the seal's
/// messages not in the frame.
///
/// A seal of kind 3 (topic groups) carries the digests of the groups the
/// frame has none of; the messages of a group the frame has only part of
/// are left out (their places in `picked` appended to `drop`): they would
/// not verify.
fn forwarded_seals(
    msgs: &[OutMsg],
    picked: &[(usize, usize)],
    seals: &mut Vec<Seal>,
    drop: &mut Vec<usize>,
) {
    let mut k = 0;
    while k < picked.len() {
        let first = &msgs[picked[k].0];
        let Some((run, _)) = first.sealed() else {
            return;
        };
        let n = run.len();
        let mut present = vec![0u8; n.div_ceil(8)];
        let k0 = k;
        // The publisher's other frames (each its own `SealedRun`) of the
        // same signature whose messages this entry holds.
        let mut others: Vec<&Arc<SealedRun>> = Vec::new();
        let mut prev = first;
        while let Some(&(mi, _)) = picked.get(k) {
            let m = &msgs[mi];
            if k > k0 && !prev.continues_seal(m) {
                break;
            }
            if let Some((r, _)) = m.sealed() {
                if !Arc::ptr_eq(r, run) && !others.iter().any(|x| Arc::ptr_eq(x, r)) {
                    others.push(r);
                }
            }
            if let Some(s) = m.seal {
                let i = s.index as usize;
                if i < n {
                    present[i / 8] |= 1 << (i % 8);
                }
            }
            prev = m;
            k += 1;
        }
        if run.is_groups_kind() {
            let absent = match (all_present(&present, n), run.as_sent(&present)) {
                (true, _) => SealHashes::default(),
                (false, Some(sent)) => sent.clone(),
                (false, None) => {
                    let copy = run.group_copy(&present);
                    for &i in &copy.drop {
                        let i = i as usize;
                        present[i / 8] &= !(1 << (i % 8));
                        let at = picked[k0..k].iter().position(|&(mi, _)| {
                            msgs[mi].seal.is_some_and(|s| s.index as usize == i)
                        });
                        if let Some(p) = at {
                            drop.push(k0 + p);
                        }
                    }
                    copy.absent.into()
                }
            };
            if present.iter().any(|&b| b != 0) {
                seals.push(Seal {
                    key: run.key,
                    sig: run.sig,
                    n,
                    present,
                    absent,
                    carried: None,
                    groups: true,
                    aligned: false,
                });
            }
            continue;
        }
        let all = all_present(&present, n);
        let as_sent = match others.is_empty() {
            true => run.as_sent(&present),
            false => None,
        };
        let absent = match (all, as_sent) {
            // Every message of the seal is here: no digest to send (and,
            // at a client's gateway, none computed).
            (true, _) => SealHashes::default(),
            // Exactly the messages of the publisher's frame (its seal
            // spans frames): the digests it sent along (a slice of that
            // frame), none computed or copied.
            (false, Some(sent)) => sent.clone(),
            // Kind 4: the hashes of the subtrees with none of the copy's
            // messages, from what the publisher's frames carried or the
            // tree as known here.
            (false, None) if run.is_aligned_kind() => {
                let mut runs = Vec::with_capacity(1 + others.len());
                runs.push(run);
                runs.extend(others.iter().copied());
                SealedRun::tree_absent_among(&runs, &present).into()
            }
            // Kind 1: any of the publisher's frames of the seal carried
            // (or has) every digest but its messages'.
            (false, None) => {
                let digests = run.digests();
                (0..n)
                    .filter(|i| present[i / 8] & (1 << (i % 8)) == 0)
                    .map(|i| digests[i])
                    .collect()
            }
        };
        seals.push(Seal {
            key: run.key,
            sig: run.sig,
            n,
            present,
            absent,
            // Kind 2: the digests' hash to a receiver of every message,
            // else the messages' whole hash.
            carried: run.carried(all),
            groups: false,
            // Kind 4: the hashes above are its tree's.
            aligned: run.is_aligned_kind(),
        });
    }
}

/// The duplicate-suppression key of a batch that node `from` sent on behalf
/// of `publisher` (a gateway forwarding its client's messages). Keyed by
/// both, so a node naming another publisher can only ever disturb its own
/// stream of that publisher's messages, never the publisher's direct one.
pub fn forwarded_key(publisher: &NodeId, from: &NodeId) -> NodeId {
    let mut h = blake3::Hasher::new();
    h.update(b"macula forwarded publisher");
    h.update(publisher.as_bytes());
    h.update(from.as_bytes());
    NodeId::from_bytes(*h.finalize().as_bytes())
}

/// Whether the presence bitmap `present` holds all `n` messages of a seal.
fn all_present(present: &[u8], n: usize) -> bool {
    present
        .iter()
        .map(|b| b.count_ones() as usize)
        .sum::<usize>()
        == n
}

#[cfg(test)]
mod tests {
    use super::*;
    use macula_wire::frame::FrameDecoder;
    use macula_wire::PublishBatchView;
    use proptest::prelude::*;

    fn msg(seq: u64, topic: &TopicName, len: usize) -> OutMsg {
        OutMsg {
            seq,
            topic: topic.clone(),
            payload: Bytes::from(vec![seq as u8; len]),
            extra: None,
            origin: None,
            seal: None,
        }
    }

    /// Every frame in `buf`: (body length, publisher, epoch, (seq, topic, payload len)).
    #[allow(clippy::type_complexity)]
    fn frames(buf: &[u8], limit: u32) -> Vec<(usize, NodeId, u64, Vec<(u64, String, usize)>)> {
        let dec = FrameDecoder::new(limit);
        let mut out = Vec::new();
        let mut rest = buf;
        while let Some((f, used)) = dec.decode(rest).expect("well-formed frames") {
            rest = &rest[used..];
            let v = PublishBatchView::decode(f.body).expect("decodes");
            let msgs = v
                .entries
                .iter()
                .map(|e| (e.seq, v.topics[e.topic_index].to_string(), e.payload.len()))
                .collect();
            out.push((f.body.len(), v.publisher, v.epoch, msgs));
        }
        assert!(rest.is_empty(), "only whole frames");
        out
    }

    const ME: NodeId = NodeId::from_bytes([1; 32]);

    #[test]
    fn marks_say_where_each_frame_ends_and_what_it_carried() {
        let t = TopicName::from("t.x");
        let mut msgs: Vec<OutMsg> = (1..=10).map(|s| msg(s, &t, 1000)).collect();
        // One too large for any frame, and one of another publisher.
        msgs.insert(3, msg(50, &t, 9000));
        msgs[7].origin = Some(Arc::new(Origin::new(NodeId::from_bytes([2; 32]), 1)));
        let mut buf = vec![0xAA; 5]; // bytes already there
        let mut marks = Vec::new();
        let e = encode_batches_marked(
            &mut buf,
            &msgs,
            &ME,
            7,
            4096,
            BATCH_BYTES,
            Some(&mut marks),
            None,
        );
        assert_eq!((e.messages, e.too_large), (10, 1));
        assert_eq!(marks.len() as u64, e.frames);
        assert_eq!(
            marks.last().map(|m| (m.end, m.consumed, m.messages)),
            Some((buf.len(), 11, 10))
        );
        // Frames are contiguous, every mark past the previous one.
        let mut end = 5;
        for w in marks.windows(2) {
            assert!(w[0].end < w[1].end && w[0].consumed < w[1].consumed);
        }
        for (m, f) in marks.iter().zip(frames(&buf[5..], 4096)) {
            end += f.0 + macula_wire::FRAME_HEADER_LEN;
            assert_eq!(m.end, end);
        }
    }

    #[test]
    fn a_small_receiver_gets_small_frames_and_loses_nothing_that_fits() {
        let t = TopicName::from("t.x");
        let msgs: Vec<OutMsg> = (1..=40).map(|s| msg(s, &t, 1000)).collect();
        let limit = 4096;
        let mut buf = Vec::new();
        let e = encode_batches(&mut buf, &msgs, &ME, 7, limit, BATCH_BYTES);
        assert_eq!(e.messages, 40);
        assert_eq!(e.too_large + e.refused, 0);
        let got = frames(&buf, limit);
        assert_eq!(got.len() as u64, e.frames);
        assert!(
            got.len() >= 10,
            "1000-byte messages, 4 KiB frames: {}",
            got.len()
        );
        assert!(got.iter().all(|f| f.0 <= limit as usize));
        let seqs: Vec<u64> = got.iter().flat_map(|f| f.3.iter().map(|m| m.0)).collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    }

    #[test]
    fn a_message_too_large_for_the_receiver_is_skipped_and_counted() {
        let t = TopicName::from("t");
        let msgs = vec![msg(1, &t, 10), msg(2, &t, 5000), msg(3, &t, 10)];
        let mut buf = Vec::new();
        let e = encode_batches(&mut buf, &msgs, &ME, 1, 2048, BATCH_BYTES);
        assert_eq!((e.messages, e.too_large, e.refused), (2, 1, 0));
        let got = frames(&buf, 2048);
        let seqs: Vec<u64> = got.iter().flat_map(|f| f.3.iter().map(|m| m.0)).collect();
        assert_eq!(seqs, [1, 3]);
    }

    #[test]
    fn the_default_batch_is_64_kib_of_payload() {
        let t = TopicName::from("t");
        let msgs: Vec<OutMsg> = (1..=200).map(|s| msg(s, &t, 1000)).collect();
        let mut buf = Vec::new();
        let limit = 16 << 20;
        let e = encode_batches(&mut buf, &msgs, &ME, 1, limit, BATCH_BYTES);
        let got = frames(&buf, limit);
        assert_eq!(e.frames, 4);
        // Full frames carry as many 1,024-byte messages as 64 KiB holds.
        assert_eq!(
            got[0].3.len(),
            (BATCH_BYTES - 3) / (1000 + MESSAGE_OVERHEAD)
        );
        assert!(got.iter().all(|f| f.0 <= BATCH_BYTES + BATCH_BODY_OVERHEAD));
    }

    #[test]
    fn forwarded_messages_are_batched_per_publisher() {
        let t = TopicName::from("t");
        let other = Arc::new(Origin::new(NodeId::from_bytes([2; 32]), 9));
        let mut msgs = vec![msg(1, &t, 1), msg(2, &t, 1)];
        for s in [5, 6] {
            let mut m = msg(s, &t, 1);
            m.origin = Some(other.clone());
            msgs.push(m);
        }
        msgs.push(msg(3, &t, 1));
        let mut buf = Vec::new();
        let e = encode_batches(&mut buf, &msgs, &ME, 1, 1 << 20, BATCH_BYTES);
        assert_eq!((e.frames, e.messages), (3, 5));
        let got = frames(&buf, 1 << 20);
        let who: Vec<(NodeId, u64, usize)> = got.iter().map(|f| (f.1, f.2, f.3.len())).collect();
        assert_eq!(
            who,
            [(ME, 1, 2), (other.publisher, 9, 2), (ME, 1, 1)],
            "one frame per run of one publisher"
        );
    }

    #[test]
    fn equal_origins_make_one_run_even_in_different_arcs() {
        let t = TopicName::from("t");
        let origin = || Some(Arc::new(Origin::new(NodeId::from_bytes([2; 32]), 9)));
        let mut a = msg(1, &t, 1);
        a.origin = origin();
        let mut b = msg(2, &t, 1);
        b.origin = origin();
        let e = encode_batches(&mut Vec::new(), &[a, b], &ME, 1, 1 << 20, BATCH_BYTES);
        assert_eq!((e.frames, e.messages), (1, 2));
    }

    #[test]
    fn a_frame_fills_its_budget_exactly() {
        // Two messages whose cost adds up to the budget share one frame;
        // one byte more and the second starts a new one.
        let t = TopicName::from("t");
        let budget = 1000;
        let first = budget - MESSAGE_OVERHEAD - (t.len() + 2) - 100;
        let second = 100 - MESSAGE_OVERHEAD;
        let msgs = [msg(1, &t, first), msg(2, &t, second)];
        let e = encode_batches(&mut Vec::new(), &msgs, &ME, 1, 1 << 20, budget);
        assert_eq!((e.frames, e.messages), (1, 2));
        let msgs = [msg(1, &t, first), msg(2, &t, second + 1)];
        let e = encode_batches(&mut Vec::new(), &msgs, &ME, 1, 1 << 20, budget);
        assert_eq!((e.frames, e.messages), (2, 2));
    }

    #[test]
    fn topic_tables_and_message_counts_are_bounded() {
        let names: Vec<TopicName> = (0..MAX_BATCH_TOPICS + 5)
            .map(|i| TopicName::from(format!("t{i}")))
            .collect();
        let msgs: Vec<OutMsg> = names
            .iter()
            .enumerate()
            .map(|(i, t)| msg(i as u64 + 1, t, 0))
            .collect();
        let mut buf = Vec::new();
        let e = encode_batches(&mut buf, &msgs, &ME, 1, 1 << 24, 1 << 24);
        assert_eq!((e.frames, e.messages), (2, MAX_BATCH_TOPICS + 5));
        let got = frames(&buf, 1 << 24);
        assert_eq!(got[0].3.len(), MAX_BATCH_TOPICS);
    }

    #[test]
    fn headers_and_ids_are_carried_and_weighed() {
        let t = TopicName::from("t");
        let mut m = msg(1, &t, 3);
        m.extra = Some(Arc::new(PublishOptions {
            headers: vec![("k".into(), "vv".into())],
            message_id: Some("abc".into()),
            ..Default::default()
        }));
        assert_eq!(
            m.encoded_size(),
            3 + (1 + 2 + 4) + (3 + 2) + MESSAGE_OVERHEAD
        );
        let mut buf = Vec::new();
        let e = encode_batches(&mut buf, &[m], &ME, 1, 1 << 20, BATCH_BYTES);
        assert_eq!(e.messages, 1);
        let (f, _) = FrameDecoder::new(1 << 20).decode(&buf).unwrap().unwrap();
        let v = PublishBatchView::decode(f.body).unwrap();
        assert_eq!(v.entries[0].headers, vec![("k", "vv")]);
        assert_eq!(v.entries[0].message_id, Some("abc"));
    }

    #[test]
    fn a_refused_message_is_counted_not_lost_silently() {
        // Seq 0 is never assigned by the core; the codec refuses it.
        let t = TopicName::from("t");
        let mut buf = Vec::new();
        let e = encode_batches(&mut buf, &[msg(0, &t, 1)], &ME, 1, 1 << 20, BATCH_BYTES);
        assert_eq!((e.frames, e.messages, e.refused), (0, 0, 1));
        assert!(buf.is_empty());
    }

    #[test]
    fn forwarded_keys_depend_on_publisher_and_sender() {
        let (a, b, c) = (
            NodeId::from_bytes([1; 32]),
            NodeId::from_bytes([2; 32]),
            NodeId::from_bytes([3; 32]),
        );
        assert_eq!(forwarded_key(&a, &b), forwarded_key(&a, &b));
        assert_ne!(forwarded_key(&a, &b), forwarded_key(&a, &c));
        assert_ne!(forwarded_key(&a, &b), forwarded_key(&b, &a));
        assert_ne!(forwarded_key(&a, &b), a);
    }

    #[test]
    fn a_message_costing_exactly_the_budget_fits_the_worst_case_frame() {
        // The documented bound: format, publisher, epoch, topic count and
        // message count at their largest encodings.
        assert_eq!(BATCH_BODY_OVERHEAD, 1 + 32 + 10 + 2 + 3);
        let t = TopicName::from("t");
        let limit = 1000u32;
        let len = limit as usize - 48 - MESSAGE_OVERHEAD - (t.len() + 2);
        let mut m = msg(u64::MAX / 2, &t, len);
        m.payload = Bytes::from(vec![0; len]);
        let mut buf = Vec::new();
        let e = encode_batches(&mut buf, &[m.clone()], &ME, u64::MAX, limit, BATCH_BYTES);
        assert_eq!((e.messages, e.too_large, e.refused), (1, 0, 0));
        assert!(buf.len() - macula_wire::FRAME_HEADER_LEN <= limit as usize);
        // One byte more is too large for this receiver.
        m.payload = Bytes::from(vec![0; len + 1]);
        let e = encode_batches(&mut Vec::new(), &[m], &ME, u64::MAX, limit, BATCH_BYTES);
        assert_eq!((e.messages, e.too_large), (0, 1));
    }

    #[test]
    fn budget_is_the_smaller_of_batch_and_frame() {
        assert_eq!(batch_budget(1 << 20, BATCH_BYTES), BATCH_BYTES);
        assert_eq!(batch_budget(4096, BATCH_BYTES), 4096 - BATCH_BODY_OVERHEAD);
        assert_eq!(batch_budget(10, BATCH_BYTES), 0);
    }

    proptest! {
        /// Whatever the sizes and the receiver's limit: every frame fits the
        /// limit, messages come out in order, and exactly those that cannot
        /// fit alone are skipped.
        #[test]
        fn frames_fit_the_receiver_and_keep_order(
            sizes in proptest::collection::vec((0usize..3000, 0usize..4), 1..80),
            limit in 200u32..20_000,
        ) {
            let names: Vec<TopicName> = (0..4).map(|i| TopicName::from(format!("topic.{i}"))).collect();
            let msgs: Vec<OutMsg> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(len, t))| msg(i as u64 + 1, &names[t], len))
                .collect();
            let mut buf = Vec::new();
            let e = encode_batches(&mut buf, &msgs, &ME, 3, limit, BATCH_BYTES);
            let got = frames(&buf, limit);
            prop_assert_eq!(got.len() as u64, e.frames);
            prop_assert!(got.iter().all(|f| f.0 <= limit as usize));
            let budget = batch_budget(limit, BATCH_BYTES);
            let fits: Vec<u64> = msgs
                .iter()
                .filter(|m| m.encoded_size() + m.topic.len() + 2 <= budget)
                .map(|m| m.seq)
                .collect();
            let seqs: Vec<u64> = got.iter().flat_map(|f| f.3.iter().map(|m| m.0)).collect();
            prop_assert_eq!(&seqs, &fits);
            prop_assert_eq!(e.messages, fits.len());
            prop_assert_eq!(e.too_large, msgs.len() - fits.len());
            prop_assert_eq!(e.refused, 0);
        }
    }
}
