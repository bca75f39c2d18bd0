//! Artifacts are named by the BLAKE3 of their bytes; a [`Manifest`] also
//! lists the BLAKE3 of every chunk, so a receiver checks each chunk as it
//! arrives and asks another holder for one that does not match.

use serde::{Deserialize, Serialize};

/// Bytes per chunk: one RPC answer each.
pub const CHUNK_SIZE: u32 = 256 * 1024;

/// Why a manifest or a chunk was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The manifest does not describe a file that may be stored.
    #[error("artifact manifest refused: {0}")]
    Invalid(String),
    /// A chunk's bytes do not hash to what the manifest says.
    #[error("artifact {hash}: chunk {index} does not match its BLAKE3 hash")]
    ChunkHash { hash: String, index: u32 },
}

/// What a receiver needs to fetch and check an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// BLAKE3 of the whole file, lowercase hex: the artifact's name.
    pub hash: String,
    /// Length of the file in bytes.
    pub size: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_size: u32,
    /// BLAKE3 of each chunk, lowercase hex, in order.
    pub chunks: Vec<String>,
}

impl Manifest {
    /// The manifest of `bytes` with [`CHUNK_SIZE`] chunks.
    pub fn of(bytes: &[u8]) -> Manifest {
        Manifest::with_chunk_size(bytes, CHUNK_SIZE)
    }

    pub fn with_chunk_size(bytes: &[u8], chunk_size: u32) -> Manifest {
        Manifest {
            hash: blake3::hash(bytes).to_hex().to_string(),
            size: bytes.len() as u64,
            chunk_size,
            chunks: bytes
                .chunks(chunk_size as usize)
                .map(|c| blake3::hash(c).to_hex().to_string())
                .collect(),
        }
    }

    /// Checks that the manifest is well formed and within `max_bytes`.
    pub fn check(&self, max_bytes: usize) -> Result<(), ManifestError> {
        let bad = |why: String| Err(ManifestError::Invalid(why));
        if !is_hash(&self.hash) {
            return bad(format!("{:?} is not a BLAKE3 hash", self.hash));
        }
        if self.size > max_bytes as u64 {
            return bad(format!(
                "{} bytes, more than wasm.max_component_bytes ({max_bytes})",
                self.size
            ));
        }
        if self.chunk_size == 0 || self.chunk_size > 4 * CHUNK_SIZE {
            return bad(format!("chunk size {}", self.chunk_size));
        }
        let want = self.size.div_ceil(u64::from(self.chunk_size));
        if self.chunks.len() as u64 != want {
            return bad(format!(
                "{} chunk hashes for {} bytes in chunks of {}",
                self.chunks.len(),
                self.size,
                self.chunk_size
            ));
        }
        if let Some(c) = self.chunks.iter().find(|c| !is_hash(c)) {
            return bad(format!("{c:?} is not a BLAKE3 hash"));
        }
        Ok(())
    }

    /// Byte range of chunk `index`.
    pub fn range(&self, index: u32) -> Option<std::ops::Range<usize>> {
        let start = u64::from(index) * u64::from(self.chunk_size);
        if index as usize >= self.chunks.len() {
            return None;
        }
        let end = (start + u64::from(self.chunk_size)).min(self.size);
        Some(start as usize..end as usize)
    }

    /// Checks chunk `index`'s bytes.
    pub fn check_chunk(&self, index: u32, bytes: &[u8]) -> Result<(), ManifestError> {
        let ok = self.range(index).is_some_and(|r| r.len() == bytes.len())
            && self
                .chunks
                .get(index as usize)
                .is_some_and(|h| *h == blake3::hash(bytes).to_hex().as_str());
        if ok {
            Ok(())
        } else {
            Err(ManifestError::ChunkHash {
                hash: self.hash.clone(),
                index,
            })
        }
    }
}

/// `component` with a custom section `macula-tag` holding `tag` appended:
/// it behaves exactly as before (runtimes skip custom sections) but is
/// another artifact (another BLAKE3). Stamps a build with its version;
/// the tests make distinct versions of one component with it.
pub fn tagged(component: &[u8], tag: &str) -> Vec<u8> {
    let name = b"macula-tag";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = component.to_vec();
    out.push(0); // custom section id
    let mut len = payload.len();
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    out.extend_from_slice(&payload);
    out
}

/// 64 lowercase hex digits.
pub fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn manifests_split_and_check_chunks() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let m = Manifest::with_chunk_size(&bytes, 300);
        assert_eq!(m.chunks.len(), 4);
        m.check(1 << 20).unwrap();
        assert_eq!(m.range(3), Some(900..1000));
        assert_eq!(m.range(4), None);
        m.check_chunk(1, &bytes[300..600]).unwrap();
        assert!(m.check_chunk(1, &bytes[0..300]).is_err());
        assert!(m.check_chunk(3, &bytes[900..999]).is_err(), "short chunk");
        assert!(m.check(999).is_err(), "over the size limit");
        let mut bad = m.clone();
        bad.chunks.pop();
        assert!(bad.check(1 << 20).is_err(), "chunk count");
        let mut bad = m.clone();
        bad.hash = "nothex".into();
        assert!(bad.check(1 << 20).is_err());
        let mut bad = m;
        bad.chunk_size = 0;
        assert!(bad.check(1 << 20).is_err());
        let empty = Manifest::of(&[]);
        empty.check(10).unwrap();
        assert!(empty.chunks.is_empty());
    }

    #[test]
    fn a_tagged_component_is_another_artifact_with_the_same_prefix() {
        let c = b"\0asm component bytes".to_vec();
        let t = tagged(&c, "2");
        assert!(t.starts_with(&c));
        assert_ne!(Manifest::of(&t).hash, Manifest::of(&c).hash);
        assert_ne!(tagged(&c, "3"), t);
        // A long tag takes a multi-byte length (311 = 0x37 | 2 << 7).
        let long = tagged(&c, &"x".repeat(300));
        assert_eq!(long[c.len() + 1..c.len() + 3], [0xb7, 0x02]);
    }

    proptest! {
        #[test]
        fn every_chunk_of_any_file_checks_and_nothing_else_does(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            size in 1u32..600,
            flip in any::<usize>(),
        ) {
            let m = Manifest::with_chunk_size(&bytes, size);
            prop_assert!(m.check(bytes.len()).is_ok());
            let mut joined = Vec::new();
            for i in 0..m.chunks.len() as u32 {
                let r = m.range(i).unwrap();
                prop_assert!(m.check_chunk(i, &bytes[r.clone()]).is_ok());
                let mut bad = bytes[r.clone()].to_vec();
                let at = flip % bad.len();
                bad[at] ^= 1;
                prop_assert!(m.check_chunk(i, &bad).is_err());
                joined.extend_from_slice(&bytes[r]);
            }
            prop_assert_eq!(joined, bytes);
            prop_assert!(m.range(m.chunks.len() as u32).is_none());
        }
    }
}
