//! Unit-level behaviour of one `Dht`, driven by hand (exact control over which
//! message arrives when) or through a small lossless simulated mesh.

use macula_dht::{
    Config, Contact, CorrelationId, Dht, Event, InsecureNoAuth, LookupKind, LookupOutcome, Millis,
    NodeId, Outgoing, PutError, Record, RecordAuth, RecordError, Request, RequestError, Response,
};
use macula_sim::{NetConfig, Sim};

// ----- helpers --------------------------------------------------------------

fn id(b: u8) -> NodeId {
    NodeId::from_bytes([b; 32])
}

fn contact(b: u8) -> Contact {
    Contact::new(id(b), format!("peer-{b}"))
}

fn node(b: u8, config: Config) -> Dht {
    Dht::new(config, contact(b), Box::new(InsecureNoAuth), u64::from(b))
}

fn drain(dht: &mut Dht) -> (Vec<Outgoing>, Vec<Event>) {
    let mut out = Vec::new();
    while let Some(o) = dht.poll_transmit() {
        out.push(o);
    }
    let mut events = Vec::new();
    while let Some(e) = dht.poll_event() {
        events.push(e);
    }
    (out, events)
}

fn record(key: NodeId, publisher: NodeId, seq: u64, ttl: Millis, value: &[u8]) -> Record {
    Record {
        key,
        publisher,
        seq,
        ttl,
        value: value.to_vec(),
        signature: Vec::new(),
    }
}

/// Refuses every signature: a node using it accepts no record from anyone.
struct RejectAll;

impl RecordAuth for RejectAll {
    fn sign(&self, _msg: &[u8]) -> Vec<u8> {
        vec![1]
    }
    fn verify(&self, _publisher: &NodeId, _msg: &[u8], _signature: &[u8]) -> bool {
        false
    }
}

fn lossless() -> NetConfig {
    NetConfig::lossless(Millis(5), Millis(20))
}

/// `n` nodes joined through node 0, settled for 10 s of simulated time.
fn mesh(n: usize, seed: u64, config: &Config) -> Sim {
    let mut sim = Sim::new(lossless(), seed);
    for _ in 0..n {
        sim.add_node(config.clone());
    }
    sim.schedule_start(0, &[], Millis::ZERO);
    for i in 1..n {
        sim.schedule_start(i, &[0], Millis(10 * i as u64));
    }
    sim.run_until(Millis(10_000));
    sim.take_events();
    sim
}

/// Runs until node `i` reports an event matching `pick`, for at most 60 s.
fn wait_event<T>(sim: &mut Sim, i: usize, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    let deadline = sim.now().saturating_add(Millis(60_000));
    let mut found = None;
    sim.run_until_or(deadline, |s| {
        s.events().iter().any(|(n, e)| *n == i && pick(e).is_some())
    });
    for (n, e) in sim.take_events() {
        if n == i && found.is_none() {
            found = pick(&e);
        }
    }
    found.unwrap_or_else(|| panic!("sim seed {}: no event from node {i}", sim.seed()))
}

fn put(
    sim: &mut Sim,
    i: usize,
    key: NodeId,
    value: &[u8],
    ttl: Millis,
) -> Result<Vec<NodeId>, PutError> {
    let value = value.to_vec();
    let put_id = sim
        .command(i, |d, now| d.put(key, value, ttl, now))
        .expect("put accepted locally");
    wait_event(sim, i, |e| match e {
        Event::PutFinished { id, result, .. } if *id == put_id => Some(result.clone()),
        _ => None,
    })
}

fn get(sim: &mut Sim, i: usize, key: NodeId) -> LookupOutcome {
    let lookup = sim
        .command(i, |d, now| d.get(key, now))
        .expect("lookup starts");
    wait_event(sim, i, |e| match e {
        Event::LookupFinished { id, outcome } if *id == lookup => Some(outcome.clone()),
        _ => None,
    })
}

// ----- bootstrap ------------------------------------------------------------

#[test]
fn first_node_waits_for_others() {
    let mut d = node(1, Config::default());
    d.bootstrap(Vec::new(), Millis(0));
    let (out, events) = drain(&mut d);
    assert!(out.is_empty());
    assert_eq!(events, vec![Event::Bootstrapped { n_contacts: 0 }]);
    // Only the refresh timer is armed.
    assert_eq!(
        d.poll_timeout(),
        Some(Config::default().refresh_check_interval)
    );
}

#[test]
fn requests_from_our_own_id_are_refused_and_never_stored() {
    let mut d = node(1, Config::default());
    let r = d.handle_request(&contact(1), Request::Ping, Millis(0));
    assert_eq!(r, Err(RequestError::FromSelf));
    assert!(d.routing().is_empty());
    assert_eq!(d.stats().requests_malformed, 1);
}

// ----- requests, timeouts, retries, unmatched responses ---------------------

#[test]
fn silent_peer_is_retried_once_then_evicted() {
    let config = Config::default();
    let timeout = config.request_timeout;
    let mut d = node(1, config);
    d.bootstrap(vec![contact(2)], Millis(0));
    let (out, _) = drain(&mut d);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].to, contact(2));
    assert_eq!(out[0].request, Request::FindNode { target: id(1) });
    let first = out[0].correlation_id;
    assert_eq!(d.poll_timeout(), Some(timeout));

    // First timeout: the same request again, under a new correlation ID.
    d.handle_timeout(timeout);
    let (out, events) = drain(&mut d);
    assert!(events.is_empty());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].request, Request::FindNode { target: id(1) });
    assert_ne!(out[0].correlation_id, first);
    assert_eq!(d.stats().retries, 1);

    // The answer to the first attempt arrives late: dropped and counted.
    d.handle_response(
        &id(2),
        first,
        Response::Nodes { closer: vec![] },
        Millis(1_500),
    );
    assert_eq!(d.stats().responses_unmatched, 1);

    // A peer that stays silent through the retry is evicted once it has not
    // been heard from since the request went out.
    let mut d = node(1, Config::default());
    d.bootstrap(vec![contact(2)], Millis(0));
    drain(&mut d);
    d.handle_timeout(timeout);
    drain(&mut d);
    d.handle_timeout(Millis(2 * timeout.0));
    let (out, events) = drain(&mut d);
    assert!(out.is_empty());
    assert_eq!(events, vec![Event::Bootstrapped { n_contacts: 0 }]);
    let stats = d.stats();
    assert_eq!(stats.request_timeouts, 2);
    assert_eq!(stats.peers_evicted, 1);
    assert!(!d.routing().contains(&id(2)));

    // A join that reached nobody is retried soon, with a doubling backoff.
    let retry_min = d.config().join_retry_min;
    let rejoin = Millis(2 * timeout.0 + retry_min.0);
    assert_eq!(d.poll_timeout(), Some(rejoin));
    d.handle_timeout(rejoin);
    let (out, _) = drain(&mut d);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].to.id, &out[0].request),
        (id(2), &Request::FindNode { target: id(1) })
    );
    d.handle_timeout(Millis(rejoin.0 + timeout.0));
    drain(&mut d);
    d.handle_timeout(Millis(rejoin.0 + 2 * timeout.0));
    drain(&mut d);
    assert_eq!(
        d.poll_timeout(),
        Some(Millis(rejoin.0 + 2 * timeout.0 + 2 * retry_min.0))
    );
}

#[test]
fn a_peer_that_leaves_is_dropped_without_waiting_for_timeouts() {
    let mut d = node(1, Config::default());
    // Learn two contacts: 2 answers the join, 3 is one of its neighbours.
    d.bootstrap(vec![contact(2)], Millis(0));
    let (out, _) = drain(&mut d);
    d.handle_response(
        &id(2),
        out[0].correlation_id,
        Response::Nodes {
            closer: vec![contact(3)],
        },
        Millis(10),
    );
    let (out, _) = drain(&mut d);
    assert!(out.iter().any(|o| o.to.id == id(3)), "asks 3 next: {out:?}");
    assert!(d.routing().contains(&id(2)));
    // 3 says goodbye before answering: its request fails at once, the join
    // ends without waiting for two timeouts, and 3 is forgotten.
    d.peer_left(&id(3), Millis(20));
    let (out, events) = drain(&mut d);
    assert!(
        out.iter().all(|o| o.to.id != id(3)),
        "no retry to 3: {out:?}"
    );
    assert!(!d.routing().contains(&id(3)));
    assert_eq!(d.n_pending(), out.len());
    if out.is_empty() {
        assert_eq!(events, vec![Event::Bootstrapped { n_contacts: 1 }]);
    }
    assert_eq!(d.stats().retries, 0);
    // A peer we never knew leaving is harmless.
    d.peer_left(&id(9), Millis(30));
    assert!(d.routing().contains(&id(2)));
}

/// Found by macula-sim (a partition cut many connections at once and two
/// runs of one seed diverged): `peer_left` failed the peer's requests in
/// hash-map order, so the requests the lookups sent next went out in a
/// different order in two identical nodes.
#[test]
fn a_peer_leaving_fails_its_requests_in_a_replayable_order() {
    let run = || {
        let mut d = node(1, Config::default());
        d.bootstrap(vec![contact(2)], Millis(0));
        let (out, _) = drain(&mut d);
        let closer = (3..=12).map(contact).collect();
        d.handle_response(
            &id(2),
            out[0].correlation_id,
            Response::Nodes { closer },
            Millis(10),
        );
        // Everyone answers the join: all are in the routing table.
        let (out, _) = drain(&mut d);
        for o in out {
            d.handle_response(
                &o.to.id,
                o.correlation_id,
                Response::Nodes { closer: vec![] },
                Millis(20),
            );
        }
        drain(&mut d);
        // Many lookups, several of them waiting on node 3.
        for k in 0..40u8 {
            let _ = d.get(NodeId::from_bytes([k.wrapping_mul(7); 32]), Millis(30));
        }
        drain(&mut d);
        d.peer_left(&id(3), Millis(40));
        let (out, events) = drain(&mut d);
        format!("{out:?} {events:?}")
    };
    let first = run();
    for _ in 0..4 {
        assert_eq!(run(), first, "two identical nodes diverged");
    }
}

#[test]
fn unmatched_and_misattributed_responses_are_dropped() {
    let mut d = node(1, Config::default());
    d.bootstrap(vec![contact(2)], Millis(0));
    let (out, _) = drain(&mut d);
    let cid = out[0].correlation_id;

    // Unknown correlation ID.
    d.handle_response(
        &id(2),
        CorrelationId(cid.0.wrapping_add(1000)),
        Response::Pong,
        Millis(10),
    );
    // Right ID, wrong peer: must not cancel our request.
    d.handle_response(
        &id(3),
        cid,
        Response::Nodes {
            closer: vec![contact(9)],
        },
        Millis(10),
    );
    assert_eq!(d.stats().responses_unmatched, 2);
    assert_eq!(d.n_pending(), 1);

    // The real answer still completes the join.
    d.handle_response(&id(2), cid, Response::Nodes { closer: vec![] }, Millis(20));
    let (_, events) = drain(&mut d);
    assert!(events.contains(&Event::Bootstrapped { n_contacts: 1 }));
    assert_eq!(d.stats().responses_unmatched, 2);
}

#[test]
fn wrong_kind_and_oversized_responses_are_counted() {
    let config = Config {
        k: 4,
        max_contacts_per_response: 4,
        ..Config::default()
    };
    let mut d = node(1, config);
    d.bootstrap(vec![contact(2), contact(3)], Millis(0));
    let (out, _) = drain(&mut d);
    let to2 = out.iter().find(|o| o.to.id == id(2)).expect("asks 2");
    let to3 = out.iter().find(|o| o.to.id == id(3)).expect("asks 3");
    // A FIND_NODE answered with Stored: malformed, that peer fails the lookup.
    d.handle_response(&id(2), to2.correlation_id, Response::Stored, Millis(10));
    // Ten contacts where at most four are allowed: truncated and counted.
    let many: Vec<Contact> = (10..20).map(contact).collect();
    d.handle_response(
        &id(3),
        to3.correlation_id,
        Response::Nodes { closer: many },
        Millis(10),
    );
    assert_eq!(d.stats().responses_malformed, 2);
    let (out, _) = drain(&mut d);
    // Only the first four contacts were taken up (3 asked now, alpha = 3).
    assert!(
        out.iter().all(|o| (10..14).any(|b| o.to.id == id(b))),
        "{out:?}"
    );
}

#[test]
fn flooding_peer_is_rate_limited_and_malformed_input_penalised() {
    let config = Config {
        rate_limit_burst: 5,
        rate_limit_per_sec: 1,
        ..Config::default()
    };
    let mut d = node(1, config);
    for _ in 0..5 {
        assert_eq!(
            d.handle_request(&contact(2), Request::Ping, Millis(0)),
            Ok(Response::Pong)
        );
    }
    assert_eq!(
        d.handle_request(&contact(2), Request::Ping, Millis(0)),
        Err(RequestError::RateLimited)
    );
    // Another peer is unaffected; the flooder recovers with time.
    assert_eq!(
        d.handle_request(&contact(3), Request::Ping, Millis(0)),
        Ok(Response::Pong)
    );
    assert_eq!(
        d.handle_request(&contact(2), Request::Ping, Millis(1_000)),
        Ok(Response::Pong)
    );
    // A malformed message costs the whole burst.
    d.report_malformed(&id(3), Millis(1_000));
    assert_eq!(
        d.handle_request(&contact(3), Request::Ping, Millis(1_000)),
        Err(RequestError::RateLimited)
    );
    let stats = d.stats();
    assert_eq!(stats.requests_rate_limited, 2);
    assert_eq!(stats.requests_malformed, 1);
    assert_eq!(stats.requests_received, 9);
}

// ----- lookups --------------------------------------------------------------

#[test]
fn lookup_terminates_with_the_true_k_closest() {
    let config = Config::default();
    let mut sim = mesh(120, 11, &config);
    let target = sim.id(77);
    let outcome = get_node(&mut sim, 5, target);
    assert!(outcome.found_target(), "seed 11: {outcome:?}");
    // Brute force: the k closest of all node IDs other than the asker.
    let mut all: Vec<NodeId> = (0..sim.len())
        .filter(|&i| i != 5)
        .map(|i| sim.id(i))
        .collect();
    all.sort_by_key(|n| n.distance(&target));
    all.truncate(config.k);
    let got: Vec<NodeId> = outcome.closest.iter().map(|c| c.id).collect();
    assert_eq!(got, all, "seed 11");
    assert!(outcome.stats.rounds >= 1);
    assert!(outcome.stats.n_requests as usize >= config.k);
    assert!(outcome.stats.n_requests as usize <= config.max_lookup_requests);
}

fn get_node(sim: &mut Sim, i: usize, target: NodeId) -> LookupOutcome {
    let tag = sim.schedule_lookup(i, target, LookupKind::FindNode, sim.now());
    let deadline = sim.now().saturating_add(Millis(60_000));
    sim.run_until_or(deadline, |s| s.results().iter().any(|(t, _)| *t == tag));
    sim.take_results()
        .into_iter()
        .find(|(t, _)| *t == tag)
        .map(|(_, o)| o)
        .unwrap_or_else(|| panic!("sim seed {}: lookup did not finish", sim.seed()))
}

#[test]
fn lookup_with_empty_table_finishes_at_once() {
    let mut d = node(1, Config::default());
    let lookup = d
        .start_lookup(id(9), LookupKind::FindNode, Millis(0))
        .expect("starts");
    let (out, events) = drain(&mut d);
    assert!(out.is_empty());
    match &events[..] {
        [Event::LookupFinished { id, outcome }] => {
            assert_eq!(*id, lookup);
            assert!(outcome.closest.is_empty());
            assert!(!outcome.found_target());
        }
        other => panic!("{other:?}"),
    }
}

// ----- records --------------------------------------------------------------

#[test]
fn put_reaches_quorum_and_get_collects_replicas() {
    let config = Config::default();
    let mut sim = mesh(60, 21, &config);
    let key = NodeId::from_bytes([0x42; 32]);
    let stored = put(&mut sim, 3, key, b"hello", Millis::from_secs(600)).expect("quorum");
    assert_eq!(
        stored.len(),
        config.k,
        "all 20 replicas confirm on a lossless net"
    );
    // Every confirmed replica holds it.
    for n in &stored {
        let i = (0..sim.len())
            .find(|&i| sim.id(i) == *n)
            .expect("known node");
        assert!(sim.dht(i).store().get_one(&key, &sim.id(3)).is_some());
    }
    let outcome = get(&mut sim, 40, key);
    assert_eq!(outcome.records.len(), 1);
    assert_eq!(outcome.records[0].value, b"hello");
    assert_eq!(outcome.records[0].publisher, sim.id(3));

    // A second publisher under the same key: get returns both.
    put(&mut sim, 7, key, b"world", Millis::from_secs(600)).expect("quorum");
    let outcome = get(&mut sim, 50, key);
    let mut values: Vec<&[u8]> = outcome.records.iter().map(|r| r.value.as_slice()).collect();
    values.sort();
    assert_eq!(values, vec![&b"hello"[..], &b"world"[..]]);
}

#[test]
fn record_seq_grows_from_the_seq_base_across_restarts() {
    // A restarted node's clock restarts at zero; its seq base (the epoch)
    // is what keeps its record seqs above the last run's.
    let base = 5_000_000_000;
    let config = Config {
        seq_base: base,
        ..Config::default()
    };
    let mut sim = mesh(8, 5, &config);
    let key = NodeId::from_bytes([0x17; 32]);
    let before = sim.now();
    put(&mut sim, 2, key, b"one", Millis::from_secs(600)).expect("quorum");
    let first = get(&mut sim, 4, key).records[0].seq;
    assert!(first >= base + before.0, "seq {first} below base + now");
    assert!(first <= base + sim.now().0, "seq {first} above base + now");
    put(&mut sim, 2, key, b"two", Millis::from_secs(600)).expect("quorum");
    let second = get(&mut sim, 5, key).records[0].seq;
    assert!(second > first, "a later put carries a higher seq");
}

#[test]
fn a_put_right_after_an_unpublish_is_not_stale() {
    // Puts within one millisecond count the seq up past `seq_base + now`;
    // an unpublish must not forget that, or the next put of the key carries
    // a lower seq and every replica refuses it as stale.
    let config = Config::default();
    let mut sim = mesh(8, 5, &config);
    let key = NodeId::from_bytes([0x2a; 32]);
    for v in 0..5u8 {
        sim.command(2, |d, now| d.put(key, vec![v], Millis::from_secs(600), now))
            .expect("put accepted locally");
    }
    assert!(sim.command(2, |d, _| d.unpublish(&key)));
    put(&mut sim, 2, key, b"again", Millis::from_secs(600)).expect("quorum, not stale");
    let outcome = get(&mut sim, 4, key);
    assert_eq!(outcome.records.len(), 1);
    assert_eq!(outcome.records[0].value, b"again");
}

#[test]
fn put_fails_below_quorum() {
    // Every node but the publisher refuses all signatures.
    let mut sim = Sim::new(lossless(), 31);
    let mut rng = macula_dht::rng::Rng::new(31);
    sim.add_node_with(rng.node_id(), Config::default(), Box::new(InsecureNoAuth));
    for _ in 1..30 {
        sim.add_node_with(rng.node_id(), Config::default(), Box::new(RejectAll));
    }
    sim.schedule_start(0, &[], Millis::ZERO);
    for i in 1..30 {
        sim.schedule_start(i, &[0], Millis(10 * i as u64));
    }
    sim.run_until(Millis(10_000));
    sim.take_events();
    let key = sim.id(0); // publisher is a replica, so exactly one confirmation
    match put(&mut sim, 0, key, b"x", Millis::from_secs(60)) {
        Err(PutError::QuorumNotReached { stored, needed }) => {
            assert_eq!(stored, vec![sim.id(0)]);
            assert_eq!(needed, Config::default().store_quorum(20));
        }
        other => panic!("seed 31: expected quorum failure, got {other:?}"),
    }
    assert!(sim.dht(0).stats().puts_failed >= 1);
    assert!(
        (1..30)
            .map(|i| sim.dht(i).stats().records_rejected)
            .sum::<u64>()
            >= 19
    );
}

#[test]
fn records_expire_at_their_ttl_without_republish() {
    let mut sim = mesh(40, 41, &Config::default());
    let key = NodeId::from_bytes([0x11; 32]);
    put(&mut sim, 2, key, b"short", Millis::from_secs(20)).expect("quorum");
    // The publisher stops republishing before the first republish is due.
    assert!(sim.command(2, |d, _| d.unpublish(&key)));
    sim.run_until(sim.now().saturating_add(Millis::from_secs(10)));
    assert_eq!(get(&mut sim, 30, key).records.len(), 1);
    sim.run_until(sim.now().saturating_add(Millis::from_secs(11)));
    assert!(
        get(&mut sim, 30, key).records.is_empty(),
        "seed 41: still there"
    );
    let expired: u64 = (0..sim.len())
        .map(|i| sim.dht(i).stats().records_expired)
        .sum();
    assert!(expired >= 11, "expired {expired}");
}

#[test]
fn publisher_republishes_before_expiry() {
    let mut sim = mesh(40, 51, &Config::default());
    let key = NodeId::from_bytes([0x22; 32]);
    put(&mut sim, 4, key, b"kept", Millis::from_secs(20)).expect("quorum");
    // Three TTLs later it is still there, because it was republished.
    sim.run_until(sim.now().saturating_add(Millis::from_secs(60)));
    assert_eq!(get(&mut sim, 33, key).records.len(), 1, "seed 51");
    assert!(sim.dht(4).stats().republishes >= 3);
    assert!(sim.dht(4).stats().puts_succeeded >= 4);
}

#[test]
fn records_move_to_a_newly_joined_closer_node() {
    let mut sim = mesh(40, 61, &Config::default());
    let key = NodeId::from_bytes([0x33; 32]);
    put(&mut sim, 6, key, b"moved", Millis::from_secs(600)).expect("quorum");
    // A newcomer whose ID is the key but for its last bit: closer than anyone.
    let mut bytes = *key.as_bytes();
    bytes[31] ^= 1;
    let newcomer = sim.add_node_with(
        NodeId::from_bytes(bytes),
        Config::default(),
        Box::new(InsecureNoAuth),
    );
    sim.schedule_start(newcomer, &[0], sim.now());
    sim.run_until(sim.now().saturating_add(Millis::from_secs(10)));
    let held = sim.dht(newcomer).store().get_one(&key, &sim.id(6));
    assert!(held.is_some(), "seed 61: not replicated to the newcomer");
    let replicated: u64 = (0..sim.len())
        .map(|i| sim.dht(i).stats().records_replicated)
        .sum();
    assert!(replicated >= 1);
}

#[test]
fn record_limits_each_have_their_error() {
    let config = Config {
        max_value_len: 8,
        max_ttl: Millis::from_secs(100),
        max_records: 2,
        max_records_per_publisher: 1,
        ..Config::default()
    };
    let mut d = node(1, config.clone());
    // Local puts.
    assert_eq!(
        d.put(id(9), vec![0; 9], Millis(10), Millis(0)),
        Err(PutError::Record(RecordError::ValueTooLarge {
            len: 9,
            max: 8
        }))
    );
    assert_eq!(
        d.put(id(9), vec![], Millis::from_secs(101), Millis(0)),
        Err(PutError::Record(RecordError::TtlTooLong {
            ttl: Millis::from_secs(101),
            max: Millis::from_secs(100)
        }))
    );
    assert_eq!(
        d.put(id(9), vec![], Millis(0), Millis(0)),
        Err(PutError::Record(RecordError::TtlZero))
    );
    assert!(d.put(id(9), vec![1], Millis(10), Millis(0)).is_ok());
    assert_eq!(
        d.put(id(10), vec![1], Millis(10), Millis(0)),
        Err(PutError::TooManyPublished { max: 1 })
    );

    // STOREs from peers.
    let mut d = node(1, config);
    let store = |key: u8, publisher: u8, seq: u64| Request::Store {
        record: record(id(key), id(publisher), seq, Millis(100), b"v"),
        ttl: Millis(100),
    };
    assert_eq!(
        d.handle_request(&contact(2), store(50, 2, 5), Millis(0)),
        Ok(Response::Stored)
    );
    assert_eq!(
        d.handle_request(&contact(2), store(51, 2, 1), Millis(0)),
        Ok(Response::StoreRejected(RecordError::PublisherFull {
            max: 1
        }))
    );
    assert_eq!(
        d.handle_request(&contact(2), store(50, 2, 4), Millis(0)),
        Ok(Response::StoreRejected(RecordError::Stale {
            offered: 4,
            stored: 5
        }))
    );
    assert_eq!(
        d.handle_request(&contact(3), store(52, 3, 1), Millis(0)),
        Ok(Response::Stored)
    );
    assert_eq!(
        d.handle_request(&contact(4), store(53, 4, 1), Millis(0)),
        Ok(Response::StoreRejected(RecordError::StoreFull { max: 2 }))
    );
    let big = Request::Store {
        record: record(id(54), id(4), 1, Millis(100), &[0; 9]),
        ttl: Millis(100),
    };
    assert_eq!(
        d.handle_request(&contact(4), big, Millis(0)),
        Ok(Response::StoreRejected(RecordError::ValueTooLarge {
            len: 9,
            max: 8
        }))
    );
    let stats = d.stats();
    assert_eq!(stats.records_stored, 2);
    assert_eq!(stats.records_rejected, 4);

    // Expiry runs in handle_timeout and frees room.
    assert_eq!(d.poll_timeout(), Some(Millis(100)));
    d.handle_timeout(Millis(100));
    assert!(d.store().is_empty());
    assert_eq!(d.stats().records_expired, 2);
}

#[test]
fn forged_records_are_refused() {
    let mut d = Dht::new(Config::default(), contact(1), Box::new(RejectAll), 1);
    let r = d.handle_request(
        &contact(2),
        Request::Store {
            record: record(id(50), id(7), 1, Millis(100), b"forged"),
            ttl: Millis(100),
        },
        Millis(0),
    );
    assert_eq!(r, Ok(Response::StoreRejected(RecordError::BadSignature)));

    // The same record arriving in a FIND_VALUE answer is dropped, not returned.
    d.handle_request(&contact(2), Request::Ping, Millis(0))
        .expect("pong");
    let lookup = d.get(id(50), Millis(0)).expect("starts");
    let (out, _) = drain(&mut d);
    let ask = out.iter().find(|o| o.to.id == id(2)).expect("asks 2");
    d.handle_response(
        &id(2),
        ask.correlation_id,
        Response::Value {
            records: vec![record(id(50), id(7), 1, Millis(100), b"forged")],
            closer: vec![],
        },
        Millis(10),
    );
    let (_, events) = drain(&mut d);
    match &events[..] {
        [Event::LookupFinished { id: l, outcome }] => {
            assert_eq!(*l, lookup);
            assert!(outcome.records.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.stats().records_rejected, 2);
}

#[test]
fn full_bucket_pings_its_oldest_entry_and_keeps_it_if_alive() {
    let config = Config {
        k: 2,
        probe_after: Millis(0),
        ..Config::default()
    };
    let mut d = node(0x00, config);
    // IDs starting with bit 1 all fall in bucket 0 of node 0x00..
    let a = Contact::new(NodeId::from_bytes([0x80; 32]), "a");
    let b = Contact::new(NodeId::from_bytes([0x81; 32]), "b");
    let c = Contact::new(NodeId::from_bytes([0x82; 32]), "c");
    d.handle_request(&a, Request::Ping, Millis(0))
        .expect("pong");
    d.handle_request(&b, Request::Ping, Millis(1))
        .expect("pong");
    // Bucket full: c waits as a replacement, a (least recently seen) is pinged.
    d.handle_request(&c, Request::Ping, Millis(2))
        .expect("pong");
    let (out, _) = drain(&mut d);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].to.id, &out[0].request), (a.id, &Request::Ping));
    // a answers: it stays, c stays a replacement.
    d.handle_response(&a.id, out[0].correlation_id, Response::Pong, Millis(3));
    assert!(d.routing().contains(&a.id) && !d.routing().contains(&c.id));

    // Next newcomer: now b is the oldest; it stays silent and is replaced.
    let e = Contact::new(NodeId::from_bytes([0x83; 32]), "e");
    d.handle_request(&e, Request::Ping, Millis(4))
        .expect("pong");
    let (out, _) = drain(&mut d);
    assert_eq!(out[0].to.id, b.id);
    let timeout = d.config().request_timeout.0;
    d.handle_timeout(Millis(4 + timeout));
    drain(&mut d);
    d.handle_timeout(Millis(4 + 2 * timeout));
    assert!(!d.routing().contains(&b.id));
    // The most recently seen replacement took the slot.
    assert!(d.routing().contains(&e.id));
    assert_eq!(d.routing().len(), 2);
}

// ----- lost contacts ----------------------------------------------------------

/// Node 1 knows `peers` (each sent it a ping at `at`), then looks up a far ID:
/// the FIND_NODEs go unanswered, so each peer is evicted after its last
/// attempt times out. Returns when they were evicted.
fn evict_silent(d: &mut Dht, peers: &[u8], at: Millis) -> Millis {
    for &p in peers {
        d.handle_request(&contact(p), Request::Ping, at)
            .expect("pong");
    }
    d.start_lookup(id(200), LookupKind::FindNode, at)
        .expect("lookup starts");
    let timeout = d.config().request_timeout.0;
    let mut evicted = at;
    drain(d);
    for attempt in 1..=u64::from(d.config().request_attempts) {
        evicted = Millis(at.0 + attempt * timeout);
        d.handle_timeout(evicted);
        drain(d);
    }
    for &p in peers {
        assert!(!d.routing().contains(&id(p)), "{p} evicted");
        assert!(d.is_lost(&id(p)), "{p} remembered as lost");
    }
    evicted
}

/// Runs `d` to time `t` and returns the pings it sent to `peer`.
fn pings_at(d: &mut Dht, t: Millis, peer: u8) -> Vec<Outgoing> {
    d.handle_timeout(t);
    let (out, _) = drain(d);
    assert!(
        out.iter()
            .all(|o| o.to == contact(peer) && o.request == Request::Ping),
        "only pings to {peer}: {out:?}"
    );
    out
}

/// The probe times, relative to the loss, for the default configuration:
/// 15 s, then doubling waits (30 s, 60 s) capped at 120 s, while under 1 h.
fn default_schedule() -> Vec<u64> {
    let mut at = vec![15_000, 45_000, 105_000];
    while at[at.len() - 1] + 120_000 < 3_600_000 {
        at.push(at[at.len() - 1] + 120_000);
    }
    at
}

#[test]
fn a_silent_contact_is_reprobed_on_a_backoff_and_restored_when_it_answers() {
    let mut d = node(1, Config::default());
    let lost_at = evict_silent(&mut d, &[2], Millis(0));
    assert_eq!(lost_at, Millis(2_000));
    let stats = d.stats();
    assert_eq!((stats.peers_evicted, stats.lost_contacts), (1, 1));
    let timeout = d.config().request_timeout.0;
    // Probes at 15 s, 45 s, 105 s, 225 s, 345 s after the loss; each one a
    // ping, retried once, then given up without evicting or counting again.
    for (n, rel) in [15_000u64, 45_000, 105_000, 225_000]
        .into_iter()
        .enumerate()
    {
        let at = lost_at.0 + rel;
        assert_eq!(d.poll_timeout(), Some(Millis(at)), "probe {n}");
        assert!(pings_at(&mut d, Millis(at - 1), 2).is_empty(), "not early");
        assert_eq!(pings_at(&mut d, Millis(at), 2).len(), 1, "probe {n}");
        assert_eq!(pings_at(&mut d, Millis(at + timeout), 2).len(), 1, "retry");
        assert!(pings_at(&mut d, Millis(at + 2 * timeout), 2).is_empty());
        assert!(d.is_lost(&id(2)) && !d.routing().contains(&id(2)));
        let stats = d.stats();
        assert_eq!(stats.lost_contacts_probed, n as u64 + 1);
        assert_eq!((stats.peers_evicted, stats.lost_contacts), (1, 1));
    }
    // It comes back and answers the fifth probe: back in the table, off the
    // list, never probed again.
    let at = Millis(lost_at.0 + 345_000);
    assert_eq!(d.poll_timeout(), Some(at));
    let probe = pings_at(&mut d, at, 2).pop().expect("probe");
    d.handle_response(
        &id(2),
        probe.correlation_id,
        Response::Pong,
        Millis(at.0 + 50),
    );
    assert!(d.routing().contains(&id(2)));
    assert!(!d.is_lost(&id(2)));
    let stats = d.stats();
    assert_eq!(stats.lost_contacts_probed, 5);
    assert_eq!(stats.lost_contacts_restored, 1);
    assert_eq!(stats.lost_contacts, 0);
    assert_eq!(stats.lost_contacts_expired, 0);
    assert_eq!(d.poll_timeout(), None, "no timer left");
    assert!(pings_at(&mut d, Millis(10_000_000), 2).is_empty());
}

#[test]
fn a_lost_contact_is_given_up_at_the_horizon() {
    // One attempt per request: every ping seen is a probe.
    let config = Config {
        request_attempts: 1,
        ..Config::default()
    };
    let mut d = node(1, config);
    let lost_at = evict_silent(&mut d, &[2], Millis(0));
    let mut probes = Vec::new();
    while let Some(t) = d.poll_timeout() {
        if !pings_at(&mut d, t, 2).is_empty() {
            probes.push(t.0 - lost_at.0);
        }
    }
    let expected = default_schedule();
    assert_eq!(expected.len(), 32);
    assert_eq!(*expected.last().expect("probes"), 3_585_000);
    assert_eq!(probes, expected);
    let stats = d.stats();
    assert_eq!(stats.lost_contacts_probed, 32);
    assert_eq!(stats.lost_contacts_expired, 1);
    assert_eq!(stats.lost_contacts, 0);
    assert_eq!(stats.lost_contacts_restored, 0);
    assert!(!d.is_lost(&id(2)) && !d.routing().contains(&id(2)));
    // Gone for good: nothing is ever sent to it again.
    assert!(pings_at(&mut d, Millis(100_000_000), 2).is_empty());
}

#[test]
fn the_horizon_expires_exactly_on_time_and_counts_once() {
    let mut d = node(1, Config::default());
    let lost_at = evict_silent(&mut d, &[2], Millis(0));
    let timeout = d.config().request_timeout.0;
    let end = lost_at.saturating_add(d.config().lost_probe_horizon);
    // A driver that wakes up only just before the horizon: one probe (missed
    // ones are not replayed), and the next slot is the horizon itself.
    assert_eq!(pings_at(&mut d, Millis(end.0 - 1), 2).len(), 1);
    assert_eq!(d.poll_timeout(), Some(end));
    assert!(pings_at(&mut d, end, 2).is_empty());
    assert!(!d.is_lost(&id(2)));
    // The probe already in flight still gets its retry, and its failure
    // changes nothing: counted once, nothing left to do.
    assert_eq!(pings_at(&mut d, Millis(end.0 - 1 + timeout), 2).len(), 1);
    assert!(pings_at(&mut d, Millis(end.0 - 1 + 2 * timeout), 2).is_empty());
    let stats = d.stats();
    assert_eq!(
        (stats.lost_contacts_probed, stats.lost_contacts_expired),
        (1, 1)
    );
    assert_eq!((stats.peers_evicted, stats.lost_contacts), (1, 0));
    assert_eq!(d.poll_timeout(), None);
}

#[test]
fn past_the_bound_the_oldest_lost_contact_is_dropped() {
    let config = Config {
        lost_contacts_len: 2,
        ..Config::default()
    };
    let mut d = node(1, config);
    // Lost in order: 2, then 3, then 4 (each evicted 2 s after its lookup).
    evict_silent(&mut d, &[2], Millis(0));
    evict_silent(&mut d, &[3], Millis(10_000));
    assert_eq!(d.stats().lost_contacts_dropped, 0);
    evict_silent(&mut d, &[4], Millis(11_000));
    assert!(!d.is_lost(&id(2)), "the oldest loss is dropped");
    assert!(d.is_lost(&id(3)) && d.is_lost(&id(4)));
    let stats = d.stats();
    assert_eq!(stats.lost_contacts_dropped, 1);
    assert_eq!(stats.lost_contacts, 2);
    assert_eq!(stats.peers_evicted, 3);
    // 2 is never probed; 3 and 4 are, 15 s after their losses.
    let (t3, t4) = (Millis(12_000 + 15_000), Millis(13_000 + 15_000));
    d.handle_timeout(t3);
    let (out, _) = drain(&mut d);
    assert_eq!(
        out.iter().map(|o| o.to.id).collect::<Vec<_>>(),
        vec![id(3)],
        "{out:?}"
    );
    d.handle_timeout(t4);
    let (out, _) = drain(&mut d);
    assert!(out.iter().all(|o| o.to.id != id(2)), "{out:?}");
    assert!(out.iter().any(|o| o.to.id == id(4)), "{out:?}");
}

#[test]
fn a_lost_contact_heard_from_otherwise_leaves_the_list_unprobed() {
    let mut d = node(1, Config::default());
    evict_silent(&mut d, &[2, 3, 4], Millis(0));
    assert_eq!(d.stats().lost_contacts, 3);
    // 2 sends us a request: back in the table at once.
    d.handle_request(&contact(2), Request::Ping, Millis(5_000))
        .expect("pong");
    assert!(d.routing().contains(&id(2)) && !d.is_lost(&id(2)));
    // 3 shows up in an answer from 5 and answers the lookup's FIND_NODE.
    d.handle_request(&contact(5), Request::Ping, Millis(6_000))
        .expect("pong");
    d.start_lookup(id(201), LookupKind::FindNode, Millis(6_000))
        .expect("lookup starts");
    let (out, _) = drain(&mut d);
    assert!(out.iter().any(|o| o.to.id == id(5)), "asks 5: {out:?}");
    for o in out {
        let closer = if o.to.id == id(5) {
            vec![contact(3)]
        } else {
            Vec::new()
        };
        d.handle_response(
            &o.to.id,
            o.correlation_id,
            Response::Nodes { closer },
            Millis(6_010),
        );
    }
    let (out, _) = drain(&mut d);
    let to3 = out.iter().find(|o| o.to.id == id(3)).expect("asks 3");
    assert_eq!(to3.request, Request::FindNode { target: id(201) });
    // Appearing in an answer is not hearing from it: still lost.
    assert!(d.is_lost(&id(3)));
    d.handle_response(
        &id(3),
        to3.correlation_id,
        Response::Nodes { closer: vec![] },
        Millis(6_020),
    );
    assert!(d.routing().contains(&id(3)) && !d.is_lost(&id(3)));
    // 4 reaches us unlisted (behind NAT, or through a relay): it leaves the
    // list, and stays out of the table.
    d.handle_request_unlisted(&contact(4), Request::Ping, Millis(7_000))
        .expect("pong");
    assert!(!d.is_lost(&id(4)) && !d.routing().contains(&id(4)));
    drain(&mut d);
    let stats = d.stats();
    assert_eq!(stats.lost_contacts_restored, 3);
    assert_eq!(stats.lost_contacts, 0);
    // Nobody is probed: the lookups were answered, no timer is left.
    d.handle_timeout(Millis(60_000));
    let (out, _) = drain(&mut d);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(d.stats().lost_contacts_probed, 0);
}

#[test]
fn a_restarted_node_answers_the_probe_and_is_back() {
    let mut a = node(1, Config::default());
    let mut b = node(2, Config::default());
    // b joins through a; a learns b from its request.
    b.bootstrap(vec![contact(1)], Millis(0));
    let (out, _) = drain(&mut b);
    let r = a
        .handle_request(&contact(2), out[0].request.clone(), Millis(5))
        .expect("answered");
    b.handle_response(&id(1), out[0].correlation_id, r, Millis(10));
    drain(&mut b);
    assert!(a.routing().contains(&id(2)) && b.routing().contains(&id(1)));

    // b crashes: a's lookup through it goes unanswered, a evicts it.
    let lost_at = evict_silent(&mut a, &[], Millis(1_000));
    assert!(a.is_lost(&id(2)) && a.routing().is_empty());

    // b restarts (same key, same address, a new process knowing nobody) and
    // answers a's first probe: each is in the other's table again.
    let mut b = Dht::new(Config::default(), contact(2), Box::new(InsecureNoAuth), 99);
    b.bootstrap(Vec::new(), Millis(5_000));
    drain(&mut b);
    let at = lost_at.saturating_add(a.config().lost_probe_min);
    assert_eq!(a.poll_timeout(), Some(at));
    let probe = pings_at(&mut a, at, 2).pop().expect("probe");
    let pong = b
        .handle_request(&contact(1), probe.request, Millis(at.0 + 5))
        .expect("answered");
    assert_eq!(pong, Response::Pong);
    a.handle_response(&id(2), probe.correlation_id, pong, Millis(at.0 + 10));
    assert!(a.routing().contains(&id(2)) && !a.is_lost(&id(2)));
    assert!(b.routing().contains(&id(1)));
    let stats = a.stats();
    assert_eq!(
        (stats.lost_contacts_probed, stats.lost_contacts_restored),
        (1, 1)
    );
}

#[test]
fn unreachable_peers_are_reprobed_but_peers_that_left_are_not() {
    let mut d = node(1, Config::default());
    for p in [2, 3] {
        d.handle_request(&contact(p), Request::Ping, Millis(0))
            .expect("pong");
    }
    d.peer_unreachable(&id(2), Millis(100));
    d.peer_left(&id(3), Millis(100));
    assert!(!d.routing().contains(&id(2)) && !d.routing().contains(&id(3)));
    assert!(d.is_lost(&id(2)) && !d.is_lost(&id(3)));
    assert_eq!(d.stats().peers_evicted, 2);
    // Only the unreachable one is pinged, 15 s later.
    assert_eq!(d.poll_timeout(), Some(Millis(15_100)));
    assert_eq!(pings_at(&mut d, Millis(15_100), 2).len(), 1);
    // A peer we never knew: nothing to remember.
    d.peer_unreachable(&id(9), Millis(200));
    assert!(!d.is_lost(&id(9)));
}

/// The failure detector's verdict reaches the lookups: a node that went
/// silent (its requests timed out, or the runtime declared it down) is
/// still asked, but no lookup waits for it, until it is heard from.
#[test]
fn a_suspected_node_is_asked_but_never_waited_on() {
    let mut d = node(1, Config::default());
    // 2 and 3 stop answering: their requests time out twice.
    let t = evict_silent(&mut d, &[2, 3], Millis(0));
    assert!(d.is_suspected(&id(2), t) && d.is_suspected(&id(3), t));
    assert_eq!(d.stats().suspects, 2);
    // 4 is alive; 2 and 3 are named again in its answer.
    d.handle_request(&contact(4), Request::Ping, t)
        .expect("pong");
    let lookup = d.get(id(200), t).expect("lookup starts");
    let (out, _) = drain(&mut d);
    assert_eq!(out.len(), 1, "only 4 is in the table: {out:?}");
    d.handle_response(
        &id(4),
        out[0].correlation_id,
        Response::Nodes {
            closer: vec![contact(2), contact(3)],
        },
        Millis(t.0 + 10),
    );
    // Both suspects are asked, and the lookup is over without waiting.
    let (out, events) = drain(&mut d);
    let asked: Vec<NodeId> = out.iter().map(|o| o.to.id).collect();
    assert!(
        asked.contains(&id(2)) && asked.contains(&id(3)),
        "{asked:?}"
    );
    let finished = events.iter().find_map(|e| match e {
        Event::LookupFinished { id, outcome } if *id == lookup => Some(outcome.clone()),
        _ => None,
    });
    let outcome = finished.expect("finished without waiting for the suspects");
    assert_eq!(outcome.closest, vec![contact(4)]);
    assert_eq!(d.stats().suspects_not_waited, 2);
    // 3 answers after all: no longer suspected, and back in the table.
    let to3 = out.iter().find(|o| o.to.id == id(3)).expect("asked 3");
    d.handle_response(
        &id(3),
        to3.correlation_id,
        Response::Nodes { closer: vec![] },
        Millis(t.0 + 20),
    );
    assert!(!d.is_suspected(&id(3), Millis(t.0 + 20)));
    assert!(d.routing().contains(&id(3)));
    // 2 stays suspected until the suspicion expires.
    let ttl = d.config().suspect_ttl;
    assert!(d.is_suspected(&id(2), Millis(t.0 + ttl.0 - 1)));
    d.handle_timeout(Millis(t.0 + ttl.0));
    assert!(!d.is_suspected(&id(2), Millis(t.0 + ttl.0)));
    assert_eq!(d.stats().suspects, 0);
}

/// `peer_unreachable` (the runtime's failure detector) makes a node a
/// suspect at once, even one that was never in the routing table;
/// `peer_left` (a goodbye) does not.
#[test]
fn the_runtime_declares_suspects() {
    let mut d = node(1, Config::default());
    d.peer_unreachable(&id(9), Millis(5));
    assert!(d.is_suspected(&id(9), Millis(5)));
    d.peer_left(&id(8), Millis(5));
    assert!(!d.is_suspected(&id(8), Millis(5)));
    assert_eq!(d.stats().suspects_declared, 1);
    // Heard from: a request from it.
    d.handle_request(&contact(9), Request::Ping, Millis(6))
        .expect("pong");
    assert!(!d.is_suspected(&id(9), Millis(6)));
}

// ----- snapshots across a restart (issue 21 item 5) -------------------------

#[test]
fn a_snapshot_keeps_contacts_nearest_first_and_records_with_their_lifetime_left() {
    let mut d = node(1, Config::default());
    for b in [9u8, 2, 200, 3] {
        let _ = d.handle_request(&contact(b), Request::Ping, Millis(0));
    }
    let r = record(id(0x50), id(9), 1, Millis(10_000), b"v");
    let stored = d.handle_request(
        &contact(9),
        Request::Store {
            record: r.clone(),
            ttl: Millis(10_000),
        },
        Millis(1_000),
    );
    assert_eq!(stored, Ok(Response::Stored));
    let snap = d.snapshot(Millis(4_000));
    let ids: Vec<NodeId> = snap.contacts.iter().map(|c| c.id).collect();
    // Distance to 0x01..: 0x03 (2), 0x02 (3), 0x09 (8), 0xc8 (far).
    assert_eq!(ids, vec![id(3), id(2), id(9), id(200)]);
    assert_eq!(snap.records, vec![(r.clone(), Millis(7_000))]);
    // An expired record is not kept.
    assert!(d.snapshot(Millis(11_000)).records.is_empty());
}

#[test]
fn a_restored_node_has_its_records_at_once_and_joins_through_its_old_contacts() {
    let config = Config::default();
    let mut d = node(1, config.clone());
    for b in 2..=40u8 {
        let _ = d.handle_request(&contact(b), Request::Ping, Millis(0));
    }
    let r = record(id(0x50), id(9), 1, Millis(10_000), b"v");
    let _ = d.handle_request(
        &contact(9),
        Request::Store {
            record: r.clone(),
            ttl: Millis(10_000),
        },
        Millis(0),
    );
    let snap = d.snapshot(Millis(2_000));
    assert_eq!(snap.contacts.len(), 39);

    // The same node after a restart, with no seeds of its own.
    let mut d = node(1, config.clone());
    let restored = d.restore(snap, Millis(500));
    assert_eq!(
        restored,
        macula_dht::Restored {
            contacts: config.k,
            records: 1,
            records_rejected: 0
        }
    );
    // The record is served with the lifetime it had left, not a new one.
    let got = d.store().get_one(&id(0x50), &id(9)).expect("restored");
    assert_eq!(got.expires, Millis(500 + 8_000));
    assert_eq!(got.record, r);
    // It joins through the k nearest old contacts: a lookup of its own ID.
    // (Beside it, the record goes to old contacts now among its k closest,
    // as to any newly seen node.)
    let (out, _) = drain(&mut d);
    let asked: Vec<NodeId> = out
        .iter()
        .filter(|o| matches!(o.request, Request::FindNode { target } if target == id(1)))
        .map(|o| o.to.id)
        .collect();
    assert!(!asked.is_empty());
    assert!(out
        .iter()
        .all(|o| matches!(o.request, Request::FindNode { .. } | Request::Store { .. })));
    let nearest: Vec<NodeId> = (2..=40u8).map(id).filter(|c| asked.contains(c)).collect();
    assert_eq!(nearest.len(), asked.len(), "asks only old contacts");
    assert!(asked.contains(&id(3)), "the nearest old contact is asked");
}

#[test]
fn restored_records_pass_the_checks_of_a_store() {
    let config = Config::default();
    let snap = macula_dht::Snapshot {
        contacts: vec![contact(1), contact(2)],
        records: vec![
            (
                record(id(0x50), id(9), 1, Millis(10_000), b"v"),
                Millis(5_000),
            ),
            // Lifetime left longer than the publisher granted: capped.
            (
                record(id(0x51), id(9), 1, Millis(3_000), b"v"),
                Millis(9_000),
            ),
            // No lifetime left.
            (
                record(id(0x52), id(9), 1, Millis(3_000), b"v"),
                Millis::ZERO,
            ),
        ],
    };
    let mut d = node(1, config.clone());
    let restored = d.restore(snap.clone(), Millis(0));
    // Our own ID is never a seed.
    assert_eq!(restored.contacts, 1);
    assert_eq!((restored.records, restored.records_rejected), (2, 1));
    assert_eq!(
        d.store().get_one(&id(0x51), &id(9)).map(|s| s.expires),
        Some(Millis(3_000))
    );
    // A node whose verifier refuses the signatures takes none of them.
    let mut d = Dht::new(config, contact(1), Box::new(RejectAll), 1);
    let restored = d.restore(snap, Millis(0));
    assert_eq!((restored.records, restored.records_rejected), (0, 3));
    assert!(d.store().is_empty());
}

#[test]
fn a_restarted_node_whose_seed_is_gone_serves_again_from_its_snapshot() {
    let config = Config::default();
    let mut sim = mesh(12, 77, &config);
    let key = NodeId::from_bytes([0x42; 32]);
    put(&mut sim, 3, key, b"hello", Millis::from_secs(600)).expect("quorum");
    let holder = (4..sim.len())
        .find(|&i| sim.dht(i).store().get_one(&key, &sim.id(3)).is_some())
        .expect("a replica other than the publisher and the seed");
    let now = sim.now();
    let snap = sim.dht(holder).snapshot(now);
    assert!(snap.contacts.len() >= 8);
    // The holder stops; its only seed (node 0) is gone for good.
    sim.kill(holder);
    sim.kill(0);
    sim.run_until(now.saturating_add(Millis(5_000)));

    // Without a snapshot a restarted node with no reachable seed is alone.
    sim.restart_now(holder, &[]);
    assert_eq!(sim.dht(holder).routing().len(), 0);
    assert!(sim.dht(holder).store().is_empty());
    sim.kill(holder);

    sim.restart_now(holder, &[]);
    let restored = sim.command(holder, |d, now| d.restore(snap, now));
    assert_eq!(restored.records, 1);
    assert!(sim.dht(holder).store().get_one(&key, &sim.id(3)).is_some());
    let t = sim.now();
    sim.run_until(t.saturating_add(Millis(5_000)));
    // It rejoined through its old contacts (node 0 among them is dead).
    assert!(sim.dht(holder).routing().len() >= 8);
    assert!(!sim.dht(holder).routing().contains(&sim.id(0)));
    // ...and the mesh finds it again: another node's get reaches a replica.
    let outcome = get(&mut sim, 7, key);
    assert_eq!(outcome.records.len(), 1);
    let outcome = get(&mut sim, holder, key);
    assert_eq!(outcome.records[0].value, b"hello");
}
