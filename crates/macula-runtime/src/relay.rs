//! The relay: a public node forwards a session between two peers that cannot
//! dial each other, over the connections both already have to it.
//!
//! A private node reserves (RELAY_RESERVE on a stream it opens); an
//! initiator asks for a session with RELAY_CONNECT on a new stream; the relay
//! checks the reservation and its limits, opens a stream to the target with
//! RELAY_INCOMING, and after both OKs splices the two streams as opaque byte
//! pipes. The endpoints run end-to-end QUIC + TLS inside (see `tunnel.rs`):
//! the relay sees sizes and timing, never content, and cannot forge.
//!
//! Pure parts (time as an argument, unit- and property-tested):
//! [`TokenBucket`] (`macula_wire::bucket`: bytes per second per session) and [`RelayTable`]
//! (reservations and the session count). The async part serves the streams
//! and splices them under the limits of [`RelayLimits`], counting every limit
//! hit in [`RelayCounters`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use macula_wire::relay::{
    RelayCode, RelayConnect, RelayIncoming, RelayMessage, RelayReserve, RelayReserved, RelayStatus,
};
use macula_wire::{Message, NodeId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::config::RelayLimits;
use crate::framed::{FrameReader, FrameWriter};
use crate::metrics::{register, CountGauge, LabelledCounters};
use crate::peer::Peer;
use crate::service::{Serves, Service, ServiceFuture};

/// How long the relay waits for the target to answer RELAY_INCOMING.
pub const TARGET_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest chunk forwarded at once (bounds what one read can overdraw).
const SPLICE_CHUNK: usize = 16 * 1024;

// ---------------------------------------------------------------------------
// Pure: token bucket
// ---------------------------------------------------------------------------

pub use macula_wire::bucket::TokenBucket;

// ---------------------------------------------------------------------------
// Pure: reservations and sessions
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    conn_id: usize,
    expires_us: u64,
}

/// Reservations by node and the number of open sessions, under the limits.
#[derive(Debug)]
pub struct RelayTable {
    max_sessions: usize,
    max_reservations: usize,
    ttl_us: u64,
    reservations: HashMap<NodeId, Reservation>,
    sessions: usize,
}

impl RelayTable {
    pub fn new(limits: &RelayLimits) -> RelayTable {
        RelayTable {
            max_sessions: limits.max_sessions,
            max_reservations: limits.max_reservations,
            ttl_us: u64::try_from(limits.reservation_ttl.as_micros()).unwrap_or(u64::MAX),
            reservations: HashMap::new(),
            sessions: 0,
        }
    }

    /// Reserves (or renews) for `node` on connection `conn_id`; returns the
    /// lifetime granted in microseconds. `ttl_us` 0 asks for the default.
    pub fn reserve(
        &mut self,
        node: NodeId,
        conn_id: usize,
        ttl_us: u64,
        now_us: u64,
    ) -> Result<u64, RelayCode> {
        self.reservations.retain(|_, r| r.expires_us > now_us);
        if !self.reservations.contains_key(&node)
            && self.reservations.len() >= self.max_reservations
        {
            return Err(RelayCode::ReservationLimit);
        }
        let granted = if ttl_us == 0 {
            self.ttl_us
        } else {
            ttl_us.min(self.ttl_us)
        };
        self.reservations.insert(
            node,
            Reservation {
                conn_id,
                expires_us: now_us.saturating_add(granted),
            },
        );
        Ok(granted)
    }

    /// Drops `node`'s reservation if it was made on `conn_id`.
    pub fn release(&mut self, node: &NodeId, conn_id: usize) -> bool {
        if self.reservations.get(node).map(|r| r.conn_id) == Some(conn_id) {
            self.reservations.remove(node);
            return true;
        }
        false
    }

    /// The connection `target` reserved on, if its reservation is current.
    pub fn reserved_conn(&self, target: &NodeId, now_us: u64) -> Result<usize, RelayCode> {
        match self.reservations.get(target) {
            Some(r) if r.expires_us > now_us => Ok(r.conn_id),
            _ => Err(RelayCode::NoReservation),
        }
    }

    /// Takes a session slot.
    pub fn open_session(&mut self) -> Result<(), RelayCode> {
        if self.sessions >= self.max_sessions {
            return Err(RelayCode::SessionLimit);
        }
        self.sessions += 1;
        Ok(())
    }

    pub fn close_session(&mut self) {
        self.sessions = self.sessions.saturating_sub(1);
    }

    pub fn sessions(&self) -> usize {
        self.sessions
    }

    pub fn reservations(&self) -> usize {
        self.reservations.len()
    }
}

// ---------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------

/// Why a relayed session ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// An endpoint finished or reset its stream (or its connection closed).
    Ended,
    /// No bytes either way for the idle timeout.
    Idle,
}

impl CloseReason {
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Ended => "ended",
            CloseReason::Idle => "idle",
        }
    }
}

/// Refusal reasons counted, in label order.
const REFUSALS: [RelayCode; 7] = [
    RelayCode::NoReservation,
    RelayCode::TargetNotConnected,
    RelayCode::SessionLimit,
    RelayCode::ReservationLimit,
    RelayCode::NotRelaying,
    RelayCode::TargetRefused,
    RelayCode::Invalid,
];

/// The relay's counters (server side) and the relayed connections this
/// node made or accepted (client side), registered in the node's metrics
/// registry.
#[derive(Debug)]
pub struct RelayCounters {
    pub sessions: CountGauge,
    pub sessions_total: Counter,
    pub reservations: CountGauge,
    pub reservations_total: Counter,
    pub bytes_total: Counter,
    pub throttled_total: Counter,
    /// By reason, in `REFUSALS` order.
    refused: LabelledCounters<{ REFUSALS.len() }>,
    /// By reason, indexed by `CloseReason as usize`.
    closed: LabelledCounters<2>,
    /// Client side: relayed connections established through some relay.
    pub relayed_connections_total: Counter,
    /// Client side: reservations this node holds at relays.
    pub reservations_held: CountGauge,
}

impl Default for RelayCounters {
    fn default() -> Self {
        RelayCounters {
            sessions: CountGauge::default(),
            sessions_total: Counter::default(),
            reservations: CountGauge::default(),
            reservations_total: Counter::default(),
            bytes_total: Counter::default(),
            throttled_total: Counter::default(),
            refused: LabelledCounters::new("reason", REFUSALS.map(RelayCode::name)),
            closed: LabelledCounters::new(
                "reason",
                [CloseReason::Ended, CloseReason::Idle].map(CloseReason::name),
            ),
            relayed_connections_total: Counter::default(),
            reservations_held: CountGauge::default(),
        }
    }
}

impl RelayCounters {
    pub fn refused(&self, code: RelayCode) -> u64 {
        REFUSALS
            .iter()
            .position(|c| *c == code)
            .map(|i| self.refused.at(i).get())
            .unwrap_or(0)
    }

    fn count_refusal(&self, code: RelayCode) {
        if let Some(i) = REFUSALS.iter().position(|c| *c == code) {
            self.refused.at(i).inc();
        }
    }

    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed.at(reason as usize).get()
    }

    /// Registers every metric in the node's registry.
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_relay_sessions",
            "Relayed sessions open through this node.",
            self.sessions.clone(),
        );
        register(
            r,
            // Not `macula_relay_sessions`: that family is the gauge above
            // (two families of one name are invalid exposition).
            "macula_relay_sessions_opened",
            "Relayed sessions this node opened for others.",
            self.sessions_total.clone(),
        );
        register(
            r,
            "macula_relay_reservations",
            "Reservations peers hold at this node.",
            self.reservations.clone(),
        );
        register(
            r,
            "macula_relay_reservations_granted",
            "Reservations granted (including renewals).",
            self.reservations_total.clone(),
        );
        register(
            r,
            "macula_relay_bytes",
            "Bytes this node forwarded in relayed sessions (both directions).",
            self.bytes_total.clone(),
        );
        register(
            r,
            "macula_relay_throttled",
            "Times a relayed session went over its byte rate and was paused.",
            self.throttled_total.clone(),
        );
        register(
            r,
            "macula_relay_connections",
            "Connections this node made or accepted through a relay.",
            self.relayed_connections_total.clone(),
        );
        register(
            r,
            "macula_relay_reservations_held",
            "Relays this node holds a reservation at (it is private).",
            self.reservations_held.clone(),
        );
        self.refused.register(
            r,
            "macula_relay_refused",
            "Relay requests refused, by reason (the limit or condition named in the refusal).",
        );
        self.closed.register(
            r,
            "macula_relay_closed",
            "Relayed sessions closed, by reason.",
        );
    }
}

// ---------------------------------------------------------------------------
// The relay service
// ---------------------------------------------------------------------------

type PeerLookup = Box<dyn Fn(&NodeId) -> Option<Peer> + Send + Sync>;
type IsPrivate = Box<dyn Fn() -> bool + Send + Sync>;

struct Inner {
    node_id: NodeId,
    limits: RelayLimits,
    max_frame_size: u32,
    table: Mutex<RelayTable>,
    counters: Arc<RelayCounters>,
    peer: PeerLookup,
    is_private: IsPrivate,
    dht: Option<crate::dht::DhtHandle>,
    epoch: Instant,
    /// Where the bytes it splices are copied (`tap_bytes`); `tapped` keeps
    /// the lock off the path while there is none.
    tap: Mutex<Option<tokio::sync::mpsc::Sender<Bytes>>>,
    tapped: std::sync::atomic::AtomicBool,
}

/// This node's relay service. Cheap to clone.
#[derive(Clone)]
pub struct Relay(Arc<Inner>);

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("sessions", &self.lock().sessions())
            .finish()
    }
}

/// The quinn stream error code for a relay close reason.
pub(crate) fn stream_code(code: RelayCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(u32::from(u16::from(code)))
}

impl Relay {
    /// `peer` finds the pooled connection to a node; `is_private` says
    /// whether this node is itself behind NAT (then it relays nothing).
    pub(crate) fn new(
        node_id: NodeId,
        limits: RelayLimits,
        max_frame_size: u32,
        counters: Arc<RelayCounters>,
        peer: PeerLookup,
        is_private: IsPrivate,
        dht: Option<crate::dht::DhtHandle>,
    ) -> Relay {
        Relay(Arc::new(Inner {
            node_id,
            table: Mutex::new(RelayTable::new(&limits)),
            limits,
            max_frame_size,
            counters,
            peer,
            is_private,
            dht,
            epoch: Instant::now(),
            tap: Mutex::new(None),
            tapped: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// A copy of every chunk this relay splices from now on, both
    /// directions, as it forwards them. A diagnostic (the tests assert
    /// what a relay can see): at most `capacity` chunks wait; while the
    /// receiver is full, chunks are not copied. Replaces an earlier tap.
    pub fn tap_bytes(&self, capacity: usize) -> tokio::sync::mpsc::Receiver<Bytes> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        *self.0.tap.lock() = Some(tx);
        self.0.tapped.store(true, Relaxed);
        rx
    }

    fn lock(&self) -> MutexGuard<'_, RelayTable> {
        self.0.table.lock()
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.0.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn counters(&self) -> &Arc<RelayCounters> {
        &self.0.counters
    }

    fn sync_gauges(&self, t: &RelayTable) {
        let c = &self.0.counters;
        c.sessions.set(t.sessions() as u64);
        c.reservations.set(t.reservations() as u64);
    }

    fn serving(&self) -> Result<(), (RelayCode, String)> {
        if !self.0.limits.enabled {
            return Err((RelayCode::NotRelaying, "this node does not relay".into()));
        }
        if (self.0.is_private)() {
            return Err((
                RelayCode::NotRelaying,
                "this node is not publicly reachable".into(),
            ));
        }
        Ok(())
    }

    /// RELAY_RESERVE from `peer`, first frame of a stream it opened.
    pub(crate) async fn serve_reserve(
        &self,
        peer: Peer,
        req: RelayReserve,
        mut writer: FrameWriter,
    ) {
        let granted = self.serving().and_then(|()| {
            let now = self.now_us();
            let ttl = req.ttl_ms.saturating_mul(1000);
            let mut t = self.lock();
            let r = t.reserve(peer.node_id(), peer.connection_id(), ttl, now);
            self.sync_gauges(&t);
            r.map_err(|code| (code, refusal_text(code, &self.0.limits)))
        });
        let answer = match granted {
            Ok(ttl_us) => {
                self.0.counters.reservations_total.inc();
                tracing::debug!(peer = %peer.node_id(), ttl_s = ttl_us / 1_000_000, "relay reservation granted");
                // A node that needs a relay cannot be dialed: stop handing
                // it out as a DHT contact (others would wait on it).
                if let Some(dht) = &self.0.dht {
                    dht.unlist(&peer);
                }
                // The reservation ends with the connection that made it.
                let this = self.clone();
                let p = peer.clone();
                tokio::spawn(async move {
                    p.connection().closed().await;
                    let mut t = this.lock();
                    t.release(&p.node_id(), p.connection_id());
                    this.sync_gauges(&t);
                });
                RelayReserved {
                    code: RelayCode::Ok,
                    ttl_ms: ttl_us / 1000,
                    message: String::new(),
                }
            }
            Err((code, message)) => {
                self.0.counters.count_refusal(code);
                tracing::info!(peer = %peer.node_id(), reason = code.name(), "relay reservation refused");
                RelayReserved {
                    code,
                    ttl_ms: 0,
                    message,
                }
            }
        };
        let _ = writer
            .send(&Message::Relay(RelayMessage::Reserved(answer)))
            .await;
        writer.finish();
    }

    /// Checks a RELAY_CONNECT and returns the target's connection.
    fn admit(&self, source: &Peer, target: NodeId) -> Result<Peer, (RelayCode, String)> {
        self.serving()?;
        if target == source.node_id() || target == self.0.node_id {
            return Err((
                RelayCode::Invalid,
                format!("cannot relay from {} to {target}", source.node_id()),
            ));
        }
        let conn_id = self
            .lock()
            .reserved_conn(&target, self.now_us())
            .map_err(|c| (c, format!("{target} holds no reservation at this relay")))?;
        let peer = (self.0.peer)(&target)
            .filter(|p| !p.is_closed() && p.connection_id() == conn_id)
            .ok_or_else(|| {
                (
                    RelayCode::TargetNotConnected,
                    format!("{target} is not connected to this relay"),
                )
            })?;
        let mut t = self.lock();
        let r = t.open_session();
        self.sync_gauges(&t);
        r.map_err(|c| (c, refusal_text(c, &self.0.limits)))?;
        Ok(peer)
    }

    fn end_session(&self) {
        let mut t = self.lock();
        t.close_session();
        self.sync_gauges(&t);
    }

    /// RELAY_CONNECT from `source`, first frame of a stream it opened: admit,
    /// open the target's stream, exchange statuses, then splice.
    pub(crate) async fn serve_connect(
        &self,
        source: Peer,
        req: RelayConnect,
        reader: FrameReader,
        mut writer: FrameWriter,
    ) {
        let target = req.target;
        // Tracing: the hop (the target's answer, not the splice) as a child
        // of the initiator's span, if it sent one.
        let span = crate::trace::remote(
            req.traceparent
                .as_deref()
                .and_then(|t| macula_wire::trace::TraceParent::parse(t).ok()),
            None,
            || {
                tracing::info_span!(target: crate::trace::TARGET, "macula.relay.hop",
                    otel.kind = "server",
                    macula.source = %source.node_id(),
                    macula.target = %target,
                    macula.node = %self.0.node_id)
            },
        )
        .unwrap_or_else(tracing::Span::none);
        let refuse = |code: RelayCode, message: String| {
            self.0.counters.count_refusal(code);
            tracing::info!(source = %source.node_id(), target = %target, reason = code.name(), detail = %message, "relay session refused");
            Message::Relay(RelayMessage::Status(RelayStatus { code, message }))
        };
        let target_peer = match self.admit(&source, target) {
            Ok(p) => p,
            Err((code, message)) => {
                let _ = writer.send(&refuse(code, message)).await;
                writer.finish();
                return;
            }
        };
        let opened = tracing::Instrument::instrument(
            tokio::time::timeout(
                TARGET_ANSWER_TIMEOUT,
                self.open_to_target(&target_peer, source.node_id()),
            ),
            span.clone(),
        )
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()));
        let (t_reader, t_writer) = match opened {
            Ok(streams) => streams,
            Err(detail) => {
                self.end_session();
                let msg = refuse(
                    RelayCode::TargetRefused,
                    format!("{target} did not accept the session: {detail}"),
                );
                let _ = writer.send(&msg).await;
                writer.finish();
                return;
            }
        };
        let ok = Message::Relay(RelayMessage::Status(RelayStatus {
            code: RelayCode::Ok,
            message: String::new(),
        }));
        if writer.send(&ok).await.is_err() {
            self.end_session();
            return;
        }
        drop(span);
        let c = &self.0.counters;
        c.sessions_total.inc();
        tracing::debug!(source = %source.node_id(), target = %target, "relay session open");
        let reason = self.splice((reader, writer), (t_reader, t_writer)).await;
        self.end_session();
        c.closed.at(reason as usize).inc();
        tracing::debug!(source = %source.node_id(), target = %target, reason = reason.name(), "relay session closed");
    }

    async fn open_to_target(
        &self,
        target: &Peer,
        source: NodeId,
    ) -> Result<(FrameReader, FrameWriter), String> {
        let (send, recv) = target
            .connection()
            .open_bi()
            .await
            .map_err(|e| e.to_string())?;
        let mut w = FrameWriter::new(send, target.hello().max_frame_size);
        let mut r = FrameReader::new(recv, self.0.max_frame_size);
        w.send(&Message::Relay(RelayMessage::Incoming(RelayIncoming {
            source,
        })))
        .await
        .map_err(|e| e.to_string())?;
        let frame = r
            .read()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "stream closed".to_string())?;
        match frame.decode() {
            Ok(Message::Relay(RelayMessage::Status(s))) if s.code == RelayCode::Ok => Ok((r, w)),
            Ok(Message::Relay(RelayMessage::Status(s))) => {
                Err(format!("{} ({})", s.code.name(), s.message))
            }
            Ok(other) => Err(format!("unexpected {}", other.msg_type().name())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Forwards bytes both ways until both directions end or the session is
    /// idle; one token bucket per session paces both directions.
    async fn splice(
        &self,
        a: (FrameReader, FrameWriter),
        b: (FrameReader, FrameWriter),
    ) -> CloseReason {
        let (mut a_recv, a_rest) = a.0.into_parts();
        let mut a_send = a.1.into_inner();
        let (mut b_recv, b_rest) = b.0.into_parts();
        let mut b_send = b.1.into_inner();
        let l = &self.0.limits;
        let bucket = Mutex::new(TokenBucket::new(
            l.bytes_per_second,
            l.burst_bytes,
            self.now_us(),
        ));
        let last = AtomicU64::new(self.now_us());
        let chunk = SPLICE_CHUNK.min(
            usize::try_from(l.burst_bytes)
                .unwrap_or(SPLICE_CHUNK)
                .max(2048),
        );
        let idle = l.idle_timeout;
        let ab = self.pump(&mut a_recv, a_rest, &mut b_send, &bucket, &last, chunk);
        let ba = self.pump(&mut b_recv, b_rest, &mut a_send, &bucket, &last, chunk);
        let both = async { tokio::join!(ab, ba) };
        let watchdog = async {
            loop {
                let since = Duration::from_micros(self.now_us().saturating_sub(last.load(Relaxed)));
                if since >= idle {
                    return;
                }
                tokio::time::sleep(idle - since).await;
            }
        };
        let reason = tokio::select! {
            _ = both => CloseReason::Ended,
            () = watchdog => CloseReason::Idle,
        };
        if reason == CloseReason::Idle {
            let code = stream_code(RelayCode::IdleTimeout);
            for s in [&mut a_send, &mut b_send] {
                let _ = s.reset(code);
            }
            for r in [&mut a_recv, &mut b_recv] {
                let _ = r.stop(code);
            }
        }
        reason
    }

    /// One direction: read, count, write, and pay the bucket.
    async fn pump(
        &self,
        recv: &mut quinn::RecvStream,
        rest: Bytes,
        send: &mut quinn::SendStream,
        bucket: &Mutex<TokenBucket>,
        last: &AtomicU64,
        chunk: usize,
    ) {
        let c = &self.0.counters;
        let mut pending = Some(rest).filter(|b| !b.is_empty());
        loop {
            let data = match pending.take() {
                Some(b) => b,
                None => match recv.read_chunk(chunk, true).await {
                    Ok(Some(ch)) => ch.bytes,
                    Ok(None) => {
                        let _ = send.finish();
                        return;
                    }
                    Err(e) => {
                        let code = match e {
                            quinn::ReadError::Reset(code) => code,
                            _ => stream_code(RelayCode::TargetRefused),
                        };
                        let _ = send.reset(code);
                        return;
                    }
                },
            };
            let n = data.len() as u64;
            let now = self.now_us();
            last.store(now, Relaxed);
            c.bytes_total.inc_by(n);
            if self.0.tapped.load(Relaxed) {
                if let Some(tx) = self.0.tap.lock().as_ref() {
                    let _ = tx.try_send(data.clone());
                }
            }
            if send.write_all(&data).await.is_err() {
                let _ = recv.stop(stream_code(RelayCode::TargetRefused));
                return;
            }
            let wait = bucket.lock().take(n, now);
            if wait > 0 {
                // Over the rate: stop reading (QUIC flow control then holds
                // the sender back) until the bucket has paid off its debt.
                c.throttled_total.inc();
                tokio::time::sleep(Duration::from_micros(wait)).await;
            }
        }
    }
}

fn refusal_text(code: RelayCode, l: &RelayLimits) -> String {
    match code {
        RelayCode::SessionLimit => format!(
            "relay session limit reached ({} sessions, relay_max_sessions)",
            l.max_sessions
        ),
        RelayCode::ReservationLimit => format!(
            "relay reservation limit reached ({} reservations, relay_max_reservations)",
            l.max_reservations
        ),
        other => other.name().replace('_', " "),
    }
}

/// The relay as a service: streams opened with RELAY_RESERVE or
/// RELAY_CONNECT are served (the second becomes a spliced byte pipe).
impl Service for Relay {
    fn name(&self) -> &'static str {
        "relay"
    }

    fn serves(&self) -> Serves {
        use macula_wire::MessageType as T;
        Serves {
            streams: &[T::RelayReserve, T::RelayConnect],
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
        let relay = self.clone();
        Box::pin(async move {
            match first {
                Message::Relay(RelayMessage::Reserve(r)) => {
                    relay.serve_reserve(peer, r, writer).await
                }
                Message::Relay(RelayMessage::Connect(c)) => {
                    relay.serve_connect(peer, c, reader, writer).await
                }
                _ => {}
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(sessions: usize, reservations: usize) -> RelayLimits {
        RelayLimits {
            max_sessions: sessions,
            max_reservations: reservations,
            reservation_ttl: Duration::from_secs(10),
            ..RelayLimits::default()
        }
    }

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    proptest! {
        /// The session count never exceeds the limit, whatever the order.
        #[test]
        fn sessions_never_exceed_limit(max in 1usize..8, ops in proptest::collection::vec(any::<bool>(), 0..100)) {
            let mut t = RelayTable::new(&limits(max, 4));
            for open in ops {
                if open {
                    let before = t.sessions();
                    match t.open_session() {
                        Ok(()) => prop_assert_eq!(t.sessions(), before + 1),
                        Err(c) => { prop_assert_eq!(c, RelayCode::SessionLimit); prop_assert_eq!(before, max) }
                    }
                } else {
                    t.close_session();
                }
                prop_assert!(t.sessions() <= max);
            }
        }
    }

    #[test]
    fn reservations_limit_renew_expire_release() {
        let mut t = RelayTable::new(&limits(4, 2));
        assert_eq!(t.reserve(id(1), 10, 0, 0), Ok(10_000_000));
        // Asking for more than the relay grants gets the relay's TTL.
        assert_eq!(t.reserve(id(2), 20, 99_000_000, 0), Ok(10_000_000));
        assert_eq!(t.reserve(id(3), 30, 0, 0), Err(RelayCode::ReservationLimit));
        // Renewal of an existing one is not a new reservation.
        assert_eq!(t.reserve(id(1), 11, 1_000_000, 5), Ok(1_000_000));
        assert_eq!(t.reserved_conn(&id(1), 6), Ok(11));
        assert_eq!(
            t.reserved_conn(&id(1), 1_000_005),
            Err(RelayCode::NoReservation)
        );
        // Expired ones make room.
        assert_eq!(t.reserve(id(3), 30, 0, 2_000_000), Ok(10_000_000));
        // Release only by the connection that made it.
        assert!(!t.release(&id(3), 31));
        assert!(t.release(&id(3), 30));
        assert_eq!(
            t.reserved_conn(&id(3), 2_000_001),
            Err(RelayCode::NoReservation)
        );
        assert_eq!(t.reserved_conn(&id(9), 0), Err(RelayCode::NoReservation));
    }
}
