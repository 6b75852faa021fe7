//! The host side of the guest protocol: connect through Firecracker's vsock Unix socket
//! (`CONNECT <port>\n` -> `OK <n>\n`), then exchange `shellwego_proto` frames.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shellwego_proto::{read_frame, write_frame, Request, Response, RunConfig, GUEST_PORT};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot connect to the guest through {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest refused the vsock connection to port {port}: {answer:?}")]
    Refused { port: u32, answer: String },
    #[error("talking to the guest: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest closed the connection")]
    Closed,
    #[error("the guest answered an error: {0}")]
    Remote(String),
    #[error("unexpected answer from the guest: {0:?}")]
    Unexpected(Response),
    #[error("the guest did not report ready within {waited:?}: {last}")]
    NotReady { waited: Duration, last: String },
}

/// Longest wait for the answer to `run`.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// One connection to a guest's init.
pub struct GuestClient {
    stream: UnixStream,
}

/// What `exec` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
}

impl GuestClient {
    /// Connects to the init's port through the VM's vsock socket.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<GuestClient, GuestError> {
        let stream = crate::hardening::connect_unix(uds).map_err(|source| GuestError::Connect {
            path: uds.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut s = stream.try_clone()?;
        s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())?;
        let mut line = String::new();
        // Read the answer byte by byte so no frame byte is swallowed by a buffer.
        let mut reader = BufReader::with_capacity(1, stream.try_clone()?);
        reader.read_line(&mut line)?;
        if !line.starts_with("OK ") {
            return Err(GuestError::Refused {
                port: GUEST_PORT,
                answer: line.trim().to_string(),
            });
        }
        Ok(GuestClient { stream })
    }

    /// Sends one request and reads its response; a remote error becomes `Remote`.
    pub fn request(&mut self, req: &Request) -> Result<Response, GuestError> {
        write_frame(&mut self.stream, req)?;
        match read_frame::<Response>(&mut self.stream)? {
            None => Err(GuestError::Closed),
            Some(Response::Error { message }) => Err(GuestError::Remote(message)),
            Some(r) => Ok(r),
        }
    }

    pub fn hello(&mut self) -> Result<Response, GuestError> {
        self.request(&Request::Hello)
    }

    /// Sets how long a request may wait for its answer.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), GuestError> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        Ok(())
    }

    /// Gives the guest its identity and starts the app. On emulated hosts mounting the
    /// root and starting the first process take a while: this waits up to `RUN_TIMEOUT`.
    pub fn run(&mut self, rc: RunConfig) -> Result<(), GuestError> {
        self.set_timeout(RUN_TIMEOUT)?;
        match self.request(&Request::Run(Box::new(rc)))? {
            Response::Ok => Ok(()),
            other => Err(GuestError::Unexpected(other)),
        }
    }

    pub fn exec(&mut self, argv: &[&str], timeout: Duration) -> Result<ExecOutput, GuestError> {
        // The guest answers at the latest when the command times out there: wait that long
        // and a margin for the answer, not just the connection's own timeout.
        self.set_timeout(timeout + Duration::from_secs(10))?;
        let req = Request::Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.request(&req)? {
            Response::ExecResult {
                code,
                stdout,
                stderr,
                timed_out,
            } => Ok(ExecOutput {
                code,
                stdout,
                stderr,
                timed_out,
            }),
            other => Err(GuestError::Unexpected(other)),
        }
    }

    /// Asks the init to stop the app and reboot (the VMM then exits).
    pub fn shutdown(&mut self, grace: Duration) -> Result<(), GuestError> {
        match self.request(&Request::Shutdown {
            grace_ms: grace.as_millis() as u64,
        })? {
            Response::Ok => Ok(()),
            other => Err(GuestError::Unexpected(other)),
        }
    }
}

/// Connects and says hello until the init answers, or `timeout` passes.
/// Gives a guest its run config, surviving the vsock transport reset that follows a
/// snapshot restore. Firecracker resets every vsock connection on restore, and the
/// guest kernel (slow on emulated hosts) may process that reset only after our first
/// connection went through: the connection then dies while the guest goes on with the
/// `run` it already read. So on a closed connection this reconnects (the guest's
/// one-request-at-a-time loop answers once that `run` is done) and asks: an app that is
/// running means the run took; otherwise the run config is sent again, once.
pub fn run_after_restore(
    uds: &Path,
    mut client: GuestClient,
    rc: RunConfig,
    budget: Duration,
) -> Result<GuestClient, GuestError> {
    match client.run(rc.clone()) {
        Ok(()) => return Ok(client),
        Err(GuestError::Closed | GuestError::Io(_)) => {}
        Err(other) => return Err(other),
    }
    let (mut again, hello) = wait_ready(uds, budget)?;
    match hello {
        Response::Ready {
            running_app: true, ..
        } => Ok(again),
        _ => {
            again.run(rc)?;
            Ok(again)
        }
    }
}

pub fn wait_ready(uds: &Path, timeout: Duration) -> Result<(GuestClient, Response), GuestError> {
    let start = Instant::now();
    let mut last = String::from("no attempt");
    // Each attempt may wait a little longer than the one before: a connection lost in the
    // vsock reset right after a snapshot restore is never answered, and must cost a
    // second, not the whole patience of a slow guest.
    let mut patience = Duration::from_secs(1);
    while start.elapsed() < timeout {
        let attempt = GuestClient::connect(uds, patience).and_then(|mut c| {
            let hello = c.hello()?;
            c.set_timeout(Duration::from_secs(30))?;
            Ok((c, hello))
        });
        match attempt {
            Ok(ok) => return Ok(ok),
            Err(e) => last = e.to_string(),
        }
        patience = (patience * 2).min(Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(GuestError::NotReady {
        waited: start.elapsed(),
        last,
    })
}
