//! Pub/sub messages on the wire (types `0x30..=0x4f`).
//!
//! A publisher sends one PUBLISH to each node that has a matching
//! subscription; that node delivers it to its local subscribers. Wire types
//! only: matching, interest and delivery live in `macula-pubsub` and the
//! runtime.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::node_id::NodeId;

/// Topic length on the wire (the pub/sub core's limit is 256).
pub const MAX_WIRE_TOPIC_LEN: usize = 512;
/// Headers on one message.
pub const MAX_WIRE_HEADERS: usize = 32;
/// Header name and value lengths.
pub const MAX_WIRE_HEADER_LEN: usize = 1024;
/// Message ID length.
pub const MAX_WIRE_MESSAGE_ID_LEN: usize = 256;

/// One published message, sent to one interested node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub topic: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The publishing node; must be the node that sent the frame.
    pub publisher: NodeId,
    /// Publisher's run (Unix ms of its start); `seq` restarts at 1 with it.
    pub epoch: u64,
    /// Per-publisher sequence number: delivery is in this order, once.
    pub seq: u64,
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

impl Publish {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.topic.len() > MAX_WIRE_TOPIC_LEN {
            return Err(format!("topic of {} bytes", self.topic.len()));
        }
        if self.headers.len() > MAX_WIRE_HEADERS {
            return Err(format!(
                "{} headers, limit {MAX_WIRE_HEADERS}",
                self.headers.len()
            ));
        }
        if self
            .headers
            .iter()
            .any(|(k, v)| k.len() > MAX_WIRE_HEADER_LEN || v.len() > MAX_WIRE_HEADER_LEN)
        {
            return Err("header too long".into());
        }
        if self
            .message_id
            .as_ref()
            .is_some_and(|m| m.len() > MAX_WIRE_MESSAGE_ID_LEN)
        {
            return Err("message ID too long".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// PUBLISH_BATCH (0x31): many messages of one publisher in one frame.
//
// A compact binary body (not MessagePack): pub/sub is the one message whose
// per-message overhead decides throughput. Layout (docs/PROTOCOL.md §5.3):
//
//   u8 format (= BATCH_FORMAT) | publisher [32] | varint epoch
//   varint n_topics | n_topics × str              (the batch's topic table)
//   varint n_msgs   | n_msgs × message
//   message = varint seq_delta | varint topic_index | u8 flags
//             | varint payload_len | payload
//             | [flags & 1: varint n_headers | n_headers × (str name, str value)]
//             | [flags & 2: str message_id]
//             | [flags & 4: varint ext_len | ext bytes (ignored)]
//   str = varint len | UTF-8 bytes;  varint = unsigned LEB128, at most 10 bytes
//
// seq_delta is the first message's seq, then the difference to the previous
// message's seq (>= 1): seqs in a batch strictly increase.
// ---------------------------------------------------------------------------

/// The batch body format this version writes; other formats are malformed.
pub const BATCH_FORMAT: u8 = 1;
/// Distinct topics in one batch (its topic table).
pub const MAX_BATCH_TOPICS: usize = 256;
/// Messages in one batch.
pub const MAX_BATCH_MESSAGES: usize = 65_536;
/// Message flag: headers follow the payload.
pub const FLAG_HEADERS: u8 = 1;
/// Message flag: a message ID follows.
pub const FLAG_MESSAGE_ID: u8 = 2;
/// Message flag: an extension block follows (length-prefixed, skipped by
/// receivers of this version; later versions put new fields there).
pub const FLAG_EXTENSION: u8 = 4;
const KNOWN_MESSAGE_FLAGS: u8 = FLAG_HEADERS | FLAG_MESSAGE_ID | FLAG_EXTENSION;
/// The batch body format of a **sealed** batch: format 1 followed by the
/// seals that prove its messages' publisher (docs/PROTOCOL.md §5.3,
/// "Proved publishers").
pub const BATCH_FORMAT_SEALED: u8 = 2;
/// The batch body format whose seals each start with a kind byte:
/// [`SEAL_KIND_DIGESTS`] (a format 2 seal) or [`SEAL_KIND_WHOLE`] (a seal
/// whose signature also covers the seal's messages hashed as one input,
/// see [`seal_whole`]); docs/PROTOCOL.md §5.3, "Seals over the whole".
pub const BATCH_FORMAT_SEALED_WHOLE: u8 = 3;
/// Seal kind (format 3): the seal of format 2 (its signature over
/// [`seal_hash`] of the messages' digests).
pub const SEAL_KIND_DIGESTS: u8 = 1;
/// Seal kind (format 3): its signature is over [`seal_hash_whole`] of the
/// messages hashed as one input and of their digests' [`seal_hash`]; the
/// seal carries the one of those two a receiver does not compute.
pub const SEAL_KIND_WHOLE: u8 = 2;
/// Seal kind (format 3): its signature is over [`seal_hash_groups`] of
/// one digest per **topic group** (the seal's messages of one topic, in
/// order, hashed as one input: [`GroupHasher`]); a copy carries the
/// digests of the groups it leaves out, never part of a group
/// (docs/PROTOCOL.md §5.3, "Seals over topic groups").
pub const SEAL_KIND_GROUPS: u8 = 3;
/// Seal kind (format 3): a seal over the tree ([`SealTree`]) of its
/// messages' [`event_digest_aligned`] digests (each payload hashed from
/// its own byte 0, so BLAKE3 takes its whole 1 KiB chunks in parallel),
/// its signature over [`seal_hash_aligned`] of the root; a batch carries
/// the hashes of the subtrees it has no message of (docs/PROTOCOL.md
/// §5.3, "Seals over aligned digests").
pub const SEAL_KIND_ALIGNED: u8 = 4;
/// Messages one seal covers (the digests a forwarded copy may carry).
pub const MAX_SEAL_ENTRIES: usize = 1024;
/// Bytes of one seal besides its presence bitmap and absent digests: kind
/// (1, format 3), key (32), signature (64), entry count (varint, 2), the
/// hash a seal of kind [`SEAL_KIND_WHOLE`] carries (32).
pub const SEAL_OVERHEAD: usize = 1 + 32 + 64 + 2 + 32;
/// Bytes of the seal table's count (varint).
pub const SEALS_COUNT_LEN: usize = 3;

/// One seal as encoded in a sealed batch: the publisher's Ed25519 `key`
/// and its signature `sig` over the digests of `n` messages it published
/// (in seq order); bit `i` of `present` (LSB first) says whether message
/// `i` of the seal is in this batch (then the receiver computes its
/// digest), else its digest is the next of `absent`. The batch's messages
/// are the present messages of its seals, in order.
///
/// A seal of kind [`SEAL_KIND_WHOLE`] has `carried` set: the
/// [`seal_hash`] of its messages' digests when every one of them is in the
/// batch (the receiver hashes them whole, [`seal_whole`]), else their
/// [`seal_whole`] hash (the receiver computes the digests). `None`: a seal
/// of kind [`SEAL_KIND_DIGESTS`] (format 2).
///
/// A seal of kind [`SEAL_KIND_GROUPS`] has `groups` set (and `carried`
/// `None`): `absent` then holds the digests of the topic groups none of
/// whose messages is in the batch (at least one when a message is
/// absent, at most one per absent message), in any order.
///
/// A seal of kind [`SEAL_KIND_ALIGNED`] has `aligned` set (and neither
/// `carried` nor `groups`): laid out as kind 1, but `absent` holds the
/// hashes of the maximal subtrees of its tree ([`SealTree`]) with no
/// present message, left to right ([`seal_tree_absent`]): a frame of a
/// few messages of a large seal carries a few hashes, not one per
/// message it does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub key: [u8; 32],
    pub sig: [u8; 64],
    pub n: usize,
    pub present: Vec<u8>,
    pub absent: SealHashes,
    pub carried: Option<[u8; 32]>,
    pub groups: bool,
    pub aligned: bool,
}

/// The hashes a seal carries (32 bytes each, in order), read as
/// `[[u8; 32]]`. Decoded from a frame held as [`Bytes`]
/// ([`PublishBatchView::decode_shared`]), they are a slice of it: keeping
/// them with the frame's messages, or forwarding them as they came,
/// copies and allocates nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SealHashes(Bytes);

impl SealHashes {
    /// The hashes in `bytes`; `None` unless its length is a multiple of 32.
    pub fn from_bytes(bytes: Bytes) -> Option<SealHashes> {
        bytes.len().is_multiple_of(32).then_some(SealHashes(bytes))
    }

    /// The hashes as they are on the wire (concatenated).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// `raw` (a multiple of 32 bytes), a slice of `owner` when it lies
    /// within it, else copied.
    fn shared(owner: Option<&Bytes>, raw: &[u8]) -> SealHashes {
        let within = owner.filter(|b| {
            let (start, at) = (b.as_ptr() as usize, raw.as_ptr() as usize);
            at >= start && at + raw.len() <= start + b.len()
        });
        SealHashes(match within {
            Some(b) if !raw.is_empty() => b.slice_ref(raw),
            _ => Bytes::copy_from_slice(raw),
        })
    }
}

impl std::ops::Deref for SealHashes {
    type Target = [[u8; 32]];

    fn deref(&self) -> &[[u8; 32]] {
        // Never a remainder: every constructor keeps whole hashes.
        self.0.as_chunks::<32>().0
    }
}

impl From<Vec<[u8; 32]>> for SealHashes {
    fn from(v: Vec<[u8; 32]>) -> SealHashes {
        SealHashes(Bytes::from(v.into_flattened()))
    }
}

impl From<&[[u8; 32]]> for SealHashes {
    fn from(v: &[[u8; 32]]) -> SealHashes {
        SealHashes(Bytes::copy_from_slice(v.as_flattened()))
    }
}

impl FromIterator<[u8; 32]> for SealHashes {
    fn from_iter<I: IntoIterator<Item = [u8; 32]>>(it: I) -> SealHashes {
        it.into_iter().collect::<Vec<_>>().into()
    }
}

impl PartialEq<Vec<[u8; 32]>> for SealHashes {
    fn eq(&self, o: &Vec<[u8; 32]>) -> bool {
        **self == o[..]
    }
}

impl std::fmt::Debug for SealHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Seal {
    /// Whether message `i` of the seal is in the batch.
    pub fn is_present(&self, i: usize) -> bool {
        self.present
            .get(i / 8)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// How many of its messages the batch carries.
    pub fn present_count(&self) -> usize {
        self.present.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// Whether every message it covers is in the batch (no digest sent).
    pub fn is_complete(&self) -> bool {
        self.absent.is_empty()
    }

    fn check(&self) -> Result<(), String> {
        self.check_counted(None)
    }

    /// [`Seal::check`]; `counted`: how many hashes a seal of kind 4 with
    /// its bitmap carries, when the caller counted them already (the
    /// decoder, to know how many to read).
    fn check_counted(&self, counted: Option<usize>) -> Result<(), String> {
        if self.n == 0 || self.n > MAX_SEAL_ENTRIES {
            return Err(format!(
                "seal of {} messages, must be 1 to {MAX_SEAL_ENTRIES}",
                self.n
            ));
        }
        if self.present.len() != self.n.div_ceil(8) {
            return Err("seal bitmap of the wrong length".into());
        }
        if !self.n.is_multiple_of(8) && self.present[self.n / 8] >> (self.n % 8) != 0 {
            return Err("seal bitmap names messages past its count".into());
        }
        let present = self.present_count();
        if present == 0 {
            return Err("seal with no message in the batch".into());
        }
        if self.aligned && (self.groups || self.carried.is_some()) {
            return Err("a seal of aligned digests of another kind too".into());
        }
        if self.groups {
            if self.carried.is_some() {
                return Err("seal of topic groups carries a hash".into());
            }
            let missing = self.n - present;
            if self.absent.len() > missing || (missing > 0) == self.absent.is_empty() {
                return Err("seal group digests do not match its bitmap".into());
            }
            return Ok(());
        }
        let carried = match self.aligned {
            // Kind 4: the hashes of the maximal absent subtrees.
            true => counted.unwrap_or_else(|| seal_tree_absent_count(self.n, &self.present)),
            false => self.n - present,
        };
        if self.absent.len() != carried {
            return Err("seal digests do not match its bitmap".into());
        }
        Ok(())
    }

    /// Its kind byte (format 3).
    pub fn kind(&self) -> u8 {
        match (self.groups, self.carried) {
            _ if self.aligned => SEAL_KIND_ALIGNED,
            (true, _) => SEAL_KIND_GROUPS,
            (false, Some(_)) => SEAL_KIND_WHOLE,
            (false, None) => SEAL_KIND_DIGESTS,
        }
    }

    fn write(&self, out: &mut Vec<u8>, kinds: bool) -> Result<(), String> {
        self.check()?;
        if kinds {
            out.push(self.kind());
        } else if self.kind() != SEAL_KIND_DIGESTS {
            return Err("a seal of kind 2, 3 or 4 in a format 2 batch".into());
        }
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.sig);
        put_varint(out, self.n as u64);
        out.extend_from_slice(&self.present);
        if let Some(c) = &self.carried {
            out.extend_from_slice(c);
        }
        if self.groups {
            put_varint(out, self.absent.len() as u64);
        }
        out.extend_from_slice(self.absent.as_bytes());
        Ok(())
    }

    /// Reads one seal; `kinds`: format 3, a kind byte first. Its hashes
    /// are a slice of `owner` (the body the cursor reads) when given.
    fn read(c: &mut Cursor<'_>, kinds: bool, owner: Option<&Bytes>) -> Result<Seal, String> {
        let (whole, groups, aligned) = match kinds {
            false => (false, false, false),
            true => match c.u8()? {
                SEAL_KIND_DIGESTS => (false, false, false),
                SEAL_KIND_WHOLE => (true, false, false),
                SEAL_KIND_GROUPS => (false, true, false),
                SEAL_KIND_ALIGNED => (false, false, true),
                k => return Err(format!("seal kind {k}")),
            },
        };
        if c.buf.len() < 96 {
            return Err("truncated seal".into());
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(c.bytes(32));
        let mut sig = [0u8; 64];
        sig.copy_from_slice(c.bytes(64));
        let n = c.varint()?;
        if n == 0 || n > MAX_SEAL_ENTRIES as u64 {
            return Err(format!(
                "seal of {n} messages, must be 1 to {MAX_SEAL_ENTRIES}"
            ));
        }
        let n = n as usize;
        if c.buf.len() < n.div_ceil(8) {
            return Err("truncated seal bitmap".into());
        }
        let present = c.bytes(n.div_ceil(8)).to_vec();
        let carried = match whole {
            false => None,
            true => {
                if c.buf.len() < 32 {
                    return Err("truncated seal hash".into());
                }
                let mut h = [0u8; 32];
                h.copy_from_slice(c.bytes(32));
                Some(h)
            }
        };
        let mut seal = Seal {
            key,
            sig,
            n,
            present,
            absent: SealHashes::default(),
            carried,
            groups,
            aligned,
        };
        let missing = n - seal.present_count().min(n);
        let absent = match (groups, aligned) {
            (false, true) => seal_tree_absent_count(n, &seal.present),
            (false, false) => missing,
            (true, _) => {
                let k = c.varint()?;
                if k > missing as u64 {
                    return Err(format!("{k} group digests for {missing} absent messages"));
                }
                k as usize
            }
        };
        if c.buf.len() < absent * 32 {
            return Err("truncated seal digests".into());
        }
        seal.absent = SealHashes::shared(owner, c.bytes(absent * 32));
        // Kind 4: the hashes were counted above, not again.
        seal.check_counted(aligned.then_some(absent))?;
        Ok(seal)
    }

    /// Bytes this seal takes in a batch (its kind byte included: format 3).
    pub fn encoded_len(&self) -> usize {
        1 + 32
            + 64
            + varint_len(self.n as u64)
            + self.present.len()
            + 32 * (self.absent.len() + usize::from(self.carried.is_some()))
            + match self.groups {
                true => varint_len(self.absent.len() as u64),
                false => 0,
            }
    }
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Headers that are hop-by-hop metadata, not what the publisher said: a
/// forwarding node rewrites them (trace context), so an event's digest
/// leaves them out.
pub fn is_hop_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(crate::trace::TRACEPARENT)
        || name.eq_ignore_ascii_case(crate::trace::TRACESTATE)
}

/// The digest of one published message that a seal signs: BLAKE3 over a
/// domain tag, its `seq`, topic, payload, headers (hop-by-hop ones left
/// out, see [`is_hop_header`]) and message ID, each length-prefixed.
pub fn event_digest<'h>(
    seq: u64,
    topic: &str,
    payload: &[u8],
    headers: impl IntoIterator<Item = (&'h str, &'h str)>,
    message_id: Option<&str>,
) -> [u8; 32] {
    // The bytes hashed are gathered in a buffer on the stack and hashed
    // in one call when they fit (most events): one BLAKE3 call instead of
    // a dozen small updates, the same digest.
    let mut h = DigestSink::new();
    h.put(b"macula event digest v1\0");
    h.put(&seq.to_le_bytes());
    h.put(&(topic.len() as u64).to_le_bytes());
    h.put(topic.as_bytes());
    h.put(&(payload.len() as u64).to_le_bytes());
    h.put(payload);
    for (k, v) in headers {
        if is_hop_header(k) {
            continue;
        }
        h.put(&[1]);
        h.put(&(k.len() as u64).to_le_bytes());
        h.put(k.as_bytes());
        h.put(&(v.len() as u64).to_le_bytes());
        h.put(v.as_bytes());
    }
    match message_id {
        Some(id) => {
            h.put(&[2]);
            h.put(&(id.len() as u64).to_le_bytes());
            h.put(id.as_bytes());
        }
        None => {
            h.put(&[0]);
        }
    }
    h.finish()
}

/// Domain tag of [`event_digest_aligned`].
const ALIGNED_TAG: &[u8] = b"macula event digest v4\0";

/// The digest of one published message that a seal of kind
/// [`SEAL_KIND_ALIGNED`] signs: BLAKE3 over a domain tag, its `seq`,
/// topic, the payload's length and **its own BLAKE3 hash**, headers
/// (hop-by-hop ones left out) and message ID, each length-prefixed as in
/// [`event_digest`]:
///
/// ```text
/// BLAKE3("macula event digest v4" 0x00 ‖ u64le seq ‖ u64le len ‖ topic ‖ u64le len(payload) ‖ BLAKE3(payload)
///        ‖ headers as in v1 ‖ (0x02 ‖ u64le len ‖ message_id | 0x00))
/// ```
///
/// The payload is hashed from its own byte 0 ([`blake3::hash`], no copy),
/// so every whole 1 KiB chunk of it goes through BLAKE3's parallel
/// `hash_many` path; in [`event_digest`] the payload follows the fields
/// in one input, so its chunks start unaligned and a large payload is
/// gathered behind them (a boxed hasher, its first and last chunks one
/// block at a time).
pub fn event_digest_aligned<'h>(
    seq: u64,
    topic: &str,
    payload: &[u8],
    headers: impl IntoIterator<Item = (&'h str, &'h str)>,
    message_id: Option<&str>,
) -> [u8; 32] {
    let payload_hash = blake3::hash(payload);
    let mut h = DigestSink::new();
    h.put(ALIGNED_TAG);
    h.put(&seq.to_le_bytes());
    h.put(&(topic.len() as u64).to_le_bytes());
    h.put(topic.as_bytes());
    h.put(&(payload.len() as u64).to_le_bytes());
    h.put(payload_hash.as_bytes());
    for (k, v) in headers {
        if is_hop_header(k) {
            continue;
        }
        h.put(&[1]);
        h.put(&(k.len() as u64).to_le_bytes());
        h.put(k.as_bytes());
        h.put(&(v.len() as u64).to_le_bytes());
        h.put(v.as_bytes());
    }
    match message_id {
        Some(id) => {
            h.put(&[2]);
            h.put(&(id.len() as u64).to_le_bytes());
            h.put(id.as_bytes());
        }
        None => {
            h.put(&[0]);
        }
    }
    h.finish()
}

/// Bytes [`event_digest`] gathers before it hashes them in one call.
const DIGEST_BUF: usize = 512;

/// What [`event_digest`] hashes: gathered in a buffer while it fits, then
/// streamed into a hasher (first the buffer, then the rest).
struct DigestSink {
    buf: [u8; DIGEST_BUF],
    len: usize,
    hasher: Option<Box<blake3::Hasher>>,
}

impl DigestSink {
    fn new() -> DigestSink {
        DigestSink {
            buf: [0; DIGEST_BUF],
            len: 0,
            hasher: None,
        }
    }

    fn put(&mut self, b: &[u8]) {
        if let Some(h) = &mut self.hasher {
            h.update(b);
            return;
        }
        match self.buf.get_mut(self.len..self.len + b.len()) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.len += b.len();
            }
            None => {
                let mut h = Box::new(blake3::Hasher::new());
                h.update(&self.buf[..self.len]);
                h.update(b);
                self.hasher = Some(h);
            }
        }
    }

    fn finish(self) -> [u8; 32] {
        match self.hasher {
            Some(h) => *h.finalize().as_bytes(),
            None => *blake3::hash(&self.buf[..self.len]).as_bytes(),
        }
    }
}

/// What a seal's signature signs: BLAKE3 over a domain tag, the publisher,
/// its epoch and the digests of the sealed messages in seq order.
pub fn seal_hash(publisher: &NodeId, epoch: u64, digests: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"macula pub/sub seal v1\0");
    h.update(publisher.as_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(&(digests.len() as u64).to_le_bytes());
    // One update over all the digests (contiguous): BLAKE3 hashes their
    // 1 KiB chunks in parallel, the same hash as one update per digest.
    h.update(digests.as_flattened());
    *h.finalize().as_bytes()
}

/// What the signature of a seal of kind [`SEAL_KIND_ALIGNED`] signs
/// (after its tag): BLAKE3 over its own domain tag, the publisher, its
/// epoch, the message count `n` and the `root` of the tree over the
/// messages' [`event_digest_aligned`] digests ([`SealTree`]).
pub fn seal_hash_aligned(publisher: &NodeId, epoch: u64, n: usize, root: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"macula pub/sub seal v4\0");
    h.update(publisher.as_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(&(n as u64).to_le_bytes());
    h.update(root);
    *h.finalize().as_bytes()
}

/// Domain tag of an inner node of a seal of kind [`SEAL_KIND_ALIGNED`]'s
/// tree ([`seal_node`]): never the start of an [`event_digest_aligned`]
/// input (`macula event digest v4`), so no leaf reads as a node.
const NODE_TAG: &[u8] = b"macula pub/sub seal node v4\0";

/// An inner node of the tree a seal of kind [`SEAL_KIND_ALIGNED`] signs
/// the root of: BLAKE3 over its tag, then its left and right children.
pub fn seal_node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut buf = [0u8; NODE_TAG.len() + 64];
    buf[..NODE_TAG.len()].copy_from_slice(NODE_TAG);
    buf[NODE_TAG.len()..NODE_TAG.len() + 32].copy_from_slice(left);
    buf[NODE_TAG.len() + 32..].copy_from_slice(right);
    *blake3::hash(&buf).as_bytes()
}

/// Where the tree of `n` ≥ 2 leaves splits (RFC 9162 §2.1.1): the largest
/// power of two below `n`.
fn tree_split(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Height of the tree of `n` leaves (⌈log2 n⌉): a leaf has at most this
/// many ancestors, so one present leaf leaves at most this many maximal
/// absent subtrees, and a contiguous run of them twice as many.
pub fn seal_tree_depth(n: usize) -> usize {
    match n {
        0 | 1 => 0,
        n => (usize::BITS - (n - 1).leading_zeros()) as usize,
    }
}

/// Whether any bit of `lo..hi` is set in `bits` (LSB first).
fn any_bit(bits: &[u8], lo: usize, hi: usize) -> bool {
    let mut i = lo;
    while i < hi {
        let Some(&b) = bits.get(i / 8) else {
            return false;
        };
        if i.is_multiple_of(8) && i + 8 <= hi {
            if b != 0 {
                return true;
            }
            i += 8;
            continue;
        }
        if b & (1 << (i % 8)) != 0 {
            return true;
        }
        i += 1;
    }
    false
}

/// The maximal subtrees with no present leaf (bit set in `present`) of
/// the tree of `n` leaves, left to right, as leaf ranges: the nodes whose
/// hashes a seal of kind [`SEAL_KIND_ALIGNED`] carries. Depth-bounded
/// recursion (at most [`seal_tree_depth`] of [`MAX_SEAL_ENTRIES`]).
pub fn seal_tree_absent(n: usize, present: &[u8], out: &mut Vec<(usize, usize)>) {
    fn walk(lo: usize, hi: usize, present: &[u8], out: &mut Vec<(usize, usize)>) {
        if !any_bit(present, lo, hi) {
            out.push((lo, hi));
            return;
        }
        if hi - lo < 2 {
            return;
        }
        let k = tree_split(hi - lo);
        walk(lo, lo + k, present, out);
        walk(lo + k, hi, present, out);
    }
    if n > 0 {
        walk(0, n, present, out);
    }
}

/// How many hashes a seal of kind [`SEAL_KIND_ALIGNED`] of `n` messages
/// whose bitmap is `present` carries ([`seal_tree_absent`], counted).
pub fn seal_tree_absent_count(n: usize, present: &[u8]) -> usize {
    fn walk(lo: usize, hi: usize, present: &[u8]) -> usize {
        if !any_bit(present, lo, hi) {
            return 1;
        }
        if hi - lo < 2 {
            return 0;
        }
        let k = tree_split(hi - lo);
        walk(lo, lo + k, present) + walk(lo + k, hi, present)
    }
    match n {
        0 => 0,
        n => walk(0, n, present),
    }
}

/// The tree over the aligned digests of a seal of kind
/// [`SEAL_KIND_ALIGNED`] (RFC 9162 §2.1.1's shape, BLAKE3 with domain
/// tags: the leaves are [`event_digest_aligned`], each inner node
/// [`seal_node`] of its children), as far as a node knows it: the
/// publisher knows every leaf; a receiver the leaves it got and the
/// hashes of the maximal subtrees it did not get (what the seal carried).
/// Every node it can compute is kept, so a copy of any subset of what it
/// got can be given its carried hashes ([`SealTree::absent`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealTree {
    n: usize,
    /// `(lo, hi, hash)` of every node known, sorted by `(lo, hi)`.
    nodes: Vec<(u32, u32, [u8; 32])>,
}

impl SealTree {
    /// The tree of all of `leaves` (a publisher's).
    pub fn new(leaves: &[[u8; 32]]) -> SealTree {
        fn build(
            lo: usize,
            hi: usize,
            leaves: &[[u8; 32]],
            out: &mut Vec<(u32, u32, [u8; 32])>,
        ) -> [u8; 32] {
            let h = match hi - lo {
                1 => leaves[lo],
                len => {
                    let k = tree_split(len);
                    let l = build(lo, lo + k, leaves, out);
                    let r = build(lo + k, hi, leaves, out);
                    seal_node(&l, &r)
                }
            };
            out.push((lo as u32, hi as u32, h));
            h
        }
        let mut nodes = Vec::with_capacity(2 * leaves.len());
        if !leaves.is_empty() {
            build(0, leaves.len(), leaves, &mut nodes);
        }
        nodes.sort_unstable_by_key(|&(lo, hi, _)| (lo, hi));
        SealTree {
            n: leaves.len(),
            nodes,
        }
    }

    /// The tree as a seal of `n` messages with bitmap `present` shows it:
    /// `leaves`, the digests of the present messages in order; `carried`,
    /// the hashes of the maximal absent subtrees in order. `None` when
    /// they do not add up.
    pub fn from_part(
        n: usize,
        present: &[u8],
        leaves: impl IntoIterator<Item = [u8; 32]>,
        carried: &[[u8; 32]],
    ) -> Option<SealTree> {
        struct Walk<'a, L> {
            present: &'a [u8],
            leaves: L,
            carried: std::slice::Iter<'a, [u8; 32]>,
            out: Vec<(u32, u32, [u8; 32])>,
        }
        fn walk<L: Iterator<Item = [u8; 32]>>(
            w: &mut Walk<'_, L>,
            lo: usize,
            hi: usize,
        ) -> Option<[u8; 32]> {
            let h = if !any_bit(w.present, lo, hi) {
                *w.carried.next()?
            } else if hi - lo == 1 {
                w.leaves.next()?
            } else {
                let k = tree_split(hi - lo);
                let l = walk(w, lo, lo + k)?;
                let r = walk(w, lo + k, hi)?;
                seal_node(&l, &r)
            };
            w.out.push((lo as u32, hi as u32, h));
            Some(h)
        }
        if n == 0 || n > MAX_SEAL_ENTRIES {
            return None;
        }
        let mut w = Walk {
            present,
            leaves: leaves.into_iter(),
            carried: carried.iter(),
            out: Vec::with_capacity(4 * seal_tree_depth(n) + 8),
        };
        walk(&mut w, 0, n)?;
        if w.leaves.next().is_some() || w.carried.next().is_some() {
            return None;
        }
        let mut nodes = w.out;
        nodes.sort_unstable_by_key(|&(lo, hi, _)| (lo, hi));
        Some(SealTree { n, nodes })
    }

    /// Leaves the tree has.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The hash of the subtree over leaves `lo..hi`, if known here.
    pub fn node(&self, lo: usize, hi: usize) -> Option<[u8; 32]> {
        let key = (lo as u32, hi as u32);
        self.nodes
            .binary_search_by_key(&key, |&(l, h, _)| (l, h))
            .ok()
            .map(|i| self.nodes[i].2)
    }

    /// Its root (what the signature binds, [`seal_hash_aligned`]).
    pub fn root(&self) -> Option<[u8; 32]> {
        self.node(0, self.n)
    }

    /// The hashes a seal of it whose bitmap is `present` carries (the
    /// maximal subtrees with no present leaf, left to right), appended to
    /// `out`. `None` when one is not known here (`present` is not within
    /// what this node got).
    pub fn absent(&self, present: &[u8], out: &mut Vec<[u8; 32]>) -> Option<()> {
        let mut ranges = Vec::new();
        seal_tree_absent(self.n, present, &mut ranges);
        out.reserve(ranges.len());
        for (lo, hi) in ranges {
            out.push(self.node(lo, hi)?);
        }
        Some(())
    }
}

/// Domain tag of [`seal_whole`].
const WHOLE_TAG: &[u8] = b"macula pub/sub seal whole v2\0";

/// Bytes [`WholeHasher`] gathers before it hands them to BLAKE3: a seal
/// or group up to this size (a 64 KiB frame of small messages gathers
/// about 92 KiB) is hashed in one call ([`blake3::hash`], which hashes
/// every whole 1 KiB chunk of it in parallel), larger ones in updates of
/// this size.
const WHOLE_BUF: usize = 128 * 1024;

/// What [`WholeHasher::new`] reserves first (it grows to [`WHOLE_BUF`]).
const WHOLE_START: usize = 16 * 1024;

/// Payloads at least this long go to the hasher as they are, not copied
/// into the gathering buffer.
const WHOLE_DIRECT: usize = 2 * 1024;

/// The hash of a seal's messages as one input ([`seal_whole`]): fed the
/// messages in order, it gathers their bytes and hashes them in one BLAKE3
/// call (or few large updates), with no per-message finalisation.
pub struct WholeHasher {
    /// Only once the bytes outgrow the buffer (or a large payload came).
    hasher: Option<Box<blake3::Hasher>>,
    buf: Vec<u8>,
}

impl WholeHasher {
    /// Starts the hash of the `n` messages `publisher` sealed under `epoch`.
    pub fn new(publisher: &NodeId, epoch: u64, n: usize) -> WholeHasher {
        let mut buf = Vec::with_capacity(WHOLE_START);
        buf.extend_from_slice(WHOLE_TAG);
        buf.extend_from_slice(publisher.as_bytes());
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.extend_from_slice(&(n as u64).to_le_bytes());
        WholeHasher { hasher: None, buf }
    }

    #[inline]
    fn put(&mut self, b: &[u8]) {
        if self.buf.len() + b.len() > WHOLE_BUF || b.len() >= WHOLE_DIRECT {
            return self.spill(b);
        }
        self.buf.extend_from_slice(b);
    }

    /// `b` does not go into the buffer as it is: the buffer goes to the
    /// hasher first, then `b` (a large payload, as it is).
    #[cold]
    fn spill(&mut self, b: &[u8]) {
        let h = self.hasher.get_or_insert_with(Default::default);
        h.update(&self.buf);
        self.buf.clear();
        if b.len() >= WHOLE_DIRECT {
            h.update(b);
        } else {
            self.buf.extend_from_slice(b);
        }
    }

    /// Starts the digest of one topic group of a seal of kind
    /// [`SEAL_KIND_GROUPS`]: BLAKE3 over [`GROUP_TAG`] and its messages
    /// as [`WholeHasher::add`] encodes them, in order. Its buffer grows
    /// as needed (a seal of many topics has many groups).
    pub fn group() -> WholeHasher {
        WholeHasher::group_sized(0)
    }

    /// [`WholeHasher::group`] with room for `bytes` of messages (see
    /// [`WholeHasher::added_len`]): no buffer growth on the way.
    pub fn group_sized(bytes: usize) -> WholeHasher {
        let mut buf = Vec::with_capacity((GROUP_TAG.len() + bytes).min(WHOLE_BUF));
        buf.extend_from_slice(GROUP_TAG);
        WholeHasher { hasher: None, buf }
    }

    /// Bytes [`WholeHasher::add`] gathers for a message (at most): what a
    /// caller sizing a [`WholeHasher::group_sized`] adds up.
    pub fn added_len<'h>(
        topic: &str,
        payload: usize,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        message_id: Option<&str>,
    ) -> usize {
        let payload = if payload >= WHOLE_DIRECT { 0 } else { payload };
        let headers: usize = headers
            .into_iter()
            .map(|(k, v)| 17 + k.len() + v.len())
            .sum();
        25 + topic.len() + payload + headers + message_id.map_or(0, |id| 8 + id.len())
    }

    /// The next message: the same fields, in the same encoding, as
    /// [`event_digest`] hashes after its domain tag.
    pub fn add<'h>(
        &mut self,
        seq: u64,
        topic: &str,
        payload: &[u8],
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        message_id: Option<&str>,
    ) {
        self.put(&seq.to_le_bytes());
        self.put(&(topic.len() as u64).to_le_bytes());
        self.put(topic.as_bytes());
        self.put(&(payload.len() as u64).to_le_bytes());
        self.put(payload);
        for (k, v) in headers {
            if is_hop_header(k) {
                continue;
            }
            self.put(&[1]);
            self.put(&(k.len() as u64).to_le_bytes());
            self.put(k.as_bytes());
            self.put(&(v.len() as u64).to_le_bytes());
            self.put(v.as_bytes());
        }
        match message_id {
            Some(id) => {
                self.put(&[2]);
                self.put(&(id.len() as u64).to_le_bytes());
                self.put(id.as_bytes());
            }
            None => self.put(&[0]),
        }
    }

    /// The hash.
    pub fn finish(self) -> [u8; 32] {
        match self.hasher {
            None => *blake3::hash(&self.buf).as_bytes(),
            Some(mut h) => {
                h.update(&self.buf);
                *h.finalize().as_bytes()
            }
        }
    }
}

impl std::fmt::Debug for WholeHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WholeHasher").finish_non_exhaustive()
    }
}

/// The hash of one seal's messages as a single input (docs/PROTOCOL.md
/// §5.3): BLAKE3 over a domain tag, the publisher, its epoch, the count
/// and each message's fields as [`event_digest`] encodes them (without
/// its tag), one after the other. `msgs` yields (seq, topic, payload,
/// headers, message ID).
pub fn seal_whole<'a, H>(
    publisher: &NodeId,
    epoch: u64,
    msgs: impl ExactSizeIterator<Item = (u64, &'a str, &'a [u8], H, Option<&'a str>)>,
) -> [u8; 32]
where
    H: IntoIterator<Item = (&'a str, &'a str)>,
{
    let mut h = WholeHasher::new(publisher, epoch, msgs.len());
    for (seq, topic, payload, headers, id) in msgs {
        h.add(seq, topic, payload, headers, id);
    }
    h.finish()
}

/// Domain tag of a topic group's digest ([`WholeHasher::group`]).
pub const GROUP_TAG: &[u8] = b"macula pub/sub topic group v3\0";

/// The digest of one topic group: `msgs` (seq, topic, payload, headers,
/// message ID), the seal's messages of one topic in order, hashed as
/// [`WholeHasher::group`] does.
pub fn group_digest<'a, H>(
    msgs: impl IntoIterator<Item = (u64, &'a str, &'a [u8], H, Option<&'a str>)>,
) -> [u8; 32]
where
    H: IntoIterator<Item = (&'a str, &'a str)>,
{
    let mut h = WholeHasher::group();
    for (seq, topic, payload, headers, id) in msgs {
        h.add(seq, topic, payload, headers, id);
    }
    h.finish()
}

/// What the signature of a seal of kind [`SEAL_KIND_GROUPS`] signs (after
/// its tag): BLAKE3 over a domain tag, the publisher, its epoch, the
/// seal's message count, its group count and the digests of its topic
/// groups in increasing byte order (so a receiver of some groups needs
/// no place for the others': `groups` is sorted here).
pub fn seal_hash_groups(
    publisher: &NodeId,
    epoch: u64,
    n: usize,
    groups: &mut [[u8; 32]],
) -> [u8; 32] {
    groups.sort_unstable();
    let mut h = blake3::Hasher::new();
    h.update(b"macula pub/sub seal v3\0");
    h.update(publisher.as_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(&(n as u64).to_le_bytes());
    h.update(&(groups.len() as u64).to_le_bytes());
    h.update(groups.as_flattened());
    *h.finalize().as_bytes()
}

/// What the signature of a seal of kind [`SEAL_KIND_WHOLE`] signs: BLAKE3
/// over a domain tag, the [`seal_whole`] hash of its messages and the
/// [`seal_hash`] of their digests (both over the same publisher, epoch
/// and messages).
pub fn seal_hash_whole(whole: &[u8; 32], digests_hash: &[u8; 32]) -> [u8; 32] {
    let mut b = [0u8; 23 + 64];
    b[..23].copy_from_slice(b"macula pub/sub seal v2\0");
    b[23..55].copy_from_slice(whole);
    b[55..].copy_from_slice(digests_hash);
    *blake3::hash(&b).as_bytes()
}

/// One message of an owned `PublishBatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMessage {
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
}

/// PUBLISH_BATCH, owned: what `Message::decode` returns. The runtime's hot
/// path uses the borrowing `PublishBatchView` instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishBatch {
    /// The publishing node; must be the node that sent the frame.
    pub publisher: NodeId,
    pub epoch: u64,
    /// In increasing `seq` order.
    pub messages: Vec<BatchMessage>,
    /// The seals proving the publisher (format 2); empty: format 1.
    pub seals: Vec<Seal>,
}

/// One message to encode: its topic is an index into the batch's topic table.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    pub seq: u64,
    pub topic_index: usize,
    pub payload: &'a [u8],
    pub headers: &'a [(String, String)],
    pub message_id: Option<&'a str>,
}

/// One decoded message, borrowing from the frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry<'a> {
    pub seq: u64,
    /// Index into `PublishBatchView::topics`.
    pub topic_index: usize,
    pub payload: &'a [u8],
    pub headers: Vec<(&'a str, &'a str)>,
    pub message_id: Option<&'a str>,
}

/// The head of a PUBLISH_BATCH body: who published, the topic table and
/// how many messages follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHead<'a> {
    pub publisher: NodeId,
    pub epoch: u64,
    pub topics: Vec<&'a str>,
    /// How many messages the batch says it carries.
    pub messages: u64,
    /// Format 2 or 3: seals follow the messages.
    pub sealed: bool,
    /// Format 3: each seal starts with its kind.
    pub seal_kinds: bool,
}

impl<'a> BatchHead<'a> {
    /// The head of a PUBLISH_BATCH body (publisher, epoch, topic table,
    /// message count) without its messages: what a receiver checks before
    /// it reads them (the realm's permissions). As strict as
    /// [`PublishBatchView::decode`] on what it reads.
    pub fn decode(body: &'a [u8]) -> Result<Self, String> {
        Self::read(&mut Cursor { buf: body })
    }

    fn read(c: &mut Cursor<'a>) -> Result<Self, String> {
        let format = c.u8()?;
        if !matches!(
            format,
            BATCH_FORMAT | BATCH_FORMAT_SEALED | BATCH_FORMAT_SEALED_WHOLE
        ) {
            return Err(format!(
                "batch format {format}, this node reads {BATCH_FORMAT} to {BATCH_FORMAT_SEALED_WHOLE}"
            ));
        }
        if c.buf.len() < 32 {
            return Err("truncated".into());
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(c.bytes(32));
        let publisher = NodeId::from_bytes(id);
        let epoch = c.varint()?;
        let n_topics = c.varint()?;
        if n_topics == 0 || n_topics > MAX_BATCH_TOPICS as u64 {
            return Err(format!(
                "{n_topics} topics, must be 1 to {MAX_BATCH_TOPICS}"
            ));
        }
        let mut topics = Vec::with_capacity((n_topics as usize).min(c.buf.len()));
        for _ in 0..n_topics {
            topics.push(c.str("topic", MAX_WIRE_TOPIC_LEN)?);
        }
        let messages = c.varint()?;
        if messages == 0 || messages > MAX_BATCH_MESSAGES as u64 {
            return Err(format!(
                "{messages} messages, must be 1 to {MAX_BATCH_MESSAGES}"
            ));
        }
        Ok(BatchHead {
            publisher,
            epoch,
            topics,
            messages,
            sealed: format != BATCH_FORMAT,
            seal_kinds: format == BATCH_FORMAT_SEALED_WHOLE,
        })
    }
}

/// A decoded PUBLISH_BATCH body, borrowing topics and payloads from it. Every
/// limit has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishBatchView<'a> {
    pub publisher: NodeId,
    pub epoch: u64,
    pub topics: Vec<&'a str>,
    pub entries: Vec<BatchEntry<'a>>,
    /// Its seals (format 2), in order: their present messages are
    /// `entries`, in order. Empty: an unsealed batch.
    pub seals: Vec<Seal>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// Writes a batch body (no frame header) to `out`. Checks every limit; on
/// error `out` may hold a partial body (the caller truncates).
pub(crate) fn write_batch_body<'a>(
    out: &mut Vec<u8>,
    publisher: &NodeId,
    epoch: u64,
    topics: &[&str],
    items: impl IntoIterator<Item = BatchItem<'a>>,
    seals: &[Seal],
) -> Result<usize, String> {
    if topics.is_empty() || topics.len() > MAX_BATCH_TOPICS {
        return Err(format!(
            "{} topics in a batch, must be 1 to {MAX_BATCH_TOPICS}",
            topics.len()
        ));
    }
    // Format 3 when a seal is of the new kind; format 2 keeps the seals
    // of receivers that predate it readable.
    let kinds = seals.iter().any(|s| s.kind() != SEAL_KIND_DIGESTS);
    out.push(match (seals.is_empty(), kinds) {
        (true, _) => BATCH_FORMAT,
        (false, false) => BATCH_FORMAT_SEALED,
        (false, true) => BATCH_FORMAT_SEALED_WHOLE,
    });
    out.extend_from_slice(publisher.as_bytes());
    put_varint(out, epoch);
    put_varint(out, topics.len() as u64);
    for t in topics {
        if t.len() > MAX_WIRE_TOPIC_LEN {
            return Err(format!("topic of {} bytes", t.len()));
        }
        put_str(out, t.as_bytes());
    }
    // The count goes before the messages; reserve the largest varint and
    // move the messages down afterwards if fewer bytes were needed.
    let count_at = out.len();
    out.extend_from_slice(&[0; 3]);
    let mut n = 0usize;
    let mut prev = 0u64;
    for it in items {
        if n == MAX_BATCH_MESSAGES {
            return Err(format!("more than {MAX_BATCH_MESSAGES} messages"));
        }
        if it.topic_index >= topics.len() {
            return Err(format!("topic index {} out of range", it.topic_index));
        }
        if it.seq <= prev && n > 0 {
            return Err(format!("seq {} after {prev}: not increasing", it.seq));
        }
        if it.seq == 0 && n == 0 {
            return Err("seq 0".into());
        }
        put_varint(out, it.seq - if n == 0 { 0 } else { prev });
        prev = it.seq;
        put_varint(out, it.topic_index as u64);
        let mut flags = 0;
        if !it.headers.is_empty() {
            flags |= FLAG_HEADERS;
        }
        if it.message_id.is_some() {
            flags |= FLAG_MESSAGE_ID;
        }
        out.push(flags);
        put_str(out, it.payload);
        if !it.headers.is_empty() {
            if it.headers.len() > MAX_WIRE_HEADERS {
                return Err(format!("{} headers", it.headers.len()));
            }
            put_varint(out, it.headers.len() as u64);
            for (k, v) in it.headers {
                if k.len() > MAX_WIRE_HEADER_LEN || v.len() > MAX_WIRE_HEADER_LEN {
                    return Err("header too long".into());
                }
                put_str(out, k.as_bytes());
                put_str(out, v.as_bytes());
            }
        }
        if let Some(id) = it.message_id {
            if id.len() > MAX_WIRE_MESSAGE_ID_LEN {
                return Err("message ID too long".into());
            }
            put_str(out, id.as_bytes());
        }
        n += 1;
    }
    if n == 0 {
        return Err("empty batch".into());
    }
    // n <= 65536 fits a 3-byte varint; write it minimal and close the gap.
    let mut count = Vec::with_capacity(3);
    put_varint(&mut count, n as u64);
    let gap = 3 - count.len();
    out[count_at..count_at + count.len()].copy_from_slice(&count);
    if gap > 0 {
        out.copy_within(count_at + 3.., count_at + count.len());
        out.truncate(out.len() - gap);
    }
    if !seals.is_empty() {
        if seals.len() > MAX_BATCH_MESSAGES {
            return Err(format!("{} seals", seals.len()));
        }
        if seals.iter().map(Seal::present_count).sum::<usize>() != n {
            return Err("the seals do not cover the batch's messages".into());
        }
        put_varint(out, seals.len() as u64);
        for seal in seals {
            seal.write(out, kinds)?;
        }
    }
    Ok(n)
}

/// Appends one whole PUBLISH_BATCH frame (header and body) to `out`. Fails,
/// leaving `out` as it was, if a limit is broken or the body would exceed
/// `max_len` (the receiver's frame limit). Returns the messages encoded.
pub fn encode_batch_frame<'a>(
    out: &mut Vec<u8>,
    max_len: u32,
    publisher: &NodeId,
    epoch: u64,
    topics: &[&str],
    items: impl IntoIterator<Item = BatchItem<'a>>,
) -> Result<usize, crate::EncodeError> {
    encode_sealed_batch_frame(out, max_len, publisher, epoch, topics, items, &[])
}

/// [`encode_batch_frame`] of a sealed batch (format 2, `seals` not empty)
/// or, with no seals, of an unsealed one.
pub fn encode_sealed_batch_frame<'a>(
    out: &mut Vec<u8>,
    max_len: u32,
    publisher: &NodeId,
    epoch: u64,
    topics: &[&str],
    items: impl IntoIterator<Item = BatchItem<'a>>,
    seals: &[Seal],
) -> Result<usize, crate::EncodeError> {
    use crate::frame::{FrameHeader, FRAME_HEADER_LEN};
    let msg_type = crate::MessageType::PublishBatch;
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    let n = match write_batch_body(out, publisher, epoch, topics, items, seals) {
        Ok(n) => n,
        Err(reason) => {
            out.truncate(start);
            return Err(crate::EncodeError::Invalid { msg_type, reason });
        }
    };
    let len = out.len() - start - FRAME_HEADER_LEN;
    let Some(len32) = u32::try_from(len).ok().filter(|l| *l <= max_len) else {
        out.truncate(start);
        return Err(crate::EncodeError::TooLarge {
            msg_type,
            len,
            max: max_len,
        });
    };
    out[start..start + FRAME_HEADER_LEN]
        .copy_from_slice(&FrameHeader::new(msg_type as u8, len32).encode());
    Ok(n)
}

/// A cursor over a batch body that never reads past its end.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.buf.split_first().ok_or("truncated")?;
        self.buf = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            if i == 9 && b > 1 {
                return Err("varint overflows u64".into());
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    /// A length that must not exceed `max` nor the bytes left.
    fn len(&mut self, what: &str, max: usize) -> Result<usize, String> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(format!("{what} of {n} bytes, limit {max}"));
        }
        if n > self.buf.len() as u64 {
            return Err(format!("{what} of {n} bytes runs past the body"));
        }
        Ok(n as usize)
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        head
    }

    fn str(&mut self, what: &str, max: usize) -> Result<&'a str, String> {
        let n = self.len(what, max)?;
        std::str::from_utf8(self.bytes(n)).map_err(|_| format!("{what} is not UTF-8"))
    }
}

impl<'a> PublishBatchView<'a> {
    /// Decodes a PUBLISH_BATCH body. Never panics; allocates at most in
    /// proportion to the body's length.
    pub fn decode(body: &'a [u8]) -> Result<Self, String> {
        Self::decode_in(body, None)
    }

    /// [`PublishBatchView::decode`] of a body held as [`Bytes`]: the
    /// hashes its seals carry are slices of it ([`SealHashes`]), not
    /// copies.
    pub fn decode_shared(body: &'a Bytes) -> Result<Self, String> {
        Self::decode_in(body, Some(body))
    }

    fn decode_in(body: &'a [u8], owner: Option<&Bytes>) -> Result<Self, String> {
        let mut c = Cursor { buf: body };
        let BatchHead {
            publisher,
            epoch,
            topics,
            messages: n_msgs,
            sealed,
            seal_kinds,
        } = BatchHead::read(&mut c)?;
        let n_topics = topics.len() as u64;
        // Each message takes at least 4 bytes: never reserve beyond the body.
        let mut entries = Vec::with_capacity((n_msgs as usize).min(c.buf.len() / 4));
        let mut seq = 0u64;
        for i in 0..n_msgs {
            let delta = c.varint()?;
            if delta == 0 {
                return Err(if i == 0 {
                    "seq 0"
                } else {
                    "seq not increasing"
                }
                .into());
            }
            seq = seq.checked_add(delta).ok_or("seq overflows u64")?;
            let topic_index = c.varint()?;
            if topic_index >= n_topics {
                return Err(format!("topic index {topic_index} of {n_topics}"));
            }
            let flags = c.u8()?;
            if flags & !KNOWN_MESSAGE_FLAGS != 0 {
                return Err(format!("unknown message flags {flags:#04x}"));
            }
            let n = c.len("payload", usize::MAX)?;
            let payload = c.bytes(n);
            let mut headers = Vec::new();
            if flags & FLAG_HEADERS != 0 {
                let n = c.varint()?;
                if n == 0 || n > MAX_WIRE_HEADERS as u64 {
                    return Err(format!("{n} headers, must be 1 to {MAX_WIRE_HEADERS}"));
                }
                for _ in 0..n {
                    let k = c.str("header name", MAX_WIRE_HEADER_LEN)?;
                    let v = c.str("header value", MAX_WIRE_HEADER_LEN)?;
                    headers.push((k, v));
                }
            }
            let message_id = if flags & FLAG_MESSAGE_ID != 0 {
                Some(c.str("message ID", MAX_WIRE_MESSAGE_ID_LEN)?)
            } else {
                None
            };
            if flags & FLAG_EXTENSION != 0 {
                let n = c.len("extension", usize::MAX)?;
                c.bytes(n);
            }
            entries.push(BatchEntry {
                seq,
                topic_index: topic_index as usize,
                payload,
                headers,
                message_id,
            });
        }
        let mut seals = Vec::new();
        if sealed {
            let n = c.varint()?;
            if n == 0 || n > n_msgs {
                return Err(format!("{n} seals for {n_msgs} messages"));
            }
            let mut covered = 0usize;
            for _ in 0..n {
                let seal = Seal::read(&mut c, seal_kinds, owner)?;
                covered += seal.present_count();
                seals.push(seal);
            }
            if covered as u64 != n_msgs {
                return Err(format!("seals cover {covered} of {n_msgs} messages"));
            }
        }
        if !c.buf.is_empty() {
            return Err(format!("{} trailing bytes after the batch", c.buf.len()));
        }
        Ok(PublishBatchView {
            publisher,
            epoch,
            topics,
            entries,
            seals,
        })
    }

    /// The owned form.
    pub fn to_owned_batch(&self) -> PublishBatch {
        PublishBatch {
            publisher: self.publisher,
            epoch: self.epoch,
            messages: self
                .entries
                .iter()
                .map(|e| BatchMessage {
                    seq: e.seq,
                    topic: self.topics[e.topic_index].to_string(),
                    payload: e.payload.to_vec(),
                    headers: e
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    message_id: e.message_id.map(str::to_string),
                })
                .collect(),
            seals: self.seals.clone(),
        }
    }
}

impl PublishBatch {
    /// Topic table and items for the encoder (topics interned).
    fn table(&self) -> Result<(Vec<&str>, Vec<BatchItem<'_>>), String> {
        let mut topics: Vec<&str> = Vec::new();
        let mut items = Vec::with_capacity(self.messages.len());
        for m in &self.messages {
            let topic_index = match topics.iter().position(|t| *t == m.topic) {
                Some(i) => i,
                None => {
                    if topics.len() == MAX_BATCH_TOPICS {
                        return Err(format!("more than {MAX_BATCH_TOPICS} topics"));
                    }
                    topics.push(&m.topic);
                    topics.len() - 1
                }
            };
            items.push(BatchItem {
                seq: m.seq,
                topic_index,
                payload: &m.payload,
                headers: &m.headers,
                message_id: m.message_id.as_deref(),
            });
        }
        Ok((topics, items))
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let mut scratch = Vec::new();
        self.write_body(&mut scratch).map(|_| ())
    }

    pub(crate) fn write_body(&self, out: &mut Vec<u8>) -> Result<usize, String> {
        let (topics, items) = self.table()?;
        write_batch_body(
            out,
            &self.publisher,
            self.epoch,
            &topics,
            items,
            &self.seals,
        )
    }
}

// ---------------------------------------------------------------------------
// PUBLISH_DROPPED (0x32): what a sender dropped for this receiver.
//
// Travels on a pub/sub data stream, before the batches that follow the
// loss, so a receiver can tell each affected subscription where it missed
// messages (docs/PROTOCOL.md §5.3, "Loss reports"). Binary, like the batch:
//
//   u8 format (= DROPPED_FORMAT) | publisher [32] | varint epoch
//   varint in_flight
//   varint n_topics | n_topics × (str topic, varint count)
//
// `in_flight`: messages in whole frames the sender wrote on its previous
// data stream to this receiver before it reset that stream (the receiver
// compares with what it read); 0 for none. A topic of "" stands for topics
// the sender did not keep apart. At least one of `in_flight` and `n_topics`
// is non-zero; every count is at least 1.
// ---------------------------------------------------------------------------

/// The loss report body format this version writes; others are malformed.
pub const DROPPED_FORMAT: u8 = 1;
/// Topics in one loss report.
pub const MAX_DROPPED_TOPICS: usize = 256;
/// Upper bound of a loss report's bytes besides its topic entries.
pub const DROPPED_BODY_OVERHEAD: usize = 1 + 32 + 10 + 10 + 2;
/// Upper bound of one topic entry's bytes besides the topic.
pub const DROPPED_ENTRY_OVERHEAD: usize = 2 + 10;

/// PUBLISH_DROPPED: messages of `publisher` that the sending node dropped
/// for the receiver, per topic, and what it lost in flight when it reset a
/// stalled data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishDropped {
    /// The publisher of the dropped messages (the sending node, or a client
    /// it forwards for, or one whose messages it forwards to a client).
    pub publisher: NodeId,
    pub epoch: u64,
    /// Messages in whole frames written on the sender's previous data stream
    /// to this receiver before it was reset (0: none).
    pub in_flight: u64,
    /// `(topic, count)`; `""` names no topic (every subscription is told).
    pub topics: Vec<(String, u64)>,
}

impl PublishDropped {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.topics.len() > MAX_DROPPED_TOPICS {
            return Err(format!(
                "{} topics in a loss report, limit {MAX_DROPPED_TOPICS}",
                self.topics.len()
            ));
        }
        if self.topics.is_empty() && self.in_flight == 0 {
            return Err("empty loss report".into());
        }
        for (t, n) in &self.topics {
            if t.len() > MAX_WIRE_TOPIC_LEN {
                return Err(format!("topic of {} bytes", t.len()));
            }
            if *n == 0 {
                return Err("a count of 0".into());
            }
        }
        Ok(())
    }

    /// Bytes of the body (exact).
    pub fn body_len(&self) -> usize {
        let mut scratch = Vec::new();
        self.put(&mut scratch);
        scratch.len()
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.push(DROPPED_FORMAT);
        out.extend_from_slice(self.publisher.as_bytes());
        put_varint(out, self.epoch);
        put_varint(out, self.in_flight);
        put_varint(out, self.topics.len() as u64);
        for (t, n) in &self.topics {
            put_str(out, t.as_bytes());
            put_varint(out, *n);
        }
    }

    /// Writes the body (no frame header) to `out`, checking every limit
    /// first (on error `out` is unchanged).
    pub(crate) fn write_body(&self, out: &mut Vec<u8>) -> Result<(), String> {
        self.validate()?;
        self.put(out);
        Ok(())
    }

    /// Decodes a PUBLISH_DROPPED body. Never panics; allocates at most in
    /// proportion to the body's length.
    pub fn decode(body: &[u8]) -> Result<Self, String> {
        let mut c = Cursor { buf: body };
        let format = c.u8()?;
        if format != DROPPED_FORMAT {
            return Err(format!(
                "loss report format {format}, this node reads {DROPPED_FORMAT}"
            ));
        }
        if c.buf.len() < 32 {
            return Err("truncated".into());
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(c.bytes(32));
        let epoch = c.varint()?;
        let in_flight = c.varint()?;
        let n = c.varint()?;
        if n > MAX_DROPPED_TOPICS as u64 {
            return Err(format!("{n} topics, limit {MAX_DROPPED_TOPICS}"));
        }
        // Each entry takes at least 2 bytes: never reserve beyond the body.
        let mut topics = Vec::with_capacity((n as usize).min(c.buf.len() / 2));
        for _ in 0..n {
            let t = c.str("topic", MAX_WIRE_TOPIC_LEN)?;
            let count = c.varint()?;
            topics.push((t.to_string(), count));
        }
        if !c.buf.is_empty() {
            return Err(format!("{} trailing bytes after the report", c.buf.len()));
        }
        let d = PublishDropped {
            publisher: NodeId::from_bytes(id),
            epoch,
            in_flight,
            topics,
        };
        d.validate()?;
        Ok(d)
    }
}

/// Fuzz entry point for the PUBLISH_DROPPED decoder: whatever decodes must
/// re-encode to the same bytes. Shared by
/// `fuzz/fuzz_targets/publish_dropped.rs` and the property tests.
pub fn fuzz_publish_dropped(data: &[u8]) {
    if let Ok(d) = PublishDropped::decode(data) {
        let mut body = Vec::new();
        assert!(
            d.write_body(&mut body).is_ok(),
            "a decoded report re-encodes"
        );
        assert_eq!(body, data, "one encoding per report");
        assert_eq!(d.body_len(), data.len());
    }
}

/// Fuzz entry point for the PUBLISH_BATCH decoder: whatever decodes must
/// re-encode and decode to the same messages. Shared by
/// `fuzz/fuzz_targets/publish_batch.rs` and the property tests.
pub fn fuzz_publish_batch(data: &[u8]) {
    let _ = BatchHead::decode(data);
    // Held as `Bytes`: the same answer, its seals' hashes slices of it.
    let shared = Bytes::copy_from_slice(data);
    let from_shared = PublishBatchView::decode_shared(&shared);
    assert_eq!(from_shared.is_ok(), PublishBatchView::decode(data).is_ok());
    if let Ok(v) = &from_shared {
        let (start, end) = (
            shared.as_ptr() as usize,
            shared.as_ptr() as usize + shared.len(),
        );
        for s in v.seals.iter().filter(|s| !s.absent.is_empty()) {
            let at = s.absent.as_bytes().as_ptr() as usize;
            assert!(at >= start && at + s.absent.as_bytes().len() <= end);
        }
    }
    if let Ok(view) = PublishBatchView::decode(data) {
        assert_eq!(from_shared.as_ref(), Ok(&view));
        let owned = view.to_owned_batch();
        let mut body = Vec::new();
        assert!(
            owned.write_body(&mut body).is_ok(),
            "a decoded batch re-encodes"
        );
        let again = PublishBatchView::decode(&body).map(|v| v.to_owned_batch());
        assert_eq!(again.as_ref(), Ok(&owned));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_str(max_chars: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..max_chars).prop_map(|c| c.into_iter().collect())
    }

    fn arb_batch() -> impl Strategy<Value = PublishBatch> {
        let msg = (
            1u64..1000,
            0usize..4,
            proptest::collection::vec(any::<u8>(), 0..80),
            proptest::collection::vec((arb_str(8), arb_str(8)), 0..3),
            proptest::option::of(arb_str(16)),
        );
        (
            any::<[u8; 32]>(),
            any::<u64>(),
            proptest::collection::vec(arb_str(12), 4),
            1u64..u64::MAX / 2,
            proptest::collection::vec(msg, 1..20),
        )
            .prop_map(|(p, epoch, topics, first, msgs)| {
                let mut seq = first;
                let messages = msgs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (gap, t, payload, headers, message_id))| {
                        if i > 0 {
                            seq += gap;
                        }
                        BatchMessage {
                            seq,
                            topic: topics[t].clone(),
                            payload,
                            headers,
                            message_id,
                        }
                    })
                    .collect();
                PublishBatch {
                    publisher: NodeId::from_bytes(p),
                    epoch,
                    messages,
                    seals: Vec::new(),
                }
            })
    }

    fn body(b: &PublishBatch) -> Vec<u8> {
        let mut out = Vec::new();
        b.write_body(&mut out).unwrap();
        out
    }

    proptest! {
        #[test]
        fn batches_round_trip(b in arb_batch()) {
            let bytes = body(&b);
            let view = PublishBatchView::decode(&bytes).unwrap();
            // The head alone agrees with the whole.
            let head = BatchHead::decode(&bytes).unwrap();
            prop_assert_eq!(head.publisher, view.publisher);
            prop_assert_eq!(head.epoch, view.epoch);
            prop_assert_eq!(&head.topics, &view.topics);
            prop_assert_eq!(head.messages, view.entries.len() as u64);
            prop_assert_eq!(view.to_owned_batch(), b);
        }

        #[test]
        fn every_prefix_is_refused(b in arb_batch(), cut in any::<prop::sample::Index>()) {
            let bytes = body(&b);
            let cut = cut.index(bytes.len());
            prop_assert!(PublishBatchView::decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn arbitrary_bodies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_publish_batch(&data);
            // What the full decode takes, the head takes too.
            if PublishBatchView::decode(&data).is_ok() {
                prop_assert!(BatchHead::decode(&data).is_ok());
            }
        }

        #[test]
        fn mutated_bodies_never_panic(b in arb_batch(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = body(&b);
            let i = at.index(bytes.len());
            bytes[i] = byte;
            fuzz_publish_batch(&bytes);
        }
    }

    /// A batch with seals: its messages split into runs, each run the
    /// present messages of one seal with up to 3 absent ones around them.
    fn arb_sealed_batch() -> impl Strategy<Value = PublishBatch> {
        (
            arb_batch(),
            proptest::collection::vec(
                (1usize..4, 0usize..4, any::<[u8; 32]>(), any::<u8>()),
                1..20,
            ),
        )
            .prop_map(|(mut b, cuts)| {
                let mut left = b.messages.len();
                let mut seals = Vec::new();
                let mut cut = cuts.iter().cycle();
                while left > 0 {
                    let &(present, absent, key, fill) = cut.next().unwrap();
                    let present = present.min(left);
                    left -= present;
                    let n = present + absent;
                    let mut bits = vec![0u8; n.div_ceil(8)];
                    // Absent ones first, then the present ones.
                    for i in absent..n {
                        bits[i / 8] |= 1 << (i % 8);
                    }
                    seals.push(Seal {
                        key,
                        sig: [fill; 64],
                        n,
                        present: bits.clone(),
                        // Every fourth seal of the whole kind, every
                        // fourth another of topic groups (format 3): one
                        // group digest for all its absent messages, and
                        // every fourth another of aligned digests.
                        carried: (fill % 4 == 0).then_some([fill ^ 0x5a; 32]),
                        groups: fill % 4 == 1,
                        aligned: fill % 4 == 2,
                        absent: match (fill % 4, absent > 0) {
                            (1, true) => vec![[fill; 32]; 1 + absent / 2],
                            // Kind 4: one hash per maximal absent subtree.
                            (2, _) => vec![[fill; 32]; seal_tree_absent_count(n, &bits)],
                            _ => vec![[fill; 32]; absent],
                        }
                        .into(),
                    });
                }
                b.seals = seals;
                b
            })
    }

    proptest! {
        #[test]
        fn sealed_batches_round_trip(b in arb_sealed_batch()) {
            let bytes = body(&b);
            let whole = b.seals.iter().any(|s| s.kind() != SEAL_KIND_DIGESTS);
            prop_assert_eq!(
                bytes[0],
                if whole { BATCH_FORMAT_SEALED_WHOLE } else { BATCH_FORMAT_SEALED }
            );
            let view = PublishBatchView::decode(&bytes).unwrap();
            prop_assert!(BatchHead::decode(&bytes).unwrap().sealed);
            prop_assert_eq!(view.to_owned_batch(), b.clone());
            // Decoded from shared bytes: the same, its hashes not copied.
            fuzz_publish_batch(&bytes);
            let cut = bytes.len() - 1;
            prop_assert!(PublishBatchView::decode(&bytes[..cut]).is_err());
            // Seals that do not cover the messages exactly do not encode.
            let mut short = b.clone();
            short.seals.pop();
            if !short.seals.is_empty() {
                prop_assert!(short.validate().is_err());
            }
        }

        #[test]
        fn mutated_sealed_bodies_never_panic(b in arb_sealed_batch(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = body(&b);
            let i = at.index(bytes.len());
            bytes[i] = byte;
            fuzz_publish_batch(&bytes);
        }
    }

    #[test]
    fn event_digests_leave_hop_headers_out() {
        let h = |tp: &'static str| {
            event_digest(
                7,
                "a.b",
                b"hi",
                [("k", "v"), ("traceparent", tp)],
                Some("id"),
            )
        };
        assert_eq!(h("00-a"), h("00-b"));
        assert_ne!(
            event_digest(7, "a.b", b"hi", [("k", "v")], Some("id")),
            event_digest(7, "a.b", b"hi", [("k", "w")], Some("id"))
        );
        assert_ne!(
            event_digest(7, "a.b", b"hi", [], None),
            event_digest(8, "a.b", b"hi", [], None)
        );
        assert_ne!(
            event_digest(7, "a.b", b"hi", [], None),
            event_digest(7, "a.bh", b"i", [], None)
        );
    }

    /// The digest as PROTOCOL.md §5.3 writes it, streamed piece by piece
    /// (what `event_digest` computed before it gathered the pieces).
    fn reference_digest(
        seq: u64,
        topic: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
        message_id: Option<&str>,
    ) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"macula event digest v1\0");
        h.update(&seq.to_le_bytes());
        h.update(&(topic.len() as u64).to_le_bytes());
        h.update(topic.as_bytes());
        h.update(&(payload.len() as u64).to_le_bytes());
        h.update(payload);
        for (k, v) in headers {
            if is_hop_header(k) {
                continue;
            }
            h.update(&[1]);
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(v.as_bytes());
        }
        match message_id {
            Some(id) => {
                h.update(&[2]);
                h.update(&(id.len() as u64).to_le_bytes());
                h.update(id.as_bytes());
            }
            None => {
                h.update(&[0]);
            }
        }
        *h.finalize().as_bytes()
    }

    proptest! {
        /// Gathering the pieces (and spilling past the buffer) hashes the
        /// same bytes as streaming them.
        #[test]
        fn event_digest_is_the_streamed_digest(
            seq in any::<u64>(),
            topic in arb_str(40),
            payload in proptest::collection::vec(any::<u8>(), 0..2_000),
            headers in proptest::collection::vec((arb_str(20), arb_str(300)), 0..4),
            id in proptest::option::of(arb_str(60)),
        ) {
            let hs: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            prop_assert_eq!(
                event_digest(seq, &topic, &payload, hs.iter().copied(), id.as_deref()),
                reference_digest(seq, &topic, &payload, &hs, id.as_deref())
            );
        }

        /// The aligned digest is BLAKE3 over the bytes PROTOCOL.md §5.3
        /// lists, streamed piece by piece: the v1 fields with the payload
        /// replaced by its own hash; never a v1 digest.
        #[test]
        fn aligned_digest_is_the_streamed_digest(
            seq in any::<u64>(),
            topic in arb_str(40),
            payload in proptest::collection::vec(any::<u8>(), 0..40_000),
            headers in proptest::collection::vec((arb_str(20), arb_str(300)), 0..4),
            id in proptest::option::of(arb_str(60)),
        ) {
            let hs: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut h = blake3::Hasher::new();
            h.update(b"macula event digest v4\0");
            h.update(&seq.to_le_bytes());
            h.update(&(topic.len() as u64).to_le_bytes());
            h.update(topic.as_bytes());
            h.update(&(payload.len() as u64).to_le_bytes());
            let mut ph = blake3::Hasher::new();
            for piece in payload.chunks(777) {
                ph.update(piece);
            }
            h.update(ph.finalize().as_bytes());
            for (k, v) in hs.iter().filter(|(k, _)| !is_hop_header(k)) {
                h.update(&[1]);
                h.update(&(k.len() as u64).to_le_bytes());
                h.update(k.as_bytes());
                h.update(&(v.len() as u64).to_le_bytes());
                h.update(v.as_bytes());
            }
            match id.as_deref() {
                Some(id) => {
                    h.update(&[2]);
                    h.update(&(id.len() as u64).to_le_bytes());
                    h.update(id.as_bytes());
                }
                None => {
                    h.update(&[0]);
                }
            }
            let d = event_digest_aligned(seq, &topic, &payload, hs.iter().copied(), id.as_deref());
            prop_assert_eq!(d, *h.finalize().as_bytes());
            prop_assert_ne!(d, event_digest(seq, &topic, &payload, hs.iter().copied(), id.as_deref()));
        }

        #[test]
        fn seal_hash_aligned_is_its_own(
            digests in proptest::collection::vec(any::<[u8; 32]>(), 1..300),
        ) {
            let p = NodeId::from_bytes([9; 32]);
            let root = SealTree::new(&digests).root().unwrap_or_default();
            let mut h = blake3::Hasher::new();
            h.update(b"macula pub/sub seal v4\0");
            h.update(p.as_bytes());
            h.update(&5u64.to_le_bytes());
            h.update(&(digests.len() as u64).to_le_bytes());
            h.update(&root);
            prop_assert_eq!(seal_hash_aligned(&p, 5, digests.len(), &root), *h.finalize().as_bytes());
            prop_assert_ne!(seal_hash_aligned(&p, 5, digests.len(), &root), seal_hash(&p, 5, &digests));
        }

        #[test]
        fn a_seal_tree_is_rfc_9162_shaped_and_any_part_of_it_gives_its_root(
            leaves in proptest::collection::vec(any::<[u8; 32]>(), 1..200),
            bits in proptest::collection::vec(any::<u8>(), 25),
            run in (0usize..200, 1usize..40),
        ) {
            // The reference: RFC 9162 §2.1.1's MTH, BLAKE3 and tags.
            fn mth(d: &[[u8; 32]]) -> [u8; 32] {
                if d.len() == 1 {
                    return d[0];
                }
                let mut k = 1;
                while 2 * k < d.len() {
                    k *= 2;
                }
                let mut h = blake3::Hasher::new();
                h.update(b"macula pub/sub seal node v4\0");
                h.update(&mth(&d[..k]));
                h.update(&mth(&d[k..]));
                *h.finalize().as_bytes()
            }
            let n = leaves.len();
            let full = SealTree::new(&leaves);
            prop_assert_eq!(full.root(), Some(mth(&leaves)));
            let bitmap = |keep: &dyn Fn(usize) -> bool| -> Vec<u8> {
                let mut b = vec![0u8; n.div_ceil(8)];
                for i in (0..n).filter(|&i| keep(i)) {
                    b[i / 8] |= 1 << (i % 8);
                }
                b
            };
            let is = |b: &[u8], i: usize| b[i / 8] & (1 << (i % 8)) != 0;
            // Any subset, and a contiguous run (a client's frame).
            let any_set = bitmap(&|i| bits[i % 25] & (1 << (i % 8)) != 0 || i == 0);
            let (a, len) = (run.0 % n, run.1);
            let contiguous = bitmap(&|i| i >= a && i < a + len);
            for present in [&any_set, &contiguous] {
                let mut carried = Vec::new();
                prop_assert!(full.absent(present, &mut carried).is_some());
                prop_assert_eq!(carried.len(), seal_tree_absent_count(n, present));
                let absent_leaves = (0..n).filter(|&i| !is(present, i)).count();
                prop_assert!(carried.len() <= absent_leaves);
                let got: Vec<[u8; 32]> =
                    (0..n).filter(|&i| is(present, i)).map(|i| leaves[i]).collect();
                let part = SealTree::from_part(n, present, got.iter().copied(), &carried);
                prop_assert!(part.is_some());
                let part = part.unwrap_or_default();
                prop_assert_eq!(part.root(), full.root());
                // A copy of a subset of it: the same hashes as the
                // publisher's tree gives it.
                let sub = bitmap(&|i| is(present, i) && (i % 3 != 1 || i == a));
                if sub.iter().any(|&b| b != 0) {
                    let (mut x, mut y) = (Vec::new(), Vec::new());
                    prop_assert!(part.absent(&sub, &mut x).is_some());
                    prop_assert!(full.absent(&sub, &mut y).is_some());
                    prop_assert_eq!(x, y);
                }
                // One carried hash changed, or one leaf: another root.
                if !carried.is_empty() {
                    let mut c = carried.clone();
                    let j = bits[0] as usize % c.len();
                    c[j][bits[1] as usize % 32] ^= 1;
                    let bad = SealTree::from_part(n, present, got.iter().copied(), &c);
                    prop_assert_ne!(bad.and_then(|t| t.root()), full.root());
                }
                let mut g = got.clone();
                g[0][0] ^= 1;
                let bad = SealTree::from_part(n, present, g.iter().copied(), &carried);
                prop_assert_ne!(bad.and_then(|t| t.root()), full.root());
                // Counts that do not add up: refused.
                prop_assert!(SealTree::from_part(n, present, got.iter().copied().skip(1), &carried).is_none());
                let mut more = carried.clone();
                more.push([0; 32]);
                prop_assert!(SealTree::from_part(n, present, got.iter().copied(), &more).is_none());
            }
            // A contiguous run carries at most two hashes per level.
            prop_assert!(seal_tree_absent_count(n, &contiguous) <= 2 * seal_tree_depth(n));
        }

        #[test]
        fn seal_hash_is_the_streamed_hash(
            digests in proptest::collection::vec(any::<[u8; 32]>(), 0..300),
        ) {
            let p = NodeId::from_bytes([9; 32]);
            let mut h = blake3::Hasher::new();
            h.update(b"macula pub/sub seal v1\0");
            h.update(p.as_bytes());
            h.update(&5u64.to_le_bytes());
            h.update(&(digests.len() as u64).to_le_bytes());
            for d in &digests {
                h.update(d);
            }
            prop_assert_eq!(seal_hash(&p, 5, &digests), *h.finalize().as_bytes());
        }
    }

    proptest! {
        /// The whole hash gathered in a buffer (payloads past it streamed
        /// as they are) is BLAKE3 over the bytes PROTOCOL.md §5.3 lists,
        /// streamed piece by piece.
        #[test]
        fn seal_whole_is_the_streamed_hash(
            msgs in proptest::collection::vec(
                (
                    any::<u64>(),
                    arb_str(40),
                    proptest::collection::vec(any::<u8>(), 0..5_000),
                    proptest::collection::vec((arb_str(20), arb_str(300)), 0..3),
                    proptest::option::of(arb_str(60)),
                ),
                0..12,
            ),
        ) {
            let p = NodeId::from_bytes([9; 32]);
            let mut h = blake3::Hasher::new();
            h.update(b"macula pub/sub seal whole v2\0");
            h.update(p.as_bytes());
            h.update(&5u64.to_le_bytes());
            h.update(&(msgs.len() as u64).to_le_bytes());
            for (seq, topic, payload, headers, id) in &msgs {
                h.update(&seq.to_le_bytes());
                h.update(&(topic.len() as u64).to_le_bytes());
                h.update(topic.as_bytes());
                h.update(&(payload.len() as u64).to_le_bytes());
                h.update(payload);
                for (k, v) in headers {
                    if is_hop_header(k) {
                        continue;
                    }
                    h.update(&[1]);
                    h.update(&(k.len() as u64).to_le_bytes());
                    h.update(k.as_bytes());
                    h.update(&(v.len() as u64).to_le_bytes());
                    h.update(v.as_bytes());
                }
                match id {
                    Some(id) => {
                        h.update(&[2]);
                        h.update(&(id.len() as u64).to_le_bytes());
                        h.update(id.as_bytes());
                    }
                    None => {
                        h.update(&[0]);
                    }
                }
            }
            let got = seal_whole(
                &p,
                5,
                msgs.iter().map(|(seq, t, pl, hs, id)| {
                    (
                        *seq,
                        t.as_str(),
                        &pl[..],
                        hs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                        id.as_deref(),
                    )
                }),
            );
            prop_assert_eq!(got, *h.finalize().as_bytes());
        }

        /// A topic group sized with `added_len` gathers without growing
        /// its buffer and, past the buffer (more than 128 KiB of
        /// messages, large payloads streamed as they are), still hashes
        /// exactly the streamed bytes.
        #[test]
        fn a_sized_group_is_the_streamed_hash_and_never_grows(
            msgs in proptest::collection::vec(
                (
                    any::<u64>(),
                    arb_str(20),
                    (0usize..4_000, any::<u8>()),
                    proptest::collection::vec((arb_str(10), arb_str(40)), 0..2),
                    proptest::option::of(arb_str(20)),
                ),
                0..160,
            ),
        ) {
            let msgs: Vec<_> = msgs
                .into_iter()
                .map(|(seq, t, (n, b), hs, id)| (seq, t, vec![b; n], hs, id))
                .collect();
            let mut h = blake3::Hasher::new();
            h.update(GROUP_TAG);
            let mut bytes = 0;
            for (seq, topic, payload, headers, id) in &msgs {
                bytes += WholeHasher::added_len(
                    topic,
                    payload.len(),
                    headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    id.as_deref(),
                );
                h.update(&seq.to_le_bytes());
                h.update(&(topic.len() as u64).to_le_bytes());
                h.update(topic.as_bytes());
                h.update(&(payload.len() as u64).to_le_bytes());
                h.update(payload);
                for (k, v) in headers {
                    if is_hop_header(k) {
                        continue;
                    }
                    h.update(&[1]);
                    h.update(&(k.len() as u64).to_le_bytes());
                    h.update(k.as_bytes());
                    h.update(&(v.len() as u64).to_le_bytes());
                    h.update(v.as_bytes());
                }
                match id {
                    Some(id) => {
                        h.update(&[2]);
                        h.update(&(id.len() as u64).to_le_bytes());
                        h.update(id.as_bytes());
                    }
                    None => {
                        h.update(&[0]);
                    }
                }
            }
            let mut g = WholeHasher::group_sized(bytes);
            let room = g.buf.capacity();
            for (seq, t, pl, hs, id) in &msgs {
                g.add(
                    *seq,
                    t,
                    pl,
                    hs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    id.as_deref(),
                );
                prop_assert_eq!(g.buf.capacity(), room);
            }
            prop_assert_eq!(g.finish(), *h.finalize().as_bytes());
        }
    }

    #[test]
    fn whole_seals_hash_what_they_say() {
        let p = NodeId::from_bytes([9; 32]);
        let one = |payload: &'static [u8], seq| {
            seal_whole(
                &p,
                5,
                [(seq, "a.b", payload, [("k", "v")], None)].into_iter(),
            )
        };
        assert_ne!(one(b"hi", 7), one(b"ho", 7));
        assert_ne!(one(b"hi", 7), one(b"hi", 8));
        // Two messages are not one message with their bytes run together.
        let two = seal_whole(
            &p,
            5,
            [(7, "a", &b"x"[..], [], None), (8, "a", &b"y"[..], [], None)].into_iter(),
        );
        let joined = seal_whole(&p, 5, [(7, "a", &b"xy"[..], [], None)].into_iter());
        assert_ne!(two, joined);
        // The hash signed binds both halves.
        let (w, d) = ([1; 32], [2; 32]);
        assert_ne!(seal_hash_whole(&w, &d), seal_hash_whole(&d, &w));
    }

    #[test]
    fn seals_of_aligned_digests_are_kind_4_and_carry_subtree_hashes() {
        let seal = |present: Vec<u8>, absent: Vec<[u8; 32]>| Seal {
            key: [3; 32],
            sig: [4; 64],
            n: 4,
            present,
            absent: absent.into(),
            carried: None,
            groups: false,
            aligned: true,
        };
        let msg = |seq| BatchMessage {
            seq,
            topic: "a.b".into(),
            payload: b"hi".to_vec(),
            headers: vec![],
            message_id: None,
        };
        let b = |seals| PublishBatch {
            publisher: NodeId::from_bytes([1; 32]),
            epoch: 5,
            messages: vec![msg(7), msg(8)],
            seals,
        };
        // The first two of four present: one hash, of the subtree of the
        // last two (a tree of 4 splits at 2).
        let first_two = body(&b(vec![seal(vec![0b0011], vec![[6; 32]])]));
        let tail = 1 + 32 + 64 + 1 + 1 + 32;
        assert_eq!(first_two[first_two.len() - tail], SEAL_KIND_ALIGNED);
        let v = PublishBatchView::decode(&first_two).unwrap();
        assert_eq!(v.seals[0].absent, vec![[6; 32]]);
        // Under kind 1 the same bytes are one digest short: malformed.
        let mut as1 = first_two.clone();
        let at = first_two.len() - tail;
        as1[at] = SEAL_KIND_DIGESTS;
        assert!(PublishBatchView::decode(&as1).is_err());
        // Messages 0 and 2 present: the leaves 1 and 3, two hashes.
        let part = body(&b(vec![seal(vec![0b0101], vec![[6; 32], [7; 32]])]));
        assert_eq!(part[0], BATCH_FORMAT_SEALED_WHOLE);
        let tail = 1 + 32 + 64 + 1 + 1 + 64;
        let at = part.len() - tail;
        assert_eq!(part[at], SEAL_KIND_ALIGNED);
        let v = PublishBatchView::decode(&part).unwrap();
        let s = &v.seals[0];
        assert!(s.aligned && !s.groups && s.carried.is_none());
        assert_eq!(s.kind(), SEAL_KIND_ALIGNED);
        assert_eq!(s.absent, vec![[6; 32], [7; 32]]);
        assert_eq!(s.encoded_len(), tail);
        // The same bytes under kind 1 read as kind 1 (what the signature's
        // tag then refuses, in macula-pubsub), never as kind 4.
        let mut as1 = part.clone();
        as1[at] = SEAL_KIND_DIGESTS;
        let v1 = PublishBatchView::decode(&as1).unwrap();
        assert!(!v1.seals[0].aligned);
        // Digests that do not match the bitmap, another kind at once, or
        // kind 4 in a format 2 batch: refused.
        assert!(b(vec![seal(vec![0b0011], vec![[6; 32], [7; 32]])])
            .write_body(&mut Vec::new())
            .is_err());
        assert!(b(vec![seal(vec![0b0101], vec![[6; 32]])])
            .write_body(&mut Vec::new())
            .is_err());
        let mixed = Seal {
            groups: true,
            absent: vec![[6; 32]].into(),
            ..seal(vec![0b0011], vec![])
        };
        assert!(b(vec![mixed]).write_body(&mut Vec::new()).is_err());
        let carried = Seal {
            carried: Some([1; 32]),
            ..seal(vec![0b0101], vec![[6; 32], [7; 32]])
        };
        assert!(b(vec![carried]).write_body(&mut Vec::new()).is_err());
        let mut as2 = part.clone();
        as2[0] = BATCH_FORMAT_SEALED;
        as2.remove(at);
        assert!(PublishBatchView::decode(&as2).map_or(true, |v| !v.seals[0].aligned));
        // A kind past 4: malformed.
        let mut k5 = part.clone();
        k5[at] = 5;
        assert!(PublishBatchView::decode(&k5).is_err());
    }

    #[test]
    fn seals_of_topic_groups_carry_a_count_of_group_digests() {
        let seal = |present: Vec<u8>, absent: Vec<[u8; 32]>| Seal {
            key: [3; 32],
            sig: [4; 64],
            n: 4,
            present,
            absent: absent.into(),
            carried: None,
            groups: true,
            aligned: false,
        };
        let msg = |seq| BatchMessage {
            seq,
            topic: "a.b".into(),
            payload: b"hi".to_vec(),
            headers: vec![],
            message_id: None,
        };
        let b = |seals| PublishBatch {
            publisher: NodeId::from_bytes([1; 32]),
            epoch: 5,
            messages: vec![msg(7), msg(8)],
            seals,
        };
        // Two of four present, one digest for the two others (one group).
        let part = body(&b(vec![seal(vec![0b0011], vec![[6; 32]])]));
        assert_eq!(part[0], BATCH_FORMAT_SEALED_WHOLE);
        let tail = 1 + 32 + 64 + 1 + 1 + 1 + 32;
        let at = part.len() - tail;
        assert_eq!(part[at], SEAL_KIND_GROUPS);
        assert_eq!(part[part.len() - 33], 1, "the count of group digests");
        let v = PublishBatchView::decode(&part).unwrap();
        assert!(v.seals[0].groups && v.seals[0].carried.is_none());
        assert_eq!(v.seals[0].absent, vec![[6; 32]]);
        assert_eq!(v.seals[0].encoded_len(), tail);
        // A count of more digests than absent messages, or none for
        // absent messages: malformed.
        let mut more = part.clone();
        more[part.len() - 33] = 3;
        assert!(PublishBatchView::decode(&more).is_err());
        assert!(b(vec![seal(vec![0b0011], vec![])])
            .write_body(&mut Vec::new())
            .is_err());
        let mut none = part.clone();
        none[part.len() - 33] = 0;
        none.truncate(part.len() - 32);
        assert!(PublishBatchView::decode(&none).is_err());
        // Complete: no digest.
        let whole = PublishBatch {
            messages: vec![msg(7), msg(8), msg(9), msg(10)],
            ..b(vec![seal(vec![0b1111], vec![])])
        };
        let v = body(&whole);
        assert_eq!(
            PublishBatchView::decode(&v).unwrap().seals[0].absent.len(),
            0
        );
        // The seal hash binds the set of group digests, in any order,
        // and the counts.
        let p = NodeId::from_bytes([1; 32]);
        let (x, y) = ([1u8; 32], [2u8; 32]);
        let h = seal_hash_groups(&p, 5, 4, &mut [x, y]);
        assert_eq!(h, seal_hash_groups(&p, 5, 4, &mut [y, x]));
        assert_ne!(h, seal_hash_groups(&p, 5, 3, &mut [x, y]));
        assert_ne!(h, seal_hash_groups(&p, 5, 4, &mut [x, y, y]));
        assert_ne!(h, seal_hash_groups(&p, 6, 4, &mut [x, y]));
        // A group's digest is not the whole hash of the same messages.
        let m = || {
            [(
                7u64,
                "a.b",
                &b"hi"[..],
                std::iter::empty::<(&str, &str)>(),
                None,
            )]
        };
        assert_ne!(group_digest(m()), seal_whole(&p, 5, m().into_iter()));
    }

    #[test]
    fn seal_kinds_are_checked() {
        let seal = |carried| Seal {
            key: [3; 32],
            sig: [4; 64],
            n: 1,
            present: vec![1],
            absent: SealHashes::default(),
            carried,
            groups: false,
            aligned: false,
        };
        let b = |seals| PublishBatch {
            publisher: NodeId::from_bytes([1; 32]),
            epoch: 5,
            messages: vec![BatchMessage {
                seq: 7,
                topic: "a.b".into(),
                payload: b"hi".to_vec(),
                headers: vec![],
                message_id: None,
            }],
            seals,
        };
        let old = body(&b(vec![seal(None)]));
        assert_eq!(old[0], BATCH_FORMAT_SEALED, "old seals keep format 2");
        let new = body(&b(vec![seal(Some([6; 32]))]));
        assert_eq!(new[0], BATCH_FORMAT_SEALED_WHOLE);
        let v = PublishBatchView::decode(&new).unwrap();
        assert_eq!(v.seals[0].carried, Some([6; 32]));
        // The kind byte follows the message count: an unknown kind is
        // malformed.
        let at = new.len() - (1 + 32 + 64 + 1 + 1 + 32);
        assert_eq!(new[at], SEAL_KIND_WHOLE);
        let mut bad = new.clone();
        bad[at] = 4;
        assert!(PublishBatchView::decode(&bad).is_err());
        // A format 2 body read as format 3 is malformed, not misread.
        let mut as3 = old.clone();
        as3[0] = BATCH_FORMAT_SEALED_WHOLE;
        assert!(PublishBatchView::decode(&as3).is_err());
    }

    fn arb_dropped() -> impl Strategy<Value = PublishDropped> {
        (
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((arb_str(12), 1u64..u64::MAX), 0..8),
        )
            .prop_filter("not empty", |(_, _, f, t)| *f > 0 || !t.is_empty())
            .prop_map(|(p, epoch, in_flight, topics)| PublishDropped {
                publisher: NodeId::from_bytes(p),
                epoch,
                in_flight,
                topics,
            })
    }

    proptest! {
        #[test]
        fn loss_reports_round_trip(d in arb_dropped()) {
            let mut bytes = Vec::new();
            d.write_body(&mut bytes).unwrap();
            prop_assert_eq!(bytes.len(), d.body_len());
            prop_assert_eq!(PublishDropped::decode(&bytes), Ok(d.clone()));
            let cut = bytes.len() - 1;
            prop_assert!(PublishDropped::decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn arbitrary_loss_reports_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_publish_dropped(&data);
        }
    }

    #[test]
    fn loss_reports_refuse_bad_input() {
        let ok = PublishDropped {
            publisher: NodeId::from_bytes([1; 32]),
            epoch: 5,
            in_flight: 0,
            topics: vec![("a.b".into(), 3)],
        };
        let mut b = Vec::new();
        ok.write_body(&mut b).unwrap();
        // format, publisher, epoch 5, in_flight 0, 1 topic "a.b" count 3.
        assert_eq!(b.len(), 1 + 32 + 1 + 1 + 1 + 4 + 1);
        assert_eq!(&b[33..], &[5, 0, 1, 3, b'a', b'.', b'b', 3]);
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(PublishDropped::decode(&v2).is_err(), "unknown format");
        let mut zero = b.clone();
        *zero.last_mut().unwrap() = 0;
        assert!(PublishDropped::decode(&zero).is_err(), "count 0");
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(PublishDropped::decode(&trailing).is_err());
        let empty = PublishDropped {
            topics: vec![],
            ..ok.clone()
        };
        assert!(empty.validate().is_err(), "nothing to report");
        let in_flight_only = PublishDropped {
            in_flight: 7,
            ..empty
        };
        assert!(in_flight_only.validate().is_ok());
        let many = PublishDropped {
            topics: vec![("t".into(), 1); MAX_DROPPED_TOPICS + 1],
            ..ok
        };
        assert!(many.validate().is_err(), "too many topics");
    }

    #[test]
    fn compact_for_small_messages() {
        let b = PublishBatch {
            publisher: NodeId::from_bytes([1; 32]),
            epoch: 1_700_000_000_000,
            messages: (1..=100)
                .map(|seq| BatchMessage {
                    seq,
                    topic: "bench.remote.data".into(),
                    payload: vec![7; 64],
                    headers: vec![],
                    message_id: None,
                })
                .collect(),
            seals: Vec::new(),
        };
        let bytes = body(&b);
        // 4 bytes of overhead per 64-byte message, plus the batch header.
        assert!(bytes.len() <= 100 * 68 + 64, "{}", bytes.len());
    }

    #[test]
    fn limits_and_bad_input_are_refused() {
        let one = |seq, flags: u8| {
            let mut b = vec![BATCH_FORMAT];
            b.extend_from_slice(&[0; 32]);
            b.extend_from_slice(&[5, 1, 1, b'a', 1, seq, 0, flags, 0]);
            b
        };
        assert!(PublishBatchView::decode(&one(1, 0)).is_ok());
        assert!(PublishBatchView::decode(&one(0, 0)).is_err(), "seq 0");
        assert!(
            PublishBatchView::decode(&one(1, 0x80)).is_err(),
            "unknown flag"
        );
        let mut ext = one(1, FLAG_EXTENSION);
        ext.extend_from_slice(&[2, 9, 9]);
        assert!(PublishBatchView::decode(&ext).is_ok(), "extension skipped");
        let mut trailing = one(1, 0);
        trailing.push(0);
        assert!(PublishBatchView::decode(&trailing).is_err());
        let mut v2 = one(1, 0);
        v2[0] = BATCH_FORMAT_SEALED;
        assert!(
            PublishBatchView::decode(&v2).is_err(),
            "sealed without seals"
        );
        let mut v3 = one(1, 0);
        v3[0] = 3;
        assert!(PublishBatchView::decode(&v3).is_err(), "unknown format");
        // A count far beyond the body allocates nothing large and fails.
        let mut huge = vec![BATCH_FORMAT];
        huge.extend_from_slice(&[0; 32]);
        huge.extend_from_slice(&[5, 1, 1, b'a', 0x80, 0x80, 0x04]);
        assert!(PublishBatchView::decode(&huge).is_err());
        // Out-of-range topic index, seq going backwards.
        let mut b = one(1, 0);
        b[39] = 3;
        assert!(PublishBatchView::decode(&b).is_err());
        let dup = PublishBatch {
            publisher: NodeId::from_bytes([1; 32]),
            epoch: 1,
            messages: vec![
                BatchMessage {
                    seq: 5,
                    topic: "a".into(),
                    payload: vec![],
                    headers: vec![],
                    message_id: None,
                };
                2
            ],
            seals: Vec::new(),
        };
        assert!(dup.validate().is_err(), "equal seqs");
    }
}
