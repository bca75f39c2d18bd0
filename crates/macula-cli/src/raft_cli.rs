//! `macula raft status|members|add|remove` and `macula kv
//! get|put|del|ls|cas|watch`: a running node's Raft groups and their
//! consistent key-value store, through its admin HTTP API (`/admin/raft`,
//! see `macula_runtime::admin::raft` for the endpoints). The node must be a
//! member of the group; writes and linearizable reads are forwarded to the
//! group's leader by the node.
//!
//! Exit codes: 0 success; 1 failure (the node is unreachable, runs no such
//! group, has no such key, the group has no leader, a timeout), with a
//! message naming the address; 2 usage; 3 `kv cas` whose comparison failed
//! (nothing was written).
//!
//! Keys and values are given as text on the command line. `kv get` prints
//! the value's bytes as they are; `--json` prints the endpoint's JSON
//! (values that are not UTF-8 as `value_base64`).

use std::io::Write;
use std::time::Duration;

use anyhow::anyhow;
use clap::Subcommand;
use macula::admin::{
    CasReport, CasRequest, ErrorReport, EventReport, KvGetReport, KvListReport, KvReport,
    KvWriteReport, MembersRequest, RaftGroupReport, RaftReport, WatchReport,
};
use macula::NodeId;

use crate::admin_cli::{write_table, ReadArgs, Target};
use crate::{usage, Failure};

/// The `--help` text on exit codes of `macula kv`.
pub const KV_EXIT_CODES: &str = "Exit codes: 0 success; 1 failure (node unreachable, no such group \
or key, no leader, timeout); 2 usage; 3 `kv cas`: the key was not as expected, nothing was written.";

/// Exit code of a compare-and-swap whose comparison failed.
pub const CAS_FAILED: u8 = 3;

/// Time allowed for one Raft admin request, connect to last byte (the node
/// answers within 25 s, `RAFT_ADMIN_DEADLINE`).
pub const RAFT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one watch poll may wait on the node for a change.
pub const WATCH_POLL_WAIT: Duration = Duration::from_secs(10);

/// `macula raft ...`.
#[derive(Subcommand, Debug)]
pub enum RaftCommand {
    /// The Raft groups the node is a member of: its role, the leader, the term, the members and its revision.
    Status(ReadArgs),
    /// The voters and learners of one group, and which one leads.
    Members(GroupArgs),
    /// Add a node to a group: as a voter (it first catches up as a learner), or with --learner as a non-voting member. Start the node with --raft-group GROUP first.
    Add(AddArgs),
    /// Remove a node (voter or learner) from a group.
    Remove(RemoveArgs),
}

/// A group, and where to find the node.
#[derive(clap::Args, Debug)]
pub struct GroupArgs {
    /// The group's name.
    #[arg(value_name = "GROUP")]
    pub group: String,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula raft add` options.
#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The group's name.
    #[arg(value_name = "GROUP")]
    pub group: String,
    /// The node to add (as printed by `macula identity`).
    #[arg(value_name = "NODE_ID")]
    pub node: String,
    /// Add it as a learner: it replicates the log but does not vote.
    #[arg(long)]
    pub learner: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula raft remove` options.
#[derive(clap::Args, Debug)]
pub struct RemoveArgs {
    /// The group's name.
    #[arg(value_name = "GROUP")]
    pub group: String,
    /// The node to remove.
    #[arg(value_name = "NODE_ID")]
    pub node: String,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula kv ...`.
#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Print a key's value (linearizable: the leader confirms it is current).
    Get(KvGetArgs),
    /// Set a key.
    Put(KvPutArgs),
    /// Delete a key, or with --prefix every key starting with it.
    Del(KvDelArgs),
    /// List the keys under a prefix (all keys without one) with their values.
    Ls(KvLsArgs),
    /// Compare-and-swap: set KEY to VALUE only if it is as expected; exit code 3 when it is not (nothing is written).
    #[command(
        after_help = "Exit codes: 0 swapped; 1 failure; 2 usage; 3 the key was not as expected (nothing was written; its current state is printed on stderr)."
    )]
    Cas(KvCasArgs),
    /// Print the changes under a prefix as they happen, until interrupted (or --count).
    Watch(KvWatchArgs),
}

/// `macula kv get` options.
#[derive(clap::Args, Debug)]
pub struct KvGetArgs {
    /// The group's name (the node must be a member).
    #[arg(value_name = "GROUP")]
    pub group: String,
    /// The key (text).
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Read the node's own copy, possibly behind the leader (no round trip to the leader; works without a quorum).
    #[arg(long)]
    pub stale: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula kv put` options.
#[derive(clap::Args, Debug)]
pub struct KvPutArgs {
    /// The group's name (the node must be a member).
    #[arg(value_name = "GROUP")]
    pub group: String,
    /// The key (text).
    #[arg(value_name = "KEY")]
    pub key: String,
    /// The value (text; `--` before it if it starts with `-`).
    #[arg(value_name = "VALUE")]
    pub value: String,
    /// Attach the key to this lease (granted through the API): it is deleted when the lease ends.
    #[arg(long, value_name = "ID")]
    pub lease: Option<u64>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula kv del` options.
#[derive(clap::Args, Debug)]
pub struct KvDelArgs {
    /// The group's name (the node must be a member).
    #[arg(value_name = "GROUP")]
    pub group: String,
    /// The key (text).
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Delete every key starting with KEY.
    #[arg(long)]
    pub prefix: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula kv ls` options.
#[derive(clap::Args, Debug)]
pub struct KvLsArgs {
    /// The group's name (the node must be a member).
    #[arg(value_name = "GROUP")]
    pub group: String,
    /// Only keys starting with this.
    #[arg(value_name = "PREFIX", default_value = "")]
    pub prefix: String,
    /// List at most this many keys, 1..10000.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: u32,
    /// Read the node's own copy, possibly behind the leader.
    #[arg(long)]
    pub stale: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula kv cas` options.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("expect").required(true).multiple(false)))]
pub struct KvCasArgs {
    /// The group's name (the node must be a member).
    #[arg(value_name = "GROUP")]
    pub group: String,
    /// The key (text).
    #[arg(value_name = "KEY")]
    pub key: String,
    /// The new value.
    #[arg(value_name = "VALUE")]
    pub value: String,
    /// Swap only if the key's current value is this.
    #[arg(long, value_name = "V", group = "expect")]
    pub expect_value: Option<String>,
    /// Swap only if the key does not exist (create it).
    #[arg(long, group = "expect")]
    pub expect_absent: bool,
    /// Swap only if the key was last changed at this revision (0: does not exist).
    #[arg(long, value_name = "N", group = "expect")]
    pub expect_mod_revision: Option<u64>,
    /// Swap only if the key has been put this many times since it was created (0: does not exist).
    #[arg(long, value_name = "N", group = "expect")]
    pub expect_version: Option<u64>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `macula kv watch` options.
#[derive(clap::Args, Debug)]
pub struct KvWatchArgs {
    /// The group's name (the node must be a member).
    #[arg(value_name = "GROUP")]
    pub group: String,
    /// Watch the keys starting with this (all keys without one).
    #[arg(value_name = "PREFIX", default_value = "")]
    pub prefix: String,
    /// Start at this revision (older changes the node still keeps are printed first); default: changes from now on.
    #[arg(long, value_name = "REV")]
    pub from: Option<u64>,
    /// Exit after this many changes.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// Runs `macula raft ...`.
pub fn raft(cmd: &RaftCommand) -> Result<(), Failure> {
    match cmd {
        RaftCommand::Status(read) => status(read),
        RaftCommand::Members(a) => members(a),
        RaftCommand::Add(a) => {
            let op = if a.learner {
                "add_learner"
            } else {
                "add_voter"
            };
            change(&a.group, op, &a.node, &a.read)
        }
        RaftCommand::Remove(a) => change(&a.group, "remove", &a.node, &a.read),
    }
}

/// Runs `macula kv ...`.
pub fn kv(cmd: &KvCommand) -> Result<(), Failure> {
    match cmd {
        KvCommand::Get(a) => kv_get(a),
        KvCommand::Put(a) => kv_put(a),
        KvCommand::Del(a) => kv_del(a),
        KvCommand::Ls(a) => kv_ls(a),
        KvCommand::Cas(a) => kv_cas(a),
        KvCommand::Watch(a) => kv_watch(a),
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// Percent-encodes everything but `A-Z a-z 0-9 - _ ~`, so a key is always
/// one path segment (slashes and dots included) or one query value.
pub fn encode(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn group_path(group: &str) -> String {
    format!("/admin/raft/{}", encode(group.as_bytes()))
}

/// One request; the answer whatever its status (errors name the address).
pub(crate) fn send(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<crate::admin_cli::Reply, Failure> {
    target.request(method, path, body, timeout).map_err(|e| {
        anyhow!(
            "cannot reach the node's admin API at {}: {e:#}",
            target.text
        )
        .into()
    })
}

/// The failure for a non-200 answer: the node's message, exit code 1.
pub(crate) fn refused(
    target: &Target,
    method: &str,
    path: &str,
    reply: &crate::admin_cli::Reply,
) -> Failure {
    let detail = serde_json::from_str::<ErrorReport>(&reply.body)
        .map(|e| match e.kind {
            Some(kind) => format!("{} [{kind}]", e.error),
            None => e.error,
        })
        .unwrap_or_else(|_| reply.body.chars().take(200).collect());
    let hint = if reply.status == 404 && !reply.body.contains("\"kind\"") {
        " (is this a macula admin address, and does this version serve /admin/raft?)"
    } else {
        crate::admin_cli::auth_hint(reply.status)
    };
    anyhow!(
        "the node at {} answered HTTP {} for {method} {path}: {}{hint}",
        target.text,
        reply.status,
        detail.trim()
    )
    .into()
}

/// A request that must answer 200; its body.
pub(crate) fn call(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Result<String, Failure> {
    let reply = send(target, method, path, body, RAFT_REQUEST_TIMEOUT)?;
    if reply.status != 200 {
        return Err(refused(target, method, path, &reply));
    }
    Ok(reply.body)
}

pub(crate) fn print_json(body: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", body.trim_end())?;
    out.flush()?;
    Ok(())
}

fn check_node_id(text: &str) -> Result<NodeId, Failure> {
    text.trim().parse::<NodeId>().map_err(|e| {
        usage(anyhow!(
            "invalid node ID {text:?}: {e}; expected a node ID as printed by `macula identity`"
        ))
    })
}

// ---------------------------------------------------------------------------
// macula raft
// ---------------------------------------------------------------------------

/// This node's role in a group.
fn role(node_id: &str, g: &RaftGroupReport) -> &'static str {
    if g.is_leader {
        "leader"
    } else if g.voters.iter().any(|v| v == node_id) {
        "follower"
    } else if g.learners.iter().any(|v| v == node_id) {
        "learner"
    } else {
        "not-a-member"
    }
}

fn status(read: &ReadArgs) -> Result<(), Failure> {
    let target = Target::of(read)?;
    let body = call(&target, "GET", "/admin/raft", None)?;
    if read.json {
        return print_json(&body);
    }
    let report: RaftReport = target.decode("/admin/raft", &body)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "node {} is in {} Raft group(s)",
        report.node_id,
        report.groups.len()
    )?;
    if report.groups.is_empty() {
        return Ok(());
    }
    let rows: Vec<[String; 7]> = report
        .groups
        .iter()
        .map(|g| {
            [
                g.name.clone(),
                role(&report.node_id, g).to_string(),
                g.leader.clone().unwrap_or_else(|| "-".to_string()),
                g.term.to_string(),
                g.voters.len().to_string(),
                g.learners.len().to_string(),
                g.revision.to_string(),
            ]
        })
        .collect();
    let header = [
        "GROUP", "ROLE", "LEADER", "TERM", "VOTERS", "LEARNERS", "REVISION",
    ]
    .map(String::from);
    write_table(&mut out, &header, &rows)?;
    Ok(())
}

fn print_members(g: &RaftGroupReport) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "group {}: leader {}, term {}, {} voter(s), {} learner(s)",
        g.name,
        g.leader.as_deref().unwrap_or("unknown"),
        g.term,
        g.voters.len(),
        g.learners.len()
    )?;
    let leader = |id: &String| {
        if g.leader.as_ref() == Some(id) {
            "yes"
        } else {
            ""
        }
    };
    let rows: Vec<[String; 3]> = g
        .voters
        .iter()
        .map(|v| [v.clone(), "voter".to_string(), leader(v).to_string()])
        .chain(
            g.learners
                .iter()
                .map(|l| [l.clone(), "learner".to_string(), leader(l).to_string()]),
        )
        .collect();
    if !rows.is_empty() {
        let header = ["NODE ID", "ROLE", "LEADER"].map(String::from);
        write_table(&mut out, &header, &rows)?;
    }
    Ok(())
}

fn members(a: &GroupArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let path = format!("{}/members", group_path(&a.group));
    let body = call(&target, "GET", &path, None)?;
    if a.read.json {
        return print_json(&body);
    }
    let report: RaftGroupReport = target.decode(&path, &body)?;
    print_members(&report)
}

fn change(group: &str, op: &str, node: &str, read: &ReadArgs) -> Result<(), Failure> {
    let target = Target::of(read)?;
    let node = check_node_id(node)?;
    let path = format!("{}/members", group_path(group));
    let req = serde_json::to_vec(&MembersRequest::new(op, node.to_string()))?;
    let body = call(&target, "POST", &path, Some(("application/json", &req)))?;
    if read.json {
        return print_json(&body);
    }
    let report: RaftGroupReport = target.decode(&path, &body)?;
    let done = match op {
        "add_voter" => format!("added {node} to group {group} as a voter"),
        "add_learner" => format!("added {node} to group {group} as a learner"),
        _ => format!("removed {node} from group {group}"),
    };
    println!("{done}");
    print_members(&report)
}

// ---------------------------------------------------------------------------
// macula kv
// ---------------------------------------------------------------------------

fn key_path(group: &str, key: &str) -> String {
    format!("{}/kv/{}", group_path(group), encode(key.as_bytes()))
}

/// The bytes of a text/base64 pair as the node sent them.
fn bytes_of(text: &Option<String>, b64: &Option<String>) -> Vec<u8> {
    match (text, b64) {
        (Some(t), _) => t.as_bytes().to_vec(),
        (None, Some(b)) => base64_decode(b).unwrap_or_default(),
        (None, None) => Vec::new(),
    }
}

/// Bytes for a table cell or a line: escaped, and cut after `max` chars.
fn shown(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let escaped: String = text.escape_debug().collect();
    if escaped.chars().count() > max {
        let cut: String = escaped.chars().take(max).collect();
        format!("{cut}...")
    } else {
        escaped
    }
}

fn key_of(kv: &KvReport) -> Vec<u8> {
    bytes_of(&kv.key, &kv.key_base64)
}

fn value_of(kv: &KvReport) -> Vec<u8> {
    bytes_of(&kv.value, &kv.value_base64)
}

fn kv_get(a: &KvGetArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let mut path = key_path(&a.group, &a.key);
    if a.stale {
        path.push_str("?stale=true");
    }
    let reply = send(&target, "GET", &path, None, RAFT_REQUEST_TIMEOUT)?;
    if reply.status == 404 && reply.body.contains("raft.no_key") {
        return Err(anyhow!("no key {:?} in group {}", a.key, a.group).into());
    }
    if reply.status != 200 {
        return Err(refused(&target, "GET", &path, &reply));
    }
    if a.read.json {
        return print_json(&reply.body);
    }
    let report: KvGetReport = target.decode(&path, &reply.body)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&value_of(&report.kv))?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn kv_put(a: &KvPutArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let mut path = key_path(&a.group, &a.key);
    if let Some(lease) = a.lease {
        path.push_str(&format!("?lease={lease}"));
    }
    let body = call(
        &target,
        "PUT",
        &path,
        Some(("application/octet-stream", a.value.as_bytes())),
    )?;
    if a.read.json {
        return print_json(&body);
    }
    let report: KvWriteReport = target.decode(&path, &body)?;
    println!("OK revision {}", report.revision);
    Ok(())
}

fn kv_del(a: &KvDelArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let mut path = key_path(&a.group, &a.key);
    if a.prefix {
        path.push_str("?prefix=true");
    }
    let body = call(&target, "DELETE", &path, None)?;
    if a.read.json {
        return print_json(&body);
    }
    let report: KvWriteReport = target.decode(&path, &body)?;
    println!(
        "deleted {} key(s), revision {}",
        report.deleted.unwrap_or(0),
        report.revision
    );
    Ok(())
}

fn kv_ls(a: &KvLsArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    if !(1..=macula::admin::KV_LIST_MAX_LIMIT as u32).contains(&a.limit) {
        return Err(usage(anyhow!(
            "invalid value {} for --limit: expected 1 to {}",
            a.limit,
            macula::admin::KV_LIST_MAX_LIMIT
        )));
    }
    let mut path = format!(
        "{}/kv?prefix={}&limit={}",
        group_path(&a.group),
        encode(a.prefix.as_bytes()),
        a.limit
    );
    if a.stale {
        path.push_str("&stale=true");
    }
    let body = call(&target, "GET", &path, None)?;
    if a.read.json {
        return print_json(&body);
    }
    let report: KvListReport = target.decode(&path, &body)?;
    let mut out = std::io::stdout().lock();
    if !report.kvs.is_empty() {
        let rows: Vec<[String; 4]> = report
            .kvs
            .iter()
            .map(|kv| {
                [
                    shown(&key_of(kv), 200),
                    shown(&value_of(kv), 60),
                    kv.version.to_string(),
                    kv.mod_revision.to_string(),
                ]
            })
            .collect();
        let header = ["KEY", "VALUE", "VERSION", "MOD REVISION"].map(String::from);
        write_table(&mut out, &header, &rows)?;
    }
    out.flush()?;
    if report.more {
        eprintln!(
            "(more keys under {:?}: raise --limit, or list a narrower prefix)",
            a.prefix
        );
    }
    Ok(())
}

fn describe(kv: &Option<KvReport>) -> String {
    match kv {
        None => "the key does not exist".to_string(),
        Some(kv) => format!(
            "its value is \"{}\" (mod revision {}, version {})",
            shown(&value_of(kv), 200),
            kv.mod_revision,
            kv.version
        ),
    }
}

fn kv_cas(a: &KvCasArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let mut req = CasRequest::new(a.key.clone(), "", a.value.clone());
    if let Some(v) = &a.expect_value {
        req.expect = "value".into();
        req.expect_value = Some(v.clone());
    } else if a.expect_absent {
        req.expect = "absent".into();
    } else if let Some(r) = a.expect_mod_revision {
        req.expect = "mod_revision".into();
        req.expect_mod_revision = Some(r);
    } else if let Some(v) = a.expect_version {
        req.expect = "version".into();
        req.expect_version = Some(v);
    } else {
        return Err(usage(anyhow!(
            "give one of --expect-value, --expect-absent, --expect-mod-revision, --expect-version"
        )));
    }
    let path = format!("{}/cas", group_path(&a.group));
    let body = serde_json::to_vec(&req)?;
    let reply = send(
        &target,
        "POST",
        &path,
        Some(("application/json", &body)),
        RAFT_REQUEST_TIMEOUT,
    )?;
    let report = match reply.status {
        200 | 409 => serde_json::from_str::<CasReport>(&reply.body).ok(),
        _ => None,
    };
    let Some(report) = report else {
        return Err(refused(&target, "POST", &path, &reply));
    };
    if a.read.json {
        print_json(&reply.body)?;
    }
    if report.succeeded {
        if !a.read.json {
            println!("OK revision {}", report.revision);
        }
        return Ok(());
    }
    Err(Failure {
        code: CAS_FAILED,
        error: anyhow!(
            "compare failed, nothing written: key {:?} in group {}: {}",
            a.key,
            a.group,
            describe(&report.current)
        ),
    })
}

fn print_event(out: &mut impl Write, e: &EventReport) -> std::io::Result<()> {
    let key = shown(&bytes_of(&e.key, &e.key_base64), 200);
    match &e.kv {
        Some(kv) if e.event == "put" => writeln!(
            out,
            "{} PUT {key} = {}",
            e.revision,
            shown(&value_of(kv), 200)
        ),
        _ => writeln!(out, "{} DELETE {key}", e.revision),
    }
}

fn kv_watch(a: &KvWatchArgs) -> Result<(), Failure> {
    let target = Target::of(&a.read)?;
    let mut from = a.from.unwrap_or(0);
    let mut seen = 0u64;
    loop {
        let path = format!(
            "{}/watch?prefix={}&from={from}&wait_ms={}",
            group_path(&a.group),
            encode(a.prefix.as_bytes()),
            WATCH_POLL_WAIT.as_millis()
        );
        let reply = send(&target, "GET", &path, None, RAFT_REQUEST_TIMEOUT)?;
        if reply.status != 200 {
            return Err(refused(&target, "GET", &path, &reply));
        }
        let report: WatchReport = target.decode(&path, &reply.body)?;
        let mut out = std::io::stdout().lock();
        for e in &report.events {
            if a.read.json {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            } else {
                print_event(&mut out, e)?;
            }
            seen += 1;
            if a.count.is_some_and(|n| seen >= n) {
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
        from = report.next;
    }
}

/// Standard base64: padded on output, padding optional on input (as the
/// admin API writes and reads it).
pub(crate) const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Decodes standard base64 (padding optional); `None` if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&BASE64, text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_path_segment() {
        assert_eq!(encode(b"a/b c.d"), "a%2Fb%20c%2Ed");
        assert_eq!(encode(b"Az09-_~"), "Az09-_~");
        assert_eq!(encode("é".as_bytes()), "%C3%A9");
        assert_eq!(encode(b"..%"), "%2E%2E%25");
    }

    #[test]
    fn base64_values_decode() {
        assert_eq!(base64_decode("Zm9vYg==").as_deref(), Some(&b"foob"[..]));
        assert_eq!(base64_decode("//4A").as_deref(), Some(&b"\xff\xfe\x00"[..]));
        assert!(base64_decode("Z").is_none());
    }

    #[test]
    fn cas_needs_exactly_one_expectation() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            kv: KvCommand,
        }
        let ok = Cli::try_parse_from(["x", "cas", "g", "k", "v", "--expect-absent"]);
        assert!(ok.is_ok());
        let none = Cli::try_parse_from(["x", "cas", "g", "k", "v"]);
        assert!(none.is_err());
        let two = Cli::try_parse_from([
            "x",
            "cas",
            "g",
            "k",
            "v",
            "--expect-absent",
            "--expect-value",
            "a",
        ]);
        assert!(two.is_err());
    }
}
