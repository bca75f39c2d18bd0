//! RPC across real nodes over QUIC on 127.0.0.1: discovery through the DHT,
//! local calls, typed errors, deadlines, cancellation reaching the provider,
//! overload, round robin and failover.

mod common;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use macula_runtime::rpc::{AdvertiseOptions, HandlerError, Request, RpcError};
use macula_runtime::{NodeConfig, NodeRuntime};

async fn echo(req: Request) -> Result<Bytes, HandlerError> {
    Ok(req.payload)
}

/// A first node and `n` nodes bootstrapped to it.
async fn mesh(n: usize) -> Vec<NodeRuntime> {
    let first = start(config()).await;
    let mut nodes = vec![first.clone()];
    for _ in 0..n {
        let node = start(boot(&first)).await;
        joined(&node).await;
        nodes.push(node);
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_and_local_calls() {
    init_tracing();
    let nodes = mesh(1).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let _reg = within(
        STEP,
        "advertise",
        a.rpc()
            .advertise("svc.echo", AdvertiseOptions::default(), echo),
    )
    .await
    .expect("advertise");

    let r = within(
        STEP,
        "remote call",
        b.rpc().call("svc.echo", "hi").into_future(),
    )
    .await
    .expect("remote call answers");
    assert_eq!(r.payload, Bytes::from("hi"));
    assert_eq!(r.provider, a.node_id());
    assert_eq!(r.attempts, 1);
    assert_eq!(a.rpc().counters().served_total.get(), 1);

    // The provider calling its own procedure stays in process.
    let sent_before = a.metrics().frames_sent_total.get();
    let r = within(
        STEP,
        "local call",
        a.rpc().call("svc.echo", "me").into_future(),
    )
    .await
    .expect("local call answers");
    assert_eq!(r.provider, a.node_id());
    assert_eq!(a.rpc().counters().calls_local_total.get(), 1);
    assert_eq!(a.rpc().counters().served_total.get(), 1);
    assert_eq!(a.metrics().frames_sent_total.get(), sent_before);

    // call_to names the provider.
    let r = within(
        STEP,
        "call_to",
        b.rpc().call_to(a.node_id(), "svc.echo", "x").into_future(),
    )
    .await
    .expect("call_to answers");
    assert_eq!(r.provider, a.node_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_errors() {
    init_tracing();
    let nodes = mesh(1).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let _fail = a
        .rpc()
        .advertise(
            "svc.fail",
            AdvertiseOptions::default(),
            |_req: Request| async { Err::<Bytes, _>(HandlerError::new(42, "no such invoice")) },
        )
        .await
        .expect("advertise fail");
    let _panic = a
        .rpc()
        .advertise(
            "svc.panic",
            AdvertiseOptions::default(),
            |_req: Request| async {
                if true {
                    panic!("handler bug");
                }
                Ok::<Bytes, HandlerError>(Bytes::new())
            },
        )
        .await
        .expect("advertise panic");
    let _slow = a
        .rpc()
        .advertise(
            "svc.slow",
            AdvertiseOptions::default(),
            |_req: Request| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<Bytes, HandlerError>(Bytes::new())
            },
        )
        .await
        .expect("advertise slow");
    let _echo = a
        .rpc()
        .advertise("svc.echo", AdvertiseOptions::default(), echo)
        .await
        .expect("advertise echo");

    match b.rpc().call("svc.fail", "x").await {
        Err(RpcError::Handler {
            code,
            message,
            provider,
            ..
        }) => {
            assert_eq!((code, message.as_str()), (42, "no such invoice"));
            assert_eq!(provider, a.node_id());
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    match b.rpc().call("svc.panic", "x").await {
        Err(RpcError::Panicked { provider, .. }) => assert_eq!(provider, a.node_id()),
        other => panic!("expected a panic error, got {other:?}"),
    }
    // The provider keeps serving after a panic.
    assert!(b.rpc().call("svc.echo", "still up").await.is_ok());
    assert_eq!(a.rpc().counters().handler_panics_total.get(), 1);

    let started = std::time::Instant::now();
    match b
        .rpc()
        .call("svc.slow", "x")
        .timeout(Duration::from_millis(300))
        .await
    {
        Err(RpcError::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(300)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // The provider abandons the handler at the deadline (or on CANCEL).
    eventually(STEP, "slow handler abandoned", || {
        a.rpc().counters().serving.get() == 0
    })
    .await;

    match b.rpc().call("svc.nobody", "x").await {
        Err(RpcError::NoProviders { procedure }) => assert_eq!(procedure, "svc.nobody"),
        other => panic!("expected no providers, got {other:?}"),
    }
    match b.rpc().call("bad name", "x").await {
        Err(e @ RpcError::InvalidProcedure { .. }) => {
            assert_eq!(e.kind(), "invalid_procedure")
        }
        other => panic!("expected an invalid name error, got {other:?}"),
    }
    // Advertising the same procedure twice on one node is refused.
    assert!(matches!(
        a.rpc()
            .advertise("svc.echo", AdvertiseOptions::default(), echo)
            .await,
        Err(RpcError::AlreadyAdvertised { .. })
    ));
}

/// Sets a flag when dropped: shows the handler's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_call_cancels_the_handler_on_the_provider() {
    init_tracing();
    let nodes = mesh(1).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let started = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicBool::new(false));
    let (s, d) = (started.clone(), dropped.clone());
    let _reg = a
        .rpc()
        .advertise(
            "svc.forever",
            AdvertiseOptions::default(),
            move |_req: Request| {
                let (s, d) = (s.clone(), d.clone());
                async move {
                    let _flag = DropFlag(d);
                    s.store(true, Relaxed);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok::<Bytes, HandlerError>(Bytes::new())
                }
            },
        )
        .await
        .expect("advertise");
    let rpc = b.rpc().clone();
    let call = tokio::spawn(async move {
        rpc.call("svc.forever", "x")
            .timeout(Duration::from_secs(60))
            .await
    });
    eventually(STEP, "handler started", || started.load(Relaxed)).await;
    assert!(!dropped.load(Relaxed));
    call.abort();
    eventually(STEP, "handler future dropped on the provider", || {
        dropped.load(Relaxed)
    })
    .await;
    assert_eq!(a.rpc().counters().cancelled_by_caller_total.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_at_its_limit_answers_overloaded() {
    init_tracing();
    let nodes = mesh(1).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let gate = Arc::new(tokio::sync::Notify::new());
    let inside = Arc::new(AtomicU64::new(0));
    let (g, i) = (gate.clone(), inside.clone());
    let _reg = a
        .rpc()
        .advertise(
            "svc.one",
            AdvertiseOptions {
                max_concurrent: Some(1),
                ..Default::default()
            },
            move |_req: Request| {
                let (g, i) = (g.clone(), i.clone());
                async move {
                    i.fetch_add(1, Relaxed);
                    g.notified().await;
                    Ok::<Bytes, HandlerError>(Bytes::from("done"))
                }
            },
        )
        .await
        .expect("advertise");
    let rpc = b.rpc().clone();
    let first = tokio::spawn(async move { rpc.call("svc.one", "1").await });
    eventually(STEP, "first call inside the handler", || {
        inside.load(Relaxed) == 1
    })
    .await;
    match b.rpc().call("svc.one", "2").retries(0).await {
        Err(RpcError::Overloaded { provider, .. }) => assert_eq!(provider, Some(a.node_id())),
        other => panic!("expected overloaded, got {other:?}"),
    }
    assert_eq!(a.rpc().counters().handler_overloaded_total.get(), 1);
    gate.notify_one();
    let r = within(STEP, "first call", first)
        .await
        .expect("joins")
        .expect("first call succeeds");
    assert_eq!(r.payload, Bytes::from("done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_and_a_withdrawn_provider_is_skipped() {
    init_tracing();
    // nodes[0] calls; nodes[1..=3] provide.
    let nodes = mesh(3).await;
    let mut regs = Vec::new();
    for (i, n) in nodes[1..].iter().enumerate() {
        let tag = Bytes::from(i.to_string());
        let reg = n
            .rpc()
            .advertise(
                "svc.who",
                AdvertiseOptions::default(),
                move |_r: Request| {
                    let tag = tag.clone();
                    async move { Ok::<Bytes, HandlerError>(tag) }
                },
            )
            .await
            .expect("advertise");
        regs.push(reg);
    }
    let caller = &nodes[0];
    let mut counts = [0u32; 3];
    for _ in 0..300 {
        let r = within(STEP, "call", caller.rpc().call("svc.who", "").into_future())
            .await
            .expect("call");
        let i: usize = std::str::from_utf8(&r.payload).unwrap().parse().unwrap();
        counts[i] += 1;
    }
    assert_eq!(counts, [100, 100, 100], "round robin is even");

    // Withdraw provider 0. The caller's cache still lists it, but it answers
    // "not found" and the call fails over: nothing fails.
    let reg = regs.remove(0);
    within(STEP, "withdraw", reg.withdraw())
        .await
        .expect("withdraw");
    for _ in 0..30 {
        let r = within(STEP, "call", caller.rpc().call("svc.who", "").into_future())
            .await
            .expect("calls still succeed");
        assert_ne!(r.payload, Bytes::from("0"));
    }

    // Graceful shutdown of provider 1 withdraws it too; calls keep working.
    within(STEP, "shutdown", nodes[2].shutdown()).await;
    for _ in 0..30 {
        let r = within(STEP, "call", caller.rpc().call("svc.who", "").into_future())
            .await
            .expect("calls still succeed after a provider left");
        assert_eq!(r.payload, Bytes::from("2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_in_flight_limit_answers_overloaded_at_once() {
    init_tracing();
    let node = start(NodeConfig {
        rpc: macula_runtime::rpc::RpcLimits {
            max_inflight_calls: 1,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let _reg = node
        .rpc()
        .advertise(
            "svc.wait",
            AdvertiseOptions::default(),
            move |_r: Request| {
                let g = g.clone();
                async move {
                    g.notified().await;
                    Ok::<Bytes, HandlerError>(Bytes::from("done"))
                }
            },
        )
        .await
        .expect("advertise");
    let rpc = node.rpc().clone();
    let first = tokio::spawn(async move { rpc.call("svc.wait", "").await });
    eventually(STEP, "first call in flight", || {
        node.rpc().counters().inflight_calls.get() == 1
    })
    .await;
    match node.rpc().call("svc.wait", "").await {
        Err(RpcError::Overloaded { provider: None, .. }) => {}
        other => panic!("expected the caller's own limit, got {other:?}"),
    }
    assert_eq!(node.rpc().counters().caller_overloaded_total.get(), 1);
    gate.notify_one();
    let r = within(STEP, "first call", first).await.expect("joins");
    assert_eq!(r.expect("first call").payload, Bytes::from("done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_reaches_the_handler() {
    init_tracing();
    let nodes = mesh(1).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let _reg = a
        .rpc()
        .advertise(
            "svc.deadline",
            AdvertiseOptions::default(),
            |r: Request| async move {
                let left = r
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                Ok::<Bytes, HandlerError>(Bytes::from(left.as_millis().to_string()))
            },
        )
        .await
        .expect("advertise");
    let r = b
        .rpc()
        .call("svc.deadline", "")
        .timeout(Duration::from_millis(1500))
        .await
        .expect("call");
    let left: u64 = std::str::from_utf8(&r.payload).unwrap().parse().unwrap();
    // What the provider has left is the caller's budget minus the trip.
    assert!(
        (500..=1500).contains(&left),
        "{left} ms left at the provider"
    );
    assert_eq!(r.provider, a.node_id());
}
