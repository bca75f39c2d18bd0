//! Why a workload was refused, failed or stopped.

/// A limit of [`crate::WasmLimits`] that an instance reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_memory_bytes`: a linear memory would have grown past it.
    Memory,
    /// `max_table_elements`: a table would have grown past it.
    Table,
    /// `fuel_per_call`: one call into the component ran out of fuel.
    Fuel,
}

impl Limit {
    /// The metric label and the configuration key's suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Memory => "memory",
            Limit::Table => "table",
            Limit::Fuel => "fuel",
        }
    }
}

/// Raised inside the store by the resource limiter (memory, tables), and
/// found again in the error wasmtime returns.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{limit:?} limit of {max} reached (asked for {asked})", limit = .limit.as_str())]
pub struct LimitHit {
    pub limit: Limit,
    pub max: u64,
    pub asked: u64,
}

/// Errors of the WebAssembly host.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The limits given are not usable.
    #[error("invalid wasm limits: {0}")]
    Config(String),
    /// The file is larger than `max_component_bytes`.
    #[error("component of {size} bytes refused: larger than wasm.max_component_bytes ({max})")]
    TooLarge { size: usize, max: usize },
    /// The file's BLAKE3 hash is not the one expected.
    #[error("component refused: its BLAKE3 hash is {actual}, expected {expected}")]
    HashMismatch { expected: String, actual: String },
    /// Not a valid WebAssembly component, or not one of world
    /// `macula:mesh/workload` (a missing export, an import the node does
    /// not offer).
    #[error("component refused: {0}")]
    Invalid(String),
    /// `max_workloads` workloads already run on this node.
    #[error("workload {app} refused: this node already runs wasm.max_workloads ({max}) workloads")]
    TooManyWorkloads { app: String, max: usize },
    /// A workload of that name already runs here.
    #[error("workload {0} already runs on this node")]
    AlreadyRunning(String),
    /// The component's `init` returned an error or trapped.
    #[error("workload {app} refused: init failed: {reason}")]
    Init { app: String, reason: String },
    /// Advertising a procedure or subscribing for the component failed.
    #[error("workload {app}: {what} failed: {reason}")]
    Mesh {
        app: String,
        what: String,
        reason: String,
    },
    /// An instance reached a limit: it was stopped and is started afresh
    /// for the next call.
    #[error("workload {app}: {} limit reached ({key} = {max}); the instance was stopped", .limit.as_str())]
    LimitExceeded {
        app: String,
        limit: Limit,
        key: &'static str,
        max: u64,
    },
    /// The component trapped (a panic, an out-of-bounds access, ...): the
    /// instance was stopped and is started afresh for the next call.
    #[error("workload {app} trapped: {reason}")]
    Trap { app: String, reason: String },
    /// A call or event reached the workload after it was stopped.
    #[error("workload {0} is stopped")]
    Stopped(String),
}

impl WasmError {
    /// A short stable name for metrics and error reports.
    pub fn kind(&self) -> &'static str {
        match self {
            WasmError::Config(_) => "config",
            WasmError::TooLarge { .. } => "too_large",
            WasmError::HashMismatch { .. } => "hash_mismatch",
            WasmError::Invalid(_) => "invalid",
            WasmError::TooManyWorkloads { .. } => "too_many_workloads",
            WasmError::AlreadyRunning(_) => "already_running",
            WasmError::Init { .. } => "init_failed",
            WasmError::Mesh { .. } => "mesh",
            WasmError::LimitExceeded { limit, .. } => match limit {
                Limit::Memory => "memory_limit",
                Limit::Table => "table_limit",
                Limit::Fuel => "fuel_limit",
            },
            WasmError::Trap { .. } => "trap",
            WasmError::Stopped(_) => "stopped",
        }
    }
}
