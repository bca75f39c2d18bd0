//! End-to-end payload encryption (issue 19) with real nodes and clients
//! over real QUIC on 127.0.0.1: a realm key set names `orders.**`; the
//! clients at the edges seal and open, the gateways and the node between
//! them carry only the envelope; a subscriber left out of a rotation
//! reads nothing published after it, and a rotation in the middle of a
//! stream of messages loses none and keeps their order.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::realm::*;
use common::{init_tracing, within, STEP};
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use macula_auth::keys::{
    rotate, Envelope, KeySet, KeySetBody, PatternKind, Rotation, ENVELOPE_OVERHEAD,
};
use macula_auth::Key;
use macula_runtime::pubsub::{PubSubError, Subscription, SubscriptionItem};
use macula_runtime::{Client, NodeRuntime};

/// The next key set: a new key for `orders.**`, wrapped to `members`.
fn next_set(
    authority: &SigningKey,
    prev: Option<KeySetBody>,
    members: &[&Client],
    activate_in_ms: u64,
) -> (KeySetBody, Vec<u8>) {
    let (body, _) = rotate(
        prev,
        Key::of(authority),
        &Rotation {
            pattern: "orders.**".into(),
            kind: PatternKind::Topic,
            members: members.iter().map(|c| c.e2e().member_key()).collect(),
            now_ms: now_ms(),
            activate_in_ms,
            grace_ms: 60_000,
            rotate_every_ms: None,
        },
        &mut macula_runtime::e2e::SysRng,
    )
    .expect("rotate");
    let bytes = KeySet::sign(&body, authority)
        .expect("sign")
        .to_bytes()
        .expect("encode");
    (body, bytes)
}

/// Waits (bounded) until every holder has version `v`.
async fn holds(v: u64, clients: &[&Client], nodes: &[&NodeRuntime]) {
    within(STEP, "key set spreads", async {
        loop {
            let c = clients.iter().all(|c| c.e2e().version() == v);
            let n = nodes.iter().all(|n| n.realm_service().e2e().version() == v);
            if c && n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn next_payload(sub: &mut Subscription) -> Bytes {
    match within(STEP, "event", sub.next()).await {
        Some(SubscriptionItem::Event(e)) => e.payload,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_and_forwarding_nodes_carry_only_ciphertext() {
    init_tracing();
    let authority = SigningKey::from_bytes(&[42; 32]);
    let (a, _ad) = member(&authority, 1, None).await;
    let (b, _bd) = member(&authority, 2, Some(&a)).await;
    let (c1, _c1d) = client_of(&a, &authority, 3).await;
    let (c2, _c2d) = client_of(&b, &authority, 4).await;
    let (_, set) = next_set(&authority, None, &[&c1, &c2], 0);
    // Given to A only: it spreads to B and to both gateways' clients.
    a.realm_service().install_keys(&set, None).expect("install");
    holds(1, &[&c1, &c2], &[&a, &b]).await;
    // A client attaching now has the set when `connect` returns (its
    // gateway's HELLO said which version to wait for): its first publish
    // is sealed.
    let (c4, _c4d) = client_of(&a, &authority, 6).await;
    assert_eq!(c4.e2e().version(), 1);

    let mut on_c2 = c2.subscribe("orders.**").await.expect("subscribe");
    // What the gateway of the publisher (A) and the gateway of the
    // subscriber (B) carry, as they carry it.
    let mut tap_a = a.pubsub().tap_mesh("orders.**").await.expect("tap a");
    let mut tap_b = b.pubsub().tap_mesh("orders.**").await.expect("tap b");
    // A subscribes as an application would: it holds no key.
    let mut on_a = a.pubsub().subscribe_mesh("orders.**").await.expect("sub a");
    let n = 20u32;
    for i in 0..n {
        c1.publish("orders.new", format!("secret order {i}"))
            .await
            .expect("publish");
    }
    let mut ids = HashSet::new();
    for i in 0..n {
        let plain = format!("secret order {i}");
        assert_eq!(next_payload(&mut on_c2).await, Bytes::from(plain.clone()));
        for tap in [&mut tap_a, &mut tap_b] {
            let carried = next_payload(tap).await;
            assert_eq!(carried.len(), plain.len() + ENVELOPE_OVERHEAD);
            assert!(
                !carried.windows(6).any(|w| w == b"secret"),
                "a gateway carried plaintext"
            );
            ids.insert(Envelope::decode(&carried).expect("an envelope").key_id);
        }
    }
    assert_eq!(ids.len(), 1, "one key");
    // A's own subscription gets nothing it could read: as its application
    // takes events, the sealed ones are not delivered, and are counted.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), on_a.next())
            .await
            .is_err(),
        "A delivered an event it holds no key for"
    );
    assert_eq!(a.realm_service().counters().e2e.at(2).get(), u64::from(n));
    assert_eq!(on_a.pending(), 0);
    // A node without the key cannot publish on the encrypted topics.
    match a
        .pubsub()
        .publish_mesh("orders.x", Bytes::from("x"), Default::default())
        .await
    {
        Err(PubSubError::Sealing { topic, .. }) => assert_eq!(topic, "orders.x"),
        other => panic!("expected a sealing error, got {other:?}"),
    }
    assert_eq!(c2.e2e().counters().e2e.at(1).get(), u64::from(n));
    assert_eq!(c1.e2e().counters().e2e.at(0).get(), u64::from(n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_nothing_and_locks_out_the_revoked() {
    init_tracing();
    let authority = SigningKey::from_bytes(&[43; 32]);
    let (a, _ad) = member(&authority, 1, None).await;
    let (b, _bd) = member(&authority, 2, Some(&a)).await;
    let (c1, _c1d) = client_of(&a, &authority, 3).await;
    let (c2, _c2d) = client_of(&b, &authority, 4).await;
    let (c3, _c3d) = client_of(&b, &authority, 5).await;
    let (v1, set1) = next_set(&authority, None, &[&c1, &c2, &c3], 0);
    a.realm_service()
        .install_keys(&set1, None)
        .expect("install");
    holds(1, &[&c1, &c2, &c3], &[&a, &b]).await;
    let mut on_c2 = c2.subscribe("orders.**").await.expect("subscribe c2");
    let mut on_c3 = c3.subscribe("orders.**").await.expect("subscribe c3");
    let mut tap_b = b.pubsub().tap_mesh("orders.**").await.expect("tap b");

    // C3 is revoked: the next key (active 300 ms after it is made, time
    // for the set to reach every member) goes to C1 and C2 only. It is
    // made while C1 publishes.
    const N: u32 = 3_000;
    let publisher = c1.clone();
    let load = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .publish("orders.flow", i.to_be_bytes().to_vec())
                .await
                .expect("publish");
            // Paced (about 1 s in all), so the key changes mid-stream.
            if i % 30 == 29 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    // Mid-stream.
    within(STEP, "the stream is flowing", async {
        while c1.e2e().counters().e2e.at(0).get() < u64::from(N) / 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let (_, set2) = next_set(&authority, Some(v1), &[&c1, &c2], 300);
    b.realm_service()
        .install_keys(&set2, None)
        .expect("install");
    holds(2, &[&c1, &c2, &c3], &[&a, &b]).await;
    within(STEP, "the load ends", load)
        .await
        .expect("publisher task");
    // After the activation for sure: one more, under the new key.
    tokio::time::sleep(Duration::from_millis(350)).await;
    c1.publish("orders.flow", N.to_be_bytes().to_vec())
        .await
        .expect("publish after the rotation");

    // C2 gets every message, in order.
    for i in 0..=N {
        let p = next_payload(&mut on_c2).await;
        assert_eq!(p.as_ref(), i.to_be_bytes(), "message {i}");
    }
    // The forwarding node saw both keys go by, never the plaintext.
    let mut ids = HashSet::new();
    for _ in 0..=N {
        let carried = next_payload(&mut tap_b).await;
        ids.insert(Envelope::decode(&carried).expect("an envelope").key_id);
    }
    assert_eq!(ids.len(), 2, "the stream crossed the rotation");
    // C3 reads a prefix (what was sealed before the activation), and
    // nothing after it: neither the rest of the stream nor the message
    // published after the rotation.
    let mut read = 0u32;
    while let Ok(item) = tokio::time::timeout(Duration::from_millis(500), on_c3.next()).await {
        match item {
            Some(SubscriptionItem::Event(e)) => {
                assert_eq!(
                    e.payload.as_ref(),
                    read.to_be_bytes(),
                    "C3's message {read}"
                );
                read += 1;
            }
            other => panic!("expected an event, got {other:?}"),
        }
    }
    assert!(read > 0 && read < N, "C3 read {read} of {N}");
    let no_key = c3.e2e().counters().e2e.at(2).get();
    assert_eq!(
        u64::from(read) + no_key,
        u64::from(N) + 1,
        "every message reached C3"
    );
    assert_eq!(c2.e2e().counters().e2e.at(2).get(), 0, "C2 missed no key");
}

/// Waits (bounded) until `counter` reads at least `n`.
async fn reaches(what: &str, counter: &prometheus_client::metrics::counter::Counter, n: u64) {
    within(STEP, what, async {
        while counter.get() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_the_clear_on_encrypted_topics_are_refused_where_they_enter() {
    init_tracing();
    let authority = SigningKey::from_bytes(&[45; 32]);
    let (a, _ad) = member(&authority, 1, None).await;
    let (b, _bd) = member(&authority, 2, Some(&a)).await;
    let (c1, _c1d) = client_of(&a, &authority, 3).await;
    let (c2, _c2d) = client_of(&b, &authority, 4).await;
    let (_, set) = next_set(&authority, None, &[&c1, &c2], 0);
    a.realm_service().install_keys(&set, None).expect("install");
    holds(1, &[&c1, &c2], &[&a, &b]).await;
    let mut on_c2 = c2.subscribe("orders.**").await.expect("subscribe");

    // A client handing its gateway a message in the clear on an encrypted
    // topic: the gateway refuses it, counts it, passes nothing on.
    c1.pubsub()
        .publish_carried(
            "orders.new",
            Bytes::from("clear secret"),
            Default::default(),
        )
        .await
        .expect("handed to the gateway");
    reaches(
        "A refuses the clear batch",
        a.realm_service().counters().e2e.at(5),
        1,
    )
    .await;
    // A node publishing for itself in the clear: refused by the next node.
    a.pubsub()
        .publish_carried(
            "orders.node",
            Bytes::from("clear secret"),
            Default::default(),
        )
        .await
        .expect("sent to B");
    reaches(
        "B refuses the node's clear batch",
        b.realm_service().counters().e2e.at(5),
        1,
    )
    .await;
    // The streams stay up: a sealed message after them is delivered, and
    // nothing in the clear reached the subscriber first.
    c1.publish("orders.new", "sealed secret")
        .await
        .expect("publish");
    assert_eq!(next_payload(&mut on_c2).await, Bytes::from("sealed secret"));
    assert_eq!(
        c2.e2e().counters().e2e.at(3).get(),
        0,
        "nothing malformed arrived"
    );
    // A topic outside the patterns is carried in the clear as before.
    let mut plain = c2.subscribe("news.**").await.expect("subscribe");
    c1.pubsub()
        .publish_carried("news.x", Bytes::from("hello"), Default::default())
        .await
        .expect("publish");
    assert_eq!(next_payload(&mut plain).await, Bytes::from("hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_an_encrypted_topic_stores_ciphertext_and_members_read_it() {
    use macula_runtime::stream::{PersistOptions, StreamError};
    use macula_stream::{DeliverPolicy, StreamConfig};
    init_tracing();
    let authority = SigningKey::from_bytes(&[47; 32]);
    // A hosts the stream and holds no key.
    let (a, ad) = member(&authority, 1, None).await;
    let (b, _bd) = member(&authority, 2, Some(&a)).await;
    let (c1, _c1d) = client_of(&a, &authority, 3).await;
    let (c2, _c2d) = client_of(&b, &authority, 4).await;
    let (c3, _c3d) = client_of(&b, &authority, 5).await;
    let (_, set) = next_set(&authority, None, &[&c1, &c2], 0);
    a.realm_service().install_keys(&set, None).expect("install");
    holds(1, &[&c1, &c2, &c3], &[&a, &b]).await;
    a.streams()
        .add(StreamConfig::new("orders", &["orders.**"]))
        .await
        .expect("stream");

    // Captured events (sealed by their publisher) and a publish to the
    // stream itself from a remote member (sealed by it).
    let n = 10u64;
    for i in 0..n {
        c1.publish("orders.new", format!("secret order {i}"))
            .await
            .expect("publish");
    }
    let t = Duration::from_secs(5);
    // The stream's procedure is advertised in the background: wait
    // (bounded) until C2 finds it.
    within(STEP, "the stream is found", async {
        while c2.stream("orders", t).info().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let ack = within(
        STEP,
        "stream publish",
        c2.stream("orders", t).publish(
            "orders.direct",
            Bytes::from(format!("secret order {n}")),
            PersistOptions::new(),
        ),
    )
    .await
    .expect("stored");
    assert!(ack.seq >= 1);
    within(STEP, "all stored", async {
        while a.streams().info("orders").expect("info").messages < n + 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // A member reading the stream remotely opens every message, in order.
    let mut sub = within(
        STEP,
        "subscribe",
        c2.stream("orders", t).subscribe(&[], DeliverPolicy::All),
    )
    .await
    .expect("subscribe");
    for i in 0..=n {
        let m = within(STEP, "stream message", sub.recv())
            .await
            .expect("a message");
        assert_eq!(m.payload, Bytes::from(format!("secret order {i}")));
    }
    assert_eq!(c2.e2e().counters().e2e.at(1).get(), n + 1, "opened");
    // A principal the key is not wrapped to reads nothing of it: its pull
    // leaves the messages out (counted), its read by sequence is an error.
    let c3s = c3.stream("orders", t);
    let mut sub3 = within(STEP, "subscribe", c3s.subscribe(&[], DeliverPolicy::All))
        .await
        .expect("subscribe");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub3.recv())
            .await
            .is_err(),
        "a non-member read a message"
    );
    assert_eq!(c3.e2e().counters().e2e.at(2).get(), n + 1, "all left out");
    match within(STEP, "get", c3s.get_msg(1)).await {
        Err(StreamError::Invalid(m)) => assert!(m.contains("end-to-end"), "{m}"),
        other => panic!("expected an end-to-end error, got {other:?}"),
    }
    // So does the host itself, which holds no key.
    assert!(matches!(
        a.streams().get_msg("orders", 1).await,
        Err(StreamError::Invalid(_))
    ));
    // A push consumer delivering to a topic in the clear: each delivery
    // carries the envelope as stored and names the topic it was captured
    // from, which a member's subscription opens it with; a non-member's
    // subscription delivers nothing of it (counted).
    let mut push2 = c2.subscribe("deliver.orders").await.expect("subscribe");
    let mut push3 = c3.subscribe("deliver.orders").await.expect("subscribe");
    let no_key3 = c3.e2e().counters().e2e.at(2).get();
    let cfg = macula_stream::ConsumerConfig {
        deliver_subject: Some("deliver.orders".into()),
        ack_wait: macula_wire::Millis(500),
        ..macula_stream::ConsumerConfig::durable("pusher")
    };
    a.streams()
        .add_consumer("orders", cfg)
        .await
        .expect("push consumer");
    let header = |e: &macula_runtime::pubsub::Event, k: &str| {
        e.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    // Delivered again after the ack wait until acknowledged: take each
    // sequence once.
    let mut got = std::collections::BTreeMap::new();
    within(STEP, "push deliveries", async {
        while got.len() < n as usize + 1 {
            let Some(SubscriptionItem::Event(e)) = push2.next().await else {
                panic!("subscription ended");
            };
            let seq: u64 = header(&e, "macula-stream-seq").parse().expect("seq");
            let subject = header(&e, macula_runtime::stream::SUBJECT_HEADER);
            got.insert(seq, (subject, e.payload));
        }
    })
    .await;
    for (i, (subject, payload)) in got.values().enumerate() {
        assert_eq!(payload, &Bytes::from(format!("secret order {i}")));
        let want = if i as u64 == n {
            "orders.direct"
        } else {
            "orders.new"
        };
        assert_eq!(subject, want);
    }
    for seq in got.keys() {
        a.streams()
            .ack(
                "orders",
                "pusher",
                *seq,
                macula_runtime::stream::AckKind::Ack,
            )
            .await
            .expect("ack");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), push3.next())
            .await
            .is_err(),
        "a non-member took a push delivery"
    );
    assert!(
        c3.e2e().counters().e2e.at(2).get() > no_key3,
        "the non-member's refusals are counted"
    );
    drop((push2, push3));

    // And the host stored what it carried: no plaintext on its disk.
    drop((sub, sub3));
    a.streams().shutdown().await;
    let file = std::fs::read(ad.path().join("streams").join("orders.redb")).expect("store");
    assert!(file.len() > 1_000, "the store holds the messages");
    assert!(
        !file.windows(12).any(|w| w == b"secret order"),
        "the stream's node stored plaintext"
    );
}
