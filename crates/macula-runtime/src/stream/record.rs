//! How one stored stream message is laid out in the store: a fixed head
//! (what rebuilding the index needs) followed by the headers and the
//! payload, so a restart reads the head of each record and not its body.
//!
//! ```text
//! u8 format (1) | u64 ts | u64 expires (0: none) | u16 len + subject |
//! u16 len + msg_id (0: none) | u16 n_headers | n x (u16 len + name, u32 len + value) |
//! payload (the rest)
//! ```
//! All integers little endian. Decoding never panics and never reads past
//! the record; a record that does not decode is a corrupt store, reported.

use bytes::Bytes;

/// The only record format.
const FORMAT: u8 = 1;
/// Bytes before the subject.
const FIXED: usize = 1 + 8 + 8;

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMsg {
    /// When it was stored (Unix ms).
    pub ts: u64,
    /// When it expires (Unix ms), if it has a TTL of its own.
    pub expires: Option<u64>,
    /// Its topic.
    pub subject: String,
    /// The publisher's message ID.
    pub msg_id: Option<String>,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its payload.
    pub payload: Bytes,
}

/// What rebuilding the index needs of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head<'a> {
    /// Timestamp.
    pub ts: u64,
    /// Expiry.
    pub expires: Option<u64>,
    /// Topic.
    pub subject: &'a str,
    /// Message ID.
    pub msg_id: Option<&'a str>,
}

/// A record that does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("corrupt stream record: {0}")]
pub struct CorruptRecord(pub &'static str);

/// Why a message cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field over its length limit.
    #[error("{0} too long for a stream record")]
    TooLong(&'static str),
}

/// Encodes a message; its length is the size the stream accounts for.
pub fn encode(
    ts: u64,
    expires: Option<u64>,
    subject: &str,
    msg_id: Option<&str>,
    headers: &[(String, String)],
    payload: &[u8],
) -> Result<Vec<u8>, EncodeError> {
    let len16 = |n: usize, what| u16::try_from(n).map_err(|_| EncodeError::TooLong(what));
    let subject_len = len16(subject.len(), "subject")?;
    let id_len = len16(msg_id.map_or(0, str::len), "message ID")?;
    let n_headers = len16(headers.len(), "header list")?;
    let hdr_bytes: usize = headers.iter().map(|(k, v)| 6 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(FIXED + 6 + subject.len() + hdr_bytes + payload.len() + 16);
    out.push(FORMAT);
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(&expires.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&subject_len.to_le_bytes());
    out.extend_from_slice(subject.as_bytes());
    out.extend_from_slice(&id_len.to_le_bytes());
    out.extend_from_slice(msg_id.unwrap_or("").as_bytes());
    out.extend_from_slice(&n_headers.to_le_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&len16(k.len(), "header name")?.to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        let vlen = u32::try_from(v.len()).map_err(|_| EncodeError::TooLong("header value"))?;
        out.extend_from_slice(&vlen.to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(payload);
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CorruptRecord> {
        if self.buf.len() < n {
            return Err(CorruptRecord(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, CorruptRecord> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    }

    fn u32(&mut self, what: &'static str) -> Result<usize, CorruptRecord> {
        let b = self.take(4, what)?;
        let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        usize::try_from(n).map_err(|_| CorruptRecord(what))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, CorruptRecord> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self, n: usize, what: &'static str) -> Result<&'a str, CorruptRecord> {
        std::str::from_utf8(self.take(n, what)?).map_err(|_| CorruptRecord(what))
    }
}

fn head<'a>(r: &mut Reader<'a>) -> Result<Head<'a>, CorruptRecord> {
    if r.take(1, "format")? != [FORMAT] {
        return Err(CorruptRecord("unknown format"));
    }
    let ts = r.u64("timestamp")?;
    let expires = r.u64("expiry")?;
    let n = r.u16("subject")?;
    let subject = r.str(n, "subject")?;
    let n = r.u16("message ID")?;
    let msg_id = r.str(n, "message ID")?;
    Ok(Head {
        ts,
        expires: (expires != 0).then_some(expires),
        subject,
        msg_id: (!msg_id.is_empty()).then_some(msg_id),
    })
}

/// The head of a record (what the index needs).
pub fn decode_head(buf: &[u8]) -> Result<Head<'_>, CorruptRecord> {
    head(&mut Reader { buf })
}

/// A whole record.
pub fn decode(buf: &[u8]) -> Result<StoredMsg, CorruptRecord> {
    let mut r = Reader { buf };
    let h = head(&mut r)?;
    let n = r.u16("header count")?;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let kl = r.u16("header name")?;
        let k = r.str(kl, "header name")?;
        let vl = r.u32("header value")?;
        let v = r.str(vl, "header value")?;
        headers.push((k.to_string(), v.to_string()));
    }
    Ok(StoredMsg {
        ts: h.ts,
        expires: h.expires,
        subject: h.subject.to_string(),
        msg_id: h.msg_id.map(str::to_string),
        headers,
        payload: Bytes::copy_from_slice(r.buf),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_record_round_trips() {
        let hdrs = vec![("k".to_string(), "v".to_string())];
        let b = encode(7, Some(9), "a.b", Some("id"), &hdrs, b"payload").unwrap();
        let m = decode(&b).unwrap();
        assert_eq!(
            m,
            StoredMsg {
                ts: 7,
                expires: Some(9),
                subject: "a.b".into(),
                msg_id: Some("id".into()),
                headers: hdrs,
                payload: Bytes::from_static(b"payload"),
            }
        );
        let h = decode_head(&b).unwrap();
        assert_eq!(
            (h.ts, h.expires, h.subject, h.msg_id),
            (7, Some(9), "a.b", Some("id"))
        );
        assert_eq!(decode(&b[..b.len() - 7]).unwrap().payload.len(), 0);
        assert!(decode(&b[..5]).is_err());
        let mut bad = b.clone();
        bad[0] = 2;
        assert_eq!(decode(&bad), Err(CorruptRecord("unknown format")));
    }

    proptest! {
        #[test]
        fn round_trip(
            ts in any::<u64>(), expires in proptest::option::of(1u64..),
            subject in "[a-z.]{1,40}", id in proptest::option::of("[a-z0-9]{1,20}"),
            headers in proptest::collection::vec(("[a-z]{1,8}", ".{0,16}"), 0..4),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let b = encode(ts, expires, &subject, id.as_deref(), &headers, &payload).unwrap();
            let m = decode(&b).unwrap();
            prop_assert_eq!(m.ts, ts);
            prop_assert_eq!(m.expires, expires);
            prop_assert_eq!(&m.subject, &subject);
            prop_assert_eq!(&m.msg_id, &id);
            prop_assert_eq!(&m.headers, &headers);
            prop_assert_eq!(&m.payload[..], &payload[..]);
        }

        #[test]
        fn decoding_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&b);
            let _ = decode_head(&b);
        }
    }
}
