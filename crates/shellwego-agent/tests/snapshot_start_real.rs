//! App snapshots on real VMs, one agent for every check: with `[snapshot] enabled`, the
//! first healthy VM of a version is snapshotted (memory, state, disk in one pause); a
//! second replica is restored from that snapshot — its app already running, with the
//! source's memory (the token the app drew at start) — and gets its own IP, MAC, hostname
//! and random bytes, and the after-restore signal. A replica killed with SIGKILL is
//! replaced from the snapshot while the endpoint fails no request. Another app of the
//! image, with a larger disk, starts from the image template and grows its root online.
//! Removing the app deletes the snapshot.

mod common;

use std::time::{Duration, Instant};

use common::{http_get_at_in, Prober, Stack};
use serde_json::Value;

const PORT: u16 = 18097;

fn healthy(ps: &Value) -> Vec<Value> {
    Stack::vms(ps, "snap")
        .into_iter()
        .filter(|v| v["state"] == "Running" && v["health"] == "Healthy")
        .collect()
}

/// `GET /PATH` of the VM at `ip` directly (not through the endpoint).
fn vm_get(stack: &Stack, ip: &str, path: &str) -> String {
    let ip = ip.parse().expect("an IPv4 address");
    http_get_at_in(&stack.ns, ip, 8080, path)
        .unwrap_or_else(|e| panic!("GET {ip}{path}: {e}"))
        .trim()
        .to_string()
}

fn events_with(stack: &Stack, text: &str) -> Vec<Value> {
    stack
        .events()
        .into_iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

#[test]
fn snapshot_start_replicas_from_an_app_snapshot_are_unique_and_replace_a_killed_one() {
    let mut stack = Stack::new();
    let image = stack.push_web_with("snap", b"-", &shellwego_testkit::oci::counter_layer());
    // Online growing, which this host kind does not choose by itself (see below).
    stack.start_agent(&[("SHELLWEGO_ONLINE_GROW", "1")]);
    let nat_baseline = stack.resources().nat;
    let spec = |count: u32| {
        stack.spec(
            &format!("snap{count}.toml"),
            &format!(
                "name = \"snap\"\nimage = \"{image}\"\ncount = {count}\n\
                 [run]\ncmd = [\"/usr/local/bin/swg-counter\"]\n\
                 [resources]\nmemory = \"128Mi\"\n\
                 [[ports]]\nguest = 8080\nhost = {PORT}\n\
                 [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n\
                 [snapshot]\nenabled = true\nafter_restore = \"SIGUSR2\"\n"
            ),
        )
    };
    stack.run(&["apply", "-f", spec(1).to_str().unwrap()]);
    let ps = stack.wait_ps("one healthy", Duration::from_secs(300), |ps| {
        healthy(ps).len() == 1
    });
    let source = healthy(&ps)[0].clone();
    // The image's first warm start built its image template and started from it.
    let messages: Vec<Value> = stack
        .events()
        .into_iter()
        .map(|e| e["message"].clone())
        .collect();
    assert_eq!(
        events_with(&stack, "built the image template").len(),
        1,
        "{messages:#?}"
    );
    assert_eq!(
        events_with(&stack, "restoring from the image template").len(),
        1
    );
    println!(
        "{}",
        events_with(&stack, "built the image template")[0]["message"]
    );
    let source_ip = source["ip"].as_str().unwrap().to_string();
    for n in 1..=3 {
        assert_eq!(vm_get(&stack, &source_ip, "/count"), n.to_string());
    }
    let taken = stack.wait_event(0, "app snapshot of version", Duration::from_secs(120));
    println!("{}", taken["message"]);
    assert!(
        taken["message"].as_str().unwrap().contains("taken"),
        "{taken}"
    );

    // A second replica of the same version: restored from the snapshot, not booted.
    let t = Instant::now();
    stack.run(&["apply", "-f", spec(2).to_str().unwrap()]);
    let ps = stack.wait_ps("two healthy", Duration::from_secs(300), |ps| {
        healthy(ps).len() == 2
    });
    println!(
        "a replica from the app snapshot: apply -> healthy {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let replica = healthy(&ps)
        .into_iter()
        .find(|v| v["vm_id"] != source["vm_id"])
        .expect("the new replica");
    let replica_id = replica["vm_id"].as_str().unwrap().to_string();
    assert_eq!(
        events_with(&stack, "restoring from the app snapshot")
            .iter()
            .filter(|e| e["vm_id"] == replica_id.as_str())
            .count(),
        1,
        "the replica was restored from the snapshot"
    );
    let replica_ip = replica["ip"].as_str().unwrap().to_string();
    assert_ne!(replica_ip, source_ip);
    // Both count on from where the source was at the snapshot (taken once it was healthy,
    // somewhere in the three requests above).
    let at = |ip: &str| {
        vm_get(&stack, ip, "/count")
            .parse::<u64>()
            .expect("a count")
    };
    let replica_count = at(&replica_ip);
    assert!((1..=4).contains(&replica_count), "{replica_count}");
    assert_eq!(at(&source_ip), 4);
    // Its own identity: hostname, MAC, random bytes; the after-restore signal came.
    let id = |ip: &str| -> Vec<String> {
        vm_get(&stack, ip, "/id")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let (a, b) = (id(&source_ip), id(&replica_ip));
    println!("source  {a:?}\nreplica {b:?}");
    assert_eq!((a.len(), b.len()), (5, 5));
    assert_eq!(
        a[4], b[4],
        "the app's memory (its start token) came from the snapshot"
    );
    assert_ne!(a[0], b[0], "hostnames");
    assert!(b[0].starts_with("snap-") && replica_id.starts_with(&b[0][5..]));
    assert_ne!(a[1], b[1], "MACs");
    assert_ne!(a[2], b[2], "random bytes");
    assert_eq!(
        (a[3].as_str(), b[3].as_str()),
        ("0", "1"),
        "after-restore signal"
    );

    // The replica killed: replaced from the snapshot, and no request fails meanwhile.
    let prober = Prober::start(&stack.ns, PORT);
    std::thread::sleep(Duration::from_secs(1));
    let (pid, _) = shellwego_testkit::process::jailed_vms(&stack.run)
        .into_iter()
        .find(|(_, id)| *id == replica_id)
        .expect("the replica's firecracker");
    let before_kill = stack.last_seq();
    // SAFETY: SIGKILL to the firecracker of a VM this test's agent started, by pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = Instant::now();
    println!("killed at {}", shellwego_agent::state::now_secs());
    stack.wait_ps("replaced", Duration::from_secs(300), |ps| {
        let vms = healthy(ps);
        vms.len() == 2 && vms.iter().all(|v| v["vm_id"] != replica_id.as_str())
    });
    let replaced = t.elapsed();
    for e in stack
        .events()
        .iter()
        .filter(|e| e["seq"].as_u64() > Some(before_kill))
    {
        println!("event during the replacement: {} {}", e["at"], e["message"]);
    }
    std::thread::sleep(Duration::from_secs(1));
    let tally = prober.finish();
    println!(
        "killed replica replaced in {:.1}s; {} requests meanwhile, {} failed, slowest {:.2}s",
        replaced.as_secs_f64(),
        tally.ok,
        tally.failed.len(),
        tally.slowest.as_secs_f64()
    );
    // A request in flight on the replica at the instant it dies is lost with it, as
    // through any TCP proxy (the proxy cannot know whether replaying it is safe); every
    // other one succeeds.
    assert!(tally.ok > 0 && tally.failed.len() <= 1, "{tally:?}");
    assert_eq!(
        events_with(&stack, "restoring from the app snapshot").len(),
        2,
        "the replacement came from the snapshot too"
    );

    // Another app of the same image and shape, with a larger disk, starts from the image
    // template built for the first (root already mounted): its disk grows online, and
    // only `run` is left for its guest. (A quarter more: the guest's resize costs about
    // 20 s per GiB on this host kind, which therefore builds a template per disk size
    // unless told otherwise.)
    let other = stack.spec(
        "other.toml",
        &format!(
            "name = \"other\"\nimage = \"{image}\"\n\
             [run]\ncmd = [\"/usr/local/bin/swg-counter\", \"8081\"]\n\
             [resources]\nmemory = \"128Mi\"\ndisk = \"1280Mi\"\n\
             [health]\nhttp = \"/\"\nport = 8081\ninterval = \"1s\"\ntimeout = \"1s\"\n"
        ),
    );
    let t = Instant::now();
    stack.run(&["apply", "-f", other.to_str().unwrap()]);
    stack.wait_ps("the other app healthy", Duration::from_secs(300), |ps| {
        Stack::vms(ps, "other")
            .iter()
            .any(|v| v["state"] == "Running" && v["health"] == "Healthy")
    });
    println!(
        "a start from the image template, its disk grown online: apply -> healthy {:.1}s",
        t.elapsed().as_secs_f64()
    );
    for e in stack.events().iter().filter(|e| e["app"] == "other") {
        println!("event of the start: {} {}", e["at"], e["message"]);
    }
    assert_eq!(events_with(&stack, "built the image template").len(), 1);
    assert_eq!(
        events_with(&stack, "restoring from the image template").len(),
        2
    );
    // Its mounted root file system fills the 1.25 GiB disk (the template's has 1 GiB).
    let df = stack.run(&["exec", "other", "--", "df", "-k", "/"]);
    let df = String::from_utf8_lossy(&df.stdout).into_owned();
    let total_kib: u64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df output: {df}"));
    assert!(
        total_kib > 1200 << 10 && total_kib <= 1280 << 10,
        "the root file system has {total_kib} KiB: {df}"
    );
    stack.run(&["rm", "other"]);

    // Removed with the app (the sweep at the next agent start deletes it at once).
    stack.run(&["rm", "snap"]);
    stack.wait_ps("removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
    stack.kill_agent();
    stack.start_agent(&[]);
    let files: Vec<_> = std::fs::read_dir(stack.data.join("app-snapshots"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(files.is_empty(), "app snapshot files left: {files:?}");
    let kept = std::process::Command::new("zfs")
        .args(["list", "-H", "-o", "name", "-r"])
        .arg(format!("{}/shellwego", stack.pool.name))
        .output()
        .expect("zfs list");
    let kept = String::from_utf8_lossy(&kept.stdout);
    // Only the image template's disk stays (until it is unused for the agent's TTL).
    let left: Vec<&str> = kept.lines().filter(|l| l.contains("/snapshots/")).collect();
    assert!(
        left.iter().all(|l| l.contains("/snapshots/img_")),
        "app snapshot disks left: {left:?}"
    );
    stack.resources().assert_only(&[], &nat_baseline);
}
