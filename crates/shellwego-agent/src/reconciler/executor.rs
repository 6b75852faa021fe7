//! The executor: observes what runs, asks `plan` what to do, and does it, recording every
//! step in the agent's database before and after it runs.
//!
//! Crash safety: a VM record is written (`Starting`, step "provisioning") before anything
//! is built for it. After an agent restart a record still `Starting` that no task of this
//! process owns is an interrupted provision: it is observed as `Exited`, so the plan
//! removes it — `deprovision` cleans whatever part exists (VM, TAP, IFB, QoS, lease,
//! dataset) — and then creates a fresh VM. A `Running` record whose firecracker is gone
//! is likewise `Exited`.
//!
//! Blue-green: a new version's VM starts beside the old one; once its health check
//! passes, the app's endpoint (see [`crate::endpoint`]) is switched to it, and only then
//! does the plan retire the old VM: its open connections drain (bounded by
//! `DRAIN_LIMIT`), then it is stopped and removed. A new VM that never becomes healthy
//! is removed and the old one keeps serving.
//!
//! Secrets: `apply` hands their values over once; they are sealed with the vault's key
//! and stored, and opened again for every VM that is created (also after an agent
//! restart), then sent to the guest init over vsock only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tracing::{info, warn};
use uuid::Uuid;

use super::{plan, Action, ActualState, FailureRecord, Health, RemoveReason, VmState};
use crate::endpoint::{Backend, Endpoints, Published};
use crate::health;
use crate::provision::{BootMode, Platform};
use crate::spec::DesiredApp;
use crate::state::{now_secs, StateError, Store, VmRow};
use crate::vault::{Vault, VaultError};

/// How long a retired VM's open connections may take to finish before it is stopped.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Why an app's secrets could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    State(#[from] StateError),
}

pub struct Executor {
    pub platform: Arc<Platform>,
    pub store: Arc<Store>,
    pub mode: BootMode,
    pub endpoints: Endpoints,
    /// Seals secret values before they reach the database.
    vault: Vault,
    /// VMs whose provision runs in this process.
    in_flight: Mutex<HashSet<Uuid>>,
    /// Serialises reconcile passes.
    pass: Mutex<()>,
    /// Consecutive failed health probes of running VMs.
    probe_failures: Mutex<HashMap<Uuid, u32>>,
}

impl Executor {
    pub fn new(
        platform: Arc<Platform>,
        store: Arc<Store>,
        mode: BootMode,
        vault: Vault,
        endpoints: Endpoints,
    ) -> Executor {
        Executor {
            platform,
            store,
            mode,
            endpoints,
            vault,
            in_flight: Mutex::new(HashSet::new()),
            pass: Mutex::new(()),
            probe_failures: Mutex::new(HashMap::new()),
        }
    }

    /// Seals and stores an app's secret values (replacing earlier ones).
    pub fn set_secrets(
        &self,
        app: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<(), SecretsError> {
        if values.is_empty() {
            return Ok(self.store.remove_sealed_secrets(app)?);
        }
        let sealed = self.vault.seal(app, values)?;
        Ok(self.store.put_sealed_secrets(app, &sealed)?)
    }

    /// The app's secret values, opened from the database.
    fn secrets(&self, app: &str) -> Result<BTreeMap<String, String>, SecretsError> {
        match self.store.sealed_secrets(app)? {
            None => Ok(BTreeMap::new()),
            Some(sealed) => Ok(self.vault.open(app, &sealed)?),
        }
    }

    /// Forgets an app's secrets (when the app is removed).
    pub fn forget_secrets(&self, app: &str) -> Result<(), StateError> {
        self.store.remove_sealed_secrets(app)
    }

    fn event(&self, app: &str, vm: Option<Uuid>, msg: impl Into<String>) {
        let msg = msg.into();
        info!(app, vm_id = ?vm, "{msg}");
        if let Err(e) = self.store.event(app, vm, msg) {
            warn!(error = %e, "cannot record event");
        }
    }

    /// Re-attaches to VMs an earlier agent left running and restores their network QoS.
    pub async fn recover(&self) -> Result<(), StateError> {
        let (attached, dead) = self.platform.vmm.reattach().await.unwrap_or_default();
        for id in &dead {
            warn!(vm_id = %id, "VM found dead at start");
        }
        let desired = self.store.desired()?;
        for mut row in self.store.vms()? {
            if row.state == VmState::Starting {
                // A provision the last agent did not finish: whatever part of it exists
                // is removed now, and the next pass starts the VM afresh. Once is not a
                // failure of the version; the same provision interrupted again is (it
                // may be what takes the agent down), so a crash loop turns into backoff.
                let prev = self.store.failures()?.remove(&row.app);
                let f =
                    FailureRecord::interrupted(prev.as_ref(), &row.version, &row.step, now_secs());
                if f.attempts > prev.as_ref().map_or(0, |p| p.attempts) {
                    self.event(&row.app, Some(row.vm_id), f.reason.clone());
                }
                self.store.put_failure(&row.app, &f)?;
                self.event(
                    &row.app,
                    Some(row.vm_id),
                    format!(
                        "provision interrupted by an agent restart (step {}): cleaning up, it starts again",
                        row.step
                    ),
                );
                match self.platform.deprovision(row.vm_id).await {
                    Ok(_) => self.store.remove_vm(row.vm_id)?,
                    Err(e) => {
                        row.state = VmState::Exited;
                        row.last_error = Some(format!("cleanup of an interrupted provision: {e}"));
                        self.store.put_vm(&row)?;
                    }
                }
                continue;
            }
            if attached.contains(&row.vm_id.to_string()) {
                if let Some(app) = desired.apps.get(&row.app) {
                    let limits = shellwego_network::qos::Limits {
                        download_bps: app.bandwidth.download_bps,
                        upload_bps: app.bandwidth.upload_bps,
                    };
                    let id = row.vm_id.to_string();
                    // The fence's rules outlive the agent; re-applying makes them match
                    // this agent's rules and the app's policy.
                    let mac = crate::vmm::config::generate_mac(row.vm_id);
                    let network = &self.platform.network;
                    if let Err(e) =
                        network.reattach_fence(&id, &mac, &crate::provision::tenant(app))
                    {
                        warn!(vm_id = %row.vm_id, error = %e, "cannot re-apply the network fence of a re-attached VM");
                    }
                    if let Err(e) = network.reattach_qos(&id, limits).await {
                        warn!(vm_id = %row.vm_id, error = %e, "cannot restore network of re-attached VM");
                    }
                }
                self.event(&row.app, Some(row.vm_id), "re-attached after agent restart");
            }
        }
        self.sweep_orphans(&attached).await
    }

    /// Removes what this agent owns but has no record of: VMs, disks and leases left by a
    /// crash between making a resource and recording it.
    async fn sweep_orphans(&self, attached: &[String]) -> Result<(), StateError> {
        let known: HashSet<String> = self
            .store
            .vms()?
            .iter()
            .map(|r| r.vm_id.to_string())
            .collect();
        let mut orphans: HashSet<String> = attached
            .iter()
            .filter(|id| !known.contains(*id))
            .cloned()
            .collect();
        orphans.extend(
            self.platform
                .rootfs
                .vm_disks()
                .unwrap_or_default()
                .into_iter()
                .filter(|id| !known.contains(id)),
        );
        if let Ok(leases) = self.platform.network.ipam().leases() {
            orphans.extend(leases.into_keys().filter(|id| !known.contains(id)));
        }
        for id in orphans {
            let Ok(vm_id) = id.parse::<Uuid>() else {
                warn!(vm = %id, "unrecorded resource with a foreign name; left alone");
                continue;
            };
            warn!(%vm_id, "removing an orphaned VM's resources");
            if let Err(e) = self.platform.deprovision(vm_id).await {
                warn!(%vm_id, error = %e, "orphan cleanup failed");
            }
        }
        Ok(())
    }

    /// Probes running, healthy VMs of apps with a health check; after `retries`
    /// consecutive failures a VM counts as unhealthy (and the plan replaces it).
    async fn monitor(&self, row: &mut VmRow, apps: &BTreeMap<String, DesiredApp>) -> bool {
        let kind = self.platform.kind;
        let check = apps
            .get(&row.app)
            .and_then(|a| a.health.as_ref())
            .map(|c| health::for_host(c, kind));
        let (Some(check), Some(ip)) = (check, row.ip.as_deref().and_then(|ip| ip.parse().ok()))
        else {
            return false;
        };
        let result = health::probe(ip, &check).await;
        let mut fails = self.probe_failures.lock().await;
        match result {
            Ok(()) => {
                fails.remove(&row.vm_id);
                false
            }
            Err(e) if e.inconclusive => {
                warn!(vm = %row.vm_id, error = %e, "health probe could not run on this host; not counted");
                false
            }
            Err(e) => {
                let n = fails.entry(row.vm_id).or_insert(0);
                *n += 1;
                if *n < check.retries {
                    return false;
                }
                fails.remove(&row.vm_id);
                row.health = Health::Unhealthy;
                row.last_error = Some(format!("health check failed {} times: {e}", check.retries));
                true
            }
        }
    }

    /// A running VM whose health was still undecided when the last agent stopped (it died
    /// during the health wait): one probe per pass decides it, within the boot budget plus
    /// the grace period counted from the VM's creation. Returns true when decided.
    async fn resume_health_wait(
        &self,
        row: &mut VmRow,
        apps: &BTreeMap<String, DesiredApp>,
    ) -> bool {
        let check = apps
            .get(&row.app)
            .and_then(|a| a.health.as_ref())
            .map(|c| health::for_host(c, self.platform.kind));
        let ip = row.ip.as_deref().and_then(|ip| ip.parse().ok());
        let verdict = match (check, ip) {
            (None, _) => Ok(()),
            (Some(_), None) => Err("the VM has no IP".to_string()),
            (Some(check), Some(ip)) => match health::probe(ip, &check).await {
                Ok(()) => Ok(()),
                Err(e) if e.inconclusive => return false,
                Err(e) => {
                    let budget = self.platform.boot_budget(self.mode) + check.grace;
                    if now_secs().saturating_sub(row.created_at) < budget.as_secs() {
                        return false;
                    }
                    Err(format!("not healthy within {budget:?}: {e}"))
                }
            },
        };
        match verdict {
            Ok(()) => {
                row.health = Health::Healthy;
                let _ = self.store.clear_failure(&row.app);
                self.event(
                    &row.app,
                    Some(row.vm_id),
                    "healthy (health wait resumed after an agent restart)",
                );
            }
            Err(e) => {
                row.health = Health::Unhealthy;
                self.event(
                    &row.app,
                    Some(row.vm_id),
                    format!("health check failed: {e}"),
                );
                row.last_error = Some(e);
            }
        }
        true
    }

    /// The recorded state corrected by what is observed: dead processes and interrupted
    /// provisions are `Exited`.
    async fn observe(
        &self,
        apps: &BTreeMap<String, DesiredApp>,
    ) -> Result<ActualState, StateError> {
        let in_flight = self.in_flight.lock().await.clone();
        let known = self.platform.vmm.list().await;
        // Each VM is looked at on its own (probes of slow guests run side by side).
        let looks = self
            .store
            .vms()?
            .into_iter()
            .map(|row| self.observe_vm(row, apps, &in_flight, &known));
        for result in futures_util::future::join_all(looks).await {
            result?;
        }
        self.store.actual()
    }

    /// Corrects one VM's record by what is observed (process gone, health decided).
    async fn observe_vm(
        &self,
        mut row: VmRow,
        apps: &BTreeMap<String, DesiredApp>,
        in_flight: &HashSet<Uuid>,
        known: &[String],
    ) -> Result<(), StateError> {
        let id = row.vm_id.to_string();
        let dead = match row.state {
            VmState::Starting => !in_flight.contains(&row.vm_id),
            VmState::Running => {
                !known.contains(&id)
                    || !self
                        .platform
                        .vmm
                        .inspect(&id)
                        .await
                        .map(|s| s.alive)
                        .unwrap_or(false)
            }
            VmState::Exited => false,
        };
        if dead {
            row.state = VmState::Exited;
            row.last_error
                .get_or_insert_with(|| "the VM's process is gone".into());
            self.store.put_vm(&row)?;
        } else if row.state == VmState::Running
            && row.health == Health::Unknown
            && !in_flight.contains(&row.vm_id)
        {
            if self.resume_health_wait(&mut row, apps).await {
                self.store.put_vm(&row)?;
            }
        } else if row.state == VmState::Running
            && row.health == Health::Healthy
            && self.monitor(&mut row, apps).await
        {
            self.event(
                &row.app,
                Some(row.vm_id),
                row.last_error.clone().unwrap_or_default(),
            );
            self.store.put_vm(&row)?;
        }
        Ok(())
    }

    /// One pass: observe, plan, execute. Returns the number of actions carried out.
    pub async fn reconcile_once(&self) -> Result<usize, StateError> {
        let _pass = self.pass.lock().await;
        let desired = self.store.desired()?;
        let actual = self.observe(&desired.apps).await?;
        self.sync_endpoints(&desired.apps, Scope::All).await?;
        let actions = plan(&desired, &actual);
        for action in &actions {
            self.execute(action, &desired.apps).await?;
        }
        if !actions.is_empty() {
            release_freed_heap();
        }
        Ok(actions.len())
    }

    async fn execute(
        &self,
        action: &Action,
        apps: &BTreeMap<String, DesiredApp>,
    ) -> Result<(), StateError> {
        match action {
            Action::Create { app, version } | Action::Replace { app, version, .. } => {
                let Some(spec) = apps.get(app) else {
                    return Ok(());
                };
                self.create(spec, version).await
            }
            Action::Retire {
                app,
                vm_id,
                successor,
            } => {
                if self
                    .endpoints
                    .backend(app)
                    .is_some_and(|b| b.vm_id == *vm_id)
                {
                    // The endpoint could not be switched: the old VM keeps serving.
                    return Ok(());
                }
                self.event(
                    app,
                    Some(*vm_id),
                    format!("{successor} is healthy and serves the endpoint: draining the old VM"),
                );
                let t = Instant::now();
                let open = self.endpoints.drain(*vm_id, DRAIN_LIMIT).await;
                self.event(
                    app,
                    Some(*vm_id),
                    format!(
                        "drained in {:.1}s ({open} connections still open)",
                        t.elapsed().as_secs_f64()
                    ),
                );
                self.remove(app, *vm_id, None).await
            }
            Action::Remove { app, vm_id, reason } => {
                let failed = match reason {
                    RemoveReason::Failed {
                        counts_as_failure: true,
                    } => Some(()),
                    _ => None,
                };
                self.event(app, Some(*vm_id), format!("removing VM ({reason:?})"));
                self.remove(app, *vm_id, failed).await
            }
        }
    }

    async fn create(&self, app: &DesiredApp, version: &str) -> Result<(), StateError> {
        let vm_id = Uuid::new_v4();
        let mut row = VmRow {
            vm_id,
            app: app.name.clone(),
            version: version.to_string(),
            state: VmState::Starting,
            health: Health::Unknown,
            step: "provisioning".into(),
            ip: None,
            image_digest: None,
            created_at: now_secs(),
            last_error: None,
        };
        self.store.put_vm(&row)?;
        self.in_flight.lock().await.insert(vm_id);
        self.event(
            &app.name,
            Some(vm_id),
            format!("creating VM for version {version}"),
        );
        let store = self.store.clone();
        let name = app.name.clone();
        let progress = move |line: String| {
            let _ = store.event(&name, Some(vm_id), line);
        };
        let result = match self.secrets(&app.name) {
            Ok(secrets) => self
                .platform
                .provision(app, vm_id, secrets, self.mode, &progress)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("secrets: {e}")),
        };
        self.in_flight.lock().await.remove(&vm_id);
        match result {
            Err(e) => {
                row.state = VmState::Exited;
                row.health = Health::Unhealthy;
                row.step = "failed".into();
                row.last_error = Some(e.to_string());
                self.store.put_vm(&row)?;
                self.event(&app.name, Some(vm_id), format!("failed: {e}"));
            }
            Ok(vm) => {
                row.state = VmState::Running;
                row.step = "running".into();
                row.ip = Some(vm.net.ip.to_string());
                row.image_digest = Some(vm.image.digest.clone());
                self.store.put_vm(&row)?;
                let phases: Vec<String> = vm
                    .phases
                    .iter()
                    .map(|p| format!("{} {:.1}s", p.name, p.took.as_secs_f64()))
                    .collect();
                self.event(
                    &app.name,
                    Some(vm_id),
                    format!("VM running at {} ({})", vm.net.ip, phases.join(", ")),
                );
                row.health = match &app.health {
                    None => Health::Healthy,
                    Some(check) => {
                        self.event(&app.name, Some(vm_id), "waiting for the health check");
                        crate::fault::point("health-wait", |m| {
                            self.event(&app.name, Some(vm_id), m)
                        })
                        .await;
                        let check = health::for_host(check, self.platform.kind);
                        match health::wait_healthy(vm.net.ip, &check, check.grace).await {
                            Ok(_) => Health::Healthy,
                            Err(e) => {
                                row.last_error = Some(e.clone());
                                self.event(
                                    &app.name,
                                    Some(vm_id),
                                    format!("health check failed: {e}"),
                                );
                                Health::Unhealthy
                            }
                        }
                    }
                };
                self.store.put_vm(&row)?;
                if row.health == Health::Healthy {
                    self.store.clear_failure(&app.name)?;
                    self.event(&app.name, Some(vm_id), "healthy");
                    let apps = BTreeMap::from([(app.name.clone(), app.clone())]);
                    self.sync_endpoints(&apps, Scope::These).await?;
                }
            }
        }
        Ok(())
    }

    async fn remove(&self, app: &str, vm_id: Uuid, failed: Option<()>) -> Result<(), StateError> {
        if let Some(mut row) = self.store.vm(vm_id)? {
            row.step = "removing".into();
            self.store.put_vm(&row)?;
            if failed.is_some() {
                let prev = self.store.failures()?.remove(app);
                let mut f = FailureRecord::next(prev.as_ref(), &row.version, now_secs());
                f.reason = row.last_error.clone().unwrap_or_default();
                self.event(
                    app,
                    Some(vm_id),
                    format!(
                        "attempt {} of version {} failed; next try after {}s",
                        f.attempts,
                        f.version,
                        super::backoff(f.attempts).as_secs()
                    ),
                );
                self.store.put_failure(app, &f)?;
            }
        }
        self.event(app, Some(vm_id), "stopping the VM");
        if let Err(e) = self.platform.deprovision(vm_id).await {
            self.event(
                app,
                Some(vm_id),
                format!("cleanup failed (will retry): {e}"),
            );
            return Ok(());
        }
        self.store.remove_vm(vm_id)?;
        self.event(app, Some(vm_id), "VM removed");
        Ok(())
    }

    /// Points each app's endpoint at the VM that should serve it: the desired version's
    /// VM once it is healthy, otherwise the newest healthy VM of the app. Listeners of apps
    /// that are gone, or publish no port any more, are closed when `apps` is the whole
    /// desired state (`Scope::All`).
    async fn sync_endpoints(
        &self,
        apps: &BTreeMap<String, DesiredApp>,
        scope: Scope,
    ) -> Result<(), StateError> {
        let rows = self.store.vms()?;
        if scope == Scope::All {
            for name in self.endpoints.published_apps() {
                if apps.get(&name).is_none_or(|a| published(a).is_empty()) {
                    self.endpoints.unpublish(&name);
                    self.event(&name, None, "endpoint closed");
                }
            }
        }
        for (name, app) in apps {
            let ports = published(app);
            if ports.is_empty() {
                continue;
            }
            let version = app.spec_hash();
            let serving = rows
                .iter()
                .filter(|r| {
                    r.app == *name && r.state == VmState::Running && r.health == Health::Healthy
                })
                .filter_map(|r| Some((r, r.ip.as_deref()?.parse::<Ipv4Addr>().ok()?)))
                .max_by_key(|(r, _)| (r.version == version, r.created_at));
            let Some((row, ip)) = serving else {
                continue;
            };
            let backend = Backend {
                vm_id: row.vm_id,
                ip,
            };
            if self.endpoints.is_current(name, &ports, backend) {
                continue;
            }
            let hosts: Vec<String> = ports
                .iter()
                .map(|p| format!(":{}/{}", p.host, p.protocol))
                .collect();
            match self.endpoints.publish(name, &ports, backend) {
                Ok(Some(previous)) if previous == backend => self.event(
                    name,
                    Some(row.vm_id),
                    format!("endpoint {} updated", hosts.join(",")),
                ),
                Ok(previous) => {
                    self.event(
                        name,
                        Some(row.vm_id),
                        format!(
                            "endpoint {} switched to {ip} (was {})",
                            hosts.join(","),
                            previous.map_or("none".to_string(), |p| p.ip.to_string())
                        ),
                    );
                    crate::fault::point("after-switch", |m| self.event(name, Some(row.vm_id), m))
                        .await;
                }
                Err(e) => self.event(name, Some(row.vm_id), format!("endpoint: {e}")),
            }
        }
        Ok(())
    }

    /// Reconciles every `period` and whenever `wake` is notified, forever.
    /// A pass that carried out actions is followed at once by another (a new VM that
    /// became healthy lets the next pass retire the old one without waiting), up to
    /// three in a row, so an action that keeps failing cannot spin.
    pub async fn run(self: Arc<Self>, wake: Arc<tokio::sync::Notify>, period: Duration) {
        let mut back_to_back = 0;
        loop {
            match self.reconcile_once().await {
                Ok(n) if n > 0 && back_to_back < 3 => {
                    back_to_back += 1;
                    continue;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "reconcile pass failed"),
            }
            back_to_back = 0;
            let _ = tokio::time::timeout(period, wake.notified()).await;
        }
    }
}

/// The app's published ports.
fn published(app: &DesiredApp) -> Vec<Published> {
    app.ports
        .iter()
        .filter_map(|p| {
            Some(Published {
                host: p.host?,
                guest: p.guest,
                protocol: p.protocol,
            })
        })
        .collect()
}

/// Which apps `sync_endpoints` was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The whole desired state: endpoints of other apps are closed.
    All,
    /// Only these apps: other endpoints are left alone.
    These,
}

/// Hands memory freed by a pass that did something (layer unpacking, image and HTTP
/// buffers) back to the OS: glibc keeps freed heap in its per-thread arenas, which showed
/// as tens of MiB of resident memory in a long-running agent.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
