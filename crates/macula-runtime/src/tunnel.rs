//! The endpoint side of relaying: a second quinn endpoint whose "socket" is
//! the set of relayed sessions, reservations at relays, and the cache of
//! other nodes' relay records.
//!
//! Each relayed session is a bidirectional stream to a relay, spliced by the
//! relay to a stream of the other endpoint. The tunnel gives the session a
//! placeholder peer address in `2001:db8::/32` (IPv6 documentation space;
//! never sent to a real socket): packets quinn writes to that address go onto
//! the session's stream as `u16` big-endian length + packet; packets read
//! from the stream come out of `poll_recv` with that source address. The
//! inner connection therefore is ordinary QUIC with mutual TLS between the
//! two endpoints (same certificates, same verifiers, same SNI rule as a
//! direct dial), then HELLO and the pool as usual: pub/sub, RPC and the DHT
//! use it without knowing it is relayed.

use std::collections::{HashMap, HashSet};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use macula_wire::relay::{
    RelayCode, RelayConnect, RelayEntry, RelayMessage, RelayReserve, RelayStatus,
};
use macula_wire::ttl_cache::TtlCache;
use macula_wire::{Message, NodeId};
use quinn::udp::{RecvMeta, Transmit};
use tokio::sync::mpsc;

use crate::framed::{FrameReader, FrameWriter};
use crate::peer::Peer;
use crate::service::{Serves, Service, ServiceFuture};

/// Packets queued toward one session's stream; past this quinn's packets are
/// dropped (as a full UDP socket buffer would) and QUIC recovers.
const SESSION_OUT_QUEUE: usize = 1024;
/// Packets queued from all sessions toward the tunnel endpoint.
const INBOUND_QUEUE: usize = 4096;
/// Bytes written to a session stream at once.
const WRITE_BATCH: usize = 64 * 1024;
/// How long a relay's answer to RELAY_CONNECT or RELAY_RESERVE may take.
pub const RELAY_ANSWER_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a relay record lookup result is reused.
pub const ROUTE_CACHE_TTL: Duration = Duration::from_secs(5);
/// Relay-record lookups cached at once (beyond: the expired, then the
/// oldest are dropped).
const ROUTE_CACHE_MAX: usize = 4096;

/// Why a relayed connection or reservation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay said no; `code` names the limit or condition.
    #[error("relay {relay} refused ({}): {message}", code.name())]
    Refused {
        relay: NodeId,
        code: RelayCode,
        message: String,
    },
    #[error("relay {relay} did not answer within {after:?}")]
    Timeout { relay: NodeId, after: Duration },
    #[error("relay {relay}: {detail}")]
    Stream { relay: NodeId, detail: String },
}

/// True for the placeholder addresses of relayed sessions: they are never
/// dialed directly (defined in `nat.rs`, a leaf, so the handshake can tell
/// a relayed connection without importing this module).
pub use crate::nat::is_tunnel_addr;

// ---------------------------------------------------------------------------
// The abstract socket
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct TunnelSocket {
    local: SocketAddr,
    out: Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>,
    in_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    in_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let Some(tx) = self.out.lock().get(&t.destination).cloned() else {
            // No such session (any more): lost, like a datagram to nowhere.
            return Ok(());
        };
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for packet in t.contents.chunks(seg) {
            if tx.try_send(Bytes::copy_from_slice(packet)).is_err() {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.in_rx.lock();
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let item = if n == 0 {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(item)) => item,
                    // The socket holds a sender itself, so the channel never
                    // closes; treat it as idle all the same.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            } else {
                match rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => break,
                }
            };
            let (from, packet) = item;
            let buf = &mut bufs[n];
            if packet.len() > buf.len() {
                self.dropped.fetch_add(1, Relaxed);
                continue;
            }
            buf[..packet.len()].copy_from_slice(&packet);
            meta[n] = RecvMeta {
                addr: from,
                len: packet.len(),
                stride: packet.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n == 0 {
            // Only oversized packets were dropped; ask to be polled again.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

// ---------------------------------------------------------------------------
// The tunnel
// ---------------------------------------------------------------------------

/// What the tunnel knows about one session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The relay splicing it.
    pub relay: NodeId,
    /// The node at the other end (as named in RELAY_CONNECT or INCOMING;
    /// TLS must prove it).
    pub remote: NodeId,
}

struct Reservation {
    peer: Peer,
    renew_at: Instant,
}

struct Inner {
    endpoint: quinn::Endpoint,
    socket: Arc<TunnelSocket>,
    next: AtomicU64,
    sessions: Mutex<HashMap<SocketAddr, SessionInfo>>,
    /// Inner connections by placeholder address, closed when their session ends.
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    reservations: Mutex<HashMap<NodeId, Reservation>>,
    routes: Mutex<TtlCache<NodeId, Vec<RelayEntry>, Instant>>,
    max_frame_size: u32,
    counters: Arc<crate::relay::RelayCounters>,
}

/// This node's relayed-session endpoint. Cheap to clone.
#[derive(Clone)]
pub struct Tunnel(Arc<Inner>);

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("sessions", &self.0.sessions.lock().len())
            .finish()
    }
}

impl Tunnel {
    /// A tunnel endpoint with the node's server and client configurations.
    pub(crate) fn new(
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
        max_frame_size: u32,
        counters: Arc<crate::relay::RelayCounters>,
    ) -> io::Result<Tunnel> {
        let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
        let socket = Arc::new(TunnelSocket {
            local: SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                1,
            ),
            out: Mutex::new(HashMap::new()),
            in_tx,
            in_rx: Mutex::new(in_rx),
            dropped: AtomicU64::new(0),
        });
        let runtime = quinn::default_runtime()
            .ok_or_else(|| io::Error::other("no async runtime for the tunnel endpoint"))?;
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket.clone(),
            runtime,
        )?;
        endpoint.set_default_client_config(client);
        Ok(Tunnel(Arc::new(Inner {
            endpoint,
            socket,
            next: AtomicU64::new(1),
            sessions: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            reservations: Mutex::new(HashMap::new()),
            routes: Mutex::new(TtlCache::new(ROUTE_CACHE_MAX)),
            max_frame_size,
            counters,
        })))
    }

    pub(crate) fn endpoint(&self) -> &quinn::Endpoint {
        &self.0.endpoint
    }

    /// The session behind a placeholder address.
    pub fn session(&self, addr: &SocketAddr) -> Option<SessionInfo> {
        self.0.sessions.lock().get(addr).cloned()
    }

    /// Packets dropped at the tunnel (full session queue, oversized).
    pub fn dropped_packets(&self) -> u64 {
        self.0.socket.dropped.load(Relaxed)
    }

    fn next_addr(&self) -> SocketAddr {
        let n = self.0.next.fetch_add(1, Relaxed);
        let seg = |shift: u32| ((n >> shift) & 0xffff) as u16;
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0x4d43,
                0,
                seg(48),
                seg(32),
                seg(16),
                seg(0),
            )),
            1,
        )
    }

    /// Turns a session's streams into a placeholder address: writer and
    /// reader tasks move packets between the stream and the endpoint.
    fn attach(
        &self,
        info: SessionInfo,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        rest: Bytes,
    ) -> SocketAddr {
        let addr = self.next_addr();
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(SESSION_OUT_QUEUE);
        self.0.socket.out.lock().insert(addr, out_tx);
        self.0.sessions.lock().insert(addr, info.clone());
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(WRITE_BATCH);
            while let Some(first) = out_rx.recv().await {
                buf.clear();
                put_packet(&mut buf, &first);
                while buf.len() < WRITE_BATCH {
                    match out_rx.try_recv() {
                        Ok(p) => put_packet(&mut buf, &p),
                        Err(_) => break,
                    }
                }
                if send.write_all(&buf).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
        });
        let in_tx = self.0.socket.in_tx.clone();
        let this = self.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::from(&rest[..]);
            let why = loop {
                while buf.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                    if buf.len() < 2 + len {
                        break;
                    }
                    buf.advance(2);
                    let packet = buf.split_to(len).freeze();
                    if in_tx.send((addr, packet)).await.is_err() {
                        break;
                    }
                }
                match recv.read_chunk(WRITE_BATCH, true).await {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                    Ok(None) => break "the other end closed the session".to_string(),
                    Err(quinn::ReadError::Reset(code)) => {
                        let code = u16::try_from(code.into_inner())
                            .map(RelayCode::from)
                            .unwrap_or(RelayCode::Other(u16::MAX));
                        break format!("the relay closed the session: {}", code.name());
                    }
                    Err(e) => break e.to_string(),
                }
            };
            tracing::debug!(relay = %info.relay, remote = %info.remote, reason = %why, "relayed session ended");
            this.detach(&addr);
            if let Some(conn) = this.0.conns.lock().remove(&addr) {
                // Nothing can reach the other end any more: close at once
                // instead of waiting for the QUIC idle timeout.
                conn.close(quinn::VarInt::from_u32(0), why.as_bytes());
            }
        });
        addr
    }

    /// Forgets a session: its writer finishes the stream once its queue is
    /// drained.
    fn detach(&self, addr: &SocketAddr) {
        self.0.socket.out.lock().remove(addr);
        self.0.sessions.lock().remove(addr);
    }

    /// Ends the session of an inner connection once that connection closed
    /// (after a moment, so its CONNECTION_CLOSE goes out first).
    pub(crate) fn bind(&self, conn: quinn::Connection) {
        let addr = conn.remote_address();
        self.0.conns.lock().insert(addr, conn.clone());
        let this = self.clone();
        tokio::spawn(async move {
            conn.closed().await;
            this.0.conns.lock().remove(&addr);
            tokio::time::sleep(Duration::from_millis(200)).await;
            this.detach(&addr);
        });
    }

    /// Asks `relay` for a session with `target`; on OK returns the
    /// placeholder address to dial.
    pub(crate) async fn open(
        &self,
        relay: &Peer,
        target: NodeId,
    ) -> Result<SocketAddr, RelayError> {
        let rid = relay.node_id();
        let stream_err = |detail: String| RelayError::Stream { relay: rid, detail };
        // Tracing: a session opened for a traced publish or call (dialing
        // a node only reachable through `relay`) is a span of that trace,
        // and the relay's hop span is its child.
        let span = crate::trace::child(|| {
            tracing::info_span!(target: crate::trace::TARGET, "macula.relay.open",
                otel.kind = "client",
                macula.relay = %rid,
                macula.target = %target)
        });
        let traceparent = span
            .as_ref()
            .and_then(crate::trace::traceparent_of)
            .map(|t| t.to_string());
        let exchange = async {
            let (send, recv) = relay
                .connection()
                .open_bi()
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            let mut w = FrameWriter::new(send, relay.hello().max_frame_size);
            let mut r = FrameReader::new(recv, self.0.max_frame_size);
            w.send(&Message::Relay(RelayMessage::Connect(RelayConnect {
                target,
                traceparent,
            })))
            .await
            .map_err(|e| stream_err(e.to_string()))?;
            let status = read_status(&mut r).await.map_err(stream_err)?;
            if status.code != RelayCode::Ok {
                return Err(RelayError::Refused {
                    relay: rid,
                    code: status.code,
                    message: status.message,
                });
            }
            Ok((r, w))
        };
        let exchange =
            tracing::Instrument::instrument(exchange, span.unwrap_or_else(tracing::Span::none));
        let (r, w) = tokio::time::timeout(RELAY_ANSWER_TIMEOUT, exchange)
            .await
            .map_err(|_| RelayError::Timeout {
                relay: rid,
                after: RELAY_ANSWER_TIMEOUT,
            })??;
        let (recv, rest) = r.into_parts();
        let info = SessionInfo {
            relay: rid,
            remote: target,
        };
        Ok(self.attach(info, w.into_inner(), recv, rest))
    }

    /// RELAY_INCOMING from `relay` (the first frame of a stream it opened):
    /// accepted only from a relay this node holds a reservation at.
    pub(crate) async fn serve_incoming(
        &self,
        relay: Peer,
        source: NodeId,
        reader: FrameReader,
        mut writer: FrameWriter,
    ) {
        let reserved = self.0.reservations.lock().contains_key(&relay.node_id());
        let status = if reserved {
            RelayStatus {
                code: RelayCode::Ok,
                message: String::new(),
            }
        } else {
            RelayStatus {
                code: RelayCode::NoReservation,
                message: "this node holds no reservation at you".into(),
            }
        };
        let ok = status.code == RelayCode::Ok;
        if writer
            .send(&Message::Relay(RelayMessage::Status(status)))
            .await
            .is_err()
            || !ok
        {
            writer.finish();
            return;
        }
        let (recv, rest) = reader.into_parts();
        let info = SessionInfo {
            relay: relay.node_id(),
            remote: source,
        };
        self.attach(info, writer.into_inner(), recv, rest);
        // The inner handshake arrives on the tunnel endpoint's accept loop.
    }

    /// Reserves at `relay`; returns the lifetime granted.
    pub async fn reserve(&self, relay: &Peer) -> Result<Duration, RelayError> {
        let rid = relay.node_id();
        let stream_err = |detail: String| RelayError::Stream { relay: rid, detail };
        let exchange = async {
            let (send, recv) = relay
                .connection()
                .open_bi()
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            let mut w = FrameWriter::new(send, relay.hello().max_frame_size);
            let mut r = FrameReader::new(recv, self.0.max_frame_size);
            w.send(&Message::Relay(RelayMessage::Reserve(RelayReserve {
                ttl_ms: 0,
            })))
            .await
            .map_err(|e| stream_err(e.to_string()))?;
            w.finish();
            let frame = r
                .read()
                .await
                .map_err(|e| stream_err(e.to_string()))?
                .ok_or_else(|| stream_err("stream closed before RELAY_RESERVED".into()))?;
            match frame.decode() {
                Ok(Message::Relay(RelayMessage::Reserved(res))) => Ok(res),
                Ok(Message::Error(e)) => Err(stream_err(format!("{:?}: {}", e.code, e.message))),
                Ok(other) => Err(stream_err(format!(
                    "unexpected {}",
                    other.msg_type().name()
                ))),
                Err(e) => Err(stream_err(e.to_string())),
            }
        };
        let res = tokio::time::timeout(RELAY_ANSWER_TIMEOUT, exchange)
            .await
            .map_err(|_| RelayError::Timeout {
                relay: rid,
                after: RELAY_ANSWER_TIMEOUT,
            })??;
        if res.code != RelayCode::Ok {
            return Err(RelayError::Refused {
                relay: rid,
                code: res.code,
                message: res.message,
            });
        }
        let ttl = Duration::from_millis(res.ttl_ms.max(1000));
        self.0.reservations.lock().insert(
            rid,
            Reservation {
                peer: relay.clone(),
                renew_at: Instant::now() + ttl.mul_f64(0.75),
            },
        );
        self.sync_held();
        Ok(ttl)
    }

    fn sync_held(&self) {
        let n = self.0.reservations.lock().len() as u64;
        self.0.counters.reservations_held.set(n);
    }

    /// Drops reservations whose connection closed or that are due for
    /// renewal; returns the relays still held (with their connections).
    pub(crate) fn held(&self) -> Vec<Peer> {
        let now = Instant::now();
        let kept: Vec<Peer> = {
            let mut r = self.0.reservations.lock();
            r.retain(|_, v| !v.peer.is_closed() && v.renew_at > now);
            r.values().map(|v| v.peer.clone()).collect()
        };
        self.sync_held();
        kept
    }

    /// Forgets every reservation (this node became public).
    pub(crate) fn release_all(&self) {
        self.0.reservations.lock().clear();
        self.sync_held();
    }

    /// A cached relay-record answer for `id`: `Some(relays)` if a record
    /// was found within [`ROUTE_CACHE_TTL`] (never an empty answer).
    pub(crate) fn cached_routes(&self, id: &NodeId) -> Option<Vec<RelayEntry>> {
        self.0.routes.lock().get(id, Instant::now()).cloned()
    }

    pub(crate) fn cache_routes(&self, id: NodeId, relays: Vec<RelayEntry>) {
        // No record is not cached: a node that just joined behind NAT
        // publishes its record a moment later, and a caller must find it
        // then (issue 22, no cold start).
        if relays.is_empty() {
            return;
        }
        let now = Instant::now();
        let expires = now + ROUTE_CACHE_TTL;
        self.0.routes.lock().insert(id, relays, expires, now);
    }

    /// Relays this node reserved at, by ID.
    pub fn reserved_relays(&self) -> HashSet<NodeId> {
        self.0.reservations.lock().keys().copied().collect()
    }

    pub(crate) fn close(&self) {
        self.0
            .endpoint
            .close(quinn::VarInt::from_u32(0), b"node shutting down");
        let addrs: Vec<SocketAddr> = self.0.sessions.lock().keys().copied().collect();
        for a in addrs {
            self.detach(&a);
        }
    }
}

fn put_packet(buf: &mut BytesMut, p: &[u8]) {
    // Packets come from quinn and never exceed the UDP payload size, far
    // below 64 KiB; a larger one would be a bug, so drop it rather than
    // corrupt the framing.
    if let Ok(len) = u16::try_from(p.len()) {
        buf.put_u16(len);
        buf.put_slice(p);
    }
}

async fn read_status(r: &mut FrameReader) -> Result<RelayStatus, String> {
    let frame = r
        .read()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "stream closed before RELAY_STATUS".to_string())?;
    match frame.decode() {
        Ok(Message::Relay(RelayMessage::Status(s))) => Ok(s),
        Ok(Message::Error(e)) => Err(format!("{:?}: {}", e.code, e.message)),
        Ok(other) => Err(format!("unexpected {}", other.msg_type().name())),
        Err(e) => Err(e.to_string()),
    }
}
/// The relay tunnel's target side as a service: a relay's RELAY_INCOMING
/// stream becomes a relayed session of this node.
impl Service for Tunnel {
    fn name(&self) -> &'static str {
        "tunnel"
    }

    fn serves(&self) -> Serves {
        Serves {
            streams: &[macula_wire::MessageType::RelayIncoming],
            ..Serves::default()
        }
    }

    fn on_stream(
        &self,
        peer: Peer,
        first: Message,
        reader: FrameReader,
        writer: FrameWriter,
    ) -> ServiceFuture {
        let tunnel = self.clone();
        Box::pin(async move {
            if let Message::Relay(RelayMessage::Incoming(i)) = first {
                tunnel.serve_incoming(peer, i.source, reader, writer).await;
            }
        })
    }
}
