//! Listeners a test runs inside a network namespace it made: a TCP server that greets
//! each connection with a banner, and a UDP socket that keeps what arrives. They stop
//! (and their threads end) when dropped, also when the test fails.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::NetNs;

pub struct Listener {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl Listener {
    /// A TCP server on `addr` ("0.0.0.0:7000") in `ns` that writes `banner` and a newline
    /// to every connection and closes it; `seen` lists the peers' addresses.
    pub fn tcp(ns: &NetNs, addr: &str, banner: &str) -> Listener {
        let addr: SocketAddr = addr.parse().expect("listener address");
        let banner = format!("{banner}\n");
        Listener::start(ns, move |stop, seen, ready| {
            let Some(listener) = bind_tcp(addr, &ready) else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.write_all(banner.as_bytes());
                        lock(&seen).push(peer.to_string());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    }

    /// A TCP server on `addr` in `ns` that accepts every connection and never answers
    /// (a stalled registry or backend); connections stay open until it is dropped.
    pub fn silent(ns: &NetNs, addr: &str) -> Listener {
        let addr: SocketAddr = addr.parse().expect("listener address");
        Listener::start(ns, move |stop, seen, ready| {
            let Some(listener) = bind_tcp(addr, &ready) else {
                return;
            };
            let mut open = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        lock(&seen).push(peer.to_string());
                        open.push(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    }

    /// A UDP socket on `addr` in `ns`; `seen` lists the payloads that arrived (as text).
    pub fn udp(ns: &NetNs, addr: &str) -> Listener {
        let addr: SocketAddr = addr.parse().expect("listener address");
        Listener::start(ns, move |stop, seen, ready| {
            let socket = match UdpSocket::bind(addr).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    return ready
                        .send(Err(format!("bind UDP {addr}: {e}")))
                        .unwrap_or(())
                }
            };
            let _ = ready.send(Ok(()));
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    lock(&seen).push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        })
    }

    fn start(
        ns: &NetNs,
        serve: impl FnOnce(Arc<AtomicBool>, Arc<Mutex<Vec<String>>>, mpsc::Sender<Result<(), String>>)
            + Send
            + 'static,
    ) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (s, v) = (stop.clone(), seen.clone());
        let handle = ns.spawn_in(move || serve(s, v, ready_tx));
        let listener = Listener {
            stop,
            seen,
            handle: Some(handle),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => listener,
            Ok(Err(e)) => panic!("listener in {}: {e}", ns.name),
            Err(e) => panic!("listener in {} did not start: {e}", ns.name),
        }
    }

    /// What arrived so far.
    pub fn seen(&self) -> Vec<String> {
        lock(&self.seen).clone()
    }
}

/// A non-blocking TCP listener on `addr`; tells `ready` whether it could bind.
fn bind_tcp(addr: SocketAddr, ready: &mpsc::Sender<Result<(), String>>) -> Option<TcpListener> {
    let bound = TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    });
    let _ = ready.send(
        bound
            .as_ref()
            .map(drop)
            .map_err(|e| format!("bind TCP {addr}: {e}")),
    );
    bound.ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
