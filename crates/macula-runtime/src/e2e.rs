//! End-to-end payload encryption at the edges (issue 19): the realm's key
//! set this node (or client) holds, and sealing and opening of payloads on
//! encrypted topics and of calls of encrypted procedures.
//!
//! The key set (`macula_auth::keys`) is signed by the realm authority and
//! spread like the revocation list (`realm.rs`): from the admin API
//! (`POST /admin/realm/keys`, what `macula keys rotate` does), the copy in
//! the data directory, or a peer (`REALM_KEYS`); a newer one is adopted,
//! kept and passed on to full nodes, and a gateway sends it to its clients.
//!
//! Only the edges touch payloads: a publish seals (`pubsub::PubSub`), a
//! subscription opens as the application takes an event; a call of an
//! encrypted procedure is sealed by the caller's `rpc::Rpc` and opened by
//! the provider's before its handler, the reply the other way round
//! (bound to the request); a stream stores envelopes as captured and its
//! readers open them. The pub/sub core, gateways and forwarding nodes
//! carry the envelope as they carry any payload; where a message or call
//! enters the mesh they refuse one in the clear on an encrypted pattern.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use macula_auth::keys::rand_core::{CryptoRng, RngCore};
use macula_auth::keys::{
    Envelope, KeyId, KeySet, KeySetBody, KeyStatus, Keyring, OpenError, Opened, SealError,
    NONCE_LEN,
};
use macula_auth::Key;
use parking_lot::RwLock;
use serde::Serialize;

use crate::authz::{Installed, RealmCounters};
use crate::clock::wall_ms as unix_ms;

/// HELLO capability prefix: `e2e-keys=N`, the key set version the sender
/// (a full node) holds; a client attaching to it waits for that version.
pub const KEYS_CAPABILITY: &str = "e2e-keys=";

/// The key set version a gateway's HELLO announces (0: none).
pub fn gateway_keys(hello: &macula_wire::Hello) -> u64 {
    hello
        .capabilities
        .iter()
        .find_map(|c| c.strip_prefix(KEYS_CAPABILITY)?.parse().ok())
        .unwrap_or(0)
}

/// An envelope's nonce.
pub type Nonce = [u8; NONCE_LEN];

/// A sealed call's key id and nonce: what its reply is sealed with and
/// bound to.
pub type CallSeal = (KeyId, Nonce);

/// How a sealed handler error's text begins (PROTOCOL.md §5.14): the
/// envelope follows in URL-safe base64 without padding.
pub const SEALED_ERROR: &str = "e2e-sealed:";

/// The file in the data directory holding the last adopted key set.
pub const KEYSET_FILE: &str = "keyset";

/// The operating system's CSPRNG (nonces and wrapping).
pub struct SysRng;

impl RngCore for SysRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        if let Err(e) = getrandom::getrandom(dest) {
            // No entropy source is no state to go on from: a nonce must
            // never repeat.
            panic!("the operating system's random source failed: {e}");
        }
    }
}

impl CryptoRng for SysRng {}

/// Why a key set was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum E2eError {
    #[error("this realm has no authority: it has no end-to-end keys")]
    Open,
    #[error(transparent)]
    Invalid(#[from] macula_auth::keys::KeyError),
}

struct Held {
    bytes: Vec<u8>,
    body: Option<KeySetBody>,
    ring: Keyring,
}

/// What `GET /admin/realm/keys` (and `macula keys status`) shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KeysReport {
    pub version: u64,
    pub issued_ms: u64,
    /// This principal's Ed25519 key (what `macula keys rotate --member` takes).
    pub member_key: String,
    pub keys: Vec<KeyStatus>,
    /// Patterns whose newest key is older than their schedule.
    pub due: Vec<String>,
    /// The signed key set held, base64 (standard, padded; empty: none):
    /// what `macula keys rotate` builds the next version from.
    pub set: String,
}

/// A node's or client's end-to-end keys. Cheap to share (`Arc`).
pub struct E2e {
    authority: Option<Key>,
    identity: SigningKey,
    held: RwLock<Arc<Held>>,
    /// Whether any pattern is encrypted (the fast path skips the rest).
    active: AtomicBool,
    counters: Arc<RealmCounters>,
    dir: Option<PathBuf>,
    /// Notified when a set is adopted.
    adopted: tokio::sync::Notify,
    /// Nonces: a random prefix drawn once, then a counter (no system
    /// call per message; never repeats within this process's life, and
    /// the prefix keeps processes sharing a key apart).
    nonce_prefix: [u8; 16],
    nonce_counter: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for E2e {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2e")
            .field("version", &self.held.read().ring.version())
            .finish()
    }
}

impl E2e {
    pub(crate) fn new(
        authority: Option<Key>,
        identity: SigningKey,
        counters: Arc<RealmCounters>,
        dir: Option<PathBuf>,
    ) -> E2e {
        E2e {
            authority,
            identity,
            held: RwLock::new(Arc::new(Held {
                bytes: Vec::new(),
                body: None,
                ring: Keyring::empty(),
            })),
            active: AtomicBool::new(false),
            counters,
            dir,
            adopted: tokio::sync::Notify::new(),
            nonce_prefix: {
                let mut p = [0u8; 16];
                SysRng.fill_bytes(&mut p);
                p
            },
            nonce_counter: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn next_nonce(&self) -> [u8; macula_auth::keys::NONCE_LEN] {
        let mut n = [0u8; macula_auth::keys::NONCE_LEN];
        n[..16].copy_from_slice(&self.nonce_prefix);
        let c = self.nonce_counter.fetch_add(1, Relaxed);
        n[16..].copy_from_slice(&c.to_le_bytes());
        n
    }

    /// Waits (at most `limit`) until the held version is `v` or more.
    pub async fn wait_version(&self, v: u64, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, async {
            loop {
                let adopted = self.adopted.notified();
                if self.version() >= v {
                    return;
                }
                adopted.await;
            }
        })
        .await
        .is_ok()
    }

    /// Its counters (a node's are its realm counters, registered in its
    /// metrics; a client's are its own).
    pub fn counters(&self) -> &Arc<RealmCounters> {
        &self.counters
    }

    /// This principal's Ed25519 key: what key sets wrap keys to.
    pub fn member_key(&self) -> Key {
        Key::of(&self.identity)
    }

    /// The bytes of the key set held (empty: none).
    pub fn held_bytes(&self) -> Vec<u8> {
        self.held.read().bytes.clone()
    }

    pub fn version(&self) -> u64 {
        self.held.read().ring.version()
    }

    /// Loads the set kept in the data directory.
    pub(crate) fn load(&self) {
        let Some(bytes) = self
            .dir
            .as_ref()
            .and_then(|d| std::fs::read(d.join(KEYSET_FILE)).ok())
        else {
            return;
        };
        match self.install(&bytes) {
            Ok(Installed::Adopted { version }) => {
                tracing::info!(version, "end-to-end key set loaded from the data directory")
            }
            Ok(Installed::Stale { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, "end-to-end key set in the data directory refused")
            }
        }
    }

    /// Takes a signed key set: adopted (and kept) when newer than the one
    /// held.
    pub fn install(&self, bytes: &[u8]) -> Result<Installed, E2eError> {
        let Some(realm) = self.authority else {
            return Err(E2eError::Open);
        };
        let verified = KeySet::from_bytes(bytes).and_then(|s| s.verify(&realm));
        let body = match verified {
            Ok(b) => b,
            Err(e) => {
                self.counters.keysets.at(2).inc();
                return Err(e.into());
            }
        };
        let mut held = self.held.write();
        let have = held.body.as_ref().map_or(0, |b| b.version);
        if body.version <= have {
            self.counters.keysets.at(1).inc();
            return Ok(Installed::Stale { have });
        }
        let ring = Keyring::new(&body, &self.identity);
        let version = body.version;
        self.active.store(!ring.is_empty(), Relaxed);
        *held = Arc::new(Held {
            bytes: bytes.to_vec(),
            body: Some(body),
            ring,
        });
        drop(held);
        self.counters.keysets.at(0).inc();
        self.counters.keyset_version.set(version as i64);
        self.keep(bytes);
        self.adopted.notify_waiters();
        Ok(Installed::Adopted { version })
    }

    fn keep(&self, bytes: &[u8]) {
        let Some(dir) = &self.dir else { return };
        let path = dir.join(KEYSET_FILE);
        let tmp = dir.join(format!("{KEYSET_FILE}.tmp"));
        let saved = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = saved {
            tracing::warn!(path = %path.display(), error = %e, "could not keep the end-to-end key set");
        }
    }

    /// Whether any topic is encrypted.
    pub fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }

    /// The payload to publish on `topic`: sealed when the topic is
    /// encrypted, as it is otherwise.
    pub fn seal(&self, topic: &str, payload: Bytes) -> Result<Bytes, SealError> {
        if !self.is_active() {
            return Ok(payload);
        }
        let held = self.held.read().clone();
        match held
            .ring
            .seal_with_nonce(topic, &payload, unix_ms(), &self.next_nonce())
        {
            Ok(Some(sealed)) => {
                self.counters.e2e.at(0).inc();
                Ok(Bytes::from(sealed))
            }
            Ok(None) => Ok(payload),
            Err(e) => {
                self.counters.e2e.at(4).inc();
                Err(e)
            }
        }
    }

    /// The payload of an event on `topic` as the application gets it;
    /// `None`: not delivered (counted, and why logged).
    pub fn open(&self, topic: &str, payload: Bytes) -> Option<Bytes> {
        if !self.is_active() {
            return Some(payload);
        }
        let held = self.held.read().clone();
        match held.ring.open(topic, &payload, unix_ms()) {
            Ok(Opened::Clear) => Some(payload),
            Ok(Opened::Plain { payload, .. }) => {
                self.counters.e2e.at(1).inc();
                Some(Bytes::from(payload))
            }
            Err(OpenError::NoKey) => {
                self.counters.e2e.at(2).inc();
                tracing::debug!(topic, "end-to-end: an event sealed with a key this principal does not hold was not delivered");
                None
            }
            Err(e) => {
                self.counters.e2e.at(3).inc();
                tracing::debug!(topic, error = %e, "end-to-end: an event was not delivered");
                None
            }
        }
    }

    /// Opens an event on `topic` as a subscription hands it over: as
    /// [`E2e::open`], then, for a push consumer's delivery (headers
    /// `macula-stream` and `macula-stream-subject`, naming the topic the
    /// message was captured from), the stored envelope with that original
    /// topic as additional data when the realm encrypts it. The delivery
    /// topic's own sealing (if it is encrypted too) was opened first. A
    /// delivery from an encrypted topic that does not open (this
    /// principal is not a member of that topic's key, or the payload is
    /// not an envelope sealed for it) is not delivered and is counted.
    pub fn open_event(
        &self,
        topic: &str,
        headers: &[(String, String)],
        payload: Bytes,
    ) -> Option<Bytes> {
        let payload = self.open(topic, payload)?;
        if headers.is_empty() || !self.is_active() {
            return Some(payload);
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        match (
            header(crate::stream::headers::STREAM_HEADER),
            header(crate::stream::headers::SUBJECT_HEADER),
        ) {
            (Some(_), Some(original)) if original != topic && self.encrypts(original) => {
                self.open(original, payload)
            }
            _ => Some(payload),
        }
    }

    /// Whether `topic` is encrypted end to end by the set held.
    pub fn encrypts(&self, topic: &str) -> bool {
        self.is_active() && self.held.read().ring.encrypts(topic)
    }

    /// Whether calls of `procedure` are encrypted end to end by the set
    /// held.
    pub fn encrypts_call(&self, procedure: &str) -> bool {
        self.is_active() && self.held.read().ring.encrypts_call(procedure)
    }

    /// The arguments of a call of `procedure` as they leave this caller:
    /// sealed on an encrypted procedure (with the envelope's nonce, which
    /// the reply is bound to), as they are otherwise.
    pub fn seal_call(
        &self,
        procedure: &str,
        payload: Bytes,
    ) -> Result<(Bytes, Option<Nonce>), SealError> {
        if !self.is_active() {
            return Ok((payload, None));
        }
        let held = self.held.read().clone();
        let nonce = self.next_nonce();
        match held
            .ring
            .seal_call_with_nonce(procedure, &payload, unix_ms(), &nonce)
        {
            Ok(Some(sealed)) => {
                self.counters.e2e_calls.at(0).inc();
                Ok((Bytes::from(sealed), Some(nonce)))
            }
            Ok(None) => Ok((payload, None)),
            Err(e) => {
                self.counters.e2e_calls.at(4).inc();
                Err(e)
            }
        }
    }

    /// The arguments of a call of `procedure` as its handler gets them,
    /// and the request's key id and nonce when they were sealed (the reply
    /// is sealed with them). Every failure is counted.
    pub fn open_call(
        &self,
        procedure: &str,
        payload: Bytes,
    ) -> Result<(Bytes, Option<CallSeal>), OpenError> {
        if !self.is_active() {
            return Ok((payload, None));
        }
        let held = self.held.read().clone();
        match held.ring.open_call(procedure, &payload, unix_ms()) {
            Ok(Opened::Clear) => Ok((payload, None)),
            Ok(Opened::Plain {
                payload: plain,
                key,
            }) => {
                self.counters.e2e_calls.at(1).inc();
                let nonce = Envelope::decode(&payload)
                    .map(|e| e.nonce)
                    .map_err(|_| OpenError::Malformed)?;
                Ok((Bytes::from(plain), Some((key, nonce))))
            }
            Err(e) => {
                let at = match e {
                    OpenError::NoKey => 2,
                    // Not an envelope: a call in the clear.
                    OpenError::Malformed => 5,
                    _ => 3,
                };
                self.counters.e2e_calls.at(at).inc();
                tracing::debug!(procedure, error = %e, "end-to-end: a call was not served");
                Err(e)
            }
        }
    }

    /// A handler's reply to a call whose arguments were sealed (`request`,
    /// from [`E2e::open_call`]): sealed with the request's key, bound to
    /// it.
    pub fn seal_reply(
        &self,
        procedure: &str,
        request: &CallSeal,
        payload: Bytes,
    ) -> Result<Bytes, SealError> {
        let held = self.held.read().clone();
        let nonce = self.next_nonce();
        match held
            .ring
            .seal_reply_with_nonce(procedure, (&request.0, &request.1), &payload, &nonce)
        {
            Ok(Some(sealed)) => {
                self.counters.e2e_calls.at(0).inc();
                Ok(Bytes::from(sealed))
            }
            // The set changed under the call and no longer encrypts the
            // procedure: the reply still goes sealed or not at all.
            Ok(None) => {
                self.counters.e2e_calls.at(4).inc();
                Err(SealError::NoReplyKey {
                    procedure: procedure.to_string(),
                })
            }
            Err(e) => {
                self.counters.e2e_calls.at(4).inc();
                Err(e)
            }
        }
    }

    /// The reply to a call of `procedure` this caller sealed with
    /// `request_nonce`, opened. Every failure is counted.
    pub fn open_reply(
        &self,
        procedure: &str,
        request_nonce: &Nonce,
        payload: Bytes,
    ) -> Result<Bytes, OpenError> {
        let held = self.held.read().clone();
        let opened = held
            .ring
            .open_reply(procedure, request_nonce, &payload, unix_ms());
        self.take_answer(procedure, opened, "a reply")
            .map(Bytes::from)
    }

    /// An opened answer (reply or handler error) to a sealed call, counted:
    /// one in the clear is refused as malformed (the set no longer encrypts
    /// the procedure, but the call was sealed).
    fn take_answer(
        &self,
        procedure: &str,
        opened: Result<Opened, OpenError>,
        what: &str,
    ) -> Result<Vec<u8>, OpenError> {
        let e = match opened {
            Ok(Opened::Plain { payload, .. }) => {
                self.counters.e2e_calls.at(1).inc();
                return Ok(payload);
            }
            Ok(Opened::Clear) => OpenError::Malformed,
            Err(e) => e,
        };
        let at = if e == OpenError::NoKey { 2 } else { 3 };
        self.counters.e2e_calls.at(at).inc();
        tracing::debug!(procedure, error = %e, "end-to-end: {what} was not taken");
        Err(e)
    }

    /// A handler's error message answering a call whose arguments were
    /// sealed (`request`): sealed like the reply (with the request's key,
    /// bound to it, additional data `error_aad`) and carried as text in
    /// CALL_ERROR's `message`: [`SEALED_ERROR`] then the envelope in
    /// URL-safe base64 without padding. A message too long for the
    /// CALL_ERROR limit once sealed is cut (at a character boundary)
    /// before it is sealed.
    pub fn seal_error(
        &self,
        procedure: &str,
        request: &CallSeal,
        message: &str,
    ) -> Result<String, SealError> {
        use base64::Engine as _;
        let room = (macula_wire::rpc::MAX_WIRE_RPC_ERROR_LEN - SEALED_ERROR.len()) / 4 * 3
            - macula_auth::keys::ENVELOPE_OVERHEAD;
        let mut cut = message.len().min(room);
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        let held = self.held.read().clone();
        let nonce = self.next_nonce();
        match held.ring.seal_error_with_nonce(
            procedure,
            (&request.0, &request.1),
            &message.as_bytes()[..cut],
            &nonce,
        ) {
            Ok(Some(sealed)) => {
                self.counters.e2e_calls.at(0).inc();
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed);
                Ok(format!("{SEALED_ERROR}{b64}"))
            }
            Ok(None) => {
                self.counters.e2e_calls.at(4).inc();
                Err(SealError::NoReplyKey {
                    procedure: procedure.to_string(),
                })
            }
            Err(e) => {
                self.counters.e2e_calls.at(4).inc();
                Err(e)
            }
        }
    }

    /// A handler's error message answering a call of `procedure` this
    /// caller sealed with `request_nonce`, opened. A message that is not
    /// sealed (in the clear on an encrypted procedure), or does not open,
    /// is refused and counted: no fallback to the clear.
    pub fn open_error(
        &self,
        procedure: &str,
        request_nonce: &Nonce,
        message: &str,
    ) -> Result<String, OpenError> {
        use base64::Engine as _;
        let sealed = message.strip_prefix(SEALED_ERROR).and_then(|b| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b)
                .ok()
        });
        let held = self.held.read().clone();
        let opened = match sealed {
            None => Err(OpenError::Malformed),
            Some(b) => held
                .ring
                .open_error(procedure, request_nonce, &b, unix_ms()),
        };
        self.take_answer(procedure, opened, "a handler's error message")
            .map(|p| String::from_utf8_lossy(&p).into_owned())
    }

    /// What `macula keys status` shows.
    pub fn report(&self) -> KeysReport {
        let held = self.held.read().clone();
        let now = unix_ms();
        let (keys, due, issued_ms) = match &held.body {
            None => (Vec::new(), Vec::new(), 0),
            Some(b) => {
                let due = b
                    .patterns
                    .iter()
                    .filter(|p| {
                        p.rotate_every_ms > 0
                            && p.generations.last().is_some_and(|g| {
                                now.saturating_sub(g.active_from_ms) >= p.rotate_every_ms
                            })
                    })
                    .map(|p| p.pattern.clone())
                    .collect();
                (held.ring.status(b), due, b.issued_ms)
            }
        };
        KeysReport {
            version: held.ring.version(),
            issued_ms,
            member_key: Key::of(&self.identity).to_string(),
            keys,
            due,
            set: {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(&held.bytes)
            },
        }
    }
}
