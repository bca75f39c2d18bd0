//! [`Workload`]: a component running on a node. Its procedures are
//! advertised through the node's RPC and its subscriptions made through
//! the node's pub/sub, exactly as an application's would be; each call or
//! event enters the one instance in turn.

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

/// A running workload. Dropping it (or [`Workload::stop`]) withdraws its
/// procedures, ends its subscriptions and frees its instance.
pub struct Workload {
    inner: Arc<Inner>,
    registrations: Vec<macula::Registration>,
    pumps: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("app", &self.inner.app)
            .field("hash", &self.inner.compiled.hash)
            .field("procedures", &self.inner.procedures)
            .field("patterns", &self.inner.patterns)
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
        let first = Phase::Init {
            procedures: Vec::new(),
            patterns: Vec::new(),
        };
        let (live, asked) = self
            .instantiate(&name, node, compiled, &config, first)
            .await?;
        let Phase::Init {
            procedures,
            patterns,
        } = asked
        else {
            unreachable!("a first instance's phase is Init");
        };
        let inner = Arc::new(Inner {
            app: name.clone(),
            host: self.clone(),
            node: node.clone(),
            compiled: compiled.clone(),
            config,
            procedures: procedures.into(),
            patterns: patterns.into(),
            live: tokio::sync::Mutex::new(Some(live)),
        });
        // From here on, dropping the workload undoes its start.
        guard.host = None;
        self.metrics.workloads.inc();
        let mut workload = Workload {
            inner: inner.clone(),
            registrations: Vec::new(),
            pumps: Vec::new(),
        };
        let weak = Arc::downgrade(&inner);
        for procedure in inner.procedures.iter() {
            let w = weak.clone();
            let reg = node
                .advertise(procedure, move |req: macula::Request| {
                    let w = w.clone();
                    async move { serve(w, req).await }
                })
                .await
                .map_err(|e| WasmError::Mesh {
                    app: app.to_string(),
                    what: format!("advertising {procedure}"),
                    reason: e.to_string(),
                })?;
            workload.registrations.push(reg);
        }
        for pattern in inner.patterns.iter() {
            let sub = node.subscribe(pattern).await.map_err(|e| WasmError::Mesh {
                app: app.to_string(),
                what: format!("subscribing to {pattern}"),
                reason: e.to_string(),
            })?;
            workload.pumps.push(tokio::spawn(pump(weak.clone(), sub)));
        }
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
    pub fn app(&self) -> &str {
        &self.inner.app
    }

    /// The component's BLAKE3 hash (hex).
    pub fn hash(&self) -> &str {
        &self.inner.compiled.hash
    }

    /// The procedures it serves.
    pub fn procedures(&self) -> &[String] {
        &self.inner.procedures
    }

    /// The patterns it subscribed to.
    pub fn patterns(&self) -> &[String] {
        &self.inner.patterns
    }

    /// Calls the component's handler directly, without the mesh (what a
    /// call through the node ends in); for benchmarks and tests.
    pub async fn call(&self, procedure: &str, payload: Bytes) -> macula::HandlerResult {
        self.inner.call(procedure, payload).await
    }

    /// Stops serving: withdraws its procedures (waiting for each
    /// withdrawal; one that fails is logged, the procedure is no longer
    /// served here either way), ends its subscriptions, frees the instance.
    pub async fn stop(mut self) {
        for pump in self.pumps.drain(..) {
            pump.abort();
        }
        for reg in self.registrations.drain(..) {
            if let Err(e) = reg.withdraw().await {
                tracing::warn!(target: "macula::wasm", app = &*self.inner.app, error = %e, "withdrawing a procedure failed");
            }
        }
        *self.inner.live.lock().await = None;
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for pump in &self.pumps {
            pump.abort();
        }
        let host = &self.inner.host;
        host.running.lock().remove(&*self.inner.app);
        host.metrics.workloads.dec();
        tracing::info!(target: "macula::wasm", app = &*self.inner.app, "workload stopped");
    }
}

async fn serve(w: Weak<Inner>, req: macula::Request) -> macula::HandlerResult {
    let Some(inner) = w.upgrade() else {
        return Err(macula::HandlerError::new(
            CODE_UNAVAILABLE,
            "workload stopped",
        ));
    };
    inner.call(&req.procedure, req.payload).await
}

async fn pump(w: Weak<Inner>, mut sub: macula::Subscription) {
    while let Some(item) = sub.next().await {
        let Some(inner) = w.upgrade() else { return };
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
