//! [`RpcCore`]: the whole RPC protocol of one node as a deterministic state
//! machine: calls (discovery, provider choice, attempts, probes, retries,
//! one deadline, cancel), serve admission, and a gateway's forwarding. See
//! the crate docs for how a driver runs it.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;

use macula_wire::rng::Rng;
use macula_wire::rpc::{CallError, RpcErrorKind};
use macula_wire::suspect::SuspectList;
use macula_wire::time::Millis;

use crate::balance::{Balancer, BalancerLimits, Outcome, Strategy};
use crate::breaker::BreakerConfig;
use crate::cache::{ProviderCache, ProviderInfo};
use crate::serve::{Admission, Advert, AdvertiseError, ClientAd, ConnId, ServeTable, Slot, Token};
use crate::Backoff;

/// What a provider key must be: node IDs in the runtime, small integers in
/// tests.
pub trait Key: Clone + Eq + Hash + Ord + Debug {}
impl<T: Clone + Eq + Hash + Ord + Debug> Key for T {}

/// One call of this node, from [`RpcCore::start_call`] to its
/// [`Action::Done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

/// Which part a node plays: it decides how a call reaches providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not in a mesh: only this node's own handlers answer.
    Alone,
    /// A full node: providers come from discovery (the DHT) and are
    /// reached directly; it is also the gateway of attached clients,
    /// forwarding their calls into the mesh.
    Node,
    /// A lightweight client: every call goes through its gateway, which
    /// finds the provider.
    Client,
}

/// Limits and timers of the core. Every one has a default (the reason is
/// next to it) and a knob in the runtime's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Calls outstanding at once; past it a call fails with `Overloaded`
    /// at once (a caller never queues without bound).
    pub max_inflight_calls: usize,
    /// Default concurrent requests per handler; past it callers get
    /// `Overloaded` and fail over.
    pub handler_concurrency: usize,
    /// Procedures this node may serve (bounded by its index record).
    pub max_advertised: usize,
    /// How long a lookup's provider list is trusted: long enough that a
    /// busy caller does one lookup per procedure every few seconds, short
    /// enough that a new provider gets traffic soon.
    pub provider_cache_ttl: Millis,
    /// Procedures whose providers are cached.
    pub provider_cache_capacity: usize,
    /// Providers considered per procedure (the rest of a lookup is ignored).
    pub max_providers_per_procedure: usize,
    /// Upper bound on reaching (dialing) one provider within a call.
    pub reach_timeout: Millis,
    /// A provider silent this long into an attempt gets a liveness probe:
    /// a killed process sends no CONNECTION_CLOSE, and without a probe the
    /// caller would wait for the whole deadline.
    pub probe_after: Millis,
    /// No answer to a probe within this long: the provider is gone.
    pub probe_timeout: Millis,
    /// Pause between probes while a provider works on a long call.
    pub probe_interval: Millis,
    /// How long a client's call waits for a gateway connection (failover).
    pub gateway_wait: Millis,
    /// A provider declared down (its connection went silent, or it could
    /// not be reached) is tried only after every other provider for this
    /// long, or until it is heard from: as long as an advertisement record
    /// lives (120 s), so a dead provider's record expires before its
    /// suspicion does. Remembered beyond the provider cache's few seconds.
    pub down_ttl: Millis,
    /// Providers remembered as down at once (the oldest forgotten first).
    pub max_down: usize,
    /// Times one call may be re-sent with the same wire ID over a new
    /// route to the same provider after the connection carrying it died,
    /// when that connection was replaceable (relayed, or direct by hole
    /// punching: the provider remembers such calls and runs each once).
    /// 2: the direct path dying, then the relayed one replaced.
    pub max_resends: u32,
    pub backoff: Backoff,
    pub breaker: BreakerConfig,
    pub balancer: BalancerLimits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_inflight_calls: 10_000,
            handler_concurrency: 1024,
            max_advertised: macula_wire::rpc::MAX_INDEX_PROCEDURES,
            provider_cache_ttl: Millis::from_secs(5),
            provider_cache_capacity: 1024,
            max_providers_per_procedure: 64,
            reach_timeout: Millis::from_secs(1),
            probe_after: Millis(250),
            probe_timeout: Millis::from_secs(1),
            probe_interval: Millis::from_secs(1),
            gateway_wait: Millis::from_secs(5),
            down_ttl: Millis::from_secs(120),
            max_down: 1024,
            max_resends: 2,
            backoff: Backoff::default(),
            breaker: BreakerConfig::default(),
            balancer: BalancerLimits::default(),
        }
    }
}

/// A call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSpec<K> {
    pub procedure: String,
    /// The whole call's deadline, retries included, from its start.
    pub timeout: Millis,
    /// Retries on other providers after a failure where the handler did not
    /// run (unreachable, overloaded, not served, shutting down).
    pub retries: u32,
    pub strategy: Strategy,
    /// Only this provider (no discovery, no failover).
    pub target: Option<K>,
}

/// How a call started.
#[derive(Debug, PartialEq, Eq)]
pub enum Started<H> {
    /// This node serves the procedure: run `handler` until `deadline` in
    /// process, then give `slot` back with [`RpcCore::release`].
    Local {
        handler: H,
        slot: Slot,
        deadline: Millis,
    },
    /// A call across the network: drive it with [`RpcCore::poll_call`].
    Remote(CallId),
}

/// A call's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<K> {
    pub payload: Vec<u8>,
    /// Who answered (this node, for a gateway's call to its clients: it is
    /// the provider the mesh knows).
    pub provider: K,
    /// Providers tried (1 when the first one answered).
    pub attempts: u32,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure<K> {
    NoProviders,
    Timeout,
    Handler {
        provider: K,
        code: i64,
        message: String,
    },
    Panicked {
        provider: K,
    },
    /// `provider` None: this node's in-flight call limit.
    Overloaded {
        provider: Option<K>,
    },
    Unreachable {
        tried: Vec<K>,
        reason: String,
    },
    Cancelled,
    /// The realm's permissions refused the call (final: every provider
    /// would refuse it the same way).
    Unauthorized {
        provider: K,
        message: String,
    },
}

impl<K> CallFailure<K> {
    /// Whether another provider may be tried. `Overloaded` (and not served,
    /// shutting down) mean the handler did not run; `Unreachable` may come
    /// after the CALL went out (the connection died), so a retry can run a
    /// handler twice: retries are at-least-once.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            CallFailure::Unreachable { .. } | CallFailure::Overloaded { .. }
        )
    }
}

/// The failure a provider's CALL_ERROR stands for. Not served and shutting
/// down mean "try another provider": they become `Unreachable`.
pub fn remote_failure<K>(provider: K, e: CallError) -> CallFailure<K> {
    match e.kind {
        RpcErrorKind::Handler => CallFailure::Handler {
            provider,
            code: e.code,
            message: e.message,
        },
        RpcErrorKind::Panicked => CallFailure::Panicked { provider },
        RpcErrorKind::Timeout => CallFailure::Timeout,
        RpcErrorKind::Overloaded => CallFailure::Overloaded {
            provider: Some(provider),
        },
        RpcErrorKind::Cancelled => CallFailure::Cancelled,
        RpcErrorKind::NoProviders => CallFailure::NoProviders,
        RpcErrorKind::Unauthorized => CallFailure::Unauthorized {
            provider,
            message: e.message,
        },
        RpcErrorKind::Unreachable | RpcErrorKind::NotFound | RpcErrorKind::ShuttingDown => {
            CallFailure::Unreachable {
                tried: vec![provider],
                reason: e.message,
            }
        }
        RpcErrorKind::Invalid | RpcErrorKind::Other(_) => CallFailure::Handler {
            provider,
            code: i64::from(u16::from(e.kind)),
            message: e.message,
        },
    }
}

/// What the driver must do next for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<K> {
    /// Look the procedure's providers up (the DHT); answer with
    /// [`RpcCore::handle_providers`].
    Lookup { procedure: String },
    /// Reach `provider` (pool, else its advertised `addrs`, else the DHT);
    /// answer with [`RpcCore::handle_connected`] or
    /// [`RpcCore::handle_link_failed`].
    Connect { provider: K, addrs: Vec<String> },
    /// Take the connection of attached client `client` (a gateway calling
    /// its client); answer like `Connect`.
    ConnectClient { client: K, conn: ConnId },
    /// Wait up to `wait` for the gateway connection (a client); answer with
    /// [`RpcCore::handle_gateway`].
    AwaitGateway { wait: Millis },
    /// Send CALL with this id and time left on the connection reached; a
    /// failure to send goes to [`RpcCore::handle_link_failed`], the answer
    /// to [`RpcCore::handle_answer`]. `attempt` counts from 1.
    Send {
        provider: K,
        wire_id: u64,
        timeout_ms: u32,
        attempt: u32,
    },
    /// Ping the provider's connection: [`RpcCore::handle_pong`] or
    /// [`RpcCore::handle_probe_failed`].
    Probe { provider: K, wire_id: u64 },
    /// The provider failed its liveness probe: close its connection.
    Close { provider: K, reason: String },
    /// Tell the provider to stop working on `wire_id` (CANCEL).
    Cancel { provider: K, wire_id: u64 },
    /// An attempt failed in a way another attempt may fix; the call backs
    /// off and tries again (for metrics and logs; nothing to do).
    Retrying { after: CallFailure<K> },
    /// The replaceable connection carrying CALL `wire_id` died: the same
    /// CALL (same wire ID) goes to the same provider over a new route, a
    /// `Connect` and a `Send` that follow (for metrics and logs).
    Resending { provider: K, wire_id: u64 },
    /// The call is over.
    Done(Result<Answer<K>, CallFailure<K>>),
}

#[derive(Debug, Clone)]
enum Route<K> {
    /// Discovery, balancer, failover (a full node's call).
    Mesh { tried: Vec<K> },
    /// One named provider.
    To(K),
    /// Through the gateway (a client's call).
    Gateway,
    /// To the attached clients serving the procedure, in turn (a gateway).
    Clients {
        rotation: Vec<(K, ConnId)>,
        next: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Probe when the provider is still silent at `at`.
    Idle { at: Millis },
    /// A probe is out; no answer by `until` means the provider is gone.
    Pinging { until: Millis },
}

#[derive(Debug, Clone)]
enum Phase {
    /// Choosing the next step.
    Start,
    /// `Lookup` emitted.
    Looking,
    /// `Connect`/`ConnectClient` emitted; given up at `until`.
    Connecting { until: Millis },
    /// `AwaitGateway` emitted.
    AwaitingGateway,
    /// CALL out as `wire_id`.
    Waiting { wire_id: u64, probe: Probe },
    /// Waiting before the next attempt.
    Backoff { until: Millis },
    /// `Done` queued.
    Finished,
}

#[derive(Debug, Clone)]
struct Attempt<K> {
    provider: K,
    started: Millis,
    /// Feeds the balancer (breaker, latency): direct calls to providers.
    record: bool,
    /// The connection reached is replaceable (relayed, or direct by hole
    /// punching): losing it under the CALL re-sends the CALL.
    fallback: bool,
}

#[derive(Debug, Clone)]
struct Call<K> {
    id: CallId,
    procedure: String,
    strategy: Strategy,
    retries: u32,
    deadline: Millis,
    route: Route<K>,
    phase: Phase,
    attempt: Option<Attempt<K>>,
    /// Attempts started (providers tried, or gateway attempts).
    attempts: u32,
    /// Re-sends made (see `Config::max_resends`).
    resends: u32,
    /// The wire ID the next `Send` reuses (a re-send in progress; still
    /// in `pending`).
    resend: Option<u64>,
    last: Option<CallFailure<K>>,
    out: VecDeque<Action<K>>,
}

/// What the balancer made of a mesh call's providers.
enum Choice<K> {
    /// None but this node.
    NoProviders,
    /// Every usable one was tried or has an open breaker.
    Exhausted,
    /// This one, at these addresses.
    Picked(K, Vec<String>),
}

fn choose<K: Key>(
    me: &K,
    balancer: &mut Balancer<K>,
    down: &SuspectList<K>,
    providers: &[ProviderInfo<K>],
    call: &Call<K>,
    now: Millis,
) -> Choice<K> {
    let Route::Mesh { tried } = &call.route else {
        return Choice::Exhausted;
    };
    let candidates: Vec<(K, u32)> = providers
        .iter()
        .filter(|p| p.node != *me)
        .map(|p| (p.node.clone(), p.weight))
        .collect();
    if candidates.is_empty() && tried.is_empty() {
        return Choice::NoProviders;
    }
    // Providers declared down come last: tried only when no other is left
    // (a suspicion may be wrong; a call must not fail for it).
    let (up, suspects): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|(k, _)| !down.is_down(k, now));
    let picked = balancer
        .pick(&call.procedure, call.strategy, &up, tried, now)
        .or_else(|| balancer.pick(&call.procedure, call.strategy, &suspects, tried, now));
    match picked {
        None => Choice::Exhausted,
        Some(k) => {
            let addrs = providers.iter().find(|p| p.node == k);
            let addrs = addrs.map(|p| p.addrs.clone()).unwrap_or_default();
            Choice::Picked(k, addrs)
        }
    }
}

/// The RPC state machine of one node. `K` names nodes, `H` is whatever
/// the driver runs for a handler (cloned out on admission).
#[derive(Debug, Clone)]
pub struct RpcCore<K, H> {
    me: K,
    role: Role,
    cfg: Config,
    rng: Rng,
    balancer: Balancer<K>,
    cache: ProviderCache<K>,
    /// Providers declared down: tried last (see `Config::down_ttl`).
    down: SuspectList<K>,
    /// The advertisement `seq` of each suspect when it was declared down
    /// (`None`: not known then; the next lookup's record sets it). A
    /// record with a higher one means the provider restarted: the
    /// suspicion ends.
    down_seq: HashMap<K, Option<u64>>,
    serve: ServeTable<K, H>,
    calls: HashMap<CallId, Call<K>>,
    /// Wire IDs of CALLs awaiting an answer: the call and the only
    /// provider allowed to answer it.
    pending: HashMap<u64, (CallId, K)>,
    next_call: u64,
    next_wire: u64,
    /// Calls outstanding (remote ones not finished, local ones running).
    inflight: usize,
}

impl<K: Key, H: Clone> RpcCore<K, H> {
    /// The core of node `me` playing `role`; `seed` drives every random
    /// choice (provider picks, backoff jitter).
    pub fn new(me: K, role: Role, cfg: Config, seed: u64) -> RpcCore<K, H> {
        let mut rng = Rng::new(seed);
        let balancer = Balancer::new(cfg.breaker, cfg.balancer, rng.next_u64());
        RpcCore {
            cache: ProviderCache::new(cfg.provider_cache_ttl, cfg.provider_cache_capacity),
            down: SuspectList::new(cfg.down_ttl, cfg.max_down),
            down_seq: HashMap::new(),
            serve: ServeTable::new(cfg.handler_concurrency, cfg.max_advertised),
            me,
            role,
            rng,
            balancer,
            cfg,
            calls: HashMap::new(),
            pending: HashMap::new(),
            next_call: 1,
            next_wire: 1,
            inflight: 0,
        }
    }

    pub fn me(&self) -> &K {
        &self.me
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Numbers this node's CALLs from `first` on (never 0). The runtime
    /// starts at a random value, so a restarted caller does not reuse its
    /// previous run's wire IDs, which providers remember a while for
    /// re-sent calls ([`crate::RecentCalls`]).
    pub fn start_wire_ids_at(&mut self, first: u64) {
        self.next_wire = first.max(1);
    }

    /// Calls outstanding now.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// CALLs awaiting an answer now.
    pub fn n_pending(&self) -> usize {
        self.pending.len()
    }

    /// Calls not yet finished (their `Done` not yet polled).
    pub fn calls(&self) -> impl Iterator<Item = CallId> + '_ {
        self.calls.keys().copied()
    }

    pub fn balancer(&self) -> &Balancer<K> {
        &self.balancer
    }

    pub fn cache(&self) -> &ProviderCache<K> {
        &self.cache
    }

    pub fn serving(&self) -> &ServeTable<K, H> {
        &self.serve
    }

    // ----- calling ------------------------------------------------------

    /// Starts a call at `now`. Fails at once when the in-flight limit is
    /// reached (`Overloaded` with no provider), when this node's own handler
    /// is at its limit, or when no provider can exist (`NoProviders`, or
    /// `Unreachable` for a named provider outside a mesh).
    pub fn start_call(
        &mut self,
        now: Millis,
        spec: CallSpec<K>,
    ) -> Result<Started<H>, CallFailure<K>> {
        if self.inflight >= self.cfg.max_inflight_calls {
            return Err(CallFailure::Overloaded { provider: None });
        }
        let deadline = now.saturating_add(spec.timeout);
        let here = spec.target.as_ref().is_none_or(|t| *t == self.me);
        let mut route = None;
        if here {
            match self.serve.acquire(&spec.procedure, true) {
                Ok(Some((handler, slot))) => {
                    self.inflight += 1;
                    return Ok(Started::Local {
                        handler,
                        slot,
                        deadline,
                    });
                }
                Err(()) => {
                    return Err(CallFailure::Overloaded {
                        provider: Some(self.me.clone()),
                    })
                }
                Ok(None) => {}
            }
            route = self
                .serve
                .rotation(&spec.procedure)
                .map(|rotation| Route::Clients { rotation, next: 0 });
        }
        let route = match (route, self.role, spec.target) {
            (Some(r), _, _) => r,
            (None, Role::Client, _) => Route::Gateway,
            (None, _, Some(t)) if t == self.me => return Err(CallFailure::NoProviders),
            (None, Role::Alone, Some(t)) => {
                return Err(CallFailure::Unreachable {
                    tried: vec![t],
                    reason: "this node is not in a mesh".into(),
                })
            }
            (None, Role::Alone, None) => return Err(CallFailure::NoProviders),
            (None, Role::Node, Some(t)) => Route::To(t),
            (None, Role::Node, None) => Route::Mesh { tried: Vec::new() },
        };
        let id = CallId(self.next_call);
        self.next_call += 1;
        self.inflight += 1;
        let mut call = Call {
            id,
            procedure: spec.procedure,
            strategy: spec.strategy,
            retries: spec.retries,
            deadline,
            route,
            phase: Phase::Start,
            attempt: None,
            attempts: 0,
            resends: 0,
            resend: None,
            last: None,
            out: VecDeque::new(),
        };
        self.step(&mut call, now);
        self.calls.insert(id, call);
        Ok(Started::Remote(id))
    }

    /// The next thing to do for call `id` at `now` (timers due are applied
    /// first). `None`: wait for an input or [`RpcCore::poll_timeout`].
    /// After `Done` the call is forgotten.
    pub fn poll_call(&mut self, id: CallId, now: Millis) -> Option<Action<K>> {
        let mut call = self.calls.remove(&id)?;
        self.tick(&mut call, now);
        let action = call.out.pop_front();
        if !matches!(action, Some(Action::Done(_))) {
            self.calls.insert(id, call);
        }
        action
    }

    /// When call `id` next needs [`RpcCore::poll_call`] without any input
    /// (never later than its deadline). `None` for an unknown call.
    pub fn poll_timeout(&self, id: CallId) -> Option<Millis> {
        let call = self.calls.get(&id)?;
        if !call.out.is_empty() {
            return Some(Millis::ZERO);
        }
        let at = match call.phase {
            Phase::Backoff { until } | Phase::Connecting { until } => until,
            Phase::Waiting {
                probe: Probe::Idle { at },
                ..
            } => at,
            Phase::Waiting {
                probe: Probe::Pinging { until },
                ..
            } => until,
            _ => call.deadline,
        };
        Some(at.min(call.deadline))
    }

    /// What a lookup for call `id` found (or why it failed).
    pub fn handle_providers(
        &mut self,
        id: CallId,
        now: Millis,
        found: Result<Vec<ProviderInfo<K>>, String>,
    ) {
        let Some(mut call) = self.calls.remove(&id) else {
            return;
        };
        if matches!(call.phase, Phase::Looking) {
            match found {
                Err(reason) => self.finish(
                    &mut call,
                    Err(CallFailure::Unreachable {
                        tried: Vec::new(),
                        reason: format!("provider lookup failed: {reason}"),
                    }),
                ),
                Ok(providers) => {
                    let providers = self.cache_providers(now, &call.procedure, providers);
                    self.pick(&mut call, &providers, now);
                }
            }
        }
        self.calls.insert(id, call);
    }

    /// Stores providers of `procedure` found at `now` (by a call's lookup or
    /// a listing of services); returns them, cut to the per-procedure limit.
    pub fn cache_providers(
        &mut self,
        now: Millis,
        procedure: &str,
        mut providers: Vec<ProviderInfo<K>>,
    ) -> Vec<ProviderInfo<K>> {
        providers.truncate(self.cfg.max_providers_per_procedure);
        for p in &providers {
            if !self.down.is_down(&p.node, now) {
                continue;
            }
            match self.down_seq.get_mut(&p.node) {
                Some(Some(seq)) if p.seq > *seq => {
                    // Re-advertised since: it restarted.
                    self.down.heard_from(&p.node);
                    self.down_seq.remove(&p.node);
                }
                Some(known @ None) => *known = Some(p.seq),
                Some(Some(_)) => {}
                None => {
                    self.down_seq.insert(p.node.clone(), Some(p.seq));
                }
            }
        }
        self.cache.insert(procedure, providers.clone(), now);
        providers
    }

    /// `node` is down from `now` on; `seq` is its advertisement's, if known.
    fn declare_down(&mut self, node: &K, seq: Option<u64>, now: Millis) {
        self.down.declare_down(node.clone(), now);
        if self.down_seq.len() >= self.cfg.max_down.saturating_mul(2) {
            let down = &self.down;
            self.down_seq.retain(|k, _| down.is_down(k, now));
        }
        self.down_seq.insert(node.clone(), seq);
    }

    /// The advertisement `seq` of `node` among the cached providers of
    /// `procedure`.
    fn cached_seq(&self, procedure: &str, node: &K, now: Millis) -> Option<u64> {
        self.cache
            .get(procedure, now)?
            .iter()
            .find(|p| p.node == *node)
            .map(|p| p.seq)
    }

    /// The provider of call `id` was reached: the CALL goes out.
    pub fn handle_connected(&mut self, id: CallId, now: Millis) {
        self.handle_reached(id, now, false);
    }

    /// The provider of call `id` was reached over a connection that is
    /// replaceable (`fallback`: relayed, or direct by hole punching, so
    /// another route to it exists) or not: the CALL goes out. Losing a
    /// replaceable connection under the CALL re-sends it (same wire ID)
    /// over a new route, at most `Config::max_resends` times.
    pub fn handle_reached(&mut self, id: CallId, now: Millis, fallback: bool) {
        let Some(mut call) = self.calls.remove(&id) else {
            return;
        };
        self.tick(&mut call, now);
        if matches!(call.phase, Phase::Connecting { .. }) {
            if let Some(a) = &mut call.attempt {
                a.fallback = fallback;
            }
            self.send(&mut call, now);
        }
        self.calls.insert(id, call);
    }

    /// The gateway connection of a client's call `id` (`None`: none came
    /// within the wait).
    pub fn handle_gateway(&mut self, id: CallId, now: Millis, gateway: Option<K>) {
        let Some(mut call) = self.calls.remove(&id) else {
            return;
        };
        self.tick(&mut call, now);
        if matches!(call.phase, Phase::AwaitingGateway) {
            match gateway {
                None => self.finish(
                    &mut call,
                    Err(CallFailure::Unreachable {
                        tried: Vec::new(),
                        reason: "not attached to a gateway (client mode)".into(),
                    }),
                ),
                Some(g) => {
                    call.attempts += 1;
                    call.attempt = Some(Attempt {
                        provider: g,
                        started: now,
                        record: false,
                        fallback: false,
                    });
                    self.send(&mut call, now);
                }
            }
        }
        self.calls.insert(id, call);
    }

    /// Call `id`'s provider could not be reached, the CALL could not be
    /// sent, or the connection closed while waiting. `lost`: the connection
    /// is gone (a client's gateway, a gateway's client: the next one may be
    /// tried).
    pub fn handle_link_failed(&mut self, id: CallId, now: Millis, reason: String, lost: bool) {
        let Some(mut call) = self.calls.remove(&id) else {
            return;
        };
        // Re-sending, a lost connection is the old one (its closing seen
        // twice: by the call and by the failure detector): already
        // handled. Reaching the provider anew fails with `lost` false.
        let stale = lost && call.resend.is_some();
        if let Phase::Connecting { .. } | Phase::Waiting { .. } = call.phase {
            if !stale {
                self.link_failed(&mut call, now, reason, lost);
            }
        }
        self.calls.insert(id, call);
    }

    /// REPLY (`Ok`) or CALL_ERROR (`Err`) for `wire_id` from `from`.
    /// Returns the call it answered; `None` if it answers nothing (late,
    /// unknown, or from a node the CALL did not go to): ignore it.
    pub fn handle_answer(
        &mut self,
        now: Millis,
        from: &K,
        wire_id: u64,
        answer: Result<Vec<u8>, CallError>,
    ) -> Option<CallId> {
        let id = match self.pending.get(&wire_id) {
            Some((id, provider)) if provider == from => *id,
            _ => return None,
        };
        self.pending.remove(&wire_id);
        if self.down.heard_from(from) {
            self.down_seq.remove(from);
        }
        let mut call = self.calls.remove(&id)?;
        let matched = match call.phase {
            Phase::Waiting { wire_id: w, .. } => w == wire_id,
            // The answer beat the re-send's new connection.
            Phase::Connecting { .. } => call.resend == Some(wire_id),
            _ => false,
        };
        if matched {
            call.resend = None;
            // Answered: nothing left to cancel.
            call.phase = Phase::Start;
            if now >= call.deadline {
                // Too late to count: the call is over at its deadline.
                self.abandon(&mut call, now);
                self.finish(&mut call, Err(CallFailure::Timeout));
            } else {
                let result = answer.map_err(|e| remote_failure(from.clone(), e));
                self.end_attempt(&mut call, now, result, false);
            }
        }
        self.calls.insert(id, call);
        matched.then_some(id)
    }

    /// The probe of call `id`'s attempt `wire_id` was answered.
    pub fn handle_pong(&mut self, id: CallId, now: Millis, wire_id: u64) {
        if let Some(call) = self.calls.get_mut(&id) {
            if let Phase::Waiting { wire_id: w, probe } = &mut call.phase {
                if *w == wire_id && matches!(probe, Probe::Pinging { .. }) {
                    *probe = Probe::Idle {
                        at: now.saturating_add(self.cfg.probe_interval),
                    };
                }
            }
        }
    }

    /// The probe of call `id`'s attempt `wire_id` failed (could not be
    /// sent, or the connection reported it dead).
    pub fn handle_probe_failed(&mut self, id: CallId, now: Millis, wire_id: u64, reason: String) {
        let Some(mut call) = self.calls.remove(&id) else {
            return;
        };
        if matches!(call.phase, Phase::Waiting { wire_id: w, .. } if w == wire_id) {
            self.probe_failed(&mut call, now, reason);
        }
        self.calls.insert(id, call);
    }

    /// The caller gave up on call `id` (its future was dropped): forget it.
    /// Returns the CANCEL to send if a provider is working on it.
    pub fn drop_call(&mut self, id: CallId, now: Millis) -> Option<Action<K>> {
        let mut call = self.calls.remove(&id)?;
        if matches!(call.phase, Phase::Finished) {
            return None;
        }
        self.inflight = self.inflight.saturating_sub(1);
        self.abandon(&mut call, now)
    }

    /// The failure detector declared `node` down (its connection went
    /// silent): it is tried last from now on (see `Config::down_ttl`), and
    /// every call whose current attempt is reaching or waiting on it moves
    /// on to another provider at once instead of waiting for its probe.
    /// Returns those calls (their drivers have actions to take).
    pub fn handle_peer_down(&mut self, node: &K, now: Millis) -> Vec<CallId> {
        self.declare_down(node, None, now);
        let mut ids: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| {
                c.attempt.as_ref().is_some_and(|a| a.provider == *node)
                    && matches!(c.phase, Phase::Connecting { .. } | Phase::Waiting { .. })
                    && c.resend.is_none()
            })
            .map(|(id, _)| *id)
            .collect();
        // In ID order, not the map's: replayable runs.
        ids.sort_unstable();
        for id in &ids {
            self.handle_link_failed(
                *id,
                now,
                "the provider's node was declared down".into(),
                true,
            );
        }
        ids
    }

    /// `node` connected again: no longer suspected.
    pub fn handle_peer_up(&mut self, node: &K) {
        self.down.heard_from(node);
        self.down_seq.remove(node);
    }

    /// Is `node` suspected down (tried after every other provider)?
    pub fn is_down(&self, node: &K, now: Millis) -> bool {
        self.down.is_down(node, now)
    }

    /// Providers suspected down now (some may have expired) and how many
    /// suspicions were declared in all.
    pub fn down_stats(&self) -> (usize, u64) {
        (self.down.len(), self.down.declared_total())
    }

    // ----- serving ------------------------------------------------------

    /// Serves `procedure` with this node's handler.
    pub fn advertise(&mut self, procedure: &str, ad: Advert<H>) -> Result<Token, AdvertiseError> {
        self.serve.advertise(procedure, ad)
    }

    /// A gateway serves `procedure` for attached client `client` (see
    /// [`ServeTable::advertise_for_client`]).
    pub fn advertise_for_client(
        &mut self,
        procedure: &str,
        client: K,
        conn: ConnId,
        weight: u32,
        metadata: Vec<(String, String)>,
    ) -> Result<ClientAd, AdvertiseError> {
        self.serve
            .advertise_for_client(procedure, client, conn, weight, metadata)
    }

    /// See [`ServeTable::withdraw_client`].
    pub fn withdraw_client(
        &mut self,
        conn: ConnId,
        procedure: Option<&str>,
    ) -> Vec<(String, Token)> {
        self.serve.withdraw_client(conn, procedure)
    }

    /// Stops serving `procedure` if `token` is still its advertisement.
    pub fn withdraw(&mut self, procedure: &str, token: Token) -> bool {
        self.serve.withdraw(procedure, token)
    }

    /// Refuses requests and advertisements from now on; returns every
    /// advertisement (now removed) to withdraw from the mesh.
    pub fn begin_shutdown(&mut self) -> Vec<(String, Token)> {
        self.serve.begin_shutdown()
    }

    /// Decides on a CALL for `procedure` with `timeout_ms` left from a peer
    /// (`from_client`: an attached client of this node).
    pub fn admit(
        &mut self,
        now: Millis,
        procedure: &str,
        timeout_ms: u32,
        from_client: bool,
    ) -> Admission<H> {
        let forwards = self.role == Role::Node;
        self.serve
            .admit(now, procedure, timeout_ms, from_client, forwards)
    }

    /// A handler finished: its slot (and a local call's in-flight place)
    /// is free again.
    pub fn release(&mut self, slot: Slot) {
        if slot.call {
            self.inflight = self.inflight.saturating_sub(1);
        }
        self.serve.release(slot);
    }

    // ----- the state machine ------------------------------------------

    /// Applies the timers due at `now`.
    fn tick(&mut self, call: &mut Call<K>, now: Millis) {
        if matches!(call.phase, Phase::Finished) {
            return;
        }
        if now >= call.deadline {
            self.abandon(call, now);
            self.finish(call, Err(CallFailure::Timeout));
            return;
        }
        match call.phase {
            Phase::Backoff { until } if now >= until => {
                call.phase = Phase::Start;
                self.step(call, now);
            }
            Phase::Connecting { until } if now >= until => {
                let reason = format!(
                    "not reached within {:?}",
                    self.cfg.reach_timeout.to_duration()
                );
                self.link_failed(call, now, reason, false);
            }
            Phase::Waiting {
                wire_id,
                probe: Probe::Idle { at },
            } if now >= at => {
                if let Some(a) = &call.attempt {
                    call.out.push_back(Action::Probe {
                        provider: a.provider.clone(),
                        wire_id,
                    });
                }
                call.phase = Phase::Waiting {
                    wire_id,
                    probe: Probe::Pinging {
                        until: now.saturating_add(self.cfg.probe_timeout),
                    },
                };
            }
            Phase::Waiting {
                probe: Probe::Pinging { until },
                ..
            } if now >= until => {
                let reason = format!(
                    "no answer within {:?}",
                    self.cfg.probe_timeout.to_duration()
                );
                self.probe_failed(call, now, reason);
            }
            _ => {}
        }
    }

    /// Moves a call in `Start` to its next step.
    fn step(&mut self, call: &mut Call<K>, now: Millis) {
        match &mut call.route {
            Route::Mesh { .. } => match self.cache.get(&call.procedure, now) {
                Some(_) => self.pick_cached(call, now),
                None => {
                    call.out.push_back(Action::Lookup {
                        procedure: call.procedure.clone(),
                    });
                    call.phase = Phase::Looking;
                }
            },
            Route::To(t) => {
                // A named provider still answers to its breaker: while it
                // is open the call fails at once instead of trying a node
                // that failed again and again (half-open: this call is the
                // probe).
                let t = t.clone();
                let usable =
                    self.balancer
                        .pick(&call.procedure, call.strategy, &[(t.clone(), 1)], &[], now);
                if usable.is_none() {
                    self.finish(
                        call,
                        Err(CallFailure::Unreachable {
                            tried: vec![t],
                            reason: "its circuit breaker is open".into(),
                        }),
                    );
                    return;
                }
                let addrs = self.cache.addrs_of(&call.procedure, &t);
                self.connect(call, t, addrs, now);
            }
            Route::Gateway => {
                let wait = call.deadline.saturating_sub(now).min(self.cfg.gateway_wait);
                call.out.push_back(Action::AwaitGateway { wait });
                call.phase = Phase::AwaitingGateway;
            }
            Route::Clients { rotation, next } => match rotation.get(*next).cloned() {
                Some((client, conn)) => {
                    *next += 1;
                    call.attempts += 1;
                    call.attempt = Some(Attempt {
                        provider: client.clone(),
                        started: now,
                        record: false,
                        fallback: false,
                    });
                    call.out.push_back(Action::ConnectClient { client, conn });
                    // Bounded by the deadline only: the client is attached.
                    call.phase = Phase::Connecting {
                        until: call.deadline,
                    };
                }
                None => {
                    let e = call.last.take().unwrap_or(CallFailure::NoProviders);
                    self.finish(call, Err(e));
                }
            },
        }
    }

    /// Chooses a provider of a mesh call among the cached ones (the hot
    /// path: the list is read in place, not copied).
    fn pick_cached(&mut self, call: &mut Call<K>, now: Millis) {
        let providers = self.cache.get(&call.procedure, now).unwrap_or(&[]);
        let choice = choose(
            &self.me,
            &mut self.balancer,
            &self.down,
            providers,
            call,
            now,
        );
        self.apply(call, choice, now);
    }

    /// Chooses a provider of a mesh call among `providers` and reaches it.
    fn pick(&mut self, call: &mut Call<K>, providers: &[ProviderInfo<K>], now: Millis) {
        let choice = choose(
            &self.me,
            &mut self.balancer,
            &self.down,
            providers,
            call,
            now,
        );
        self.apply(call, choice, now);
    }

    fn apply(&mut self, call: &mut Call<K>, choice: Choice<K>, now: Millis) {
        let Route::Mesh { tried } = &mut call.route else {
            return;
        };
        match choice {
            Choice::NoProviders => self.finish(call, Err(CallFailure::NoProviders)),
            Choice::Exhausted => {
                let e = call
                    .last
                    .take()
                    .unwrap_or_else(|| CallFailure::Unreachable {
                        tried: tried.clone(),
                        reason: "every provider's circuit breaker is open".into(),
                    });
                self.finish(call, Err(e));
            }
            Choice::Picked(provider, addrs) => {
                tried.push(provider.clone());
                self.connect(call, provider, addrs, now);
            }
        }
    }

    fn connect(&mut self, call: &mut Call<K>, provider: K, addrs: Vec<String>, now: Millis) {
        call.attempts += 1;
        call.attempt = Some(Attempt {
            provider: provider.clone(),
            started: now,
            record: true,
            fallback: false,
        });
        call.out.push_back(Action::Connect { provider, addrs });
        call.phase = Phase::Connecting {
            until: call
                .deadline
                .min(now.saturating_add(self.cfg.reach_timeout)),
        };
    }

    fn send(&mut self, call: &mut Call<K>, now: Millis) {
        let Some(a) = &call.attempt else {
            return;
        };
        let wire_id = match call.resend.take() {
            // A re-send: the same CALL, still pending.
            Some(w) => w,
            None => {
                let w = self.next_wire;
                self.next_wire = self.next_wire.wrapping_add(1).max(1);
                self.pending.insert(w, (call.id, a.provider.clone()));
                w
            }
        };
        let left = call.deadline.saturating_sub(now).0;
        call.out.push_back(Action::Send {
            provider: a.provider.clone(),
            wire_id,
            timeout_ms: u32::try_from(left).unwrap_or(u32::MAX),
            attempt: call.attempts,
        });
        call.phase = Phase::Waiting {
            wire_id,
            probe: Probe::Idle {
                at: now.saturating_add(self.cfg.probe_after),
            },
        };
    }

    fn probe_failed(&mut self, call: &mut Call<K>, now: Millis, why: String) {
        if let Some(a) = &call.attempt {
            call.out.push_back(Action::Close {
                provider: a.provider.clone(),
                reason: "liveness probe failed".into(),
            });
        }
        self.link_failed(call, now, format!("liveness probe failed: {why}"), true);
    }

    fn link_failed(&mut self, call: &mut Call<K>, now: Millis, reason: String, lost: bool) {
        if let Phase::Waiting { wire_id, .. } = call.phase {
            let replaceable = call.attempt.as_ref().is_some_and(|a| a.fallback);
            let named = matches!(call.route, Route::Mesh { .. } | Route::To(_));
            if lost && replaceable && named && call.resends < self.cfg.max_resends {
                self.resend(call, now, wire_id);
                return;
            }
            self.pending.remove(&wire_id);
        }
        if let Some(w) = call.resend.take() {
            self.pending.remove(&w);
        }
        call.phase = Phase::Start;
        let provider = match &call.attempt {
            Some(a) => a.provider.clone(),
            None => return,
        };
        if call.attempt.as_ref().is_some_and(|a| a.record) {
            // A provider we could not reach, or whose connection died under
            // the call: others go first from now on.
            let seq = self.cached_seq(&call.procedure, &provider, now);
            self.declare_down(&provider, seq, now);
        }
        let e = CallFailure::Unreachable {
            tried: vec![provider],
            reason,
        };
        self.end_attempt(call, now, Err(e), lost);
    }

    /// The current attempt ended with `result`: feed the balancer, then
    /// finish, retry after backoff, or move to the next client.
    fn end_attempt(
        &mut self,
        call: &mut Call<K>,
        now: Millis,
        result: Result<Vec<u8>, CallFailure<K>>,
        lost: bool,
    ) {
        let Some(a) = call.attempt.take() else {
            return;
        };
        if a.record {
            let outcome = match &result {
                // The provider answered: its handler ran.
                Ok(_) | Err(CallFailure::Handler { .. }) | Err(CallFailure::Panicked { .. }) => {
                    Outcome::Success {
                        latency_us: now.saturating_sub(a.started).0.saturating_mul(1000),
                    }
                }
                Err(_) => Outcome::Failure,
            };
            self.balancer.record(&a.provider, outcome, now);
        }
        let e = match result {
            Ok(payload) => {
                let provider = match call.route {
                    Route::Clients { .. } => self.me.clone(),
                    _ => a.provider,
                };
                let attempts = call.attempts;
                self.finish(
                    call,
                    Ok(Answer {
                        payload,
                        provider,
                        attempts,
                    }),
                );
                return;
            }
            Err(e) => e,
        };
        match &mut call.route {
            Route::Mesh { tried } => {
                if matches!(e, CallFailure::Unreachable { .. }) {
                    self.cache.drop_provider(&call.procedure, &a.provider);
                }
                let n = tried.len() as u32;
                if !e.retryable() || n > call.retries {
                    let e = match e {
                        CallFailure::Unreachable { reason, .. } => CallFailure::Unreachable {
                            tried: tried.clone(),
                            reason,
                        },
                        other => other,
                    };
                    self.finish(call, Err(e));
                } else {
                    self.retry(call, now, e, n);
                }
            }
            Route::To(_) => self.finish(call, Err(e)),
            Route::Gateway => {
                // Only the gateway's loss is retried here: anything else
                // it answered is the mesh's final word (it retried there).
                if lost
                    && matches!(e, CallFailure::Unreachable { .. })
                    && call.attempts <= call.retries
                {
                    let n = call.attempts;
                    self.retry(call, now, e, n);
                } else {
                    self.finish(call, Err(e));
                }
            }
            Route::Clients { .. } => {
                if lost {
                    call.last = Some(e);
                    self.step(call, now);
                } else {
                    self.finish(call, Err(e));
                }
            }
        }
    }

    /// The replaceable connection carrying CALL `wire_id` died: reach the
    /// same provider again (the driver's route finds the other path) and
    /// send the same CALL; the provider answers it once.
    fn resend(&mut self, call: &mut Call<K>, now: Millis, wire_id: u64) {
        let Some(a) = &mut call.attempt else {
            return;
        };
        a.fallback = false;
        let provider = a.provider.clone();
        call.resends += 1;
        call.resend = Some(wire_id);
        let addrs = self.cache.addrs_of(&call.procedure, &provider);
        call.out.push_back(Action::Resending {
            provider: provider.clone(),
            wire_id,
        });
        call.out.push_back(Action::Connect { provider, addrs });
        call.phase = Phase::Connecting {
            until: call
                .deadline
                .min(now.saturating_add(self.cfg.reach_timeout)),
        };
    }

    fn retry(&mut self, call: &mut Call<K>, now: Millis, e: CallFailure<K>, retry: u32) {
        let delay = self.cfg.backoff.delay(retry, &mut self.rng);
        call.out.push_back(Action::Retrying { after: e.clone() });
        call.last = Some(e);
        call.phase = Phase::Backoff {
            until: now.saturating_add(delay),
        };
    }

    /// Ends the attempt in progress without an outcome: the breaker learns
    /// nothing, a CALL out is cancelled. Returns that CANCEL (also queued).
    fn abandon(&mut self, call: &mut Call<K>, now: Millis) -> Option<Action<K>> {
        let waiting = match call.phase {
            Phase::Waiting { wire_id, .. } => Some(wire_id),
            // Re-sending: the provider may be working on it.
            Phase::Connecting { .. } => call.resend.take(),
            _ => None,
        };
        let a = call.attempt.take()?;
        if a.record {
            self.balancer.record(&a.provider, Outcome::Abandoned, now);
        }
        let wire_id = waiting?;
        self.pending.remove(&wire_id);
        let cancel = Action::Cancel {
            provider: a.provider,
            wire_id,
        };
        call.out.push_back(cancel.clone());
        Some(cancel)
    }

    fn finish(&mut self, call: &mut Call<K>, result: Result<Answer<K>, CallFailure<K>>) {
        if matches!(call.phase, Phase::Finished) {
            return;
        }
        // Only a CANCEL may precede the end; anything else queued is moot.
        call.out
            .retain(|a| matches!(a, Action::Cancel { .. } | Action::Retrying { .. }));
        call.out.push_back(Action::Done(result));
        call.phase = Phase::Finished;
        self.inflight = self.inflight.saturating_sub(1);
    }
}
