//! How far a member's log is on disk ([`Durable`]), shared by the log
//! store that raises it and the commit answers that wait for it
//! (`commit.rs`).

use crate::error::StoreError;
use crate::LogId;

/// How far this member's log is on disk: the last log id the log writer
/// committed, or the error that stopped it. Cheap to clone.
///
/// A leader acknowledges its own appends to openraft before their fsync
/// (see `LogStore`), so openraft may count an entry as committed while
/// the leader's copy is still on its way to the disk. Nothing of such an
/// entry leaves the leader until its copy is durable: the state machine
/// applies it only then (`StateMachineStore` waits here), and the
/// network layer sends followers a commit index no higher than
/// [`Durable::clamp`]. So every commit anyone outside the leader's memory
/// sees is on the disks of a majority, as Raft requires.
#[derive(Clone, Debug)]
pub struct Durable {
    pub(crate) rx: tokio::sync::watch::Receiver<DurableState>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct DurableState {
    pub(crate) last: Option<LogId>,
    pub(crate) failed: Option<String>,
}

impl Durable {
    /// The last log id on disk.
    pub fn last(&self) -> Option<LogId> {
        self.rx.borrow().last
    }

    /// `commit`, lowered to the last log id on disk if that is behind.
    pub fn clamp(&self, commit: Option<LogId>) -> Option<LogId> {
        clamp_to(commit, self.last())
    }

    /// Waits until the log is on disk up to `index`; an error if the log
    /// writer failed (the group must stop: an acknowledged append is not
    /// on disk).
    pub async fn wait(&self, index: u64) -> Result<(), StoreError> {
        let mut rx = self.rx.clone();
        let state = rx
            .wait_for(|s| s.failed.is_some() || s.last.is_some_and(|l| l.index >= index))
            .await
            .map_err(|_| StoreError::Task("the raft log writer has stopped".into()))?;
        match &state.failed {
            Some(e) => Err(StoreError::Task(format!("the raft log write failed: {e}"))),
            None => Ok(()),
        }
    }
}

/// `commit`, lowered to `last` if that is behind (`None` is the lowest).
pub(crate) fn clamp_to(commit: Option<LogId>, last: Option<LogId>) -> Option<LogId> {
    match (commit, last) {
        (Some(c), Some(l)) if l.index < c.index => Some(l),
        (Some(_), None) => None,
        (c, _) => c,
    }
}
