#![allow(dead_code)] // the test and the bench use different parts
//! TC-E2E-1's rig and one pass of the gauntlet, shared by the test and the agent bench:
//! the agent's platform built from real parts inside a test namespace (real registry,
//! ZFS pool, bridge, firecracker), then pull -> rootfs -> network+QoS -> VM -> ping ->
//! stop -> TAP/lease/QoS removed -> dataset destroyed, each phase timed.

use std::path::Path;
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

/// The platform the agent would build, with its state under `data`.
pub async fn platform(firecracker: &Path, pool: &str, registry: &str, data: &Path) -> Platform {
    let zfs = ZfsManager::new(pool).expect("zfs");
    let images = Arc::new(
        ImageStore::open(
            &data.join("oci"),
            RegistryConfig {
                insecure: vec![registry.to_string()],
                ..Default::default()
            },
        )
        .expect("image store"),
    );
    let network = CniNetwork::new(NetworkConfig::default(), &data.join("network")).expect("cni");
    network.ensure_bridge().await.expect("bridge");
    Platform {
        kind: host::detect().expect("host kind"),
        firecracker: firecracker.to_path_buf(),
        kernel: guest::kernel(),
        init: guest::init_binary(),
        images,
        rootfs: Arc::new(RootfsBuilder::new(zfs, data)),
        network,
        vmm: VmmManager::new(firecracker, &data.join("run")),
        templates: tokio::sync::Mutex::new(
            TemplateStore::open(&data.join("templates")).expect("templates"),
        ),
        template_tap: "swgtemplate".into(),
    }
}

/// The gauntlet's app: the real Alpine image, 128 MiB, QoS both ways.
pub fn app(registry: &str) -> DesiredApp {
    DesiredApp::from_toml(&format!(
        "name = \"gauntlet\"\nimage = \"{registry}/library/alpine:3.23\"\n\
         [run]\ncmd = [\"/bin/sleep\", \"3600\"]\n\
         [resources]\nmemory = \"128Mi\"\ndisk = \"512Mi\"\n\
         [bandwidth]\ndownload = \"50Mbit\"\nupload = \"50Mbit\"\n"
    ))
    .expect("gauntlet spec")
}

/// One gauntlet: provision, ping, deprovision. Returns every phase and the total.
pub async fn run(platform: &Platform, app: &DesiredApp, mode: BootMode) -> (Vec<Phase>, Duration) {
    let vm_id = uuid::Uuid::new_v4();
    let start = Instant::now();
    let vm = platform
        .provision(app, vm_id, Default::default(), mode, &|_| {})
        .await
        .unwrap_or_else(|e| panic!("{mode:?} provision: {e}"));
    let mut phases = vm.phases.clone();
    let t = Instant::now();
    let ping = std::process::Command::new("ping")
        .args(["-c", "1", "-W", "20", &vm.net.ip.to_string()])
        .output()
        .expect("ping");
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
    assert!(platform.rootfs.zfs().exists(&vm.disk.dataset).expect("zfs"));
    phases.extend(platform.deprovision(vm_id).await.expect("deprovision"));
    (phases, start.elapsed())
}

/// "pull 0.01s, rootfs 0.05s, ... | total 20.1s"
pub fn render(phases: &[Phase], total: Duration) -> String {
    let parts: Vec<String> = phases
        .iter()
        .map(|p| format!("{} {:.2}s", p.name, p.took.as_secs_f64()))
        .collect();
    format!("{} | total {:.2}s", parts.join(", "), total.as_secs_f64())
}
