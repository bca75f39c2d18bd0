//! The audit trail's chain: entries that each carry the BLAKE3 hash of the
//! one before, so that an edited, deleted, inserted or reordered entry is
//! found, at the entry where the chain breaks.
//!
//! An entry is one line of JSON:
//!
//! ```text
//! {"seq":7,"time_ms":1733450000000,"kind":"denial","detail":"...","prev":"<hex>","hash":"<hex>"}
//! ```
//!
//! `hash` is BLAKE3 over `seq`, `time_ms`, `kind`, `detail` and `prev` (in
//! that order, each length-prefixed), so it does not depend on how the JSON
//! is spaced; `prev` is the previous entry's `hash` (all zeros before the
//! first entry ever). A **checkpoint** entry (`kind` `checkpoint`) carries in
//! `detail` an Ed25519 signature by the node's key over the previous
//! entry's `seq` and `hash`: whoever edits the file without that key can
//! rewrite the chain after the last checkpoint, but not before it.
//!
//! Files rotate (the runtime's business); a file's first entry continues
//! the chain of the one before, so [`verify`] checks any run of files from
//! a known starting point, or from the first entry it is given.

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The kind of a checkpoint entry.
pub const CHECKPOINT: &str = "checkpoint";
/// Longest `kind` and `detail`, in bytes.
pub const MAX_KIND: usize = 64;
pub const MAX_DETAIL: usize = 4096;

/// One entry, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: String,
    pub detail: String,
    pub prev: String,
    pub hash: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn entry_hash(seq: u64, time_ms: u64, kind: &str, detail: &str, prev: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&time_ms.to_le_bytes());
    for field in [kind, detail, prev] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    *h.finalize().as_bytes()
}

fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    let mut m = b"macula audit checkpoint v1\0".to_vec();
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(hash.as_bytes());
    m
}

/// Where a chain stands: the next entry's `seq` and `prev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub next_seq: u64,
    pub last_hash: String,
}

impl Default for Chain {
    /// Before the first entry ever.
    fn default() -> Chain {
        Chain {
            next_seq: 0,
            last_hash: hex(&[0; 32]),
        }
    }
}

impl Chain {
    /// The next entry, as a line (no newline); `kind` and `detail` are cut
    /// to their limits.
    pub fn append(&mut self, time_ms: u64, kind: &str, detail: &str) -> String {
        let kind = truncate(kind, MAX_KIND);
        let detail = truncate(detail, MAX_DETAIL);
        let hash = hex(&entry_hash(
            self.next_seq,
            time_ms,
            kind,
            detail,
            &self.last_hash,
        ));
        let e = Entry {
            seq: self.next_seq,
            time_ms,
            kind: kind.to_string(),
            detail: detail.to_string(),
            prev: std::mem::replace(&mut self.last_hash, hash.clone()),
            hash,
        };
        self.next_seq += 1;
        // A struct of strings and integers always serializes.
        serde_json::to_string(&e).unwrap_or_default()
    }

    /// A checkpoint: `key` signs where the chain stands.
    pub fn checkpoint(&mut self, time_ms: u64, key: &SigningKey) -> String {
        let seq = self.next_seq.checked_sub(1).unwrap_or(u64::MAX);
        let sig = key.sign(&checkpoint_message(seq, &self.last_hash));
        self.append(time_ms, CHECKPOINT, &hex(&sig.to_bytes()))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where and why a chain broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit entry at line {line} (seq {seq:?}): {reason}")]
pub struct Broken {
    /// 1-based line number in what was given.
    pub line: usize,
    pub seq: Option<u64>,
    pub reason: BreakReason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakReason {
    #[error("not an audit entry: {0}")]
    Malformed(String),
    #[error("its hash does not match its content (edited)")]
    Edited,
    #[error("expected seq {expected} (an entry deleted, inserted or moved)")]
    Sequence { expected: u64 },
    #[error("it does not follow the entry before it (deleted, inserted or moved)")]
    Unlinked,
    #[error("its checkpoint signature does not verify")]
    BadCheckpoint,
}

/// Verifies `lines` (blank ones skipped) from `start` (`None`: trust the
/// first entry's `seq` and `prev`); checkpoint signatures against `key`
/// when given. The chain where it ends, and how many checkpoints were
/// verified.
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    start: Option<Chain>,
    key: Option<&VerifyingKey>,
) -> Result<(Chain, usize), Broken> {
    let mut chain = start;
    let mut checkpoints = 0;
    for (i, line) in lines.into_iter().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let broken = |seq, reason| Broken {
            line: line_no,
            seq,
            reason,
        };
        let e: Entry = serde_json::from_str(line)
            .map_err(|err| broken(None, BreakReason::Malformed(err.to_string())))?;
        let seq = Some(e.seq);
        if hex(&entry_hash(e.seq, e.time_ms, &e.kind, &e.detail, &e.prev)) != e.hash {
            return Err(broken(seq, BreakReason::Edited));
        }
        let here = chain.get_or_insert_with(|| Chain {
            next_seq: e.seq,
            last_hash: e.prev.clone(),
        });
        if e.seq != here.next_seq {
            return Err(broken(
                seq,
                BreakReason::Sequence {
                    expected: here.next_seq,
                },
            ));
        }
        if e.prev != here.last_hash {
            return Err(broken(seq, BreakReason::Unlinked));
        }
        if e.kind == CHECKPOINT {
            if let Some(key) = key {
                let ok = decode_sig(&e.detail).is_some_and(|sig| {
                    let prev_seq = e.seq.checked_sub(1).unwrap_or(u64::MAX);
                    key.verify(&checkpoint_message(prev_seq, &e.prev), &sig)
                        .is_ok()
                });
                if !ok {
                    return Err(broken(seq, BreakReason::BadCheckpoint));
                }
                checkpoints += 1;
            }
        }
        here.next_seq = e.seq + 1;
        here.last_hash = e.hash;
    }
    Ok((chain.unwrap_or_default(), checkpoints))
}

fn decode_sig(hex: &str) -> Option<Signature> {
    if hex.len() != 128 || !hex.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 64];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(Signature::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::tests::key;

    fn log(n: u64) -> (Vec<String>, SigningKey) {
        let k = key(5);
        let mut c = Chain::default();
        let mut lines: Vec<String> = (0..n)
            .map(|i| c.append(1_000 + i, "admission", &format!("node {i} admitted")))
            .collect();
        lines.push(c.checkpoint(2_000, &k));
        lines.push(c.append(2_001, "denial", "publish payments.x"));
        (lines, k)
    }

    fn check(lines: &[String]) -> Result<(Chain, usize), Broken> {
        verify(
            lines.iter().map(String::as_str),
            Some(Chain::default()),
            Some(&key(5).verifying_key()),
        )
    }

    #[test]
    fn an_intact_chain_verifies_and_continues() {
        let (lines, _) = log(5);
        let (end, checkpoints) = check(&lines).expect("intact");
        assert_eq!((end.next_seq, checkpoints), (7, 1));
        // A later file, verified from where the first ended.
        let mut c = end.clone();
        let more = [
            c.append(3_000, "grant", "x"),
            c.append(3_001, "revocation", "y"),
        ];
        let (end2, _) = verify(more.iter().map(String::as_str), Some(end), None).expect("more");
        assert_eq!(end2, c);
        // Without a start, the first entry is trusted.
        assert!(verify(lines[3..].iter().map(String::as_str), None, None).is_ok());
    }

    #[test]
    fn tampering_is_found_at_the_exact_entry() {
        let (lines, _) = log(5);
        let at = |r: Result<(Chain, usize), Broken>| {
            let b = r.expect_err("tampered");
            (b.line, b.reason)
        };
        // Edited.
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("node 2", "node 9");
        assert_eq!(at(check(&edited)), (3, BreakReason::Edited));
        // Edited with its hash recomputed: the next entry no longer follows.
        let mut rehashed = lines.clone();
        let mut e: Entry = serde_json::from_str(&rehashed[2]).expect("entry");
        e.detail = "node 9 admitted".into();
        e.hash = hex(&entry_hash(e.seq, e.time_ms, &e.kind, &e.detail, &e.prev));
        rehashed[2] = serde_json::to_string(&e).expect("json");
        assert_eq!(at(check(&rehashed)), (4, BreakReason::Unlinked));
        // Deleted.
        let mut deleted = lines.clone();
        deleted.remove(1);
        assert_eq!(
            at(check(&deleted)),
            (2, BreakReason::Sequence { expected: 1 })
        );
        // Inserted (a copy of another entry).
        let mut inserted = lines.clone();
        inserted.insert(3, lines[1].clone());
        assert_eq!(
            at(check(&inserted)),
            (4, BreakReason::Sequence { expected: 3 })
        );
        // Reordered.
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert_eq!(
            at(check(&swapped)),
            (2, BreakReason::Sequence { expected: 1 })
        );
        // A checkpoint signed by another key.
        let mut c = Chain::default();
        let forged: Vec<String> = vec![c.append(1, "a", "b"), c.checkpoint(2, &key(6))];
        assert_eq!(at(check(&forged)), (2, BreakReason::BadCheckpoint));
        // Not JSON.
        let mut junk = lines.clone();
        junk[0] = "{".into();
        assert!(matches!(at(check(&junk)).1, BreakReason::Malformed(_)));
    }

    #[test]
    fn a_checkpoint_signs_where_the_chain_stands() {
        let k = key(5);
        // A genuine checkpoint after one entry...
        let mut a = Chain::default();
        let _ = a.append(1, "admission", "node 1");
        let genuine: Entry = serde_json::from_str(&a.checkpoint(2, &k)).expect("entry");
        // ...copied onto a rewritten chain (rehashed, so only the signature
        // can tell): it does not verify there.
        let mut b = Chain::default();
        let first = b.append(1, "admission", "node 666");
        let prev = b.last_hash.clone();
        let hash = hex(&entry_hash(1, 2, CHECKPOINT, &genuine.detail, &prev));
        let copied = Entry {
            seq: 1,
            time_ms: 2,
            kind: CHECKPOINT.into(),
            detail: genuine.detail.clone(),
            prev,
            hash,
        };
        let lines = [first, serde_json::to_string(&copied).expect("json")];
        let broken = verify(
            lines.iter().map(String::as_str),
            Some(Chain::default()),
            Some(&k.verifying_key()),
        )
        .expect_err("copied checkpoint");
        assert_eq!(
            (broken.line, broken.reason),
            (2, BreakReason::BadCheckpoint)
        );
    }

    #[test]
    fn long_fields_are_cut_at_a_character_boundary() {
        let mut c = Chain::default();
        let line = c.append(1, &"k".repeat(100), &"é".repeat(3000));
        let e: Entry = serde_json::from_str(&line).expect("entry");
        assert_eq!((e.kind.len(), e.detail.len()), (MAX_KIND, MAX_DETAIL));
        assert!(verify([line.as_str()], Some(Chain::default()), None).is_ok());
    }
}
