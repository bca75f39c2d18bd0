//! STATUS_REQUEST and STATUS_REPORT (`macula_wire::status`, PROTOCOL.md
//! 5.11): round trips, limits, sizes, and a decoder that never panics.
use macula_wire::limits::{MAX_ADDR_LEN, MAX_AGENT_LEN, MAX_LISTEN_ADDRS};
use macula_wire::message::fuzz_status;
use macula_wire::status::*;
use macula_wire::{
    FrameDecoder, Message, MessageType, NodeId, DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_LEN,
};
use proptest::prelude::*;

fn id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 32]>().prop_map(NodeId::from_bytes)
}

fn link() -> impl Strategy<Value = StatusLink> {
    (
        id(),
        proptest::option::of(id()),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(node_id, relayed_via, rtt_us, outbound)| StatusLink {
            node_id,
            relayed_via,
            rtt_us,
            outbound,
        })
}

fn totals() -> impl Strategy<Value = StatusTotals> {
    proptest::array::uniform14(any::<u64>()).prop_map(|v| StatusTotals {
        messages_in: v[0],
        messages_out: v[1],
        published: v[2],
        delivered: v[3],
        rpc_calls: v[4],
        rpc_served: v[5],
        dht_records: v[6],
        dht_contacts: v[7],
        dht_lookups: v[8],
        dht_lookup_hops: v[9],
        subscriptions: v[10],
        services: v[11],
        pubsub_in: v[12],
        pubsub_out: v[13],
    })
}

fn status() -> impl Strategy<Value = NodeStatus> {
    (
        id(),
        proptest::collection::vec("[0-9.:a-z]{0,40}", 0..=MAX_LISTEN_ADDRS),
        "[ -~]{0,64}",
        any::<u64>(),
        any::<bool>(),
        "[a-z]{0,16}",
        proptest::collection::vec(link(), 0..40),
        any::<u32>(),
        any::<u32>(),
        totals(),
    )
        .prop_map(
            |(
                node_id,
                addrs,
                agent,
                uptime_ms,
                ready,
                reachability,
                links,
                links_omitted,
                clients,
                totals,
            )| NodeStatus {
                node_id,
                addrs,
                agent,
                uptime_ms,
                ready,
                reachability,
                links,
                links_omitted,
                clients,
                totals,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        any::<u64>()
            .prop_map(|nonce| Message::Status(StatusMessage::Request(StatusRequest { nonce }))),
        (any::<u64>(), status()).prop_map(|(nonce, s)| Message::Status(StatusMessage::Report(
            StatusReport {
                nonce,
                status: Some(Box::new(s)),
                refused: String::new(),
            }
        ))),
        (any::<u64>(), "[ -~]{1,200}").prop_map(|(nonce, why)| Message::Status(
            StatusMessage::Report(StatusReport {
                nonce,
                status: None,
                refused: why,
            })
        )),
    ]
}

fn round_trip(msg: &Message) -> Message {
    let mut buf = Vec::new();
    msg.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE)
        .expect("encodes");
    let (frame, used) = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE)
        .decode(&buf)
        .expect("a frame")
        .expect("complete");
    assert_eq!(used, buf.len());
    Message::decode(frame.header.msg_type, frame.body).expect("decodes")
}

proptest! {
    #[test]
    fn status_messages_round_trip(msg in message()) {
        prop_assert_eq!(round_trip(&msg), msg);
    }

    #[test]
    fn status_decoder_never_panics(
        t in prop_oneof![Just(MessageType::StatusRequest as u8), Just(MessageType::StatusReport as u8)],
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = Message::decode(t, &body);
        fuzz_status(&body);
    }

    /// Mutated valid reports: decoding never panics, and whatever
    /// decodes re-encodes.
    #[test]
    fn status_decoder_survives_mutations(msg in message(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut buf = Vec::new();
        msg.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE).expect("encodes");
        let mut body = buf[FRAME_HEADER_LEN..].to_vec();
        for (i, b) in flips {
            let at = i.index(body.len());
            body[at] = b;
        }
        if let Ok(m) = Message::decode(buf[1], &body) {
            let mut out = Vec::new();
            prop_assert!(m.encode_frame(&mut out, u32::MAX).is_ok());
        }
    }
}

/// A report of `status`.
fn of(status: NodeStatus) -> StatusReport {
    StatusReport {
        nonce: 1,
        status: Some(Box::new(status)),
        refused: String::new(),
    }
}

/// Why `report` cannot be sent (it must not be), which is also why it is
/// not taken: `Message::validate` runs on both sides.
fn refused(report: StatusReport) -> String {
    let mut buf = Vec::new();
    match Message::Status(StatusMessage::Report(report)).encode_frame(&mut buf, u32::MAX) {
        Err(e) => e.to_string(),
        Ok(()) => panic!("a report over a limit was encoded"),
    }
}

#[test]
fn status_limits_are_checked() {
    let base = NodeStatus {
        node_id: NodeId::from_bytes([1; 32]),
        addrs: vec![],
        agent: String::new(),
        uptime_ms: 0,
        ready: true,
        reachability: "public".into(),
        links: vec![],
        links_omitted: 0,
        clients: 0,
        totals: StatusTotals::default(),
    };
    let link = StatusLink {
        node_id: NodeId::from_bytes([2; 32]),
        relayed_via: None,
        rtt_us: 1,
        outbound: true,
    };
    let too_many = NodeStatus {
        links: vec![link; MAX_STATUS_LINKS + 1],
        ..base.clone()
    };
    assert!(refused(of(too_many)).contains("links"));
    let long_agent = NodeStatus {
        agent: "a".repeat(MAX_AGENT_LEN + 1),
        ..base.clone()
    };
    assert!(refused(of(long_agent)).contains("agent"));
    let both = StatusReport {
        nonce: 1,
        status: Some(Box::new(base.clone())),
        refused: "no".into(),
    };
    assert!(refused(both).contains("not both"));
    let neither = StatusReport {
        nonce: 1,
        status: None,
        refused: String::new(),
    };
    assert!(refused(neither).contains("says why"));
    // The largest report fits the smallest frame limit a peer may have.
    let full = Message::Status(StatusMessage::Report(StatusReport {
        nonce: u64::MAX,
        status: Some(Box::new(NodeStatus {
            links: vec![
                StatusLink {
                    relayed_via: Some(NodeId::from_bytes([3; 32])),
                    rtt_us: u64::MAX,
                    ..link
                };
                MAX_STATUS_LINKS
            ],
            addrs: vec!["a".repeat(MAX_ADDR_LEN); MAX_LISTEN_ADDRS],
            agent: "a".repeat(MAX_AGENT_LEN),
            ..base
        })),
        refused: String::new(),
    }));
    let mut buf = Vec::new();
    full.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE)
        .expect("the largest report fits the default frame limit");
    assert!(buf.len() < 200 * 1024, "{}", buf.len());
}

/// What one report costs on the wire (BENCHMARKS.md, "Node status").
#[test]
fn status_report_sizes() {
    let report = |links: usize| {
        let link = |i: usize| StatusLink {
            node_id: NodeId::from_bytes([i as u8; 32]),
            relayed_via: None,
            rtt_us: 1_500,
            outbound: i.is_multiple_of(2),
        };
        let msg = Message::Status(StatusMessage::Report(StatusReport {
            nonce: u64::MAX / 3,
            status: Some(Box::new(NodeStatus {
                node_id: NodeId::from_bytes([9; 32]),
                addrs: vec!["192.0.2.10:4433".into()],
                agent: "macula/0.1.0".into(),
                uptime_ms: 86_400_000,
                ready: true,
                reachability: "public".into(),
                links: (0..links).map(link).collect(),
                links_omitted: 0,
                clients: 12,
                totals: StatusTotals {
                    messages_in: 1 << 40,
                    messages_out: 1 << 40,
                    pubsub_in: 1 << 36,
                    pubsub_out: 1 << 36,
                    published: 1 << 30,
                    delivered: 1 << 30,
                    rpc_calls: 1 << 30,
                    rpc_served: 1 << 30,
                    dht_records: 500,
                    dht_contacts: 160,
                    dht_lookups: 1 << 20,
                    dht_lookup_hops: 3 << 20,
                    subscriptions: 40,
                    services: 8,
                },
            })),
            refused: String::new(),
        }));
        let mut buf = Vec::new();
        msg.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE)
            .expect("encodes");
        buf.len()
    };
    let (three, full) = (report(3), report(256));
    eprintln!("STATUS_REPORT frame: 3 links {three} bytes, 256 links {full} bytes");
    assert!(three < 1024, "{three}");
    assert!(full < 40 * 1024, "{full}");
    // The runtime's estimate for fitting links into a frame limit
    // (status/mod.rs: 4096 + 120 per link) is an upper bound.
    assert!(full < 4096 + 120 * 256, "{full}");
}
