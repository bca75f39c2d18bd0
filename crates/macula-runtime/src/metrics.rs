//! Counters and gauges of the connection layer, as plain atomics.
//!
//! One `Metrics` per node (several nodes in one process stay separate). The
//! admin HTTP server renders a snapshot in Prometheus format; this module only
//! counts and must not do I/O. Every drop, refusal and limit hit increments
//! something here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use macula_wire::ErrorCode;

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
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::Tls,
        HandshakeFailure::Timeout,
        HandshakeFailure::RealmMismatch,
        HandshakeFailure::UnsupportedVersion,
        HandshakeFailure::IdentityMismatch,
        HandshakeFailure::Protocol,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::RealmMismatch => "realm_mismatch",
            HandshakeFailure::UnsupportedVersion => "unsupported_version",
            HandshakeFailure::IdentityMismatch => "identity_mismatch",
            HandshakeFailure::Protocol => "protocol",
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
    protocol_errors: [AtomicU64; 6],
    handshake_failures: [AtomicU64; 6],
}

impl Metrics {
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
        ];
        for k in ProtocolErrorKind::ALL {
            rows.push((
                "macula_protocol_errors_total",
                Some(("kind", k.name())),
                self.protocol_errors(k),
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
        assert_eq!(m.snapshot().len(), 16 + 6 + 6);
    }
}
