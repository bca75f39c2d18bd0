//! What `pub`, `sub`, `trace`, `call` and `serve` run as: by default a
//! lightweight client attached to one of the `--connect` nodes (it listens
//! on nothing and fails over to the next node with its subscriptions and
//! advertisements; given several nodes, its subscriptions also go through a
//! second one unless `--single-gateway`), or with `--full-node` a
//! short-lived full node that joins the mesh through them.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use macula::{
    AdvertiseOptions, CallBuilder, Client, Handler, Node, NodeId, Registration, Subscription,
};

use crate::dht_cli::MeshArgs;

/// How the command takes part in the mesh.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModeArgs {
    /// Join as a full (short-lived) node instead of attaching as a
    /// lightweight client.
    #[arg(long)]
    pub full_node: bool,
    /// As a client: subscribe through one gateway at a time instead of two
    /// (with several --connect nodes, the default is two at once, so that
    /// a gateway's death loses no event; with one, events published during
    /// a failover are lost and reported as missed).
    #[arg(long, conflicts_with = "full_node")]
    pub single_gateway: bool,
    /// As a client: the API key to present to the gateway (`macula realm
    /// apikey` prints one, `mk_...`), for a realm with an authority; the
    /// gateway admits the client with the grant the key is bound to.
    #[arg(
        long,
        env = "MACULA_API_KEY",
        value_name = "KEY",
        hide_env_values = true,
        conflicts_with = "full_node"
    )]
    pub api_key: Option<String>,
    /// As a full node: stay this many milliseconds on a relayed connection
    /// before hole punching starts (the pair matrix benchmark measures
    /// the relay first); at most 60000.
    #[arg(long, value_name = "MS", requires = "full_node", value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub hole_punch_delay: Option<u64>,
}

/// A lightweight client or a full node.
pub enum Member {
    Client(Client),
    Node(Node),
}

impl Member {
    /// Attaches (client) or joins (full node) through `mesh.connect`.
    /// `data_dir`: a persistent identity; `listen`: the full node's listen
    /// address or the client's local UDP address.
    pub async fn start(
        mesh: &MeshArgs,
        mode: &ModeArgs,
        data_dir: Option<PathBuf>,
        listen: Option<SocketAddr>,
    ) -> anyhow::Result<Member> {
        let listen = listen.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        if mode.full_node {
            let mut builder = Node::builder().listen(listen);
            if let Some(ms) = mode.hole_punch_delay {
                builder = builder.nat(macula::config::NatLimits {
                    punch_start_delay: macula::config::MqttMillis(ms),
                    ..Default::default()
                });
            }
            if let Some(dir) = data_dir {
                builder = builder.data_dir(dir);
            }
            return Ok(Member::Node(
                crate::dht_cli::join_with(mesh, builder).await?,
            ));
        }
        let realm = crate::dht_cli::realm(mesh)?;
        let mut gateways = Vec::new();
        for g in mesh.connect.split(',').map(str::trim) {
            gateways.push(
                g.parse()
                    .map_err(|e| anyhow::anyhow!("invalid value {g:?} for --connect: {e}"))?,
            );
        }
        let mut builder = Client::builder(gateways)
            .realm(realm)
            .bind(listen)
            .attach_timeout(crate::dht_cli::JOIN_TIMEOUT)
            .redundant_subscriptions(!mode.single_gateway);
        if let Some(dir) = data_dir {
            builder = builder.data_dir(dir);
        }
        if let Some(grant) = crate::dht_cli::grant(mesh)? {
            builder = builder.grant(grant);
        }
        if let Some(key) = &mode.api_key {
            let key: macula::apikey::ApiKey = key
                .parse()
                .map_err(|e| anyhow::anyhow!("--api-key (or MACULA_API_KEY): {e}"))?;
            builder = builder.api_key(key);
        }
        let client = builder
            .connect()
            .await
            .with_context(|| format!("could not attach to {}", mesh.connect))?;
        Ok(Member::Client(client))
    }

    pub fn id(&self) -> NodeId {
        match self {
            Member::Client(c) => c.id(),
            Member::Node(n) => n.id(),
        }
    }

    pub async fn publish(&self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        match self {
            Member::Client(c) => {
                c.publish(topic, payload).await?;
            }
            Member::Node(n) => {
                n.publish(topic, payload).await?;
            }
        }
        Ok(())
    }

    pub async fn subscribe(&self, pattern: &str) -> anyhow::Result<Subscription> {
        Ok(match self {
            Member::Client(c) => c.subscribe(pattern).await?,
            Member::Node(n) => n.subscribe(pattern).await?,
        })
    }

    /// Durable stream `name`, on whichever node hosts it.
    pub fn stream(&self, name: &str, timeout: std::time::Duration) -> macula::stream::StreamHandle {
        match self {
            Member::Client(c) => c.stream(name, timeout),
            Member::Node(n) => n.stream(name, timeout),
        }
    }

    pub fn call(&self, procedure: &str, payload: Bytes) -> CallBuilder {
        match self {
            Member::Client(c) => c.call(procedure, payload),
            Member::Node(n) => n.call(procedure, payload),
        }
    }

    pub async fn advertise_with<H: Handler>(
        &self,
        procedure: &str,
        opts: AdvertiseOptions,
        handler: H,
    ) -> Result<Registration, macula::Error> {
        match self {
            Member::Client(c) => c.advertise_with(procedure, opts, handler).await,
            Member::Node(n) => n.advertise_with(procedure, opts, handler).await,
        }
    }

    pub async fn shutdown(&self) {
        match self {
            Member::Client(c) => c.shutdown().await,
            Member::Node(n) => n.shutdown().await,
        }
    }
}
