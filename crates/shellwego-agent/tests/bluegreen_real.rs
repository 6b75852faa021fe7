//! TC-E2E-3: a health-gated blue-green swap behind the app's stable endpoint.
//!
//! V1 serves on the published port; a client in the test's namespace requests the
//! endpoint in a loop (a new connection each time) while the desired state moves to V2.
//! The recorded events must show V1 stopped only after V2's health check passed and the
//! endpoint moved; the client must see no failed request. Then a V3 that never becomes
//! healthy is applied: `apply` fails with the reason, V2 keeps serving, the client still
//! sees no failure. `rm` leaves no VM, TAP, lease, QoS rule or dataset behind.

mod common;

use std::time::{Duration, Instant};

use common::{http_get_in, Prober, Stack};
use serde_json::Value;

const PORT: u16 = 18080;

/// The app at `page`: the test app (it serves without forking) answers it; `extra`
/// replaces its command.
fn spec(image: &str, page: &str, extra: &str) -> String {
    let run = if extra.is_empty() {
        "[run]\ncmd = [\"/usr/local/bin/swg-counter\"]\n"
    } else {
        extra
    };
    format!(
        "name = \"shop\"\nimage = \"{image}\"\n{run}[env]\nSWG_PAGE = \"{page}\"\n\
         [resources]\nmemory = \"128Mi\"\n\
         [[ports]]\nguest = 8080\nhost = {PORT}\n\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\ngrace = \"3s\"\n\
         [bandwidth]\ndownload = \"100Mbit\"\nupload = \"100Mbit\"\n"
    )
}

/// The sequence number of the first event of `vm` whose message contains `text`.
fn seq_of(events: &[Value], vm: &str, text: &str) -> u64 {
    events
        .iter()
        .find(|e| e["vm_id"] == vm && e["message"].as_str().is_some_and(|m| m.contains(text)))
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or_else(|| panic!("no event {text:?} of VM {vm}: {events:#?}"))
}

#[test]
fn tc_e2e_3_blue_green_swap_without_failed_requests() {
    let mut stack = Stack::new();
    // One image; the versions differ by their environment.
    let image = stack.push_web_with("1", b"-", &shellwego_testkit::oci::counter_layer());
    stack.start_agent(&[]);
    let nat_baseline = stack.resources().nat;

    let f1 = stack.spec("v1.toml", &spec(&image, "v1", ""));
    stack.run(&["apply", "-f", f1.to_str().unwrap()]);
    assert_eq!(http_get_in(&stack.ns, PORT).as_deref(), Ok("v1\n"));
    let blue = Stack::vms(&stack.ps(), "shop")[0]["vm_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The swap, under a request loop.
    let prober = Prober::start(&stack.ns, PORT);
    std::thread::sleep(Duration::from_secs(1));
    let f2 = stack.spec("v2.toml", &spec(&image, "v2", ""));
    let applied = Instant::now();
    stack.run(&["apply", "-f", f2.to_str().unwrap()]);
    let healthy_after = applied.elapsed();
    let ps = stack.wait_ps("V1 removed", Duration::from_secs(120), |ps| {
        Stack::vms(ps, "shop").len() == 1
    });
    let swap = applied.elapsed() - healthy_after;
    std::thread::sleep(Duration::from_secs(1));
    let tally = prober.finish();
    println!(
        "swap: V2 healthy {:.1}s after apply, V1 removed {:.1}s later; {} requests, {} failed, slowest {:.2}s",
        healthy_after.as_secs_f64(),
        swap.as_secs_f64(),
        tally.ok + tally.failed.len(),
        tally.failed.len(),
        tally.slowest.as_secs_f64()
    );
    assert!(
        tally.failed.is_empty(),
        "failed requests: {:?}",
        tally.failed
    );
    assert_eq!(
        tally.bodies,
        vec!["v1\n", "v2\n"],
        "V1, then V2, never back"
    );
    // Answers from V1 and then V2 (above) show the loop spanned the swap; how many fit in
    // depends on how fast the emulated guests answer (one took 41 s on a loaded host).
    assert!(tally.ok >= 3, "the loop ran throughout: {tally:?}");
    let green = Stack::vms(&ps, "shop")[0]["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(green, blue);

    let events = stack.events();
    let green_healthy = seq_of(&events, &green, "healthy");
    let switched = seq_of(&events, &green, "switched to");
    let blue_draining = seq_of(&events, &blue, "draining");
    let blue_stopped = seq_of(&events, &blue, "stopping the VM");
    assert!(
        green_healthy < switched && switched < blue_draining && blue_draining < blue_stopped,
        "order: V2 healthy {green_healthy}, endpoint switched {switched}, V1 draining \
         {blue_draining}, V1 stopped {blue_stopped}"
    );

    // V3 never answers its health check: it is removed, V2 keeps serving.
    let prober = Prober::start(&stack.ns, PORT);
    let f3 = stack.spec(
        "v3.toml",
        &spec(&image, "v2", "[run]\ncmd = [\"/bin/sleep\", \"3600\"]\n"),
    );
    let out = stack
        .cmd(&["apply", "-f", f3.to_str().unwrap(), "--timeout", "300"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a never-healthy V3 fails apply");
    assert!(err.contains("not healthy"), "the reason is named: {err}");
    let ps = stack.ps();
    let failure = &ps[0]["failure"];
    assert!(
        failure["reason"]
            .as_str()
            .is_some_and(|r| r.contains("healthy")),
        "the deployment is marked failed with the reason: {ps:#}"
    );
    // Roll back to V2 (already serving): V3 is not retried.
    stack.run(&["apply", "-f", f2.to_str().unwrap()]);
    let ps = stack.wait_ps("V3 removed", Duration::from_secs(180), |ps| {
        Stack::vms(ps, "shop").len() == 1
    });
    let tally = prober.finish();
    assert!(
        tally.failed.is_empty(),
        "failed requests: {:?}",
        tally.failed
    );
    assert_eq!(tally.bodies, vec!["v2\n"], "V2 served throughout");
    let vms = Stack::vms(&ps, "shop");
    assert_eq!(vms[0]["vm_id"], green.as_str());
    assert_eq!(vms[0]["health"], "Healthy");
    stack
        .resources()
        .assert_only(std::slice::from_ref(&green), &nat_baseline);

    stack.run(&["rm", "shop"]);
    stack.wait_ps("app removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
    assert!(http_get_in(&stack.ns, PORT).is_err(), "endpoint closed");
    stack.resources().assert_only(&[], &nat_baseline);
}
