//! Stream messages on encrypted topics as the application reads them: a
//! stream stores what it captured, sealed, and a reader opens it at its
//! own edge (this node's handles and admin API, or a remote reader). Here,
//! not in `e2e.rs`, so that the end-to-end keys know nothing of streams.

use std::sync::Arc;

use crate::e2e::E2e;
use crate::stream::{StreamError, StreamMsg};

/// `m` opened with `keys` (as is without them). `None`: not readable here
/// (counted by `keys`, as an event not delivered).
fn open(keys: Option<&Arc<E2e>>, mut m: StreamMsg) -> Option<StreamMsg> {
    match keys {
        Some(k) => {
            m.payload = k.open(&m.subject, std::mem::take(&mut m.payload))?;
            Some(m)
        }
        None => Some(m),
    }
}

/// Messages read in a batch, opened; those this node cannot open are left
/// out (counted).
pub(crate) fn open_all(
    keys: Option<&Arc<E2e>>,
    msgs: impl IntoIterator<Item = StreamMsg>,
) -> Vec<StreamMsg> {
    msgs.into_iter().filter_map(|m| open(keys, m)).collect()
}

/// One message read by sequence, opened: one that does not open is an
/// error, not an absent message.
pub(crate) fn open_one(
    keys: Option<&Arc<E2e>>,
    m: Option<StreamMsg>,
) -> Result<Option<StreamMsg>, StreamError> {
    let Some(m) = m else { return Ok(None) };
    let (seq, subject) = (m.seq, m.subject.clone());
    open(keys, m).map(Some).ok_or_else(|| {
        StreamError::Invalid(format!(
            "end-to-end: message {seq} on topic {subject:?} is encrypted and this principal cannot open it"
        ))
    })
}
