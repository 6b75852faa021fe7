//! The agent's durable records, in an embedded database (redb) under the data dir:
//! desired apps, VM records, failure history, sealed secrets and an event log. Every
//! write is one transaction; a crash leaves the last committed state. Secret values are
//! stored only as sealed by [`crate::vault::Vault`], never in plaintext.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::reconciler::{ActualState, DesiredState, FailureRecord, Health, VmRecord, VmState};
use crate::spec::DesiredApp;

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const FAILURES: TableDefinition<&str, &[u8]> = TableDefinition::new("failures");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const CACHE_BYTES: usize = 4 << 20;
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");

#[derive(Debug, thiserror::Error)]
#[error("agent database: {0}")]
pub struct StateError(String);

fn err(e: impl std::fmt::Display) -> StateError {
    StateError(e.to_string())
}

/// One VM as the agent records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRow {
    pub vm_id: Uuid,
    pub app: String,
    pub version: String,
    pub state: VmState,
    pub health: Health,
    /// The step in progress or last done ("provisioning", "running", "removing").
    pub step: String,
    pub ip: Option<String>,
    pub image_digest: Option<String>,
    pub created_at: u64,
    pub last_error: Option<String>,
}

impl VmRow {
    pub fn record(&self) -> VmRecord {
        VmRecord {
            vm_id: self.vm_id,
            app: self.app.clone(),
            version: self.version.clone(),
            state: self.state,
            health: self.health,
        }
    }
}

/// Something that happened, for `apply`'s progress and `ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at: u64,
    pub app: String,
    pub vm_id: Option<Uuid>,
    pub message: String,
}

pub struct Store {
    db: Database,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(v).map_err(err)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(b).map_err(err)
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating) the database file.
    pub fn open(path: &Path) -> Result<Store, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        // The records are small; redb's default page cache (up to 1 GiB) would only
        // grow the agent's memory.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StateError(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(APPS).map_err(err)?;
            txn.open_table(VMS).map_err(err)?;
            txn.open_table(FAILURES).map_err(err)?;
            txn.open_table(EVENTS).map_err(err)?;
            txn.open_table(SECRETS).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(Store { db })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StateError> {
        let bytes = encode(value)?;
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(table)
            .map_err(err)?
            .insert(key, bytes.as_slice())
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(table)
            .map_err(err)?
            .remove(key)
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<BTreeMap<String, T>, StateError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(table).map_err(err)?;
        let mut out = BTreeMap::new();
        for item in t.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            out.insert(k.value().to_string(), decode(v.value())?);
        }
        Ok(out)
    }

    pub fn put_app(&self, app: &DesiredApp) -> Result<(), StateError> {
        self.put(APPS, &app.name, app)
    }

    pub fn remove_app(&self, name: &str) -> Result<(), StateError> {
        self.delete(APPS, name)
    }

    pub fn desired(&self) -> Result<DesiredState, StateError> {
        Ok(DesiredState {
            apps: self.all(APPS)?,
        })
    }

    /// Stores an app's sealed secrets (replacing earlier ones).
    pub fn put_sealed_secrets(&self, app: &str, sealed: &[u8]) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(SECRETS)
            .map_err(err)?
            .insert(app, sealed)
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    pub fn sealed_secrets(&self, app: &str) -> Result<Option<Vec<u8>>, StateError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(SECRETS).map_err(err)?;
        Ok(t.get(app).map_err(err)?.map(|v| v.value().to_vec()))
    }

    pub fn remove_sealed_secrets(&self, app: &str) -> Result<(), StateError> {
        self.delete(SECRETS, app)
    }

    pub fn put_vm(&self, row: &VmRow) -> Result<(), StateError> {
        self.put(VMS, &row.vm_id.to_string(), row)
    }

    pub fn remove_vm(&self, vm_id: Uuid) -> Result<(), StateError> {
        self.delete(VMS, &vm_id.to_string())
    }

    pub fn vms(&self) -> Result<Vec<VmRow>, StateError> {
        Ok(self.all::<VmRow>(VMS)?.into_values().collect())
    }

    pub fn vm(&self, vm_id: Uuid) -> Result<Option<VmRow>, StateError> {
        Ok(self.all::<VmRow>(VMS)?.remove(&vm_id.to_string()))
    }

    pub fn put_failure(&self, app: &str, f: &FailureRecord) -> Result<(), StateError> {
        self.put(FAILURES, app, f)
    }

    pub fn clear_failure(&self, app: &str) -> Result<(), StateError> {
        self.delete(FAILURES, app)
    }

    pub fn failures(&self) -> Result<BTreeMap<String, FailureRecord>, StateError> {
        self.all(FAILURES)
    }

    /// The actual state as recorded (the executor overlays what it observes).
    pub fn actual(&self) -> Result<ActualState, StateError> {
        Ok(ActualState {
            now: now_secs(),
            vms: self.vms()?.iter().map(VmRow::record).collect(),
            failures: self.failures()?,
        })
    }

    /// Makes `app` desired in one transaction: its spec, its sealed secrets (`None`:
    /// none), a reset failure record and the event. Returns the event's number.
    pub fn apply(
        &self,
        app: &DesiredApp,
        sealed_secrets: Option<&[u8]>,
        event: &str,
    ) -> Result<u64, StateError> {
        let spec = encode(app)?;
        let txn = self.db.begin_write().map_err(err)?;
        let seq = {
            txn.open_table(APPS)
                .map_err(err)?
                .insert(app.name.as_str(), spec.as_slice())
                .map_err(err)?;
            let mut secrets = txn.open_table(SECRETS).map_err(err)?;
            match sealed_secrets {
                Some(sealed) => secrets.insert(app.name.as_str(), sealed).map(drop),
                None => secrets.remove(app.name.as_str()).map(drop),
            }
            .map_err(err)?;
            txn.open_table(FAILURES)
                .map_err(err)?
                .remove(app.name.as_str())
                .map_err(err)?;
            append_event(&txn, &app.name, None, event.to_string())?
        };
        txn.commit().map_err(err)?;
        Ok(seq)
    }

    /// Stops wanting app `name` in one transaction: its spec, its secrets, the event.
    pub fn remove_app_and_secrets(&self, name: &str, event: &str) -> Result<u64, StateError> {
        let txn = self.db.begin_write().map_err(err)?;
        let seq = {
            txn.open_table(APPS)
                .map_err(err)?
                .remove(name)
                .map_err(err)?;
            txn.open_table(SECRETS)
                .map_err(err)?
                .remove(name)
                .map_err(err)?;
            append_event(&txn, name, None, event.to_string())?
        };
        txn.commit().map_err(err)?;
        Ok(seq)
    }

    /// Appends an event; returns its sequence number.
    pub fn event(
        &self,
        app: &str,
        vm_id: Option<Uuid>,
        message: impl Into<String>,
    ) -> Result<u64, StateError> {
        let txn = self.db.begin_write().map_err(err)?;
        let seq = append_event(&txn, app, vm_id, message.into())?;
        txn.commit().map_err(err)?;
        Ok(seq)
    }

    /// Events after `since`, oldest first, optionally for one app.
    pub fn events(&self, since: u64, app: Option<&str>) -> Result<Vec<Event>, StateError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(EVENTS).map_err(err)?;
        let mut out = Vec::new();
        for item in t.range(since.saturating_add(1)..).map_err(err)? {
            let (_, v) = item.map_err(err)?;
            let ev: Event = decode(v.value())?;
            if app.is_none_or(|a| a == ev.app) {
                out.push(ev);
            }
        }
        Ok(out)
    }
}

/// Appends an event inside `txn`; returns its sequence number.
fn append_event(
    txn: &redb::WriteTransaction,
    app: &str,
    vm_id: Option<Uuid>,
    message: String,
) -> Result<u64, StateError> {
    let mut t = txn.open_table(EVENTS).map_err(err)?;
    let next = t
        .last()
        .map_err(err)?
        .map(|(k, _)| k.value() + 1)
        .unwrap_or(1);
    let ev = Event {
        seq: next,
        at: now_secs(),
        app: app.to_string(),
        vm_id,
        message,
    };
    let bytes = encode(&ev)?;
    t.insert(next, bytes.as_slice()).map_err(err)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let app = DesiredApp::from_toml("name = \"web\"\nimage = \"alpine:3.23\"").unwrap();
        let vm = VmRow {
            vm_id: Uuid::from_u128(7),
            app: "web".into(),
            version: app.spec_hash(),
            state: VmState::Running,
            health: Health::Healthy,
            step: "running".into(),
            ip: Some("10.0.4.2".into()),
            image_digest: None,
            created_at: 1,
            last_error: None,
        };
        {
            let s = Store::open(&path).unwrap();
            s.put_app(&app).unwrap();
            s.put_vm(&vm).unwrap();
            assert_eq!(s.event("web", None, "one").unwrap(), 1);
            assert_eq!(s.event("other", None, "two").unwrap(), 2);
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.desired().unwrap().apps["web"], app);
        assert_eq!(s.vms().unwrap(), vec![vm.clone()]);
        assert_eq!(s.actual().unwrap().vms, vec![vm.record()]);
        assert_eq!(s.events(0, Some("web")).unwrap().len(), 1);
        assert_eq!(s.events(1, None).unwrap()[0].message, "two");
        s.remove_vm(vm.vm_id).unwrap();
        s.remove_app("web").unwrap();
        assert!(s.vms().unwrap().is_empty());
        assert!(s.desired().unwrap().apps.is_empty());
    }
}

/// Writes `tests/fixtures/agent-db-v1.{redb,json}`: a database as the release before
/// schema versioning wrote it, for the migration test. It was run once, with that
/// release's code (`SHELLWEGO_WRITE_FIXTURE=crates/shellwego-agent/tests/fixtures cargo
/// test -p shellwego-agent --lib state::fixture -- --ignored`); the committed files are
/// what it wrote then. Running it with today's code writes today's layout, which is not
/// what the migration test is meant to read, so it is kept only as a record of how the
/// fixture was made.
#[cfg(test)]
mod fixture {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::reconciler::FailureRecord;
    use crate::vault::Vault;

    /// The fixture's secrets key (test only): recorded in the JSON so a test can open the
    /// sealed secrets.
    pub const VAULT_KEY: [u8; 32] = *b"shellwego-fixture-key-v1-0123456";

    const WEB: &str = r#"
name = "web"
image = "registry.example:5000/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

[run]
cmd = ["httpd", "-f", "-p", "8080"]

[resources]
cpu = "500m"
memory = "256Mi"
disk = "2Gi"

[env]
GREETING = "hi"
MODE = "production"

[secrets]
API_KEY = { env = "API_KEY" }
TOKEN = { value = "inline-token" }

[[ports]]
guest = 8080
host = 18080
protocol = "http"

[[ports]]
guest = 9090

[health]
http = "/healthz"
port = 8080
interval = "3s"
timeout = "1s"
retries = 4
grace = "60s"

[bandwidth]
download = "50Mbit"

[network]
egress = "none"
allow = ["10.1.2.0/24:5432", "192.168.1.10"]
"#;

    const MINIMAL: &str = "name = \"minimal\"\nimage = \"alpine:3.23\"\n";

    #[test]
    #[ignore = "writes the release fixture; run by hand only (see the module doc)"]
    fn write_release_fixture() {
        let Some(dir) = std::env::var_os("SHELLWEGO_WRITE_FIXTURE") else {
            panic!("set SHELLWEGO_WRITE_FIXTURE to the fixture directory");
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("agent-db-v1.redb");
        let _ = std::fs::remove_file(&db);
        let keydir = tempfile::tempdir().unwrap();
        let key = keydir.path().join("secrets.key");
        std::fs::write(&key, VAULT_KEY).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let vault = Vault::open_or_create(&key).unwrap();

        let web = DesiredApp::from_toml(WEB).unwrap().without_secret_values();
        let minimal = DesiredApp::from_toml(MINIMAL).unwrap();
        let web_secrets = BTreeMap::from([
            ("API_KEY".to_string(), "key-from-env".to_string()),
            ("TOKEN".to_string(), "inline-token".to_string()),
        ]);
        let running = VmRow {
            vm_id: Uuid::from_u128(0x0001),
            app: "web".into(),
            version: web.spec_hash(),
            state: VmState::Running,
            health: Health::Healthy,
            step: "running".into(),
            ip: Some("10.0.4.2".into()),
            image_digest: Some(
                "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            ),
            created_at: 1_760_000_000,
            last_error: None,
        };
        let exited = VmRow {
            vm_id: Uuid::from_u128(0x0002),
            app: "minimal".into(),
            version: minimal.spec_hash(),
            state: VmState::Exited,
            health: Health::Unknown,
            step: "running".into(),
            ip: Some("10.0.4.3".into()),
            image_digest: None,
            created_at: 1_760_000_100,
            last_error: Some("firecracker exited with status 1".into()),
        };
        let failure = FailureRecord {
            version: minimal.spec_hash(),
            attempts: 2,
            last_failed_at: 1_760_000_200,
            reason: "firecracker exited with status 1".into(),
            interrupted: 0,
        };
        {
            let s = Store::open(&db).unwrap();
            s.put_app(&web).unwrap();
            s.put_app(&minimal).unwrap();
            s.put_sealed_secrets("web", &vault.seal("web", &web_secrets).unwrap())
                .unwrap();
            s.put_vm(&running).unwrap();
            s.put_vm(&exited).unwrap();
            s.put_failure("minimal", &failure).unwrap();
            s.event(
                "web",
                None,
                format!("desired: {} (version {})", web.image, web.spec_hash()),
            )
            .unwrap();
            s.event("web", Some(running.vm_id), "provisioned").unwrap();
            s.event("minimal", None, "desired: alpine:3.23").unwrap();
            s.event(
                "minimal",
                Some(exited.vm_id),
                "exited: firecracker exited with status 1",
            )
            .unwrap();
        }
        let s = Store::open(&db).unwrap();
        let desired = s.desired().unwrap();
        let apps: serde_json::Map<String, serde_json::Value> = desired
            .apps
            .iter()
            .map(|(name, app)| {
                (
                    name.clone(),
                    serde_json::json!({ "spec_hash": app.spec_hash(), "stored": app }),
                )
            })
            .collect();
        let record = serde_json::json!({
            "about": "Written by the agent release before schema versioning (schema 1: no meta table) with state::fixture::write_release_fixture.",
            "vault_key_hex": hex::encode(VAULT_KEY),
            "apps": apps,
            "secrets": { "web": web_secrets },
            "vms": s.vms().unwrap(),
            "failures": s.failures().unwrap(),
            "events": s.events(0, None).unwrap(),
        });
        std::fs::write(
            dir.join("agent-db-v1.json"),
            serde_json::to_string_pretty(&record).unwrap() + "\n",
        )
        .unwrap();
    }
}
