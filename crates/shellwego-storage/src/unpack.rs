//! Applying OCI image layers (tar streams) to a root directory.
//!
//! Layers are applied in order with whiteouts (`.wh.NAME` removes NAME from lower layers,
//! `.wh..wh..opq` hides everything lower layers put in its directory), hardlinks,
//! symlinks, device nodes and FIFOs, owners, modes, modification times and xattrs.
//!
//! Every path stays inside the root. An entry is refused, with an error naming it, when
//! its path (or a hardlink's target) is absolute or has a `..` component, or when any
//! directory on its way is a symlink (e.g. `etc -> /` planted by an earlier layer): paths
//! are walked component by component with `lstat`, and nothing is ever opened through a
//! symlink. A final component that is a symlink is replaced, not followed.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags, CWD};

use tar::EntryType;
use tracing::warn;

/// Why a layer could not be applied. `entry` is the path as written in the archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {entry:?} has an absolute path; refused")]
    Absolute { entry: String },
    #[error("layer entry {entry:?} has a '..' component; refused")]
    Traversal { entry: String },
    #[error("layer entry {entry:?} would write through the symlink {link:?}; refused")]
    ThroughSymlink { entry: String, link: String },
    #[error("layer entry {entry:?}: {path:?} exists and is not a directory")]
    NotADirectory { entry: String, path: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} does not exist or is a directory")]
    BadLinkTarget { entry: String, target: String },
    #[error("layer entry {entry:?} is a whiteout of an invalid name")]
    BadWhiteout { entry: String },
    #[error("layer entry {entry:?} has unsupported type {kind}")]
    Unsupported { entry: String, kind: String },
    #[error("layer entry {entry:?}: {source}")]
    Io {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("layer archive is unreadable: {0}")]
    Archive(#[source] io::Error),
    #[error("the image has more than {limit} entries (its budget); refused")]
    TooManyEntries { limit: u64 },
}

/// Counts of what a layer did, for progress and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
    pub bytes: u64,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// The path of an archive entry, relative and normalized; `None` for the root itself.
fn clean_relative(raw: &[u8], entry: &str) -> Result<Option<PathBuf>, UnpackError> {
    let path = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::Absolute {
                    entry: entry.to_string(),
                })
            }
            Component::ParentDir => {
                return Err(UnpackError::Traversal {
                    entry: entry.to_string(),
                })
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Applies layers to one root directory.
pub struct LayerApplier {
    root: PathBuf,
    /// Entries all layers applied by this applier may have together.
    entry_budget: u64,
    entries: Cell<u64>,
}

/// File contents are copied through a buffer this big (few large writes, not many small).
const COPY_BUFFER: usize = 256 << 10;

fn io_err(entry: &str) -> impl Fn(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        entry: entry.to_string(),
        source,
    }
}

/// A uid or gid of a tar header as the system call takes it: the low 32 bits, as a C
/// cast would give them; all ones means "leave it" to `lchown`, so it is `None`.
fn owner_id(id: u64) -> Option<u32> {
    Some(id as u32).filter(|id| *id != u32::MAX)
}

/// Copies all of `from` into `to` through `buffer`: one write per buffer-full.
fn copy_with(from: &mut impl Read, to: &mut fs::File, buffer: &mut [u8]) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            match from.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        to.write_all(&buffer[..filled])?;
        total += filled as u64;
    }
}

/// Removes whatever is at `path` without following a symlink there.
fn remove_existing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl LayerApplier {
    pub fn new(root: &Path) -> LayerApplier {
        LayerApplier {
            root: root.to_path_buf(),
            entry_budget: u64::MAX,
            entries: Cell::new(0),
        }
    }

    /// Refuses an image whose layers have more than `limit` entries together.
    pub fn set_entry_budget(&mut self, limit: u64) {
        self.entry_budget = limit;
    }

    /// Walks `rel`'s directories from the root, refusing symlinks; creates missing ones
    /// when `create` is set. Returns the absolute directory path.
    fn safe_dir(
        &self,
        rel: &Path,
        entry: &str,
        create: bool,
        created: &mut HashSet<PathBuf>,
    ) -> Result<PathBuf, UnpackError> {
        let mut cur = self.root.clone();
        let mut cur_rel = PathBuf::new();
        for c in rel.components() {
            cur.push(c);
            cur_rel.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(UnpackError::ThroughSymlink {
                        entry: entry.to_string(),
                        link: cur_rel.display().to_string(),
                    })
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::NotADirectory {
                        entry: entry.to_string(),
                        path: cur_rel.display().to_string(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&cur).map_err(io_err(entry))?;
                    created.insert(cur_rel.clone());
                }
                Err(e) => return Err(io_err(entry)(e)),
            }
        }
        Ok(cur)
    }

    /// Applies one uncompressed layer tar stream.
    pub fn apply(&self, reader: impl Read) -> Result<LayerStats, UnpackError> {
        let mut archive = tar::Archive::new(reader);
        let mut stats = LayerStats::default();
        // Paths this layer wrote: an opaque whiteout hides only what lower layers put there.
        let mut created: HashSet<PathBuf> = HashSet::new();
        let mut buffer = vec![0u8; COPY_BUFFER];
        for item in archive.entries().map_err(UnpackError::Archive)? {
            let mut e = item.map_err(UnpackError::Archive)?;
            let raw = e.path_bytes().into_owned();
            let name = String::from_utf8_lossy(&raw).into_owned();
            let Some(rel) = clean_relative(&raw, &name)? else {
                continue; // the "./" entry: the root itself
            };
            stats.entries += 1;
            self.entries.set(self.entries.get() + 1);
            if self.entries.get() > self.entry_budget {
                return Err(UnpackError::TooManyEntries {
                    limit: self.entry_budget,
                });
            }
            let file_name = rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();

            if file_name == OPAQUE_WHITEOUT {
                let dir = self.safe_dir(&parent_rel, &name, true, &mut created)?;
                for child in fs::read_dir(&dir).map_err(io_err(&name))? {
                    let child = child.map_err(io_err(&name))?;
                    if !created.contains(&parent_rel.join(child.file_name())) {
                        remove_existing(&child.path()).map_err(io_err(&name))?;
                    }
                }
                stats.whiteouts += 1;
                continue;
            }
            if let Some(target) = file_name.strip_prefix(WHITEOUT_PREFIX) {
                if target.is_empty() || target == "." || target == ".." || target.contains('/') {
                    return Err(UnpackError::BadWhiteout { entry: name });
                }
                let dir = self.safe_dir(&parent_rel, &name, false, &mut created);
                match dir {
                    Ok(dir) => remove_existing(&dir.join(target)).map_err(io_err(&name))?,
                    // Whiting out something below a directory that does not exist: nothing to do.
                    Err(UnpackError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound => {}
                    Err(other) => return Err(other),
                }
                stats.whiteouts += 1;
                continue;
            }

            let dir = self.safe_dir(&parent_rel, &name, true, &mut created)?;
            let path = dir.join(&file_name);
            let header = e.header().clone();
            let mode = header.mode().map_err(io_err(&name))? & 0o7777;
            let uid = header.uid().map_err(io_err(&name))?;
            let gid = header.gid().map_err(io_err(&name))?;
            let kind = header.entry_type();
            match kind {
                EntryType::Directory => match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        fs::remove_file(&path).map_err(io_err(&name))?;
                        fs::create_dir(&path).map_err(io_err(&name))?;
                    }
                    Err(_) => fs::create_dir(&path).map_err(io_err(&name))?,
                },
                EntryType::Regular | EntryType::Continuous => {
                    remove_existing(&path).map_err(io_err(&name))?;
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                        .map_err(io_err(&name))?;
                    stats.bytes += copy_with(&mut e, &mut f, &mut buffer).map_err(io_err(&name))?;
                }
                EntryType::Symlink => {
                    let target = e
                        .link_name_bytes()
                        .map(|b| PathBuf::from(OsStr::from_bytes(&b)))
                        .unwrap_or_default();
                    remove_existing(&path).map_err(io_err(&name))?;
                    symlink(&target, &path).map_err(io_err(&name))?;
                }
                EntryType::Link => {
                    let raw_target = e
                        .link_name_bytes()
                        .map(|b| b.into_owned())
                        .unwrap_or_default();
                    let target_name = String::from_utf8_lossy(&raw_target).into_owned();
                    let bad = || UnpackError::BadLinkTarget {
                        entry: name.clone(),
                        target: target_name.clone(),
                    };
                    let target_rel = clean_relative(&raw_target, &name)?.ok_or_else(bad)?;
                    let target_dir = self.safe_dir(
                        target_rel.parent().unwrap_or(Path::new("")),
                        &name,
                        false,
                        &mut created,
                    )?;
                    let target = target_dir.join(target_rel.file_name().ok_or_else(bad)?);
                    match fs::symlink_metadata(&target) {
                        Ok(m) if !m.is_dir() => {}
                        _ => return Err(bad()),
                    }
                    remove_existing(&path).map_err(io_err(&name))?;
                    fs::hard_link(&target, &path).map_err(io_err(&name))?;
                    created.insert(rel);
                    continue; // a hardlink shares the target's inode: owner and mode are its own
                }
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    remove_existing(&path).map_err(io_err(&name))?;
                    let major = header.device_major().ok().flatten().unwrap_or(0);
                    let minor = header.device_minor().ok().flatten().unwrap_or(0);
                    let file_type = match kind {
                        EntryType::Char => FileType::CharacterDevice,
                        EntryType::Block => FileType::BlockDevice,
                        _ => FileType::Fifo,
                    };
                    // mknod applies the umask, so the mode is set again below with chmod.
                    rustix::fs::mknodat(
                        CWD,
                        &path,
                        file_type,
                        Mode::from_raw_mode(mode),
                        rustix::fs::makedev(major, minor),
                    )
                    .map_err(|e| io_err(&name)(e.into()))?;
                }
                other => {
                    return Err(UnpackError::Unsupported {
                        entry: name,
                        kind: format!("{other:?}"),
                    })
                }
            }
            // Never through a symlink (lchown).
            rustix::fs::chownat(
                CWD,
                &path,
                owner_id(uid).map(Uid::from_raw),
                owner_id(gid).map(Gid::from_raw),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_err(&name)(e.into()))?;
            if kind != EntryType::Symlink {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(io_err(&name))?;
            }
            self.apply_xattrs(&mut e, &path, &name)?;
            if let Ok(mtime) = header.mtime() {
                let at = Timespec {
                    tv_sec: mtime as i64,
                    tv_nsec: 0,
                };
                let times = Timestamps {
                    last_access: at,
                    last_modification: at,
                };
                // Never through a symlink.
                rustix::fs::utimensat(CWD, &path, &times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_err(&name)(e.into()))?;
            }
            created.insert(rel);
        }
        Ok(stats)
    }

    fn apply_xattrs<R: Read>(
        &self,
        e: &mut tar::Entry<'_, R>,
        path: &Path,
        name: &str,
    ) -> Result<(), UnpackError> {
        let Ok(Some(exts)) = e.pax_extensions() else {
            return Ok(());
        };
        for ext in exts {
            let ext = ext.map_err(UnpackError::Archive)?;
            let Ok(key) = ext.key() else { continue };
            let Some(attr) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if attr.contains('\0') {
                continue;
            }
            let value = ext.value_bytes();
            // lsetxattr does not follow symlinks.
            if let Err(err) = rustix::fs::lsetxattr(path, attr, value, XattrFlags::empty()) {
                let err = io::Error::from(err);
                if err.raw_os_error() == Some(libc::ENOTSUP) {
                    warn!(
                        entry = name,
                        attr, "file system does not support this xattr; skipped"
                    );
                } else {
                    return Err(UnpackError::Io {
                        entry: name.to_string(),
                        source: err,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ids_as_the_system_call_takes_them() {
        assert_eq!(owner_id(0), Some(0));
        assert_eq!(owner_id(1000), Some(1000));
        assert_eq!(owner_id(u64::from(u32::MAX)), None);
        assert_eq!(owner_id((1 << 32) + 5), Some(5));
    }

    #[test]
    fn clean_paths() {
        let ok = |s: &str| clean_relative(s.as_bytes(), s).unwrap();
        assert_eq!(ok("./etc/passwd"), Some(PathBuf::from("etc/passwd")));
        assert_eq!(ok("./"), None);
        assert_eq!(ok("a//b/./c"), Some(PathBuf::from("a/b/c")));
        assert!(matches!(
            clean_relative(b"/etc/x", "/etc/x"),
            Err(UnpackError::Absolute { .. })
        ));
        assert!(matches!(
            clean_relative(b"a/../../x", "a/../../x"),
            Err(UnpackError::Traversal { .. })
        ));
    }
}
