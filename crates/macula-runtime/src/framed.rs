//! Reading and writing whole frames on QUIC streams.
//!
//! Owns the buffering between a byte stream and `macula_wire` frames. The
//! header is validated against our limit *before* the body is read, so the
//! body buffer is never larger than the limit. This module does not decide
//! what to do about a bad frame; it reports precisely what went wrong.

use bytes::{Buf, Bytes, BytesMut};
use macula_wire::{DecodeError, EncodeError, FrameDecoder, FrameError, Message, FRAME_HEADER_LEN};
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

/// A frame as read: its type byte and body, not yet decoded. The body is a
/// slice of the read buffer: payloads can be sliced out of it without a copy.
#[derive(Debug)]
pub struct InFrame {
    pub msg_type: u8,
    pub body: Bytes,
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
    /// Unread bytes. Frames are split off it (shared, not copied); once
    /// empty it is replaced, so a kept frame never pins more than the chunks
    /// it was read from.
    buf: BytesMut,
    /// Chunks read for a frame whose header is in `buf` but whose body is
    /// not whole yet: held as read, and copied into `buf` at once when the
    /// frame is whole (one allocation of the right size and one copy of
    /// each byte; growing `buf` chunk by chunk reallocated and copied a
    /// 64 KiB frame's start some six times). Never more than the bytes
    /// that arrived: a header alone reserves nothing.
    parts: Vec<Bytes>,
    /// Bytes in `parts`.
    parts_len: usize,
}

impl FrameReader {
    pub fn new(recv: RecvStream, max_len: u32) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(max_len),
            buf: BytesMut::new(),
            parts: Vec::new(),
            parts_len: 0,
        }
    }

    /// Reads one byte (a stream's kind, before any frame); `Ok(None)` if the
    /// stream ended first.
    pub async fn read_u8(&mut self) -> Result<Option<u8>, ReadError> {
        while self.buf.is_empty() {
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => return Ok(None),
            }
        }
        Ok(Some(self.buf.get_u8()))
    }

    /// Reads the next frame; `Ok(None)` when the peer finished the stream
    /// cleanly between frames. The header is validated (length against the
    /// limit) as soon as its 8 bytes are buffered, before the body is read.
    pub async fn read(&mut self) -> Result<Option<InFrame>, ReadError> {
        loop {
            let found = self
                .decoder
                .decode(&self.buf)?
                .map(|(frame, used)| (frame.header.msg_type, used));
            if let Some((msg_type, used)) = found {
                let mut whole = self.buf.split_to(used);
                whole.advance(FRAME_HEADER_LEN);
                if self.buf.is_empty() {
                    // Let go of the shared allocation (kept frames hold it).
                    self.buf = BytesMut::new();
                }
                return Ok(Some(InFrame {
                    msg_type,
                    body: whole.freeze(),
                }));
            }
            // Need more bytes. `read_chunk` takes data from the stream only
            // when it completes, so this is cancel-safe (the caller polls it
            // inside `select!`; a chunk is either held or not yet read).
            let chunk = match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => chunk.bytes,
                Ok(None) => {
                    return match self.buf.len() + self.parts_len {
                        0 => Ok(None),
                        n => Err(ReadError::Truncated(n)),
                    };
                }
                Err(e) => return Err(e.into()),
            };
            match self.decoder.frame_len(&self.buf) {
                Some(total) if self.buf.len() + self.parts_len + chunk.len() < total => {
                    // Still short of the frame (its header was checked
                    // against the limit): hold the chunk.
                    self.parts_len += chunk.len();
                    self.parts.push(chunk);
                }
                _ => self.take_parts(&chunk),
            }
        }
    }

    /// Moves the held chunks and then `last` into `buf`, making room for
    /// all of them at once.
    fn take_parts(&mut self, last: &[u8]) {
        self.buf.reserve(self.parts_len + last.len());
        for p in self.parts.drain(..) {
            self.buf.extend_from_slice(&p);
        }
        self.parts_len = 0;
        self.buf.extend_from_slice(last);
    }

    /// The stream and the bytes read past the last frame: for a stream that
    /// stops carrying frames (a relayed session after its status frame).
    pub fn into_parts(mut self) -> (RecvStream, Bytes) {
        self.take_parts(&[]);
        (self.recv, self.buf.freeze())
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

    /// The stream, for raw writes (a relayed session after its status frame).
    pub fn into_inner(self) -> SendStream {
        self.send
    }

    /// Finishes the stream gracefully.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}
