//! The full node's role: its link to the DHT. Runs the interest lookups and
//! record puts the core asks for, waits (bounded) for the ones a publish or
//! a subscribe needs, and withdraws every record on graceful shutdown.
//!
//! This module must not decide what to look up or put, nor when a route is
//! fresh: the core does.

use std::sync::Arc;
use std::time::Duration;

use macula_pubsub::{InterestPut, InterestRecord, Millis, Patience, RecordForm, Route, RouteStep};
use macula_wire::{NodeId, PublishBatchView};

use super::{Core, Mesh, PubSub, PubSubError, Role};
use crate::dht::DhtHandle;

/// A publish waits at most this long for the interest lookups its route
/// needs; past it, the route is built from what is known (a DHT lookup
/// normally ends, answered or timed out, well before).
const ROUTE_WAIT_MAX: Duration = Duration::from_secs(15);

/// What a full node's pub/sub needs from the node.
pub(crate) struct MeshLink {
    pub dht: DhtHandle,
    pub realm: String,
    pub mesh: Box<dyn Mesh>,
    /// The realm's permissions (`None`: an open realm).
    pub authz: Option<std::sync::Arc<crate::authz::Authz>>,
}

/// What a wait on interest events sees each time it looks.
enum Look<T> {
    Done(T),
    /// Look again after the next interest event, or at this time.
    Wait(Option<Millis>),
}

impl PubSub {
    fn dht(&self) -> Option<&DhtHandle> {
        match &self.0.role {
            Role::Node(dht) => Some(dht),
            _ => None,
        }
    }

    /// Asks `look` (under the core's lock) after every interest lookup or
    /// put that finishes, until it is done.
    async fn on_interest<T>(&self, mut look: impl FnMut(&mut Core, Millis) -> Look<T>) -> T {
        loop {
            let notified = self.0.interest.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let seen = {
                let now = self.0.now();
                let mut core = self.0.core();
                let seen = look(&mut core, now);
                self.after(core);
                seen
            };
            match seen {
                Look::Done(t) => return t,
                // Lookups and puts always finish (the DHT's own timeouts).
                Look::Wait(None) => notified.await,
                Look::Wait(Some(at)) => {
                    let at = tokio::time::Instant::from_std(self.0.clock.instant(at));
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
            }
        }
    }

    /// Runs one interest lookup the core asked for, in the background.
    pub(super) fn lookup_interest(&self, name: String, key: NodeId) {
        let (Some(dht), Ok(rt)) = (self.dht().cloned(), tokio::runtime::Handle::try_current())
        else {
            // Nothing can run it (no runtime: the node is gone): an answer
            // all the same, so the core never waits for it.
            let now = self.0.now();
            self.run(|core, _, _| core.handle_interest_found(&name, Err("no runtime".into()), now));
            return;
        };
        let ps = self.clone();
        rt.spawn(async move {
            let result = dht.get_fresh(key).await.map_err(|e| e.to_string());
            tracing::debug!(name = %name, result = ?result.as_ref().map(|r| r.iter().map(|r| r.publisher.short()).collect::<Vec<_>>()), "interest looked up");
            let records = result.map(|records| {
                let record = |r: crate::dht_cache::DhtRecord| InterestRecord {
                    publisher: r.publisher,
                    seq: r.seq,
                    value: r.value,
                };
                records.into_iter().map(record).collect()
            });
            let now = ps.0.now();
            let mut core = ps.0.core();
            core.handle_interest_found(&name, records, now);
            ps.after(core);
            ps.0.interest.notify_waiters();
        });
    }

    /// Runs one record put the core asked for, in the background. An empty
    /// record withdraws: the DHT then stops republishing the key.
    pub(super) fn put_interest(&self, put: InterestPut) {
        let (Some(dht), Ok(rt)) = (self.dht().cloned(), tokio::runtime::Handle::try_current())
        else {
            let fail = Err("no runtime".to_string());
            self.run(|core, _, _| core.handle_interest_put(&put.name, put.changes, fail));
            return;
        };
        let ps = self.clone();
        tracing::debug!(name = %put.name, n_patterns = put.n_patterns, exact = put.exact, withdraw = put.is_withdrawal(), "updating interest");
        rt.spawn(async move {
            let ttl = put.ttl.to_duration();
            let mut result = dht.put(put.key, put.value.clone(), ttl).await.map(|_| ());
            if put.is_withdrawal() {
                result = result.and(dht.unpublish(put.key).await.map(|_| ()));
            }
            let mut core = ps.0.core();
            let result = result.map_err(|e| e.to_string());
            let form = core.handle_interest_put(&put.name, put.changes, result);
            ps.after(core);
            ps.0.interest.notify_waiters();
            let (name, n) = (&put.name, put.n_patterns);
            match form {
                Some(RecordForm::BecameSummary) => tracing::info!(%name, patterns = n,
                    "interest record over the DHT value limit; publishing a summary (publishers may send messages this node drops)"),
                Some(RecordForm::BecameExact) => tracing::info!(%name, patterns = n,
                    "interest record fits the DHT value limit again; publishing it exactly"),
                None => {}
            }
        });
    }

    /// Waits until the record carrying subscription change `changes` under
    /// `name` is stored (or its put failed).
    pub(super) async fn record_stored(&self, name: &str, changes: u64) -> Result<(), String> {
        self.on_interest(|core, _| match core.interest_outcome(name, changes) {
            Some(r) => Look::Done(r),
            None => Look::Wait(None),
        })
        .await
    }

    /// Where `topic`'s messages go: the core's route, waiting for the
    /// lookups it started as the core says (bounded by `ROUTE_WAIT_MAX`).
    pub(super) async fn route(&self, topic: &str) -> Result<Arc<Route>, PubSubError> {
        let give_up = self
            .0
            .now()
            .saturating_add(Millis::from_duration(ROUTE_WAIT_MAX));
        self.on_interest(|core, now| {
            let patience = if now < give_up {
                Patience::Wait
            } else {
                Patience::Now
            };
            match core.route(topic, now, patience) {
                Err(e) => Look::Done(Err(e)),
                Ok(RouteStep::Ready(r)) => Look::Done(Ok(r)),
                Ok(RouteStep::Wait { until }) => {
                    Look::Wait(Some(until.map_or(give_up, |u| u.min(give_up))))
                }
            }
        })
        .await
    }

    /// Graceful shutdown: withdraws every interest record this node has in
    /// the DHT (bounded by `limit`), so publishers stop sending here at once
    /// instead of when the records expire. Later subscription changes no
    /// longer touch the DHT.
    pub async fn withdraw_all(&self, limit: Duration) {
        if self.dht().is_none() {
            return;
        }
        let mut left = false;
        let work = self.on_interest(|core, _| {
            if !std::mem::replace(&mut left, true) {
                core.leave();
            }
            match core.interest_settled() {
                true => Look::Done(()),
                false => Look::Wait(None),
            }
        });
        if tokio::time::timeout(limit, work).await.is_err() {
            tracing::warn!("shutdown: pub/sub interest not all withdrawn in time");
        }
    }

    /// A batch that attached client `from` published (`view`, decoded
    /// from `body` by the stream's reader; already delivered here):
    /// forwards it to the other interested nodes, keeping the client as
    /// publisher with its epoch and sequence numbers.
    pub(super) async fn forward_from_client(
        &self,
        from: NodeId,
        view: &PublishBatchView<'_>,
        body: &bytes::Bytes,
        retrace: &[(usize, String)],
        seals: &macula_pubsub::SealPlaces,
    ) {
        if self.dht().is_none() {
            return;
        }
        let mut routes = Vec::with_capacity(view.topics.len());
        for t in &view.topics {
            routes.push(self.route(t).await.ok());
        }
        let now = self.0.now();
        let mut core = self.0.core();
        core.forward_from_client(from, view, body, &routes, retrace, seals, now);
        self.after(core);
    }
}
