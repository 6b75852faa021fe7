//! Replicas on real VMs: two VMs of one version behind the app's endpoint, each with its
//! own IP; one is killed (`kill -9` of its firecracker) and requests go on from that
//! instant: the agent replaces it, and the endpoint fails none of them (a connection to
//! the dead replica is retried on the live one). `rm` leaves nothing behind.
//! (The planning and endpoint rules are also proven without VMs: `tc_u15_*` and
//! `endpoint::tests::replicas_*`.)

mod common;

use std::time::Duration;

use common::{http_get_in, Prober, Stack};

const PORT: u16 = 18090;

fn healthy_vms(ps: &serde_json::Value) -> Vec<serde_json::Value> {
    Stack::vms(ps, "pair")
        .into_iter()
        .filter(|v| v["state"] == "Running" && v["health"] == "Healthy")
        .collect()
}

#[test]
fn replicas_two_serve_and_a_killed_one_is_replaced_without_failed_requests() {
    let mut stack = Stack::new();
    // The test app: it serves without forking, so the guests answer in milliseconds.
    let image = stack.push_web_with("1", b"-", &shellwego_testkit::oci::counter_layer());
    stack.start_agent(&[]);
    let nat_baseline = stack.resources().nat;
    let spec = stack.spec(
        "pair.toml",
        &format!(
            "name = \"pair\"\nimage = \"{image}\"\ncount = 2\n\
             [run]\ncmd = [\"/usr/local/bin/swg-counter\"]\n[env]\nSWG_PAGE = \"pair\"\n\
             [resources]\nmemory = \"128Mi\"\n\
             [[ports]]\nguest = 8080\nhost = {PORT}\n\
             [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n"
        ),
    );
    stack.run(&["apply", "-f", spec.to_str().unwrap()]);
    let ps = stack.wait_ps("two replicas healthy", Duration::from_secs(300), |ps| {
        healthy_vms(ps).len() == 2
    });
    let pair = healthy_vms(&ps);
    let ips: Vec<&str> = pair.iter().filter_map(|v| v["ip"].as_str()).collect();
    assert!(ips.len() == 2 && ips[0] != ips[1], "own IPs: {ips:?}");
    assert_eq!(pair[0]["version"], pair[1]["version"]);
    assert_eq!(http_get_in(&stack.ns, PORT).as_deref(), Ok("pair\n"));
    // Both replicas are behind the endpoint.
    stack.wait_ps(
        "both replicas behind the endpoint",
        Duration::from_secs(30),
        |_| {
            stack.events().iter().any(|e| {
                e["message"].as_str().is_some_and(|m| {
                    m.contains("switched to") && ips.iter().all(|ip| m.contains(ip))
                })
            })
        },
    );

    // Requests before the kill, and from the moment of the kill until the replica is
    // replaced. (A request in flight on the replica at the instant it dies is lost with
    // it, as through any TCP proxy; none of the others may fail.)
    let before = Prober::start(&stack.ns, PORT);
    std::thread::sleep(Duration::from_secs(2));
    let before = before.finish();
    assert!(before.ok > 0 && before.failed.is_empty(), "{before:?}");
    let victim = pair[0]["vm_id"].as_str().unwrap().to_string();
    let (pid, _) = shellwego_testkit::process::jailed_vms(&stack.run)
        .into_iter()
        .find(|(_, id)| *id == victim)
        .expect("the victim's firecracker");
    let before_kill = stack.last_seq();
    // SAFETY: SIGKILL to the firecracker of a VM this test's agent started, by pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let prober = Prober::start(&stack.ns, PORT);
    println!(
        "killed replica {victim} (pid {pid}) at {}",
        shellwego_agent::state::now_secs()
    );
    stack.wait_ps(
        "the killed replica replaced",
        Duration::from_secs(300),
        |ps| {
            let vms = healthy_vms(ps);
            vms.len() == 2 && vms.iter().all(|v| v["vm_id"] != victim.as_str())
        },
    );
    for e in stack
        .events()
        .iter()
        .filter(|e| e["seq"].as_u64() > Some(before_kill))
    {
        println!("event during the replacement: {} {}", e["at"], e["message"]);
    }
    std::thread::sleep(Duration::from_secs(2));
    let tally = prober.finish();
    println!(
        "requests from the kill until the replica was replaced: {} ok, {} failed, slowest {:.2}s",
        tally.ok,
        tally.failed.len(),
        tally.slowest.as_secs_f64()
    );
    assert!(tally.ok > 0);
    assert!(
        tally.failed.is_empty(),
        "failed requests: {:?}",
        tally.failed
    );

    stack.run(&["rm", "pair"]);
    stack.wait_ps("removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
    stack.resources().assert_only(&[], &nat_baseline);
}
