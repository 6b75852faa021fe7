//! What the jail costs and what its cgroup buys, with real VMs on this host:
//! - warm start (restore -> guest answering on vsock) with and without the jailer;
//! - CPU isolation: a neighbour's response time (a `hello` round trip to its guest init
//!   over vsock: guest CPU only, no process started)
//!   alone, next to a VM burning CPU under a half-core quota (`cpu = "500m"`), and next to
//!   the same burner without a quota; and how much CPU the burner's VMM actually got.
//!
//! `cargo bench -p shellwego-agent --bench jail` (root, /dev/kvm; a minute or two).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shellwego_agent::guest::{run_after_restore, wait_ready, GuestClient};
use shellwego_agent::host::{self, HostKind};
use shellwego_agent::snapshot::RestoreTarget;
use shellwego_agent::template::{TemplateInputs, TemplateStore};
use shellwego_agent::vmm::config::MachineConfig;
use shellwego_agent::vmm::jail::Jail;
use shellwego_agent::vmm::VmmManager;
use shellwego_testkit::guest;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::prereq::require_command;
use shellwego_testkit::process::KillVmsOnDrop;

const STARTS: usize = 5;
const PROBES: usize = 40;

mod common;
use common::run_config;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

struct Bench {
    rt: tokio::runtime::Runtime,
    store: TemplateStore,
    template: String,
    ns: NetNs,
    images: PathBuf,
    disk: PathBuf,
    budget: Duration,
}

impl Bench {
    fn disk_for(&self, name: &str) -> PathBuf {
        let p = self.images.join(format!("{name}.ext4"));
        std::fs::copy(&self.disk, &p).expect("copy disk");
        p
    }

    /// Restores `name` from the template and runs `argv` in it; returns its guest client
    /// and the time from restore to the guest answering.
    fn start(
        &self,
        vmm: &VmmManager,
        name: &str,
        tap: &str,
        ip: &str,
        cpu_milli: Option<u64>,
        argv: &[&str],
    ) -> (GuestClient, Duration) {
        let target = RestoreTarget {
            tap: Some(tap.into()),
            netns: Some(self.ns.path()),
            cpu_milli,
            ..RestoreTarget::with_root_disk(&self.disk_for(name))
        };
        let t = Instant::now();
        self.rt
            .block_on(self.store.warm_start(vmm, &self.template, name, &target))
            .expect("warm start");
        let uds = vmm.runtime_dir(name).vsock();
        let (c, _) = wait_ready(&uds, self.budget).expect("guest answers");
        let answering = t.elapsed();
        // As the agent does: a restore resets vsock connections, so `run` may need a new one.
        let c = run_after_restore(&uds, c, run_config(ip, argv), self.budget).expect("run");
        (c, answering)
    }
}

/// Response times of `PROBES` round trips to a guest's init.
fn probe(c: &mut GuestClient) -> Vec<Duration> {
    (0..PROBES)
        .map(|_| {
            let t = Instant::now();
            c.hello().expect("hello");
            t.elapsed()
        })
        .collect()
}

/// CPU time (user + system, in seconds) a process has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / hz
}

/// Share of one core the process used over `window`.
fn cpu_share(pid: i32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    std::thread::sleep(window);
    (cpu_seconds(pid) - before) / window.as_secs_f64()
}

fn neighbour_under(
    bench: &Bench,
    vmm: &VmmManager,
    quiet: &mut GuestClient,
    label: &str,
    cpu_milli: Option<u64>,
    baseline: Duration,
) {
    let name = format!("burner-{}", label.replace(' ', "-"));
    let (_burner, _) = bench.start(
        vmm,
        &name,
        "tap-burn",
        "10.0.4.4",
        cpu_milli,
        &["/bin/sh", "-c", "while :; do :; done"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let pid = bench.rt.block_on(vmm.pid_of(&name)).expect("burner pid");
    let share = cpu_share(pid, Duration::from_secs(3));
    let times = probe(quiet);
    let (med, tail) = (median(times.clone()), p90(times));
    println!(
        "neighbour next to a burner ({label}): median {}, p90 {} ({:+.0} % vs alone); burner's VMM used {:.0} % of a core",
        ms(med),
        ms(tail),
        (med.as_secs_f64() / baseline.as_secs_f64() - 1.0) * 100.0,
        share * 100.0
    );
    bench.rt.block_on(vmm.remove(&name)).expect("remove burner");
}

fn main() {
    let firecracker = require_command("firecracker", "run `make setup`");
    let jailer = require_command("jailer", "run `make setup` (it ships with firecracker)");
    let kind = host::detect().expect("host kind");
    let budget = match kind {
        HostKind::Hardware => Duration::from_secs(30),
        HostKind::NestedEmulated => Duration::from_secs(300),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = NetNs::new();
    ns.bridge("br0", "10.0.4.1/24");
    for t in ["tpl0", "tap-start", "tap-quiet", "tap-burn"] {
        ns.bridged_tap(t, "br0");
    }
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    let disk = guest::alpine_ext4(&images, 256);
    let run = dir.path().join("run");
    let _vms = KillVmsOnDrop(run.clone());
    let jail = Jail::new(&jailer, &run.join("jail")).expect("cgroups for jails");
    let jailed = VmmManager::new(&firecracker, &run.join("vms")).with_jail(jail);
    let plain = VmmManager::new(&firecracker, &run.join("plain"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut store = TemplateStore::open(&dir.path().join("templates")).expect("templates");
    let inputs = TemplateInputs {
        machine: MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
        },
        kernel: guest::kernel(),
        init: guest::init_binary(),
        firecracker: firecracker.clone(),
        kind,
        disk_bytes: 256 << 20,
    };
    let (template, _) = rt
        .block_on(store.ensure(
            &jailed,
            &inputs,
            Some(ns.path()),
            Some("tpl0".into()),
            budget,
        ))
        .expect("template");
    let bench = Bench {
        rt,
        store,
        template: template.id,
        ns,
        images,
        disk,
        budget,
    };
    println!("host kind: {}", kind.describe());
    println!(
        "cgroups: v{}",
        jailed.jail().map(|j| j.cgroups.number()).unwrap_or(0)
    );

    // Start time, jailed and not.
    for (label, vmm) in [("unjailed", &plain), ("jailed", &jailed)] {
        let mut times = Vec::new();
        for i in 0..STARTS {
            let name = format!("start-{label}-{i}");
            let (_c, answering) = bench.start(
                vmm,
                &name,
                "tap-start",
                "10.0.4.2",
                None,
                &["/bin/sleep", "60"],
            );
            times.push(answering);
            bench.rt.block_on(vmm.remove(&name)).expect("remove");
        }
        println!(
            "warm start, restore -> guest answering ({label}): median {} of {STARTS} (min {}, max {})",
            ms(median(times.clone())),
            ms(*times.iter().min().expect("times")),
            ms(*times.iter().max().expect("times"))
        );
    }

    // CPU isolation, jailed.
    let (mut quiet, _) = bench.start(
        &jailed,
        "quiet",
        "tap-quiet",
        "10.0.4.3",
        Some(1000),
        &["/bin/sleep", "3600"],
    );
    let _ = probe(&mut quiet); // warm its page cache
    let alone = probe(&mut quiet);
    let baseline = median(alone.clone());
    println!(
        "neighbour alone: round trip median {}, p90 {}",
        ms(baseline),
        ms(p90(alone))
    );
    neighbour_under(&bench, &jailed, &mut quiet, "cpu 500m", Some(500), baseline);
    neighbour_under(&bench, &jailed, &mut quiet, "no quota", None, baseline);
    drop(quiet);
    bench.rt.block_on(jailed.remove("quiet")).expect("remove");
}
