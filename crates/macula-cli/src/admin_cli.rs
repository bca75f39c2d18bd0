//! `macula nodes`, `macula health` and `macula metrics`: read a running
//! node's admin HTTP API and print a table, or the JSON for scripts.
//!
//! Read-only: these commands only send `GET`s and never change the node
//! (`macula raft` and `macula kv`, in `raft_cli.rs`, use the same client for
//! the writing Raft endpoints).
//! Exit codes: 0 success; 1 the node is unreachable, answered an HTTP error
//! or (for `health`) is not ready, with a message naming the address; 2 usage.
//!
//! The HTTP client is `ureq` (plain HTTP/1.1: the admin server has no TLS;
//! no proxy, no redirects followed, bounded time and size) and the tables
//! are `comfy-table` without styling. The Prometheus/OpenMetrics text is
//! read by the small parser at the end of this file: the crates.io parsers
//! were either LGPL (`openmetrics-parser`), lossy (`prometheus-parse` splits
//! labels on `,` and `=`, ignores escapes, silently skips bad lines and pulls
//! in `regex` and `chrono`) or a single unmaintained release
//! (`prom_text_format_parser`); a property test checks ours instead.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::SigningKey;
use macula::admin::{ErrorReport, HealthReport, PeersReport, RoutingReport, ServicesReport};

use crate::{usage, Failure};

/// Time allowed to open the TCP connection to the admin server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one whole request, from connect to the last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest admin response accepted (headers and body).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The admin API's credentials (see [`Credentials::resolve`] for the order
/// in which they are looked for).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// File holding the node's admin token (`macula start` creates
    /// <data dir>/admin-token); env MACULA_ADMIN_TOKEN may hold the token itself
    #[arg(long, value_name = "FILE", env = "MACULA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The node's data directory, whose admin-token is sent when no other
    /// credentials are given [default: <user data dir>/macula]
    #[arg(long, value_name = "DIR", env = "MACULA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// An admin grant token file (`macula realm grant --subject client:KEY
    /// --allow 'admin admin.**'`); each request is signed with --admin-key
    #[arg(long, value_name = "FILE", requires = "admin_key")]
    pub admin_grant: Option<PathBuf>,
    /// The grant subject's signing key (PKCS#8 PEM, as `macula realm init`
    /// writes keys)
    #[arg(long, value_name = "FILE", requires = "admin_grant")]
    pub admin_key: Option<PathBuf>,
}

/// What a request to the admin API carries.
pub(crate) enum Credentials {
    None,
    /// `Authorization: Bearer <token>`.
    Token(String),
    /// Requests signed under an admin grant (its bytes) with the subject's key.
    Grant {
        grant: Vec<u8>,
        key: Box<SigningKey>,
    },
}

impl Credentials {
    /// In order: `--admin-grant` with `--admin-key`; `--admin-token-file`;
    /// env `MACULA_ADMIN_TOKEN`; `<data dir>/admin-token` if it exists;
    /// else none.
    pub(crate) fn resolve(a: &AuthArgs) -> Result<Credentials, Failure> {
        if let (Some(grant), Some(key)) = (&a.admin_grant, &a.admin_key) {
            let grant = crate::tokens::grant_file(grant)?;
            let id = macula::Identity::load(key)
                .with_context(|| format!("--admin-key {}", key.display()))?;
            let key = SigningKey::from_pkcs8_der(&id.pkcs8_der())
                .map_err(|e| anyhow!("the key in {} does not load: {e}", key.display()))?;
            return Ok(Credentials::Grant {
                grant,
                key: Box::new(key),
            });
        }
        if let Some(f) = &a.admin_token_file {
            return Ok(Credentials::Token(read_token(f)?));
        }
        if let Ok(t) = std::env::var("MACULA_ADMIN_TOKEN") {
            if !t.trim().is_empty() {
                return Ok(Credentials::Token(t.trim().to_string()));
            }
        }
        let dir = a
            .data_dir
            .clone()
            .unwrap_or_else(crate::config::default_data_dir);
        let f = dir.join(macula::admin::TOKEN_FILE);
        match std::fs::symlink_metadata(&f) {
            Ok(_) => Ok(Credentials::Token(read_token(&f)?)),
            Err(_) => Ok(Credentials::None),
        }
    }

    /// The `Authorization` header of `method path`, if any.
    fn authorization(&self, method: &str, path: &str) -> Option<String> {
        match self {
            Credentials::None => None,
            Credentials::Token(t) => Some(format!("{} {t}", macula::admin::BEARER)),
            Credentials::Grant { grant, key } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                Some(macula::admin::sign_request(grant, key, method, path, now))
            }
        }
    }
}

/// The token in an admin token file (one line).
fn read_token(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the admin token file {}", path.display()))?;
    let t = text.trim();
    if t.is_empty() || t.contains(char::is_whitespace) {
        return Err(anyhow!(
            "the admin token file {} must hold one token on one line",
            path.display()
        )
        .into());
    }
    Ok(t.to_string())
}

/// Where to find the node, and how to print.
#[derive(clap::Args, Debug)]
pub struct ReadArgs {
    /// Admin HTTP address of the node to ask (`macula start --http`).
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "MACULA_HTTP",
        default_value = "127.0.0.1:8080"
    )]
    pub http: String,
    /// Print the endpoint's JSON instead of a table (for scripts).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// `macula nodes` options.
#[derive(clap::Args, Debug)]
pub struct NodesArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// List the DHT routing table (every known node) instead of the
    /// connected peers.
    #[arg(long)]
    pub routing: bool,
}

/// `macula metrics` options.
#[derive(clap::Args, Debug)]
pub struct MetricsArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// Print the Prometheus/OpenMetrics text exactly as served.
    #[arg(long, conflicts_with = "json")]
    pub raw: bool,
    /// Only series whose name contains this text (e.g. `pool`).
    #[arg(value_name = "FILTER")]
    pub filter: Option<String>,
}

/// `macula nodes`: the peers the node is connected to (or, with
/// `--routing`, its DHT routing table).
pub fn nodes(a: &NodesArgs) -> Result<(), Failure> {
    let args = &a.read;
    if a.routing {
        return routing(args);
    }
    let target = Target::of(args)?;
    let body = target.get_ok("/admin/peers")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", body.trim_end())?;
        return Ok(());
    }
    let report: PeersReport = target.decode("/admin/peers", &body)?;
    writeln!(
        out,
        "node {} has {} peer(s)",
        report.node_id,
        report.peers.len()
    )?;
    if report.peers.is_empty() {
        return Ok(());
    }
    let rows: Vec<[String; 7]> = report
        .peers
        .iter()
        .map(|p| {
            [
                p.node_id.clone(),
                p.addr.to_string(),
                p.direction.clone(),
                format!("{:.1}ms", p.rtt_us as f64 / 1000.0),
                duration(p.idle_secs),
                if p.kept { "yes" } else { "no" }.to_string(),
                p.agent.clone(),
            ]
        })
        .collect();
    let header = [
        "NODE ID",
        "ADDRESS",
        "DIRECTION",
        "RTT",
        "IDLE",
        "KEPT",
        "AGENT",
    ]
    .map(String::from);
    write_table(&mut out, &header, &rows)?;
    Ok(())
}

/// `macula nodes --routing`: the DHT routing table.
fn routing(args: &ReadArgs) -> Result<(), Failure> {
    let target = Target::of(args)?;
    let body = target.get_ok("/admin/routing")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", body.trim_end())?;
        return Ok(());
    }
    let report: RoutingReport = target.decode("/admin/routing", &body)?;
    writeln!(
        out,
        "node {} knows {} node(s) in its routing table",
        report.node_id,
        report.contacts.len()
    )?;
    if report.contacts.is_empty() {
        return Ok(());
    }
    let rows: Vec<[String; 4]> = report
        .contacts
        .iter()
        .map(|c| {
            [
                c.node_id.clone(),
                c.addr.clone(),
                c.bucket.to_string(),
                duration(c.last_seen_secs),
            ]
        })
        .collect();
    let header = ["NODE ID", "ADDRESS", "BUCKET", "LAST SEEN"].map(String::from);
    write_table(&mut out, &header, &rows)?;
    Ok(())
}

/// `macula services`: procedures advertised in the mesh and their
/// providers, as the node sees them (plus what it serves itself).
pub fn services(args: &ReadArgs) -> Result<(), Failure> {
    let target = Target::of(args)?;
    let body = target.get_ok("/admin/services")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", body.trim_end())?;
        return Ok(());
    }
    let report: ServicesReport = target.decode("/admin/services", &body)?;
    if let Some(e) = &report.mesh_error {
        eprintln!("warning: the mesh-wide list is incomplete: {e}");
    }
    writeln!(
        out,
        "{} procedure(s) advertised in the mesh; node {} serves {}",
        report.mesh.len(),
        report.node_id,
        report.local.len()
    )?;
    let rows: Vec<[String; 4]> = report
        .mesh
        .iter()
        .flat_map(|s| {
            s.providers.iter().map(|p| {
                [
                    s.procedure.clone(),
                    p.node_id.clone(),
                    p.weight.to_string(),
                    p.addrs.join(","),
                ]
            })
        })
        .collect();
    if !rows.is_empty() {
        let header = ["PROCEDURE", "PROVIDER", "WEIGHT", "ADDRESSES"].map(String::from);
        write_table(&mut out, &header, &rows)?;
    }
    Ok(())
}

/// `macula health`: the node's health; exit code 1 unless it is ready.
pub fn health(args: &ReadArgs) -> Result<(), Failure> {
    let target = Target::of(args)?;
    let body = target.get_ok("/health")?;
    let report: HealthReport = target.decode("/health", &body)?;
    {
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", body.trim_end())?;
        } else {
            writeln!(out, "status: {}", report.status)?;
            let ready = if report.ready { "yes" } else { "no" };
            writeln!(out, "ready: {ready} ({})", report.reason)?;
            writeln!(out, "node_id: {}", report.node_id)?;
            writeln!(out, "realm: {}", report.realm)?;
            writeln!(out, "version: {}", report.version)?;
            writeln!(out, "uptime: {}", duration(report.uptime_secs))?;
            writeln!(out, "peers: {}", report.peers)?;
            writeln!(out, "listen: {}", report.listen)?;
            let methods = if report.admin_auth_methods.is_empty() {
                "none usable".to_string()
            } else {
                report.admin_auth_methods.join(", ")
            };
            if report.admin_auth {
                writeln!(out, "admin_auth: {methods}")?;
            } else {
                writeln!(out, "admin_auth: off (a node older than issue 18)")?;
            }
        }
        out.flush()?;
    }
    if !report.ready {
        return Err(anyhow!(
            "the node at {} is not ready: {}",
            target.text,
            report.reason
        )
        .into());
    }
    Ok(())
}

/// `macula nat`: what the node knows of its NAT (from peers' observed
/// addresses and the dial-back check) and its direct rate.
pub fn nat(args: &ReadArgs) -> Result<(), Failure> {
    let target = Target::of(args)?;
    let body = target.get_ok("/health")?;
    let report: HealthReport = target.decode("/health", &body)?;
    let n = &report.nat;
    let mut out = std::io::stdout().lock();
    if args.json {
        let json = serde_json::to_string(n).map_err(|e| anyhow!("cannot encode: {e}"))?;
        writeln!(out, "{json}")?;
        return Ok(());
    }
    let tri = |v: Option<bool>| match v {
        None => "unknown",
        Some(true) => "yes",
        Some(false) => "no",
    };
    writeln!(out, "node_id: {}", report.node_id)?;
    writeln!(out, "reachability: {}", report.reachability)?;
    writeln!(out, "behind_nat: {}", tri(n.behind_nat))?;
    writeln!(out, "mapping: {}", n.mapping)?;
    writeln!(out, "filtering: {}", n.filtering)?;
    writeln!(out, "port_preserved: {}", tri(n.port_preserved))?;
    let reflexive = if n.reflexive_addrs.is_empty() {
        "none".to_string()
    } else {
        n.reflexive_addrs.join(", ")
    };
    writeln!(out, "reflexive_addrs: {reflexive}")?;
    writeln!(out, "observers: {}", n.observers)?;
    let rate = n
        .direct_percent
        .map_or("n/a".to_string(), |p| format!("{p}%"));
    writeln!(
        out,
        "direct: {} of {} connections ({rate})",
        n.connections_direct, n.connections_opened
    )?;
    out.flush()?;
    Ok(())
}

/// `macula metrics`: every sample as a table, as JSON, or raw.
pub fn metrics(args: &MetricsArgs) -> Result<(), Failure> {
    let target = Target::of(&args.read)?;
    let body = target.get_ok("/metrics")?;
    let mut out = std::io::stdout().lock();
    if args.raw {
        write!(out, "{body}")?;
        return Ok(());
    }
    let samples: Vec<Sample> = parse_exposition(&body)
        .map_err(|e| anyhow!("the node at {} sent unreadable metrics: {e}", target.text))?
        .into_iter()
        .filter(|s| args.filter.as_deref().is_none_or(|f| s.name.contains(f)))
        .collect();
    if args.read.json {
        let v: Vec<serde_json::Value> = samples
            .iter()
            .map(|s| serde_json::json!({ "name": s.name, "labels": s.labels, "value": s.value }))
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(v))?;
        return Ok(());
    }
    let rows: Vec<[String; 2]> = samples
        .iter()
        .map(|s| [s.series(), s.value_text()])
        .collect();
    write_table(&mut out, &["SERIES".into(), "VALUE".into()], &rows)?;
    Ok(())
}

/// A node's admin address as given, checked for `HOST:PORT` shape.
pub(crate) struct Target {
    pub(crate) text: String,
    pub(crate) creds: Credentials,
}

impl Target {
    pub(crate) fn parse(text: &str) -> Result<Target, Failure> {
        let ok = text
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(usage(anyhow!(
                "invalid value {text:?} for --http: expected HOST:PORT, e.g. 127.0.0.1:8080"
            )));
        }
        Ok(Target {
            text: text.to_string(),
            creds: Credentials::None,
        })
    }

    /// The node of `--http`, with the credentials of `args`.
    pub(crate) fn of(args: &ReadArgs) -> Result<Target, Failure> {
        let mut t = Target::parse(&args.http)?;
        t.creds = Credentials::resolve(&args.auth)?;
        Ok(t)
    }

    /// `method path` with this target's credentials.
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        let auth = self.creds.authorization(method, path);
        request_with(&self.text, method, path, body, timeout, auth.as_deref())
    }

    /// `GET path`, requiring a 200; errors name the address.
    pub(crate) fn get_ok(&self, path: &str) -> Result<String, Failure> {
        let reply = self
            .request("GET", path, None, REQUEST_TIMEOUT)
            .with_context(|| format!("cannot reach the node's admin API at {}", self.text))?;
        if reply.status != 200 {
            let detail = serde_json::from_str::<ErrorReport>(&reply.body)
                .map(|e| e.error)
                .unwrap_or_else(|_| reply.body.chars().take(200).collect());
            let hint = if reply.status == 404 {
                " (is this a macula admin address?)"
            } else {
                auth_hint(reply.status)
            };
            return Err(anyhow!(
                "the node at {} answered HTTP {} for {path}: {}{hint}",
                self.text,
                reply.status,
                detail.trim()
            )
            .into());
        }
        Ok(reply.body)
    }

    pub(crate) fn decode<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &str,
    ) -> anyhow::Result<T> {
        serde_json::from_str(body)
            .with_context(|| format!("unexpected answer from {} for {path}", self.text))
    }
}

/// One HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// What to do about a 401 or 429 answer.
pub(crate) fn auth_hint(status: u16) -> &'static str {
    match status {
        401 => {
            " (the admin API needs credentials: --admin-token-file FILE, env MACULA_ADMIN_TOKEN, \
             --data-dir DIR of the node (its admin-token), or --admin-grant FILE --admin-key FILE)"
        }
        429 => " (too many failed attempts from this address: wait a minute and retry)",
        _ => "",
    }
}

/// A blocking HTTP/1.1 request to `http://{target}{path}` with an optional
/// body `(content type, bytes)`, bounded by [`CONNECT_TIMEOUT`], `timeout`
/// (connect to last byte) and [`MAX_RESPONSE_BYTES`]. Any status is an
/// answer; proxies are not used and redirects are not followed.
#[cfg(test)]
pub(crate) fn request(
    target: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    request_with(target, method, path, body, timeout, None)
}

/// [`request`] with an `Authorization` header.
fn request_with(
    target: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
    authorization: Option<&str>,
) -> anyhow::Result<Reply> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .user_agent(concat!("macula-cli/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut builder = ureq::http::Request::builder()
        .method(method)
        .uri(format!("http://{target}{path}"));
    if let Some(a) = authorization {
        builder = builder.header(ureq::http::header::AUTHORIZATION, a);
    }
    let answer = match body {
        Some((kind, bytes)) => agent.run(
            builder
                .header(ureq::http::header::CONTENT_TYPE, kind)
                .body(bytes)?,
        ),
        None => agent.run(builder.body(())?),
    };
    let mut answer = answer.map_err(|e| explain(e, target, timeout))?;
    let status = answer.status().as_u16();
    let body = answer
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BYTES as u64)
        .read_to_vec()
        .map_err(|e| explain(e, target, timeout))?;
    let body = String::from_utf8(body).context("the answer is not UTF-8")?;
    Ok(Reply { status, body })
}

/// A client error as a short sentence (the caller names the node).
fn explain(e: ureq::Error, target: &str, timeout: Duration) -> anyhow::Error {
    match e {
        ureq::Error::Timeout(ureq::Timeout::Connect) => {
            anyhow!("cannot connect to {target} within {CONNECT_TIMEOUT:?}")
        }
        ureq::Error::Timeout(_) => anyhow!("no complete answer within {timeout:?}"),
        ureq::Error::HostNotFound => anyhow!("cannot resolve {target}"),
        ureq::Error::BodyExceedsLimit(_) => {
            anyhow!("answer larger than {MAX_RESPONSE_BYTES} bytes")
        }
        ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            anyhow!("answer cut short: the node closed the connection")
        }
        ureq::Error::Io(e) => anyhow!("{e}"),
        ureq::Error::Protocol(e) => anyhow!("not an HTTP answer: {e}"),
        other => anyhow!(other),
    }
}

/// One sample of the exposition text.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn series(&self) -> String {
        if self.labels.is_empty() {
            return self.name.clone();
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }

    fn value_text(&self) -> String {
        if self.value.fract() == 0.0 && self.value.abs() < 1e15 {
            format!("{}", self.value as i64)
        } else {
            format!("{:.3}", self.value)
        }
    }
}

/// Parses Prometheus / OpenMetrics text: `name{k="v",...} value [timestamp]`
/// lines; comments (`# HELP`, `# TYPE`, `# EOF`) are skipped.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        let name_end = line.find(['{', ' ']).ok_or_else(|| bad("no value"))?;
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            let (parsed, tail) = parse_labels(after).map_err(|e| bad(&e))?;
            labels = parsed;
            rest = tail;
        }
        let value_text = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| bad("no value"))?;
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|_| bad("bad value"))?,
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(samples)
}

/// Parses `k="v",k2="v2"}` (after the `{`); returns the labels and the rest.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let (key, after) = s.split_once("=\"").ok_or("bad label")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.insert(key.trim().to_string(), value);
        s = &after[end + 1..];
    }
}

/// `90061` seconds as `1d 1h 1m 1s` (leading zero units left out).
pub(crate) fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    let parts = [(d, "d"), (h, "h"), (m, "m")];
    let mut out: Vec<String> = parts
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    out.push(format!("{s}s"));
    out.join(" ")
}

/// Left-aligned columns separated by two spaces, a header line first; no
/// borders, no styling, trailing spaces trimmed.
pub(crate) fn write_table<const N: usize>(
    out: &mut impl Write,
    header: &[String; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_header(header)
        .add_rows(rows);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    writeln!(out, "{}", table.trim_fmt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one connection on 127.0.0.1: reads the request (head, and a
    /// body of its Content-Length), writes `answer` unless it is `None`
    /// (then holds the connection open for a second), closes. Returns the
    /// address and the request as received.
    fn serve_once(answer: Option<Vec<u8>>) -> (String, std::thread::JoinHandle<String>) {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&seen).to_lowercase();
            let length = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let head = text.find("\r\n\r\n").map_or(seen.len(), |i| i + 4);
            while seen.len() < head + length {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            match answer {
                Some(bytes) => {
                    let _ = conn.write_all(&bytes);
                }
                None => std::thread::sleep(Duration::from_secs(1)),
            }
            String::from_utf8_lossy(&seen).into_owned()
        });
        (addr, server)
    }

    fn answer_to(raw: &[u8]) -> (anyhow::Result<Reply>, String) {
        let (addr, server) = serve_once(Some(raw.to_vec()));
        let reply = request(&addr, "GET", "/x", None, REQUEST_TIMEOUT);
        (reply, server.join().unwrap())
    }

    #[test]
    fn reads_answers_with_length_chunked_and_close() {
        let (r, sent) = answer_to(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello");
        assert_eq!(
            r.unwrap(),
            Reply {
                status: 200,
                body: "hello".into()
            }
        );
        assert!(sent.starts_with("GET /x HTTP/1.1\r\n"), "{sent}");
        let agent = format!("macula-cli/{}", env!("CARGO_PKG_VERSION"));
        assert!(sent.to_lowercase().contains(&agent), "{sent}");
        let (r, _) = answer_to(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        );
        let r = r.unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
        let (r, _) = answer_to(b"HTTP/1.0 404 Not Found\r\n\r\n{}");
        let r = r.unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "{}"));
    }

    #[test]
    fn broken_answers_are_errors() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhi"[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n\xff\xfe",
        ] {
            let (r, _) = answer_to(raw);
            assert!(
                r.is_err(),
                "{:?} was read as {r:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let big = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n{}",
            "x".repeat(MAX_RESPONSE_BYTES + 1),
            n = MAX_RESPONSE_BYTES + 1
        );
        let (r, _) = answer_to(big.as_bytes());
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn a_silent_node_times_out() {
        let (addr, server) = serve_once(None);
        let t = Duration::from_millis(300);
        let e = request(&addr, "GET", "/x", None, t).unwrap_err();
        assert!(
            format!("{e:#}").contains("no complete answer within"),
            "{e:#}"
        );
        server.join().unwrap();
    }

    #[test]
    fn an_unreachable_node_is_an_error() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert!(request(&dead, "GET", "/x", None, REQUEST_TIMEOUT).is_err());
        let e = Target::parse(&dead)
            .ok()
            .expect("target")
            .get_ok("/health")
            .err()
            .unwrap();
        assert_eq!(e.code, 1);
        let text = format!("{:#}", e.error);
        assert!(
            text.contains("cannot reach") && text.contains(&dead),
            "{text}"
        );
    }

    #[test]
    fn sends_bodies_with_their_type() {
        let (addr, server) = serve_once(Some(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()));
        let body = Some(("application/json", &b"{\"a\":1}"[..]));
        let r = request(
            &addr,
            "POST",
            "/admin/raft/g%2F1/cas?x=1",
            body,
            REQUEST_TIMEOUT,
        );
        assert_eq!(r.unwrap().status, 200);
        let sent = server.join().unwrap();
        assert!(
            sent.starts_with("POST /admin/raft/g%2F1/cas?x=1 HTTP/1.1\r\n"),
            "{sent}"
        );
        let lower = sent.to_lowercase();
        assert!(lower.contains("content-type: application/json"), "{sent}");
        assert!(lower.contains("content-length: 7"), "{sent}");
        assert!(sent.ends_with("\r\n\r\n{\"a\":1}"), "{sent}");
    }

    #[test]
    fn a_refusal_names_the_status_and_the_node() {
        let error = r#"{"error":"no such route","status":404}"#;
        let raw = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{error}",
            error.len()
        );
        let (addr, server) = serve_once(Some(raw.into_bytes()));
        let e = Target::parse(&addr)
            .ok()
            .expect("target")
            .get_ok("/admin/peers")
            .err()
            .unwrap();
        server.join().unwrap();
        assert_eq!(e.code, 1);
        let text = format!("{:#}", e.error);
        assert_eq!(
            text,
            format!(
                "the node at {addr} answered HTTP 404 for /admin/peers: no such route \
                 (is this a macula admin address?)"
            )
        );
    }

    #[test]
    fn tables_are_left_aligned_plain_text() {
        let mut out = Vec::new();
        let header = ["NODE ID", "RTT", "AGENT"].map(String::from);
        let rows = [
            ["abc", "1.5ms", "macula/0.1"].map(String::from),
            ["a-longer-id", "10.0ms", ""].map(String::from),
        ];
        write_table(&mut out, &header, &rows).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NODE ID      RTT     AGENT\n\
             abc          1.5ms   macula/0.1\n\
             a-longer-id  10.0ms\n"
        );
        let mut out = Vec::new();
        write_table(&mut out, &["SERIES".into(), "VALUE".into()], &[]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "SERIES  VALUE\n");
    }

    #[test]
    fn parses_exposition_text() {
        let text = "# HELP a_total A.\n# TYPE a counter\na_total 3\n\
                    b{kind=\"x\",why=\"q\\\"uote\"} 1.5\nc_seconds 2e3\n# EOF\n";
        let s = parse_exposition(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].name.as_str(), s[0].value), ("a_total", 3.0));
        assert_eq!(s[1].labels["kind"], "x");
        assert_eq!(s[1].labels["why"], "q\"uote");
        assert_eq!(s[1].series(), "b{kind=\"x\",why=\"q\\\"uote\"}");
        assert_eq!(s[1].value_text(), "1.500");
        assert_eq!(s[2].value_text(), "2000");
        assert!(parse_exposition("x{a=\"b} 1").is_err());
        assert!(parse_exposition("x").is_err());
        assert!(parse_exposition("x one").is_err());
    }

    #[test]
    fn checks_the_address_shape() {
        assert!(Target::parse("127.0.0.1:8080").is_ok());
        assert!(Target::parse("localhost:1").is_ok());
        assert!(Target::parse("[::1]:8080").is_ok());
        for bad in ["", "8080", "host", ":80", "host:99999", "host:x"] {
            let e = Target::parse(bad).err().expect(bad);
            assert_eq!(e.code, 2, "{bad}");
        }
    }

    #[test]
    fn formats_durations() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(61), "1m 1s");
        assert_eq!(duration(3_600), "1h 0m 0s");
        assert_eq!(duration(90_061), "1d 1h 1m 1s");
    }

    /// `v` as exposition text, escaped.
    fn escape(v: &str) -> String {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }

    fn value_strategy() -> impl proptest::strategy::Strategy<Value = f64> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO,
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            (-1_000_000i64..1_000_000).prop_map(|n| n as f64),
        ]
    }

    proptest::proptest! {
        /// Whatever samples a node writes, escaped as the format says, with
        /// comments and timestamps around them, read back the same.
        #[test]
        fn exposition_text_round_trips(
            samples in proptest::collection::vec(
                (
                    "[a-zA-Z_:][a-zA-Z0-9_:]{0,12}",
                    proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,6}", ".*", 0..4),
                    value_strategy(),
                    proptest::option::of(0u64..u64::MAX / 2),
                ),
                0..8,
            )
        ) {
            let mut text = String::from("# HELP x Something.\n# TYPE x gauge\n");
            for (name, labels, value, timestamp) in &samples {
                text.push_str(name);
                if !labels.is_empty() {
                    let labels: Vec<String> = labels
                        .iter()
                        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                        .collect();
                    text.push_str(&format!("{{{}}}", labels.join(",")));
                }
                let value = match *value {
                    f64::INFINITY => "+Inf".to_string(),
                    f64::NEG_INFINITY => "-Inf".to_string(),
                    v => v.to_string(),
                };
                text.push_str(&format!(" {value}"));
                if let Some(t) = timestamp {
                    text.push_str(&format!(" {t}"));
                }
                text.push('\n');
            }
            text.push_str("# EOF\n");
            let parsed = parse_exposition(&text).map_err(proptest::test_runner::TestCaseError::fail)?;
            let want: Vec<Sample> = samples
                .into_iter()
                .map(|(name, labels, value, _)| Sample { name, labels, value })
                .collect();
            proptest::prop_assert_eq!(parsed, want);
        }

        /// Any text, however broken, is read or refused without a panic.
        #[test]
        fn any_text_is_read_or_refused(text in "[a-z_{}=\",\\\\ #\n0-9.+eInf-]{0,80}|.{0,80}") {
            let _ = parse_exposition(&text);
        }
    }
}
