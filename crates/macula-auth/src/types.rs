//! What grants and revocation lists share: keys, subjects, serials, and a
//! body as signed.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use macula_wire::NodeId;
use serde::{Deserialize, Serialize};

/// A key's text does not parse, or its bytes are not an Ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid Ed25519 public key")]
pub struct BadKey;

/// An Ed25519 public key: a realm authority's or a signer's. Its text form
/// is the same lowercase base32 as a node ID's.
/// On the wire it is 32 bytes (MessagePack bin), as a node ID is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        NodeId::from_bytes(self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        NodeId::deserialize(d).map(|id| Key(*id.as_bytes()))
    }
}

impl Key {
    pub fn of(signing: &SigningKey) -> Key {
        Key(signing.verifying_key().to_bytes())
    }

    pub(crate) fn verifying(&self) -> Result<VerifyingKey, BadKey> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| BadKey)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        NodeId::from_bytes(self.0).fmt(f)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

impl FromStr for Key {
    type Err = BadKey;
    fn from_str(s: &str) -> Result<Key, BadKey> {
        let id = NodeId::from_str(s).map_err(|_| BadKey)?;
        Ok(Key(*id.as_bytes()))
    }
}

/// Who a grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// A full node, by node ID.
    Node(NodeId),
    /// A lightweight client, by its key.
    Client(Key),
    /// A signing key the authority delegates to.
    Signer(Key),
}

impl Subject {
    /// The text `{{subject}}` stands for in rules: the ID or key.
    pub fn id(&self) -> String {
        match self {
            Subject::Node(n) => n.to_string(),
            Subject::Client(k) | Subject::Signer(k) => k.to_string(),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Node(n) => write!(f, "node {n}"),
            Subject::Client(k) => write!(f, "client {k}"),
            Subject::Signer(k) => write!(f, "signer {k}"),
        }
    }
}

/// A grant's serial number, unique per authority (random at issue).
pub type GrantId = [u8; 16];

/// A body as signed: the exact bytes and the signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Signed {
    /// `body` signed by `key` under the domain tag `domain`.
    pub(crate) fn sign(domain: &[u8], body: Vec<u8>, key: &SigningKey) -> Signed {
        let signature = key.sign(&domain_message(domain, &body)).to_bytes().to_vec();
        Signed { body, signature }
    }

    /// Whether the signature verifies for `key` over `domain || body` (the
    /// bytes as received); an error when `key` is no Ed25519 key.
    pub(crate) fn verifies(&self, domain: &[u8], key: &Key) -> Result<bool, BadKey> {
        let key = key.verifying()?;
        Ok(Signature::from_slice(&self.signature).is_ok_and(|sig| {
            key.verify(&domain_message(domain, &self.body), &sig)
                .is_ok()
        }))
    }
}

fn domain_message(domain: &[u8], body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(domain.len() + body.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(body);
    msg
}
