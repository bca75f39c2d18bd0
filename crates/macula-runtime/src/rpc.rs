//! RPC across the mesh: advertising procedures, finding providers, calls
//! with deadlines, cancellation, retries, load balancing and circuit
//! breaking.
//!
//! **Discovery.** `advertise` stores one signed record per provider under
//! `dht_key("rpc:{realm}:{procedure}")` (an [`Advertisement`]: weight,
//! metadata, listen addresses) and lists the procedure in the node's record
//! under `dht_key("rpcidx:{realm}")` (used by `macula services`). Records
//! live [`AD_TTL`] and the DHT republishes them at 75% of it; dropping the
//! [`Registration`] (or graceful shutdown) puts an empty value, which
//! replaces the advertisement on every replica, and stops republishing.
//! Callers cache a procedure's providers for [`PROVIDER_CACHE_TTL`] and drop
//! a provider from the cache when it proves unreachable or not serving.
//!
//! **Calls.** CALL/REPLY/CALL_ERROR/CANCEL frames on the control stream,
//! matched by a caller-chosen id. The remaining time travels with the CALL
//! (relative, so clocks need not agree); the provider abandons the handler
//! past it. Dropping the caller's future sends CANCEL, which aborts the
//! handler's future on the provider. A call to a procedure this node
//! provides itself runs in process, without touching the network.
//!
//! **Reliability.** One deadline covers the whole call. Retryable failures
//! (unreachable, overloaded, not serving, shutting down) are retried on a
//! different provider each time, after exponential backoff with jitter, up
//! to `retries` times. Handler errors, panics and timeouts are not retried:
//! the handler may have run. While waiting for a reply the caller probes a
//! silent provider's connection with a PING after [`PROBE_AFTER`]; no PONG
//! within [`PROBE_TIMEOUT`] means the provider is gone (a killed process
//! sends no CONNECTION_CLOSE) and the call fails over. A breaker per
//! provider ([`macula_rpc::Breaker`]) stops traffic to a provider after
//! consecutive failures. Limits: in-flight calls per node and concurrent
//! requests per handler; past either the answer is `Overloaded`, never an
//! unbounded queue.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{AbortHandle, Abortable, BoxFuture};
use futures::FutureExt;
use macula_rpc::{Backoff, Balancer, BalancerLimits, BreakerConfig, NameError, Outcome, Strategy};
use macula_wire::rpc::{Advertisement, Call, CallError, Cancel, Reply, RpcErrorKind, RpcMessage};
use macula_wire::{Message, NodeId, ServiceIndex};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::{oneshot, Semaphore};

use crate::dht::DhtHandle;
use crate::peer::Peer;
use crate::service::{Answer, PeerDown, Serves, Service};

/// Default deadline of a call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of retries (on other providers) after a retryable failure.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default advertised weight.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Lifetime of advertisement and index records (republished at 75%).
pub const AD_TTL: Duration = Duration::from_secs(120);
/// How long a caller trusts its list of a procedure's providers.
pub const PROVIDER_CACHE_TTL: Duration = Duration::from_secs(5);
/// Procedures whose providers are cached.
pub const PROVIDER_CACHE_CAPACITY: usize = 1024;
/// Providers considered per procedure (the rest of the lookup is ignored).
pub const MAX_PROVIDERS_PER_PROCEDURE: usize = 64;
/// A provider silent this long into a call gets a liveness PING.
pub const PROBE_AFTER: Duration = Duration::from_millis(250);
/// No PONG within this long: the provider is unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between liveness probes during one long call.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Upper bound on reaching (dialing) a provider within a call.
pub const REACH_TIMEOUT: Duration = Duration::from_secs(1);
/// Distinct `procedure` label values of `macula_rpc_duration_seconds`;
/// later procedures share the label `_other`.
pub const MAX_DURATION_LABELS: usize = 64;
/// Bytes reserved for a CALL's non-payload fields within a frame.
pub const CALL_HEADROOM: usize = 64 * 1024;
/// Headers on a call.
pub const MAX_CALL_HEADERS: usize = 32;
/// Procedures one node may advertise (bounded by the index record).
pub const MAX_ADVERTISED: usize = macula_wire::rpc::MAX_INDEX_PROCEDURES;

pub use crate::config::RpcLimits;

/// Why a call or an advertisement failed. Match on it: every kind a caller
/// needs to tell apart is its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    #[error("invalid procedure name {procedure:?}: {source}")]
    InvalidProcedure {
        procedure: String,
        source: NameError,
    },
    #[error("no provider advertises {procedure:?}")]
    NoProviders { procedure: String },
    #[error("{procedure:?} did not answer within {after:?}")]
    Timeout { procedure: String, after: Duration },
    #[error("{procedure:?} failed on {provider}: [{code}] {message}")]
    Handler {
        procedure: String,
        provider: NodeId,
        code: i64,
        message: String,
    },
    #[error("{procedure:?} panicked on {provider}")]
    Panicked { procedure: String, provider: NodeId },
    /// `provider` None: this node's in-flight call limit was hit.
    #[error("{procedure:?} overloaded{}", .provider.map(|p| format!(" on {p}")).unwrap_or_else(|| " (this node's in-flight call limit)".into()))]
    Overloaded {
        procedure: String,
        provider: Option<NodeId>,
    },
    #[error("no provider of {procedure:?} could be reached (tried {}): {reason}", .tried.len())]
    Unreachable {
        procedure: String,
        tried: Vec<NodeId>,
        reason: String,
    },
    #[error("call to {procedure:?} was cancelled")]
    Cancelled { procedure: String },
    #[error("this node is shutting down")]
    ShuttingDown,
    #[error("{procedure:?} is already advertised by this node")]
    AlreadyAdvertised { procedure: String },
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("{n} headers, limit {MAX_CALL_HEADERS}")]
    TooManyHeaders { n: usize },
    #[error("this node already advertises {max} procedures")]
    TooManyAdvertised { max: usize },
    #[error("could not advertise {procedure:?} in the mesh: {reason}")]
    Advertise { procedure: String, reason: String },
}

impl RpcError {
    /// A short stable name for the kind (metric label, CLI output).
    pub fn kind(&self) -> &'static str {
        match self {
            RpcError::InvalidProcedure { .. } => "invalid_procedure",
            RpcError::NoProviders { .. } => "no_providers",
            RpcError::Timeout { .. } => "timeout",
            RpcError::Handler { .. } => "handler_error",
            RpcError::Panicked { .. } => "panicked",
            RpcError::Overloaded { .. } => "overloaded",
            RpcError::Unreachable { .. } => "unreachable",
            RpcError::Cancelled { .. } => "cancelled",
            RpcError::ShuttingDown => "shutting_down",
            RpcError::AlreadyAdvertised { .. } => "already_advertised",
            RpcError::PayloadTooLarge { .. } => "payload_too_large",
            RpcError::TooManyHeaders { .. } => "too_many_headers",
            RpcError::TooManyAdvertised { .. } => "too_many_advertised",
            RpcError::Advertise { .. } => "advertise_failed",
        }
    }

    /// Whether another provider may be tried: the handler did not run.
    fn retryable(&self) -> bool {
        matches!(
            self,
            RpcError::Unreachable { .. } | RpcError::Overloaded { .. }
        )
    }
}

/// What a handler receives.
#[derive(Debug, Clone)]
pub struct Request {
    pub procedure: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    /// The calling node (this node's own ID for a local call).
    pub caller: NodeId,
    /// When the caller stops waiting. The handler's future is dropped at
    /// this point (and when the caller cancels).
    pub deadline: tokio::time::Instant,
}

/// An error a handler returns: an application code and message, passed to
/// the caller as [`RpcError::Handler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    pub code: i64,
    pub message: String,
}

impl HandlerError {
    pub fn new(code: i64, message: impl Into<String>) -> HandlerError {
        HandlerError {
            code,
            message: message.into(),
        }
    }
}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        HandlerError { code: 0, message }
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        HandlerError::from(message.to_string())
    }
}

/// What a handler returns.
pub type HandlerResult = Result<Bytes, HandlerError>;

/// An advertised procedure's implementation. Implemented for every
/// `Fn(Request) -> impl Future<Output = HandlerResult>`.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, req: Request) -> BoxFuture<'static, HandlerResult>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, req: Request) -> BoxFuture<'static, HandlerResult> {
        Box::pin(self(req))
    }
}

/// Options of an advertisement.
#[derive(Debug, Clone, Default)]
pub struct AdvertiseOptions {
    /// Relative share for the weighted strategy (default 100).
    pub weight: Option<u32>,
    /// Free-form key/value pairs published with the advertisement.
    pub metadata: Vec<(String, String)>,
    /// Concurrent requests this handler serves (default from [`RpcLimits`]).
    pub max_concurrent: Option<usize>,
}

/// A successful call's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub payload: Bytes,
    /// The node whose handler answered.
    pub provider: NodeId,
    /// Providers tried (1 when the first one answered).
    pub attempts: u32,
}

/// One provider as found in the DHT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderInfo {
    pub node: NodeId,
    pub weight: u32,
    pub metadata: Vec<(String, String)>,
    pub addrs: Vec<String>,
}

/// Counters, read by the metrics collector.
#[derive(Debug, Default)]
pub struct RpcCounters {
    pub calls_total: AtomicU64,
    pub calls_ok_total: AtomicU64,
    pub calls_failed_total: AtomicU64,
    pub calls_local_total: AtomicU64,
    pub retries_total: AtomicU64,
    pub inflight_calls: AtomicU64,
    pub caller_overloaded_total: AtomicU64,
    pub served_total: AtomicU64,
    pub served_failed_total: AtomicU64,
    pub handler_overloaded_total: AtomicU64,
    pub handler_panics_total: AtomicU64,
    pub handler_timeouts_total: AtomicU64,
    pub cancelled_by_caller_total: AtomicU64,
    pub not_found_total: AtomicU64,
    pub serving: AtomicU64,
    pub advertised: AtomicU64,
    pub probes_failed_total: AtomicU64,
    pub late_replies_total: AtomicU64,
}

impl RpcCounters {
    fn rows(&self) -> [(&'static str, &'static str, u64); 18] {
        let g = |a: &AtomicU64| a.load(Relaxed);
        [
            (
                "macula_rpc_calls_total",
                "Calls made by this node.",
                g(&self.calls_total),
            ),
            (
                "macula_rpc_calls_ok_total",
                "Calls that got a reply.",
                g(&self.calls_ok_total),
            ),
            (
                "macula_rpc_calls_failed_total",
                "Calls that ended in an error.",
                g(&self.calls_failed_total),
            ),
            (
                "macula_rpc_calls_local_total",
                "Calls served in process by this node's own handler.",
                g(&self.calls_local_total),
            ),
            (
                "macula_rpc_retries_total",
                "Retries on another provider after a retryable failure.",
                g(&self.retries_total),
            ),
            (
                "macula_rpc_inflight_calls",
                "Calls outstanding now.",
                g(&self.inflight_calls),
            ),
            (
                "macula_rpc_caller_overloaded_total",
                "Calls refused because this node's in-flight limit was reached.",
                g(&self.caller_overloaded_total),
            ),
            (
                "macula_rpc_served_total",
                "Requests this node's handlers answered.",
                g(&self.served_total),
            ),
            (
                "macula_rpc_served_failed_total",
                "Requests answered with an error (handler error, panic, timeout).",
                g(&self.served_failed_total),
            ),
            (
                "macula_rpc_handler_overloaded_total",
                "Requests refused because the handler was at its concurrency limit.",
                g(&self.handler_overloaded_total),
            ),
            (
                "macula_rpc_handler_panics_total",
                "Handler panics (the node keeps serving).",
                g(&self.handler_panics_total),
            ),
            (
                "macula_rpc_handler_timeouts_total",
                "Requests abandoned at their deadline.",
                g(&self.handler_timeouts_total),
            ),
            (
                "macula_rpc_cancelled_by_caller_total",
                "Requests whose caller cancelled them.",
                g(&self.cancelled_by_caller_total),
            ),
            (
                "macula_rpc_not_found_total",
                "Requests for procedures this node does not serve.",
                g(&self.not_found_total),
            ),
            (
                "macula_rpc_serving",
                "Requests being handled now.",
                g(&self.serving),
            ),
            (
                "macula_rpc_advertised",
                "Procedures this node advertises.",
                g(&self.advertised),
            ),
            (
                "macula_rpc_probes_failed_total",
                "Providers found dead by a liveness probe during a call.",
                g(&self.probes_failed_total),
            ),
            (
                "macula_rpc_late_replies_total",
                "Replies that arrived after their call ended (ignored).",
                g(&self.late_replies_total),
            ),
        ]
    }
}

type DurationFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 20 µs .. ~10 s.
    Histogram::new(exponential_buckets(0.000_02, 2.0, 20))
}

/// Exposes a node's RPC counters and call-duration histogram.
#[derive(Debug, Clone)]
pub struct RpcCollector {
    counters: Arc<RpcCounters>,
}

impl prometheus_client::collector::Collector for RpcCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        crate::metrics::encode_rows(&mut encoder, &self.counters.rows())
    }
}

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

/// How long a client's call waits for a gateway connection (failover).
pub const GATEWAY_WAIT: Duration = Duration::from_secs(5);

/// The attached clients serving one procedure through this gateway, in
/// round-robin order.
#[derive(Default)]
pub(crate) struct ClientProviders {
    peers: Mutex<Vec<Peer>>,
    next: AtomicU64,
}

impl ClientProviders {
    /// The clients to try, starting at the next in turn.
    fn rotation(&self) -> Vec<Peer> {
        let peers = lock(&self.peers);
        if peers.is_empty() {
            return Vec::new();
        }
        let start = (self.next.fetch_add(1, Relaxed) as usize) % peers.len();
        peers[start..]
            .iter()
            .chain(&peers[..start])
            .cloned()
            .collect()
    }
}

/// A gateway's advertisement for its clients.
struct ClientAd {
    providers: Arc<ClientProviders>,
    _registration: Registration,
}

pub(crate) struct RpcLink {
    pub dht: DhtHandle,
    pub realm: String,
    pub reach: Box<dyn Reach>,
    /// Addresses published in advertisements: the listen address at first,
    /// then what reachability checks find (see `Rpc::set_addrs`).
    pub addrs: Mutex<Vec<String>>,
}

struct LocalProvider {
    handler: Arc<dyn Handler>,
    /// Served by attached clients: calls are forwarded to them.
    clients: Option<Arc<ClientProviders>>,
    weight: u32,
    metadata: Vec<(String, String)>,
    permits: Arc<Semaphore>,
    token: u64,
}

struct Pending {
    provider: NodeId,
    tx: oneshot::Sender<Result<Reply, CallError>>,
}

struct CacheEntry {
    fetched: Instant,
    providers: Vec<ProviderInfo>,
}

struct Inner {
    node_id: NodeId,
    limits: RpcLimits,
    max_payload: usize,
    epoch: Instant,
    link: Option<RpcLink>,
    upstream: Option<Arc<dyn Upstream>>,
    local: Mutex<HashMap<String, Arc<LocalProvider>>>,
    /// Procedures this node advertises for attached clients.
    client_ads: tokio::sync::Mutex<HashMap<String, ClientAd>>,
    next_token: AtomicU64,
    next_call_id: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    inflight: Arc<Semaphore>,
    balancer: Mutex<Balancer<NodeId>>,
    backoff_rng: Mutex<macula_rpc::Rng>,
    cache: Mutex<HashMap<String, CacheEntry>>,
    /// Requests being served: (connection, call id) → abort handle.
    serving: Mutex<HashMap<(usize, u64), AbortHandle>>,
    shutting_down: AtomicBool,
    /// Serialises DHT updates of advertisements and the index.
    ad_lock: tokio::sync::Mutex<()>,
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

impl Rpc {
    /// RPC for node `node_id`; without a link it serves and calls only
    /// in process.
    pub fn new(node_id: NodeId, max_frame_size: u32, limits: RpcLimits) -> Rpc {
        Self::with_link(node_id, max_frame_size, limits, None)
    }

    pub(crate) fn with_link(
        node_id: NodeId,
        max_frame_size: u32,
        limits: RpcLimits,
        link: Option<RpcLink>,
    ) -> Rpc {
        Self::build(node_id, max_frame_size, limits, link, None)
    }

    /// A client's RPC: calls and advertisements go through the gateway.
    pub(crate) fn with_upstream(
        node_id: NodeId,
        max_frame_size: u32,
        limits: RpcLimits,
        upstream: Arc<dyn Upstream>,
    ) -> Rpc {
        Self::build(node_id, max_frame_size, limits, None, Some(upstream))
    }

    fn build(
        node_id: NodeId,
        max_frame_size: u32,
        limits: RpcLimits,
        link: Option<RpcLink>,
        upstream: Option<Arc<dyn Upstream>>,
    ) -> Rpc {
        Rpc(Arc::new(Inner {
            upstream,
            client_ads: tokio::sync::Mutex::new(HashMap::new()),
            node_id,
            limits,
            max_payload: (max_frame_size as usize).saturating_sub(CALL_HEADROOM),
            epoch: Instant::now(),
            link,
            local: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            next_call_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            inflight: Arc::new(Semaphore::new(limits.max_inflight_calls)),
            balancer: Mutex::new(Balancer::new(
                BreakerConfig::default(),
                BalancerLimits::default(),
                seed(),
            )),
            backoff_rng: Mutex::new(macula_rpc::Rng::new(seed())),
            cache: Mutex::new(HashMap::new()),
            serving: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            ad_lock: tokio::sync::Mutex::new(()),
            counters: Arc::new(RpcCounters::default()),
            durations: Family::new_with_constructor(duration_histogram),
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

    fn now_ms(&self) -> macula_rpc::Millis {
        self.0.epoch.elapsed().as_millis() as u64
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
        self.advertise_inner(procedure, opts, Arc::new(handler), None)
            .await
    }

    async fn advertise_inner(
        &self,
        procedure: &str,
        opts: AdvertiseOptions,
        handler: Arc<dyn Handler>,
        clients: Option<Arc<ClientProviders>>,
    ) -> Result<Registration, RpcError> {
        macula_rpc::validate_procedure(procedure).map_err(|source| RpcError::InvalidProcedure {
            procedure: procedure.to_string(),
            source,
        })?;
        if self.0.shutting_down.load(Relaxed) {
            return Err(RpcError::ShuttingDown);
        }
        let token = self.0.next_token.fetch_add(1, Relaxed);
        let provider = Arc::new(LocalProvider {
            handler,
            clients,
            weight: opts.weight.unwrap_or(DEFAULT_WEIGHT),
            metadata: opts.metadata,
            permits: Arc::new(Semaphore::new(
                opts.max_concurrent
                    .unwrap_or(self.0.limits.handler_concurrency)
                    .max(1),
            )),
            token,
        });
        {
            let mut local = lock(&self.0.local);
            if local.contains_key(procedure) {
                return Err(RpcError::AlreadyAdvertised {
                    procedure: procedure.to_string(),
                });
            }
            if local.len() >= MAX_ADVERTISED {
                return Err(RpcError::TooManyAdvertised {
                    max: MAX_ADVERTISED,
                });
            }
            local.insert(procedure.to_string(), provider.clone());
            self.0
                .counters
                .advertised
                .store(local.len() as u64, Relaxed);
        }
        if let Err(reason) = self.publish_ad(procedure, Some(&provider)).await {
            self.remove_local(procedure, token);
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

    fn remove_local(&self, procedure: &str, token: u64) -> bool {
        let mut local = lock(&self.0.local);
        let removed = match local.get(procedure) {
            Some(p) if p.token == token => local.remove(procedure).is_some(),
            _ => false,
        };
        self.0
            .counters
            .advertised
            .store(local.len() as u64, Relaxed);
        removed
    }

    /// Puts the advertisement of `procedure` (or its withdrawal, with
    /// `None`) and this node's index record.
    async fn publish_ad(
        &self,
        procedure: &str,
        provider: Option<&LocalProvider>,
    ) -> Result<(), String> {
        if let Some(up) = &self.0.upstream {
            let ad = provider.map(|p| (p.weight, p.metadata.clone()));
            return up.advertise(procedure.to_string(), ad).await;
        }
        let Some(link) = &self.0.link else {
            return Ok(());
        };
        let _serial = self.0.ad_lock.lock().await;
        let key = macula_wire::dht_key(macula_rpc::ad_name(&link.realm, procedure).as_bytes());
        match provider {
            Some(p) => {
                let ad = Advertisement {
                    procedure: procedure.to_string(),
                    weight: p.weight,
                    metadata: p.metadata.clone(),
                    addrs: lock(&link.addrs).clone(),
                };
                let value = ad.encode().map_err(|e| e.to_string())?;
                link.dht
                    .put(key, value, AD_TTL)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            None => {
                link.dht
                    .put(key, Vec::new(), AD_TTL)
                    .await
                    .map_err(|e| e.to_string())?;
                link.dht.unpublish(key).await.map_err(|e| e.to_string())?;
            }
        }
        let mut procedures: Vec<String> = lock(&self.0.local).keys().cloned().collect();
        procedures.sort();
        let index_key = macula_wire::dht_key(macula_rpc::index_name(&link.realm).as_bytes());
        let empty = procedures.is_empty();
        let value = ServiceIndex { procedures }
            .encode()
            .map_err(|e| e.to_string())?;
        link.dht
            .put(index_key, value, AD_TTL)
            .await
            .map_err(|e| e.to_string())?;
        if empty {
            link.dht
                .unpublish(index_key)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Sets the addresses advertisements carry (a reachability check found
    /// them: the public addresses, or none for a node behind NAT) and, if
    /// they changed, republishes every advertisement.
    pub(crate) async fn set_addrs(&self, addrs: Vec<String>) {
        let Some(link) = &self.0.link else {
            return;
        };
        {
            let mut cur = lock(&link.addrs);
            if *cur == addrs {
                return;
            }
            *cur = addrs;
        }
        let local: Vec<(String, Arc<LocalProvider>)> = lock(&self.0.local)
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        for (procedure, p) in local {
            if let Err(e) = self.publish_ad(&procedure, Some(&p)).await {
                tracing::debug!(procedure, error = %e, "could not republish advertisement");
            }
        }
    }

    /// Procedures this node advertises, with weight and handler limit.
    pub fn advertised(&self) -> Vec<(String, u32, usize)> {
        let local = lock(&self.0.local);
        let mut v: Vec<_> = local
            .iter()
            .map(|(k, p)| (k.clone(), p.weight, p.permits.available_permits()))
            .collect();
        v.sort();
        v
    }

    /// Every procedure advertised in the mesh with its providers, read from
    /// the DHT's service index (fresh, not cached).
    pub async fn services(&self) -> Result<Vec<(String, Vec<ProviderInfo>)>, RpcError> {
        let Some(link) = &self.0.link else {
            let local = self.advertised();
            return Ok(local
                .into_iter()
                .map(|(p, weight, _)| {
                    let info = ProviderInfo {
                        node: self.0.node_id,
                        weight,
                        metadata: Vec::new(),
                        addrs: Vec::new(),
                    };
                    (p, vec![info])
                })
                .collect());
        };
        let index_key = macula_wire::dht_key(macula_rpc::index_name(&link.realm).as_bytes());
        let records = link
            .dht
            .get_fresh(index_key)
            .await
            .map_err(|e| RpcError::Unreachable {
                procedure: "*".into(),
                tried: Vec::new(),
                reason: format!("service index lookup failed: {e}"),
            })?;
        let mut names: Vec<String> = records
            .iter()
            .filter_map(|r| ServiceIndex::decode(&r.value).ok())
            .flat_map(|ix| ix.procedures)
            .collect();
        names.sort();
        names.dedup();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let providers = self.lookup(&name).await?;
            if !providers.is_empty() {
                out.push((name, providers));
            }
        }
        Ok(out)
    }

    /// Providers of `procedure` from the DHT (fresh) and caches them.
    async fn lookup(&self, procedure: &str) -> Result<Vec<ProviderInfo>, RpcError> {
        let Some(link) = &self.0.link else {
            return Ok(Vec::new());
        };
        let key = macula_wire::dht_key(macula_rpc::ad_name(&link.realm, procedure).as_bytes());
        let records = link
            .dht
            .get_fresh(key)
            .await
            .map_err(|e| RpcError::Unreachable {
                procedure: procedure.to_string(),
                tried: Vec::new(),
                reason: format!("provider lookup failed: {e}"),
            })?;
        let mut providers: Vec<ProviderInfo> = records
            .into_iter()
            .filter(|r| !r.value.is_empty())
            .filter_map(|r| {
                let ad = Advertisement::decode(&r.value).ok()?;
                (ad.procedure == procedure).then_some(ProviderInfo {
                    node: r.publisher,
                    weight: ad.weight,
                    metadata: ad.metadata,
                    addrs: ad.addrs,
                })
            })
            .collect();
        providers.truncate(MAX_PROVIDERS_PER_PROCEDURE);
        if !providers.is_empty() {
            let mut cache = lock(&self.0.cache);
            if cache.len() >= PROVIDER_CACHE_CAPACITY && !cache.contains_key(procedure) {
                cache.retain(|_, e| e.fetched.elapsed() < PROVIDER_CACHE_TTL);
                if cache.len() >= PROVIDER_CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(
                procedure.to_string(),
                CacheEntry {
                    fetched: Instant::now(),
                    providers: providers.clone(),
                },
            );
        }
        Ok(providers)
    }

    /// Cached providers of `procedure`, else a lookup.
    async fn providers(&self, procedure: &str) -> Result<Vec<ProviderInfo>, RpcError> {
        {
            let cache = lock(&self.0.cache);
            if let Some(e) = cache.get(procedure) {
                if e.fetched.elapsed() < PROVIDER_CACHE_TTL {
                    return Ok(e.providers.clone());
                }
            }
        }
        self.lookup(procedure).await
    }

    /// Forgets `provider` for `procedure` until the next lookup.
    fn drop_provider(&self, procedure: &str, provider: NodeId) {
        let mut cache = lock(&self.0.cache);
        if let Some(e) = cache.get_mut(procedure) {
            e.providers.retain(|p| p.node != provider);
            if e.providers.is_empty() {
                cache.remove(procedure);
            }
        }
    }

    fn addrs_of(&self, procedure: &str, provider: NodeId) -> Vec<String> {
        lock(&self.0.cache)
            .get(procedure)
            .and_then(|e| e.providers.iter().find(|p| p.node == provider))
            .map(|p| p.addrs.clone())
            .unwrap_or_default()
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

    async fn run_call(self, b: CallBuilder) -> Result<Response, RpcError> {
        self.check_call(&b)?;
        let c = &self.0.counters;
        let Ok(_permit) = self.0.inflight.clone().try_acquire_owned() else {
            c.caller_overloaded_total.fetch_add(1, Relaxed);
            return Err(RpcError::Overloaded {
                procedure: b.procedure,
                provider: None,
            });
        };
        c.calls_total.fetch_add(1, Relaxed);
        c.inflight_calls.fetch_add(1, Relaxed);
        let started = Instant::now();
        let _gauge = GaugeGuard(&c.inflight_calls);
        let deadline = tokio::time::Instant::now() + b.opts.timeout;
        let res = match tokio::time::timeout_at(deadline, self.attempts(&b, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout {
                procedure: b.procedure.clone(),
                after: b.opts.timeout,
            }),
        };
        match &res {
            Ok(_) => c.calls_ok_total.fetch_add(1, Relaxed),
            Err(_) => c.calls_failed_total.fetch_add(1, Relaxed),
        };
        self.observe_duration(&b.procedure, started.elapsed());
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

    /// Local handler if any, else providers in turn until one answers,
    /// a non-retryable error, or the retries are spent.
    async fn attempts(
        &self,
        b: &CallBuilder,
        deadline: tokio::time::Instant,
    ) -> Result<Response, RpcError> {
        let local = lock(&self.0.local).get(&b.procedure).cloned();
        if let Some(p) = local.filter(|_| b.target.is_none_or(|t| t == self.0.node_id)) {
            self.0.counters.calls_local_total.fetch_add(1, Relaxed);
            return self.call_local(b, &p, deadline).await;
        }
        if let Some(up) = &self.0.upstream {
            return self.attempts_upstream(up.as_ref(), b, deadline).await;
        }
        if let Some(t) = b.target {
            if t == self.0.node_id {
                return Err(RpcError::NoProviders {
                    procedure: b.procedure.clone(),
                });
            }
            let addrs = self.addrs_of(&b.procedure, t);
            return self
                .attempt(b, t, addrs, deadline)
                .await
                .map(|payload| Response {
                    payload,
                    provider: t,
                    attempts: 1,
                });
        }
        let mut tried: Vec<NodeId> = Vec::new();
        let mut last: Option<RpcError> = None;
        loop {
            let providers = self.providers(&b.procedure).await?;
            let candidates: Vec<(NodeId, u32)> = providers
                .iter()
                .filter(|p| p.node != self.0.node_id)
                .map(|p| (p.node, p.weight))
                .collect();
            if candidates.is_empty() && tried.is_empty() {
                return Err(RpcError::NoProviders {
                    procedure: b.procedure.clone(),
                });
            }
            let pick = lock(&self.0.balancer).pick(
                &b.procedure,
                b.opts.strategy,
                &candidates,
                &tried,
                self.now_ms(),
            );
            let Some(provider) = pick else {
                return Err(last.unwrap_or_else(|| RpcError::Unreachable {
                    procedure: b.procedure.clone(),
                    tried: tried.clone(),
                    reason: "every provider's circuit breaker is open".into(),
                }));
            };
            let addrs = providers
                .iter()
                .find(|p| p.node == provider)
                .map(|p| p.addrs.clone())
                .unwrap_or_default();
            tried.push(provider);
            let e = match self.attempt(b, provider, addrs, deadline).await {
                Ok(payload) => {
                    return Ok(Response {
                        payload,
                        provider,
                        attempts: tried.len() as u32,
                    })
                }
                Err(e) => e,
            };
            if matches!(e, RpcError::Unreachable { .. }) {
                self.drop_provider(&b.procedure, provider);
            }
            if !e.retryable() || (tried.len() as u32) > b.opts.retries {
                return Err(match e {
                    RpcError::Unreachable { reason, .. } => RpcError::Unreachable {
                        procedure: b.procedure.clone(),
                        tried,
                        reason,
                    },
                    other => other,
                });
            }
            tracing::debug!(procedure = %b.procedure, provider = %provider, error = %e, "retrying on another provider");
            self.0.counters.retries_total.fetch_add(1, Relaxed);
            let delay =
                Backoff::default().delay(tried.len() as u32, &mut lock(&self.0.backoff_rng));
            tokio::time::sleep(Duration::from_millis(delay)).await;
            last = Some(e);
        }
    }

    /// A client's call: through the gateway, which finds the provider and
    /// retries there. Only the gateway's loss is retried here, on the next
    /// gateway once the client has failed over.
    async fn attempts_upstream(
        &self,
        up: &dyn Upstream,
        b: &CallBuilder,
        deadline: tokio::time::Instant,
    ) -> Result<Response, RpcError> {
        let mut attempts = 0u32;
        loop {
            let wait = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(GATEWAY_WAIT);
            let Some(gateway) = up.gateway(wait).await else {
                return Err(RpcError::Unreachable {
                    procedure: b.procedure.clone(),
                    tried: Vec::new(),
                    reason: "not attached to a gateway (client mode)".into(),
                });
            };
            attempts += 1;
            match self.call_on(&gateway, b, deadline).await {
                Ok(payload) => {
                    return Ok(Response {
                        payload,
                        provider: gateway.node_id(),
                        attempts,
                    })
                }
                // The gateway itself went away: the call may be retried
                // through the next one.
                Err(e @ RpcError::Unreachable { .. })
                    if gateway.is_closed() && attempts <= b.opts.retries =>
                {
                    tracing::debug!(procedure = %b.procedure, gateway = %gateway.node_id(), error = %e, "gateway lost during a call; retrying through the next");
                    self.0.counters.retries_total.fetch_add(1, Relaxed);
                    let delay = Backoff::default().delay(attempts, &mut lock(&self.0.backoff_rng));
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs this node's own handler in process.
    async fn call_local(
        &self,
        b: &CallBuilder,
        p: &LocalProvider,
        deadline: tokio::time::Instant,
    ) -> Result<Response, RpcError> {
        let Ok(_permit) = p.permits.clone().try_acquire_owned() else {
            self.0
                .counters
                .handler_overloaded_total
                .fetch_add(1, Relaxed);
            return Err(RpcError::Overloaded {
                procedure: b.procedure.clone(),
                provider: Some(self.0.node_id),
            });
        };
        let req = Request {
            procedure: b.procedure.clone(),
            payload: b.payload.clone(),
            headers: b.opts.headers.clone(),
            caller: self.0.node_id,
            deadline,
        };
        let outcome = run_handler(&self.0.counters, p.handler.as_ref(), req).await;
        let me = self.0.node_id;
        match outcome {
            Ok(payload) => Ok(Response {
                payload,
                provider: me,
                attempts: 1,
            }),
            Err(e) => Err(local_error(&b.procedure, me, e, b.opts.timeout)),
        }
    }

    /// One attempt on `provider`; the breaker and latency estimate learn
    /// the outcome (also when the caller gives up mid-way).
    async fn attempt(
        &self,
        b: &CallBuilder,
        provider: NodeId,
        addrs: Vec<String>,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, RpcError> {
        let mut record = RecordGuard {
            rpc: self,
            provider,
            outcome: Outcome::Abandoned,
        };
        let started = Instant::now();
        let res = self.attempt_inner(b, provider, addrs, deadline).await;
        record.outcome = match &res {
            Ok(_) | Err(RpcError::Handler { .. }) | Err(RpcError::Panicked { .. }) => {
                Outcome::Success {
                    latency_us: started.elapsed().as_micros() as u64,
                }
            }
            Err(_) => Outcome::Failure,
        };
        res
    }

    async fn attempt_inner(
        &self,
        b: &CallBuilder,
        provider: NodeId,
        addrs: Vec<String>,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, RpcError> {
        let unreachable = |reason: String| b.unreachable(provider, reason);
        let Some(link) = &self.0.link else {
            return Err(unreachable("this node is not in a mesh".into()));
        };
        let reach_by = deadline.min(tokio::time::Instant::now() + REACH_TIMEOUT);
        let peer = match tokio::time::timeout_at(reach_by, link.reach.reach(provider, addrs)).await
        {
            Ok(Some(p)) => p,
            Ok(None) => return Err(unreachable("could not connect".into())),
            Err(_) => return Err(unreachable(format!("not reached within {REACH_TIMEOUT:?}"))),
        };
        self.call_on(&peer, b, deadline).await
    }

    /// Sends CALL on `peer` and waits for its answer, probing the peer's
    /// liveness while it is silent.
    async fn call_on(
        &self,
        peer: &Peer,
        b: &CallBuilder,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, RpcError> {
        let provider = peer.node_id();
        let unreachable = |reason: String| b.unreachable(provider, reason);
        let id = self.0.next_call_id.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.0.pending).insert(id, Pending { provider, tx });
        let mut guard = PendingGuard {
            rpc: self,
            peer: peer.clone(),
            id,
            answered: false,
        };
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let call = Message::Rpc(RpcMessage::Call(Call {
            id,
            procedure: b.procedure.clone(),
            payload: b.payload.to_vec(),
            timeout_ms: u32::try_from(remaining.as_millis()).unwrap_or(u32::MAX),
            headers: b.opts.headers.clone(),
        }));
        peer.touch();
        if let Err(e) = peer.send(&call).await {
            guard.answered = true;
            return Err(unreachable(format!("could not send the call: {e}")));
        }
        let probe = async {
            tokio::time::sleep(PROBE_AFTER).await;
            loop {
                if let Err(e) = peer.ping(PROBE_TIMEOUT).await {
                    return e.to_string();
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        };
        let answer = tokio::select! {
            a = rx => a,
            why = probe => {
                self.0.counters.probes_failed_total.fetch_add(1, Relaxed);
                tracing::warn!(peer = %provider, procedure = %b.procedure, reason = %why, "provider failed a liveness probe during a call; closing its connection");
                peer.connection().close(
                    crate::peer::close_code(macula_wire::DisconnectReason::ProtocolError),
                    b"liveness probe failed",
                );
                guard.answered = true;
                return Err(unreachable(format!("liveness probe failed: {why}")));
            }
            e = peer.connection().closed() => {
                guard.answered = true;
                return Err(unreachable(format!("connection closed: {}", crate::peer::describe_close(&e))));
            }
        };
        guard.answered = true;
        peer.touch();
        match answer {
            Ok(Ok(reply)) => Ok(Bytes::from(reply.payload)),
            Ok(Err(err)) => Err(remote_error(&b.procedure, provider, err, b.opts.timeout)),
            Err(_) => Err(unreachable("the call was dropped".into())),
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
        let b = CallBuilder {
            target: Some(peer.node_id()),
            ..self.call(procedure, payload).timeout(timeout)
        };
        self.check_call(&b)?;
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.call_on(peer, &b, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout {
                procedure: b.procedure,
                after: timeout,
            }),
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
            RpcMessage::Reply(r) => self.complete(peer, r.id, Ok(r)),
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

    fn complete(&self, peer: &Peer, id: u64, answer: Result<Reply, CallError>) {
        let mut pending = lock(&self.0.pending);
        // Only the provider the call went to may answer it.
        match pending.get(&id) {
            Some(p) if p.provider == peer.node_id() => {
                if let Some(p) = pending.remove(&id) {
                    let _ = p.tx.send(answer);
                }
            }
            _ => {
                self.0.counters.late_replies_total.fetch_add(1, Relaxed);
            }
        }
    }

    /// Starts serving `call` in its own task, or returns the refusal.
    fn serve(&self, peer: &Peer, call: Call) -> Option<Message> {
        let c = &self.0.counters;
        let refuse = |kind: RpcErrorKind, message: String| {
            Some(Message::Rpc(RpcMessage::Error(CallError {
                id: call.id,
                kind,
                code: 0,
                message,
            })))
        };
        if self.0.shutting_down.load(Relaxed) {
            return refuse(RpcErrorKind::ShuttingDown, "node is shutting down".into());
        }
        if let Err(e) = macula_rpc::validate_procedure(&call.procedure) {
            return refuse(RpcErrorKind::Invalid, e.to_string());
        }
        let local = lock(&self.0.local).get(&call.procedure).cloned();
        if let Some(clients) = local.as_ref().and_then(|p| p.clients.clone()) {
            return self.serve_forwarded(peer, call, Forward::ToClients(clients));
        }
        if local.is_none() && peer.is_client() && self.0.link.is_some() {
            // An attached client's call: this node finds the provider.
            return self.serve_forwarded(peer, call, Forward::Mesh);
        }
        let Some(p) = local else {
            c.not_found_total.fetch_add(1, Relaxed);
            return refuse(
                RpcErrorKind::NotFound,
                format!("{} is not served by this node", call.procedure),
            );
        };
        let Ok(permit) = p.permits.clone().try_acquire_owned() else {
            c.handler_overloaded_total.fetch_add(1, Relaxed);
            return refuse(
                RpcErrorKind::Overloaded,
                format!("{} is at its concurrency limit", call.procedure),
            );
        };
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(u64::from(call.timeout_ms));
        let req = Request {
            procedure: call.procedure,
            payload: Bytes::from(call.payload),
            headers: call.headers,
            caller: peer.node_id(),
            deadline,
        };
        let (id, counters) = (call.id, self.0.counters.clone());
        self.spawn_serving(peer, id, async move {
            let _permit = permit;
            run_handler(&counters, p.handler.as_ref(), req)
                .await
                .map_err(|f| {
                    let (kind, code, message) = match f {
                        HandlerFailure::Error(e) => (RpcErrorKind::Handler, e.code, e.message),
                        HandlerFailure::Panicked => {
                            (RpcErrorKind::Panicked, 0, "handler panicked".to_string())
                        }
                        HandlerFailure::Timeout => {
                            (RpcErrorKind::Timeout, 0, "deadline passed".to_string())
                        }
                    };
                    CallError {
                        id,
                        kind,
                        code,
                        message: truncate(&message, macula_wire::rpc::MAX_WIRE_RPC_ERROR_LEN),
                    }
                })
        });
        None
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
        self.0.counters.serving.fetch_add(1, Relaxed);
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
                let fallback = Message::Rpc(RpcMessage::Error(CallError {
                    id,
                    kind: RpcErrorKind::Invalid,
                    code: 0,
                    message: truncate(
                        &format!("answer could not be sent: {e}"),
                        macula_wire::rpc::MAX_WIRE_RPC_ERROR_LEN,
                    ),
                }));
                let _ = peer.send(&fallback).await;
            }
        };
        let counters = self.0.counters.clone();
        tokio::spawn(async move {
            let _gauge = GaugeGuard(&counters.serving);
            let _ = Abortable::new(task, reg).await;
        });
    }

    /// Serves `call` by calling onward (a gateway for its clients), in its
    /// own task like a handler; the answer keeps the onward error's kind.
    fn serve_forwarded(&self, peer: &Peer, call: Call, to: Forward) -> Option<Message> {
        let (rpc, id) = (self.clone(), call.id);
        let timeout = Duration::from_millis(u64::from(call.timeout_ms));
        self.spawn_serving(peer, id, async move {
            let res = match to {
                Forward::Mesh => {
                    let mut b = rpc.call(&call.procedure, call.payload).timeout(timeout);
                    b.opts.headers = call.headers;
                    b.await.map(|r| r.payload)
                }
                Forward::ToClients(clients) => {
                    rpc.call_clients(&clients, &call.procedure, call.payload.into(), timeout)
                        .await
                }
            };
            res.map_err(|e| forwarded_error(id, &e))
        });
        None
    }

    /// Calls `procedure` on the attached clients that serve it, in turn,
    /// moving on while a client proves unreachable.
    async fn call_clients(
        &self,
        clients: &ClientProviders,
        procedure: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        for client in clients.rotation() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self
                .call_via(&client, procedure, payload.clone(), left)
                .await
            {
                Err(e @ RpcError::Unreachable { .. }) if client.is_closed() => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| RpcError::NoProviders {
            procedure: procedure.to_string(),
        }))
    }

    /// A gateway advertises `procedure` for attached client `client` (the
    /// first client creates the advertisement, later ones join it).
    pub(crate) async fn advertise_for_client(
        &self,
        client: &Peer,
        procedure: &str,
        weight: u32,
        metadata: Vec<(String, String)>,
    ) -> Result<(), RpcError> {
        let mut ads = self.0.client_ads.lock().await;
        if let Some(ad) = ads.get(procedure) {
            let mut peers = lock(&ad.providers.peers);
            // A client that reconnected replaces its old connection.
            peers.retain(|p| p.node_id() != client.node_id());
            peers.push(client.clone());
            return Ok(());
        }
        let providers = Arc::new(ClientProviders::default());
        lock(&providers.peers).push(client.clone());
        let weak = Arc::downgrade(&self.0);
        let set = providers.clone();
        let handler = move |req: Request| {
            let (weak, set) = (weak.clone(), set.clone());
            async move {
                let Some(inner) = weak.upgrade() else {
                    return Err(HandlerError::new(0, "node is shutting down"));
                };
                let left = req
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                Rpc(inner)
                    .call_clients(&set, &req.procedure, req.payload, left)
                    .await
                    .map_err(|e| HandlerError::new(0, e.to_string()))
            }
        };
        let opts = AdvertiseOptions {
            weight: Some(weight.max(1)),
            metadata,
            max_concurrent: None,
        };
        let registration = self
            .advertise_inner(procedure, opts, Arc::new(handler), Some(providers.clone()))
            .await?;
        ads.insert(
            procedure.to_string(),
            ClientAd {
                providers,
                _registration: registration,
            },
        );
        Ok(())
    }

    /// Client `client` no longer serves `procedure` (or, with `None`,
    /// anything: it left). An advertisement with no client left is
    /// withdrawn.
    pub(crate) async fn withdraw_for_client(&self, client: &Peer, procedure: Option<&str>) {
        let mut ads = self.0.client_ads.lock().await;
        ads.retain(|name, ad| {
            if procedure.is_some_and(|p| p != name) {
                return true;
            }
            let mut peers = lock(&ad.providers.peers);
            peers.retain(|p| p.connection_id() != client.connection_id());
            !peers.is_empty()
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
        if self.0.shutting_down.swap(true, Relaxed) {
            return;
        }
        let procedures: Vec<(String, u64)> = lock(&self.0.local)
            .iter()
            .map(|(k, p)| (k.clone(), p.token))
            .collect();
        let withdraw = async {
            for (procedure, token) in procedures {
                self.remove_local(&procedure, token);
                if let Err(e) = self.publish_ad(&procedure, None).await {
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
        let now = self.now_ms();
        lock(&self.0.balancer)
            .providers(now)
            .into_iter()
            .map(|(k, s, l)| (k, s.name(), l))
            .collect()
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

/// Where a forwarded call goes.
enum Forward {
    /// Into the mesh, for an attached client.
    Mesh,
    /// To the attached clients serving the procedure.
    ToClients(Arc<ClientProviders>),
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
    match f {
        HandlerFailure::Error(e) => RpcError::Handler {
            procedure: procedure.to_string(),
            provider: me,
            code: e.code,
            message: e.message,
        },
        HandlerFailure::Panicked => RpcError::Panicked {
            procedure: procedure.to_string(),
            provider: me,
        },
        HandlerFailure::Timeout => RpcError::Timeout {
            procedure: procedure.to_string(),
            after: timeout,
        },
    }
}

fn remote_error(procedure: &str, provider: NodeId, e: CallError, timeout: Duration) -> RpcError {
    let procedure = procedure.to_string();
    match e.kind {
        RpcErrorKind::Handler => RpcError::Handler {
            procedure,
            provider,
            code: e.code,
            message: e.message,
        },
        RpcErrorKind::Panicked => RpcError::Panicked {
            procedure,
            provider,
        },
        RpcErrorKind::Timeout => RpcError::Timeout {
            procedure,
            after: timeout,
        },
        RpcErrorKind::Overloaded => RpcError::Overloaded {
            procedure,
            provider: Some(provider),
        },
        RpcErrorKind::Cancelled => RpcError::Cancelled { procedure },
        RpcErrorKind::NoProviders => RpcError::NoProviders { procedure },
        RpcErrorKind::Unreachable => RpcError::Unreachable {
            procedure,
            tried: vec![provider],
            reason: e.message,
        },
        RpcErrorKind::NotFound | RpcErrorKind::ShuttingDown => RpcError::Unreachable {
            procedure,
            tried: vec![provider],
            reason: e.message,
        },
        RpcErrorKind::Invalid | RpcErrorKind::Other(_) => RpcError::Handler {
            procedure,
            provider,
            code: i64::from(u16::from(e.kind)),
            message: e.message,
        },
    }
}

/// Decrements a gauge when dropped.
struct GaugeGuard<'a>(&'a AtomicU64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Reports an attempt's outcome to the balancer, also when the caller's
/// future is dropped mid-attempt (then as `Abandoned`).
struct RecordGuard<'a> {
    rpc: &'a Rpc,
    provider: NodeId,
    outcome: Outcome,
}

impl Drop for RecordGuard<'_> {
    fn drop(&mut self) {
        let now = self.rpc.now_ms();
        lock(&self.rpc.0.balancer).record(&self.provider, self.outcome, now);
    }
}

/// Removes a pending call; if it was never answered (the caller's future
/// was dropped or timed out), tells the provider to stop with CANCEL.
struct PendingGuard<'a> {
    rpc: &'a Rpc,
    peer: Peer,
    id: u64,
    answered: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.rpc.0.pending).remove(&self.id);
        if !self.answered && !self.peer.is_closed() {
            let peer = self.peer.clone();
            let msg = Message::Rpc(RpcMessage::Cancel(Cancel { id: self.id }));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = peer.send(&msg).await;
                });
            }
        }
    }
}

/// Options of one call.
#[derive(Debug, Clone)]
pub struct CallOptions {
    pub timeout: Duration,
    pub retries: u32,
    pub strategy: Strategy,
    pub headers: Vec<(String, String)>,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: DEFAULT_CALL_TIMEOUT,
            retries: DEFAULT_RETRIES,
            strategy: Strategy::RoundRobin,
            headers: Vec::new(),
        }
    }
}

/// A call being configured; `.await` runs it. Dropping the future cancels
/// the call (the provider is told to stop).
#[must_use = "a call does nothing until awaited"]
pub struct CallBuilder {
    rpc: Rpc,
    procedure: String,
    payload: Bytes,
    opts: CallOptions,
    target: Option<NodeId>,
}

impl CallBuilder {
    /// Deadline for the whole call, retries included (default 5 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.opts.timeout = d;
        self
    }

    /// Retries on other providers after a retryable failure (default 2).
    pub fn retries(mut self, n: u32) -> Self {
        self.opts.retries = n;
        self
    }

    /// How to choose a provider (default round robin).
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.opts.strategy = s;
        self
    }

    /// Adds a header passed to the handler.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.opts.headers.push((name.into(), value.into()));
        self
    }

    pub fn options(&self) -> &CallOptions {
        &self.opts
    }

    /// `Unreachable` for this call after trying `provider`.
    fn unreachable(&self, provider: NodeId, reason: String) -> RpcError {
        RpcError::Unreachable {
            procedure: self.procedure.clone(),
            tried: vec![provider],
            reason,
        }
    }
}

impl IntoFuture for CallBuilder {
    type Output = Result<Response, RpcError>;
    type IntoFuture = BoxFuture<'static, Result<Response, RpcError>>;

    fn into_future(self) -> Self::IntoFuture {
        let rpc = self.rpc.clone();
        Box::pin(rpc.run_call(self))
    }
}

/// An advertised procedure. Dropping it stops serving and withdraws the
/// advertisement (in the background); [`Registration::withdraw`] does the
/// same and waits for the mesh to be told.
pub struct Registration {
    procedure: String,
    token: u64,
    owner: Option<Weak<Inner>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("procedure", &self.procedure)
            .finish()
    }
}

impl Registration {
    pub fn procedure(&self) -> &str {
        &self.procedure
    }

    /// Stops serving and withdraws the advertisement from the DHT.
    pub async fn withdraw(mut self) -> Result<(), RpcError> {
        let Some(inner) = self.owner.take().and_then(|w| w.upgrade()) else {
            return Ok(());
        };
        let rpc = Rpc(inner);
        if rpc.remove_local(&self.procedure, self.token) {
            rpc.publish_ad(&self.procedure, None)
                .await
                .map_err(|reason| RpcError::Advertise {
                    procedure: self.procedure.clone(),
                    reason,
                })?;
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(inner) = self.owner.take().and_then(|w| w.upgrade()) else {
            return;
        };
        let rpc = Rpc(inner);
        if !rpc.remove_local(&self.procedure, self.token) {
            return;
        }
        let procedure = std::mem::take(&mut self.procedure);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = rpc.publish_ad(&procedure, None).await {
                    tracing::debug!(procedure, error = %e, "could not withdraw advertisement");
                }
            });
        }
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
