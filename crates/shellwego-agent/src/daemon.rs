//! `shellwego agent`: builds the platform from the configuration, re-attaches to what an
//! earlier agent left running, then reconciles forever and serves the API.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shellwego_network::{CniNetwork, NetworkConfig};
use shellwego_storage::{ImageBudget, ImageStore, RegistryConfig, RootfsBuilder, ZfsManager};
use tracing::{info, warn};

use crate::api;
use crate::command::AgentService;
use crate::config::{find_executable, Config};
use crate::endpoint::Endpoints;
use crate::hardening::{harden_process, private_dir, private_file};
use crate::provision::{BootMode, Platform};
use crate::reconciler::executor::{Executor, ExecutorConfig};
use crate::reconciler::steps::Deadlines;
use crate::state::Store;
use crate::template::TemplateStore;
use crate::vault::Vault;
use crate::vmm::driver::Jail;
use crate::vmm::VmmManager;

/// Everything the daemon needs, checked up front with errors naming the fix.
pub async fn platform(config: &Config) -> Result<Platform> {
    let kind = crate::host::detect().context("cannot read /proc/cpuinfo")?;
    let firecracker = find_executable(&config.firecracker).with_context(|| {
        format!(
            "firecracker not found at {} (run `make setup`)",
            config.firecracker.display()
        )
    })?;
    if !config.kernel.is_file() {
        bail!(
            "guest kernel {} is missing (run `make setup`, or set SHELLWEGO_KERNEL)",
            config.kernel.display()
        );
    }
    if !config.guest_init.is_file() {
        bail!(
            "guest init {} is missing (run `make setup`, or set SHELLWEGO_GUEST_INIT)",
            config.guest_init.display()
        );
    }
    let zfs = ZfsManager::new(&config.pool).context("zfs commands")?;
    let health = zfs.pool_health().with_context(|| {
        format!(
            "ZFS pool {} is not reachable (see `shellwego doctor`)",
            config.pool
        )
    })?;
    if !health.is_online() {
        bail!("ZFS pool {} is {}", config.pool, health.health);
    }
    let data = &config.data_dir;
    for dir in [data, &config.run_dir] {
        private_dir(dir).with_context(|| format!("cannot make {} root-only", dir.display()))?;
    }
    let images = ImageStore::open_with(
        &data.join("oci"),
        RegistryConfig {
            insecure: config.insecure_registries.clone(),
            ..Default::default()
        },
        ImageBudget {
            max_unpacked_bytes: config.image_max_bytes,
            max_entries: config.image_max_entries,
            ..ImageBudget::default()
        },
    )?;
    let network = CniNetwork::new(
        NetworkConfig {
            bridge: config.bridge.clone(),
            ..Default::default()
        },
        &data.join("network"),
    )?;
    network
        .ensure_bridge()
        .await
        .with_context(|| format!("setting up bridge {}", config.bridge))?;
    let rootfs = RootfsBuilder::new(zfs, data);
    rootfs.protect_staging().with_context(|| {
        format!(
            "cannot mount the layer staging area {} nosuid,nodev,noexec",
            rootfs.staging_dir().display()
        )
    })?;
    let mut vmm = VmmManager::new(&firecracker, &config.run_dir.join("vms"));
    if config.jailer {
        let jailer = find_executable(&config.jailer_binary).context(
            "jailer not found (it ships with firecracker; `make setup` installs it, \
             or set jailer = false to run VMs unjailed)",
        )?;
        let base = config.chroot_base();
        private_dir(&base).with_context(|| format!("cannot make {} root-only", base.display()))?;
        vmm = vmm.with_jail(Jail::new(&jailer, &base).context("cannot jail VMs on this host")?);
    } else {
        warn!(
            "jailer = false: every firecracker runs as root, unconfined (see `shellwego doctor`)"
        );
    }
    Ok(Platform {
        kind,
        firecracker,
        kernel: config.kernel.clone(),
        init: config.guest_init.clone(),
        images: Arc::new(images),
        rootfs: Arc::new(rootfs),
        network,
        vmm,
        templates: tokio::sync::RwLock::new(TemplateStore::open(&config.templates())?),
        template_tap: "swgtemplate".into(),
        suspended: config.data_dir.join("suspended"),
        app_snapshot_dir: config.data_dir.join("app-snapshots"),
        image_template_dir: config.data_dir.join("image-templates"),
        image_templates: config.image_templates,
        online_grow: config
            .online_grow
            .unwrap_or(kind == crate::host::HostKind::Hardware),
        image_template_ttl: std::time::Duration::from_secs(config.image_template_ttl),
    })
}

/// Runs the agent until killed.
pub async fn run(config: Config) -> Result<()> {
    let boot = match config.boot.as_str() {
        "warm" => BootMode::Warm,
        "cold" => BootMode::Cold,
        other => bail!("boot = {other:?}: use \"warm\" or \"cold\""),
    };
    harden_process();
    let platform = Arc::new(platform(&config).await?);
    let db = config.data_dir.join("agent.redb");
    let store = Arc::new(Store::open(&db)?);
    private_file(&db).with_context(|| format!("cannot make {} root-only", db.display()))?;
    crate::fault::check_configured().map_err(anyhow::Error::msg)?;
    let vault = Vault::open_or_create(&config.secrets_key)?;
    let endpoints = Endpoints::new(config.publish_address);
    let config_exec = ExecutorConfig {
        mode: boot,
        max_provisions: config.max_provisions,
        deadlines: Deadlines::for_platform(&*platform, boot),
    };
    let exec = Arc::new(Executor::new(
        platform,
        store,
        Arc::new(endpoints),
        vault,
        config_exec,
    ));
    exec.recover().await?;
    let socket = config.api_socket();
    info!(socket = %socket.display(), ?boot, max_provisions = config.max_provisions, "agent running");
    let state = Arc::new(AgentService {
        exec: exec.clone(),
        overcommit: crate::admission::Overcommit {
            memory: config.memory_overcommit,
            disk: config.disk_overcommit,
        },
    });
    let consoles = exec.platform.clone();
    tokio::spawn(async move {
        loop {
            consoles
                .vmm
                .enforce_console_caps(crate::vmm::console::DEFAULT_CAP)
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    tokio::spawn(exec.run(Duration::from_secs(5)));
    if let Some(addr) = config.api_tcp {
        let token = crate::vault::api_token(&config.api_token_file)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on api_tcp {addr}"))?;
        info!(%addr, token_file = %config.api_token_file.display(), "API on TCP (bearer token)");
        let tcp_state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = api::serve_tcp(listener, token, tcp_state).await {
                tracing::error!(error = %e, "TCP API stopped");
            }
        });
    }
    api::serve(Path::new(&socket), state)
        .await
        .with_context(|| format!("serving the API on {}", socket.display()))
}
