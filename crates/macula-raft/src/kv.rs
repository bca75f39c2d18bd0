//! The key-value state machine, without storage: apply a [`Request`] and get
//! a [`Response`] plus the [`Event`]s it caused.
//!
//! Semantics follow etcd v3:
//!
//! * One **revision** per group. It starts at 0 (nothing written) and grows
//!   by exactly one with every request that changes at least one key; all
//!   keys changed by one request (a prefix delete, a lease revoke) share that
//!   revision. Requests that change nothing (delete of a missing key, a
//!   failed compare-and-swap, lease grant) leave it alone.
//! * Each key has a `create_revision` (revision of the put that created it),
//!   a `mod_revision` (revision of its last put) and a `version` (number of
//!   puts since it was created, 1 after creation). A deleted key forgets all
//!   three; in comparisons a missing key has `version == 0` and
//!   `mod_revision == 0`.
//! * **Leases** are `{id, ttl_ms, keys}`. The state machine never reads a
//!   clock: the leader of the group decides expiry and proposes
//!   [`Request::LeaseRevoke`], which deletes the attached keys. A put with a
//!   lease attaches the key to it; a put without one detaches it.
//! * Keys starting with byte `0x00` are **reserved**: client writes to them
//!   are refused with [`KvError::ReservedKey`]; [`Kv::range`] and
//!   [`matches_prefix`] hide them unless the prefix itself starts with
//!   `0x00`. The workload registry ([`Request::Register`]) lives under
//!   [`WORKLOADS_PREFIX`].
//!
//! Limits ([`Limits`]) are checked on apply; a violation is an
//! [`Response::Error`], never a panic, and changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::MemberId;

/// The first byte of every reserved key.
pub const RESERVED_BYTE: u8 = 0x00;

/// Prefix of the workload registry's keys: `WORKLOADS_PREFIX ++ name ++
/// 0x00 ++ member's 32 raw bytes`; the value is the MessagePack list of the
/// member's capabilities.
pub const WORKLOADS_PREFIX: &[u8] = b"\0workloads/";

/// Limits of one group's key space, checked when a request is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Maximum key length in bytes (default 4 KiB).
    pub max_key_bytes: usize,
    /// Maximum value length in bytes (default 1 MiB).
    pub max_value_bytes: usize,
    /// Maximum number of keys in the group, reserved keys included (default 1,000,000).
    pub max_keys: usize,
    /// Maximum number of live leases (default 100,000).
    pub max_leases: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 4 * 1024,
            max_value_bytes: 1024 * 1024,
            max_keys: 1_000_000,
            max_leases: 100_000,
        }
    }
}

/// What a compare-and-swap expects of the key's current state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key exists with exactly this value.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The key's `mod_revision` is this (0: the key does not exist).
    ModRevision(u64),
    /// The key's `version` is this (0: the key does not exist).
    Version(u64),
}

/// A write proposed to the group (the log entry's payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Set a key. `lease`: attach the key to this lease (it must exist);
    /// `None` detaches it from any lease. `prev_kv`: return the previous
    /// key-value in the response.
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        lease: Option<u64>,
        prev_kv: bool,
    },
    /// Delete a key, or with `prefix` every (non-reserved) key starting with
    /// `key` (an empty `key` with `prefix` deletes every non-reserved key).
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        prefix: bool,
        prev_kv: bool,
    },
    /// Set `key` to `value` if its current state matches `expect`.
    Cas {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        expect: Expect,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        lease: Option<u64>,
    },
    /// Set `key` to `value` if it does not exist (a CAS with
    /// [`Expect::Absent`]; answered with [`Response::Cas`]).
    PutIfAbsent {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        lease: Option<u64>,
    },
    /// Create a lease. The proposer chooses the id (random, non-zero); a
    /// duplicate id is [`KvError::LeaseExists`]. `ttl_ms` must be non-zero.
    LeaseGrant { id: u64, ttl_ms: u64 },
    /// Delete a lease and every key attached to it.
    LeaseRevoke { id: u64 },
    /// Register `member` as running workload `name` with `capabilities`
    /// (replaces an earlier registration of the same member and name).
    Register {
        name: String,
        member: MemberId,
        capabilities: Vec<String>,
    },
    /// Remove `member`'s registration for workload `name` (answered with
    /// [`Response::Deleted`]).
    Unregister { name: String, member: MemberId },
    /// Several requests in one log entry, applied in order exactly as if
    /// they were consecutive entries (each its own revision); answered with
    /// [`Response::Batch`]. The leader batches concurrent writes this way.
    /// A batch inside a batch is refused.
    Batch(Vec<Request>),
    /// Bytes the key space does not read: the store hands them, with their
    /// log index, to the group's [`crate::Applier`] (a replicated stream's
    /// writes) and answers with [`Response::Opaque`]. Changes no key and no
    /// revision.
    Opaque(OpaqueBytes),
}

/// The bytes of a [`Request::Opaque`] and, on the member that proposes
/// it, a tag in memory only (`crate::commit`): encoded exactly as the
/// bytes alone (MessagePack `bin`, as `serde_bytes` writes a `Vec<u8>`), so
/// an entry read back from the log or received from the leader has no tag,
/// and the log and wire formats are those of untagged bytes.
#[derive(Clone, Default)]
pub struct OpaqueBytes {
    bytes: Vec<u8>,
    /// 0: none (see `crate::commit::Commits::tag`).
    tag: u64,
}

impl OpaqueBytes {
    /// Untagged bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        OpaqueBytes { bytes, tag: 0 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes the bytes out (leaving none).
    pub fn take_bytes(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub(crate) fn tag(&self) -> u64 {
        self.tag
    }

    pub(crate) fn set_tag(&mut self, tag: u64) {
        self.tag = tag;
    }
}

impl From<Vec<u8>> for OpaqueBytes {
    fn from(bytes: Vec<u8>) -> Self {
        OpaqueBytes::new(bytes)
    }
}

/// The bytes only: a tag is not part of the value.
impl PartialEq for OpaqueBytes {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for OpaqueBytes {}

impl std::fmt::Debug for OpaqueBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.bytes, f)
    }
}

impl Serialize for OpaqueBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(&self.bytes, s)
    }
}

impl<'de> Deserialize<'de> for OpaqueBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_bytes::deserialize::<Vec<u8>, D>(d).map(OpaqueBytes::new)
    }
}

/// A key with its value and metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision of the put that created the key.
    pub create_revision: u64,
    /// Revision of the key's last put.
    pub mod_revision: u64,
    /// Puts since creation (1 after the creating put).
    pub version: u64,
    /// The lease the key is attached to.
    pub lease: Option<u64>,
}

/// The state machine's answer to one applied log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A put was applied at `revision`; `prev` if asked for and it existed.
    Put {
        revision: u64,
        prev: Option<KeyValue>,
    },
    /// `deleted` keys were deleted at `revision` (the unchanged current
    /// revision when nothing was deleted); `prev` if asked for.
    Deleted {
        revision: u64,
        deleted: u64,
        prev: Vec<KeyValue>,
    },
    /// A compare-and-swap (or put-if-absent). On success `current` is the
    /// new key-value and `revision` its revision; on failure `current` is
    /// the key's unchanged state and `revision` the current revision.
    Cas {
        succeeded: bool,
        revision: u64,
        current: Option<KeyValue>,
    },
    /// A lease was granted.
    Lease { id: u64, ttl_ms: u64 },
    /// A lease was revoked and `deleted` attached keys were deleted at `revision`.
    LeaseRevoked { revision: u64, deleted: u64 },
    /// A workload registration was stored at `revision`; `members` members
    /// are now registered for that workload name.
    Registered { revision: u64, members: usize },
    /// A log entry that carries no request (blank entries of a new leader,
    /// membership changes).
    Empty,
    /// The request was refused and changed nothing.
    Error(KvError),
    /// The answers to a [`Request::Batch`], in order.
    Batch(Vec<Response>),
    /// The applier's answer to a [`Request::Opaque`].
    Opaque(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A change to one key, at the revision it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The key was created or changed; `KeyValue::mod_revision` is the revision.
    Put(KeyValue),
    /// The key was deleted at `mod_revision`.
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        mod_revision: u64,
    },
}

impl Event {
    /// The revision of this change.
    pub fn revision(&self) -> u64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }

    /// The changed key.
    pub fn key(&self) -> &[u8] {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

/// Why a request or a read was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    #[error("empty key")]
    EmptyKey,
    #[error("key of {len} bytes exceeds the limit of {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("keys starting with byte 0x00 are reserved")]
    ReservedKey,
    #[error("the group holds its maximum of {max} keys")]
    TooManyKeys { max: usize },
    #[error("the group holds its maximum of {max} leases")]
    TooManyLeases { max: usize },
    #[error("lease {id} not found")]
    LeaseNotFound { id: u64 },
    #[error("lease {id} already exists")]
    LeaseExists { id: u64 },
    #[error("invalid lease: id and ttl must be non-zero")]
    InvalidLease,
    #[error("invalid workload name")]
    InvalidName,
    /// A batch inside a batch.
    #[error("a batch cannot contain a batch")]
    NestedBatch,
    /// A watch asked for revisions older than the retained history; the
    /// oldest revision that can still be watched from is `oldest`.
    #[error("revisions before {oldest} are compacted")]
    Compacted { oldest: u64 },
    /// A [`Request::Opaque`] reached a group with no applier.
    #[error("this group has no applier for opaque entries")]
    NoApplier,
}

/// A lease as the state machine knows it (no deadline: the leader keeps
/// the timers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: u64,
    pub ttl_ms: u64,
    /// The keys attached to the lease, sorted.
    pub keys: Vec<Vec<u8>>,
}

/// One member's registration for a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    pub member: MemberId,
    pub capabilities: Vec<String>,
    /// Revision of the registration.
    pub mod_revision: u64,
}

/// A lease as stored in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub id: u64,
    pub ttl_ms: u64,
}

/// The whole key space, as serialized in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSnapshot {
    pub revision: u64,
    pub entries: Vec<KeyValue>,
    pub leases: Vec<LeaseRecord>,
    /// The group's applier's state ([`crate::Applier::snapshot`]), if it
    /// has one.
    #[serde(default, with = "serde_bytes")]
    pub applier: Option<Vec<u8>>,
}

/// A snapshot (or loaded state) that is not a consistent key space.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inconsistent key space: {0}")]
pub struct InvalidSnapshot(pub String);

/// What one applied request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub response: Response,
    /// Changes in order; all carry the same revision.
    pub events: Vec<Event>,
    /// Leases created (`Some(ttl_ms)`) or removed (`None`).
    pub lease_changes: Vec<(u64, Option<u64>)>,
}

impl Applied {
    fn only(response: Response) -> Self {
        Applied {
            response,
            events: Vec::new(),
            lease_changes: Vec::new(),
        }
    }

    fn error(e: KvError) -> Self {
        Applied::only(Response::Error(e))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    lease: Option<u64>,
}

impl Stored {
    fn to_kv(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaseState {
    ttl_ms: u64,
    keys: BTreeSet<Vec<u8>>,
}

/// Whether a change to `key` belongs to a watch or range of `prefix`:
/// `key` starts with `prefix`, and reserved keys (first byte `0x00`) only
/// match a prefix that starts with `0x00` itself.
pub fn matches_prefix(prefix: &[u8], key: &[u8]) -> bool {
    key.starts_with(prefix) && (!is_reserved(key) || prefix.first() == Some(&RESERVED_BYTE))
}

fn is_reserved(key: &[u8]) -> bool {
    key.first() == Some(&RESERVED_BYTE)
}

/// The registry key of `member` for workload `name`.
pub fn workload_key(name: &str, member: &MemberId) -> Vec<u8> {
    let mut key = workload_name_prefix(name);
    key.extend_from_slice(member.0.as_bytes());
    key
}

fn workload_name_prefix(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(WORKLOADS_PREFIX.len() + name.len() + 33);
    key.extend_from_slice(WORKLOADS_PREFIX);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

/// The key space of one group: keys, leases and the revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    entries: BTreeMap<Vec<u8>, Stored>,
    leases: BTreeMap<u64, LeaseState>,
    revision: u64,
    limits: Limits,
}

impl Kv {
    /// An empty key space at revision 0.
    pub fn new(limits: Limits) -> Self {
        Kv {
            entries: BTreeMap::new(),
            leases: BTreeMap::new(),
            revision: 0,
            limits,
        }
    }

    /// Rebuilds a key space from a snapshot (or from what a store loaded).
    /// Limits are not re-checked (the data was accepted before); an entry
    /// attached to a lease that does not exist, or a key revision above
    /// the snapshot's revision, is an error.
    pub fn from_snapshot(snapshot: KvSnapshot, limits: Limits) -> Result<Self, InvalidSnapshot> {
        let mut kv = Kv::new(limits);
        kv.revision = snapshot.revision;
        for l in snapshot.leases {
            kv.leases.insert(
                l.id,
                LeaseState {
                    ttl_ms: l.ttl_ms,
                    keys: BTreeSet::new(),
                },
            );
        }
        for e in snapshot.entries {
            if e.mod_revision > kv.revision || e.create_revision > e.mod_revision {
                return Err(InvalidSnapshot(format!(
                    "key with revisions {}/{} above the state revision {}",
                    e.create_revision, e.mod_revision, kv.revision
                )));
            }
            if let Some(id) = e.lease {
                match kv.leases.get_mut(&id) {
                    Some(l) => {
                        l.keys.insert(e.key.clone());
                    }
                    None => {
                        return Err(InvalidSnapshot(format!(
                            "key attached to missing lease {id}"
                        )))
                    }
                }
            }
            kv.entries.insert(
                e.key,
                Stored {
                    value: e.value,
                    create_revision: e.create_revision,
                    mod_revision: e.mod_revision,
                    version: e.version,
                    lease: e.lease,
                },
            );
        }
        Ok(kv)
    }

    /// The whole key space, for a snapshot.
    pub fn to_snapshot(&self) -> KvSnapshot {
        KvSnapshot {
            revision: self.revision,
            entries: self.entries.iter().map(|(k, s)| s.to_kv(k)).collect(),
            leases: self
                .leases
                .iter()
                .map(|(&id, l)| LeaseRecord {
                    id,
                    ttl_ms: l.ttl_ms,
                })
                .collect(),
            applier: None,
        }
    }

    /// The limits this key space enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The group's current revision (0 before the first change).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of keys, reserved keys included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no keys at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One key (reserved keys included).
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.entries.get(key).map(|s| s.to_kv(key))
    }

    fn prefix_iter<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a Stored)> + 'a {
        // User keys are non-empty and never start with 0x00, so an empty
        // prefix starts the scan at [0x01].
        let start: Vec<u8> = if prefix.is_empty() {
            vec![1]
        } else {
            prefix.to_vec()
        };
        self.entries
            .range(start..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter(move |(k, _)| matches_prefix(prefix, k))
    }

    /// Keys starting with `prefix` in key order, at most `limit` of them
    /// (0: no limit). Reserved keys only if `prefix` starts with `0x00`.
    pub fn range(&self, prefix: &[u8], limit: usize) -> Vec<KeyValue> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        self.prefix_iter(prefix)
            .take(limit)
            .map(|(k, s)| s.to_kv(k))
            .collect()
    }

    /// Number of keys [`Kv::range`] would return without a limit.
    pub fn count(&self, prefix: &[u8]) -> usize {
        self.prefix_iter(prefix).count()
    }

    /// Every lease with its attached keys, by id.
    pub fn leases(&self) -> Vec<Lease> {
        self.leases
            .iter()
            .map(|(&id, l)| Lease {
                id,
                ttl_ms: l.ttl_ms,
                keys: l.keys.iter().cloned().collect(),
            })
            .collect()
    }

    /// One lease.
    pub fn lease(&self, id: u64) -> Option<Lease> {
        self.leases.get(&id).map(|l| Lease {
            id,
            ttl_ms: l.ttl_ms,
            keys: l.keys.iter().cloned().collect(),
        })
    }

    /// The members registered for workload `name`, by member ID.
    pub fn workloads(&self, name: &str) -> Vec<Workload> {
        let prefix = workload_name_prefix(name);
        self.entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, s)| decode_workload(k, s))
            .collect()
    }

    /// Every workload registration, by name then member.
    pub fn all_workloads(&self) -> Vec<Workload> {
        self.entries
            .range(WORKLOADS_PREFIX.to_vec()..)
            .take_while(|(k, _)| k.starts_with(WORKLOADS_PREFIX))
            .filter_map(|(k, s)| decode_workload(k, s))
            .collect()
    }

    fn check_key(&self, key: &[u8]) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::EmptyKey);
        }
        self.check_prefix(key)
    }

    fn check_prefix(&self, key: &[u8]) -> Result<(), KvError> {
        if key.len() > self.limits.max_key_bytes {
            return Err(KvError::KeyTooLarge {
                len: key.len(),
                max: self.limits.max_key_bytes,
            });
        }
        if is_reserved(key) {
            return Err(KvError::ReservedKey);
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), KvError> {
        if value.len() > self.limits.max_value_bytes {
            return Err(KvError::ValueTooLarge {
                len: value.len(),
                max: self.limits.max_value_bytes,
            });
        }
        Ok(())
    }

    fn check_lease(&self, lease: Option<u64>) -> Result<(), KvError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(KvError::LeaseNotFound { id }),
            _ => Ok(()),
        }
    }

    fn check_room(&self, key: &[u8]) -> Result<(), KvError> {
        if !self.entries.contains_key(key) && self.entries.len() >= self.limits.max_keys {
            return Err(KvError::TooManyKeys {
                max: self.limits.max_keys,
            });
        }
        Ok(())
    }

    /// Stores a key at `rev` (checks done by the caller).
    fn put_at(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: Option<u64>,
        rev: u64,
    ) -> (Option<KeyValue>, Event) {
        let prev = self.entries.get(&key).cloned();
        if let Some(old) = prev.as_ref().and_then(|p| p.lease) {
            if Some(old) != lease {
                if let Some(l) = self.leases.get_mut(&old) {
                    l.keys.remove(&key);
                }
            }
        }
        if let Some(id) = lease {
            if let Some(l) = self.leases.get_mut(&id) {
                l.keys.insert(key.clone());
            }
        }
        let stored = Stored {
            value,
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        };
        let kv = stored.to_kv(&key);
        self.entries.insert(key.clone(), stored);
        (prev.map(|p| p.to_kv(&key)), Event::Put(kv))
    }

    /// Deletes an existing key at `rev`.
    fn delete_at(&mut self, key: &[u8], rev: u64) -> Option<(KeyValue, Event)> {
        let prev = self.entries.remove(key)?;
        if let Some(id) = prev.lease {
            if let Some(l) = self.leases.get_mut(&id) {
                l.keys.remove(key);
            }
        }
        Some((
            prev.to_kv(key),
            Event::Delete {
                key: key.to_vec(),
                mod_revision: rev,
            },
        ))
    }

    fn delete_keys(
        &mut self,
        keys: Vec<Vec<u8>>,
        want_prev: bool,
    ) -> (u64, Vec<KeyValue>, Vec<Event>) {
        if keys.is_empty() {
            return (self.revision, Vec::new(), Vec::new());
        }
        let rev = self.revision + 1;
        let mut prev = Vec::new();
        let mut events = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((p, e)) = self.delete_at(&key, rev) {
                if want_prev {
                    prev.push(p);
                }
                events.push(e);
            }
        }
        if !events.is_empty() {
            self.revision = rev;
        }
        (self.revision, prev, events)
    }

    /// Applies one request: the response, the events (all at the new
    /// revision) and the lease changes. A refused request changes nothing.
    pub fn apply(&mut self, request: Request) -> Applied {
        match request {
            Request::Batch(requests) => {
                let mut all = Applied {
                    response: Response::Empty,
                    events: Vec::new(),
                    lease_changes: Vec::new(),
                };
                let mut responses = Vec::with_capacity(requests.len());
                for r in requests {
                    let a = match r {
                        Request::Batch(_) => Applied::error(KvError::NestedBatch),
                        r => self.apply(r),
                    };
                    responses.push(a.response);
                    all.events.extend(a.events);
                    all.lease_changes.extend(a.lease_changes);
                }
                all.response = Response::Batch(responses);
                all
            }
            // Answered by the store with the applier's response.
            Request::Opaque(_) => Applied::only(Response::Opaque(Vec::new())),
            Request::Put {
                key,
                value,
                lease,
                prev_kv,
            } => {
                if let Err(e) = self
                    .check_key(&key)
                    .and_then(|_| self.check_value(&value))
                    .and_then(|_| self.check_lease(lease))
                    .and_then(|_| self.check_room(&key))
                {
                    return Applied::error(e);
                }
                let rev = self.revision + 1;
                let (prev, event) = self.put_at(key, value, lease, rev);
                self.revision = rev;
                Applied {
                    response: Response::Put {
                        revision: rev,
                        prev: if prev_kv { prev } else { None },
                    },
                    events: vec![event],
                    lease_changes: Vec::new(),
                }
            }
            Request::Delete {
                key,
                prefix,
                prev_kv,
            } => {
                let checked = if prefix {
                    self.check_prefix(&key)
                } else {
                    self.check_key(&key)
                };
                if let Err(e) = checked {
                    return Applied::error(e);
                }
                let keys: Vec<Vec<u8>> = if prefix {
                    self.prefix_iter(&key).map(|(k, _)| k.clone()).collect()
                } else if self.entries.contains_key(&key) {
                    vec![key]
                } else {
                    Vec::new()
                };
                let (revision, prev, events) = self.delete_keys(keys, prev_kv);
                Applied {
                    response: Response::Deleted {
                        revision,
                        deleted: events.len() as u64,
                        prev,
                    },
                    events,
                    lease_changes: Vec::new(),
                }
            }
            Request::Cas {
                key,
                expect,
                value,
                lease,
            } => self.cas(key, expect, value, lease),
            Request::PutIfAbsent { key, value, lease } => {
                self.cas(key, Expect::Absent, value, lease)
            }
            Request::LeaseGrant { id, ttl_ms } => {
                if id == 0 || ttl_ms == 0 {
                    return Applied::error(KvError::InvalidLease);
                }
                if self.leases.contains_key(&id) {
                    return Applied::error(KvError::LeaseExists { id });
                }
                if self.leases.len() >= self.limits.max_leases {
                    return Applied::error(KvError::TooManyLeases {
                        max: self.limits.max_leases,
                    });
                }
                self.leases.insert(
                    id,
                    LeaseState {
                        ttl_ms,
                        keys: BTreeSet::new(),
                    },
                );
                Applied {
                    response: Response::Lease { id, ttl_ms },
                    events: Vec::new(),
                    lease_changes: vec![(id, Some(ttl_ms))],
                }
            }
            Request::LeaseRevoke { id } => {
                let Some(lease) = self.leases.remove(&id) else {
                    return Applied::error(KvError::LeaseNotFound { id });
                };
                let keys: Vec<Vec<u8>> = lease.keys.into_iter().collect();
                let (revision, _, events) = self.delete_keys(keys, false);
                Applied {
                    response: Response::LeaseRevoked {
                        revision,
                        deleted: events.len() as u64,
                    },
                    events,
                    lease_changes: vec![(id, None)],
                }
            }
            Request::Register {
                name,
                member,
                capabilities,
            } => {
                if name.is_empty() || name.contains('\0') {
                    return Applied::error(KvError::InvalidName);
                }
                let key = workload_key(&name, &member);
                if key.len() > self.limits.max_key_bytes {
                    return Applied::error(KvError::KeyTooLarge {
                        len: key.len(),
                        max: self.limits.max_key_bytes,
                    });
                }
                // Vec<String> always encodes.
                let value = rmp_serde::to_vec(&capabilities).unwrap_or_default();
                if let Err(e) = self.check_value(&value).and_then(|_| self.check_room(&key)) {
                    return Applied::error(e);
                }
                let rev = self.revision + 1;
                let (_, event) = self.put_at(key, value, None, rev);
                self.revision = rev;
                Applied {
                    response: Response::Registered {
                        revision: rev,
                        members: self.workloads(&name).len(),
                    },
                    events: vec![event],
                    lease_changes: Vec::new(),
                }
            }
            Request::Unregister { name, member } => {
                let key = workload_key(&name, &member);
                let keys = if self.entries.contains_key(&key) {
                    vec![key]
                } else {
                    Vec::new()
                };
                let (revision, _, events) = self.delete_keys(keys, false);
                Applied {
                    response: Response::Deleted {
                        revision,
                        deleted: events.len() as u64,
                        prev: Vec::new(),
                    },
                    events,
                    lease_changes: Vec::new(),
                }
            }
        }
    }

    fn cas(&mut self, key: Vec<u8>, expect: Expect, value: Vec<u8>, lease: Option<u64>) -> Applied {
        if let Err(e) = self
            .check_key(&key)
            .and_then(|_| self.check_value(&value))
            .and_then(|_| self.check_lease(lease))
        {
            return Applied::error(e);
        }
        let current = self.entries.get(&key);
        let matched = match &expect {
            Expect::Absent => current.is_none(),
            Expect::Value(v) => current.is_some_and(|c| &c.value == v),
            Expect::ModRevision(r) => current.map_or(0, |c| c.mod_revision) == *r,
            Expect::Version(v) => current.map_or(0, |c| c.version) == *v,
        };
        if !matched {
            return Applied::only(Response::Cas {
                succeeded: false,
                revision: self.revision,
                current: current.map(|c| c.to_kv(&key)),
            });
        }
        if let Err(e) = self.check_room(&key) {
            return Applied::error(e);
        }
        let rev = self.revision + 1;
        let (_, event) = self.put_at(key, value, lease, rev);
        self.revision = rev;
        let current = match &event {
            Event::Put(kv) => Some(kv.clone()),
            Event::Delete { .. } => None,
        };
        Applied {
            response: Response::Cas {
                succeeded: true,
                revision: rev,
                current,
            },
            events: vec![event],
            lease_changes: Vec::new(),
        }
    }
}

fn decode_workload(key: &[u8], stored: &Stored) -> Option<Workload> {
    let rest = key.strip_prefix(WORKLOADS_PREFIX)?;
    let zero = rest.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&rest[..zero]).ok()?;
    let member: [u8; 32] = rest[zero + 1..].try_into().ok()?;
    let capabilities: Vec<String> = match rmp_serde::from_slice(&stored.value) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(workload = name, error = %e, "undecodable workload registration skipped");
            return None;
        }
    };
    Some(Workload {
        name: name.to_string(),
        member: MemberId(macula_wire::NodeId::from_bytes(member)),
        capabilities,
        mod_revision: stored.mod_revision,
    })
}

#[cfg(test)]
mod tests;
