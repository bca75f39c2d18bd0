//! Streams reached from other nodes and lightweight clients (issue 21,
//! item 4): the node hosting a stream serves the RPC procedure
//! `_stream.<name>`, advertised like any other (so calls find it, the
//! realm's `call` permissions apply to it, and a caller fails over to
//! nothing: a stream lives on one node); [`RemoteStream`] calls it.
//!
//! Requests and answers are MessagePack maps (PROTOCOL.md 5.12): an [`Op`]
//! in, a `Result<Answer, Failure>` out, where a [`Failure`] carries the
//! hosting node's `StreamError::kind` and message. Managing streams (add,
//! edit, purge, delete) stays with the admin API; the procedure serves what
//! applications do: acknowledged publish, reads, consumers, pulls and acks.
//!
//! A replicated stream (`replica.rs`) is advertised by each of its members;
//! a member that does not lead forwards the request to the leader with the
//! header [`FORWARDED_HEADER`], and answers with the leader's answer. A
//! forwarded request is never forwarded again: a member that gets one and
//! does not serve waits a moment for its office, then answers `not_leader`.
//! `Op::Fetch` (records as stored, for a member installing a snapshot) is
//! answered by whichever member gets it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_stream::ConsumerConfig;
use macula_wire::NodeId;
use serde::{Deserialize, Serialize};

use super::{
    AckKind, ConsumerReport, Hosted, PersistOptions, PubAck, StreamError, StreamInfo, StreamMsg,
    Streams,
};
use crate::rpc::{HandlerError, HandlerResult, Rpc, RpcError};

/// The RPC procedure the node hosting `stream` serves.
pub fn procedure(stream: &str) -> String {
    format!("_stream.{stream}")
}

/// How long a remote stream operation other than a pull may take.
pub const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to a pull's wait for its call's deadline.
const PULL_MARGIN: Duration = Duration::from_secs(5);
/// The header of a request a replicated stream's member forwarded to the
/// leader.
pub const FORWARDED_HEADER: &str = "macula-stream-forwarded";
/// How long a member that got a forwarded request waits to serve.
const FORWARDED_PATIENCE: Duration = Duration::from_secs(2);

/// A request to the stream's node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// An acknowledged publish on `subject` (which this stream captures).
    Publish {
        subject: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        #[serde(default)]
        headers: Vec<(String, String)>,
        #[serde(default)]
        msg_id: Option<String>,
        #[serde(default)]
        ttl_ms: Option<u64>,
        /// Also publish to live subscribers once stored.
        publish: bool,
    },
    /// One stored message.
    Get {
        seq: u64,
    },
    /// The stream's state.
    Info,
    AddConsumer(ConsumerConfig),
    DeleteConsumer(String),
    ConsumerInfo(String),
    Consumers,
    /// A pull: up to `batch` messages, waiting up to `wait_ms` for one.
    Next {
        consumer: String,
        batch: usize,
        #[serde(default)]
        max_bytes: Option<u64>,
        wait_ms: u64,
    },
    Ack {
        consumer: String,
        seq: u64,
        kind: AckKind,
    },
    /// Stored records from `from` on, as stored (a replicated stream's
    /// member installing a snapshot), once the answering member has
    /// applied the log up to `applied` (the snapshot's index; absent:
    /// at once).
    Fetch {
        from: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        applied: Option<u64>,
    },
}

/// A message as it travels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireMsg {
    pub seq: u64,
    pub consumer_seq: u64,
    pub deliveries: u32,
    pub ts: u64,
    pub subject: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub msg_id: Option<String>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// The answer to an [`Op`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    PubAck(PubAck),
    Msg(Option<WireMsg>),
    Msgs(Vec<WireMsg>),
    Info(Box<StreamInfo>),
    Consumer(String),
    ConsumerInfo(Box<ConsumerReport>),
    Consumers(Vec<ConsumerReport>),
    Done,
    /// `(sequence, record)` pairs, ascending.
    Records(Vec<(u64, serde_bytes::ByteBuf)>),
}

/// Why the stream's node refused an [`Op`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// `StreamError::kind` on the hosting node.
    pub kind: String,
    pub message: String,
}

fn wire(m: StreamMsg) -> WireMsg {
    WireMsg {
        seq: m.seq,
        consumer_seq: m.consumer_seq,
        deliveries: m.deliveries,
        ts: m.ts,
        subject: m.subject,
        headers: m.headers,
        msg_id: m.msg_id,
        payload: m.payload.to_vec(),
    }
}

fn unwire(stream: &str, m: WireMsg) -> StreamMsg {
    StreamMsg {
        stream: stream.to_string(),
        seq: m.seq,
        consumer_seq: m.consumer_seq,
        deliveries: m.deliveries,
        ts: m.ts,
        subject: m.subject,
        headers: m.headers,
        msg_id: m.msg_id,
        payload: Bytes::from(m.payload),
    }
}

/// Decodes a request body (fuzz target `stream_ops`).
pub fn decode_op(payload: &[u8]) -> Result<Op, rmp_serde::decode::Error> {
    rmp_serde::from_slice(payload)
}

/// Decodes an answer body (fuzz target `stream_ops`).
pub fn decode_answer(payload: &[u8]) -> Result<Result<Answer, Failure>, rmp_serde::decode::Error> {
    rmp_serde::from_slice(payload)
}

/// Serves one request for `stream` (the handler behind
/// `_stream.<stream>`). A body that does not decode is a handler error 400;
/// a refused operation is an answered `Failure`.
pub(crate) async fn serve(
    streams: &Streams,
    stream: &str,
    req: &crate::rpc::Request,
) -> HandlerResult {
    let payload = &req.payload;
    let op = decode_op(payload)
        .map_err(|e| HandlerError::new(400, format!("bad stream request: {e}")))?;
    if let Some(r) = streams.replica(stream) {
        if !matches!(op, Op::Fetch { .. }) && !r.serving() {
            let forwarded = req.headers.iter().any(|(k, _)| k == FORWARDED_HEADER);
            let leader = r
                .group
                .leader()
                .filter(|_| !r.group.is_leader() && !forwarded);
            if let (Some(leader), Some(rpc)) = (leader, streams.rpc()) {
                let timeout = match &op {
                    Op::Next { wait_ms, .. } => Duration::from_millis(*wait_ms) + PULL_MARGIN,
                    _ => DEFAULT_REMOTE_TIMEOUT,
                };
                streams.count_forwarded();
                let reply = rpc
                    .call_to(leader, &procedure(stream), payload.clone())
                    .header(FORWARDED_HEADER, "1")
                    .timeout(timeout)
                    .retries(0)
                    .await;
                return match reply {
                    Ok(r) => Ok(r.payload),
                    Err(e) => answer(Err(StreamError::Unreachable(format!(
                        "the stream's leader {leader}: {e}"
                    )))),
                };
            }
            // Forwarded here, or this member was just elected: it serves
            // in a moment, or the caller is told who leads.
            r.wait_serving(FORWARDED_PATIENCE).await;
        }
    }
    answer(run(streams, stream, op).await)
}

/// The reply payload: `{"Ok": answer}`, or `{"Err": {kind, message}}`.
fn answer(result: Result<Answer, StreamError>) -> HandlerResult {
    let result = result.map_err(|e| Failure {
        kind: e.kind().to_string(),
        message: e.to_string(),
    });
    rmp_serde::to_vec_named(&result)
        .map(Bytes::from)
        .map_err(|e| HandlerError::new(500, e.to_string()))
}

async fn run(streams: &Streams, stream: &str, op: Op) -> Result<Answer, StreamError> {
    Ok(match op {
        Op::Publish {
            subject,
            payload,
            headers,
            msg_id,
            ttl_ms,
            publish,
        } => {
            streams.check_captures(stream, &subject)?;
            let opts = PersistOptions {
                headers,
                msg_id,
                ttl: ttl_ms.map(Duration::from_millis),
                publish,
            };
            // Sealed by the remote publisher, on an encrypted topic.
            Answer::PubAck(
                streams
                    .publish_carried(&subject, Bytes::from(payload), opts)
                    .await?,
            )
        }
        Op::Get { seq } => Answer::Msg(streams.get_msg_stored(stream, seq).await?.map(wire)),
        Op::Info => Answer::Info(Box::new(streams.info(stream)?)),
        Op::AddConsumer(cfg) => Answer::Consumer(streams.add_consumer(stream, cfg).await?),
        Op::DeleteConsumer(name) => {
            streams.delete_consumer(stream, &name).await?;
            Answer::Done
        }
        Op::ConsumerInfo(name) => {
            Answer::ConsumerInfo(Box::new(streams.consumer_info(stream, &name)?))
        }
        Op::Consumers => Answer::Consumers(streams.consumers(stream)?),
        Op::Next {
            consumer,
            batch,
            max_bytes,
            wait_ms,
        } => Answer::Msgs(
            streams
                .next_stored(
                    stream,
                    &consumer,
                    batch,
                    max_bytes,
                    Duration::from_millis(wait_ms),
                )
                .await?
                .into_iter()
                .map(wire)
                .collect(),
        ),
        Op::Ack {
            consumer,
            seq,
            kind,
        } => {
            streams.ack(stream, &consumer, seq, kind).await?;
            Answer::Done
        }
        Op::Fetch { from, applied } => Answer::Records(
            streams
                .fetch_local(stream, from, applied.unwrap_or(0))
                .await?
                .into_iter()
                .map(|(s, r)| (s, serde_bytes::ByteBuf::from(r)))
                .collect(),
        ),
    })
}

impl Streams {
    /// Serves every hosted stream, and each one added later, to other
    /// nodes and clients over `rpc` (`_stream.<name>`, `remote.rs`).
    pub fn serve_remote(&self, rpc: crate::rpc::Rpc) {
        if self.0.rpc.set(rpc).is_err() {
            return;
        }
        let hosted: Vec<Arc<Hosted>> = self.0.hosted.lock().values().cloned().collect();
        for h in hosted {
            self.advertise(&h);
        }
    }

    /// Advertises `_stream.<name>` in the background, retrying (500 ms
    /// doubling to 30 s) while the mesh does not take it; a refusal by the
    /// realm's permissions is final (logged).
    pub(super) fn advertise(&self, h: &Arc<Hosted>) {
        let Some(rpc) = self.0.rpc.get().cloned() else {
            return;
        };
        let weak = Arc::downgrade(&self.0);
        let hosted = Arc::downgrade(h);
        let name = h.name.clone();
        let task = tokio::spawn(async move {
            let procedure = procedure(&name);
            let mut delay = Duration::from_millis(500);
            loop {
                let (w, n) = (weak.clone(), name.clone());
                let handler = move |req: crate::rpc::Request| {
                    let (w, n) = (w.clone(), n.clone());
                    async move {
                        match w.upgrade() {
                            Some(inner) => serve(&Streams(inner), &n, &req).await,
                            None => Err(crate::rpc::HandlerError::new(503, "the node is stopping")),
                        }
                    }
                };
                match rpc
                    .advertise(&procedure, crate::rpc::AdvertiseOptions::default(), handler)
                    .await
                {
                    Ok(reg) => {
                        if let Some(h) = hosted.upgrade() {
                            *h.registration.lock() = Some(reg);
                            tracing::debug!(stream = %name, "stream served to the mesh");
                        }
                        return;
                    }
                    Err(e @ crate::rpc::RpcError::Unauthorized { .. }) => {
                        tracing::warn!(stream = %name, error = %e, "stream not served to other nodes");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(stream = %name, error = %e, "stream not advertised yet; retrying");
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                if hosted.upgrade().is_none() {
                    return;
                }
            }
        });
        if let Some(old) = h.advertising.lock().replace(task) {
            old.abort();
        }
    }
}

/// A stream hosted by another node, reached over RPC (`_stream.<name>`).
#[derive(Clone)]
pub struct RemoteStream {
    rpc: Rpc,
    stream: String,
    procedure: String,
    timeout: Duration,
    /// The node that answered last: calls go straight to it.
    host: std::sync::Arc<parking_lot::Mutex<Option<NodeId>>>,
    /// A lightweight client's calls go through its gateway, which finds
    /// the stream's node: no direct calls.
    direct: bool,
}

impl std::fmt::Debug for RemoteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStream")
            .field("stream", &self.stream)
            .field("host", &*self.host.lock())
            .finish()
    }
}

impl RemoteStream {
    /// `stream` through `rpc` (a node's or a lightweight client's), each
    /// operation but pulls bounded by `timeout`.
    pub fn new(rpc: Rpc, stream: &str, timeout: Duration) -> RemoteStream {
        RemoteStream {
            rpc,
            stream: stream.to_string(),
            procedure: procedure(stream),
            timeout,
            host: Default::default(),
            direct: true,
        }
    }

    /// `stream` on member `node` (a replicated stream's leader): calls go
    /// to it first.
    pub fn on_member(rpc: Rpc, stream: &str, node: NodeId, timeout: Duration) -> RemoteStream {
        let r = RemoteStream::new(rpc, stream, timeout);
        *r.host.lock() = Some(node);
        r
    }

    /// Stored records from `from` on, as stored, from the member this
    /// handle calls (never through discovery: another member may be
    /// behind), once it has applied the log up to `applied`.
    pub async fn fetch(&self, from: u64, applied: u64) -> Result<Vec<(u64, Vec<u8>)>, StreamError> {
        let op = Op::Fetch {
            from,
            applied: Some(applied),
        };
        match self.op(&op, self.timeout, false).await? {
            Answer::Records(v) => Ok(v.into_iter().map(|(s, r)| (s, r.into_vec())).collect()),
            other => Err(unexpected(other)),
        }
    }

    /// For a lightweight client: every call goes through its gateway.
    pub fn via_gateway(mut self) -> RemoteStream {
        self.direct = false;
        self
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.stream
    }

    /// Sends `op`; `retry`: the operation may be sent again if its answer
    /// was lost (reads, and publishes with a message ID, which the stream
    /// de-duplicates).
    async fn op(&self, op: &Op, timeout: Duration, retry: bool) -> Result<Answer, StreamError> {
        let body = Bytes::from(
            rmp_serde::to_vec_named(op).map_err(|e| StreamError::Invalid(e.to_string()))?,
        );
        let host = if self.direct { *self.host.lock() } else { None };
        let call = match host {
            Some(h) => self.rpc.call_to(h, &self.procedure, body.clone()),
            None => self.rpc.call(&self.procedure, body.clone()),
        };
        let reply = match call.timeout(timeout).retries(0).await {
            Ok(r) => r,
            Err(e) if host.is_some() && retry => {
                // The node we knew may have gone: ask the mesh again.
                *self.host.lock() = None;
                tracing::debug!(stream = %self.stream, error = %e, "stream node did not answer; looking it up again");
                self.rpc
                    .call(&self.procedure, body)
                    .timeout(timeout)
                    .retries(0)
                    .await?
            }
            Err(e) => {
                *self.host.lock() = None;
                return Err(e.into());
            }
        };
        *self.host.lock() = Some(reply.provider);
        let result = decode_answer(&reply.payload)
            .map_err(|e| StreamError::Invalid(format!("bad answer from the stream's node: {e}")))?;
        result.map_err(|f| StreamError::Remote {
            kind: f.kind,
            message: f.message,
        })
    }

    /// An acknowledged publish: answered once stored on the stream's node.
    /// Sent once unless it has a message ID (then a lost answer is retried
    /// and the stream de-duplicates it).
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PersistOptions,
    ) -> Result<PubAck, StreamError> {
        let retry = opts.msg_id.is_some();
        // This publisher is the edge: sealed here on an encrypted topic,
        // stored sealed by the stream's node.
        let payload = match self.rpc.e2e() {
            Some(keys) => keys
                .seal(topic, payload)
                .map_err(|e| StreamError::Invalid(format!("end-to-end: {e}")))?,
            None => payload,
        };
        let op = Op::Publish {
            subject: topic.to_string(),
            payload: payload.to_vec(),
            headers: opts.headers,
            msg_id: opts.msg_id,
            ttl_ms: opts.ttl.map(|d| d.as_millis() as u64),
            publish: opts.publish,
        };
        match self.op(&op, self.timeout, retry).await? {
            Answer::PubAck(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    /// One stored message.
    pub async fn get_msg(&self, seq: u64) -> Result<Option<StreamMsg>, StreamError> {
        match self.op(&Op::Get { seq }, self.timeout, true).await? {
            Answer::Msg(m) => {
                let m = m.map(|m| unwire(&self.stream, m));
                super::sealed::open_one(self.rpc.e2e(), m)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The stream's state.
    pub async fn info(&self) -> Result<StreamInfo, StreamError> {
        match self.op(&Op::Info, self.timeout, true).await? {
            Answer::Info(i) => Ok(*i),
            other => Err(unexpected(other)),
        }
    }

    /// Adds a consumer; its name.
    pub async fn add_consumer(&self, cfg: ConsumerConfig) -> Result<String, StreamError> {
        match self.op(&Op::AddConsumer(cfg), self.timeout, false).await? {
            Answer::Consumer(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a consumer.
    pub async fn delete_consumer(&self, name: &str) -> Result<(), StreamError> {
        match self
            .op(&Op::DeleteConsumer(name.to_string()), self.timeout, false)
            .await?
        {
            Answer::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// A consumer's state.
    pub async fn consumer_info(&self, name: &str) -> Result<ConsumerReport, StreamError> {
        match self
            .op(&Op::ConsumerInfo(name.to_string()), self.timeout, true)
            .await?
        {
            Answer::ConsumerInfo(r) => Ok(*r),
            other => Err(unexpected(other)),
        }
    }

    /// The stream's consumers.
    pub async fn consumers(&self) -> Result<Vec<ConsumerReport>, StreamError> {
        match self.op(&Op::Consumers, self.timeout, true).await? {
            Answer::Consumers(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Pulls up to `batch` messages, waiting up to `wait` for the first.
    /// Not sent again if its answer is lost (the messages it delivered are
    /// delivered again after the consumer's ack wait).
    pub async fn next(
        &self,
        consumer: &str,
        batch: usize,
        max_bytes: Option<u64>,
        wait: Duration,
    ) -> Result<Vec<StreamMsg>, StreamError> {
        let op = Op::Next {
            consumer: consumer.to_string(),
            batch,
            max_bytes,
            wait_ms: wait.as_millis() as u64,
        };
        match self.op(&op, wait + PULL_MARGIN, false).await? {
            // Opened here (the reader is the edge); one this reader cannot
            // open is left out, counted.
            Answer::Msgs(ms) => Ok(super::sealed::open_all(
                self.rpc.e2e(),
                ms.into_iter().map(|m| unwire(&self.stream, m)),
            )),
            other => Err(unexpected(other)),
        }
    }

    /// Acknowledges (or naks, ...) a delivered message.
    pub async fn ack(&self, consumer: &str, seq: u64, kind: AckKind) -> Result<(), StreamError> {
        let op = Op::Ack {
            consumer: consumer.to_string(),
            seq,
            kind,
        };
        // An ack sent twice is harmless (the second finds nothing pending).
        match self.op(&op, self.timeout, true).await? {
            Answer::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(a: Answer) -> StreamError {
    StreamError::Invalid(format!("unexpected answer from the stream's node: {a:?}"))
}

impl From<RpcError> for StreamError {
    fn from(e: RpcError) -> Self {
        StreamError::Unreachable(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_as_named_maps() {
        let op = Op::Next {
            consumer: "billing".into(),
            batch: 10,
            max_bytes: None,
            wait_ms: 500,
        };
        let bytes = rmp_serde::to_vec_named(&op).unwrap();
        match rmp_serde::from_slice::<Op>(&bytes).unwrap() {
            Op::Next {
                consumer,
                batch,
                wait_ms,
                ..
            } => assert_eq!((consumer.as_str(), batch, wait_ms), ("billing", 10, 500)),
            other => panic!("{other:?}"),
        }
        let r: Result<Answer, Failure> = Err(Failure {
            kind: "not_found".into(),
            message: "no stream \"x\" on this node".into(),
        });
        let bytes = rmp_serde::to_vec_named(&r).unwrap();
        let back: Result<Answer, Failure> = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.unwrap_err().kind, "not_found");
        assert!(rmp_serde::from_slice::<Op>(b"\x01\x02").is_err());
    }
}
