//! The per-VM pipeline: image -> root disk -> network -> microVM -> guest identity, and
//! its exact reverse. Used by the reconciler's executor and by the cold-start gauntlet.
//!
//! Every resource is keyed by the VM id, and `deprovision` removes whatever exists of
//! them (VM, TAP, IFB, QoS, fence, lease, dataset) — also for a VM that was only half built, so
//! a failed or interrupted provision leaves nothing behind.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shellwego_network::qos::Limits;
use shellwego_network::{CniNetwork, Tenant, VmNetwork};
use shellwego_proto::NetConfig;
use shellwego_storage::image::{ImageStore, Progress, PulledImage};
use shellwego_storage::{BaseImage, RootfsBuilder, VmDisk};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::guest::{wait_ready, GuestClient};
use crate::health;
use crate::host::HostKind;
use crate::reconciler::ports::{
    PortError, PortResult, Ports, Progress as PortProgress, Suspension,
};
use crate::reconciler::steps::{Deadlines, Steps};
use crate::reconciler::VmState;
use crate::snapshot::RestoreTarget;
use crate::spec::{DesiredApp, HealthCheck};
use crate::template::{TemplateInputs, TemplateStore};
use crate::vmm::config::{
    generate_mac, guest_vm_config, machine_config, GuestLayout, MachineLimits,
};
use crate::vmm::VmmManager;

/// How a VM is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// Restore the template of the VM's shape (built on first use).
    Warm,
    /// Boot the kernel.
    Cold,
}

/// A named, timed step.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub took: Duration,
}

/// What a provisioned VM is made of.
#[derive(Debug, Clone)]
pub struct ProvisionedVm {
    pub vm_id: Uuid,
    pub image: PulledImage,
    pub disk: VmDisk,
    pub net: VmNetwork,
    pub mode: BootMode,
    pub phases: Vec<Phase>,
}

#[derive(Debug, thiserror::Error)]
#[error("{phase}: {message}")]
pub struct ProvisionError {
    pub phase: &'static str,
    pub message: String,
}

fn fail(phase: &'static str) -> impl Fn(&dyn std::fmt::Display) -> ProvisionError {
    move |e| ProvisionError {
        phase,
        message: e.to_string(),
    }
}

/// The wall clock (seconds and nanoseconds since the epoch) and 64 bytes of host
/// randomness for a guest that starts or resumes. The guest credits these bytes and
/// reseeds its RNG from them: they must be real randomness, never a fallback.
pub fn fresh_clock_and_entropy() -> PortResult<((i64, u32), Vec<u8>)> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut entropy = vec![0u8; 64];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut entropy)
        .map_err(|_| PortError("the host's random source failed".into()))?;
    Ok(((now.as_secs() as i64, now.subsec_nanos()), entropy))
}

/// The guest's view of its network attachment.
fn guest_net(net: &VmNetwork) -> NetConfig {
    NetConfig {
        address: net.ip.to_string(),
        prefix_len: net.prefix_len,
        gateway: net.gateway.to_string(),
        nameservers: vec![],
        mac: Some(net.mac.clone()),
    }
}

/// Whose a VM is and what it may reach: what its network fence is made of.
pub fn tenant(app: &DesiredApp) -> Tenant {
    Tenant {
        app: app.name.clone(),
        policy: app.network.clone(),
    }
}

/// Everything one host needs to run VMs.
pub struct Platform {
    pub kind: HostKind,
    pub firecracker: PathBuf,
    pub kernel: PathBuf,
    pub init: PathBuf,
    pub images: Arc<ImageStore>,
    pub rootfs: Arc<RootfsBuilder>,
    pub network: CniNetwork,
    pub vmm: VmmManager,
    /// Builds are exclusive (write), restores from a built template shared (read).
    pub templates: RwLock<TemplateStore>,
    /// A TAP on the bridge that template builds boot with (their clones get their own).
    pub template_tap: String,
    /// Where suspended VMs' snapshots are kept (see [`crate::suspend`]).
    pub suspended: PathBuf,
    /// Where app snapshots are kept (see [`crate::app_snapshot`]).
    pub app_snapshot_dir: PathBuf,
    /// Where image templates are kept (see [`crate::image_template`]).
    pub image_template_dir: PathBuf,
    /// Whether warm starts use image templates (they do unless turned off).
    pub image_templates: bool,
    /// Whether larger disks grow online from the default size's image template (see
    /// `Config::online_grow`).
    pub online_grow: bool,
    /// How long an image template no VM uses is kept.
    pub image_template_ttl: Duration,
}

/// A VM's root disk and what it was cloned from, which says how the VM starts.
#[derive(Debug, Clone)]
pub struct RootDisk {
    pub disk: VmDisk,
    pub origin: Origin,
}

/// Where a VM's root disk (and so the VM) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The image's base: the VM boots, or restores the generic template, and `run`
    /// mounts the root and starts the app.
    Base,
    /// The image template (its id): restored with the root mounted; `run` starts the app.
    ImageTemplate(String),
    /// The version's app snapshot (its id): restored with the app running; the VM only
    /// takes its own identity.
    AppSnapshot(String),
}

/// A VM's hostname: its app's name and the first 8 hex digits of its id, so replicas
/// (and VMs restored from one snapshot) are told apart.
pub fn vm_hostname(app: &str, vm: Uuid) -> String {
    let app: String = app.chars().take(54).collect();
    format!("{app}-{}", &vm.simple().to_string()[..8])
}

/// Progress events of a provision (for `apply`'s output).
pub type ProgressFn<'a> = &'a (dyn Fn(String) + Send + Sync);

impl Platform {
    /// Budget for a guest to reach its init: boot or restore, by host kind.
    pub fn boot_budget(&self, mode: BootMode) -> Duration {
        match (self.kind, mode) {
            (HostKind::Hardware, _) => Duration::from_secs(30),
            (HostKind::NestedEmulated, BootMode::Cold) => Duration::from_secs(300),
            (HostKind::NestedEmulated, BootMode::Warm) => Duration::from_secs(60),
        }
    }

    /// Builds and starts the VM `vm_id` for `app` and gives it its run config, step by
    /// step with the executor's deadlines (see [`crate::reconciler::steps`]). On any
    /// failure everything already made for it is removed again.
    pub async fn provision(
        &self,
        app: &DesiredApp,
        vm_id: Uuid,
        secrets: BTreeMap<String, String>,
        mode: BootMode,
        progress: ProgressFn<'_>,
    ) -> Result<ProvisionedVm, ProvisionError> {
        let deadlines = Deadlines::for_platform(self, mode);
        let run = Steps {
            platform: self,
            deadlines: &deadlines,
            mode,
            cancel: &CancellationToken::new(),
            on_step: &|_| {},
            progress,
        };
        let vm = run
            .provision(app, vm_id, secrets)
            .await
            .map_err(|e| ProvisionError {
                phase: e.step,
                message: e.message,
            })?;
        Ok(ProvisionedVm {
            vm_id,
            image: vm.image.0,
            disk: vm.disk.disk,
            net: vm.net,
            mode,
            phases: vm.phases,
        })
    }

    /// A client to the VM's guest init.
    pub fn guest(&self, vm_id: Uuid) -> Result<GuestClient, crate::guest::GuestError> {
        GuestClient::connect(
            &self.vmm.runtime_dir(&vm_id.to_string()).vsock(),
            Duration::from_secs(60),
        )
    }

    /// Stops the VM (asking its init first) and removes its TAP, IFB, QoS, fence, lease
    /// and disk. Idempotent; works on whatever part exists.
    pub async fn teardown(&self, vm_id: Uuid) -> Result<Vec<Phase>, ProvisionError> {
        let id = vm_id.to_string();
        let mut phases = Vec::new();
        let t = Instant::now();
        if self.vmm.list().await.contains(&id) {
            let uds = self.vmm.runtime_dir(&id).vsock();
            let _ = tokio::task::spawn_blocking(move || {
                GuestClient::connect(&uds, Duration::from_secs(2))
                    .and_then(|mut c| c.shutdown(Duration::from_secs(2)))
            })
            .await;
            let _ = self.vmm.stop(&id, Duration::from_secs(2)).await;
            self.vmm.remove(&id).await.map_err(|e| fail("stop")(&e))?;
        } else {
            self.vmm.remove(&id).await.map_err(|e| fail("stop")(&e))?;
        }
        let initrd = self.vmm.runtime_dir(&id).dir.with_extension("initrd");
        let _ = std::fs::remove_file(initrd);
        self.forget_snapshot(vm_id);
        phases.push(Phase {
            name: "stop vm",
            took: t.elapsed(),
        });
        let t = Instant::now();
        self.network
            .teardown_vm(&id)
            .await
            .map_err(|e| fail("network teardown")(&e))?;
        phases.push(Phase {
            name: "network teardown",
            took: t.elapsed(),
        });
        let t = Instant::now();
        let rootfs = self.rootfs.clone();
        tokio::task::spawn_blocking(move || rootfs.remove_vm_disk(&id))
            .await
            .map_err(|e| fail("disk removal")(&e))?
            .map_err(|e| fail("disk removal")(&e))?;
        phases.push(Phase {
            name: "destroy dataset",
            took: t.elapsed(),
        });
        Ok(phases)
    }
}

impl Platform {
    /// The generic template of this shape and disk size (`templates` held for writing):
    /// the cached one, or one built now with a cold boot.
    pub(crate) async fn generic_template(
        &self,
        templates: &mut TemplateStore,
        machine: crate::vmm::config::MachineConfig,
        disk_bytes: u64,
        progress: PortProgress<'_>,
    ) -> PortResult<crate::snapshot::SnapshotMeta> {
        let inputs = TemplateInputs {
            disk_bytes,
            machine,
            kernel: self.kernel.clone(),
            init: self.init.clone(),
            firecracker: self.firecracker.clone(),
            kind: self.kind,
        };
        self.network
            .create_tap(&self.template_tap)
            .await
            .map_err(|e| PortError(format!("template: {e}")))?;
        let (tpl, built) = templates
            .ensure(
                &self.vmm,
                &inputs,
                None,
                Some(self.template_tap.clone()),
                self.boot_budget(BootMode::Cold),
            )
            .await
            .map_err(|e| PortError(format!("template: {e}")))?;
        if built {
            progress(format!("built template {} (one cold boot)", tpl.id));
        }
        Ok(tpl)
    }

    /// Gives a VM restored from an app snapshot its own identity (see
    /// [`crate::app_snapshot`]).
    async fn reidentify(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        net: &VmNetwork,
        budget: Duration,
    ) -> PortResult<()> {
        let (clock, entropy) = fresh_clock_and_entropy()?;
        let identity = shellwego_proto::Identity {
            hostname: vm_hostname(&app.name, vm),
            net: Some(guest_net(net)),
            clock,
            entropy,
            signal: app.snapshot.after_restore,
        };
        let id = vm.to_string();
        let uds = self.vmm.runtime_dir(&id).vsock();
        let req = shellwego_proto::Request::Reidentify(Box::new(identity));
        tokio::task::spawn_blocking(move || crate::guest::send_after_restore(&uds, &req, budget))
            .await
            .map_err(PortError::of)?
            .map_err(|e| {
                PortError(format!(
                    "the restored guest did not take its identity: {e}\n--- guest console ---\n{}",
                    self.vmm.console_tail(&id, 20)
                ))
            })
    }
}

/// The real platform behind the executor's ports.
impl Ports for Platform {
    type Image = (PulledImage, BaseImage);
    type Disk = RootDisk;
    type Net = VmNetwork;

    fn now(&self) -> u64 {
        crate::state::now_secs()
    }

    async fn pull(&self, app: &DesiredApp, progress: PortProgress<'_>) -> PortResult<Self::Image> {
        progress(format!("pulling {}", app.image));
        let report = |p: Progress| match &p {
            // Bytes, rate and ETA of downloads that take more than a second; a line for
            // each layer that arrived, and one for each that was cached.
            Progress::Downloading { .. } | Progress::Cached { .. } | Progress::Verified { .. } => {
                progress(format!("  {}", p.describe()))
            }
            Progress::Resolved { .. } => {}
        };
        let (image, base) = self
            .rootfs
            .pull_base(&self.images, &app.image, &report)
            .await
            .map_err(PortError::of)?;
        if base.built_now {
            let b = &base.timings;
            progress(format!(
                "  root disk base built: {} entries, {} MiB (unpack {:.1} s, mkfs {:.1} s)",
                b.entries,
                b.content_bytes >> 20,
                b.unpack.as_secs_f64(),
                b.mkfs.as_secs_f64()
            ));
        }
        Ok((image, base))
    }

    fn digest(image: &Self::Image) -> String {
        image.0.digest.clone()
    }

    async fn clone_disk(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        image: &Self::Image,
        mode: BootMode,
        progress: PortProgress<'_>,
    ) -> PortResult<RootDisk> {
        let version = app.spec_hash();
        let snapshot = if app.snapshot.enabled {
            self.app_snapshot_disk(&app.name, &version)
        } else {
            None
        };
        let (origin, from) = match snapshot {
            Some(disk) => (
                Origin::AppSnapshot(crate::app_snapshot::snapshot_id(&app.name, &version)),
                disk,
            ),
            None if self.image_templates && mode == BootMode::Warm => {
                match self.image_template(app, image, progress).await {
                    Ok((id, disk)) => (Origin::ImageTemplate(id), disk),
                    Err(e) => {
                        progress(format!("no image template ({e}); starting from the image"));
                        (Origin::Base, image.1.snapshot.clone())
                    }
                }
            }
            None => (Origin::Base, image.1.snapshot.clone()),
        };
        let (rootfs, id) = (self.rootfs.clone(), vm.to_string());
        // A clone of an image template keeps the template's size until its guest, which
        // has the file system mounted, grows it online (`run`).
        let disk_bytes = match origin {
            Origin::ImageTemplate(_) => None,
            _ => Some(app.resources.disk_bytes),
        };
        let disk = tokio::task::spawn_blocking(move || {
            rootfs.clone_snapshot_for_vm(&from, &id, disk_bytes)
        })
        .await
        .map_err(PortError::of)?
        .map_err(PortError::of)?;
        Ok(RootDisk { disk, origin })
    }

    async fn disk_owners(&self) -> PortResult<Vec<String>> {
        let rootfs = self.rootfs.clone();
        tokio::task::spawn_blocking(move || rootfs.vm_disks())
            .await
            .map_err(PortError::of)?
            .map_err(PortError::of)
    }

    async fn wire(&self, vm: Uuid, app: &DesiredApp) -> PortResult<VmNetwork> {
        let limits = Limits {
            download_bps: app.bandwidth.download_bps,
            upload_bps: app.bandwidth.upload_bps,
        };
        self.network
            .setup_vm(&vm.to_string(), &generate_mac(vm), limits, &tenant(app))
            .await
            .map_err(PortError::of)
    }

    fn ip(net: &VmNetwork) -> std::net::Ipv4Addr {
        net.ip
    }

    async fn rewire(&self, vm: Uuid, app: &DesiredApp) -> PortResult<()> {
        let id = vm.to_string();
        // The fence's rules outlive the agent; re-applying makes them match this agent's
        // rules and the app's policy.
        self.network
            .reattach_fence(&id, &generate_mac(vm), &tenant(app))
            .map_err(PortError::of)?;
        let limits = Limits {
            download_bps: app.bandwidth.download_bps,
            upload_bps: app.bandwidth.upload_bps,
        };
        self.network
            .reattach_qos(&id, limits)
            .await
            .map_err(PortError::of)
    }

    fn lease_owners(&self) -> PortResult<Vec<String>> {
        Ok(self
            .network
            .ipam()
            .leases()
            .map_err(PortError::of)?
            .into_keys()
            .collect())
    }

    fn boot_budget(&self, mode: BootMode) -> Duration {
        Platform::boot_budget(self, mode)
    }

    async fn boot(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        mode: BootMode,
        root: &RootDisk,
        net: &VmNetwork,
        progress: PortProgress<'_>,
    ) -> PortResult<()> {
        let id = vm.to_string();
        let disk = &root.disk;
        let machine = machine_config(&app.resources, &MachineLimits::for_host(self.kind))
            .map_err(PortError::of)?;
        let restore_from = match &root.origin {
            Origin::AppSnapshot(id) => {
                progress(format!("restoring from the app snapshot {id}"));
                Some((&self.app_snapshot_dir, id))
            }
            Origin::ImageTemplate(id) => {
                progress(format!("restoring from the image template {id}"));
                Some((&self.image_template_dir, id))
            }
            Origin::Base => None,
        };
        // A restore (of any snapshot) gives the VM its own TAP, CPU and disk.
        let target = RestoreTarget {
            tap: Some(net.tap.clone()),
            cpu_milli: Some(app.resources.cpu_milli),
            ..RestoreTarget::with_root_disk(&disk.image_path)
        };
        if let Some((dir, snapshot)) = restore_from {
            let mgr = crate::snapshot::SnapshotManager::open(dir).map_err(PortError::of)?;
            mgr.restore(&self.vmm, snapshot, &id, &target)
                .await
                .map_err(PortError::of)?;
            return Ok(());
        }
        match mode {
            BootMode::Warm => {
                let disk_bytes = std::fs::metadata(&disk.image_path)
                    .map(|m| m.len())
                    .map_err(PortError::of)?;
                // Only finding (or building) the template is exclusive; restores from it
                // run side by side.
                let tpl = {
                    let mut templates = self.templates.write().await;
                    self.generic_template(&mut templates, machine.config, disk_bytes, progress)
                        .await?
                };
                self.templates
                    .read()
                    .await
                    .warm_start(&self.vmm, &tpl.id, &id, &target)
                    .await
                    .map_err(PortError::of)?;
            }
            BootMode::Cold => {
                let initrd = self.vmm.runtime_dir(&id).dir.with_extension("initrd");
                if let Some(parent) = initrd.parent() {
                    std::fs::create_dir_all(parent).map_err(PortError::of)?;
                }
                crate::initrd::write(&self.init, &initrd).map_err(PortError::of)?;
                let layout = GuestLayout {
                    kernel: self.kernel.display().to_string(),
                    initrd: initrd.display().to_string(),
                    root_drive: "rootfs".into(),
                    vsock: "vsock.sock".into(),
                    nic: Some((net.tap.clone(), net.mac.clone())),
                };
                let mut cfg = guest_vm_config(&id, machine.config, self.kind, &layout);
                cfg.links = vec![("rootfs".into(), disk.image_path.clone())];
                cfg.cpu_milli = Some(app.resources.cpu_milli);
                self.vmm.create(&cfg).await.map_err(PortError::of)?;
                self.vmm.start(&id).await.map_err(PortError::of)?;
            }
        }
        Ok(())
    }

    async fn alive(&self) -> HashSet<Uuid> {
        let mut alive = HashSet::new();
        for id in self.vmm.list().await {
            if let Ok(vm) = id.parse::<Uuid>() {
                if self.vmm.alive(&id).await {
                    alive.insert(vm);
                }
            }
        }
        alive
    }

    async fn reattach(&self) -> PortResult<(Vec<String>, Vec<String>)> {
        self.vmm.reattach().await.map_err(PortError::of)
    }

    async fn deprovision(&self, vm: Uuid) -> PortResult<()> {
        self.teardown(vm).await.map(drop).map_err(PortError::of)
    }

    async fn hand_over(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        image: &Self::Image,
        root: &RootDisk,
        net: &VmNetwork,
        secrets: BTreeMap<String, String>,
        budget: Duration,
    ) -> PortResult<()> {
        let id = vm.to_string();
        let disk = &root.disk;
        if matches!(root.origin, Origin::AppSnapshot(_)) {
            return self.reidentify(vm, app, net, budget).await;
        }
        if matches!(root.origin, Origin::ImageTemplate(_)) {
            self.grow_root_online(&id, disk, app.resources.disk_bytes, budget)
                .await?;
        }
        let uds = self.vmm.runtime_dir(&id).vsock();
        let client = tokio::task::spawn_blocking(move || wait_ready(&uds, budget))
            .await
            .map_err(PortError::of)?
            .map_err(|e| {
                PortError(format!(
                    "{e}\n--- guest console ---\n{}",
                    self.vmm.console_tail(&id, 20)
                ))
            })?
            .0;
        let (clock, entropy) = fresh_clock_and_entropy()?;
        let root_bytes = std::fs::metadata(&disk.image_path).map(|m| m.len()).ok();
        let mut rc = crate::runconfig::run_config(
            app,
            &image.0.config,
            Some(guest_net(net)),
            secrets,
            clock,
            entropy,
        )
        .map_err(PortError::of)?;
        rc.root_device_bytes = root_bytes;
        rc.hostname = vm_hostname(&app.name, vm);
        if matches!(root.origin, Origin::ImageTemplate(_)) {
            // The image template's guest has its root mounted already.
            rc.root_device = String::new();
            rc.root_device_bytes = None;
        }
        let uds = self.vmm.runtime_dir(&id).vsock();
        tokio::task::spawn_blocking(move || {
            crate::guest::run_after_restore(&uds, client, rc, budget)
        })
        .await
        .map_err(PortError::of)?
        .map(drop)
        .map_err(PortError::of)
    }

    async fn suspend(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        cancel: &CancellationToken,
    ) -> PortResult<Suspension> {
        self.suspend_vm(vm, app, cancel).await
    }

    async fn wake(&self, vm: Uuid, app: &DesiredApp) -> PortResult<()> {
        self.wake_vm(vm, app).await
    }

    async fn settle(&self, vm: Uuid) -> PortResult<VmState> {
        self.settle_vm(vm).await
    }

    fn forget_suspended(&self, keep: &HashSet<Uuid>) {
        Platform::forget_suspended(self, keep)
    }

    async fn forget_image_templates(&self, used: &HashSet<String>) -> PortResult<()> {
        Platform::forget_image_templates(self, used, self.image_template_ttl).await
    }

    fn has_app_snapshot(&self, app: &str, version: &str) -> bool {
        self.app_snapshot_disk(app, version).is_some()
    }

    async fn take_app_snapshot(&self, vm: Uuid, app: &DesiredApp, version: &str) -> PortResult<()> {
        Platform::take_app_snapshot(self, vm, app, version).await
    }

    async fn forget_app_snapshots(&self, keep: &HashSet<(String, String)>) -> PortResult<()> {
        Platform::forget_app_snapshots(self, keep).await
    }

    fn health_check(&self, check: &HealthCheck) -> HealthCheck {
        health::for_host(check, self.kind)
    }

    async fn probe(
        &self,
        ip: std::net::Ipv4Addr,
        check: &HealthCheck,
    ) -> Result<(), health::ProbeFailure> {
        health::probe(ip, check).await
    }
}
