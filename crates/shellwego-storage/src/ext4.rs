//! Root disk images: how big an ext4 image a tree needs (bytes and inodes), making it with
//! `mkfs.ext4 -d` on local scratch space, and copying it into its dataset sparsely in large
//! writes.
//!
//! Why build on scratch and copy: `mkfs.ext4 -d` writes the image in many small scattered
//! writes. On kernel ZFS that is cheap; through zfs-fuse every write is a round trip to
//! the daemon, and measured here (3,164 files, 695 MB) it took 11.5 s straight into a
//! dataset against 1.7 s on local disk plus 2.3 s to copy the result in 4 MiB writes. The
//! copy skips holes (`SEEK_DATA`/`SEEK_HOLE`), so the dataset file stays as sparse as mkfs
//! made it.

use rustix::fs::SeekFrom;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Bytes per write when copying an image into its dataset.
const COPY_CHUNK: usize = 4 << 20;

/// What a tree needs in ext4: its allocated bytes (plus an inode, 256 B, per entry) and
/// its number of entries.
pub fn tree_size(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut entries) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            // Allocated blocks, but never less than the length: on a compressing file
            // system (btrfs, ZFS) the allocation is smaller than what ext4 will need.
            bytes += (meta.blocks() * 512).max(meta.len().div_ceil(4096) * 4096) + 256;
            entries += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, entries))
}

/// The size of a base image: content plus a quarter and 64 MiB of headroom, whole MiB.
pub fn base_size(content_bytes: u64) -> u64 {
    let want = content_bytes + content_bytes / 4 + 64 * MIB;
    want.div_ceil(MIB) * MIB
}

/// Inodes for a base image of `entries` entries and `size` bytes: the entries plus a
/// quarter and 4096 for the app's own files, and never fewer than mkfs's default of
/// one per 16 KiB (so a tree of many small files fits, and a large one keeps room).
pub fn base_inodes(entries: u64, size: u64) -> u64 {
    (entries + entries / 4 + 4096).max(size / (16 << 10))
}

/// How long `mkfs.ext4 -d` may take to write a base: the 200,000-file benchmark image takes
/// seconds (docs/BENCHMARKS.md); half an hour leaves room for images at the byte budget on
/// slow disks and still ends a build on a stalled file system.
const MKFS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Makes an ext4 image of `tree` at `image` (a new file): `size` bytes, `inodes` inodes,
/// labelled `rootfs`. The file is new and sparse, so its holes already read as zeros and
/// neither the inode tables nor the journal need writing out (`lazy_*_init`).
pub fn make_ext4(tree: &Path, image: &Path, size: u64, inodes: u64) -> Result<(), String> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "rootfs", "-N"])
        .arg(inodes.to_string())
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            "-d",
        ])
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", size / 1024));
    let out = shellwego_sys::command::output_within(&mut cmd, None, MKFS_TIMEOUT)
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Where `file`'s data (`SeekFrom::Data`) or hole (`SeekFrom::Hole`) starts at or after
/// an offset (`None`: nothing of that kind is left).
fn next_data(file: &fs::File, whence: SeekFrom) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, whence) {
        Ok(at) => Ok(Some(at)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Copies `src` into a new file `dst`, writing only its data extents (holes stay holes),
/// in large writes, and makes it durable. Returns the bytes written.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let from = fs::File::open(src)?;
    let len = from.metadata()?.len();
    // A root disk holds the image's files: root-only, whatever the umask.
    let to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut written = 0;
    let mut pos = 0;
    while pos < len {
        let Some(start) = next_data(&from, SeekFrom::Data(pos))? else {
            break;
        };
        let end = next_data(&from, SeekFrom::Hole(start))?
            .filter(|&e| e > start)
            .unwrap_or(len)
            .min(len);
        let mut at = start;
        while at < end {
            let n = usize::try_from((end - at).min(COPY_CHUNK as u64)).map_err(io::Error::other)?;
            from.read_exact_at(&mut buf[..n], at)?;
            to.write_all_at(&buf[..n], at)?;
            at += n as u64;
            written += n as u64;
        }
        pos = end;
    }
    to.set_len(len)?;
    to.sync_all()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_size_has_headroom() {
        assert_eq!(base_size(0), 64 * MIB);
        assert_eq!(base_size(80 * MIB), 164 * MIB);
        assert_eq!(base_size(1) % MIB, 0);
    }

    #[test]
    fn many_small_files_get_their_inodes() {
        // 200,000 files of one block: mkfs's default (one inode per 16 KiB) would give
        // about 64,000 and fail with "Could not allocate".
        let size = base_size(200_000 * 4096);
        assert!(base_inodes(200_000, size) >= 250_000);
        // A large image with few files keeps mkfs's default ratio.
        assert_eq!(base_inodes(10, 1 << 30), (1 << 30) / (16 << 10));
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = fs::File::create(&src).unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&vec![7u8; 5 << 20], 20 * MIB).unwrap();
        f.write_all_at(b"tail", 64 * MIB - 4).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        let written = copy_sparse(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        assert!(written < 16 * MIB, "holes are not written: {written}");
        let blocks = fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks < 16 * MIB, "the copy is sparse: {blocks}");
    }
}
