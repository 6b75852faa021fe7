//! Guest and snapshot figures with real VMs, for this host kind: cold boot (InstanceStart
//! -> init ready on vsock -> app answering), guest init size and RSS, template build,
//! snapshot create time and sizes (128 MiB VM), restore -> running, restore -> answering,
//! warm start -> app answering, and the cold/warm ratio.
//! `cargo bench -p shellwego-agent --bench lifecycle` (root, /dev/kvm; minutes on nested hosts).

use std::time::{Duration, Instant};

use shellwego_agent::guest::{wait_ready, GuestClient};
use shellwego_agent::host::{self, HostKind};
use shellwego_agent::snapshot::{RestoreTarget, SnapshotManager};
use shellwego_agent::template::{TemplateInputs, TemplateStore};
use shellwego_agent::vmm::config::{guest_vm_config, GuestLayout, MachineConfig};
use shellwego_agent::vmm::VmmManager;
use shellwego_testkit::guest;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::prereq::require_command;

mod common;
use common::run_config;

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Runs the app and waits until it answers: the app here is the guest's own `true`
/// round trip over exec (a process started in the app's root).
fn run_until_answering(c: &mut GuestClient, ip: &str) {
    c.run(run_config(ip, &["/bin/sleep", "3600"])).expect("run");
    let out = c.exec(&["true"], Duration::from_secs(120)).expect("exec");
    assert_eq!(out.code, 0);
}

fn main() {
    let firecracker = require_command("firecracker", "run `make setup`");
    let kind = host::detect().expect("host kind");
    let budget = match kind {
        HostKind::Hardware => Duration::from_secs(30),
        HostKind::NestedEmulated => Duration::from_secs(300),
    };
    let kernel = guest::kernel();
    let init = guest::init_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = NetNs::new();
    ns.bridge("br0", "10.0.4.1/24");
    for t in ["tap-cold", "tpl0", "tap-warm", "tap-rest"] {
        ns.bridged_tap(t, "br0");
    }
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    let disk = guest::alpine_ext4(&images, 256);
    let copy = |name: &str| {
        let p = images.join(name);
        std::fs::copy(&disk, &p).expect("copy disk");
        p
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let vmm = VmmManager::new(&firecracker, &dir.path().join("run"));
    println!("host kind: {}", kind.describe());
    println!(
        "guest init binary: {} bytes (static)",
        std::fs::metadata(&init).expect("init").len()
    );

    // Cold boot.
    let initrd = dir.path().join("initrd");
    shellwego_agent::initrd::write(&init, &initrd).expect("initrd");
    let layout = GuestLayout {
        kernel: kernel.display().to_string(),
        initrd: initrd.display().to_string(),
        root_drive: "rootfs".into(),
        vsock: "vsock.sock".into(),
        nic: Some(("tap-cold".into(), "02:00:00:00:00:09".into())),
    };
    let machine = MachineConfig {
        vcpu_count: 1,
        mem_size_mib: 128,
        smt: false,
    };
    let mut cfg = guest_vm_config("cold", machine, kind, &layout);
    cfg.netns = Some(ns.path());
    cfg.links = vec![("rootfs".into(), copy("cold.ext4"))];
    rt.block_on(vmm.create(&cfg)).expect("create");
    let t = Instant::now();
    rt.block_on(vmm.start("cold")).expect("start");
    let (mut c, _) = wait_ready(&vmm.runtime_dir("cold").vsock(), budget).expect("cold boot ready");
    let ready = t.elapsed();
    run_until_answering(&mut c, "10.0.4.2");
    let cold_total = t.elapsed();
    let rss = c
        .exec(
            &["grep", "VmRSS", "/proc/1/status"],
            Duration::from_secs(60),
        )
        .expect("rss");
    println!(
        "cold boot: InstanceStart -> init ready on vsock: {}",
        secs(ready)
    );
    println!(
        "cold boot: InstanceStart -> app answering: {}",
        secs(cold_total)
    );
    println!(
        "guest init RSS: {}",
        String::from_utf8_lossy(&rss.stdout).trim()
    );
    drop(c);
    rt.block_on(vmm.remove("cold")).expect("remove");

    // Template and warm start.
    let mut store = TemplateStore::open(&dir.path().join("templates")).expect("templates");
    let inputs = TemplateInputs {
        machine,
        kernel: kernel.clone(),
        init: init.clone(),
        firecracker: firecracker.clone(),
        kind,
        disk_bytes: 256 << 20,
    };
    let t = Instant::now();
    let (tpl, _) = rt
        .block_on(store.ensure(&vmm, &inputs, Some(ns.path()), Some("tpl0".into()), budget))
        .expect("template");
    println!(
        "template build (cold boot + snapshot): {}",
        secs(t.elapsed())
    );
    let warm_disk = copy("warm.ext4");
    let t = Instant::now();
    rt.block_on(store.warm_start(
        &vmm,
        &tpl.id,
        "warm",
        &RestoreTarget {
            tap: Some("tap-warm".into()),
            netns: Some(ns.path()),
            ..RestoreTarget::with_root_disk(&warm_disk)
        },
    ))
    .expect("warm start");
    let restored = t.elapsed();
    let (mut w, _) = wait_ready(&vmm.runtime_dir("warm").vsock(), budget).expect("warm ready");
    let answering = t.elapsed();
    run_until_answering(&mut w, "10.0.4.3");
    let warm_total = t.elapsed();
    println!("warm start: restore -> running: {}", secs(restored));
    println!(
        "warm start: restore -> answering over vsock: {}",
        secs(answering)
    );
    println!("warm start: -> app answering: {}", secs(warm_total));
    println!(
        "cold / warm (app answering): {:.0}x",
        cold_total.as_secs_f64() / warm_total.as_secs_f64()
    );
    drop(w);

    // Snapshot of a running 128 MiB VM, and its restore.
    let mut snaps = SnapshotManager::open(&dir.path().join("snapshots")).expect("snapshots");
    let mut cfg_w = tpl.vm_config.clone();
    cfg_w.vm_id = "warm".into();
    let t = Instant::now();
    let meta = rt
        .block_on(snaps.create(
            &vmm,
            "bench",
            &cfg_w,
            (None, None),
            None,
            &firecracker,
            true,
        ))
        .expect("snapshot");
    println!(
        "snapshot create (Full, 128 MiB): {}; state {} bytes, memory {} bytes",
        secs(t.elapsed()),
        meta.state_size,
        meta.mem_size
    );
    rt.block_on(vmm.remove("warm")).expect("remove warm");
    let target = RestoreTarget {
        netns: Some(ns.path()),
        tap: Some("tap-rest".into()),
        links: vec![("rootfs".into(), warm_disk.clone())],
        refresh_drives: vec![],
        cpu_milli: None,
    };
    let t = Instant::now();
    rt.block_on(snaps.restore(&vmm, "bench", "restored", &target))
        .expect("restore");
    let running = t.elapsed();
    let _ = wait_ready(&vmm.runtime_dir("restored").vsock(), budget).expect("restored answers");
    println!("restore -> running: {}", secs(running));
    println!("restore -> answering over vsock: {}", secs(t.elapsed()));
    rt.block_on(vmm.remove("restored"))
        .expect("remove restored");
}
