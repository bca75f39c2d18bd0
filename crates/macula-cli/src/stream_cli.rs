//! `macula stream add|ls|info|edit|purge|rm|pub|get|sub` and `macula
//! consumer add|ls|info|rm|next`: the durable streams a running node hosts,
//! through its admin HTTP API (`/admin/streams`, see
//! `macula_runtime::admin::stream`).
//!
//! Exit codes: 0 success; 1 failure (the node is unreachable, has no such
//! stream or consumer, refused the request), with the node's message; 2
//! usage.

use std::io::Write;
use std::time::Duration;

use anyhow::anyhow;
use clap::Subcommand;
use macula::admin::{
    AckRequest, MsgReport, NextRequest, PublishRequest, PurgeReport, PurgeRequest, StreamsReport,
};
use macula::stream::{
    AckPolicy, ConsumerConfig, ConsumerReport, DeliverPolicy, Discard, PubAck, ReplayPolicy,
    ReplicaStatus, Retention, StreamConfig, StreamInfo,
};

use crate::admin_cli::{write_table, ReadArgs, Target};
use crate::config::{parse_duration, parse_size};
use crate::raft_cli::{call, encode, print_json, send};
use crate::{usage, Failure};

/// Time allowed for one stream request (a pull waits at most 25 s).
const STREAM_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `macula stream ...`.
#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Create a stream: every event published on a matching topic is stored.
    Add(AddArgs),
    /// The node's streams.
    Ls(ReadArgs),
    /// One stream's configuration and state.
    Info(NameArgs),
    /// Change a stream's limits or subjects (only the options given change).
    Edit(EditArgs),
    /// Remove stored messages (all, or by subject, sequence, keeping the newest).
    Purge(PurgeArgs),
    /// Remove a stream, its consumers and its file.
    Rm(NameArgs),
    /// Publish and wait until the event is stored on disk (prints its sequence).
    Pub(PubArgs),
    /// Print one stored message.
    Get(GetArgs),
    /// Print a stream's messages from a position on, as they come (an ephemeral consumer).
    Sub(SubArgs),
}

/// `macula consumer ...`.
#[derive(Subcommand, Debug)]
pub enum ConsumerCommand {
    /// Create a consumer on a stream (durable when named).
    Add(ConsumerAddArgs),
    /// A stream's consumers.
    Ls(NameArgs),
    /// One consumer's position and pending acks.
    Info(ConsumerArgs),
    /// Remove a consumer.
    Rm(ConsumerArgs),
    /// Fetch messages, print them and acknowledge them (unless --no-ack).
    Next(NextArgs),
}

/// A stream name and where to find the node.
#[derive(clap::Args, Debug)]
pub struct NameArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// A stream's limits, as options (shared by `add` and `edit`).
#[derive(clap::Args, Debug, Default)]
pub struct LimitArgs {
    /// Topics captured (patterns, repeatable or comma-separated).
    #[arg(long, value_name = "PATTERN", value_delimiter = ',')]
    pub subjects: Vec<String>,
    /// Remove messages older than this (e.g. 24h).
    #[arg(long, value_name = "DURATION")]
    pub max_age: Option<String>,
    /// Keep at most this many bytes (e.g. 1GiB).
    #[arg(long, value_name = "SIZE")]
    pub max_bytes: Option<String>,
    /// Keep at most this many messages.
    #[arg(long, value_name = "N")]
    pub max_msgs: Option<u64>,
    /// Largest message accepted (default 1MiB).
    #[arg(long, value_name = "SIZE")]
    pub max_msg_size: Option<String>,
    /// When full: remove the oldest (old, default) or refuse the new (new).
    #[arg(long, value_name = "old|new")]
    pub discard: Option<String>,
    /// De-duplication window for message IDs (default 2m).
    #[arg(long, value_name = "DURATION")]
    pub dupe_window: Option<String>,
    /// When an acknowledged publish is on disk: always (default: synced
    /// before its acknowledgement) or a DURATION (acknowledged once written,
    /// which survives kill -9 of the node but not a power loss; synced at
    /// least this often, at most 2m; on a replicated stream, the Raft log
    /// of every member: acknowledged once a majority has written it).
    #[arg(long, value_name = "always|DURATION")]
    pub sync: Option<String>,
}

/// `macula stream add`.
#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The stream's name (letters, digits, - and _).
    #[arg(value_name = "STREAM")]
    pub stream: String,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Copies kept: 1 (this node) or 3 (a Raft group of three nodes).
    #[arg(long, default_value_t = 1)]
    pub replicas: u8,
    /// limits (default), interest (until every interested consumer acked) or workqueue (until one consumer acked).
    #[arg(long, value_name = "POLICY", default_value = "limits")]
    pub retention: String,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula stream edit`.
#[derive(clap::Args, Debug)]
pub struct EditArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Remove the age limit.
    #[arg(long)]
    pub no_max_age: bool,
    /// Remove the byte limit.
    #[arg(long)]
    pub no_max_bytes: bool,
    /// Remove the message count limit.
    #[arg(long)]
    pub no_max_msgs: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula stream purge`.
#[derive(clap::Args, Debug)]
pub struct PurgeArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// Only messages on topics this pattern matches.
    #[arg(long, value_name = "PATTERN")]
    pub subject: Option<String>,
    /// Only messages below this sequence.
    #[arg(long, value_name = "SEQ")]
    pub upto: Option<u64>,
    /// Keep the newest N.
    #[arg(long, value_name = "N")]
    pub keep: Option<u64>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula stream pub`.
#[derive(clap::Args, Debug)]
pub struct PubArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// The topic (one the stream captures).
    #[arg(value_name = "TOPIC")]
    pub topic: String,
    /// The payload (text).
    #[arg(value_name = "PAYLOAD")]
    pub payload: String,
    /// De-duplication ID.
    #[arg(long, value_name = "ID")]
    pub msg_id: Option<String>,
    /// This message's time to live.
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula stream get`.
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// The sequence.
    #[arg(value_name = "SEQ")]
    pub seq: u64,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula stream sub`.
#[derive(clap::Args, Debug)]
pub struct SubArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// Only topics this pattern matches.
    #[arg(value_name = "PATTERN")]
    pub filter: Option<String>,
    /// Where to start: all, new (default), last, last-per-subject, seq:N, or time:UNIX_MS / time:-DURATION (e.g. time:-10m).
    #[arg(long, value_name = "POSITION", default_value = "new")]
    pub from: String,
    /// Replay stored messages at the pace they were stored.
    #[arg(long)]
    pub original_pace: bool,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula consumer add`.
#[derive(clap::Args, Debug)]
pub struct ConsumerAddArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// A name makes it durable (its position survives restarts); without one it is ephemeral.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// Where it starts: all (default), new, last, last-per-subject, seq:N, time:UNIX_MS or time:-DURATION.
    #[arg(long, value_name = "POSITION", default_value = "all")]
    pub deliver: String,
    /// none, all or explicit (default).
    #[arg(long, value_name = "POLICY", default_value = "explicit")]
    pub ack: String,
    /// How long a delivery waits for its ack before it comes again (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub ack_wait: Option<String>,
    /// Deliveries of one message at most.
    #[arg(long, value_name = "N")]
    pub max_deliver: Option<u32>,
    /// Waits before each redelivery, comma-separated (e.g. 1s,5s,30s).
    #[arg(long, value_name = "DURATIONS", value_delimiter = ',')]
    pub backoff: Vec<String>,
    /// Deliveries waiting for acks at most (default 1000).
    #[arg(long, value_name = "N")]
    pub max_ack_pending: Option<u32>,
    /// Only topics these patterns match (repeatable or comma-separated).
    #[arg(long, value_name = "PATTERN", value_delimiter = ',')]
    pub filter: Vec<String>,
    /// Replay at the pace the messages were stored.
    #[arg(long)]
    pub original_pace: bool,
    /// A push consumer: the node publishes each delivery to this topic
    /// (headers macula-stream, macula-stream-seq, macula-stream-consumer,
    /// macula-stream-deliveries); subscribers ack as usual. Needs a NAME.
    #[arg(long, value_name = "TOPIC")]
    pub deliver_subject: Option<String>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// A stream and one of its consumers.
#[derive(clap::Args, Debug)]
pub struct ConsumerArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// The consumer.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula consumer next`.
#[derive(clap::Args, Debug)]
pub struct NextArgs {
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// The consumer.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Messages to fetch at most.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// How long to wait for the first one.
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub wait: String,
    /// Print without acknowledging (they come again after the ack wait).
    #[arg(long)]
    pub no_ack: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

fn dur(flag: &str, s: &str) -> Result<Duration, Failure> {
    parse_duration(s).map_err(|e| usage(anyhow!("invalid {flag} {s:?}: {e}")))
}

fn size(flag: &str, s: &str) -> Result<u64, Failure> {
    parse_size(s).map_err(|e| usage(anyhow!("invalid {flag} {s:?}: {e}")))
}

fn millis(d: Duration) -> macula::stream::Millis {
    macula::stream::Millis::from_duration(d)
}

fn apply_limits(cfg: &mut StreamConfig, l: &LimitArgs) -> Result<(), Failure> {
    if !l.subjects.is_empty() {
        cfg.subjects = l.subjects.clone();
    }
    if let Some(a) = &l.max_age {
        cfg.max_age = Some(millis(dur("--max-age", a)?));
    }
    if let Some(b) = &l.max_bytes {
        cfg.max_bytes = Some(size("--max-bytes", b)?);
    }
    if let Some(n) = l.max_msgs {
        cfg.max_msgs = Some(n);
    }
    if let Some(s) = &l.max_msg_size {
        let n = size("--max-msg-size", s)?;
        cfg.max_msg_size =
            u32::try_from(n).map_err(|_| usage(anyhow!("--max-msg-size {s:?} is too large")))?;
    }
    if let Some(d) = &l.discard {
        cfg.discard = match d.as_str() {
            "old" => Discard::Old,
            "new" => Discard::New,
            _ => return Err(usage(anyhow!("--discard must be old or new, not {d:?}"))),
        };
    }
    if let Some(w) = &l.dupe_window {
        cfg.duplicate_window = millis(dur("--dupe-window", w)?);
    }
    if let Some(w) = &l.sync {
        cfg.sync_interval = match w.as_str() {
            "always" => None,
            d => Some(millis(dur("--sync", d)?)),
        };
    }
    Ok(())
}

fn stream_path(name: &str) -> String {
    format!("/admin/streams/{}", encode(name.as_bytes()))
}

fn post_json<T: serde::Serialize>(
    target: &Target,
    method: &str,
    path: &str,
    body: &T,
) -> Result<String, Failure> {
    let json = serde_json::to_vec(body)?;
    call(target, method, path, Some(("application/json", &json)))
}

fn no_content(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(), Failure> {
    let reply = send(
        target,
        method,
        path,
        body.map(|b| ("application/json", b)),
        STREAM_REQUEST_TIMEOUT,
    )?;
    if reply.status != 204 && reply.status != 200 {
        return Err(crate::raft_cli::refused(target, method, path, &reply));
    }
    Ok(())
}

/// Runs `macula stream ...`.
pub fn stream(cmd: StreamCommand) -> Result<(), Failure> {
    match cmd {
        StreamCommand::Add(a) => add(&a),
        StreamCommand::Ls(r) => ls(&r),
        StreamCommand::Info(a) => info(&a),
        StreamCommand::Edit(a) => edit(&a),
        StreamCommand::Purge(a) => purge(&a),
        StreamCommand::Rm(a) => {
            let target = Target::of(&a.read)?;
            no_content(&target, "DELETE", &stream_path(&a.stream), None)?;
            println!("removed stream {}", a.stream);
            Ok(())
        }
        StreamCommand::Pub(a) => publish(&a),
        StreamCommand::Get(a) => get(&a),
        StreamCommand::Sub(a) => sub(&a),
    }
}

fn add(a: &AddArgs) -> Result<(), Failure> {
    if a.limits.subjects.is_empty() {
        return Err(usage(anyhow!(
            "--subjects is required (e.g. --subjects 'orders.**')"
        )));
    }
    let mut cfg = StreamConfig::new(a.stream.clone(), &[]);
    apply_limits(&mut cfg, &a.limits)?;
    cfg.replicas = a.replicas;
    cfg.retention = match a.retention.as_str() {
        "limits" => Retention::Limits,
        "interest" => Retention::Interest,
        "workqueue" => Retention::Workqueue,
        r => {
            return Err(usage(anyhow!(
                "--retention must be limits, interest or workqueue, not {r:?}"
            )))
        }
    };
    cfg.validate().map_err(usage)?;
    let target = Target::of(&a.read)?;
    let body = post_json(&target, "POST", "/admin/streams", &cfg)?;
    show_info(&target, "/admin/streams", &body, a.read.json)
}

fn show_info(target: &Target, path: &str, body: &str, json: bool) -> Result<(), Failure> {
    if json {
        return print_json(body);
    }
    let i: StreamInfo = target.decode(path, body)?;
    write_info(&mut std::io::stdout().lock(), &i)?;
    Ok(())
}

/// `macula stream info`'s text.
fn write_info(out: &mut impl Write, i: &StreamInfo) -> std::io::Result<()> {
    let c = &i.config;
    let opt = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
    writeln!(out, "stream     {}", c.name)?;
    writeln!(out, "subjects   {}", c.subjects.join(", "))?;
    writeln!(
        out,
        "retention  {:?}, discard {:?}, replicas {}",
        c.retention, c.discard, c.replicas
    )?;
    writeln!(
        out,
        "limits     max_msgs {}, max_bytes {}, max_age {}, max_msg_size {}, dupe_window {}ms",
        opt(c.max_msgs),
        opt(c.max_bytes),
        c.max_age
            .map_or("unlimited".into(), |a| format!("{}ms", a.0)),
        c.max_msg_size,
        c.duplicate_window.0
    )?;
    match c.sync_interval {
        None => writeln!(out, "sync       always (before each acknowledgement)")?,
        Some(d) => writeln!(
            out,
            "sync       every {}ms (acknowledged once written)",
            d.0
        )?,
    }
    writeln!(
        out,
        "messages   {} ({} bytes), sequences {}..={}, durable up to {}",
        i.messages, i.bytes, i.first_seq, i.last_seq, i.durable_seq
    )?;
    writeln!(
        out,
        "consumers  {}",
        if i.consumers.is_empty() {
            "-".to_string()
        } else {
            i.consumers.join(", ")
        }
    )?;
    let k = &i.counters;
    writeln!(
        out,
        "counted    stored {}, duplicates {}, refused {}, removed: limits {} age {} ttl {} acked {} purged {}, capture lost {}",
        k.stored, k.duplicates, k.refused, k.removed_limits, k.removed_age, k.removed_ttl, k.removed_acked, k.removed_purged, k.capture_lost
    )?;
    writeln!(
        out,
        "store      commits {}, write queue {} of {} bytes (most {}), publishes waited {}, refused {}",
        k.commits,
        k.write_queue_bytes,
        k.write_queue_limit,
        k.write_queue_high,
        k.write_queue_waits,
        k.write_queue_refused
    )?;
    if let Some(r) = &i.replication {
        writeln!(
            out,
            "replicated leader {} (term {}), members {}",
            r.leader,
            r.term,
            r.members.join(", ")
        )?;
    }
    Ok(())
}

fn ls(r: &ReadArgs) -> Result<(), Failure> {
    let target = Target::of(r)?;
    let body = call(&target, "GET", "/admin/streams", None)?;
    if r.json {
        return print_json(&body);
    }
    let rep: StreamsReport = target.decode("/admin/streams", &body)?;
    let mut rows: Vec<[String; 5]> = rep
        .streams
        .iter()
        .map(|i| {
            [
                i.config.name.clone(),
                i.config.subjects.join(","),
                i.messages.to_string(),
                i.bytes.to_string(),
                i.consumers.len().to_string(),
            ]
        })
        .collect();
    for b in &rep.broken {
        rows.push([
            b.name.clone(),
            format!("BROKEN: {}", b.error),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    let header = ["STREAM", "SUBJECTS", "MESSAGES", "BYTES", "CONSUMERS"].map(String::from);
    write_table(&mut std::io::stdout().lock(), &header, &rows)?;
    Ok(())
}

fn info(a: &NameArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let path = stream_path(&a.stream);
    let body = call(&target, "GET", &path, None)?;
    show_info(&target, &path, &body, a.read.json)?;
    if a.read.json {
        return Ok(());
    }
    // This member's own copy of a replicated stream.
    let replica = format!("{path}/replica");
    if let Ok(body) = call(&target, "GET", &replica, None) {
        let r: ReplicaStatus = target.decode(&replica, &body)?;
        writeln!(
            std::io::stdout().lock(),
            "this node {}, applied log index {}, stores {} messages up to seq {}",
            if r.serving { "leads" } else { "follows" },
            r.applied,
            r.stored,
            r.last_seq
        )?;
    }
    Ok(())
}

fn edit(a: &EditArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let path = stream_path(&a.stream);
    let body = call(&target, "GET", &path, None)?;
    let mut cfg = target.decode::<StreamInfo>(&path, &body)?.config;
    apply_limits(&mut cfg, &a.limits)?;
    if a.no_max_age {
        cfg.max_age = None;
    }
    if a.no_max_bytes {
        cfg.max_bytes = None;
    }
    if a.no_max_msgs {
        cfg.max_msgs = None;
    }
    let body = post_json(&target, "PUT", &path, &cfg)?;
    show_info(&target, &path, &body, a.read.json)
}

fn purge(a: &PurgeArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let path = format!("{}/purge", stream_path(&a.stream));
    let req = PurgeRequest {
        filter: a.subject.clone(),
        upto: a.upto,
        keep: a.keep,
    };
    let body = post_json(&target, "POST", &path, &req)?;
    if a.read.json {
        return print_json(&body);
    }
    let r: PurgeReport = target.decode(&path, &body)?;
    println!("purged {} messages", r.purged);
    Ok(())
}

fn publish(a: &PubArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let path = format!("{}/publish", stream_path(&a.stream));
    let ttl_ms = match &a.ttl {
        Some(t) => Some(u64::try_from(dur("--ttl", t)?.as_millis()).unwrap_or(u64::MAX)),
        None => None,
    };
    let req = PublishRequest {
        topic: a.topic.clone(),
        payload: Some(a.payload.clone()),
        msg_id: a.msg_id.clone(),
        ttl_ms,
        ..Default::default()
    };
    let body = post_json(&target, "POST", &path, &req)?;
    if a.read.json {
        return print_json(&body);
    }
    let ack: PubAck = target.decode(&path, &body)?;
    if ack.duplicate {
        println!("duplicate of seq {}", ack.seq);
    } else {
        println!("stored seq {}", ack.seq);
    }
    Ok(())
}

fn print_msg(out: &mut impl Write, m: &MsgReport) -> std::io::Result<()> {
    let payload = m.bytes();
    writeln!(
        out,
        "{} {} {}",
        m.seq,
        m.subject,
        String::from_utf8_lossy(&payload)
    )
}

fn get(a: &GetArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let path = format!("{}/msg/{}", stream_path(&a.stream), a.seq);
    let body = call(&target, "GET", &path, None)?;
    if a.read.json {
        return print_json(&body);
    }
    let m: MsgReport = target.decode(&path, &body)?;
    print_msg(&mut std::io::stdout().lock(), &m)?;
    Ok(())
}

/// Parses a position: all, new, last, last-per-subject, seq:N, time:MS or
/// time:-DURATION (before now).
fn position(flag: &str, s: &str) -> Result<DeliverPolicy, Failure> {
    parse_position(s).map_err(|e| usage(anyhow!("invalid {flag} {s:?}: {e}")))
}

/// A position in a stream: all, new, last, last-per-subject, seq:N,
/// time:UNIX_MS or time:-DURATION (that long ago).
pub(crate) fn parse_position(s: &str) -> Result<DeliverPolicy, String> {
    Ok(match s {
        "all" => DeliverPolicy::All,
        "new" => DeliverPolicy::New,
        "last" => DeliverPolicy::Last,
        "last-per-subject" => DeliverPolicy::LastPerSubject,
        _ => match s.split_once(':') {
            Some(("seq", n)) => DeliverPolicy::ByStartSeq(
                n.parse().map_err(|_| "seq:N needs a number".to_string())?,
            ),
            Some(("time", t)) => {
                let ms = match t.strip_prefix('-') {
                    Some(ago) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default();
                        let back = parse_duration(ago)?;
                        u64::try_from(now.saturating_sub(back).as_millis()).unwrap_or(0)
                    }
                    None => t.parse().map_err(|_| {
                        "time:UNIX_MS or time:-DURATION (e.g. time:-10m)".to_string()
                    })?,
                };
                DeliverPolicy::ByStartTime(ms)
            }
            _ => {
                return Err(
                    "all, new, last, last-per-subject, seq:N, time:UNIX_MS or time:-DURATION"
                        .to_string(),
                )
            }
        },
    })
}

fn sub(a: &SubArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let cfg = ConsumerConfig {
        deliver: position("--from", &a.from)?,
        ack: AckPolicy::None,
        filter: a.filter.iter().cloned().collect(),
        replay: if a.original_pace {
            ReplayPolicy::Original
        } else {
            ReplayPolicy::Instant
        },
        // Between two pulls of this loop the consumer is idle for at most
        // a round trip; an interrupted `sub` leaves it to be removed.
        inactive_threshold: macula::stream::Millis(60_000),
        ..Default::default()
    };
    cfg.validate().map_err(usage)?;
    let path = format!("{}/consumers", stream_path(&a.stream));
    let body = post_json(&target, "POST", &path, &cfg)?;
    let c: ConsumerReport = target.decode(&path, &body)?;
    eprintln!("reading stream {} (consumer {})", a.stream, c.name);
    let next = format!("{path}/{}/next", encode(c.name.as_bytes()));
    let mut seen = 0u64;
    loop {
        let left = a.count.map_or(1000, |n| n.saturating_sub(seen).min(1000));
        if left == 0 {
            break;
        }
        let req = NextRequest {
            batch: usize::try_from(left).unwrap_or(1000),
            max_bytes: None,
            wait_ms: 20_000,
        };
        let body = post_json(&target, "POST", &next, &req)?;
        let msgs: Vec<MsgReport> = target.decode(&next, &body)?;
        let mut out = std::io::stdout().lock();
        for m in &msgs {
            if a.read.json {
                writeln!(out, "{}", serde_json::to_string(m)?)?;
            } else {
                print_msg(&mut out, m)?;
            }
        }
        out.flush()?;
        seen += msgs.len() as u64;
    }
    let _ = no_content(
        &target,
        "DELETE",
        &format!("{path}/{}", encode(c.name.as_bytes())),
        None,
    );
    Ok(())
}

/// Runs `macula consumer ...`.
pub fn consumer(cmd: ConsumerCommand) -> Result<(), Failure> {
    match cmd {
        ConsumerCommand::Add(a) => consumer_add(&a),
        ConsumerCommand::Ls(a) => {
            let target = Target::of(&a.read)?;
            let path = format!("{}/consumers", stream_path(&a.stream));
            let body = call(&target, "GET", &path, None)?;
            if a.read.json {
                return print_json(&body);
            }
            let cs: Vec<ConsumerReport> = target.decode(&path, &body)?;
            let rows: Vec<[String; 5]> = cs
                .iter()
                .map(|c| {
                    [
                        c.name.clone(),
                        if c.config.durable.is_some() {
                            "durable"
                        } else {
                            "ephemeral"
                        }
                        .into(),
                        c.ack_floor.to_string(),
                        c.num_ack_pending.to_string(),
                        c.num_pending.to_string(),
                    ]
                })
                .collect();
            let header = [
                "CONSUMER",
                "KIND",
                "ACK_FLOOR",
                "ACK_PENDING",
                "UNDELIVERED",
            ]
            .map(String::from);
            write_table(&mut std::io::stdout().lock(), &header, &rows)?;
            Ok(())
        }
        ConsumerCommand::Info(a) => {
            let target = Target::of(&a.read)?;
            let path = format!(
                "{}/consumers/{}",
                stream_path(&a.stream),
                encode(a.name.as_bytes())
            );
            let body = call(&target, "GET", &path, None)?;
            show_consumer(&target, &path, &body, a.read.json)
        }
        ConsumerCommand::Rm(a) => {
            let target = Target::of(&a.read)?;
            let path = format!(
                "{}/consumers/{}",
                stream_path(&a.stream),
                encode(a.name.as_bytes())
            );
            no_content(&target, "DELETE", &path, None)?;
            println!("removed consumer {}", a.name);
            Ok(())
        }
        ConsumerCommand::Next(a) => next(&a),
    }
}

fn consumer_add(a: &ConsumerAddArgs) -> Result<(), Failure> {
    let mut cfg = ConsumerConfig {
        durable: a.name.clone(),
        deliver: position("--deliver", &a.deliver)?,
        ack: match a.ack.as_str() {
            "none" => AckPolicy::None,
            "all" => AckPolicy::All,
            "explicit" => AckPolicy::Explicit,
            x => {
                return Err(usage(anyhow!(
                    "--ack must be none, all or explicit, not {x:?}"
                )))
            }
        },
        filter: a.filter.clone(),
        replay: if a.original_pace {
            ReplayPolicy::Original
        } else {
            ReplayPolicy::Instant
        },
        max_deliver: a.max_deliver,
        deliver_subject: a.deliver_subject.clone(),
        ..Default::default()
    };
    if let Some(w) = &a.ack_wait {
        cfg.ack_wait = millis(dur("--ack-wait", w)?);
    }
    if let Some(n) = a.max_ack_pending {
        cfg.max_ack_pending = n;
    }
    cfg.backoff = a
        .backoff
        .iter()
        .map(|b| dur("--backoff", b).map(millis))
        .collect::<Result<_, _>>()?;
    cfg.validate().map_err(usage)?;
    let target = Target::of(&a.read)?;
    let path = format!("{}/consumers", stream_path(&a.stream));
    let body = post_json(&target, "POST", &path, &cfg)?;
    show_consumer(&target, &path, &body, a.read.json)
}

fn show_consumer(target: &Target, path: &str, body: &str, json: bool) -> Result<(), Failure> {
    if json {
        return print_json(body);
    }
    let c: ConsumerReport = target.decode(path, body)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "consumer      {} on {}", c.name, c.stream)?;
    writeln!(
        out,
        "kind          {}, deliver {:?}, ack {:?}, ack_wait {}ms, max_ack_pending {}",
        if c.config.durable.is_some() {
            "durable"
        } else {
            "ephemeral"
        },
        c.config.deliver,
        c.config.ack,
        c.config.ack_wait.0,
        c.config.max_ack_pending
    )?;
    writeln!(
        out,
        "delivered     {} (stream seq {})",
        c.delivered_consumer_seq, c.delivered_stream_seq
    )?;
    writeln!(out, "ack floor     {}", c.ack_floor)?;
    writeln!(
        out,
        "pending       {} waiting for acks, {} to redeliver, {} not yet delivered, {} given up",
        c.num_ack_pending, c.num_redelivered, c.num_pending, c.exhausted
    )?;
    Ok(())
}

fn next(a: &NextArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let base = format!(
        "{}/consumers/{}",
        stream_path(&a.stream),
        encode(a.name.as_bytes())
    );
    let wait = dur("--wait", &a.wait)?;
    let req = NextRequest {
        batch: a.count,
        max_bytes: None,
        wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
    };
    let path = format!("{base}/next");
    let body = post_json(&target, "POST", &path, &req)?;
    let msgs: Vec<MsgReport> = target.decode(&path, &body)?;
    {
        let mut out = std::io::stdout().lock();
        for m in &msgs {
            if a.read.json {
                writeln!(out, "{}", serde_json::to_string(m)?)?;
            } else {
                print_msg(&mut out, m)?;
            }
        }
    }
    if !a.no_ack {
        let ack = format!("{base}/ack");
        for m in &msgs {
            let req = AckRequest {
                seq: m.seq,
                kind: None,
                delay_ms: 0,
            };
            let body = serde_json::to_vec(&req)?;
            if let Err(e) = no_content(&target, "POST", &ack, Some(&body)) {
                // A consumer without acks takes none: nothing to do.
                if !e.error.to_string().contains("takes no acknowledgements") {
                    return Err(e);
                }
            }
        }
    }
    if msgs.is_empty() {
        eprintln!("no message within {}", a.wait);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_text_shows_the_store_queue() {
        let mut i: StreamInfo = serde_json::from_value(serde_json::json!({
            "config": StreamConfig::new("orders", &["orders.**"]),
            "messages": 3, "bytes": 192, "first_seq": 1, "last_seq": 3, "last_ts": 9,
            "durable_seq": 3, "subjects": 1, "consumers": [],
            "counters": {
                "stored": 3, "duplicates": 0, "refused": 0, "removed_limits": 0,
                "removed_age": 0, "removed_ttl": 0, "removed_acked": 0, "removed_purged": 0,
                "capture_lost": 0, "commits": 2
            }
        }))
        .unwrap();
        i.counters.write_queue_bytes = 640;
        i.counters.write_queue_limit = 64 << 20;
        i.counters.write_queue_high = 4096;
        i.counters.write_queue_waits = 5;
        i.counters.write_queue_refused = 1;
        let mut out = Vec::new();
        write_info(&mut out, &i).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                "store      commits 2, write queue 640 of 67108864 bytes (most 4096), publishes waited 5, refused 1\n"
            ),
            "{text}"
        );
    }
}
