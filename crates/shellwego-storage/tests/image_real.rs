//! The image store and rootfs builder against a real registry and real ZFS: the real
//! Alpine 3.23 image pulled, verified, unpacked, built into a base and cloned per VM.

use std::process::Command;
use std::sync::{Arc, Mutex};

use shellwego_storage::image::{ImageError, Progress};
use shellwego_storage::{ImageStore, RegistryConfig, RootfsBuilder, ZfsManager};
use shellwego_testkit::oci::{alpine_layout, ImageBuilder, LayerCompression, TarBuilder};
use shellwego_testkit::registry::Registry;
use shellwego_testkit::zfs::TestPool;

fn store(dir: &std::path::Path, registry: &Registry) -> ImageStore {
    ImageStore::open(
        dir,
        RegistryConfig {
            insecure: vec![registry.addr.clone()],
            ..Default::default()
        },
    )
    .expect("open store")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Reads a file inside an ext4 image without mounting it.
fn debugfs_cat(image: &std::path::Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debugfs_stat(image: &std::path::Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tc_i2_alpine_pull_unpack_base_clone() {
    let registry = Registry::start();
    registry.push_layout(&alpine_layout(), "3.23", "library/alpine:3.23");
    let pool = TestPool::new(2 << 30);
    let data = pool.mount_root();
    let store = store(&data.join("oci"), &registry);
    let reference = format!("{}/library/alpine:3.23", registry.addr);

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let image = rt()
        .block_on(store.pull(&reference, &move |p| sink.lock().unwrap().push(p)))
        .expect("pull alpine");
    assert_eq!(image.config.cmd, vec!["/bin/sh"]);
    assert!(image.config.env.iter().any(|e| e.starts_with("PATH=")));
    assert!(image.config.exposed_ports.contains(&"8080/tcp".to_string()));
    {
        let ev = events.lock().unwrap();
        assert!(
            matches!(ev.first(), Some(Progress::Resolved { layers: 1, .. })),
            "{ev:?}"
        );
        assert!(
            ev.iter()
                .any(|p| matches!(p, Progress::Verified { bytes, .. } if *bytes == image.size())),
            "{ev:?}"
        );
    }

    // Pulling again downloads nothing: every layer comes from the cache.
    events.lock().unwrap().clear();
    let sink = events.clone();
    let again = rt()
        .block_on(store.pull(&reference, &move |p| sink.lock().unwrap().push(p)))
        .expect("pull again");
    assert_eq!(again.digest, image.digest);
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .all(|p| matches!(p, Progress::Resolved { .. } | Progress::Cached { .. })));
    // By digest as well.
    let by_digest = format!("{}/library/alpine@{}", registry.addr, image.digest);
    assert_eq!(
        rt().block_on(store.pull(&by_digest, &|_| {}))
            .unwrap()
            .digest,
        image.digest
    );

    let zfs = ZfsManager::new(&pool.name).unwrap();
    let builder = Arc::new(RootfsBuilder::new(zfs.clone(), &data));
    let (_, base) = rt()
        .block_on(builder.pull_base(&store, &reference, &|_| {}))
        .expect("build base");
    assert!(base.built_now);
    assert!(zfs.exists(&base.snapshot).unwrap());
    let disk = builder
        .clone_for_vm(&base, "vm-a1", Some(base.size_bytes + (64 << 20)))
        .expect("clone");
    assert!(disk.mountpoint.starts_with(data.join("apps")));
    assert!(debugfs_cat(&disk.image_path, "/etc/alpine-release").starts_with("3.23"));
    assert!(debugfs_stat(&disk.image_path, "/bin/busybox").contains("Type: regular"));
    let grown = std::fs::metadata(&disk.image_path).unwrap().len();
    assert!(
        grown >= base.size_bytes + (64 << 20),
        "clone grown to disk_bytes: {grown}"
    );
    assert_eq!(
        zfs.get_u64(&disk.dataset, "refquota").unwrap(),
        shellwego_storage::rootfs::refquota_for(grown),
        "each VM disk has a refquota"
    );

    // The base is built once; removal leaves no dataset behind.
    let (_, again) = rt()
        .block_on(builder.pull_base(&store, &reference, &|_| {}))
        .unwrap();
    assert!(!again.built_now);
    assert_eq!(builder.vm_disks().unwrap(), vec!["vm-a1".to_string()]);
    builder.remove_vm_disk("vm-a1").unwrap();
    assert!(!zfs.exists(&disk.dataset).unwrap());
    assert!(!disk.mountpoint.exists());
    builder
        .remove_vm_disk("vm-a1")
        .expect("removing twice is fine");
}

#[test]
fn concurrent_builds_of_one_digest_build_once() {
    let registry = Registry::start();
    let layer = TarBuilder::new().file("etc/hello", 0o644, b"hi\n").finish();
    let layout = tempfile::tempdir().unwrap();
    ImageBuilder::new()
        .layer(&layer, LayerCompression::Zstd)
        .write_layout(layout.path(), "v1");
    registry.push_layout(layout.path(), "v1", "tiny:v1");
    let pool = TestPool::new(1 << 30);
    let data = pool.mount_root();
    let store = Arc::new(store(&data.join("oci"), &registry));
    let reference = format!("{}/tiny:v1", registry.addr);
    let builder = Arc::new(RootfsBuilder::new(
        ZfsManager::new(&pool.name).unwrap(),
        &data,
    ));
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (b, s, r) = (builder.clone(), store.clone(), reference.clone());
            std::thread::spawn(move || {
                rt().block_on(b.pull_base(&s, &r, &|_| {}))
                    .expect("pull zstd image and build its base")
                    .1
            })
        })
        .collect();
    let built: usize = handles
        .into_iter()
        .map(|h| usize::from(h.join().unwrap().built_now))
        .sum();
    assert_eq!(built, 1, "exactly one of three concurrent callers builds");
}

#[test]
fn a_registry_serving_wrong_bytes_is_refused() {
    let registry = Registry::start();
    let layer = TarBuilder::new()
        .file("etc/hello", 0o644, b"the real content\n")
        .finish();
    let layout = tempfile::tempdir().unwrap();
    ImageBuilder::new()
        .layer(&layer, LayerCompression::Gzip)
        .write_layout(layout.path(), "v1");
    registry.push_layout(layout.path(), "v1", "liar:v1");
    // Find the layer's digest from the layout and corrupt what the registry will serve.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .path()
                .join("blobs/sha256")
                .join(&manifest_digest[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
    let served = registry.blob_data_path(layer_digest);
    let mut bytes = std::fs::read(&served).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&served, &bytes).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path(), &registry);
    let err = rt()
        .block_on(store.pull(&format!("{}/liar:v1", registry.addr), &|_| {}))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ImageError::Layer { .. }) && text.contains(layer_digest),
        "{text}"
    );
    assert!(
        store.blob_path(layer_digest).map(|p| !p.exists()).unwrap(),
        "nothing cached"
    );
    let tmp_left = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
    assert_eq!(tmp_left, 0, "no partial download left");
}

#[test]
fn bad_references_and_missing_images_get_clear_errors() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path(), &registry);
    let err = rt()
        .block_on(store.pull("Not A Reference!", &|_| {}))
        .unwrap_err();
    assert!(matches!(err, ImageError::BadReference { .. }), "{err}");
    assert!(err.to_string().contains("Not A Reference!"));
    let missing = format!("{}/nothing/here:v9", registry.addr);
    let err = rt().block_on(store.pull(&missing, &|_| {})).unwrap_err();
    assert!(err.to_string().contains("nothing/here"), "{err}");
}
