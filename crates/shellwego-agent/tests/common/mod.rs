//! A real ShellWeGo stack for end-to-end tests: a network namespace made by the test, a
//! real registry in it, a real ZFS pool, and `shellwego agent` (entered into the
//! namespace with SHELLWEGO_NETNS) driven through the real CLI. Everything is torn down on
//! drop, also when the test panics: agent, VMs, pool, registry, namespace.

#![allow(dead_code)] // each test binary uses a different part of it

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shellwego_testkit::guest;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::oci::{alpine_web_builder, alpine_web_image};
use shellwego_testkit::prereq::require_command;
use shellwego_testkit::process::{vm_pids, KillVmsOnDrop};
use shellwego_testkit::registry::Registry;
use shellwego_testkit::zfs::TestPool;

pub const BIN: &str = env!("CARGO_BIN_EXE_shellwego");

/// Resident memory of a process in KiB (VmRSS), 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Templates hold no app data and are keyed by kernel, init, firecracker and shape, so
/// the agent tests of one run (and later runs) share them: one cold boot per shape.
pub const SHARED_TEMPLATES: &str = "/var/cache/shellwego/test-templates";

/// Removes shared templates built more than a week ago, so those of an older kernel or
/// init (never used again) do not pile up; a current one is simply rebuilt on next use.
fn prune_shared_templates() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let week = Duration::from_secs(7 * 24 * 3600);
        let dir = Path::new(SHARED_TEMPLATES).join("snapshots");
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > week);
            if old {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// Lazily unmounts every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|mp| Path::new(mp).starts_with(dir))
        .collect();
    points.sort_by_key(|mp| std::cmp::Reverse(mp.len()));
    for mp in points {
        let _ = Command::new("umount").args(["-l", mp]).status();
    }
}

/// Files under `roots` (files or directories) whose bytes contain `needle`, each file
/// read once (bind mounts show some twice), leaving out the paths in `skip` (mount
/// points searched another way).
pub fn files_containing(roots: &[&Path], needle: &str, skip: &[PathBuf]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut todo: Vec<PathBuf> = roots.iter().map(|r| r.to_path_buf()).collect();
    while let Some(path) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if skip.contains(&path) {
            continue;
        }
        if meta.is_file() {
            if seen.insert((meta.dev(), meta.ino())) {
                files.push(path);
            }
        } else if meta.is_dir() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                todo.push(entry.path());
            }
        }
    }
    let mut found = Vec::new();
    for chunk in files.chunks(256) {
        let out = Command::new("grep")
            .args(["-l", "-a", "-F", "--", needle])
            .args(chunk)
            .output()
            .expect("grep");
        assert!(
            out.status.code().is_some_and(|c| c <= 1),
            "grep failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        found.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string),
        );
    }
    found
}

pub struct Stack {
    agent: Option<Child>,
    // Dropped in this order: VMs, then the pool under them, the registry, the namespace.
    _vms: KillVmsOnDrop,
    pub pool: TestPool,
    pub registry: Registry,
    pub ns: NetNs,
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub run: PathBuf,
    pub log: PathBuf,
    vars: Vec<(String, String)>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.kill_agent();
        // The agent's mounts (its staging area; jails' bind mounts of VMs it left running,
        // which `_vms` ends) outlive it: take them down with the test's directory.
        unmount_under(&self.data);
        unmount_under(&self.run);
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Stack {
    pub fn new() -> Stack {
        require_command("firecracker", "run `make setup`");
        prune_shared_templates();
        let ns = NetNs::new();
        let registry = Registry::start_in(Some(&ns));
        let pool = TestPool::new(4 << 30);
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let run = dir.path().join("run");
        let vars = vec![
            ("SHELLWEGO_NETNS", ns.name.clone()),
            ("SHELLWEGO_DATA_DIR", data.display().to_string()),
            ("SHELLWEGO_RUN_DIR", run.display().to_string()),
            ("SHELLWEGO_POOL", pool.name.clone()),
            ("SHELLWEGO_KERNEL", guest::kernel().display().to_string()),
            (
                "SHELLWEGO_GUEST_INIT",
                guest::init_binary().display().to_string(),
            ),
            ("SHELLWEGO_INSECURE_REGISTRIES", registry.addr.clone()),
            (
                "SHELLWEGO_SECRETS_KEY",
                dir.path().join("keys/secrets.key").display().to_string(),
            ),
            ("SHELLWEGO_TEMPLATE_DIR", SHARED_TEMPLATES.to_string()),
            ("SHELLWEGO_PUBLISH_ADDRESS", "127.0.0.1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Stack {
            agent: None,
            _vms: KillVmsOnDrop(run.clone()),
            log: dir.path().join("agent.log"),
            pool,
            registry,
            ns,
            data,
            run,
            dir,
            vars,
        }
    }

    /// Every place at rest that holds `needle`: files under the agent's data and run
    /// directories, its log, and every file system and snapshot of the test's pool (the
    /// VMs' disks, the images' bases, kept snapshots), the last read as `zfs send`
    /// streams rather than file by file.
    pub fn at_rest_containing(&self, needle: &str) -> Vec<String> {
        let skip = self.pool.mount_points();
        let mount_root = self.pool.mount_root();
        let roots = [&*self.data, &*self.run, &*self.log, &*mount_root];
        let mut found = files_containing(&roots, needle, &skip);
        found.extend(self.pool.datasets_containing(needle));
        found
    }

    /// Pushes the Alpine web image serving `page` as `test/web:TAG`; returns its reference.
    pub fn push_web(&self, tag: &str, page: &[u8]) -> String {
        let layout = tempfile::tempdir().expect("temp dir");
        alpine_web_image(layout.path(), page);
        let name = format!("test/web:{tag}");
        self.registry.push_layout(layout.path(), "1", &name);
        format!("{}/{name}", self.registry.addr)
    }

    /// Like [`push_web`](Self::push_web), with one more (uncompressed tar) layer on top.
    pub fn push_web_with(&self, tag: &str, page: &[u8], layer: &[u8]) -> String {
        let layout = tempfile::tempdir().expect("temp dir");
        alpine_web_builder(page)
            .layer(layer, shellwego_testkit::oci::LayerCompression::Gzip)
            .write_layout(layout.path(), "1");
        let name = format!("test/web:{tag}");
        self.registry.push_layout(layout.path(), "1", &name);
        format!("{}/{name}", self.registry.addr)
    }

    /// Writes a spec file and returns its path.
    pub fn spec(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, text).expect("write spec");
        path
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).env_remove("SHELLWEGO_CONFIG");
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// Runs the CLI; panics (with its output) when it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().expect("run shellwego");
        assert!(
            out.status.success(),
            "shellwego {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts the agent (with extra environment) and waits until its API answers.
    pub fn start_agent(&mut self, extra: &[(&str, &str)]) {
        assert!(self.agent.is_none(), "an agent already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut cmd = self.cmd(&["agent"]);
        cmd.env("SHELLWEGO_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        self.agent = Some(cmd.spawn().expect("start agent"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.cmd(&["ps"]).output().expect("ps").status.success() {
            assert!(Instant::now() < deadline, "the agent did not answer");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The running agent's PID.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// SIGKILL: the agent gets no chance to clean anything up.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    pub fn ps(&self) -> Value {
        serde_json::from_slice(&self.run(&["ps", "--json"]).stdout).expect("ps --json")
    }

    /// The whole event log, a page at a time (`events` gives a page).
    pub fn events(&self) -> Vec<Value> {
        const PAGE: usize = 1000;
        let mut all: Vec<Value> = Vec::new();
        loop {
            let since = all.last().and_then(|e| e["seq"].as_u64()).unwrap_or(0);
            let out = self.run(&[
                "events",
                "--json",
                "--since",
                &since.to_string(),
                "--limit",
                &PAGE.to_string(),
            ]);
            let page: Vec<Value> = serde_json::from_slice(&out.stdout).expect("events --json");
            let full = page.len() >= PAGE;
            all.extend(page);
            if !full {
                return all;
            }
        }
    }

    /// The newest event's sequence number (0 when there is none).
    pub fn last_seq(&self) -> u64 {
        self.events()
            .last()
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until an event after `since` has a message containing `text`; returns it.
    pub fn wait_event(&self, since: u64, text: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| {
                e["seq"].as_u64().is_some_and(|s| s > since)
                    && e["message"].as_str().is_some_and(|m| m.contains(text))
            }) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no event {text:?} within {limit:?}; events: {:#?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `ps` satisfies `done`.
    pub fn wait_ps(&self, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let ps = self.ps();
            if done(&ps) {
                return ps;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not reached within {limit:?}; ps: {ps:#}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The VMs of `app` in `ps`.
    pub fn vms(ps: &Value, app: &str) -> Vec<Value> {
        ps.as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["name"] == app)
            .flat_map(|a| a["vms"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// What VMs own on the host: processes, links, QoS, leases, datasets, NAT rules.
    pub fn resources(&self) -> Resources {
        let text = |out: Output| String::from_utf8_lossy(&out.stdout).into_owned();
        let links = text(self.ns.exec(&["ip", "-o", "link"]));
        let vm_links = links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .filter(|n| n.starts_with("swg") || n.starts_with("swi"))
            .filter(|n| n != "swg-br0" && n != "swgtemplate")
            .collect();
        let qdiscs = text(self.ns.exec(&["tc", "qdisc", "show"]))
            .lines()
            .filter(|l| l.contains(" dev swg") || l.contains(" dev swi"))
            .filter(|l| !l.contains("swgtemplate") && !l.contains("swg-br0"))
            .filter(|l| l.contains("htb") || l.contains("clsact"))
            .map(str::to_string)
            .collect();
        let leases: BTreeMap<String, Value> = std::fs::read(self.data.join("network/leases.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| {
                v.get("leases")
                    .and_then(|l| serde_json::from_value(l.clone()).ok())
            })
            .unwrap_or_default();
        let datasets = text(
            Command::new("zfs")
                .args(["list", "-H", "-o", "name", "-r"])
                .arg(format!("{}/shellwego/apps", self.pool.name))
                .output()
                .expect("zfs list"),
        )
        .lines()
        .filter(|l| l.contains("/apps/"))
        .map(str::to_string)
        .collect();
        let nft = text(self.ns.exec(&["nft", "list", "table", "ip", "shellwego"]));
        Resources {
            vm_processes: vm_pids(&self.run),
            links: vm_links,
            qdiscs,
            leases: leases.into_keys().collect(),
            datasets,
            nat: nft,
        }
    }
}

/// Resources VMs own, as found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub vm_processes: Vec<i32>,
    pub links: Vec<String>,
    pub qdiscs: Vec<String>,
    pub leases: Vec<String>,
    pub datasets: Vec<String>,
    pub nat: String,
}

impl Resources {
    /// Asserts that exactly the VMs `vm_ids` own something, each one VM's worth.
    pub fn assert_only(&self, vm_ids: &[String], nat_baseline: &str) {
        let n = vm_ids.len();
        assert_eq!(self.vm_processes.len(), n, "VM processes: {self:#?}");
        // A TAP and an IFB per VM (the IFB only with an upload limit; these tests set one).
        assert_eq!(self.links.len(), 2 * n, "links: {self:#?}");
        let mut leases = self.leases.clone();
        leases.sort();
        let mut want = vm_ids.to_vec();
        want.sort();
        assert_eq!(leases, want, "leases: {self:#?}");
        assert_eq!(self.datasets.len(), n, "datasets: {self:#?}");
        for id in vm_ids {
            assert!(
                self.datasets.iter().any(|d| d.ends_with(id.as_str())),
                "dataset of {id}: {self:#?}"
            );
            let tap = shellwego_network::cni::tap_name(id);
            assert!(self.links.contains(&tap), "TAP of {id}: {self:#?}");
        }
        assert_eq!(self.nat, nat_baseline, "NAT rules changed");
    }
}

/// A client that keeps requesting `http://127.0.0.1:PORT/` from inside the namespace,
/// a new connection each time, and counts the answers.
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<ProbeTally>,
}

#[derive(Debug, Default, Clone)]
pub struct ProbeTally {
    /// Bodies seen, in order, with repeats collapsed.
    pub bodies: Vec<String>,
    pub ok: usize,
    pub failed: Vec<String>,
    /// The slowest answer.
    pub slowest: Duration,
}

impl Prober {
    pub fn start(ns: &NetNs, port: u16) -> Prober {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = ns.path();
        let handle = std::thread::spawn(move || {
            enter_netns(&path);
            let mut tally = ProbeTally::default();
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                let answer = http_get(port);
                tally.slowest = tally.slowest.max(t.elapsed());
                match answer {
                    Ok(body) => {
                        tally.ok += 1;
                        if tally.bodies.last() != Some(&body) {
                            tally.bodies.push(body);
                        }
                    }
                    Err(e) => tally.failed.push(e),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            tally
        });
        Prober { stop, handle }
    }

    pub fn finish(self) -> ProbeTally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("prober thread")
    }
}

fn enter_netns(path: &Path) {
    let file = std::fs::File::open(path).expect("open netns");
    // SAFETY: setns on this thread only, with a valid namespace descriptor.
    let rc = unsafe {
        libc::setns(
            std::os::unix::io::AsRawFd::as_raw_fd(&file),
            libc::CLONE_NEWNET,
        )
    };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// One HTTP/1.0 GET of `/` on 127.0.0.1:`port`; the body of a 200 answer.
pub fn http_get(port: u16) -> Result<String, String> {
    http_get_path(port, "/")
}

/// `http_get` of `path`.
pub fn http_get_path(port: u16, path: &str) -> Result<String, String> {
    http_get_at(std::net::Ipv4Addr::LOCALHOST, port, path)
}

/// One HTTP/1.0 GET of `path` on `ip:port`; the body of a 200 answer.
pub fn http_get_at(ip: std::net::Ipv4Addr, port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from((ip, port)),
        Duration::from_secs(5),
    )
    .map_err(|e| format!("connect: {e}"))?;
    // Generous: on nested hosts a guest starved by a neighbour's boot answers slowly;
    // a slow answer is not a failed request.
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: app\r\n\r\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {text:?}"))?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return Err(format!("status: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

/// `http_get` from inside the namespace.
pub fn http_get_in(ns: &NetNs, port: u16) -> Result<String, String> {
    http_get_path_in(ns, port, "/")
}

/// `http_get_path` from inside the namespace.
pub fn http_get_path_in(ns: &NetNs, port: u16, path: &str) -> Result<String, String> {
    http_get_at_in(ns, std::net::Ipv4Addr::LOCALHOST, port, path)
}

/// `http_get_at` from inside the namespace.
pub fn http_get_at_in(
    ns: &NetNs,
    ip: std::net::Ipv4Addr,
    port: u16,
    path: &str,
) -> Result<String, String> {
    let ns = ns.path();
    let path = path.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        http_get_at(ip, port, &path)
    })
    .join()
    .expect("http thread")
}
