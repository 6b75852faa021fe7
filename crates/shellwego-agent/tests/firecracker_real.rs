//! The Firecracker driver and VmmManager against the real `firecracker` binary and the
//! project's guest kernel. None of these wait for a guest to boot (a minute on nested
//! hosts); the guest tests do that.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shellwego_agent::host;
use shellwego_agent::vmm::config::{boot_args, MachineConfig};
use shellwego_agent::vmm::driver::{self, DriverError, RuntimeDir};
use shellwego_agent::vmm::jail::{cgroup_dirs, CgroupVersion, PIDS_MAX, VMM_OVERHEAD_MIB};
use shellwego_agent::vmm::models::BootSource;
use shellwego_agent::vmm::{process_alive, MicrovmConfig, StopOutcome, VmmError, VmmManager};
use shellwego_testkit::guest;
use shellwego_testkit::prereq::require_command;

fn firecracker() -> PathBuf {
    require_command(
        "firecracker",
        "install it with `make setup` or put an official release on PATH",
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn config(vm_id: &str, kernel: &Path, initrd: Option<&Path>) -> MicrovmConfig {
    let kind = host::detect().expect("host kind");
    MicrovmConfig {
        vm_id: vm_id.to_string(),
        machine: MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
        },
        boot: BootSource {
            kernel_image_path: kernel.display().to_string(),
            initrd_path: initrd.map(|p| p.display().to_string()),
            boot_args: Some(boot_args(kind, true, "rdinit=/init")),
        },
        drives: vec![],
        network: vec![],
        vsock: None,
        netns: None,
        links: vec![],
        cpu_milli: None,
    }
}

#[test]
fn tc_i1_version_over_the_api_socket_matches_the_binary() {
    let bin = firecracker();
    let from_binary = driver::binary_version(&bin).expect("firecracker --version");
    let dir = tempfile::tempdir().unwrap();
    let rt_dir = RuntimeDir::new(dir.path(), "tc-i1");
    let runtime = rt();
    let spawned = runtime
        .block_on(driver::spawn(&bin, &rt_dir, None, Duration::from_secs(10)))
        .expect("spawn firecracker");
    let version = runtime
        .block_on(spawned.api.version())
        .expect("GET /version");
    let info = runtime
        .block_on(spawned.api.instance_info())
        .expect("GET /");
    // SAFETY: killing the firecracker this test started.
    unsafe { libc::kill(spawned.pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(spawned.pid, &mut status, 0) };
    assert_eq!(version.firecracker_version, from_binary);
    assert_eq!(info.state, "Not started");
    assert!(!process_alive(spawned.pid));
}

#[test]
fn configure_start_pause_resume_stop_and_remove() {
    let kernel = guest::kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = guest::busybox_initrd(
        dir.path(),
        "#!/bin/busybox sh\nwhile :; do /bin/busybox sleep 60; done\n",
    );
    let mgr = VmmManager::new(&firecracker(), &dir.path().join("run"));
    let runtime = rt();
    runtime.block_on(async {
        let cfg = config("vm-life", &kernel, Some(&initrd));
        let record = mgr.create(&cfg).await.expect("create");
        let api = mgr.api_of("vm-life").await.unwrap();
        let seen = api.vm_config().await.expect("GET /vm/config");
        assert_eq!(seen.machine_config.unwrap().mem_size_mib, 128);
        assert_eq!(
            seen.boot_source.unwrap().kernel_image_path,
            kernel.display().to_string()
        );
        assert_eq!(
            mgr.inspect("vm-life").await.unwrap().state.as_deref(),
            Some("Not started")
        );
        mgr.start("vm-life").await.expect("InstanceStart");
        assert_eq!(
            mgr.inspect("vm-life").await.unwrap().state.as_deref(),
            Some("Running")
        );
        mgr.pause("vm-life").await.expect("pause");
        assert_eq!(
            mgr.inspect("vm-life").await.unwrap().state.as_deref(),
            Some("Paused")
        );
        mgr.resume("vm-life").await.expect("resume");
        assert_eq!(
            mgr.inspect("vm-life").await.unwrap().state.as_deref(),
            Some("Running")
        );
        let outcome = mgr
            .stop("vm-life", Duration::from_millis(500))
            .await
            .expect("stop");
        assert_eq!(
            outcome,
            StopOutcome::Killed,
            "a booting guest ignores Ctrl-Alt-Del"
        );
        assert!(!process_alive(record.pid));
        assert!(!mgr.inspect("vm-life").await.unwrap().alive);
        mgr.remove("vm-life").await.unwrap();
        assert!(!mgr.runtime_dir("vm-life").dir.exists());
        assert!(mgr.list().await.is_empty());
    });
}

#[test]
fn an_externally_killed_firecracker_is_detected() {
    let kernel = guest::kernel();
    let dir = tempfile::tempdir().unwrap();
    let mgr = VmmManager::new(&firecracker(), &dir.path().join("run"));
    rt().block_on(async {
        let record = mgr
            .create(&config("vm-killed", &kernel, None))
            .await
            .expect("create");
        mgr.start("vm-killed").await.expect("start");
        // SAFETY: killing the firecracker this test started.
        unsafe { libc::kill(record.pid, libc::SIGKILL) };
        let mut alive = true;
        for _ in 0..100 {
            alive = mgr.inspect("vm-killed").await.unwrap().alive;
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive, "inspect reports the dead process");
        assert_eq!(
            mgr.stop("vm-killed", Duration::from_millis(100))
                .await
                .unwrap(),
            StopOutcome::AlreadyExited
        );
        mgr.remove("vm-killed").await.unwrap();
    });
}

#[test]
fn bad_kernel_and_bad_config_return_firecrackers_message() {
    let kernel = guest::kernel();
    let dir = tempfile::tempdir().unwrap();
    let mgr = VmmManager::new(&firecracker(), &dir.path().join("run"));
    rt().block_on(async {
        let err = mgr
            .create(&config(
                "vm-badkernel",
                Path::new("/nonexistent/vmlinux"),
                None,
            ))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, VmmError::Driver(DriverError::Api { .. })),
            "{text}"
        );
        assert!(
            text.contains("/boot-source") && text.to_lowercase().contains("kernel"),
            "{text}"
        );
        assert!(
            !mgr.runtime_dir("vm-badkernel").dir.exists(),
            "failed create cleans up"
        );

        let mut cfg = config("vm-badmem", &kernel, None);
        cfg.machine.mem_size_mib = 0;
        let err = mgr.create(&cfg).await.unwrap_err().to_string();
        assert!(err.contains("/machine-config"), "{err}");
        assert!(mgr.list().await.is_empty());
    });
}

#[test]
fn five_vms_at_once_all_cleaned_up() {
    let kernel = guest::kernel();
    let dir = tempfile::tempdir().unwrap();
    let mgr = VmmManager::new(&firecracker(), &dir.path().join("run"));
    rt().block_on(async {
        let mut pids = Vec::new();
        for i in 0..5 {
            let id = format!("vm-five-{i}");
            pids.push(
                mgr.create(&config(&id, &kernel, None))
                    .await
                    .expect("create")
                    .pid,
            );
            mgr.start(&id).await.expect("start");
        }
        assert_eq!(mgr.list().await.len(), 5);
        for i in 0..5 {
            let st = mgr.inspect(&format!("vm-five-{i}")).await.unwrap();
            assert!(st.alive);
            assert_eq!(st.state.as_deref(), Some("Running"));
        }
        for i in 0..5 {
            mgr.remove(&format!("vm-five-{i}")).await.unwrap();
        }
        assert!(
            pids.iter().all(|p| !process_alive(*p)),
            "no firecracker left"
        );
        let left = std::fs::read_dir(dir.path().join("run")).unwrap().count();
        assert_eq!(left, 0, "no runtime directory left");
    });
}

#[test]
fn a_new_manager_reattaches_to_running_vms() {
    let kernel = guest::kernel();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let first = VmmManager::new(&firecracker(), &run);
    rt().block_on(async {
        let record = first
            .create(&config("vm-attach", &kernel, None))
            .await
            .expect("create");
        first.start("vm-attach").await.unwrap();
        let doomed = first
            .create(&config("vm-doomed", &kernel, None))
            .await
            .expect("create");
        drop(first); // the agent "restarts"; its VMs keep running
                     // SAFETY: killing a firecracker this test started.
        unsafe { libc::kill(doomed.pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(doomed.pid, &mut status, 0) };

        let second = VmmManager::new(&firecracker(), &run);
        let (attached, dead) = second.reattach().await.expect("reattach");
        assert_eq!(attached, vec!["vm-attach".to_string()]);
        assert_eq!(dead, vec!["vm-doomed".to_string()]);
        assert_eq!(
            second.inspect("vm-attach").await.unwrap().state.as_deref(),
            Some("Running")
        );
        second.remove("vm-attach").await.unwrap();
        assert!(!process_alive(record.pid));
    });
}

#[test]
fn a_vm_under_the_jailer_runs_and_is_cleaned_up() {
    let jailer = require_command(
        "jailer",
        "install it with `make setup` (it ships with firecracker)",
    );
    let kernel = guest::kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = guest::busybox_initrd(
        dir.path(),
        "#!/bin/busybox sh\nwhile :; do /bin/busybox sleep 60; done\n",
    );
    // A drive on another file system (tmpfs) is bind-mounted into the chroot; the kernel
    // and initramfs on the same one are hard-linked.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let drive = shm.path().join("data.img");
    std::fs::File::create(&drive)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let jail = driver::Jail::new(&jailer, &dir.path().join("jail")).expect("cgroups for jails");
    std::fs::create_dir_all(&jail.chroot_base).unwrap();
    let mgr = VmmManager::new(&firecracker(), &dir.path().join("run")).with_jail(jail.clone());
    let cgroup_version = jail.cgroups;
    let jail = mgr.jail().unwrap().clone();
    rt().block_on(async {
        let mut cfg = config("vm-jailed", &kernel, Some(&initrd));
        cfg.cpu_milli = Some(500);
        cfg.drives.push(shellwego_agent::vmm::models::Drive {
            drive_id: "data".into(),
            path_on_host: drive.display().to_string(),
            is_root_device: false,
            is_read_only: false,
            rate_limiter: None,
        });
        let record = mgr.create(&cfg).await.expect("create jailed VM");
        let root = jail.root_of("vm-jailed");
        assert!(
            root.join("api.sock").exists(),
            "API socket inside the chroot"
        );
        let seen = mgr
            .api_of("vm-jailed")
            .await
            .unwrap()
            .vm_config()
            .await
            .unwrap();
        assert_eq!(seen.boot_source.unwrap().kernel_image_path, "/vmlinux");
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            mounts.contains(&root.join("data").display().to_string()),
            "drive bind-mounted"
        );
        mgr.start("vm-jailed").await.expect("start");
        assert_eq!(
            mgr.inspect("vm-jailed").await.unwrap().state.as_deref(),
            Some("Running")
        );
        // Unprivileged, its own uid from the reserved range, the shared VM group.
        let status = std::fs::read_to_string(format!("/proc/{}/status", record.pid)).unwrap();
        let field = |name: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in status"))
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        let uid = mgr.uid_of("vm-jailed").expect("a uid");
        assert_eq!(record.uid, Some(uid));
        assert!(uid > jail.uid_base, "uid {uid} from the reserved range");
        assert_eq!(
            field("Uid:"),
            vec![uid; 4],
            "real, effective, saved, fs uid"
        );
        assert_eq!(field("Gid:"), vec![jail.gid(); 4]);
        assert_eq!(field("CapEff:").len(), 1);
        assert!(
            status.contains("CapEff:\t0000000000000000"),
            "no capabilities: {status}"
        );
        // Its own PID namespace: pid 1 there.
        assert_eq!(field("NSpid:"), vec![record.pid as u32, 1]);
        // Its own cgroup, with half a core and the memory limit.
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", record.pid)).unwrap();
        assert!(
            cgroups.contains("/shellwego/vm-jailed"),
            "in its own cgroup: {cgroups}"
        );
        let dirs = cgroup_dirs(cgroup_version, "vm-jailed");
        let read = |file: &str| -> String {
            dirs.iter()
                .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
                .unwrap_or_else(|| panic!("no {file} in {dirs:?}"))
                .trim()
                .to_string()
        };
        let mem_limit = ((128 + VMM_OVERHEAD_MIB) << 20).to_string();
        match cgroup_version {
            CgroupVersion::V1 => {
                assert_eq!(read("cpu.cfs_quota_us"), "50000");
                assert_eq!(read("cpu.cfs_period_us"), "100000");
                assert_eq!(read("memory.limit_in_bytes"), mem_limit);
            }
            CgroupVersion::V2 => {
                assert_eq!(read("cpu.max"), "50000 100000");
                assert_eq!(read("memory.max"), mem_limit);
            }
        }
        assert_eq!(read("pids.max"), PIDS_MAX.to_string());
        // The drive is the VM's own; the shared kernel is not writable by it.
        let meta = std::fs::metadata(&drive).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));
        mgr.remove("vm-jailed").await.unwrap();
        assert!(!process_alive(record.pid));
        assert!(!root.parent().unwrap().exists(), "jail dir removed");
        assert!(
            dirs.iter().all(|d| !d.exists()),
            "cgroups removed: {dirs:?}"
        );
        assert_eq!(mgr.uid_of("vm-jailed"), None, "uid released");
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            !mounts.contains(&root.display().to_string()),
            "no bind mount left"
        );
    });
}
