//! Proved publishers: the seals of PUBLISH_BATCH format 2
//! (docs/PROTOCOL.md §5.3, "Proved publishers").
//!
//! A publisher that signs (a lightweight client, whose messages its gateway
//! forwards into the mesh) puts one **seal** on each batch it sends: its
//! Ed25519 key and one signature over [`macula_wire::seal_hash`] of the
//! digests of the batch's messages ([`macula_wire::event_digest`]), so one
//! signature is amortized over a whole batch. A node forwarding those
//! messages keeps the seal with them ([`SealPlaces`]) and, in a batch that
//! carries only some of them, sends the digests of the others, so the
//! receiver can check the signature over exactly what the publisher
//! signed. Receivers verify with [`verify`]; what does not verify is never
//! delivered. Pure: no clock, no I/O.
//!
//! A seal of kind 2 (format 3, PROTOCOL.md §5.3 "Seals over the whole")
//! signs a hash of two hashes: the messages hashed as one input
//! ([`macula_wire::seal_whole`]) and the [`seal_hash`] of their digests.
//! It carries the one its receiver does not compute: a receiver of all its
//! messages hashes them whole (no digest per message), one of some
//! computes their digests.
//!
//! A seal of kind 3 (format 3, PROTOCOL.md §5.3 "Seals over topic
//! groups") signs one digest per topic group (its messages of one topic,
//! in order, hashed as one input: [`macula_wire::WholeHasher::group`]):
//! neither the publisher nor a receiver hashes a message alone. A copy
//! carries whole groups and the digests of the others; a forwarder that
//! would send part of a group leaves that part out and reports it lost
//! ([`SealedRun::group_copy`]).
//!
//! A seal of kind 4 (format 3, PROTOCOL.md §5.3 "Seals over aligned
//! digests") signs the root of a tree ([`SealTree`]) over another digest
//! per message ([`macula_wire::event_digest_aligned`]: the payload hashed
//! from its own byte 0, then bound with the other fields), for large
//! messages: BLAKE3 hashes every whole 1 KiB chunk of a payload in
//! parallel, nothing is gathered or copied, and a frame of a few of a
//! large seal's messages carries the hashes of a few subtrees, not one
//! digest per other message.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use macula_wire::{
    event_digest, event_digest_aligned, seal_hash, seal_hash_aligned, seal_hash_groups,
    seal_hash_whole, NodeId, PublishBatchView, Seal, SealHashes, SealTree, WholeHasher,
};

/// Domain tag in front of the seal hash in what is signed (a seal of
/// kind 1, over its messages' digests).
const SIGN_TAG: &[u8] = b"macula pub/sub seal v1";
/// Domain tag in front of the seal hash of a seal of kind 2 (over its
/// messages hashed whole and their digests): the same length as
/// [`SIGN_TAG`], so the two signed messages never coincide.
const SIGN_TAG_WHOLE: &[u8] = b"macula pub/sub seal v2";
const _: () = assert!(SIGN_TAG.len() == SIGN_TAG_WHOLE.len());
/// Domain tag in front of the seal hash of a seal of kind 3 (over its
/// topic groups' digests), the same length again.
const SIGN_TAG_GROUPS: &[u8] = b"macula pub/sub seal v3";
const _: () = assert!(SIGN_TAG.len() == SIGN_TAG_GROUPS.len());
/// Domain tag in front of the seal hash of a seal of kind 4 (over its
/// messages' aligned digests), the same length again.
const SIGN_TAG_ALIGNED: &[u8] = b"macula pub/sub seal v4";
const _: () = assert!(SIGN_TAG.len() == SIGN_TAG_ALIGNED.len());

/// The seal of one batch a publisher signed: its key, its signature and
/// the digests of every message it covers (in seq order). Shared by every
/// forwarded copy of those messages.
#[derive(Debug)]
pub struct SealedRun {
    pub key: [u8; 32],
    pub sig: [u8; 64],
    n: usize,
    /// A seal of kind 2 (format 3): its signature covers the messages
    /// hashed whole and the hash of their digests.
    whole_kind: bool,
    /// A seal of kind 3 (format 3): its signature covers the digests of
    /// its topic groups.
    groups_kind: bool,
    /// A seal of kind 4 (format 3): kind 1 over the messages' aligned
    /// digests ([`event_digest_aligned`]).
    aligned_kind: bool,
    /// Kind 3: the group of each message and the groups' digests.
    groups: OnceLock<Groups>,
    /// Kind 3: at least as many as its groups known here (what the
    /// digests a copy carries are bounded by), counted without hashing.
    n_groups: usize,
    publisher: NodeId,
    epoch: u64,
    digests: OnceLock<Vec<[u8; 32]>>,
    /// Kind 4: its tree as far as known here (every node, at a publisher;
    /// the messages received and the subtrees carried, elsewhere).
    tree: OnceLock<SealTree>,
    /// Kind 2: the messages hashed whole ([`macula_wire::seal_whole`]),
    /// sent to a receiver of some of them.
    whole: OnceLock<[u8; 32]>,
    /// Kind 2: the [`seal_hash`] of the digests, sent to a receiver of
    /// all of them.
    digests_hash: OnceLock<[u8; 32]>,
    /// The frame the seal came in (a client's, at its gateway; a
    /// forwarded one, at a node that verified it): the digests of its
    /// messages are computed from it only when a forwarded frame leaves
    /// some of them out.
    source: Option<Source>,
}

/// The topic groups of a seal of kind 3 as a node knows them.
#[derive(Debug, Default)]
struct Groups {
    /// Per message of the seal: its group (an index into `digests`), or
    /// `u32::MAX` when it is not in the frame the seal came in.
    of: Vec<u32>,
    /// Messages of each group present in that frame.
    count: Vec<u32>,
    /// Digests of the groups present in that frame, in the order of
    /// `count`, then those of the groups it carried (absent from it).
    digests: Vec<[u8; 32]>,
}

/// What a copy of a seal of kind 3 carries ([`SealedRun::group_copy`]).
#[derive(Debug, Default)]
pub struct GroupCopy {
    /// The digests of the groups none of whose messages the copy has.
    pub absent: Vec<[u8; 32]>,
    /// Messages of the seal (indices) the copy must leave out: it has
    /// only part of their group (counted and reported lost).
    pub drop: Vec<u32>,
}

/// A publisher's frame as it came: its body, and its seal's bitmap of the
/// messages in it and digests of the others (a seal spanning frames).
#[derive(Debug)]
struct Source {
    body: Bytes,
    /// The index among the frame's entries of the first this seal covers
    /// (a frame carrying several seals).
    first: usize,
    present: Vec<u8>,
    /// A slice of the frame the seal came in (no copy), when decoded from
    /// its bytes ([`PublishBatchView::decode_shared`]).
    absent: SealHashes,
}

impl SealedRun {
    /// A seal of kind 1 whose digests are known.
    pub fn new(key: [u8; 32], sig: [u8; 64], digests: Vec<[u8; 32]>) -> SealedRun {
        SealedRun {
            key,
            sig,
            n: digests.len(),
            whole_kind: false,
            groups_kind: false,
            aligned_kind: false,
            groups: OnceLock::new(),
            n_groups: 0,
            publisher: NodeId::from_bytes([0; 32]),
            epoch: 0,
            digests: OnceLock::from(digests),
            tree: OnceLock::new(),
            whole: OnceLock::new(),
            digests_hash: OnceLock::new(),
            source: None,
        }
    }

    /// A seal as it came in `view` (from `body`), its messages from
    /// entry `first` on; what it carried is kept, the rest computed
    /// when a copy needs it.
    fn from_seal(view: &PublishBatchView<'_>, seal: &Seal, body: &Bytes, first: usize) -> Self {
        let run = SealedRun {
            key: seal.key,
            sig: seal.sig,
            n: seal.n,
            whole_kind: seal.carried.is_some(),
            groups_kind: seal.groups,
            aligned_kind: seal.aligned,
            groups: OnceLock::new(),
            n_groups: match seal.groups {
                true => seal.absent.len() + topics_in(view, first, seal.present_count()),
                false => 0,
            },
            publisher: view.publisher,
            epoch: view.epoch,
            digests: OnceLock::new(),
            tree: OnceLock::new(),
            whole: OnceLock::new(),
            digests_hash: OnceLock::new(),
            source: Some(Source {
                body: body.clone(),
                first,
                present: seal.present.clone(),
                absent: seal.absent.clone(),
            }),
        };
        if let Some(c) = seal.carried {
            let _ = match seal.is_complete() {
                true => run.digests_hash.set(c),
                false => run.whole.set(c),
            };
        }
        run
    }

    /// Whether the seal is of kind 2 (format 3: see [`Seal::carried`]).
    pub fn is_whole_kind(&self) -> bool {
        self.whole_kind
    }

    /// Whether the seal is of kind 3 (topic groups: see [`Seal::groups`]).
    pub fn is_groups_kind(&self) -> bool {
        self.groups_kind
    }

    /// Whether the seal is of kind 4 (aligned digests: see
    /// [`Seal::aligned`]).
    pub fn is_aligned_kind(&self) -> bool {
        self.aligned_kind
    }

    /// Kind 3: at least as many as its groups known here (those of the
    /// frame it came in, and those it carried digests of).
    pub fn group_count(&self) -> usize {
        self.n_groups
    }

    /// Kind 3: what a copy whose messages are `present` (the seal's
    /// bitmap) carries: the digests of the groups it has none of, and
    /// the messages it must leave out because it has only part of their
    /// group (their digest is then sent in their place, so the rest of
    /// the copy still verifies).
    pub fn group_copy(&self, present: &[u8]) -> GroupCopy {
        let g = self.groups();
        let mut here = vec![0u32; g.count.len()];
        let is = |i: usize| present.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
        for (i, &grp) in g.of.iter().enumerate() {
            if is(i) {
                if let Some(h) = here.get_mut(grp as usize) {
                    *h += 1;
                }
            }
        }
        let mut out = GroupCopy::default();
        for (grp, (&h, &c)) in here.iter().zip(&g.count).enumerate() {
            if h != c {
                out.absent.push(g.digests[grp]);
                if h > 0 {
                    out.drop.extend(
                        (0..g.of.len() as u32)
                            .filter(|&i| g.of[i as usize] as usize == grp && is(i as usize)),
                    );
                }
            }
        }
        out.absent.extend_from_slice(&g.digests[g.count.len()..]);
        out
    }

    /// Kind 3: the groups, computed from the source frame if not known.
    fn groups(&self) -> &Groups {
        self.groups.get_or_init(|| {
            self.with_source(|src, v, entries| {
                let present = |i: usize| {
                    src.present
                        .get(i / 8)
                        .is_some_and(|b| b & (1 << (i % 8)) != 0)
                };
                let mut g = group_entries(v, entries, self.n, present);
                g.digests.extend_from_slice(&src.absent);
                g
            })
        })
    }

    /// What a copy of this seal carries besides its messages and the
    /// digests of the others (kind 2): the digests' hash when it has all
    /// its messages (`complete`), else the messages' whole hash. `None`
    /// for kind 1.
    pub fn carried(&self, complete: bool) -> Option<[u8; 32]> {
        if !self.whole_kind {
            return None;
        }
        Some(match complete {
            true => *self
                .digests_hash
                .get_or_init(|| seal_hash(&self.publisher, self.epoch, self.digests())),
            false => *self.whole.get_or_init(|| self.whole_from_source()),
        })
    }

    /// The whole hash of the source frame's messages, when it carries
    /// them all (else it carried the hash, set at construction).
    fn whole_from_source(&self) -> [u8; 32] {
        let Some(src) = &self.source else {
            return [0; 32];
        };
        let Ok(v) = PublishBatchView::decode_shared(&src.body) else {
            return [0; 32];
        };
        let Some(entries) = v.entries.get(src.first..src.first + self.n) else {
            return [0; 32];
        };
        whole_of(&v, entries)
    }

    /// Messages it covers.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The digests the publisher's own frame carried for the messages not
    /// in it, when `present` is that frame's bitmap: a copy forwarding
    /// exactly the frame's messages sends them as they came, no digest
    /// computed.
    pub fn as_sent(&self, present: &[u8]) -> Option<&SealHashes> {
        let src = self.source.as_ref()?;
        (src.present == present).then_some(&src.absent)
    }

    /// Kind 4: the hashes a copy whose messages are `present` (the
    /// seal's bitmap, within the messages this node got) carries: those
    /// of the maximal subtrees with none of them, from the tree as known
    /// here (computed once from the source frame).
    pub fn tree_absent(&self, present: &[u8]) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        let tree = self.tree();
        if tree.len() != self.n || tree.absent(present, &mut out).is_none() {
            // Not within what came here (cannot happen: a copy holds
            // messages received): hashes that verify nothing, so the
            // receiver drops the copy (counted), never delivers it.
            out.clear();
            out.resize(
                macula_wire::seal_tree_absent_count(self.n, present),
                [0; 32],
            );
        }
        out
    }

    /// Whether `other` is a copy of this seal from another of its
    /// publisher's frames (the same key, signature, count and kind: a seal
    /// of kind 1 or 4 spanning frames), so a forwarder may send their
    /// messages under one entry. A pointer check first; kinds 2 and 3
    /// never span frames.
    pub fn same_signature(&self, other: &SealedRun) -> bool {
        std::ptr::eq(self, other)
            || (!self.groups_kind
                && !other.groups_kind
                && !self.whole_kind
                && !other.whole_kind
                && self.aligned_kind == other.aligned_kind
                && self.n == other.n
                && self.sig == other.sig
                && self.key == other.key
                && self.publisher == other.publisher
                && self.epoch == other.epoch)
    }

    /// Kind 4: [`SealedRun::tree_absent`] of a copy holding messages of
    /// several of the publisher's frames of one seal (`runs`, each its
    /// [`SealedRun`], [`SealedRun::same_signature`]). A maximal subtree
    /// with none of the copy's messages is one the frame holding its
    /// sibling's messages carried, so a copy of whole frames is given
    /// hashes as they came, none computed; one of part of a frame, from
    /// that frame's tree (computed once).
    pub fn tree_absent_among(runs: &[&Arc<SealedRun>], present: &[u8]) -> Vec<[u8; 32]> {
        let Some(first) = runs.first() else {
            return Vec::new();
        };
        let n = first.n;
        let mut want = Vec::new();
        macula_wire::seal_tree_absent(n, present, &mut want);
        // What each frame carried, by leaf range (nothing hashed).
        let carried: Vec<Vec<(usize, usize)>> = runs
            .iter()
            .map(|r| {
                let mut ranges = Vec::new();
                if let Some(src) = &r.source {
                    macula_wire::seal_tree_absent(n, &src.present, &mut ranges);
                }
                ranges
            })
            .collect();
        let mut out = Vec::with_capacity(want.len());
        for &(lo, hi) in &want {
            let sent = runs.iter().zip(&carried).find_map(|(r, c)| {
                let at = c.iter().position(|&x| x == (lo, hi))?;
                r.source.as_ref()?.absent.get(at).copied()
            });
            let known = sent.or_else(|| {
                runs.iter().find_map(|r| {
                    let tree = r.tree();
                    match tree.len() == n {
                        true => tree.node(lo, hi),
                        false => None,
                    }
                })
            });
            match known {
                Some(h) => out.push(h),
                None => {
                    // Not within what came here (cannot happen: a copy
                    // holds messages received): hashes that verify
                    // nothing, so the receiver drops the copy (counted).
                    out.clear();
                    out.resize(want.len(), [0; 32]);
                    return out;
                }
            }
        }
        out
    }

    /// Kind 4: the tree, computed from the source frame if not known.
    fn tree(&self) -> &SealTree {
        self.tree.get_or_init(|| {
            self.with_source(|src, v, entries| {
                let leaves = entries.iter().map(|e| digest(v, e, true));
                SealTree::from_part(self.n, &src.present, leaves, &src.absent).unwrap_or_default()
            })
        })
    }

    /// `f` of the source frame, decoded, and the entries this seal covers
    /// in it; the default when there is no source or it does not decode.
    fn with_source<T: Default>(
        &self,
        f: impl FnOnce(&Source, &PublishBatchView<'_>, &[macula_wire::BatchEntry<'_>]) -> T,
    ) -> T {
        let Some(src) = &self.source else {
            return T::default();
        };
        let Ok(v) = PublishBatchView::decode_shared(&src.body) else {
            return T::default();
        };
        let k: usize = src.present.iter().map(|b| b.count_ones() as usize).sum();
        match v.entries.get(src.first..src.first + k) {
            Some(entries) => f(src, &v, entries),
            None => T::default(),
        }
    }

    /// The digests of the messages it covers, in order (kinds 1 and 2;
    /// kind 4 carries subtree hashes instead: [`SealedRun::tree_absent`]).
    pub fn digests(&self) -> &[[u8; 32]] {
        self.digests.get_or_init(|| {
            let (Some(src), n) = (&self.source, self.n) else {
                return vec![[0; 32]; self.n];
            };
            let Ok(v) = PublishBatchView::decode_shared(&src.body) else {
                // Cannot happen (the body decoded before); digests that
                // verify nothing make receivers drop the copies.
                return vec![[0; 32]; n];
            };
            let (mut entries, mut absent) = (v.entries.iter().skip(src.first), src.absent.iter());
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let present = src
                    .present
                    .get(i / 8)
                    .is_some_and(|b| b & (1 << (i % 8)) != 0);
                let d = match present {
                    true => entries.next().map(|e| digest(&v, e, self.aligned_kind)),
                    false => absent.next().copied(),
                };
                out.push(d.unwrap_or([0; 32]));
            }
            out
        })
    }
}

/// A forwarded message's place in the seal that proves its publisher:
/// which of its batch's seals (an index into [`SealPlaces::runs`], which
/// the message's [`crate::Origin`] carries) and its index among that
/// seal's messages. Plain numbers: a message and each of its copies
/// touch no reference count for their seal (the origin, shared by the
/// batch's messages, holds the seals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealPlace {
    /// Index of the seal among the batch's seals.
    pub seal: u32,
    /// Index of the message among the seal's digests.
    pub index: u32,
}

/// The seals of one batch ([`SealedRun`], one per seal) and each entry's
/// place in them: one reference count per seal, none per message.
#[derive(Clone, Debug, Default)]
pub struct SealPlaces {
    /// The batch's seals, in order.
    pub runs: Vec<Arc<SealedRun>>,
    /// Each entry's place (empty for an unsealed batch).
    pub places: Vec<SealPlace>,
}

impl SealPlaces {
    /// Entries placed.
    pub fn len(&self) -> usize {
        self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    pub fn clear(&mut self) {
        self.runs.clear();
        self.places.clear();
    }

    /// Entry `i`'s seal and its index in it.
    pub fn get(&self, i: usize) -> Option<(&Arc<SealedRun>, u32)> {
        let p = self.places.get(i)?;
        Some((self.runs.get(p.seal as usize)?, p.index))
    }

    /// Each entry's seal and index, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<SealedRun>, u32)> + '_ {
        (0..self.places.len()).filter_map(|i| self.get(i))
    }

    /// Appends `run` and the places of the messages `seal` says are
    /// present.
    fn push(&mut self, run: Arc<SealedRun>, seal: &Seal) {
        let no = self.runs.len() as u32;
        self.runs.push(run);
        self.places.extend(
            (0..seal.n as u32)
                .filter(|&i| seal.is_present(i as usize))
                .map(|index| SealPlace { seal: no, index }),
        );
    }
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
    groups: bool,
    aligned: bool,
}

impl Signer {
    /// Seals a frame of small messages by topic groups (kind 3).
    pub fn new(key: SigningKey) -> Signer {
        let public = key.verifying_key().to_bytes();
        Signer {
            key,
            public,
            groups: true,
            aligned: true,
        }
    }

    /// Seals large messages as before kind 4 (kind 1, digests over the
    /// payload gathered with the other fields): for meshes whose nodes
    /// read format 3 but not kind 4 seals.
    pub fn without_aligned(self) -> Signer {
        Signer {
            aligned: false,
            ..self
        }
    }

    /// Whether large messages are sealed over aligned digests (kind 4).
    pub fn seals_aligned(&self) -> bool {
        self.aligned
    }

    /// Seals as before kind 3 (a frame of small messages in seals of kind
    /// 2 of at most 256): for meshes whose nodes read format 3 but not
    /// kind 3 seals.
    pub fn without_groups(self) -> Signer {
        Signer {
            groups: false,
            aligned: false,
            ..self
        }
    }

    /// Whether a frame of small messages is sealed by topic groups.
    pub fn seals_groups(&self) -> bool {
        self.groups
    }

    /// The seal over `digests` of all the messages of one batch.
    pub fn seal(&self, publisher: &NodeId, epoch: u64, digests: &[[u8; 32]]) -> Seal {
        let sig = self.sign(publisher, epoch, digests);
        self.seal_part(sig, digests, 0..digests.len())
    }

    /// Signs, in a seal of kind 2, messages this node publishes as
    /// `publisher`: `whole`, their [`macula_wire::seal_whole`] hash, and
    /// `digests`, their digests. Returns the signature and the digests'
    /// [`seal_hash`] (what a frame carrying all of them carries).
    pub fn sign_whole(
        &self,
        publisher: &NodeId,
        epoch: u64,
        whole: &[u8; 32],
        digests: &[[u8; 32]],
    ) -> ([u8; 64], [u8; 32]) {
        let digests_hash = seal_hash(publisher, epoch, digests);
        let msg = signed_message(Tag::Whole, &seal_hash_whole(whole, &digests_hash));
        (self.key.sign(&msg).to_bytes(), digests_hash)
    }

    /// The seal of kind 2 `sig` of `n` messages, as the frame carrying all
    /// of them sends it (with their digests' hash).
    pub fn seal_complete(&self, sig: [u8; 64], n: usize, digests_hash: [u8; 32]) -> Seal {
        let mut present = vec![0xffu8; n.div_ceil(8)];
        if !n.is_multiple_of(8) {
            if let Some(last) = present.last_mut() {
                *last = (1u8 << (n % 8)) - 1;
            }
        }
        Seal {
            key: self.public,
            sig,
            n,
            present,
            absent: SealHashes::default(),
            carried: Some(digests_hash),
            groups: false,
            aligned: false,
        }
    }

    /// Signs, in a seal of kind 3, the `n` messages this node publishes
    /// as `publisher` whose topic groups' digests are `groups` (sorted
    /// here).
    pub fn sign_groups(
        &self,
        publisher: &NodeId,
        epoch: u64,
        n: usize,
        groups: &mut [[u8; 32]],
    ) -> [u8; 64] {
        let hash = seal_hash_groups(publisher, epoch, n, groups);
        self.key
            .sign(&signed_message(Tag::Groups, &hash))
            .to_bytes()
    }

    /// The seal of kind 3 `sig` of `n` messages, as the frame carrying all
    /// of them sends it.
    pub fn seal_groups_complete(&self, sig: [u8; 64], n: usize) -> Seal {
        Seal {
            carried: None,
            groups: true,
            ..self.seal_complete(sig, n, [0; 32])
        }
    }

    /// Signs, in a seal of kind 4, the root of `tree`, the tree over the
    /// aligned digests ([`event_digest_aligned`]) of messages this node
    /// publishes as `publisher`; its seals are [`Signer::seal_tree_part`].
    pub fn sign_tree(&self, publisher: &NodeId, epoch: u64, tree: &SealTree) -> [u8; 64] {
        let root = tree.root().unwrap_or_default();
        let hash = seal_hash_aligned(publisher, epoch, tree.len(), &root);
        self.key
            .sign(&signed_message(Tag::Aligned, &hash))
            .to_bytes()
    }

    /// Signs, in a seal of kind 4, the aligned digests `digests` (the
    /// root of their tree).
    pub fn sign_aligned(&self, publisher: &NodeId, epoch: u64, digests: &[[u8; 32]]) -> [u8; 64] {
        self.sign_tree(publisher, epoch, &SealTree::new(digests))
    }

    /// The seal of kind 4 over all of `digests` (aligned digests) of one
    /// batch.
    pub fn seal_aligned(&self, publisher: &NodeId, epoch: u64, digests: &[[u8; 32]]) -> Seal {
        let tree = SealTree::new(digests);
        let sig = self.sign_tree(publisher, epoch, &tree);
        self.seal_tree_part(sig, &tree, 0..digests.len())
    }

    /// The seal of kind 4 `sig` (over the root of `tree`) as the frame
    /// carrying the messages `range` sends it: those present, the hashes
    /// of the maximal subtrees with none of them.
    pub fn seal_tree_part(
        &self,
        sig: [u8; 64],
        tree: &SealTree,
        range: std::ops::Range<usize>,
    ) -> Seal {
        let n = tree.len();
        let present = present_bits(n, range);
        let mut absent = Vec::new();
        // The publisher's tree knows every node.
        let _ = tree.absent(&present, &mut absent);
        Seal {
            key: self.public,
            sig,
            n,
            present,
            absent: absent.into(),
            carried: None,
            groups: false,
            aligned: true,
        }
    }

    /// Signs the digests of messages this node publishes as `publisher`.
    pub fn sign(&self, publisher: &NodeId, epoch: u64, digests: &[[u8; 32]]) -> [u8; 64] {
        sign(&self.key, publisher, epoch, digests)
    }

    /// The seal `sig` (over all of `digests`) as the frame carrying the
    /// messages `range` sends it: those present, the others' digests.
    pub fn seal_part(
        &self,
        sig: [u8; 64],
        digests: &[[u8; 32]],
        range: std::ops::Range<usize>,
    ) -> Seal {
        let n = digests.len();
        let present = present_bits(n, range.clone());
        let mut absent = Vec::with_capacity(n - range.len());
        absent.extend_from_slice(&digests[..range.start]);
        absent.extend_from_slice(&digests[range.end..]);
        Seal {
            key: self.public,
            sig,
            n,
            present,
            absent: absent.into(),
            carried: None,
            groups: false,
            aligned: false,
        }
    }
}

/// The bitmap of a seal of `n` messages whose present ones are `range`.
fn present_bits(n: usize, range: std::ops::Range<usize>) -> Vec<u8> {
    let mut present = vec![0u8; n.div_ceil(8)];
    for i in range {
        present[i / 8] |= 1 << (i % 8);
    }
    present
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

/// Signs the digests of messages `publisher` published under `epoch`.
pub fn sign(key: &SigningKey, publisher: &NodeId, epoch: u64, digests: &[[u8; 32]]) -> [u8; 64] {
    let msg = signed_message(Tag::Digests, &seal_hash(publisher, epoch, digests));
    key.sign(&msg).to_bytes()
}

/// The places of `view`'s entries in its seals (one or several), trusted
/// without verification: `view` came from its publisher itself (a client,
/// to its gateway), whose connection proves it; the receivers of the
/// copies verify the seals. Digests are computed from `body` only if a
/// copy needs them. `None`: no seal, or seals that do not cover the
/// entries exactly (the decoder refuses those; then [`verify`]).
pub fn adopt(view: &PublishBatchView<'_>, body: &Bytes) -> Option<SealPlaces> {
    // The decoder checked that the seals cover the entries exactly, in
    // order; the others a seal covers (a seal spanning the publisher's
    // frames) come as digests.
    let covered: usize = view.seals.iter().map(Seal::present_count).sum();
    if view.seals.is_empty() || covered != view.entries.len() {
        return None;
    }
    let mut refs = SealPlaces {
        runs: Vec::with_capacity(view.seals.len()),
        places: Vec::with_capacity(view.entries.len()),
    };
    for seal in &view.seals {
        let run = Arc::new(SealedRun::from_seal(view, seal, body, refs.len()));
        refs.push(run, seal);
    }
    Some(refs)
}

/// The whole hash ([`macula_wire::seal_whole`]) of `entries` of `view`.
fn whole_of(view: &PublishBatchView<'_>, entries: &[macula_wire::BatchEntry<'_>]) -> [u8; 32] {
    let mut h = WholeHasher::new(&view.publisher, view.epoch, entries.len());
    for e in entries {
        h.add(
            e.seq,
            view.topics.get(e.topic_index).copied().unwrap_or(""),
            e.payload,
            e.headers.iter().copied(),
            e.message_id,
        );
    }
    h.finish()
}

/// Distinct topic indices of `k` entries of `view` from `first` on.
fn topics_in(view: &PublishBatchView<'_>, first: usize, k: usize) -> usize {
    let mut seen = [0u64; 4];
    let mut count = 0;
    for e in view.entries.iter().skip(first).take(k) {
        let t = e.topic_index % 256;
        if seen[t / 64] & (1 << (t % 64)) == 0 {
            seen[t / 64] |= 1 << (t % 64);
            count += 1;
        }
    }
    count
}

/// The topic groups of `entries` of `view`, the present messages of a
/// seal of `n` (`present(i)`: message `i` of the seal is among them):
/// each group's messages hashed as one input, in order.
fn group_entries(
    view: &PublishBatchView<'_>,
    entries: &[macula_wire::BatchEntry<'_>],
    n: usize,
    present: impl Fn(usize) -> bool,
) -> Groups {
    let mut g = Groups {
        of: vec![u32::MAX; n],
        count: Vec::new(),
        digests: Vec::new(),
    };
    // Two passes: each message's group and each group's size (so its
    // hasher gathers with no buffer growth), then the hashing.
    // (topic, bytes) per group; the last one used first looked at.
    let mut sizes: Vec<(&str, usize)> = Vec::new();
    let mut last = 0usize;
    let mut it = entries.iter();
    for i in 0..n {
        if !present(i) {
            continue;
        }
        let Some(e) = it.next() else { break };
        let topic = view.topics.get(e.topic_index).copied().unwrap_or("");
        let grp = match sizes.get(last) {
            Some((t, _)) if *t == topic => last,
            _ => match sizes.iter().position(|(t, _)| *t == topic) {
                Some(p) => p,
                None => {
                    sizes.push((topic, 0));
                    g.count.push(0);
                    sizes.len() - 1
                }
            },
        };
        last = grp;
        sizes[grp].1 += WholeHasher::added_len(
            topic,
            e.payload.len(),
            e.headers.iter().copied(),
            e.message_id,
        );
        g.of[i] = grp as u32;
        g.count[grp] += 1;
    }
    let mut hashers: Vec<WholeHasher> = sizes
        .iter()
        .map(|&(_, b)| WholeHasher::group_sized(b))
        .collect();
    let mut it = entries.iter();
    for &grp in &g.of {
        if grp == u32::MAX {
            continue;
        }
        let Some(e) = it.next() else { break };
        let topic = view.topics.get(e.topic_index).copied().unwrap_or("");
        if let Some(h) = hashers.get_mut(grp as usize) {
            h.add(
                e.seq,
                topic,
                e.payload,
                e.headers.iter().copied(),
                e.message_id,
            );
        }
    }
    g.digests = hashers.into_iter().map(WholeHasher::finish).collect();
    g
}

/// The digest a seal signs of entry `e`: aligned (kind 4) or not.
fn digest(view: &PublishBatchView<'_>, e: &macula_wire::BatchEntry<'_>, aligned: bool) -> [u8; 32] {
    let topic = view.topics.get(e.topic_index).copied().unwrap_or("");
    match aligned {
        true => event_digest_aligned(
            e.seq,
            topic,
            e.payload,
            e.headers.iter().copied(),
            e.message_id,
        ),
        false => event_digest(
            e.seq,
            topic,
            e.payload,
            e.headers.iter().copied(),
            e.message_id,
        ),
    }
}

/// Checks every seal of `view`: the key is the publisher's, and the
/// signature verifies over the digests of the messages received (computed
/// here) and of those the seal says are absent. Returns each entry's place
/// in its seal (empty for an unsealed batch).
pub fn verify(view: &PublishBatchView<'_>) -> Result<SealPlaces, ProofError> {
    verify_with(view, &mut KeyCache::default())
}

/// Publishers' keys already decoded (an Ed25519 point decompression per
/// seal saved): a few, the most recent first to be replaced.
///
/// It also remembers the last few signatures that verified, with the key
/// and the seal hash they verified over: a seal spanning several of its
/// publisher's frames comes again with each of them (the same signature
/// over the same hash), and a verification gives the same answer every
/// time, so it is checked once.
#[derive(Default)]
pub struct KeyCache {
    keys: Vec<([u8; 32], VerifyingKey)>,
    next: usize,
    /// Key, signed message (its kind's tag and the seal hash), signature.
    verified: Vec<([u8; 32], SignedMessage, [u8; 64])>,
    next_verified: usize,
    /// Keys and the node IDs they derive (a key derivation, two BLAKE3
    /// calls, per seal saved: a seal spanning frames names its key in
    /// each).
    ids: Vec<([u8; 32], NodeId)>,
    next_id: usize,
}

/// Keys a [`KeyCache`] holds at most.
const KEY_CACHE: usize = 8;

impl KeyCache {
    fn verified(&self, key: &[u8; 32], msg: &SignedMessage, sig: &[u8; 64]) -> bool {
        self.verified
            .iter()
            .any(|(k, m, s)| m == msg && k == key && s == sig)
    }

    fn remember(&mut self, key: [u8; 32], hash: SignedMessage, sig: [u8; 64]) {
        if self.verified.len() < KEY_CACHE {
            self.verified.push((key, hash, sig));
        } else {
            self.verified[self.next_verified] = (key, hash, sig);
            self.next_verified = (self.next_verified + 1) % KEY_CACHE;
        }
    }

    /// The node ID of `key` ([`NodeId::from_public_key`]).
    fn id_of(&mut self, key: &[u8; 32]) -> NodeId {
        if let Some((_, id)) = self.ids.iter().find(|(k, _)| k == key) {
            return *id;
        }
        let id = NodeId::from_public_key(key);
        if self.ids.len() < KEY_CACHE {
            self.ids.push((*key, id));
        } else {
            self.ids[self.next_id] = (*key, id);
            self.next_id = (self.next_id + 1) % KEY_CACHE;
        }
        id
    }

    fn get(&mut self, key: &[u8; 32]) -> Result<VerifyingKey, ProofError> {
        if let Some((_, vk)) = self.keys.iter().find(|(k, _)| k == key) {
            return Ok(*vk);
        }
        let vk = VerifyingKey::from_bytes(key).map_err(|_| ProofError::BadKey)?;
        if self.keys.len() < KEY_CACHE {
            self.keys.push((*key, vk));
        } else {
            self.keys[self.next] = (*key, vk);
            self.next = (self.next + 1) % KEY_CACHE;
        }
        Ok(vk)
    }
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// [`verify`] with decoded keys kept in `keys` (a data stream's receiver
/// keeps one: its forwarded batches come from a few publishers): the
/// batch is refused whole if any of its seals fails.
pub fn verify_with(
    view: &PublishBatchView<'_>,
    keys: &mut KeyCache,
) -> Result<SealPlaces, ProofError> {
    let v = verify_each_with(view, None, keys)?;
    match v.failed.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(v.refs),
    }
}

/// What [`verify_each_with`] found: each seal is judged on its own, so a
/// batch carrying several seals loses only the messages of one that fails.
#[derive(Debug, Default)]
pub struct Verified {
    /// Each entry's place in its seal (empty for an unsealed batch),
    /// whether that seal verified or not.
    pub refs: SealPlaces,
    /// The entries (a range of indices) of each seal that did not verify,
    /// and why: never to be delivered.
    pub failed: Vec<(std::ops::Range<usize>, ProofError)>,
}

impl Verified {
    /// Whether entry `i`'s seal failed.
    pub fn is_failed(&self, i: usize) -> bool {
        self.failed.iter().any(|(r, _)| r.contains(&i))
    }

    /// Entries whose seal failed.
    pub fn failed_entries(&self) -> usize {
        self.failed.iter().map(|(r, _)| r.len()).sum()
    }
}

/// Checks each seal of `view` on its own (see [`verify`]): the entries of
/// a seal whose key is not the publisher's, or whose signature does not
/// verify, are listed in [`Verified::failed`]. `Err` only for seals that
/// do not cover the entries (the decoder refuses those). `body`, the
/// bytes `view` was decoded from: a seal of kind 2 that came whole is
/// checked over its messages hashed whole, and their digests (what a copy
/// of some of them forwarded from here needs) computed from `body` only
/// if one is sent; without it, they are computed now.
pub fn verify_each_with(
    view: &PublishBatchView<'_>,
    body: Option<&Bytes>,
    keys: &mut KeyCache,
) -> Result<Verified, ProofError> {
    let mut out = Verified {
        refs: SealPlaces {
            runs: Vec::with_capacity(view.seals.len()),
            places: Vec::with_capacity(if view.seals.is_empty() {
                0
            } else {
                view.entries.len()
            }),
        },
        failed: Vec::new(),
    };
    let mut entries = view.entries.iter();
    // The signatures left to check after the key checks and the cache.
    let mut pending: Vec<Pending> = Vec::new();
    for seal in &view.seals {
        let first = out.refs.len();
        let (run, hash) = check_seal(view, seal, body, &mut entries, &mut out.refs)?;
        match prepare(view, &run, hash, keys) {
            Ok(None) => {}
            Ok(Some((msg, vk))) => pending.push(Pending {
                entries: first..out.refs.len(),
                key: run.key,
                sig: run.sig,
                msg,
                vk,
            }),
            Err(e) => out.failed.push((first..out.refs.len(), e)),
        }
    }
    let publisher = view.publisher;
    // Several signatures of one batch are checked together (one
    // multi-scalar multiplication instead of one per seal); when the
    // batch does not verify, each is checked alone to find which failed.
    let batched = pending.len() > 1 && {
        let msgs: Vec<&[u8]> = pending.iter().map(|p| &p.msg[..]).collect();
        let sigs: Vec<Signature> = pending
            .iter()
            .map(|p| Signature::from_bytes(&p.sig))
            .collect();
        let vks: Vec<VerifyingKey> = pending.iter().map(|p| p.vk).collect();
        ed25519_dalek::verify_batch(&msgs, &sigs, &vks).is_ok()
    };
    for p in pending {
        let ok = batched || p.vk.verify(&p.msg, &Signature::from_bytes(&p.sig)).is_ok();
        match ok {
            true => keys.remember(p.key, p.msg, p.sig),
            false => out
                .failed
                .push((p.entries, ProofError::BadSignature { publisher })),
        }
    }
    out.failed.sort_by_key(|(r, _)| r.start);
    Ok(out)
}

/// A seal whose signature is still to be checked.
struct Pending {
    entries: std::ops::Range<usize>,
    key: [u8; 32],
    sig: [u8; 64],
    msg: SignedMessage,
    vk: VerifyingKey,
}

/// What a seal's signature signs: its kind's tag, then its seal hash.
type SignedMessage = [u8; SIGN_TAG.len() + 32];

/// One seal's key checked, and what its signature must verify over with
/// which key: `None` when the same signature over the same seal hash
/// verified lately (a seal spanning frames). `hash`: what the signature
/// signs, after its tag (see [`signed_message`]).
#[allow(clippy::type_complexity)]
fn prepare(
    view: &PublishBatchView<'_>,
    run: &SealedRun,
    hash: [u8; 32],
    keys: &mut KeyCache,
) -> Result<Option<(SignedMessage, VerifyingKey)>, ProofError> {
    let publisher = view.publisher;
    if keys.id_of(&run.key) != publisher {
        // A key that is not a point is refused as such first.
        keys.get(&run.key)?;
        return Err(ProofError::WrongKey { publisher });
    }
    let tag = match (run.groups_kind, run.whole_kind) {
        _ if run.aligned_kind => Tag::Aligned,
        (true, _) => Tag::Groups,
        (false, true) => Tag::Whole,
        (false, false) => Tag::Digests,
    };
    // The cache holds what was signed, tag included: a signature that
    // verified for one kind is never taken for another.
    let msg = signed_message(tag, &hash);
    if keys.verified(&run.key, &msg, &run.sig) {
        return Ok(None);
    }
    let vk = keys.get(&run.key)?;
    Ok(Some((msg, vk)))
}

/// A seal kind's signing tag.
#[derive(Clone, Copy)]
enum Tag {
    Digests,
    Whole,
    Groups,
    Aligned,
}

/// What a seal's signature signs: its kind's tag, then `hash`.
fn signed_message(tag: Tag, hash: &[u8; 32]) -> SignedMessage {
    let mut msg = [0u8; SIGN_TAG.len() + 32];
    msg[..SIGN_TAG.len()].copy_from_slice(match tag {
        Tag::Digests => SIGN_TAG,
        Tag::Whole => SIGN_TAG_WHOLE,
        Tag::Groups => SIGN_TAG_GROUPS,
        Tag::Aligned => SIGN_TAG_ALIGNED,
    });
    msg[SIGN_TAG.len()..].copy_from_slice(hash);
    msg
}

/// The seal as received, and the hash its signature must sign (after its
/// kind's tag), computed from the entries it covers (their places
/// appended to `refs`) and what it carries: the digests of the absent
/// ones and, kind 2, the hash it carries. A seal of kind 2 with every one
/// of its messages here is checked over the messages hashed whole (one
/// BLAKE3 input, no per-message digest) and the digests' hash it carries.
fn check_seal<'a, 'b: 'a>(
    view: &PublishBatchView<'b>,
    seal: &Seal,
    body: Option<&Bytes>,
    entries: &mut impl Iterator<Item = &'a macula_wire::BatchEntry<'b>>,
    refs: &mut SealPlaces,
) -> Result<(Arc<SealedRun>, [u8; 32]), ProofError> {
    let bad = || ProofError::BadSignature {
        publisher: view.publisher,
    };
    if seal.groups {
        // The decoder checked that the seals cover the entries exactly.
        let first = refs.len();
        let k = seal.present_count();
        let mine = view.entries.get(first..first + k).ok_or_else(bad)?;
        for _ in 0..k {
            entries.next().ok_or_else(bad)?;
        }
        let mut g = group_entries(view, mine, seal.n, |i| seal.is_present(i));
        let mut all = g.digests.clone();
        all.extend_from_slice(&seal.absent);
        let hash = seal_hash_groups(&view.publisher, view.epoch, seal.n, &mut all);
        g.digests.extend_from_slice(&seal.absent);
        let run = SealedRun {
            source: None,
            ..SealedRun::from_seal(view, seal, &Bytes::new(), first)
        };
        let _ = run.groups.set(g);
        let run = Arc::new(run);
        refs.push(run.clone(), seal);
        return Ok((run, hash));
    }
    if let (Some(carried), true) = (seal.carried, seal.is_complete()) {
        // The decoder checked that the seals cover the entries exactly.
        let first = refs.len();
        let mine = view.entries.get(first..first + seal.n).ok_or_else(bad)?;
        for _ in 0..seal.n {
            entries.next().ok_or_else(bad)?;
        }
        let whole = whole_of(view, mine);
        let run = match body {
            Some(body) => SealedRun::from_seal(view, seal, body, first),
            None => {
                let run = SealedRun {
                    source: None,
                    ..SealedRun::from_seal(view, seal, &Bytes::new(), first)
                };
                let _ = run
                    .digests
                    .set(mine.iter().map(|e| digest(view, e, false)).collect());
                run
            }
        };
        let _ = run.whole.set(whole);
        let run = Arc::new(run);
        refs.push(run.clone(), seal);
        return Ok((run, seal_hash_whole(&whole, &carried)));
    }
    if seal.aligned {
        // The root of the tree from the messages here (each hashed as the
        // walk reaches it, nothing gathered) and the subtrees carried; the
        // tree kept for copies forwarded on. The decoder checked that the
        // seals cover the entries exactly (too few: no tree, refused).
        let leaves = entries
            .by_ref()
            .take(seal.present_count())
            .map(|e| digest(view, e, true));
        let tree =
            SealTree::from_part(seal.n, &seal.present, leaves, &seal.absent).ok_or_else(bad)?;
        let root = tree.root().ok_or_else(bad)?;
        let hash = seal_hash_aligned(&view.publisher, view.epoch, seal.n, &root);
        let mut run = SealedRun::new(seal.key, seal.sig, Vec::new());
        run.n = seal.n;
        run.digests = OnceLock::new();
        run.publisher = view.publisher;
        run.epoch = view.epoch;
        run.aligned_kind = true;
        let _ = run.tree.set(tree);
        let run = Arc::new(run);
        refs.push(run.clone(), seal);
        return Ok((run, hash));
    }
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
            digest(view, e, false)
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
    let digests_hash = seal_hash(&view.publisher, view.epoch, &digests);
    let mut run = SealedRun::new(seal.key, seal.sig, digests);
    run.publisher = view.publisher;
    run.epoch = view.epoch;
    let hash = match seal.carried {
        None => digests_hash,
        Some(whole) => {
            run.whole_kind = true;
            let _ = run.whole.set(whole);
            let _ = run.digests_hash.set(digests_hash);
            seal_hash_whole(&whole, &digests_hash)
        }
    };
    let run = Arc::new(run);
    let no = refs.runs.len() as u32;
    refs.runs.push(run.clone());
    refs.places.extend(
        places
            .into_iter()
            .map(|index| SealPlace { seal: no, index }),
    );
    Ok((run, hash))
}

/// Fuzz entry point for sealed batches: the PUBLISH_BATCH decoder's round
/// trip (`macula_wire::pubsub::fuzz_publish_batch`), then [`verify`] on
/// whatever decodes: it must answer, never panic. Shared by
/// `fuzz/fuzz_targets/publish_batch.rs` and the property tests.
pub fn fuzz_sealed_batch(data: &[u8]) {
    macula_wire::pubsub::fuzz_publish_batch(data);
    if let Ok(view) = PublishBatchView::decode(data) {
        // Judged seal by seal: the same places, and failures only within
        // the entries, the whole batch refused exactly when one fails.
        if let Ok(each) = verify_each_with(&view, None, &mut KeyCache::default()) {
            assert!(each.failed.iter().all(|(r, _)| r.end <= view.entries.len()));
            assert_eq!(verify(&view).is_ok(), each.failed.is_empty());
        }
        // With the body kept (a receiver's way): what a copy forwarded
        // on needs is computed from it, whatever it holds.
        let body = Bytes::copy_from_slice(data);
        if let Ok(each) = verify_each_with(&view, Some(&body), &mut KeyCache::default()) {
            for (run, index) in each.refs.iter().take(64) {
                if run.is_groups_kind() {
                    // A copy of this message alone: whatever the seal
                    // held, an answer.
                    let mut present = vec![0u8; run.len().div_ceil(8)];
                    present[index as usize / 8] |= 1 << (index % 8);
                    let copy = run.group_copy(&present);
                    assert!(copy.drop.iter().all(|&i| (i as usize) < run.len()));
                    continue;
                }
                if run.is_aligned_kind() {
                    // A copy of this message alone: one hash per level
                    // at most, whatever the seal held.
                    let mut present = vec![0u8; run.len().div_ceil(8)];
                    present[index as usize / 8] |= 1 << (index % 8);
                    let absent = run.tree_absent(&present);
                    assert_eq!(
                        absent.len(),
                        macula_wire::seal_tree_absent_count(run.len(), &present)
                    );
                    assert!(absent.len() <= macula_wire::seal_tree_depth(run.len()));
                    continue;
                }
                let _ = (run.carried(true), run.carried(false));
                assert_eq!(run.digests().len(), run.len());
            }
        }
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

/// The frame body of the fuzz functions' messages (`(seq, topic index,
/// payload)`) for which `keep` holds, sealed by `seal`: one encoder for
/// payloads borrowed or owned.
fn fuzz_frame<P: AsRef<[u8]>>(
    publisher: &NodeId,
    epoch: u64,
    topics: &[&str],
    msgs: &[(u64, usize, P)],
    keep: &dyn Fn(usize) -> bool,
    seal: &Seal,
) -> Bytes {
    let items = msgs
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, m)| macula_wire::BatchItem {
            seq: m.0,
            topic_index: m.1,
            payload: m.2.as_ref(),
            headers: &[],
            message_id: None,
        });
    let mut buf = Vec::new();
    match macula_wire::encode_sealed_batch_frame(
        &mut buf,
        1 << 20,
        publisher,
        epoch,
        topics,
        items,
        std::slice::from_ref(seal),
    ) {
        Ok(_) => Bytes::copy_from_slice(&buf[macula_wire::frame::FRAME_HEADER_LEN..]),
        Err(e) => panic!("a genuine frame encodes: {e}"),
    }
}

/// Fuzz entry point for seals of kind 3 (topic groups): `data` makes up
/// up to 64 messages on three topics, sealed by a fixed key as one seal
/// of kind 3, and a subset of them, a forwarded copy. The complete frame
/// must verify; the copy ([`SealedRun::group_copy`]: whole groups and the
/// others' digests, part of a group left out) must verify and hold only
/// whole groups; the copy with one byte changed (chosen by `data`) must
/// answer, never panic, and verify only if it decodes to the same
/// messages. Shared by `fuzz/fuzz_targets/publish_batch_groups.rs` and
/// the property tests.
pub fn fuzz_group_copies(data: &[u8]) {
    const TOPICS: [&str; 3] = ["a.x", "b.y", "c.z"];
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    if rest.is_empty() {
        return;
    }
    let at = |i: usize| rest[i % rest.len()];
    let n = 1 + usize::from(head) % 64;
    let key = SigningKey::from_bytes(&[7; 32]);
    let publisher = NodeId::from_public_key(&key.verifying_key().to_bytes());
    let epoch = 5;
    // (seq, topic index, payload)
    let msgs: Vec<(u64, usize, &[u8])> = (0..n)
        .map(|i| {
            let from = i % rest.len();
            let len = usize::from(at(i + 1)) % 24;
            let to = (from + len).min(rest.len());
            (i as u64 + 1, usize::from(at(i)) % 3, &rest[from..to])
        })
        .collect();
    let mut groups: Vec<[u8; 32]> = (0..3)
        .filter(|t| msgs.iter().any(|m| m.1 == *t))
        .map(|t| {
            macula_wire::group_digest(msgs.iter().filter(|m| m.1 == t).map(|m| {
                (
                    m.0,
                    TOPICS[m.1],
                    m.2,
                    std::iter::empty::<(&str, &str)>(),
                    None,
                )
            }))
        })
        .collect();
    let signer = Signer::new(key);
    let sig = signer.sign_groups(&publisher, epoch, n, &mut groups);
    let seal = signer.seal_groups_complete(sig, n);
    let encode = |keep: &dyn Fn(usize) -> bool, seal: &Seal| -> Bytes {
        fuzz_frame(&publisher, epoch, &TOPICS, &msgs, keep, seal)
    };
    let body = encode(&|_| true, &seal);
    let Ok(view) = PublishBatchView::decode(&body) else {
        panic!("a genuine frame decodes");
    };
    assert_eq!(verify(&view).map(|r| r.len()).ok(), Some(n));
    // A copy of some: whole groups, the others' digests.
    let Some(refs) = adopt(&view, &body) else {
        panic!("a complete seal is adopted");
    };
    let run = &refs.runs[0];
    let mut present = vec![0u8; n.div_ceil(8)];
    for i in (0..n).filter(|&i| at(3 * i + 2) & 1 == 1) {
        present[i / 8] |= 1 << (i % 8);
    }
    let copy = run.group_copy(&present);
    for &i in &copy.drop {
        present[i as usize / 8] &= !(1 << (i % 8));
    }
    if present.iter().all(|&b| b == 0) {
        return;
    }
    let is = |i: usize| present[i / 8] & (1 << (i % 8)) != 0;
    // Only whole groups: a topic is all in or all out.
    for t in 0..3 {
        let mut of = msgs.iter().enumerate().filter(|(_, m)| m.1 == t);
        if let Some((first, _)) = of.next() {
            assert!(of.all(|(i, _)| is(i) == is(first)), "a whole group");
        }
    }
    let part = Seal {
        present: present.clone(),
        absent: copy.absent.into(),
        ..seal.clone()
    };
    let copy_body = encode(&is, &part);
    let Ok(cv) = PublishBatchView::decode(&copy_body) else {
        panic!("a copy decodes");
    };
    let kept = (0..n).filter(|&i| is(i)).count();
    assert_eq!(
        verify(&cv).map(|r| r.len()).ok(),
        Some(kept),
        "a copy verifies"
    );
    // One byte changed: refused, or the same messages.
    let mut bad = copy_body.to_vec();
    let i = usize::from(at(7)) * 31 % bad.len();
    bad[i] ^= at(11) | 1;
    if let Ok(bv) = PublishBatchView::decode(&bad) {
        if verify(&bv).is_ok() {
            let same = |a: &PublishBatchView<'_>, b: &PublishBatchView<'_>| {
                a.entries.len() == b.entries.len()
                    && a.entries.iter().zip(&b.entries).all(|(x, y)| {
                        x.seq == y.seq
                            && x.payload == y.payload
                            && a.topics.get(x.topic_index) == b.topics.get(y.topic_index)
                    })
            };
            assert!(same(&bv, &cv), "a changed copy verified");
        }
    }
}

/// Fuzz entry point for seals of kind 4 (aligned digests): `data` makes
/// up up to 32 messages on two topics (payloads up to about 5 KiB, cut
/// from `data` repeated, so some span several BLAKE3 chunks), sealed by a
/// fixed key as one seal of kind 4, and a subset of them, a forwarded
/// copy carrying the hashes of the subtrees of the seal's tree it has
/// none of (which must be the publisher's tree's). The complete frame,
/// the copy and a part of it forwarded on by a node that verified it must
/// verify; the copy re-presented as kind 1 (with the absent messages'
/// aligned digests), with one carried hash changed, or with two payloads
/// swapped, must not; the copy with one byte changed (chosen by
/// `data`) must answer, never panic, and verify only if it decodes to the
/// same messages. Shared by `fuzz/fuzz_targets/publish_batch_aligned.rs`
/// and the property tests.
pub fn fuzz_aligned_copies(data: &[u8]) {
    const TOPICS: [&str; 2] = ["a.x", "b.y"];
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    if rest.is_empty() {
        return;
    }
    let at = |i: usize| rest[i % rest.len()];
    let n = 1 + usize::from(head) % 32;
    let key = SigningKey::from_bytes(&[7; 32]);
    let publisher = NodeId::from_public_key(&key.verifying_key().to_bytes());
    let epoch = 5;
    // (seq, topic index, payload)
    let msgs: Vec<(u64, usize, Vec<u8>)> = (0..n)
        .map(|i| {
            let len = usize::from(at(i + 1)) * 20;
            let p = (0..len).map(|j| at(i + j)).collect();
            (i as u64 + 1, usize::from(at(i)) % 2, p)
        })
        .collect();
    let digests: Vec<[u8; 32]> = msgs
        .iter()
        .map(|m| event_digest_aligned(m.0, TOPICS[m.1], &m.2, [], None))
        .collect();
    let signer = Signer::new(key);
    let seal = signer.seal_aligned(&publisher, epoch, &digests);
    let encode = |keep: &dyn Fn(usize) -> bool, seal: &Seal| -> Bytes {
        fuzz_frame(&publisher, epoch, &TOPICS, &msgs, keep, seal)
    };
    let body = encode(&|_| true, &seal);
    let Ok(view) = PublishBatchView::decode(&body) else {
        panic!("a genuine frame decodes");
    };
    assert_eq!(verify(&view).map(|r| r.len()).ok(), Some(n));
    // A copy of some: the hashes of the subtrees it has none of, as a
    // forwarder computes them from the publisher's frame.
    let Some(refs) = adopt(&view, &body) else {
        panic!("a complete seal is adopted");
    };
    let run = &refs.runs[0];
    assert!(run.is_aligned_kind());
    let keep: Vec<bool> = (0..n).map(|i| at(3 * i + 2) & 1 == 1).collect();
    if !keep.iter().any(|&k| k) {
        return;
    }
    let is = |i: usize| keep[i];
    let present: Vec<u8> = (0..n.div_ceil(8))
        .map(|b| {
            (0..8).fold(0u8, |acc, j| {
                acc | (u8::from(b * 8 + j < n && keep[b * 8 + j]) << j)
            })
        })
        .collect();
    // The hashes a forwarder computes from the publisher's frame are the
    // publisher's own tree's.
    let mut expected = Vec::new();
    assert!(SealTree::new(&digests)
        .absent(&present, &mut expected)
        .is_some());
    let part = Seal {
        absent: run.tree_absent(&present).into(),
        present,
        ..seal.clone()
    };
    assert_eq!(part.absent, expected);
    assert!(part.absent.len() <= (0..n).filter(|&i| !keep[i]).count());
    // The publisher's frames of the seal split in two (each adopted on
    // its own, as a gateway does): a copy of the same messages under one
    // entry is given the same hashes, from what the two frames carried
    // and their trees.
    if n >= 2 {
        let cut = 1 + usize::from(at(13)) % (n - 1);
        let tree = SealTree::new(&digests);
        let halves: Vec<Arc<SealedRun>> = [0..cut, cut..n]
            .into_iter()
            .filter_map(|r| {
                let s = signer.seal_tree_part(seal.sig, &tree, r.clone());
                let b = encode(&|i| r.contains(&i), &s);
                let v = PublishBatchView::decode_shared(&b).ok()?;
                adopt(&v, &b).and_then(|p| p.runs.first().cloned())
            })
            .collect();
        assert_eq!(halves.len(), 2, "both frames adopted");
        assert!(halves[0].same_signature(&halves[1]));
        let runs: Vec<&Arc<SealedRun>> = halves.iter().collect();
        assert_eq!(
            SealedRun::tree_absent_among(&runs, &part.present),
            expected,
            "one entry over both frames"
        );
    }
    let copy_body = encode(&is, &part);
    let Ok(cv) = PublishBatchView::decode(&copy_body) else {
        panic!("a copy decodes");
    };
    let kept = keep.iter().filter(|&&k| k).count();
    assert_eq!(
        verify(&cv).map(|r| r.len()).ok(),
        Some(kept),
        "a copy verifies"
    );
    // A node that verified the copy forwards part of it on: the same
    // hashes as the publisher's tree gives that part.
    if let Ok(refs) = verify(&cv) {
        let first = (0..n).find(|&i| keep[i]).unwrap_or(0);
        let mut one = vec![0u8; n.div_ceil(8)];
        one[first / 8] |= 1 << (first % 8);
        let mut want = Vec::new();
        let _ = SealTree::new(&digests).absent(&one, &mut want);
        assert_eq!(refs.runs[0].tree_absent(&one), want);
    }
    // Re-presented as kind 1: malformed (other counts), or refused.
    let as_kind1 = Seal {
        aligned: false,
        ..part.clone()
    };
    if as_kind1.absent.len() == n - kept {
        let k1_body = encode(&is, &as_kind1);
        if let Ok(k1) = PublishBatchView::decode(&k1_body) {
            assert!(verify(&k1).is_err(), "a kind 4 seal read as kind 1");
        }
    }
    // Two kept messages' payloads swapped: refused (unless equal).
    let kept_at: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
    if let [x, .., y] = kept_at[..] {
        if msgs[x].2 != msgs[y].2 {
            let mut swapped = msgs.clone();
            swapped.swap(x, y);
            (swapped[x].0, swapped[y].0) = (msgs[x].0, msgs[y].0);
            let sw = fuzz_frame(&publisher, epoch, &TOPICS, &swapped, &is, &part);
            if let Ok(v) = PublishBatchView::decode(&sw) {
                assert!(verify(&v).is_err(), "payloads swapped");
            }
        }
    }
    // A carried digest changed: refused.
    if !part.absent.is_empty() {
        let mut changed = part.clone();
        let j = usize::from(at(5)) % changed.absent.len();
        let mut absent = changed.absent.to_vec();
        absent[j][usize::from(at(6)) % 32] ^= at(9) | 1;
        changed.absent = absent.into();
        let cd_body = encode(&is, &changed);
        let Ok(cd) = PublishBatchView::decode(&cd_body) else {
            panic!("a changed copy decodes");
        };
        assert!(verify(&cd).is_err(), "a carried digest changed");
    }
    // One byte changed: refused, or the same messages.
    let mut bad = copy_body.to_vec();
    let i = usize::from(at(7)) * 31 % bad.len();
    bad[i] ^= at(11) | 1;
    if let Ok(bv) = PublishBatchView::decode(&bad) {
        if verify(&bv).is_ok() {
            let same = |a: &PublishBatchView<'_>, b: &PublishBatchView<'_>| {
                a.entries.len() == b.entries.len()
                    && a.entries.iter().zip(&b.entries).all(|(x, y)| {
                        x.seq == y.seq
                            && x.payload == y.payload
                            && a.topics.get(x.topic_index) == b.topics.get(y.topic_index)
                    })
            };
            assert!(same(&bv, &cv), "a changed copy verified");
        }
    }
}
