//! The node status service (issue 23): what a node tells its connected
//! peers about itself (STATUS_REQUEST / STATUS_REPORT, `0xb0`/`0xb1`), so
//! that the dashboard of any node shows the mesh as that node sees it plus
//! what its peers report: their links (direct or relayed), clients, rates,
//! DHT size and lookup hops. Over the mesh, never by reaching for the
//! peers' HTTP ports.
//!
//! **Asking** costs nothing while nobody looks: only while a dashboard read
//! the view within `stale_after` ([`StatusService::snapshot`]) does the
//! node, every `interval`, sample its own totals and send STATUS_REQUEST to
//! up to `max_peers` full-node peers (taking turns beyond). Reports land in
//! the pure [`view::View`], which computes rates from successive totals and
//! forgets peers that left or stopped answering.
//!
//! **Answering:** a full-node peer's request is answered with this node's
//! status, links capped by `max_links` and by the asker's frame limit, at
//! most once per `min_answer_interval` per peer (faster ones: ERROR
//! `rate_limited`). Clients are refused. In a realm with an authority the
//! asking node's grant must allow `admin admin.dashboard` (the resource of
//! the dashboard's own admin endpoints), otherwise the report carries only
//! the refusal, which the asker's dashboard shows.
//!
//! Every outcome is counted (`macula_status_*`, `macula_dashboard_*`).
//! The dashboard's event streams are bounded here too
//! ([`StatusService::open_stream`]).

pub mod view;

use std::sync::Arc;

use macula_wire::status::{NodeStatus, StatusMessage, StatusReport};
use macula_wire::{ErrorCode, Message, MessageType, Millis, NodeId};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::authz::Authz;
use crate::clock::Clock;
use crate::config::DashboardLimits;
use crate::metrics::{register, CountGauge, LabelledCounters};
use crate::peer::Peer;
use crate::service::{Answer, PeerDown, Serves, Service};
use view::{Known, ReportError, View, ViewLimits, REPORT_OUTCOMES};

/// This node's own status with at most `n` links (given by the node).
pub(crate) type LocalStatus = Box<dyn Fn(usize) -> Option<NodeStatus> + Send + Sync>;
/// Every pooled connection (given by the node).
pub(crate) type PeerList = Box<dyn Fn() -> Vec<Peer> + Send + Sync>;

/// The resource a peer's grant must allow `admin` on for this node to
/// report to it (in a realm with an authority).
pub const STATUS_RESOURCE: &str = "admin.dashboard";

/// Rounds of STATUS_REQUESTs are at least this far apart, however short
/// `dashboard_interval` is: a peer with the default answer limit answers
/// every one.
pub const MIN_ROUND_INTERVAL: std::time::Duration =
    crate::config::DEFAULT_STATUS_MIN_ANSWER_INTERVAL;

/// Outcomes of a STATUS_REQUEST received (label `outcome`).
const REQUEST_OUTCOMES: [&str; 3] = ["answered", "refused", "rate_limited"];

/// Bytes of a STATUS_REPORT besides its links (addresses, agent, totals
/// and keys), and per link (two IDs, rtt, flags and keys): to fit the
/// links into the asker's frame limit.
const REPORT_BASE_BYTES: usize = 4096;
const REPORT_LINK_BYTES: usize = 120;

/// The service's counters.
#[derive(Debug)]
pub struct StatusCounters {
    /// STATUS_REQUESTs received, by outcome.
    pub requests_received: LabelledCounters<3>,
    /// STATUS_REQUESTs sent.
    pub requests_sent: Counter,
    /// Requests that got no report within `stale_after` (or were replaced
    /// by the next round's).
    pub requests_unanswered: Counter,
    /// Requests that could not be sent (connection gone, frame refused).
    pub send_failed: Counter,
    /// STATUS_REPORTs received, by outcome.
    pub reports_received: LabelledCounters<4>,
    /// Peers whose report the view holds.
    pub peers_known: CountGauge,
    /// Dashboard event streams open.
    pub streams: CountGauge,
    /// Dashboard event streams refused at `max_streams`.
    pub streams_refused: Counter,
}

impl Default for StatusCounters {
    fn default() -> Self {
        StatusCounters {
            requests_received: LabelledCounters::new("outcome", REQUEST_OUTCOMES),
            requests_sent: Counter::default(),
            requests_unanswered: Counter::default(),
            send_failed: Counter::default(),
            reports_received: LabelledCounters::new("outcome", REPORT_OUTCOMES),
            peers_known: CountGauge::default(),
            streams: CountGauge::default(),
            streams_refused: Counter::default(),
        }
    }
}

impl StatusCounters {
    /// Registers every metric in the node's registry.
    pub fn register(&self, r: &mut Registry) {
        self.requests_received.register(
            r,
            "macula_status_requests_received",
            "STATUS_REQUESTs from peers, by outcome: answered, refused (a client, or the realm's permissions), rate_limited.",
        );
        register(
            r,
            "macula_status_requests_sent",
            "STATUS_REQUESTs sent to peers for the dashboard.",
            self.requests_sent.clone(),
        );
        register(
            r,
            "macula_status_requests_unanswered",
            "STATUS_REQUESTs that got no STATUS_REPORT in time.",
            self.requests_unanswered.clone(),
        );
        register(
            r,
            "macula_status_send_failed",
            "STATUS_REQUESTs or STATUS_REPORTs that could not be sent.",
            self.send_failed.clone(),
        );
        self.reports_received.register(
            r,
            "macula_status_reports_received",
            "STATUS_REPORTs from peers, by outcome: stored, refused (the peer would not report), unsolicited, mismatched (another node's status).",
        );
        register(
            r,
            "macula_status_peers_known",
            "Peers whose status the dashboard's view holds.",
            self.peers_known.clone(),
        );
        register(
            r,
            "macula_dashboard_streams",
            "Dashboard event streams open.",
            self.streams.clone(),
        );
        register(
            r,
            "macula_dashboard_streams_refused",
            "Dashboard event streams refused because the most allowed were open.",
            self.streams_refused.clone(),
        );
    }
}

/// The node status service. Cheap to clone.
#[derive(Clone)]
pub struct StatusService(Arc<Inner>);

struct Inner {
    limits: DashboardLimits,
    clock: Clock,
    view: Mutex<View>,
    local: LocalStatus,
    peers: PeerList,
    authz: Option<Arc<Authz>>,
    counters: Arc<StatusCounters>,
    streams: Arc<Semaphore>,
}

impl std::fmt::Debug for StatusService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusService")
            .field("limits", &self.0.limits)
            .finish()
    }
}

/// One dashboard event stream's place; the place frees when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    _permit: OwnedSemaphorePermit,
    counters: Arc<StatusCounters>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.counters.streams.dec();
    }
}

/// Every dashboard event stream allowed is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{max} dashboard event streams are open, the most allowed (dashboard_max_streams); close one or raise the limit")]
pub struct StreamsFull {
    pub max: usize,
}

impl StatusService {
    pub(crate) fn new(
        me: NodeId,
        limits: DashboardLimits,
        clock: Clock,
        local: LocalStatus,
        peers: PeerList,
        authz: Option<Arc<Authz>>,
    ) -> StatusService {
        let view = View::new(
            me,
            ViewLimits {
                max_peers: limits.max_peers,
                stale_after: Millis::from_duration(limits.stale_after),
                min_answer_interval: Millis::from_duration(limits.min_answer_interval),
                rate_window: Millis::from_duration(limits.rate_window),
            },
            u64::from_le_bytes(*me.as_bytes().first_chunk::<8>().unwrap_or(&[0; 8])),
        );
        StatusService(Arc::new(Inner {
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            limits,
            clock,
            view: Mutex::new(view),
            local,
            peers,
            authz,
            counters: Arc::new(StatusCounters::default()),
        }))
    }

    pub fn counters(&self) -> &Arc<StatusCounters> {
        &self.0.counters
    }

    pub fn limits(&self) -> &DashboardLimits {
        &self.0.limits
    }

    /// The node's clock now (the time of the view's entries).
    pub fn now(&self) -> Millis {
        self.0.clock.now()
    }

    /// A place for one dashboard event stream, or [`StreamsFull`]
    /// (counted).
    pub fn open_stream(&self) -> Result<StreamPermit, StreamsFull> {
        match self.0.streams.clone().try_acquire_owned() {
            Ok(permit) => {
                self.0.counters.streams.inc();
                Ok(StreamPermit {
                    _permit: permit,
                    counters: self.0.counters.clone(),
                })
            }
            Err(_) => {
                self.0.counters.streams_refused.inc();
                Err(StreamsFull {
                    max: self.0.limits.max_streams,
                })
            }
        }
    }

    /// What the view holds now, this node first; marks the view as
    /// watched (peers are asked for the next `stale_after`). Samples this
    /// node's totals when the last sample is older than half an interval.
    pub fn snapshot(&self) -> Vec<(NodeId, Known)> {
        let now = self.0.clock.now();
        let mut view = self.0.view.lock();
        let was_watched = view.is_watched(now);
        view.watch(now);
        if !was_watched {
            self.sample_local(&mut view, now);
        }
        view.known()
            .into_iter()
            .map(|(id, k)| (id, k.clone()))
            .collect()
    }

    fn sample_local(&self, view: &mut View, now: Millis) {
        if let Some(s) = (self.0.local)(self.0.limits.max_links) {
            view.record_local(now, s);
        }
    }

    /// Every `interval` (never more often than [`MIN_ROUND_INTERVAL`])
    /// while watched: samples this node and asks the peers, until
    /// `shutdown`.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let every = self.0.limits.interval.max(MIN_ROUND_INTERVAL);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.round();
        }
    }

    /// One round (see [`StatusService::run`]).
    fn round(&self) {
        let now = self.0.clock.now();
        let peers: Vec<Peer> = (self.0.peers)()
            .into_iter()
            .filter(|p| !p.is_client() && !p.is_closed())
            .collect();
        let ids: Vec<NodeId> = peers.iter().map(|p| p.node_id()).collect();
        let asks = {
            let mut view = self.0.view.lock();
            if !view.is_watched(now) {
                return;
            }
            self.sample_local(&mut view, now);
            let (asks, unanswered) = view.round(now, &ids);
            self.0.counters.requests_unanswered.inc_by(unanswered);
            self.0.counters.peers_known.set(view.peers_known() as u64);
            asks
        };
        for (id, nonce) in asks {
            let Some(peer) = peers.iter().find(|p| p.node_id() == id).cloned() else {
                continue;
            };
            self.0.counters.requests_sent.inc();
            let counters = self.0.counters.clone();
            tokio::spawn(async move {
                let msg =
                    Message::Status(StatusMessage::Request(macula_wire::status::StatusRequest {
                        nonce,
                    }));
                if let Err(e) = peer.send(&msg).await {
                    counters.send_failed.inc();
                    tracing::debug!(peer = %peer.node_id(), error = %e, "could not send STATUS_REQUEST");
                }
            });
        }
    }

    /// The answer to a STATUS_REQUEST from `peer`.
    fn answer(&self, peer: &Peer, nonce: u64) -> Answer {
        let counters = &self.0.counters;
        if peer.is_client() {
            counters.requests_received.at(1).inc();
            return Answer::Refuse {
                code: ErrorCode::Unauthorized,
                reason: "a client does not ask nodes for their status".into(),
            };
        }
        let refused = |reason: String| {
            counters.requests_received.at(1).inc();
            Answer::Reply(Message::Status(StatusMessage::Report(StatusReport {
                nonce,
                status: None,
                refused: reason,
            })))
        };
        if let Some(authz) = &self.0.authz {
            if let Err(denied) = peer.authorized(authz, macula_auth::Action::Admin, STATUS_RESOURCE)
            {
                return refused(denied.to_string());
            }
        }
        let now = self.0.clock.now();
        if !self.0.view.lock().may_answer(peer.node_id(), now) {
            counters.requests_received.at(2).inc();
            return Answer::Refuse {
                code: ErrorCode::RateLimited,
                reason: format!(
                    "at most one STATUS_REQUEST per {:?} is answered",
                    self.0.limits.min_answer_interval
                ),
            };
        }
        let fit = (peer.hello().max_frame_size as usize).saturating_sub(REPORT_BASE_BYTES)
            / REPORT_LINK_BYTES;
        match (self.0.local)(self.0.limits.max_links.min(fit)) {
            Some(status) => {
                counters.requests_received.at(0).inc();
                Answer::Reply(Message::Status(StatusMessage::Report(StatusReport {
                    nonce,
                    status: Some(Box::new(status)),
                    refused: String::new(),
                })))
            }
            None => refused("the node is shutting down".into()),
        }
    }
}

/// STATUS_REQUEST and STATUS_REPORT on the control stream.
impl Service for StatusService {
    fn name(&self) -> &'static str {
        "status"
    }

    fn serves(&self) -> Serves {
        Serves {
            messages: &[MessageType::StatusRequest, MessageType::StatusReport],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        match msg {
            Message::Status(StatusMessage::Request(r)) => self.answer(peer, r.nonce),
            Message::Status(StatusMessage::Report(r)) => {
                let now = self.0.clock.now();
                let refusal = r.status.is_none();
                let outcome = self.0.view.lock().on_report(peer.node_id(), r, now);
                let slot = match outcome {
                    Ok(()) if refusal => 1,
                    Ok(()) => 0,
                    Err(ReportError::Unsolicited) => 2,
                    Err(ReportError::Mismatched) => 3,
                };
                self.0.counters.reports_received.at(slot).inc();
                if slot >= 2 {
                    tracing::debug!(peer = %peer.node_id(), outcome = REPORT_OUTCOMES[slot], "STATUS_REPORT not taken");
                }
                Answer::Done
            }
            other => Answer::Refuse {
                code: ErrorCode::UnexpectedMessage,
                reason: format!("{} is not the status service's", other.msg_type().name()),
            },
        }
    }

    fn peer_down(&self, peer: &Peer, why: PeerDown) {
        if why != PeerDown::Superseded {
            self.0.view.lock().peer_gone(&peer.node_id());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(max_streams: usize) -> StatusService {
        StatusService::new(
            NodeId::from_bytes([1; 32]),
            DashboardLimits {
                max_streams,
                ..DashboardLimits::default()
            },
            Clock::new(),
            Box::new(|_| None),
            Box::new(Vec::new),
            None,
        )
    }

    #[test]
    fn event_streams_are_bounded_and_counted() {
        let s = service(2);
        let a = s.open_stream().expect("first");
        let b = s.open_stream().expect("second");
        assert_eq!(s.open_stream().unwrap_err(), StreamsFull { max: 2 });
        assert!(StreamsFull { max: 2 }
            .to_string()
            .contains("dashboard_max_streams"));
        assert_eq!(s.counters().streams.get(), 2);
        assert_eq!(s.counters().streams_refused.get(), 1);
        drop(a);
        assert_eq!(s.counters().streams.get(), 1);
        let _c = s.open_stream().expect("a place freed");
        drop(b);
        assert_eq!(s.counters().streams.get(), 1);
    }

    #[test]
    fn status_metric_families() {
        let mut r = Registry::default();
        service(1).counters().register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encodes");
        assert_eq!(text.matches("# TYPE ").count(), 8, "{text}");
        assert!(text.contains("macula_dashboard_streams_refused_total 0"));
        assert!(text.contains("macula_status_requests_received_total{outcome=\"rate_limited\"} 0"));
    }
}
