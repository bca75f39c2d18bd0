//! Serving: each CALL from a peer goes through the core's admission
//! (refused at once, served by a handler in its own task, or forwarded by a
//! gateway); REPLY and CALL_ERROR go to the core, which names the call they
//! answer; CANCEL and a closing connection abort the requests they concern.

use std::future::Future;

use bytes::Bytes;
use futures::future::{AbortHandle, Abortable};
use futures::FutureExt;
use macula_rpc::{Admission, Seen};
use macula_wire::rpc::{Call, CallError, Cancel, Reply, RpcErrorKind, RpcMessage};
use macula_wire::Message;

use super::*;
use crate::service::{Answer, PeerDown, Serves, Service};

impl Rpc {
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
                let mut handle = self.0.serving.lock().remove(&(peer.connection_id(), id));
                if handle.is_none() {
                    // A call that came on a replaceable connection: the
                    // CANCEL may come on another one.
                    handle = self.0.serving_kept.lock().remove(&(peer.node_id(), id));
                    if handle.is_some() {
                        self.state().recent.forget(&peer.node_id(), id);
                    }
                }
                if let Some(h) = handle {
                    h.abort();
                    self.0.counters.cancelled_by_caller_total.inc();
                }
            }
        }
        None
    }

    pub(super) fn complete(&self, peer: &Peer, id: u64, answer: Result<Vec<u8>, CallError>) {
        let now = self.now();
        let notify = {
            let mut s = self.state();
            // The core checks that only the provider the call went to
            // answers it.
            match s.core.handle_answer(now, &peer.node_id(), id, answer) {
                Some(call) => s.notify.get(&call).cloned(),
                None => {
                    self.0.counters.late_replies_total.inc();
                    return;
                }
            }
        };
        if let Some(n) = notify {
            // Stored as a permit if the call is not waiting yet.
            n.notify_one();
        }
    }

    /// In a realm with an authority: why `peer` may not call `procedure`
    /// here (a client for itself; a node for itself or, with `relay`, for
    /// the clients it carries).
    fn caller_denied(&self, peer: &Peer, procedure: &str) -> Option<crate::authz::Denied> {
        let authz = self.authz()?;
        peer.authorized(authz, macula_auth::Action::Call, procedure)
            .err()
    }

    /// Starts serving `call` in its own task, or returns the refusal.
    pub(super) fn serve(&self, peer: &Peer, call: Call) -> Option<Message> {
        let c = &self.0.counters;
        // A call another node hands over names its originator, proved by
        // the originator's signature; one that does not verify is refused.
        let origin = match &call.origin {
            None => None,
            Some(o) => {
                match macula_auth::origin::verify_call(
                    o,
                    &call.procedure,
                    &call.payload,
                    &call.headers,
                ) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        c.unproved_callers_total.inc();
                        tracing::debug!(peer = %peer.node_id(), kind = e.kind(), "refused a call whose origin does not verify");
                        return Some(Message::Rpc(RpcMessage::Error(CallError {
                            id: call.id,
                            kind: RpcErrorKind::Unauthorized,
                            code: 0,
                            message: format!("the call's caller is not proved: {e}"),
                        })));
                    }
                }
            }
        };
        if let Some(d) = self.caller_denied(peer, &call.procedure) {
            c.unauthorized_total.inc();
            return Some(Message::Rpc(RpcMessage::Error(CallError {
                id: call.id,
                kind: RpcErrorKind::Unauthorized,
                code: 0,
                message: truncate(&d.to_string(), macula_wire::rpc::MAX_WIRE_RPC_ERROR_LEN),
            })));
        }
        let now = self.now();
        // Re-sent calls (PROTOCOL.md §5.4): a call that came on a
        // replaceable connection is remembered, so a copy re-sent over a
        // new route after that connection died runs once.
        // One lock for this and the admission (the hot path).
        let remember = peer.is_replaceable();
        let (seen, admission) = {
            let mut s = self.state();
            let seen = if remember || !s.recent.is_empty() {
                s.recent.admit(
                    now,
                    (peer.node_id(), call.id),
                    &call.procedure,
                    peer.clone(),
                    Millis(u64::from(call.timeout_ms)),
                    remember,
                )
            } else {
                Ok(Seen::New)
            };
            let admission = matches!(seen, Ok(Seen::New)).then(|| {
                s.core
                    .admit(now, &call.procedure, call.timeout_ms, peer.is_client())
            });
            if remember && matches!(admission, Some(Admission::Refuse { .. })) {
                s.recent.forget(&peer.node_id(), call.id);
            }
            (seen, admission)
        };
        let admission = match seen {
            Ok(Seen::New) => admission,
            Ok(Seen::Running) => {
                // Its answer goes to this connection when it ends.
                c.resends_answered_total.inc();
                return None;
            }
            Ok(Seen::Answered(answer)) => {
                c.resends_answered_total.inc();
                return Some(Message::Rpc(match answer {
                    Ok(payload) => RpcMessage::Reply(Reply {
                        id: call.id,
                        payload,
                        headers: Vec::new(),
                    }),
                    Err(e) => RpcMessage::Error(e),
                }));
            }
            Err(full) => {
                c.recent_full_total.inc();
                tracing::warn!(peer = %peer.node_id(), procedure = %call.procedure, "{full}; refusing a call");
                return Some(Message::Rpc(RpcMessage::Error(CallError {
                    id: call.id,
                    kind: RpcErrorKind::Overloaded,
                    code: 0,
                    message: full.to_string(),
                })));
            }
        };
        // Some whenever the call is new (a re-sent copy returned above).
        match admission? {
            Admission::Refuse { kind, message } => {
                match kind {
                    RpcErrorKind::NotFound => c.not_found_total.inc(),
                    RpcErrorKind::Overloaded => c.handler_overloaded_total.inc(),
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
                // Tracing: the handler runs inside this node's span, a
                // child of the caller's (so are the application's spans).
                let span = crate::trace::remote_in(&call.headers, || {
                    tracing::info_span!(target: crate::trace::TARGET, "macula.handle",
                        otel.kind = "server",
                        macula.procedure = call.procedure.as_str(),
                        macula.caller = %peer.node_id(),
                        macula.node = %self.0.node_id)
                });
                let procedure = call.procedure;
                let mut req = Request {
                    procedure: procedure.clone(),
                    payload: Bytes::from(call.payload),
                    headers: call.headers,
                    caller: peer.node_id(),
                    origin: origin.filter(|o| *o != peer.node_id()),
                    deadline: self.instant(deadline),
                };
                let (id, rpc) = (call.id, self.clone());
                let keys = self.0.e2e.get().filter(|k| k.is_active()).cloned();
                self.spawn_serving(peer, id, span, remember, async move {
                    let _slot = SlotGuard(&rpc, Some(slot));
                    // End-to-end: the handler gets the arguments opened;
                    // a call that does not open (or came in the clear on
                    // an encrypted procedure) is refused, never served.
                    let sealed = match &keys {
                        None => None,
                        Some(k) => {
                            let (payload, sealed) = k
                                .open_call(&procedure, std::mem::take(&mut req.payload))
                                .map_err(|e| e2e_refusal(id, &procedure, &e.to_string()))?;
                            req.payload = payload;
                            sealed
                        }
                    };
                    let reply = match run_handler(&rpc.0.counters, handler.as_ref(), req).await {
                        Ok(r) => r,
                        // The handler's own message is the application's:
                        // sealed like the reply.
                        Err(HandlerFailure::Error(mut e)) if sealed.is_some() => {
                            if let (Some(k), Some(s)) = (&keys, &sealed) {
                                e.message = k
                                    .seal_error(&procedure, s, &e.message)
                                    .map_err(|x| e2e_refusal(id, &procedure, &x.to_string()))?;
                            }
                            return Err(handler_failure(id, HandlerFailure::Error(e)));
                        }
                        Err(f) => return Err(handler_failure(id, f)),
                    };
                    match (&keys, sealed) {
                        (Some(k), Some(s)) => k
                            .seal_reply(&procedure, &s, reply)
                            .map_err(|e| e2e_refusal(id, &procedure, &e.to_string())),
                        _ => Ok(reply),
                    }
                });
                None
            }
            Admission::Forward { timeout } => {
                // A gateway carries sealed calls as they are, and refuses
                // a call in the clear on an encrypted procedure.
                if let Some(k) = self.0.e2e.get() {
                    if k.encrypts_call(&call.procedure)
                        && macula_auth::keys::Envelope::decode(&call.payload).is_err()
                    {
                        k.counters().e2e_calls.at(5).inc();
                        tracing::debug!(peer = %peer.node_id(), procedure = %call.procedure, "refused a call in the clear on an encrypted procedure");
                        return Some(Message::Rpc(RpcMessage::Error(e2e_refusal(
                            call.id,
                            &call.procedure,
                            &macula_auth::keys::OpenError::Malformed.to_string(),
                        ))));
                    }
                }
                // A gateway calls onward (its clients, or the mesh for a
                // client) in its own task, like a handler; the answer keeps
                // the onward error's kind.
                let (rpc, id) = (self.clone(), call.id);
                // Tracing: the forwarding span, a child of the caller's; the
                // onward call (a child of it) names it as parent.
                let mut headers = call.headers;
                let span = crate::trace::remote_in(&headers, || {
                    tracing::info_span!(target: crate::trace::TARGET, "macula.gateway.forward",
                        otel.kind = "server",
                        macula.procedure = call.procedure.as_str(),
                        macula.caller = %peer.node_id(),
                        macula.node = %self.0.node_id)
                });
                if let Some(tp) = span.as_ref().and_then(crate::trace::traceparent_of) {
                    crate::trace::put(&mut headers, &tp);
                }
                self.spawn_serving(peer, id, span, remember, async move {
                    let args = Bytes::from(call.payload);
                    let mut b = rpc
                        .call(&call.procedure, args.clone())
                        .timeout(timeout.to_duration());
                    b.opts.headers = headers;
                    b.origin = call.origin;
                    b.pass_through = true;
                    let r = b.await.map(|r| r.payload);
                    rpc.tap(|| Carried {
                        procedure: call.procedure.clone(),
                        arguments: args,
                        reply: r.as_ref().ok().cloned(),
                        error: r.as_ref().err().map(|e| match e {
                            RpcError::Handler { message, .. } => message.clone(),
                            other => other.to_string(),
                        }),
                    });
                    r.map_err(|e| forwarded_error(id, &e))
                });
                None
            }
        }
    }

    /// Serves request `id` from `peer` with `work` in its own task (CANCEL
    /// aborts it, as does the connection closing unless `kept`) and sends
    /// the answer: REPLY, or CALL_ERROR; an answer that cannot be sent (too
    /// large for a frame) is replaced by an `Invalid` error.
    /// `span`: the tracing span the work and its answer run in (`None`:
    /// not traced). `kept`: the call came on a replaceable connection and
    /// is in the recent-calls table: its answer is kept there and goes to
    /// the connection its last copy came in on.
    pub(super) fn spawn_serving<F>(
        &self,
        peer: &Peer,
        id: u64,
        span: Option<tracing::Span>,
        kept: bool,
        work: F,
    ) where
        F: Future<Output = Result<Bytes, CallError>> + Send + 'static,
    {
        let key = (peer.connection_id(), id);
        let kept_key = (peer.node_id(), id);
        let (abort, reg) = AbortHandle::new_pair();
        if kept {
            self.0.serving_kept.lock().insert(kept_key, abort);
        } else {
            self.0.serving.lock().insert(key, abort);
        }
        let (rpc, mut peer) = (self.clone(), peer.clone());
        let task = async move {
            let outcome = work.await;
            if kept {
                rpc.0.serving_kept.lock().remove(&kept_key);
                let answer = match &outcome {
                    Ok(payload) => Ok(payload.to_vec()),
                    Err(e) => Err(e.clone()),
                };
                let now = rpc.now();
                let route = rpc.state().recent.complete(now, &kept_key.0, id, answer);
                if let Some(r) = route {
                    peer = r;
                }
            } else {
                rpc.0.serving.lock().remove(&key);
            }
            let c = &rpc.0.counters;
            let msg = match outcome {
                Ok(payload) => {
                    c.served_total.inc();
                    Message::Rpc(RpcMessage::Reply(Reply {
                        id,
                        payload: payload.to_vec(),
                        headers: Vec::new(),
                    }))
                }
                Err(e) => {
                    c.served_failed_total.inc();
                    Message::Rpc(RpcMessage::Error(e))
                }
            };
            let reply = crate::trace::child(|| {
                tracing::info_span!(target: crate::trace::TARGET, "macula.reply",
                    macula.ok = matches!(msg, Message::Rpc(RpcMessage::Reply(_))))
            });
            let sent = match reply {
                Some(s) => tracing::Instrument::instrument(peer.send(&msg), s).await,
                None => peer.send(&msg).await,
            };
            if let Err(e) = sent {
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
        let task = tracing::Instrument::instrument(task, span.unwrap_or_else(tracing::Span::none));
        tokio::spawn(async move {
            let _gauge = GaugeGuard::up(&counters.serving);
            let _ = Abortable::new(task, reg).await;
        });
    }

    /// The connection `conn_id` closed: abandon the requests it carried.
    pub(crate) fn connection_closed(&self, conn_id: usize) {
        let mut serving = self.0.serving.lock();
        serving.retain(|(c, _), h| {
            if *c == conn_id {
                h.abort();
                false
            } else {
                true
            }
        });
    }

    /// Waits (at most `limit`) for requests being served to finish. True if
    /// none is left.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.0.counters.serving.get() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}

pub(super) enum HandlerFailure {
    Error(HandlerError),
    Panicked,
    Timeout,
}

/// Runs a handler until its deadline, turning a panic into an error.
pub(super) async fn run_handler(
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
            counters.handler_panics_total.inc();
            tracing::error!(procedure, "RPC handler panicked; still serving");
            Err(HandlerFailure::Panicked)
        }
        Err(_) => {
            counters.handler_timeouts_total.inc();
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

/// The CALL_ERROR refusing call `id` for end-to-end encryption: kind
/// `Unauthorized`, message [`E2E_REFUSAL`] first (the caller reports it as
/// `RpcError::Sealing`).
fn e2e_refusal(id: u64, procedure: &str, why: &str) -> CallError {
    let message = format!(
        "{E2E_REFUSAL}procedure {procedure:?} is encrypted end to end by the realm's policy; the call was refused: {why}"
    );
    CallError {
        id,
        kind: RpcErrorKind::Unauthorized,
        code: 0,
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
        RpcError::Unauthorized { .. } | RpcError::Sealing { .. } => (RpcErrorKind::Unauthorized, 0),
        _ => (RpcErrorKind::Invalid, 0),
    };
    let message = match e {
        RpcError::Handler { message, .. } => message.clone(),
        // Still a sealing refusal for the caller at the other end.
        RpcError::Sealing { reason, .. } => format!("{E2E_REFUSAL}{reason}"),
        other => other.to_string(),
    };
    CallError {
        id,
        kind,
        code,
        message: truncate(&message, macula_wire::rpc::MAX_WIRE_RPC_ERROR_LEN),
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

    fn peer_up(&self, peer: &Peer) {
        self.state().core.handle_peer_up(&peer.node_id());
    }

    fn peer_down(&self, peer: &Peer, why: PeerDown) {
        // Requests this connection carried have no one to answer to.
        self.connection_closed(peer.connection_id());
        if matches!(why, PeerDown::Silent | PeerDown::Left) {
            // The node is gone (crashed, cut off, or leaving): calls to it
            // move on now, and it is tried last until it is heard from.
            let now = self.now();
            let wake: Vec<_> = {
                let mut s = self.state();
                let ids = s.core.handle_peer_down(&peer.node_id(), now);
                ids.iter()
                    .filter_map(|id| s.notify.get(id).cloned())
                    .collect()
            };
            for n in wake {
                n.notify_one();
            }
        }
    }
}
