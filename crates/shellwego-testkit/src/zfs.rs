//! A zfs-fuse daemon shared by the tests of one process, and a throwaway pool per test.
//!
//! The daemon is started on first use and shared by every test process that needs it
//! (there can be only one zfs-fuse per host). Each such process registers itself in
//! `users/`; at exit (an `atexit` hook: libtest's `main` returns normally) it deregisters,
//! and the last live user stops the daemon — only one the harness started (pid file). A
//! daemon left by killed test processes is stopped by the next run's last user. So each
//! test binary gets a fresh daemon: one daemon kept through a whole run of ~20 binaries
//! (hundreds of pools made and destroyed) was seen to deadlock.
//! Pools live on sparse files and carry a name unique to the process and test.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::prereq::{require_command, require_root};
use crate::process::{alive, run_ok, run_quiet, terminate};

/// Where test pools keep their backing files and mounts.
pub const TEST_ROOT: &str = "/tmp/shellwego-test";
const PID_FILE: &str = "/tmp/shellwego-test/zfs-fuse.pid";
const USERS_DIR: &str = "/tmp/shellwego-test/users";
const SETUP_FIX: &str = "install it with `make setup` (apt-get install zfs-fuse)";

static STARTED: Mutex<bool> = Mutex::new(false);

fn user_file(pid: u32) -> PathBuf {
    Path::new(USERS_DIR).join(pid.to_string())
}

/// Other live processes registered as users of the daemon.
fn other_live_users() -> bool {
    let me = std::process::id().to_string();
    let Ok(entries) = fs::read_dir(USERS_DIR) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        match name.parse::<i32>() {
            Ok(pid) if name != me && alive(pid) => true,
            _ => {
                if name != me {
                    let _ = fs::remove_file(e.path());
                }
                false
            }
        }
    })
}

fn zpool_answers() -> bool {
    Command::new("zpool")
        .arg("list")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Mount points of zfs-fuse file systems whose daemon is gone ("Transport endpoint is
/// not connected"): they are lazily unmounted before a new daemon starts.
fn unmount_stale_mounts() {
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let [_, mountpoint, fstype, ..] = cols.as_slice() {
            let ours = mountpoint.starts_with(TEST_ROOT);
            if ours && fstype.starts_with("fuse") && fs::metadata(mountpoint).is_err() {
                run_quiet(Command::new("umount").arg("-l").arg(mountpoint));
            }
        }
    }
}

/// The pid of the daemon the harness started, from the pid file.
fn read_pid_file() -> Option<i32> {
    fs::read_to_string(PID_FILE)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn write_pid_file(daemon: i32) {
    if let Err(e) = fs::write(PID_FILE, format!("{daemon}\n")) {
        panic!("cannot write {PID_FILE}: {e}");
    }
}

extern "C" fn leave_daemon() {
    let _ = fs::remove_file(user_file(std::process::id()));
    if other_live_users() {
        return;
    }
    if let Some(pid) = read_pid_file().filter(|p| alive(*p)) {
        // zfs-fuse needs seconds to exit after SIGTERM, seconds each test binary would
        // pay; with no pool imported it holds no data, and is killed at once.
        let grace = if no_pools() {
            Duration::ZERO
        } else {
            Duration::from_secs(20)
        };
        terminate(pid, grace);
        let _ = fs::remove_file(PID_FILE);
        unmount_stale_mounts();
    }
}

/// True if the daemon answers and has no pool imported.
fn no_pools() -> bool {
    Command::new("zpool")
        .args(["list", "-H", "-o", "name"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.iter().all(u8::is_ascii_whitespace))
}

/// Makes sure a zfs-fuse daemon answers, starting one if needed.
pub fn ensure_daemon() {
    require_root("a ZFS test");
    let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
    if *started && zpool_answers() {
        return;
    }
    require_command("zfs-fuse", SETUP_FIX);
    require_command("zpool", SETUP_FIX);
    fs::create_dir_all(USERS_DIR).unwrap_or_else(|e| panic!("cannot create {USERS_DIR}: {e}"));
    fs::write(user_file(std::process::id()), b"")
        .unwrap_or_else(|e| panic!("cannot register as a zfs-fuse user: {e}"));
    register_atexit();
    if !zpool_answers() {
        unmount_stale_mounts();
        let log = fs::File::create(format!("{TEST_ROOT}/zfs-fuse.log"))
            .unwrap_or_else(|e| panic!("cannot create zfs-fuse log: {e}"));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup log: {e}"));
        let mut cmd = Command::new("zfs-fuse");
        // big_writes: FUSE writes of up to 128 KiB instead of 4 KiB (libfuse 2).
        cmd.args(["--no-daemon", "--no-kstat-mount", "-o", "big_writes"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: setsid is async-signal-safe; the daemon gets its own session so a
        // terminal's signals do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        // The daemon outlives this function: it is stopped (by pid) at process exit.
        #[allow(clippy::zombie_processes)]
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start zfs-fuse: {e}; {SETUP_FIX}"));
        let pid = child.id() as i32;
        write_pid_file(pid);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !zpool_answers() {
            assert!(
                alive(pid),
                "zfs-fuse exited at start; see {TEST_ROOT}/zfs-fuse.log (is /dev/fuse present? modprobe fuse)"
            );
            assert!(
                Instant::now() < deadline,
                "zfs-fuse did not answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    sweep_dead_pool_dirs();
    *started = true;
}

/// Removes pool directories left by test processes that died before their teardown
/// (their pools vanished with the daemon that served them; only the files stay).
fn sweep_dead_pool_dirs() {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let Ok(entries) = fs::read_dir(TEST_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("swgt")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let path = e.path();
        let in_use = mounts.contains(&format!(" {}/", path.display()));
        if !alive(pid) && !in_use {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

fn register_atexit() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(leave_daemon) };
    });
}

static POOL_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A pool on a sparse file, destroyed with everything in it on drop.
pub struct TestPool {
    pub name: String,
    /// Directory holding the backing file and, below `mnt/`, the pool's mounts.
    pub dir: PathBuf,
    file: PathBuf,
}

impl TestPool {
    /// Creates a pool of `size` bytes (sparse) named `swgt<pid>x<n>`.
    pub fn new(size: u64) -> TestPool {
        ensure_daemon();
        let n = POOL_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("swgt{}x{n}", std::process::id());
        let dir = Path::new(TEST_ROOT).join(&name);
        fs::create_dir_all(dir.join("mnt"))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let file = dir.join("pool.img");
        let f = fs::File::create(&file).unwrap_or_else(|e| panic!("cannot create pool file: {e}"));
        f.set_len(size)
            .unwrap_or_else(|e| panic!("cannot size pool file: {e}"));
        run_ok(
            Command::new("zpool")
                .args(["create", "-o", "cachefile=none", "-m", "none", &name])
                .arg(&file),
        );
        TestPool { name, dir, file }
    }

    /// A directory under which datasets of this pool may be mounted.
    pub fn mount_root(&self) -> PathBuf {
        self.dir.join("mnt")
    }

    /// Where this pool's file systems are mounted now (from `/proc/mounts`).
    pub fn mount_points(&self) -> Vec<PathBuf> {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let child = format!("{}/", self.name);
        mounts
            .lines()
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let (source, point) = (cols.next()?, cols.next()?);
                (source == self.name || source.starts_with(&child)).then(|| PathBuf::from(point))
            })
            .collect()
    }

    /// Every file system and snapshot of the pool whose data holds `needle`, searched in
    /// `zfs send` streams: the blocks the pool holds (holes are not sent), read without
    /// going through FUSE file by file (a hundred times faster for sparse disk images).
    /// File systems are searched as they are now (through a snapshot taken for the scan
    /// and destroyed after), snapshots as they were.
    pub fn datasets_containing(&self, needle: &str) -> Vec<String> {
        let scan = format!("{}@swg-scan", self.name);
        run_ok(Command::new("zfs").args(["snapshot", "-r", &scan]));
        let listed = run_ok(Command::new("zfs").args([
            "list", "-H", "-r", "-t", "snapshot", "-o", "name", &self.name,
        ]));
        let snapshots: Vec<String> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        let found = snapshots
            .into_iter()
            .filter(|snap| stream_contains(snap, needle))
            .map(|snap| match snap.strip_suffix("@swg-scan") {
                Some(live) => live.to_string(),
                None => snap,
            })
            .collect();
        run_ok(Command::new("zfs").args(["destroy", "-r", &scan]));
        found
    }
}

/// True if the full send stream of `snapshot` contains `needle`.
fn stream_contains(snapshot: &str, needle: &str) -> bool {
    let mut send = Command::new("zfs")
        .args(["send", snapshot])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("zfs send {snapshot}: {e}"));
    let stream = send.stdout.take().expect("piped stdout");
    // `-c`, not `-q`: grep reads the whole stream, so the sender never meets a closed
    // pipe inside the daemon.
    let grep = Command::new("grep")
        .args(["-c", "-a", "-F", "--", needle])
        .stdin(stream)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("grep: {e}"));
    let sent = send
        .wait_with_output()
        .unwrap_or_else(|e| panic!("zfs send {snapshot}: {e}"));
    assert!(
        sent.status.success(),
        "zfs send {snapshot} failed: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    match grep.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("grep over the send stream of {snapshot} failed: {grep}"),
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        let out = Command::new("zfs")
            .args(["list", "-H", "-r", "-o", "name", &self.name])
            .output();
        if let Ok(out) = out {
            let names = String::from_utf8_lossy(&out.stdout).into_owned();
            for ds in names.lines().rev() {
                let _ = Command::new("zfs").args(["unmount", ds]).output();
            }
        }
        let mut destroyed = false;
        for _ in 0..50 {
            let out = Command::new("zpool")
                .args(["destroy", "-f", &self.name])
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    destroyed = true;
                    break;
                }
                Ok(o) if String::from_utf8_lossy(&o.stderr).contains("no such pool") => {
                    destroyed = true;
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        if !destroyed {
            eprintln!("teardown: pool {} could not be destroyed", self.name);
            return;
        }
        let _ = fs::remove_file(&self.file);
        let _ = fs::remove_dir_all(&self.dir);
    }
}
