//! The live web dashboard (issue 23): a static page and the data it reads.
//!
//! | route | answer | credentials |
//! |---|---|---|
//! | `GET /dashboard` | the page (`dashboard/index.html`) | none: it holds no data |
//! | `GET /dashboard/app.js`, `/dashboard/style.css` | its script and style | none |
//! | `GET /admin/dashboard` | one [`DashboardReport`] (JSON) | admin (`admin.dashboard`) |
//! | `GET /admin/dashboard/events` | a `text/event-stream` of `snapshot` events, one [`DashboardReport`] every `dashboard_interval` | admin (`admin.dashboard`) |
//!
//! The assets are compiled into the binary (`include_str!`): no build step,
//! no CDN, nothing fetched from elsewhere (the page's Content-Security-Policy
//! allows only this origin). The page asks for the admin token (or takes it
//! from the URL fragment, `/dashboard#token=...`, which browsers never send
//! to the server), keeps it in the tab's `sessionStorage`, and sends it as
//! `Authorization: Bearer` on its data requests: it reads the event stream
//! with `fetch` (an `EventSource` cannot send headers). Grant-signed
//! requests are for scripts (`macula` CLI), not the page.
//!
//! Event streams are bounded: at most `dashboard_max_streams` at once (the
//! next one is answered 503 `dashboard.too_many_streams`,
//! `macula_dashboard_streams_refused_total`), each ending after
//! `dashboard_stream_max_duration` (the page reconnects), and at the
//! node's shutdown.
//!
//! What the report holds comes from the node status service (`status/`):
//! this node, and every peer that answered its STATUS_REQUEST, with rates
//! computed from their running totals.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{error_kind, AdminState, LocalService, SubscriptionInfo};
use crate::node::NodeRuntime;
use crate::status::view::{Known, RATES, RATE_NAMES};
use macula_wire::{Millis, NodeId, NodeStatus};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The page may load only its own script, style and data.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /admin/dashboard` and each `snapshot` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DashboardReport {
    /// The answering node.
    pub node_id: String,
    pub realm: String,
    /// Between two events of the stream.
    pub interval_ms: u64,
    /// Rates are per second over this last stretch.
    pub rate_window_ms: u64,
    /// This node first, then its peers that reported, then nodes only
    /// named in someone's links (`source: "seen"`).
    pub nodes: Vec<DashboardNode>,
    /// Connections between full nodes, each once (`a` < `b`).
    pub links: Vec<DashboardLink>,
    /// This node's local subscriptions.
    pub subscriptions: Vec<SubscriptionInfo>,
    /// Procedures this node serves.
    pub services: Vec<LocalService>,
    /// Event streams open and the most allowed.
    pub streams_open: u64,
    pub streams_max: usize,
}

/// One node of [`DashboardReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DashboardNode {
    pub node_id: String,
    /// `self` (the answering node), `peer` (it answered a STATUS_REQUEST)
    /// or `seen` (only named in a link: not connected to the answering
    /// node, or it refused).
    pub source: String,
    /// Milliseconds since its status was read.
    pub age_ms: u64,
    /// Why it would not report, when it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The rest is absent for `seen` nodes and refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeReport>,
}

/// A node's status as [`DashboardNode`] shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeReport {
    pub addrs: Vec<String>,
    pub agent: String,
    pub uptime_secs: u64,
    pub ready: bool,
    pub reachability: String,
    /// Lightweight clients attached (this node is their gateway).
    pub clients: u32,
    /// Links to full nodes (those listed and those omitted).
    pub peers: u64,
    /// Per second: `messages_in`, `messages_out` (frames), `pubsub_in`,
    /// `pubsub_out` (pub/sub messages from and to peers and clients),
    /// `published` (by local applications), `delivered` (to local
    /// subscriptions), `rpc_calls`, `rpc_served`.
    pub rates: BTreeMap<String, f64>,
    pub dht_records: u64,
    pub dht_contacts: u64,
    pub dht_lookups: u64,
    /// Mean request rounds (hops) per DHT lookup; 0 before the first.
    pub dht_mean_hops: f64,
    pub subscriptions: u64,
    pub services: u64,
}

/// One connection between two full nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DashboardLink {
    pub a: String,
    pub b: String,
    /// `direct` or `relayed`.
    pub kind: String,
    /// The relay, when relayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_via: Option<String>,
    /// Round-trip time as its reporter measured it (the lower of two).
    pub rtt_us: u64,
    /// The nodes whose report lists it.
    pub reported_by: Vec<String>,
}

/// The report of `node` now (marks its view as watched: peers are asked).
pub fn report(node: &NodeRuntime) -> DashboardReport {
    let service = node.status_service();
    let limits = service.limits();
    let me = node.node_id();
    let (nodes, links) = mesh(me, &service.snapshot(), service.now());
    DashboardReport {
        node_id: me.to_string(),
        realm: node.realm().to_string(),
        interval_ms: u64::try_from(limits.interval.as_millis()).unwrap_or(u64::MAX),
        rate_window_ms: u64::try_from(limits.rate_window.as_millis()).unwrap_or(u64::MAX),
        nodes,
        links,
        subscriptions: node
            .pubsub()
            .subscriptions()
            .into_iter()
            .map(|(pattern, count)| SubscriptionInfo { pattern, count })
            .collect(),
        services: node
            .rpc()
            .advertised()
            .into_iter()
            .map(|(procedure, weight, available_slots)| LocalService {
                procedure,
                weight,
                available_slots,
            })
            .collect(),
        streams_open: service.counters().streams.get(),
        streams_max: limits.max_streams,
    }
}

/// The nodes and links of a view (`known`, this node `me` first) at
/// `now`: each link once, relayed when either end says so; nodes only named
/// in links appended as `seen`. Pure: the whole of what the graph shows.
pub fn mesh(
    me: NodeId,
    known: &[(NodeId, Known)],
    now: Millis,
) -> (Vec<DashboardNode>, Vec<DashboardLink>) {
    let mut nodes = Vec::new();
    let mut links: BTreeMap<(String, String), DashboardLink> = BTreeMap::new();
    let mut listed = BTreeSet::new();
    for (id, k) in known {
        listed.insert(id.to_string());
        let status = k.status.as_ref().map(|s| {
            for l in &s.links {
                let (x, y) = (id.to_string(), l.node_id.to_string());
                let key = if x < y { (x, y) } else { (y, x) };
                let reporter = id.to_string();
                let link = links.entry(key.clone()).or_insert_with(|| DashboardLink {
                    a: key.0.clone(),
                    b: key.1.clone(),
                    kind: "direct".into(),
                    relayed_via: None,
                    rtt_us: l.rtt_us,
                    reported_by: Vec::new(),
                });
                if let Some(r) = l.relayed_via {
                    link.kind = "relayed".into();
                    link.relayed_via = Some(r.to_string());
                }
                link.rtt_us = link.rtt_us.min(l.rtt_us);
                if !link.reported_by.contains(&reporter) {
                    link.reported_by.push(reporter);
                }
            }
            node_report(s, k.rates.rates())
        });
        nodes.push(DashboardNode {
            node_id: id.to_string(),
            source: if *id == me { "self" } else { "peer" }.into(),
            age_ms: now.saturating_sub(k.at).0,
            refused: k.refused.clone(),
            status,
        });
    }
    for l in links.values() {
        for end in [&l.a, &l.b] {
            if listed.insert(end.clone()) {
                nodes.push(DashboardNode {
                    node_id: end.clone(),
                    source: "seen".into(),
                    age_ms: 0,
                    refused: None,
                    status: None,
                });
            }
        }
    }
    (nodes, links.into_values().collect())
}

/// Two decimals are plenty on a dashboard.
fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn node_report(s: &NodeStatus, rates: [f64; RATES]) -> NodeReport {
    let t = &s.totals;
    NodeReport {
        addrs: s.addrs.clone(),
        agent: s.agent.clone(),
        uptime_secs: s.uptime_ms / 1000,
        ready: s.ready,
        reachability: s.reachability.clone(),
        clients: s.clients,
        peers: s.links.len() as u64 + u64::from(s.links_omitted),
        rates: RATE_NAMES
            .iter()
            .zip(rates)
            .map(|(n, r)| (n.to_string(), round2(r)))
            .collect(),
        dht_records: t.dht_records,
        dht_contacts: t.dht_contacts,
        dht_lookups: t.dht_lookups,
        dht_mean_hops: if t.dht_lookups == 0 {
            0.0
        } else {
            round2(t.dht_lookup_hops as f64 / t.dht_lookups as f64)
        },
        subscriptions: t.subscriptions,
        services: t.services,
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /dashboard`.
pub(super) async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /dashboard/app.js`.
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /dashboard/style.css`.
pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// `GET /admin/dashboard`.
pub(super) async fn snapshot(State(s): State<AdminState>) -> Json<DashboardReport> {
    Json(report(&s.node))
}

/// `GET /admin/dashboard/events`.
pub(super) async fn events(State(s): State<AdminState>) -> Response {
    let permit = match s.node.status_service().open_stream() {
        Ok(p) => p,
        Err(full) => {
            tracing::warn!(
                max = full.max,
                "dashboard event stream refused: too many open"
            );
            return error_kind(
                StatusCode::SERVICE_UNAVAILABLE,
                "dashboard.too_many_streams",
                full.to_string(),
            );
        }
    };
    let limits = s.node.status_service().limits().clone();
    let ends = tokio::time::Instant::now() + limits.stream_max_duration;
    let mut tick = tokio::time::interval(limits.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let node = s.node.clone();
    let stream = futures::stream::unfold(
        (node, tick, permit),
        move |(node, mut tick, permit)| async move {
            tick.tick().await;
            // Ends at its time limit, and when the node shuts down (the
            // admin server's graceful stop waits for open responses).
            if tokio::time::Instant::now() >= ends || node.is_shutting_down() {
                return None;
            }
            let event = match Event::default().event("snapshot").json_data(report(&node)) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode a dashboard snapshot");
                    Event::default()
                        .event("error")
                        .data("cannot encode the snapshot")
                }
            };
            Some((Ok::<Event, Infallible>(event), (node, tick, permit)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::view::{View, ViewLimits};
    use macula_wire::status::{StatusLink, StatusReport, StatusTotals};

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn status(of: NodeId, links: &[(NodeId, Option<NodeId>)], published: u64) -> NodeStatus {
        NodeStatus {
            node_id: of,
            addrs: vec![],
            agent: "macula/test".into(),
            uptime_ms: 5_500,
            ready: true,
            reachability: "public".into(),
            links: links
                .iter()
                .map(|(n, via)| StatusLink {
                    node_id: *n,
                    relayed_via: *via,
                    rtt_us: 100 + u64::from(n.as_bytes()[0]),
                    outbound: true,
                })
                .collect(),
            links_omitted: 1,
            clients: 2,
            totals: StatusTotals {
                published,
                dht_lookups: 4,
                dht_lookup_hops: 6,
                ..StatusTotals::default()
            },
        }
    }

    /// A sees B (direct) and C (relayed through B); B reports D, which A
    /// does not know: D is `seen`; the A-C link is relayed whoever says so.
    #[test]
    fn the_mesh_of_a_view() {
        let (a, b, c, d) = (id(1), id(2), id(3), id(4));
        let mut v = View::new(
            a,
            ViewLimits {
                max_peers: 8,
                stale_after: Millis(10_000),
                min_answer_interval: Millis(250),
                rate_window: Millis(10_000),
            },
            0,
        );
        for (t, published) in [(0u64, 0u64), (2_000, 50)] {
            v.record_local(Millis(t), status(a, &[(b, None), (c, Some(b))], published));
            let (asks, _) = v.round(Millis(t), &[b, c]);
            for (peer, nonce) in asks {
                let report = if peer == b {
                    StatusReport {
                        nonce,
                        status: Some(Box::new(status(b, &[(a, None), (c, None), (d, None)], 0))),
                        refused: String::new(),
                    }
                } else {
                    StatusReport {
                        nonce,
                        status: None,
                        refused: "not allowed".into(),
                    }
                };
                v.on_report(peer, report, Millis(t + 5)).expect("taken");
            }
        }
        let known: Vec<(NodeId, Known)> =
            v.known().into_iter().map(|(i, k)| (i, k.clone())).collect();
        let (nodes, links) = mesh(a, &known, Millis(3_000));
        let source = |n: NodeId| {
            nodes
                .iter()
                .find(|x| x.node_id == n.to_string())
                .map(|x| x.source.clone())
        };
        assert_eq!(nodes[0].node_id, a.to_string());
        assert_eq!(source(a).as_deref(), Some("self"));
        assert_eq!(source(b).as_deref(), Some("peer"));
        assert_eq!(source(c).as_deref(), Some("peer"));
        assert_eq!(source(d).as_deref(), Some("seen"));
        let c_node = nodes
            .iter()
            .find(|x| x.node_id == c.to_string())
            .expect("c");
        assert_eq!(c_node.refused.as_deref(), Some("not allowed"));
        assert!(c_node.status.is_none());
        assert_eq!(nodes[1].age_ms, 995, "B reported at 2005");
        let a_status = nodes[0].status.as_ref().expect("a's status");
        assert_eq!(a_status.rates["published"], 25.0);
        assert_eq!(a_status.dht_mean_hops, 1.5);
        assert_eq!(a_status.peers, 3, "two listed, one omitted");
        assert_eq!(a_status.uptime_secs, 5);
        // A-B, A-C (relayed via B), B-C, B-D: each once.
        assert_eq!(links.len(), 4, "{links:#?}");
        let link = |x: NodeId, y: NodeId| {
            links
                .iter()
                .find(|l| {
                    (l.a == x.to_string() && l.b == y.to_string())
                        || (l.a == y.to_string() && l.b == x.to_string())
                })
                .unwrap_or_else(|| panic!("no link {x}-{y}: {links:#?}"))
        };
        assert_eq!(link(a, b).kind, "direct");
        assert_eq!(link(a, b).reported_by.len(), 2, "both ends");
        assert_eq!(link(a, c).kind, "relayed");
        assert_eq!(link(a, c).relayed_via, Some(b.to_string()));
        assert_eq!(link(b, d).reported_by, vec![b.to_string()]);
        assert!(links.iter().all(|l| l.a < l.b));
    }
}
