//! [`LwwRegister`]: one value, the write with the greatest [`Timestamp`]
//! wins (the node ID inside the timestamp breaks ties).

use serde::{Deserialize, Serialize};

use crate::{Crdt, Timestamp};

/// A last-writer-wins register. Empty until the first write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwRegister<T> {
    entry: Option<(Timestamp, T)>,
}

impl<T> Default for LwwRegister<T> {
    fn default() -> Self {
        LwwRegister { entry: None }
    }
}

impl<T: Clone> LwwRegister<T> {
    /// An empty register.
    pub fn new() -> Self {
        LwwRegister::default()
    }

    /// Writes `value` at `ts` (take it from the node's [`Hlc`]); returns the
    /// delta. A write older than the current one changes nothing here, and
    /// its delta changes nothing anywhere.
    ///
    /// [`Hlc`]: crate::Hlc
    pub fn set(&mut self, ts: Timestamp, value: T) -> Self {
        let delta = LwwRegister {
            entry: Some((ts, value)),
        };
        self.merge_from(&delta);
        delta
    }

    /// The current value.
    pub fn get(&self) -> Option<&T> {
        self.entry.as_ref().map(|(_, v)| v)
    }

    /// The current value's timestamp.
    pub fn timestamp(&self) -> Option<Timestamp> {
        self.entry.as_ref().map(|(ts, _)| *ts)
    }

    fn merge_from(&mut self, other: &Self) {
        if let Some((theirs, v)) = &other.entry {
            if self.timestamp().is_none_or(|mine| *theirs > mine) {
                self.entry = Some((*theirs, v.clone()));
            }
        }
    }
}

impl<T> Crdt for LwwRegister<T>
where
    T: Clone + PartialEq + std::fmt::Debug + Serialize + serde::de::DeserializeOwned,
{
    /// The current value's timestamp.
    type Digest = Option<Timestamp>;

    fn merge(&mut self, other: &Self) {
        self.merge_from(other);
    }

    fn digest(&self) -> Option<Timestamp> {
        self.timestamp()
    }

    fn delta_since(&self, theirs: &Option<Timestamp>) -> Option<Self> {
        let mine = self.timestamp()?;
        theirs.is_none_or(|t| mine > t).then(|| self.clone())
    }

    fn lacks(&self, theirs: &Option<Timestamp>) -> bool {
        theirs.is_some_and(|t| self.timestamp().is_none_or(|mine| t > mine))
    }

    fn size(&self) -> usize {
        usize::from(self.entry.is_some())
    }

    fn latest(&self) -> Option<Timestamp> {
        self.timestamp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use macula_wire::NodeId;

    fn ts(physical: u64, node: u8) -> Timestamp {
        Timestamp {
            physical,
            logical: 0,
            node: NodeId::from_bytes([node; 32]),
        }
    }

    #[test]
    fn the_latest_write_wins_and_the_node_breaks_ties() {
        let mut a = LwwRegister::new();
        assert_eq!(a.get(), None);
        a.set(ts(10, 1), 'a');
        let late = a.set(ts(5, 9), 'o');
        assert_eq!(a.get(), Some(&'a'));
        let mut b = LwwRegister::new();
        b.set(ts(10, 2), 'b');
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.get(), Some(&'b'));
        ab.merge(&late);
        assert_eq!(ab.get(), Some(&'b'));
        assert_eq!(ab.latest(), Some(ts(10, 2)));
        assert_eq!(ab.size(), 1);
        assert_eq!(LwwRegister::<u8>::new().size(), 0);
    }

    #[test]
    fn digest_exchange_is_exact() {
        let mut a = LwwRegister::new();
        let e = LwwRegister::<u8>::new();
        assert_eq!(e.delta_since(&None), None);
        assert!(!e.lacks(&None));
        a.set(ts(10, 1), 1u8);
        assert_eq!(a.delta_since(&None), Some(a.clone()));
        assert_eq!(a.delta_since(&Some(ts(10, 1))), None);
        assert_eq!(a.delta_since(&Some(ts(9, 1))), Some(a.clone()));
        assert!(e.lacks(&a.digest()));
        assert!(!a.lacks(&Some(ts(10, 1))));
        assert!(a.lacks(&Some(ts(10, 2))));
    }
}
