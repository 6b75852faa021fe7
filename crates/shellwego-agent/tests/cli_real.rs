//! The CLI flow against a real agent: `shellwego agent` in the test's network namespace
//! (a real registry there, a real ZFS pool), then `apply` of a web app with an HTTP health
//! check, `ps`, `exec`, `logs`, the page fetched from the namespace, a `kill -9` of the
//! agent and a restart that re-attaches to the running VM, and `rm`.

mod common;

use std::time::{Duration, Instant};

use common::Stack;

#[test]
fn cli_apply_ps_exec_logs_restart_and_rm() {
    let mut stack = Stack::new();
    let image = stack.push_web("1", b"served by a microVM\n");
    let spec = stack.spec(
        "web.toml",
        &format!(
            "name = \"web\"\nimage = \"{image}\"\n[resources]\nmemory = \"128Mi\"\n\
             [env]\nGREETING = \"hi\"\n[health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n"
        ),
    );
    let token_file = stack.dir.path().join("keys/api.token");
    let token_path = token_file.display().to_string();
    stack.start_agent(&[
        ("SHELLWEGO_API_TCP", "127.0.0.1:17070"),
        ("SHELLWEGO_API_TOKEN_FILE", token_path.as_str()),
    ]);
    let out = stack.run(&["apply", "-f", spec.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("healthy at 10.0.4."), "{text}");
    assert!(
        text.contains("pulling") && text.contains("VM running"),
        "progress shown: {text}"
    );

    let ps = stack.ps();

    // The same API over TCP: refused without the right bearer token, answered with it.
    let tcp = ["--api-url", "http://127.0.0.1:17070", "ps", "--json"];
    let denied = stack
        .cmd(&tcp)
        .env("SHELLWEGO_API_TOKEN", "not-the-token")
        .output()
        .unwrap();
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("bearer token"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let mut with_token = tcp.to_vec();
    with_token.extend(["--token-file", token_path.as_str()]);
    let remote: serde_json::Value =
        serde_json::from_slice(&stack.run(&with_token).stdout).expect("ps over TCP");
    assert_eq!(remote[0]["name"], "web");
    let vm = &ps[0]["vms"][0];
    assert_eq!(ps[0]["name"], "web");
    assert_eq!(vm["health"], "Healthy");
    let ip = vm["ip"].as_str().unwrap().to_string();
    let vm_id = vm["vm_id"].as_str().unwrap().to_string();

    let page = stack.ns.exec(&[
        "curl",
        "-fsS",
        "--max-time",
        "20",
        &format!("http://{ip}:8080/"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&page.stdout),
        "served by a microVM\n"
    );
    let exec = stack.run(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "cat /etc/alpine-release; echo $GREETING",
    ]);
    let exec_out = String::from_utf8_lossy(&exec.stdout);
    assert!(
        exec_out.starts_with("3.23") && exec_out.contains("hi"),
        "{exec_out}"
    );
    let logs = stack.run(&["logs", "web", "-n", "50"]);
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("app started"),
        "logs show the guest console"
    );

    // The agent dies hard; its VM keeps running; a new agent re-attaches to it.
    stack.kill_agent();
    stack.start_agent(&[]);
    std::thread::sleep(Duration::from_secs(6));
    let ps = stack.ps();
    assert_eq!(ps[0]["vms"].as_array().unwrap().len(), 1, "{ps}");
    assert_eq!(
        ps[0]["vms"][0]["vm_id"],
        vm_id.as_str(),
        "same VM after the restart"
    );
    assert_eq!(ps[0]["vms"][0]["state"], "Running");
    let again = stack.ns.exec(&[
        "curl",
        "-fsS",
        "--max-time",
        "20",
        &format!("http://{ip}:8080/"),
    ]);
    assert!(
        again.status.success(),
        "still serving after the agent restart"
    );

    stack.run(&["rm", "web"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stack.ps().as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "app not removed: {}", stack.ps());
        std::thread::sleep(Duration::from_millis(500));
    }
    let links = String::from_utf8_lossy(&stack.ns.exec(&["ip", "-o", "link"]).stdout).into_owned();
    assert!(
        !links.contains(&format!("swg{}", &vm_id.replace('-', "")[..12])),
        "TAP removed: {links}"
    );
}
