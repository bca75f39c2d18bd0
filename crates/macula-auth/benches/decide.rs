//! Authorization decisions: a grant of 1,000 rules vs 1 rule, compiled
//! (`Policy::decide`) and cached (`DecisionCache`), printing ns/decision.
//!
//! `cargo bench -p macula-auth --bench decide [-- --rules N --decisions M]`
//!
//! Rules: `allow publish dK.kL.*` for K < 20, L < 50 (the first N of them),
//! plus `deny publish dK.kL.secret` for every tenth; requests publish
//! `dK.kL.idM` drawn from 1,000 distinct topics (so the cache holds them
//! all). Deterministic; only the timings depend on the machine.

use std::hint::black_box;
use std::time::Instant;

use macula_auth::policy::{parse_rules, Action, DecisionCache, Policy, Request};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rules(n: usize) -> String {
    let mut out = Vec::new();
    'outer: for k in 0..20 {
        for l in 0..50 {
            if out.len() >= n {
                break 'outer;
            }
            out.push(format!("allow publish d{k}.k{l}.*"));
            if (k * 50 + l) % 10 == 0 && out.len() < n {
                out.push(format!("deny publish d{k}.k{l}.secret"));
            }
        }
    }
    out.join("\n")
}

fn main() {
    let n_rules = arg("--rules", 1000);
    let n = arg("--decisions", 200_000);
    let topics: Vec<String> = (0..1000)
        .map(|i| format!("d{}.k{}.id{}", i % 20, (i / 20) % 50, i % 7))
        .collect();
    for (label, text) in [
        ("1 rule", "allow publish **".to_string()),
        (&*format!("{n_rules} rules"), rules(n_rules)),
    ] {
        let rs = parse_rules(&text).expect("rules");
        let policy = Policy::new(&[&rs], "me");
        let reqs: Vec<Request> = topics
            .iter()
            .map(|t| Request::new(Action::Publish, t).expect("request"))
            .collect();
        let t0 = Instant::now();
        let mut allowed = 0usize;
        for i in 0..n {
            allowed += black_box(policy.decide(&reqs[i % reqs.len()])).is_allowed() as usize;
        }
        let compiled = t0.elapsed().as_nanos() as f64 / n as f64;
        let mut cache = DecisionCache::new(4096);
        let t0 = Instant::now();
        for i in 0..n {
            let d = cache
                .decide(&policy, Action::Publish, &topics[i % topics.len()])
                .expect("decide");
            allowed += black_box(d).is_allowed() as usize;
        }
        let cached = t0.elapsed().as_nanos() as f64 / n as f64;
        println!(
            "{label:>11}: compiled {compiled:8.0} ns/decision | cached {cached:6.0} ns/decision ({} hits, {} misses) [{allowed} allowed]",
            cache.hits, cache.misses
        );
    }
}
