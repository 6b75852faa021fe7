//! The agent's durable records, in an embedded database (redb) under the data dir:
//! desired apps, VM records, failure history, sealed secrets and an event log. Every
//! write is one transaction; a crash leaves the last committed state. Secret values are
//! stored only as sealed by [`crate::vault::Vault`], never in plaintext.
//!
//! The database records its schema version (`schema`); `Store::open` brings an older
//! database forward and refuses one written by a newer agent. Records are JSON and decode
//! leniently (unknown fields are ignored, fields added later take their defaults), so an
//! added field needs no migration. The event log is bounded (`events`).

mod events;
mod schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::reconciler::{ActualState, DesiredState, FailureRecord, Health, VmRecord, VmState};
use crate::spec::DesiredApp;

pub use events::{EventRetention, DEFAULT_MAX_EVENTS, DEFAULT_MAX_EVENT_AGE_SECS};
pub use schema::SCHEMA_VERSION;

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const FAILURES: TableDefinition<&str, &[u8]> = TableDefinition::new("failures");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
const CACHE_BYTES: usize = 4 << 20;

/// Why the database could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("agent database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("agent database: {what}: {source}")]
    Db {
        what: String,
        #[source]
        source: redb::Error,
    },
    #[error("agent database: record {key:?} of table {table} does not decode: {source}")]
    Decode {
        table: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("agent database: record {key:?} of table {table} does not encode: {source}")]
    Encode {
        table: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "agent database {path} has schema version {found}, but this agent knows versions up \
         to {supported}: it was written by a newer agent. Run that agent (or a newer one), or \
         restore the database from before the upgrade"
    )]
    NewerSchema {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("agent database {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Adds what was being done to a redb error.
trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, StateError>;
}

impl<T, E: Into<redb::Error>> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, StateError> {
        self.map_err(|e| StateError::Db {
            what: what.to_string(),
            source: e.into(),
        })
    }
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
    /// When its guest got its run config (seconds since the epoch): a health wait resumed
    /// after an agent restart counts its grace from here, not from the queueing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_since: Option<u64>,
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
    retention: EventRetention,
}

fn encode<T: Serialize>(table: &impl TableHandle, key: &str, v: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(v).map_err(|source| StateError::Encode {
        table: table.name().to_string(),
        key: key.to_string(),
        source,
    })
}

fn decode<'a, T: Deserialize<'a>>(
    table: &impl TableHandle,
    key: &str,
    b: &'a [u8],
) -> Result<T, StateError> {
    serde_json::from_slice(b).map_err(|source| StateError::Decode {
        table: table.name().to_string(),
        key: key.to_string(),
        source,
    })
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Inserts (replacing) one JSON record of a string-keyed table in `txn`.
fn insert_json<T: Serialize>(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    value: &T,
) -> Result<(), StateError> {
    let bytes = encode(&table, key, value)?;
    insert_bytes(txn, table, key, &bytes)
}

fn insert_bytes(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    bytes: &[u8],
) -> Result<(), StateError> {
    let what = || format!("insert {key:?} into {}", table.name());
    txn.open_table(table)
        .ctx(&what())?
        .insert(key, bytes)
        .ctx(&what())?;
    Ok(())
}

fn remove_key(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<(), StateError> {
    let what = || format!("remove {key:?} from {}", table.name());
    txn.open_table(table)
        .ctx(&what())?
        .remove(key)
        .ctx(&what())?;
    Ok(())
}

impl Store {
    /// Opens (creating) the database file, and brings its schema to [`SCHEMA_VERSION`]
    /// in one write transaction; a database of a newer version is refused untouched.
    pub fn open(path: &Path) -> Result<Store, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        // The records are small; redb's default page cache (up to 1 GiB) would only
        // grow the agent's memory.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StateError::Open {
                path: path.to_path_buf(),
                source: e.into(),
            })?;
        let store = Store {
            db,
            retention: EventRetention::default(),
        };
        store.write("migrate the schema", |txn| schema::migrate(txn, path))?;
        Ok(store)
    }

    /// The same store with another event retention (the default keeps
    /// [`DEFAULT_MAX_EVENTS`] events of at most [`DEFAULT_MAX_EVENT_AGE_SECS`]).
    pub fn with_event_retention(mut self, retention: EventRetention) -> Store {
        self.retention = retention;
        self
    }

    /// The schema version the database is at (after `open`, always [`SCHEMA_VERSION`]).
    pub fn schema_version(&self) -> Result<u64, StateError> {
        self.read("read the schema version", schema::version)
    }

    /// Runs `f` in one write transaction and commits it; an error from `f` aborts it, so
    /// either all of `f`'s writes are stored or none.
    fn write<R>(
        &self,
        what: &str,
        f: impl FnOnce(&WriteTransaction) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let txn = self.db.begin_write().ctx(what)?;
        match f(&txn) {
            Ok(r) => {
                txn.commit().ctx(what)?;
                Ok(r)
            }
            Err(e) => {
                // Dropping would abort as well; an abort error says nothing more than `e`.
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    fn read<R>(
        &self,
        what: &str,
        f: impl FnOnce(&ReadTransaction) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let txn = self.db.begin_read().ctx(what)?;
        f(&txn)
    }

    /// One record of a string-keyed table.
    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        let what = format!("read {key:?} of {}", table.name());
        self.read(&what, |txn| {
            let t = txn.open_table(table).ctx(&what)?;
            let value = t.get(key).ctx(&what)?;
            value.map(|v| decode(&table, key, v.value())).transpose()
        })
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<BTreeMap<String, T>, StateError> {
        let what = format!("read {}", table.name());
        self.read(&what, |txn| {
            let t = txn.open_table(table).ctx(&what)?;
            let mut out = BTreeMap::new();
            for item in t.iter().ctx(&what)? {
                let (k, v) = item.ctx(&what)?;
                let key = k.value().to_string();
                let value = decode(&table, &key, v.value())?;
                out.insert(key, value);
            }
            Ok(out)
        })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StateError> {
        self.write("put a record", |txn| insert_json(txn, table, key, value))
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StateError> {
        self.write("delete a record", |txn| remove_key(txn, table, key))
    }

    /// Applies an app in one transaction: stores its spec, stores its sealed secrets
    /// (`None`: it has none, and earlier ones are removed), forgets its failure record
    /// (applying again is an explicit retry) and logs `event`. Returns the event's
    /// sequence number. A crash leaves either all of it or none.
    pub fn apply(
        &self,
        app: &DesiredApp,
        sealed_secrets: Option<&[u8]>,
        event: &str,
    ) -> Result<u64, StateError> {
        self.write("apply an app", |txn| {
            insert_json(txn, APPS, &app.name, app)?;
            match sealed_secrets {
                Some(sealed) => insert_bytes(txn, SECRETS, &app.name, sealed)?,
                None => remove_key(txn, SECRETS, &app.name)?,
            }
            remove_key(txn, FAILURES, &app.name)?;
            events::append(txn, &self.retention, now_secs(), &app.name, None, event)
        })
    }

    /// Stops wanting an app in one transaction: removes its spec and sealed secrets and
    /// logs `event`. Returns the event's sequence number.
    pub fn remove_app_and_secrets(&self, name: &str, event: &str) -> Result<u64, StateError> {
        self.write("remove an app", |txn| {
            remove_key(txn, APPS, name)?;
            remove_key(txn, SECRETS, name)?;
            events::append(txn, &self.retention, now_secs(), name, None, event)
        })
    }

    pub fn put_app(&self, app: &DesiredApp) -> Result<(), StateError> {
        self.put(APPS, &app.name, app)
    }

    pub fn remove_app(&self, name: &str) -> Result<(), StateError> {
        self.delete(APPS, name)
    }

    /// One desired app, read by its key alone.
    pub fn app(&self, name: &str) -> Result<Option<DesiredApp>, StateError> {
        self.get(APPS, name)
    }

    pub fn desired(&self) -> Result<DesiredState, StateError> {
        Ok(DesiredState {
            apps: self.all(APPS)?,
        })
    }

    /// Stores an app's sealed secrets (replacing earlier ones).
    pub fn put_sealed_secrets(&self, app: &str, sealed: &[u8]) -> Result<(), StateError> {
        self.write("store sealed secrets", |txn| {
            insert_bytes(txn, SECRETS, app, sealed)
        })
    }

    pub fn sealed_secrets(&self, app: &str) -> Result<Option<Vec<u8>>, StateError> {
        let what = format!("read the sealed secrets of {app:?}");
        self.read(&what, |txn| {
            let t = txn.open_table(SECRETS).ctx(&what)?;
            let value = t.get(app).ctx(&what)?;
            Ok(value.map(|v| v.value().to_vec()))
        })
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

    /// Removes a VM's row and, in the same transaction, stores its app's failure record
    /// (when `failure` is given): a failure is counted once, whatever crashes when.
    pub fn remove_vm_with_failure(
        &self,
        vm_id: Uuid,
        failure: Option<(&str, &FailureRecord)>,
    ) -> Result<(), StateError> {
        self.write("remove a VM", |txn| {
            remove_key(txn, VMS, &vm_id.to_string())?;
            if let Some((app, f)) = failure {
                insert_json(txn, FAILURES, app, f)?;
            }
            Ok(())
        })
    }

    pub fn vms(&self) -> Result<Vec<VmRow>, StateError> {
        Ok(self.all::<VmRow>(VMS)?.into_values().collect())
    }

    /// One VM's row, read by its key alone.
    pub fn vm(&self, vm_id: Uuid) -> Result<Option<VmRow>, StateError> {
        self.get(VMS, &vm_id.to_string())
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
            activity: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_row(app: &DesiredApp) -> VmRow {
        VmRow {
            vm_id: Uuid::from_u128(7),
            app: app.name.clone(),
            version: app.spec_hash(),
            state: VmState::Running,
            health: Health::Healthy,
            step: "running".into(),
            ip: Some("10.0.4.2".into()),
            image_digest: None,
            created_at: 1,
            last_error: None,
            running_since: None,
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let app = DesiredApp::from_toml("name = \"web\"\nimage = \"alpine:3.23\"").unwrap();
        let vm = vm_row(&app);
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

    #[test]
    fn tc_u14_state_reads_one_app_and_one_vm_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("agent.redb")).unwrap();
        let app = DesiredApp::from_toml("name = \"web\"\nimage = \"alpine:3.23\"").unwrap();
        let vm = vm_row(&app);
        assert_eq!(s.app("web").unwrap(), None);
        assert_eq!(s.vm(vm.vm_id).unwrap(), None);
        s.put_app(&app).unwrap();
        s.put_vm(&vm).unwrap();
        assert_eq!(s.app("web").unwrap(), Some(app));
        assert_eq!(s.vm(vm.vm_id).unwrap(), Some(vm));
        assert_eq!(s.vm(Uuid::from_u128(8)).unwrap(), None);
    }

    #[test]
    fn tc_u14_state_apply_is_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("agent.redb")).unwrap();
        let app = DesiredApp::from_toml("name = \"web\"\nimage = \"alpine:3.23\"").unwrap();
        let failure = FailureRecord::next(None, "old", 5);
        s.put_failure("web", &failure).unwrap();

        let seq = s
            .apply(&app, Some(b"sealed"), "desired: alpine:3.23")
            .unwrap();
        assert_eq!(s.app("web").unwrap(), Some(app.clone()));
        assert_eq!(s.sealed_secrets("web").unwrap(), Some(b"sealed".to_vec()));
        assert!(
            s.failures().unwrap().is_empty(),
            "applying again is a retry"
        );
        let events = s.events(0, None).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].seq, events[0].app.as_str()), (seq, "web"));
        assert_eq!(events[0].message, "desired: alpine:3.23");

        // No secrets this time: the earlier ones go.
        let seq2 = s.apply(&app, None, "again").unwrap();
        assert_eq!(seq2, seq + 1);
        assert_eq!(s.sealed_secrets("web").unwrap(), None);

        // A failing step (here: a record that does not encode is impossible for a
        // spec, so make the write fail inside the transaction) leaves nothing behind.
        let r = s.write("test", |txn| {
            insert_bytes(txn, SECRETS, "web", b"half")?;
            Err::<(), _>(StateError::Db {
                what: "simulated".into(),
                source: redb::Error::Corrupted("simulated".into()),
            })
        });
        assert!(r.is_err());
        assert_eq!(s.sealed_secrets("web").unwrap(), None, "aborted as a whole");

        let seq3 = s.remove_app_and_secrets("web", "removed").unwrap();
        assert_eq!(seq3, seq2 + 1);
        assert_eq!(s.app("web").unwrap(), None);
        assert_eq!(s.sealed_secrets("web").unwrap(), None);
        assert_eq!(s.events(seq2, None).unwrap()[0].message, "removed");
    }

    /// Records written by a later agent (with a field this one does not know) and by an
    /// earlier one (without the fields added since, which default) decode.
    #[test]
    fn tc_u14_state_records_decode_with_unknown_and_missing_fields() {
        let app = DesiredApp::from_toml("name = \"web\"\nimage = \"alpine:3.23\"").unwrap();
        let row = VmRow {
            ip: None,
            ..vm_row(&app)
        };
        let mut v = serde_json::to_value(&row).unwrap();
        v["added_later"] = serde_json::json!({ "x": 1 });
        let obj = v.as_object_mut().unwrap();
        for optional in ["ip", "image_digest", "last_error"] {
            obj.remove(optional);
        }
        assert_eq!(serde_json::from_value::<VmRow>(v).unwrap(), row);

        let ev = Event {
            seq: 3,
            at: 4,
            app: "web".into(),
            vm_id: None,
            message: "m".into(),
        };
        let mut v = serde_json::to_value(&ev).unwrap();
        v["added_later"] = serde_json::json!(true);
        v.as_object_mut().unwrap().remove("vm_id");
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), ev);

        let f = FailureRecord::next(None, "v1", 9);
        let old = serde_json::json!({
            "version": "v1", "attempts": 1, "last_failed_at": 9, "added_later": [1]
        });
        assert_eq!(serde_json::from_value::<FailureRecord>(old).unwrap(), f);
    }

    #[test]
    fn tc_u14_state_decode_errors_name_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("agent.redb")).unwrap();
        s.write("test", |txn| insert_bytes(txn, VMS, "bad", b"{not json"))
            .unwrap();
        let e = s.vms().unwrap_err().to_string();
        assert!(e.contains("\"bad\"") && e.contains("vms"), "{e}");
    }
}
