//! `macula trust list|revoke` against a node that pinned its bootstrap
//! address on first use (open realm; real processes, QUIC on 127.0.0.1).

mod common;

use common::*;

#[test]
fn a_bootstrap_address_is_pinned_listed_and_revoked() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Proc::spawn(&start_args("test.trust", da.path(), &[]));
    let a_id = a.field("node_id");
    let a_addr = a.field("listen");
    let mut b = Proc::spawn(&start_args(
        "test.trust",
        db.path(),
        &["--bootstrap", &a_addr],
    ));
    b.wait_for(&["joined the DHT"]);
    let dir = db.path().to_str().unwrap();
    let (code, text) = run(command(&["trust", "list", "--data-dir", dir, "--json"]));
    assert_eq!(code, Some(0), "{text}");
    let pin: serde_json::Value = serde_json::from_str(
        text.lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no pin listed: {text}")),
    )
    .unwrap();
    assert_eq!(
        (pin["target"].as_str(), pin["node_id"].as_str()),
        (Some(a_addr.as_str()), Some(a_id.as_str()))
    );
    let (code, text) = run(command(&["trust", "revoke", &a_addr, "--data-dir", dir]));
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(command(&["trust", "list", "--data-dir", dir, "--json"]));
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains(&a_id), "{text}");
    let (code, text) = run(command(&["trust", "revoke", &a_addr, "--data-dir", dir]));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not pinned"), "{text}");
    assert_eq!(b.terminate(), Some(0));
    assert_eq!(a.terminate(), Some(0));
}
