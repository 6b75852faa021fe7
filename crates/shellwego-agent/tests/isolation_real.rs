//! Tenant isolation, checked on a real agent with real VMs (one agent and one template
//! shared by every check of the scenario):
//!
//! - two apps restored from the same pre-booted template print 16 bytes of
//!   `/dev/urandom` as the first thing they do, and their boot_id: both differ (the guest
//!   init credits fresh host entropy and forces a CRNG reseed before the app starts, and
//!   bind-mounts a boot_id of the clone's own); hostnames, MACs and IPs differ too;
//! - an inline secret (`value = "..."` in the spec) reaches the app's environment and is
//!   found nowhere on disk in plaintext (data dir, run dir, database, agent log);
//! - nothing under the data dir or the run dir (database, consoles, disk images, sockets,
//!   leases, layer cache) can be read, written or entered by group or others.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Stack;
use shellwego_testkit::process::vm_pids;

const INLINE_SECRET: &str = "inl1ne-s3cret-vAlue";

fn spec(name: &str, image: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{image}\"\n\
         [run]\ncmd = [\"/bin/sh\", \"-c\", \"echo RANDOM=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\\\n'); \
         echo BOOT=$(cat /proc/sys/kernel/random/boot_id); \
         exec /usr/local/bin/busybox-httpd httpd -f -p 8080 -h /srv\"]\n\
         [resources]\nmemory = \"128Mi\"\n\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n{extra}"
    )
}

/// The value of the first console line of `app` that starts with `key=`.
fn console_value(stack: &Stack, app: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = stack.run(&["logs", app, "-n", "500"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(v) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix))
            .filter(|v| !v.is_empty())
        {
            return v.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{app} never printed {key}=: {text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn exec(stack: &Stack, app: &str, script: &str) -> String {
    let out = stack.run(&["exec", app, "--", "sh", "-c", script]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The group all jailed VM processes share (the base of the agent's VM uid range).
const VM_GROUP: u32 = shellwego_agent::vmm::jail::DEFAULT_UID_BASE;

/// Every file, directory and socket under `dir` that group or others may use, except
/// what is meant for the VMs alone: read-only inputs their group may read (a template's
/// memory and state, linked into each clone's chroot) and the jailer's copy of the public
/// firecracker binary in each chroot (whose directories are closed to everyone else).
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&d) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue; // a link's own mode means nothing
        }
        let in_chroot = d
            .parent()
            .is_some_and(|p| p.file_name().is_some_and(|n| n == "root"));
        let vms_only = meta.mode() & 0o007 == 0 && meta.gid() == VM_GROUP;
        let jailer_copy =
            in_chroot && d.file_name().is_some_and(|n| n == "firecracker") && meta.uid() == 0;
        if meta.mode() & 0o077 != 0 && !vms_only && !jailer_copy {
            found.push((d.clone(), meta.mode() & 0o7777));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                stack.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn isolation_clones_are_unique_and_nothing_at_rest_is_open_to_others() {
    let mut stack = Stack::new();
    let image = stack.push_web("1", b"clone\n");
    let a = stack.spec(
        "a.toml",
        &spec(
            "clone-a",
            &image,
            &format!("[secrets]\nINLINE_TOKEN = {{ value = \"{INLINE_SECRET}\" }}\n"),
        ),
    );
    let b = stack.spec("b.toml", &spec("clone-b", &image, ""));
    // An image of 200,000 (empty) files in 2,000 directories on top of the web image.
    let t = std::time::Instant::now();
    let many = stack.push_web_with(
        "many",
        b"many\n",
        &shellwego_testkit::oci::generated_tree_tar(200_000, 0, 7),
    );
    println!(
        "200k-file image pushed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let m = stack.spec("m.toml", &spec("many-files", &many, ""));
    stack.start_agent(&[]);
    // The three at once: the 200k-file image's unpacking (host work) overlaps the
    // other two starts.
    let t = std::time::Instant::now();
    std::thread::scope(|scope| {
        for file in [&a, &b, &m] {
            let stack = &stack;
            scope.spawn(move || stack.run(&["apply", "-f", file.to_str().unwrap()]));
        }
    });
    println!(
        "three apps (one with the 200k-file image) applied in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Both came from the one template of their shape; their randomness is their own.
    let (rand_a, rand_b) = (
        console_value(&stack, "clone-a", "RANDOM"),
        console_value(&stack, "clone-b", "RANDOM"),
    );
    assert_eq!(rand_a.len(), 32, "16 bytes in hex: {rand_a}");
    assert_ne!(
        rand_a, rand_b,
        "two clones read the same /dev/urandom bytes"
    );
    let (boot_a, boot_b) = (
        console_value(&stack, "clone-a", "BOOT"),
        console_value(&stack, "clone-b", "BOOT"),
    );
    assert_eq!(boot_a.len(), 36, "a UUID: {boot_a}");
    assert_ne!(boot_a, boot_b, "two clones share a boot_id");
    let identity = "echo $(hostname) $(cat /sys/class/net/eth0/address) $(ip -4 -o addr show eth0 | awk '{print $4}')";
    let (id_a, id_b) = (
        exec(&stack, "clone-a", identity),
        exec(&stack, "clone-b", identity),
    );
    let (a_parts, b_parts): (Vec<&str>, Vec<&str>) =
        (id_a.split(' ').collect(), id_b.split(' ').collect());
    assert_eq!(a_parts.len(), 3, "{id_a}");
    for (x, y) in a_parts.iter().zip(&b_parts) {
        assert_ne!(x, y, "hostname, MAC and IP differ: {id_a} / {id_b}");
    }

    // Each VM is a jailed tenant: its firecracker runs as a uid of its own, not root.
    let uids: std::collections::BTreeSet<u32> = vm_pids(&stack.run)
        .into_iter()
        .map(|pid| {
            std::fs::metadata(format!("/proc/{pid}"))
                .expect("firecracker process")
                .uid()
        })
        .collect();
    assert_eq!(uids.len(), 3, "three VMs, three uids: {uids:?}");
    assert!(
        uids.iter().all(|u| *u > VM_GROUP),
        "unprivileged uids from the VM range: {uids:?}"
    );

    // The 200,000-file image built and runs: every directory and file is there.
    for (script, want) in [
        ("echo up", "up"),
        ("ls /data7/d01999 | wc -l", "100"),
        (
            "ls /data7/d00000/f0000000 /data7/d01999/f0199999",
            "/data7/d00000/f0000000\n/data7/d01999/f0199999",
        ),
        // Names only (a glob reads the directory; `ls` would stat 2,000 inodes through
        // an emulated disk).
        ("echo /data7/d* | wc -w", "2000"),
    ] {
        let t = std::time::Instant::now();
        let out = stack
            .cmd(&["exec", "many-files", "--", "sh", "-c", script])
            .output()
            .unwrap();
        println!("exec {script:?}: {:.1} s", t.elapsed().as_secs_f64());
        if !out.status.success() {
            let logs = stack.run(&["logs", "many-files", "-n", "40"]);
            panic!(
                "exec {script:?}: {}\n--- console ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&logs.stdout)
            );
        }
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "{script}"
        );
    }

    // The inline secret is in the app's environment, and in plaintext nowhere on disk.
    assert_eq!(
        exec(&stack, "clone-a", "echo $INLINE_TOKEN"),
        INLINE_SECRET,
        "the inline secret reached the app"
    );
    stack.kill_agent();
    let t = std::time::Instant::now();
    let found = stack.at_rest_containing(INLINE_SECRET);
    assert!(found.is_empty(), "inline secret in plaintext in: {found:?}");
    println!("secret scan: {:.1} s", t.elapsed().as_secs_f64());

    // Layers are unpacked where setuid files and device nodes are inert.
    let staging = std::fs::canonicalize(stack.data.join("tmp")).expect("staging dir");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let opts = mounts
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&staging.to_str().unwrap())).then(|| f[3].to_string())
        })
        .unwrap_or_else(|| panic!("{} is not a mount of its own", staging.display()));
    for flag in ["nosuid", "nodev", "noexec"] {
        assert!(opts.split(',').any(|o| o == flag), "staging mounted {opts}");
    }

    // Nothing at rest is open to group or others.
    let mut open = open_to_others(&stack.data);
    open.extend(open_to_others(&stack.run));
    assert!(
        stack.data.join("agent.redb").is_file() && stack.data.join("bases").is_dir(),
        "the scan saw the database and the disks"
    );
    assert!(
        open.is_empty(),
        "open to group or others: {:?}",
        &open[..open.len().min(20)]
    );
}
