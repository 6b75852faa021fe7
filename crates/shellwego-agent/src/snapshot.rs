//! `SnapshotManager`: memory + state + disk snapshots of VMs, with metadata that
//! survives restarts, and restores from them.
//!
//! One directory per snapshot under the manager's root:
//! ```text
//! <root>/<id>/vmstate      Firecracker's microVM state
//!             memory       guest memory (restores map it copy-on-write: many VMs share it)
//!             meta.json    SnapshotMeta, written last and atomically
//! ```
//! A snapshot is valid only if its metadata parses and every file it names exists with
//! the recorded size, and the state file has the recorded sha256. On open the manager
//! rebuilds its index from disk; anything partial or corrupt is reported in `problems()`
//! and never loaded.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::vmm::driver::{self, DriverError, FirecrackerApi};
use crate::vmm::jail::VmLimits;
use crate::vmm::models::{
    DriveUpdate, MemoryBackend, MemoryBackendType, NetworkOverride, SnapshotCreate, SnapshotLoad,
    SnapshotType, VmState,
};
use crate::vmm::{collect_output, BareSpawn, MicrovmConfig, VmmError, VmmManager};
use shellwego_storage::ZfsManager;

const STATE_FILE: &str = "vmstate";
const MEM_FILE: &str = "memory";
const META_FILE: &str = "meta.json";

/// What a snapshot is, as recorded in its `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    /// The VM it was taken of.
    pub source_vm: String,
    pub app: Option<String>,
    pub version: Option<String>,
    pub firecracker_version: String,
    pub kernel: String,
    /// The source VM's configuration (machine, drives, NIC, vsock).
    pub vm_config: MicrovmConfig,
    pub state_file: String,
    pub mem_file: String,
    pub state_size: u64,
    pub mem_size: u64,
    pub state_sha256: String,
    /// The ZFS snapshot of the VM's disk taken in the same pause, if it has one.
    pub disk_snapshot: Option<String>,
    /// Seconds since the epoch.
    pub created_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("snapshot {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {id} is not usable: {reason}")]
    Invalid { id: String, reason: String },
    #[error("no snapshot {0}")]
    NotFound(String),
    #[error("snapshot {0} exists already")]
    Exists(String),
    #[error("invalid snapshot id {0:?}: use letters, digits, '-' and '_'")]
    BadId(String),
    #[error("disk snapshot {name}: {source}")]
    Zfs {
        name: String,
        #[source]
        source: shellwego_storage::ZfsError,
    },
}

fn io(id: &str, what: &str) -> impl Fn(std::io::Error) -> SnapshotError {
    let (id, what) = (id.to_string(), what.to_string());
    move |source| SnapshotError::Io {
        id: id.clone(),
        what: what.clone(),
        source,
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn check_id(id: &str) -> Result<(), SnapshotError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadId(id.to_string()))
    }
}

/// Where a restored VM's own pieces are.
#[derive(Debug, Clone, Default)]
pub struct RestoreTarget {
    /// Network namespace for the new firecracker process.
    pub netns: Option<PathBuf>,
    /// The new VM's TAP for `eth0` (Firecracker's `network_overrides`).
    pub tap: Option<String>,
    /// Symlinks in the new VM's runtime dir: relative drive paths recorded in the snapshot
    /// resolve through them to the new VM's own disk.
    pub links: Vec<(String, PathBuf)>,
    /// Drives to re-announce after the load (`PATCH /drives`), so the guest sees the size
    /// of the file now behind them.
    pub refresh_drives: Vec<String>,
    /// CPU the new VM may use, in thousandths of a core (`None`: all its vCPUs).
    pub cpu_milli: Option<u64>,
}

impl RestoreTarget {
    /// A VM whose root disk is `disk_image`: templates and snapshots name it `rootfs`,
    /// relative to the VM's runtime dir.
    pub fn with_root_disk(disk_image: &Path) -> RestoreTarget {
        RestoreTarget {
            links: vec![("rootfs".into(), disk_image.to_path_buf())],
            ..RestoreTarget::default()
        }
    }
}

/// Snapshots under one directory.
pub struct SnapshotManager {
    root: PathBuf,
    index: BTreeMap<String, SnapshotMeta>,
    problems: Vec<(String, String)>,
}

/// Validates one snapshot directory's files against its metadata.
fn validate(dir: &Path, id: &str) -> Result<SnapshotMeta, String> {
    let bytes = std::fs::read(dir.join(META_FILE))
        .map_err(|e| format!("no readable {META_FILE} ({e}): incomplete snapshot"))?;
    let meta: SnapshotMeta =
        serde_json::from_slice(&bytes).map_err(|e| format!("{META_FILE} does not parse: {e}"))?;
    if meta.id != id {
        return Err(format!("{META_FILE} names snapshot {:?}", meta.id));
    }
    for (file, size) in [
        (&meta.state_file, meta.state_size),
        (&meta.mem_file, meta.mem_size),
    ] {
        let len = std::fs::metadata(dir.join(file))
            .map_err(|e| format!("{file}: {e}"))?
            .len();
        if len != size {
            return Err(format!("{file} has {len} bytes, metadata says {size}"));
        }
    }
    let sha = sha256_file(&dir.join(&meta.state_file))
        .map_err(|e| format!("{}: {e}", meta.state_file))?;
    if sha != meta.state_sha256 {
        return Err(format!(
            "{} has sha256 {sha}, metadata says {}",
            meta.state_file, meta.state_sha256
        ));
    }
    Ok(meta)
}

impl SnapshotManager {
    /// Opens the directory (made private to root: a memory file holds whatever the
    /// guest had in RAM) and rebuilds the index from what is on disk.
    pub fn open(root: &Path) -> Result<SnapshotManager, SnapshotError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(root).map_err(io("-", "creating snapshot dir"))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io("-", "making the snapshot dir private"))?;
        let mut mgr = SnapshotManager {
            root: root.to_path_buf(),
            index: BTreeMap::new(),
            problems: Vec::new(),
        };
        mgr.rescan()?;
        Ok(mgr)
    }

    /// Re-reads every snapshot directory.
    pub fn rescan(&mut self) -> Result<(), SnapshotError> {
        self.index.clear();
        self.problems.clear();
        for entry in std::fs::read_dir(&self.root).map_err(io("-", "reading snapshot dir"))? {
            let entry = entry.map_err(io("-", "reading snapshot dir"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || name.ends_with(".tmp") {
                continue;
            }
            match validate(&entry.path(), &name) {
                Ok(meta) => {
                    self.index.insert(name, meta);
                }
                Err(reason) => {
                    warn!(snapshot = %name, %reason, "snapshot not usable");
                    self.problems.push((name, reason));
                }
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<&SnapshotMeta> {
        self.index.values().collect()
    }

    pub fn get(&self, id: &str) -> Option<&SnapshotMeta> {
        self.index.get(id)
    }

    /// Snapshots found on disk that are partial or corrupt: (id, reason).
    pub fn problems(&self) -> &[(String, String)] {
        &self.problems
    }

    pub fn dir_of(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Takes a full snapshot of a running VM: pause, `PUT /snapshot/create`, the disk's
    /// ZFS snapshot inside the same pause, and resume on every path (also when a step
    /// fails). `resume` false leaves the VM paused (templates are snapshotted and dropped).
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &mut self,
        vmm: &VmmManager,
        id: &str,
        cfg: &MicrovmConfig,
        labels: (Option<String>, Option<String>),
        disk: Option<(&ZfsManager, &str)>,
        firecracker: &Path,
        resume: bool,
    ) -> Result<SnapshotMeta, SnapshotError> {
        check_id(id)?;
        let final_dir = self.root.join(id);
        if final_dir.exists() {
            return Err(SnapshotError::Exists(id.to_string()));
        }
        let tmp_dir = self.root.join(format!("{id}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir).map_err(io(id, "creating snapshot dir"))?;
        let api = vmm.api_of(&cfg.vm_id).await?;
        let taken = take(vmm, &api, &cfg.vm_id, id, &tmp_dir, disk).await;
        let resumed = if resume {
            api.set_state(VmState::Resumed).await
        } else {
            Ok(())
        };
        let disk_snapshot = match taken {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp_dir);
                return Err(e);
            }
        };
        resumed?;
        let state_path = tmp_dir.join(STATE_FILE);
        let meta = SnapshotMeta {
            id: id.to_string(),
            source_vm: cfg.vm_id.clone(),
            app: labels.0,
            version: labels.1,
            firecracker_version: driver::binary_version(firecracker).unwrap_or_default(),
            kernel: cfg.boot.kernel_image_path.clone(),
            vm_config: cfg.clone(),
            state_file: STATE_FILE.into(),
            mem_file: MEM_FILE.into(),
            state_size: std::fs::metadata(&state_path)
                .map_err(io(id, "state file"))?
                .len(),
            mem_size: std::fs::metadata(tmp_dir.join(MEM_FILE))
                .map_err(io(id, "memory file"))?
                .len(),
            state_sha256: sha256_file(&state_path).map_err(io(id, "hashing state"))?,
            disk_snapshot,
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| io(id, "encoding metadata")(std::io::Error::other(e)))?;
        shellwego_sys::atomic::write_file(&tmp_dir.join(META_FILE), &json)
            .map_err(io(id, "writing metadata"))?;
        std::fs::rename(&tmp_dir, &final_dir).map_err(io(id, "publishing snapshot"))?;
        shellwego_sys::atomic::sync_dir(&self.root).map_err(io(id, "syncing snapshot dir"))?;
        self.index.insert(id.to_string(), meta.clone());
        Ok(meta)
    }

    /// Restores a snapshot into a new firecracker process for `vm_id` and resumes it.
    /// The memory file is mapped copy-on-write, so many VMs can come from one snapshot.
    pub async fn restore(
        &self,
        vmm: &VmmManager,
        id: &str,
        vm_id: &str,
        target: &RestoreTarget,
    ) -> Result<FirecrackerApi, SnapshotError> {
        let meta = self
            .index
            .get(id)
            .ok_or_else(|| SnapshotError::NotFound(id.to_string()))?;
        let dir = self.root.join(id);
        // Refuse a snapshot whose files changed since the index was built.
        validate(&dir, id).map_err(|reason| SnapshotError::Invalid {
            id: id.to_string(),
            reason,
        })?;
        let (state, mem) = (dir.join(&meta.state_file), dir.join(&meta.mem_file));
        let bare = BareSpawn {
            netns: target.netns.clone(),
            links: target.links.clone(),
            inputs: vec![
                (STATE_FILE.to_string(), state.clone()),
                (MEM_FILE.to_string(), mem.clone()),
            ],
            taps: target.tap.iter().cloned().collect(),
            limits: VmLimits {
                cpu_milli: target.cpu_milli,
                ..meta.vm_config.limits()
            },
        };
        let api = vmm.spawn_bare(vm_id, &bare).await?;
        let load = SnapshotLoad {
            snapshot_path: vmm.path_in_vm(STATE_FILE, &state),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: vmm.path_in_vm(MEM_FILE, &mem),
            },
            enable_diff_snapshots: false,
            resume_vm: true,
            network_overrides: target
                .tap
                .iter()
                .flat_map(|tap| {
                    meta.vm_config.network.iter().map(move |n| NetworkOverride {
                        iface_id: n.iface_id.clone(),
                        host_dev_name: tap.clone(),
                    })
                })
                .collect(),
        };
        let loaded = async {
            api.snapshot_load(&load).await?;
            for drive in &target.refresh_drives {
                let path = meta
                    .vm_config
                    .drives
                    .iter()
                    .find(|d| &d.drive_id == drive)
                    .map(|d| d.path_on_host.clone());
                api.patch_drive(&DriveUpdate {
                    drive_id: drive.clone(),
                    path_on_host: path,
                    rate_limiter: None,
                })
                .await?;
            }
            Ok::<(), DriverError>(())
        }
        .await;
        if let Err(e) = loaded {
            let _ = vmm.remove(vm_id).await;
            return Err(e.into());
        }
        Ok(api)
    }

    /// Deletes a snapshot's files and its disk snapshot. Deleting what is gone is fine.
    pub fn delete(&mut self, id: &str, zfs: Option<&ZfsManager>) -> Result<(), SnapshotError> {
        check_id(id)?;
        let disk = self.index.remove(id).and_then(|m| m.disk_snapshot);
        if let (Some(name), Some(zfs)) = (disk, zfs) {
            zfs.destroy(&name)
                .map_err(|source| SnapshotError::Zfs { name, source })?;
        }
        match std::fs::remove_dir_all(self.root.join(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(id, "removing files")(e)),
        }
        self.problems.retain(|(p, _)| p != id);
        Ok(())
    }

    /// Records that the snapshot's disk snapshot is now `name` (it was moved, see
    /// `RootfsBuilder::keep_snapshot`), rewriting its metadata atomically.
    pub fn set_disk_snapshot(&mut self, id: &str, name: &str) -> Result<(), SnapshotError> {
        let mut meta = self
            .index
            .get(id)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound(id.to_string()))?;
        meta.disk_snapshot = Some(name.to_string());
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| io(id, "encoding metadata")(std::io::Error::other(e)))?;
        shellwego_sys::atomic::write_file(&self.root.join(id).join(META_FILE), &json)
            .map_err(io(id, "writing metadata"))?;
        self.index.insert(id.to_string(), meta);
        Ok(())
    }

    /// Sizes of a snapshot's files (state, memory) in bytes.
    pub fn sizes(&self, id: &str) -> Option<(u64, u64)> {
        self.index.get(id).map(|m| (m.state_size, m.mem_size))
    }
}

/// Pause, write the state and memory (into `dir`, root-only), snapshot the disk. Leaves
/// the VM paused.
async fn take(
    vmm: &VmmManager,
    api: &FirecrackerApi,
    vm_id: &str,
    id: &str,
    dir: &Path,
    disk: Option<(&ZfsManager, &str)>,
) -> Result<Option<String>, SnapshotError> {
    api.set_state(VmState::Paused).await?;
    // Names apart from the inputs a restored VM has in its jail (`vmstate`, `memory`).
    let (state, state_out) = vmm.output_path(vm_id, "new-vmstate", &dir.join(STATE_FILE));
    let (mem, mem_out) = vmm.output_path(vm_id, "new-memory", &dir.join(MEM_FILE));
    api.snapshot_create(&SnapshotCreate {
        snapshot_type: SnapshotType::Full,
        snapshot_path: state,
        mem_file_path: mem,
    })
    .await?;
    for (out, name) in [(state_out, STATE_FILE), (mem_out, MEM_FILE)] {
        collect_output(&out, &dir.join(name))
            .map_err(io(id, "collecting the VM's snapshot files"))?;
    }
    match disk {
        None => Ok(None),
        Some((zfs, dataset)) => {
            let name = format!("{dataset}@{id}");
            zfs.snapshot(&name).map_err(|source| SnapshotError::Zfs {
                name: name.clone(),
                source,
            })?;
            Ok(Some(name))
        }
    }
}

/// How long to wait for a restored guest to answer, by host kind.
pub fn restore_answer_budget(kind: crate::host::HostKind) -> Duration {
    Duration::from_secs(5) * kind.time_factor().min(6)
}
