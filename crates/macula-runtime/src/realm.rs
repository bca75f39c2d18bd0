//! The realm service (issue 18): spreads the realm's signed revocation list
//! through the mesh and closes the connections of principals whose grant
//! was revoked or has expired.
//!
//! **Spreading:** a list reaches a node from the admin API
//! (`POST /admin/realm/revocations`), from `--revocations FILE` or the copy
//! kept in the data directory at start, or from a peer (`REVOCATIONS` on
//! the control stream). A list that verifies under the realm's authority
//! and is newer than the one held is adopted, saved to the data directory,
//! and sent to every other full-node peer; every node sends the list it
//! holds to each full node that connects, so a node that was away catches
//! up at its next connection. A peer that sends an older list gets ours
//! back. Equal versions stop the flood.
//!
//! **Closing:** when a list is adopted, every connection whose grant it
//! revokes is closed at once (DISCONNECT `unauthorized`), clients included;
//! a sweep every [`SWEEP_INTERVAL`] closes those whose grant expired (and
//! any a race let in). A revoked principal is thus gone from every node
//! within one flood (one round trip per hop) of the list's arrival.
//!
//! In an open realm (no authority) the service only refuses `REVOCATIONS`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use macula_wire::{DisconnectReason, ErrorCode, Message, MessageType, NodeId};
use tokio::sync::watch;

use crate::authz::{AuditTrail, Authz, Installed, RealmCounters};
use crate::peer::{unix_ms, Peer};
use crate::service::{Answer, Serves, Service};

/// How often expired grants are looked for.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The file in the data directory holding the last adopted list.
pub const REVOCATIONS_FILE: &str = "revocations";

/// Every pooled connection (given by the node).
pub(crate) type PeerList = Box<dyn Fn() -> Vec<Peer> + Send + Sync>;

/// The realm service. Cheap to clone.
#[derive(Clone)]
pub struct Realm(Arc<Inner>);

struct Inner {
    authz: Option<Arc<Authz>>,
    trail: Arc<AuditTrail>,
    counters: Arc<RealmCounters>,
    peers: PeerList,
    /// Where the adopted list is kept (`None`: an ephemeral node).
    dir: Option<PathBuf>,
    /// The realm's end-to-end key set (spread like the list).
    e2e: Arc<crate::e2e::E2e>,
}

impl std::fmt::Debug for Realm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Realm")
            .field("authority", &self.0.authz.as_ref().map(|a| *a.authority()))
            .finish()
    }
}

/// Why a revocation list was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RealmError {
    #[error("this realm has no authority: there is nothing to revoke")]
    Open,
    #[error(transparent)]
    Invalid(#[from] macula_auth::RevocationError),
}

impl Realm {
    pub(crate) fn new(
        authz: Option<Arc<Authz>>,
        counters: Arc<RealmCounters>,
        trail: Arc<AuditTrail>,
        peers: PeerList,
        dir: Option<PathBuf>,
        e2e: Arc<crate::e2e::E2e>,
    ) -> Realm {
        Realm(Arc::new(Inner {
            authz,
            trail,
            counters,
            peers,
            dir,
            e2e,
        }))
    }

    /// The realm's end-to-end keys as this node holds them.
    pub fn e2e(&self) -> &Arc<crate::e2e::E2e> {
        &self.0.e2e
    }

    /// Takes a signed end-to-end key set (from the admin API or a peer
    /// `from`): when newer, adopts it, keeps it and passes it on to every
    /// other peer, clients included (they seal and open at their edge).
    pub fn install_keys(
        &self,
        bytes: &[u8],
        from: Option<NodeId>,
    ) -> Result<Installed, crate::e2e::E2eError> {
        let outcome = self.0.e2e.install(bytes)?;
        if let Installed::Adopted { version } = outcome {
            tracing::info!(version, from = ?from, "realm end-to-end key set adopted");
            self.0.trail.record("keyset", &version.to_string(), || {
                let by = from.map_or("the admin API or a file".to_string(), |f| {
                    format!("node {f}")
                });
                format!("end-to-end key set version {version} adopted, from {by}")
            });
            let msg = Message::RealmKeys(macula_wire::message::RealmKeys {
                set: bytes.to_vec(),
            });
            for p in (self.0.peers)() {
                if Some(p.node_id()) == from || p.is_closed() {
                    continue;
                }
                send(p, msg.clone(), &self.0.counters);
            }
        }
        Ok(outcome)
    }

    /// The realm's permissions; `None` in an open realm.
    pub fn authz(&self) -> Option<&Arc<Authz>> {
        self.0.authz.as_ref()
    }

    pub fn counters(&self) -> &Arc<RealmCounters> {
        &self.0.counters
    }

    /// Loads the list kept in the data directory (a node restarting keeps
    /// what it knew), then `extra` (from `--revocations FILE`).
    pub(crate) fn load(&self, extra: Option<&[u8]>) {
        let kept = self
            .0
            .dir
            .as_ref()
            .and_then(|d| std::fs::read(d.join(REVOCATIONS_FILE)).ok());
        for (what, bytes) in [
            ("data directory", kept.as_deref()),
            ("--revocations", extra),
        ] {
            let Some(bytes) = bytes else { continue };
            match self.install(bytes) {
                Ok(Installed::Adopted { version }) => {
                    tracing::info!(version, from = what, "realm revocation list loaded")
                }
                Ok(Installed::Stale { .. }) => {}
                Err(e) => tracing::warn!(from = what, error = %e, "realm revocation list refused"),
            }
        }
    }

    /// Takes a signed revocation list (from the admin API, a file or a
    /// peer `from`): when newer, adopts it, keeps it, passes it on and
    /// closes the revoked connections.
    pub fn install(&self, bytes: &[u8]) -> Result<Installed, RealmError> {
        self.install_from(bytes, None)
    }

    fn install_from(&self, bytes: &[u8], from: Option<NodeId>) -> Result<Installed, RealmError> {
        let authz = self.0.authz.as_ref().ok_or(RealmError::Open)?;
        let outcome = authz.install(bytes)?;
        if let Installed::Adopted { version } = outcome {
            tracing::info!(version, from = ?from, "realm revocation list adopted");
            let n = authz.revoked().list.len();
            self.0
                .trail
                .record("revocations", &version.to_string(), || {
                    let by = from.map_or("the admin API or a file".to_string(), |f| {
                        format!("node {f}")
                    });
                    format!("revocation list version {version} adopted ({n} entries), from {by}")
                });
            self.keep(bytes);
            let peers = (self.0.peers)();
            self.close_revoked(authz, &peers);
            let msg = Message::Revocations(macula_wire::message::Revocations {
                list: bytes.to_vec(),
            });
            for p in peers {
                if Some(p.node_id()) == from || p.is_client() || p.is_closed() {
                    continue;
                }
                send(p, msg.clone(), &self.0.counters);
            }
        }
        Ok(outcome)
    }

    /// Saves the adopted list in the data directory (through a rename).
    fn keep(&self, bytes: &[u8]) {
        let Some(dir) = &self.0.dir else { return };
        let path = dir.join(REVOCATIONS_FILE);
        let tmp = dir.join(format!("{REVOCATIONS_FILE}.tmp"));
        let saved = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = saved {
            tracing::warn!(path = %path.display(), error = %e, "could not keep the realm revocation list");
        }
    }

    /// Closes every connection whose grant the held list revokes.
    fn close_revoked(&self, authz: &Authz, peers: &[Peer]) {
        let version = authz.revoked().list.version;
        for p in peers {
            let revoked = p.grant().is_some_and(|g| authz.is_revoked(g));
            if revoked && !p.is_closed() {
                self.0.counters.closed.at(0).inc();
                tracing::info!(peer = %p.node_id(), version, "closing a connection: its grant was revoked");
                let id = p.node_id();
                self.0.trail.record("revoked_closed", &id.to_string(), || {
                    format!("closed the connection of node {id}: grant revoked (list version {version})")
                });
                let p = p.clone();
                tokio::spawn(async move {
                    let why = format!("your grant was revoked (revocation list version {version})");
                    p.disconnect(DisconnectReason::Unauthorized, &why).await;
                });
            }
        }
    }

    /// Closes connections whose grant expired; then again every
    /// [`SWEEP_INTERVAL`] until `shutdown`.
    pub(crate) async fn sweep(self, mut shutdown: watch::Receiver<bool>) {
        let Some(authz) = self.0.authz.clone() else {
            return;
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(SWEEP_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let now = unix_ms();
            let peers = (self.0.peers)();
            for p in &peers {
                let expired = p.grant().is_some_and(|g| authz.is_expired(g, now));
                if expired && !p.is_closed() {
                    self.0.counters.closed.at(1).inc();
                    tracing::info!(peer = %p.node_id(), "closing a connection: its grant expired");
                    let id = p.node_id();
                    self.0.trail.record("expired_closed", &id.to_string(), || {
                        format!("closed the connection of node {id}: grant expired")
                    });
                    let p = p.clone();
                    tokio::spawn(async move {
                        p.disconnect(DisconnectReason::Unauthorized, "your grant expired")
                            .await;
                    });
                }
            }
            self.close_revoked(&authz, &peers);
        }
    }
}

/// Sends the list `msg` to `p` in a task of its own (never blocks the
/// caller); a list over the peer's frame limit is not sent, said and
/// counted.
fn send(p: Peer, msg: Message, counters: &RealmCounters) {
    let size = match &msg {
        Message::Revocations(r) => r.list.len(),
        Message::RealmKeys(k) => k.set.len(),
        _ => 0,
    };
    // The body's MessagePack framing adds a few bytes to the list.
    if size + 64 > p.hello().max_frame_size as usize {
        match &msg {
            Message::RealmKeys(_) => {
                counters.keysets.at(3).inc();
            }
            _ => {
                counters.revocation_lists.at(3).inc();
            }
        }
        tracing::warn!(peer = %p.node_id(), size, limit = p.hello().max_frame_size, "the realm revocation list is over the peer's frame limit; not sent (the peer can take it from the admin API or --revocations)");
        return;
    }
    tokio::spawn(async move {
        if let Err(e) = p.send(&msg).await {
            tracing::debug!(peer = %p.node_id(), error = %e, "could not send the realm revocation list");
        }
    });
}

/// REVOCATIONS on the control stream; the held list to each full node
/// that connects.
impl Service for Realm {
    fn name(&self) -> &'static str {
        "realm"
    }

    fn serves(&self) -> Serves {
        Serves {
            messages: &[MessageType::Revocations, MessageType::RealmKeys],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        if let Message::RealmKeys(k) = &msg {
            return self.on_keys(peer, &k.set);
        }
        let Message::Revocations(r) = msg else {
            return Answer::Refuse {
                code: ErrorCode::UnexpectedMessage,
                reason: format!("{} is not the realm's", msg.msg_type().name()),
            };
        };
        if peer.is_client() {
            return Answer::Refuse {
                code: ErrorCode::Unauthorized,
                reason: "a client does not spread revocation lists".into(),
            };
        }
        match self.install_from(&r.list, Some(peer.node_id())) {
            Ok(Installed::Adopted { .. }) => Answer::Done,
            Ok(Installed::Stale { have }) => {
                // The peer is behind: it gets ours (equal versions end here).
                if let Some(a) = &self.0.authz {
                    let held = a.revoked();
                    if have > 0 && !held.bytes.is_empty() {
                        let theirs = macula_auth::RevocationList::from_bytes(&r.list)
                            .and_then(|l| l.body())
                            .map(|b| b.version)
                            .unwrap_or(0);
                        if theirs < have {
                            return Answer::Reply(Message::Revocations(
                                macula_wire::message::Revocations {
                                    list: held.bytes.clone(),
                                },
                            ));
                        }
                    }
                }
                Answer::Done
            }
            Err(RealmError::Open) => Answer::Refuse {
                code: ErrorCode::UnexpectedMessage,
                reason: RealmError::Open.to_string(),
            },
            Err(e) => Answer::Refuse {
                code: ErrorCode::Unauthorized,
                reason: e.to_string(),
            },
        }
    }

    fn peer_up(&self, peer: &Peer) {
        let Some(authz) = &self.0.authz else { return };
        let keys = self.0.e2e.held_bytes();
        if !keys.is_empty() {
            send(
                peer.clone(),
                Message::RealmKeys(macula_wire::message::RealmKeys { set: keys }),
                &self.0.counters,
            );
        }
        // Admitted against an older list while a newer one came in.
        self.close_revoked(authz, std::slice::from_ref(peer));
        let held = authz.revoked();
        if !peer.is_client() && !held.bytes.is_empty() {
            send(
                peer.clone(),
                Message::Revocations(macula_wire::message::Revocations {
                    list: held.bytes.clone(),
                }),
                &self.0.counters,
            );
        }
    }
}

impl Realm {
    /// REALM_KEYS from a full node: adopted and passed on when newer; a
    /// peer behind gets ours back.
    fn on_keys(&self, peer: &Peer, set: &[u8]) -> Answer {
        if peer.is_client() {
            return Answer::Refuse {
                code: ErrorCode::Unauthorized,
                reason: "a client does not spread key sets".into(),
            };
        }
        match self.install_keys(set, Some(peer.node_id())) {
            Ok(Installed::Adopted { .. }) => Answer::Done,
            Ok(Installed::Stale { have }) => {
                let theirs = macula_auth::keys::KeySet::from_bytes(set)
                    .and_then(|s| s.body())
                    .map(|b| b.version)
                    .unwrap_or(0);
                if theirs < have {
                    return Answer::Reply(Message::RealmKeys(macula_wire::message::RealmKeys {
                        set: self.0.e2e.held_bytes(),
                    }));
                }
                Answer::Done
            }
            Err(crate::e2e::E2eError::Open) => Answer::Refuse {
                code: ErrorCode::UnexpectedMessage,
                reason: crate::e2e::E2eError::Open.to_string(),
            },
            Err(e) => Answer::Refuse {
                code: ErrorCode::Unauthorized,
                reason: e.to_string(),
            },
        }
    }
}
