//! The gateway side of client mode: every node serves lightweight clients
//! attached to it (see `client.rs` for the other side).
//!
//! A client's requests (CLIENT_SUBSCRIBE/UNSUBSCRIBE/ADVERTISE/UNADVERTISE)
//! are handled in order by one worker task per client connection (running
//! only while requests wait, so an idle client costs no task) and each
//! is acknowledged with CLIENT_ACK once it took effect in the mesh (the
//! interest record or advertisement is in the DHT). The client's patterns
//! feed its outbound queue in the pub/sub core (a `Feed`), sent on its
//! pub/sub data stream with each event's original publisher, epoch and
//! sequence number. Its procedures are advertised by this node, whose
//! handler forwards each call to the client (`Rpc::advertise_for_client`).
//! When the client's connection closes, all of it is withdrawn.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use macula_wire::client::{ClientAck, ClientMessage, MAX_CLIENT_ERROR_LEN};
use macula_wire::Message;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::metrics::{register, CountGauge};
use crate::peer::Peer;
use crate::pubsub::PubSub;
use crate::rpc::Rpc;
use crate::service::{Answer, PeerDown, Serves, Service};

/// Requests one client may have waiting at its gateway; past this the
/// gateway answers at once with an error.
pub const MAX_PENDING_CLIENT_REQUESTS: usize = 256;

/// Counters of the gateway role.
#[derive(Debug, Default)]
pub struct GatewayCounters {
    /// Clients attached now (connections that sent a request).
    pub clients: CountGauge,
    pub requests_total: Counter,
    pub requests_failed_total: Counter,
}

impl GatewayCounters {
    /// Registers every metric in the node's registry.
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_gateway_clients",
            "Lightweight clients attached to this node now.",
            self.clients.clone(),
        );
        register(
            r,
            "macula_gateway_requests",
            "Client requests (subscribe, advertise, and their withdrawals) handled.",
            self.requests_total.clone(),
        );
        register(
            r,
            "macula_gateway_requests_failed",
            "Client requests answered with an error.",
            self.requests_failed_total.clone(),
        );
    }
}

struct Session {
    requests: Arc<Mutex<Requests>>,
    feed: Arc<Feed>,
}

/// One attached client's pub/sub feed: the pub/sub core matches the
/// client's patterns and queues their events straight to the client.
/// Dropping it (the session ends) closes the feed.
struct Feed {
    ps: PubSub,
    id: macula_pubsub::FeedId,
    client: macula_wire::NodeId,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.ps.close_feed(self.id);
    }
}

/// One client's requests waiting at the gateway, handled in order by a
/// worker task that exists only while there are some: an idle client costs
/// no task and no channel (at 10,000 clients that is tens of MB).
#[derive(Default)]
struct Requests {
    waiting: VecDeque<ClientMessage>,
    /// The running worker, if any.
    worker: Option<tokio::task::AbortHandle>,
}

struct Inner {
    pubsub: PubSub,
    rpc: Rpc,
    /// By connection ID.
    sessions: Mutex<HashMap<usize, Session>>,
    counters: Arc<GatewayCounters>,
}

/// A node's gateway role. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Gateway(Arc<Inner>);

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("clients", &self.0.counters.clients.get())
            .finish()
    }
}

impl Gateway {
    pub(crate) fn new(pubsub: PubSub, rpc: Rpc) -> Gateway {
        Gateway(Arc::new(Inner {
            pubsub,
            rpc,
            sessions: Mutex::new(HashMap::new()),
            counters: Arc::new(GatewayCounters::default()),
        }))
    }

    pub(crate) fn counters(&self) -> &Arc<GatewayCounters> {
        &self.0.counters
    }

    /// Patterns each attached client is subscribed to (for the admin API).
    pub(crate) fn client_patterns(&self) -> Vec<(String, Vec<String>)> {
        let sessions = self.0.sessions.lock();
        let mut v: Vec<_> = sessions
            .values()
            .map(|s| {
                (
                    s.feed.client.to_string(),
                    self.0.pubsub.feed_patterns(s.feed.id),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The session of `peer`'s connection (created on its first request):
    /// its request queue and feed.
    fn session(&self, peer: &Peer) -> (Arc<Mutex<Requests>>, Arc<Feed>) {
        let mut sessions = self.0.sessions.lock();
        if let Some(s) = sessions.get(&peer.connection_id()) {
            return (s.requests.clone(), s.feed.clone());
        }
        let feed = Arc::new(Feed {
            ps: self.0.pubsub.clone(),
            id: self.0.pubsub.open_feed(peer.node_id()),
            client: peer.node_id(),
        });
        let requests = Arc::new(Mutex::new(Requests::default()));
        sessions.insert(
            peer.connection_id(),
            Session {
                requests: requests.clone(),
                feed: feed.clone(),
            },
        );
        self.0.counters.clients.set(sessions.len() as u64);
        tracing::debug!(client = %peer.node_id(), "client attached");
        (requests, feed)
    }

    /// Queues `msg` for `peer`'s worker, starting one if none runs. Full
    /// queue: `false`.
    fn enqueue(&self, peer: &Peer, msg: ClientMessage) -> bool {
        let (requests, feed) = self.session(peer);
        let mut r = requests.lock();
        if r.waiting.len() >= MAX_PENDING_CLIENT_REQUESTS {
            return false;
        }
        r.waiting.push_back(msg);
        if r.worker.is_none() {
            let task = tokio::spawn(worker(self.clone(), peer.clone(), feed, requests.clone()));
            r.worker = Some(task.abort_handle());
        }
        true
    }

    /// `peer`'s connection closed: withdraw everything it had.
    pub(crate) fn connection_closed(&self, peer: &Peer) {
        let session = {
            let mut sessions = self.0.sessions.lock();
            let s = sessions.remove(&peer.connection_id());
            self.0.counters.clients.set(sessions.len() as u64);
            s
        };
        let Some(s) = session else { return };
        if let Some(w) = s.requests.lock().worker.take() {
            w.abort();
        }
        self.0.pubsub.close_feed(s.feed.id);
        let (rpc, peer) = (self.0.rpc.clone(), peer.clone());
        tokio::spawn(async move {
            rpc.withdraw_for_client(&peer, None).await;
        });
        tracing::debug!("client detached");
    }
}

/// The gateway role as a service: a client's CLIENT_* requests (each
/// acknowledged), and its cleanup when the client's connection ends.
impl Service for Gateway {
    fn name(&self) -> &'static str {
        "gateway"
    }

    fn serves(&self) -> Serves {
        use macula_wire::MessageType as T;
        Serves {
            messages: &[
                T::ClientSubscribe,
                T::ClientUnsubscribe,
                T::ClientAdvertise,
                T::ClientUnadvertise,
                T::ClientAck,
            ],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        let Message::Client(msg) = msg else {
            return Answer::Done;
        };
        match self.on_client_message(peer, msg) {
            Some(reply) => Answer::Reply(reply),
            None => Answer::Done,
        }
    }

    fn peer_down(&self, peer: &Peer, _why: PeerDown) {
        if peer.is_client() {
            self.connection_closed(peer);
        }
    }
}

impl Gateway {
    fn on_client_message(&self, peer: &Peer, msg: ClientMessage) -> Option<Message> {
        if let ClientMessage::Ack(_) = msg {
            // Only clients are acknowledged; a stray ACK is ignored.
            return None;
        }
        let id = msg.id();
        if !peer.is_client() {
            return Some(ack(
                id,
                Some("only a client (HELLO capability \"client\") may attach".into()),
            ));
        }
        match self.enqueue(peer, msg) {
            true => None,
            false => {
                self.0.counters.requests_failed_total.inc();
                Some(ack(
                    id,
                    Some(format!(
                        "too many pending requests (limit {MAX_PENDING_CLIENT_REQUESTS})"
                    )),
                ))
            }
        }
    }
}

fn ack(id: u64, error: Option<String>) -> Message {
    let error = error.map(|mut e| {
        if e.len() > MAX_CLIENT_ERROR_LEN {
            let mut end = MAX_CLIENT_ERROR_LEN;
            while !e.is_char_boundary(end) {
                end -= 1;
            }
            e.truncate(end);
        }
        e
    });
    Message::Client(ClientMessage::Ack(ClientAck { id, error }))
}

/// The next request waiting for `requests`' worker; `None` (and the worker
/// is gone) when there is none.
fn next_request(requests: &Mutex<Requests>) -> Option<ClientMessage> {
    let mut r = requests.lock();
    let next = r.waiting.pop_front();
    if next.is_none() {
        r.worker = None;
        // Give back the queue's memory while the client is idle.
        r.waiting = VecDeque::new();
    }
    next
}

/// In a realm with an authority, where a client's subscription or
/// advertisement enters the mesh: its own grant must allow it.
fn client_denied(gw: &Gateway, peer: &Peer, msg: &ClientMessage) -> Option<crate::authz::Denied> {
    let authz = gw.0.pubsub.authz()?;
    let (action, name) = match msg {
        ClientMessage::Subscribe(m) => (macula_auth::Action::Subscribe, &m.pattern),
        ClientMessage::Advertise(m) => (macula_auth::Action::Advertise, &m.procedure),
        _ => return None,
    };
    peer.authorized(authz, action, name).err()
}

/// Handles one client's requests in order, until none is waiting.
async fn worker(gw: Gateway, peer: Peer, feed: Arc<Feed>, requests: Arc<Mutex<Requests>>) {
    let (ps, rpc) = (&gw.0.pubsub, &gw.0.rpc);
    while let Some(msg) = next_request(&requests) {
        let id = msg.id();
        if let Some(d) = client_denied(&gw, &peer, &msg) {
            let c = &gw.0.counters;
            c.requests_total.inc();
            c.requests_failed_total.inc();
            tracing::debug!(client = %peer.node_id(), error = %d, "client request refused by the realm's permissions");
            if let Err(e) = peer.send(&ack(id, Some(d.to_string()))).await {
                tracing::debug!(client = %peer.node_id(), error = %e, "could not answer a client request");
            }
            continue;
        }
        let res: Result<(), String> = match msg {
            ClientMessage::Subscribe(m) => ps
                .feed_add(feed.id, &m.pattern)
                .await
                .map_err(|e| e.to_string()),
            ClientMessage::Unsubscribe(m) => {
                ps.feed_remove(feed.id, &m.pattern).await;
                Ok(())
            }
            ClientMessage::Advertise(m) => rpc
                .advertise_for_client(&peer, &m.procedure, m.weight, m.metadata)
                .await
                .map_err(|e| e.to_string()),
            ClientMessage::Unadvertise(m) => {
                rpc.withdraw_for_client(&peer, Some(&m.procedure)).await;
                Ok(())
            }
            ClientMessage::Ack(_) => continue,
        };
        let c = &gw.0.counters;
        c.requests_total.inc();
        if let Err(e) = &res {
            c.requests_failed_total.inc();
            tracing::debug!(client = %peer.node_id(), error = %e, "client request failed");
        }
        if let Err(e) = peer.send(&ack(id, res.err())).await {
            tracing::debug!(client = %peer.node_id(), error = %e, "could not acknowledge a client request");
            // The connection is failing: what waits has no one to answer.
            let mut r = requests.lock();
            r.worker = None;
            r.waiting.clear();
            return;
        }
    }
}
