//! The agent process's own protections, applied once at start: files it creates are
//! private (umask 077), its memory cannot be read through ptrace or core dumps by anyone
//! but root (not dumpable: it holds the secrets key and opened secrets), it may hold many
//! descriptors (every VM, proxied connection and probe takes some), and its directories
//! are root-only.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::{info, warn};

/// Umask, non-dumpable, and the open-file limit raised to the hard limit.
pub fn harden_process() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        warn!(error = %io::Error::from(e), "cannot make the agent non-dumpable");
    }
    match raise_nofile() {
        Ok(n) => info!(open_files = n, "open-file limit"),
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit
/// (`u64::MAX` for no limit).
pub fn raise_nofile() -> io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    // `None` is no limit: above every number.
    let (soft, hard) = (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    );
    if soft < hard {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )?;
    }
    Ok(hard.max(soft))
}

/// Creates `dir` (and its parents) and makes it root-only (0700), also when it existed.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Makes an existing file root-only (0600); a missing one is fine.
pub fn private_file(path: &Path) -> io::Result<()> {
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn private_dirs_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let f = dir.join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        private_file(&f).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        private_file(&dir.join("missing")).unwrap();
    }

    #[test]
    fn nofile_is_raised_to_the_hard_limit() {
        let n = raise_nofile().unwrap();
        let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(Some(n), lim.maximum);
        assert_eq!(lim.current, lim.maximum);
    }
}
