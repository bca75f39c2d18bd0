//! `macula trust list|revoke`: the pins of trust on first use in a node's
//! data directory (`<data dir>/trust.json`, see `macula_runtime::trust`).
//! A running node re-reads the file at each check, so a revoked pin takes
//! effect at its next connection attempt.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::{Args, Subcommand};
use macula::config::Pins;

use crate::Failure;

#[derive(Subcommand, Debug)]
pub enum TrustCommand {
    /// List the pinned addresses and the node ID first seen at each.
    List(TrustListArgs),
    /// Forget a pin: the next node that answers at TARGET is pinned anew.
    Revoke(TrustRevokeArgs),
}

#[derive(Args, Debug)]
pub struct TrustDir {
    /// The node's data directory [env: MACULA_DATA_DIR] [default: <user data dir>/macula]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TrustListArgs {
    #[command(flatten)]
    pub dir: TrustDir,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrustRevokeArgs {
    /// The pinned target, `HOST:PORT` as `trust list` shows it.
    pub target: String,
    #[command(flatten)]
    pub dir: TrustDir,
}

fn dir_of(d: &TrustDir) -> PathBuf {
    crate::config::data_dir_or_env(d.data_dir.clone())
}

pub fn run(cmd: TrustCommand) -> Result<(), Failure> {
    match cmd {
        TrustCommand::List(args) => {
            let pins = Pins::load(&dir_of(&args.dir))?;
            let mut rows = Vec::new();
            for (target, pin) in &pins.pins {
                if args.json {
                    let v = serde_json::json!({
                        "target": target,
                        "node_id": pin.node_id.to_string(),
                        "first_seen_ms": pin.first_seen_ms,
                    });
                    println!("{v}");
                } else {
                    rows.push([
                        target.clone(),
                        pin.node_id.to_string(),
                        pin.first_seen_ms.to_string(),
                    ]);
                }
            }
            if !args.json {
                let header = ["TARGET", "NODE ID", "FIRST SEEN (UNIX MS)"].map(String::from);
                crate::admin_cli::write_table(&mut std::io::stdout().lock(), &header, &rows)?;
            }
            Ok(())
        }
        TrustCommand::Revoke(args) => {
            let dir = dir_of(&args.dir);
            let mut pins = Pins::load(&dir)?;
            match pins.pins.remove(&args.target) {
                None => Err(Failure::from(anyhow!(
                    "{} is not pinned in {} (`macula trust list` shows the pins)",
                    args.target,
                    dir.display()
                ))),
                Some(pin) => {
                    pins.save(&dir)?;
                    eprintln!(
                        "forgot {} (was node {}); the next node to answer there is pinned",
                        args.target, pin.node_id
                    );
                    Ok(())
                }
            }
        }
    }
}
