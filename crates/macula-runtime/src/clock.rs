//! The runtime's clocks: one monotonic clock that feeds every core, and
//! the node's epoch, which orders its incarnations.
//!
//! Cores take time as [`Millis`] and never read a clock. The runtime feeds
//! them from [`Clock`], a monotonic clock that starts at zero when the node
//! starts: it never steps back when the wall clock does.
//!
//! What must keep growing across restarts (a publisher's epoch, which lets
//! subscribers tell a restarted publisher's sequence numbers from old ones;
//! the sequence numbers of the node's DHT records) is measured from the
//! node's **epoch**: about the wall-clock time of the start in
//! milliseconds, but never lower than what the previous run could have
//! used. The epoch file in the data directory (`epoch`) holds a high-water
//! mark, `epoch + uptime`, rewritten every [`EPOCH_SAVE_INTERVAL`] and at
//! shutdown; a new run starts above it by more than that interval, so even
//! after a crash (a mark up to one interval old) and a wall clock that
//! stepped back, the new epoch is above every value the last run used.
//!
//! **Invariant:** `Epoch::start` returns a value greater than every
//! `epoch + uptime` of earlier runs with the same data directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use macula_wire::time::Millis;

/// The epoch file's name in the data directory.
pub const EPOCH_FILE_NAME: &str = "epoch";

/// How often the epoch file's high-water mark is rewritten while the node
/// runs. A crash loses at most this much of it, so a new epoch starts this
/// far above the mark (plus one).
pub const EPOCH_SAVE_INTERVAL: Duration = Duration::from_secs(60);

/// The node's monotonic clock: milliseconds since the node started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// A clock reading zero now.
    pub fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Milliseconds since this clock started.
    pub fn now(&self) -> Millis {
        Millis::from_duration(self.origin.elapsed())
    }

    /// The reading at `at` (zero for an instant before the clock started).
    pub fn at(&self, at: Instant) -> Millis {
        Millis::from_duration(at.saturating_duration_since(self.origin))
    }

    /// The instant of reading `at`.
    pub fn instant(&self, at: Millis) -> Instant {
        self.origin + at.to_duration()
    }
}

/// Why the epoch could not be established.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EpochError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt (expected one decimal number): {content:?}")]
    Corrupt { path: PathBuf, content: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The node's epoch and where its high-water mark is kept.
#[derive(Debug, Clone)]
pub struct Epoch {
    value: u64,
    file: Option<PathBuf>,
}

/// Wall-clock milliseconds since the Unix epoch (0 for a clock before it).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The epoch of a new run: the wall clock, or just above what the last run
/// could have reached (`mark`, at most one save interval old), whichever is
/// higher.
pub fn next_epoch(mark: Option<u64>, wall_ms: u64) -> u64 {
    let floor = mark.map_or(0, |m| {
        m.saturating_add(EPOCH_SAVE_INTERVAL.as_millis() as u64)
            .saturating_add(1)
    });
    wall_ms.max(floor)
}

impl Epoch {
    /// An epoch with nowhere to persist it (an ephemeral identity: a new
    /// node ID each run, so nothing needs ordering across runs).
    pub fn ephemeral() -> Epoch {
        Epoch {
            value: wall_ms(),
            file: None,
        }
    }

    /// Starts a run in data directory `dir`: reads the last run's mark,
    /// picks the new epoch (`next_epoch`) and records it before returning,
    /// so a crash right after start still leaves a mark.
    pub fn start(dir: &Path) -> Result<Epoch, EpochError> {
        let path = dir.join(EPOCH_FILE_NAME);
        let mark = match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim().parse::<u64>().map_err(|_| EpochError::Corrupt {
                path: path.clone(),
                content: s.chars().take(64).collect(),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(EpochError::Read { path, source }),
        };
        let epoch = Epoch {
            value: next_epoch(mark, wall_ms()),
            file: Some(path),
        };
        epoch.save(Millis::ZERO)?;
        Ok(epoch)
    }

    /// The epoch: milliseconds, about the wall-clock time of the start.
    pub fn value(&self) -> u64 {
        self.value
    }

    /// `epoch + uptime`: a value that grows like the wall clock but never
    /// steps back, and exceeds every such value of an earlier run.
    pub fn at(&self, uptime: Millis) -> u64 {
        self.value.saturating_add(uptime.0)
    }

    /// Records the high-water mark `epoch + uptime` (atomically: a
    /// temporary file renamed over the old one, synced first). Nothing to
    /// do for an ephemeral epoch.
    pub fn save(&self, uptime: Millis) -> Result<(), EpochError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        let write = |p: &Path| -> std::io::Result<()> {
            let mut f = std::fs::File::create(p)?;
            writeln!(f, "{}", self.at(uptime))?;
            f.sync_all()
        };
        write(&tmp)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| EpochError::Write {
                path: path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_epoch_follows_the_wall_clock_when_it_is_ahead() {
        assert_eq!(next_epoch(None, 5_000), 5_000);
        assert_eq!(next_epoch(Some(1_000), 1_000_000), 1_000_000);
    }

    #[test]
    fn a_new_epoch_passes_the_last_mark_when_the_clock_stepped_back() {
        let interval = EPOCH_SAVE_INTERVAL.as_millis() as u64;
        assert_eq!(next_epoch(Some(1_000_000), 10), 1_000_000 + interval + 1);
        assert_eq!(next_epoch(Some(u64::MAX), 10), u64::MAX);
    }

    #[test]
    fn epochs_grow_across_runs_even_when_the_wall_clock_steps_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = Epoch::start(dir.path()).unwrap();
        // An hour of uptime: the wall clock now reads far earlier than
        // that hour's end, and the next run must still start above
        // everything the first used.
        first.save(Millis(3_600_000)).unwrap();
        let second = Epoch::start(dir.path()).unwrap();
        assert!(second.value() > first.at(Millis(3_600_000)));
        // A crash right after start still leaves a mark.
        let third = Epoch::start(dir.path()).unwrap();
        assert!(third.value() > second.value());
    }

    #[test]
    fn a_corrupt_epoch_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(EPOCH_FILE_NAME), "not a number\n").unwrap();
        let err = Epoch::start(dir.path()).unwrap_err().to_string();
        assert!(err.contains("epoch"), "{err}");
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn the_monotonic_clock_counts_from_its_start() {
        let c = Clock::new();
        let later = c.instant(Millis(1_500));
        assert_eq!(c.at(later), Millis(1_500));
        assert!(c.now() < Millis(60_000));
    }
}
