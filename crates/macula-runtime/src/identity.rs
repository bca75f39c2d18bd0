//! The node's Ed25519 identity and the key file that persists it.
//!
//! A node's identity is one Ed25519 key pair. Its [`NodeId`] is derived from the
//! public key (see [`macula_wire::NodeId::from_public_key`]), so the same key file
//! always gives the same node ID, and anyone who sees the public key can check
//! the ID without trusting anybody.
//!
//! The key lives in `<data_dir>/node.key` as a PKCS#8 PEM document
//! (`-----BEGIN PRIVATE KEY-----`), readable by `openssl pkey` and friends.
//!
//! File rules:
//! - created with mode `0600` (and the data directory, if missing, with `0700`),
//!   written to a temporary name with `O_EXCL`, fsynced, then linked into place
//!   without ever replacing an existing file;
//! - an existing key file is never modified, whatever its state;
//! - a key file that is empty, truncated, corrupt, holds a non-Ed25519 key, or
//!   is accessible by group or others (`mode & 0o077 != 0`) is an error that
//!   names the file.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, PrivateKeyInfo};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use macula_wire::NodeId;
use rustls_pki_types::pem::{self, SectionKind};
use zeroize::Zeroizing;

/// Name of the key file inside the data directory.
pub const KEY_FILE_NAME: &str = "node.key";

/// Largest key file we are willing to read. A real one is about 120 bytes.
const MAX_KEY_FILE_LEN: u64 = 16 * 1024;

/// DER prefix of an RFC 8410 PKCS#8 v1 `OneAsymmetricKey` holding an Ed25519
/// seed: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING {
/// OCTET STRING (32 bytes) } }. The 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

const PEM_LABEL: &str = "PRIVATE KEY";

/// A node's Ed25519 identity. The secret key is zeroized when this is dropped,
/// and it is never printed by `Debug`.
#[derive(Clone)]
pub struct Identity {
    signing_key: SigningKey,
    node_id: NodeId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &format_args!("{}", self.node_id))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Generates a fresh identity from the operating system's random source.
    ///
    /// # Panics
    /// If the OS random source fails (see [`Identity::try_generate`] for the
    /// fallible form, which [`Identity::load_or_create`] uses).
    pub fn generate() -> Identity {
        match Self::try_generate() {
            Ok(id) => id,
            Err(e) => panic!("operating system random source failed: {e}"),
        }
    }

    /// Generates a fresh identity, reporting a failing OS random source.
    pub fn try_generate() -> Result<Identity, getrandom::Error> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(seed.as_mut())?;
        Ok(Self::from_signing_key(SigningKey::from_bytes(&seed)))
    }

    /// Builds an identity from a 32-byte Ed25519 secret seed (for tests and
    /// tools; nodes use [`Identity::load_or_create`]).
    pub fn from_secret_bytes(seed: &[u8; 32]) -> Identity {
        Self::from_signing_key(SigningKey::from_bytes(seed))
    }

    fn from_signing_key(signing_key: SigningKey) -> Identity {
        let node_id = NodeId::from_public_key(signing_key.verifying_key().as_bytes());
        Identity {
            signing_key,
            node_id,
        }
    }

    /// Loads `data_dir/node.key`, or creates it (and `data_dir`, mode `0700`)
    /// if it does not exist. An existing key file is never overwritten: if it is
    /// unusable, this returns an error naming it and leaves it untouched.
    pub fn load_or_create(data_dir: &Path) -> Result<Identity, IdentityError> {
        Self::load_or_create_file(&data_dir.join(KEY_FILE_NAME))
    }

    /// [`Identity::load_or_create`] for a key file of any name (a realm
    /// authority's key, say): its directory is created mode `0700` if
    /// needed, the file mode `0600`, and an existing file is never
    /// overwritten.
    pub fn load_or_create_file(path: &Path) -> Result<Identity, IdentityError> {
        let path = path.to_path_buf();
        let data_dir = path.parent().unwrap_or(Path::new("."));
        // `symlink_metadata` so that a dangling symlink counts as "exists" and
        // is reported rather than replaced.
        match fs::symlink_metadata(&path) {
            Ok(_) => return Self::load(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(IdentityError::io(&path, "inspect", e)),
        }
        create_dir_private(data_dir).map_err(|e| IdentityError::io(data_dir, "create", e))?;
        let identity = Self::try_generate().map_err(|e| IdentityError::Random {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        match write_new_key_file(&path, &identity) {
            Ok(()) => {
                tracing::info!(path = %path.display(), node_id = %identity.node_id, "created a new key");
                Ok(identity)
            }
            // Another process created the file between our check and our link:
            // theirs wins, and it must be valid.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::load(&path),
            Err(e) => Err(IdentityError::io(&path, "create", e)),
        }
    }

    /// Loads an identity from a PKCS#8 PEM key file. Never modifies the file.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let mut file = File::open(path).map_err(|e| IdentityError::io(path, "open", e))?;
        // Check the file we actually opened (fstat), not the path again.
        let meta = file
            .metadata()
            .map_err(|e| IdentityError::io(path, "inspect", e))?;
        if !meta.is_file() {
            return Err(IdentityError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        check_permissions(path, &meta)?;
        if meta.len() > MAX_KEY_FILE_LEN {
            return Err(IdentityError::corrupt(
                path,
                format!("file is {} bytes; a key file is a few hundred", meta.len()),
            ));
        }
        let mut contents = Zeroizing::new(Vec::new());
        (&mut file)
            .take(MAX_KEY_FILE_LEN + 1)
            .read_to_end(&mut contents)
            .map_err(|e| IdentityError::io(path, "read", e))?;
        if u64::try_from(contents.len()).unwrap_or(u64::MAX) > MAX_KEY_FILE_LEN {
            return Err(IdentityError::corrupt(
                path,
                "file is too large".to_string(),
            ));
        }
        let identity = parse_key_pem(path, &contents)?;
        tracing::debug!(path = %path.display(), node_id = %identity.node_id, "loaded node identity");
        Ok(identity)
    }

    /// This node's ID (derived from the public key).
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing_key.verifying_key().to_bytes()
    }

    /// The signing key, for the pure code that signs with it (DHT records:
    /// `macula_dht::Ed25519Auth`).
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing_key
    }

    /// The keys of this node's QUIC stateless resets and of its connection
    /// IDs' validation, derived from the node key (BLAKE3 `derive_key`,
    /// contexts of their own: they reveal nothing of the node key). Being
    /// the same in every run of the same identity, a node restarted after a
    /// crash recognises its previous run's connection IDs and answers their
    /// packets with a reset the peers accept, so they learn of the restart
    /// at their next packet instead of at their failure detector's bound
    /// (PROTOCOL.md §6.2).
    pub(crate) fn restart_keys(&self) -> RestartKeys {
        let secret = self.signing_key.as_bytes();
        let reset = blake3::derive_key("macula 2026-12 QUIC stateless reset key", secret);
        let cid = blake3::derive_key("macula 2026-12 QUIC connection ID key", secret);
        let mut first = [0u8; 8];
        first.copy_from_slice(&cid[..8]);
        RestartKeys {
            reset: std::sync::Arc::new(ResetKey(Zeroizing::new(reset))),
            cid: u64::from_le_bytes(first),
        }
    }

    /// Signs `msg` with the node key (pure Ed25519, RFC 8032).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing_key.sign(msg).to_bytes()
    }

    /// The secret key as an RFC 8410 PKCS#8 v1 DER document, zeroized on drop.
    /// This is the form rcgen and rustls take.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        let mut der = Zeroizing::new(Vec::with_capacity(PKCS8_ED25519_PREFIX.len() + 32));
        der.extend_from_slice(&PKCS8_ED25519_PREFIX);
        der.extend_from_slice(self.signing_key.as_bytes());
        der
    }

    /// The secret key as a PKCS#8 PEM document (the key file's format).
    pub fn pkcs8_pem(&self) -> Zeroizing<String> {
        let der = self.pkcs8_der();
        let mut pem = Zeroizing::new(String::with_capacity(128));
        pem.push_str("-----BEGIN PRIVATE KEY-----\n");
        base64_encode_into(&der, &mut pem);
        pem.push_str("\n-----END PRIVATE KEY-----\n");
        pem
    }
}

/// See [`Identity::restart_keys`].
#[derive(Clone)]
pub(crate) struct RestartKeys {
    /// Keys the stateless-reset tokens.
    pub reset: std::sync::Arc<dyn quinn::crypto::HmacKey>,
    /// Keys quinn's `HashedConnectionIdGenerator`.
    pub cid: u64,
}

/// A stateless-reset key: BLAKE3 keyed hashing as the HMAC quinn asks for.
struct ResetKey(Zeroizing<[u8; 32]>);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(32);
        signature_out[..n].copy_from_slice(&mac.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mac = blake3::keyed_hash(&self.0, data);
        // `blake3::Hash` compares in constant time.
        match <[u8; 32]>::try_from(signature) {
            Ok(sig) if mac == blake3::Hash::from(sig) => Ok(()),
            _ => Err(quinn::crypto::CryptoError),
        }
    }
}

/// Verifies a pure Ed25519 signature (RFC 8032, strict: rejects small-order
/// keys and non-canonical signatures).
pub fn verify_signature(public_key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let sig = Signature::from_bytes(sig);
    key.verify_strict(msg, &sig).is_ok()
}

/// Why a key file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file or directory could not be opened, read, created or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The key file can be read or written by group or others.
    #[error(
        "key file {} is accessible by group or others (mode {mode:04o}); \
         it must be readable only by its owner: run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    /// The key file is empty, truncated or otherwise not a PKCS#8 PEM key.
    #[error("key file {} is corrupt or truncated: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// The key file holds a key of another algorithm.
    #[error("key file {} holds a {found} key; a macula node key must be Ed25519", path.display())]
    WrongAlgorithm { path: PathBuf, found: String },
    /// The key path exists but is not a regular file.
    #[error("key file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// The OS random source failed while generating a new key.
    #[error("cannot generate a key for {}: random source failed: {reason}", path.display())]
    Random { path: PathBuf, reason: String },
}

impl IdentityError {
    fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        IdentityError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    fn corrupt(path: &Path, reason: String) -> Self {
        IdentityError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }
    }

    /// The file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            IdentityError::Io { path, .. }
            | IdentityError::InsecurePermissions { path, .. }
            | IdentityError::Corrupt { path, .. }
            | IdentityError::WrongAlgorithm { path, .. }
            | IdentityError::NotAFile { path }
            | IdentityError::Random { path, .. } => path,
        }
    }
}

#[cfg(unix)]
fn check_permissions(path: &Path, meta: &fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _meta: &fs::Metadata) -> Result<(), IdentityError> {
    Ok(())
}

fn parse_key_pem(path: &Path, contents: &[u8]) -> Result<Identity, IdentityError> {
    if contents.iter().all(u8::is_ascii_whitespace) {
        return Err(IdentityError::corrupt(path, "file is empty".to_string()));
    }
    let mut reader = contents;
    let mut key = None;
    loop {
        let item = pem::from_buf(&mut reader)
            .map_err(|e| IdentityError::corrupt(path, format!("invalid PEM: {e}")))?;
        let Some((kind, der)) = item else { break };
        let der = Zeroizing::new(der);
        match kind {
            SectionKind::PrivateKey if key.is_none() => key = Some(der),
            SectionKind::PrivateKey => {
                return Err(IdentityError::corrupt(
                    path,
                    "more than one PRIVATE KEY section".to_string(),
                ))
            }
            SectionKind::RsaPrivateKey => {
                return Err(IdentityError::WrongAlgorithm {
                    path: path.to_path_buf(),
                    found: "RSA (PKCS#1)".to_string(),
                })
            }
            SectionKind::EcPrivateKey => {
                return Err(IdentityError::WrongAlgorithm {
                    path: path.to_path_buf(),
                    found: "EC (SEC1)".to_string(),
                })
            }
            _ => {
                return Err(IdentityError::corrupt(
                    path,
                    "contains a PEM section other than PRIVATE KEY".to_string(),
                ))
            }
        }
    }
    let Some(der) = key else {
        return Err(IdentityError::corrupt(
            path,
            format!("no complete `-----BEGIN {PEM_LABEL}-----` section found"),
        ));
    };
    let info = PrivateKeyInfo::try_from(der.as_slice())
        .map_err(|e| IdentityError::corrupt(path, format!("invalid PKCS#8 DER: {e}")))?;
    if info.algorithm.oid != ed25519_dalek::pkcs8::ALGORITHM_OID {
        return Err(IdentityError::WrongAlgorithm {
            path: path.to_path_buf(),
            found: algorithm_name(&info.algorithm.oid.to_string()),
        });
    }
    // Checks the seed length and, for PKCS#8 v2 files, that the embedded public
    // key matches the secret key.
    let signing_key = SigningKey::from_pkcs8_der(der.as_slice())
        .map_err(|e| IdentityError::corrupt(path, format!("invalid Ed25519 key: {e}")))?;
    Ok(Identity::from_signing_key(signing_key))
}

fn algorithm_name(oid: &str) -> String {
    match oid {
        "1.2.840.10045.2.1" => "EC (ECDSA)".to_string(),
        "1.2.840.113549.1.1.1" => "RSA".to_string(),
        "1.3.101.113" => "Ed448".to_string(),
        "1.3.101.110" => "X25519".to_string(),
        other => format!("non-Ed25519 (OID {other})"),
    }
}

/// Creates `dir` (and missing parents) with mode 0700. An existing directory
/// is left as it is.
pub(crate) fn create_dir_private(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Writes the key to a fresh temporary file in the same directory (O_EXCL,
/// 0600), fsyncs it, then hard-links it to `path`, which fails with
/// `AlreadyExists` instead of replacing an existing file.
fn write_new_key_file(path: &Path, identity: &Identity) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut suffix = [0u8; 8];
    getrandom::getrandom(&mut suffix).map_err(|e| io::Error::other(e.to_string()))?;
    let tmp_name = format!(
        ".{KEY_FILE_NAME}.tmp-{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&tmp)?;
        // The umask cannot widen 0600, but be explicit in case the file system
        // ignores the create mode.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        file.write_all(identity.pkcs8_pem().as_bytes())?;
        file.sync_all()?;
        drop(file);
        link_no_replace(&tmp, path)
    })();
    // The temporary name is ours alone; remove it whatever happened.
    let _ = fs::remove_file(&tmp);
    result?;
    // Make the new directory entry durable (best effort: not every platform
    // can fsync a directory).
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn link_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(e) => {
            // File systems without hard links: fall back to rename after a
            // final existence check (a narrower race, but never knowingly
            // replaces a file).
            tracing::debug!(error = %e, "hard link unsupported; falling back to rename");
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "key file appeared concurrently",
                ));
            }
            fs::rename(from, to)
        }
    }
}

fn base64_encode_into(data: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in data.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::os::unix::fs::PermissionsExt;

    /// The same identity gives the same restart keys in every run (what a
    /// restarted node needs to reset its old connections); another identity
    /// gives others; the reset MAC verifies only its own output.
    #[test]
    fn restart_keys_follow_the_identity() {
        let a = Identity::from_secret_bytes(&[7; 32]);
        let a_again = Identity::from_secret_bytes(&[7; 32]);
        let b = Identity::from_secret_bytes(&[8; 32]);
        let (ka, ka2, kb) = (a.restart_keys(), a_again.restart_keys(), b.restart_keys());
        assert_eq!(ka.cid, ka2.cid);
        assert_ne!(ka.cid, kb.cid);
        let cid = b"\x01\x02\x03\x04\x05\x06\x07\x08";
        let sign = |k: &RestartKeys| {
            let mut out = [0u8; 32];
            assert_eq!(k.reset.signature_len(), 32);
            k.reset.sign(cid, &mut out);
            out
        };
        assert_eq!(sign(&ka), sign(&ka2));
        assert_ne!(sign(&ka), sign(&kb));
        assert!(ka2.reset.verify(cid, &sign(&ka)).is_ok());
        assert!(kb.reset.verify(cid, &sign(&ka)).is_err());
        assert!(ka.reset.verify(cid, &sign(&ka)[..16]).is_err());
        // Neither key is the node key.
        assert_ne!(&sign(&ka)[..], a.signing_key().as_bytes());
    }

    fn write_key_file(dir: &Path, contents: &[u8]) -> PathBuf {
        let path = dir.join(KEY_FILE_NAME);
        fs::write(&path, contents).unwrap();
        #[cfg(unix)]
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn assert_untouched(path: &Path, before: &[u8]) {
        assert_eq!(fs::read(path).unwrap(), before, "key file was modified");
    }

    #[test]
    fn generate_gives_distinct_ids_and_signatures_verify() {
        let a = Identity::generate();
        let b = Identity::generate();
        assert_ne!(a.node_id(), b.node_id());
        assert_eq!(a.node_id(), NodeId::from_public_key(&a.public_key()));
        let sig = a.sign(b"hello");
        assert!(verify_signature(&a.public_key(), b"hello", &sig));
        assert!(!verify_signature(&a.public_key(), b"hellO", &sig));
        assert!(!verify_signature(&b.public_key(), b"hello", &sig));
        let mut bad = sig;
        bad[0] ^= 1;
        assert!(!verify_signature(&a.public_key(), b"hello", &bad));
    }

    #[test]
    fn debug_does_not_leak_secret() {
        let id = Identity::from_secret_bytes(&[7u8; 32]);
        let s = format!("{id:?}");
        assert!(s.contains(&id.node_id().to_string()));
        assert!(!s.contains("secret"));
        assert!(!s.contains("[7, 7"));
    }

    #[test]
    fn pkcs8_der_matches_dalek_and_rcgen() {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let id = Identity::generate();
        let der = id.pkcs8_der();
        let parsed = SigningKey::from_pkcs8_der(&der).unwrap();
        assert_eq!(parsed.verifying_key().to_bytes(), id.public_key());
        // dalek's own encoding (v2, with public key) decodes to the same key.
        let theirs = id.signing_key.to_pkcs8_der().unwrap();
        let parsed2 = SigningKey::from_pkcs8_der(theirs.as_bytes()).unwrap();
        assert_eq!(parsed2.to_bytes(), id.signing_key.to_bytes());
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_slice()),
            &rcgen::PKCS_ED25519,
        )
        .unwrap();
        assert_eq!(kp.public_key_raw(), id.public_key());
    }

    #[test]
    fn create_then_reload_gives_same_node_id() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a").join("data");
        let first = Identity::load_or_create(&dir).unwrap();
        let path = dir.join(KEY_FILE_NAME);
        let contents = fs::read(&path).unwrap();
        let text = String::from_utf8(contents.clone()).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(text.ends_with("-----END PRIVATE KEY-----\n"));
        #[cfg(unix)]
        {
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(
                fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        for _ in 0..3 {
            let again = Identity::load_or_create(&dir).unwrap();
            assert_eq!(again.node_id(), first.node_id());
            assert_eq!(again.public_key(), first.public_key());
        }
        assert_eq!(Identity::load(&path).unwrap().node_id(), first.node_id());
        assert_untouched(&path, &contents);
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE_NAME)]);
    }

    #[test]
    fn key_file_is_openssl_compatible_pkcs8() {
        let id = Identity::from_secret_bytes(&[1u8; 32]);
        let pem = id.pkcs8_pem();
        // Same PEM as the `pkcs8` crate would produce for a v1 key.
        let mut reader = pem.as_bytes();
        let (kind, der) = pem::from_buf(&mut reader).unwrap().unwrap();
        assert_eq!(kind, SectionKind::PrivateKey);
        assert_eq!(der.as_slice(), id.pkcs8_der().as_slice());
    }

    #[test]
    fn loads_dalek_v2_pem() {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let id = Identity::generate();
        let v2 = id.signing_key.to_pkcs8_der().unwrap();
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        base64_encode_into(v2.as_bytes(), &mut pem);
        pem.push_str("\n-----END PRIVATE KEY-----\n");
        let tmp = tempfile::tempdir().unwrap();
        let path = write_key_file(tmp.path(), pem.as_bytes());
        assert_eq!(Identity::load(&path).unwrap().node_id(), id.node_id());
    }

    fn expect_error(contents: &[u8]) -> (IdentityError, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let path = write_key_file(tmp.path(), contents);
        let err = Identity::load_or_create(tmp.path()).unwrap_err();
        assert_untouched(&path, contents);
        assert_eq!(err.path(), path);
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "error does not name the file: {err}"
        );
        // Still an error the second time: nothing was "repaired".
        assert!(Identity::load_or_create(tmp.path()).is_err());
        assert_untouched(&path, contents);
        (err, path)
    }

    #[test]
    fn empty_file_is_an_error() {
        let (err, _) = expect_error(b"");
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn garbage_file_is_an_error() {
        let (err, _) = expect_error(b"this is not a key\n");
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn truncated_file_is_an_error() {
        let pem = Identity::generate().pkcs8_pem();
        let bytes = pem.as_bytes();
        // Cut at every length: each must be an error (or, never, a different key).
        for cut in 1..bytes.len() - 1 {
            let tmp = tempfile::tempdir().unwrap();
            let path = write_key_file(tmp.path(), &bytes[..cut]);
            match Identity::load(&path) {
                Err(e) => assert!(e.to_string().contains(&path.display().to_string())),
                Ok(_) => {
                    // Only acceptable if the cut removed nothing but trailing
                    // characters of the END line's newline.
                    panic!("truncated key at {cut} bytes loaded");
                }
            }
        }
        let (err, _) = expect_error(&bytes[..bytes.len() / 2]);
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn truncated_der_is_an_error() {
        let id = Identity::generate();
        let der = id.pkcs8_der();
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        base64_encode_into(&der[..der.len() - 3], &mut pem);
        pem.push_str("\n-----END PRIVATE KEY-----\n");
        let (err, _) = expect_error(pem.as_bytes());
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn wrong_algorithm_is_an_error() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (err, _) = expect_error(p256.serialize_pem().as_bytes());
        assert!(matches!(err, IdentityError::WrongAlgorithm { .. }), "{err}");
        assert!(err.to_string().contains("Ed25519"), "{err}");

        let sec1 = b"-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----\n";
        let (err, _) = expect_error(sec1);
        assert!(matches!(err, IdentityError::WrongAlgorithm { .. }), "{err}");
    }

    #[test]
    fn certificate_instead_of_key_is_an_error() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.macula".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let (err, _) = expect_error(cert.pem().as_bytes());
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn two_keys_in_one_file_is_an_error() {
        let mut both = Identity::generate().pkcs8_pem().to_string();
        both.push_str(&Identity::generate().pkcs8_pem());
        let (err, _) = expect_error(both.as_bytes());
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn group_or_world_accessible_key_is_an_error() {
        for mode in [0o640, 0o604, 0o660, 0o644, 0o666, 0o610, 0o601] {
            let tmp = tempfile::tempdir().unwrap();
            let good = Identity::load_or_create(tmp.path()).unwrap();
            let path = tmp.path().join(KEY_FILE_NAME);
            let before = fs::read(&path).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = Identity::load_or_create(tmp.path()).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, IdentityError::InsecurePermissions { mode: m, .. } if m == mode),
                "{msg}"
            );
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
            assert_untouched(&path, &before);
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                mode,
                "mode was changed"
            );
            // After the fix the same identity comes back.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(
                Identity::load_or_create(tmp.path()).unwrap().node_id(),
                good.node_id()
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn owner_only_modes_are_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let id = Identity::load_or_create(tmp.path()).unwrap();
        let path = tmp.path().join(KEY_FILE_NAME);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(Identity::load(&path).unwrap().node_id(), id.node_id());
    }

    #[test]
    fn directory_in_place_of_key_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(KEY_FILE_NAME);
        fs::create_dir(&path).unwrap();
        let err = Identity::load_or_create(tmp.path()).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(path.is_dir());
    }

    #[cfg(unix)]
    #[test]
    fn dangling_symlink_is_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(KEY_FILE_NAME);
        std::os::unix::fs::symlink(tmp.path().join("missing"), &path).unwrap();
        let err = Identity::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Io { .. }), "{err}");
        assert!(fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!tmp.path().join("missing").exists());
    }

    #[test]
    fn missing_file_with_load_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(KEY_FILE_NAME);
        let err = Identity::load(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(!path.exists(), "load must not create the file");
    }

    #[test]
    fn link_no_replace_never_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        fs::write(&a, b"new").unwrap();
        fs::write(&b, b"old").unwrap();
        let err = link_no_replace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).unwrap(), b"old");
    }

    #[test]
    fn concurrent_creation_agrees_on_one_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || Identity::load_or_create(&dir).unwrap().node_id())
            })
            .collect();
        let ids: Vec<NodeId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
        assert_eq!(Identity::load_or_create(&dir).unwrap().node_id(), ids[0]);
    }

    #[test]
    fn base64_matches_known_vectors() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ] {
            let mut s = String::new();
            base64_encode_into(input, &mut s);
            assert_eq!(s, want);
        }
    }
}
