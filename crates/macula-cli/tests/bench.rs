//! `macula bench connections`, `bench rpc`, `bench crdt`, `bench authz`, `bench e2e`, `bench tracing` and `bench stream` with small counts, as
//! tests: each starts its own node process on 127.0.0.1, runs to the end and
//! prints one JSON object whose figures are present and plausible. (The
//! figures themselves are benchmarks, in BENCHMARKS.md, not asserted here.)

mod common;

use std::time::Duration;

use common::*;

/// Runs `macula bench <args>` to completion (bounded) and returns its JSON.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = command(&[&["bench"], args].concat());
    cmd.env("RUST_LOG", "warn");
    let mut p = Proc::spawn_cmd(cmd);
    let line = p
        .poll_for(&["{\"benchmark\""], Duration::from_secs(240))
        .unwrap_or_else(|| panic!("no JSON figures; output:\n{}", p.seen.join("\n")));
    let status = p.wait_exit(Duration::from_secs(30)).expect("bench exits");
    assert!(status.success(), "{status:?}\n{}", p.seen.join("\n"));
    serde_json::from_str(&line).expect("one JSON object")
}

#[test]
fn bench_connections_reports_memory_cpu_and_latency_per_connection() {
    let v = bench_json(&[
        "connections",
        "--count",
        "40",
        "--idle-secs",
        "1",
        "--samples",
        "20",
        "--json",
    ]);
    assert_eq!(v["benchmark"], "connections");
    assert_eq!(v["connections"], 40, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    let rss = v["rss_bytes"].as_u64().expect("rss_bytes");
    let before = v["rss_before_bytes"].as_u64().expect("rss_before_bytes");
    assert!(rss > before, "{v}");
    let per = v["bytes_per_connection"]
        .as_u64()
        .expect("bytes_per_connection");
    assert_eq!(per, (rss - before) / 40, "{v}");
    assert!(
        v["idle_cpu_percent"].as_f64().is_some_and(|c| c >= 0.0),
        "{v}"
    );
    for k in [
        "rpc_baseline",
        "rpc_loaded",
        "pubsub_baseline",
        "pubsub_loaded",
    ] {
        assert_eq!(v[k]["samples"], 20, "{k}: {v}");
        assert!(v[k]["p99_us"].as_f64().is_some_and(|p| p > 0.0), "{k}: {v}");
    }
}

#[test]
fn bench_connections_refuses_bad_arguments() {
    for (args, says) in [
        (vec!["--count", "1"], "--count"),
        (vec!["--node", "198.18.0.1:4433"], "loopback"),
        (vec!["--keep-alive-ms", "5"], "--keep-alive-ms"),
    ] {
        let (code, out) = run(command(&[&["bench", "connections"], &args[..]].concat()));
        assert_eq!(code, Some(1), "{args:?}: {out}");
        assert!(out.contains(says), "{args:?}: {out}");
    }
}

#[test]
fn bench_rpc_measures_node_to_node_calls() {
    let v = bench_json(&[
        "rpc",
        "--count",
        "200",
        "--concurrency",
        "4",
        "--fresh",
        "5",
        "--json",
    ]);
    assert_eq!(v["benchmark"], "rpc");
    assert_eq!(v["new_connection_per_call"]["latency"]["samples"], 5, "{v}");
    assert!(v["calls_per_sec"].as_f64().is_some_and(|r| r > 0.0), "{v}");
}

#[test]
fn bench_crdt_converges_across_node_processes() {
    let v = bench_json(&["crdt", "--nodes", "3", "--adds", "5", "--json"]);
    assert_eq!(v["benchmark"], "crdt");
    assert_eq!(v["nodes"], 3, "{v}");
    assert!(
        v["converged_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{v}"
    );
}

#[test]
fn bench_authz_compares_an_open_realm_with_a_granted_one() {
    let v = bench_json(&[
        "authz",
        "--handshakes",
        "5",
        "--messages",
        "500",
        "--calls",
        "50",
        "--rounds",
        "1",
        "--json",
    ]);
    assert_eq!(v["benchmark"], "authz");
    assert_eq!(v["rules"], 1000);
    for figure in ["handshake_p50_us", "publish_msgs_per_s", "calls_per_s"] {
        assert!(v[figure]["ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    }
}

/// `bench e2e` runs both modes on one mesh and really seals: every
/// message and call of the encrypted rounds (throughput and latency, both
/// sizes).
#[test]
fn bench_e2e_compares_clear_with_encrypted_payloads() {
    let v = bench_json(&[
        "e2e",
        "--messages",
        "300",
        "--large-messages",
        "30",
        "--latency-messages",
        "10",
        "--calls",
        "40",
        "--latency-calls",
        "5",
        "--rpc-concurrency",
        "4",
        "--rounds",
        "1",
        "--json",
    ]);
    assert_eq!(v["benchmark"], "e2e");
    assert_eq!(v["sealed"], 300 + 30 + 2 * 10);
    // Every call of the encrypted round was sealed by the client and
    // opened by the provider (and at least one warming call per size).
    let sealed = v["calls_sealed"].as_u64().expect("calls_sealed");
    assert!(sealed >= 2 * (40 + 5 + 1), "{v}");
    assert_eq!(v["calls_opened"], sealed, "{v}");
    for figure in [
        "publish_64B_msgs_per_s",
        "latency_16KiB_p50_us",
        "rpc_64B_calls_per_s",
        "rpc_latency_16KiB_p50_us",
    ] {
        assert!(v[figure]["ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    }
}

/// `bench tracing` runs every mode and really exports: nothing when off or
/// at 0%, something at 1% and 100% (the sink in its own process counts it).
#[cfg(feature = "otlp")]
#[test]
fn bench_tracing_compares_off_with_sampled_tracing() {
    let v = bench_json(&[
        "tracing",
        "--messages",
        "2000",
        "--latency-count",
        "100",
        "--calls",
        "500",
        "--concurrency",
        "4",
        "--rounds",
        "1",
        "--mixed-messages",
        "3000",
        "--mixed-count",
        "150",
        "--json",
    ]);
    assert_eq!(v["benchmark"], "tracing");
    // The interleaved runs: off, 0% and 1% each measured (not 100%).
    for mode in ["off", "0%", "1%"] {
        let m = &v["interleaved"][mode];
        for figure in [
            "publish_msgs_per_s",
            "publish_cpu_us",
            "publish_p50_us",
            "call_p50_us",
        ] {
            assert!(
                m[figure].as_f64().is_some_and(|x| x > 0.0),
                "{mode} {figure}: {v}"
            );
        }
    }
    assert!(v["interleaved"]["100%"].is_null(), "{v}");
    for mode in ["off", "0%", "1%", "100%"] {
        assert!(v["publish_msgs_per_s"][mode].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["calls_per_s"][mode].as_f64().unwrap() > 0.0, "{v}");
    }
    let exported = |mode: &str| {
        v["rounds"][mode][0]["spans_exported_bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(exported("off"), 0, "{v}");
    assert_eq!(exported("0%"), 0, "{v}");
    // 1% of the operations: far fewer spans than all of them.
    assert!(exported("100%") > 10 * exported("1%").max(1), "{v}");
    assert!(v["otlp_requests"].as_u64().unwrap() > 0, "{v}");
}

/// `bench tracing --modes` runs only the modes given, in their order (for
/// instruction counts under callgrind, one mode a run); an unknown one is
/// refused, naming it.
#[cfg(feature = "otlp")]
#[test]
fn bench_tracing_runs_the_modes_given() {
    let v = bench_json(&[
        "tracing",
        "--modes",
        "100%,off",
        "--messages",
        "500",
        "--latency-count",
        "20",
        "--calls",
        "50",
        "--concurrency",
        "2",
        "--rounds",
        "1",
        "--mixed-messages",
        "0",
        "--mixed-count",
        "0",
        "--json",
    ]);
    assert_eq!(v["modes"], serde_json::json!(["100%", "off"]), "{v}");
    assert!(
        v["publish_msgs_per_s"]["100%"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(
        v["publish_msgs_per_s"]["off"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(v["publish_msgs_per_s"]["1%"].is_null(), "{v}");
    assert!(v["rounds"]["0%"].is_null(), "{v}");
    assert!(v["interleaved"].is_null(), "{v}");
    let out = command(&["bench", "tracing", "--modes", "off,2%"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no mode \"2%\""), "{err}");
}

#[test]
fn bench_stream_reports_publishes_replay_restart_and_an_emptied_work_queue() {
    // Macula only (CI has no nats-server); the work queue run fails unless
    // every acknowledgement removed its message.
    let v = bench_json(&[
        "stream",
        "--no-nats",
        "--sync",
        "2m",
        "--msgs",
        "300",
        "--replay",
        "300",
        "--latency-count",
        "20",
        "--json",
    ]);
    assert_eq!(v["benchmark"], "stream", "{v}");
    let s = &v["sides"][0];
    assert_eq!(s["target"], "macula/120000ms", "{v}");
    assert_eq!(s["replayed"], 300, "{v}");
    for k in [
        "publish_64_per_s",
        "publish_1k_per_s",
        "replay_per_s",
        "restart_ms",
        "work_acked_per_s",
    ] {
        assert!(s[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {v}");
    }
    assert!(
        s["publish_latency_64"]["p50_us"]
            .as_f64()
            .is_some_and(|p| p > 0.0),
        "{v}"
    );
}
