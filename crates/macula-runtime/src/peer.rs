//! One authenticated connection to a peer: the HELLO handshake and the
//! `Peer` handle services use to send and to open streams. The task that
//! drives the connection afterwards is `driver.rs`.
//!
//! The control stream is the first bidirectional stream, opened by the dialer.
//! It carries HELLO, PING/PONG, ERROR and DISCONNECT, and the messages of the
//! services that travel there. This module never decides pool membership; it
//! asks the pool (through an `Admission` check) and reports back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use macula_wire::{
    DecodeError, Disconnect, DisconnectReason, ErrorCode, ErrorFrame, Hello, Message, NodeId, Ping,
    Pong, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION,
};
use quinn::VarInt;
use tokio::sync::oneshot;

use crate::authz::PeerGrant;
use crate::framed::{FrameReader, FrameWriter, ReadError};
use crate::metrics::{Metrics, ProtocolErrorKind};

/// Which side opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// We dialed.
    Outbound,
    /// The peer dialed us.
    Inbound,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// QUIC application close code for a disconnect reason: the same number as
/// the DISCONNECT reason code, so a peer that only sees CONNECTION_CLOSE
/// still learns why.
pub fn close_code(reason: DisconnectReason) -> VarInt {
    VarInt::from_u32(u32::from(u16::from(reason)))
}

/// How long to wait, after an ERROR frame that precedes a close, for the peer
/// to read it and close first. A QUIC close abandons stream data the peer has
/// not received yet, so closing at once would usually lose the explanation.
pub(crate) const ERROR_LINGER: Duration = Duration::from_millis(500);

pub use crate::handshake_error::HandshakeError;

/// Why a ping got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PingError {
    #[error("no pong within {0:?}")]
    Timeout(Duration),
    #[error("connection closed")]
    Closed,
    #[error("could not send ping: {0}")]
    Send(String),
}

/// What the local node says about itself and expects of peers.
#[derive(Debug, Clone)]
pub struct LocalInfo {
    pub hello: Hello,
    pub max_frame_size: u32,
    /// The realm's authority, when it has one: peers need a grant.
    pub authz: Option<Arc<crate::authz::Authz>>,
    /// The API keys this node accepts from clients (`apikey.rs`), if any.
    pub api_keys: Option<Arc<crate::apikey_gate::ApiKeyGate>>,
    /// The realm's end-to-end keys held (a full node): the version goes in
    /// each HELLO's capabilities (`e2e-keys=N`), so a client waits for the
    /// key set before it publishes (PROTOCOL.md §5.14).
    pub keys: Option<Arc<crate::e2e::E2e>>,
}

/// A cheap, clonable handle to an authenticated peer connection.
#[derive(Clone)]
pub struct Peer(Arc<PeerShared>);

struct PeerShared {
    node_id: NodeId,
    conn: quinn::Connection,
    hello: Hello,
    direction: Direction,
    control: tokio::sync::Mutex<FrameWriter>,
    pending_pings: Mutex<HashMap<u64, oneshot::Sender<Pong>>>,
    next_nonce: AtomicU64,
    /// Milliseconds since `epoch` of the last application activity.
    last_activity_ms: AtomicU64,
    epoch: Instant,
    /// Kept connections are never idle-closed or evicted (bootstrap peers).
    kept: AtomicBool,
    /// The relay splicing this connection, if it is relayed.
    relayed_via: std::sync::OnceLock<NodeId>,
    /// Not a DHT contact for others: it cannot be dialed directly.
    unlisted: AtomicBool,
    /// A direct connection that replaced a relayed one (hole punching):
    /// the relay is the way back when it dies.
    punched: AtomicBool,
    /// The grant the peer proved in HELLO (a realm with an authority).
    grant: Option<Arc<PeerGrant>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("node_id", &self.0.node_id)
            .field("remote", &self.0.conn.remote_address())
            .field("direction", &self.0.direction)
            .finish()
    }
}

impl Peer {
    /// The node ID the peer proved in the TLS handshake.
    pub fn node_id(&self) -> NodeId {
        self.0.node_id
    }

    /// The peer's UDP address as we see it.
    pub fn remote_addr(&self) -> SocketAddr {
        self.0.conn.remote_address()
    }

    pub fn direction(&self) -> Direction {
        self.0.direction
    }

    /// The peer's HELLO (realm, capabilities, listen addresses, limits).
    pub fn hello(&self) -> &Hello {
        &self.0.hello
    }

    /// The grant the peer presented and this node verified (only in a realm
    /// with an authority): what it may do.
    pub fn grant(&self) -> Option<&Arc<PeerGrant>> {
        self.0.grant.as_ref()
    }

    /// Whether this peer may hand over (or be handed) `action` on
    /// `resource` in the realm of `authz`: a client for itself, a node for
    /// itself or as a carrier of others' traffic (`relay`).
    pub fn authorized(
        &self,
        authz: &crate::authz::Authz,
        action: macula_auth::Action,
        resource: &str,
    ) -> Result<(), crate::authz::Denied> {
        let grant = self.grant().map(|g| &**g);
        match self.is_client() {
            true => authz.check(grant, self.0.node_id, action, resource),
            false => authz.check_peer(grant, self.0.node_id, action, resource),
        }
    }

    /// QUIC's smoothed round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.0.conn.rtt()
    }

    /// The underlying QUIC connection, for services that open streams.
    pub fn connection(&self) -> &quinn::Connection {
        &self.0.conn
    }

    /// Identifies this connection among all connections of the endpoint.
    pub fn connection_id(&self) -> usize {
        self.0.conn.stable_id()
    }

    pub fn is_closed(&self) -> bool {
        self.0.conn.close_reason().is_some()
    }

    /// Marks the connection as used now (postpones the idle timeout).
    pub fn touch(&self) {
        let ms = self.0.epoch.elapsed().as_millis() as u64;
        self.0.last_activity_ms.store(ms, Relaxed);
    }

    /// Time since the last application activity.
    pub fn idle_for(&self) -> Duration {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.0.last_activity_ms.load(Relaxed)))
    }

    /// Keeps the connection open regardless of idleness and pool pressure.
    pub fn set_kept(&self, kept: bool) {
        self.0.kept.store(kept, Relaxed);
    }

    /// Is the peer a lightweight client (HELLO capability `client`)?
    pub fn is_client(&self) -> bool {
        is_client_hello(self.hello())
    }

    pub fn is_kept(&self) -> bool {
        self.0.kept.load(Relaxed)
    }

    /// The relay this connection runs through; `None` for a direct one.
    pub fn relayed_via(&self) -> Option<NodeId> {
        self.0.relayed_via.get().copied()
    }

    /// Marks the connection as relayed through `relay` (once, before it is
    /// pooled). A relayed peer is never handed out as a DHT contact.
    pub(crate) fn set_relayed_via(&self, relay: NodeId) {
        let _ = self.0.relayed_via.set(relay);
        self.set_unlisted();
    }

    /// Time since the connection was authenticated (TLS and HELLO done).
    pub fn age(&self) -> std::time::Duration {
        self.0.epoch.elapsed()
    }

    /// A direct connection that replaced a relayed one to the same node
    /// (hole punching), so a relay route to the node exists.
    pub fn is_punched(&self) -> bool {
        self.0.punched.load(Relaxed)
    }

    pub(crate) fn set_punched(&self) {
        self.0.punched.store(true, Relaxed);
    }

    /// Whether another route to this node exists when this connection
    /// dies (a node's connection that is relayed, or direct by hole
    /// punching): RPC re-sends a call in flight on it over the new route,
    /// and a provider remembers the calls that came on it so it runs each
    /// once (PROTOCOL.md §5.4, "Re-sent calls").
    pub fn is_replaceable(&self) -> bool {
        !self.is_client() && (self.relayed_via().is_some() || self.is_punched())
    }

    /// True when this peer must not be listed as a DHT contact (it is
    /// private: relayed, or holding a reservation at this node).
    pub fn is_unlisted(&self) -> bool {
        self.0.unlisted.load(Relaxed)
    }

    pub(crate) fn set_unlisted(&self) {
        self.0.unlisted.store(true, Relaxed);
    }

    /// Sends a PING on the control stream and waits for its PONG.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, PingError> {
        let nonce = self.0.next_nonce.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock_pings().insert(nonce, tx);
        let start = Instant::now();
        let msg = Message::Ping(Ping {
            nonce,
            sent_at_us: self.0.epoch.elapsed().as_micros() as u64,
            keep: self.is_kept(),
        });
        if let Err(e) = self.send_control(&msg).await {
            self.lock_pings().remove(&nonce);
            return Err(PingError::Send(e));
        }
        let res = tokio::time::timeout(timeout, rx).await;
        self.lock_pings().remove(&nonce);
        match res {
            Ok(Ok(_pong)) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(PingError::Closed),
            Err(_) => Err(PingError::Timeout(timeout)),
        }
    }

    /// Tells the peer why, then closes the connection.
    pub async fn disconnect(&self, reason: DisconnectReason, message: &str) {
        let msg = Message::Disconnect(Disconnect {
            reason,
            message: truncate(message),
        });
        // Best effort: the close below carries the reason code anyway.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.send_control(&msg)).await;
        self.0
            .conn
            .close(close_code(reason), truncate(message).as_bytes());
    }

    /// Sends one message on the control stream (used by services such as
    /// the DHT, whose messages travel there).
    pub async fn send(&self, msg: &Message) -> Result<(), String> {
        self.send_control(msg).await
    }

    /// Sends several messages on the control stream in one write (used for
    /// batches of PUBLISH frames). Returns how many were sent.
    pub async fn send_many(&self, msgs: &[Message]) -> Result<usize, String> {
        let mut w = self.0.control.lock().await;
        let n = w.send_many(msgs).await.map_err(|e| e.to_string())?;
        let m = &self.0.metrics;
        m.frames_sent_total.inc_by(n as u64);
        for msg in msgs {
            m.message_sent(msg.msg_type() as u8);
        }
        Ok(n)
    }

    async fn send_control(&self, msg: &Message) -> Result<(), String> {
        let mut w = self.0.control.lock().await;
        w.send(msg).await.map_err(|e| e.to_string())?;
        self.0.metrics.frames_sent_total.inc();
        self.0.metrics.message_sent(msg.msg_type() as u8);
        Ok(())
    }

    fn lock_pings(&self) -> parking_lot::MutexGuard<'_, HashMap<u64, oneshot::Sender<Pong>>> {
        // A poisoned map only means another thread panicked mid-insert; the
        // map itself is still consistent, so keep going.
        self.0.pending_pings.lock()
    }

    /// The node's metrics (for services counting what they receive).
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    /// Finishes our side of the control stream (before a close).
    pub(crate) async fn finish_control(&self) {
        self.0.control.lock().await.finish();
    }

    /// Wakes everyone still waiting for a pong (the connection ended).
    pub(crate) fn clear_pings(&self) {
        self.lock_pings().clear();
    }

    /// Hands a PONG to the ping waiting for it; false when none waits.
    pub(crate) fn complete_ping(&self, pong: Pong) -> bool {
        match self.lock_pings().remove(&pong.nonce) {
            Some(tx) => tx.send(pong).is_ok(),
            None => false,
        }
    }
}

/// Does this HELLO announce a lightweight client (capability `client`)?
pub(crate) fn is_client_hello(hello: &Hello) -> bool {
    hello
        .capabilities
        .iter()
        .any(|c| c == macula_wire::client::CLIENT_CAPABILITY)
}

pub(crate) fn truncate(s: &str) -> String {
    let mut end = s.len().min(macula_wire::MAX_REASON_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks the peer's HELLO against what TLS proved and what we require;
/// in a realm with an authority, returns the grant it proved (or the grant
/// its API key stands for). `remote`: where the peer's packets come from
/// (API-key failures are limited per address).
fn check_hello(
    local: &LocalInfo,
    proved: NodeId,
    hello: &Hello,
    remote: SocketAddr,
) -> Result<Option<Arc<PeerGrant>>, HandshakeError> {
    if hello.version != PROTOCOL_VERSION {
        return Err(HandshakeError::UnsupportedVersion {
            theirs: hello.version,
        });
    }
    if hello.realm != local.hello.realm {
        return Err(HandshakeError::RealmMismatch {
            ours: local.hello.realm.clone(),
            theirs: hello.realm.clone(),
        });
    }
    if hello.node_id != proved {
        return Err(HandshakeError::IdentityMismatch {
            claimed: hello.node_id,
            proved,
        });
    }
    let Some(authz) = &local.authz else {
        return Ok(None);
    };
    // A client with an API key instead of a grant (apikey.rs): admitted
    // with the grant the key is bound to.
    if let (None, Some(key)) = (&hello.grant, &hello.api_key) {
        let v = crate::apikey_gate::check(
            local.api_keys.as_deref(),
            authz,
            hello,
            key,
            remote,
            unix_ms(),
        )?;
        return Ok(Some(Arc::new(PeerGrant::new(v))));
    }
    match hello.grant.as_ref() {
        None => Err(HandshakeError::Unauthorized {
            kind: "missing",
            message: "HELLO carried no grant".into(),
        }),
        Some(g) => authz
            .admit(proved, Some(g.as_slice()), unix_ms())
            .map(Some)
            .map_err(|e| HandshakeError::Unauthorized {
                kind: e.kind(),
                message: e.to_string(),
            }),
    }
}

fn conn_lost(e: &quinn::ConnectionError) -> HandshakeError {
    if let quinn::ConnectionError::ApplicationClosed(close) = e {
        let code = u16::try_from(close.error_code.into_inner())
            .map(DisconnectReason::from)
            .unwrap_or(DisconnectReason::Other(u16::MAX));
        let message = String::from_utf8_lossy(&close.reason).into_owned();
        let code = match code {
            DisconnectReason::RealmMismatch => ErrorCode::RealmMismatch,
            DisconnectReason::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            DisconnectReason::IdentityMismatch => ErrorCode::IdentityMismatch,
            DisconnectReason::Unauthorized => ErrorCode::Unauthorized,
            DisconnectReason::RateLimited => ErrorCode::RateLimited,
            other => ErrorCode::Other(u16::from(other)),
        };
        return HandshakeError::Rejected { code, message };
    }
    HandshakeError::Connection(e.to_string())
}

fn read_err(e: ReadError) -> HandshakeError {
    match e {
        ReadError::Stream(quinn::ReadError::ConnectionLost(c)) => conn_lost(&c),
        other => HandshakeError::Protocol(other.to_string()),
    }
}

/// Reads the peer's HELLO (or a refusal) from the control stream.
async fn read_hello(reader: &mut FrameReader) -> Result<Hello, HandshakeError> {
    let frame = reader
        .read()
        .await
        .map_err(read_err)?
        .ok_or_else(|| HandshakeError::Protocol("control stream closed before HELLO".into()))?;
    match frame.decode() {
        Ok(Message::Hello(h)) => Ok(h),
        Ok(Message::Error(e)) => Err(HandshakeError::Rejected {
            code: e.code,
            message: e.message,
        }),
        Ok(Message::Disconnect(d)) => Err(HandshakeError::TurnedAway {
            reason: d.reason,
            message: d.message,
        }),
        // Anything else before HELLO (known or not) is answered with
        // HandshakeRequired, as the protocol defines, not as Malformed.
        Ok(other) => Err(HandshakeError::HandshakeRequired {
            msg_type: other.msg_type() as u8,
        }),
        Err(DecodeError::UnknownType(t)) => Err(HandshakeError::HandshakeRequired { msg_type: t }),
        Err(e) => Err(HandshakeError::Protocol(e.to_string())),
    }
}

/// Sends ERROR then closes: the frame explains, the close code survives even
/// if the frame is lost. Waits briefly for the peer to read the frame and
/// close first, so the explanation is not discarded with the connection.
async fn refuse(conn: &quinn::Connection, writer: &mut FrameWriter, err: &HandshakeError) {
    let Some((code, reason)) = err.reply() else {
        return;
    };
    // Told to the peer: from its point of view ("you", "this node").
    let message = truncate(&err.to_peer());
    let msg_type = match err {
        HandshakeError::HandshakeRequired { msg_type } => *msg_type,
        _ => macula_wire::MessageType::Hello as u8,
    };
    let frame = Message::Error(ErrorFrame {
        code,
        message: message.clone(),
        msg_type,
    });
    send_then_close(conn, writer, &frame, reason, &message).await;
}

/// Sends `frame` (the explanation), finishes the stream, waits briefly for
/// the peer to read it and close first, then closes with `reason`.
async fn send_then_close(
    conn: &quinn::Connection,
    writer: &mut FrameWriter,
    frame: &Message,
    reason: DisconnectReason,
    message: &str,
) {
    if writer.send(frame).await.is_ok() {
        writer.finish();
        let _ = tokio::time::timeout(ERROR_LINGER, conn.closed()).await;
    }
    conn.close(close_code(reason), message.as_bytes());
}

/// Decides, from its HELLO, whether an inbound peer may stay: `Err` with
/// the reason and message of the DISCONNECT it gets instead of our HELLO.
pub(crate) type Admission<'a> =
    &'a (dyn Fn(&Hello) -> Result<(), (DisconnectReason, String)> + Sync);

/// Answers an inbound HELLO with DISCONNECT and closes, lingering (bounded)
/// so the dialer reads the reason before the close discards it.
async fn turn_away(
    conn: &quinn::Connection,
    writer: &mut FrameWriter,
    reason: DisconnectReason,
    message: &str,
) {
    let message = truncate(message);
    let frame = Message::Disconnect(Disconnect {
        reason,
        message: message.clone(),
    });
    send_then_close(conn, writer, &frame, reason, &message).await;
}

/// Runs the HELLO exchange on a connection whose TLS handshake proved
/// `proved`. The dialer speaks first. An inbound peer that `admit` turns
/// away is answered with DISCONNECT instead of HELLO (so its dialer learns
/// why from the handshake itself) and `Refused` is returned.
pub(crate) async fn handshake(
    conn: quinn::Connection,
    proved: NodeId,
    direction: Direction,
    local: &LocalInfo,
    metrics: Arc<Metrics>,
    admit: Option<Admission<'_>>,
) -> Result<(Peer, FrameReader), HandshakeError> {
    // Tell the peer where we see it (not on a relayed connection, whose
    // remote address is a placeholder): how it learns its reflexive
    // address (nat.rs).
    let mut ours = local.hello.clone();
    if let Some(v) = local.keys.as_ref().map(|k| k.version()).filter(|v| *v > 0) {
        ours.capabilities
            .push(format!("{}{v}", crate::e2e::KEYS_CAPABILITY));
    }
    let remote = conn.remote_address();
    ours.observed_addr = (!crate::nat::is_tunnel_addr(&remote)).then(|| remote.to_string());
    let ours = Message::Hello(ours);
    let (mut writer, reader, hello, grant) = match direction {
        Direction::Outbound => {
            let (send, recv) = conn.open_bi().await.map_err(|e| conn_lost(&e))?;
            let mut writer = FrameWriter::new(send, DEFAULT_MAX_FRAME_SIZE);
            let mut reader = FrameReader::new(recv, local.max_frame_size);
            writer
                .send(&ours)
                .await
                .map_err(|e| HandshakeError::Connection(e.to_string()))?;
            let hello = read_hello(&mut reader).await?;
            let grant = match check_hello(local, proved, &hello, conn.remote_address()) {
                Ok(g) => g,
                Err(e) => {
                    refuse(&conn, &mut writer, &e).await;
                    return Err(e);
                }
            };
            (writer, reader, hello, grant)
        }
        Direction::Inbound => {
            let (send, recv) = conn.accept_bi().await.map_err(|e| conn_lost(&e))?;
            let mut writer = FrameWriter::new(send, DEFAULT_MAX_FRAME_SIZE);
            let mut reader = FrameReader::new(recv, local.max_frame_size);
            let hello = match read_hello(&mut reader).await {
                Ok(h) => h,
                Err(e) => {
                    if let Some(kind) = match &e {
                        HandshakeError::Protocol(_) | HandshakeError::HandshakeRequired { .. } => {
                            Some(ProtocolErrorKind::Unexpected)
                        }
                        _ => None,
                    } {
                        metrics.protocol_error(kind);
                    }
                    refuse(&conn, &mut writer, &e).await;
                    return Err(e);
                }
            };
            let grant = match check_hello(local, proved, &hello, conn.remote_address()) {
                Ok(g) => g,
                Err(e) => {
                    refuse(&conn, &mut writer, &e).await;
                    return Err(e);
                }
            };
            if let Some(Err((reason, message))) = admit.map(|a| a(&hello)) {
                turn_away(&conn, &mut writer, reason, &message).await;
                return Err(HandshakeError::Refused { reason, message });
            }
            writer
                .send(&ours)
                .await
                .map_err(|e| HandshakeError::Connection(e.to_string()))?;
            (writer, reader, hello, grant)
        }
    };
    writer.set_peer_max(hello.max_frame_size);
    let epoch = Instant::now();
    let peer = Peer(Arc::new(PeerShared {
        node_id: proved,
        conn,
        hello,
        direction,
        control: tokio::sync::Mutex::new(writer),
        pending_pings: Mutex::new(HashMap::new()),
        next_nonce: AtomicU64::new(1),
        last_activity_ms: AtomicU64::new(0),
        epoch,
        kept: AtomicBool::new(false),
        relayed_via: std::sync::OnceLock::new(),
        unlisted: AtomicBool::new(false),
        punched: AtomicBool::new(false),
        grant,
        metrics,
    }));
    Ok((peer, reader))
}

/// Human-readable close reason.
pub(crate) fn describe_close(err: &quinn::ConnectionError) -> String {
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = u16::try_from(c.error_code.into_inner())
                .map(DisconnectReason::from)
                .unwrap_or(DisconnectReason::Other(u16::MAX));
            format!("{reason:?}: {}", String::from_utf8_lossy(&c.reason))
        }
        other => other.to_string(),
    }
}
