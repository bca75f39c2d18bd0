//! Calling: each call is driven by its caller's future. It polls its own
//! actions from the core, does the I/O (lookup, reach, send, ping, close,
//! cancel) and otherwise waits for the core's next timer, an answer, its
//! connection closing or its probe. Dropping the future tells the core
//! (`drop_call`) and sends the CANCEL it returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_rpc::{Action, CallFailure, CallId, CallSpec, Millis, Slot, Started};
use macula_wire::rpc::{Call, Cancel, RpcMessage};
use macula_wire::{Message, NodeId};

use super::links::Role;
use super::serve::{run_handler, HandlerFailure};
use super::*;

impl Rpc {
    // ----- calling -----------------------------------------------------

    /// A call of `procedure`; configure it, then `.await` it.
    pub fn call(&self, procedure: &str, payload: impl Into<Bytes>) -> CallBuilder {
        CallBuilder {
            rpc: self.clone(),
            procedure: procedure.to_string(),
            payload: payload.into(),
            opts: CallOptions::default(),
            target: None,
            origin: None,
            pass_through: false,
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

    pub(super) fn check_call(&self, b: &CallBuilder) -> Result<(), RpcError> {
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

    pub(super) async fn run_call(self, mut b: CallBuilder) -> Result<Response, RpcError> {
        self.check_call(&b)?;
        self.allowed_here(macula_auth::Action::Call, &b.procedure)?;
        if crate::trace::on() {
            let span = crate::trace::start(&mut b.opts.headers, || {
                tracing::info_span!(target: crate::trace::TARGET, "macula.call",
                    otel.kind = "client",
                    macula.procedure = b.procedure.as_str(),
                    macula.node = %self.0.node_id,
                    macula.provider = tracing::field::Empty)
            });
            if let Some(span) = span {
                // Checked again: the trace context is one more header.
                self.check_call(&b)?;
                let r = tracing::Instrument::instrument(self.run(&b, None), span.clone()).await;
                if let Ok(r) = &r {
                    span.record("macula.provider", tracing::field::display(r.provider));
                }
                return r;
            }
        }
        self.run(&b, None).await
    }

    /// Starts the call in the core and runs it, counting it.
    pub(super) async fn run(
        &self,
        b: &CallBuilder,
        via: Option<&Peer>,
    ) -> Result<Response, RpcError> {
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
            c.caller_overloaded_total.inc();
        } else {
            c.calls_total.inc();
        }
        let at = std::time::Instant::now();
        let res = match started {
            // This node's in-flight limit: refused before it was a call.
            Err(f @ CallFailure::Overloaded { provider: None }) => return Err(self.error(b, f)),
            Err(f) => {
                if let CallFailure::Overloaded { provider: Some(_) } = f {
                    c.handler_overloaded_total.inc();
                }
                Err(self.error(b, f))
            }
            Ok(Started::Local {
                handler,
                slot,
                deadline,
            }) => {
                c.calls_local_total.inc();
                let _gauge = GaugeGuard::up(&c.inflight_calls);
                self.call_local(b, handler, slot, deadline).await
            }
            Ok(Started::Remote(id)) => {
                let _gauge = GaugeGuard::up(&c.inflight_calls);
                // End-to-end: the arguments as they leave this node (an
                // encrypted procedure), sealed once for every attempt; a
                // call in process is not sealed.
                match self.seal_args(b) {
                    Ok(None) => self.drive(id, b, via).await,
                    Ok(Some((sb, nonce))) => match self.drive(id, &sb, via).await {
                        Ok(r) => self.open_answer(b, r, &nonce),
                        Err(e) => Err(self.open_error(b, e, &nonce)),
                    },
                    Err(reason) => {
                        // Nothing was sent: the core forgets the call.
                        let now = self.now();
                        self.state().core.drop_call(id, now);
                        Err(RpcError::Sealing {
                            procedure: b.procedure.clone(),
                            provider: None,
                            reason,
                        })
                    }
                }
            }
        };
        match &res {
            Ok(_) => c.calls_ok_total.inc(),
            Err(_) => c.calls_failed_total.inc(),
        };
        self.observe_duration(&b.procedure, at.elapsed());
        res
    }

    /// The call with its arguments sealed, and the envelope's nonce (the
    /// reply is bound to it); `None`: not encrypted (or carried for
    /// another, as it came).
    fn seal_args(
        &self,
        b: &CallBuilder,
    ) -> Result<Option<(CallBuilder, crate::e2e::Nonce)>, String> {
        let Some(keys) = self.0.e2e.get().filter(|k| k.is_active()) else {
            return Ok(None);
        };
        if b.pass_through {
            return Ok(None);
        }
        match keys.seal_call(&b.procedure, b.payload.clone()) {
            Ok((_, None)) => Ok(None),
            Ok((payload, Some(nonce))) => {
                if payload.len() > self.0.max_payload {
                    return Err(format!(
                        "the sealed arguments ({} bytes) exceed the payload limit of {}",
                        payload.len(),
                        self.0.max_payload
                    ));
                }
                let sb = CallBuilder {
                    rpc: self.clone(),
                    procedure: b.procedure.clone(),
                    payload,
                    opts: b.opts.clone(),
                    target: b.target,
                    origin: b.origin.clone(),
                    pass_through: false,
                };
                Ok(Some((sb, nonce)))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// A sealed call's reply, opened.
    fn open_answer(
        &self,
        b: &CallBuilder,
        mut r: Response,
        nonce: &crate::e2e::Nonce,
    ) -> Result<Response, RpcError> {
        let Some(keys) = self.0.e2e.get() else {
            return Ok(r);
        };
        match keys.open_reply(&b.procedure, nonce, std::mem::take(&mut r.payload)) {
            Ok(p) => {
                r.payload = p;
                Ok(r)
            }
            Err(e) => Err(RpcError::Sealing {
                procedure: b.procedure.clone(),
                provider: Some(r.provider),
                reason: format!("the reply does not open: {e}"),
            }),
        }
    }

    /// A sealed call's failure: a handler's error message opened (it is
    /// sealed like the reply); one that does not open is `Sealing`.
    fn open_error(&self, b: &CallBuilder, e: RpcError, nonce: &crate::e2e::Nonce) -> RpcError {
        let (
            Some(keys),
            RpcError::Handler {
                procedure,
                provider,
                code,
                message,
            },
        ) = (self.0.e2e.get(), &e)
        else {
            return e;
        };
        match keys.open_error(&b.procedure, nonce, message) {
            Ok(message) => RpcError::Handler {
                procedure: procedure.clone(),
                provider: *provider,
                code: *code,
                message,
            },
            Err(why) => RpcError::Sealing {
                procedure: b.procedure.clone(),
                provider: Some(*provider),
                reason: format!("the handler's error message does not open: {why}"),
            },
        }
    }

    pub(super) fn observe_duration(&self, procedure: &str, d: Duration) {
        let label = {
            let mut seen = self.0.duration_labels.lock();
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
    pub(super) async fn call_local(
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
            origin: None,
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

    pub(super) fn error(&self, b: &CallBuilder, f: CallFailure<NodeId>) -> RpcError {
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
            CallFailure::Unauthorized { provider, message } => {
                match message.strip_prefix(super::E2E_REFUSAL) {
                    Some(reason) => RpcError::Sealing {
                        procedure,
                        provider: Some(provider),
                        reason: reason.to_string(),
                    },
                    None => RpcError::Unauthorized {
                        procedure,
                        provider: Some(provider),
                        message,
                    },
                }
            }
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
    ///
    /// One lock per step: what the last action led to (`input`) is fed to
    /// the core under the same lock that takes the next action, and after
    /// an action with nothing else queued the call waits without asking
    /// again. A waiting call is woken through its own `Notify` (registered
    /// at start), so waiting takes no lock.
    pub(super) async fn drive(
        &self,
        id: CallId,
        b: &CallBuilder,
        via: Option<&Peer>,
    ) -> Result<Response, RpcError> {
        let notify = Arc::new(tokio::sync::Notify::new());
        self.state().notify.insert(id, notify.clone());
        let mut call = Driving {
            rpc: self,
            id,
            peer: via.cloned(),
            watch: None,
            probe: None,
            done: false,
            fixed: via.is_some(),
        };
        let mut input: Option<Input> = None;
        let mut wait_until: Option<Millis> = None;
        loop {
            if let Some(t) = wait_until.take() {
                input = call.wait(&notify, self.sleep(t)).await;
                continue;
            }
            let now = self.now();
            let (action, wake) = {
                let mut s = self.state();
                if let Some(i) = input.take() {
                    i.feed(&mut s.core, id, now);
                }
                let a = s.core.poll_call(id, now);
                if let Some(Action::Done(_)) = a {
                    s.notify.remove(&id);
                }
                (a, s.core.poll_timeout(id).unwrap_or(now))
            };
            // Nothing else queued: wait for the next timer or an event.
            let idle = wake != Millis::ZERO;
            let timer = self.sleep(wake);
            let Some(action) = action else {
                wait_until = Some(wake);
                continue;
            };
            match action {
                Action::Lookup { procedure } => {
                    let Role::Node(link) = &self.0.role else {
                        input = Some(Input::Providers(Ok(Vec::new())));
                        continue;
                    };
                    tokio::select! {
                        found = link.lookup(&procedure) => input = Some(Input::Providers(found)),
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
                    if let Some(d) = reached.as_ref().and_then(|p| self.provider_denied(p, b)) {
                        // Not this provider: the next one is tried.
                        tracing::warn!(peer = %provider, procedure = %b.procedure, error = %d, "provider may not serve this procedure; not calling it");
                        input = Some(Input::Failed {
                            reason: d.to_string(),
                            lost: false,
                        });
                        continue;
                    }
                    input = Some(call.connected(reached, "could not connect", false));
                }
                Action::ConnectClient { conn, .. } => {
                    let peer = self.0.clients.lock().get(&conn).cloned();
                    let peer = peer.filter(|p| !p.is_closed());
                    input = Some(call.connected(peer, "the client's connection is gone", true));
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
                    input = Some(Input::Gateway(gw.as_ref().map(Peer::node_id)));
                    call.peer = gw;
                }
                Action::Send {
                    wire_id,
                    timeout_ms,
                    ..
                } => {
                    input = call.send(b, wire_id, timeout_ms, timer).await;
                    if input.is_none() && idle {
                        wait_until = Some(wake);
                    }
                }
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
                    if idle {
                        wait_until = Some(wake);
                    }
                }
                Action::Close { provider, reason } => {
                    self.0.counters.probes_failed_total.inc();
                    tracing::warn!(peer = %provider, procedure = %b.procedure, reason, "provider failed a liveness probe during a call; closing its connection");
                    if let Some(p) = &call.peer {
                        p.connection().close(
                            crate::peer::close_code(macula_wire::DisconnectReason::ProtocolError),
                            b"liveness probe failed",
                        );
                    }
                }
                Action::Cancel { wire_id, .. } => call.cancel(wire_id),
                Action::Resending { provider, wire_id } => {
                    self.0.counters.resends_total.inc();
                    tracing::debug!(peer = %provider, procedure = %b.procedure, wire_id, "the connection carrying the call died; re-sending it over a new route");
                    // The dead connection must not be handed out again.
                    if let Some(p) = call.peer.take() {
                        if !p.is_closed() {
                            p.connection().close(
                                crate::peer::close_code(
                                    macula_wire::DisconnectReason::ProtocolError,
                                ),
                                b"path lost under a call",
                            );
                        }
                    }
                    call.watch = None;
                    call.probe = None;
                    if idle {
                        wait_until = Some(wake);
                    }
                }
                Action::Retrying { after } => {
                    self.0.counters.retries_total.inc();
                    tracing::debug!(procedure = %b.procedure, error = ?after, "retrying on another provider");
                    if idle {
                        wait_until = Some(wake);
                    }
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

    /// In a realm with an authority: why `provider` may not serve the
    /// call (it must hold `advertise`, or `relay` for a client it carries).
    fn provider_denied(&self, provider: &Peer, b: &CallBuilder) -> Option<crate::authz::Denied> {
        let authz = self.authz()?;
        provider
            .authorized(authz, macula_auth::Action::Advertise, &b.procedure)
            .err()
    }

    /// A timer firing when the core's clock reads `t`.
    fn sleep(&self, t: Millis) -> tokio::time::Sleep {
        tokio::time::sleep_until(self.instant(t))
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

/// What an action led to, fed to the core with the next step's lock.
enum Input {
    Providers(Result<Vec<ProviderInfo>, String>),
    Connected { fallback: bool },
    Failed { reason: String, lost: bool },
    Gateway(Option<NodeId>),
    Pong(u64),
    ProbeFailed(u64, String),
}

impl Input {
    fn feed(self, core: &mut super::Core, id: CallId, now: Millis) {
        match self {
            Input::Providers(found) => core.handle_providers(id, now, found),
            Input::Connected { fallback } => core.handle_reached(id, now, fallback),
            Input::Failed { reason, lost } => core.handle_link_failed(id, now, reason, lost),
            Input::Gateway(g) => core.handle_gateway(id, now, g),
            Input::Pong(w) => core.handle_pong(id, now, w),
            Input::ProbeFailed(w, why) => core.handle_probe_failed(id, now, w, why),
        }
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
    /// Made over a given connection (`call_via`): never re-sent elsewhere.
    fixed: bool,
}

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

impl Driving<'_> {
    /// The provider of the attempt was reached (`Some`) or not.
    fn connected(&mut self, peer: Option<Peer>, why: &str, lost: bool) -> Input {
        match peer {
            Some(p) => {
                // Another route exists when this connection dies: the
                // core re-sends a CALL lost with it (not for a call made
                // over a given connection).
                let fallback = !self.fixed && p.is_replaceable();
                self.peer = Some(p);
                Input::Connected { fallback }
            }
            None => Input::Failed {
                reason: why.to_string(),
                lost,
            },
        }
    }

    /// Sends the attempt's CALL; a failure is the next input.
    async fn send(
        &mut self,
        b: &CallBuilder,
        wire_id: u64,
        timeout_ms: u32,
        timer: tokio::time::Sleep,
    ) -> Option<Input> {
        let Some(peer) = self.peer.clone() else {
            return Some(Input::Failed {
                reason: "no connection to send on".to_string(),
                lost: true,
            });
        };
        self.probe = None;
        self.watch = Some(peer.clone());
        // A forwarded call keeps its originator's proof; a client signs
        // its own calls (PROTOCOL.md §5.4, "Proved callers").
        let origin = b.origin.clone().or_else(|| {
            b.rpc.0.signer.get().map(|k| {
                macula_auth::origin::sign_call(k, &b.procedure, &b.payload, &b.opts.headers)
            })
        });
        let call = Message::Rpc(RpcMessage::Call(Call {
            id: wire_id,
            procedure: b.procedure.clone(),
            payload: b.payload.to_vec(),
            timeout_ms,
            headers: b.opts.headers.clone(),
            origin,
        }));
        peer.touch();
        let sent = tokio::select! {
            r = peer.send(&call) => r,
            _ = timer => return None,
        };
        sent.err().map(|e| Input::Failed {
            reason: format!("could not send the call: {e}"),
            lost: peer.is_closed(),
        })
    }

    /// Waits for an answer (`notify`), the timer, the connection closing or
    /// the probe; returns what the core must be told.
    async fn wait(
        &mut self,
        notify: &tokio::sync::Notify,
        timer: tokio::time::Sleep,
    ) -> Option<Input> {
        let (watch, probe) = (&self.watch, &mut self.probe);
        let closed = async {
            match watch {
                Some(p) => p.connection().closed().await,
                None => futures::future::pending().await,
            }
        };
        let probed = async {
            match probe {
                Some((w, f)) => (*w, f.await),
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            _ = notify.notified() => None,
            _ = timer => None,
            e = closed => {
                self.watch = None;
                let why = crate::peer::describe_close(&e);
                Some(Input::Failed { reason: format!("connection closed: {why}"), lost: true })
            }
            (w, r) = probed => {
                self.probe = None;
                Some(match r {
                    Ok(()) => Input::Pong(w),
                    Err(why) => Input::ProbeFailed(w, why),
                })
            }
        }
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
            s.notify.remove(&self.id);
            s.core.drop_call(self.id, now)
        };
        if let Some(Action::Cancel { wire_id, .. }) = cancel {
            self.cancel(wire_id);
        }
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
