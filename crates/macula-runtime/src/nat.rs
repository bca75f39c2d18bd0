//! NAT detection and the hole-punching decisions (issue 22): the pure core
//! lives in the `macula-nat` crate, shared with the simulator
//! (`macula-sim`'s pair matrix); re-exported here under its old path.

pub use macula_nat::*;
