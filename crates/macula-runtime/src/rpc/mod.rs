//! RPC across the mesh: the tokio driver of `macula_rpc::RpcCore`.
//!
//! The core decides everything about a call (provider cache, choice,
//! breaker and latency feed, backoff, the one deadline, probes, cancel,
//! retryable versus final errors), about each request served (admission:
//! not served, at the handler's limit, shutting down; the deadline passed
//! to the handler) and about a gateway's forwarding. This module does the
//! I/O it asks for: DHT lookups and puts (`links.rs`), reaching providers,
//! sending CALL/REPLY/CALL_ERROR/CANCEL frames on the control stream,
//! running handler futures (panics caught, aborted on CANCEL or when their
//! connection closes), pings and timers.
//!
//! **Shape.** One `Mutex<State>` holds the core; it is held only for a
//! core call, never across an await. Each call is driven by its caller's
//! future: it polls its own actions (`RpcCore::poll_call`), does them, and
//! otherwise sleeps until the core's next timer, an answer (the connection
//! driver feeds REPLY/CALL_ERROR to `handle_answer`, which wakes that call),
//! its connection closing or its probe finishing. Dropping the future tells
//! the core (`drop_call`) and sends the CANCEL it returns.
//!
//! **Discovery.** `advertise` stores one signed record per provider under
//! `dht_key("rpc:{realm}:{procedure}")` (an `Advertisement`: weight,
//! metadata, listen addresses) and lists the procedure in the node's record
//! under `dht_key("rpcidx:{realm}")` (used by `macula services`). Records
//! live [`AD_TTL`] and the DHT republishes them at 75% of it; dropping the
//! [`Registration`] (or graceful shutdown) puts an empty value, which
//! replaces the advertisement on every replica, and stops republishing.
//!
//! **Roles.** A full node, a lightweight client and a node alone share this
//! driver and the core; what differs is the link (`links.rs`) and the
//! core's `Role`. A full node is also the gateway of its attached clients
//! (`gateway.rs` here: advertising their procedures, calling them).

mod advertise;
mod api;
mod call;
mod gateway;
mod links;
mod metrics;
mod serve;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use futures::future::AbortHandle;
use macula_rpc::{AdvertiseError, CallId, Millis, RecentCalls, RpcCore, Slot};
use macula_wire::NodeId;
use prometheus_client::metrics::family::Family;

pub use api::*;
pub(crate) use links::{Reach, RpcLink, Upstream};
pub use metrics::RpcCounters;

use crate::metrics::CountGauge;
use crate::peer::Peer;
use links::Role;
use metrics::DurationFamily;

type Core = RpcCore<NodeId, Arc<dyn Handler>>;

/// The core, and how to wake each call being driven (an answer for it
/// arrived).
struct State {
    core: Core,
    notify: HashMap<CallId, Arc<tokio::sync::Notify>>,
    /// Calls served that came on replaceable connections (relayed, or
    /// direct by hole punching), by caller and wire ID: a copy re-sent over
    /// a new route is answered once (`serve.rs`). The route is where a
    /// running call's answer goes: the connection it last came in on.
    recent: RecentCalls<NodeId, Peer>,
}

struct Inner {
    node_id: NodeId,
    max_payload: usize,
    /// The core's clock starts here.
    epoch: tokio::time::Instant,
    role: Role,
    state: Mutex<State>,
    /// Requests being served: (connection, call id) → abort handle.
    serving: Mutex<HashMap<(usize, u64), AbortHandle>>,
    /// Requests being served that came on replaceable connections: (caller,
    /// call id) → abort handle. Their connection closing does not abort
    /// them (the caller re-sends them over a new route); CANCEL does.
    serving_kept: Mutex<HashMap<(NodeId, u64), AbortHandle>>,
    /// A gateway's attached clients that serve procedures, by connection.
    clients: Mutex<HashMap<u64, Peer>>,
    /// Serialises DHT updates of advertisements and the index.
    ad_lock: tokio::sync::Mutex<()>,
    /// Serialises a gateway's changes to its clients' advertisements.
    client_ads: tokio::sync::Mutex<()>,
    counters: Arc<RpcCounters>,
    durations: DurationFamily,
    duration_labels: Mutex<std::collections::HashSet<String>>,
    /// What this node's (or client's) own application may do.
    own: Option<Arc<crate::authz::Authz>>,
    /// A client signs the calls it makes (their origin, PROTOCOL.md §5.4
    /// "Proved callers"): its gateway hands them on.
    signer: std::sync::OnceLock<ed25519_dalek::SigningKey>,
    /// End-to-end keys (a realm with an authority): calls of encrypted
    /// procedures are sealed by the caller and opened before the handler;
    /// replies the other way. Set once, right after construction.
    e2e: std::sync::OnceLock<Arc<crate::e2e::E2e>>,
    /// Where what this gateway carries is copied (`tap_carried`).
    carried_tap: Mutex<Option<tokio::sync::mpsc::Sender<Carried>>>,
}

/// A node's RPC. Cheap to clone.
#[derive(Clone)]
pub struct Rpc(Arc<Inner>);

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("advertised", &self.0.counters.advertised.get())
            .finish()
    }
}

fn ms(d: Duration) -> Millis {
    Millis::from_duration(d)
}

impl Rpc {
    /// RPC for node `node_id`; without a link it serves and calls only
    /// in process.
    pub fn new(node_id: NodeId, max_frame_size: u32, limits: RpcLimits) -> Rpc {
        Self::build(node_id, max_frame_size, limits, Role::Alone, None)
    }

    /// A full node's RPC (alone without a link).
    pub(crate) fn with_link(
        node_id: NodeId,
        max_frame_size: u32,
        limits: RpcLimits,
        link: Option<RpcLink>,
    ) -> Rpc {
        let own = link.as_ref().and_then(|l| l.authz.clone());
        let role = link.map_or(Role::Alone, Role::Node);
        Self::build(node_id, max_frame_size, limits, role, own)
    }

    /// A client's RPC: calls and advertisements go through the gateway.
    pub(crate) fn with_upstream(
        node_id: NodeId,
        max_frame_size: u32,
        limits: RpcLimits,
        upstream: Arc<dyn Upstream>,
        own: Option<Arc<crate::authz::Authz>>,
    ) -> Rpc {
        Self::build(node_id, max_frame_size, limits, Role::Client(upstream), own)
    }

    /// Signs every call this (client's) RPC makes with `key` from now on.
    pub(crate) fn sign_calls(&self, key: ed25519_dalek::SigningKey) {
        let _ = self.0.signer.set(key);
    }

    /// The realm's permissions (a full node of a realm with an authority).
    pub(crate) fn authz(&self) -> Option<&Arc<crate::authz::Authz>> {
        match &self.0.role {
            Role::Node(link) => link.authz.as_ref(),
            _ => None,
        }
    }

    /// Whether this node's own application may do `action` on `procedure`.
    pub(crate) fn allowed_here(
        &self,
        action: macula_auth::Action,
        procedure: &str,
    ) -> Result<(), RpcError> {
        match &self.0.own {
            None => Ok(()),
            Some(a) => a
                .local(action, procedure)
                .map_err(|d| RpcError::Unauthorized {
                    procedure: procedure.to_string(),
                    provider: None,
                    message: d.to_string(),
                }),
        }
    }

    fn build(
        node_id: NodeId,
        max_frame_size: u32,
        limits: RpcLimits,
        role: Role,
        own: Option<Arc<crate::authz::Authz>>,
    ) -> Rpc {
        let cfg = macula_rpc::Config {
            max_inflight_calls: limits.max_inflight_calls,
            handler_concurrency: limits.handler_concurrency,
            max_advertised: MAX_ADVERTISED,
            provider_cache_ttl: ms(PROVIDER_CACHE_TTL),
            provider_cache_capacity: PROVIDER_CACHE_CAPACITY,
            max_providers_per_procedure: MAX_PROVIDERS_PER_PROCEDURE,
            reach_timeout: ms(REACH_TIMEOUT),
            probe_after: ms(PROBE_AFTER),
            probe_timeout: ms(PROBE_TIMEOUT),
            probe_interval: ms(PROBE_INTERVAL),
            gateway_wait: ms(GATEWAY_WAIT),
            ..macula_rpc::Config::default()
        };
        let mut core = RpcCore::new(node_id, role.core_role(), cfg, crate::backoff::seed());
        // Wire IDs from a random start: providers remember a caller's IDs
        // for a while (re-sent calls), and a restarted caller must not
        // meet its previous run's.
        core.start_wire_ids_at(1 + (crate::backoff::seed() >> 2));
        let recent = RecentCalls::new(macula_rpc::RecentLimits {
            max_calls: limits.recent_calls.max(1),
            max_bytes: limits.recent_call_bytes,
            keep: ms(limits.recent_call_keep),
        });
        Rpc(Arc::new(Inner {
            node_id,
            max_payload: (max_frame_size as usize).saturating_sub(CALL_HEADROOM),
            epoch: tokio::time::Instant::now(),
            role,
            state: Mutex::new(State {
                core,
                notify: HashMap::new(),
                recent,
            }),
            serving: Mutex::new(HashMap::new()),
            serving_kept: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            ad_lock: tokio::sync::Mutex::new(()),
            client_ads: tokio::sync::Mutex::new(()),
            counters: Arc::new(RpcCounters::default()),
            durations: Family::new_with_constructor(metrics::duration_histogram),
            duration_labels: Mutex::new(std::collections::HashSet::new()),
            own,
            signer: std::sync::OnceLock::new(),
            e2e: std::sync::OnceLock::new(),
            carried_tap: Mutex::new(None),
        }))
    }

    /// A copy of every call this node carries for another from now on,
    /// with its reply, as it carries them (on an encrypted procedure: the
    /// envelopes). A diagnostic (what the tests assert the bytes of): at
    /// most `capacity` wait; while the receiver is full, copies are not
    /// made. Replaces an earlier tap.
    pub fn tap_carried(&self, capacity: usize) -> tokio::sync::mpsc::Receiver<Carried> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        *self.0.carried_tap.lock() = Some(tx);
        rx
    }

    fn tap(&self, c: impl FnOnce() -> Carried) {
        let tap = self.0.carried_tap.lock().clone();
        if let Some(tx) = tap {
            let _ = tx.try_send(c());
        }
    }

    /// The end-to-end keys, in a realm with an authority.
    pub(crate) fn e2e(&self) -> Option<&Arc<crate::e2e::E2e>> {
        self.0.e2e.get()
    }

    /// Seals calls of the realm's encrypted procedures with `e2e`'s keys.
    pub(crate) fn set_e2e(&self, e2e: Arc<crate::e2e::E2e>) {
        let _ = self.0.e2e.set(e2e);
    }

    pub fn counters(&self) -> &Arc<RpcCounters> {
        &self.0.counters
    }

    /// Registers the RPC counters and `macula_rpc_duration_seconds` (by
    /// procedure, a bounded label set) in the node's registry.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        self.0.counters.register(r);
        crate::metrics::register(
            r,
            "macula_rpc_duration_seconds",
            "Call duration as the caller sees it, by procedure (at most 64 procedure labels; the rest share `_other`).",
            self.0.durations.clone(),
        );
    }

    /// Largest request or reply payload.
    pub fn max_payload(&self) -> usize {
        self.0.max_payload
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock()
    }

    fn now(&self) -> Millis {
        ms(self.0.epoch.elapsed())
    }

    /// The instant the core's clock reads `t`.
    fn instant(&self, t: Millis) -> tokio::time::Instant {
        self.0.epoch + t.to_duration()
    }
}

/// Gives a handler slot back to the core when dropped (the handler ended,
/// or its task was aborted).
struct SlotGuard<'a>(&'a Rpc, Option<Slot>);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.1.take() {
            self.0.state().core.release(slot);
        }
    }
}

/// Holds a gauge up while alive.
struct GaugeGuard<'a>(&'a CountGauge);

impl<'a> GaugeGuard<'a> {
    fn up(g: &'a CountGauge) -> GaugeGuard<'a> {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn advertise_error(procedure: &str, e: AdvertiseError) -> RpcError {
    let procedure = procedure.to_string();
    match e {
        AdvertiseError::InvalidProcedure(source) => {
            RpcError::InvalidProcedure { procedure, source }
        }
        AdvertiseError::ShuttingDown => RpcError::ShuttingDown,
        AdvertiseError::AlreadyAdvertised => RpcError::AlreadyAdvertised { procedure },
        AdvertiseError::TooManyAdvertised { max } => RpcError::TooManyAdvertised { max },
        other => RpcError::Advertise {
            procedure,
            reason: other.to_string(),
        },
    }
}

/// How the reference begins the message of a CALL_ERROR `Unauthorized`
/// that refuses a call for end-to-end encryption (a call in the clear on
/// an encrypted procedure, or one the provider cannot open): the caller
/// reports it as [`RpcError::Sealing`].
pub(crate) const E2E_REFUSAL: &str = "end-to-end: ";

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
