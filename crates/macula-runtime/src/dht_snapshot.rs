//! The DHT's snapshot file: what a restarted node needs to serve again
//! without a cold DHT (issue 21 item 5, the seeds' "routing table snapshots"
//! and "service registry persistence").
//!
//! `<data dir>/dht.snapshot` holds the routing table's contacts (nearest
//! first) and every record the node held: other nodes' service
//! advertisements, pub/sub interest and application records, each signed by
//! its publisher and kept with the wall-clock time it expires. The DHT task
//! writes it every `dht_snapshot_interval` and at a clean shutdown; at
//! start it is read back, each record checked again like a STORE (the
//! signature, the limits, the publisher's own TTL) with the lifetime it has
//! left, and the contacts become the join's seeds. A node restarted after
//! `kill -9` uses the last periodic snapshot.
//!
//! It is a cache: a file that does not decode (torn, another format, another
//! node's) is reported (`macula_dht_snapshot_failures_total`, a warning) and
//! the node starts cold; the next save replaces it. Format (PROTOCOL.md
//! 5.2.1): the magic `MDHTSNP1`, a MessagePack map (named fields), then the
//! BLAKE3 hash of that map. Decoding is pure and fuzzed (`dht_snapshot`).

use std::io::Write;
use std::path::{Path, PathBuf};

use macula_dht::{Contact, Millis, Record, Snapshot};
use macula_wire::NodeId;
use serde::{Deserialize, Serialize};

/// File name in the data directory.
pub const FILE_NAME: &str = "dht.snapshot";
/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"MDHTSNP1";
/// The body's format version.
pub const FORMAT: u32 = 1;
/// Contacts kept at most (256 buckets of k = 20, with room to spare).
pub const MAX_CONTACTS: usize = 8192;
/// Largest file read back (a full store of 64 KiB records is far less
/// likely than a damaged file; past this the node starts cold).
pub const MAX_FILE_LEN: u64 = 256 << 20;

/// Where a node's snapshot lives.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Why a snapshot file was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("not a DHT snapshot (bad magic)")]
    Magic,
    #[error("the file is damaged (checksum mismatch or truncated)")]
    Checksum,
    #[error("the snapshot does not decode: {0}")]
    Decode(String),
    #[error("snapshot format {0} is not supported (this node reads {FORMAT})")]
    Format(u32),
    #[error("the snapshot belongs to node {0}, not this one")]
    OtherNode(NodeId),
    #[error("{what} in the snapshot: {n}, more than {max}")]
    TooMany {
        what: &'static str,
        n: usize,
        max: usize,
    },
    #[error("the snapshot file is {len} bytes, more than {MAX_FILE_LEN}")]
    TooLarge { len: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    format: u32,
    node_id: NodeId,
    /// Wall-clock milliseconds when it was written.
    saved_at_ms: u64,
    contacts: Vec<SavedContact>,
    records: Vec<SavedRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedContact {
    id: NodeId,
    addr: String,
}

/// A record as stored by its publisher, plus when this node drops it.
#[derive(Debug, Serialize, Deserialize)]
struct SavedRecord {
    key: NodeId,
    publisher: NodeId,
    seq: u64,
    ttl_ms: u64,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signature: Vec<u8>,
    /// Wall-clock milliseconds.
    expires_at_ms: u64,
}

/// The file's bytes for `snapshot`, taken when the wall clock read
/// `wall_ms` (each record's lifetime left becomes a wall-clock expiry).
pub fn encode(node_id: NodeId, snapshot: &Snapshot, wall_ms: u64) -> Vec<u8> {
    let file = File {
        format: FORMAT,
        node_id,
        saved_at_ms: wall_ms,
        contacts: snapshot
            .contacts
            .iter()
            .take(MAX_CONTACTS)
            .map(|c| SavedContact {
                id: c.id,
                addr: c.addr.to_string(),
            })
            .collect(),
        records: snapshot
            .records
            .iter()
            .map(|(r, left)| SavedRecord {
                key: r.key,
                publisher: r.publisher,
                seq: r.seq,
                ttl_ms: r.ttl.0,
                value: r.value.clone(),
                signature: r.signature.clone(),
                expires_at_ms: wall_ms.saturating_add(left.0),
            })
            .collect(),
    };
    // Encoding plain structs into a Vec cannot fail.
    let body = rmp_serde::to_vec_named(&file).unwrap_or_default();
    let mut out = Vec::with_capacity(MAGIC.len() + body.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&body);
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out
}

/// A decoded snapshot and when it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub snapshot: Snapshot,
    /// Wall-clock milliseconds when it was written.
    pub saved_at_ms: u64,
    /// Records whose time had run out by `wall_ms` (left out).
    pub expired: usize,
}

/// Reads a snapshot file's bytes for node `own` at wall-clock `wall_ms`:
/// each record gets the lifetime it has left (the expired are left out),
/// at most `max_records` records.
pub fn decode(
    bytes: &[u8],
    own: &NodeId,
    wall_ms: u64,
    max_records: usize,
) -> Result<Loaded, SnapshotError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(SnapshotError::Magic)?;
    if rest.len() < 32 {
        return Err(SnapshotError::Checksum);
    }
    let (body, sum) = rest.split_at(rest.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(SnapshotError::Checksum);
    }
    let file: File =
        rmp_serde::from_slice(body).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    if file.format != FORMAT {
        return Err(SnapshotError::Format(file.format));
    }
    if file.node_id != *own {
        return Err(SnapshotError::OtherNode(file.node_id));
    }
    if file.contacts.len() > MAX_CONTACTS {
        return Err(SnapshotError::TooMany {
            what: "contacts",
            n: file.contacts.len(),
            max: MAX_CONTACTS,
        });
    }
    if file.records.len() > max_records {
        return Err(SnapshotError::TooMany {
            what: "records",
            n: file.records.len(),
            max: max_records,
        });
    }
    let contacts = file
        .contacts
        .into_iter()
        .map(|c| Contact::new(c.id, c.addr))
        .collect();
    let mut expired = 0;
    let mut records = Vec::with_capacity(file.records.len());
    for r in file.records {
        let left = r.expires_at_ms.saturating_sub(wall_ms);
        if left == 0 {
            expired += 1;
            continue;
        }
        records.push((
            Record {
                key: r.key,
                publisher: r.publisher,
                seq: r.seq,
                ttl: Millis(r.ttl_ms),
                value: r.value,
                signature: r.signature,
            },
            Millis(left),
        ));
    }
    Ok(Loaded {
        snapshot: Snapshot { contacts, records },
        saved_at_ms: file.saved_at_ms,
        expired,
    })
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside
/// it, synced, renamed over it, and the directory synced.
pub fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("snapshot.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The file's bytes, `None` if there is none.
pub fn load(path: &Path) -> Result<Option<Vec<u8>>, LoadError> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LoadError::Io(e)),
    };
    if len > MAX_FILE_LEN {
        return Err(LoadError::Snapshot(SnapshotError::TooLarge { len }));
    }
    std::fs::read(path).map(Some).map_err(LoadError::Io)
}

/// Why the snapshot file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Snapshot(SnapshotError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn record(b: u8, ttl: u64) -> Record {
        Record {
            key: id(b),
            publisher: id(b.wrapping_add(1)),
            seq: u64::from(b),
            ttl: Millis(ttl),
            value: vec![b; usize::from(b)],
            signature: vec![7; 96],
        }
    }

    fn sample() -> Snapshot {
        Snapshot {
            contacts: vec![
                Contact::new(id(2), "127.0.0.1:4001"),
                Contact::new(id(3), "127.0.0.1:4002"),
            ],
            records: vec![
                (record(9, 60_000), Millis(30_000)),
                (record(10, 5_000), Millis(1_000)),
            ],
        }
    }

    #[test]
    fn round_trip_turns_lifetimes_into_wall_clock_expiries_and_back() {
        let bytes = encode(id(1), &sample(), 1_000_000);
        // Read back 500 ms later: each record has 500 ms less.
        let loaded = decode(&bytes, &id(1), 1_000_500, 100).expect("decodes");
        assert_eq!(loaded.saved_at_ms, 1_000_000);
        assert_eq!(loaded.expired, 0);
        assert_eq!(loaded.snapshot.contacts, sample().contacts);
        assert_eq!(
            loaded.snapshot.records,
            vec![
                (record(9, 60_000), Millis(29_500)),
                (record(10, 5_000), Millis(500))
            ]
        );
        // Read back 1 s later: the second has run out.
        let loaded = decode(&bytes, &id(1), 1_001_000, 100).expect("decodes");
        assert_eq!(loaded.expired, 1);
        assert_eq!(loaded.snapshot.records.len(), 1);
    }

    #[test]
    fn damage_another_node_and_limits_are_each_their_error() {
        let bytes = encode(id(1), &sample(), 0);
        assert_eq!(decode(b"nope", &id(1), 0, 100), Err(SnapshotError::Magic));
        assert_eq!(
            decode(&bytes[..bytes.len() - 1], &id(1), 0, 100),
            Err(SnapshotError::Checksum)
        );
        assert_eq!(decode(MAGIC, &id(1), 0, 100), Err(SnapshotError::Checksum));
        let mut flipped = bytes.clone();
        flipped[MAGIC.len() + 3] ^= 1;
        assert_eq!(
            decode(&flipped, &id(1), 0, 100),
            Err(SnapshotError::Checksum)
        );
        assert_eq!(
            decode(&bytes, &id(4), 0, 100),
            Err(SnapshotError::OtherNode(id(1)))
        );
        assert_eq!(
            decode(&bytes, &id(1), 0, 1),
            Err(SnapshotError::TooMany {
                what: "records",
                n: 2,
                max: 1
            })
        );
        // A valid checksum over a body that is not a snapshot.
        let body = rmp_serde::to_vec_named(&("x", 1u8)).expect("encode");
        let mut other = MAGIC.to_vec();
        other.extend_from_slice(&body);
        other.extend_from_slice(blake3::hash(&body).as_bytes());
        assert!(matches!(
            decode(&other, &id(1), 0, 100),
            Err(SnapshotError::Decode(_))
        ));
    }

    #[test]
    fn save_replaces_the_file_whole_and_load_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path());
        assert!(load(&p).expect("no file is fine").is_none());
        save(&p, b"first").expect("save");
        save(&p, b"second").expect("save");
        assert_eq!(load(&p).expect("load").as_deref(), Some(&b"second"[..]));
        assert!(!p.with_extension("snapshot.tmp").exists());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, &id(1), 0, 100);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            framed.extend_from_slice(blake3::hash(&bytes).as_bytes());
            let _ = decode(&framed, &id(1), 0, 100);
        }

        #[test]
        fn what_is_saved_is_read_back(
            n in 0usize..20,
            wall in 0u64..1 << 40,
            lefts in proptest::collection::vec(1u64..1_000_000, 0..20),
        ) {
            let snap = Snapshot {
                contacts: (0..n).map(|i| Contact::new(id(i as u8), format!("127.0.0.1:{}", 4000 + i))).collect(),
                records: lefts.iter().enumerate().map(|(i, l)| (record(i as u8, 1_000_000), Millis(*l))).collect(),
            };
            let loaded = decode(&encode(id(200), &snap, wall), &id(200), wall, 100).expect("decodes");
            prop_assert_eq!(loaded.snapshot, snap);
        }
    }
}
