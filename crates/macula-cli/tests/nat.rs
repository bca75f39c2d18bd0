//! Real NAT in network namespaces (`common::netns`): one public host and two
//! private sites, each behind its own masquerading router. Real `macula`
//! processes: nodes in both sites join through the public node, which sees
//! them at their routers' WAN addresses; a direct dial from site 1 to site 2
//! fails, at the socket level and at the macula level; yet two full nodes,
//! one in each site, exchange an RPC call and pub/sub messages through the
//! public node, which relays them.
//!
//! Needs root, `ip` and `nft`; skipped with a message otherwise (CI sets
//! `MACULA_TEST_REQUIRE_NETNS=1`, which turns a skip into a failure).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::netns::{self, Spec, Topology};
use common::*;

const REALM: &str = "test.nat";

fn two_sites() -> Topology {
    Topology::build(&Spec {
        public_hosts: 1,
        sites: vec![1, 1],
        ..Spec::default()
    })
}

/// Plain sockets: the public host is reachable from both sites and sees
/// each at its router's WAN address; nothing private is reachable from
/// outside its site, not even through the other router's mapping.
#[test]
#[ignore = "needs root: network namespaces (scripts/test.sh runs these with --ignored as root)"]
fn nat_topology_behaves_like_nat() {
    if netns::skip() {
        return;
    }
    let t = two_sites();
    let (p, a, b) = (t.public(0), &t.site(1).hosts[0], &t.site(2).hosts[0]);
    let short = Duration::from_secs(2);

    let public = p.tcp_listen();
    let public_addr = public.local_addr().expect("addr");
    for (k, host) in [(1, a), (2, b)] {
        let _conn = host
            .tcp_connect(public_addr, short)
            .unwrap_or_else(|e| panic!("site {k} cannot reach the public host: {e}"));
        let from = netns::accept_from(&public);
        assert_eq!(
            from.ip(),
            IpAddr::V4(t.site(k).wan_ip),
            "site {k} is not masqueraded"
        );
    }

    let private_b = b.tcp_listen();
    let b_addr = private_b.local_addr().expect("addr");
    // Site 1 -> site 2's private address: no route.
    let err = a
        .tcp_connect(b_addr, short)
        .expect_err("site 1 reached site 2");
    eprintln!("site 1 -> {b_addr}: {err}");
    // The public host -> site 2's private address: no route either.
    assert!(
        p.tcp_connect(b_addr, short).is_err(),
        "public reached site 2"
    );
    // Site 1 -> site 2's router at the same port: no port forward.
    let via_router = SocketAddr::new(IpAddr::V4(t.site(2).wan_ip), b_addr.port());
    assert!(
        a.tcp_connect(via_router, short).is_err(),
        "site 1 reached site 2 through its router"
    );
}

/// A public node and one node per site: both sites join through the public
/// node, which lists them at their routers' WAN addresses; a macula dial
/// from site 1 to site 2 (private address, or the router's WAN address with
/// the node's port) fails.
#[test]
#[ignore = "needs root: network namespaces (scripts/test.sh runs these with --ignored as root)"]
fn nodes_behind_nat_join_through_the_public_node_but_cannot_dial_each_other() {
    if netns::skip() {
        return;
    }
    let started = Instant::now();
    let t = two_sites();
    let (p, a, b) = (t.public(0), &t.site(1).hosts[0], &t.site(2).hosts[0]);
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();

    let listen = format!("{}:0", p.ip);
    let mut public = p.spawn(&start_args(REALM, dirs[0].path(), &["--listen", &listen]));
    let public_addr = public.field("listen");
    let public_http = public.field("http");
    assert!(
        public_addr.starts_with(&format!("{}:", p.ip)),
        "{public_addr}"
    );

    let mut site_nodes = Vec::new();
    for (k, host, dir) in [(1, a, &dirs[1]), (2, b, &dirs[2])] {
        let listen = format!("{}:0", host.ip);
        let args = start_args(
            REALM,
            dir.path(),
            &["--listen", &listen, "--bootstrap", &public_addr],
        );
        let mut n = host.spawn(&args);
        let id = n.field("node_id");
        let addr = n.field("listen");
        site_nodes.push((k, n, id, addr));
    }
    let b_addr: SocketAddr = site_nodes[1].3.parse().expect("site 2 listen addr");

    // Direct dials from site 1 to site 2, in the background (each takes the
    // CLI's join timeout to give up): the private address, and site 2's
    // router at the node's port (the mapping's likely port: masquerade
    // keeps source ports when it can).
    let via_router = SocketAddr::new(IpAddr::V4(t.site(2).wan_ip), b_addr.port());
    let mut dials: Vec<(String, Proc)> = [b_addr, via_router]
        .into_iter()
        .map(|to| {
            let to = to.to_string();
            let p = a.spawn(&["dht", "get", "probe", "--connect", &to, "--realm", REALM]);
            (to, p)
        })
        .collect();

    // Both sites join through the public node.
    for (k, n, _, _) in &mut site_nodes {
        n.wait_for(&["peer connected", &public_addr]);
        n.wait_for(&["joined the DHT"]);
        eprintln!("site {k} joined");
    }

    // The public node sees each site at its router's WAN address.
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, out) = p.run(&["nodes", "--json", "--http", &public_http]);
        assert_eq!(code, Some(0), "{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("a JSON line");
        let json: serde_json::Value = serde_json::from_str(line).expect("json");
        let peers = json["peers"].as_array().expect("peers array");
        let seen: Vec<(String, String)> = peers
            .iter()
            .map(|p| {
                (
                    p["node_id"].as_str().unwrap_or_default().to_string(),
                    p["addr"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let all = site_nodes.iter().all(|(k, _, id, _)| {
            seen.iter().any(|(pid, addr)| {
                pid == id && addr.starts_with(&format!("{}:", t.site(*k).wan_ip))
            })
        });
        if all {
            for (_, addr) in &seen {
                assert!(addr.starts_with("198.18.0."), "a private address: {out}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the public node does not list both sites at their WAN addresses: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Each site node reports itself healthy (admin API on its own loopback).
    for (k, n, _, _) in &mut site_nodes {
        let http = n.field("http");
        let host = t.site(*k).hosts[0].clone();
        let (code, out) = host.run(&["health", "--http", &http]);
        assert_eq!(code, Some(0), "site {k} health: {out}");
    }

    // Reachability: peers' dial-backs find the public node public at its
    // address and the site nodes private (their NATs drop a dial from a
    // socket they never sent to).
    let reach = |host: &netns::Host, http: &str, want: &str| -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, out) = host.run(&["health", "--json", "--http", http]);
            let v: serde_json::Value = out
                .lines()
                .find(|l| l.starts_with('{'))
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_default();
            if v["reachability"] == want {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "reachability never became {want}: {out}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let v = reach(p, &public_http, "public");
    assert_eq!(v["public_addrs"][0], public_addr.as_str(), "{v}");
    for (k, n, _, _) in &mut site_nodes {
        let http = n.field("http");
        let host = t.site(*k).hosts[0].clone();
        let v = reach(&host, &http, "private");
        assert_eq!(v["public_addrs"].as_array().map(Vec::len), Some(0), "{v}");
    }

    // The direct dials failed.
    for (to, d) in &mut dials {
        let deadline = Instant::now() + Duration::from_secs(30);
        let code = loop {
            if let Some(status) = d.child.try_wait().expect("try_wait") {
                break status.code();
            }
            assert!(
                Instant::now() < deadline,
                "dial from site 1 to {to} did not give up"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        d.seen.extend(d.lines.try_iter());
        let out = d.seen.join("\n");
        assert_eq!(code, Some(1), "dial from site 1 to {to}: {out}");
        assert!(out.contains("could not join the mesh"), "{to}: {out}");
    }

    for (_, n, _, _) in &mut site_nodes {
        assert_eq!(n.terminate(), Some(0));
    }
    assert_eq!(public.terminate(), Some(0));
    eprintln!("took {:?}", started.elapsed());
}

/// The value of an unlabelled series in Prometheus text (0 if absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// Two private full nodes, one per site, bootstrapped to the public node:
/// a direct dial from site 1 to site 2 fails, while an RPC call and pub/sub
/// delivery from site 1 to site 2 succeed through the relay (the public
/// node counts a relayed session for each).
#[test]
#[ignore = "needs root: network namespaces (scripts/test.sh runs these with --ignored as root)"]
fn private_sites_reach_each_other_through_the_relay() {
    if netns::skip() {
        return;
    }
    let started = Instant::now();
    let t = two_sites();
    let (p, a, b) = (t.public(0), &t.site(1).hosts[0], &t.site(2).hosts[0]);
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("{}:0", p.ip);
    let mut public = p.spawn(&start_args(REALM, dir.path(), &["--listen", &listen]));
    let public_addr = public.field("listen");
    let public_http = public.field("http");
    let relay_metrics = || -> String {
        let (code, out) = p.run(&["metrics", "--raw", "--http", &public_http]);
        assert_eq!(code, Some(0), "{out}");
        out
    };
    let mesh = ["--full-node", "--connect", &public_addr, "--realm", REALM];

    // Site 2: a server and a subscriber, full nodes behind NAT.
    let server_listen = format!("{}:4500", b.ip);
    let mut serve_args = vec!["serve", "nat.echo", "--echo", "--listen", &server_listen];
    serve_args.extend(mesh);
    let mut server = b.spawn(&serve_args);
    server.wait_for(&["serving nat.echo"]);
    let mut sub_args = vec!["sub", "nat.**", "--count", "1"];
    sub_args.extend(mesh);
    let mut sub = b.spawn(&sub_args);
    sub.wait_for(&["subscribed to nat.**"]);

    // A direct dial from site 1 to the server (its router's WAN address at
    // the server's port) fails.
    let via_router = SocketAddr::new(IpAddr::V4(t.site(2).wan_ip), 4500).to_string();
    let mut direct = a.spawn(&[
        "dht",
        "get",
        "probe",
        "--connect",
        &via_router,
        "--realm",
        REALM,
    ]);

    // Site 1 calls the server: the call finds it private and goes through
    // the public node. Retried while the server is still learning that it
    // is private and reserving at the relay.
    let mut call_args = vec!["call", "nat.echo", "through the relay", "--timeout", "8000"];
    call_args.extend(mesh);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, out) = a.run(&call_args);
        if code == Some(0) {
            assert!(out.contains("through the relay"), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the call from site 1 to site 2 never went through: {out}"
        );
        eprintln!("call not through yet: {}", out.lines().last().unwrap_or(""));
        std::thread::sleep(Duration::from_millis(500));
    }
    let after_call = metric(&relay_metrics(), "macula_relay_sessions_opened_total");
    assert!(after_call >= 1, "the call was not relayed");

    // Site 1 publishes; the subscriber in site 2 receives through the relay.
    let mut pub_args = vec!["pub", "nat.greeting", "hello site 2"];
    pub_args.extend(mesh);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (code, out) = a.run(&pub_args);
        assert_eq!(code, Some(0), "pub: {out}");
        if let Some(st) = sub.wait_exit(Duration::from_secs(2)) {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber in site 2 never received from site 1"
        );
    };
    assert!(status.success(), "sub exited with {status:?}");
    sub.seen.extend(sub.lines.try_iter());
    let out = sub.seen.join("\n");
    assert!(out.contains("hello site 2"), "{out}");
    let text = relay_metrics();
    let sessions = metric(&text, "macula_relay_sessions_opened_total");
    assert!(
        sessions > after_call,
        "the publish was not relayed ({sessions} sessions): {text}"
    );
    assert!(metric(&text, "macula_relay_bytes_total") > 0, "{text}");
    assert!(metric(&text, "macula_relay_reservations") >= 1, "{text}");

    // The direct dial gave up.
    let st = direct
        .wait_exit(Duration::from_secs(30))
        .expect("the direct dial gives up");
    direct.seen.extend(direct.lines.try_iter());
    assert_eq!(st.code(), Some(1), "{}", direct.seen.join("\n"));

    assert_eq!(server.terminate(), Some(0));
    assert_eq!(public.terminate(), Some(0));
    eprintln!("took {:?}", started.elapsed());
}

/// Dropping a topology kills what runs in it and deletes its namespaces;
/// namespaces of a dead harness process are removed by the next one.
#[test]
#[ignore = "needs root: network namespaces (scripts/test.sh runs these with --ignored as root)"]
fn teardown_removes_everything() {
    if netns::skip() {
        return;
    }
    let t = two_sites();
    let names = t.namespaces().to_vec();
    assert_eq!(names.len(), 6, "{names:?}");
    let mut sleeper = t.site(1).hosts[0]
        .command("sleep", &["600"])
        .spawn()
        .expect("spawn sleep");
    drop(t);
    let deadline = Instant::now() + WAIT;
    while sleeper.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "process in the namespace survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = netns::list_namespaces();
    for n in &names {
        assert!(!left.contains(n), "{n} survived the drop");
    }

    // A namespace named after a dead pid is stale.
    let mut gone = std::process::Command::new("true").spawn().expect("true");
    let dead = gone.id();
    gone.wait().expect("wait");
    let stale = format!("{}{dead}-0-sw", netns::PREFIX);
    let st = std::process::Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("ip netns add");
    assert!(st.success());
    let removed = netns::remove_stale();
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!netns::list_namespaces().contains(&stale));
}
