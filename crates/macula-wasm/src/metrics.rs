//! `macula_wasm_*`: what the WebAssembly host counts. Registered into a
//! node's `/metrics` by [`crate::WasmHost::register`].

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Counters of one host (one node's workloads).
#[derive(Debug, Default)]
pub struct WasmMetrics {
    /// Workloads running.
    pub workloads: Gauge,
    /// Instances started (a workload's first and every restart after a
    /// limit or a trap), by app.
    pub instances: Family<Labels, Counter>,
    /// Time spent compiling and instantiating, by app and phase, in
    /// microseconds (`compile`, `instantiate`).
    pub start_micros: Family<Labels, Counter>,
    /// Calls into components by app and outcome (`ok`, `error`: the
    /// component answered an error, `memory_limit`, `table_limit`,
    /// `fuel_limit`, `trap`, `cancelled`).
    pub calls: Family<Labels, Counter>,
    /// Events handed to components by app and outcome (as `calls`, and
    /// `lagged`: lost before reaching the component, counted by the event).
    pub events: Family<Labels, Counter>,
    /// Limits reached by app and limit (`memory`, `table`, `fuel`).
    pub limit_hits: Family<Labels, Counter>,
    /// Components or workloads refused, by reason (`WasmError::kind`).
    pub refused: Family<Labels, Counter>,
    /// Log lines written by components, by app.
    pub logs: Family<Labels, Counter>,
}

pub(crate) fn app(app: &str) -> Labels {
    vec![("app", app.to_string())]
}

pub(crate) fn app_and(app: &str, key: &'static str, value: &str) -> Labels {
    vec![("app", app.to_string()), (key, value.to_string())]
}

impl WasmMetrics {
    /// Adds every family to `registry` (prefix `macula_wasm`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("macula_wasm");
        r.register("workloads", "Workloads running", self.workloads.clone());
        r.register(
            "instances",
            "Component instances started (first start and restarts)",
            self.instances.clone(),
        );
        r.register(
            "start_micros",
            "Microseconds spent compiling and instantiating components, by phase",
            self.start_micros.clone(),
        );
        r.register(
            "calls",
            "Calls into components by outcome",
            self.calls.clone(),
        );
        r.register(
            "events",
            "Events handed to components by outcome",
            self.events.clone(),
        );
        r.register(
            "limit_hits",
            "Instances stopped by a limit (memory, table, fuel)",
            self.limit_hits.clone(),
        );
        r.register(
            "refused",
            "Components or workloads refused, by reason",
            self.refused.clone(),
        );
        r.register("logs", "Log lines written by components", self.logs.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_registered_once_each() {
        let m = WasmMetrics::default();
        // Families without a sample are not written: give each one.
        m.calls.get_or_create(&app_and("a", "outcome", "ok")).inc();
        m.instances.get_or_create(&app("a")).inc();
        m.start_micros
            .get_or_create(&app_and("a", "phase", "compile"))
            .inc();
        m.events.get_or_create(&app_and("a", "outcome", "ok")).inc();
        m.limit_hits
            .get_or_create(&app_and("a", "limit", "fuel"))
            .inc();
        m.refused
            .get_or_create(&vec![("reason", "invalid".to_string())])
            .inc();
        m.logs.get_or_create(&app("a")).inc();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, 8, "{text}");
        assert!(
            text.contains("macula_wasm_calls_total{app=\"a\",outcome=\"ok\"} 1"),
            "{text}"
        );
    }
}
