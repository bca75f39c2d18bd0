//! Properties of `PubSubCore` under random operations with virtual time:
//! each node receives one publisher's messages in increasing sequence order
//! without duplicates, whatever queues are drained, fail, stall, or are set
//! aside; and every message queued is accounted for (in flight, written, or
//! dropped and counted).

use std::collections::HashMap;

use bytes::Bytes;
use macula_pubsub::{
    segment_name, Action, Config, InterestRecord, Millis, OutMsg, Patience, PeerDown, PeerRef,
    PubSubCore, PublishOptions, Role, RouteStep, Stall, Transmit,
};
use macula_wire::frame::FrameDecoder;
use macula_wire::{NodeId, PublishBatchView};
use proptest::prelude::*;

type Core = PubSubCore<u32, ()>;

fn id(b: u8) -> NodeId {
    NodeId::from_bytes([b; 32])
}

#[derive(Clone, Debug)]
enum Op {
    Publish { topic: u8, len: u16 },
    Drain { node: u8, limit: u16 },
    Fail { node: u8 },
    Stall { node: u8 },
    Down { node: u8 },
    Up { node: u8 },
    Unreachable { node: u8 },
    Advance { ms: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u16..3000).prop_map(|(topic, len)| Op::Publish { topic, len }),
        3 => (2u8..5, 200u16..9000).prop_map(|(node, limit)| Op::Drain { node, limit }),
        1 => (2u8..5).prop_map(|node| Op::Fail { node }),
        1 => (2u8..5).prop_map(|node| Op::Stall { node }),
        1 => (2u8..5).prop_map(|node| Op::Down { node }),
        1 => (2u8..5).prop_map(|node| Op::Up { node }),
        1 => (2u8..5).prop_map(|node| Op::Unreachable { node }),
        2 => (0u16..20_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// Records of nodes 2, 3, 4 under the realm-wide name: every topic matches.
fn answer(c: &mut Core, acts: &[Action<()>], now: Millis) {
    for a in acts {
        if let Action::LookupInterest { name, .. } = a {
            let records = if *name == segment_name("r", "*") {
                (2..5)
                    .map(|n| InterestRecord {
                        publisher: id(n),
                        seq: 1,
                        value: b"**".to_vec(),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            c.handle_interest_found(name, Ok(records), now);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_node_gets_messages_in_order_and_all_are_accounted_for(ops in proptest::collection::vec(op(), 1..120)) {
        let mut cfg = Config::new(id(1), 9, "r", Role::Node, 1 << 20);
        cfg.limits.peer_queue_capacity = 16;
        cfg.out.stall_timeout = Millis(5_000);
        let mut c = Core::new(cfg);
        let mut now = Millis(0);
        let mut queues: HashMap<NodeId, PeerRef> = HashMap::new();
        let mut last_seen: HashMap<NodeId, u64> = HashMap::new();
        let mut msgs: Vec<OutMsg> = Vec::new();
        let topics = ["a.x", "b.y", "c"];
        let count = |c: &Core| c.counters().remote_dropped_total.get();
        for op in ops {
            let dropped_before = count(&c);
            let mut model_drop = 0u64;
            match op {
                Op::Publish { topic, len } => {
                    let route = loop {
                        match c.route(topics[topic as usize], now, Patience::Wait).unwrap() {
                            RouteStep::Ready(r) => break r,
                            RouteStep::Wait { .. } => {
                                let acts: Vec<_> = std::iter::from_fn(|| c.poll_action()).collect();
                                answer(&mut c, &acts, now);
                            }
                        }
                    };
                    let mut out = Vec::new();
                    let p = c
                        .publish_routed(&route, Bytes::from(vec![0; len as usize]), PublishOptions::default(), now, &mut out)
                        .unwrap();
                    model_drop += u64::from(p.dropped);
                    for a in std::iter::from_fn(|| c.poll_action()) {
                        if let Action::Start { peer, node, .. } = a {
                            queues.insert(node, peer);
                        }
                    }
                    // One copy per target: queued or dropped.
                    prop_assert_eq!((p.queued + p.dropped) as usize, route.nodes().count());
                }
                Op::Drain { node, limit } => {
                    let Some(&q) = queues.get(&id(node)) else { continue };
                    c.handle_peer_up(&id(node), u32::from(limit));
                    msgs.clear();
                    if let Transmit::Batch(b) = c.poll_transmit(q, &mut msgs, now) {
                        let mut buf = Vec::new();
                        let enc = b.encode(&mut buf, &msgs);
                        c.handle_written(q, &b, &msgs, enc, now);
                        model_drop += (b.n - enc.messages) as u64;
                        let dec = FrameDecoder::new(b.frame_limit);
                        let mut rest = &buf[..];
                        while let Some((f, used)) = dec.decode(rest).unwrap() {
                            rest = &rest[used..];
                            prop_assert!(f.body.len() <= usize::from(limit));
                            if f.header.msg_type == macula_wire::MessageType::PublishDropped as u8 {
                                // A loss report (what was too large before).
                                continue;
                            }
                            let v = PublishBatchView::decode(f.body).unwrap();
                            for e in &v.entries {
                                let last = last_seen.entry(id(node)).or_insert(0);
                                prop_assert!(e.seq > *last, "seq {} after {}", e.seq, last);
                                *last = e.seq;
                            }
                        }
                    }
                }
                Op::Fail { node } => {
                    let Some(&q) = queues.get(&id(node)) else { continue };
                    msgs.clear();
                    if let Transmit::Batch(b) = c.poll_transmit(q, &mut msgs, now) {
                        c.handle_send_failed(q, &msgs, b.report, now);
                        model_drop += b.n as u64;
                    }
                }
                Op::Stall { node } => {
                    let Some(&q) = queues.get(&id(node)) else { continue };
                    msgs.clear();
                    let taken = c.poll_transmit(q, &mut msgs, now);
                    let later = now.saturating_add(Millis(5_000));
                    let before = c.inflight();
                    match c.handle_stall(q, later) {
                        Stall::CutOff { dropped } => {
                            prop_assert_eq!(before - c.inflight(), dropped);
                            model_drop += dropped;
                        }
                        Stall::Wait(_) => prop_assert!(msgs.is_empty()),
                    }
                    if !msgs.is_empty() {
                        // Taken but the queue was cut: a late report counts nothing.
                        if let Transmit::Batch(b) = &taken {
                            c.handle_written(q, b, &msgs, Default::default(), later);
                        }
                    }
                }
                Op::Down { node } => {
                    let before = c.inflight();
                    c.handle_peer_down(&id(node), PeerDown::Left, now);
                    model_drop += before - c.inflight();
                }
                Op::Up { node } => c.handle_peer_up(&id(node), 1 << 20),
                Op::Unreachable { node } => {
                    let Some(&q) = queues.get(&id(node)) else { continue };
                    let before = c.inflight();
                    c.handle_unreachable(q, now);
                    model_drop += before - c.inflight();
                }
                Op::Advance { ms } => now = now.saturating_add(Millis(u64::from(ms))),
            }
            // Every drop the model saw was counted, and nothing else was.
            prop_assert_eq!(count(&c) - dropped_before, model_drop);
        }
        // Finally every queue drains: nothing in flight is left unaccounted.
        for (_, q) in queues {
            msgs.clear();
            if let Transmit::Batch(b) = c.poll_transmit(q, &mut msgs, now) {
                let mut buf = Vec::new();
                let enc = b.encode(&mut buf, &msgs);
                c.handle_written(q, &b, &msgs, enc, now);
            }
        }
        prop_assert_eq!(c.inflight(), 0);
    }
}
