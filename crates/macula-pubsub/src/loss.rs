//! Loss reports: what a node dropped for one receiver, per publisher and
//! topic, kept until that receiver's sender writes them as PUBLISH_DROPPED
//! frames ahead of its next batch (docs/PROTOCOL.md §5.3, "Loss reports").
//!
//! A report is bounded: at most [`MAX_REPORT_TOPICS`] (publisher, topic)
//! entries; drops beyond them are still counted, under no topic (the
//! receiver then tells every subscription). This module must not know
//! about queues, peers or time.

use std::collections::HashMap;
use std::sync::Arc;

use macula_wire::pubsub::{
    PublishDropped, DROPPED_BODY_OVERHEAD, DROPPED_ENTRY_OVERHEAD, MAX_DROPPED_TOPICS,
};
use macula_wire::{Message, NodeId};

use crate::batch::{Origin, OutMsg};
use crate::event::TopicName;

/// Distinct (publisher, topic) entries one receiver's report keeps apart.
pub const MAX_REPORT_TOPICS: usize = 256;

/// What one receiver missed, not yet told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LossReport {
    /// Messages in whole frames written on the data stream the sender reset
    /// (the receiver compares with what it read).
    pub in_flight: u64,
    /// Per publisher (`None`: this node) and topic: messages dropped.
    pub(crate) dropped: HashMap<(Option<Arc<Origin>>, TopicName), u64>,
    /// Dropped messages not kept apart by topic (past `MAX_REPORT_TOPICS`),
    /// reported under this node with no topic.
    pub(crate) unnamed: u64,
}

impl LossReport {
    /// Nothing to tell.
    pub fn is_empty(&self) -> bool {
        self.in_flight == 0 && self.unnamed == 0 && self.dropped.is_empty()
    }

    /// Dropped messages named in this report (`in_flight` not included).
    pub fn dropped(&self) -> u64 {
        self.unnamed + self.dropped.values().sum::<u64>()
    }

    /// `n` copies of `msg` were dropped for the receiver.
    pub fn add(&mut self, msg: &OutMsg, n: u64) {
        self.add_topic(msg.origin.clone(), &msg.topic, n);
    }

    /// `n` messages of `origin` (`None`: this node) on `topic` were dropped.
    pub fn add_topic(&mut self, origin: Option<Arc<Origin>>, topic: &TopicName, n: u64) {
        if n == 0 {
            return;
        }
        let key = (origin, topic.clone());
        if let Some(c) = self.dropped.get_mut(&key) {
            *c += n;
        } else if self.dropped.len() < MAX_REPORT_TOPICS {
            // The key names the publisher only: not the seals a forwarded
            // message's origin holds (nor the frame they pin).
            let origin = key.0.map(|o| match o.seals.is_empty() {
                true => o,
                false => Arc::new(Origin::new(o.publisher, o.epoch)),
            });
            self.dropped.insert((origin, key.1), n);
        } else {
            self.unnamed += n;
        }
    }

    /// Takes everything `other` holds.
    pub fn merge(&mut self, other: LossReport) {
        self.in_flight += other.in_flight;
        self.unnamed += other.unnamed;
        for ((origin, topic), n) in other.dropped {
            self.add_topic(origin, &topic, n);
        }
    }

    /// Appends the report as PUBLISH_DROPPED frames to `out`, none larger
    /// than `frame_limit`: one group per publisher, `in_flight` and the
    /// unnamed count under `publisher` (this node, run `epoch`). Returns the
    /// frames written.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        publisher: NodeId,
        epoch: u64,
        frame_limit: u32,
    ) -> u64 {
        let budget = (frame_limit as usize).saturating_sub(DROPPED_BODY_OVERHEAD);
        let mut groups: HashMap<(NodeId, u64), Vec<(String, u64)>> = HashMap::new();
        for ((origin, topic), n) in &self.dropped {
            let key = origin
                .as_deref()
                .map_or((publisher, epoch), |o| (o.publisher, o.epoch));
            groups.entry(key).or_default().push((topic.to_string(), *n));
        }
        // This node's own: its named drops and what was kept unnamed (`emit`
        // merges that with any too-long topic), with the in-flight count.
        let mut own = groups.remove(&(publisher, epoch)).unwrap_or_default();
        if self.unnamed > 0 {
            own.push((String::new(), self.unnamed));
        }
        let mut frames = 0;
        let mut emit = |p: NodeId, e: u64, in_flight: u64, named: Vec<(String, u64)>| {
            // A topic this receiver's frames cannot hold is reported under no
            // topic instead (one entry for all of them).
            let (mut topics, too_long): (Vec<_>, Vec<_>) = named
                .into_iter()
                .partition(|(t, _)| t.len() + DROPPED_ENTRY_OVERHEAD <= budget);
            let unnamed: u64 = too_long.iter().map(|(_, n)| n).sum();
            if unnamed > 0 {
                match topics.iter_mut().find(|(t, _)| t.is_empty()) {
                    Some(entry) => entry.1 += unnamed,
                    None => topics.push((String::new(), unnamed)),
                }
            }
            topics.sort();
            let mut chunk: Vec<(String, u64)> = Vec::new();
            let mut bytes = 0;
            let mut in_flight = in_flight;
            let mut rest = topics.into_iter().peekable();
            loop {
                let next = rest.peek();
                let flush = match next {
                    None => true,
                    Some((t, _)) => {
                        chunk.len() == MAX_DROPPED_TOPICS
                            || bytes + t.len() + DROPPED_ENTRY_OVERHEAD > budget
                    }
                };
                if flush && (!chunk.is_empty() || in_flight > 0) {
                    let d = PublishDropped {
                        publisher: p,
                        epoch: e,
                        in_flight,
                        topics: std::mem::take(&mut chunk),
                    };
                    if Message::PublishDropped(d)
                        .encode_frame(out, frame_limit)
                        .is_ok()
                    {
                        frames += 1;
                    }
                    in_flight = 0;
                    bytes = 0;
                }
                let Some((t, n)) = rest.next() else { break };
                bytes += t.len() + DROPPED_ENTRY_OVERHEAD;
                chunk.push((t, n));
            }
        };
        if self.in_flight > 0 || !own.is_empty() {
            emit(publisher, epoch, self.in_flight, own);
        }
        let mut others: Vec<_> = groups.into_iter().collect();
        others.sort_by_key(|((p, e), _)| (*p, *e));
        for ((p, e), topics) in others {
            emit(p, e, 0, topics);
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use macula_wire::FrameDecoder;

    fn msg(topic: &str, origin: Option<Arc<Origin>>) -> OutMsg {
        OutMsg {
            seq: 1,
            topic: TopicName::from(topic),
            payload: Bytes::new(),
            extra: None,
            origin,
            seal: None,
        }
    }

    fn decode_all(buf: &[u8]) -> Vec<PublishDropped> {
        let dec = FrameDecoder::new(u32::MAX);
        let mut at = 0;
        let mut v = Vec::new();
        while let Ok(Some((f, used))) = dec.decode(&buf[at..]) {
            match Message::decode(f.header.msg_type, f.body) {
                Ok(Message::PublishDropped(d)) => v.push(d),
                other => panic!("not a loss report: {other:?}"),
            }
            at += used;
        }
        assert_eq!(at, buf.len());
        v
    }

    #[test]
    fn counts_add_up_per_publisher_and_topic() {
        let me = NodeId::from_bytes([1; 32]);
        let other = Arc::new(Origin::new(NodeId::from_bytes([2; 32]), 9));
        let mut r = LossReport::default();
        assert!(r.is_empty());
        r.add(&msg("a", None), 2);
        r.add(&msg("a", None), 1);
        r.add(&msg("b", None), 0);
        r.add(&msg("a", Some(other.clone())), 4);
        assert_eq!(r.dropped(), 7);
        let mut more = LossReport {
            in_flight: 5,
            ..LossReport::default()
        };
        more.add(&msg("b", None), 1);
        r.merge(more);
        assert_eq!((r.dropped(), r.in_flight), (8, 5));
        let mut buf = Vec::new();
        assert_eq!(r.encode(&mut buf, me, 3, 1 << 20), 2);
        let frames = decode_all(&buf);
        assert_eq!(frames[0].publisher, me);
        assert_eq!(frames[0].epoch, 3);
        assert_eq!(frames[0].in_flight, 5);
        assert_eq!(
            frames[0].topics,
            vec![("a".to_string(), 3), ("b".to_string(), 1)]
        );
        assert_eq!(frames[1].publisher, other.publisher);
        assert_eq!(frames[1].epoch, 9);
        assert_eq!(frames[1].in_flight, 0);
        assert_eq!(frames[1].topics, vec![("a".to_string(), 4)]);
    }

    #[test]
    fn entries_are_bounded_and_frames_fit_the_receiver() {
        let me = NodeId::from_bytes([1; 32]);
        let mut r = LossReport::default();
        for i in 0..MAX_REPORT_TOPICS + 10 {
            r.add(&msg(&format!("topic.number.{i:04}"), None), 1);
        }
        assert_eq!(r.dropped.len(), MAX_REPORT_TOPICS);
        assert_eq!(r.unnamed, 10);
        assert_eq!(r.dropped(), MAX_REPORT_TOPICS as u64 + 10);
        // Small frames: many of them, each within the limit, nothing lost.
        let limit = 400;
        let mut buf = Vec::new();
        let n = r.encode(&mut buf, me, 1, limit);
        let frames = decode_all(&buf);
        assert_eq!(frames.len() as u64, n);
        assert!(n > 10, "{n} frames");
        assert!(frames.iter().all(|f| f.body_len() <= limit as usize));
        let total: u64 = frames.iter().flat_map(|f| &f.topics).map(|t| t.1).sum();
        assert_eq!(total, MAX_REPORT_TOPICS as u64 + 10);
        assert!(frames
            .iter()
            .flat_map(|f| &f.topics)
            .any(|(t, n)| t.is_empty() && *n == 10));
    }

    #[test]
    fn frames_hold_as_many_entries_as_the_budget_allows() {
        let me = NodeId::from_bytes([1; 32]);
        let mut r = LossReport::default();
        // 40 topics of 17 bytes: each entry is budgeted at 17 + 12 bytes.
        for i in 0..40 {
            r.add(&msg(&format!("topic.number.{i:04}"), None), 1);
        }
        let more = LossReport {
            in_flight: 2,
            ..LossReport::default()
        };
        r.merge(more.clone());
        r.merge(more);
        assert_eq!(r.in_flight, 4);
        let limit = DROPPED_BODY_OVERHEAD as u32 + 10 * (17 + DROPPED_ENTRY_OVERHEAD as u32);
        let mut buf = Vec::new();
        assert_eq!(r.encode(&mut buf, me, 1, limit), 4, "10 entries a frame");
        let frames = decode_all(&buf);
        assert!(frames.iter().all(|f| f.topics.len() == 10));
        assert_eq!(frames[0].in_flight, 4);
        assert!(frames[1..].iter().all(|f| f.in_flight == 0));
        // One byte less: 9 a frame.
        let mut buf = Vec::new();
        assert_eq!(r.encode(&mut buf, me, 1, limit - 1), 5);
    }

    #[test]
    fn a_topic_too_long_for_the_receiver_is_reported_unnamed() {
        let me = NodeId::from_bytes([1; 32]);
        let mut r = LossReport::default();
        r.add(&msg(&"x".repeat(300), None), 2);
        let mut buf = Vec::new();
        assert_eq!(r.encode(&mut buf, me, 1, 200), 1);
        assert_eq!(decode_all(&buf)[0].topics, vec![(String::new(), 2)]);
    }

    #[test]
    fn merging_keeps_unnamed_counts_and_a_topic_that_just_fits_is_named() {
        let me = NodeId::from_bytes([1; 32]);
        let mut full = LossReport::default();
        for i in 0..MAX_REPORT_TOPICS + 3 {
            full.add(&msg(&format!("t{i}"), None), 1);
        }
        let mut r = LossReport {
            unnamed: 2,
            ..LossReport::default()
        };
        r.merge(full);
        assert_eq!((r.unnamed, r.dropped()), (5, MAX_REPORT_TOPICS as u64 + 5));
        // A topic of exactly the frame's room for one entry keeps its name.
        let limit = 300u32;
        let room = limit as usize - DROPPED_BODY_OVERHEAD - DROPPED_ENTRY_OVERHEAD;
        let mut one = LossReport::default();
        one.add(&msg(&"y".repeat(room), None), 1);
        let mut buf = Vec::new();
        assert_eq!(one.encode(&mut buf, me, 1, limit), 1);
        assert_eq!(decode_all(&buf)[0].topics[0].0.len(), room);
        // Topics too long for the frame are reported unnamed, together with
        // the count already kept unnamed: one entry.
        let mut long = LossReport::default();
        for i in 0..30 {
            long.add(&msg(&format!("{}{i:02}", "z".repeat(room)), None), 1);
        }
        long.add(&msg("short", None), 4);
        long.unnamed = 5;
        let mut buf = Vec::new();
        assert_eq!(long.encode(&mut buf, me, 1, limit), 1);
        let got = decode_all(&buf);
        assert_eq!(
            got[0].topics,
            vec![(String::new(), 35), ("short".to_string(), 4)],
            "one unnamed entry for all of them"
        );
    }

    #[test]
    fn in_flight_alone_is_reported() {
        let me = NodeId::from_bytes([1; 32]);
        let r = LossReport {
            in_flight: 3,
            ..LossReport::default()
        };
        assert!(!r.is_empty());
        let mut buf = Vec::new();
        assert_eq!(r.encode(&mut buf, me, 1, 1000), 1);
        let f = &decode_all(&buf)[0];
        assert_eq!((f.in_flight, f.topics.len()), (3, 0));
    }
}
