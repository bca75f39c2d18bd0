//! [`Workload`]: a component running on a node. Its procedures are
//! advertised through the node's RPC and its subscriptions made through
//! the node's pub/sub, exactly as an application's would be; each call or
//! event enters the one instance in turn.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::error::WasmError;
use crate::host::{Compiled, Live, WasmHost};
use crate::metrics;
use crate::state::Phase;

/// The handler error code of a call the component could not answer
/// because a limit stopped its instance.
pub const CODE_LIMIT: i64 = -32001;
/// The handler error code of a call whose component trapped.
pub const CODE_TRAP: i64 = -32002;
/// The handler error code of a call whose instance could not be started
/// again after a limit or a trap.
pub const CODE_UNAVAILABLE: i64 = -32003;

struct Inner {
    app: Arc<str>,
    host: WasmHost,
    node: macula::Node,
    compiled: Compiled,
    config: Vec<(String, String)>,
    procedures: Arc<[String]>,
    patterns: Arc<[String]>,
    /// The instance, `None` after a limit or a trap (or a call cancelled
    /// mid-way) until the next call starts a new one. One call at a time.
    live: tokio::sync::Mutex<Option<Live>>,
}

/// What the node's registrations reach: the instance serving now. An
/// upgrade swaps it; calls and events already in an older one finish there
/// (they hold its `Arc`), and the older one is freed after the last.
struct Slot {
    current: parking_lot::RwLock<Arc<Inner>>,
}

impl Slot {
    fn current(&self) -> Arc<Inner> {
        self.current.read().clone()
    }
}

/// A running workload. Dropping it (or [`Workload::stop`]) withdraws its
/// procedures, ends its subscriptions and frees its instance.
/// [`Workload::upgrade`] replaces its component in place.
pub struct Workload {
    slot: Arc<Slot>,
    registrations: BTreeMap<String, macula::Registration>,
    pumps: BTreeMap<String, JoinHandle<()>>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.slot.current();
        f.debug_struct("Workload")
            .field("app", &inner.app)
            .field("hash", &inner.compiled.hash)
            .field("procedures", &inner.procedures)
            .field("patterns", &inner.patterns)
            .finish()
    }
}

impl WasmHost {
    /// Runs `compiled` on `node` as workload `app`: one instance, `init`
    /// with `config`, then its procedures advertised and its patterns
    /// subscribed. Refusals are counted in `macula_wasm_refused_total`.
    pub async fn start(
        &self,
        node: &macula::Node,
        app: &str,
        compiled: &Compiled,
        config: Vec<(String, String)>,
    ) -> Result<Workload, WasmError> {
        let r = self.start_inner(node, app, compiled, config).await;
        if let Err(e) = &r {
            self.refused(e);
        }
        r
    }

    async fn start_inner(
        &self,
        node: &macula::Node,
        app: &str,
        compiled: &Compiled,
        config: Vec<(String, String)>,
    ) -> Result<Workload, WasmError> {
        {
            let mut running = self.running.lock();
            if running.contains(app) {
                return Err(WasmError::AlreadyRunning(app.to_string()));
            }
            if running.len() >= self.limits.max_workloads {
                return Err(WasmError::TooManyWorkloads {
                    app: app.to_string(),
                    max: self.limits.max_workloads,
                });
            }
            running.insert(app.to_string());
        }
        let name: Arc<str> = Arc::from(app);
        let mut guard = Running {
            host: Some(self.clone()),
            app: name.clone(),
        };
        let inner = self.first_instance(&name, node, compiled, config).await?;
        // From here on, dropping the workload undoes its start.
        guard.host = None;
        self.metrics.workloads.inc();
        let mut workload = Workload {
            slot: Arc::new(Slot {
                current: parking_lot::RwLock::new(inner.clone()),
            }),
            registrations: BTreeMap::new(),
            pumps: BTreeMap::new(),
        };
        workload.serve_new(&inner).await?;
        tracing::info!(
            target: "macula::wasm",
            app,
            hash = %compiled.hash,
            procedures = inner.procedures.len(),
            subscriptions = inner.patterns.len(),
            "workload started"
        );
        Ok(workload)
    }
}

impl WasmHost {
    /// A first instance of `compiled` for `app`, its `init` run with
    /// `config`: what serves the workload (a start's, or an upgrade's).
    async fn first_instance(
        &self,
        app: &Arc<str>,
        node: &macula::Node,
        compiled: &Compiled,
        config: Vec<(String, String)>,
    ) -> Result<Arc<Inner>, WasmError> {
        let first = Phase::Init {
            procedures: Vec::new(),
            patterns: Vec::new(),
        };
        let (live, asked) = self
            .instantiate(app, node, compiled, &config, first)
            .await?;
        let Phase::Init {
            procedures,
            patterns,
        } = asked
        else {
            unreachable!("a first instance's phase is Init");
        };
        Ok(Arc::new(Inner {
            app: app.clone(),
            host: self.clone(),
            node: node.clone(),
            compiled: compiled.clone(),
            config,
            procedures: procedures.into(),
            patterns: patterns.into(),
            live: tokio::sync::Mutex::new(Some(live)),
        }))
    }
}

/// Frees the workload's name if its start fails.
struct Running {
    host: Option<WasmHost>,
    app: Arc<str>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(host) = &self.host {
            host.running.lock().remove(&*self.app);
        }
    }
}

impl Workload {
    /// The workload's name.
    pub fn app(&self) -> String {
        self.slot.current().app.to_string()
    }

    /// The serving component's BLAKE3 hash (hex).
    pub fn hash(&self) -> String {
        self.slot.current().compiled.hash.clone()
    }

    /// The procedures it serves.
    pub fn procedures(&self) -> Vec<String> {
        self.slot.current().procedures.to_vec()
    }

    /// The patterns it subscribed to.
    pub fn patterns(&self) -> Vec<String> {
        self.slot.current().patterns.to_vec()
    }

    /// The configuration its serving instance was started with.
    pub fn config(&self) -> Vec<(String, String)> {
        self.slot.current().config.clone()
    }

    /// Calls the component's handler directly, without the mesh (what a
    /// call through the node ends in); for benchmarks and tests.
    pub async fn call(&self, procedure: &str, payload: Bytes) -> macula::HandlerResult {
        self.slot.current().call(procedure, payload).await
    }

    /// Replaces the component in place, without a gap in service: a new
    /// instance of `compiled` is started beside the serving one and its
    /// `init` run with `config`; only if that succeeds do new calls and
    /// events go to it. Calls and events already in the old instance
    /// finish there; it is freed after the last. Procedures and patterns
    /// the new version adds are advertised and subscribed first, those it
    /// drops are withdrawn after the switch. On failure nothing changes.
    pub async fn upgrade(
        &mut self,
        compiled: &Compiled,
        config: Vec<(String, String)>,
    ) -> Result<(), WasmError> {
        let old = self.slot.current();
        let r = self.upgrade_inner(&old, compiled, config).await;
        if let Err(e) = &r {
            old.host.refused(e);
        }
        r
    }

    async fn upgrade_inner(
        &mut self,
        old: &Arc<Inner>,
        compiled: &Compiled,
        config: Vec<(String, String)>,
    ) -> Result<(), WasmError> {
        let new = old
            .host
            .first_instance(&old.app, &old.node, compiled, config)
            .await?;
        // What the new version adds is served before the switch: a caller
        // that finds the procedure reaches the new instance.
        self.serve_new(&new).await?;
        *self.slot.current.write() = new.clone();
        let keep: BTreeSet<&String> = new.procedures.iter().collect();
        let gone: Vec<String> = self
            .registrations
            .keys()
            .filter(|p| !keep.contains(p))
            .cloned()
            .collect();
        for procedure in gone {
            if let Some(reg) = self.registrations.remove(&procedure) {
                if let Err(e) = reg.withdraw().await {
                    tracing::warn!(target: "macula::wasm", app = &*new.app, procedure, error = %e, "withdrawing a procedure failed");
                }
            }
        }
        let keep: BTreeSet<&String> = new.patterns.iter().collect();
        self.pumps.retain(|pattern, pump| {
            let stays = keep.contains(pattern);
            if !stays {
                pump.abort();
            }
            stays
        });
        old.host
            .metrics
            .upgrades
            .get_or_create(&metrics::app(&new.app))
            .inc();
        tracing::info!(
            target: "macula::wasm",
            app = &*new.app,
            from = %old.compiled.hash,
            to = %new.compiled.hash,
            "workload upgraded in place"
        );
        Ok(())
    }

    /// Advertises `inner`'s procedures and subscribes its patterns that
    /// this workload does not serve yet; each reaches whichever instance
    /// is current.
    async fn serve_new(&mut self, inner: &Arc<Inner>) -> Result<(), WasmError> {
        let weak = Arc::downgrade(&self.slot);
        for procedure in inner.procedures.iter() {
            if self.registrations.contains_key(procedure) {
                continue;
            }
            let w = weak.clone();
            let reg = inner
                .node
                .advertise(procedure, move |req: macula::Request| {
                    let w = w.clone();
                    async move { serve(w, req).await }
                })
                .await
                .map_err(|e| WasmError::Mesh {
                    app: inner.app.to_string(),
                    what: format!("advertising {procedure}"),
                    reason: e.to_string(),
                })?;
            self.registrations.insert(procedure.clone(), reg);
        }
        for pattern in inner.patterns.iter() {
            if self.pumps.contains_key(pattern) {
                continue;
            }
            let sub = inner
                .node
                .subscribe(pattern)
                .await
                .map_err(|e| WasmError::Mesh {
                    app: inner.app.to_string(),
                    what: format!("subscribing to {pattern}"),
                    reason: e.to_string(),
                })?;
            self.pumps
                .insert(pattern.clone(), tokio::spawn(pump(weak.clone(), sub)));
        }
        Ok(())
    }

    /// Stops serving: withdraws its procedures (waiting for each
    /// withdrawal; one that fails is logged, the procedure is no longer
    /// served here either way), ends its subscriptions, frees the instance.
    pub async fn stop(mut self) {
        for (_, pump) in std::mem::take(&mut self.pumps) {
            pump.abort();
        }
        let app = self.app();
        for (_, reg) in std::mem::take(&mut self.registrations) {
            if let Err(e) = reg.withdraw().await {
                tracing::warn!(target: "macula::wasm", app, error = %e, "withdrawing a procedure failed");
            }
        }
        *self.slot.current().live.lock().await = None;
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for pump in self.pumps.values() {
            pump.abort();
        }
        let inner = self.slot.current();
        let host = &inner.host;
        host.running.lock().remove(&*inner.app);
        host.metrics.workloads.dec();
        tracing::info!(target: "macula::wasm", app = &*inner.app, "workload stopped");
    }
}

async fn serve(w: Weak<Slot>, req: macula::Request) -> macula::HandlerResult {
    let Some(inner) = w.upgrade().map(|slot| slot.current()) else {
        return Err(macula::HandlerError::new(
            CODE_UNAVAILABLE,
            "workload stopped",
        ));
    };
    inner.call(&req.procedure, req.payload).await
}

async fn pump(w: Weak<Slot>, mut sub: macula::Subscription) {
    while let Some(item) = sub.next().await {
        let Some(inner) = w.upgrade().map(|slot| slot.current()) else {
            return;
        };
        match item {
            macula::SubscriptionItem::Event(ev) => {
                inner.event(ev.topic.to_string(), ev.payload).await;
            }
            macula::SubscriptionItem::Lagged(n) => {
                inner
                    .host
                    .metrics
                    .events
                    .get_or_create(&metrics::app_and(&inner.app, "outcome", "lagged"))
                    .inc_by(n);
            }
        }
    }
}

/// Marks an outcome `cancelled` unless the call completes: a handler's
/// future is dropped at its deadline or when the caller cancels.
struct Outcome<'a> {
    inner: &'a Inner,
    family: &'a prometheus_client::metrics::family::Family<
        Vec<(&'static str, String)>,
        prometheus_client::metrics::counter::Counter,
    >,
    outcome: &'static str,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        self.family
            .get_or_create(&metrics::app_and(&self.inner.app, "outcome", self.outcome))
            .inc();
    }
}

impl Inner {
    async fn call(&self, procedure: &str, payload: Bytes) -> macula::HandlerResult {
        let metrics = self.host.metrics.clone();
        let mut outcome = Outcome {
            inner: self,
            family: &metrics.calls,
            outcome: "cancelled",
        };
        // One call at a time: hold the slot's lock for the whole call.
        let mut slot = self.live.lock().await;
        let mut live = match slot.take() {
            Some(live) => live,
            None => match self.restart().await {
                Ok(live) => live,
                Err(e) => {
                    outcome.outcome = "unavailable";
                    return Err(macula::HandlerError::new(CODE_UNAVAILABLE, e.to_string()));
                }
            },
        };
        if let Err(e) = live.store.set_fuel(self.host.limits.fuel_per_call) {
            outcome.outcome = "trap";
            return Err(macula::HandlerError::new(CODE_TRAP, e.to_string()));
        }
        let r = live
            .bindings
            .macula_mesh_handlers()
            .call_handle_call(&mut live.store, procedure, &payload)
            .await;
        match r {
            Ok(answer) => {
                *slot = Some(live);
                match answer {
                    Ok(bytes) => {
                        outcome.outcome = "ok";
                        Ok(Bytes::from(bytes))
                    }
                    Err(e) => {
                        outcome.outcome = "error";
                        Err(macula::HandlerError::new(e.code, e.message))
                    }
                }
            }
            Err(e) => {
                // The instance is dropped: the next call starts a new one.
                let e = self.host.failure(&self.app, &live.store, e);
                outcome.outcome = e.kind();
                let code = match e {
                    WasmError::LimitExceeded { .. } => CODE_LIMIT,
                    _ => CODE_TRAP,
                };
                Err(macula::HandlerError::new(code, e.to_string()))
            }
        }
    }

    async fn restart(&self) -> Result<Live, WasmError> {
        let again = Phase::Restart {
            procedures: self.procedures.clone(),
            patterns: self.patterns.clone(),
        };
        let (live, _) = self
            .host
            .instantiate(&self.app, &self.node, &self.compiled, &self.config, again)
            .await?;
        Ok(live)
    }

    async fn event(&self, topic: String, payload: Bytes) {
        let metrics = self.host.metrics.clone();
        let mut outcome = Outcome {
            inner: self,
            family: &metrics.events,
            outcome: "cancelled",
        };
        let mut slot = self.live.lock().await;
        let mut live = match slot.take() {
            Some(live) => live,
            None => match self.restart().await {
                Ok(live) => live,
                Err(_) => {
                    outcome.outcome = "unavailable";
                    return;
                }
            },
        };
        if live.store.set_fuel(self.host.limits.fuel_per_call).is_err() {
            outcome.outcome = "trap";
            return;
        }
        let r = live
            .bindings
            .macula_mesh_handlers()
            .call_handle_event(&mut live.store, &topic, &payload)
            .await;
        match r {
            Ok(()) => {
                *slot = Some(live);
                outcome.outcome = "ok";
            }
            Err(e) => outcome.outcome = self.host.failure(&self.app, &live.store, e).kind(),
        }
    }
}
