//! Root disks of VMs: one base per image digest, cloned per VM.
//!
//! ```text
//! POOL/shellwego/images/<digest>        ext4 image file `rootfs.ext4` of the unpacked image,
//!    @base                              snapshotted once, read-only from then on
//! POOL/shellwego/apps/<vm_id>           zfs clone of @base, mounted at <data>/apps/<vm_id>,
//!                                       so Firecracker gets a writable image file
//! ```
//! Firecracker needs a block device; zfs-fuse has no zvols, so the disk is an image file
//! inside the dataset on every host (one code path; a zvol variant would only pay off on
//! OpenZFS).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use tracing::info;

use crate::ext4::{base_inodes, base_size, copy_sparse, make_ext4, tree_size};
use crate::fetch::LayerFetch;
use crate::image::{ImageStore, Progress, PulledImage};
use crate::unpack::{LayerApplier, UnpackError};
use crate::zfs::{validate_name, ZfsError, ZfsManager};

/// The image file's name inside each dataset.
pub const IMAGE_FILE: &str = "rootfs.ext4";
const BASE_SNAPSHOT: &str = "base";
const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Zfs(#[from] ZfsError),
    #[error("unpacking layer {layer} of {image}: {source}")]
    Unpack {
        image: String,
        layer: String,
        #[source]
        source: UnpackError,
    },
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error("{what} at {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("invalid VM id {0:?}: use letters, digits and '-'")]
    BadVmId(String),
    #[error("dataset {0} is not mounted")]
    NotMounted(String),
}

fn io_err(what: &str, path: &Path) -> impl Fn(io::Error) -> RootfsError {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |source| RootfsError::Io {
        what: what.clone(),
        path: path.clone(),
        source,
    }
}

/// An image's base dataset, ready to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub dataset: String,
    pub snapshot: String,
    /// Size of the ext4 image file in bytes.
    pub size_bytes: u64,
    /// True when this call built it; false when it already existed.
    pub built_now: bool,
    /// Where a build spent its time (empty when it already existed).
    pub timings: BuildTimings,
}

/// Where a base build's time went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildTimings {
    /// Download, checks and unpacking of all layers (one pass).
    pub unpack: Duration,
    /// Walking the tree for its size and inode count.
    pub sizing: Duration,
    /// `mkfs.ext4 -d` making the image file on local scratch space.
    pub mkfs: Duration,
    /// Copying the image file into the dataset (the ZFS writes).
    pub copy: Duration,
    /// Snapshot and read-only flag.
    pub snapshot: Duration,
    /// Entries in the tree and their bytes.
    pub entries: u64,
    pub content_bytes: u64,
}

/// A VM's own writable root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    pub dataset: String,
    pub mountpoint: PathBuf,
    /// The ext4 image file Firecracker opens as the root drive.
    pub image_path: PathBuf,
}

/// Where one base build puts things.
#[derive(Clone, Copy)]
struct BuildPlaces<'a> {
    dataset: &'a str,
    snapshot: &'a str,
    mountpoint: &'a Path,
    /// The layers' tree, on local scratch space.
    unpack_dir: &'a Path,
    /// The ext4 image as mkfs makes it, before it is copied into the dataset.
    scratch_image: &'a Path,
}

/// Builds bases and clones for VMs.
pub struct RootfsBuilder {
    zfs: ZfsManager,
    data_dir: PathBuf,
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// How long growing a VM's file system (`resize2fs`) may take: seconds for the disks of
/// this platform (at most a few TiB, mostly unused); a stalled ZFS mount under it would
/// otherwise hold the provision forever.
const RESIZE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

fn run(cmd: &mut Command) -> Result<(), RootfsError> {
    let shown = format!("{cmd:?}");
    let out = shellwego_sys::command::output_within(cmd, None, RESIZE_TIMEOUT).map_err(|e| {
        RootfsError::Command {
            cmd: shown.clone(),
            stderr: e.to_string(),
        }
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RootfsError::Command {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl RootfsBuilder {
    /// A builder for bases and clones under `data_dir`. Unpack dirs and scratch images
    /// that a process which is gone left in `<data_dir>/tmp` are removed.
    pub fn new(zfs: ZfsManager, data_dir: &Path) -> RootfsBuilder {
        sweep_dead_builds(&data_dir.join("tmp"));
        // The ZFS daemon would create missing mountpoint parents with its own umask.
        for sub in ["bases", "apps", "tmp"] {
            let dir = data_dir.join(sub);
            if fs::create_dir_all(&dir).is_ok() {
                let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
            }
        }
        RootfsBuilder {
            zfs,
            data_dir: data_dir.to_path_buf(),
            building: Mutex::new(HashMap::new()),
        }
    }

    pub fn zfs(&self) -> &ZfsManager {
        &self.zfs
    }

    /// The staging area where layers are unpacked (`<data_dir>/tmp`).
    pub fn staging_dir(&self) -> PathBuf {
        self.data_dir.join("tmp")
    }

    /// Makes the staging area a `nosuid,nodev,noexec` bind mount of itself, so nothing an
    /// image unpacks there (setuid binaries, device nodes) can be used on the host while
    /// it is there; `mkfs.ext4 -d` only reads their metadata. Idempotent: an agent
    /// restart finds the mount in place. The mount stays for the host's lifetime, like
    /// any other of the agent's.
    pub fn protect_staging(&self) -> std::io::Result<()> {
        let dir = self.staging_dir();
        fs::create_dir_all(&dir)?;
        let dir = fs::canonicalize(&dir)?;
        let mounts = fs::read_to_string("/proc/self/mounts")?;
        if staging_is_protected(&mounts, &dir) {
            return Ok(());
        }
        // A bind of the directory onto itself, then a remount of that bind with the
        // restricting flags.
        shellwego_sys::mount::bind(&dir, &dir)?;
        if let Err(e) = shellwego_sys::mount::restrict_bind(&dir) {
            let _ = shellwego_sys::mount::detach(&dir);
            return Err(e);
        }
        Ok(())
    }

    fn root_dataset(&self) -> String {
        format!("{}/shellwego", self.zfs.pool())
    }

    pub fn base_dataset(&self, image: &PulledImage) -> String {
        format!("{}/images/{}", self.root_dataset(), image.digest_hex())
    }

    pub fn vm_dataset(&self, vm_id: &str) -> String {
        format!("{}/apps/{vm_id}", self.root_dataset())
    }

    /// The image's base, if it is built.
    pub fn existing_base(&self, image: &PulledImage) -> Result<Option<BaseImage>, RootfsError> {
        let dataset = self.base_dataset(image);
        let snapshot = format!("{dataset}@{BASE_SNAPSHOT}");
        if !self.zfs.exists(&snapshot)? {
            return Ok(None);
        }
        let mountpoint = self.data_dir.join("bases").join(image.digest_hex());
        let size_bytes = fs::metadata(mountpoint.join(IMAGE_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(Some(BaseImage {
            dataset,
            snapshot,
            size_bytes,
            built_now: false,
            timings: BuildTimings::default(),
        }))
    }

    /// Pulls `reference` and builds its base in one pass: the manifest and config are
    /// checked; if the base exists nothing else is fetched; otherwise the layers the
    /// cache lacks download in parallel while they are decompressed, checked and unpacked
    /// in order, then the tree becomes the base's ext4 image. Progress is reported as it
    /// goes; the image is recorded in the store once its base exists.
    pub async fn pull_base(
        self: &Arc<Self>,
        store: &ImageStore,
        reference: &str,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(PulledImage, BaseImage), RootfsError> {
        let resolved = store.resolve(reference).await?;
        let existing = {
            let (me, image) = (self.clone(), resolved.image.clone());
            tokio::task::spawn_blocking(move || me.existing_base(&image))
                .await
                .map_err(|e| join_err(&e))??
        };
        if let Some(base) = existing {
            return Ok((store.record(resolved.image)?, base));
        }
        let fetch = Arc::new(store.fetch(&resolved)?);
        let (me, image, layers) = (self.clone(), resolved.image.clone(), fetch.clone());
        let build = tokio::task::spawn_blocking(move || me.ensure_base(&image, &layers));
        let base = crate::fetch::drive(build, &fetch, progress)
            .await
            .map_err(|e| join_err(&e))??;
        Ok((store.record(resolved.image)?, base))
    }

    /// Builds the image's base once (also under concurrent callers, in this process or
    /// others) from its layers as `layers` delivers them, and returns it.
    pub fn ensure_base(
        &self,
        image: &PulledImage,
        layers: &LayerFetch,
    ) -> Result<BaseImage, RootfsError> {
        let dataset = self.base_dataset(image);
        let snapshot = format!("{dataset}@{BASE_SNAPSHOT}");
        let mountpoint = self.data_dir.join("bases").join(image.digest_hex());
        let lock = {
            let mut map = self.building.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(dataset.clone()).or_default().clone()
        };
        let _in_process = lock.lock().unwrap_or_else(|e| e.into_inner());
        let locks = self.data_dir.join("locks");
        fs::create_dir_all(&locks).map_err(io_err("creating lock dir", &locks))?;
        let lock_path = locks.join(format!("base-{}.lock", image.digest_hex()));
        let _cross_process = shellwego_sys::lock::FileLock::exclusive(&lock_path)
            .map_err(io_err("locking", &lock_path))?;

        if let Some(base) = self.existing_base(image)? {
            return Ok(base);
        }
        // A dataset without its snapshot is a build that was interrupted: start over.
        self.zfs.destroy(&dataset)?;

        let tmp_root = self.data_dir.join("tmp");
        fs::create_dir_all(&tmp_root).map_err(io_err("creating", &tmp_root))?;
        // Unique per build: the unpack dir of an earlier build may still be being
        // removed in the background.
        static BUILD_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unpack_dir = tmp_root.join(format!(
            "unpack-{}-{}-{}",
            image.digest_hex(),
            BUILD_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&unpack_dir);
        fs::create_dir_all(&unpack_dir).map_err(io_err("creating", &unpack_dir))?;
        let scratch_image = unpack_dir.with_extension("ext4");
        let _ = fs::remove_file(&scratch_image);
        let result = self.build_base(
            layers,
            image,
            &BuildPlaces {
                dataset: &dataset,
                snapshot: &snapshot,
                mountpoint: &mountpoint,
                unpack_dir: &unpack_dir,
                scratch_image: &scratch_image,
            },
        );
        let _ = fs::remove_file(&scratch_image);
        if result.is_ok() {
            // Removing a large tree takes a while: the base is ready, so do it behind.
            std::thread::spawn(move || {
                let _ = fs::remove_dir_all(&unpack_dir);
            });
        } else {
            // A failed build leaves nothing behind by the time it reports.
            let _ = fs::remove_dir_all(&unpack_dir);
            let _ = self.zfs.destroy(&dataset);
        }
        result
    }

    fn build_base(
        &self,
        layers: &LayerFetch,
        image: &PulledImage,
        at: &BuildPlaces<'_>,
    ) -> Result<BaseImage, RootfsError> {
        let BuildPlaces {
            dataset,
            snapshot,
            mountpoint,
            unpack_dir,
            scratch_image,
        } = *at;
        let mut timings = BuildTimings::default();
        let t = Instant::now();
        let mut applier = LayerApplier::new(unpack_dir);
        applier.set_entry_budget(layers.budget().max_entries);
        let mut used = 0;
        for i in 0..layers.len() {
            let mut tar = layers.open(i, used)?;
            if let Err(source) = applier.apply(&mut tar) {
                return Err(match layers.cause(i, &tar) {
                    Some(cause) => cause.into(),
                    None => RootfsError::Unpack {
                        image: image.digest.clone(),
                        layer: layers.layer(i).digest.clone(),
                        source,
                    },
                });
            }
            used += layers.verify(i, tar)?;
        }
        timings.unpack = t.elapsed();
        let t = Instant::now();
        let (content, entries) = tree_size(unpack_dir).map_err(io_err("measuring", unpack_dir))?;
        let size = base_size(content);
        let inodes = base_inodes(entries, size);
        timings.sizing = t.elapsed();
        timings.entries = entries;
        timings.content_bytes = content;
        let t = Instant::now();
        make_ext4(unpack_dir, scratch_image, size, inodes).map_err(|stderr| {
            RootfsError::Command {
                cmd: "mkfs.ext4".into(),
                stderr,
            }
        })?;
        timings.mkfs = t.elapsed();
        let mp = mountpoint.to_string_lossy();
        self.zfs.create(
            dataset,
            &[
                ("mountpoint", mp.as_ref()),
                ("compression", self.zfs.flavor().base_compression()),
            ],
        )?;
        let mounted = self
            .zfs
            .mountpoint(dataset)?
            .ok_or_else(|| RootfsError::NotMounted(dataset.to_string()))?;
        // Root-only, and so is every clone of it (a clone's root is the base's).
        fs::set_permissions(&mounted, fs::Permissions::from_mode(0o700))
            .map_err(io_err("making the base private", &mounted))?;
        let file = mounted.join(IMAGE_FILE);
        let t = Instant::now();
        copy_sparse(scratch_image, &file).map_err(io_err("copying the image into", &file))?;
        timings.copy = t.elapsed();
        let t = Instant::now();
        // Read-only first: the snapshot is the last step, and its existence is what tells
        // other callers the base is ready.
        self.zfs.set(dataset, "readonly", "on")?;
        self.zfs.snapshot(snapshot)?;
        timings.snapshot = t.elapsed();
        info!(
            dataset,
            size,
            content,
            entries,
            inodes,
            ?timings,
            "base image built"
        );
        Ok(BaseImage {
            dataset: dataset.to_string(),
            snapshot: snapshot.to_string(),
            size_bytes: size,
            built_now: true,
            timings,
        })
    }

    /// The VM's own clone of the base, mounted at `<data>/apps/<vm_id>`; grown to
    /// `disk_bytes` when that is larger than the base. Idempotent.
    pub fn clone_for_vm(
        &self,
        base: &BaseImage,
        vm_id: &str,
        disk_bytes: Option<u64>,
    ) -> Result<VmDisk, RootfsError> {
        self.clone_snapshot_for_vm(&base.snapshot, vm_id, disk_bytes)
    }

    /// Where kept snapshots' datasets are (see [`Self::keep_snapshot`]).
    pub fn kept_dataset(&self, name: &str) -> String {
        format!("{}/snapshots/{name}", self.root_dataset())
    }

    /// Keeps `snapshot` of a VM's disk (`<root>/apps/<vm>@<snap>`) as the origin of later
    /// VM disks, independent of that VM: it is cloned to `<root>/snapshots/<name>` (never
    /// mounted) and promoted, so the snapshot moves there and the VM's own disk becomes
    /// one of its clones — the VM can be removed at any time. Returns the kept snapshot
    /// (`<root>/snapshots/<name>@<snap>`), to clone with [`Self::clone_snapshot_for_vm`].
    /// Repeating a call that was cut short (before or after the promotion) finishes it.
    pub fn keep_snapshot(&self, snapshot: &str, name: &str) -> Result<String, RootfsError> {
        let snap = snapshot
            .split_once('@')
            .map(|(_, s)| s)
            .ok_or_else(|| ZfsError::InvalidName(snapshot.to_string()))?;
        let target = self.kept_dataset(name);
        let kept = format!("{target}@{snap}");
        // Idempotent: a call cut short left the clone, promoted (the snapshot moved there,
        // so `snapshot` is gone) or not.
        if self.zfs.exists(&kept)? && !self.zfs.exists(snapshot)? {
            return Ok(kept);
        }
        if self.zfs.exists(&target)? {
            // Only a clone of this very snapshot is ours to finish; anything else there
            // (left by another, interrupted attempt) would pair this memory image with
            // another disk.
            let origin = self
                .zfs
                .list(&target)?
                .into_iter()
                .find(|d| d.name == target)
                .and_then(|d| d.origin);
            if origin.as_deref() != Some(snapshot) {
                self.zfs.destroy(&target)?;
                self.zfs
                    .clone_snapshot(snapshot, &target, &[("mountpoint", "none")])?;
            }
        } else {
            self.zfs
                .clone_snapshot(snapshot, &target, &[("mountpoint", "none")])?;
        }
        if let Err(e) = self.zfs.promote(&target) {
            let _ = self.zfs.destroy(&target);
            return Err(e.into());
        }
        Ok(kept)
    }

    /// Destroys a kept snapshot. Fails (busy) while a VM disk cloned from it exists;
    /// forgetting what is gone is fine.
    pub fn forget_kept(&self, name: &str) -> Result<(), RootfsError> {
        Ok(self.zfs.destroy(&self.kept_dataset(name))?)
    }

    /// Names of the kept snapshots' datasets.
    pub fn kept(&self) -> Result<Vec<String>, RootfsError> {
        let parent = format!("{}/snapshots", self.root_dataset());
        if !self.zfs.exists(&parent)? {
            return Ok(vec![]);
        }
        let prefix = format!("{parent}/");
        Ok(self
            .zfs
            .list(&parent)?
            .into_iter()
            .filter(|d| d.kind == crate::zfs::DatasetKind::Filesystem)
            .filter_map(|d| {
                let rest = d.name.strip_prefix(&prefix)?;
                (!rest.contains('/')).then(|| rest.to_string())
            })
            .collect())
    }

    /// The VM's own clone of `snapshot` (a base image's or a kept one), mounted at
    /// `<data>/apps/<vm_id>`; grown to `disk_bytes` when that is larger. Idempotent.
    pub fn clone_snapshot_for_vm(
        &self,
        snapshot: &str,
        vm_id: &str,
        disk_bytes: Option<u64>,
    ) -> Result<VmDisk, RootfsError> {
        if vm_id.is_empty() || !vm_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(RootfsError::BadVmId(vm_id.to_string()));
        }
        let dataset = self.vm_dataset(vm_id);
        validate_name(&dataset)?;
        let mountpoint = self.data_dir.join("apps").join(vm_id);
        // The parent is made first, not by `clone -p`: clones for VMs started side by side
        // race to make it, and the loser of `clone -p` fails ("dataset already exists").
        let parent = format!("{}/apps", self.root_dataset());
        if !self.zfs.exists(&parent)? {
            if let Err(e) = self.zfs.create(&parent, &[]) {
                if !self.zfs.exists(&parent)? {
                    return Err(e.into());
                }
            }
        }
        if !self.zfs.exists(&dataset)? {
            let mp = mountpoint.to_string_lossy();
            self.zfs
                .clone_snapshot(snapshot, &dataset, &[("mountpoint", mp.as_ref())])?;
        }
        let mounted = self
            .zfs
            .mountpoint(&dataset)?
            .ok_or_else(|| RootfsError::NotMounted(dataset.clone()))?;
        let image_path = mounted.join(IMAGE_FILE);
        if let Some(want) = disk_bytes {
            if self.grow_image(&dataset, &image_path, want)? {
                run(Command::new("resize2fs").arg("-f").arg(&image_path))?;
            }
        }
        self.bound_dataset(&dataset, &image_path)?;
        Ok(VmDisk {
            dataset,
            mountpoint: mounted,
            image_path,
        })
    }

    /// Grows the disk image of a *running* VM to `bytes` (rounded up to a MiB; never
    /// shrunk) and raises its dataset's quota; the file system inside is left to the
    /// guest, which has it mounted and grows it online. Returns the image's size.
    pub fn grow_vm_disk(&self, vm_id: &str, bytes: u64) -> Result<u64, RootfsError> {
        let disk = self
            .vm_disk(vm_id)?
            .ok_or_else(|| RootfsError::NotMounted(self.vm_dataset(vm_id)))?;
        self.grow_image(&disk.dataset, &disk.image_path, bytes)?;
        self.bound_dataset(&disk.dataset, &disk.image_path)
    }

    /// Makes the image file `bytes` long (rounded up to a MiB) if it is shorter; true if
    /// it grew.
    fn grow_image(&self, dataset: &str, image: &Path, bytes: u64) -> Result<bool, RootfsError> {
        let have = fs::metadata(image)
            .map_err(io_err("reading disk image", image))?
            .len();
        let want = bytes.div_ceil(MIB) * MIB;
        if want <= have {
            return Ok(false);
        }
        // Room for the larger image first: the quota set for the old size would stop it.
        self.zfs
            .set(dataset, "refquota", &refquota_for(want).to_string())?;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(io_err("opening disk image", image))?;
        f.set_len(want)
            .map_err(io_err("growing disk image", image))?;
        Ok(true)
    }

    /// The disk image cannot outgrow its size, but the dataset could hold other files:
    /// bounds what the VM's dataset may reference to its disk and some metadata.
    /// Returns the image's size.
    fn bound_dataset(&self, dataset: &str, image: &Path) -> Result<u64, RootfsError> {
        let size = fs::metadata(image)
            .map_err(io_err("reading disk image", image))?
            .len();
        self.zfs
            .set(dataset, "refquota", &refquota_for(size).to_string())?;
        Ok(size)
    }

    /// The root disk `clone_for_vm` made for `vm_id`; None when it has none.
    pub fn vm_disk(&self, vm_id: &str) -> Result<Option<VmDisk>, RootfsError> {
        let dataset = self.vm_dataset(vm_id);
        validate_name(&dataset)?;
        if !self.zfs.exists(&dataset)? {
            return Ok(None);
        }
        let mountpoint = self
            .zfs
            .mountpoint(&dataset)?
            .ok_or_else(|| RootfsError::NotMounted(dataset.clone()))?;
        Ok(Some(VmDisk {
            image_path: mountpoint.join(IMAGE_FILE),
            dataset,
            mountpoint,
        }))
    }

    /// Destroys a VM's clone. Removing what is already gone is not an error.
    pub fn remove_vm_disk(&self, vm_id: &str) -> Result<(), RootfsError> {
        let dataset = self.vm_dataset(vm_id);
        self.zfs.destroy(&dataset)?;
        let dir = self.data_dir.join("apps").join(vm_id);
        match fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing mountpoint", &dir)(e)),
        }
    }

    /// VM ids that have a disk.
    pub fn vm_disks(&self) -> Result<Vec<String>, RootfsError> {
        let apps = format!("{}/apps", self.root_dataset());
        if !self.zfs.exists(&apps)? {
            return Ok(vec![]);
        }
        let prefix = format!("{apps}/");
        Ok(self
            .zfs
            .list(&apps)?
            .into_iter()
            .filter_map(|d| d.name.strip_prefix(&prefix).map(str::to_string))
            .filter(|n| !n.contains('/') && !n.contains('@'))
            .collect())
    }
}

/// The `refquota` of a VM's dataset whose disk image is `disk` bytes: the disk plus an
/// eighth and 64 MiB for ZFS's own metadata.
pub fn refquota_for(disk: u64) -> u64 {
    (disk + disk / 8 + 64 * MIB).div_ceil(MIB) * MIB
}

/// Removes `unpack-<digest>-<seq>-<pid>[.ext4]` entries whose process is gone.
/// Whether `/proc/self/mounts` text shows `dir` mounted (last) with nosuid, nodev and
/// noexec.
fn staging_is_protected(mounts: &str, dir: &Path) -> bool {
    let want = dir.display().to_string();
    mounts
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[1] == want).then(|| f[3].to_string())
        })
        .is_some_and(|opts| {
            let o: Vec<&str> = opts.split(',').collect();
            ["nosuid", "nodev", "noexec"].iter().all(|w| o.contains(w))
        })
}

fn sweep_dead_builds(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("unpack-") else {
            continue;
        };
        let pid = rest
            .trim_end_matches(".ext4")
            .rsplit('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !shellwego_sys::process::exists(pid)) {
            let path = entry.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }
}

fn join_err(e: &tokio::task::JoinError) -> RootfsError {
    RootfsError::Io {
        what: "a blocking build task".into(),
        path: PathBuf::new(),
        source: io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staging_area_counts_as_protected_only_with_all_three_flags_on_its_last_mount() {
        let dir = Path::new("/var/lib/shellwego/tmp");
        let plain = "/dev/vda / ext4 rw,relatime 0 0\n";
        assert!(!staging_is_protected(plain, dir));
        let bound = format!(
            "{plain}/dev/vda /var/lib/shellwego/tmp ext4 rw,nosuid,nodev,noexec,relatime 0 0\n"
        );
        assert!(staging_is_protected(&bound, dir));
        let partial =
            format!("{plain}/dev/vda /var/lib/shellwego/tmp ext4 rw,nosuid,relatime 0 0\n");
        assert!(!staging_is_protected(&partial, dir));
        let covered = format!("{bound}tmpfs /var/lib/shellwego/tmp tmpfs rw 0 0\n");
        assert!(!staging_is_protected(&covered, dir), "the last mount wins");
    }
}
