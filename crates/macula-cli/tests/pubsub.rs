//! Pub/sub across real processes: three `macula start` daemons in a line
//! (A; B through A; C through B), a `macula sub` joining through C and a
//! `macula pub` joining through A.

mod common;

use common::*;

const REALM: &str = "test.pubsub";

fn line() -> (Vec<Proc>, Vec<String>, Vec<tempfile::TempDir>) {
    let mut procs = Vec::new();
    let mut addrs: Vec<String> = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let mut extra = vec![];
        if let Some(prev) = addrs.last() {
            extra.extend_from_slice(&["--bootstrap", prev.as_str()]);
        }
        let mut p = Proc::spawn(&start_args(REALM, dir.path(), &extra));
        let addr = p.field("listen");
        if i > 0 {
            p.wait_for(&["joined the DHT"]);
        }
        procs.push(p);
        addrs.push(addr);
        dirs.push(dir);
    }
    (procs, addrs, dirs)
}

#[test]
fn sub_through_c_receives_what_pub_through_a_sends() {
    let (mut nodes, addrs, _dirs) = line();
    let mut sub = Proc::spawn(&[
        "sub",
        "sensor.**",
        "--count",
        "3",
        "--json",
        "--realm",
        REALM,
        "--connect",
        &addrs[2],
    ]);
    sub.wait_for(&["subscribed to sensor.**"]);

    let (code, out) = run(command(&[
        "pub",
        "sensor.temp.room1",
        "21.5",
        "--count",
        "3",
        "--realm",
        REALM,
        "--connect",
        &addrs[0],
    ]));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("published 3 message(s) to sensor.temp.room1"),
        "{out}"
    );

    let mut seqs = Vec::new();
    for _ in 0..3 {
        let line = sub.wait_for(&["\"topic\":\"sensor.temp.room1\""]);
        // Remove it so the next wait finds the next line.
        sub.seen.retain(|l| l != &line);
        let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
        assert_eq!(v["payload"], "21.5");
        seqs.push(v["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "in order: {seqs:?}");
    // --count 3: the subscriber exits by itself, cleanly.
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Ok(Some(s)) = sub.child.try_wait() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "sub did not exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success());
    for n in &mut nodes {
        assert_eq!(n.terminate(), Some(0));
    }
}

/// `macula pub` through `via` in the background: `count` messages at `rate`.
fn pub_proc(via: &str, topic: &str, data: &str, count: u64, rate: u64) -> Proc {
    Proc::spawn(&[
        "pub",
        topic,
        data,
        "--count",
        &count.to_string(),
        "--rate",
        &rate.to_string(),
        "--realm",
        REALM,
        "--connect",
        via,
    ])
}

#[test]
fn ten_thousand_messages_arrive_in_order_per_publisher_without_duplicates() {
    // Two publishers at once, through A and through B; the subscriber joins
    // through C (which knows only B). Paced so that no queue legitimately
    // overflows: then nothing may be missing either.
    const FROM_A: u64 = 10_000;
    const FROM_B: u64 = 2_000;
    let (mut nodes, addrs, _dirs) = line();
    let total = FROM_A + FROM_B;
    let mut sub = Proc::spawn(&[
        "sub",
        "sensor.**",
        "--count",
        &total.to_string(),
        "--json",
        "--realm",
        REALM,
        "--connect",
        &addrs[2],
    ]);
    sub.wait_for(&["subscribed to sensor.**"]);
    let mut pubs = [
        pub_proc(&addrs[0], "sensor.temp.room1", "a", FROM_A, 2_500),
        pub_proc(&addrs[1], "sensor.hum.room2", "b", FROM_B, 500),
    ];

    // publisher -> (payload, seqs in arrival order)
    let mut by_publisher: std::collections::BTreeMap<String, (String, Vec<u64>)> =
        Default::default();
    let mut other = Vec::new();
    let mut events = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while events < total {
        let Some(line) = sub.next_line(deadline) else {
            panic!("{events} of {total} events before the deadline; other output: {other:?}");
        };
        if !line.starts_with('{') {
            other.push(line);
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
        let publisher = v["publisher"].as_str().expect("publisher").to_string();
        let payload = v["payload"].as_str().expect("payload").to_string();
        let seq = v["seq"].as_u64().expect("seq");
        let entry = by_publisher
            .entry(publisher)
            .or_insert_with(|| (payload.clone(), Vec::new()));
        assert_eq!(entry.0, payload, "one payload per publisher");
        entry.1.push(seq);
        events += 1;
    }
    let status = sub.wait_exit(WAIT).expect("sub exits after --count");
    assert!(status.success(), "sub: {status}");
    for p in &mut pubs {
        let status = p.wait_exit(WAIT).expect("pub exits");
        assert!(status.success(), "pub: {status}; {:?}", p.seen);
    }

    assert_eq!(
        by_publisher.len(),
        2,
        "two publishers: {:?}",
        by_publisher.keys()
    );
    for (publisher, (payload, seqs)) in &by_publisher {
        let want = if payload == "a" { FROM_A } else { FROM_B };
        // In order, no duplicate, none missing: exactly 1, 2, ..., want.
        let first_bad = seqs
            .iter()
            .zip(1u64..)
            .position(|(got, expected)| *got != expected);
        assert!(
            first_bad.is_none() && seqs.len() as u64 == want,
            "publisher {publisher} ({payload:?}): {} events, first out of place at {first_bad:?} \
             (around {:?}); sub said {other:?}",
            seqs.len(),
            first_bad.map(|i| &seqs[i.saturating_sub(2)..(i + 3).min(seqs.len())]),
        );
    }
    for n in &mut nodes {
        assert_eq!(n.terminate(), Some(0));
    }
}

#[test]
fn pub_and_sub_refuse_bad_topics_with_the_reason() {
    // Checked before joining, so no mesh is needed to see the error.
    let (code, out) = run(command(&["pub", "a.*", "x", "--connect", "127.0.0.1:9"]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid topic \"a.*\""), "{out}");
    let (code, out) = run(command(&["sub", "a..b", "--connect", "127.0.0.1:9"]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid pattern \"a..b\""), "{out}");
    let (code, out) = run(command(&[
        "pub",
        "a",
        "x",
        "--rate=-1",
        "--connect",
        "127.0.0.1:9",
    ]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--rate"), "{out}");
}

/// `macula bench pubsub` with small counts, as a test: it starts its own
/// subscriber processes and prints one JSON object with the figures.
fn bench_command(extra: &[&str]) -> std::process::Command {
    let mut args = vec![
        "bench",
        "pubsub",
        "--json",
        "--latency-count",
        "200",
        "--fanout",
        "2",
    ];
    args.extend_from_slice(extra);
    let mut cmd = command(&args);
    // Connection logs of the children would only be noise here.
    cmd.env("RUST_LOG", "warn");
    cmd
}

#[test]
fn bench_pubsub_json_has_positive_figures() {
    // Flat-out bursts between processes, a slow subscriber process, fan-out:
    // each must be lossless (every message delivered, in order, nothing
    // lagged or dropped; counts asserted, no timings).
    let (code, out) = run(bench_command(&[
        "--count",
        "20000",
        "--large-count",
        "300",
        "--slow-count",
        "5000",
    ]));
    assert_eq!(code, Some(0), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("{\"bench\""))
        .unwrap_or_else(|| panic!("no JSON object in:\n{out}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object");
    let positive = |path: &str| {
        let x = v.pointer(path).and_then(|x| x.as_f64());
        assert!(x.is_some_and(|x| x > 0.0), "{path} = {x:?} in {v}");
    };
    for key in [
        "/msgs_per_sec",
        "/p50_us",
        "/p99_us",
        "/p999_us",
        "/throughput_64/delivered_per_sec",
        "/throughput_64/published_per_sec",
        "/throughput_1k/delivered_per_sec",
        "/latency_one_in_flight/one_way/p50_us",
        "/latency_one_in_flight/one_way/p99_us",
        "/latency_paced/one_way/p99_us",
        "/latency_paced/achieved_rate",
        "/fanout/total_delivered_per_sec",
        "/fanout/min_per_subscriber_per_sec",
    ] {
        positive(key);
    }
    assert_eq!(v["fanout"]["subscribers"], 2, "{v}");
    for d in v["fanout"]["per_subscriber"]
        .as_array()
        .expect("per_subscriber")
    {
        assert!(d["delivered"].as_u64().is_some_and(|n| n > 0), "{d}");
        assert_eq!(d["out_of_order"], 0, "{d}");
    }
    for key in [
        "/throughput_64/per_subscriber/0/out_of_order",
        "/throughput_1k/per_subscriber/0/out_of_order",
        "/latency_one_in_flight/out_of_order",
        "/latency_paced/out_of_order",
    ] {
        assert_eq!(v.pointer(key), Some(&serde_json::json!(0)), "{key} in {v}");
    }
    // One message in flight and paced: nothing may be lost.
    assert_eq!(v["latency_paced"]["delivered"], 200, "{v}");
    for (run, n) in [
        ("throughput_64", 20_000),
        ("throughput_1k", 20_000),
        ("throughput_16k", 300),
        ("fanout", 20_000),
    ] {
        assert_eq!(v[run]["lossless"], true, "{run} in {v}");
        for d in v[run]["per_subscriber"].as_array().expect("per_subscriber") {
            assert_eq!(d["delivered"], n, "{run}: {d}");
            assert_eq!(d["lagged_at_subscriber"], 0, "{run}: {d}");
        }
    }
    let slow = &v["slow_subscriber"]["run"];
    assert_eq!(slow["lossless"], true, "{v}");
    assert_eq!(slow["delivered"], 5000, "{v}");
    assert!(v["slow_subscriber"]["read_rate"]
        .as_u64()
        .is_some_and(|r| r >= 1000));
    assert_eq!(v["lossless"], true, "{v}");
}

/// Child processes of `pid` (from every thread's `children` list).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// Gone, or a zombie waiting to be reaped: not running any more.
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ...": the state follows the command's closing paren.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

#[test]
fn bench_pubsub_stops_its_children_when_interrupted() {
    let mut bench = Proc::spawn_cmd(bench_command(&["--count", "1000000"]));
    // Wait until it is busy measuring, with its child running.
    bench.wait_for(&["bench pubsub: latency"]);
    let kids = children_of(bench.child.id());
    assert!(!kids.is_empty(), "the bench has a subscriber process");
    assert_eq!(bench.terminate(), Some(1), "{:?}", bench.seen);
    bench.wait_for(&["interrupted by SIGTERM"]);
    let deadline = std::time::Instant::now() + WAIT;
    while !kids.iter().all(|k| is_dead(*k)) {
        assert!(
            std::time::Instant::now() < deadline,
            "subscriber processes {kids:?} still running after the bench exited"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
