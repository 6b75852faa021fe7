//! Storage figures: Alpine pull cold and warm, base build, clone per VM versus a full copy
//! of the image file, and 10 clones in parallel. Runs against a real registry and ZFS
//! (zfs-fuse here); needs root. `cargo bench -p shellwego-storage`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shellwego_storage::{ImageStore, RegistryConfig, RootfsBuilder, ZfsManager};
use shellwego_testkit::oci::alpine_layout;
use shellwego_testkit::registry::Registry;
use shellwego_testkit::zfs::TestPool;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let registry = Registry::start();
    registry.push_layout(&alpine_layout(), "3.23", "library/alpine:3.23");
    let pool = TestPool::new(4 << 30);
    let data = pool.mount_root();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let reference = format!("{}/library/alpine:3.23", registry.addr);
    let config = RegistryConfig {
        insecure: vec![registry.addr.clone()],
        ..Default::default()
    };

    let store = ImageStore::open(&data.join("oci"), config).expect("store");
    let t = Instant::now();
    let image = rt
        .block_on(store.pull(&reference, &|_| {}))
        .expect("cold pull");
    let cold = t.elapsed();
    let mut warm = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        rt.block_on(store.pull(&reference, &|_| {}))
            .expect("warm pull");
        warm.push(t.elapsed());
    }
    println!(
        "alpine pull, cold (download + verify {} bytes): {}",
        image.size(),
        ms(cold)
    );
    println!(
        "alpine pull, warm (manifest only), median of 5: {}",
        ms(median(warm))
    );

    let zfs = ZfsManager::new(&pool.name).expect("zfs");
    let builder = Arc::new(RootfsBuilder::new(zfs, &data));
    let t = Instant::now();
    let (_, base) = rt
        .block_on(builder.pull_base(&store, &reference, &|_| {}))
        .expect("base");
    println!(
        "base build (unpack + mkfs.ext4 {} bytes + snapshot): {}",
        base.size_bytes,
        ms(t.elapsed())
    );

    let mut clones = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        builder
            .clone_for_vm(&base, &format!("bench-{i}"), None)
            .expect("clone");
        clones.push(t.elapsed());
    }
    let clone = median(clones);
    let src = data
        .join("bases")
        .join(image.digest_hex())
        .join("rootfs.ext4");
    let dst = data.join("copy.ext4");
    let t = Instant::now();
    std::fs::copy(&src, &dst).expect("full copy");
    let copy = t.elapsed();
    let _ = std::fs::remove_file(&dst);
    println!("clone per VM, median of 5: {}", ms(clone));
    println!("full copy of the same image file: {}", ms(copy));
    println!(
        "copy / clone ratio: {:.0}x",
        copy.as_secs_f64() / clone.as_secs_f64()
    );

    let t = Instant::now();
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let (b, base) = (builder.clone(), base.clone());
            std::thread::spawn(move || {
                b.clone_for_vm(&base, &format!("par-{i}"), None)
                    .expect("clone")
            })
        })
        .collect();
    for h in handles {
        h.join().expect("clone thread");
    }
    println!("10 clones in parallel: {}", ms(t.elapsed()));
    for vm in builder.vm_disks().expect("list") {
        builder.remove_vm_disk(&vm).expect("remove");
    }
}
