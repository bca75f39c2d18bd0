//! `macula bench mqtt`: a Macula node's MQTT listener against Debian's
//! `mosquitto` broker, side by side in one run, on 127.0.0.1.
//!
//! For each broker (a `macula start --mqtt` child, then a `mosquitto`
//! child with the same inflight window and queue): QoS 0 and QoS 1
//! throughput from one publisher to one subscriber (64 B, the publisher
//! flat out with at most `--window` QoS 1 messages unacknowledged), the
//! round-trip latency of one message in flight (publish, then receive on
//! a subscriber of the same process), and the broker's resident memory
//! before and after `--idle` idle MQTT connections (CONNECT answered,
//! keep-alive 60 s). The clients are `rmqtt-codec` (the bridge's own
//! codec, as a client) over tokio TCP streams. Every run is bounded in
//! count and time; both children are killed when the benchmark returns.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::bench_stats::{build_kind, debug_note, latency, Latency};

/// Longest a node or broker may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// A throughput run gives up after this long without progress.
const STALL: Duration = Duration::from_secs(10);
/// The inflight window and client queue both brokers get (the bridge's
/// defaults; mosquitto's `max_inflight_messages` and `max_queued_messages`).
const INFLIGHT: u16 = 32;
const QUEUE: usize = 1000;

#[derive(clap::Args, Debug)]
pub struct MqttArgs {
    /// Messages per throughput run (1000..=1000000).
    #[arg(long, default_value_t = 200_000)]
    count: usize,
    /// Round trips for the latency run (10..=100000).
    #[arg(long, default_value_t = 5_000)]
    rtt_count: usize,
    /// Idle connections for the memory run (0..=10000).
    #[arg(long, default_value_t = 1_000)]
    idle: usize,
    /// Payload size, bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// QoS 1 messages the publisher keeps unacknowledged (1..=65535).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// The mosquitto binary.
    #[arg(long, default_value = "mosquitto")]
    mosquitto: String,
    /// Only the Macula node (no mosquitto).
    #[arg(long)]
    macula_only: bool,
    /// Another `macula` binary to measure in the same run, after this one
    /// (an older build: before and after a change, beside mosquitto).
    #[arg(long, value_name = "BIN")]
    baseline: Option<std::path::PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    broker: String,
    qos0_msgs_per_s: f64,
    qos0_received: u64,
    qos1_msgs_per_s: f64,
    qos1_received: u64,
    sent: u64,
    rtt: Latency,
    idle_connections: usize,
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    rss_per_connection_bytes: f64,
}

/// A broker child process, killed on drop.
struct Broker {
    name: String,
    addr: SocketAddr,
    child: tokio::process::Child,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    fn rss(&self) -> u64 {
        let Some(pid) = self.child.id() else {
            return 0;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {addr} after {START_TIMEOUT:?}")
}

async fn start_macula(
    dir: tempfile::TempDir,
    exe: std::path::PathBuf,
    name: String,
) -> anyhow::Result<Broker> {
    let port = free_port()?;
    let mqtt = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(exe)
        .args(["start", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--realm", "bench-mqtt", "--mqtt", &mqtt])
        .args([
            "--mqtt-max-clients",
            "20000",
            "--mqtt-max-sessions",
            "20000",
        ])
        .args(["--mqtt-max-inflight", &INFLIGHT.to_string()])
        .args(["--mqtt-queue-len", &QUEUE.to_string()])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the node process")?;
    let stdout = child.stdout.take().context("node stdout")?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
    });
    let addr: SocketAddr = mqtt.parse()?;
    wait_listening(addr).await?;
    Ok(Broker {
        name,
        addr,
        child,
        _dir: Some(dir),
    })
}

async fn start_mosquitto(bin: &str) -> anyhow::Result<Broker> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             log_dest none\nmax_inflight_messages {INFLIGHT}\nmax_queued_messages {QUEUE}\n"
        ),
    )?;
    let child = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {bin} (Debian package mosquitto)"))?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_listening(addr).await?;
    Ok(Broker {
        name: "mosquitto".to_string(),
        addr,
        child,
        _dir: Some(dir),
    })
}

type Rd = FramedRead<OwnedReadHalf, v3::Codec>;
type Wr = FramedWrite<OwnedWriteHalf, v3::Codec>;

async fn connect(addr: SocketAddr, id: &str) -> anyhow::Result<(Rd, Wr)> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    let mut rd = FramedRead::new(r, v3::Codec::new(0));
    let mut wr = FramedWrite::new(w, v3::Codec::new(0));
    wr.send(v3::Packet::Connect(Box::new(v3::Connect {
        client_id: id.into(),
        clean_session: true,
        keep_alive: 60,
        ..Default::default()
    })))
    .await?;
    match tokio::time::timeout(Duration::from_secs(10), rd.next()).await {
        Ok(Some(Ok((v3::Packet::ConnectAck(a), _))))
            if a.return_code == v3::ConnectAckReason::ConnectionAccepted => {}
        other => bail!("{id}: no CONNACK: {other:?}"),
    }
    Ok((rd, wr))
}

async fn subscribe(rd: &mut Rd, wr: &mut Wr, filter: &str, qos: QoS) -> anyhow::Result<()> {
    wr.send(v3::Packet::Subscribe {
        packet_id: std::num::NonZeroU16::MIN,
        topic_filters: vec![(filter.into(), qos)],
    })
    .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rd.next()).await {
            Ok(Some(Ok((v3::Packet::SubscribeAck { .. }, _)))) => return Ok(()),
            Ok(Some(Ok(_))) => {}
            other => bail!("no SUBACK: {other:?}"),
        }
    }
}

fn publish(topic: &str, payload: Bytes, qos: QoS, id: u16) -> v3::Packet {
    v3::Packet::Publish(Box::new(rmqtt_codec::types::Publish {
        dup: false,
        retain: false,
        qos,
        topic: topic.into(),
        packet_id: std::num::NonZeroU16::new(id),
        payload,
        properties: None,
    }))
}

/// One publisher to one subscriber, `count` messages at `qos`: messages
/// per second received, and how many arrived.
async fn throughput(
    b: &Broker,
    qos: QoS,
    count: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<(f64, u64)> {
    let topic = format!("bench/tp/{}", qos.value());
    let (mut srd, mut swr) = connect(b.addr, &format!("tp-sub-{}", qos.value())).await?;
    subscribe(&mut srd, &mut swr, &topic, qos).await?;
    let (mut prd, mut pwr) = connect(b.addr, &format!("tp-pub-{}", qos.value())).await?;
    // Warm up: the subscription is in place once one message arrives.
    let warm = Bytes::from_static(b"warm");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if Instant::now() > deadline {
            bail!("{}: the subscriber never received a message", b.name);
        }
        pwr.send(publish(&topic, warm.clone(), QoS::AtMostOnce, 0))
            .await?;
        if let Ok(Some(Ok((v3::Packet::Publish(_), _)))) =
            tokio::time::timeout(Duration::from_millis(200), srd.next()).await
        {
            break;
        }
    }
    // Drain late warm-ups.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(200), srd.next()).await {
    }

    let received = Arc::new(AtomicU64::new(0));
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let sub = {
        let (received, last) = (received.clone(), last.clone());
        tokio::spawn(async move {
            let mut unflushed = 0;
            loop {
                let next = tokio::time::timeout(STALL, srd.next()).await;
                let Ok(Some(Ok((p, _)))) = next else {
                    break;
                };
                if let v3::Packet::Publish(p) = p {
                    let n = received.fetch_add(1, Relaxed) + 1;
                    if let Some(id) = p.packet_id {
                        let _ = swr.feed(v3::Packet::PublishAck { packet_id: id }).await;
                        unflushed += 1;
                        if unflushed >= 8 || srd.read_buffer().is_empty() {
                            let _ = swr.flush().await;
                            unflushed = 0;
                        }
                    }
                    if n as usize >= count {
                        if let Ok(mut l) = last.lock() {
                            *l = Instant::now();
                        }
                        break;
                    }
                }
            }
            let _ = swr.flush().await;
        })
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let acks = {
        let permits = permits.clone();
        tokio::spawn(async move {
            while let Ok(Some(Ok((p, _)))) = tokio::time::timeout(STALL, prd.next()).await {
                if let v3::Packet::PublishAck { .. } = p {
                    permits.add_permits(1);
                }
            }
        })
    };
    let payload = Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let mut id: u16 = 0;
    for i in 0..count {
        if qos == QoS::AtLeastOnce {
            let permit = match permits.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    pwr.flush().await?;
                    match tokio::time::timeout(STALL, permits.acquire()).await {
                        Ok(Ok(p)) => p,
                        _ => bail!("{}: QoS 1 publisher stalled at {i}", b.name),
                    }
                }
            };
            permit.forget();
            id = id.checked_add(1).unwrap_or(1);
        }
        pwr.feed(publish(&topic, payload.clone(), qos, id)).await?;
        if i % 64 == 63 {
            pwr.flush().await?;
        }
    }
    pwr.flush().await?;
    let _ = sub.await;
    acks.abort();
    let got = received.load(Relaxed);
    let end = if got as usize >= count {
        last.lock().map(|l| *l).unwrap_or_else(|_| Instant::now())
    } else {
        // Stopped by the stall timeout: the last STALL was idle.
        Instant::now() - STALL
    };
    let secs = end.saturating_duration_since(start).as_secs_f64().max(1e-9);
    Ok((got as f64 / secs, got))
}

/// Publish-to-receive of one message in flight, `count` times (QoS 0).
async fn rtt(b: &Broker, count: usize, size: usize) -> anyhow::Result<Latency> {
    let topic = "bench/rtt";
    let (mut srd, mut swr) = connect(b.addr, "rtt-sub").await?;
    subscribe(&mut srd, &mut swr, topic, QoS::AtMostOnce).await?;
    let (_prd, mut pwr) = connect(b.addr, "rtt-pub").await?;
    let payload = Bytes::from(vec![b'r'; size]);
    let mut ns = Vec::with_capacity(count);
    let mut misses = 0;
    while ns.len() < count {
        let t = Instant::now();
        pwr.send(publish(topic, payload.clone(), QoS::AtMostOnce, 0))
            .await?;
        match tokio::time::timeout(Duration::from_secs(1), srd.next()).await {
            Ok(Some(Ok((v3::Packet::Publish(_), _)))) => {
                ns.push(t.elapsed().as_nanos() as u64);
            }
            _ => {
                misses += 1;
                if misses > 20 {
                    bail!("{}: round trips keep getting lost", b.name);
                }
            }
        }
    }
    Ok(latency(&mut ns))
}

/// Resident memory before and after `n` idle connections.
async fn idle(b: &Broker, n: usize) -> anyhow::Result<(u64, u64)> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = b.rss();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(connect(b.addr, &format!("idle-{i}")).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = b.rss();
    drop(conns);
    Ok((before, after))
}

async fn measure(b: &Broker, args: &MqttArgs) -> anyhow::Result<Figures> {
    let (q0, r0) = throughput(b, QoS::AtMostOnce, args.count, args.size, args.window).await?;
    let (q1, r1) = throughput(b, QoS::AtLeastOnce, args.count, args.size, args.window).await?;
    let rtt = rtt(b, args.rtt_count, args.size).await?;
    let (before, after) = idle(b, args.idle).await?;
    Ok(Figures {
        broker: b.name.clone(),
        qos0_msgs_per_s: q0,
        qos0_received: r0,
        qos1_msgs_per_s: q1,
        qos1_received: r1,
        sent: args.count as u64,
        rtt,
        idle_connections: args.idle,
        rss_before_bytes: before,
        rss_after_bytes: after,
        rss_per_connection_bytes: if args.idle > 0 {
            after.saturating_sub(before) as f64 / args.idle as f64
        } else {
            0.0
        },
    })
}

pub async fn run(args: MqttArgs) -> anyhow::Result<()> {
    if !(1000..=1_000_000).contains(&args.count)
        || !(10..=100_000).contains(&args.rtt_count)
        || args.idle > 10_000
        || !(1..=65_535).contains(&args.window)
    {
        bail!(
            "--count 1000..=1000000, --rtt-count 10..=100000, --idle 0..=10000, --window 1..=65535"
        );
    }
    crate::raise_fd_limit();
    let mut all = Vec::new();
    let exe = std::env::current_exe().context("cannot find the macula binary")?;
    let node = start_macula(tempfile::tempdir()?, exe, "macula".into()).await?;
    all.push(measure(&node, &args).await?);
    drop(node);
    if let Some(bin) = &args.baseline {
        let node = start_macula(tempfile::tempdir()?, bin.clone(), "baseline".into()).await?;
        all.push(measure(&node, &args).await?);
        drop(node);
    }
    if !args.macula_only {
        let m = start_mosquitto(&args.mosquitto).await?;
        all.push(measure(&m, &args).await?);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "benchmark": "mqtt", "build": build_kind(), "size": args.size, "window": args.window, "results": all })
        );
        return Ok(());
    }
    println!(
        "MQTT, 1 publisher -> 1 subscriber, {} B, {} messages per run, QoS 1 window {}{}",
        args.size,
        args.count,
        args.window,
        debug_note()
    );
    println!(
        "{:<10} {:>14} {:>14} {:>9} {:>9} {:>9} {:>14}",
        "broker", "QoS 0 msg/s", "QoS 1 msg/s", "rtt p50", "rtt p99", "rtt max", "RSS/idle conn"
    );
    for f in &all {
        println!(
            "{:<10} {:>14.0} {:>14.0} {:>7.1}us {:>7.1}us {:>7.1}us {:>11.1} KiB",
            f.broker,
            f.qos0_msgs_per_s,
            f.qos1_msgs_per_s,
            f.rtt.p50_us,
            f.rtt.p99_us,
            f.rtt.max_us,
            f.rss_per_connection_bytes / 1024.0
        );
    }
    for f in &all {
        println!(
            "{}: QoS 0 received {}/{}, QoS 1 received {}/{}; RSS {:.1} -> {:.1} MiB with {} idle connections",
            f.broker,
            f.qos0_received,
            f.sent,
            f.qos1_received,
            f.sent,
            f.rss_before_bytes as f64 / 1048576.0,
            f.rss_after_bytes as f64 / 1048576.0,
            f.idle_connections
        );
    }
    Ok(())
}
