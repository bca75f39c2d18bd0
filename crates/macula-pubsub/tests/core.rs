//! `PubSubCore` with virtual time: interest records and their puts, routes
//! and the interest cache, queues, batches sized to the receiver, stalls,
//! dedup, stale interest, gateways' client feeds and clients. Two or three
//! cores talk through in-memory "networks": what one sender encodes is what
//! the other's `handle_batch` gets.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use macula_pubsub::{
    segment_name, Action, BatchReceiver, Config, Enqueued, Event, Interest, InterestPut,
    InterestRecord, Millis, OutMsg, Overflow, Patience, PeerDown, PeerRef, PubSubCore, PubSubError,
    PublishOptions, RecordForm, Role, Route, RouteStep, Stall, Transmit,
};
use macula_wire::frame::FrameDecoder;
use macula_wire::{NodeId, Publish};
use prometheus_client::metrics::counter::Counter;

type Core = PubSubCore<u32, ()>;

const REALM: &str = "r";

fn id(b: u8) -> NodeId {
    NodeId::from_bytes([b; 32])
}

fn config(me: u8, role: Role) -> Config {
    let mut c = Config::new(id(me), 100 + u64::from(me), REALM, role, 1 << 20);
    // These tests' node IDs are not derived from keys: forwarded batches
    // are unsealed here (tests/proof.rs covers seals).
    c.require_proof = false;
    c
}

fn node(me: u8) -> Core {
    PubSubCore::new(config(me, Role::Node))
}

fn ms(n: u64) -> Millis {
    Millis(n)
}

fn actions(c: &mut Core) -> Vec<Action<()>> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn puts(acts: &[Action<()>]) -> Vec<InterestPut> {
    acts.iter()
        .filter_map(|a| match a {
            Action::PutInterest(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn lookups(acts: &[Action<()>]) -> Vec<String> {
    acts.iter()
        .filter_map(|a| match a {
            Action::LookupInterest { name, key } => {
                assert_eq!(*key, macula_wire::dht_key(name.as_bytes()));
                Some(name.clone())
            }
            _ => None,
        })
        .collect()
}

fn starts(acts: &[Action<()>]) -> Vec<(PeerRef, NodeId)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Start { peer, node, .. } => Some((*peer, *node)),
            _ => None,
        })
        .collect()
}

fn value(p: &InterestPut) -> String {
    String::from_utf8(p.value.clone()).unwrap()
}

fn name(segment: &str) -> String {
    segment_name(REALM, segment)
}

fn record(node: u8, seq: u64, patterns: &str) -> InterestRecord {
    InterestRecord {
        publisher: id(node),
        seq,
        value: patterns.as_bytes().to_vec(),
    }
}

/// A stand-in DHT: what each rendezvous name holds.
#[derive(Default)]
struct Dht(HashMap<String, Vec<InterestRecord>>);

impl Dht {
    fn with(records: &[(&str, InterestRecord)]) -> Dht {
        let mut d = Dht::default();
        for (segment, r) in records {
            d.0.entry(name(segment)).or_default().push(r.clone());
        }
        d
    }

    /// Answers every lookup in `acts`.
    fn answer(&self, c: &mut Core, acts: &[Action<()>], now: Millis) {
        for n in lookups(acts) {
            let found = self.0.get(&n).cloned().unwrap_or_default();
            c.handle_interest_found(&n, Ok(found), now);
        }
    }
}

/// Routes `topic`, answering lookups from `dht` at once; returns the route
/// and the other actions seen.
fn route(c: &mut Core, dht: &Dht, topic: &str, now: Millis) -> Arc<Route> {
    for _ in 0..4 {
        let step = c.route(topic, now, Patience::Wait).expect("valid topic");
        let acts = actions(c);
        match step {
            RouteStep::Ready(r) => return r,
            RouteStep::Wait { .. } => dht.answer(c, &acts, now),
        }
    }
    panic!("no route after the lookups were answered");
}

fn nodes(r: &Route) -> Vec<NodeId> {
    let mut v: Vec<NodeId> = r.nodes().copied().collect();
    v.sort();
    v
}

fn publish(c: &mut Core, r: &Route, body: &str, now: Millis) -> u64 {
    let mut out = Vec::new();
    c.publish_routed(
        r,
        Bytes::from(body.to_string()),
        PublishOptions::default(),
        now,
        &mut out,
    )
    .expect("publish")
    .seq
}

/// Drains `peer`'s queue like a sender: encodes to its frame limit and
/// returns the PUBLISH_BATCH frame bodies.
fn transmit(c: &mut Core, peer: PeerRef, now: Millis) -> Vec<Bytes> {
    transmit_frames(c, peer, now)
        .into_iter()
        .filter(|(t, _)| *t == macula_wire::MessageType::PublishBatch as u8)
        .map(|(_, b)| b)
        .collect()
}

/// Like `transmit`, every frame: (type, body), loss reports included.
fn transmit_frames(c: &mut Core, peer: PeerRef, now: Millis) -> Vec<(u8, Bytes)> {
    let mut msgs: Vec<OutMsg> = Vec::new();
    let Transmit::Batch(b) = c.poll_transmit(peer, &mut msgs, now) else {
        return Vec::new();
    };
    let mut buf = Vec::new();
    let encoded = b.encode(&mut buf, &msgs);
    c.handle_written(peer, &b, &msgs, encoded, now);
    let dec = FrameDecoder::new(b.frame_limit);
    let mut frames = Vec::new();
    let mut rest = &buf[..];
    while let Some((f, used)) = dec
        .decode(rest)
        .expect("frames within the receiver's limit")
    {
        frames.push((f.header.msg_type, Bytes::copy_from_slice(f.body)));
        rest = &rest[used..];
    }
    frames
}

/// Delivers frame bodies from `from` to `to`; returns (sink, payload) per
/// local event.
fn receive(to: &mut Core, from: u8, bodies: &[Bytes], now: Millis) -> Vec<(u32, String)> {
    let t = macula_wire::MessageType::PublishBatch as u8;
    let frames: Vec<(u8, Bytes)> = bodies.iter().map(|b| (t, b.clone())).collect();
    receive_frames(to, from, &frames, &mut BatchReceiver::new(false), now)
}

/// Delivers frames from `from` to `to` through `rx`; returns (sink,
/// payload) per local event, and (sink, "lagged N") where a loss report
/// told a subscription of N missed events.
fn receive_frames(
    to: &mut Core,
    from: u8,
    frames: &[(u8, Bytes)],
    rx: &mut BatchReceiver<u32>,
    now: Millis,
) -> Vec<(u32, String)> {
    let mut got = Vec::new();
    for (t, b) in frames {
        to.handle_batch(id(from), *t, b, rx, now)
            .expect("a well-formed frame");
        rx.deliver_lagged(|s, n| got.push((*s, format!("lagged {n}"))));
        rx.deliver(|s, events| {
            for e in events.drain(..) {
                got.push((*s, String::from_utf8_lossy(&e.payload).into_owned()));
            }
        });
    }
    got
}

fn counter(c: &Core, f: impl Fn(&macula_pubsub::Counters) -> &Counter) -> u64 {
    f(c.counters()).get()
}

// ----- interest records ---------------------------------------------------

#[test]
fn a_subscription_puts_its_record_and_concurrent_changes_share_puts() {
    let mut c = node(1);
    assert!(!c.has_actions());
    let a = c.subscribe("news.*", 1).unwrap();
    assert!(c.has_actions(), "a put to do");
    let Interest::Record { name: n, changes } = a.interest.clone() else {
        panic!("{:?}", a.interest)
    };
    assert_eq!(n, name("news"));
    let acts = actions(&mut c);
    assert!(!c.has_actions());
    let p = puts(&acts);
    assert_eq!(p.len(), 1);
    assert_eq!(value(&p[0]), "news.*");
    assert_eq!(
        (p[0].changes, p[0].exact, p[0].n_patterns),
        (changes, true, 1)
    );
    assert_eq!(p[0].ttl, macula_pubsub::interest::INTEREST_TTL);
    assert!(!p[0].is_withdrawal());
    assert_eq!(c.interest_outcome(&n, changes), None, "not stored yet");
    assert!(!c.interest_settled());
    // Two more while the put runs: no new put yet.
    let b = c.subscribe("news.sport", 2).unwrap();
    let d = c.subscribe("news.*", 3).unwrap();
    assert!(puts(&actions(&mut c)).is_empty());
    assert_eq!(c.handle_interest_put(&n, p[0].changes, Ok(())), None);
    assert_eq!(c.interest_outcome(&n, changes), Some(Ok(())));
    // One put carries both.
    let p2 = puts(&actions(&mut c));
    assert_eq!(p2.len(), 1);
    assert_eq!(value(&p2[0]), "news.*\nnews.sport");
    let Interest::Record { changes: last, .. } = d.interest else {
        panic!()
    };
    assert_eq!(c.interest_outcome(&n, last), None);
    c.handle_interest_put(&n, p2[0].changes, Ok(()));
    assert_eq!(c.interest_outcome(&n, last), Some(Ok(())));
    assert!(c.interest_settled());
    assert_eq!(c.live_interest_names(), vec![n.clone()]);
    assert_eq!(
        c.subscriptions(),
        vec![("news.*".into(), 2), ("news.sport".into(), 1)]
    );
    assert_eq!(counter(&c, |c| &c.interest_puts_total), 2);
    // An unsubscribe is a change like any other: waited for until a put
    // carrying it is stored.
    let Some(Interest::Record { changes: gone, .. }) = c.unsubscribe(d.id) else {
        panic!()
    };
    assert!(gone > last);
    assert_eq!(c.interest_outcome(&n, gone), None);
    let p = puts(&actions(&mut c));
    assert_eq!(p[0].changes, gone);
    c.handle_interest_put(&n, gone, Ok(()));
    assert_eq!(c.interest_outcome(&n, gone), Some(Ok(())));
    // Dropping the rest: the last put withdraws the record.
    for s in [a.id, b.id] {
        c.unsubscribe(s).unwrap();
    }
    let p3 = puts(&actions(&mut c));
    assert_eq!(p3.len(), 1);
    c.handle_interest_put(&n, p3[0].changes, Ok(()));
    let p4 = puts(&actions(&mut c));
    assert_eq!(p4.len(), 1);
    assert!(p4[0].is_withdrawal());
    c.handle_interest_put(&n, p4[0].changes, Ok(()));
    assert!(c.live_interest_names().is_empty());
    assert_eq!(c.unsubscribe(a.id), None, "already gone");
}

#[test]
fn a_failed_put_fails_its_waiters_and_the_next_change_puts_again() {
    let mut c = node(1);
    let a = c.subscribe("x.y", 1).unwrap();
    let Interest::Record { name: n, changes } = a.interest else {
        panic!()
    };
    let p = puts(&actions(&mut c));
    c.handle_interest_put(&n, p[0].changes, Err("quorum".into()));
    assert_eq!(c.interest_outcome(&n, changes), Some(Err("quorum".into())));
    assert!(
        puts(&actions(&mut c)).is_empty(),
        "no retry without a change"
    );
    // A later change waits for its own put, not the failed one.
    let again = c.subscribe("x.z", 2).unwrap();
    let Interest::Record { changes: later, .. } = again.interest else {
        panic!()
    };
    assert_eq!(c.interest_outcome(&n, later), None);
    let p2 = puts(&actions(&mut c));
    c.handle_interest_put(&n, p2[0].changes, Ok(()));
    assert_eq!(c.interest_outcome(&n, later), Some(Ok(())));
    c.unsubscribe(again.id);
    let p3 = puts(&actions(&mut c));
    c.handle_interest_put(&n, p3[0].changes, Ok(()));
    // A stale report (a put that is not the one running) changes nothing.
    assert_eq!(c.handle_interest_put(&n, 999, Ok(())), None);
    assert_eq!(c.handle_interest_put("ps:r:nope", 1, Ok(())), None);
    c.unsubscribe(a.id);
    let p = puts(&actions(&mut c));
    assert!(p[0].is_withdrawal());
}

#[test]
fn a_record_over_the_limit_is_summarized_and_said_so() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.record_max = 40;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    let subs: Vec<_> = (0..10)
        .map(|i| c.subscribe(&format!("wide.topic.{i}"), i).unwrap())
        .collect();
    let n = name("wide");
    let p = puts(&actions(&mut c));
    // The first put was taken before the others existed.
    assert!(p[0].exact);
    c.handle_interest_put(&n, p[0].changes, Ok(()));
    let p = puts(&actions(&mut c));
    assert!(!p[0].exact);
    assert_eq!(value(&p[0]), "wide.topic.*");
    assert_eq!(p[0].n_patterns, 10);
    assert_eq!(
        c.handle_interest_put(&n, p[0].changes, Ok(())),
        Some(RecordForm::BecameSummary)
    );
    assert_eq!(counter(&c, |c| &c.interest_summarized_total), 1);
    for s in &subs[1..] {
        c.unsubscribe(s.id);
    }
    // The first removal started a put (still a summary); the rest follow it.
    let p = puts(&actions(&mut c));
    assert!(!p[0].exact);
    assert_eq!(c.handle_interest_put(&n, p[0].changes, Ok(())), None);
    let p = puts(&actions(&mut c));
    assert_eq!(value(&p[0]), "wide.topic.0");
    assert_eq!(
        c.handle_interest_put(&n, p[0].changes, Ok(())),
        Some(RecordForm::BecameExact)
    );
}

#[test]
fn a_put_under_way_is_never_forgotten_past_the_limit() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.puts_remembered = 1;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    c.subscribe("a.x", 1).unwrap();
    c.subscribe("b.x", 2).unwrap();
    let under_way = puts(&actions(&mut c));
    let (a, b): (Vec<_>, Vec<_>) = under_way.iter().partition(|p| p.name == name("a"));
    assert_eq!((a.len(), b.len()), (1, 1), "{under_way:?}");
    // b's put completes while a's is still under way: over the limit, but
    // a's is kept (its waiters have no answer yet).
    c.handle_interest_put(&b[0].name, b[0].changes, Ok(()));
    assert_eq!(c.sizes().remembered_puts, 2);
    assert_eq!(c.interest_outcome(&a[0].name, a[0].changes), None);
}

#[test]
fn names_without_a_live_record_are_forgotten_past_the_limit() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.puts_remembered = 1;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    let done = |c: &mut Core| {
        for p in puts(&actions(c)) {
            c.handle_interest_put(&p.name, p.changes, Ok(()));
        }
    };
    let a = c.subscribe("a.x", 1).unwrap();
    done(&mut c);
    c.unsubscribe(a.id);
    done(&mut c);
    assert_eq!(c.sizes().remembered_puts, 1, "at the limit: kept");
    c.subscribe("b.x", 2).unwrap();
    done(&mut c);
    assert_eq!(
        c.sizes().remembered_puts,
        1,
        "a's empty record forgotten, b's live one kept"
    );
    assert_eq!(c.live_interest_names(), vec![name("b")]);
    c.subscribe("c.x", 3).unwrap();
    done(&mut c);
    assert_eq!(
        c.sizes().remembered_puts,
        2,
        "live records are never forgotten"
    );
}

#[test]
fn leaving_withdraws_every_live_record_after_the_puts_under_way() {
    let mut c = node(1);
    c.subscribe("a.x", 1).unwrap();
    c.subscribe("b.x", 2).unwrap();
    let p = puts(&actions(&mut c));
    assert_eq!(p.len(), 2);
    c.handle_interest_put(&p[0].name, p[0].changes, Ok(()));
    c.leave();
    // b's put is still running: only a's withdrawal goes now.
    let w = puts(&actions(&mut c));
    assert_eq!(w.len(), 1);
    assert!(w[0].is_withdrawal() && w[0].name == p[0].name);
    c.handle_interest_put(&p[1].name, p[1].changes, Ok(()));
    let w2 = puts(&actions(&mut c));
    assert!(w2[0].is_withdrawal() && w2[0].name == p[1].name);
    assert!(!c.interest_settled());
    c.handle_interest_put(&w[0].name, w[0].changes, Ok(()));
    c.handle_interest_put(&w2[0].name, w2[0].changes, Ok(()));
    assert!(c.interest_settled());
    // After leaving, changes touch no record and waiters return at once.
    let s = c.subscribe("c.x", 3).unwrap();
    assert!(puts(&actions(&mut c)).is_empty());
    let Interest::Record { name: n, changes } = s.interest else {
        panic!()
    };
    assert_eq!(c.interest_outcome(&n, changes), Some(Ok(())));
}

// ----- routes and the interest cache --------------------------------------

#[test]
fn a_route_comes_from_both_rendezvous_names_and_is_cached_for_the_interest_bound() {
    let dht = Dht::with(&[
        ("orders", record(2, 1, "orders.*")),
        ("orders", record(3, 1, "orders.old")),
        ("orders", record(1, 1, "orders.*")), // ourselves: never a target
        ("*", record(4, 1, "*.new\n**")),
        ("*", record(5, 1, "not a pattern..")),
    ]);
    let mut c = node(1);
    let step = c.route("orders.new", ms(0), Patience::Wait).unwrap();
    assert!(matches!(step, RouteStep::Wait { until: None }), "{step:?}");
    let acts = actions(&mut c);
    assert_eq!(lookups(&acts), vec![name("orders"), name("*")]);
    assert_eq!(c.n_lookups(), 2);
    // Asked again while the lookups run: no second lookup.
    c.route("orders.new", ms(1), Patience::Wait).unwrap();
    assert!(actions(&mut c).is_empty());
    dht.answer(&mut c, &acts, ms(5));
    let r = route(&mut c, &dht, "orders.new", ms(6));
    assert_eq!(nodes(&r), vec![id(2), id(4)]);
    assert_eq!(r.topic(), "orders.new");
    // Cached until 1 s after the lookups *started*.
    let again = c.cached_route("orders.new", ms(999)).expect("cached");
    assert!(Arc::ptr_eq(&r, &again));
    assert!(c.cached_route("orders.new", ms(1000)).is_none());
    assert!(matches!(
        c.route("orders.*", ms(0), Patience::Wait),
        Err(PubSubError::InvalidTopic { .. })
    ));
}

#[test]
fn a_stale_entry_is_refreshed_while_publishes_go_on() {
    let mut dht = Dht::with(&[("t", record(2, 1, "t.*"))]);
    let mut c = node(1);
    let r = route(&mut c, &dht, "t.a", ms(0));
    assert_eq!(nodes(&r), vec![id(2)]);
    // Past the bound: the first publish starts a refresh and waits a little.
    dht.0.get_mut(&name("t")).unwrap().push(record(3, 1, "t.a"));
    let step = c.route("t.a", ms(1500), Patience::Wait).unwrap();
    assert!(
        matches!(
            step,
            RouteStep::Wait {
                until: Some(Millis(1750))
            }
        ),
        "{step:?}"
    );
    let acts = actions(&mut c);
    assert_eq!(lookups(&acts), vec![name("t"), name("*")], "both are stale");
    // Meanwhile another publish uses the stale entry.
    let RouteStep::Ready(stale) = c.route("t.a", ms(1600), Patience::Wait).unwrap() else {
        panic!("stale entry used")
    };
    assert_eq!(nodes(&stale), vec![id(2)]);
    // ... and the route it built is kept while the refresh runs: the
    // publishes meanwhile do not each rebuild it.
    let kept = c
        .cached_route("t.a", ms(1650))
        .expect("kept while refreshing");
    assert!(Arc::ptr_eq(&kept, &stale));
    assert!(matches!(
        c.route("t.a", ms(1660), Patience::Wait).unwrap(),
        RouteStep::Ready(r) if Arc::ptr_eq(&r, &stale)
    ));
    assert!(actions(&mut c).is_empty(), "no lookup started again");
    dht.answer(&mut c, &acts, ms(1700));
    // The refresh finished: the stale route is not used any more.
    assert!(c.cached_route("t.a", ms(1700)).is_none());
    let fresh = route(&mut c, &dht, "t.a", ms(1701));
    assert_eq!(nodes(&fresh), vec![id(2), id(3)]);
    // A route built from a stale entry whose refresh never ends is kept
    // at most until the entry is too old to use (30 s after its lookup
    // started at 1500).
    c.route("t.a", ms(3000), Patience::Wait).unwrap();
    let acts = actions(&mut c);
    assert_eq!(lookups(&acts).len(), 2, "refreshing");
    let RouteStep::Ready(stale) = c.route("t.a", ms(3001), Patience::Wait).unwrap() else {
        panic!("stale entry used")
    };
    let kept = c
        .cached_route("t.a", ms(31_499))
        .expect("kept while refreshing");
    assert!(Arc::ptr_eq(&kept, &stale));
    assert!(c.cached_route("t.a", ms(31_500)).is_none(), "too old");
    // Too old to use stale (30 s): wait for the lookup.
    let step = c.route("t.a", ms(40_000), Patience::Wait).unwrap();
    assert!(matches!(step, RouteStep::Wait { until: None }), "{step:?}");
    // Patience::Now builds from what is known.
    let RouteStep::Ready(now) = c.route("t.a", ms(40_001), Patience::Now).unwrap() else {
        panic!()
    };
    assert_eq!(nodes(&now), vec![id(2), id(3)]);
}

#[test]
fn a_failed_lookup_means_no_targets_for_the_bound_and_keeps_a_good_entry() {
    let mut c = node(1);
    c.route("t.a", ms(0), Patience::Wait).unwrap();
    for n in lookups(&actions(&mut c)) {
        c.handle_interest_found(&n, Err("timeout".into()), ms(10));
    }
    let RouteStep::Ready(r) = c.route("t.a", ms(20), Patience::Wait).unwrap() else {
        panic!("a failure is an answer")
    };
    assert!(nodes(&r).is_empty());
    // Not used stale: after the bound the lookup must be waited for.
    let step = c.route("t.a", ms(1500), Patience::Wait).unwrap();
    assert!(matches!(step, RouteStep::Wait { until: None }));
    let dht = Dht::with(&[("t", record(2, 1, "t.*"))]);
    let acts = actions(&mut c);
    dht.answer(&mut c, &acts, ms(1500));
    let r = route(&mut c, &dht, "t.a", ms(1501));
    assert_eq!(nodes(&r), vec![id(2)]);
    // A failed refresh keeps the good entry: the next publish refreshes
    // again, and uses the entry while that refresh runs.
    c.route("t.a", ms(3000), Patience::Wait).unwrap();
    for n in lookups(&actions(&mut c)) {
        c.handle_interest_found(&n, Err("timeout".into()), ms(3010));
    }
    let step = c.route("t.a", ms(3300), Patience::Wait).unwrap();
    assert!(
        matches!(
            step,
            RouteStep::Wait {
                until: Some(Millis(3550))
            }
        ),
        "{step:?}"
    );
    assert_eq!(lookups(&actions(&mut c)).len(), 2);
    let RouteStep::Ready(r) = c.route("t.a", ms(3551), Patience::Wait).unwrap() else {
        panic!("the stale entry is used")
    };
    assert_eq!(nodes(&r), vec![id(2)]);
}

#[test]
fn the_interest_bound_and_the_stale_limit_are_exact() {
    let dht = Dht::with(&[("t", record(2, 1, "t.*"))]);
    let mut c = node(1);
    route(&mut c, &dht, "t.a", ms(0));
    // 999 ms after the lookups started: still fresh, for a new topic too.
    let RouteStep::Ready(_) = c.route("t.b", ms(999), Patience::Wait).unwrap() else {
        panic!("fresh at 999 ms")
    };
    // At exactly 1 s: stale, refreshed.
    let step = c.route("t.c", ms(1000), Patience::Wait).unwrap();
    assert!(
        matches!(
            step,
            RouteStep::Wait {
                until: Some(Millis(1250))
            }
        ),
        "{step:?}"
    );
    let acts = actions(&mut c);
    for n in lookups(&acts) {
        c.handle_interest_found(&n, Err("lost".into()), ms(1000));
    }
    // At exactly 30 s: too old to use while refreshing.
    let step = c.route("t.d", ms(30_000), Patience::Wait).unwrap();
    assert!(matches!(step, RouteStep::Wait { until: None }), "{step:?}");
}

#[test]
fn the_route_cache_keeps_fresh_routes_when_full() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.route_cache_capacity = 2;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    let dht = Dht::default();
    route(&mut c, &dht, "a.x", ms(0));
    route(&mut c, &dht, "b.x", ms(1200));
    assert_eq!(c.sizes().routes, 2);
    // Full: the expired a.x goes, the fresh b.x stays.
    route(&mut c, &dht, "c.x", ms(1300));
    assert_eq!(c.sizes().routes, 2);
    assert!(c.cached_route("b.x", ms(1300)).is_some());
    assert!(c.cached_route("c.x", ms(1300)).is_some());
}

#[test]
fn a_full_interest_cache_drops_what_is_too_old_to_use_first() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.cache_capacity = 2;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    let found =
        |c: &mut Core, n: &str, at: u64| c.handle_interest_found(&name(n), Ok(vec![]), ms(at));
    found(&mut c, "x", 0);
    found(&mut c, "y", 35_000);
    assert_eq!(c.sizes().interest_entries, 2);
    // A refresh of a known name never evicts.
    found(&mut c, "y", 35_500);
    assert_eq!(c.sizes().interest_entries, 2);
    // x is over 30 s old: it goes, y stays.
    found(&mut c, "z", 36_000);
    assert_eq!(c.sizes().interest_entries, 2);
    let step = c.route("y.a", ms(36_000), Patience::Now).unwrap();
    assert!(matches!(step, RouteStep::Ready(_)));
    assert_eq!(
        lookups(&actions(&mut c)),
        vec![name("*")],
        "y was kept (fresh), only the realm-wide name is missing"
    );
}

#[test]
fn a_full_interest_cache_drops_every_entry_exactly_stale_max_old() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.cache_capacity = 2;
    let stale_max = cfg.interest.stale_max.0;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    let found =
        |c: &mut Core, n: &str, at: u64| c.handle_interest_found(&name(n), Ok(vec![]), ms(at));
    found(&mut c, "x", 0);
    found(&mut c, "y", 0);
    // Both are exactly `stale_max` old: both go (not just the one evicted
    // to make room).
    found(&mut c, "z", stale_max);
    assert_eq!(c.sizes().interest_entries, 1);
}

#[test]
fn a_full_route_cache_drops_every_route_exactly_a_ttl_old() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.route_cache_capacity = 2;
    let ttl = cfg.interest.cache_ttl.0;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    let dht = Dht::default();
    route(&mut c, &dht, "a.x", ms(0));
    // Every name b.x needs is looked up again at `ttl`: its route is that new.
    route(&mut c, &dht, "b.x", ms(ttl));
    assert_eq!(c.sizes().routes, 2);
    // At 2 ttl both are too old, b.x exactly a TTL: both go, c.x is the one left.
    route(&mut c, &dht, "c.x", ms(2 * ttl));
    assert_eq!(c.sizes().routes, 1);
    assert!(c.cached_route("c.x", ms(2 * ttl)).is_some());
}

#[test]
fn the_interest_and_route_caches_are_bounded() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.cache_capacity = 2;
    cfg.interest.route_cache_capacity = 2;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    let dht = Dht::default();
    for (i, t) in ["a.x", "b.x", "c.x"].iter().enumerate() {
        route(&mut c, &dht, t, ms(i as u64));
    }
    // "a" was the oldest name: evicted, so a.x must be looked up again.
    assert!(c.cached_route("a.x", ms(3)).is_none());
    let step = c.route("a.x", ms(3), Patience::Wait).unwrap();
    assert!(matches!(step, RouteStep::Wait { .. }));
    assert!(lookups(&actions(&mut c)).contains(&name("a")));
}

// ----- queues, batches, senders --------------------------------------------

/// A (node 1) routes "t.*" to B (node 2); returns A, the route, B's queue.
fn a_to_b() -> (Core, Arc<Route>, PeerRef) {
    let dht = Dht::with(&[("t", record(2, 1, "t.*"))]);
    let mut a = node(1);
    let r = route(&mut a, &dht, "t.x", ms(0));
    publish(&mut a, &r, "first", ms(0));
    let s = starts(&actions(&mut a));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].1, id(2));
    (a, r, s[0].0)
}

#[test]
fn publishes_reach_the_other_core_in_order_once_each() {
    let (mut a, r, q) = a_to_b();
    let mut b = node(2);
    b.subscribe("t.*", 7).unwrap();
    for i in 0..5 {
        publish(&mut a, &r, &i.to_string(), ms(1));
    }
    assert!(actions(&mut a).is_empty(), "the sender is already running");
    assert_eq!(a.inflight(), 6);
    let bodies = transmit(&mut a, q, ms(2));
    assert_eq!(a.inflight(), 0);
    let got = receive(&mut b, 1, &bodies, ms(3));
    let want: Vec<(u32, String)> = ["first", "0", "1", "2", "3", "4"]
        .iter()
        .map(|s| (7, s.to_string()))
        .collect();
    assert_eq!(got, want);
    // A replay of the same batches is dropped as duplicates.
    assert!(receive(&mut b, 1, &bodies, ms(4)).is_empty());
    assert_eq!(counter(&b, |c| &c.duplicates_dropped_total), 6);
    assert_eq!(counter(&b, |c| &c.received_remote_total), 6);
    assert_eq!(counter(&a, |c| &c.sent_remote_total), 6);
    assert_eq!(counter(&a, |c| &c.published_total), 6);
    assert!(counter(&a, |c| &c.batches_sent_total) >= 1);
    // The queue emptied: the next message wakes the sender.
    publish(&mut a, &r, "again", ms(5));
    assert!(matches!(actions(&mut a)[..], [Action::Wake(())]));
}

#[test]
fn each_subscription_gets_each_event_once_and_gaps_are_counted() {
    let (mut a, r, q) = a_to_b();
    let mut b = node(2);
    b.subscribe("t.*", 1).unwrap();
    b.subscribe("t.x", 2).unwrap();
    b.subscribe("**", 3).unwrap();
    publish(&mut a, &r, "second", ms(0));
    let bodies = transmit(&mut a, q, ms(0));
    let mut rx = BatchReceiver::new(false);
    let t = macula_wire::MessageType::PublishBatch as u8;
    b.handle_batch(id(1), t, &bodies[0], &mut rx, ms(0))
        .unwrap();
    let mut got: Vec<(u32, String)> = Vec::new();
    let n = rx.deliver(|s, events| {
        for e in events.drain(..) {
            got.push((*s, String::from_utf8_lossy(&e.payload).into_owned()));
        }
    });
    assert_eq!(n, 6);
    got.sort();
    let want: Vec<(u32, String)> = [1, 2, 3]
        .iter()
        .flat_map(|s| [(*s, "first".to_string()), (*s, "second".to_string())])
        .collect();
    assert_eq!(got, want);
    // Three messages lost on the way: the next batch says so.
    for i in 0..4 {
        publish(&mut a, &r, &i.to_string(), ms(1));
    }
    let mut bodies = Vec::new();
    let mut msgs = Vec::new();
    if let Transmit::Batch(bt) = a.poll_transmit(q, &mut msgs, ms(2)) {
        let mut buf = Vec::new();
        bt.encode(&mut buf, &msgs[3..]);
        bodies.push(Bytes::copy_from_slice(
            &buf[macula_wire::FRAME_HEADER_LEN..],
        ));
    }
    assert_eq!(receive(&mut b, 1, &bodies, ms(3)).len(), 3);
    assert_eq!(counter(&b, |c| &c.gaps_total), 3);
    assert_eq!(counter(&b, |c| &c.received_remote_total), 3);
}

#[test]
fn batches_are_sized_to_the_receivers_frame_limit() {
    let (mut a, r, q) = a_to_b();
    transmit(&mut a, q, ms(1));
    // B announced 4 KiB frames (its HELLO).
    a.handle_peer_up(&id(2), 4096);
    let big = "x".repeat(1000);
    for _ in 0..20 {
        publish(&mut a, &r, &big, ms(2));
    }
    publish(&mut a, &r, &"y".repeat(5000), ms(2));
    let bodies = transmit(&mut a, q, ms(3));
    assert!(bodies.len() >= 5, "{} frames", bodies.len());
    assert!(bodies.iter().all(|b| b.len() <= 4096));
    let mut b = node(2);
    b.subscribe("t.*", 1).unwrap();
    let got = receive(&mut b, 1, &bodies, ms(4));
    assert_eq!(got.len(), 20, "every message that fits arrives");
    assert_eq!(counter(&a, |c| &c.too_large_for_peer_total), 1);
    assert_eq!(counter(&a, |c| &c.remote_dropped_total), 1);
    assert_eq!(counter(&b, |c| &c.gaps_total), 0);
}

/// A node whose queue to node 2 holds at most `capacity` messages and
/// `bytes` payload bytes, routed for "t.x", with its route.
fn queue_to_node_2(capacity: usize, bytes: usize) -> (Core, Arc<Route>) {
    let mut cfg = config(1, Role::Node);
    cfg.limits.peer_queue_capacity = capacity;
    cfg.limits.peer_queue_bytes = bytes;
    let mut a = PubSubCore::<u32, ()>::new(cfg);
    let dht = Dht::with(&[("t", record(2, 1, "t.*"))]);
    let r = route(&mut a, &dht, "t.x", ms(0));
    (a, r)
}

/// A queue to node 2 of two messages or 10 bytes.
fn two_slot_queue() -> (Core, Arc<Route>) {
    queue_to_node_2(2, 10)
}

/// The queue whose sender the last publish started.
fn started(a: &mut Core) -> PeerRef {
    starts(&actions(a))[0].0
}

fn publish_with(
    a: &mut Core,
    r: &Route,
    body: &str,
    overflow: Overflow,
) -> Result<macula_pubsub::Published, PubSubError> {
    let opts = PublishOptions {
        overflow,
        ..Default::default()
    };
    let mut out = Vec::new();
    a.publish_routed(r, Bytes::from(body.to_string()), opts, ms(0), &mut out)
}

/// What a sender would write to node 2 now, as payloads.
fn drained(a: &mut Core, q: PeerRef) -> Vec<String> {
    let mut msgs: Vec<OutMsg> = Vec::new();
    let Transmit::Batch(b) = a.poll_transmit(q, &mut msgs, ms(0)) else {
        return Vec::new();
    };
    let got = msgs
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    let mut buf = Vec::new();
    let encoded = b.encode(&mut buf, &msgs);
    a.handle_written(q, &b, &msgs, encoded, ms(0));
    got
}

/// Messages a sender removes before encoding (the receiver may not have
/// them: the realm's permissions) leave the queue like written ones and are
/// not counted lost.
#[test]
fn refused_messages_free_the_queue_and_are_not_counted_lost() {
    let (mut a, r) = two_slot_queue();
    publish_with(&mut a, &r, "a", Overflow::Block).unwrap();
    let q = started(&mut a);
    publish_with(&mut a, &r, "b", Overflow::Block).unwrap();
    let mut msgs: Vec<OutMsg> = Vec::new();
    let Transmit::Batch(mut b) = a.poll_transmit(q, &mut msgs, ms(0)) else {
        panic!("a batch");
    };
    assert_eq!(msgs.len(), 2);
    msgs.retain(|m| &m.payload[..] != b"a");
    b.refused += 1;
    let mut buf = Vec::new();
    let encoded = b.encode(&mut buf, &msgs);
    assert_eq!(encoded.messages, 1);
    a.handle_written(q, &b, &msgs, encoded, ms(0));
    assert_eq!(a.counters().remote_dropped_total.get(), 0);
    // Room for two again.
    assert_eq!(a.blocked(&r, 1), None);
    publish_with(&mut a, &r, "c", Overflow::FailFast).unwrap();
    publish_with(&mut a, &r, "d", Overflow::FailFast).unwrap();
    assert!(publish_with(&mut a, &r, "e", Overflow::FailFast).is_err());
}

#[test]
fn block_is_the_default_and_blocked_names_the_full_node_until_a_sender_takes_the_queue() {
    assert_eq!(PublishOptions::default().overflow, Overflow::Block);
    let (mut a, r) = two_slot_queue();
    assert_eq!(a.blocked(&r, 1), None, "an empty queue has room");
    publish_with(&mut a, &r, "a", Overflow::Block).unwrap();
    let q = started(&mut a);
    publish_with(&mut a, &r, "b", Overflow::Block).unwrap();
    assert_eq!(a.blocked(&r, 1), Some(id(2)), "two messages: full by count");
    assert_eq!(drained(&mut a, q), ["a", "b"]);
    assert_eq!(a.blocked(&r, 1), None, "taken by the sender: room again");
    publish_with(&mut a, &r, "12345678", Overflow::Block).unwrap();
    assert_eq!(a.blocked(&r, 2), None, "8 + 2 bytes fit the 10-byte limit");
    assert_eq!(a.blocked(&r, 3), Some(id(2)), "8 + 3 bytes do not");
    assert_eq!(counter(&a, |c| &c.remote_dropped_total), 0);
}

#[test]
fn an_empty_queue_takes_a_message_larger_than_its_byte_limit() {
    let (mut a, r) = two_slot_queue();
    let big = "x".repeat(11);
    assert_eq!(
        a.blocked(&r, big.len()),
        None,
        "else Block would wait forever"
    );
    let p = publish_with(&mut a, &r, &big, Overflow::Block).unwrap();
    let q = started(&mut a);
    assert_eq!((p.queued, p.dropped), (1, 0));
    assert_eq!(a.blocked(&r, 1), Some(id(2)));
    assert_eq!(drained(&mut a, q), [big]);
}

#[test]
fn drop_newest_drops_the_new_message_for_the_full_node_and_counts_it() {
    let (mut a, r) = two_slot_queue();
    for body in ["a", "b", "c"] {
        publish_with(&mut a, &r, body, Overflow::DropNewest).unwrap();
    }
    let q = started(&mut a);
    assert_eq!(drained(&mut a, q), ["a", "b"]);
    assert_eq!(counter(&a, |c| &c.remote_dropped_total), 1);
    assert_eq!(counter(&a, |c| &c.remote_evicted_total), 0);
    assert_eq!(counter(&a, |c| &c.published_total), 3);
}

#[test]
fn drop_oldest_makes_room_by_dropping_the_oldest_queued_and_counts_them() {
    let (mut a, r) = two_slot_queue();
    let mut evicted = 0;
    for body in ["a", "b", "c", "d"] {
        let p = publish_with(&mut a, &r, body, Overflow::DropOldest).unwrap();
        assert_eq!((p.queued, p.dropped), (1, 0), "{body} is always queued");
        evicted += p.evicted;
    }
    let q = started(&mut a);
    assert_eq!(evicted, 2);
    assert_eq!(drained(&mut a, q), ["c", "d"]);
    // By bytes: "1234567" then "abcd" (7 + 4 > 10) drops the first.
    publish_with(&mut a, &r, "1234567", Overflow::DropOldest).unwrap();
    let p = publish_with(&mut a, &r, "abcd", Overflow::DropOldest).unwrap();
    assert_eq!(p.evicted, 1);
    assert_eq!(drained(&mut a, q), ["abcd"]);
    // Eviction frees exactly the evicted bytes: "12345" + "123" = 8, then
    // "wxyz" (8 + 4 > 10) drops "12345" alone and fits beside "123".
    publish_with(&mut a, &r, "12345", Overflow::DropOldest).unwrap();
    publish_with(&mut a, &r, "123", Overflow::DropOldest).unwrap();
    let p = publish_with(&mut a, &r, "wxyz", Overflow::DropOldest).unwrap();
    assert_eq!(p.evicted, 1);
    assert_eq!(drained(&mut a, q), ["123", "wxyz"]);
    assert_eq!(counter(&a, |c| &c.remote_evicted_total), 4);
    assert_eq!(counter(&a, |c| &c.remote_dropped_total), 4);
    assert_eq!(a.inflight(), 0, "evicted messages are not in flight");
}

#[test]
fn after_an_eviction_the_queue_counts_exactly_the_bytes_left() {
    let (mut a, r) = queue_to_node_2(10, 10);
    publish_with(&mut a, &r, "12", Overflow::DropOldest).unwrap();
    let q = started(&mut a);
    publish_with(&mut a, &r, "12345678", Overflow::DropOldest).unwrap();
    // 10 bytes queued; one more byte evicts "12" and leaves 8 + 1 = 9.
    let p = publish_with(&mut a, &r, "1", Overflow::DropOldest).unwrap();
    assert_eq!(p.evicted, 1);
    // 9 + 2 > 10: a two-byte message does not fit.
    let p = publish_with(&mut a, &r, "ab", Overflow::DropNewest).unwrap();
    assert_eq!((p.queued, p.dropped), (0, 1));
    assert_eq!(drained(&mut a, q), ["12345678", "1"]);
}

#[test]
fn fail_fast_publishes_nothing_and_names_the_full_queue() {
    let (mut a, r) = two_slot_queue();
    let s1 = publish_with(&mut a, &r, "a", Overflow::FailFast)
        .unwrap()
        .seq;
    let q = started(&mut a);
    a.subscribe("t.*", 7).unwrap();
    let _ = actions(&mut a);
    publish_with(&mut a, &r, "b", Overflow::FailFast).unwrap();
    let opts = PublishOptions {
        overflow: Overflow::FailFast,
        ..Default::default()
    };
    let mut local = Vec::new();
    let err = a
        .publish_routed(&r, Bytes::from_static(b"c"), opts, ms(0), &mut local)
        .unwrap_err();
    assert!(local.is_empty(), "nor delivered here");
    assert_eq!(
        err,
        PubSubError::QueueFull {
            node: id(2),
            queued: 2,
            bytes: 2
        }
    );
    assert!(err.to_string().contains("nothing was published"), "{err}");
    assert_eq!(counter(&a, |c| &c.publish_refused_total), 1);
    assert_eq!(
        counter(&a, |c| &c.published_total),
        2,
        "no sequence number used"
    );
    assert_eq!(drained(&mut a, q), ["a", "b"]);
    let next = publish_with(&mut a, &r, "d", Overflow::FailFast)
        .unwrap()
        .seq;
    assert_eq!(next, s1 + 2, "the refused publish took no sequence number");
}

#[test]
fn a_full_queue_drops_new_messages_and_counts_them() {
    let (mut a, r) = queue_to_node_2(3, 10);
    let mut out = Vec::new();
    let mut send = |a: &mut Core, body: &str| {
        a.publish_routed(
            &r,
            Bytes::from(body.to_string()),
            PublishOptions::default(),
            ms(0),
            &mut out,
        )
        .unwrap()
    };
    assert_eq!(
        (send(&mut a, "12345").queued, send(&mut a, "12345").queued),
        (1, 1)
    );
    let over_bytes = send(&mut a, "1");
    assert_eq!((over_bytes.queued, over_bytes.dropped), (0, 1));
    let (mut a2, r2) = queue_to_node_2(2, macula_pubsub::outbound::PEER_QUEUE_BYTES);
    for i in 0..5 {
        publish(&mut a2, &r2, &i.to_string(), ms(0));
    }
    assert_eq!(counter(&a2, |c| &c.sent_remote_total), 2);
    assert_eq!(counter(&a2, |c| &c.remote_dropped_total), 3);
    assert_eq!(a2.inflight(), 2);
    assert_eq!(counter(&a, |c| &c.remote_dropped_total), 1);
}

#[test]
fn the_outbound_peer_limit_drops_and_counts() {
    let mut cfg = config(1, Role::Node);
    cfg.limits.max_outbound_peers = 1;
    let mut a = PubSubCore::<u32, ()>::new(cfg);
    let dht = Dht::with(&[("t", record(2, 1, "t.*")), ("t", record(3, 1, "t.*"))]);
    let r = route(&mut a, &dht, "t.x", ms(0));
    let mut out = Vec::new();
    let p = a
        .publish_routed(
            &r,
            Bytes::from_static(b"m"),
            PublishOptions::default(),
            ms(0),
            &mut out,
        )
        .unwrap();
    assert_eq!((p.queued, p.dropped), (1, 1));
    assert_eq!(a.n_peers(), 1);
    assert!(!Enqueued::NoQueue.is_queued());
}

#[test]
fn a_peer_that_accepts_nothing_is_cut_off_at_the_stall_timeout() {
    let (mut a, r, q) = a_to_b();
    let mut msgs = Vec::new();
    let Transmit::Batch(b) = a.poll_transmit(q, &mut msgs, ms(100)) else {
        panic!()
    };
    assert_eq!(b.n, 1);
    publish(&mut a, &r, "queued behind", ms(100));
    let deadline = a.stall_deadline(q).unwrap();
    assert_eq!(
        deadline,
        ms(100).saturating_add(macula_pubsub::outbound::PEER_STALL_TIMEOUT)
    );
    a.handle_progress(q, ms(5_000));
    assert_eq!(a.handle_stall(q, ms(10_100)), Stall::Wait(ms(15_000)));
    assert_eq!(a.handle_stall(q, ms(15_000)), Stall::CutOff { dropped: 2 });
    assert_eq!(counter(&a, |c| &c.peers_cut_off_total), 1);
    assert_eq!(counter(&a, |c| &c.remote_dropped_total), 2);
    assert_eq!(a.inflight(), 0);
    assert!(matches!(
        a.poll_transmit(q, &mut msgs, ms(15_001)),
        Transmit::Retired
    ));
    // Cut off is not unreachable: the next publish starts a new queue.
    let r = route(
        &mut a,
        &Dht::with(&[("t", record(2, 1, "t.*"))]),
        "t.x",
        ms(15_002),
    );
    publish(&mut a, &r, "later", ms(15_002));
    assert_eq!(starts(&actions(&mut a)).len(), 1);
}

#[test]
fn idle_senders_retire_and_failed_sends_are_counted() {
    let (mut a, r, q) = a_to_b();
    let mut msgs = Vec::new();
    let Transmit::Batch(b) = a.poll_transmit(q, &mut msgs, ms(0)) else {
        panic!("a batch");
    };
    assert!(b.report.is_none());
    a.handle_send_failed(q, &msgs, b.report, ms(1));
    assert_eq!(counter(&a, |c| &c.remote_dropped_total), 1);
    assert_eq!(a.inflight(), 0);
    // The lost message is reported to the node with the next batch, or
    // alone: a batch of no messages.
    msgs.clear();
    let Transmit::Batch(b) = a.poll_transmit(q, &mut msgs, ms(1)) else {
        panic!("a report");
    };
    assert_eq!((b.n, b.report.as_ref().map(|r| r.dropped())), (0, Some(1)));
    a.handle_written(q, &b, &msgs, Default::default(), ms(1));
    assert_eq!(counter(&a, |c| &c.loss_reported_total), 1);
    assert!(matches!(
        a.poll_transmit(q, &mut msgs, ms(1)),
        Transmit::Empty
    ));
    assert!(!a.retire_if_idle(q, ms(59_000)));
    assert!(a.retire_if_idle(q, ms(61_000)));
    assert_eq!(a.n_peers(), 0);
    // Its route is no longer valid: rebuilt with a new queue.
    assert!(a.cached_route("t.x", ms(61_000)).is_none());
    let _ = r;
}

#[test]
fn finishing_waits_for_queues_to_drain() {
    let (mut a, _r, q) = a_to_b();
    a.begin_finish();
    assert!(matches!(actions(&mut a)[..], [Action::Wake(())]));
    assert_eq!(a.n_finishing(), 1);
    let mut msgs = Vec::new();
    let Transmit::Batch(b) = a.poll_transmit(q, &mut msgs, ms(1)) else {
        panic!("a batch");
    };
    a.handle_written(q, &b, &msgs, Default::default(), ms(1));
    assert!(matches!(
        a.poll_transmit(q, &mut msgs, ms(1)),
        Transmit::Finish
    ));
    a.handle_finished(q);
    assert_eq!(a.n_finishing(), 0);
    assert_eq!(
        counter(&a, |c| &c.remote_dropped_total),
        1,
        "encoded nothing: counted"
    );
}

// ----- inbound ------------------------------------------------------------

#[test]
fn bad_batches_close_the_stream_and_bad_messages_are_counted() {
    let mut b = node(2);
    b.subscribe("t.*", 1).unwrap();
    let mut rx = BatchReceiver::new(false);
    let t = macula_wire::MessageType::PublishBatch as u8;
    let err = b
        .handle_batch(id(1), 0x42, &Bytes::from_static(b"x"), &mut rx, ms(0))
        .unwrap_err();
    assert!(err.contains("0x42"), "{err}");
    let err = b
        .handle_batch(id(1), t, &Bytes::from_static(&[1, 2, 3]), &mut rx, ms(0))
        .unwrap_err();
    assert!(err.contains("malformed"), "{err}");
    assert_eq!(counter(&b, |c| &c.data_streams_rejected_total), 2);
    // A valid batch with an invalid topic and an oversized message.
    let mut cfg = config(2, Role::Node);
    cfg.max_payload = 4;
    let mut small = PubSubCore::<u32, ()>::new(cfg);
    small.subscribe("**", 1).unwrap();
    let mut buf = Vec::new();
    let items = [
        (1, 0, &b"ok"[..]),
        (2, 1, &b"bad topic"[..]),
        (3, 0, &b"too long"[..]),
    ];
    macula_wire::encode_batch_frame(
        &mut buf,
        1 << 20,
        &id(1),
        5,
        &["good", "bad..topic"],
        items
            .iter()
            .map(|&(seq, topic_index, payload)| macula_wire::BatchItem {
                seq,
                topic_index,
                payload,
                headers: &[],
                message_id: None,
            }),
    )
    .unwrap();
    let body = Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..]);
    small.handle_batch(id(1), t, &body, &mut rx, ms(0)).unwrap();
    let mut got = Vec::new();
    rx.deliver(|_, e| got.append(e));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, "ok");
    assert_eq!(counter(&small, |c| &c.remote_rejected_total), 2);
    assert_eq!(counter(&small, |c| &c.batches_received_total), 1);
    assert_eq!(counter(&small, |c| &c.received_remote_total), 1);
}

#[test]
fn a_receiver_remembers_a_bounded_number_of_topics() {
    let mut b = node(2);
    b.subscribe("**", 1).unwrap();
    let mut rx = BatchReceiver::new(false);
    let t = macula_wire::MessageType::PublishBatch as u8;
    let mut seq = 0;
    let mut send = |b: &mut Core, rx: &mut BatchReceiver<u32>, topics: &[String]| {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let mut buf = Vec::new();
        let items: Vec<macula_wire::BatchItem> = (0..names.len())
            .map(|i| {
                seq += 1;
                macula_wire::BatchItem {
                    seq,
                    topic_index: i,
                    payload: b"x",
                    headers: &[],
                    message_id: None,
                }
            })
            .collect();
        macula_wire::encode_batch_frame(&mut buf, 1 << 20, &id(1), 1, &names, items).unwrap();
        let body = Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..]);
        b.handle_batch(id(1), t, &body, rx, ms(0)).unwrap();
        rx.deliver(|_, e| e.clear())
    };
    let two: Vec<String> = vec!["a".into(), "b".into()];
    assert_eq!(send(&mut b, &mut rx, &two), 2);
    assert_eq!(rx.n_topics(), 2);
    for round in 0..2 {
        let many: Vec<String> = (0..200).map(|i| format!("t{round}.{i}")).collect();
        assert_eq!(send(&mut b, &mut rx, &many), 200);
    }
    // Full at 256: forgotten all at once, then filled again.
    assert_eq!(macula_pubsub::inbound::RECEIVER_TOPIC_CACHE, 256);
    assert_eq!(rx.n_topics(), 2 + 400 - 256);
}

#[test]
fn nothing_matching_here_is_counted_unmatched() {
    let (mut a, r, q) = a_to_b();
    publish(&mut a, &r, "second", ms(0));
    let bodies = transmit(&mut a, q, ms(0));
    let mut b = node(2);
    assert!(receive(&mut b, 1, &bodies, ms(0)).is_empty());
    assert_eq!(
        counter(&b, |c| &c.unmatched_total),
        2,
        "no subscription at all"
    );
    let mut b = node(2);
    b.subscribe("other", 1).unwrap();
    assert!(receive(&mut b, 1, &bodies, ms(0)).is_empty());
    assert_eq!(counter(&b, |c| &c.unmatched_total), 2, "none matching");
}

fn wire(publisher: NodeId, topic: &str, epoch: u64, seq: u64) -> Publish {
    Publish {
        topic: topic.into(),
        payload: b"p".to_vec(),
        publisher,
        epoch,
        seq,
        headers: vec![],
        message_id: None,
    }
}

#[test]
fn single_publishes_are_checked_deduplicated_and_delivered() {
    let mut p = node(1);
    p.subscribe("t.**", 1).unwrap();
    let from = id(9);
    let mut out = Vec::new();
    let mut deliver = |p: &mut Core, m: Publish| p.handle_publish(from, m, ms(0), &mut out);
    deliver(&mut p, wire(from, "t.a", 5, 1)).unwrap();
    deliver(&mut p, wire(from, "t.a", 5, 2)).unwrap();
    deliver(&mut p, wire(from, "t.a", 5, 2)).unwrap();
    deliver(&mut p, wire(from, "t.a", 5, 1)).unwrap();
    // A gap is counted, the message still delivered.
    deliver(&mut p, wire(from, "t.b", 5, 5)).unwrap();
    // Unmatched: not an error.
    deliver(&mut p, wire(from, "u", 5, 6)).unwrap();
    assert!(deliver(&mut p, wire(id(8), "t.a", 1, 1)).is_err());
    assert!(deliver(&mut p, wire(from, "t..a", 5, 7)).is_err());
    assert!(deliver(&mut p, wire(from, "t.*", 5, 8)).is_err());
    let mut big = wire(from, "t.a", 5, 9);
    big.payload = vec![0; p.max_payload() + 1];
    assert!(deliver(&mut p, big).is_err());
    let mut just = wire(from, "t.c", 5, 10);
    just.payload = vec![0; p.max_payload()];
    deliver(&mut p, just).unwrap();
    out.pop();
    let topics: Vec<String> = out.iter().map(|(_, e)| e.topic.to_string()).collect();
    assert_eq!(topics, ["t.a", "t.a", "t.b"]);
    assert_eq!(out[0].1.publisher, from);
    assert_eq!(out[0].1.epoch, 5);
    assert_eq!(counter(&p, |c| &c.duplicates_dropped_total), 2);
    assert_eq!(counter(&p, |c| &c.gaps_total), 2 + 3);
    assert_eq!(counter(&p, |c| &c.received_remote_total), 5);
    assert_eq!(counter(&p, |c| &c.unmatched_total), 1);
    assert_eq!(counter(&p, |c| &c.remote_rejected_total), 4);
}

#[test]
fn local_publishes_carry_seq_epoch_and_options() {
    let mut c = node(1);
    c.subscribe("a.*", 1).unwrap();
    c.subscribe("a.b", 2).unwrap();
    let mut out = Vec::new();
    let opts = PublishOptions {
        headers: vec![("k".into(), "v".into())],
        message_id: Some("m".into()),
        ..Default::default()
    };
    let p = c
        .publish_local(
            "a.b",
            Bytes::from_static(b"1"),
            opts.clone(),
            ms(0),
            &mut out,
        )
        .unwrap();
    assert_eq!((p.seq, p.queued, p.dropped), (1, 0, 0));
    let p2 = c
        .publish_local(
            "a.c",
            Bytes::from_static(b"2"),
            PublishOptions::default(),
            ms(0),
            &mut out,
        )
        .unwrap();
    assert_eq!(p2.seq, 2);
    let mut got: Vec<(u64, u32)> = out.iter().map(|(s, e)| (e.seq, *s)).collect();
    got.sort();
    assert_eq!(got, [(1, 1), (1, 2), (2, 1)]);
    let e: &Event = &out[0].1;
    assert_eq!((e.epoch, e.publisher), (101, id(1)));
    assert_eq!(e.headers, opts.headers);
    assert_eq!(e.message_id.as_deref(), Some("m"));
    assert!(out[2].1.headers.is_empty() && out[2].1.message_id.is_none());
    assert_eq!(out[2].1.seq, 2);
    assert_eq!(
        c.max_payload(),
        (1 << 20) - 64 * 1024,
        "frame limit less headroom"
    );
    let just = Bytes::from(vec![0u8; c.max_payload()]);
    assert!(c
        .publish_local("a.b", just, PublishOptions::default(), ms(0), &mut out)
        .is_ok());
    out.clear();
    let too_big = Bytes::from(vec![0u8; c.max_payload() + 1]);
    let err = c
        .publish_local("a.b", too_big, PublishOptions::default(), ms(0), &mut out)
        .unwrap_err();
    assert!(matches!(err, PubSubError::PayloadTooLarge { .. }));
    let many = PublishOptions {
        headers: vec![("h".into(), "v".into()); 33],
        message_id: None,
        ..Default::default()
    };
    assert!(matches!(
        c.publish_local("a.b", Bytes::new(), many, ms(0), &mut out),
        Err(PubSubError::TooManyHeaders { n: 33 })
    ));
    assert!(matches!(
        c.subscribe("a..b", 3),
        Err(PubSubError::InvalidPattern { .. })
    ));
    assert_eq!(counter(&c, |c| &c.published_total), 3);
    assert_eq!(c.counters().subscriptions.get(), 2);
    assert_eq!((c.node_id(), c.epoch(), c.role()), (id(1), 101, Role::Node));
}

#[test]
fn the_subscription_limit_holds() {
    let mut cfg = config(1, Role::Local);
    cfg.limits.max_subscriptions = 2;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    let a = c.subscribe("a", 1).unwrap();
    assert_eq!(
        a.interest,
        Interest::None,
        "local only: nothing to announce"
    );
    c.subscribe("b", 2).unwrap();
    assert_eq!(
        c.subscribe("c", 3).unwrap_err(),
        PubSubError::TooManySubscriptions { max: 2 }
    );
    c.unsubscribe(a.id);
    assert!(c.subscribe("c", 3).is_ok());
    assert_eq!(c.n_subscriptions(), 2);
}

// ----- stale interest -------------------------------------------------------

#[test]
fn a_node_that_left_is_set_aside_until_it_returns() {
    let dht = Dht::with(&[("t", record(2, 10, "t.*")), ("t", record(3, 10, "t.*"))]);
    let mut a = node(1);
    let r = route(&mut a, &dht, "t.x", ms(0));
    assert_eq!(nodes(&r), vec![id(2), id(3)]);
    publish(&mut a, &r, "m", ms(0));
    actions(&mut a);
    // A normal close sets nothing aside.
    a.handle_peer_down(&id(2), PeerDown::Closed, ms(1));
    assert!(a.cached_route("t.x", ms(1)).is_some());
    // Node 2 crashed: its connection timed out.
    a.handle_peer_down(&id(2), PeerDown::Left, ms(5_000));
    assert_eq!(counter(&a, |c| &c.peers_unreachable_total), 1);
    assert_eq!(counter(&a, |c| &c.remote_dropped_total), 1, "its queue");
    assert_eq!(a.n_unreachable(ms(5_000)), 1);
    // Its record is still in the DHT, but no route includes it.
    let r = route(&mut a, &dht, "t.x", ms(5_001));
    assert_eq!(nodes(&r), vec![id(3)]);
    let r = route(&mut a, &dht, "t.x", ms(20_000));
    assert_eq!(
        nodes(&r),
        vec![id(3)],
        "a fresh lookup of the old record does not restore it"
    );
    // It reconnects: routed to again at once.
    a.handle_peer_up(&id(2), 1 << 20);
    assert_eq!(counter(&a, |c| &c.peers_restored_total), 1);
    let r = route(&mut a, &dht, "t.x", ms(20_001));
    assert_eq!(nodes(&r), vec![id(2), id(3)]);
    // A node we never routed to is not remembered.
    a.handle_peer_down(&id(9), PeerDown::Left, ms(20_002));
    assert_eq!(counter(&a, |c| &c.peers_unreachable_total), 1);
}

#[test]
fn a_newer_record_or_the_end_of_the_hold_restores_a_node() {
    let mut dht = Dht::with(&[("t", record(2, 10, "t.*"))]);
    let mut a = node(1);
    route(&mut a, &dht, "t.x", ms(0));
    a.handle_peer_down(&id(2), PeerDown::Left, ms(0));
    assert!(nodes(&route(&mut a, &dht, "t.x", ms(2_000))).is_empty());
    // It restarted and subscribed again: a newer record.
    dht.0.insert(name("t"), vec![record(2, 11, "t.*")]);
    let r = route(&mut a, &dht, "t.x", ms(4_000));
    assert_eq!(nodes(&r), vec![id(2)]);
    assert_eq!(counter(&a, |c| &c.peers_restored_total), 1);
    // Unreachable when a sender tried: set aside for the hold (30 s)...
    publish(&mut a, &r, "m", ms(4_000));
    let (q, _) = starts(&actions(&mut a))[0];
    a.handle_unreachable(q, ms(4_001));
    assert_eq!(counter(&a, |c| &c.peers_unreachable_total), 2);
    assert!(nodes(&route(&mut a, &dht, "t.x", ms(34_000))).is_empty());
    assert_eq!(a.n_unreachable(ms(34_000)), 1);
    assert_eq!(a.n_unreachable(ms(34_001)), 0);
    // ...then tried once more (once the route built meanwhile expires).
    let r = route(&mut a, &dht, "t.x", ms(35_000));
    assert_eq!(nodes(&r), vec![id(2)]);
    publish(&mut a, &r, "m", ms(35_000));
    let (q, _) = starts(&actions(&mut a))[0];
    a.handle_unreachable(q, ms(35_000));
    // Found unreachable again: the hold doubles (60 s).
    assert!(nodes(&route(&mut a, &dht, "t.x", ms(94_999))).is_empty());
    assert_eq!(a.n_unreachable(ms(94_999)), 1);
    assert_eq!(nodes(&route(&mut a, &dht, "t.x", ms(96_000))), vec![id(2)]);
    // A stale handle does nothing.
    a.handle_unreachable(q, ms(96_001));
    assert_eq!(counter(&a, |c| &c.peers_unreachable_total), 3);
}

#[test]
fn a_hold_ends_exactly_at_its_end() {
    let dht = Dht::with(&[("t", record(2, 1, "t.*"))]);
    let mut a = node(1);
    route(&mut a, &dht, "t.a", ms(0));
    a.handle_peer_down(&id(2), PeerDown::Left, ms(0));
    // Fresh entries at 29.5 s; then new topics at 29,999 and 30,000 ms.
    assert!(nodes(&route(&mut a, &dht, "t.b", ms(29_500))).is_empty());
    assert!(nodes(&route(&mut a, &dht, "t.c", ms(29_999))).is_empty());
    assert_eq!(nodes(&route(&mut a, &dht, "t.d", ms(30_000))), vec![id(2)]);
}

#[test]
fn a_node_known_only_from_its_records_is_set_aside_too() {
    // Node 5 is interested in other topics: in the cache, never routed to.
    let dht = Dht::with(&[("*", record(5, 1, "*.other"))]);
    let mut a = node(1);
    assert!(nodes(&route(&mut a, &dht, "t.a", ms(0))).is_empty());
    a.handle_peer_down(&id(5), PeerDown::Left, ms(1));
    assert_eq!(counter(&a, |c| &c.peers_unreachable_total), 1);
    assert!(nodes(&route(&mut a, &dht, "x.other", ms(2))).is_empty());
}

#[test]
fn unreachable_nodes_are_bounded() {
    let mut cfg = config(1, Role::Node);
    cfg.interest.max_down = 2;
    let mut a = PubSubCore::<u32, ()>::new(cfg);
    let dht = Dht::with(&[
        ("t", record(2, 1, "t.*")),
        ("t", record(3, 1, "t.*")),
        ("t", record(4, 1, "t.*")),
    ]);
    route(&mut a, &dht, "t.x", ms(0));
    for (n, at) in [(2, 1), (3, 2), (4, 3)] {
        a.handle_peer_down(&id(n), PeerDown::Left, ms(at));
    }
    assert_eq!(a.n_unreachable(ms(4)), 2);
    assert_eq!(
        nodes(&route(&mut a, &dht, "t.x", ms(5))),
        vec![id(2)],
        "the oldest forgotten"
    );
}

// ----- gateway and client roles ---------------------------------------------

#[test]
fn each_attached_client_gets_a_feed_of_its_own() {
    let mut gw = node(2);
    let f1 = gw.open_feed(id(50));
    let f2 = gw.open_feed(id(51));
    let f3 = gw.open_feed(id(52));
    assert!(f1 != f2 && f2 != f3 && f1 != f3, "{f1:?} {f2:?} {f3:?}");
    gw.feed_add(f1, "a.*").unwrap();
    gw.feed_add(f2, "b.*").unwrap();
    assert_eq!(gw.feed_patterns(f1), vec!["a.*".to_string()]);
    assert_eq!(gw.feed_patterns(f2), vec!["b.*".to_string()]);
    assert!(gw.feed_patterns(f3).is_empty());
}

#[test]
fn topics_and_patterns_read_as_their_text() {
    let t = macula_pubsub::Topic::new("a.b.c").unwrap();
    assert_eq!(AsRef::<str>::as_ref(&t), "a.b.c");
    assert_eq!(t.to_string(), "a.b.c");
    let p = macula_pubsub::Pattern::new("a.*.**").unwrap();
    assert_eq!(AsRef::<str>::as_ref(&p), "a.*.**");
    assert_eq!(p.to_string(), "a.*.**");
}

#[test]
fn a_gateway_feeds_its_clients_what_matches_except_their_own() {
    // Node 2 is the gateway of client 50; node 1 publishes to node 2.
    let mut gw = node(2);
    let feed = gw.open_feed(id(50));
    let i = gw.feed_add(feed, "t.*").unwrap();
    assert!(matches!(i, Interest::Record { .. }));
    // A second pattern matching the same topics: still one copy each.
    gw.feed_add(feed, "t.x").unwrap();
    assert_eq!(
        gw.feed_add(feed, "t.x").unwrap(),
        Interest::None,
        "idempotent"
    );
    assert!(matches!(
        gw.feed_add(feed, "t..x"),
        Err(PubSubError::InvalidPattern { .. })
    ));
    assert_eq!(
        gw.feed_patterns(feed),
        vec!["t.*".to_string(), "t.x".to_string()]
    );
    actions(&mut gw);
    // The gateway's own publish.
    let mut out = Vec::new();
    gw.publish_local(
        "t.x",
        Bytes::from_static(b"own"),
        PublishOptions::default(),
        ms(0),
        &mut out,
    )
    .unwrap();
    assert!(out.is_empty(), "no local subscription");
    let (q, to) = starts(&actions(&mut gw))[0];
    assert_eq!(to, id(50));
    // Another node's batch arriving here.
    let (mut a, _r, aq) = a_to_b();
    let bodies = transmit(&mut a, aq, ms(0));
    receive(&mut gw, 1, &bodies, ms(1));
    // The client's own message is not echoed.
    let mut mine = node(50);
    let dht = Dht::with(&[("t", record(2, 1, "t.*"))]);
    let rm = route(&mut mine, &dht, "t.x", ms(0));
    publish(&mut mine, &rm, "echo?", ms(0));
    let (mq, _) = starts(&actions(&mut mine))[0];
    let mine_bodies = transmit(&mut mine, mq, ms(0));
    let mut rx = BatchReceiver::new(true);
    for b in &mine_bodies {
        gw.handle_batch(
            id(50),
            macula_wire::MessageType::PublishBatch as u8,
            b,
            &mut rx,
            ms(2),
        )
        .unwrap();
    }
    assert_eq!(
        counter(&gw, |c| &c.unmatched_total),
        0,
        "a client's batch is forwarded, not unmatched"
    );
    let to_client = transmit(&mut gw, q, ms(3));
    // What the client gets: the gateway's own message, then node 1's with
    // node 1 as publisher (its gateway is trusted to forward).
    let mut client = PubSubCore::<u32, ()>::new(config(50, Role::Client));
    client.subscribe("t.*", 9).unwrap();
    let mut rx = BatchReceiver::new(false);
    let mut got: Vec<Event> = Vec::new();
    for body in &to_client {
        client
            .handle_batch(
                id(2),
                macula_wire::MessageType::PublishBatch as u8,
                body,
                &mut rx,
                ms(4),
            )
            .unwrap();
        rx.deliver(|_, e| got.append(e));
    }
    let who: Vec<(NodeId, &str)> = got
        .iter()
        .map(|e| (e.publisher, std::str::from_utf8(&e.payload).unwrap()))
        .collect();
    assert_eq!(who, [(id(2), "own"), (id(1), "first")]);
    assert_eq!(counter(&gw, |c| &c.forwarded_sent_total), 2);
    assert_eq!(counter(&client, |c| &c.forwarded_received_total), 0);
    // Closing the feed removes its patterns; the record follows the put
    // under way.
    gw.close_feed(feed);
    assert!(gw.feed_patterns(feed).is_empty());
    assert_eq!(gw.n_subscriptions(), 0);
    assert!(!gw.interest_settled());
    assert_eq!(gw.feed_remove(feed, "t.*"), Interest::None);
    // A feed that is gone takes nothing.
    assert_eq!(gw.feed_add(feed, "u").unwrap(), Interest::None);
}

#[test]
fn a_single_publish_reaches_a_feed_with_its_publisher() {
    let mut gw = node(2);
    let feed = gw.open_feed(id(50));
    gw.feed_add(feed, "t.*").unwrap();
    actions(&mut gw);
    let mut out = Vec::new();
    let mut p = wire(id(9), "t.x", 77, 1);
    p.headers = vec![("h".into(), "v".into())];
    gw.handle_publish(id(9), p, ms(0), &mut out).unwrap();
    assert!(out.is_empty());
    let (q, _) = starts(&actions(&mut gw))[0];
    let bodies = transmit(&mut gw, q, ms(0));
    let v = macula_wire::PublishBatchView::decode(&bodies[0]).unwrap();
    assert_eq!((v.publisher, v.epoch), (id(9), 77));
    assert_eq!(v.entries[0].headers, vec![("h", "v")]);
}

#[test]
fn a_gateway_forwards_its_clients_messages_into_the_mesh() {
    let mut client = PubSubCore::<u32, ()>::new(config(50, Role::Client));
    client.set_gateway(Some(id(1)));
    let mut out = Vec::new();
    client
        .publish_upstream(
            "t.x",
            Bytes::from_static(b"hi"),
            PublishOptions::default(),
            ms(0),
            &mut out,
        )
        .unwrap();
    let (q, to) = starts(&actions(&mut client))[0];
    assert_eq!(to, id(1));
    let bodies = transmit(&mut client, q, ms(0));
    let mut gw = node(1);
    let dht = Dht::with(&[("t", record(2, 1, "t.*")), ("t", record(50, 1, "t.*"))]);
    let r = route(&mut gw, &dht, "t.x", ms(0));
    for b in &bodies {
        let view = macula_wire::PublishBatchView::decode(b).unwrap();
        gw.forward_from_client(
            id(50),
            &view,
            b,
            &[Some(r.clone())],
            &[],
            &Default::default(),
            ms(1),
        );
        // A client naming another publisher is refused.
        gw.forward_from_client(
            id(51),
            &view,
            b,
            &[Some(r.clone())],
            &[],
            &Default::default(),
            ms(1),
        );
    }
    assert_eq!(counter(&gw, |c| &c.remote_rejected_total), 1);
    // Payloads over this node's limit are not forwarded; one at it is.
    let mut small = config(1, Role::Node);
    small.max_payload = 2;
    let mut strict = PubSubCore::<u32, ()>::new(small);
    let rs = route(&mut strict, &dht, "t.x", ms(0));
    let view = macula_wire::PublishBatchView::decode(&bodies[0]).unwrap();
    strict.forward_from_client(
        id(50),
        &view,
        &bodies[0],
        &[Some(rs.clone())],
        &[],
        &Default::default(),
        ms(1),
    );
    assert_eq!(
        counter(&strict, |c| &c.forwarded_sent_total),
        1,
        "2 bytes: at the limit"
    );
    let mut tiny = config(1, Role::Node);
    tiny.max_payload = 1;
    let mut strict = PubSubCore::<u32, ()>::new(tiny);
    let rs = route(&mut strict, &dht, "t.x", ms(0));
    strict.forward_from_client(
        id(50),
        &view,
        &bodies[0],
        &[Some(rs)],
        &[],
        &Default::default(),
        ms(1),
    );
    assert_eq!(counter(&strict, |c| &c.forwarded_sent_total), 0);
    let (gq, to) = starts(&actions(&mut gw))[0];
    assert_eq!(to, id(2), "not back to the client");
    let fwd = transmit(&mut gw, gq, ms(2));
    let mut b = node(2);
    b.subscribe("t.*", 4).unwrap();
    let mut rx = BatchReceiver::new(false);
    let mut got: Vec<Event> = Vec::new();
    for body in &fwd {
        b.handle_batch(
            id(1),
            macula_wire::MessageType::PublishBatch as u8,
            body,
            &mut rx,
            ms(3),
        )
        .unwrap();
        rx.deliver(|_, e| got.append(e));
    }
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].publisher, got[0].seq, got[0].epoch),
        (id(50), 1, 150)
    );
    assert_eq!(counter(&b, |c| &c.forwarded_received_total), 1);
}

#[test]
fn a_client_tells_its_gateway_about_first_and_last_holders_only() {
    let mut c = PubSubCore::<u32, ()>::new(config(50, Role::Client));
    let a = c.subscribe("t.*", 1).unwrap();
    assert_eq!(
        a.interest,
        Interest::Upstream {
            pattern: "t.*".into(),
            on: true
        }
    );
    let b = c.subscribe("t.*", 2).unwrap();
    assert_eq!(b.interest, Interest::None);
    assert_eq!(c.unsubscribe(a.id), Some(Interest::None));
    assert_eq!(
        c.unsubscribe(b.id),
        Some(Interest::Upstream {
            pattern: "t.*".into(),
            on: false
        })
    );
    let mut out = Vec::new();
    assert_eq!(
        c.publish_upstream(
            "t.x",
            Bytes::new(),
            PublishOptions::default(),
            ms(0),
            &mut out
        ),
        Err(PubSubError::Detached)
    );
    c.set_gateway(Some(id(1)));
    c.subscribe("t.*", 3).unwrap();
    c.publish_upstream(
        "t.x",
        Bytes::from_static(b"m"),
        PublishOptions::default(),
        ms(0),
        &mut out,
    )
    .unwrap();
    assert_eq!(out.len(), 1, "local subscribers get it at once");
    assert_eq!(c.interest_outcome("any", 1), Some(Ok(())));
    assert!(c.interest_settled() && c.live_interest_names().is_empty());
    assert_eq!(c.n_unreachable(ms(0)), 0);
    assert_eq!(c.n_lookups(), 0);
    // A client routes nowhere itself.
    let RouteStep::Ready(r) = c.route("t.x", ms(0), Patience::Wait).unwrap() else {
        panic!()
    };
    assert!(nodes(&r).is_empty());
    assert!(c.cached_route("t.x", ms(0)).is_none());
    c.leave();
    assert!(puts(&actions(&mut c)).is_empty(), "a client has no records");
}

#[test]
fn a_node_only_publishes_upstream_as_a_client() {
    let mut c = node(1);
    c.set_gateway(Some(id(2)));
    let mut out = Vec::new();
    assert_eq!(
        c.publish_upstream(
            "t",
            Bytes::new(),
            PublishOptions::default(),
            ms(0),
            &mut out
        ),
        Err(PubSubError::Detached)
    );
}

#[test]
fn a_client_is_blocked_by_a_full_queue_to_its_gateway_only() {
    let mut cfg = config(50, Role::Client);
    cfg.limits.peer_queue_capacity = 1;
    let mut c = PubSubCore::<u32, ()>::new(cfg);
    assert_eq!(c.blocked_upstream(1), None, "detached: nothing to wait for");
    c.set_gateway(Some(id(1)));
    assert_eq!(c.blocked_upstream(1), None, "no queue yet");
    let mut out = Vec::new();
    c.publish_upstream(
        "t.x",
        Bytes::from_static(b"m"),
        PublishOptions::default(),
        ms(0),
        &mut out,
    )
    .unwrap();
    assert_eq!(c.blocked_upstream(1), Some(id(1)), "one message fills it");
    let q = started(&mut c);
    assert_eq!(drained(&mut c, q), ["m"]);
    assert_eq!(c.blocked_upstream(1), None);
    // A full node never is: it has no gateway.
    let n = node(2);
    assert_eq!(n.blocked_upstream(1), None);
}

#[test]
fn local_matches_counts_this_nodes_matching_subscriptions() {
    let mut c = node(1);
    assert_eq!(c.local_matches("a.b"), Ok(0));
    c.subscribe("a.*", 1).unwrap();
    c.subscribe("a.**", 2).unwrap();
    c.subscribe("b.*", 3).unwrap();
    assert_eq!(c.local_matches("a.b"), Ok(2));
    assert_eq!(c.local_matches("a.b.c"), Ok(1));
    assert_eq!(c.local_matches("c"), Ok(0));
    assert!(matches!(
        c.local_matches("a.*"),
        Err(PubSubError::InvalidTopic { .. })
    ));
}

// ----- loss reports -------------------------------------------------------

/// A queue of `capacity` messages to node 2 whose sender has started
/// (with "m0" in it), and node 2 subscribed as sink 7.
fn lossy_pair(capacity: usize) -> (Core, Arc<Route>, PeerRef, Core) {
    let (mut a, r) = queue_to_node_2(capacity, 1 << 20);
    publish_with(&mut a, &r, "m0", Overflow::DropNewest).unwrap();
    let q = started(&mut a);
    let mut b = node(2);
    b.subscribe("t.*", 7).unwrap();
    actions(&mut b);
    (a, r, q, b)
}

#[test]
fn drop_newest_losses_reach_the_subscriber_as_lagged_where_they_happened() {
    let (mut a, r, q, mut b) = lossy_pair(2);
    let mut rx = BatchReceiver::new(false);
    publish_with(&mut a, &r, "m1", Overflow::DropNewest).unwrap();
    for i in 2..5 {
        let p = publish_with(&mut a, &r, &format!("m{i}"), Overflow::DropNewest).unwrap();
        assert_eq!(p.dropped, 1);
    }
    let frames = transmit_frames(&mut a, q, ms(1));
    let types: Vec<u8> = frames.iter().map(|f| f.0).collect();
    let (dropped, batch) = (
        macula_wire::MessageType::PublishDropped as u8,
        macula_wire::MessageType::PublishBatch as u8,
    );
    assert_eq!(types, vec![dropped, batch], "the report goes first");
    assert_eq!(counter(&a, |c| &c.loss_reported_total), 3);
    let got = receive_frames(&mut b, 1, &frames, &mut rx, ms(2));
    let want: Vec<(u32, String)> = [(7, "lagged 3"), (7, "m0"), (7, "m1")]
        .iter()
        .map(|(s, m)| (*s, m.to_string()))
        .collect();
    assert_eq!(got, want);
    // Nothing more to tell: the next take is empty.
    assert!(transmit_frames(&mut a, q, ms(3)).is_empty());
}

#[test]
fn drop_oldest_evictions_are_reported_per_topic_to_matching_subscriptions_only() {
    let (mut a, r, q, mut b) = lossy_pair(1);
    b.subscribe("t.y", 8).unwrap();
    b.subscribe("t.x", 9).unwrap();
    let mut rx = BatchReceiver::new(false);
    for i in 1..4 {
        let p = publish_with(&mut a, &r, &format!("m{i}"), Overflow::DropOldest).unwrap();
        assert_eq!(p.evicted, 1);
    }
    let frames = transmit_frames(&mut a, q, ms(1));
    let mut got = receive_frames(&mut b, 1, &frames, &mut rx, ms(2));
    got.sort();
    // t.* (7) and t.x (9) missed m0..m2; t.y (8) missed nothing.
    let want: Vec<(u32, String)> = [(7, "lagged 3"), (7, "m3"), (9, "lagged 3"), (9, "m3")]
        .iter()
        .map(|(s, m)| (*s, m.to_string()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(counter(&a, |c| &c.loss_reported_total), 3);
}

#[test]
fn a_cut_off_reports_what_was_queued_taken_and_lost_in_flight() {
    let (mut a, r, q, mut b) = lossy_pair(16);
    let mut rx = BatchReceiver::new(false);
    // m0..m2 written in whole frames and read by b.
    publish(&mut a, &r, "m1", ms(0));
    publish(&mut a, &r, "m2", ms(0));
    let first = transmit_frames(&mut a, q, ms(1));
    assert_eq!(receive_frames(&mut b, 1, &first, &mut rx, ms(1)).len(), 3);
    // m3, m4 written too, but never read: in flight when the stream resets.
    publish(&mut a, &r, "m3", ms(2));
    publish(&mut a, &r, "m4", ms(2));
    let _unread = transmit_frames(&mut a, q, ms(2));
    // m5 is being written, m6 queued, when the stall cut-off comes.
    publish(&mut a, &r, "m5", ms(3));
    let mut msgs = Vec::new();
    let Transmit::Batch(b5) = a.poll_transmit(q, &mut msgs, ms(3)) else {
        panic!("a batch");
    };
    publish(&mut a, &r, "m6", ms(4));
    let later = ms(3).saturating_add(macula_pubsub::outbound::PEER_STALL_TIMEOUT);
    assert_eq!(a.handle_stall(q, later), Stall::CutOff { dropped: 2 });
    a.handle_cut_off(id(2), b5, &msgs, None, 5, later);
    // A new sender starts at once to deliver the report.
    let acts = actions(&mut a);
    let (q2, to) = starts(&acts)[0];
    assert_eq!(to, id(2));
    let report = transmit_frames(&mut a, q2, later);
    assert_eq!(report.len(), 1);
    let d = macula_wire::PublishDropped::decode(&report[0].1).unwrap();
    assert_eq!(
        (d.in_flight, d.topics.clone()),
        (5, vec![("t.x".into(), 2)])
    );
    // b: the stream was reset after 3 messages were read; of the 5 written,
    // 2 were lost in flight (every subscription is told: topics unknown),
    // then the 2 named ones.
    b.handle_stream_reset(id(1), &mut rx, later);
    let mut told = Vec::new();
    rx.deliver_lagged(|s, n| told.push((*s, n)));
    assert!(told.is_empty(), "the sender's count is not known yet");
    let mut rx2 = BatchReceiver::new(false);
    let got = receive_frames(&mut b, 1, &report, &mut rx2, later);
    assert_eq!(got, vec![(7, "lagged 4".to_string())]);
    assert_eq!(counter(&a, |c| &c.loss_reported_total), 7);
}

#[test]
fn the_in_flight_count_may_arrive_before_the_reset_is_seen() {
    let mut b = node(2);
    b.subscribe("**", 7).unwrap();
    let report = macula_wire::Message::PublishDropped(macula_wire::PublishDropped {
        publisher: id(1),
        epoch: 101,
        in_flight: 10,
        topics: vec![],
    });
    let mut buf = Vec::new();
    report.encode_frame(&mut buf, 1 << 20).unwrap();
    let body = Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..]);
    let t = macula_wire::MessageType::PublishDropped as u8;
    let mut new_rx = BatchReceiver::new(false);
    assert!(receive_frames(&mut b, 1, &[(t, body)], &mut new_rx, ms(0)).is_empty());
    // The old stream's reader learns of the reset later: 4 were read.
    let mut old_rx = BatchReceiver::<u32>::new(false);
    let bodies = {
        let (mut a, r, q) = a_to_b();
        for i in 0..3 {
            publish(&mut a, &r, &i.to_string(), ms(0));
        }
        transmit(&mut a, q, ms(0))
    };
    let frames: Vec<(u8, Bytes)> = bodies
        .iter()
        .map(|b| (macula_wire::MessageType::PublishBatch as u8, b.clone()))
        .collect();
    assert_eq!(
        receive_frames(&mut b, 1, &frames, &mut old_rx, ms(0)).len(),
        4
    );
    assert_eq!(old_rx.messages(), 4);
    b.handle_stream_reset(id(1), &mut old_rx, ms(1));
    let mut told = Vec::new();
    old_rx.deliver_lagged(|s, n| told.push((*s, n)));
    assert_eq!(told, vec![(7, 6)]);
    // Told once: a second reset report alone tells nothing.
    b.handle_stream_reset(id(1), &mut old_rx, ms(2));
    assert_eq!(old_rx.deliver_lagged(|_, _| {}), 0);
}

/// Builds a PUBLISH_DROPPED body.
fn dropped_body(publisher: u8, in_flight: u64, topics: &[(&str, u64)]) -> Bytes {
    let d = macula_wire::Message::PublishDropped(macula_wire::PublishDropped {
        publisher: id(publisher),
        epoch: 100 + u64::from(publisher),
        in_flight,
        topics: topics.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
    });
    let mut buf = Vec::new();
    d.encode_frame(&mut buf, 1 << 20).unwrap();
    Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..])
}

#[test]
fn a_reset_stream_that_lost_nothing_tells_nobody() {
    let mut b = node(2);
    b.subscribe("**", 7).unwrap();
    let t = macula_wire::MessageType::PublishDropped as u8;
    let mut rx = BatchReceiver::new(false);
    // 0 read on the reset stream, 0 written on it: nothing lost.
    b.handle_stream_reset(id(1), &mut rx, ms(0));
    let mut rx2 = BatchReceiver::new(false);
    // A report with nothing in flight and one named topic.
    b.handle_batch(
        id(1),
        t,
        &dropped_body(1, 0, &[("a.b", 2)]),
        &mut rx2,
        ms(0),
    )
    .unwrap();
    let mut told = Vec::new();
    rx.deliver_lagged(|s, n| told.push((*s, n)));
    rx2.deliver_lagged(|s, n| told.push((*s, n)));
    assert_eq!(told, vec![(7, 2)], "only the named loss");
    // The reset's slot is still waiting for a count: a count equal to what
    // was read tells nothing either.
    let mut rx3 = BatchReceiver::new(false);
    b.handle_batch(id(1), t, &dropped_body(1, 2, &[]), &mut rx3, ms(1))
        .unwrap();
    // 0 read, 2 written: 2 lost in flight.
    assert_eq!(rx3.deliver_lagged(|_, _| {}), 2);
    // Read exactly what was written: nobody is told anything (not even 0).
    let mut rx4 = BatchReceiver::new(false);
    b.handle_batch(
        id(3),
        t,
        &dropped_body(3, 0, &[("a.b", 2)]),
        &mut rx4,
        ms(2),
    )
    .unwrap();
    rx4.deliver_lagged(|_, _| {});
    b.handle_stream_reset(id(3), &mut rx4, ms(2));
    let mut rx5 = BatchReceiver::new(false);
    b.handle_batch(id(3), t, &dropped_body(3, 2, &[]), &mut rx5, ms(3))
        .unwrap();
    let mut none = Vec::new();
    rx4.deliver_lagged(|s, n| none.push((*s, n)));
    rx5.deliver_lagged(|s, n| none.push((*s, n)));
    assert!(none.is_empty(), "{none:?}");
}

#[test]
fn the_in_flight_table_is_bounded() {
    let mut b = node(2);
    b.subscribe("**", 7).unwrap();
    let t = macula_wire::MessageType::PublishDropped as u8;
    let peer = |i: usize| {
        let mut raw = [0u8; 32];
        raw[..8].copy_from_slice(&(i as u64 + 1000).to_le_bytes());
        NodeId::from_bytes(raw)
    };
    let mut rx = BatchReceiver::<u32>::new(false);
    for i in 0..macula_pubsub::inbound::MAX_IN_FLIGHT_PEERS {
        b.handle_stream_reset(peer(i), &mut rx, ms(0));
    }
    // Full, not over: the first peer's count still finds its reset.
    let mut rx1 = BatchReceiver::new(false);
    b.handle_batch(peer(0), t, &dropped_body(9, 3, &[]), &mut rx1, ms(1))
        .unwrap();
    assert_eq!(rx1.deliver_lagged(|_, _| {}), 3);
    // Two more peers: past the bound the table starts over, so peer 1's
    // reset is forgotten (its count alone tells nothing).
    b.handle_stream_reset(peer(5000), &mut rx, ms(2));
    b.handle_stream_reset(peer(5001), &mut rx, ms(2));
    let mut rx2 = BatchReceiver::new(false);
    b.handle_batch(peer(1), t, &dropped_body(9, 3, &[]), &mut rx2, ms(3))
        .unwrap();
    assert_eq!(rx2.deliver_lagged(|_, _| {}), 0);
}

#[test]
fn a_client_with_two_matching_patterns_gets_one_report_for_an_unnamed_loss() {
    let mut gw = node(2);
    let feed = gw.open_feed(id(50));
    gw.feed_add(feed, "t.*").unwrap();
    gw.feed_add(feed, "t.x").unwrap();
    actions(&mut gw);
    let t = macula_wire::MessageType::PublishDropped as u8;
    let mut rx = BatchReceiver::new(false);
    gw.handle_batch(id(1), t, &dropped_body(1, 0, &[("", 5)]), &mut rx, ms(0))
        .unwrap();
    let (q, _) = starts(&actions(&mut gw))[0];
    let frames = transmit_frames(&mut gw, q, ms(1));
    let d = macula_wire::PublishDropped::decode(&frames[0].1).unwrap();
    assert_eq!(d.topics, vec![(String::new(), 5)], "once, not per pattern");
}

#[test]
fn a_cut_off_with_nothing_lost_starts_no_sender() {
    let (mut a, _r, q, _b) = lossy_pair(16);
    let mut msgs = Vec::new();
    let Transmit::Batch(b) = a.poll_transmit(q, &mut msgs, ms(1)) else {
        panic!("a batch");
    };
    let mut buf = Vec::new();
    let mut marks = Vec::new();
    b.encode_marked(&mut buf, &msgs, &mut marks);
    let later = ms(1).saturating_add(macula_pubsub::outbound::PEER_STALL_TIMEOUT);
    assert!(matches!(a.handle_stall(q, later), Stall::CutOff { .. }));
    // Everything went out whole before, and nothing was in flight.
    a.handle_cut_off(id(2), b, &msgs, marks.last().copied(), 0, later);
    // m0 went out whole: it is in flight now (1), so there is a report.
    assert_eq!(starts(&actions(&mut a)).len(), 1);
    let mut a2 = lossy_pair(16).0;
    let q2 = a2.cached_route("t.x", ms(0)).map(|_| ());
    let _ = q2;
    // A sender with nothing taken and nothing queued, cut off: no report.
    let (mut c, r) = queue_to_node_2(16, 1 << 20);
    publish(&mut c, &r, "x", ms(0));
    let cq = started(&mut c);
    let mut none = Vec::new();
    let Transmit::Batch(cb) = c.poll_transmit(cq, &mut none, ms(0)) else {
        panic!("a batch");
    };
    let mut cbuf = Vec::new();
    let mut cmarks = Vec::new();
    let e = cb.encode_marked(&mut cbuf, &none, &mut cmarks);
    c.handle_written(cq, &cb, &none, e, ms(0));
    // A write starts (empty) and stalls.
    c.handle_progress(cq, ms(0));
    assert!(matches!(
        c.handle_stall(cq, later),
        Stall::CutOff { dropped: 0 }
    ));
    let empty = macula_pubsub::Batch {
        signer: None,
        n: 0,
        frame_limit: 1 << 20,
        batch_bytes: macula_pubsub::BATCH_BYTES,
        publisher: id(1),
        epoch: 101,
        report: None,
        refused: 0,
    };
    c.handle_cut_off(id(2), empty, &[], None, 0, later);
    assert!(starts(&actions(&mut c)).is_empty(), "nothing to tell");
}

#[test]
fn a_gateway_passes_losses_on_to_its_clients_and_from_them_into_the_mesh() {
    // Node 2 is the gateway of client 50, which subscribes to t.*.
    let mut gw = node(2);
    let feed = gw.open_feed(id(50));
    gw.feed_add(feed, "t.*").unwrap();
    actions(&mut gw);
    // Node 1 dropped 3 messages on t.x for node 2.
    let (mut a, r, q, _b) = lossy_pair(1);
    for i in 1..4 {
        publish_with(&mut a, &r, &format!("m{i}"), Overflow::DropOldest).unwrap();
    }
    let frames = transmit_frames(&mut a, q, ms(1));
    let mut rx = BatchReceiver::new(false);
    receive_frames(&mut gw, 1, &frames, &mut rx, ms(1));
    // The client's queue carries a report naming node 1 as the publisher.
    let (cq, to) = starts(&actions(&mut gw))[0];
    assert_eq!(to, id(50));
    let to_client = transmit_frames(&mut gw, cq, ms(2));
    let reports: Vec<_> = to_client
        .iter()
        .filter(|f| f.0 == macula_wire::MessageType::PublishDropped as u8)
        .map(|f| macula_wire::PublishDropped::decode(&f.1).unwrap())
        .collect();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].publisher, id(1));
    assert_eq!(reports[0].epoch, 101);
    assert_eq!(reports[0].topics, vec![("t.x".to_string(), 3)]);
    // The client, in turn, reports its own drops to the gateway, which
    // passes them to the nodes it routes t.x to (node 3 here).
    let dht = Dht::with(&[("t", record(3, 1, "t.*"))]);
    route(&mut gw, &dht, "t.x", ms(3));
    actions(&mut gw);
    let own = macula_wire::Message::PublishDropped(macula_wire::PublishDropped {
        publisher: id(50),
        epoch: 7,
        in_flight: 0,
        topics: vec![("t.x".into(), 2)],
    });
    let mut buf = Vec::new();
    own.encode_frame(&mut buf, 1 << 20).unwrap();
    let body = Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..]);
    let t = macula_wire::MessageType::PublishDropped as u8;
    let mut crx = BatchReceiver::new(true);
    gw.handle_batch(id(50), t, &body, &mut crx, ms(3)).unwrap();
    let (nq, to) = starts(&actions(&mut gw))[0];
    assert_eq!(to, id(3));
    let onward = transmit_frames(&mut gw, nq, ms(4));
    let d = macula_wire::PublishDropped::decode(&onward[0].1).unwrap();
    assert_eq!((d.publisher, d.epoch), (id(50), 7));
    assert_eq!(d.topics, vec![("t.x".to_string(), 2)]);
    // A client may not report another publisher's losses.
    let forged = macula_wire::Message::PublishDropped(macula_wire::PublishDropped {
        publisher: id(9),
        epoch: 7,
        in_flight: 0,
        topics: vec![("t.x".into(), 2)],
    });
    let mut buf = Vec::new();
    forged.encode_frame(&mut buf, 1 << 20).unwrap();
    let body = Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..]);
    assert!(gw.handle_batch(id(50), t, &body, &mut crx, ms(5)).is_err());
}

#[test]
fn a_node_that_is_gone_is_not_told_and_the_loss_is_counted_unreported() {
    let (mut a, r, q, _b) = lossy_pair(1);
    publish_with(&mut a, &r, "m1", Overflow::DropNewest).unwrap();
    publish_with(&mut a, &r, "m2", Overflow::DropNewest).unwrap();
    // And an in-flight count from a cut-off that was never told either.
    let no_msgs: Vec<OutMsg> = Vec::new();
    let mut probe = Vec::new();
    let Transmit::Batch(b) = a.poll_transmit(q, &mut probe, ms(1)) else {
        panic!("a batch");
    };
    a.handle_send_failed(q, &probe, b.report, ms(1));
    let _ = no_msgs;
    a.handle_peer_down(&id(2), PeerDown::Left, ms(1));
    // m0 (taken, then the stream failed), m1, m2.
    assert_eq!(counter(&a, |c| &c.loss_unreported_total), 3);
    // A report with an in-flight count, forgotten with its node, counts it.
    let (mut c, r2, q2, _d) = lossy_pair(4);
    publish_with(&mut c, &r2, "n1", Overflow::DropNewest).unwrap();
    let mut taken = Vec::new();
    let Transmit::Batch(tb) = c.poll_transmit(q2, &mut taken, ms(1)) else {
        panic!("a batch");
    };
    let later = ms(1).saturating_add(macula_pubsub::outbound::PEER_STALL_TIMEOUT);
    assert!(matches!(c.handle_stall(q2, later), Stall::CutOff { .. }));
    c.handle_cut_off(id(2), tb, &taken, None, 6, later);
    c.handle_peer_down(&id(2), PeerDown::Left, later);
    // m0 and n1 lost with the cut-off, 6 in flight: 8 nobody will hear of.
    assert_eq!(counter(&c, |c| &c.loss_unreported_total), 8);
    let mut msgs = Vec::new();
    assert!(matches!(
        a.poll_transmit(q, &mut msgs, ms(2)),
        Transmit::Retired
    ));
}

#[test]
fn a_write_cut_off_part_way_counts_its_whole_frames_as_in_flight() {
    let (mut a, r, q, _b) = lossy_pair(16);
    // Frames of one 1,000-byte message each (node 2's frame limit).
    a.handle_peer_up(&id(2), 1500);
    let body = "x".repeat(1000);
    for _ in 0..3 {
        publish(&mut a, &r, &body, ms(1));
    }
    let mut msgs = Vec::new();
    let Transmit::Batch(b) = a.poll_transmit(q, &mut msgs, ms(1)) else {
        panic!("a batch");
    };
    assert_eq!(b.n, 4, "m0 and the three");
    let mut buf = Vec::new();
    let mut marks = Vec::new();
    let e = b.encode_marked(&mut buf, &msgs, &mut marks);
    assert_eq!((e.frames, marks.len()), (3, 3), "m0 fits with one other");
    assert_eq!(marks[0].messages, 2);
    // The first frame went out whole, the second did not.
    let later = ms(1).saturating_add(macula_pubsub::outbound::PEER_STALL_TIMEOUT);
    assert_eq!(a.handle_stall(q, later), Stall::CutOff { dropped: 4 });
    a.handle_cut_off(id(2), b, &msgs, Some(marks[0]), 7, later);
    let (q2, _) = starts(&actions(&mut a))[0];
    let frames = transmit_frames(&mut a, q2, later);
    let d = macula_wire::PublishDropped::decode(&frames[0].1).unwrap();
    assert_eq!(d.in_flight, 7 + marks[0].messages);
    assert_eq!(d.topics, vec![("t.x".to_string(), 4 - marks[0].messages)]);
}

#[test]
fn a_batch_with_a_report_counts_what_the_receiver_counts() {
    let (mut a, r, q, mut b) = lossy_pair(1);
    for i in 1..4 {
        publish_with(&mut a, &r, &format!("m{i}"), Overflow::DropOldest).unwrap();
    }
    let mut msgs = Vec::new();
    let Transmit::Batch(batch) = a.poll_transmit(q, &mut msgs, ms(1)) else {
        panic!("a batch");
    };
    assert_eq!(batch.report.as_ref().map(|r| r.dropped()), Some(3));
    let mut buf = Vec::new();
    let mut marks = Vec::new();
    let e = batch.encode_marked(&mut buf, &msgs, &mut marks);
    // The report's mark, then the batch's: both count the 3 reported.
    assert_eq!(marks.len(), 2);
    assert_eq!((marks[0].messages, marks[1].messages), (3, 4));
    assert_eq!(batch.carried(&e), 4);
    assert_eq!(e.frames, 2);
    // The receiver counts the same on its stream.
    let dec = FrameDecoder::new(1 << 20);
    let mut rx = BatchReceiver::new(false);
    let mut rest = &buf[..];
    while let Some((f, used)) = dec.decode(rest).unwrap() {
        b.handle_batch(
            id(1),
            f.header.msg_type,
            &Bytes::copy_from_slice(f.body),
            &mut rx,
            ms(2),
        )
        .unwrap();
        rest = &rest[used..];
    }
    assert_eq!(rx.messages(), 4);
    // One subscription, told of 3, with one event pending for it.
    let pending: Vec<(u32, usize, usize)> =
        rx.pending().map(|(s, n, bytes)| (*s, n, bytes)).collect();
    assert_eq!(pending, vec![(7, 1, 2)]);
    assert_eq!(rx.deliver_lagged(|_, _| {}), 3);
}

#[test]
fn merged_batches_add_their_messages_and_reports() {
    let (mut a, r, q, _b) = lossy_pair(1);
    publish_with(&mut a, &r, "m1", Overflow::DropNewest).unwrap();
    let mut msgs = Vec::new();
    let Transmit::Batch(mut first) = a.poll_transmit(q, &mut msgs, ms(1)) else {
        panic!("a batch");
    };
    publish_with(&mut a, &r, "m2", Overflow::DropNewest).unwrap();
    publish_with(&mut a, &r, "m3", Overflow::DropNewest).unwrap();
    publish_with(&mut a, &r, "m4", Overflow::DropNewest).unwrap();
    let Transmit::Batch(second) = a.poll_transmit(q, &mut msgs, ms(1)) else {
        panic!("a batch");
    };
    assert_eq!((first.n, second.n), (1, 1));
    first.merge(second);
    assert_eq!(first.n, 2);
    assert_eq!(first.report.as_ref().map(|r| r.dropped()), Some(3));
}

#[test]
fn a_report_that_went_out_before_a_cut_off_is_counted_reported_once() {
    let (mut a, r, q, _b) = lossy_pair(1);
    for i in 1..3 {
        publish_with(&mut a, &r, &format!("m{i}"), Overflow::DropNewest).unwrap();
    }
    let mut msgs = Vec::new();
    let Transmit::Batch(b1) = a.poll_transmit(q, &mut msgs, ms(1)) else {
        panic!("a batch");
    };
    // An earlier cut-off's in-flight count rides along.
    let mut b1 = b1;
    if let Some(rep) = b1.report.as_mut() {
        rep.in_flight = 5;
    }
    let mut buf = Vec::new();
    let mut marks = Vec::new();
    b1.encode_marked(&mut buf, &msgs, &mut marks);
    let later = ms(1).saturating_add(macula_pubsub::outbound::PEER_STALL_TIMEOUT);
    assert!(matches!(a.handle_stall(q, later), Stall::CutOff { .. }));
    // The report's frames went out whole, the message did not.
    a.handle_cut_off(id(2), b1, &msgs, Some(marks[0]), 0, later);
    assert_eq!(counter(&a, |c| &c.loss_reported_total), 2 + 5);
    let (q2, _) = starts(&actions(&mut a))[0];
    let frames = transmit_frames(&mut a, q2, later);
    let d = macula_wire::PublishDropped::decode(&frames[0].1).unwrap();
    // Not reported again; the unsent message is, with what went out whole.
    assert_eq!(d.topics, vec![("t.x".to_string(), 1)]);
    assert_eq!(d.in_flight, 2);
}

#[test]
fn drops_with_no_room_in_the_report_table_are_counted_unreported() {
    // A gateway with room for one outbound queue (and one pending report),
    // two attached clients subscribed to t.*.
    let mut cfg = config(2, Role::Node);
    cfg.limits.max_outbound_peers = 1;
    let mut gw = PubSubCore::<u32, ()>::new(cfg);
    for client in [50, 51] {
        let feed = gw.open_feed(id(client));
        gw.feed_add(feed, "t.*").unwrap();
    }
    actions(&mut gw);
    let report = macula_wire::Message::PublishDropped(macula_wire::PublishDropped {
        publisher: id(1),
        epoch: 101,
        in_flight: 0,
        topics: vec![("t.x".into(), 4)],
    });
    let mut buf = Vec::new();
    report.encode_frame(&mut buf, 1 << 20).unwrap();
    let body = Bytes::copy_from_slice(&buf[macula_wire::FRAME_HEADER_LEN..]);
    let t = macula_wire::MessageType::PublishDropped as u8;
    let mut rx = BatchReceiver::new(false);
    gw.handle_batch(id(1), t, &body, &mut rx, ms(0)).unwrap();
    // One client's report fits; the other's 4 are counted unreported.
    assert_eq!(counter(&gw, |c| &c.loss_unreported_total), 4);
    assert_eq!(starts(&actions(&mut gw)).len(), 1);
}

/// Issue 15 (security): a client may publish only as itself. A batch on a
/// client's data stream naming another publisher is refused as a whole
/// (the stream is stopped, PROTOCOL.md §7), so the gateway neither forwards
/// it nor delivers it to its other clients or its own subscriptions.
#[test]
fn a_gateway_refuses_a_clients_batch_naming_another_publisher() {
    // Node 2 is the gateway of clients 50 and 51; 51 subscribes.
    let mut gw = node(2);
    let feed = gw.open_feed(id(51));
    gw.feed_add(feed, "t.*").unwrap();
    actions(&mut gw);
    // A batch published by 50 ...
    let mut mine = node(50);
    let dht = Dht::with(&[("t", record(2, 1, "t.*"))]);
    let rm = route(&mut mine, &dht, "t.x", ms(0));
    publish(&mut mine, &rm, "forged", ms(0));
    let (mq, _) = starts(&actions(&mut mine))[0];
    let bodies = transmit(&mut mine, mq, ms(0));
    // ... sent by client 52 on its own data stream.
    let mut rx = BatchReceiver::new(true);
    let res = gw.handle_batch(
        id(52),
        macula_wire::MessageType::PublishBatch as u8,
        &bodies[0],
        &mut rx,
        ms(1),
    );
    let err = res.expect_err("refused");
    assert!(err.contains("names publisher"), "{err}");
    assert_eq!(counter(&gw, |c| &c.data_streams_rejected_total), 1);
    assert_eq!(counter(&gw, |c| &c.forwarded_sent_total), 0);
    let mut delivered = 0;
    rx.deliver(|_, e| delivered += e.len());
    assert_eq!(delivered, 0);
    assert!(
        starts(&actions(&mut gw)).is_empty(),
        "nothing queued to client 51"
    );
    // The same batch from its real publisher goes through.
    let mut rx = BatchReceiver::new(true);
    gw.handle_batch(
        id(50),
        macula_wire::MessageType::PublishBatch as u8,
        &bodies[0],
        &mut rx,
        ms(2),
    )
    .expect("its own batch");
    assert_eq!(counter(&gw, |c| &c.forwarded_sent_total), 1);
}
