//! Firecracker's jailer, as every VM runs by default: its own chroot, its own
//! unprivileged uid, a new PID namespace, and its own cgroup with the VM's limits.
//!
//! ```text
//! <chroot_base>/firecracker/<vm_id>/vm.json     the agent's record (root-only, outside the jail)
//!                                  /console.log  the guest console (root-only, outside)
//!                                  /root/        the chroot, owned by the VM's uid:
//!                                      api.sock, vsock.sock, firecracker.log, metrics.json,
//!                                      vmlinux, initrd, rootfs, vmstate, memory (placed files)
//! ```
//!
//! **One uid per VM** from a reserved range, all sharing one group. A firecracker that a
//! guest took over can then signal, trace or read nothing of another VM's, even where a
//! file of it were visible; the chroot and PID namespace already hide them. The shared
//! group is what lets many VMs map one template's memory file: read-only inputs (kernel,
//! initramfs, snapshot state and memory) are `root:<group>` 0640, a VM's own files
//! (its disk, log, metrics) are its uid's, 0600.
//!
//! Files reach the chroot as hard links where they share its file system, else as bind
//! mounts made before the jailer starts (a mount made later would not show in the jail's
//! own mount namespace).
//!
//! Pure parts (cgroup arguments, the uid pool) are apart from the file work, and tested.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Guest memory plus this much is the VM's memory limit: Firecracker's own heap, thread
/// stacks and API buffers stay well under it (measured: 5–12 MiB resident beyond the guest).
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// Tasks one firecracker may have: main, API and one per vCPU, with room to spare.
pub const PIDS_MAX: u32 = 64;
/// The cgroup (under each hierarchy's root) the VMs' cgroups are made in.
pub const PARENT_CGROUP: &str = "shellwego";
/// CFS period for `cpu.max` / `cpu.cfs_period_us`.
const CPU_PERIOD_US: u64 = 100_000;

/// Where the uids VMs run as come from: `base + 1 ..= base + count`; `base` itself is the
/// group every VM process shares. Chosen above the ranges systemd hands to containers
/// (up to 1879048191) and below 2^31, so no login user or container owns them.
pub const DEFAULT_UID_BASE: u32 = 1_990_000_000;
pub const DEFAULT_UID_COUNT: u32 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("no free VM uid: all {0} of the reserved range are in use")]
    NoFreeUid(u32),
    #[error(
        "no usable cgroups: {0}. VMs need the cpu, memory and pids controllers \
         (cgroup v2 at /sys/fs/cgroup, or v1 hierarchies mounted for each)"
    )]
    NoCgroups(String),
}

/// How this host jails its VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    pub jailer: PathBuf,
    /// Where the chroots are made: `<chroot_base>/<exec name>/<vm_id>/root`.
    pub chroot_base: PathBuf,
    /// The firecracker binary's file name (the jailer names the chroot's parent by it).
    pub exec_name: String,
    pub cgroups: CgroupVersion,
    /// Whether the host has an I/O weight to set.
    pub io_weight: bool,
    pub uid_base: u32,
    pub uid_count: u32,
}

impl Jail {
    /// A jail with this host's cgroup version and the default uid range.
    pub fn new(jailer: &Path, chroot_base: &Path) -> Result<Jail, JailError> {
        let cgroups = CgroupVersion::detect()?;
        Ok(Jail {
            jailer: jailer.to_path_buf(),
            chroot_base: chroot_base.to_path_buf(),
            exec_name: "firecracker".into(),
            cgroups,
            io_weight: host_has_io_weight(cgroups),
            uid_base: DEFAULT_UID_BASE,
            uid_count: DEFAULT_UID_COUNT,
        })
    }

    /// The directory of a VM's jail: the agent's own files and the chroot (`root`).
    pub fn home_of(&self, vm_id: &str) -> PathBuf {
        self.chroot_base.join(&self.exec_name).join(vm_id)
    }

    /// The chroot (= runtime dir) of a VM.
    pub fn root_of(&self, vm_id: &str) -> PathBuf {
        self.home_of(vm_id).join("root")
    }

    /// The group all VM processes share.
    pub fn gid(&self) -> u32 {
        self.uid_base
    }
}

/// Which cgroup interface the host offers (the jailer speaks both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    /// v2 where `/sys/fs/cgroup` is a unified hierarchy with cpu, memory and pids; else v1
    /// where all three are mounted as v1 hierarchies (`/proc/mounts`).
    pub fn detect() -> Result<CgroupVersion, JailError> {
        let controllers =
            std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        Self::choose(&controllers, &mounts)
    }

    /// The decision of [`detect`](Self::detect), from the unified root's
    /// `cgroup.controllers` and `/proc/mounts`.
    pub fn choose(controllers_v2: &str, mounts: &str) -> Result<CgroupVersion, JailError> {
        const NEEDED: [&str; 3] = ["cpu", "memory", "pids"];
        let v2: Vec<&str> = controllers_v2.split_whitespace().collect();
        if NEEDED.iter().all(|c| v2.contains(c)) {
            return Ok(CgroupVersion::V2);
        }
        let hierarchies = v1_hierarchies(mounts);
        let v1: Vec<&str> = hierarchies
            .iter()
            .flat_map(|(_, opts)| opts.split(','))
            .collect();
        let missing: Vec<&str> = NEEDED.into_iter().filter(|c| !v1.contains(c)).collect();
        if missing.is_empty() {
            Ok(CgroupVersion::V1)
        } else {
            Err(JailError::NoCgroups(format!(
                "not in cgroup v2 and no v1 hierarchy for {}",
                missing.join(", ")
            )))
        }
    }

    pub fn number(self) -> u8 {
        match self {
            CgroupVersion::V1 => 1,
            CgroupVersion::V2 => 2,
        }
    }
}

/// (mount point, options) of every cgroup v1 hierarchy in `/proc/mounts`.
fn v1_hierarchies(mounts: &str) -> Vec<(String, String)> {
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[2] == "cgroup").then(|| (f[1].to_string(), f[3].to_string()))
        })
        .collect()
}

/// What one VM may use of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// CPU time in thousandths of a core (`500` = half a core); `None`: as many cores as it
    /// has vCPUs, which needs no quota.
    pub cpu_milli: Option<u64>,
    /// Guest memory; the limit adds [`VMM_OVERHEAD_MIB`].
    pub mem_mib: u64,
    /// Relative I/O weight (1–10000, 100 is the default share), where the host has the
    /// controller for it.
    pub io_weight: Option<u16>,
}

/// The jailer's `--cgroup FILE=VALUE` arguments for `limits`. `io` says whether the host
/// has an I/O weight file to write (v2 `io.weight`, v1 `blkio.weight`): many v1 hosts
/// without CFQ/BFQ have neither, and the jailer fails on a file that does not exist.
pub fn cgroup_args(version: CgroupVersion, limits: &VmLimits, io: bool) -> Vec<String> {
    let mem = (limits.mem_mib + VMM_OVERHEAD_MIB) << 20;
    let quota = limits
        .cpu_milli
        .map(|m| (m.max(10) * CPU_PERIOD_US / 1000).max(1000));
    let mut args = Vec::new();
    match version {
        CgroupVersion::V2 => {
            if let Some(q) = quota {
                args.push(format!("cpu.max={q} {CPU_PERIOD_US}"));
            }
            args.push(format!("memory.max={mem}"));
            args.push("memory.swap.max=0".to_string());
            args.push(format!("pids.max={PIDS_MAX}"));
            if let (Some(w), true) = (limits.io_weight, io) {
                args.push(format!("io.weight=default {w}"));
            }
        }
        CgroupVersion::V1 => {
            if let Some(q) = quota {
                args.push(format!("cpu.cfs_period_us={CPU_PERIOD_US}"));
                args.push(format!("cpu.cfs_quota_us={q}"));
            }
            args.push(format!("memory.limit_in_bytes={mem}"));
            args.push(format!("pids.max={PIDS_MAX}"));
            if let (Some(w), true) = (limits.io_weight, io) {
                // v1 weights run 10–1000 where v2's run 1–10000.
                args.push(format!(
                    "blkio.weight={}",
                    (u64::from(w) / 10).clamp(10, 1000)
                ));
            }
        }
    }
    args
}

/// Whether the host has an I/O weight file in the root of its I/O controller.
pub fn host_has_io_weight(version: CgroupVersion) -> bool {
    match version {
        CgroupVersion::V2 => std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "io")),
        CgroupVersion::V1 => {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            v1_hierarchies(&mounts).iter().any(|(mp, opts)| {
                opts.split(',').any(|o| o == "blkio") && Path::new(mp).join("blkio.weight").exists()
            })
        }
    }
}

/// The cgroup directories of VM `id`: one per v1 hierarchy, or the one v2 directory.
pub fn cgroup_dirs(version: CgroupVersion, id: &str) -> Vec<PathBuf> {
    match version {
        CgroupVersion::V2 => vec![Path::new("/sys/fs/cgroup").join(PARENT_CGROUP).join(id)],
        CgroupVersion::V1 => {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            v1_hierarchies(&mounts)
                .into_iter()
                .map(|(mp, _)| Path::new(&mp).join(PARENT_CGROUP).join(id))
                .collect()
        }
    }
}

/// Removes VM `id`'s cgroups (the jailer makes them but never removes them). A cgroup
/// whose last task is still exiting is busy for a moment: retried for up to a second.
pub fn remove_cgroups(version: CgroupVersion, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    for dir in cgroup_dirs(version, id) {
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cgroup busy; retrying");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove cgroup");
                    break;
                }
            }
        }
    }
}

/// The uids of running VMs: each VM gets the lowest free one of the range.
#[derive(Debug, Clone)]
pub struct UidPool {
    base: u32,
    count: u32,
    used: BTreeMap<String, u32>,
}

impl UidPool {
    pub fn new(base: u32, count: u32) -> UidPool {
        UidPool {
            base,
            count,
            used: BTreeMap::new(),
        }
    }

    /// The gid every VM process runs with.
    pub fn gid(&self) -> u32 {
        self.base
    }

    /// The uid of `vm_id`, assigning the lowest free one if it has none yet.
    pub fn assign(&mut self, vm_id: &str) -> Result<u32, JailError> {
        if let Some(uid) = self.used.get(vm_id) {
            return Ok(*uid);
        }
        let taken: std::collections::BTreeSet<u32> = self.used.values().copied().collect();
        let uid = (1..=self.count)
            .map(|i| self.base.saturating_add(i))
            .find(|u| !taken.contains(u))
            .ok_or(JailError::NoFreeUid(self.count))?;
        self.used.insert(vm_id.to_string(), uid);
        Ok(uid)
    }

    /// Records the uid a VM found running already has (after an agent restart).
    pub fn adopt(&mut self, vm_id: &str, uid: u32) {
        self.used.insert(vm_id.to_string(), uid);
    }

    pub fn release(&mut self, vm_id: &str) {
        self.used.remove(vm_id);
    }

    pub fn get(&self, vm_id: &str) -> Option<u32> {
        self.used.get(vm_id).copied()
    }
}

/// How a file placed in a chroot may be used by the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The VM's own file (its disk): owned by its uid, 0600.
    Owned { uid: u32, gid: u32 },
    /// A read-only input many VMs may share (kernel, snapshot files): left to its owner,
    /// readable by the VM group (0640) unless everybody may read it already.
    Shared { gid: u32 },
}

/// Gives `path` the ownership and mode `access` asks for.
pub fn grant(path: &Path, access: Access) -> std::io::Result<()> {
    match access {
        Access::Owned { uid, gid } => {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Access::Shared { gid } => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o004 != 0 {
                return Ok(());
            }
            std::os::unix::fs::chown(path, None, Some(gid))?;
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode((mode & 0o7700) | 0o040),
            )
        }
    }
}

/// Puts `target` at `<root>/<name>` for the VM (see [`Access`]): a hard link where it
/// shares the file system, else a bind mount (the chroot cannot see outside paths or
/// follow symlinks out).
pub fn place(root: &Path, name: &str, target: &Path, access: Access) -> std::io::Result<()> {
    let dest = root.join(name);
    let _ = std::fs::remove_file(&dest);
    let target = std::fs::canonicalize(target)?;
    grant(&target, access)?;
    if std::fs::hard_link(&target, &dest).is_ok() {
        return Ok(());
    }
    std::fs::File::create(&dest)?;
    shellwego_sys::mount::bind(&target, &dest)
}

/// Makes the persistent TAP `tap` owned by `uid`, so the jailed firecracker may open it.
/// With `netns`, in that network namespace (from a thread of its own).
pub fn own_tap(netns: Option<&Path>, tap: &str, uid: u32) -> std::io::Result<()> {
    let tap = tap.to_string();
    let set = move || shellwego_network::tap::create_tap(&tap, uid).map_err(std::io::Error::other);
    match netns {
        None => set(),
        Some(ns) => {
            let file = std::fs::File::open(ns)?;
            std::thread::scope(|s| {
                s.spawn(move || {
                    // This short-lived thread only.
                    shellwego_sys::netns::enter(&file)?;
                    set()
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("TAP owner thread panicked")))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTS: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn the_cgroup_version_follows_what_the_host_mounts() {
        assert!(matches!(
            CgroupVersion::choose("cpuset cpu io memory pids", ""),
            Ok(CgroupVersion::V2)
        ));
        // A hybrid host: the unified hierarchy holds no controllers we need.
        assert!(matches!(
            CgroupVersion::choose("hugetlb", V1_MOUNTS),
            Ok(CgroupVersion::V1)
        ));
        let without_pids = V1_MOUNTS.replace("pids", "freezer");
        match CgroupVersion::choose("", &without_pids) {
            Err(JailError::NoCgroups(why)) => assert!(why.contains("pids"), "{why}"),
            other => panic!("expected NoCgroups, got {other:?}"),
        }
    }

    #[test]
    fn half_a_core_is_half_of_each_period_and_memory_adds_the_vmm_overhead() {
        let limits = VmLimits {
            cpu_milli: Some(500),
            mem_mib: 128,
            io_weight: Some(100),
        };
        let mem = (128 + VMM_OVERHEAD_MIB) << 20;
        assert_eq!(
            cgroup_args(CgroupVersion::V2, &limits, true),
            vec![
                "cpu.max=50000 100000".to_string(),
                format!("memory.max={mem}"),
                "memory.swap.max=0".into(),
                format!("pids.max={PIDS_MAX}"),
                "io.weight=default 100".into(),
            ]
        );
        assert_eq!(
            cgroup_args(CgroupVersion::V1, &limits, false),
            vec![
                "cpu.cfs_period_us=100000".to_string(),
                "cpu.cfs_quota_us=50000".into(),
                format!("memory.limit_in_bytes={mem}"),
                format!("pids.max={PIDS_MAX}"),
            ]
        );
        let two = VmLimits {
            cpu_milli: Some(2000),
            ..limits
        };
        assert!(cgroup_args(CgroupVersion::V2, &two, false)
            .contains(&"cpu.max=200000 100000".to_string()));
        let unlimited = VmLimits {
            cpu_milli: None,
            ..limits
        };
        assert!(!cgroup_args(CgroupVersion::V1, &unlimited, true)
            .iter()
            .any(|a| a.starts_with("cpu.")));
        // The kernel's least quota is 1 ms.
        let tiny = VmLimits {
            cpu_milli: Some(1),
            ..limits
        };
        assert!(cgroup_args(CgroupVersion::V1, &tiny, false)
            .contains(&"cpu.cfs_quota_us=1000".to_string()));
    }

    #[test]
    fn each_vm_gets_the_lowest_free_uid_and_keeps_it() {
        let mut pool = UidPool::new(1000, 3);
        assert_eq!(pool.gid(), 1000);
        assert_eq!(pool.assign("a").unwrap(), 1001);
        assert_eq!(pool.assign("b").unwrap(), 1002);
        assert_eq!(pool.assign("a").unwrap(), 1001, "same VM, same uid");
        pool.adopt("c", 1003);
        assert!(matches!(pool.assign("d"), Err(JailError::NoFreeUid(3))));
        pool.release("a");
        assert_eq!(pool.assign("d").unwrap(), 1001);
        assert_eq!(pool.get("b"), Some(1002));
        assert_eq!(pool.get("a"), None);
    }
}
