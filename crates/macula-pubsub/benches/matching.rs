//! Topic matching speed: 10,000 subscriptions (a realistic mix of literal,
//! `*` and `**` patterns) and 100,000 matches, cache off and on, printing
//! ns/match and matches/s.
//!
//! `cargo bench -p macula-pubsub --bench matching [-- --subs N --matches M --seed S]`
//!
//! Workloads:
//! - `random`: every topic drawn from ~2 M possible ones, so the cache
//!   almost never hits (its worst case: pure overhead).
//! - `hot`: topics drawn from 1,000 distinct ones, as when a node publishes a
//!   bounded set of topics repeatedly (fits in the cache).
//!
//! Deterministic from the seed; only the timings depend on the machine.

use std::hint::black_box;
use std::time::Instant;

use macula_pubsub::{Pattern, Sublist, Topic};

/// splitmix64: tiny, seedable, good enough to pick words.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Words per level: 20 domains, 50 kinds, 200 instances, 10 fields
/// (`domain3.kind17.id042.f5`), topics of 2 to 4 segments.
const LEVELS: [(&str, u64); 4] = [("domain", 20), ("kind", 50), ("id", 200), ("f", 10)];

fn word(rng: &mut Rng, level: usize) -> String {
    let (prefix, n) = LEVELS[level];
    format!("{prefix}{}", rng.below(n))
}

fn random_topic(rng: &mut Rng) -> Topic {
    let n_segments = 2 + rng.below(3) as usize;
    let text: Vec<String> = (0..n_segments).map(|level| word(rng, level)).collect();
    Topic::new(&text.join(".")).expect("generated topics are valid")
}

/// 70% literal, 20% with one `*`, 10% with `**` (mostly trailing, some
/// leading or in the middle).
fn random_pattern(rng: &mut Rng) -> Pattern {
    let mut segs: Vec<String> = random_topic(rng).segments().map(str::to_owned).collect();
    let roll = rng.below(100);
    if (70..90).contains(&roll) {
        let at = rng.below(segs.len() as u64) as usize;
        segs[at] = "*".into();
    } else if roll >= 90 {
        match rng.below(10) {
            0 => segs = vec!["**".into(), segs[segs.len() - 1].clone()],
            1 => segs = vec![segs[0].clone(), "**".into(), segs[segs.len() - 1].clone()],
            _ => {
                segs.truncate(1 + rng.below(2) as usize);
                segs.push("**".into());
            }
        }
    }
    Pattern::new(&segs.join(".")).expect("generated patterns are valid")
}

fn run(label: &str, list: &mut Sublist<u32>, topics: &[Topic], n_matches: usize) {
    let mut n_results = 0usize;
    let before = list.stats();
    let started = Instant::now();
    for i in 0..n_matches {
        let result = list.matches(black_box(&topics[i % topics.len()]));
        n_results += result.len();
        black_box(result);
    }
    let elapsed = started.elapsed();
    let ns = elapsed.as_nanos() as f64 / n_matches as f64;
    let stats = list.stats();
    println!(
        "{label:<28} {ns:>8.0} ns/match {:>12.0} matches/s   avg results {:>5.2}   cache hits {} misses {}",
        1e9 / ns,
        n_results as f64 / n_matches as f64,
        stats.cache_hits - before.cache_hits,
        stats.cache_misses - before.cache_misses,
    );
}

fn main() {
    let mut n_subs = 10_000usize;
    let mut n_matches = 100_000usize;
    let mut seed = 1u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--subs" => n_subs = args.next().and_then(|v| v.parse().ok()).unwrap_or(n_subs),
            "--matches" => {
                n_matches = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(n_matches)
            }
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(seed),
            // `cargo bench` passes `--bench`; ignore it and anything unknown.
            _ => {}
        }
    }

    let mut rng = Rng(seed);
    let patterns: Vec<Pattern> = (0..n_subs).map(|_| random_pattern(&mut rng)).collect();
    let random: Vec<Topic> = (0..n_matches).map(|_| random_topic(&mut rng)).collect();
    let hot_set: Vec<Topic> = (0..1_000).map(|_| random_topic(&mut rng)).collect();
    let hot: Vec<Topic> = (0..n_matches)
        .map(|_| hot_set[rng.below(1_000) as usize].clone())
        .collect();

    let build = |cache: bool| {
        let mut list = Sublist::with_cache(cache);
        for (id, p) in patterns.iter().enumerate() {
            list.insert(p, id as u32);
        }
        list
    };
    let started = Instant::now();
    let probe = build(true);
    println!(
        "{n_subs} subscriptions ({} trie nodes) built in {:.1} ms; {n_matches} matches per row",
        probe.node_count(),
        started.elapsed().as_secs_f64() * 1e3
    );

    for (workload, topics) in [("random", &random), ("hot 1k topics", &hot)] {
        for cache in [false, true] {
            let mut list = build(cache);
            // Warm up (and, for `hot`, fill the cache) outside the timing.
            for t in topics.iter().take(2_000) {
                black_box(list.matches(t));
            }
            let label = format!("{workload}, cache {}", if cache { "on" } else { "off" });
            run(&label, &mut list, topics, n_matches);
        }
    }
}
