//! Counters and gauges of the connection layer, as plain atomics.
//!
//! One `Metrics` per node (several nodes in one process stay separate). The
//! admin HTTP server renders it in Prometheus format through
//! [`MetricsCollector`], which reads the atomics at scrape time; this module
//! only counts and describes, and must not do I/O. Every drop, refusal and
//! limit hit increments something here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use macula_wire::ErrorCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Kinds of protocol error, used as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolErrorKind {
    /// Frame header invalid: bad version, flags or reserved byte.
    BadHeader,
    /// Frame larger than our maximum.
    FrameTooLarge,
    /// Body failed to decode or broke a limit.
    Malformed,
    /// Unknown message type (answered, connection kept).
    UnknownType,
    /// Message out of place (e.g. non-HELLO first).
    Unexpected,
    /// Stream ended in the middle of a frame.
    Truncated,
}

impl ProtocolErrorKind {
    pub const ALL: [ProtocolErrorKind; 6] = [
        ProtocolErrorKind::BadHeader,
        ProtocolErrorKind::FrameTooLarge,
        ProtocolErrorKind::Malformed,
        ProtocolErrorKind::UnknownType,
        ProtocolErrorKind::Unexpected,
        ProtocolErrorKind::Truncated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProtocolErrorKind::BadHeader => "bad_header",
            ProtocolErrorKind::FrameTooLarge => "frame_too_large",
            ProtocolErrorKind::Malformed => "malformed",
            ProtocolErrorKind::UnknownType => "unknown_type",
            ProtocolErrorKind::Unexpected => "unexpected",
            ProtocolErrorKind::Truncated => "truncated",
        }
    }

    /// The ERROR frame code that reports this kind to the peer.
    pub fn error_code(self) -> ErrorCode {
        match self {
            ProtocolErrorKind::BadHeader => ErrorCode::Malformed,
            ProtocolErrorKind::FrameTooLarge => ErrorCode::FrameTooLarge,
            ProtocolErrorKind::Malformed => ErrorCode::Malformed,
            ProtocolErrorKind::UnknownType => ErrorCode::UnknownMessageType,
            ProtocolErrorKind::Unexpected => ErrorCode::UnexpectedMessage,
            ProtocolErrorKind::Truncated => ErrorCode::Malformed,
        }
    }
}

/// Why a handshake failed, used as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    Tls,
    Timeout,
    RealmMismatch,
    UnsupportedVersion,
    IdentityMismatch,
    Protocol,
    /// The peer was at its connection limit and refused us.
    ConnectionLimit,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 7] = [
        HandshakeFailure::Tls,
        HandshakeFailure::Timeout,
        HandshakeFailure::RealmMismatch,
        HandshakeFailure::UnsupportedVersion,
        HandshakeFailure::IdentityMismatch,
        HandshakeFailure::Protocol,
        HandshakeFailure::ConnectionLimit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::RealmMismatch => "realm_mismatch",
            HandshakeFailure::UnsupportedVersion => "unsupported_version",
            HandshakeFailure::IdentityMismatch => "identity_mismatch",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::ConnectionLimit => "connection_limit",
        }
    }
}

/// One exported sample: metric name, optional `(label, value)`, count.
pub type Sample = (&'static str, Option<(&'static str, &'static str)>, u64);

/// The node's connection-layer metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections established (handshake complete), outbound.
    pub connections_outbound_total: AtomicU64,
    /// Connections established (handshake complete), inbound.
    pub connections_inbound_total: AtomicU64,
    /// Connections currently in the pool.
    pub connections_current: AtomicU64,
    /// Connections closed for any reason.
    pub connections_closed_total: AtomicU64,
    /// Incoming connections refused at the connection limit.
    pub connections_refused_total: AtomicU64,
    /// `connect` answered from the pool.
    pub pool_hits_total: AtomicU64,
    /// `connect` that had to dial.
    pub pool_misses_total: AtomicU64,
    /// Connections closed to make room (LRU).
    pub pool_evictions_total: AtomicU64,
    /// Connections closed after the idle timeout.
    pub pool_idle_closed_total: AtomicU64,
    /// Duplicate connections closed by the simultaneous-dial tie-break.
    pub pool_duplicates_closed_total: AtomicU64,
    /// Reconnect attempts to bootstrap peers.
    pub reconnect_attempts_total: AtomicU64,
    /// Frames received and sent, all types.
    pub frames_received_total: AtomicU64,
    pub frames_sent_total: AtomicU64,
    /// Pings answered and pongs received.
    pub pings_received_total: AtomicU64,
    pub pongs_received_total: AtomicU64,
    /// Pongs that matched no outstanding ping (late or forged).
    pub pongs_unmatched_total: AtomicU64,
    /// Failure detector: probes sent to silent full nodes.
    pub peer_probes_total: AtomicU64,
    /// Failure detector: nodes declared down (a connection silent for the
    /// bound, a transport timeout, a failed health ping, a failed dial).
    pub peers_declared_down_total: AtomicU64,
    /// Nodes suspected down that were heard from again.
    pub peers_restored_total: AtomicU64,
    /// Nodes currently suspected down.
    pub peers_suspected: AtomicU64,
    protocol_errors: [AtomicU64; 6],
    handshake_failures: [AtomicU64; 7],
    /// Messages by type, indexed by position in `MessageType::ALL`; the last
    /// slot counts type bytes this version does not know.
    messages_received: Slots,
    messages_sent: Slots,
}

/// Slots for per-type message counters: every known type plus "unknown".
/// Fixed so the counters stay plain atomics (no map, no lock per message).
const MESSAGE_SLOTS: usize = 48;
const _: () = assert!(macula_wire::MessageType::ALL.len() < MESSAGE_SLOTS);

/// One counter per message slot (`Default` is derived only up to 32).
#[derive(Debug)]
struct Slots([AtomicU64; MESSAGE_SLOTS]);

impl Default for Slots {
    fn default() -> Self {
        Slots(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl std::ops::Deref for Slots {
    type Target = [AtomicU64; MESSAGE_SLOTS];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

fn message_slot(msg_type: u8) -> usize {
    macula_wire::MessageType::ALL
        .iter()
        .position(|t| *t as u8 == msg_type)
        .unwrap_or(MESSAGE_SLOTS - 1)
}

impl Metrics {
    /// Counts one message received from a peer, by its type byte.
    pub fn message_received(&self, msg_type: u8) {
        self.messages_received[message_slot(msg_type)].fetch_add(1, Relaxed);
    }

    /// Counts one message sent to a peer, by its type byte.
    pub fn message_sent(&self, msg_type: u8) {
        self.messages_sent[message_slot(msg_type)].fetch_add(1, Relaxed);
    }

    /// Messages received of one type (`None`: unknown types).
    pub fn messages_received(&self, t: Option<macula_wire::MessageType>) -> u64 {
        let slot = t.map_or(MESSAGE_SLOTS - 1, |t| message_slot(t as u8));
        self.messages_received[slot].load(Relaxed)
    }

    pub fn protocol_error(&self, kind: ProtocolErrorKind) {
        self.protocol_errors[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn protocol_errors(&self, kind: ProtocolErrorKind) -> u64 {
        self.protocol_errors[kind as usize].load(Relaxed)
    }

    pub fn protocol_errors_total(&self) -> u64 {
        self.protocol_errors.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn handshake_failure(&self, why: HandshakeFailure) {
        self.handshake_failures[why as usize].fetch_add(1, Relaxed);
    }

    pub fn handshake_failures(&self, why: HandshakeFailure) -> u64 {
        self.handshake_failures[why as usize].load(Relaxed)
    }

    /// All counters as `(name, labels, value)` rows, for exposition.
    pub fn snapshot(&self) -> Vec<Sample> {
        let g = |a: &AtomicU64| a.load(Relaxed);
        let mut rows = vec![
            (
                "macula_connections_total",
                Some(("direction", "outbound")),
                g(&self.connections_outbound_total),
            ),
            (
                "macula_connections_total",
                Some(("direction", "inbound")),
                g(&self.connections_inbound_total),
            ),
            (
                "macula_connections_current",
                None,
                g(&self.connections_current),
            ),
            (
                "macula_connections_closed_total",
                None,
                g(&self.connections_closed_total),
            ),
            (
                "macula_connections_refused_total",
                None,
                g(&self.connections_refused_total),
            ),
            ("macula_pool_hits_total", None, g(&self.pool_hits_total)),
            ("macula_pool_misses_total", None, g(&self.pool_misses_total)),
            (
                "macula_pool_evictions_total",
                None,
                g(&self.pool_evictions_total),
            ),
            (
                "macula_pool_idle_closed_total",
                None,
                g(&self.pool_idle_closed_total),
            ),
            (
                "macula_pool_duplicates_closed_total",
                None,
                g(&self.pool_duplicates_closed_total),
            ),
            (
                "macula_reconnect_attempts_total",
                None,
                g(&self.reconnect_attempts_total),
            ),
            (
                "macula_frames_received_total",
                None,
                g(&self.frames_received_total),
            ),
            ("macula_frames_sent_total", None, g(&self.frames_sent_total)),
            (
                "macula_pings_received_total",
                None,
                g(&self.pings_received_total),
            ),
            (
                "macula_pongs_received_total",
                None,
                g(&self.pongs_received_total),
            ),
            (
                "macula_pongs_unmatched_total",
                None,
                g(&self.pongs_unmatched_total),
            ),
            ("macula_peer_probes_total", None, g(&self.peer_probes_total)),
            (
                "macula_peers_declared_down_total",
                None,
                g(&self.peers_declared_down_total),
            ),
            (
                "macula_peers_restored_total",
                None,
                g(&self.peers_restored_total),
            ),
            ("macula_peers_suspected", None, g(&self.peers_suspected)),
        ];
        for k in ProtocolErrorKind::ALL {
            rows.push((
                "macula_protocol_errors_total",
                Some(("kind", k.name())),
                self.protocol_errors(k),
            ));
        }
        let types = macula_wire::MessageType::ALL;
        for (family, counts) in [
            ("macula_messages_total", &self.messages_received),
            ("macula_messages_sent_total", &self.messages_sent),
        ] {
            for (i, t) in types.iter().enumerate() {
                rows.push((family, Some(("type", t.name())), counts[i].load(Relaxed)));
            }
            rows.push((
                family,
                Some(("type", "unknown")),
                counts[MESSAGE_SLOTS - 1].load(Relaxed),
            ));
        }
        for h in HandshakeFailure::ALL {
            rows.push((
                "macula_handshake_failures_total",
                Some(("reason", h.name())),
                self.handshake_failures(h),
            ));
        }
        rows
    }
}

/// Help text for every family [`Metrics::snapshot`] exports, keyed by the
/// exported name. Counters keep their `_total` suffix here; the encoder
/// adds it back (`# TYPE macula_pool_hits counter` / `macula_pool_hits_total 3`).
const HELP: &[(&str, &str)] = &[
    (
        "macula_connections_total",
        "Connections established (TLS and HELLO complete), by direction.",
    ),
    (
        "macula_connections_current",
        "Connections currently in the pool.",
    ),
    (
        "macula_connections_closed_total",
        "Connections closed for any reason.",
    ),
    (
        "macula_connections_refused_total",
        "Incoming connections refused at the connection or pending-handshake limit.",
    ),
    (
        "macula_pool_hits_total",
        "connect() calls answered from the connection pool.",
    ),
    (
        "macula_pool_misses_total",
        "connect() calls that had to dial.",
    ),
    (
        "macula_pool_evictions_total",
        "Connections closed to make room in a full pool (least recently used).",
    ),
    (
        "macula_pool_idle_closed_total",
        "Connections closed after the idle timeout.",
    ),
    (
        "macula_pool_duplicates_closed_total",
        "Duplicate connections closed by the simultaneous-dial tie-break.",
    ),
    (
        "macula_reconnect_attempts_total",
        "Reconnect attempts to bootstrap peers.",
    ),
    (
        "macula_frames_received_total",
        "Frames received from peers, all message types.",
    ),
    (
        "macula_frames_sent_total",
        "Frames sent to peers, all message types.",
    ),
    (
        "macula_pings_received_total",
        "PING frames received and answered.",
    ),
    ("macula_pongs_received_total", "PONG frames received."),
    (
        "macula_peer_probes_total",
        "Failure detector: probes (PING) sent to full nodes silent for peer_probe_after.",
    ),
    (
        "macula_peers_declared_down_total",
        "Nodes declared down: silent for the failure detector's bound, a transport timeout, a failed health ping or dial.",
    ),
    (
        "macula_peers_restored_total",
        "Nodes suspected down that connected again.",
    ),
    (
        "macula_peers_suspected",
        "Nodes currently suspected down (services avoid waiting on them).",
    ),
    (
        "macula_pongs_unmatched_total",
        "PONG frames that matched no outstanding PING (late or forged).",
    ),
    (
        "macula_messages_total",
        "Messages received from peers, by type.",
    ),
    (
        "macula_messages_sent_total",
        "Messages sent to peers, by type.",
    ),
    (
        "macula_protocol_errors_total",
        "Protocol errors from peers, by kind.",
    ),
    (
        "macula_handshake_failures_total",
        "Failed handshakes (TLS or HELLO), by reason.",
    ),
];

/// Exposes one node's [`Metrics`] to a prometheus-client `Registry`: the
/// atomics are read at scrape time, so the counting code stays plain
/// `fetch_add`. Register one per node in that node's registry.
#[derive(Debug, Clone)]
pub struct MetricsCollector(pub Arc<Metrics>);

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.0.snapshot();
        let mut i = 0;
        // Rows of one family are adjacent in the snapshot: emit one
        // descriptor (HELP/TYPE) per run of equal names.
        while i < rows.len() {
            let name = rows[i].0;
            let end = i + rows[i..].iter().take_while(|r| r.0 == name).count();
            let help = HELP
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("Macula connection-layer metric.", |(_, h)| *h);
            let family = &rows[i..end];
            match name.strip_suffix("_total") {
                Some(base) => encode_family(&mut encoder, base, help, family, ConstCounter::new)?,
                None => encode_family(&mut encoder, name, help, family, |v| {
                    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
                })?,
            }
            i = end;
        }
        Ok(())
    }
}

/// Encodes unlabelled `(name, help, value)` rows: names ending in `_total`
/// are counters, the rest gauges.
pub(crate) fn encode_rows(
    encoder: &mut DescriptorEncoder,
    rows: &[(&'static str, &'static str, u64)],
) -> Result<(), std::fmt::Error> {
    for (name, help, value) in rows {
        let row = [(*name, None, *value)];
        match name.strip_suffix("_total") {
            Some(base) => encode_family(encoder, base, help, &row, ConstCounter::new)?,
            None => encode_family(encoder, name, help, &row, |v| {
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
            })?,
        }
    }
    Ok(())
}

/// One descriptor and its samples: a single unlabelled sample, or one sample
/// per label value.
pub(crate) fn encode_family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[Sample],
    metric: impl Fn(u64) -> M,
) -> Result<(), std::fmt::Error> {
    let Some((_, _, first)) = rows.first() else {
        return Ok(());
    };
    let ty = metric(*first).metric_type();
    let mut family = encoder.encode_descriptor(name, help, None, ty)?;
    if let [(_, None, value)] = rows {
        return metric(*value).encode(family);
    }
    for (_, label, value) in rows {
        // Snapshot families with several rows are labelled on every row.
        if let Some(label) = label {
            metric(*value).encode(family.encode_family(&[*label])?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_index_their_own_counter() {
        let m = Metrics::default();
        for (i, k) in ProtocolErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(k as usize, i);
            m.protocol_error(k);
        }
        for (i, h) in HandshakeFailure::ALL.into_iter().enumerate() {
            assert_eq!(h as usize, i);
        }
        m.handshake_failure(HandshakeFailure::Timeout);
        assert_eq!(m.protocol_errors_total(), 6);
        assert_eq!(m.handshake_failures(HandshakeFailure::Timeout), 1);
        let n_types = macula_wire::MessageType::ALL.len() + 1;
        assert_eq!(m.snapshot().len(), 20 + 6 + 7 + 2 * n_types);
        m.message_received(macula_wire::MessageType::Ping as u8);
        m.message_received(0x7e);
        assert_eq!(m.messages_received(Some(macula_wire::MessageType::Ping)), 1);
        assert_eq!(m.messages_received(None), 1);
    }

    fn render(m: &Arc<Metrics>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(MetricsCollector(m.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        out
    }

    #[test]
    fn collector_exports_every_snapshot_row_with_help_and_type() {
        let m = Arc::new(Metrics::default());
        m.pool_hits_total.fetch_add(3, Relaxed);
        m.connections_current.store(2, Relaxed);
        m.protocol_error(ProtocolErrorKind::Malformed);
        let text = render(&m);
        for (name, label, value) in m.snapshot() {
            let sample = match label {
                Some((k, v)) => format!("{name}{{{k}=\"{v}\"}} {value}\n"),
                None => format!("{name} {value}\n"),
            };
            assert!(text.contains(&sample), "missing {sample:?} in\n{text}");
            let base = name.strip_suffix("_total").unwrap_or(name);
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            assert!(text.contains(&format!("# TYPE {base} {kind}\n")), "{base}");
            assert!(HELP.iter().any(|(n, _)| *n == name), "no help for {name}");
        }
        // One HELP line per family, not per labelled row.
        assert_eq!(text.matches("# HELP macula_protocol_errors ").count(), 1);
        assert!(text.contains("macula_pool_hits_total 3\n"));
        assert!(text.contains("macula_protocol_errors_total{kind=\"malformed\"} 1\n"));
    }
}
