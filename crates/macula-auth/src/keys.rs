//! End-to-end payload encryption (issue 19): realm key sets, key wrapping
//! and the sealed envelope, as a pure core (randomness and time are
//! arguments).
//!
//! * A **key set** is signed by the realm authority (domain tag
//!   [`KEYSET_DOMAIN`]), versioned like a revocation list (higher replaces
//!   lower, whole), and names the **encrypted patterns** of the realm: a
//!   topic a listed pattern matches is encrypted end to end (opt-in per
//!   realm, per pattern). For each pattern it holds up to
//!   [`MAX_GENERATIONS`] key **generations**, each a random 32-byte
//!   XChaCha20-Poly1305 key with a random 16-byte key id, an activation
//!   time and (once superseded) a retirement time.
//! * A generation's key is **wrapped** to each member (a principal granted
//!   `publish` or `subscribe` on the pattern) with HPKE (RFC 9180, base
//!   mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305), to
//!   the X25519 key **derived from the member's Ed25519 identity key**
//!   (the birational map of RFC 7748 / libsodium's
//!   `crypto_sign_ed25519_pk_to_curve25519`): the Ed25519 public key a node
//!   ID hashes is all the authority needs, and nothing else must be bound.
//! * A payload is sealed in an **envelope**: `0xE1 | key id (16) | nonce
//!   (24) | XChaCha20-Poly1305(payload, aad = topic)`, 57 bytes over the
//!   payload. The topic is the additional data, so a relay cannot move a
//!   ciphertext to another topic.
//!
//! Rotation: a new generation becomes the publishers' key at its
//! activation time (set a few seconds ahead so every member holds it
//! first); the one it supersedes is still accepted until its retirement
//! (activation + grace), so no message in flight is undecryptable. A
//! member left out of a rotation (revoked) holds no key newer than the
//! rotation: it reads nothing published with it.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::SigningKey;
pub use hpke::rand_core;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use macula_pubsub::topic::{Pattern, Topic};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::types::{Key, Signed};

type HpkeKem = hpke::kem::X25519HkdfSha256;
type HpkeAead = hpke::aead::ChaCha20Poly1305;
type HpkeKdf = hpke::kdf::HkdfSha256;

/// Prefix of the signed bytes of a key set.
pub const KEYSET_DOMAIN: &[u8] = b"macula e2e keyset v1\0";
/// HPKE `info` prefix of a wrapped key (then the key id).
pub const WRAP_INFO: &[u8] = b"macula e2e key wrap v1\0";
/// First byte of an envelope (format 1).
pub const ENVELOPE_TAG: u8 = 0xE1;
/// Bytes of a key id.
pub const KEY_ID_LEN: usize = 16;
/// Bytes of an envelope's nonce (XChaCha20).
pub const NONCE_LEN: usize = 24;
/// Bytes of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// What an envelope adds to a payload.
pub const ENVELOPE_OVERHEAD: usize = 1 + KEY_ID_LEN + NONCE_LEN + TAG_LEN;
/// Most encrypted patterns in one key set.
pub const MAX_PATTERNS: usize = 1_024;
/// Most generations kept per pattern (the current one and those in grace).
pub const MAX_GENERATIONS: usize = 4;
/// Most members a generation's key is wrapped to.
pub const MAX_MEMBERS: usize = 10_000;
/// Largest encoded key set.
pub const MAX_KEYSET_BYTES: usize = 8 * 1024 * 1024;

/// A key generation's id.
pub type KeyId = [u8; KEY_ID_LEN];

/// A key wrapped to one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wrapped {
    /// The member's Ed25519 identity key.
    pub to: Key,
    /// HPKE encapsulated key (32 bytes).
    #[serde(with = "serde_bytes")]
    pub enc: Vec<u8>,
    /// HPKE ciphertext of the 32-byte key (48 bytes).
    #[serde(with = "serde_bytes")]
    pub ct: Vec<u8>,
}

/// One key generation of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    #[serde(with = "serde_bytes")]
    pub id: Vec<u8>,
    /// 1 for a pattern's first key, then one more per rotation.
    pub number: u64,
    /// Unix ms from which publishers seal with it.
    pub active_from_ms: u64,
    /// Unix ms after which it is no longer accepted (set when superseded).
    pub retire_at_ms: Option<u64>,
    pub wrapped: Vec<Wrapped>,
}

/// What an encrypted pattern names: topics (pub/sub payloads) or
/// procedures (RPC arguments and replies). Each kind has its own keys and
/// members, so one pattern text can be encrypted for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatternKind {
    #[default]
    Topic,
    Procedure,
}

impl PatternKind {
    pub fn is_topic(&self) -> bool {
        *self == PatternKind::Topic
    }

    pub fn name(&self) -> &'static str {
        match self {
            PatternKind::Topic => "topic",
            PatternKind::Procedure => "procedure",
        }
    }
}

/// One encrypted pattern and its keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatternKeys {
    pub pattern: String,
    /// Topics (absent on the wire: the default) or procedures.
    #[serde(default, skip_serializing_if = "PatternKind::is_topic")]
    pub kind: PatternKind,
    /// Rotation schedule: a key older than this is due (0: none).
    pub rotate_every_ms: u64,
    /// Oldest first; the last one active is the publishers' key.
    pub generations: Vec<Generation>,
}

/// What a key set says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySetBody {
    pub realm: Key,
    /// Higher replaces lower.
    pub version: u64,
    /// Unix milliseconds.
    pub issued_ms: u64,
    pub patterns: Vec<PatternKeys>,
}

/// A signed key set, as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySet(pub Signed);

/// Why a key set, a rotation or an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key set does not decode: {0}")]
    Decode(String),
    #[error("the key set is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("the key set is for realm {found}, not {expected}")]
    WrongRealm { found: Key, expected: Key },
    #[error("the key set's signature does not verify")]
    BadSignature,
    #[error("the key set is over a limit: {0}")]
    OverLimit(String),
    #[error("invalid encrypted pattern {0:?}")]
    BadPattern(String),
    #[error("member {0} has no valid Ed25519 key")]
    BadMember(Key),
    #[error("key wrapping failed: {0}")]
    Wrap(String),
}

/// Why an envelope did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not an envelope (too short or unknown format)")]
    Malformed,
    #[error("sealed with a key this principal does not hold")]
    NoKey,
    #[error("sealed with a retired key")]
    Retired,
    #[error("the envelope does not authenticate (forged or damaged)")]
    Forged,
}

/// Why a payload could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("topic {topic:?} is encrypted end to end (pattern {pattern:?}) and this principal holds no active key for it")]
    NoKey { topic: String, pattern: String },
    #[error("procedure {procedure:?} is encrypted end to end (pattern {pattern:?}) and this principal holds no active key for it")]
    NoCallKey { procedure: String, pattern: String },
    #[error("the reply to {procedure:?} cannot be sealed: the request's key is no longer held")]
    NoReplyKey { procedure: String },
}

impl KeySet {
    /// Signs `body` with the realm authority's key.
    pub fn sign(body: &KeySetBody, authority: &SigningKey) -> Result<KeySet, KeyError> {
        let bytes = rmp_serde::to_vec_named(body).map_err(|e| KeyError::Decode(e.to_string()))?;
        Ok(KeySet(Signed::sign(KEYSET_DOMAIN, bytes, authority)))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, KeyError> {
        rmp_serde::to_vec_named(self).map_err(|e| KeyError::Decode(e.to_string()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<KeySet, KeyError> {
        if bytes.len() > MAX_KEYSET_BYTES {
            return Err(KeyError::TooLarge {
                len: bytes.len(),
                max: MAX_KEYSET_BYTES,
            });
        }
        rmp_serde::from_slice(bytes).map_err(|e| KeyError::Decode(e.to_string()))
    }

    /// The body, decoded but not verified (to build the next version).
    pub fn body(&self) -> Result<KeySetBody, KeyError> {
        rmp_serde::from_slice(&self.0.body).map_err(|e| KeyError::Decode(e.to_string()))
    }

    /// Checks the set for `realm` (signature, limits, patterns) and
    /// returns its body.
    pub fn verify(&self, realm: &Key) -> Result<KeySetBody, KeyError> {
        let body = self.body()?;
        if body.realm != *realm {
            return Err(KeyError::WrongRealm {
                found: body.realm,
                expected: *realm,
            });
        }
        check_limits(&body)?;
        if !self.0.verifies(KEYSET_DOMAIN, realm).unwrap_or(false) {
            return Err(KeyError::BadSignature);
        }
        Ok(body)
    }
}

fn check_limits(body: &KeySetBody) -> Result<(), KeyError> {
    if body.patterns.len() > MAX_PATTERNS {
        return Err(KeyError::OverLimit(format!(
            "{} patterns, at most {MAX_PATTERNS}",
            body.patterns.len()
        )));
    }
    for p in &body.patterns {
        Pattern::new(&p.pattern).map_err(|_| KeyError::BadPattern(p.pattern.clone()))?;
        if p.generations.is_empty() || p.generations.len() > MAX_GENERATIONS {
            return Err(KeyError::OverLimit(format!(
                "{} generations for {:?}, 1 to {MAX_GENERATIONS}",
                p.generations.len(),
                p.pattern
            )));
        }
        for g in &p.generations {
            if g.id.len() != KEY_ID_LEN || g.wrapped.len() > MAX_MEMBERS {
                return Err(KeyError::OverLimit(format!(
                    "generation {} of {:?}: id of {} bytes, {} members (at most {MAX_MEMBERS})",
                    g.number,
                    p.pattern,
                    g.id.len(),
                    g.wrapped.len()
                )));
            }
        }
    }
    Ok(())
}

/// A principal's X25519 (HPKE) secret key: derived from its Ed25519
/// signing key (the clamped scalar Ed25519 itself uses).
fn hpke_secret(identity: &SigningKey) -> Result<<HpkeKem as hpke::Kem>::PrivateKey, KeyError> {
    <HpkeKem as hpke::Kem>::PrivateKey::from_bytes(&identity.to_scalar_bytes())
        .map_err(|e| KeyError::Wrap(e.to_string()))
}

/// A member's X25519 (HPKE) public key: the Montgomery form of its
/// Ed25519 key.
fn hpke_public(member: &Key) -> Result<<HpkeKem as hpke::Kem>::PublicKey, KeyError> {
    let vk = member
        .verifying()
        .map_err(|_| KeyError::BadMember(*member))?;
    <HpkeKem as hpke::Kem>::PublicKey::from_bytes(&vk.to_montgomery().to_bytes())
        .map_err(|_| KeyError::BadMember(*member))
}

fn wrap_info(id: &[u8]) -> Vec<u8> {
    let mut info = WRAP_INFO.to_vec();
    info.extend_from_slice(id);
    info
}

/// Wraps `key` (generation `id`) to `member`.
pub fn wrap<R: RngCore + CryptoRng>(
    key: &[u8; 32],
    id: &[u8],
    member: &Key,
    rng: &mut R,
) -> Result<Wrapped, KeyError> {
    let pk = hpke_public(member)?;
    let (enc, ct) = hpke::single_shot_seal::<HpkeAead, HpkeKdf, HpkeKem, R>(
        &OpModeS::Base,
        &pk,
        &wrap_info(id),
        key,
        &[],
        rng,
    )
    .map_err(|e| KeyError::Wrap(e.to_string()))?;
    Ok(Wrapped {
        to: *member,
        enc: enc.to_bytes().to_vec(),
        ct,
    })
}

/// Unwraps a key wrapped to `identity`; `None` when it does not open.
pub fn unwrap(w: &Wrapped, id: &[u8], identity: &SigningKey) -> Option<[u8; 32]> {
    let sk = hpke_secret(identity).ok()?;
    let enc = <HpkeKem as hpke::Kem>::EncappedKey::from_bytes(&w.enc).ok()?;
    let key = hpke::single_shot_open::<HpkeAead, HpkeKdf, HpkeKem>(
        &OpModeR::Base,
        &sk,
        &enc,
        &wrap_info(id),
        &w.ct,
        &[],
    )
    .ok()?;
    key.try_into().ok()
}

/// How to rotate a pattern's key ([`rotate`]).
#[derive(Debug, Clone)]
pub struct Rotation {
    pub pattern: String,
    /// Topics or procedures.
    pub kind: PatternKind,
    /// Who receives the new key (the pattern's publishers and subscribers).
    pub members: Vec<Key>,
    /// Unix ms now.
    pub now_ms: u64,
    /// The new key is the publishers' from `now_ms + activate_in_ms`.
    pub activate_in_ms: u64,
    /// The superseded key is accepted until its successor's activation
    /// plus this.
    pub grace_ms: u64,
    /// The pattern's schedule (`None`: keep what the set says; 0 for a
    /// new pattern).
    pub rotate_every_ms: Option<u64>,
}

/// The next version of a key set (`prev`, or a new one for `realm`) with a
/// new generation for `r.pattern`, wrapped to `r.members`; generations
/// retired before `now` are dropped, and at most [`MAX_GENERATIONS`] kept.
/// Returns the body and the new key id.
pub fn rotate<R: RngCore + CryptoRng>(
    prev: Option<KeySetBody>,
    realm: Key,
    r: &Rotation,
    rng: &mut R,
) -> Result<(KeySetBody, KeyId), KeyError> {
    Pattern::new(&r.pattern).map_err(|_| KeyError::BadPattern(r.pattern.clone()))?;
    if r.members.len() > MAX_MEMBERS {
        return Err(KeyError::OverLimit(format!(
            "{} members, at most {MAX_MEMBERS}",
            r.members.len()
        )));
    }
    let mut body = prev.unwrap_or(KeySetBody {
        realm,
        version: 0,
        issued_ms: 0,
        patterns: Vec::new(),
    });
    body.version += 1;
    body.issued_ms = r.now_ms;
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    let mut id = [0u8; KEY_ID_LEN];
    rng.fill_bytes(&mut id);
    let mut wrapped = Vec::with_capacity(r.members.len());
    let mut members = r.members.clone();
    members.sort();
    members.dedup();
    for m in &members {
        wrapped.push(wrap(&key, &id, m, rng)?);
    }
    let active_from_ms = r.now_ms.saturating_add(r.activate_in_ms);
    let at = match body
        .patterns
        .iter()
        .position(|p| p.pattern == r.pattern && p.kind == r.kind)
    {
        Some(i) => i,
        None => {
            if body.patterns.len() >= MAX_PATTERNS {
                return Err(KeyError::OverLimit(format!(
                    "{MAX_PATTERNS} patterns already"
                )));
            }
            body.patterns.push(PatternKeys {
                pattern: r.pattern.clone(),
                kind: r.kind,
                rotate_every_ms: 0,
                generations: Vec::new(),
            });
            body.patterns.len() - 1
        }
    };
    let p = &mut body.patterns[at];
    if let Some(every) = r.rotate_every_ms {
        p.rotate_every_ms = every;
    }
    let retire = active_from_ms.saturating_add(r.grace_ms);
    for g in &mut p.generations {
        g.retire_at_ms = Some(g.retire_at_ms.map_or(retire, |t| t.min(retire)));
    }
    p.generations
        .retain(|g| g.retire_at_ms.is_none_or(|t| t > r.now_ms));
    let number = p.generations.last().map_or(1, |g| g.number + 1);
    p.generations.push(Generation {
        id: id.to_vec(),
        number,
        active_from_ms,
        retire_at_ms: None,
        wrapped,
    });
    let excess = p.generations.len().saturating_sub(MAX_GENERATIONS);
    p.generations.drain(..excess);
    Ok((body, id))
}

/// One generation as a principal holds it.
#[derive(Clone)]
struct HeldKey {
    id: KeyId,
    number: u64,
    active_from_ms: u64,
    retire_at_ms: Option<u64>,
    /// `None`: not wrapped to this principal.
    cipher: Option<XChaCha20Poly1305>,
}

struct HeldPattern {
    pattern: Pattern,
    kind: PatternKind,
    /// Oldest first.
    keys: Vec<HeldKey>,
}

/// What a principal holds of a verified key set: the encrypted patterns,
/// and the keys wrapped to it. Seals and opens envelopes.
pub struct Keyring {
    version: u64,
    patterns: Vec<HeldPattern>,
}

/// What [`Keyring::open`] made of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The topic is not encrypted: the payload as it came.
    Clear,
    /// Decrypted with this key.
    Plain { payload: Vec<u8>, key: KeyId },
}

/// A key generation as `macula keys status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    pub pattern: String,
    #[serde(default)]
    pub kind: PatternKind,
    /// Hex.
    pub key_id: String,
    pub number: u64,
    pub active_from_ms: u64,
    pub retire_at_ms: Option<u64>,
    /// Whether this principal holds the key.
    pub held: bool,
    pub members: usize,
}

impl Keyring {
    /// No encrypted pattern (an open realm, or no key set yet).
    pub fn empty() -> Keyring {
        Keyring {
            version: 0,
            patterns: Vec::new(),
        }
    }

    /// The keys of a verified set that are wrapped to `identity`.
    pub fn new(body: &KeySetBody, identity: &SigningKey) -> Keyring {
        let me = Key::of(identity);
        let patterns = body
            .patterns
            .iter()
            .filter_map(|p| {
                let pattern = Pattern::new(&p.pattern).ok()?;
                let keys = p
                    .generations
                    .iter()
                    .filter_map(|g| {
                        let id: KeyId = g.id.as_slice().try_into().ok()?;
                        let cipher = g
                            .wrapped
                            .iter()
                            .find(|w| w.to == me)
                            .and_then(|w| unwrap(w, &id, identity))
                            .map(|k| XChaCha20Poly1305::new(&k.into()));
                        Some(HeldKey {
                            id,
                            number: g.number,
                            active_from_ms: g.active_from_ms,
                            retire_at_ms: g.retire_at_ms,
                            cipher,
                        })
                    })
                    .collect();
                Some(HeldPattern {
                    pattern,
                    kind: p.kind,
                    keys,
                })
            })
            .collect();
        Keyring {
            version: body.version,
            patterns,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The first pattern of `kind` that matches `name`.
    fn covering(&self, kind: PatternKind, name: &str) -> Option<&HeldPattern> {
        if self.patterns.is_empty() {
            return None;
        }
        let t = match kind {
            PatternKind::Topic => Topic::new(name).ok()?,
            // Procedure names (at most 256 bytes of `.`-separated segments)
            // may have more segments than a topic: matched without the
            // topic limits, so no valid procedure escapes its pattern.
            PatternKind::Procedure => Topic::with_limits(name, &procedure_limits()).ok()?,
        };
        self.patterns
            .iter()
            .find(|p| p.kind == kind && p.pattern.matches(&t))
    }

    /// Whether `topic` is encrypted end to end.
    pub fn encrypts(&self, topic: &str) -> bool {
        self.covering(PatternKind::Topic, topic).is_some()
    }

    /// Whether calls of `procedure` are encrypted end to end.
    pub fn encrypts_call(&self, procedure: &str) -> bool {
        self.covering(PatternKind::Procedure, procedure).is_some()
    }

    /// Seals `payload` for `topic` with the pattern's newest active key;
    /// `Ok(None)` when the topic is not encrypted.
    pub fn seal<R: RngCore + CryptoRng>(
        &self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Option<Vec<u8>>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        self.seal_with_nonce(topic, payload, now_ms, &nonce)
    }

    /// [`Keyring::seal`] with the caller's nonce, which must never repeat
    /// under one key: random, or (as the runtime does) a random 16-byte
    /// prefix drawn once per process and a 64-bit counter.
    pub fn seal_with_nonce(
        &self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Option<Vec<u8>>, SealError> {
        let Some(p) = self.covering(PatternKind::Topic, topic) else {
            return Ok(None);
        };
        let no_key = || SealError::NoKey {
            topic: topic.to_string(),
            pattern: p.pattern.as_str().to_string(),
        };
        let k = p.sealing_key(now_ms).ok_or_else(no_key)?;
        seal_with(k, topic.as_bytes(), payload, nonce)
            .map(Some)
            .ok_or_else(no_key)
    }

    /// Seals the arguments of a call of `procedure` (additional data: the
    /// procedure name) with the pattern's newest active key; `Ok(None)`
    /// when the procedure is not encrypted.
    pub fn seal_call_with_nonce(
        &self,
        procedure: &str,
        payload: &[u8],
        now_ms: u64,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Option<Vec<u8>>, SealError> {
        let Some(p) = self.covering(PatternKind::Procedure, procedure) else {
            return Ok(None);
        };
        let no_key = || SealError::NoCallKey {
            procedure: procedure.to_string(),
            pattern: p.pattern.as_str().to_string(),
        };
        let k = p.sealing_key(now_ms).ok_or_else(no_key)?;
        seal_with(k, procedure.as_bytes(), payload, nonce)
            .map(Some)
            .ok_or_else(no_key)
    }

    /// Seals the reply to a call of `procedure` whose arguments came in
    /// envelope `request`: with the request's key (the caller holds it),
    /// bound to the request (additional data [`reply_aad`]); `Ok(None)`
    /// when the procedure is not encrypted.
    pub fn seal_reply_with_nonce(
        &self,
        procedure: &str,
        request: (&KeyId, &[u8; NONCE_LEN]),
        payload: &[u8],
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Option<Vec<u8>>, SealError> {
        self.seal_answer(
            procedure,
            request,
            &reply_aad(procedure, request.1),
            payload,
            nonce,
        )
    }

    /// Seals a handler's error message answering a call of `procedure`
    /// whose arguments came in envelope `request`: like
    /// [`Keyring::seal_reply_with_nonce`], with additional data
    /// [`error_aad`] (so an error is never taken for a reply, nor a reply
    /// for an error); `Ok(None)` when the procedure is not encrypted.
    pub fn seal_error_with_nonce(
        &self,
        procedure: &str,
        request: (&KeyId, &[u8; NONCE_LEN]),
        message: &[u8],
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Option<Vec<u8>>, SealError> {
        self.seal_answer(
            procedure,
            request,
            &error_aad(procedure, request.1),
            message,
            nonce,
        )
    }

    /// Seals an answer (reply or error) to a call of `procedure` with the
    /// key its request came sealed with, under additional data `aad`.
    fn seal_answer(
        &self,
        procedure: &str,
        request: (&KeyId, &[u8; NONCE_LEN]),
        aad: &[u8],
        payload: &[u8],
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Option<Vec<u8>>, SealError> {
        let Some(p) = self.covering(PatternKind::Procedure, procedure) else {
            return Ok(None);
        };
        let no_key = || SealError::NoReplyKey {
            procedure: procedure.to_string(),
        };
        let k = p
            .keys
            .iter()
            .find(|k| &k.id == request.0)
            .ok_or_else(no_key)?;
        seal_with(k, aad, payload, nonce)
            .map(Some)
            .ok_or_else(no_key)
    }

    /// Opens the payload of an event on `topic`.
    pub fn open(&self, topic: &str, payload: &[u8], now_ms: u64) -> Result<Opened, OpenError> {
        let Some(p) = self.covering(PatternKind::Topic, topic) else {
            return Ok(Opened::Clear);
        };
        p.open(topic.as_bytes(), payload, now_ms)
    }

    /// Opens the arguments of a call of `procedure` (the envelope's nonce
    /// and key id, for the reply, are in [`Envelope::decode`] of it).
    pub fn open_call(
        &self,
        procedure: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Opened, OpenError> {
        let Some(p) = self.covering(PatternKind::Procedure, procedure) else {
            return Ok(Opened::Clear);
        };
        p.open(procedure.as_bytes(), payload, now_ms)
    }

    /// Opens the reply to a call of `procedure` whose arguments were
    /// sealed with nonce `request_nonce`.
    pub fn open_reply(
        &self,
        procedure: &str,
        request_nonce: &[u8; NONCE_LEN],
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Opened, OpenError> {
        let Some(p) = self.covering(PatternKind::Procedure, procedure) else {
            return Ok(Opened::Clear);
        };
        p.open(&reply_aad(procedure, request_nonce), payload, now_ms)
    }

    /// Opens a handler's error message answering a call of `procedure`
    /// whose arguments were sealed with nonce `request_nonce`.
    pub fn open_error(
        &self,
        procedure: &str,
        request_nonce: &[u8; NONCE_LEN],
        sealed: &[u8],
        now_ms: u64,
    ) -> Result<Opened, OpenError> {
        let Some(p) = self.covering(PatternKind::Procedure, procedure) else {
            return Ok(Opened::Clear);
        };
        p.open(&error_aad(procedure, request_nonce), sealed, now_ms)
    }

    /// Every generation held, for `macula keys status` (members from the
    /// set's body).
    pub fn status(&self, body: &KeySetBody) -> Vec<KeyStatus> {
        let mut out = Vec::new();
        for p in &body.patterns {
            let held = self
                .patterns
                .iter()
                .find(|h| h.pattern.as_str() == p.pattern && h.kind == p.kind);
            for g in &p.generations {
                let has = held.is_some_and(|h| {
                    h.keys
                        .iter()
                        .any(|k| k.id.as_slice() == g.id.as_slice() && k.cipher.is_some())
                });
                out.push(KeyStatus {
                    pattern: p.pattern.clone(),
                    kind: p.kind,
                    key_id: hex(&g.id),
                    number: g.number,
                    active_from_ms: g.active_from_ms,
                    retire_at_ms: g.retire_at_ms,
                    held: has,
                    members: g.wrapped.len(),
                });
            }
        }
        out
    }

    /// The newest generation's number of each held pattern (tests, status).
    pub fn current(&self, topic: &str, now_ms: u64) -> Option<u64> {
        let p = self.covering(PatternKind::Topic, topic)?;
        p.keys
            .iter()
            .rev()
            .find(|k| k.active_from_ms <= now_ms)
            .map(|k| k.number)
    }
}

/// Topic limits for matching procedure names (longer than any valid
/// procedure, 256 bytes, can be).
fn procedure_limits() -> macula_pubsub::Limits {
    macula_pubsub::Limits {
        max_topic_len: 1_024,
        max_segments: 1_024,
        ..macula_pubsub::Limits::default()
    }
}

/// What a reply's additional data is after the procedure name (a NUL
/// cannot be in a name, so no name's bytes equal a reply's).
pub const REPLY_AAD_TAG: &[u8] = b"\0macula reply\0";

/// The additional data of the reply to a call of `procedure` sealed with
/// `request_nonce`: `procedure || "\0macula reply\0" || request_nonce`.
/// Bound to the request, so a node on the way can neither answer a call
/// with the call's own envelope nor with the reply to another call.
pub fn reply_aad(procedure: &str, request_nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    answer_aad(procedure, REPLY_AAD_TAG, request_nonce)
}

/// What a handler error's additional data is after the procedure name.
pub const ERROR_AAD_TAG: &[u8] = b"\0macula error\0";

/// The additional data of a handler's error message answering a call of
/// `procedure` sealed with `request_nonce`:
/// `procedure || "\0macula error\0" || request_nonce`.
pub fn error_aad(procedure: &str, request_nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    answer_aad(procedure, ERROR_AAD_TAG, request_nonce)
}

fn answer_aad(procedure: &str, tag: &[u8], request_nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(procedure.len() + tag.len() + NONCE_LEN);
    aad.extend_from_slice(procedure.as_bytes());
    aad.extend_from_slice(tag);
    aad.extend_from_slice(request_nonce);
    aad
}

/// One envelope with key `k` (`None`: not wrapped to this principal).
fn seal_with(k: &HeldKey, aad: &[u8], payload: &[u8], nonce: &[u8; NONCE_LEN]) -> Option<Vec<u8>> {
    let cipher = k.cipher.as_ref()?;
    let ct = cipher
        .encrypt(XNonce::from_slice(nonce), Payload { msg: payload, aad })
        .ok()?;
    let mut out = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + ct.len());
    out.push(ENVELOPE_TAG);
    out.extend_from_slice(&k.id);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&ct);
    Some(out)
}

impl HeldPattern {
    /// The publishers' (callers') key at `now_ms`: the newest active one
    /// (before the first one's activation, the first one).
    fn sealing_key(&self, now_ms: u64) -> Option<&HeldKey> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.active_from_ms <= now_ms && k.retire_at_ms.is_none_or(|t| t > now_ms))
            .or_else(|| self.keys.iter().find(|k| k.retire_at_ms.is_none()))
    }

    fn open(&self, aad: &[u8], payload: &[u8], now_ms: u64) -> Result<Opened, OpenError> {
        let env = Envelope::decode(payload)?;
        let k = self
            .keys
            .iter()
            .find(|k| k.id == env.key_id)
            .ok_or(OpenError::NoKey)?;
        if k.retire_at_ms.is_some_and(|t| t <= now_ms) {
            return Err(OpenError::Retired);
        }
        let cipher = k.cipher.as_ref().ok_or(OpenError::NoKey)?;
        let plain = cipher
            .decrypt(
                XNonce::from_slice(&env.nonce),
                Payload {
                    msg: env.ciphertext,
                    aad,
                },
            )
            .map_err(|_| OpenError::Forged)?;
        Ok(Opened::Plain {
            payload: plain,
            key: k.id,
        })
    }
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A decoded envelope (borrowing the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub key_id: KeyId,
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext and tag.
    pub ciphertext: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Reads an envelope; never panics, copies only the fixed-size parts.
    pub fn decode(b: &'a [u8]) -> Result<Envelope<'a>, OpenError> {
        if b.len() < ENVELOPE_OVERHEAD || b[0] != ENVELOPE_TAG {
            return Err(OpenError::Malformed);
        }
        let (id, rest) = b[1..].split_at(KEY_ID_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        Ok(Envelope {
            key_id: id.try_into().map_err(|_| OpenError::Malformed)?,
            nonce: nonce.try_into().map_err(|_| OpenError::Malformed)?,
            ciphertext,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + self.ciphertext.len());
        out.push(ENVELOPE_TAG);
        out.extend_from_slice(&self.key_id);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(self.ciphertext);
        out
    }
}

/// The fuzz target's body: envelope and key set decoders take any bytes
/// (topic payloads, call arguments and replies alike).
pub fn fuzz_envelope(data: &[u8]) {
    if let Ok(e) = Envelope::decode(data) {
        assert_eq!(e.encode(), data);
    }
    let ring = fuzz_ring();
    let _ = ring.open("e2e.fuzz", data, 0);
    let _ = ring.open_call("e2e.fuzz", data, 0);
    let _ = ring.open_reply("e2e.fuzz", &[3; NONCE_LEN], data, 0);
    let _ = ring.open_error("e2e.fuzz", &[3; NONCE_LEN], data, 0);
    if let Ok(set) = KeySet::from_bytes(data) {
        let _ = set.verify(&Key([7; 32]));
    }
}

fn fuzz_ring() -> Keyring {
    let held = |kind| HeldPattern {
        pattern: Pattern::new("e2e.**").unwrap_or_else(|_| unreachable!()),
        kind,
        keys: vec![HeldKey {
            id: [0; KEY_ID_LEN],
            number: 1,
            active_from_ms: 0,
            retire_at_ms: None,
            cipher: Some(XChaCha20Poly1305::new(&[1u8; 32].into())),
        }],
    };
    Keyring {
        version: 1,
        patterns: vec![held(PatternKind::Topic), held(PatternKind::Procedure)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A seeded CSPRNG for tests (ChaCha-free: HPKE only needs the traits).
    struct TestRng(u64);
    impl rand_core::RngCore for TestRng {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for c in dest.chunks_mut(8) {
                let v = self.next_u64().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        }
    }
    impl rand_core::CryptoRng for TestRng {}

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn rot(pattern: &str, members: &[&SigningKey], now: u64, activate: u64) -> Rotation {
        Rotation {
            pattern: pattern.into(),
            kind: PatternKind::Topic,
            members: members.iter().map(|k| Key::of(k)).collect(),
            now_ms: now,
            activate_in_ms: activate,
            grace_ms: 10_000,
            rotate_every_ms: None,
        }
    }

    #[test]
    fn a_member_reads_a_stranger_does_not_and_a_signed_set_verifies() {
        let (auth, alice, bob, eve) = (key(1), key(2), key(3), key(4));
        let mut rng = TestRng(1);
        let (body, _) = rotate(
            None,
            Key::of(&auth),
            &rot("orders.**", &[&alice, &bob], 0, 0),
            &mut rng,
        )
        .expect("rotate");
        let set = KeySet::sign(&body, &auth).expect("sign");
        let bytes = set.to_bytes().expect("encode");
        let body = KeySet::from_bytes(&bytes)
            .expect("decode")
            .verify(&Key::of(&auth))
            .expect("verify");
        assert_eq!(
            KeySet::from_bytes(&bytes)
                .expect("decode")
                .verify(&Key::of(&eve)),
            Err(KeyError::WrongRealm {
                found: Key::of(&auth),
                expected: Key::of(&eve)
            })
        );
        let (a, b, e) = (
            Keyring::new(&body, &alice),
            Keyring::new(&body, &bob),
            Keyring::new(&body, &eve),
        );
        let sealed = a
            .seal("orders.new", b"secret", 5, &mut rng)
            .expect("seal")
            .expect("encrypted topic");
        assert_eq!(sealed.len(), 6 + ENVELOPE_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        match b.open("orders.new", &sealed, 5).expect("open") {
            Opened::Plain { payload, .. } => assert_eq!(payload, b"secret"),
            other => panic!("{other:?}"),
        }
        assert_eq!(e.open("orders.new", &sealed, 5), Err(OpenError::NoKey));
        assert!(matches!(
            e.seal("orders.new", b"x", 5, &mut rng),
            Err(SealError::NoKey { .. })
        ));
        // Moved to another topic of the pattern: does not authenticate.
        assert_eq!(b.open("orders.old", &sealed, 5), Err(OpenError::Forged));
        // Topics outside the patterns are left alone.
        assert_eq!(a.seal("news.x", b"hi", 5, &mut rng), Ok(None));
        assert_eq!(a.open("news.x", b"hi", 5), Ok(Opened::Clear));
        // A tampered set does not verify.
        let mut bad = set.clone();
        bad.0.body[10] ^= 1;
        assert!(bad.verify(&Key::of(&auth)).is_err());
    }

    #[test]
    fn rotation_keeps_old_messages_readable_in_grace_and_locks_out_the_revoked() {
        let (auth, alice, bob) = (key(1), key(2), key(3));
        let mut rng = TestRng(2);
        let realm = Key::of(&auth);
        let (v1, id1) =
            rotate(None, realm, &rot("a.*", &[&alice, &bob], 0, 0), &mut rng).expect("rotate 1");
        let old = Keyring::new(&v1, &alice)
            .seal("a.b", b"before", 10, &mut rng)
            .expect("seal")
            .expect("sealed");
        // Bob is revoked: the next key goes to Alice only, active at 1000.
        let (v2, id2) = rotate(
            Some(v1.clone()),
            realm,
            &rot("a.*", &[&alice], 100, 900),
            &mut rng,
        )
        .expect("rotate 2");
        assert_eq!(v2.version, 2);
        assert_ne!(id1, id2);
        let (a2, b2) = (Keyring::new(&v2, &alice), Keyring::new(&v2, &bob));
        // Before activation publishers still use the old key.
        let env = a2
            .seal("a.b", b"x", 500, &mut rng)
            .expect("seal")
            .expect("sealed");
        assert_eq!(Envelope::decode(&env).expect("decode").key_id, id1);
        let new = a2
            .seal("a.b", b"after", 1_000, &mut rng)
            .expect("seal")
            .expect("sealed");
        assert_eq!(Envelope::decode(&new).expect("decode").key_id, id2);
        // Old message still opens within the grace (activation + 10 s).
        assert!(matches!(
            a2.open("a.b", &old, 5_000),
            Ok(Opened::Plain { .. })
        ));
        assert!(matches!(
            b2.open("a.b", &old, 5_000),
            Ok(Opened::Plain { .. })
        ));
        // Bob cannot read what is published after the rotation.
        assert_eq!(b2.open("a.b", &new, 1_000), Err(OpenError::NoKey));
        // After the grace the old key is retired.
        assert_eq!(a2.open("a.b", &old, 11_000), Err(OpenError::Retired));
        // A third rotation after the grace drops the retired generation.
        let (v3, _) =
            rotate(Some(v2), realm, &rot("a.*", &[&alice], 20_000, 0), &mut rng).expect("rotate 3");
        let gens: Vec<u64> = v3.patterns[0]
            .generations
            .iter()
            .map(|g| g.number)
            .collect();
        assert_eq!(gens, vec![2, 3]);
        let st = Keyring::new(&v3, &alice).status(&v3);
        assert_eq!(st.len(), 2);
        assert!(st.iter().all(|s| s.held && s.members == 1));
    }

    #[test]
    fn procedure_patterns_seal_calls_and_replies_bound_to_the_request() {
        let (auth, alice, bob, eve) = (key(1), key(2), key(3), key(4));
        let mut rng = TestRng(4);
        let realm = Key::of(&auth);
        let mut r = rot("billing.**", &[&alice, &bob], 0, 0);
        r.kind = PatternKind::Procedure;
        let (body, id) = rotate(None, realm, &r, &mut rng).expect("rotate");
        // The same text as a topic pattern is another entry, other keys.
        let (body, _) = rotate(
            Some(body),
            realm,
            &rot("billing.**", &[&alice], 0, 0),
            &mut rng,
        )
        .expect("rotate topic");
        assert_eq!(body.patterns.len(), 2);
        let set = KeySet::sign(&body, &auth).expect("sign");
        let body = KeySet::from_bytes(&set.to_bytes().expect("encode"))
            .expect("decode")
            .verify(&realm)
            .expect("verify");
        assert_eq!(body.patterns[0].kind, PatternKind::Procedure);
        assert_eq!(body.patterns[1].kind, PatternKind::Topic);
        let (a, b, e) = (
            Keyring::new(&body, &alice),
            Keyring::new(&body, &bob),
            Keyring::new(&body, &eve),
        );
        assert!(a.encrypts_call("billing.invoice.create"));
        assert!(!a.encrypts_call("other.x"));
        let n1 = [1u8; NONCE_LEN];
        let call = a
            .seal_call_with_nonce("billing.invoice.create", b"args", 5, &n1)
            .expect("seal")
            .expect("sealed");
        let env = Envelope::decode(&call).expect("envelope");
        assert_eq!(env.key_id, id);
        // Bob (a member) opens it; Eve cannot; a topic key does not.
        assert!(matches!(
            b.open_call("billing.invoice.create", &call, 5),
            Ok(Opened::Plain { ref payload, .. }) if payload == b"args"
        ));
        assert_eq!(
            e.open_call("billing.invoice.create", &call, 5),
            Err(OpenError::NoKey)
        );
        assert!(b.open("billing.invoice.create", &call, 5).is_err());
        assert!(matches!(
            e.seal_call_with_nonce("billing.x", b"x", 5, &n1),
            Err(SealError::NoCallKey { .. })
        ));
        // Another procedure of the pattern: does not authenticate.
        assert_eq!(
            b.open_call("billing.invoice.delete", &call, 5),
            Err(OpenError::Forged)
        );
        // The reply: Bob seals with the request's key, bound to it.
        let reply = b
            .seal_reply_with_nonce(
                "billing.invoice.create",
                (&env.key_id, &env.nonce),
                b"done",
                &[2; NONCE_LEN],
            )
            .expect("seal reply")
            .expect("sealed");
        assert!(matches!(
            a.open_reply("billing.invoice.create", &env.nonce, &reply, 5),
            Ok(Opened::Plain { ref payload, .. }) if payload == b"done"
        ));
        // Not an answer to another call, and the call is not its own reply.
        assert_eq!(
            a.open_reply("billing.invoice.create", &[9; NONCE_LEN], &reply, 5),
            Err(OpenError::Forged)
        );
        assert_eq!(
            a.open_reply("billing.invoice.create", &env.nonce, &call, 5),
            Err(OpenError::Forged)
        );
        // A handler's error message: sealed like the reply, bound to the
        // request, and never taken for a reply (nor a reply for an error).
        let err = b
            .seal_error_with_nonce(
                "billing.invoice.create",
                (&env.key_id, &env.nonce),
                b"card declined",
                &[3; NONCE_LEN],
            )
            .expect("seal error")
            .expect("sealed");
        assert!(matches!(
            a.open_error("billing.invoice.create", &env.nonce, &err, 5),
            Ok(Opened::Plain { ref payload, .. }) if payload == b"card declined"
        ));
        assert_eq!(
            a.open_error("billing.invoice.create", &[9; NONCE_LEN], &err, 5),
            Err(OpenError::Forged)
        );
        assert_eq!(
            a.open_reply("billing.invoice.create", &env.nonce, &err, 5),
            Err(OpenError::Forged)
        );
        assert_eq!(
            a.open_error("billing.invoice.create", &env.nonce, &reply, 5),
            Err(OpenError::Forged)
        );
        assert_eq!(
            e.open_error("billing.invoice.create", &env.nonce, &err, 5),
            Err(OpenError::NoKey)
        );
        assert_eq!(
            a.open_call("billing.invoice.create", &reply, 5),
            Err(OpenError::Forged)
        );
        // A procedure outside the patterns is left alone.
        assert_eq!(a.seal_call_with_nonce("x.y", b"a", 5, &n1), Ok(None));
        assert_eq!(a.open_call("x.y", b"a", 5), Ok(Opened::Clear));
    }

    proptest! {
        /// Envelopes encode and decode back; any damage to a sealed
        /// payload is refused (never a panic, never a wrong plaintext).
        #[test]
        fn envelope_codec_round_trips_and_damage_is_refused(
            id in any::<[u8; 16]>(),
            nonce in any::<[u8; 24]>(),
            ct in prop::collection::vec(any::<u8>(), 16..256),
            payload in prop::collection::vec(any::<u8>(), 0..256),
            flip in any::<prop::sample::Index>(),
            x in 1u8..=255,
            junk in prop::collection::vec(any::<u8>(), 0..128),
        ) {
            let e = Envelope { key_id: id, nonce, ciphertext: &ct };
            let bytes = e.encode();
            prop_assert_eq!(Envelope::decode(&bytes), Ok(e));
            fuzz_envelope(&junk);
            fuzz_envelope(&bytes);
            let ring = fuzz_ring();
            let mut rng = TestRng(3);
            let mut sealed = ring.seal("e2e.p", &payload, 0, &mut rng).expect("seal").expect("sealed");
            prop_assert_eq!(ring.open("e2e.p", &sealed, 0), Ok(Opened::Plain { payload: payload.clone(), key: [0; 16] }));
            let i = flip.index(sealed.len());
            sealed[i] ^= x;
            prop_assert!(ring.open("e2e.p", &sealed, 0).is_err());
        }
    }
}
