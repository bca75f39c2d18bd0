//! Distributed tracing across three processes (issue 23): a publish on A
//! delivered on C through gateway B, and a call from A answered by a
//! provider on C through B, each exported by every process to an OTLP/HTTP
//! receiver in this test. The spans must form one trace per operation with
//! parents chained across the nodes, and name topic, procedure and node.
//!
//! A and C are lightweight clients of B (`macula pub`/`call`, `macula
//! sub`/`serve`): B really forwards both the message and the call.
#![cfg(feature = "otlp")]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message as _;

const REALM: &str = "test.tracing";

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An attribute as (key, its value as text).
fn text(kv: &KeyValue) -> (String, String) {
    let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    };
    (kv.key.clone(), v)
}

/// An OTLP/HTTP receiver on 127.0.0.1: decodes every export request
/// (protobuf) into `spans`.
fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(Mutex::new(Vec::new()));
    let out = spans.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let spans = spans.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let (mut len, mut path, mut line) = (0usize, String::new(), String::new());
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if path.is_empty() {
                            path = l.to_string();
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                    }
                    assert!(path.starts_with("POST /v1/traces "), "{path}");
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).unwrap();
                    let req = ExportTraceServiceRequest::decode(&body[..]).expect("OTLP protobuf");
                    let mut got = spans.lock().unwrap();
                    for rs in req.resource_spans {
                        // The node that made the spans is said once, by
                        // their resource; a reader sees it on each span.
                        let resource: Vec<(String, String)> = rs
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter().map(text))
                            .collect();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                let own: Vec<(String, String)> =
                                    s.attributes.iter().map(text).collect();
                                assert!(
                                    own.iter().all(|(k, _)| k != "macula.node"),
                                    "{}: the node ID belongs to the resource",
                                    s.name
                                );
                                let attrs = own.into_iter().chain(resource.clone()).collect();
                                got.push(Span {
                                    name: s.name,
                                    trace_id: hex(&s.trace_id),
                                    span_id: hex(&s.span_id),
                                    parent: hex(&s.parent_span_id),
                                    attrs,
                                });
                            }
                        }
                    }
                    drop(got);
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if w.write_all(ok.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, out)
}

/// Waits until the spans named `names` (in that order: each the parent of
/// the next) have arrived in one trace; returns them.
fn chain(spans: &Mutex<Vec<Span>>, names: &[&str], attr: (&str, &str)) -> Vec<Span> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = spans.lock().unwrap().clone();
        for first in got.iter().filter(|s| {
            s.name == names[0] && s.attrs.get(attr.0).map(String::as_str) == Some(attr.1)
        }) {
            let mut path = vec![first.clone()];
            for name in &names[1..] {
                let prev = path.last().unwrap();
                match got.iter().find(|s| {
                    s.name == *name && s.parent == prev.span_id && s.trace_id == prev.trace_id
                }) {
                    Some(s) => path.push(s.clone()),
                    None => break,
                }
            }
            if path.len() == names.len() {
                return path;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no chain {names:?} among {:#?}",
            got.iter()
                .map(|s| (&s.name, &s.trace_id, &s.span_id, &s.parent))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_of(p: &mut Proc) -> String {
    p.field("node_id")
}

#[test]
fn a_publish_and_a_call_are_traced_across_three_processes() {
    let (url, spans) = receiver();
    let dir = tempfile::tempdir().unwrap();
    let mut args = start_args(REALM, dir.path(), &[]);
    args.extend(["--otlp", url.as_str()]);
    let mut b = Proc::spawn(&args);
    let addr = b.field("listen");
    let b_id = node_of(&mut b);
    let client = |cmd: &[&str]| {
        let mut v: Vec<&str> = cmd.to_vec();
        v.extend(["--realm", REALM, "--connect", &addr, "--otlp", &url]);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let spawn = |v: Vec<String>| Proc::spawn(&v.iter().map(String::as_str).collect::<Vec<_>>());

    // C: a subscriber (`macula trace`, which shows trace IDs) and a provider.
    let mut sub = spawn(client(&["trace", "orders.*", "--count", "1"]));
    sub.wait_for(&["subscribed to orders.*"]);
    let mut serve = spawn(client(&["serve", "billing.charge", "--echo"]));
    serve.wait_for(&["serving", "billing.charge"]);

    // A: publish one message, then call.
    let (code, out) = run(command(
        &client(&["pub", "orders.new", "book"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    assert_eq!(code, Some(0), "{out}");
    let line = sub.wait_for(&["orders.new", "book"]);
    let (code, out) = run(command(
        &client(&["call", "billing.charge", "x"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    assert_eq!(code, Some(0), "{out}");

    // publish (A) -> forward (B) -> deliver (C).
    let p = chain(
        &spans,
        &["macula.publish", "macula.gateway.forward", "macula.deliver"],
        ("macula.topic", "orders.new"),
    );
    assert_eq!(p[1].attrs["macula.node"], b_id, "B forwarded");
    let (a_id, c_id) = (&p[0].attrs["macula.node"], &p[2].attrs["macula.node"]);
    assert!(a_id != &b_id && c_id != &b_id && a_id != c_id, "{p:#?}");
    assert_eq!(p[1].attrs["macula.topic"], "orders.new");
    assert_eq!(p[2].attrs["macula.topic"], "orders.new");
    assert_eq!(&p[2].attrs["macula.publisher"], a_id);
    assert!(p[0].parent.is_empty() || p[0].parent == "0000000000000000");
    // `macula trace` printed the message's trace ID.
    assert!(
        line.contains(&format!("trace={}", p[0].trace_id)),
        "{line} / {}",
        p[0].trace_id
    );

    // call (A) -> forward (B) -> onward call (B) -> handle (C) -> reply (C).
    let c = chain(
        &spans,
        &[
            "macula.call",
            "macula.gateway.forward",
            "macula.call",
            "macula.handle",
            "macula.reply",
        ],
        ("macula.procedure", "billing.charge"),
    );
    assert_eq!(c[1].attrs["macula.node"], b_id);
    assert_eq!(c[2].attrs["macula.node"], b_id);
    assert_eq!(c[1].attrs["macula.procedure"], "billing.charge");
    assert_eq!(c[3].attrs["macula.procedure"], "billing.charge");
    let (ca, cc) = (&c[0].attrs["macula.node"], &c[3].attrs["macula.node"]);
    assert!(ca != &b_id && cc != &b_id && ca != cc, "{c:#?}");
    assert_eq!(&c[3].attrs["macula.caller"], &b_id, "C was called by B");
    assert_eq!(c[4].attrs["macula.ok"], "true");
    assert_ne!(c[0].trace_id, p[0].trace_id, "one trace per operation");
}

#[test]
fn otlp_flags_are_checked() {
    let (code, out) = run(command(&[
        "pub",
        "a.b",
        "x",
        "--otlp",
        "https://127.0.0.1:4318",
    ]));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("expected http://HOST:PORT"), "{out}");
    let (code, out) = run(command(&["sub", "a.*", "--trace-sample", "2"]));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("expected a number from 0 to 1"), "{out}");
    // `macula start` reads them as settings (flag, environment, file).
    let dir = tempfile::tempdir().unwrap();
    let mut args = start_args(REALM, dir.path(), &[]);
    args.extend(["--trace-sample", "1.5"]);
    let (code, out) = run(command(&args));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--trace-sample"), "{out}");
}
