//! One-pass pulls against a real registry (CNCF distribution) and real ZFS (zfs-fuse):
//! download, digest, decompression, diff_id and unpacking in the same pass; corrupted,
//! interrupted and over-budget layers refused with nothing left behind; concurrent pulls
//! of one image downloading it once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shellwego_storage::image::{ImageError, LayerFailure, Progress};
use shellwego_storage::spool::SpoolError;
use shellwego_storage::{ImageBudget, ImageStore, RegistryConfig, RootfsBuilder, ZfsManager};
use shellwego_testkit::oci::{generated_tree_tar, ImageBuilder, LayerCompression, TarBuilder};
use shellwego_testkit::proxy::SlowProxy;
use shellwego_testkit::registry::Registry;
use shellwego_testkit::zfs::TestPool;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn open_store(root: &Path, registry_addr: &str, budget: ImageBudget) -> Arc<ImageStore> {
    let config = RegistryConfig {
        insecure: vec![registry_addr.to_string()],
        ..Default::default()
    };
    Arc::new(ImageStore::open_with(root, config, budget).expect("open the image store"))
}

/// The layer digests of the image tagged `tag` in an OCI layout.
fn layer_digests(layout: &Path) -> Vec<String> {
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).expect("read layout file")).expect("json")
    };
    let index = read(layout.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().expect("manifest");
    let manifest = read(layout.join("blobs/sha256").join(&manifest_digest[7..]));
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect()
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Files directly in a directory (e.g. a store's `tmp/`), none if it is missing.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A test's world: registry, pool, store and builder.
struct Rig {
    registry: Registry,
    pool: TestPool,
    data: PathBuf,
    zfs: ZfsManager,
    builder: Arc<RootfsBuilder>,
}

impl Rig {
    fn new() -> Rig {
        let registry = Registry::start();
        let pool = TestPool::new(2 << 30);
        let data = pool.mount_root();
        let zfs = ZfsManager::new(&pool.name).expect("zfs");
        let builder = Arc::new(RootfsBuilder::new(zfs.clone(), &data));
        Rig {
            registry,
            pool,
            data,
            zfs,
            builder,
        }
    }

    fn push(&self, image: &ImageBuilder, name_tag: &str) -> Vec<String> {
        let layout = tempfile::tempdir().expect("layout dir");
        image.write_layout(layout.path(), "t");
        self.registry.push_layout(layout.path(), "t", name_tag);
        layer_digests(layout.path())
    }

    /// Nothing of a failed build is left: no base dataset, no unpack dir, no download.
    /// Base datasets in the pool (snapshots not counted).
    fn base_datasets(&self) -> usize {
        self.zfs
            .list(&self.pool.name)
            .expect("list datasets")
            .into_iter()
            .filter(|d| d.name.contains("/images/") && !d.name.contains('@'))
            .count()
    }

    fn assert_nothing_left(&self, store_root: &Path) {
        assert_eq!(self.base_datasets(), 0, "no base dataset is left");
        assert!(files_in(&self.data.join("tmp")).is_empty(), "no unpack dir");
        assert!(
            files_in(&store_root.join("tmp")).is_empty(),
            "no partial blob"
        );
    }
}

#[test]
fn pull_multi_layer_image_builds_with_every_digest_and_diff_id_checked_in_one_pass() {
    let rig = Rig::new();
    let base_layer = TarBuilder::new()
        .dir("etc", 0o755)
        .file("etc/motd", 0o644, b"layer one\n")
        .file("etc/removed", 0o644, b"gone in layer two\n")
        .finish();
    let middle = TarBuilder::new()
        .file("etc/motd", 0o644, b"layer two\n")
        .file("etc/.wh.removed", 0o644, b"")
        .finish();
    let image = ImageBuilder::new()
        .layer(&base_layer, LayerCompression::Gzip)
        .layer(&middle, LayerCompression::Zstd)
        .layer(&generated_tree_tar(300, 8 << 10, 1), LayerCompression::Gzip);
    let digests = rig.push(&image, "multi:v1");
    let store_root = rig.data.join("oci");
    let store = open_store(&store_root, &rig.registry.addr, ImageBudget::default());
    let reference = format!("{}/multi:v1", rig.registry.addr);

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let (pulled, base) = runtime()
        .block_on(
            rig.builder
                .pull_base(&store, &reference, &move |p| sink.lock().unwrap().push(p)),
        )
        .expect("pull and build the three-layer image");
    assert!(base.built_now);
    assert_eq!(pulled.layers.len(), 3);
    assert_eq!(
        base.timings.entries,
        2 + 1 + 3 + 300,
        "etc, motd, data1, 3 dirs, 300 files"
    );

    let disk = rig
        .builder
        .clone_for_vm(&base, "vm-multi", None)
        .expect("clone");
    assert_eq!(debugfs(&disk.image_path, "cat /etc/motd"), "layer two\n");
    assert!(
        debugfs(&disk.image_path, "stat /etc/removed").is_empty(),
        "the whiteout removed it"
    );
    assert!(debugfs(&disk.image_path, "ls -l /data1/d00002").contains("f0000299"));

    // Each blob was read from the registry exactly once and is now in the cache.
    for d in &digests {
        assert_eq!(rig.registry.blob_gets(d), 1, "{d} downloaded once");
        assert!(store.blob_path(d).unwrap().exists(), "{d} cached");
    }
    let ev = events.lock().unwrap();
    assert!(matches!(
        ev.first(),
        Some(Progress::Resolved { layers: 3, .. })
    ));
    let verified = ev
        .iter()
        .filter(|p| matches!(p, Progress::Verified { .. }))
        .count();
    assert_eq!(verified, 3, "{ev:?}");
    drop(ev);

    // A config whose diff_id lies about a correct blob is refused in the same pass.
    let liar = ImageBuilder::new()
        .layer(&base_layer, LayerCompression::Gzip)
        .layer(&middle, LayerCompression::Zstd)
        .lie_about_diff_id(1);
    let liar_digests = rig.push(&liar, "liar:v1");
    let err = runtime()
        .block_on(
            rig.builder
                .pull_base(&store, &format!("{}/liar:v1", rig.registry.addr), &|_| {}),
        )
        .expect_err("a wrong diff_id is refused");
    let text = err.to_string();
    assert!(
        text.contains(&liar_digests[1]) && text.contains("diff_id"),
        "{text}"
    );
    // The blob itself is what its digest names (other images may share it): it stays;
    // the half-built base does not, and the lying image is not recorded.
    assert!(store.blob_path(&liar_digests[1]).unwrap().exists());
    assert!(
        !store
            .list()
            .unwrap()
            .iter()
            .any(|i| i.references.iter().any(|r| r.contains("liar"))),
        "the lying image is not recorded"
    );
    assert_eq!(rig.base_datasets(), 1, "only the good image's base exists");
    rig.builder
        .remove_vm_disk("vm-multi")
        .expect("remove clone");
}

#[test]
fn pull_a_corrupted_byte_is_refused_naming_the_layer_and_nothing_of_it_stays() {
    let rig = Rig::new();
    let image = ImageBuilder::new()
        .layer(&generated_tree_tar(50, 4 << 10, 2), LayerCompression::Gzip)
        .layer(
            &generated_tree_tar(200, 16 << 10, 3),
            LayerCompression::Gzip,
        );
    let digests = rig.push(&image, "corrupt:v1");
    let served = rig.registry.blob_data_path(&digests[1]);
    let mut bytes = std::fs::read(&served).expect("read served blob");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&served, &bytes).expect("corrupt served blob");

    let store_root = rig.data.join("oci");
    let store = open_store(&store_root, &rig.registry.addr, ImageBudget::default());
    let err = runtime()
        .block_on(rig.builder.pull_base(
            &store,
            &format!("{}/corrupt:v1", rig.registry.addr),
            &|_| {},
        ))
        .expect_err("a corrupted layer is refused");
    let text = err.to_string();
    assert!(text.contains(&digests[1]), "names the layer: {text}");
    assert!(
        matches!(
            err,
            shellwego_storage::rootfs::RootfsError::Image(ImageError::Layer {
                source: LayerFailure::Blob(SpoolError::Digest { .. }),
                ..
            })
        ),
        "a digest mismatch: {text}"
    );
    assert!(
        !store.blob_path(&digests[1]).unwrap().exists(),
        "not cached"
    );
    rig.assert_nothing_left(&store_root);
    assert!(store.list().unwrap().is_empty(), "no image recorded");
}

#[test]
fn pull_interrupted_mid_layer_leaves_no_partial_blob_and_the_retry_succeeds() {
    let mut rig = Rig::new();
    // 16 MiB of incompressible data, served at 4 MiB/s: the cut lands mid-layer.
    let big = generated_tree_tar(64, 512 << 10, 4);
    let image = ImageBuilder::new().layer(&big, LayerCompression::Gzip);
    let digests = rig.push(&image, "cut:v1");
    let proxy = SlowProxy::start(&rig.registry.addr, 4 << 20);
    let store_root = rig.data.join("oci");
    let store = open_store(&store_root, &proxy.addr, ImageBudget::default());
    let reference = format!("{}/cut:v1", proxy.addr);

    let (s, b, r) = (store.clone(), rig.builder.clone(), reference.clone());
    let pulling = std::thread::spawn(move || runtime().block_on(b.pull_base(&s, &r, &|_| {})));
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        let sizes: Vec<u64> = files_in(&store_root.join("tmp"))
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok().map(|m| m.len()))
            .collect();
        if let Some(&n) = sizes.iter().find(|&&n| n >= 2 << 20) {
            break n;
        }
        assert!(Instant::now() < deadline, "the download never got going");
        std::thread::sleep(Duration::from_millis(20));
    };
    rig.registry.stop();
    let err = pulling
        .join()
        .expect("pull thread")
        .expect_err("a pull cut mid-layer fails");
    let text = err.to_string();
    assert!(text.contains(&digests[0]), "names the layer: {text}");
    assert!(
        partial
            < std::fs::metadata(rig.registry.blob_data_path(&digests[0]))
                .unwrap()
                .len()
    );
    assert!(
        !store.blob_path(&digests[0]).unwrap().exists(),
        "no partial blob cached"
    );
    rig.assert_nothing_left(&store_root);

    rig.registry.restart();
    let (_, base) = runtime()
        .block_on(rig.builder.pull_base(&store, &reference, &|_| {}))
        .expect("the retry succeeds");
    assert!(base.built_now);
    assert!(store.blob_path(&digests[0]).unwrap().exists());
    assert!(files_in(&store_root.join("tmp")).is_empty());
}

#[test]
fn pull_two_apps_pulling_one_image_at_once_download_it_once() {
    let rig = Rig::new();
    let image = ImageBuilder::new()
        .layer(
            &generated_tree_tar(32, 256 << 10, 5),
            LayerCompression::Gzip,
        )
        .layer(
            &generated_tree_tar(32, 256 << 10, 6),
            LayerCompression::Zstd,
        );
    let digests = rig.push(&image, "shared:v1");
    // Slow enough that both pulls are in flight together.
    let proxy = SlowProxy::start(&rig.registry.addr, 8 << 20);
    let store_root = rig.data.join("oci");
    let store = open_store(&store_root, &proxy.addr, ImageBudget::default());
    let reference = format!("{}/shared:v1", proxy.addr);

    let (a, b) = runtime().block_on(async {
        tokio::join!(
            rig.builder.pull_base(&store, &reference, &|_| {}),
            rig.builder.pull_base(&store, &reference, &|_| {}),
        )
    });
    let (a, b) = (a.expect("first app's pull"), b.expect("second app's pull"));
    assert_eq!(a.0.digest, b.0.digest);
    assert_eq!(
        usize::from(a.1.built_now) + usize::from(b.1.built_now),
        1,
        "one base build"
    );
    for d in &digests {
        assert_eq!(
            rig.registry.blob_gets(d),
            1,
            "{d} downloaded once for two pulls"
        );
    }
}

#[test]
fn pull_an_image_over_its_byte_budget_is_refused_naming_the_layer() {
    let rig = Rig::new();
    let zeros = TarBuilder::new()
        .file("zeros", 0o644, &vec![0u8; 64 << 20])
        .finish();
    let image = ImageBuilder::new().layer(&zeros, LayerCompression::Gzip);
    let digests = rig.push(&image, "bomb:v1");
    let store_root = rig.data.join("oci");
    let budget = ImageBudget {
        max_unpacked_bytes: 16 << 20,
        ..ImageBudget::default()
    };
    let store = open_store(&store_root, &rig.registry.addr, budget);
    let err = runtime()
        .block_on(
            rig.builder
                .pull_base(&store, &format!("{}/bomb:v1", rig.registry.addr), &|_| {}),
        )
        .expect_err("over budget");
    let text = err.to_string();
    assert!(
        text.contains(&digests[0]) && text.contains("budget of 16777216"),
        "{text}"
    );
    rig.assert_nothing_left(&store_root);
}

/// The hostile-image case of the tenant-isolation plan at full size: a 3 GB zero-filled
/// layer (about 3 MB of gzip) is refused by the default budget (2 GiB unpacked), naming the
/// layer and the budget, and nothing of it stays.
#[test]
fn isolation_a_3_gb_zero_filled_layer_is_refused_by_the_default_budget() {
    let rig = Rig::new();
    let t = std::time::Instant::now();
    let image = ImageBuilder::new().zero_bomb_layer(3_000_000_000);
    let digests = rig.push(&image, "bomb3g:v1");
    println!(
        "3 GB bomb built and pushed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let store_root = rig.data.join("oci");
    let budget = ImageBudget::default();
    assert_eq!(budget.max_unpacked_bytes, 2 << 30, "the default budget");
    let store = open_store(&store_root, &rig.registry.addr, budget);
    let t = std::time::Instant::now();
    let err = runtime()
        .block_on(rig.builder.pull_base(
            &store,
            &format!("{}/bomb3g:v1", rig.registry.addr),
            &|_| {},
        ))
        .expect_err("over budget");
    println!("refused after {:.1} s", t.elapsed().as_secs_f64());
    let text = err.to_string();
    assert!(
        text.contains(&digests[0]) && text.contains(&format!("budget of {}", 2u64 << 30)),
        "{text}"
    );
    rig.assert_nothing_left(&store_root);
}

/// An image config longer than the budget allows is refused before any of it is fetched,
/// naming the limit; no layer is fetched either. (The default limit, 4 MiB, is also
/// skopeo's, so the test pushes a 100 KB config against a 64 KiB budget.)
#[test]
fn isolation_an_image_config_over_its_limit_is_refused() {
    let rig = Rig::new();
    let layer = TarBuilder::new().file("a", 0o644, b"a").finish();
    let image = ImageBuilder::new()
        .layer(&layer, LayerCompression::Gzip)
        .env(&format!("HUGE={}", "x".repeat(100_000)));
    rig.push(&image, "bigconfig:v1");
    let store_root = rig.data.join("oci");
    let budget = ImageBudget {
        max_config_bytes: 64 << 10,
        ..ImageBudget::default()
    };
    let store = open_store(&store_root, &rig.registry.addr, budget);
    let err = runtime()
        .block_on(rig.builder.pull_base(
            &store,
            &format!("{}/bigconfig:v1", rig.registry.addr),
            &|_| {},
        ))
        .expect_err("config over its limit");
    let text = err.to_string();
    assert!(
        text.contains("config") && text.contains("limit of 65536 bytes"),
        "{text}"
    );
    assert_eq!(rig.base_datasets(), 0, "nothing built");
    rig.assert_nothing_left(&store_root);
}
