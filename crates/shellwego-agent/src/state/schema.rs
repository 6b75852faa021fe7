//! The database's schema version, and the migrations that bring an older database
//! forward.
//!
//! Version 1 is the layout of the releases before versioning: the tables `apps`, `vms`,
//! `failures`, `events` and `secrets`, and no `meta` table. Version 2 adds `meta`, which
//! holds `schema_version`. A field added to a stored record needs no new version (records
//! decode leniently, see `crate::spec::DesiredApp::spec_hash` for the rule); a new
//! version is for what old code would misread: a changed key, a moved table, a record
//! whose meaning changed. Each such change adds a step to `migrate` and a fixture written by
//! the release before it (`tests/fixtures`).

use std::path::Path;

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use tracing::info;

use super::{Context, StateError, APPS, EVENTS, FAILURES, SECRETS, VMS};

/// The schema version this agent writes.
pub const SCHEMA_VERSION: u64 = 2;

/// What a database without a `meta` table is: the releases before versioning.
const UNVERSIONED: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION_KEY: &str = "schema_version";

/// Brings the database to `SCHEMA_VERSION` inside `txn` (the caller commits it, so a
/// crash leaves the old version or the new one, never a half-migrated database). A
/// database of a newer version is refused; the caller then aborts `txn`, leaving it as
/// it was.
pub(super) fn migrate(txn: &WriteTransaction, path: &Path) -> Result<(), StateError> {
    let fresh = txn.list_tables().ctx("list tables")?.next().is_none();
    let found = if fresh {
        SCHEMA_VERSION
    } else {
        let meta = txn.open_table(META).ctx("open table meta")?;
        let version = meta.get(VERSION_KEY).ctx("read the schema version")?;
        version.map_or(UNVERSIONED, |v| v.value())
    };
    if found > SCHEMA_VERSION {
        return Err(StateError::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    // 1 -> 2: the version record alone (written below); version 1's records read as
    // they are. A later version adds its step here, as `if found < 3 { ... }`, each step
    // written against the tables as the version before it left them.
    // Every version's tables exist from here on, so readers can open them unchecked.
    txn.open_table(APPS).ctx("open table apps")?;
    txn.open_table(VMS).ctx("open table vms")?;
    txn.open_table(FAILURES).ctx("open table failures")?;
    txn.open_table(EVENTS).ctx("open table events")?;
    txn.open_table(SECRETS).ctx("open table secrets")?;
    txn.open_table(META)
        .ctx("open table meta")?
        .insert(VERSION_KEY, SCHEMA_VERSION)
        .ctx("record the schema version")?;
    if found < SCHEMA_VERSION {
        info!(
            database = %path.display(),
            from = found,
            to = SCHEMA_VERSION,
            "agent database migrated"
        );
    }
    Ok(())
}

/// The version recorded in the database.
pub(super) fn version(txn: &ReadTransaction) -> Result<u64, StateError> {
    let meta = txn.open_table(META).ctx("open table meta")?;
    let version = meta.get(VERSION_KEY).ctx("read the schema version")?;
    Ok(version.map_or(UNVERSIONED, |v| v.value()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use redb::{Database, ReadableDatabase};
    use serde_json::Value;

    use super::super::{Event, Store, VmRow};
    use super::*;
    use crate::reconciler::FailureRecord;
    use crate::vault::Vault;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/agent-db-v1.redb"
    );
    const RECORD: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/agent-db-v1.json"
    );

    fn fixture_copy(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("agent.redb");
        std::fs::copy(FIXTURE, &path).unwrap();
        path
    }

    fn record() -> Value {
        serde_json::from_str(&std::fs::read_to_string(RECORD).unwrap()).unwrap()
    }

    fn from<T: serde::de::DeserializeOwned>(v: &Value) -> T {
        serde_json::from_value(v.clone()).unwrap()
    }

    #[test]
    fn tc_u14_state_migrates_release_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let path = fixture_copy(dir.path());
        let record = record();
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_read().unwrap();
            assert!(txn.open_table(META).is_err(), "the fixture predates meta");
        }

        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);

        // Every app decodes and keeps its version: nothing is redeployed.
        let apps = s.desired().unwrap().apps;
        let expected = record["apps"].as_object().unwrap();
        assert_eq!(apps.len(), expected.len());
        for (name, want) in expected {
            let app = &apps[name];
            assert_eq!(
                app.spec_hash(),
                want["spec_hash"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(
                serde_json::to_value(app).unwrap(),
                want["stored"],
                "{name} reads back as the release stored it"
            );
            assert_eq!(s.app(name).unwrap().as_ref(), Some(app));
        }

        let vms: Vec<VmRow> = from(&record["vms"]);
        assert_eq!(s.vms().unwrap(), vms);
        for vm in &vms {
            assert_eq!(s.vm(vm.vm_id).unwrap().as_ref(), Some(vm));
        }
        let failures: BTreeMap<String, FailureRecord> = from(&record["failures"]);
        assert_eq!(s.failures().unwrap(), failures);
        let events: Vec<Event> = from(&record["events"]);
        assert_eq!(s.events(0, None).unwrap(), events);

        // The sealed secrets open with the key they were sealed with.
        let key = hex::decode(record["vault_key_hex"].as_str().unwrap()).unwrap();
        let key_file = dir.path().join("secrets.key");
        std::fs::write(&key_file, key).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let vault = Vault::open_or_create(&key_file).unwrap();
        let want: BTreeMap<String, BTreeMap<String, String>> = from(&record["secrets"]);
        for (app, values) in want {
            let sealed = s.sealed_secrets(&app).unwrap().unwrap();
            assert_eq!(vault.open(&app, &sealed).unwrap(), values);
        }

        // New events continue the sequence; reopening finds the current version.
        let last = events.last().unwrap().seq;
        assert_eq!(s.event("web", None, "after the upgrade").unwrap(), last + 1);
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.events(last, None).unwrap().len(), 1);
    }

    #[test]
    fn tc_u14_state_fresh_database_is_current() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("agent.redb")).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn tc_u14_state_refuses_newer_schema_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = fixture_copy(dir.path());
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(VERSION_KEY, SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let e = Store::open(&path).err().unwrap();
        assert!(matches!(e, StateError::NewerSchema { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
                && msg.contains(&format!("up to {SCHEMA_VERSION}")),
            "{msg}"
        );
        // Still the newer version, and nothing of this version's was written.
        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(version(&txn).unwrap(), SCHEMA_VERSION + 1);
    }
}
