//! RPC counters (`macula_rpc_*`) and the call-duration histogram, read at
//! scrape time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Counters, read by the metrics collector.
#[derive(Debug, Default)]
pub struct RpcCounters {
    pub calls_total: AtomicU64,
    pub calls_ok_total: AtomicU64,
    pub calls_failed_total: AtomicU64,
    pub calls_local_total: AtomicU64,
    pub retries_total: AtomicU64,
    pub inflight_calls: AtomicU64,
    pub caller_overloaded_total: AtomicU64,
    pub served_total: AtomicU64,
    pub served_failed_total: AtomicU64,
    pub handler_overloaded_total: AtomicU64,
    pub handler_panics_total: AtomicU64,
    pub handler_timeouts_total: AtomicU64,
    pub cancelled_by_caller_total: AtomicU64,
    pub not_found_total: AtomicU64,
    pub serving: AtomicU64,
    pub advertised: AtomicU64,
    pub probes_failed_total: AtomicU64,
    pub late_replies_total: AtomicU64,
}

impl RpcCounters {
    fn rows(&self) -> [(&'static str, &'static str, u64); 18] {
        let g = |a: &AtomicU64| a.load(Relaxed);
        [
            (
                "macula_rpc_calls_total",
                "Calls made by this node.",
                g(&self.calls_total),
            ),
            (
                "macula_rpc_calls_ok_total",
                "Calls that got a reply.",
                g(&self.calls_ok_total),
            ),
            (
                "macula_rpc_calls_failed_total",
                "Calls that ended in an error.",
                g(&self.calls_failed_total),
            ),
            (
                "macula_rpc_calls_local_total",
                "Calls served in process by this node's own handler.",
                g(&self.calls_local_total),
            ),
            (
                "macula_rpc_retries_total",
                "Retries on another provider after a retryable failure.",
                g(&self.retries_total),
            ),
            (
                "macula_rpc_inflight_calls",
                "Calls outstanding now.",
                g(&self.inflight_calls),
            ),
            (
                "macula_rpc_caller_overloaded_total",
                "Calls refused because this node's in-flight limit was reached.",
                g(&self.caller_overloaded_total),
            ),
            (
                "macula_rpc_served_total",
                "Requests this node's handlers answered.",
                g(&self.served_total),
            ),
            (
                "macula_rpc_served_failed_total",
                "Requests answered with an error (handler error, panic, timeout).",
                g(&self.served_failed_total),
            ),
            (
                "macula_rpc_handler_overloaded_total",
                "Requests refused because the handler was at its concurrency limit.",
                g(&self.handler_overloaded_total),
            ),
            (
                "macula_rpc_handler_panics_total",
                "Handler panics (the node keeps serving).",
                g(&self.handler_panics_total),
            ),
            (
                "macula_rpc_handler_timeouts_total",
                "Requests abandoned at their deadline.",
                g(&self.handler_timeouts_total),
            ),
            (
                "macula_rpc_cancelled_by_caller_total",
                "Requests whose caller cancelled them.",
                g(&self.cancelled_by_caller_total),
            ),
            (
                "macula_rpc_not_found_total",
                "Requests for procedures this node does not serve.",
                g(&self.not_found_total),
            ),
            (
                "macula_rpc_serving",
                "Requests being handled now.",
                g(&self.serving),
            ),
            (
                "macula_rpc_advertised",
                "Procedures this node advertises.",
                g(&self.advertised),
            ),
            (
                "macula_rpc_probes_failed_total",
                "Providers found dead by a liveness probe during a call.",
                g(&self.probes_failed_total),
            ),
            (
                "macula_rpc_late_replies_total",
                "Replies that arrived after their call ended (ignored).",
                g(&self.late_replies_total),
            ),
        ]
    }
}

pub(crate) type DurationFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

pub(super) fn duration_histogram() -> Histogram {
    // 20 µs .. ~10 s.
    Histogram::new(exponential_buckets(0.000_02, 2.0, 20))
}

/// Exposes a node's RPC counters and call-duration histogram.
#[derive(Debug, Clone)]
pub struct RpcCollector {
    pub(super) counters: Arc<RpcCounters>,
}

impl prometheus_client::collector::Collector for RpcCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        crate::metrics::encode_rows(&mut encoder, &self.counters.rows())
    }
}
