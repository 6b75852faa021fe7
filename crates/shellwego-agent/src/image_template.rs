//! Image templates: the generic template (a booted guest init, no root) restored onto a
//! clone of an image's base disk, told to `prepare` (mount the image's root and switch
//! into it, start nothing), and snapshotted — memory, state and disk in one pause. Warm
//! starts of that image restore it with a clone of that disk snapshot and send `run`
//! without a root device: the guest skips mounting and starts the app at once.
//!
//! ```text
//! <data>/image-templates/<id>/vmstate, memory, meta.json   (root-only)
//! <pool>/shellwego/snapshots/<id>@<id>                       its disk, kept apart
//! ```
//! The id is `img_<12 hex of the image digest>-<key>`, the key hashing everything the
//! generic template's does (vCPUs, memory, kernel, init, host kind, firecracker version)
//! with the template's disk size. With online growing (the default on hardware KVM) that
//! is the app's up to the default (1 GiB): a VM of a larger disk starts from the default
//! size's template and grows online: its disk image grows, Firecracker announces the new
//! size (`PATCH /drives`), and the guest grows the mounted file system (`grow_root`)
//! before `run`. Without it (the default on emulated hosts, where the guest's resize
//! costs ~20 s per GiB), and for smaller disks, each disk size has its own template.
//!
//! No app identity or secret is ever in one: the guest has only its init, the image's
//! root and the template's MAC. Templates nobody's VM uses are deleted by the orphan sweep
//! once older than the agent's `image_template_ttl`.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use crate::guest::GuestError;
use crate::provision::{BootMode, Platform};
use crate::reconciler::ports::{PortError, PortResult, Progress};
use crate::snapshot::{RestoreTarget, SnapshotManager};
use crate::spec::DesiredApp;
use crate::template::{TemplateInputs, TemplateStore};
use crate::vmm::config::{machine_config, MachineLimits};
use crate::vmm::models::DriveUpdate;
use shellwego_storage::image::PulledImage;
use shellwego_storage::{BaseImage, VmDisk};

/// The disk size an image template is built with. With `online_grow`, the app's up to
/// the default size: VMs of larger disks start from the default size's template and
/// grow it online (see `Platform::grow_root_online`), so one template serves every
/// larger size. Otherwise, and for a smaller disk (a file system cannot shrink), the
/// app's own.
pub fn template_disk_bytes(app: &DesiredApp, online_grow: bool) -> u64 {
    if online_grow {
        app.resources
            .disk_bytes
            .min(crate::resources::DEFAULT_DISK_BYTES)
    } else {
        app.resources.disk_bytes
    }
}

impl Platform {
    fn image_templates_dir(&self) -> PortResult<SnapshotManager> {
        SnapshotManager::open(&self.image_template_dir).map_err(PortError::of)
    }

    /// The image template id of `app`'s image and shape.
    pub fn image_template_id(&self, app: &DesiredApp, image: &PulledImage) -> PortResult<String> {
        let machine = machine_config(&app.resources, &MachineLimits::for_host(self.kind))
            .map_err(PortError::of)?;
        let inputs = TemplateInputs {
            disk_bytes: template_disk_bytes(app, self.online_grow),
            machine: machine.config,
            kernel: self.kernel.clone(),
            init: self.init.clone(),
            firecracker: self.firecracker.clone(),
            kind: self.kind,
        };
        let digest: String = image.digest_hex().chars().take(12).collect();
        // '_' keeps it apart from app snapshot ids (app names have none).
        Ok(format!("img_{digest}-{}", inputs.key()))
    }

    /// The image template of `app`'s image (built now if missing): its id and its kept
    /// disk snapshot.
    pub async fn image_template(
        &self,
        app: &DesiredApp,
        image: &(PulledImage, BaseImage),
        progress: Progress<'_>,
    ) -> PortResult<(String, String)> {
        let id = self.image_template_id(app, &image.0)?;
        if let Some(disk) = kept_disk(&self.image_templates_dir()?, &id) {
            return Ok((id, disk));
        }
        // One build at a time, and none beside a generic template build.
        let mut templates = self.templates.write().await;
        let mut mgr = self.image_templates_dir()?;
        if let Some(disk) = kept_disk(&mgr, &id) {
            return Ok((id, disk));
        }
        if mgr.get(&id).is_some() || mgr.problems().iter().any(|(p, _)| *p == id) {
            let _ = mgr.delete(&id, Some(self.rootfs.zfs()));
        }
        // A kept disk without a complete template (a build cut short) must not be paired
        // with a new build's memory.
        let (rootfs, name) = (self.rootfs.clone(), id.clone());
        tokio::task::spawn_blocking(move || rootfs.forget_kept(&name))
            .await
            .map_err(PortError::of)?
            .map_err(|e| PortError(format!("an earlier template's disk is in the way: {e}")))?;
        let t = Instant::now();
        let build = Uuid::new_v4();
        let built = self
            .build_image_template(&mut templates, &mut mgr, &id, build, app, image, progress)
            .await;
        let _ = self.vmm.remove(&build.to_string()).await;
        if built.is_err() {
            let _ = self.rootfs.forget_kept(&id);
            let _ = mgr.delete(&id, Some(self.rootfs.zfs()));
        }
        let rootfs = self.rootfs.clone();
        let gone = tokio::task::spawn_blocking(move || rootfs.remove_vm_disk(&build.to_string()))
            .await
            .map_err(PortError::of)?;
        if let Err(e) = gone {
            tracing::warn!(%build, error = %e, "cannot remove an image template's build disk; the orphan sweep retries");
        }
        let disk = built?;
        progress(format!(
            "built the image template {id} in {:.1}s",
            t.elapsed().as_secs_f64()
        ));
        Ok((id, disk))
    }

    #[allow(clippy::too_many_arguments)]
    async fn build_image_template(
        &self,
        templates: &mut TemplateStore,
        mgr: &mut SnapshotManager,
        id: &str,
        build: Uuid,
        app: &DesiredApp,
        image: &(PulledImage, BaseImage),
        progress: Progress<'_>,
    ) -> PortResult<String> {
        let bid = build.to_string();
        let (rootfs, base, bytes) = (
            self.rootfs.clone(),
            image.1.snapshot.clone(),
            template_disk_bytes(app, self.online_grow),
        );
        let disk_id = bid.clone();
        let disk = tokio::task::spawn_blocking(move || {
            rootfs.clone_snapshot_for_vm(&base, &disk_id, Some(bytes))
        })
        .await
        .map_err(PortError::of)?
        .map_err(PortError::of)?;
        let disk_bytes = std::fs::metadata(&disk.image_path)
            .map(|m| m.len())
            .map_err(PortError::of)?;
        let machine = machine_config(&app.resources, &MachineLimits::for_host(self.kind))
            .map_err(PortError::of)?;
        let tpl = self
            .generic_template(templates, machine.config, disk_bytes, progress)
            .await?;
        templates
            .warm_start(
                &self.vmm,
                &tpl.id,
                &bid,
                &RestoreTarget {
                    tap: Some(self.template_tap.clone()),
                    ..RestoreTarget::with_root_disk(&disk.image_path)
                },
            )
            .await
            .map_err(PortError::of)?;
        let uds = self.vmm.runtime_dir(&bid).vsock();
        let budget = self.boot_budget(BootMode::Warm);
        let req = shellwego_proto::Request::Prepare {
            root_device: "/dev/vda".into(),
            root_device_bytes: Some(disk_bytes),
        };
        let prepared = tokio::task::spawn_blocking(move || {
            match crate::guest::send_after_restore(&uds, &req, budget) {
                // A first `prepare` whose answer the restore's vsock reset lost.
                Err(GuestError::Remote(m)) if m.contains("mounted already") => Ok(()),
                other => other,
            }
        })
        .await
        .map_err(PortError::of)?;
        if let Err(e) = prepared {
            return Err(PortError(format!(
                "preparing the template's root: {e}\n--- guest console ---\n{}",
                self.vmm.console_tail(&bid, 20)
            )));
        }
        let cfg = self.restorable_config(build, app)?;
        let dataset = self.rootfs.vm_dataset(&bid);
        let meta = mgr
            .create(
                &self.vmm,
                id,
                &cfg,
                (None, None),
                Some((self.rootfs.zfs(), &dataset)),
                &self.firecracker,
                false,
            )
            .await
            .map_err(PortError::of)?;
        let snap = meta
            .disk_snapshot
            .ok_or_else(|| PortError("the template has no disk snapshot".into()))?;
        let (rootfs, name) = (self.rootfs.clone(), id.to_string());
        let kept = tokio::task::spawn_blocking(move || rootfs.keep_snapshot(&snap, &name))
            .await
            .map_err(PortError::of)?
            .map_err(PortError::of)?;
        mgr.set_disk_snapshot(id, &kept).map_err(PortError::of)?;
        Ok(kept)
    }

    /// Grows the root of a VM just restored from an image template to `bytes`, online:
    /// the disk image grows, Firecracker announces the new size to the guest (`PATCH
    /// /drives`: a config-change interrupt) and the guest grows its mounted file system.
    /// An announcement the guest has not seen within a couple of seconds is made again.
    pub(crate) async fn grow_root_online(
        &self,
        vm_id: &str,
        disk: &VmDisk,
        bytes: u64,
        budget: Duration,
    ) -> PortResult<()> {
        let (rootfs, id) = (self.rootfs.clone(), vm_id.to_string());
        let before = std::fs::metadata(&disk.image_path)
            .map(|m| m.len())
            .map_err(PortError::of)?;
        let size = tokio::task::spawn_blocking(move || rootfs.grow_vm_disk(&id, bytes))
            .await
            .map_err(PortError::of)?
            .map_err(PortError::of)?;
        if size == before {
            return Ok(());
        }
        let api = self.vmm.api_of(vm_id).await.map_err(PortError::of)?;
        let update = DriveUpdate {
            drive_id: "rootfs".into(),
            path_on_host: Some(self.vmm.path_in_vm("rootfs", &disk.image_path)),
            rate_limiter: None,
        };
        let uds = self.vmm.runtime_dir(vm_id).vsock();
        let request = shellwego_proto::Request::GrowRoot {
            bytes: size,
            wait_ms: GROW_WAIT.as_millis() as u64,
        };
        let start = Instant::now();
        let mut last = String::new();
        for _ in 0..GROW_ANNOUNCEMENTS {
            api.patch_drive(&update).await.map_err(PortError::of)?;
            let (uds, request) = (uds.clone(), request.clone());
            let left = budget.saturating_sub(start.elapsed());
            let grown = tokio::task::spawn_blocking(move || {
                crate::guest::send_after_restore(&uds, &request, left)
            })
            .await
            .map_err(PortError::of)?;
            match grown {
                Ok(()) => return Ok(()),
                // The guest has not seen the new size yet: announce it again.
                Err(GuestError::Remote(m)) if m.starts_with("root device:") => last = m,
                Err(e) => return Err(PortError(format!("growing the root to {size} bytes: {e}"))),
            }
        }
        Err(PortError(format!(
            "growing the root to {size} bytes: announced {GROW_ANNOUNCEMENTS} times, the guest \
             never saw it: {last}"
        )))
    }

    /// Deletes image templates of images no recorded VM runs (`used`: image digests)
    /// once they are older than `ttl`; a disk that VMs still clone stays for later.
    pub async fn forget_image_templates(
        &self,
        used: &HashSet<String>,
        ttl: Duration,
    ) -> PortResult<()> {
        let mut mgr = self.image_templates_dir()?;
        let used: HashSet<String> = used
            .iter()
            .map(|d| {
                d.trim_start_matches("sha256:")
                    .chars()
                    .take(12)
                    .collect::<String>()
            })
            .collect();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let stale: Vec<String> = mgr
            .list()
            .iter()
            .filter(|m| {
                let digest =
                    m.id.strip_prefix("img_")
                        .and_then(|rest| rest.split('-').next())
                        .unwrap_or_default();
                !used.contains(digest) && now.saturating_sub(m.created_at) >= ttl.as_secs()
            })
            .map(|m| m.id.clone())
            .collect();
        for id in stale {
            self.forget_kept_snapshot(&mut mgr, &id).await?;
        }
        Ok(())
    }
}

/// How long the guest waits for its disk's new size after each announcement.
const GROW_WAIT: Duration = Duration::from_secs(2);
/// How often a new size is announced before the start fails.
const GROW_ANNOUNCEMENTS: u32 = 5;

/// The kept disk snapshot of a complete template `id`.
fn kept_disk(mgr: &SnapshotManager, id: &str) -> Option<String> {
    mgr.get(id)?
        .disk_snapshot
        .clone()
        .filter(|d| crate::app_snapshot::is_kept(d))
}
