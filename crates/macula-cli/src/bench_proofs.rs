//! `macula bench proofs`: what proved publishers cost (issue 19, item 1).
//! One invocation runs both modes side by side, rounds alternating so the
//! machine's drift hits both alike, in process on 127.0.0.1:
//!
//! * **on** (the default): the client seals what it sends (one Ed25519
//!   signature over the BLAKE3 digests of up to 256 messages: several
//!   seals in a frame of small messages, a seal spanning the frames it
//!   writes at once for large ones), its gateway forwards the seals with
//!   every message unverified (the client's connection proves it), the
//!   subscriber node verifies them (a frame's several seals together);
//! * **off**: `PubSubLimits::proofs = false` on all three: unsealed
//!   batches, nothing signed or verified (as before issue 19).
//!
//! The path: client C -> gateway node A -> subscriber node B. Figures per
//! payload size (64 B and 16 KiB): publish-to-receive throughput flat out
//! (or, with `--window`, paced: at most that many messages published and
//! not yet received, so no queue on the way fills and nothing is dropped
//! as lagged), and one-in-flight latency (publish, wait for B to have it).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use macula::config::PubSubLimits;
use macula::{Client, Node, Proof, Subscription, SubscriptionItem};

use crate::bench_stats::{build_kind, debug_note, median, TempDirs};

#[derive(clap::Args, Debug)]
pub struct ProofsArgs {
    /// 64-byte messages published per round and mode (1..=2000000).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// 16 KiB messages published per round and mode (1..=200000).
    #[arg(long, default_value_t = 10_000)]
    large_messages: usize,
    /// Messages timed one at a time per round, mode and size (1..=100000).
    #[arg(long, default_value_t = 1_000)]
    latency_messages: usize,
    /// Rounds of each mode, alternating (1..=10).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Messages the publisher keeps in flight at most (published, not yet
    /// received by the subscription) in the throughput runs; 0: flat out
    /// (0..=100000).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Gateway A, subscriber B (joined through A) and client C attached to A,
/// all with proofs `on` or off.
struct Mesh {
    a: Node,
    b: Node,
    c: Client,
}

async fn mesh(on: bool, dirs: &mut TempDirs) -> anyhow::Result<Mesh> {
    let limits = PubSubLimits {
        proofs: on,
        ..PubSubLimits::default()
    };
    let node = |boot: Option<&Node>, dir: PathBuf| {
        let mut b = Node::builder()
            .realm("bench.proofs")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .data_dir(dir)
            .pubsub_limits(limits);
        if let Some(a) = boot {
            b = b.bootstrap([format!("{}@{}", a.id(), a.local_addr()).as_str()]);
        }
        b.start()
    };
    let a = node(None, dirs.make()?).await?;
    let b = node(Some(&a), dirs.make()?).await?;
    let gateway = format!("{}@{}", a.id(), a.local_addr()).parse()?;
    let c = Client::builder([gateway])
        .realm("bench.proofs")
        .data_dir(dirs.make()?)
        .pubsub_limits(limits)
        .connect()
        .await?;
    Ok(Mesh { a, b, c })
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
    /// Events the subscription could not keep (told as lagged).
    small_lagged: usize,
    large_lagged: usize,
}

/// The next item of `sub`: an event (whose proof must be `want`), or
/// events the subscription could not keep (it fell behind: they reached
/// the node all the same). Returns (events, lagged).
async fn next(sub: &mut Subscription, want: Proof) -> anyhow::Result<(usize, usize)> {
    match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
        Ok(Some(SubscriptionItem::Event(e))) => {
            anyhow::ensure!(
                e.proof == want,
                "event proved {:?}, expected {want:?}",
                e.proof
            );
            Ok((1, 0))
        }
        Ok(Some(SubscriptionItem::Lagged(k))) => Ok((0, k as usize)),
        Ok(None) | Err(_) => anyhow::bail!("an event did not arrive"),
    }
}

/// Throughput (messages per second) of `n` messages of `size` bytes, C to
/// B (at most `window` in flight, 0: no bound), the latencies (µs, sorted)
/// of `lat` messages one at a time, and how many events the subscription
/// could not keep.
async fn measure(
    m: &Mesh,
    sub: &mut Subscription,
    want: Proof,
    size: usize,
    (n, window): (usize, usize),
    lat: usize,
) -> anyhow::Result<(f64, Vec<f64>, usize)> {
    let payload = Bytes::from(vec![7u8; size]);
    // Messages received (or told lagged) so far, and a wake-up for the
    // publisher waiting for the window to open.
    let seen = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(tokio::sync::Notify::new());
    let t = Instant::now();
    let publisher = {
        let (c, payload) = (m.c.clone(), payload.clone());
        let (seen, opened) = (seen.clone(), opened.clone());
        tokio::spawn(async move {
            for i in 0..n {
                // A permit stored by `notify_one` is never lost: the
                // check after a wake-up sees the count it followed.
                while window > 0 && i >= seen.load(Ordering::Acquire) + window {
                    opened.notified().await;
                }
                c.publish("bench.t", payload.clone()).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let (mut got, mut lagged) = (0, 0);
    while got + lagged < n {
        let (g, l) = next(sub, want).await?;
        got += g;
        lagged += l;
        seen.store(got + lagged, Ordering::Release);
        opened.notify_one();
    }
    publisher.await??;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let mut us = Vec::with_capacity(lat);
    for _ in 0..lat {
        let t = Instant::now();
        m.c.publish("bench.t", payload.clone()).await?;
        while next(sub, want).await?.0 == 0 {}
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    if lagged > 0 {
        eprintln!("bench proofs: the subscription fell behind by {lagged} of {n} ({size} B)");
    }
    Ok((rate, us, lagged))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

async fn round(m: &Mesh, on: bool, args: &ProofsArgs) -> anyhow::Result<Round> {
    // B's view: C's events forwarded by A, proved by C's seal (on) or
    // taken on A's word (off).
    let want = if on { Proof::Signed } else { Proof::Asserted };
    let mut sub = m.b.subscribe("bench.**").await?;
    m.a.wait_for_subscribers("bench.t", Duration::from_secs(10))
        .await?;
    let (small, small_us, small_lagged) = measure(
        m,
        &mut sub,
        want,
        64,
        (args.messages, args.window),
        args.latency_messages,
    )
    .await?;
    let (large, large_us, large_lagged) = measure(
        m,
        &mut sub,
        want,
        16 * 1024,
        (args.large_messages, args.window),
        args.latency_messages,
    )
    .await?;
    Ok(Round {
        small_msgs_per_s: small,
        large_msgs_per_s: large,
        large_mb_per_s: large * 16.0 * 1024.0 / 1e6,
        small_p50_us: pct(&small_us, 0.5),
        small_p99_us: pct(&small_us, 0.99),
        large_p50_us: pct(&large_us, 0.5),
        large_p99_us: pct(&large_us, 0.99),
        small_lagged,
        large_lagged,
    })
}

type Figure = fn(&Round) -> f64;

pub async fn run(args: ProofsArgs) -> anyhow::Result<()> {
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
    anyhow::ensure!((1..=10).contains(&args.rounds), "--rounds must be 1..=10");
    anyhow::ensure!(args.window <= 100_000, "--window must be 0..=100000");
    let mut dirs = TempDirs::new("proofs");
    let off = mesh(false, &mut dirs).await?;
    let on = mesh(true, &mut dirs).await?;
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
                "bench proofs: round {}/{} proofs {}...",
                r + 1,
                args.rounds,
                if mode { "on" } else { "off" }
            );
            match mode {
                true => r_on.push(round(&on, true, &args).await?),
                false => r_off.push(round(&off, false, &args).await?),
            }
        }
    }
    for m in [off, on] {
        m.c.shutdown().await;
        m.b.shutdown().await;
        m.a.shutdown().await;
    }
    let pick = |v: &[Round], f: Figure| median(v.iter().map(f));
    let fields: [(&str, Figure); 7] = [
        ("publish_64B_msgs_per_s", |r| r.small_msgs_per_s),
        ("publish_16KiB_msgs_per_s", |r| r.large_msgs_per_s),
        ("publish_16KiB_MB_per_s", |r| r.large_mb_per_s),
        ("latency_64B_p50_us", |r| r.small_p50_us),
        ("latency_64B_p99_us", |r| r.small_p99_us),
        ("latency_16KiB_p50_us", |r| r.large_p50_us),
        ("latency_16KiB_p99_us", |r| r.large_p99_us),
    ];
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::json!({
            "benchmark": "proofs",
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
            "proofs benchmark: client -> gateway -> node, seals off vs on, median of {} rounds{}",
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
        // Throughput counts only when nothing fell behind.
        let lagged = |v: &[Round], f: fn(&Round) -> usize| v.iter().map(f).sum::<usize>();
        writeln!(
            out,
            "  lagged events, all rounds  64 B off {} on {}; 16 KiB off {} on {} (window {})",
            lagged(&r_off, |r| r.small_lagged),
            lagged(&r_on, |r| r.small_lagged),
            lagged(&r_off, |r| r.large_lagged),
            lagged(&r_on, |r| r.large_lagged),
            args.window
        )?;
    }
    Ok(())
}
