//! Checks that fail a test loudly when the host lacks what it needs.

use std::path::{Path, PathBuf};

/// Panics unless running as root.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (it creates pools, mounts, interfaces or VMs); run the suite as root: `sudo make test`"
    );
}

/// Finds an executable on PATH (or at an absolute path), or panics naming the fix.
pub fn require_command(name: &str, fix: &str) -> PathBuf {
    find_command(name).unwrap_or_else(|| panic!("`{name}` not found on PATH: {fix}"))
}

/// Finds an executable on PATH (or at an absolute path).
pub fn find_command(name: &str) -> Option<PathBuf> {
    let candidate = Path::new(name);
    if candidate.is_absolute() {
        return candidate.is_file().then(|| candidate.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Panics unless `path` exists.
pub fn require_path(path: &Path, fix: &str) {
    assert!(path.exists(), "{} is missing: {fix}", path.display());
}
