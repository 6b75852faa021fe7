//! The `firecracker` process and its HTTP API over a Unix socket.
//!
//! [`spawn`] starts one firecracker per VM in its own runtime directory:
//! ```text
//! <run dir>/<vm_id>/api.sock       the API socket
//!                   console.log    the guest's serial output (capped, see `console`)
//!                   firecracker.log, metrics.json
//!                   vsock.sock     host side of the VM's vsock
//! ```
//! [`FirecrackerApi`] speaks HTTP/1.1 (hyper) to that socket, one connection per request,
//! with typed bodies; a failed request carries Firecracker's own `fault_message`. Every
//! request, its connect included, ends within the client's limit ([`API_TIMEOUT`] unless
//! set with [`FirecrackerApi::with_timeout`]).

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::models::*;

/// A failed API call or process operation.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("firecracker {method} {path} failed ({status}): {fault}")]
    Api {
        method: String,
        path: String,
        status: u16,
        /// Firecracker's `fault_message`, or the raw body.
        fault: String,
    },
    #[error("cannot reach firecracker API at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error talking to firecracker at {socket}: {message}")]
    Http { socket: PathBuf, message: String },
    #[error("unexpected response from firecracker {path}: {message}")]
    Decode { path: String, message: String },
    #[error("cannot start firecracker {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("firecracker's API socket {socket} did not appear within {waited:?}{exited}")]
    NotReady {
        socket: PathBuf,
        waited: Duration,
        exited: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Command(shellwego_sys::command::CommandError),
}

/// How long one API request may take by default. Firecracker answers configuration calls
/// at once; loading or writing a snapshot of a few GiB takes seconds.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `firecracker --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for one firecracker's API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerApi {
    socket: PathBuf,
    timeout: Duration,
}

impl FirecrackerApi {
    pub fn new(socket: &Path) -> FirecrackerApi {
        FirecrackerApi {
            socket: socket.to_path_buf(),
            timeout: API_TIMEOUT,
        }
    }

    /// The same client with `timeout` for each request.
    pub fn with_timeout(&self, timeout: Duration) -> FirecrackerApi {
        FirecrackerApi {
            socket: self.socket.clone(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, DriverError> {
        use crate::uds_http::{request_within, UdsHttpError};
        let (status, bytes) =
            request_within(&self.socket, method.clone(), path, body, self.timeout)
                .await
                .map_err(|e| match e {
                    UdsHttpError::Connect { socket, source } => {
                        DriverError::Connect { socket, source }
                    }
                    UdsHttpError::Http { socket, message } => DriverError::Http { socket, message },
                    UdsHttpError::TimedOut {
                        socket,
                        method,
                        path,
                        limit,
                    } => DriverError::Http {
                        socket,
                        message: format!("{method} {path} timed out after {limit:?}"),
                    },
                })?;
        if status.is_success() {
            return Ok(bytes);
        }
        let fault = serde_json::from_slice::<Fault>(&bytes)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(DriverError::Api {
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            fault,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, DriverError> {
        let bytes = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| DriverError::Decode {
            path: path.to_string(),
            message: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
        })
    }

    async fn send<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), DriverError> {
        let json = serde_json::to_vec(body).map_err(|e| DriverError::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        self.call(method, path, Some(json)).await.map(drop)
    }

    pub async fn instance_info(&self) -> Result<InstanceInfo, DriverError> {
        self.get("/").await
    }

    pub async fn version(&self) -> Result<Version, DriverError> {
        self.get("/version").await
    }

    pub async fn vm_config(&self) -> Result<FullVmConfig, DriverError> {
        self.get("/vm/config").await
    }

    pub async fn put_machine_config(&self, c: &MachineConfig) -> Result<(), DriverError> {
        self.send(Method::PUT, "/machine-config", c).await
    }

    pub async fn put_boot_source(&self, b: &BootSource) -> Result<(), DriverError> {
        self.send(Method::PUT, "/boot-source", b).await
    }

    pub async fn put_drive(&self, d: &Drive) -> Result<(), DriverError> {
        self.send(Method::PUT, &format!("/drives/{}", d.drive_id), d)
            .await
    }

    pub async fn patch_drive(&self, d: &DriveUpdate) -> Result<(), DriverError> {
        self.send(Method::PATCH, &format!("/drives/{}", d.drive_id), d)
            .await
    }

    pub async fn put_network_interface(&self, n: &NetworkInterface) -> Result<(), DriverError> {
        self.send(
            Method::PUT,
            &format!("/network-interfaces/{}", n.iface_id),
            n,
        )
        .await
    }

    pub async fn patch_network_interface(
        &self,
        n: &NetworkInterfaceUpdate,
    ) -> Result<(), DriverError> {
        self.send(
            Method::PATCH,
            &format!("/network-interfaces/{}", n.iface_id),
            n,
        )
        .await
    }

    pub async fn put_vsock(&self, v: &Vsock) -> Result<(), DriverError> {
        self.send(Method::PUT, "/vsock", v).await
    }

    pub async fn put_logger(&self, l: &Logger) -> Result<(), DriverError> {
        self.send(Method::PUT, "/logger", l).await
    }

    pub async fn put_metrics(&self, m: &Metrics) -> Result<(), DriverError> {
        self.send(Method::PUT, "/metrics", m).await
    }

    pub async fn action(&self, action_type: ActionType) -> Result<(), DriverError> {
        self.send(Method::PUT, "/actions", &InstanceAction { action_type })
            .await
    }

    pub async fn set_state(&self, state: VmState) -> Result<(), DriverError> {
        self.send(Method::PATCH, "/vm", &VmStateUpdate { state })
            .await
    }

    pub async fn snapshot_create(&self, s: &SnapshotCreate) -> Result<(), DriverError> {
        self.send(Method::PUT, "/snapshot/create", s).await
    }

    pub async fn snapshot_load(&self, s: &SnapshotLoad) -> Result<(), DriverError> {
        self.send(Method::PUT, "/snapshot/load", s).await
    }
}

/// Files of one VM's runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir {
    /// Firecracker's working directory (the chroot under the jailer).
    pub dir: PathBuf,
    /// Where the agent keeps what the VM must not touch (its record, the console): `dir`
    /// itself unjailed, the jail's directory above the chroot when jailed.
    pub home: PathBuf,
    pub vm_id: String,
}

impl RuntimeDir {
    pub fn new(run_dir: &Path, vm_id: &str) -> RuntimeDir {
        RuntimeDir {
            dir: run_dir.join(vm_id),
            home: run_dir.join(vm_id),
            vm_id: vm_id.to_string(),
        }
    }

    /// The chroot of a jailed VM.
    pub fn jailed(jail: &Jail, vm_id: &str) -> RuntimeDir {
        RuntimeDir {
            dir: jail.root_of(vm_id),
            home: jail.home_of(vm_id),
            vm_id: vm_id.to_string(),
        }
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.home.join("console.log")
    }
    pub fn firecracker_log(&self) -> PathBuf {
        self.dir.join("firecracker.log")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn record(&self) -> PathBuf {
        self.home.join("vm.json")
    }
}

pub use super::jail::Jail;

/// A jailed spawn: the VM's uid and what its cgroup allows.
#[derive(Debug, Clone)]
pub struct JailedSpawn<'a> {
    pub jail: &'a Jail,
    pub uid: u32,
    pub limits: super::jail::VmLimits,
}

/// Firecracker's own log goes to `firecracker.log` in its working dir (the chroot's root
/// under the jailer), at Warning and above, from the first moment: otherwise it logs to
/// stdout, which is the guest console.
const LOG_ARGS: [&str; 4] = ["--log-path", "firecracker.log", "--level", "Warning"];

/// A started firecracker process.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub api: FirecrackerApi,
}

/// Starts `binary` with its API socket in `rt`, the guest console appended to
/// `console.log`, and waits until the API answers. The process gets its own session
/// (it outlives an agent restart and is re-attached by pid). `netns`, if given, is a
/// network namespace path (`/run/netns/NAME`) the process enters before exec.
pub async fn spawn(
    binary: &Path,
    rt: &RuntimeDir,
    netns: Option<&Path>,
    ready_timeout: Duration,
) -> Result<Spawned, DriverError> {
    spawn_with(binary, rt, netns, None, ready_timeout).await
}

/// Like [`spawn`]; with `jail`, firecracker is started through the jailer: chrooted in
/// `rt.dir` (which must be `jail.root_of(vm_id)`) with its API socket at `/api.sock`
/// inside, as the VM's uid, in a new PID namespace and its own cgroup. The returned pid
/// is firecracker's own (the jailer's pid file), not the jailer's.
pub async fn spawn_with(
    binary: &Path,
    rt: &RuntimeDir,
    netns: Option<&Path>,
    jail: Option<&JailedSpawn<'_>>,
    ready_timeout: Duration,
) -> Result<Spawned, DriverError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| DriverError::Io { what, path, source }
    };
    std::fs::create_dir_all(&rt.dir).map_err(io("creating runtime dir", &rt.dir))?;
    let socket = rt.api_socket();
    let _ = std::fs::remove_file(&socket);
    // Firecracker's log and metrics: the VM's own (its uid's when jailed), 0600.
    for path in [rt.firecracker_log(), rt.metrics()] {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("creating", &path))?;
        if let Some(j) = jail {
            std::os::unix::fs::chown(&path, Some(j.uid), Some(j.jail.gid()))
                .map_err(io("handing to the VM's uid", &path))?;
        }
    }
    if let Some(j) = jail {
        std::os::unix::fs::chown(&rt.dir, Some(j.uid), Some(j.jail.gid()))
            .map_err(io("handing to the VM's uid", &rt.dir))?;
    }
    // The console is the app's stdout and stderr: root-only, whatever the umask.
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(rt.console_log())
        .map_err(io("opening console log", &rt.console_log()))?;
    let console_err = console
        .try_clone()
        .map_err(io("duplicating console log", &rt.console_log()))?;
    let id = rt.vm_id.clone();
    let mut cmd = match jail {
        None => {
            let mut cmd = std::process::Command::new(binary);
            cmd.arg("--api-sock")
                .arg(&socket)
                .arg("--id")
                .arg(&id)
                .args(LOG_ARGS)
                .current_dir(&rt.dir);
            cmd
        }
        Some(j) => {
            let mut cmd = std::process::Command::new(&j.jail.jailer);
            cmd.args([
                "--id",
                &id,
                "--uid",
                &j.uid.to_string(),
                "--gid",
                &j.jail.gid().to_string(),
                "--new-pid-ns",
                "--cgroup-version",
                &j.jail.cgroups.number().to_string(),
                "--parent-cgroup",
                super::jail::PARENT_CGROUP,
            ])
            .arg("--exec-file")
            .arg(binary)
            .arg("--chroot-base-dir")
            .arg(&j.jail.chroot_base);
            for c in super::jail::cgroup_args(j.jail.cgroups, &j.limits, j.jail.io_weight) {
                cmd.arg("--cgroup").arg(c);
            }
            if let Some(ns) = netns {
                cmd.arg("--netns").arg(ns);
            }
            cmd.args(["--", "--api-sock", "/api.sock"]).args(LOG_ARGS);
            cmd
        }
    };
    cmd.stdin(Stdio::null()).stdout(console).stderr(console_err);
    let netns_file = match (netns, jail) {
        (Some(p), None) => {
            Some(std::fs::File::open(p).map_err(io("opening network namespace", p))?)
        }
        _ => None,
    };
    // SAFETY: only async-signal-safe calls (setsid, setns: one system call each, no
    // allocation) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Already a group leader (cannot happen in a fresh child) is no reason to fail.
            let _ = shellwego_sys::process::new_session();
            if let Some(ns) = &netns_file {
                shellwego_sys::netns::enter(ns)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| DriverError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    // Under the jailer's new PID namespace the child forks firecracker and exits; the
    // firecracker's pid (in our namespace) is in `<exec name>.pid` in the chroot.
    let pid_file = jail.map(|_| {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into());
        rt.dir.join(format!("{name}.pid"))
    });
    let mut pid = match pid_file {
        None => Some(child.id() as i32),
        Some(_) => None,
    };
    let mut child_exit = None;
    // The child is reaped by whoever stops it (by pid); don't keep a handle that would
    // make a zombie of it when dropped early.
    let api = FirecrackerApi::new(&socket);
    let start = Instant::now();
    loop {
        if pid.is_none() {
            pid = pid_file
                .as_ref()
                .and_then(|f| std::fs::read_to_string(f).ok())
                .and_then(|t| t.trim().parse().ok());
        }
        if let Some(pid) = pid {
            // Asking may not outlast the time the start has left.
            let left = ready_timeout
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(10));
            if socket.exists()
                && api
                    .with_timeout(left.min(API_TIMEOUT))
                    .version()
                    .await
                    .is_ok()
            {
                if jail.is_some() {
                    let _ = child.try_wait();
                }
                std::mem::forget(child);
                return Ok(Spawned { pid, api });
            }
        }
        if child_exit.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                child_exit = Some(status);
            }
        }
        let gone = match (child_exit, pid) {
            // Unjailed the child is firecracker; jailed it exits by design once it forked
            // firecracker (status 0), which must then still run.
            (Some(status), _) if jail.is_none() || !status.success() => Some(status),
            (Some(status), Some(p)) if !crate::vmm::process_alive(p) => Some(status),
            _ => None,
        };
        if let Some(status) = gone {
            return Err(DriverError::NotReady {
                socket,
                waited: start.elapsed(),
                exited: format!("; firecracker exited with {status}"),
            });
        }
        if start.elapsed() > ready_timeout {
            match (jail, pid) {
                (Some(_), Some(p)) => {
                    // The firecracker this call just started (its pid file).
                    let _ = shellwego_sys::process::signal(p, shellwego_sys::process::Signal::KILL);
                }
                _ => {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
            return Err(DriverError::NotReady {
                socket,
                waited: start.elapsed(),
                exited: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs `firecracker --version` (for at most 10 s) and returns the version number (e.g.
/// "1.12.1").
pub fn binary_version(binary: &Path) -> Result<String, DriverError> {
    use shellwego_sys::command::{output_within, CommandError};
    let out = output_within(
        std::process::Command::new(binary).arg("--version"),
        None,
        VERSION_TIMEOUT,
    )
    .map_err(|e| match e {
        CommandError::Spawn { source, .. } => DriverError::Spawn {
            binary: binary.to_path_buf(),
            source,
        },
        other => DriverError::Command(other),
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix('v')))
        .map(str::to_string)
        .ok_or_else(|| DriverError::Decode {
            path: "--version".into(),
            message: text.into_owned(),
        })
}
