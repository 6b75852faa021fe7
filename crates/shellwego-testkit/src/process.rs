//! Small helpers for processes a fixture starts.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use shellwego_sys::process::{cmdline, signal, Signal};

/// True while a process with this PID exists and is not a zombie.
pub use shellwego_sys::process::alive;

/// Sends SIGTERM, waits up to `grace` for the process to go, then SIGKILLs it.
pub fn terminate(pid: i32, grace: Duration) {
    // A PID this fixture started.
    let _ = signal(pid, Signal::TERM);
    let start = Instant::now();
    while alive(pid) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        let _ = signal(pid, Signal::KILL);
        let start = Instant::now();
        while alive(pid) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a command to completion, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command, returning whether it succeeded (for teardown, where failure is logged).
pub fn run_quiet(cmd: &mut Command) -> bool {
    match cmd.output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "teardown: {cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("teardown: cannot run {cmd:?}: {e}");
            false
        }
    }
}

/// Kills, on drop, every firecracker whose command line names a path under `0` (the
/// test's own run dir) or that is jailed under it: VMs a test started are ended even when
/// it panics halfway, and the cgroups of jailed ones removed.
pub struct KillVmsOnDrop(pub std::path::PathBuf);

impl Drop for KillVmsOnDrop {
    fn drop(&mut self) {
        let jailed: Vec<(i32, String)> = jailed_vms(&self.0);
        for pid in vm_pids(&self.0) {
            terminate(pid, Duration::from_millis(100));
            // Reaping a child of this test process if it is one.
            shellwego_sys::process::reap(pid);
        }
        for (_, id) in jailed {
            remove_vm_cgroups(&id);
        }
    }
}

/// Removes the (empty) cgroups the jailer made for VM `id` under `shellwego/`, in every
/// v1 hierarchy and in v2.
fn remove_vm_cgroups(id: &str) {
    let roots = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .chain([std::path::PathBuf::from("/sys/fs/cgroup")]);
    for root in roots {
        let dir = root.join("shellwego").join(id);
        for _ in 0..50 {
            if !dir.exists() || std::fs::remove_dir(&dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// PIDs of the firecracker (or jailer) processes whose command line names a path under
/// `dir`, and of the jailed firecrackers whose chroot is under it: the VMs started with
/// that run dir.
pub fn vm_pids(dir: &std::path::Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    for pid in shellwego_sys::process::all_pids() {
        let Some(args) = cmdline(pid) else {
            continue;
        };
        let is_firecracker = args
            .first()
            .is_some_and(|a| a.ends_with("firecracker") || a.ends_with("jailer"));
        if is_firecracker && args.iter().any(|a| a.contains(&needle)) {
            pids.push(pid);
        }
    }
    pids.extend(jailed_vms(dir).into_iter().map(|(pid, _)| pid));
    pids
}

/// Jailed firecrackers under `dir`, as (pid, VM id): the jailer writes each one's pid (as this namespace
/// sees it) to `<base>/<exec>/<id>/root/<exec>.pid`; a pid counts only while it is a
/// firecracker of that id (pids are reused).
pub fn jailed_vms(dir: &std::path::Path) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && depth < 5 {
                stack.push((path, depth + 1));
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let in_root = d.file_name().is_some_and(|n| n == "root");
            let Some(id) = d.parent().and_then(|p| p.file_name()) else {
                continue;
            };
            if !in_root || !name.ends_with(".pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let args = cmdline(pid).unwrap_or_default();
            let is_that_vm = args
                .windows(2)
                .any(|w| w[0] == "--id" && std::ffi::OsStr::new(&w[1]) == id);
            if is_that_vm {
                found.push((pid, id.to_string_lossy().into_owned()));
            }
        }
    }
    found
}

/// Runs one of the repository's `scripts/NAME` (they print a path on their last line, after
/// building or finding what they cache) and returns that path.
pub fn repo_script_path(name: &str) -> std::path::PathBuf {
    repo_script_path_with(name, &[])
}

/// Like [`repo_script_path`], with arguments for the script.
pub fn repo_script_path_with(name: &str, args: &[&str]) -> std::path::PathBuf {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name);
    let out = run_ok(Command::new("bash").arg(&script).args(args));
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/{name} printed no path"));
    std::path::PathBuf::from(last.trim())
}
