//! Advertising: the core's table of served procedures, published through
//! the role's link (DHT records for a full node, CLIENT_ADVERTISE for a
//! client), withdrawn on drop and at shutdown.

use std::sync::Arc;
use std::time::Duration;

use macula_rpc::{Advert, Token};

use super::links::Role;
use super::*;

impl Rpc {
    // ----- advertising -------------------------------------------------

    /// Serves `procedure` with `handler` and advertises it in the mesh
    /// (before returning). Dropping the registration withdraws it.
    pub async fn advertise<H: Handler>(
        &self,
        procedure: &str,
        opts: AdvertiseOptions,
        handler: H,
    ) -> Result<Registration, RpcError> {
        self.allowed_here(macula_auth::Action::Advertise, procedure)?;
        let ad = Advert {
            handler: Arc::new(handler) as Arc<dyn Handler>,
            weight: opts.weight.unwrap_or(DEFAULT_WEIGHT),
            metadata: opts.metadata,
            max_concurrent: opts.max_concurrent,
        };
        let token = self
            .state()
            .core
            .advertise(procedure, ad)
            .map_err(|e| advertise_error(procedure, e))?;
        self.count_advertised();
        if let Err(reason) = self.publish_ad(procedure, true).await {
            self.withdraw_local(procedure, token);
            return Err(RpcError::Advertise {
                procedure: procedure.to_string(),
                reason,
            });
        }
        tracing::debug!(procedure, "advertised");
        Ok(Registration {
            procedure: procedure.to_string(),
            token,
            owner: Some(Arc::downgrade(&self.0)),
        })
    }

    /// Serves `procedure` (which must start with [`UNLISTED_PREFIX`]) only
    /// to calls addressed to this node (`call_to`): nothing is put in the
    /// DHT, so every node can serve the same control procedure without a
    /// mesh-wide provider list. Dropping the registration stops it.
    pub fn serve_unlisted<H: Handler>(
        &self,
        procedure: &str,
        handler: H,
    ) -> Result<Registration, RpcError> {
        if !procedure.starts_with(UNLISTED_PREFIX) {
            return Err(RpcError::Advertise {
                procedure: procedure.to_string(),
                reason: format!("an unlisted procedure's name starts with {UNLISTED_PREFIX:?}"),
            });
        }
        let ad = Advert {
            handler: Arc::new(handler) as Arc<dyn Handler>,
            weight: DEFAULT_WEIGHT,
            metadata: Vec::new(),
            max_concurrent: None,
        };
        let token = self
            .state()
            .core
            .advertise(procedure, ad)
            .map_err(|e| advertise_error(procedure, e))?;
        self.count_advertised();
        Ok(Registration {
            procedure: procedure.to_string(),
            token,
            owner: Some(Arc::downgrade(&self.0)),
        })
    }

    pub(super) fn count_advertised(&self) {
        let n = self.advertised().len();
        self.0.counters.advertised.set(n as u64);
    }

    /// Stops serving `procedure` if `token` is still its advertisement.
    pub(super) fn withdraw_local(&self, procedure: &str, token: Token) -> bool {
        let removed = self.state().core.withdraw(procedure, token);
        self.count_advertised();
        removed
    }

    /// Puts the advertisement of `procedure` as the core has it (or, with
    /// `on` false, its withdrawal) and this node's index record.
    pub(super) async fn publish_ad(&self, procedure: &str, on: bool) -> Result<(), String> {
        if procedure.starts_with(UNLISTED_PREFIX) {
            return Ok(());
        }
        let ad = match on {
            true => self.state().core.serving().advertisement(procedure),
            false => None,
        };
        match &self.0.role {
            Role::Alone => Ok(()),
            Role::Client(up) => up.advertise(procedure.to_string(), ad).await,
            Role::Node(link) => {
                let _serial = self.0.ad_lock.lock().await;
                let index = self.served_names();
                link.put_ad(procedure, ad, index).await
            }
        }
    }

    pub(super) fn served_names(&self) -> Vec<String> {
        let s = self.state();
        let v = s.core.serving().advertised();
        v.into_iter()
            .map(|(name, _, _)| name)
            .filter(|name| !name.starts_with(UNLISTED_PREFIX))
            .collect()
    }

    /// Sets the addresses advertisements carry (a reachability check found
    /// them: the public addresses, or none for a node behind NAT) and, if
    /// they changed, republishes every advertisement.
    pub(crate) async fn set_addrs(&self, addrs: Vec<String>) {
        let Role::Node(link) = &self.0.role else {
            return;
        };
        {
            let mut cur = link.addrs.lock();
            if *cur == addrs {
                return;
            }
            *cur = addrs;
        }
        for procedure in self.served_names() {
            if let Err(e) = self.publish_ad(&procedure, true).await {
                tracing::debug!(procedure, error = %e, "could not republish advertisement");
            }
        }
    }

    /// Procedures this node advertises, with weight and free handler slots.
    /// Unlisted procedures (`_node.*`, [`Rpc::serve_unlisted`]) are not
    /// among them.
    pub fn advertised(&self) -> Vec<(String, u32, usize)> {
        let mut v = self.state().core.serving().advertised();
        v.retain(|(name, _, _)| !name.starts_with(UNLISTED_PREFIX));
        v
    }

    /// Every procedure advertised in the mesh with its providers, read from
    /// the DHT's service index (fresh, not cached).
    pub async fn services(&self) -> Result<Vec<(String, Vec<ProviderInfo>)>, RpcError> {
        let Role::Node(link) = &self.0.role else {
            let me = self.0.node_id;
            return Ok(self
                .advertised()
                .into_iter()
                .map(|(p, weight, _)| {
                    let info = ProviderInfo {
                        node: me,
                        weight,
                        metadata: Vec::new(),
                        addrs: Vec::new(),
                        seq: 0,
                    };
                    (p, vec![info])
                })
                .collect());
        };
        let failed = |procedure: &str, what: &str, e: String| RpcError::Unreachable {
            procedure: procedure.to_string(),
            tried: Vec::new(),
            reason: format!("{what} failed: {e}"),
        };
        let names = link
            .service_names()
            .await
            .map_err(|e| failed("*", "service index lookup", e))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let found = link
                .lookup(&name)
                .await
                .map_err(|e| failed(&name, "provider lookup", e))?;
            let now = self.now();
            let providers = self.state().core.cache_providers(now, &name, found);
            if !providers.is_empty() {
                out.push((name, providers));
            }
        }
        Ok(out)
    }

    /// Graceful shutdown, first half: refuse new requests and withdraw every
    /// advertisement (bounded by `limit`).
    pub async fn begin_shutdown(&self, limit: Duration) {
        if self.state().core.serving().is_shutting_down() {
            return;
        }
        let all = self.state().core.begin_shutdown();
        self.count_advertised();
        let withdraw = async {
            for (procedure, _) in all {
                if let Err(e) = self.publish_ad(&procedure, false).await {
                    tracing::debug!(procedure, error = %e, "could not withdraw advertisement");
                }
            }
        };
        if tokio::time::timeout(limit, withdraw).await.is_err() {
            tracing::warn!("shutdown: advertisements not all withdrawn in time");
        }
    }
}
