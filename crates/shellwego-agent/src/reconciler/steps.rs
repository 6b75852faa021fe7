//! One VM's provision as named steps, each bounded by a deadline and recorded before it
//! runs: image -> root disk -> network -> VM -> guest. The same pipeline runs behind the
//! real platform and behind the tests' fake one.
//!
//! On any failure (an error, a missed deadline, a cancellation) whatever was made for the
//! VM is removed again through `deprovision`, which works on any partial VM.
//!
//! Cancellation (the app was removed while its VM was being built) takes effect at once
//! during the pull, which only downloads into the content store and is safe to drop, and
//! otherwise at the next step boundary: the other steps run blocking work (ZFS, the
//! jailer, a template build) that must not be cut in the middle, and each has a deadline.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use super::ports::{PortResult, Ports, Progress};
use crate::provision::{BootMode, Phase};
use crate::spec::DesiredApp;

/// The longest each step may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlines {
    /// Resolving, downloading and unpacking an image, and building its base disk.
    pub pull: Duration,
    /// Cloning the root disk.
    pub disk: Duration,
    /// TAP, lease, QoS and fence.
    pub network: Duration,
    /// Reaching the guest init and handing over the run config.
    pub guest: Duration,
    /// Removing a VM and everything it owns.
    pub teardown: Duration,
}

/// The default bound of a pull: a large image over a slow link, not a stalled registry.
pub const PULL_DEADLINE: Duration = Duration::from_secs(15 * 60);

impl Deadlines {
    /// Deadlines for `mode` on this platform (boots are slower on emulated hosts).
    pub fn for_platform<P: Ports>(platform: &P, mode: BootMode) -> Deadlines {
        Deadlines {
            pull: PULL_DEADLINE,
            disk: Duration::from_secs(5 * 60),
            network: Duration::from_secs(60),
            guest: platform.boot_budget(mode) + Duration::from_secs(30),
            teardown: Duration::from_secs(120),
        }
    }
}

/// Why a provision failed, and at which step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {message}")]
pub struct StepError {
    pub step: &'static str,
    pub message: String,
}

/// The message of a provision stopped because its app was removed.
pub const CANCELLED: &str = "cancelled: the VM is no longer wanted";

/// What a provision made.
pub struct Provisioned<P: Ports> {
    pub image: P::Image,
    pub disk: P::Disk,
    pub net: P::Net,
    pub phases: Vec<Phase>,
}

/// One provision's settings.
pub struct Steps<'a, P: Ports> {
    pub platform: &'a P,
    pub deadlines: &'a Deadlines,
    pub mode: BootMode,
    pub cancel: &'a CancellationToken,
    /// Told each step's name before it runs (the executor records it).
    pub on_step: &'a (dyn Fn(&'static str) + Send + Sync),
    pub progress: Progress<'a>,
}

impl<P: Ports> Steps<'_, P> {
    /// Builds and starts VM `vm` for `app`; on failure removes what was made.
    pub async fn provision(
        &self,
        app: &DesiredApp,
        vm: Uuid,
        secrets: BTreeMap<String, String>,
    ) -> Result<Provisioned<P>, StepError> {
        let result = self.build(app, vm, secrets).await;
        if result.is_err() {
            (self.on_step)("cleanup");
            if let Err(e) = teardown(self.platform, vm, self.deadlines.teardown).await {
                warn!(%vm, error = %e, "cleanup after a failed provision");
            }
        }
        result
    }

    async fn build(
        &self,
        app: &DesiredApp,
        vm: Uuid,
        secrets: BTreeMap<String, String>,
    ) -> Result<Provisioned<P>, StepError> {
        let (p, d) = (self.platform, self.deadlines);
        let mut phases = Vec::new();
        let image = self
            .step(
                "pull",
                Some(d.pull),
                &mut phases,
                p.pull(app, self.progress),
            )
            .await?;
        crate::fault::point("after-pull", self.progress).await;
        (self.progress)(format!(
            "cloning root disk from {}",
            shellwego_storage::image::short_digest(&P::digest(&image))
        ));
        let disk = self
            .step(
                "rootfs",
                Some(d.disk),
                &mut phases,
                p.clone_disk(vm, app, &image, self.mode, self.progress),
            )
            .await?;
        crate::fault::point("after-clone", self.progress).await;
        let net = self
            .step("network", Some(d.network), &mut phases, p.wire(vm, app))
            .await?;
        (self.progress)(format!("network: {}", P::ip(&net)));
        // No outer deadline here: cut mid-way, a VM start or a template build would leave
        // a firecracker that nothing knows of. Each of its waits is bounded inside
        // (Firecracker API requests, the jailer's start, the template's boot budget).
        let boot = p.boot(vm, app, self.mode, &disk, &net, self.progress);
        self.step("vm", None, &mut phases, boot).await?;
        crate::fault::point("after-vm-start", self.progress).await;
        (self.progress)("waiting for the guest init".into());
        let budget = p.boot_budget(self.mode);
        let hand_over = p.hand_over(vm, app, &image, &disk, &net, secrets, budget);
        self.step("guest", Some(d.guest), &mut phases, hand_over)
            .await?;
        Ok(Provisioned {
            image,
            disk,
            net,
            phases,
        })
    }

    /// Runs one step: recorded first, bounded by `limit` (if any), timed into `phases`.
    async fn step<T>(
        &self,
        name: &'static str,
        limit: Option<Duration>,
        phases: &mut Vec<Phase>,
        work: impl Future<Output = PortResult<T>>,
    ) -> Result<T, StepError> {
        let fail = |message: String| StepError {
            step: name,
            message,
        };
        if self.cancel.is_cancelled() {
            return Err(fail(CANCELLED.into()));
        }
        (self.on_step)(name);
        let t = Instant::now();
        let cancellable = name == "pull";
        let bounded = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, work)
                    .await
                    .map_err(|_| fail(format!("no result within its deadline of {limit:?}"))),
                None => Ok(work.await),
            }
        };
        let outcome = tokio::select! {
            biased;
            () = self.cancel.cancelled(), if cancellable => return Err(fail(CANCELLED.into())),
            outcome = bounded => outcome,
        };
        let value = outcome?.map_err(|e| fail(e.0))?;
        phases.push(Phase {
            name,
            took: t.elapsed(),
        });
        Ok(value)
    }
}

/// `deprovision` bounded by `limit`.
pub async fn teardown<P: Ports>(platform: &P, vm: Uuid, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, platform.deprovision(vm)).await {
        Ok(result) => result.map_err(|e| e.0),
        Err(_) => Err(format!(
            "removal did not finish within its deadline of {limit:?}"
        )),
    }
}
