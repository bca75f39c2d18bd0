//! One process per data directory: an exclusive advisory lock on
//! `<data_dir>/LOCK`, taken before the identity is read and held while the
//! node (or client) runs. Two processes on one directory would run with one
//! node ID and silently split its traffic; the second is refused instead,
//! naming the directory and the process holding it.
//!
//! The lock is `flock`-style (`std::fs::File::try_lock`): the kernel drops
//! it when the holder exits, kill -9 included, so a stale `LOCK` file never
//! blocks a restart. It is released explicitly at shutdown, so a node
//! restarted in the same process can take it again.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in the data directory; it holds the holder's pid.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Another process (or another node in this one) runs on it.
    #[error("data directory {} is in use by another process{}: one process per data directory (stop that one, or give this one a --data-dir of its own)", .dir.display(), .holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { dir: PathBuf, holder: Option<u32> },
    #[error("cannot lock data directory {}: {source}", .dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; [`DirLock::release`] (or drop) lets go of it.
#[derive(Debug)]
pub struct DirLock {
    file: File,
}

impl DirLock {
    /// Creates `dir` (mode 0700) if needed and locks it, or says who holds
    /// it.
    pub fn acquire(dir: &Path) -> Result<DirLock, DataDirError> {
        let io = |source| DataDirError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        crate::identity::create_dir_private(dir).map_err(io)?;
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(dir.join(LOCK_FILE_NAME)).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(DataDirError::InUse {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // Ours: say who holds it, for the next one that tries.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DirLock { file })
    }

    /// Lets go of the lock (the file stays; it is not a lock by itself).
    pub fn release(self) {
        if let Err(e) = self.file.unlock() {
            tracing::debug!(error = %e, "could not unlock the data directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = DirLock::acquire(&dir).expect("first");
        match DirLock::acquire(&dir) {
            Err(DataDirError::InUse { dir: d, holder }) => {
                assert_eq!(d, dir);
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("{other:?}"),
        }
        let msg = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        first.release();
        let again = DirLock::acquire(&dir).expect("free again");
        drop(again);
        DirLock::acquire(&dir).expect("dropping releases too");
    }
}
