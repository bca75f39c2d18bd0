//! Artifacts: component files stored content-addressed on each node and
//! fetched from peers that have them, chunk by chunk, each chunk checked
//! on arrival (issue 25, item 2; docs/WASM.md "Artifacts").
//!
//! An artifact is named by the BLAKE3 of its bytes. Its [`Manifest`] lists
//! the BLAKE3 of every [`CHUNK_SIZE`] chunk, so a receiver refuses a bad
//! chunk at once (and asks another holder) instead of after the whole
//! file. The store keeps `<dir>/<hash>.wasm`, written to a temporary file
//! and renamed; a file whose bytes do not match its name is refused when
//! read, never served or run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use macula_rollout::manifest::{is_hash, tagged, Manifest, ManifestError, CHUNK_SIZE};

use crate::metrics::WasmMetrics;

/// Why an artifact or a chunk was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactError {
    /// The manifest does not describe a file this node may store.
    #[error("artifact manifest refused: {0}")]
    Manifest(String),
    /// A chunk's bytes do not hash to what the manifest says.
    #[error("artifact {hash}: chunk {index} does not match its BLAKE3 hash")]
    ChunkHash { hash: String, index: u32 },
    /// The whole file does not hash to the artifact's name.
    #[error("artifact {expected}: the bytes hash to {actual}")]
    ArtifactHash { expected: String, actual: String },
    /// Not stored here.
    #[error("artifact {0} is not stored on this node")]
    Missing(String),
    /// No holder gave a good copy.
    #[error("artifact {hash} could not be fetched: {reason}")]
    Fetch { hash: String, reason: String },
    /// The disk.
    #[error("artifact store {path}: {reason}")]
    Io { path: String, reason: String },
}

impl From<ManifestError> for ArtifactError {
    fn from(e: ManifestError) -> ArtifactError {
        match e {
            ManifestError::Invalid(why) => ArtifactError::Manifest(why),
            ManifestError::ChunkHash { hash, index } => ArtifactError::ChunkHash { hash, index },
        }
    }
}

impl ArtifactError {
    /// The `reason` label of `macula_wasm_artifact_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ArtifactError::Manifest(_) => "manifest",
            ArtifactError::ChunkHash { .. } => "chunk_hash",
            ArtifactError::ArtifactHash { .. } => "artifact_hash",
            ArtifactError::Missing(_) => "missing",
            ArtifactError::Fetch { .. } => "fetch",
            ArtifactError::Io { .. } => "io",
        }
    }
}

/// The artifacts of one node, in one directory.
#[derive(Clone)]
pub struct ArtifactStore {
    dir: Arc<PathBuf>,
    max_bytes: usize,
    metrics: Arc<WasmMetrics>,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactStore")
            .field("dir", &self.dir)
            .finish()
    }
}

impl ArtifactStore {
    /// Opens (creating) the store in `dir`; files larger than `max_bytes`
    /// are refused.
    pub fn open(
        dir: &Path,
        max_bytes: usize,
        metrics: Arc<WasmMetrics>,
    ) -> Result<ArtifactStore, ArtifactError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let store = ArtifactStore {
            dir: Arc::new(dir.to_path_buf()),
            max_bytes,
            metrics,
        };
        store
            .metrics
            .artifacts_stored
            .set(store.list().len() as i64);
        Ok(store)
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}.wasm"))
    }

    /// Stores `bytes` (if not already there); its manifest.
    pub fn put(&self, bytes: &[u8]) -> Result<Manifest, ArtifactError> {
        if bytes.len() > self.max_bytes {
            return Err(ArtifactError::Manifest(format!(
                "{} bytes, more than wasm.max_component_bytes ({})",
                bytes.len(),
                self.max_bytes
            )));
        }
        let manifest = Manifest::of(bytes);
        let path = self.path(&manifest.hash);
        if self.read_checked(&manifest.hash).is_ok() {
            return Ok(manifest);
        }
        let tmp = self.dir.join(format!("{}.tmp", manifest.hash));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        };
        write().map_err(|e| io(&path, e))?;
        self.metrics.artifacts_stored.set(self.list().len() as i64);
        tracing::info!(target: "macula::wasm", hash = %manifest.hash, size = manifest.size, "artifact stored");
        Ok(manifest)
    }

    /// The artifact's bytes, checked against its name: a file that does
    /// not match is refused (and counted), not returned.
    pub fn read_checked(&self, hash: &str) -> Result<Vec<u8>, ArtifactError> {
        if !is_hash(hash) {
            return Err(ArtifactError::Missing(hash.to_string()));
        }
        let path = self.path(hash);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArtifactError::Missing(hash.to_string()))
            }
            Err(e) => return Err(io(&path, e)),
        };
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if actual != hash {
            let e = ArtifactError::ArtifactHash {
                expected: hash.to_string(),
                actual,
            };
            self.refused(&e);
            tracing::error!(target: "macula::wasm", path = %path.display(), error = %e, "stored artifact is corrupt: refused");
            return Err(e);
        }
        Ok(bytes)
    }

    /// Chunk `index` of a stored artifact, checked against `manifest`
    /// before it is served (a corrupt file is never handed out).
    pub fn chunk(&self, manifest: &Manifest, index: u32) -> Result<Vec<u8>, ArtifactError> {
        let bytes = self.read_checked(&manifest.hash)?;
        let range = manifest
            .range(index)
            .filter(|r| r.end <= bytes.len())
            .ok_or_else(|| ArtifactError::Manifest(format!("no chunk {index}")))?;
        let chunk = bytes[range].to_vec();
        manifest.check_chunk(index, &chunk)?;
        self.metrics.artifact_chunks_served.inc();
        Ok(chunk)
    }

    /// Deletes the oldest artifacts (by file time) but those in `keep`
    /// until at most `max` remain; how many were deleted (counted in
    /// `macula_wasm_artifacts_pruned_total`). A holder that pruned an
    /// artifact answers "missing" and a fetcher asks the next holder.
    pub fn prune(&self, keep: &[String], max: usize) -> usize {
        let mut files: Vec<(std::time::SystemTime, String)> = self
            .list()
            .into_iter()
            .filter(|h| !keep.contains(h))
            .map(|h| {
                let t = std::fs::metadata(self.path(&h))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (t, h)
            })
            .collect();
        let total = files.len() + keep.iter().filter(|h| self.path(h).exists()).count();
        if total <= max {
            return 0;
        }
        files.sort();
        let mut removed = 0;
        for (_, h) in files.into_iter().take(total - max) {
            match std::fs::remove_file(self.path(&h)) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(target: "macula::wasm", hash = %h, "artifact pruned (wasm.max_artifacts)");
                }
                Err(e) => {
                    tracing::warn!(target: "macula::wasm", hash = %h, error = %e, "could not prune an artifact")
                }
            }
        }
        self.metrics.artifacts_pruned.inc_by(removed as u64);
        self.metrics.artifacts_stored.set(self.list().len() as i64);
        removed
    }

    /// The hashes stored here.
    pub fn list(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&*self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_suffix(".wasm")
                    .filter(|h| is_hash(h))
                    .map(str::to_string)
            })
            .collect();
        v.sort();
        v
    }

    /// Assembles and stores the artifact of `manifest` from chunks that
    /// `get(index)` returns, each checked on arrival; a chunk refused is
    /// counted and asked for again (the getter picks another holder), up
    /// to `attempts` times per chunk.
    pub async fn fetch<F, Fut>(
        &self,
        manifest: &Manifest,
        attempts: u32,
        mut get: F,
    ) -> Result<Vec<u8>, ArtifactError>
    where
        F: FnMut(u32, u32) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, String>>,
    {
        manifest.check(self.max_bytes)?;
        if let Ok(bytes) = self.read_checked(&manifest.hash) {
            return Ok(bytes);
        }
        let r = async {
            let mut out = Vec::with_capacity(manifest.size as usize);
            for index in 0..manifest.chunks.len() as u32 {
                let mut last = String::from("no holder answered");
                let mut got = None;
                for attempt in 0..attempts.max(1) {
                    match get(index, attempt).await {
                        Ok(bytes) => match manifest.check_chunk(index, &bytes) {
                            Ok(()) => {
                                got = Some(bytes);
                                break;
                            }
                            Err(e) => {
                                let e = ArtifactError::from(e);
                                self.refused(&e);
                                tracing::warn!(target: "macula::wasm", error = %e, attempt, "chunk refused; asking another holder");
                                last = e.to_string();
                            }
                        },
                        Err(e) => last = e,
                    }
                }
                match got {
                    Some(bytes) => out.extend_from_slice(&bytes),
                    None => {
                        return Err(ArtifactError::Fetch {
                            hash: manifest.hash.clone(),
                            reason: format!("chunk {index}: {last}"),
                        })
                    }
                }
            }
            let actual = blake3::hash(&out).to_hex().to_string();
            if actual != manifest.hash {
                let e = ArtifactError::ArtifactHash {
                    expected: manifest.hash.clone(),
                    actual,
                };
                self.refused(&e);
                return Err(e);
            }
            self.put(&out)?;
            Ok(out)
        }
        .await;
        let outcome = if r.is_ok() { "ok" } else { "failed" };
        self.metrics
            .artifact_fetches
            .get_or_create(&crate::metrics::outcome(outcome))
            .inc();
        r
    }

    fn refused(&self, e: &ArtifactError) {
        self.metrics
            .artifact_refused
            .get_or_create(&vec![("reason", e.reason().to_string())])
            .inc();
    }
}

fn io(path: &Path, e: std::io::Error) -> ArtifactError {
    ArtifactError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> ArtifactStore {
        ArtifactStore::open(dir, 1 << 20, Arc::default()).unwrap()
    }

    #[test]
    fn a_stored_file_that_was_tampered_with_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let m = s.put(b"component bytes").unwrap();
        assert_eq!(s.list(), vec![m.hash.clone()]);
        assert_eq!(s.read_checked(&m.hash).unwrap(), b"component bytes");
        assert_eq!(s.chunk(&m, 0).unwrap(), b"component bytes");
        std::fs::write(
            dir.path().join(format!("{}.wasm", m.hash)),
            b"evil bytes!!!!!",
        )
        .unwrap();
        assert!(matches!(
            s.read_checked(&m.hash),
            Err(ArtifactError::ArtifactHash { .. })
        ));
        assert!(s.chunk(&m, 0).is_err(), "a corrupt file is not served");
        assert_eq!(
            s.read_checked(&"0".repeat(64)),
            Err(ArtifactError::Missing("0".repeat(64)))
        );
    }

    #[test]
    fn prune_keeps_what_runs_and_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let hashes: Vec<String> = (0..5u8)
            .map(|i| {
                let m = s.put(&[i; 10]).unwrap();
                // Distinct file times, oldest first.
                let t =
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + u64::from(i));
                let f = std::fs::File::options()
                    .write(true)
                    .open(dir.path().join(format!("{}.wasm", m.hash)))
                    .unwrap();
                f.set_modified(t).unwrap();
                m.hash
            })
            .collect();
        assert_eq!(s.prune(&[hashes[0].clone()], 10), 0, "under the limit");
        // Keep the oldest (it runs) and two more: the newest two of the rest.
        assert_eq!(s.prune(&[hashes[0].clone()], 3), 2);
        let mut left = s.list();
        left.sort();
        let mut want = vec![hashes[0].clone(), hashes[3].clone(), hashes[4].clone()];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(s.metrics.artifacts_pruned.get(), 2);
    }

    #[tokio::test]
    async fn fetch_refuses_bad_chunks_and_asks_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let bytes: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
        let m = Manifest::with_chunk_size(&bytes, 256);
        // The first holder asked for each chunk lies; the second is good.
        let got = s
            .fetch(&m, 2, |index, attempt| {
                let r = m.range(index).unwrap();
                let mut chunk = bytes[r].to_vec();
                if attempt == 0 {
                    chunk[0] ^= 1;
                }
                async move { Ok(chunk) }
            })
            .await
            .unwrap();
        assert_eq!(got, bytes);
        assert_eq!(s.read_checked(&m.hash).unwrap(), bytes);
        let refused = s
            .metrics
            .artifact_refused
            .get_or_create(&vec![("reason", "chunk_hash".to_string())])
            .get();
        assert_eq!(refused, 3);

        // Only liars: refused, nothing stored.
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let e = s
            .fetch(&m, 3, |index, _| {
                let r = m.range(index).unwrap();
                let mut chunk = bytes[r].to_vec();
                chunk[1] ^= 0xff;
                async move { Ok(chunk) }
            })
            .await
            .unwrap_err();
        assert!(matches!(e, ArtifactError::Fetch { .. }), "{e}");
        assert!(s.list().is_empty());
        // A manifest over the limit is refused before any chunk is asked.
        let small = ArtifactStore::open(dir.path(), 10, Arc::default()).unwrap();
        let e = small
            .fetch(&m, 1, |_, _| async { Err("never asked".to_string()) })
            .await
            .unwrap_err();
        assert!(matches!(e, ArtifactError::Manifest(_)), "{e}");
    }
}
