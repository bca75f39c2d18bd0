//! The `macula` binary: the daemon (`macula start`) and the CLI.
//!
//! A thin clap shell: it layers configuration (`config.rs`), sets up logging
//! and calls into the `macula` crate. CLI output goes to stdout; logs go to
//! stderr through `tracing`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error,
//! 3 a compare-and-swap whose comparison failed (`macula kv cas`).

mod admin_cli;
mod bench;
mod bench_authz;
mod bench_connections;
mod bench_crdt;
mod bench_e2e;
mod bench_kv;
mod bench_mqtt;
mod bench_proofs;
mod bench_pubsub;
mod bench_relay;
mod bench_rpc;
mod bench_stats;
mod bench_stream;
mod bench_tracing;
#[cfg(feature = "wasm")]
mod bench_upgrade;
#[cfg(feature = "wasm")]
mod bench_wasm;
mod config;
#[cfg(feature = "wasm")]
mod deploy_cli;
mod dht_cli;
mod keys_cli;
mod member;
mod otlp;
#[cfg(feature = "otlp")]
mod otlp_encode;
mod pubsub_cli;
mod raft_cli;
mod realm_cli;
mod rpc_cli;
mod stream_cli;
mod text;
mod tokens;
mod trust_cli;
#[cfg(feature = "wasm")]
mod workload_cli;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use macula::config::{
    AdminAuthConfig, AuditLimits, DashboardLimits, IdentitySource, Limits, NodeConfig,
    PubSubLimits, RaftLimits, RelayLimits, TlsMode, TlsOptions,
};
use macula::{Identity, Node};

use crate::config::{LogFormat, NodeArgs, Settings, TlsModeSetting};

/// Macula: a zero-config application mesh over QUIC.
#[derive(Parser, Debug)]
#[command(name = "macula", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node in the foreground (zero config: `macula start`).
    Start(Box<NodeArgs>),
    /// Print this node's ID, creating the identity if it does not exist.
    Identity(IdentityArgs),
    /// Run a benchmark and print its figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// List the peers a running node is connected to (reads its admin HTTP API).
    Nodes(admin_cli::NodesArgs),
    /// Show a running node's health; exit code 1 unless it is ready.
    Health(admin_cli::ReadArgs),
    /// Show what a running node knows of its NAT (mapping, filtering, reflexive addresses) and its direct rate.
    Nat(admin_cli::ReadArgs),
    /// Show a running node's metrics as a table (--raw for Prometheus text).
    Metrics(admin_cli::MetricsArgs),
    /// Publish messages to a topic (joins through --connect).
    Pub(pubsub_cli::PubArgs),
    /// Subscribe to a pattern and print one line per event (joins through --connect).
    Sub(pubsub_cli::SubArgs),
    /// Follow the messages matching a pattern: one line each with the receive time (UTC), publisher and trace ID if any (joins through --connect).
    Trace(pubsub_cli::SubArgs),
    /// Call a procedure and print the reply (joins through --connect).
    Call(rpc_cli::CallArgs),
    /// Advertise a procedure and answer calls until interrupted (joins through --connect).
    Serve(rpc_cli::ServeArgs),
    /// List the procedures advertised in the mesh and their providers (reads a node's admin HTTP API).
    Services(admin_cli::ReadArgs),
    /// Put and get DHT records, find the closest nodes (joins through --connect).
    #[command(subcommand)]
    Dht(dht_cli::DhtCommand),
    /// Raft groups of a running node: status, members, membership changes (through its admin HTTP API).
    #[command(subcommand)]
    Raft(raft_cli::RaftCommand),
    /// Durable streams of a running node: add, ls, info, edit, purge, rm, pub, get, sub (through its admin HTTP API).
    #[command(subcommand)]
    Stream(stream_cli::StreamCommand),
    /// Consumers of a node's streams: add, ls, info, rm, next (through its admin HTTP API).
    #[command(subcommand)]
    Consumer(stream_cli::ConsumerCommand),
    /// A Raft group's consistent key-value store: get, put, del, ls, cas, watch (through a member's admin HTTP API).
    #[command(subcommand, after_help = raft_cli::KV_EXIT_CODES)]
    Kv(raft_cli::KvCommand),
    /// A realm authority: its key, the grants it issues, revocations (offline, on this machine's files).
    #[command(subcommand)]
    Realm(realm_cli::RealmCommand),
    /// End-to-end payload keys of a realm: rotate a pattern's key (as its authority), show what a node holds.
    #[command(subcommand)]
    Keys(keys_cli::KeysCommand),
    /// Explain an authorization decision: exit 0 if allowed, 1 if denied (with the reason).
    #[command(subcommand)]
    Authz(AuthzCommand),
    /// Audit logs: verify a hash chain and its signed checkpoints.
    #[command(subcommand)]
    Audit(realm_cli::AuditCommand),
    /// Trust on first use in an open realm: the node IDs pinned to configured addresses.
    #[command(subcommand)]
    Trust(trust_cli::TrustCommand),
    /// WebAssembly workloads (cargo feature `wasm`): run a component on a node.
    #[cfg(feature = "wasm")]
    #[command(subcommand)]
    Workload(workload_cli::WorkloadCommand),
    /// Deploy a WebAssembly workload's version to the mesh: stored on the node, fetched by the others from their peers; a first version is placed and started (through its admin HTTP API).
    #[cfg(feature = "wasm")]
    Deploy(deploy_cli::DeployArgs),
    /// Roll a deployed version out: rolling, canary or all-at-once, health checks, rollback; status, history, promote, abort.
    #[cfg(feature = "wasm")]
    Upgrade(deploy_cli::UpgradeCommand),
}

#[derive(Subcommand, Debug)]
enum AuthzCommand {
    /// Check whether a grant allows ACTION on RESOURCE, and say why.
    Check(realm_cli::CheckArgs),
}

#[derive(clap::Args, Debug)]
struct IdentityArgs {
    /// Directory holding node.key [env: MACULA_DATA_DIR] [default: <user data dir>/macula]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of the bare node ID.
    #[arg(long)]
    json: bool,
}

/// An error with the exit code it deserves.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            error: e.into(),
        }
    }
}

fn usage(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: error.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let env = |k: &str| std::env::var(k).ok();
    match cli.command {
        Command::Start(args) => {
            let settings =
                config::resolve(&args, &env).map_err(|e| usage(anyhow::anyhow!("{e}")))?;
            let trace = otlp::TraceArgs {
                otlp: settings.otlp.clone(),
                trace_sample: settings.trace_sample,
            };
            let _trace = otlp::init(settings.log_format, "info", &trace).map_err(usage)?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(start(settings))
        }
        Command::Identity(args) => {
            let dir = args
                .data_dir
                .or_else(|| {
                    env("MACULA_DATA_DIR")
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                })
                .unwrap_or_else(config::default_data_dir);
            let identity = Identity::load_or_create(&dir)?;
            let mut out = std::io::stdout().lock();
            if args.json {
                let v = serde_json::json!({
                    "node_id": identity.node_id().to_string(),
                    "public_key": hex(&identity.public_key()),
                    // What `macula keys rotate --member` takes.
                    "member_key": macula::auth::Key(identity.public_key()).to_string(),
                    "key_file": dir.join(macula::config::KEY_FILE_NAME),
                });
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "{}", identity.node_id())?;
            }
            Ok(())
        }
        Command::Bench(cmd) => {
            // Per-connection logs would drown the figures; RUST_LOG still wins.
            let _trace =
                otlp::init(LogFormat::Text, "warn", &bench::trace_args(&cmd)?).map_err(usage)?;
            raise_fd_limit();
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(bench::run(cmd))?;
            Ok(())
        }
        Command::Pub(args) => Ok(client(&args.mesh.trace.clone(), pubsub_cli::publish(args))?),
        Command::Sub(args) => Ok(client(
            &args.mesh.trace.clone(),
            pubsub_cli::subscribe(args),
        )?),
        Command::Dht(cmd) => match client(&cmd.mesh().trace.clone(), dht_cli::run(cmd))? {
            dht_cli::Outcome::Ok => Ok(()),
            dht_cli::Outcome::NotFound(what) => Err(Failure {
                code: 1,
                error: anyhow::anyhow!(what),
            }),
        },
        Command::Trace(args) => Ok(client(&args.mesh.trace.clone(), pubsub_cli::trace(args))?),
        Command::Call(args) => match client(&args.mesh.trace.clone(), rpc_cli::call(args))? {
            rpc_cli::CallOutcome::Ok => Ok(()),
            rpc_cli::CallOutcome::Failed(why) => Err(Failure {
                code: 1,
                error: anyhow::anyhow!(why),
            }),
        },
        Command::Serve(args) => Ok(client(&args.mesh.trace.clone(), async {
            let signals = Signals::install()?;
            rpc_cli::serve(args, signals.wait()).await
        })?),
        Command::Services(args) => admin_cli::services(&args),
        Command::Nodes(args) => admin_cli::nodes(&args),
        Command::Health(args) => admin_cli::health(&args),
        Command::Nat(args) => admin_cli::nat(&args),
        Command::Metrics(args) => admin_cli::metrics(&args),
        Command::Raft(cmd) => raft_cli::raft(&cmd),
        Command::Kv(cmd) => raft_cli::kv(&cmd),
        Command::Stream(cmd) => stream_cli::stream(cmd),
        Command::Consumer(cmd) => stream_cli::consumer(cmd),
        Command::Realm(cmd) => realm_cli::run(cmd),
        Command::Keys(cmd) => keys_cli::run(cmd),
        Command::Authz(AuthzCommand::Check(args)) => realm_cli::check(args),
        Command::Audit(cmd) => realm_cli::audit(cmd),
        Command::Trust(cmd) => trust_cli::run(cmd),
        #[cfg(feature = "wasm")]
        Command::Deploy(args) => deploy_cli::deploy(args),
        #[cfg(feature = "wasm")]
        Command::Upgrade(cmd) => deploy_cli::upgrade(cmd),
        #[cfg(feature = "wasm")]
        Command::Workload(workload_cli::WorkloadCommand::Run(args)) => {
            Ok(client(&args.mesh.trace.clone(), async {
                let signals = Signals::install()?;
                workload_cli::run(args, signals.wait()).await
            })?)
        }
    }
}

/// Runs a mesh client command (`pub`, `sub`, `call`...) on a fresh runtime,
/// logging warnings only (`RUST_LOG` still wins).
fn client<T>(
    trace: &otlp::TraceArgs,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let _trace = otlp::init(LogFormat::Text, "warn", trace)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(fut)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Maps layered settings onto the runtime's typed configuration.
fn node_config(s: &Settings) -> Result<NodeConfig, Failure> {
    let mode = match s.tls_mode {
        TlsModeSetting::SelfCertifying => TlsMode::SelfCertifying,
        TlsModeSetting::Ca => {
            let (Some(ca), Some(cert)) = (&s.tls_ca_cert_file, &s.tls_cert_file) else {
                return Err(usage(anyhow::anyhow!(
                    "TLS mode \"ca\" needs --tls-ca-cert-file and --tls-cert-file"
                )));
            };
            TlsOptions::ca_from_files(ca, cert).map_err(usage)?
        }
    };
    let limits = Limits {
        max_frame_size: s.max_frame_size,
        max_connections: s.max_connections,
        idle_timeout: s.idle_timeout,
        pubsub_stall_timeout: s.pubsub_stall_timeout,
        dht_snapshot_interval: s.dht_snapshot_interval,
        dht_request_timeout: s.dht_request_timeout,
        peer_down_after: s.peer_down_after,
        // A longer bound than the default ceiling raises the ceiling too.
        peer_down_after_max: s
            .peer_down_after
            .max(macula::config::Limits::default().peer_down_after_max),
        peer_slots: s.peer_slots,
        stream_receive_window: s.stream_receive_window,
        connection_receive_window: s.connection_receive_window,
        send_window: s.send_window,
        socket_buffer: s.socket_buffer,
        max_streams_per_client: s.max_streams_per_client,
        ..Limits::default()
    };
    Ok(NodeConfig {
        listen: s.listen,
        realm: s.realm.clone(),
        bootstrap: s.bootstrap.clone(),
        identity: IdentitySource::DataDir(s.data_dir.clone()),
        tls: TlsOptions {
            mode,
            pinned: s.tls_pinned.clone(),
        },
        limits,
        capabilities: Vec::new(),
        rpc: Default::default(),
        pubsub: PubSubLimits {
            queue_capacity: s.pubsub_queue_capacity,
            queue_bytes: s.pubsub_queue_bytes,
            peer_queue_capacity: s.pubsub_peer_queue_capacity,
            peer_queue_bytes: s.pubsub_peer_queue_bytes,
            ..Default::default()
        },
        relay: RelayLimits {
            max_sessions: s.relay_max_sessions,
            max_reservations: s.relay_max_reservations,
            bytes_per_second: s.relay_bytes_per_second,
            idle_timeout: s.relay_idle_timeout,
            ..Default::default()
        },
        raft: RaftLimits {
            max_groups: s.raft_max_groups,
            request_timeout: s.raft_timeout,
            election_min: s.raft_election_timeout,
            // A quarter of the election timeout: several heartbeats fit in
            // one, so one lost heartbeat does not start an election.
            heartbeat: s.raft_election_timeout / 4,
            proposals_in_flight: s.raft_proposals_in_flight,
            ..RaftLimits::default()
        },
        streams: macula::config::StreamLimits {
            max_streams: s.max_streams,
            write_queue_bytes: s.stream_write_queue,
            write_queue_timeout: s.stream_write_timeout,
            ..Default::default()
        },
        reachability: s.reachability,
        nat: macula::config::NatLimits {
            max_observations: s.nat_max_observations,
            punch: s.hole_punch,
            ..Default::default()
        },
        trust: macula::config::TrustLimits {
            enabled: s.trust_max_pins > 0,
            max_pins: s.trust_max_pins,
        },
        admission: match (s.realm_authority, &s.grant_file, &s.revocations_file) {
            (None, _, _) if s.api_keys.is_some() => {
                return Err(usage(anyhow::anyhow!(
                "--api-keys needs --realm-authority (the realm whose grants the keys are bound to)"
            )))
            }
            (None, None, None) => None,
            (None, _, _) => {
                return Err(usage(anyhow::anyhow!(
                    "--grant-file and --revocations need --realm-authority (the realm they are for)"
                )))
            }
            (Some(authority), grant, revocations) => {
                let mut admission = macula::config::Admission::new(
                    authority,
                    grant.as_deref().map(tokens::grant_file).transpose()?,
                );
                admission.revocations = revocations
                    .as_deref()
                    .map(tokens::revocations_file)
                    .transpose()?;
                admission.api_keys = s
                    .api_keys
                    .as_deref()
                    .map(macula::apikey::ApiKeyStore::load)
                    .transpose()
                    .map_err(usage)?;
                admission.api_key_limits = macula::apikey::ApiKeyLimits {
                    max_failures_per_address: s.api_key_max_failures,
                    max_failures_per_realm: s.api_key_realm_max_failures,
                    window: s.api_key_failure_window,
                    max_tracked_addresses: s.api_key_max_tracked,
                };
                Some(admission)
            }
        },
        admin_auth: AdminAuthConfig {
            token_file: s.admin_token_file.clone(),
            request_window: s.admin_request_window,
            max_failures: u32::try_from(s.admin_max_failures).unwrap_or(u32::MAX),
            failure_window: s.admin_failure_window,
            failure_sources_max: s.admin_failure_sources,
            replay_cache_max: s.admin_replay_cache,
        },
        dashboard: DashboardLimits {
            max_streams: s.dashboard_max_streams,
            interval: s.dashboard_interval,
            max_peers: s.dashboard_max_peers,
            ..DashboardLimits::default()
        },
        audit: AuditLimits {
            max_bytes: s.audit_max_bytes,
            files: s.audit_files,
            checkpoint_every: s.audit_checkpoint_every as u64,
            checkpoint_interval: s.audit_checkpoint_interval,
            ..AuditLimits::default()
        },
        mqtt: macula::config::MqttConfig {
            listen: s.mqtt,
            tls: match (s.mqtt_tls, &s.mqtt_cert_file, &s.mqtt_key_file) {
                (false, None, None) => None,
                (false, _, _) => {
                    return Err(usage(anyhow::anyhow!(
                        "--mqtt-cert-file and --mqtt-key-file need --mqtt-tls on"
                    )))
                }
                (true, None, None) => Some(macula::config::MqttTls::NodeCertificate),
                (true, Some(cert), Some(key)) => Some(macula::config::MqttTls::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                (true, _, _) => {
                    return Err(usage(anyhow::anyhow!(
                        "--mqtt-cert-file and --mqtt-key-file go together"
                    )))
                }
            },
            users: s.mqtt_users.clone(),
            limits: macula::config::MqttLimits {
                max_clients: s.mqtt_max_clients,
                max_sessions: s.mqtt_max_sessions,
                max_packet_size: s.mqtt_max_packet_size,
                max_inflight: s.mqtt_max_inflight,
                queue_len: s.mqtt_queue_len,
                max_subscriptions: s.mqtt_max_subscriptions,
                max_retained: s.mqtt_max_retained,
                max_retained_bytes: s.mqtt_max_retained_bytes,
                session_expiry_max: macula::config::MqttMillis::from_duration(
                    s.mqtt_session_expiry,
                ),
            },
        },
    })
}

/// Raises the soft limit on open files to the hard limit, where allowed.
/// QUIC connections share the node's one UDP socket, so this is for what
/// does take a descriptor each: admin HTTP connections, files, and the
/// benchmark's client sockets.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `lim`, which
    // lives for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    match unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } {
        0 => tracing::debug!(
            from = before,
            to = lim.rlim_max,
            "raised the open-file limit"
        ),
        _ => tracing::debug!(
            limit = before,
            error = %std::io::Error::last_os_error(),
            "could not raise the open-file limit"
        ),
    }
}

async fn start(settings: Settings) -> Result<(), Failure> {
    raise_fd_limit();
    // Install signal handlers before anything is visible, so a SIGTERM sent
    // as soon as the banner appears still gets a graceful shutdown.
    let signals = Signals::install()?;
    let config = node_config(&settings)?;
    // Bind the admin port before the node joins, so a busy port fails fast.
    let http = tokio::net::TcpListener::bind(settings.http)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin HTTP on {}: {e}", settings.http))?;
    let http_addr = http.local_addr()?;
    // A daemon starts whether or not its seeds answer yet, and keeps
    // trying; `/ready` says when it joined.
    let node = Node::builder()
        .config(config)
        .wait_for_join(None)
        .start()
        .await
        .map_err(|e| match e {
            macula::Error::Config { .. } => usage(e),
            macula::Error::Start(macula::StartError::Config(_)) => usage(e),
            other => Failure::from(other),
        })?;
    // The workload agent (issue 25) before the admin server: its metrics
    // and routes are part of the admin API.
    let agent = match start_agent(&node, &settings).await {
        Ok(a) => a,
        Err(e) => {
            node.shutdown().await;
            return Err(e);
        }
    };
    let (stop_admin, admin_stop) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(macula::admin::serve_with_routes(
        http,
        node.clone(),
        async move {
            let _ = admin_stop.await;
        },
        macula::admin::AdminLimits::default(),
        agent_routes(agent.as_ref()),
    ));
    // Kept for the daemon's lifetime: dropping a group stops serving it to
    // non-members.
    let groups = match join_groups(&node, &settings).await {
        Ok(groups) => groups,
        Err(e) => {
            node.shutdown().await;
            let _ = stop_admin.send(());
            let _ = tokio::time::timeout(ADMIN_STOP_GRACE, admin).await;
            return Err(e);
        }
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "node_id: {}", node.id())?;
        writeln!(out, "listen: {}", node.local_addr())?;
        writeln!(out, "http: {http_addr}")?;
        if let Some(mqtt) = node.mqtt_addr() {
            writeln!(out, "mqtt_addr: {mqtt}")?;
        }
        writeln!(out, "dashboard: http://{http_addr}/dashboard")?;
        writeln!(out, "realm: {}", node.realm())?;
        writeln!(out, "data_dir: {}", settings.data_dir.display())?;
        if !groups.is_empty() {
            let names: Vec<&str> = groups.iter().map(|g| g.name()).collect();
            writeln!(out, "raft_groups: {}", names.join(","))?;
        }
        if let Some(f) = &settings.config_file {
            writeln!(out, "config: {}", f.display())?;
        }
        out.flush()?;
    }
    signals.wait().await;
    tracing::info!("shutting down");
    stop_agent(agent).await;
    // The admin server stays up while the node says goodbye, so probes see
    // /ready turn 503 ("shutting down") rather than a refused connection.
    node.shutdown().await;
    drop(groups);
    let _ = stop_admin.send(());
    match tokio::time::timeout(ADMIN_STOP_GRACE, admin).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "admin HTTP server failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "admin HTTP server task failed"),
        Err(_) => tracing::warn!(
            grace = ?ADMIN_STOP_GRACE,
            "admin HTTP server did not stop in time; exiting anyway"
        ),
    }
    Ok(())
}

#[cfg(feature = "wasm")]
type AgentHandle = macula_wasm::Agent;
#[cfg(not(feature = "wasm"))]
type AgentHandle = ();

/// Starts the workload agent (`--workloads on`, the default, with the
/// `wasm` feature): artifacts and state in `<data dir>/workloads`.
#[cfg(feature = "wasm")]
async fn start_agent(node: &Node, settings: &Settings) -> Result<Option<AgentHandle>, Failure> {
    if !settings.workloads {
        return Ok(None);
    }
    let host = macula_wasm::WasmHost::new(macula_wasm::WasmLimits::default())?;
    host.attach_metrics(node);
    let mut opts = macula_wasm::AgentOptions::new(settings.data_dir.join("workloads"));
    opts.labels = settings
        .labels
        .iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let agent = macula_wasm::Agent::start(node, host, opts)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the workload agent: {e}"))?;
    Ok(Some(agent))
}

#[cfg(not(feature = "wasm"))]
async fn start_agent(_: &Node, settings: &Settings) -> Result<Option<AgentHandle>, Failure> {
    if settings.workloads && !settings.labels.is_empty() {
        tracing::warn!(
            "--label has no effect: this build has no workload agent (cargo feature wasm)"
        );
    }
    Ok(None)
}

#[cfg(feature = "wasm")]
fn agent_routes(agent: Option<&AgentHandle>) -> macula::admin::Routes {
    agent.map_or_else(macula::admin::Routes::new, |a| {
        macula_wasm::admin::routes(a.clone())
    })
}

#[cfg(not(feature = "wasm"))]
fn agent_routes(_: Option<&AgentHandle>) -> macula::admin::Routes {
    macula::admin::Routes::new()
}

#[cfg(feature = "wasm")]
async fn stop_agent(agent: Option<AgentHandle>) {
    if let Some(a) = agent {
        a.stop().await;
    }
}

#[cfg(not(feature = "wasm"))]
async fn stop_agent(_: Option<AgentHandle>) {}

/// Longest time joining one Raft group may take at start (opening its log,
/// advertising its RPC procedure); joining does not wait for a quorum.
const RAFT_JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Joins every `--raft-group` with the `--raft-members` as founders.
async fn join_groups(
    node: &Node,
    settings: &Settings,
) -> Result<Vec<macula::raft::Group>, Failure> {
    let mut groups = Vec::new();
    for name in &settings.raft_groups {
        let joined = tokio::time::timeout(
            RAFT_JOIN_TIMEOUT,
            node.raft_group(name, settings.raft_members.iter().copied()),
        )
        .await;
        let group = match joined {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                let error = anyhow::anyhow!("cannot join Raft group {name:?}: {e}");
                return Err(match e {
                    macula::Error::Raft(
                        macula::raft::GroupError::BadName(_)
                        | macula::raft::GroupError::TooManyGroups { .. }
                        | macula::raft::GroupError::NoDataDir,
                    ) => usage(error),
                    _ => Failure::from(error),
                });
            }
            Err(_) => {
                return Err(Failure::from(anyhow::anyhow!(
                    "cannot join Raft group {name:?}: not done within {RAFT_JOIN_TIMEOUT:?}"
                )))
            }
        };
        let founders = settings.raft_members.len();
        if founders > 0 && !settings.raft_members.contains(&node.id()) {
            tracing::warn!(group = %name, "this node is not among --raft-members: it waits to be added (macula raft add)");
        }
        tracing::info!(group = %name, founders, "joined Raft group");
        groups.push(group);
    }
    Ok(groups)
}

/// Time the admin HTTP server gets to finish open requests at shutdown.
const ADMIN_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// SIGTERM and SIGINT, installed up front.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("received SIGTERM"),
            _ = self.int.recv() => tracing::info!("received SIGINT"),
        }
    }
}
