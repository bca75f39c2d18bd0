//! The connection driver: one task per connection, from the end of the
//! handshake until the connection closes. It answers PING, reports bad
//! frames, sends health pings, closes idle connections and says goodbye on
//! shutdown; everything else goes through the [`Services`] table to the
//! service that declared it. This module imports no service.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use macula_pool::{Liveness, LivenessConfig, Verdict};
use macula_wire::time::Millis;
use macula_wire::{DecodeError, DisconnectReason, ErrorCode, ErrorFrame, Message, Pong};

use crate::framed::{FrameReader, FrameWriter, InFrame, ReadError};
use crate::metrics::ProtocolErrorKind;
use crate::peer::{close_code, describe_close, truncate, unix_ms, Peer, ERROR_LINGER};
use crate::service::{Answer, Services};

/// Timers and limits the driver needs, and the services it dispatches to.
#[derive(Debug, Clone)]
pub(crate) struct DriverConfig {
    pub idle_timeout: Duration,
    /// `None`: no health pings (QUIC keep-alives alone watch the peer).
    pub health_ping_interval: Option<Duration>,
    /// The failure detector's timers; `None` (a client): QUIC keep-alives
    /// and the transport idle timeout alone watch the peer.
    pub liveness: Option<LivenessConfig>,
    pub ping_timeout: Duration,
    pub max_frame_size: u32,
    /// Who serves what arrives on this connection.
    pub services: Services,
}

/// How a driven connection ended.
#[derive(Debug)]
pub(crate) struct Ended {
    /// Human-readable reason (logged, and the text of `PeerEvent::Disconnected`).
    pub why: String,
    /// Whether the node left the mesh or went silent.
    pub gone: Gone,
}

/// What the end of a connection says about the node behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gone {
    /// Nothing: the connection closed (idle, evicted, an error).
    No,
    /// It left the mesh (DISCONNECT or close code Shutdown).
    Left,
    /// It went silent (the failure detector's bound, a failed health ping,
    /// or the QUIC idle timeout despite keep-alives): crashed, or cut off by
    /// the network.
    Silent,
}

/// What the control-stream loop should do after a frame.
enum Next {
    Continue,
    Close(DisconnectReason, String),
    /// An ERROR frame was sent; close with ProtocolError once it is delivered.
    Fail(String),
}

/// Handles one frame on the control stream: the driver's own messages here,
/// the rest through the services table.
async fn on_control_frame(peer: &Peer, frame: InFrame, cfg: &DriverConfig) -> Next {
    let m = peer.metrics();
    m.frames_received_total.inc();
    m.message_received(frame.msg_type);
    let msg = match frame.decode() {
        Ok(msg) => msg,
        Err(DecodeError::UnknownType(t)) => {
            m.protocol_error(ProtocolErrorKind::UnknownType);
            let why = format!("unknown message type {t:#04x}");
            report(peer, ErrorCode::UnknownMessageType, &why, t).await;
            return Next::Continue;
        }
        Err(e) => {
            m.protocol_error(ProtocolErrorKind::Malformed);
            report(peer, ErrorCode::Malformed, &e.to_string(), frame.msg_type).await;
            return Next::Fail(e.to_string());
        }
    };
    match msg {
        Message::Ping(p) => {
            m.pings_received_total.inc();
            if p.keep {
                peer.touch();
            }
            let pong = Message::Pong(Pong {
                nonce: p.nonce,
                echo_sent_at_us: p.sent_at_us,
                responder_unix_ms: unix_ms(),
            });
            match peer.send(&pong).await {
                Ok(()) => Next::Continue,
                Err(e) => Next::Close(DisconnectReason::ProtocolError, e),
            }
        }
        Message::Pong(p) => {
            m.pongs_received_total.inc();
            if !peer.complete_ping(p) {
                m.pongs_unmatched_total.inc();
            }
            Next::Continue
        }
        Message::Disconnect(d) => {
            tracing::debug!(peer = %peer.node_id(), reason = ?d.reason, message = %d.message, "peer is disconnecting");
            // The reason code goes into the event text: it is the part a
            // reader (or a test) can rely on; the message is free text.
            Next::Close(
                d.reason,
                format!("peer disconnected ({:?}): {}", d.reason, d.message),
            )
        }
        Message::Error(e) => {
            tracing::warn!(peer = %peer.node_id(), code = ?e.code, message = %e.message, "peer reported an error");
            Next::Continue
        }
        Message::Hello(_) => {
            unserved(peer, "HELLO after handshake", frame.msg_type).await;
            Next::Continue
        }
        msg => {
            let t = frame.msg_type;
            let Some(service) = cfg.services.for_message(t) else {
                let why = match cfg.services.for_stream(t) {
                    Some(_) => format!("{} opens its own stream", msg.msg_type().name()),
                    None => format!("this node serves no {}", msg.msg_type().name()),
                };
                unserved(peer, &why, t).await;
                return Next::Continue;
            };
            peer.touch();
            match service.on_message(peer, msg) {
                Answer::Done => {}
                Answer::Reply(a) => {
                    if let Err(e) = peer.send(&a).await {
                        return Next::Close(DisconnectReason::ProtocolError, e);
                    }
                }
                Answer::Refuse { code, reason } => {
                    // Refused and counted; the connection is still sound.
                    m.protocol_error(match code {
                        ErrorCode::Malformed => ProtocolErrorKind::Malformed,
                        _ => ProtocolErrorKind::Unexpected,
                    });
                    report(peer, code, &reason, t).await;
                }
            }
            Next::Continue
        }
    }
}

/// Closes the connection with ProtocolError after an ERROR frame was sent on
/// the control stream: finishes the stream and lingers (bounded) for the peer
/// to read the frame and close first, as `refuse` does during the handshake.
/// A macula peer closes as soon as it sees the control stream finish.
async fn close_after_error(peer: &Peer, why: &str) {
    peer.finish_control().await;
    let conn = peer.connection();
    let _ = tokio::time::timeout(ERROR_LINGER, conn.closed()).await;
    conn.close(
        close_code(DisconnectReason::ProtocolError),
        truncate(why).as_bytes(),
    );
}

/// A message this node does not take here (a service it does not run, or
/// one that belongs elsewhere): counted and reported; the connection stays
/// up.
async fn unserved(peer: &Peer, why: &str, msg_type: u8) {
    peer.metrics().protocol_error(ProtocolErrorKind::Unexpected);
    report(peer, ErrorCode::UnexpectedMessage, why, msg_type).await;
}

async fn report(peer: &Peer, code: ErrorCode, message: &str, msg_type: u8) {
    let frame = Message::Error(ErrorFrame {
        code,
        message: truncate(message),
        msg_type,
    });
    if let Err(e) = peer.send(&frame).await {
        tracing::debug!(peer = %peer.node_id(), error = %e, "could not send ERROR frame");
    }
}

/// Serves a bidirectional stream the peer opened after the handshake: a
/// first frame of a type some service takes a stream for hands the stream
/// to it; otherwise PING is answered and anything else reported. A
/// malformed or oversized frame ends only this stream; the connection stays
/// up.
async fn serve_stream(
    peer: Peer,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    max: u32,
    services: Services,
) {
    let m = peer.metrics().clone();
    let mut reader = FrameReader::new(recv, max);
    let mut writer = FrameWriter::new(send, peer.hello().max_frame_size);
    let mut first = true;
    loop {
        let frame = match reader.read().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                if let Some(kind) = e.protocol_kind() {
                    m.protocol_error(kind);
                    let err = Message::Error(ErrorFrame {
                        code: kind.error_code(),
                        message: truncate(&e.to_string()),
                        msg_type: 0,
                    });
                    let _ = writer.send(&err).await;
                    reader.stop(u32::from(u16::from(DisconnectReason::ProtocolError)));
                    tracing::debug!(peer = %peer.node_id(), error = %e, "closed a stream after a protocol error");
                }
                break;
            }
        };
        m.frames_received_total.inc();
        m.message_received(frame.msg_type);
        peer.touch();
        let decoded = frame.decode();
        if std::mem::take(&mut first) {
            // The first frame decides what the stream is: a service's
            // opener takes the stream over (a relay request turns it into a
            // spliced byte pipe, say).
            if let (Ok(msg), Some(service)) = (&decoded, services.for_stream(frame.msg_type)) {
                let msg = msg.clone();
                return service.on_stream(peer, msg, reader, writer).await;
            }
        }
        let reply = match decoded {
            Ok(Message::Ping(p)) => {
                m.pings_received_total.inc();
                Message::Pong(Pong {
                    nonce: p.nonce,
                    echo_sent_at_us: p.sent_at_us,
                    responder_unix_ms: unix_ms(),
                })
            }
            Ok(other) => {
                m.protocol_error(ProtocolErrorKind::Unexpected);
                Message::Error(ErrorFrame {
                    code: ErrorCode::UnexpectedMessage,
                    message: format!("{} is not served on this stream", other.msg_type().name()),
                    msg_type: frame.msg_type,
                })
            }
            Err(DecodeError::UnknownType(t)) => {
                m.protocol_error(ProtocolErrorKind::UnknownType);
                Message::Error(ErrorFrame {
                    code: ErrorCode::UnknownMessageType,
                    message: format!("unknown message type {t:#04x}"),
                    msg_type: t,
                })
            }
            Err(e) => {
                m.protocol_error(ProtocolErrorKind::Malformed);
                let _ = writer
                    .send(&Message::Error(ErrorFrame {
                        code: ErrorCode::Malformed,
                        message: truncate(&e.to_string()),
                        msg_type: frame.msg_type,
                    }))
                    .await;
                reader.stop(u32::from(u16::from(DisconnectReason::ProtocolError)));
                break;
            }
        };
        if writer.send(&reply).await.is_err() {
            break;
        }
        m.frames_sent_total.inc();
        m.message_sent(reply.msg_type() as u8);
    }
    writer.finish();
}

/// Serves a unidirectional stream the peer opened. Its first byte says what
/// it carries; the service that declared that kind reads the rest. An
/// unknown kind stops this stream only; the connection stays up.
async fn serve_uni(peer: Peer, recv: quinn::RecvStream, max: u32, services: Services) {
    let mut reader = FrameReader::new(recv, max);
    let kind = match reader.read_u8().await {
        Ok(Some(k)) => k,
        _ => return,
    };
    match services.for_uni(kind) {
        Some(service) => service.on_uni_stream(peer, kind, reader).await,
        None => {
            peer.metrics().protocol_error(ProtocolErrorKind::Unexpected);
            reader.stop(u32::from(u16::from(DisconnectReason::ProtocolError)));
            tracing::debug!(peer = %peer.node_id(), kind, "refused a unidirectional stream of unknown kind");
        }
    }
}

/// Drives a connection until it closes or shutdown is signalled: reads the
/// control stream, serves peer-opened streams, sends health pings and closes
/// the connection when idle. Returns why it ended; the caller tells the
/// services (`Services::peer_down`), since only it knows whether another
/// connection to the same node survives.
pub(crate) async fn drive(
    peer: Peer,
    mut control: FrameReader,
    cfg: DriverConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Ended {
    let conn = peer.connection().clone();
    let mut health = cfg.health_ping_interval.map(|every| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut watch = cfg.liveness.map(|c| Watch::new(&conn, c));
    peer.touch();
    let idle_sleep = tokio::time::sleep(cfg.idle_timeout);
    tokio::pin!(idle_sleep);
    // This future lives as long as the connection (10,000 of them on a
    // busy gateway), so the rarely taken, deep branches below are boxed:
    // inline, their state would sit in every connection's task.
    let mut left_said = false;
    let mut silent_said = false;
    let ping_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let end = loop {
        tokio::select! {
            frame = control.read() => match frame {
                Ok(Some(f)) => match Box::pin(on_control_frame(&peer, f, &cfg)).await {
                    Next::Continue => {}
                    Next::Close(reason, why) => {
                        // A DISCONNECT with Shutdown: it is leaving the
                        // mesh, not just this connection.
                        left_said |= reason == DisconnectReason::Shutdown;
                        conn.close(close_code(reason), truncate(&why).as_bytes());
                        break why;
                    }
                    Next::Fail(why) => {
                        Box::pin(close_after_error(&peer, &why)).await;
                        break why;
                    }
                },
                Ok(None) => {
                    conn.close(close_code(DisconnectReason::ProtocolError), b"control stream finished");
                    break "control stream finished".to_string();
                }
                Err(e) => {
                    if let Some(kind) = e.protocol_kind() {
                        peer.metrics().protocol_error(kind);
                        let why = e.to_string();
                        Box::pin(async {
                            report(&peer, kind.error_code(), &why, 0).await;
                            close_after_error(&peer, &why).await;
                        })
                        .await;
                        break e.to_string();
                    }
                    // Lost connection: describe it the same way whichever
                    // branch noticed first, so the reason names the code.
                    break match e {
                        ReadError::Stream(quinn::ReadError::ConnectionLost(c)) => describe_close(&c),
                        other => other.to_string(),
                    };
                }
            },
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    tokio::spawn(serve_stream(peer.clone(), send, recv, cfg.max_frame_size, cfg.services.clone()));
                }
                Err(e) => break describe_close(&e),
            },
            stream = conn.accept_uni() => match stream {
                Ok(recv) => {
                    tokio::spawn(serve_uni(peer.clone(), recv, cfg.max_frame_size, cfg.services.clone()));
                }
                Err(e) => break describe_close(&e),
            },
            _ = tick(&mut health) => {
                let p = peer.clone();
                let timeout = cfg.ping_timeout;
                let failed = ping_failed.clone();
                tokio::spawn(async move {
                    if let Err(e) = p.ping(timeout).await {
                        if !p.is_closed() {
                            failed.store(true, Relaxed);
                            tracing::warn!(peer = %p.node_id(), error = %e, "health ping failed; closing");
                            p.metrics().peers_declared_down_total.inc();
                            p.connection().close(close_code(DisconnectReason::Unresponsive), b"health ping failed");
                        }
                    }
                });
            }
            verdict = look(&mut watch, &conn) => match verdict {
                Verdict::Alive => {}
                Verdict::Probe => {
                    peer.metrics().peer_probes_total.inc();
                    let p = peer.clone();
                    let timeout = watch.as_ref().map_or(cfg.ping_timeout, Watch::bound);
                    // The answer does not matter: its datagrams are what the
                    // detector looks for.
                    tokio::spawn(async move {
                        let _ = p.ping(timeout).await;
                    });
                }
                Verdict::Down { silent_for } => {
                    let why = format!("declared down: nothing heard for {:?}", silent_for.to_duration());
                    tracing::warn!(peer = %peer.node_id(), silent_ms = silent_for.0, "peer declared down by the failure detector; closing");
                    peer.metrics().peers_declared_down_total.inc();
                    conn.close(close_code(DisconnectReason::Unresponsive), why.as_bytes());
                    silent_said = true;
                    break why;
                }
            },
            () = &mut idle_sleep => {
                let idle = peer.idle_for();
                let kept = peer.is_kept();
                if idle >= cfg.idle_timeout && !kept {
                    peer.metrics().pool_idle_closed_total.inc();
                    Box::pin(peer.disconnect(DisconnectReason::Idle, "idle timeout")).await;
                    break format!("idle for {idle:?}");
                }
                // A kept connection is looked at again a whole timeout
                // later (it may stop being kept), not over and over.
                let wait = match kept {
                    true => cfg.idle_timeout,
                    false => cfg.idle_timeout.saturating_sub(idle).max(Duration::from_millis(50)),
                };
                idle_sleep.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            _ = shutdown.changed() => {
                Box::pin(peer.disconnect(DisconnectReason::Shutdown, "node shutting down")).await;
                break "local shutdown".to_string();
            }
            err = conn.closed() => break describe_close(&err),
        }
    };
    // A peer that closed with code Shutdown is leaving the mesh (its
    // DISCONNECT frame may not have arrived before the close). Checked here,
    // not in one select arm: the control-stream read usually sees the close
    // first.
    // A transport timeout (silent despite keep-alives) means the peer
    // crashed or became unreachable: the same conclusion, reached later.
    let gone = match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == close_code(DisconnectReason::Shutdown) =>
        {
            Gone::Left
        }
        Some(quinn::ConnectionError::TimedOut) => Gone::Silent,
        // Closed here for silence: by the detector, or a failed health ping.
        _ if silent_said || ping_failed.load(Relaxed) => Gone::Silent,
        _ if left_said => Gone::Left,
        _ => Gone::No,
    };
    // Wake anyone still waiting for a pong.
    peer.clear_pings();
    Ended { why: end, gone }
}

/// The failure detector of one connection and its timer.
struct Watch {
    liveness: Liveness,
    every: tokio::time::Interval,
    started: tokio::time::Instant,
}

impl Watch {
    fn new(conn: &quinn::Connection, cfg: LivenessConfig) -> Watch {
        let every = cfg.tick.to_duration();
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // A late tick must stay late (the detector reads lateness as our
        // own stall), not be made up for by a burst.
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Watch {
            liveness: Liveness::new(cfg, Millis::ZERO, conn.stats().udp_rx.datagrams),
            every: i,
            started: tokio::time::Instant::now(),
        }
    }

    /// The silence that declares this peer down now (probes wait this long
    /// for their PONG at most).
    fn bound(&self) -> Duration {
        self.liveness.config().bound(Millis::ZERO).to_duration()
    }
}

/// The failure detector's next verdict, at its next tick; never, without
/// a detector (a client's connection).
async fn look(watch: &mut Option<Watch>, conn: &quinn::Connection) -> Verdict {
    match watch {
        Some(w) => {
            w.every.tick().await;
            let now = Millis::from_duration(w.started.elapsed());
            let rtt = Millis::from_duration(conn.rtt());
            w.liveness.look(now, conn.stats().udp_rx.datagrams, rtt)
        }
        None => std::future::pending().await,
    }
}

/// The next health-ping tick; never, without health pings.
async fn tick(health: &mut Option<tokio::time::Interval>) {
    match health {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
