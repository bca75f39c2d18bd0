//! The gateway side of client mode: every node serves lightweight clients
//! attached to it (see `client.rs` for the other side).
//!
//! A client's requests (CLIENT_SUBSCRIBE/UNSUBSCRIBE/ADVERTISE/UNADVERTISE)
//! are handled in order by one worker task per client connection and each
//! is acknowledged with CLIENT_ACK once it took effect in the mesh (the
//! interest record or advertisement is in the DHT). The client's patterns
//! feed one queue (`pubsub::ClientFeed`) drained onto the client's pub/sub
//! data stream with each event's original publisher, epoch and sequence
//! number. Its procedures are advertised by this node, whose handler
//! forwards each call to the client (`Rpc::advertise_for_client`). When the
//! client's connection closes, all of it is withdrawn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use macula_wire::client::{ClientAck, ClientMessage, MAX_CLIENT_ERROR_LEN};
use macula_wire::Message;
use tokio::sync::mpsc;

use crate::peer::{Attach, Peer};
use crate::pubsub::{ClientFeed, PubSub};
use crate::rpc::Rpc;

/// Requests one client may have waiting at its gateway; past this the
/// gateway answers at once with an error.
pub const MAX_PENDING_CLIENT_REQUESTS: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of the gateway role.
#[derive(Debug, Default)]
pub struct GatewayCounters {
    /// Clients attached now (connections that sent a request).
    pub clients: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_failed_total: AtomicU64,
}

impl GatewayCounters {
    pub(crate) fn rows(&self) -> [(&'static str, &'static str, u64); 3] {
        let g = |a: &AtomicU64| a.load(Relaxed);
        [
            (
                "macula_gateway_clients",
                "Lightweight clients attached to this node now.",
                g(&self.clients),
            ),
            (
                "macula_gateway_requests_total",
                "Client requests (subscribe, advertise, and their withdrawals) handled.",
                g(&self.requests_total),
            ),
            (
                "macula_gateway_requests_failed_total",
                "Client requests answered with an error.",
                g(&self.requests_failed_total),
            ),
        ]
    }
}

/// Exposes the gateway counters.
#[derive(Debug)]
pub struct GatewayCollector(pub Arc<GatewayCounters>);

impl prometheus_client::collector::Collector for GatewayCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        crate::metrics::encode_rows(&mut encoder, &self.0.rows())
    }
}

struct Session {
    tx: mpsc::Sender<ClientMessage>,
    feed: Arc<ClientFeed>,
    tasks: [tokio::task::AbortHandle; 2],
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
            .field("clients", &self.0.counters.clients.load(Relaxed))
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
        let sessions = lock(&self.0.sessions);
        let mut v: Vec<_> = sessions
            .values()
            .map(|s| (s.feed.client().to_string(), s.feed.patterns()))
            .collect();
        v.sort();
        v
    }

    /// The session of `peer`'s connection, created on its first request.
    fn session(&self, peer: &Peer) -> mpsc::Sender<ClientMessage> {
        let mut sessions = lock(&self.0.sessions);
        if let Some(s) = sessions.get(&peer.connection_id()) {
            return s.tx.clone();
        }
        let (tx, rx) = mpsc::channel(MAX_PENDING_CLIENT_REQUESTS);
        let feed = self.0.pubsub.client_feed(peer.node_id());
        let forward = tokio::spawn({
            let (ps, feed) = (self.0.pubsub.clone(), feed.clone());
            async move { ps.forward_feed(feed).await }
        });
        let worker = tokio::spawn(worker(self.clone(), peer.clone(), feed.clone(), rx));
        sessions.insert(
            peer.connection_id(),
            Session {
                tx: tx.clone(),
                feed,
                tasks: [forward.abort_handle(), worker.abort_handle()],
            },
        );
        self.0
            .counters
            .clients
            .store(sessions.len() as u64, Relaxed);
        tracing::debug!(client = %peer.node_id(), "client attached");
        tx
    }

    /// `peer`'s connection closed: withdraw everything it had.
    pub(crate) fn connection_closed(&self, peer: &Peer) {
        let session = {
            let mut sessions = lock(&self.0.sessions);
            let s = sessions.remove(&peer.connection_id());
            self.0
                .counters
                .clients
                .store(sessions.len() as u64, Relaxed);
            s
        };
        let Some(s) = session else { return };
        for t in &s.tasks {
            t.abort();
        }
        s.feed.close();
        let (rpc, peer) = (self.0.rpc.clone(), peer.clone());
        tokio::spawn(async move {
            rpc.withdraw_for_client(&peer, None).await;
        });
        tracing::debug!("client detached");
    }
}

impl Attach for Gateway {
    fn on_message(&self, peer: &Peer, msg: ClientMessage) -> Option<Message> {
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
        match self.session(peer).try_send(msg) {
            Ok(()) => None,
            Err(_) => {
                self.0.counters.requests_failed_total.fetch_add(1, Relaxed);
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

/// Handles one client's requests in order.
async fn worker(
    gw: Gateway,
    peer: Peer,
    feed: Arc<ClientFeed>,
    mut rx: mpsc::Receiver<ClientMessage>,
) {
    let (ps, rpc) = (&gw.0.pubsub, &gw.0.rpc);
    while let Some(msg) = rx.recv().await {
        let id = msg.id();
        let res: Result<(), String> = match msg {
            ClientMessage::Subscribe(m) => ps
                .feed_add(&feed, &m.pattern)
                .await
                .map_err(|e| e.to_string()),
            ClientMessage::Unsubscribe(m) => {
                ps.feed_remove(&feed, &m.pattern).await;
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
        c.requests_total.fetch_add(1, Relaxed);
        if let Err(e) = &res {
            c.requests_failed_total.fetch_add(1, Relaxed);
            tracing::debug!(client = %peer.node_id(), error = %e, "client request failed");
        }
        if let Err(e) = peer.send(&ack(id, res.err())).await {
            tracing::debug!(client = %peer.node_id(), error = %e, "could not acknowledge a client request");
            return;
        }
    }
}
