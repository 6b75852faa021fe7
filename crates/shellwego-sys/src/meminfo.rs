//! Host memory from `/proc/meminfo` (parsed by `procfs`).

use std::io;

/// `MemTotal`, in bytes.
pub fn mem_total() -> io::Result<u64> {
    use procfs::Current;
    procfs::Meminfo::current()
        .map(|m| m.mem_total)
        .map_err(|e| io::Error::other(format!("/proc/meminfo: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn mem_total_is_bytes() {
        // Every host that runs these tests has more than 64 MiB and less than 64 TiB.
        let total = super::mem_total().unwrap();
        assert!(total > 64 << 20 && total < 64 << 40, "{total}");
    }
}
