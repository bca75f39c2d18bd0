//! A gateway's API keys at the handshake (`peer.rs` calls [`check`]):
//! the keys file, the failure limiter and the node's metrics together. The
//! keys, the store and the limiter themselves are in `apikey.rs` (pure
//! but for the file, no runtime imports).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use macula_auth::Verified;
use macula_wire::Hello;
use parking_lot::Mutex;

use crate::apikey::{foreign_grants, ApiKeyFailure, ApiKeyLimits, ApiKeyStore, FailureLimiter};
use crate::handshake_error::HandshakeError;
use crate::metrics::Metrics;

/// A gateway's API keys: the store, the failure limiter and the node's
/// metrics.
pub struct ApiKeyGate {
    store: ApiKeyStore,
    limiter: Mutex<FailureLimiter>,
    epoch: tokio::time::Instant,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for ApiKeyGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyGate")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl ApiKeyGate {
    pub fn new(store: ApiKeyStore, limits: ApiKeyLimits, metrics: Arc<Metrics>) -> ApiKeyGate {
        metrics.api_keys_loaded.set(store.len() as u64);
        ApiKeyGate {
            store,
            limiter: Mutex::new(FailureLimiter::new(limits)),
            epoch: tokio::time::Instant::now(),
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn failed(
        &self,
        limiter: &mut FailureLimiter,
        remote: IpAddr,
        why: ApiKeyFailure,
        now_ms: u64,
    ) {
        self.metrics.api_key_failure(why);
        let evicted = limiter.evicted();
        limiter.failure(remote, now_ms);
        self.metrics
            .api_key_limiter_evictions_total
            .inc_by(limiter.evicted() - evicted);
        self.metrics
            .api_key_tracked_addresses
            .set(limiter.tracked() as u64);
    }
}

fn unauthorized(kind: &'static str, message: impl Into<String>) -> HandshakeError {
    HandshakeError::Unauthorized {
        kind,
        message: message.into(),
    }
}

/// Admits the peer of `hello` (which proved its node ID in TLS and came
/// from `remote`) by the API key `key` it presented, at `unix_ms`: the
/// grant the key is bound to, verified against `admission`'s authority
/// with its clock skew and `revocations`. Only clients may use keys.
/// Failures count against `remote` (and the realm); an address (or realm)
/// over its limit is refused with `RateLimited` before its key is looked
/// at. `gate` is `None` at a node that keeps no API keys.
pub(crate) fn check(
    gate: Option<&ApiKeyGate>,
    authz: &crate::authz::Authz,
    hello: &Hello,
    key: &[u8],
    remote: SocketAddr,
    unix_ms: u64,
) -> Result<Verified, HandshakeError> {
    let Some(gate) = gate else {
        return Err(unauthorized(
            "api_keys_not_accepted",
            "this node accepts no API keys: present a grant",
        ));
    };
    let client = hello
        .capabilities
        .iter()
        .any(|c| c == macula_wire::client::CLIENT_CAPABILITY);
    gate.admit(authz, key, remote, unix_ms, client)
}

impl ApiKeyGate {
    /// [`check`] once the gate is known: `client` says whether the peer is
    /// a lightweight client (an MQTT client of the bridge is one).
    pub(crate) fn admit(
        &self,
        authz: &crate::authz::Authz,
        key: &[u8],
        remote: SocketAddr,
        unix_ms: u64,
        client: bool,
    ) -> Result<Verified, HandshakeError> {
        let gate = self;
        let ip = remote.ip();
        let now = gate.now_ms();
        // Held through the check (no await inside, one signature check at
        // most), so concurrent attempts from one address cannot all pass the
        // limit before any of their failures is counted.
        let mut limiter = gate.limiter.lock();
        if let Err(limited) = limiter.check(ip, now) {
            gate.metrics.api_key_rate_limited_total.inc();
            return Err(HandshakeError::RateLimited {
                message: limited.to_string(),
            });
        }
        if !client {
            gate.failed(&mut limiter, ip, ApiKeyFailure::NotClient, now);
            return Err(unauthorized(
                "not_client",
                "API keys are for lightweight clients; a full node needs a grant for its node ID",
            ));
        }
        let Some((grant, label)) = gate.store.lookup(key) else {
            gate.failed(&mut limiter, ip, ApiKeyFailure::UnknownKey, now);
            return Err(unauthorized(
                "unknown_key",
                "this gateway does not know the API key",
            ));
        };
        let verified = authz.verify(grant, unix_ms);
        match verified {
            Ok(v) => {
                gate.metrics.api_key_admitted_total.inc();
                tracing::debug!(%remote, label, subject = %v.subject(), "client admitted by API key");
                Ok(v)
            }
            Err(e) => {
                gate.failed(&mut limiter, ip, ApiKeyFailure::BadGrant, now);
                Err(unauthorized(
                    e.kind(),
                    format!("the API key's grant is not valid: {e}"),
                ))
            }
        }
    }
}

/// The gateway state for `admission`'s API keys, if it has any.
pub(crate) fn gate_of(
    admission: Option<&crate::config::Admission>,
    metrics: &Arc<Metrics>,
) -> Option<Arc<ApiKeyGate>> {
    let a = admission?;
    let store = a.api_keys.clone()?;
    tracing::info!(keys = store.len(), "accepting API keys from clients");
    let foreign = foreign_grants(&store, &a.authority);
    if foreign > 0 {
        tracing::warn!(
            foreign,
            "API keys whose grant is not for this realm's authority: they will be refused"
        );
    }
    Some(Arc::new(ApiKeyGate::new(
        store,
        a.api_key_limits,
        metrics.clone(),
    )))
}

#[cfg(test)]
mod tests {
    mod check {
        use super::super::*;
        use crate::apikey::*;
        use macula_auth::{Grant, Key};
        use std::time::Duration;

        fn v4(d: u8) -> IpAddr {
            IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, d))
        }
        use crate::config::Admission;
        use ed25519_dalek::SigningKey;
        use macula_auth::policy::parse_rules;
        use macula_auth::{sign, GrantBody, RevocationBody, RevocationList, Subject};
        use macula_wire::NodeId;

        const FAR: u64 = u64::MAX / 2;
        const NOW: u64 = 1_000_000;

        fn grant(authority: &SigningKey, serial: u8, expires_ms: u64) -> Vec<u8> {
            let realm = Key::of(authority);
            let body = GrantBody {
                realm,
                issuer: realm,
                id: [serial; 16],
                subject: Subject::Client(Key([serial; 32])),
                rules: parse_rules("allow publish **").expect("rules"),
                roles: vec![],
                not_before_ms: 0,
                expires_ms,
            };
            Grant {
                grant: sign(&body, authority).expect("sign"),
                signer: None,
            }
            .to_bytes()
            .expect("encode")
        }

        fn hello(client: bool) -> Hello {
            Hello {
                version: macula_wire::PROTOCOL_VERSION,
                node_id: NodeId::from_bytes([9; 32]),
                realm: "default".into(),
                capabilities: if client {
                    vec![macula_wire::client::CLIENT_CAPABILITY.to_string()]
                } else {
                    vec![]
                },
                listen_addrs: vec![],
                max_frame_size: macula_wire::DEFAULT_MAX_FRAME_SIZE,
                agent: String::new(),
                grant: None,
                api_key: None,
                observed_addr: None,
            }
        }

        fn from(d: u8) -> SocketAddr {
            SocketAddr::new(v4(d), 40_000)
        }

        struct Fixture {
            authority: SigningKey,
            authz: crate::authz::Authz,
            gate: ApiKeyGate,
            good: ApiKey,
            expired: ApiKey,
            foreign: ApiKey,
            metrics: Arc<Metrics>,
        }

        fn fixture() -> Fixture {
            let authority = SigningKey::from_bytes(&[1; 32]);
            let other = SigningKey::from_bytes(&[2; 32]);
            let (good, expired, foreign) = (
                ApiKey::generate().unwrap(),
                ApiKey::generate().unwrap(),
                ApiKey::generate().unwrap(),
            );
            let store = ApiKeyStore::from_keys([
                (&good, grant(&authority, 1, FAR)),
                (&expired, grant(&authority, 2, NOW - 120_000)),
                (&foreign, grant(&other, 3, FAR)),
            ]);
            let metrics = Arc::new(Metrics::default());
            let gate = ApiKeyGate::new(store, ApiKeyLimits::default(), metrics.clone());
            Fixture {
                authz: crate::authz::Authz::new(
                    &Admission::new(Key::of(&authority), None),
                    NodeId::from_bytes([9; 32]),
                    NOW,
                    Arc::default(),
                ),
                authority,
                gate,
                good,
                expired,
                foreign,
                metrics,
            }
        }

        fn attempt(f: &Fixture, key: &ApiKey, d: u8) -> Result<Verified, HandshakeError> {
            super::super::check(
                Some(&f.gate),
                &f.authz,
                &hello(true),
                key.as_bytes(),
                from(d),
                NOW,
            )
        }

        fn kind(r: Result<Verified, HandshakeError>) -> &'static str {
            match r {
                Ok(_) => "ok",
                Err(HandshakeError::Unauthorized { kind, .. }) => kind,
                Err(HandshakeError::RateLimited { .. }) => "rate_limited",
                Err(e) => panic!("unexpected {e}"),
            }
        }

        #[tokio::test(start_paused = true)]
        async fn keys_admit_with_their_grant_and_every_refusal_is_named() {
            let f = fixture();
            let v = attempt(&f, &f.good, 1).expect("good key");
            assert_eq!(
                v.subject(),
                Subject::Client(Key([1; 32])),
                "the grant's subject"
            );
            assert_eq!(
                kind(attempt(&f, &ApiKey::generate().unwrap(), 1)),
                "unknown_key"
            );
            assert_eq!(kind(attempt(&f, &f.expired, 2)), "expired");
            assert_eq!(kind(attempt(&f, &f.foreign, 3)), "wrong_realm");
            let list = RevocationList::sign(
                &RevocationBody {
                    realm: Key::of(&f.authority),
                    version: 1,
                    issued_ms: NOW,
                    grants: vec![[1; 16]],
                    subjects: vec![],
                },
                &f.authority,
            )
            .unwrap()
            .to_bytes()
            .unwrap();
            f.authz.install(&list).expect("a signed list");
            assert_eq!(kind(attempt(&f, &f.good, 4)), "revoked");
            // A full node may not use a key, even a good one.
            let r = super::super::check(
                Some(&f.gate),
                &f.authz,
                &hello(false),
                f.good.as_bytes(),
                from(5),
                NOW,
            );
            assert_eq!(kind(r), "not_client");
            // A node without API keys says so.
            let r = super::super::check(
                None,
                &f.authz,
                &hello(true),
                f.good.as_bytes(),
                from(6),
                NOW,
            );
            assert_eq!(kind(r), "api_keys_not_accepted");
            let m = &f.metrics;
            assert_eq!(m.api_key_failures(ApiKeyFailure::UnknownKey), 1);
            assert_eq!(m.api_key_failures(ApiKeyFailure::BadGrant), 3);
            assert_eq!(m.api_key_failures(ApiKeyFailure::NotClient), 1);
            assert_eq!(m.api_key_admitted_total.get(), 1);
            assert_eq!(m.api_keys_loaded.get(), 3);
            assert_eq!(m.api_key_tracked_addresses.get(), 5);
        }

        #[tokio::test(start_paused = true)]
        async fn the_limiter_bound_is_counted() {
            let f = fixture();
            let gate = ApiKeyGate::new(
                ApiKeyStore::default(),
                ApiKeyLimits {
                    max_tracked_addresses: 2,
                    ..ApiKeyLimits::default()
                },
                f.metrics.clone(),
            );
            for d in 1..=3 {
                let r = super::super::check(
                    Some(&gate),
                    &f.authz,
                    &hello(true),
                    f.good.as_bytes(),
                    from(d),
                    NOW,
                );
                assert_eq!(kind(r), "unknown_key");
            }
            assert_eq!(f.metrics.api_key_tracked_addresses.get(), 2);
            assert_eq!(f.metrics.api_key_limiter_evictions_total.get(), 1);
        }

        #[tokio::test(start_paused = true)]
        async fn the_sixth_attempt_after_five_failures_is_rate_limited_until_the_window_passes() {
            let f = fixture();
            for i in 0..5 {
                let bad = ApiKey::generate().unwrap();
                assert_eq!(
                    kind(attempt(&f, &bad, 1)),
                    "unknown_key",
                    "attempt {}",
                    i + 1
                );
            }
            // Refused at once, the good key too, from that address only.
            let r = attempt(&f, &f.good, 1);
            match &r {
                Err(HandshakeError::RateLimited { message }) => {
                    assert!(message.contains("retry in 60 s"), "{message}")
                }
                other => panic!("expected rate_limited, got {other:?}"),
            }
            assert_eq!(
                r.unwrap_err().failure(),
                crate::metrics::HandshakeFailure::RateLimited
            );
            assert_eq!(f.metrics.api_key_rate_limited_total.get(), 1);
            assert_eq!(kind(attempt(&f, &f.good, 2)), "ok");
            tokio::time::advance(Duration::from_secs(59)).await;
            assert_eq!(kind(attempt(&f, &f.good, 1)), "rate_limited");
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(kind(attempt(&f, &f.good, 1)), "ok");
        }
    }
}
