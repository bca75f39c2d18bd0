//! Reachability: can other nodes dial this one?
//!
//! A node asks up to [`CHECK_PEERS`] connected peers to dial it back
//! (DIAL_BACK). A peer dials the requester's listen ports at the IP it sees
//! the requester at, **from a separate UDP socket** (a NAT that only lets in
//! replies to what the requester sent out must not let the dial through just
//! because it comes from an address the requester already talks to), checks
//! the requester's node ID in the TLS handshake, closes with
//! `DisconnectReason::DialBack`, and answers DIAL_BACK_RESULT. One success
//! makes the node `Public` (at the address reached); answers that all failed
//! make it `Private`. The check repeats every [`RECHECK_INTERVAL`] (sooner
//! while unknown).
//!
//! Limits: [`MAX_CONCURRENT_DIAL_BACKS`] served at once (more are refused
//! with a reason), each bounded by [`DIAL_BACK_TIMEOUT`], at most
//! [`MAX_DIAL_BACK_ADDRS`] addresses per request.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use macula_wire::nat::{DialBack, DialBackResult, MAX_DIAL_BACK_ADDRS, MAX_DIAL_BACK_ERROR_LEN};
use macula_wire::{DisconnectReason, Message, NodeId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, Semaphore};

use crate::metrics::{register, CountGauge};
use crate::nat::{Filtering, NatLimits, NatReport, Observations, Recorded};
use crate::peer::{close_code, Peer};
use crate::service::{Answer, Serves, Service};

/// Peers asked per check.
pub const CHECK_PEERS: usize = 3;
/// Bound on one dial-back (QUIC + TLS handshake).
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Dial-backs served at once.
pub const MAX_CONCURRENT_DIAL_BACKS: usize = 8;
/// Time between checks once the answer is known.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(600);
/// Time between checks while it is unknown (no peer answered yet).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// What this node knows about its reachability.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReachState {
    /// Not checked yet, or no peer answered.
    #[default]
    Unknown,
    /// A peer dialed us at these addresses.
    Public { addrs: Vec<String> },
    /// Peers tried and could not dial us: we are behind NAT or a firewall.
    Private,
}

impl ReachState {
    pub fn name(&self) -> &'static str {
        match self {
            ReachState::Unknown => "unknown",
            ReachState::Public { .. } => "public",
            ReachState::Private => "private",
        }
    }
}

/// Counters, registered in the node's metrics registry.
#[derive(Debug, Default)]
pub struct ReachCounters {
    pub requests_sent_total: Counter,
    pub served_total: Counter,
    pub served_reached_total: Counter,
    pub served_refused_total: Counter,
    /// 0 unknown, 1 public, 2 private.
    pub state: CountGauge,
    /// `nat::Mapping::code`: 0 unknown, 1 none, 2 endpoint-independent,
    /// 3 address-dependent, 4 address-and-port-dependent.
    pub nat_mapping: CountGauge,
    /// Observers whose view of this node's address is held.
    pub nat_observers: CountGauge,
    /// Observations that showed this node's address had changed.
    pub nat_address_changes_total: Counter,
    /// Connections to peers opened (full nodes, either direction, direct or
    /// relayed).
    pub connections_opened_total: Counter,
    /// Those that were direct (not relayed) at some time: with
    /// `connections_opened_total`, the direct rate.
    pub connections_direct_total: Counter,
}

impl ReachCounters {
    /// Registers every metric in the node's registry.
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_reachability_requests_sent",
            "DIAL_BACK requests this node sent to peers.",
            self.requests_sent_total.clone(),
        );
        register(
            r,
            "macula_reachability_dial_backs",
            "Dial-backs this node performed for peers.",
            self.served_total.clone(),
        );
        register(
            r,
            "macula_reachability_dial_backs_reached",
            "Dial-backs that reached the peer.",
            self.served_reached_total.clone(),
        );
        register(
            r,
            "macula_reachability_dial_backs_refused",
            "DIAL_BACK requests refused (too many at once).",
            self.served_refused_total.clone(),
        );
        register(
            r,
            "macula_reachability_state",
            "This node's reachability: 0 unknown, 1 public, 2 private.",
            self.state.clone(),
        );
        register(
            r,
            "macula_nat_mapping",
            "This node's NAT mapping from peers' observed addresses: 0 unknown, 1 no NAT, \
             2 endpoint-independent, 3 address-dependent, 4 address-and-port-dependent.",
            self.nat_mapping.clone(),
        );
        register(
            r,
            "macula_nat_observers",
            "Peers whose observation of this node's address is held.",
            self.nat_observers.clone(),
        );
        register(
            r,
            "macula_nat_address_changes",
            "Times a peer saw this node at another IP than before (observations reset).",
            self.nat_address_changes_total.clone(),
        );
        register(
            r,
            "macula_nat_connections_opened",
            "Connections to full nodes opened, direct or relayed.",
            self.connections_opened_total.clone(),
        );
        register(
            r,
            "macula_nat_connections_direct",
            "Connections to full nodes that were direct (not relayed) at some time.",
            self.connections_direct_total.clone(),
        );
    }
}

struct Inner {
    client_config: quinn::ClientConfig,
    bind_ip: IpAddr,
    probe: tokio::sync::OnceCell<Option<quinn::Endpoint>>,
    state: Mutex<ReachState>,
    permits: Arc<Semaphore>,
    pending: Mutex<HashMap<u64, oneshot::Sender<DialBackResult>>>,
    next_nonce: AtomicU64,
    counters: Arc<ReachCounters>,
    observations: Mutex<Observations>,
    /// Woken when an observation changes what this node knows of its NAT.
    nat_changed: tokio::sync::Notify,
}

/// What `/health` and `macula nat` show of this node's NAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatStatus {
    pub report: NatReport,
    pub filtering: Filtering,
}

/// A node's reachability service. Cheap to clone.
#[derive(Clone)]
pub struct Reachability(Arc<Inner>);

impl std::fmt::Debug for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reachability")
            .field("state", &*self.lock_state())
            .finish()
    }
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(MAX_DIAL_BACK_ERROR_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The addresses to dial for a request from a peer seen at `observed`: each
/// claimed port at the observed IP (never another IP: a node must not be
/// usable to make us dial third parties), without duplicates.
pub fn dial_targets(observed: SocketAddr, claimed: &[String]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in claimed.iter().take(MAX_DIAL_BACK_ADDRS) {
        let Ok(addr) = a.parse::<SocketAddr>() else {
            continue;
        };
        let target = SocketAddr::new(observed.ip(), addr.port());
        if addr.port() != 0 && !out.contains(&target) {
            out.push(target);
        }
    }
    out
}

impl Reachability {
    /// `client_config` is the node's QUIC client configuration (its TLS
    /// identity); dial-backs bind a separate socket on `bind_ip`.
    pub(crate) fn new(
        client_config: quinn::ClientConfig,
        bind_ip: IpAddr,
        nat: NatLimits,
    ) -> Reachability {
        Reachability(Arc::new(Inner {
            client_config,
            bind_ip,
            probe: tokio::sync::OnceCell::new(),
            state: Mutex::new(ReachState::Unknown),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_DIAL_BACKS)),
            pending: Mutex::new(HashMap::new()),
            next_nonce: AtomicU64::new(1),
            counters: Arc::new(ReachCounters::default()),
            observations: Mutex::new(Observations::new(nat)),
            nat_changed: tokio::sync::Notify::new(),
        }))
    }

    /// Records that a peer at `observer` sees this node, whose connection
    /// to it uses `local`, at `observed` (its HELLO's `observed_addr`).
    pub(crate) fn observe(
        &self,
        observer: SocketAddr,
        local: SocketAddr,
        observed: SocketAddr,
        now: macula_wire::time::Millis,
    ) -> Recorded {
        let (recorded, before, after, observers) = {
            let mut o = self.0.observations.lock();
            let before = o.classify();
            let recorded = o.record(observer, local, observed, now);
            let after = o.classify();
            (recorded, before, after, o.entries().len())
        };
        let c = &self.0.counters;
        if recorded == Recorded::AddressChanged {
            c.nat_address_changes_total.inc();
            tracing::info!(observer = %observer, observed = %observed, "this node's address changed; NAT detection starts over");
        }
        c.nat_observers.set(observers as u64);
        c.nat_mapping.set(after.mapping.code());
        if before != after {
            if before.mapping != after.mapping || before.behind_nat != after.behind_nat {
                tracing::info!(
                    mapping = after.mapping.name(),
                    behind_nat = ?after.behind_nat,
                    port_preserved = ?after.port_preserved,
                    reflexive = ?after.reflexive,
                    "NAT detection"
                );
            }
            self.0.nat_changed.notify_waiters();
        }
        recorded
    }

    /// This node's NAT as the observations and the dial-back check show it.
    pub fn nat(&self, now: macula_wire::time::Millis) -> NatStatus {
        let report = {
            let mut o = self.0.observations.lock();
            o.expire(now);
            o.classify()
        };
        self.0.counters.nat_observers.set(report.observers as u64);
        self.0.counters.nat_mapping.set(report.mapping.code());
        let dialed_back = match &*self.lock_state() {
            ReachState::Unknown => None,
            ReachState::Public { .. } => Some(true),
            ReachState::Private => Some(false),
        };
        let filtering = crate::nat::filtering(&report, dialed_back);
        NatStatus { report, filtering }
    }

    /// Whether this node should hold relay reservations: it is private, or
    /// peers see it behind NAT. The latter holds before the dial-back check
    /// answers (relay first, so that it is reachable from the start) and
    /// after it found the node public: a dial-back comes from an IP the
    /// node talks to, which a NAT with address-dependent filtering lets
    /// through while it drops everyone else; callers reach such a node
    /// through the relay and then go direct by hole punching.
    pub fn wants_relay(&self, now: macula_wire::time::Millis) -> bool {
        self.state() == ReachState::Private || self.nat(now).report.behind_nat == Some(true)
    }

    /// Resolves when an observation changes what this node knows of its NAT
    /// (or the reachability state changes).
    pub(crate) async fn changed(&self) {
        self.0.nat_changed.notified().await
    }

    /// Counts a connection opened to a full node, and whether it is direct.
    pub(crate) fn connection_opened(&self, direct: bool) {
        self.0.counters.connections_opened_total.inc();
        if direct {
            self.0.counters.connections_direct_total.inc();
        }
    }

    /// Counts a relayed connection replaced by a direct one.
    pub(crate) fn connection_upgraded(&self) {
        self.0.counters.connections_direct_total.inc();
    }

    /// Connections opened and those ever direct.
    pub fn direct_rate(&self) -> (u64, u64) {
        let c = &self.0.counters;
        (
            c.connections_opened_total.get(),
            c.connections_direct_total.get(),
        )
    }

    fn lock_state(&self) -> MutexGuard<'_, ReachState> {
        self.0.state.lock()
    }

    /// The current answer.
    pub fn state(&self) -> ReachState {
        self.lock_state().clone()
    }

    pub fn counters(&self) -> &Arc<ReachCounters> {
        &self.0.counters
    }

    /// Sets the state without asking anyone (a node configured as private).
    pub(crate) fn force(&self, s: ReachState) {
        self.set_state(s);
    }

    fn set_state(&self, s: ReachState) {
        let code = match &s {
            ReachState::Unknown => 0,
            ReachState::Public { .. } => 1,
            ReachState::Private => 2,
        };
        let mut cur = self.lock_state();
        let changed = *cur != s;
        if changed {
            tracing::info!(reachability = s.name(), detail = ?s, "reachability changed");
        }
        *cur = s;
        self.0.counters.state.set(code);
        drop(cur);
        if changed {
            self.0.nat_changed.notify_waiters();
        }
    }

    /// A DIAL_BACK or DIAL_BACK_RESULT from `peer` (never blocks). Returns
    /// an immediate answer (a refusal) for the driver to send itself.
    pub(crate) fn on_message(&self, peer: &Peer, msg: Message) -> Option<Message> {
        match msg {
            Message::DialBack(req) => self.serve(peer, req),
            Message::DialBackResult(res) => {
                if let Some(tx) = self.0.pending.lock().remove(&res.nonce) {
                    let _ = tx.send(res);
                }
                None
            }
            _ => None,
        }
    }

    /// Starts a dial-back in its own task, or returns the refusal.
    fn serve(&self, peer: &Peer, req: DialBack) -> Option<Message> {
        let c = &self.0.counters;
        let peer = peer.clone();
        let Ok(permit) = self.0.permits.clone().try_acquire_owned() else {
            c.served_refused_total.inc();
            return Some(Message::DialBackResult(DialBackResult {
                nonce: req.nonce,
                reached: None,
                error: "too many dial-backs in progress; try later".into(),
            }));
        };
        c.served_total.inc();
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let targets = dial_targets(peer.remote_addr(), &req.addrs);
            let mut errors = Vec::new();
            let mut reached = None;
            for t in targets {
                match this.dial_back(t, peer.node_id()).await {
                    Ok(()) => {
                        reached = Some(t.to_string());
                        break;
                    }
                    Err(e) => errors.push(format!("{t}: {e}")),
                }
            }
            if reached.is_some() {
                this.0.counters.served_reached_total.inc();
            }
            let error = if errors.is_empty() && reached.is_none() {
                "no dialable address".to_string()
            } else {
                truncate(&errors.join("; "))
            };
            tracing::debug!(peer = %peer.node_id(), reached = ?reached, error = %error, "dial-back done");
            let msg = Message::DialBackResult(DialBackResult {
                nonce: req.nonce,
                reached,
                error,
            });
            let _ = peer.send(&msg).await;
        });
        None
    }

    /// The separate socket dial-backs leave from (created on first use).
    async fn probe_endpoint(&self) -> Option<quinn::Endpoint> {
        self.0
            .probe
            .get_or_init(|| async {
                let bind = SocketAddr::new(self.0.bind_ip, 0);
                match quinn::Endpoint::client(bind) {
                    Ok(mut e) => {
                        e.set_default_client_config(self.0.client_config.clone());
                        Some(e)
                    }
                    Err(e) => {
                        tracing::warn!(bind = %bind, error = %e, "cannot open the dial-back socket");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    /// Dials `addr` from the probe socket and checks that `expected` answers
    /// (the TLS verifier checks the ID carried in SNI), then closes.
    async fn dial_back(&self, addr: SocketAddr, expected: NodeId) -> Result<(), String> {
        let endpoint = self
            .probe_endpoint()
            .await
            .ok_or_else(|| "no dial-back socket".to_string())?;
        let sni = crate::tls::server_name(Some(expected));
        let connecting = endpoint.connect(addr, &sni).map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(DIAL_BACK_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no answer within {DIAL_BACK_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        conn.close(close_code(DisconnectReason::DialBack), b"dial-back");
        Ok(())
    }

    /// Asks up to `CHECK_PEERS` of `peers` to dial us back at `addrs` and
    /// records the answer.
    pub(crate) async fn check(&self, peers: Vec<Peer>, addrs: Vec<String>) -> ReachState {
        let asks = peers.into_iter().take(CHECK_PEERS).map(|peer| {
            let addrs = addrs.clone();
            async move {
                let nonce = self.0.next_nonce.fetch_add(1, Relaxed);
                let (tx, rx) = oneshot::channel();
                self.0.pending.lock().insert(nonce, tx);
                self.0.counters.requests_sent_total.inc();
                let msg = Message::DialBack(DialBack { nonce, addrs });
                let res = match peer.send(&msg).await {
                    Ok(()) => tokio::time::timeout(DIAL_BACK_TIMEOUT * 3, rx)
                        .await
                        .ok()
                        .and_then(Result::ok),
                    Err(_) => None,
                };
                self.0.pending.lock().remove(&nonce);
                res
            }
        });
        let answers: Vec<DialBackResult> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        let reached: Vec<String> = answers.iter().filter_map(|a| a.reached.clone()).collect();
        let state = if !reached.is_empty() {
            let mut addrs = reached;
            addrs.sort();
            addrs.dedup();
            ReachState::Public { addrs }
        } else if answers.iter().any(|a| !a.error.starts_with("too many")) {
            ReachState::Private
        } else {
            ReachState::Unknown
        };
        self.set_state(state.clone());
        state
    }
}

/// Dial-back as a service: DIAL_BACK requests are served, results matched.
impl Service for Reachability {
    fn name(&self) -> &'static str {
        "reachability"
    }

    fn serves(&self) -> Serves {
        use macula_wire::MessageType as T;
        Serves {
            messages: &[T::DialBack, T::DialBackResult],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        match Reachability::on_message(self, peer, msg) {
            Some(reply) => Answer::Reply(reply),
            None => Answer::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_targets_use_the_observed_ip_only() {
        let observed: SocketAddr = "198.18.0.101:40000".parse().unwrap();
        let claimed = vec![
            "198.19.1.10:4433".to_string(),
            "0.0.0.0:4433".to_string(),
            "198.18.9.9:5000".to_string(),
            "not an address".to_string(),
            "198.18.0.101:0".to_string(),
        ];
        let t = dial_targets(observed, &claimed);
        assert_eq!(
            t,
            vec![
                "198.18.0.101:4433".parse::<SocketAddr>().unwrap(),
                "198.18.0.101:5000".parse().unwrap()
            ]
        );
    }
}
