//! The Raft endpoints of the admin API: the groups this node is a member
//! of, their consistent key-value store, compare-and-swap, membership
//! changes and a long-poll watch. They act through this node's own member
//! of the group (`NodeRuntime::raft`): writes, linearizable reads and
//! membership changes are forwarded to the leader like any other request.
//!
//! | route | answer |
//! |---|---|
//! | `GET /admin/raft` | [`RaftReport`]: every group this node runs |
//! | `GET /admin/raft/{group}` | [`RaftGroupReport`] (also `GET .../members`) |
//! | `POST /admin/raft/{group}/members` | JSON [`MembersRequest`]; answers the [`RaftGroupReport`] after the change |
//! | `GET /admin/raft/{group}/kv/{key}` | [`KvGetReport`]; linearizable, `?stale=true` reads this member's state |
//! | `GET /admin/raft/{group}/kv?prefix=P&limit=N` | [`KvListReport`]: keys under `P` in key order (`limit` 1..10000, default 100; `stale` as above) |
//! | `PUT /admin/raft/{group}/kv/{key}` | body = the value (raw bytes); `?lease=ID` attaches the key to a lease; [`KvWriteReport`] |
//! | `DELETE /admin/raft/{group}/kv/{key}` | `?prefix=true` deletes every key starting with `key`; [`KvWriteReport`] with `deleted` |
//! | `POST /admin/raft/{group}/cas` | JSON [`CasRequest`]; [`CasReport`], 200 when swapped, 409 when the comparison failed |
//! | `GET /admin/raft/{group}/watch?prefix=P&from=REV&wait_ms=MS` | long poll: [`WatchReport`] |
//!
//! **Keys and values.** In a URL, a key (path) or prefix (query) is
//! percent-encoded bytes: any byte sequence can be addressed. A `PUT` body is
//! the value's raw bytes. In JSON, every key and value that is valid UTF-8 is
//! a string field (`key`, `value`); one that is not is given instead as
//! standard base64 with padding in a `_base64` field (`key_base64`,
//! `value_base64`), the other field being absent. Requests ([`CasRequest`])
//! accept either form.
//!
//! **Watch (long poll).** `from` is the first revision wanted (`0` or absent:
//! changes after the current revision). The answer lists the changes under
//! `prefix` with a revision `>= from`, as soon as there is at least one, or
//! an empty list once `wait_ms` (default 10000, at most 25000, `0`: answer at
//! once) has passed; at most 1000 events, never splitting a revision. Pass
//! the answer's `next` as `from` of the next poll to see every change exactly
//! once. Events come from this member's state machine (what it has applied).
//! A `from` older than the history the member keeps is `410 Gone`: re-read
//! with `GET .../kv?prefix=` and watch from its `revision + 1`.
//!
//! **Errors** are an [`ErrorReport`] whose `kind` names the cause: the
//! `GroupError` as `raft.no_leader` (503), `raft.uncertain` (504: a write
//! may or may not have been applied), `raft.kv` (400 bad key, value or
//! lease; 404 missing lease; 409 lease exists; 410 compacted; 507 group
//! full), `raft.membership` (409), `raft.no_lease` (404), `raft.stopped`
//! (503), `raft.store` (500); or `raft.no_group` (404: this node is not a
//! member), `raft.no_key` (404), `raft.cas_failed` (409, in a
//! [`CasReport`]), `raft.timeout` (504: no answer within
//! [`RAFT_ADMIN_DEADLINE`]), `bad_request` (400, 415 without a JSON content
//! type).
//!
//! These are the only admin endpoints that change state. Like the rest of
//! the API they have no authentication (the admin address is loopback by
//! default). A web page cannot use them from a browser: `PUT` and `DELETE`
//! need a CORS preflight the server never grants, and `POST` requires
//! `Content-Type: application/json`, which a cross-origin form cannot send.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use macula_raft::{Event, Expect, KeyValue, KvError, Request, Response as KvResponse};
use macula_wire::NodeId;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::{error_kind, AdminState};

/// An error answer, not yet rendered (small, unlike a `Response`).
#[derive(Debug)]
pub(super) struct Refusal {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error_kind(self.status, self.kind, self.message)
    }
}

fn refusal(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        kind,
        message: message.into(),
    }
}
use crate::node::NodeRuntime;
use crate::raft::{Group, GroupError, ReadConsistency};

/// Longest time a Raft admin request may take (below the connection's
/// [`super::ADMIN_IDLE_TIMEOUT`]); beyond it the answer is `504
/// raft.timeout`. Group requests normally end sooner, at the node's
/// `raft_timeout`.
pub const RAFT_ADMIN_DEADLINE: Duration = Duration::from_secs(25);
/// Default and largest `limit` of `GET /admin/raft/{group}/kv`.
pub const KV_LIST_DEFAULT_LIMIT: usize = 100;
/// Largest `limit` of `GET /admin/raft/{group}/kv`.
pub const KV_LIST_MAX_LIMIT: usize = 10_000;
/// Default `wait_ms` of the watch long poll.
pub const WATCH_DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// Largest `wait_ms` of the watch long poll.
pub const WATCH_MAX_WAIT: Duration = Duration::from_secs(25);
/// Pause before a watch looks again after its event channel closed.
const CLOSED_PAUSE: Duration = Duration::from_millis(50);
/// Most events in one watch answer (a revision is never split, so one
/// answer may exceed it by the events of its last revision).
pub const WATCH_MAX_EVENTS: usize = 1000;

/// `GET /admin/raft`: the groups this node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RaftReport {
    pub node_id: String,
    /// By name.
    pub groups: Vec<RaftGroupReport>,
}

/// One group as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RaftGroupReport {
    pub name: String,
    /// The leader this member follows (itself included), if it knows one.
    pub leader: Option<String>,
    pub term: u64,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    /// This node leads the group.
    pub is_leader: bool,
    /// The revision of this member's state machine (what it has applied).
    pub revision: u64,
}

/// A key with its value and metadata. See the module docs for the
/// `key`/`key_base64` and `value`/`value_base64` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KvReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    pub lease: Option<u64>,
}

/// `GET /admin/raft/{group}/kv/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KvGetReport {
    pub group: String,
    /// The revision the read was served at.
    pub revision: u64,
    pub kv: KvReport,
}

/// `GET /admin/raft/{group}/kv?prefix=`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KvListReport {
    pub group: String,
    /// The revision the read was served at.
    pub revision: u64,
    pub kvs: Vec<KvReport>,
    /// More keys match than `limit`.
    pub more: bool,
}

/// `PUT` and `DELETE /admin/raft/{group}/kv/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KvWriteReport {
    pub group: String,
    /// The revision of the change (the unchanged current revision when a
    /// delete found nothing).
    pub revision: u64,
    /// Keys deleted (`DELETE` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<u64>,
}

/// `POST /admin/raft/{group}/cas`: set `key` to `value` if its current state
/// is as `expect`ed. `expect` is `absent`, `value` (with `expect_value` or
/// `expect_value_base64`), `mod_revision` (with `expect_mod_revision`; 0
/// means absent) or `version` (with `expect_version`; 0 means absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CasRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    pub expect: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_value_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_mod_revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// Attach the key to this lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
}

impl CasRequest {
    /// A request for `key` (text) expecting `expect` (see the type's docs)
    /// and setting `value`; fill in the `expect_*` field that goes with it.
    pub fn new(
        key: impl Into<String>,
        expect: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        CasRequest {
            key: Some(key.into()),
            expect: expect.into(),
            value: Some(value.into()),
            ..CasRequest::default()
        }
    }
}

/// The answer to a compare-and-swap: 200 with `succeeded` and the new
/// key-value in `current`, or 409 with the key as it is in `current`
/// (absent: the key does not exist) and `error`, `status`, `kind` as in
/// every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CasReport {
    pub group: String,
    pub succeeded: bool,
    /// The revision of the change, or the current revision on failure.
    pub revision: u64,
    pub current: Option<KvReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// `POST /admin/raft/{group}/members`: `op` is `add_learner`, `add_voter`
/// or `remove`; `node` a node ID in text form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MembersRequest {
    pub op: String,
    pub node: String,
}

impl MembersRequest {
    pub fn new(op: impl Into<String>, node: impl Into<String>) -> Self {
        MembersRequest {
            op: op.into(),
            node: node.into(),
        }
    }
}

/// One change in a [`WatchReport`]: `event` is `put` (with `kv`) or
/// `delete`; `key`/`key_base64` as in [`KvReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventReport {
    pub event: String,
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<KvReport>,
}

/// `GET /admin/raft/{group}/watch`: one long poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WatchReport {
    pub group: String,
    /// Changes in revision order (possibly none: the wait ended).
    pub events: Vec<EventReport>,
    /// The `from` of the next poll.
    pub next: u64,
    /// This member's revision when it answered.
    pub revision: u64,
}

/// `(text, base64)`: the bytes as a string when they are UTF-8, else as
/// base64.
fn text_or_base64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (None, Some(base64_encode(bytes))),
    }
}

fn kv_report(kv: &KeyValue) -> KvReport {
    let (key, key_base64) = text_or_base64(&kv.key);
    let (value, value_base64) = text_or_base64(&kv.value);
    KvReport {
        key,
        key_base64,
        value,
        value_base64,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

fn event_report(e: &Event) -> EventReport {
    let (key, key_base64) = text_or_base64(e.key());
    let (event, kv) = match e {
        Event::Put(kv) => ("put", Some(kv_report(kv))),
        Event::Delete { .. } => ("delete", None),
    };
    EventReport {
        event: event.to_string(),
        revision: e.revision(),
        key,
        key_base64,
        kv,
    }
}

fn group_report(g: &Group) -> RaftGroupReport {
    let s = g.leader_state();
    let ids = |v: &[NodeId]| v.iter().map(|id| id.to_string()).collect();
    RaftGroupReport {
        name: g.name().to_string(),
        leader: s.leader.map(|l| l.to_string()),
        term: s.term,
        voters: ids(&s.voters),
        learners: ids(&s.learners),
        is_leader: s.is_leader,
        revision: g.local_revision(),
    }
}

/// A key as text for messages (lossy, quoted).
fn show(key: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(key))
}

fn bad_request(message: impl Into<String>) -> Refusal {
    refusal(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// The HTTP answer to a failed group operation.
fn group_error(group: &str, e: &GroupError) -> Refusal {
    let (status, kind) = match e {
        GroupError::NoDataDir => (StatusCode::INTERNAL_SERVER_ERROR, "raft.no_data_dir"),
        GroupError::BadName(_) => (StatusCode::BAD_REQUEST, "raft.bad_name"),
        GroupError::TooManyGroups { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "raft.too_many_groups")
        }
        GroupError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "raft.store"),
        GroupError::NoLeader(_) => (StatusCode::SERVICE_UNAVAILABLE, "raft.no_leader"),
        GroupError::Uncertain { .. } => (StatusCode::GATEWAY_TIMEOUT, "raft.uncertain"),
        GroupError::Kv(k) => (kv_status(k), "raft.kv"),
        GroupError::Membership(_) => (StatusCode::CONFLICT, "raft.membership"),
        GroupError::Stopped(_) => (StatusCode::SERVICE_UNAVAILABLE, "raft.stopped"),
        GroupError::NoLease(_) => (StatusCode::NOT_FOUND, "raft.no_lease"),
        GroupError::NotLeader(_) => (StatusCode::SERVICE_UNAVAILABLE, "raft.not_leader"),
        GroupError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "raft.busy"),
    };
    refusal(status, kind, format!("group {group:?}: {e}"))
}

fn kv_status(e: &KvError) -> StatusCode {
    match e {
        KvError::EmptyKey
        | KvError::KeyTooLarge { .. }
        | KvError::ValueTooLarge { .. }
        | KvError::ReservedKey
        | KvError::InvalidLease
        | KvError::InvalidName
        | KvError::NestedBatch
        | KvError::NoApplier => StatusCode::BAD_REQUEST,
        KvError::TooManyKeys { .. } | KvError::TooManyLeases { .. } => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        KvError::LeaseNotFound { .. } => StatusCode::NOT_FOUND,
        KvError::LeaseExists { .. } => StatusCode::CONFLICT,
        KvError::Compacted { .. } => StatusCode::GONE,
    }
}

/// Runs a group operation within [`RAFT_ADMIN_DEADLINE`].
async fn bounded<T>(
    group: &str,
    fut: impl Future<Output = Result<T, GroupError>>,
) -> Result<T, Refusal> {
    match tokio::time::timeout(RAFT_ADMIN_DEADLINE, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(group_error(group, &e)),
        Err(_) => Err(refusal(
            StatusCode::GATEWAY_TIMEOUT,
            "raft.timeout",
            format!(
                "group {group:?}: no answer within {RAFT_ADMIN_DEADLINE:?}; a write may or may \
                 not have been applied"
            ),
        )),
    }
}

/// Proposes `req`; a refusal of the state machine is an error answer.
async fn write(g: &Group, req: Request) -> Result<KvResponse, Refusal> {
    match bounded(g.name(), g.write(req)).await? {
        KvResponse::Error(e) => Err(group_error(g.name(), &GroupError::Kv(e))),
        ok => Ok(ok),
    }
}

fn unexpected(group: &str, r: &KvResponse) -> Refusal {
    refusal(
        StatusCode::INTERNAL_SERVER_ERROR,
        "raft.other",
        format!("group {group:?}: unexpected answer {r:?}"),
    )
}

// ---------------------------------------------------------------------------
// URLs
// ---------------------------------------------------------------------------

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes (and, in a query, `+` as a space) into bytes.
fn percent_decode(s: &str, plus_is_space: bool) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = b.get(i + 1).copied().and_then(hex_value);
                let lo = b.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(format!("bad percent-encoding in {s:?}")),
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The group named in `/admin/raft/{group}...` and what follows it (still
/// encoded).
fn split_path(uri: &Uri) -> Result<(String, &str), Refusal> {
    let rest = uri
        .path()
        .strip_prefix("/admin/raft/")
        .ok_or_else(|| bad_request("not a Raft group path"))?;
    let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let name = percent_decode(name, false)
        .ok()
        .and_then(|n| String::from_utf8(n).ok())
        .ok_or_else(|| bad_request(format!("bad group name in {:?}", uri.path())))?;
    Ok((name, tail))
}

/// The running group named in the path.
fn group_at(s: &AdminState, uri: &Uri) -> Result<Group, Refusal> {
    let (name, _) = split_path(uri)?;
    s.node.raft().get(&name).ok_or_else(|| {
        refusal(
            StatusCode::NOT_FOUND,
            "raft.no_group",
            format!(
                "no Raft group {name:?} runs on this node (it runs: {})",
                s.node.raft().names().join(", ")
            ),
        )
    })
}

/// The group and the key of `/admin/raft/{group}/kv/{key}`.
fn key_at(s: &AdminState, uri: &Uri) -> Result<(Group, Vec<u8>), Refusal> {
    let g = group_at(s, uri)?;
    let (_, tail) = split_path(uri)?;
    let encoded = tail
        .strip_prefix("kv/")
        .ok_or_else(|| bad_request("expected /admin/raft/{group}/kv/{key}"))?;
    let key = percent_decode(encoded, false).map_err(bad_request)?;
    if key.is_empty() {
        return Err(bad_request("empty key"));
    }
    Ok((g, key))
}

/// The query parameters, percent-decoded; any name not in `allowed` is an
/// error (a typo would otherwise silently change the meaning).
fn params(uri: &Uri, allowed: &[&str]) -> Result<BTreeMap<String, Vec<u8>>, Refusal> {
    let mut out = BTreeMap::new();
    for pair in uri.query().unwrap_or_default().split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true)
            .ok()
            .and_then(|k| String::from_utf8(k).ok())
            .ok_or_else(|| bad_request(format!("bad query parameter {pair:?}")))?;
        if !allowed.contains(&k.as_str()) {
            return Err(bad_request(format!(
                "unknown query parameter {k:?}; this endpoint takes: {}",
                allowed.join(", ")
            )));
        }
        let v = percent_decode(v, true).map_err(bad_request)?;
        out.insert(k, v);
    }
    Ok(out)
}

fn param_text(q: &BTreeMap<String, Vec<u8>>, name: &str) -> Result<Option<String>, Refusal> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => String::from_utf8(v.clone())
            .map(Some)
            .map_err(|_| bad_request(format!("{name} is not UTF-8"))),
    }
}

/// `name`, `name=true|1` (true) or `name=false|0` (false); absent: false.
fn param_bool(q: &BTreeMap<String, Vec<u8>>, name: &str) -> Result<bool, Refusal> {
    match param_text(q, name)?.as_deref() {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(bad_request(format!(
            "{name}={other:?}: expected true or false"
        ))),
    }
}

fn param_u64(q: &BTreeMap<String, Vec<u8>>, name: &str) -> Result<Option<u64>, Refusal> {
    match param_text(q, name)? {
        None => Ok(None),
        Some(t) => t
            .parse()
            .map(Some)
            .map_err(|_| bad_request(format!("{name}={t:?}: expected a whole number"))),
    }
}

fn consistency(stale: bool) -> ReadConsistency {
    if stale {
        ReadConsistency::Stale
    } else {
        ReadConsistency::Linearizable
    }
}

/// Text, or base64 when given that way; exactly one of the two.
fn bytes_field(
    name: &str,
    text: Option<String>,
    b64: Option<String>,
) -> Result<Option<Vec<u8>>, Refusal> {
    match (text, b64) {
        (Some(_), Some(_)) => Err(bad_request(format!(
            "give {name} or {name}_base64, not both"
        ))),
        (Some(t), None) => Ok(Some(t.into_bytes())),
        (None, Some(b)) => base64_decode(&b)
            .map(Some)
            .ok_or_else(|| bad_request(format!("{name}_base64 is not valid base64"))),
        (None, None) => Ok(None),
    }
}

fn json_rejection(r: JsonRejection) -> Refusal {
    let status = if r.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    } else {
        StatusCode::BAD_REQUEST
    };
    refusal(status, "bad_request", r.body_text())
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// `GET /admin/raft`.
pub(super) async fn status(State(s): State<AdminState>) -> Json<RaftReport> {
    let raft = s.node.raft();
    let groups = raft
        .names()
        .iter()
        .filter_map(|n| raft.get(n))
        .map(|g| group_report(&g))
        .collect();
    Json(RaftReport {
        node_id: s.node.node_id().to_string(),
        groups,
    })
}

/// `GET /admin/raft/{group}` and `GET /admin/raft/{group}/members`.
pub(super) async fn group(
    State(s): State<AdminState>,
    uri: Uri,
) -> Result<Json<RaftGroupReport>, Refusal> {
    params(&uri, &[])?;
    Ok(Json(group_report(&group_at(&s, &uri)?)))
}

/// `POST /admin/raft/{group}/members`.
pub(super) async fn members(
    State(s): State<AdminState>,
    uri: Uri,
    body: Result<Json<MembersRequest>, JsonRejection>,
) -> Result<Json<RaftGroupReport>, Refusal> {
    params(&uri, &[])?;
    let g = group_at(&s, &uri)?;
    let Json(req) = body.map_err(json_rejection)?;
    let node: NodeId = req
        .node
        .trim()
        .parse()
        .map_err(|e| bad_request(format!("node {:?} is not a node ID: {e}", req.node)))?;
    match req.op.as_str() {
        "add_learner" => bounded(g.name(), g.add_learner(node)).await?,
        "add_voter" => bounded(g.name(), g.add_voter(node)).await?,
        "remove" => bounded(g.name(), g.remove(node)).await?,
        other => {
            return Err(bad_request(format!(
                "op {other:?}: expected add_learner, add_voter or remove"
            )))
        }
    }
    tracing::info!(group = %g.name(), op = %req.op, %node, "raft membership changed (admin API)");
    Ok(Json(group_report(&g)))
}

/// `GET /admin/raft/{group}/kv/{key}`.
pub(super) async fn get(
    State(s): State<AdminState>,
    uri: Uri,
) -> Result<Json<KvGetReport>, Refusal> {
    let q = params(&uri, &["stale"])?;
    let (g, key) = key_at(&s, &uri)?;
    let c = consistency(param_bool(&q, "stale")?);
    match bounded(g.name(), g.get(&key, c)).await? {
        (revision, Some(kv)) => Ok(Json(KvGetReport {
            group: g.name().to_string(),
            revision,
            kv: kv_report(&kv),
        })),
        (_, None) => Err(refusal(
            StatusCode::NOT_FOUND,
            "raft.no_key",
            format!("no key {} in group {:?}", show(&key), g.name()),
        )),
    }
}

/// `GET /admin/raft/{group}/kv?prefix=P&limit=N`.
pub(super) async fn list(
    State(s): State<AdminState>,
    uri: Uri,
) -> Result<Json<KvListReport>, Refusal> {
    let q = params(&uri, &["prefix", "limit", "stale"])?;
    let g = group_at(&s, &uri)?;
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let limit = match param_u64(&q, "limit")? {
        None => KV_LIST_DEFAULT_LIMIT,
        Some(n) if (1..=KV_LIST_MAX_LIMIT as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(bad_request(format!(
                "limit={n}: expected 1 to {KV_LIST_MAX_LIMIT}"
            )))
        }
    };
    let c = consistency(param_bool(&q, "stale")?);
    let (revision, mut kvs) = bounded(g.name(), g.range(&prefix, limit + 1, c)).await?;
    let more = kvs.len() > limit;
    kvs.truncate(limit);
    Ok(Json(KvListReport {
        group: g.name().to_string(),
        revision,
        kvs: kvs.iter().map(kv_report).collect(),
        more,
    }))
}

/// `PUT /admin/raft/{group}/kv/{key}`.
pub(super) async fn put(
    State(s): State<AdminState>,
    uri: Uri,
    body: Bytes,
) -> Result<Json<KvWriteReport>, Refusal> {
    let q = params(&uri, &["lease"])?;
    let (g, key) = key_at(&s, &uri)?;
    let lease = param_u64(&q, "lease")?;
    let req = Request::Put {
        key,
        value: body.to_vec(),
        lease,
        prev_kv: false,
    };
    match write(&g, req).await? {
        KvResponse::Put { revision, .. } => Ok(Json(KvWriteReport {
            group: g.name().to_string(),
            revision,
            deleted: None,
        })),
        other => Err(unexpected(g.name(), &other)),
    }
}

/// `DELETE /admin/raft/{group}/kv/{key}`.
pub(super) async fn delete(
    State(s): State<AdminState>,
    uri: Uri,
) -> Result<Json<KvWriteReport>, Refusal> {
    let q = params(&uri, &["prefix"])?;
    let (g, key) = key_at(&s, &uri)?;
    let req = Request::Delete {
        key,
        prefix: param_bool(&q, "prefix")?,
        prev_kv: false,
    };
    match write(&g, req).await? {
        KvResponse::Deleted {
            revision, deleted, ..
        } => Ok(Json(KvWriteReport {
            group: g.name().to_string(),
            revision,
            deleted: Some(deleted),
        })),
        other => Err(unexpected(g.name(), &other)),
    }
}

/// `POST /admin/raft/{group}/cas`.
pub(super) async fn cas(
    State(s): State<AdminState>,
    uri: Uri,
    body: Result<Json<CasRequest>, JsonRejection>,
) -> Result<Response, Refusal> {
    params(&uri, &[])?;
    let g = group_at(&s, &uri)?;
    let Json(req) = body.map_err(json_rejection)?;
    let key = bytes_field("key", req.key, req.key_base64)?
        .ok_or_else(|| bad_request("key (or key_base64) is required"))?;
    let value = bytes_field("value", req.value, req.value_base64)?
        .ok_or_else(|| bad_request("value (or value_base64) is required"))?;
    let expect_value = bytes_field("expect_value", req.expect_value, req.expect_value_base64)?;
    let needs = |what: &str| bad_request(format!("expect {:?} needs {what}", req.expect));
    let expect = match req.expect.as_str() {
        "absent" => Expect::Absent,
        "value" => Expect::Value(expect_value.ok_or_else(|| needs("expect_value"))?),
        "mod_revision" => Expect::ModRevision(
            req.expect_mod_revision
                .ok_or_else(|| needs("expect_mod_revision"))?,
        ),
        "version" => Expect::Version(req.expect_version.ok_or_else(|| needs("expect_version"))?),
        other => {
            return Err(bad_request(format!(
                "expect {other:?}: expected absent, value, mod_revision or version"
            )))
        }
    };
    let shown = show(&key);
    let r = write(
        &g,
        Request::Cas {
            key,
            expect,
            value,
            lease: req.lease,
        },
    )
    .await?;
    let KvResponse::Cas {
        succeeded,
        revision,
        current,
    } = r
    else {
        return Err(unexpected(g.name(), &r));
    };
    let status = if succeeded {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    let report = CasReport {
        group: g.name().to_string(),
        succeeded,
        revision,
        current: current.as_ref().map(kv_report),
        error: (!succeeded).then(|| {
            format!(
                "compare failed: key {shown} in group {:?} is not as expected",
                g.name()
            )
        }),
        status: status.as_u16(),
        kind: (!succeeded).then(|| "raft.cas_failed".to_string()),
    };
    Ok((status, Json(report)).into_response())
}

/// `GET /admin/raft/{group}/watch?prefix=P&from=REV&wait_ms=MS`.
pub(super) async fn watch(
    State(s): State<AdminState>,
    uri: Uri,
) -> Result<Json<WatchReport>, Refusal> {
    let q = params(&uri, &["prefix", "from", "wait_ms"])?;
    let g = group_at(&s, &uri)?;
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let wait = match param_u64(&q, "wait_ms")? {
        None => WATCH_DEFAULT_WAIT,
        Some(ms) => Duration::from_millis(ms).min(WATCH_MAX_WAIT),
    };
    let from = match param_u64(&q, "from")? {
        None | Some(0) => g.local_revision() + 1,
        Some(rev) => rev,
    };
    let (events, next) = poll_events(&g, &prefix, from, wait).await?;
    Ok(Json(WatchReport {
        group: g.name().to_string(),
        events: events.iter().map(event_report).collect(),
        next,
        revision: g.local_revision(),
    }))
}

/// The changes under `prefix` from revision `from`: those already applied
/// at once, else the first ones within `wait`; and the `from` of the next
/// poll.
///
/// The events always come from the state machine's history
/// (`Group::watch`'s backlog), which holds whole revisions (an applied
/// batch enters it under one lock); the live receiver only says when to
/// look again. So an answer never ends in the middle of a revision.
async fn poll_events(
    g: &Group,
    prefix: &[u8],
    from: u64,
    wait: Duration,
) -> Result<(Vec<Event>, u64), Refusal> {
    let deadline = tokio::time::Instant::now() + wait;
    // No change under `prefix` with a revision below `next` is left.
    let mut next = from;
    'look: loop {
        let (mut events, mut live) = g
            .watch(prefix, next)
            .map_err(|e| group_error(g.name(), &e))?;
        if !events.is_empty() {
            // At most WATCH_MAX_EVENTS, without splitting the last revision.
            if events.len() > WATCH_MAX_EVENTS {
                let cut = events[WATCH_MAX_EVENTS - 1].revision();
                let keep = events.partition_point(|e| e.revision() <= cut);
                events.truncate(keep);
            }
            let next = events.last().map_or(next, |e| e.revision() + 1);
            return Ok((events, next));
        }
        loop {
            match tokio::time::timeout_at(deadline, live.recv()).await {
                Err(_) => return Ok((Vec::new(), next)),
                Ok(Ok((rev, e))) => {
                    if rev < next {
                        continue;
                    }
                    if macula_raft::kv::matches_prefix(prefix, e.key()) {
                        continue 'look;
                    }
                    // Not ours. Later events of the same revision may be,
                    // so move up to it, not past it: the history then
                    // need not reach back to a revision long gone.
                    next = rev;
                }
                // Fell behind: the history fills the gap (or says it
                // cannot).
                Ok(Err(RecvError::Lagged(_))) => continue 'look,
                // The state machine was replaced by a snapshot (or is
                // going away): look again shortly.
                Ok(Err(RecvError::Closed)) => {
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(CLOSED_PAUSE))
                        .await
                        .is_err()
                    {
                        return Ok((Vec::new(), next));
                    }
                    continue 'look;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// The Raft service's gauges, read from its groups at scrape time (its
/// counters are registered by `RaftCounters::register`).
pub(super) struct RaftCollector {
    pub(super) node: NodeRuntime,
}

impl std::fmt::Debug for RaftCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftCollector").finish()
    }
}

impl Collector for RaftCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let raft = self.node.raft();
        let names = raft.names();
        let groups = ConstGauge::new(names.len() as i64);
        groups.encode(encoder.encode_descriptor(
            "macula_raft_groups",
            "Raft groups this node runs.",
            None,
            MetricType::Gauge,
        )?)?;
        if names.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "macula_raft_is_leader",
            "1 when this node leads the group, else 0 (one sample per group this node runs).",
            None,
            MetricType::Gauge,
        )?;
        for name in &names {
            let leads = raft.get(name).is_some_and(|g| g.is_leader());
            ConstGauge::new(i64::from(leads))
                .encode(family.encode_family(&[("group", name.as_str())])?)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Base64 (standard alphabet, padded): values that are not UTF-8
// ---------------------------------------------------------------------------

/// Standard alphabet; padded on output, padding optional on input.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    base64::Engine::encode(&BASE64, bytes)
}

/// Decodes standard base64 (padding optional); `None` if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&BASE64, text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_admin_base64_round_trips() {
        for (raw, text) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"\xff\xfe\x00", "//4A"),
        ] {
            assert_eq!(base64_encode(raw), text);
            assert_eq!(base64_decode(text).as_deref(), Some(raw));
        }
        assert_eq!(base64_decode("Zm9vYg").as_deref(), Some(&b"foob"[..]));
        assert!(base64_decode("Z").is_none());
        assert!(base64_decode("Zm9v!").is_none());
    }

    #[test]
    fn raft_admin_percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c", false).unwrap(), b"a/b c");
        assert_eq!(percent_decode("a+b", false).unwrap(), b"a+b");
        assert_eq!(percent_decode("a+b", true).unwrap(), b"a b");
        assert_eq!(percent_decode("%ff%00", false).unwrap(), b"\xff\x00");
        assert!(percent_decode("%f", false).is_err());
        assert!(percent_decode("%zz", false).is_err());
    }

    #[test]
    fn raft_admin_text_or_base64() {
        assert_eq!(text_or_base64(b"abc"), (Some("abc".into()), None));
        assert_eq!(text_or_base64(b"\xff"), (None, Some("/w==".into())));
    }
}
