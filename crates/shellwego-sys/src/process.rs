//! Facts about processes (from `/proc`, parsed by `procfs`) and signals to them (`rustix`).
//!
//! A pid alone names a process only until it exits: pids are reused. Whoever records a
//! pid to find its process again records [`start_time`] with it and compares both.

use std::io;

pub use rustix::process::Signal;
use rustix::process::{Pid, WaitOptions};

/// When the process started, in clock ticks since boot (field 22 of `/proc/PID/stat`);
/// `None` when there is no such process or its stat cannot be read.
pub fn start_time(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.starttime)
}

/// True while `pid` runs: it exists and is neither a zombie nor dead.
pub fn alive(pid: i32) -> bool {
    procfs::process::Process::new(pid).is_ok_and(|p| p.is_alive())
}

/// True while `/proc/PID` exists, zombies included: whether a name that carries the pid
/// (a temp file, a build directory) may still be in use.
pub fn exists(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|pid| procfs::process::Process::new(pid).is_ok())
}

/// The process's arguments, `argv[0]` first; `None` when they cannot be read (no such
/// process, a zombie, or not UTF-8).
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    procfs::process::Process::new(pid)
        .and_then(|p| p.cmdline())
        .ok()
}

/// The pids of every process there is now.
pub fn all_pids() -> Vec<i32> {
    procfs::process::all_processes()
        .map(|it| it.flatten().map(|p| p.pid()).collect())
        .unwrap_or_default()
}

fn pid_of(pid: i32) -> io::Result<Pid> {
    // Pid refuses 0 and negative numbers: kill(2) would read those as a process group
    // or every process the caller may signal.
    (pid > 0)
        .then(|| Pid::from_raw(pid))
        .flatten()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{pid} is not a process id"),
            )
        })
}

/// Sends `signal` to process `pid` (never to a group: 0 and negative pids are refused).
pub fn signal(pid: i32, signal: Signal) -> io::Result<()> {
    rustix::process::kill_process(pid_of(pid)?, signal).map_err(io::Error::from)
}

/// Sends `signal` to every process of the group `pgid` (the group a child was started in
/// with `Command::process_group(0)`: its pid).
pub fn signal_group(pgid: i32, signal: Signal) -> io::Result<()> {
    rustix::process::kill_process_group(pid_of(pgid)?, signal).map_err(io::Error::from)
}

/// Makes the calling process the leader of a new session (and process group), detached
/// from the caller's terminal and group: what a child that is to outlive its parent does
/// between fork and exec (one system call, safe there).
pub fn new_session() -> io::Result<()> {
    rustix::process::setsid().map(drop).map_err(io::Error::from)
}

/// Collects `pid`'s exit status if it is our child and has exited, so it does not stay a
/// zombie; returns at once otherwise, and is harmless for a pid that is not our child.
pub fn reap(pid: i32) {
    if let Ok(pid) = pid_of(pid) {
        let _ = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG);
    }
}

/// The resident memory of a process (`VmRSS`), in bytes; None when it is gone.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let status = procfs::process::Process::new(pid).ok()?.status().ok()?;
    status.vmrss.map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(
        clippy::zombie_processes,
        reason = "the child is reaped by `reap`, which is what this tests"
    )]
    fn facts_about_ourselves_a_child_and_a_missing_pid() {
        let me = std::process::id();
        assert!(alive(me as i32));
        assert!(exists(me));
        assert!(start_time(me as i32).is_some_and(|t| t > 0));
        assert!(all_pids().contains(&(me as i32)));
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(alive(pid));
        // Until the child has exec'd, its command line is not yet `sleep`'s.
        let want = Some(vec!["sleep".to_string(), "30".to_string()]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while cmdline(pid) != want && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(cmdline(pid), want);
        let started = start_time(pid);
        assert!(started.is_some());
        signal(pid, Signal::KILL).unwrap();
        // Killed but not reaped: a zombie exists yet does not run.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!alive(pid));
        assert!(exists(pid as u32));
        reap(pid);
        assert!(!exists(pid as u32));
        for bad in [0, -1] {
            let e = signal(bad, Signal::TERM).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        assert!(!alive(i32::MAX));
        assert_eq!(start_time(i32::MAX), None);
        assert!(!exists(u32::MAX));
    }

    #[test]
    fn resident_bytes_of_this_process_and_of_none() {
        let mine = super::resident_bytes(std::process::id() as i32).unwrap();
        assert!(mine > 1 << 20 && mine < 64 << 30, "{mine}");
        assert_eq!(super::resident_bytes(i32::MAX), None);
    }
}
