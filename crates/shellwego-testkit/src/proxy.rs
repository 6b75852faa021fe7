//! A slow TCP proxy on 127.0.0.1: forwards each connection to an upstream address, with
//! the upstream-to-client direction held to a byte rate. Tests put it in front of a
//! registry so that a download lasts long enough to be cut in its middle. It reads from
//! upstream only as fast as it forwards, so when the upstream dies the client gets the
//! bytes already on their way and then the end of the connection, as without a proxy.
//! Stopped (and its threads ended) on drop.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct SlowProxy {
    /// `127.0.0.1:PORT`
    pub addr: String,
    stop: Arc<AtomicBool>,
}

impl SlowProxy {
    /// Listens on a free loopback port and forwards to `upstream` at `bytes_per_sec`.
    pub fn start(upstream: &str, bytes_per_sec: u64) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let (upstream, stopping) = (upstream.to_string(), stop.clone());
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (up, s) = (upstream.clone(), stopping.clone());
                        std::thread::spawn(move || relay(client, &up, bytes_per_sec, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SlowProxy { addr, stop }
    }
}

fn relay(client: TcpStream, upstream: &str, rate: u64, stop: &AtomicBool) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    // Requests go up at full speed.
    let (mut c_read, mut s_write) = match (client.try_clone(), server.try_clone()) {
        (Ok(c), Ok(s)) => (c, s),
        _ => return,
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 << 10];
        while let Ok(n) = c_read.read(&mut buf) {
            if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_write.shutdown(Shutdown::Write);
    });
    // Answers come down at `rate`, in small slices.
    let (mut server, mut client) = (server, client);
    let _ = server.set_read_timeout(Some(Duration::from_millis(200)));
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut buf = [0u8; 8 << 10];
    while !stop.load(Ordering::Relaxed) {
        let n = match server.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
