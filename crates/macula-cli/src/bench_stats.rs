//! What every benchmark shares: which build produced a figure, latency
//! percentiles, and the clock shared by a benchmark's processes. Each `bench_*` module imports this; this imports none.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

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

/// Fresh data directories for a benchmark's nodes
/// (`<temp>/macula-bench-<name>-<pid>-<n>`), removed when dropped.
pub(crate) struct TempDirs {
    name: &'static str,
    dirs: Vec<PathBuf>,
}

impl TempDirs {
    pub(crate) fn new(name: &'static str) -> TempDirs {
        TempDirs {
            name,
            dirs: Vec::new(),
        }
    }

    pub(crate) fn make(&mut self) -> anyhow::Result<PathBuf> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "macula-bench-{}-{}-{}",
            self.name,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        self.dirs.push(d.clone());
        Ok(d)
    }
}

impl Drop for TempDirs {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A grant from realm authority `authority` to `node` with `rules` (ID
/// `[serial; 16]`, valid from 0 to far in the future), as bytes.
pub(crate) fn node_grant(
    authority: &ed25519_dalek::SigningKey,
    serial: u8,
    node: macula::NodeId,
    rules: &str,
) -> anyhow::Result<Vec<u8>> {
    use macula::auth::{policy::parse_rules, sign, Grant, GrantBody, Key, Subject};
    let realm = Key::of(authority);
    let body = GrantBody {
        realm,
        issuer: realm,
        id: [serial; 16],
        subject: Subject::Node(node),
        rules: parse_rules(rules)?,
        roles: vec![],
        not_before_ms: 0,
        expires_ms: u64::MAX / 2,
    };
    Ok(Grant {
        grant: sign(&body, authority)?,
        signer: None,
    }
    .to_bytes()?)
}
