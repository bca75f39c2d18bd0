//! Proved publishers: the seals of PUBLISH_BATCH format 2
//! (docs/PROTOCOL.md §5.3, "Proved publishers").
//!
//! A publisher that signs (a lightweight client, whose messages its gateway
//! forwards into the mesh) puts one **seal** on each batch it sends: its
//! Ed25519 key and one signature over [`macula_wire::seal_hash`] of the
//! digests of the batch's messages ([`macula_wire::event_digest`]), so one
//! signature is amortized over a whole batch. A node forwarding those
//! messages keeps the seal with each one ([`SealRef`]) and, in a batch that
//! carries only some of them, sends the digests of the others, so the
//! receiver can check the signature over exactly what the publisher
//! signed. Receivers verify with [`verify`]; what does not verify is never
//! delivered. Pure: no clock, no I/O.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use macula_wire::{event_digest, seal_hash, NodeId, PublishBatchView, Seal};

/// Domain tag in front of the seal hash in what is signed.
const SIGN_TAG: &[u8] = b"macula pub/sub seal v1";

/// The seal of one batch a publisher signed: its key, its signature and
/// the digests of every message it covers (in seq order). Shared by every
/// forwarded copy of those messages.
#[derive(Debug)]
pub struct SealedRun {
    pub key: [u8; 32],
    pub sig: [u8; 64],
    n: usize,
    digests: OnceLock<Vec<[u8; 32]>>,
    /// The publisher's own batch (a client's, at its gateway): its
    /// digests are computed from it only when a forwarded frame leaves
    /// some of its messages out.
    source: Option<Bytes>,
}

impl SealedRun {
    /// A seal whose digests are known.
    pub fn new(key: [u8; 32], sig: [u8; 64], digests: Vec<[u8; 32]>) -> SealedRun {
        SealedRun {
            key,
            sig,
            n: digests.len(),
            digests: OnceLock::from(digests),
            source: None,
        }
    }

    /// Messages it covers.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The digests of the messages it covers, in order.
    pub fn digests(&self) -> &[[u8; 32]] {
        self.digests.get_or_init(|| {
            let view = self
                .source
                .as_ref()
                .and_then(|b| PublishBatchView::decode(b).ok());
            match view {
                Some(v) if v.entries.len() == self.n => {
                    v.entries.iter().map(|e| digest(&v, e)).collect()
                }
                // Cannot happen (the body decoded before); digests that
                // verify nothing make receivers drop the copies.
                _ => vec![[0; 32]; self.n],
            }
        })
    }
}

/// A forwarded message's place in the seal that proves its publisher.
#[derive(Clone, Debug)]
pub struct SealRef {
    pub run: Arc<SealedRun>,
    /// Index of the message among the seal's digests.
    pub index: u32,
}

/// How a delivered event's publisher is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Proof {
    /// The publisher is this node, or the peer whose authenticated
    /// connection carried the event (its node ID proved in TLS).
    #[default]
    Connection,
    /// The publisher's signature over the event (a seal) verified here.
    Signed,
    /// Named by the gateway this client attached to, not proved end to
    /// end (an unsigned publisher's event forwarded to a client).
    Asserted,
}

impl Proof {
    /// Whether the publisher is proved (not just asserted by a gateway).
    pub fn is_proved(self) -> bool {
        !matches!(self, Proof::Asserted)
    }
}

/// Why a batch's publisher was not proved (its messages are dropped).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// Forwarded (the publisher is not the sender) but carries no seal.
    #[error("forwarded batch of {publisher} carries no seal")]
    Unsealed { publisher: NodeId },
    /// The seal's key is not the publisher's (its node ID is another).
    #[error("seal key is not the key of publisher {publisher}")]
    WrongKey { publisher: NodeId },
    /// The key is not a valid Ed25519 point.
    #[error("seal key is not a valid Ed25519 key")]
    BadKey,
    /// The signature does not verify over the messages received.
    #[error("seal signature of {publisher} does not verify")]
    BadSignature { publisher: NodeId },
}

impl ProofError {
    /// A short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProofError::Unsealed { .. } => "unsealed",
            ProofError::WrongKey { .. } => "wrong_key",
            ProofError::BadKey => "bad_key",
            ProofError::BadSignature { .. } => "bad_signature",
        }
    }
}

/// A node's key for sealing the batches it publishes.
pub struct Signer {
    key: SigningKey,
    public: [u8; 32],
}

impl Signer {
    pub fn new(key: SigningKey) -> Signer {
        let public = key.verifying_key().to_bytes();
        Signer { key, public }
    }

    /// The seal over `digests` of all the messages of one batch.
    pub fn seal(&self, publisher: &NodeId, epoch: u64, digests: &[[u8; 32]]) -> Seal {
        let n = digests.len();
        let mut present = vec![0xffu8; n.div_ceil(8)];
        if !n.is_multiple_of(8) {
            if let Some(last) = present.last_mut() {
                *last = (1u8 << (n % 8)) - 1;
            }
        }
        Seal {
            key: self.public,
            sig: sign(&self.key, publisher, epoch, digests),
            n,
            present,
            absent: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

/// Signs the digests of messages `publisher` published under `epoch`.
pub fn sign(key: &SigningKey, publisher: &NodeId, epoch: u64, digests: &[[u8; 32]]) -> [u8; 64] {
    let hash = seal_hash(publisher, epoch, digests);
    let mut msg = [0u8; SIGN_TAG.len() + 32];
    msg[..SIGN_TAG.len()].copy_from_slice(SIGN_TAG);
    msg[SIGN_TAG.len()..].copy_from_slice(&hash);
    key.sign(&msg).to_bytes()
}

/// The places of `view`'s entries in its one seal, trusted without
/// verification: `view` came from its publisher itself (a client, to its
/// gateway), whose connection proves it; the receivers of the copies
/// verify the seal. Digests are computed from `body` only if a copy needs
/// them. `None`: not one seal covering every entry (then [`verify`]).
pub fn adopt(view: &PublishBatchView<'_>, body: &Bytes) -> Option<Vec<SealRef>> {
    let [seal] = view.seals.as_slice() else {
        return None;
    };
    if seal.n != view.entries.len() || !seal.absent.is_empty() {
        return None;
    }
    let run = Arc::new(SealedRun {
        key: seal.key,
        sig: seal.sig,
        n: seal.n,
        digests: OnceLock::new(),
        source: Some(body.clone()),
    });
    Some(
        (0..seal.n as u32)
            .map(|index| SealRef {
                run: run.clone(),
                index,
            })
            .collect(),
    )
}

fn digest(view: &PublishBatchView<'_>, e: &macula_wire::BatchEntry<'_>) -> [u8; 32] {
    event_digest(
        e.seq,
        view.topics.get(e.topic_index).copied().unwrap_or(""),
        e.payload,
        e.headers.iter().copied(),
        e.message_id,
    )
}

/// Checks every seal of `view`: the key is the publisher's, and the
/// signature verifies over the digests of the messages received (computed
/// here) and of those the seal says are absent. Returns each entry's place
/// in its seal (empty for an unsealed batch).
pub fn verify(view: &PublishBatchView<'_>) -> Result<Vec<SealRef>, ProofError> {
    let publisher = view.publisher;
    let mut refs = Vec::with_capacity(if view.seals.is_empty() {
        0
    } else {
        view.entries.len()
    });
    let mut entries = view.entries.iter();
    for seal in &view.seals {
        let run = check_seal(view, seal, &mut entries, &mut refs)?;
        let vk = VerifyingKey::from_bytes(&run.key).map_err(|_| ProofError::BadKey)?;
        if NodeId::from_public_key(&run.key) != publisher {
            return Err(ProofError::WrongKey { publisher });
        }
        let hash = seal_hash(&publisher, view.epoch, run.digests());
        let mut msg = [0u8; SIGN_TAG.len() + 32];
        msg[..SIGN_TAG.len()].copy_from_slice(SIGN_TAG);
        msg[SIGN_TAG.len()..].copy_from_slice(&hash);
        vk.verify(&msg, &Signature::from_bytes(&run.sig))
            .map_err(|_| ProofError::BadSignature { publisher })?;
    }
    Ok(refs)
}

/// The digests one seal covers, with the places of the entries it covers
/// appended to `refs`.
fn check_seal<'a, 'b: 'a>(
    view: &PublishBatchView<'b>,
    seal: &Seal,
    entries: &mut impl Iterator<Item = &'a macula_wire::BatchEntry<'b>>,
    refs: &mut Vec<SealRef>,
) -> Result<Arc<SealedRun>, ProofError> {
    let mut digests = Vec::with_capacity(seal.n);
    let mut absent = seal.absent.iter();
    let mut places = Vec::with_capacity(seal.n);
    for i in 0..seal.n {
        let d = if seal.is_present(i) {
            // The decoder checked that the seals cover the entries exactly.
            let Some(e) = entries.next() else {
                return Err(ProofError::BadSignature {
                    publisher: view.publisher,
                });
            };
            places.push(i as u32);
            digest(view, e)
        } else {
            match absent.next() {
                Some(d) => *d,
                None => {
                    return Err(ProofError::BadSignature {
                        publisher: view.publisher,
                    })
                }
            }
        };
        digests.push(d);
    }
    let run = Arc::new(SealedRun::new(seal.key, seal.sig, digests));
    refs.extend(places.into_iter().map(|index| SealRef {
        run: run.clone(),
        index,
    }));
    Ok(run)
}

/// Fuzz entry point for sealed batches: the PUBLISH_BATCH decoder's round
/// trip (`macula_wire::pubsub::fuzz_publish_batch`), then [`verify`] on
/// whatever decodes: it must answer, never panic. Shared by
/// `fuzz/fuzz_targets/publish_batch.rs` and the property tests.
pub fn fuzz_sealed_batch(data: &[u8]) {
    macula_wire::pubsub::fuzz_publish_batch(data);
    if let Ok(view) = PublishBatchView::decode(data) {
        let refs = verify(&view);
        if let Ok(refs) = refs {
            assert_eq!(
                refs.len(),
                if view.seals.is_empty() {
                    0
                } else {
                    view.entries.len()
                }
            );
        }
    }
}
