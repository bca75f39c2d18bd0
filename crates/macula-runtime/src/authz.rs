//! Permissions in a realm with an authority (issue 18): who this node and
//! each admitted peer are, what their grants allow, and the realm's current
//! revocation list.
//!
//! A node of such a realm holds one [`Authz`]; every admitted peer's
//! connection carries the [`PeerGrant`] its HELLO proved. The services ask
//! here before they act:
//!
//! * **Where a request enters the mesh** ([`Authz::local`] for this node's
//!   own application; a gateway asks its client's grant with
//!   [`Authz::check`]): publish, subscribe, call, advertise.
//! * **Where it is delivered or served** ([`Authz::check_peer`]): the peer
//!   handing over a batch must be allowed to publish its topics, the peer a
//!   batch goes to must be allowed to subscribe to them, the peer calling
//!   must be allowed to call, the provider a call goes to must be allowed to
//!   advertise. A peer that carries other principals' traffic (a gateway for
//!   its clients) holds `relay` on those names instead: `relay` stands for
//!   any of the four when the peer is not the principal.
//!
//! An open realm (no authority) has no `Authz`: nothing is checked. Every
//! decision is cached per grant (`macula_auth::DecisionCache`); every
//! refusal is counted by action in `macula_authz_denied_total`.
//!
//! No service module is imported here: this is a leaf the services, the
//! handshake (`peer.rs`) and the realm service (`realm.rs`) import.

use std::sync::Arc;

use macula_auth::{
    Action, Decision, DecisionCache, Grant, GrantError, Key, Policy, RevocationError,
    RevocationList, Revocations, Subject, Verified,
};
use macula_wire::NodeId;
use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::audit_log::AuditLog;
use crate::config::Admission;
use crate::metrics::{register, LabelledCounters};

/// Grants remembered as verified (see [`Authz::admit`]), and for how long.
pub const VERIFIED_GRANTS: usize = 1024;
pub const VERIFIED_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Decisions cached per grant.
pub const DECISION_CACHE: usize = macula_auth::policy::DECISION_CACHE_CAPACITY;

/// How long a repeat of the same security event stays out of the audit
/// trail (see [`AuditTrail`]).
pub const AUDIT_REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Distinct events remembered for that.
pub const AUDIT_REPEAT_KEYS: usize = 4096;

/// The node's audit trail as security events reach it (admissions and
/// refusals, denials, revocations, trust changes): each distinct event
/// (kind and key, e.g. a denial of one principal's action on one resource)
/// is written at most once per [`AUDIT_REPEAT_WINDOW`]; how many repeats
/// were left out is written with the next one after the window (every
/// repeat is in the metrics anyway). So a flood of refused requests cannot
/// rotate the trail's history away. Without a data directory there is no
/// trail and this does nothing.
pub struct AuditTrail {
    log: Option<AuditLog>,
    recent: Mutex<macula_wire::ttl_cache::TtlCache<String, u64, std::time::Instant>>,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("on", &self.log.is_some())
            .finish()
    }
}

impl AuditTrail {
    pub fn new(log: Option<AuditLog>) -> AuditTrail {
        AuditTrail {
            log,
            recent: Mutex::new(macula_wire::ttl_cache::TtlCache::new(AUDIT_REPEAT_KEYS)),
        }
    }

    /// Writes `kind` with `detail()` unless the same `kind` and `key` was
    /// written less than [`AUDIT_REPEAT_WINDOW`] ago.
    pub fn record(&self, kind: &str, key: &str, detail: impl FnOnce() -> String) {
        let Some(log) = &self.log else { return };
        let now = std::time::Instant::now();
        let k = format!("{kind}\0{key}");
        let before = {
            let mut recent = self.recent.lock();
            if recent.get(&k, now).is_some() {
                if let Some(n) = recent.peek_mut(&k) {
                    *n += 1;
                }
                return;
            }
            let before = recent.remove(&k).unwrap_or(0);
            recent.insert(k, 0, now + AUDIT_REPEAT_WINDOW, now);
            before
        };
        let mut d = detail();
        if before > 0 {
            d.push_str(&format!(
                " ({before} more like it left out in the minute before)"
            ));
        }
        log.record(kind, &d);
    }
}

/// A request a realm's permissions refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{principal} may not {action} {resource:?} in this realm: {reason}")]
pub struct Denied {
    /// `this node`, or the principal (`node ID`, `client KEY`).
    pub principal: String,
    pub action: Action,
    pub resource: String,
    /// A short name: `denied_by_rule`, `not_allowed`,
    /// `outside_signer_scope`, `no_grant`, `invalid_resource`.
    pub kind: &'static str,
    pub reason: String,
}

/// A verified grant and its compiled, cached policy.
pub struct PeerGrant {
    verified: Verified,
    policy: Policy,
    cache: Mutex<DecisionCache>,
}

impl std::fmt::Debug for PeerGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGrant")
            .field("subject", &self.verified.subject())
            .field("rules", &self.policy.len())
            .finish()
    }
}

impl PeerGrant {
    pub fn new(verified: Verified) -> PeerGrant {
        PeerGrant {
            policy: verified.policy(),
            verified,
            cache: Mutex::new(DecisionCache::new(DECISION_CACHE)),
        }
    }

    pub fn verified(&self) -> &Verified {
        &self.verified
    }

    pub fn subject(&self) -> Subject {
        self.verified.subject()
    }

    /// Unix milliseconds when this grant (or its signer's) stops.
    pub fn expires_ms(&self) -> u64 {
        self.verified.expires_ms()
    }

    /// The policy's decision for `action` on `resource` (a pattern for
    /// subscribe, a name otherwise), from the cache when asked before.
    fn decide(&self, action: Action, resource: &str) -> Result<(), (&'static str, String)> {
        match self.cache.lock().decide(&self.policy, action, resource) {
            Ok(Decision::Allow { .. }) => Ok(()),
            Ok(Decision::Deny(d)) => Err((d.kind(), d.to_string())),
            Err(e) => Err(("invalid_resource", e.to_string())),
        }
    }
}

/// The realm's current revocation list, as verified, with its bytes (to
/// pass on; empty for the default list, which revokes nothing).
#[derive(Debug, Default)]
pub struct Revoked {
    pub list: Revocations,
    pub bytes: Vec<u8>,
}

/// What [`Authz::install`] did with a revocation list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// Adopted: newer than the one held.
    Adopted { version: u64 },
    /// Not newer than the one held (`have`): ignored.
    Stale { have: u64 },
}

/// The realm service's counters (registered whether or not the realm has
/// an authority, so dashboards see zeros).
#[derive(Debug)]
pub struct RealmCounters {
    /// Requests refused by permissions, by action.
    pub denied: LabelledCounters<6>,
    /// Decisions taken (allowed or not).
    pub decisions_total: Counter,
    /// The revocation list's version held (0: none).
    pub revocations_version: Gauge,
    /// Revocation lists received, by outcome; `too_large`: one not sent
    /// to a peer whose frame limit it exceeds.
    pub revocation_lists: LabelledCounters<4>,
    /// Connections closed because their grant was revoked, or expired.
    pub closed: LabelledCounters<2>,
    /// Version of the end-to-end key set held (0: none).
    pub keyset_version: Gauge,
    /// Key sets received, by outcome (as `revocation_lists`).
    pub keysets: LabelledCounters<4>,
    /// End-to-end payloads at this edge, by outcome: `sealed`, `opened`,
    /// `no_key` (not delivered: sealed with a key this principal does not
    /// hold), `refused` (not delivered: malformed, retired or forged),
    /// `seal_refused` (a publish refused: no active key),
    /// `plaintext_refused` (a gateway or node refused a message in the
    /// clear on an encrypted topic).
    pub e2e: LabelledCounters<6>,
    /// End-to-end encrypted RPC at this edge, by outcome: `sealed` (call
    /// arguments or a reply), `opened`, `no_key` and `refused` (a call not
    /// served, or a reply not taken: sealed with a key this principal does
    /// not hold; malformed, retired or forged), `seal_refused` (a call or
    /// reply refused: no key), `plaintext_refused` (a call in the clear on
    /// an encrypted procedure refused, by a gateway or the provider).
    pub e2e_calls: LabelledCounters<6>,
}

/// The outcomes of `macula_e2e_payloads` and `macula_e2e_calls`.
const E2E_OUTCOMES: [&str; 6] = [
    "sealed",
    "opened",
    "no_key",
    "refused",
    "seal_refused",
    "plaintext_refused",
];

impl Default for RealmCounters {
    fn default() -> Self {
        RealmCounters {
            denied: LabelledCounters::new("action", Action::ALL.map(Action::name)),
            decisions_total: Counter::default(),
            revocations_version: Gauge::default(),
            revocation_lists: LabelledCounters::new(
                "outcome",
                ["adopted", "stale", "invalid", "too_large"],
            ),
            closed: LabelledCounters::new("reason", ["revoked", "expired"]),
            keyset_version: Gauge::default(),
            keysets: LabelledCounters::new("outcome", ["adopted", "stale", "invalid", "too_large"]),
            e2e: LabelledCounters::new("outcome", E2E_OUTCOMES),
            e2e_calls: LabelledCounters::new("outcome", E2E_OUTCOMES),
        }
    }
}

impl RealmCounters {
    pub fn register(&self, r: &mut Registry) {
        self.denied.register(
            r,
            "macula_authz_denied",
            "Requests refused by the realm's permissions (where they enter the mesh or where they are delivered or served), by action.",
        );
        register(
            r,
            "macula_authz_decisions",
            "Permission decisions taken (cached or not).",
            self.decisions_total.clone(),
        );
        register(
            r,
            "macula_realm_revocations_version",
            "Version of the realm's revocation list this node holds (0: none).",
            self.revocations_version.clone(),
        );
        self.revocation_lists.register(
            r,
            "macula_realm_revocation_lists",
            "Revocation lists received (from peers, the admin API or the data directory), by outcome; too_large: not sent to a peer whose frame limit it exceeds.",
        );
        self.closed.register(
            r,
            "macula_realm_connections_closed",
            "Connections this node closed because the peer's grant was revoked or expired.",
        );
        register(
            r,
            "macula_e2e_keyset_version",
            "Version of the realm's end-to-end key set this node holds (0: none).",
            self.keyset_version.clone(),
        );
        self.keysets.register(
            r,
            "macula_e2e_keysets",
            "End-to-end key sets received (from peers, the gateway, the admin API or the data directory), by outcome; too_large: not sent to a peer whose frame limit it exceeds.",
        );
        self.e2e.register(
            r,
            "macula_e2e_payloads",
            "End-to-end encrypted payloads at this edge, by outcome: sealed, opened, no_key and refused (not delivered), seal_refused (publish refused), plaintext_refused (a message in the clear on an encrypted topic refused).",
        );
        self.e2e_calls.register(
            r,
            "macula_e2e_calls",
            "End-to-end encrypted RPC arguments and replies at this edge, by outcome: sealed, opened, no_key and refused (a call not served or a reply not taken), seal_refused (no key to seal with), plaintext_refused (a call in the clear on an encrypted procedure refused).",
        );
    }
}

/// A realm's authority, this node's grant and the current revocations.
#[derive(Debug)]
pub struct Authz {
    authority: Key,
    skew_ms: u64,
    /// This node's own grant; `None`: it may do nothing itself (it can
    /// still admit others).
    own: Option<PeerGrant>,
    own_error: Option<OwnGrantError>,
    revoked: RwLock<Arc<Revoked>>,
    counters: Arc<RealmCounters>,
    /// Where denials are written (set once by the node).
    trail: std::sync::OnceLock<Arc<AuditTrail>>,
    /// Grants verified lately, by the BLAKE3 hash of their bytes.
    verified: Mutex<macula_wire::ttl_cache::TtlCache<[u8; 32], Arc<PeerGrant>, std::time::Instant>>,
}

/// Why this node's own grant cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this node's grant is not valid for the realm: {0}")]
pub struct OwnGrantError(pub GrantError);

impl Authz {
    /// The realm of `admission` for node `me`, at `now_ms` (unix ms). Its
    /// own grant must verify and name it; one that does not is kept out
    /// (this node may then do nothing itself, and peers refuse it), and
    /// why is in [`Authz::own_error`], logged at start.
    pub fn new(
        admission: &Admission,
        me: NodeId,
        now_ms: u64,
        counters: Arc<RealmCounters>,
    ) -> Authz {
        let skew_ms = admission.clock_skew.as_millis() as u64;
        let own = admission.grant.as_ref().map(|bytes| {
            let v = Grant::from_bytes(bytes)
                .and_then(|g| {
                    g.verify(
                        &admission.authority,
                        now_ms,
                        skew_ms,
                        &Revocations::default(),
                    )
                })
                .map_err(OwnGrantError)?;
            if v.subject() != Subject::Node(me) {
                return Err(OwnGrantError(GrantError::WrongSubject {
                    found: v.subject(),
                    presented: Subject::Node(me),
                }));
            }
            Ok(PeerGrant::new(v))
        });
        let (own, own_error) = match own {
            None => (None, None),
            Some(Ok(g)) => (Some(g), None),
            Some(Err(e)) => (None, Some(e)),
        };
        Authz {
            authority: admission.authority,
            skew_ms,
            own,
            own_error,
            revoked: RwLock::new(Arc::new(Revoked::default())),
            counters,
            trail: std::sync::OnceLock::new(),
            verified: Mutex::new(macula_wire::ttl_cache::TtlCache::new(VERIFIED_GRANTS)),
        }
    }

    /// Denials go to `trail` from now on.
    pub fn set_trail(&self, trail: Arc<AuditTrail>) {
        let _ = self.trail.set(trail);
    }

    /// A lightweight client's own view of its grant, decoded but not
    /// verified (a client knows no authority key): only [`Authz::local`]
    /// is meaningful, so the client refuses itself what its gateway would
    /// refuse, with the same error, instead of sending it.
    pub fn for_client(grant: &[u8], counters: Arc<RealmCounters>) -> Result<Authz, GrantError> {
        let g = Grant::from_bytes(grant)?;
        let v = g.unverified()?;
        Ok(Authz {
            authority: v.body.realm,
            skew_ms: 0,
            own: Some(PeerGrant::new(v)),
            own_error: None,
            revoked: RwLock::new(Arc::new(Revoked::default())),
            counters,
            trail: std::sync::OnceLock::new(),
            verified: Mutex::new(macula_wire::ttl_cache::TtlCache::new(0)),
        })
    }

    /// Why this node's own grant was not taken, if it was not.
    pub fn own_error(&self) -> Option<&OwnGrantError> {
        self.own_error.as_ref()
    }

    pub fn authority(&self) -> &Key {
        &self.authority
    }

    pub fn counters(&self) -> &Arc<RealmCounters> {
        &self.counters
    }

    /// This node's own grant, if it has one.
    pub fn own(&self) -> Option<&PeerGrant> {
        self.own.as_ref()
    }

    /// Verifies a grant for this realm at `now_ms` against the current
    /// revocations, whoever its subject (an API key's grant).
    pub fn verify(&self, grant: &[u8], now_ms: u64) -> Result<Verified, GrantError> {
        let g = Grant::from_bytes(grant)?;
        g.verify(&self.authority, now_ms, self.skew_ms, &self.revoked().list)
    }

    /// Verifies the grant a peer presented for the node ID it proved
    /// (`Subject::Node`), against the current revocations. A grant seen
    /// before (same bytes, within [`VERIFIED_TTL`]) is not verified and
    /// compiled again: its validity window, subject and revocation are
    /// checked, and its compiled policy (with its decision cache) shared.
    pub fn admit(
        &self,
        proved: NodeId,
        grant: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<Arc<PeerGrant>, GrantError> {
        let Some(bytes) = grant else {
            return Err(GrantError::Decode("HELLO carried no grant".into()));
        };
        let key = *blake3::hash(bytes).as_bytes();
        let now = std::time::Instant::now();
        let seen = self.verified.lock().get(&key, now).cloned();
        let g = match seen {
            Some(g) => {
                g.verified.check_time(now_ms, self.skew_ms)?;
                let revoked = self.revoked();
                if revoked.list.revokes_verified(&g.verified) {
                    return Err(GrantError::Revoked {
                        version: revoked.list.version,
                    });
                }
                g
            }
            None => {
                let g = Arc::new(PeerGrant::new(self.verify(bytes, now_ms)?));
                self.verified
                    .lock()
                    .insert(key, g.clone(), now + VERIFIED_TTL, now);
                g
            }
        };
        if g.subject() != Subject::Node(proved) {
            return Err(GrantError::WrongSubject {
                found: g.subject(),
                presented: Subject::Node(proved),
            });
        }
        Ok(g)
    }

    /// Whether this node's own application may do `action` on `resource`.
    pub fn local(&self, action: Action, resource: &str) -> Result<(), Denied> {
        self.check(self.own.as_ref(), "this node", action, resource)
    }

    /// Whether the principal holding `grant` may do `action` on
    /// `resource` itself (a gateway's client; this node's application).
    pub fn check(
        &self,
        grant: Option<&PeerGrant>,
        principal: impl std::fmt::Display,
        action: Action,
        resource: &str,
    ) -> Result<(), Denied> {
        self.counters.decisions_total.inc();
        let outcome = match grant {
            None => Err(("no_grant", "it holds no grant".to_string())),
            Some(g) => g.decide(action, resource),
        };
        outcome.map_err(|(kind, reason)| self.denied(principal, action, resource, kind, reason))
    }

    /// Whether a peer may hand over (or be handed) `action` on `resource`:
    /// for itself, or as a carrier of others' traffic (`relay`).
    pub fn check_peer(
        &self,
        grant: Option<&PeerGrant>,
        peer: NodeId,
        action: Action,
        resource: &str,
    ) -> Result<(), Denied> {
        self.counters.decisions_total.inc();
        let Some(g) = grant else {
            return Err(self.denied(
                peer,
                action,
                resource,
                "no_grant",
                "it holds no grant".into(),
            ));
        };
        match g.decide(action, resource) {
            Ok(()) => Ok(()),
            Err(first) => match g.decide(Action::Relay, resource) {
                Ok(()) => Ok(()),
                Err(_) => Err(self.denied(peer, action, resource, first.0, first.1)),
            },
        }
    }

    fn denied(
        &self,
        principal: impl std::fmt::Display,
        action: Action,
        resource: &str,
        kind: &'static str,
        reason: String,
    ) -> Denied {
        if let Some(i) = Action::ALL.iter().position(|a| *a == action) {
            self.counters.denied.at(i).inc();
        }
        let d = Denied {
            principal: principal.to_string(),
            action,
            resource: resource.to_string(),
            kind,
            reason,
        };
        if let Some(t) = self.trail.get() {
            let key = format!("{} {} {}", d.principal, d.action, d.resource);
            t.record("denied", &key, || d.to_string());
        }
        d
    }

    /// The revocation list held now.
    pub fn revoked(&self) -> Arc<Revoked> {
        self.revoked.read().clone()
    }

    /// Whether a grant admitted earlier is revoked by the list held now.
    pub fn is_revoked(&self, g: &PeerGrant) -> bool {
        self.revoked().list.revokes_verified(&g.verified)
    }

    /// Whether a grant admitted earlier has expired at `now_ms`.
    pub fn is_expired(&self, g: &PeerGrant, now_ms: u64) -> bool {
        now_ms >= g.expires_ms().saturating_add(self.skew_ms)
    }

    /// Takes a signed revocation list: adopted when it verifies for this
    /// realm and is newer than the one held.
    pub fn install(&self, bytes: &[u8]) -> Result<Installed, RevocationError> {
        let c = &self.counters.revocation_lists;
        let verified = RevocationList::from_bytes(bytes).and_then(|l| l.verify(&self.authority));
        let list = match verified {
            Ok(l) => l,
            Err(e) => {
                c.at(2).inc();
                return Err(e);
            }
        };
        let mut held = self.revoked.write();
        if !held.list.is_older_than(&list) {
            c.at(1).inc();
            return Ok(Installed::Stale {
                have: held.list.version,
            });
        }
        let version = list.version;
        *held = Arc::new(Revoked {
            list,
            bytes: bytes.to_vec(),
        });
        c.at(0).inc();
        self.counters.revocations_version.set(version as i64);
        Ok(Installed::Adopted { version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use macula_auth::{policy::parse_rules, sign, GrantBody, RevocationBody};

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn grant(auth: &SigningKey, who: NodeId, id: u8, rules: &str) -> Vec<u8> {
        let body = GrantBody {
            realm: Key::of(auth),
            issuer: Key::of(auth),
            id: [id; 16],
            subject: Subject::Node(who),
            rules: parse_rules(rules).expect("rules"),
            roles: vec![],
            not_before_ms: 0,
            expires_ms: 10_000,
        };
        Grant {
            grant: sign(&body, auth).expect("sign"),
            signer: None,
        }
        .to_bytes()
        .expect("encode")
    }

    fn authz(own: Option<Vec<u8>>) -> Authz {
        let mut a = Admission::new(Key::of(&key(1)), own);
        a.clock_skew = std::time::Duration::ZERO;
        let z = Authz::new(&a, node(9), 5, Arc::default());
        assert_eq!(z.own_error(), None);
        z
    }

    fn revocations(version: u64, grants: Vec<[u8; 16]>) -> Vec<u8> {
        RevocationList::sign(
            &RevocationBody {
                realm: Key::of(&key(1)),
                version,
                issued_ms: 0,
                grants,
                subjects: vec![],
            },
            &key(1),
        )
        .expect("sign")
        .to_bytes()
        .expect("encode")
    }

    #[test]
    fn own_grant_must_name_this_node() {
        let mut a = Admission::new(
            Key::of(&key(1)),
            Some(grant(&key(1), node(8), 1, "allow publish a")),
        );
        a.clock_skew = std::time::Duration::ZERO;
        let z = Authz::new(&a, node(9), 5, Arc::default());
        assert_eq!(z.own_error().map(|e| e.0.kind()), Some("wrong_subject"));
        assert!(z.own().is_none());
        assert_eq!(
            z.local(Action::Publish, "a").expect_err("no grant").kind,
            "no_grant"
        );
        // Expired.
        let z = Authz::new(
            &Admission {
                grant: Some(grant(&key(1), node(9), 1, "allow publish a")),
                ..a
            },
            node(9),
            20_000,
            Arc::default(),
        );
        assert_eq!(z.own_error().map(|e| e.0.kind()), Some("expired"));
    }

    #[test]
    fn local_and_peer_decisions_count_denials() {
        let z = authz(Some(grant(&key(1), node(9), 1, "allow publish orders.*")));
        assert!(z.local(Action::Publish, "orders.x").is_ok());
        let d = z.local(Action::Publish, "payments.x").expect_err("denied");
        assert_eq!((d.kind, d.action), ("not_allowed", Action::Publish));
        assert!(d.to_string().contains("payments.x"), "{d}");
        assert!(z.local(Action::Subscribe, "orders.*").is_err());
        assert_eq!(z.counters().denied.at(0).get(), 1);
        assert_eq!(z.counters().denied.at(1).get(), 1);
        // No grant at all: nothing is allowed.
        let bare = authz(None);
        assert_eq!(
            bare.local(Action::Publish, "orders.x")
                .expect_err("no grant")
                .kind,
            "no_grant"
        );
        // A peer with `relay` carries what it may not do itself.
        let g = z
            .admit(
                node(3),
                Some(&grant(&key(1), node(3), 2, "allow relay orders.**")),
                5,
            )
            .expect("admit");
        assert!(z
            .check_peer(Some(&g), node(3), Action::Publish, "orders.a.b")
            .is_ok());
        assert!(z
            .check(Some(&g), node(3), Action::Publish, "orders.a.b")
            .is_err());
        let d = z
            .check_peer(Some(&g), node(3), Action::Call, "payments.pay")
            .expect_err("denied");
        assert_eq!(d.principal, node(3).to_string());
        assert!(z.check_peer(None, node(3), Action::Call, "a").is_err());
        // A malformed resource is refused, not allowed.
        assert_eq!(
            z.check_peer(Some(&g), node(3), Action::Publish, "orders..x")
                .expect_err("bad")
                .kind,
            "invalid_resource"
        );
    }

    #[test]
    fn admission_checks_subject_and_revocations() {
        let z = authz(None);
        let g = grant(&key(1), node(3), 7, "allow publish a");
        assert!(z.admit(node(3), Some(&g), 5).is_ok());
        assert_eq!(
            z.admit(node(4), Some(&g), 5).expect_err("subject").kind(),
            "wrong_subject"
        );
        assert!(z.admit(node(3), None, 5).is_err());
        let admitted = z.admit(node(3), Some(&g), 5).expect("admit");
        assert!(!z.is_revoked(&admitted));
        assert!(!z.is_expired(&admitted, 9_999));
        assert!(z.is_expired(&admitted, 10_000));
        // Seen before: not verified again, but still checked in time.
        assert!(Arc::ptr_eq(
            &admitted,
            &z.admit(node(3), Some(&g), 6).expect("cached")
        ));
        assert_eq!(
            z.admit(node(3), Some(&g), 10_000)
                .expect_err("expired")
                .kind(),
            "expired"
        );
        // A newer list is adopted, an older or equal one ignored, a forged
        // one refused.
        assert_eq!(
            z.install(&revocations(2, vec![[7; 16]])),
            Ok(Installed::Adopted { version: 2 })
        );
        assert_eq!(
            z.install(&revocations(2, vec![])),
            Ok(Installed::Stale { have: 2 })
        );
        assert_eq!(
            z.install(&revocations(1, vec![])),
            Ok(Installed::Stale { have: 2 })
        );
        assert!(z.install(b"junk").is_err());
        assert!(z.is_revoked(&admitted));
        assert_eq!(
            z.admit(node(3), Some(&g), 5).expect_err("revoked").kind(),
            "revoked"
        );
        assert_eq!(z.counters().revocations_version.get(), 2);
        assert_eq!(
            [0, 1, 2].map(|i| z.counters().revocation_lists.at(i).get()),
            [1, 2, 1]
        );
    }
}
