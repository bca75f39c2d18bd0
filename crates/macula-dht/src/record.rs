//! Records: the signed values the DHT stores, the errors that refuse them, and
//! the injected signature check.
//!
//! Crypto lives in another crate, so this module only defines what is signed
//! ([`Record::signed_bytes`]) and the [`RecordAuth`] trait the caller implements;
//! it must not depend on any key type or signature scheme.

use macula_wire::NodeId;

use crate::config::Config;
use crate::Millis;

/// Domain separation: a record signature can never be replayed as a signature
/// over anything else the node signs.
const SIGNING_CONTEXT: &[u8] = b"macula dht record v1\0";

/// A value stored under a key, as published by one node.
///
/// A key may hold one record per publisher (a service key collects one record
/// per provider); a newer `seq` from the same publisher replaces the older one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where it lives in the keyspace.
    pub key: NodeId,
    /// The node that published (and signed) it.
    pub publisher: NodeId,
    /// Publisher's version: higher replaces lower, lower is refused as stale.
    pub seq: u64,
    /// Lifetime granted by the publisher, counted from each store.
    pub ttl: Millis,
    /// Opaque payload.
    pub value: Vec<u8>,
    /// Opaque signature over [`Record::signed_bytes`], checked by [`RecordAuth`]
    /// (it may carry the publisher's public key, from which the node ID derives).
    pub signature: Vec<u8>,
}

impl Record {
    /// The bytes the publisher signs: everything but the signature, so a
    /// relaying node cannot change key, value, version or lifetime.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + 32 + 32 + 24 + self.value.len());
        out.extend_from_slice(SIGNING_CONTEXT);
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(self.publisher.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.ttl.0.to_be_bytes());
        out.extend_from_slice(&(self.value.len() as u64).to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    /// Checks the size and lifetime limits (cheap, done before the signature).
    pub fn check_limits(&self, config: &Config) -> Result<(), RecordError> {
        if self.value.len() > config.max_value_len {
            return Err(RecordError::ValueTooLarge {
                len: self.value.len(),
                max: config.max_value_len,
            });
        }
        if self.signature.len() > config.max_signature_len {
            return Err(RecordError::SignatureTooLarge {
                len: self.signature.len(),
                max: config.max_signature_len,
            });
        }
        if self.ttl == Millis::ZERO {
            return Err(RecordError::TtlZero);
        }
        if self.ttl > config.max_ttl {
            return Err(RecordError::TtlTooLong {
                ttl: self.ttl,
                max: config.max_ttl,
            });
        }
        Ok(())
    }
}

/// Signs this node's records and verifies everyone else's. Supplied by the caller
/// because the keys and the signature scheme belong to the identity crate.
pub trait RecordAuth {
    /// Signs `msg` (a record's [`Record::signed_bytes`]) with this node's key.
    fn sign(&self, msg: &[u8]) -> Vec<u8>;
    /// True iff `signature` proves that `publisher` signed `msg`.
    fn verify(&self, publisher: &NodeId, msg: &[u8], signature: &[u8]) -> bool;
}

/// Signs nothing and accepts everything. For the simulator and tests only: with
/// it any node can forge any record.
#[derive(Clone, Copy, Debug, Default)]
pub struct InsecureNoAuth;

impl RecordAuth for InsecureNoAuth {
    fn sign(&self, _msg: &[u8]) -> Vec<u8> {
        Vec::new()
    }

    fn verify(&self, _publisher: &NodeId, _msg: &[u8], _signature: &[u8]) -> bool {
        true
    }
}

/// Why a record was refused (by us, or by a peer in [`crate::Response::StoreRejected`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The value exceeds `Config::max_value_len`.
    #[error("record value is {len} bytes, the limit is {max}")]
    ValueTooLarge {
        /// Offered length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The signature field exceeds `Config::max_signature_len`.
    #[error("record signature is {len} bytes, the limit is {max}")]
    SignatureTooLarge {
        /// Offered length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A record must expire; zero TTL (or nothing left of it) is refused.
    #[error("record TTL is zero")]
    TtlZero,
    /// The TTL exceeds `Config::max_ttl`.
    #[error("record TTL {ttl} exceeds the limit of {max}")]
    TtlTooLong {
        /// Offered TTL.
        ttl: Millis,
        /// Limit.
        max: Millis,
    },
    /// The signature does not prove the publisher signed the record.
    #[error("record signature does not verify for its publisher")]
    BadSignature,
    /// A newer version from the same publisher is already stored.
    #[error("record seq {offered} is older than the stored seq {stored}")]
    Stale {
        /// Offered seq.
        offered: u64,
        /// Stored seq.
        stored: u64,
    },
    /// The publisher already has `Config::max_records_per_publisher` records here.
    #[error("publisher already has {max} records on this node")]
    PublisherFull {
        /// Limit.
        max: usize,
    },
    /// The node already stores `Config::max_records` records.
    #[error("node store is full ({max} records)")]
    StoreFull {
        /// Limit.
        max: usize,
    },
}
