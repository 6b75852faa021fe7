//! MicroVMs: the pure translation of an app into Firecracker's configuration (`config`),
//! the firecracker process and its API (`driver`, `models`), the guest console (`console`),
//! and the lifecycle of VMs on this host (`VmmManager`).

pub mod config;
pub mod console;
pub mod driver;
pub mod jail;
pub mod models;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use driver::{DriverError, FirecrackerApi, JailedSpawn, RuntimeDir};
use jail::{Access, Jail, UidPool, VmLimits};
use models::{ActionType, BootSource, Drive, MachineConfig, Metrics, NetworkInterface, Vsock};

/// Everything Firecracker needs to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MicrovmConfig {
    pub vm_id: String,
    pub machine: MachineConfig,
    pub boot: BootSource,
    pub drives: Vec<Drive>,
    pub network: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    /// Network namespace (`/run/netns/NAME`) the firecracker process runs in.
    pub netns: Option<PathBuf>,
    /// Symlinks made in the VM's runtime directory before it is configured, as (name,
    /// target): relative drive paths point through them to this VM's own files.
    #[serde(default)]
    pub links: Vec<(String, PathBuf)>,
    /// CPU the VM may use, in thousandths of a core (its cgroup's quota when jailed);
    /// `None`: all of its vCPUs.
    #[serde(default)]
    pub cpu_milli: Option<u64>,
}

impl MicrovmConfig {
    /// What the VM's cgroup allows.
    pub fn limits(&self) -> VmLimits {
        VmLimits {
            cpu_milli: self.cpu_milli,
            mem_mib: self.machine.mem_size_mib,
            io_weight: Some(100),
        }
    }
}

/// What a firecracker that is to restore a snapshot needs before it starts.
#[derive(Debug, Clone)]
pub struct BareSpawn {
    /// Network namespace (`/run/netns/NAME`) the process runs in.
    pub netns: Option<PathBuf>,
    /// The VM's own files, as (name, path), reached from its runtime dir by relative paths
    /// (its disk as `rootfs`).
    pub links: Vec<(String, PathBuf)>,
    /// Read-only inputs (the snapshot's state and memory), as (name, path); see
    /// [`VmmManager::path_in_vm`].
    pub inputs: Vec<(String, PathBuf)>,
    /// TAPs the VM will open.
    pub taps: Vec<String>,
    /// What its cgroup allows (the snapshot's shape, the app's CPU).
    pub limits: VmLimits,
}

/// What the agent records about a running firecracker so it can re-attach after a
/// restart. The process start time guards against a reused pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub vm_id: String,
    pub pid: i32,
    pub start_time: u64,
    pub api_socket: PathBuf,
    /// The uid it runs as when jailed.
    #[serde(default)]
    pub uid: Option<u32>,
}

/// What `inspect` sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    pub vm_id: String,
    pub pid: i32,
    pub alive: bool,
    /// Firecracker's own view ("Not started", "Running", "Paused"); None if it does not answer.
    pub state: Option<String>,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The process was already gone.
    AlreadyExited,
    /// It exited within the grace period.
    Graceful,
    /// It was killed after the grace period.
    Killed,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("no VM {0} on this host")]
    UnknownVm(String),
    #[error("VM {0} exists already")]
    Exists(String),
    #[error("VM {vm_id}: {what}: {source}")]
    Io {
        vm_id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), and
/// whether it runs (not a zombie): the process facts of `shellwego-sys`, under the names
/// the VM code has always used.
pub use shellwego_sys::process::{alive as process_alive, start_time as process_start_time};

use shellwego_sys::process::reap;

/// How long a restarted agent waits for a recorded VM's API to answer before it counts the
/// VM as dead: a firecracker that does not answer its version in this long cannot be run.
const REATTACH_PROBE: Duration = Duration::from_secs(5);

/// The longest grace [`VmmManager::stop`] gives a VM before it kills it (the spec's own
/// maximum grace is shorter).
const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);

struct VmHandle {
    record: ProcessRecord,
    api: FirecrackerApi,
    rt: RuntimeDir,
}

/// The VMs of this host, keyed by vm_id.
pub struct VmmManager {
    firecracker: PathBuf,
    run_dir: PathBuf,
    jail: Option<Jail>,
    uids: std::sync::Mutex<UidPool>,
    ready_timeout: Duration,
    vms: Mutex<BTreeMap<String, VmHandle>>,
    /// Ids of VMs being spawned: reserved without holding `vms`, so a slow spawn (the
    /// jailer, firecracker's API coming up) never blocks other VMs' starts, stops or
    /// liveness checks.
    spawning: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// An id reserved for a spawn in progress; released when dropped.
struct Reservation<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    vm_id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.vm_id);
    }
}

impl VmmManager {
    pub fn new(firecracker: &Path, run_dir: &Path) -> VmmManager {
        VmmManager {
            firecracker: firecracker.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            jail: None,
            uids: std::sync::Mutex::new(UidPool::new(0, 0)),
            ready_timeout: Duration::from_secs(10),
            vms: Mutex::new(BTreeMap::new()),
            spawning: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Reserves `vm_id` for a spawn: fails when it is known or being spawned.
    async fn reserve(&self, vm_id: &str) -> Result<Reservation<'_>, VmmError> {
        let known = self.vms.lock().await.contains_key(vm_id);
        let mut spawning = self
            .spawning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known || !spawning.insert(vm_id.to_string()) {
            return Err(VmmError::Exists(vm_id.to_string()));
        }
        Ok(Reservation {
            set: &self.spawning,
            vm_id: vm_id.to_string(),
        })
    }

    /// Runs every VM's firecracker under the jailer (see [`jail`]): its own chroot, uid,
    /// PID namespace and cgroup. Kernel, initramfs, drives and snapshot files are placed
    /// into each VM's chroot.
    pub fn with_jail(mut self, mut jail: Jail) -> VmmManager {
        if let Some(name) = self.firecracker.file_name() {
            jail.exec_name = name.to_string_lossy().into_owned();
        }
        self.uids = std::sync::Mutex::new(UidPool::new(jail.uid_base, jail.uid_count));
        self.jail = Some(jail);
        self
    }

    pub fn jail(&self) -> Option<&Jail> {
        self.jail.as_ref()
    }

    pub fn runtime_dir(&self, vm_id: &str) -> RuntimeDir {
        match &self.jail {
            Some(j) => RuntimeDir::jailed(j, vm_id),
            None => RuntimeDir::new(&self.run_dir, vm_id),
        }
    }

    fn uid_pool(&self) -> std::sync::MutexGuard<'_, UidPool> {
        self.uids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The uid a jailed VM runs as (`None` unjailed or for an unknown VM).
    pub fn uid_of(&self, vm_id: &str) -> Option<u32> {
        self.jail.as_ref()?;
        self.uid_pool().get(vm_id)
    }

    /// The path firecracker is to be given for the read-only input `name` at `host` (one
    /// of [`BareSpawn::inputs`]): inside the chroot when jailed.
    pub fn path_in_vm(&self, name: &str, host: &Path) -> String {
        match &self.jail {
            Some(_) => format!("/{name}"),
            None => host.display().to_string(),
        }
    }

    /// Where firecracker is to write a file meant for `dest`, as (the path it is given,
    /// where the file then is on the host): jailed VMs write inside their chroot, and the
    /// caller moves the file (see [`collect_output`]).
    pub fn output_path(&self, vm_id: &str, name: &str, dest: &Path) -> (String, PathBuf) {
        match &self.jail {
            Some(_) => (format!("/{name}"), self.runtime_dir(vm_id).dir.join(name)),
            None => (dest.display().to_string(), dest.to_path_buf()),
        }
    }

    /// Directories that may hold VM records (for re-attach).
    fn record_dirs(&self) -> Vec<RuntimeDir> {
        let base = match &self.jail {
            Some(j) => j.chroot_base.join(&j.exec_name),
            None => self.run_dir.clone(),
        };
        let Ok(entries) = std::fs::read_dir(&base) else {
            return vec![];
        };
        entries
            .flatten()
            .map(|e| self.runtime_dir(&e.file_name().to_string_lossy()))
            .collect()
    }

    fn io(vm_id: &str, what: &str) -> impl Fn(std::io::Error) -> VmmError {
        let (vm_id, what) = (vm_id.to_string(), what.to_string());
        move |source| VmmError::Io {
            vm_id: vm_id.clone(),
            what: what.clone(),
            source,
        }
    }

    /// The VM's uid (assigned now if new); `None` unjailed.
    fn assign_uid(&self, vm_id: &str) -> Result<Option<u32>, VmmError> {
        if self.jail.is_none() {
            return Ok(None);
        }
        self.uid_pool()
            .assign(vm_id)
            .map(Some)
            .map_err(|e| Self::io(vm_id, "choosing its uid")(std::io::Error::other(e)))
    }

    /// Starts a firecracker for `vm_id`: jailed (files placed, TAPs handed over) or not.
    /// On failure nothing of it is left.
    async fn spawn_vm(
        &self,
        vm_id: &str,
        netns: Option<&Path>,
        limits: VmLimits,
        prepare: impl FnOnce(&RuntimeDir, Option<(u32, u32)>) -> std::io::Result<()>,
    ) -> Result<(RuntimeDir, driver::Spawned, Option<u32>), VmmError> {
        let rt = self.runtime_dir(vm_id);
        let uid = self.assign_uid(vm_id)?;
        let ids = self.jail.as_ref().zip(uid).map(|(j, u)| (u, j.gid()));
        if let Err(e) = std::fs::create_dir_all(&rt.dir).and_then(|()| prepare(&rt, ids)) {
            self.clean(&rt);
            return Err(Self::io(vm_id, "preparing its files")(e));
        }
        let jailed =
            self.jail
                .as_ref()
                .zip(uid)
                .map(|(jail, uid)| JailedSpawn { jail, uid, limits });
        match driver::spawn_with(
            &self.firecracker,
            &rt,
            netns,
            jailed.as_ref(),
            self.ready_timeout,
        )
        .await
        {
            Ok(s) => Ok((rt, s, uid)),
            Err(e) => {
                self.clean(&rt);
                Err(e.into())
            }
        }
    }

    /// Spawns a firecracker for the VM and configures it (logger, metrics, machine, boot
    /// source, drives, network, vsock); the VM is not started yet. On any failure the
    /// process and its directory are removed again.
    pub async fn create(&self, cfg: &MicrovmConfig) -> Result<ProcessRecord, VmmError> {
        let _reserved = self.reserve(&cfg.vm_id).await?;
        let mut seen = cfg.clone();
        let (rt, spawned, uid) = self
            .spawn_vm(
                &cfg.vm_id,
                cfg.netns.as_deref(),
                cfg.limits(),
                |rt, ids| match ids {
                    Some((uid, gid)) => {
                        seen = jail_files(rt, cfg, uid, gid)?;
                        for n in &cfg.network {
                            jail::own_tap(cfg.netns.as_deref(), &n.host_dev_name, uid)?;
                        }
                        Ok(())
                    }
                    None => make_links(rt, &cfg.links),
                },
            )
            .await?;
        let record = ProcessRecord {
            vm_id: cfg.vm_id.clone(),
            pid: spawned.pid,
            start_time: process_start_time(spawned.pid).unwrap_or(0),
            api_socket: rt.api_socket(),
            uid,
        };
        let handle = VmHandle {
            record: record.clone(),
            api: spawned.api,
            rt,
        };
        if let Err(e) = configure(&handle, &seen).await {
            self.kill_and_clean(&handle).await;
            return Err(e);
        }
        self.vms.lock().await.insert(cfg.vm_id.clone(), handle);
        Ok(record)
    }

    /// Spawns a firecracker for the VM with nothing configured (for a snapshot restore,
    /// which must be the first request a fresh process gets).
    pub async fn spawn_bare(
        &self,
        vm_id: &str,
        bare: &BareSpawn,
    ) -> Result<FirecrackerApi, VmmError> {
        let _reserved = self.reserve(vm_id).await?;
        let (rt, spawned, uid) = self
            .spawn_vm(
                vm_id,
                bare.netns.as_deref(),
                bare.limits,
                |rt, ids| match ids {
                    Some((uid, gid)) => {
                        for (name, target) in &bare.links {
                            jail::place(&rt.dir, name, target, Access::Owned { uid, gid })?;
                        }
                        for (name, target) in &bare.inputs {
                            jail::place(&rt.dir, name, target, Access::Shared { gid })?;
                        }
                        for tap in &bare.taps {
                            jail::own_tap(bare.netns.as_deref(), tap, uid)?;
                        }
                        Ok(())
                    }
                    None => make_links(rt, &bare.links),
                },
            )
            .await?;
        let record = ProcessRecord {
            vm_id: vm_id.to_string(),
            pid: spawned.pid,
            start_time: process_start_time(spawned.pid).unwrap_or(0),
            api_socket: rt.api_socket(),
            uid,
        };
        let prepared = write_record(&rt, &record);
        let api = spawned.api.clone();
        let handle = VmHandle {
            record,
            api: spawned.api,
            rt,
        };
        if let Err(e) = prepared {
            self.kill_and_clean(&handle).await;
            return Err(Self::io(vm_id, "preparing runtime files")(e));
        }
        self.vms.lock().await.insert(vm_id.to_string(), handle);
        Ok(api)
    }

    /// The API client of a known VM.
    pub async fn api_of(&self, vm_id: &str) -> Result<FirecrackerApi, VmmError> {
        let vms = self.vms.lock().await;
        vms.get(vm_id)
            .map(|h| h.api.clone())
            .ok_or_else(|| VmmError::UnknownVm(vm_id.to_string()))
    }

    /// The pid of a known VM's firecracker.
    pub async fn pid_of(&self, vm_id: &str) -> Option<i32> {
        self.vms.lock().await.get(vm_id).map(|h| h.record.pid)
    }

    /// Boots the configured VM.
    pub async fn start(&self, vm_id: &str) -> Result<(), VmmError> {
        self.api_of(vm_id)
            .await?
            .action(ActionType::InstanceStart)
            .await?;
        Ok(())
    }

    pub async fn pause(&self, vm_id: &str) -> Result<(), VmmError> {
        self.api_of(vm_id)
            .await?
            .set_state(models::VmState::Paused)
            .await?;
        Ok(())
    }

    pub async fn resume(&self, vm_id: &str) -> Result<(), VmmError> {
        self.api_of(vm_id)
            .await?
            .set_state(models::VmState::Resumed)
            .await?;
        Ok(())
    }

    /// Firecracker's view of the VM plus whether its process lives.
    pub async fn inspect(&self, vm_id: &str) -> Result<VmStatus, VmmError> {
        let (pid, api) = {
            let vms = self.vms.lock().await;
            let h = vms
                .get(vm_id)
                .ok_or_else(|| VmmError::UnknownVm(vm_id.to_string()))?;
            (h.record.pid, h.api.clone())
        };
        reap(pid);
        let alive = process_alive(pid);
        let state = if alive {
            api.instance_info().await.ok().map(|i| i.state)
        } else {
            None
        };
        Ok(VmStatus {
            vm_id: vm_id.to_string(),
            pid,
            alive,
            state,
        })
    }

    /// Whether the VM's firecracker process runs (no API call: a busy or hostile VMM
    /// cannot slow this down).
    pub async fn alive(&self, vm_id: &str) -> bool {
        let Some(pid) = self.pid_of(vm_id).await else {
            return false;
        };
        reap(pid);
        process_alive(pid)
    }

    /// Known VM ids.
    pub async fn list(&self) -> Vec<String> {
        self.vms.lock().await.keys().cloned().collect()
    }

    /// The guest console's last lines.
    pub fn console_tail(&self, vm_id: &str, lines: usize) -> String {
        console::tail(&self.runtime_dir(vm_id).console_log(), lines)
    }

    /// The guest console's last lines and the offset `console_from` continues at.
    pub fn console_tail_and_end(&self, vm_id: &str, lines: usize) -> (String, u64) {
        console::tail_and_end(&self.runtime_dir(vm_id).console_log(), lines)
    }

    /// The guest console's output since byte `offset` (at most `max_bytes`), for
    /// following it without re-reading what was sent (see `console::read_from`).
    pub fn console_from(
        &self,
        vm_id: &str,
        offset: u64,
        max_bytes: usize,
    ) -> std::io::Result<console::ConsoleChunk> {
        console::read_from(&self.runtime_dir(vm_id).console_log(), offset, max_bytes)
    }

    /// Keeps every VM's console under `cap` bytes (call periodically).
    pub async fn enforce_console_caps(&self, cap: u64) {
        let vms = self.vms.lock().await;
        for h in vms.values() {
            if let Err(e) = console::enforce_cap(&h.rt.console_log(), cap) {
                warn!(vm_id = %h.record.vm_id, error = %e, "cannot rotate console log");
            }
        }
    }

    /// Stops a VM: Ctrl-Alt-Del, then SIGKILL after `grace`; reaps it. The VM stays known
    /// (its files stay) until `remove`.
    pub async fn stop(&self, vm_id: &str, grace: Duration) -> Result<StopOutcome, VmmError> {
        let (pid, api) = {
            let vms = self.vms.lock().await;
            let h = vms
                .get(vm_id)
                .ok_or_else(|| VmmError::UnknownVm(vm_id.to_string()))?;
            (h.record.pid, h.api.clone())
        };
        reap(pid);
        if !process_alive(pid) {
            return Ok(StopOutcome::AlreadyExited);
        }
        // Guests without a keyboard controller ignore this; the agent's guest protocol has
        // its own shutdown, tried before stop() by the caller. The request counts against
        // the grace period: a VMM that does not answer is killed when the grace is over.
        let deadline = Instant::now() + grace.min(MAX_STOP_GRACE);
        let _ = api
            .with_timeout(grace.clamp(Duration::from_millis(100), driver::API_TIMEOUT))
            .action(ActionType::SendCtrlAltDel)
            .await;
        while Instant::now() < deadline {
            reap(pid);
            if !process_alive(pid) {
                return Ok(StopOutcome::Graceful);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill_pid(pid).await;
        Ok(StopOutcome::Killed)
    }

    /// Stops the VM if it runs and removes its runtime directory. Idempotent.
    pub async fn remove(&self, vm_id: &str) -> Result<(), VmmError> {
        let handle = self.vms.lock().await.remove(vm_id);
        match handle {
            Some(h) => self.kill_and_clean(&h).await,
            None => self.clean(&self.runtime_dir(vm_id)),
        }
        Ok(())
    }

    /// Finds VMs left running by an earlier agent (their `vm.json` in the run dir) and
    /// takes them back. Records whose process is gone (or whose pid now belongs to another
    /// process) are returned as dead and their directories removed.
    pub async fn reattach(&self) -> Result<(Vec<String>, Vec<String>), VmmError> {
        let mut attached = Vec::new();
        let mut dead = Vec::new();
        let mut vms = self.vms.lock().await;
        for rt in self.record_dirs() {
            let Ok(bytes) = std::fs::read(rt.record()) else {
                // A jail without a record: a VM whose start was cut short.
                if self.jail.is_some() && !vms.contains_key(&rt.vm_id) {
                    self.clean(&rt);
                }
                continue;
            };
            let Ok(record) = serde_json::from_slice::<ProcessRecord>(&bytes) else {
                warn!(path = %rt.record().display(), "unreadable VM record");
                continue;
            };
            if vms.contains_key(&record.vm_id) {
                continue;
            }
            let same_process = process_alive(record.pid)
                && process_start_time(record.pid) == Some(record.start_time);
            let api = FirecrackerApi::new(&record.api_socket);
            if same_process && api.with_timeout(REATTACH_PROBE).version().await.is_ok() {
                info!(vm_id = %record.vm_id, pid = record.pid, "re-attached");
                attached.push(record.vm_id.clone());
                if let Some(uid) = record.uid {
                    self.uid_pool().adopt(&record.vm_id, uid);
                }
                vms.insert(record.vm_id.clone(), VmHandle { record, api, rt });
            } else {
                dead.push(record.vm_id.clone());
                self.clean(&rt);
            }
        }
        Ok((attached, dead))
    }

    async fn kill_and_clean(&self, h: &VmHandle) {
        reap(h.record.pid);
        if process_alive(h.record.pid)
            && process_start_time(h.record.pid) == Some(h.record.start_time)
        {
            kill_pid(h.record.pid).await;
        }
        self.clean(&h.rt);
    }

    /// Removes what a VM had on the host besides its process: runtime dir (jail, bind
    /// mounts), cgroup, uid.
    fn clean(&self, rt: &RuntimeDir) {
        clean_dir(rt, self.jail.is_some());
        if let Some(j) = &self.jail {
            jail::remove_cgroups(j.cgroups, &rt.vm_id);
            self.uid_pool().release(&rt.vm_id);
        }
    }
}

/// Moves a file a VM wrote at `from` (see [`VmmManager::output_path`]) to `to`, owned by
/// root and private to it: a rename on one file system, else a copy.
pub fn collect_output(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if from != to && std::fs::rename(from, to).is_err() {
        std::fs::copy(from, to)?;
        std::fs::remove_file(from)?;
    }
    std::os::unix::fs::chown(to, Some(0), Some(0))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))
}

/// Writes the VM's record atomically (with fsync): after a crash it is whole or absent, and
/// a restarted agent re-attaches by it.
fn write_record(rt: &RuntimeDir, record: &ProcessRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    shellwego_sys::atomic::write_file(&rt.record(), &json)
}

/// Makes the symlinks a VM's relative paths go through.
fn make_links(rt: &RuntimeDir, links: &[(String, PathBuf)]) -> std::io::Result<()> {
    for (name, target) in links {
        let link = rt.dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link)?;
    }
    Ok(())
}

async fn configure(h: &VmHandle, cfg: &MicrovmConfig) -> Result<(), VmmError> {
    let io = VmmManager::io(&cfg.vm_id, "preparing runtime files");
    write_record(&h.rt, &h.record).map_err(&io)?;
    let api = &h.api;
    // The logger was set on the command line (driver::spawn); metrics go next to it,
    // relative to firecracker's working dir (the chroot's root under the jailer).
    api.put_metrics(&Metrics {
        metrics_path: "metrics.json".into(),
    })
    .await?;
    api.put_machine_config(&cfg.machine).await?;
    api.put_boot_source(&cfg.boot).await?;
    for d in &cfg.drives {
        api.put_drive(d).await?;
    }
    for n in &cfg.network {
        api.put_network_interface(n).await?;
    }
    if let Some(v) = &cfg.vsock {
        // A relative socket path lives in the runtime dir (firecracker's cwd).
        let _ = std::fs::remove_file(h.rt.dir.join(&v.uds_path));
        api.put_vsock(v).await?;
    }
    Ok(())
}

async fn kill_pid(pid: i32) {
    // A firecracker this manager started (identity checked by the caller through the
    // record's start time or by being our child).
    let _ = shellwego_sys::process::signal(pid, shellwego_sys::process::Signal::KILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        reap(pid);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reap(pid);
}

/// Removes a VM's runtime dir; for a jail, first the bind mounts in it, then the whole
/// `<base>/firecracker/<vm_id>` tree.
fn clean_dir(rt: &RuntimeDir, jailed: bool) {
    if jailed {
        if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
            let prefix = format!("{}/", rt.dir.display());
            for mp in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
                if mp.starts_with(&prefix) {
                    // A bind mount this manager made.
                    let _ = shellwego_sys::mount::detach(Path::new(mp));
                }
            }
        }
    }
    for dir in [&rt.dir, &rt.home] {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "cannot remove runtime dir");
            }
        }
    }
}

/// The configuration as the jailed firecracker sees it: kernel, initramfs, links and
/// absolute drive paths placed inside the chroot and named relative to its root. The
/// VM's own files (drives, links) become its uid's; kernel and initramfs stay shared.
fn jail_files(
    rt: &RuntimeDir,
    cfg: &MicrovmConfig,
    uid: u32,
    gid: u32,
) -> std::io::Result<MicrovmConfig> {
    let (owned, shared) = (Access::Owned { uid, gid }, Access::Shared { gid });
    let mut jailed = cfg.clone();
    jail::place(
        &rt.dir,
        "vmlinux",
        Path::new(&cfg.boot.kernel_image_path),
        shared,
    )?;
    jailed.boot.kernel_image_path = "/vmlinux".into();
    if let Some(initrd) = &cfg.boot.initrd_path {
        jail::place(&rt.dir, "initrd", Path::new(initrd), shared)?;
        jailed.boot.initrd_path = Some("/initrd".into());
    }
    for (name, target) in &cfg.links {
        jail::place(&rt.dir, name, target, owned)?;
    }
    jailed.links.clear();
    for d in &mut jailed.drives {
        if Path::new(&d.path_on_host).is_absolute() {
            jail::place(&rt.dir, &d.drive_id, Path::new(&d.path_on_host), owned)?;
            d.path_on_host = d.drive_id.clone();
        }
    }
    Ok(jailed)
}
