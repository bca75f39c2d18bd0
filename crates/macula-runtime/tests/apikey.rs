//! API keys (issue 18): a gateway given API keys admits a lightweight
//! client presenting one instead of a grant, with the grant the key is
//! bound to; bad keys are refused naming why, and a flood of them from one
//! address is cut off while other addresses still get in. Real nodes and
//! clients, real QUIC on 127.0.0.0/8.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{config, start, within, RawClient, STEP};
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use macula_auth::{Key, Subject};
use macula_runtime::apikey::{ApiKey, ApiKeyFailure, ApiKeyLimits, ApiKeyStore};
use macula_runtime::config::Admission;
use macula_runtime::metrics::HandshakeFailure;
use macula_runtime::pubsub::SubscriptionItem;
use macula_runtime::{Client, ClientConfig, NodeConfig, NodeRuntime, PeerAddr};
use macula_wire::{ErrorCode, Message};

const FAR: u64 = u64::MAX / 2;

fn client_grant(authority: &SigningKey, serial: u8, expires_ms: u64) -> Vec<u8> {
    common::signed_grant(
        authority,
        serial,
        Subject::Client(Key([serial; 32])),
        "allow publish **\nallow subscribe **",
        0,
        expires_ms,
    )
}

fn gateway(authority: &SigningKey, store: ApiKeyStore) -> NodeConfig {
    let mut admission = Admission::new(Key::of(authority), None);
    admission.api_keys = Some(store);
    admission.api_key_limits = ApiKeyLimits::default();
    NodeConfig {
        admission: Some(admission),
        ..config()
    }
}

fn addr_of(n: &NodeRuntime) -> PeerAddr {
    format!("{}@{}", n.node_id(), n.local_addr())
        .parse()
        .expect("peer address")
}

/// A client of `gw` presenting `key`, dialing from `bind`'s address.
async fn attach(gw: &NodeRuntime, key: &ApiKey, bind: [u8; 4]) -> Result<Client, String> {
    let mut cfg = ClientConfig::new(vec![addr_of(gw)]);
    cfg.api_key = Some(key.clone());
    cfg.bind = SocketAddr::from((bind, 0));
    cfg.attach_timeout = Duration::from_secs(5);
    within(STEP, "client attach", Client::connect(cfg))
        .await
        .map_err(|e| e.to_string())
}

const HOME: [u8; 4] = [127, 0, 0, 1];
const OTHER: [u8; 4] = [127, 0, 0, 2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_valid_key_attaches_and_uses_pubsub() {
    let authority = SigningKey::from_bytes(&[1; 32]);
    let (k1, k2) = (ApiKey::generate().unwrap(), ApiKey::generate().unwrap());
    let store = ApiKeyStore::from_keys([
        (&k1, client_grant(&authority, 1, FAR)),
        (&k2, client_grant(&authority, 2, FAR)),
    ]);
    let gw = start(gateway(&authority, store)).await;
    let sub_client = attach(&gw, &k1, HOME).await.expect("key 1 admitted");
    let pub_client = attach(&gw, &k2, HOME).await.expect("key 2 admitted");
    let mut sub = sub_client.subscribe("news.*").await.expect("subscribe");
    // Published by the other client, through the same gateway.
    let mut delivered = false;
    for _ in 0..50 {
        pub_client
            .publish("news.today", "hello")
            .await
            .expect("publish");
        if let Ok(Some(SubscriptionItem::Event(e))) =
            tokio::time::timeout(Duration::from_millis(100), sub.next()).await
        {
            assert_eq!(&e.payload[..], b"hello");
            assert_eq!(e.publisher, pub_client.node_id());
            delivered = true;
            break;
        }
    }
    assert!(delivered, "the event reached the subscribing client");
    let m = gw.metrics();
    assert_eq!(m.api_key_admitted_total.get(), 2);
    assert_eq!(m.api_keys_loaded.get(), 2);
    sub_client.shutdown().await;
    pub_client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_refused_naming_why() {
    let authority = SigningKey::from_bytes(&[1; 32]);
    let forger = SigningKey::from_bytes(&[2; 32]);
    let (expired, foreign) = (ApiKey::generate().unwrap(), ApiKey::generate().unwrap());
    let store = ApiKeyStore::from_keys([
        (&expired, client_grant(&authority, 3, 1_000)),
        (&foreign, client_grant(&forger, 4, FAR)),
    ]);
    let gw = start(gateway(&authority, store)).await;
    let err = attach(&gw, &ApiKey::generate().unwrap(), HOME)
        .await
        .expect_err("unknown key");
    assert!(err.contains("unknown_key"), "{err}");
    let err = attach(&gw, &expired, HOME).await.expect_err("expired");
    assert!(err.contains("expired"), "{err}");
    let err = attach(&gw, &foreign, HOME).await.expect_err("other realm");
    assert!(err.contains("wrong_realm"), "{err}");
    // A full node (no `client` capability) presenting a key: refused.
    let raw = RawClient::connect(&gw).await;
    let mut s = raw.open().await;
    let mut hello = raw.hello();
    hello.api_key = Some(serde_bytes::ByteBuf::from(expired.as_bytes().to_vec()));
    s.send(&Message::Hello(hello)).await;
    match s.recv().await {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.message.contains("not_client"), "{}", e.message);
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    let m = gw.metrics();
    common::eventually(Duration::from_secs(5), "failures counted", || {
        m.api_key_failures(ApiKeyFailure::UnknownKey) == 1
            && m.api_key_failures(ApiKeyFailure::BadGrant) == 2
            && m.api_key_failures(ApiKeyFailure::NotClient) == 1
            && m.handshake_failures(HandshakeFailure::Unauthorized) == 4
    })
    .await;
    assert_eq!(m.api_key_admitted_total.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_keys_is_cut_off_on_the_sixth_attempt_other_addresses_still_get_in() {
    let authority = SigningKey::from_bytes(&[1; 32]);
    let good = ApiKey::generate().unwrap();
    let store = ApiKeyStore::from_keys([(&good, client_grant(&authority, 1, FAR))]);
    let gw = start(gateway(&authority, store)).await;
    for i in 1..=5 {
        let err = attach(&gw, &ApiKey::generate().unwrap(), HOME)
            .await
            .expect_err("bad key");
        assert!(err.contains("unknown_key"), "attempt {i}: {err}");
    }
    // The 6th, even with the good key: refused at once.
    let err = attach(&gw, &good, HOME).await.expect_err("rate limited");
    assert!(err.contains("RateLimited"), "{err}");
    assert!(err.contains("too many failed API-key attempts"), "{err}");
    // From another address the good key still works.
    let c = attach(&gw, &good, OTHER)
        .await
        .expect("good key from 127.0.0.2");
    assert_eq!(c.gateway(), Some(gw.node_id()));
    let m = gw.metrics();
    common::eventually(Duration::from_secs(5), "counted", || {
        m.api_key_rate_limited_total.get() == 1
            && m.handshake_failures(HandshakeFailure::RateLimited) == 1
            && m.api_key_failures(ApiKeyFailure::UnknownKey) == 5
    })
    .await;
    c.shutdown().await;
}
