//! An in-memory platform and endpoint behind the executor's ports, for tests of the
//! control logic only: it can be told to fail, stall, crash the agent or be slow at any
//! step, and it records what was called, so crash recovery, ordering, backoff and
//! concurrency are checked in milliseconds (on tokio's paused clock). Every behaviour
//! proven here is also exercised on the real platform by the `*_real` tests.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::executor::{Executor, ExecutorConfig};
use super::ports::{Frontend, PortError, PortResult, Ports, Progress, Suspension};
use super::steps::Deadlines;
use super::VmState;
use super::{is_converged, DesiredState};
use crate::endpoint::{Backend, Published};
use crate::health::ProbeFailure;
use crate::provision::BootMode;
use crate::spec::{DesiredApp, HealthCheck};
use crate::state::Store;
use crate::vault::Vault;
use tokio_util::sync::CancellationToken;

/// What an injected fault does when its step is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The step returns an error.
    Fail,
    /// The step never finishes (a stalled registry, a hung guest).
    Stall,
    /// The agent dies here: the test is told, and the step never finishes.
    Crash,
    /// The step takes this long, then goes on.
    Slow(Duration),
}

/// A fault at `step` ("pull", "rootfs", "network", "vm", "guest", "probe",
/// "deprovision", "suspend", "wake", or "publish" for the endpoint, which only fails; "probe-vm" with a VM
/// id in place of the app fails the probes of that one VM) for `app` (any app if `None`), `times` times (0: for ever).
#[derive(Debug, Clone)]
pub struct Fault {
    pub step: &'static str,
    pub app: Option<String>,
    pub effect: Effect,
    pub times: u32,
}

impl Fault {
    pub fn at(step: &'static str, app: &str, effect: Effect) -> Fault {
        Fault {
            step,
            app: Some(app.to_string()),
            effect,
            times: 0,
        }
    }

    pub fn once(mut self) -> Fault {
        self.times = 1;
        self
    }
}

/// A VM process of the fake host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeVm {
    pub app: String,
    pub ip: Ipv4Addr,
    pub alive: bool,
}

/// Everything the fake host holds.
#[derive(Debug, Default)]
pub struct World {
    pub disks: BTreeSet<Uuid>,
    pub leases: BTreeMap<Uuid, Ipv4Addr>,
    pub vms: BTreeMap<Uuid, FakeVm>,
    /// Suspended VMs' snapshots (their processes are gone).
    pub snapshots: BTreeSet<Uuid>,
    /// App snapshots, by (app, version).
    pub app_snapshots: BTreeSet<(String, String)>,
    pub faults: Vec<Fault>,
    /// Every call, in order: "pull web", "deprovision <vm>", "publish web <vm>", ...
    pub calls: Vec<String>,
    /// Pulls and guest hand-overs (the first and last step of a provision) running right
    /// now, and the most there ever were: a provision holds its slot from its pull to its
    /// hand-over, so both show the bound on provisions.
    pub running: BTreeMap<&'static str, usize>,
    pub most_running: BTreeMap<&'static str, usize>,
    next_ip: u32,
}

impl World {
    /// VM ids owning anything on the host.
    pub fn owners(&self) -> BTreeSet<Uuid> {
        let mut ids: BTreeSet<Uuid> = self.disks.iter().copied().collect();
        ids.extend(self.leases.keys());
        ids.extend(self.vms.keys());
        ids.extend(self.snapshots.iter());
        ids
    }
}

/// The fake host.
pub struct FakePlatform {
    world: Mutex<World>,
    /// Notified when a `Crash` fault fires.
    pub crashed: Notify,
    epoch: tokio::time::Instant,
}

impl FakePlatform {
    pub fn new() -> FakePlatform {
        FakePlatform {
            world: Mutex::new(World::default()),
            crashed: Notify::new(),
            epoch: tokio::time::Instant::now(),
        }
    }

    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn inject(&self, fault: Fault) {
        self.world().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.world().faults.clear();
    }

    /// Whether a `Fail` fault of `step` for `app` fires now (for the synchronous
    /// endpoint calls; other effects do not apply there).
    fn fails_now(&self, step: &'static str, app: &str) -> bool {
        let mut w = self.world();
        let hit = w.faults.iter().position(|f| {
            f.step == step && f.effect == Effect::Fail && f.app.as_deref().is_none_or(|a| a == app)
        });
        match hit {
            Some(i) => {
                if w.faults[i].times == 1 {
                    w.faults.remove(i);
                } else if w.faults[i].times > 1 {
                    w.faults[i].times -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// Runs the fault (if any) of `step` for `app`, recording the call.
    async fn enter(&self, step: &'static str, app: &str, what: String) -> PortResult<()> {
        let effect = {
            let mut w = self.world();
            w.calls.push(what);
            let hit = w
                .faults
                .iter()
                .position(|f| f.step == step && f.app.as_deref().is_none_or(|a| a == app));
            hit.map(|i| {
                let effect = w.faults[i].effect;
                if w.faults[i].times == 1 {
                    w.faults.remove(i);
                } else if w.faults[i].times > 1 {
                    w.faults[i].times -= 1;
                }
                effect
            })
        };
        match effect {
            None => Ok(()),
            Some(Effect::Fail) => Err(PortError(format!("injected failure at {step}"))),
            Some(Effect::Slow(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Effect::Stall) => std::future::pending().await,
            Some(Effect::Crash) => {
                self.crashed.notify_one();
                std::future::pending().await
            }
        }
    }
}

/// Counts a step as running while alive.
struct Running<'a>(&'a FakePlatform, &'static str);

impl<'a> Running<'a> {
    fn start(platform: &'a FakePlatform, step: &'static str) -> Running<'a> {
        let mut w = platform.world();
        let now = {
            let n = w.running.entry(step).or_insert(0);
            *n += 1;
            *n
        };
        let most = w.most_running.entry(step).or_insert(0);
        *most = (*most).max(now);
        Running(platform, step)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0.world().running.get_mut(self.1) {
            *n -= 1;
        }
    }
}

impl Ports for FakePlatform {
    type Image = String;
    type Disk = Uuid;
    type Net = Ipv4Addr;

    fn now(&self) -> u64 {
        1_000_000 + self.epoch.elapsed().as_secs()
    }

    async fn pull(&self, app: &DesiredApp, _progress: Progress<'_>) -> PortResult<String> {
        let _running = Running::start(self, "pull");
        self.enter("pull", &app.name, format!("pull {}", app.name))
            .await?;
        Ok(format!("sha256:{}", app.image))
    }

    fn digest(image: &String) -> String {
        image.clone()
    }

    async fn clone_disk(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        _image: &String,
        _mode: BootMode,
        _progress: Progress<'_>,
    ) -> PortResult<Uuid> {
        self.enter("rootfs", &app.name, format!("rootfs {vm}"))
            .await?;
        self.world().disks.insert(vm);
        Ok(vm)
    }

    async fn disk_owners(&self) -> PortResult<Vec<String>> {
        Ok(self.world().disks.iter().map(Uuid::to_string).collect())
    }

    async fn wire(&self, vm: Uuid, app: &DesiredApp) -> PortResult<Ipv4Addr> {
        self.enter("network", &app.name, format!("network {vm}"))
            .await?;
        let mut w = self.world();
        if let Some(ip) = w.leases.get(&vm) {
            return Ok(*ip);
        }
        w.next_ip += 1;
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + w.next_ip);
        w.leases.insert(vm, ip);
        Ok(ip)
    }

    fn ip(net: &Ipv4Addr) -> Ipv4Addr {
        *net
    }

    async fn rewire(&self, vm: Uuid, _app: &DesiredApp) -> PortResult<()> {
        self.world().calls.push(format!("rewire {vm}"));
        Ok(())
    }

    fn lease_owners(&self) -> PortResult<Vec<String>> {
        Ok(self.world().leases.keys().map(Uuid::to_string).collect())
    }

    fn boot_budget(&self, _mode: BootMode) -> Duration {
        Duration::from_secs(60)
    }

    async fn boot(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        _mode: BootMode,
        _disk: &Uuid,
        net: &Ipv4Addr,
        _progress: Progress<'_>,
    ) -> PortResult<()> {
        self.enter("vm", &app.name, format!("vm {vm}")).await?;
        self.world().vms.insert(
            vm,
            FakeVm {
                app: app.name.clone(),
                ip: *net,
                alive: true,
            },
        );
        Ok(())
    }

    async fn alive(&self) -> HashSet<Uuid> {
        let w = self.world();
        w.vms
            .iter()
            .filter(|(_, vm)| vm.alive)
            .map(|(id, _)| *id)
            .collect()
    }

    async fn reattach(&self) -> PortResult<(Vec<String>, Vec<String>)> {
        let mut w = self.world();
        let dead: Vec<Uuid> = w
            .vms
            .iter()
            .filter(|(_, vm)| !vm.alive)
            .map(|(id, _)| *id)
            .collect();
        // As on the real host: a dead VM's process entry is cleaned; disk and lease stay.
        for id in &dead {
            w.vms.remove(id);
        }
        let attached = w.vms.keys().map(Uuid::to_string).collect();
        Ok((attached, dead.iter().map(Uuid::to_string).collect()))
    }

    async fn deprovision(&self, vm: Uuid) -> PortResult<()> {
        let app = self
            .world()
            .vms
            .get(&vm)
            .map(|v| v.app.clone())
            .unwrap_or_default();
        self.enter("deprovision", &app, format!("deprovision {vm}"))
            .await?;
        let mut w = self.world();
        w.vms.remove(&vm);
        w.leases.remove(&vm);
        w.disks.remove(&vm);
        w.snapshots.remove(&vm);
        Ok(())
    }

    async fn suspend(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        cancel: &CancellationToken,
    ) -> PortResult<Suspension> {
        // The snapshot is written, then the step's fault (a slow snapshot, a crash in the
        // middle), then the process stops unless the suspend was called off.
        self.world().snapshots.insert(vm);
        if let Err(e) = self
            .enter("suspend", &app.name, format!("suspend {vm}"))
            .await
        {
            self.world().snapshots.remove(&vm);
            return Ok(Suspension::Resumed { why: e.0 });
        }
        let mut w = self.world();
        if cancel.is_cancelled() {
            w.snapshots.remove(&vm);
            return Ok(Suspension::Resumed {
                why: "a connection arrived".into(),
            });
        }
        w.vms.remove(&vm);
        Ok(Suspension::Suspended {
            freed_bytes: 128 << 20,
        })
    }

    async fn wake(&self, vm: Uuid, app: &DesiredApp) -> PortResult<()> {
        self.enter("wake", &app.name, format!("wake {vm}")).await?;
        let mut w = self.world();
        if !w.snapshots.remove(&vm) {
            return Err(PortError(format!("no snapshot of {vm}")));
        }
        let ip = *w
            .leases
            .get(&vm)
            .ok_or_else(|| PortError(format!("no lease of {vm}")))?;
        w.vms.insert(
            vm,
            FakeVm {
                app: app.name.clone(),
                ip,
                alive: true,
            },
        );
        Ok(())
    }

    async fn forget_image_templates(&self, _used: &HashSet<String>) -> PortResult<()> {
        Ok(())
    }

    fn forget_suspended(&self, keep: &HashSet<Uuid>) {
        self.world().snapshots.retain(|vm| keep.contains(vm));
    }

    fn has_app_snapshot(&self, app: &str, version: &str) -> bool {
        self.world()
            .app_snapshots
            .contains(&(app.to_string(), version.to_string()))
    }

    async fn take_app_snapshot(&self, vm: Uuid, app: &DesiredApp, version: &str) -> PortResult<()> {
        self.enter("app-snapshot", &app.name, format!("app-snapshot {vm}"))
            .await?;
        self.world()
            .app_snapshots
            .insert((app.name.clone(), version.to_string()));
        Ok(())
    }

    async fn forget_app_snapshots(&self, keep: &HashSet<(String, String)>) -> PortResult<()> {
        self.world().app_snapshots.retain(|k| keep.contains(k));
        Ok(())
    }

    async fn settle(&self, vm: Uuid) -> PortResult<VmState> {
        let mut w = self.world();
        w.calls.push(format!("settle {vm}"));
        if w.vms.get(&vm).is_some_and(|v| v.alive) {
            w.snapshots.remove(&vm);
            return Ok(VmState::Running);
        }
        Ok(if w.snapshots.contains(&vm) {
            VmState::Suspended
        } else {
            VmState::Exited
        })
    }

    async fn hand_over(
        &self,
        vm: Uuid,
        app: &DesiredApp,
        _image: &String,
        _disk: &Uuid,
        _net: &Ipv4Addr,
        _secrets: BTreeMap<String, String>,
        _budget: Duration,
    ) -> PortResult<()> {
        let _running = Running::start(self, "guest");
        self.enter("guest", &app.name, format!("guest {vm}")).await
    }

    fn health_check(&self, check: &HealthCheck) -> HealthCheck {
        check.clone()
    }

    async fn probe(&self, ip: Ipv4Addr, _check: &HealthCheck) -> Result<(), ProbeFailure> {
        let (id, app) = {
            let w = self.world();
            match w.vms.iter().find(|(_, v)| v.ip == ip && v.alive) {
                Some((id, vm)) => (*id, vm.app.clone()),
                None => return Err(format!("no VM answers at {ip}").into()),
            }
        };
        // A probe fault names the app, or one VM by its id ("probe-vm").
        let vm = id.to_string();
        self.enter("probe-vm", &vm, format!("probe-vm {vm}"))
            .await
            .map_err(|e| ProbeFailure::from(e.0))?;
        self.enter("probe", &app, format!("probe {app}"))
            .await
            .map_err(|e| ProbeFailure::from(e.0))
    }
}

/// The fake endpoint: which VMs each app's ports lead to. Its log of switches goes to
/// the platform's call log, so tests see them in order with the platform's calls.
pub struct FakeFrontend {
    platform: Arc<FakePlatform>,
    routes: Mutex<Routes>,
    /// Per app: when its last connection ended, and connections waiting for a VM.
    traffic: Mutex<BTreeMap<String, (tokio::time::Instant, usize)>>,
    waiting_notify: Mutex<Option<Arc<Notify>>>,
}

/// Per app: its ports and the VMs they lead to.
type Routes = BTreeMap<String, (Vec<Published>, Vec<Backend>)>;

impl FakeFrontend {
    pub fn new(platform: Arc<FakePlatform>) -> FakeFrontend {
        FakeFrontend {
            platform,
            routes: Mutex::new(BTreeMap::new()),
            traffic: Mutex::new(BTreeMap::new()),
            waiting_notify: Mutex::new(None),
        }
    }

    /// `n` connections of `app` now wait for a VM (0: they went through); the agent is
    /// told as the real endpoint tells it. Either way the app had traffic now.
    pub fn set_waiting(&self, app: &str, n: usize) {
        let now = tokio::time::Instant::now();
        self.traffic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(app.to_string(), (now, n));
        if n > 0 {
            if let Some(notify) = &*self
                .waiting_notify
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
            {
                notify.notify_one();
            }
        }
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Frontend for FakeFrontend {
    fn publish(
        &self,
        app: &str,
        ports: &[Published],
        backends: &[Backend],
    ) -> Result<Vec<Backend>, String> {
        if self.platform.fails_now("publish", app) {
            return Err(format!("injected failure publishing {app}"));
        }
        let ids: Vec<String> = backends.iter().map(|b| b.vm_id.to_string()).collect();
        self.platform
            .world()
            .calls
            .push(format!("publish {app} {}", ids.join(",")));
        Ok(self
            .routes()
            .insert(app.to_string(), (ports.to_vec(), backends.to_vec()))
            .map(|(_, b)| b)
            .unwrap_or_default())
    }

    fn unpublish(&self, app: &str) {
        self.platform.world().calls.push(format!("unpublish {app}"));
        self.routes().remove(app);
    }

    fn backends(&self, app: &str) -> Vec<Backend> {
        self.routes()
            .get(app)
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    }

    fn is_current(&self, app: &str, ports: &[Published], backends: &[Backend]) -> bool {
        self.routes()
            .get(app)
            .is_some_and(|(p, b)| p == ports && b == backends)
    }

    fn published_apps(&self) -> Vec<String> {
        self.routes().keys().cloned().collect()
    }

    async fn drain(&self, vm: Uuid, _limit: Duration) -> usize {
        self.platform.world().calls.push(format!("drain {vm}"));
        0
    }

    fn activity(&self, app: &str) -> Option<(Duration, usize)> {
        if !self.routes().contains_key(app) {
            return None;
        }
        let mut traffic = self.traffic.lock().unwrap_or_else(PoisonError::into_inner);
        // An endpoint's clock starts when it is first seen.
        let (last, waiting) = *traffic
            .entry(app.to_string())
            .or_insert((tokio::time::Instant::now(), 0));
        Some((last.elapsed(), waiting))
    }

    fn on_waiting(&self, notify: Arc<Notify>) {
        *self
            .waiting_notify
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(notify);
    }
}

pub type FakeExecutor = Executor<FakePlatform, FakeFrontend>;

/// A host with its database that agents come and go on: `start` is an agent start,
/// [`Agent::crash`] a `kill -9`.
pub struct Node {
    pub platform: Arc<FakePlatform>,
    pub store: Arc<Store>,
    vault_key: std::path::PathBuf,
    pub max_provisions: usize,
    _dir: tempfile::TempDir,
}

/// One running agent on a [`Node`].
pub struct Agent {
    pub exec: Arc<FakeExecutor>,
    run: JoinHandle<()>,
}

impl Node {
    pub fn new() -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Store::open(&dir.path().join("agent.redb")).expect("database"));
        Node {
            platform: Arc::new(FakePlatform::new()),
            store,
            vault_key: dir.path().join("secrets.key"),
            max_provisions: 4,
            _dir: dir,
        }
    }

    /// Starts an agent: recovery, then the reconcile loop.
    pub async fn start(&self) -> Agent {
        let deadlines = Deadlines::for_platform(&*self.platform, BootMode::Warm);
        let exec = Arc::new(Executor::new(
            self.platform.clone(),
            self.store.clone(),
            Arc::new(FakeFrontend::new(self.platform.clone())),
            Vault::open_or_create(&self.vault_key).expect("vault"),
            ExecutorConfig {
                mode: BootMode::Warm,
                max_provisions: self.max_provisions,
                deadlines,
            },
        ));
        exec.recover().await.expect("recover");
        let run = tokio::spawn(exec.clone().run(Duration::from_secs(5)));
        Agent { exec, run }
    }

    pub fn apply(&self, app: &DesiredApp) {
        self.store.apply(app, None, "desired").expect("apply");
    }

    pub fn remove(&self, app: &str) {
        self.store
            .remove_app_and_secrets(app, "removed")
            .expect("remove");
    }

    pub fn desired(&self) -> DesiredState {
        self.store.desired().expect("desired")
    }

    /// True when the records match the desired state and the host holds exactly what
    /// the records say: no orphan anywhere.
    pub fn converged(&self) -> bool {
        let desired = self.desired();
        let actual = self.store.actual().expect("actual");
        if !is_converged(&desired, &actual) {
            return false;
        }
        let recorded: BTreeSet<Uuid> = actual.vms.iter().map(|v| v.vm_id).collect();
        let suspended: BTreeSet<Uuid> = actual
            .vms
            .iter()
            .filter(|v| v.state == super::VmState::Suspended)
            .map(|v| v.vm_id)
            .collect();
        let w = self.platform.world();
        w.owners() == recorded
            && recorded.iter().all(|id| {
                let process = w.vms.get(id).is_some_and(|v| v.alive);
                let snapshot = w.snapshots.contains(id);
                w.disks.contains(id)
                    && w.leases.contains_key(id)
                    && if suspended.contains(id) {
                        snapshot && !process
                    } else {
                        process && !snapshot
                    }
            })
    }
}

impl Agent {
    /// Waits (on the paused clock) until the node converged and no task is in flight;
    /// panics with the state after `limit`.
    pub async fn settle(&self, node: &Node, limit: Duration) {
        let start = tokio::time::Instant::now();
        while start.elapsed() < limit {
            if self.exec.busy().is_empty() && node.converged() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "not converged within {limit:?}: records {:?}\nworld {:?}\nbusy {:?}",
            node.store.vms().expect("records"),
            node.platform.world(),
            self.exec.busy()
        );
    }

    /// Waits until `done` holds (checked every 100 ms of the paused clock).
    pub async fn until(&self, what: &str, limit: Duration, done: impl Fn() -> bool) {
        let start = tokio::time::Instant::now();
        while !done() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The agent dies at once, as with `kill -9`: its loop and every task stop where
    /// they are. What the host and the database hold stays.
    pub fn crash(self) {
        self.run.abort();
        self.exec.abort_all();
    }
}
