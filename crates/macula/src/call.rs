//! [`CallBuilder`]: an RPC call to configure, then `.await`, answering with
//! the facade's one [`Error`] type.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use crate::{CallOptions, Error, Response, Strategy};

/// A call being set up: `.timeout(d)`, `.retries(n)`, `.strategy(s)`,
/// `.header(k, v)`, then `.await` for the [`Response`] or an
/// [`Error::Rpc`] (its [`crate::RpcError::kind`] says which failure).
#[must_use = "a call does nothing until it is awaited"]
pub struct CallBuilder(macula_runtime::rpc::CallBuilder);

impl std::fmt::Debug for CallBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CallBuilder")
            .field(self.0.options())
            .finish()
    }
}

impl From<macula_runtime::rpc::CallBuilder> for CallBuilder {
    fn from(b: macula_runtime::rpc::CallBuilder) -> Self {
        CallBuilder(b)
    }
}

impl CallBuilder {
    /// The whole call's deadline, retries included (default 5 s).
    pub fn timeout(self, d: Duration) -> Self {
        CallBuilder(self.0.timeout(d))
    }

    /// Retries on another provider (default 2) after errors where the
    /// handler did not run (not found, overloaded, shutting down) and after
    /// `Unreachable`, which can come after the CALL was sent: a retried call
    /// may run twice (at-least-once). Use 0 for calls that must not.
    pub fn retries(self, n: u32) -> Self {
        CallBuilder(self.0.retries(n))
    }

    /// How the provider is chosen.
    pub fn strategy(self, s: Strategy) -> Self {
        CallBuilder(self.0.strategy(s))
    }

    /// Adds a header the handler sees.
    pub fn header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        CallBuilder(self.0.header(name, value))
    }

    /// The options as set so far.
    pub fn options(&self) -> &CallOptions {
        self.0.options()
    }
}

impl IntoFuture for CallBuilder {
    type Output = Result<Response, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Response, Error>> + Send + 'static>>;

    fn into_future(self) -> Self::IntoFuture {
        let call = self.0.into_future();
        Box::pin(async move { call.await.map_err(Error::from) })
    }
}
