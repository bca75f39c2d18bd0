//! Lightweight clients behind NAT (`common::netns`: one public host, two
//! private sites behind their own masquerading routers): a client in site 1
//! and a client in site 2 exchange pub/sub messages and RPC calls through
//! the public node they are attached to, while a direct connection from
//! site 1 to site 2 fails.
//!
//! Needs root, `ip` and `nft`; skipped with a message otherwise (CI sets
//! `MACULA_TEST_REQUIRE_NETNS=1`, which turns a skip into a failure).

mod common;

use std::time::{Duration, Instant};

use common::netns::{self, Spec, Topology};
use common::*;

const REALM: &str = "test.natclients";

#[test]
#[ignore = "needs root: network namespaces (scripts/test.sh runs these with --ignored as root)"]
fn clients_in_two_nat_sites_talk_through_the_public_node() {
    if netns::skip() {
        return;
    }
    let started = Instant::now();
    let t = Topology::build(&Spec {
        public_hosts: 1,
        sites: vec![1, 1],
        ..Spec::default()
    });
    let (p, a, b) = (t.public(0), &t.site(1).hosts[0], &t.site(2).hosts[0]);

    // The direct path does not exist: site 1 cannot open a connection to
    // a listener in site 2.
    let in_site2 = b.tcp_listen();
    let b_addr = in_site2.local_addr().expect("addr");
    assert!(
        a.tcp_connect(b_addr, Duration::from_secs(2)).is_err(),
        "site 1 reached site 2 directly"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("{}:0", p.ip);
    let mut public = p.spawn(&start_args(REALM, dir.path(), &["--listen", &listen]));
    let public_addr = public.field("listen");

    // Site 1: a subscriber and a provider, both clients of the public node.
    let mut sub = a.spawn(&[
        "sub",
        "site.**",
        "--count",
        "1",
        "--realm",
        REALM,
        "--connect",
        &public_addr,
    ]);
    sub.wait_for(&["subscribed to site.**"]);
    let mut serve = a.spawn(&[
        "serve",
        "svc.nat",
        "--reply",
        "answered-in-site-1",
        "--realm",
        REALM,
        "--connect",
        &public_addr,
    ]);
    serve.wait_for(&["serving svc.nat"]);

    // Site 2: a publisher and a caller.
    let (code, out) = b.run(&[
        "pub",
        "site.two",
        "hello-from-site-2",
        "--realm",
        REALM,
        "--connect",
        &public_addr,
    ]);
    assert_eq!(code, Some(0), "{out}");
    sub.wait_for(&["site.two", "hello-from-site-2"]);

    let (code, out) = b.run(&[
        "call",
        "svc.nat",
        "ping",
        "--realm",
        REALM,
        "--connect",
        &public_addr,
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("answered-in-site-1"), "{out}");

    assert_eq!(serve.terminate(), Some(0));
    assert_eq!(public.terminate(), Some(0));
    eprintln!("took {:?}", started.elapsed());
}
