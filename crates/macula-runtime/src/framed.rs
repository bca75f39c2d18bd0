//! Reading and writing whole frames on QUIC streams.
//!
//! Owns the buffering between a byte stream and `macula_wire` frames. The
//! header is validated against our limit *before* the body is read, so the
//! body buffer is never larger than the limit. This module does not decide
//! what to do about a bad frame; it reports precisely what went wrong.

use macula_wire::{DecodeError, EncodeError, FrameError, FrameHeader, Message, FRAME_HEADER_LEN};
use quinn::{ReadExactError, RecvStream, SendStream};

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

/// Reads frames from one receive stream.
pub struct FrameReader {
    recv: RecvStream,
    max_len: u32,
}

impl FrameReader {
    pub fn new(recv: RecvStream, max_len: u32) -> Self {
        FrameReader { recv, max_len }
    }

    /// Reads the next frame; `Ok(None)` when the peer finished the stream
    /// cleanly between frames.
    pub async fn read(&mut self) -> Result<Option<InFrame>, ReadError> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        match self.recv.read_exact(&mut head).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(ReadExactError::FinishedEarly(n)) => return Err(ReadError::Truncated(n)),
            Err(ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let header = FrameHeader::decode(&head, self.max_len)?;
        // Bounded by `max_len`, checked just above.
        let mut body = vec![0u8; header.len as usize];
        match self.recv.read_exact(&mut body).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(n)) => {
                return Err(ReadError::Truncated(FRAME_HEADER_LEN + n))
            }
            Err(ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        Ok(Some(InFrame {
            msg_type: header.msg_type,
            body,
        }))
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

    /// Writes raw bytes (tests of bad input only use this through `send_raw`).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// Finishes the stream gracefully.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}
