//! The realm's admin endpoints (issue 18):
//!
//! | route | answer |
//! |---|---|
//! | `GET /admin/realm` | [`RealmReport`]: the authority, this node's grant, the revocation list held, decisions and denials |
//! | `POST /admin/realm/revocations` | body: a signed revocation list (the bytes `macula realm revoke` writes); adopted when newer ([`RevocationsReport`]), 400 `realm.invalid_revocations` when it does not verify, 409 `realm.open` in an open realm |
//! | `GET /admin/realm/keys` | [`crate::e2e::KeysReport`]: the end-to-end key set held (issue 19): each pattern's key generations, whether this node holds each, the patterns due for rotation, and the signed set itself |
//! | `POST /admin/realm/keys` | body: a signed key set (what `macula keys rotate` makes); adopted when newer and spread ([`RevocationsReport`]), 400 `realm.invalid_keys` when it does not verify, 409 `realm.open` in an open realm |
//!
//! A revocation list carries the authority's signature, so the node trusts
//! the list, not whoever posts it; the body is bounded by the wire limit
//! (`MAX_REVOCATIONS_LEN`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{error_kind, AdminState};
use crate::authz::Installed;
use crate::realm::RealmError;

/// `GET /admin/realm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RealmReport {
    pub node_id: String,
    pub realm: String,
    /// The authority's key; `None`: an open realm (nothing is checked).
    pub authority: Option<String>,
    /// This node's own grant: subject, serial (hex), roles, rules, expiry.
    pub grant: Option<GrantReport>,
    /// Why this node's own grant was not taken (it may then do nothing
    /// itself, and the realm's nodes refuse it).
    pub grant_error: Option<String>,
    /// Version of the revocation list held (0: none).
    pub revocations_version: u64,
    /// Serials and principals it revokes.
    pub revoked: usize,
    /// Permission decisions taken and refused since start.
    pub decisions: u64,
    pub denied: u64,
}

/// A grant, as `/admin/realm` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GrantReport {
    pub subject: String,
    pub serial: String,
    pub roles: Vec<String>,
    pub rules: Vec<String>,
    pub expires_ms: u64,
}

/// `POST /admin/realm/revocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RevocationsReport {
    /// `adopted` or `stale` (not newer than the one held).
    pub outcome: String,
    /// The version held after the request.
    pub version: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) async fn status(State(s): State<AdminState>) -> Json<RealmReport> {
    let node = &s.node;
    let realm = node.realm_service();
    let c = realm.counters();
    let authz = realm.authz();
    let held = authz.map(|a| a.revoked());
    Json(RealmReport {
        node_id: node.node_id().to_string(),
        realm: node.realm().to_string(),
        authority: authz.map(|a| a.authority().to_string()),
        grant: authz.and_then(|a| a.own()).map(|g| {
            let b = &g.verified().body;
            GrantReport {
                subject: b.subject.to_string(),
                serial: hex(&b.id),
                roles: b.roles.clone(),
                rules: b.rules.iter().map(|r| r.to_string()).collect(),
                expires_ms: g.expires_ms(),
            }
        }),
        grant_error: authz.and_then(|a| a.own_error()).map(|e| e.to_string()),
        revocations_version: held.as_ref().map_or(0, |h| h.list.version),
        revoked: held.as_ref().map_or(0, |h| h.list.len()),
        decisions: c.decisions_total.get(),
        denied: (0..macula_auth::Action::ALL.len())
            .map(|i| c.denied.at(i).get())
            .sum(),
    })
}

pub(super) async fn revocations(State(s): State<AdminState>, body: Bytes) -> Response {
    if body.len() > macula_wire::MAX_REVOCATIONS_LEN {
        return error_kind(
            StatusCode::PAYLOAD_TOO_LARGE,
            "realm.too_large",
            format!(
                "a revocation list of {} bytes is over the limit of {}",
                body.len(),
                macula_wire::MAX_REVOCATIONS_LEN
            ),
        );
    }
    match s.node.realm_service().install(&body) {
        Ok(Installed::Adopted { version }) => Json(RevocationsReport {
            outcome: "adopted".into(),
            version,
        })
        .into_response(),
        Ok(Installed::Stale { have }) => Json(RevocationsReport {
            outcome: "stale".into(),
            version: have,
        })
        .into_response(),
        Err(e @ RealmError::Open) => error_kind(StatusCode::CONFLICT, "realm.open", e.to_string()),
        Err(e @ RealmError::Invalid(_)) => error_kind(
            StatusCode::BAD_REQUEST,
            "realm.invalid_revocations",
            e.to_string(),
        ),
    }
}

pub(super) async fn keys(State(s): State<AdminState>) -> Response {
    Json(s.node.realm_service().e2e().report()).into_response()
}

pub(super) async fn install_keys(State(s): State<AdminState>, body: Bytes) -> Response {
    if body.len() > macula_wire::MAX_REVOCATIONS_LEN {
        return error_kind(
            StatusCode::PAYLOAD_TOO_LARGE,
            "realm.too_large",
            format!(
                "a key set of {} bytes is over the limit of {}",
                body.len(),
                macula_wire::MAX_REVOCATIONS_LEN
            ),
        );
    }
    match s.node.realm_service().install_keys(&body, None) {
        Ok(Installed::Adopted { version }) => Json(RevocationsReport {
            outcome: "adopted".into(),
            version,
        })
        .into_response(),
        Ok(Installed::Stale { have }) => Json(RevocationsReport {
            outcome: "stale".into(),
            version: have,
        })
        .into_response(),
        Err(e @ crate::e2e::E2eError::Open) => {
            error_kind(StatusCode::CONFLICT, "realm.open", e.to_string())
        }
        Err(e @ crate::e2e::E2eError::Invalid(_)) => {
            error_kind(StatusCode::BAD_REQUEST, "realm.invalid_keys", e.to_string())
        }
    }
}
