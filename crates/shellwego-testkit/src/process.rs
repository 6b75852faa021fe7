//! Small helpers for processes a fixture starts.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// True while a process with this PID exists (and is not a zombie we could reap).
pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    if !exists {
        return false;
    }
    // A zombie still "exists": read its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Sends SIGTERM, waits up to `grace` for the process to go, then SIGKILLs it.
pub fn terminate(pid: i32, grace: Duration) {
    // SAFETY: plain signal delivery to a PID this fixture started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while alive(pid) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
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
/// test's own run dir): VMs a test started are ended even when it panics halfway.
pub struct KillVmsOnDrop(pub std::path::PathBuf);

impl Drop for KillVmsOnDrop {
    fn drop(&mut self) {
        for pid in vm_pids(&self.0) {
            terminate(pid, Duration::from_millis(100));
            let mut status = 0;
            // SAFETY: reaping a child of this test process if it is one.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }
}

/// PIDs of the firecracker (or jailer) processes whose command line names a path under
/// `dir`: the VMs started with that run dir.
pub fn vm_pids(dir: &std::path::Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_firecracker = args
            .first()
            .is_some_and(|a| a.ends_with("firecracker") || a.ends_with("jailer"));
        if is_firecracker && args.iter().any(|a| a.contains(&needle)) {
            pids.push(pid);
        }
    }
    pids
}

/// Runs one of the repository's `scripts/NAME` (they print a path on their last line, after
/// building or finding what they cache) and returns that path.
pub fn repo_script_path(name: &str) -> std::path::PathBuf {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name);
    let out = run_ok(Command::new("bash").arg(&script));
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/{name} printed no path"));
    std::path::PathBuf::from(last.trim())
}
