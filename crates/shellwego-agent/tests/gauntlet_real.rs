//! TC-E2E-1, the cold-start gauntlet, with real parts only: pull the real Alpine image
//! from a local registry, build its ZFS root disk, set up the TAP with eBPF QoS, start a
//! 128 MiB microVM, ping it from the host side of the bridge, then stop it and remove the
//! TAP and the dataset — and find nothing left. Once warm (from a template), once cold.
//! The whole agent side runs inside a network namespace the test made.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shellwego_agent::host;
use shellwego_agent::provision::{BootMode, Phase, Platform};
use shellwego_agent::spec::DesiredApp;
use shellwego_agent::template::TemplateStore;
use shellwego_agent::vmm::VmmManager;
use shellwego_network::{CniNetwork, NetworkConfig};
use shellwego_storage::{ImageStore, RegistryConfig, RootfsBuilder, ZfsManager};
use shellwego_testkit::guest;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::oci::alpine_layout;
use shellwego_testkit::prereq::require_command;
use shellwego_testkit::process::KillVmsOnDrop;
use shellwego_testkit::registry::Registry;
use shellwego_testkit::zfs::TestPool;

fn print_phases(label: &str, phases: &[Phase], total: Duration) {
    let parts: Vec<String> = phases
        .iter()
        .map(|p| format!("{} {:.2}s", p.name, p.took.as_secs_f64()))
        .collect();
    println!(
        "{label}: {} | total {:.2}s",
        parts.join(", "),
        total.as_secs_f64()
    );
}

#[test]
fn tc_e2e_1_cold_start_gauntlet() {
    let firecracker = require_command("firecracker", "run `make setup`");
    let kind = host::detect().unwrap();
    let ns = NetNs::new();
    // The registry listens where the agent side runs: inside the test's namespace.
    let registry = Registry::start_in(Some(&ns));
    registry.push_layout(&alpine_layout(), "3.23", "library/alpine:3.23");
    let pool = TestPool::new(4 << 30);
    let data = pool.mount_root();
    let _vms = KillVmsOnDrop(data.join("run"));
    let kernel = guest::kernel();
    let init = guest::init_binary();
    let spec = format!(
        "name = \"gauntlet\"\nimage = \"{}/library/alpine:3.23\"\n[run]\ncmd = [\"/bin/sleep\", \"3600\"]\n\
         [resources]\nmemory = \"128Mi\"\ndisk = \"512Mi\"\n[bandwidth]\ndownload = \"50Mbit\"\nupload = \"50Mbit\"\n",
        registry.addr
    );
    let app = DesiredApp::from_toml(&spec).unwrap();
    let pool_name = pool.name.clone();
    let registry_addr = registry.addr.clone();
    let ns_name = ns.name.clone();

    let leftovers = ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let zfs = ZfsManager::new(&pool_name).unwrap();
            let images = Arc::new(
                ImageStore::open(
                    &data.join("oci"),
                    RegistryConfig {
                        insecure: vec![registry_addr],
                        ..Default::default()
                    },
                )
                .unwrap(),
            );
            let network = CniNetwork::new(NetworkConfig::default(), &data.join("network")).unwrap();
            network.ensure_bridge().await.unwrap();
            let platform = Platform {
                kind,
                firecracker: firecracker.clone(),
                kernel,
                init,
                images,
                rootfs: Arc::new(RootfsBuilder::new(zfs.clone(), &data)),
                network,
                vmm: VmmManager::new(&firecracker, &data.join("run")),
                templates: tokio::sync::Mutex::new(
                    TemplateStore::open(&data.join("templates")).unwrap(),
                ),
                template_tap: "swgtemplate".into(),
            };
            let mut results = Vec::new();
            for mode in [BootMode::Warm, BootMode::Cold] {
                if mode == BootMode::Warm {
                    // The template is built once per shape; the gauntlet measures a warm
                    // start from it, so build it first and report it separately.
                    let t = Instant::now();
                    let probe = uuid::Uuid::new_v4();
                    platform
                        .provision(&app, probe, Default::default(), mode, &|_| {})
                        .await
                        .expect("template run");
                    platform
                        .deprovision(probe)
                        .await
                        .expect("deprovision template run");
                    println!(
                        "template build + first warm start: {:.1}s",
                        t.elapsed().as_secs_f64()
                    );
                }
                let vm_id = uuid::Uuid::new_v4();
                let start = Instant::now();
                let vm = platform
                    .provision(&app, vm_id, Default::default(), mode, &|line| {
                        println!("  {line}")
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{mode:?} provision: {e}"));
                let mut phases = vm.phases.clone();
                let t = Instant::now();
                let ping = std::process::Command::new("ping")
                    .args(["-c", "1", "-W", "20", &vm.net.ip.to_string()])
                    .output()
                    .unwrap();
                assert!(
                    ping.status.success(),
                    "{mode:?}: ping {}: {}",
                    vm.net.ip,
                    String::from_utf8_lossy(&ping.stdout)
                );
                phases.push(Phase {
                    name: "ping",
                    took: t.elapsed(),
                });
                assert!(zfs.exists(&vm.disk.dataset).unwrap());
                let down = platform.deprovision(vm_id).await.expect("deprovision");
                phases.extend(down);
                print_phases(
                    &format!("gauntlet {mode:?} ({})", kind.describe()),
                    &phases,
                    start.elapsed(),
                );
                results.push((vm, platform.vmm.list().await));
            }
            let links = std::process::Command::new("ip")
                .args(["-o", "link"])
                .output()
                .unwrap();
            let qdiscs = std::process::Command::new("tc")
                .args(["qdisc", "show"])
                .output()
                .unwrap();
            let leases = platform.network.ipam().leases().unwrap();
            let disks = platform.rootfs.vm_disks().unwrap();
            let mut templates = platform.templates.lock().await;
            let keys: Vec<String> = templates
                .snapshots()
                .list()
                .iter()
                .map(|m| m.id.clone())
                .collect();
            for k in keys {
                templates.delete(&k).unwrap();
            }
            (
                results,
                String::from_utf8_lossy(&links.stdout).into_owned(),
                String::from_utf8_lossy(&qdiscs.stdout).into_owned(),
                leases,
                disks,
            )
        })
    });
    let (results, links, qdiscs, leases, disks) = leftovers;
    for (vm, vms_left) in &results {
        assert!(vms_left.is_empty(), "VM processes left: {vms_left:?}");
        assert!(
            !links.contains(&vm.net.tap),
            "TAP {} left in {ns_name}",
            vm.net.tap
        );
        let ifb = format!("swi{}", &vm.net.tap[3..]);
        assert!(!links.contains(&ifb), "IFB {ifb} left");
    }
    assert!(
        !qdiscs.contains("htb") && !qdiscs.contains("clsact"),
        "QoS left: {qdiscs}"
    );
    assert!(leases.is_empty(), "leases left: {leases:?}");
    assert!(disks.is_empty(), "datasets left: {disks:?}");
}
