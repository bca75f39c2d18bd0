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
