//! The executor's ports: what it needs from the host, and nothing else.
//!
//! The real adapter is [`crate::provision::Platform`] (OCI pulls, ZFS clones, netlink and
//! nftables, Firecracker, the guest init over vsock) and [`crate::endpoint::Endpoints`]
//! (the app's stable endpoint). Tests of the control logic put an in-memory fake behind
//! the same traits (`reconciler::fake`) that can be told to be slow, fail or crash at any
//! step, so crash recovery, ordering, backoff and concurrency are proven in milliseconds.
//!
//! One trait with five groups (images, disks, network, VMs, guest) rather than five
//! traits: the steps hand each other their results (an image to the disk step, a disk and
//! a network to the VM step), which associated types express directly; five traits would
//! need a chain of super-traits and would not make either implementation smaller.
//!
//! Every method is idempotent or safe to repeat after a crash: `deprovision` removes
//! whatever part of a VM exists, so a step interrupted anywhere is undone by it.

use std::collections::HashSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use uuid::Uuid;

use tokio_util::sync::CancellationToken;

use super::VmState;
use crate::endpoint::{Backend, Published};
use crate::health::ProbeFailure;
use crate::provision::BootMode;
use crate::spec::{DesiredApp, HealthCheck};

/// Why a platform step failed, in words for the event log and `ps`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PortError(pub String);

impl PortError {
    pub fn of(e: impl std::fmt::Display) -> PortError {
        PortError(e.to_string())
    }
}

pub type PortResult<T> = Result<T, PortError>;

/// How a suspend ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Suspension {
    /// Snapshotted and stopped: `freed_bytes` of host memory (the VM process's resident
    /// set) came back.
    Suspended { freed_bytes: u64 },
    /// Called off (a connection arrived, or a step failed) and the VM resumed as it was.
    Resumed { why: String },
}

/// Progress lines of a step (for `apply`'s output).
pub type Progress<'a> = &'a (dyn Fn(String) + Send + Sync);

/// The host as the executor sees it.
pub trait Ports: Send + Sync + 'static {
    /// A pulled image with its base root disk.
    type Image: Send + Sync;
    /// A VM's own root disk.
    type Disk: Send + Sync;
    /// A VM's network attachment (TAP, lease, QoS, fence).
    type Net: Send + Sync;

    /// Seconds since the Unix epoch (for backoff and record ages).
    fn now(&self) -> u64;

    // ---- images ------------------------------------------------------------------------

    /// Pulls the app's image (or finds it cached, digests verified) and makes sure its
    /// base root disk exists.
    fn pull(
        &self,
        app: &DesiredApp,
        progress: Progress<'_>,
    ) -> impl Future<Output = PortResult<Self::Image>> + Send;

    /// The image's content digest (`sha256:...`), recorded on the VM.
    fn digest(image: &Self::Image) -> String;

    // ---- disks -------------------------------------------------------------------------

    /// The VM's copy-on-write root disk: from the version's app snapshot, the image's
    /// template (warm starts) or the image's base; `mode` is how the VM will start.
    fn clone_disk(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        image: &Self::Image,
        mode: BootMode,
        progress: Progress<'_>,
    ) -> impl Future<Output = PortResult<Self::Disk>> + Send;

    /// Ids of every VM disk on the host (the orphan sweep compares them to the records).
    fn disk_owners(&self) -> impl Future<Output = PortResult<Vec<String>>> + Send;

    // ---- network -----------------------------------------------------------------------

    /// TAP, leased IP, QoS and fence for the VM.
    fn wire(
        &self,
        vm: Uuid,
        app: &DesiredApp,
    ) -> impl Future<Output = PortResult<Self::Net>> + Send;

    /// The VM's address on the bridge.
    fn ip(net: &Self::Net) -> Ipv4Addr;

    /// Re-applies fence and QoS of a VM that an earlier agent started.
    fn rewire(&self, vm: Uuid, app: &DesiredApp) -> impl Future<Output = PortResult<()>> + Send;

    /// Ids of every VM holding an IP lease.
    fn lease_owners(&self) -> PortResult<Vec<String>>;

    // ---- VMs ---------------------------------------------------------------------------

    /// Time a guest may take to reach its init, booted or restored.
    fn boot_budget(&self, mode: BootMode) -> Duration;

    /// Starts the VM (restored from a template, or booted) on its disk and network.
    fn boot(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        mode: BootMode,
        disk: &Self::Disk,
        net: &Self::Net,
        progress: Progress<'_>,
    ) -> impl Future<Output = PortResult<()>> + Send;

    /// The VMs whose process runs.
    fn alive(&self) -> impl Future<Output = HashSet<Uuid>> + Send;

    /// Takes back VMs an earlier agent left running: (re-attached, found dead).
    fn reattach(&self) -> impl Future<Output = PortResult<(Vec<String>, Vec<String>)>> + Send;

    /// Stops the VM and removes everything it owns (VM, network, lease, disk).
    /// Idempotent: works on whatever part exists.
    fn deprovision(&self, vm: Uuid) -> impl Future<Output = PortResult<()>> + Send;

    // ---- scale to zero ------------------------------------------------------------------

    /// Pauses the VM, snapshots its memory and state, and stops its process, keeping its
    /// disk, network and the snapshot. If `cancel` fires before the process is stopped,
    /// or a step fails, the VM is resumed as it was (`Resumed`). An error: it could not
    /// be resumed either.
    fn suspend(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        cancel: &CancellationToken,
    ) -> impl Future<Output = PortResult<Suspension>> + Send;

    /// Restores a suspended VM from its snapshot on its own disk and network, gives the
    /// guest the time and fresh entropy, and deletes the snapshot.
    fn wake(&self, vm: Uuid, app: &DesiredApp) -> impl Future<Output = PortResult<()>> + Send;

    /// What a VM whose suspend or wake an agent restart cut short is now: `Running` (its
    /// process runs; resumed if it was left paused), `Suspended` (its snapshot is
    /// complete and the process gone) or `Exited` (neither).
    fn settle(&self, vm: Uuid) -> impl Future<Output = PortResult<VmState>> + Send;

    /// Deletes the suspend snapshots of VMs not in `keep` (the recorded ones).
    fn forget_suspended(&self, keep: &HashSet<Uuid>);

    /// Deletes image templates of images no recorded VM runs (`used`: their digests),
    /// once they are old enough.
    fn forget_image_templates(
        &self,
        used: &HashSet<String>,
    ) -> impl Future<Output = PortResult<()>> + Send;

    // ---- app snapshots -----------------------------------------------------------------

    /// Whether the app's version has a usable app snapshot (new VMs then start from it).
    fn has_app_snapshot(&self, app: &str, version: &str) -> bool;

    /// Snapshots the healthy VM `vm` (a pause of about half a second) as its version's
    /// app snapshot.
    fn take_app_snapshot(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        version: &str,
    ) -> impl Future<Output = PortResult<()>> + Send;

    /// Deletes app snapshots of every (app, version) not in `keep`.
    fn forget_app_snapshots(
        &self,
        keep: &HashSet<(String, String)>,
    ) -> impl Future<Output = PortResult<()>> + Send;

    // ---- guest -------------------------------------------------------------------------

    /// Waits for the guest init and hands it its run config (identity, env, secrets).
    #[allow(clippy::too_many_arguments)]
    fn hand_over(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        image: &Self::Image,
        disk: &Self::Disk,
        net: &Self::Net,
        secrets: std::collections::BTreeMap<String, String>,
        budget: Duration,
    ) -> impl Future<Output = PortResult<()>> + Send;

    /// The health check as it applies on this host (stretched on slow hosts).
    fn health_check(&self, check: &HealthCheck) -> HealthCheck;

    /// One health probe of the VM at `ip`.
    fn probe(
        &self,
        ip: Ipv4Addr,
        check: &HealthCheck,
    ) -> impl Future<Output = Result<(), ProbeFailure>> + Send;
}

/// The app's stable endpoint: where its published ports lead (its replicas).
pub trait Frontend: Send + Sync + 'static {
    /// Points the app's ports at `backends`; returns the previous ones.
    fn publish(
        &self,
        app: &str,
        ports: &[Published],
        backends: &[Backend],
    ) -> Result<Vec<Backend>, String>;
    fn unpublish(&self, app: &str);
    fn backends(&self, app: &str) -> Vec<Backend>;
    fn is_current(&self, app: &str, ports: &[Published], backends: &[Backend]) -> bool;
    fn published_apps(&self) -> Vec<String>;
    /// Waits until `vm` has no open connections through the endpoint, at most `limit`;
    /// returns how many were still open.
    fn drain(&self, vm: Uuid, limit: Duration) -> impl Future<Output = usize> + Send;
    /// The app endpoint's traffic: how long no connection has been open, and how many
    /// connections are held waiting for a VM (its set is empty: the app is suspended).
    /// None: the app has no endpoint.
    fn activity(&self, app: &str) -> Option<(Duration, usize)>;
    /// `notify` is told whenever a connection starts waiting for a VM.
    fn on_waiting(&self, notify: std::sync::Arc<tokio::sync::Notify>);
}

impl Frontend for crate::endpoint::Endpoints {
    fn publish(
        &self,
        app: &str,
        ports: &[Published],
        backends: &[Backend],
    ) -> Result<Vec<Backend>, String> {
        crate::endpoint::Endpoints::publish(self, app, ports, backends).map_err(|e| e.to_string())
    }
    fn unpublish(&self, app: &str) {
        crate::endpoint::Endpoints::unpublish(self, app)
    }
    fn backends(&self, app: &str) -> Vec<Backend> {
        crate::endpoint::Endpoints::backends(self, app)
    }
    fn is_current(&self, app: &str, ports: &[Published], backends: &[Backend]) -> bool {
        crate::endpoint::Endpoints::is_current(self, app, ports, backends)
    }
    fn published_apps(&self) -> Vec<String> {
        crate::endpoint::Endpoints::published_apps(self)
    }
    async fn drain(&self, vm: Uuid, limit: Duration) -> usize {
        crate::endpoint::Endpoints::drain(self, vm, limit).await
    }
    fn activity(&self, app: &str) -> Option<(Duration, usize)> {
        crate::endpoint::Endpoints::activity(self, app)
    }
    fn on_waiting(&self, notify: std::sync::Arc<tokio::sync::Notify>) {
        crate::endpoint::Endpoints::on_waiting(self, notify)
    }
}
