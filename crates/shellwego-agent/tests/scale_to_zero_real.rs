//! Scale to zero on real VMs, one agent and one VM for every check: the test app keeps a
//! counter in memory (`swg-counter`, which never forks). With `[scale] idle` the agent
//! suspends the idle VM (its firecracker exits, memory goes back to the host, the disk
//! and network stay); 20 concurrent requests are held by the endpoint, all wait for the
//! same wake, all succeed, and the counter continues where it was. A suspend that
//! requests interrupt loses nothing. (The planning and executor rules are also proven
//! without VMs: `tc_u15_scale_to_zero_*`.)

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{http_get_path_in, Stack};
use serde_json::Value;

const PORT: u16 = 18095;

fn the_vm(ps: &Value) -> Option<Value> {
    let vms = Stack::vms(ps, "counter");
    (vms.len() == 1).then(|| vms[0].clone())
}

fn count(stack: &Stack) -> u64 {
    let body = http_get_path_in(&stack.ns, PORT, "/count").expect("GET /count");
    body.trim()
        .parse()
        .unwrap_or_else(|_| panic!("a count: {body:?}"))
}

fn firecracker_of(stack: &Stack, vm: &str) -> Option<i32> {
    shellwego_testkit::process::jailed_vms(&stack.run)
        .into_iter()
        .find(|(_, id)| id == vm)
        .map(|(pid, _)| pid)
}

#[test]
fn scale_to_zero_an_idle_app_is_suspended_woken_by_20_requests_and_its_memory_lives_on() {
    let mut stack = Stack::new();
    let image = stack.push_web_with("counter", b"-", &shellwego_testkit::oci::counter_layer());
    stack.start_agent(&[]);
    let nat_baseline = stack.resources().nat;
    let spec = stack.spec(
        "counter.toml",
        &format!(
            "name = \"counter\"\nimage = \"{image}\"\n\
             [run]\ncmd = [\"/usr/local/bin/swg-counter\"]\n\
             [resources]\nmemory = \"128Mi\"\n\
             [[ports]]\nguest = 8080\nhost = {PORT}\n\
             [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n\
             [scale]\nidle = \"4s\"\n"
        ),
    );
    stack.run(&["apply", "-f", spec.to_str().unwrap()]);
    let ps = stack.wait_ps("healthy", Duration::from_secs(300), |ps| {
        the_vm(ps).is_some_and(|v| v["state"] == "Running" && v["health"] == "Healthy")
    });
    let vm = the_vm(&ps).unwrap()["vm_id"].as_str().unwrap().to_string();
    assert_eq!(count(&stack), 1);
    assert_eq!(count(&stack), 2);

    // Idle for 4 s: suspended, its firecracker gone, memory freed; `ps` says so.
    stack.wait_ps("suspended when idle", Duration::from_secs(120), |ps| {
        the_vm(ps).is_some_and(|v| v["state"] == "Suspended")
    });
    assert_eq!(
        firecracker_of(&stack, &vm),
        None,
        "no process while suspended"
    );
    let suspended = stack
        .events()
        .into_iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .find(|m| m.starts_with("suspended in"))
        .expect("a suspend event");
    println!("{suspended}");
    let ps_text = String::from_utf8_lossy(&stack.run(&["ps"]).stdout).into_owned();
    assert!(ps_text.contains("suspended"), "{ps_text}");

    // 20 requests at once: held, one wake, all answered, the counter goes on from 2.
    let t = Instant::now();
    let answers: Vec<Result<String, String>> = std::thread::scope(|s| {
        let askers: Vec<_> = (0..20)
            .map(|_| s.spawn(|| http_get_path_in(&stack.ns, PORT, "/count")))
            .collect();
        askers
            .into_iter()
            .map(|a| a.join().expect("asker"))
            .collect()
    });
    println!(
        "20 concurrent requests to the suspended app answered in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let counts: BTreeSet<u64> = answers
        .iter()
        .map(|a| {
            a.as_ref()
                .unwrap_or_else(|e| panic!("a request failed: {e} ({answers:?})"))
                .trim()
                .parse()
                .expect("a count")
        })
        .collect();
    assert_eq!(counts, (3..=22).collect::<BTreeSet<u64>>(), "{answers:?}");
    let ps = stack.ps();
    let woken = the_vm(&ps).expect("one VM");
    assert_eq!(woken["vm_id"], vm.as_str(), "the same VM woke");
    assert_eq!(woken["state"], "Running");
    let wakes = stack
        .events()
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("woken in"))
        })
        .count();
    assert_eq!(wakes, 1, "all 20 waited for one wake");

    // A suspend by hand while requests keep coming for 2 s: a suspend they interrupt
    // (mid-snapshot or before it) is called off and the VM runs on; once they stop, it
    // is suspended (by hand or by the idle timer), and the next request wakes it. No request fails, the counter loses
    // nothing.
    let suspend = std::thread::spawn({
        let mut cmd = stack.cmd(&["suspend", "counter"]);
        move || cmd.output().expect("suspend")
    });
    let mut expect = 23;
    let traffic = Instant::now();
    while traffic.elapsed() < Duration::from_secs(2) {
        assert_eq!(count(&stack), expect);
        expect += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    // `suspend` says whether it got there: suspended once the requests stopped, or called
    // off by them (then the idle timer suspends the app).
    let out = suspend.join().expect("suspend thread");
    let said = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .into_owned();
    println!("suspend said: {}", said.trim());
    assert!(
        out.status.success() || said.contains("connections arrived"),
        "suspend: {said}"
    );
    stack.wait_ps("suspended once quiet", Duration::from_secs(60), |ps| {
        the_vm(ps).is_some_and(|v| v["state"] == "Suspended")
    });
    assert_eq!(firecracker_of(&stack, &vm), None, "suspended once quiet");
    let how: Vec<String> = stack
        .events()
        .into_iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .filter(|m| m.contains("called off"))
        .collect();
    println!(
        "{} requests during the suspend; {} suspends called off: {how:?}",
        expect - 23,
        how.len()
    );
    assert!(!how.is_empty(), "the requests interrupted the suspend");
    assert_eq!(count(&stack), expect, "woken again, memory intact");
    assert!(firecracker_of(&stack, &vm).is_some());

    stack.run(&["rm", "counter"]);
    stack.wait_ps("removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
    stack.resources().assert_only(&[], &nat_baseline);
    let data = stack.data.join("suspended");
    let left: Vec<_> = std::fs::read_dir(&data)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "suspend snapshots left: {left:?}");
}
