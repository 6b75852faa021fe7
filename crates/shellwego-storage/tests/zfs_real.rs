//! ZfsManager against a real ZFS (zfs-fuse here), on a throwaway pool per test.

use std::fs;

use shellwego_storage::{DatasetKind, ZfsFlavor, ZfsManager};
use shellwego_testkit::zfs::TestPool;

fn manager(pool: &TestPool) -> ZfsManager {
    ZfsManager::new(&pool.name).expect("zfs commands present")
}

#[test]
fn tc_i2_snapshot_and_clone_are_copy_on_write() {
    let pool = TestPool::new(1 << 30);
    let zfs = manager(&pool);
    let base = format!("{}/shellwego/test-app", pool.name);
    let origin_mnt = pool.mount_root().join("images/test-app");
    let origin_mnt_str = origin_mnt.to_str().unwrap();
    zfs.create(
        &base,
        &[
            ("mountpoint", origin_mnt_str),
            ("compression", zfs.flavor().compression()),
        ],
    )
    .expect("create dataset");
    assert_eq!(
        zfs.mountpoint(&base).unwrap().as_deref(),
        Some(origin_mnt.as_path())
    );
    fs::write(origin_mnt.join("hello.txt"), b"from the base\n").unwrap();

    let snap = format!("{base}@base");
    zfs.snapshot(&snap).expect("snapshot");
    assert!(zfs.exists(&snap).unwrap());

    let clone = format!("{}/shellwego/apps/vm-1", pool.name);
    let clone_mnt = pool.mount_root().join("apps/vm-1");
    zfs.clone_snapshot(
        &snap,
        &clone,
        &[("mountpoint", clone_mnt.to_str().unwrap())],
    )
    .expect("clone");

    // Mounted under .../apps/..., shows the snapshot's content, and is writable.
    let mounted = zfs.mountpoint(&clone).unwrap().expect("clone is mounted");
    assert!(
        mounted.starts_with(pool.mount_root().join("apps")),
        "{}",
        mounted.display()
    );
    assert_eq!(
        fs::read(mounted.join("hello.txt")).unwrap(),
        b"from the base\n"
    );
    fs::write(mounted.join("hello.txt"), b"changed in the clone\n").unwrap();
    fs::write(mounted.join("new.txt"), b"only in the clone\n").unwrap();
    assert_eq!(
        fs::read(mounted.join("hello.txt")).unwrap(),
        b"changed in the clone\n"
    );

    // The origin is untouched.
    assert_eq!(
        fs::read(origin_mnt.join("hello.txt")).unwrap(),
        b"from the base\n"
    );
    assert!(!origin_mnt.join("new.txt").exists());

    let listed = zfs.list(&format!("{}/shellwego", pool.name)).unwrap();
    let clone_info = listed
        .iter()
        .find(|d| d.name == clone)
        .expect("clone listed");
    assert_eq!(clone_info.origin.as_deref(), Some(snap.as_str()));
    assert!(listed
        .iter()
        .any(|d| d.name == snap && d.kind == DatasetKind::Snapshot));

    // The base cannot go while a clone depends on it; the clone can.
    assert!(zfs.destroy(&base).is_err());
    zfs.destroy(&clone).expect("destroy clone");
    assert!(!zfs.exists(&clone).unwrap());
    zfs.destroy(&base).expect("destroy base after its clone");
    assert!(!zfs.exists(&base).unwrap());
}

#[test]
fn zfs_manager_reports_pool_and_exact_properties() {
    let pool = TestPool::new(512 << 20);
    let zfs = manager(&pool);
    assert!(zfs.pool_health().unwrap().is_online());
    let ds = format!("{}/data", pool.name);
    zfs.create(
        &ds,
        &[(
            "mountpoint",
            pool.mount_root().join("data").to_str().unwrap(),
        )],
    )
    .unwrap();
    let avail = zfs.get_u64(&ds, "available").unwrap();
    assert!(
        avail > 100 << 20 && avail < 512 << 20,
        "available = {avail}"
    );
    zfs.set(&ds, "compression", zfs.flavor().compression())
        .unwrap();
    assert_eq!(
        zfs.get(&ds, &["compression"]).unwrap()["compression"],
        zfs.flavor().compression()
    );
    // Destroying what does not exist is not an error; a dataset below a missing one is.
    zfs.destroy(&format!("{}/nothing", pool.name)).unwrap();
    let err = zfs
        .snapshot(&format!("{}/nothing@x", pool.name))
        .unwrap_err();
    assert!(err.to_string().contains("nothing@x"), "{err}");
    if zfs.flavor() == ZfsFlavor::ZfsFuse {
        assert!(!zfs.flavor().has_zvols());
    }
}

#[test]
fn zfs_manager_refuses_a_missing_pool() {
    let _pool = TestPool::new(256 << 20);
    let zfs = ZfsManager::new("swg-no-such-pool").unwrap();
    let err = zfs.pool_health().unwrap_err();
    assert!(err.to_string().contains("swg-no-such-pool"), "{err}");
}

/// Datasets made side by side under a parent that does not exist yet (VMs of several
/// apps started at once): every one is made, none fails on the parent the others made.
#[test]
fn tc_i2_datasets_made_at_once_under_a_new_parent_all_succeed() {
    let pool = TestPool::new(1 << 30);
    let zfs = std::sync::Arc::new(manager(&pool));
    let parent = format!("{}/shellwego/racing", pool.name);
    for round in 0..3 {
        let parent = format!("{parent}{round}");
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let (zfs, name) = (zfs.clone(), format!("{parent}/vm-{i}"));
                std::thread::spawn(move || zfs.create(&name, &[("mountpoint", "none")]))
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let made = t.join().expect("thread");
            assert!(made.is_ok(), "round {round}, dataset {i}: {made:?}");
            assert!(zfs.exists(&format!("{parent}/vm-{i}")).unwrap());
        }
    }
}

/// The suite's search for secrets at rest reads a pool through `zfs send` streams
/// (`TestPool::datasets_containing`): it must find bytes deep in a sparse disk image,
/// in a clone, and in a snapshot whose file has changed since, and nothing that is not
/// there.
#[test]
fn tc_i2_pool_scan_finds_bytes_in_sparse_files_clones_and_old_snapshots() {
    use std::io::{Seek, SeekFrom, Write};
    let pool = TestPool::new(512 << 20);
    let zfs = manager(&pool);
    let ds = format!("{}/scan", pool.name);
    let mnt = pool.mount_root().join("scan");
    zfs.create(&ds, &[("mountpoint", mnt.to_str().unwrap())])
        .unwrap();
    let write_at = |offset: u64, bytes: &[u8]| {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(mnt.join("disk.img"))
            .unwrap();
        f.set_len(256 << 20).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    };
    write_at(200 << 20, b"..NEEDLE-0451..");
    assert_eq!(pool.datasets_containing("NEEDLE-0451"), vec![ds.clone()]);

    let snap = format!("{ds}@before");
    zfs.snapshot(&snap).unwrap();
    let clone = format!("{}/scan-clone", pool.name);
    zfs.clone_snapshot(&snap, &clone, &[("mountpoint", "none")])
        .unwrap();
    write_at(200 << 20, b"..overwritten..");
    let mut found = pool.datasets_containing("NEEDLE-0451");
    found.sort();
    assert_eq!(found, vec![clone.clone(), snap.clone()]);
    assert!(pool.datasets_containing("NEEDLE-0452").is_empty());
    // The scan's own snapshots are gone again.
    assert!(!zfs.exists(&format!("{ds}@swg-scan")).unwrap());
}
