//! The agent's API, served on a Unix socket that only root can open (mode 0600), and
//! optionally on TCP (`api_tcp`), where every request needs the bearer token kept in
//! `api_token_file`.
//!
//! ```text
//! GET    /v1/apps                      apps with their VMs (ps)
//! PUT    /v1/apps/{name}               {"spec": "<TOML>", "secrets": {...}}: desired state
//! DELETE /v1/apps/{name}               stop wanting the app (rm)
//! GET    /v1/apps/{name}/logs?lines=N  the guest console of the app's newest VM
//! POST   /v1/apps/{name}/exec          {"argv": [...], "timeout_ms": N}
//! GET    /v1/events?since=N&app=A      the event log
//! GET    /v1/images                    pulled images
//! DELETE /v1/images/{digest}           forget an image and its unused layers
//! ```
//! Errors are `{"error": "..."}` with a 4xx/5xx status.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tracing::warn;

use crate::conn;
use crate::reconciler::executor::Executor;
use crate::reconciler::{FailureRecord, Health, VmState};
use crate::spec::DesiredApp;
use crate::state::{now_secs, VmRow};

/// `PUT /v1/apps/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The app spec file's text; the agent validates it.
    pub spec: String,
    /// Secret values resolved by the client (from the spec's sources).
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub app: String,
    pub version: String,
}

/// One app in `GET /v1/apps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub image: String,
    pub version: String,
    pub vms: Vec<VmRow>,
    pub failure: Option<FailureRecord>,
    /// True when a VM of the desired version runs and is healthy.
    pub healthy: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResponse {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

pub struct ApiState {
    pub exec: Arc<Executor>,
    pub wake: Arc<Notify>,
    pub overcommit: crate::admission::Overcommit,
}

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

/// The app's VM to talk to: the newest running one, healthy first.
fn target_vm(vms: &[VmRow]) -> Option<&VmRow> {
    vms.iter()
        .filter(|v| v.state == VmState::Running)
        .max_by_key(|v| (v.health == Health::Healthy, v.created_at))
}

impl ApiState {
    /// Whether the host can take `app` next to the other apps (`Err(Ok)`: what is short;
    /// `Err(Err)`: the host could not be measured).
    async fn admit(
        &self,
        app: &DesiredApp,
    ) -> Result<(), Result<crate::admission::Refusal, String>> {
        let others: Vec<_> = match self.exec.store.desired() {
            Ok(d) => d
                .apps
                .values()
                .filter(|a| a.name != app.name)
                .map(|a| a.resources)
                .collect(),
            Err(e) => return Err(Err(e.to_string())),
        };
        let zfs = self.exec.platform.rootfs.zfs().clone();
        let pool = zfs.pool().to_string();
        let measured = tokio::task::spawn_blocking(move || {
            let mem = crate::admission::mem_total().map_err(|e| e.to_string())?;
            let used = zfs.get_u64(&pool, "used").map_err(|e| e.to_string())?;
            let avail = zfs.get_u64(&pool, "available").map_err(|e| e.to_string())?;
            Ok::<_, String>((mem, used + avail))
        })
        .await
        .map_err(|e| Err(e.to_string()))?;
        let (mem, pool_size) = measured.map_err(Err)?;
        let cap = crate::admission::Capacity::of_host(
            mem,
            pool_size,
            self.overcommit.memory,
            self.overcommit.disk,
        );
        crate::admission::admit(cap, &others, &app.resources).map_err(Ok)
    }

    fn status(&self) -> Result<Vec<AppStatus>, String> {
        let store = &self.exec.store;
        let desired = store.desired().map_err(|e| e.to_string())?;
        let failures = store.failures().map_err(|e| e.to_string())?;
        let vms = store.vms().map_err(|e| e.to_string())?;
        let mut names: Vec<String> = desired.apps.keys().cloned().collect();
        for v in &vms {
            if !names.contains(&v.app) {
                names.push(v.app.clone());
            }
        }
        Ok(names
            .into_iter()
            .map(|name| {
                let spec = desired.apps.get(&name);
                let version = spec.map(DesiredApp::spec_hash).unwrap_or_default();
                let app_vms: Vec<VmRow> = vms.iter().filter(|v| v.app == name).cloned().collect();
                let healthy = app_vms.iter().any(|v| {
                    v.version == version
                        && v.state == VmState::Running
                        && v.health == Health::Healthy
                });
                AppStatus {
                    image: spec.map(|s| s.image.clone()).unwrap_or_default(),
                    // A record of interruptions alone (no failed attempt) is not a failure.
                    failure: failures.get(&name).filter(|f| f.attempts > 0).cloned(),
                    name,
                    version,
                    vms: app_vms,
                    healthy,
                }
            })
            .collect())
    }

    async fn handle(&self, req: Request<Incoming>) -> Resp {
        let path: Vec<String> = req
            .uri()
            .path()
            .trim_matches('/')
            .split('/')
            .map(str::to_string)
            .collect();
        let parts: Vec<&str> = path.iter().map(String::as_str).collect();
        let method = req.method().clone();
        match (method, parts.as_slice()) {
            (Method::GET, ["v1", "apps"]) => match self.status() {
                Ok(s) => json(StatusCode::OK, &s),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            },
            (Method::PUT, ["v1", "apps", name]) => {
                let name = name.to_string();
                self.apply(&name, req).await
            }
            (Method::DELETE, ["v1", "apps", name]) => {
                let name = name.to_string();
                let removed = self
                    .exec
                    .store
                    .remove_app(&name)
                    .and_then(|()| self.exec.forget_secrets(&name));
                match removed {
                    Ok(()) => {
                        let _ =
                            self.exec
                                .store
                                .event(&name, None, "app removed from desired state");
                        self.wake.notify_one();
                        json(StatusCode::ACCEPTED, &serde_json::json!({ "app": name }))
                    }
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }
            (Method::GET, ["v1", "apps", name, "logs"]) => {
                let lines = query(&req, "lines")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(200);
                let vms = self.exec.store.vms().unwrap_or_default();
                let app_vms: Vec<VmRow> = vms.into_iter().filter(|v| v.app == *name).collect();
                match app_vms.iter().max_by_key(|v| v.created_at) {
                    None => error(StatusCode::NOT_FOUND, format!("app {name} has no VM")),
                    Some(vm) => {
                        let text = self
                            .exec
                            .platform
                            .vmm
                            .console_tail(&vm.vm_id.to_string(), lines);
                        json(
                            StatusCode::OK,
                            &serde_json::json!({ "vm_id": vm.vm_id, "log": text }),
                        )
                    }
                }
            }
            (Method::POST, ["v1", "apps", name, "exec"]) => {
                let name = name.to_string();
                self.exec_in(&name, req).await
            }
            (Method::GET, ["v1", "events"]) => {
                let since = query(&req, "since")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let app = query(&req, "app");
                match self.exec.store.events(since, app.as_deref()) {
                    Ok(ev) => json(StatusCode::OK, &ev),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }
            (Method::GET, ["v1", "images"]) => match self.exec.platform.images.list() {
                Ok(images) => json(StatusCode::OK, &images),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            },
            (Method::DELETE, ["v1", "images", digest]) => {
                match self.exec.platform.images.remove(digest) {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({ "removed": digest })),
                    Err(e) => error(StatusCode::BAD_REQUEST, e),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {} {}", req.method(), req.uri().path()),
            ),
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

    async fn apply(&self, name: &str, req: Request<Incoming>) -> Resp {
        let body: ApplyRequest = match Self::body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let app = match DesiredApp::from_toml(&body.spec) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
        };
        if app.name != name {
            return error(
                StatusCode::BAD_REQUEST,
                format!("spec names app {:?}, URL names {name:?}", app.name),
            );
        }
        if let Some(missing) = app.secrets.keys().find(|k| !body.secrets.contains_key(*k)) {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("secrets.{missing}: no value was delivered"),
            );
        }
        if let Some(bad) = body.secrets.keys().find(|k| !app.secrets.contains_key(*k)) {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("secret {bad:?} is not declared in the spec's [secrets]"),
            );
        }
        if let Err(e) = crate::bounds::check_secret_values(&body.secrets) {
            return error(StatusCode::UNPROCESSABLE_ENTITY, e);
        }
        match self.admit(&app).await {
            Ok(()) => {}
            Err(Ok(refusal)) => return error(StatusCode::UNPROCESSABLE_ENTITY, refusal),
            Err(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
        // Inline values arrived with the others (to be sealed); the stored spec keeps none.
        let app = app.without_secret_values();
        if let Err(e) = self.exec.set_secrets(name, &body.secrets) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, e);
        }
        // Applying again is an explicit retry: forget the backoff of earlier failures.
        if let Err(e) = self.exec.store.clear_failure(name) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, e);
        }
        if let Err(e) = self.exec.store.put_app(&app) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, e);
        }
        let version = app.spec_hash();
        let _ = self.exec.store.event(
            name,
            None,
            format!("desired: {} (version {version})", app.image),
        );
        self.wake.notify_one();
        json(
            StatusCode::ACCEPTED,
            &ApplyResponse {
                app: name.to_string(),
                version,
            },
        )
    }

    async fn exec_in(&self, name: &str, req: Request<Incoming>) -> Resp {
        let body: ExecRequest = match Self::body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        if body.argv.is_empty() {
            return error(StatusCode::BAD_REQUEST, "argv is empty");
        }
        let vms: Vec<VmRow> = self
            .exec
            .store
            .vms()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.app == name)
            .collect();
        let Some(vm) = target_vm(&vms) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("app {name} has no running VM"),
            );
        };
        let platform = self.exec.platform.clone();
        let vm_id = vm.vm_id;
        let timeout = Duration::from_millis(if body.timeout_ms == 0 {
            60_000
        } else {
            body.timeout_ms
        });
        let result = tokio::task::spawn_blocking(move || {
            let mut c = platform.guest(vm_id)?;
            let argv: Vec<&str> = body.argv.iter().map(String::as_str).collect();
            c.exec(&argv, timeout)
        })
        .await;
        match result {
            Ok(Ok(out)) => json(
                StatusCode::OK,
                &ExecResponse {
                    code: out.code,
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                    timed_out: out.timed_out,
                },
            ),
            Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, e),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    }
}

/// Serves the API on `socket` (replacing a stale socket file) until the task ends.
pub async fn serve(socket: &Path, state: Arc<ApiState>) -> std::io::Result<()> {
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
    state: Arc<ApiState>,
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
    state: Arc<ApiState>,
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
            Ok::<_, Infallible>(state.handle(req).await)
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

/// Seconds since a VM row was created, for `ps`.
pub fn uptime(row: &VmRow) -> u64 {
    now_secs().saturating_sub(row.created_at)
}
