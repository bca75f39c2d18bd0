//! Contacts the routing table dropped because they stopped answering, kept
//! for a while so they can be re-probed.
//!
//! **Why:** a partition makes both sides time each other out; the routing
//! table forgets the contacts, and only the hourly bucket refresh would look
//! for them again (and a refresh lookup asks our own side only). Remembering
//! the lost contact and pinging it on a backoff (first after
//! `Config::lost_probe_min`, doubling up to `Config::lost_probe_max`, given up
//! `Config::lost_probe_horizon` after the loss) heals the table within one
//! probe interval of the network healing.
//!
//! **Invariant:** at most `cap` entries (past it the oldest loss is dropped);
//! every entry has exactly one slot in the time queue and one in the age
//! index; every queued time is before or at the entry's horizon. Everything is
//! ordered by `(Millis, NodeId)`: what is probed, dropped or expired never
//! depends on hashing. This module must not send anything: it tells the
//! caller whom to probe and what expired.

use std::collections::{BTreeMap, BTreeSet};

use macula_wire::NodeId;

use crate::message::Contact;
use crate::Millis;

#[derive(Clone, Debug)]
struct Lost {
    contact: Contact,
    /// When the routing table dropped it.
    lost_at: Millis,
    /// Its slot in the time queue: the next probe, or the horizon.
    next: Millis,
    /// Wait after the next probe before the one after it.
    wait: Millis,
    /// A probe is in flight: do not stack a second one on it.
    probing: bool,
}

/// What [`LostContacts::pop_due`] found due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// Ping this contact now (its next probe is already scheduled).
    Probe(Contact),
    /// A probe was due but the last one is still in flight: skipped, and the
    /// next one scheduled.
    StillProbing,
    /// The horizon passed: the contact left the list for good.
    Expired(NodeId),
}

/// The bounded list of lost contacts, with their probe schedule.
#[derive(Clone, Debug)]
pub(crate) struct LostContacts {
    cap: usize,
    first_wait: Millis,
    max_wait: Millis,
    horizon: Millis,
    entries: BTreeMap<NodeId, Lost>,
    /// `(next, id)`: the earliest due entry first, so the next timer is
    /// `first()` (O(log n)), never a scan.
    queue: BTreeSet<(Millis, NodeId)>,
    /// `(lost_at, id)`: the oldest loss first, dropped past `cap`.
    by_age: BTreeSet<(Millis, NodeId)>,
}

impl LostContacts {
    /// An empty list of at most `cap` contacts (0 turns re-probing off),
    /// probed `first_wait` after the loss, then after doubling waits of at
    /// most `max_wait`, given up `horizon` after the loss.
    pub(crate) fn new(cap: usize, first_wait: Millis, max_wait: Millis, horizon: Millis) -> Self {
        LostContacts {
            cap,
            first_wait,
            max_wait,
            horizon,
            entries: BTreeMap::new(),
            queue: BTreeSet::new(),
            by_age: BTreeSet::new(),
        }
    }

    /// Contacts held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if `id` is held.
    pub(crate) fn contains(&self, id: &NodeId) -> bool {
        self.entries.contains_key(id)
    }

    /// When [`LostContacts::pop_due`] next has something, if ever.
    pub(crate) fn next_due(&self) -> Option<Millis> {
        self.queue.first().map(|q| q.0)
    }

    /// `contact` was dropped from the routing table at `now` for not
    /// answering: remember it, with a fresh schedule. Returns how many older
    /// losses were dropped to stay within the bound (0 or 1; 0 when the list
    /// is off, as nothing is remembered).
    pub(crate) fn insert(&mut self, contact: Contact, now: Millis) -> usize {
        if self.cap == 0 {
            return 0;
        }
        // Not expected (a held contact is not in the routing table, so it
        // cannot be dropped from it again), but a fresh loss wins.
        self.remove(&contact.id);
        let mut dropped = 0;
        while self.entries.len() >= self.cap {
            let Some(&(_, oldest)) = self.by_age.first() else {
                break;
            };
            self.remove(&oldest);
            dropped += 1;
        }
        let id = contact.id;
        let next = now
            .saturating_add(self.first_wait)
            .min(now.saturating_add(self.horizon));
        self.entries.insert(
            id,
            Lost {
                contact,
                lost_at: now,
                next,
                wait: self
                    .first_wait
                    .saturating_add(self.first_wait)
                    .min(self.max_wait),
                probing: false,
            },
        );
        self.queue.insert((next, id));
        self.by_age.insert((now, id));
        dropped
    }

    /// Forgets `id` (heard from again, or told to). Returns whether it was held.
    pub(crate) fn remove(&mut self, id: &NodeId) -> bool {
        let Some(e) = self.entries.remove(id) else {
            return false;
        };
        self.queue.remove(&(e.next, *id));
        self.by_age.remove(&(e.lost_at, *id));
        true
    }

    /// The next entry due at or before `now`, already rescheduled (or gone, if
    /// expired). Call until `None`: every entry returned has been moved past
    /// `now`, so the loop ends.
    pub(crate) fn pop_due(&mut self, now: Millis) -> Option<Due> {
        let &(at, id) = self.queue.first()?;
        if at > now {
            return None;
        }
        self.queue.remove(&(at, id));
        let horizon = self.horizon;
        let Some(e) = self.entries.get_mut(&id) else {
            // Unreachable by the invariant; the stale slot is gone now.
            return Some(Due::StillProbing);
        };
        let end = e.lost_at.saturating_add(horizon);
        if now >= end {
            let lost_at = e.lost_at;
            self.entries.remove(&id);
            self.by_age.remove(&(lost_at, id));
            return Some(Due::Expired(id));
        }
        // The probe after this one: `wait` from now, but never past the
        // horizon, where the entry expires.
        e.next = now.saturating_add(e.wait).min(end);
        e.wait = e.wait.saturating_add(e.wait).min(self.max_wait);
        self.queue.insert((e.next, id));
        if e.probing {
            Some(Due::StillProbing)
        } else {
            Some(Due::Probe(e.contact.clone()))
        }
    }

    /// A probe to `id` went out (`true`) or ended without an answer (`false`).
    pub(crate) fn set_probing(&mut self, id: &NodeId, probing: bool) {
        if let Some(e) = self.entries.get_mut(id) {
            e.probing = probing;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(b: u8) -> Contact {
        Contact::new(NodeId::from_bytes([b; 32]), format!("peer-{b}"))
    }

    fn list(cap: usize) -> LostContacts {
        LostContacts::new(cap, Millis(15), Millis(120), Millis(1_000))
    }

    /// Pops everything due at `now`.
    fn due(l: &mut LostContacts, now: u64) -> Vec<Due> {
        std::iter::from_fn(|| l.pop_due(Millis(now))).collect()
    }

    #[test]
    fn schedule_doubles_to_the_cap_then_expires_at_the_horizon() {
        let mut l = list(4);
        assert_eq!(l.insert(c(1), Millis(100)), 0);
        let mut probes = Vec::new();
        while let Some(t) = l.next_due() {
            for d in due(&mut l, t.0) {
                match d {
                    Due::Probe(p) => {
                        assert_eq!(p, c(1));
                        probes.push(t.0 - 100);
                    }
                    Due::Expired(id) => {
                        assert_eq!(id, c(1).id);
                        assert_eq!(t, Millis(1_100), "expires exactly at the horizon");
                    }
                    Due::StillProbing => panic!("never marked probing"),
                }
            }
        }
        assert_eq!(probes, [15, 45, 105, 225, 345, 465, 585, 705, 825, 945]);
        assert_eq!(l.len(), 0);
        assert!(l.by_age.is_empty() && l.queue.is_empty());
    }

    #[test]
    fn a_probe_in_flight_is_not_doubled() {
        let mut l = list(4);
        l.insert(c(1), Millis(0));
        assert_eq!(due(&mut l, 15), vec![Due::Probe(c(1))]);
        l.set_probing(&c(1).id, true);
        assert_eq!(due(&mut l, 45), vec![Due::StillProbing]);
        l.set_probing(&c(1).id, false);
        assert_eq!(due(&mut l, 105), vec![Due::Probe(c(1))]);
    }

    #[test]
    fn past_the_bound_the_oldest_loss_goes() {
        let mut l = list(2);
        l.insert(c(1), Millis(10));
        l.insert(c(2), Millis(5));
        assert_eq!(l.insert(c(3), Millis(20)), 1);
        assert!(!l.contains(&c(2).id), "lost earliest");
        assert!(l.contains(&c(1).id) && l.contains(&c(3).id));
        assert_eq!(l.len(), 2);
        assert_eq!(l.next_due(), Some(Millis(25)));
        // Off: nothing is remembered.
        let mut off = list(0);
        assert_eq!(off.insert(c(1), Millis(0)), 0);
        assert_eq!((off.len(), off.next_due()), (0, None));
    }

    #[test]
    fn removal_clears_every_index() {
        let mut l = list(4);
        l.insert(c(1), Millis(0));
        l.insert(c(2), Millis(0));
        assert!(l.remove(&c(1).id));
        assert!(!l.remove(&c(1).id));
        assert_eq!(due(&mut l, 15), vec![Due::Probe(c(2))]);
        assert_eq!((l.queue.len(), l.by_age.len()), (1, 1));
    }
}
