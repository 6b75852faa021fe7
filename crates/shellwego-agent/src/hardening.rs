//! The agent process's own protections, applied once at start: files it creates are
//! private (umask 077), its memory cannot be read through ptrace or core dumps by anyone
//! but root (not dumpable: it holds the secrets key and opened secrets), it may hold many
//! descriptors (every VM, proxied connection and probe takes some), and its directories
//! are root-only.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

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

/// Connects to the Unix socket at `path` only if `path` itself is a socket, never through
/// a symlink in its last component. The sockets of a jailed VM (API, vsock) sit in a
/// directory its unprivileged VMM owns: a VMM a guest took over could put a symlink there
/// to another VM's socket or the agent's own, which a plain `connect` would follow as
/// root. The socket is opened with `O_PATH | O_NOFOLLOW`, checked to be a socket, and
/// connected to through that descriptor (`/proc/self/fd/N`), so nothing can swap it in
/// between. A VMM that stops accepting lets its listen queue fill, and a plain `connect`
/// then waits forever: this one waits at most `limit` (see
/// [`shellwego_sys::socket::connect_unix`]).
pub fn connect_unix(path: &Path, limit: Duration) -> io::Result<std::os::unix::net::UnixStream> {
    shellwego_sys::socket::connect_unix(path, limit)
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

    #[test]
    fn connects_to_a_socket_but_never_through_a_symlink_or_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let limit = Duration::from_secs(5);
        assert!(connect_unix(&sock, limit).is_ok());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = connect_unix(&link, limit).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(connect_unix(&file, limit).is_err());
        assert!(connect_unix(&dir.path().join("missing"), limit).is_err());
    }
}
