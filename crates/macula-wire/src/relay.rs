//! Relay messages (types `0x72..=0x76`, in the relay and NAT traversal range)
//! and the DHT record value that names a private node's relays.
//!
//! A node that peers cannot dial (behind NAT) **reserves** at a public peer
//! (RELAY_RESERVE / RELAY_RESERVED on a bidirectional stream it opens to the
//! relay). Another node then opens a bidirectional stream to the relay whose
//! first frame is RELAY_CONNECT naming the target; the relay opens a
//! bidirectional stream to the target whose first frame is RELAY_INCOMING
//! naming the source; the target answers RELAY_STATUS, and the relay answers
//! the initiator RELAY_STATUS. After two OKs both streams are opaque byte
//! pipes the relay splices together; the endpoints run an ordinary
//! end-to-end QUIC + TLS connection over them (each inner QUIC packet
//! prefixed by its length as a big-endian u16). Wire types only: the runtime
//! (`macula-runtime/src/relay.rs`, `tunnel.rs`) does the rest.

use serde::{Deserialize, Serialize};

use crate::node_id::NodeId;

/// Status message text.
pub const MAX_RELAY_MESSAGE_LEN: usize = 256;
/// Relays named in one relay record.
pub const MAX_RELAYS_PER_RECORD: usize = 8;
/// Addresses per relay in a relay record.
pub const MAX_RELAY_ADDRS: usize = 4;

/// Outcome codes of RELAY_RESERVED and RELAY_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum RelayCode {
    /// Accepted.
    Ok,
    /// The target holds no reservation at this relay.
    NoReservation,
    /// The target has no open connection to this relay.
    TargetNotConnected,
    /// The relay is at its session limit.
    SessionLimit,
    /// The relay is at its reservation limit.
    ReservationLimit,
    /// The relay does not relay (disabled, or it is not publicly reachable).
    NotRelaying,
    /// The target refused the session or did not answer in time.
    TargetRefused,
    /// The request makes no sense (e.g. the target is the initiator).
    Invalid,
    /// Session closed by the relay: over its byte rate.
    RateLimited,
    /// Session closed by the relay: idle for its idle timeout.
    IdleTimeout,
    /// A code this version does not know.
    Other(u16),
}

impl From<u16> for RelayCode {
    fn from(v: u16) -> Self {
        use RelayCode::*;
        match v {
            0 => Ok,
            1 => NoReservation,
            2 => TargetNotConnected,
            3 => SessionLimit,
            4 => ReservationLimit,
            5 => NotRelaying,
            6 => TargetRefused,
            7 => Invalid,
            8 => RateLimited,
            9 => IdleTimeout,
            other => Other(other),
        }
    }
}

impl From<RelayCode> for u16 {
    fn from(c: RelayCode) -> u16 {
        use RelayCode::*;
        match c {
            Ok => 0,
            NoReservation => 1,
            TargetNotConnected => 2,
            SessionLimit => 3,
            ReservationLimit => 4,
            NotRelaying => 5,
            TargetRefused => 6,
            Invalid => 7,
            RateLimited => 8,
            IdleTimeout => 9,
            Other(v) => v,
        }
    }
}

impl RelayCode {
    /// Label for metrics and logs.
    pub fn name(self) -> &'static str {
        use RelayCode::*;
        match self {
            Ok => "ok",
            NoReservation => "no_reservation",
            TargetNotConnected => "target_not_connected",
            SessionLimit => "session_limit",
            ReservationLimit => "reservation_limit",
            NotRelaying => "not_relaying",
            TargetRefused => "target_refused",
            Invalid => "invalid",
            RateLimited => "rate_limited",
            IdleTimeout => "idle_timeout",
            Other(_) => "other",
        }
    }
}

/// 0x72: "accept relayed connections for me" (first frame of a stream the
/// private node opens to the relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayReserve {
    /// Lifetime asked for, milliseconds; 0 means the relay's default. The
    /// relay may grant less.
    pub ttl_ms: u64,
}

/// 0x73: the relay's answer to RELAY_RESERVE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayReserved {
    pub code: RelayCode,
    /// Lifetime granted, milliseconds (0 when refused). The reservation also
    /// ends when the connection that made it closes.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub ttl_ms: u64,
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub message: String,
}

/// 0x74: "splice this stream to `target`" (first frame of a stream the
/// initiator opens to the relay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayConnect {
    pub target: NodeId,
    /// Optional W3C `traceparent` of the initiator's span (the relay's hop
    /// span is its child: PROTOCOL.md 5.13); at most
    /// `MAX_RELAY_TRACEPARENT_LEN` bytes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::nil_default"
    )]
    pub traceparent: Option<String>,
}

/// Longest `traceparent` a RELAY_CONNECT may carry.
pub const MAX_RELAY_TRACEPARENT_LEN: usize = 256;

/// 0x75: "`source` wants a relayed session with you" (first frame of a
/// stream the relay opens to the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayIncoming {
    pub source: NodeId,
}

/// 0x76: the answer to RELAY_CONNECT (relay to initiator) and to
/// RELAY_INCOMING (target to relay). After `Ok` the stream carries only
/// length-prefixed inner packets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub code: RelayCode,
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub message: String,
}

/// Every relay message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMessage {
    Reserve(RelayReserve),
    Reserved(RelayReserved),
    Connect(RelayConnect),
    Incoming(RelayIncoming),
    Status(RelayStatus),
}

impl RelayMessage {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let msg = match self {
            RelayMessage::Reserved(r) => &r.message,
            RelayMessage::Status(s) => &s.message,
            RelayMessage::Connect(RelayConnect {
                traceparent: Some(t),
                ..
            }) if t.len() > MAX_RELAY_TRACEPARENT_LEN => {
                return Err(format!(
                    "traceparent of {} bytes, limit {MAX_RELAY_TRACEPARENT_LEN}",
                    t.len()
                ));
            }
            _ => return Ok(()),
        };
        if msg.len() > MAX_RELAY_MESSAGE_LEN {
            return Err(format!(
                "message of {} bytes, limit {MAX_RELAY_MESSAGE_LEN}",
                msg.len()
            ));
        }
        Ok(())
    }
}

/// One relay in a relay record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEntry {
    /// The relay's node ID (the dialer must expect it in TLS).
    pub id: NodeId,
    /// `host:port` addresses the relay was reached at.
    pub addrs: Vec<String>,
}

/// The value of the DHT record `relay:<realm>:<node id>` (publisher = that
/// node): the relays it holds reservations at. An empty list withdraws it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRecord {
    pub relays: Vec<RelayEntry>,
}

/// A relay record value that breaks the format or a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay record: {0}")]
pub struct RelayRecordError(pub String);

impl RelayRecord {
    pub fn encode(&self) -> Result<Vec<u8>, RelayRecordError> {
        self.validate()?;
        rmp_serde::to_vec_named(self).map_err(|e| RelayRecordError(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<RelayRecord, RelayRecordError> {
        let mut rest = bytes;
        let rec = {
            let mut de = rmp_serde::Deserializer::new(&mut rest);
            de.set_max_depth(8);
            RelayRecord::deserialize(&mut de).map_err(|e| RelayRecordError(e.to_string()))?
        };
        if !rest.is_empty() {
            return Err(RelayRecordError("trailing bytes".into()));
        }
        rec.validate()?;
        Ok(rec)
    }

    fn validate(&self) -> Result<(), RelayRecordError> {
        if self.relays.len() > MAX_RELAYS_PER_RECORD {
            return Err(RelayRecordError(format!("{} relays", self.relays.len())));
        }
        for r in &self.relays {
            if r.addrs.len() > MAX_RELAY_ADDRS
                || r.addrs
                    .iter()
                    .any(|a| a.len() > crate::limits::MAX_ADDR_LEN)
            {
                return Err(RelayRecordError("too many or too long addresses".into()));
            }
        }
        Ok(())
    }
}

/// The DHT name of `node`'s relay record in `realm`.
pub fn relay_record_name(realm: &str, node: &NodeId) -> String {
    format!("relay:{realm}:{node}")
}

/// Fuzz entry point for relay record values: whatever decodes re-encodes
/// and decodes to the same value.
pub fn fuzz_relay_record(data: &[u8]) {
    if let Ok(rec) = RelayRecord::decode(data) {
        let bytes = rec.encode().expect("a decoded record re-encodes");
        assert_eq!(RelayRecord::decode(&bytes).ok(), Some(rec));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn codes_round_trip_including_unknown() {
        for v in 0..40u16 {
            assert_eq!(u16::from(RelayCode::from(v)), v);
        }
    }

    fn arb_record() -> impl Strategy<Value = RelayRecord> {
        proptest::collection::vec(
            (
                any::<[u8; 32]>(),
                proptest::collection::vec("[0-9.:]{0,20}", 0..=MAX_RELAY_ADDRS),
            ),
            0..=MAX_RELAYS_PER_RECORD,
        )
        .prop_map(|v| RelayRecord {
            relays: v
                .into_iter()
                .map(|(id, addrs)| RelayEntry {
                    id: NodeId::from_bytes(id),
                    addrs,
                })
                .collect(),
        })
    }

    proptest! {
        #[test]
        fn records_round_trip(rec in arb_record()) {
            let bytes = rec.encode().unwrap();
            prop_assert_eq!(RelayRecord::decode(&bytes).unwrap(), rec);
        }

        #[test]
        fn record_decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            fuzz_relay_record(&data);
        }
    }

    #[test]
    fn record_limits_enforced() {
        let too_many = RelayRecord {
            relays: (0..=MAX_RELAYS_PER_RECORD)
                .map(|i| RelayEntry {
                    id: NodeId::from_bytes([i as u8; 32]),
                    addrs: vec![],
                })
                .collect(),
        };
        assert!(too_many.encode().is_err());
        let bytes = rmp_serde::to_vec_named(&too_many).unwrap();
        assert!(RelayRecord::decode(&bytes).is_err());
    }
}
