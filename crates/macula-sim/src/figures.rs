//! Figures of a batch of lookups: percentiles and success, shared by the
//! engine (which measures) and the experiments that report them.

use macula_dht::LookupOutcome;

/// Median, 99th percentile and maximum of a sample (nearest-rank).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// 50th percentile.
    pub median: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest value.
    pub max: u64,
}

impl Percentiles {
    /// Of `values` (any order); all zero when empty.
    pub fn of(mut values: Vec<u64>) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_unstable();
        let rank = |p: usize| values[(values.len() * p).div_ceil(100).max(1) - 1];
        Percentiles {
            median: rank(50),
            p99: rank(99),
            max: values[values.len() - 1],
        }
    }
}

/// Aggregated figures of a batch of FIND_NODE lookups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LookupFigures {
    /// Lookups launched.
    pub n: usize,
    /// Of those, the target answered.
    pub n_found: usize,
    /// Rounds until termination (see [`macula_dht::LookupStats::rounds`]).
    pub rounds: Percentiles,
    /// Rounds until the target was learned, over found lookups (see
    /// [`macula_dht::LookupStats::hops`]).
    pub hops: Percentiles,
    /// Mean requests per lookup, retries included (each request also has a
    /// response unless lost).
    pub requests_mean: f64,
    /// Simulated lookup duration in ms.
    pub duration_ms: Percentiles,
}

impl LookupFigures {
    pub(crate) fn from_outcomes(outcomes: &[LookupOutcome], n: usize) -> LookupFigures {
        let found: Vec<&LookupOutcome> = outcomes.iter().filter(|o| o.found_target()).collect();
        let n_requests: u64 = outcomes.iter().map(|o| u64::from(o.stats.n_requests)).sum();
        LookupFigures {
            n,
            n_found: found.len(),
            rounds: Percentiles::of(outcomes.iter().map(|o| u64::from(o.stats.rounds)).collect()),
            hops: Percentiles::of(
                found
                    .iter()
                    .filter_map(|o| o.stats.hops.map(u64::from))
                    .collect(),
            ),
            requests_mean: if outcomes.is_empty() {
                0.0
            } else {
                n_requests as f64 / outcomes.len() as f64
            },
            duration_ms: Percentiles::of(
                outcomes
                    .iter()
                    .map(|o| o.stats.finished.saturating_sub(o.stats.started).0)
                    .collect(),
            ),
        }
    }

    /// Share of lookups that found their target (1.0 when none ran).
    pub fn success_rate(&self) -> f64 {
        if self.n == 0 {
            1.0
        } else {
            self.n_found as f64 / self.n as f64
        }
    }
}
