//! Hybrid logical clock (Kulkarni et al., 2014): timestamps close to the
//! wall clock that still respect causality and are totally ordered.
//!
//! A [`Timestamp`] is `(physical ms, logical counter, node ID)`, compared in
//! that order: the node ID breaks ties between two nodes' updates in the
//! same millisecond with the same counter, so two different updates never
//! compare equal and last-writer-wins needs no further rule.
//!
//! The clock never reads time: [`Hlc::now`] and [`Hlc::observe`] take the
//! caller's wall reading. A remote timestamp more than
//! [`HlcConfig::max_drift`] ahead of the local wall reading is refused
//! ([`HlcError::TooFarAhead`], counted in [`Hlc::refused`]): accepting it
//! would drag this clock, and every timestamp it issues later, into the
//! future, so one node with a wrong clock could win every last-writer-wins
//! race.

use macula_wire::time::Millis;
use macula_wire::NodeId;
use serde::{Deserialize, Serialize};

/// A point of a hybrid logical clock. The derived order is the total order
/// of the crate: physical time, then the logical counter, then the node ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    /// Milliseconds of the wall clock the issuing node had seen (at least).
    pub physical: u64,
    /// Counts events within one `physical` millisecond.
    pub logical: u32,
    /// The issuing node: the tie-break.
    pub node: NodeId,
}

impl Timestamp {
    /// The physical part as [`Millis`].
    pub fn physical(&self) -> Millis {
        Millis(self.physical)
    }
}

/// The clock's one knob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HlcConfig {
    /// How far ahead of the local wall reading a remote timestamp may be.
    pub max_drift: Millis,
}

impl Default for HlcConfig {
    /// 5 s: generous for NTP-synchronised hosts, small enough that a
    /// wrong clock cannot win last-writer-wins races for long.
    fn default() -> HlcConfig {
        HlcConfig {
            max_drift: Millis::from_secs(5),
        }
    }
}

/// Why a remote timestamp was not observed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HlcError {
    /// The remote timestamp is further ahead of the local wall clock than the
    /// configured drift allows.
    #[error(
        "remote timestamp {remote} ms is more than {max_drift} ahead of the local clock ({wall})"
    )]
    TooFarAhead {
        /// The remote timestamp's physical part, ms.
        remote: u64,
        /// The local wall reading.
        wall: Millis,
        /// The configured bound.
        max_drift: Millis,
    },
}

/// One node's hybrid logical clock.
#[derive(Clone, Debug)]
pub struct Hlc {
    node: NodeId,
    physical: u64,
    logical: u32,
    config: HlcConfig,
    refused: u64,
}

impl Hlc {
    /// A clock for `node`, starting at zero.
    pub fn new(node: NodeId, config: HlcConfig) -> Hlc {
        Hlc {
            node,
            physical: 0,
            logical: 0,
            config,
            refused: 0,
        }
    }

    /// The node this clock stamps for.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        Timestamp {
            physical: self.physical,
            logical: self.logical,
            node: self.node,
        }
    }

    /// Remote timestamps refused so far for drift.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// A timestamp for a local event at wall reading `wall`: greater than
    /// every timestamp this clock issued or observed before.
    pub fn now(&mut self, wall: Millis) -> Timestamp {
        if wall.0 > self.physical {
            self.physical = wall.0;
            self.logical = 0;
        } else {
            self.bump();
        }
        self.last()
    }

    /// Takes in a remote timestamp (a received update) at wall reading
    /// `wall`; returns the timestamp of the receive event, greater than
    /// both `remote` and everything this clock issued before. Refuses, and
    /// counts, a `remote` more than `max_drift` ahead of `wall`; the clock
    /// is then unchanged.
    pub fn observe(&mut self, wall: Millis, remote: Timestamp) -> Result<Timestamp, HlcError> {
        if remote.physical > wall.saturating_add(self.config.max_drift).0 {
            self.refused += 1;
            return Err(HlcError::TooFarAhead {
                remote: remote.physical,
                wall,
                max_drift: self.config.max_drift,
            });
        }
        let physical = self.physical.max(remote.physical).max(wall.0);
        let (mine, theirs) = (physical == self.physical, physical == remote.physical);
        let base = match (mine, theirs) {
            (true, true) => Some(self.logical.max(remote.logical)),
            (true, false) => Some(self.logical),
            (false, true) => Some(remote.logical),
            (false, false) => None,
        };
        self.physical = physical;
        match base {
            Some(l) => {
                self.logical = l;
                self.bump();
            }
            None => self.logical = 0,
        }
        Ok(self.last())
    }

    /// The next logical tick; a full counter carries into the physical part
    /// (a clock ahead by one millisecond, never a repeated timestamp).
    fn bump(&mut self) {
        match self.logical.checked_add(1) {
            Some(l) => self.logical = l,
            None => {
                self.physical = self.physical.saturating_add(1);
                self.logical = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn ts(physical: u64, logical: u32, node: u8) -> Timestamp {
        Timestamp {
            physical,
            logical,
            node: id(node),
        }
    }

    #[test]
    fn order_is_physical_then_logical_then_node() {
        assert!(ts(1, 9, 9) < ts(2, 0, 0));
        assert!(ts(2, 0, 9) < ts(2, 1, 0));
        assert!(ts(2, 1, 0) < ts(2, 1, 1));
        assert_eq!(ts(2, 1, 1), ts(2, 1, 1));
        assert_eq!(ts(7, 0, 0).physical(), Millis(7));
    }

    #[test]
    fn local_events_are_strictly_increasing_even_when_the_wall_steps_back() {
        let mut c = Hlc::new(id(1), HlcConfig::default());
        let a = c.now(Millis(100));
        let b = c.now(Millis(100));
        let d = c.now(Millis(50));
        let e = c.now(Millis(101));
        assert_eq!(a, ts(100, 0, 1));
        assert_eq!(b, ts(100, 1, 1));
        assert_eq!(d, ts(100, 2, 1));
        assert_eq!(e, ts(101, 0, 1));
        assert_eq!(c.last(), e);
        assert_eq!(c.node(), id(1));
    }

    #[test]
    fn observe_moves_past_the_remote_timestamp() {
        let mut c = Hlc::new(id(1), HlcConfig::default());
        c.now(Millis(100));
        // Remote ahead (within drift): adopt its physical, one past its counter.
        let r = c.observe(Millis(100), ts(1_000, 4, 2)).unwrap();
        assert_eq!(r, ts(1_000, 5, 1));
        assert!(c.now(Millis(100)) > ts(1_000, 4, 2));
        // Same physical on both sides: max of the counters, plus one.
        let mut c = Hlc::new(id(1), HlcConfig::default());
        c.now(Millis(100));
        c.now(Millis(100));
        assert_eq!(c.observe(Millis(90), ts(100, 7, 2)).unwrap(), ts(100, 8, 1));
        assert_eq!(c.observe(Millis(90), ts(100, 2, 2)).unwrap(), ts(100, 9, 1));
        // Local ahead: keep local physical, bump local counter.
        assert_eq!(
            c.observe(Millis(90), ts(50, 70, 2)).unwrap(),
            ts(100, 10, 1)
        );
        // Wall ahead of both: the wall, counter zero.
        assert_eq!(
            c.observe(Millis(500), ts(50, 70, 2)).unwrap(),
            ts(500, 0, 1)
        );
    }

    #[test]
    fn a_timestamp_too_far_ahead_is_refused_and_counted() {
        let cfg = HlcConfig {
            max_drift: Millis(1_000),
        };
        let mut c = Hlc::new(id(1), cfg);
        c.now(Millis(10_000));
        // Exactly at the bound: accepted.
        assert!(c.observe(Millis(10_000), ts(11_000, 0, 2)).is_ok());
        assert_eq!(c.refused(), 0);
        let before = c.last();
        let err = c.observe(Millis(10_000), ts(11_002, 0, 2)).unwrap_err();
        assert_eq!(
            err,
            HlcError::TooFarAhead {
                remote: 11_002,
                wall: Millis(10_000),
                max_drift: Millis(1_000)
            }
        );
        assert!(err.to_string().contains("11002"));
        assert_eq!(c.refused(), 1);
        assert_eq!(c.last(), before);
        // Later, once the wall caught up, the same timestamp is fine.
        assert!(c.observe(Millis(10_002), ts(11_002, 0, 2)).is_ok());
        assert_eq!(c.refused(), 1);
    }

    #[test]
    fn a_full_logical_counter_carries_into_physical() {
        let mut c = Hlc::new(id(1), HlcConfig::default());
        c.observe(Millis(10), ts(10, u32::MAX - 1, 2)).unwrap();
        assert_eq!(c.last(), ts(10, u32::MAX, 1));
        let next = c.now(Millis(10));
        assert_eq!(next, ts(11, 0, 1));
    }
}
