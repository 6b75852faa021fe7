//! HTTP/1.1 over a Unix socket (hyper), one connection per request: the client side of
//! Firecracker's API and of the agent's own API. `request_over` speaks the same over any
//! connected stream (the agent's optional TCP API).

use std::path::{Path, PathBuf};

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
}

/// Sends one request with an optional JSON body; returns the status and body.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), UdsHttpError> {
    let http = |e: &dyn std::fmt::Display| UdsHttpError::Http {
        socket: socket.to_path_buf(),
        message: e.to_string(),
    };
    let connect_err = |source| UdsHttpError::Connect {
        socket: socket.to_path_buf(),
        source,
    };
    let std_stream = crate::hardening::connect_unix(socket).map_err(connect_err)?;
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
