//! The redb store across restarts, snapshot transfer and watches.

use std::collections::BTreeSet;
use std::path::Path;

use macula_raft::openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use macula_raft::openraft::{
    CommittedLeaderId, Entry, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, Vote,
};
use macula_raft::{
    open, open_with, Event, KvError, LogId, MemberId, Options, Request, Response,
    StateMachineStore, TypeConfig,
};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

fn m(n: u64) -> MemberId {
    MemberId::from(n)
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, m(1)), index)
}

fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Blank,
    }
}

fn membership(term: u64, index: u64, members: &[u64]) -> Entry<TypeConfig> {
    let set: BTreeSet<MemberId> = members.iter().map(|&n| m(n)).collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new(vec![set], None)),
    }
}

fn normal(term: u64, index: u64, request: Request) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(request),
    }
}

fn put(key: &str, value: &str) -> Request {
    Request::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        lease: None,
        prev_kv: false,
    }
}

fn path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("raft").join("g.redb")
}

/// Entries 1..=6: blank, membership {1,2,3}, lease 5, a put on it, a put, a registration.
fn first_entries() -> Vec<Entry<TypeConfig>> {
    vec![
        blank(1, 1),
        membership(1, 2, &[1, 2, 3]),
        normal(
            1,
            3,
            Request::LeaseGrant {
                id: 5,
                ttl_ms: 3000,
            },
        ),
        normal(
            1,
            4,
            Request::Put {
                key: b"session/a".to_vec(),
                value: b"x".to_vec(),
                lease: Some(5),
                prev_kv: false,
            },
        ),
        normal(1, 5, put("config", "v1")),
        normal(
            1,
            6,
            Request::Register {
                name: "db".into(),
                member: m(2),
                capabilities: vec!["primary".into()],
            },
        ),
    ]
}

fn full_state(
    sm: &StateMachineStore,
) -> (u64, Vec<macula_raft::KeyValue>, Vec<macula_raft::Lease>) {
    (
        sm.revision(),
        sm.range(b"\0", 0)
            .into_iter()
            .chain(sm.range(b"", 0))
            .collect(),
        sm.leases(),
    )
}

#[tokio::test]
async fn restart_keeps_vote_log_state_and_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = path(&dir);
    let (snapshot_meta, state_before) = {
        let (mut log, mut sm) = open(&p).expect("open");
        log.save_vote(&Vote::new(3, m(1))).await.expect("vote");
        log.blocking_append(first_entries()).await.expect("append");
        let responses = sm.apply(first_entries()).await.expect("apply");
        assert_eq!(responses.len(), 6);
        assert_eq!(responses[0], Response::Empty);
        assert_eq!(responses[1], Response::Empty);
        assert_eq!(
            responses[2],
            Response::Lease {
                id: 5,
                ttl_ms: 3000
            }
        );
        assert_eq!(
            responses[3],
            Response::Put {
                revision: 1,
                prev: None
            }
        );
        assert_eq!(
            responses[5],
            Response::Registered {
                revision: 3,
                members: 1
            }
        );

        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("snapshot");
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 6)));

        // More entries after the snapshot, a purge, and a truncated tail.
        let more = vec![
            normal(2, 7, put("config", "v2")),
            normal(
                2,
                8,
                Request::Delete {
                    key: b"config".to_vec(),
                    prefix: false,
                    prev_kv: false,
                },
            ),
            normal(2, 9, put("never", "applied")),
        ];
        log.blocking_append(more.clone()).await.expect("append");
        sm.apply(more[..2].to_vec()).await.expect("apply");
        log.truncate(log_id(2, 9)).await.expect("truncate");
        log.purge(log_id(1, 2)).await.expect("purge");
        log.save_committed(Some(log_id(2, 8)))
            .await
            .expect("committed");
        (snap.meta, full_state(&sm))
    };

    let (mut log, mut sm) = open(&p).expect("reopen");
    assert_eq!(
        log.read_vote().await.expect("vote"),
        Some(Vote::new(3, m(1)))
    );
    assert_eq!(
        log.read_committed().await.expect("committed"),
        Some(log_id(2, 8))
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(2, 8)));
    let entries = log.try_get_log_entries(0..100).await.expect("entries");
    assert_eq!(
        entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        vec![3, 4, 5, 6, 7, 8]
    );
    assert_eq!(entries[0].payload, first_entries()[2].payload);

    let (applied, mem) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(2, 8)));
    assert_eq!(mem.log_id(), &Some(log_id(1, 2)));
    assert_eq!(
        mem.membership().voter_ids().collect::<Vec<_>>(),
        vec![m(1), m(2), m(3)]
    );

    assert_eq!(full_state(&sm), state_before);
    assert_eq!(sm.revision(), 5);
    assert_eq!(sm.get(b"config"), None);
    let session = sm.get(b"session/a").expect("session key");
    assert_eq!(session.lease, Some(5));
    assert_eq!(sm.leases().len(), 1);
    assert_eq!(sm.leases()[0].keys, vec![b"session/a".to_vec()]);
    assert_eq!(sm.workloads("db").len(), 1);
    assert_eq!(sm.last_applied(), Some(log_id(2, 8)));

    let current = sm
        .get_current_snapshot()
        .await
        .expect("read")
        .expect("a snapshot");
    assert_eq!(current.meta, snapshot_meta);
    // The restarted history starts after the current revision.
    assert_eq!(sm.oldest_watchable(), 6);
    assert_eq!(
        sm.watch(b"", 5).err(),
        Some(KvError::Compacted { oldest: 6 })
    );
}

#[tokio::test]
async fn snapshot_installs_into_a_fresh_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_log_a, mut a) = open(&dir.path().join("a.redb")).expect("open a");
    a.apply(first_entries()).await.expect("apply");
    let mut entries = Vec::new();
    for i in 0..50u64 {
        entries.push(normal(
            1,
            7 + i,
            put(&format!("k/{i:03}"), &"v".repeat(i as usize)),
        ));
    }
    a.apply(entries).await.expect("apply");
    let snap = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");

    let (_log_b, mut b) = open(&dir.path().join("b.redb")).expect("open b");
    let (_, mut live) = b.watch(b"", 0).expect("watch");
    let mut receiving = b.begin_receiving_snapshot().await.expect("begin");
    *receiving = *snap.snapshot;
    b.install_snapshot(&snap.meta, receiving)
        .await
        .expect("install");

    assert_eq!(b.read(|kv| kv.clone()), a.read(|kv| kv.clone()));
    assert_eq!(
        b.applied_state().await.expect("b"),
        a.applied_state().await.expect("a")
    );
    assert_eq!(
        b.get_current_snapshot()
            .await
            .expect("cur")
            .expect("some")
            .meta,
        snap.meta
    );
    // The state machine was replaced: live watchers are told to re-subscribe.
    assert_eq!(live.recv().await.err(), Some(RecvError::Closed));
    assert_eq!(b.oldest_watchable(), b.revision() + 1);

    // And it survives a restart.
    drop((_log_b, b));
    let (_log_b, b) = open(&dir.path().join("b.redb")).expect("reopen b");
    assert_eq!(b.read(|kv| kv.clone()), a.read(|kv| kv.clone()));
    assert_eq!(b.last_applied(), Some(log_id(1, 56)));
}

#[tokio::test]
async fn watch_backlog_meets_live_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options {
        history_events: 3,
        ..Options::default()
    };
    let (_log, mut sm) = open_with(&path(&dir), options).expect("open");
    let mut index = 0;
    let mut apply = |reqs: Vec<Request>| {
        let entries: Vec<_> = reqs
            .into_iter()
            .map(|r| {
                index += 1;
                normal(1, index, r)
            })
            .collect();
        entries
    };
    sm.apply(apply(vec![put("a/1", "1"), put("b", "1"), put("a/2", "1")]))
        .await
        .expect("apply");
    assert_eq!(sm.revision(), 3);

    // From revision 1: the backlog has a/1 and a/2 (b is filtered out).
    let (backlog, mut rx) = sm.watch(b"a/", 1).expect("watch");
    assert_eq!(
        backlog.iter().map(Event::revision).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(rx.try_recv().err(), Some(TryRecvError::Empty));

    sm.apply(apply(vec![
        put("a/3", "1"),
        Request::Delete {
            key: b"a/".to_vec(),
            prefix: true,
            prev_kv: false,
        },
    ]))
    .await
    .expect("apply");
    let mut live = Vec::new();
    while let Ok((rev, event)) = rx.try_recv() {
        assert_eq!(rev, event.revision());
        live.push(event);
    }
    // Every change arrives once: the put at 4, then three deletes at 5.
    assert_eq!(
        live.iter().map(Event::revision).collect::<Vec<_>>(),
        vec![4, 5, 5, 5]
    );

    // The history holds 3 events: only revision 5 is complete.
    assert_eq!(sm.oldest_watchable(), 5);
    assert_eq!(
        sm.watch(b"a/", 4).err(),
        Some(KvError::Compacted { oldest: 5 })
    );
    let (backlog, _) = sm.watch(b"a/", 5).expect("watch");
    assert_eq!(backlog.len(), 3);
    // From now: empty backlog.
    let (backlog, _) = sm.watch(b"", 0).expect("watch");
    assert!(backlog.is_empty());
}

#[tokio::test]
async fn non_durable_apply_and_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options {
        durable_apply: false,
        ..Options::default()
    };
    let p = path(&dir);
    {
        let (_log, mut sm) = open_with(&p, options.clone()).expect("open");
        sm.apply(first_entries()).await.expect("apply");
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("snapshot");
    }
    // Dropped cleanly: redb flushes on close, so everything is there.
    let (_log, sm) = open_with(&p, options).expect("reopen");
    assert_eq!(sm.last_applied(), Some(log_id(1, 6)));
    assert_eq!(sm.revision(), 3);
}

#[test]
fn open_refuses_a_locked_or_bad_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = path(&dir);
    let _held = open(&p).expect("open");
    // redb refuses a second handle on the same file instead of corrupting it.
    assert!(open(&p).is_err());
    assert!(open(Path::new("/proc/definitely/not/here.redb")).is_err());
}
