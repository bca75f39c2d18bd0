//! `macula dht put|get|closest`: DHT operations from the command line.
//!
//! The CLI joins the mesh briefly as an ephemeral node bootstrapped through
//! `--connect`, runs one operation, prints the result and leaves. Records it
//! puts are signed by that ephemeral identity and live for their TTL (it is not
//! around to republish them). This module only parses, calls and prints.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use macula::{Node, NodeId};

use crate::config::{parse_duration, validate_realm, DEFAULT_REALM};

/// How long to wait to join the DHT through `--connect` before giving up.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Subcommand, Debug)]
pub enum DhtCommand {
    /// Store VALUE under KEY on the nodes closest to it.
    Put(PutArgs),
    /// Print every record stored under KEY (one per publisher).
    Get(GetArgs),
    /// Print the nodes closest to KEY.
    Closest(ClosestArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct MeshArgs {
    /// Node(s) to join through: HOST:PORT or NODEID@HOST:PORT, comma-separated
    #[arg(long, value_name = "ADDR[,ADDR...]", default_value = "127.0.0.1:4433")]
    pub connect: String,
    /// Realm of the mesh [env: MACULA_REALM] [default: default]
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,
    /// In a realm with an authority: this principal's grant token file
    /// (`macula realm grant`, for the node ID in --data-dir) [env: MACULA_GRANT_FILE]
    #[arg(long, value_name = "PATH")]
    pub grant_file: Option<PathBuf>,
    /// The realm authority's key (`macula realm key`); needed with
    /// --full-node in a realm with an authority [env: MACULA_REALM_AUTHORITY]
    #[arg(long, value_name = "KEY")]
    pub realm_authority: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub trace: crate::otlp::TraceArgs,
}

impl DhtCommand {
    /// The mesh flags of the subcommand.
    pub fn mesh(&self) -> &MeshArgs {
        match self {
            DhtCommand::Put(a) => &a.mesh,
            DhtCommand::Get(a) => &a.mesh,
            DhtCommand::Closest(a) => &a.mesh,
        }
    }
}

/// The grant token bytes from --grant-file or `MACULA_GRANT_FILE`.
pub fn grant(mesh: &MeshArgs) -> anyhow::Result<Option<Vec<u8>>> {
    let path = mesh.grant_file.clone().or_else(|| {
        std::env::var_os("MACULA_GRANT_FILE")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    match path {
        None => Ok(None),
        Some(p) => crate::tokens::grant_file(&p).map(Some).map_err(|e| e.error),
    }
}

/// The realm authority from --realm-authority or `MACULA_REALM_AUTHORITY`.
pub fn realm_authority(mesh: &MeshArgs) -> anyhow::Result<Option<macula::auth::Key>> {
    let text = mesh.realm_authority.clone().or_else(|| {
        std::env::var("MACULA_REALM_AUTHORITY")
            .ok()
            .filter(|s| !s.is_empty())
    });
    text.map(|t| {
        t.parse::<macula::auth::Key>()
            .map_err(|e| anyhow::anyhow!("invalid value {t:?} for --realm-authority: {e}"))
    })
    .transpose()
}

#[derive(clap::Args, Debug)]
pub struct PutArgs {
    /// Record name (hashed to a 256-bit DHT key).
    key: String,
    /// Value (UTF-8 text, stored as bytes).
    value: String,
    /// Lifetime: 30s, 10m, 1h ... (at most 24h)
    #[arg(long, default_value = "1h")]
    ttl: String,
    #[command(flatten)]
    mesh: MeshArgs,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// Record name.
    key: String,
    #[command(flatten)]
    mesh: MeshArgs,
}

#[derive(clap::Args, Debug)]
pub struct ClosestArgs {
    /// Record name, or a node ID with --node.
    key: String,
    /// KEY is a node ID, not a record name.
    #[arg(long)]
    node: bool,
    /// How many nodes to print.
    #[arg(short, long, default_value_t = 20)]
    n: usize,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// The result of a command: exit code 0, or 1 with a message.
pub enum Outcome {
    Ok,
    NotFound(String),
}

/// Joins the mesh as a short-lived node through `--connect` and waits until
/// it is part of the DHT (shared by the `dht`, `pub` and `sub` commands).
pub async fn join(mesh: &MeshArgs) -> anyhow::Result<Node> {
    join_with(
        mesh,
        Node::builder().listen(SocketAddr::from(([0, 0, 0, 0], 0))),
    )
    .await
}

/// `join` with a builder carrying more settings (listen address, identity).
pub async fn join_with(mesh: &MeshArgs, builder: macula::NodeBuilder) -> anyhow::Result<Node> {
    let realm = realm(mesh)?;
    let peers: Vec<&str> = mesh.connect.split(',').map(str::trim).collect();
    let mut builder = builder.realm(realm).bootstrap(peers);
    match (realm_authority(mesh)?, grant(mesh)?) {
        (Some(authority), grant) => builder = builder.realm_authority(authority, grant),
        (None, Some(_)) => anyhow::bail!(
            "a full node needs --realm-authority with --grant-file (the realm the grant is for)"
        ),
        (None, None) => {}
    }
    let node = builder.start().await?;
    match tokio::time::timeout(JOIN_TIMEOUT, node.dht().wait_bootstrapped()).await {
        Ok(Ok(())) => Ok(node),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            node.shutdown().await;
            anyhow::bail!(
                "could not join the mesh through {} within {JOIN_TIMEOUT:?}",
                mesh.connect
            )
        }
    }
}

/// The realm from `--realm`, else `MACULA_REALM`, else the default.
pub fn realm(mesh: &MeshArgs) -> anyhow::Result<String> {
    let realm = mesh
        .realm
        .clone()
        .or_else(|| std::env::var("MACULA_REALM").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_REALM.to_string());
    validate_realm(&realm)
        .map_err(|e| anyhow::anyhow!("invalid value {realm:?} for --realm: {e}"))?;
    Ok(realm)
}

pub async fn run(cmd: DhtCommand) -> anyhow::Result<Outcome> {
    match cmd {
        DhtCommand::Put(a) => {
            let ttl = parse_duration(&a.ttl)
                .map_err(|e| anyhow::anyhow!("invalid value {:?} for --ttl: {e}", a.ttl))?;
            let node = join(&a.mesh).await?;
            let key = macula::dht_key(a.key.as_bytes());
            let res = node.dht().put(key, a.value.into_bytes(), ttl).await;
            node.shutdown().await;
            let replicas = res.with_context(|| format!("put {:?} failed", a.key))?;
            let mut out = std::io::stdout().lock();
            if a.mesh.json {
                let v = serde_json::json!({
                    "key": a.key,
                    "dht_key": key.to_string(),
                    "ttl_secs": ttl.as_secs(),
                    "replicas": replicas.iter().map(ToString::to_string).collect::<Vec<_>>(),
                });
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "stored {:?} on {} nodes", a.key, replicas.len())?;
                for r in replicas {
                    writeln!(out, "  {r}")?;
                }
            }
            Ok(Outcome::Ok)
        }
        DhtCommand::Get(a) => {
            let node = join(&a.mesh).await?;
            let key = macula::dht_key(a.key.as_bytes());
            let res = node.dht().get(key).await;
            node.shutdown().await;
            let records = res.with_context(|| format!("get {:?} failed", a.key))?;
            let mut out = std::io::stdout().lock();
            if a.mesh.json {
                let v: Vec<_> = records
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "publisher": r.publisher.to_string(),
                            "seq": r.seq,
                            "ttl_secs": r.ttl.as_secs(),
                            "value": String::from_utf8_lossy(&r.value),
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(v))?;
            } else {
                for r in &records {
                    writeln!(
                        out,
                        "{}\tseq={}\tttl={}s\t{}",
                        r.publisher,
                        r.seq,
                        r.ttl.as_secs(),
                        String::from_utf8_lossy(&r.value)
                    )?;
                }
            }
            if records.is_empty() {
                return Ok(Outcome::NotFound(format!("no records for {:?}", a.key)));
            }
            Ok(Outcome::Ok)
        }
        DhtCommand::Closest(a) => {
            let key = if a.node {
                a.key
                    .parse::<NodeId>()
                    .map_err(|e| anyhow::anyhow!("invalid node ID {:?}: {e}", a.key))?
            } else {
                macula::dht_key(a.key.as_bytes())
            };
            let node = join(&a.mesh).await?;
            let res = node.dht().closest(key, a.n).await;
            node.shutdown().await;
            let found = res.context("lookup failed")?;
            let mut out = std::io::stdout().lock();
            if a.mesh.json {
                let v: Vec<_> = found
                    .iter()
                    .map(|(id, addr)| serde_json::json!({"node_id": id.to_string(), "addr": addr}))
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(v))?;
            } else {
                for (id, addr) in &found {
                    writeln!(out, "{id}\t{addr}")?;
                }
            }
            Ok(Outcome::Ok)
        }
    }
}
