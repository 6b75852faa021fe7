//! Snapshots and warm starts with real VMs: a template built by one cold boot, two VMs
//! restored from it side by side, TC-I4 (snapshot, simulated restart, restore), and a
//! corrupted template detected and rebuilt. Everything runs in a test netns; disks of
//! snapshotted VMs live on a real ZFS pool.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shellwego_agent::guest::{wait_ready, GuestClient};
use shellwego_agent::host::{self, HostKind};
use shellwego_agent::snapshot::{RestoreTarget, SnapshotManager};
use shellwego_agent::template::{TemplateInputs, TemplateStore};
use shellwego_agent::vmm::config::{generate_mac, MachineConfig};
use shellwego_agent::vmm::jail::Jail;
use shellwego_agent::vmm::{MicrovmConfig, VmmManager};
use shellwego_proto::{NetConfig, Response, RunConfig};
use shellwego_storage::ZfsManager;
use shellwego_testkit::guest;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::prereq::require_command;
use shellwego_testkit::process::{run_ok, KillVmsOnDrop};
use shellwego_testkit::zfs::TestPool;

fn budget(kind: HostKind) -> Duration {
    match kind {
        HostKind::Hardware => Duration::from_secs(30),
        HostKind::NestedEmulated => Duration::from_secs(300),
    }
}

/// Writes `text` to `path` inside an unmounted ext4 image.
fn put_file(image: &Path, path: &str, text: &str) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), text).unwrap();
    run_ok(
        Command::new("debugfs")
            .args([
                "-w",
                "-R",
                &format!("write {} {path}", tmp.path().display()),
            ])
            .arg(image),
    );
}

fn run_config(ip: &str, host: &str, vm: uuid::Uuid) -> RunConfig {
    RunConfig {
        argv: vec!["/bin/sleep".into(), "3600".into()],
        hostname: host.into(),
        net: Some(NetConfig {
            address: ip.into(),
            prefix_len: 24,
            gateway: "10.0.4.1".into(),
            nameservers: vec![],
            mac: Some(generate_mac(vm)),
        }),
        root_device: "/dev/vda".into(),
        // The images are 256 MiB (alpine_ext4 below); a restored template learns that
        // size asynchronously and the init waits for it.
        root_device_bytes: Some(256 << 20),
        clock: Some((
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64,
            0,
        )),
        entropy: vec![7; 32],
        ..Default::default()
    }
}

fn exec_text(c: &mut GuestClient, argv: &[&str]) -> String {
    let out = c.exec(argv, Duration::from_secs(60)).expect("exec");
    assert_eq!(
        out.code,
        0,
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits for the guest behind `uds` and gives it its identity.
fn ready_and_run(uds: PathBuf, rc: RunConfig, kind: HostKind) -> GuestClient {
    let (c, hello) = wait_ready(&uds, budget(kind)).expect("restored guest answers on vsock");
    assert!(
        matches!(
            hello,
            Response::Ready {
                running_app: false,
                ..
            }
        ),
        "{hello:?}"
    );
    shellwego_agent::guest::run_after_restore(&uds, c, rc, budget(kind)).expect("run")
}

#[test]
fn tc_i4_templates_snapshots_and_restores() {
    let firecracker = require_command("firecracker", "run `make setup`");
    require_command("debugfs", "apt-get install e2fsprogs");
    let kind = host::detect().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new();
    ns.bridge("br0", "10.0.4.1/24");
    for tap in ["tpl0", "tap-a", "tap-b"] {
        ns.bridged_tap(tap, "br0");
    }
    let pool = TestPool::new(2 << 30);
    let zfs = ZfsManager::new(&pool.name).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Jailed, as the agent runs VMs: templates, warm starts, snapshots and restores all
    // go through each VM's chroot, uid and cgroup.
    let jailer = require_command("jailer", "run `make setup` (it ships with firecracker)");
    let jail = Jail::new(&jailer, &dir.path().join("run/jail")).expect("cgroups for jails");
    let vmm = VmmManager::new(&firecracker, &dir.path().join("run")).with_jail(jail);
    let _vms = KillVmsOnDrop(dir.path().join("run"));
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
    let mut store = TemplateStore::open(&dir.path().join("templates")).unwrap();
    let t = Instant::now();
    let (template, built) = rt
        .block_on(store.ensure(
            &vmm,
            &inputs,
            Some(ns.path()),
            Some("tpl0".into()),
            budget(kind),
        ))
        .expect("build template");
    assert!(built);
    println!(
        "template build (cold boot + snapshot): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (_, again) = rt
        .block_on(store.ensure(
            &vmm,
            &inputs,
            Some(ns.path()),
            Some("tpl0".into()),
            budget(kind),
        ))
        .unwrap();
    assert!(!again, "a valid template is reused");

    // Disks: VM A's on ZFS (so TC-I4 can snapshot it), VM B's a plain file.
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let alpine = guest::alpine_ext4(&images, 256);
    let ds_a = format!("{}/vms/a", pool.name);
    let mnt_a = pool.mount_root().join("vms/a");
    zfs.create(&ds_a, &[("mountpoint", mnt_a.to_str().unwrap())])
        .unwrap();
    let disk_a = mnt_a.join("rootfs.ext4");
    std::fs::copy(&alpine, &disk_a).unwrap();
    put_file(&disk_a, "/etc/marker", "disk A");
    let disk_b = images.join("b.ext4");
    std::fs::rename(&alpine, &disk_b).unwrap();
    put_file(&disk_b, "/etc/marker", "disk B");

    // Two VMs from one template at once.
    let (vm_a, vm_b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let t = Instant::now();
    let target_a = RestoreTarget {
        tap: Some("tap-a".into()),
        netns: Some(ns.path()),
        ..RestoreTarget::with_root_disk(&disk_a)
    };
    let target_b = RestoreTarget {
        tap: Some("tap-b".into()),
        netns: Some(ns.path()),
        ..RestoreTarget::with_root_disk(&disk_b)
    };
    rt.block_on(async {
        let a = store.warm_start(&vmm, &template.id, "vm-a", &target_a);
        let b = store.warm_start(&vmm, &template.id, "vm-b", &target_b);
        let (a, b) = tokio::join!(a, b);
        a.expect("warm start A");
        b.expect("warm start B");
    });
    let restored = t.elapsed();
    // Each clone is its own unprivileged tenant: a uid of its own, in its own jail.
    let (uid_a, uid_b) = (vmm.uid_of("vm-a"), vmm.uid_of("vm-b"));
    assert!(
        uid_a.is_some() && uid_b.is_some() && uid_a != uid_b,
        "two clones, two uids: {uid_a:?} {uid_b:?}"
    );
    for (vm, uid) in [("vm-a", uid_a), ("vm-b", uid_b)] {
        let pid = rt.block_on(vmm.pid_of(vm)).expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let real_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok());
        assert_eq!(real_uid, uid, "{vm}'s firecracker runs as its uid");
    }
    let (uds_a, uds_b) = (
        vmm.runtime_dir("vm-a").vsock(),
        vmm.runtime_dir("vm-b").vsock(),
    );
    let ha = std::thread::spawn(move || {
        ready_and_run(uds_a, run_config("10.0.4.2", "vm-a", vm_a), kind)
    });
    let hb = std::thread::spawn(move || {
        ready_and_run(uds_b, run_config("10.0.4.3", "vm-b", vm_b), kind)
    });
    let (ra, rb) = (ha.join(), hb.join());
    if ra.is_err() || rb.is_err() {
        for vm in ["vm-a", "vm-b"] {
            let console = std::fs::read_to_string(vmm.runtime_dir(vm).console_log());
            eprintln!("--- console of {vm} ---\n{}", console.unwrap_or_default());
        }
        panic!("a warm-started guest failed (its console is above)");
    }
    let (mut a, mut b) = (ra.unwrap(), rb.unwrap());
    println!(
        "two warm starts: restored in {:.0} ms, both running their app after {:.0} ms",
        restored.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(exec_text(&mut a, &["cat", "/etc/marker"]), "disk A");
    assert_eq!(exec_text(&mut b, &["cat", "/etc/marker"]), "disk B");
    assert_eq!(exec_text(&mut a, &["hostname"]), "vm-a");
    assert_eq!(exec_text(&mut b, &["hostname"]), "vm-b");
    assert_eq!(
        exec_text(&mut b, &["cat", "/sys/class/net/eth0/address"]),
        generate_mac(vm_b)
    );
    for ip in ["10.0.4.2", "10.0.4.3"] {
        let ping = ns.exec(&["ping", "-c", "2", "-W", "10", ip]);
        assert!(
            ping.status.success(),
            "ping {ip}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }
    let _ = b.shutdown(Duration::from_secs(2));
    drop(b);
    rt.block_on(vmm.remove("vm-b")).unwrap();

    // TC-I4: snapshot VM A (memory, state and its ZFS disk in one pause).
    exec_text(
        &mut a,
        &[
            "sh",
            "-c",
            "echo written-before-snapshot > /root/state && sync",
        ],
    );
    drop(a);
    let snaps = dir.path().join("snapshots");
    let mut cfg_a: MicrovmConfig = template.vm_config.clone();
    cfg_a.vm_id = "vm-a".into();
    cfg_a.network[0].host_dev_name = "tap-a".into();
    let mut manager = SnapshotManager::open(&snaps).unwrap();
    let t = Instant::now();
    let meta = rt
        .block_on(manager.create(
            &vmm,
            "snap-a",
            &cfg_a,
            (Some("web".into()), Some("v1".into())),
            Some((&zfs, &ds_a)),
            &firecracker,
            true,
        ))
        .expect("snapshot VM A");
    println!(
        "snapshot create (128 MiB VM): {:.0} ms; state {} bytes, memory {} bytes",
        t.elapsed().as_secs_f64() * 1e3,
        meta.state_size,
        meta.mem_size
    );
    assert!(snaps.join("snap-a/meta.json").is_file());
    assert_eq!(
        meta.disk_snapshot.as_deref(),
        Some(format!("{ds_a}@snap-a").as_str())
    );
    assert!(zfs.exists(&format!("{ds_a}@snap-a")).unwrap());
    let status = rt.block_on(vmm.inspect("vm-a")).unwrap();
    assert_eq!(
        status.state.as_deref(),
        Some("Running"),
        "resumed after the snapshot"
    );
    drop(manager);
    rt.block_on(vmm.remove("vm-a")).unwrap();

    // A new manager (a process restart) finds the same snapshot.
    let reopened = SnapshotManager::open(&snaps).unwrap();
    assert_eq!(reopened.list(), vec![&meta]);
    assert!(reopened.problems().is_empty());
    // Restore it with its disk from a clone of the ZFS snapshot.
    let clone = format!("{}/vms/a-restored", pool.name);
    let clone_mnt = pool.mount_root().join("vms/a-restored");
    zfs.clone_snapshot(
        &format!("{ds_a}@snap-a"),
        &clone,
        &[("mountpoint", clone_mnt.to_str().unwrap())],
    )
    .unwrap();
    let target = RestoreTarget {
        netns: Some(ns.path()),
        tap: Some("tap-a".into()),
        links: vec![("rootfs".into(), clone_mnt.join("rootfs.ext4"))],
        refresh_drives: vec![],
        cpu_milli: None,
    };
    let t = Instant::now();
    rt.block_on(reopened.restore(&vmm, "snap-a", "vm-a2", &target))
        .expect("restore");
    let (mut back, hello) =
        wait_ready(&vmm.runtime_dir("vm-a2").vsock(), budget(kind)).expect("answers after restore");
    println!(
        "restore -> answering over vsock: {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(
        matches!(
            hello,
            Response::Ready {
                running_app: true,
                ..
            }
        ),
        "{hello:?}"
    );
    assert_eq!(
        exec_text(&mut back, &["cat", "/root/state"]),
        "written-before-snapshot"
    );
    assert_eq!(exec_text(&mut back, &["hostname"]), "vm-a");
    drop(back);
    rt.block_on(vmm.remove("vm-a2")).unwrap();

    // A corrupted snapshot is reported and never loaded; a corrupted template is rebuilt.
    let state = snaps.join("snap-a/vmstate");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let scanned = SnapshotManager::open(&snaps).unwrap();
    assert!(scanned.list().is_empty());
    assert!(
        scanned.problems()[0].1.contains("sha256"),
        "{:?}",
        scanned.problems()
    );
    let err = rt
        .block_on(scanned.restore(&vmm, "snap-a", "vm-x", &RestoreTarget::default()))
        .unwrap_err();
    assert!(err.to_string().contains("snap-a"), "{err}");

    std::fs::remove_file(
        dir.path()
            .join("templates/snapshots")
            .join(&template.id)
            .join("memory"),
    )
    .unwrap();
    let (rebuilt, built) = rt
        .block_on(store.ensure(
            &vmm,
            &inputs,
            Some(ns.path()),
            Some("tpl0".into()),
            budget(kind),
        ))
        .expect("rebuild template");
    assert!(built, "a damaged template is rebuilt");
    assert_eq!(rebuilt.id, template.id);
    assert!(rt.block_on(vmm.list()).is_empty(), "no VM left");
}
