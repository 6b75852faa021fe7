//! A real guest boot: the project's kernel, the guest init in its initramfs, the real
//! Alpine root on virtio-blk, a TAP in the test's own network namespace, vsock to the
//! init. Cold boots take about a minute on nested (kvm_pvm) hosts.

use std::time::{Duration, Instant};

use shellwego_agent::guest::{wait_ready, GuestClient};
use shellwego_agent::host::{self, HostKind};
use shellwego_agent::initrd;
use shellwego_agent::vmm::config::{generate_mac, guest_vm_config, GuestLayout, MachineConfig};
use shellwego_agent::vmm::{process_alive, VmmManager};
use shellwego_proto::{NetConfig, Response, RunConfig};
use shellwego_testkit::guest;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::prereq::require_command;
use shellwego_testkit::process::KillVmsOnDrop;

/// Budget for a cold boot to reach the init, by host kind (GUEST.md: 55-64 s nested).
fn boot_budget(kind: HostKind) -> Duration {
    match kind {
        HostKind::Hardware => Duration::from_secs(30),
        HostKind::NestedEmulated => Duration::from_secs(300),
    }
}

#[test]
fn guest_boots_answers_pings_execs_and_shuts_down() {
    let firecracker = require_command("firecracker", "run `make setup`");
    let kind = host::detect().expect("host kind");
    let kernel = guest::kernel();
    let init = guest::init_binary();
    let dir = tempfile::tempdir().unwrap();
    let initrd_path = dir.path().join("initrd.cpio");
    initrd::write(&init, &initrd_path).expect("write initramfs");
    let rootfs = guest::alpine_ext4(dir.path(), 256);
    let ns = NetNs::new();
    ns.tap("tap0", "10.0.4.1/24");

    let vm_id = uuid::Uuid::new_v4();
    let run_dir = dir.path().join("run");
    let _vms = KillVmsOnDrop(run_dir.clone());
    let mgr = VmmManager::new(&firecracker, &run_dir);
    let uds = mgr.runtime_dir("boot").vsock();
    // Relative drive and vsock paths resolve in the VM's runtime dir (firecracker's cwd):
    // the drive goes through a per-VM symlink, as snapshot clones need.
    let layout = GuestLayout {
        kernel: kernel.display().to_string(),
        initrd: initrd_path.display().to_string(),
        root_drive: "rootfs".into(),
        vsock: "vsock.sock".into(),
        nic: Some(("tap0".into(), generate_mac(vm_id))),
    };
    let machine = MachineConfig {
        vcpu_count: 1,
        mem_size_mib: 128,
        smt: false,
    };
    let mut cfg = guest_vm_config("boot", machine, kind, &layout);
    cfg.netns = Some(ns.path());
    cfg.links = vec![("rootfs".into(), rootfs.clone())];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let record = rt.block_on(mgr.create(&cfg)).expect("create VM");
    let started = Instant::now();
    rt.block_on(mgr.start("boot")).expect("InstanceStart");

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (mut client, hello) = wait_ready(&uds, boot_budget(kind)).unwrap_or_else(|e| {
            panic!(
                "guest never reported ready: {e}\n--- console ---\n{}",
                mgr.console_tail("boot", 40)
            )
        });
        let boot = started.elapsed();
        let Response::Ready {
            uptime_ms,
            running_app,
            ..
        } = hello
        else {
            panic!("{hello:?}")
        };
        assert!(!running_app);
        println!(
            "InstanceStart -> ready on vsock: {:.1} s (guest uptime {uptime_ms} ms, {})",
            boot.as_secs_f64(),
            kind.describe()
        );

        client
            .run(RunConfig {
                argv: vec!["/bin/sleep".into(), "3600".into()],
                env: [("GREETING".to_string(), "hi".to_string())]
                    .into_iter()
                    .collect(),
                hostname: "boot-test".into(),
                net: Some(NetConfig {
                    address: "10.0.4.2".into(),
                    prefix_len: 24,
                    gateway: "10.0.4.1".into(),
                    nameservers: vec![],
                    mac: Some("02:aa:bb:cc:dd:ee".into()),
                }),
                root_device: "/dev/vda".into(),
                clock: Some((1_800_000_000, 0)),
                ..Default::default()
            })
            .expect("run");

        let ping = ns.exec(&["ping", "-c", "3", "-W", "10", "10.0.4.2"]);
        assert!(
            ping.status.success(),
            "ping from the namespace failed: {}{}",
            String::from_utf8_lossy(&ping.stdout),
            String::from_utf8_lossy(&ping.stderr)
        );

        let out = client
            .exec(&["cat", "/etc/os-release"], Duration::from_secs(60))
            .expect("exec");
        assert_eq!(out.code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Alpine"),
            "{:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        let env = client
            .exec(
                &["sh", "-c", "echo $GREETING $(hostname)"],
                Duration::from_secs(60),
            )
            .expect("exec env");
        assert_eq!(String::from_utf8_lossy(&env.stdout).trim(), "hi boot-test");
        let date = client
            .exec(&["date", "+%Y"], Duration::from_secs(60))
            .expect("exec date");
        assert_eq!(
            String::from_utf8_lossy(&date.stdout).trim(),
            "2027",
            "clock set from run config"
        );

        // A fresh connection works too (the listener stays).
        drop(client);
        let mut again = GuestClient::connect(&uds, Duration::from_secs(30)).expect("reconnect");
        again.shutdown(Duration::from_secs(5)).expect("shutdown");
        let deadline = Instant::now() + Duration::from_secs(120);
        while process_alive(record.pid) && Instant::now() < deadline {
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(record.pid, std::ptr::null_mut(), libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !process_alive(record.pid),
            "firecracker exits after the guest reboots\n{}",
            mgr.console_tail("boot", 20)
        );
    }));
    rt.block_on(mgr.remove("boot")).expect("remove");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
