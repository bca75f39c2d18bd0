//! RPC messages on the wire (types `0x50..=0x6f`) and the DHT record values
//! that advertise procedures.
//!
//! A caller sends CALL on the control stream of its connection to the
//! provider; the provider answers with exactly one REPLY or CALL_ERROR
//! carrying the same `id`, unless the caller sent CANCEL first (then it may
//! still answer; the caller ignores it). Ids are chosen by the caller and are
//! only meaningful on the connection that carried the CALL. Wire types only:
//! provider choice, retries and deadlines live in `macula-rpc` and the runtime.

use serde::{Deserialize, Serialize};

/// Procedure name length on the wire (the RPC core's limit is the same).
pub const MAX_WIRE_PROCEDURE_LEN: usize = 256;
/// Headers on one call or reply.
pub const MAX_WIRE_RPC_HEADERS: usize = 32;
/// Header name and value lengths.
pub const MAX_WIRE_RPC_HEADER_LEN: usize = 1024;
/// Error message length in CALL_ERROR.
pub const MAX_WIRE_RPC_ERROR_LEN: usize = 1024;
/// Metadata entries in an advertisement.
pub const MAX_AD_METADATA: usize = 16;
/// Listen addresses in an advertisement.
pub const MAX_AD_ADDRS: usize = 8;
/// Procedures listed in one node's service index record.
pub const MAX_INDEX_PROCEDURES: usize = 256;

/// A request for `procedure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// Caller-chosen correlation id, unique among the caller's open calls on
    /// this connection.
    pub id: u64,
    pub procedure: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Milliseconds the provider has, counted from when it reads the CALL.
    /// Relative, so the two nodes' clocks need not agree. Past it the
    /// provider abandons the work and answers `Timeout` (if anything).
    pub timeout_ms: u32,
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub headers: Vec<(String, String)>,
    /// The caller that made the call, proved end to end: absent when the
    /// sending node is the caller (its connection proves it); set by a
    /// client and passed on unchanged by the nodes forwarding its call
    /// (docs/PROTOCOL.md §5.4, "Proved callers").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<CallOrigin>,
}

/// The originator's proof on a forwarded CALL: its Ed25519 key and its
/// signature over [`call_digest`] of the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallOrigin {
    /// 32 bytes.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// 64 bytes.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// What a CALL's originator signs: BLAKE3 over a domain tag, the
/// procedure, the payload and the headers but the trace context (which a
/// forwarding node rewrites), each length-prefixed.
pub fn call_digest(procedure: &str, payload: &[u8], headers: &[(String, String)]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"macula call digest v1\0");
    h.update(&(procedure.len() as u64).to_le_bytes());
    h.update(procedure.as_bytes());
    h.update(&(payload.len() as u64).to_le_bytes());
    h.update(payload);
    for (k, v) in headers {
        if crate::pubsub::is_hop_header(k) {
            continue;
        }
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// A successful answer to CALL `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub headers: Vec<(String, String)>,
}

/// A failed answer to CALL `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallError {
    pub id: u64,
    pub kind: RpcErrorKind,
    /// Application error code when `kind` is `Handler`; 0 otherwise.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub code: i64,
    pub message: String,
}

/// The caller gave up on CALL `id`: the provider should stop working on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub id: u64,
}

/// Why a provider refused or failed a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum RpcErrorKind {
    /// This node does not serve the procedure (its advertisement is stale).
    NotFound,
    /// The handler returned an error (`code` and `message` are its own).
    Handler,
    /// The handler panicked.
    Panicked,
    /// The deadline passed before the handler finished.
    Timeout,
    /// The handler is at its concurrency limit.
    Overloaded,
    /// The call was cancelled.
    Cancelled,
    /// The provider is shutting down and takes no new calls.
    ShuttingDown,
    /// The request breaks a rule (bad procedure name, too large...).
    Invalid,
    /// A gateway calling for its client found no provider in the mesh.
    NoProviders,
    /// A gateway calling for its client could reach no provider.
    Unreachable,
    /// The realm's permissions refuse it: the caller may not call the
    /// procedure, or no provider may serve it (issue 18).
    Unauthorized,
    /// A kind this version does not know.
    Other(u16),
}

impl RpcErrorKind {
    /// Whether a caller may safely try another provider: the provider did
    /// not run the handler (or stopped before it could have had an effect).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            RpcErrorKind::NotFound | RpcErrorKind::Overloaded | RpcErrorKind::ShuttingDown
        )
    }
}

impl From<u16> for RpcErrorKind {
    fn from(v: u16) -> Self {
        match v {
            1 => RpcErrorKind::NotFound,
            2 => RpcErrorKind::Handler,
            3 => RpcErrorKind::Panicked,
            4 => RpcErrorKind::Timeout,
            5 => RpcErrorKind::Overloaded,
            6 => RpcErrorKind::Cancelled,
            7 => RpcErrorKind::ShuttingDown,
            8 => RpcErrorKind::Invalid,
            9 => RpcErrorKind::NoProviders,
            10 => RpcErrorKind::Unreachable,
            11 => RpcErrorKind::Unauthorized,
            other => RpcErrorKind::Other(other),
        }
    }
}

impl From<RpcErrorKind> for u16 {
    fn from(k: RpcErrorKind) -> u16 {
        match k {
            RpcErrorKind::NotFound => 1,
            RpcErrorKind::Handler => 2,
            RpcErrorKind::Panicked => 3,
            RpcErrorKind::Timeout => 4,
            RpcErrorKind::Overloaded => 5,
            RpcErrorKind::Cancelled => 6,
            RpcErrorKind::ShuttingDown => 7,
            RpcErrorKind::Invalid => 8,
            RpcErrorKind::NoProviders => 9,
            RpcErrorKind::Unreachable => 10,
            RpcErrorKind::Unauthorized => 11,
            RpcErrorKind::Other(v) => v,
        }
    }
}

/// The RPC messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcMessage {
    Call(Call),
    Reply(Reply),
    Error(CallError),
    Cancel(Cancel),
}

fn check_headers(h: &[(String, String)]) -> Result<(), String> {
    if h.len() > MAX_WIRE_RPC_HEADERS {
        return Err(format!("{} headers, limit {MAX_WIRE_RPC_HEADERS}", h.len()));
    }
    if h.iter()
        .any(|(k, v)| k.len() > MAX_WIRE_RPC_HEADER_LEN || v.len() > MAX_WIRE_RPC_HEADER_LEN)
    {
        return Err("header too long".into());
    }
    Ok(())
}

impl RpcMessage {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            RpcMessage::Call(c) => {
                if c.procedure.len() > MAX_WIRE_PROCEDURE_LEN {
                    return Err(format!("procedure name of {} bytes", c.procedure.len()));
                }
                if let Some(o) = &c.origin {
                    if o.key.len() != 32 || o.sig.len() != 64 {
                        return Err("origin key must be 32 bytes, its signature 64".into());
                    }
                }
                check_headers(&c.headers)
            }
            RpcMessage::Reply(r) => check_headers(&r.headers),
            RpcMessage::Error(e) => {
                if e.message.len() > MAX_WIRE_RPC_ERROR_LEN {
                    return Err(format!("error message of {} bytes", e.message.len()));
                }
                Ok(())
            }
            RpcMessage::Cancel(_) => Ok(()),
        }
    }
}

/// The value of a provider's advertisement record in the DHT, stored under
/// `dht_key("rpc:{realm}:{procedure}")` and signed by the provider (the
/// record's publisher is the provider's node ID). An empty value is a
/// withdrawal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    pub procedure: String,
    /// Relative share for weighted load balancing (0 = only when nothing else).
    pub weight: u32,
    /// Free-form key/value pairs from the provider.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub metadata: Vec<(String, String)>,
    /// Where the provider accepts connections (`host:port`).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub addrs: Vec<String>,
}

/// The value of a node's record under `dht_key("rpcidx:{realm}")`: every
/// procedure it currently advertises. It is how `macula services` lists the
/// mesh without enumerating the DHT.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceIndex {
    pub procedures: Vec<String>,
}

/// Why a record value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed record value: {0}")]
pub struct RecordValueError(pub String);

impl Advertisement {
    pub fn encode(&self) -> Result<Vec<u8>, RecordValueError> {
        self.validate()?;
        rmp_serde::to_vec_named(self).map_err(|e| RecordValueError(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Advertisement, RecordValueError> {
        let ad: Advertisement =
            rmp_serde::from_slice(bytes).map_err(|e| RecordValueError(e.to_string()))?;
        ad.validate()?;
        Ok(ad)
    }

    fn validate(&self) -> Result<(), RecordValueError> {
        let bad = |s: String| Err(RecordValueError(s));
        if self.procedure.len() > MAX_WIRE_PROCEDURE_LEN {
            return bad(format!("procedure name of {} bytes", self.procedure.len()));
        }
        if self.metadata.len() > MAX_AD_METADATA {
            return bad(format!("{} metadata entries", self.metadata.len()));
        }
        if self
            .metadata
            .iter()
            .any(|(k, v)| k.len() > MAX_WIRE_RPC_HEADER_LEN || v.len() > MAX_WIRE_RPC_HEADER_LEN)
        {
            return bad("metadata entry too long".into());
        }
        if self.addrs.len() > MAX_AD_ADDRS
            || self
                .addrs
                .iter()
                .any(|a| a.len() > crate::limits::MAX_ADDR_LEN)
        {
            return bad("too many or too long addresses".into());
        }
        Ok(())
    }
}

impl ServiceIndex {
    pub fn encode(&self) -> Result<Vec<u8>, RecordValueError> {
        self.validate()?;
        rmp_serde::to_vec_named(self).map_err(|e| RecordValueError(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<ServiceIndex, RecordValueError> {
        let ix: ServiceIndex =
            rmp_serde::from_slice(bytes).map_err(|e| RecordValueError(e.to_string()))?;
        ix.validate()?;
        Ok(ix)
    }

    fn validate(&self) -> Result<(), RecordValueError> {
        if self.procedures.len() > MAX_INDEX_PROCEDURES
            || self
                .procedures
                .iter()
                .any(|p| p.len() > MAX_WIRE_PROCEDURE_LEN)
        {
            return Err(RecordValueError(format!(
                "index of {} procedures (limit {MAX_INDEX_PROCEDURES})",
                self.procedures.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn error_kinds_round_trip_through_u16() {
        for v in 0..20u16 {
            assert_eq!(u16::from(RpcErrorKind::from(v)), v);
        }
        assert!(RpcErrorKind::Overloaded.retryable());
        assert!(!RpcErrorKind::Handler.retryable());
        assert!(!RpcErrorKind::Timeout.retryable());
    }

    #[test]
    fn record_values_reject_garbage() {
        assert!(Advertisement::decode(b"\xc1").is_err());
        assert!(Advertisement::decode(b"").is_err());
        assert!(ServiceIndex::decode(&[0x92, 0x01]).is_err());
    }

    proptest! {
        #[test]
        fn advertisement_round_trips(
            procedure in "[a-z.]{1,40}",
            weight in any::<u32>(),
            metadata in proptest::collection::vec(("[a-z]{0,8}", "[a-z]{0,8}"), 0..4),
            addrs in proptest::collection::vec("[0-9.:]{1,21}", 0..3),
        ) {
            let ad = Advertisement { procedure, weight, metadata, addrs };
            let bytes = ad.encode().unwrap();
            prop_assert_eq!(Advertisement::decode(&bytes).unwrap(), ad);
        }

        #[test]
        fn index_round_trips(procedures in proptest::collection::vec("[a-z.]{1,40}", 0..10)) {
            let ix = ServiceIndex { procedures };
            let bytes = ix.encode().unwrap();
            prop_assert_eq!(ServiceIndex::decode(&bytes).unwrap(), ix);
        }

        #[test]
        fn record_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Advertisement::decode(&bytes);
            let _ = ServiceIndex::decode(&bytes);
        }
    }
}
