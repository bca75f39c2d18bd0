//! What differs between the roles is how RPC reaches the rest of the mesh;
//! this module is that I/O, one type per role:
//!
//! - a full node ([`RpcLink`]): providers from the DHT
//!   (`rpc:<realm>:<procedure>`), advertisements and the service index put
//!   there, providers reached through the pool ([`Reach`]);
//! - a lightweight client ([`Upstream`]): advertisements are CLIENT_*
//!   requests its gateway acknowledges, and every call goes to the gateway;
//! - alone (no link): nothing leaves the process.
//!
//! The decisions (which provider, when to retry, what to forward) are the
//! core's, for every role; nothing here decides.

use parking_lot::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use macula_wire::rpc::Advertisement;
use macula_wire::{NodeId, ServiceIndex};

use super::{ProviderInfo, AD_TTL};
use crate::dht::DhtHandle;
use crate::peer::Peer;

/// How RPC reaches providers: implemented by the node runtime.
pub(crate) trait Reach: Send + Sync {
    /// A connection to `id`: pooled, else dialed at one of `addrs`, else
    /// found through the DHT.
    fn reach(&self, id: NodeId, addrs: Vec<String>) -> BoxFuture<'static, Option<Peer>>;
}

/// A client's link to its gateway (client mode): advertisements are made
/// by the gateway, and every call goes to the gateway, which finds the
/// provider.
pub(crate) trait Upstream: Send + Sync {
    /// The gateway connection, waiting up to `wait` while failing over.
    fn gateway(&self, wait: Duration) -> BoxFuture<'static, Option<Peer>>;
    /// Asks the gateway to advertise `procedure` (weight, metadata) for
    /// this client, or with `None` to withdraw it; waits for the answer.
    fn advertise(
        &self,
        procedure: String,
        ad: Option<(u32, Vec<(String, String)>)>,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// A full node's link to the mesh.
pub(crate) struct RpcLink {
    pub dht: DhtHandle,
    pub realm: String,
    pub reach: Box<dyn Reach>,
    /// Addresses published in advertisements: the listen address at first,
    /// then what reachability checks find (see `Rpc::set_addrs`).
    pub addrs: Mutex<Vec<String>>,
    /// The realm's permissions (`None`: an open realm).
    pub authz: Option<std::sync::Arc<crate::authz::Authz>>,
}

/// The role-specific link of an `Rpc`.
pub(super) enum Role {
    Alone,
    Node(RpcLink),
    Client(std::sync::Arc<dyn Upstream>),
}

impl Role {
    pub(super) fn core_role(&self) -> macula_rpc::Role {
        match self {
            Role::Alone => macula_rpc::Role::Alone,
            Role::Node(_) => macula_rpc::Role::Node,
            Role::Client(_) => macula_rpc::Role::Client,
        }
    }
}

impl RpcLink {
    fn key(name: String) -> NodeId {
        macula_wire::dht_key(name.as_bytes())
    }

    /// Providers of `procedure` from the DHT (fresh, not cached).
    pub(super) async fn lookup(&self, procedure: &str) -> Result<Vec<ProviderInfo>, String> {
        let key = Self::key(macula_rpc::ad_name(&self.realm, procedure));
        let records = self.dht.get_fresh(key).await.map_err(|e| e.to_string())?;
        Ok(records
            .into_iter()
            .filter(|r| !r.value.is_empty())
            .filter_map(|r| {
                let ad = Advertisement::decode(&r.value).ok()?;
                (ad.procedure == procedure).then_some(ProviderInfo {
                    node: r.publisher,
                    weight: ad.weight,
                    metadata: ad.metadata,
                    addrs: ad.addrs,
                    seq: r.seq,
                })
            })
            .collect())
    }

    /// Every procedure named in a node's service index.
    pub(super) async fn service_names(&self) -> Result<Vec<String>, String> {
        let key = Self::key(macula_rpc::index_name(&self.realm));
        let records = self.dht.get_fresh(key).await.map_err(|e| e.to_string())?;
        let mut names: Vec<String> = records
            .iter()
            .filter_map(|r| ServiceIndex::decode(&r.value).ok())
            .flat_map(|ix| ix.procedures)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Puts the advertisement of `procedure` (`ad`: weight and metadata;
    /// `None`: its withdrawal, an empty value that replaces it on every
    /// replica) and this node's index record listing `index`.
    pub(super) async fn put_ad(
        &self,
        procedure: &str,
        ad: Option<(u32, Vec<(String, String)>)>,
        index: Vec<String>,
    ) -> Result<(), String> {
        let key = Self::key(macula_rpc::ad_name(&self.realm, procedure));
        let err = |e: crate::dht::DhtError| e.to_string();
        match ad {
            Some((weight, metadata)) => {
                let ad = Advertisement {
                    procedure: procedure.to_string(),
                    weight,
                    metadata,
                    addrs: self.addrs.lock().clone(),
                };
                let value = ad.encode().map_err(|e| e.to_string())?;
                self.dht.put(key, value, AD_TTL).await.map_err(err)?;
            }
            None => {
                self.dht.put(key, Vec::new(), AD_TTL).await.map_err(err)?;
                self.dht.unpublish(key).await.map_err(err)?;
            }
        }
        let index_key = Self::key(macula_rpc::index_name(&self.realm));
        let empty = index.is_empty();
        let value = ServiceIndex { procedures: index }
            .encode()
            .map_err(|e| e.to_string())?;
        self.dht.put(index_key, value, AD_TTL).await.map_err(err)?;
        if empty {
            self.dht.unpublish(index_key).await.map_err(err)?;
        }
        Ok(())
    }
}
