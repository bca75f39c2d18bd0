//! What every benchmark shares: which build produced a figure, latency
//! percentiles, and the clock shared by a benchmark's processes. Each `bench_*` module imports this; this imports none.

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

/// The median of a benchmark's per-round figures (the upper one of an even
/// count; 0 for none).
pub(crate) fn median(xs: impl IntoIterator<Item = f64>) -> f64 {
    let mut xs: Vec<f64> = xs.into_iter().collect();
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
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

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of this
/// machine, so a send time taken here can be compared with a receive time
/// taken in a child.
pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec for the call;
    // clock_gettime only writes to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
