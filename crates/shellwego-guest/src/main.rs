//! `shellwego-init`: PID 1 inside every ShellWeGo microVM.
//!
//! Boots from the initramfs: mounts /proc, /sys, /dev, /tmp, /run, brings up `lo`, and
//! listens on vsock port 1024 (`shellwego_proto::GUEST_PORT`). On `run` it mounts the
//! app's root drive, switches into it, sets hostname, clock, entropy and eth0's address,
//! and starts the app with its argv, env and secrets. It reaps every child, forwards
//! signals to the app, runs `exec` commands, and on `shutdown` stops the app, syncs and
//! reboots (Firecracker exits with `reboot=k`). The app's stdout/stderr go to the serial
//! console, which the host keeps as the VM's log.
//!
//! After a snapshot restore the listener is still there; open connections reset and
//! the host connects again, and a `run` gives a restored template its identity. A VM
//! woken from its own snapshot (scale to zero) gets `resume`: the clock and fresh
//! entropy, while its app runs on as it was. A VM restored from *another* VM's snapshot
//! (an app snapshot) gets `reidentify`: its own hostname, MAC, address, clock, entropy
//! and boot id, and the app its after-restore signal. `prepare` mounts the app's root
//! without starting it: such a VM is snapshotted as its image's template; a clone of it
//! whose disk is larger gets `grow_root` before `run`, and grows the mounted file system.

mod app;
mod sys;
mod vsock;

use std::net::Ipv4Addr;
use std::time::Duration;

use shellwego_proto::{
    read_frame, write_frame, Identity, Request, Response, RunConfig, GUEST_PORT,
};

const INIT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The running app's environment and identity, for `exec`.
#[derive(Default)]
struct State {
    app: Option<(i32, app::Launch)>,
    /// The device of the app's root once it is mounted and `/` (by `prepare` or `run`).
    root_device: Option<String>,
}

fn log(msg: &str) {
    println!("shellwego-init: {msg}");
}

/// Mounts the app's root and switches into it (once).
fn prepare(state: &mut State, device: &str, bytes: Option<u64>) -> Result<(), String> {
    if state.root_device.is_some() {
        return Err("the app's root is mounted already".into());
    }
    if let Some(bytes) = bytes {
        sys::wait_for_size(device, bytes, Duration::from_secs(60))
            .map_err(|e| format!("root device: {e}"))?;
    }
    sys::switch_root(device).map_err(|e| format!("mounting root {device}: {e}"))?;
    state.root_device = Some(device.to_string());
    Ok(())
}

/// Grows the mounted root's file system to its device's new size (see
/// `Request::GrowRoot`).
fn grow_root(state: &State, bytes: u64, wait: Duration) -> Result<(), String> {
    let device = state
        .root_device
        .as_deref()
        .ok_or("the app's root is not mounted")?;
    sys::wait_for_size(device, bytes, wait).map_err(|e| format!("root device: {e}"))?;
    sys::grow_mounted_ext4("/", bytes).map_err(|e| format!("growing the root file system: {e}"))?;
    log(&format!("root file system grown to {} MiB", bytes >> 20));
    Ok(())
}

fn run(state: &mut State, rc: RunConfig) -> Result<(), String> {
    if state.app.is_some() {
        return Err("an app is already running in this VM".into());
    }
    if !rc.root_device.is_empty() {
        prepare(state, &rc.root_device, rc.root_device_bytes)?;
    }
    if !rc.hostname.is_empty() {
        sys::set_hostname(&rc.hostname).map_err(|e| e.to_string())?;
    }
    if let Some((secs, nanos)) = rc.clock {
        sys::set_clock(secs, nanos).map_err(|e| e.to_string())?;
    }
    sys::reseed_rng(&rc.entropy).map_err(|e| format!("entropy: {e}"))?;
    if !rc.entropy.is_empty() {
        sys::fresh_boot_id().map_err(|e| format!("boot_id: {e}"))?;
    }
    if let Some(net) = &rc.net {
        apply_net(net)?;
    }
    let (uid, gid) = sys::resolve_user(&rc.user).map_err(|e| e.to_string())?;
    let mut env = rc.env;
    env.extend(rc.secrets);
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    if !rc.hostname.is_empty() {
        env.entry("HOSTNAME".into()).or_insert(rc.hostname);
    }
    let launch = app::Launch {
        argv: rc.argv,
        env,
        workdir: if rc.workdir.is_empty() {
            "/".into()
        } else {
            rc.workdir
        },
        uid,
        gid,
    };
    let pid = app::start_app(&launch)?;
    log(&format!("app started, pid {pid}"));
    state.app = Some((pid, launch));
    Ok(())
}

/// Takes the identity of a VM restored from another VM's snapshot (see
/// `Request::Reidentify`): everything that made the source VM itself.
fn reidentify(id: Identity) -> Result<(), String> {
    if !id.hostname.is_empty() {
        sys::set_hostname(&id.hostname).map_err(|e| e.to_string())?;
    }
    sys::set_clock(id.clock.0, id.clock.1).map_err(|e| format!("clock: {e}"))?;
    sys::reseed_rng(&id.entropy).map_err(|e| format!("entropy: {e}"))?;
    sys::fresh_boot_id().map_err(|e| format!("boot_id: {e}"))?;
    if let Some(net) = &id.net {
        apply_net(net)?;
    }
    if let Some(signal) = id.signal {
        app::signal_app(signal)?;
    }
    log("identity taken after a restore");
    Ok(())
}

/// Gives eth0 its MAC and address (replacing the ones it had) and the default route.
fn apply_net(net: &shellwego_proto::NetConfig) -> Result<(), String> {
    if let Some(mac) = &net.mac {
        sys::set_mac("eth0", mac).map_err(|e| format!("eth0 MAC: {e}"))?;
    }
    let parse = |s: &str| {
        s.parse::<Ipv4Addr>()
            .map_err(|e| format!("bad IPv4 {s:?}: {e}"))
    };
    sys::configure_ipv4(
        "eth0",
        parse(&net.address)?,
        net.prefix_len,
        parse(&net.gateway)?,
    )
    .map_err(|e| format!("eth0: {e}"))?;
    sys::write_resolv_conf(&net.nameservers).map_err(|e| format!("resolv.conf: {e}"))
}

fn handle(state: &mut State, req: Request) -> (Response, bool) {
    let reboot_after = matches!(req, Request::Shutdown { .. });
    let resp = match req {
        Request::Hello => Response::Ready {
            init_version: INIT_VERSION.into(),
            uptime_ms: sys::uptime_ms(),
            running_app: state.app.is_some(),
        },
        Request::Run(rc) => match run(state, *rc) {
            Ok(()) => Response::Ok,
            Err(message) => Response::Error { message },
        },
        Request::Exec { argv, timeout_ms } => {
            let mut launch = state
                .app
                .as_ref()
                .map(|(_, l)| l.clone())
                .unwrap_or_default();
            launch.argv = argv;
            let timeout = Duration::from_millis(if timeout_ms == 0 { 60_000 } else { timeout_ms });
            match app::exec(&launch, timeout) {
                Ok((code, stdout, stderr, timed_out)) => Response::ExecResult {
                    code,
                    stdout,
                    stderr,
                    timed_out,
                },
                Err(message) => Response::Error { message },
            }
        }
        Request::Status => {
            let pid = state.app.as_ref().map(|(p, _)| *p);
            Response::Status {
                app_pid: pid,
                exit_code: pid.and_then(app::exit_code),
                uptime_ms: sys::uptime_ms(),
            }
        }
        Request::Signal { signal } => match app::signal_app(signal) {
            Ok(()) => Response::Ok,
            Err(message) => Response::Error { message },
        },
        Request::Resume { clock, entropy } => {
            let resumed = sys::set_clock(clock.0, clock.1)
                .map_err(|e| format!("clock: {e}"))
                .and_then(|()| sys::reseed_rng(&entropy).map_err(|e| format!("entropy: {e}")));
            match resumed {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            }
        }
        Request::Prepare {
            root_device,
            root_device_bytes,
        } => match prepare(state, &root_device, root_device_bytes) {
            Ok(()) => Response::Ok,
            Err(message) => Response::Error { message },
        },
        Request::Reidentify(id) => match reidentify(*id) {
            Ok(()) => Response::Ok,
            Err(message) => Response::Error { message },
        },
        Request::GrowRoot { bytes, wait_ms } => {
            match grow_root(state, bytes, Duration::from_millis(wait_ms)) {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            }
        }
        Request::Shutdown { grace_ms } => {
            if let Some((pid, _)) = state.app {
                if app::exit_code(pid).is_none() {
                    let _ = app::signal_app(libc::SIGTERM);
                    if app::wait_for(pid, Duration::from_millis(grace_ms)).is_none() {
                        let _ = app::signal_app(libc::SIGKILL);
                    }
                }
            }
            Response::Ok
        }
    };
    (resp, reboot_after)
}

fn serve(listener: &vsock::Listener, state: &mut State) {
    loop {
        let mut conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log(&format!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        loop {
            let req = match read_frame::<Request>(&mut conn) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    let _ = write_frame(
                        &mut conn,
                        &Response::Error {
                            message: e.to_string(),
                        },
                    );
                    break;
                }
            };
            let (resp, reboot) = handle(state, req);
            let sent = write_frame(&mut conn, &resp);
            if reboot {
                log("shutting down");
                sys::reboot();
            }
            if sent.is_err() {
                break;
            }
        }
    }
}

fn main() {
    sys::mount_early();
    if let Err(e) = sys::link_up("lo") {
        log(&format!("lo: {e}"));
    }
    app::install_signal_forwarding();
    std::thread::spawn(app::reaper);
    let listener = loop {
        match vsock::Listener::bind(GUEST_PORT) {
            Ok(l) => break l,
            Err(e) => {
                log(&format!("vsock listen on port {GUEST_PORT}: {e}; retrying"));
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    log(&format!("ready on vsock port {GUEST_PORT}"));
    let mut state = State::default();
    serve(&listener, &mut state);
}
