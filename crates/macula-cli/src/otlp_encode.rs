//! The span exporter of `--otlp`: OTLP/HTTP protobuf written straight from
//! the SDK's `SpanData` into one reused buffer, and sent with `ureq`.
//!
//! `opentelemetry-otlp` first converts every span into the generated
//! protobuf structs (a `Vec` or `String` per ID, key and string value:
//! about 15 allocations a span), encodes those and frees them; that was
//! about a third of what a traced message cost (BENCHMARKS.md, tracing).
//! Here each message is written as it is read, nested messages through
//! reused scratch buffers: no allocation per span once the buffers have
//! grown. The encoding is checked against `opentelemetry-proto`'s decoder
//! in the tests below and by the collector in `tests/tracing.rs`.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push(v as u8 | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn key(b: &mut Vec<u8>, field: u32, wire: u32) {
    varint(b, u64::from(field << 3 | wire));
}

/// A length-delimited field (bytes, string, message), omitted when empty
/// as proto3 does.
fn bytes(b: &mut Vec<u8>, field: u32, v: &[u8]) {
    if v.is_empty() {
        return;
    }
    key(b, field, LEN);
    varint(b, v.len() as u64);
    b.extend_from_slice(v);
}

/// An embedded message field (written even when empty: `optional`).
fn message(b: &mut Vec<u8>, field: u32, v: &[u8]) {
    key(b, field, LEN);
    varint(b, v.len() as u64);
    b.extend_from_slice(v);
}

fn uint(b: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(b, field, VARINT);
        varint(b, v);
    }
}

fn fixed64(b: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(b, field, FIXED64);
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32(b: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        key(b, field, FIXED32);
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as u64
}

/// `AnyValue`'s fields (`common.proto`) for `v` into `b`.
fn any_value(b: &mut Vec<u8>, v: &Value, scratch: &mut Vec<u8>) {
    match v {
        Value::String(s) => {
            // An empty string is still a string value: always written.
            key(b, 1, LEN);
            varint(b, s.as_str().len() as u64);
            b.extend_from_slice(s.as_str().as_bytes());
        }
        Value::Bool(x) => {
            key(b, 2, VARINT);
            varint(b, u64::from(*x));
        }
        Value::I64(x) => {
            key(b, 3, VARINT);
            varint(b, *x as u64);
        }
        Value::F64(x) => {
            key(b, 4, FIXED64);
            b.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        Value::Array(a) => {
            // ArrayValue { repeated AnyValue values = 1 }
            let mut arr = Vec::new();
            let mut one = |arr: &mut Vec<u8>, v: Value| {
                scratch.clear();
                any_value(scratch, &v, &mut Vec::new());
                message(arr, 1, scratch);
            };
            match a {
                Array::Bool(xs) => xs.iter().for_each(|x| one(&mut arr, Value::Bool(*x))),
                Array::I64(xs) => xs.iter().for_each(|x| one(&mut arr, Value::I64(*x))),
                Array::F64(xs) => xs.iter().for_each(|x| one(&mut arr, Value::F64(*x))),
                Array::String(xs) => xs
                    .iter()
                    .for_each(|x| one(&mut arr, Value::String(x.clone()))),
                other => one(&mut arr, Value::String(other.to_string().into())),
            }
            message(b, 5, &arr);
        }
        other => {
            let s = other.to_string();
            key(b, 1, LEN);
            varint(b, s.len() as u64);
            b.extend_from_slice(s.as_bytes());
        }
    }
}

/// Reused buffers for the nested messages of one export.
#[derive(Default)]
struct Scratch {
    kv: Vec<u8>,
    value: Vec<u8>,
    inner: Vec<u8>,
    item: Vec<u8>,
}

/// `repeated KeyValue field` into `b`.
fn attributes<'a>(
    b: &mut Vec<u8>,
    field: u32,
    kvs: impl IntoIterator<Item = (&'a str, &'a Value)>,
    s: &mut Scratch,
) {
    for (k, v) in kvs {
        s.value.clear();
        any_value(&mut s.value, v, &mut s.inner);
        s.kv.clear();
        bytes(&mut s.kv, 1, k.as_bytes());
        message(&mut s.kv, 2, &s.value);
        message(b, field, &s.kv);
    }
}

fn kv_pairs(kvs: &[KeyValue]) -> impl Iterator<Item = (&str, &Value)> {
    kvs.iter().map(|kv| (kv.key.as_str(), &kv.value))
}

/// `Span` (`trace.proto`) of `d` into `b`, without its attribute at
/// `moved` (said once by its resource instead).
fn span(b: &mut Vec<u8>, d: &SpanData, moved: Option<usize>, s: &mut Scratch) {
    let sc = &d.span_context;
    bytes(b, 1, &sc.trace_id().to_bytes());
    bytes(b, 2, &sc.span_id().to_bytes());
    let state = sc.trace_state().header();
    bytes(b, 3, state.as_bytes());
    if d.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes(b, 4, &d.parent_span_id.to_bytes());
    }
    bytes(b, 5, d.name.as_bytes());
    let kind = match d.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    uint(b, 6, kind);
    fixed64(b, 7, nanos(d.start_time));
    fixed64(b, 8, nanos(d.end_time));
    let kept = d
        .attributes
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != moved)
        .map(|(_, kv)| (kv.key.as_str(), &kv.value));
    attributes(b, 9, kept, s);
    uint(b, 10, u64::from(d.dropped_attributes_count));
    for e in &d.events.events {
        s.item.clear();
        fixed64(&mut s.item, 1, nanos(e.timestamp));
        bytes(&mut s.item, 2, e.name.as_bytes());
        let mut item = std::mem::take(&mut s.item);
        attributes(&mut item, 3, kv_pairs(&e.attributes), s);
        uint(&mut item, 4, u64::from(e.dropped_attributes_count));
        message(b, 11, &item);
        s.item = item;
    }
    uint(b, 12, u64::from(d.events.dropped_count));
    for l in &d.links.links {
        let lc = &l.span_context;
        s.item.clear();
        bytes(&mut s.item, 1, &lc.trace_id().to_bytes());
        bytes(&mut s.item, 2, &lc.span_id().to_bytes());
        bytes(&mut s.item, 3, lc.trace_state().header().as_bytes());
        let mut item = std::mem::take(&mut s.item);
        attributes(&mut item, 4, kv_pairs(&l.attributes), s);
        uint(&mut item, 5, u64::from(l.dropped_attributes_count));
        fixed32(
            &mut item,
            6,
            flags(lc.is_remote(), lc.trace_flags().to_u8()),
        );
        message(b, 13, &item);
        s.item = item;
    }
    uint(b, 14, u64::from(d.links.dropped_count));
    // Status { string message = 2; StatusCode code = 3 }, always present.
    s.item.clear();
    match &d.status {
        Status::Unset => {}
        Status::Ok => uint(&mut s.item, 3, 1),
        Status::Error { description } => {
            bytes(&mut s.item, 2, description.as_bytes());
            uint(&mut s.item, 3, 2);
        }
    }
    message(b, 15, &s.item);
    fixed32(
        b,
        16,
        flags(d.parent_span_is_remote, sc.trace_flags().to_u8()),
    );
}

/// `SpanFlags`: the trace flags and whether the parent was remote (as
/// `opentelemetry-proto` writes them).
fn flags(remote: bool, trace_flags: u8) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(trace_flags) | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

/// `InstrumentationScope` of `scope` into `b`.
fn scope_message(b: &mut Vec<u8>, scope: &InstrumentationScope, s: &mut Scratch) {
    bytes(b, 1, scope.name().as_bytes());
    bytes(b, 2, scope.version().unwrap_or_default().as_bytes());
    attributes(
        b,
        3,
        scope.attributes().map(|kv| (kv.key.as_str(), &kv.value)),
        s,
    );
}

/// The span attribute naming the node that made a span. The encoder
/// says it once per request, as an attribute of the node's resource
/// (with `service.instance.id`), instead of on every span: 64 hex
/// characters that were about a quarter of a pub/sub span's bytes.
pub(crate) const NODE_ATTRIBUTE: &str = "macula.node";

/// The position and text of `d`'s node attribute, if it has one.
fn node_of(d: &SpanData) -> Option<(usize, &str)> {
    // The runtime's spans put it last; look from the end.
    d.attributes
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, kv)| match &kv.value {
            Value::String(v) if kv.key.as_str() == NODE_ATTRIBUTE => Some((i, v.as_str())),
            _ => None,
        })
}

/// Bytes of `v` as a varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes of a length-delimited field of `len` bytes (field numbers below
/// 16: a one-byte key).
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Bytes of a `bytes` field of `len` (omitted when empty).
fn optional_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        field_len(len)
    }
}

/// Writes a length-delimited field `field` into `b` by `write`, in place:
/// two bytes are kept for the length (a span is 128 bytes to 16 KiB) and
/// moved only when it needs one or three.
fn message_in_place(b: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    key(b, field, LEN);
    let at = b.len();
    b.extend_from_slice(&[0, 0]);
    write(b);
    let len = b.len() - at - 2;
    if varint_len(len as u64) == 2 {
        b[at] = len as u8 | 0x80;
        b[at + 1] = (len >> 7) as u8;
    } else {
        let mut v = Vec::with_capacity(10);
        varint(&mut v, len as u64);
        b.splice(at..at + 2, v);
    }
}

/// Encodes export requests (`ExportTraceServiceRequest`) into its own
/// reused buffers: one `ResourceSpans` per node the spans name (the
/// process's resource plus the node's ID), then one `ScopeSpans` per
/// instrumentation scope. Each span is encoded once, in place, into its
/// group's buffer; the enclosing messages' lengths are computed, so the
/// spans are copied once more, into the request.
#[derive(Default)]
pub(crate) struct Encoder {
    /// The `Resource` message's attributes, encoded once per resource.
    resource: Vec<u8>,
    resource_schema: Option<String>,
    out: Vec<u8>,
    /// The resource message of one node's group.
    res: Vec<u8>,
    /// The encoded spans (each a `spans` field) of each (node, scope)
    /// group of a batch, and the group's `InstrumentationScope` message.
    spans: Vec<Vec<u8>>,
    scopes: Vec<Vec<u8>>,
    s: Scratch,
}

impl Encoder {
    pub(crate) fn set_resource(&mut self, r: &opentelemetry_sdk::Resource) {
        let mut s = Scratch::default();
        self.resource.clear();
        attributes(
            &mut self.resource,
            1,
            r.iter().map(|(k, v)| (k.as_str(), v)),
            &mut s,
        );
        self.resource_schema = r.schema_url().map(str::to_string);
    }

    /// The request body for `batch`.
    pub(crate) fn encode(&mut self, batch: &[SpanData]) -> &[u8] {
        // Spans grouped by node and instrumentation scope (nearly always
        // one of each), in the order they first appear.
        let mut groups: Vec<(Option<&str>, &InstrumentationScope)> = Vec::new();
        for d in batch {
            let node = node_of(d);
            let key = (node.map(|(_, n)| n), &d.instrumentation_scope);
            let i = match groups.iter().position(|g| g.0 == key.0 && *g.1 == *key.1) {
                Some(i) => i,
                None => {
                    groups.push(key);
                    if self.spans.len() < groups.len() {
                        self.spans.push(Vec::new());
                        self.scopes.push(Vec::new());
                    }
                    let g = groups.len() - 1;
                    self.spans[g].clear();
                    self.scopes[g].clear();
                    scope_message(&mut self.scopes[g], key.1, &mut self.s);
                    g
                }
            };
            let s = &mut self.s;
            message_in_place(&mut self.spans[i], 2, |b| {
                span(b, d, node.map(|(at, _)| at), s)
            });
        }
        self.out.clear();
        let resource_schema = self.resource_schema.as_deref().unwrap_or_default();
        let mut done = vec![false; groups.len()];
        for first in 0..groups.len() {
            if done[first] {
                continue;
            }
            let node = groups[first].0;
            self.res.clear();
            self.res.extend_from_slice(&self.resource);
            if let Some(id) = node {
                let id = Value::from(id.to_string());
                let kvs = [(NODE_ATTRIBUTE, &id), ("service.instance.id", &id)];
                attributes(&mut self.res, 1, kvs, &mut self.s);
            }
            // ScopeSpans { scope = 1; repeated Span spans = 2; schema_url = 3 }
            let scope_len = |g: usize| {
                field_len(self.scopes[g].len())
                    + self.spans[g].len()
                    + optional_len(groups[g].1.schema_url().unwrap_or_default().len())
            };
            // ResourceSpans { resource = 1; repeated ScopeSpans = 2; schema_url = 3 }
            let mut rs_len = field_len(self.res.len()) + optional_len(resource_schema.len());
            rs_len += (first..groups.len())
                .filter(|&g| groups[g].0 == node)
                .map(|g| field_len(scope_len(g)))
                .sum::<usize>();
            key(&mut self.out, 1, LEN);
            varint(&mut self.out, rs_len as u64);
            message(&mut self.out, 1, &self.res);
            for g in first..groups.len() {
                if groups[g].0 != node {
                    continue;
                }
                done[g] = true;
                key(&mut self.out, 2, LEN);
                varint(&mut self.out, scope_len(g) as u64);
                message(&mut self.out, 1, &self.scopes[g]);
                self.out.extend_from_slice(&self.spans[g]);
                let schema = groups[g].1.schema_url().unwrap_or_default();
                bytes(&mut self.out, 3, schema.as_bytes());
            }
            bytes(&mut self.out, 3, resource_schema.as_bytes());
        }
        &self.out
    }
}

/// The span exporter: POSTs each batch to `<collector>/v1/traces` as
/// `application/x-protobuf`, from the batch processor's own thread.
pub(crate) struct Exporter {
    agent: ureq::Agent,
    url: String,
    encoder: Mutex<Encoder>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").field("url", &self.url).finish()
    }
}

impl Exporter {
    /// An exporter to `base` (`http://HOST:PORT`, already checked).
    pub(crate) fn new(base: &str) -> Exporter {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Exporter {
            agent,
            url: format!("{}/v1/traces", base.trim_end_matches('/')),
            encoder: Mutex::new(Encoder::default()),
        }
    }

    fn send(&self, batch: &[SpanData]) -> OTelSdkResult {
        let mut enc = self.encoder.lock().unwrap_or_else(|p| p.into_inner());
        let body = enc.encode(batch);
        let mut resp = self
            .agent
            .post(&self.url)
            .header("content-type", "application/x-protobuf")
            .send(body)
            .map_err(|e| OTelSdkError::InternalFailure(format!("OTLP export: {e}")))?;
        let status = resp.status();
        // The answer (a partial success, if any) is read and not kept.
        let _ = resp.body_mut().with_config().limit(1 << 20).read_to_vec();
        if status.is_success() {
            Ok(())
        } else {
            Err(OTelSdkError::InternalFailure(format!(
                "OTLP export: the collector answered {status}"
            )))
        }
    }
}

impl SpanExporter for Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        self.send(&batch)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.encoder
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use prost::Message;
    use std::borrow::Cow;

    fn span_data(i: u8, scope: &InstrumentationScope) -> SpanData {
        let sc = SpanContext::new(
            TraceId::from_bytes([i; 16]),
            SpanId::from_bytes([i + 1; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("k", "v")]).unwrap(),
        );
        let mut events = opentelemetry_sdk::trace::SpanEvents::default();
        events.events.push(Event::new(
            "ev",
            UNIX_EPOCH + Duration::from_nanos(1_000_000_123),
            vec![KeyValue::new("n", 3)],
            1,
        ));
        events.dropped_count = 2;
        let mut links = opentelemetry_sdk::trace::SpanLinks::default();
        links.links.push(Link::new(
            SpanContext::new(
                TraceId::from_bytes([9; 16]),
                SpanId::from_bytes([8; 8]),
                TraceFlags::default(),
                true,
                TraceState::default(),
            ),
            vec![KeyValue::new("l", true)],
            0,
        ));
        SpanData {
            span_context: sc,
            parent_span_id: if i.is_multiple_of(2) {
                SpanId::from_bytes([7; 8])
            } else {
                SpanId::INVALID
            },
            parent_span_is_remote: i.is_multiple_of(2),
            span_kind: SpanKind::Consumer,
            name: Cow::Borrowed("macula.deliver"),
            start_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_001),
            end_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_900_002),
            attributes: vec![
                KeyValue::new("macula.topic", "a.b"),
                KeyValue::new("macula.seq", -5i64),
                KeyValue::new("macula.seq.u", 300i64),
                KeyValue::new("f", 1.5),
                KeyValue::new("b", false),
                KeyValue::new("empty", ""),
                KeyValue::new(
                    "arr",
                    Value::Array(Array::String(vec!["x".into(), "y".into()])),
                ),
                KeyValue::new("ints", Value::Array(Array::I64(vec![1, -2]))),
            ],
            dropped_attributes_count: 1,
            events,
            links,
            status: if i == 1 {
                Status::error("it broke")
            } else {
                Status::Unset
            },
            instrumentation_scope: scope.clone(),
        }
    }

    /// What this encoder writes decodes (with the generated protobuf
    /// types) to exactly what `opentelemetry-otlp` would have sent.
    #[test]
    fn encodes_what_opentelemetry_proto_encodes() {
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("macula")
            .build();
        let a = InstrumentationScope::builder("macula").build();
        let b = InstrumentationScope::builder("other")
            .with_version("1.2")
            .with_attributes([KeyValue::new("s", 1)])
            .build();
        let batch: Vec<SpanData> = (0..5)
            .map(|i| span_data(i, if i == 3 { &b } else { &a }))
            .collect();
        let mut enc = Encoder::default();
        enc.set_resource(&resource);
        let ours = ExportTraceServiceRequest::decode(enc.encode(&batch)).unwrap();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                batch.clone(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, theirs);
        // Buffers are reused: a second, smaller batch is not mixed with
        // the first.
        let again = ExportTraceServiceRequest::decode(enc.encode(&batch[..1])).unwrap();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                batch[..1].to_vec(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(again, theirs);
        assert!(enc.encode(&[]).is_empty());
    }

    /// A span's length takes one, two or three bytes: a span under 128
    /// bytes, one of a few hundred and one over 16 KiB are each written in
    /// place (their length prefix moved when it is not two bytes), as
    /// `opentelemetry-proto` encodes them.
    #[test]
    fn spans_of_every_length_prefix() {
        for n in [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut v = Vec::new();
            varint(&mut v, n);
            assert_eq!(varint_len(n), v.len(), "{n}");
        }
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("macula")
            .build();
        let a = InstrumentationScope::builder("macula").build();
        let small = |i: u8| {
            let mut d = span_data(i, &a);
            d.attributes.clear();
            d.events = Default::default();
            d.links = Default::default();
            d.name = Cow::Borrowed("s");
            d
        };
        let mut big = span_data(3, &a);
        big.attributes
            .push(KeyValue::new("big", "x".repeat(20_000)));
        let batch = vec![small(1), span_data(2, &a), big, small(4)];
        let mut enc = Encoder::default();
        enc.set_resource(&resource);
        let mut one = Vec::new();
        span(&mut one, &batch[0], None, &mut Scratch::default());
        assert!(one.len() < 128, "{}", one.len());
        let ours = ExportTraceServiceRequest::decode(enc.encode(&batch)).unwrap();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                batch.clone(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, theirs);
    }

    /// Spans naming their node are sent under one resource per node, the
    /// node's ID said there once (as `macula.node` and
    /// `service.instance.id`) and no longer on each span; spans naming
    /// none keep the process's resource. Otherwise what
    /// `opentelemetry-proto` encodes.
    #[test]
    fn the_node_is_said_once_per_request() {
        let base = || opentelemetry_sdk::Resource::builder().with_service_name("macula");
        let a = InstrumentationScope::builder("macula").build();
        let b = InstrumentationScope::builder("other").build();
        let (n1, n2) = ("1".repeat(64), "2".repeat(64));
        // Nodes n1, n2, none, n1, n2 (its scope b), n1 ...
        let node = |i: u8| match i % 3 {
            0 => Some(&n1),
            1 => Some(&n2),
            _ => None,
        };
        let batch: Vec<SpanData> = (0..9u8)
            .map(|i| {
                let mut d = span_data(i, if i == 4 { &b } else { &a });
                if let Some(n) = node(i) {
                    // Not always last: the encoder finds it anywhere.
                    let at = usize::from(i) % 3;
                    d.attributes
                        .insert(at, KeyValue::new(NODE_ATTRIBUTE, n.clone()));
                }
                d
            })
            .collect();
        let mut enc = Encoder::default();
        enc.set_resource(&base().build());
        let mut ours = ExportTraceServiceRequest::decode(enc.encode(&batch)).unwrap();
        let mut theirs = ExportTraceServiceRequest::default();
        for n in [Some(&n1), Some(&n2), None] {
            let spans: Vec<SpanData> = (0..9u8)
                .filter(|i| node(*i) == n)
                .map(|i| span_data(i, if i == 4 { &b } else { &a }))
                .collect();
            let resource = match n {
                Some(n) => base()
                    .with_attributes([
                        KeyValue::new("macula.node", n.clone()),
                        KeyValue::new("service.instance.id", n.clone()),
                    ])
                    .build(),
                None => base().build(),
            };
            theirs
                .resource_spans
                .extend(group_spans_by_resource_and_scope(
                    spans,
                    &ResourceAttributesWithSchema::from(&resource),
                ));
        }
        for req in [&mut ours, &mut theirs] {
            for rs in &mut req.resource_spans {
                let r = rs.resource.as_mut().unwrap();
                r.attributes.sort_by(|x, y| x.key.cmp(&y.key));
            }
        }
        assert_eq!(ours.resource_spans.len(), 3);
        assert_eq!(ours, theirs);
    }
}
