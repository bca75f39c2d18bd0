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

mod api;
mod gateway;
mod links;
mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{AbortHandle, Abortable};
use futures::FutureExt;
use macula_rpc::{
    Action, Admission, Advert, AdvertiseError, CallFailure, CallId, CallSpec, Millis, RpcCore,
    Slot, Started, Token,
};
use macula_wire::rpc::{Call, CallError, Cancel, Reply, RpcErrorKind, RpcMessage};
use macula_wire::{Message, NodeId};
use prometheus_client::metrics::family::Family;

pub use api::*;
pub(crate) use links::{Reach, RpcLink, Upstream};
pub use metrics::{RpcCollector, RpcCounters};

use crate::peer::Peer;
use crate::service::{Answer, PeerDown, Serves, Service};
use links::Role;
use metrics::DurationFamily;

type Core = RpcCore<NodeId, Arc<dyn Handler>>;

/// The core, and the wakers of calls waiting for an answer.
struct State {
    core: Core,
    wakers: HashMap<CallId, Waker>,
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
    /// A gateway's attached clients that serve procedures, by connection.
    clients: Mutex<HashMap<u64, Peer>>,
    /// Serialises DHT updates of advertisements and the index.
    ad_lock: tokio::sync::Mutex<()>,
    /// Serialises a gateway's changes to its clients' advertisements.
    client_ads: tokio::sync::Mutex<()>,
    counters: Arc<RpcCounters>,
    durations: DurationFamily,
    duration_labels: Mutex<std::collections::HashSet<String>>,
}

/// A node's RPC. Cheap to clone.
#[derive(Clone)]
pub struct Rpc(Arc<Inner>);

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("advertised", &self.0.counters.advertised.load(Relaxed))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // Only spreads load; a fixed seed is an acceptable fallback.
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

fn ms(d: Duration) -> Millis {
    Millis::from_duration(d)
}

impl Rpc {
    /// RPC for node `node_id`; without a link it serves and calls only
    /// in process.
    pub fn new(node_id: NodeId, max_frame_size: u32, limits: RpcLimits) -> Rpc {
        Self::build(node_id, max_frame_size, limits, Role::Alone)
    }

    /// A full node's RPC (alone without a link).
    pub(crate) fn with_link(
        node_id: NodeId,
        max_frame_size: u32,
        limits: RpcLimits,
        link: Option<RpcLink>,
    ) -> Rpc {
        let role = link.map_or(Role::Alone, Role::Node);
        Self::build(node_id, max_frame_size, limits, role)
    }

    /// A client's RPC: calls and advertisements go through the gateway.
    pub(crate) fn with_upstream(
        node_id: NodeId,
        max_frame_size: u32,
        limits: RpcLimits,
        upstream: Arc<dyn Upstream>,
    ) -> Rpc {
        Self::build(node_id, max_frame_size, limits, Role::Client(upstream))
    }

    fn build(node_id: NodeId, max_frame_size: u32, limits: RpcLimits, role: Role) -> Rpc {
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
        let core = RpcCore::new(node_id, role.core_role(), cfg, seed());
        Rpc(Arc::new(Inner {
            node_id,
            max_payload: (max_frame_size as usize).saturating_sub(CALL_HEADROOM),
            epoch: tokio::time::Instant::now(),
            role,
            state: Mutex::new(State {
                core,
                wakers: HashMap::new(),
            }),
            serving: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            ad_lock: tokio::sync::Mutex::new(()),
            client_ads: tokio::sync::Mutex::new(()),
            counters: Arc::new(RpcCounters::default()),
            durations: Family::new_with_constructor(metrics::duration_histogram),
            duration_labels: Mutex::new(std::collections::HashSet::new()),
        }))
    }

    pub fn counters(&self) -> &Arc<RpcCounters> {
        &self.0.counters
    }

    /// The collector for the node's registry.
    pub fn collector(&self) -> RpcCollector {
        RpcCollector {
            counters: self.0.counters.clone(),
        }
    }

    /// `macula_rpc_duration_seconds`, by procedure (bounded label set).
    pub fn duration_family(&self) -> DurationFamily {
        self.0.durations.clone()
    }

    /// Largest request or reply payload.
    pub fn max_payload(&self) -> usize {
        self.0.max_payload
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.0.state)
    }

    fn now(&self) -> Millis {
        ms(self.0.epoch.elapsed())
    }

    /// The instant the core's clock reads `t`.
    fn instant(&self, t: Millis) -> tokio::time::Instant {
        self.0.epoch + t.to_duration()
    }

    // ----- advertising -------------------------------------------------

    /// Serves `procedure` with `handler` and advertises it in the mesh
    /// (before returning). Dropping the registration withdraws it.
    pub async fn advertise<H: Handler>(
        &self,
        procedure: &str,
        opts: AdvertiseOptions,
        handler: H,
    ) -> Result<Registration, RpcError> {
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

    fn count_advertised(&self) {
        let n = self.state().core.serving().len();
        self.0.counters.advertised.store(n as u64, Relaxed);
    }

    /// Stops serving `procedure` if `token` is still its advertisement.
    fn withdraw_local(&self, procedure: &str, token: Token) -> bool {
        let removed = self.state().core.withdraw(procedure, token);
        self.count_advertised();
        removed
    }

    /// Puts the advertisement of `procedure` as the core has it (or, with
    /// `on` false, its withdrawal) and this node's index record.
    async fn publish_ad(&self, procedure: &str, on: bool) -> Result<(), String> {
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

    fn served_names(&self) -> Vec<String> {
        let s = self.state();
        let v = s.core.serving().advertised();
        v.into_iter().map(|(name, _, _)| name).collect()
    }

    /// Sets the addresses advertisements carry (a reachability check found
    /// them: the public addresses, or none for a node behind NAT) and, if
    /// they changed, republishes every advertisement.
    pub(crate) async fn set_addrs(&self, addrs: Vec<String>) {
        let Role::Node(link) = &self.0.role else {
            return;
        };
        {
            let mut cur = lock(&link.addrs);
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
    pub fn advertised(&self) -> Vec<(String, u32, usize)> {
        self.state().core.serving().advertised()
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

    // ----- calling -----------------------------------------------------

    /// A call of `procedure`; configure it, then `.await` it.
    pub fn call(&self, procedure: &str, payload: impl Into<Bytes>) -> CallBuilder {
        CallBuilder {
            rpc: self.clone(),
            procedure: procedure.to_string(),
            payload: payload.into(),
            opts: CallOptions::default(),
            target: None,
        }
    }

    /// A call of `procedure` on the given provider only (no discovery, no
    /// failover).
    pub fn call_to(
        &self,
        provider: NodeId,
        procedure: &str,
        payload: impl Into<Bytes>,
    ) -> CallBuilder {
        CallBuilder {
            target: Some(provider),
            ..self.call(procedure, payload)
        }
    }

    /// A call over a given connection (benchmarks compare pooled and fresh
    /// connections with this). No discovery, no retries.
    pub async fn call_via(
        &self,
        peer: &Peer,
        procedure: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        let b = self
            .call_to(peer.node_id(), procedure, payload)
            .timeout(timeout);
        self.check_call(&b)?;
        let r = self.run(&b, Some(peer)).await;
        r.map(|r| r.payload)
    }

    fn check_call(&self, b: &CallBuilder) -> Result<(), RpcError> {
        macula_rpc::validate_procedure(&b.procedure).map_err(|source| {
            RpcError::InvalidProcedure {
                procedure: b.procedure.clone(),
                source,
            }
        })?;
        if b.payload.len() > self.0.max_payload {
            return Err(RpcError::PayloadTooLarge {
                len: b.payload.len(),
                max: self.0.max_payload,
            });
        }
        if b.opts.headers.len() > MAX_CALL_HEADERS {
            return Err(RpcError::TooManyHeaders {
                n: b.opts.headers.len(),
            });
        }
        Ok(())
    }

    pub(super) async fn run_call(self, b: CallBuilder) -> Result<Response, RpcError> {
        self.check_call(&b)?;
        self.run(&b, None).await
    }

    /// Starts the call in the core and runs it, counting it.
    async fn run(&self, b: &CallBuilder, via: Option<&Peer>) -> Result<Response, RpcError> {
        let c = &self.0.counters;
        let spec = CallSpec {
            procedure: b.procedure.clone(),
            timeout: ms(b.opts.timeout),
            retries: if via.is_some() { 0 } else { b.opts.retries },
            strategy: b.opts.strategy,
            target: b.target,
        };
        let now = self.now();
        let started = self.state().core.start_call(now, spec);
        if let Err(CallFailure::Overloaded { provider: None }) = started {
            c.caller_overloaded_total.fetch_add(1, Relaxed);
        } else {
            c.calls_total.fetch_add(1, Relaxed);
        }
        let at = std::time::Instant::now();
        let res = match started {
            // This node's in-flight limit: refused before it was a call.
            Err(f @ CallFailure::Overloaded { provider: None }) => return Err(self.error(b, f)),
            Err(f) => {
                if let CallFailure::Overloaded { provider: Some(_) } = f {
                    c.handler_overloaded_total.fetch_add(1, Relaxed);
                }
                Err(self.error(b, f))
            }
            Ok(Started::Local {
                handler,
                slot,
                deadline,
            }) => {
                c.calls_local_total.fetch_add(1, Relaxed);
                let _gauge = GaugeGuard::up(&c.inflight_calls);
                self.call_local(b, handler, slot, deadline).await
            }
            Ok(Started::Remote(id)) => {
                let _gauge = GaugeGuard::up(&c.inflight_calls);
                self.drive(id, b, via).await
            }
        };
        match &res {
            Ok(_) => c.calls_ok_total.fetch_add(1, Relaxed),
            Err(_) => c.calls_failed_total.fetch_add(1, Relaxed),
        };
        self.observe_duration(&b.procedure, at.elapsed());
        res
    }

    fn observe_duration(&self, procedure: &str, d: Duration) {
        let label = {
            let mut seen = lock(&self.0.duration_labels);
            if seen.contains(procedure) {
                procedure.to_string()
            } else if seen.len() < MAX_DURATION_LABELS {
                seen.insert(procedure.to_string());
                procedure.to_string()
            } else {
                "_other".to_string()
            }
        };
        self.0
            .durations
            .get_or_create(&vec![("procedure".to_string(), label)])
            .observe(d.as_secs_f64());
    }

    /// Runs this node's own handler in process.
    async fn call_local(
        &self,
        b: &CallBuilder,
        handler: Arc<dyn Handler>,
        slot: Slot,
        deadline: Millis,
    ) -> Result<Response, RpcError> {
        let _slot = SlotGuard(self, Some(slot));
        let me = self.0.node_id;
        let req = Request {
            procedure: b.procedure.clone(),
            payload: b.payload.clone(),
            headers: b.opts.headers.clone(),
            caller: me,
            deadline: self.instant(deadline),
        };
        match run_handler(&self.0.counters, handler.as_ref(), req).await {
            Ok(payload) => Ok(Response {
                payload,
                provider: me,
                attempts: 1,
            }),
            Err(f) => Err(local_error(&b.procedure, me, f, b.opts.timeout)),
        }
    }

    fn error(&self, b: &CallBuilder, f: CallFailure<NodeId>) -> RpcError {
        let procedure = b.procedure.clone();
        match f {
            CallFailure::NoProviders => RpcError::NoProviders { procedure },
            CallFailure::Timeout => RpcError::Timeout {
                procedure,
                after: b.opts.timeout,
            },
            CallFailure::Handler {
                provider,
                code,
                message,
            } => RpcError::Handler {
                procedure,
                provider,
                code,
                message,
            },
            CallFailure::Panicked { provider } => RpcError::Panicked {
                procedure,
                provider,
            },
            CallFailure::Overloaded { provider } => RpcError::Overloaded {
                procedure,
                provider,
            },
            CallFailure::Unreachable { tried, reason } => RpcError::Unreachable {
                procedure,
                tried,
                reason,
            },
            CallFailure::Cancelled => RpcError::Cancelled { procedure },
        }
    }

    /// Does call `id`'s actions until it is done. `via`: the connection to
    /// use instead of reaching the provider.
    async fn drive(
        &self,
        id: CallId,
        b: &CallBuilder,
        via: Option<&Peer>,
    ) -> Result<Response, RpcError> {
        let mut call = Driving {
            rpc: self,
            id,
            peer: via.cloned(),
            watch: None,
            probe: None,
            done: false,
        };
        loop {
            let now = self.now();
            let (action, wake) = {
                let mut s = self.state();
                let a = s.core.poll_call(id, now);
                (a, s.core.poll_timeout(id))
            };
            let timer = tokio::time::sleep_until(self.instant(wake.unwrap_or(now)));
            let Some(action) = action else {
                call.wait(timer).await;
                continue;
            };
            match action {
                Action::Lookup { procedure } => {
                    let Role::Node(link) = &self.0.role else {
                        let now = self.now();
                        self.state().core.handle_providers(id, now, Ok(Vec::new()));
                        continue;
                    };
                    tokio::select! {
                        found = link.lookup(&procedure) => {
                            let now = self.now();
                            self.state().core.handle_providers(id, now, found);
                        }
                        _ = timer => {}
                    }
                }
                Action::Connect { provider, addrs } => {
                    let reached = match (&self.0.role, via) {
                        (_, Some(p)) => Some(p.clone()),
                        (Role::Node(link), None) => tokio::select! {
                            p = link.reach.reach(provider, addrs) => p,
                            _ = timer => continue,
                        },
                        _ => None,
                    };
                    call.connected(reached, "could not connect", false);
                }
                Action::ConnectClient { conn, .. } => {
                    let peer = lock(&self.0.clients).get(&conn).cloned();
                    let peer = peer.filter(|p| !p.is_closed());
                    call.connected(peer, "the client's connection is gone", true);
                }
                Action::AwaitGateway { wait } => {
                    let gw = match (&self.0.role, via) {
                        (_, Some(p)) => Some(p.clone()),
                        (Role::Client(up), None) => tokio::select! {
                            g = up.gateway(wait.to_duration()) => g,
                            _ = timer => continue,
                        },
                        _ => None,
                    };
                    let now = self.now();
                    let g = gw.as_ref().map(Peer::node_id);
                    call.peer = gw;
                    self.state().core.handle_gateway(id, now, g);
                }
                Action::Send {
                    wire_id,
                    timeout_ms,
                    ..
                } => call.send(b, wire_id, timeout_ms, timer).await,
                Action::Probe { wire_id, .. } => {
                    if let Some(p) = call.peer.clone() {
                        call.probe = Some((
                            wire_id,
                            Box::pin(async move {
                                p.ping(PROBE_TIMEOUT)
                                    .await
                                    .map(|_| ())
                                    .map_err(|e| e.to_string())
                            }),
                        ));
                    }
                }
                Action::Close { provider, reason } => {
                    self.0.counters.probes_failed_total.fetch_add(1, Relaxed);
                    tracing::warn!(peer = %provider, procedure = %b.procedure, reason, "provider failed a liveness probe during a call; closing its connection");
                    if let Some(p) = &call.peer {
                        p.connection().close(
                            crate::peer::close_code(macula_wire::DisconnectReason::ProtocolError),
                            b"liveness probe failed",
                        );
                    }
                }
                Action::Cancel { wire_id, .. } => call.cancel(wire_id),
                Action::Retrying { after } => {
                    self.0.counters.retries_total.fetch_add(1, Relaxed);
                    tracing::debug!(procedure = %b.procedure, error = ?after, "retrying on another provider");
                }
                Action::Done(r) => {
                    call.done = true;
                    return r
                        .map(|a| Response {
                            payload: Bytes::from(a.payload),
                            provider: a.provider,
                            attempts: a.attempts,
                        })
                        .map_err(|f| self.error(b, f));
                }
            }
        }
    }

    // ----- serving and frames from peers -------------------------------

    /// An RPC frame from `peer` (called by the connection driver; never
    /// blocks). Returns an immediate answer (a refusal) for the driver to
    /// send itself, so a peer flooding refused calls is slowed down by its
    /// own connection instead of piling up tasks here.
    pub(crate) fn on_message(&self, peer: &Peer, msg: RpcMessage) -> Option<Message> {
        match msg {
            RpcMessage::Call(call) => return self.serve(peer, call),
            RpcMessage::Reply(r) => self.complete(peer, r.id, Ok(r.payload)),
            RpcMessage::Error(e) => self.complete(peer, e.id, Err(e)),
            RpcMessage::Cancel(Cancel { id }) => {
                let handle = lock(&self.0.serving).remove(&(peer.connection_id(), id));
                if let Some(h) = handle {
                    h.abort();
                    self.0
                        .counters
                        .cancelled_by_caller_total
                        .fetch_add(1, Relaxed);
                }
            }
        }
        None
    }

    fn complete(&self, peer: &Peer, id: u64, answer: Result<Vec<u8>, CallError>) {
        let now = self.now();
        let waker = {
            let mut s = self.state();
            // The core checks that only the provider the call went to
            // answers it.
            match s.core.handle_answer(now, &peer.node_id(), id, answer) {
                Some(call) => s.wakers.remove(&call),
                None => {
                    self.0.counters.late_replies_total.fetch_add(1, Relaxed);
                    return;
                }
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Starts serving `call` in its own task, or returns the refusal.
    fn serve(&self, peer: &Peer, call: Call) -> Option<Message> {
        let c = &self.0.counters;
        let now = self.now();
        let admission =
            self.state()
                .core
                .admit(now, &call.procedure, call.timeout_ms, peer.is_client());
        match admission {
            Admission::Refuse { kind, message } => {
                match kind {
                    RpcErrorKind::NotFound => c.not_found_total.fetch_add(1, Relaxed),
                    RpcErrorKind::Overloaded => c.handler_overloaded_total.fetch_add(1, Relaxed),
                    _ => 0,
                };
                Some(Message::Rpc(RpcMessage::Error(CallError {
                    id: call.id,
                    kind,
                    code: 0,
                    message,
                })))
            }
            Admission::Serve {
                handler,
                slot,
                deadline,
            } => {
                let req = Request {
                    procedure: call.procedure,
                    payload: Bytes::from(call.payload),
                    headers: call.headers,
                    caller: peer.node_id(),
                    deadline: self.instant(deadline),
                };
                let (id, rpc) = (call.id, self.clone());
                self.spawn_serving(peer, id, async move {
                    let _slot = SlotGuard(&rpc, Some(slot));
                    run_handler(&rpc.0.counters, handler.as_ref(), req)
                        .await
                        .map_err(|f| handler_failure(id, f))
                });
                None
            }
            Admission::Forward { timeout } => {
                // A gateway calls onward (its clients, or the mesh for a
                // client) in its own task, like a handler; the answer keeps
                // the onward error's kind.
                let (rpc, id) = (self.clone(), call.id);
                self.spawn_serving(peer, id, async move {
                    let mut b = rpc
                        .call(&call.procedure, call.payload)
                        .timeout(timeout.to_duration());
                    b.opts.headers = call.headers;
                    b.await
                        .map(|r| r.payload)
                        .map_err(|e| forwarded_error(id, &e))
                });
                None
            }
        }
    }

    /// Serves request `id` from `peer` with `work` in its own task (CANCEL
    /// aborts it, as does the connection closing) and sends the answer:
    /// REPLY, or CALL_ERROR; an answer that cannot be sent (too large for
    /// a frame) is replaced by an `Invalid` error.
    fn spawn_serving<F>(&self, peer: &Peer, id: u64, work: F)
    where
        F: Future<Output = Result<Bytes, CallError>> + Send + 'static,
    {
        let key = (peer.connection_id(), id);
        let (abort, reg) = AbortHandle::new_pair();
        lock(&self.0.serving).insert(key, abort);
        let (rpc, peer) = (self.clone(), peer.clone());
        let task = async move {
            let outcome = work.await;
            lock(&rpc.0.serving).remove(&key);
            let c = &rpc.0.counters;
            let msg = match outcome {
                Ok(payload) => {
                    c.served_total.fetch_add(1, Relaxed);
                    Message::Rpc(RpcMessage::Reply(Reply {
                        id,
                        payload: payload.to_vec(),
                        headers: Vec::new(),
                    }))
                }
                Err(e) => {
                    c.served_failed_total.fetch_add(1, Relaxed);
                    Message::Rpc(RpcMessage::Error(e))
                }
            };
            if let Err(e) = peer.send(&msg).await {
                // Too large for a frame, or the connection is gone.
                tracing::debug!(peer = %peer.node_id(), error = %e, "could not send RPC answer");
                let message = format!("answer could not be sent: {e}");
                let fallback = Message::Rpc(RpcMessage::Error(CallError {
                    id,
                    kind: RpcErrorKind::Invalid,
                    code: 0,
                    message: truncate(&message, macula_wire::rpc::MAX_WIRE_RPC_ERROR_LEN),
                }));
                let _ = peer.send(&fallback).await;
            }
        };
        let counters = self.0.counters.clone();
        tokio::spawn(async move {
            let _gauge = GaugeGuard::up(&counters.serving);
            let _ = Abortable::new(task, reg).await;
        });
    }

    /// The connection `conn_id` closed: abandon the requests it carried.
    pub(crate) fn connection_closed(&self, conn_id: usize) {
        let mut serving = lock(&self.0.serving);
        serving.retain(|(c, _), h| {
            if *c == conn_id {
                h.abort();
                false
            } else {
                true
            }
        });
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

    /// Waits (at most `limit`) for requests being served to finish. True if
    /// none is left.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.0.counters.serving.load(Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// Breaker state and latency estimate of every provider this node has
    /// called.
    pub fn provider_health(&self) -> Vec<(NodeId, &'static str, Option<u64>)> {
        let now = self.now();
        self.state()
            .core
            .balancer()
            .providers(now)
            .into_iter()
            .map(|(k, s, l)| (k, s.name(), l))
            .collect()
    }
}

/// One call being driven: the connection of its current attempt, the
/// connection being watched for closing, the probe out.
struct Driving<'a> {
    rpc: &'a Rpc,
    id: CallId,
    peer: Option<Peer>,
    /// The connection a CALL went out on, until its closing was reported.
    watch: Option<Peer>,
    probe: Option<(u64, ProbeFuture)>,
    done: bool,
}

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

impl Driving<'_> {
    /// The provider of the attempt was reached (`Some`) or not.
    fn connected(&mut self, peer: Option<Peer>, why: &str, lost: bool) {
        let now = self.rpc.now();
        let mut s = self.rpc.state();
        match peer {
            Some(p) => {
                self.peer = Some(p);
                s.core.handle_connected(self.id, now);
            }
            None => s
                .core
                .handle_link_failed(self.id, now, why.to_string(), lost),
        }
    }

    /// Sends the attempt's CALL.
    async fn send(
        &mut self,
        b: &CallBuilder,
        wire_id: u64,
        timeout_ms: u32,
        timer: tokio::time::Sleep,
    ) {
        let Some(peer) = self.peer.clone() else {
            let now = self.rpc.now();
            let reason = "no connection to send on".to_string();
            self.rpc
                .state()
                .core
                .handle_link_failed(self.id, now, reason, true);
            return;
        };
        self.probe = None;
        self.watch = Some(peer.clone());
        let call = Message::Rpc(RpcMessage::Call(Call {
            id: wire_id,
            procedure: b.procedure.clone(),
            payload: b.payload.to_vec(),
            timeout_ms,
            headers: b.opts.headers.clone(),
        }));
        peer.touch();
        let sent = tokio::select! {
            r = peer.send(&call) => r,
            _ = timer => return,
        };
        if let Err(e) = sent {
            let now = self.rpc.now();
            let reason = format!("could not send the call: {e}");
            let lost = peer.is_closed();
            self.rpc
                .state()
                .core
                .handle_link_failed(self.id, now, reason, lost);
        }
    }

    /// Waits for an answer, the timer, the connection closing or the probe.
    async fn wait(&mut self, timer: tokio::time::Sleep) {
        let id = self.id;
        let rpc = self.rpc;
        let answered = std::future::poll_fn(|cx| {
            let mut s = rpc.state();
            if s.core.poll_timeout(id) != Some(Millis::ZERO) {
                s.wakers.insert(id, cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(())
        });
        let (watch, probe) = (&self.watch, &mut self.probe);
        let closed = async {
            match watch {
                Some(p) => p.connection().closed().await,
                None => futures::future::pending().await,
            }
        };
        let probe = async {
            match probe {
                Some((w, f)) => (*w, f.await),
                None => futures::future::pending().await,
            }
        };
        enum Woke {
            Answer,
            Timer,
            Closed(String),
            Probe(u64, Result<(), String>),
        }
        let woke = tokio::select! {
            _ = answered => Woke::Answer,
            _ = timer => Woke::Timer,
            e = closed => Woke::Closed(crate::peer::describe_close(&e)),
            (w, r) = probe => Woke::Probe(w, r),
        };
        let now = self.rpc.now();
        match woke {
            Woke::Answer | Woke::Timer => {}
            Woke::Closed(why) => {
                self.watch = None;
                let reason = format!("connection closed: {why}");
                self.rpc
                    .state()
                    .core
                    .handle_link_failed(id, now, reason, true);
            }
            Woke::Probe(w, r) => {
                self.probe = None;
                let mut s = self.rpc.state();
                match r {
                    Ok(()) => s.core.handle_pong(id, now, w),
                    Err(why) => s.core.handle_probe_failed(id, now, w, why),
                }
            }
        }
        self.rpc.state().wakers.remove(&id);
    }

    /// Tells the provider of `wire_id` to stop (CANCEL), in the background.
    fn cancel(&self, wire_id: u64) {
        let Some(peer) = self.peer.clone().filter(|p| !p.is_closed()) else {
            return;
        };
        let msg = Message::Rpc(RpcMessage::Cancel(Cancel { id: wire_id }));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = peer.send(&msg).await;
            });
        }
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The caller gave up: the core forgets the call and says whether a
        // provider is working on it.
        let now = self.rpc.now();
        let cancel = {
            let mut s = self.rpc.state();
            s.wakers.remove(&self.id);
            s.core.drop_call(self.id, now)
        };
        if let Some(Action::Cancel { wire_id, .. }) = cancel {
            self.cancel(wire_id);
        }
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
struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    fn up(g: &'a AtomicU64) -> GaugeGuard<'a> {
        g.fetch_add(1, Relaxed);
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
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

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

enum HandlerFailure {
    Error(HandlerError),
    Panicked,
    Timeout,
}

/// Runs a handler until its deadline, turning a panic into an error.
async fn run_handler(
    counters: &RpcCounters,
    handler: &dyn Handler,
    req: Request,
) -> Result<Bytes, HandlerFailure> {
    let deadline = req.deadline;
    let procedure = req.procedure.clone();
    let fut = std::panic::AssertUnwindSafe(handler.call(req)).catch_unwind();
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(Ok(Ok(payload))) => Ok(payload),
        Ok(Ok(Err(e))) => Err(HandlerFailure::Error(e)),
        Ok(Err(_panic)) => {
            counters.handler_panics_total.fetch_add(1, Relaxed);
            tracing::error!(procedure, "RPC handler panicked; still serving");
            Err(HandlerFailure::Panicked)
        }
        Err(_) => {
            counters.handler_timeouts_total.fetch_add(1, Relaxed);
            Err(HandlerFailure::Timeout)
        }
    }
}

/// The CALL_ERROR for a served request's handler failure.
fn handler_failure(id: u64, f: HandlerFailure) -> CallError {
    let (kind, code, message) = match f {
        HandlerFailure::Error(e) => (RpcErrorKind::Handler, e.code, e.message),
        HandlerFailure::Panicked => (RpcErrorKind::Panicked, 0, "handler panicked".to_string()),
        HandlerFailure::Timeout => (RpcErrorKind::Timeout, 0, "deadline passed".to_string()),
    };
    CallError {
        id,
        kind,
        code,
        message: truncate(&message, macula_wire::rpc::MAX_WIRE_RPC_ERROR_LEN),
    }
}

/// The CALL_ERROR for a forwarded call's failure: the kind survives the hop.
fn forwarded_error(id: u64, e: &RpcError) -> CallError {
    let (kind, code) = match e {
        RpcError::Handler { code, .. } => (RpcErrorKind::Handler, *code),
        RpcError::Panicked { .. } => (RpcErrorKind::Panicked, 0),
        RpcError::Timeout { .. } => (RpcErrorKind::Timeout, 0),
        RpcError::Overloaded { .. } => (RpcErrorKind::Overloaded, 0),
        RpcError::Cancelled { .. } => (RpcErrorKind::Cancelled, 0),
        RpcError::ShuttingDown => (RpcErrorKind::ShuttingDown, 0),
        RpcError::NoProviders { .. } => (RpcErrorKind::NoProviders, 0),
        RpcError::Unreachable { .. } => (RpcErrorKind::Unreachable, 0),
        _ => (RpcErrorKind::Invalid, 0),
    };
    let message = match e {
        RpcError::Handler { message, .. } => message.clone(),
        other => other.to_string(),
    };
    CallError {
        id,
        kind,
        code,
        message: truncate(&message, macula_wire::rpc::MAX_WIRE_RPC_ERROR_LEN),
    }
}

fn local_error(procedure: &str, me: NodeId, f: HandlerFailure, timeout: Duration) -> RpcError {
    let procedure = procedure.to_string();
    match f {
        HandlerFailure::Error(e) => RpcError::Handler {
            procedure,
            provider: me,
            code: e.code,
            message: e.message,
        },
        HandlerFailure::Panicked => RpcError::Panicked {
            procedure,
            provider: me,
        },
        HandlerFailure::Timeout => RpcError::Timeout {
            procedure,
            after: timeout,
        },
    }
}

/// RPC as a service: CALL, REPLY, CALL_ERROR and CANCEL on the control
/// stream; requests a connection carried are aborted when it ends.
impl Service for Rpc {
    fn name(&self) -> &'static str {
        "rpc"
    }

    fn serves(&self) -> Serves {
        use macula_wire::MessageType as T;
        Serves {
            messages: &[T::RpcCall, T::RpcReply, T::RpcError, T::RpcCancel],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        match msg {
            Message::Rpc(msg) => match Rpc::on_message(self, peer, msg) {
                Some(reply) => Answer::Reply(reply),
                None => Answer::Done,
            },
            _ => Answer::Done,
        }
    }

    fn peer_down(&self, peer: &Peer, _why: PeerDown) {
        // Requests this connection carried have no one to answer to.
        self.connection_closed(peer.connection_id());
    }
}
