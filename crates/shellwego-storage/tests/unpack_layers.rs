//! Layer unpacking on a real file system: whiteouts, links, devices, owners, xattrs, and
//! hostile layers that must be refused without touching anything outside the root.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use shellwego_storage::unpack::{LayerApplier, UnpackError};
use shellwego_testkit::oci::TarBuilder;
use shellwego_testkit::prereq::require_root;

fn apply(root: &Path, tar: Vec<u8>) -> Result<(), UnpackError> {
    LayerApplier::new(root).apply(&tar[..]).map(drop)
}

#[test]
fn layers_apply_in_order_with_whiteouts() {
    require_root("unpacking owners and device nodes");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let lower = TarBuilder::new()
        .dir("./", 0o755)
        .dir("etc/", 0o755)
        .file("etc/keep", 0o644, b"keep")
        .file("etc/gone", 0o644, b"gone")
        .dir("var/cache/", 0o755)
        .file("var/cache/old1", 0o600, b"1")
        .file("var/cache/old2", 0o600, b"2")
        .owned_file("home/user/file", 0o640, 1000, 1001, b"owned")
        .symlink("bin/sh", "/bin/busybox")
        .file("bin/busybox", 0o755, b"#!busybox")
        .hardlink("bin/ls", "bin/busybox")
        .char_device("dev/null", 0o666, 1, 3)
        .file_with_xattr("usr/bin/ping", b"ping", "user.shellwego", b"cap")
        .finish();
    apply(r, lower).unwrap();
    let upper = TarBuilder::new()
        .file("etc/.wh.gone", 0o644, b"")
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .file("var/cache/new", 0o644, b"new")
        .file("etc/keep", 0o600, b"replaced")
        .finish();
    apply(r, upper).unwrap();

    assert_eq!(fs::read(r.join("etc/keep")).unwrap(), b"replaced");
    assert_eq!(
        fs::metadata(r.join("etc/keep"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    assert!(!r.join("etc/gone").exists(), "whiteout removed the file");
    let cache: Vec<_> = fs::read_dir(r.join("var/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        cache,
        vec!["new".to_string()],
        "opaque whiteout hid lower entries only"
    );
    let owned = fs::metadata(r.join("home/user/file")).unwrap();
    assert_eq!(
        (owned.uid(), owned.gid(), owned.mode() & 0o777),
        (1000, 1001, 0o640)
    );
    assert_eq!(
        fs::read_link(r.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    let bb = fs::metadata(r.join("bin/busybox")).unwrap();
    assert_eq!(
        bb.ino(),
        fs::metadata(r.join("bin/ls")).unwrap().ino(),
        "hardlink shares the inode"
    );
    let null = fs::symlink_metadata(r.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(null.mode() & 0o777, 0o666, "device mode survives the umask");
    let xattr = xattr_of(&r.join("usr/bin/ping"), "user.shellwego");
    assert_eq!(xattr.as_deref(), Some(&b"cap"[..]));
}

fn xattr_of(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer with its length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

/// Runs a hostile layer (after an optional setup layer) in a root inside a parent dir that
/// holds a sentinel; asserts it is refused naming the entry and the sentinel is untouched.
fn assert_refused(setup: Option<Vec<u8>>, hostile: Vec<u8>, entry: &str) -> UnpackError {
    let outer = tempfile::tempdir().unwrap();
    let sentinel = outer.path().join("sentinel");
    fs::write(&sentinel, b"untouched").unwrap();
    let root = outer.path().join("root");
    fs::create_dir(&root).unwrap();
    if let Some(layer) = setup {
        apply(&root, layer).unwrap();
    }
    let err = apply(&root, hostile).unwrap_err();
    assert!(
        err.to_string().contains(entry),
        "error must name {entry:?}: {err}"
    );
    assert_eq!(fs::read(&sentinel).unwrap(), b"untouched");
    let outside: Vec<_> = fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        outside.len(),
        2,
        "nothing new outside the root: {outside:?}"
    );
    err
}

#[test]
fn hostile_layers_are_refused() {
    let err = assert_refused(
        None,
        TarBuilder::new().file("../evil", 0o644, b"x").finish(),
        "../evil",
    );
    assert!(matches!(err, UnpackError::Traversal { .. }));
    let err = assert_refused(
        None,
        TarBuilder::new().file("/etc/evil", 0o644, b"x").finish(),
        "/etc/evil",
    );
    assert!(matches!(err, UnpackError::Absolute { .. }));
    // A symlink planted by an earlier layer, then a write through it.
    let plant = TarBuilder::new().symlink("escape", "..").finish();
    let err = assert_refused(
        Some(plant.clone()),
        TarBuilder::new()
            .file("escape/sentinel", 0o644, b"owned")
            .finish(),
        "escape/sentinel",
    );
    assert!(matches!(err, UnpackError::ThroughSymlink { .. }));
    // A whiteout through the symlink, and one that climbs out.
    assert_refused(
        Some(plant.clone()),
        TarBuilder::new()
            .file("escape/.wh.sentinel", 0o644, b"")
            .finish(),
        "escape/.wh.sentinel",
    );
    assert_refused(
        None,
        TarBuilder::new()
            .file("a/../../.wh.sentinel", 0o644, b"")
            .finish(),
        ".wh.sentinel",
    );
    assert_refused(
        None,
        TarBuilder::new().file(".wh..", 0o644, b"").finish(),
        ".wh..",
    );
    // Hardlinks to outside, directly or through the planted symlink.
    assert_refused(
        None,
        TarBuilder::new().hardlink("x", "../sentinel").finish(),
        "x",
    );
    assert_refused(
        Some(plant),
        TarBuilder::new().hardlink("y", "escape/sentinel").finish(),
        "y",
    );
}

#[test]
fn a_symlink_at_the_final_component_is_replaced_not_followed() {
    let outer = tempfile::tempdir().unwrap();
    let victim = outer.path().join("victim");
    fs::write(&victim, b"original").unwrap();
    let root = outer.path().join("root");
    fs::create_dir(&root).unwrap();
    let target = victim.to_str().unwrap().to_string();
    apply(&root, TarBuilder::new().symlink("f", &target).finish()).unwrap();
    apply(&root, TarBuilder::new().file("f", 0o644, b"new").finish()).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"original");
    assert_eq!(fs::read(root.join("f")).unwrap(), b"new");
    assert!(!fs::symlink_metadata(root.join("f"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::symlink_metadata(root.join("f"))
        .unwrap()
        .file_type()
        .is_file());
}
