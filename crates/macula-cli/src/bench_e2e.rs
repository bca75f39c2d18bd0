//! `macula bench e2e`: what end-to-end payload encryption costs (issue
//! 19, item 2). One invocation runs both modes side by side on the same
//! mesh, rounds alternating so the machine's drift hits both alike, in
//! process on 127.0.0.1, in a realm with an authority whose key set
//! encrypts `sec.**` and not `clear.**`:
//!
//! * **on**: topic `sec.t`: the client seals each payload
//!   (XChaCha20-Poly1305, a random nonce, 57 bytes more), the gateway and
//!   the node carry the envelope, the subscriber opens it as it takes it;
//! * **off**: topic `clear.t`: the same path, the payload as it is.
//!
//! The path: client C -> gateway node A -> subscriber node B (proved
//! publishers on, as by default). Figures per payload size (64 B and
//! 16 KiB): publish-to-receive throughput flat out, and one-in-flight
//! latency (publish, wait for B to have it).
//!
//! RPC the same way: C calls `sec.echo` (a procedure pattern of the key
//! set: C seals the arguments, B opens them before its handler and seals
//! the reply, C opens it; A carries envelopes) or `clear.echo`, served by
//! B's own application, echoing the payload. Figures per size: calls per
//! second with `--rpc-concurrency` in flight, and one-at-a-time latency.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use macula::auth::keys::{rotate, KeySet, PatternKind, Rotation};
use macula::auth::Key;
use macula::{Client, Node, Subscription, SubscriptionItem};

use crate::bench_stats::{build_kind, debug_note, median, node_grant, TempDirs};

#[derive(clap::Args, Debug)]
pub struct E2eArgs {
    /// 64-byte messages published per round and mode (1..=2000000).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// 16 KiB messages published per round and mode (1..=200000).
    #[arg(long, default_value_t = 10_000)]
    large_messages: usize,
    /// Messages timed one at a time per round, mode and size (1..=100000).
    #[arg(long, default_value_t = 1_000)]
    latency_messages: usize,
    /// Calls per round, mode and size (1..=1000000; 0: no RPC rows).
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Calls timed one at a time per round, mode and size (1..=100000).
    #[arg(long, default_value_t = 1_000)]
    latency_calls: usize,
    /// Calls in flight for the throughput figure (1..=1024).
    #[arg(long, default_value_t = 32)]
    rpc_concurrency: usize,
    /// Rounds of each mode, alternating (1..=10).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Gateway A, subscriber and provider B (joined through A) and client C
/// attached to A, in a realm whose authority `auth` granted all three
/// everything.
struct Mesh {
    a: Node,
    b: Node,
    c: Client,
    _echo: [macula::Registration; 2],
}

/// A grant to the node whose data directory is `dir`: publish and
/// subscribe anything.
fn grant(
    auth: &ed25519_dalek::SigningKey,
    serial: u8,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<u8>> {
    let id = macula::Identity::load_or_create(dir)?.node_id();
    node_grant(
        auth,
        serial,
        id,
        "allow publish **\nallow subscribe **\nallow call **\nallow advertise **",
    )
}

async fn mesh(dirs: &mut TempDirs) -> anyhow::Result<Mesh> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).context("no random source")?;
    let auth = ed25519_dalek::SigningKey::from_bytes(&seed);
    let node = |boot: Option<&Node>, dir: PathBuf, grant: Vec<u8>| {
        let mut b = Node::builder()
            .realm("bench.e2e")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .data_dir(dir)
            .realm_authority(Key::of(&auth), Some(grant));
        if let Some(a) = boot {
            b = b.bootstrap([format!("{}@{}", a.id(), a.local_addr()).as_str()]);
        }
        b.start()
    };
    let (da, db, dc) = (dirs.make()?, dirs.make()?, dirs.make()?);
    let a = node(None, da.clone(), grant(&auth, 1, &da)?).await?;
    let b = node(Some(&a), db.clone(), grant(&auth, 2, &db)?).await?;
    let gateway = format!("{}@{}", a.id(), a.local_addr()).parse()?;
    let c = Client::builder([gateway])
        .realm("bench.e2e")
        .data_dir(dc.clone())
        .grant(grant(&auth, 3, &dc)?)
        .connect()
        .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let rotation = |kind| Rotation {
        pattern: "sec.**".into(),
        kind,
        members: vec![c.e2e().member_key(), b.e2e().member_key()],
        now_ms: now,
        activate_in_ms: 0,
        grace_ms: 600_000,
        rotate_every_ms: None,
    };
    // Topics and procedures under `sec.`: version 2.
    let (body, _) = rotate(
        None,
        Key::of(&auth),
        &rotation(PatternKind::Topic),
        &mut macula::e2e::SysRng,
    )?;
    let (body, _) = rotate(
        Some(body),
        Key::of(&auth),
        &rotation(PatternKind::Procedure),
        &mut macula::e2e::SysRng,
    )?;
    let set = KeySet::sign(&body, &auth)?.to_bytes()?;
    a.install_keys(&set)?;
    // A spreads it to B and to its client C.
    let t = Instant::now();
    while b.e2e().version() != 2 || c.e2e().version() != 2 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "the key set did not spread"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let echo = |r: macula::Request| async move { Ok::<_, macula::HandlerError>(r.payload) };
    let _echo = [
        b.advertise("sec.echo", echo).await?,
        b.advertise("clear.echo", echo).await?,
    ];
    Ok(Mesh { a, b, c, _echo })
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Round {
    small_msgs_per_s: f64,
    large_msgs_per_s: f64,
    large_mb_per_s: f64,
    small_p50_us: f64,
    small_p99_us: f64,
    large_p50_us: f64,
    large_p99_us: f64,
    rpc_small_calls_per_s: f64,
    rpc_large_calls_per_s: f64,
    rpc_small_p50_us: f64,
    rpc_small_p99_us: f64,
    rpc_large_p50_us: f64,
    rpc_large_p99_us: f64,
}

/// The next item of `sub`: an event (whose payload must be `want`), or
/// events the subscription could not keep (it fell behind: they reached
/// the node all the same). Returns (events, lagged).
async fn next(sub: &mut Subscription, want: &Bytes) -> anyhow::Result<(usize, usize)> {
    match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
        Ok(Some(SubscriptionItem::Event(e))) => {
            anyhow::ensure!(
                e.payload == want,
                "an event's payload differs from what was sent"
            );
            Ok((1, 0))
        }
        Ok(Some(SubscriptionItem::Lagged(k))) => Ok((0, k as usize)),
        Ok(None) | Err(_) => anyhow::bail!("an event did not arrive"),
    }
}

/// Throughput (messages per second) of `n` messages of `size` bytes, C to
/// B, and the latencies (µs, sorted) of `lat` messages one at a time.
async fn measure(
    m: &Mesh,
    sub: &mut Subscription,
    topic: &'static str,
    size: usize,
    n: usize,
    lat: usize,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let payload = Bytes::from(vec![7u8; size]);
    let t = Instant::now();
    let publisher = {
        let (c, payload) = (m.c.clone(), payload.clone());
        tokio::spawn(async move {
            for _ in 0..n {
                c.publish(topic, payload.clone()).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let (mut got, mut lagged) = (0, 0);
    while got + lagged < n {
        let (g, l) = next(sub, &payload).await?;
        got += g;
        lagged += l;
    }
    publisher.await??;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let mut us = Vec::with_capacity(lat);
    for _ in 0..lat {
        let t = Instant::now();
        m.c.publish(topic, payload.clone()).await?;
        while next(sub, &payload).await?.0 == 0 {}
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    if lagged > 0 {
        eprintln!("bench e2e: the subscription fell behind by {lagged} of {n} ({size} B)");
    }
    Ok((rate, us))
}

/// Calls per second of `n` calls of `procedure` with `size`-byte
/// arguments (`conc` in flight), C to B and back, and the latencies (µs,
/// sorted) of `lat` calls one at a time. Every reply must echo.
async fn measure_rpc(
    m: &Mesh,
    procedure: &'static str,
    size: usize,
    args: &E2eArgs,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let payload = Bytes::from(vec![7u8; size]);
    let call = move |c: Client, payload: Bytes| async move {
        let r = c
            .call(procedure, payload.clone())
            .timeout(Duration::from_secs(30))
            .await?;
        anyhow::ensure!(r.payload == payload, "a reply differs from the arguments");
        Ok::<_, anyhow::Error>(())
    };
    // Warm: the provider found, the connection up.
    let t = Instant::now();
    while let Err(e) = call(m.c.clone(), payload.clone()).await {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "{procedure} never answered: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = args.calls;
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(args.rpc_concurrency);
    for w in 0..args.rpc_concurrency {
        let (c, payload) = (m.c.clone(), payload.clone());
        let share = n / args.rpc_concurrency + usize::from(w < n % args.rpc_concurrency);
        tasks.push(tokio::spawn(async move {
            for _ in 0..share {
                call(c.clone(), payload.clone()).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let mut us = Vec::with_capacity(args.latency_calls);
    for _ in 0..args.latency_calls {
        let t = Instant::now();
        call(m.c.clone(), payload.clone()).await?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    Ok((rate, us))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

async fn round(m: &Mesh, on: bool, args: &E2eArgs) -> anyhow::Result<Round> {
    let (pattern, topic) = if on {
        ("sec.**", "sec.t")
    } else {
        ("clear.**", "clear.t")
    };
    let mut sub = m.b.subscribe(pattern).await?;
    m.a.wait_for_subscribers(topic, Duration::from_secs(10))
        .await?;
    let (small, small_us) =
        measure(m, &mut sub, topic, 64, args.messages, args.latency_messages).await?;
    let (large, large_us) = measure(
        m,
        &mut sub,
        topic,
        16 * 1024,
        args.large_messages,
        args.latency_messages,
    )
    .await?;
    drop(sub);
    let procedure = if on { "sec.echo" } else { "clear.echo" };
    let (rpc_small, rpc_small_us) = measure_rpc(m, procedure, 64, args).await?;
    let (rpc_large, rpc_large_us) = measure_rpc(m, procedure, 16 * 1024, args).await?;
    Ok(Round {
        rpc_small_calls_per_s: rpc_small,
        rpc_large_calls_per_s: rpc_large,
        rpc_small_p50_us: pct(&rpc_small_us, 0.5),
        rpc_small_p99_us: pct(&rpc_small_us, 0.99),
        rpc_large_p50_us: pct(&rpc_large_us, 0.5),
        rpc_large_p99_us: pct(&rpc_large_us, 0.99),
        small_msgs_per_s: small,
        large_msgs_per_s: large,
        large_mb_per_s: large * 16.0 * 1024.0 / 1e6,
        small_p50_us: pct(&small_us, 0.5),
        small_p99_us: pct(&small_us, 0.99),
        large_p50_us: pct(&large_us, 0.5),
        large_p99_us: pct(&large_us, 0.99),
    })
}

type Figure = fn(&Round) -> f64;

pub async fn run(args: E2eArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=2_000_000).contains(&args.messages),
        "--messages must be 1..=2000000"
    );
    anyhow::ensure!(
        (1..=200_000).contains(&args.large_messages),
        "--large-messages must be 1..=200000"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&args.latency_messages),
        "--latency-messages must be 1..=100000"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.calls),
        "--calls must be 1..=1000000"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&args.latency_calls),
        "--latency-calls must be 1..=100000"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.rpc_concurrency),
        "--rpc-concurrency must be 1..=1024"
    );
    anyhow::ensure!((1..=10).contains(&args.rounds), "--rounds must be 1..=10");
    let mut dirs = TempDirs::new("e2e");
    let m = mesh(&mut dirs).await?;
    let (mut r_off, mut r_on) = (Vec::new(), Vec::new());
    for r in 0..args.rounds {
        // Each round starts with the other mode, so neither always runs
        // on a warmer machine.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for mode in order {
            eprintln!(
                "bench e2e: round {}/{} encryption {}...",
                r + 1,
                args.rounds,
                if mode { "on" } else { "off" }
            );
            match mode {
                true => r_on.push(round(&m, true, &args).await?),
                false => r_off.push(round(&m, false, &args).await?),
            }
        }
    }
    let sealed = m.c.e2e().counters().e2e.at(0).get();
    let calls_sealed = m.c.e2e().counters().e2e_calls.at(0).get();
    let calls_opened = m.b.e2e().counters().e2e_calls.at(1).get();
    m.c.shutdown().await;
    m.b.shutdown().await;
    m.a.shutdown().await;
    let pick = |v: &[Round], f: Figure| median(v.iter().map(f));
    let fields: [(&str, Figure); 13] = [
        ("publish_64B_msgs_per_s", |r| r.small_msgs_per_s),
        ("publish_16KiB_msgs_per_s", |r| r.large_msgs_per_s),
        ("publish_16KiB_MB_per_s", |r| r.large_mb_per_s),
        ("latency_64B_p50_us", |r| r.small_p50_us),
        ("latency_64B_p99_us", |r| r.small_p99_us),
        ("latency_16KiB_p50_us", |r| r.large_p50_us),
        ("latency_16KiB_p99_us", |r| r.large_p99_us),
        ("rpc_64B_calls_per_s", |r| r.rpc_small_calls_per_s),
        ("rpc_16KiB_calls_per_s", |r| r.rpc_large_calls_per_s),
        ("rpc_latency_64B_p50_us", |r| r.rpc_small_p50_us),
        ("rpc_latency_64B_p99_us", |r| r.rpc_small_p99_us),
        ("rpc_latency_16KiB_p50_us", |r| r.rpc_large_p50_us),
        ("rpc_latency_16KiB_p99_us", |r| r.rpc_large_p99_us),
    ];
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::json!({
            "benchmark": "e2e",
            "sealed": sealed,
            "calls_sealed": calls_sealed,
            "calls_opened": calls_opened,
            "rpc_concurrency": args.rpc_concurrency,
            "build": build_kind(),
            "rounds": {"off": r_off, "on": r_on},
        });
        for (name, f) in fields {
            let (o, n) = (pick(&r_off, f), pick(&r_on, f));
            v[name] = serde_json::json!({"off": o, "on": n, "ratio": n / o});
        }
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "e2e benchmark: client -> gateway -> node, encryption off vs on ({sealed} payloads and {calls_sealed} calls sealed; RPC {} in flight), median of {} rounds{}",
            args.rpc_concurrency,
            args.rounds,
            debug_note()
        )?;
        for (name, f) in fields {
            let (o, n) = (pick(&r_off, f), pick(&r_on, f));
            writeln!(
                out,
                "  {name:<26} off {o:>12.1}  on {n:>12.1}  on/off {:.3}",
                n / o
            )?;
        }
    }
    Ok(())
}
