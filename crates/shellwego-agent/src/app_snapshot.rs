//! App snapshots (`[snapshot] enabled = true`): once a VM of a version is healthy, the
//! agent snapshots it — memory, state and disk in one pause of about half a second — and
//! later VMs of that version (replicas, replacements of a crashed VM, VMs re-created after
//! a restart) are restored from it instead of booting: their app is already running, with
//! its memory touched, so they serve at once.
//!
//! ```text
//! <data>/app-snapshots/<app>-<version>/vmstate, memory, meta.json   (root-only)
//! <pool>/shellwego/snapshots/<app>-<version>@<app>-<version>         its disk
//! ```
//! The disk snapshot is taken of the source VM's dataset inside the pause, then cloned to
//! `snapshots/<id>` and promoted (`RootfsBuilder::keep_snapshot`): the snapshot no longer
//! belongs to the source VM, which can go at any time. New VMs clone it.
//!
//! A restored VM is made unique before its app sees traffic (it is in no endpoint set
//! before its identity is in place and its health check passes): its own TAP (on load), then
//! over vsock (`Request::Reidentify`) its own hostname, MAC, address, clock, fresh entropy
//! (RNG reseeded) and boot id, and the app's after-restore signal if the spec names one.
//! What the app itself derived from the source's identity before the snapshot (a random id
//! it drew at start, the hostname it read) stays the source's: apps that care handle the
//! signal. Secrets live in the snapshot's memory: its files are root-only, a change of
//! secret values makes a new version (`DesiredApp::secrets_version`), and a version's
//! snapshot is deleted once no desired app and no VM uses it.

use std::collections::HashSet;

use uuid::Uuid;

use crate::provision::Platform;
use crate::reconciler::ports::{PortError, PortResult};
use crate::snapshot::SnapshotManager;
use crate::spec::DesiredApp;

/// The snapshot id of an app's version.
pub fn snapshot_id(app: &str, version: &str) -> String {
    format!("{app}-{version}")
}

impl Platform {
    fn app_snapshots(&self) -> PortResult<SnapshotManager> {
        SnapshotManager::open(&self.app_snapshot_dir).map_err(PortError::of)
    }

    /// The kept disk snapshot of the app's version, if it has a usable app snapshot.
    pub fn app_snapshot_disk(&self, app: &str, version: &str) -> Option<String> {
        let mgr = self.app_snapshots().ok()?;
        mgr.get(&snapshot_id(app, version))?
            .disk_snapshot
            .clone()
            .filter(|d| is_kept(d))
    }

    /// Snapshots the healthy VM `vm` as its version's app snapshot (see the module doc).
    pub async fn take_app_snapshot(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        version: &str,
    ) -> PortResult<()> {
        let id = snapshot_id(&app.name, version);
        let mut mgr = self.app_snapshots()?;
        match mgr.get(&id).map(|m| m.disk_snapshot.clone()) {
            Some(Some(disk)) if is_kept(&disk) => return Ok(()),
            // Taken, but the agent died before its disk was kept apart: finish that.
            Some(Some(disk)) => return self.keep_disk(&mut mgr, &id, disk).await,
            Some(None) => mgr.delete(&id, None).map_err(PortError::of)?,
            None => {}
        }
        if mgr.problems().iter().any(|(p, _)| *p == id) {
            mgr.delete(&id, None).map_err(PortError::of)?;
        }
        let cfg = self.restorable_config(vm, app)?;
        let dataset = self.rootfs.vm_dataset(&vm.to_string());
        let meta = mgr
            .create(
                &self.vmm,
                &id,
                &cfg,
                (Some(app.name.clone()), Some(version.to_string())),
                Some((self.rootfs.zfs(), &dataset)),
                &self.firecracker,
                true,
            )
            .await
            .map_err(PortError::of)?;
        let Some(disk) = meta.disk_snapshot else {
            let _ = mgr.delete(&id, None);
            return Err(PortError("the snapshot has no disk snapshot".into()));
        };
        self.keep_disk(&mut mgr, &id, disk).await
    }

    /// Moves the snapshot's disk snapshot apart from its source VM and records it.
    async fn keep_disk(&self, mgr: &mut SnapshotManager, id: &str, disk: String) -> PortResult<()> {
        let (rootfs, name) = (self.rootfs.clone(), id.to_string());
        let kept = tokio::task::spawn_blocking(move || rootfs.keep_snapshot(&disk, &name))
            .await
            .map_err(PortError::of)?;
        match kept {
            Ok(kept) => mgr.set_disk_snapshot(id, &kept).map_err(PortError::of),
            Err(e) => {
                let _ = self.rootfs.forget_kept(id);
                let _ = mgr.delete(id, Some(self.rootfs.zfs()));
                Err(PortError(format!("keeping the disk snapshot: {e}")))
            }
        }
    }

    /// Deletes the app snapshots of versions not in `keep` ((app, version) pairs): files
    /// and kept disk. A disk that VMs still clone is kept until they are gone.
    pub async fn forget_app_snapshots(&self, keep: &HashSet<(String, String)>) -> PortResult<()> {
        let keep: HashSet<String> = keep.iter().map(|(a, v)| snapshot_id(a, v)).collect();
        let mut mgr = self.app_snapshots()?;
        let mut ids: Vec<String> = mgr.list().iter().map(|m| m.id.clone()).collect();
        ids.extend(mgr.problems().iter().map(|(id, _)| id.clone()));
        let rootfs = self.rootfs.clone();
        let kept = tokio::task::spawn_blocking(move || rootfs.kept())
            .await
            .map_err(PortError::of)?
            .map_err(PortError::of)?;
        // Image templates keep their disks there too (ids with '_'): not ours.
        ids.extend(kept.into_iter().filter(|id| !id.contains('_')));
        ids.sort();
        ids.dedup();
        for id in ids.into_iter().filter(|id| !keep.contains(id)) {
            self.forget_kept_snapshot(&mut mgr, &id).await?;
        }
        // Snapshots cut short by a crash (`<id>.tmp`), of versions nobody uses.
        if let Ok(entries) = std::fs::read_dir(&self.app_snapshot_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".tmp") {
                    if !keep.contains(id) {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes snapshot `id` of `mgr` (app snapshot or image template): its kept disk
    /// first, then its files. A disk that VMs still clone stays (with the files) for a
    /// later sweep; a disk snapshot never kept apart (a crash in between) is the source
    /// VM's and goes with the files, so that VM can go.
    pub(crate) async fn forget_kept_snapshot(
        &self,
        mgr: &mut SnapshotManager,
        id: &str,
    ) -> PortResult<()> {
        let (rootfs, name) = (self.rootfs.clone(), id.to_string());
        let disk = tokio::task::spawn_blocking(move || rootfs.forget_kept(&name))
            .await
            .map_err(PortError::of)?;
        if let Err(e) = disk {
            tracing::info!(snapshot = %id, error = %e, "snapshot still in use; kept for now");
            return Ok(());
        }
        let unkept = mgr
            .get(id)
            .and_then(|m| m.disk_snapshot.clone())
            .is_some_and(|d| !is_kept(&d));
        let zfs = unkept.then(|| self.rootfs.zfs());
        match mgr.delete(id, zfs) {
            Ok(()) => tracing::info!(snapshot = %id, "snapshot deleted"),
            Err(e) => tracing::warn!(snapshot = %id, error = %e, "cannot delete a snapshot"),
        }
        Ok(())
    }

    /// Deletes suspend snapshots of VMs not in `keep` (left by a VM removed while its
    /// record was lost).
    pub fn forget_suspended(&self, keep: &HashSet<Uuid>) {
        let Ok(entries) = std::fs::read_dir(&self.suspended) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.parse::<Uuid>().is_ok_and(|vm| !keep.contains(&vm)) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Whether a disk snapshot is kept apart from its source VM (`<root>/snapshots/...`).
pub(crate) fn is_kept(disk: &str) -> bool {
    disk.contains("/snapshots/")
}
