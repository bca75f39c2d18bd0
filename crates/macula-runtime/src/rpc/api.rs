//! The public RPC API the facade and the CLI use: errors with their kinds,
//! requests and responses, handler and advertisement options, the call
//! builder and the registration that withdraws on drop. Types and limits
//! only; what a call does is decided by the core and driven in `mod.rs`.

use std::future::{Future, IntoFuture};
use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use macula_rpc::{NameError, Strategy, Token};
use macula_wire::NodeId;

use super::{Inner, Rpc};

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

/// How long a client's call waits for a gateway connection (failover).
pub const GATEWAY_WAIT: Duration = Duration::from_secs(5);

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
    /// The realm's permissions refuse it: this node (`provider` None) or
    /// the provider refused the call, or this node may not advertise.
    #[error("{procedure:?} refused{}: {message}", .provider.map(|p| format!(" by {p}")).unwrap_or_default())]
    Unauthorized {
        procedure: String,
        provider: Option<NodeId>,
        message: String,
    },
    /// End-to-end encryption (issue 19): the procedure is encrypted and
    /// this node (`provider` None) holds no key to seal the call with, the
    /// provider (or a gateway on the way) could not open it or refused it
    /// in the clear, or the reply did not open. Never a silent fallback to
    /// the clear.
    #[error("{procedure:?}: end-to-end encryption{}: {reason}", .provider.map(|p| format!(" (provider {p})")).unwrap_or_default())]
    Sealing {
        procedure: String,
        provider: Option<NodeId>,
        reason: String,
    },
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
            RpcError::Unauthorized { .. } => "unauthorized",
            RpcError::Sealing { .. } => "sealing",
        }
    }
}

/// What a handler receives.
#[derive(Debug, Clone)]
pub struct Request {
    pub procedure: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    /// The calling node (this node's own ID for a local call): the one
    /// whose connection carried the call, which for a client's call is its
    /// gateway.
    pub caller: NodeId,
    /// The caller that made the call, proved by its signature, when
    /// another node handed it over (a client's call through its gateway);
    /// `None`: `caller` made it.
    pub origin: Option<NodeId>,
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

/// Procedures whose names start with this are served only to calls
/// addressed to the node ([`Rpc::serve_unlisted`]), never advertised.
pub const UNLISTED_PREFIX: &str = "_node.";

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
pub type ProviderInfo = macula_rpc::ProviderInfo<NodeId>;

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
    pub(super) rpc: Rpc,
    pub(super) procedure: String,
    pub(super) payload: Bytes,
    pub(super) opts: CallOptions,
    pub(super) target: Option<NodeId>,
    /// A forwarded call's originator proof, passed on unchanged (a
    /// gateway calling for its client).
    pub(super) origin: Option<macula_wire::rpc::CallOrigin>,
    /// A gateway's onward call for another's: its payload (and the reply)
    /// are carried as they are, never sealed or opened here.
    pub(super) pass_through: bool,
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

    /// Sends the payload as given and returns the reply as it comes,
    /// neither sealed nor opened end to end: what a gateway does with the
    /// calls it carries for others. A diagnostic (the tests send a call in
    /// the clear on an encrypted procedure with it); applications do not
    /// need it.
    #[doc(hidden)]
    pub fn as_carried(mut self) -> Self {
        self.pass_through = true;
        self
    }
}

/// A call a gateway carried for another (its client, or a client of
/// another gateway) and its reply, as it carried them
/// ([`Rpc::tap_carried`]): on an end-to-end encrypted procedure, the
/// envelopes.
#[derive(Debug, Clone)]
pub struct Carried {
    pub procedure: String,
    pub arguments: Bytes,
    /// `None`: the onward call failed.
    pub reply: Option<Bytes>,
    /// The onward call's failure as carried: a handler's message as it
    /// came (sealed on an encrypted procedure), else the error's text.
    pub error: Option<String>,
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
    pub(super) procedure: String,
    pub(super) token: Token,
    pub(super) owner: Option<Weak<Inner>>,
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
        if rpc.withdraw_local(&self.procedure, self.token) {
            rpc.publish_ad(&self.procedure, false)
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
        if !rpc.withdraw_local(&self.procedure, self.token) {
            return;
        }
        let procedure = std::mem::take(&mut self.procedure);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = rpc.publish_ad(&procedure, false).await {
                    tracing::debug!(procedure, error = %e, "could not withdraw advertisement");
                }
            });
        }
    }
}
