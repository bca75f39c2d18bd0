//! `macula trace`: follows a pattern through a running daemon and prints
//! each message with its receive time and publisher.

mod common;

use common::*;

const REALM: &str = "test.trace";

#[test]
fn trace_prints_time_publisher_topic_and_payload() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Proc::spawn(&start_args(REALM, dir.path(), &[]));
    let addr = node.field("listen");

    let mut trace = Proc::spawn(&[
        "trace",
        "orders.**",
        "--count",
        "2",
        "--realm",
        REALM,
        "--connect",
        &addr,
    ]);
    trace.wait_for(&["subscribed to orders.**"]);
    let mut json = Proc::spawn(&[
        "trace",
        "orders.*",
        "--count",
        "1",
        "--json",
        "--realm",
        REALM,
        "--connect",
        &addr,
    ]);
    json.wait_for(&["subscribed to orders.*"]);

    let (code, out) = run(command(&[
        "pub",
        "orders.new",
        "book",
        "--count",
        "2",
        "--realm",
        REALM,
        "--connect",
        &addr,
    ]));
    assert_eq!(code, Some(0), "{out}");

    let line = trace.wait_for(&["seq=1", "orders.new", "book"]);
    // `2026-11-23T21:21:27.123456Z  <52-char node ID>  seq=1  orders.new  book`
    let fields: Vec<&str> = line.split("  ").collect();
    assert_eq!(fields.len(), 5, "{line}");
    let ts = fields[0];
    assert_eq!(ts.len(), 27, "{line}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{line}");
    assert_eq!(fields[1].len(), 52, "full publisher ID: {line}");
    trace.wait_for(&["seq=2", "orders.new"]);

    let line = json.wait_for(&["\"ts\""]);
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(v["topic"], "orders.new");
    assert_eq!(v["payload"], "book");
    assert_eq!(v["publisher"].as_str().map(str::len), Some(52));
}
