//! The gateway part of a full node's RPC: procedures its attached clients
//! serve are advertised by this node (the first client creates the
//! advertisement, later ones join it) and calls to them are forwarded to
//! the clients in turn (the core's `Clients` route, moving on while a
//! client's connection is lost). Everything a client had is withdrawn when
//! its connection closes (`gateway.rs` of the runtime calls in here).

use macula_rpc::ClientAd;

use super::{advertise_error, Rpc, RpcError};
use crate::peer::Peer;

impl Rpc {
    /// A gateway advertises `procedure` for attached client `client`.
    pub(crate) async fn advertise_for_client(
        &self,
        client: &Peer,
        procedure: &str,
        weight: u32,
        metadata: Vec<(String, String)>,
    ) -> Result<(), RpcError> {
        // One advertisement change at a time, so a second client joining
        // waits for the first one's put instead of seeing a half-made ad.
        let _serial = self.0.client_ads.lock().await;
        let conn = client.connection_id() as u64;
        self.0.clients.lock().insert(conn, client.clone());
        let ad = self.state().core.advertise_for_client(
            procedure,
            client.node_id(),
            conn,
            weight,
            metadata,
        );
        self.count_advertised();
        let token = match ad.map_err(|e| advertise_error(procedure, e))? {
            ClientAd::Joined => return Ok(()),
            ClientAd::Created(token) => token,
        };
        if let Err(reason) = self.publish_ad(procedure, true).await {
            self.withdraw_local(procedure, token);
            return Err(RpcError::Advertise {
                procedure: procedure.to_string(),
                reason,
            });
        }
        Ok(())
    }

    /// Client `client` no longer serves `procedure` (or, with `None`,
    /// anything: it left). An advertisement with no client left is
    /// withdrawn from the mesh.
    pub(crate) async fn withdraw_for_client(&self, client: &Peer, procedure: Option<&str>) {
        let _serial = self.0.client_ads.lock().await;
        let conn = client.connection_id() as u64;
        let gone = self.state().core.withdraw_client(conn, procedure);
        if procedure.is_none() {
            self.0.clients.lock().remove(&conn);
        }
        self.count_advertised();
        for (procedure, _) in gone {
            if let Err(e) = self.publish_ad(&procedure, false).await {
                tracing::debug!(procedure, error = %e, "could not withdraw a client's advertisement");
            }
        }
    }
}
