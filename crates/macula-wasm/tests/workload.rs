//! Workloads on real nodes over QUIC on loopback: a component's procedure
//! called from another node, its subscription, its host calls (call,
//! publish, KV), its limits (memory, fuel) stopping one call cleanly while
//! the node and the workload go on, and components refused.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use macula::{Error, Node, RpcError, SubscriptionItem};
use macula_wasm::{WasmError, WasmHost, WasmLimits, CODE_LIMIT};

const STEP: Duration = Duration::from_secs(20);

async fn within<F: std::future::IntoFuture>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f.into_future())
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn builder(realm: &str) -> macula::NodeBuilder {
    Node::builder()
        .realm(realm)
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
}

async fn pair(realm: &str) -> (Node, Node) {
    let a = within("a starts", builder(realm).start()).await.expect("a");
    let b = within(
        "b joins",
        builder(realm)
            .bootstrap([a.local_addr().to_string()])
            .start(),
    )
    .await
    .expect("b");
    (a, b)
}

fn config(prefix: &str) -> Vec<(String, String)> {
    vec![("prefix".to_string(), prefix.to_string())]
}

fn handler_error(e: &Error) -> (i64, String) {
    match e.as_rpc() {
        Some(RpcError::Handler { code, message, .. }) => (*code, message.clone()),
        _ => panic!("expected a handler error, got {e}"),
    }
}

fn metric(host: &WasmHost) -> String {
    let mut reg = prometheus_client::registry::Registry::default();
    host.register(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_serves_a_procedure_to_another_node_and_takes_events() {
    let (a, b) = pair("test.wasm.serve").await;
    let host = WasmHost::new(WasmLimits::default()).expect("host");
    let compiled = host
        .compile("demo", common::example(), None)
        .expect("compiles");
    let w = within("start", host.start(&a, "demo", &compiled, config("demo")))
        .await
        .expect("the workload starts");
    assert!(w.procedures().iter().any(|p| p == "demo.echo"));
    assert_eq!(w.patterns(), ["demo.in".to_string()]);
    assert_eq!(w.hash(), blake3::hash(common::example()).to_hex().as_str());

    // From the other node, over QUIC, through discovery.
    let r = within("echo", b.call("demo.echo", "hello").timeout(STEP))
        .await
        .expect("the component answers");
    assert_eq!(r.payload, "hello");
    assert_eq!(r.provider, a.id());

    // The component's own error reaches the caller with its code.
    let e = within("fail", b.call("demo.fail", "").timeout(STEP).retries(0))
        .await
        .expect_err("it fails");
    assert_eq!(handler_error(&e), (7, "asked to fail".to_string()));

    // The component calls a native procedure of node b through the host.
    let _native = b
        .advertise("native.ping", |req: macula::Request| async move {
            let mut out = b"pong:".to_vec();
            out.extend_from_slice(&req.payload);
            Ok(Bytes::from(out))
        })
        .await
        .expect("advertise");
    let r = within("relay", b.call("demo.relay", "native.ping").timeout(STEP))
        .await
        .expect("the component's call goes through");
    assert_eq!(r.payload, "pong:ping");

    // Events: b publishes to demo.in, the component publishes seen:... to
    // demo.out, which b takes.
    let mut out = b.subscribe("demo.out").await.expect("subscribe");
    within(
        "interest reaches b",
        b.wait_for_subscribers("demo.in", STEP),
    )
    .await
    .expect("interest");
    b.publish("demo.in", "event-1").await.expect("publish");
    let item = within("seen", out.next()).await.expect("open");
    match item {
        SubscriptionItem::Event(e) => assert_eq!(e.payload, "seen:event-1"),
        other => panic!("{other:?}"),
    }

    let text = metric(&host);
    assert!(
        text.contains("macula_wasm_calls_total{app=\"demo\",outcome=\"ok\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("macula_wasm_calls_total{app=\"demo\",outcome=\"error\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("macula_wasm_events_total{app=\"demo\",outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("macula_wasm_workloads 1"), "{text}");

    // Stopping withdraws the procedure.
    w.stop().await;
    let e = within(
        "after stop",
        b.call("demo.echo", "x")
            .timeout(Duration::from_secs(2))
            .retries(0),
    )
    .await
    .expect_err("nobody serves it any more");
    assert!(e.as_rpc().is_some(), "{e}");
    assert!(metric(&host).contains("macula_wasm_workloads 0"));
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_reads_and_writes_the_raft_kv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = within(
        "a starts",
        builder("test.wasm.kv").data_dir(dir.path()).start(),
    )
    .await
    .expect("a");
    let g = within("group", a.raft_group("apps", [a.id()]))
        .await
        .expect("a one-member group");
    within("leader", async {
        while g.leader().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let host = WasmHost::new(WasmLimits::default()).expect("host");
    let compiled = host.compile("kv", common::example(), None).expect("ok");
    let w = host
        .start(&a, "kv", &compiled, config("kv"))
        .await
        .expect("starts");
    let r = within(
        "kv",
        w.call("kv.kv", Bytes::from_static(b"apps/colour=blue")),
    )
    .await
    .expect("written and read back");
    assert_eq!(r, "blue");
    let stored = within("read", a.kv("apps", STEP).get("colour"))
        .await
        .expect("read")
        .expect("present");
    assert_eq!(stored.value, b"blue");
    drop(w);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_fuel_limits_stop_one_call_and_the_workload_goes_on() {
    let (a, b) = pair("test.wasm.limits").await;
    let limits = WasmLimits {
        max_memory_bytes: 8 << 20,
        fuel_per_call: 50_000_000,
        ..WasmLimits::default()
    };
    let host = WasmHost::new(limits).expect("host");
    let compiled = host.compile("lim", common::example(), None).expect("ok");
    let _w = host
        .start(&a, "lim", &compiled, config("lim"))
        .await
        .expect("starts");

    let e = within("hog", b.call("lim.hog", "").timeout(STEP).retries(0))
        .await
        .expect_err("the memory limit stops it");
    let (code, message) = handler_error(&e);
    assert_eq!(code, CODE_LIMIT, "{message}");
    assert!(
        message.contains("memory limit reached (wasm.max_memory_bytes = 8388608)"),
        "{message}"
    );

    let e = within("spin", b.call("lim.spin", "").timeout(STEP).retries(0))
        .await
        .expect_err("the fuel limit stops it");
    let (code, message) = handler_error(&e);
    assert_eq!(code, CODE_LIMIT, "{message}");
    assert!(
        message.contains("fuel limit reached (wasm.fuel_per_call = 50000000)"),
        "{message}"
    );

    // The node and the workload go on: a new instance answers.
    let r = within("echo", b.call("lim.echo", "still here").timeout(STEP))
        .await
        .expect("served by a new instance");
    assert_eq!(r.payload, "still here");

    let text = metric(&host);
    for needle in [
        "macula_wasm_limit_hits_total{app=\"lim\",limit=\"memory\"} 1",
        "macula_wasm_limit_hits_total{app=\"lim\",limit=\"fuel\"} 1",
        "macula_wasm_calls_total{app=\"lim\",outcome=\"memory_limit\"} 1",
        "macula_wasm_calls_total{app=\"lim\",outcome=\"fuel_limit\"} 1",
        "macula_wasm_instances_total{app=\"lim\"} 3",
    ] {
        assert!(text.contains(needle), "{needle} in\n{text}");
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_invalid_or_oversized_components_are_refused() {
    let host = WasmHost::new(WasmLimits {
        max_component_bytes: 1 << 20,
        ..WasmLimits::default()
    })
    .expect("host");
    let good = common::example();
    let hash = blake3::hash(good).to_hex().to_string();
    host.compile("ok", good, Some(&hash))
        .expect("the right hash");

    // One byte changed: the hash no longer matches.
    let mut tampered = good.to_vec();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x55;
    match host.compile("t", &tampered, Some(&hash)) {
        Err(WasmError::HashMismatch { expected, actual }) => {
            assert_eq!(expected, hash);
            assert_ne!(actual, hash);
        }
        Err(other) => panic!("expected HashMismatch, got {other}"),
        Ok(_) => panic!("a tampered component was accepted"),
    }
    // Truncated, or not WebAssembly at all: not a valid component.
    for (what, bytes) in [
        ("truncated", &good[..good.len() / 2]),
        ("text", b"definitely not wasm".as_slice()),
        // A core module (no component layer).
        ("core module", b"\0asm\x01\0\0\0".as_slice()),
    ] {
        match host.compile("bad", bytes, None) {
            Err(WasmError::Invalid(reason)) => assert!(!reason.is_empty(), "{what}"),
            Err(other) => panic!("{what}: expected Invalid, got {other}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    let big = vec![0u8; (1 << 20) + 1];
    assert!(matches!(
        host.compile("big", &big, None),
        Err(WasmError::TooLarge { .. })
    ));
    let text = metric(&host);
    for needle in [
        "macula_wasm_refused_total{reason=\"hash_mismatch\"} 1",
        "macula_wasm_refused_total{reason=\"invalid\"} 3",
        "macula_wasm_refused_total{reason=\"too_large\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_workload_of_the_same_name_or_past_the_limit_is_refused() {
    let a = within("a", builder("test.wasm.count").start())
        .await
        .expect("a");
    let host = WasmHost::new(WasmLimits {
        max_workloads: 1,
        ..WasmLimits::default()
    })
    .expect("host");
    let compiled = host.compile("one", common::example(), None).expect("ok");
    let w = host
        .start(&a, "one", &compiled, config("one"))
        .await
        .expect("the first starts");
    let e = host
        .start(&a, "one", &compiled, config("one2"))
        .await
        .expect_err("same name");
    assert!(matches!(e, WasmError::AlreadyRunning(_)), "{e}");
    let e = host
        .start(&a, "two", &compiled, config("two"))
        .await
        .expect_err("past max_workloads");
    assert!(e.to_string().contains("wasm.max_workloads (1)"), "{e}");
    drop(w);
    // A component whose init fails (here: it asks to serve an invalid
    // name) is refused with its reason, and takes no slot.
    let e = host
        .start(&a, "bad", &compiled, config("bad name"))
        .await
        .expect_err("init fails");
    assert!(matches!(e, WasmError::Init { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("invalid procedure \"bad name.echo\""),
        "{e}"
    );
    let text = metric(&host);
    assert!(
        text.contains("macula_wasm_refused_total{reason=\"init_failed\"} 1"),
        "{text}"
    );
    // Its slot is free again.
    let w = host
        .start(&a, "two", &compiled, config("two"))
        .await
        .expect("starts once the first stopped");
    drop(w);
    a.shutdown().await;
}
