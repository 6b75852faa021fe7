//! `swg-counter [PORT]`: an HTTP/1.0 server for tests in real VMs (port 8080 by default).
//!
//! - `GET /count` answers the number of `/count` requests so far, this one included: the
//!   count lives only in the process's memory, so a VM restored from a snapshot continues
//!   it, and a fresh VM starts at 1.
//! - `GET /id` answers `HOSTNAME MAC RANDOM RESTORES TOKEN`: the kernel's hostname, eth0's
//!   MAC, 16 fresh random bytes (hex, from `/dev/urandom`), how many `SIGUSR2` (the
//!   after-restore signal of the tests' specs) the process got, and a token it drew at
//!   start (in its memory: a VM restored from its snapshot has the same).
//! - any other path answers the environment's `SWG_PAGE` and a newline (`ok` without
//!   it): apps of one image tell their versions apart by it.
//!
//! One connection at a time, in one thread, never forking: on emulated hosts a fork costs
//! about a second in the guest, and a request here costs milliseconds. A client that sends
//! nothing for 5 s is dropped so it cannot hold up the others.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// SIGUSR2s received.
static RESTORES: AtomicU64 = AtomicU64::new(0);

/// Drawn once at start.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

extern "C" fn on_restore(_: libc::c_int) {
    RESTORES.fetch_add(1, Ordering::SeqCst);
}

fn main() {
    // SAFETY: installs a handler that only increments an atomic; SA_RESTART keeps
    // accept() going.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_restore as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut());
    }
    TOKEN.get_or_init(|| random_hex().unwrap_or_else(|| "-".into()));
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(8080);
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("swg-counter: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("swg-counter: listening on port {port}");
    let mut count: u64 = 0;
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(stream, &mut count) {
                    eprintln!("swg-counter: {e}");
                }
            }
            Err(e) => eprintln!("swg-counter: accept: {e}"),
        }
    }
}

/// Reads one request's head and answers it.
fn answer(mut stream: TcpStream, count: &mut u64) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let path = line.split(|b| *b == b' ').nth(1).unwrap_or_default();
    let body = if path == b"/count" {
        *count += 1;
        format!("{count}\n")
    } else if path == b"/id" {
        identity()
    } else {
        format!(
            "{}\n",
            std::env::var("SWG_PAGE").unwrap_or_else(|_| "ok".into())
        )
    };
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// `HOSTNAME MAC RANDOM RESTORES\n` (see the module doc).
fn identity() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "-".into())
    };
    format!(
        "{} {} {} {} {}\n",
        read("/proc/sys/kernel/hostname"),
        read("/sys/class/net/eth0/address"),
        random_hex().unwrap_or_else(|| "-".into()),
        RESTORES.load(Ordering::SeqCst),
        TOKEN.get().map_or("-", String::as_str)
    )
}

/// 16 random bytes from `/dev/urandom`, as hex.
fn random_hex() -> Option<String> {
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .ok()?;
    Some(random.iter().map(|b| format!("{b:02x}")).collect())
}
