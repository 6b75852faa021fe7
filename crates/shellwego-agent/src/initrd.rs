//! The guest's initramfs: a newc cpio archive holding the init as `/init` and the empty
//! directories it mounts on. The app image is never touched: the init switches into the
//! app's root drive at `run`.

use std::io;
use std::path::Path;

/// One entry of the archive.
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
}

fn header(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, size: usize) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        size as u32,
        0,
        0,
        0,
        0,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir(name) => header(&mut out, ino, name, 0o040_755, 0),
            Entry::File(name, data, mode) => {
                header(&mut out, ino, name, 0o100_000 | mode, data.len());
                out.extend_from_slice(data);
                while out.len() % 4 != 0 {
                    out.push(0);
                }
            }
        }
    }
    header(&mut out, 0, "TRAILER!!!", 0, 0);
    out
}

/// The initramfs bytes for an init binary.
pub fn build(init: &[u8]) -> Vec<u8> {
    archive(&[
        Entry::Dir("dev"),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("tmp"),
        Entry::Dir("run"),
        Entry::Dir("mnt"),
        Entry::File("init", init, 0o755),
    ])
}

/// Writes the initramfs for the init binary at `init` to `out`.
pub fn write(init: &Path, out: &Path) -> io::Result<()> {
    let bytes = std::fs::read(init)?;
    std::fs::write(out, build(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_lists_what_we_put_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd.cpio");
        std::fs::write(&path, build(b"#!/bin/true\n")).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&path)
            .output()
            .expect("cpio (apt-get install cpio)");
        let listed = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = listed.lines().collect();
        assert_eq!(
            names,
            vec!["dev", "proc", "sys", "tmp", "run", "mnt", "init"]
        );
    }
}
