//! The agent's commands and the one service that carries them out (after Firecracker's
//! `VmmAction`): the API's handlers only decode a request into an [`AgentCommand`] and
//! encode the [`Reply`] or [`CommandError`], so what the agent does for a client is in
//! one place, testable without HTTP.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::admission::{Capacity, Overcommit, Refusal};
use crate::endpoint::Endpoints;
use crate::provision::Platform;
use crate::reconciler::executor::{Demand, Executor};
use crate::reconciler::{Health, VmState};
use crate::spec::DesiredApp;
use crate::state::VmRow;
use crate::wire::{
    AppStatus, ApplyRequest, ApplyResponse, Event, ExecRequest, ExecResponse, FailureStatus, Logs,
    VmStatus,
};

/// The executor on the real platform.
pub type AgentExecutor = Executor<Platform, Endpoints>;

/// Most events one `events` answer carries; a client pages on with `since`.
pub const MAX_EVENTS_PER_PAGE: usize = 1000;

/// Most console output one `logs` answer with `since` carries; a client reads on from
/// its `next`.
const MAX_LOG_CHUNK: usize = 1 << 20;

/// Everything a client can ask of the agent.
#[derive(Debug, Clone)]
pub enum AgentCommand {
    /// Apps with their VMs (`ps`).
    Status,
    /// Make `request.spec` the desired state of app `name`.
    Apply { name: String, request: ApplyRequest },
    /// Stop wanting the app.
    Remove { name: String },
    /// The last `lines` of the console of the app's newest VM; with `since`, only its
    /// output after that byte offset (`next` of the answer before).
    Logs {
        name: String,
        lines: usize,
        since: Option<u64>,
    },
    /// Run a command in the app's VM.
    Exec { name: String, request: ExecRequest },
    /// Events after `since`, oldest first, at most `limit`.
    Events {
        since: u64,
        app: Option<String>,
        limit: usize,
    },
    /// Pulled images.
    Images,
    /// Forget an image and its unused layers.
    RemoveImage { digest: String },
    /// Suspend the app's VMs now, or wake them (scale to zero by hand).
    Scale { name: String, demand: Demand },
}

/// What a command answers.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Apps(Vec<AppStatus>),
    Applied(ApplyResponse),
    Removed { app: String },
    Logs(Logs),
    Exec(ExecResponse),
    Events(Vec<Event>),
    Images(Vec<shellwego_storage::PulledImage>),
    ImageRemoved { removed: String },
    Scaled { app: String, state: String },
}

/// How long `suspend` and `wake` wait for the app's VMs to get there.
const SCALE_WAIT: Duration = Duration::from_secs(120);

/// Why a command was not carried out; each kind maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The request itself is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// The spec or its secrets are invalid, or the host cannot take the app (422).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The guest did not answer as it should (502).
    #[error("{0}")]
    Guest(String),
    /// The agent failed (500).
    #[error("{0}")]
    Internal(String),
}

fn internal(e: impl std::fmt::Display) -> CommandError {
    CommandError::Internal(e.to_string())
}

/// Carries out [`AgentCommand`]s.
pub struct AgentService {
    pub exec: Arc<AgentExecutor>,
    pub overcommit: Overcommit,
}

impl AgentService {
    pub async fn handle(&self, command: AgentCommand) -> Result<Reply, CommandError> {
        match command {
            AgentCommand::Status => self.status().map(Reply::Apps),
            AgentCommand::Apply { name, request } => {
                self.apply(&name, request).await.map(Reply::Applied)
            }
            AgentCommand::Remove { name } => {
                self.remove(&name).map(|()| Reply::Removed { app: name })
            }
            AgentCommand::Logs { name, lines, since } => {
                self.logs(&name, lines, since).map(Reply::Logs)
            }
            AgentCommand::Exec { name, request } => {
                self.exec_in(&name, request).await.map(Reply::Exec)
            }
            AgentCommand::Events { since, app, limit } => {
                let limit = limit.clamp(1, MAX_EVENTS_PER_PAGE);
                let events = self
                    .exec
                    .store
                    .events_page(since, app.as_deref(), limit)
                    .map_err(internal)?;
                Ok(Reply::Events(events.into_iter().map(Event::from).collect()))
            }
            AgentCommand::Images => self
                .exec
                .platform
                .images
                .list()
                .map(Reply::Images)
                .map_err(internal),
            AgentCommand::Scale { name, demand } => self.scale(&name, demand).await,
            AgentCommand::RemoveImage { digest } => {
                match self.exec.platform.images.remove(&digest) {
                    Ok(()) => Ok(Reply::ImageRemoved { removed: digest }),
                    Err(e) => Err(CommandError::BadRequest(e.to_string())),
                }
            }
        }
    }

    fn status(&self) -> Result<Vec<AppStatus>, CommandError> {
        let store = &self.exec.store;
        let desired = store.desired().map_err(internal)?;
        let failures = store.failures().map_err(internal)?;
        let vms = store.vms().map_err(internal)?;
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
                let app_vms: Vec<VmStatus> = vms
                    .iter()
                    .filter(|v| v.app == name)
                    .map(VmStatus::from)
                    .collect();
                let healthy = app_vms.iter().any(|v| {
                    v.version == version
                        && v.state == VmState::Running
                        && v.health == Health::Healthy
                });
                AppStatus {
                    image: spec.map(|s| s.image.clone()).unwrap_or_default(),
                    // A record of interruptions alone (no failed attempt) is not a failure.
                    failure: failures
                        .get(&name)
                        .filter(|f| f.attempts > 0)
                        .map(FailureStatus::from),
                    name,
                    version,
                    vms: app_vms,
                    healthy,
                }
            })
            .collect())
    }

    async fn apply(&self, name: &str, body: ApplyRequest) -> Result<ApplyResponse, CommandError> {
        let app =
            DesiredApp::from_toml(&body.spec).map_err(|e| CommandError::Invalid(e.to_string()))?;
        if app.name != name {
            return Err(CommandError::BadRequest(format!(
                "spec names app {:?}, URL names {name:?}",
                app.name
            )));
        }
        if let Some(missing) = app.secrets.keys().find(|k| !body.secrets.contains_key(*k)) {
            return Err(CommandError::Invalid(format!(
                "secrets.{missing}: no value was delivered"
            )));
        }
        if let Some(bad) = body.secrets.keys().find(|k| !app.secrets.contains_key(*k)) {
            return Err(CommandError::Invalid(format!(
                "secret {bad:?} is not declared in the spec's [secrets]"
            )));
        }
        crate::bounds::check_secret_values(&body.secrets)
            .map_err(|e| CommandError::Invalid(e.to_string()))?;
        self.admit(&app).await?;
        // Inline values arrived with the others (to be sealed); the stored spec keeps none.
        let mut app = app.without_secret_values();
        app.secrets_version = self
            .exec
            .secrets_version(name, &body.secrets)
            .map_err(internal)?;
        let sealed = self
            .exec
            .seal_secrets(name, &body.secrets)
            .map_err(internal)?;
        let version = app.spec_hash();
        // One transaction: spec, sealed secrets, the failure record reset (applying again
        // is an explicit retry) and the event.
        let event = self
            .exec
            .store
            .apply(
                &app,
                sealed.as_deref(),
                &format!("desired: {} (version {version})", app.image),
            )
            .map_err(internal)?;
        self.exec.wake.notify_one();
        Ok(ApplyResponse {
            app: name.to_string(),
            version,
            event,
        })
    }

    /// Whether the host can take `app` next to the other apps.
    async fn admit(&self, app: &DesiredApp) -> Result<(), CommandError> {
        // Every replica counts: the other apps' and all but one of this app's.
        let desired = self.exec.store.desired().map_err(internal)?;
        let others: Vec<_> = desired
            .apps
            .values()
            .filter(|a| a.name != app.name)
            .flat_map(|a| std::iter::repeat_n(a.resources, a.count.max(1) as usize))
            .chain(std::iter::repeat_n(
                app.resources,
                app.count.max(1) as usize - 1,
            ))
            .collect();
        let zfs = self.exec.platform.rootfs.zfs().clone();
        let pool = zfs.pool().to_string();
        let (mem, pool_size) = tokio::task::spawn_blocking(move || {
            let mem = crate::admission::mem_total().map_err(|e| e.to_string())?;
            let used = zfs.get_u64(&pool, "used").map_err(|e| e.to_string())?;
            let avail = zfs.get_u64(&pool, "available").map_err(|e| e.to_string())?;
            Ok::<_, String>((mem, used + avail))
        })
        .await
        .map_err(internal)?
        .map_err(CommandError::Internal)?;
        let cap = Capacity::of_host(mem, pool_size, self.overcommit.memory, self.overcommit.disk);
        crate::admission::admit(cap, &others, &app.resources)
            .map_err(|r: Refusal| CommandError::Invalid(r.to_string()))
    }

    fn remove(&self, name: &str) -> Result<(), CommandError> {
        self.exec
            .store
            .remove_app_and_secrets(name, "app removed from desired state")
            .map_err(internal)?;
        self.exec.wake.notify_one();
        Ok(())
    }

    /// Asks for the app to be suspended or woken, and waits until all its VMs are.
    async fn scale(&self, name: &str, demand: Demand) -> Result<Reply, CommandError> {
        let desired = self.exec.store.desired().map_err(internal)?;
        if !desired.apps.contains_key(name) {
            return Err(CommandError::NotFound(format!("no app {name}")));
        }
        self.exec.demand(name, demand);
        let (want, word) = match demand {
            Demand::Suspend => (VmState::Suspended, "suspended"),
            Demand::Wake => (VmState::Running, "running"),
        };
        let start = std::time::Instant::now();
        loop {
            let vms = self.app_vms(name);
            let there = !vms.is_empty()
                && vms.iter().all(|v| {
                    v.state == want && (demand == Demand::Suspend || v.health == Health::Healthy)
                });
            if there {
                return Ok(Reply::Scaled {
                    app: name.to_string(),
                    state: word.into(),
                });
            }
            if demand == Demand::Suspend && !self.exec.demand_pending(name, demand) {
                return Err(CommandError::Invalid(format!(
                    "{name} was not suspended: connections arrived while it was being suspended (its VMs run on), or it could not be suspended within {}s; see `shellwego events --app {name}`",
                    crate::reconciler::executor::DEMAND_LIFETIME.as_secs()
                )));
            }
            if start.elapsed() >= SCALE_WAIT {
                return Err(CommandError::Invalid(format!(
                    "{name} is not {word} after {}s (an app is suspended only when all its VMs of the current version serve); see `shellwego events --app {name}`",
                    SCALE_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn app_vms(&self, name: &str) -> Vec<VmRow> {
        self.exec
            .store
            .vms()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.app == name)
            .collect()
    }

    /// The console of the app's newest VM: its last `lines` lines, or with `since` only
    /// what followed that offset, so `logs --follow` is sent each byte once.
    fn logs(&self, name: &str, lines: usize, since: Option<u64>) -> Result<Logs, CommandError> {
        let vms = self.app_vms(name);
        let vm = vms
            .iter()
            .max_by_key(|v| v.created_at)
            .ok_or_else(|| CommandError::NotFound(format!("app {name} has no VM")))?;
        let (vmm, id) = (&self.exec.platform.vmm, vm.vm_id.to_string());
        Ok(match since {
            None => {
                let (log, next) = vmm.console_tail_and_end(&id, lines);
                Logs {
                    vm_id: vm.vm_id,
                    log,
                    next,
                    gap: false,
                }
            }
            Some(offset) => {
                let chunk = vmm
                    .console_from(&id, offset, MAX_LOG_CHUNK)
                    .map_err(|e| internal(format!("console of VM {id}: {e}")))?;
                Logs {
                    vm_id: vm.vm_id,
                    log: chunk.text,
                    next: chunk.next,
                    gap: chunk.gap,
                }
            }
        })
    }

    async fn exec_in(&self, name: &str, body: ExecRequest) -> Result<ExecResponse, CommandError> {
        if body.argv.is_empty() {
            return Err(CommandError::BadRequest("argv is empty".into()));
        }
        let vms = self.app_vms(name);
        let vm = target_vm(&vms)
            .ok_or_else(|| CommandError::NotFound(format!("app {name} has no running VM")))?;
        let platform = self.exec.platform.clone();
        let vm_id = vm.vm_id;
        let timeout = Duration::from_millis(if body.timeout_ms == 0 {
            60_000
        } else {
            body.timeout_ms
        });
        if timeout > crate::guest::MAX_EXEC_TIMEOUT {
            return Err(CommandError::BadRequest(format!(
                "timeout_ms {}: at most {} ms",
                body.timeout_ms,
                crate::guest::MAX_EXEC_TIMEOUT.as_millis()
            )));
        }
        let out = tokio::task::spawn_blocking(move || {
            let mut c = platform.guest(vm_id)?;
            let argv: Vec<&str> = body.argv.iter().map(String::as_str).collect();
            c.exec(&argv, timeout)
        })
        .await
        .map_err(internal)?
        .map_err(|e| CommandError::Guest(e.to_string()))?;
        Ok(ExecResponse {
            code: out.code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: out.timed_out,
        })
    }
}

/// The app's VM to talk to: the newest running one, healthy first.
fn target_vm(vms: &[VmRow]) -> Option<&VmRow> {
    vms.iter()
        .filter(|v| v.state == VmState::Running)
        .max_by_key(|v| (v.health == Health::Healthy, v.created_at))
}
