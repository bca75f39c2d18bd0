//! Test hosts in Linux network namespaces: a "public" segment and private
//! sites behind NAT, built with `ip` (iproute2) and `nft` (nftables).
//!
//! ```text
//!                 switch namespace: bridge br0  (198.18.0.0/24)
//!        +---------------+----------------+----------------+
//!   public host 0    public host 1 ...  router 1 wan0    router 2 wan0 ...
//!   198.18.0.10      198.18.0.11        198.18.0.101     198.18.0.102
//!                                       | masquerade     | masquerade
//!                                       router 1 lan0    router 2 lan0
//!                                       198.19.1.1/24    198.19.2.1/24
//!                                       |                |
//!                                       site 1 hosts     site 2 hosts
//!                                       198.19.1.10 ...  198.19.2.10 ...
//! ```
//!
//! Only 198.18.0.0/15 (reserved for benchmarking, RFC 2544) is used. Public
//! hosts and routers have no route to any site's LAN, so a private address is
//! unreachable from outside its site. Each router masquerades what leaves
//! its WAN interface and forwards WAN -> LAN only for connections its LAN
//! opened (conntrack), like a home NAT router.
//!
//! Every namespace is named `mnat-<pid>-<counter>-<role>`, so topologies in
//! parallel tests and test binaries never collide. Dropping a `Topology`
//! kills every process still inside its namespaces, then deletes them (the
//! veth links and bridges go with them), also when an assertion failed.
//! Namespaces of an earlier run whose process is gone are removed before
//! the first topology is built.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::{prepare, Proc, BIN, WAIT};

/// Every namespace the harness creates starts with this.
pub const PREFIX: &str = "mnat-";
/// Set to 1 to make a missing prerequisite fail the test instead of skipping
/// it (CI sets it: it runs as root and must run these tests).
pub const REQUIRE_ENV: &str = "MACULA_TEST_REQUIRE_NETNS";

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static STALE: Once = Once::new();

/// Why namespace tests cannot run here, or None when they can.
pub fn unsupported() -> Option<String> {
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("needs root (euid is {euid})"));
    }
    for (tool, arg, pkg) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Some(format!("needs `{tool}` (install {pkg})"));
        }
    }
    None
}

/// True when the calling test must return early (it then passes as
/// skipped): prints why to stderr. Panics instead when
/// `MACULA_TEST_REQUIRE_NETNS=1`.
pub fn skip() -> bool {
    let Some(why) = unsupported() else {
        return false;
    };
    // libtest names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: network namespace test cannot run: {why} ({REQUIRE_ENV}=1)");
    }
    eprintln!("SKIPPED {test}: network namespace test {why}");
    true
}

/// What to build: how many public hosts, and one entry per site with its
/// number of hosts (site k, counted from 1, gets 198.19.k.0/24); site k's
/// router behaves as `nats[k - 1]` (port-restricted, Linux masquerade's
/// default, for sites without an entry).
#[derive(Clone, Debug, Default)]
pub struct Spec {
    pub public_hosts: usize,
    pub sites: Vec<usize>,
    pub nats: Vec<NatKind>,
}

/// A router's NAT behaviour (RFC 4787 terms), built with nftables.
///
/// | kind | mapping | filtering |
/// |---|---|---|
/// | `FullCone` | endpoint-independent | endpoint-independent |
/// | `RestrictedCone` | endpoint-independent | address-dependent |
/// | `PortRestricted` | endpoint-independent | address-and-port-dependent |
/// | `Symmetric` | address-and-port-dependent | address-and-port-dependent |
///
/// Endpoint-independent mapping is masquerade keeping the source port
/// (which it does unless two LAN hosts use the same one); symmetric is
/// masquerade `fully-random` (a random port per destination). The cones'
/// filtering is a dynamic map from a LAN host's source port to its address
/// (`portmap`) and, for the restricted cone, a set of (remote IP, port) the
/// LAN host sent to (`seen`), both learned from outgoing packets: an
/// inbound packet to a mapped port is forwarded to its host when the kind
/// allows it, whatever its source port. An unsolicited packet to the
/// router itself is dropped before conntrack confirms it (as home routers
/// do): otherwise its entry would hold the mapped port, and the LAN host's
/// next packet to that sender would be given another port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NatKind {
    FullCone,
    RestrictedCone,
    #[default]
    PortRestricted,
    Symmetric,
}

impl NatKind {
    pub const ALL: [NatKind; 4] = [
        NatKind::FullCone,
        NatKind::RestrictedCone,
        NatKind::PortRestricted,
        NatKind::Symmetric,
    ];

    /// The router's nftables ruleset for LAN `lan` (CIDR).
    pub fn rules(self, lan: &str) -> String {
        let masquerade = match self {
            NatKind::Symmetric => "masquerade fully-random",
            _ => "masquerade",
        };
        let inbound = match self {
            NatKind::FullCone => r#"iifname "wan0" dnat to udp dport map @portmap"#,
            NatKind::RestrictedCone => {
                r#"iifname "wan0" ip saddr . udp dport @seen dnat to udp dport map @portmap"#
            }
            NatKind::PortRestricted | NatKind::Symmetric => "",
        };
        format!(
            r#"
table ip nat {{
    map portmap {{
        type inet_service : ipv4_addr
        flags dynamic,timeout
        timeout 5m
    }}
    set seen {{
        type ipv4_addr . inet_service
        flags dynamic,timeout
        timeout 5m
    }}
    chain learn {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "lan0" ip daddr != {lan} update @portmap {{ udp sport : ip saddr }}
        iifname "lan0" ip daddr != {lan} update @seen {{ ip daddr . udp sport }}
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {inbound}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" {masquerade}
    }}
}}
table inet filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state new drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
        iifname "wan0" oifname "lan0" ct status dnat accept
    }}
}}
"#
        )
    }
}

/// One machine: a namespace with one address.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A private site: its NAT router and the hosts behind it.
#[derive(Clone, Debug)]
pub struct Site {
    /// The router's namespace.
    pub router: String,
    /// The router's address on the public segment (what the outside sees).
    pub wan_ip: Ipv4Addr,
    /// The router's LAN address, the hosts' default gateway.
    pub lan_ip: Ipv4Addr,
    pub hosts: Vec<Host>,
}

/// A built topology. Dropping it removes everything it created.
pub struct Topology {
    /// Created namespaces, in creation order (deleted in reverse).
    namespaces: Vec<String>,
    pub switch: String,
    pub public: Vec<Host>,
    pub sites: Vec<Site>,
}

/// Runs a command to completion; panics with its output when it fails.
fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sh` with `input` on stdin.
fn sh_input(args: &[&str], input: &str) {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{args:?} failed ({}) on input:\n{input}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Names of every namespace (first word of each `ip netns list` line).
pub fn list_namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Pids of the processes inside namespace `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills every process inside `ns` (bounded wait for them to go), then
/// deletes it. Never panics: runs from `Drop`.
fn destroy(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether process `pid` exists.
fn alive(pid: i32) -> bool {
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid a harness namespace name was created by, if it is one.
pub fn owner_pid(ns: &str) -> Option<i32> {
    ns.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes namespaces left by harness runs whose process is gone.
pub fn remove_stale() -> Vec<String> {
    let me = std::process::id() as i32;
    let mut removed = Vec::new();
    for ns in list_namespaces() {
        match owner_pid(&ns) {
            Some(pid) if pid != me && !alive(pid) => {
                destroy(&ns);
                removed.push(ns);
            }
            _ => {}
        }
    }
    removed
}

impl Topology {
    /// Builds `spec`, or panics with the failing command (what was already
    /// created is removed by `Drop` during the unwind).
    pub fn build(spec: &Spec) -> Topology {
        assert!(spec.public_hosts <= 90, "at most 90 public hosts");
        assert!(spec.sites.len() <= 150, "at most 150 sites");
        assert!(
            spec.sites.iter().all(|&n| n <= 240),
            "at most 240 hosts/site"
        );
        STALE.call_once(|| {
            remove_stale();
        });
        let id = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{id}", std::process::id());
        let mut t = Topology {
            namespaces: Vec::new(),
            switch: format!("{base}-sw"),
            public: Vec::new(),
            sites: Vec::new(),
        };
        let switch = t.switch.clone();
        t.add_ns(&switch);
        sh(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &switch, "link", "set", "br0", "up"]);

        for i in 0..spec.public_hosts {
            let ns = format!("{base}-pub{i}");
            let ip = Ipv4Addr::new(198, 18, 0, 10 + i as u8);
            t.add_ns(&ns);
            t.attach(&ns, "eth0", &switch, &format!("pub{i}"), "br0");
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            t.public.push(Host { ns, ip });
        }

        for (k, &n_hosts) in spec.sites.iter().enumerate() {
            let k = k + 1;
            let router = format!("{base}-r{k}");
            let wan_ip = Ipv4Addr::new(198, 18, 0, 100 + k as u8);
            let lan_ip = Ipv4Addr::new(198, 19, k as u8, 1);
            t.add_ns(&router);
            t.attach(&router, "wan0", &switch, &format!("r{k}"), "br0");
            sh(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                &format!("{wan_ip}/24"),
                "dev",
                "wan0",
            ]);
            sh(&["ip", "-n", &router, "link", "set", "wan0", "up"]);
            sh(&["ip", "-n", &router, "link", "add", "lan0", "type", "bridge"]);
            sh(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                &format!("{lan_ip}/24"),
                "dev",
                "lan0",
            ]);
            sh(&["ip", "-n", &router, "link", "set", "lan0", "up"]);
            in_netns(&router, || {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding")
            });
            let kind = spec.nats.get(k - 1).copied().unwrap_or_default();
            sh_input(
                &["ip", "netns", "exec", &router, "nft", "-f", "-"],
                &kind.rules(&format!("198.19.{k}.0/24")),
            );
            let mut hosts = Vec::new();
            for j in 0..n_hosts {
                let ns = format!("{base}-s{k}h{j}");
                let ip = Ipv4Addr::new(198, 19, k as u8, 10 + j as u8);
                t.add_ns(&ns);
                t.attach(&ns, "eth0", &router, &format!("h{j}"), "lan0");
                sh(&[
                    "ip",
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    "eth0",
                ]);
                sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
                sh(&[
                    "ip",
                    "-n",
                    &ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &lan_ip.to_string(),
                ]);
                hosts.push(Host { ns, ip });
            }
            t.sites.push(Site {
                router,
                wan_ip,
                lan_ip,
                hosts,
            });
        }
        t
    }

    /// Every namespace of this topology.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Public host `i` (from 0).
    pub fn public(&self, i: usize) -> &Host {
        &self.public[i]
    }

    /// Site `k` (from 1, as in its address 198.19.k.0/24).
    pub fn site(&self, k: usize) -> &Site {
        &self.sites[k - 1]
    }

    fn add_ns(&mut self, ns: &str) {
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// A veth pair: `dev` in `ns`, `port` in `sw_ns` enslaved to `bridge`.
    fn attach(&self, ns: &str, dev: &str, sw_ns: &str, port: &str, bridge: &str) {
        sh(&[
            "ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns",
            sw_ns,
        ]);
        sh(&["ip", "-n", sw_ns, "link", "set", port, "master", bridge]);
        sh(&["ip", "-n", sw_ns, "link", "set", port, "up"]);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Hosts first, the switch last; each namespace's processes are
        // killed before it is deleted.
        for ns in self.namespaces.iter().rev() {
            destroy(ns);
        }
    }
}

impl Host {
    /// `program args...` inside this host's namespace. The process gets
    /// SIGKILL if the thread that spawned it dies (a test binary killed
    /// mid-run leaves nothing running; its namespaces are removed as stale
    /// by the next run).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]).args(args);
        // SAFETY: prctl is async-signal-safe; nothing is allocated.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// `macula args...` inside this host's namespace, set up like
    /// `common::command` (`ip netns exec` execs it: the child's pid is
    /// macula's, so `Proc::terminate` signals macula itself).
    pub fn macula(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(BIN, args);
        prepare(&mut cmd);
        cmd
    }

    /// Spawns `macula args...` here.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        Proc::spawn_cmd(self.macula(args))
    }

    /// Runs `macula args...` here to completion: (exit code, output).
    pub fn run(&self, args: &[&str]) -> (Option<i32>, String) {
        super::run(self.macula(args))
    }

    /// Runs `f` on a thread inside this host's network namespace; sockets
    /// it creates stay in the namespace wherever they are used afterwards.
    pub fn in_ns<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        in_netns(&self.ns, f)
    }

    /// A TCP listener on this host's address (ephemeral port).
    pub fn tcp_listen(&self) -> TcpListener {
        let ip = self.ip;
        self.in_ns(move || TcpListener::bind((ip, 0)).expect("bind TCP listener"))
    }

    /// A UDP socket on this host's address (ephemeral port).
    pub fn udp_bind(&self) -> UdpSocket {
        let ip = self.ip;
        self.in_ns(move || UdpSocket::bind((ip, 0)).expect("bind UDP socket"))
    }

    /// A TCP connection from this host to `to`, within `timeout`.
    pub fn tcp_connect(&self, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.in_ns(move || TcpStream::connect_timeout(&to, timeout))
    }
}

/// Runs `f` on a thread that has joined network namespace `ns` (sockets
/// and `/proc/sys/net` files it opens belong to `ns`).
pub fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread inside the namespace panicked")
}

/// Accepts one connection on `l` within `WAIT`; returns the peer's address.
pub fn accept_from(l: &TcpListener) -> SocketAddr {
    l.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + WAIT;
    loop {
        match l.accept() {
            Ok((_, from)) => return from,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {WAIT:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// One datagram received on `sock` within `wait`: its payload and source;
/// `None` when nothing came.
pub fn udp_recv(sock: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    sock.set_read_timeout(Some(wait)).expect("read timeout");
    let mut buf = [0u8; 1500];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => Some((buf[..n].to_vec(), from)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv_from: {e}"),
    }
}
