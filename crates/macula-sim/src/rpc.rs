//! The RPC core (`macula_rpc::RpcCore`, role `Node`) as a [`Service`],
//! fed the way the runtime's driver (`runtime/src/rpc/`) feeds it:
//!
//! - **Calling**: after every input, each call concerned is polled
//!   (`poll_call`) until it has nothing to do, and each [`Action`] is done:
//!   `Lookup` is a DHT get of `rpc:{realm}:{procedure}` through the node's
//!   own DHT core (advertisements decoded as the runtime's link does);
//!   `Connect` is the pooled connection, else a dial (a failed dial is
//!   `handle_link_failed`); `Send` is a CALL frame, and the connection is
//!   watched (it going down is `handle_link_failed(.., lost)`); `Probe` is
//!   a PING answered by the peer's transport; `Close` closes the
//!   connection; `Cancel` is a CANCEL frame; `Done` is the application's
//!   outcome ([`AppEvent::CallDone`]). Timers come from `poll_timeout`.
//! - **Serving**: each CALL goes through `admit`; a served request runs a
//!   simulated handler that takes a drawn time and answers by echoing the
//!   request payload, or `Timeout` at the deadline the caller sent; a
//!   CANCEL, or the caller's connection going down, abandons it (the
//!   runtime aborts the handler's task). Each handler run is an
//!   [`AppEvent::Ran`], for the at-most-once check.
//! - **Advertising**: `advertise` in the core, then the signed
//!   `Advertisement` record put through the DHT core.
//!
//! Not modelled: a gateway's forwarding for lightweight clients (no clients
//! are simulated, so `Admission::Forward` cannot arise: it needs an
//! attached client).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use macula_dht::{Contact, Record};
use macula_pool::PoolTable;
use macula_rpc::{
    Action, Admission, Advert, CallId, CallSpec, Config, ProviderInfo, Role, RpcCore, Slot,
    Started, Strategy,
};
use macula_wire::rng::Rng;
use macula_wire::rpc::{Advertisement, Call, CallError, Cancel, Reply, RpcErrorKind, RpcMessage};
use macula_wire::time::Millis;
use macula_wire::NodeId;

use crate::service::{AppEvent, DhtDone, DhtReq, DownReason, Service, SimConn};
pub use crate::service::{CallResult, RpcMsg};

/// Lifetime of an advertisement (the runtime's `AD_TTL`); the DHT
/// republishes it at 75%.
pub const AD_TTL: Millis = Millis(120_000);

/// A simulated handler: it works for a time drawn in `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handler {
    /// Shortest run.
    pub min: Millis,
    /// Longest run.
    pub max: Millis,
}

/// One call being driven.
struct Driving {
    /// The application's call number (carried in the payload).
    app: u64,
    procedure: String,
    /// The provider of the latest `Connect`, while it is not reached.
    connecting: Option<NodeId>,
    /// The provider the latest CALL went to (its connection is watched).
    sent_to: Option<NodeId>,
    /// A dial for `connecting` was asked for.
    dialing: bool,
}

/// A request being served.
struct Serving {
    from: NodeId,
    wire_id: u64,
    slot: Slot,
    /// `Ok`: the handler finishes at this time; `Err`: the deadline comes
    /// first (answer `Timeout` then).
    done: Result<Millis, Millis>,
    payload: Vec<u8>,
}

/// What a DHT request of this service was for.
enum Pending {
    Lookup(CallId),
    Advertise,
}

/// The RPC core of one simulated node, and the driver around it.
pub struct RpcService {
    core: RpcCore<NodeId, Handler>,
    realm: String,
    rng: Rng,
    calls: BTreeMap<CallId, Driving>,
    /// Calls to poll at the next pump.
    dirty: BTreeSet<CallId>,
    /// Requests served: (finish time, sequence) -> request.
    serving: BTreeMap<(Millis, u64), Serving>,
    serving_by_wire: HashMap<(NodeId, u64), (Millis, u64)>,
    next_serving: u64,
    /// Probes out: wire id -> call.
    probes: HashMap<u64, CallId>,
    dht: VecDeque<DhtReq>,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    frames: VecDeque<(NodeId, RpcMsg)>,
    dials: VecDeque<NodeId>,
    closes: VecDeque<NodeId>,
    app: VecDeque<AppEvent>,
    /// Answers that matched no call (late, or from the wrong node).
    pub late_answers: u64,
    /// Retries the core made.
    pub retries: u64,
}

impl RpcService {
    pub(crate) fn new(node_id: NodeId, realm: &str, seed: u64) -> RpcService {
        let mut rng = Rng::new(seed);
        RpcService {
            core: RpcCore::new(node_id, Role::Node, Config::default(), rng.next_u64()),
            realm: realm.to_string(),
            rng,
            calls: BTreeMap::new(),
            dirty: BTreeSet::new(),
            serving: BTreeMap::new(),
            serving_by_wire: HashMap::new(),
            next_serving: 0,
            probes: HashMap::new(),
            dht: VecDeque::new(),
            pending: HashMap::new(),
            next_tag: 0,
            frames: VecDeque::new(),
            dials: VecDeque::new(),
            closes: VecDeque::new(),
            app: VecDeque::new(),
            late_answers: 0,
            retries: 0,
        }
    }

    /// The core, read-only.
    pub fn core(&self) -> &RpcCore<NodeId, Handler> {
        &self.core
    }

    /// Calls being driven.
    pub fn n_calls(&self) -> usize {
        self.calls.len()
    }

    fn tag(&mut self, p: Pending) -> u64 {
        self.next_tag += 1;
        self.pending.insert(self.next_tag, p);
        self.next_tag
    }

    /// Serves `procedure` with `handler` and puts its advertisement.
    pub(crate) fn advertise(&mut self, procedure: &str, handler: Handler) -> Result<(), String> {
        let ad = Advert {
            handler,
            weight: 100,
            metadata: Vec::new(),
            max_concurrent: None,
        };
        self.core
            .advertise(procedure, ad)
            .map_err(|e| e.to_string())?;
        let value = Advertisement {
            procedure: procedure.to_string(),
            weight: 100,
            metadata: Vec::new(),
            addrs: Vec::new(),
        }
        .encode()
        .map_err(|e| e.to_string())?;
        let key = macula_wire::dht_key(macula_rpc::ad_name(&self.realm, procedure).as_bytes());
        let tag = self.tag(Pending::Advertise);
        self.dht.push_back(DhtReq::Put {
            key,
            value,
            ttl: AD_TTL,
            tag,
        });
        Ok(())
    }

    /// The application calls `procedure` (its call number `app`; the
    /// payload carries it, and providers echo it).
    pub(crate) fn call(
        &mut self,
        app: u64,
        procedure: &str,
        timeout: Millis,
        retries: u32,
        now: Millis,
    ) {
        let spec = CallSpec {
            procedure: procedure.to_string(),
            timeout,
            retries,
            strategy: Strategy::RoundRobin,
            target: None,
        };
        match self.core.start_call(now, spec) {
            Ok(Started::Remote(id)) => {
                self.calls.insert(
                    id,
                    Driving {
                        app,
                        procedure: procedure.to_string(),
                        connecting: None,
                        sent_to: None,
                        dialing: false,
                    },
                );
                self.dirty.insert(id);
            }
            Ok(Started::Local { slot, .. }) => {
                // This node serves it: the handler runs in process (at once
                // here: a local call has no network to wait for).
                let me = *self.core.me();
                self.app.push_back(AppEvent::CallSent { app, provider: me });
                self.app.push_back(AppEvent::Ran { caller: me, app });
                self.core.release(slot);
                self.app.push_back(AppEvent::CallDone {
                    app,
                    result: Ok((me, app)),
                });
            }
            Err(f) => self.app.push_back(AppEvent::CallDone {
                app,
                result: Err(f),
            }),
        }
    }

    pub(crate) fn poll_dht(&mut self) -> Option<DhtReq> {
        self.dht.pop_front()
    }

    pub(crate) fn poll_dial(&mut self) -> Option<NodeId> {
        self.dials.pop_front()
    }

    pub(crate) fn poll_close(&mut self) -> Option<NodeId> {
        self.closes.pop_front()
    }

    pub(crate) fn poll_app(&mut self) -> Option<AppEvent> {
        self.app.pop_front()
    }

    /// A DHT request of this service finished.
    pub(crate) fn handle_dht(&mut self, done: DhtDone, now: Millis) {
        match done {
            DhtDone::Got { tag, result } => {
                let Some(Pending::Lookup(id)) = self.pending.remove(&tag) else {
                    return;
                };
                let Some(procedure) = self.calls.get(&id).map(|c| c.procedure.clone()) else {
                    return;
                };
                let found = result.map(|records| providers(&procedure, records));
                self.core.handle_providers(id, now, found);
                self.dirty.insert(id);
            }
            DhtDone::Put { tag, result } => {
                self.pending.remove(&tag);
                if let Err(e) = result {
                    // The DHT core republishes it; the runtime logs it.
                    tracing::debug!(error = %e, "advertisement put failed");
                }
            }
        }
    }

    /// A dial to `node` failed: calls waiting to reach it fail their
    /// attempt.
    pub(crate) fn handle_dial_failed(&mut self, node: &NodeId, now: Millis) {
        let ids: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.connecting == Some(*node) && c.dialing)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(c) = self.calls.get_mut(&id) {
                c.connecting = None;
                c.dialing = false;
            }
            self.core
                .handle_link_failed(id, now, "could not connect".into(), false);
            self.dirty.insert(id);
        }
    }

    /// Polls every call that had an input or a timer due, doing its
    /// actions, until none has anything left to do.
    pub(crate) fn pump(&mut self, now: Millis, pool: &PoolTable<SimConn>) {
        loop {
            // Calls whose provider is now connected.
            let reached: Vec<CallId> = self
                .calls
                .iter()
                .filter(|(_, c)| c.connecting.is_some_and(|p| pool.peek(&p).is_some()))
                .map(|(id, _)| *id)
                .collect();
            for id in reached {
                if let Some(c) = self.calls.get_mut(&id) {
                    c.connecting = None;
                    c.dialing = false;
                }
                self.core.handle_connected(id, now);
                self.dirty.insert(id);
            }
            let Some(id) = self.dirty.pop_first() else {
                return;
            };
            while let Some(a) = self.core.poll_call(id, now) {
                self.act(id, a, now, pool);
            }
        }
    }

    fn act(&mut self, id: CallId, a: Action<NodeId>, now: Millis, pool: &PoolTable<SimConn>) {
        match a {
            Action::Lookup { procedure } => {
                let key =
                    macula_wire::dht_key(macula_rpc::ad_name(&self.realm, &procedure).as_bytes());
                let tag = self.tag(Pending::Lookup(id));
                self.dht.push_back(DhtReq::Get { key, tag });
            }
            Action::Connect { provider, .. } => {
                let Some(c) = self.calls.get_mut(&id) else {
                    return;
                };
                c.sent_to = None;
                c.connecting = Some(provider);
                c.dialing = pool.peek(&provider).is_none();
                if c.dialing {
                    self.dials.push_back(provider);
                }
                // A pooled connection is taken up at the top of the pump.
            }
            // No lightweight clients are simulated: as in the runtime when
            // the client's connection is gone, or when a node has no
            // gateway.
            Action::ConnectClient { .. } => {
                let reason = "the client's connection is gone".into();
                self.core.handle_link_failed(id, now, reason, true);
                self.dirty.insert(id);
            }
            Action::AwaitGateway { .. } => {
                self.core.handle_gateway(id, now, None);
                self.dirty.insert(id);
            }
            Action::Send {
                provider,
                wire_id,
                timeout_ms,
                ..
            } => {
                let Some(c) = self.calls.get_mut(&id) else {
                    return;
                };
                c.sent_to = Some(provider);
                let app = c.app;
                self.app.push_back(AppEvent::CallSent { app, provider });
                let call = Call {
                    id: wire_id,
                    procedure: c.procedure.clone(),
                    payload: app.to_le_bytes().to_vec(),
                    timeout_ms,
                    headers: Vec::new(),
                    origin: None,
                };
                self.frames
                    .push_back((provider, RpcMsg::Rpc(RpcMessage::Call(call))));
            }
            Action::Probe { provider, wire_id } => {
                if pool.peek(&provider).is_some() {
                    self.probes.insert(wire_id, id);
                    self.frames.push_back((provider, RpcMsg::Ping(wire_id)));
                } else {
                    self.core
                        .handle_probe_failed(id, now, wire_id, "no connection".into());
                    self.dirty.insert(id);
                }
            }
            Action::Close { provider, reason } => {
                tracing::debug!(peer = %provider, reason, "closing a provider's connection");
                self.closes.push_back(provider);
            }
            Action::Cancel { provider, wire_id } => {
                self.frames.push_back((
                    provider,
                    RpcMsg::Rpc(RpcMessage::Cancel(Cancel { id: wire_id })),
                ));
            }
            // The simulator's connections are never replaceable.
            Action::Resending { .. } => {}
            Action::Retrying { .. } => {
                self.retries += 1;
                if let Some(c) = self.calls.get_mut(&id) {
                    c.connecting = None;
                    c.sent_to = None;
                    c.dialing = false;
                }
            }
            Action::Done(result) => {
                self.probes.retain(|_, c| *c != id);
                let Some(c) = self.calls.remove(&id) else {
                    return;
                };
                let result = result.map(|a| (a.provider, decode_app(&a.payload)));
                self.app
                    .push_back(AppEvent::CallDone { app: c.app, result });
            }
        }
    }

    /// A CALL from `from`: admitted, refused, or (not here) forwarded.
    fn serve(&mut self, from: NodeId, call: Call, now: Millis) -> Option<RpcMsg> {
        let refuse = |kind, message: String| {
            Some(RpcMsg::Rpc(RpcMessage::Error(CallError {
                id: call.id,
                kind,
                code: 0,
                message,
            })))
        };
        match self
            .core
            .admit(now, &call.procedure, call.timeout_ms, false)
        {
            Admission::Refuse { kind, message } => refuse(kind, message),
            Admission::Forward { .. } => refuse(
                RpcErrorKind::Unreachable,
                "gateway forwarding is not simulated".into(),
            ),
            Admission::Serve {
                handler,
                slot,
                deadline,
            } => {
                if self.serving_by_wire.contains_key(&(from, call.id)) {
                    // The caller reused an id it has open with this node: a
                    // caller bug the runtime would not notice either; the
                    // newer request replaces nothing and is refused.
                    self.core.release(slot);
                    return refuse(RpcErrorKind::Invalid, "duplicate call id".into());
                }
                let app = decode_app(&call.payload);
                self.app.push_back(AppEvent::Ran { caller: from, app });
                let work = Millis(self.rng.range_inclusive(handler.min.0, handler.max.0));
                let finish = now.saturating_add(work);
                let done = match finish < deadline {
                    true => Ok(finish),
                    false => Err(deadline),
                };
                let at = done.unwrap_or_else(|d| d);
                self.next_serving += 1;
                let key = (at, self.next_serving);
                self.serving_by_wire.insert((from, call.id), key);
                self.serving.insert(
                    key,
                    Serving {
                        from,
                        wire_id: call.id,
                        slot,
                        done,
                        payload: call.payload,
                    },
                );
                None
            }
        }
    }

    fn abandon(&mut self, key: (Millis, u64)) {
        if let Some(s) = self.serving.remove(&key) {
            self.serving_by_wire.remove(&(s.from, s.wire_id));
            self.core.release(s.slot);
        }
    }
}

/// The application call number a payload carries (0 if it carries none).
fn decode_app(payload: &[u8]) -> u64 {
    payload
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b))
        .unwrap_or(0)
}

/// The providers of `procedure` among advertisement records, as the
/// runtime's link decodes them (withdrawn and foreign ones left out).
fn providers(procedure: &str, records: Vec<Record>) -> Vec<ProviderInfo<NodeId>> {
    records
        .into_iter()
        .filter(|r| !r.value.is_empty())
        .filter_map(|r| {
            let ad = Advertisement::decode(&r.value).ok()?;
            (ad.procedure == procedure).then_some(ProviderInfo {
                node: r.publisher,
                weight: ad.weight,
                metadata: ad.metadata,
                addrs: ad.addrs,
                seq: r.seq,
            })
        })
        .collect()
}

impl Service for RpcService {
    type Msg = RpcMsg;

    fn handle_frame(&mut self, from: &Contact, msg: RpcMsg, now: Millis) -> Option<RpcMsg> {
        match msg {
            RpcMsg::Ping(n) => Some(RpcMsg::Pong(n)),
            RpcMsg::Pong(wire_id) => {
                if let Some(id) = self.probes.remove(&wire_id) {
                    self.core.handle_pong(id, now, wire_id);
                    self.dirty.insert(id);
                }
                None
            }
            RpcMsg::Rpc(RpcMessage::Call(call)) => self.serve(from.id, call, now),
            RpcMsg::Rpc(RpcMessage::Cancel(Cancel { id })) => {
                if let Some(key) = self.serving_by_wire.get(&(from.id, id)).copied() {
                    self.abandon(key);
                }
                None
            }
            RpcMsg::Rpc(RpcMessage::Reply(r)) => {
                self.answer(from.id, r.id, Ok(r.payload), now);
                None
            }
            RpcMsg::Rpc(RpcMessage::Error(e)) => {
                self.answer(from.id, e.id, Err(e), now);
                None
            }
        }
    }

    fn handle_peer_up(&mut self, peer: &Contact, _now: Millis) {
        // Calls waiting for this peer are taken up by the next pump.
        self.core.handle_peer_up(&peer.id);
    }

    fn handle_peer_down(&mut self, peer: &NodeId, reason: DownReason, now: Millis) {
        // Requests the connection carried have no one to answer to.
        let gone: Vec<(Millis, u64)> = self
            .serving
            .iter()
            .filter(|(_, s)| s.from == *peer)
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.abandon(k);
        }
        // Calls waiting on it learn the connection closed.
        let watched: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.sent_to == Some(*peer))
            .map(|(id, _)| *id)
            .collect();
        for id in watched {
            if let Some(c) = self.calls.get_mut(&id) {
                c.sent_to = None;
            }
            self.core
                .handle_link_failed(id, now, "connection closed".into(), true);
            self.dirty.insert(id);
        }
        if matches!(reason, DownReason::TimedOut | DownReason::Shutdown) {
            // The node is gone (the failure detector, or a goodbye), as the
            // runtime tells its RPC core: tried last until heard from.
            for id in self.core.handle_peer_down(peer, now) {
                self.dirty.insert(id);
            }
        }
    }

    fn handle_timeout(&mut self, now: Millis) {
        // Handlers that finished (or hit their deadline).
        while let Some((&key, _)) = self.serving.first_key_value() {
            if key.0 > now {
                break;
            }
            let Some(s) = self.serving.remove(&key) else {
                break;
            };
            self.serving_by_wire.remove(&(s.from, s.wire_id));
            self.core.release(s.slot);
            let msg = match s.done {
                Ok(_) => RpcMessage::Reply(Reply {
                    id: s.wire_id,
                    payload: s.payload,
                    headers: Vec::new(),
                }),
                Err(_) => RpcMessage::Error(CallError {
                    id: s.wire_id,
                    kind: RpcErrorKind::Timeout,
                    code: 0,
                    message: "deadline passed".into(),
                }),
            };
            self.frames.push_back((s.from, RpcMsg::Rpc(msg)));
        }
        // Calls whose timer is due.
        let due: Vec<CallId> = self
            .calls
            .keys()
            .copied()
            .filter(|&id| self.core.poll_timeout(id).is_some_and(|t| t <= now))
            .collect();
        self.dirty.extend(due);
    }

    fn poll_transmit(&mut self) -> Option<(NodeId, RpcMsg)> {
        self.frames.pop_front()
    }

    fn poll_timeout(&self) -> Option<Millis> {
        let serving = self.serving.first_key_value().map(|(k, _)| k.0);
        let calls = self
            .calls
            .keys()
            .filter_map(|&id| self.core.poll_timeout(id))
            .min();
        match (serving, calls) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl RpcService {
    fn answer(
        &mut self,
        from: NodeId,
        wire_id: u64,
        answer: Result<Vec<u8>, CallError>,
        now: Millis,
    ) {
        match self.core.handle_answer(now, &from, wire_id, answer) {
            Some(id) => {
                self.dirty.insert(id);
            }
            None => self.late_answers += 1,
        }
    }
}
