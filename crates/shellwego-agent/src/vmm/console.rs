//! The guest console log. Firecracker appends the guest's serial output to
//! `console.log` (opened O_APPEND, so it never blocks on a reader and survives an agent
//! restart); the agent keeps it under a size cap by moving the full file to
//! `console.log.1` and truncating, so at most about twice the cap is kept.
//!
//! Readers follow it by byte offset in `console.log` (`read_from`), so `logs --follow`
//! sends only what was appended since its last read.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
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
    tail_and_end(path, max_lines).0
}

/// The last `max_lines` lines of the console and the offset in `console.log` they end
/// at: where `read_from` continues without repeating or missing a byte.
pub fn tail_and_end(path: &Path, max_lines: usize) -> (String, u64) {
    let mut text = fs::read(rotated(path)).unwrap_or_default();
    let current = fs::read(path).unwrap_or_default();
    let end = current.len() as u64;
    text.extend(current);
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    (
        lines[lines.len().saturating_sub(max_lines)..].join("\n"),
        end,
    )
}

/// What `read_from` read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleChunk {
    /// The output appended since the offset (invalid UTF-8 replaced). It ends at a whole
    /// character: a character the guest has written only part of is left for the next
    /// read.
    pub text: String,
    /// Where the next read continues (an offset in `console.log`).
    pub next: u64,
    /// The log was rotated since the offset: `text` is the rest of the rotated copy
    /// (`console.log.1`) after the offset, then `console.log` from its start.
    pub rotated: bool,
    /// Output between the offset and `text` is missing: the rest of the rotated copy was
    /// over `max_bytes`, or the copy is gone (rotated again).
    pub gap: bool,
}

/// The output appended to the console log at `path` since byte `offset` of it, at most
/// `max_bytes` (at least 4) of it; read again from `next` for more.
///
/// `console.log` shorter than `offset` means it was rotated (see `enforce_cap`) since:
/// the read then continues in the rotated copy from `offset`, and goes on in the new
/// `console.log` from its start. A log rotated and grown past `offset` again between two
/// reads cannot be told from one that was not (the file has no generation); reads a few
/// seconds apart of a log capped at megabytes do not meet that.
pub fn read_from(path: &Path, offset: u64, max_bytes: usize) -> io::Result<ConsoleChunk> {
    let max = max_bytes.max(4) as u64;
    let len = file_len(path)?;
    if offset <= len {
        let bytes = read_range(path, offset, (len - offset).min(max))?;
        let whole = whole_chars_len(&bytes);
        return Ok(ConsoleChunk {
            text: String::from_utf8_lossy(&bytes[..whole]).into_owned(),
            next: offset + whole as u64,
            rotated: false,
            gap: false,
        });
    }
    let old = rotated(path);
    let old_len = file_len(&old)?;
    let (bytes, gap) = if old_len >= offset {
        let rest = old_len - offset;
        (read_range(&old, offset, rest.min(max))?, rest > max)
    } else {
        (Vec::new(), true)
    };
    let budget = max - bytes.len() as u64;
    let new = read_range(path, 0, len.min(budget))?;
    let whole = whole_chars_len(&new);
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    text.push_str(&String::from_utf8_lossy(&new[..whole]));
    Ok(ConsoleChunk {
        text,
        next: whole as u64,
        rotated: true,
        gap,
    })
}

/// The file's length; a missing file is empty (the VM has written nothing yet).
fn file_len(path: &Path) -> io::Result<u64> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// At most `n` bytes of the file from `offset` (fewer if it ends first).
fn read_range(path: &Path, offset: u64, n: u64) -> io::Result<Vec<u8>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    f.take(n).read_to_end(&mut out)?;
    Ok(out)
}

/// The length of `b` without a UTF-8 sequence cut off at its end (at most 3 bytes).
fn whole_chars_len(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let i = b.len() - back;
        let needs = match b[i] {
            0x80..=0xBF => continue, // a continuation byte: look further back
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if needs > back { i } else { b.len() };
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn appender(log: &Path) -> fs::File {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap()
    }

    #[test]
    fn caps_and_tails() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut writer = appender(&log);
        for i in 0..100 {
            writeln!(writer, "line {i}").unwrap();
        }
        assert!(enforce_cap(&log, 100).unwrap());
        writeln!(writer, "after").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "after\n");
        assert!(tail(&log, 2).ends_with("line 99\nafter"));
        assert_eq!(tail_and_end(&log, 2).1, 6);
        assert!(!enforce_cap(&log, 100).unwrap());
    }

    #[test]
    fn tc_u14_console_reads_only_what_was_appended() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let none = read_from(&log, 0, 1024).unwrap();
        assert_eq!((none.text.as_str(), none.next), ("", 0), "no log yet");
        let mut writer = appender(&log);
        write!(writer, "boot\nready\n").unwrap();
        let (tail, end) = tail_and_end(&log, 200);
        assert_eq!((tail.as_str(), end), ("boot\nready", 11));
        assert_eq!(read_from(&log, end, 1024).unwrap().text, "", "nothing new");
        writeln!(writer, "request 1").unwrap();
        let c = read_from(&log, end, 1024).unwrap();
        assert_eq!((c.text.as_str(), c.next), ("request 1\n", 21));
        assert!(!c.rotated && !c.gap);

        // At most max_bytes at a time; the next read goes on where this one stopped.
        write!(writer, "0123456789").unwrap();
        let a = read_from(&log, c.next, 4).unwrap();
        let b = read_from(&log, a.next, 100).unwrap();
        assert_eq!((a.text.as_str(), b.text.as_str()), ("0123", "456789"));
        assert_eq!(b.next, 31);
    }

    #[test]
    fn tc_u14_console_never_splits_a_character() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut writer = appender(&log);
        // "é" is 2 bytes, "€" 3, "🦀" 4: a guest may be stopped half way through one.
        writer.write_all("aé€🦀".as_bytes()).unwrap();
        writer.write_all(&"🦀".as_bytes()[..2]).unwrap();
        let mut text = String::new();
        let mut next = 0;
        for _ in 0..10 {
            let c = read_from(&log, next, 4).unwrap();
            text.push_str(&c.text);
            next = c.next;
        }
        assert_eq!(text, "aé€🦀", "the half crab waits");
        writer.write_all(&"🦀".as_bytes()[2..]).unwrap();
        assert_eq!(read_from(&log, next, 4).unwrap().text, "🦀");
    }

    #[test]
    fn tc_u14_console_follows_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut writer = appender(&log);
        for i in 0..10 {
            writeln!(writer, "line {i}").unwrap();
        }
        let seen = read_from(&log, 0, 1 << 20).unwrap().next;
        writeln!(writer, "line 10").unwrap();
        assert!(enforce_cap(&log, 50).unwrap());
        writeln!(writer, "after").unwrap();
        // The rest of the rotated copy, then the new log from its start.
        let c = read_from(&log, seen, 1 << 20).unwrap();
        assert_eq!(c.text, "line 10\nafter\n");
        assert_eq!(c.next, 6);
        assert!(c.rotated && !c.gap);
        assert_eq!(read_from(&log, c.next, 1 << 20).unwrap().text, "");

        // The rotated copy's rest over max_bytes: what fits, and a gap is reported.
        let c = read_from(&log, 20, 8).unwrap();
        assert!(c.rotated && c.gap);
        assert_eq!(c.text.len(), 8);
        assert_eq!(c.next, 0, "the new log is read from its start next");

        // The copy is gone (rotated again since): a gap, then the new log.
        fs::remove_file(rotated(&log)).unwrap();
        let c = read_from(&log, seen, 1 << 20).unwrap();
        assert_eq!((c.text.as_str(), c.next), ("after\n", 6));
        assert!(c.rotated && c.gap);
    }
}
