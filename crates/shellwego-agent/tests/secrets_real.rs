//! TC-E2E-2: a secret reaches the app's environment over vsock and nowhere else.
//!
//! A real agent deploys a web app whose secret `SOVEREIGN_KEY` comes from the environment
//! of `apply`. `exec` (over vsock) runs `env | grep SOVEREIGN_KEY` in the guest and must
//! see the value; the VM is then killed while the agent is down, and the restarted agent
//! must re-create it (a template restore) and deliver the secret again from its sealed
//! record. Finally every file under the data dir, the run dir, the ZFS pool's mounts,
//! the agent's log and the database is scanned for the value's bytes, and so are the VMs'
//! command lines and Firecracker's own view of its configuration.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Stack;

const SECRET: &str = "topsecret";

fn exec_env(stack: &Stack) -> String {
    let out = stack.run(&[
        "exec",
        "vault",
        "--",
        "sh",
        "-c",
        "env | grep SOVEREIGN_KEY",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tc_e2e_2_secret_only_in_the_apps_environment() {
    let mut stack = Stack::new();
    let image = stack.push_web("1", b"vault\n");
    let spec = stack.spec(
        "vault.toml",
        &format!(
            "name = \"vault\"\nimage = \"{image}\"\n[resources]\nmemory = \"128Mi\"\n\
             [secrets]\nSOVEREIGN_KEY = {{ env = \"SWG_TEST_SOVEREIGN\" }}\n\
             [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n"
        ),
    );
    stack.start_agent(&[]);

    // Without the value in apply's environment, apply names the missing variable.
    let refused = stack
        .cmd(&["apply", "-f", spec.to_str().unwrap()])
        .env_remove("SWG_TEST_SOVEREIGN")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("SWG_TEST_SOVEREIGN"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let out = stack
        .cmd(&["apply", "-f", spec.to_str().unwrap()])
        .env("SWG_TEST_SOVEREIGN", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(exec_env(&stack), format!("SOVEREIGN_KEY={SECRET}\n"));

    // The agent goes down hard and its VM dies meanwhile: the new agent re-creates the
    // VM from a template snapshot and delivers the secret again from the sealed record.
    let first = Stack::vms(&stack.ps(), "vault")[0]["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    stack.kill_agent();
    for pid in shellwego_testkit::process::vm_pids(&stack.run) {
        shellwego_testkit::process::terminate(pid, Duration::from_secs(1));
    }
    stack.start_agent(&[]);
    stack.wait_ps("a new healthy VM", Duration::from_secs(300), |ps| {
        let vms = Stack::vms(ps, "vault");
        vms.len() == 1 && vms[0]["vm_id"] != first.as_str() && vms[0]["health"] == "Healthy"
    });
    assert_eq!(
        exec_env(&stack),
        format!("SOVEREIGN_KEY={SECRET}\n"),
        "secret delivered again after the agent restart"
    );

    // Firecracker's view of the VM (boot arguments, drives) and its command line.
    let vm_id = Stack::vms(&stack.ps(), "vault")[0]["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The VM is jailed: its API socket is in its chroot.
    let api = stack
        .run
        .join("jail/firecracker")
        .join(&vm_id)
        .join("root/api.sock");
    let config = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(&api)
        .arg("http://localhost/vm/config")
        .output()
        .expect("curl");
    let config = String::from_utf8_lossy(&config.stdout);
    assert!(
        config.trim_start().starts_with('{'),
        "Firecracker answered its config: {config}"
    );
    assert!(!config.contains(SECRET), "secret in Firecracker's config");
    for pid in shellwego_testkit::process::vm_pids(&stack.run) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(SECRET),
            "secret on a command line"
        );
    }

    // Stop the agent so its log and database are complete, then scan everything.
    stack.kill_agent();
    let found = stack.at_rest_containing(SECRET);
    assert!(
        stack.data.join("agent.redb").is_file(),
        "the database was scanned"
    );
    assert!(
        std::fs::metadata(&stack.log).unwrap().len() > 1000,
        "the agent's (debug) log was scanned"
    );
    assert!(found.is_empty(), "secret bytes found in: {found:?}");
}
