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
    /// Components replaced in place ([`crate::Workload::upgrade`]), by app.
    pub upgrades: Family<Labels, Counter>,
    /// Artifact chunks this node served to peers.
    pub artifact_chunks_served: Counter,
    /// Artifacts fetched from peers, by outcome (`ok`, `failed`).
    pub artifact_fetches: Family<Labels, Counter>,
    /// Artifact data refused on arrival, by reason (`chunk_hash`,
    /// `artifact_hash`, `manifest`, `size`): a peer that sent it is
    /// skipped.
    pub artifact_refused: Family<Labels, Counter>,
    /// Artifacts stored on this node.
    pub artifacts_stored: Gauge,
    /// Artifacts deleted to stay within `AgentOptions::max_artifacts`.
    pub artifacts_pruned: Counter,
    /// Orders to this node's agent to run a version, by outcome (`ok`,
    /// `failed`).
    pub agent_applies: Family<Labels, Counter>,
    /// Rollouts this node coordinated to their end, by strategy and
    /// outcome (`completed`, `rolled_back`, `failed`, `aborted`).
    pub rollouts: Family<Labels, Counter>,
    /// Health checks between batches, by outcome (`ok`, `failed`).
    pub health_checks: Family<Labels, Counter>,
}

pub(crate) fn app(app: &str) -> Labels {
    vec![("app", app.to_string())]
}

pub(crate) fn outcome(outcome: &str) -> Labels {
    vec![("outcome", outcome.to_string())]
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
        r.register(
            "upgrades",
            "Components replaced in place, by app",
            self.upgrades.clone(),
        );
        r.register(
            "artifact_chunks_served",
            "Artifact chunks served to peers",
            self.artifact_chunks_served.clone(),
        );
        r.register(
            "artifact_fetches",
            "Artifacts fetched from peers, by outcome",
            self.artifact_fetches.clone(),
        );
        r.register(
            "artifact_refused",
            "Artifact data refused on arrival, by reason",
            self.artifact_refused.clone(),
        );
        r.register(
            "artifacts_stored",
            "Artifacts stored on this node",
            self.artifacts_stored.clone(),
        );
        r.register(
            "artifacts_pruned",
            "Artifacts deleted to stay within the agent's max_artifacts",
            self.artifacts_pruned.clone(),
        );
        r.register(
            "agent_applies",
            "Orders to run a version applied by this node's agent, by outcome",
            self.agent_applies.clone(),
        );
        r.register(
            "rollouts",
            "Rollouts coordinated by this node, by strategy and outcome",
            self.rollouts.clone(),
        );
        r.register(
            "health_checks",
            "Health checks between rollout batches, by outcome",
            self.health_checks.clone(),
        );
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
        m.upgrades.get_or_create(&app("a")).inc();
        m.artifact_chunks_served.inc();
        m.artifact_fetches.get_or_create(&outcome("ok")).inc();
        m.artifact_refused
            .get_or_create(&vec![("reason", "chunk_hash".to_string())])
            .inc();
        m.artifacts_stored.set(1);
        m.artifacts_pruned.inc();
        m.agent_applies.get_or_create(&outcome("ok")).inc();
        m.rollouts
            .get_or_create(&vec![
                ("strategy", "rolling".to_string()),
                ("outcome", "completed".to_string()),
            ])
            .inc();
        m.health_checks.get_or_create(&outcome("ok")).inc();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, 17, "{text}");
        assert!(
            text.contains("macula_wasm_calls_total{app=\"a\",outcome=\"ok\"} 1"),
            "{text}"
        );
    }
}
