//! `ZfsManager`: drives the `zfs` and `zpool` commands.
//!
//! Works with OpenZFS (production) and zfs-fuse (hosts without the kernel module). The
//! differences are detected once, in [`ZfsManager::new`], and kept in [`ZfsFlavor`]:
//! zfs-fuse has no zvols, no `zfs version`, no `-p` on `list`, and no lz4/zstd. Exact
//! numbers therefore always come from `zfs get -H -p`, which both accept.
//!
//! Every command runs with a deadline ([`ZFS_TIMEOUT`] unless configured): a ZFS daemon or
//! kernel module that hangs costs a step that long, then the command is killed and the
//! error names it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use shellwego_sys::command::{output_within, CommandError};

use tracing::{debug, warn};

/// Which ZFS implementation the commands talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZfsFlavor {
    /// OpenZFS with its kernel module: zvols, lz4/zstd, `list -p`.
    OpenZfs,
    /// zfs-fuse 0.7: none of the above.
    ZfsFuse,
}

impl ZfsFlavor {
    /// Whether block volumes (`zfs create -V`) exist. Without them a VM disk is an image
    /// file inside a dataset.
    pub fn has_zvols(self) -> bool {
        self == ZfsFlavor::OpenZfs
    }

    /// The best compression value this implementation accepts.
    pub fn compression(self) -> &'static str {
        match self {
            ZfsFlavor::OpenZfs => "lz4",
            ZfsFlavor::ZfsFuse => "on",
        }
    }

    /// Compression for base images (one per image, shared by every clone). zfs-fuse's
    /// only algorithm (lzjb, in the FUSE daemon) halved the speed of writing a base here
    /// (2.3 s against 5.5 s for 693 MB), so bases stay uncompressed there; lz4 costs
    /// nothing measurable on kernel ZFS.
    pub fn base_compression(self) -> &'static str {
        match self {
            ZfsFlavor::OpenZfs => "lz4",
            ZfsFlavor::ZfsFuse => "off",
        }
    }
}

/// A failed ZFS operation, with the command and what it printed.
#[derive(Debug, thiserror::Error)]
pub enum ZfsError {
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed (exit code {code:?}): {stderr}")]
    Failed {
        cmd: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {limit:?} and was killed")]
    TimedOut { cmd: String, limit: Duration },
    #[error("unexpected output from `{cmd}`: {line:?}")]
    Parse { cmd: String, line: String },
    #[error("invalid ZFS name {0:?}: use letters, digits and _ - . : separated by '/' (and one '@' for a snapshot)")]
    InvalidName(String),
}

impl ZfsError {
    /// True when the failure was "dataset is busy" (zfs-fuse says so even just after a
    /// successful unmount; a retry usually succeeds).
    pub fn is_busy(&self) -> bool {
        matches!(self, ZfsError::Failed { stderr, .. } if stderr.contains("busy"))
    }

    /// True when the dataset does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ZfsError::Failed { stderr, .. } if stderr.contains("does not exist"))
    }

    /// True if zfs refused because a dataset of that name already exists.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, ZfsError::Failed { stderr, .. } if stderr.contains("already exists"))
    }
}

/// Health of a pool as `zpool list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolHealth {
    pub name: String,
    /// ONLINE, DEGRADED, FAULTED, ...
    pub health: String,
}

impl PoolHealth {
    pub fn is_online(&self) -> bool {
        self.health == "ONLINE"
    }
}

/// What kind of ZFS object a name denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    Filesystem,
    Snapshot,
    Volume,
}

/// One row of `zfs list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetInfo {
    pub name: String,
    pub kind: DatasetKind,
    /// The snapshot a clone was made from.
    pub origin: Option<String>,
    /// Where a filesystem is mounted (None for snapshots, volumes, `none` and `legacy`).
    pub mountpoint: Option<PathBuf>,
}

/// Checks a dataset or snapshot name before it reaches a command line. Refusing a leading
/// '-' keeps names from being read as options.
pub fn validate_name(name: &str) -> Result<(), ZfsError> {
    let bad = || ZfsError::InvalidName(name.to_string());
    let (fs, snap) = match name.split_once('@') {
        Some((fs, snap)) => (fs, Some(snap)),
        None => (name, None),
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('-')
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    };
    if name.len() > 255 || !fs.split('/').all(part_ok) || !snap.is_none_or(part_ok) {
        return Err(bad());
    }
    Ok(())
}

/// How many times a "dataset is busy" failure is retried, and the pause between tries.
const BUSY_RETRIES: u32 = 20;
const BUSY_PAUSE: Duration = Duration::from_millis(100);

/// How long one `zfs`/`zpool` command may take by default. Every command the agent runs
/// (create, snapshot, clone, list, get, set, unmount, destroy of one dataset) takes well
/// under a few seconds on a healthy pool, also on zfs-fuse; two minutes leaves room for
/// a pool under heavy I/O and still ends a hung one.
pub const ZFS_TIMEOUT: Duration = Duration::from_secs(120);

/// Drives `zfs`/`zpool` for one pool.
#[derive(Debug, Clone)]
pub struct ZfsManager {
    pool: String,
    flavor: ZfsFlavor,
    zfs: PathBuf,
    zpool: PathBuf,
    /// How long one command may take.
    limit: Duration,
}

fn run(program: &Path, args: &[&str], limit: Duration) -> Result<String, ZfsError> {
    let cmd = format!("{} {}", program.display(), args.join(" "));
    debug!(%cmd, "zfs command");
    let out =
        output_within(Command::new(program).args(args), None, limit).map_err(|e| match e {
            CommandError::TimedOut { limit, .. } => ZfsError::TimedOut {
                cmd: cmd.clone(),
                limit,
            },
            CommandError::Spawn { source, .. } | CommandError::Io { source, .. } => {
                ZfsError::Spawn {
                    cmd: cmd.clone(),
                    source,
                }
            }
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ZfsError::Failed {
            cmd,
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl ZfsManager {
    /// Connects to `pool` with `zfs`/`zpool` from PATH and detects the flavour.
    pub fn new(pool: &str) -> Result<ZfsManager, ZfsError> {
        ZfsManager::with_commands(pool, Path::new("zfs"), Path::new("zpool"))
    }

    pub fn with_commands(pool: &str, zfs: &Path, zpool: &Path) -> Result<ZfsManager, ZfsError> {
        ZfsManager::with_commands_within(pool, zfs, zpool, ZFS_TIMEOUT)
    }

    /// Like [`with_commands`](Self::with_commands), with `limit` for every command
    /// (the detection included) instead of [`ZFS_TIMEOUT`].
    pub fn with_commands_within(
        pool: &str,
        zfs: &Path,
        zpool: &Path,
        limit: Duration,
    ) -> Result<ZfsManager, ZfsError> {
        validate_name(pool)?;
        // OpenZFS answers `zfs version`; zfs-fuse does not know the command.
        let flavor = match run(zfs, &["version"], limit) {
            Ok(_) => ZfsFlavor::OpenZfs,
            Err(ZfsError::Failed { .. }) => ZfsFlavor::ZfsFuse,
            Err(e) => return Err(e),
        };
        Ok(ZfsManager {
            pool: pool.to_string(),
            flavor,
            zfs: zfs.to_path_buf(),
            zpool: zpool.to_path_buf(),
            limit,
        })
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub fn flavor(&self) -> ZfsFlavor {
        self.flavor
    }

    fn zfs(&self, args: &[&str]) -> Result<String, ZfsError> {
        run(&self.zfs, args, self.limit)
    }

    /// The pool's health; an error if the pool is not reachable.
    pub fn pool_health(&self) -> Result<PoolHealth, ZfsError> {
        let args = ["list", "-H", "-o", "name,health", self.pool.as_str()];
        let out = run(&self.zpool, &args, self.limit)?;
        let line = out.lines().next().unwrap_or_default();
        let mut cols = line.split('\t');
        match (cols.next(), cols.next()) {
            (Some(name), Some(health)) => Ok(PoolHealth {
                name: name.to_string(),
                health: health.trim().to_string(),
            }),
            _ => Err(ZfsError::Parse {
                cmd: format!("zpool {}", args.join(" ")),
                line: line.to_string(),
            }),
        }
    }

    /// Creates a filesystem (and its missing parents) with properties.
    pub fn create(&self, name: &str, props: &[(&str, &str)]) -> Result<(), ZfsError> {
        validate_name(name)?;
        let opts: Vec<String> = props.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec!["create", "-p"];
        for o in &opts {
            args.extend(["-o", o.as_str()]);
        }
        args.push(name);
        // `-p` makes missing parents; another process making the same parent at the same
        // moment makes one of the two fail ("dataset already exists"). Then that parent
        // exists and the next try gets at least one level further, so a try per level
        // (or finding `name` made) settles it.
        let levels = name.matches('/').count().max(1);
        let mut tries = 0;
        loop {
            match self.zfs(&args) {
                Ok(_) => return Ok(()),
                Err(_) if self.exists(name)? => return Ok(()),
                Err(e) if tries >= levels || !e.is_already_exists() => return Err(e),
                Err(_) => tries += 1,
            }
        }
    }

    /// Takes `dataset@snap`.
    pub fn snapshot(&self, snapshot: &str) -> Result<(), ZfsError> {
        validate_name(snapshot)?;
        if !snapshot.contains('@') {
            return Err(ZfsError::InvalidName(snapshot.to_string()));
        }
        self.zfs(&["snapshot", snapshot]).map(drop)
    }

    /// Clones a snapshot into a new filesystem (creating missing parents) with properties
    /// (e.g. its mountpoint).
    pub fn clone_snapshot(
        &self,
        snapshot: &str,
        target: &str,
        props: &[(&str, &str)],
    ) -> Result<(), ZfsError> {
        validate_name(snapshot)?;
        validate_name(target)?;
        let opts: Vec<String> = props.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec!["clone", "-p"];
        for o in &opts {
            args.extend(["-o", o.as_str()]);
        }
        args.extend([snapshot, target]);
        self.zfs(&args).map(drop)
    }

    /// Makes the clone `name` independent of its origin: the origin snapshot (and the
    /// ones before it) move to `name`, and the former origin dataset becomes a clone.
    pub fn promote(&self, name: &str) -> Result<(), ZfsError> {
        validate_name(name)?;
        self.zfs(&["promote", name]).map(drop)
    }

    /// True if the dataset or snapshot exists.
    pub fn exists(&self, name: &str) -> Result<bool, ZfsError> {
        validate_name(name)?;
        match self.zfs(&["list", "-H", "-t", "all", "-o", "name", name]) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `name` and everything below it (filesystems, snapshots, volumes), parents first.
    pub fn list(&self, name: &str) -> Result<Vec<DatasetInfo>, ZfsError> {
        validate_name(name)?;
        let args = [
            "list",
            "-H",
            "-r",
            "-t",
            "all",
            "-o",
            "name,type,origin,mountpoint",
            name,
        ];
        let out = self.zfs(&args)?;
        out.lines()
            .map(|line| {
                let cols: Vec<&str> = line.split('\t').collect();
                let parse_err = || ZfsError::Parse {
                    cmd: format!("zfs {}", args.join(" ")),
                    line: line.to_string(),
                };
                let [name, kind, origin, mountpoint] = cols.as_slice() else {
                    return Err(parse_err());
                };
                let kind = match *kind {
                    "filesystem" => DatasetKind::Filesystem,
                    "snapshot" => DatasetKind::Snapshot,
                    "volume" => DatasetKind::Volume,
                    _ => return Err(parse_err()),
                };
                Ok(DatasetInfo {
                    name: name.to_string(),
                    kind,
                    origin: (*origin != "-").then(|| origin.to_string()),
                    mountpoint: mountpoint
                        .starts_with('/')
                        .then(|| PathBuf::from(mountpoint)),
                })
            })
            .collect()
    }

    /// Exact property values (`zfs get -H -p`): sizes in bytes, no rounding.
    pub fn get(&self, name: &str, props: &[&str]) -> Result<BTreeMap<String, String>, ZfsError> {
        validate_name(name)?;
        let joined = props.join(",");
        let args = [
            "get",
            "-H",
            "-p",
            "-o",
            "property,value",
            joined.as_str(),
            name,
        ];
        let out = self.zfs(&args)?;
        let mut values = BTreeMap::new();
        for line in out.lines() {
            let (k, v) = line.split_once('\t').ok_or_else(|| ZfsError::Parse {
                cmd: format!("zfs {}", args.join(" ")),
                line: line.to_string(),
            })?;
            values.insert(k.to_string(), v.to_string());
        }
        Ok(values)
    }

    /// One exact numeric property, e.g. `used` or `available`, in bytes.
    pub fn get_u64(&self, name: &str, prop: &str) -> Result<u64, ZfsError> {
        let values = self.get(name, &[prop])?;
        let value = values.get(prop).cloned().unwrap_or_default();
        value.parse().map_err(|_| ZfsError::Parse {
            cmd: format!("zfs get -H -p {prop} {name}"),
            line: value,
        })
    }

    pub fn set(&self, name: &str, prop: &str, value: &str) -> Result<(), ZfsError> {
        validate_name(name)?;
        self.zfs(&["set", &format!("{prop}={value}"), name])
            .map(drop)
    }

    /// Where the filesystem is mounted now, if it is.
    pub fn mountpoint(&self, name: &str) -> Result<Option<PathBuf>, ZfsError> {
        let values = self.get(name, &["mountpoint", "mounted"])?;
        let mounted = values.get("mounted").map(String::as_str) == Some("yes");
        Ok(values
            .get("mountpoint")
            .filter(|m| mounted && m.starts_with('/'))
            .map(PathBuf::from))
    }

    /// Destroys a filesystem or snapshot with everything below it (not dependent clones).
    /// Mounted filesystems are unmounted deepest-first; "dataset is busy" is retried a
    /// bounded number of times. A name that does not exist is not an error.
    pub fn destroy(&self, name: &str) -> Result<(), ZfsError> {
        validate_name(name)?;
        let tree = match self.list(name) {
            Ok(t) => t,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        // Deepest first: children sort after their parents, so reverse order works.
        for ds in tree.iter().rev() {
            if ds.kind == DatasetKind::Filesystem && ds.mountpoint.is_some() {
                self.retry_busy(|| match self.zfs(&["unmount", &ds.name]) {
                    Err(ZfsError::Failed { stderr, .. })
                        if stderr.contains("not currently mounted") =>
                    {
                        Ok(())
                    }
                    other => other.map(drop),
                })?;
            }
        }
        for ds in tree.iter().rev() {
            self.retry_busy(|| match self.zfs(&["destroy", &ds.name]) {
                Err(e) if e.is_not_found() => Ok(()),
                other => other.map(drop),
            })?;
        }
        Ok(())
    }

    fn retry_busy(&self, mut op: impl FnMut() -> Result<(), ZfsError>) -> Result<(), ZfsError> {
        let mut tries = 0;
        loop {
            match op() {
                Err(e) if e.is_busy() && tries < BUSY_RETRIES => {
                    tries += 1;
                    warn!(error = %e, tries, "dataset busy, retrying");
                    sleep(BUSY_PAUSE);
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "tank",
            "tank/shellwego/apps/1234",
            "tank/a@base",
            "p/x.y:z_1-2",
        ] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-o",
            "tank/-x",
            "tank//a",
            "tank/a@",
            "tank/a@b@c",
            "tank/../x",
            "a b",
            "tank/a;rm",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    /// A `zfs` that answers `version` (so it passes for OpenZFS) and hangs on anything else.
    fn hanging_zfs(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("zfs");
        std::fs::write(
            &path,
            "#!/bin/sh\n[ \"$1\" = version ] && exit 0\nexec sleep 30\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn tc_u14_deadline_a_hanging_zfs_command_is_killed_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let zfs = hanging_zfs(dir.path());
        let limit = Duration::from_millis(300);
        let m = ZfsManager::with_commands_within("tank", &zfs, &zfs, limit).unwrap();
        assert_eq!(m.flavor(), ZfsFlavor::OpenZfs);
        let start = std::time::Instant::now();
        let e = m.exists("tank/a").unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(e, ZfsError::TimedOut { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("list -H -t all -o name tank/a") && text.contains("300ms"),
            "{text}"
        );
        // A hanging `zpool` too.
        assert!(matches!(m.pool_health(), Err(ZfsError::TimedOut { .. })));
    }

    #[test]
    fn flavor_rules() {
        assert!(!ZfsFlavor::ZfsFuse.has_zvols());
        assert_eq!(ZfsFlavor::ZfsFuse.compression(), "on");
        assert_eq!(ZfsFlavor::OpenZfs.compression(), "lz4");
    }
}
