//! The bind mounts the agent makes: a file or directory onto another, made safe for
//! untrusted contents, and taken away again.

use std::io;
use std::path::Path;

use rustix::mount::{mount_bind, mount_remount, unmount, MountFlags, UnmountFlags};

/// Bind-mounts `source` (a file or a directory) onto `target`, which must exist and be of
/// the same kind.
pub fn bind(source: &Path, target: &Path) -> io::Result<()> {
    mount_bind(source, target).map_err(io::Error::from)
}

/// Makes the bind mount at `path` `nosuid,nodev,noexec`: what it holds can be read but not
/// run, and its device nodes and setuid bits mean nothing.
pub fn restrict_bind(path: &Path) -> io::Result<()> {
    let flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_remount(path, flags, "").map_err(io::Error::from)
}

/// Detaches the mount at `path` (lazily: it goes once nothing uses it any more).
pub fn detach(path: &Path) -> io::Result<()> {
    unmount(path, UnmountFlags::DETACH).map_err(io::Error::from)
}
