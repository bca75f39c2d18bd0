use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn kv() -> Kv {
    Kv::new(Limits::default())
}

fn put(key: &str, value: &str) -> Request {
    Request::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        lease: None,
        prev_kv: false,
    }
}

fn put_lease(key: &str, value: &str, lease: u64) -> Request {
    Request::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        lease: Some(lease),
        prev_kv: false,
    }
}

fn del(key: &str, prefix: bool) -> Request {
    Request::Delete {
        key: key.as_bytes().to_vec(),
        prefix,
        prev_kv: true,
    }
}

fn cas(key: &str, expect: Expect, value: &str) -> Request {
    Request::Cas {
        key: key.as_bytes().to_vec(),
        expect,
        value: value.as_bytes().to_vec(),
        lease: None,
    }
}

fn member(n: u64) -> MemberId {
    MemberId::from(n)
}

#[test]
fn put_sets_revisions_and_versions() {
    let mut s = kv();
    assert_eq!(s.revision(), 0);
    let a = s.apply(put("a", "1"));
    assert_eq!(
        a.response,
        Response::Put {
            revision: 1,
            prev: None
        }
    );
    assert_eq!(a.events.len(), 1);
    let first = s.get(b"a").expect("a");
    assert_eq!(
        (first.create_revision, first.mod_revision, first.version),
        (1, 1, 1)
    );

    s.apply(put("b", "x"));
    let a2 = s.apply(Request::Put {
        key: b"a".to_vec(),
        value: b"2".to_vec(),
        lease: None,
        prev_kv: true,
    });
    assert_eq!(
        a2.response,
        Response::Put {
            revision: 3,
            prev: Some(first)
        }
    );
    let now = s.get(b"a").expect("a");
    assert_eq!(
        (now.create_revision, now.mod_revision, now.version),
        (1, 3, 2)
    );
    assert_eq!(now.value, b"2");
    assert_eq!(a2.events, vec![Event::Put(now)]);
    assert_eq!(s.revision(), 3);
}

#[test]
fn delete_of_missing_key_changes_nothing() {
    let mut s = kv();
    s.apply(put("a", "1"));
    let d = s.apply(del("zz", false));
    assert_eq!(
        d.response,
        Response::Deleted {
            revision: 1,
            deleted: 0,
            prev: vec![]
        }
    );
    assert!(d.events.is_empty());
    assert_eq!(s.revision(), 1);
}

#[test]
fn delete_then_recreate_resets_metadata() {
    let mut s = kv();
    s.apply(put("a", "1"));
    s.apply(put("a", "2"));
    let d = s.apply(del("a", false));
    assert_eq!(
        d.events,
        vec![Event::Delete {
            key: b"a".to_vec(),
            mod_revision: 3
        }]
    );
    match d.response {
        Response::Deleted {
            revision,
            deleted,
            prev,
        } => {
            assert_eq!((revision, deleted), (3, 1));
            assert_eq!(prev[0].value, b"2");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.get(b"a"), None);
    s.apply(put("a", "3"));
    let a = s.get(b"a").expect("a");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (4, 4, 1));
}

#[test]
fn prefix_delete_uses_one_revision_and_skips_reserved() {
    let mut s = kv();
    s.apply(put("app/1", "x"));
    s.apply(put("app/2", "y"));
    s.apply(put("b", "z"));
    s.apply(Request::Register {
        name: "w".into(),
        member: member(1),
        capabilities: vec![],
    });
    let d = s.apply(del("app/", true));
    assert_eq!(d.events.len(), 2);
    assert!(d.events.iter().all(|e| e.revision() == 5));
    assert_eq!(s.revision(), 5);
    assert_eq!(s.count(b""), 1);
    // Deleting "everything" leaves the registry alone.
    let all = s.apply(del("", true));
    assert_eq!(all.events.len(), 1);
    assert_eq!(s.count(b""), 0);
    assert_eq!(s.workloads("w").len(), 1);
    // A prefix delete that matches nothing changes nothing.
    let none = s.apply(del("nothing", true));
    assert!(none.events.is_empty());
    assert_eq!(s.revision(), 6);
}

#[test]
fn cas_variants() {
    let mut s = kv();
    // Absent on a missing key succeeds.
    let r = s.apply(cas("k", Expect::Absent, "1"));
    match &r.response {
        Response::Cas {
            succeeded: true,
            revision: 1,
            current: Some(kv),
        } => assert_eq!(kv.value, b"1"),
        other => panic!("{other:?}"),
    }
    // Absent on an existing key fails and reports the current value.
    let r = s.apply(cas("k", Expect::Absent, "2"));
    match &r.response {
        Response::Cas {
            succeeded: false,
            revision: 1,
            current: Some(kv),
        } => assert_eq!(kv.value, b"1"),
        other => panic!("{other:?}"),
    }
    assert!(r.events.is_empty());
    // Value.
    assert!(matches!(
        s.apply(cas("k", Expect::Value(b"nope".to_vec()), "2"))
            .response,
        Response::Cas {
            succeeded: false,
            ..
        }
    ));
    assert!(matches!(
        s.apply(cas("k", Expect::Value(b"1".to_vec()), "2"))
            .response,
        Response::Cas {
            succeeded: true,
            revision: 2,
            ..
        }
    ));
    // ModRevision.
    assert!(matches!(
        s.apply(cas("k", Expect::ModRevision(1), "3")).response,
        Response::Cas {
            succeeded: false,
            ..
        }
    ));
    assert!(matches!(
        s.apply(cas("k", Expect::ModRevision(2), "3")).response,
        Response::Cas {
            succeeded: true,
            ..
        }
    ));
    // Version: k has version 3 now.
    assert!(matches!(
        s.apply(cas("k", Expect::Version(2), "4")).response,
        Response::Cas {
            succeeded: false,
            ..
        }
    ));
    assert!(matches!(
        s.apply(cas("k", Expect::Version(3), "4")).response,
        Response::Cas {
            succeeded: true,
            ..
        }
    ));
    // A missing key has version 0 and mod_revision 0; Value never matches it.
    assert!(matches!(
        s.apply(cas("m", Expect::Version(0), "v")).response,
        Response::Cas {
            succeeded: true,
            ..
        }
    ));
    assert!(matches!(
        s.apply(cas("n", Expect::ModRevision(0), "v")).response,
        Response::Cas {
            succeeded: true,
            ..
        }
    ));
    assert!(matches!(
        s.apply(cas("o", Expect::Value(vec![]), "v")).response,
        Response::Cas {
            succeeded: false,
            current: None,
            ..
        }
    ));
    assert_eq!(s.get(b"k").map(|k| k.version), Some(4));
    assert_eq!(s.revision(), 6);
}

#[test]
fn put_if_absent() {
    let mut s = kv();
    let req = |v: &str| Request::PutIfAbsent {
        key: b"lock".to_vec(),
        value: v.as_bytes().to_vec(),
        lease: None,
    };
    assert!(matches!(
        s.apply(req("me")).response,
        Response::Cas {
            succeeded: true,
            ..
        }
    ));
    match s.apply(req("you")).response {
        Response::Cas {
            succeeded: false,
            current: Some(kv),
            revision: 1,
        } => assert_eq!(kv.value, b"me"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn leases_attach_detach_and_revoke() {
    let mut s = kv();
    assert_eq!(
        s.apply(put_lease("a", "1", 7)).response,
        Response::Error(KvError::LeaseNotFound { id: 7 })
    );
    assert_eq!(
        s.apply(Request::LeaseGrant {
            id: 7,
            ttl_ms: 1000
        })
        .response,
        Response::Lease {
            id: 7,
            ttl_ms: 1000
        }
    );
    assert_eq!(s.revision(), 0, "a lease grant changes no key");
    assert_eq!(
        s.apply(Request::LeaseGrant { id: 7, ttl_ms: 5 }).response,
        Response::Error(KvError::LeaseExists { id: 7 })
    );
    assert_eq!(
        s.apply(Request::LeaseGrant { id: 0, ttl_ms: 5 }).response,
        Response::Error(KvError::InvalidLease)
    );
    assert_eq!(
        s.apply(Request::LeaseGrant { id: 8, ttl_ms: 0 }).response,
        Response::Error(KvError::InvalidLease)
    );
    s.apply(Request::LeaseGrant { id: 8, ttl_ms: 50 });
    s.apply(put_lease("a", "1", 7));
    s.apply(put_lease("b", "1", 7));
    s.apply(put_lease("c", "1", 7));
    s.apply(put("keep", "1"));
    // Re-put without a lease detaches; re-put with another lease moves.
    s.apply(put("b", "2"));
    s.apply(put_lease("c", "2", 8));
    assert_eq!(s.lease(7).map(|l| l.keys), Some(vec![b"a".to_vec()]));
    assert_eq!(s.lease(8).map(|l| l.keys), Some(vec![b"c".to_vec()]));
    // Deleting a key detaches it.
    s.apply(put_lease("d", "1", 7));
    s.apply(del("d", false));
    assert_eq!(s.lease(7).map(|l| l.keys.len()), Some(1));
    let before = s.revision();
    let r = s.apply(Request::LeaseRevoke { id: 7 });
    assert_eq!(
        r.response,
        Response::LeaseRevoked {
            revision: before + 1,
            deleted: 1
        }
    );
    assert_eq!(r.lease_changes, vec![(7, None)]);
    assert_eq!(s.get(b"a"), None);
    assert!(s.get(b"b").is_some() && s.get(b"keep").is_some());
    assert_eq!(s.lease(7), None);
    assert_eq!(
        s.apply(Request::LeaseRevoke { id: 7 }).response,
        Response::Error(KvError::LeaseNotFound { id: 7 })
    );
    // A lease without keys: revoking changes no revision.
    s.apply(Request::LeaseGrant { id: 9, ttl_ms: 1 });
    let rev = s.revision();
    assert_eq!(
        s.apply(Request::LeaseRevoke { id: 9 }).response,
        Response::LeaseRevoked {
            revision: rev,
            deleted: 0
        }
    );
    assert_eq!(
        s.leases(),
        vec![Lease {
            id: 8,
            ttl_ms: 50,
            keys: vec![b"c".to_vec()]
        }]
    );
    // Revoking several keys uses one revision.
    s.apply(put_lease("x", "1", 8));
    let r = s.apply(Request::LeaseRevoke { id: 8 });
    assert_eq!(r.events.len(), 2);
    assert!(r.events.iter().all(|e| e.revision() == rev + 2));
}

#[test]
fn limits_are_errors() {
    let limits = Limits {
        max_key_bytes: 8,
        max_value_bytes: 4,
        max_keys: 2,
        max_leases: 1,
    };
    let mut s = Kv::new(limits);
    assert_eq!(
        s.apply(put("", "v")).response,
        Response::Error(KvError::EmptyKey)
    );
    assert_eq!(
        s.apply(put("123456789", "v")).response,
        Response::Error(KvError::KeyTooLarge { len: 9, max: 8 })
    );
    assert_eq!(
        s.apply(put("k", "12345")).response,
        Response::Error(KvError::ValueTooLarge { len: 5, max: 4 })
    );
    assert_eq!(
        s.apply(put("\0x", "v")).response,
        Response::Error(KvError::ReservedKey)
    );
    assert_eq!(
        s.apply(del("\0x", false)).response,
        Response::Error(KvError::ReservedKey)
    );
    assert_eq!(
        s.apply(cas("\0x", Expect::Absent, "v")).response,
        Response::Error(KvError::ReservedKey)
    );
    s.apply(put("a", "1"));
    s.apply(put("b", "1"));
    assert_eq!(
        s.apply(put("c", "1")).response,
        Response::Error(KvError::TooManyKeys { max: 2 })
    );
    assert_eq!(
        s.apply(cas("c", Expect::Absent, "1")).response,
        Response::Error(KvError::TooManyKeys { max: 2 })
    );
    // Updating an existing key is still fine at the limit.
    assert!(matches!(
        s.apply(put("a", "2")).response,
        Response::Put { revision: 3, .. }
    ));
    s.apply(Request::LeaseGrant { id: 1, ttl_ms: 1 });
    assert_eq!(
        s.apply(Request::LeaseGrant { id: 2, ttl_ms: 1 }).response,
        Response::Error(KvError::TooManyLeases { max: 1 })
    );
    assert_eq!(s.revision(), 3);
    assert_eq!(s.len(), 2);
}

#[test]
fn workload_registry() {
    let mut s = kv();
    let reg = |name: &str, m: u64, caps: &[&str]| Request::Register {
        name: name.into(),
        member: member(m),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
    };
    assert_eq!(
        s.apply(reg("db", 1, &["primary"])).response,
        Response::Registered {
            revision: 1,
            members: 1
        }
    );
    assert_eq!(
        s.apply(reg("db", 2, &[])).response,
        Response::Registered {
            revision: 2,
            members: 2
        }
    );
    assert_eq!(
        s.apply(reg("db", 1, &["primary", "ssd"])).response,
        Response::Registered {
            revision: 3,
            members: 2
        }
    );
    // A name that is a prefix of another is a different workload.
    s.apply(reg("d", 3, &[]));
    assert_eq!(
        s.apply(reg("", 3, &[])).response,
        Response::Error(KvError::InvalidName)
    );
    assert_eq!(
        s.apply(reg("a\0b", 3, &[])).response,
        Response::Error(KvError::InvalidName)
    );
    let db = s.workloads("db");
    assert_eq!(db.len(), 2);
    assert_eq!(db[0].member, member(1));
    assert_eq!(
        db[0].capabilities,
        vec!["primary".to_string(), "ssd".to_string()]
    );
    assert_eq!(db[0].mod_revision, 3);
    assert_eq!(s.workloads("d").len(), 1);
    assert_eq!(s.all_workloads().len(), 3);
    // Hidden from user ranges, visible under the reserved prefix.
    assert_eq!(s.range(b"", 0), vec![]);
    assert_eq!(s.count(b""), 0);
    assert_eq!(s.range(b"\0", 0).len(), 3);
    assert_eq!(s.range(WORKLOADS_PREFIX, 2).len(), 2);
    let u = s.apply(Request::Unregister {
        name: "db".into(),
        member: member(2),
    });
    assert!(matches!(
        u.response,
        Response::Deleted {
            deleted: 1,
            revision: 5,
            ..
        }
    ));
    assert_eq!(s.workloads("db").len(), 1);
    let again = s.apply(Request::Unregister {
        name: "db".into(),
        member: member(2),
    });
    assert!(matches!(
        again.response,
        Response::Deleted {
            deleted: 0,
            revision: 5,
            ..
        }
    ));
}

#[test]
fn range_limit_and_count() {
    let mut s = kv();
    for k in ["a/1", "a/2", "a/3", "b", "ab"] {
        s.apply(put(k, "v"));
    }
    let keys = |v: Vec<KeyValue>| {
        v.into_iter()
            .map(|k| String::from_utf8(k.key).unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(s.range(b"a/", 0)), vec!["a/1", "a/2", "a/3"]);
    assert_eq!(keys(s.range(b"a/", 2)), vec!["a/1", "a/2"]);
    assert_eq!(keys(s.range(b"a", 0)), vec!["a/1", "a/2", "a/3", "ab"]);
    assert_eq!(s.count(b""), 5);
    assert_eq!(s.count(b"a/"), 3);
    assert_eq!(s.count(b"zz"), 0);
}

#[test]
fn snapshot_round_trip() {
    let mut s = kv();
    s.apply(Request::LeaseGrant { id: 3, ttl_ms: 10 });
    s.apply(put_lease("a", "1", 3));
    s.apply(put("b", "2"));
    s.apply(put("b", "3"));
    s.apply(Request::Register {
        name: "w".into(),
        member: member(9),
        capabilities: vec!["x".into()],
    });
    let snap = s.to_snapshot();
    let bytes = rmp_serde::to_vec_named(&snap).expect("encode");
    let decoded: KvSnapshot = rmp_serde::from_slice(&bytes).expect("decode");
    let back = Kv::from_snapshot(decoded, Limits::default()).expect("restore");
    assert_eq!(back, s);
    assert_eq!(back.lease(3).map(|l| l.keys), Some(vec![b"a".to_vec()]));

    let mut bad = s.to_snapshot();
    bad.leases.clear();
    assert!(Kv::from_snapshot(bad, Limits::default()).is_err());
    let mut bad = s.to_snapshot();
    bad.revision = 1;
    assert!(Kv::from_snapshot(bad, Limits::default()).is_err());
}

#[test]
fn wire_form_is_named() {
    let req = put("k", "v");
    let bytes = rmp_serde::to_vec_named(&req).expect("encode");
    // Field names are in the encoding (map form), so fields can be added.
    assert!(bytes.windows(7).any(|w| w == b"prev_kv"));
    let back: Request = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(back, req);
    let resp = Response::Error(KvError::Compacted { oldest: 4 });
    let bytes = rmp_serde::to_vec_named(&resp).expect("encode");
    assert_eq!(
        rmp_serde::from_slice::<Response>(&bytes).expect("decode"),
        resp
    );
}

// ---------------------------------------------------------------------------
// Model test: the KV against a plain BTreeMap reference.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Put(usize, u8, Option<u64>),
    Delete(usize, bool),
    CasValue(usize, u8, u8),
    PutIfAbsent(usize, u8),
    Grant(u64),
    Revoke(u64),
}

const KEYS: [&str; 6] = ["a", "ab", "abc", "b", "ba", "c"];

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS.len();
    let lease = prop_oneof![Just(None), (1u64..4).prop_map(Some)];
    prop_oneof![
        4 => (key.clone(), any::<u8>(), lease).prop_map(|(k, v, l)| Op::Put(k, v % 4, l)),
        2 => (key.clone(), any::<bool>()).prop_map(|(k, p)| Op::Delete(k, p)),
        2 => (key.clone(), any::<u8>(), any::<u8>()).prop_map(|(k, e, v)| Op::CasValue(k, e % 4, v % 4)),
        1 => (key, any::<u8>()).prop_map(|(k, v)| Op::PutIfAbsent(k, v % 4)),
        1 => (1u64..4).prop_map(Op::Grant),
        1 => (1u64..4).prop_map(Op::Revoke),
    ]
}

#[derive(Default)]
struct Model {
    map: BTreeMap<Vec<u8>, (Vec<u8>, Option<u64>)>,
    leases: BTreeSet<u64>,
}

impl Model {
    /// Applies `op`; returns whether any key changed.
    fn apply(&mut self, op: &Op) -> bool {
        match op {
            Op::Put(k, v, l) => {
                if l.is_some_and(|l| !self.leases.contains(&l)) {
                    return false;
                }
                self.map
                    .insert(KEYS[*k].as_bytes().to_vec(), (vec![*v], *l));
                true
            }
            Op::Delete(k, prefix) => {
                let p = KEYS[*k].as_bytes();
                let before = self.map.len();
                self.map.retain(|key, _| {
                    if *prefix {
                        !key.starts_with(p)
                    } else {
                        key.as_slice() != p
                    }
                });
                before != self.map.len()
            }
            Op::CasValue(k, e, v) => {
                let key = KEYS[*k].as_bytes().to_vec();
                match self.map.get(&key) {
                    Some((cur, _)) if cur == &vec![*e] => {
                        self.map.insert(key, (vec![*v], None));
                        true
                    }
                    _ => false,
                }
            }
            Op::PutIfAbsent(k, v) => {
                let key = KEYS[*k].as_bytes().to_vec();
                if self.map.contains_key(&key) {
                    return false;
                }
                self.map.insert(key, (vec![*v], None));
                true
            }
            Op::Grant(id) => {
                self.leases.insert(*id);
                false
            }
            Op::Revoke(id) => {
                if !self.leases.remove(id) {
                    return false;
                }
                let before = self.map.len();
                self.map.retain(|_, (_, l)| *l != Some(*id));
                before != self.map.len()
            }
        }
    }
}

fn to_request(op: &Op) -> Request {
    match op {
        Op::Put(k, v, l) => Request::Put {
            key: KEYS[*k].as_bytes().to_vec(),
            value: vec![*v],
            lease: *l,
            prev_kv: false,
        },
        Op::Delete(k, p) => Request::Delete {
            key: KEYS[*k].as_bytes().to_vec(),
            prefix: *p,
            prev_kv: false,
        },
        Op::CasValue(k, e, v) => Request::Cas {
            key: KEYS[*k].as_bytes().to_vec(),
            expect: Expect::Value(vec![*e]),
            value: vec![*v],
            lease: None,
        },
        Op::PutIfAbsent(k, v) => Request::PutIfAbsent {
            key: KEYS[*k].as_bytes().to_vec(),
            value: vec![*v],
            lease: None,
        },
        Op::Grant(id) => Request::LeaseGrant {
            id: *id,
            ttl_ms: 100,
        },
        Op::Revoke(id) => Request::LeaseRevoke { id: *id },
    }
}

proptest! {
    #[test]
    fn agrees_with_btreemap(ops in proptest::collection::vec(op(), 1..80)) {
        let mut s = kv();
        let mut model = Model::default();
        for op in &ops {
            let before = s.revision();
            let changed = model.apply(op);
            let applied = s.apply(to_request(op));
            // The revision grows by one exactly when something changed.
            prop_assert_eq!(s.revision(), before + u64::from(changed), "{:?}", op);
            prop_assert_eq!(applied.events.is_empty(), !changed);
            prop_assert!(applied.events.iter().all(|e| e.revision() == s.revision()));
            for key in KEYS {
                let got = s.get(key.as_bytes());
                let want = model.map.get(key.as_bytes());
                prop_assert_eq!(got.as_ref().map(|k| (&k.value, k.lease)), want.map(|(v, l)| (v, *l)));
                if let Some(kv) = got {
                    prop_assert!(kv.create_revision <= kv.mod_revision);
                    prop_assert!(kv.mod_revision <= s.revision());
                    prop_assert!(kv.version >= 1);
                }
            }
            for prefix in ["", "a", "ab", "b", "z"] {
                let got: Vec<(Vec<u8>, Vec<u8>)> =
                    s.range(prefix.as_bytes(), 0).into_iter().map(|k| (k.key, k.value)).collect();
                let want: Vec<(Vec<u8>, Vec<u8>)> = model
                    .map
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(s.count(prefix.as_bytes()), want.len());
                prop_assert_eq!(got, want);
            }
            // Lease attachments agree with the keys' lease fields.
            for lease in s.leases() {
                prop_assert!(model.leases.contains(&lease.id));
                for key in &lease.keys {
                    prop_assert_eq!(s.get(key).and_then(|k| k.lease), Some(lease.id));
                }
            }
            let attached: usize = s.leases().iter().map(|l| l.keys.len()).sum();
            prop_assert_eq!(attached, s.range(b"", 0).iter().filter(|k| k.lease.is_some()).count());
        }
        // Snapshot round trip at the end of every sequence.
        let back = Kv::from_snapshot(s.to_snapshot(), Limits::default());
        prop_assert_eq!(back.as_ref(), Ok(&s));
    }
}

#[test]
fn a_batch_applies_like_consecutive_entries() {
    let mut batched = kv();
    let mut one_by_one = kv();
    let requests = vec![
        put("a", "1"),
        cas("a", Expect::Value(b"1".to_vec()), "2"),
        cas("a", Expect::Value(b"1".to_vec()), "3"),
        put("", "refused"),
        del("a", false),
        put("b", "x"),
    ];
    let applied = batched.apply(Request::Batch(requests.clone()));
    let singles: Vec<Applied> = requests.into_iter().map(|r| one_by_one.apply(r)).collect();
    let Response::Batch(responses) = &applied.response else {
        panic!("not a batch answer: {:?}", applied.response)
    };
    assert_eq!(
        responses,
        &singles
            .iter()
            .map(|a| a.response.clone())
            .collect::<Vec<_>>()
    );
    let events: Vec<Event> = singles.iter().flat_map(|a| a.events.clone()).collect();
    assert_eq!(applied.events, events);
    assert_eq!(batched.revision(), one_by_one.revision());
    assert_eq!(batched.revision(), 4, "put, cas, delete, put");
    assert_eq!(batched.range(b"", 0), one_by_one.range(b"", 0));
    // No batch inside a batch; the rest of the batch still applies.
    let nested = batched.apply(Request::Batch(vec![
        Request::Batch(vec![put("c", "1")]),
        put("d", "1"),
    ]));
    assert_eq!(
        nested.response,
        Response::Batch(vec![
            Response::Error(KvError::NestedBatch),
            Response::Put {
                revision: 5,
                prev: None
            }
        ])
    );
    assert!(batched.get(b"c").is_none());
}
