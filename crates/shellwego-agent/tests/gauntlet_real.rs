//! TC-E2E-1, the cold-start gauntlet, with real parts only: pull the real Alpine image
//! from a local registry, build its ZFS root disk, set up the TAP with eBPF QoS, start a
//! 128 MiB microVM, ping it from the host side of the bridge, then stop it and remove the
//! TAP and the dataset — and find nothing left. Once warm (from a template), once cold.
//! The whole agent side runs inside a network namespace the test made.

#[path = "common/gauntlet.rs"]
mod gauntlet;

use std::time::Instant;

use shellwego_agent::host;
use shellwego_agent::provision::BootMode;

#[test]
fn tc_e2e_1_cold_start_gauntlet() {
    let kind = host::detect().unwrap();
    let rig = gauntlet::Rig::new();
    let app = gauntlet::app(&rig.registry.addr);
    let (firecracker, data) = (rig.firecracker.clone(), rig.data.clone());
    let pool_name = rig.pool.name.clone();
    let registry_addr = rig.registry.addr.clone();
    let ns_name = rig.ns.name.clone();

    let leftovers = rig.ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let platform =
                gauntlet::platform(&firecracker, &pool_name, &registry_addr, &data).await;
            let mut results = Vec::new();
            for mode in [BootMode::Warm, BootMode::Cold] {
                if mode == BootMode::Warm {
                    // The template is built once per shape; the gauntlet measures a warm
                    // start from it, so build it first and report it separately.
                    let t = Instant::now();
                    gauntlet::run(&platform, &app, mode).await;
                    println!(
                        "template build + first warm start: {:.1}s",
                        t.elapsed().as_secs_f64()
                    );
                }
                let (phases, total) = gauntlet::run(&platform, &app, mode).await;
                println!(
                    "gauntlet {mode:?} ({}): {}",
                    kind.describe(),
                    gauntlet::render(&phases, total)
                );
                results.push(platform.vmm.list().await);
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
            let mut templates = platform.templates.write().await;
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
    for vms_left in &results {
        assert!(vms_left.is_empty(), "VM processes left: {vms_left:?}");
    }
    let vm_links: Vec<&str> = links
        .lines()
        .filter(|l| l.contains(": swg") || l.contains(": swi"))
        .filter(|l| !l.contains("swg-br0") && !l.contains("swgtemplate"))
        .collect();
    assert!(
        vm_links.is_empty(),
        "TAP/IFB left in {ns_name}: {vm_links:?}"
    );
    assert!(
        !qdiscs.contains("htb") && !qdiscs.contains("clsact"),
        "QoS left: {qdiscs}"
    );
    assert!(leases.is_empty(), "leases left: {leases:?}");
    assert!(disks.is_empty(), "datasets left: {disks:?}");
}
