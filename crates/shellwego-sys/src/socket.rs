//! Connecting to a Unix socket safely and within a time limit.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::fs::{FileType, Mode, OFlags};
use rustix::net::sockopt::{set_socket_timeout, Timeout};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// Connects to the Unix socket at `path` only if `path` itself is a socket, never through
/// a symlink in its last component, and waits at most `limit` for the listener to take
/// the connection.
///
/// Why: the sockets of a jailed VM (API, vsock) sit in a directory its unprivileged VMM
/// owns; a VMM a guest took over could put a symlink there to another VM's socket or the
/// agent's own, which a plain `connect` would follow as root.
///
/// The socket is opened with `O_PATH | O_NOFOLLOW`, checked to be a socket, and connected
/// to through that descriptor (`/proc/self/fd/N`), so nothing can swap it in between.
/// A blocking `connect` to a listener whose backlog is full (a process that stopped
/// accepting) waits for as long as the socket's send timeout allows, which is forever by
/// default: it is set to `limit` for the connect, then cleared again, and running out of
/// it is a `TimedOut` error.
pub fn connect_unix(path: &Path, limit: Duration) -> io::Result<UnixStream> {
    let target = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // A symlink opened with O_NOFOLLOW | O_PATH is the link itself: not a socket.
    let st = rustix::fs::fstat(&target)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a socket (a symlink or other file)",
                path.display()
            ),
        ));
    }
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    // The kernel reads a zero timeout as "none": the shortest limit is a millisecond.
    let limit = limit.max(Duration::from_millis(1));
    set_socket_timeout(&sock, Timeout::Send, Some(limit))?;
    let via = SocketAddrUnix::new(format!("/proc/self/fd/{}", target.as_raw_fd()))?;
    match rustix::net::connect(&sock, &via) {
        Ok(()) => {}
        Err(rustix::io::Errno::AGAIN) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not accept the connection within {limit:?}",
                    path.display()
                ),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    set_socket_timeout(&sock, Timeout::Send, None)?;
    Ok(UnixStream::from(sock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connects_to_a_socket_but_never_through_a_symlink_or_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let limit = Duration::from_secs(5);
        let mut c = connect_unix(&sock, limit).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        use std::io::{Read, Write};
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = connect_unix(&link, limit).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(connect_unix(&file, limit).is_err());
        assert!(connect_unix(&dir.path().join("missing"), limit).is_err());
    }

    #[test]
    fn tc_u14_deadline_a_listener_that_never_accepts_times_the_connect_out() {
        // A listener with a backlog of 1 that never accepts: once its queue is full, the
        // next connect waits for room, which never comes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let sock = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&sock, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        rustix::net::listen(&sock, 0).unwrap();
        let limit = Duration::from_millis(200);
        let mut held = Vec::new();
        let start = std::time::Instant::now();
        let e = loop {
            match connect_unix(&path, limit) {
                Ok(c) => held.push(c),
                Err(e) => break e,
            }
            assert!(held.len() < 64, "the backlog never filled");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("200ms"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
