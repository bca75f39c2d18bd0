//! `macula realm ...` and `macula authz check`: a realm authority's key,
//! the grants it issues, its revocation list, and explaining decisions
//! (issue 18; the formats are `macula::auth`'s, PROTOCOL.md section 5.10).
//!
//! Everything lives in `<data dir>/realms/<NAME>/`: `authority.key` (the
//! authority's Ed25519 key, PKCS#8 PEM, mode 0600, never overwritten),
//! `grants.jsonl` (one line per grant issued, with its token), and
//! `revocations` (the current signed revocation list). These commands work
//! offline: nodes will take grants in their handshake and lists through the
//! mesh once the runtime side of issue 18 lands.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use clap::{Args, Subcommand};
use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::SigningKey;
use macula::apikey::{ApiKey, ApiKeyEntry, ApiKeyStore};
use macula::auth::policy::{parse_rules, Action, Decision, Rule};
use macula::auth::{
    sign, Grant, GrantBody, GrantId, Key, RevocationBody, RevocationList, Revocations, Subject,
};
use macula::NodeId;
use serde::{Deserialize, Serialize};

use crate::Failure;

/// Grants and realm keys travel as URL-safe base64 without padding.
use crate::tokens::{revocations_file, TOKEN};

#[derive(Subcommand, Debug)]
pub enum RealmCommand {
    /// Create a realm authority (its signing key) and print the realm key.
    Init(NameArgs),
    /// Print a realm's key (the authority's public key).
    Key(NameArgs),
    /// Issue a grant and print it as a token.
    Grant(GrantArgs),
    /// Revoke a grant (by serial) or a principal, and re-sign the revocation list.
    Revoke(RevokeArgs),
    /// List the grants a realm issued, with their state.
    List(ListArgs),
    /// Decode a grant token, and verify it when --realm is given.
    Inspect(InspectArgs),
    /// Send the realm's current revocation list to running nodes (they
    /// adopt it when newer and pass it on through the mesh).
    Push(PushArgs),
    /// Issue an API key for a lightweight client, bound to a grant the
    /// realm issued: the key is printed once; the realm keeps its hash.
    Apikey(ApiKeyArgs),
    /// List a realm's API keys (label, hash prefix, grant, state), or
    /// --export the file gateways take (`macula start --api-keys FILE`).
    Apikeys(ApiKeysArgs),
}

#[derive(Args, Debug)]
pub struct PushArgs {
    #[command(flatten)]
    pub realm: NameArgs,
    /// Admin HTTP address of a node to send it to (any one node spreads it
    /// to the mesh). Repeatable.
    #[arg(long = "http", value_name = "HOST:PORT", required = true)]
    pub http: Vec<String>,
    #[command(flatten)]
    pub auth: PushAuth,
}

/// The admin credentials `realm push` and `realm revoke --push` send.
#[derive(Args, Debug, Default)]
pub struct PushAuth {
    /// The node's admin token file; env MACULA_ADMIN_TOKEN may hold the token
    #[arg(long, value_name = "FILE", env = "MACULA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The node's data directory, whose admin-token is sent when no other
    /// credentials are given
    #[arg(long, value_name = "DIR")]
    pub node_data_dir: Option<PathBuf>,
    /// An admin grant token file; each request is signed with --admin-key
    #[arg(long, value_name = "FILE", requires = "admin_key")]
    pub admin_grant: Option<PathBuf>,
    /// The grant subject's signing key (PKCS#8 PEM)
    #[arg(long, value_name = "FILE", requires = "admin_grant")]
    pub admin_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ApiKeyArgs {
    #[command(flatten)]
    pub realm: NameArgs,
    /// The grant the key stands for (as `realm grant` printed it; any
    /// subject: the key's holder acts as it), or @FILE.
    #[arg(long, value_name = "TOKEN")]
    pub grant: String,
    /// Who or what the key is for (shown by `realm apikeys`).
    #[arg(long, value_name = "LABEL", default_value = "")]
    pub label: String,
}

#[derive(Args, Debug)]
pub struct ApiKeysArgs {
    #[command(flatten)]
    pub realm: NameArgs,
    /// Write the gateways' API keys file (hashes and grants, never keys)
    /// to FILE, `-` for stdout, instead of listing.
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct NameArgs {
    /// The realm's name (a label on this machine; the realm is its key).
    pub name: String,
    /// Directory holding realms/ [env: MACULA_DATA_DIR] [default: <user data dir>/macula]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct GrantArgs {
    #[command(flatten)]
    pub realm: NameArgs,
    /// Who the grant is for: node:<NODE_ID>, client:<KEY> or signer:<KEY>.
    #[arg(long, value_name = "SUBJECT")]
    pub subject: String,
    /// A permission, `ACTION PATTERN` (publish, subscribe, call, advertise,
    /// relay, admin; `{{subject}}` stands for the subject's ID). Repeatable.
    #[arg(long, value_name = "RULE")]
    pub allow: Vec<String>,
    /// A denial, `ACTION PATTERN`; deny wins. Repeatable.
    #[arg(long, value_name = "RULE")]
    pub deny: Vec<String>,
    /// A role label. Repeatable.
    #[arg(long, value_name = "ROLE")]
    pub role: Vec<String>,
    /// How long the grant is valid: 90d, 12h, 30m, 300s.
    #[arg(long, default_value = "30d", value_name = "DURATION")]
    pub ttl: String,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub realm: NameArgs,
    /// A grant's serial (32 hex digits, as `realm list` shows it). Repeatable.
    #[arg(long, value_name = "SERIAL")]
    pub grant: Vec<String>,
    /// A principal: node:<NODE_ID>, client:<KEY> or signer:<KEY>. Repeatable.
    #[arg(long, value_name = "SUBJECT")]
    pub subject: Vec<String>,
    /// Then send the new list to the node at this admin HTTP address (as
    /// `realm push`). Repeatable.
    #[arg(long = "push", value_name = "HOST:PORT")]
    pub push: Vec<String>,
    #[command(flatten)]
    pub auth: PushAuth,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub realm: NameArgs,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A grant token, or @FILE to read one.
    pub token: String,
    /// Verify against this realm key (as `realm key` prints it).
    #[arg(long, value_name = "KEY")]
    pub realm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The principal's grant token, or @FILE.
    #[arg(long, value_name = "TOKEN")]
    pub grant: String,
    /// The realm key the grant must be for.
    #[arg(long, value_name = "KEY")]
    pub realm: String,
    /// The realm's revocation list (the file `realm revoke` writes).
    #[arg(long, value_name = "FILE")]
    pub revocations: Option<PathBuf>,
    /// publish, subscribe, call, advertise, relay or admin.
    pub action: String,
    /// A topic or procedure name (a pattern for subscribe).
    pub resource: String,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify an audit log's hash chain (and its signed checkpoints with
    /// --key or --data-dir): exit 0 if intact, 1 naming the first broken line.
    Verify(AuditVerifyArgs),
    /// Print a node's latest audit entries (<data dir>/audit/), oldest first.
    Tail(AuditTailArgs),
}

#[derive(Args, Debug)]
pub struct AuditVerifyArgs {
    /// Audit log files, oldest first (a rotated set continues one chain).
    #[arg(required_unless_present = "data_dir")]
    pub files: Vec<PathBuf>,
    /// The node's public key (52 base32 characters), to check checkpoints.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// A node's data directory: verify its audit/ files (audit.log.N ..
    /// audit.log, in order) unless FILES are given, and check checkpoints
    /// with its node.key unless --key is given.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct AuditTailArgs {
    /// The node's data directory [env: MACULA_DATA_DIR] [default: <user data dir>/macula]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// How many of the latest entries to print.
    #[arg(short = 'n', long = "lines", default_value_t = 20, value_name = "N")]
    pub n: usize,
    /// Keep printing entries as they are written (across rotations) until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Print each entry as its JSON line instead of a table row.
    #[arg(long)]
    pub json: bool,
}

/// `macula audit verify` and `macula audit tail`.
pub fn audit(cmd: AuditCommand) -> Result<(), Failure> {
    match cmd {
        AuditCommand::Verify(args) => audit_verify(args),
        AuditCommand::Tail(args) => audit_tail(args),
    }
}

fn audit_verify(args: AuditVerifyArgs) -> Result<(), Failure> {
    let key = match (&args.key, &args.data_dir) {
        (Some(k), _) => {
            let k: Key = k.parse().map_err(|e| crate::usage(anyhow!("--key: {e}")))?;
            Some(
                ed25519_dalek::VerifyingKey::from_bytes(&k.0)
                    .map_err(|e| crate::usage(anyhow!("--key: {e}")))?,
            )
        }
        (None, Some(dir)) => {
            let id = macula::Identity::load(&dir.join("node.key"))
                .with_context(|| format!("the node key of {}", dir.display()))?;
            Some(
                ed25519_dalek::VerifyingKey::from_bytes(&id.public_key())
                    .map_err(|e| anyhow!("the node key of {}: {e}", dir.display()))?,
            )
        }
        (None, None) => None,
    };
    let files = match (&args.data_dir, args.files.is_empty()) {
        (Some(dir), true) => {
            let audit = dir.join("audit");
            let files = macula::audit_log::files(&audit)
                .with_context(|| format!("cannot list {}", audit.display()))?;
            if files.is_empty() {
                return Err(anyhow!("no audit log in {}", audit.display()).into());
            }
            files
        }
        _ => args.files.clone(),
    };
    let mut chain = None;
    let mut entries = 0usize;
    let mut checkpoints = 0usize;
    for path in &files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (end, n) = macula::auth::audit::verify(text.lines(), chain.take(), key.as_ref())
            .map_err(|b| Failure {
                code: 1,
                error: anyhow!("{}: {b}", path.display()),
            })?;
        entries += text.lines().filter(|l| !l.trim().is_empty()).count();
        checkpoints += n;
        chain = Some(end);
    }
    println!(
        "intact: {entries} entries, {checkpoints} checkpoints verified{}",
        if key.is_none() {
            " (no --key: signatures not checked)"
        } else {
            ""
        }
    );
    Ok(())
}

fn audit_tail(args: AuditTailArgs) -> Result<(), Failure> {
    use macula::audit_log::FILE_NAME;
    use std::io::{Read as _, Write as _};
    let base = crate::config::data_dir_or_env(args.data_dir.clone());
    let dir = base.join("audit");
    let path = dir.join(FILE_NAME);
    // The current file is opened once: the listing and --follow read the
    // same handle, so no entry falls between them.
    let mut file = std::fs::File::open(&path)
        .with_context(|| format!("no audit log at {}", path.display()))?;
    let mut current = String::new();
    file.read_to_string(&mut current)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let complete = current.rfind('\n').map_or(0, |i| i + 1);
    let mut partial = current.split_off(complete);
    // The latest N entries: the current file's, then older files' (newest
    // first) until there are enough.
    let mut latest: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let take = |text: &str, latest: &mut std::collections::VecDeque<String>| {
        for l in text.lines().rev().filter(|l| !l.trim().is_empty()) {
            if latest.len() >= args.n {
                break;
            }
            latest.push_front(l.to_string());
        }
    };
    take(&current, &mut latest);
    let older =
        macula::audit_log::files(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for p in older.iter().rev().filter(|p| **p != path) {
        if latest.len() >= args.n {
            break;
        }
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        take(&text, &mut latest);
    }
    {
        let mut out = std::io::stdout().lock();
        if !args.json {
            writeln!(
                out,
                "{:>8}  {:<24}  {:<20}  DETAIL",
                "SEQ", "TIME (UTC)", "KIND"
            )?;
        }
        for l in &latest {
            print_entry(&mut out, l, args.json)?;
        }
        out.flush()?;
    }
    if !args.follow {
        return Ok(());
    }
    // A rotation renames audit.log: the open file is read to its end, then
    // the files written after it, oldest first (several rotations may have
    // happened between two looks), each from its start.
    use std::os::unix::fs::MetadataExt as _;
    loop {
        read_new_lines(&mut file, &mut partial, args.json)?;
        let ours = file.metadata()?.ino();
        let current = std::fs::metadata(&path).map(|m| m.ino()).ok();
        if current == Some(ours) {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let set = macula::audit_log::files(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?;
        let inodes: Vec<Option<u64>> = set
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.ino()).ok())
            .collect();
        let next = match inodes.iter().position(|i| *i == Some(ours)) {
            Some(at) => set.get(at + 1),
            None => {
                eprintln!(
                    "warning: the audit log rotated faster than it could be followed; \
                     some entries were rotated away unread"
                );
                set.first()
            }
        };
        let Some(next) = next else {
            // Renamed, the new audit.log not created yet.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        read_new_lines(&mut file, &mut partial, args.json)?;
        partial.clear();
        file =
            std::fs::File::open(next).with_context(|| format!("cannot open {}", next.display()))?;
    }
}

/// Prints the complete lines appended to `file` since the last call.
fn read_new_lines(
    file: &mut std::fs::File,
    partial: &mut String,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut buf = String::new();
    file.read_to_string(&mut buf)?;
    if buf.is_empty() {
        return Ok(());
    }
    partial.push_str(&buf);
    let mut out = std::io::stdout().lock();
    while let Some(i) = partial.find('\n') {
        let line: String = partial.drain(..=i).collect();
        if !line.trim().is_empty() {
            print_entry(&mut out, line.trim_end(), json)?;
        }
    }
    out.flush()?;
    Ok(())
}

fn print_entry(out: &mut impl std::io::Write, line: &str, json: bool) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{line}");
    }
    match serde_json::from_str::<macula::auth::audit::Entry>(line) {
        Ok(e) => {
            let time = crate::text::rfc3339(Duration::from_millis(e.time_ms));
            let detail = if e.kind == macula::auth::audit::CHECKPOINT {
                format!("signature {}...", e.detail.get(..16).unwrap_or(&e.detail))
            } else {
                e.detail
            };
            writeln!(
                out,
                "{:>8}  {:<24}  {:<20}  {}",
                e.seq, time, e.kind, detail
            )
        }
        Err(_) => writeln!(
            out,
            "{:>8}  {:<24}  {:<20}  {line}",
            "?", "?", "(unreadable)"
        ),
    }
}

/// One issued grant, as `grants.jsonl` keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Issued {
    serial: String,
    subject: String,
    rules: Vec<String>,
    roles: Vec<String>,
    issued_ms: u64,
    expires_ms: u64,
    token: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn realm_dir(args: &NameArgs) -> Result<PathBuf, Failure> {
    if args.name.is_empty()
        || args.name.len() > 64
        || !args
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        || args.name.starts_with('.')
    {
        return Err(crate::usage(anyhow!(
            "realm name {:?}: 1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.')",
            args.name
        )));
    }
    let base = crate::config::data_dir_or_env(args.data_dir.clone());
    Ok(base.join("realms").join(&args.name))
}

fn authority_path(dir: &Path) -> PathBuf {
    dir.join("authority.key")
}

/// The authority's signing key; `create` makes it if it does not exist.
pub(crate) fn authority(dir: &Path, create: bool) -> Result<SigningKey, Failure> {
    let path = authority_path(dir);
    if !create && !path.exists() {
        return Err(anyhow!(
            "no realm authority at {} (create one with `macula realm init`)",
            path.display()
        )
        .into());
    }
    let id = macula::Identity::load_or_create_file(&path)?;
    let key = SigningKey::from_pkcs8_der(&id.pkcs8_der())
        .map_err(|e| anyhow!("the key in {} does not load: {e}", path.display()))?;
    Ok(key)
}

pub fn parse_subject(s: &str) -> anyhow::Result<Subject> {
    let (kind, id) = s.split_once(':').ok_or_else(|| {
        anyhow!("subject {s:?}: expected node:<ID>, client:<KEY> or signer:<KEY>")
    })?;
    let key = || id.parse::<Key>().map_err(|e| anyhow!("subject {s:?}: {e}"));
    Ok(match kind {
        "node" => Subject::Node(
            id.parse::<NodeId>()
                .map_err(|e| anyhow!("subject {s:?}: {e}"))?,
        ),
        "client" => Subject::Client(key()?),
        "signer" => Subject::Signer(key()?),
        _ => bail!("subject {s:?}: expected node:<ID>, client:<KEY> or signer:<KEY>"),
    })
}

fn subject_text(s: &Subject) -> String {
    match s {
        Subject::Node(n) => format!("node:{n}"),
        Subject::Client(k) => format!("client:{k}"),
        Subject::Signer(k) => format!("signer:{k}"),
    }
}

/// `90d`, `12h`, `30m`, `300s`, `300`, `250ms`.
fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    if let Some(days) = s.strip_suffix('d') {
        let n: u64 = days
            .parse()
            .map_err(|_| anyhow!("--ttl {s:?}: expected a duration such as 90d, 12h, 30m"))?;
        return n
            .checked_mul(86_400)
            .map(Duration::from_secs)
            .ok_or_else(|| anyhow!("--ttl {s:?} is too long"));
    }
    crate::config::parse_duration(s).map_err(|e| anyhow!("--ttl {s:?}: {e}"))
}

fn parse_serial(s: &str) -> anyhow::Result<GrantId> {
    let mut id = [0u8; 16];
    if s.len() != 32 || !s.is_ascii() {
        bail!("serial {s:?}: expected 32 hex digits");
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| anyhow!("serial {s:?}: expected 32 hex digits"))?;
    }
    Ok(id)
}

fn read_token(arg: &str) -> anyhow::Result<Grant> {
    let text = match arg.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
        }
        None => arg.to_string(),
    };
    let bytes = TOKEN
        .decode(text.trim())
        .map_err(|e| anyhow!("not a grant token (base64): {e}"))?;
    Ok(Grant::from_bytes(&bytes)?)
}

fn token_of(g: &Grant) -> anyhow::Result<String> {
    Ok(TOKEN.encode(g.to_bytes()?))
}

/// The current revocation list of a realm, verified (none yet: version 0).
fn revocations(dir: &Path, realm: &Key) -> anyhow::Result<(Revocations, RevocationBody)> {
    let path = dir.join("revocations");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let list = RevocationList::from_bytes(&bytes)
                .with_context(|| format!("{} does not decode", path.display()))?;
            let r = list
                .verify(realm)
                .with_context(|| format!("{} does not verify", path.display()))?;
            let body = list.body()?;
            Ok((r, body))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((
            Revocations::default(),
            RevocationBody {
                realm: *realm,
                version: 0,
                issued_ms: 0,
                grants: Vec::new(),
                subjects: Vec::new(),
            },
        )),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn read_issued(dir: &Path) -> anyhow::Result<Vec<Issued>> {
    let path = dir.join("grants.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a grant record", path.display(), i + 1))
        })
        .collect()
}

pub fn run(cmd: RealmCommand) -> Result<(), Failure> {
    match cmd {
        RealmCommand::Init(args) => {
            let dir = realm_dir(&args)?;
            let existed = authority_path(&dir).exists();
            let key = authority(&dir, true)?;
            println!("{}", Key::of(&key));
            if existed {
                eprintln!(
                    "(the realm {} already had an authority: unchanged)",
                    args.name
                );
            }
            Ok(())
        }
        RealmCommand::Key(args) => {
            let key = authority(&realm_dir(&args)?, false)?;
            println!("{}", Key::of(&key));
            Ok(())
        }
        RealmCommand::Grant(args) => grant(args),
        RealmCommand::Revoke(args) => revoke(args),
        RealmCommand::List(args) => list(args),
        RealmCommand::Inspect(args) => inspect(args),
        RealmCommand::Apikey(args) => apikey(args),
        RealmCommand::Apikeys(args) => apikeys(args),
        RealmCommand::Push(args) => {
            let dir = realm_dir(&args.realm)?;
            let path = dir.join("revocations");
            if !path.exists() {
                return Err(crate::usage(anyhow!(
                    "realm {} has no revocation list yet (`macula realm revoke` makes one)",
                    args.realm.name
                )));
            }
            push(&revocations_file(&path)?, &args.http, &args.auth)
        }
    }
}

/// Posts a signed revocation list to each node's admin API; every node
/// answers, or the command fails naming the first that did not.
fn push(list: &[u8], targets: &[String], auth: &PushAuth) -> Result<(), Failure> {
    push_signed(
        list,
        targets,
        auth,
        "/admin/realm/revocations",
        "revocation list",
    )
}

/// Posts a signed realm document (`what`, at admin `path`) to each node's
/// admin API; every node answers `{outcome, version}`, or the command fails
/// naming the first that did not.
pub(crate) fn push_signed(
    bytes: &[u8],
    targets: &[String],
    auth: &PushAuth,
    path: &str,
    what: &str,
) -> Result<(), Failure> {
    let creds = crate::admin_cli::AuthArgs {
        admin_token_file: auth.admin_token_file.clone(),
        data_dir: auth.node_data_dir.clone(),
        admin_grant: auth.admin_grant.clone(),
        admin_key: auth.admin_key.clone(),
    };
    for target in targets {
        let mut t = crate::admin_cli::Target::parse(target)?;
        t.creds = crate::admin_cli::Credentials::resolve(&creds)?;
        let reply = t
            .request(
                "POST",
                path,
                Some(("application/octet-stream", bytes)),
                std::time::Duration::from_secs(10),
            )
            .with_context(|| format!("could not send the {what} to {target}"))?;
        if reply.status != 200 {
            return Err(anyhow!(
                "the node at {target} refused the {what} (HTTP {}): {}{}",
                reply.status,
                reply.body.trim(),
                crate::admin_cli::auth_hint(reply.status)
            )
            .into());
        }
        let r: macula::admin::RevocationsReport = serde_json::from_str(&reply.body)
            .with_context(|| format!("unexpected answer from {target}"))?;
        eprintln!("{target}: {} (version {})", r.outcome, r.version);
    }
    Ok(())
}

/// The realm's API keys file: `apikeys.jsonl`, one `ApiKeyEntry` a line
/// (the format gateways read).
fn apikeys_path(dir: &Path) -> PathBuf {
    dir.join("apikeys.jsonl")
}

fn read_apikeys(dir: &Path) -> anyhow::Result<Vec<ApiKeyEntry>> {
    let path = apikeys_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    // The gateway's own parser first: what is exported must load.
    ApiKeyStore::parse(&text).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            serde_json::from_str(l)
                .with_context(|| format!("{}: not an API key line", path.display()))
        })
        .collect()
}

fn apikey(args: ApiKeyArgs) -> Result<(), Failure> {
    let dir = realm_dir(&args.realm)?;
    let key = authority(&dir, false)?;
    let realm = Key::of(&key);
    let g = read_token(&args.grant).map_err(crate::usage)?;
    let (revoked, _) = revocations(&dir, &realm)?;
    let now = now_ms();
    let verified = g.verify(&realm, now, 0, &revoked).map_err(|e| {
        anyhow!(
            "the grant is not valid for realm {} ({}): {e}",
            args.realm.name,
            e.kind()
        )
    })?;
    let api_key = ApiKey::generate()?;
    let entry = ApiKeyEntry::new(&api_key, &g.to_bytes()?, &args.label, now)
        .map_err(|e| anyhow!("the grant does not encode: {e}"))?;
    append_line(&apikeys_path(&dir), &entry.to_line(), "the API key")?;
    realm_audit(
        &dir,
        &key,
        "apikey",
        &format!(
            "API key {} for {} (grant {})",
            api_key.hash().prefix(),
            subject_text(&verified.subject()),
            entry.serial
        ),
    )?;
    println!("{api_key}");
    eprintln!(
        "API key {} for {} (grant {}, until {} unix ms); shown only this once: the realm keeps its hash. \
         Give gateways the file `macula realm apikeys {} --export FILE` writes.",
        api_key.hash().prefix(),
        subject_text(&verified.subject()),
        entry.serial,
        verified.expires_ms(),
        args.realm.name,
    );
    Ok(())
}

fn apikeys(args: ApiKeysArgs) -> Result<(), Failure> {
    let dir = realm_dir(&args.realm)?;
    let key = authority(&dir, false)?;
    let realm = Key::of(&key);
    let entries = read_apikeys(&dir)?;
    if let Some(out) = &args.export {
        let mut text = String::new();
        for e in &entries {
            text.push_str(&e.to_line());
            text.push('\n');
        }
        if out.as_os_str() == "-" {
            print!("{text}");
        } else {
            write_atomic(out, text.as_bytes())?;
            eprintln!("{} API keys written to {}", entries.len(), out.display());
        }
        return Ok(());
    }
    let (revoked, _) = revocations(&dir, &realm)?;
    let now = now_ms();
    let mut rows = Vec::new();
    for e in entries {
        let (subject, state) = match read_token(&e.grant) {
            Err(err) => (String::new(), format!("malformed ({err})")),
            Ok(g) => (
                g.body()
                    .map(|b| subject_text(&b.subject))
                    .unwrap_or_default(),
                match g.verify(&realm, now, 0, &revoked) {
                    Ok(_) => "valid".to_string(),
                    Err(err) => err.kind().to_string(),
                },
            ),
        };
        let hash = e.hash.get(..12).unwrap_or(&e.hash).to_string();
        if args.json {
            let v = serde_json::json!({
                "label": e.label,
                "hash_prefix": hash,
                "serial": e.serial,
                "subject": subject,
                "created_ms": e.created_ms,
                "state": state,
            });
            println!("{v}");
        } else {
            rows.push([e.label, hash, e.serial, subject, state]);
        }
    }
    if !args.json {
        let header = ["LABEL", "HASH", "GRANT", "SUBJECT", "STATE"].map(String::from);
        crate::admin_cli::write_table(&mut std::io::stdout().lock(), &header, &rows)
            .context("cannot write to stdout")?;
    }
    Ok(())
}

fn grant(args: GrantArgs) -> Result<(), Failure> {
    let dir = realm_dir(&args.realm)?;
    let key = authority(&dir, false)?;
    let subject = parse_subject(&args.subject).map_err(crate::usage)?;
    let mut text = Vec::new();
    for r in &args.allow {
        text.push(format!("allow {r}"));
    }
    for r in &args.deny {
        text.push(format!("deny {r}"));
    }
    let rules = parse_rules(&text.join("\n")).map_err(|e| crate::usage(anyhow!(e)))?;
    if rules.is_empty() && !matches!(subject, Subject::Signer(_)) {
        return Err(crate::usage(anyhow!(
            "a grant without --allow allows nothing (nothing is allowed by default)"
        )));
    }
    let ttl = parse_ttl(&args.ttl).map_err(crate::usage)?;
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| anyhow!("no randomness for a serial: {e}"))?;
    let now = now_ms();
    let body = GrantBody {
        realm: Key::of(&key),
        issuer: Key::of(&key),
        id,
        subject,
        rules,
        roles: args.role.clone(),
        not_before_ms: now,
        expires_ms: now.saturating_add(ttl.as_millis() as u64),
    };
    let g = Grant {
        grant: sign(&body, &key)?,
        signer: None,
    };
    let token = token_of(&g)?;
    let record = Issued {
        serial: crate::hex(&id),
        subject: subject_text(&subject),
        rules: body.rules.iter().map(Rule::to_string).collect(),
        roles: body.roles.clone(),
        issued_ms: now,
        expires_ms: body.expires_ms,
        token: token.clone(),
    };
    let line = serde_json::to_string(&record).map_err(anyhow::Error::from)?;
    append_line(&dir.join("grants.jsonl"), &line, "the grant")?;
    realm_audit(
        &dir,
        &key,
        "grant",
        &format!(
            "grant {} for {} until {} (unix ms): {}",
            record.serial,
            record.subject,
            record.expires_ms,
            record.rules.join("; ")
        ),
    )?;
    println!("{token}");
    eprintln!(
        "grant {} for {} until {} (unix ms)",
        record.serial, record.subject, record.expires_ms
    );
    Ok(())
}

/// Appends `line` and a newline to the JSON-lines file at `path`.
fn append_line(path: &Path, line: &str, what: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
        .with_context(|| format!("cannot record {what} in {}", path.display()))
}

/// Appends one entry to the realm's own audit trail (`<realm dir>/audit/`,
/// checkpoints signed with the authority key): what this machine issued.
pub(crate) fn realm_audit(
    dir: &Path,
    key: &SigningKey,
    kind: &str,
    detail: &str,
) -> Result<(), Failure> {
    let log = macula::audit_log::AuditLog::open(
        &dir.join("audit"),
        key.clone(),
        macula::config::AuditLimits::default(),
    )
    .with_context(|| format!("cannot open the realm's audit trail in {}", dir.display()))?;
    log.record(kind, detail);
    log.close();
    Ok(())
}

fn revoke(args: RevokeArgs) -> Result<(), Failure> {
    let dir = realm_dir(&args.realm)?;
    let key = authority(&dir, false)?;
    let realm = Key::of(&key);
    if args.grant.is_empty() && args.subject.is_empty() {
        return Err(crate::usage(anyhow!(
            "name what to revoke: --grant SERIAL or --subject SUBJECT"
        )));
    }
    let (_, mut body) = revocations(&dir, &realm)?;
    for g in &args.grant {
        let id = parse_serial(g).map_err(crate::usage)?;
        if !body.grants.contains(&id) {
            body.grants.push(id);
        }
    }
    for s in &args.subject {
        let subject = parse_subject(s).map_err(crate::usage)?;
        if !body.subjects.contains(&subject) {
            body.subjects.push(subject);
        }
    }
    body.version += 1;
    body.issued_ms = now_ms();
    let list = RevocationList::sign(&body, &key)?;
    let path = dir.join("revocations");
    let bytes = list.to_bytes()?;
    write_atomic(&path, &bytes)?;
    realm_audit(
        &dir,
        &key,
        "revocation",
        &format!(
            "revocation list version {}: serials [{}], principals [{}]",
            body.version,
            body.grants
                .iter()
                .map(|g| crate::hex(g))
                .collect::<Vec<_>>()
                .join(", "),
            body.subjects
                .iter()
                .map(subject_text)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    println!("{}", path.display());
    eprintln!(
        "revocation list version {}: {} serials, {} principals",
        body.version,
        body.grants.len(),
        body.subjects.len()
    );
    push(&bytes, &args.push, &args.auth)
}

fn list(args: ListArgs) -> Result<(), Failure> {
    let dir = realm_dir(&args.realm)?;
    let key = authority(&dir, false)?;
    let realm = Key::of(&key);
    let (revoked, _) = revocations(&dir, &realm)?;
    let now = now_ms();
    let mut rows = Vec::new();
    for issued in read_issued(&dir)? {
        let state = match read_token(&issued.token)
            .map_err(|e| e.to_string())
            .and_then(|g| {
                g.verify(&realm, now, 0, &revoked)
                    .map_err(|e| e.kind().to_string())
            }) {
            Ok(_) => "valid".to_string(),
            Err(kind) => kind,
        };
        if args.json {
            let mut v = serde_json::to_value(&issued).map_err(anyhow::Error::from)?;
            v["state"] = serde_json::Value::String(state);
            println!("{v}");
        } else {
            rows.push([
                issued.serial,
                issued.subject,
                issued.rules.join("; "),
                state,
            ]);
        }
    }
    if !args.json {
        let header = ["SERIAL", "SUBJECT", "RULES", "STATE"].map(String::from);
        crate::admin_cli::write_table(&mut std::io::stdout().lock(), &header, &rows)
            .context("cannot write to stdout")?;
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<(), Failure> {
    let g = read_token(&args.token).map_err(crate::usage)?;
    let body = g
        .body()
        .map_err(|e| crate::usage(anyhow!("the grant does not decode: {e}")))?;
    let verdict = match &args.realm {
        None => None,
        Some(k) => {
            let realm: Key = k
                .parse()
                .map_err(|e| crate::usage(anyhow!("--realm: {e}")))?;
            Some(
                match g.verify(&realm, now_ms(), 0, &Revocations::default()) {
                    Ok(_) => "valid".to_string(),
                    Err(e) => format!("{} ({e})", e.kind()),
                },
            )
        }
    };
    if args.json {
        let v = serde_json::json!({
            "serial": crate::hex(&body.id),
            "realm": body.realm.to_string(),
            "issuer": body.issuer.to_string(),
            "subject": subject_text(&body.subject),
            "rules": body.rules.iter().map(Rule::to_string).collect::<Vec<_>>(),
            "roles": body.roles,
            "not_before_ms": body.not_before_ms,
            "expires_ms": body.expires_ms,
            "signed_by_signer": g.signer.is_some(),
            "verdict": verdict,
        });
        println!("{v}");
    } else {
        println!("serial:     {}", crate::hex(&body.id));
        println!("realm:      {}", body.realm);
        println!("issuer:     {}", body.issuer);
        println!("subject:    {}", subject_text(&body.subject));
        for r in &body.rules {
            println!("rule:       {r}");
        }
        for r in &body.roles {
            println!("role:       {r}");
        }
        println!(
            "valid:      {} .. {} (unix ms)",
            body.not_before_ms, body.expires_ms
        );
        if let Some(v) = &verdict {
            println!("verdict:    {v}");
        }
    }
    match verdict.as_deref() {
        Some(v) if v != "valid" => Err(Failure {
            code: 1,
            error: anyhow!("the grant is not valid for that realm: {v}"),
        }),
        _ => Ok(()),
    }
}

/// `macula authz check`: exit 0 when allowed, 1 when denied (with why).
pub fn check(args: CheckArgs) -> Result<(), Failure> {
    let realm: Key = args
        .realm
        .parse()
        .map_err(|e| crate::usage(anyhow!("--realm: {e}")))?;
    let g = read_token(&args.grant).map_err(crate::usage)?;
    let action: Action = args
        .action
        .parse()
        .map_err(|e| crate::usage(anyhow!("{e}")))?;
    let revoked = match &args.revocations {
        None => Revocations::default(),
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            RevocationList::from_bytes(&bytes)
                .and_then(|l| l.verify(&realm))
                .with_context(|| {
                    format!("{} is not a revocation list of that realm", path.display())
                })?
        }
    };
    let verified = g
        .verify(&realm, now_ms(), 0, &revoked)
        .map_err(|e| Failure {
            code: 1,
            error: anyhow!("denied: the grant is not valid ({}): {e}", e.kind()),
        })?;
    let req =
        macula::auth::Request::new(action, &args.resource).map_err(|e| crate::usage(anyhow!(e)))?;
    match verified.decide(&req) {
        Decision::Allow { rule } => {
            println!(
                "allowed: {req} for {} by `{rule}`",
                subject_text(&verified.subject())
            );
            Ok(())
        }
        Decision::Deny(why) => Err(Failure {
            code: 1,
            error: anyhow!(
                "denied: {req} for {}: {why} ({})",
                subject_text(&verified.subject()),
                why.kind()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_serials_and_ttls_parse() {
        let id = NodeId::from_bytes([3; 32]);
        let s = parse_subject(&format!("node:{id}")).expect("node");
        assert_eq!(subject_text(&s), format!("node:{id}"));
        assert!(parse_subject("node").is_err());
        assert!(parse_subject("robot:abc").is_err());
        assert!(parse_subject("client:xyz").is_err());
        let serial = [0xab; 16];
        assert_eq!(parse_serial(&crate::hex(&serial)).expect("serial"), serial);
        assert!(parse_serial("abc").is_err());
        assert!(parse_serial(&"zz".repeat(16)).is_err());
        assert_eq!(parse_ttl("2d").expect("d"), Duration::from_secs(172_800));
        assert_eq!(parse_ttl("90m").expect("m"), Duration::from_secs(5_400));
        assert!(parse_ttl("forever").is_err());
        assert!(parse_ttl(&format!("{}d", u64::MAX)).is_err());
    }
}
