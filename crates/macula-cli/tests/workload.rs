//! `macula workload run` across real processes: a `macula start` seed, a
//! workload process running the example component (built from source for
//! `wasm32-wasip2`, crates/macula-wasm/guests/example), and `macula call`
//! processes calling its procedures over QUIC through the seed. A call
//! past the fuel limit fails with the limit named and the next call is
//! served; a file whose BLAKE3 hash is not the one given is refused.
#![cfg(feature = "wasm")]

mod common;

use common::*;

const REALM: &str = "test.workload";

fn call(seed: &str, procedure: &str, data: &str) -> (Option<i32>, String) {
    run(command(&[
        "call",
        procedure,
        data,
        "--realm",
        REALM,
        "--connect",
        seed,
        "--retries",
        "0",
        "--timeout",
        "10000",
    ]))
}

/// `GET /metrics` (open to loopback clients), the body.
fn get_metrics(http: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).expect("connect to the admin API");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read the answer");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

#[test]
fn a_workload_process_serves_calls_and_survives_its_fuel_limit() {
    let wasm = example();
    let wasm = wasm.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut seed = Proc::spawn(&start_args(REALM, dir.path(), &[]));
    let addr = seed.field("listen");

    // A tampered hash: refused before joining, exit code 1, the reason named.
    let wrong = "00".repeat(32);
    let (code, out) = run(command(&[
        "workload",
        "run",
        "bad",
        wasm,
        "--blake3",
        &wrong,
        "--realm",
        REALM,
        "--connect",
        &addr,
    ]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("BLAKE3 hash"), "{out}");

    let mut w = Proc::spawn(&[
        "workload",
        "run",
        "demo",
        wasm,
        "--config",
        "prefix=demo",
        "--fuel",
        "20000000",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--realm",
        REALM,
        "--connect",
        &addr,
    ]);
    let http = w.field("admin http");
    w.wait_for(&["running demo", "demo.echo"]);

    let (code, out) = call(&addr, "demo.echo", "hello");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("hello"), "{out}");

    let (code, out) = call(&addr, "demo.spin", "");
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("fuel limit reached (wasm.fuel_per_call = 20000000)"),
        "{out}"
    );

    // The workload process goes on with a new instance.
    let (code, out) = call(&addr, "demo.echo", "again");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("again"), "{out}");

    // The limit is counted in the workload node's /metrics.
    let text = get_metrics(&http);
    for needle in [
        "macula_wasm_limit_hits_total{app=\"demo\",limit=\"fuel\"} 1",
        "macula_wasm_calls_total{app=\"demo\",outcome=\"ok\"} 2",
        "macula_wasm_instances_total{app=\"demo\"} 2",
        "macula_wasm_workloads 1",
    ] {
        assert!(text.contains(needle), "{needle} in\n{text}");
    }

    // SIGTERM: it withdraws and exits 0.
    assert_eq!(w.terminate(), Some(0));
    drop(seed);
}
