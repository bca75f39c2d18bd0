//! Per-peer token buckets guarding `handle_request`.
//!
//! Integer milli-tokens, time passed in: no float drift, no clock. It must not
//! decide what happens to a refused request; the caller counts and drops it.

use std::collections::HashMap;

use macula_wire::NodeId;

use crate::Millis;

const MILLI: u64 = 1000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    milli_tokens: u64,
    updated: Millis,
}

fn refill(b: &mut Bucket, now: Millis, burst_milli: u64, per_sec: u64) {
    let elapsed = now.saturating_sub(b.updated).0;
    // `per_sec` tokens per second is `per_sec` milli-tokens per millisecond.
    b.milli_tokens = b
        .milli_tokens
        .saturating_add(elapsed.saturating_mul(per_sec))
        .min(burst_milli);
    b.updated = now.max(b.updated);
}

/// Token buckets for at most `max_peers` peers.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    buckets: HashMap<NodeId, Bucket>,
    burst_milli: u64,
    per_sec: u64,
    max_peers: usize,
    /// Times the table was full of busy peers and had to be cleared.
    pub(crate) n_resets: u64,
}

impl RateLimiter {
    pub(crate) fn new(burst: u32, per_sec: u32, max_peers: usize) -> RateLimiter {
        RateLimiter {
            buckets: HashMap::new(),
            burst_milli: u64::from(burst) * MILLI,
            per_sec: u64::from(per_sec),
            max_peers,
            n_resets: 0,
        }
    }

    fn bucket(&mut self, peer: &NodeId, now: Millis) -> &mut Bucket {
        let (burst, per_sec) = (self.burst_milli, self.per_sec);
        if !self.buckets.contains_key(peer) && self.buckets.len() >= self.max_peers {
            // Forget peers whose buckets are full again: they carry no state.
            self.buckets.retain(|_, b| {
                refill(b, now, burst, per_sec);
                b.milli_tokens < burst
            });
            if self.buckets.len() >= self.max_peers {
                // Every tracked peer is busy: a flood of identities. Start over
                // rather than grow; honest peers lose nothing but their debt.
                self.buckets.clear();
                self.n_resets += 1;
            }
        }
        let b = self.buckets.entry(*peer).or_insert(Bucket {
            milli_tokens: burst,
            updated: now,
        });
        refill(b, now, burst, per_sec);
        b
    }

    /// Takes one token from `peer`'s bucket; false if it is empty.
    pub(crate) fn allow(&mut self, peer: &NodeId, now: Millis) -> bool {
        let b = self.bucket(peer, now);
        if b.milli_tokens >= MILLI {
            b.milli_tokens -= MILLI;
            true
        } else {
            false
        }
    }

    /// Empties `peer`'s bucket: a malformed message costs a whole burst.
    pub(crate) fn penalise(&mut self, peer: &NodeId, now: Millis) {
        let b = self.bucket(peer, now);
        b.milli_tokens = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let peer = NodeId::from_bytes([1; 32]);
        let mut rl = RateLimiter::new(3, 10, 16);
        let t = Millis(1000);
        assert!(rl.allow(&peer, t));
        assert!(rl.allow(&peer, t));
        assert!(rl.allow(&peer, t));
        assert!(!rl.allow(&peer, t));
        // 10 per second: one token every 100 ms.
        assert!(!rl.allow(&peer, Millis(1099)));
        assert!(rl.allow(&peer, Millis(1200)));
        rl.penalise(&peer, Millis(1200));
        assert!(!rl.allow(&peer, Millis(1200)));
        // Another peer is unaffected.
        assert!(rl.allow(&NodeId::from_bytes([2; 32]), t));
    }

    #[test]
    fn table_is_bounded() {
        let mut rl = RateLimiter::new(1, 1, 4);
        for i in 0..100u8 {
            assert!(rl.allow(&NodeId::from_bytes([i; 32]), Millis(0)));
            assert!(rl.buckets.len() <= 4);
        }
        assert!(rl.n_resets > 0);
    }
}
