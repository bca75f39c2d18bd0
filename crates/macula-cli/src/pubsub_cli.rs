//! `macula pub` and `macula sub`: publish and subscribe from the command line.
//!
//! Each attaches as a lightweight client to one of the `--connect` nodes
//! (failing over to the next), or joins as a short-lived full node with
//! `--full-node` (see `member.rs`).
//! `sub` prints one line per event (text or `--json`) and reports missed
//! events (`Lagged`: a full queue, or a gateway failover) on stderr; `pub` sends `--count` messages at up to `--rate` per second. This
//! module only parses, calls and prints.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use macula::SubscriptionItem;

use crate::dht_cli::MeshArgs;
use crate::member::{Member, ModeArgs};

/// Upper bound on `--count`, so a typo cannot run forever.
const MAX_COUNT: u64 = 10_000_000;

#[derive(clap::Args, Debug)]
pub struct PubArgs {
    /// Topic: dot-separated segments, no wildcards.
    topic: String,
    /// Payload (UTF-8 text).
    data: String,
    /// How many messages to send.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Messages per second at most (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Store each message in durable stream STREAM (which must capture the
    /// topic), on whichever node hosts it, and wait for its acknowledgement
    /// (on disk) before the next.
    #[arg(long, value_name = "STREAM")]
    persist: Option<String>,
    /// Keep a persistent identity in DIR (a grant names it); default: a
    /// fresh identity.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub(crate) mesh: MeshArgs,
    #[command(flatten)]
    mode: ModeArgs,
}

#[derive(clap::Args, Debug)]
pub struct SubArgs {
    /// Pattern: `*` matches one segment, `**` any number.
    pattern: String,
    /// Exit after this many events (default: run until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// Read durable stream STREAM (on whichever node hosts it) instead of
    /// live events: its stored messages the pattern matches from --from
    /// on, then new ones.
    #[arg(long, value_name = "STREAM")]
    stream: Option<String>,
    /// With --stream, where to start: all, new (default), last,
    /// last-per-subject, seq:N, time:UNIX_MS or time:-DURATION (e.g. time:-10m).
    #[arg(
        long,
        value_name = "POSITION",
        default_value = "new",
        requires = "stream"
    )]
    from: String,
    /// Keep a persistent identity in DIR (a grant names it); default: a
    /// fresh identity.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub(crate) mesh: MeshArgs,
    #[command(flatten)]
    mode: ModeArgs,
}

pub async fn publish(a: PubArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_COUNT).contains(&a.count),
        "--count must be between 1 and {MAX_COUNT}"
    );
    anyhow::ensure!(
        a.rate >= 0.0 && a.rate.is_finite(),
        "--rate must be a positive number"
    );
    // Refuse a bad topic before spending time joining the mesh.
    macula::names::validate_topic(&a.topic)
        .map_err(|e| anyhow::anyhow!("invalid topic {:?}: {e}", a.topic))?;
    let node = Member::start(&a.mesh, &a.mode, a.data_dir.clone(), None).await?;
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / a.rate));
    let mut tick = interval.map(tokio::time::interval);
    let mut result = Ok(());
    let stream = a
        .persist
        .as_deref()
        .map(|s| node.stream(s, macula::stream::DEFAULT_REMOTE_TIMEOUT));
    let mut last = None;
    for _ in 0..a.count {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let payload: bytes::Bytes = a.data.clone().into_bytes().into();
        let sent = match &stream {
            Some(s) => match s
                .publish(&a.topic, payload, macula::stream::PersistOptions::new())
                .await
            {
                Ok(ack) => {
                    last = Some(ack);
                    Ok(())
                }
                Err(e) => Err(e.into()),
            },
            None => node.publish(&a.topic, payload).await,
        };
        if let Err(e) = sent {
            result = Err(e).context("publish failed");
            break;
        }
    }
    node.shutdown().await;
    result?;
    let mut out = std::io::stdout().lock();
    if a.mesh.json {
        let mut v = serde_json::json!({"topic": a.topic, "published": a.count});
        if let Some(ack) = &last {
            v["stream"] = ack.stream.clone().into();
            v["last_seq"] = ack.seq.into();
        }
        writeln!(out, "{v}")?;
    } else if let Some(ack) = &last {
        writeln!(
            out,
            "stored {} message(s) on {} in stream {} (last seq {})",
            a.count, a.topic, ack.stream, ack.seq
        )?;
    } else {
        writeln!(out, "published {} message(s) to {}", a.count, a.topic)?;
    }
    Ok(())
}

/// `macula sub`: one line per event.
pub async fn subscribe(a: SubArgs) -> anyhow::Result<()> {
    watch(a, false).await
}

/// `macula trace`: like `sub`, each line led by the UTC receive time and
/// the full publisher node ID, and the trace ID of a message that carries
/// a `traceparent` (for following traffic while debugging).
pub async fn trace(a: SubArgs) -> anyhow::Result<()> {
    watch(a, true).await
}

/// `macula sub --stream`: a durable stream's messages from `--from` on,
/// one line each (`seq topic payload`, or JSON).
async fn watch_stream(a: &SubArgs, name: &str) -> anyhow::Result<()> {
    let from = crate::stream_cli::parse_position(&a.from)
        .map_err(|e| anyhow::anyhow!("invalid --from {:?}: {e}", a.from))?;
    let node = Member::start(&a.mesh, &a.mode, a.data_dir.clone(), None).await?;
    let stream = node.stream(name, macula::stream::DEFAULT_REMOTE_TIMEOUT);
    let filter: Vec<&str> = if a.pattern == "**" {
        Vec::new()
    } else {
        vec![a.pattern.as_str()]
    };
    let mut sub = match stream.subscribe(&filter, from).await {
        Ok(s) => s,
        Err(e) => {
            node.shutdown().await;
            return Err(e).with_context(|| format!("cannot read stream {name}"));
        }
    };
    eprintln!("reading stream {name} ({}) from {}", a.pattern, a.from);
    let mut seen = 0u64;
    let interrupted = crate::bench::interrupted();
    tokio::pin!(interrupted);
    let mut result = Ok(());
    while a.count.is_none_or(|n| seen < n) {
        let m = tokio::select! {
            m = sub.recv() => m,
            _ = &mut interrupted => break,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                result = Err(e).context("stream read failed");
                break;
            }
        };
        seen += 1;
        let mut out = std::io::stdout().lock();
        if a.mesh.json {
            let v = serde_json::json!({
                "stream": m.stream,
                "seq": m.seq,
                "ts": m.ts,
                "topic": m.subject,
                "payload": String::from_utf8_lossy(&m.payload),
                "headers": m.headers,
            });
            writeln!(out, "{v}")?;
        } else {
            writeln!(
                out,
                "{}\t{}\t{}",
                m.seq,
                m.subject,
                String::from_utf8_lossy(&m.payload)
            )?;
        }
        out.flush()?;
    }
    drop(sub);
    node.shutdown().await;
    result
}

async fn watch(a: SubArgs, trace: bool) -> anyhow::Result<()> {
    macula::names::validate_pattern(&a.pattern)
        .map_err(|e| anyhow::anyhow!("invalid pattern {:?}: {e}", a.pattern))?;
    if let Some(name) = a.stream.clone() {
        anyhow::ensure!(!trace, "macula trace reads live events only");
        return watch_stream(&a, &name).await;
    }
    let node = Member::start(&a.mesh, &a.mode, a.data_dir.clone(), None).await?;
    let mut sub = match node.subscribe(&a.pattern).await {
        Ok(s) => s,
        Err(e) => {
            node.shutdown().await;
            return Err(e);
        }
    };
    eprintln!("subscribed to {}", a.pattern);
    let mut seen = 0u64;
    let interrupted = crate::bench::interrupted();
    tokio::pin!(interrupted);
    loop {
        if a.count.is_some_and(|n| seen >= n) {
            break;
        }
        let item = tokio::select! {
            item = sub.next() => item,
            _ = &mut interrupted => break,
        };
        let Some(item) = item else { break };
        match item {
            SubscriptionItem::Event(e) => {
                seen += 1;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let mut out = std::io::stdout().lock();
                // The trace this message belongs to (its `traceparent`).
                let trace_id = if trace {
                    macula::trace::trace_id(&e.headers)
                } else {
                    None
                };
                if trace && a.mesh.json {
                    let v = serde_json::json!({
                        "ts": crate::text::rfc3339(now),
                        "topic": &*e.topic,
                        "publisher": e.publisher.to_string(),
                        "seq": e.seq,
                        "trace_id": trace_id,
                        "payload": String::from_utf8_lossy(&e.payload),
                        "headers": e.headers,
                    });
                    writeln!(out, "{v}")?;
                } else if trace {
                    writeln!(
                        out,
                        "{}  {}  seq={}  {}{}  {}",
                        crate::text::rfc3339(now),
                        e.publisher,
                        e.seq,
                        trace_id.map_or(String::new(), |t| format!("trace={t}  ")),
                        &*e.topic,
                        String::from_utf8_lossy(&e.payload)
                    )?;
                } else if a.mesh.json {
                    let v = serde_json::json!({
                        "topic": e.topic,
                        "publisher": e.publisher.to_string(),
                        "seq": e.seq,
                        "payload": String::from_utf8_lossy(&e.payload),
                        "headers": e.headers,
                    });
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(
                        out,
                        "{}\t{}\tseq={}\t{}",
                        e.topic,
                        e.publisher.short(),
                        e.seq,
                        String::from_utf8_lossy(&e.payload)
                    )?;
                }
                out.flush()?;
            }
            SubscriptionItem::Lagged(n) => eprintln!(
                "warning: missed {n} events (dropped while too slow, or lost in a gateway failover)"
            ),
        }
    }
    drop(sub);
    node.shutdown().await;
    Ok(())
}
