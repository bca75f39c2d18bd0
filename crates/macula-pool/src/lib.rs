//! Connection pool bookkeeping: one connection per peer, LRU eviction at a
//! maximum, kept connections, the client cap and the simultaneous-dial
//! tie-break.
//!
//! `PoolTable` is pure data: no I/O, no clock, no async. It tells the caller
//! which connection to close and why; the caller does the closing (the
//! runtime's `node.rs` over quinn, `macula-sim` over its simulated network).
//! That keeps the rules testable with plain values, and lets the simulator
//! run the very rules a node runs, once per simulated node.
//!
//! Why a crate of its own: the runtime and the simulator both need it, and
//! the simulator must not depend on the runtime (tokio, quinn). The other
//! pure crates are protocols (`macula-dht`, `macula-pubsub`, `macula-rpc`)
//! or the wire boundary (`macula-wire`), and the pool is neither: it is
//! transport bookkeeping. Later pure transport rules (relay reservations,
//! hole-punch strategy) belong beside it.
//!
//! **Invariant:** at most one entry per node ID, and `lru` holds exactly one
//! key per entry.
//!
//! **Invariant:** no I/O, no clock, no threads, no global state.

pub mod liveness;

pub use liveness::{Liveness, LivenessConfig, Verdict};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use macula_wire::NodeId;

/// What the table needs to know about a connection.
pub trait Pooled: Clone {
    /// The peer's node ID, as proved in the handshake.
    fn node_id(&self) -> NodeId;
    /// Did the local node dial this connection?
    fn outbound(&self) -> bool;
    /// Distinguishes two connections to the same peer.
    fn conn_id(&self) -> usize;
    /// Kept connections are never evicted.
    fn kept(&self) -> bool;
    /// A lightweight client's connection (counted against the client cap).
    fn client(&self) -> bool;
    /// The peer's address (the pool can be searched by it).
    fn addr(&self) -> SocketAddr;
    /// A connection through a relay: a direct connection to the same node
    /// always replaces it, and it never replaces a direct one (hole
    /// punching's upgrade; both sides apply the same rule).
    fn relayed(&self) -> bool {
        false
    }
}

/// The outcome of offering a new connection to the table.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<P> {
    /// Added; the least recently used connection was evicted to make room
    /// and must be closed.
    Inserted {
        /// The evicted connection, to be closed.
        evicted: Option<P>,
    },
    /// The new connection replaces `old`, which must be closed (after a grace
    /// period, so exchanges already on it can finish).
    Replaced {
        /// The superseded connection, to be closed after a grace period.
        old: P,
    },
    /// The existing connection wins; the offered one must be closed.
    Duplicate {
        /// The connection that stays.
        kept: P,
    },
    /// Refused (see `Refusal`); the offered connection must be closed.
    Refused(Refusal),
}

/// Why the table cannot take a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot holds a connection that may not be evicted.
    Full,
    /// A client, and clients already hold all the slots they may: the
    /// rest are kept for full nodes (the mesh a gateway forwards into).
    ClientLimit,
}

/// Which connection survives when two exist to the same peer.
///
/// Both nodes must reach the same answer without talking, so the rule only
/// uses facts both sides know: the connection dialed by the node with the
/// smaller node ID wins. Two connections in the same direction mean the peer
/// (or we) reconnected, and the newer one wins because the older is likely
/// dead.
pub fn prefer_new(
    local: NodeId,
    peer: NodeId,
    existing_outbound: bool,
    new_outbound: bool,
) -> bool {
    if existing_outbound == new_outbound {
        return true;
    }
    let winner_outbound = local < peer;
    new_outbound == winner_outbound
}

/// The pool's rules over connections of type `P` (a quinn connection handle
/// in the runtime, a simulated connection in `macula-sim`).
#[derive(Clone, Debug)]
pub struct PoolTable<P> {
    local: NodeId,
    max: usize,
    /// Most client connections; `max - max_clients` slots stay for peers.
    max_clients: usize,
    /// Client connections held now.
    clients: usize,
    entries: HashMap<NodeId, (P, u64)>,
    lru: BTreeMap<u64, NodeId>,
    by_addr: HashMap<SocketAddr, NodeId>,
    clock: u64,
}

impl<P: Pooled> PoolTable<P> {
    /// A table of at most `max` connections, of which at most
    /// `max_clients` clients.
    pub fn new(local: NodeId, max: usize, max_clients: usize) -> Self {
        PoolTable {
            local,
            max: max.max(1),
            max_clients: max_clients.min(max.max(1)),
            clients: 0,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            by_addr: HashMap::new(),
            clock: 0,
        }
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no connection is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The most connections held at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Client connections held now.
    pub fn clients(&self) -> usize {
        self.clients
    }

    fn bump(&mut self, id: NodeId) {
        if let Some((_, key)) = self.entries.get_mut(&id) {
            self.lru.remove(key);
            self.clock += 1;
            *key = self.clock;
            self.lru.insert(self.clock, id);
        }
    }

    /// The connection to `id`, marking it most recently used.
    pub fn get(&mut self, id: &NodeId) -> Option<P> {
        let p = self.entries.get(id).map(|(p, _)| p.clone())?;
        self.bump(*id);
        Some(p)
    }

    /// The connection to whatever node answers at `addr`.
    pub fn get_by_addr(&mut self, addr: &SocketAddr) -> Option<P> {
        let id = *self.by_addr.get(addr)?;
        self.get(&id)
    }

    /// Looks without touching the LRU order.
    pub fn peek(&self, id: &NodeId) -> Option<&P> {
        self.entries.get(id).map(|(p, _)| p)
    }

    /// Every connection held, in no particular order (callers that must be
    /// deterministic sort the result).
    pub fn all(&self) -> Vec<P> {
        self.entries.values().map(|(p, _)| p.clone()).collect()
    }

    fn insert(&mut self, p: P) {
        self.clock += 1;
        let id = p.node_id();
        self.clients += usize::from(p.client());
        self.by_addr.insert(p.addr(), id);
        self.lru.insert(self.clock, id);
        self.entries.insert(id, (p, self.clock));
    }

    /// Removes `id` only if its entry is still connection `conn_id` (a closed
    /// duplicate must not remove the connection that replaced it).
    pub fn remove_if(&mut self, id: &NodeId, conn_id: usize) -> Option<P> {
        let same = self
            .entries
            .get(id)
            .is_some_and(|(p, _)| p.conn_id() == conn_id);
        if !same {
            return None;
        }
        let (p, key) = self.entries.remove(id)?;
        self.clients -= usize::from(p.client());
        self.lru.remove(&key);
        if self.by_addr.get(&p.addr()) == Some(id) {
            self.by_addr.remove(&p.addr());
        }
        Some(p)
    }

    /// Would `admit` refuse a new connection to `id` (a `client` or not),
    /// and why? A connection to a node already held is never refused (it
    /// replaces or duplicates that one). Lets the handshake turn a peer
    /// away before it is set up.
    pub fn refusal(&self, id: &NodeId, client: bool) -> Option<Refusal> {
        if self.entries.contains_key(id) {
            return None;
        }
        if client && self.clients >= self.max_clients {
            return Some(Refusal::ClientLimit);
        }
        let full = self.entries.len() >= self.max && self.entries.values().all(|(e, _)| e.kept());
        full.then_some(Refusal::Full)
    }

    /// Offers a freshly handshaken connection.
    pub fn admit(&mut self, p: P) -> Admit<P> {
        let id = p.node_id();
        debug_assert_ne!(id, self.local, "a node never pools itself");
        if let Some((existing, _)) = self.entries.get(&id) {
            let existing = existing.clone();
            if existing.conn_id() == p.conn_id() {
                return Admit::Duplicate { kept: existing };
            }
            let take_new = if existing.relayed() != p.relayed() {
                existing.relayed()
            } else {
                prefer_new(self.local, id, existing.outbound(), p.outbound())
            };
            if take_new {
                self.remove_if(&id, existing.conn_id());
                self.insert(p);
                return Admit::Replaced { old: existing };
            }
            self.bump(id);
            return Admit::Duplicate { kept: existing };
        }
        if let Some(r) = self.refusal(&id, p.client()) {
            return Admit::Refused(r);
        }
        let mut evicted = None;
        if self.entries.len() >= self.max {
            let victim = self
                .lru
                .values()
                .find(|v| self.entries.get(v).is_some_and(|(e, _)| !e.kept()))
                .copied();
            let Some(victim) = victim else {
                return Admit::Refused(Refusal::Full);
            };
            let conn = self.entries.get(&victim).map(|(e, _)| e.conn_id());
            evicted = conn.and_then(|c| self.remove_if(&victim, c));
        }
        self.insert(p);
        debug_assert_eq!(self.entries.len(), self.lru.len());
        Admit::Inserted { evicted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Fake {
        id: NodeId,
        outbound: bool,
        conn: usize,
        kept: bool,
        client: bool,
        relayed: bool,
    }

    impl Pooled for Fake {
        fn node_id(&self) -> NodeId {
            self.id
        }
        fn outbound(&self) -> bool {
            self.outbound
        }
        fn conn_id(&self) -> usize {
            self.conn
        }
        fn kept(&self) -> bool {
            self.kept
        }
        fn client(&self) -> bool {
            self.client
        }
        fn addr(&self) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], 1000 + self.id.as_bytes()[0] as u16))
        }
        fn relayed(&self) -> bool {
            self.relayed
        }
    }

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn fake(n: u8, outbound: bool, conn: usize) -> Fake {
        Fake {
            id: id(n),
            outbound,
            conn,
            kept: false,
            client: false,
            relayed: false,
        }
    }

    #[test]
    fn a_direct_connection_replaces_a_relayed_one_whatever_the_tie_break() {
        for (local, outbound_old, outbound_new) in [
            (1u8, true, false),
            (1, false, true),
            (3, true, false),
            (3, false, true),
        ] {
            let mut t = PoolTable::new(id(local), 8, 8);
            let relayed = Fake {
                relayed: true,
                ..fake(2, outbound_old, 1)
            };
            assert!(matches!(t.admit(relayed.clone()), Admit::Inserted { .. }));
            let direct = fake(2, outbound_new, 2);
            assert_eq!(
                t.admit(direct.clone()),
                Admit::Replaced {
                    old: relayed.clone()
                }
            );
            // A relayed one arriving later never displaces it.
            let late = Fake {
                relayed: true,
                ..fake(2, outbound_old, 3)
            };
            assert_eq!(t.admit(late), Admit::Duplicate { kept: direct });
        }
    }

    #[test]
    fn tie_break_agrees_on_both_sides() {
        let (a, b) = (id(1), id(2));
        // A (smaller) dialed c1; B dialed c2. Both must keep c1.
        // At A: c1 outbound, c2 inbound. At B: c1 inbound, c2 outbound.
        let a_keeps_c1 = !prefer_new(a, b, true, false); // existing c1, new c2
        let b_keeps_c1 = prefer_new(b, a, true, false); // existing c2, new c1
        assert!(a_keeps_c1 && b_keeps_c1);
        // Same in the other arrival order.
        assert!(prefer_new(a, b, false, true)); // A had c2, gets c1: take c1
        assert!(!prefer_new(b, a, false, true)); // B had c1, gets c2: keep c1
    }

    #[test]
    fn simultaneous_dial_keeps_one_connection() {
        let mut a = PoolTable::new(id(1), 10, 10);
        assert_eq!(
            a.admit(fake(2, false, 20)),
            Admit::Inserted { evicted: None }
        );
        // Our own dial completes later and wins (we are smaller).
        assert_eq!(
            a.admit(fake(2, true, 10)),
            Admit::Replaced {
                old: fake(2, false, 20)
            }
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a.peek(&id(2)).map(|p| p.conn), Some(10));
        // Closing the loser does not remove the winner.
        assert_eq!(a.remove_if(&id(2), 20), None);
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn lru_eviction_skips_kept() {
        let mut t = PoolTable::new(id(0), 2, 2);
        let mut kept = fake(1, true, 1);
        kept.kept = true;
        t.admit(kept);
        t.admit(fake(2, true, 2));
        assert_eq!(
            t.admit(fake(3, true, 3)),
            Admit::Inserted {
                evicted: Some(fake(2, true, 2))
            }
        );
        // Using 3 makes 1 (kept) the LRU, but kept is never evicted... and
        // 3 is the only candidate.
        t.get(&id(3));
        assert_eq!(
            t.admit(fake(4, true, 4)),
            Admit::Inserted {
                evicted: Some(fake(3, true, 3))
            }
        );
        assert_eq!(
            t.get_by_addr(&fake(4, true, 4).addr()).map(|p| p.conn),
            Some(4)
        );
        assert!(t.get_by_addr(&fake(3, true, 3).addr()).is_none());
    }

    #[test]
    fn full_of_kept_refuses() {
        let mut t = PoolTable::new(id(0), 1, 1);
        let mut k = fake(1, true, 1);
        k.kept = true;
        assert_eq!(t.refusal(&id(1), false), None);
        t.admit(k);
        assert_eq!(t.refusal(&id(2), false), Some(Refusal::Full));
        // A connection to a peer already pooled replaces or duplicates it.
        assert_eq!(t.refusal(&id(1), false), None);
        assert_eq!(t.admit(fake(2, true, 2)), Admit::Refused(Refusal::Full));
    }

    #[test]
    fn clients_leave_slots_for_peers() {
        let mut t = PoolTable::new(id(0), 4, 2);
        let client = |n: u8| Fake {
            kept: true,
            client: true,
            ..fake(n, false, n as usize)
        };
        t.admit(client(1));
        t.admit(client(2));
        assert_eq!(t.clients(), 2);
        // A third client is refused although slots are free...
        assert_eq!(t.refusal(&id(3), true), Some(Refusal::ClientLimit));
        assert_eq!(t.admit(client(3)), Admit::Refused(Refusal::ClientLimit));
        // ...which full nodes may still take.
        assert_eq!(t.admit(fake(4, true, 4)), Admit::Inserted { evicted: None });
        assert_eq!(t.admit(fake(5, true, 5)), Admit::Inserted { evicted: None });
        // A client that reconnects replaces its old connection.
        assert!(matches!(
            t.admit(Fake {
                conn: 9,
                ..client(1)
            }),
            Admit::Replaced { .. }
        ));
        assert_eq!(t.clients(), 2);
        // One leaves: a new client fits again.
        assert!(t.remove_if(&id(2), 2).is_some());
        assert_eq!(t.clients(), 1);
        assert_eq!(t.admit(client(3)), Admit::Inserted { evicted: None });
    }

    #[test]
    fn full_with_an_evictable_entry_does_not_refuse() {
        let mut t = PoolTable::new(id(0), 2, 2);
        let mut k = fake(1, true, 1);
        k.kept = true;
        t.admit(k);
        t.admit(fake(2, true, 2));
        assert_eq!(t.refusal(&id(3), false), None);
        assert!(matches!(
            t.admit(fake(3, true, 3)),
            Admit::Inserted { evicted: Some(_) }
        ));
    }

    proptest! {
        /// Random admits and removes never break the invariants.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec((1u8..12, any::<bool>(), 0usize..40, any::<bool>(), any::<bool>()), 0..200)) {
            let mut t = PoolTable::new(id(0), 5, 3);
            for (n, outbound, conn, kept, remove) in ops {
                // Node IDs 1..=6 are clients (always kept), the rest peers.
                let client = n <= 6;
                if remove {
                    t.remove_if(&id(n), conn);
                } else {
                    let mut f = fake(n, outbound, conn);
                    f.kept = kept || client;
                    f.client = client;
                    t.admit(f);
                }
                prop_assert_eq!(t.clients, t.entries.values().filter(|(p, _)| p.client).count());
                prop_assert!(t.clients <= 3);
                prop_assert!(t.len() <= 5);
                // `refusal` predicts `admit`'s refusals exactly.
                for probe in [fake(200, true, 999), Fake { client: true, kept: true, ..fake(3, true, 998) }] {
                    let predicted = t.refusal(&probe.id, probe.client);
                    let mut copy = PoolTable { local: t.local, max: t.max, max_clients: t.max_clients, clients: t.clients, entries: t.entries.clone(), lru: t.lru.clone(), by_addr: t.by_addr.clone(), clock: t.clock };
                    let got = match copy.admit(probe) { Admit::Refused(r) => Some(r), _ => None };
                    prop_assert_eq!(predicted, got);
                }
                prop_assert_eq!(t.entries.len(), t.lru.len());
                for (i, (p, key)) in &t.entries {
                    prop_assert_eq!(*i, p.id);
                    prop_assert_eq!(t.lru.get(key), Some(i));
                }
            }
        }
    }
}
