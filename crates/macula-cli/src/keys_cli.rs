//! `macula keys rotate|status`: a realm's end-to-end key set (issue 19;
//! formats in `macula::auth::keys`, PROTOCOL.md section 5.11).
//!
//! The realm authority keeps the current signed set in
//! `<data dir>/realms/<NAME>/keyset`; `rotate` makes the next version (a
//! new key for a pattern, wrapped with HPKE to each member's Ed25519 key)
//! and sends it to running nodes (`--http`), which spread it through the
//! mesh and to their clients. `status` shows what a node holds.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use macula::auth::keys::{hex, rotate, KeySet, KeySetBody, PatternKind, Rotation};
use macula::auth::Key;

use crate::realm_cli::{authority, realm_audit, realm_dir, NameArgs, PushAuth};
use crate::Failure;

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Rotate the end-to-end key of PATTERN (the first rotation starts
    /// encrypting it): a new key wrapped to the pattern's members (those of
    /// its current key, plus --member, minus --revoke), active after
    /// --activate-in; the old key is still accepted for --grace.
    Rotate(RotateArgs),
    /// The end-to-end key set a running node holds: each pattern's keys,
    /// whether the node holds them, and the patterns due for rotation.
    Status(crate::admin_cli::ReadArgs),
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    /// The topic pattern (`orders.**`), or with --procedure the procedure
    /// pattern (`billing.**`); omit with --due.
    pub pattern: Option<String>,
    /// PATTERN names procedures (RPC arguments and replies are sealed),
    /// not topics. Its members are the principals granted `call` or
    /// `advertise` on it.
    #[arg(long)]
    pub procedure: bool,
    /// The realm's name (as `macula realm init` made it).
    #[arg(long, value_name = "NAME")]
    pub realm: String,
    /// Directory holding realms/ [env: MACULA_DATA_DIR] [default: <user data dir>/macula]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A member's Ed25519 key (what `macula keys status` prints as the
    /// node's member key): it gets the new key. Repeatable.
    #[arg(long = "member", value_name = "KEY")]
    pub members: Vec<String>,
    /// A member to leave out (revoked): it gets no key from now on. Repeatable.
    #[arg(long = "revoke", value_name = "KEY")]
    pub revoke: Vec<String>,
    /// When publishers start using the new key (time for it to reach
    /// every member first).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = crate::config::parse_duration)]
    pub activate_in: Duration,
    /// How long the superseded key is still accepted after the new one is
    /// active (messages in flight).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = crate::config::parse_duration)]
    pub grace: Duration,
    /// The pattern's rotation schedule (`24h`; `0` for none): `keys status`
    /// lists it as due after that, and `keys rotate --due` rotates it.
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub every: Option<Duration>,
    /// Rotate every pattern whose schedule is due (for a cron job).
    #[arg(long, conflicts_with = "pattern")]
    pub due: bool,
    /// Admin HTTP address of a node to send the new set to (any one node
    /// spreads it). Repeatable.
    #[arg(long = "http", value_name = "HOST:PORT")]
    pub http: Vec<String>,
    #[command(flatten)]
    pub auth: PushAuth,
}

pub fn run(cmd: KeysCommand) -> Result<(), Failure> {
    match cmd {
        KeysCommand::Rotate(args) => rotate_cmd(args),
        KeysCommand::Status(args) => status(args),
    }
}

fn parse_keys(list: &[String], what: &str) -> Result<Vec<Key>, Failure> {
    list.iter()
        .map(|k| {
            k.parse::<Key>()
                .map_err(|_| crate::usage(anyhow!("{what} {k:?} is not an Ed25519 key")))
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rotate_cmd(args: RotateArgs) -> Result<(), Failure> {
    let names = NameArgs {
        name: args.realm.clone(),
        data_dir: args.data_dir.clone(),
    };
    let dir = realm_dir(&names)?;
    let key = authority(&dir, false)?;
    let realm = Key::of(&key);
    let path = dir.join("keyset");
    let prev: Option<KeySetBody> = match std::fs::read(&path) {
        Ok(bytes) => Some(
            KeySet::from_bytes(&bytes)
                .and_then(|s| s.verify(&realm))
                .with_context(|| format!("{} is not this realm's key set", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display()).into()),
    };
    let now = now_ms();
    let kind = if args.procedure {
        PatternKind::Procedure
    } else {
        PatternKind::Topic
    };
    let patterns: Vec<(String, PatternKind)> = if args.due {
        prev.iter()
            .flat_map(|b| b.patterns.iter())
            .filter(|p| {
                p.rotate_every_ms > 0
                    && p.generations
                        .last()
                        .is_some_and(|g| now.saturating_sub(g.active_from_ms) >= p.rotate_every_ms)
            })
            .map(|p| (p.pattern.clone(), p.kind))
            .collect()
    } else {
        match &args.pattern {
            Some(p) => vec![(p.clone(), kind)],
            None => {
                return Err(crate::usage(anyhow!(
                    "name a PATTERN to rotate, or --due for those whose schedule is due"
                )))
            }
        }
    };
    if patterns.is_empty() {
        eprintln!("no pattern is due for rotation");
        return Ok(());
    }
    let add = parse_keys(&args.members, "--member")?;
    let revoke = parse_keys(&args.revoke, "--revoke")?;
    let mut body = prev;
    let mut made = Vec::new();
    for (pattern, kind) in &patterns {
        let mut members: Vec<Key> = body
            .iter()
            .flat_map(|b| b.patterns.iter())
            .filter(|p| &p.pattern == pattern && p.kind == *kind)
            .filter_map(|p| p.generations.last())
            .flat_map(|g| g.wrapped.iter().map(|w| w.to))
            .collect();
        members.extend(add.iter().copied());
        members.retain(|m| !revoke.contains(m));
        members.sort();
        members.dedup();
        if members.is_empty() {
            return Err(crate::usage(anyhow!(
                "pattern {pattern:?} would have no member: give --member KEY (a node's member key, from `macula keys status`)"
            )));
        }
        let r = Rotation {
            pattern: pattern.clone(),
            kind: *kind,
            members: members.clone(),
            now_ms: now,
            activate_in_ms: args.activate_in.as_millis() as u64,
            grace_ms: args.grace.as_millis() as u64,
            rotate_every_ms: args.every.map(|d| d.as_millis() as u64),
        };
        let (next, id) = rotate(body.take(), realm, &r, &mut macula::admin::SysRng)
            .map_err(|e| anyhow!("cannot rotate {pattern:?}: {e}"))?;
        made.push((pattern.clone(), *kind, hex(&id), members.len()));
        body = Some(next);
    }
    let body = body.ok_or_else(|| anyhow!("nothing was rotated"))?;
    let bytes = KeySet::sign(&body, &key)
        .and_then(|s| s.to_bytes())
        .map_err(|e| anyhow!("cannot sign the key set: {e}"))?;
    let tmp = dir.join("keyset.tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))?;
    for (pattern, kind, id, n) in &made {
        realm_audit(
            &dir,
            &key,
            "keys_rotate",
            &format!(
                "key {id} for {} {pattern} (key set version {}), wrapped to {n} members, revoked {}",
                kind.name(),
                body.version,
                revoke.len()
            ),
        )?;
        println!("{pattern} {id}");
        eprintln!(
            "{} {pattern}: key {id} (key set version {}), {n} members, active in {:?}, the old key accepted {:?} longer",
            kind.name(),
            body.version,
            args.activate_in,
            args.grace
        );
    }
    push(&bytes, &args.http, &args.auth)
}

/// Posts the signed key set to each node's admin API.
fn push(set: &[u8], targets: &[String], auth: &PushAuth) -> Result<(), Failure> {
    crate::realm_cli::push_signed(set, targets, auth, "/admin/realm/keys", "key set")
}

fn status(args: crate::admin_cli::ReadArgs) -> Result<(), Failure> {
    let t = crate::admin_cli::Target::of(&args)?;
    let path = "/admin/realm/keys";
    let body = t.get_ok(path)?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let r: macula::admin::KeysReport = t.decode(path, &body)?;
    println!("key set version {}  member key {}", r.version, r.member_key);
    let header = [
        "PATTERN",
        "KIND",
        "GEN",
        "KEY ID",
        "ACTIVE FROM",
        "RETIRES",
        "HELD",
        "MEMBERS",
    ]
    .map(String::from);
    let rows: Vec<[String; 8]> = r
        .keys
        .iter()
        .map(|k| {
            [
                k.pattern.clone(),
                k.kind.name().to_string(),
                k.number.to_string(),
                k.key_id.clone(),
                k.active_from_ms.to_string(),
                k.retire_at_ms.map_or("-".into(), |t| t.to_string()),
                if k.held { "yes" } else { "no" }.into(),
                k.members.to_string(),
            ]
        })
        .collect();
    crate::admin_cli::write_table(&mut std::io::stdout(), &header, &rows)
        .context("cannot write to stdout")?;
    if !r.due.is_empty() {
        println!("due for rotation: {}", r.due.join(", "));
    }
    Ok(())
}
