//! `macula sub --connect A,B` keeps receiving when A dies: the subscriber
//! joins through both nodes, and publishers deliver to it directly. Also
//! guards graceful shutdown of a publisher: `macula pub` exits right after
//! publishing, and its message must not be lost with its connection (the
//! data stream is finished and acknowledged before the close).

mod common;

use common::*;

const REALM: &str = "test.failover";

#[test]
fn sub_through_two_nodes_survives_the_first_one_dying() {
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let mut a = Proc::spawn(&start_args(REALM, da.path(), &[]));
    let a_addr = a.field("listen");
    let mut b = Proc::spawn(&start_args(REALM, db.path(), &["--bootstrap", &a_addr]));
    let b_addr = b.field("listen");
    b.wait_for(&["joined the DHT"]);

    let both = format!("{a_addr},{b_addr}");
    let mut sub = Proc::spawn(&[
        "sub",
        "x.**",
        "--count",
        "2",
        "--realm",
        REALM,
        "--connect",
        &both,
    ]);
    sub.wait_for(&["subscribed to x.**"]);

    let publish = |via: &str, data: &str| {
        let (code, out) = run(command(&[
            "pub",
            "x.y",
            data,
            "--realm",
            REALM,
            "--connect",
            via,
        ]));
        assert_eq!(code, Some(0), "{out}");
    };
    publish(&b_addr, "before");
    sub.wait_for(&["x.y", "before"]);

    // A dies without a goodbye; the subscriber still has B.
    a.child.kill().expect("SIGKILL A");
    let _ = a.child.wait();
    publish(&b_addr, "after");
    sub.wait_for(&["x.y", "after"]);
}
