//! Registries that misbehave on purpose, for the deadline tests: one that accepts and
//! never answers, one that answers a byte at a time.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn serve(handle: impl Fn(TcpStream) + Send + Clone + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test port");
    let addr = listener.local_addr().expect("its address").to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let handle = handle.clone();
            std::thread::spawn(move || handle(conn));
        }
    });
    addr
}

/// A registry at the returned `host:port` that accepts connections and never says a word.
pub(crate) fn silent() -> String {
    serve(|conn| {
        std::thread::sleep(Duration::from_secs(60));
        drop(conn);
    })
}

/// A registry that reads a request, then sends `head` and an endless body one byte per
/// `every`: each read gets its byte long before any read timeout.
pub(crate) fn trickling(head: &'static str, every: Duration) -> String {
    serve(move |mut conn| {
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf);
        for b in head.bytes().chain(std::iter::repeat(b'x')) {
            if conn.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    })
}
