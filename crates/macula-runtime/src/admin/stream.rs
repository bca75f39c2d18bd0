//! The durable-stream endpoints of the admin API (`macula stream ...`,
//! `macula consumer ...`; from other nodes a stream is reached over RPC
//! instead, `stream/remote.rs`).
//! They act on the streams this node hosts (`NodeRuntime::streams`).
//!
//! | route | answer |
//! |---|---|
//! | `GET /admin/streams` | [`StreamsReport`]: every stream (and files that did not open) |
//! | `POST /admin/streams` | JSON `StreamConfig`: add; [`StreamInfo`] |
//! | `GET /admin/streams/{name}` | [`StreamInfo`] (a replicated stream's: from its leader) |
//! | `GET /admin/streams/{name}/replica` | [`ReplicaStatus`]: this member's own copy of a replicated stream |
//! | `PUT /admin/streams/{name}` | JSON `StreamConfig`: edit; [`StreamInfo`] |
//! | `DELETE /admin/streams/{name}` | remove the stream and its file |
//! | `POST /admin/streams/{name}/purge` | JSON [`PurgeRequest`]; [`PurgeReport`] |
//! | `POST /admin/streams/{name}/publish` | JSON [`PublishRequest`]; `PubAck` once on disk |
//! | `GET /admin/streams/{name}/msg/{seq}` | [`MsgReport`] |
//! | `GET /admin/streams/{name}/consumers` | [`ConsumerReport`]s |
//! | `POST /admin/streams/{name}/consumers` | JSON `ConsumerConfig`: add; [`ConsumerReport`] |
//! | `GET /admin/streams/{name}/consumers/{c}` | [`ConsumerReport`] |
//! | `DELETE /admin/streams/{name}/consumers/{c}` | remove |
//! | `POST /admin/streams/{name}/consumers/{c}/next` | JSON [`NextRequest`]; [`MsgReport`]s (empty: none within `wait_ms`) |
//! | `POST /admin/streams/{name}/consumers/{c}/ack` | JSON [`AckRequest`] |
//!
//! Payloads in JSON are `payload` when UTF-8, else `payload_base64`
//! (standard, padded). Errors are an `ErrorReport` whose `kind` is
//! `stream.<cause>` (`StreamError::kind`: `stream.not_found` 404,
//! `stream.exists` 409, `stream.full` 507, `stream.too_large` 413,
//! `stream.no_consumer` 404, `stream.failed` 503, `stream.store` 500,
//! `stream.no_data_dir` 503, others 400).

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use macula_stream::{ConsumerConfig, Purge, StreamConfig};
use serde::{Deserialize, Serialize};

use super::{error_kind, AdminState};
#[cfg(doc)]
use crate::stream::ReplicaStatus;
use crate::stream::{AckKind, PersistOptions, StreamError, StreamMsg};

pub use crate::stream::{ConsumerReport, PubAck, StreamInfo};

/// Longest `wait_ms` of a pull (below the admin connection's deadline).
pub const MAX_NEXT_WAIT: Duration = Duration::from_secs(25);

/// `GET /admin/streams`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamsReport {
    /// The streams, by name.
    pub streams: Vec<StreamInfo>,
    /// Stream files that could not be opened, with why (left untouched).
    pub broken: Vec<BrokenStream>,
}

/// A stream file that could not be opened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokenStream {
    /// The stream.
    pub name: String,
    /// Why.
    pub error: String,
}

/// `POST /admin/streams/{name}/purge`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PurgeRequest {
    /// Only messages on topics this pattern matches.
    #[serde(default)]
    pub filter: Option<String>,
    /// Only messages below this sequence.
    #[serde(default)]
    pub upto: Option<u64>,
    /// Keep this many of the newest.
    #[serde(default)]
    pub keep: Option<u64>,
}

/// The answer to a purge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PurgeReport {
    /// Messages removed.
    pub purged: u64,
}

/// `POST /admin/streams/{name}/publish`: an acknowledged publish.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishRequest {
    /// The topic (one the stream captures).
    pub topic: String,
    /// The payload as text.
    #[serde(default)]
    pub payload: Option<String>,
    /// Or as base64.
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Headers.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// De-duplication ID.
    #[serde(default)]
    pub msg_id: Option<String>,
    /// Time to live of this message, in ms.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

/// `POST .../consumers/{c}/next`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NextRequest {
    /// Messages at most.
    #[serde(default = "one")]
    pub batch: usize,
    /// Bytes at most.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// How long to wait for the first message (at most 25 s).
    #[serde(default)]
    pub wait_ms: u64,
}

fn one() -> usize {
    1
}

/// `POST .../consumers/{c}/ack`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AckRequest {
    /// The stream sequence delivered.
    pub seq: u64,
    /// `ack` (default), `nak`, `in_progress` or `term`.
    #[serde(default)]
    pub kind: Option<String>,
    /// For `nak`: redeliver after this long.
    #[serde(default)]
    pub delay_ms: u64,
}

/// A stored message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MsgReport {
    /// Its stream.
    pub stream: String,
    /// Its stream sequence.
    pub seq: u64,
    /// Its delivery number in the consumer (0 for a direct read).
    pub consumer_seq: u64,
    /// Deliveries of it so far.
    pub deliveries: u32,
    /// When it was stored (Unix ms).
    pub ts: u64,
    /// Its topic.
    pub subject: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// De-duplication ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// The payload when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Else the payload in base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

impl MsgReport {
    /// The payload's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match (&self.payload, &self.payload_base64) {
            (Some(p), _) => p.as_bytes().to_vec(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }
}

fn report(m: StreamMsg) -> MsgReport {
    let (payload, payload_base64) = match std::str::from_utf8(&m.payload) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&m.payload)),
        ),
    };
    MsgReport {
        stream: m.stream,
        seq: m.seq,
        consumer_seq: m.consumer_seq,
        deliveries: m.deliveries,
        ts: m.ts,
        subject: m.subject,
        headers: m.headers,
        msg_id: m.msg_id,
        payload,
        payload_base64,
    }
}

fn refuse(e: StreamError) -> Response {
    let status = match e.kind() {
        "not_found" | "no_consumer" => StatusCode::NOT_FOUND,
        "exists" | "overlap" => StatusCode::CONFLICT,
        "full" => StatusCode::INSUFFICIENT_STORAGE,
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "failed" | "no_data_dir" | "not_leader" | "replication" | "unreachable" | "busy" => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        "store" => StatusCode::INTERNAL_SERVER_ERROR,
        "too_many" => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::BAD_REQUEST,
    };
    error_kind(status, &format!("stream.{}", e.kind()), e.to_string())
}

fn bad_json(e: JsonRejection) -> Response {
    error_kind(e.status(), "bad_request", e.body_text())
}

fn ok<T: Serialize>(r: Result<T, StreamError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => refuse(e),
    }
}

/// `GET /admin/streams`.
pub(super) async fn list(State(s): State<AdminState>) -> Response {
    let streams = s.node.streams();
    let broken = streams.broken();
    let mut infos = Vec::new();
    for n in streams.names().iter().filter(|n| !broken.contains_key(*n)) {
        // A replicated stream this member does not lead: the leader's view.
        if let Ok(i) = streams.handle(n).info().await {
            infos.push(i);
        }
    }
    let report = StreamsReport {
        streams: infos,
        broken: broken
            .into_iter()
            .map(|(name, error)| BrokenStream { name, error })
            .collect(),
    };
    Json(report).into_response()
}

/// `POST /admin/streams`.
pub(super) async fn add(
    State(s): State<AdminState>,
    body: Result<Json<StreamConfig>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(cfg)) => ok(s.node.streams().add(cfg).await),
        Err(e) => bad_json(e),
    }
}

/// `GET /admin/streams/{name}`.
pub(super) async fn info(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    ok(s.node.streams().handle(&name).info().await)
}

/// `PUT /admin/streams/{name}`.
pub(super) async fn edit(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<StreamConfig>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(cfg)) if cfg.name == name => ok(s.node.streams().edit(cfg).await),
        Ok(Json(_)) => refuse(StreamError::Invalid(
            "the configuration's name is not the stream's".into(),
        )),
        Err(e) => bad_json(e),
    }
}

/// `DELETE /admin/streams/{name}`.
pub(super) async fn delete(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match s.node.streams().delete(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refuse(e),
    }
}

/// `POST /admin/streams/{name}/purge`.
pub(super) async fn purge(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<PurgeRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_json(e),
    };
    let filter = match req.filter.as_deref().map(macula_pubsub::Pattern::new) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return refuse(StreamError::Invalid(e.to_string())),
    };
    let p = Purge {
        filter,
        upto: req.upto,
        keep: req.keep,
    };
    ok(s.node
        .streams()
        .purge(&name, p)
        .await
        .map(|purged| PurgeReport { purged }))
}

/// `POST /admin/streams/{name}/publish`.
pub(super) async fn publish(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_json(e),
    };
    let payload = match (req.payload, req.payload_base64) {
        (Some(p), _) => Bytes::from(p),
        (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b.trim()) {
            Ok(v) => Bytes::from(v),
            Err(e) => return refuse(StreamError::Invalid(format!("payload_base64: {e}"))),
        },
        (None, None) => Bytes::new(),
    };
    let opts = PersistOptions {
        headers: req.headers,
        msg_id: req.msg_id,
        ttl: req.ttl_ms.map(Duration::from_millis),
        publish: true,
    };
    let r = s
        .node
        .streams()
        .handle(&name)
        .publish(&req.topic, payload, opts)
        .await;
    match r {
        Ok(ack) if ack.stream != name => refuse(StreamError::Invalid(format!(
            "topic {} is captured by stream {}, not {name}",
            req.topic, ack.stream
        ))),
        r => ok(r),
    }
}

/// `GET /admin/streams/{name}/msg/{seq}`.
pub(super) async fn msg(
    State(s): State<AdminState>,
    Path((name, seq)): Path<(String, u64)>,
) -> Response {
    match s.node.streams().handle(&name).get_msg(seq).await {
        Ok(Some(m)) => Json(report(m)).into_response(),
        Ok(None) => error_kind(
            StatusCode::NOT_FOUND,
            "stream.no_msg",
            format!("no message {seq} in stream {name}"),
        ),
        Err(e) => refuse(e),
    }
}

/// `GET /admin/streams/{name}/replica`.
pub(super) async fn replica(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match s.node.streams().replica_status(&name) {
        Some(r) => Json(r).into_response(),
        None => error_kind(
            StatusCode::NOT_FOUND,
            "stream.not_replicated",
            format!("this node holds no replica of a replicated stream {name}"),
        ),
    }
}

/// `GET /admin/streams/{name}/consumers`.
pub(super) async fn consumers(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    ok(s.node.streams().handle(&name).consumers().await)
}

/// `POST /admin/streams/{name}/consumers`.
pub(super) async fn add_consumer(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<ConsumerConfig>, JsonRejection>,
) -> Response {
    let cfg = match body {
        Ok(Json(c)) => c,
        Err(e) => return bad_json(e),
    };
    let stream = s.node.streams().handle(&name);
    match stream.add_consumer(cfg).await {
        Ok(c) => ok(stream.consumer_info(&c).await),
        Err(e) => refuse(e),
    }
}

/// `GET /admin/streams/{name}/consumers/{c}`.
pub(super) async fn consumer(
    State(s): State<AdminState>,
    Path((name, c)): Path<(String, String)>,
) -> Response {
    ok(s.node.streams().handle(&name).consumer_info(&c).await)
}

/// `DELETE /admin/streams/{name}/consumers/{c}`.
pub(super) async fn delete_consumer(
    State(s): State<AdminState>,
    Path((name, c)): Path<(String, String)>,
) -> Response {
    match s.node.streams().handle(&name).delete_consumer(&c).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refuse(e),
    }
}

/// `POST /admin/streams/{name}/consumers/{c}/next`.
pub(super) async fn next(
    State(s): State<AdminState>,
    Path((name, c)): Path<(String, String)>,
    body: Result<Json<NextRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_json(e),
    };
    let wait = Duration::from_millis(req.wait_ms).min(MAX_NEXT_WAIT);
    ok(s.node
        .streams()
        .handle(&name)
        .next(&c, req.batch, req.max_bytes, wait)
        .await
        .map(|v| v.into_iter().map(report).collect::<Vec<_>>()))
}

/// `POST /admin/streams/{name}/consumers/{c}/ack`.
pub(super) async fn ack(
    State(s): State<AdminState>,
    Path((name, c)): Path<(String, String)>,
    body: Result<Json<AckRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_json(e),
    };
    let kind = match req.kind.as_deref().unwrap_or("ack") {
        "ack" => AckKind::Ack,
        "nak" => AckKind::Nak(Duration::from_millis(req.delay_ms)),
        "in_progress" => AckKind::InProgress,
        "term" => AckKind::Term,
        other => {
            return refuse(StreamError::Invalid(format!(
                "ack kind {other:?}: ack, nak, in_progress or term"
            )))
        }
    };
    match s.node.streams().handle(&name).ack(&c, req.seq, kind).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refuse(e),
    }
}
