//! Connection hygiene shared by the endpoint proxy and the API: a bounded number of
//! connections per listener, accept errors that are logged and retried (running out of
//! descriptors must never end a listener, let alone the agent), and a proxy that closes a
//! connection when neither side has sent anything for a while.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// Connections one published port serves at once; further clients wait in the kernel's
/// accept queue until one ends.
pub const ENDPOINT_MAX_CONNECTIONS: usize = 4096;
/// Connections the kernel completes and queues for a published port before the agent
/// accepts them (the kernel clamps it to `net.core.somaxconn`). std's 128 drops the SYNs of
/// a burst the agent has not caught up with yet, and each dropped client waits a second
/// or more to retry.
pub const ENDPOINT_BACKLOG: u32 = 1024;
/// A proxied connection with no byte in either direction for this long is closed.
pub const ENDPOINT_IDLE: Duration = Duration::from_secs(600);
/// A client of a `protocol = "http"` port (client speaks first) that has sent nothing for
/// this long after connecting is closed; until it sends, it costs the guest nothing. As
/// nginx's `client_header_timeout`: browsers send at once, and close preconnected sockets
/// they do not use well before this.
pub const ENDPOINT_FIRST_BYTES: Duration = Duration::from_secs(60);
/// Connections the API serves at once (per socket).
pub const API_MAX_CONNECTIONS: usize = 256;
/// A client must send a request's headers within this.
pub const API_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No API connection lives longer (the longest request, `exec`, takes at most 5 minutes).
pub const API_CONNECTION_LIMIT: Duration = Duration::from_secs(900);

/// Waits for a connection slot, then accepts; accept errors are logged and retried after
/// a pause, never returned.
pub async fn accept_bounded<T, F, Fut>(
    slots: &Arc<Semaphore>,
    what: &str,
    accept: F,
) -> (T, OwnedSemaphorePermit)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            // The semaphore is never closed; wait as if it were full.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        match accept().await {
            Ok(conn) => return (conn, permit),
            Err(e) => {
                warn!(listener = what, error = %e, "accept failed; retrying");
                drop(permit);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A stream that records when it last read or wrote a byte.
pub struct Tracked<S> {
    inner: S,
    last: Arc<AtomicU64>,
    start: Instant,
}

impl<S> Tracked<S> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a proxied connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyEnd {
    /// Both sides finished (or one failed): the copy's result.
    Closed,
    /// Nothing moved for the idle limit.
    Idle,
}

/// Copies both ways between `client` and `upstream` until both are done, or until no
/// byte moved in either direction for `idle`.
pub async fn proxy<A, B>(client: A, upstream: B, idle: Duration) -> io::Result<ProxyEnd>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut client = Tracked {
        inner: client,
        last: last.clone(),
        start,
    };
    let mut upstream = upstream;
    let watch = async {
        loop {
            let quiet_since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = quiet_since + idle;
            let now = start.elapsed();
            if now >= deadline {
                return;
            }
            tokio::time::sleep(deadline - now).await;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r.map(|_| ProxyEnd::Closed),
        () = watch => Ok(ProxyEnd::Idle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let (mut a_far, a) = tokio::io::duplex(1024);
        let (b, mut b_far) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(300);
        let run = tokio::spawn(proxy(a, b, idle));
        // Busy for longer than the idle limit: a byte every 100 ms.
        for _ in 0..6 {
            a_far.write_all(b"x").await.unwrap();
            let mut got = [0u8; 1];
            b_far.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!run.is_finished(), "a busy connection stays open");
        let end = tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end.unwrap(), ProxyEnd::Idle);
    }

    #[tokio::test]
    async fn accept_errors_are_retried_and_slots_bound_connections() {
        let slots = Arc::new(Semaphore::new(1));
        let tries = Arc::new(AtomicU64::new(0));
        let t = tries.clone();
        let (conn, permit) = accept_bounded(&slots, "test", move || {
            let n = t.fetch_add(1, Ordering::Relaxed);
            async move {
                if n < 2 {
                    Err(io::Error::from_raw_os_error(libc::EMFILE))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(conn, 2, "two failed accepts, then one that worked");
        assert_eq!(
            slots.available_permits(),
            0,
            "the connection holds the only slot"
        );
        drop(permit);
        assert_eq!(slots.available_permits(), 1);
    }
}
