//! `macula bench authz`: what a realm with an authority costs (issue 18).
//! Two in-process nodes on 127.0.0.1, run side by side in one invocation,
//! rounds alternating so the machine's drift hits both alike:
//!
//! * **open**: no authority, nothing checked (as before issue 18);
//! * **realm**: an authority, every node holding a grant of 1,000 rules
//!   (999 that do not match the benchmark's names, then the ones that do),
//!   so every publish, delivery and call is checked at entry and again
//!   where it is delivered or served, through the decision caches.
//!
//! Figures: the handshake (a new connection, TLS and HELLO with a grant's
//! verification), publish-to-receive throughput of 64 B messages, and
//! concurrent call throughput; the realm/open ratio of each.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use macula::auth::Key;
use macula::{DisconnectReason, Identity, Node, SubscriptionItem};

use crate::bench_stats::{build_kind, debug_note, median, node_grant, TempDirs};

#[derive(clap::Args, Debug)]
pub struct AuthzArgs {
    /// New connections timed per round (1..=10000).
    #[arg(long, default_value_t = 300)]
    handshakes: usize,
    /// Messages published per round (1..=2000000).
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Calls made per round (1..=1000000), --concurrency at a time.
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Calls in flight at once (1..=1024).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Rounds of each variant, alternating (1..=10).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Rules in each node's grant (1..=1024).
    #[arg(long, default_value_t = 1000)]
    rules: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The grant rules: `n - 5` that never match `bench.*`, then the five that do.
fn rules(n: usize) -> String {
    let mut text = String::new();
    let actions = ["publish", "subscribe", "call", "advertise"];
    for i in 0..n.saturating_sub(5) {
        let a = actions[i % actions.len()];
        text.push_str(&format!("allow {a} other{i}.*.x\n"));
    }
    for a in ["publish", "subscribe", "call", "advertise", "relay"] {
        text.push_str(&format!("allow {a} bench.**\n"));
    }
    text
}

/// Two nodes, B joined through A; with `realm`, both hold `rules`.
async fn pair(
    realm: Option<(&SigningKey, &str)>,
    dirs: &mut TempDirs,
) -> anyhow::Result<(Node, Node)> {
    let mut nodes = Vec::new();
    for i in 0..2u8 {
        let dir = dirs.make()?;
        let id = Identity::load_or_create(&dir)?.node_id();
        let mut b = Node::builder()
            .realm("bench.authz")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .data_dir(&dir);
        if let Some((authority, rules)) = realm {
            b = b.realm_authority(
                Key::of(authority),
                Some(node_grant(authority, i + 1, id, rules)?),
            );
        }
        if let Some(first) = nodes.first() {
            let a: &Node = first;
            b = b.bootstrap([format!("{}@{}", a.id(), a.local_addr()).as_str()]);
        }
        nodes.push(b.start().await?);
    }
    let b = nodes.pop().context("node b")?;
    let a = nodes.pop().context("node a")?;
    Ok((a, b))
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Round {
    handshake_p50_us: f64,
    handshake_mean_us: f64,
    publish_msgs_per_s: f64,
    /// Of those, how many the subscription dropped (it fell behind).
    publish_lagged: usize,
    calls_per_s: f64,
}

async fn round(a: &Node, b: &Node, args: &AuthzArgs) -> anyhow::Result<Round> {
    let timeout = Duration::from_secs(10);
    // Handshakes: a new connection each, closed at once.
    let mut hs = Vec::with_capacity(args.handshakes);
    for _ in 0..args.handshakes {
        let t = Instant::now();
        let p = a.dial_unpooled(b.local_addr(), Some(b.id())).await?;
        hs.push(t.elapsed());
        p.close(DisconnectReason::Shutdown, "bench");
    }
    hs.sort_unstable();
    let mean = hs.iter().sum::<Duration>().as_secs_f64() / hs.len().max(1) as f64;
    // Publish throughput, A to a subscription on B.
    let mut sub = b.subscribe("bench.**").await?;
    a.wait_for_subscribers("bench.t", timeout).await?;
    let payload = Bytes::from(vec![7u8; 64]);
    let n = args.messages;
    let t = Instant::now();
    let reader = tokio::spawn(async move {
        // Messages the subscription could not keep (it fell behind: a
        // Lagged item says how many) reached the node all the same.
        let (mut got, mut lagged) = (0usize, 0usize);
        while got + lagged < n {
            match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
                Ok(Some(SubscriptionItem::Event(_))) => got += 1,
                Ok(Some(SubscriptionItem::Lagged(k))) => lagged += k as usize,
                Ok(None) | Err(_) => anyhow::bail!("only {got} of {n} messages arrived"),
            }
        }
        Ok(lagged)
    });
    for _ in 0..n {
        a.publish("bench.t", payload.clone()).await?;
    }
    let lagged = reader.await??;
    let publish = n as f64 / t.elapsed().as_secs_f64();
    // Call throughput, A calling B.
    let reg = b
        .advertise("bench.echo", |r: macula::Request| async move {
            Ok::<_, macula::HandlerError>(r.payload)
        })
        .await?;
    a.call("bench.echo", Bytes::from_static(b"warm")).await?;
    let left = Arc::new(AtomicUsize::new(args.calls));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (a, left) = (a.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                a.call("bench.echo", Bytes::from_static(b"x")).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let calls = args.calls as f64 / t.elapsed().as_secs_f64();
    drop(reg);
    Ok(Round {
        handshake_p50_us: hs[hs.len() / 2].as_secs_f64() * 1e6,
        handshake_mean_us: mean * 1e6,
        publish_msgs_per_s: publish,
        publish_lagged: lagged,
        calls_per_s: calls,
    })
}

/// One figure of a round, by name.
type Figure = fn(&Round) -> f64;

pub async fn run(args: AuthzArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=10_000).contains(&args.handshakes),
        "--handshakes must be 1..=10000"
    );
    anyhow::ensure!(
        (1..=2_000_000).contains(&args.messages),
        "--messages must be 1..=2000000"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.calls),
        "--calls must be 1..=1000000"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.concurrency),
        "--concurrency must be 1..=1024"
    );
    anyhow::ensure!((1..=10).contains(&args.rounds), "--rounds must be 1..=10");
    anyhow::ensure!((5..=1024).contains(&args.rules), "--rules must be 5..=1024");
    let authority = SigningKey::from_bytes(&rand_seed());
    let rules = rules(args.rules);
    let mut dirs = TempDirs::new("authz");
    let (oa, ob) = pair(None, &mut dirs).await?;
    let (ra, rb) = pair(Some((&authority, &rules)), &mut dirs).await?;
    let mut open = Vec::new();
    let mut realm = Vec::new();
    for r in 0..args.rounds {
        eprintln!("bench authz: round {}/{} open...", r + 1, args.rounds);
        open.push(round(&oa, &ob, &args).await?);
        eprintln!(
            "bench authz: round {}/{} realm ({} rules)...",
            r + 1,
            args.rounds,
            args.rules
        );
        realm.push(round(&ra, &rb, &args).await?);
    }
    for n in [oa, ob, ra, rb] {
        n.shutdown().await;
    }
    let pick = |v: &[Round], f: Figure| median(v.iter().map(f));
    let fields: [(&str, Figure); 4] = [
        ("handshake_p50_us", |r| r.handshake_p50_us),
        ("handshake_mean_us", |r| r.handshake_mean_us),
        ("publish_msgs_per_s", |r| r.publish_msgs_per_s),
        ("calls_per_s", |r| r.calls_per_s),
    ];
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::json!({
            "benchmark": "authz",
            "build": build_kind(),
            "rules": args.rules,
            "rounds": {"open": open, "realm": realm},
        });
        for (name, f) in fields {
            let (o, r) = (pick(&open, f), pick(&realm, f));
            v[name] = serde_json::json!({"open": o, "realm": r, "ratio": r / o});
        }
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "authz benchmark: open realm vs a realm with an authority and {}-rule grants, median of {} alternating rounds{}",
            args.rules,
            args.rounds,
            debug_note()
        )?;
        for (name, f) in fields {
            let (o, r) = (pick(&open, f), pick(&realm, f));
            writeln!(
                out,
                "  {name:<20} open {o:>12.1}  realm {r:>12.1}  realm/open {:.3}",
                r / o
            )?;
        }
    }
    Ok(())
}

/// A fresh authority key for this run (a benchmark's key: any bytes do).
fn rand_seed() -> [u8; 32] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut seed = [0u8; 32];
    macula::rng::Rng::new(nanos).fill_bytes(&mut seed);
    seed
}
