//! Pull + root disk figures, side by side in one run on this host, same registry:
//!
//! - ours: `RootfsBuilder::pull_base` from an empty cache (download, digests, diff_ids,
//!   unpack, sizing, `mkfs.ext4 -d` on scratch, sparse copy into the dataset, snapshot);
//! - `skopeo copy` to an OCI layout + `umoci unpack` of it (what a user would script);
//! - `mkfs.ext4 -d` of the same tree alone, into a file on the host's disk and into a
//!   ZFS dataset (what the disk costs without any pulling).
//!
//! Images: the demo image (Alpine + busybox httpd, 2 layers), a generated single layer of
//! ~80 MB compressed / 10,000 files, a generated 5-layer image, and 200,000 small files.
//! Needs root (ZFS), `skopeo` and `umoci` (`make setup`). `SWG_BENCH_ONLY=name` runs one
//! image. `cargo bench -p shellwego-storage --bench pull`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shellwego_storage::ext4::base_inodes;
use shellwego_storage::{ImageStore, RegistryConfig, RootfsBuilder, ZfsManager};
use shellwego_testkit::oci::{
    alpine_web_image, generated_tree_tar, ImageBuilder, LayerCompression,
};
use shellwego_testkit::prereq::require_command;
use shellwego_testkit::process::run_ok;
use shellwego_testkit::registry::Registry;
use shellwego_testkit::zfs::TestPool;

/// Writes one test image as an OCI layout (tag "1") into a directory.
type WriteLayout = dyn Fn(&Path);

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn layout_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Plain `mkfs.ext4 -d TREE` (default options) into `file`, sized like our bases and
/// with as many inodes; returns the time.
fn mkfs_alone(tree: &Path, file: &Path, size: u64, inodes: u64) -> Duration {
    let _ = std::fs::remove_file(file);
    timed(|| {
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-N", &inodes.to_string(), "-d"])
                .arg(tree)
                .arg(file)
                .arg(format!("{}k", size / 1024)),
        );
    })
}

fn main() {
    require_command("skopeo", "apt-get install skopeo (`make setup`)");
    require_command("umoci", "apt-get install umoci (`make setup`)");
    let only = std::env::var("SWG_BENCH_ONLY").ok();
    let registry = Registry::start();
    let pool = TestPool::new(16 << 30);
    let data = pool.mount_root();
    let zfs = ZfsManager::new(&pool.name).expect("zfs");
    let work = tempfile::tempdir_in("/var/tmp").expect("work dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    println!("building the test images (not timed) ...");
    let images: Vec<(&str, Box<WriteLayout>)> = vec![
        (
            "demo",
            Box::new(|dir: &Path| alpine_web_image(dir, b"hello\n")),
        ),
        (
            "10k-files",
            Box::new(|dir: &Path| {
                ImageBuilder::new()
                    .layer(
                        &generated_tree_tar(10_000, 14 << 10, 7),
                        LayerCompression::Gzip,
                    )
                    .write_layout(dir, "1");
            }),
        ),
        (
            "5-layers",
            Box::new(|dir: &Path| {
                let mut b = ImageBuilder::new();
                for i in 0..5 {
                    b = b.layer(
                        &generated_tree_tar(800, 32 << 10, 10 + i),
                        LayerCompression::Gzip,
                    );
                }
                b.write_layout(dir, "1");
            }),
        ),
        (
            "200k-files",
            Box::new(|dir: &Path| {
                ImageBuilder::new()
                    .layer(&generated_tree_tar(200_000, 64, 20), LayerCompression::Gzip)
                    .write_layout(dir, "1");
            }),
        ),
    ];

    println!(
        "{:<11} {:>9} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>6} | {:>9} {:>9}",
        "image", "MB comp.", "entries", "ours", "unpack", "mkfs", "copy", "other", "skopeo", "umoci",
        "sum", "ratio", "mkfs tmp", "mkfs zfs"
    );
    for (n, (name, build)) in images.iter().enumerate() {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        let layout = work.path().join(format!("{name}-layout"));
        build(&layout);
        registry.push_layout(&layout, "1", &format!("bench/{name}:1"));
        let reference = format!("{}/bench/{name}:1", registry.addr);
        let compressed = layout_size(&layout);

        // Ours, from an empty cache and no base.
        let store = ImageStore::open(
            &data.join(format!("oci-{n}")),
            RegistryConfig {
                insecure: vec![registry.addr.clone()],
                ..Default::default()
            },
        )
        .expect("store");
        let builder = Arc::new(RootfsBuilder::new(zfs.clone(), &data));
        let t = Instant::now();
        let (_, base) = rt
            .block_on(builder.pull_base(&store, &reference, &|_| {}))
            .expect("our pull + base build");
        let ours = t.elapsed();
        let tm = &base.timings;
        let other = ours.saturating_sub(tm.unpack + tm.mkfs + tm.copy);

        // skopeo copy + umoci unpack.
        let oci = work.path().join(format!("{name}-skopeo"));
        let bundle = work.path().join(format!("{name}-bundle"));
        let skopeo = timed(|| {
            run_ok(Command::new("skopeo").args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                &format!("docker://{reference}"),
                &format!("oci:{}:1", oci.display()),
            ]));
        });
        let umoci = timed(|| {
            run_ok(
                Command::new("umoci")
                    .args(["unpack", "--image", &format!("{}:1", oci.display())])
                    .arg(&bundle),
            );
        });
        let theirs = skopeo + umoci;

        // mkfs.ext4 -d of umoci's tree alone: on the host's disk, and into a dataset.
        let inodes = base_inodes(tm.entries, base.size_bytes);
        let tree = bundle.join("rootfs");
        let on_disk = mkfs_alone(
            &tree,
            &work.path().join("alone.ext4"),
            base.size_bytes,
            inodes,
        );
        let _ = std::fs::remove_file(work.path().join("alone.ext4"));
        let ds = format!("{}/mkfs-{n}", pool.name);
        let mp = data.join(format!("mkfs-{n}"));
        zfs.create(
            &ds,
            &[
                ("mountpoint", &mp.to_string_lossy()),
                ("compression", zfs.flavor().compression()),
            ],
        )
        .expect("dataset");
        let on_zfs = mkfs_alone(&tree, &mp.join("alone.ext4"), base.size_bytes, inodes);
        let _ = zfs.destroy(&ds);

        println!(
            "{:<11} {:>9.1} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>6.2} | {:>9} {:>9}",
            name,
            compressed as f64 / 1e6,
            tm.entries,
            secs(ours),
            secs(tm.unpack),
            secs(tm.mkfs),
            secs(tm.copy),
            secs(other),
            secs(skopeo),
            secs(umoci),
            secs(theirs),
            ours.as_secs_f64() / theirs.as_secs_f64(),
            secs(on_disk),
            secs(on_zfs),
        );
        println!(
            "{:<11} ours in detail: download+check+unpack {}, sizing {}, mkfs.ext4 -d on scratch {}, copy into ZFS {}, snapshot {}; {} MB unpacked; pull+unpack alone vs skopeo+umoci: {:.2}x",
            "",
            secs(tm.unpack),
            secs(tm.sizing),
            secs(tm.mkfs),
            secs(tm.copy),
            secs(tm.snapshot),
            tm.content_bytes / 1_000_000,
            tm.unpack.as_secs_f64() / theirs.as_secs_f64(),
        );
        let _ = std::fs::remove_dir_all(&oci);
        let _ = std::fs::remove_dir_all(&bundle);
        let _ = std::fs::remove_dir_all(&layout);
    }
    println!(
        "ratio = ours (pull + unpack + ext4 root disk + snapshot) / (skopeo copy + umoci unpack)"
    );
}
