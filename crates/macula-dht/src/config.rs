//! Every limit and timer of the DHT core, each a named constant with the reason
//! for its value, gathered in one [`Config`] whose `Default` uses them.
//!
//! This module holds numbers only; it must not contain behaviour.

use crate::Millis;

/// Bucket size and replication factor (Kademlia's k). With 20 entries a bucket is
/// very unlikely to lose every member within one refresh interval.
pub const K: usize = 20;
/// Requests in flight per lookup (Kademlia's alpha): enough parallelism to hide
/// one slow peer without flooding the k closest with duplicate work.
pub const ALPHA: usize = 3;
/// Time to wait for a response: well above a WAN round trip (~300 ms) so a slow
/// peer is not taken for a dead one, short enough that a lookup stays snappy.
pub const REQUEST_TIMEOUT: Millis = Millis(1_000);
/// Attempts per request (the first plus one retry): one lost datagram must not
/// cost a peer its routing-table slot.
pub const REQUEST_ATTEMPTS: u8 = 2;
/// Recently seen contacts kept per full bucket, ready to replace a dead entry
/// without waiting for a new one to show up.
pub const REPLACEMENT_CACHE_LEN: usize = K;
/// A full bucket's oldest entry is only pinged (to make room) when silent this
/// long; an entry heard from recently is alive and old entries are the best ones.
pub const PROBE_AFTER: Millis = Millis(60_000);
/// A bucket with no lookup into its range for this long is refreshed (Kademlia's
/// one hour): keeps far buckets populated without periodic traffic bursts.
pub const REFRESH_INTERVAL: Millis = Millis(3_600_000);
/// How often the refresh timer looks for stale buckets (and re-joins a node that
/// lost every contact). One timer, not 256, keeps `poll_timeout` O(log n).
pub const REFRESH_CHECK_INTERVAL: Millis = Millis(60_000);
/// First wait before re-joining when a join reached nobody (every seed silent
/// through its retry): one lost exchange must cost a second, not a refresh interval.
pub const JOIN_RETRY_MIN: Millis = Millis(1_000);
/// Longest wait between join attempts (doubling from `JOIN_RETRY_MIN`), so an
/// isolated node keeps knocking without hammering a dead seed.
pub const JOIN_RETRY_MAX: Millis = Millis(60_000);
/// Contacts remembered after the routing table dropped them for not answering,
/// to be re-probed (see [`LOST_PROBE_MIN`]): more than the whole routing table
/// of a node in a 10,000-node mesh (about k·log2(n/k) ≈ 180 entries), so a
/// partition that cuts a node off from every contact forgets none of them,
/// while a burst of probes stays at a few hundred pings. Past it the oldest
/// loss is dropped. 0 turns re-probing off.
pub const LOST_CONTACTS_LEN: usize = 256;
/// First ping to a lost contact, after its loss (then 45 s, 105 s, ...): long
/// enough that a peer that is really gone costs a handful of pings, short
/// enough that a partition that healed is noticed well within a minute (a
/// contact lost at the start of a 40 s partition fails its 15 s probe and
/// answers the 45 s one).
pub const LOST_PROBE_MIN: Millis = Millis(15_000);
/// Longest wait between two pings to one lost contact (doubling from
/// `LOST_PROBE_MIN`): a longer partition still heals within two minutes of
/// the network healing, at one ping per lost contact per two minutes.
pub const LOST_PROBE_MAX: Millis = Millis(120_000);
/// A lost contact is given up this long after its loss (32 probes in
/// all); from then on the bucket refresh, which runs on the same period, is
/// what finds it again.
pub const LOST_PROBE_HORIZON: Millis = REFRESH_INTERVAL;
/// A node that stopped answering (a request to it timed out twice, or the
/// runtime's failure detector declared it down) is *suspected* this long:
/// lookups still ask it (an answer ends the suspicion) but do not wait on
/// it: the next candidate takes its slot and termination does not count
/// it, until it is heard from again (a request or an answer from it, a
/// lost-contact probe it answers) or this passes. A minute covers the time other nodes keep it in
/// their answers (until their own requests to it time out).
pub const SUSPECT_TTL: Millis = Millis(60_000);
/// Nodes suspected at once; past it the oldest suspicion is dropped (that
/// node is then asked, and waited on, once more).
pub const MAX_SUSPECTS: usize = 1_024;
/// Shortlist length of one lookup: three times k keeps enough spare candidates
/// when some of the closest are dead, while bounding memory per lookup.
pub const MAX_LOOKUP_CANDIDATES: usize = 3 * K;
/// Requests one lookup may send (retries included): bounds its cost even against
/// peers that keep returning fresh, useless contacts.
pub const MAX_LOOKUP_REQUESTS: usize = 256;
/// Lookups running at once (user, join, refresh, put): bounds memory and the
/// outbound request rate of one node.
pub const MAX_ACTIVE_LOOKUPS: usize = 512;
/// Puts (lookup + STOREs) running at once, user and republish alike.
pub const MAX_ACTIVE_PUTS: usize = 256;
/// Outstanding requests of one node; past this new requests are refused locally
/// (and counted) instead of growing the correlation table without bound.
pub const MAX_PENDING_REQUESTS: usize = 8_192;
/// Contacts accepted in one response: a peer has no reason to send more than k,
/// and more would let it flood our lookup shortlist.
pub const MAX_CONTACTS_PER_RESPONSE: usize = K;
/// Largest record value: a service or provider advertisement is well under 1 KiB;
/// large data belongs in streams, not in a replicated k-fold store.
pub const MAX_VALUE_LEN: usize = 8 * 1024;
/// Largest opaque signature field: room for an Ed25519 public key plus signature
/// (96 bytes) with margin for another scheme.
pub const MAX_SIGNATURE_LEN: usize = 256;
/// Longest record TTL: a publisher that vanishes must not leave data behind for
/// more than a day.
pub const MAX_TTL: Millis = Millis(24 * 3_600_000);
/// Records one node stores for others: with `MAX_VALUE_LEN` this caps the store
/// at 128 MiB in the worst case.
pub const MAX_RECORDS: usize = 16_384;
/// Records one publisher may keep on one node (and publish itself): no single
/// publisher can take more than 1/64 of a node's store.
pub const MAX_RECORDS_PER_PUBLISHER: usize = 256;
/// Records returned for one key in one FIND_VALUE response: bounds the response
/// to 256 KiB of values, inside one default 1 MiB frame.
pub const MAX_RECORDS_PER_RESPONSE: usize = 32;
/// Share of the replica set that must confirm a STORE, in percent: a strict
/// majority, so any later majority of the same k closest holds at least one copy.
pub const STORE_QUORUM_PERCENT: u8 = 51;
/// The publisher republishes after this share of the TTL has passed, leaving a
/// quarter of it for a failed republish to be retried before the data expires.
pub const REPUBLISH_PERCENT: u8 = 75;
/// Wait before retrying a republish that did not reach quorum.
pub const REPUBLISH_RETRY: Millis = Millis(30_000);
/// Records pushed to one newly seen closer node at once: replication of a large
/// store happens over several contacts rather than in one burst.
pub const MAX_REPLICATE_PER_CONTACT: usize = 64;
/// Requests a peer may send in a burst: a joining peer sends a few per lookup,
/// so 200 is far above honest load yet stops a flood at once.
pub const RATE_LIMIT_BURST: u32 = 200;
/// Sustained requests per second per peer (token refill rate).
pub const RATE_LIMIT_PER_SEC: u32 = 100;
/// Peers whose token buckets are tracked: bounds the limiter's memory under a
/// flood of fresh identities (idle, full buckets are dropped first).
pub const MAX_RATE_LIMITED_PEERS: usize = 4_096;

/// Tunables of one [`crate::Dht`]. `Config::default()` is what a node runs with;
/// tests shrink timers and limits to exercise them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// See [`K`].
    pub k: usize,
    /// See [`ALPHA`].
    pub alpha: usize,
    /// See [`REQUEST_TIMEOUT`].
    pub request_timeout: Millis,
    /// See [`REQUEST_ATTEMPTS`]; at least 1.
    pub request_attempts: u8,
    /// See [`REPLACEMENT_CACHE_LEN`].
    pub replacement_cache_len: usize,
    /// See [`PROBE_AFTER`].
    pub probe_after: Millis,
    /// See [`REFRESH_INTERVAL`].
    pub refresh_interval: Millis,
    /// See [`REFRESH_CHECK_INTERVAL`].
    pub refresh_check_interval: Millis,
    /// See [`JOIN_RETRY_MIN`].
    pub join_retry_min: Millis,
    /// See [`JOIN_RETRY_MAX`].
    pub join_retry_max: Millis,
    /// See [`LOST_CONTACTS_LEN`]; 0 turns re-probing off.
    pub lost_contacts_len: usize,
    /// See [`LOST_PROBE_MIN`]; positive, at most `lost_probe_max`.
    pub lost_probe_min: Millis,
    /// See [`LOST_PROBE_MAX`].
    pub lost_probe_max: Millis,
    /// See [`LOST_PROBE_HORIZON`]; longer than `lost_probe_min`.
    pub lost_probe_horizon: Millis,
    /// See [`SUSPECT_TTL`].
    pub suspect_ttl: Millis,
    /// See [`MAX_SUSPECTS`]; 0 turns suspicion off.
    pub max_suspects: usize,
    /// See [`MAX_LOOKUP_CANDIDATES`].
    pub max_lookup_candidates: usize,
    /// See [`MAX_LOOKUP_REQUESTS`].
    pub max_lookup_requests: usize,
    /// See [`MAX_ACTIVE_LOOKUPS`].
    pub max_active_lookups: usize,
    /// See [`MAX_ACTIVE_PUTS`].
    pub max_active_puts: usize,
    /// See [`MAX_PENDING_REQUESTS`].
    pub max_pending_requests: usize,
    /// See [`MAX_CONTACTS_PER_RESPONSE`].
    pub max_contacts_per_response: usize,
    /// See [`MAX_VALUE_LEN`].
    pub max_value_len: usize,
    /// See [`MAX_SIGNATURE_LEN`].
    pub max_signature_len: usize,
    /// See [`MAX_TTL`].
    pub max_ttl: Millis,
    /// See [`MAX_RECORDS`].
    pub max_records: usize,
    /// See [`MAX_RECORDS_PER_PUBLISHER`].
    pub max_records_per_publisher: usize,
    /// See [`MAX_RECORDS_PER_RESPONSE`].
    pub max_records_per_response: usize,
    /// See [`STORE_QUORUM_PERCENT`]; 1..=100.
    pub store_quorum_percent: u8,
    /// See [`REPUBLISH_PERCENT`]; 1..=99.
    pub republish_percent: u8,
    /// See [`REPUBLISH_RETRY`].
    pub republish_retry: Millis,
    /// See [`MAX_REPLICATE_PER_CONTACT`].
    pub max_replicate_per_contact: usize,
    /// See [`RATE_LIMIT_BURST`].
    pub rate_limit_burst: u32,
    /// See [`RATE_LIMIT_PER_SEC`]; at least 1.
    pub rate_limit_per_sec: u32,
    /// See [`MAX_RATE_LIMITED_PEERS`].
    pub max_rate_limited_peers: usize,
    /// Added to `now` to seed the `seq` of this node's records (a later put
    /// must carry a higher one than any earlier put of the same key, also
    /// one from before a restart). `now` is a monotonic clock that restarts
    /// at zero with the process, so the runtime passes its epoch here: a
    /// value above every `seq_base + now` of earlier runs. 0 in simulations.
    pub seq_base: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            k: K,
            alpha: ALPHA,
            request_timeout: REQUEST_TIMEOUT,
            request_attempts: REQUEST_ATTEMPTS,
            replacement_cache_len: REPLACEMENT_CACHE_LEN,
            probe_after: PROBE_AFTER,
            refresh_interval: REFRESH_INTERVAL,
            refresh_check_interval: REFRESH_CHECK_INTERVAL,
            join_retry_min: JOIN_RETRY_MIN,
            join_retry_max: JOIN_RETRY_MAX,
            lost_contacts_len: LOST_CONTACTS_LEN,
            lost_probe_min: LOST_PROBE_MIN,
            lost_probe_max: LOST_PROBE_MAX,
            lost_probe_horizon: LOST_PROBE_HORIZON,
            suspect_ttl: SUSPECT_TTL,
            max_suspects: MAX_SUSPECTS,
            max_lookup_candidates: MAX_LOOKUP_CANDIDATES,
            max_lookup_requests: MAX_LOOKUP_REQUESTS,
            max_active_lookups: MAX_ACTIVE_LOOKUPS,
            max_active_puts: MAX_ACTIVE_PUTS,
            max_pending_requests: MAX_PENDING_REQUESTS,
            max_contacts_per_response: MAX_CONTACTS_PER_RESPONSE,
            max_value_len: MAX_VALUE_LEN,
            max_signature_len: MAX_SIGNATURE_LEN,
            max_ttl: MAX_TTL,
            max_records: MAX_RECORDS,
            max_records_per_publisher: MAX_RECORDS_PER_PUBLISHER,
            max_records_per_response: MAX_RECORDS_PER_RESPONSE,
            store_quorum_percent: STORE_QUORUM_PERCENT,
            republish_percent: REPUBLISH_PERCENT,
            republish_retry: REPUBLISH_RETRY,
            max_replicate_per_contact: MAX_REPLICATE_PER_CONTACT,
            rate_limit_burst: RATE_LIMIT_BURST,
            rate_limit_per_sec: RATE_LIMIT_PER_SEC,
            max_rate_limited_peers: MAX_RATE_LIMITED_PEERS,
            seq_base: 0,
        }
    }
}

impl Config {
    /// Panics on a configuration that cannot work (a programmer error, caught at
    /// construction rather than as a hang later).
    pub(crate) fn assert_valid(&self) {
        assert!(self.k > 0, "k must be positive");
        assert!(self.alpha > 0, "alpha must be positive");
        assert!(self.request_attempts > 0, "request_attempts must be >= 1");
        assert!(
            self.max_lookup_candidates >= self.k,
            "the lookup shortlist must hold at least k candidates"
        );
        assert!(
            (1..=100).contains(&self.store_quorum_percent),
            "store_quorum_percent must be 1..=100"
        );
        assert!(
            (1..=99).contains(&self.republish_percent),
            "republish_percent must be 1..=99"
        );
        assert!(self.max_pending_requests > 0 && self.max_active_lookups > 0);
        assert!(
            self.rate_limit_per_sec > 0,
            "rate_limit_per_sec must be positive"
        );
        assert!(self.refresh_check_interval > Millis::ZERO);
        assert!(self.join_retry_min > Millis::ZERO && self.join_retry_min <= self.join_retry_max);
        assert!(
            self.lost_probe_min > Millis::ZERO && self.lost_probe_min <= self.lost_probe_max,
            "lost_probe_min must be positive and at most lost_probe_max"
        );
        assert!(
            self.lost_probe_horizon > self.lost_probe_min,
            "lost_probe_horizon must leave room for at least one probe"
        );
    }

    /// Confirmations a put needs from a replica set of `n_replicas` nodes.
    pub fn store_quorum(&self, n_replicas: usize) -> usize {
        let pct = usize::from(self.store_quorum_percent);
        (n_replicas * pct).div_ceil(100).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_quorum_is_a_majority() {
        let c = Config::default();
        c.assert_valid();
        assert_eq!(c.store_quorum(20), 11);
        assert_eq!(c.store_quorum(5), 3);
        assert_eq!(c.store_quorum(1), 1);
        assert_eq!(c.store_quorum(0), 1);
    }

    #[test]
    #[should_panic(expected = "lost_probe_min")]
    fn lost_probe_min_above_its_cap_is_refused() {
        Config {
            lost_probe_min: Millis(10),
            lost_probe_max: Millis(5),
            ..Config::default()
        }
        .assert_valid();
    }

    #[test]
    #[should_panic(expected = "rate_limit_per_sec")]
    fn a_rate_limit_that_never_refills_is_refused() {
        Config {
            rate_limit_per_sec: 0,
            ..Config::default()
        }
        .assert_valid();
    }

    #[test]
    #[should_panic(expected = "lost_probe_horizon")]
    fn lost_probe_horizon_without_a_probe_is_refused() {
        Config {
            lost_probe_horizon: LOST_PROBE_MIN,
            ..Config::default()
        }
        .assert_valid();
    }
}
