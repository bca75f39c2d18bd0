//! [`WasmHost`]: one wasmtime engine and linker per node, compiling
//! components and starting instances of them under [`WasmLimits`].

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, Trap};

use crate::bindings::Workload as Bindings;
use crate::error::{Limit, LimitHit, WasmError};
use crate::limits::WasmLimits;
use crate::metrics::{self, WasmMetrics};
use crate::state::{Phase, State};

/// The WebAssembly host of one node: compiles components (Cranelift) and
/// starts instances with fuel metering and a resource limiter. Cheap to
/// clone.
#[derive(Clone)]
pub struct WasmHost {
    pub(crate) engine: Engine,
    pub(crate) linker: Arc<Linker<State>>,
    pub(crate) limits: WasmLimits,
    pub(crate) metrics: Arc<WasmMetrics>,
    pub(crate) running: Arc<parking_lot::Mutex<std::collections::BTreeSet<String>>>,
    /// Nodes whose registries show this host's metrics.
    attached: Arc<parking_lot::Mutex<std::collections::BTreeSet<macula::NodeId>>>,
}

/// A compiled component, checked against world `macula:mesh/workload`.
#[derive(Clone)]
pub struct Compiled {
    pub(crate) component: Component,
    /// BLAKE3 of the component file, lowercase hex.
    pub hash: String,
}

/// A live instance: its store and its exports.
pub(crate) struct Live {
    pub(crate) store: Store<State>,
    pub(crate) bindings: Bindings,
}

impl WasmHost {
    /// A host with `limits` (checked).
    pub fn new(limits: WasmLimits) -> Result<WasmHost, WasmError> {
        limits.validate()?;
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(|e| WasmError::Config(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        Bindings::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| WasmError::Config(e.to_string()))?;
        Ok(WasmHost {
            engine,
            linker: Arc::new(linker),
            limits,
            metrics: Arc::new(WasmMetrics::default()),
            running: Arc::default(),
            attached: Arc::default(),
        })
    }

    /// The limits every workload of this host runs under.
    pub fn limits(&self) -> &WasmLimits {
        &self.limits
    }

    /// The host's counters.
    pub fn metrics(&self) -> &Arc<WasmMetrics> {
        &self.metrics
    }

    /// Adds `macula_wasm_*` to a metrics registry.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
    }

    /// Makes `node`'s `/metrics` show `macula_wasm_*` (through
    /// `Metrics::extend`): call it before the node's admin server starts.
    /// Once per node; a second call does nothing.
    pub fn attach_metrics(&self, node: &macula::Node) {
        if !self.attached.lock().insert(node.id()) {
            return;
        }
        let metrics = self.metrics.clone();
        node.metrics()
            .extend(Arc::new(move |registry| metrics.register(registry)));
    }

    /// Checks and compiles a component file: its size, its BLAKE3 hash when
    /// `expected_hash` is given (hex), that it is a valid component, and
    /// that the node can satisfy its imports. Every refusal is counted in
    /// `macula_wasm_refused_total{reason}`.
    pub fn compile(
        &self,
        app: &str,
        bytes: &[u8],
        expected_hash: Option<&str>,
    ) -> Result<Compiled, WasmError> {
        self.compile_inner(app, bytes, expected_hash)
            .inspect_err(|e| self.refused(e))
    }

    fn compile_inner(
        &self,
        app: &str,
        bytes: &[u8],
        expected_hash: Option<&str>,
    ) -> Result<Compiled, WasmError> {
        if bytes.len() > self.limits.max_component_bytes {
            return Err(WasmError::TooLarge {
                size: bytes.len(),
                max: self.limits.max_component_bytes,
            });
        }
        let hash = blake3::hash(bytes).to_hex().to_string();
        if let Some(expected) = expected_hash {
            if !expected.eq_ignore_ascii_case(&hash) {
                return Err(WasmError::HashMismatch {
                    expected: expected.to_string(),
                    actual: hash,
                });
            }
        }
        let started = Instant::now();
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        // Refuse now, not at the first instance, a component whose imports
        // the node does not offer or that lacks the world's exports.
        self.linker
            .instantiate_pre(&component)
            .map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        self.metrics
            .start_micros
            .get_or_create(&metrics::app_and(app, "phase", "compile"))
            .inc_by(started.elapsed().as_micros() as u64);
        Ok(Compiled { component, hash })
    }

    pub(crate) fn refused(&self, e: &WasmError) {
        self.metrics
            .refused
            .get_or_create(&vec![("reason", e.kind().to_string())])
            .inc();
    }

    /// Starts one instance of `compiled` and runs its `init` with `config`.
    /// Returns the instance and, for a first start, what `init` asked for.
    pub(crate) async fn instantiate(
        &self,
        app: &Arc<str>,
        node: &macula::Node,
        compiled: &Compiled,
        config: &[(String, String)],
        phase: Phase,
    ) -> Result<(Live, Phase), WasmError> {
        let started = Instant::now();
        let state = State::new(
            app.clone(),
            node.clone(),
            self.limits.clone(),
            self.metrics.clone(),
            phase,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store
            .set_fuel(self.limits.fuel_per_call)
            .map_err(|e| WasmError::Config(e.to_string()))?;
        let bindings = Bindings::instantiate_async(&mut store, &compiled.component, &self.linker)
            .await
            .map_err(|e| self.failure(app, &store, e))?;
        self.metrics
            .start_micros
            .get_or_create(&metrics::app_and(app, "phase", "instantiate"))
            .inc_by(started.elapsed().as_micros() as u64);
        self.metrics
            .instances
            .get_or_create(&metrics::app(app))
            .inc();
        let result = bindings
            .macula_mesh_handlers()
            .call_init(&mut store, config)
            .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                return Err(WasmError::Init {
                    app: app.to_string(),
                    reason,
                })
            }
            Err(e) => {
                let e = self.failure(app, &store, e);
                return Err(WasmError::Init {
                    app: app.to_string(),
                    reason: e.to_string(),
                });
            }
        }
        let asked = std::mem::replace(&mut store.data_mut().phase, Phase::Running);
        Ok((Live { store, bindings }, asked))
    }

    /// Starts one instance of `compiled` and runs its `init` with `config`,
    /// then drops it: checks that a component starts under these limits
    /// (and measures what it costs) without serving anything. Returns the
    /// procedures `init` asked to serve.
    pub async fn dry_run(
        &self,
        node: &macula::Node,
        app: &str,
        compiled: &Compiled,
        config: Vec<(String, String)>,
    ) -> Result<Vec<String>, WasmError> {
        let first = Phase::Init {
            procedures: Vec::new(),
            patterns: Vec::new(),
        };
        let (_live, asked) = self
            .instantiate(&Arc::from(app), node, compiled, &config, first)
            .await?;
        match asked {
            Phase::Init { procedures, .. } => Ok(procedures),
            _ => Ok(Vec::new()),
        }
    }

    /// What an error out of a call into an instance means: a limit (counted
    /// in `macula_wasm_limit_hits_total`) or a trap.
    pub(crate) fn failure(&self, app: &str, store: &Store<State>, e: wasmtime::Error) -> WasmError {
        let hit = e
            .downcast_ref::<LimitHit>()
            .cloned()
            .or_else(|| store.data().limiter.hit.clone());
        let (limit, max, key) = match (hit, e.downcast_ref::<Trap>()) {
            (Some(hit), _) => {
                let key = match hit.limit {
                    Limit::Memory => "wasm.max_memory_bytes",
                    Limit::Table => "wasm.max_table_elements",
                    Limit::Fuel => "wasm.fuel_per_call",
                };
                (hit.limit, hit.max, key)
            }
            (None, Some(Trap::OutOfFuel)) => {
                (Limit::Fuel, self.limits.fuel_per_call, "wasm.fuel_per_call")
            }
            _ => {
                tracing::warn!(target: "macula::wasm", app, error = %format!("{e:#}"), "component trapped");
                return WasmError::Trap {
                    app: app.to_string(),
                    reason: format!("{e:#}"),
                };
            }
        };
        self.metrics
            .limit_hits
            .get_or_create(&metrics::app_and(app, "limit", limit.as_str()))
            .inc();
        tracing::warn!(target: "macula::wasm", app, limit = limit.as_str(), max, "component stopped by a limit");
        WasmError::LimitExceeded {
            app: app.to_string(),
            limit,
            key,
            max,
        }
    }
}
