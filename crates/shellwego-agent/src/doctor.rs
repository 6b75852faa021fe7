//! `shellwego doctor`: checks each host prerequisite and says how to fix what is missing.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::config::{find_executable, Config};
use crate::host::{self, HostKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but something is worth knowing (e.g. a nested host).
    Warn,
    /// A required prerequisite is missing.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// How to fix it; empty when nothing needs fixing.
    pub fix: String,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: String::new(),
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

const SETUP_HINT: &str = "run `make setup` (scripts/setup.sh) as root";

/// How long a command `doctor` runs to ask a tool's version or state may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a command (for at most [`PROBE_TIMEOUT`]) and returns its first line of output,
/// or why it could not run.
fn first_line(program: &Path, args: &[&str]) -> Result<String, String> {
    use shellwego_sys::command::{output_within, CommandError};
    let out = output_within(Command::new(program).args(args), None, PROBE_TIMEOUT).map_err(
        |e| match e {
            CommandError::Spawn { source, .. } => {
                format!("cannot run {}: {source}", program.display())
            }
            other => other.to_string(),
        },
    )?;
    let text = if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    };
    let line = String::from_utf8_lossy(text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if out.status.success() {
        Ok(line)
    } else {
        Err(format!(
            "{} {} failed ({}): {line}",
            program.display(),
            args.join(" "),
            out.status
        ))
    }
}

fn check_kvm() -> Vec<Check> {
    let mut checks = Vec::new();
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => checks.push(Check::ok("kvm", "/dev/kvm is readable and writable")),
        Err(e) => {
            checks.push(Check::fail(
                "kvm",
                format!("cannot open /dev/kvm read-write: {e}"),
                "enable virtualization (VT-x/AMD-V or nested KVM) and load kvm_intel/kvm_amd; run as root or join the kvm group",
            ));
            return checks;
        }
    }
    match host::detect() {
        Ok(HostKind::Hardware) => {
            checks.push(Check::ok("host kind", HostKind::Hardware.describe()))
        }
        Ok(kind @ HostKind::NestedEmulated) => checks.push(Check::warn(
            "host kind",
            kind.describe(),
            "VMs start from pre-booted templates; cold boots are slow on this host kind",
        )),
        Err(e) => checks.push(Check::warn(
            "host kind",
            format!("cannot read /proc/cpuinfo: {e}"),
            "",
        )),
    }
    checks
}

fn check_firecracker(config: &Config) -> Check {
    let Some(path) = find_executable(&config.firecracker) else {
        return Check::fail(
            "firecracker",
            format!("{} not found", config.firecracker.display()),
            format!("{SETUP_HINT}, install an official Firecracker release on PATH, or set SHELLWEGO_FIRECRACKER"),
        );
    };
    match first_line(&path, &["--version"]) {
        Ok(v) => Check::ok("firecracker", format!("{} ({})", v, path.display())),
        Err(e) => Check::fail("firecracker", e, "reinstall firecracker"),
    }
}

/// The jailer, and the cgroups it puts each VM in; running unjailed is a warning.
fn check_jail(config: &Config) -> Vec<Check> {
    if !config.jailer {
        return vec![Check::warn(
            "jailer",
            "jailer = false: every firecracker runs as root with no chroot, PID namespace or \
             cgroup; a guest that escapes into its VMM owns the host",
            "remove `jailer = false` from the config (or SHELLWEGO_JAILER=0 from the environment)",
        )];
    }
    let jailer = match find_executable(&config.jailer_binary) {
        None => Check::fail(
            "jailer",
            format!("{} not found", config.jailer_binary.display()),
            format!("{SETUP_HINT}; the jailer ships with every Firecracker release"),
        ),
        Some(path) => match first_line(&path, &["--version"]) {
            Ok(v) => Check::ok("jailer", format!("{} ({})", v, path.display())),
            Err(e) => Check::fail("jailer", e, "reinstall firecracker's jailer"),
        },
    };
    let cgroups = match crate::vmm::jail::CgroupVersion::detect() {
        Ok(v) => Check::ok(
            "cgroups",
            format!(
                "cgroup v{} with cpu, memory and pids{}",
                v.number(),
                if crate::vmm::jail::host_has_io_weight(v) {
                    " and an I/O weight"
                } else {
                    " (no I/O weight on this host: disk I/O is not weighted per VM)"
                }
            ),
        ),
        Err(e) => Check::fail(
            "cgroups",
            e.to_string(),
            "mount cgroup2 at /sys/fs/cgroup (systemd.unified_cgroup_hierarchy=1) or the v1 \
             cpu, memory and pids hierarchies",
        ),
    };
    vec![jailer, cgroups]
}

fn check_zfs(config: &Config) -> Vec<Check> {
    let (Some(zfs), Some(zpool)) = (
        find_executable(Path::new("zfs")),
        find_executable(Path::new("zpool")),
    ) else {
        return vec![Check::fail(
            "zfs",
            "zfs/zpool commands not found",
            format!("install OpenZFS (zfsutils-linux) or, on hosts without the kernel module, zfs-fuse; {SETUP_HINT}"),
        )];
    };
    let mut checks = vec![Check::ok(
        "zfs",
        format!("{} and {}", zfs.display(), zpool.display()),
    )];
    match first_line(&zpool, &["list", "-H", "-o", "name,health", &config.pool]) {
        Ok(line) if line.split_whitespace().nth(1) == Some("ONLINE") => {
            checks.push(Check::ok("zfs pool", format!("{} is ONLINE", config.pool)))
        }
        Ok(line) => checks.push(Check::fail(
            "zfs pool",
            format!("pool {} is not healthy: {line}", config.pool),
            format!("inspect with `zpool status {}`", config.pool),
        )),
        Err(e) => checks.push(Check::fail(
            "zfs pool",
            format!("pool {:?} not reachable: {e}", config.pool),
            "start the ZFS daemon (zfs-fuse on hosts without the module) and create or import the pool; set SHELLWEGO_POOL to use another",
        )),
    }
    checks
}

fn check_network() -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(if Path::new("/dev/net/tun").exists() {
        Check::ok("tun", "/dev/net/tun present")
    } else {
        Check::fail("tun", "/dev/net/tun missing", "modprobe tun")
    });
    checks.push(if Path::new("/sys/module/bridge").exists() {
        Check::ok("bridge", "Linux bridge support loaded")
    } else {
        Check::fail("bridge", "bridge module not loaded", "modprobe bridge")
    });
    checks
}

fn check_tool(name: &'static str, program: &str, args: &[&str], fix: &str) -> Check {
    match find_executable(Path::new(program)) {
        None => Check::fail(name, format!("{program} not found"), fix),
        Some(path) => match first_line(&path, args) {
            Ok(v) => Check::ok(name, v),
            Err(e) => Check::fail(name, e, fix),
        },
    }
}

fn check_kernel(config: &Config) -> Check {
    match std::fs::metadata(&config.kernel) {
        Ok(m) if m.is_file() && m.len() > 0 => Check::ok(
            "guest kernel",
            format!("{} ({} bytes)", config.kernel.display(), m.len()),
        ),
        Ok(_) => Check::fail(
            "guest kernel",
            format!("{} is empty or not a file", config.kernel.display()),
            "rebuild it with `make kernel`",
        ),
        Err(e) => Check::fail(
            "guest kernel",
            format!("{}: {e}", config.kernel.display()),
            "build it with `make kernel`, or set SHELLWEGO_KERNEL to an uncompressed vmlinux",
        ),
    }
}

/// Runs every check against this host.
pub fn run_checks(config: &Config) -> Vec<Check> {
    let mut checks = check_kvm();
    checks.push(check_firecracker(config));
    checks.extend(check_jail(config));
    checks.extend(check_zfs(config));
    checks.extend(check_network());
    checks.push(check_tool(
        "clang (BPF)",
        "clang",
        &["--version"],
        "apt-get install clang (compiles the eBPF QoS program)",
    ));
    checks.push(check_tool(
        "mkfs.ext4",
        "mkfs.ext4",
        &["-V"],
        "apt-get install e2fsprogs",
    ));
    checks.push(check_kernel(config));
    checks
}

/// One line per check, with the fix after a dash.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = match c.status {
            Status::Ok => " ok ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("[{tag}] {:<13} {}", c.name, c.detail));
        if !c.fix.is_empty() {
            let label = if c.status == Status::Warn {
                "note"
            } else {
                "fix"
            };
            out.push_str(&format!(" -- {label}: {}", c.fix));
        }
        out.push('\n');
    }
    out
}

/// True when no required prerequisite is missing.
pub fn all_required_present(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.status != Status::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_verdict() {
        let checks = vec![
            Check::ok("kvm", "fine"),
            Check::fail("zfs", "missing", "install it"),
        ];
        let text = render(&checks);
        assert!(text.contains("[ ok ] kvm"));
        assert!(text.contains("[FAIL] zfs") && text.contains("fix: install it"));
        assert!(!all_required_present(&checks));
        assert!(all_required_present(&checks[..1]));
    }

    #[test]
    fn missing_firecracker_fails_with_hint() {
        let config = Config {
            firecracker: "/nonexistent/firecracker".into(),
            ..Config::default()
        };
        let c = check_firecracker(&config);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("SHELLWEGO_FIRECRACKER"));
    }

    #[test]
    fn running_unjailed_is_a_warning_and_a_missing_jailer_a_failure() {
        let unjailed = Config {
            jailer: false,
            ..Config::default()
        };
        let c = check_jail(&unjailed);
        assert_eq!(c[0].status, Status::Warn);
        assert!(c[0].detail.contains("root"), "{}", c[0].detail);
        let missing = Config {
            jailer_binary: "/nonexistent/jailer".into(),
            ..Config::default()
        };
        let c = check_jail(&missing);
        assert_eq!(c[0].status, Status::Fail);
        assert!(c[0].detail.contains("/nonexistent/jailer"));
    }

    #[test]
    fn missing_kernel_fails_with_hint() {
        let config = Config {
            kernel: "/nonexistent/vmlinux".into(),
            ..Config::default()
        };
        let c = check_kernel(&config);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("make kernel"));
    }
}
