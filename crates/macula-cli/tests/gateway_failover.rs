//! A subscriber's gateway killed (SIGKILL) under a 2,000 msg/s stream, real
//! processes on loopback: three daemons A, B, C; a publisher attached to A
//! (`macula pub`), a subscriber (`macula sub --json`) attached through
//! `B,C,A`, so B is its primary gateway; B is killed mid-stream.
//!
//! With two gateways (the default) the subscriber receives every event
//! exactly once. With one (`--single-gateway`), what was published during
//! the failover is lost, and told: events received plus the `missed` counts
//! the subscriber reported equal the events published (one publisher, one
//! topic: the gap in sequence numbers is exactly what was missed).
//! Counts are asserted, not timings.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "test.gwfailover";
/// 2,000 msg/s for 15 s.
const RATE: &str = "2000";
const COUNT: u64 = 30_000;
/// B is killed once this many events have arrived (about 2 s in).
const KILL_AFTER: u64 = 4_000;

/// What the subscriber printed: seq → copies, and the missed counts.
#[derive(Default)]
struct Received {
    copies: BTreeMap<u64, u32>,
    missed: u64,
    second_attached: usize,
}

impl Received {
    fn take(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("warning: missed ") {
            let n = rest.split(' ').next().and_then(|n| n.parse::<u64>().ok());
            self.missed += n.expect("a count after 'warning: missed'");
        } else if line.contains("second gateway attached") {
            self.second_attached += 1;
        } else if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON event line");
            let seq = v["seq"].as_u64().expect("a seq");
            *self.copies.entry(seq).or_default() += 1;
        }
    }

    fn max_seq(&self) -> u64 {
        self.copies.keys().next_back().copied().unwrap_or(0)
    }
}

/// Reads `sub`'s lines into `got` until `done` holds, at most `limit`.
fn read_until(
    sub: &mut Proc,
    got: &mut Received,
    limit: Duration,
    done: impl Fn(&Received) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    while !done(got) {
        match sub.next_line(deadline) {
            Some(l) => got.take(&l),
            None => return false,
        }
    }
    true
}

/// Runs the scenario; returns what the subscriber received.
fn run_failover(single_gateway: bool) -> Received {
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut a = Proc::spawn(&start_args(REALM, da.path(), &[]));
    let a_addr = a.field("listen");
    let mut b = Proc::spawn(&start_args(REALM, db.path(), &["--bootstrap", &a_addr]));
    let b_addr = b.field("listen");
    let mut c = Proc::spawn(&start_args(REALM, dc.path(), &["--bootstrap", &a_addr]));
    let c_addr = c.field("listen");
    b.wait_for(&["joined the DHT"]);
    c.wait_for(&["joined the DHT"]);

    let via = format!("{b_addr},{c_addr},{a_addr}");
    let mut args = vec![
        "sub",
        "gw.**",
        "--json",
        "--realm",
        REALM,
        "--connect",
        &via,
    ];
    if single_gateway {
        args.push("--single-gateway");
    }
    let mut sub = Proc::spawn(&args);
    sub.wait_for(&["subscribed to gw.**"]);
    let mut got = Received::default();
    if !single_gateway {
        // Both gateways carry the subscription before anything is sent.
        sub.wait_for(&["second gateway attached"]);
        got.second_attached = 1;
    }

    let count = COUNT.to_string();
    let mut publisher = Proc::spawn(&[
        "pub",
        "gw.x",
        "tick",
        "--count",
        &count,
        "--rate",
        RATE,
        "--realm",
        REALM,
        "--connect",
        &a_addr,
    ]);
    assert!(
        read_until(&mut sub, &mut got, WAIT, |g| g.max_seq() >= KILL_AFTER),
        "the stream did not start: {} events",
        got.copies.len()
    );
    // B, the subscriber's primary gateway, dies without a word.
    b.child.kill().expect("SIGKILL B");
    let _ = b.child.wait();

    // The publisher finishes (15 s of stream, plus margin), then every
    // event published after the failover arrives.
    let exited = publisher.wait_exit(Duration::from_secs(90));
    assert!(
        exited.is_some_and(|s| s.success()),
        "the publisher did not finish: {exited:?}\n{}",
        publisher.seen.join("\n")
    );
    let all_in = read_until(&mut sub, &mut got, Duration::from_secs(30), |g| {
        g.max_seq() >= COUNT
    });
    assert!(
        all_in,
        "the last event never arrived: {} distinct, highest seq {}; subscriber:\n{}",
        got.copies.len(),
        got.max_seq(),
        sub.seen.join("\n")
    );
    if !single_gateway {
        // A new second gateway (A) replaces the promoted one (C).
        let ok = read_until(&mut sub, &mut got, WAIT, |g| g.second_attached >= 2);
        assert!(ok, "no new second gateway after B died");
    }
    // Whatever else is already printed (a late missed count).
    let settle = Instant::now() + Duration::from_millis(300);
    while let Some(l) = sub.next_line(settle) {
        got.take(&l);
    }
    let _ = sub.terminate();
    let _ = c.terminate();
    let _ = a.terminate();
    got
}

#[test]
fn a_subscriber_on_two_gateways_loses_nothing_when_one_is_killed() {
    let got = run_failover(false);
    let dups: Vec<_> = got.copies.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(dups.is_empty(), "delivered twice: {dups:?}");
    let missing: Vec<u64> = (1..=COUNT)
        .filter(|s| !got.copies.contains_key(s))
        .take(10)
        .collect();
    assert_eq!(
        got.copies.len() as u64,
        COUNT,
        "events lost (first missing: {missing:?})"
    );
    assert_eq!(got.missed, 0, "nothing was lost, nothing to tell");
}

#[test]
fn with_one_gateway_the_failover_gap_is_reported_exactly() {
    let got = run_failover(true);
    let dups: Vec<_> = got.copies.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(dups.is_empty(), "delivered twice: {dups:?}");
    let received = got.copies.len() as u64;
    assert!(
        received < COUNT,
        "a failover through one gateway loses the events published meanwhile"
    );
    assert_eq!(
        received + got.missed,
        COUNT,
        "received {received} + told missed {} must be every event published",
        got.missed
    );
    eprintln!(
        "one gateway: received {received}, told missed {}",
        got.missed
    );
}
