//! Connection hygiene on a real agent with real VMs: 2,000 idle connections to an app's
//! published port leave every app healthy and a normal request answered.
//!
//! Two web apps (busybox `httpd`, which forks a process per connection, in 128 MiB
//! guests) run on one agent; one is published with `protocol = "http"` (the client speaks
//! first), the other with the default `tcp`. The test opens 2,000 TCP connections to the
//! `http` app's host port from the test's namespace, sends nothing on them and holds them
//! for 10 s. Meanwhile and after: both apps stay healthy on their original VMs (no failed
//! health check, no replacement), the guest runs no process for the idle connections,
//! a normal request through each published port is answered, the idle connections are
//! still open (the agent did not simply drop them) and the agent is alive.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{http_get_in, Stack};
use serde_json::Value;

const IDLE: usize = 2000;
const HOLD: Duration = Duration::from_secs(10);
const FLOODED_PORT: u16 = 18080;
const NEIGHBOUR_PORT: u16 = 18081;

fn spec(name: &str, image: &str, host: u16, protocol: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{image}\"\n\
         [resources]\nmemory = \"128Mi\"\n\
         [[ports]]\nguest = 8080\nhost = {host}\n{protocol}\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n"
    )
}

/// Raises this process's open-file limit to the hard limit, which must allow the idle
/// connections (and what else the test opens).
fn raise_open_files() {
    let limit = shellwego_agent::hardening::raise_nofile()
        .unwrap_or_else(|e| panic!("cannot raise RLIMIT_NOFILE to the hard limit: {e}"));
    assert!(
        limit >= IDLE as u64 + 100,
        "this test opens {IDLE} connections at once and needs an open-file hard limit of at \
         least {}; it is {limit} (raise it with `ulimit -Hn` or in limits.conf)",
        IDLE + 100
    );
}

/// Applies every spec at once and waits for all of them to be healthy.
fn apply_all(stack: &Stack, files: &[&std::path::Path]) {
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            stack
                .cmd(&["apply", "-f", &f.display().to_string()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start apply")
        })
        .collect();
    for (child, file) in children.into_iter().zip(files) {
        let out = child.wait_with_output().expect("apply");
        assert!(
            out.status.success(),
            "apply -f {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The app's VM ids, when it has exactly one VM and is healthy; panics otherwise.
fn healthy_vm(ps: &Value, app: &str) -> String {
    let entry = ps
        .as_array()
        .and_then(|apps| apps.iter().find(|a| a["name"] == app))
        .unwrap_or_else(|| panic!("{app} missing from ps: {ps:#}"));
    let vms = Stack::vms(ps, app);
    assert!(
        entry["healthy"] == true && entry["failure"].is_null(),
        "{app} is not healthy: {ps:#}"
    );
    assert_eq!(vms.len(), 1, "{app} runs one VM: {ps:#}");
    assert_eq!(vms[0]["health"], "Healthy", "{app}'s VM: {ps:#}");
    vms[0]["vm_id"].as_str().expect("vm_id").to_string()
}

/// `n` connections to 127.0.0.1:`port` in the test's namespace that send nothing.
fn open_idle(stack: &Stack, port: u16, n: usize) -> Vec<TcpStream> {
    stack.ns.run_in(move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        (0..n)
            .map(|i| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("idle connection {i} to :{port}: {e}"))
            })
            .collect()
    })
}

/// How many of `conns` are still open: no EOF or error, nothing to read.
fn still_open(conns: &[TcpStream]) -> usize {
    conns
        .iter()
        .filter(|c| {
            c.set_nonblocking(true).expect("nonblocking");
            let mut byte = [0u8; 1];
            matches!((&**c).read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

/// Processes of the web server in the app's guest (busybox `httpd` forks one per
/// connection it accepts).
fn guest_server_processes(stack: &Stack, app: &str) -> usize {
    let out = stack.run(&[
        "exec",
        app,
        "--",
        "sh",
        "-c",
        "ps | grep -c '[b]usybox-httpd' || true",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("process count from {app}: {text:?}"))
}

/// A progress line with the time since `started`, so a slow run shows where time went.
fn step(started: Instant, what: &str) {
    eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
}

fn agent_alive(stack: &Stack) -> bool {
    let Some(pid) = stack.agent_pid() else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

#[test]
fn isolation_idle_connections_to_a_published_port_leave_every_app_healthy() {
    let started = Instant::now();
    raise_open_files();
    let mut stack = Stack::new();
    let flooded_image = stack.push_web("flooded", b"flooded\n");
    let neighbour_image = stack.push_web("neighbour", b"neighbour\n");
    let flooded = stack.spec(
        "flooded.toml",
        &spec(
            "flooded",
            &flooded_image,
            FLOODED_PORT,
            "protocol = \"http\"\n",
        ),
    );
    let neighbour = stack.spec(
        "neighbour.toml",
        &spec("neighbour", &neighbour_image, NEIGHBOUR_PORT, ""),
    );
    stack.start_agent(&[]);
    step(started, "agent up; applying both apps");
    apply_all(&stack, &[&flooded, &neighbour]);
    let ps = stack.ps();
    let flooded_vm = healthy_vm(&ps, "flooded");
    let neighbour_vm = healthy_vm(&ps, "neighbour");
    assert_eq!(
        http_get_in(&stack.ns, FLOODED_PORT).as_deref(),
        Ok("flooded\n")
    );
    let ready = started.elapsed();
    step(started, "both apps healthy; opening the idle connections");

    let since = stack.last_seq();
    let opening = Instant::now();
    let idle = open_idle(&stack, FLOODED_PORT, IDLE);
    let open_time = opening.elapsed();

    step(started, "idle connections open; holding them");
    // Hold them, checking health throughout.
    let held = Instant::now();
    while held.elapsed() < HOLD {
        let ps = stack.ps();
        assert_eq!(healthy_vm(&ps, "flooded"), flooded_vm, "not replaced");
        assert_eq!(healthy_vm(&ps, "neighbour"), neighbour_vm, "not replaced");
        std::thread::sleep(Duration::from_secs(1));
    }
    // Checked at once: a client of an http port that sends nothing is closed after 60 s.
    let open = still_open(&idle);
    assert_eq!(
        open,
        IDLE,
        "the idle connections were held open (checked {:.1}s after opening)",
        opening.elapsed().as_secs_f64()
    );
    step(started, "held; requests through both ports");
    let asked = Instant::now();
    assert_eq!(
        http_get_in(&stack.ns, FLOODED_PORT).as_deref(),
        Ok("flooded\n"),
        "a normal request through the flooded port"
    );
    assert_eq!(
        http_get_in(&stack.ns, NEIGHBOUR_PORT).as_deref(),
        Ok("neighbour\n"),
        "a normal request to the neighbour"
    );
    let answer_time = asked.elapsed();
    step(started, "answered; counting the guest's server processes");
    let servers = guest_server_processes(&stack, "flooded");
    assert!(
        servers < 10,
        "the idle connections reached the guest: {servers} httpd processes"
    );
    let failed: Vec<Value> = stack
        .events()
        .into_iter()
        .filter(|e| {
            e["seq"].as_u64().is_some_and(|s| s > since)
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("health check failed"))
        })
        .collect();
    assert!(failed.is_empty(), "failed health checks: {failed:#?}");
    assert!(agent_alive(&stack), "the agent is alive");
    let ps = stack.ps();
    assert_eq!(healthy_vm(&ps, "flooded"), flooded_vm);
    assert_eq!(healthy_vm(&ps, "neighbour"), neighbour_vm);

    drop(idle);
    println!(
        "ready in {:.1}s; {IDLE} idle connections opened in {:.2}s and held {:.0}s: both apps \
         healthy, both requests answered in {:.2}s, {servers} httpd processes in the flooded \
         guest; total {:.1}s",
        ready.as_secs_f64(),
        open_time.as_secs_f64(),
        HOLD.as_secs_f64(),
        answer_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
