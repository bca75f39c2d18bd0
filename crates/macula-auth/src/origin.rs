//! Proved callers (docs/PROTOCOL.md §5.4, "Proved callers"): a client
//! signs each call it makes; the nodes forwarding it (its gateway, a
//! gateway calling on to its own client) pass the signature on, and the
//! provider verifies it, so a handler knows who really called, not only
//! which node handed the call over. Pure: no clock, no I/O.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use macula_wire::rpc::{call_digest, CallOrigin};
use macula_wire::NodeId;

/// Domain tag in front of the call digest in what is signed.
const SIGN_TAG: &[u8] = b"macula call origin v1";

fn message(procedure: &str, payload: &[u8], headers: &[(String, String)]) -> [u8; 53] {
    let mut msg = [0u8; SIGN_TAG.len() + 32];
    msg[..SIGN_TAG.len()].copy_from_slice(SIGN_TAG);
    msg[SIGN_TAG.len()..].copy_from_slice(&call_digest(procedure, payload, headers));
    msg
}

/// The origin a caller holding `key` puts on its call.
pub fn sign_call(
    key: &SigningKey,
    procedure: &str,
    payload: &[u8],
    headers: &[(String, String)],
) -> CallOrigin {
    CallOrigin {
        key: key.verifying_key().to_bytes().to_vec(),
        sig: key
            .sign(&message(procedure, payload, headers))
            .to_bytes()
            .to_vec(),
    }
}

/// Why a call's origin does not prove its caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    #[error("the call's origin key is not an Ed25519 key")]
    BadKey,
    #[error("the call's origin signature does not verify")]
    BadSignature,
}

impl OriginError {
    /// A short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            OriginError::BadKey => "bad_key",
            OriginError::BadSignature => "bad_signature",
        }
    }
}

/// The node ID of the caller that signed `origin` over this call.
pub fn verify_call(
    origin: &CallOrigin,
    procedure: &str,
    payload: &[u8],
    headers: &[(String, String)],
) -> Result<NodeId, OriginError> {
    let key: [u8; 32] = origin
        .key
        .as_slice()
        .try_into()
        .map_err(|_| OriginError::BadKey)?;
    let sig: [u8; 64] = origin
        .sig
        .as_slice()
        .try_into()
        .map_err(|_| OriginError::BadSignature)?;
    let vk = VerifyingKey::from_bytes(&key).map_err(|_| OriginError::BadKey)?;
    vk.verify(
        &message(procedure, payload, headers),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| OriginError::BadSignature)?;
    Ok(NodeId::from_public_key(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_call_proves_its_caller_and_nothing_else() {
        let k = SigningKey::from_bytes(&[5; 32]);
        let h = vec![
            ("traceparent".to_string(), "00-a".to_string()),
            ("k".to_string(), "v".to_string()),
        ];
        let o = sign_call(&k, "svc.x", b"hi", &h);
        let me = NodeId::from_public_key(k.verifying_key().as_bytes());
        assert_eq!(verify_call(&o, "svc.x", b"hi", &h), Ok(me));
        // A forwarding node's new trace context does not matter.
        let mut h2 = h.clone();
        h2[0].1 = "00-b".into();
        assert_eq!(verify_call(&o, "svc.x", b"hi", &h2), Ok(me));
        // Anything the caller said does.
        assert!(verify_call(&o, "svc.y", b"hi", &h).is_err());
        assert!(verify_call(&o, "svc.x", b"ho", &h).is_err());
        let mut h3 = h.clone();
        h3[1].1 = "w".into();
        assert!(verify_call(&o, "svc.x", b"hi", &h3).is_err());
        // Another key with the same signature.
        let other = SigningKey::from_bytes(&[6; 32]);
        let forged = CallOrigin {
            key: other.verifying_key().to_bytes().to_vec(),
            ..o.clone()
        };
        assert_eq!(
            verify_call(&forged, "svc.x", b"hi", &h),
            Err(OriginError::BadSignature)
        );
        let short = CallOrigin {
            key: vec![1; 31],
            ..o
        };
        assert_eq!(
            verify_call(&short, "svc.x", b"hi", &h),
            Err(OriginError::BadKey)
        );
    }
}
