//! Choosing a provider for a call, and what we learn from each outcome.
//!
//! The [`Balancer`] keeps, per provider, a circuit [`Breaker`] and a latency
//! estimate (EWMA), and per procedure a round-robin cursor. `pick` filters
//! the candidates (not excluded, breaker available), orders them by key so
//! the choice does not depend on the order a lookup returned them in, and
//! applies the [`Strategy`].

use std::collections::HashMap;
use std::hash::Hash;

use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::{Millis, Rng};

/// How to choose among usable providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Each in turn (per procedure).
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// The lower latency estimate of two random providers ("power of two
    /// choices": adapts to slow providers without herding onto one).
    /// Providers with no estimate yet count as fastest, so they get tried.
    LeastLatency,
    /// At random in proportion to the advertised weights (all zero:
    /// uniformly).
    Weighted,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::LeastLatency => "least_latency",
            Strategy::Weighted => "weighted",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.replace('-', "_").as_str() {
            "round_robin" => Ok(Strategy::RoundRobin),
            "random" => Ok(Strategy::Random),
            "least_latency" => Ok(Strategy::LeastLatency),
            "weighted" => Ok(Strategy::Weighted),
            other => Err(format!(
                "unknown strategy {other:?} (round-robin, random, least-latency, weighted)"
            )),
        }
    }
}

/// What a call told us about the provider it went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (a reply or an application error) in `latency_us`.
    Success { latency_us: u64 },
    /// Unreachable, overloaded, not serving, or silent past the deadline.
    Failure,
    /// The caller gave up first; says nothing about the provider.
    Abandoned,
}

/// Bounds on the balancer's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalancerLimits {
    /// Providers with breaker/latency state; past it, the least recently
    /// used provider whose breaker is closed is forgotten.
    pub max_providers: usize,
    /// Procedures with a round-robin cursor; past it, all cursors reset.
    pub max_procedures: usize,
}

impl Default for BalancerLimits {
    fn default() -> Self {
        BalancerLimits {
            max_providers: 10_000,
            max_procedures: 10_000,
        }
    }
}

#[derive(Debug, Clone)]
struct ProviderState {
    breaker: Breaker,
    /// Latency estimate in microseconds (EWMA, weight 1/5 on the newest).
    ewma_us: Option<u64>,
    last_used: Millis,
}

/// Provider choice with per-provider breakers and latency estimates.
#[derive(Debug, Clone)]
pub struct Balancer<K> {
    breaker_cfg: BreakerConfig,
    limits: BalancerLimits,
    rng: Rng,
    providers: HashMap<K, ProviderState>,
    cursors: HashMap<String, u64>,
}

impl<K: Clone + Eq + Hash + Ord> Balancer<K> {
    pub fn new(breaker_cfg: BreakerConfig, limits: BalancerLimits, seed: u64) -> Balancer<K> {
        Balancer {
            breaker_cfg,
            limits,
            rng: Rng::new(seed),
            providers: HashMap::new(),
            cursors: HashMap::new(),
        }
    }

    /// Chooses a provider of `procedure` among `candidates` (key, weight),
    /// skipping `exclude` and providers whose breaker refuses calls at
    /// `now`. None if no candidate is usable.
    pub fn pick(
        &mut self,
        procedure: &str,
        strategy: Strategy,
        candidates: &[(K, u32)],
        exclude: &[K],
        now: Millis,
    ) -> Option<K> {
        let mut usable: Vec<&(K, u32)> = candidates
            .iter()
            .filter(|(k, _)| !exclude.contains(k))
            .filter(|(k, _)| {
                self.providers
                    .get(k)
                    .is_none_or(|p| p.breaker.available(now))
            })
            .collect();
        if usable.is_empty() {
            return None;
        }
        usable.sort_by(|a, b| a.0.cmp(&b.0));
        usable.dedup_by(|a, b| a.0 == b.0);
        let n = usable.len();
        let idx = match strategy {
            Strategy::RoundRobin => {
                if self.cursors.len() >= self.limits.max_procedures
                    && !self.cursors.contains_key(procedure)
                {
                    self.cursors.clear();
                }
                let c = self.cursors.entry(procedure.to_string()).or_insert(0);
                let i = (*c % n as u64) as usize;
                *c = c.wrapping_add(1);
                i
            }
            Strategy::Random => self.rng.below(n as u64) as usize,
            Strategy::LeastLatency => {
                if n == 1 {
                    0
                } else {
                    let a = self.rng.below(n as u64) as usize;
                    let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                    let est = |k: &K| self.providers.get(k).and_then(|p| p.ewma_us).unwrap_or(0);
                    // A tie goes to the first one sampled.
                    if est(&usable[b].0) < est(&usable[a].0) {
                        b
                    } else {
                        a
                    }
                }
            }
            Strategy::Weighted => {
                let total: u64 = usable.iter().map(|(_, w)| u64::from(*w)).sum();
                if total == 0 {
                    self.rng.below(n as u64) as usize
                } else {
                    // r < total, so some weight's interval holds it.
                    let mut r = self.rng.below(total);
                    usable
                        .iter()
                        .position(|(_, w)| {
                            let w = u64::from(*w);
                            let here = r < w;
                            r = r.saturating_sub(w);
                            here
                        })
                        .unwrap_or_default()
                }
            }
        };
        let key = usable[idx].0.clone();
        let state = self.state_mut(&key, now);
        match state {
            Some(s) => {
                s.last_used = now;
                // `available` held above, so this succeeds (and takes the
                // probe slot if half-open).
                s.breaker.acquire(now).then_some(key)
            }
            None => Some(key),
        }
    }

    /// Reports how a call to `provider` ended.
    pub fn record(&mut self, provider: &K, outcome: Outcome, now: Millis) {
        let Some(s) = self.state_mut(provider, now) else {
            return;
        };
        s.last_used = now;
        match outcome {
            Outcome::Success { latency_us } => {
                s.breaker.on_success();
                s.ewma_us = Some(match s.ewma_us {
                    None => latency_us,
                    Some(e) => (e.saturating_mul(4).saturating_add(latency_us)) / 5,
                });
            }
            Outcome::Failure => s.breaker.on_failure(now),
            Outcome::Abandoned => s.breaker.on_abandon(),
        }
    }

    /// The breaker state of `provider` at `now` (closed if unknown).
    pub fn breaker_state(&self, provider: &K, now: Millis) -> BreakerState {
        self.providers
            .get(provider)
            .map_or(BreakerState::Closed, |p| p.breaker.state(now))
    }

    /// The latency estimate of `provider`, if any call has succeeded.
    pub fn latency_us(&self, provider: &K) -> Option<u64> {
        self.providers.get(provider).and_then(|p| p.ewma_us)
    }

    /// Providers tracked, with their breaker state at `now`.
    pub fn providers(&self, now: Millis) -> Vec<(K, BreakerState, Option<u64>)> {
        let mut v: Vec<_> = self
            .providers
            .iter()
            .map(|(k, p)| (k.clone(), p.breaker.state(now), p.ewma_us))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// State for `key`, created if there is room (evicting the least
    /// recently used provider with a closed breaker if needed). None when
    /// full of providers whose breakers are not closed: the call is then
    /// simply not tracked.
    fn state_mut(&mut self, key: &K, now: Millis) -> Option<&mut ProviderState> {
        if !self.providers.contains_key(key) {
            if self.providers.len() >= self.limits.max_providers {
                let victim = self
                    .providers
                    .iter()
                    .filter(|(_, p)| p.breaker.state(now) == BreakerState::Closed)
                    .min_by_key(|(_, p)| p.last_used)
                    .map(|(k, _)| k.clone());
                self.providers.remove(&victim?);
            }
            self.providers.insert(
                key.clone(),
                ProviderState {
                    breaker: Breaker::new(self.breaker_cfg),
                    ewma_us: None,
                    last_used: now,
                },
            );
        }
        self.providers.get_mut(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bal() -> Balancer<u32> {
        Balancer::new(BreakerConfig::default(), BalancerLimits::default(), 42)
    }

    #[test]
    fn round_robin_is_even_and_order_independent() {
        let mut b = bal();
        let mut counts = [0u32; 3];
        for i in 0..300 {
            // Candidates arrive in a different order each time.
            let mut c = vec![(0u32, 1u32), (1, 1), (2, 1)];
            c.rotate_left(i % 3);
            let k = b
                .pick("p", Strategy::RoundRobin, &c, &[], Millis(0))
                .unwrap();
            counts[k as usize] += 1;
            b.record(&k, Outcome::Success { latency_us: 10 }, Millis(0));
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn weighted_follows_weights() {
        let mut b = bal();
        let c = [(0u32, 1u32), (1, 3), (2, 0)];
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            let k = b.pick("p", Strategy::Weighted, &c, &[], Millis(0)).unwrap();
            counts[k as usize] += 1;
        }
        assert_eq!(counts[2], 0, "weight 0 is never chosen while others exist");
        let ratio = f64::from(counts[1]) / f64::from(counts[0]);
        assert!((2.7..3.3).contains(&ratio), "{counts:?}");
    }

    #[test]
    fn least_latency_prefers_the_fast_provider() {
        let mut b = bal();
        let c = [(0u32, 1u32), (1, 1), (2, 1)];
        for (k, lat) in [(0, 5_000), (1, 100), (2, 5_000)] {
            b.record(&k, Outcome::Success { latency_us: lat }, Millis(0));
        }
        let mut fast = 0;
        for _ in 0..3000 {
            if b.pick("p", Strategy::LeastLatency, &c, &[], Millis(0)) == Some(1) {
                fast += 1;
            }
        }
        // Picked whenever it is one of the two sampled: 2/3 of the time.
        assert!((1800..2200).contains(&fast), "{fast}");
    }

    #[test]
    fn open_breakers_and_exclusions_are_skipped() {
        let mut b = bal();
        let c = [(0u32, 1u32), (1, 1)];
        for _ in 0..5 {
            b.record(&0, Outcome::Failure, Millis(100));
        }
        assert_eq!(b.breaker_state(&0, Millis(100)), BreakerState::Open);
        for _ in 0..10 {
            assert_eq!(
                b.pick("p", Strategy::RoundRobin, &c, &[], Millis(200)),
                Some(1)
            );
        }
        assert_eq!(
            b.pick("p", Strategy::RoundRobin, &c, &[1], Millis(200)),
            None
        );
        // After the open period: one probe to 0, then 0 is not usable until
        // the probe's outcome is known.
        assert_eq!(
            b.pick("p", Strategy::RoundRobin, &c, &[1], Millis(1100)),
            Some(0)
        );
        assert_eq!(
            b.pick("p", Strategy::RoundRobin, &c, &[1], Millis(1100)),
            None
        );
        b.record(&0, Outcome::Success { latency_us: 1 }, Millis(1101));
        assert_eq!(b.breaker_state(&0, Millis(1101)), BreakerState::Closed);
    }

    #[test]
    fn state_is_bounded() {
        let mut b: Balancer<u32> = Balancer::new(
            BreakerConfig::default(),
            BalancerLimits {
                max_providers: 4,
                max_procedures: 2,
            },
            1,
        );
        for k in 0..100u32 {
            b.record(&k, Outcome::Success { latency_us: 1 }, Millis(u64::from(k)));
            let _ = b.pick(
                &format!("p{k}"),
                Strategy::RoundRobin,
                &[(k, 1)],
                &[],
                Millis(0),
            );
        }
        assert!(b.providers(Millis(0)).len() <= 4);
        assert!(b.cursors.len() <= 2);
    }

    #[test]
    fn round_robin_cursors_are_per_procedure_and_bounded() {
        let mut b: Balancer<u32> = Balancer::new(
            BreakerConfig::default(),
            BalancerLimits {
                max_providers: 10,
                max_procedures: 2,
            },
            1,
        );
        let c = [(3u32, 1u32), (1, 1), (2, 1)];
        let mut pick = |p: &str| b.pick(p, Strategy::RoundRobin, &c, &[], Millis(0));
        assert_eq!(
            [pick("a"), pick("a"), pick("b"), pick("a"), pick("a")],
            [Some(1), Some(2), Some(1), Some(3), Some(1)]
        );
        // A third procedure resets every cursor (bounded state).
        assert_eq!(pick("c"), Some(1));
        assert_eq!(pick("a"), Some(1));
        // Duplicates in the candidates count once.
        let dup = [(1u32, 1u32), (1, 1), (2, 1)];
        let mut b2 = bal();
        let seq: Vec<_> = (0..4)
            .map(|_| b2.pick("p", Strategy::RoundRobin, &dup, &[], Millis(0)))
            .collect();
        assert_eq!(seq, [Some(1), Some(2), Some(1), Some(2)]);
    }

    #[test]
    fn least_latency_takes_the_faster_of_two_and_tries_unknown_providers() {
        let mut b = bal();
        let c = [(0u32, 1u32), (1, 1)];
        b.record(&0, Outcome::Success { latency_us: 900 }, Millis(0));
        b.record(&1, Outcome::Success { latency_us: 901 }, Millis(0));
        for _ in 0..200 {
            assert_eq!(
                b.pick("p", Strategy::LeastLatency, &c, &[], Millis(0)),
                Some(0)
            );
        }
        // A provider never measured counts as fastest.
        let c3 = [(0u32, 1u32), (1, 1), (2, 1)];
        let mut two = 0;
        for _ in 0..600 {
            match b.pick("p", Strategy::LeastLatency, &c3, &[], Millis(0)) {
                Some(2) => two += 1,
                Some(1) => panic!("1 is never the faster of two"),
                _ => {}
            }
        }
        assert!((350..450).contains(&two), "{two}");
        // Equal estimates: either, at random.
        b.record(&2, Outcome::Success { latency_us: 900 }, Millis(0));
        let (mut zero, mut n) = (0, 0);
        for _ in 0..400 {
            match b.pick(
                "p",
                Strategy::LeastLatency,
                &[(0, 1), (2, 1)],
                &[],
                Millis(0),
            ) {
                Some(0) => zero += 1,
                Some(2) => n += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(zero > 100 && n > 100, "{zero} {n}");
        // One candidate: that one.
        assert_eq!(
            b.pick("p", Strategy::LeastLatency, &[(1, 1)], &[], Millis(0)),
            Some(1)
        );
    }

    #[test]
    fn latency_is_an_ewma_with_a_fifth_on_the_newest() {
        let mut b = bal();
        assert_eq!(b.latency_us(&7), None);
        b.record(&7, Outcome::Success { latency_us: 1000 }, Millis(0));
        assert_eq!(b.latency_us(&7), Some(1000));
        b.record(&7, Outcome::Success { latency_us: 2000 }, Millis(0));
        assert_eq!(b.latency_us(&7), Some(1200));
        b.record(&7, Outcome::Success { latency_us: 200 }, Millis(0));
        assert_eq!(b.latency_us(&7), Some(1000));
        // Failures and abandons leave it alone.
        b.record(&7, Outcome::Failure, Millis(0));
        b.record(&7, Outcome::Abandoned, Millis(0));
        assert_eq!(b.latency_us(&7), Some(1000));
        b.record(
            &7,
            Outcome::Success {
                latency_us: u64::MAX,
            },
            Millis(0),
        );
        assert_eq!(b.latency_us(&7), Some(u64::MAX / 5));
    }

    #[test]
    fn weighted_edge_cases() {
        let mut b = bal();
        // All zero: uniform.
        let zero = [(0u32, 0u32), (1, 0)];
        let mut counts = [0u32; 2];
        for _ in 0..2000 {
            let k = b.pick("p", Strategy::Weighted, &zero, &[], Millis(0));
            counts[k.unwrap_or(0) as usize] += 1;
        }
        assert!(counts[0] > 800 && counts[1] > 800, "{counts:?}");
        // Only one with weight: always it, wherever it sits.
        for c in [[(0u32, 5u32), (1, 0)], [(0, 0), (1, 5)]] {
            let heavy = c.iter().find(|x| x.1 > 0).map(|x| x.0);
            for _ in 0..200 {
                assert_eq!(b.pick("p", Strategy::Weighted, &c, &[], Millis(0)), heavy);
            }
        }
        // Weights 1 and 1: both, about evenly (the last is not a default).
        let even = [(0u32, 1u32), (1, 1)];
        let mut counts = [0u32; 2];
        for _ in 0..2000 {
            let k = b.pick("p", Strategy::Weighted, &even, &[], Millis(0));
            counts[k.unwrap_or(0) as usize] += 1;
        }
        assert!(counts[0] > 850 && counts[1] > 850, "{counts:?}");
    }

    #[test]
    fn random_is_uniform_and_seeded() {
        let run = |seed| {
            let mut b: Balancer<u32> =
                Balancer::new(BreakerConfig::default(), BalancerLimits::default(), seed);
            let c = [(0u32, 1u32), (1, 1), (2, 1)];
            let picks: Vec<u32> = (0..3000)
                .filter_map(|_| b.pick("p", Strategy::Random, &c, &[], Millis(0)))
                .collect();
            picks
        };
        let a = run(5);
        assert_eq!(a, run(5));
        assert_ne!(a, run(6));
        for k in 0..3 {
            let n = a.iter().filter(|x| **x == k).count();
            assert!((850..1150).contains(&n), "{k}: {n}");
        }
    }

    #[test]
    fn the_least_recently_used_closed_provider_makes_room() {
        let mut b: Balancer<u32> = Balancer::new(
            BreakerConfig::default(),
            BalancerLimits {
                max_providers: 3,
                max_procedures: 10,
            },
            1,
        );
        b.record(&1, Outcome::Success { latency_us: 1 }, Millis(10));
        b.record(&2, Outcome::Success { latency_us: 2 }, Millis(5));
        b.record(&3, Outcome::Success { latency_us: 3 }, Millis(20));
        b.record(&4, Outcome::Success { latency_us: 4 }, Millis(30));
        let keys: Vec<u32> = b.providers(Millis(30)).into_iter().map(|p| p.0).collect();
        assert_eq!(keys, [1, 3, 4], "2 was used least recently");
        // Open breakers are never evicted: when all are open, a new
        // provider is simply not tracked (and still usable).
        for k in [1, 3, 4] {
            for _ in 0..5 {
                b.record(&k, Outcome::Failure, Millis(40));
            }
        }
        b.record(&9, Outcome::Success { latency_us: 9 }, Millis(41));
        assert_eq!(b.latency_us(&9), None);
        assert_eq!(
            b.pick("p", Strategy::RoundRobin, &[(9, 1)], &[], Millis(41)),
            Some(9)
        );
        let states: Vec<_> = b.providers(Millis(41)).into_iter().map(|p| p.1).collect();
        assert_eq!(states, [BreakerState::Open; 3]);
        // A pick also refreshes recency.
        let mut b: Balancer<u32> = Balancer::new(
            BreakerConfig::default(),
            BalancerLimits {
                max_providers: 2,
                max_procedures: 10,
            },
            1,
        );
        b.record(&1, Outcome::Success { latency_us: 1 }, Millis(0));
        b.record(&2, Outcome::Success { latency_us: 1 }, Millis(1));
        assert_eq!(
            b.pick("p", Strategy::RoundRobin, &[(1, 1)], &[], Millis(2)),
            Some(1)
        );
        b.record(&3, Outcome::Success { latency_us: 1 }, Millis(3));
        let keys: Vec<u32> = b.providers(Millis(3)).into_iter().map(|p| p.0).collect();
        assert_eq!(keys, [1, 3]);
    }

    #[test]
    fn strategies_have_names() {
        for s in [
            Strategy::RoundRobin,
            Strategy::Random,
            Strategy::LeastLatency,
            Strategy::Weighted,
        ] {
            assert_eq!(s.name().parse::<Strategy>(), Ok(s));
            assert_eq!(s.name().replace('_', "-").parse::<Strategy>(), Ok(s));
        }
        assert_eq!(Strategy::default(), Strategy::RoundRobin);
        assert_eq!(Strategy::LeastLatency.name(), "least_latency");
        assert!("fastest"
            .parse::<Strategy>()
            .is_err_and(|e| e.contains("fastest")));
        assert_eq!(BreakerState::HalfOpen.name(), "half_open");
        assert_eq!(BreakerState::Open.name(), "open");
        assert_eq!(BreakerState::Closed.name(), "closed");
    }

    #[test]
    fn least_latency_ties_go_to_the_first_sampled() {
        let seed = 11;
        let mut b: Balancer<u32> =
            Balancer::new(BreakerConfig::default(), BalancerLimits::default(), seed);
        // Replays the balancer's generator: two draws per pick.
        let mut replay = Rng::new(seed);
        for _ in 0..50 {
            let a = replay.below(2) as u32;
            let _ = replay.below(1);
            let got = b.pick(
                "p",
                Strategy::LeastLatency,
                &[(0, 1), (1, 1)],
                &[],
                Millis(0),
            );
            assert_eq!(got, Some(a));
        }
    }

    #[test]
    fn weighted_follows_the_intervals_exactly() {
        let seed = 12;
        let mut b: Balancer<u32> =
            Balancer::new(BreakerConfig::default(), BalancerLimits::default(), seed);
        let mut replay = Rng::new(seed);
        let c = [(0u32, 2u32), (1, 0), (2, 3)];
        for _ in 0..100 {
            let r = replay.below(5);
            let want = if r < 2 { 0 } else { 2 };
            assert_eq!(
                b.pick("p", Strategy::Weighted, &c, &[], Millis(0)),
                Some(want)
            );
        }
    }
}
