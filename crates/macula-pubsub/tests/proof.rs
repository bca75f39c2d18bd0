//! Proved publishers (PROTOCOL.md §5.3, "Proved publishers"): a client
//! seals its batches, its gateway forwards the seal with each message (the
//! digests of the ones a receiver does not get), receivers verify; a
//! forwarded batch whose publisher is not proved is dropped and counted,
//! never delivered.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use macula_pubsub::{
    segment_name, Action, BatchReceiver, Config, Event, InterestRecord, Millis, OutMsg, Patience,
    Proof, PubSubCore, PublishOptions, Role, Route, RouteStep, Signer, Transmit,
};
use macula_wire::frame::FrameDecoder;
use macula_wire::{BatchItem, NodeId, PublishBatchView};

type Core = PubSubCore<u32, ()>;

const REALM: &str = "r";

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

fn id_of(k: &SigningKey) -> NodeId {
    NodeId::from_public_key(k.verifying_key().as_bytes())
}

fn id(b: u8) -> NodeId {
    id_of(&key(b))
}

fn node(me: u8) -> Core {
    PubSubCore::new(Config::new(id(me), 100, REALM, Role::Node, 1 << 20))
}

fn client(me: u8, gateway: u8, sign: bool) -> Core {
    client_kind(me, gateway, sign, false)
}

/// A client whose frames of small messages are sealed by topic groups
/// (kind 3, `groups`) or, as before, in seals of kind 2 of at most 256.
fn client_kind(me: u8, gateway: u8, sign: bool, groups: bool) -> Core {
    let mut c = Config::new(id(me), 150, REALM, Role::Client, 1 << 20);
    if sign {
        let s = Signer::new(key(me));
        c.signer = Some(Arc::new(match groups {
            true => s,
            false => s.without_groups(),
        }));
    }
    let mut c = PubSubCore::new(c);
    c.set_gateway(Some(id(gateway)));
    c
}

fn actions(c: &mut Core) -> Vec<Action<()>> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn starts(c: &mut Core) -> Vec<(macula_pubsub::PeerRef, NodeId)> {
    actions(c)
        .iter()
        .filter_map(|a| match a {
            Action::Start { peer, node, .. } => Some((*peer, *node)),
            _ => None,
        })
        .collect()
}

/// Routes `topic` on `c` with `records` (segment, node, patterns) as the
/// DHT's answer.
fn route(c: &mut Core, records: &[(&str, u8, &str)], topic: &str) -> Arc<Route> {
    let mut dht: HashMap<String, Vec<InterestRecord>> = HashMap::new();
    for (seg, n, p) in records {
        dht.entry(segment_name(REALM, seg))
            .or_default()
            .push(InterestRecord {
                publisher: id(*n),
                seq: 1,
                value: p.as_bytes().to_vec(),
            });
    }
    for _ in 0..4 {
        let step = c.route(topic, Millis(0), Patience::Wait).unwrap();
        let acts = actions(c);
        match step {
            RouteStep::Ready(r) => return r,
            RouteStep::Wait { .. } => {
                for a in &acts {
                    if let Action::LookupInterest { name, .. } = a {
                        let found = dht.get(name).cloned().unwrap_or_default();
                        c.handle_interest_found(name, Ok(found), Millis(0));
                    }
                }
            }
        }
    }
    panic!("no route");
}

fn transmit(c: &mut Core, peer: macula_pubsub::PeerRef) -> Vec<Bytes> {
    let mut msgs: Vec<OutMsg> = Vec::new();
    let Transmit::Batch(b) = c.poll_transmit(peer, &mut msgs, Millis(0)) else {
        return Vec::new();
    };
    let mut buf = Vec::new();
    let encoded = b.encode(&mut buf, &msgs);
    c.handle_written(peer, &b, &msgs, encoded, Millis(0));
    let dec = FrameDecoder::new(b.frame_limit);
    let mut frames = Vec::new();
    let mut rest = &buf[..];
    while let Some((f, used)) = dec.decode(rest).unwrap() {
        if f.header.msg_type == macula_wire::MessageType::PublishBatch as u8 {
            frames.push(Bytes::copy_from_slice(f.body));
        }
        rest = &rest[used..];
    }
    frames
}

fn receive(
    to: &mut Core,
    from: NodeId,
    bodies: &[Bytes],
    rx: &mut BatchReceiver<u32>,
) -> Vec<Event> {
    let mut got = Vec::new();
    for b in bodies {
        to.handle_batch(
            from,
            macula_wire::MessageType::PublishBatch as u8,
            b,
            rx,
            Millis(1),
        )
        .unwrap();
        rx.deliver(|_, e| got.append(e));
    }
    got
}

fn unproved(c: &Core) -> u64 {
    c.counters().unproved_dropped_total.get()
}

/// A signing client (50) publishes `topics` through gateway 1; returns the
/// gateway after it received and forwarded them (routes: node 2 wants
/// `t.*`, node 3 wants `u.*`).
fn client_through_gateway(topics: &[&str], sign: bool) -> Core {
    let mut c = client(50, 1, sign);
    for (i, t) in topics.iter().enumerate() {
        c.publish_upstream(
            t,
            Bytes::from(format!("m{i}")),
            PublishOptions {
                headers: vec![("k".into(), format!("v{i}"))],
                ..Default::default()
            },
            Millis(0),
            &mut Vec::new(),
        )
        .unwrap();
    }
    let (q, to) = starts(&mut c)[0];
    assert_eq!(to, id(1));
    let bodies = transmit(&mut c, q);
    assert_eq!(bodies[0][0], if sign { 3 } else { 1 }, "batch format");
    let mut gw = node(1);
    let mut rx = BatchReceiver::new(true);
    let records = [("t", 2, "t.*"), ("u", 3, "u.*")];
    for b in &bodies {
        gw.handle_batch(
            id(50),
            macula_wire::MessageType::PublishBatch as u8,
            b,
            &mut rx,
            Millis(1),
        )
        .unwrap();
        let view = PublishBatchView::decode(b).unwrap();
        let routes: Vec<_> = view
            .topics
            .iter()
            .map(|t| Some(route(&mut gw, &records, t)))
            .collect();
        let seals = rx.seals.clone();
        gw.forward_from_client(id(50), &view, b, &routes, &[], &seals, Millis(1));
    }
    gw
}

#[test]
fn a_sealed_client_batch_is_proved_through_its_gateway_even_in_part() {
    // Node 2 gets only the t.* messages: the others travel as digests.
    let mut gw = client_through_gateway(&["t.a", "u.b", "t.c", "u.d", "u.e"], true);
    let mut by_node: HashMap<NodeId, Vec<Bytes>> = HashMap::new();
    for (q, to) in starts(&mut gw) {
        by_node.insert(to, transmit(&mut gw, q));
    }
    for (n, want) in [(2u8, vec!["m0", "m2"]), (3, vec!["m1", "m3", "m4"])] {
        let bodies = &by_node[&id(n)];
        assert!(
            bodies.iter().all(|b| b[0] == 3),
            "forwarded sealed (kind 2)"
        );
        let mut b = node(n);
        b.subscribe("**", 7).unwrap();
        let got = receive(&mut b, id(1), bodies, &mut BatchReceiver::new(false));
        let payloads: Vec<_> = got.iter().map(|e| e.payload.clone()).collect();
        assert_eq!(
            payloads,
            want.iter()
                .map(|s| Bytes::from(s.to_string()))
                .collect::<Vec<_>>()
        );
        assert!(got
            .iter()
            .all(|e| e.publisher == id(50) && e.proof == Proof::Signed));
        assert_eq!(unproved(&b), 0);
    }
}

#[test]
fn one_signature_spans_a_clients_frames_and_proves_each_of_them() {
    // 40 messages of 4 KiB: three 64 KiB frames, one seal over all 40.
    let mut c = client(50, 1, true);
    for i in 0..40 {
        let topic = if i % 2 == 0 { "t.a" } else { "u.b" };
        let mut p = vec![b'x'; 4096];
        p.extend_from_slice(format!("{i}").as_bytes());
        c.publish_upstream(
            topic,
            Bytes::from(p),
            PublishOptions::default(),
            Millis(0),
            &mut Vec::new(),
        )
        .unwrap();
    }
    let (q, _) = starts(&mut c)[0];
    let bodies = transmit(&mut c, q);
    assert!(bodies.len() >= 3, "{} frames", bodies.len());
    let views: Vec<_> = bodies
        .iter()
        .map(|b| PublishBatchView::decode(b).unwrap())
        .collect();
    let sig = views[0].seals[0].sig;
    for v in &views {
        assert_eq!(v.seals.len(), 1);
        assert_eq!(v.seals[0].n, 40, "one seal over all the messages");
        assert_eq!(v.seals[0].sig, sig, "one signature");
        assert_eq!(v.seals[0].absent.len(), 40 - v.entries.len());
        assert!(macula_pubsub::proof::verify(v).is_ok());
    }
    // A changed message in one frame: that frame no longer verifies.
    let mut bad = bodies[1].to_vec();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    let bad = PublishBatchView::decode(&bad).unwrap();
    assert!(macula_pubsub::proof::verify(&bad).is_err());
    // Through its gateway: node 2 (t.*) and node 3 (u.*) each get their
    // half (the other half's digests computed at the gateway), node 4
    // (both) all of them (the digests as the client sent them), every
    // message proved by the one signature.
    let mut gw = node(1);
    let mut rx = BatchReceiver::new(true);
    let records = [
        ("t", 2, "t.*"),
        ("u", 3, "u.*"),
        ("t", 4, "t.*"),
        ("u", 4, "u.*"),
    ];
    let mut senders = Vec::new();
    for (b, view) in bodies.iter().zip(&views) {
        gw.handle_batch(
            id(50),
            macula_wire::MessageType::PublishBatch as u8,
            b,
            &mut rx,
            Millis(1),
        )
        .unwrap();
        let routes: Vec<_> = view
            .topics
            .iter()
            .map(|t| Some(route(&mut gw, &records, t)))
            .collect();
        let seals = rx.seals.clone();
        assert_eq!(seals.len(), view.entries.len());
        gw.forward_from_client(id(50), view, b, &routes, &[], &seals, Millis(1));
        // (`route` takes the actions of the next frame's routing.)
        senders.extend(starts(&mut gw));
    }
    assert_eq!(senders.len(), 3, "a sender to nodes 2, 3 and 4");
    for (q, to) in senders {
        let mut fwd = Vec::new();
        loop {
            let more = transmit(&mut gw, q);
            if more.is_empty() {
                break;
            }
            fwd.extend(more);
        }
        let me = (2..=4).find(|&n| id(n) == to).unwrap();
        let mut n = node(me);
        n.subscribe("**", 7).unwrap();
        let got = receive(&mut n, id(1), &fwd, &mut BatchReceiver::new(false));
        assert_eq!(got.len(), if me == 4 { 40 } else { 20 });
        assert!(got
            .iter()
            .all(|e| e.publisher == id(50) && e.proof == Proof::Signed));
        assert_eq!(unproved(&n), 0);
    }
}

#[test]
fn a_trace_context_rewritten_on_the_way_still_verifies() {
    let mut c = client(50, 1, true);
    c.publish_upstream(
        "t.a",
        Bytes::from_static(b"x"),
        PublishOptions {
            headers: vec![("traceparent".into(), "00-old".into())],
            ..Default::default()
        },
        Millis(0),
        &mut Vec::new(),
    )
    .unwrap();
    let (q, _) = starts(&mut c)[0];
    let bodies = transmit(&mut c, q);
    let mut gw = node(1);
    let mut rx = BatchReceiver::new(true);
    gw.handle_batch(
        id(50),
        macula_wire::MessageType::PublishBatch as u8,
        &bodies[0],
        &mut rx,
        Millis(1),
    )
    .unwrap();
    let view = PublishBatchView::decode(&bodies[0]).unwrap();
    let r = route(&mut gw, &[("t", 2, "t.*")], "t.a");
    let seals = rx.seals.clone();
    gw.forward_from_client(
        id(50),
        &view,
        &bodies[0],
        &[Some(r)],
        &[(0, "00-new".into())],
        &seals,
        Millis(1),
    );
    let (q, _) = starts(&mut gw)[0];
    let fwd = transmit(&mut gw, q);
    let mut b = node(2);
    b.subscribe("t.*", 7).unwrap();
    let got = receive(&mut b, id(1), &fwd, &mut BatchReceiver::new(false));
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].headers,
        vec![("traceparent".to_string(), "00-new".to_string())]
    );
    assert_eq!(got[0].proof, Proof::Signed);
}

/// Client 50 publishes `n` messages of `len` bytes (topics `t.a` and `u.b`
/// alternating, the index at the end of each payload) and writes them to
/// its gateway: the frames.
fn client_frames(n: usize, len: usize) -> Vec<Bytes> {
    client_frames_kind(n, len, false)
}

/// [`client_frames`], the client sealing frames of small messages by
/// topic groups (kind 3) when `groups`.
fn client_frames_kind(n: usize, len: usize, groups: bool) -> Vec<Bytes> {
    client_frames_fill(n, len, groups, b'x')
}

/// [`client_frames_kind`] with payloads of `fill` bytes.
fn client_frames_fill(n: usize, len: usize, groups: bool, fill: u8) -> Vec<Bytes> {
    let mut c = client_kind(50, 1, true, groups);
    for i in 0..n {
        let topic = if i % 2 == 0 { "t.a" } else { "u.b" };
        let mut p = vec![fill; len];
        p.extend_from_slice(format!("{i}").as_bytes());
        c.publish_upstream(
            topic,
            Bytes::from(p),
            PublishOptions::default(),
            Millis(0),
            &mut Vec::new(),
        )
        .unwrap();
    }
    let (q, _) = starts(&mut c)[0];
    let mut bodies = Vec::new();
    loop {
        let more = transmit(&mut c, q);
        if more.is_empty() {
            break;
        }
        bodies.extend(more);
    }
    bodies
}

#[test]
fn a_clients_frame_holds_as_many_small_messages_as_an_unsealed_one_under_several_seals() {
    // 700 messages of 64 B: one frame (an unsealed one holds about 740),
    // sealed in chunks of at most 256 messages.
    let bodies = client_frames(700, 64);
    assert_eq!(bodies.len(), 1, "one frame");
    let view = PublishBatchView::decode(&bodies[0]).unwrap();
    assert_eq!(view.entries.len(), 700);
    let sizes: Vec<usize> = view.seals.iter().map(|s| s.n).collect();
    assert_eq!(sizes, [256, 256, 188]);
    assert!(view.seals.iter().all(|s| s.absent.is_empty()));
    assert!(view.seals.windows(2).all(|w| w[0].sig != w[1].sig));
    assert_eq!(
        macula_pubsub::proof::verify(&view).map(|r| r.len()),
        Ok(700)
    );
    // Its gateway adopts the three seals unverified and forwards them:
    // node 4 (both topics) gets the frame's messages with the client's
    // seals as they came, nodes 2 and 3 their halves with the digests of
    // the others, computed at the gateway for each seal from its own
    // entries of the frame.
    let mut gw = node(1);
    let mut rx = BatchReceiver::new(true);
    gw.handle_batch(
        id(50),
        macula_wire::MessageType::PublishBatch as u8,
        &bodies[0],
        &mut rx,
        Millis(1),
    )
    .unwrap();
    assert_eq!(rx.seals.len(), 700, "adopted");
    let runs: Vec<_> = rx.seals.iter().map(|(run, _)| run.len()).collect();
    assert_eq!((runs[0], runs[256], runs[699]), (256, 256, 188));
    let records = [
        ("t", 2, "t.*"),
        ("u", 3, "u.*"),
        ("t", 4, "t.*"),
        ("u", 4, "u.*"),
    ];
    let routes: Vec<_> = view
        .topics
        .iter()
        .map(|t| Some(route(&mut gw, &records, t)))
        .collect();
    let seals = rx.seals.clone();
    gw.forward_from_client(id(50), &view, &bodies[0], &routes, &[], &seals, Millis(1));
    let senders = starts(&mut gw);
    assert_eq!(senders.len(), 3);
    for (q, to) in senders {
        let fwd = transmit(&mut gw, q);
        let me = (2..=4).find(|&n| id(n) == to).unwrap();
        let mut n = node(me);
        n.subscribe("**", 7).unwrap();
        let got = receive(&mut n, id(1), &fwd, &mut BatchReceiver::new(false));
        let want: Vec<usize> = (0..700)
            .filter(|i| me == 4 || (i % 2 == 0) == (me == 2))
            .collect();
        let have: Vec<usize> = got
            .iter()
            .map(|e| {
                let p = std::str::from_utf8(&e.payload[64..]).unwrap();
                p.parse().unwrap()
            })
            .collect();
        assert_eq!(have, want, "node {me}");
        assert!(got
            .iter()
            .all(|e| e.publisher == id(50) && e.proof == Proof::Signed));
        assert_eq!(unproved(&n), 0);
    }
}

#[test]
fn one_forged_seal_of_several_drops_only_its_messages() {
    let body = client_frames(600, 16).remove(0);
    let view = PublishBatchView::decode(&body).unwrap();
    assert_eq!(view.seals.len(), 3);
    // Seals of kind 2, each with all its messages: checked over them
    // hashed whole, and the digests' hash each carries.
    assert_eq!(body[0], 3, "format 3");
    assert!(view
        .seals
        .iter()
        .all(|s| s.carried.is_some() && s.absent.is_empty()));
    let (a, b) = (view.seals[0].n, view.seals[0].n + view.seals[1].n);
    // Three forgeries of the middle seal's messages, as a full node
    // forwarding the client's frame could make them.
    let entries: Vec<_> = view
        .entries
        .iter()
        .map(|e| (e.seq, e.topic_index, e.payload.to_vec()))
        .collect();
    let encode = |payload_of: &dyn Fn(usize) -> Vec<u8>, seals: &[macula_wire::Seal]| {
        let items = entries
            .iter()
            .enumerate()
            .map(|(i, (seq, t, _))| BatchItem {
                seq: *seq,
                topic_index: *t,
                payload: Box::leak(payload_of(i).into_boxed_slice()),
                headers: &[],
                message_id: None,
            });
        let mut buf = Vec::new();
        macula_wire::encode_sealed_batch_frame(
            &mut buf,
            1 << 20,
            &view.publisher,
            view.epoch,
            &view.topics,
            items,
            seals,
        )
        .unwrap();
        Bytes::copy_from_slice(&buf[macula_wire::frame::FRAME_HEADER_LEN..])
    };
    let genuine = |i: usize| entries[i].2.clone();
    let changed = |i: usize| {
        let mut p = entries[i].2.clone();
        if i == a + 3 {
            p[0] ^= 1;
        }
        p
    };
    // The middle seal signed again by the forwarder's own key.
    let mut resigned = view.seals.clone();
    let digests: Vec<[u8; 32]> = entries[a..b]
        .iter()
        .map(|(seq, t, p)| macula_wire::event_digest(*seq, view.topics[*t], p, [], None))
        .collect();
    resigned[1] = Signer::new(key(1)).seal(&view.publisher, view.epoch, &digests);
    // The middle seal's signature replaced by the first seal's.
    let mut swapped = view.seals.clone();
    swapped[1].sig = swapped[0].sig;
    // The digests' hash the middle seal carries changed.
    let mut carried = view.seals.clone();
    carried[1].carried = Some([9; 32]);
    // The middle seal presented as one of kind 1 (its signature is over
    // the kind 2 tag: it cannot be read as a signature over digests).
    let mut downgraded = view.seals.clone();
    downgraded[1].carried = None;
    // Its kind 2 signature over what the first seal carries.
    let mut mixed = view.seals.clone();
    mixed[1].carried = mixed[0].carried;
    let cases: [(&str, Bytes); 6] = [
        ("a payload changed", encode(&changed, &view.seals)),
        ("sealed by another key", encode(&genuine, &resigned)),
        ("another seal's signature", encode(&genuine, &swapped)),
        (
            "the digests' hash carried changed",
            encode(&genuine, &carried),
        ),
        ("read as kind 1", encode(&genuine, &downgraded)),
        ("another seal's digests' hash", encode(&genuine, &mixed)),
    ];
    for (what, forged) in cases {
        let mut n = node(2);
        n.subscribe("**", 7).unwrap();
        let mut rx = BatchReceiver::new(false);
        let got = receive(&mut n, id(1), &[forged], &mut rx);
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        let want: Vec<u64> = entries[..a]
            .iter()
            .chain(&entries[b..])
            .map(|e| e.0)
            .collect();
        assert_eq!(seqs, want, "{what}: the other seals' messages delivered");
        assert!(got.iter().all(|e| e.proof == Proof::Signed));
        assert_eq!(unproved(&n), (b - a) as u64, "{what}: counted");
        assert!(rx.unproved.is_some(), "{what}: told");
        assert_eq!(
            n.counters().received_remote_total.get(),
            (entries.len() - (b - a)) as u64
        );
    }
    // Every seal forged: the batch is dropped whole.
    let mut all = view.seals.clone();
    for s in &mut all {
        s.sig = [7; 64];
    }
    let mut n = node(2);
    n.subscribe("**", 7).unwrap();
    let mut rx = BatchReceiver::new(false);
    let got = receive(&mut n, id(1), &[encode(&genuine, &all)], &mut rx);
    assert!(got.is_empty());
    assert_eq!(unproved(&n), entries.len() as u64);
    // And the genuine frame delivers everything.
    let mut n = node(2);
    n.subscribe("**", 7).unwrap();
    let got = receive(
        &mut n,
        id(1),
        &[encode(&genuine, &view.seals)],
        &mut BatchReceiver::new(false),
    );
    assert_eq!(got.len(), entries.len());
    assert_eq!(unproved(&n), 0);
}

/// `view`'s messages again (entry `i`'s payload `payload_of(i)`) under
/// `seals`: what a forwarding full node could send.
fn reencode(
    view: &PublishBatchView<'_>,
    payload_of: &dyn Fn(usize) -> Vec<u8>,
    seals: &[macula_wire::Seal],
) -> Bytes {
    let items = view.entries.iter().enumerate().map(|(i, e)| BatchItem {
        seq: e.seq,
        topic_index: e.topic_index,
        payload: Box::leak(payload_of(i).into_boxed_slice()),
        headers: &[],
        message_id: None,
    });
    let mut buf = Vec::new();
    macula_wire::encode_sealed_batch_frame(
        &mut buf,
        1 << 20,
        &view.publisher,
        view.epoch,
        &view.topics,
        items,
        seals,
    )
    .unwrap();
    Bytes::copy_from_slice(&buf[macula_wire::frame::FRAME_HEADER_LEN..])
}

#[test]
fn a_receiver_of_part_of_a_whole_seal_checks_digests_and_tampering_drops_only_that_seal() {
    // 600 small messages, t.a and u.b alternating: one client frame, three
    // seals of kind 2. Node 2 (t.*) gets half of each seal: its copy
    // carries, per seal, the other half's digests and the messages' whole
    // hash (both computed at the gateway); node 4 (both) gets all of
    // them: its copy carries the digests' hashes as the client sent them.
    let body = client_frames(600, 16).remove(0);
    let mut gw = node(1);
    let mut rx = BatchReceiver::new(true);
    gw.handle_batch(
        id(50),
        macula_wire::MessageType::PublishBatch as u8,
        &body,
        &mut rx,
        Millis(1),
    )
    .unwrap();
    let view = PublishBatchView::decode(&body).unwrap();
    let records = [("t", 2, "t.*"), ("t", 4, "t.*"), ("u", 4, "u.*")];
    let routes: Vec<_> = view
        .topics
        .iter()
        .map(|t| Some(route(&mut gw, &records, t)))
        .collect();
    let seals = rx.seals.clone();
    gw.forward_from_client(id(50), &view, &body, &routes, &[], &seals, Millis(1));
    let mut copies: HashMap<NodeId, Vec<Bytes>> = HashMap::new();
    for (q, to) in starts(&mut gw) {
        copies.insert(to, transmit(&mut gw, q));
    }
    let all = &copies[&id(4)];
    assert_eq!(all.len(), 1);
    let all_view = PublishBatchView::decode(&all[0]).unwrap();
    assert_eq!(
        all_view.seals, view.seals,
        "the client's seals as they came"
    );
    let half = &copies[&id(2)];
    assert_eq!(half.len(), 1);
    let hv = PublishBatchView::decode(&half[0]).unwrap();
    assert_eq!(hv.entries.len(), 300);
    assert_eq!(hv.seals.len(), 3);
    for (s, orig) in hv.seals.iter().zip(&view.seals) {
        assert_eq!(s.sig, orig.sig);
        assert_eq!(s.absent.len(), s.n - s.present_count());
        assert!(!s.absent.is_empty() && s.carried.is_some());
        assert_ne!(s.carried, orig.carried, "the whole hash, not the digests'");
    }
    let a = hv.seals[0].present_count();
    let b = a + hv.seals[1].present_count();
    let deliver = |bytes: Bytes| {
        let mut n = node(2);
        n.subscribe("**", 7).unwrap();
        let mut rx = BatchReceiver::new(false);
        let got = receive(&mut n, id(1), &[bytes], &mut rx);
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        (seqs, unproved(&n), rx.unproved.is_some())
    };
    // Genuine: all 300, proved.
    let (seqs, bad, told) = deliver(half[0].clone());
    assert_eq!(seqs.len(), 300);
    assert_eq!((bad, told), (0, false));
    // Each forgery of the middle seal drops its messages only, counted.
    let genuine = |i: usize| hv.entries[i].payload.to_vec();
    let changed = |i: usize| {
        let mut p = hv.entries[i].payload.to_vec();
        if i == a + 1 {
            p[0] ^= 1;
        }
        p
    };
    let mut digest = hv.seals.clone();
    let mut hashes = digest[1].absent.to_vec();
    hashes[5][0] ^= 1;
    digest[1].absent = hashes.into();
    let mut whole = hv.seals.clone();
    whole[1].carried = Some([9; 32]);
    let mut moved = hv.seals.clone();
    let mut hashes = moved[1].absent.to_vec();
    hashes.swap(0, 1);
    moved[1].absent = hashes.into();
    let want: Vec<u64> = hv.entries[..a]
        .iter()
        .chain(&hv.entries[b..])
        .map(|e| e.seq)
        .collect();
    for (what, forged) in [
        ("a payload changed", reencode(&hv, &changed, &hv.seals)),
        (
            "an absent message's digest changed",
            reencode(&hv, &genuine, &digest),
        ),
        ("two digests swapped", reencode(&hv, &genuine, &moved)),
        (
            "the whole hash carried changed",
            reencode(&hv, &genuine, &whole),
        ),
    ] {
        let (seqs, bad, told) = deliver(forged);
        assert_eq!(seqs, want, "{what}: the other seals' messages delivered");
        assert_eq!(bad, (b - a) as u64, "{what}: counted");
        assert!(told, "{what}: told");
    }
    // The same half with the digests' hash of the complete seal instead
    // of the whole hash: not what the signature signed over these.
    let mut swapped = hv.seals.clone();
    swapped[1].carried = view.seals[1].carried;
    let (seqs, bad, _) = deliver(reencode(&hv, &genuine, &swapped));
    assert_eq!((seqs, bad), (want, (b - a) as u64));
}

#[test]
fn small_messages_are_sealed_whole_large_ones_and_spanning_seals_by_digests() {
    // One small message, alone in its frame: kind 2 (format 3).
    let small = client_frames(1, 64);
    assert_eq!(small.len(), 1);
    assert_eq!(small[0][0], 3);
    // One 16 KiB message alone: kind 1 (format 2), no second pass over it.
    let large = client_frames(1, 16 * 1024);
    assert_eq!(large.len(), 1);
    assert_eq!(large[0][0], 2);
    // A seal spanning frames: kind 1, each frame verifies.
    let spanning = client_frames(10, 8 * 1024);
    assert!(spanning.len() > 1);
    for b in &spanning {
        assert_eq!(b[0], 2);
        let v = PublishBatchView::decode(b).unwrap();
        assert!(v.seals.iter().all(|s| s.carried.is_none()));
        assert!(macula_pubsub::proof::verify(&v).is_ok());
    }
}

#[test]
fn a_whole_seal_verified_without_digests_still_gives_copies_what_they_need() {
    // A node that verified a complete seal of kind 2 over the messages
    // hashed whole computed no digest; forwarding some of them on (to its
    // own clients) it needs them and the whole hash: computed from the
    // frame it kept, the same as the publisher's.
    let body = client_frames(300, 16).remove(0);
    let view = PublishBatchView::decode(&body).unwrap();
    let v = macula_pubsub::proof::verify_each_with(
        &view,
        Some(&body),
        &mut macula_pubsub::KeyCache::default(),
    )
    .unwrap();
    assert!(v.failed.is_empty());
    let mut first = 0;
    for seal in &view.seals {
        let run = v.refs.get(first).unwrap().0;
        assert!(run.is_whole_kind());
        let mine = &view.entries[first..first + seal.n];
        let digests: Vec<[u8; 32]> = mine
            .iter()
            .map(|e| {
                macula_wire::event_digest(e.seq, view.topics[e.topic_index], e.payload, [], None)
            })
            .collect();
        assert_eq!(run.digests(), &digests[..]);
        assert_eq!(run.carried(true), seal.carried);
        assert_eq!(
            run.carried(true),
            Some(macula_wire::seal_hash(
                &view.publisher,
                view.epoch,
                &digests
            ))
        );
        let whole = macula_wire::seal_whole(
            &view.publisher,
            view.epoch,
            mine.iter().map(|e| {
                (
                    e.seq,
                    view.topics[e.topic_index],
                    e.payload,
                    std::iter::empty::<(&str, &str)>(),
                    None,
                )
            }),
        );
        assert_eq!(run.carried(false), Some(whole));
        first += seal.n;
    }
}

/// Encodes one batch naming `publisher`, sealed by `sealer` when given.
fn forged(publisher: NodeId, sealer: Option<&SigningKey>, payload: &[u8]) -> Bytes {
    let items = [BatchItem {
        seq: 1,
        topic_index: 0,
        payload,
        headers: &[],
        message_id: None,
    }];
    let seals: Vec<_> = sealer
        .map(|k| {
            let d = macula_wire::event_digest(1, "t.a", b"signed", [], None);
            Signer::new(k.clone()).seal(&publisher, 150, &[d])
        })
        .into_iter()
        .collect();
    let mut buf = Vec::new();
    macula_wire::encode_sealed_batch_frame(
        &mut buf,
        1 << 20,
        &publisher,
        150,
        &["t.a"],
        items,
        &seals,
    )
    .unwrap();
    Bytes::copy_from_slice(&buf[macula_wire::frame::FRAME_HEADER_LEN..])
}

#[test]
fn a_forged_publisher_is_dropped_and_counted_never_delivered() {
    let victim = id(50);
    let cases: [(&str, Bytes); 4] = [
        ("unsealed", forged(victim, None, b"signed")),
        (
            "sealed by the forwarder's own key",
            forged(victim, Some(&key(1)), b"signed"),
        ),
        (
            "payload changed after signing",
            forged(victim, Some(&key(50)), b"forged"),
        ),
        ("genuine", forged(victim, Some(&key(50)), b"signed")),
    ];
    for (what, body) in cases {
        let mut b = node(2);
        b.subscribe("t.*", 7).unwrap();
        let mut rx = BatchReceiver::new(false);
        // Full node 1 forwards a batch naming node 50 as publisher.
        let got = receive(&mut b, id(1), &[body], &mut rx);
        if what == "genuine" {
            assert_eq!(got.len(), 1, "{what}");
            assert_eq!(got[0].proof, Proof::Signed);
            assert_eq!(unproved(&b), 0);
        } else {
            assert!(got.is_empty(), "{what}: delivered");
            assert_eq!(unproved(&b), 1, "{what}: counted");
            assert!(rx.unproved.is_some(), "{what}");
        }
    }
}

/// What the runtime's data stream reader does with a frame: one decode,
/// the seals verified ahead of the core's lock
/// (`BatchReceiver::prove_ahead`), then `handle_batch_view` with that view.
fn receive_decoded_once(
    to: &mut Core,
    from: NodeId,
    body: &Bytes,
    rx: &mut BatchReceiver<u32>,
) -> Vec<Event> {
    let view = PublishBatchView::decode_shared(body).unwrap();
    rx.prove_ahead(from, &view, body);
    to.handle_batch_view(from, body, Ok(&view), rx, Millis(1))
        .unwrap();
    let mut got = Vec::new();
    rx.deliver(|_, e| got.append(e));
    got
}

#[test]
fn a_batch_decoded_once_and_verified_ahead_still_drops_every_forgery() {
    let victim = id(50);
    let genuine = forged(victim, Some(&key(50)), b"signed");
    let forgeries = [
        forged(victim, None, b"signed"),
        forged(victim, Some(&key(1)), b"signed"),
        forged(victim, Some(&key(50)), b"forged"),
    ];
    for (i, body) in forgeries.iter().enumerate() {
        let mut b = node(2);
        b.subscribe("t.*", 7).unwrap();
        let mut rx = BatchReceiver::new(false);
        assert!(
            receive_decoded_once(&mut b, id(1), body, &mut rx).is_empty(),
            "forgery {i} delivered"
        );
        assert_eq!(unproved(&b), 1, "forgery {i} counted");
        // What was verified ahead holds for that very body only: the
        // genuine batch verified ahead does not pass a forgery handed
        // over instead, nor does a failed one drop the genuine batch.
        let view = PublishBatchView::decode_shared(&genuine).unwrap();
        rx.prove_ahead(id(1), &view, &genuine);
        let forged_view = PublishBatchView::decode_shared(body).unwrap();
        b.handle_batch_view(id(1), body, Ok(&forged_view), &mut rx, Millis(1))
            .unwrap();
        let mut got = Vec::new();
        rx.deliver(|_, e| got.append(e));
        assert!(got.is_empty(), "forgery {i} passed on another's proof");
        assert_eq!(unproved(&b), 2, "forgery {i} counted again");
        rx.prove_ahead(id(1), &forged_view, body);
        let got = receive(&mut b, id(1), std::slice::from_ref(&genuine), &mut rx);
        assert_eq!(got.len(), 1, "genuine after forgery {i}");
        assert_eq!(got[0].proof, Proof::Signed);
    }
    let mut b = node(2);
    b.subscribe("t.*", 7).unwrap();
    let mut rx = BatchReceiver::new(false);
    let got = receive_decoded_once(&mut b, id(1), &genuine, &mut rx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].proof, Proof::Signed);
    assert_eq!(unproved(&b), 0);
    // A body that did not decode closes the stream, counted.
    let err = b.handle_batch_view(id(1), &genuine, Err("truncated"), &mut rx, Millis(1));
    assert!(err.is_err());
    assert_eq!(b.counters().data_streams_rejected_total.get(), 1);
}

#[test]
fn an_unsealed_client_batch_is_delivered_at_its_gateway_but_not_forwarded() {
    let mut gw = client_through_gateway(&["t.a"], false);
    assert!(starts(&mut gw).is_empty(), "nothing forwarded");
    assert_eq!(unproved(&gw), 1);
}

#[test]
fn own_batches_travel_unsealed_without_a_signer_and_prove_by_connection() {
    let mut a = node(9);
    let r = route(&mut a, &[("t", 2, "t.*")], "t.a");
    a.publish_routed(
        &r,
        Bytes::from_static(b"x"),
        PublishOptions::default(),
        Millis(0),
        &mut Vec::new(),
    )
    .unwrap();
    let (q, _) = starts(&mut a)[0];
    let bodies = transmit(&mut a, q);
    assert_eq!(bodies[0][0], 1);
    let mut b = node(2);
    b.subscribe("t.*", 7).unwrap();
    let got = receive(&mut b, id(9), &bodies, &mut BatchReceiver::new(false));
    assert_eq!(got[0].proof, Proof::Connection);
}

#[test]
fn a_client_takes_unsealed_events_from_its_gateway_as_asserted() {
    let mut c = client(50, 1, false);
    c.subscribe("t.*", 7).unwrap();
    let mut buf = Vec::new();
    let items = [BatchItem {
        seq: 1,
        topic_index: 0,
        payload: b"x",
        headers: &[],
        message_id: None,
    }];
    macula_wire::encode_batch_frame(&mut buf, 1 << 20, &id(9), 5, &["t.a"], items).unwrap();
    let body = Bytes::copy_from_slice(&buf[macula_wire::frame::FRAME_HEADER_LEN..]);
    let got = receive(&mut c, id(1), &[body], &mut BatchReceiver::new(false));
    assert_eq!(got[0].proof, Proof::Asserted);
    assert!(!got[0].proof.is_proved());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever a client publishes, a gateway with any frame limit
        /// toward node 2 forwards frames within that limit, every one of
        /// them proves the client, and node 2 gets exactly the t.* ones in
        /// order (none lost unless too large for the limit, and counted).
        #[test]
        fn forwarded_seals_fit_the_receiver_and_always_verify(
            // Up to 3 KB: a client's messages fill several 64 KiB frames
            // under one seal (seals spanning frames) as well as one.
            msgs in proptest::collection::vec((any::<bool>(), 0usize..3_000), 1..120),
            limit in 1024u32..40_000,
            groups in any::<bool>(),
        ) {
            let mut c = client_kind(50, 1, true, groups);
            for (i, (t, len)) in msgs.iter().enumerate() {
                let topic = if *t { "t.a" } else { "u.b" };
                let mut p = vec![b'x'; *len];
                p.extend_from_slice(format!("{i}").as_bytes());
                c.publish_upstream(topic, Bytes::from(p), PublishOptions::default(), Millis(0), &mut Vec::new())
                    .unwrap();
            }
            let (q, _) = starts(&mut c)[0];
            let mut bodies = Vec::new();
            loop {
                let more = transmit(&mut c, q);
                if more.is_empty() {
                    break;
                }
                bodies.extend(more);
            }
            let mut gw = node(1);
            let mut rx = BatchReceiver::new(true);
            let mut senders = Vec::new();
            for b in &bodies {
                gw.handle_batch(id(50), macula_wire::MessageType::PublishBatch as u8, b, &mut rx, Millis(1))
                    .unwrap();
                let view = PublishBatchView::decode(b).unwrap();
                let routes: Vec<_> = view
                    .topics
                    .iter()
                    .map(|t| Some(route(&mut gw, &[("t", 2, "t.*")], t)))
                    .collect();
                let seals = rx.seals.clone();
                gw.forward_from_client(id(50), &view, b, &routes, &[], &seals, Millis(1));
                // (`route` takes the actions of the next frame's routing.)
                senders.extend(starts(&mut gw));
            }
            // The receiver's HELLO announced `limit` (its queue exists now).
            gw.handle_peer_up(&id(2), limit);
            senders.extend(starts(&mut gw));
            let mut fwd = Vec::new();
            if let Some((q, _)) = senders.first().copied() {
                loop {
                    let more = transmit(&mut gw, q);
                    if more.is_empty() {
                        break;
                    }
                    fwd.extend(more);
                }
            }
            for b in &fwd {
                prop_assert!(b.len() <= limit as usize);
                let view = PublishBatchView::decode(b).unwrap();
                prop_assert!(macula_pubsub::proof::verify(&view).is_ok());
            }
            let mut b = node(2);
            b.subscribe("t.*", 7).unwrap();
            let got = receive(&mut b, id(1), &fwd, &mut BatchReceiver::new(false));
            prop_assert_eq!(unproved(&b), 0);
            let too_large = gw.counters().too_large_for_peer_total.get();
            // A topic group of a client's frame (kind 3) larger than the
            // receiver's frame cannot go whole: left out, counted.
            let ungrouped = gw.counters().ungrouped_total.get();
            prop_assert!(groups || ungrouped == 0);
            let want = msgs.iter().filter(|(t, _)| *t).count() as u64;
            prop_assert_eq!(got.len() as u64 + too_large + ungrouped, want);
            if limit >= 16_384 {
                // A seal of at most OWN_SEAL_MAX messages fits.
                prop_assert_eq!(too_large, 0);
            }
            prop_assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        }

        /// Many small messages: a client's frames hold up to the batch
        /// limit under one seal per at most 256 of them, and every frame,
        /// and every forwarded copy, verifies and delivers in order.
        #[test]
        fn frames_with_several_seals_verify_and_deliver_in_order(
            n in 1usize..1_500,
            len in 0usize..200,
            limit in 16_384u32..100_000,
            groups in any::<bool>(),
        ) {
            let bodies = client_frames_kind(n, len, groups);
            let mut gw = node(1);
            let mut rx = BatchReceiver::new(true);
            let mut senders = Vec::new();
            for b in &bodies {
                let view = PublishBatchView::decode(b).unwrap();
                let max = match groups {
                    true => macula_wire::pubsub::MAX_SEAL_ENTRIES,
                    false => macula_pubsub::batch::OWN_SEAL_MAX,
                };
                prop_assert!(view.seals.iter().all(|s| s.n <= max && s.groups == groups));
                prop_assert!(macula_pubsub::proof::verify(&view).is_ok());
                gw.handle_batch(id(50), macula_wire::MessageType::PublishBatch as u8, b, &mut rx, Millis(1))
                    .unwrap();
                prop_assert_eq!(rx.seals.len(), view.entries.len());
                let routes: Vec<_> = view
                    .topics
                    .iter()
                    .map(|t| Some(route(&mut gw, &[("t", 2, "t.*")], t)))
                    .collect();
                let seals = rx.seals.clone();
                gw.forward_from_client(id(50), &view, b, &routes, &[], &seals, Millis(1));
                senders.extend(starts(&mut gw));
            }
            gw.handle_peer_up(&id(2), limit);
            senders.extend(starts(&mut gw));
            let mut fwd = Vec::new();
            if let Some((q, _)) = senders.first().copied() {
                loop {
                    let more = transmit(&mut gw, q);
                    if more.is_empty() {
                        break;
                    }
                    fwd.extend(more);
                }
            }
            for b in &fwd {
                prop_assert!(b.len() <= limit as usize);
            }
            let mut r = node(2);
            r.subscribe("t.*", 7).unwrap();
            let got = receive(&mut r, id(1), &fwd, &mut BatchReceiver::new(false));
            prop_assert_eq!(unproved(&r), 0);
            let ungrouped = gw.counters().ungrouped_total.get() as usize;
            prop_assert_eq!(got.len() + ungrouped, n.div_ceil(2));
            if limit >= 70_000 {
                // A client frame's group fits the receiver's frame whole.
                prop_assert_eq!(ungrouped, 0);
            }
            prop_assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        }

        /// Seals of kind 3: a frame and any copy of some of its
        /// messages verify, copies hold whole groups, a changed copy
        /// does not verify (see `fuzz_group_copies`).
        #[test]
        fn topic_group_copies_verify_and_changed_ones_do_not(
            data in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            macula_pubsub::proof::fuzz_group_copies(&data);
        }

        /// Seals of kind 4: a frame and any copy of some of its messages
        /// verify, a copy re-presented as kind 1 or with a carried digest
        /// changed does not (see `fuzz_aligned_copies`).
        #[test]
        fn aligned_copies_verify_and_changed_ones_do_not(
            data in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            macula_pubsub::proof::fuzz_aligned_copies(&data);
        }

        #[test]
        fn mutated_sealed_batches_are_refused_or_verified_never_panic(
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            groups in any::<bool>(),
        ) {
            let mut c = client_kind(50, 1, true, groups);
            for i in 0..5 {
                c.publish_upstream("t.a", Bytes::from(format!("m{i}")), PublishOptions::default(), Millis(0), &mut Vec::new())
                    .unwrap();
            }
            let (q, _) = starts(&mut c)[0];
            let mut body = transmit(&mut c, q)[0].to_vec();
            let i = at.index(body.len());
            let flipped = body[i] != byte;
            body[i] = byte;
            macula_pubsub::proof::fuzz_sealed_batch(&body);
            if flipped {
                // Any change of a signed byte is caught.
                if let Ok(view) = PublishBatchView::decode(&body) {
                    prop_assert!(macula_pubsub::proof::verify(&view).is_err(), "byte {} changed", i);
                }
            }
        }
    }
}

// Seals of kind 3: topic groups (PROTOCOL.md §5.3, "Seals over topic groups").

/// Gateway 1 adopts client 50's frame `body` and forwards it with
/// `records` as routes: the copies, per receiving node.
fn forward_groups(body: &Bytes, records: &[(&str, u8, &str)]) -> HashMap<NodeId, Vec<Bytes>> {
    let mut gw = node(1);
    let mut rx = BatchReceiver::new(true);
    gw.handle_batch(
        id(50),
        macula_wire::MessageType::PublishBatch as u8,
        body,
        &mut rx,
        Millis(1),
    )
    .unwrap();
    let view = PublishBatchView::decode(body).unwrap();
    let routes: Vec<_> = view
        .topics
        .iter()
        .map(|t| Some(route(&mut gw, records, t)))
        .collect();
    let seals = rx.seals.clone();
    gw.forward_from_client(id(50), &view, body, &routes, &[], &seals, Millis(1));
    let mut copies = HashMap::new();
    for (q, to) in starts(&mut gw) {
        copies.insert(to, transmit(&mut gw, q));
    }
    copies
}

/// Node `me` (subscribed to everything) receives `bodies` from gateway 1:
/// the payload indices delivered (all proved by signature), and the
/// messages dropped as unproved.
fn deliver_indices(me: u8, bodies: &[Bytes]) -> (Vec<usize>, u64) {
    let mut n = node(me);
    n.subscribe("**", 7).unwrap();
    let got = receive(&mut n, id(1), bodies, &mut BatchReceiver::new(false));
    assert!(got
        .iter()
        .all(|e| e.publisher == id(50) && e.proof == Proof::Signed));
    let have = got
        .iter()
        .map(|e| {
            let p = std::str::from_utf8(&e.payload[e.payload.len() - 3..]).unwrap();
            p.trim_start_matches('x').parse().unwrap()
        })
        .collect();
    (have, unproved(&n))
}

/// `view`'s entries but those in `skip`, under `seals`.
fn reencode_without(
    view: &PublishBatchView<'_>,
    skip: &[usize],
    seals: &[macula_wire::Seal],
) -> Bytes {
    let items = view
        .entries
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .map(|(_, e)| BatchItem {
            seq: e.seq,
            topic_index: e.topic_index,
            payload: e.payload,
            headers: &[],
            message_id: None,
        });
    let mut buf = Vec::new();
    macula_wire::encode_sealed_batch_frame(
        &mut buf,
        1 << 20,
        &view.publisher,
        view.epoch,
        &view.topics,
        items,
        seals,
    )
    .unwrap();
    Bytes::copy_from_slice(&buf[macula_wire::frame::FRAME_HEADER_LEN..])
}

#[test]
fn a_frame_of_small_messages_is_sealed_by_topic_groups_and_copies_carry_whole_groups() {
    // 700 messages of 64 B, t.a and u.b alternating: one frame, one seal
    // of kind 3 over both topic groups (no digest per message), one
    // signature for the 700.
    let bodies = client_frames_kind(700, 64, true);
    assert_eq!(bodies.len(), 1, "one frame");
    assert_eq!(bodies[0][0], 3, "format 3");
    let view = PublishBatchView::decode(&bodies[0]).unwrap();
    assert_eq!(view.entries.len(), 700);
    assert_eq!(view.seals.len(), 1);
    let seal = &view.seals[0];
    assert!(seal.groups && seal.carried.is_none() && seal.absent.is_empty());
    assert_eq!(seal.n, 700);
    assert_eq!(
        macula_pubsub::proof::verify(&view).map(|r| r.len()),
        Ok(700)
    );
    // Node 4 wants both topics: the client's seal as it came; nodes 2
    // and 3 one group each, with the other group's digest.
    let copies = forward_groups(
        &bodies[0],
        &[
            ("t", 2, "t.*"),
            ("u", 3, "u.*"),
            ("t", 4, "t.*"),
            ("u", 4, "u.*"),
        ],
    );
    assert_eq!(copies.len(), 3);
    for (me, want) in [
        (2u8, (0..700).step_by(2).collect::<Vec<usize>>()),
        (3, (1..700).step_by(2).collect()),
        (4, (0..700).collect()),
    ] {
        let c = &copies[&id(me)];
        assert_eq!(c.len(), 1, "node {me}: one frame");
        let v = PublishBatchView::decode(&c[0]).unwrap();
        assert_eq!(v.seals.len(), 1);
        let s = &v.seals[0];
        assert!(s.groups && s.carried.is_none());
        assert_eq!(s.sig, seal.sig);
        assert_eq!(s.absent.len(), usize::from(me != 4), "node {me}");
        let (have, bad) = deliver_indices(me, c);
        assert_eq!(have, want, "node {me}");
        assert_eq!(bad, 0);
    }
}

#[test]
fn queued_copies_hold_their_seal_once_per_batch_not_per_message() {
    // 700 messages of one kind 3 seal, forwarded to three nodes (one
    // wants both topics): 1,050 queued copies, and the seal's reference
    // count is that of the batch's places and its one origin, not one
    // per message and copy. The copies still verify.
    let body = client_frames_kind(700, 64, true).remove(0);
    let mut gw = node(1);
    let mut rx = BatchReceiver::new(true);
    gw.handle_batch(
        id(50),
        macula_wire::MessageType::PublishBatch as u8,
        &body,
        &mut rx,
        Millis(1),
    )
    .unwrap();
    assert_eq!(rx.seals.len(), 700);
    assert_eq!(rx.seals.runs.len(), 1);
    let run = rx.seals.runs[0].clone();
    let view = PublishBatchView::decode(&body).unwrap();
    let records = [
        ("t", 2, "t.*"),
        ("u", 3, "u.*"),
        ("t", 4, "t.*"),
        ("u", 4, "u.*"),
    ];
    let routes: Vec<_> = view
        .topics
        .iter()
        .map(|t| Some(route(&mut gw, &records, t)))
        .collect();
    gw.forward_from_client(id(50), &view, &body, &routes, &[], &rx.seals, Millis(1));
    // `run`, `rx.seals` and the copies' one origin.
    assert_eq!(Arc::strong_count(&run), 3);
    rx.seals.clear();
    assert_eq!(Arc::strong_count(&run), 2, "queued copies share one origin");
    let mut copies = HashMap::new();
    for (q, to) in starts(&mut gw) {
        copies.insert(to, transmit(&mut gw, q));
    }
    for (me, n) in [(2u8, 350), (3, 350), (4, 700)] {
        let (have, bad) = deliver_indices(me, &copies[&id(me)]);
        assert_eq!((have.len(), bad), (n, 0), "node {me}");
    }
}

#[test]
fn forged_topic_groups_are_dropped_and_counted_never_delivered() {
    let body = client_frames_kind(40, 16, true).remove(0);
    let view = PublishBatchView::decode(&body).unwrap();
    let copies = forward_groups(&body, &[("t", 2, "t.*"), ("t", 4, "t.*"), ("u", 4, "u.*")]);
    let half = copies[&id(2)][0].clone();
    let hv = PublishBatchView::decode(&half).unwrap();
    assert_eq!((hv.entries.len(), hv.seals[0].absent.len()), (20, 1));
    // Genuine: the t.a group, proved.
    let (have, bad) = deliver_indices(2, std::slice::from_ref(&half));
    assert_eq!((have.len(), bad), (20, 0));
    let changed = |i: usize| {
        let mut p = hv.entries[i].payload.to_vec();
        if i == 3 {
            p[0] ^= 1;
        }
        p
    };
    let mut carried = hv.seals.clone();
    let mut hashes = carried[0].absent.to_vec();
    hashes[0][0] ^= 1;
    carried[0].absent = hashes.into();
    // The group it has, also named as absent: not the signed set.
    let mut twice = hv.seals.clone();
    let own = macula_wire::group_digest(hv.entries.iter().map(|e| {
        (
            e.seq,
            hv.topics[e.topic_index],
            e.payload,
            std::iter::empty::<(&str, &str)>(),
            None,
        )
    }));
    let mut hashes = twice[0].absent.to_vec();
    hashes.push(own);
    twice[0].absent = hashes.into();
    // Part of the group (its last message left out, its bit cleared):
    // what a forwarder dropping one message would send unless it left
    // the rest out too.
    let mut part = hv.seals.clone();
    let last = (0..part[0].n)
        .rev()
        .find(|&i| part[0].is_present(i))
        .unwrap();
    part[0].present[last / 8] &= !(1 << (last % 8));
    // Downgrades: the same signature presented as a seal of kind 1 (the
    // per-message digests of all 40, computed honestly) or of kind 2.
    let digests: Vec<[u8; 32]> = view
        .entries
        .iter()
        .map(|e| {
            macula_wire::event_digest(
                e.seq,
                view.topics[e.topic_index],
                e.payload,
                std::iter::empty::<(&str, &str)>(),
                None,
            )
        })
        .collect();
    let mut as_kind1 = view.seals.clone();
    as_kind1[0].groups = false;
    let mut as_kind2 = as_kind1.clone();
    as_kind2[0].carried = Some(macula_wire::seal_hash(
        &view.publisher,
        view.epoch,
        &digests,
    ));
    for (what, forged, me, lost) in [
        (
            "a payload changed",
            reencode(&hv, &changed, &hv.seals),
            2u8,
            20u64,
        ),
        (
            "the carried group digest changed",
            reencode(&hv, &|i| hv.entries[i].payload.to_vec(), &carried),
            2,
            20,
        ),
        (
            "a present group also carried",
            reencode(&hv, &|i| hv.entries[i].payload.to_vec(), &twice),
            2,
            20,
        ),
        (
            "part of a group",
            reencode_without(&hv, &[19], &part),
            2,
            19,
        ),
        (
            "downgraded to kind 1",
            reencode(&view, &|i| view.entries[i].payload.to_vec(), &as_kind1),
            4,
            40,
        ),
        (
            "downgraded to kind 2",
            reencode(&view, &|i| view.entries[i].payload.to_vec(), &as_kind2),
            4,
            40,
        ),
    ] {
        let (have, bad) = deliver_indices(me, &[forged]);
        assert!(have.is_empty(), "{what}: nothing delivered");
        assert_eq!(bad, lost, "{what}: counted");
    }
}

#[test]
fn one_topic_group_is_hashed_once_and_a_forged_one_is_dropped() {
    // The benchmark's case: one topic, so one group: the receiver hashes
    // the seal's messages as one input.
    let mut c = client_kind(50, 1, true, true);
    for i in 0..300 {
        c.publish_upstream(
            "t.a",
            Bytes::from(format!("x{i:03}")),
            PublishOptions::default(),
            Millis(0),
            &mut Vec::new(),
        )
        .unwrap();
    }
    let (q, _) = starts(&mut c)[0];
    let body = transmit(&mut c, q).remove(0);
    let view = PublishBatchView::decode(&body).unwrap();
    assert_eq!((view.seals.len(), view.seals[0].n), (1, 300));
    let copies = forward_groups(&body, &[("t", 4, "t.*")]);
    let (have, bad) = deliver_indices(4, &copies[&id(4)]);
    assert_eq!((have.len(), bad), (300, 0));
    // A second message put in the place of one: the group does not
    // verify, nothing of it is delivered.
    let fv = PublishBatchView::decode(&copies[&id(4)][0]).unwrap();
    let forged = reencode(
        &fv,
        &|i| match i {
            7 => b"x999".to_vec(),
            _ => fv.entries[i].payload.to_vec(),
        },
        &fv.seals,
    );
    let (have, bad) = deliver_indices(4, &[forged]);
    assert_eq!((have.len(), bad), (0, 300));
}

#[test]
fn a_forwarder_missing_part_of_a_group_leaves_the_rest_out_and_reports_it() {
    // The gateway's queue for a node lost one t.a message (flow control):
    // the copy cannot carry part of the t.a group, so it leaves the
    // group's other messages out (counted as `ungrouped`, listed for the
    // loss report) and sends the u.b group whole, which verifies.
    let body = client_frames_kind(40, 16, true).remove(0);
    let view = PublishBatchView::decode(&body).unwrap();
    let refs = macula_pubsub::proof::adopt(&view, &body).unwrap();
    let origin = Arc::new(macula_pubsub::Origin {
        publisher: view.publisher,
        epoch: view.epoch,
        seals: refs.runs.clone(),
    });
    let msgs: Vec<OutMsg> = view
        .entries
        .iter()
        .zip(&refs.places)
        .enumerate()
        .filter(|(i, _)| *i != 4)
        .map(|(_, (e, r))| OutMsg {
            seq: e.seq,
            topic: view.topics[e.topic_index].into(),
            payload: Bytes::copy_from_slice(e.payload),
            extra: None,
            origin: Some(origin.clone()),
            seal: Some(*r),
        })
        .collect();
    let mut out = Vec::new();
    let me = id(1);
    let done = macula_pubsub::encode_batches(&mut out, &msgs, &me, 1, 1 << 20, 64 * 1024);
    assert_eq!((done.messages, done.ungrouped), (20, 19));
    let left = macula_pubsub::batch::ungrouped_messages(&msgs, &me, 1, 1 << 20, 64 * 1024);
    assert_eq!(left.len(), 19);
    assert!(left.iter().all(|&i| msgs[i].topic == "t.a"));
    let dec = FrameDecoder::new(1 << 20);
    let (f, _) = dec.decode(&out).unwrap().unwrap();
    let copy = Bytes::copy_from_slice(f.body);
    let v = PublishBatchView::decode(&copy).unwrap();
    assert_eq!(v.seals[0].absent.len(), 1, "the t.a group's digest");
    let (have, bad) = deliver_indices(4, &[copy]);
    assert_eq!(have, (1..40).step_by(2).collect::<Vec<_>>());
    assert_eq!(bad, 0);
    // A copy of only that part of the t.a group: no frame at all.
    let only: Vec<OutMsg> = msgs.iter().filter(|m| m.topic == "t.a").cloned().collect();
    let mut out = Vec::new();
    let done = macula_pubsub::encode_batches(&mut out, &only, &me, 1, 1 << 20, 64 * 1024);
    assert_eq!((done.frames, done.messages, done.ungrouped), (0, 0, 19));
    assert!(out.is_empty());
}

#[test]
fn a_gateway_queue_overflow_loses_whole_groups_and_the_subscriber_is_told() {
    // Client 50 writes a frame of 40 (t.a and u.b alternating, one seal
    // of kind 3), then one of 20. Gateway 1's queue to node 2 holds 30:
    // 10 of the first frame are dropped, so both its groups would go in
    // part; the other 30 are left out too (`ungrouped`), and all 40 are
    // reported ahead of the second frame: node 2 is told `Lagged(40)`
    // and gets the second frame's 20, proved, none unproved.
    let mut c = client_kind(50, 1, true, true);
    let publish = |c: &mut Core, from: usize, n: usize| {
        for i in from..from + n {
            let topic = if i % 2 == 0 { "t.a" } else { "u.b" };
            c.publish_upstream(
                topic,
                Bytes::from(format!("x{i:03}")),
                PublishOptions::default(),
                Millis(0),
                &mut Vec::new(),
            )
            .unwrap();
        }
    };
    publish(&mut c, 0, 40);
    let (cq, _) = starts(&mut c)[0];
    let first = transmit(&mut c, cq);
    publish(&mut c, 40, 20);
    let second = transmit(&mut c, cq);
    assert_eq!((first.len(), second.len()), (1, 1));
    let mut cfg = Config::new(id(1), 100, REALM, Role::Node, 1 << 20);
    cfg.limits.peer_queue_capacity = 30;
    let mut gw = PubSubCore::new(cfg);
    let records = [("t", 2, "t.*"), ("u", 2, "u.*")];
    let mut rx = BatchReceiver::new(true);
    // Gateway -> node 2: (message type, body) of each frame written.
    let mut sent: Vec<(u8, Bytes)> = Vec::new();
    let mut q = None;
    for body in [&first[0], &second[0]] {
        gw.handle_batch(
            id(50),
            macula_wire::MessageType::PublishBatch as u8,
            body,
            &mut rx,
            Millis(1),
        )
        .unwrap();
        let view = PublishBatchView::decode(body).unwrap();
        let routes: Vec<_> = view
            .topics
            .iter()
            .map(|t| Some(route(&mut gw, &records, t)))
            .collect();
        let seals = rx.seals.clone();
        gw.forward_from_client(id(50), &view, body, &routes, &[], &seals, Millis(1));
        if let Some((p, _)) = starts(&mut gw).first() {
            q = Some(*p);
        }
        let q = q.unwrap();
        let mut msgs: Vec<OutMsg> = Vec::new();
        if let Transmit::Batch(b) = gw.poll_transmit(q, &mut msgs, Millis(1)) {
            let mut buf = Vec::new();
            let encoded = b.encode(&mut buf, &msgs);
            gw.handle_written(q, &b, &msgs, encoded, Millis(1));
            let dec = FrameDecoder::new(1 << 20);
            let mut rest = &buf[..];
            while let Some((f, used)) = dec.decode(rest).unwrap() {
                sent.push((f.header.msg_type, Bytes::copy_from_slice(f.body)));
                rest = &rest[used..];
            }
        }
    }
    assert_eq!(gw.counters().ungrouped_total.get(), 30);
    let kinds: Vec<u8> = sent.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        kinds,
        [
            macula_wire::MessageType::PublishDropped as u8,
            macula_wire::MessageType::PublishDropped as u8,
            macula_wire::MessageType::PublishBatch as u8
        ],
        "the queue's drops reported, no frame for the rest of the first \
         (left out), their report ahead of the second"
    );
    let mut n = node(2);
    n.subscribe("**", 7).unwrap();
    let mut nrx = BatchReceiver::new(false);
    let mut got = Vec::new();
    for (t, body) in &sent {
        n.handle_batch(id(1), *t, body, &mut nrx, Millis(2))
            .unwrap();
        nrx.deliver(|_, e| got.append(e));
    }
    let lagged = nrx.deliver_lagged(|_, _| {});
    assert_eq!(lagged, 40, "every message lost, reported");
    assert_eq!(got.len(), 20);
    assert!(got.iter().all(|e| e.proof == Proof::Signed));
    assert_eq!(unproved(&n), 0);
}

// Seals of kind 4: aligned digests (PROTOCOL.md §5.3, "Seals over aligned
// digests").

/// The aligned digests of `view`'s entries.
fn aligned_digests(view: &PublishBatchView<'_>) -> Vec<[u8; 32]> {
    view.entries
        .iter()
        .map(|e| {
            macula_wire::event_digest_aligned(
                e.seq,
                view.topics[e.topic_index],
                e.payload,
                [],
                None,
            )
        })
        .collect()
}

#[test]
fn large_messages_are_sealed_over_aligned_digests_small_ones_are_not() {
    // One 16 KiB message alone: kind 4 (format 3), not kind 3.
    let large = client_frames_kind(1, 16 * 1024, true);
    assert_eq!(large.len(), 1);
    assert_eq!(large[0][0], 3);
    let v = PublishBatchView::decode(&large[0]).unwrap();
    assert!(v.seals[0].aligned && !v.seals[0].groups && v.seals[0].carried.is_none());
    // Its signature is over the aligned digest, under the v4 tag.
    let signed = Signer::new(key(50)).seal_aligned(&v.publisher, v.epoch, &aligned_digests(&v));
    assert_eq!(signed.sig, v.seals[0].sig);
    let refs = macula_pubsub::proof::verify(&v).unwrap();
    assert!(refs.get(0).unwrap().0.is_aligned_kind());
    // A seal spanning frames (8 KiB messages): kind 4 in every frame,
    // each frame verifies with the others' aligned digests.
    let spanning = client_frames_kind(10, 8 * 1024, true);
    assert!(spanning.len() > 1);
    for b in &spanning {
        assert_eq!(b[0], 3);
        let v = PublishBatchView::decode(b).unwrap();
        assert!(v.seals.iter().all(|s| s.aligned));
        assert!(macula_pubsub::proof::verify(&v).is_ok());
    }
    // Small messages keep kind 3; a signer for meshes that predate kind 3
    // (and kind 4) keeps kind 1 for large ones.
    let small = client_frames_kind(10, 64, true);
    let v = PublishBatchView::decode(&small[0]).unwrap();
    assert!(v.seals.iter().all(|s| s.groups && !s.aligned));
    let old = client_frames_kind(1, 16 * 1024, false);
    assert_eq!(old[0][0], 2);
}

/// Gateway 1 adopts client 50's frames `bodies` and forwards them with
/// `records` as routes: the copies, per receiving node.
fn forward_all(bodies: &[Bytes], records: &[(&str, u8, &str)]) -> HashMap<NodeId, Vec<Bytes>> {
    let mut gw = node(1);
    let mut rx = BatchReceiver::new(true);
    let mut senders = Vec::new();
    for b in bodies {
        gw.handle_batch(
            id(50),
            macula_wire::MessageType::PublishBatch as u8,
            b,
            &mut rx,
            Millis(1),
        )
        .unwrap();
        let view = PublishBatchView::decode(b).unwrap();
        let routes: Vec<_> = view
            .topics
            .iter()
            .map(|t| Some(route(&mut gw, records, t)))
            .collect();
        let seals = rx.seals.clone();
        gw.forward_from_client(id(50), &view, b, &routes, &[], &seals, Millis(1));
        senders.extend(starts(&mut gw));
    }
    let mut out: HashMap<NodeId, Vec<Bytes>> = HashMap::new();
    for (q, to) in senders {
        loop {
            let more = transmit(&mut gw, q);
            if more.is_empty() {
                break;
            }
            out.entry(to).or_default().extend(more);
        }
    }
    out
}

#[test]
fn a_receiver_of_part_of_an_aligned_seal_checks_the_others_aligned_digests() {
    // 12 messages of 16 KiB, t.a and u.b alternating: one kind 4 seal
    // spanning the client's frames (4 to a frame). Node 2 (t.*) gets the
    // six t.a ones, node 4 (both) all twelve.
    let bodies = client_frames_kind(12, 16 * 1024, true);
    assert!(bodies.len() >= 3);
    let copies = forward_all(
        &bodies,
        &[("t", 2, "t.*"), ("t", 4, "t.*"), ("u", 4, "u.*")],
    );
    for (n, want) in [(2u8, 6usize), (4, 12)] {
        let fwd = &copies[&id(n)];
        let mut r = node(n);
        r.subscribe("**", 7).unwrap();
        let got = receive(&mut r, id(1), fwd, &mut BatchReceiver::new(false));
        assert_eq!(got.len(), want, "node {n}");
        assert!(got
            .iter()
            .all(|e| e.publisher == id(50) && e.proof == Proof::Signed));
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(unproved(&r), 0);
        for b in fwd {
            let v = PublishBatchView::decode(b).unwrap();
            assert!(v.seals.iter().all(|s| s.aligned), "forwarded as kind 4");
        }
    }
    // Node 2's copies carry the hashes of the subtrees of the seal's tree
    // with none of their messages (computed at the gateway from the
    // client's frames): those of the publisher's own tree.
    let all: Vec<[u8; 32]> = bodies
        .iter()
        .flat_map(|b| aligned_digests(&PublishBatchView::decode(b).unwrap()))
        .collect();
    let tree = macula_wire::SealTree::new(&all);
    for b in &copies[&id(2)] {
        let v = PublishBatchView::decode(b).unwrap();
        for s in &v.seals {
            let mut absent = Vec::new();
            tree.absent(&s.present, &mut absent).unwrap();
            assert_eq!(s.absent, absent);
            assert!(s.absent.len() < s.n - s.present_count() || s.n - s.present_count() <= 1);
        }
    }
}

#[test]
fn forged_aligned_seals_are_dropped_and_counted_never_delivered() {
    // Three client frames of 16 KiB messages under one kind 4 seal; node
    // 2 gets the t.a half. Every forgery a forwarder could try on its
    // copy is dropped and counted: a tampered carried digest, the seal
    // re-presented as kind 1 (with the same digests, or with the absent
    // messages' kind 1 digests), a payload swapped between two messages
    // of the seal, and a genuine kind 1 seal re-presented as kind 4.
    let bodies = client_frames_kind(12, 16 * 1024, true);
    let copies = forward_all(&bodies, &[("t", 2, "t.*")]);
    let half = &copies[&id(2)];
    let hv = PublishBatchView::decode(&half[0]).unwrap();
    assert!(hv.entries.len() >= 2);
    assert!(hv.seals[0].aligned && !hv.seals[0].absent.is_empty());
    // (The gateway forwards the messages of each client frame under the
    // seal that frame carried: one seal per client frame in a copy.)
    let k0 = hv.seals[0].present_count();
    assert!(k0 >= 2, "two messages of one seal to swap");
    let genuine = |i: usize| hv.entries[i].payload.to_vec();
    let swapped = |i: usize| match i {
        0 => hv.entries[1].payload.to_vec(),
        1 => hv.entries[0].payload.to_vec(),
        _ => hv.entries[i].payload.to_vec(),
    };
    let mut tampered = hv.seals.clone();
    tampered.iter_mut().for_each(|s| {
        let mut hashes = s.absent.to_vec();
        hashes[0][7] ^= 1;
        s.absent = hashes.into();
    });
    // As kind 1 with the aligned digests of the absent messages (what a
    // forwarder holding the client's frames could compute: kind 1's
    // layout, kind 4's digests).
    let mut as_kind1 = hv.seals.clone();
    // As kind 1 with the kind 1 digests of the absent messages (what a
    // forwarder holding the client's frames could compute).
    let seal = &hv.seals[0];
    assert!(hv.seals.iter().all(|s| s.sig == seal.sig && s.n == seal.n));
    let mut kind1 = vec![None; seal.n];
    let mut kind4 = vec![None; seal.n];
    for b in &bodies {
        let v = PublishBatchView::decode(b).unwrap();
        let Some(s) = v.seals.iter().find(|s| s.sig == seal.sig) else {
            continue;
        };
        let present = (0..s.n).filter(|&i| s.is_present(i));
        for (i, e) in present.zip(&v.entries) {
            kind4[i] = Some(macula_wire::event_digest_aligned(
                e.seq,
                v.topics[e.topic_index],
                e.payload,
                [],
                None,
            ));
            kind1[i] = Some(macula_wire::event_digest(
                e.seq,
                v.topics[e.topic_index],
                e.payload,
                [],
                None,
            ));
        }
    }
    for s in &mut as_kind1 {
        s.aligned = false;
        s.absent = (0..s.n)
            .filter(|&i| !s.is_present(i))
            .map(|i| kind4[i].unwrap())
            .collect();
    }
    let mut as_kind1_digests = as_kind1.clone();
    for s in &mut as_kind1_digests {
        s.absent = (0..s.n)
            .filter(|&i| !s.is_present(i))
            .map(|i| kind1[i].unwrap())
            .collect();
    }
    let deliver = |bytes: Bytes, rx: &mut BatchReceiver<u32>| {
        let mut n = node(2);
        n.subscribe("**", 7).unwrap();
        let got = receive(&mut n, id(1), &[bytes], rx);
        (got.len(), unproved(&n), rx.unproved.is_some())
    };
    let (n, bad, _) = deliver(
        reencode(&hv, &genuine, &hv.seals),
        &mut BatchReceiver::new(false),
    );
    assert_eq!((n, bad), (hv.entries.len(), 0), "genuine");
    let all = hv.entries.len() as u64;
    for (what, forged, dropped) in [
        (
            "a carried digest changed",
            reencode(&hv, &genuine, &tampered),
            all,
        ),
        (
            "re-presented as kind 1 with the aligned digests",
            reencode(&hv, &genuine, &as_kind1),
            all,
        ),
        (
            "re-presented as kind 1 with kind 1 digests",
            reencode(&hv, &genuine, &as_kind1_digests),
            all,
        ),
        (
            "two payloads of the seal swapped",
            reencode(&hv, &swapped, &hv.seals),
            k0 as u64,
        ),
    ] {
        let (n, bad, told) = deliver(forged.clone(), &mut BatchReceiver::new(false));
        assert_eq!(n as u64, all - dropped, "{what}: delivered");
        assert_eq!(bad, dropped, "{what}: counted");
        assert!(told, "{what}: told");
        // With a cache of verified signatures that holds the genuine
        // copy's (a data stream that just verified it): still refused.
        let mut keys = macula_pubsub::KeyCache::default();
        let gv = reencode(&hv, &genuine, &hv.seals);
        let gv = PublishBatchView::decode(&gv).unwrap();
        assert!(macula_pubsub::proof::verify_with(&gv, &mut keys).is_ok());
        let fv = PublishBatchView::decode(&forged).unwrap();
        assert!(
            macula_pubsub::proof::verify_with(&fv, &mut keys).is_err(),
            "{what}: taken from the cache"
        );
    }
    // The reverse: a kind 1 seal (a client that predates kind 4)
    // re-presented as kind 4.
    let old = client_frames_kind(1, 16 * 1024, false);
    let ov = PublishBatchView::decode(&old[0]).unwrap();
    assert!(!ov.seals[0].aligned);
    let mut up = ov.seals.clone();
    up[0].aligned = true;
    let ogenuine = |i: usize| ov.entries[i].payload.to_vec();
    let (n, bad, _) = deliver(
        reencode(&ov, &ogenuine, &ov.seals),
        &mut BatchReceiver::new(false),
    );
    assert_eq!((n, bad), (1, 0), "genuine kind 1");
    let (n, bad, told) = deliver(
        reencode(&ov, &ogenuine, &up),
        &mut BatchReceiver::new(false),
    );
    assert_eq!(
        (n, bad, told),
        (0, 1, true),
        "kind 1 re-presented as kind 4"
    );
}

#[test]
fn a_large_seal_spans_many_frames_each_carrying_a_few_subtree_hashes() {
    // 64 messages of 16 KiB written at once: one kind 4 seal over all of
    // them (before the tree, at most 132 per seal: each frame carried
    // every other message's digest, up to 4 KiB); each frame carries at
    // most two hashes per level of the tree (2 x 6 here, not 60).
    let bodies = client_frames_kind(64, 16 * 1024, true);
    assert!(bodies.len() >= 16, "{} frames", bodies.len());
    let views: Vec<_> = bodies
        .iter()
        .map(|b| PublishBatchView::decode(b).unwrap())
        .collect();
    let sig = views[0].seals[0].sig;
    for v in &views {
        assert_eq!(v.seals.len(), 1);
        let s = &v.seals[0];
        assert!(s.aligned);
        assert_eq!((s.sig, s.n), (sig, 64), "one signature over all 64");
        assert!(s.absent.len() <= 2 * macula_wire::seal_tree_depth(64));
        assert_eq!(
            s.absent.len(),
            macula_wire::seal_tree_absent_count(s.n, &s.present)
        );
    }
    // A receiver of only some of the seal's frames (the first, one in
    // the middle, the last) checks each of them and delivers all their
    // messages.
    let some = [
        bodies[0].clone(),
        bodies[bodies.len() / 2].clone(),
        bodies[bodies.len() - 1].clone(),
    ];
    let want: usize = [0, bodies.len() / 2, bodies.len() - 1]
        .iter()
        .map(|&i| views[i].entries.len())
        .sum();
    let mut r = node(2);
    r.subscribe("**", 7).unwrap();
    let got = receive(&mut r, id(1), &some, &mut BatchReceiver::new(false));
    assert_eq!(got.len(), want);
    assert!(got
        .iter()
        .all(|e| e.publisher == id(50) && e.proof == Proof::Signed));
    assert_eq!(unproved(&r), 0);
    // Through a gateway: every copy verifies, node 2 (t.*) gets half.
    let copies = forward_all(&bodies, &[("t", 2, "t.*")]);
    let mut r = node(2);
    r.subscribe("**", 7).unwrap();
    let got = receive(
        &mut r,
        id(1),
        &copies[&id(2)],
        &mut BatchReceiver::new(false),
    );
    assert_eq!(got.len(), 32);
    assert_eq!(unproved(&r), 0);
    for b in &copies[&id(2)] {
        let v = PublishBatchView::decode(b).unwrap();
        for s in &v.seals {
            assert!(s.aligned);
            assert!(s.absent.len() <= 2 * macula_wire::seal_tree_depth(64) + s.present_count());
        }
    }
}

#[test]
fn payloads_swapped_between_frames_or_a_frame_replayed_into_another_seal_are_dropped() {
    // Two kind 4 seals of 12 messages of 16 KiB (other payloads, the same
    // seqs and layout), each spanning three frames.
    let a = client_frames_kind(12, 16 * 1024, true);
    let b = client_frames_fill(12, 16 * 1024, true, b'y');
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= 2);
    let av = PublishBatchView::decode(&a[0]).unwrap();
    let a1 = PublishBatchView::decode(&a[1]).unwrap();
    let bv = PublishBatchView::decode(&b[0]).unwrap();
    assert_eq!(av.seals[0].present, bv.seals[0].present);
    assert_eq!(av.seals[0].absent.len(), bv.seals[0].absent.len());
    assert_ne!(av.seals[0].sig, bv.seals[0].sig);
    let deliver = |bytes: &[Bytes]| {
        let mut n = node(2);
        n.subscribe("**", 7).unwrap();
        let got = receive(&mut n, id(1), bytes, &mut BatchReceiver::new(false));
        (got.len(), unproved(&n))
    };
    let k = av.entries.len();
    assert_eq!(deliver(&[a[0].clone()]), (k, 0), "genuine");
    let genuine = |v: &PublishBatchView<'_>| {
        let p: Vec<Vec<u8>> = v.entries.iter().map(|e| e.payload.to_vec()).collect();
        move |i: usize| p[i].clone()
    };
    // Frame 0 of seal B under seal A's signature and hashes (a frame
    // replayed into another seal), or under A's signature with its own
    // hashes: dropped, counted.
    let replayed = reencode(&bv, &genuine(&bv), &av.seals);
    assert_eq!(deliver(&[replayed]), (0, k as u64), "replayed into seal A");
    let mut mixed = av.seals.clone();
    mixed[0].absent = bv.seals[0].absent.clone();
    let replayed = reencode(&bv, &genuine(&bv), &mixed);
    assert_eq!(
        deliver(&[replayed]),
        (0, k as u64),
        "B's hashes under A's signature"
    );
    // A payload of frame 0 swapped with one of frame 1 (the same seal):
    // both frames dropped, counted.
    let p0 = av.entries[0].payload.to_vec();
    let p1 = a1.entries[0].payload.to_vec();
    assert_ne!(p0, p1);
    let g0 = genuine(&av);
    let f0 = reencode(&av, &|i| if i == 0 { p1.clone() } else { g0(i) }, &av.seals);
    let g1 = genuine(&a1);
    let f1 = reencode(&a1, &|i| if i == 0 { p0.clone() } else { g1(i) }, &a1.seals);
    let k1 = a1.entries.len();
    assert_eq!(
        deliver(&[f0, f1]),
        (0, (k + k1) as u64),
        "swapped between frames"
    );
    // The genuine frames after a forged one still verify (the verified
    // signature memory keys on the whole signed message).
    let forged = reencode(&bv, &genuine(&bv), &av.seals);
    assert_eq!(
        deliver(&[forged, a[0].clone(), a[1].clone()]),
        (k + k1, k as u64)
    );
}

#[test]
fn a_forwarders_frame_carries_one_seal_entry_per_signature() {
    // 24 messages of 16 KiB, t.a and u.b alternating: one kind 4 seal
    // spanning the client's frames. Node 2 (t.*) gets the t.a half, so
    // each of the gateway's frames holds messages of two or more of the
    // client's frames: one entry for their one signature (one key,
    // signature and bitmap, the hashes of the subtrees with none of
    // them), not one per client frame. Node 4 gets all of them.
    let bodies = client_frames_kind(24, 16 * 1024, true);
    let views: Vec<_> = bodies
        .iter()
        .map(|b| PublishBatchView::decode(b).unwrap())
        .collect();
    let sig = views[0].seals[0].sig;
    assert!(views
        .iter()
        .all(|v| v.seals.len() == 1 && v.seals[0].sig == sig && v.seals[0].n == 24));
    // The client frame each message of the seal came in.
    let mut frame_of = [usize::MAX; 24];
    for (f, v) in views.iter().enumerate() {
        for (i, slot) in frame_of.iter_mut().enumerate() {
            if v.seals[0].is_present(i) {
                *slot = f;
            }
        }
    }
    assert!(frame_of.iter().all(|&f| f < views.len()));
    let all: Vec<[u8; 32]> = views.iter().flat_map(aligned_digests).collect();
    let tree = macula_wire::SealTree::new(&all);
    let copies = forward_all(
        &bodies,
        &[("t", 2, "t.*"), ("t", 4, "t.*"), ("u", 4, "u.*")],
    );
    let mut spanning = 0;
    for (n, want) in [(2u8, 12usize), (4, 24)] {
        for b in &copies[&id(n)] {
            let v = PublishBatchView::decode(b).unwrap();
            assert_eq!(v.seals.len(), 1, "node {n}: one entry per signature");
            let s = &v.seals[0];
            assert!(s.aligned && s.sig == sig);
            let mut absent = Vec::new();
            tree.absent(&s.present, &mut absent).unwrap();
            assert_eq!(s.absent, absent, "the publisher's tree's hashes");
            let frames: std::collections::BTreeSet<usize> = (0..24)
                .filter(|&i| s.is_present(i))
                .map(|i| frame_of[i])
                .collect();
            if frames.len() > 1 {
                spanning += 1;
            }
        }
        let mut r = node(n);
        r.subscribe("**", 7).unwrap();
        let got = receive(
            &mut r,
            id(1),
            &copies[&id(n)],
            &mut BatchReceiver::new(false),
        );
        assert_eq!(got.len(), want, "node {n}");
        assert!(got
            .iter()
            .all(|e| e.publisher == id(50) && e.proof == Proof::Signed));
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(unproved(&r), 0);
    }
    assert!(
        spanning > 0,
        "a copy holds messages of several client frames"
    );
}
