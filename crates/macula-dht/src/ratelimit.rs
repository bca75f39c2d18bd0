//! Per-peer token buckets guarding `handle_request` (the mesh's one
//! [`TokenBucket`], time passed in: no clock). It must not decide what
//! happens to a refused request; the caller counts and drops it.

use std::collections::HashMap;

use macula_wire::bucket::TokenBucket;
use macula_wire::NodeId;

use crate::Millis;

fn us(now: Millis) -> u64 {
    now.0.saturating_mul(1000)
}

/// Token buckets for at most `max_peers` peers.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    buckets: HashMap<NodeId, TokenBucket>,
    burst: u64,
    per_sec: u64,
    max_peers: usize,
    /// Times the table was full of busy peers and had to be cleared.
    pub(crate) n_resets: u64,
}

impl RateLimiter {
    pub(crate) fn new(burst: u32, per_sec: u32, max_peers: usize) -> RateLimiter {
        RateLimiter {
            buckets: HashMap::new(),
            burst: u64::from(burst),
            per_sec: u64::from(per_sec),
            max_peers,
            n_resets: 0,
        }
    }

    fn bucket(&mut self, peer: &NodeId, now: Millis) -> &mut TokenBucket {
        let now = us(now);
        if !self.buckets.contains_key(peer) && self.buckets.len() >= self.max_peers {
            // Forget peers whose buckets are full again: they carry no state.
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_peers {
                // Every tracked peer is busy: a flood of identities. Start over
                // rather than grow; honest peers lose nothing but their debt.
                self.buckets.clear();
                self.n_resets += 1;
            }
        }
        let (burst, per_sec) = (self.burst, self.per_sec);
        self.buckets
            .entry(*peer)
            .or_insert_with(|| TokenBucket::new(per_sec, burst, now))
    }

    /// Takes one token from `peer`'s bucket; false if it is empty.
    pub(crate) fn allow(&mut self, peer: &NodeId, now: Millis) -> bool {
        self.bucket(peer, now).try_take(1, us(now))
    }

    /// Empties `peer`'s bucket: a malformed message costs a whole burst.
    pub(crate) fn penalise(&mut self, peer: &NodeId, now: Millis) {
        self.bucket(peer, now).drain(us(now));
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
