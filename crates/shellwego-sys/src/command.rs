//! External commands with a deadline. A command the agent runs (`zfs`, `nft`, `tc`,
//! `firecracker --version`) talks to something that can hang (a ZFS daemon, the kernel):
//! [`output_within`] runs it in a process group of its own and, when the deadline passes,
//! kills the whole group and says which command it was and how long it was given.

use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::process::{signal_group, Signal};

/// Why a command gave no output.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` did not finish within {limit:?} and was killed")]
    TimedOut { cmd: String, limit: Duration },
    #[error("talking to `{cmd}`: {source}")]
    Io {
        cmd: String,
        #[source]
        source: io::Error,
    },
}

impl CommandError {
    /// The command line, as the error shows it.
    pub fn cmd(&self) -> &str {
        match self {
            CommandError::Spawn { cmd, .. }
            | CommandError::TimedOut { cmd, .. }
            | CommandError::Io { cmd, .. } => cmd,
        }
    }
}

/// `program arg arg...`, as a person would type it (lossy for non-UTF-8 bytes).
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// How long a killed command may take to be gone before it is left to a reaper thread
/// (a process stuck in the kernel ignores even SIGKILL until it returns from there).
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Runs `cmd` to completion with `stdin` as its input (none: `/dev/null`) and returns its
/// status, stdout and stderr, like [`Command::output`] but bounded: once `limit` has
/// passed (waiting for the exit and for its output), the command's process group is
/// killed and the error names the command and `limit`. Stdin, stdout, stderr and the
/// process group of `cmd` are set here.
pub fn output_within(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<Output, CommandError> {
    let shown = describe(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so that the kill also reaches what the command started.
        .process_group(0)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            cmd: shown.clone(),
            source,
        })?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel::<(u8, io::Result<Vec<u8>>)>();
    // Each pipe on a thread of its own: a command that fills one pipe while we wait on
    // another would otherwise block forever.
    let pipes: [(u8, Option<Box<dyn Read + Send>>); 2] = [
        (1, child.stdout.take().map(|p| Box::new(p) as _)),
        (2, child.stderr.take().map(|p| Box::new(p) as _)),
    ];
    for (which, pipe) in pipes {
        if let Some(mut pipe) = pipe {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let r = pipe.read_to_end(&mut buf).map(|_| buf);
                let _ = tx.send((which, r));
            });
        }
    }
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let bytes = bytes.to_vec();
        let tx = tx.clone();
        std::thread::spawn(move || {
            // A command that exits without reading all of its input is its own business
            // (its status says how it went): a broken pipe is no error here.
            let r = match pipe.write_all(&bytes) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                other => other,
            };
            drop(pipe);
            let _ = tx.send((0, r.map(|()| Vec::new())));
        });
    }
    drop(tx);
    let deadline = start.checked_add(limit);
    let timed_out = |child: &mut std::process::Child| {
        kill_group(pid, child);
        CommandError::TimedOut {
            cmd: shown.clone(),
            limit,
        }
    };
    let io_err = |source| CommandError::Io {
        cmd: shown.clone(),
        source,
    };
    // The exit status: polled, with pauses that grow from 1 ms (most commands are done in
    // a few) to 20 ms.
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io_err)? {
            break status;
        }
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => pause,
        };
        if left.is_zero() {
            return Err(timed_out(&mut child));
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // The output: its pipes end when the command and everything it left running have
    // closed them, which must happen before the deadline too.
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        let next = match deadline {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((1, r)) => stdout = r.map_err(io_err)?,
            Ok((2, r)) => stderr = r.map_err(io_err)?,
            Ok((_, r)) => drop(r.map_err(io_err)?),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(timed_out(&mut child)),
        }
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Kills the command's process group and reaps the command, waiting at most
/// [`KILL_WAIT`]; a command that is not gone by then is reaped by a thread of its own.
fn kill_group(pgid: i32, child: &mut std::process::Child) {
    let _ = signal_group(pgid, Signal::KILL);
    let _ = child.kill();
    let start = Instant::now();
    while start.elapsed() < KILL_WAIT {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = pgid;
    std::thread::spawn(move || loop {
        crate::process::reap(pid);
        if !crate::process::exists(pid as u32) {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_input_and_returns_status_and_both_outputs() {
        let out = output_within(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            Some(b"hello"),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");
        let e = output_within(
            &mut Command::new("/nonexistent/zfs"),
            None,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/zfs"), "{e}");
    }

    #[test]
    fn tc_u14_deadline_a_command_that_sleeps_is_killed() {
        let start = Instant::now();
        let e = output_within(
            Command::new("sleep").arg("30"),
            None,
            Duration::from_millis(200),
        )
        .unwrap_err();
        let took = start.elapsed();
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(took >= Duration::from_millis(200), "took {took:?}");
        assert!(matches!(e, CommandError::TimedOut { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("`sleep 30`") && text.contains("200ms") && text.contains("killed"),
            "{text}"
        );
    }

    #[test]
    fn tc_u14_deadline_kills_what_the_command_left_holding_its_output() {
        // The shell exits at once; its background child keeps stdout open and would hold
        // a plain `output()` for 30 s. It is killed with the group when the deadline passes.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}", pidfile.display());
        let start = Instant::now();
        let e = output_within(
            Command::new("sh").args(["-c", &script]),
            None,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(e, CommandError::TimedOut { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(3));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = Instant::now() + Duration::from_secs(2);
        while crate::process::alive(pid) && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !crate::process::alive(pid),
            "the background sleep was killed"
        );
    }
}
