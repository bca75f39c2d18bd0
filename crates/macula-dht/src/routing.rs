//! The k-bucket routing table.
//!
//! **Policy: least-recently-seen ping-evict with a replacement cache**, over a
//! fixed 256-bucket array indexed by the common-prefix length with our own ID.
//! Why not bucket splitting: splitting only ever splits the bucket that covers
//! our own ID, so its end state is exactly this array; the array is simpler,
//! allocates only up to the deepest bucket in use, and has no split bugs. Why
//! ping-evict: Kademlia's measurement that a node up for long is likely to stay
//! up; a full bucket keeps its old members while they answer, so a flood of new
//! identities cannot push out live, proven contacts. A newcomer that does not fit
//! waits in the bucket's replacement cache and takes the first slot that frees.
//!
//! An entry that fails to answer is removed here and forgotten by this table;
//! the [`crate::Dht`] keeps it on a bounded lost list and pings it on a backoff
//! (15 s after the loss, doubling to 120 s, for 1 h; see
//! [`crate::config::LOST_CONTACTS_LEN`]), so after a partition both sides find
//! each other again through `seen` without waiting for the hourly refresh.
//!
//! **Invariant:** our own ID is never stored; a bucket never holds more than k
//! entries; every entry of bucket `i` shares exactly `i` leading bits with us.
//! This module must not send anything: it tells the caller whom to probe.

use std::collections::VecDeque;

use macula_wire::NodeId;

use crate::message::Contact;
use crate::rng::Rng;
use crate::Millis;

/// Number of buckets: one per possible common-prefix length of a 256-bit ID.
pub const N_BUCKETS: usize = 256;

/// XOR distance, big-endian: compares as a 256-bit integer with `Ord` on arrays.
pub type Distance = [u8; 32];

/// XOR distance between two IDs. Kept here (rather than calling
/// `NodeId::distance`) so it inlines into the hot loops of this crate.
#[inline]
pub fn distance(a: &NodeId, b: &NodeId) -> Distance {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut out = [0u8; 32];
    for i in 0..32 {
        out[i] = a[i] ^ b[i];
    }
    out
}

/// Number of leading bits `a` and `b` share (256 when equal).
#[inline]
pub fn common_prefix_len(a: &NodeId, b: &NodeId) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    for i in 0..32 {
        let x = a[i] ^ b[i];
        if x != 0 {
            return i * 8 + x.leading_zeros() as usize;
        }
    }
    N_BUCKETS
}

/// One routing-table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The peer.
    pub contact: Contact,
    /// When we last heard from it directly (a request from it or a response).
    pub last_seen: Millis,
}

#[derive(Clone, Debug)]
struct Bucket {
    /// Least recently seen first.
    entries: Vec<Entry>,
    /// Most recently seen last; bounded.
    replacements: VecDeque<Entry>,
    /// The head entry we are pinging to decide whether it stays.
    probing: Option<NodeId>,
    /// Last lookup into this bucket's range.
    last_refreshed: Millis,
}

impl Bucket {
    fn new(now: Millis) -> Bucket {
        Bucket {
            entries: Vec::new(),
            replacements: VecDeque::new(),
            probing: None,
            last_refreshed: now,
        }
    }
}

/// What [`RoutingTable::seen`] did with a contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Insert {
    /// New entry.
    Added,
    /// Already known: moved to most-recently-seen, address updated.
    Updated,
    /// Our own ID: ignored.
    IsSelf,
    /// The bucket is full: the contact waits in the replacement cache. If `probe`
    /// is set, the caller must ping it (the bucket's least recently seen entry)
    /// and report the outcome through `seen` (it answered) or
    /// `mark_unresponsive` (it did not).
    Cached {
        /// Entry to ping, if no probe is already running for this bucket.
        probe: Option<Contact>,
    },
}

/// k-buckets around one node ID.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    own: NodeId,
    k: usize,
    n_replacements: usize,
    probe_after: Millis,
    buckets: Vec<Bucket>,
    len: usize,
}

impl RoutingTable {
    /// An empty table for `own` with buckets of `k`, replacement caches of
    /// `n_replacements`, probing a full bucket's head only when silent for
    /// `probe_after`.
    pub fn new(own: NodeId, k: usize, n_replacements: usize, probe_after: Millis) -> RoutingTable {
        assert!(k > 0, "k must be positive");
        RoutingTable {
            own,
            k,
            n_replacements,
            probe_after,
            buckets: Vec::new(),
            len: 0,
        }
    }

    /// The ID this table is built around.
    pub fn own_id(&self) -> &NodeId {
        &self.own
    }

    /// Entries held (replacements not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bucket size limit.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The bucket `id` belongs in, or `None` for our own ID.
    pub fn bucket_index(&self, id: &NodeId) -> Option<usize> {
        let cpl = common_prefix_len(&self.own, id);
        (cpl < N_BUCKETS).then_some(cpl)
    }

    /// Buckets allocated so far (one past the deepest ever used).
    pub fn n_buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Entries of bucket `i`, least recently seen first.
    pub fn bucket(&self, i: usize) -> &[Entry] {
        self.buckets.get(i).map_or(&[], |b| &b.entries)
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.buckets.iter().flat_map(|b| b.entries.iter())
    }

    /// The entry for `id`.
    pub fn get(&self, id: &NodeId) -> Option<&Entry> {
        let i = self.bucket_index(id)?;
        self.buckets
            .get(i)?
            .entries
            .iter()
            .find(|e| e.contact.id == *id)
    }

    /// True if `id` has an entry.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.get(id).is_some()
    }

    /// We heard from `contact` directly: add it, refresh it, or cache it.
    pub fn seen(&mut self, contact: Contact, now: Millis) -> Insert {
        let Some(i) = self.bucket_index(&contact.id) else {
            return Insert::IsSelf;
        };
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, || Bucket::new(now));
        }
        let (k, cap, probe_after) = (self.k, self.n_replacements, self.probe_after);
        let b = &mut self.buckets[i];
        if let Some(pos) = b.entries.iter().position(|e| e.contact.id == contact.id) {
            let mut e = b.entries.remove(pos);
            if b.probing == Some(contact.id) {
                b.probing = None;
            }
            e.contact = contact;
            e.last_seen = e.last_seen.max(now);
            b.entries.push(e);
            return Insert::Updated;
        }
        b.replacements.retain(|r| r.contact.id != contact.id);
        let entry = Entry {
            contact,
            last_seen: now,
        };
        if b.entries.len() < k {
            b.entries.push(entry);
            self.len += 1;
            return Insert::Added;
        }
        if cap > 0 {
            if b.replacements.len() >= cap {
                b.replacements.pop_front();
            }
            b.replacements.push_back(entry);
        }
        let head = &b.entries[0];
        let probe = if b.probing.is_none() && head.last_seen.saturating_add(probe_after) <= now {
            b.probing = Some(head.contact.id);
            Some(head.contact.clone())
        } else {
            None
        };
        Insert::Cached { probe }
    }

    /// A probe we were asked to send could not be sent; allow another one later.
    pub fn probe_abandoned(&mut self, id: &NodeId) {
        if let Some(b) = self.bucket_index(id).and_then(|i| self.buckets.get_mut(i)) {
            if b.probing == Some(*id) {
                b.probing = None;
            }
        }
    }

    /// `id` failed to answer requests sent at or after `since`: remove it and
    /// promote the most recently seen replacement. Does nothing (returns false)
    /// if it was heard from after `since`, i.e. it is alive after all, or if
    /// it holds no entry. A `true` is the caller's cue to remember the contact
    /// as lost (this table keeps nothing of it).
    pub fn mark_unresponsive(&mut self, id: &NodeId, since: Millis) -> bool {
        let Some(b) = self.bucket_index(id).and_then(|i| self.buckets.get_mut(i)) else {
            return false;
        };
        b.replacements.retain(|r| r.contact.id != *id);
        let Some(pos) = b.entries.iter().position(|e| e.contact.id == *id) else {
            return false;
        };
        if b.entries[pos].last_seen > since {
            return false;
        }
        b.entries.remove(pos);
        if b.probing == Some(*id) {
            b.probing = None;
        }
        if let Some(r) = b.replacements.pop_back() {
            // Keep the least-recently-seen order.
            let at = b.entries.partition_point(|e| e.last_seen <= r.last_seen);
            b.entries.insert(at, r);
        } else {
            self.len -= 1;
        }
        true
    }

    /// Up to `n` contacts closest to `target`, nearest first.
    pub fn closest(&self, target: &NodeId, n: usize) -> Vec<Contact> {
        self.closest_excluding(target, n, None)
    }

    /// Like [`RoutingTable::closest`], leaving out `exclude` (the requester: it
    /// knows itself).
    pub fn closest_excluding(
        &self,
        target: &NodeId,
        n: usize,
        exclude: Option<&NodeId>,
    ) -> Vec<Contact> {
        if n == 0 {
            return Vec::new();
        }
        // Buckets fall into groups strictly ordered by distance to `target`:
        // bucket j = cpl(own, target) first (they share more than j bits with the
        // target), then every deeper bucket (distance's top bit is j), then
        // buckets j-1, j-2, ... 0. So we only sort the groups we need.
        let j = common_prefix_len(&self.own, target);
        let mut out: Vec<(Distance, &Contact)> = Vec::with_capacity(2 * self.k);
        if let Some(b) = self.buckets.get(j) {
            extend(&mut out, b, target, exclude);
        }
        if out.len() < n {
            for b in self.buckets.iter().skip(j + 1) {
                extend(&mut out, b, target, exclude);
            }
        }
        for i in (0..j.min(self.buckets.len())).rev() {
            if out.len() >= n {
                break;
            }
            extend(&mut out, &self.buckets[i], target, exclude);
        }
        out.sort_unstable_by_key(|a| a.0);
        out.truncate(n);
        out.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// True if some entry other than `except` is closer to `key` than we are.
    /// Exactly the entries of bucket cpl(own, key) are, so this is O(k).
    pub fn has_closer_than_self(&self, key: &NodeId, except: &NodeId) -> bool {
        let j = common_prefix_len(&self.own, key);
        self.buckets
            .get(j)
            .is_some_and(|b| b.entries.iter().any(|e| e.contact.id != *except))
    }

    /// A lookup into `target`'s range just started: that bucket is fresh.
    pub fn touch(&mut self, target: &NodeId, now: Millis) {
        if let Some(b) = self
            .bucket_index(target)
            .and_then(|i| self.buckets.get_mut(i))
        {
            b.last_refreshed = b.last_refreshed.max(now);
        }
    }

    /// Allocated buckets with no lookup into their range for `interval`.
    pub fn stale_buckets(&self, now: Millis, interval: Millis) -> Vec<usize> {
        (0..self.buckets.len())
            .filter(|&i| self.buckets[i].last_refreshed.saturating_add(interval) <= now)
            .collect()
    }

    /// A random ID that falls in bucket `i` (shares exactly `i` bits with us).
    pub fn random_id_in_bucket(&self, i: usize, rng: &mut Rng) -> NodeId {
        let i = i.min(N_BUCKETS - 1);
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        let own = self.own.as_bytes();
        let (byte, bit) = (i / 8, i % 8);
        // Copy our first i bits, flip bit i, keep the rest random.
        bytes[..byte].copy_from_slice(&own[..byte]);
        let keep = if bit == 0 { 0u8 } else { 0xffu8 << (8 - bit) };
        let flip = 0x80u8 >> bit;
        bytes[byte] = (own[byte] & keep) | ((!own[byte]) & flip) | (bytes[byte] & !keep & !flip);
        NodeId::from_bytes(bytes)
    }
}

fn extend<'a>(
    out: &mut Vec<(Distance, &'a Contact)>,
    b: &'a Bucket,
    target: &NodeId,
    exclude: Option<&NodeId>,
) {
    for e in &b.entries {
        if Some(&e.contact.id) != exclude {
            out.push((distance(&e.contact.id, target), &e.contact));
        }
    }
}
