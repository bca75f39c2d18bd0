//! The MQTT bridge in a realm with an authority (issue 24): the CONNECT's
//! password is an API key of the node, mapped to the key's grant; every
//! publish and subscribe is checked against that grant. A real node, an
//! MQTT 5.0 client speaking bytes by hand over real TCP on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{config, start, STEP};
use ed25519_dalek::SigningKey;
use macula_auth::{Key, Subject};
use macula_runtime::apikey::{ApiKey, ApiKeyStore};
use macula_runtime::config::{Admission, MqttConfig};
use macula_runtime::{Identity, IdentitySource, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FAR: u64 = u64::MAX / 2;

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut v = vec![first, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// Reads one packet: (first byte, body).
async fn read(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tokio::time::timeout(STEP, s.read_exact(&mut head))
        .await
        .expect("a packet in time")
        .expect("a packet");
    assert!(head[1] < 128, "short packets only");
    let mut body = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut body).await.expect("body");
    (head[0], body)
}

/// An MQTT 5.0 CONNECT with `password`; returns the CONNACK reason code.
async fn connect(addr: std::net::SocketAddr, password: &str) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[5, 0xc2, 0, 60, 0]);
    body.extend(string(b"sensor-7"));
    body.extend(string(b"device"));
    body.extend(string(password.as_bytes()));
    s.write_all(&packet(0x10, &body)).await.unwrap();
    let (first, ack) = read(&mut s).await;
    assert_eq!(first, 0x20);
    (s, ack[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_is_an_api_key_and_its_grant_decides() {
    let authority = SigningKey::from_bytes(&[1; 32]);
    let dir = tempfile::tempdir().unwrap();
    let node_id = Identity::load_or_create(dir.path()).unwrap().node_id();
    let node_grant = common::signed_grant(
        &authority,
        1,
        Subject::Node(node_id),
        "allow publish **\nallow subscribe **",
        0,
        FAR,
    );
    let key = ApiKey::generate().unwrap();
    let client_grant = common::signed_grant(
        &authority,
        2,
        Subject::Client(Key([2; 32])),
        "allow publish sensor.**\nallow subscribe sensor.**",
        0,
        FAR,
    );
    let mut admission = Admission::new(Key::of(&authority), Some(node_grant));
    admission.api_keys = Some(ApiKeyStore::from_keys([(&key, client_grant)]));
    let node = start(NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        admission: Some(admission),
        mqtt: MqttConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..MqttConfig::default()
        },
        ..config()
    })
    .await;
    let addr = node.mqtt().expect("MQTT listener").local_addr();

    // Not a key of this node: bad username or password.
    let (_, code) = connect(addr, "mk_0000").await;
    assert_eq!(code, 0x86);
    let other = ApiKey::generate().unwrap().to_string();
    let (_, code) = connect(addr, &other).await;
    assert_eq!(code, 0x86);

    let (mut s, code) = connect(addr, &key.to_string()).await;
    assert_eq!(code, 0, "accepted with the key's grant");

    // SUBSCRIBE sensor/# (allowed) and secret/# (not): SUBACK 1, 0x87.
    let mut body = vec![0, 1, 0];
    body.extend(string(b"sensor/#"));
    body.push(1);
    body.extend(string(b"secret/#"));
    body.push(1);
    s.write_all(&packet(0x82, &body)).await.unwrap();
    let (first, suback) = read(&mut s).await;
    assert_eq!(first, 0x90);
    assert_eq!(&suback[3..], &[1, 0x87], "{suback:?}");

    // PUBLISH QoS 1 to secret/x: PUBACK 0x87, nothing published.
    let publish = |topic: &[u8], id: u8| {
        let mut body = string(topic);
        body.extend_from_slice(&[0, id, 0]);
        body.extend_from_slice(b"21.5");
        packet(0x32, &body)
    };
    s.write_all(&publish(b"secret/x", 5)).await.unwrap();
    let (first, puback) = read(&mut s).await;
    assert_eq!(first, 0x40);
    assert_eq!(&puback[..3], &[0, 5, 0x87], "{puback:?}");

    // sensor/a: PUBACK success, and it comes back on sensor/#.
    s.write_all(&publish(b"sensor/a", 6)).await.unwrap();
    let mut acked = false;
    let mut delivered = false;
    while !(acked && delivered) {
        let (first, body) = read(&mut s).await;
        match first & 0xf0 {
            0x40 => {
                assert_eq!(&body[..2], &[0, 6]);
                assert!(body.len() == 2 || body[2] == 0, "{body:?}");
                acked = true;
            }
            0x30 => {
                assert_eq!(&body[..10], &string(b"sensor/a")[..]);
                delivered = true;
                // Acknowledge it (QoS 1: packet ID after the topic).
                let ack = packet(0x40, &[body[10], body[11]]);
                s.write_all(&ack).await.unwrap();
            }
            other => panic!("unexpected packet {other:#x}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = node.metrics();
    assert_eq!(m.api_key_admitted_total.get(), 1);
}
