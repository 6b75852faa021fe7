//! The API's wire types: what the CLI and other clients send and receive. They are kept
//! apart from the database's rows (`state`), so the storage layout can change without
//! changing the API, and the API shows only what a client should see.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::reconciler::{FailureRecord, Health, VmState};
use crate::state::{Event as EventRow, VmRow};

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
    /// The sequence number of the apply's own event: `apply` follows the events from it
    /// without reading the log before it (0 from agents before it was sent).
    #[serde(default)]
    pub event: u64,
}

/// One VM of an app, as `ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub vm_id: Uuid,
    pub version: String,
    pub state: VmState,
    pub health: Health,
    /// The step in progress or last done.
    pub step: String,
    pub ip: Option<String>,
    pub image_digest: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub last_error: Option<String>,
}

impl From<&VmRow> for VmStatus {
    fn from(row: &VmRow) -> VmStatus {
        VmStatus {
            vm_id: row.vm_id,
            version: row.version.clone(),
            state: row.state,
            health: row.health,
            step: row.step.clone(),
            ip: row.ip.clone(),
            image_digest: row.image_digest.clone(),
            created_at: row.created_at,
            last_error: row.last_error.clone(),
        }
    }
}

/// The last failed attempts of an app's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureStatus {
    pub version: String,
    pub attempts: u32,
    /// Seconds since the Unix epoch.
    pub last_failed_at: u64,
    pub reason: String,
}

impl From<&FailureRecord> for FailureStatus {
    fn from(f: &FailureRecord) -> FailureStatus {
        FailureStatus {
            version: f.version.clone(),
            attempts: f.attempts,
            last_failed_at: f.last_failed_at,
            reason: f.reason.clone(),
        }
    }
}

/// One app in `GET /v1/apps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub image: String,
    pub version: String,
    pub vms: Vec<VmStatus>,
    pub failure: Option<FailureStatus>,
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

/// Something that happened, for `apply`'s progress and `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub app: String,
    pub vm_id: Option<Uuid>,
    pub message: String,
}

impl From<EventRow> for Event {
    fn from(e: EventRow) -> Event {
        Event {
            seq: e.seq,
            at: e.at,
            app: e.app,
            vm_id: e.vm_id,
            message: e.message,
        }
    }
}

/// `GET /v1/apps/{name}/logs`: console output of the app's newest VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Logs {
    pub vm_id: Uuid,
    pub log: String,
    /// Where a `?since=` read continues: a byte offset in this VM's console.
    #[serde(default)]
    pub next: u64,
    /// Some output before `log` was rotated away before it was read.
    #[serde(default)]
    pub gap: bool,
}

/// Seconds a VM has existed, for `ps`.
pub fn uptime(vm: &VmStatus, now: u64) -> u64 {
    now.saturating_sub(vm.created_at)
}
