//! Per-instance and per-node limits of workloads (docs/WASM.md "Limits").
//! Each has a default here, a flag of `macula workload run`, a metric
//! (`macula_wasm_limit_hits_total{limit}`, `macula_wasm_refused_total{reason}`)
//! and an error naming it ([`crate::WasmError`]).

use std::time::Duration;

use crate::error::WasmError;

/// Limits of the WebAssembly host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmLimits {
    /// Linear memory of one instance, all memories together (default 64 MiB).
    pub max_memory_bytes: u64,
    /// Elements of one instance's tables (default 20,000).
    pub max_table_elements: u64,
    /// Fuel of one call into a component (`init`, one RPC call, one event):
    /// roughly one unit per WebAssembly instruction (default 1,000,000,000,
    /// about a second of work). Host calls (publish, call, KV) cost none
    /// while they wait.
    pub fuel_per_call: u64,
    /// Size of a component file (default 16 MiB).
    pub max_component_bytes: usize,
    /// Workloads running on one node (default 64).
    pub max_workloads: usize,
    /// Procedures one workload advertises (default 64).
    pub max_procedures: usize,
    /// Subscriptions of one workload (default 64).
    pub max_subscriptions: usize,
    /// Timeout of the host's `call` when the component passes 0, and of its
    /// KV requests (default 5 s).
    pub call_timeout: Duration,
    /// Bytes of one `log` line; longer ones are cut (default 4 KiB).
    pub max_log_bytes: usize,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits {
            max_memory_bytes: 64 << 20,
            max_table_elements: 20_000,
            fuel_per_call: 1_000_000_000,
            max_component_bytes: 16 << 20,
            max_workloads: 64,
            max_procedures: 64,
            max_subscriptions: 64,
            call_timeout: Duration::from_secs(5),
            max_log_bytes: 4096,
        }
    }
}

impl WasmLimits {
    /// Refuses limits that would make every workload fail.
    pub fn validate(&self) -> Result<(), WasmError> {
        let zero = [
            ("max_memory_bytes", self.max_memory_bytes == 0),
            ("fuel_per_call", self.fuel_per_call == 0),
            ("max_component_bytes", self.max_component_bytes == 0),
            ("max_workloads", self.max_workloads == 0),
            ("call_timeout", self.call_timeout.is_zero()),
        ];
        for (key, is_zero) in zero {
            if is_zero {
                return Err(WasmError::Config(format!("wasm.{key} must be above 0")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zero_is_refused() {
        WasmLimits::default().validate().unwrap();
        let l = WasmLimits {
            fuel_per_call: 0,
            ..WasmLimits::default()
        };
        let e = l.validate().unwrap_err().to_string();
        assert!(e.contains("wasm.fuel_per_call"), "{e}");
    }
}
