//! Node identifiers: 32-byte BLAKE3 hashes of a node's Ed25519 public key.
//!
//! The text form is lowercase RFC 4648 base32 without padding (52 characters),
//! which is stable, case-insensitive on input and fits in one DNS label.
//! This module must not know how keys are stored or proved; it only derives.

use std::fmt;
use std::str::FromStr;

/// Length of a node ID in bytes.
pub const NODE_ID_LEN: usize = 32;
/// Length of a node ID's text form.
pub const NODE_ID_TEXT_LEN: usize = 52;

/// BLAKE3 `derive_key` context: a node ID is never a bare hash of the key, so it
/// cannot be confused with any other BLAKE3 hash of the same 32 bytes.
const NODE_ID_CONTEXT: &str = "macula 2026-11 node-id v1";

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A node's identity on the mesh: `BLAKE3-derive_key(ctx, ed25519_public_key)`.
///
/// Also used as a 256-bit key in the DHT keyspace.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; NODE_ID_LEN]);

impl NodeId {
    /// Derives the node ID that belongs to an Ed25519 public key.
    pub fn from_public_key(public_key: &[u8; 32]) -> Self {
        NodeId(blake3::derive_key(NODE_ID_CONTEXT, public_key))
    }

    /// Wraps raw bytes (for DHT keys and tests; identities come from keys).
    pub const fn from_bytes(bytes: [u8; NODE_ID_LEN]) -> Self {
        NodeId(bytes)
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }

    /// XOR distance to another ID (Kademlia metric), as big-endian bytes.
    pub fn distance(&self, other: &NodeId) -> [u8; NODE_ID_LEN] {
        let mut out = [0u8; NODE_ID_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.0[i] ^ other.0[i];
        }
        out
    }

    /// The first 8 characters of the text form, for logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; NODE_ID_TEXT_LEN];
        let mut acc: u32 = 0;
        let mut bits = 0u32;
        let mut n = 0;
        for &b in &self.0 {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out[n] = ALPHABET[((acc >> bits) & 31) as usize];
                n += 1;
            }
        }
        if bits > 0 {
            out[n] = ALPHABET[((acc << (5 - bits)) & 31) as usize];
            n += 1;
        }
        debug_assert_eq!(n, NODE_ID_TEXT_LEN);
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&out[..n]).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// Why a string is not a node ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseNodeIdError {
    #[error("a node ID has {NODE_ID_TEXT_LEN} characters, got {0}")]
    Length(usize),
    #[error("invalid character {0:?} in node ID (expected base32: a-z, 2-7)")]
    Character(char),
    #[error("node ID has non-zero trailing bits")]
    TrailingBits,
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != NODE_ID_TEXT_LEN {
            return Err(ParseNodeIdError::Length(s.chars().count()));
        }
        let mut out = [0u8; NODE_ID_LEN];
        let mut acc: u32 = 0;
        let mut bits = 0u32;
        let mut n = 0;
        for c in s.chars() {
            let v = match c.to_ascii_lowercase() {
                c @ 'a'..='z' => c as u32 - 'a' as u32,
                c @ '2'..='7' => c as u32 - '2' as u32 + 26,
                _ => return Err(ParseNodeIdError::Character(c)),
            };
            acc = (acc << 5) | v;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                if n < NODE_ID_LEN {
                    out[n] = (acc >> bits) as u8;
                }
                n += 1;
            }
        }
        // 52 * 5 = 260 bits: 32 bytes plus 4 padding bits that must be zero.
        if acc & ((1 << bits) - 1) != 0 {
            return Err(ParseNodeIdError::TrailingBits);
        }
        Ok(NodeId(out))
    }
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = NodeId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<NodeId, E> {
                let arr: [u8; NODE_ID_LEN] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(NodeId(arr))
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<NodeId, E> {
                self.visit_bytes(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn derivation_is_stable() {
        let a = NodeId::from_public_key(&[7u8; 32]);
        let b = NodeId::from_public_key(&[7u8; 32]);
        assert_eq!(a, b);
        assert_ne!(a, NodeId::from_public_key(&[8u8; 32]));
        assert_eq!(a.to_string().len(), NODE_ID_TEXT_LEN);
    }

    #[test]
    fn rejects_bad_text() {
        assert_eq!("abc".parse::<NodeId>(), Err(ParseNodeIdError::Length(3)));
        let bad = "1".repeat(NODE_ID_TEXT_LEN);
        assert_eq!(bad.parse::<NodeId>(), Err(ParseNodeIdError::Character('1')));
        // Last char 'b' sets a padding bit.
        let mut s = "a".repeat(NODE_ID_TEXT_LEN - 1);
        s.push('b');
        assert_eq!(s.parse::<NodeId>(), Err(ParseNodeIdError::TrailingBits));
    }

    proptest! {
        #[test]
        fn text_round_trip(bytes in any::<[u8; 32]>()) {
            let id = NodeId::from_bytes(bytes);
            let text = id.to_string();
            prop_assert_eq!(text.parse::<NodeId>().unwrap(), id);
            prop_assert_eq!(text.to_uppercase().parse::<NodeId>().unwrap(), id);
        }

        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = s.parse::<NodeId>();
        }

        #[test]
        fn msgpack_round_trip(bytes in any::<[u8; 32]>()) {
            let id = NodeId::from_bytes(bytes);
            let enc = rmp_serde::to_vec(&id).unwrap();
            prop_assert_eq!(enc.len(), 34);
            prop_assert_eq!(rmp_serde::from_slice::<NodeId>(&enc).unwrap(), id);
        }
    }
}
