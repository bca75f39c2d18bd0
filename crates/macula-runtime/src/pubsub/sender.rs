//! One peer's sender: drains its queue in the core into PUBLISH_BATCH frames
//! on a unidirectional data stream on the peer's connection, reaching (and
//! re-reaching) the node as needed.
//!
//! The core decides what is sent (`poll_transmit`), in which frames
//! (`Batch::encode`, sized to the peer's frame limit), when a write that
//! accepts nothing is cut off (`handle_stall`), when an idle sender exits
//! (`retire_if_idle`) and what an unreachable node means
//! (`handle_unreachable`). This task only does the I/O, never holding the
//! core's lock across an await, and encodes outside it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use macula_pubsub::outbound::SENDER_IDLE;
use macula_pubsub::{Mark, OutMsg, PeerRef, Stall, Transmit, BATCH_BYTES};
use macula_wire::NodeId;
use tokio::sync::Notify;

use super::{Inner, STREAM_KIND_PUBSUB};
use crate::peer::Peer;

/// How long graceful shutdown waits for a peer to acknowledge the end of
/// its data stream.
pub const STREAM_FINISH_WAIT: Duration = Duration::from_secs(1);

/// Stream reset code for a peer cut off for not reading (data stream).
pub const STREAM_RESET_STALLED: u16 = 0x100;

/// A sender that finds fewer messages than this yields (at most
/// `COALESCE_YIELDS` times, while more keep arriving) before writing: under
/// load many small writes (a packet each) become few large ones, and with
/// one message in flight it goes at once.
const COALESCE_TARGET: usize = 512;
const COALESCE_YIELDS: usize = 4;

/// The open data stream to one peer.
struct DataStream {
    peer: Peer,
    send: quinn::SendStream,
}

/// Opens the pub/sub data stream on `peer`'s connection: a unidirectional
/// stream whose first byte is `STREAM_KIND_PUBSUB`.
async fn open(peer: Peer) -> Result<DataStream, String> {
    let mut send = peer
        .connection()
        .open_uni()
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(&[STREAM_KIND_PUBSUB])
        .await
        .map_err(|e| e.to_string())?;
    Ok(DataStream { peer, send })
}

/// How one write ended.
enum Wrote {
    Done,
    /// The queue was retired meanwhile (the node was set aside); its
    /// messages were counted then.
    Retired,
    /// Cut off after this many bytes of the buffer were accepted.
    CutOff {
        dropped: u64,
        accepted: usize,
    },
    Failed(String),
}

/// Writes `buf`, reporting progress to the core (which starts the stall
/// clock) and asking it whether a write that accepts nothing until its
/// deadline is cut off. One lock per `write` call.
async fn write(inner: &Inner, q: PeerRef, send: &mut quinn::SendStream, buf: &[u8]) -> Wrote {
    let mut off = 0;
    let Some(mut deadline) = inner.core().handle_progress(q, inner.now()) else {
        return Wrote::Retired;
    };
    while off < buf.len() {
        let at = tokio::time::Instant::from_std(inner.clock.instant(deadline));
        deadline = match tokio::time::timeout_at(at, send.write(&buf[off..])).await {
            Ok(Ok(n)) => {
                off += n;
                if off == buf.len() {
                    break;
                }
                match inner.core().handle_progress(q, inner.now()) {
                    Some(d) => d,
                    None => return Wrote::Retired,
                }
            }
            Ok(Err(e)) => return Wrote::Failed(e.to_string()),
            Err(_) => match inner.core().handle_stall(q, inner.now()) {
                Stall::Wait(d) => d,
                Stall::CutOff { dropped } => {
                    return Wrote::CutOff {
                        dropped,
                        accepted: off,
                    }
                }
            },
        };
    }
    Wrote::Done
}

/// In a realm with an authority: removes from `msgs` what `peer` may not
/// receive (a client: its own `subscribe`; a node: `subscribe`, or `relay`
/// for the clients it carries), so it is never written; counted, not lost.
fn refuse_unauthorized(
    authz: &crate::authz::Authz,
    peer: &crate::peer::Peer,
    batch: &mut macula_pubsub::Batch,
    msgs: &mut Vec<OutMsg>,
    counters: &macula_pubsub::Counters,
) {
    let node = peer.node_id();
    let before = msgs.len();
    let mut first = None;
    // A batch's messages mostly share a few topics: each topic is decided
    // once per batch.
    let mut decided: Vec<(macula_pubsub::TopicName, bool)> = Vec::new();
    msgs.retain(|m| {
        if let Some((_, ok)) = decided.iter().find(|(t, _)| *t == m.topic) {
            return *ok;
        }
        let ok = match peer.authorized(authz, macula_auth::Action::Subscribe, m.topic.as_str()) {
            Ok(()) => true,
            Err(d) => {
                first.get_or_insert(d);
                false
            }
        };
        if decided.len() < 16 {
            decided.push((m.topic.clone(), ok));
        }
        ok
    });
    let refused = before - msgs.len();
    if let Some(d) = first {
        batch.refused += refused;
        counters.unauthorized_dropped_total.inc_by(refused as u64);
        tracing::debug!(peer = %node, refused, error = %d, "pub/sub messages kept from a peer that may not subscribe to them");
    }
}

/// Runs the sender of `node`'s queue `q` until the core retires it; then
/// publishes waiting for room in it look again.
pub(super) async fn run(owner: Weak<Inner>, q: PeerRef, node: NodeId, wake: Arc<Notify>) {
    drain(&owner, q, node, wake).await;
    if let Some(inner) = owner.upgrade() {
        inner.room.notify_waiters();
    }
}

async fn drain(owner: &Weak<Inner>, q: PeerRef, node: NodeId, wake: Arc<Notify>) {
    let mut stream: Option<DataStream> = None;
    let mut msgs: Vec<OutMsg> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH_BYTES + 1024);
    let mut marks: Vec<Mark> = Vec::new();
    // Messages in whole frames written on the current stream: told to the
    // peer if the stream is ever reset, so it knows what it lost in flight.
    let mut carried = 0u64;
    loop {
        msgs.clear();
        let Some(inner) = owner.upgrade() else { return };
        let t = inner.core().poll_transmit(q, &mut msgs, inner.now());
        let mut batch = match t {
            Transmit::Retired => return,
            Transmit::Empty => {
                drop(inner);
                if tokio::time::timeout(SENDER_IDLE.to_duration(), wake.notified())
                    .await
                    .is_err()
                {
                    let Some(inner) = owner.upgrade() else { return };
                    if inner.core().retire_if_idle(q, inner.now()) {
                        return;
                    }
                }
                continue;
            }
            Transmit::Finish => {
                // Graceful shutdown: end the stream and wait (bounded) until
                // the peer has acknowledged all of it.
                if let Some(mut s) = stream.take() {
                    if s.send.finish().is_ok() {
                        let _ = tokio::time::timeout(STREAM_FINISH_WAIT, s.send.stopped()).await;
                    }
                }
                inner.core().handle_finished(q);
                return;
            }
            Transmit::Batch(b) => b,
        };
        // The queue was taken: publishes waiting for room go on.
        inner.room.notify_waiters();
        // Coalesce while the publisher keeps adding (a few yields, no timer).
        for _ in 0..COALESCE_YIELDS {
            if msgs.len() >= COALESCE_TARGET {
                break;
            }
            tokio::task::yield_now().await;
            match inner.core().poll_transmit(q, &mut msgs, inner.now()) {
                Transmit::Batch(more) => {
                    batch.merge(more);
                    inner.room.notify_waiters();
                }
                _ => break,
            }
        }
        if stream.as_ref().is_none_or(|s| s.peer.is_closed()) {
            stream = None;
            carried = 0;
            let reach = inner.mesh.as_ref().map(|m| m.reach(node));
            let peer = match reach {
                Some(r) => r.await,
                None => None,
            };
            let Some(peer) = peer else {
                tracing::debug!(peer = %node, dropped = batch.n, "pub/sub peer unreachable; its interest is set aside");
                inner.core().handle_unreachable(q, inner.now());
                return;
            };
            batch.frame_limit = peer.hello().max_frame_size;
            inner.core().handle_peer_up(&node, batch.frame_limit);
            match open(peer).await {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    tracing::debug!(peer = %node, error = %e, dropped = batch.n, "could not open a pub/sub data stream");
                    inner
                        .core()
                        .handle_send_failed(q, &msgs, batch.report.take(), inner.now());
                    continue;
                }
            }
        }
        let Some(s) = &mut stream else { continue };
        if let Some(authz) = &inner.authz {
            refuse_unauthorized(authz, &s.peer, &mut batch, &mut msgs, &inner.counters);
        }
        buf.clear();
        marks.clear();
        let encoded = batch.encode_marked(&mut buf, &msgs, &mut marks);
        if encoded.too_large > 0 {
            tracing::warn!(peer = %node, n = encoded.too_large, limit = batch.frame_limit,
                "pub/sub messages larger than the peer's frame limit dropped (reported to it)");
        }
        match write(&inner, q, &mut s.send, &buf).await {
            Wrote::Retired => return,
            Wrote::Done => {
                carried += batch.carried(&encoded);
                inner
                    .core()
                    .handle_written(q, &batch, &msgs, encoded, inner.now());
                s.peer.touch();
            }
            Wrote::CutOff { dropped, accepted } => {
                // The peer learns why from the reset code, and what it lost
                // from the loss report a new sender writes on a new stream.
                let _ = s
                    .send
                    .reset(quinn::VarInt::from_u32(u32::from(STREAM_RESET_STALLED)));
                tracing::warn!(peer = %node, dropped, in_flight = carried, "pub/sub peer accepted no data for the stall timeout; cut off (data stream reset, queue dropped, loss reported)");
                let written = marks
                    .iter()
                    .take_while(|m| m.end <= accepted)
                    .last()
                    .copied();
                let now = inner.now();
                let mut core = inner.core();
                core.handle_cut_off(node, batch, &msgs, written, carried, now);
                super::PubSub(inner.clone()).after(core);
                return;
            }
            Wrote::Failed(e) => {
                tracing::debug!(peer = %node, error = %e, dropped = batch.n, "pub/sub data stream failed");
                inner
                    .core()
                    .handle_send_failed(q, &msgs, batch.report.take(), inner.now());
                stream = None;
            }
        }
    }
}
