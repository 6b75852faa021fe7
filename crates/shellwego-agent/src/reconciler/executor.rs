//! The executor: observes what runs, asks `plan` what to do, and launches each action as
//! its own task keyed by the VM it acts on, recording every step in the agent's database
//! before and after it runs.
//!
//! Control flow (after kube-rs' controller): a pass only observes, plans and launches; it
//! never waits for a VM. Provisions, health waits, probes, drains and removals run as
//! tasks, at most one per VM; a VM with a task in flight is left alone by the pass until
//! the task ends, and each ending task wakes the next pass. Different apps never wait for
//! each other. Provisions take a slot of a fair (first come, first served) semaphore, so
//! a burst of applies builds at most `max_provisions` VMs at once; removals, drains and
//! probes take none and run at once.
//!
//! Crash safety: a VM record is written (`Starting`, step "queued") before anything is
//! built for it, and each step ("pull", "rootfs", "network", "vm", "guest",
//! "health-wait") is recorded before it runs. After an agent restart a record still
//! `Starting` is an interrupted provision: `recover` removes whatever part of it exists
//! and the next pass creates a fresh VM. A `Running` record whose process is gone is
//! `Exited` and is replaced.
//!
//! Blue-green: a new version's VM starts beside the old one; once its health check
//! passes, the app's endpoint is switched to it, and only then does the plan retire the
//! old VM: its open connections drain (bounded by `DRAIN_LIMIT`), then it is stopped and
//! removed. A new VM that never becomes healthy is removed and the old one keeps serving.
//!
//! Scale to zero: a `Suspend` task takes the VM out of the endpoint's set (new
//! connections are held), pauses and snapshots it and stops its process; a connection
//! that arrives meanwhile cancels it, and the VM is resumed as it was. A `Wake` task
//! restores it from that snapshot and puts it back in the set, which releases the held
//! connections. Each step is recorded ("suspending", "suspended", "waking"), and a
//! restart that cuts one short settles the VM by what exists (`Ports::settle`).
//!
//! Secrets: `apply` hands their values over once; they are sealed with the vault's key
//! and stored, and opened again for every VM that is created (also after an agent
//! restart), then sent to the guest init over vsock only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex as SyncMutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::ports::{Frontend, Ports, Suspension};
use super::steps::{teardown, Deadlines, Steps, CANCELLED};
use super::{plan, Action, Activity, DesiredState, FailureRecord, Health, RemoveReason, VmState};
use crate::endpoint::{Backend, Published};
use crate::provision::BootMode;
use crate::spec::{DesiredApp, HealthCheck};
use crate::state::{StateError, Store, VmRow};
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

/// How the executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub mode: BootMode,
    /// Provisions building at once; more wait their turn in arrival order.
    pub max_provisions: usize,
    pub deadlines: Deadlines,
}

/// The default number of provisions building at once: twice the host's cores (a
/// provision mostly waits for I/O and the guest), at least 2, at most 16.
pub fn default_max_provisions() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 2).clamp(2, 16)
}

/// What a VM's task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Provision,
    HealthWait,
    Probe,
    Retire,
    Remove,
    Suspend,
    Wake,
    /// Taking the app snapshot of the VM's version.
    Snapshot,
}

/// Wakes of one VM that may fail in a row before it is given up (and replaced).
const MAX_WAKE_TRIES: u32 = 4;

/// How long after a failed app snapshot the next one of that version is tried.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(600);

/// A request to suspend or wake an app by hand (`shellwego suspend` / `wake`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    Suspend,
    Wake,
}

/// How long a request by hand stands before it lapses (an app that cannot be suspended
/// now is not suspended by surprise much later).
pub const DEMAND_LIFETIME: Duration = Duration::from_secs(60);

struct Task {
    kind: TaskKind,
    cancel: CancellationToken,
    /// Set right after the spawn (which happens outside the map's lock).
    abort: Option<tokio::task::AbortHandle>,
}

/// Health monitoring of one running VM.
#[derive(Debug, Clone, Copy)]
struct ProbeState {
    failures: u32,
    next_at: Instant,
}

pub struct Executor<P: Ports, F: Frontend> {
    pub platform: Arc<P>,
    pub store: Arc<Store>,
    pub frontend: Arc<F>,
    config: ExecutorConfig,
    /// Seals secret values before they reach the database.
    vault: Vault,
    provisions: Arc<Semaphore>,
    /// The task in flight per VM.
    tasks: SyncMutex<HashMap<Uuid, Task>>,
    /// Serialises passes (tasks run beside them).
    pass: Mutex<()>,
    probes: SyncMutex<HashMap<Uuid, ProbeState>>,
    /// VMs whose removal failed, and when it may be tried again (it doubles from 5 s to
    /// 5 min): a teardown that keeps failing is retried calmly, not in a loop.
    teardown_retry: SyncMutex<HashMap<Uuid, (Instant, u32)>>,
    /// Held from reading the records to publishing, so a pass and a task never publish
    /// sets computed from different moments (the older set would win).
    endpoint_sync: Mutex<()>,
    /// Requests by hand per app, with when they were made.
    demands: SyncMutex<HashMap<String, (Demand, Instant)>>,
    /// When each app last woke or had a suspend called off: its idle time counts from
    /// then at the latest.
    awake_since: SyncMutex<HashMap<String, Instant>>,
    /// Failed wakes per VM: when the next may run, and how many failed in a row.
    wake_failures: SyncMutex<HashMap<Uuid, (Instant, u32)>>,
    /// App snapshots launched or failed, per (app, version), and when.
    snapshot_tried: SyncMutex<HashMap<(String, String), Instant>>,
    /// Notified when a task ends, the desired state changes or a connection waits.
    pub wake: Arc<Notify>,
}

/// Removes a VM's task entry when the task ends (also if it panicked or was aborted) and
/// wakes the next pass.
struct TaskGuard<P: Ports, F: Frontend> {
    exec: Arc<Executor<P, F>>,
    vm: Uuid,
}

impl<P: Ports, F: Frontend> Drop for TaskGuard<P, F> {
    fn drop(&mut self) {
        self.exec.tasks().remove(&self.vm);
        self.exec.wake.notify_one();
    }
}

impl<P: Ports, F: Frontend> Executor<P, F> {
    pub fn new(
        platform: Arc<P>,
        store: Arc<Store>,
        frontend: Arc<F>,
        vault: Vault,
        config: ExecutorConfig,
    ) -> Executor<P, F> {
        let wake = Arc::new(Notify::new());
        frontend.on_waiting(wake.clone());
        Executor {
            platform,
            store,
            frontend,
            provisions: Arc::new(Semaphore::new(config.max_provisions.max(1))),
            config,
            vault,
            tasks: SyncMutex::new(HashMap::new()),
            pass: Mutex::new(()),
            probes: SyncMutex::new(HashMap::new()),
            teardown_retry: SyncMutex::new(HashMap::new()),
            endpoint_sync: Mutex::new(()),
            demands: SyncMutex::new(HashMap::new()),
            awake_since: SyncMutex::new(HashMap::new()),
            snapshot_tried: SyncMutex::new(HashMap::new()),
            wake_failures: SyncMutex::new(HashMap::new()),
            wake,
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Task>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn probes(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, ProbeState>> {
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for an app to be suspended or woken now (a later request replaces an earlier
    /// one); the next pass acts on it.
    pub fn demand(&self, app: &str, demand: Demand) {
        lock(&self.demands).insert(app.to_string(), (demand, Instant::now()));
        self.wake.notify_one();
    }

    /// Whether a request by hand still stands (it ends when carried out, called off or
    /// after `DEMAND_LIFETIME`).
    pub fn demand_pending(&self, app: &str, demand: Demand) -> bool {
        lock(&self.demands)
            .get(app)
            .is_some_and(|(d, at)| *d == demand && at.elapsed() < DEMAND_LIFETIME)
    }

    /// What each desired app's endpoint saw, with requests by hand; a suspend in flight
    /// of an app that a connection now waits for is called off.
    fn activity(&self, desired: &DesiredState, rows: &[VmRow]) -> BTreeMap<String, Activity> {
        let mut demands = lock(&self.demands);
        demands.retain(|_, (_, at)| at.elapsed() < DEMAND_LIFETIME);
        let awake = lock(&self.awake_since);
        let mut out = BTreeMap::new();
        for name in desired.apps.keys() {
            let (idle, waiting) = self.frontend.activity(name).unwrap_or_default();
            let idle = awake.get(name).map_or(idle, |t| idle.min(t.elapsed()));
            let demand = demands.get(name).map(|(d, _)| *d);
            let a = Activity {
                idle,
                waiting,
                suspend: demand == Some(Demand::Suspend),
                wake: demand == Some(Demand::Wake),
            };
            if a.waiting > 0 || a.wake {
                let tasks = self.tasks();
                for row in rows.iter().filter(|r| r.app == *name) {
                    if let Some(t) = tasks
                        .get(&row.vm_id)
                        .filter(|t| t.kind == TaskKind::Suspend)
                    {
                        t.cancel.cancel();
                    }
                }
            }
            out.insert(name.clone(), a);
        }
        out
    }

    /// The VMs with a task in flight, and what each task does.
    pub fn busy(&self) -> HashMap<Uuid, TaskKind> {
        self.tasks().iter().map(|(id, t)| (*id, t.kind)).collect()
    }

    /// Seals and stores an app's secret values (replacing earlier ones).
    pub fn set_secrets(
        &self,
        app: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<(), SecretsError> {
        match self.seal_secrets(app, values)? {
            None => Ok(self.store.remove_sealed_secrets(app)?),
            Some(sealed) => Ok(self.store.put_sealed_secrets(app, &sealed)?),
        }
    }

    /// An app's secret values sealed for the database (`None`: the app has none).
    pub fn seal_secrets(
        &self,
        app: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<Option<Vec<u8>>, VaultError> {
        if values.is_empty() {
            return Ok(None);
        }
        self.vault.seal(app, values).map(Some)
    }

    /// The keyed digest of an app's secret values that becomes part of its version
    /// (`DesiredApp::secrets_version`); None when it has none.
    pub fn secrets_version(
        &self,
        app: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<Option<String>, VaultError> {
        if values.is_empty() {
            return Ok(None);
        }
        self.vault.fingerprint(app, values).map(Some)
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

    /// Writes a VM's record; a failed write is logged (the next pass observes reality
    /// again, so a lost update costs at most a repeated step).
    fn save(&self, row: &VmRow) {
        if let Err(e) = self.store.put_vm(row) {
            warn!(vm_id = %row.vm_id, error = %e, "cannot record the VM's state");
        }
    }

    /// Re-attaches to VMs an earlier agent left running, restores their network, removes
    /// what interrupted provisions left, and sweeps resources nobody recorded.
    pub async fn recover(&self) -> Result<(), StateError> {
        let (attached, dead) = match self.platform.reattach().await {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "cannot look for VMs of an earlier agent");
                Default::default()
            }
        };
        for id in &dead {
            warn!(vm_id = %id, "VM found dead at start");
        }
        let desired = self.store.desired()?;
        let now = self.platform.now();
        let mut interrupted = Vec::new();
        for row in self.store.vms()? {
            let mut row = row;
            if matches!(row.step.as_str(), "suspending" | "waking") {
                // A suspend or wake the last agent did not finish: the VM is what exists.
                row = self.settle(row).await;
            }
            if row.state == VmState::Suspended {
                // Fence and QoS die with the agent; a suspended VM gets them back now, so
                // it wakes with them (a running one below, when re-attached).
                if let Some(app) = desired.apps.get(&row.app) {
                    if let Err(e) = self.platform.rewire(row.vm_id, app).await {
                        warn!(vm_id = %row.vm_id, error = %e, "cannot restore the network of a suspended VM");
                    }
                }
                continue;
            }
            if row.state == VmState::Starting {
                // A provision the last agent did not finish. Its row goes, with the count
                // of interruptions, in one transaction, before anything is torn down: a
                // crash during the cleanup cannot count it twice, and what the cleanup
                // leaves is an orphan for the sweep below. Once is not a failure of the
                // version; the same provision interrupted again is (it may be what takes
                // the agent down), so a crash loop turns into backoff.
                let prev = self.store.failures()?.remove(&row.app);
                let f = FailureRecord::interrupted(prev.as_ref(), &row.version, &row.step, now);
                if f.attempts > prev.as_ref().map_or(0, |p| p.attempts) {
                    self.event(&row.app, Some(row.vm_id), f.reason.clone());
                }
                self.store
                    .remove_vm_with_failure(row.vm_id, Some((&row.app, &f)))?;
                self.event(
                    &row.app,
                    Some(row.vm_id),
                    format!(
                        "provision interrupted by an agent restart (step {}): cleaning up, it starts again",
                        row.step
                    ),
                );
                interrupted.push(row.vm_id);
                continue;
            }
            if attached.contains(&row.vm_id.to_string()) {
                if let Some(app) = desired.apps.get(&row.app) {
                    if let Err(e) = self.platform.rewire(row.vm_id, app).await {
                        warn!(vm_id = %row.vm_id, error = %e, "cannot restore the network of a re-attached VM");
                    }
                }
                self.event(&row.app, Some(row.vm_id), "re-attached after agent restart");
            }
        }
        let limit = self.config.deadlines.teardown;
        let cleanups = interrupted.into_iter().map(|vm| async move {
            if let Err(e) = teardown(&*self.platform, vm, limit).await {
                warn!(%vm, error = %e, "cleanup of an interrupted provision; the orphan sweep retries");
            }
        });
        futures_util::future::join_all(cleanups).await;
        self.sweep_orphans(&HashSet::new()).await
    }

    /// Removes what this agent owns but has no record of (and no task working on): VMs,
    /// disks and leases left by a crash between making a resource and recording it, or by
    /// blocking work that finished after its provision was given up.
    async fn sweep_orphans(&self, busy: &HashSet<Uuid>) -> Result<(), StateError> {
        let mut found: HashSet<String> = self
            .platform
            .alive()
            .await
            .into_iter()
            .map(|id| id.to_string())
            .collect();
        match self.platform.disk_owners().await {
            Ok(disks) => found.extend(disks),
            Err(e) => warn!(error = %e, "cannot list VM disks for the orphan sweep"),
        }
        match self.platform.lease_owners() {
            Ok(leases) => found.extend(leases),
            Err(e) => warn!(error = %e, "cannot list IP leases for the orphan sweep"),
        }
        // Records are read after the resources were listed: a VM recorded since then is
        // not mistaken for an orphan.
        let known: HashSet<String> = self
            .store
            .vms()?
            .iter()
            .map(|r| r.vm_id.to_string())
            .collect();
        for id in found.into_iter().filter(|id| !known.contains(id)) {
            let Ok(vm_id) = id.parse::<Uuid>() else {
                warn!(vm = %id, "unrecorded resource with a foreign name; left alone");
                continue;
            };
            if busy.contains(&vm_id) {
                continue;
            }
            warn!(%vm_id, "removing an orphaned VM's resources");
            if let Err(e) = teardown(&*self.platform, vm_id, self.config.deadlines.teardown).await {
                warn!(%vm_id, error = %e, "orphan cleanup failed");
            }
        }
        // App snapshots of versions no desired app and no VM uses.
        let desired = self.store.desired()?;
        let mut keep: HashSet<(String, String)> = desired
            .apps
            .iter()
            .filter(|(_, a)| a.snapshot.enabled)
            .map(|(name, a)| (name.clone(), a.spec_hash()))
            .collect();
        keep.extend(self.store.vms()?.into_iter().map(|r| (r.app, r.version)));
        if let Err(e) = self.platform.forget_app_snapshots(&keep).await {
            warn!(error = %e, "cannot delete unused app snapshots");
        }
        let rows = self.store.vms()?;
        let recorded: HashSet<Uuid> = rows.iter().map(|r| r.vm_id).collect();
        self.platform.forget_suspended(&recorded);
        let images: HashSet<String> = rows.into_iter().filter_map(|r| r.image_digest).collect();
        if let Err(e) = self.platform.forget_image_templates(&images).await {
            warn!(error = %e, "cannot delete unused image templates");
        }
        Ok(())
    }

    /// One pass: observe, plan, launch. Returns the number of tasks launched. Never waits
    /// for a VM: everything that does runs as a task.
    pub async fn reconcile_once(self: &Arc<Self>) -> Result<usize, StateError> {
        if crate::fault::stalled() {
            return Ok(0);
        }
        let _pass = self.pass.lock().await;
        // Order matters: tasks, then processes, then records. A task that ended before
        // the first look has written its record already; one that ends later is busy.
        let busy = self.busy();
        let alive = self.platform.alive().await;
        let desired = self.store.desired()?;
        let mut launched = 0;
        let mut running = Vec::new();
        for row in self.store.vms()? {
            if !busy.contains_key(&row.vm_id) {
                running.extend(self.observe(row, &desired.apps, &alive));
            }
        }
        self.sync_endpoints(&desired.apps, Scope::All).await?;
        let mut actual = self.store.actual()?;
        actual.now = self.platform.now();
        actual.activity = self.activity(&desired, &self.store.vms()?);
        for action in plan(&desired, &actual) {
            // One record that cannot be written stops only its own action.
            match self.launch(action, &desired.apps) {
                Ok(n) => launched += n,
                Err(e) => warn!(error = %e, "cannot launch an action; the next pass retries"),
            }
        }
        // Health work comes after the plan's actions: a VM being retired or removed is
        // busy by now and gets no new health wait (which the removal would only cancel
        // again, pass after pass).
        for row in running {
            launched += self.watch(row, &desired.apps);
        }
        launched += self.snapshot_versions(&desired.apps);
        Ok(launched)
    }

    /// Launches the app snapshot of each version that wants one (`[snapshot] enabled`)
    /// and has none, taken of one of its serving VMs; a failed one is retried after
    /// `SNAPSHOT_RETRY`.
    fn snapshot_versions(self: &Arc<Self>, apps: &BTreeMap<String, DesiredApp>) -> usize {
        let Ok(rows) = self.store.vms() else {
            return 0;
        };
        let mut launched = 0;
        for (name, app) in apps.iter().filter(|(_, a)| a.snapshot.enabled) {
            let version = app.spec_hash();
            let key = (name.clone(), version.clone());
            let tried = lock(&self.snapshot_tried)
                .get(&key)
                .is_some_and(|t| t.elapsed() < SNAPSHOT_RETRY);
            if tried || self.platform.has_app_snapshot(name, &version) {
                continue;
            }
            let busy = self.busy();
            let Some(vm) = rows
                .iter()
                .find(|r| {
                    r.app == *name
                        && r.version == version
                        && r.state == VmState::Running
                        && r.health == Health::Healthy
                        && !busy.contains_key(&r.vm_id)
                })
                .map(|r| r.vm_id)
            else {
                continue;
            };
            lock(&self.snapshot_tried).insert(key.clone(), Instant::now());
            let (me, app) = (self.clone(), app.clone());
            launched += usize::from(self.start(vm, TaskKind::Snapshot, move |_| async move {
                let t = Instant::now();
                match me.platform.take_app_snapshot(vm, &app, &version).await {
                    Ok(()) => {
                        lock(&me.snapshot_tried).remove(&key);
                        me.event(
                            &app.name,
                            Some(vm),
                            format!(
                                "app snapshot of version {version} taken in {:.2}s: new VMs of it start from it",
                                t.elapsed().as_secs_f64()
                            ),
                        );
                    }
                    Err(e) => me.event(
                        &app.name,
                        Some(vm),
                        format!(
                            "app snapshot of version {version} failed (tried again in {} min): {e}",
                            SNAPSHOT_RETRY.as_secs() / 60
                        ),
                    ),
                }
            }));
        }
        launched
    }

    /// Corrects one idle VM's record by what is observed (process gone, provision
    /// interrupted, no health check to wait for); returns it when it runs, for
    /// [`Self::watch`].
    fn observe(
        self: &Arc<Self>,
        mut row: VmRow,
        apps: &BTreeMap<String, DesiredApp>,
        alive: &HashSet<Uuid>,
    ) -> Option<VmRow> {
        let gone = match row.state {
            // No task builds it: its provision was interrupted.
            VmState::Starting => Some("its provision was interrupted"),
            VmState::Running if !alive.contains(&row.vm_id) => Some("the VM's process is gone"),
            _ => None,
        };
        if let Some(why) = gone {
            row.state = VmState::Exited;
            row.last_error.get_or_insert_with(|| why.into());
            self.save(&row);
            self.probes().remove(&row.vm_id);
            return None;
        }
        if row.state != VmState::Running {
            return None;
        }
        // A VM of an app nobody wants is the plan's to remove, not to judge.
        let spec = apps.get(&row.app)?;
        if row.health == Health::Unknown && spec.health.is_none() {
            // Decided when the app has no check.
            row.health = Health::Healthy;
            self.save(&row);
        }
        Some(row)
    }

    /// Launches a running VM's health wait (undecided after an agent restart) or its
    /// probe (when one is due), unless it has a task already.
    fn watch(self: &Arc<Self>, row: VmRow, apps: &BTreeMap<String, DesiredApp>) -> usize {
        let Some(spec) = apps.get(&row.app) else {
            return 0;
        };
        let check = spec.health.as_ref().map(|c| self.platform.health_check(c));
        let ip = row.ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        match (row.health, check, ip) {
            // Its health wait was cut short by an agent restart: resume it.
            (Health::Unknown, Some(check), ip) => {
                let me = self.clone();
                let app = row.app.clone();
                let vm = row.vm_id;
                usize::from(
                    self.start(vm, TaskKind::HealthWait, move |cancel| async move {
                        let budget = me.platform.boot_budget(me.config.mode) + check.grace;
                        let since = row.running_since.unwrap_or(row.created_at);
                        let age = me.platform.now().saturating_sub(since);
                        let left = budget.saturating_sub(Duration::from_secs(age));
                        let verdict = match ip {
                            None => Err("the VM has no IP".to_string()),
                            Some(ip) => me.wait_healthy(ip, &check, left, &cancel).await,
                        };
                        if cancel.is_cancelled() {
                            return;
                        }
                        me.decide_health(
                            &app,
                            vm,
                            verdict,
                            " (health wait resumed after an agent restart)",
                        )
                        .await;
                    }),
                )
            }
            (Health::Healthy, Some(check), Some(ip)) => {
                let due = self
                    .probes()
                    .get(&row.vm_id)
                    .is_none_or(|p| Instant::now() >= p.next_at);
                if !due {
                    return 0;
                }
                let me = self.clone();
                usize::from(self.start(row.vm_id, TaskKind::Probe, move |_| async move {
                    me.monitor(row, ip, &check).await;
                }))
            }
            _ => 0,
        }
    }

    /// Launches the task that carries out `action`; returns 1 when one was launched.
    fn launch(
        self: &Arc<Self>,
        action: Action,
        apps: &BTreeMap<String, DesiredApp>,
    ) -> Result<usize, StateError> {
        match action {
            Action::Create { app, version } | Action::Replace { app, version, .. } => {
                let Some(spec) = apps.get(&app) else {
                    return Ok(0);
                };
                let row = VmRow {
                    vm_id: Uuid::new_v4(),
                    app: app.clone(),
                    version: version.clone(),
                    state: VmState::Starting,
                    health: Health::Unknown,
                    step: "queued".into(),
                    ip: None,
                    image_digest: None,
                    created_at: self.platform.now(),
                    last_error: None,
                    running_since: None,
                };
                // Recorded before anything exists of it, and before its task can run.
                self.store.put_vm(&row)?;
                self.event(
                    &app,
                    Some(row.vm_id),
                    format!("creating VM for version {version}"),
                );
                let me = self.clone();
                let spec = spec.clone();
                let vm = row.vm_id;
                Ok(usize::from(self.start(
                    vm,
                    TaskKind::Provision,
                    move |cancel| async move {
                        me.provision(spec, row, cancel).await;
                    },
                )))
            }
            Action::Retire {
                app,
                vm_id,
                successor,
            } => {
                // An old VM still being built (its version was superseded) is cancelled;
                // its task removes what it made.
                if let Some(task) = self.tasks().get(&vm_id) {
                    if matches!(task.kind, TaskKind::Provision | TaskKind::HealthWait) {
                        task.cancel.cancel();
                    }
                    return Ok(0);
                }
                if !self.teardown_due(vm_id)
                    || self
                        .frontend
                        .backends(&app)
                        .iter()
                        .any(|b| b.vm_id == vm_id)
                {
                    // A removal that failed waits for its retry; an endpoint that could
                    // not be switched keeps the old VM serving.
                    return Ok(0);
                }
                let me = self.clone();
                Ok(usize::from(self.start(vm_id, TaskKind::Retire, move |_| async move {
                    me.event(
                        &app,
                        Some(vm_id),
                        format!("{successor} is healthy and serves the endpoint: draining the old VM"),
                    );
                    let t = Instant::now();
                    let open = me.frontend.drain(vm_id, DRAIN_LIMIT).await;
                    me.event(
                        &app,
                        Some(vm_id),
                        format!(
                            "drained in {:.1}s ({open} connections still open)",
                            t.elapsed().as_secs_f64()
                        ),
                    );
                    me.remove(&app, vm_id, false).await;
                })))
            }
            Action::Remove { app, vm_id, reason } => {
                // A VM still being built is cancelled; its task removes what it made.
                if let Some(task) = self.tasks().get(&vm_id) {
                    if matches!(task.kind, TaskKind::Provision | TaskKind::HealthWait) {
                        task.cancel.cancel();
                    }
                    return Ok(0);
                }
                if !self.teardown_due(vm_id) {
                    return Ok(0);
                }
                let failed = reason
                    == RemoveReason::Failed {
                        counts_as_failure: true,
                    };
                let me = self.clone();
                Ok(usize::from(self.start(
                    vm_id,
                    TaskKind::Remove,
                    move |_| async move {
                        me.event(&app, Some(vm_id), format!("removing VM ({reason:?})"));
                        me.remove(&app, vm_id, failed).await;
                    },
                )))
            }
            Action::Suspend { app, vm_id } => {
                let Some(spec) = apps.get(&app).cloned() else {
                    return Ok(0);
                };
                let me = self.clone();
                Ok(usize::from(self.start(
                    vm_id,
                    TaskKind::Suspend,
                    move |cancel| async move {
                        me.suspend(spec, vm_id, cancel).await;
                    },
                )))
            }
            Action::Wake { app, vm_id } => {
                let Some(spec) = apps.get(&app).cloned() else {
                    return Ok(0);
                };
                let due = lock(&self.wake_failures)
                    .get(&vm_id)
                    .is_none_or(|(at, _)| Instant::now() >= *at);
                if !due {
                    return Ok(0);
                }
                let me = self.clone();
                Ok(usize::from(self.start(
                    vm_id,
                    TaskKind::Wake,
                    move |_| async move {
                        me.wake_vm(spec, vm_id).await;
                    },
                )))
            }
        }
    }

    /// The suspend task: out of the endpoint's set, then snapshot and stop; called off
    /// (the VM resumed, back in the set) when a connection comes first.
    async fn suspend(self: Arc<Self>, app: DesiredApp, vm: Uuid, cancel: CancellationToken) {
        let Ok(Some(mut row)) = self.store.vm(vm) else {
            return;
        };
        row.step = "suspending".into();
        self.save(&row);
        // From here new connections wait for a wake (this VM is busy, so out of the set);
        // the few already open must end first.
        self.sync_app(&app).await;
        let t = Instant::now();
        let outcome = if self.frontend.drain(vm, Duration::from_secs(1)).await > 0 {
            Ok(Suspension::Resumed {
                why: "connections are open".into(),
            })
        } else {
            self.platform.suspend(vm, &app, &cancel).await
        };
        match outcome {
            Ok(Suspension::Suspended { freed_bytes }) => {
                row.state = VmState::Suspended;
                row.step = "suspended".into();
                self.save(&row);
                // A suspend by hand stands until every VM of the app is suspended.
                let all = self
                    .store
                    .vms()
                    .map(|rows| {
                        rows.iter()
                            .filter(|r| r.app == app.name)
                            .all(|r| r.state == VmState::Suspended)
                    })
                    .unwrap_or(false);
                if all {
                    self.forget_demand(&app.name, Demand::Suspend);
                }
                self.event(
                    &app.name,
                    Some(vm),
                    format!(
                        "suspended in {:.2}s ({} MiB of memory freed)",
                        t.elapsed().as_secs_f64(),
                        freed_bytes >> 20
                    ),
                );
            }
            Ok(Suspension::Resumed { why }) => {
                row.step = "running".into();
                self.save(&row);
                // A suspend by hand is not retried over and over while connections come.
                self.forget_demand(&app.name, Demand::Suspend);
                lock(&self.awake_since).insert(app.name.clone(), Instant::now());
                self.event(
                    &app.name,
                    Some(vm),
                    format!("suspend called off ({why}): the VM runs on"),
                );
            }
            Err(e) => {
                row.state = VmState::Exited;
                row.health = Health::Unhealthy;
                row.last_error = Some(format!("suspend failed: {e}"));
                self.save(&row);
                self.event(
                    &app.name,
                    Some(vm),
                    format!("suspend failed, the VM is lost: {e}"),
                );
            }
        }
        self.probes().remove(&vm);
    }

    /// The wake task: restore the suspended VM and put it back in the endpoint's set,
    /// which lets the held connections through.
    async fn wake_vm(self: Arc<Self>, app: DesiredApp, vm: Uuid) {
        let Ok(Some(mut row)) = self.store.vm(vm) else {
            return;
        };
        row.step = "waking".into();
        self.save(&row);
        let t = Instant::now();
        match self.platform.wake(vm, &app).await {
            Ok(()) => {
                row.state = VmState::Running;
                row.health = Health::Healthy;
                row.step = "running".into();
                row.running_since = Some(self.platform.now());
                self.save(&row);
                lock(&self.awake_since).insert(app.name.clone(), Instant::now());
                self.forget_demand(&app.name, Demand::Wake);
                self.event(
                    &app.name,
                    Some(vm),
                    format!("woken in {:.2}s", t.elapsed().as_secs_f64()),
                );
                self.sync_app(&app).await;
            }
            Err(e) => {
                // The snapshot is the app's memory: a failed wake keeps it and is tried
                // again (backing off); only after `MAX_WAKE_TRIES` is the VM given up
                // (and replaced).
                let tries = {
                    let mut failures = lock(&self.wake_failures);
                    let tries = failures.get(&vm).map_or(0, |(_, n)| *n) + 1;
                    failures.insert(vm, (Instant::now() + super::backoff(tries), tries));
                    tries
                };
                row.step = "suspended".into();
                row.last_error = Some(format!("wake failed: {e}"));
                if tries >= MAX_WAKE_TRIES {
                    row.state = VmState::Exited;
                    row.health = Health::Unhealthy;
                    lock(&self.wake_failures).remove(&vm);
                }
                self.save(&row);
                self.event(
                    &app.name,
                    Some(vm),
                    format!("wake failed (attempt {tries} of {MAX_WAKE_TRIES}): {e}"),
                );
                return;
            }
        }
        lock(&self.wake_failures).remove(&vm);
    }

    /// Records what a VM whose suspend or wake was cut short by a restart is now.
    async fn settle(&self, mut row: VmRow) -> VmRow {
        let state = match self.platform.settle(row.vm_id).await {
            Ok(state) => state,
            Err(e) => {
                warn!(vm_id = %row.vm_id, error = %e, "cannot settle an interrupted suspend or wake");
                VmState::Exited
            }
        };
        let was = std::mem::take(&mut row.step);
        row.state = state;
        row.step = match state {
            VmState::Suspended => "suspended",
            VmState::Running => "running",
            _ => "failed",
        }
        .into();
        if state == VmState::Exited {
            row.health = Health::Unhealthy;
            row.last_error = Some(format!(
                "its {was} was interrupted and left nothing to go on with"
            ));
        }
        self.save(&row);
        self.event(
            &row.app,
            Some(row.vm_id),
            format!("{was} interrupted by an agent restart: the VM is {state:?}"),
        );
        row
    }

    fn forget_demand(&self, app: &str, demand: Demand) {
        let mut demands = lock(&self.demands);
        if demands.get(app).is_some_and(|(d, _)| *d == demand) {
            demands.remove(app);
        }
    }

    /// Re-points one app's endpoint (see [`Self::sync_endpoints`]).
    async fn sync_app(&self, app: &DesiredApp) {
        let apps = BTreeMap::from([(app.name.clone(), app.clone())]);
        if let Err(e) = self.sync_endpoints(&apps, Scope::These).await {
            warn!(app = %app.name, error = %e, "cannot update the endpoint");
        }
    }

    /// Runs `work` as the task of `vm`, unless that VM has one already.
    /// (Suspend and wake are launched by [`Self::launch`] through here too.)
    fn start<W, Fut>(self: &Arc<Self>, vm: Uuid, kind: TaskKind, work: W) -> bool
    where
        W: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = CancellationToken::new();
        {
            let mut tasks = self.tasks();
            if tasks.contains_key(&vm) {
                return false;
            }
            tasks.insert(
                vm,
                Task {
                    kind,
                    cancel: cancel.clone(),
                    abort: None,
                },
            );
        }
        let guard = TaskGuard {
            exec: self.clone(),
            vm,
        };
        let fut = work(cancel);
        // Spawned outside the lock: a runtime that is shutting down drops the future (and
        // its guard, which takes the lock) right here.
        let handle = tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
        if let Some(task) = self.tasks().get_mut(&vm) {
            task.abort = Some(handle.abort_handle());
        }
        true
    }

    /// Stops every task where it is, as the death of the process would (for tests of
    /// crash recovery). What was recorded stays recorded.
    pub fn abort_all(&self) {
        for task in self.tasks().values() {
            if let Some(abort) = &task.abort {
                abort.abort();
            }
        }
    }

    /// The provision task: waits for a slot, builds the VM step by step, then waits for
    /// its health check and points the endpoint at it.
    async fn provision(
        self: Arc<Self>,
        app: DesiredApp,
        mut row: VmRow,
        cancel: CancellationToken,
    ) {
        let vm = row.vm_id;
        let slot = tokio::select! {
            () = cancel.cancelled() => None,
            slot = self.provisions.clone().acquire_owned() => slot.ok(),
        };
        let Some(slot) = slot else {
            self.forget(&app.name, vm, CANCELLED).await;
            return;
        };
        let store = self.store.clone();
        let step_row = SyncMutex::new(row.clone());
        let on_step = |step: &'static str| {
            let mut r = step_row.lock().unwrap_or_else(PoisonError::into_inner);
            r.step = step.into();
            if let Err(e) = store.put_vm(&r) {
                warn!(vm_id = %r.vm_id, error = %e, "cannot record the step");
            }
        };
        let (events, name) = (self.store.clone(), app.name.clone());
        let progress = move |line: String| {
            let _ = events.event(&name, Some(vm), line);
        };
        let result = match self.secrets(&app.name) {
            Err(e) => Err(format!("secrets: {e}")),
            Ok(secrets) => Steps {
                platform: &*self.platform,
                deadlines: &self.config.deadlines,
                mode: self.config.mode,
                cancel: &cancel,
                on_step: &on_step,
                progress: &progress,
            }
            .provision(&app, vm, secrets)
            .await
            .map_err(|e| e.to_string()),
        };
        drop(slot);
        release_freed_heap();
        let built = match result {
            Err(e) if cancel.is_cancelled() => {
                self.forget(&app.name, vm, &e).await;
                return;
            }
            Err(e) => {
                row.state = VmState::Exited;
                row.health = Health::Unhealthy;
                row.step = "failed".into();
                row.last_error = Some(e.clone());
                self.save(&row);
                self.event(&app.name, Some(vm), format!("failed: {e}"));
                return;
            }
            Ok(built) => built,
        };
        let ip = P::ip(&built.net);
        row.state = VmState::Running;
        row.running_since = Some(self.platform.now());
        row.ip = Some(ip.to_string());
        row.image_digest = Some(P::digest(&built.image));
        row.step = if app.health.is_some() {
            "health-wait"
        } else {
            "running"
        }
        .into();
        self.save(&row);
        let phases: Vec<String> = built
            .phases
            .iter()
            .map(|p| format!("{} {:.1}s", p.name, p.took.as_secs_f64()))
            .collect();
        self.event(
            &app.name,
            Some(vm),
            format!("VM running at {ip} ({})", phases.join(", ")),
        );
        let verdict = match &app.health {
            None => Ok(()),
            Some(check) => {
                self.event(&app.name, Some(vm), "waiting for the health check");
                crate::fault::point("health-wait", |m| self.event(&app.name, Some(vm), m)).await;
                let check = self.platform.health_check(check);
                self.wait_healthy(ip, &check, check.grace, &cancel).await
            }
        };
        if cancel.is_cancelled() {
            // The app was removed meanwhile: the next pass removes the VM.
            return;
        }
        self.decide_health(&app.name, vm, verdict, "").await;
    }

    /// Records the outcome of a health wait; a healthy VM gets the app's endpoint.
    async fn decide_health(&self, app: &str, vm: Uuid, verdict: Result<(), String>, how: &str) {
        let Ok(Some(mut row)) = self.store.vm(vm) else {
            return;
        };
        match verdict {
            Ok(()) => {
                row.health = Health::Healthy;
                row.step = "running".into();
                self.save(&row);
                // Only this version's failures are forgiven: an old version that got
                // healthy late must not reset the backoff of the one that replaced it.
                let own = self
                    .store
                    .failures()
                    .ok()
                    .and_then(|mut f| f.remove(app))
                    .is_some_and(|f| f.version == row.version);
                if own {
                    if let Err(e) = self.store.clear_failure(app) {
                        warn!(app, error = %e, "cannot clear the failure record");
                    }
                }
                self.event(app, Some(vm), format!("healthy{how}"));
                let desired = self.store.desired().unwrap_or_default();
                if let Some(spec) = desired.apps.get(app) {
                    let apps = BTreeMap::from([(app.to_string(), spec.clone())]);
                    if let Err(e) = self.sync_endpoints(&apps, Scope::These).await {
                        warn!(app, error = %e, "cannot switch the endpoint");
                    }
                }
            }
            Err(e) => {
                row.health = Health::Unhealthy;
                row.last_error = Some(e.clone());
                self.save(&row);
                self.event(app, Some(vm), format!("health check failed: {e}"));
            }
        }
    }

    /// Forgets a VM whose provision was cancelled (its task already removed what it
    /// made).
    async fn forget(&self, app: &str, vm: Uuid, why: &str) {
        if let Err(e) = teardown(&*self.platform, vm, self.config.deadlines.teardown).await {
            self.event(app, Some(vm), format!("cleanup failed (will retry): {e}"));
            return;
        }
        if let Err(e) = self.store.remove_vm(vm) {
            warn!(%vm, error = %e, "cannot remove the VM's record");
        }
        self.event(app, Some(vm), format!("VM removed ({why})"));
    }

    /// Probes until one passes or `budget` runs out (or the VM is no longer wanted):
    /// often at first, then every `interval` (see [`crate::health::startup_pause`]).
    async fn wait_healthy(
        &self,
        ip: Ipv4Addr,
        check: &HealthCheck,
        budget: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let start = Instant::now();
        let mut probes: u32 = 0;
        loop {
            probes = probes.saturating_add(1);
            let probed = Instant::now();
            let last = match self.probe(ip, check).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let left = budget.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(format!("not healthy within {budget:?}: {last}"));
            }
            let pause = crate::health::startup_pause(probes, check.interval)
                .saturating_sub(probed.elapsed())
                .min(left);
            tokio::select! {
                () = cancel.cancelled() => return Err(CANCELLED.into()),
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One probe, bounded by the check's timeout (plus a margin for the connect).
    /// An inconclusive probe (the host, not the VM, failed) is not an error.
    async fn probe(&self, ip: Ipv4Addr, check: &HealthCheck) -> Result<(), String> {
        let limit = check.timeout + Duration::from_secs(1);
        match tokio::time::timeout(limit, self.platform.probe(ip, check)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.inconclusive => {
                warn!(%ip, error = %e, "health probe could not run on this host; not counted");
                Err(e.message)
            }
            Ok(Err(e)) => Err(e.message),
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    /// The probe task of a running, healthy VM: after `retries` consecutive failures the
    /// VM counts as unhealthy (and the plan replaces it).
    async fn monitor(&self, mut row: VmRow, ip: Ipv4Addr, check: &HealthCheck) {
        let limit = check.timeout + Duration::from_secs(1);
        let outcome = tokio::time::timeout(limit, self.platform.probe(ip, check)).await;
        let failed = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) if e.inconclusive => {
                warn!(vm = %row.vm_id, error = %e, "health probe could not run on this host; not counted");
                None
            }
            Ok(Err(e)) => Some(e.message),
            Err(_) => Some(format!("no answer within {limit:?}")),
        };
        let failures = {
            let mut probes = self.probes();
            let state = probes.entry(row.vm_id).or_insert(ProbeState {
                failures: 0,
                next_at: Instant::now(),
            });
            state.next_at = Instant::now() + check.interval;
            state.failures = if failed.is_some() {
                state.failures + 1
            } else {
                0
            };
            state.failures
        };
        let Some(e) = failed else { return };
        if failures < check.retries {
            return;
        }
        self.probes().remove(&row.vm_id);
        let Ok(Some(current)) = self.store.vm(row.vm_id) else {
            return;
        };
        row = current;
        row.health = Health::Unhealthy;
        row.last_error = Some(format!("health check failed {} times: {e}", check.retries));
        self.save(&row);
        self.event(
            &row.app,
            Some(row.vm_id),
            row.last_error.clone().unwrap_or_default(),
        );
    }

    /// Whether a removal of `vm` may run now (none failed, or its retry time came).
    fn teardown_due(&self, vm: Uuid) -> bool {
        self.teardown_retry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&vm)
            .is_none_or(|(at, _)| Instant::now() >= *at)
    }

    /// Stops the VM and removes everything it owns, then its record. `failed`: it ran
    /// the desired version and failed, which counts for backoff — once, recorded with
    /// the row's removal, so neither a failing teardown (retried later) nor a crash
    /// during it counts the failure again.
    async fn remove(&self, app: &str, vm_id: Uuid, failed: bool) {
        let mut failure = None;
        if let Ok(Some(mut row)) = self.store.vm(vm_id) {
            row.step = "removing".into();
            self.save(&row);
            if failed {
                failure = Some(self.next_failure(app, &row));
            }
        }
        self.probes().remove(&vm_id);
        self.event(app, Some(vm_id), "stopping the VM");
        if let Err(e) = teardown(&*self.platform, vm_id, self.config.deadlines.teardown).await {
            let wait = {
                let mut retry = self
                    .teardown_retry
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let tries = retry.get(&vm_id).map_or(0, |(_, n)| *n) + 1;
                let wait = super::backoff(tries);
                retry.insert(vm_id, (Instant::now() + wait, tries));
                wait
            };
            self.event(
                app,
                Some(vm_id),
                format!("cleanup failed (retried in {}s): {e}", wait.as_secs()),
            );
            return;
        }
        self.teardown_retry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&vm_id);
        if let Some(f) = &failure {
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
        }
        let failure = failure.as_ref().map(|f| (app, f));
        if let Err(e) = self.store.remove_vm_with_failure(vm_id, failure) {
            warn!(%vm_id, error = %e, "cannot remove the VM's record");
            return;
        }
        self.event(app, Some(vm_id), "VM removed");
    }

    /// The app's failure record after one more failed attempt of `row`'s version.
    fn next_failure(&self, app: &str, row: &VmRow) -> FailureRecord {
        let prev = self.store.failures().ok().and_then(|mut f| f.remove(app));
        let mut f = FailureRecord::next(prev.as_ref(), &row.version, self.platform.now());
        f.reason = row.last_error.clone().unwrap_or_default();
        f
    }

    /// Points each app's endpoint at the VMs that should serve it (see
    /// [`super::serving_set`]: the desired version's replicas once all of them are
    /// healthy, the older version's until then). Listeners of apps that are gone, or
    /// publish no port any more, are closed when `apps` is the whole desired state
    /// (`Scope::All`).
    async fn sync_endpoints(
        &self,
        apps: &BTreeMap<String, DesiredApp>,
        scope: Scope,
    ) -> Result<(), StateError> {
        let _one_at_a_time = self.endpoint_sync.lock().await;
        // VMs on their way out never get the endpoint back, nor do VMs being suspended.
        let busy = self.busy();
        let leaving: HashSet<Uuid> = busy
            .iter()
            .filter(|(_, kind)| {
                matches!(
                    kind,
                    TaskKind::Retire | TaskKind::Remove | TaskKind::Suspend
                )
            })
            .map(|(vm, _)| *vm)
            .collect();
        let all = self.store.vms()?;
        // Apps whose VMs are suspended (or on the way): an empty set holds connections.
        let asleep: HashSet<&str> = all
            .iter()
            .filter(|r| {
                r.state == VmState::Suspended
                    || matches!(busy.get(&r.vm_id), Some(TaskKind::Suspend | TaskKind::Wake))
            })
            .map(|r| r.app.as_str())
            .collect();
        let rows: Vec<&VmRow> = all.iter().filter(|r| !leaving.contains(&r.vm_id)).collect();
        if scope == Scope::All {
            for name in self.frontend.published_apps() {
                if apps.get(&name).is_none_or(|a| published(a).is_empty()) {
                    self.frontend.unpublish(&name);
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
            let addresses: BTreeMap<Uuid, Ipv4Addr> = rows
                .iter()
                .filter(|r| r.app == *name)
                .filter_map(|r| Some((r.vm_id, r.ip.as_deref()?.parse().ok()?)))
                .collect();
            let vms: Vec<(Uuid, &str, bool)> = rows
                .iter()
                .filter(|r| r.app == *name && addresses.contains_key(&r.vm_id))
                .map(|r| {
                    let serving = r.state == VmState::Running && r.health == Health::Healthy;
                    (r.vm_id, r.version.as_str(), serving)
                })
                .collect();
            let backends: Vec<Backend> = super::serving_set(&version, app.count, &vms)
                .into_iter()
                .filter_map(|vm_id| {
                    Some(Backend {
                        vm_id,
                        ip: *addresses.get(&vm_id)?,
                    })
                })
                .collect();
            if backends.is_empty() && !asleep.contains(name.as_str()) {
                continue;
            }
            let first = backends.first().map(|b| b.vm_id);
            if self.frontend.is_current(name, &ports, &backends) {
                continue;
            }
            let hosts: Vec<String> = ports
                .iter()
                .map(|p| format!(":{}/{}", p.host, p.protocol))
                .collect();
            let ips = |set: &[Backend]| -> String {
                let ips: Vec<String> = set.iter().map(|b| b.ip.to_string()).collect();
                if ips.is_empty() {
                    "none".into()
                } else {
                    ips.join(",")
                }
            };
            match self.frontend.publish(name, &ports, &backends) {
                Ok(previous) if previous == backends => {
                    self.event(name, first, format!("endpoint {} updated", hosts.join(",")))
                }
                Ok(previous) => {
                    // One event per VM that joined, so each can be found by its id.
                    for joined in backends.iter().filter(|b| !previous.contains(b)) {
                        self.event(
                            name,
                            Some(joined.vm_id),
                            format!(
                                "endpoint {} switched to {} (was {})",
                                hosts.join(","),
                                ips(&backends),
                                ips(&previous)
                            ),
                        );
                    }
                    if backends.is_empty() {
                        self.event(
                            name,
                            None,
                            format!(
                                "endpoint {} holds new connections until a VM wakes (was {})",
                                hosts.join(","),
                                ips(&previous)
                            ),
                        );
                    }
                    crate::fault::point("after-switch", |m| self.event(name, first, m)).await;
                }
                Err(e) => self.event(name, first, format!("endpoint: {e}")),
            }
        }
        Ok(())
    }

    /// Reconciles whenever a task ends or `wake` is notified, and every `period`, until
    /// the process ends. Every twelfth idle pass also sweeps orphans.
    pub async fn run(self: Arc<Self>, period: Duration) {
        let mut passes: u64 = 0;
        loop {
            if let Err(e) = self.reconcile_once().await {
                warn!(error = %e, "reconcile pass failed");
            }
            passes += 1;
            if passes % 12 == 0 && !crate::fault::stalled() {
                let _pass = self.pass.lock().await;
                let busy: HashSet<Uuid> = self.busy().into_keys().collect();
                if let Err(e) = self.sweep_orphans(&busy).await {
                    warn!(error = %e, "orphan sweep failed");
                }
            }
            let _ = tokio::time::timeout(period, self.wake.notified()).await;
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

fn lock<T>(m: &SyncMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which apps `sync_endpoints` was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The whole desired state: endpoints of other apps are closed.
    All,
    /// Only these apps: other endpoints are left alone.
    These,
}

/// Hands memory freed by a provision (layer unpacking, image and HTTP buffers) back to
/// the OS: glibc keeps freed heap in its per-thread arenas, which showed
/// as tens of MiB of resident memory in a long-running agent.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
