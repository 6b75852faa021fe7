//! Scale to zero on the real host: a VM is suspended into a snapshot of its own and woken
//! from it, keeping its disk, TAP, IP lease, fence and QoS meanwhile.
//!
//! ```text
//! <data>/suspended/<vm_id>/vm/vmstate   Firecracker's state of the paused VM
//!                             memory    its guest memory
//!                             meta.json written last (see `snapshot`)
//! ```
//! Suspend: pause, snapshot memory and state, then stop the process (its memory goes back
//! to the host). Nothing is written to the disk in between (the VM is paused until it is
//! gone), so disk and memory stay consistent without a disk snapshot. If the suspend is
//! called off (a connection arrived) or a step fails before the process is stopped, the
//! VM is resumed and the partial snapshot deleted: nothing is lost.
//!
//! Wake: a new firecracker restores the snapshot with the VM's own disk and TAP (same
//! names as before: the same VM), the guest gets the time and fresh entropy
//! (`Request::Resume`), and the snapshot is deleted — the restored process keeps its
//! memory file mapped, so the file is unlinked, not needed. The app in it runs on from
//! where it was paused: its memory, connections to itself and open files are as they were.
//!
//! The snapshot is root-only (its directory 0700): it holds whatever the guest had in
//! memory, secrets included. It is deleted with the VM (`Platform::teardown`).

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::provision::Platform;
use crate::reconciler::ports::{PortError, PortResult, Suspension};
use crate::reconciler::VmState;
use crate::snapshot::{restore_answer_budget, RestoreTarget, SnapshotManager};
use crate::spec::DesiredApp;
use crate::vmm::config::{guest_vm_config, machine_config, GuestLayout, MachineLimits};
use crate::vmm::models::VmState as FcState;
use crate::vmm::MicrovmConfig;

/// The one snapshot in a suspended VM's directory.
const SNAPSHOT: &str = "vm";

impl Platform {
    /// Where the VM's suspend snapshot is kept.
    pub fn suspend_dir(&self, vm: Uuid) -> PathBuf {
        self.suspended.join(vm.to_string())
    }

    /// See [`crate::reconciler::ports::Ports::suspend`].
    pub async fn suspend_vm(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        cancel: &CancellationToken,
    ) -> PortResult<Suspension> {
        let id = vm.to_string();
        let dir = self.suspend_dir(vm);
        let _ = std::fs::remove_dir_all(&dir);
        // What fails before the pause leaves the VM as it was: called off, not lost.
        let prepared = self
            .restorable_config(vm, app)
            .and_then(|cfg| Ok((cfg, SnapshotManager::open(&dir).map_err(PortError::of)?)));
        let (cfg, mut snapshots) = match prepared {
            Ok(p) => p,
            Err(e) => {
                return Ok(Suspension::Resumed {
                    why: format!("cannot prepare the snapshot: {e}"),
                })
            }
        };
        let pid = self.vmm.pid_of(&id).await;
        let resident = pid.and_then(shellwego_sys::process::resident_bytes);
        let labels = (Some(app.name.clone()), None);
        let taken = snapshots
            .create(
                &self.vmm,
                SNAPSHOT,
                &cfg,
                labels,
                None,
                &self.firecracker,
                false,
            )
            .await;
        let why = match (&taken, cancel.is_cancelled()) {
            (Ok(_), false) => None,
            (Ok(_), true) => Some("a connection arrived".to_string()),
            (Err(e), _) => Some(format!("snapshot failed: {e}")),
        };
        if let Some(why) = why {
            let _ = std::fs::remove_dir_all(&dir);
            let api = self.vmm.api_of(&id).await.map_err(PortError::of)?;
            api.set_state(FcState::Resumed)
                .await
                .map_err(|e| PortError(format!("{why}, and the VM did not resume: {e}")))?;
            return Ok(Suspension::Resumed { why });
        }
        self.vmm.remove(&id).await.map_err(PortError::of)?;
        Ok(Suspension::Suspended {
            freed_bytes: resident.unwrap_or(0),
        })
    }

    /// The running VM `vm` as a snapshot of it records it: the layout every VM has
    /// (root drive `rootfs`, `eth0` on its TAP, vsock), its shape and CPU.
    pub fn restorable_config(&self, vm: Uuid, app: &DesiredApp) -> PortResult<MicrovmConfig> {
        let id = vm.to_string();
        let machine = machine_config(&app.resources, &MachineLimits::for_host(self.kind))
            .map_err(PortError::of)?;
        let layout = GuestLayout {
            kernel: self.kernel.display().to_string(),
            initrd: String::new(),
            root_drive: "rootfs".into(),
            vsock: "vsock.sock".into(),
            nic: Some((
                shellwego_network::cni::tap_name(&id),
                crate::vmm::config::generate_mac(vm),
            )),
        };
        let mut cfg = guest_vm_config(&id, machine.config, self.kind, &layout);
        cfg.cpu_milli = Some(app.resources.cpu_milli);
        Ok(cfg)
    }

    /// See [`crate::reconciler::ports::Ports::wake`].
    pub async fn wake_vm(&self, vm: Uuid, app: &DesiredApp) -> PortResult<()> {
        let id = vm.to_string();
        let dir = self.suspend_dir(vm);
        let snapshots = SnapshotManager::open(&dir).map_err(PortError::of)?;
        if snapshots.get(SNAPSHOT).is_none() {
            return Err(PortError(format!(
                "no usable suspend snapshot in {}",
                dir.display()
            )));
        }
        let rootfs = self.rootfs.clone();
        let disk_id = id.clone();
        let disk = tokio::task::spawn_blocking(move || rootfs.vm_disk(&disk_id))
            .await
            .map_err(PortError::of)?
            .map_err(PortError::of)?
            .ok_or_else(|| PortError("the suspended VM's disk is gone".into()))?;
        let target = RestoreTarget {
            tap: Some(shellwego_network::cni::tap_name(&id)),
            cpu_milli: Some(app.resources.cpu_milli),
            ..RestoreTarget::with_root_disk(&disk.image_path)
        };
        snapshots
            .restore(&self.vmm, SNAPSHOT, &id, &target)
            .await
            .map_err(PortError::of)?;
        let (clock, entropy) = crate::provision::fresh_clock_and_entropy()?;
        let uds = self.vmm.runtime_dir(&id).vsock();
        let budget = restore_answer_budget(self.kind);
        let resumed = tokio::task::spawn_blocking(move || {
            let req = shellwego_proto::Request::Resume { clock, entropy };
            crate::guest::send_after_restore(&uds, &req, budget)
        })
        .await
        .map_err(PortError::of)?;
        if let Err(e) = resumed {
            let console = self.vmm.console_tail(&id, 20);
            let _ = self.vmm.remove(&id).await;
            return Err(PortError(format!(
                "the woken guest did not answer: {e}\n--- guest console ---\n{console}"
            )));
        }
        self.forget_snapshot(vm);
        Ok(())
    }

    /// See [`crate::reconciler::ports::Ports::settle`].
    pub async fn settle_vm(&self, vm: Uuid) -> PortResult<VmState> {
        let id = vm.to_string();
        if self.vmm.alive(&id).await {
            // A suspend cut short leaves the VM paused; resuming a running one is a no-op.
            let api = self.vmm.api_of(&id).await.map_err(PortError::of)?;
            api.set_state(FcState::Resumed)
                .await
                .map_err(PortError::of)?;
            self.forget_snapshot(vm);
            return Ok(VmState::Running);
        }
        let complete =
            SnapshotManager::open(&self.suspend_dir(vm)).is_ok_and(|s| s.get(SNAPSHOT).is_some());
        Ok(if complete {
            VmState::Suspended
        } else {
            self.forget_snapshot(vm);
            VmState::Exited
        })
    }

    /// Deletes the VM's suspend snapshot and the copies of its files in the VM's runtime
    /// dir, if any (a restored process keeps its memory mapped, not the files).
    pub fn forget_snapshot(&self, vm: Uuid) {
        let _ = std::fs::remove_dir_all(self.suspend_dir(vm));
        let rt = self.vmm.runtime_dir(&vm.to_string());
        for name in ["vmstate", "memory"] {
            let _ = std::fs::remove_file(rt.dir.join(name));
        }
    }
}
