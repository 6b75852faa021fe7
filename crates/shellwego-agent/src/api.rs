//! The agent's API, served on a Unix socket that only root can open (mode 0600), and
//! optionally on TCP (`api_tcp`), where every request needs the bearer token kept in
//! `api_token_file`.
//!
//! ```text
//! GET    /v1/apps                      apps with their VMs (ps)
//! PUT    /v1/apps/{name}               {"spec": "<TOML>", "secrets": {...}}: desired state
//! DELETE /v1/apps/{name}               stop wanting the app (rm)
//! GET    /v1/apps/{name}/logs?lines=N  the guest console of the app's newest VM: its
//!                                      last N lines, {"vm_id", "log", "next"}
//! GET    /v1/apps/{name}/logs?since=B  its output after byte B ("next" of the answer
//!                                      before), {"vm_id", "log", "next", "gap"}
//! POST   /v1/apps/{name}/exec          {"argv": [...], "timeout_ms": N}
//! GET    /v1/events?since=N&app=A&limit=L  the event log: at most L (default and most
//!                                      1000) events after number N, oldest first
//! GET    /v1/images                    pulled images
//! DELETE /v1/images/{digest}           forget an image and its unused layers
//! ```
//! Errors are `{"error": "..."}` with a 4xx/5xx status.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tracing::warn;

use crate::command::{AgentCommand, AgentService, CommandError, MAX_EVENTS_PER_PAGE};
use crate::conn;
use crate::reconciler::executor::Demand;

type Resp = Response<Full<Bytes>>;

fn json<T: Serialize>(status: StatusCode, v: &T) -> Resp {
    let body =
        serde_json::to_vec(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Resp {
    json(status, &serde_json::json!({ "error": msg.to_string() }))
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

fn status_of(e: &CommandError) -> StatusCode {
    match e {
        CommandError::BadRequest(_) => StatusCode::BAD_REQUEST,
        CommandError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        CommandError::NotFound(_) => StatusCode::NOT_FOUND,
        CommandError::Guest(_) => StatusCode::BAD_GATEWAY,
        CommandError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn body<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, Resp> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// Decodes a request into a command; `Err` is the answer to a request that is not one.
async fn decode(req: Request<Incoming>) -> Result<AgentCommand, Resp> {
    let path: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    let method = req.method().clone();
    Ok(match (method, parts.as_slice()) {
        (Method::GET, ["v1", "apps"]) => AgentCommand::Status,
        (Method::PUT, ["v1", "apps", name]) => AgentCommand::Apply {
            name: name.to_string(),
            request: body(req).await?,
        },
        (Method::DELETE, ["v1", "apps", name]) => AgentCommand::Remove {
            name: name.to_string(),
        },
        (Method::GET, ["v1", "apps", name, "logs"]) => AgentCommand::Logs {
            name: name.to_string(),
            lines: query(&req, "lines")
                .and_then(|l| l.parse().ok())
                .unwrap_or(200),
            since: query(&req, "since").and_then(|s| s.parse().ok()),
        },
        (Method::POST, ["v1", "apps", name, "suspend"]) => AgentCommand::Scale {
            name: name.to_string(),
            demand: Demand::Suspend,
        },
        (Method::POST, ["v1", "apps", name, "wake"]) => AgentCommand::Scale {
            name: name.to_string(),
            demand: Demand::Wake,
        },
        (Method::POST, ["v1", "apps", name, "exec"]) => AgentCommand::Exec {
            name: name.to_string(),
            request: body(req).await?,
        },
        (Method::GET, ["v1", "events"]) => AgentCommand::Events {
            since: query(&req, "since")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            app: query(&req, "app"),
            limit: query(&req, "limit")
                .and_then(|s| s.parse().ok())
                .unwrap_or(MAX_EVENTS_PER_PAGE),
        },
        (Method::GET, ["v1", "images"]) => AgentCommand::Images,
        (Method::DELETE, ["v1", "images", digest]) => AgentCommand::RemoveImage {
            digest: digest.to_string(),
        },
        _ => {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {} {}", req.method(), req.uri().path()),
            ))
        }
    })
}

/// The answer to one request: decoded, handled by the service, encoded.
async fn handle(service: &AgentService, req: Request<Incoming>) -> Resp {
    let accepted = matches!(*req.method(), Method::PUT | Method::DELETE)
        && req.uri().path().starts_with("/v1/apps/");
    let command = match decode(req).await {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    match service.handle(command).await {
        Ok(reply) if accepted => json(StatusCode::ACCEPTED, &reply),
        Ok(reply) => json(StatusCode::OK, &reply),
        Err(e) => error(status_of(&e), e),
    }
}

/// Serves the API on `socket` (replacing a stale socket file) until the task ends.
pub async fn serve(socket: &Path, state: Arc<AgentService>) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(conn::API_MAX_CONNECTIONS));
    loop {
        let ((stream, _), permit) =
            conn::accept_bounded(&slots, "API socket", || listener.accept()).await;
        tokio::spawn(serve_connection(stream, state.clone(), None, permit));
    }
}

/// Serves the API on TCP: every request must carry `Authorization: Bearer <token>`.
/// Plain HTTP: bind it to loopback or a private network, or put TLS in front of it.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    token: String,
    state: Arc<AgentService>,
) -> std::io::Result<()> {
    let token = Arc::new(token);
    let slots = Arc::new(tokio::sync::Semaphore::new(conn::API_MAX_CONNECTIONS));
    loop {
        let ((stream, _), permit) =
            conn::accept_bounded(&slots, "TCP API", || listener.accept()).await;
        tokio::spawn(serve_connection(
            stream,
            state.clone(),
            Some(token.clone()),
            permit,
        ));
    }
}

async fn serve_connection<S>(
    stream: S,
    state: Arc<AgentService>,
    token: Option<Arc<String>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        let token = token.clone();
        async move {
            if let Some(token) = token {
                if !authorized(&req, &token) {
                    return Ok::<_, Infallible>(error(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong bearer token (see api_token_file)",
                    ));
                }
            }
            Ok::<_, Infallible>(handle(&state, req).await)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(conn::API_HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(conn::API_CONNECTION_LIMIT, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "API connection"),
        Err(_) => warn!("API connection open for too long; closed"),
    }
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| crate::vault::constant_time_eq(given.as_bytes(), token.as_bytes()))
}
