//! What every benchmark shares: which build produced a figure, and latency
//! percentiles. Each `bench_*` module imports this; this imports none.

/// "debug" or "release": every figure says which build produced it.
pub(crate) fn build_kind() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Appended to the text headline of a debug build's figures.
pub(crate) fn debug_note() -> &'static str {
    if cfg!(debug_assertions) {
        " (DEBUG build: use --release for figures)"
    } else {
        ""
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub samples: usize,
}

pub(crate) fn latency(ns: &mut [u64]) -> Latency {
    ns.sort_unstable();
    let at = |q: f64| {
        if ns.is_empty() {
            return 0.0;
        }
        let i = ((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1;
        ns[i] as f64 / 1e3
    };
    Latency {
        p50_us: at(0.50),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: ns.last().map_or(0.0, |v| *v as f64 / 1e3),
        samples: ns.len(),
    }
}
