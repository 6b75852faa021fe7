//! Crash safety: the agent is killed with SIGKILL at each step of a deploy (after the
//! pull, after the clone, after the VM started, during the health wait) and of a
//! blue-green swap (after the clone, during the health wait, after the endpoint switch).
//! The fault point `SHELLWEGO_FAULT_STALL_AT` holds the agent at the step so the kill
//! lands exactly there. Each time a new agent starts and, once left alone, converges to
//! the desired state with nothing orphaned: one VM process, one TAP + IFB, one lease, one
//! dataset per desired VM, the NAT table as before, and the endpoint serving.

mod common;

use std::time::Duration;

use common::{http_get_in, Stack};

const PORT: u16 = 18081;

fn spec(image: &str) -> String {
    format!(
        "name = \"crashy\"\nimage = \"{image}\"\n[resources]\nmemory = \"128Mi\"\n\
         [[ports]]\nguest = 8080\nhost = {PORT}\n\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n\
         [bandwidth]\ndownload = \"100Mbit\"\nupload = \"100Mbit\"\n"
    )
}

/// Kills the agent at each of `points` in turn (a fresh agent each time, told to stall
/// there); `apply` (detached) is sent to the first one. `since` is the last event seen
/// before: a fresh agent can reach its stall point before the test could ask it for its
/// newest event, so each wait looks past the event the previous one found.
fn kill_at(stack: &mut Stack, points: &[&str], apply: &std::path::Path, since: u64) {
    let mut since = since;
    for (i, point) in points.iter().enumerate() {
        stack.start_agent(&[("SHELLWEGO_FAULT_STALL_AT", point)]);
        if i == 0 {
            stack.run(&["apply", "-f", apply.to_str().unwrap(), "--detach"]);
        }
        let stalled = stack.wait_event(
            since,
            &format!("stalled at {point}"),
            Duration::from_secs(300),
        );
        since = stalled["seq"].as_u64().unwrap_or(since);
        stack.kill_agent();
        println!("agent killed at {point}");
    }
}

/// Starts a normal agent and waits for one healthy VM of the version `apply` printed.
fn converge(stack: &mut Stack, version: &str) -> String {
    stack.start_agent(&[]);
    let ps = stack.wait_ps("converged", Duration::from_secs(400), |ps| {
        let vms = Stack::vms(ps, "crashy");
        vms.len() == 1 && vms[0]["version"] == version && vms[0]["health"] == "Healthy"
    });
    Stack::vms(&ps, "crashy")[0]["vm_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn version_of(stack: &Stack, spec: &std::path::Path) -> String {
    let out = stack.run(&["validate", "-f", spec.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["version"].as_str().unwrap().to_string()
}

#[test]
fn tc_crash_1_kill9_during_deploy_and_swap_leaves_no_orphans() {
    let mut stack = Stack::new();
    let v1 = stack.spec("v1.toml", &spec(&stack.push_web("1", b"v1\n")));
    let v2 = stack.spec("v2.toml", &spec(&stack.push_web("2", b"v2\n")));
    stack.start_agent(&[]);
    let nat_baseline = stack.resources().nat;
    let since = stack.last_seq();
    stack.kill_agent();

    kill_at(
        &mut stack,
        &["after-pull", "after-clone", "after-vm-start", "health-wait"],
        &v1,
        since,
    );
    let version = version_of(&stack, &v1);
    let blue = converge(&mut stack, &version);
    stack
        .resources()
        .assert_only(std::slice::from_ref(&blue), &nat_baseline);
    assert_eq!(http_get_in(&stack.ns, PORT).as_deref(), Ok("v1\n"));
    let since = stack.last_seq();
    stack.kill_agent();

    kill_at(
        &mut stack,
        &["after-clone", "health-wait", "after-switch"],
        &v2,
        since,
    );
    let version = version_of(&stack, &v2);
    let green = converge(&mut stack, &version);
    assert_ne!(green, blue);
    stack
        .resources()
        .assert_only(std::slice::from_ref(&green), &nat_baseline);
    assert_eq!(http_get_in(&stack.ns, PORT).as_deref(), Ok("v2\n"));

    stack.run(&["rm", "crashy"]);
    stack.wait_ps("app removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
    stack.resources().assert_only(&[], &nat_baseline);
}
