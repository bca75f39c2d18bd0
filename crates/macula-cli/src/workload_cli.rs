//! `macula workload run APP FILE.wasm`: a full node that joins the mesh
//! through `--connect` and runs one
//! WebAssembly component of world `macula:mesh/workload` (docs/WASM.md)
//! until interrupted: its procedures served, its subscriptions taken.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use macula_wasm::{WasmHost, WasmLimits};

use crate::dht_cli::MeshArgs;
use crate::member::{Member, ModeArgs};

#[derive(clap::Subcommand, Debug)]
pub enum WorkloadCommand {
    /// Run a component on a node of its own until interrupted.
    Run(RunArgs),
}

/// The limits of `macula_wasm::WasmLimits` as flags, with its defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Linear memory of the instance, bytes (wasm.max_memory_bytes).
    #[arg(long, value_name = "BYTES", default_value_t = WasmLimits::default().max_memory_bytes)]
    pub max_memory: u64,
    /// Fuel of one call into the component, about one per instruction
    /// (wasm.fuel_per_call).
    #[arg(long, value_name = "N", default_value_t = WasmLimits::default().fuel_per_call)]
    pub fuel: u64,
    /// Table elements of the instance (wasm.max_table_elements).
    #[arg(long, value_name = "N", default_value_t = WasmLimits::default().max_table_elements)]
    pub max_table_elements: u64,
    /// Size of the component file, bytes (wasm.max_component_bytes).
    #[arg(long, value_name = "BYTES", default_value_t = WasmLimits::default().max_component_bytes)]
    pub max_component_bytes: usize,
}

impl LimitArgs {
    pub fn limits(&self) -> WasmLimits {
        WasmLimits {
            max_memory_bytes: self.max_memory,
            fuel_per_call: self.fuel,
            max_table_elements: self.max_table_elements,
            max_component_bytes: self.max_component_bytes,
            ..WasmLimits::default()
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The workload's name (its log lines and metrics carry it).
    app: String,
    /// The component file (.wasm).
    file: PathBuf,
    /// Configuration handed to the component's init, KEY=VALUE (repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Refuse the file unless its BLAKE3 hash is this (hex).
    #[arg(long, value_name = "HEX")]
    blake3: Option<String>,
    /// Keep a persistent identity in DIR; default: a fresh identity.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address of the node.
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    /// Serve the node's admin HTTP API here (`/metrics` with
    /// `macula_wasm_*`, open to loopback clients; the rest needs the admin
    /// token of --data-dir).
    #[arg(long, value_name = "HOST:PORT")]
    http: Option<SocketAddr>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    pub(crate) mesh: MeshArgs,
}

fn parse_config(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--config {p:?}: expected KEY=VALUE"))
        })
        .collect()
}

pub async fn run(a: RunArgs, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let config = parse_config(&a.config)?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let host = WasmHost::new(a.limits.limits())?;
    // Checked before joining the mesh: a refused file costs no node.
    let compiled = host.compile(&a.app, &bytes, a.blake3.as_deref())?;
    let mode = ModeArgs {
        full_node: true,
        ..ModeArgs::default()
    };
    let Member::Node(node) =
        Member::start(&a.mesh, &mode, a.data_dir.clone(), Some(a.listen)).await?
    else {
        anyhow::bail!("a workload runs on a full node");
    };
    host.attach_metrics(&node);
    let admin = match a.http {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                eprintln!("admin http: {}", listener.local_addr()?);
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let server = tokio::spawn(macula::admin::serve(listener, node.clone(), async {
                    let _ = stopped.await;
                }));
                Some((stop, server))
            }
            Err(e) => {
                node.shutdown().await;
                anyhow::bail!("cannot listen for admin HTTP on {addr}: {e}");
            }
        },
        None => None,
    };
    let workload = match host.start(&node, &a.app, &compiled, config).await {
        Ok(w) => w,
        Err(e) => {
            node.shutdown().await;
            return Err(e.into());
        }
    };
    eprintln!(
        "running {} ({}) as {}: serving {}",
        a.app,
        workload.hash(),
        node.id(),
        workload.procedures().join(", ")
    );
    stop.await;
    workload.stop().await;
    if let Some((stop, server)) = admin {
        let _ = stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    }
    node.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_pairs_are_split_at_the_first_equals() {
        let c = parse_config(&["a=1".to_string(), "b=x=y".to_string()]).unwrap();
        assert_eq!(
            c,
            vec![("a".into(), "1".into()), ("b".into(), "x=y".into())]
        );
        assert!(parse_config(&["nope".to_string()]).is_err());
    }
}
