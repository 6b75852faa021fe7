//! Admission: whether the host can take one more app. The apps' VMs together may be given
//! at most a configured share of the host's memory (less a reserve for the host itself)
//! and of the pool's size; an app that would pass either is refused at `apply`, with what
//! is short. The arithmetic is pure; `host_capacity` reads the host.

use crate::resources::ResourceSpec;

/// Memory kept for the host (kernel, agent, zfs, page cache) before any VM is admitted.
pub const HOST_RESERVE: u64 = 512 << 20;

/// What the host offers to VMs, after the overcommit ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

impl Capacity {
    /// From the host's memory and the pool's size, with overcommit in percent.
    pub fn of_host(mem_total: u64, pool_size: u64, memory_pct: u32, disk_pct: u32) -> Capacity {
        let share = |bytes: u64, pct: u32| {
            u64::try_from(u128::from(bytes) * u128::from(pct) / 100).unwrap_or(u64::MAX)
        };
        Capacity {
            memory_bytes: share(mem_total.saturating_sub(HOST_RESERVE), memory_pct),
            disk_bytes: share(pool_size, disk_pct),
        }
    }
}

/// The configured overcommit ratios, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overcommit {
    pub memory: u32,
    pub disk: u32,
}

/// Why an app was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not enough {resource} on this host: the app wants {wanted} MiB, other apps have {committed} MiB of the {capacity} MiB that VMs may have ({setting})")]
pub struct Refusal {
    pub resource: &'static str,
    pub wanted: u64,
    pub committed: u64,
    pub capacity: u64,
    pub setting: &'static str,
}

/// Admits `want` next to the apps already admitted (`others`), or says what is short.
pub fn admit(cap: Capacity, others: &[ResourceSpec], want: &ResourceSpec) -> Result<(), Refusal> {
    type Of = fn(&ResourceSpec) -> u64;
    let checks: [(&'static str, Of, u64, &'static str); 2] = [
        (
            "memory",
            |r| r.memory_bytes,
            cap.memory_bytes,
            "memory_overcommit",
        ),
        ("disk", |r| r.disk_bytes, cap.disk_bytes, "disk_overcommit"),
    ];
    for (resource, of, capacity, setting) in checks {
        let committed: u64 = others.iter().map(of).sum();
        if committed + of(want) > capacity {
            return Err(Refusal {
                resource,
                wanted: of(want) >> 20,
                committed: committed >> 20,
                capacity: capacity >> 20,
                setting,
            });
        }
    }
    Ok(())
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn mem_total() -> std::io::Result<u64> {
    shellwego_sys::meminfo::mem_total()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(mem_mib: u64, disk_mib: u64) -> ResourceSpec {
        ResourceSpec {
            cpu_milli: 1000,
            memory_bytes: mem_mib << 20,
            disk_bytes: disk_mib << 20,
        }
    }

    #[test]
    fn admits_until_memory_or_disk_runs_out_and_names_what_is_short() {
        let cap = Capacity::of_host(4608 << 20, 10 << 30, 100, 100);
        assert_eq!(cap.memory_bytes, 4096 << 20);
        let others = vec![res(2048, 1024), res(1024, 1024)];
        assert!(admit(cap, &others, &res(1024, 1024)).is_ok());
        let err = admit(cap, &others, &res(1025, 1024)).unwrap_err();
        assert_eq!(err.resource, "memory");
        let text = err.to_string();
        assert!(
            text.contains("1025 MiB") && text.contains("3072 MiB") && text.contains("4096 MiB"),
            "{text}"
        );
        let err = admit(cap, &others, &res(64, 9000)).unwrap_err();
        assert_eq!(err.resource, "disk");
        assert!(err.to_string().contains("disk_overcommit"));
    }

    #[test]
    fn overcommit_percentages_scale_capacity() {
        let cap = Capacity::of_host((1 << 30) + HOST_RESERVE, 1 << 30, 200, 400);
        assert_eq!(cap.memory_bytes, 2 << 30);
        assert_eq!(cap.disk_bytes, 4 << 30);
    }

    #[test]
    fn reads_mem_total() {
        // In bytes: every host that runs this has more than 64 MiB.
        assert!(mem_total().unwrap() > 64 << 20);
    }
}
