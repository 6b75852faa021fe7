//! Firecracker driver figures with the real binary: spawn -> API ready (median of 30),
//! configure -> InstanceStart, stop -> reaped, and firecracker's RSS per idle VM.
//! `cargo bench -p shellwego-agent --bench vmm` (root, /dev/kvm).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shellwego_agent::host;
use shellwego_agent::vmm::config::{boot_args, MachineConfig};
use shellwego_agent::vmm::driver::{self, RuntimeDir};
use shellwego_agent::vmm::models::BootSource;
use shellwego_agent::vmm::{MicrovmConfig, VmmManager};
use shellwego_testkit::guest;
use shellwego_testkit::prereq::require_command;

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let bin: PathBuf = require_command("firecracker", "run `make setup`");
    let kernel = guest::kernel();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let kind = host::detect().expect("host kind");

    let mut spawn_times = Vec::new();
    for i in 0..30 {
        let rt_dir = RuntimeDir::new(dir.path(), &format!("spawn-{i}"));
        let t = Instant::now();
        let s = rt
            .block_on(driver::spawn(&bin, &rt_dir, None, Duration::from_secs(10)))
            .expect("spawn");
        spawn_times.push(t.elapsed());
        // SAFETY: our own child.
        unsafe {
            libc::kill(s.pid, libc::SIGKILL);
            libc::waitpid(s.pid, std::ptr::null_mut(), 0);
        }
    }
    println!(
        "spawn -> API ready, median of 30: {}",
        ms(median(spawn_times))
    );

    let mgr = VmmManager::new(&bin, &dir.path().join("run"));
    let (mut configure, mut start, mut stop, mut rss) = (vec![], vec![], vec![], vec![]);
    rt.block_on(async {
        for i in 0..10 {
            let id = format!("bench-{i}");
            let cfg = MicrovmConfig {
                vm_id: id.clone(),
                machine: MachineConfig {
                    vcpu_count: 1,
                    mem_size_mib: 128,
                    smt: false,
                },
                boot: BootSource {
                    kernel_image_path: kernel.display().to_string(),
                    initrd_path: None,
                    boot_args: Some(boot_args(kind, true, "")),
                },
                drives: vec![],
                network: vec![],
                vsock: None,
                netns: None,
                links: vec![],
                cpu_milli: None,
            };
            let t = Instant::now();
            let rec = mgr.create(&cfg).await.expect("create");
            configure.push(t.elapsed());
            let t = Instant::now();
            mgr.start(&id).await.expect("start");
            start.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(300)).await;
            rss.push(rss_kib(rec.pid));
            let t = Instant::now();
            mgr.stop(&id, Duration::ZERO).await.expect("stop");
            stop.push(t.elapsed());
            mgr.remove(&id).await.expect("remove");
        }
    });
    println!(
        "spawn + configure (logger, metrics, machine, boot), median of 10: {}",
        ms(median(configure))
    );
    println!("InstanceStart request, median of 10: {}", ms(median(start)));
    println!("stop (kill) -> reaped, median of 10: {}", ms(median(stop)));
    let mut rss_sorted = rss.clone();
    rss_sorted.sort();
    println!(
        "firecracker RSS per VM (128 MiB guest, 0.3 s after start), median: {} KiB (host kind: {})",
        rss_sorted[rss_sorted.len() / 2],
        kind.describe()
    );
}
