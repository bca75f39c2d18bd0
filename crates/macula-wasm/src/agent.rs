//! [`Agent`]: the workload service of one node (issue 25, items 2-4).
//!
//! Every node that runs an agent:
//! - keeps artifacts in `<dir>/artifacts` and serves their chunks to peers
//!   (control procedure `_node.workloads`, addressed to the node);
//! - runs what it is ordered to (`apply`): fetches the artifact from the
//!   nodes that hold it if it lacks it, checks it, compiles it and starts
//!   the workload, or replaces a running one in place
//!   ([`crate::Workload::upgrade`]: no gap in service);
//! - at start, runs what the records say it should (`app/<app>`).
//!
//! The agents that are members of Raft group [`GROUP`] (three, chosen at
//! the first deployment) keep the records (`rollout.rs`); the group's
//! leader is the coordinator: it carries every active rollout forward one
//! batch at a time, writing each step to the KV before the next, so a new
//! leader resumes where the old one stopped. A write is a compare-and-swap
//! on the record as read: a deposed coordinator cannot overwrite its
//! successor's progress, and an operator's abort wins over a batch in
//! flight.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::artifact::{ArtifactError, ArtifactStore, Manifest};
use crate::error::WasmError;
use crate::host::{Compiled, WasmHost};
use crate::metrics;
use crate::workload::Workload;
pub use macula_rollout::control::{
    decode_control, AppReport, Control, DeployReport, DeployRequest, LocalApp, NodeReport, CONTROL,
};
use macula_rollout::records::{
    app_key, history_key, merge_config, release_key, rollout_key, validate_name, AppSpec, Phase,
    Placement, Release, Rollout, Strategy, UpgradeRequest, GROUP,
};

/// The agent's knobs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Where artifacts and the agent's state are kept.
    pub dir: PathBuf,
    /// This node's labels, matched by placements.
    pub labels: BTreeMap<String, String>,
    /// Time one order to a node (fetch, compile, start) may take.
    pub apply_timeout: Duration,
    /// Time a coordinator keeps ordering a node that does not answer
    /// before the batch fails.
    pub node_timeout: Duration,
    /// Health check calls per node before the batch fails, and the time
    /// between them.
    pub health_attempts: u32,
    pub health_interval: Duration,
    /// Time one health check call may take.
    pub health_timeout: Duration,
    /// Time one KV request may take.
    pub kv_timeout: Duration,
    /// Voters of group [`GROUP`] when an agent founds it.
    pub group_size: usize,
    /// Compiled components kept for reuse (by hash).
    pub max_compiled: usize,
    /// Artifacts kept in the store; past it the oldest not running here
    /// are deleted (`macula_wasm_artifacts_pruned_total`).
    pub max_artifacts: usize,
    /// Time the coordinator waits between looks at the records when idle.
    pub poll: Duration,
}

impl AgentOptions {
    /// Defaults, keeping files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> AgentOptions {
        AgentOptions {
            dir: dir.into(),
            labels: BTreeMap::new(),
            apply_timeout: Duration::from_secs(60),
            node_timeout: Duration::from_secs(30),
            health_attempts: 3,
            health_interval: Duration::from_millis(500),
            health_timeout: Duration::from_secs(5),
            kv_timeout: Duration::from_secs(5),
            group_size: 3,
            max_compiled: 8,
            max_artifacts: 32,
            poll: Duration::from_millis(200),
        }
    }
}

/// Why an agent request failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed or names something invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The app, version or rollout does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It conflicts with what exists (a rollout in progress, a version
    /// with another artifact).
    #[error("{0}")]
    Conflict(String),
    /// The records or a node could not be reached.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Wasm(#[from] WasmError),
}

fn mesh(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Unavailable(format!("{what}: {e}"))
}

struct Running {
    version: String,
    config: Vec<(String, String)>,
    workload: Workload,
}

struct Inner {
    node: macula::Node,
    host: WasmHost,
    store: ArtifactStore,
    opts: AgentOptions,
    apps: tokio::sync::Mutex<BTreeMap<String, Running>>,
    compiled: parking_lot::Mutex<Vec<Compiled>>,
    group: parking_lot::Mutex<Option<macula::raft::Group>>,
    joining: tokio::sync::Mutex<()>,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    control: parking_lot::Mutex<Option<macula::Registration>>,
}

/// The workload agent of one node. Cheap to clone; [`Agent::stop`] ends
/// it.
#[derive(Clone)]
pub struct Agent(Arc<Inner>);

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.0.node.id())
            .finish()
    }
}

/// Marks this node a member of [`GROUP`] (so it rejoins at start).
const MEMBER_FILE: &str = "group-member";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse_node(s: &str) -> Result<macula::NodeId, AgentError> {
    s.parse()
        .map_err(|_| AgentError::BadRequest(format!("{s:?} is not a node ID")))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these records (strings, numbers, maps with string keys)
    // cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, AgentError> {
    serde_json::from_slice(b)
        .map_err(|e| AgentError::Unavailable(format!("bad record {what}: {e}")))
}

impl Agent {
    /// Starts the agent of `node`: opens its artifact store, serves
    /// [`CONTROL`], rejoins group [`GROUP`] if it is a member, and runs
    /// (in the background) what the records say this node should run.
    pub async fn start(
        node: &macula::Node,
        host: WasmHost,
        opts: AgentOptions,
    ) -> Result<Agent, AgentError> {
        let store = ArtifactStore::open(
            &opts.dir.join("artifacts"),
            host.limits.max_component_bytes,
            host.metrics.clone(),
        )?;
        let agent = Agent(Arc::new(Inner {
            node: node.clone(),
            host,
            store,
            opts,
            apps: tokio::sync::Mutex::default(),
            compiled: parking_lot::Mutex::default(),
            group: parking_lot::Mutex::default(),
            joining: tokio::sync::Mutex::default(),
            tasks: parking_lot::Mutex::default(),
            control: parking_lot::Mutex::default(),
        }));
        let weak = Arc::downgrade(&agent.0);
        let reg = node
            .serve_unlisted(CONTROL, move |req: macula::Request| {
                let w = weak.clone();
                async move {
                    let Some(inner) = w.upgrade() else {
                        return Err(macula::HandlerError::new(503, "agent stopped"));
                    };
                    Agent(inner).control(req.payload).await
                }
            })
            .map_err(|e| mesh("serving the control procedure", e))?;
        *agent.0.control.lock() = Some(reg);
        if agent.0.opts.dir.join(MEMBER_FILE).exists() {
            agent.join(Vec::new()).await?;
        }
        let weak = Arc::downgrade(&agent.0);
        let task = tokio::spawn(async move { reconcile(weak).await });
        agent.0.tasks.lock().push(task);
        Ok(agent)
    }

    /// Stops the agent: its background tasks end and its workloads stop.
    pub async fn stop(&self) {
        for t in self.0.tasks.lock().drain(..) {
            t.abort();
        }
        self.0.control.lock().take();
        let apps = std::mem::take(&mut *self.0.apps.lock().await);
        for (_, r) in apps {
            r.workload.stop().await;
        }
        self.0.group.lock().take();
    }

    /// The node it runs on.
    pub fn node(&self) -> &macula::Node {
        &self.0.node
    }

    /// The wasm host.
    pub fn host(&self) -> &WasmHost {
        &self.0.host
    }

    /// Largest artifact accepted, in bytes.
    pub fn max_artifact_bytes(&self) -> usize {
        self.0.host.limits.max_component_bytes
    }

    /// This node's workloads, artifacts and role.
    pub async fn local(&self) -> NodeReport {
        let apps = self.0.apps.lock().await;
        let group = self.0.group.lock().clone();
        NodeReport {
            node: self.0.node.id().to_string(),
            labels: self.0.opts.labels.clone(),
            apps: apps
                .iter()
                .map(|(app, r)| LocalApp {
                    app: app.clone(),
                    version: r.version.clone(),
                    hash: r.workload.hash(),
                    procedures: r.workload.procedures(),
                })
                .collect(),
            artifacts: self.0.store.list(),
            group_member: group.is_some(),
            coordinator: group.is_some_and(|g| g.is_leader()),
        }
    }

    /// Stores an artifact on this node; its manifest.
    pub fn store_artifact(&self, bytes: &[u8]) -> Result<Manifest, AgentError> {
        Ok(self.0.store.put(bytes)?)
    }

    fn kv(&self) -> macula::raft::Kv {
        match &*self.0.group.lock() {
            Some(g) => g.kv(),
            None => self.0.node.kv(GROUP, self.0.opts.kv_timeout),
        }
    }

    // ---- the control procedure ------------------------------------------

    async fn control(&self, payload: Bytes) -> macula::HandlerResult {
        let op = decode_control(&payload).map_err(|e| macula::HandlerError::new(400, e))?;
        let fail = |e: AgentError| {
            let code = match e {
                AgentError::BadRequest(_) => 400,
                AgentError::NotFound(_) | AgentError::Artifact(ArtifactError::Missing(_)) => 404,
                AgentError::Conflict(_) => 409,
                _ => 500,
            };
            macula::HandlerError::new(code, e.to_string())
        };
        match op {
            Control::Chunk { manifest, index } => {
                manifest
                    .check(self.max_artifact_bytes())
                    .map_err(|e| fail(ArtifactError::from(e).into()))?;
                let store = self.0.store.clone();
                let chunk = tokio::task::spawn_blocking(move || store.chunk(&manifest, index))
                    .await
                    .map_err(|e| macula::HandlerError::new(500, e.to_string()))?
                    .map_err(|e| fail(e.into()))?;
                Ok(Bytes::from(chunk))
            }
            Control::Apply {
                app,
                version,
                manifest,
                config,
                holders,
            } => {
                let r = self
                    .apply(&app, &version, &manifest, config, &holders)
                    .await;
                let outcome = if r.is_ok() { "ok" } else { "failed" };
                self.0
                    .host
                    .metrics
                    .agent_applies
                    .get_or_create(&metrics::outcome(outcome))
                    .inc();
                Ok(Bytes::from(json(&r.map_err(fail)?)))
            }
            Control::Stop { app } => {
                let running = self.0.apps.lock().await.remove(&app);
                if let Some(r) = running {
                    r.workload.stop().await;
                    tracing::info!(target: "macula::wasm", app, "workload stopped by order");
                }
                Ok(Bytes::new())
            }
            Control::Status => Ok(Bytes::from(json(&self.local().await))),
            Control::Join { members } => {
                let ids = members
                    .iter()
                    .map(|m| parse_node(m))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(fail)?;
                self.join(ids).await.map_err(fail)?;
                Ok(Bytes::new())
            }
        }
    }

    /// Joins (or re-opens) group [`GROUP`] and coordinates while leading.
    async fn join(&self, members: Vec<macula::NodeId>) -> Result<(), AgentError> {
        let _one = self.0.joining.lock().await;
        if self.0.group.lock().is_some() {
            return Ok(());
        }
        let group = self
            .0
            .node
            .raft_group(GROUP, members)
            .await
            .map_err(|e| mesh("joining the workloads group", e))?;
        let marker = self.0.opts.dir.join(MEMBER_FILE);
        std::fs::write(&marker, b"")
            .map_err(|e| AgentError::Unavailable(format!("{}: {e}", marker.display())))?;
        *self.0.group.lock() = Some(group.clone());
        let weak = Arc::downgrade(&self.0);
        let task = tokio::spawn(async move { coordinate(weak, group).await });
        self.0.tasks.lock().push(task);
        tracing::info!(target: "macula::wasm", "member of the workloads group");
        Ok(())
    }

    // ---- running workloads here -----------------------------------------

    /// Runs `version` of `app` here (idempotent): the artifact from the
    /// local store or fetched from `holders`, checked, compiled, then
    /// started or swapped in place for the running version.
    async fn apply(
        &self,
        app: &str,
        version: &str,
        manifest: &Manifest,
        config: Vec<(String, String)>,
        holders: &[String],
    ) -> Result<LocalApp, AgentError> {
        validate_name("app", app).map_err(AgentError::BadRequest)?;
        let mut apps = self.0.apps.lock().await;
        if let Some(r) = apps.get_mut(app) {
            if r.workload.hash() == manifest.hash && r.config == config {
                r.version = version.to_string();
                return Ok(LocalApp {
                    app: app.to_string(),
                    version: version.to_string(),
                    hash: manifest.hash.clone(),
                    procedures: r.workload.procedures(),
                });
            }
        }
        let compiled = self.compiled(app, manifest, holders).await?;
        match apps.get_mut(app) {
            Some(r) => {
                r.workload.upgrade(&compiled, config.clone()).await?;
                r.version = version.to_string();
                r.config = config;
            }
            None => {
                let workload = self
                    .0
                    .host
                    .start(&self.0.node, app, &compiled, config.clone())
                    .await?;
                apps.insert(
                    app.to_string(),
                    Running {
                        version: version.to_string(),
                        config,
                        workload,
                    },
                );
            }
        }
        let running: Vec<String> = apps.values().map(|r| r.workload.hash()).collect();
        let store = self.0.store.clone();
        let max = self.0.opts.max_artifacts.max(1);
        let _ = tokio::task::spawn_blocking(move || store.prune(&running, max)).await;
        let r = &apps[app];
        tracing::info!(target: "macula::wasm", app, version, hash = %manifest.hash, "running");
        Ok(LocalApp {
            app: app.to_string(),
            version: version.to_string(),
            hash: manifest.hash.clone(),
            procedures: r.workload.procedures(),
        })
    }

    /// The compiled component of `manifest`: cached, or read (fetched if
    /// missing) and compiled off the async threads.
    async fn compiled(
        &self,
        app: &str,
        manifest: &Manifest,
        holders: &[String],
    ) -> Result<Compiled, AgentError> {
        if let Some(c) = self
            .0
            .compiled
            .lock()
            .iter()
            .find(|c| c.hash == manifest.hash)
        {
            return Ok(c.clone());
        }
        let bytes = match self.0.store.read_checked(&manifest.hash) {
            Ok(b) => b,
            Err(ArtifactError::Missing(_)) => self.fetch(manifest, holders).await?,
            Err(e) => return Err(e.into()),
        };
        let host = self.0.host.clone();
        let (app, hash) = (app.to_string(), manifest.hash.clone());
        let compiled = tokio::task::spawn_blocking(move || host.compile(&app, &bytes, Some(&hash)))
            .await
            .map_err(|e| AgentError::Unavailable(format!("compiling: {e}")))??;
        let mut cache = self.0.compiled.lock();
        cache.push(compiled.clone());
        let max = self.0.opts.max_compiled.max(1);
        if cache.len() > max {
            let extra = cache.len() - max;
            cache.drain(..extra);
        }
        Ok(compiled)
    }

    /// Fetches an artifact chunk by chunk from `holders` (this node
    /// skipped), starting at a holder that depends on this node's ID so
    /// that fetchers spread over holders; a chunk refused or not given is
    /// asked of the next holder.
    async fn fetch(&self, manifest: &Manifest, holders: &[String]) -> Result<Vec<u8>, AgentError> {
        let me = self.0.node.id();
        let holders: Vec<macula::NodeId> = holders
            .iter()
            .filter_map(|h| h.parse().ok())
            .filter(|h| *h != me)
            .collect();
        if holders.is_empty() {
            return Err(ArtifactError::Fetch {
                hash: manifest.hash.clone(),
                reason: "no other node holds it".into(),
            }
            .into());
        }
        let start = me.as_bytes()[0] as usize % holders.len();
        let node = self.0.node.clone();
        let timeout = self.0.opts.apply_timeout;
        let n = holders.len();
        let bytes = self
            .0
            .store
            .fetch(manifest, (n as u32).max(2), |index, attempt| {
                let holder = holders[(start + attempt as usize) % n];
                let node = node.clone();
                let body = json(&Control::Chunk {
                    manifest: manifest.clone(),
                    index,
                });
                async move {
                    node.call_to(holder, CONTROL, body)
                        .timeout(timeout)
                        .retries(0)
                        .await
                        .map(|r| r.payload.to_vec())
                        .map_err(|e| format!("{holder}: {e}"))
                }
            })
            .await?;
        tracing::info!(target: "macula::wasm", hash = %manifest.hash, size = manifest.size, "artifact fetched from peers");
        Ok(bytes)
    }

    // ---- the operator's requests (admin API) -----------------------------

    /// Agents among this node's connected peers, and this one.
    pub async fn agents(&self) -> Vec<NodeReport> {
        let mut out = vec![self.local().await];
        let peers = self.0.node.peers();
        let asks = peers.iter().map(|p| {
            let node = self.0.node.clone();
            let id = p.node_id;
            async move {
                let r = node
                    .call_to(id, CONTROL, json(&Control::Status))
                    .timeout(Duration::from_secs(2))
                    .retries(0)
                    .await
                    .ok()?;
                serde_json::from_slice::<NodeReport>(&r.payload).ok()
            }
        });
        out.extend(futures::future::join_all(asks).await.into_iter().flatten());
        out
    }

    /// Makes sure group [`GROUP`] exists: when no agent in reach is a
    /// member, founds it with this node and the `group_size - 1` other
    /// agents nearest to the group's name.
    async fn ensure_group(&self) -> Result<(), AgentError> {
        if self.0.group.lock().is_some() {
            return Ok(());
        }
        let agents = self.agents().await;
        if agents.iter().any(|a| a.group_member) {
            return Ok(());
        }
        let me = self.0.node.id();
        let others: Vec<(macula::NodeId, BTreeMap<String, String>)> = agents
            .iter()
            .filter_map(|a| a.node.parse().ok().map(|id| (id, BTreeMap::new())))
            .filter(|(id, _)| *id != me)
            .collect();
        let mut members = vec![me];
        members.extend(
            Placement {
                replicas: Some(self.0.opts.group_size.saturating_sub(1) as u32),
                labels: BTreeMap::new(),
            }
            .choose(GROUP, &others),
        );
        let names: Vec<String> = members.iter().map(ToString::to_string).collect();
        let body = json(&Control::Join {
            members: names.clone(),
        });
        let joins = members.iter().filter(|m| **m != me).map(|m| {
            self.0
                .node
                .call_to(*m, CONTROL, body.clone())
                .timeout(self.0.opts.kv_timeout)
                .retries(0)
                .into_future()
        });
        for r in futures::future::join_all(joins).await {
            r.map_err(|e| mesh("asking a node to join the workloads group", e))?;
        }
        self.join(members).await?;
        tracing::info!(target: "macula::wasm", members = ?names, "founded the workloads group");
        // Wait (bounded) for its first leader, so the first writes land.
        let group = self.0.group.lock().clone();
        if let Some(g) = group {
            let mut w = g.watch_leader();
            let _ = tokio::time::timeout(self.0.opts.kv_timeout * 2, async {
                while w.borrow().leader.is_none() {
                    if w.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        Ok(())
    }

    /// `macula deploy`: registers `req.version` of `app` (artifact stored
    /// here by [`Agent::store_artifact`]); a first deployment places the
    /// app and starts its rollout (all at once).
    pub async fn deploy(&self, app: &str, req: DeployRequest) -> Result<DeployReport, AgentError> {
        validate_name("app", app).map_err(AgentError::BadRequest)?;
        validate_name("version", &req.version).map_err(AgentError::BadRequest)?;
        let bytes = self.0.store.read_checked(&req.hash).map_err(|e| match e {
            ArtifactError::Missing(h) => {
                AgentError::NotFound(format!("artifact {h} is not stored on this node"))
            }
            e => e.into(),
        })?;
        let manifest = Manifest::of(&bytes);
        // Refuse what cannot run before anything is recorded.
        let host = self.0.host.clone();
        let (a, h) = (app.to_string(), req.hash.clone());
        tokio::task::spawn_blocking(move || host.compile(&a, &bytes, Some(&h)))
            .await
            .map_err(|e| AgentError::Unavailable(format!("compiling: {e}")))??;
        let release = Release {
            app: app.to_string(),
            version: req.version.clone(),
            manifest: manifest.clone(),
            config: req.config.clone(),
            holders: vec![self.0.node.id().to_string()],
            created_ms: now_ms(),
        };
        // A group founded a moment ago may still be electing its first
        // leader: the release (an idempotent write) is retried, bounded.
        let deadline = tokio::time::Instant::now() + self.0.opts.kv_timeout * 3;
        loop {
            match self.record_release(&release).await {
                Err(AgentError::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(target: "macula::wasm", error = %e, "recording the release: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => break r?,
            }
        }
        let kv = self.kv();
        let rollout = match kv
            .get(app_key(app))
            .await
            .map_err(|e| mesh("reading the app", e))?
        {
            Some(_) => None,
            None => {
                let candidates: Vec<(macula::NodeId, BTreeMap<String, String>)> = self
                    .agents()
                    .await
                    .into_iter()
                    .filter_map(|a| a.node.parse().ok().map(|id| (id, a.labels)))
                    .collect();
                let nodes = req.placement.choose(app, &candidates);
                if nodes.is_empty() {
                    return Err(AgentError::BadRequest(format!(
                        "no node in reach matches the placement {:?}",
                        req.placement
                    )));
                }
                let spec = AppSpec {
                    app: app.to_string(),
                    placement: req.placement.clone(),
                    config: req.config.clone(),
                    version: None,
                    nodes: BTreeMap::new(),
                };
                let created = kv
                    .put_if_absent(app_key(app), json(&spec), None)
                    .await
                    .map_err(|e| mesh("recording the app", e))?;
                if created.is_err() {
                    return Err(AgentError::Conflict(format!(
                        "{app} was deployed by someone else meanwhile; use macula upgrade"
                    )));
                }
                let names: Vec<String> = nodes.iter().map(ToString::to_string).collect();
                let up = UpgradeRequest {
                    version: req.version.clone(),
                    strategy: Strategy::AllAtOnce,
                    batch_size: names.len() as u32,
                    health_check: None,
                    rollback_on_fail: true,
                };
                Some(self.begin(app, None, &up, &names).await?)
            }
        };
        Ok(DeployReport {
            app: app.to_string(),
            version: req.version,
            hash: manifest.hash,
            size: manifest.size,
            rollout,
        })
    }

    /// Makes sure the group exists and records `release` (kept if the same
    /// artifact is recorded already; refused if another is).
    async fn record_release(&self, release: &Release) -> Result<(), AgentError> {
        self.ensure_group().await?;
        let key = release_key(&release.app, &release.version);
        match self
            .kv()
            .put_if_absent(&key, json(release), None)
            .await
            .map_err(|e| mesh("recording the release", e))?
        {
            Ok(_) | Err(None) => Ok(()),
            Err(Some(existing)) => {
                let old: Release = decode(&key, &existing.value)?;
                if old.manifest.hash != release.manifest.hash {
                    return Err(AgentError::Conflict(format!(
                        "{} {} is already deployed with artifact {}; deploy a new version",
                        release.app, release.version, old.manifest.hash
                    )));
                }
                Ok(())
            }
        }
    }

    /// Writes a new rollout (refused while one is active or paused).
    async fn begin(
        &self,
        app: &str,
        from: Option<String>,
        up: &UpgradeRequest,
        nodes: &[String],
    ) -> Result<Rollout, AgentError> {
        let kv = self.kv();
        let key = rollout_key(app);
        let current = kv
            .get(&key)
            .await
            .map_err(|e| mesh("reading the rollout", e))?;
        let (id, expect) = match &current {
            Some(kv) => {
                let r: Rollout = decode(&key, &kv.value)?;
                if !r.phase.is_ended() {
                    return Err(AgentError::Conflict(format!(
                        "rollout {} of {app} ({} -> {}) is {}: wait, promote or abort it first",
                        r.id,
                        r.from.as_deref().unwrap_or("nothing"),
                        r.to,
                        r.phase.as_str()
                    )));
                }
                (r.id + 1, macula::raft::Expect::ModRevision(kv.mod_revision))
            }
            None => (1, macula::raft::Expect::Absent),
        };
        let rollout = Rollout::plan(id, app, from, up, nodes, now_ms());
        match kv
            .compare_and_swap(&key, expect, json(&rollout))
            .await
            .map_err(|e| mesh("recording the rollout", e))?
        {
            Ok(_) => Ok(rollout),
            Err(_) => Err(AgentError::Conflict(format!(
                "another rollout of {app} was started meanwhile"
            ))),
        }
    }

    /// `macula upgrade APP VERSION ...`: starts a rollout of the app's
    /// nodes to a deployed version.
    pub async fn upgrade(&self, app: &str, up: UpgradeRequest) -> Result<Rollout, AgentError> {
        validate_name("app", app).map_err(AgentError::BadRequest)?;
        validate_name("version", &up.version).map_err(AgentError::BadRequest)?;
        if let Some(p) = &up.health_check {
            if p.is_empty() {
                return Err(AgentError::BadRequest(
                    "empty health check procedure".into(),
                ));
            }
        }
        let kv = self.kv();
        let spec: AppSpec = match kv
            .get(app_key(app))
            .await
            .map_err(|e| mesh("reading the app", e))?
        {
            Some(v) => decode(&app_key(app), &v.value)?,
            None => {
                return Err(AgentError::NotFound(format!(
                    "no app {app}: deploy it first (macula deploy)"
                )))
            }
        };
        if kv
            .get(release_key(app, &up.version))
            .await
            .map_err(|e| mesh("reading the release", e))?
            .is_none()
        {
            return Err(AgentError::NotFound(format!(
                "{app} {} is not deployed (macula deploy {app} {} FILE.wasm)",
                up.version, up.version
            )));
        }
        if spec.version.as_deref() == Some(up.version.as_str()) {
            return Err(AgentError::Conflict(format!(
                "{app} already runs {}",
                up.version
            )));
        }
        let nodes: Vec<String> = spec.nodes.keys().cloned().collect();
        if nodes.is_empty() {
            return Err(AgentError::Conflict(format!("{app} runs on no node")));
        }
        self.begin(app, spec.version.clone(), &up, &nodes).await
    }

    async fn change(
        &self,
        app: &str,
        f: impl Fn(&mut Rollout, u64) -> Result<(), String>,
    ) -> Result<Rollout, AgentError> {
        update(&self.kv(), &rollout_key(app), |r: &mut Rollout| {
            f(r, now_ms()).map_err(AgentError::Conflict)
        })
        .await
    }

    /// `macula upgrade promote APP`: a paused canary goes on.
    pub async fn promote(&self, app: &str) -> Result<Rollout, AgentError> {
        self.change(app, |r, now| r.promote(now)).await
    }

    /// `macula upgrade abort APP`: a running or paused rollout rolls back.
    pub async fn abort(&self, app: &str) -> Result<Rollout, AgentError> {
        self.change(app, |r, now| r.abort(now)).await
    }

    /// Apps as recorded, with their last rollouts.
    pub async fn status(&self, app: Option<&str>) -> Result<Vec<AppReport>, AgentError> {
        let kv = self.kv();
        let prefix = match app {
            Some(a) => app_key(a),
            None => "app/".to_string(),
        };
        let (_, specs) = kv
            .range(&prefix, 0)
            .await
            .map_err(|e| mesh("reading the apps", e))?;
        let mut out = Vec::new();
        for s in specs {
            let spec: AppSpec = decode("app", &s.value)?;
            if app.is_some_and(|a| a != spec.app) {
                continue;
            }
            let rollout = match kv
                .get(rollout_key(&spec.app))
                .await
                .map_err(|e| mesh("reading the rollout", e))?
            {
                Some(v) => Some(decode("rollout", &v.value)?),
                None => None,
            };
            let (_, releases) = kv
                .range(format!("release/{}/", spec.app), 0)
                .await
                .map_err(|e| mesh("reading the releases", e))?;
            let versions = releases
                .iter()
                .filter_map(|r| serde_json::from_slice::<Release>(&r.value).ok())
                .map(|r| r.version)
                .collect();
            out.push(AppReport {
                spec,
                rollout,
                versions,
            });
        }
        if let (Some(a), true) = (app, out.is_empty()) {
            return Err(AgentError::NotFound(format!("no app {a}")));
        }
        Ok(out)
    }

    /// Every ended rollout of `app`, oldest first.
    pub async fn history(&self, app: &str) -> Result<Vec<Rollout>, AgentError> {
        validate_name("app", app).map_err(AgentError::BadRequest)?;
        let (_, items) = self
            .kv()
            .range(format!("history/{app}/"), 0)
            .await
            .map_err(|e| mesh("reading the history", e))?;
        items
            .iter()
            .map(|kv| decode("history", &kv.value))
            .collect()
    }
}

/// Reads the record at `key`, changes it with `f` and writes it back if
/// nobody wrote it meanwhile (compare-and-swap on its revision), reading
/// again up to ten times; the record as written.
async fn update<T: Serialize + serde::de::DeserializeOwned>(
    kv: &macula::raft::Kv,
    key: &str,
    mut f: impl FnMut(&mut T) -> Result<(), AgentError>,
) -> Result<T, AgentError> {
    for _ in 0..10 {
        let Some(cur) = kv
            .get(key)
            .await
            .map_err(|e| mesh("reading the records", e))?
        else {
            return Err(AgentError::NotFound(format!("record {key} is missing")));
        };
        let mut v: T = decode(key, &cur.value)?;
        f(&mut v)?;
        if kv
            .compare_and_swap(
                key,
                macula::raft::Expect::ModRevision(cur.mod_revision),
                json(&v),
            )
            .await
            .map_err(|e| mesh("writing the records", e))?
            .is_ok()
        {
            return Ok(v);
        }
    }
    Err(AgentError::Conflict(format!(
        "record {key} kept changing; try again"
    )))
}

// ---- at start: run what the records say -----------------------------------

async fn reconcile(w: Weak<Inner>) {
    let mut wait = Duration::from_millis(500);
    for _ in 0..40 {
        let Some(inner) = w.upgrade() else { return };
        let agent = Agent(inner);
        match reconcile_once(&agent).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(target: "macula::wasm", workloads = n, "started what the records assign to this node");
                }
                return;
            }
            Err(e) => {
                tracing::debug!(target: "macula::wasm", error = %e, "records not readable yet");
            }
        }
        drop(agent);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
    tracing::warn!(target: "macula::wasm", "could not read the workload records; this node runs nothing until ordered");
}

/// Starts the workloads the records assign to this node; how many.
async fn reconcile_once(agent: &Agent) -> Result<usize, AgentError> {
    let me = agent.0.node.id().to_string();
    let kv = agent.kv();
    let (_, specs) = kv
        .range("app/", 0)
        .await
        .map_err(|e| mesh("reading the apps", e))?;
    let mut n = 0;
    for s in specs {
        let spec: AppSpec = decode("app", &s.value)?;
        let Some(version) = spec.nodes.get(&me) else {
            continue;
        };
        let Some(rel) = kv
            .get(release_key(&spec.app, version))
            .await
            .map_err(|e| mesh("reading the release", e))?
        else {
            continue;
        };
        let rel: Release = decode("release", &rel.value)?;
        let config = if spec.version.as_deref() == Some(version.as_str()) {
            spec.config.clone()
        } else {
            merge_config(&spec.config, &rel.config)
        };
        match agent
            .apply(&spec.app, version, &rel.manifest, config, &rel.holders)
            .await
        {
            Ok(_) => n += 1,
            Err(e) => {
                tracing::warn!(target: "macula::wasm", app = spec.app, version, error = %e, "could not start an assigned workload")
            }
        }
    }
    Ok(n)
}

// ---- the coordinator --------------------------------------------------------

async fn coordinate(w: Weak<Inner>, group: macula::raft::Group) {
    let mut leader = group.watch_leader();
    loop {
        if !group.is_leader() {
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Some(inner) = w.upgrade() else { return };
        let agent = Agent(inner);
        let poll = agent.0.opts.poll;
        let worked = match drive_all(&agent, &group.kv()).await {
            Ok(worked) => worked,
            Err(e) => {
                tracing::warn!(target: "macula::wasm", error = %e, "coordinating rollouts");
                false
            }
        };
        drop(agent);
        if !worked {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                r = leader.changed() => if r.is_err() { return },
            }
        }
    }
}

/// One step of every active rollout; whether anything was done.
async fn drive_all(agent: &Agent, kv: &macula::raft::Kv) -> Result<bool, AgentError> {
    let (_, rollouts) = kv
        .range("rollout/", 0)
        .await
        .map_err(|e| mesh("reading the rollouts", e))?;
    let mut worked = false;
    for item in rollouts {
        let r: Rollout = decode("rollout", &item.value)?;
        if !r.phase.is_active() {
            continue;
        }
        worked = true;
        let c = Coordinator {
            agent,
            kv,
            revision: item.mod_revision,
        };
        let app = r.app.clone();
        if let Err(e) = c.step(r).await {
            tracing::warn!(target: "macula::wasm", app, error = %e, "rollout step");
        }
    }
    Ok(worked)
}

struct Coordinator<'a> {
    agent: &'a Agent,
    kv: &'a macula::raft::Kv,
    /// The rollout record's revision as read.
    revision: u64,
}

impl Coordinator<'_> {
    /// Writes the rollout if nobody changed it since it was read; false if
    /// somebody did (the step is dropped: the next look sees theirs).
    async fn save(&mut self, r: &Rollout) -> Result<bool, AgentError> {
        let key = rollout_key(&r.app);
        match self
            .kv
            .compare_and_swap(
                &key,
                macula::raft::Expect::ModRevision(self.revision),
                json(r),
            )
            .await
            .map_err(|e| mesh("recording the rollout", e))?
        {
            Ok(kv) => {
                self.revision = kv.mod_revision;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    async fn step(mut self, mut r: Rollout) -> Result<(), AgentError> {
        let me = self.agent.0.node.id().to_string();
        if r.events
            .iter()
            .rev()
            .find_map(|(_, e)| e.strip_prefix("coordinator "))
            != Some(me.as_str())
        {
            r.event(now_ms(), format!("coordinator {me}"));
            if !self.save(&r).await? {
                return Ok(());
            }
        }
        match r.phase {
            Phase::Running => self.upgrade_batch(r).await,
            Phase::RollingBack => self.roll_back(r).await,
            _ => Ok(()),
        }
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<(T, u64), AgentError> {
        match self
            .kv
            .get(key)
            .await
            .map_err(|e| mesh("reading the records", e))?
        {
            Some(v) => Ok((decode(key, &v.value)?, v.mod_revision)),
            None => Err(AgentError::NotFound(format!("record {key} is missing"))),
        }
    }

    /// Sets (or, with `None`, removes) the version `nodes` should run in
    /// the app's record, before they are ordered.
    async fn assign(
        &self,
        app: &str,
        nodes: &[String],
        version: Option<&str>,
    ) -> Result<AppSpec, AgentError> {
        update(self.kv, &app_key(app), |spec: &mut AppSpec| {
            for n in nodes {
                match version {
                    Some(v) => spec.nodes.insert(n.clone(), v.to_string()),
                    None => spec.nodes.remove(n),
                };
            }
            Ok(())
        })
        .await
    }

    /// Orders every node of `nodes` to run `rel` with `config` (or, with
    /// `None`, to stop the app), each until it succeeds or `node_timeout`
    /// has passed; the nodes that failed, with why.
    async fn order(
        &self,
        app: &str,
        nodes: &[String],
        rel: Option<(&Release, &[(String, String)])>,
    ) -> Vec<(String, String)> {
        let opts = &self.agent.0.opts;
        let body = match rel {
            Some((rel, config)) => json(&Control::Apply {
                app: app.to_string(),
                version: rel.version.clone(),
                manifest: rel.manifest.clone(),
                config: config.to_vec(),
                holders: rel.holders.clone(),
            }),
            None => json(&Control::Stop {
                app: app.to_string(),
            }),
        };
        let orders = nodes.iter().map(|n| {
            let body = body.clone();
            async move {
                let id = match parse_node(n) {
                    Ok(id) => id,
                    Err(e) => return Some((n.clone(), e.to_string())),
                };
                let deadline = tokio::time::Instant::now() + opts.node_timeout;
                let mut wait = Duration::from_millis(200);
                loop {
                    let r = self
                        .agent
                        .0
                        .node
                        .call_to(id, CONTROL, body.clone())
                        .timeout(opts.apply_timeout)
                        .retries(0)
                        .await;
                    match r {
                        Ok(_) => return None,
                        // The node answered a refusal: trying again will
                        // not change it.
                        Err(macula::Error::Rpc(macula::RpcError::Handler {
                            code,
                            message,
                            ..
                        })) if code != 500 || !message.contains("could not be fetched") => {
                            return Some((n.clone(), message));
                        }
                        Err(e) => {
                            if tokio::time::Instant::now() + wait >= deadline {
                                return Some((n.clone(), e.to_string()));
                            }
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            }
        });
        futures::future::join_all(orders)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Calls the health check on each node; the first that fails.
    async fn health(&self, procedure: &str, nodes: &[String]) -> Option<(String, String)> {
        let opts = &self.agent.0.opts;
        let checks = nodes.iter().map(|n| async move {
            let id = match parse_node(n) {
                Ok(id) => id,
                Err(e) => return Some((n.clone(), e.to_string())),
            };
            let mut last = String::new();
            for attempt in 0..opts.health_attempts.max(1) {
                if attempt > 0 {
                    tokio::time::sleep(opts.health_interval).await;
                }
                match self
                    .agent
                    .0
                    .node
                    .call_to(id, procedure, Bytes::new())
                    .timeout(opts.health_timeout)
                    .retries(0)
                    .await
                {
                    Ok(_) => return None,
                    Err(e) => last = e.to_string(),
                }
            }
            Some((n.clone(), last))
        });
        let failed = futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .next();
        let outcome = if failed.is_none() { "ok" } else { "failed" };
        self.agent
            .0
            .host
            .metrics
            .health_checks
            .get_or_create(&metrics::outcome(outcome))
            .inc();
        failed
    }

    async fn upgrade_batch(mut self, mut r: Rollout) -> Result<(), AgentError> {
        let Some(batch) = r.current_batch().map(<[String]>::to_vec) else {
            return Ok(());
        };
        let (rel, _): (Release, u64) = self.read(&release_key(&r.app, &r.to)).await?;
        let spec = self.assign(&r.app, &batch, Some(&r.to)).await?;
        let config = merge_config(&spec.config, &rel.config);
        let failed = self.order(&r.app, &batch, Some((&rel, &config))).await;
        let now = now_ms();
        if let Some((node, why)) = failed.first() {
            r.fail(
                now,
                format!(
                    "{} of {} nodes did not take {}: {node}: {why}",
                    failed.len(),
                    batch.len(),
                    r.to
                ),
            );
            return self.after(r).await;
        }
        r.event(
            now,
            format!("batch {}: {} nodes run {}", r.done + 1, batch.len(), r.to),
        );
        if let Some(hc) = r.health_check.clone() {
            if let Some((node, why)) = self.health(&hc, &batch).await {
                r.fail(
                    now_ms(),
                    format!("health check {hc} failed on {node}: {why}"),
                );
                return self.after(r).await;
            }
            r.event(
                now_ms(),
                format!("health check {hc} passed on {} nodes", batch.len()),
            );
        }
        self.add_holders(&r.app, &r.to, &batch).await;
        r.batch_done(now_ms());
        if r.phase == Phase::Completed {
            self.complete(&r, &config).await?;
        }
        self.after(r).await
    }

    /// The new holders of a release's artifact (best effort: a missing one
    /// only means fewer sources).
    async fn add_holders(&self, app: &str, version: &str, nodes: &[String]) {
        let added = update(self.kv, &release_key(app, version), |rel: &mut Release| {
            for n in nodes {
                if !rel.holders.contains(n) {
                    rel.holders.push(n.clone());
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = added {
            tracing::debug!(target: "macula::wasm", app, version, error = %e, "holders not recorded");
        }
    }

    /// The app's record says the new version is in service.
    async fn complete(&self, r: &Rollout, config: &[(String, String)]) -> Result<(), AgentError> {
        update(self.kv, &app_key(&r.app), |spec: &mut AppSpec| {
            spec.version = Some(r.to.clone());
            spec.config = config.to_vec();
            Ok(())
        })
        .await
        .map(|_| ())
    }

    async fn roll_back(mut self, mut r: Rollout) -> Result<(), AgentError> {
        let nodes = r.touched();
        let failed = match r.from.clone() {
            Some(from) => {
                let (rel, _): (Release, u64) = self.read(&release_key(&r.app, &from)).await?;
                let spec = self.assign(&r.app, &nodes, Some(&from)).await?;
                self.order(&r.app, &nodes, Some((&rel, &spec.config))).await
            }
            None => {
                self.assign(&r.app, &nodes, None).await?;
                self.order(&r.app, &nodes, None).await
            }
        };
        let now = now_ms();
        match failed.first() {
            None => {
                r.event(
                    now,
                    format!(
                        "{} nodes back on {}",
                        nodes.len(),
                        r.from.as_deref().unwrap_or("nothing")
                    ),
                );
                r.rolled_back(now);
            }
            Some((node, why)) => {
                r.detail = format!(
                    "{}; rollback incomplete: {} of {} nodes not back on {}: {node}: {why}",
                    r.detail,
                    failed.len(),
                    nodes.len(),
                    r.from.as_deref().unwrap_or("nothing")
                );
                r.end(now, Phase::Failed);
            }
        }
        self.after(r).await
    }

    /// Records the step; an ended rollout goes to the history first (a
    /// coordinator that dies between the two writes it again, same key).
    async fn after(&mut self, r: Rollout) -> Result<(), AgentError> {
        if r.phase.is_ended() {
            self.kv
                .put(history_key(&r.app, r.id), json(&r))
                .await
                .map_err(|e| mesh("recording the history", e))?;
        }
        if self.save(&r).await? && r.phase.is_ended() {
            self.agent
                .0
                .host
                .metrics
                .rollouts
                .get_or_create(&vec![
                    ("strategy", r.strategy.as_str().to_string()),
                    ("outcome", r.phase.as_str().to_string()),
                ])
                .inc();
            tracing::info!(target: "macula::wasm", app = r.app, id = r.id, phase = r.phase.as_str(), detail = r.detail, "rollout ended");
        }
        Ok(())
    }
}
