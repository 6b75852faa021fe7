#![allow(dead_code)] // the test and the bench use different parts
//! TC-E2E-1's rig and one pass of the gauntlet, shared by the test and the agent bench:
//! the agent's platform built from real parts inside a test namespace (real registry,
//! ZFS pool, bridge, firecracker), then pull -> rootfs -> network+QoS -> VM -> ping ->
//! stop -> TAP/lease/QoS removed -> dataset destroyed, each phase timed.

use std::path::{Path, PathBuf};
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

/// The real parts around the platform: a namespace with the real Alpine image in a
/// registry inside it, a ZFS pool whose mount holds the platform's data. Dropped in
/// order: VMs, pool, registry, namespace.
pub struct Rig {
    _vms: KillVmsOnDrop,
    pub pool: TestPool,
    pub registry: Registry,
    pub ns: NetNs,
    pub firecracker: PathBuf,
    pub data: PathBuf,
}

impl Rig {
    pub fn new() -> Rig {
        let firecracker = require_command("firecracker", "run `make setup`");
        let ns = NetNs::new();
        // The registry listens where the agent side runs: inside the test's namespace.
        let registry = Registry::start_in(Some(&ns));
        registry.push_layout(&alpine_layout(), "3.23", "library/alpine:3.23");
        let pool = TestPool::new(4 << 30);
        let data = pool.mount_root();
        Rig {
            _vms: KillVmsOnDrop(data.join("run")),
            pool,
            registry,
            ns,
            firecracker,
            data,
        }
    }
}

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
        templates: tokio::sync::RwLock::new(
            TemplateStore::open(&data.join("templates")).expect("templates"),
        ),
        template_tap: "swgtemplate".into(),
        suspended: data.join("suspended"),
        app_snapshot_dir: data.join("app-snapshots"),
        image_template_dir: data.join("image-templates"),
        image_templates: true,
        online_grow: false,
        image_template_ttl: Duration::from_secs(3600),
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
    phases.extend(platform.teardown(vm_id).await.expect("teardown"));
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
