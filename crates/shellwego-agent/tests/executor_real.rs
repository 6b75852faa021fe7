//! The concurrent executor on real VMs: five apps applied at once come up side by side
//! while a sixth app's registry accepts connections and never answers; a removal asked
//! for meanwhile completes at once, and removing the stalled app ends its pull.
//! (The control logic behind this is proven step by step on the fake platform:
//! `reconciler::executor_tests`.)

mod common;

use std::time::{Duration, Instant};

use common::Stack;
use shellwego_testkit::listen::Listener;

/// Where the stalled "registry" listens, in the test's namespace.
const STALLED: &str = "127.0.0.1:5055";

fn spec(name: &str, image: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{image}\"\n[resources]\nmemory = \"128Mi\"\n\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n"
    )
}

fn healthy(ps: &serde_json::Value, app: &str) -> bool {
    ps.as_array()
        .and_then(|apps| apps.iter().find(|a| a["name"] == app))
        .is_some_and(|a| a["healthy"] == true)
}

fn listed(ps: &serde_json::Value, app: &str) -> bool {
    ps.as_array()
        .is_some_and(|apps| apps.iter().any(|a| a["name"] == app))
}

#[test]
fn executor_real_five_apps_at_once_beside_a_stalled_registry() {
    let mut stack = Stack::new();
    let image = stack.push_web("1", b"five\n");
    let stalled = Listener::silent(&stack.ns, STALLED);
    let registries = format!("{},{STALLED}", stack.registry.addr);
    stack.start_agent(&[("SHELLWEGO_INSECURE_REGISTRIES", &registries)]);
    let nat_baseline = stack.resources().nat;

    let stuck = stack.spec(
        "stuck.toml",
        &spec("stuck", &format!("{STALLED}/test/web:1")),
    );
    stack.run(&["apply", "-f", stuck.to_str().unwrap(), "--detach"]);
    stack.wait_ps("the stalled pull started", Duration::from_secs(30), |_| {
        !stalled.seen().is_empty()
    });

    let applied = Instant::now();
    for i in 1..=5 {
        let f = stack.spec(&format!("app{i}.toml"), &spec(&format!("app{i}"), &image));
        stack.run(&["apply", "-f", f.to_str().unwrap(), "--detach"]);
    }
    let ps = stack.wait_ps("five apps healthy", Duration::from_secs(400), |ps| {
        (1..=5).all(|i| healthy(ps, &format!("app{i}")))
    });
    let five = applied.elapsed();
    println!(
        "five apps healthy {:.1}s after they were applied",
        five.as_secs_f64()
    );
    assert!(!healthy(&ps, "stuck"), "the stalled app cannot be healthy");
    let stuck_vms = Stack::vms(&ps, "stuck");
    assert!(
        stuck_vms.iter().all(|v| v["state"] != "Running"),
        "the stalled app has no running VM: {stuck_vms:?}"
    );

    // A removal is not queued behind the stalled provision.
    let asked = Instant::now();
    stack.run(&["rm", "app3"]);
    stack.wait_ps("app3 removed", Duration::from_secs(60), |ps| {
        !listed(ps, "app3")
    });
    let removal = asked.elapsed();
    println!("app3 removed {:.1}s after `rm`", removal.as_secs_f64());
    assert!(
        removal < Duration::from_secs(30),
        "a removal waited {removal:?}: it must not queue behind the stalled app"
    );
    let ps = stack.ps();
    assert!((1..=5)
        .filter(|i| *i != 3)
        .all(|i| healthy(&ps, &format!("app{i}"))));

    // Removing the stalled app cancels its pull.
    let asked = Instant::now();
    stack.run(&["rm", "stuck"]);
    stack.wait_ps("stuck removed", Duration::from_secs(60), |ps| {
        !listed(ps, "stuck")
    });
    println!(
        "stalled app removed {:.1}s after `rm`",
        asked.elapsed().as_secs_f64()
    );

    for i in [1, 2, 4, 5] {
        stack.run(&["rm", &format!("app{i}")]);
    }
    stack.wait_ps("all removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
    stack.resources().assert_only(&[], &nat_baseline);
}
