//! Real record signatures: Ed25519 over [`Record::signed_bytes`], with the
//! publisher's public key carried in the signature field so that anyone can
//! check that the key derives the publisher's node ID.
//!
//! Pure (no I/O, no clock): the runtime builds an [`Ed25519Auth`] from the
//! node's identity key, and the simulator from a key it derives from its seed,
//! so both run exactly the same signing and verification code. Keys are never
//! generated here.
//!
//! [`Record::signed_bytes`]: crate::Record::signed_bytes

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use macula_wire::NodeId;

use crate::record::RecordAuth;

/// Size of a record's signature field: the Ed25519 public key (32 bytes)
/// followed by the signature (64 bytes).
pub const SIGNATURE_LEN: usize = 32 + 64;

/// Signs records with one node's Ed25519 key; verifies anyone's.
///
/// The secret key is zeroized on drop (ed25519-dalek's `zeroize` feature) and
/// never printed by `Debug`.
pub struct Ed25519Auth {
    key: SigningKey,
    public: [u8; 32],
}

impl std::fmt::Debug for Ed25519Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ed25519Auth")
            .field("node_id", &format_args!("{}", self.node_id()))
            .finish_non_exhaustive()
    }
}

impl Ed25519Auth {
    /// Signs with `key` (the node's identity key).
    pub fn new(key: SigningKey) -> Ed25519Auth {
        let public = key.verifying_key().to_bytes();
        Ed25519Auth { key, public }
    }

    /// The node ID this key signs for.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_public_key(&self.public)
    }
}

impl RecordAuth for Ed25519Auth {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNATURE_LEN);
        out.extend_from_slice(&self.public);
        out.extend_from_slice(&self.key.sign(msg).to_bytes());
        out
    }

    fn verify(&self, publisher: &NodeId, msg: &[u8], signature: &[u8]) -> bool {
        verify_record_signature(publisher, msg, signature)
    }
}

/// True iff `signature` (public key + Ed25519 signature, [`SIGNATURE_LEN`]
/// bytes) holds a key whose node ID is `publisher` and a valid signature of
/// `msg` by that key. Strict verification: no malleable or small-order
/// signatures.
pub fn verify_record_signature(publisher: &NodeId, msg: &[u8], signature: &[u8]) -> bool {
    if signature.len() != SIGNATURE_LEN {
        return false;
    }
    let Some((pk, sig)) = signature.split_first_chunk::<32>() else {
        return false;
    };
    let Ok(sig) = <&[u8; 64]>::try_from(sig) else {
        return false;
    };
    if NodeId::from_public_key(pk) != *publisher {
        return false;
    }
    let Ok(key) = VerifyingKey::from_bytes(pk) else {
        return false;
    };
    key.verify_strict(msg, &Signature::from_bytes(sig)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(n: u8) -> Ed25519Auth {
        Ed25519Auth::new(SigningKey::from_bytes(&[n; 32]))
    }

    #[test]
    fn record_signatures_verify_and_bind_the_publisher() {
        let a = auth(1);
        let sig = a.sign(b"hello");
        assert_eq!(sig.len(), SIGNATURE_LEN);
        assert!(a.verify(&a.node_id(), b"hello", &sig));
        assert!(!a.verify(&a.node_id(), b"hellp", &sig));
        let other = auth(2);
        assert!(
            !a.verify(&other.node_id(), b"hello", &sig),
            "wrong publisher"
        );
        // Another node's verifier agrees (verification needs no secret).
        assert!(other.verify(&a.node_id(), b"hello", &sig));
        assert!(!a.verify(&a.node_id(), b"hello", &sig[..95]));
        let mut longer = sig.clone();
        longer.push(0);
        assert!(!a.verify(&a.node_id(), b"hello", &longer));
        assert!(!a.verify(&a.node_id(), b"hello", &[]));
        // A flipped bit anywhere (key or signature) fails.
        for i in [0, 31, 32, 95] {
            let mut bad = sig.clone();
            bad[i] ^= 1;
            assert!(!a.verify(&a.node_id(), b"hello", &bad), "bit flip at {i}");
        }
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let text = format!("{:?}", auth(3));
        assert!(text.contains("node_id"));
        assert!(!text.contains("key"));
    }
}
