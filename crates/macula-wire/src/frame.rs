//! Frame codec: an 8-byte header followed by a body.
//!
//! ```text
//! 0        1        2        3        4                                 8
//! +--------+--------+--------+--------+--------+--------+--------+--------+
//! | version|  type  | flags  |reserved|     body length (u32, big-endian) |
//! +--------+--------+--------+--------+--------+--------+--------+--------+
//! ```
//!
//! Like mini-redis's `frame.rs`, decoding separates "incomplete, read more"
//! (`Ok(None)`) from "protocol error" (`Err`). The length is checked against the
//! caller's limit *before* anything is buffered, so a peer cannot make us
//! allocate more than the limit. This module knows nothing about message
//! bodies; `message.rs` does.

use crate::limits::PROTOCOL_VERSION;

/// Size of the fixed frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 8;

/// Flag bits defined by protocol version 1. None yet: every bit is reserved
/// and a receiver rejects a frame with an unknown flag set, because a flag may
/// change how the body must be read (compression, for instance).
pub const KNOWN_FLAGS: u8 = 0;

/// A parsed, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version of the body.
    pub version: u8,
    /// Message type (see `MessageType`); unknown values are not a framing error.
    pub msg_type: u8,
    /// Flag bits; must be a subset of `KNOWN_FLAGS`.
    pub flags: u8,
    /// Body length in bytes.
    pub len: u32,
}

/// Why a frame cannot be read. Every variant is fatal for the stream it came
/// on: after a framing error the byte stream cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("unsupported protocol version {0} (this node speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("reserved header byte is {0:#04x}, must be zero")]
    Reserved(u8),
}

impl FrameHeader {
    /// Header for a version-1 frame of `msg_type` with a body of `len` bytes.
    pub fn new(msg_type: u8, len: u32) -> Self {
        FrameHeader {
            version: PROTOCOL_VERSION,
            msg_type,
            flags: 0,
            len,
        }
    }

    /// Serialises the header.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let l = self.len.to_be_bytes();
        [
            self.version,
            self.msg_type,
            self.flags,
            0,
            l[0],
            l[1],
            l[2],
            l[3],
        ]
    }

    /// Parses and validates a header against the body limit `max_len`.
    ///
    /// The version is checked first so that a peer speaking another version
    /// gets `UnsupportedVersion` rather than a confusing length error.
    pub fn decode(bytes: &[u8; FRAME_HEADER_LEN], max_len: u32) -> Result<Self, FrameError> {
        let [version, msg_type, flags, reserved, l0, l1, l2, l3] = *bytes;
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        if reserved != 0 {
            return Err(FrameError::Reserved(reserved));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        if len > max_len {
            return Err(FrameError::TooLarge { len, max: max_len });
        }
        Ok(FrameHeader {
            version,
            msg_type,
            flags,
            len,
        })
    }
}

/// A frame whose header has been validated; the body is not yet decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    pub header: FrameHeader,
    pub body: &'a [u8],
}

/// Splits frames off a byte buffer, enforcing a body-size limit.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_len: u32,
}

impl FrameDecoder {
    /// A decoder that rejects bodies longer than `max_len` bytes.
    pub fn new(max_len: u32) -> Self {
        FrameDecoder { max_len }
    }

    /// The body-size limit.
    pub fn max_len(&self) -> u32 {
        self.max_len
    }

    /// The length (header and body) of the frame at the front of `buf`,
    /// once `buf` holds its header and the header is valid: a reader
    /// makes room for the whole frame at once.
    pub fn frame_len(&self, buf: &[u8]) -> Option<usize> {
        let head = buf.first_chunk::<FRAME_HEADER_LEN>()?;
        let header = FrameHeader::decode(head, self.max_len).ok()?;
        Some(FRAME_HEADER_LEN + header.len as usize)
    }

    /// Decodes one frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only part of a frame (read more),
    /// `Ok(Some((frame, consumed)))` when a whole frame is present, and `Err`
    /// when the header is invalid — which the caller must treat as fatal for
    /// the stream.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Option<(RawFrame<'a>, usize)>, FrameError> {
        let Some(head) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::decode(head, self.max_len)?;
        let total = FRAME_HEADER_LEN + header.len as usize;
        match buf.get(FRAME_HEADER_LEN..total) {
            Some(body) => Ok(Some((RawFrame { header, body }, total))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(bytes: &[u8], max: u32, expected: Result<Option<(u8, usize)>, FrameError>) {
        let got = FrameDecoder::new(max)
            .decode(bytes)
            .map(|o| o.map(|(f, n)| (f.header.msg_type, n)));
        assert_eq!(got, expected, "input {bytes:?}");
    }

    #[test]
    fn frame_len_once_the_header_is_in() {
        let d = FrameDecoder::new(16);
        assert_eq!(d.frame_len(&[1, 2, 0, 0, 0, 0, 0]), None);
        assert_eq!(d.frame_len(&[1, 2, 0, 0, 0, 0, 0, 9]), Some(17));
        assert_eq!(d.frame_len(&[1, 2, 0, 0, 0, 0, 0, 2, 9, 9, 1]), Some(10));
        // Over the limit, or an unknown version: no room made.
        assert_eq!(d.frame_len(&[1, 2, 0, 0, 0, 0, 0, 17]), None);
        assert_eq!(d.frame_len(&[2, 2, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn header_cases() {
        check(&[], 16, Ok(None));
        check(&[1, 2, 0, 0, 0, 0, 0], 16, Ok(None));
        check(&[1, 2, 0, 0, 0, 0, 0, 0], 16, Ok(Some((2, 8))));
        check(&[1, 2, 0, 0, 0, 0, 0, 2, 9], 16, Ok(None));
        check(&[1, 2, 0, 0, 0, 0, 0, 2, 9, 9, 7], 16, Ok(Some((2, 10))));
        check(
            &[2, 2, 0, 0, 0, 0, 0, 0],
            16,
            Err(FrameError::UnsupportedVersion(2)),
        );
        check(
            &[1, 2, 1, 0, 0, 0, 0, 0],
            16,
            Err(FrameError::UnknownFlags(1)),
        );
        check(&[1, 2, 0, 9, 0, 0, 0, 0], 16, Err(FrameError::Reserved(9)));
        check(
            &[1, 2, 0, 0, 0xff, 0xff, 0xff, 0xff],
            16,
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: 16,
            }),
        );
        check(
            &[1, 2, 0, 0, 0, 0, 0, 17],
            16,
            Err(FrameError::TooLarge { len: 17, max: 16 }),
        );
    }

    proptest! {
        #[test]
        fn header_round_trip(t in any::<u8>(), len in 0u32..=1024) {
            let h = FrameHeader::new(t, len);
            prop_assert_eq!(FrameHeader::decode(&h.encode(), 1024), Ok(h));
        }
    }
}
