//! The Grafana dashboard (`deploy/grafana/macula.json`) and the Prometheus
//! alert rules (`deploy/prometheus/alerts.yml`) name only metrics a running
//! node exports: a `macula start` node (with a Raft group, so the per-group
//! series exist) is scraped through `macula metrics --raw`, and every
//! `macula_*` name in the dashboard's queries and the rules' `expr` must be
//! a sample or family of that exposition. Renaming a metric breaks this test.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `macula args...` must exit 0; its output.
fn ok(args: &[&str]) -> String {
    let (code, out) = run(command(args));
    assert_eq!(code, Some(0), "macula {args:?} failed:\n{out}");
    out
}

/// The value of the banner line that starts with `key: ` (Raft's logs may
/// contain such words elsewhere in a line).
fn banner(proc: &mut Proc, key: &str) -> String {
    let prefix = format!("{key}: ");
    let deadline = Instant::now() + WAIT;
    loop {
        match proc.next_line(deadline) {
            Some(l) => {
                if let Some(v) = l.strip_prefix(&prefix) {
                    return v.trim().to_string();
                }
            }
            None => panic!("no banner line {key:?} within {WAIT:?}"),
        }
    }
}

/// Every `macula_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("macula_"))
        .map(str::to_string)
        .collect()
}

/// The PromQL strings of a Grafana dashboard: every `expr`, and the
/// templating queries.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The rules of a Prometheus rules file, checked line by line (no YAML
/// parser in the tree): `(alert name, expr)`, `expr: |` blocks joined.
fn alert_rules(text: &str) -> Vec<(String, String)> {
    assert!(!text.contains('\t'), "tabs in YAML");
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    assert_eq!(first, Some("groups:"), "a rules file starts with groups:");
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(name) = line.trim_start().strip_prefix("- alert: ") {
            let indent = line.len() - line.trim_start().len() + 2;
            let mut expr = None;
            let (mut labels, mut annotations) = (false, false);
            let mut j = i + 1;
            // The rule's keys, at the indent of `alert`.
            while j < lines.len() {
                let l = lines[j];
                let ind = l.len() - l.trim_start().len();
                if !l.trim().is_empty() && ind < indent
                    || l.trim_start().starts_with("- ") && ind < indent + 1
                {
                    break;
                }
                let key = l.trim_start();
                if ind == indent {
                    if let Some(e) = key.strip_prefix("expr:") {
                        let e = e.trim();
                        if e == "|" || e == ">" {
                            let mut block = String::new();
                            while j + 1 < lines.len() {
                                let n = lines[j + 1];
                                let nind = n.len() - n.trim_start().len();
                                if !n.trim().is_empty() && nind <= indent {
                                    break;
                                }
                                block.push_str(n.trim());
                                block.push(' ');
                                j += 1;
                            }
                            expr = Some(block);
                        } else {
                            expr = Some(e.to_string());
                        }
                    }
                    labels |= key == "labels:";
                    annotations |= key == "annotations:";
                }
                j += 1;
            }
            let expr = expr.unwrap_or_else(|| panic!("alert {name} has no expr"));
            assert!(!expr.trim().is_empty(), "alert {name}: empty expr");
            assert!(
                labels && annotations,
                "alert {name}: labels and annotations"
            );
            rules.push((name.trim().to_string(), expr));
            i = j;
        } else {
            i += 1;
        }
    }
    rules
}

/// A scraped exposition: sample names and each family's type.
struct Exposition {
    samples: BTreeSet<String>,
    types: HashMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut samples = BTreeSet::new();
        let mut types = HashMap::new();
        for l in text.lines() {
            if let Some(t) = l.strip_prefix("# TYPE ") {
                let mut it = t.split_whitespace();
                if let (Some(n), Some(k)) = (it.next(), it.next()) {
                    types.insert(n.to_string(), k.to_string());
                }
            } else if !l.starts_with('#') && !l.is_empty() {
                let end = l.find(['{', ' ']).unwrap_or(l.len());
                samples.insert(l[..end].to_string());
            }
        }
        Exposition { samples, types }
    }

    /// Whether `name` (as a query writes it) is a sample of the exposition,
    /// or a series of a family it declares (a labelled family may have no
    /// series yet, e.g. call durations before any call).
    fn has(&self, name: &str) -> bool {
        if self.samples.contains(name) {
            return true;
        }
        let kinds: [(&str, &[&str]); 6] = [
            ("_bucket", &["histogram"]),
            ("_sum", &["histogram"]),
            ("_count", &["histogram"]),
            ("_total", &["counter"]),
            ("_info", &["info"]),
            ("", &["gauge", "counter", "histogram", "info"]),
        ];
        kinds.iter().any(|(suffix, kinds)| {
            name.strip_suffix(suffix).is_some_and(|base| {
                self.types
                    .get(base)
                    .is_some_and(|k| kinds.contains(&k.as_str()))
            })
        })
    }
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    // The files first: missing or malformed files fail before a node runs.
    let dashboard: serde_json::Value = serde_json::from_str(&read("grafana/macula.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/macula.json: {e}"));
    assert_eq!(dashboard["schemaVersion"], 39);
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 20, "{} panels", panels.len());
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {} has no query",
            p["title"]
        );
    }
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let rules = alert_rules(&read("prometheus/alerts.yml"));
    assert!(rules.len() >= 15, "{} alert rules", rules.len());
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), rules.len(), "alert names are unique");
    assert!(
        rules
            .iter()
            .any(|(n, e)| n == "MaculaNodeDown" && e.starts_with("up{") && e.ends_with("== 0")),
        "{rules:?}"
    );
    queries.extend(rules.iter().map(|(_, e)| e.clone()));
    let referenced: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    assert!(referenced.len() >= 30, "{referenced:?}");
    for seed in [
        "macula_messages_total",
        "macula_rpc_duration_seconds_bucket",
        "macula_dht_lookup_duration_seconds_bucket",
        "macula_dht_routing_hops_bucket",
        "macula_pubsub_delivery_wait_seconds_bucket",
        "macula_authz_denied_total",
        "macula_raft_is_leader",
    ] {
        assert!(referenced.contains(seed), "{seed} not used");
    }

    // A node with a Raft group of its own.
    let dir = tempfile::tempdir().unwrap();
    let id = ok(&["identity", "--data-dir", dir.path().to_str().unwrap()]);
    let id = id.trim();
    let extra = ["--raft-group", "obs", "--raft-members", id];
    let mut node = Proc::spawn(&start_args("test.deploy", dir.path(), &extra));
    // In banner order.
    let listen = banner(&mut node, "listen");
    let http = banner(&mut node, "http");
    // One call through the node (a client's, forwarded by its gateway), so
    // the call-duration family has a series: an empty family is not exported.
    let mut serve = Proc::spawn(&[
        "serve",
        "svc.deploy",
        "--echo",
        "--realm",
        "test.deploy",
        "--connect",
        &listen,
    ]);
    serve.wait_for(&["serving svc.deploy"]);
    ok(&[
        "call",
        "svc.deploy",
        "hi",
        "--realm",
        "test.deploy",
        "--connect",
        &listen,
    ]);
    let text = ok(&["metrics", "--raw", "--http", &http]);
    let exposition = Exposition::parse(&text);
    assert!(exposition.types.len() > 100, "{text}");
    // The check itself can fail.
    assert!(!exposition.has("macula_no_such_metric_total"));
    assert!(
        !exposition.has("macula_peers_total"),
        "a gauge has no _total"
    );
    let missing: Vec<&String> = referenced.iter().filter(|n| !exposition.has(n)).collect();
    assert!(
        missing.is_empty(),
        "named in deploy/ but not exported: {missing:?}\n{text}"
    );
    assert_eq!(serve.terminate(), Some(0));
    assert_eq!(node.terminate(), Some(0));
}
