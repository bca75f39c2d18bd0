//! Answering a write at its commit, before its apply: the log store tells
//! the proposer when the entry carrying its payload is committed.
//!
//! openraft 0.9 answers a client write after the state machine applied
//! the entry: from the commit on the leader's core, that is a hand-off to
//! the state machine worker, the apply, and a hand-off back to the core,
//! which answers. A proposer that needs only the commit (a replicated
//! stream's publish: its sequence was decided before the proposal, and
//! its reads wait for the apply themselves) tags its
//! [`Request::Opaque`](crate::Request::Opaque) payload ([`Commits::tag`]);
//! the tag lives in memory only, never in the log or on the wire.
//!
//! * **Append.** When the member's log store is given an entry holding a
//!   tagged payload, the tag's waiter moves to that entry's log id.
//! * **Commit.** When openraft reports the commit index
//!   (`save_committed`, on the core, before it hands the entries to the
//!   state machine), every waiter at or below it is answered with its log
//!   id, **only if this member leads in the term of that entry** (its
//!   saved vote is committed, for itself, with that leader id). A leader
//!   never truncates its own log, and it computes the commit index from a
//!   quorum of its own log, so the entry at that index is the committed
//!   one. Otherwise the waiter is dropped: a follower's commit index can
//!   come from a snapshot whose log this member's log need not match.
//! * **Lost.** A truncation drops the waiters it covers, a purge those it
//!   covers that were not answered, a vote for another leader or term all
//!   of them, and a payload that never reached the log (refused by
//!   openraft) is dropped with its [`CommitTicket`]. A dropped waiter is
//!   [`NotCommitted`]: the proposer then waits for openraft's own answer,
//!   which says what happened.
//! * **On disk.** A leader reports its own appends to openraft before
//!   they are on its disk (`store::LogStore`), so openraft may count a
//!   quorum with the leader's copy still on its way. [`CommitTicket::committed`]
//!   also waits until the leader's own copy is on disk ([`Durable`]): every
//!   member of that quorum then holds the entry.
//!
//! Tags are unique in the process (one counter for every group), so a
//! tagged entry that reaches another member's store in this process (a
//! test's in-memory network) matches none of its waiters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use openraft::{EntryPayload, LeaderId};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::durable::Durable;
use crate::kv::{OpaqueBytes, Request};
use crate::{LogId, MemberId};

/// The next tag (0 is none).
static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

type Waiter = oneshot::Sender<LogId>;

/// One member's waiters for the commit of tagged payloads (see the module
/// docs). Held by its log store.
#[derive(Default)]
pub struct Commits {
    inner: Mutex<Inner>,
    /// Waiters answered at a commit (for tests and metrics).
    answered: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Tagged payloads proposed and not yet in the log: tag -> waiter.
    proposed: HashMap<u64, Waiter>,
    /// In the log, not yet committed: index -> (log id, waiter).
    appended: BTreeMap<u64, Vec<(LogId, Waiter)>>,
}

impl std::fmt::Debug for Commits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Commits")
            .field("proposed", &inner.proposed.len())
            .field("appended", &inner.appended.len())
            .finish()
    }
}

/// The entry was not seen committed here: dropped from the log, never
/// appended, appended under another leader, or the store stopped. Nothing
/// is known of its fate; openraft's answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the entry's commit was not seen by its proposer's log store")]
pub struct NotCommitted;

/// A tagged payload's wait for its commit ([`Commits::tag`]). Dropping it
/// forgets a payload not yet appended.
pub struct CommitTicket {
    tag: u64,
    rx: oneshot::Receiver<LogId>,
    /// What `rx` gave (`None`: nothing yet; `Some(None)`: closed), kept
    /// so that a [`CommitTicket::committed`] dropped while it waits for the
    /// disk loses nothing.
    got: Option<Option<LogId>>,
    commits: Weak<Commits>,
    durable: Durable,
}

impl std::fmt::Debug for CommitTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitTicket")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl CommitTicket {
    /// Waits until the entry holding the payload is committed and on this
    /// member's (the leader's) disk; its log id. [`NotCommitted`] when
    /// that will not be seen (see the module docs).
    pub async fn committed(&mut self) -> Result<LogId, NotCommitted> {
        let got = match self.got {
            Some(got) => got,
            None => {
                let got = (&mut self.rx).await.ok();
                self.got = Some(got);
                got
            }
        };
        let id = got.ok_or(NotCommitted)?;
        self.durable
            .wait(id.index)
            .await
            .map_err(|_| NotCommitted)?;
        Ok(id)
    }
}

impl Drop for CommitTicket {
    fn drop(&mut self) {
        if let Some(c) = self.commits.upgrade() {
            c.inner.lock().proposed.remove(&self.tag);
        }
    }
}

impl Commits {
    /// Tags `payload` and returns the wait for its commit. `durable` is
    /// the log's ([`crate::LogStore::durable`]).
    pub fn tag(self: &Arc<Self>, payload: &mut OpaqueBytes, durable: Durable) -> CommitTicket {
        let tag = NEXT_TAG.fetch_add(1, Ordering::Relaxed);
        payload.set_tag(tag);
        let (tx, rx) = oneshot::channel();
        self.inner.lock().proposed.insert(tag, tx);
        CommitTicket {
            tag,
            rx,
            got: None,
            commits: Arc::downgrade(self),
            durable,
        }
    }

    /// How many waiters were answered at a commit.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// The log store was given these entries: tagged payloads' waiters
    /// move to their log ids.
    pub(crate) fn appended<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a openraft::Entry<crate::TypeConfig>>,
    ) {
        let mut inner = self.inner.lock();
        if inner.proposed.is_empty() {
            return;
        }
        for e in entries {
            let EntryPayload::Normal(r) = &e.payload else {
                continue;
            };
            let mut take = |p: &OpaqueBytes| {
                if p.tag() != 0 {
                    if let Some(w) = inner.proposed.remove(&p.tag()) {
                        inner
                            .appended
                            .entry(e.log_id.index)
                            .or_default()
                            .push((e.log_id, w));
                    }
                }
            };
            match r {
                Request::Opaque(p) => take(p),
                Request::Batch(rs) => {
                    for r in rs {
                        if let Request::Opaque(p) = r {
                            take(p);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// openraft committed up to `upto`; `leading`: this member's leader id
    /// if it leads (its saved vote is committed, for itself). Answers the
    /// waiters up to it whose entries are that leader's; drops the others.
    pub(crate) fn committed(&self, upto: LogId, leading: Option<LeaderId<MemberId>>) {
        let mut inner = self.inner.lock();
        if inner.appended.is_empty() {
            return;
        }
        let later = inner.appended.split_off(&(upto.index + 1));
        let due = std::mem::replace(&mut inner.appended, later);
        drop(inner);
        let answered: Vec<(LogId, Waiter)> = due
            .into_values()
            .flatten()
            .filter(|(id, _)| leading.as_ref() == Some(&id.leader_id))
            .collect();
        if answered.is_empty() {
            return;
        }
        self.answered
            .fetch_add(answered.len() as u64, Ordering::Relaxed);
        // Before the answers: once answered, the publisher may start its
        // next publish, which this point would then be counted for.
        crate::probe::mark(crate::probe::Phase::CommitSeen);
        for (id, w) in answered {
            let _ = w.send(id);
        }
    }

    /// The log was truncated from index `from` on.
    pub(crate) fn truncated(&self, from: u64) {
        let mut inner = self.inner.lock();
        let dropped = inner.appended.split_off(&from);
        drop(inner);
        drop(dropped);
    }

    /// The log was purged up to index `upto`: waiters still there were
    /// never seen committed by their leader.
    pub(crate) fn purged(&self, upto: u64) {
        let mut inner = self.inner.lock();
        let later = inner.appended.split_off(&(upto + 1));
        let dropped = std::mem::replace(&mut inner.appended, later);
        drop(inner);
        drop(dropped);
    }

    /// A vote was saved: waiters of entries of another leader are dropped.
    pub(crate) fn voted(&self, leading: Option<LeaderId<MemberId>>) {
        let mut inner = self.inner.lock();
        if inner.appended.is_empty() {
            return;
        }
        for ws in inner.appended.values_mut() {
            ws.retain(|(id, _)| leading.as_ref() == Some(&id.leader_id));
        }
        inner.appended.retain(|_, ws| !ws.is_empty());
    }
}
