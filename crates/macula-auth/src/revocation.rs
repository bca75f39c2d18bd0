//! Revocation lists: which grants (by serial) and which principals (by
//! subject, signers included) a realm's authority has withdrawn.
//!
//! A list is versioned and signed by the authority like a grant (its own
//! domain tag, [`REVOCATION_DOMAIN`]); a node keeps the highest version it
//! has verified and passes it on, so a list spreads through the mesh
//! without anyone calling home. A list is whole (each version names
//! everything revoked), so the newest one is all a node needs; revoking a
//! signer revokes every grant it signed.

use std::collections::HashSet;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::types::{GrantId, Key, Signed, Subject};

/// Prefix of the signed bytes of a revocation list.
pub const REVOCATION_DOMAIN: &[u8] = b"macula revocations v1\0";
/// Most entries (serials and subjects together) in one list.
pub const MAX_REVOKED: usize = 100_000;
/// Largest encoded list.
pub const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;

/// What a revocation list says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    pub realm: Key,
    /// Higher replaces lower.
    pub version: u64,
    /// Unix milliseconds.
    pub issued_ms: u64,
    pub grants: Vec<GrantId>,
    pub subjects: Vec<Subject>,
}

/// A signed revocation list, as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList(pub Signed);

/// Why a revocation list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("the revocation list does not decode: {0}")]
    Decode(String),
    #[error("the revocation list is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("the revocation list is for realm {found}, not {expected}")]
    WrongRealm { found: Key, expected: Key },
    #[error("the revocation list's signature does not verify")]
    BadSignature,
    #[error("the revocation list names {n} entries, over the limit of {max}")]
    TooManyEntries { n: usize, max: usize },
}

impl RevocationList {
    /// Signs `body` with the realm authority's key.
    pub fn sign(
        body: &RevocationBody,
        authority: &SigningKey,
    ) -> Result<RevocationList, RevocationError> {
        let bytes =
            rmp_serde::to_vec_named(body).map_err(|e| RevocationError::Decode(e.to_string()))?;
        Ok(RevocationList(Signed::sign(
            REVOCATION_DOMAIN,
            bytes,
            authority,
        )))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, RevocationError> {
        rmp_serde::to_vec_named(self).map_err(|e| RevocationError::Decode(e.to_string()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<RevocationList, RevocationError> {
        if bytes.len() > MAX_LIST_BYTES {
            return Err(RevocationError::TooLarge {
                len: bytes.len(),
                max: MAX_LIST_BYTES,
            });
        }
        rmp_serde::from_slice(bytes).map_err(|e| RevocationError::Decode(e.to_string()))
    }

    /// The body, decoded but not verified (to re-sign a new version).
    pub fn body(&self) -> Result<RevocationBody, RevocationError> {
        rmp_serde::from_slice(&self.0.body).map_err(|e| RevocationError::Decode(e.to_string()))
    }

    /// Checks the list for `realm` and returns what it revokes.
    pub fn verify(&self, realm: &Key) -> Result<Revocations, RevocationError> {
        let body: RevocationBody = rmp_serde::from_slice(&self.0.body)
            .map_err(|e| RevocationError::Decode(e.to_string()))?;
        if body.realm != *realm {
            return Err(RevocationError::WrongRealm {
                found: body.realm,
                expected: *realm,
            });
        }
        let n = body.grants.len() + body.subjects.len();
        if n > MAX_REVOKED {
            return Err(RevocationError::TooManyEntries {
                n,
                max: MAX_REVOKED,
            });
        }
        if !self.0.verifies(REVOCATION_DOMAIN, realm).unwrap_or(false) {
            return Err(RevocationError::BadSignature);
        }
        Ok(Revocations {
            version: body.version,
            issued_ms: body.issued_ms,
            grants: body.grants.into_iter().collect(),
            subjects: body.subjects.into_iter().collect(),
        })
    }
}

/// A verified list, ready for lookups. The default revokes nothing
/// (version 0: any signed list replaces it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    pub version: u64,
    pub issued_ms: u64,
    grants: HashSet<GrantId>,
    subjects: HashSet<Subject>,
}

impl Revocations {
    /// Whether the grant with serial `id` is revoked.
    pub fn revokes_grant(&self, id: &GrantId) -> bool {
        self.grants.contains(id)
    }

    /// Whether `subject` itself is revoked (to disconnect it at once).
    pub fn revokes(&self, subject: &Subject) -> bool {
        self.subjects.contains(subject)
    }

    /// Whether this list revokes a grant that verified earlier (against an
    /// older list): its serial, its subject, or its signer's.
    pub fn revokes_verified(&self, v: &crate::Verified) -> bool {
        std::iter::once(&v.body)
            .chain(v.signer.as_ref())
            .any(|b| self.revokes_grant(&b.id) || self.revokes(&b.subject))
    }

    pub fn len(&self) -> usize {
        self.grants.len() + self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `other` should replace this one (a higher version).
    pub fn is_older_than(&self, other: &Revocations) -> bool {
        other.version > self.version
    }
}

/// Decodes arbitrary bytes as a revocation list and verifies it against a
/// fixed realm: what the fuzz target `revocations` drives.
#[doc(hidden)]
pub fn fuzz_revocations(data: &[u8]) {
    if let Ok(l) = RevocationList::from_bytes(data) {
        let _ = l.verify(&Key([7; 32]));
        let _ = l.to_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::tests::key;

    #[test]
    fn limits_hold_at_their_bounds_and_sizes_count_both_kinds() {
        assert_eq!((MAX_LIST_BYTES, MAX_REVOKED), (8 * 1024 * 1024, 100_000));
        let too_large = |n: usize| {
            matches!(
                RevocationList::from_bytes(&vec![0xc1; n]),
                Err(RevocationError::TooLarge { .. })
            )
        };
        assert!(!too_large(MAX_LIST_BYTES));
        assert!(too_large(MAX_LIST_BYTES + 1));
        let auth = key(1);
        let realm = Key::of(&auth);
        let list = |grants: Vec<GrantId>, subjects: Vec<crate::Subject>| {
            RevocationList::sign(
                &RevocationBody {
                    realm,
                    version: 1,
                    issued_ms: 0,
                    grants,
                    subjects,
                },
                &auth,
            )
            .expect("sign")
            .verify(&realm)
        };
        let at_bound = list(
            vec![[0; 16]; MAX_REVOKED - 1],
            vec![crate::Subject::Client(realm)],
        );
        assert!(at_bound.is_ok(), "exactly {MAX_REVOKED} entries");
        let r = list(vec![[1; 16]], vec![crate::Subject::Client(realm)]).expect("verify");
        assert_eq!(r.len(), 2);
        assert!(!r.is_empty());
        assert!(Revocations::default().is_empty());
        assert_eq!(Revocations::default().len(), 0);
    }

    #[test]
    fn a_verified_grant_is_revoked_by_serial_subject_or_signer() {
        use crate::grant::tests::body;
        use crate::{sign, Grant, Subject};
        let auth = key(1);
        let realm = Key::of(&auth);
        let signer = key(3);
        let subject = Subject::Client(Key::of(&key(4)));
        let mut delegation = body(
            &auth,
            &auth,
            Subject::Signer(Key::of(&signer)),
            "allow publish **",
        );
        delegation.id = [1; 16];
        let signer_grant = sign(&delegation, &auth).expect("sign");
        let mut mine = body(&auth, &signer, subject, "allow publish a.*");
        mine.id = [2; 16];
        let g = Grant {
            grant: sign(&mine, &signer).expect("sign"),
            signer: Some(signer_grant.clone()),
        };
        let v = g
            .verify(&realm, 5_000, 0, &Revocations::default())
            .expect("verify");
        let signer_body = v.signer.clone().expect("signer");
        let list = |grants: Vec<GrantId>, subjects: Vec<Subject>| Revocations {
            version: 1,
            issued_ms: 0,
            grants: grants.into_iter().collect(),
            subjects: subjects.into_iter().collect(),
        };
        assert!(!list(vec![[9; 16]], vec![]).revokes_verified(&v));
        assert!(list(vec![mine.id], vec![]).revokes_verified(&v));
        assert!(list(vec![], vec![subject]).revokes_verified(&v));
        assert!(list(vec![signer_body.id], vec![]).revokes_verified(&v));
        assert!(list(vec![], vec![Subject::Signer(Key::of(&signer))]).revokes_verified(&v));
    }

    #[test]
    fn lists_verify_only_for_their_realm_and_key() {
        let auth = key(1);
        let realm = Key::of(&auth);
        let body = RevocationBody {
            realm,
            version: 2,
            issued_ms: 9,
            grants: vec![[1; 16]],
            subjects: vec![],
        };
        let list = RevocationList::sign(&body, &auth).expect("sign");
        let bytes = list.to_bytes().expect("encode");
        let r = RevocationList::from_bytes(&bytes)
            .expect("decode")
            .verify(&realm)
            .expect("verify");
        assert_eq!((r.version, r.len()), (2, 1));
        assert!(Revocations::default().is_older_than(&r));
        assert!(!r.is_older_than(&r));
        // Signed by another key, or for another realm.
        let forged = RevocationList::sign(&body, &key(2)).expect("sign");
        assert_eq!(forged.verify(&realm), Err(RevocationError::BadSignature));
        let theirs = RevocationList::sign(
            &RevocationBody {
                realm: Key::of(&key(2)),
                ..body.clone()
            },
            &key(2),
        )
        .expect("sign");
        assert!(matches!(
            theirs.verify(&realm),
            Err(RevocationError::WrongRealm { .. })
        ));
        // Too many entries.
        let big = RevocationList::sign(
            &RevocationBody {
                grants: vec![[0; 16]; MAX_REVOKED + 1],
                ..body
            },
            &auth,
        )
        .expect("sign");
        assert!(matches!(
            big.verify(&realm),
            Err(RevocationError::TooManyEntries { .. })
        ));
        assert!(RevocationList::from_bytes(&[0x90]).is_err());
    }
}
