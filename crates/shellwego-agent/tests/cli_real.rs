//! The CLI flow against a real agent: `shellwego agent` in the test's network namespace
//! (a real registry there, a real ZFS pool), then `apply` of a web app with an HTTP health
//! check, `ps`, `exec`, `logs`, the page fetched from the namespace, a `kill -9` of the
//! agent and a restart that re-attaches to the running VM, and `rm`.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shellwego_testkit::guest;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::oci::alpine_web_image;
use shellwego_testkit::prereq::require_command;
use shellwego_testkit::process::KillVmsOnDrop;
use shellwego_testkit::registry::Registry;
use shellwego_testkit::zfs::TestPool;

const BIN: &str = env!("CARGO_BIN_EXE_shellwego");

struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).env_remove("SHELLWEGO_CONFIG");
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().expect("run shellwego");
        if !out.status.success() {
            panic!(
                "shellwego {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    fn agent(&self, log: &Path) -> Child {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = self
            .cmd(&["agent"])
            .env("SHELLWEGO_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("start agent");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.cmd(&["ps"]).output().unwrap().status.success() {
            assert!(
                Instant::now() < deadline,
                "agent did not answer: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        child
    }

    fn ps(&self) -> serde_json::Value {
        serde_json::from_slice(&self.run(&["ps", "--json"]).stdout).expect("ps --json")
    }
}

fn web_image(registry: &Registry) {
    let layout = tempfile::tempdir().unwrap();
    alpine_web_image(layout.path(), b"served by a microVM\n");
    registry.push_layout(layout.path(), "1", "test/web:1");
}

#[test]
fn cli_apply_ps_exec_logs_restart_and_rm() {
    require_command("firecracker", "run `make setup`");
    let ns = NetNs::new();
    let registry = Registry::start_in(Some(&ns));
    web_image(&registry);
    let pool = TestPool::new(4 << 30);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = dir.path().join("run");
    let env = Env {
        vars: vec![
            ("SHELLWEGO_NETNS".into(), ns.name.clone()),
            ("SHELLWEGO_DATA_DIR".into(), data.display().to_string()),
            ("SHELLWEGO_RUN_DIR".into(), run.display().to_string()),
            ("SHELLWEGO_POOL".into(), pool.name.clone()),
            (
                "SHELLWEGO_KERNEL".into(),
                guest::kernel().display().to_string(),
            ),
            (
                "SHELLWEGO_GUEST_INIT".into(),
                guest::init_binary().display().to_string(),
            ),
            (
                "SHELLWEGO_INSECURE_REGISTRIES".into(),
                registry.addr.clone(),
            ),
        ],
    };
    let spec = dir.path().join("web.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"web\"\nimage = \"{}/test/web:1\"\n[resources]\nmemory = \"128Mi\"\n\
             [env]\nGREETING = \"hi\"\n[health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n",
            registry.addr
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let _vms = KillVmsOnDrop(run.clone());
    let mut agent = env.agent(&log);

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let out = env.run(&["apply", "-f", spec.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("healthy at 10.0.4."), "{text}");
        assert!(
            text.contains("pulling") && text.contains("VM running"),
            "progress shown: {text}"
        );

        let ps = env.ps();
        let vm = &ps[0]["vms"][0];
        assert_eq!(ps[0]["name"], "web");
        assert_eq!(vm["health"], "Healthy");
        let ip = vm["ip"].as_str().unwrap().to_string();
        let vm_id = vm["vm_id"].as_str().unwrap().to_string();

        let page = ns.exec(&[
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
        let exec = env.run(&[
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
        let logs = env.run(&["logs", "web", "-n", "50"]);
        assert!(
            String::from_utf8_lossy(&logs.stdout).contains("app started"),
            "logs show the guest console"
        );

        // The agent dies hard; its VM keeps running; a new agent re-attaches to it.
        agent.kill().unwrap();
        agent.wait().unwrap();
        agent = env.agent(&log);
        std::thread::sleep(Duration::from_secs(6));
        let ps = env.ps();
        assert_eq!(ps[0]["vms"].as_array().unwrap().len(), 1, "{ps}");
        assert_eq!(
            ps[0]["vms"][0]["vm_id"],
            vm_id.as_str(),
            "same VM after the restart"
        );
        assert_eq!(ps[0]["vms"][0]["state"], "Running");
        let again = ns.exec(&[
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

        env.run(&["rm", "web"]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !env.ps().as_array().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "app not removed: {}", env.ps());
            std::thread::sleep(Duration::from_millis(500));
        }
        let links = String::from_utf8_lossy(&ns.exec(&["ip", "-o", "link"]).stdout).into_owned();
        assert!(
            !links.contains(&format!("swg{}", &vm_id.replace('-', "")[..12])),
            "TAP removed: {links}"
        );
    }));
    let _ = agent.kill();
    let _ = agent.wait();
    if let Err(p) = result {
        eprintln!(
            "--- agent log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::panic::resume_unwind(p);
    }
}
