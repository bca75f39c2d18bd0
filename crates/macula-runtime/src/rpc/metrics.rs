//! RPC counters (`macula_rpc_*`) and the call-duration histogram.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::metrics::{register, CountGauge};

/// Counters and gauges of a node's RPC.
#[derive(Debug, Default)]
pub struct RpcCounters {
    pub calls_total: Counter,
    pub calls_ok_total: Counter,
    pub calls_failed_total: Counter,
    pub calls_local_total: Counter,
    pub retries_total: Counter,
    pub inflight_calls: CountGauge,
    pub caller_overloaded_total: Counter,
    pub served_total: Counter,
    pub served_failed_total: Counter,
    pub handler_overloaded_total: Counter,
    pub handler_panics_total: Counter,
    pub handler_timeouts_total: Counter,
    pub cancelled_by_caller_total: Counter,
    pub not_found_total: Counter,
    pub unauthorized_total: Counter,
    /// Calls refused because their originator's signature did not verify.
    pub unproved_callers_total: Counter,
    pub serving: CountGauge,
    pub advertised: CountGauge,
    pub probes_failed_total: Counter,
    pub late_replies_total: Counter,
    /// Calls re-sent (same wire ID) over a new route after the replaceable
    /// connection carrying them died (the caller's side).
    pub resends_total: Counter,
    /// Re-sent copies of calls this provider had already received: the
    /// running call answers on the new route, or the kept answer is sent
    /// again; never run twice.
    pub resends_answered_total: Counter,
    /// Calls on replaceable connections refused because the recent-calls
    /// table was full of running calls.
    pub recent_full_total: Counter,
}

impl RpcCounters {
    /// Registers every metric in the node's registry.
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_rpc_resends",
            "Calls re-sent with the same ID over a new route after the relayed or hole-punched connection carrying them died.",
            self.resends_total.clone(),
        );
        register(
            r,
            "macula_rpc_resends_answered",
            "Re-sent calls this provider had already received, answered without running the handler again.",
            self.resends_answered_total.clone(),
        );
        register(
            r,
            "macula_rpc_recent_full",
            "Calls on relayed or hole-punched connections refused because the recent-calls table was full (RpcLimits::recent_calls).",
            self.recent_full_total.clone(),
        );
        register(
            r,
            "macula_rpc_calls",
            "Calls made by this node.",
            self.calls_total.clone(),
        );
        register(
            r,
            "macula_rpc_calls_ok",
            "Calls that got a reply.",
            self.calls_ok_total.clone(),
        );
        register(
            r,
            "macula_rpc_calls_failed",
            "Calls that ended in an error.",
            self.calls_failed_total.clone(),
        );
        register(
            r,
            "macula_rpc_calls_local",
            "Calls served in process by this node's own handler.",
            self.calls_local_total.clone(),
        );
        register(
            r,
            "macula_rpc_retries",
            "Retries on another provider after a retryable failure.",
            self.retries_total.clone(),
        );
        register(
            r,
            "macula_rpc_inflight_calls",
            "Calls outstanding now.",
            self.inflight_calls.clone(),
        );
        register(
            r,
            "macula_rpc_caller_overloaded",
            "Calls refused because this node's in-flight limit was reached.",
            self.caller_overloaded_total.clone(),
        );
        register(
            r,
            "macula_rpc_served",
            "Requests this node's handlers answered.",
            self.served_total.clone(),
        );
        register(
            r,
            "macula_rpc_served_failed",
            "Requests answered with an error (handler error, panic, timeout).",
            self.served_failed_total.clone(),
        );
        register(
            r,
            "macula_rpc_handler_overloaded",
            "Requests refused because the handler was at its concurrency limit.",
            self.handler_overloaded_total.clone(),
        );
        register(
            r,
            "macula_rpc_handler_panics",
            "Handler panics (the node keeps serving).",
            self.handler_panics_total.clone(),
        );
        register(
            r,
            "macula_rpc_handler_timeouts",
            "Requests abandoned at their deadline.",
            self.handler_timeouts_total.clone(),
        );
        register(
            r,
            "macula_rpc_cancelled_by_caller",
            "Requests whose caller cancelled them.",
            self.cancelled_by_caller_total.clone(),
        );
        register(
            r,
            "macula_rpc_not_found",
            "Requests for procedures this node does not serve.",
            self.not_found_total.clone(),
        );
        register(
            r,
            "macula_rpc_unauthorized",
            "Calls refused because the caller may not call the procedure (the realm's permissions).",
            self.unauthorized_total.clone(),
        );
        register(
            r,
            "macula_rpc_serving",
            "Requests being handled now.",
            self.serving.clone(),
        );
        register(
            r,
            "macula_rpc_advertised",
            "Procedures this node advertises.",
            self.advertised.clone(),
        );
        register(
            r,
            "macula_rpc_probes_failed",
            "Providers found dead by a liveness probe during a call.",
            self.probes_failed_total.clone(),
        );
        register(
            r,
            "macula_rpc_unproved_callers",
            "Calls refused (Unauthorized) because the signature of the caller that made them did not verify.",
            self.unproved_callers_total.clone(),
        );
        register(
            r,
            "macula_rpc_late_replies",
            "Replies that arrived after their call ended (ignored).",
            self.late_replies_total.clone(),
        );
    }
}

pub(crate) type DurationFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

pub(super) fn duration_histogram() -> Histogram {
    // 20 µs .. ~10 s.
    Histogram::new(exponential_buckets(0.000_02, 2.0, 20))
}
