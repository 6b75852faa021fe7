//! The cross-process lock: an exclusive `flock` on a lock file, held while the value
//! lives. Processes that take it on the same file are serialised; the kernel drops it when
//! the holder dies, so a crash never leaves it taken.

use std::fs;
use std::io;
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

/// Holds an exclusive `flock` on a file while alive.
#[derive(Debug)]
pub struct FileLock(fs::File);

impl FileLock {
    /// Opens (creating, never truncating) `path` and waits for the exclusive lock on it.
    /// Waits as long as another holder keeps it: the holders are our own processes doing
    /// short file updates, never something outside the agent.
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        flock(&f, FlockOperation::LockExclusive)?;
        Ok(FileLock(f))
    }

    /// Takes the lock only if it is free now; `Ok(None)` when another holder has it.
    pub fn try_exclusive(path: &Path) -> io::Result<Option<FileLock>> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(FileLock(f))),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the file releases the lock anyway; unlocking first makes it free at
        // once even if a duplicate of the descriptor lives on (a forked child).
        let _ = flock(&self.0, FlockOperation::Unlock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = FileLock::exclusive(&path).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts.
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
        assert!(FileLock::exclusive(&dir.path().join("missing/x.lock")).is_err());
    }
}
