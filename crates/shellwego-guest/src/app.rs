//! The app process and everything else PID 1 runs: a single reaper collects every exit
//! status (PID 1 inherits all orphans), and waiters pick theirs up from it.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use shellwego_proto::MAX_EXEC_OUTPUT;

/// Exit statuses collected by the reaper, by pid.
static EXITS: Mutex<Option<HashMap<i32, i32>>> = Mutex::new(None);
static EXITED: Condvar = Condvar::new();
/// The app's pid (0 when none), read by the signal forwarder.
pub static APP_PID: AtomicI32 = AtomicI32::new(0);

/// Exit code as a shell reports it: the code, or 128 + the signal.
fn decode(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}

/// Reaps every child forever. Run on its own thread.
pub fn reaper() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let mut exits = EXITS.lock().unwrap_or_else(|e| e.into_inner());
            exits
                .get_or_insert_with(HashMap::new)
                .insert(pid, decode(status));
            EXITED.notify_all();
        } else {
            // No children right now.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits up to `timeout` for `pid`'s exit code.
pub fn wait_for(pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    let mut exits = EXITS.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(code) = exits.get_or_insert_with(HashMap::new).remove(&pid) {
            return Some(code);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        exits = EXITED
            .wait_timeout(exits, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// The exit code of `pid` if it has exited (without consuming it).
pub fn exit_code(pid: i32) -> Option<i32> {
    let mut exits = EXITS.lock().unwrap_or_else(|e| e.into_inner());
    exits.get_or_insert_with(HashMap::new).get(&pid).copied()
}

/// How a process is started.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
}

impl Launch {
    fn command(&self) -> Result<Command, String> {
        let program = self.argv.first().ok_or("empty argv")?;
        let mut cmd = Command::new(program);
        cmd.args(&self.argv[1..]).env_clear().envs(&self.env);
        if !self.workdir.is_empty() {
            cmd.current_dir(&self.workdir);
        }
        if self.uid != 0 || self.gid != 0 {
            cmd.uid(self.uid).gid(self.gid);
        }
        // SAFETY: setsid is async-signal-safe: the app gets its own session.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// Starts the app with stdout/stderr on the console (which the host keeps as its logs).
pub fn start_app(launch: &Launch) -> Result<i32, String> {
    let mut cmd = launch.command()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", launch.argv))?;
    let pid = child.id() as i32;
    // The reaper owns the exit status; the Child handle is not waited on.
    std::mem::forget(child);
    APP_PID.store(pid, Ordering::SeqCst);
    Ok(pid)
}

fn read_capped(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_EXEC_OUTPUT.saturating_sub(out.len());
                    out.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        out
    })
}

/// Runs a command to completion (or `timeout`, then SIGKILL) and collects its output.
pub fn exec(launch: &Launch, timeout: Duration) -> Result<(i32, Vec<u8>, Vec<u8>, bool), String> {
    let mut cmd = launch.command()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", launch.argv))?;
    let pid = child.id() as i32;
    let out = child.stdout.take().map(read_capped);
    let err = child.stderr.take().map(read_capped);
    std::mem::forget(child);
    let (code, timed_out) = match wait_for(pid, timeout) {
        Some(code) => (code, false),
        None => {
            // SAFETY: killing the child we started.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            (wait_for(pid, Duration::from_secs(5)).unwrap_or(-1), true)
        }
    };
    let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok((code, stdout, stderr, timed_out))
}

/// Sends `signal` to the app's process group.
pub fn signal_app(signal: i32) -> Result<(), String> {
    let pid = APP_PID.load(Ordering::SeqCst);
    if pid <= 0 {
        return Err("no app is running".into());
    }
    // SAFETY: kill(2) of the app's session/process group.
    if unsafe { libc::kill(-pid, signal) } != 0 {
        return Err(format!(
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

extern "C" fn forward(signal: libc::c_int) {
    let pid = APP_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(-pid, signal) };
    }
}

/// PID 1 forwards these signals to the app instead of dying of them.
pub fn install_signal_forwarding() {
    for sig in [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(
                sig,
                forward as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}
