//! Who may use the admin API: a bearer token, or a signed request under an
//! admin grant of the realm authority.
//!
//! * `Authorization: Bearer <token>`: the node's admin token, from
//!   [`AdminAuthConfig::token_file`] or `<data dir>/admin-token` (created at
//!   first start: 32 random bytes as hex, mode 0600). Only a BLAKE3 hash of
//!   it is kept in memory, compared in constant time (`blake3::Hash`'s `==`).
//! * `Authorization: Macula-Grant <grant>.<unix_ms>.<sig>` (URL-safe base64
//!   without padding for the grant bytes and the signature): a
//!   `macula_auth::Grant` for subject `client:<KEY>` that verifies for the
//!   node's realm authority, and `KEY`'s Ed25519 signature over
//!   [`request_message`] (method, path with query, `unix_ms`, the grant's
//!   hash). The stamp
//!   must be within [`AdminAuthConfig::request_window`] of the node's clock,
//!   a signature is accepted once (a bounded replay cache), and the grant's
//!   rules must allow `admin <resource>` ([`resource`]).
//!
//! | path | resource |
//! |---|---|
//! | `/metrics` | `admin.metrics` |
//! | `/admin/peers`, `/admin/routing`, `/admin/subscriptions`, `/admin/services` | `admin.peers`, `admin.routing`, ... |
//! | `/admin/dashboard`, `/admin/dashboard/events` | `admin.dashboard` |
//! | `/admin/raft` | `admin.raft` |
//! | `/admin/raft/{group}` and `/admin/raft/{group}/members` | `admin.raft.<group>` and `admin.raft.<group>.members` |
//! | `/admin/raft/{group}/kv...`, `/cas`, `/watch` | `admin.raft.<group>.kv` |
//! | `/admin/streams` | `admin.streams` |
//! | `/admin/streams/{name}...` (the stream, its messages and consumers) | `admin.streams.<name>` |
//!
//! so `allow admin admin.**` allows everything and `allow admin
//! admin.raft.orders.*` one group's key-value store and membership.
//!
//! Refusals are 401 with a JSON `ErrorReport` whose `kind` is the reason
//! (`missing`, `bad_token`, `bad_grant:<kind>`, `stale`, `replayed`,
//! `denied`), counted in `macula_admin_unauthorized_total{reason}`; a
//! source address with [`AdminAuthConfig::max_failures`] failures in a
//! window is answered 429 until it ends (`reason="rate_limited"`).
//!
//! This module decides; it does not route (see `admin.rs`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use macula_auth::policy::{Action, Request};
use macula_auth::{Grant, Revocations, Subject};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::config::{AdminAuthConfig, Admission, IdentitySource, NodeConfig};
use crate::metrics::LabelledCounters;

/// The token file's name in the data directory.
pub const TOKEN_FILE: &str = "admin-token";
/// The scheme of the bearer token.
pub const BEARER: &str = "Bearer";
/// The scheme of a signed request under an admin grant.
pub const GRANT_SCHEME: &str = "Macula-Grant";
/// Longest `Authorization` header taken (a grant is at most 64 KiB).
pub const MAX_AUTHORIZATION: usize = 96 * 1024;
/// Longest token file read.
const MAX_TOKEN_FILE: u64 = 4096;
/// Domain tag of the signed request message.
const REQUEST_DOMAIN: &str = "macula admin request v1";
/// URL-safe base64 without padding (the grant tokens of `macula realm grant`).
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why the admin token could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminAuthError {
    #[error("admin token file {path}: cannot {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("admin token file {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

/// The reasons of `macula_admin_unauthorized_total`, in export order.
const REASONS: [&str; 7] = [
    "missing",
    "bad_token",
    "bad_grant",
    "stale",
    "replayed",
    "denied",
    "rate_limited",
];

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `missing`, `bad_token`, `bad_grant:<kind>`, `stale`, `replayed`,
    /// `denied` or `rate_limited`.
    pub reason: String,
    /// For people.
    pub message: String,
}

impl Refusal {
    fn new(reason: impl Into<String>, message: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            message: message.into(),
        }
    }

    fn bad_grant(kind: &str, message: impl Into<String>) -> Refusal {
        Refusal::new(format!("bad_grant:{kind}"), message)
    }

    /// The metric label (`bad_grant:<kind>` counts as `bad_grant`).
    fn label_index(&self) -> usize {
        let base = self.reason.split(':').next().unwrap_or("");
        REASONS.iter().position(|r| *r == base).unwrap_or(2)
    }

    /// Whether this is the 429 of the failure rate limit.
    pub fn is_rate_limited(&self) -> bool {
        self.reason == "rate_limited"
    }
}

/// Who was let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The holder of the admin token.
    Token,
    /// The client key of an admin grant.
    Grant(Subject),
    /// A loopback client of `/metrics` (no credentials needed).
    Loopback,
}

/// The admin API's credentials check (one per node).
#[derive(Debug)]
pub struct AdminAuth {
    token: Option<blake3::Hash>,
    token_file: Option<PathBuf>,
    admission: Option<Admission>,
    config: AdminAuthConfig,
    replay: Mutex<HashMap<[u8; 64], u64>>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    unauthorized: LabelledCounters<7>,
    /// Addresses whose failure count was forgotten to make room.
    failure_sources_evicted: prometheus_client::metrics::counter::Counter,
    /// The realm's permissions, for the revocation list it holds (set
    /// once by the node).
    authz: std::sync::OnceLock<std::sync::Arc<crate::authz::Authz>>,
}

impl AdminAuth {
    /// Sets up the credentials of a node with `config`: reads the token
    /// file, or creates `<data dir>/admin-token` at first start.
    pub fn prepare(config: &NodeConfig) -> Result<AdminAuth, AdminAuthError> {
        let token_file = match (&config.admin_auth.token_file, &config.identity) {
            (Some(f), _) => Some(f.clone()),
            (None, IdentitySource::DataDir(dir)) => {
                let path = dir.join(TOKEN_FILE);
                create_token_file(&path)?;
                Some(path)
            }
            (None, IdentitySource::Ephemeral) => None,
        };
        let token = match &token_file {
            Some(path) => Some(read_token_file(path)?),
            None => None,
        };
        Ok(AdminAuth {
            token: token.map(|t| blake3::hash(t.as_bytes())),
            token_file,
            admission: config.admission.clone(),
            config: config.admin_auth.clone(),
            replay: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            unauthorized: LabelledCounters::new("reason", REASONS),
            failure_sources_evicted: Default::default(),
            authz: std::sync::OnceLock::new(),
        })
    }

    /// Admin grants are checked against `authz`'s revocation list from now
    /// on (before: none revoked).
    pub fn set_authz(&self, authz: std::sync::Arc<crate::authz::Authz>) {
        let _ = self.authz.set(authz);
    }

    /// The token file in use, if any.
    pub fn token_file(&self) -> Option<&Path> {
        self.token_file.as_deref()
    }

    /// Whether admin grants are accepted (the realm has an authority).
    pub fn accepts_grants(&self) -> bool {
        self.admission.is_some()
    }

    /// Registers `macula_admin_unauthorized_total`.
    pub fn register(&self, r: &mut Registry) {
        self.unauthorized.register(
            r,
            "macula_admin_unauthorized",
            "Admin API requests refused for their credentials (reason), or for too many failures from their address (rate_limited).",
        );
        crate::metrics::register(
            r,
            "macula_admin_failure_sources_evicted",
            "Addresses whose failed admin requests were forgotten because failure_sources_max addresses were tracked.",
            self.failure_sources_evicted.clone(),
        );
    }

    /// The count of refusals for `reason` (tests, `/health`).
    pub fn refused(&self, reason: &str) -> u64 {
        REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.unauthorized.at(i).get())
    }

    /// Checks one request from `source` (`None`: unknown) to `method` and
    /// `path_and_query` with `authorization` (the header, if any) at
    /// `now_ms` (unix ms). Failures are counted against the source.
    pub fn check(
        &self,
        source: Option<IpAddr>,
        method: &str,
        path_and_query: &str,
        authorization: Option<&str>,
        now_ms: u64,
    ) -> Result<Principal, Refusal> {
        let source = source.map(|ip| ip.to_canonical());
        if let Some(ip) = source {
            if self.over_limit(ip) {
                let r = Refusal::new(
                    "rate_limited",
                    format!(
                        "too many failed admin requests from {ip}: at most {} per {:?}",
                        self.config.max_failures, self.config.failure_window
                    ),
                );
                self.unauthorized.at(r.label_index()).inc();
                return Err(r);
            }
        }
        let outcome = self.authenticate(method, path_and_query, authorization, now_ms);
        if let Err(r) = &outcome {
            self.unauthorized.at(r.label_index()).inc();
            if let Some(ip) = source {
                self.failed(ip);
            }
        }
        outcome
    }

    fn authenticate(
        &self,
        method: &str,
        path_and_query: &str,
        authorization: Option<&str>,
        now_ms: u64,
    ) -> Result<Principal, Refusal> {
        let Some(header) = authorization.map(str::trim).filter(|h| !h.is_empty()) else {
            return Err(Refusal::new(
                "missing",
                "the admin API needs credentials: Authorization: Bearer <token> (the node's \
                 admin-token file) or Macula-Grant <signed request>",
            ));
        };
        if header.len() > MAX_AUTHORIZATION {
            return Err(Refusal::new(
                "bad_token",
                "the Authorization header is too long",
            ));
        }
        let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case(BEARER) {
            return match &self.token {
                Some(hash) if blake3::hash(value.as_bytes()) == *hash => Ok(Principal::Token),
                Some(_) => Err(Refusal::new(
                    "bad_token",
                    "the admin token is not this node's",
                )),
                None => Err(Refusal::new(
                    "bad_token",
                    "this node has no admin token (no data directory and no token file)",
                )),
            };
        }
        if scheme.eq_ignore_ascii_case(GRANT_SCHEME) {
            return self.check_grant(method, path_and_query, value, now_ms);
        }
        Err(Refusal::new(
            "missing",
            format!("unknown Authorization scheme {scheme:?}: use Bearer or {GRANT_SCHEME}"),
        ))
    }

    fn check_grant(
        &self,
        method: &str,
        path_and_query: &str,
        value: &str,
        now_ms: u64,
    ) -> Result<Principal, Refusal> {
        let Some(admission) = &self.admission else {
            return Err(Refusal::bad_grant(
                "no_authority",
                "this node's realm has no authority: admin grants are not accepted",
            ));
        };
        let malformed = |what: &str| {
            Refusal::bad_grant(
                "malformed",
                format!("{GRANT_SCHEME} credentials must be <grant>.<unix_ms>.<signature>: {what}"),
            )
        };
        let mut parts = value.split('.');
        let (Some(grant), Some(stamp), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected three dot-separated parts"));
        };
        let grant_bytes = B64
            .decode(grant)
            .map_err(|e| malformed(&format!("grant: {e}")))?;
        let stamp: u64 = stamp
            .parse()
            .map_err(|_| malformed("the stamp is not unix milliseconds"))?;
        let sig: [u8; 64] = B64
            .decode(sig)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| malformed("the signature is not 64 bytes of base64"))?;
        let grant = Grant::from_bytes(&grant_bytes)
            .map_err(|e| Refusal::bad_grant(e.kind(), e.to_string()))?;
        let skew = u64::try_from(admission.clock_skew.as_millis()).unwrap_or(u64::MAX);
        let held = self.authz.get().map(|a| a.revoked());
        let none = Revocations::default();
        let revoked = held.as_ref().map_or(&none, |h| &h.list);
        let verified = grant
            .verify(&admission.authority, now_ms, skew, revoked)
            .map_err(|e| Refusal::bad_grant(e.kind(), e.to_string()))?;
        let Subject::Client(key) = verified.subject() else {
            return Err(Refusal::bad_grant(
                "wrong_subject",
                format!(
                    "an admin grant must be for a client key, not {}",
                    verified.subject()
                ),
            ));
        };
        let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| {
            Refusal::bad_grant("bad_signature", "the grant's subject is no Ed25519 key")
        })?;
        let msg = request_message(&grant_bytes, method, path_and_query, stamp);
        if vk.verify(&msg, &Signature::from_bytes(&sig)).is_err() {
            return Err(Refusal::bad_grant(
                "bad_signature",
                format!("the request signature does not verify for {method} {path_and_query} by the grant's subject"),
            ));
        }
        let window = u64::try_from(self.config.request_window.as_millis()).unwrap_or(u64::MAX);
        if stamp.abs_diff(now_ms) > window {
            return Err(Refusal::new(
                "stale",
                format!(
                    "the request was signed at {stamp} (unix ms), {} ms from this node's clock; at most {window} ms allowed",
                    stamp.abs_diff(now_ms)
                ),
            ));
        }
        self.remember(sig, stamp.saturating_add(window), now_ms)?;
        let resource = resource(path_and_query);
        let req = Request::new(Action::Admin, &resource)
            .map_err(|e| Refusal::new("denied", format!("no admin resource for this path: {e}")))?;
        let decision = verified.decide(&req);
        if !decision.is_allowed() {
            return Err(Refusal::new(
                "denied",
                format!("the grant does not allow admin {resource}: {decision:?}"),
            ));
        }
        Ok(Principal::Grant(verified.subject()))
    }

    /// Records a signature until `until_ms`; a signature seen before is a
    /// replay. When the cache is full of live signatures, refuses.
    fn remember(&self, sig: [u8; 64], until_ms: u64, now_ms: u64) -> Result<(), Refusal> {
        let mut seen = self.replay.lock();
        if seen.contains_key(&sig) {
            return Err(Refusal::new(
                "replayed",
                "this signed request was already used: sign each request anew",
            ));
        }
        if seen.len() >= self.config.replay_cache_max {
            seen.retain(|_, until| *until >= now_ms);
            if seen.len() >= self.config.replay_cache_max {
                return Err(Refusal::new(
                    "replayed",
                    format!(
                        "the replay cache is full ({} signed requests in the window): try again later",
                        self.config.replay_cache_max
                    ),
                ));
            }
        }
        seen.insert(sig, until_ms);
        Ok(())
    }

    fn over_limit(&self, ip: IpAddr) -> bool {
        let mut failures = self.failures.lock();
        match failures.get(&ip) {
            Some((start, n)) if start.elapsed() < self.config.failure_window => {
                *n >= self.config.max_failures
            }
            Some(_) => {
                failures.remove(&ip);
                false
            }
            None => false,
        }
    }

    fn failed(&self, ip: IpAddr) {
        let mut failures = self.failures.lock();
        let window = self.config.failure_window;
        if !failures.contains_key(&ip) && failures.len() >= self.config.failure_sources_max {
            failures.retain(|_, (start, _)| start.elapsed() < window);
            if failures.len() >= self.config.failure_sources_max {
                // Forget the oldest window to make room.
                if let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, (s, _))| *s)
                    .map(|(ip, _)| *ip)
                {
                    failures.remove(&oldest);
                    self.failure_sources_evicted.inc();
                }
            }
        }
        let entry = failures.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// How long failures from one address are remembered (for `Retry-After`).
    pub fn failure_window(&self) -> Duration {
        self.config.failure_window
    }
}

/// The bytes a `Macula-Grant` request signature covers: the method, the
/// path with its query, the stamp and the BLAKE3 hash of the grant's bytes
/// (so one signature is bound to one grant).
pub fn request_message(grant: &[u8], method: &str, path_and_query: &str, unix_ms: u64) -> Vec<u8> {
    let grant = blake3::hash(grant).to_hex();
    format!("{REQUEST_DOMAIN}\n{method}\n{path_and_query}\n{unix_ms}\n{grant}").into_bytes()
}

/// The `Authorization` header value of a request signed by `key` under the
/// admin grant `grant` (its bytes, `Grant::to_bytes`).
pub fn sign_request(
    grant: &[u8],
    key: &SigningKey,
    method: &str,
    path_and_query: &str,
    unix_ms: u64,
) -> String {
    let sig = key.sign(&request_message(grant, method, path_and_query, unix_ms));
    format!(
        "{GRANT_SCHEME} {}.{unix_ms}.{}",
        B64.encode(grant),
        B64.encode(sig.to_bytes())
    )
}

/// The resource an admin request is for (see the module doc).
pub fn resource(path_and_query: &str) -> String {
    let path = path_and_query.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["metrics"] => "admin.metrics".to_string(),
        ["admin"] => "admin".to_string(),
        ["admin", "raft"] => "admin.raft".to_string(),
        ["admin", "raft", group] => format!("admin.raft.{group}"),
        ["admin", "raft", group, "members"] => format!("admin.raft.{group}.members"),
        ["admin", "raft", group, ..] => format!("admin.raft.{group}.kv"),
        ["admin", "streams", name, ..] => format!("admin.streams.{name}"),
        ["admin", what, ..] => format!("admin.{what}"),
        _ => "admin".to_string(),
    }
}

/// Creates the token file if it does not exist: 32 random bytes as hex,
/// mode 0600, never overwritten.
fn create_token_file(path: &Path) -> Result<(), AdminAuthError> {
    let io = |op| {
        move |source| AdminAuthError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::getrandom(bytes.as_mut()).map_err(|e| AdminAuthError::Bad {
        path: path.to_path_buf(),
        reason: format!("the random source failed: {e}"),
    })?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(mut f) => {
            use std::io::Write;
            f.write_all(format!("{hex}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io("write"))?;
            tracing::info!(path = %path.display(), "created the admin token");
            Ok(())
        }
        // Another process made it first: theirs is read.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("create")(e)),
    }
}

/// The token in `path` (trimmed), refusing an empty or group/world
/// readable file.
fn read_token_file(path: &Path) -> Result<zeroize::Zeroizing<String>, AdminAuthError> {
    use std::io::Read;
    let bad = |reason: String| AdminAuthError::Bad {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| AdminAuthError::Io {
        path: path.to_path_buf(),
        op: "open",
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = file.metadata() {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(bad(format!(
                    "readable by group or others (mode {:o}): chmod 600 it",
                    mode & 0o777
                )));
            }
        }
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|source| AdminAuthError::Io {
            path: path.to_path_buf(),
            op: "read",
            source,
        })?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(bad(format!("longer than {MAX_TOKEN_FILE} bytes")));
    }
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(bad("expected one token on one line".into()));
    }
    Ok(zeroize::Zeroizing::new(token.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_resources_from_paths() {
        for (path, want) in [
            ("/metrics", "admin.metrics"),
            ("/admin/peers", "admin.peers"),
            ("/admin/routing?x=1", "admin.routing"),
            ("/admin/raft", "admin.raft"),
            ("/admin/raft/orders", "admin.raft.orders"),
            ("/admin/raft/orders/members", "admin.raft.orders.members"),
            (
                "/admin/raft/orders/kv/a/b?stale=true",
                "admin.raft.orders.kv",
            ),
            ("/admin/raft/orders/kv", "admin.raft.orders.kv"),
            ("/admin/raft/orders/cas", "admin.raft.orders.kv"),
            ("/admin/raft/orders/watch?from=3", "admin.raft.orders.kv"),
            ("/admin/streams", "admin.streams"),
            (
                "/admin/streams/orders/consumers/c/next",
                "admin.streams.orders",
            ),
        ] {
            assert_eq!(resource(path), want, "{path}");
        }
    }

    #[test]
    fn admin_failures_are_limited_per_address_in_a_bounded_table() {
        let mut config = NodeConfig::default();
        config.admin_auth.max_failures = 2;
        config.admin_auth.failure_sources_max = 2;
        let auth = AdminAuth::prepare(&config).expect("no token file needed");
        let ip = |n: u8| Some(IpAddr::from([127, 0, 0, n]));
        let fail = |n: u8| auth.check(ip(n), "GET", "/admin/peers", None, 0);
        for _ in 0..2 {
            assert_eq!(fail(1).expect_err("no credentials").reason, "missing");
        }
        assert_eq!(fail(1).expect_err("limited").reason, "rate_limited");
        assert_eq!(fail(2).expect_err("another address").reason, "missing");
        assert_eq!(auth.failure_sources_evicted.get(), 0);
        // A third address: the oldest (127.0.0.1) is forgotten.
        assert_eq!(fail(3).expect_err("third").reason, "missing");
        assert_eq!(auth.failure_sources_evicted.get(), 1);
        assert_eq!(fail(1).expect_err("forgotten").reason, "missing");
        assert_eq!(auth.refused("rate_limited"), 1);
        assert_eq!(auth.refused("missing"), 5);
        // An unknown source is never limited (the router served elsewhere).
        for _ in 0..5 {
            assert_eq!(
                auth.check(None, "GET", "/x", None, 0)
                    .expect_err("none")
                    .reason,
                "missing"
            );
        }
    }

    #[test]
    fn admin_token_file_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TOKEN_FILE);
        create_token_file(&path).expect("create");
        let first = read_token_file(&path).expect("read");
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        create_token_file(&path).expect("again");
        assert_eq!(*read_token_file(&path).expect("read"), *first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let e = read_token_file(&path).expect_err("world-readable");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
    }
}
