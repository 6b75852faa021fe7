//! The agent's configuration: built-in defaults, then `/etc/shellwego/agent.toml` (or the
//! file named by `SHELLWEGO_CONFIG`), then `SHELLWEGO_*` environment variables.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the agent keeps things and which host resources it uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Durable state: database, app disks, snapshots. `SHELLWEGO_DATA_DIR`.
    pub data_dir: PathBuf,
    /// Runtime state of VMs: API sockets, consoles. `SHELLWEGO_RUN_DIR`.
    pub run_dir: PathBuf,
    /// The firecracker binary; a bare name is looked up on PATH. `SHELLWEGO_FIRECRACKER`.
    pub firecracker: PathBuf,
    /// The guest kernel (uncompressed vmlinux). `SHELLWEGO_KERNEL`.
    pub kernel: PathBuf,
    /// The ZFS pool that holds images and app disks. `SHELLWEGO_POOL`.
    pub pool: String,
    /// Bridge the VMs' TAPs join. `SHELLWEGO_BRIDGE`.
    pub bridge: String,
    /// Run each firecracker under Firecracker's jailer: its own chroot, unprivileged uid,
    /// PID namespace and cgroup (the default). `false` is an opt-out for hosts that cannot
    /// jail, which `doctor` warns about. `SHELLWEGO_JAILER=0`.
    pub jailer: bool,
    /// The jailer binary; a bare name is looked up on PATH.
    pub jailer_binary: PathBuf,
    /// Where the jailer makes each VM's chroot (default: `<run_dir>/jail`).
    pub chroot_base: Option<PathBuf>,
    /// The guest init binary (static). `SHELLWEGO_GUEST_INIT`.
    pub guest_init: PathBuf,
    /// Registries (`host:port`) spoken to over plain HTTP. `SHELLWEGO_INSECURE_REGISTRIES`
    /// (comma-separated).
    pub insecure_registries: Vec<String>,
    /// "warm" (restore a pre-booted template; the default) or "cold" (boot the kernel).
    /// `SHELLWEGO_BOOT`.
    pub boot: String,
    /// Where pre-booted templates are kept (default: `<data_dir>/templates`). They hold no
    /// app data, so hosts or test runs with the same kernel, init and firecracker may share
    /// them. `SHELLWEGO_TEMPLATE_DIR`.
    pub template_dir: Option<PathBuf>,
    /// Also serve the API on this TCP address (e.g. "127.0.0.1:7070"); requests then need
    /// the bearer token from `api_token_file`. Off by default. `SHELLWEGO_API_TCP`.
    pub api_tcp: Option<std::net::SocketAddr>,
    /// The TCP API's bearer token, created (0600, random) on first use.
    /// `SHELLWEGO_API_TOKEN_FILE`.
    pub api_token_file: PathBuf,
    /// The key that seals secret values in the database: 32 random bytes, created on
    /// first start (mode 0600). Keep it off the data dir's backups. `SHELLWEGO_SECRETS_KEY`.
    pub secrets_key: PathBuf,
    /// The address apps' published ports (`[[ports]] host = N`) listen on.
    /// `SHELLWEGO_PUBLISH_ADDRESS`.
    pub publish_address: std::net::IpAddr,
    /// Uncompressed bytes one image may unpack to (a zip bomb stops here).
    /// `SHELLWEGO_IMAGE_MAX_BYTES`.
    pub image_max_bytes: u64,
    /// Files, directories and links one image may have. `SHELLWEGO_IMAGE_MAX_ENTRIES`.
    pub image_max_entries: u64,
    /// Percent of the host's memory (less 512 MiB for the host) that the apps' VMs may be
    /// given together; an app that would pass it is refused at `apply`.
    /// `SHELLWEGO_MEMORY_OVERCOMMIT`.
    pub memory_overcommit: u32,
    /// Percent of the pool's size that the apps' disks may add up to (disks are thin
    /// clones, so more than 100 is reasonable). `SHELLWEGO_DISK_OVERCOMMIT`.
    pub disk_overcommit: u32,
    /// VMs built at once (pull, disk, network, start); further provisions wait their
    /// turn in arrival order. Removals, drains and health checks never wait for them.
    /// Default: twice the host's cores, 2 to 16. `SHELLWEGO_MAX_PROVISIONS`.
    pub max_provisions: usize,
    /// Seconds an image template no VM uses is kept before the orphan sweep deletes it
    /// (default an hour). `SHELLWEGO_IMAGE_TEMPLATE_TTL`.
    pub image_template_ttl: u64,
    /// Warm starts build and use image templates (the default); `false` starts every VM
    /// from the generic template. `SHELLWEGO_IMAGE_TEMPLATES=0`.
    pub image_templates: bool,
    /// A VM whose disk is larger than its image template's grows it online (`true`), or
    /// gets an image template of its own disk size (`false`). Default by host kind:
    /// online on hardware KVM; a template per size on emulated hosts, where the guest's
    /// online resize costs about 20 s per GiB and a template build 3 s.
    /// `SHELLWEGO_ONLINE_GROW=1|0`.
    pub online_grow: Option<bool>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/shellwego"),
            run_dir: PathBuf::from("/run/shellwego"),
            firecracker: PathBuf::from("firecracker"),
            kernel: PathBuf::from("/var/lib/shellwego/kernel/vmlinux"),
            pool: "shellwego".to_string(),
            bridge: "swg-br0".to_string(),
            jailer: true,
            jailer_binary: PathBuf::from("jailer"),
            chroot_base: None,
            guest_init: PathBuf::from("/usr/local/lib/shellwego/shellwego-init"),
            insecure_registries: Vec::new(),
            boot: "warm".to_string(),
            template_dir: None,
            api_tcp: None,
            api_token_file: PathBuf::from("/etc/shellwego/api.token"),
            secrets_key: PathBuf::from("/etc/shellwego/secrets.key"),
            publish_address: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            image_max_bytes: 2 << 30,
            image_max_entries: 500_000,
            memory_overcommit: 100,
            disk_overcommit: 400,
            max_provisions: crate::reconciler::executor::default_max_provisions(),
            image_template_ttl: 3600,
            image_templates: true,
            online_grow: None,
        }
    }
}

/// The default configuration file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/shellwego/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{var}={value:?}: {expected}")]
    Env {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
}

impl Config {
    /// The agent's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    /// Where the jails are made.
    pub fn chroot_base(&self) -> PathBuf {
        self.chroot_base
            .clone()
            .unwrap_or_else(|| self.run_dir.join("jail"))
    }

    /// Where templates are kept.
    pub fn templates(&self) -> PathBuf {
        self.template_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("templates"))
    }

    /// Loads the configuration. A missing default file is fine; a missing file that was
    /// named explicitly is an error.
    pub fn load() -> Result<Config, ConfigError> {
        let (path, explicit) = match std::env::var_os("SHELLWEGO_CONFIG") {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => Config::from_toml(&path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Config::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        config.apply_env(|k| std::env::var_os(k))?;
        Ok(config)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Overrides fields from `SHELLWEGO_*` variables, read through `get`.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(), ConfigError> {
        let path = |k: &str, field: &mut PathBuf| {
            if let Some(v) = get(k).filter(|v| !v.is_empty()) {
                *field = PathBuf::from(v);
            }
        };
        path("SHELLWEGO_DATA_DIR", &mut self.data_dir);
        path("SHELLWEGO_RUN_DIR", &mut self.run_dir);
        path("SHELLWEGO_FIRECRACKER", &mut self.firecracker);
        path("SHELLWEGO_KERNEL", &mut self.kernel);
        let string = |k: &str, field: &mut String| {
            if let Some(v) = get(k)
                .and_then(|v| v.into_string().ok())
                .filter(|v| !v.is_empty())
            {
                *field = v;
            }
        };
        string("SHELLWEGO_POOL", &mut self.pool);
        string("SHELLWEGO_BRIDGE", &mut self.bridge);
        path("SHELLWEGO_GUEST_INIT", &mut self.guest_init);
        path("SHELLWEGO_SECRETS_KEY", &mut self.secrets_key);
        path("SHELLWEGO_API_TOKEN_FILE", &mut self.api_token_file);
        if let Some(addr) = parse_env(
            &get,
            "SHELLWEGO_API_TCP",
            "expected an address like 127.0.0.1:7070",
        )? {
            self.api_tcp = Some(addr);
        }
        if let Some(v) = get("SHELLWEGO_TEMPLATE_DIR").filter(|v| !v.is_empty()) {
            self.template_dir = Some(PathBuf::from(v));
        }
        if let Some(addr) = parse_env(&get, "SHELLWEGO_PUBLISH_ADDRESS", "expected an IP address")?
        {
            self.publish_address = addr;
        }
        string("SHELLWEGO_BOOT", &mut self.boot);
        let number = "expected a whole number";
        if let Some(v) = parse_env(&get, "SHELLWEGO_IMAGE_MAX_BYTES", number)? {
            self.image_max_bytes = v;
        }
        if let Some(v) = parse_env(&get, "SHELLWEGO_IMAGE_MAX_ENTRIES", number)? {
            self.image_max_entries = v;
        }
        if let Some(v) = parse_env(&get, "SHELLWEGO_MEMORY_OVERCOMMIT", number)? {
            self.memory_overcommit = v;
        }
        if let Some(v) = parse_env(&get, "SHELLWEGO_DISK_OVERCOMMIT", number)? {
            self.disk_overcommit = v;
        }
        if let Some(v) = parse_env(&get, "SHELLWEGO_MAX_PROVISIONS", number)? {
            self.max_provisions = v;
        }
        if let Some(v) = parse_env(&get, "SHELLWEGO_IMAGE_TEMPLATE_TTL", number)? {
            self.image_template_ttl = v;
        }
        if let Some(v) = get("SHELLWEGO_INSECURE_REGISTRIES").and_then(|v| v.into_string().ok()) {
            self.insecure_registries = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
        let mut online_grow = self.online_grow.unwrap_or_default();
        let online_grow_set = get("SHELLWEGO_ONLINE_GROW").is_some_and(|v| !v.is_empty());
        for (var, flag) in [
            ("SHELLWEGO_ONLINE_GROW", &mut online_grow),
            ("SHELLWEGO_IMAGE_TEMPLATES", &mut self.image_templates),
            ("SHELLWEGO_JAILER", &mut self.jailer),
        ] {
            if let Some(v) = get(var).filter(|v| !v.is_empty()) {
                *flag = match v.to_str() {
                    Some("1" | "true" | "yes") => true,
                    Some("0" | "false" | "no") => false,
                    _ => {
                        return Err(ConfigError::Env {
                            var,
                            value: v.to_string_lossy().into_owned(),
                            expected: "expected 1 or 0",
                        })
                    }
                };
            }
        }
        if online_grow_set {
            self.online_grow = Some(online_grow);
        }
        Ok(())
    }
}

/// A `SHELLWEGO_*` variable parsed as `T`; unset or empty is `None`.
fn parse_env<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<std::ffi::OsString>,
    var: &'static str,
    expected: &'static str,
) -> Result<Option<T>, ConfigError> {
    get(var)
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
        .map(|value| {
            value.parse().map_err(|_| ConfigError::Env {
                var,
                value: value.clone(),
                expected,
            })
        })
        .transpose()
}

/// Finds an executable (`which`): a path with a '/' is taken as is, a bare name is
/// searched on PATH.
pub fn find_executable(name: &Path) -> Option<PathBuf> {
    which::which(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env() {
        let mut c = Config::from_toml(Path::new("x"), "pool = \"tank\"\n").unwrap();
        assert_eq!(c.pool, "tank");
        assert_eq!(c.bridge, "swg-br0");
        c.apply_env(|k| (k == "SHELLWEGO_POOL").then(|| "other".into()))
            .unwrap();
        assert_eq!(c.pool, "other");
        assert_eq!(c.online_grow, None, "by host kind unless set");
        c.apply_env(|k| (k == "SHELLWEGO_ONLINE_GROW").then(|| "1".into()))
            .unwrap();
        assert_eq!(c.online_grow, Some(true));
        c.apply_env(|k| (k == "SHELLWEGO_ONLINE_GROW").then(|| "0".into()))
            .unwrap();
        assert_eq!(c.online_grow, Some(false));
        let bad = c
            .apply_env(|k| (k == "SHELLWEGO_ONLINE_GROW").then(|| "maybe".into()))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("SHELLWEGO_ONLINE_GROW"), "{bad}");
        let bad = c
            .apply_env(|k| (k == "SHELLWEGO_API_TCP").then(|| "nowhere".into()))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("SHELLWEGO_API_TCP"), "{bad}");
        let err = Config::from_toml(Path::new("x"), "pol = 1").unwrap_err();
        assert!(err.to_string().contains("pol"), "{err}");
    }

    #[test]
    fn executables_by_name_or_path() {
        use std::os::unix::fs::PermissionsExt;
        let sh = find_executable(Path::new("sh")).expect("sh on PATH");
        assert!(sh.is_absolute(), "{}", sh.display());
        assert_eq!(find_executable(&sh), Some(sh.clone()));
        assert_eq!(find_executable(Path::new("no-such-program-swg")), None);
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_executable(&plain), None, "not executable");
        assert_eq!(find_executable(dir.path()), None, "a directory");
    }
}
