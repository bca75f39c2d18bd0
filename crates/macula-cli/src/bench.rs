//! `macula bench ...`: benchmarks that print their figures (text or JSON).
//!
//! Each benchmark starts what it needs itself on loopback, is bounded in
//! count and time, and stops everything it started. Figures belong in
//! BENCHMARKS.md together with the command that produced them.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use macula::{DisconnectReason, Node, NodeId};

use crate::bench_stats::{build_kind, debug_note};

/// Upper bound on `--count`, so a typo cannot run for hours.
const MAX_COUNT: usize = 100_000;
/// Every benchmark gives up after this long.
const MAX_RUNTIME: Duration = Duration::from_secs(600);

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Request/response over one pooled connection versus a new connection
    /// per exchange, and the handshake time (two nodes on 127.0.0.1).
    Pool(PoolArgs),
    /// DHT put, lookup and cached-lookup latency in a mesh of in-process
    /// nodes, each with its own QUIC socket on 127.0.0.1.
    Dht(DhtArgs),
    /// In-process pub/sub: publish-to-receive latency and throughput on one
    /// node (no network hop).
    Local(LocalArgs),
    /// Pub/sub between node processes over QUIC on 127.0.0.1: latency (one
    /// message in flight, and paced), throughput at 64 B and 1 KiB, fan-out.
    /// Starts (and stops) the subscriber node processes itself.
    Pubsub(crate::bench_pubsub::PubsubArgs),
    /// A subscriber node process of `bench pubsub` (started by it).
    #[command(hide = true)]
    PubsubNode(crate::bench_pubsub::NodeArgs),
    /// RPC between two node processes on 127.0.0.1 (this one calls, a
    /// child `macula serve` answers): latency, concurrent throughput, and
    /// pooled versus new connection per call.
    Rpc(crate::bench_rpc::RpcArgs),
    /// Many lightweight client connections to one node: time to connect,
    /// the node's memory per connection and idle CPU, and RPC and pub/sub
    /// latency while they are all attached. Starts its own node process
    /// unless given --node.
    Connections(crate::bench_connections::ConnectionsArgs),
    /// A relayed path versus a direct one on the same topology (in-process
    /// nodes on 127.0.0.1): RPC round-trip latency and bulk throughput.
    Relay(crate::bench_relay::RelayArgs),
    /// A WebAssembly workload (cargo feature `wasm`): compile and
    /// instantiation time, a call into the component versus a native
    /// handler, directly and over RPC from another node (in process).
    #[cfg(feature = "wasm")]
    Wasm(crate::bench_wasm::WasmArgs),
    /// Rolling a new version of a WebAssembly workload out across
    /// in-process nodes (cargo feature `wasm`): upgrade time by strategy,
    /// call latency during the rollout against before.
    #[cfg(feature = "wasm")]
    Upgrade(crate::bench_upgrade::UpgradeArgs),
    /// A Raft group's KV (or an etcd cluster, for comparison) under load:
    /// put and linearizable get latency, concurrent put throughput, or the
    /// write gap across a leader kill (`scripts/bench-raft.py` runs both).
    Kv(crate::bench_kv::KvArgs),
    /// CRDT convergence across node processes on 127.0.0.1: this one and
    /// `--nodes - 1` children add to one OR-set at once; the time until
    /// every replica holds every element.
    Crdt(crate::bench_crdt::CrdtArgs),
    /// A node process of `bench crdt` (started by it).
    #[command(hide = true)]
    CrdtNode(crate::bench_crdt::CrdtNodeArgs),
    /// A realm with an authority and 1,000-rule grants versus an open realm
    /// (in-process nodes on 127.0.0.1, rounds alternating): handshake time,
    /// publish and call throughput.
    Authz(crate::bench_authz::AuthzArgs),
    /// Proved publishers off and on (in-process nodes and a client on
    /// 127.0.0.1, rounds alternating): client -> gateway -> node throughput
    /// and latency of 64 B and 16 KiB messages.
    Proofs(crate::bench_proofs::ProofsArgs),
    /// End-to-end payload encryption off and on (in-process nodes and a
    /// client of a realm with an authority on 127.0.0.1, rounds
    /// alternating): client -> gateway -> node throughput and latency of
    /// 64 B and 16 KiB messages.
    E2e(crate::bench_e2e::E2eArgs),
    /// The MQTT bridge against Debian's mosquitto broker, side by side:
    /// QoS 0 and QoS 1 throughput (1 publisher -> 1 subscriber), round-trip
    /// latency, and memory per idle connection. Starts both itself.
    Mqtt(crate::bench_mqtt::MqttArgs),
    /// Durable streams against NATS JetStream (`nats-server -js`, file
    /// storage) in one run: acknowledged publish throughput and latency,
    /// replay throughput and restart time with --replay messages stored,
    /// and a work queue of --msgs messages emptied with one ack each.
    Stream(crate::bench_stream::StreamArgs),
    /// Pub/sub and RPC with tracing off, on at 1% and at 100% sampling
    /// (in-process nodes on 127.0.0.1, spans exported to a local OTLP sink):
    /// throughput and latency side by side. Needs the `otlp` feature.
    Tracing(crate::bench_tracing::TracingArgs),
}

/// The tracing flags a benchmark runs with: none, except `bench tracing`,
/// which exports to a sink of its own.
pub fn trace_args(cmd: &BenchCommand) -> anyhow::Result<crate::otlp::TraceArgs> {
    match cmd {
        BenchCommand::Tracing(_) => crate::bench_tracing::trace_args(),
        _ => Ok(crate::otlp::TraceArgs::default()),
    }
}

#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// Messages for the latency run (1..=1000000); the throughput run sends 10x.
    #[arg(long, default_value_t = 100_000)]
    count: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DhtArgs {
    /// Nodes in the mesh (2..=200).
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Keys to put and look up (1..=10000).
    #[arg(long, default_value_t = 200)]
    keys: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct PoolArgs {
    /// Exchanges per mode (1..=100000).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Pool(args) => tokio::time::timeout(MAX_RUNTIME, pool(args))
            .await
            .context("benchmark exceeded its time limit")?,
        BenchCommand::Dht(args) => tokio::time::timeout(MAX_RUNTIME, dht(args))
            .await
            .context("benchmark exceeded its time limit")?,
        BenchCommand::Local(args) => tokio::time::timeout(MAX_RUNTIME, local(args))
            .await
            .context("benchmark exceeded its time limit")?,
        BenchCommand::Pubsub(args) => {
            // Returning drops the benchmark, and with it the handles that
            // kill its child processes: also on Ctrl-C and SIGTERM.
            let bench = tokio::time::timeout(MAX_RUNTIME, crate::bench_pubsub::run(args));
            tokio::select! {
                r = bench => r.context("benchmark exceeded its time limit")?,
                signal = interrupted() => {
                    anyhow::bail!("interrupted by {signal}; subscriber processes stopped")
                }
            }
        }
        BenchCommand::PubsubNode(args) => crate::bench_pubsub::node(args).await,
        BenchCommand::Tracing(args) => {
            tokio::time::timeout(MAX_RUNTIME, crate::bench_tracing::run(args))
                .await
                .context("benchmark exceeded its time limit")?
        }
        BenchCommand::Rpc(args) => tokio::time::timeout(MAX_RUNTIME, crate::bench_rpc::run(args))
            .await
            .context("benchmark exceeded its time limit")?,
        BenchCommand::Mqtt(args) => {
            // Returning drops both brokers' handles, which kill them.
            let bench = tokio::time::timeout(MAX_RUNTIME, crate::bench_mqtt::run(args));
            tokio::select! {
                r = bench => r.context("benchmark exceeded its time limit")?,
                signal = interrupted() => anyhow::bail!("interrupted by {signal}; brokers stopped"),
            }
        }
        BenchCommand::Connections(args) => {
            // Returning drops the node process handle, which kills it.
            let bench = tokio::time::timeout(MAX_RUNTIME, crate::bench_connections::run(args));
            tokio::select! {
                r = bench => r.context("benchmark exceeded its time limit")?,
                signal = interrupted() => anyhow::bail!("interrupted by {signal}; node process stopped"),
            }
        }
        BenchCommand::Relay(args) => {
            tokio::time::timeout(MAX_RUNTIME, crate::bench_relay::run(args))
                .await
                .context("benchmark exceeded its time limit")?
        }
        #[cfg(feature = "wasm")]
        BenchCommand::Wasm(args) => tokio::time::timeout(MAX_RUNTIME, crate::bench_wasm::run(args))
            .await
            .context("benchmark exceeded its time limit")?,
        #[cfg(feature = "wasm")]
        BenchCommand::Upgrade(args) => {
            tokio::time::timeout(MAX_RUNTIME, crate::bench_upgrade::run(args))
                .await
                .context("benchmark exceeded its time limit")?
        }
        BenchCommand::Crdt(args) => {
            // Returning drops the child handles, which kills them.
            let bench = tokio::time::timeout(MAX_RUNTIME, crate::bench_crdt::run(args));
            tokio::select! {
                r = bench => r.context("benchmark exceeded its time limit")?,
                signal = interrupted() => anyhow::bail!("interrupted by {signal}; node processes stopped"),
            }
        }
        BenchCommand::CrdtNode(args) => crate::bench_crdt::node(args).await,
        BenchCommand::Proofs(args) => {
            tokio::time::timeout(MAX_RUNTIME, crate::bench_proofs::run(args))
                .await
                .context("benchmark exceeded its time limit")?
        }
        BenchCommand::E2e(args) => tokio::time::timeout(MAX_RUNTIME, crate::bench_e2e::run(args))
            .await
            .context("benchmark exceeded its time limit")?,
        BenchCommand::Authz(args) => {
            tokio::time::timeout(MAX_RUNTIME, crate::bench_authz::run(args))
                .await
                .context("benchmark exceeded its time limit")?
        }
        BenchCommand::Stream(args) => {
            // Returning drops the nats-server child, which kills it.
            let bench = tokio::time::timeout(MAX_RUNTIME, crate::bench_stream::run(args));
            tokio::select! {
                r = bench => r.context("benchmark exceeded its time limit")?,
                signal = interrupted() => anyhow::bail!("interrupted by {signal}; nats-server stopped"),
            }
        }
        BenchCommand::Kv(args) => tokio::time::timeout(MAX_RUNTIME, crate::bench_kv::run(args))
            .await
            .context("benchmark exceeded its time limit")?,
    }
}

/// Resolves on SIGINT or SIGTERM, with the signal's name (never, if the
/// handlers cannot be installed).
pub(crate) async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

/// Percentile summary of a set of durations, in microseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Summary {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    total_ms: f64,
}

fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        us(samples[i])
    };
    Summary {
        p50_us: at(0.50),
        p99_us: at(0.99),
        max_us: samples.last().map(|d| us(*d)).unwrap_or(0.0),
        total_ms: samples.iter().sum::<Duration>().as_secs_f64() * 1e3,
    }
}

async fn local_node() -> anyhow::Result<Node> {
    Ok(Node::builder()
        .realm("bench")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .start()
        .await?)
}

async fn dht(args: DhtArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (2..=200).contains(&args.nodes),
        "--nodes must be between 2 and 200"
    );
    anyhow::ensure!(
        (1..=10_000).contains(&args.keys),
        "--keys must be between 1 and 10000"
    );
    let first = local_node().await?;
    let boot = first.local_addr().to_string();
    let mut nodes = vec![first];
    eprintln!("bench dht: starting {} nodes...", args.nodes);
    for _ in 1..args.nodes {
        let n = Node::builder()
            .realm("bench")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .bootstrap([boot.as_str()])
            .start()
            .await?;
        n.dht().wait_bootstrapped().await?;
        nodes.push(n);
    }
    let ttl = Duration::from_secs(3600);
    // Seeded, so runs pick the same nodes.
    let mut pick = macula::rng::Rng::new(0x9e37_79b9_7f4a_7c15);
    let keys: Vec<_> = (0..args.keys)
        .map(|i| macula::dht_key(format!("bench-key-{i}").as_bytes()))
        .collect();

    eprintln!("bench dht: {} puts...", keys.len());
    let mut puts = Vec::with_capacity(keys.len());
    let mut replicas = 0usize;
    for k in &keys {
        let node = &nodes[pick.below(nodes.len() as u64) as usize];
        let t = Instant::now();
        replicas += node
            .dht()
            .put(*k, b"benchmark value".to_vec(), ttl)
            .await?
            .len();
        puts.push(t.elapsed());
    }

    eprintln!(
        "bench dht: {} lookups from other nodes, then again (cached)...",
        keys.len()
    );
    let (mut fresh, mut cached) = (Vec::new(), Vec::new());
    let mut found = 0usize;
    for k in &keys {
        let node = &nodes[pick.below(nodes.len() as u64) as usize];
        let t = Instant::now();
        let got = node.dht().get_fresh(*k).await?;
        fresh.push(t.elapsed());
        found += usize::from(!got.is_empty());
        let t = Instant::now();
        let again = node.dht().get(*k).await?;
        cached.push(t.elapsed());
        let same = |a: &[macula::DhtRecord], b: &[macula::DhtRecord]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| (x.publisher, x.seq, &x.value) == (y.publisher, y.seq, &y.value))
        };
        anyhow::ensure!(
            got.is_empty() || same(&again, &got),
            "cached answer differs"
        );
    }
    let (puts, fresh, cached) = (
        summarize(&mut puts),
        summarize(&mut fresh),
        summarize(&mut cached),
    );
    let success = found as f64 / keys.len() as f64 * 100.0;
    let mean_replicas = replicas as f64 / keys.len() as f64;
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "bench": "dht",
            "nodes": args.nodes,
            "keys": args.keys,
            "build": build_kind(),
            "put": puts,
            "lookup": fresh,
            "cached_lookup": cached,
            "success_percent": success,
            "mean_replicas": mean_replicas,
        });
        writeln!(out, "{v}")?;
    } else {
        let build = debug_note();
        writeln!(
            out,
            "dht benchmark: {} nodes on 127.0.0.1, {} keys{build}",
            args.nodes, args.keys
        )?;
        writeln!(out, "  put (lookup + STORE to k closest)  p50 {:>9.1} us   p99 {:>9.1} us   mean replicas {mean_replicas:.1}", puts.p50_us, puts.p99_us)?;
        writeln!(out, "  lookup (iterative FIND_VALUE)      p50 {:>9.1} us   p99 {:>9.1} us   found {success:.2}%", fresh.p50_us, fresh.p99_us)?;
        writeln!(
            out,
            "  cached lookup                      p50 {:>9.1} us   p99 {:>9.1} us",
            cached.p50_us, cached.p99_us
        )?;
    }
    // All at once: stopping the bootstrap node first would only make the
    // others log reconnect attempts.
    futures::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
    Ok(())
}

async fn pool(args: PoolArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_COUNT).contains(&args.count),
        "--count must be between 1 and {MAX_COUNT}"
    );
    let n = args.count;
    let server = local_node().await?;
    let client = local_node().await?;
    let addr = server.local_addr();
    let server_id: NodeId = server.id();
    let timeout = Duration::from_secs(5);

    // Warm up: first connection, caches, allocator.
    let warm = client.connect_to(addr, Some(server_id)).await?;
    for _ in 0..50 {
        warm.ping(timeout).await?;
    }

    eprintln!("bench pool: {n} exchanges over the pooled connection...");
    let mut pooled = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let peer = client.connect_to(addr, Some(server_id)).await?;
        peer.ping(timeout).await?;
        pooled.push(t.elapsed());
    }

    eprintln!("bench pool: {n} exchanges with a new connection each...");
    let mut fresh = Vec::with_capacity(n);
    let mut handshakes = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let peer = client.dial_unpooled(addr, Some(server_id)).await?;
        handshakes.push(t.elapsed());
        peer.ping(timeout).await?;
        fresh.push(t.elapsed());
        peer.close(DisconnectReason::Shutdown, "bench");
        if (i + 1) % 250 == 0 {
            eprintln!("  {}/{n}", i + 1);
        }
    }
    let pooled = summarize(&mut pooled);
    let fresh = summarize(&mut fresh);
    let handshake = summarize(&mut handshakes);
    let speedup = fresh.total_ms / pooled.total_ms.max(f64::MIN_POSITIVE);
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "bench": "pool",
            "count": n,
            "build": build_kind(),
            "pooled": pooled,
            "new_connection": fresh,
            "handshake": handshake,
            "speedup": speedup,
        });
        writeln!(out, "{v}")?;
    } else {
        let build = debug_note();
        writeln!(
            out,
            "pool benchmark: {n} request/response exchanges (PING/PONG) on 127.0.0.1{build}"
        )?;
        writeln!(
            out,
            "  pooled connection      total {:>9.1} ms   p50 {:>8.1} us   p99 {:>8.1} us",
            pooled.total_ms, pooled.p50_us, pooled.p99_us
        )?;
        writeln!(
            out,
            "  new connection each    total {:>9.1} ms   p50 {:>8.1} us   p99 {:>8.1} us",
            fresh.total_ms, fresh.p50_us, fresh.p99_us
        )?;
        writeln!(
            out,
            "  handshake (TLS+HELLO)  total {:>9.1} ms   p50 {:>8.1} us   p99 {:>8.1} us",
            handshake.total_ms, handshake.p50_us, handshake.p99_us
        )?;
        writeln!(out, "  connection reuse is {speedup:.1}x faster")?;
    }
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

async fn local(args: LocalArgs) -> anyhow::Result<()> {
    use futures::StreamExt;
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.count),
        "--count must be between 1 and 1000000"
    );
    anyhow::ensure!(args.size <= 64 * 1024, "--size must be at most 65536");
    let node = local_node().await?;
    let payload = bytes::Bytes::from(vec![7u8; args.size]);

    // Latency: one message in flight at a time, publish to receive.
    let mut sub = node.subscribe("bench.latency").await?;
    let mut lat = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let t = Instant::now();
        node.publish("bench.latency", payload.clone()).await?;
        sub.next().await.context("subscription closed")?;
        lat.push(t.elapsed());
    }
    drop(sub);
    let lat = summarize(&mut lat);

    // Latency to a subscriber in another task (woken across threads): the
    // payload carries the send time; the subscriber reports each latency
    // back, and the publisher waits for that before sending the next.
    let base = Instant::now();
    let mut sub = node.subscribe("bench.wake").await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Duration>(1);
    let waiter = tokio::spawn(async move {
        while let Some(macula::SubscriptionItem::Event(e)) = sub.next().await {
            let sent = e
                .payload
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes);
            let d = base.elapsed().saturating_sub(Duration::from_nanos(sent));
            if tx.send(d).await.is_err() {
                break;
            }
        }
    });
    let mut woken = Vec::with_capacity(args.count);
    let mut buf = vec![7u8; args.size.max(8)];
    for _ in 0..args.count {
        let now = base.elapsed().as_nanos() as u64;
        buf[..8].copy_from_slice(&now.to_le_bytes());
        node.publish("bench.wake", bytes::Bytes::copy_from_slice(&buf))
            .await?;
        woken.push(rx.recv().await.context("subscriber task ended")?);
    }
    drop(rx);
    waiter.abort();
    let woken = summarize(&mut woken);

    // Throughput: a consumer task drains while the publisher runs flat out;
    // a slow consumer lags (counted) rather than slowing the publisher.
    let n = args.count * 10;
    let sub = node.subscribe("bench.tput.*").await?;
    let consumer = count_until(sub, "bench.tput.end");
    let t = Instant::now();
    for _ in 0..n {
        node.publish("bench.tput.data", payload.clone()).await?;
    }
    let publish_secs = t.elapsed().as_secs_f64();
    node.publish("bench.tput.end", bytes::Bytes::new()).await?;
    let (got, lagged) = consumer.await?;
    let secs = t.elapsed().as_secs_f64();
    let published_per_sec = n as f64 / publish_secs;
    let delivered_per_sec = got as f64 / secs;
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "bench": "local",
            "count": args.count,
            "payload_bytes": args.size,
            "build": build_kind(),
            "latency_same_task": lat,
            "latency_other_task": woken,
            "published_per_sec": published_per_sec,
            "delivered_per_sec": delivered_per_sec,
            "delivered": got,
            "lagged": lagged,
        });
        writeln!(out, "{v}")?;
    } else {
        let build = debug_note();
        writeln!(
            out,
            "local pub/sub benchmark: one node, {}-byte payloads{build}",
            args.size
        )?;
        writeln!(out, "  latency, subscriber in the same task   p50 {:>7.2} us   p99 {:>7.2} us   ({} messages, one in flight)", lat.p50_us, lat.p99_us, args.count)?;
        writeln!(
            out,
            "  latency, subscriber in another task    p50 {:>7.2} us   p99 {:>7.2} us",
            woken.p50_us, woken.p99_us
        )?;
        writeln!(out, "  throughput                       {published_per_sec:>10.0} published/s   {delivered_per_sec:>10.0} delivered/s   {lagged} dropped to a slow consumer of {n}")?;
    }
    node.shutdown().await;
    Ok(())
}

/// Drains `sub` in its own task until an event on `end` arrives; returns
/// (events before it, events reported lost to lag).
fn count_until(
    mut sub: macula::Subscription,
    end: &'static str,
) -> tokio::task::JoinHandle<(u64, u64)> {
    use futures::StreamExt;
    tokio::spawn(async move {
        let (mut got, mut lagged) = (0u64, 0u64);
        while let Some(item) = sub.next().await {
            match item {
                macula::SubscriptionItem::Event(e) if e.topic == end => break,
                macula::SubscriptionItem::Event(_) => got += 1,
                macula::SubscriptionItem::Lagged(k) => lagged += k,
            }
        }
        (got, lagged)
    })
}
