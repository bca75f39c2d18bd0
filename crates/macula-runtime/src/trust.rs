//! Trust on first use (issue 18, the seeds' "level 2"), for open realms:
//! the first time a node reaches a configured address or name without a
//! node ID (`--bootstrap host:4433`), it pins the node ID that answered;
//! later, a different node ID at that address is refused (a
//! `ConnectError::Untrusted`, permanent) until the operator accepts it with
//! `macula trust revoke TARGET`.
//!
//! Pins live in `<data dir>/trust.json`, re-read at every check (so the
//! CLI's changes take effect on a running node) and written through a
//! rename. At most [`TrustLimits::max_pins`] of them; past that a target is
//! reached without being pinned, said once in the log and counted. A node
//! without a data directory, or in a realm with an authority (grants prove
//! who is who), pins nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use macula_wire::NodeId;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::config::TrustLimits;
use crate::metrics::register;

/// The pins' file in the data directory.
pub const TRUST_FILE: &str = "trust.json";
/// One pin: the node ID first seen at a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    #[serde(with = "as_text")]
    pub node_id: NodeId,
    /// Unix milliseconds.
    pub first_seen_ms: u64,
}

/// A node ID as its text form in the JSON file.
mod as_text {
    use macula_wire::NodeId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &NodeId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NodeId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The file's contents: target (`host:port` as configured) → pin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pins {
    pub pins: BTreeMap<String, Pin>,
}

/// Why the pins' file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a pins file: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Pins {
    /// The pins in `dir` (none when the file does not exist).
    pub fn load(dir: &Path) -> Result<Pins, TrustError> {
        let path = dir.join(TRUST_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TrustError::Parse {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pins::default()),
            Err(source) => Err(TrustError::Read { path, source }),
        }
    }

    /// Writes the pins to `dir` through a temporary file and a rename.
    pub fn save(&self, dir: &Path) -> Result<(), TrustError> {
        let path = dir.join(TRUST_FILE);
        let tmp = dir.join(format!("{TRUST_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| TrustError::Parse {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| TrustError::Write { path, source })
    }
}

/// What the check of a target found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// No pin: reach it, then [`Trust::pin`] who answered.
    New,
    /// Pinned: the node must prove this ID.
    Pinned(NodeId),
}

/// Trust on first use's counters.
#[derive(Debug, Default)]
pub struct TrustCounters {
    pub pinned_total: Counter,
    /// Connections refused because a pinned target answered with another
    /// node ID.
    pub refused_total: Counter,
    /// Targets reached but not pinned: the pins were at their limit, or
    /// the file could not be written.
    pub not_pinned_total: Counter,
    pub pins: Gauge,
}

impl TrustCounters {
    pub fn register(&self, r: &mut Registry) {
        register(
            r,
            "macula_trust_pinned",
            "Targets pinned to the node ID first seen there (trust on first use).",
            self.pinned_total.clone(),
        );
        register(
            r,
            "macula_trust_refused",
            "Connections refused because a pinned target answered with another node ID.",
            self.refused_total.clone(),
        );
        register(
            r,
            "macula_trust_not_pinned",
            "Targets reached but not pinned (the pins were at their limit, or could not be saved).",
            self.not_pinned_total.clone(),
        );
        register(
            r,
            "macula_trust_pins",
            "Pins held (trust on first use).",
            self.pins.clone(),
        );
    }
}

/// A node's trust on first use.
#[derive(Debug)]
pub struct Trust {
    /// `None`: pins nothing (off, no data directory, or a realm with an
    /// authority).
    dir: Option<PathBuf>,
    max_pins: usize,
    /// Serialises read-modify-write of the file within this process.
    lock: Mutex<()>,
    counters: TrustCounters,
}

impl Trust {
    pub fn new(dir: Option<PathBuf>, limits: TrustLimits) -> Trust {
        let t = Trust {
            dir: dir.filter(|_| limits.enabled),
            max_pins: limits.max_pins,
            lock: Mutex::new(()),
            counters: TrustCounters::default(),
        };
        if let Some(d) = &t.dir {
            match Pins::load(d) {
                Ok(p) => {
                    t.counters.pins.set(p.pins.len() as i64);
                }
                Err(e) => tracing::warn!(error = %e, "trust on first use: pins unreadable"),
            }
        }
        t
    }

    pub fn counters(&self) -> &TrustCounters {
        &self.counters
    }

    /// Whether `target` (as configured, `host:port`) is pinned. An
    /// unreadable file counts as no pin, said in the log.
    pub fn check(&self, target: &str) -> Checked {
        let Some(dir) = &self.dir else {
            return Checked::New;
        };
        let _g = self.lock.lock();
        match Pins::load(dir) {
            Ok(p) => {
                self.counters.pins.set(p.pins.len() as i64);
                match p.pins.get(target) {
                    Some(pin) => Checked::Pinned(pin.node_id),
                    None => Checked::New,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "trust on first use: pins unreadable");
                Checked::New
            }
        }
    }

    /// Pins `target` to `id` (first use). Returns whether it was pinned.
    pub fn pin(&self, target: &str, id: NodeId, now_ms: u64) -> bool {
        let Some(dir) = &self.dir else {
            return false;
        };
        let _g = self.lock.lock();
        let mut pins = match Pins::load(dir) {
            Ok(p) => p,
            Err(e) => {
                self.counters.not_pinned_total.inc();
                tracing::warn!(error = %e, target, "trust on first use: pins unreadable; not pinned");
                return false;
            }
        };
        if pins.pins.contains_key(target) {
            return false;
        }
        if pins.pins.len() >= self.max_pins {
            self.counters.not_pinned_total.inc();
            tracing::warn!(
                target,
                max = self.max_pins,
                "trust on first use: pins at their limit (--trust-max-pins); not pinned"
            );
            return false;
        }
        pins.pins.insert(
            target.to_string(),
            Pin {
                node_id: id,
                first_seen_ms: now_ms,
            },
        );
        match pins.save(dir) {
            Ok(()) => {
                self.counters.pinned_total.inc();
                self.counters.pins.set(pins.pins.len() as i64);
                tracing::info!(target, node = %id, "trust on first use: pinned");
                true
            }
            Err(e) => {
                self.counters.not_pinned_total.inc();
                tracing::warn!(error = %e, target, "trust on first use: not pinned");
                false
            }
        }
    }

    /// Counts a refusal (a pinned target answered with another ID).
    pub fn refused(&self) {
        self.counters.refused_total.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    #[test]
    fn first_use_pins_and_later_checks_see_the_pin() {
        let dir = tempfile::tempdir().expect("dir");
        let t = Trust::new(Some(dir.path().to_path_buf()), TrustLimits::default());
        assert_eq!(t.check("a:1"), Checked::New);
        assert!(t.pin("a:1", id(1), 7));
        assert!(!t.pin("a:1", id(2), 8), "a pin is never replaced");
        assert_eq!(t.check("a:1"), Checked::Pinned(id(1)));
        // Another process (the CLI) removes it: the next check sees that.
        let mut p = Pins::load(dir.path()).expect("load");
        assert_eq!(p.pins["a:1"].first_seen_ms, 7);
        p.pins.remove("a:1");
        p.save(dir.path()).expect("save");
        assert_eq!(t.check("a:1"), Checked::New);
        assert_eq!(t.counters().pinned_total.get(), 1);
    }

    #[test]
    fn the_pins_are_bounded_and_off_means_nothing_is_pinned() {
        let dir = tempfile::tempdir().expect("dir");
        let t = Trust::new(
            Some(dir.path().to_path_buf()),
            TrustLimits {
                enabled: true,
                max_pins: 2,
            },
        );
        assert!(t.pin("a:1", id(1), 0));
        assert!(t.pin("b:1", id(2), 0));
        assert!(!t.pin("c:1", id(3), 0));
        assert_eq!(t.check("c:1"), Checked::New);
        assert_eq!(t.counters().not_pinned_total.get(), 1);
        assert_eq!(t.counters().pins.get(), 2);
        let off = Trust::new(
            Some(dir.path().to_path_buf()),
            TrustLimits {
                enabled: false,
                max_pins: 2,
            },
        );
        assert_eq!(off.check("a:1"), Checked::New);
        assert!(!off.pin("d:1", id(4), 0));
        // A damaged file is an error for the CLI, no pin for the node.
        std::fs::write(dir.path().join(TRUST_FILE), b"{").expect("write");
        assert!(Pins::load(dir.path()).is_err());
        assert_eq!(t.check("a:1"), Checked::New);
    }
}
