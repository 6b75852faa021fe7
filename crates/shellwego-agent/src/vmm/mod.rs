//! MicroVMs: the pure translation of an app into Firecracker's configuration (`config`),
//! the firecracker process and its API (`driver`, `models`), the guest console (`console`),
//! and the lifecycle of VMs on this host (`VmmManager`).

pub mod config;
pub mod console;
pub mod driver;
pub mod models;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use driver::{DriverError, FirecrackerApi, Jail, RuntimeDir};
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
}

/// What the agent records about a running firecracker so it can re-attach after a
/// restart. The process start time guards against a reused pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub vm_id: String,
    pub pid: i32,
    pub start_time: u64,
    pub api_socket: PathBuf,
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

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    fields.get(19)?.parse().ok()
}

/// True while `pid` runs and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Reaps `pid` if it is our child and has exited; harmless otherwise.
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: non-blocking waitpid on a pid we spawned.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

struct VmHandle {
    record: ProcessRecord,
    api: FirecrackerApi,
    rt: RuntimeDir,
    jailed: bool,
}

/// The VMs of this host, keyed by vm_id.
pub struct VmmManager {
    firecracker: PathBuf,
    run_dir: PathBuf,
    jail: Option<Jail>,
    ready_timeout: Duration,
    vms: Mutex<BTreeMap<String, VmHandle>>,
}

impl VmmManager {
    pub fn new(firecracker: &Path, run_dir: &Path) -> VmmManager {
        VmmManager {
            firecracker: firecracker.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            jail: None,
            ready_timeout: Duration::from_secs(10),
            vms: Mutex::new(BTreeMap::new()),
        }
    }

    /// Runs every VM's firecracker under the jailer (configuration `jailer = true`).
    /// Kernel, initramfs and drives are hard-linked (same file system) or bind-mounted
    /// into each VM's chroot. Snapshots of jailed VMs are not supported.
    pub fn with_jail(mut self, jail: Jail) -> VmmManager {
        self.jail = Some(jail);
        self
    }

    pub fn runtime_dir(&self, vm_id: &str) -> RuntimeDir {
        match &self.jail {
            Some(j) => RuntimeDir::jailed(j, vm_id),
            None => RuntimeDir::new(&self.run_dir, vm_id),
        }
    }

    /// Directories that may hold VM records (for re-attach).
    fn record_dirs(&self) -> Vec<RuntimeDir> {
        let (base, jailed) = match &self.jail {
            Some(j) => (j.chroot_base.join("firecracker"), true),
            None => (self.run_dir.clone(), false),
        };
        let Ok(entries) = std::fs::read_dir(&base) else {
            return vec![];
        };
        entries
            .flatten()
            .map(|e| {
                let id = e.file_name().to_string_lossy().into_owned();
                let dir = if jailed {
                    e.path().join("root")
                } else {
                    e.path()
                };
                RuntimeDir { dir, vm_id: id }
            })
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

    /// Spawns a firecracker for the VM and configures it (logger, metrics, machine, boot
    /// source, drives, network, vsock); the VM is not started yet. On any failure the
    /// process and its directory are removed again.
    pub async fn create(&self, cfg: &MicrovmConfig) -> Result<ProcessRecord, VmmError> {
        let mut vms = self.vms.lock().await;
        if vms.contains_key(&cfg.vm_id) {
            return Err(VmmError::Exists(cfg.vm_id.clone()));
        }
        let rt = self.runtime_dir(&cfg.vm_id);
        let jailed;
        let cfg = match &self.jail {
            None => cfg,
            Some(_) => {
                jailed =
                    jail_files(&rt, cfg).map_err(Self::io(&cfg.vm_id, "preparing the jail"))?;
                &jailed
            }
        };
        let spawned = match driver::spawn_with(
            &self.firecracker,
            &rt,
            cfg.netns.as_deref(),
            self.jail.as_ref(),
            self.ready_timeout,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                clean_dir(&rt, self.jail.is_some());
                return Err(e.into());
            }
        };
        let record = ProcessRecord {
            vm_id: cfg.vm_id.clone(),
            pid: spawned.pid,
            start_time: process_start_time(spawned.pid).unwrap_or(0),
            api_socket: rt.api_socket(),
        };
        let handle = VmHandle {
            record: record.clone(),
            api: spawned.api,
            rt,
            jailed: self.jail.is_some(),
        };
        if let Err(e) = configure(&handle, cfg).await {
            kill_and_clean(&handle).await;
            return Err(e);
        }
        vms.insert(cfg.vm_id.clone(), handle);
        Ok(record)
    }

    /// Spawns a firecracker for the VM with nothing configured (for a snapshot restore,
    /// which must be the first request a fresh process gets).
    pub async fn spawn_bare(
        &self,
        vm_id: &str,
        netns: Option<&Path>,
        links: &[(String, PathBuf)],
    ) -> Result<FirecrackerApi, VmmError> {
        let mut vms = self.vms.lock().await;
        if vms.contains_key(vm_id) {
            return Err(VmmError::Exists(vm_id.to_string()));
        }
        if self.jail.is_some() {
            return Err(VmmError::Io {
                vm_id: vm_id.to_string(),
                what: "restoring a snapshot".into(),
                source: std::io::Error::other("snapshot restores are not supported for jailed VMs"),
            });
        }
        let rt = self.runtime_dir(vm_id);
        let spawned = driver::spawn(&self.firecracker, &rt, netns, self.ready_timeout).await?;
        let record = ProcessRecord {
            vm_id: vm_id.to_string(),
            pid: spawned.pid,
            start_time: process_start_time(spawned.pid).unwrap_or(0),
            api_socket: rt.api_socket(),
        };
        let prepared = write_record(&rt, &record).and_then(|()| make_links(&rt, links));
        let api = spawned.api.clone();
        let handle = VmHandle {
            record,
            api: spawned.api,
            rt,
            jailed: false,
        };
        if let Err(e) = prepared {
            kill_and_clean(&handle).await;
            return Err(Self::io(vm_id, "preparing runtime files")(e));
        }
        vms.insert(vm_id.to_string(), handle);
        Ok(api)
    }

    /// The API client of a known VM.
    pub async fn api_of(&self, vm_id: &str) -> Result<FirecrackerApi, VmmError> {
        let vms = self.vms.lock().await;
        vms.get(vm_id)
            .map(|h| h.api.clone())
            .ok_or_else(|| VmmError::UnknownVm(vm_id.to_string()))
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

    /// Known VM ids.
    pub async fn list(&self) -> Vec<String> {
        self.vms.lock().await.keys().cloned().collect()
    }

    /// The guest console's last lines.
    pub fn console_tail(&self, vm_id: &str, lines: usize) -> String {
        console::tail(&self.runtime_dir(vm_id).console_log(), lines)
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
        // its own shutdown, tried before stop() by the caller.
        let _ = api.action(ActionType::SendCtrlAltDel).await;
        let deadline = Instant::now() + grace;
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
            Some(h) => kill_and_clean(&h).await,
            None => clean_dir(&self.runtime_dir(vm_id), self.jail.is_some()),
        }
        Ok(())
    }

    /// Finds VMs left running by an earlier agent (their `vm.json` in the run dir) and
    /// takes them back. Records whose process is gone (or whose pid now belongs to another
    /// process) are returned as dead and their directories removed.
    pub async fn reattach(&self) -> Result<(Vec<String>, Vec<String>), VmmError> {
        let mut attached = Vec::new();
        let mut dead = Vec::new();
        let jailed = self.jail.is_some();
        let mut vms = self.vms.lock().await;
        for rt in self.record_dirs() {
            let Ok(bytes) = std::fs::read(rt.record()) else {
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
            if same_process && api.version().await.is_ok() {
                info!(vm_id = %record.vm_id, pid = record.pid, "re-attached");
                attached.push(record.vm_id.clone());
                vms.insert(
                    record.vm_id.clone(),
                    VmHandle {
                        record,
                        api,
                        rt,
                        jailed,
                    },
                );
            } else {
                dead.push(record.vm_id.clone());
                clean_dir(&rt, jailed);
            }
        }
        Ok((attached, dead))
    }
}

fn write_record(rt: &RuntimeDir, record: &ProcessRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let tmp = rt.dir.join(".vm.json.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, rt.record())
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
    make_links(&h.rt, &cfg.links).map_err(&io)?;
    {
        let path = h.rt.metrics();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(&io)?;
    }
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
    // SAFETY: signalling a firecracker this manager started (identity checked by the
    // caller through the record's start time or by being our child).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        reap(pid);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reap(pid);
}

async fn kill_and_clean(h: &VmHandle) {
    reap(h.record.pid);
    if process_alive(h.record.pid) && process_start_time(h.record.pid) == Some(h.record.start_time)
    {
        kill_pid(h.record.pid).await;
    }
    clean_dir(&h.rt, h.jailed);
}

/// Removes a VM's runtime dir; for a jail, first the bind mounts in it, then the whole
/// `<base>/firecracker/<vm_id>` tree.
fn clean_dir(rt: &RuntimeDir, jailed: bool) {
    let dir = if jailed {
        if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
            let prefix = format!("{}/", rt.dir.display());
            for mp in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
                if mp.starts_with(&prefix) {
                    if let Ok(c) = std::ffi::CString::new(mp) {
                        // SAFETY: unmounting a bind mount this manager made.
                        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                    }
                }
            }
        }
        rt.dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| rt.dir.clone())
    } else {
        rt.dir.clone()
    };
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %e, "cannot remove runtime dir");
        }
    }
}

/// Puts `target` at `rt.dir/name`: a hard link where it shares the file system, else a
/// bind mount (the chroot cannot see outside paths or follow symlinks out).
fn place_in_jail(rt: &RuntimeDir, name: &str, target: &Path) -> std::io::Result<()> {
    let dest = rt.dir.join(name);
    let _ = std::fs::remove_file(&dest);
    let target = std::fs::canonicalize(target)?;
    if std::fs::hard_link(&target, &dest).is_ok() {
        return Ok(());
    }
    std::fs::File::create(&dest)?;
    let (src, dst) = (
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?,
        std::ffi::CString::new(dest.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?,
    );
    // SAFETY: bind-mounting one file onto another with valid C strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The configuration as the jailed firecracker sees it: kernel, initramfs, links and
/// absolute drive paths placed inside the chroot and named relative to its root.
fn jail_files(rt: &RuntimeDir, cfg: &MicrovmConfig) -> std::io::Result<MicrovmConfig> {
    std::fs::create_dir_all(&rt.dir)?;
    let mut jailed = cfg.clone();
    place_in_jail(rt, "vmlinux", Path::new(&cfg.boot.kernel_image_path))?;
    jailed.boot.kernel_image_path = "/vmlinux".into();
    if let Some(initrd) = &cfg.boot.initrd_path {
        place_in_jail(rt, "initrd", Path::new(initrd))?;
        jailed.boot.initrd_path = Some("/initrd".into());
    }
    for (name, target) in &cfg.links {
        place_in_jail(rt, name, target)?;
    }
    jailed.links.clear();
    for d in &mut jailed.drives {
        if Path::new(&d.path_on_host).is_absolute() {
            place_in_jail(rt, &d.drive_id, Path::new(&d.path_on_host))?;
            d.path_on_host = d.drive_id.clone();
        }
    }
    Ok(jailed)
}
