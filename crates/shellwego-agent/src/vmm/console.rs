//! The guest console log. Firecracker appends the guest's serial output to
//! `console.log` (opened O_APPEND, so it never blocks on a reader and survives an agent
//! restart); the agent keeps it under a size cap by moving the full file to
//! `console.log.1` and truncating, so at most about twice the cap is kept.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Default cap of one console log file.
pub const DEFAULT_CAP: u64 = 4 << 20;

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// Rotates `path` if it is larger than `cap`. Returns true if it rotated.
pub fn enforce_cap(path: &Path, cap: u64) -> io::Result<bool> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(false);
    }
    fs::copy(path, rotated(path))?;
    // The writer holds the file with O_APPEND: after truncation it writes at the new end.
    fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The last `max_lines` lines of the console (from the rotated file too if needed).
pub fn tail(path: &Path, max_lines: usize) -> String {
    let mut text = fs::read(rotated(path)).unwrap_or_default();
    text.extend(fs::read(path).unwrap_or_default());
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn caps_and_tails() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut writer = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        for i in 0..100 {
            writeln!(writer, "line {i}").unwrap();
        }
        assert!(enforce_cap(&log, 100).unwrap());
        writeln!(writer, "after").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "after\n");
        assert!(tail(&log, 2).ends_with("line 99\nafter"));
        assert!(!enforce_cap(&log, 100).unwrap());
    }
}
