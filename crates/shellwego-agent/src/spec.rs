//! The app spec file (TOML, in the spirit of fly.toml) and the validated app it describes.
//!
//! ```toml
//! name = "hello"
//! image = "alpine:3.23"
//! count = 2                  # optional; replicas behind the endpoint (1 to 32, default 1)
//!
//! [scale]                    # optional
//! idle = "5m"                # scale to zero: suspend the VMs after this long without a
//!                            # connection to the endpoint; the next connection wakes them
//!
//! [snapshot]                 # optional
//! enabled = true             # start replicas and replacements from a snapshot of a
//!                            # healthy VM of the version instead of booting them
//! after_restore = "SIGUSR2"  # a signal the app gets in each VM started that way
//!
//! [run]                      # optional; overrides the image's own config
//! cmd = ["httpd", "-f", "-p", "8080"]
//!
//! [resources]
//! cpu = "500m"
//! memory = "128Mi"
//! disk = "1Gi"
//!
//! [env]
//! GREETING = "hi"
//!
//! [secrets]
//! API_KEY = { env = "API_KEY" }        # or { file = "/path" } or { value = "..." }
//!
//! [[ports]]
//! guest = 8080
//! host = 18080                          # the app's stable endpoint on the host
//! protocol = "http"                     # or "tcp" (default); see `Protocol`
//!
//! [health]
//! http = "/"                            # or: tcp = true
//! port = 8080
//! interval = "2s"
//! timeout = "1s"
//! retries = 3
//! grace = "120s"
//!
//! [bandwidth]
//! download = "50Mbit"                   # to the VM (TAP egress)
//! upload = "50Mbit"                     # from the VM (TAP ingress)
//!
//! [network]                             # what the VM may reach beyond the host
//! egress = "internet"                   # default; or "none": nothing but `allow`
//! allow = ["10.1.2.0/24:5432", "192.168.1.10"]   # private destinations it may reach
//! ```
//!
//! `[network]`: every VM is fenced (see `shellwego_network::fence`). It sends only with
//! its own MAC and IP, reaches VMs of its own app but no other app's, and opens no
//! connection to the host itself (any address, any port; the host's own connections to
//! it, health checks and the endpoint proxy, work). Beyond the host, `egress =
//! "internet"` reaches public addresses through NAT but no private ones (RFC 1918,
//! CGNAT 100.64/10, 192.0.0/24, 198.18/15); `"none"` reaches nothing. `allow` opens
//! networks (`A.B.C.D[/N]`, at most a /8) or one port of them (`:PORT`, TCP and UDP),
//! at most 32 entries; loopback, link-local (with the metadata service
//! 169.254.169.254), multicast and reserved addresses can never be allowed. A changed
//! `[network]` is a new version of the app: its VMs are replaced blue-green, and the new
//! ones start with the new fence.
//!
//! Parsing is strict: unknown keys are errors, and every error names the field and value.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shellwego_network::fence::policy::MAX_ALLOW;
use shellwego_network::fence::{AllowListError, EgressPolicy};

use crate::resources::{FieldError, ResourceSpec};
use crate::units;

/// An app as the user wants it to run. It is also the stored form of the spec (JSON in
/// the agent's database): that form decodes leniently, unknown fields ignored and missing
/// ones defaulted where marked, so an agent reads specs stored by an older or a newer
/// one. The user's TOML is parsed strictly through the `Raw*` structs instead. See
/// [`DesiredApp::spec_hash`] for how to add a field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredApp {
    pub name: String,
    pub image: String,
    pub run: RunOverride,
    pub resources: ResourceSpec,
    pub env: BTreeMap<String, String>,
    /// Where each secret's value comes from; values themselves are resolved at apply time
    /// and never stored in the spec.
    pub secrets: BTreeMap<String, SecretSource>,
    pub ports: Vec<PortSpec>,
    pub health: Option<HealthCheck>,
    pub bandwidth: Bandwidth,
    /// What the VMs may reach beyond the host. Left out of the stored form (and so of the
    /// version hash) when it is the default, so apps deployed before it existed keep
    /// their versions.
    #[serde(default, skip_serializing_if = "EgressPolicy::is_default")]
    pub network: EgressPolicy,
    /// How many VMs (replicas) of the version run behind the app's endpoint. Left out of
    /// the stored form when it is 1, and never part of the version: scaling adds or
    /// retires replicas of the running version rather than replacing them.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u32,
    /// Scale to zero. Left out of the stored form when off, and never part of the
    /// version: suspending and waking keep the VMs of the running version.
    #[serde(default, skip_serializing_if = "Scale::is_default")]
    pub scale: Scale,
    /// Starting new VMs from the app's snapshot (`[snapshot]`). Not part of the version.
    #[serde(default, skip_serializing_if = "SnapshotPolicy::is_default")]
    pub snapshot: SnapshotPolicy,
    /// A keyed digest of the secret values (`Vault::fingerprint`), set when the app is
    /// applied with secrets: part of the version, so new values replace the VMs (and the
    /// app snapshot) that hold the old ones in memory. None without secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_version: Option<String>,
}

/// Whether new VMs of a healthy version start from its snapshot (`[snapshot]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPolicy {
    /// Once a VM of the version is healthy, snapshot it (memory, state, disk) and start
    /// its replicas and replacements from that snapshot instead of booting.
    #[serde(default)]
    pub enabled: bool,
    /// A signal the app gets in each VM started from the snapshot, once that VM has its
    /// own identity (its after-restore hook), as a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_restore: Option<i32>,
}

impl SnapshotPolicy {
    pub fn is_default(&self) -> bool {
        *self == SnapshotPolicy::default()
    }
}

/// Signals an app may ask for after a restore, by name.
const RESTORE_SIGNALS: [(&str, i32); 6] = [
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGTERM", 15),
    ("SIGWINCH", 28),
];

/// When the app's VMs are suspended for want of traffic (`[scale]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scale {
    /// Suspend after the endpoint had no connection for this long; `None`: never.
    #[serde(default, with = "opt_millis")]
    pub idle: Option<Duration>,
}

impl Scale {
    pub fn is_default(&self) -> bool {
        *self == Scale::default()
    }
}

/// `Option<Duration>` stored as milliseconds.
mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Overrides of the image's config; `None` keeps the image's value. Lenient when decoded
/// (it is stored); the spec's `[run]` is parsed strictly as `RawRun`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOverride {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// Where a secret's value is read from when the spec is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretSource {
    /// The environment variable of that name in the `apply` process.
    Env(String),
    /// The contents of a file (a trailing newline is dropped).
    File(PathBuf),
    /// Given inline in the spec.
    Value(String),
    /// Was given inline; the value itself travels with the others (sealed at rest) and is
    /// not kept in the stored spec.
    Inline,
}

/// A guest port, optionally published on the host as the app's stable endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub guest: u16,
    pub host: Option<u16>,
    /// Left out of the stored form when it is the default, so apps deployed before it
    /// existed keep their versions; never part of the version (see `spec_hash`).
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// Who speaks first on a published port, which decides when the endpoint connects to the
/// guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any TCP protocol: the guest is connected as soon as a client connects, so a server
    /// that speaks first (SMTP, MySQL, SSH) sends its greeting.
    #[default]
    Tcp,
    /// The client speaks first (HTTP, also TLS): the guest is connected only when the
    /// client's first bytes arrive, so connections that never send cost it nothing.
    Http,
}

impl Protocol {
    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }

    fn parse(field: &str, text: &str) -> Result<Protocol, SpecError> {
        match text {
            "tcp" => Ok(Protocol::Tcp),
            "http" => Ok(Protocol::Http),
            _ => Err(invalid(field, text, "must be \"tcp\" or \"http\"")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
        })
    }
}

/// What the health check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    /// An HTTP GET of this path must answer 2xx or 3xx.
    Http { path: String },
    /// A TCP connection must be accepted.
    Tcp,
}

/// The host-side health check of an app's VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures after which a running VM counts as unhealthy.
    pub retries: u32,
    /// How long a new VM may take to become healthy before it counts as failed.
    pub grace: Duration,
}

/// Per-VM bandwidth limits in bits per second; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bandwidth {
    pub download_bps: Option<u64>,
    pub upload_bps: Option<u64>,
}

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec is not valid TOML or has a wrong key or type: {0}")]
    Syntax(String),
    #[error("{field}: {value:?} {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Quantity(#[from] FieldError),
}

pub(crate) fn invalid(
    field: impl Into<String>,
    value: impl Into<String>,
    reason: &str,
) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        value: value.into(),
        reason: reason.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    image: String,
    #[serde(default)]
    run: RawRun,
    #[serde(default)]
    resources: RawResources,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: BTreeMap<String, RawSecret>,
    #[serde(default)]
    ports: Vec<RawPort>,
    health: Option<RawHealth>,
    #[serde(default)]
    bandwidth: RawBandwidth,
    #[serde(default)]
    network: RawNetwork,
    count: Option<i64>,
    #[serde(default)]
    scale: RawScale,
    #[serde(default)]
    snapshot: RawSnapshot,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSnapshot {
    #[serde(default)]
    enabled: bool,
    after_restore: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScale {
    idle: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRun {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    workdir: Option<String>,
    user: Option<String>,
}

impl From<RawRun> for RunOverride {
    fn from(raw: RawRun) -> RunOverride {
        RunOverride {
            entrypoint: raw.entrypoint,
            cmd: raw.cmd,
            workdir: raw.workdir,
            user: raw.user,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpu: Option<String>,
    memory: Option<String>,
    disk: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    env: Option<String>,
    file: Option<PathBuf>,
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    guest: i64,
    host: Option<i64>,
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    http: Option<String>,
    tcp: Option<bool>,
    port: i64,
    interval: Option<String>,
    timeout: Option<String>,
    retries: Option<i64>,
    grace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBandwidth {
    download: Option<String>,
    upload: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    egress: Option<String>,
    allow: Option<Vec<String>>,
}

/// Largest app name: it becomes part of hostnames and labels.
const MAX_NAME_LEN: usize = 32;

fn check_name(name: &str) -> Result<(), SpecError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let starts = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || !starts || name.ends_with('-') {
        return Err(invalid(
            "name",
            name,
            "must be 1-32 characters of a-z, 0-9 and '-', start with a letter and not end with '-'",
        ));
    }
    Ok(())
}

fn check_image(image: &str) -> Result<(), SpecError> {
    if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "image",
            image,
            "must be an image reference such as \"alpine:3.23\" or \"host:5000/name@sha256:...\"",
        ));
    }
    Ok(())
}

fn check_var_name(field: &str, name: &str) -> Result<(), SpecError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid(
            format!("{field}.{name}"),
            name,
            "is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
        ));
    }
    Ok(())
}

fn port(field: &str, value: i64) -> Result<u16, SpecError> {
    match u16::try_from(value) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(
            field,
            value.to_string(),
            "must be a port from 1 to 65535",
        )),
    }
}

fn duration(field: &str, text: Option<&str>, default: Duration) -> Result<Duration, SpecError> {
    match text {
        None => Ok(default),
        Some(t) => {
            units::parse_duration(t).map_err(|e| SpecError::Quantity(FieldError::new(field, e)))
        }
    }
}

fn bitrate(field: &str, text: Option<&str>) -> Result<Option<u64>, SpecError> {
    text.map(|t| {
        units::parse_bitrate(t).map_err(|e| SpecError::Quantity(FieldError::new(field, e)))
    })
    .transpose()
}

fn secret(name: &str, raw: RawSecret) -> Result<SecretSource, SpecError> {
    let field = format!("secrets.{name}");
    match (raw.env, raw.file, raw.value) {
        (Some(v), None, None) if !v.is_empty() => Ok(SecretSource::Env(v)),
        (None, Some(f), None) if f.is_absolute() => Ok(SecretSource::File(f)),
        (None, Some(f), None) => Err(invalid(
            format!("{field}.file"),
            f.display().to_string(),
            "must be an absolute path",
        )),
        (None, None, Some(v)) => Ok(SecretSource::Value(v)),
        _ => Err(invalid(
            field,
            "",
            "must have exactly one of env = \"VAR\", file = \"/path\" or value = \"...\"",
        )),
    }
}

fn health(raw: RawHealth) -> Result<HealthCheck, SpecError> {
    let probe = match (raw.http, raw.tcp) {
        (Some(path), None | Some(false)) if path.starts_with('/') => Probe::Http { path },
        (Some(path), None | Some(false)) => {
            return Err(invalid(
                "health.http",
                path,
                "must be a path starting with '/'",
            ))
        }
        (None, Some(true)) => Probe::Tcp,
        _ => {
            return Err(invalid(
                "health",
                "",
                "must have exactly one of http = \"/path\" or tcp = true",
            ))
        }
    };
    let retries = match raw.retries {
        None => 3,
        Some(r) => u32::try_from(r)
            .ok()
            .filter(|r| *r >= 1)
            .ok_or_else(|| invalid("health.retries", r.to_string(), "must be at least 1"))?,
    };
    let interval = duration(
        "health.interval",
        raw.interval.as_deref(),
        Duration::from_secs(2),
    )?;
    let timeout = duration(
        "health.timeout",
        raw.timeout.as_deref(),
        Duration::from_secs(1),
    )?;
    if timeout > interval {
        return Err(invalid(
            "health.timeout",
            format!("{timeout:?}"),
            "must not exceed health.interval",
        ));
    }
    Ok(HealthCheck {
        probe,
        port: port("health.port", raw.port)?,
        interval,
        timeout,
        retries,
        grace: duration(
            "health.grace",
            raw.grace.as_deref(),
            Duration::from_secs(120),
        )?,
    })
}

fn network(raw: RawNetwork) -> Result<EgressPolicy, SpecError> {
    let egress = match raw.egress {
        None => Default::default(),
        Some(text) => text
            .parse()
            .map_err(|reason: String| invalid("network.egress", &text, &reason))?,
    };
    let allow = EgressPolicy::parse_allow(raw.allow.as_deref().unwrap_or_default()).map_err(
        |e| match e {
            AllowListError::TooMany { count } => invalid(
                "network.allow",
                format!("{count} entries"),
                &format!("has more than {MAX_ALLOW} entries"),
            ),
            AllowListError::Entry {
                index,
                entry,
                reason,
            } => invalid(format!("network.allow[{index}]"), entry, &reason),
        },
    )?;
    Ok(EgressPolicy { egress, allow })
}

impl DesiredApp {
    /// Parses and validates a spec file's text.
    pub fn from_toml(text: &str) -> Result<DesiredApp, SpecError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
        check_name(&raw.name)?;
        check_image(&raw.image)?;
        let resources = ResourceSpec::parse(
            "resources",
            raw.resources.cpu.as_deref(),
            raw.resources.memory.as_deref(),
            raw.resources.disk.as_deref(),
        )?;
        for (field, list) in [
            ("run.entrypoint", &raw.run.entrypoint),
            ("run.cmd", &raw.run.cmd),
        ] {
            if let Some(argv) = list {
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err(invalid(
                        field,
                        format!("{argv:?}"),
                        "must not contain NUL bytes",
                    ));
                }
            }
        }
        if raw.run.entrypoint.as_ref().is_some_and(|e| e.is_empty()) {
            return Err(invalid(
                "run.entrypoint",
                "[]",
                "must not be empty when given",
            ));
        }
        for (key, value) in &raw.env {
            check_var_name("env", key)?;
            if value.contains('\0') {
                return Err(invalid(
                    format!("env.{key}"),
                    value,
                    "must not contain NUL bytes",
                ));
            }
        }
        let mut secrets = BTreeMap::new();
        for (key, raw_secret) in raw.secrets {
            check_var_name("secrets", &key)?;
            if raw.env.contains_key(&key) {
                return Err(invalid(
                    format!("secrets.{key}"),
                    &key,
                    "is also set in [env]; a name is either a secret or plain env",
                ));
            }
            let source = secret(&key, raw_secret)?;
            secrets.insert(key, source);
        }
        let mut ports = Vec::new();
        for (i, p) in raw.ports.iter().enumerate() {
            let guest = port(&format!("ports[{i}].guest"), p.guest)?;
            let host = p
                .host
                .map(|h| port(&format!("ports[{i}].host"), h))
                .transpose()?;
            if ports.iter().any(|q: &PortSpec| q.guest == guest) {
                return Err(invalid(
                    format!("ports[{i}].guest"),
                    guest.to_string(),
                    "is listed twice",
                ));
            }
            if host.is_some() && ports.iter().any(|q: &PortSpec| q.host == host) {
                return Err(invalid(
                    format!("ports[{i}].host"),
                    p.host.unwrap_or_default().to_string(),
                    "is published twice",
                ));
            }
            let protocol = match (&p.protocol, host) {
                (None, _) => Protocol::Tcp,
                (Some(text), Some(_)) => Protocol::parse(&format!("ports[{i}].protocol"), text)?,
                (Some(text), None) => {
                    return Err(invalid(
                        format!("ports[{i}].protocol"),
                        text,
                        "applies only to a published port (one with host = N)",
                    ))
                }
            };
            ports.push(PortSpec {
                guest,
                host,
                protocol,
            });
        }
        let health = raw.health.map(health).transpose()?;
        let bandwidth = Bandwidth {
            download_bps: bitrate("bandwidth.download", raw.bandwidth.download.as_deref())?,
            upload_bps: bitrate("bandwidth.upload", raw.bandwidth.upload.as_deref())?,
        };
        let network = network(raw.network)?;
        let count = match raw.count {
            None => 1,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=crate::bounds::MAX_COUNT).contains(n))
                .ok_or_else(|| {
                    invalid(
                        "count",
                        n.to_string(),
                        &format!("must be 1 to {}", crate::bounds::MAX_COUNT),
                    )
                })?,
        };
        let scale = Scale {
            idle: raw
                .scale
                .idle
                .as_deref()
                .map(|t| duration("scale.idle", Some(t), Duration::ZERO))
                .transpose()?,
        };
        let after_restore = raw
            .snapshot
            .after_restore
            .map(|name| {
                RESTORE_SIGNALS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, number)| *number)
                    .ok_or_else(|| {
                        let names: Vec<&str> = RESTORE_SIGNALS.iter().map(|(n, _)| *n).collect();
                        invalid(
                            "snapshot.after_restore",
                            &name,
                            &format!("must be one of {}", names.join(", ")),
                        )
                    })
            })
            .transpose()?;
        let snapshot = SnapshotPolicy {
            enabled: raw.snapshot.enabled,
            after_restore,
        };
        let app = DesiredApp {
            name: raw.name,
            image: raw.image,
            run: raw.run.into(),
            resources,
            env: raw.env,
            secrets,
            ports,
            health,
            bandwidth,
            network,
            count,
            scale,
            snapshot,
            secrets_version: None,
        };
        crate::bounds::check(&app)?;
        Ok(app)
    }

    /// The spec as the agent stores it: inline secret values removed (they are delivered
    /// and sealed like every other secret value, never kept or hashed in the clear).
    pub fn without_secret_values(&self) -> DesiredApp {
        let mut app = self.clone();
        for source in app.secrets.values_mut() {
            if matches!(source, SecretSource::Value(_)) {
                *source = SecretSource::Inline;
            }
        }
        app
    }

    /// A short, stable hash of everything in the spec but secret values and ports'
    /// protocols: two specs that differ in any other field (image, resources, env, secret
    /// sources, ...) have different versions. A port's protocol only changes how the
    /// host's endpoint connects to the VM, so changing it re-publishes the port in place
    /// rather than replacing the VM.
    ///
    /// It hashes the stored form's JSON, so it is the app's version everywhere: a change
    /// of that form redeploys every app. Hence the rule for a field added to `DesiredApp`
    /// or to any struct in it (`network` and `PortSpec::protocol` follow it):
    ///
    /// - mark it `#[serde(default, skip_serializing_if = "...")]`, the predicate being
    ///   exactly "is the default": a spec stored before the field existed decodes with
    ///   the default, and an app that leaves it at its default serializes, and hashes,
    ///   byte for byte as before, so it keeps its version;
    /// - never add `skip_serializing_if` to, rename, reorder or retype an existing field,
    ///   and never give a struct in it `deny_unknown_fields` (that is for the `Raw*`
    ///   structs the user's TOML is parsed with);
    /// - a field whose change should not replace VMs (like a port's protocol) is reset to
    ///   its default in `hashed_form`.
    ///
    /// `tc_u14_spec_hash_keeps_versions_when_a_defaulted_field_is_added` and the release
    /// fixture (`tests/fixtures/agent-db-v1.json`) check this.
    pub fn spec_hash(&self) -> String {
        hash_of(&self.hashed_form())
    }

    /// The spec as `spec_hash` sees it: secret values removed, ports' protocols, the
    /// replica count, scale to zero and the snapshot policy reset.
    fn hashed_form(&self) -> DesiredApp {
        let mut app = self.without_secret_values();
        for port in &mut app.ports {
            port.protocol = Protocol::Tcp;
        }
        app.count = 1;
        app.scale = Scale::default();
        app.snapshot = SnapshotPolicy::default();
        app
    }
}

/// The first 6 bytes (hex) of the SHA-256 of `value`'s JSON. serde_json of BTreeMaps and
/// plain structs is deterministic: fields in declaration order, map keys sorted.
fn hash_of(value: &impl Serialize) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let digest = Sha256::digest(&json);
    hex::encode(&digest[..6])
}

impl DesiredApp {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FULL: &str = r#"
name = "hello"
image = "alpine:3.23"

[run]
cmd = ["httpd", "-f", "-p", "8080"]

[resources]
cpu = "500m"
memory = "128Mi"

[env]
GREETING = "hi"

[secrets]
API_KEY = { env = "API_KEY" }
TOKEN = { value = "t" }

[[ports]]
guest = 8080
host = 18080

[health]
http = "/"
port = 8080
interval = "2s"
timeout = "1s"

[bandwidth]
download = "50Mbit"
"#;

    #[test]
    fn full_spec_parses() {
        let app = DesiredApp::from_toml(FULL).expect("valid");
        assert_eq!(app.name, "hello");
        assert_eq!(app.resources.cpu_milli, 500);
        assert_eq!(app.resources.memory_bytes, 128 << 20);
        assert_eq!(app.secrets["API_KEY"], SecretSource::Env("API_KEY".into()));
        assert_eq!(
            app.ports,
            vec![PortSpec {
                guest: 8080,
                host: Some(18080),
                protocol: Protocol::Tcp,
            }]
        );
        let h = app.health.as_ref().unwrap();
        assert_eq!(h.probe, Probe::Http { path: "/".into() });
        assert_eq!(h.retries, 3);
        assert_eq!(app.bandwidth.download_bps, Some(50_000_000));
        assert_eq!(app.bandwidth.upload_bps, None);
        assert_eq!(app.run.cmd.as_ref().unwrap()[0], "httpd");
    }

    fn err_of(text: &str) -> String {
        DesiredApp::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_field_and_value() {
        let e = err_of("name = \"Hello_World\"\nimage = \"a\"");
        assert!(e.contains("name") && e.contains("Hello_World"), "{e}");
        let e = err_of("name = \"a\"\nimage = \"a\"\n[resources]\nmemory = \"12 parsecs\"");
        assert!(
            e.contains("resources.memory") && e.contains("12 parsecs"),
            "{e}"
        );
        let e = err_of("name = \"a\"\nimage = \"a\"\n[[ports]]\nguest = 70000");
        assert!(e.contains("ports[0].guest") && e.contains("70000"), "{e}");
        let e = err_of("name = \"a\"\nimage = \"a\"\n[env]\n\"1BAD\" = \"x\"");
        assert!(e.contains("env.1BAD"), "{e}");
        let e =
            err_of("name = \"a\"\nimage = \"a\"\n[secrets]\nK = { env = \"K\", value = \"v\" }");
        assert!(e.contains("secrets.K"), "{e}");
        let e = err_of("name = \"a\"\nimage = \"a\"\nimagee = \"typo\"");
        assert!(e.contains("imagee"), "{e}");
        let e = err_of("name = \"a\"\nimage = \"a\"\n[health]\nport = 80\nhttp = \"/\"\ntimeout = \"5s\"\ninterval = \"1s\"");
        assert!(e.contains("health.timeout"), "{e}");
        let e = err_of("name = \"a\"\nimage = \"a\"\n[bandwidth]\nupload = \"fast\"");
        assert!(e.contains("bandwidth.upload") && e.contains("fast"), "{e}");
        let e = err_of("name = \"a\"\nimage = \"has space\"");
        assert!(e.contains("image") && e.contains("has space"), "{e}");
        let e = err_of(
            "name = \"a\"\nimage = \"a\"\n[env]\nK = \"1\"\n[secrets]\nK = { value = \"2\" }",
        );
        assert!(e.contains("secrets.K"), "{e}");
    }

    #[test]
    fn spec_hash_tracks_every_change() {
        let a = DesiredApp::from_toml(FULL).unwrap();
        let mut b = a.clone();
        assert_eq!(a.spec_hash(), b.spec_hash());
        b.image = "alpine:3.22".into();
        assert_ne!(a.spec_hash(), b.spec_hash());
        let mut c = a.clone();
        c.env.insert("X".into(), "1".into());
        assert_ne!(a.spec_hash(), c.spec_hash());
    }

    #[test]
    fn tc_u15_replica_count_parses_is_bounded_and_is_not_part_of_the_version() {
        let spec = |extra: &str| format!("name = \"a\"\nimage = \"a\"\n{extra}");
        let one = DesiredApp::from_toml(&spec("")).unwrap();
        assert_eq!(one.count, 1);
        let three = DesiredApp::from_toml(&spec("count = 3")).unwrap();
        assert_eq!(three.count, 3);
        assert_eq!(
            one.spec_hash(),
            three.spec_hash(),
            "scaling keeps the version"
        );
        let stored = serde_json::to_string(&one).unwrap();
        assert!(
            !stored.contains("count"),
            "count = 1 is not stored: {stored}"
        );
        let back: DesiredApp =
            serde_json::from_str(&serde_json::to_string(&three).unwrap()).unwrap();
        assert_eq!(back.count, 3);
        for bad in ["0", "-1", "33"] {
            let e = err_of(&spec(&format!("count = {bad}")));
            assert!(
                e.contains("count") && e.contains(bad) && e.contains("1 to 32"),
                "{e}"
            );
        }
    }

    #[test]
    fn port_protocol_parses_strictly() {
        let spec = |port: &str| format!("name = \"a\"\nimage = \"a\"\n[[ports]]\n{port}");
        let app =
            DesiredApp::from_toml(&spec("guest = 80\nhost = 8080\nprotocol = \"http\"")).unwrap();
        assert_eq!(app.ports[0].protocol, Protocol::Http);
        let app =
            DesiredApp::from_toml(&spec("guest = 80\nhost = 8080\nprotocol = \"tcp\"")).unwrap();
        assert_eq!(app.ports[0].protocol, Protocol::Tcp);
        let app = DesiredApp::from_toml(&spec("guest = 80\nhost = 8080")).unwrap();
        assert_eq!(app.ports[0].protocol, Protocol::Tcp, "tcp is the default");

        let e = err_of(&spec("guest = 80\nhost = 8080\nprotocol = \"udp\""));
        assert!(e.contains("ports[0].protocol") && e.contains("udp"), "{e}");
        assert!(e.contains("\"tcp\" or \"http\""), "{e}");
        let e = err_of(&spec("guest = 80\nprotocol = \"http\""));
        assert!(
            e.contains("ports[0].protocol") && e.contains("published port"),
            "{e}"
        );
        let e = err_of(&spec("guest = 80\nhost = 8080\nprotocol = 1"));
        assert!(e.contains("protocol"), "{e}");
    }

    #[test]
    fn port_protocol_is_not_part_of_the_version_and_old_specs_keep_theirs() {
        let a = DesiredApp::from_toml(FULL).unwrap();
        let mut http = a.clone();
        http.ports[0].protocol = Protocol::Http;
        assert_eq!(
            a.spec_hash(),
            http.spec_hash(),
            "a protocol change re-publishes the port, it does not replace the VM"
        );
        assert_ne!(a, http, "but the stored spec records it");

        // The default is left out of the stored form: specs stored before the field
        // existed read back as tcp, and their versions do not change.
        let tcp = serde_json::to_string(&a.ports[0]).unwrap();
        assert_eq!(tcp, r#"{"guest":8080,"host":18080}"#);
        let old: PortSpec = serde_json::from_str(&tcp).unwrap();
        assert_eq!(old, a.ports[0]);
        let stored = serde_json::to_string(&http).unwrap();
        let back: DesiredApp = serde_json::from_str(&stored).unwrap();
        assert_eq!(back.ports[0].protocol, Protocol::Http);
    }

    #[test]
    fn network_section_parses_strictly() {
        let base = "name = \"a\"\nimage = \"a\"\n";
        let app = DesiredApp::from_toml(&format!(
            "{base}[network]\negress = \"none\"\nallow = [\"10.1.2.0/24:5432\", \"192.168.1.10\"]"
        ))
        .unwrap();
        assert_eq!(app.network.egress, shellwego_network::fence::Egress::None);
        assert_eq!(
            app.network
                .allow
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.1.2.0/24:5432", "192.168.1.10"]
        );
        let default = DesiredApp::from_toml(base).unwrap();
        assert!(default.network.is_default());
        for (section, field, value) in [
            ("egress = \"all\"", "network.egress", "all"),
            (
                "allow = [\"10.0.0.1\", \"10.1.2.5/24\"]",
                "network.allow[1]",
                "10.1.2.5/24",
            ),
            (
                "allow = [\"169.254.169.254\"]",
                "network.allow[0]",
                "169.254.169.254",
            ),
            ("allow = [\"0.0.0.0/0\"]", "network.allow[0]", "0.0.0.0/0"),
            (
                "allow = [\"10.0.0.1:99999\"]",
                "network.allow[0]",
                "10.0.0.1:99999",
            ),
            (
                "allow = [\"10.0.0.1\", \"10.0.0.1\"]",
                "network.allow[1]",
                "10.0.0.1",
            ),
            (
                "allow = [\"db.internal:5432\"]",
                "network.allow[0]",
                "db.internal:5432",
            ),
        ] {
            let e = err_of(&format!("{base}[network]\n{section}"));
            assert!(e.contains(field) && e.contains(value), "{section}: {e}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("\"10.0.{i}.1\"")).collect();
        let e = err_of(&format!("{base}[network]\nallow = [{}]", many.join(", ")));
        assert!(e.contains("network.allow") && e.contains("32"), "{e}");
        let e = err_of(&format!("{base}[network]\negres = \"none\""));
        assert!(e.contains("egres"), "{e}");
    }

    #[test]
    fn the_default_network_policy_leaves_versions_as_they_were() {
        let a = DesiredApp::from_toml(FULL).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        assert!(!json.contains("network"), "{json}");
        let explicit = DesiredApp::from_toml(&format!(
            "{FULL}\n[network]\negress = \"internet\"\nallow = []\n"
        ))
        .unwrap();
        assert_eq!(a.spec_hash(), explicit.spec_hash());
        let closed =
            DesiredApp::from_toml(&format!("{FULL}\n[network]\negress = \"none\"\n")).unwrap();
        assert_ne!(
            a.spec_hash(),
            closed.spec_hash(),
            "a changed policy is a new version"
        );
        let stored: DesiredApp =
            serde_json::from_str(&serde_json::to_string(&closed).unwrap()).unwrap();
        assert_eq!(stored, closed);
        let old: DesiredApp = serde_json::from_str(&json).unwrap();
        assert!(
            old.network.is_default(),
            "a stored spec from before [network] reads back"
        );
    }

    /// What the release before schema versioning stored for a minimal app, and its
    /// version (as in `tests/fixtures/agent-db-v1.json`).
    const V1_MINIMAL: &str = r#"{"name":"minimal","image":"alpine:3.23","run":{"entrypoint":null,"cmd":null,"workdir":null,"user":null},"resources":{"cpu_milli":1000,"memory_bytes":134217728,"disk_bytes":1073741824},"env":{},"secrets":{},"ports":[],"health":null,"bandwidth":{"download_bps":null,"upload_bps":null}}"#;
    const V1_MINIMAL_HASH: &str = "ba12b00d87e3";

    /// `DesiredApp` as it would be with one more field, added by the rule of `spec_hash`.
    #[derive(Debug, Serialize, Deserialize)]
    struct WithNewField {
        #[serde(flatten)]
        app: DesiredApp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        future: Option<String>,
    }

    #[test]
    fn tc_u14_spec_hash_keeps_versions_when_a_defaulted_field_is_added() {
        let minimal = DesiredApp::from_toml("name = \"minimal\"\nimage = \"alpine:3.23\"").unwrap();
        // The stored form of an app that uses no later field is byte for byte the old one.
        assert_eq!(serde_json::to_string(&minimal).unwrap(), V1_MINIMAL);
        assert_eq!(minimal.spec_hash(), V1_MINIMAL_HASH);

        for app in [minimal, DesiredApp::from_toml(FULL).unwrap()] {
            // A field added by the rule, at its default: the same bytes, the same version.
            let next = WithNewField {
                app: app.hashed_form(),
                future: None,
            };
            assert_eq!(
                serde_json::to_vec(&next).unwrap(),
                serde_json::to_vec(&app.hashed_form()).unwrap()
            );
            assert_eq!(hash_of(&next), app.spec_hash());
            // A spec stored before the field decodes with the default...
            let stored = serde_json::to_string(&app).unwrap();
            let read: WithNewField = serde_json::from_str(&stored).unwrap();
            assert_eq!((read.app, read.future), (app.clone(), None));
            // ...and one stored with the field set decodes in today's agent.
            let set = WithNewField {
                app: app.clone(),
                future: Some("x".into()),
            };
            let newer: DesiredApp =
                serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
            assert_eq!(newer, app);
            assert_ne!(
                hash_of(&set),
                app.spec_hash(),
                "a set field is a new version"
            );
        }
    }

    #[test]
    fn tc_u14_stored_spec_ignores_unknown_fields_at_every_level() {
        let app = DesiredApp::from_toml(&format!(
            "{FULL}\n[network]\negress = \"none\"\nallow = [\"10.0.0.1\"]\n"
        ))
        .unwrap()
        .without_secret_values();
        let mut v = serde_json::to_value(&app).unwrap();
        let extra = || serde_json::json!({ "added": [1, 2] });
        v["added_later"] = extra();
        for section in ["run", "resources", "health", "bandwidth", "network"] {
            v[section]["added_later"] = extra();
        }
        v["ports"][0]["added_later"] = extra();
        v["health"]["probe"]["Http"]["added_later"] = extra();
        let back: DesiredApp = serde_json::from_value(v).unwrap();
        assert_eq!(back, app);
        assert_eq!(back.spec_hash(), app.spec_hash());
    }

    #[test]
    fn tc_u14_toml_stays_strict_where_the_stored_form_is_lenient() {
        let e = err_of("name = \"a\"\nimage = \"a\"\n[run]\ncmdd = [\"x\"]");
        assert!(e.contains("cmdd"), "{e}");
        let e = err_of("name = \"a\"\nimage = \"a\"\n[network]\negres = \"none\"");
        assert!(e.contains("egres"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn parser_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
            let _ = DesiredApp::from_toml(&s);
        }

        #[test]
        fn parser_never_panics_on_mutated_specs(
            pos in 0usize..FULL.len(),
            len in 0usize..20,
            insert in "[ -~\\n]{0,12}",
        ) {
            let mut text = FULL.as_bytes().to_vec();
            let end = (pos + len).min(text.len());
            text.splice(pos..end, insert.bytes());
            if let Ok(s) = String::from_utf8(text) {
                let _ = DesiredApp::from_toml(&s);
            }
        }
    }
}
