//! API keys for lightweight clients (issue 18, "level 1").
//!
//! A realm authority binds a random key to a grant it issued (`macula realm
//! apikey`); a gateway given the API keys file (`--api-keys`: BLAKE3 hashes
//! of keys with their grants, never the keys) admits a client whose HELLO
//! carries such a key instead of a grant, with the grant the key is bound
//! to: the key holder acts as that grant's subject.
//!
//! Three parts:
//! - [`ApiKey`] (the secret, `mk_` + 64 hex digits) and [`ApiKeyStore`]
//!   (the gateway's file: JSON lines of [`ApiKeyEntry`]), looked up by hash
//!   with a constant-time comparison;
//! - [`FailureLimiter`]: failed attempts counted per source address and per
//!   realm in fixed windows, bounded in memory; pure, time is an argument;
//! - [`ApiKeyGate`]: the two together with the node's metrics, and
//!   [`check`], what the handshake calls (`peer.rs`).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use macula_auth::{Grant, GrantError, Key};
use serde::{Deserialize, Serialize};

/// Text form of a key: this prefix, then its bytes in lowercase hex.
pub const API_KEY_PREFIX: &str = "mk_";
/// Bytes of a key (from the OS RNG).
pub const API_KEY_BYTES: usize = 32;
/// Most keys one API keys file may hold.
pub const MAX_API_KEYS: usize = 100_000;
/// Largest API keys file read (a line holds a grant token of at most
/// 64 KiB, base64).
pub const MAX_API_KEYS_FILE: u64 = 256 * 1024 * 1024;
/// Longest label kept with a key.
pub const MAX_LABEL_LEN: usize = 256;

/// Grant tokens travel as URL-safe base64 without padding (as `macula
/// realm grant` prints them).
const TOKEN: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// An API key: a secret. Its `Debug` shows only its hash's prefix;
/// `Display` is the text to hand to the key's holder.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey([u8; API_KEY_BYTES]);

impl ApiKey {
    /// A fresh random key from the OS RNG.
    pub fn generate() -> Result<ApiKey, ApiKeyError> {
        let mut bytes = [0u8; API_KEY_BYTES];
        getrandom::getrandom(&mut bytes).map_err(|e| ApiKeyError::Rng(e.to_string()))?;
        Ok(ApiKey(bytes))
    }

    /// The key's bytes, as HELLO carries them.
    pub fn as_bytes(&self) -> &[u8; API_KEY_BYTES] {
        &self.0
    }

    /// The hash a gateway keeps instead of the key.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }
}

impl Drop for ApiKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(API_KEY_PREFIX)?;
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey(hash {})", self.hash().prefix())
    }
}

impl FromStr for ApiKey {
    type Err = ApiKeyError;

    fn from_str(s: &str) -> Result<ApiKey, ApiKeyError> {
        let digits = s
            .trim()
            .strip_prefix(API_KEY_PREFIX)
            .ok_or(ApiKeyError::Format)?;
        let bytes = unhex::<API_KEY_BYTES>(digits).ok_or(ApiKeyError::Format)?;
        Ok(ApiKey(bytes))
    }
}

/// BLAKE3 of a key's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// The hash of `key` (the bytes HELLO carried, whatever their length).
    pub fn of(key: &[u8]) -> KeyHash {
        KeyHash(*blake3::hash(key).as_bytes())
    }

    /// The first 12 hex digits, to name a key in lists and logs.
    pub fn prefix(&self) -> String {
        hex(&self.0[..6])
    }

    /// Equality in time independent of where the two differ.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.prefix())
    }
}

impl FromStr for KeyHash {
    type Err = ApiKeyError;

    fn from_str(s: &str) -> Result<KeyHash, ApiKeyError> {
        unhex::<32>(s).map(KeyHash).ok_or(ApiKeyError::Format)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Why a key or an API keys file was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiKeyError {
    #[error("not an API key: expected {API_KEY_PREFIX} and {} hex digits", API_KEY_BYTES * 2)]
    Format,
    #[error("cannot draw a key from the OS RNG: {0}")]
    Rng(String),
    #[error("cannot read the API keys file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("API keys file, line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("API keys file holds more than {MAX_API_KEYS} keys")]
    TooMany,
}

/// One line of an API keys file (`apikeys.jsonl` in a realm's directory,
/// the file a gateway is given): a key's hash and the grant it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyEntry {
    /// BLAKE3 of the key's bytes, 64 hex digits.
    pub hash: String,
    /// The grant's token (URL-safe base64 of its bytes, as `macula realm
    /// grant` prints it).
    pub grant: String,
    /// Who or what the key is for (free text).
    #[serde(default)]
    pub label: String,
    /// The grant's serial (32 hex digits), for people.
    #[serde(default)]
    pub serial: String,
    /// When the key was issued, unix ms.
    #[serde(default)]
    pub created_ms: u64,
}

impl ApiKeyEntry {
    /// The entry binding `key` to `grant` (its bytes).
    pub fn new(
        key: &ApiKey,
        grant: &[u8],
        label: &str,
        created_ms: u64,
    ) -> Result<Self, GrantError> {
        let g = Grant::from_bytes(grant)?;
        let serial = hex(&g.body()?.id);
        Ok(ApiKeyEntry {
            hash: key.hash().to_string(),
            grant: TOKEN.encode(grant),
            label: label.to_string(),
            serial,
            created_ms,
        })
    }

    /// The JSON line of this entry.
    pub fn to_line(&self) -> String {
        // Strings and integers only: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A key the gateway knows: its hash and the grant's bytes.
#[derive(Clone, PartialEq, Eq)]
struct Stored {
    hash: KeyHash,
    grant: Vec<u8>,
    label: String,
}

/// The keys a gateway accepts, from an API keys file. Cheap to clone
/// (shared): the node's configuration and its gateway hold the same one.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeyStore {
    keys: Arc<Vec<Stored>>,
    /// Positions in `keys` by the hash's first four bytes: a lookup
    /// compares (in constant time) only the few hashes sharing them.
    index: Arc<HashMap<[u8; 4], Vec<usize>>>,
}

impl fmt::Debug for ApiKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyStore")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl ApiKeyStore {
    /// Reads an API keys file (at most [`MAX_API_KEYS_FILE`] bytes).
    pub fn load(path: &Path) -> Result<ApiKeyStore, ApiKeyError> {
        let read = |reason: String| ApiKeyError::Read {
            path: path.display().to_string(),
            reason,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| read(e.to_string()))?
            .len();
        if len > MAX_API_KEYS_FILE {
            return Err(read(format!(
                "{len} bytes, over the limit of {MAX_API_KEYS_FILE}"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?;
        ApiKeyStore::parse(&text)
    }

    /// Parses an API keys file's text: one JSON [`ApiKeyEntry`] a line
    /// (blank lines and lines starting with `#` skipped); every grant must
    /// decode (whether it verifies is checked at each use, since it can
    /// expire or be revoked). Names the first bad line.
    pub fn parse(text: &str) -> Result<ApiKeyStore, ApiKeyError> {
        let mut store = ApiKeyStore::default();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| ApiKeyError::Line {
                line: line_no,
                reason,
            };
            let entry: ApiKeyEntry = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let hash: KeyHash = entry
                .hash
                .parse()
                .map_err(|_| bad("hash is not 64 hex digits".into()))?;
            let grant = TOKEN
                .decode(entry.grant.trim())
                .map_err(|e| bad(format!("grant is not a token (base64): {e}")))?;
            Grant::from_bytes(&grant).map_err(|e| bad(e.to_string()))?;
            if entry.label.len() > MAX_LABEL_LEN {
                return Err(bad(format!("label over {MAX_LABEL_LEN} bytes")));
            }
            if store.keys.len() == MAX_API_KEYS {
                return Err(ApiKeyError::TooMany);
            }
            if store.find(&hash).is_some() {
                return Err(bad("the same key appears twice".into()));
            }
            store.insert(Stored {
                hash,
                grant,
                label: entry.label,
            });
        }
        Ok(store)
    }

    /// A store of `(key, grant bytes)` pairs (embedding applications and
    /// tests; `macula realm apikey` writes the file form).
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = (&'a ApiKey, Vec<u8>)>) -> ApiKeyStore {
        let mut store = ApiKeyStore::default();
        for (key, grant) in keys {
            store.insert(Stored {
                hash: key.hash(),
                grant,
                label: String::new(),
            });
        }
        store
    }

    fn insert(&mut self, s: Stored) {
        let mut head = [0u8; 4];
        head.copy_from_slice(&s.hash.0[..4]);
        let at = self.keys.len();
        Arc::make_mut(&mut self.index)
            .entry(head)
            .or_default()
            .push(at);
        Arc::make_mut(&mut self.keys).push(s);
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The stored key with this hash: every candidate sharing the hash's
    /// first bytes is compared in full, in constant time, none skipped.
    fn find(&self, hash: &KeyHash) -> Option<&Stored> {
        let mut head = [0u8; 4];
        head.copy_from_slice(&hash.0[..4]);
        let mut found = None;
        for &i in self.index.get(&head).map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(s) = self.keys.get(i) {
                if s.hash.ct_eq(hash) && found.is_none() {
                    found = Some(s);
                }
            }
        }
        found
    }

    /// The grant bound to the key whose bytes are `key`, and its label.
    pub fn lookup(&self, key: &[u8]) -> Option<(&[u8], &str)> {
        self.find(&KeyHash::of(key))
            .map(|s| (s.grant.as_slice(), s.label.as_str()))
    }
}

/// Limits on failed API-key attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiKeyLimits {
    /// Failed attempts from one address within `window` after which its
    /// attempts are refused until the window passes (default 5).
    pub max_failures_per_address: u32,
    /// Failed attempts in the whole realm (at this gateway) within
    /// `window` after which every attempt is refused until it passes
    /// (default 100).
    pub max_failures_per_realm: u32,
    /// The window: counted from an address's (or the realm's) first
    /// failure (default 60 s).
    pub window: Duration,
    /// Addresses tracked at once; beyond, the oldest is forgotten (default
    /// 10,000).
    pub max_tracked_addresses: usize,
}

/// Defaults of [`ApiKeyLimits`].
pub const DEFAULT_MAX_FAILURES_PER_ADDRESS: u32 = 5;
pub const DEFAULT_MAX_FAILURES_PER_REALM: u32 = 100;
pub const DEFAULT_FAILURE_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_TRACKED_ADDRESSES: usize = 10_000;

impl Default for ApiKeyLimits {
    fn default() -> Self {
        ApiKeyLimits {
            max_failures_per_address: DEFAULT_MAX_FAILURES_PER_ADDRESS,
            max_failures_per_realm: DEFAULT_MAX_FAILURES_PER_REALM,
            window: DEFAULT_FAILURE_WINDOW,
            max_tracked_addresses: DEFAULT_MAX_TRACKED_ADDRESSES,
        }
    }
}

impl ApiKeyLimits {
    /// Checks the limits make sense (each at least 1).
    pub fn validate(&self) -> Result<(), String> {
        if self.max_failures_per_address == 0
            || self.max_failures_per_realm == 0
            || self.max_tracked_addresses == 0
        {
            return Err("API-key failure limits and tracked addresses must be at least 1".into());
        }
        if self.window.is_zero() {
            return Err("the API-key failure window must not be zero".into());
        }
        Ok(())
    }
}

/// Why an attempt was refused before its key was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// This address failed too often; retry after `retry_after_ms`.
    Address { retry_after_ms: u64 },
    /// The realm's budget of failures is spent; retry after.
    Realm { retry_after_ms: u64 },
}

impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limited::Address { retry_after_ms } => write!(
                f,
                "too many failed API-key attempts from your address; retry in {} s",
                retry_after_ms.div_ceil(1000)
            ),
            Limited::Realm { retry_after_ms } => write!(
                f,
                "too many failed API-key attempts at this gateway; retry in {} s",
                retry_after_ms.div_ceil(1000)
            ),
        }
    }
}

/// Failures counted in one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    start_ms: u64,
    failures: u32,
}

/// Failed attempts per source address and in the realm, in fixed windows
/// that start at the first failure. Pure: time (ms, any monotonic epoch)
/// is an argument. Holds at most `max_tracked_addresses` addresses,
/// forgetting the one whose window started first.
///
/// Addresses are grouped as an attacker gets them: an IPv6 address by its
/// /64, an IPv4-mapped one as IPv4, and every relayed session (placeholder
/// addresses in `2001:db8::/32`) as one.
#[derive(Debug, Clone)]
pub struct FailureLimiter {
    limits: ApiKeyLimits,
    addrs: HashMap<IpAddr, Window>,
    /// `(start_ms, address)` of every entry of `addrs`: oldest first.
    by_age: BTreeSet<(u64, IpAddr)>,
    realm: Option<Window>,
    evicted: u64,
}

/// The address `ip` is counted as.
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x2001 && s[1] == 0x0db8 {
                return IpAddr::V6(Ipv6Addr::new(0x2001, 0x0db8, 0, 0, 0, 0, 0, 0));
            }
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

impl FailureLimiter {
    pub fn new(limits: ApiKeyLimits) -> FailureLimiter {
        FailureLimiter {
            limits,
            addrs: HashMap::new(),
            by_age: BTreeSet::new(),
            realm: None,
            evicted: 0,
        }
    }

    fn window_ms(&self) -> u64 {
        self.limits.window.as_millis() as u64
    }

    fn expired(&self, w: &Window, now_ms: u64) -> bool {
        now_ms.saturating_sub(w.start_ms) >= self.window_ms()
    }

    /// Forgets windows that have passed.
    fn expire(&mut self, now_ms: u64) {
        while let Some(&(start_ms, ip)) = self.by_age.first() {
            if now_ms.saturating_sub(start_ms) < self.window_ms() {
                break;
            }
            self.by_age.remove(&(start_ms, ip));
            self.addrs.remove(&ip);
        }
        if let Some(w) = self.realm {
            if self.expired(&w, now_ms) {
                self.realm = None;
            }
        }
    }

    /// May an attempt from `ip` be looked at now?
    pub fn check(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), Limited> {
        self.expire(now_ms);
        let retry = |w: &Window| (w.start_ms + self.window_ms()).saturating_sub(now_ms);
        if let Some(w) = self.addrs.get(&bucket(ip)) {
            if w.failures >= self.limits.max_failures_per_address {
                return Err(Limited::Address {
                    retry_after_ms: retry(w),
                });
            }
        }
        if let Some(w) = &self.realm {
            if w.failures >= self.limits.max_failures_per_realm {
                return Err(Limited::Realm {
                    retry_after_ms: retry(w),
                });
            }
        }
        Ok(())
    }

    /// Counts a failed attempt from `ip`.
    pub fn failure(&mut self, ip: IpAddr, now_ms: u64) {
        self.expire(now_ms);
        let ip = bucket(ip);
        match self.addrs.get_mut(&ip) {
            Some(w) => w.failures = w.failures.saturating_add(1),
            None => {
                if self.addrs.len() >= self.limits.max_tracked_addresses {
                    if let Some(oldest) = self.by_age.pop_first() {
                        self.addrs.remove(&oldest.1);
                        self.evicted += 1;
                    }
                }
                self.addrs.insert(
                    ip,
                    Window {
                        start_ms: now_ms,
                        failures: 1,
                    },
                );
                self.by_age.insert((now_ms, ip));
            }
        }
        match &mut self.realm {
            Some(w) => w.failures = w.failures.saturating_add(1),
            None => {
                self.realm = Some(Window {
                    start_ms: now_ms,
                    failures: 1,
                })
            }
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.addrs.len()
    }

    /// Addresses forgotten to make room, since the start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

/// Why an API-key attempt failed: the `reason` label of
/// `macula_api_key_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKeyFailure {
    /// No key with this hash.
    UnknownKey,
    /// The key's grant did not verify (expired, revoked, other realm...).
    BadGrant,
    /// A full node presented a key: keys are for clients only.
    NotClient,
    /// This node keeps no API keys.
    NotAccepted,
}

impl ApiKeyFailure {
    pub const ALL: [ApiKeyFailure; 4] = [
        ApiKeyFailure::UnknownKey,
        ApiKeyFailure::BadGrant,
        ApiKeyFailure::NotClient,
        ApiKeyFailure::NotAccepted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ApiKeyFailure::UnknownKey => "unknown_key",
            ApiKeyFailure::BadGrant => "bad_grant",
            ApiKeyFailure::NotClient => "not_client",
            ApiKeyFailure::NotAccepted => "not_accepted",
        }
    }
}

/// How many of a store's grants do not decode as grants of `authority`'s
/// realm (their keys will be refused as `wrong_realm`), for a warning at
/// start.
pub fn foreign_grants(store: &ApiKeyStore, authority: &Key) -> usize {
    store
        .keys
        .iter()
        .filter(|s| {
            Grant::from_bytes(&s.grant)
                .and_then(|g| g.body())
                .map_or(true, |b| b.realm != *authority)
        })
        .count()
}

/// Fuzz entry point (`fuzz/fuzz_targets/api_keys.rs`): an API keys file
/// parsed, and when it parses, the data's bytes looked up as a key. Never
/// panics.
pub fn fuzz_api_keys(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(store) = ApiKeyStore::parse(&text) {
        let _ = store.lookup(data);
        let _ = foreign_grants(&store, &Key([0; 32]));
    }
    let _ = text.parse::<ApiKey>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, d))
    }

    fn limits() -> ApiKeyLimits {
        ApiKeyLimits::default()
    }

    #[test]
    fn key_text_round_trips_and_is_recognizable() {
        let k = ApiKey::generate().unwrap();
        let text = k.to_string();
        assert!(text.starts_with("mk_"));
        assert_eq!(text.len(), 3 + 64);
        assert_eq!(text.parse::<ApiKey>().unwrap(), k);
        assert!(
            !format!("{k:?}").contains(&text[3..]),
            "Debug hides the key"
        );
        assert_ne!(ApiKey::generate().unwrap(), k);
        assert_eq!("mk_zz".parse::<ApiKey>(), Err(ApiKeyError::Format));
        assert_eq!(text[3..].parse::<ApiKey>(), Err(ApiKeyError::Format));
        let mut upper = text.clone();
        upper.push('0');
        assert_eq!(upper.parse::<ApiKey>(), Err(ApiKeyError::Format));
    }

    #[test]
    fn constant_time_equality() {
        let a = KeyHash([1; 32]);
        let mut b = a;
        assert!(a.ct_eq(&b));
        b.0[31] ^= 1;
        assert!(!a.ct_eq(&b));
        b = a;
        b.0[0] ^= 0x80;
        assert!(!a.ct_eq(&b));
    }

    #[test]
    fn store_finds_keys_by_hash_only() {
        let a = ApiKey::generate().unwrap();
        let b = ApiKey::generate().unwrap();
        let store = ApiKeyStore::from_keys([(&a, vec![1]), (&b, vec![2])]);
        assert_eq!(store.lookup(a.as_bytes()).map(|x| x.0), Some(&[1u8][..]));
        assert_eq!(store.lookup(b.as_bytes()).map(|x| x.0), Some(&[2u8][..]));
        assert_eq!(store.lookup(&[0; 32]), None);
        // The hash is not the key.
        assert_eq!(store.lookup(&a.hash().0), None);
    }

    #[test]
    fn file_errors_name_the_line() {
        let e = ApiKeyStore::parse("\n# comment\n{\"hash\":\"00\",\"grant\":\"\"}\n").unwrap_err();
        assert!(matches!(e, ApiKeyError::Line { line: 3, .. }), "{e}");
        let e = ApiKeyStore::parse("not json").unwrap_err();
        assert!(matches!(e, ApiKeyError::Line { line: 1, .. }), "{e}");
        let h = KeyHash([0; 32]).to_string();
        let e =
            ApiKeyStore::parse(&format!("{{\"hash\":\"{h}\",\"grant\":\"AAAA\"}}")).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(ApiKeyStore::parse("").unwrap().is_empty());
    }

    #[test]
    fn sixth_failure_from_one_address_is_refused_until_the_window_passes() {
        let mut l = FailureLimiter::new(limits());
        for i in 0..5 {
            assert_eq!(l.check(v4(1), i * 1000), Ok(()), "attempt {}", i + 1);
            l.failure(v4(1), i * 1000);
        }
        // 6th attempt: refused at once, with the time left in the window.
        assert_eq!(
            l.check(v4(1), 5000),
            Err(Limited::Address {
                retry_after_ms: 55_000
            })
        );
        // Another address is not affected.
        assert_eq!(l.check(v4(2), 5000), Ok(()));
        // Until the window (from the first failure) has passed.
        assert!(l.check(v4(1), 59_999).is_err());
        assert_eq!(l.check(v4(1), 60_000), Ok(()));
        assert_eq!(l.tracked(), 0, "expired entries are dropped");
    }

    #[test]
    fn realm_budget_limits_everyone() {
        let mut l = FailureLimiter::new(ApiKeyLimits {
            max_failures_per_realm: 10,
            ..limits()
        });
        for i in 0..10u8 {
            assert_eq!(l.check(v4(i + 1), 0), Ok(()));
            l.failure(v4(i + 1), 0);
        }
        assert_eq!(
            l.check(v4(200), 1),
            Err(Limited::Realm {
                retry_after_ms: 59_999
            })
        );
        assert_eq!(l.check(v4(200), 60_000), Ok(()));
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_is_forgotten() {
        let mut l = FailureLimiter::new(ApiKeyLimits {
            max_tracked_addresses: 3,
            max_failures_per_address: 1,
            max_failures_per_realm: u32::MAX,
            ..limits()
        });
        for d in 1..=3 {
            l.failure(v4(d), u64::from(d));
        }
        assert_eq!(l.tracked(), 3);
        assert!(l.check(v4(1), 10).is_err());
        l.failure(v4(4), 10);
        assert_eq!(l.tracked(), 3);
        assert_eq!(l.evicted(), 1);
        // The oldest (127.0.0.1) was forgotten; the others still limited.
        assert_eq!(l.check(v4(1), 11), Ok(()));
        assert!(l.check(v4(2), 11).is_err());
        assert!(l.check(v4(4), 11).is_err());
    }

    #[test]
    fn addresses_are_grouped() {
        let a: IpAddr = "2001:db9:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db9:1:2:ffff::1".parse().unwrap();
        assert_eq!(bucket(a), bucket(b));
        let c: IpAddr = "2001:db9:1:3::1".parse().unwrap();
        assert_ne!(bucket(a), bucket(c));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(bucket(mapped), v4(1));
        let r1: IpAddr = "2001:db8::1".parse().unwrap();
        let r2: IpAddr = "2001:db8:5::9".parse().unwrap();
        assert_eq!(bucket(r1), bucket(r2));
        assert_ne!(bucket(v4(1)), bucket(v4(2)));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// The limiter's per-address rule as a plain model: all failures
        /// kept, no eviction.
        #[derive(Default)]
        struct Model {
            windows: HashMap<IpAddr, (u64, u32)>,
        }

        impl Model {
            fn check(&mut self, ip: IpAddr, now: u64, l: &ApiKeyLimits) -> bool {
                let w = l.window.as_millis() as u64;
                match self.windows.get(&ip) {
                    Some(&(start, n)) if now - start < w => n < l.max_failures_per_address,
                    _ => true,
                }
            }
            fn failure(&mut self, ip: IpAddr, now: u64, l: &ApiKeyLimits) {
                let w = l.window.as_millis() as u64;
                let e = self.windows.entry(ip).or_insert((now, 0));
                if now - e.0 >= w {
                    *e = (now, 0);
                }
                e.1 += 1;
            }
        }

        proptest! {
            #[test]
            fn agrees_with_the_model_and_stays_bounded(
                ops in proptest::collection::vec((0u8..8, 0u64..20_000, any::<bool>()), 1..400),
                cap in 1usize..6,
            ) {
                let big = ApiKeyLimits {
                    max_failures_per_realm: u32::MAX,
                    window: Duration::from_secs(60),
                    ..ApiKeyLimits::default()
                };
                let small = ApiKeyLimits { max_tracked_addresses: cap, ..big };
                let mut l = FailureLimiter::new(big);
                let mut bounded = FailureLimiter::new(small);
                let mut m = Model::default();
                let mut now = 0u64;
                for (d, dt, fails) in ops {
                    now += dt;
                    let ip = v4(d);
                    let ok = l.check(ip, now).is_ok();
                    prop_assert_eq!(ok, m.check(ip, now, &big));
                    if ok && fails {
                        l.failure(ip, now);
                        m.failure(ip, now, &big);
                    }
                    if bounded.check(ip, now).is_ok() && fails {
                        bounded.failure(ip, now);
                    }
                    prop_assert!(bounded.tracked() <= cap);
                    prop_assert!(l.tracked() <= 8);
                }
            }

            #[test]
            fn file_parser_never_panics(text in ".{0,400}") {
                let _ = ApiKeyStore::parse(&text);
                let _ = text.parse::<ApiKey>();
            }

            #[test]
            fn fuzz_entry_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
                fuzz_api_keys(&data);
            }
        }
    }
}
