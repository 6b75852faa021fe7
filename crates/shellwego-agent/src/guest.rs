//! The host side of the guest protocol: connect through Firecracker's vsock Unix socket
//! (`CONNECT <port>\n` -> `OK <n>\n`), then exchange `shellwego_proto` frames.
//!
//! Every exchange has an overall deadline, not just a timeout per read: a guest that sends
//! one byte just before each read timeout would otherwise hold the task for as long as it
//! likes. Before each read and write the socket's timeout is set to the time left
//! ([`Deadlined`]); when none is left the request fails with [`GuestError::Deadline`].
//! An answer is at most [`shellwego_proto::MAX_FRAME`] bytes.

use std::io::{self, BufRead, BufReader, Read, Write};
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
    #[error("the guest did not complete `{request}` within {limit:?}")]
    Deadline {
        request: &'static str,
        limit: Duration,
    },
    #[error("{what} {value:?} is more than the maximum of {max:?}")]
    TooLong {
        what: &'static str,
        value: Duration,
        max: Duration,
    },
}

/// Longest wait for the answer to `run`.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest `exec` a caller may ask for: the guest's answer waits that long, and one hour
/// is more than any command an operator runs by hand should need.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);

/// How much longer than the command's own timeout `exec` waits for the guest's answer.
const EXEC_MARGIN: Duration = Duration::from_secs(10);

/// One connection to a guest's init.
pub struct GuestClient {
    stream: UnixStream,
    /// The overall deadline of each request, from its first byte sent to its answer's last
    /// byte read.
    limit: Duration,
}

/// A stream whose reads and writes all end by one instant: before each, the socket's
/// timeout becomes the time left. An error of kind `TimedOut` or `WouldBlock` from it
/// means the deadline passed.
struct Deadlined<'a> {
    stream: &'a UnixStream,
    /// `None`: no deadline (a limit too large to add to now).
    deadline: Option<Instant>,
}

impl<'a> Deadlined<'a> {
    fn new(stream: &'a UnixStream, limit: Duration) -> Deadlined<'a> {
        Deadlined {
            stream,
            deadline: Instant::now().checked_add(limit),
        }
    }

    /// The time left, or a `TimedOut` error when there is none.
    fn left(&self) -> io::Result<Option<Duration>> {
        let Some(deadline) = self.deadline else {
            return Ok(None);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        Ok(Some(left))
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(self.left()?)?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(self.left()?)?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&mut &*self.stream).flush()
    }
}

/// Whether an I/O error from a [`Deadlined`] stream says its deadline passed.
fn is_deadline(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// The request's name, for errors.
fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Hello => "hello",
        Request::Run(_) => "run",
        Request::Exec { .. } => "exec",
        Request::Status => "status",
        Request::Signal { .. } => "signal",
        Request::Shutdown { .. } => "shutdown",
        Request::Resume { .. } => "resume",
        Request::Reidentify(_) => "reidentify",
        Request::Prepare { .. } => "prepare",
        Request::GrowRoot { .. } => "grow_root",
    }
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
    /// Connects to the init's port through the VM's vsock socket: the connect and the
    /// vsock handshake together within `timeout`, which is also each later request's
    /// deadline until [`set_timeout`](Self::set_timeout) changes it.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<GuestClient, GuestError> {
        let stream = shellwego_sys::socket::connect_unix(uds, timeout).map_err(|source| {
            GuestError::Connect {
                path: uds.to_path_buf(),
                source,
            }
        })?;
        let mut io = Deadlined::new(&stream, timeout);
        let deadline = |e: io::Error| {
            if is_deadline(&e) {
                GuestError::Deadline {
                    request: "CONNECT",
                    limit: timeout,
                }
            } else {
                GuestError::Io(e)
            }
        };
        io.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .map_err(deadline)?;
        // Read the answer byte by byte so no frame byte is swallowed by a buffer, and no
        // more of it than an answer can be ("OK <port>\n").
        let mut line = String::new();
        BufReader::with_capacity(1, io)
            .take(64)
            .read_line(&mut line)
            .map_err(deadline)?;
        if !line.starts_with("OK ") {
            return Err(GuestError::Refused {
                port: GUEST_PORT,
                answer: line.trim().to_string(),
            });
        }
        Ok(GuestClient {
            stream,
            limit: timeout,
        })
    }

    /// Sends one request and reads its response, all within the client's limit; a remote
    /// error becomes `Remote`.
    pub fn request(&mut self, req: &Request) -> Result<Response, GuestError> {
        let limit = self.limit;
        let mut io = Deadlined::new(&self.stream, limit);
        let deadline = |e: io::Error| {
            if is_deadline(&e) {
                GuestError::Deadline {
                    request: request_name(req),
                    limit,
                }
            } else {
                GuestError::Io(e)
            }
        };
        write_frame(&mut io, req).map_err(deadline)?;
        match read_frame::<Response>(&mut io).map_err(deadline)? {
            None => Err(GuestError::Closed),
            Some(Response::Error { message }) => Err(GuestError::Remote(message)),
            Some(r) => Ok(r),
        }
    }

    pub fn hello(&mut self) -> Result<Response, GuestError> {
        self.request(&Request::Hello)
    }

    /// Sets how long each request may take in all, its answer included.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), GuestError> {
        self.limit = timeout;
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

    /// Runs a command in the guest, which kills it after `timeout` (at most
    /// [`MAX_EXEC_TIMEOUT`]).
    pub fn exec(&mut self, argv: &[&str], timeout: Duration) -> Result<ExecOutput, GuestError> {
        if timeout > MAX_EXEC_TIMEOUT {
            return Err(GuestError::TooLong {
                what: "exec timeout",
                value: timeout,
                max: MAX_EXEC_TIMEOUT,
            });
        }
        // The guest answers at the latest when the command times out there: wait that long
        // and a margin for the answer, not just the connection's own timeout.
        self.set_timeout(timeout + EXEC_MARGIN)?;
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
        // A connection the restore's vsock reset cut is closed, fails, or is never
        // answered.
        Err(GuestError::Closed | GuestError::Io(_) | GuestError::Deadline { .. }) => {}
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

/// Sends a request to a guest just restored from a snapshot (`resume`, `reidentify`),
/// surviving the vsock reset of the restore the way [`run_after_restore`] does: both
/// requests may be carried out twice without harm (the same clock, identity and entropy
/// again), so one whose connection died is sent once more.
pub fn send_after_restore(uds: &Path, req: &Request, budget: Duration) -> Result<(), GuestError> {
    let start = Instant::now();
    let mut last = None;
    for _ in 0..2 {
        let left = budget.saturating_sub(start.elapsed());
        let (mut client, _) = wait_ready(uds, left)?;
        match client.request(req) {
            Ok(Response::Ok) => return Ok(()),
            Ok(other) => return Err(GuestError::Unexpected(other)),
            Err(e @ (GuestError::Closed | GuestError::Io(_) | GuestError::Deadline { .. })) => {
                last = Some(e)
            }
            Err(other) => return Err(other),
        }
    }
    Err(last.unwrap_or(GuestError::Closed))
}

pub fn wait_ready(uds: &Path, timeout: Duration) -> Result<(GuestClient, Response), GuestError> {
    let start = Instant::now();
    let mut last = String::from("no attempt");
    // Each attempt may wait a little longer than the one before: a connection lost in the
    // vsock reset right after a snapshot restore is never answered, and must cost a
    // second, not the whole patience of a slow guest.
    let mut patience = Duration::from_secs(1);
    while start.elapsed() < timeout {
        // No attempt runs past the overall timeout.
        let patience_now = patience.min(timeout.saturating_sub(start.elapsed()));
        let attempt = GuestClient::connect(uds, patience_now).and_then(|mut c| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake vsock socket whose guest accepts `CONNECT`, reads one request, then answers
    /// with a frame header promising 1000 bytes and sends them one every 200 ms: each read
    /// gets a byte long before any per-read timeout.
    fn trickling_guest(dir: &Path) -> PathBuf {
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut line = String::new();
            let _ = BufReader::with_capacity(1, &s).read_line(&mut line);
            let _ = s.write_all(b"OK 1\n");
            let _ = read_frame::<Request>(&mut s);
            let _ = s.write_all(&1000u32.to_be_bytes());
            for _ in 0..1000 {
                if s.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        path
    }

    #[test]
    fn tc_u14_deadline_a_guest_that_trickles_its_answer_fails_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let uds = trickling_guest(dir.path());
        let limit = Duration::from_millis(700);
        let mut c = GuestClient::connect(&uds, limit).unwrap();
        let start = Instant::now();
        let e = c.hello().unwrap_err();
        let took = start.elapsed();
        assert!(
            took >= limit && took < Duration::from_secs(2),
            "took {took:?}"
        );
        assert!(
            matches!(
                e,
                GuestError::Deadline {
                    request: "hello",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "the guest did not complete `hello` within 700ms"
        );
    }

    #[test]
    fn tc_u14_deadline_a_guest_that_never_answers_connect_fails_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let e = GuestClient::connect(&path, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(
                e,
                GuestError::Deadline {
                    request: "CONNECT",
                    ..
                }
            ),
            "{e}"
        );
        drop(listener);
    }

    #[test]
    fn exec_timeouts_have_a_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let uds = trickling_guest(dir.path());
        let mut c = GuestClient::connect(&uds, Duration::from_secs(1)).unwrap();
        let e = c
            .exec(&["true"], MAX_EXEC_TIMEOUT + Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(e, GuestError::TooLong { .. }), "{e}");
        assert!(e.to_string().contains("exec timeout"), "{e}");
    }
}
