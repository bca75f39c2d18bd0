//! Reading and writing whole frames on QUIC streams.
//!
//! Owns the buffering between a byte stream and `macula_wire` frames. The
//! header is validated against our limit *before* the body is read, so the
//! body buffer is never larger than the limit. This module does not decide
//! what to do about a bad frame; it reports precisely what went wrong.

use macula_wire::{DecodeError, EncodeError, FrameDecoder, FrameError, Message};
use quinn::{RecvStream, SendStream};

use crate::metrics::ProtocolErrorKind;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The header broke the protocol (fatal for the stream).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended inside a frame.
    #[error("stream ended after {0} bytes of a frame")]
    Truncated(usize),
    /// The stream or connection failed underneath.
    #[error("stream read failed: {0}")]
    Stream(#[from] quinn::ReadError),
}

impl ReadError {
    /// The protocol-error metric this failure counts as, if it is the peer's fault.
    pub fn protocol_kind(&self) -> Option<ProtocolErrorKind> {
        match self {
            ReadError::Frame(FrameError::TooLarge { .. }) => Some(ProtocolErrorKind::FrameTooLarge),
            ReadError::Frame(_) => Some(ProtocolErrorKind::BadHeader),
            ReadError::Truncated(_) => Some(ProtocolErrorKind::Truncated),
            ReadError::Stream(_) => None,
        }
    }
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("stream write failed: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// A frame as read: its type byte and body, not yet decoded.
#[derive(Debug)]
pub struct InFrame {
    pub msg_type: u8,
    pub body: Vec<u8>,
}

impl InFrame {
    pub fn decode(&self) -> Result<Message, DecodeError> {
        Message::decode(self.msg_type, &self.body)
    }
}

/// Bytes asked of the stream per read: many small frames arrive per read
/// instead of two reads per frame. Larger frames grow the buffer up to the
/// frame limit, never beyond it.
const READ_CHUNK: usize = 64 * 1024;

/// Reads frames from one receive stream, through a buffer.
pub struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    /// Start of the unread bytes in `buf`.
    start: usize,
}

impl FrameReader {
    pub fn new(recv: RecvStream, max_len: u32) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(max_len),
            buf: Vec::new(),
            start: 0,
        }
    }

    /// Reads the next frame; `Ok(None)` when the peer finished the stream
    /// cleanly between frames. The header is validated (length against the
    /// limit) as soon as its 8 bytes are buffered, before the body is read.
    pub async fn read(&mut self) -> Result<Option<InFrame>, ReadError> {
        loop {
            if let Some((frame, used)) = self.decoder.decode(&self.buf[self.start..])? {
                let out = InFrame {
                    msg_type: frame.header.msg_type,
                    body: frame.body.to_vec(),
                };
                self.start += used;
                return Ok(Some(out));
            }
            // Need more bytes: drop what was consumed, then read a chunk.
            // `read_chunk` takes data from the stream only when it completes,
            // so this is cancel-safe (the caller polls it inside `select!`).
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
                // Do not keep a large buffer around on an idle connection.
                if self.buf.is_empty() && self.buf.capacity() > READ_CHUNK {
                    self.buf.shrink_to(READ_CHUNK / 8);
                }
            }
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return match self.buf.len() {
                        0 => Ok(None),
                        n => Err(ReadError::Truncated(n)),
                    };
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Abandons the stream, telling the peer to stop sending.
    pub fn stop(&mut self, code: u32) {
        // Fails only if already stopped or finished, which is fine.
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Writes frames to one send stream.
pub struct FrameWriter {
    send: SendStream,
    buf: Vec<u8>,
    /// The peer's announced maximum frame size.
    peer_max: u32,
}

impl FrameWriter {
    pub fn new(send: SendStream, peer_max: u32) -> Self {
        FrameWriter {
            send,
            buf: Vec::with_capacity(256),
            peer_max,
        }
    }

    /// Raises or lowers the peer's limit once its HELLO is known.
    pub fn set_peer_max(&mut self, peer_max: u32) {
        self.peer_max = peer_max;
    }

    /// Encodes and writes one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), WriteError> {
        self.buf.clear();
        msg.encode_frame(&mut self.buf, self.peer_max)?;
        self.send.write_all(&self.buf).await?;
        Ok(())
    }

    /// Encodes several messages into one buffer and writes it at once: many
    /// small messages become one stream write (and few QUIC packets). A
    /// message that fails to encode is skipped and reported; the rest go.
    pub async fn send_many(&mut self, msgs: &[Message]) -> Result<usize, WriteError> {
        self.buf.clear();
        let mut n = 0;
        let mut first_err = None;
        for m in msgs {
            match m.encode_frame(&mut self.buf, self.peer_max) {
                Ok(()) => n += 1,
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if n > 0 {
            self.send.write_all(&self.buf).await?;
        }
        match first_err {
            Some(e) if n == 0 => Err(e.into()),
            _ => Ok(n),
        }
    }

    /// Writes raw bytes, unvalidated: for tests that must send bad input.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// Finishes the stream gracefully.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}
