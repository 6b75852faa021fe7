//! A real CNCF distribution registry (Debian's `docker-registry`) on 127.0.0.1 at a free
//! port, with its storage in a temp dir; killed on drop. Images are pushed with skopeo.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::prereq::require_command;
use crate::process::{run_ok, terminate};

const FIX: &str = "install it with `make setup` (apt-get install docker-registry skopeo)";

pub struct Registry {
    /// `127.0.0.1:PORT`
    pub addr: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The network namespace it listens in (`None`: the test's own).
    netns: Option<String>,
    bin: PathBuf,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn answers(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
}

/// A command, run inside `netns` if given.
fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        None => Command::new(program),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
    }
}

/// `answers`, from inside `netns`.
fn answers_in(netns: Option<&str>, addr: &str) -> bool {
    let Some(ns) = netns else {
        return answers(addr);
    };
    let (path, addr) = (format!("/run/netns/{ns}"), addr.to_string());
    std::thread::spawn(move || {
        let Ok(f) = std::fs::File::open(&path) else {
            return false;
        };
        // SAFETY: setns on this short-lived thread only.
        if unsafe {
            libc::setns(
                std::os::unix::io::AsRawFd::as_raw_fd(&f),
                libc::CLONE_NEWNET,
            )
        } != 0
        {
            return false;
        }
        answers(&addr)
    })
    .join()
    .unwrap_or(false)
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_in(None)
    }

    /// Starts the registry on 127.0.0.1 of the network namespace `netns` (by name).
    pub fn start_in(netns: Option<&crate::netns::NetNs>) -> Registry {
        let netns = netns.map(|n| n.name.clone());
        let bin = require_command("docker-registry", FIX);
        require_command("skopeo", FIX);
        let dir = tempfile::tempdir().expect("registry temp dir");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("storage");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .expect("write registry config");
        let mut registry = Registry {
            addr,
            child: None,
            dir,
            netns,
            bin,
        };
        registry.restart();
        registry
    }

    /// Starts the registry again (same address and storage) after [`Registry::stop`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the registry is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .expect("registry log");
        let child = command_in(self.netns.as_deref(), &self.bin)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start docker-registry: {e}; {FIX}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answers_in(self.netns.as_deref(), &self.addr) {
            assert!(
                Instant::now() < deadline,
                "registry did not answer on {} within 20 s",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the registry process (kill -9: connections in flight are cut).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// How many times a blob was requested with GET (from the registry's access log).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
            .count()
    }

    /// Pushes the image tagged `tag` in an OCI layout as `NAME:TAG` (e.g. `test/alpine:3.23`).
    pub fn push_layout(&self, layout: &Path, tag: &str, name_tag: &str) {
        run_ok(
            command_in(self.netns.as_deref(), Path::new("skopeo")).args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &format!("oci:{}:{tag}", layout.display()),
                &format!("docker://{}/{name_tag}", self.addr),
            ]),
        );
    }

    /// The file the registry serves a blob from (tests corrupt it to play a lying registry).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(child.id() as i32, Duration::from_secs(5));
            let _ = child.wait();
        }
    }
}
