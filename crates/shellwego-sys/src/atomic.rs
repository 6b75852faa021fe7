//! Atomic file replacement: write a temp file, fsync it, rename it over the target, fsync
//! the directory. A reader sees the old content or the new, never a mix, and after a crash
//! the file is one or the other.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes`. The temp file (`.<name>.tmp.<pid>` next to it) is removed
/// again when anything fails. The file gets the default mode (0666 less the umask).
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes the directory's entries durable (a rename, a link or a new file in it). An empty
/// path is the current directory, as `Path::parent` returns for a bare file name.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_file(&path, b"one").unwrap();
        write_file(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("x"), b"x").unwrap();
        // Renaming a file over a non-empty directory fails.
        assert!(write_file(&path, b"new").is_err());
        assert!(path.join("x").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_file(Path::new("/"), b"x").is_err());
    }
}
