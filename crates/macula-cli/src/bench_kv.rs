//! `macula bench kv`: a load generator for a Raft group's KV, and for an
//! etcd cluster beside it (same client logic, same run), so the two can be
//! compared on one machine in one invocation (`scripts/bench-raft.py`
//! starts both clusters, runs this once per target and kills leaders).
//!
//! Macula: this process starts a node of its own (no data directory, not a
//! member), joins the mesh through `--macula`, and reaches the group over
//! RPC through any member (`Node::kv`): the path a non-member application
//! takes. etcd: its v3 JSON gateway over HTTP/1.1 keep-alive connections
//! (one per client), `POST /v3/kv/put` and `/v3/kv/range` (linearizable,
//! etcd's default); the gateway's JSON translation costs etcd some
//! microseconds per request compared with its gRPC clients.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use macula::raft::Kv;
use macula::Node;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench_stats::{build_kind, latency, Latency};

#[derive(clap::Args, Debug)]
pub struct KvArgs {
    /// A node of the mesh to join through (host:port); with --group.
    #[arg(long, conflicts_with = "etcd")]
    macula: Option<String>,
    /// The Raft group to load.
    #[arg(long, default_value = "bench")]
    group: String,
    /// etcd client URLs (http://127.0.0.1:2379,...): load etcd instead.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Sequential puts and gets for the latency runs (1..=100000).
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// Concurrent clients for the throughput run (1..=1024).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Puts per client in the throughput run.
    #[arg(long, default_value_t = 200)]
    per_client: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Instead of the runs: one client writing in a loop for this many
    /// seconds, reporting the longest gap between two acknowledged writes
    /// (kill the leader meanwhile) and checking every acknowledged write is
    /// readable afterwards.
    #[arg(long)]
    failover_secs: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    target: String,
    build: &'static str,
    put: Option<Latency>,
    get: Option<Latency>,
    throughput_puts_per_s: Option<f64>,
    clients: usize,
    failover: Option<Failover>,
}

#[derive(Debug, serde::Serialize)]
struct Failover {
    acknowledged: u64,
    failed_attempts: u64,
    longest_gap_ms: f64,
    lost: u64,
}

/// One connection to the store under test.
#[derive(Clone)]
enum Target {
    Macula(Kv),
    Etcd(Arc<Vec<String>>),
}

/// A client of the target: Macula's `Kv` is shared; etcd gets one
/// keep-alive HTTP connection per client.
enum Conn {
    Macula(Kv),
    Etcd(EtcdConn),
}

impl Target {
    async fn conn(&self, i: usize) -> anyhow::Result<Conn> {
        Ok(match self {
            Target::Macula(kv) => Conn::Macula(kv.clone()),
            Target::Etcd(urls) => Conn::Etcd(EtcdConn::connect(&urls[i % urls.len()]).await?),
        })
    }
}

impl Conn {
    async fn put(&mut self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Macula(kv) => kv.put(key, value).await.map(drop).map_err(Into::into),
            Conn::Etcd(c) => c.put(key, value).await,
        }
    }

    async fn get(&mut self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Conn::Macula(kv) => Ok(kv.get(key).await?.map(|kv| kv.value)),
            Conn::Etcd(c) => c.get(key).await,
        }
    }
}

pub async fn run(args: KvArgs) -> anyhow::Result<()> {
    if !(1..=100_000).contains(&args.count) || !(1..=1024).contains(&args.clients) {
        bail!("--count must be 1..=100000 and --clients 1..=1024");
    }
    let (target, name, _node) = match (&args.macula, args.etcd.is_empty()) {
        (Some(addr), true) => {
            let node = Node::builder()
                .realm(std::env::var("MACULA_REALM").unwrap_or_else(|_| "default".into()))
                .listen("127.0.0.1:0".parse()?)
                .bootstrap([addr.clone()])
                .start()
                .await
                .context("joining the mesh")?;
            let kv = node.kv(&args.group, Duration::from_secs(5));
            (
                Target::Macula(kv),
                format!("macula group {}", args.group),
                Some(node),
            )
        }
        (None, false) => (
            Target::Etcd(Arc::new(args.etcd.clone())),
            format!("etcd {}", args.etcd.join(",")),
            None,
        ),
        _ => bail!("give exactly one of --macula ADDR or --etcd URLS"),
    };
    // The first request finds a provider (Macula) or warms the connection.
    let mut warm = target.conn(0).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match warm.put("bench/warm", b"1").await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "warm-up put");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("the store never accepted a write")),
        }
    }
    let value = vec![b'v'; args.size];
    let mut report = Report {
        target: name,
        build: build_kind(),
        put: None,
        get: None,
        throughput_puts_per_s: None,
        clients: args.clients,
        failover: None,
    };
    if let Some(secs) = args.failover_secs {
        report.failover = Some(failover(&target, &value, Duration::from_secs(secs)).await?);
    } else {
        let mut c = target.conn(0).await?;
        let mut ns = Vec::with_capacity(args.count);
        for i in 0..args.count {
            let t = Instant::now();
            c.put(&format!("bench/seq/{i}"), &value).await?;
            ns.push(t.elapsed().as_nanos() as u64);
        }
        report.put = Some(latency(&mut ns));
        ns.clear();
        for i in 0..args.count {
            let t = Instant::now();
            let got = c.get(&format!("bench/seq/{i}")).await?;
            ns.push(t.elapsed().as_nanos() as u64);
            if got.as_deref() != Some(&value[..]) {
                bail!("bench/seq/{i} read back wrong");
            }
        }
        report.get = Some(latency(&mut ns));
        report.throughput_puts_per_s = Some(throughput(&target, &args, &value).await?);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{} ({} build)", report.target, report.build);
        if let (Some(p), Some(g)) = (&report.put, &report.get) {
            println!(
                "  put latency (1 client):   p50 {:>8.0} us  p99 {:>8.0} us",
                p.p50_us, p.p99_us
            );
            println!(
                "  get latency (linearizable): p50 {:>6.0} us  p99 {:>8.0} us",
                g.p50_us, g.p99_us
            );
        }
        if let Some(t) = report.throughput_puts_per_s {
            println!(
                "  put throughput ({} clients): {:.0} puts/s",
                args.clients, t
            );
        }
        if let Some(f) = &report.failover {
            println!(
                "  failover: {} writes acknowledged, longest gap {:.0} ms, {} failed attempts, {} lost",
                f.acknowledged, f.longest_gap_ms, f.failed_attempts, f.lost
            );
        }
    }
    Ok(())
}

async fn throughput(target: &Target, args: &KvArgs, value: &[u8]) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut conn = target.conn(c).await?;
        let value = value.to_vec();
        let n = args.per_client;
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                conn.put(&format!("bench/par/{c}/{i}"), &value).await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((args.clients * args.per_client) as f64 / start.elapsed().as_secs_f64())
}

/// One writer for `secs`; every write carries its sequence number. Writes
/// that fail are retried (same key and value) until acknowledged, so the
/// longest gap between acknowledgements is the unavailability a client saw.
async fn failover(target: &Target, value: &[u8], secs: Duration) -> anyhow::Result<Failover> {
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let mut c = target.conn(0).await?;
    let end = Instant::now() + secs;
    let mut acked = 0u64;
    let mut last = Instant::now();
    let mut gap = Duration::ZERO;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let key = format!("bench/failover/{acked}");
        loop {
            match tokio::time::timeout(Duration::from_secs(2), c.put(&key, value)).await {
                Ok(Ok(())) => break,
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() > end + Duration::from_secs(30) {
                        bail!("the store did not come back within 30 s");
                    }
                    // A dead etcd endpoint: move to the next one.
                    if let Target::Etcd(_) = target {
                        c = target
                            .conn((failed.load(Ordering::Relaxed)) as usize)
                            .await
                            .unwrap_or(c);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        gap = gap.max(last.elapsed());
        last = Instant::now();
        acked += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut lost = 0;
    for i in 0..acked {
        let key = format!("bench/failover/{i}");
        let got = loop {
            match c.get(&key).await {
                Ok(v) => break v,
                Err(_) => {
                    if let Target::Etcd(_) = target {
                        c = target.conn(i as usize + 1).await?;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        if got.as_deref() != Some(value) {
            lost += 1;
        }
    }
    Ok(Failover {
        acknowledged: acked,
        failed_attempts: failed.load(Ordering::Relaxed),
        longest_gap_ms: gap.as_secs_f64() * 1e3,
        lost,
    })
}

/// A keep-alive HTTP/1.1 connection to etcd's v3 JSON gateway.
struct EtcdConn {
    host: String,
    stream: BufReader<TcpStream>,
}

impl EtcdConn {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        let host = url
            .strip_prefix("http://")
            .context("etcd URLs are http://host:port")?
            .trim_end_matches('/')
            .to_string();
        let stream = TcpStream::connect(&host)
            .await
            .with_context(|| format!("connecting to etcd at {host}"))?;
        stream.set_nodelay(true)?;
        Ok(EtcdConn {
            host,
            stream: BufReader::new(stream),
        })
    }

    async fn post(&mut self, path: &str, body: &str) -> anyhow::Result<serde_json::Value> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes()).await?;
        let mut status = String::new();
        self.stream.read_line(&mut status).await?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("etcd closed the connection");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse()?;
                }
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await?;
        if !status.contains(" 200 ") {
            bail!(
                "etcd answered {}: {}",
                status.trim(),
                String::from_utf8_lossy(&body)
            );
        }
        Ok(serde_json::from_slice(&body)?)
    }

    async fn put(&mut self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            b64(key.as_bytes()),
            b64(value)
        );
        self.post("/v3/kv/put", &body).await.map(drop)
    }

    async fn get(&mut self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let body = format!(r#"{{"key":"{}"}}"#, b64(key.as_bytes()));
        let v = self.post("/v3/kv/range", &body).await?;
        match v["kvs"][0]["value"].as_str() {
            Some(s) => Ok(Some(unb64(s)?)),
            None => Ok(None),
        }
    }
}

fn b64(data: &[u8]) -> String {
    base64::Engine::encode(&crate::raft_cli::BASE64, data)
}

fn unb64(s: &str) -> anyhow::Result<Vec<u8>> {
    base64::Engine::decode(&crate::raft_cli::BASE64, s).context("bad base64 from etcd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "bench/seq/17"] {
            assert_eq!(unb64(&b64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"fo"), "Zm8=");
    }
}
