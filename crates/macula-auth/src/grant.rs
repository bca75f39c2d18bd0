//! Grants: what a realm's authority lets one principal do, signed, checked
//! offline by every node.
//!
//! A realm with an authority is identified by the authority's Ed25519
//! public key ([`Key`]). A [`Grant`] is a [`GrantBody`] (realm, issuer,
//! serial, subject, rules, roles, validity) encoded once as MessagePack and
//! signed as those exact bytes, prefixed by a domain tag
//! ([`GRANT_DOMAIN`]), so nothing is ever re-encoded to be checked. The
//! issuer is the authority itself, or a **signer**: a key the authority
//! gave a grant whose subject is that key ([`Subject::Signer`]); such a
//! grant travels with the signer's grant, and what it allows is limited to
//! the signer's rules (one level of delegation: a signer cannot make
//! signers).
//!
//! [`Grant::verify`] checks, in order: the encoding, the realm, the
//! signatures, the validity window (with a clock skew allowance), and the
//! revocation list; each refusal is a named [`GrantError`].

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::policy::{Decision, Policy, PolicyError, Request, Rule, MAX_RULES};
use crate::revocation::Revocations;
pub use crate::types::{GrantId, Key, Signed, Subject};

/// Prefix of the signed bytes of a grant.
pub const GRANT_DOMAIN: &[u8] = b"macula grant v1\0";
/// Largest encoded grant (body, signature and signer's grant).
pub const MAX_GRANT_BYTES: usize = 64 * 1024;
/// Most roles in one grant, and longest role name.
pub const MAX_ROLES: usize = 64;
pub const MAX_ROLE_LEN: usize = 64;

/// What a grant says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantBody {
    /// The realm authority's key.
    pub realm: Key,
    /// Who signed this body: the authority, or a signer.
    pub issuer: Key,
    pub id: GrantId,
    pub subject: Subject,
    pub rules: Vec<Rule>,
    /// Labels, for people and audit (rules decide).
    pub roles: Vec<String>,
    /// Unix milliseconds.
    pub not_before_ms: u64,
    pub expires_ms: u64,
}

/// A grant as it travels: the principal's signed body, and the signer's
/// grant when the issuer is not the authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub grant: Signed,
    pub signer: Option<Signed>,
}

/// Why a grant was refused. [`GrantError::kind`] names each for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the grant does not decode: {0}")]
    Decode(String),
    #[error("the grant is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("the grant is for realm {found}, not {expected}")]
    WrongRealm { found: Key, expected: Key },
    #[error("not a valid Ed25519 public key")]
    BadKey,
    #[error("the grant's signature does not verify")]
    BadSignature,
    #[error("the grant is signed by {issuer}, which is neither the realm authority nor the signer whose grant came with it")]
    UnknownIssuer { issuer: Key },
    #[error("the signer's grant is not for a signer (it is for {0})")]
    NotASigner(Subject),
    #[error("a signer's grant must come from the realm authority itself")]
    ChainTooDeep,
    #[error("the grant is not valid before {not_before_ms} (unix ms); now is {now_ms}")]
    NotYetValid { not_before_ms: u64, now_ms: u64 },
    #[error("the grant expired at {expires_ms} (unix ms); now is {now_ms}")]
    Expired { expires_ms: u64, now_ms: u64 },
    #[error("the grant was revoked (list version {version})")]
    Revoked { version: u64 },
    #[error("the grant is for {found}, but was presented by {presented}")]
    WrongSubject { found: Subject, presented: Subject },
    #[error("bad rule in the grant: {0}")]
    Rule(#[from] PolicyError),
    #[error("{n} roles or a role name over {max_len} bytes (at most {max})")]
    Roles {
        n: usize,
        max: usize,
        max_len: usize,
    },
}

impl GrantError {
    /// A short name, for metrics and the audit log.
    pub fn kind(&self) -> &'static str {
        match self {
            GrantError::Decode(_) | GrantError::TooLarge { .. } => "malformed",
            GrantError::WrongRealm { .. } => "wrong_realm",
            GrantError::BadKey | GrantError::BadSignature => "bad_signature",
            GrantError::UnknownIssuer { .. }
            | GrantError::NotASigner(_)
            | GrantError::ChainTooDeep => "bad_issuer",
            GrantError::NotYetValid { .. } => "not_yet_valid",
            GrantError::Expired { .. } => "expired",
            GrantError::Revoked { .. } => "revoked",
            GrantError::WrongSubject { .. } => "wrong_subject",
            GrantError::Rule(_) | GrantError::Roles { .. } => "bad_rule",
        }
    }
}

fn decode_body(signed: &Signed) -> Result<GrantBody, GrantError> {
    rmp_serde::from_slice(&signed.body).map_err(|e| GrantError::Decode(e.to_string()))
}

fn check_signature(signed: &Signed, key: &Key) -> Result<(), GrantError> {
    match signed.verifies(GRANT_DOMAIN, key) {
        Ok(true) => Ok(()),
        Ok(false) => Err(GrantError::BadSignature),
        Err(_) => Err(GrantError::BadKey),
    }
}

/// Signs `body` with `key` (which must be `body.issuer`'s).
pub fn sign(body: &GrantBody, key: &SigningKey) -> Result<Signed, GrantError> {
    let bytes = rmp_serde::to_vec_named(body).map_err(|e| GrantError::Decode(e.to_string()))?;
    Ok(Signed::sign(GRANT_DOMAIN, bytes, key))
}

/// A grant that verified: who it is for and what it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub body: GrantBody,
    /// The signer's grant, when the issuer was a signer.
    pub signer: Option<GrantBody>,
}

impl Verified {
    pub fn subject(&self) -> Subject {
        self.body.subject
    }

    /// When this grant (or its signer's, if sooner) stops being valid.
    pub fn expires_ms(&self) -> u64 {
        self.signer.as_ref().map_or(self.body.expires_ms, |s| {
            s.expires_ms.min(self.body.expires_ms)
        })
    }

    /// Whether this grant (and its signer's) is valid at `now_ms`, allowing
    /// `skew_ms` at both ends: for a grant verified earlier.
    pub fn check_time(&self, now_ms: u64, skew_ms: u64) -> Result<(), GrantError> {
        if let Some(s) = &self.signer {
            check_time(s, now_ms, skew_ms)?;
        }
        check_time(&self.body, now_ms, skew_ms)
    }

    /// This grant's rules (and, for a signer's grant, the signer's scope)
    /// compiled for its subject.
    pub fn policy(&self) -> Policy {
        let subject = self.body.subject.id();
        match &self.signer {
            None => Policy::new(&[&self.body.rules], &subject),
            Some(s) => Policy::new(&[&self.body.rules, &s.rules], &subject),
        }
    }

    /// The decision for `req`: allowed by this grant's rules and, for a
    /// signer's grant, within the signer's rules too. Compiles the rules:
    /// hold [`Verified::policy`] to decide many requests.
    pub fn decide(&self, req: &Request) -> Decision {
        self.policy().decide(req)
    }
}

impl Grant {
    /// Encodes this grant (MessagePack, named).
    pub fn to_bytes(&self) -> Result<Vec<u8>, GrantError> {
        rmp_serde::to_vec_named(self).map_err(|e| GrantError::Decode(e.to_string()))
    }

    /// The principal's body, decoded but not verified (for display).
    pub fn body(&self) -> Result<GrantBody, GrantError> {
        decode_body(&self.grant)
    }

    /// The grant decoded but **not verified**: what its holder (a client,
    /// which knows no authority key) may expect to be allowed, to refuse
    /// itself what its gateway would refuse anyway.
    pub fn unverified(&self) -> Result<Verified, GrantError> {
        Ok(Verified {
            body: decode_body(&self.grant)?,
            signer: self.signer.as_ref().map(decode_body).transpose()?,
        })
    }

    /// Decodes a grant, bounded by [`MAX_GRANT_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Grant, GrantError> {
        if bytes.len() > MAX_GRANT_BYTES {
            return Err(GrantError::TooLarge {
                len: bytes.len(),
                max: MAX_GRANT_BYTES,
            });
        }
        rmp_serde::from_slice(bytes).map_err(|e| GrantError::Decode(e.to_string()))
    }

    /// Checks this grant for `realm` at `now_ms` (unix ms), allowing
    /// `skew_ms` of clock difference at both ends of the validity window,
    /// against `revoked`.
    pub fn verify(
        &self,
        realm: &Key,
        now_ms: u64,
        skew_ms: u64,
        revoked: &Revocations,
    ) -> Result<Verified, GrantError> {
        let body = decode_body(&self.grant)?;
        check_body(&body, realm)?;
        let signer = match &self.signer {
            None => {
                if body.issuer != *realm {
                    return Err(GrantError::UnknownIssuer {
                        issuer: body.issuer,
                    });
                }
                check_signature(&self.grant, realm)?;
                None
            }
            Some(signed) => {
                let s = decode_body(signed)?;
                check_body(&s, realm)?;
                if s.issuer != *realm {
                    return Err(GrantError::ChainTooDeep);
                }
                check_signature(signed, realm)?;
                if s.subject != Subject::Signer(body.issuer) {
                    return match s.subject {
                        Subject::Signer(_) => Err(GrantError::UnknownIssuer {
                            issuer: body.issuer,
                        }),
                        other => Err(GrantError::NotASigner(other)),
                    };
                }
                check_signature(&self.grant, &body.issuer)?;
                check_time(&s, now_ms, skew_ms)?;
                check_revoked(revoked, &s)?;
                Some(s)
            }
        };
        if let Subject::Signer(_) = body.subject {
            // A signer's own grant admits nobody: it only signs.
            if self.signer.is_some() {
                return Err(GrantError::ChainTooDeep);
            }
        }
        check_time(&body, now_ms, skew_ms)?;
        check_revoked(revoked, &body)?;
        Ok(Verified { body, signer })
    }
}

fn check_body(body: &GrantBody, realm: &Key) -> Result<(), GrantError> {
    if body.realm != *realm {
        return Err(GrantError::WrongRealm {
            found: body.realm,
            expected: *realm,
        });
    }
    if body.rules.len() > MAX_RULES {
        return Err(GrantError::Rule(PolicyError::TooManyRules {
            n: body.rules.len(),
            max: MAX_RULES,
        }));
    }
    for r in &body.rules {
        r.check()?;
    }
    if body.roles.len() > MAX_ROLES || body.roles.iter().any(|r| r.len() > MAX_ROLE_LEN) {
        return Err(GrantError::Roles {
            n: body.roles.len(),
            max: MAX_ROLES,
            max_len: MAX_ROLE_LEN,
        });
    }
    Ok(())
}

fn check_revoked(revoked: &Revocations, body: &GrantBody) -> Result<(), GrantError> {
    if revoked.revokes_grant(&body.id) || revoked.revokes(&body.subject) {
        return Err(GrantError::Revoked {
            version: revoked.version,
        });
    }
    Ok(())
}

fn check_time(body: &GrantBody, now_ms: u64, skew_ms: u64) -> Result<(), GrantError> {
    if now_ms.saturating_add(skew_ms) < body.not_before_ms {
        return Err(GrantError::NotYetValid {
            not_before_ms: body.not_before_ms,
            now_ms,
        });
    }
    if now_ms >= body.expires_ms.saturating_add(skew_ms) {
        return Err(GrantError::Expired {
            expires_ms: body.expires_ms,
            now_ms,
        });
    }
    Ok(())
}

/// Decodes arbitrary bytes as a grant and verifies it against a fixed
/// realm: what the fuzz target `grant` drives.
#[doc(hidden)]
pub fn fuzz_grant(data: &[u8]) {
    if let Ok(g) = Grant::from_bytes(data) {
        let realm = Key([7; 32]);
        let _ = g.verify(&realm, 1_000, 0, &Revocations::default());
        let _ = g.to_bytes();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::{parse_rules, Action};
    use crate::revocation::{RevocationBody, RevocationList};

    pub(crate) fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    pub(crate) fn body(
        realm: &SigningKey,
        issuer: &SigningKey,
        subject: Subject,
        rules: &str,
    ) -> GrantBody {
        GrantBody {
            realm: Key::of(realm),
            issuer: Key::of(issuer),
            id: [subject.id().as_bytes()[0]; 16],
            subject,
            rules: parse_rules(rules).expect("rules"),
            roles: vec!["test".into()],
            not_before_ms: 1_000,
            expires_ms: 10_000,
        }
    }

    fn node(n: u8) -> Subject {
        Subject::Node(macula_wire::NodeId::from_bytes([n; 32]))
    }

    fn none() -> Revocations {
        Revocations::default()
    }

    /// Every limit holds exactly at its bound and refuses one past it.
    #[test]
    fn limits_hold_at_their_bounds() {
        assert_eq!(
            (MAX_GRANT_BYTES, MAX_RULES, MAX_ROLES, MAX_ROLE_LEN),
            (65_536, 1024, 64, 64)
        );
        let too_large = |n: usize| {
            matches!(
                Grant::from_bytes(&vec![0xc1; n]),
                Err(GrantError::TooLarge { .. })
            )
        };
        assert!(!too_large(MAX_GRANT_BYTES));
        assert!(too_large(MAX_GRANT_BYTES + 1));
        let auth = key(1);
        let realm = Key::of(&auth);
        let verify = |b: &GrantBody| {
            Grant {
                grant: sign(b, &auth).expect("sign"),
                signer: None,
            }
            .verify(&realm, 5_000, 0, &none())
        };
        let mut b = body(&auth, &auth, node(2), "allow publish a");
        b.rules = vec![b.rules[0].clone(); MAX_RULES];
        assert!(verify(&b).is_ok(), "{} rules", MAX_RULES);
        b.rules.push(b.rules[0].clone());
        assert_eq!(verify(&b).map_err(|e| e.kind()), Err("bad_rule"));
        let mut b = body(&auth, &auth, node(2), "allow publish a");
        b.roles = vec!["r".repeat(MAX_ROLE_LEN); MAX_ROLES];
        assert!(verify(&b).is_ok());
        b.roles.push("r".into());
        assert_eq!(verify(&b).map_err(|e| e.kind()), Err("bad_rule"));
        b.roles = vec!["r".repeat(MAX_ROLE_LEN + 1)];
        assert_eq!(verify(&b).map_err(|e| e.kind()), Err("bad_rule"));
    }

    /// A signer's grant ends the grants it signed no later than itself.
    #[test]
    fn a_grant_expires_with_its_signer() {
        let auth = key(1);
        let signer = key(3);
        let mut delegation = body(
            &auth,
            &auth,
            Subject::Signer(Key::of(&signer)),
            "allow publish **",
        );
        delegation.expires_ms = 7_000;
        let mine = body(&auth, &signer, node(4), "allow publish a");
        let v = Verified {
            body: mine.clone(),
            signer: Some(delegation.clone()),
        };
        assert_eq!(v.expires_ms(), 7_000);
        delegation.expires_ms = 20_000;
        let v = Verified {
            body: mine,
            signer: Some(delegation),
        };
        assert_eq!(v.expires_ms(), 10_000);
        let alone = Verified {
            body: body(&auth, &auth, node(4), "allow publish a"),
            signer: None,
        };
        assert_eq!(alone.expires_ms(), 10_000);
    }

    #[test]
    fn an_authority_grant_verifies_and_decides() {
        let auth = key(1);
        let realm = Key::of(&auth);
        let g = Grant {
            grant: sign(
                &body(&auth, &auth, node(9), "allow publish orders.*"),
                &auth,
            )
            .expect("sign"),
            signer: None,
        };
        let bytes = g.to_bytes().expect("encode");
        let g = Grant::from_bytes(&bytes).expect("decode");
        let v = g.verify(&realm, 5_000, 0, &none()).expect("verify");
        assert_eq!(v.subject(), node(9));
        let publish = |t: &str| {
            v.decide(&Request::new(Action::Publish, t).expect("req"))
                .is_allowed()
        };
        assert!(publish("orders.a"));
        assert!(!publish("payments.x"));
        assert!(!v
            .decide(&Request::new(Action::Subscribe, "orders.*").expect("req"))
            .is_allowed());
    }

    #[test]
    fn every_bad_grant_is_refused_by_name() {
        let auth = key(1);
        let realm = Key::of(&auth);
        let other = key(2);
        let good = body(&auth, &auth, node(9), "allow publish **");
        let g = |b: &GrantBody, k: &SigningKey| Grant {
            grant: sign(b, k).expect("sign"),
            signer: None,
        };
        let kind = |r: Result<Verified, GrantError>| r.expect_err("refused").kind();
        // Another realm's grant.
        let theirs = body(&other, &other, node(9), "allow publish **");
        assert_eq!(
            kind(g(&theirs, &other).verify(&realm, 5_000, 0, &none())),
            "wrong_realm"
        );
        // Forged: right body, wrong key; and a flipped byte.
        assert_eq!(
            kind(g(&good, &other).verify(&realm, 5_000, 0, &none())),
            "bad_signature"
        );
        let mut flipped = g(&good, &auth);
        let last = flipped.grant.body.len() - 1;
        flipped.grant.body[last] ^= 1;
        assert!(flipped.verify(&realm, 5_000, 0, &none()).is_err());
        // An issuer that is not the authority, without a signer's grant.
        let mut by_other = good.clone();
        by_other.issuer = Key::of(&other);
        assert_eq!(
            kind(g(&by_other, &other).verify(&realm, 5_000, 0, &none())),
            "bad_issuer"
        );
        // Time: before, after, and within the skew allowance.
        assert_eq!(
            kind(g(&good, &auth).verify(&realm, 500, 0, &none())),
            "not_yet_valid"
        );
        assert_eq!(
            kind(g(&good, &auth).verify(&realm, 10_000, 0, &none())),
            "expired"
        );
        assert!(g(&good, &auth).verify(&realm, 10_000, 1, &none()).is_ok());
        assert!(g(&good, &auth).verify(&realm, 500, 500, &none()).is_ok());
        // Revoked, by serial and by subject.
        let rev = |ids: Vec<GrantId>, subjects: Vec<Subject>| {
            RevocationList::sign(
                &RevocationBody {
                    realm,
                    version: 3,
                    issued_ms: 4_000,
                    grants: ids,
                    subjects,
                },
                &auth,
            )
            .expect("sign")
            .verify(&realm)
            .expect("verify")
        };
        assert_eq!(
            kind(g(&good, &auth).verify(&realm, 5_000, 0, &rev(vec![good.id], vec![]))),
            "revoked"
        );
        assert_eq!(
            kind(g(&good, &auth).verify(&realm, 5_000, 0, &rev(vec![], vec![node(9)]))),
            "revoked"
        );
        assert!(g(&good, &auth)
            .verify(&realm, 5_000, 0, &rev(vec![[0; 16]], vec![node(8)]))
            .is_ok());
        // Garbage.
        assert_eq!(
            Grant::from_bytes(&[0xc1]).expect_err("garbage").kind(),
            "malformed"
        );
        assert_eq!(
            Grant::from_bytes(&vec![0; MAX_GRANT_BYTES + 1])
                .expect_err("big")
                .kind(),
            "malformed"
        );
    }

    #[test]
    fn a_signer_grants_within_its_scope_only() {
        let auth = key(1);
        let realm = Key::of(&auth);
        let signer = key(3);
        let scope = body(
            &auth,
            &auth,
            Subject::Signer(Key::of(&signer)),
            "allow publish orders.**",
        );
        let scope = sign(&scope, &auth).expect("sign");
        let leaf = body(&auth, &signer, node(9), "allow publish **");
        let g = Grant {
            grant: sign(&leaf, &signer).expect("sign"),
            signer: Some(scope.clone()),
        };
        let v = g.verify(&realm, 5_000, 0, &none()).expect("verify");
        let publish = |t: &str| {
            v.decide(&Request::new(Action::Publish, t).expect("req"))
                .is_allowed()
        };
        assert!(publish("orders.x"));
        assert!(!publish("payments.x"));
        // Revoking the signer revokes what it signed.
        let revoked = RevocationList::sign(
            &RevocationBody {
                realm,
                version: 1,
                issued_ms: 0,
                grants: vec![],
                subjects: vec![Subject::Signer(Key::of(&signer))],
            },
            &auth,
        )
        .expect("sign")
        .verify(&realm)
        .expect("verify");
        assert_eq!(
            g.verify(&realm, 5_000, 0, &revoked)
                .expect_err("revoked")
                .kind(),
            "revoked"
        );
        // A grant signed by someone else riding on this signer's grant.
        let intruder = key(4);
        let forged = Grant {
            grant: sign(
                &body(&auth, &intruder, node(9), "allow publish **"),
                &intruder,
            )
            .expect("sign"),
            signer: Some(scope.clone()),
        };
        assert_eq!(
            forged
                .verify(&realm, 5_000, 0, &none())
                .expect_err("forged")
                .kind(),
            "bad_issuer"
        );
        // A scope grant that is for a node, not a signer.
        let not_signer =
            sign(&body(&auth, &auth, node(5), "allow publish **"), &auth).expect("sign");
        let g2 = Grant {
            grant: sign(&leaf, &signer).expect("sign"),
            signer: Some(not_signer),
        };
        assert_eq!(
            g2.verify(&realm, 5_000, 0, &none()).expect_err("no").kind(),
            "bad_issuer"
        );
        // A signer cannot make signers.
        let sub_signer = body(
            &auth,
            &signer,
            Subject::Signer(Key::of(&intruder)),
            "allow publish **",
        );
        let g3 = Grant {
            grant: sign(&sub_signer, &signer).expect("sign"),
            signer: Some(scope),
        };
        assert_eq!(
            g3.verify(&realm, 5_000, 0, &none())
                .expect_err("deep")
                .kind(),
            "bad_issuer"
        );
    }

    #[test]
    fn keys_print_parse_and_travel_as_32_bytes() {
        let k = Key::of(&key(1));
        assert_eq!(k.to_string().parse::<Key>().expect("parse"), k);
        assert!("nonsense".parse::<Key>().is_err());
        let bytes = rmp_serde::to_vec(&k).expect("encode");
        // bin8, length 32, the key.
        assert_eq!(&bytes[..2], &[0xc4, 32]);
        assert_eq!(&bytes[2..], &k.0);
        assert_eq!(rmp_serde::from_slice::<Key>(&bytes).expect("decode"), k);
    }
}
