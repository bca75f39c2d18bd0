//! Durable streams through real `macula` processes: acknowledged events
//! survive `kill -9` in the middle of a publish burst (none lost, none
//! stored twice), and the `macula stream` / `macula consumer` commands.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "test.stream";

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn cli(args: &[&str]) -> (Option<i32>, String) {
    run(command(args))
}

fn start(dir: &std::path::Path) -> (Proc, String) {
    let mut node = Proc::spawn(&start_args(REALM, dir, &[]));
    let addr = node.field("http");
    (node, addr)
}

/// Every message of `stream` through the admin API at `addr`, in order:
/// (sequence, payload), read by a new consumer without acks.
fn read_back(addr: &str, stream: &str) -> Vec<(u64, String)> {
    let (status, body) = admin_http(
        addr,
        "POST",
        &format!("/admin/streams/{stream}/consumers"),
        r#"{"durable":null,"deliver":{"policy":"all"},"ack":"none","ack_wait":30000,"max_deliver":null,"backoff":[],"max_ack_pending":100000,"filter":[],"replay":"instant","max_waiting":512,"inactive_threshold":60000}"#,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let name = json(&body)["name"].as_str().unwrap().to_string();
    let mut all = Vec::new();
    loop {
        let (status, body) = admin_http(
            addr,
            "POST",
            &format!("/admin/streams/{stream}/consumers/{name}/next"),
            r#"{"batch":10000,"wait_ms":0}"#,
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let msgs = json(&body);
        let msgs = msgs.as_array().unwrap();
        if msgs.is_empty() {
            return all;
        }
        for m in msgs {
            let p = m["payload"].as_str().unwrap().to_string();
            all.push((m["seq"].as_u64().unwrap(), p));
        }
    }
}

#[test]
fn acknowledged_events_survive_kill_9_during_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, addr) = start(dir.path());
    // `orders` syncs before each acknowledgement; `fast` acknowledges once
    // written and syncs every 2 minutes: both survive a kill of the
    // process.
    for (name, sync) in [("orders", "always"), ("fast", "2m")] {
        let subjects = format!("{name}.**");
        let (code, out) = cli(&[
            "stream",
            "add",
            name,
            "--subjects",
            &subjects,
            "--sync",
            sync,
            "--http",
            &addr,
        ]);
        assert_eq!(code, Some(0), "{out}");
    }
    let (code, out) = cli(&["stream", "info", "fast", "--http", &addr]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("sync       every 120000ms"), "{out}");

    // Four publishers per stream, each waiting for its acknowledgement
    // before the next.
    type Acked = Arc<Mutex<Vec<(&'static str, u64, String)>>>;
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..8)
        .map(|t| {
            let (acked, stop, addr) = (acked.clone(), stop.clone(), addr.clone());
            let stream = if t % 2 == 0 { "orders" } else { "fast" };
            std::thread::spawn(move || {
                for i in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let payload = format!("t{t}-{i}");
                    let body = format!(r#"{{"topic":"{stream}.t{t}","payload":"{payload}"}}"#);
                    let path = format!("/admin/streams/{stream}/publish");
                    match admin_http(&addr, "POST", &path, &body) {
                        Ok((200, b)) => {
                            let seq = json(&b)["seq"].as_u64().expect("seq");
                            acked.lock().unwrap().push((stream, seq, payload));
                        }
                        // The node died under us: what was not answered is
                        // not acknowledged.
                        _ => return,
                    }
                }
            })
        })
        .collect();
    // Killed once each stream has 300 acknowledged (`fast` acknowledges
    // many times faster than `orders`, which waits for a sync each time: a
    // total alone could leave `orders` with a handful on a slow disk).
    let deadline = Instant::now() + Duration::from_secs(20);
    let each = |acked: &Acked| {
        let a = acked.lock().unwrap();
        ["orders", "fast"].map(|s| a.iter().filter(|x| x.0 == s).count())
    };
    while each(&acked).iter().any(|&n| n < 300) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    node.child.kill().expect("kill -9");
    node.child.wait().expect("reaped");
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().expect("publisher");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    for stream in ["orders", "fast"] {
        let n = acked.iter().filter(|a| a.0 == stream).count();
        assert!(n >= 100, "only {n} publishes to {stream} acknowledged");
    }

    let (_node, addr) = start(dir.path());
    // Every acknowledged event is there, under its sequence.
    for (stream, seq, payload) in &acked {
        let (status, body) = admin_http(
            &addr,
            "GET",
            &format!("/admin/streams/{stream}/msg/{seq}"),
            "",
        )
        .unwrap();
        assert_eq!(
            status, 200,
            "acknowledged {stream} seq {seq} lost after kill -9: {body}"
        );
        assert_eq!(
            json(&body)["payload"],
            payload.as_str(),
            "{stream} seq {seq}"
        );
    }
    // And nothing is stored twice: read everything back.
    for stream in ["orders", "fast"] {
        let mut seqs = Vec::new();
        let mut payloads = std::collections::HashSet::new();
        for (seq, p) in read_back(&addr, stream) {
            seqs.push(seq);
            assert!(payloads.insert(p.clone()), "{p} stored twice in {stream}");
        }
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "sequences not increasing in {stream}"
        );
        assert!(seqs.len() >= acked.iter().filter(|a| a.0 == stream).count());
        let info = json(
            &admin_http(&addr, "GET", &format!("/admin/streams/{stream}"), "")
                .unwrap()
                .1,
        );
        assert_eq!(info["messages"].as_u64().unwrap() as usize, seqs.len());
    }
}

#[test]
fn stream_and_consumer_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, addr) = start(dir.path());
    let h = ["--http", addr.as_str()];
    let with = |args: &[&str]| -> (Option<i32>, String) {
        let mut v = args.to_vec();
        v.extend_from_slice(&h);
        cli(&v)
    };
    let (code, out) = with(&[
        "stream",
        "add",
        "jobs",
        "--subjects",
        "jobs.*",
        "--max-msgs",
        "100",
        "--max-age",
        "1h",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("jobs.*") && out.contains("max_msgs 100"),
        "{out}"
    );
    // A bad option is a usage error naming it.
    let (code, out) = with(&[
        "stream",
        "add",
        "bad",
        "--subjects",
        "x",
        "--discard",
        "maybe",
    ]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--discard"), "{out}");
    for i in 1..=3 {
        let (code, out) = with(&["stream", "pub", "jobs", "jobs.build", &format!("job {i}")]);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains(&format!("stored seq {i}")), "{out}");
    }
    let (code, out) = with(&[
        "stream",
        "pub",
        "jobs",
        "jobs.build",
        "again",
        "--msg-id",
        "k",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let (_, out) = with(&[
        "stream",
        "pub",
        "jobs",
        "jobs.build",
        "again",
        "--msg-id",
        "k",
    ]);
    assert!(out.contains("duplicate of seq 4"), "{out}");
    // A topic the stream does not capture: refused, with the node's reason.
    let (code, out) = with(&["stream", "pub", "jobs", "other.x", "no"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("stream.not_captured"), "{out}");

    let (code, out) = with(&["stream", "ls"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("jobs") && out.contains(" 4 "), "{out}");
    let (_, out) = with(&["stream", "get", "jobs", "2"]);
    assert!(out.contains("2 jobs.build job 2"), "{out}");

    let (code, out) = with(&["consumer", "add", "jobs", "worker", "--ack-wait", "30s"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = with(&["consumer", "next", "jobs", "worker", "--count", "2"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("1 jobs.build job 1") && out.contains("2 jobs.build job 2"),
        "{out}"
    );
    let (_, out) = with(&["consumer", "info", "jobs", "worker"]);
    assert!(out.contains("ack floor     2"), "{out}");
    let (_, out) = with(&[
        "consumer", "next", "jobs", "worker", "--count", "5", "--no-ack",
    ]);
    assert!(
        out.contains("3 jobs.build") && out.contains("4 jobs.build"),
        "{out}"
    );
    let (_, out) = with(&["consumer", "info", "jobs", "worker"]);
    assert!(out.contains("2 waiting for acks"), "{out}");
    let (_, out) = with(&["consumer", "ls", "jobs"]);
    assert!(out.contains("worker") && out.contains("durable"), "{out}");

    // Replay from a sequence.
    let (code, out) = with(&["stream", "sub", "jobs", "--from", "seq:3", "--count", "2"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("3 jobs.build job 3") && out.contains("4 jobs.build again"),
        "{out}"
    );
    assert!(!out.contains("job 1"), "{out}");

    let (_, out) = with(&["stream", "purge", "jobs", "--keep", "1"]);
    assert!(out.contains("purged 3 messages"), "{out}");
    let (_, out) = with(&["stream", "info", "jobs"]);
    assert!(out.contains("messages   1"), "{out}");
    let (code, _) = with(&["consumer", "rm", "jobs", "worker"]);
    assert_eq!(code, Some(0));
    let (code, _) = with(&["stream", "rm", "jobs"]);
    assert_eq!(code, Some(0));
    let (code, out) = with(&["stream", "info", "jobs"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("stream.not_found"), "{out}");
}

/// A stream hosted by one node is used through another, over the mesh:
/// `macula pub --persist` (acknowledged publishes) and `macula sub --stream
/// --from` (stored messages, then new ones), as a lightweight client of the
/// other node.
#[test]
fn pub_persist_and_sub_stream_reach_a_stream_on_another_node() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut host = Proc::spawn(&start_args(REALM, dirs[0].path(), &[]));
    let host_quic = host.field("listen");
    let host_http = host.field("http");
    let mut other = Proc::spawn(&start_args(
        REALM,
        dirs[1].path(),
        &["--bootstrap", &host_quic],
    ));
    let other_quic = other.field("listen");
    other.wait_for(&["joined the DHT"]);
    let (code, out) = cli(&[
        "stream",
        "add",
        "orders",
        "--subjects",
        "orders.**",
        "--http",
        &host_http,
    ]);
    assert_eq!(code, Some(0), "{out}");

    // The host advertises `_stream.orders` in the background: retry the
    // first publish until the mesh finds it (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out) = cli(&[
            "pub",
            "orders.eu",
            "first",
            "--persist",
            "orders",
            "--connect",
            &other_quic,
            "--realm",
            REALM,
        ]);
        if code == Some(0) {
            assert!(out.contains("in stream orders (last seq 1)"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "stream never found: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, out) = cli(&[
        "pub",
        "orders.us",
        "more",
        "--count",
        "3",
        "--persist",
        "orders",
        "--connect",
        &other_quic,
        "--realm",
        REALM,
        "--json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let v = json(out.lines().find(|l| l.starts_with('{')).expect("json line"));
    assert_eq!(
        (v["stream"].as_str(), v["last_seq"].as_u64()),
        (Some("orders"), Some(4))
    );

    // A topic the stream does not capture is refused with the host's reason.
    let (code, out) = cli(&[
        "pub",
        "billing.eu",
        "x",
        "--persist",
        "orders",
        "--connect",
        &other_quic,
        "--realm",
        REALM,
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("captures"), "{out}");

    // Read from seq 2, only orders.us: 2, 3, 4; then a new one arrives.
    let mut sub = Proc::spawn(&[
        "sub",
        "orders.us",
        "--stream",
        "orders",
        "--from",
        "seq:2",
        "--count",
        "4",
        "--connect",
        &other_quic,
        "--realm",
        REALM,
    ]);
    for seq in 2..=4 {
        sub.wait_for(&[&format!("{seq}\torders.us\tmore")]);
    }
    let (code, out) = cli(&[
        "pub",
        "orders.us",
        "later",
        "--persist",
        "orders",
        "--connect",
        &other_quic,
        "--realm",
        REALM,
    ]);
    assert_eq!(code, Some(0), "{out}");
    sub.wait_for(&["5\torders.us\tlater"]);
    assert_eq!(
        sub.wait_exit(Duration::from_secs(20)).map(|s| s.code()),
        Some(Some(0))
    );

    // A bad position is a usage error before anything is joined.
    let (code, out) = cli(&[
        "sub",
        "orders.**",
        "--stream",
        "orders",
        "--from",
        "seq:x",
        "--connect",
        &other_quic,
        "--realm",
        REALM,
    ]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("seq:N needs a number"), "{out}");

    // A push consumer: the host publishes its deliveries to a topic that a
    // plain subscriber on the other node reads (unacknowledged, they come
    // again after the 1 s ack wait, so a delivery made before the
    // subscriber's interest reached the host is not lost).
    let mut push = Proc::spawn(&[
        "sub",
        "deliveries.orders",
        "--count",
        "5",
        "--connect",
        &other_quic,
        "--realm",
        REALM,
    ]);
    push.wait_for(&["subscribed to deliveries.orders"]);
    let (code, out) = cli(&[
        "consumer",
        "add",
        "orders",
        "shipper",
        "--deliver-subject",
        "deliveries.orders",
        "--ack-wait",
        "1s",
        "--http",
        &host_http,
    ]);
    assert_eq!(code, Some(0), "{out}");
    // `--count 5`: it exits 0 once five deliveries arrived.
    assert_eq!(
        push.wait_exit(Duration::from_secs(20)).map(|s| s.code()),
        Some(Some(0))
    );
    push.wait_for(&["deliveries.orders", "more"]);
    let (code, out) = cli(&[
        "consumer", "next", "orders", "shipper", "--http", &host_http,
    ]);
    assert_ne!(code, Some(0), "a push consumer takes no pulls: {out}");
    assert!(out.contains("push consumer"), "{out}");
    drop(other);
    drop(host);
}

/// Publishes `payload` (also its message ID) through the admin API of one
/// of `addrs`, starting at `first`, moving on when a node does not answer
/// or is not ready; `Some(seq)` once acknowledged (a repeat after a lost
/// answer is a duplicate with the first one's sequence).
fn publish_somewhere(addrs: &[String], first: usize, payload: &str) -> Option<u64> {
    let body = format!(r#"{{"topic":"orders.eu","payload":"{payload}","msg_id":"{payload}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = first;
    while Instant::now() < deadline {
        let addr = &addrs[i % addrs.len()];
        if let Ok((200, b)) = admin_http(addr, "POST", "/admin/streams/orders/publish", &body) {
            return json(&b)["seq"].as_u64();
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn a_replicated_stream_survives_kill_9_of_its_leader_under_load() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let Mesh {
        mut procs,
        ids,
        https,
        listens,
    } = Mesh::start(REALM, &dirs);
    add_replicated_orders(&https[0], &[]);
    let info = json(
        &admin_http(&https[0], "GET", "/admin/streams/orders", "")
            .unwrap()
            .1,
    );
    let leader_id = info["replication"]["leader"].as_str().unwrap().to_string();
    let leader = ids.iter().position(|i| *i == leader_id).expect("leader");

    // Three publishers, each waiting for its acknowledgement, through
    // every node in turn (followers forward to the leader).
    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..3)
        .map(|t| {
            let (acked, stop, addrs) = (acked.clone(), stop.clone(), https.clone());
            std::thread::spawn(move || {
                for i in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let payload = format!("t{t}-{i}");
                    match publish_somewhere(&addrs, t + i, &payload) {
                        Some(seq) => acked.lock().unwrap().push((seq, payload)),
                        None => return,
                    }
                }
            })
        })
        .collect();
    let wait_acked = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_acked(200);
    procs[leader].child.kill().expect("kill -9");
    procs[leader].child.wait().expect("reaped");
    let at_kill = acked.lock().unwrap().len();
    // The survivors elect a leader and take publishes again.
    wait_acked(at_kill + 200);
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().expect("publisher");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    if acked.len() < at_kill + 200 {
        // Seen once under a load of about 10 on two cores: say what the
        // survivors' groups did.
        for (i, p) in procs.iter_mut().enumerate().filter(|(i, _)| *i != leader) {
            let mut lines = std::mem::take(&mut p.seen);
            lines.extend(p.lines.try_iter());
            let told: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains("stream") || l.contains("raft"))
                .collect();
            for l in &told[told.len().saturating_sub(80)..] {
                eprintln!("survivor {i}: {l}");
            }
        }
        panic!(
            "publishes stalled after the leader died: {} acknowledged, {at_kill} before",
            acked.len()
        );
    }
    let survivor = &https[(leader + 1) % 3];
    // Every acknowledged event is there, under its sequence.
    for (seq, payload) in &acked {
        let (status, body) = admin_http(
            survivor,
            "GET",
            &format!("/admin/streams/orders/msg/{seq}"),
            "",
        )
        .unwrap();
        assert_eq!(status, 200, "acknowledged seq {seq} lost: {body}");
        assert_eq!(json(&body)["payload"], payload.as_str(), "seq {seq}");
    }
    // Nothing stored twice.
    let mut payloads = std::collections::HashSet::new();
    let mut last = 0;
    for (seq, p) in read_back(survivor, "orders") {
        assert!(seq > last, "sequences not increasing");
        last = seq;
        assert!(payloads.insert(p.clone()), "{p} stored twice");
    }
    assert!(payloads.len() >= acked.len());

    // The killed member comes back and catches up to the same copy.
    let others: Vec<&str> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| listens[i].as_str())
        .collect();
    let mut back = {
        let mut cmd = command(&start_args(
            REALM,
            dirs[leader].path(),
            &["--bootstrap", others[0], "--bootstrap", others[1]],
        ));
        cmd.env("RUST_LOG", "info,macula_runtime::stream::replica=trace");
        Proc::spawn_cmd(cmd)
    };
    let back_http = back.field("http");
    let want = json(
        &admin_http(survivor, "GET", "/admin/streams/orders", "")
            .unwrap()
            .1,
    )["last_seq"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, b)) = admin_http(&back_http, "GET", "/admin/streams/orders/replica", "") {
            let r = json(&b);
            if r["last_seq"].as_u64() == Some(want)
                && r["stored"].as_u64() == Some(payloads.len() as u64)
            {
                break;
            }
            if Instant::now() >= deadline {
                // Say everything that tells why (the restarted member
                // logs each entry it applies, with the sequences it puts:
                // this is how a member that led its old term again after
                // the restart, and lost an entry to it, was found).
                let mut lines = back.seen.clone();
                lines.extend(back.lines.try_iter());
                for l in lines
                    .iter()
                    .filter(|l| l.contains("stream") || l.contains("raft"))
                {
                    eprintln!("restarted member: {l}");
                }
                let leader_view = admin_http(survivor, "GET", "/admin/streams/orders/replica", "");
                panic!(
                    "not caught up: {r}; want last_seq {want} and {} stored; the survivor: {leader_view:?}",
                    payloads.len()
                );
            }
        }
        assert!(Instant::now() < deadline, "restarted member never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out) = cli(&["stream", "info", "orders", "--http", &back_http]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replicated leader"), "{out}");
    assert!(out.contains(&format!("up to seq {want}")), "{out}");
}

/// Publishes `payload` (also its message ID) through the admin API of
/// Adds stream `orders` with three replicas (and `extra` options) through
/// the node at `http`, asking again (for at most 20 s) until that node
/// sees both others, which it must before it places replicas.
fn add_replicated_orders(http: &str, extra: &[&str]) {
    let mut args = vec![
        "stream",
        "add",
        "orders",
        "--subjects",
        "orders.**",
        "--replicas",
        "3",
        "--http",
        http,
    ];
    args.extend_from_slice(extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out) = cli(&args);
        if code == Some(0) {
            return;
        }
        assert!(Instant::now() < deadline, "stream add: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `addrs`, one after another from `first`, until acknowledged (`Some(seq)`)
/// or `stop` is set (`None`).
fn publish_until(addrs: &[String], first: usize, payload: &str, stop: &AtomicBool) -> Option<u64> {
    let body = format!(r#"{{"topic":"orders.eu","payload":"{payload}","msg_id":"{payload}"}}"#);
    // Bounded: the test sets `stop` within its own deadlines.
    for i in first..first + 100_000 {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let addr = &addrs[i % addrs.len()];
        if let Ok((200, b)) = admin_http(addr, "POST", "/admin/streams/orders/publish", &body) {
            return json(&b)["seq"].as_u64();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A replicated stream with a sync interval acknowledges a publish once a
/// majority has written its Raft log entry, not synced it: the operating
/// system holds what a killed process wrote, so `kill -9` of every member
/// at once during a burst loses nothing acknowledged and stores nothing
/// twice, once the three come back.
#[test]
fn a_replicated_stream_with_a_sync_interval_survives_kill_9_of_every_member() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let Mesh {
        mut procs,
        https,
        listens,
        ..
    } = Mesh::start(REALM, &dirs);
    add_replicated_orders(&https[0], &["--sync", "2m"]);
    let (code, out) = cli(&["stream", "info", "orders", "--http", &https[0]]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("sync       every 120000ms"), "{out}");

    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..3)
        .map(|t| {
            let (acked, stop, addrs) = (acked.clone(), stop.clone(), https.clone());
            std::thread::spawn(move || {
                for i in 0..100_000 {
                    match publish_until(&addrs, t + i, &format!("t{t}-{i}"), &stop) {
                        Some(seq) => acked.lock().unwrap().push((seq, format!("t{t}-{i}"))),
                        None => return,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "the burst did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every member, mid-burst.
    for p in procs.iter_mut() {
        p.child.kill().expect("kill -9");
    }
    for p in procs.iter_mut() {
        p.child.wait().expect("reaped");
    }
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().expect("publisher");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() >= 300);

    // All three back, on their addresses.
    let mut back = vec![Proc::spawn(&start_args(
        REALM,
        dirs[0].path(),
        &["--listen", &listens[0]],
    ))];
    for i in 1..3 {
        back.push(Proc::spawn(&start_args(
            REALM,
            dirs[i].path(),
            &["--listen", &listens[i], "--bootstrap", &listens[0]],
        )));
    }
    let https: Vec<String> = back.iter_mut().map(|p| p.field("http")).collect();
    // Every acknowledged event is there, under its sequence, once a
    // leader serves.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (seq, payload) in &acked {
        loop {
            let got = https.iter().find_map(|h| {
                match admin_http(h, "GET", &format!("/admin/streams/orders/msg/{seq}"), "") {
                    Ok((200, body)) => Some(body),
                    _ => None,
                }
            });
            if let Some(body) = got {
                assert_eq!(json(&body)["payload"], payload.as_str(), "seq {seq}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "acknowledged seq {seq} not readable after kill -9 of every member"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Nothing stored twice (read through the leader), and every member
    // holds the same copy.
    let mut payloads = std::collections::HashSet::new();
    let mut last = 0;
    for (seq, p) in read_back(&https[0], "orders") {
        assert!(seq > last, "sequences not increasing");
        last = seq;
        assert!(payloads.insert(p.clone()), "{p} stored twice");
    }
    assert!(payloads.len() >= acked.len());
    for h in &https {
        loop {
            if let Ok((200, b)) = admin_http(h, "GET", "/admin/streams/orders/replica", "") {
                let r = json(&b);
                if r["last_seq"].as_u64() == Some(last)
                    && r["stored"].as_u64() == Some(payloads.len() as u64)
                {
                    break;
                }
                assert!(Instant::now() < deadline, "a member differs: {r}");
            }
            assert!(Instant::now() < deadline, "a member never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(back);
}
