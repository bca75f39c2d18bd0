//! Pub/sub on one node: subscriptions, matching and in-process delivery.
//!
//! `publish` matches the topic against every local subscription (through the
//! `macula_pubsub::Sublist` trie and its cache) and pushes one event into each
//! matching subscription's bounded queue; a `Subscription` is a
//! `futures::Stream` that drains it. Local delivery never touches the
//! network. Delivery to other nodes (interest in the DHT, one copy per
//! interested node) builds on this and is not here yet.
//!
//! Flow control: each queue is bounded (`Limits::queue_capacity`, default
//! 1024). A subscriber that falls behind loses its *oldest* events, never
//! blocks the publisher or other subscribers, and is told: the stream yields
//! `SubscriptionItem::Lagged(n)` before the next event. Every drop is counted.
//!
//! This module must not block on a subscriber, and must not hold its lock
//! while waking one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::task::AtomicWaker;
use macula_pubsub::{BoundedQueue, Limits, Pattern, Sublist, Topic, TopicError};
use macula_wire::NodeId;

/// Headers on one message; more is `PubSubError::TooManyHeaders`.
pub const MAX_HEADERS: usize = 32;
/// Length of one header name.
pub const MAX_HEADER_NAME_LEN: usize = 64;
/// Length of one header value.
pub const MAX_HEADER_VALUE_LEN: usize = 1024;
/// Room kept in a frame for topic, headers and framing, so any payload we
/// accept locally also fits one frame when it is sent to another node.
pub const FRAME_HEADROOM: usize = 64 * 1024;
/// Subscriptions one node holds; a bound on memory and on fan-out cost.
pub const MAX_SUBSCRIPTIONS: usize = 100_000;

/// Why a publish or subscribe was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PubSubError {
    #[error("invalid topic {topic:?}: {source}")]
    InvalidTopic { topic: String, source: TopicError },
    #[error("invalid pattern {pattern:?}: {source}")]
    InvalidPattern { pattern: String, source: TopicError },
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("{n} headers, the limit is {MAX_HEADERS}")]
    TooManyHeaders { n: usize },
    #[error("header {name:?} is too long (name <= {MAX_HEADER_NAME_LEN}, value <= {MAX_HEADER_VALUE_LEN} bytes)")]
    HeaderTooLong { name: String },
    #[error("this node already has {max} subscriptions")]
    TooManySubscriptions { max: usize },
}

/// One delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub topic: String,
    pub payload: Bytes,
    /// The node that published it.
    pub publisher: NodeId,
    /// Publisher's sequence number (per publisher epoch, from 1): events of
    /// one publisher arrive in this order, without duplicates.
    pub seq: u64,
    /// Identifies the publisher's run (Unix ms of its start): `seq` restarts
    /// at 1 when it changes.
    pub epoch: u64,
    pub headers: Vec<(String, String)>,
    /// Application message ID, if the publisher set one.
    pub message_id: Option<String>,
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionItem {
    Event(Event),
    /// The subscriber was too slow: this many older events were dropped.
    Lagged(u64),
}

/// Options of `publish_with`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
}

/// Counters, read by the metrics collector.
#[derive(Debug, Default)]
pub struct PubSubCounters {
    pub published_total: AtomicU64,
    /// Events pushed into local subscription queues.
    pub delivered_local_total: AtomicU64,
    /// Events dropped from full queues (slow subscribers).
    pub dropped_slow_total: AtomicU64,
    pub subscriptions: AtomicU64,
}

impl PubSubCounters {
    fn rows(&self) -> [(&'static str, &'static str, u64); 4] {
        let g = |a: &AtomicU64| a.load(Relaxed);
        [
            (
                "macula_pubsub_published_total",
                "Messages published on this node.",
                g(&self.published_total),
            ),
            (
                "macula_pubsub_delivered_local_total",
                "Events queued to local subscriptions.",
                g(&self.delivered_local_total),
            ),
            (
                "macula_pubsub_dropped_slow_total",
                "Events dropped from full subscription queues (slow subscribers).",
                g(&self.dropped_slow_total),
            ),
            (
                "macula_pubsub_subscriptions",
                "Live subscriptions on this node.",
                g(&self.subscriptions),
            ),
        ]
    }
}

/// Exposes a node's pub/sub counters to its metrics registry.
#[derive(Debug, Clone)]
pub struct PubSubCollector(pub Arc<PubSubCounters>);

impl prometheus_client::collector::Collector for PubSubCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        crate::metrics::encode_rows(&mut encoder, &self.0.rows())
    }
}

struct SubQueue {
    queue: Mutex<BoundedQueue<Event>>,
    waker: AtomicWaker,
    closed: AtomicBool,
}

impl SubQueue {
    fn lock(&self) -> MutexGuard<'_, BoundedQueue<Event>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    sublist: Sublist<u64>,
    subs: HashMap<u64, (Pattern, Arc<SubQueue>)>,
    next_id: u64,
}

struct Inner {
    node_id: NodeId,
    epoch: u64,
    next_seq: AtomicU64,
    max_payload: usize,
    limits: Limits,
    state: Mutex<State>,
    counters: Arc<PubSubCounters>,
}

/// A node's pub/sub. Cheap to clone.
#[derive(Clone)]
pub struct PubSub(Arc<Inner>);

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field(
                "subscriptions",
                &self.0.counters.subscriptions.load(Relaxed),
            )
            .finish()
    }
}

fn check_headers(headers: &[(String, String)]) -> Result<(), PubSubError> {
    if headers.len() > MAX_HEADERS {
        return Err(PubSubError::TooManyHeaders { n: headers.len() });
    }
    match headers
        .iter()
        .find(|(k, v)| k.len() > MAX_HEADER_NAME_LEN || v.len() > MAX_HEADER_VALUE_LEN)
    {
        Some((k, _)) => Err(PubSubError::HeaderTooLong { name: k.clone() }),
        None => Ok(()),
    }
}

impl PubSub {
    /// Pub/sub for node `node_id`; payloads up to `max_frame_size` minus
    /// `FRAME_HEADROOM`.
    pub fn new(node_id: NodeId, max_frame_size: u32, limits: Limits) -> PubSub {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        PubSub(Arc::new(Inner {
            node_id,
            epoch,
            next_seq: AtomicU64::new(1),
            max_payload: (max_frame_size as usize).saturating_sub(FRAME_HEADROOM),
            state: Mutex::new(State {
                sublist: Sublist::with_limits(&limits),
                subs: HashMap::new(),
                next_id: 1,
            }),
            limits,
            counters: Arc::new(PubSubCounters::default()),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counters(&self) -> &Arc<PubSubCounters> {
        &self.0.counters
    }

    /// Largest payload `publish` accepts.
    pub fn max_payload(&self) -> usize {
        self.0.max_payload
    }

    /// Subscribes to `pattern` (`*` one segment, `**` any number). Events
    /// published after this returns are delivered; dropping the subscription
    /// unsubscribes.
    pub fn subscribe(&self, pattern: &str) -> Result<Subscription, PubSubError> {
        let parsed = Pattern::with_limits(pattern, &self.0.limits).map_err(|source| {
            PubSubError::InvalidPattern {
                pattern: pattern.to_string(),
                source,
            }
        })?;
        let queue = Arc::new(SubQueue {
            queue: Mutex::new(BoundedQueue::with_limits(&self.0.limits)),
            waker: AtomicWaker::new(),
            closed: AtomicBool::new(false),
        });
        let id = {
            let mut st = self.state();
            if st.subs.len() >= MAX_SUBSCRIPTIONS {
                return Err(PubSubError::TooManySubscriptions {
                    max: MAX_SUBSCRIPTIONS,
                });
            }
            let id = st.next_id;
            st.next_id += 1;
            st.sublist.insert(&parsed, id);
            st.subs.insert(id, (parsed.clone(), queue.clone()));
            self.0
                .counters
                .subscriptions
                .store(st.subs.len() as u64, Relaxed);
            id
        };
        Ok(Subscription {
            id,
            pattern: parsed,
            queue,
            owner: Arc::downgrade(&self.0),
        })
    }

    /// Publishes `payload` on `topic` (no wildcards) to every matching
    /// subscription. Returns the event's sequence number.
    pub fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PublishOptions,
    ) -> Result<u64, PubSubError> {
        let parsed = Topic::with_limits(topic, &self.0.limits).map_err(|source| {
            PubSubError::InvalidTopic {
                topic: topic.to_string(),
                source,
            }
        })?;
        if payload.len() > self.0.max_payload {
            return Err(PubSubError::PayloadTooLarge {
                len: payload.len(),
                max: self.0.max_payload,
            });
        }
        check_headers(&opts.headers)?;
        let seq = self.0.next_seq.fetch_add(1, Relaxed);
        let event = Event {
            topic: parsed.as_str().to_string(),
            payload,
            publisher: self.0.node_id,
            seq,
            epoch: self.0.epoch,
            headers: opts.headers,
            message_id: opts.message_id,
        };
        self.0.counters.published_total.fetch_add(1, Relaxed);
        self.deliver_local(&parsed, event);
        Ok(seq)
    }

    /// Pushes `event` into every local subscription matching `topic`. The
    /// queues to wake are collected under the lock; waking happens after.
    fn deliver_local(&self, topic: &Topic, event: Event) {
        let targets: Vec<Arc<SubQueue>> = {
            let mut st = self.state();
            let ids = st.sublist.matches(topic);
            ids.iter()
                .filter_map(|id| st.subs.get(id).map(|(_, q)| q.clone()))
                .collect()
        };
        let c = &self.0.counters;
        for q in targets {
            if q.lock().push(event.clone()).is_some() {
                c.dropped_slow_total.fetch_add(1, Relaxed);
            }
            c.delivered_local_total.fetch_add(1, Relaxed);
            q.waker.wake();
        }
    }

    /// Patterns currently subscribed, with how many subscriptions each.
    pub fn subscriptions(&self) -> Vec<(String, usize)> {
        let st = self.state();
        let mut by: HashMap<&str, usize> = HashMap::new();
        for (p, _) in st.subs.values() {
            *by.entry(p.as_str()).or_default() += 1;
        }
        let mut v: Vec<_> = by.into_iter().map(|(p, n)| (p.to_string(), n)).collect();
        v.sort();
        v
    }
}

/// A live subscription: a `Stream` of `SubscriptionItem`s. Dropping it
/// unsubscribes.
pub struct Subscription {
    id: u64,
    pattern: Pattern,
    queue: Arc<SubQueue>,
    owner: Weak<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern.as_str())
            .finish()
    }
}

impl Subscription {
    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    /// Events waiting in this subscription's queue.
    pub fn pending(&self) -> usize {
        self.queue.lock().len()
    }
}

impl futures::Stream for Subscription {
    type Item = SubscriptionItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Register first, then look: a push between the two wakes us.
        this.queue.waker.register(cx.waker());
        let mut q = this.queue.lock();
        let lagged = q.take_lagged();
        if lagged > 0 {
            return Poll::Ready(Some(SubscriptionItem::Lagged(lagged)));
        }
        if let Some(e) = q.pop() {
            return Poll::Ready(Some(SubscriptionItem::Event(e)));
        }
        if this.queue.closed.load(Relaxed) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.queue.closed.store(true, Relaxed);
        let Some(inner) = self.owner.upgrade() else {
            return;
        };
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.sublist.remove(&self.pattern, &self.id);
        st.subs.remove(&self.id);
        inner
            .counters
            .subscriptions
            .store(st.subs.len() as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn ps(queue_capacity: usize) -> PubSub {
        PubSub::new(
            NodeId::from_bytes([1; 32]),
            macula_wire::DEFAULT_MAX_FRAME_SIZE,
            Limits {
                queue_capacity,
                ..Limits::default()
            },
        )
    }

    fn publish(p: &PubSub, topic: &str, body: &str) {
        p.publish(
            topic,
            Bytes::from(body.to_string()),
            PublishOptions::default(),
        )
        .unwrap();
    }

    fn drain(s: &mut Subscription) -> Vec<SubscriptionItem> {
        let mut out = Vec::new();
        while let Some(Some(item)) = s.next().now_or_never() {
            out.push(item);
        }
        out
    }

    fn topics(items: &[SubscriptionItem]) -> Vec<String> {
        items
            .iter()
            .filter_map(|i| match i {
                SubscriptionItem::Event(e) => Some(e.topic.clone()),
                SubscriptionItem::Lagged(_) => None,
            })
            .collect()
    }

    use futures::FutureExt;

    #[test]
    fn wildcard_matrix_through_subscriptions() {
        let p = ps(64);
        let cases: &[(&str, &[&str])] = &[
            (
                "sensor.**",
                &[
                    "sensor",
                    "sensor.temp",
                    "sensor.temp.room1",
                    "sensor.temp.room1.extra",
                ],
            ),
            ("sensor.*.room1", &["sensor.temp.room1"]),
            ("sensor.*", &["sensor.temp"]),
            (
                "**",
                &[
                    "sensor",
                    "sensor.temp",
                    "sensor.temp.room1",
                    "sensor.temp.room1.extra",
                    "orders.new",
                ],
            ),
            ("orders.new", &["orders.new"]),
        ];
        let mut subs: Vec<_> = cases
            .iter()
            .map(|(pat, _)| p.subscribe(pat).unwrap())
            .collect();
        for t in [
            "sensor",
            "sensor.temp",
            "sensor.temp.room1",
            "sensor.temp.room1.extra",
            "orders.new",
        ] {
            publish(&p, t, "x");
        }
        for ((pat, want), sub) in cases.iter().zip(subs.iter_mut()) {
            assert_eq!(topics(&drain(sub)), *want, "pattern {pat}");
        }
    }

    #[test]
    fn events_carry_publisher_order_and_options() {
        let p = ps(64);
        let mut s = p.subscribe("a.*").unwrap();
        let opts = PublishOptions {
            headers: vec![("k".into(), "v".into())],
            message_id: Some("m-1".into()),
        };
        p.publish("a.b", Bytes::from_static(b"1"), opts.clone())
            .unwrap();
        publish(&p, "a.c", "2");
        let items = drain(&mut s);
        let SubscriptionItem::Event(first) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(first.headers, opts.headers);
        assert_eq!(first.message_id.as_deref(), Some("m-1"));
        assert_eq!(first.publisher, NodeId::from_bytes([1; 32]));
        let SubscriptionItem::Event(second) = &items[1] else {
            panic!("{items:?}")
        };
        assert_eq!(second.seq, first.seq + 1);
        assert_eq!(second.epoch, first.epoch);
    }

    #[test]
    fn slow_subscriber_lags_without_slowing_others() {
        let p = ps(4);
        let mut slow = p.subscribe("t").unwrap();
        let mut fast = p.subscribe("t").unwrap();
        // The fast one reads after every publish; the slow one never does.
        let mut fast_got = 0;
        for i in 0..10 {
            publish(&p, "t", &i.to_string());
            fast_got += drain(&mut fast).len();
        }
        assert_eq!(fast_got, 10, "the fast one lost nothing");
        // The slow one lost the 6 oldest, is told so, then gets the newest 4.
        let items = drain(&mut slow);
        assert_eq!(items[0], SubscriptionItem::Lagged(6));
        let bodies: Vec<_> = items[1..]
            .iter()
            .map(|i| match i {
                SubscriptionItem::Event(e) => String::from_utf8_lossy(&e.payload).into_owned(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(bodies, ["6", "7", "8", "9"]);
        assert_eq!(p.counters().dropped_slow_total.load(Relaxed), 6);
    }

    #[test]
    fn dropping_unsubscribes() {
        let p = ps(8);
        let s = p.subscribe("x.**").unwrap();
        let _other = p.subscribe("x.**").unwrap();
        assert_eq!(p.subscriptions(), vec![("x.**".to_string(), 2)]);
        drop(s);
        assert_eq!(p.subscriptions(), vec![("x.**".to_string(), 1)]);
        assert_eq!(p.counters().subscriptions.load(Relaxed), 1);
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let p = ps(8);
        let err = p.subscribe("a..b").unwrap_err();
        assert!(matches!(err, PubSubError::InvalidPattern { .. }), "{err}");
        let err = p
            .publish("a.*", Bytes::new(), PublishOptions::default())
            .unwrap_err();
        assert!(matches!(err, PubSubError::InvalidTopic { .. }), "{err}");
        let big = Bytes::from(vec![0u8; p.max_payload() + 1]);
        let err = p.publish("a", big, PublishOptions::default()).unwrap_err();
        assert!(matches!(err, PubSubError::PayloadTooLarge { .. }), "{err}");
        let opts = PublishOptions {
            headers: vec![("h".into(), "v".into()); MAX_HEADERS + 1],
            message_id: None,
        };
        let err = p.publish("a", Bytes::new(), opts).unwrap_err();
        assert_eq!(err, PubSubError::TooManyHeaders { n: MAX_HEADERS + 1 });
        assert_eq!(p.counters().published_total.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_waiting_subscriber_is_woken() {
        let p = ps(8);
        let mut s = p.subscribe("wake.up").unwrap();
        let waiter = tokio::spawn(async move { s.next().await });
        tokio::task::yield_now().await;
        publish(&p, "wake.up", "now");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken in time")
            .expect("task");
        assert!(matches!(got, Some(SubscriptionItem::Event(e)) if e.payload == "now"));
    }
}
