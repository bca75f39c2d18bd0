//! `FrameReader` over a real QUIC stream on loopback: frames of every size
//! (empty, small, many per packet, 64 KiB and larger than a read chunk)
//! written in pieces arrive whole and in order, however the stream cuts
//! them; a stream ending inside a frame reports how much of it came; and
//! the bytes read past the last frame are handed back exactly.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{within, STEP};
use macula_runtime::framed::{FrameReader, ReadError};
use macula_runtime::tls::{self, TlsOptions};
use macula_runtime::Identity;
use macula_wire::{Message, Publish, DEFAULT_MAX_FRAME_SIZE};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

/// A client's unidirectional stream to a server on 127.0.0.1, and the
/// server's end of it (opened once the first byte arrives).
struct Pipe {
    send: quinn::SendStream,
    accept: tokio::task::JoinHandle<quinn::RecvStream>,
    _ends: (quinn::Endpoint, quinn::Endpoint, quinn::Connection),
}

async fn pipe() -> Pipe {
    let (server_id, client_id) = (Identity::generate(), Identity::generate());
    let server_tls = tls::build(&server_id, &TlsOptions::default()).expect("server tls");
    let client_tls = tls::build(&client_id, &TlsOptions::default()).expect("client tls");
    let server_crypto = QuicServerConfig::try_from(server_tls.server.clone()).expect("server");
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server_crypto)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .expect("bind server");
    let mut client =
        quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind client");
    let client_crypto = QuicClientConfig::try_from(client_tls.client.clone()).expect("client");
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_crypto)));
    let addr = server.local_addr().expect("server address");
    let accepting = {
        let server = server.clone();
        tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("server handshake");
            let recv = conn.accept_uni().await.expect("accept a stream");
            // Keep the connection open as long as the stream is read.
            std::mem::forget(conn);
            recv
        })
    };
    let sni = tls::server_name(Some(server_id.node_id()));
    let conn = within(STEP, "handshake", client.connect(addr, &sni).expect("dial"))
        .await
        .expect("client handshake");
    let send = conn.open_uni().await.expect("open a stream");
    Pipe {
        send,
        accept: accepting,
        _ends: (server, client, conn),
    }
}

/// Frame `i` of the test: a PUBLISH whose payload is `len` bytes of `i`.
fn frame(i: usize, len: usize) -> (Message, Vec<u8>) {
    let m = Message::Publish(Publish {
        topic: "framed.test".into(),
        payload: vec![i as u8; len],
        publisher: Identity::generate().node_id(),
        epoch: 1,
        seq: i as u64 + 1,
        headers: vec![],
        message_id: None,
    });
    let mut bytes = Vec::new();
    m.encode_frame(&mut bytes, DEFAULT_MAX_FRAME_SIZE)
        .expect("encode");
    (m, bytes)
}

/// Writes `bytes` in pieces of `piece` bytes, letting each go out on its
/// own now and then (so that the reader meets frames cut anywhere).
async fn write_in_pieces(send: &mut quinn::SendStream, bytes: &[u8], piece: usize) {
    for (n, p) in bytes.chunks(piece).enumerate() {
        send.write_all(p).await.expect("write");
        if n % 64 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test]
async fn frames_cut_anywhere_arrive_whole_and_in_order() {
    let sizes = [
        0usize, 1, 10, 1_000, 1_400, 3, 65_536, 5, 200_000, 64, 64, 64, 131_072, 0,
    ];
    for piece in [97usize, 700, 1_500, 16_000, 1 << 20] {
        let Pipe {
            mut send,
            accept,
            _ends,
        } = pipe().await;
        let mut all = Vec::new();
        let mut want = Vec::new();
        for (i, len) in sizes.iter().enumerate() {
            let (m, bytes) = frame(i, *len);
            all.extend_from_slice(&bytes);
            want.push(m);
        }
        let writer = tokio::spawn(async move {
            write_in_pieces(&mut send, &all, piece).await;
            send.finish().expect("finish");
            send
        });
        let recv = within(STEP, "accept", accept).await.expect("accept task");
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME_SIZE);
        for (i, m) in want.iter().enumerate() {
            let f = within(STEP, "a frame", reader.read())
                .await
                .unwrap_or_else(|e| panic!("frame {i} in pieces of {piece}: {e}"))
                .unwrap_or_else(|| panic!("stream ended before frame {i} (pieces of {piece})"));
            let got = f.decode().expect("decodes");
            assert_eq!(&got, m, "frame {i}, pieces of {piece}");
        }
        assert!(
            within(STEP, "the end", reader.read())
                .await
                .expect("clean end")
                .is_none(),
            "nothing after the last frame (pieces of {piece})"
        );
        drop(writer.await.expect("writer"));
    }
}

#[tokio::test]
async fn a_stream_ending_inside_a_frame_says_how_much_came() {
    // Cut inside the header, right after it, and deep inside a large body
    // (held in pieces by the reader until the frame is whole).
    for cut in [3usize, 8, 9, 50_000, 199_999] {
        let Pipe {
            mut send,
            accept,
            _ends,
        } = pipe().await;
        let (first, first_bytes) = frame(0, 100);
        let (_, big) = frame(1, 200_000);
        let cut = cut.min(big.len() - 1);
        let mut all = first_bytes.clone();
        all.extend_from_slice(&big[..cut]);
        let writer = tokio::spawn(async move {
            write_in_pieces(&mut send, &all, 1_200).await;
            send.finish().expect("finish");
            send
        });
        let recv = within(STEP, "accept", accept).await.expect("accept task");
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME_SIZE);
        let f = within(STEP, "first", reader.read())
            .await
            .expect("first frame")
            .expect("a frame");
        assert_eq!(f.decode().expect("decodes"), first);
        match within(STEP, "the cut", reader.read()).await {
            Err(ReadError::Truncated(n)) => assert_eq!(n, cut, "bytes of the cut frame"),
            other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
        }
        drop(writer.await.expect("writer"));
    }
}

#[tokio::test]
async fn the_bytes_past_the_last_frame_are_handed_back_exactly() {
    // A status frame, then bytes that are not frames (a relayed session):
    // whatever the reader took from the stream past the frame, held in
    // pieces or not, comes back before the rest of the stream.
    for tail_len in [0usize, 5, 1_000, 150_000] {
        let Pipe {
            mut send,
            accept,
            _ends,
        } = pipe().await;
        let (status, mut all) = frame(0, 10);
        // The tail starts like a frame header announcing a large body, so
        // the reader holds what follows in pieces.
        let (_, big) = frame(1, 150_000);
        let tail: Vec<u8> = big.iter().copied().take(tail_len).collect();
        all.extend_from_slice(&tail);
        let writer = tokio::spawn(async move {
            write_in_pieces(&mut send, &all, 1_300).await;
            send.finish().expect("finish");
            send
        });
        let recv = within(STEP, "accept", accept).await.expect("accept task");
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME_SIZE);
        let f = within(STEP, "status", reader.read())
            .await
            .expect("status frame")
            .expect("a frame");
        assert_eq!(f.decode().expect("decodes"), status);
        if tail_len > 8 {
            // Let the reader take part of the tail into its pieces: ask for
            // a frame (the tail's header announces one) for a moment.
            let _ = tokio::time::timeout(Duration::from_millis(30), reader.read()).await;
        }
        let (mut recv, rest) = reader.into_parts();
        let mut got = rest.to_vec();
        got.extend_from_slice(
            &within(STEP, "the rest", recv.read_to_end(1 << 20))
                .await
                .expect("read the rest"),
        );
        assert_eq!(got.len(), tail.len(), "tail of {tail_len}");
        assert!(got == tail, "tail of {tail_len}: bytes differ");
        drop(writer.await.expect("writer"));
    }
}
