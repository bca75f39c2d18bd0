//! What one component instance's store holds: the node it asks, the
//! resource limiter, and what `init` asked for. Implements the WIT `host`
//! interface.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::bindings::macula::mesh::host::{Host, Level};
use crate::error::{Limit, LimitHit};
use crate::limits::WasmLimits;
use crate::metrics::{self, WasmMetrics};

/// Where an instance is in its life: `init` may advertise and subscribe,
/// nothing after it may.
#[derive(Debug)]
pub(crate) enum Phase {
    /// The first `init`: what it asks for is recorded.
    Init {
        procedures: Vec<String>,
        patterns: Vec<String>,
    },
    /// `init` of an instance started again after a limit or a trap: the
    /// node already serves what the first asked for; the same requests are
    /// accepted, new ones refused.
    Restart {
        procedures: Arc<[String]>,
        patterns: Arc<[String]>,
    },
    /// Serving.
    Running,
}

/// The resource limiter of one instance (memories and tables).
#[derive(Debug)]
pub(crate) struct Limiter {
    max_memory: u64,
    max_table: u64,
    /// Bytes of linear memory now.
    pub(crate) memory: u64,
    /// The limit that stopped the instance, if one did.
    pub(crate) hit: Option<LimitHit>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory - current as u64 + desired as u64;
        if total > self.max_memory {
            let hit = LimitHit {
                limit: Limit::Memory,
                max: self.max_memory,
                asked: total,
            };
            self.hit = Some(hit.clone());
            // An error, not `Ok(false)`: the instance stops here with a
            // clear reason instead of running on with a failed allocation.
            return Err(wasmtime::Error::new(hit));
        }
        self.memory = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.max_table {
            let hit = LimitHit {
                limit: Limit::Table,
                max: self.max_table,
                asked: desired as u64,
            };
            self.hit = Some(hit.clone());
            return Err(wasmtime::Error::new(hit));
        }
        Ok(true)
    }
}

/// The data of one instance's store.
pub(crate) struct State {
    pub(crate) app: Arc<str>,
    pub(crate) node: macula::Node,
    pub(crate) limits: WasmLimits,
    pub(crate) metrics: Arc<WasmMetrics>,
    pub(crate) limiter: Limiter,
    pub(crate) phase: Phase,
}

impl State {
    pub(crate) fn new(
        app: Arc<str>,
        node: macula::Node,
        limits: WasmLimits,
        metrics: Arc<WasmMetrics>,
        phase: Phase,
    ) -> State {
        let limiter = Limiter {
            max_memory: limits.max_memory_bytes,
            max_table: limits.max_table_elements,
            memory: 0,
            hit: None,
        };
        State {
            app,
            node,
            limits,
            metrics,
            limiter,
            phase,
        }
    }

    fn timeout(&self, ms: u32) -> Duration {
        if ms == 0 {
            self.limits.call_timeout
        } else {
            Duration::from_millis(u64::from(ms))
        }
    }
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl Host for State {
    async fn log(&mut self, level: Level, message: String) {
        self.metrics
            .logs
            .get_or_create(&metrics::app(&self.app))
            .inc();
        let message = cut(message, self.limits.max_log_bytes);
        let app = &*self.app;
        match level {
            Level::Trace => tracing::trace!(target: "macula::wasm", app, "{message}"),
            Level::Debug => tracing::debug!(target: "macula::wasm", app, "{message}"),
            Level::Info => tracing::info!(target: "macula::wasm", app, "{message}"),
            Level::Warn => tracing::warn!(target: "macula::wasm", app, "{message}"),
            Level::Error => tracing::error!(target: "macula::wasm", app, "{message}"),
        }
    }

    async fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        self.node
            .publish(&topic, Bytes::from(payload))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn call(
        &mut self,
        procedure: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, String> {
        let timeout = self.timeout(timeout_ms);
        self.node
            .call(&procedure, Bytes::from(payload))
            .timeout(timeout)
            .await
            .map(|r| r.payload.to_vec())
            .map_err(|e| e.to_string())
    }

    async fn advertise(&mut self, procedure: String) -> Result<(), String> {
        macula::names::validate_procedure(&procedure)
            .map_err(|e| format!("invalid procedure {procedure:?}: {e}"))?;
        let max = self.limits.max_procedures;
        match &mut self.phase {
            Phase::Init { procedures, .. } => {
                if procedures.contains(&procedure) {
                    return Err(format!("{procedure} already advertised"));
                }
                if procedures.len() >= max {
                    return Err(format!("more than wasm.max_procedures ({max}) procedures"));
                }
                procedures.push(procedure);
                Ok(())
            }
            Phase::Restart { procedures, .. } if procedures.contains(&procedure) => Ok(()),
            Phase::Restart { .. } => Err(format!(
                "{procedure} was not advertised by the first instance"
            )),
            Phase::Running => Err("advertise is only allowed in init".to_string()),
        }
    }

    async fn subscribe(&mut self, pattern: String) -> Result<(), String> {
        macula::names::validate_pattern(&pattern)
            .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
        let max = self.limits.max_subscriptions;
        match &mut self.phase {
            Phase::Init { patterns, .. } => {
                if patterns.contains(&pattern) {
                    return Err(format!("{pattern} already subscribed"));
                }
                if patterns.len() >= max {
                    return Err(format!(
                        "more than wasm.max_subscriptions ({max}) subscriptions"
                    ));
                }
                patterns.push(pattern);
                Ok(())
            }
            Phase::Restart { patterns, .. } if patterns.contains(&pattern) => Ok(()),
            Phase::Restart { .. } => Err(format!(
                "{pattern} was not subscribed by the first instance"
            )),
            Phase::Running => Err("subscribe is only allowed in init".to_string()),
        }
    }

    async fn kv_get(&mut self, group: String, key: String) -> Result<Option<Vec<u8>>, String> {
        let kv = self.node.kv(&group, self.limits.call_timeout);
        kv.get(key.as_bytes())
            .await
            .map(|v| v.map(|kv| kv.value))
            .map_err(|e| e.to_string())
    }

    async fn kv_put(&mut self, group: String, key: String, value: Vec<u8>) -> Result<(), String> {
        let kv = self.node.kv(&group, self.limits.call_timeout);
        kv.put(key.as_bytes(), &value)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    fn limiter(max_memory: u64) -> Limiter {
        Limiter {
            max_memory,
            max_table: 10,
            memory: 0,
            hit: None,
        }
    }

    #[test]
    fn memory_is_counted_across_memories_and_capped() {
        let mut l = limiter(100);
        assert!(l.memory_growing(0, 60, None).unwrap());
        assert_eq!(l.memory, 60);
        // A second memory of 50 would make 110.
        let e = l.memory_growing(0, 50, None).unwrap_err();
        let hit = e.downcast_ref::<LimitHit>().unwrap();
        assert_eq!((hit.limit, hit.max, hit.asked), (Limit::Memory, 100, 110));
        assert_eq!(l.memory, 60);
        // Growing the first one to its cap is fine.
        assert!(l.memory_growing(60, 100, None).unwrap());
        assert_eq!(l.memory, 100);
    }

    #[test]
    fn tables_are_capped() {
        let mut l = limiter(100);
        assert!(l.table_growing(0, 10, None).unwrap());
        let e = l.table_growing(10, 11, None).unwrap_err();
        assert_eq!(e.downcast_ref::<LimitHit>().unwrap().limit, Limit::Table);
        assert_eq!(l.hit.as_ref().unwrap().limit, Limit::Table);
    }

    #[test]
    fn long_log_lines_are_cut_on_a_char_boundary() {
        assert_eq!(cut("héllo".to_string(), 2), "h...");
        assert_eq!(cut("abc".to_string(), 3), "abc");
    }
}
