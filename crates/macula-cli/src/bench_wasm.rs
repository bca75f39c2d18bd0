//! `macula bench wasm`: what running a workload as a WebAssembly component
//! costs (docs/WASM.md). Two in-process nodes on 127.0.0.1: A runs the
//! example component (`crates/macula-wasm/guests/example`, built for
//! `wasm32-wasip2`) and a native handler doing the same echo; B calls
//! both over QUIC. Figures: compile time, instantiation (instance + init)
//! time, a call into the component without the mesh versus a native
//! closure, and the RPC round trip B -> A into each.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use macula::{Node, Request};
use macula_wasm::{WasmHost, WasmLimits};

use crate::bench_stats::{build_kind, debug_note, latency, median, Latency};

const MAX_COUNT: usize = 1_000_000;

#[derive(clap::Args, Debug)]
pub struct WasmArgs {
    /// The example component (build it with `cargo build --release
    /// --target wasm32-wasip2 --manifest-path
    /// crates/macula-wasm/guests/example/Cargo.toml`).
    #[arg(long, value_name = "FILE.wasm")]
    component: PathBuf,
    /// Instantiations measured (1..=1000000).
    #[arg(long, default_value_t = 200)]
    instances: usize,
    /// Calls per path (1..=1000000).
    #[arg(long, default_value_t = 5_000)]
    count: usize,
    /// Payload size, bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    build: &'static str,
    component_bytes: usize,
    size: usize,
    compile_ms: f64,
    instantiate: Latency,
    direct_component: Latency,
    direct_native: Latency,
    rpc_component: Latency,
    rpc_native: Latency,
}

async fn node(bootstrap: Option<SocketAddr>) -> anyhow::Result<Node> {
    Ok(Node::builder()
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .realm("bench.wasm")
        .bootstrap(bootstrap.map(|a| a.to_string()))
        .start()
        .await?)
}

pub async fn run(a: WasmArgs) -> anyhow::Result<()> {
    for (name, v) in [("--instances", a.instances), ("--count", a.count)] {
        anyhow::ensure!(
            (1..=MAX_COUNT).contains(&v),
            "{name} must be 1..={MAX_COUNT}"
        );
    }
    anyhow::ensure!(a.size <= 512 * 1024, "--size must be at most 512 KiB");
    let bytes = std::fs::read(&a.component)
        .with_context(|| format!("reading {}", a.component.display()))?;
    let host = WasmHost::new(WasmLimits::default())?;
    let node_a = node(None).await?;
    let node_b = node(Some(node_a.local_addr())).await?;
    let res = measure(&a, &host, &bytes, &node_a, &node_b).await;
    node_b.shutdown().await;
    node_a.shutdown().await;
    let report = res?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "wasm workload ({} build{}): component {} B, payload {} B",
        report.build,
        debug_note(),
        report.component_bytes,
        report.size
    )?;
    writeln!(out, "  compile            {:>10.2} ms", report.compile_ms)?;
    for (what, l) in [
        ("instantiate+init", report.instantiate),
        ("direct component", report.direct_component),
        ("direct native", report.direct_native),
        ("rpc -> component", report.rpc_component),
        ("rpc -> native", report.rpc_native),
    ] {
        writeln!(
            out,
            "  {what:<18} p50 {:>9.1} us  p99 {:>9.1} us  ({} samples)",
            l.p50_us, l.p99_us, l.samples
        )?;
    }
    Ok(())
}

async fn measure(
    a: &WasmArgs,
    host: &WasmHost,
    bytes: &[u8],
    node_a: &Node,
    node_b: &Node,
) -> anyhow::Result<Report> {
    let config = vec![("prefix".to_string(), "bench".to_string())];
    // Compile: the median of 3 (Cranelift, all of the component).
    let mut compiles = Vec::new();
    let mut compiled = None;
    for _ in 0..3 {
        let t = Instant::now();
        compiled = Some(host.compile("bench", bytes, None)?);
        compiles.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let compiled = compiled.context("compiled")?;
    let mut ns = Vec::with_capacity(a.instances);
    for _ in 0..a.instances {
        let t = Instant::now();
        host.dry_run(node_a, "bench", &compiled, config.clone())
            .await?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    let instantiate = latency(&mut ns);

    let workload = host.start(node_a, "bench", &compiled, config).await?;
    let _native = node_a
        .advertise("bench.native.echo", |req: Request| async move {
            Ok(req.payload)
        })
        .await?;
    let payload = Bytes::from(vec![7u8; a.size]);

    let mut ns = Vec::with_capacity(a.count);
    for _ in 0..a.count {
        let t = Instant::now();
        let r = workload.call("bench.echo", payload.clone()).await;
        ns.push(t.elapsed().as_nanos() as u64);
        anyhow::ensure!(r.as_ref().map(|b| b.len()) == Ok(a.size), "bad echo: {r:?}");
    }
    let direct_component = latency(&mut ns);

    let native = |req: Bytes| async move { Ok::<Bytes, macula::HandlerError>(req) };
    let mut ns = Vec::with_capacity(a.count);
    for _ in 0..a.count {
        let t = Instant::now();
        let r = std::hint::black_box(native(payload.clone()).await);
        ns.push(t.elapsed().as_nanos() as u64);
        anyhow::ensure!(r.is_ok(), "native failed");
    }
    let direct_native = latency(&mut ns);

    let rpc = |procedure: &'static str| {
        let payload = payload.clone();
        async move {
            let mut ns = Vec::with_capacity(a.count);
            for _ in 0..a.count {
                let t = Instant::now();
                let r = node_b
                    .call(procedure, payload.clone())
                    .timeout(Duration::from_secs(10))
                    .await?;
                ns.push(t.elapsed().as_nanos() as u64);
                anyhow::ensure!(r.provider == node_a.id(), "answered by another node");
            }
            anyhow::Ok(latency(&mut ns))
        }
    };
    // Warm both paths (discovery, connection) before measuring.
    node_b.call("bench.echo", payload.clone()).await?;
    node_b.call("bench.native.echo", payload.clone()).await?;
    let rpc_component = rpc("bench.echo").await?;
    let rpc_native = rpc("bench.native.echo").await?;
    workload.stop().await;
    Ok(Report {
        build: build_kind(),
        component_bytes: bytes.len(),
        size: a.size,
        compile_ms: median(compiles),
        instantiate,
        direct_component,
        direct_native,
        rpc_component,
        rpc_native,
    })
}
