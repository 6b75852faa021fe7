//! HTTP/1.1 over a Unix socket (hyper), one connection per request: the client side of
//! Firecracker's API and of the agent's own API. `request_over` speaks the same over any
//! connected stream (the agent's optional TCP API).
//!
//! [`request_within`] bounds a whole request (connect, send, answer) by one deadline: what
//! the agent uses towards Firecracker. [`request`] bounds only the connect, by
//! [`CONNECT_TIMEOUT`]: the CLI waits for what it asked of the agent as long as that takes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum UdsHttpError {
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error on {socket}: {message}")]
    Http { socket: PathBuf, message: String },
    #[error("{method} {path} on {socket} timed out after {limit:?}")]
    TimedOut {
        socket: PathBuf,
        method: Method,
        path: String,
        limit: Duration,
    },
}

/// Longest wait for a Unix socket's listener to take a connection (its queue is full only
/// when it stopped accepting).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request with an optional JSON body; returns the status and body. Connecting
/// waits at most [`CONNECT_TIMEOUT`]; the answer as long as it takes.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), UdsHttpError> {
    exchange(socket, method, path, body, CONNECT_TIMEOUT).await
}

/// Like [`request`], all of it (connect, send, answer) within `limit`.
pub async fn request_within(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    limit: Duration,
) -> Result<(StatusCode, Bytes), UdsHttpError> {
    let work = exchange(socket, method.clone(), path, body, limit);
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(UdsHttpError::TimedOut {
            socket: socket.to_path_buf(),
            method,
            path: path.to_string(),
            limit,
        })
    })
}

async fn exchange(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    connect_limit: Duration,
) -> Result<(StatusCode, Bytes), UdsHttpError> {
    let http = |e: &dyn std::fmt::Display| UdsHttpError::Http {
        socket: socket.to_path_buf(),
        message: e.to_string(),
    };
    let connect_err = |source| UdsHttpError::Connect {
        socket: socket.to_path_buf(),
        source,
    };
    // A blocking connect, but one that waits at most `connect_limit` (a full queue); an
    // accepting listener takes it at once.
    let std_stream =
        shellwego_sys::socket::connect_unix(socket, connect_limit).map_err(connect_err)?;
    std_stream.set_nonblocking(true).map_err(connect_err)?;
    let stream = UnixStream::from_std(std_stream).map_err(connect_err)?;
    request_over(stream, method, path, body, None)
        .await
        .map_err(|e| http(&e))
}

/// Sends one request over a connected stream, with an optional bearer token.
pub async fn request_over<S>(
    stream: S,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    bearer: Option<&str>,
) -> Result<(StatusCode, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "HTTP connection closed");
        }
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("Host", "localhost")
        .header("Accept", "application/json");
    if body.is_some() {
        req = req.header("Content-Type", "application/json");
    }
    if let Some(token) = bearer {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| format!("bad request {path:?}: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tc_u14_deadline_a_socket_that_accepts_and_never_answers_times_out() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            // Read the request and never answer; the read ends when the client lets go.
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            let _ = closed_tx.send(());
        });
        let limit = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let e = request_within(&sock, Method::GET, "/version", None, limit)
            .await
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(matches!(e, UdsHttpError::TimedOut { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("GET /version") && text.contains("300ms"),
            "{text}"
        );
        // Dropping the request at its deadline closes the connection (hyper's connection
        // task ends with it): a peer that never answers keeps no task and no socket.
        tokio::time::timeout(Duration::from_secs(2), closed_rx)
            .await
            .expect("the client closed the connection")
            .unwrap();
    }
}
