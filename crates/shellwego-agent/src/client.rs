//! The CLI's side of the agent API.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::{AppStatus, ApplyRequest, ApplyResponse, Event, ExecRequest, ExecResponse, Logs};

/// Where the agent's API is.
#[derive(Debug, Clone)]
enum Target {
    /// The local Unix socket (root only).
    Socket(PathBuf),
    /// The TCP API (`host:port`), with its bearer token.
    Tcp { addr: String, token: String },
}

pub struct AgentClient {
    target: Target,
}

impl AgentClient {
    pub fn new(socket: &Path) -> AgentClient {
        AgentClient {
            target: Target::Socket(socket.to_path_buf()),
        }
    }

    /// A client of the TCP API at `url` (`http://host:port` or `host:port`).
    pub fn tcp(url: &str, token: String) -> Result<AgentClient> {
        let addr = url
            .strip_prefix("http://")
            .unwrap_or(url)
            .trim_end_matches('/');
        if addr.is_empty() || addr.contains('/') || url.starts_with("https://") {
            bail!("--api-url {url:?}: give http://HOST:PORT (the agent's api_tcp address)");
        }
        Ok(AgentClient {
            target: Target::Tcp {
                addr: addr.to_string(),
                token,
            },
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(hyper::StatusCode, hyper::body::Bytes)> {
        match &self.target {
            Target::Socket(socket) => crate::uds_http::request(socket, method, path, body)
                .await
                .map_err(|e| {
                    anyhow!("{e} (is the agent running? start it with `shellwego agent`)")
                }),
            Target::Tcp { addr, token } => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .with_context(|| format!("cannot connect to the agent API at {addr}"))?;
                crate::uds_http::request_over(stream, method, path, body, Some(token))
                    .await
                    .map_err(|e| anyhow!("agent API at {addr}: {e}"))
            }
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (status, bytes) = self.send(method, path, body).await?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{msg}");
        }
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer to {path}"))
    }

    pub async fn apps(&self) -> Result<Vec<AppStatus>> {
        self.call(Method::GET, "/v1/apps", None::<&()>).await
    }

    pub async fn apply(&self, app: &str, req: &ApplyRequest) -> Result<ApplyResponse> {
        self.call(Method::PUT, &format!("/v1/apps/{app}"), Some(req))
            .await
    }

    pub async fn remove(&self, app: &str) -> Result<serde_json::Value> {
        self.call(Method::DELETE, &format!("/v1/apps/{app}"), None::<&()>)
            .await
    }

    /// Suspends the app's VMs (`"suspend"`) or wakes them (`"wake"`); returns once they
    /// are.
    pub async fn scale(&self, app: &str, verb: &str) -> Result<serde_json::Value> {
        self.call(Method::POST, &format!("/v1/apps/{app}/{verb}"), None::<&()>)
            .await
    }

    /// The last `lines` lines of the app's newest VM's console, and where to follow on.
    pub async fn logs(&self, app: &str, lines: usize) -> Result<Logs> {
        self.call(
            Method::GET,
            &format!("/v1/apps/{app}/logs?lines={lines}"),
            None::<&()>,
        )
        .await
    }

    /// The app's newest VM's console output after byte `since` (`next` of the answer
    /// before, which applies to that answer's VM only).
    pub async fn logs_since(&self, app: &str, since: u64) -> Result<Logs> {
        self.call(
            Method::GET,
            &format!("/v1/apps/{app}/logs?since={since}"),
            None::<&()>,
        )
        .await
    }

    pub async fn exec(&self, app: &str, argv: Vec<String>) -> Result<ExecResponse> {
        let req = ExecRequest {
            argv,
            timeout_ms: 0,
        };
        self.call(Method::POST, &format!("/v1/apps/{app}/exec"), Some(&req))
            .await
    }

    /// At most `limit` events after `since`, oldest first (the agent caps `limit`).
    pub async fn events(&self, since: u64, app: Option<&str>, limit: usize) -> Result<Vec<Event>> {
        let q = app.map(|a| format!("&app={a}")).unwrap_or_default();
        self.call(
            Method::GET,
            &format!("/v1/events?since={since}&limit={limit}{q}"),
            None::<&()>,
        )
        .await
    }

    pub async fn images(&self) -> Result<Vec<shellwego_storage::PulledImage>> {
        self.call(Method::GET, "/v1/images", None::<&()>).await
    }

    pub async fn remove_image(&self, digest: &str) -> Result<serde_json::Value> {
        self.call(Method::DELETE, &format!("/v1/images/{digest}"), None::<&()>)
            .await
    }
}
