//! The records of deployments and upgrades, kept in the KV of Raft group
//! [`GROUP`], and the rollout plan's rules (issue 25, items 2-4). Pure:
//! no I/O, time as an argument; the workload agent (`macula_wasm::agent`)
//! reads and writes these records and carries the plan out.
//!
//! Keys (values are JSON):
//! - `app/<app>`: [`AppSpec`], what runs where (node -> version);
//! - `release/<app>/<version>`: [`Release`], the artifact's manifest, the
//!   release's configuration and the nodes that hold the artifact;
//! - `rollout/<app>`: the app's last [`Rollout`], active or ended;
//! - `history/<app>/<id, 20 digits>`: every ended rollout.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// The Raft group whose leader coordinates rollouts and whose KV holds
/// the records.
pub const GROUP: &str = "_workloads";

/// Longest app and version names.
pub const MAX_NAME_LEN: usize = 64;

/// Events kept per rollout (the oldest are dropped, counted in
/// [`Rollout::events_dropped`]).
pub const MAX_EVENTS: usize = 64;

/// Checks an app or version name: 1..=64 of `[A-Za-z0-9._-]`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{what} {name:?}: expected 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// `app/<app>`.
pub fn app_key(app: &str) -> String {
    format!("app/{app}")
}

/// `release/<app>/<version>`.
pub fn release_key(app: &str, version: &str) -> String {
    format!("release/{app}/{version}")
}

/// `rollout/<app>`.
pub fn rollout_key(app: &str) -> String {
    format!("rollout/{app}")
}

/// `history/<app>/<id>`, ordered by id.
pub fn history_key(app: &str, id: u64) -> String {
    format!("history/{app}/{id:020}")
}

/// Where an app runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Placement {
    /// How many nodes; `None`: every node with an agent (that matches).
    pub replicas: Option<u32>,
    /// Only nodes carrying every one of these labels.
    pub labels: BTreeMap<String, String>,
}

impl Placement {
    /// Chooses nodes among `candidates` (node ID hex, labels): those that
    /// match the labels, nearest first by XOR distance to BLAKE3(app), so
    /// that the choice is the same on every node; all of them or the
    /// first `replicas`.
    pub fn choose(
        &self,
        app: &str,
        candidates: &[(macula_wire::NodeId, BTreeMap<String, String>)],
    ) -> Vec<macula_wire::NodeId> {
        let key = macula_wire::NodeId::from_bytes(*blake3::hash(app.as_bytes()).as_bytes());
        let mut v: Vec<macula_wire::NodeId> = candidates
            .iter()
            .filter(|(_, labels)| {
                self.labels
                    .iter()
                    .all(|(k, want)| labels.get(k).is_some_and(|have| have == want))
            })
            .map(|(id, _)| *id)
            .collect();
        v.sort_by_key(|n| n.distance(&key));
        v.dedup();
        if let Some(n) = self.replicas {
            v.truncate(n as usize);
        }
        v
    }
}

/// An app: its placement, its configuration and what each of its nodes
/// should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub app: String,
    pub placement: Placement,
    /// The configuration of the version in service (carried to the next).
    pub config: Vec<(String, String)>,
    /// The version in service; `None` before the first rollout ends.
    pub version: Option<String>,
    /// Node ID (hex) -> the version it should run. A rollout writes a
    /// node's entry before it orders the node, so a node that restarts (or
    /// a coordinator that takes over) finds the intent here.
    pub nodes: BTreeMap<String, String>,
}

/// One version of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub app: String,
    pub version: String,
    pub manifest: Manifest,
    /// Configuration given with this release; merged over the app's at
    /// upgrade (its keys win).
    pub config: Vec<(String, String)>,
    /// Nodes (hex) that hold the artifact: fetched from them.
    pub holders: Vec<String>,
    pub created_ms: u64,
}

/// `base` with `over`'s keys set (added or replaced), in `base`'s order
/// then `over`'s new keys.
pub fn merge_config(base: &[(String, String)], over: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = base
        .iter()
        .map(|(k, v)| {
            let v = over
                .iter()
                .rev()
                .find(|(ok, _)| ok == k)
                .map_or(v, |(_, ov)| ov);
            (k.clone(), v.clone())
        })
        .collect();
    for (k, v) in over {
        if !out.iter().any(|(ok, _)| ok == k) {
            out.push((k.clone(), v.clone()));
        }
    }
    out
}

/// How a rollout takes its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Batches of `batch_size`, one after the other.
    Rolling,
    /// A first batch of `batch_size`, then a pause until promoted or
    /// aborted, then the rest in batches of `batch_size`.
    Canary,
    /// Every node in one batch.
    AllAtOnce,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::Canary => "canary",
            Strategy::AllAtOnce => "all-at-once",
        }
    }

    pub fn parse(s: &str) -> Result<Strategy, String> {
        match s {
            "rolling" => Ok(Strategy::Rolling),
            "canary" => Ok(Strategy::Canary),
            "all-at-once" => Ok(Strategy::AllAtOnce),
            other => Err(format!(
                "strategy {other:?}: expected rolling, canary or all-at-once"
            )),
        }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Batches being upgraded.
    Running,
    /// A canary's first batch is done: waiting for promote or abort.
    Paused,
    /// Taking every node it touched back to the old version.
    RollingBack,
    /// Every batch upgraded and healthy.
    Completed,
    /// Back on the old version after a failure.
    RolledBack,
    /// Back on the old version after an abort.
    Aborted,
    /// Stopped after a failure without rollback (or a rollback that could
    /// not reach every node): `detail` says where things are.
    Failed,
}

impl Phase {
    /// The coordinator has work to do.
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Running | Phase::RollingBack)
    }

    /// The rollout has ended.
    pub fn is_ended(self) -> bool {
        matches!(
            self,
            Phase::Completed | Phase::RolledBack | Phase::Aborted | Phase::Failed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::RollingBack => "rolling_back",
            Phase::Completed => "completed",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
        }
    }
}

/// What `macula upgrade` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub version: String,
    pub strategy: Strategy,
    /// Nodes per batch (at least 1; ignored by all-at-once).
    pub batch_size: u32,
    /// A procedure called on each upgraded node after its batch; an error
    /// (or no answer) fails the batch.
    pub health_check: Option<String>,
    /// Roll every upgraded node back when a batch fails.
    pub rollback_on_fail: bool,
}

/// One rollout of an app from one version to another: the plan, where it
/// is, and what happened (the audit record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// 1 for an app's first rollout, then one more each time.
    pub id: u64,
    pub app: String,
    /// The version before (`None`: a first deployment).
    pub from: Option<String>,
    pub to: String,
    pub strategy: Strategy,
    pub batch_size: u32,
    pub health_check: Option<String>,
    pub rollback_on_fail: bool,
    /// Node IDs (hex) per batch, in order.
    pub batches: Vec<Vec<String>>,
    /// Batches upgraded and healthy.
    pub done: usize,
    pub phase: Phase,
    /// Why it failed, rolled back or was aborted.
    pub detail: String,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub ended_ms: Option<u64>,
    /// What happened, in order (time in ms, text); at most [`MAX_EVENTS`].
    pub events: Vec<(u64, String)>,
    pub events_dropped: u64,
}

impl Rollout {
    /// A rollout of `nodes` (hex, in the order placement chose them) to
    /// `req`'s version.
    pub fn plan(
        id: u64,
        app: &str,
        from: Option<String>,
        req: &UpgradeRequest,
        nodes: &[String],
        now_ms: u64,
    ) -> Rollout {
        let size = (req.batch_size.max(1)) as usize;
        let batches: Vec<Vec<String>> = match req.strategy {
            Strategy::AllAtOnce => vec![nodes.to_vec()],
            Strategy::Rolling | Strategy::Canary => nodes.chunks(size).map(<[_]>::to_vec).collect(),
        };
        let mut r = Rollout {
            id,
            app: app.to_string(),
            from,
            to: req.version.clone(),
            strategy: req.strategy,
            batch_size: size as u32,
            health_check: req.health_check.clone(),
            rollback_on_fail: req.rollback_on_fail,
            batches: batches.into_iter().filter(|b| !b.is_empty()).collect(),
            done: 0,
            phase: Phase::Running,
            detail: String::new(),
            started_ms: now_ms,
            updated_ms: now_ms,
            ended_ms: None,
            events: Vec::new(),
            events_dropped: 0,
        };
        let text = format!(
            "planned {} -> {} ({}, {} batches over {} nodes)",
            r.from.as_deref().unwrap_or("nothing"),
            r.to,
            r.strategy.as_str(),
            r.batches.len(),
            nodes.len()
        );
        r.event(now_ms, text);
        if r.batches.is_empty() {
            r.end(now_ms, Phase::Completed);
        }
        r
    }

    /// Records an event.
    pub fn event(&mut self, now_ms: u64, text: impl Into<String>) {
        if self.events.len() >= MAX_EVENTS {
            self.events.remove(0);
            self.events_dropped += 1;
        }
        self.events.push((now_ms, text.into()));
        self.updated_ms = now_ms;
    }

    /// The batch to upgrade next, while running.
    pub fn current_batch(&self) -> Option<&[String]> {
        if self.phase != Phase::Running {
            return None;
        }
        self.batches.get(self.done).map(Vec::as_slice)
    }

    /// Every node the rollout may have changed: the batches done and the
    /// one in progress.
    pub fn touched(&self) -> Vec<String> {
        let upto = self.done.saturating_add(1).min(self.batches.len());
        self.batches[..upto].iter().flatten().cloned().collect()
    }

    /// The current batch is upgraded and healthy.
    pub fn batch_done(&mut self, now_ms: u64) {
        if self.phase != Phase::Running {
            return;
        }
        self.done = self.done.saturating_add(1);
        let text = format!("batch {} of {} done", self.done, self.batches.len());
        self.event(now_ms, text);
        if self.done >= self.batches.len() {
            self.end(now_ms, Phase::Completed);
        } else if self.strategy == Strategy::Canary && self.done == 1 {
            self.phase = Phase::Paused;
            self.event(
                now_ms,
                "canary batch done: paused until promoted or aborted",
            );
        }
    }

    /// The current batch failed: roll back, or stop.
    pub fn fail(&mut self, now_ms: u64, detail: impl Into<String>) {
        let detail = detail.into();
        self.event(now_ms, format!("failed: {detail}"));
        self.detail = detail;
        if self.rollback_on_fail {
            self.phase = Phase::RollingBack;
        } else {
            self.end(now_ms, Phase::Failed);
        }
    }

    /// `macula upgrade promote`: a paused canary goes on.
    pub fn promote(&mut self, now_ms: u64) -> Result<(), String> {
        if self.phase != Phase::Paused {
            return Err(format!(
                "rollout {} of {} is {}, not paused",
                self.id,
                self.app,
                self.phase.as_str()
            ));
        }
        self.phase = Phase::Running;
        self.event(now_ms, "promoted");
        Ok(())
    }

    /// `macula upgrade abort`: a running or paused rollout rolls back.
    pub fn abort(&mut self, now_ms: u64) -> Result<(), String> {
        if !matches!(self.phase, Phase::Running | Phase::Paused) {
            return Err(format!(
                "rollout {} of {} is {}: nothing to abort",
                self.id,
                self.app,
                self.phase.as_str()
            ));
        }
        self.detail = "aborted".into();
        self.phase = Phase::RollingBack;
        self.event(now_ms, "aborted: rolling back");
        Ok(())
    }

    /// The rollback reached every node it touched.
    pub fn rolled_back(&mut self, now_ms: u64) {
        let end = if self.detail == "aborted" {
            Phase::Aborted
        } else {
            Phase::RolledBack
        };
        self.end(now_ms, end);
    }

    /// Ends in `phase`.
    pub fn end(&mut self, now_ms: u64, phase: Phase) {
        self.phase = phase;
        self.ended_ms = Some(now_ms);
        self.event(now_ms, format!("ended: {}", phase.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(strategy: Strategy, batch: u32, rollback: bool) -> UpgradeRequest {
        UpgradeRequest {
            version: "2".into(),
            strategy,
            batch_size: batch,
            health_check: Some("app.health".into()),
            rollback_on_fail: rollback,
        }
    }

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn strategies_plan_their_batches() {
        let r = Rollout::plan(
            1,
            "a",
            Some("1".into()),
            &req(Strategy::Rolling, 2, true),
            &nodes(5),
            0,
        );
        assert_eq!(r.batches.len(), 3);
        assert_eq!(r.batches[2], vec!["n4".to_string()]);
        let r = Rollout::plan(
            1,
            "a",
            None,
            &req(Strategy::AllAtOnce, 2, true),
            &nodes(5),
            0,
        );
        assert_eq!(r.batches, vec![nodes(5)]);
        let r = Rollout::plan(1, "a", None, &req(Strategy::Canary, 1, true), &nodes(3), 0);
        assert_eq!(r.batches.len(), 3);
        let r = Rollout::plan(1, "a", None, &req(Strategy::Rolling, 0, true), &nodes(2), 0);
        assert_eq!(r.batch_size, 1, "a batch holds at least one node");
        let r = Rollout::plan(1, "a", None, &req(Strategy::Rolling, 1, true), &[], 0);
        assert_eq!(r.phase, Phase::Completed, "nothing to do is done");
    }

    #[test]
    fn rolling_runs_batch_after_batch_to_completion() {
        let mut r = Rollout::plan(
            1,
            "a",
            Some("1".into()),
            &req(Strategy::Rolling, 2, true),
            &nodes(3),
            0,
        );
        assert_eq!(r.current_batch().unwrap(), &nodes(2)[..]);
        assert_eq!(r.touched(), nodes(2));
        r.batch_done(1);
        assert_eq!(r.current_batch().unwrap(), &["n2".to_string()][..]);
        assert_eq!(r.touched(), nodes(3));
        r.batch_done(2);
        assert_eq!(r.phase, Phase::Completed);
        assert_eq!(r.ended_ms, Some(2));
        assert!(r.current_batch().is_none());
        r.batch_done(3);
        assert_eq!(r.done, 2, "nothing after the end");
    }

    #[test]
    fn a_canary_pauses_after_its_first_batch() {
        let mut r = Rollout::plan(
            1,
            "a",
            Some("1".into()),
            &req(Strategy::Canary, 1, true),
            &nodes(3),
            0,
        );
        r.batch_done(1);
        assert_eq!(r.phase, Phase::Paused);
        assert!(r.current_batch().is_none());
        assert!(!r.phase.is_active());
        r.promote(2).unwrap();
        assert!(r.promote(2).is_err(), "only a paused rollout is promoted");
        r.batch_done(3);
        assert_eq!(r.phase, Phase::Running, "no second pause");
        r.batch_done(4);
        assert_eq!(r.phase, Phase::Completed);
        assert!(r.abort(5).is_err(), "an ended rollout cannot be aborted");
    }

    #[test]
    fn failures_roll_back_or_stop_and_aborts_are_told_apart() {
        let mut r = Rollout::plan(
            1,
            "a",
            Some("1".into()),
            &req(Strategy::Rolling, 1, true),
            &nodes(3),
            0,
        );
        r.batch_done(1);
        r.fail(2, "health check failed on n1");
        assert_eq!(r.phase, Phase::RollingBack);
        assert_eq!(
            r.touched(),
            nodes(2),
            "the batch in progress is rolled back too"
        );
        r.rolled_back(3);
        assert_eq!(r.phase, Phase::RolledBack);
        assert!(r.phase.is_ended());

        let mut r = Rollout::plan(
            1,
            "a",
            Some("1".into()),
            &req(Strategy::Rolling, 1, false),
            &nodes(3),
            0,
        );
        r.fail(1, "apply failed");
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(r.detail, "apply failed");

        let mut r = Rollout::plan(
            1,
            "a",
            Some("1".into()),
            &req(Strategy::Canary, 1, false),
            &nodes(3),
            0,
        );
        r.batch_done(1);
        r.abort(2).unwrap();
        assert_eq!(r.phase, Phase::RollingBack);
        r.rolled_back(3);
        assert_eq!(r.phase, Phase::Aborted);
    }

    #[test]
    fn events_are_bounded() {
        let mut r = Rollout::plan(1, "a", None, &req(Strategy::Rolling, 1, true), &nodes(1), 0);
        for i in 0..(MAX_EVENTS as u64 + 10) {
            r.event(i, "x");
        }
        assert_eq!(r.events.len(), MAX_EVENTS);
        assert_eq!(r.events_dropped, 11);
    }

    #[test]
    fn config_is_carried_and_overridden() {
        let base = vec![("a".to_string(), "1".to_string()), ("b".into(), "2".into())];
        let over = vec![("b".to_string(), "3".to_string()), ("c".into(), "4".into())];
        assert_eq!(
            merge_config(&base, &over),
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".into(), "3".into()),
                ("c".into(), "4".into())
            ]
        );
        assert_eq!(merge_config(&base, &[]), base);
    }

    #[test]
    fn placement_filters_by_label_and_is_stable() {
        let ids: Vec<macula_wire::NodeId> = (0u8..6)
            .map(|i| macula_wire::NodeId::from_public_key(&[i; 32]))
            .collect();
        let cands: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let mut l = BTreeMap::new();
                l.insert(
                    "zone".to_string(),
                    if i % 2 == 0 { "a" } else { "b" }.to_string(),
                );
                (*id, l)
            })
            .collect();
        let all = Placement::default().choose("app", &cands);
        assert_eq!(all.len(), 6);
        let mut rev = cands.clone();
        rev.reverse();
        assert_eq!(Placement::default().choose("app", &rev), all);
        let mut p = Placement {
            replicas: Some(2),
            ..Placement::default()
        };
        assert_eq!(p.choose("app", &cands), all[..2].to_vec());
        p.labels.insert("zone".into(), "a".into());
        let chosen = p.choose("app", &cands);
        assert_eq!(chosen.len(), 2);
        assert!(chosen
            .iter()
            .all(|c| ids.iter().position(|i| i == c).unwrap() % 2 == 0));
    }

    #[test]
    fn names_are_checked() {
        validate_name("app", "orders-v1.2_x").unwrap();
        assert!(validate_name("app", "").is_err());
        assert!(validate_name("app", "a/b").is_err());
        assert!(validate_name("app", &"x".repeat(65)).is_err());
        assert_eq!(history_key("a", 7), "history/a/00000000000000000007");
    }
}
