//! Bad input against a real agent: a missing guest kernel, a spec that does not validate,
//! an image that does not exist, a registry that is down, a pool that is full (refused by
//! admission, and with admission opened up, failing in the disk build). Each fails with a
//! message naming the cause, and nothing half-built is left behind.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Stack;

/// Applies `spec`, expects failure, returns what the CLI said.
fn apply_fails(stack: &Stack, file: &str, spec: &str) -> String {
    let path = stack.spec(file, spec);
    let out = stack
        .cmd(&["apply", "-f", path.to_str().unwrap(), "--timeout", "300"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "apply of {file} succeeded: {text}");
    text
}

fn remove(stack: &Stack, app: &str) {
    stack.run(&["rm", app]);
    stack.wait_ps("removed", Duration::from_secs(120), |ps| {
        Stack::vms(ps, app).is_empty()
            && !ps
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["name"] == app))
    });
}

#[test]
fn agent_bad_input_fails_with_the_cause_and_leaves_nothing() {
    let mut stack = Stack::new();
    let image = stack.push_web("1", b"never served\n");

    // A missing kernel: the agent refuses to start, naming the file and the fix.
    let out = stack
        .cmd(&["agent"])
        .env("SHELLWEGO_KERNEL", "/nonexistent/vmlinux")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent/vmlinux") && err.contains("make setup"),
        "{err}"
    );

    stack.start_agent(&[]);
    let nat_baseline = stack.resources().nat;

    // A spec that does not validate: refused before it reaches the agent.
    let text = apply_fails(
        &stack,
        "bad.toml",
        "name = \"bad\"\nimage = \"x\"\n[resources]\nmemory = \"lots\"\n",
    );
    assert!(text.contains("memory") && text.contains("lots"), "{text}");

    // An image the registry does not have.
    let missing = format!("{}/test/missing:1", stack.registry.addr);
    let text = apply_fails(
        &stack,
        "missing.toml",
        &format!("name = \"missing\"\nimage = \"{missing}\"\n"),
    );
    assert!(
        text.contains("pull") && text.contains("test/missing"),
        "{text}"
    );
    remove(&stack, "missing");

    // A registry that is down (nothing listens on port 9 in the test's namespace).
    let text = apply_fails(
        &stack,
        "down.toml",
        "name = \"down\"\nimage = \"127.0.0.1:9/test/web:1\"\n",
    );
    assert!(
        text.contains("pull") && text.contains("127.0.0.1:9"),
        "{text}"
    );
    remove(&stack, "down");

    // A full pool: a quota on the pool leaves no room for the image's root disk.
    let pool = stack.pool.name.clone();
    let quota = Command::new("zfs")
        .args(["set", "quota=4M", &pool])
        .output()
        .unwrap();
    assert!(
        quota.status.success(),
        "zfs set quota: {}",
        String::from_utf8_lossy(&quota.stderr)
    );
    let full_spec =
        format!("name = \"full\"\nimage = \"{image}\"\n[resources]\nmemory = \"128Mi\"\n");
    // Admission sees it first: `apply` is refused, naming what is short and both sizes.
    let text = apply_fails(&stack, "full.toml", &full_spec);
    assert!(
        text.contains("not enough disk") && text.contains("1024 MiB"),
        "{text}"
    );
    // An agent told to overcommit without bound still fails cleanly when the disk fills.
    stack.kill_agent();
    stack.start_agent(&[("SHELLWEGO_DISK_OVERCOMMIT", "1000000")]);
    let text = apply_fails(&stack, "full.toml", &full_spec);
    assert!(
        text.contains("rootfs") || text.contains("pull"),
        "fails in the disk build: {text}"
    );
    assert!(
        text.contains("space") || text.contains("quota") || text.contains("ENOSPC"),
        "{text}"
    );
    remove(&stack, "full");
    let _ = Command::new("zfs")
        .args(["set", "quota=none", &pool])
        .status();

    stack.resources().assert_only(&[], &nat_baseline);
    let images = String::from_utf8_lossy(
        &Command::new("zfs")
            .args(["list", "-H", "-o", "name", "-r", &pool])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !images.lines().any(|l| l.contains("/images/")),
        "no half-built base left: {images}"
    );
}
