//! The host <-> guest protocol, spoken over vsock between the agent and the guest init.
//!
//! The guest init listens on vsock port [`GUEST_PORT`]. The host connects through
//! Firecracker's vsock Unix socket (`CONNECT 1024\n`, answered `OK <port>\n`), then both
//! sides exchange frames: a 4-byte big-endian length, then that many bytes of JSON. Every
//! message carries the protocol version [`VERSION`]; a peer refuses other versions. One
//! request, one response, in order, on a connection; a connection may carry many.
//!
//! Connections do not survive a snapshot restore; the listener does, so the host simply
//! connects again.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port the guest init listens on.
pub const GUEST_PORT: u32 = 1024;
/// The protocol version.
pub const VERSION: u32 = 1;
/// Largest frame either side accepts (exec output is truncated to fit well below it).
pub const MAX_FRAME: usize = 8 << 20;
/// Most output bytes of one stream `exec` returns.
pub const MAX_EXEC_OUTPUT: usize = 2 << 20;

/// IPv4 configuration of the guest's `eth0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// e.g. "10.0.4.2"
    pub address: String,
    pub prefix_len: u8,
    pub gateway: String,
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// MAC to give eth0 ("xx:xx:..."); a VM restored from a template starts with the
    /// template's.
    #[serde(default)]
    pub mac: Option<String>,
}

/// What the app is and how it runs. Secrets travel only here and end up only in the
/// app's environment.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunConfig {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, String>,
    pub workdir: String,
    /// "", "name", "uid", "name:group" or "uid:gid", as in an image's `User`.
    pub user: String,
    pub hostname: String,
    pub net: Option<NetConfig>,
    /// Wall clock to set, seconds and nanoseconds since the epoch (fresh after a restore).
    pub clock: Option<(i64, u32)>,
    /// Bytes to mix into the guest's entropy pool (fresh after a restore).
    pub entropy: Vec<u8>,
    /// The block device holding the app's root filesystem (e.g. "/dev/vda").
    pub root_device: String,
    /// The root device's size in bytes as the host sees it. A VM restored from a template
    /// learns its disk's size asynchronously; the init waits for it before mounting.
    #[serde(default)]
    pub root_device_bytes: Option<u64>,
}

/// A new identity for a VM restored from another VM's snapshot (an app snapshot): its
/// app is already running, with the source VM's identity until this arrives.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Identity {
    pub hostname: String,
    /// Its own MAC and address on eth0.
    pub net: Option<NetConfig>,
    /// Wall clock to set, seconds and nanoseconds since the epoch.
    pub clock: (i64, u32),
    /// Bytes to mix into the guest's entropy pool (the RNG is reseeded from them).
    pub entropy: Vec<u8>,
    /// A signal to send the app once the identity is in place (its after-restore hook).
    #[serde(default)]
    pub signal: Option<i32>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret values never reach a log through Debug.
        f.debug_struct("RunConfig")
            .field("argv", &self.argv)
            .field("env", &self.env)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .field("user", &self.user)
            .field("hostname", &self.hostname)
            .field("net", &self.net)
            .field("root_device", &self.root_device)
            .field("root_device_bytes", &self.root_device_bytes)
            .finish_non_exhaustive()
    }
}

/// Host -> guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Is the init there? Answered with `Ready`.
    Hello,
    /// Mount the app's root, configure identity and network, start the app.
    Run(Box<RunConfig>),
    /// Run a command (in the app's root and environment once the app runs) and return
    /// its exit code and output.
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        timeout_ms: u64,
    },
    /// The app's state.
    Status,
    /// Send a signal to the app.
    Signal { signal: i32 },
    /// Stop the app, sync, unmount, reboot (Firecracker exits with `reboot=k`).
    Shutdown { grace_ms: u64 },
    /// The VM was just restored from its own snapshot (a wake from scale to zero): set
    /// the clock (seconds and nanoseconds since the epoch), which stood still while it was
    /// suspended, and mix fresh host randomness into the kernel's pool.
    Resume { clock: (i64, u32), entropy: Vec<u8> },
    /// Mount the app's root and switch into it, and start nothing: a VM prepared so is
    /// snapshotted as its image's template, and its clones get `run` with an empty
    /// `root_device`. `root_device_bytes` as in [`RunConfig`].
    Prepare {
        root_device: String,
        #[serde(default)]
        root_device_bytes: Option<u64>,
    },
    /// The VM was just restored from another VM's snapshot: take this identity (hostname,
    /// MAC, address, clock, entropy and a fresh boot id), then signal the app if asked.
    Reidentify(Box<Identity>),
    /// The disk under the mounted root (a VM restored from its image's template) has
    /// grown to `bytes`: wait up to `wait_ms` for the device to report that size (the
    /// host announces it with a config-change interrupt), then grow the mounted file
    /// system to fill it. An error naming the size the device reports means the
    /// announcement has not arrived yet: the host announces it again and asks again.
    GrowRoot { bytes: u64, wait_ms: u64 },
}

/// Guest -> host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Ready {
        init_version: String,
        uptime_ms: u64,
        /// True once a `Run` has been carried out.
        running_app: bool,
    },
    Ok,
    ExecResult {
        code: i32,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        timed_out: bool,
    },
    Status {
        app_pid: Option<i32>,
        /// Set when the app exited: its code, or 128 + signal.
        exit_code: Option<i32>,
        uptime_ms: u64,
    },
    Error {
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let json = serde_json::to_vec(&Envelope {
        v: VERSION,
        body: msg,
    })
    .map_err(|e| invalid(e.to_string()))?;
    if json.len() > MAX_FRAME {
        return Err(invalid(format!(
            "frame of {} bytes exceeds {MAX_FRAME}",
            json.len()
        )));
    }
    let mut buf = Vec::with_capacity(4 + json.len());
    buf.extend_from_slice(&(json.len() as u32).to_be_bytes());
    buf.extend_from_slice(&json);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(invalid(format!("frame of {len} bytes exceeds {MAX_FRAME}")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    let env: Envelope<T> =
        serde_json::from_slice(&buf).map_err(|e| invalid(format!("bad frame: {e}")))?;
    if env.v != VERSION {
        return Err(invalid(format!(
            "protocol version {} (this side speaks {VERSION})",
            env.v
        )));
    }
    Ok(Some(env.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        let req = Request::Exec {
            argv: vec!["cat".into(), "/etc/os-release".into()],
            timeout_ms: 5,
        };
        write_frame(&mut buf, &req).unwrap();
        write_frame(&mut buf, &Request::Hello).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), Some(req));
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), Some(Request::Hello));
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), None);
    }

    #[test]
    fn other_versions_and_oversize_are_refused() {
        let json = br#"{"v":2,"type":"hello"}"#;
        let mut buf = (json.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(json);
        let err = read_frame::<Request>(&mut &buf[..]).unwrap_err();
        assert!(err.to_string().contains("version 2"));
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(read_frame::<Request>(&mut &huge[..]).is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let mut rc = RunConfig::default();
        rc.secrets.insert("KEY".into(), "topsecret".into());
        assert!(!format!("{rc:?}").contains("topsecret"));
    }
}
