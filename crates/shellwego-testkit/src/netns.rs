//! Network namespaces that a test creates and removes (also when it fails). Nothing is
//! ever configured in the machine's own namespace.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::prereq::{require_command, require_root};
use crate::process::{run_ok, run_quiet};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    pub name: String,
}

// No `Default`: making a namespace is an action with a side effect, not a default value.
#[allow(clippy::new_without_default)]
impl NetNs {
    /// Creates `swg-test-<pid>-<n>` with its loopback up.
    pub fn new() -> NetNs {
        require_root("a network namespace test");
        require_command("ip", "apt-get install iproute2");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("swg-test-{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `/run/netns/NAME`, for setns(2).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command inside the namespace, returning its output (not checking status).
    pub fn exec(&self, argv: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?} in {}: {e}", self.name))
    }

    /// Creates a persistent TAP `name` with `cidr` on it, up.
    pub fn tap(&self, name: &str, cidr: &str) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["addr", "add", cidr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        run_quiet(Command::new("ip").args(["netns", "delete", &self.name]));
    }
}

impl NetNs {
    /// Runs `f` on a thread that has entered this namespace (netlink sockets, ioctls
    /// and child processes made there all belong to it) and returns its result.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Starts `f` on a thread that has entered this namespace; the caller joins it.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: setns on this thread only, with a valid namespace descriptor.
            let rc = unsafe {
                libc::setns(
                    std::os::unix::io::AsRawFd::as_raw_fd(&file),
                    libc::CLONE_NEWNET,
                )
            };
            assert_eq!(
                rc,
                0,
                "setns into {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            f()
        })
    }

    /// A veth pair: `host_end` here, `guest_end` moved into `guest` with `cidr`, both up.
    pub fn veth_to(&self, host_end: &str, guest: &NetNs, guest_end: &str, cidr: &str) {
        self.ip(&[
            "link", "add", host_end, "type", "veth", "peer", "name", guest_end,
        ]);
        self.ip(&["link", "set", guest_end, "netns", &guest.name]);
        self.ip(&["link", "set", host_end, "up"]);
        guest.ip(&["addr", "add", cidr, "dev", guest_end]);
        guest.ip(&["link", "set", guest_end, "up"]);
    }
}

impl NetNs {
    /// A bridge with `cidr` on it, up.
    pub fn bridge(&self, name: &str, cidr: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.ip(&["addr", "add", cidr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// A persistent TAP attached to `bridge`, up.
    pub fn bridged_tap(&self, name: &str, bridge: &str) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["link", "set", name, "master", bridge]);
        self.ip(&["link", "set", name, "up"]);
    }
}

impl NetNs {
    /// Achieved TCP rate in Mbit/s, measured with iperf3 for 4 s (1 s omitted) from this
    /// namespace to `target`, with the one-shot server in `server`; `reverse`: the server
    /// sends.
    pub fn iperf_mbit(&self, server: &NetNs, target: &str, reverse: bool) -> f64 {
        let mut srv = std::process::Command::new("ip")
            .args(["netns", "exec", &server.name, "iperf3", "-s", "-1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 server (apt-get install iperf3)");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut args = vec!["iperf3", "-c", target, "-t", "4", "-O", "1", "-J"];
        if reverse {
            args.push("-R");
        }
        let out = self.exec(&args);
        let _ = srv.kill();
        let _ = srv.wait();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "iperf3 output: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .expect("rate in iperf3 JSON")
            / 1e6
    }
}
