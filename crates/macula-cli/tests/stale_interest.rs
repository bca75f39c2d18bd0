//! Stale interest across real processes: a subscriber node that is killed
//! (SIGKILL: no goodbye, no withdrawal, its interest record stays in the
//! DHT for its 600 s TTL) stops receiving copies once the failure detector
//! declares it down, not when the record expires.
//!
//! A is a `macula start` daemon; S is a full node (`macula sub --full-node`)
//! that joined through A and subscribed; P is a client of A (`macula pub`)
//! publishing steadily, so A routes every message to S. After S is killed,
//! A's metrics must show S set aside (`macula_pubsub_peers_unreachable_total`)
//! within the stated bound, and from then on no copy queued to any node
//! (`macula_pubsub_sent_remote_total` flat) while P's messages keep arriving
//! at A (`macula_pubsub_received_remote_total` grows): the witness that
//! publishing went on.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "test.stale";

/// The stated bound (see the `macula-pubsub` crate docs, "Stale interest"):
/// the failure detector's 2 s (plus one 250 ms look) after the subscriber's
/// last packet, plus the 1 s interest bound; 5 s more for a loaded machine.
const BOUND: Duration = Duration::from_millis(8_250);

/// One metric's value from A's `/metrics` (0 when absent).
fn metric(http: &str, name: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(http).expect("connect to the admin server");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").expect("send request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read /metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls (every 100 ms, until `limit`) until `done` holds; returns whether
/// it did.
fn poll(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    done()
}

/// A full node subscribed to `stale.**` through A.
fn subscriber(a_addr: &str) -> Proc {
    let mut p = Proc::spawn(&[
        "sub",
        "stale.**",
        "--full-node",
        "--realm",
        REALM,
        "--connect",
        a_addr,
    ]);
    p.wait_for(&["subscribed to stale.**"]);
    p
}

/// A client of A publishing 100 messages a second for at most 200 s
/// (killed on drop long before).
fn publisher(a_addr: &str) -> Proc {
    Proc::spawn(&[
        "pub",
        "stale.x",
        "tick",
        "--count",
        "20000",
        "--rate",
        "100",
        "--realm",
        REALM,
        "--connect",
        a_addr,
    ])
}

#[test]
fn a_killed_subscriber_stops_getting_copies_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Proc::spawn(&start_args(REALM, dir.path(), &[]));
    let a_addr = a.field("listen");
    let http = a.field("http");

    let mut s = subscriber(&a_addr);
    let _p = publisher(&a_addr);
    s.wait_for(&["tick"]);
    let sent = "macula_pubsub_sent_remote_total";
    assert!(metric(&http, sent) > 0, "A routes P's messages to S");

    // SIGKILL: S says nothing to anyone.
    unsafe {
        libc::kill(s.child.id() as i32, libc::SIGKILL);
    }
    let killed = Instant::now();
    let unreachable = "macula_pubsub_peers_unreachable_total";
    assert!(
        poll(BOUND + Duration::from_secs(10), || metric(
            &http,
            unreachable
        ) >= 1),
        "S was never set aside; A's output:\n{}",
        a.seen.join("\n")
    );
    let took = killed.elapsed();
    assert!(
        took <= BOUND,
        "S set aside after {took:?}, the bound is {BOUND:?}"
    );

    // From now on nothing is queued to S, while P's messages keep arriving.
    let flat = metric(&http, sent);
    let received = "macula_pubsub_received_remote_total";
    let arrived = metric(&http, received);
    let mut copies = flat;
    let progressed = poll(Duration::from_secs(20), || {
        copies = metric(&http, sent);
        copies != flat || metric(&http, received) >= arrived + 200
    });
    assert!(progressed, "P's messages stopped arriving at A");
    assert_eq!(copies, flat, "A queued copies after S was set aside");
    eprintln!("S (killed) set aside after {took:?}; no copies queued to it after that");
}

/// Issue 17, "interest follows liveness": while a killed subscriber node is
/// being detected and set aside, a live subscriber elsewhere keeps getting
/// the stream. At most one publish waits, for `INTEREST_REFRESH_WAIT`
/// (250 ms), on an interest lookup that met the dead node before the
/// detector spoke; after that lookups do not wait on it (measured: one
/// 260 ms pause, then none, where the issue saw 250 ms every 2 s for
/// minutes).
#[test]
fn a_live_subscriber_does_not_stall_while_another_is_dead() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Proc::spawn(&start_args(REALM, dir.path(), &[]));
    let a_addr = a.field("listen");
    let mut s = subscriber(&a_addr);
    let mut l = subscriber(&a_addr);
    let _p = publisher(&a_addr);
    s.wait_for(&["tick"]);
    l.wait_for(&["tick"]);
    unsafe {
        libc::kill(s.child.id() as i32, libc::SIGKILL);
    }
    let killed = Instant::now();
    let (mut got, mut longest, mut last) = (0u32, Duration::ZERO, Instant::now());
    while let Some(line) = l.next_line(killed + Duration::from_secs(6)) {
        if line.contains("seq=") {
            got += 1;
            longest = longest.max(last.elapsed());
            last = Instant::now();
        }
    }
    eprintln!("live subscriber: {got} events in the 6 s after the other's kill, longest pause {longest:?}");
    // About 600 were published meanwhile; a stall of seconds would cost
    // hundreds.
    assert!(
        got >= 450,
        "{got} of about 600 events while the other subscriber was dead"
    );
}
