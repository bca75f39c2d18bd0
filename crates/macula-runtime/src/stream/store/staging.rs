//! The journal's staging, shared by the submitters and the writer: what is
//! staged, who waits for its flush, and the flush that writes it as one
//! record and answers them.

use super::*;

/// The journal, shared by the submitters (who append to it as they queue,
/// under this lock, so the journal's order is the queue's) and the writer
/// (who syncs it and checkpoints).
pub(super) struct Side {
    pub(super) journal: Journal,
    /// Unsynced writes were queued since the last checkpoint: durable
    /// writes are not journaled until the next one (the journal would
    /// replay them without those).
    pub(super) unjournaled: bool,
    /// The last job's ticket.
    pub(super) ticket: u64,
    /// Jobs staged in the journal with a sync interval, answered by the
    /// flush that writes them (`flush_side`).
    pub(super) waiters: Vec<Waiter>,
}

/// A job staged with a sync interval, waiting for its journal flush.
pub(super) struct Waiter {
    pub(super) ticket: u64,
    /// The highest sequence it puts (0: none).
    pub(super) top: u64,
    pub(super) done: Option<Done>,
}

/// Staged writes past this many bytes are flushed by the submitter that
/// staged them, without waiting for the group's end.
pub(super) const FLUSH_BYTES: usize = 1 << 20;
/// Staged writes whose publishers went away are flushed by the writer
/// thread this long after it found nothing else to do.
pub(super) const FLUSH_LATE: std::time::Duration = std::time::Duration::from_millis(1);

/// Writes what is staged in the journal as one record and answers the
/// writes waiting for it (sync interval): the gate's acknowledged ticket
/// rises first, then `durable`, then the answers. A failure fails the
/// store (the writer may have committed some of them; nothing more is
/// acknowledged) and is the waiters' answer.
pub(super) fn flush_side(
    side: &mut Side,
    gate: &Gate,
    durable: &watch::Sender<u64>,
    stats: &StoreStats,
) -> Result<(), String> {
    let written = match gate.failed() {
        Some(f) => Err(f),
        None => side.journal.flush().map_err(|e| e.to_string()),
    };
    match written {
        Ok(false) => {}
        Ok(true) => {
            stats.journal_appends.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            // Whatever was staged is dropped: never acknowledged.
            side.journal.discard_staged();
            gate.fail(&e);
            for w in side.waiters.drain(..) {
                answer_one(w.done, &Err(e.clone()));
            }
            return Err(e);
        }
    }
    if side.waiters.is_empty() {
        return Ok(());
    }
    let ticket = side.waiters.iter().map(|w| w.ticket).max().unwrap_or(0);
    let top = side.waiters.iter().map(|w| w.top).max().unwrap_or(0);
    gate.acked_to(ticket);
    raise_durable_to(durable, top);
    stats
        .early_acks
        .fetch_add(side.waiters.len() as u64, Ordering::Relaxed);
    for w in side.waiters.drain(..) {
        answer_one(w.done, &Ok(()));
    }
    Ok(())
}
