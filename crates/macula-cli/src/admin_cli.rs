//! `macula nodes`, `macula health` and `macula metrics`: read a running
//! node's admin HTTP API and print a table, or the JSON for scripts.
//!
//! Read-only: these commands only send `GET`s and never change the node
//! (`macula raft` and `macula kv`, in `raft_cli.rs`, use the same client for
//! the writing Raft endpoints).
//! Exit codes: 0 success; 1 the node is unreachable, answered an HTTP error
//! or (for `health`) is not ready, with a message naming the address; 2 usage.
//!
//! The HTTP client is a small blocking HTTP/1.1 `GET` over `std::net`
//! (`Connection: close`, bounded time and size) rather than a crate such as
//! `ureq`: four loopback-style requests per run need no connection pooling,
//! TLS or async, and on a 2-core build a dependency tree costs more than these
//! ~100 lines.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use macula::admin::{ErrorReport, HealthReport, PeersReport, RoutingReport, ServicesReport};

use crate::{usage, Failure};

/// Time allowed to open the TCP connection to the admin server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one whole request, from connect to the last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest admin response accepted (headers and body).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

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
    let target = Target::parse(&args.http)?;
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
    let target = Target::parse(&args.http)?;
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
    let target = Target::parse(&args.http)?;
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
    let target = Target::parse(&args.http)?;
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

/// `macula metrics`: every sample as a table, as JSON, or raw.
pub fn metrics(args: &MetricsArgs) -> Result<(), Failure> {
    let target = Target::parse(&args.read.http)?;
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
        })
    }

    /// `GET path`, requiring a 200; errors name the address.
    fn get_ok(&self, path: &str) -> Result<String, Failure> {
        let reply = get(&self.text, path)
            .with_context(|| format!("cannot reach the node's admin API at {}", self.text))?;
        if reply.status != 200 {
            let detail = serde_json::from_str::<ErrorReport>(&reply.body)
                .map(|e| e.error)
                .unwrap_or_else(|_| reply.body.chars().take(200).collect());
            let hint = if reply.status == 404 {
                " (is this a macula admin address?)"
            } else {
                ""
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

/// A blocking HTTP/1.1 `GET` with `Connection: close`, bounded by
/// [`CONNECT_TIMEOUT`], [`REQUEST_TIMEOUT`] and [`MAX_RESPONSE_BYTES`].
fn get(target: &str, path: &str) -> anyhow::Result<Reply> {
    request(target, "GET", path, None, REQUEST_TIMEOUT)
}

/// A blocking HTTP/1.1 request with `Connection: close` and an optional
/// body `(content type, bytes)`, bounded by [`CONNECT_TIMEOUT`], `timeout`
/// (connect to last byte) and [`MAX_RESPONSE_BYTES`].
pub(crate) fn request(
    target: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {target}"))?
        .collect();
    let mut last_error = anyhow!("{target} resolves to no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = anyhow!("cannot connect to {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_error)?;
    let deadline = Instant::now() + timeout;
    stream.set_write_timeout(Some(timeout))?;
    let content = match body {
        Some((kind, bytes)) => format!(
            "Content-Type: {kind}\r\nContent-Length: {}\r\n",
            bytes.len()
        ),
        None if method == "GET" => String::new(),
        None => "Content-Length: 0\r\n".to_string(),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: macula-cli/{}\r\n\
         Accept: */*\r\n{content}Connection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    let mut message = head.into_bytes();
    if let Some((_, bytes)) = body {
        message.extend_from_slice(bytes);
    }
    stream.write_all(&message)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no complete answer within {timeout:?}");
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no complete answer within {timeout:?}")
            }
            Err(e) => return Err(e).context("reading the answer"),
        };
        if n == 0 {
            break;
        }
        if raw.len() + n > MAX_RESPONSE_BYTES {
            bail!("answer larger than {MAX_RESPONSE_BYTES} bytes");
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_reply(&raw)
}

/// Parses a complete HTTP/1.x response (read until the server closed).
fn parse_reply(raw: &[u8]) -> anyhow::Result<Reply> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP answer (no end of headers)"))?;
    let head = std::str::from_utf8(&raw[..end]).context("HTTP headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next());
    let status = code
        .filter(|_| version.starts_with("HTTP/1."))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer: {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        } else if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| anyhow!("bad Content-Length {v:?}"))?,
            );
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = length {
        rest.get(..len)
            .ok_or_else(|| anyhow!("answer cut short: {} of {len} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8(body).context("the answer is not UTF-8")?;
    Ok(Reply { status, body })
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut rest: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("chunked answer cut short"))?;
        let size_text = std::str::from_utf8(&rest[..eol]).context("bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| anyhow!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| anyhow!("chunked answer cut short"))?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).unwrap_or_default();
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

/// Left-aligned columns separated by two spaces.
pub(crate) fn write_table<const N: usize>(
    out: &mut impl Write,
    header: &[String; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.each_ref().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies_with_length_chunked_and_close() {
        let r = parse_reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").unwrap();
        assert_eq!(
            r,
            Reply {
                status: 200,
                body: "hello".into()
            }
        );
        let r = parse_reply(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
        let r = parse_reply(b"HTTP/1.0 404 Not Found\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "{}"));
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhi").is_err());
        assert!(parse_reply(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(
            parse_reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
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
}
