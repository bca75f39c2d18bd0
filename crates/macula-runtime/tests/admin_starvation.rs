//! The admin HTTP server under connection floods: slow-loris clients
//! (a partial request head, then a byte a second) from one and from several
//! loopback addresses must not keep `/live`, `/ready` and `/health` out, and
//! a client that sends nothing is closed at the request deadline.
//!
//! Only 127.0.0.0/8 is used (Linux loopback answers on all of it). Every
//! wait is bounded and every loop has a fixed number of rounds; nothing
//! asserts how long something took.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{config, eventually, start, within, STEP};
use macula_runtime::admin::{self, AdminLimits};
use macula_runtime::NodeRuntime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// A running admin server; stops it (bounded) on `stop`.
struct Admin {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Admin {
    async fn start(node: &NodeRuntime, limits: Option<AdminLimits>) -> Admin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin listener");
        let addr = listener.local_addr().expect("admin addr");
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = match limits {
            Some(limits) => {
                tokio::spawn(admin::serve_with(listener, node.clone(), shutdown, limits))
            }
            None => tokio::spawn(admin::serve(listener, node.clone(), shutdown)),
        };
        Admin {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        within(STEP, "admin server stops", &mut self.task)
            .await
            .expect("join admin task")
            .expect("admin server result");
    }
}

/// `GET path` with `Connection: close` from 127.0.0.1, read to EOF:
/// (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    within(STEP, path, async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read response");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{path}: no complete response: {text:?}"));
        let status_line = head.lines().next().unwrap_or_default();
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "{path}: bad status line {status_line:?}"
        );
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{path}: bad status line {status_line:?}"));
        (status, body.to_string())
    })
    .await
}

/// The value of an unlabelled sample in `/metrics`.
async fn counter(addr: SocketAddr, name: &str) -> u64 {
    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

/// Slow-loris clients: each connects from its source address, sends a
/// partial request head, then one byte a second until the server closes it,
/// `stop` is set, or 120 bytes were sent.
struct Attack {
    tasks: JoinSet<()>,
    stop: Arc<AtomicBool>,
    /// Clients whose connect attempt (and first write) finished.
    settled: Arc<AtomicUsize>,
    connected: Arc<AtomicUsize>,
    total: usize,
}

impl Attack {
    fn launch(target: SocketAddr, sources: &[(IpAddr, usize)]) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let settled = Arc::new(AtomicUsize::new(0));
        let connected = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let mut total = 0;
        for &(src, count) in sources {
            for _ in 0..count {
                total += 1;
                let (stop, settled, connected) = (stop.clone(), settled.clone(), connected.clone());
                tasks.spawn(async move {
                    let stream = tokio::time::timeout(STEP, slow_loris_open(src, target)).await;
                    settled.fetch_add(1, Ordering::SeqCst);
                    let Ok(Some(mut stream)) = stream else {
                        return;
                    };
                    connected.fetch_add(1, Ordering::SeqCst);
                    for _ in 0..120 {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        // The header value grows by a byte a second; the
                        // head is never complete.
                        if stream.write_all(b"a").await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
        Attack {
            tasks,
            stop,
            settled,
            connected,
            total,
        }
    }

    /// Waits (bounded) until every client has connected or failed to.
    async fn established(&self) {
        eventually(
            Duration::from_secs(30),
            "slow-loris clients connect",
            || self.settled.load(Ordering::SeqCst) == self.total,
        )
        .await;
        assert_eq!(
            self.connected.load(Ordering::SeqCst),
            self.total,
            "every slow-loris client connects (the server always accepts)"
        );
    }

    async fn end(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.tasks.abort_all();
        within(STEP, "slow-loris tasks end", async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// A connected client on `src` that sent a partial request head.
async fn slow_loris_open(src: IpAddr, target: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(src, 0)).ok()?;
    let mut stream = socket.connect(target).await.ok()?;
    stream
        .write_all(b"GET /live HTTP/1.1\r\nHost: macula\r\nX-Slow: ")
        .await
        .ok()?;
    Some(stream)
}

fn lo(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// 1,000 slow-loris clients from 127.0.0.2, 16 from each of 127.0.0.3-10
/// and 32 from 127.0.0.1 (the probes' own address); the probes from
/// 127.0.0.1 still get answers.
fn flood_sources() -> Vec<(IpAddr, usize)> {
    let mut sources = vec![(lo(2), 1000), (lo(1), 32)];
    sources.extend((3..=10).map(|i| (lo(i), 16)));
    sources
}

const FLOOD_TOTAL: u64 = 1000 + 32 + 8 * 16;

/// Sends the probes: each must be answered.
async fn probe(addr: SocketAddr) {
    for round in 0..5 {
        let (status, body) = get(addr, "/live").await;
        assert_eq!(status, 200, "round {round} /live: {body}");
        assert!(body.contains("\"live\":true"), "{body}");
        // A first node (no bootstrap peers) is ready at once.
        let (status, body) = get(addr, "/ready").await;
        assert_eq!(status, 200, "round {round} /ready: {body}");
        assert!(body.contains("\"ready\":true"), "{body}");
        let (status, body) = get(addr, "/health").await;
        assert_eq!(status, 200, "round {round} /health: {body}");
    }
}

/// With the request deadline out of the way (10 minutes), only the slot
/// eviction and the per-address limit protect the probes, and the counts
/// follow from the numbers: all slots stay taken by clients that never
/// finish a request, so every connection accepted beyond the 64 open ones
/// closed one (or was closed itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "binds 127.0.0.2-10, which only Linux answers on loopback"
)]
async fn slow_loris_flood_cannot_take_the_slots() {
    common::init_tracing();
    let node = start(config()).await;
    let mut limits = AdminLimits::default();
    limits.request_deadline = Duration::from_secs(600);
    let admin = Admin::start(&node, Some(limits)).await;

    let attack = Attack::launch(admin.addr, &flood_sources());
    attack.established().await;

    // Of the 1,160 attack connections at most 64 stay open, so once the
    // server has accepted all of them, 1,096 or more closed another one or
    // were closed (the probes add to that). The client's connect can return
    // before the server's kernel queued the connection (accept queue
    // overflow), so wait (bounded) until the server has seen them all: then
    // every slot is held by a slow-loris client when the probes start.
    let max = admin::MAX_ADMIN_CONNECTIONS as u64;
    let mut seen = (0, 0);
    for _ in 0..300 {
        seen = (
            counter(admin.addr, "macula_admin_connections_refused_total").await,
            counter(admin.addr, "macula_admin_connections_evicted_total").await,
        );
        if seen.0 + seen.1 >= FLOOD_TOTAL - max {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.0 + seen.1 >= FLOOD_TOTAL - max,
        "refused {} + evicted {} < {}",
        seen.0,
        seen.1,
        FLOOD_TOTAL - max
    );
    probe(admin.addr).await;

    let refused = counter(admin.addr, "macula_admin_connections_refused_total").await;
    let evicted = counter(admin.addr, "macula_admin_connections_evicted_total").await;
    assert!(refused > 0, "the per-address limit acted");
    // 127.0.0.3-10 stay within their limit (128), plus 16 each from .1 and
    // .2: 160 > 64 slots, so at least 96 were evicted.
    assert!(evicted >= 160 - max, "evicted {evicted}");
    let timed_out = counter(admin.addr, "macula_admin_requests_timed_out_total").await;
    assert_eq!(timed_out, 0, "no deadline in this test");

    attack.end().await;
    admin.stop().await;
    node.shutdown().await;
}

/// The same flood against the default server (`serve`): the probes are
/// answered and the limits acted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "binds 127.0.0.2-10, which only Linux answers on loopback"
)]
async fn slow_loris_flood_against_the_default_server() {
    common::init_tracing();
    let node = start(config()).await;
    let admin = Admin::start(&node, None).await;

    let attack = Attack::launch(admin.addr, &flood_sources());
    attack.established().await;
    probe(admin.addr).await;

    let refused = counter(admin.addr, "macula_admin_connections_refused_total").await;
    let evicted = counter(admin.addr, "macula_admin_connections_evicted_total").await;
    let timed_out = counter(admin.addr, "macula_admin_requests_timed_out_total").await;
    assert!(
        refused + evicted + timed_out > 0,
        "refused {refused}, evicted {evicted}, timed out {timed_out}"
    );
    assert!(refused > 0, "127.0.0.2 went over its limit");

    attack.end().await;
    admin.stop().await;
    node.shutdown().await;
}

/// A client that sends nothing, and one that trickles a partial head, are
/// closed by the server at the request deadline (300 ms here); a normal
/// keep-alive client is answered on the same connection.
#[tokio::test]
async fn request_deadline_closes_silent_and_slow_clients() {
    common::init_tracing();
    let node = start(config()).await;
    let mut limits = AdminLimits::default();
    limits.request_deadline = Duration::from_millis(300);
    let admin = Admin::start(&node, Some(limits)).await;

    // Silent: the server closes it (EOF) without the client writing.
    let mut silent = within(STEP, "connect", TcpStream::connect(admin.addr))
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let n = within(
        STEP,
        "server closes the silent client",
        silent.read(&mut buf),
    )
    .await
    .expect("read after close");
    assert_eq!(n, 0, "EOF, not a response");

    // Trickling faster than the idle timeout: still closed.
    let mut slow = within(STEP, "connect", TcpStream::connect(admin.addr))
        .await
        .expect("connect");
    slow.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("partial head");
    let mut closed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if slow.write_all(b"a").await.is_err() {
            closed = true;
            break;
        }
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => panic!("unexpected response: {:?}", &buf[..n]),
            Err(_) => {}
        }
    }
    assert!(closed, "the trickling client was closed");

    // A complete request is answered, twice on one keep-alive connection.
    let mut kept = within(STEP, "connect", TcpStream::connect(admin.addr))
        .await
        .expect("connect");
    for _ in 0..2 {
        kept.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let mut got = Vec::new();
        within(STEP, "keep-alive answer", async {
            for _ in 0..100 {
                let n = kept.read(&mut buf).await.expect("read answer");
                assert!(n > 0, "closed before the answer: {got:?}");
                got.extend_from_slice(&buf[..n]);
                if got.ends_with(b"{\"live\":true}") {
                    break;
                }
            }
        })
        .await;
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    }

    let timed_out = counter(admin.addr, "macula_admin_requests_timed_out_total").await;
    assert!(timed_out >= 2, "timed out {timed_out}");

    admin.stop().await;
    node.shutdown().await;
}
