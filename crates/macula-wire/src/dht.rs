//! DHT messages on the wire (types `0x10..=0x1f`), and how record keys are
//! derived from names.
//!
//! Requests and responses travel on the connection's control stream; every
//! response echoes its request's `id` (the correlation ID). These are wire
//! types only: the Kademlia logic lives in `macula-dht`, which knows nothing
//! of serde, and the runtime maps between the two.

use serde::{Deserialize, Serialize};

use crate::node_id::NodeId;

/// Contacts in one NODES or VALUE response; more is malformed. The DHT core
/// sends at most k = 20; the margin leaves room for other implementations.
pub const MAX_DHT_CONTACTS: usize = 64;
/// Records in one VALUE response (one per publisher of a key).
pub const MAX_DHT_RECORDS: usize = 64;
/// Record value size on the wire; the DHT core's own limit is lower.
pub const MAX_DHT_VALUE_LEN: usize = 64 * 1024;
/// Record signature size on the wire (public key + Ed25519 signature is 96).
pub const MAX_DHT_SIGNATURE_LEN: usize = 256;

/// BLAKE3 `derive_key` context for record keys.
const DHT_KEY_CONTEXT: &str = "macula 2026-11 dht-key v1";

/// The 256-bit DHT key of an application-level name (`"orders"`,
/// `"svc:pricing.quote"`). Every implementation must derive keys this way to
/// find each other's records.
pub fn dht_key(name: &[u8]) -> NodeId {
    let mut hasher = blake3::Hasher::new_derive_key(DHT_KEY_CONTEXT);
    hasher.update(name);
    NodeId::from_bytes(*hasher.finalize().as_bytes())
}

/// A node as the DHT knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireContact {
    pub id: NodeId,
    /// `host:port` to dial (the node must prove `id` there).
    pub addr: String,
}

/// A signed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    pub key: NodeId,
    pub publisher: NodeId,
    pub seq: u64,
    /// Lifetime granted by the publisher, milliseconds.
    pub ttl_ms: u64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Publisher's Ed25519 public key (32 bytes) followed by its signature
    /// (64 bytes) over the record's signed bytes (see PROTOCOL.md).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a STORE was refused (`DHT_STORE_REJECTED.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum StoreRejectCode {
    ValueTooLarge,
    SignatureTooLarge,
    TtlZero,
    TtlTooLong,
    BadSignature,
    Stale,
    PublisherFull,
    StoreFull,
    Other(u16),
}

impl From<u16> for StoreRejectCode {
    fn from(v: u16) -> Self {
        use StoreRejectCode::*;
        match v {
            1 => ValueTooLarge,
            2 => SignatureTooLarge,
            3 => TtlZero,
            4 => TtlTooLong,
            5 => BadSignature,
            6 => Stale,
            7 => PublisherFull,
            8 => StoreFull,
            other => Other(other),
        }
    }
}

impl From<StoreRejectCode> for u16 {
    fn from(c: StoreRejectCode) -> u16 {
        use StoreRejectCode::*;
        match c {
            ValueTooLarge => 1,
            SignatureTooLarge => 2,
            TtlZero => 3,
            TtlTooLong => 4,
            BadSignature => 5,
            Stale => 6,
            PublisherFull => 7,
            StoreFull => 8,
            Other(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtPing {
    pub id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtFindNode {
    pub id: u64,
    pub target: NodeId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtFindValue {
    pub id: u64,
    pub key: NodeId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtStore {
    pub id: u64,
    pub record: WireRecord,
    /// Remaining lifetime to hold it for (at most `record.ttl_ms`).
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtPong {
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtNodes {
    pub id: u64,
    pub closer: Vec<WireContact>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtValue {
    pub id: u64,
    pub records: Vec<WireRecord>,
    pub closer: Vec<WireContact>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtStored {
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtStoreRejected {
    pub id: u64,
    pub code: StoreRejectCode,
    /// The offending figure (length, TTL in ms, offered seq), 0 if none.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub value: u64,
    /// The limit it broke (or the stored seq for `Stale`), 0 if none.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub limit: u64,
}

/// Every DHT message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhtMessage {
    Ping(DhtPing),
    FindNode(DhtFindNode),
    FindValue(DhtFindValue),
    Store(DhtStore),
    Pong(DhtPong),
    Nodes(DhtNodes),
    Value(DhtValue),
    Stored(DhtStored),
    StoreRejected(DhtStoreRejected),
}

impl DhtMessage {
    /// The correlation ID.
    pub fn id(&self) -> u64 {
        match self {
            DhtMessage::Ping(m) => m.id,
            DhtMessage::FindNode(m) => m.id,
            DhtMessage::FindValue(m) => m.id,
            DhtMessage::Store(m) => m.id,
            DhtMessage::Pong(m) => m.id,
            DhtMessage::Nodes(m) => m.id,
            DhtMessage::Value(m) => m.id,
            DhtMessage::Stored(m) => m.id,
            DhtMessage::StoreRejected(m) => m.id,
        }
    }

    /// True for requests (which expect a response).
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            DhtMessage::Ping(_)
                | DhtMessage::FindNode(_)
                | DhtMessage::FindValue(_)
                | DhtMessage::Store(_)
        )
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let check_contacts = |c: &[WireContact]| {
            if c.len() > MAX_DHT_CONTACTS {
                return Err(format!("{} contacts, limit {MAX_DHT_CONTACTS}", c.len()));
            }
            match c
                .iter()
                .find(|c| c.addr.len() > crate::limits::MAX_ADDR_LEN)
            {
                Some(c) => Err(format!("contact address of {} bytes", c.addr.len())),
                None => Ok(()),
            }
        };
        let check_record = |r: &WireRecord| {
            if r.value.len() > MAX_DHT_VALUE_LEN {
                return Err(format!(
                    "record value of {} bytes, limit {MAX_DHT_VALUE_LEN}",
                    r.value.len()
                ));
            }
            if r.signature.len() > MAX_DHT_SIGNATURE_LEN {
                return Err(format!("record signature of {} bytes", r.signature.len()));
            }
            Ok(())
        };
        match self {
            DhtMessage::Store(s) => check_record(&s.record),
            DhtMessage::Nodes(n) => check_contacts(&n.closer),
            DhtMessage::Value(v) => {
                check_contacts(&v.closer)?;
                if v.records.len() > MAX_DHT_RECORDS {
                    return Err(format!(
                        "{} records, limit {MAX_DHT_RECORDS}",
                        v.records.len()
                    ));
                }
                v.records.iter().try_for_each(check_record)
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(dht_key(b"orders"), dht_key(b"orders"));
        assert_ne!(dht_key(b"orders"), dht_key(b"orders2"));
        assert_ne!(
            dht_key(b"x"),
            NodeId::from_public_key(b"x".repeat(32).as_slice().try_into().unwrap())
        );
    }
}
