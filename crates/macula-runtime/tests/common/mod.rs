//! Helpers shared by the runtime's integration tests: nodes on loopback,
//! bounded waits, and a raw QUIC client that speaks frames by hand.
//!
//! Every wait here is bounded, so a broken runtime fails a test instead of
//! hanging it.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

pub mod realm;
#[cfg(feature = "otlp")]
pub mod spans;

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use macula_runtime::framed::{FrameReader, FrameWriter};
use macula_runtime::tls::{self, TlsOptions};
use macula_runtime::{Identity, NodeConfig, NodeRuntime, PeerEvent};
use macula_wire::{Hello, Message, NodeId, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::broadcast;

/// A grant token's bytes: `authority` grants `subject` (serial all
/// `serial`) the `rules`, valid from `not_before_ms` to `expires_ms`.
pub fn signed_grant(
    authority: &ed25519_dalek::SigningKey,
    serial: u8,
    subject: macula_auth::Subject,
    rules: &str,
    not_before_ms: u64,
    expires_ms: u64,
) -> Vec<u8> {
    let realm = macula_auth::Key::of(authority);
    let body = macula_auth::GrantBody {
        realm,
        issuer: realm,
        id: [serial; 16],
        subject,
        rules: macula_auth::policy::parse_rules(rules).expect("rules"),
        roles: vec![],
        not_before_ms,
        expires_ms,
    };
    macula_auth::Grant {
        grant: macula_auth::sign(&body, authority).expect("sign"),
        signer: None,
    }
    .to_bytes()
    .expect("encode")
}

/// Upper bound for any single step that should take milliseconds.
pub const STEP: Duration = Duration::from_secs(10);

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `cond` every 10 ms until it holds, failing the test after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("condition not reached within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The admin token of every test node ([`admin_token_file`]).
pub const ADMIN_TOKEN: &str = "0123456789abcdef0123456789abcdef-test-admin-token";

/// A file (mode 0600, one per test process) holding [`ADMIN_TOKEN`].
pub fn admin_token_file() -> std::path::PathBuf {
    static FILE: std::sync::OnceLock<tempfile::TempPath> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let mut f = tempfile::NamedTempFile::new().expect("token file");
        std::io::Write::write_all(&mut f, ADMIN_TOKEN.as_bytes()).expect("write token");
        // NamedTempFile is created 0600.
        f.into_temp_path()
    })
    .to_path_buf()
}

/// A zero-config node on an ephemeral loopback port with a fresh identity
/// and the test admin token.
pub fn config() -> NodeConfig {
    let mut cfg = NodeConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        identity: macula_runtime::IdentitySource::Ephemeral,
        ..Default::default()
    };
    cfg.admin_auth.token_file = Some(admin_token_file());
    cfg
}

pub async fn start(cfg: NodeConfig) -> NodeRuntime {
    within(STEP, "node start", NodeRuntime::start(cfg))
        .await
        .expect("node starts")
}

/// Starts a node on a fixed port, retrying while the port is still held by a
/// node that is shutting down (UDP has no TIME_WAIT, but the old endpoint's
/// driver may take a moment to drop its socket).
pub async fn start_on_port(mut cfg: NodeConfig, port: u16) -> NodeRuntime {
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match NodeRuntime::start(cfg.clone()).await {
            Ok(n) => return n,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "port {port} not free yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot start a node on port {port}: {e}"),
        }
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
    s.local_addr().expect("probe addr").port()
}

/// Waits for the next event matching `pred`, skipping others.
pub async fn next_event(
    rx: &mut broadcast::Receiver<PeerEvent>,
    limit: Duration,
    what: &str,
    mut pred: impl FnMut(&PeerEvent) -> bool,
) -> PeerEvent {
    within(limit, what, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) => {}
                Err(e) => panic!("event channel failed while waiting for {what}: {e}"),
            }
        }
    })
    .await
}

pub fn is_connected(ev: &PeerEvent, id: NodeId) -> bool {
    matches!(ev, PeerEvent::Connected { node_id, .. } if *node_id == id)
}

pub fn is_disconnected(ev: &PeerEvent, id: NodeId) -> bool {
    matches!(ev, PeerEvent::Disconnected { node_id, .. } if *node_id == id)
}

/// Every event already queued, without waiting.
pub fn drain(rx: &mut broadcast::Receiver<PeerEvent>) -> Vec<PeerEvent> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        out.push(ev);
    }
    out
}

/// A hand-driven QUIC client: authenticates with its own identity but speaks
/// frames byte by byte, so tests can send what no `NodeRuntime` would.
pub struct RawClient {
    pub identity: Identity,
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

/// The control stream of a raw client.
pub struct RawStream {
    pub writer: FrameWriter,
    pub reader: FrameReader,
}

impl RawClient {
    /// TLS-connects to `node` (expecting its node ID); no HELLO yet.
    pub async fn connect(node: &NodeRuntime) -> RawClient {
        let identity = Identity::generate();
        let cfg = tls::build(&identity, &TlsOptions::default()).expect("client tls");
        let crypto = QuicClientConfig::try_from(cfg.client.clone()).expect("quic client config");
        let mut endpoint =
            quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind client");
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let sni = tls::server_name(Some(node.node_id()));
        let connecting = endpoint.connect(node.local_addr(), &sni).expect("dial");
        let conn = within(STEP, "raw TLS handshake", connecting)
            .await
            .expect("raw client TLS handshake");
        RawClient {
            identity,
            endpoint,
            conn,
        }
    }

    /// A HELLO that the node accepts from this client.
    pub fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            node_id: self.identity.node_id(),
            realm: macula_runtime::config::DEFAULT_REALM.to_string(),
            capabilities: vec![],
            listen_addrs: vec![],
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            agent: "raw-test-client".into(),
            grant: None,
            api_key: None,
            observed_addr: None,
        }
    }

    /// Opens a bidirectional stream.
    pub async fn open(&self) -> RawStream {
        let (send, recv) = within(STEP, "open_bi", self.conn.open_bi())
            .await
            .expect("open a stream");
        RawStream {
            writer: FrameWriter::new(send, DEFAULT_MAX_FRAME_SIZE),
            reader: FrameReader::new(recv, DEFAULT_MAX_FRAME_SIZE),
        }
    }

    /// Opens the control stream and completes the HELLO exchange.
    pub async fn handshake(&self, node: &NodeRuntime) -> RawStream {
        let mut s = self.open().await;
        s.send(&Message::Hello(self.hello())).await;
        match s.recv().await {
            Message::Hello(h) => assert_eq!(h.node_id, node.node_id(), "node's HELLO"),
            other => panic!("expected the node's HELLO, got {other:?}"),
        }
        s
    }

    /// Waits for the connection to close and returns the application close
    /// code the node gave.
    pub async fn closed_code(&self) -> u64 {
        match within(STEP, "connection close", self.conn.closed()).await {
            quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
            other => panic!("expected an application close, got {other}"),
        }
    }
}

impl RawStream {
    pub async fn send(&mut self, msg: &Message) {
        within(STEP, "send frame", self.writer.send(msg))
            .await
            .expect("send frame");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        within(STEP, "send raw bytes", self.writer.send_raw(bytes))
            .await
            .expect("send raw bytes");
    }

    /// The next frame, decoded; fails the test on anything else.
    pub async fn recv(&mut self) -> Message {
        let frame = within(STEP, "read frame", self.reader.read())
            .await
            .expect("read frame")
            .expect("stream ended instead of a frame");
        frame.decode().expect("decodable frame")
    }

    /// `Ok(None)` when the node finished the stream, `Ok(Some)` for a frame.
    pub async fn try_recv(&mut self) -> Result<Option<Message>, macula_runtime::framed::ReadError> {
        let frame = within(STEP, "read frame", self.reader.read()).await?;
        Ok(frame.map(|f| f.decode().expect("decodable frame")))
    }
}

/// A node bootstrapped through `to`.
pub fn boot(to: &NodeRuntime) -> NodeConfig {
    NodeConfig {
        bootstrap: vec![macula_runtime::PeerAddr::from(to.local_addr())],
        ..config()
    }
}

/// Waits (bounded) until `n` has joined the DHT.
pub async fn joined(n: &NodeRuntime) {
    within(STEP, "DHT join", n.dht().wait_bootstrapped())
        .await
        .expect("joins");
}

/// A - B - C in a line: B joins through A, C only through B.
pub async fn line() -> (NodeRuntime, NodeRuntime, NodeRuntime) {
    let a = start(config()).await;
    let b = start(boot(&a)).await;
    joined(&b).await;
    let c = start(boot(&b)).await;
    joined(&c).await;
    (a, b, c)
}

/// Publishes `body` on `topic` through the mesh, failing the test on error.
pub async fn publish(n: &NodeRuntime, topic: &str, body: &str) {
    n.pubsub()
        .publish_mesh(
            topic,
            bytes::Bytes::from(body.to_string()),
            macula_runtime::pubsub::PublishOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("publish {topic:?}: {e}"));
}
