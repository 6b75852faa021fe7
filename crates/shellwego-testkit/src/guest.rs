//! Guest artifacts for tests: the project's guest kernel (built once and cached by
//! `scripts/build-kernel.sh`) and small busybox initramfs images.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::prereq::require_path;
use crate::process::{repo_script_path, run_ok};

/// The guest kernel: `SHELLWEGO_KERNEL` if set, else the cached build (building it if
/// needed, which takes minutes).
pub fn kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("SHELLWEGO_KERNEL") {
        let k = PathBuf::from(k);
        require_path(&k, "SHELLWEGO_KERNEL names a missing file");
        return k;
    }
    repo_script_path("build-kernel.sh")
}

/// A newc initramfs with a static busybox as `/bin/busybox` and `init` as `/init`.
pub fn busybox_initrd(dir: &Path, init: &str) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    require_path(busybox, "install busybox-static (`make setup`)");
    let root = dir.join("initrd-root");
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        fs::create_dir_all(root.join(d)).expect("initrd dirs");
    }
    fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
    fs::write(root.join("init"), init).expect("write init");
    run_ok(Command::new("chmod").arg("0755").arg(root.join("init")));
    let out = dir.join("initrd.cpio");
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        root.display(),
        out.display()
    )));
    out
}

/// The guest init, built static by `scripts/build-guest-init.sh`.
pub fn init_binary() -> PathBuf {
    repo_script_path("build-guest-init.sh")
}

/// The `swg-counter` test app (see `src/bin/swg-counter.rs`), built static by
/// `scripts/build-guest-init.sh` for use inside guests.
pub fn counter_binary() -> PathBuf {
    crate::process::repo_script_path_with(
        "build-guest-init.sh",
        &["shellwego-testkit", "swg-counter"],
    )
}

/// An ext4 image of the real Alpine 3.23 root (from the cached rootfs tarball), sized
/// `size_mib`, written to `dir/alpine.ext4`.
pub fn alpine_ext4(dir: &Path, size_mib: u64) -> PathBuf {
    let tarball = repo_script_path("make-alpine-rootfs.sh");
    let root = dir.join("alpine-root");
    fs::create_dir_all(&root).expect("alpine root dir");
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "-xf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&root),
    );
    let image = dir.join("alpine.ext4");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "rootfs", "-d"])
            .arg(&root)
            .arg(&image)
            .arg(format!("{size_mib}M")),
    );
    let _ = fs::remove_dir_all(&root);
    image
}
