//! Warm starts from pre-booted templates.
//!
//! A template is a VM of one shape (vCPUs, memory) and one set of inputs (kernel, guest
//! init, boot arguments, firecracker), booted once with no app — its init waiting for
//! `run` — and snapshotted. Templates are built on demand and cached under a key hashed
//! from all of that, so a changed kernel or init gets a new template.
//!
//! How clones of one template stay apart (see docs/ARCHITECTURE.md):
//! - **paths**: the template's root drive and vsock socket are *relative* paths
//!   (`rootfs`, `vsock.sock`), which Firecracker resolves in its working directory — the
//!   VM's own runtime dir, where `rootfs` is a symlink to that VM's ZFS clone. No mount
//!   namespace or chroot is needed for this.
//! - **TAP**: `network_overrides` on snapshot load (Firecracker >= 1.12) names the VM's
//!   own TAP.
//! - **disk size**: templates are per disk size too, so a clone's disk has the size the
//!   guest saw at boot; the init drops cached blocks before it mounts.
//! - **identity**: MAC, IP, hostname, clock and entropy come with `run` over vsock.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::guest::{wait_ready, GuestError};
use crate::host::HostKind;
use crate::snapshot::{RestoreTarget, SnapshotError, SnapshotManager, SnapshotMeta};
use crate::vmm::config::{guest_vm_config, GuestLayout, MachineConfig};
use crate::vmm::driver::{self, FirecrackerApi};
use crate::vmm::{VmmError, VmmManager};

/// MAC the template boots with; every VM gets its own at `run`.
const TEMPLATE_MAC: &str = "02:00:00:00:00:01";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("template VM never became ready: {error}\n--- guest console ---\n{console}")]
    NotReady { error: GuestError, console: String },
    #[error("template files at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a template is built from.
#[derive(Debug, Clone)]
pub struct TemplateInputs {
    pub machine: MachineConfig,
    pub kernel: PathBuf,
    pub init: PathBuf,
    pub firecracker: PathBuf,
    pub kind: HostKind,
    /// Size of the root disks of VMs started from it. Part of the key: the guest learns a
    /// disk's size at boot, and a size change after a restore reaches it only through an
    /// asynchronous config-change interrupt, which proved unreliable on emulated hosts.
    pub disk_bytes: u64,
}

fn fingerprint(h: &mut Sha256, path: &Path) {
    // Size and modification time: a rebuilt kernel or init changes both; hashing the
    // 17 MB kernel on every start would cost more than it protects.
    h.update(path.display().to_string().as_bytes());
    if let Ok(m) = std::fs::metadata(path) {
        h.update(m.len().to_le_bytes());
        if let Ok(t) = m.modified() {
            if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                h.update(d.as_nanos().to_le_bytes());
            }
        }
    }
}

impl TemplateInputs {
    /// The cache key: shape, disk size, kernel, init, boot arguments, firecracker version.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update([self.machine.vcpu_count]);
        h.update(self.machine.mem_size_mib.to_le_bytes());
        fingerprint(&mut h, &self.kernel);
        fingerprint(&mut h, &self.init);
        h.update(format!("{:?}", self.kind).as_bytes());
        h.update(self.disk_bytes.to_le_bytes());
        h.update(
            driver::binary_version(&self.firecracker)
                .unwrap_or_default()
                .as_bytes(),
        );
        format!("tpl-{}", &hex::encode(h.finalize())[..16])
    }
}

/// Templates under `<root>`: snapshots in `<root>/snapshots`, initramfs and placeholder.
pub struct TemplateStore {
    root: PathBuf,
    snapshots: SnapshotManager,
}

impl TemplateStore {
    pub fn open(root: &Path) -> Result<TemplateStore, TemplateError> {
        let snapshots = SnapshotManager::open(&root.join("snapshots"))?;
        Ok(TemplateStore {
            root: root.to_path_buf(),
            snapshots,
        })
    }

    pub fn snapshots(&self) -> &SnapshotManager {
        &self.snapshots
    }

    fn io(path: &Path) -> impl Fn(std::io::Error) -> TemplateError + '_ {
        move |source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The template for these inputs: the cached one if it is valid, else a fresh build
    /// (a cold boot). A corrupt or partial cached template is deleted and rebuilt.
    /// `nic_tap` is a TAP (in `netns`) the template boots with; VMs get their own.
    /// Returns the template and whether it was built now.
    pub async fn ensure(
        &mut self,
        vmm: &VmmManager,
        inputs: &TemplateInputs,
        netns: Option<PathBuf>,
        nic_tap: Option<String>,
        boot_budget: Duration,
    ) -> Result<(SnapshotMeta, bool), TemplateError> {
        let key = inputs.key();
        self.snapshots.rescan()?;
        if let Some(meta) = self.snapshots.get(&key) {
            return Ok((meta.clone(), false));
        }
        if self.snapshots.problems().iter().any(|(id, _)| *id == key) {
            tracing::warn!(template = %key, "template is corrupt or partial; rebuilding");
            self.snapshots.delete(&key, None)?;
        }
        std::fs::create_dir_all(&self.root).map_err(Self::io(&self.root))?;
        let initrd = self.root.join(format!("{key}.initrd"));
        crate::initrd::write(&inputs.init, &initrd).map_err(Self::io(&initrd))?;
        let placeholder = self.root.join("placeholder.img");
        let f = std::fs::File::create(&placeholder).map_err(Self::io(&placeholder))?;
        f.set_len(inputs.disk_bytes)
            .map_err(Self::io(&placeholder))?;

        // Unique per build: agents sharing a template dir may build one at the same time,
        // and a jail's cgroup is named by it.
        let vm_id = format!(
            "{key}-build-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let layout = GuestLayout {
            kernel: inputs.kernel.display().to_string(),
            initrd: initrd.display().to_string(),
            root_drive: "rootfs".into(),
            vsock: "vsock.sock".into(),
            nic: nic_tap.map(|tap| (tap, TEMPLATE_MAC.to_string())),
        };
        let mut cfg = guest_vm_config(&vm_id, inputs.machine, inputs.kind, &layout);
        cfg.netns = netns;
        cfg.links = vec![("rootfs".into(), placeholder)];
        let _ = vmm.remove(&vm_id).await;
        vmm.create(&cfg).await?;
        let built = async {
            vmm.start(&vm_id).await?;
            let uds = vmm.runtime_dir(&vm_id).vsock();
            let ready =
                tokio::task::spawn_blocking(move || wait_ready(&uds, boot_budget).map(drop))
                    .await
                    .map_err(|e| VmmError::Io {
                        vm_id: vm_id.clone(),
                        what: "waiting for the guest".into(),
                        source: std::io::Error::other(e),
                    })?;
            if let Err(error) = ready {
                return Err(TemplateError::NotReady {
                    error,
                    console: vmm.console_tail(&vm_id, 30),
                });
            }
            let meta = self
                .snapshots
                .create(
                    vmm,
                    &key,
                    &cfg,
                    (None, None),
                    None,
                    &inputs.firecracker,
                    false,
                )
                .await?;
            Ok(meta)
        }
        .await;
        vmm.remove(&vm_id).await?;
        Ok((built?, true))
    }

    /// Starts `vm_id` from the template: a new firecracker restores it with the VM's own
    /// disk (`target` made by [`RestoreTarget::with_root_disk`]) and TAP. The guest then
    /// waits for `run`.
    pub async fn warm_start(
        &self,
        vmm: &VmmManager,
        template: &str,
        vm_id: &str,
        target: &RestoreTarget,
    ) -> Result<FirecrackerApi, TemplateError> {
        Ok(self.snapshots.restore(vmm, template, vm_id, target).await?)
    }

    /// Deletes a template (e.g. when its inputs are gone).
    pub fn delete(&mut self, key: &str) -> Result<(), TemplateError> {
        self.snapshots.delete(key, None)?;
        let _ = std::fs::remove_file(self.root.join(format!("{key}.initrd")));
        Ok(())
    }
}
