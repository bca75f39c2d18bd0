//! Deployments and upgrades across real nodes over QUIC on loopback
//! (issue 25, items 2-4): five nodes with a workload agent each; the
//! artifact stored on one and fetched by the others from their peers; a
//! rolling upgrade under continuous calls with no failed call; a canary
//! that pauses, then is aborted; a version whose health check fails rolled
//! back on its own; a peer that serves tampered chunks refused.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula::Node;
use macula_wasm::agent::{AppReport, DeployRequest};
use macula_wasm::rollout::{Phase, Placement, Rollout, Strategy, UpgradeRequest};
use macula_wasm::{Agent, AgentOptions, WasmHost, WasmLimits};

const STEP: Duration = Duration::from_secs(60);

async fn within<F: std::future::IntoFuture>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f.into_future())
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

struct Member {
    node: Node,
    agent: Agent,
    _dir: tempfile::TempDir,
}

/// `n` nodes with agents (the first is everybody's bootstrap peer), every
/// one connected to every other.
async fn mesh(realm: &str, n: usize) -> Vec<Member> {
    let mut members: Vec<Member> = Vec::new();
    for i in 0..n {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Node::builder()
            .realm(realm)
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .data_dir(dir.path());
        if let Some(first) = members.first() {
            b = b.bootstrap([first.node.local_addr().to_string()]);
        }
        let node = within("node starts", b.start()).await.expect("node");
        let host = WasmHost::new(WasmLimits::default()).expect("host");
        let mut opts = AgentOptions::new(dir.path().join("workloads"));
        opts.poll = Duration::from_millis(50);
        opts.node_timeout = Duration::from_secs(10);
        opts.health_interval = Duration::from_millis(100);
        opts.labels.insert("index".into(), i.to_string());
        let agent = within("agent starts", Agent::start(&node, host, opts))
            .await
            .expect("agent");
        members.push(Member {
            node,
            agent,
            _dir: dir,
        });
    }
    // Every node dials every other, so each sees the others as peers.
    for a in &members {
        for b in &members {
            if a.node.id() != b.node.id() && a.node.peer(b.node.id()).is_none() {
                within("connect", a.node.connect(&b.node.local_addr().to_string()))
                    .await
                    .expect("connects");
            }
        }
    }
    members
}

/// The example component as another artifact (another BLAKE3).
fn variant(tag: &str) -> Vec<u8> {
    macula_wasm::artifact::tagged(common::example(), tag)
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn deploy(agent: &Agent, app: &str, version: &str, wasm: &[u8], config: &[(&str, &str)]) {
    let manifest = agent.store_artifact(wasm).expect("stored");
    within(
        "deploy",
        agent.deploy(
            app,
            DeployRequest {
                version: version.into(),
                hash: manifest.hash,
                config: kv(config),
                placement: Placement::default(),
            },
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("deploy {app} {version}: {e}"));
}

/// Waits until the app's rollout `id` leaves the active phases.
async fn settled(agent: &Agent, app: &str, id: u64) -> Rollout {
    within("rollout settles", async {
        loop {
            if let Ok(mut v) = agent.status(Some(app)).await {
                if let Some(AppReport {
                    rollout: Some(r), ..
                }) = v.pop()
                {
                    if r.id == id && !r.phase.is_active() {
                        return r;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// What every node runs of `app`: node -> version.
async fn running(members: &[Member], app: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for m in members {
        let r = m.agent.local().await;
        if let Some(a) = r.apps.iter().find(|a| a.app == app) {
            out.insert(r.node.clone(), a.version.clone());
        }
    }
    out
}

fn up(version: &str, strategy: Strategy, batch: u32, health: Option<&str>) -> UpgradeRequest {
    UpgradeRequest {
        version: version.into(),
        strategy,
        batch_size: batch,
        health_check: health.map(str::to_string),
        rollback_on_fail: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_upgrade_of_five_nodes_under_call_load_fails_no_call() {
    let members = mesh("test.wasm.rolling", 5).await;
    let first = &members[0].agent;
    deploy(
        first,
        "roll",
        "1",
        &variant("1"),
        &[("prefix", "roll"), ("version", "1")],
    )
    .await;
    let r = settled(first, "roll", 1).await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    // Stored on one node, fetched by the other four from their peers.
    let on = running(&members, "roll").await;
    assert_eq!(on.len(), 5, "{on:?}");
    assert!(on.values().all(|v| v == "1"));
    for m in &members {
        assert_eq!(m.agent.local().await.artifacts.len(), 1);
    }

    // A caller without an agent calls continuously through the upgrade.
    let caller = within(
        "caller joins",
        Node::builder()
            .realm("test.wasm.rolling")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .bootstrap([members[0].node.local_addr().to_string()])
            .start(),
    )
    .await
    .expect("caller");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let seen = Arc::new(parking_lot::Mutex::new(BTreeMap::<String, u64>::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (caller, stop, ok, failed, seen) = (
            caller.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            seen.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 200_000 {
                n += 1;
                match caller
                    .call("roll.version", Bytes::new())
                    .timeout(Duration::from_secs(5))
                    .await
                {
                    Ok(r) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        let v = String::from_utf8_lossy(&r.payload).to_string();
                        *seen.lock().entry(v).or_default() += 1;
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("call failed: {e}");
                    }
                }
            }
        }));
    }
    while ok.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Version 2: another artifact, its own configuration key over the
    // app's (prefix carried over).
    deploy(
        &members[2].agent,
        "roll",
        "2",
        &variant("2"),
        &[("version", "2")],
    )
    .await;
    let plan = within(
        "upgrade",
        members[3]
            .agent
            .upgrade("roll", up("2", Strategy::Rolling, 2, Some("roll.health"))),
    )
    .await
    .expect("upgrade starts");
    assert_eq!(plan.batches.len(), 3);
    let r = settled(first, "roll", plan.id).await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    let before = ok.load(Ordering::Relaxed);
    while ok.load(Ordering::Relaxed) < before + 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let seen = seen.lock().clone();
    eprintln!("calls: {ok} ok, {failed} failed; versions answered: {seen:?}");
    assert_eq!(failed, 0, "no call fails during the upgrade");
    assert!(seen.get("1").is_some_and(|n| *n > 0) && seen.get("2").is_some_and(|n| *n > 0));
    let on = running(&members, "roll").await;
    assert_eq!(on.len(), 5);
    assert!(on.values().all(|v| v == "2"), "{on:?}");
    let r = within("answer", caller.call("roll.version", Bytes::new()))
        .await
        .expect("call");
    assert_eq!(r.payload, "2");
    // The record: the app in service at 2 with the carried configuration;
    // the history holds both rollouts.
    let report = first
        .status(Some("roll"))
        .await
        .expect("status")
        .pop()
        .unwrap();
    assert_eq!(report.spec.version.as_deref(), Some("2"));
    assert!(report
        .spec
        .config
        .contains(&("prefix".into(), "roll".into())));
    assert!(report.spec.config.contains(&("version".into(), "2".into())));
    let history = first.history("roll").await.expect("history");
    assert_eq!(
        history.iter().map(|r| (r.id, r.phase)).collect::<Vec<_>>(),
        vec![(1, Phase::Completed), (2, Phase::Completed)]
    );
    assert!(history[1]
        .events
        .iter()
        .any(|(_, e)| e.contains("health check roll.health passed")));
    caller.shutdown().await;
    for m in members {
        m.agent.stop().await;
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_pauses_an_abort_and_a_failed_health_check_roll_back() {
    let members = mesh("test.wasm.canary", 5).await;
    let first = &members[0].agent;
    deploy(
        first,
        "can",
        "1",
        &variant("c1"),
        &[("prefix", "can"), ("version", "1")],
    )
    .await;
    assert_eq!(settled(first, "can", 1).await.phase, Phase::Completed);

    // Canary: one node, then a pause.
    deploy(first, "can", "2", &variant("c2"), &[("version", "2")]).await;
    let plan = within(
        "canary",
        first.upgrade("can", up("2", Strategy::Canary, 1, Some("can.health"))),
    )
    .await
    .expect("canary starts");
    let r = settled(first, "can", plan.id).await;
    assert_eq!(r.phase, Phase::Paused, "{r:?}");
    let on = running(&members, "can").await;
    assert_eq!(on.values().filter(|v| *v == "2").count(), 1, "{on:?}");
    assert_eq!(on.values().filter(|v| *v == "1").count(), 4, "{on:?}");
    // A second rollout waits for this one.
    let e = first
        .upgrade("can", up("2", Strategy::Rolling, 1, None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("paused"), "{e}");
    // Aborted: the canary node goes back.
    within("abort", first.abort("can")).await.expect("abort");
    let r = settled(first, "can", plan.id).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    let on = running(&members, "can").await;
    assert!(on.values().all(|v| v == "1"), "{on:?}");

    // Version 3 fails its health check: rolled back on its own after the
    // first batch, the rest never touched.
    deploy(
        first,
        "can",
        "3",
        &variant("c3"),
        &[("version", "3"), ("healthy", "no")],
    )
    .await;
    let plan = within(
        "bad upgrade",
        first.upgrade("can", up("3", Strategy::Rolling, 2, Some("can.health"))),
    )
    .await
    .expect("starts");
    let r = settled(first, "can", plan.id).await;
    assert_eq!(r.phase, Phase::RolledBack, "{r:?}");
    assert!(
        r.detail.contains("health check can.health failed"),
        "{}",
        r.detail
    );
    assert_eq!(r.done, 0);
    let on = running(&members, "can").await;
    assert!(on.values().all(|v| v == "1"), "{on:?}");
    let call = within(
        "health after rollback",
        members[4].node.call("can.health", Bytes::new()),
    )
    .await
    .expect("healthy again");
    assert_eq!(call.payload, "ok");
    let report = first.status(Some("can")).await.unwrap().pop().unwrap();
    assert_eq!(report.spec.version.as_deref(), Some("1"));
    assert!(report.spec.nodes.values().all(|v| v == "1"));
    let history = first.history("can").await.expect("history");
    assert_eq!(
        history.iter().map(|r| r.phase).collect::<Vec<_>>(),
        vec![Phase::Completed, Phase::Aborted, Phase::RolledBack]
    );
    for m in members {
        m.agent.stop().await;
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_serving_tampered_chunks_is_refused() {
    let members = mesh("test.wasm.tamper", 2).await;
    let (good, fetcher) = (&members[0], &members[1]);
    let wasm = variant("t");
    let manifest = good.agent.store_artifact(&wasm).expect("stored");
    // A node that answers every chunk request with flipped bytes.
    let rogue = within(
        "rogue joins",
        Node::builder()
            .realm("test.wasm.tamper")
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .bootstrap([good.node.local_addr().to_string()])
            .start(),
    )
    .await
    .expect("rogue");
    let wasm_for_rogue = wasm.clone();
    let _served = rogue
        .serve_unlisted(macula_wasm::agent::CONTROL, move |req: macula::Request| {
            let wasm = wasm_for_rogue.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&req.payload).unwrap_or_default();
                let index = v["index"].as_u64().unwrap_or(0) as usize;
                let size = macula_wasm::artifact::CHUNK_SIZE as usize;
                let mut chunk = wasm[index * size..((index + 1) * size).min(wasm.len())].to_vec();
                chunk[0] ^= 0xff;
                Ok(Bytes::from(chunk))
            }
        })
        .expect("serves");
    within(
        "rogue connects",
        fetcher.node.connect(&rogue.local_addr().to_string()),
    )
    .await
    .expect("connect");
    let order = |holders: Vec<String>| {
        serde_json::to_vec(&serde_json::json!({
            "op": "apply",
            "app": "tamper",
            "version": "1",
            "manifest": manifest,
            "config": [["prefix", "tamper"]],
            "holders": holders,
        }))
        .unwrap()
    };
    // Only the rogue holds it: refused, nothing stored or run.
    let e = within(
        "apply from the rogue",
        fetcher
            .node
            .call_to(
                fetcher.node.id(),
                macula_wasm::agent::CONTROL,
                order(vec![rogue.id().to_string()]),
            )
            .retries(0),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("does not match its BLAKE3 hash"),
        "{e}"
    );
    assert!(fetcher.agent.local().await.artifacts.is_empty());
    assert!(fetcher.agent.local().await.apps.is_empty());
    // The rogue first, then a good holder: the bad chunk is refused, the
    // good one taken, the workload runs.
    within(
        "apply",
        fetcher.node.call_to(
            fetcher.node.id(),
            macula_wasm::agent::CONTROL,
            order(vec![rogue.id().to_string(), good.node.id().to_string()]),
        ),
    )
    .await
    .expect("fetched from the good holder");
    let local = fetcher.agent.local().await;
    assert_eq!(local.artifacts, vec![manifest.hash.clone()]);
    assert_eq!(local.apps.len(), 1);
    let mut reg = prometheus_client::registry::Registry::default();
    fetcher.agent.host().register(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    let refused = text
        .lines()
        .find(|l| l.starts_with("macula_wasm_artifact_refused_total{reason=\"chunk_hash\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(!refused.ends_with(" 0"), "{refused}");
    rogue.shutdown().await;
    for m in members {
        m.agent.stop().await;
        m.node.shutdown().await;
    }
}
