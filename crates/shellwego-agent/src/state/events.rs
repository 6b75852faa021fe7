//! The event log: appended by every step the agent takes, read by `apply` (to follow its
//! progress) and `events`. It is bounded, by count and by age, so an agent that runs for
//! months, or an app that crash-loops, does not grow the database without end; and it is
//! read a page at a time, so a reader never loads the whole log.
//!
//! Events are keyed by a sequence number that only grows; pruning removes the oldest
//! ones only and always keeps the newest, so a reader's `since` cursor stays meaningful
//! and numbers are never reused.

use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use serde::Deserialize;
use uuid::Uuid;

use super::{decode, encode, now_secs, Context, Event, StateError, Store, EVENTS};

/// Events kept at most by default.
pub const DEFAULT_MAX_EVENTS: u64 = 10_000;
/// Age in seconds beyond which events are pruned by default (7 days).
pub const DEFAULT_MAX_EVENT_AGE_SECS: u64 = 7 * 24 * 3600;
/// Appends between two prunes: pruning looks at the log's ends only, but not doing it
/// on every append keeps an append one insert. The log may exceed its count by this
/// many events less one.
const PRUNE_EVERY: u64 = 100;

/// How much of the event log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRetention {
    /// Events kept at most (at least 1 is always kept).
    pub max_events: u64,
    /// Events older than this many seconds are removed.
    pub max_age_secs: u64,
}

impl Default for EventRetention {
    fn default() -> Self {
        EventRetention {
            max_events: DEFAULT_MAX_EVENTS,
            max_age_secs: DEFAULT_MAX_EVENT_AGE_SECS,
        }
    }
}

/// An event's time alone, so pruning does not decode messages.
#[derive(Deserialize)]
struct At {
    at: u64,
}

/// An event's app alone, so a filtered page does not decode other apps' messages.
#[derive(Deserialize)]
struct OfApp<'a> {
    #[serde(borrow)]
    app: std::borrow::Cow<'a, str>,
}

/// Appends an event in `txn` and returns its sequence number; every `PRUNE_EVERY`th
/// append also prunes the log.
pub(super) fn append(
    txn: &WriteTransaction,
    retention: &EventRetention,
    at: u64,
    app: &str,
    vm_id: Option<Uuid>,
    message: &str,
) -> Result<u64, StateError> {
    let what = "append an event";
    let mut t = txn.open_table(EVENTS).ctx(what)?;
    let last = t.last().ctx(what)?.map(|(k, _)| k.value());
    let seq = last.map_or(1, |l| l.saturating_add(1));
    let ev = Event {
        seq,
        at,
        app: app.to_string(),
        vm_id,
        message: message.to_string(),
    };
    let bytes = encode(&EVENTS, &seq.to_string(), &ev)?;
    t.insert(seq, bytes.as_slice()).ctx(what)?;
    if seq % PRUNE_EVERY == 0 {
        prune(&mut t, retention, at)?;
    }
    Ok(seq)
}

/// Removes the oldest events beyond `max_events`, then those older than `max_age_secs`
/// at `now`, never the newest one. Returns how many were removed.
fn prune(
    t: &mut Table<u64, &[u8]>,
    retention: &EventRetention,
    now: u64,
) -> Result<u64, StateError> {
    let what = "prune events";
    let (Some(first), Some(last)) = (
        t.first().ctx(what)?.map(|(k, _)| k.value()),
        t.last().ctx(what)?.map(|(k, _)| k.value()),
    ) else {
        return Ok(0);
    };
    let len = t.len().ctx(what)?;
    let keep = retention.max_events.max(1);
    // Sequence numbers grow and only the oldest are removed, so the oldest `len - keep`
    // keys are the first ones.
    let mut over = len.saturating_sub(keep);
    let cutoff = now.saturating_sub(retention.max_age_secs);
    for item in t.range(first..last).ctx(what)?.skip(over as usize) {
        let (k, v) = item.ctx(what)?;
        let At { at } = decode(&EVENTS, &k.value().to_string(), v.value())?;
        if at >= cutoff {
            break;
        }
        over += 1;
    }
    for _ in 0..over {
        t.pop_first().ctx(what)?;
    }
    Ok(over)
}

impl Store {
    /// Appends an event; returns its sequence number.
    pub fn event(
        &self,
        app: &str,
        vm_id: Option<Uuid>,
        message: impl Into<String>,
    ) -> Result<u64, StateError> {
        self.event_at(now_secs(), app, vm_id, &message.into())
    }

    fn event_at(
        &self,
        at: u64,
        app: &str,
        vm_id: Option<Uuid>,
        message: &str,
    ) -> Result<u64, StateError> {
        self.write("append an event", |txn| {
            append(txn, &self.retention, at, app, vm_id, message)
        })
    }

    /// Prunes the event log now (appends also do, every `PRUNE_EVERY`th time): keeps at
    /// most `max_events` events and none older than `max_age_secs` at `now` (seconds
    /// since the epoch), but always the newest. Returns how many were removed.
    pub fn prune_events(&self, now: u64) -> Result<u64, StateError> {
        self.write("prune events", |txn| {
            let mut t = txn.open_table(EVENTS).ctx("prune events")?;
            prune(&mut t, &self.retention, now)
        })
    }

    /// At most `limit` events after `since`, oldest first, optionally of one app. Reads
    /// the log from `since` on only until the page is full.
    pub fn events_page(
        &self,
        since: u64,
        app: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, StateError> {
        let what = "read events";
        self.read(what, |txn| {
            let t = txn.open_table(EVENTS).ctx(what)?;
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            for item in t.range(since.saturating_add(1)..).ctx(what)? {
                let (k, v) = item.ctx(what)?;
                let key = k.value().to_string();
                if let Some(app) = app {
                    let of: OfApp = decode(&EVENTS, &key, v.value())?;
                    if of.app != app {
                        continue;
                    }
                }
                out.push(decode(&EVENTS, &key, v.value())?);
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Every event after `since`, oldest first, optionally of one app (the whole rest of
    /// the log: prefer `events_page`).
    pub fn events(&self, since: u64, app: Option<&str>) -> Result<Vec<Event>, StateError> {
        self.events_page(since, app, usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path, max_events: u64, max_age_secs: u64) -> Store {
        Store::open(&dir.join("agent.redb"))
            .unwrap()
            .with_event_retention(EventRetention {
                max_events,
                max_age_secs,
            })
    }

    fn seqs(s: &Store) -> Vec<u64> {
        s.events(0, None).unwrap().iter().map(|e| e.seq).collect()
    }

    #[test]
    fn tc_u14_state_prunes_events_by_count_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 5, 100);
        for i in 0..8u64 {
            s.event_at(1000 + i, "web", None, &format!("e{i}")).unwrap();
        }
        // By count: the oldest three go.
        assert_eq!(s.prune_events(1000).unwrap(), 3);
        assert_eq!(seqs(&s), [4, 5, 6, 7, 8]);
        // By age: at 1105, events before 1005 (seq 4 and 5 at 1003, 1004) go.
        assert_eq!(s.prune_events(1105).unwrap(), 2);
        assert_eq!(seqs(&s), [6, 7, 8]);
        // Everything is old: the newest stays, so numbers are never reused.
        assert_eq!(s.prune_events(10_000).unwrap(), 2);
        assert_eq!(seqs(&s), [8]);
        assert_eq!(s.event_at(10_000, "web", None, "next").unwrap(), 9);
        assert_eq!(
            s.prune_events(10_000).unwrap(),
            1,
            "8 is old and no longer the newest"
        );
        assert_eq!(seqs(&s), [9]);
    }

    #[test]
    fn tc_u14_state_appends_prune_as_they_go() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 10, DEFAULT_MAX_EVENT_AGE_SECS);
        for i in 0..PRUNE_EVERY * 3 {
            s.event_at(1000, "web", None, &format!("e{i}")).unwrap();
        }
        // Pruned at the last append (a multiple of PRUNE_EVERY) to the newest 10.
        let kept = seqs(&s);
        assert_eq!(kept.len(), 10);
        assert_eq!(kept.last(), Some(&(PRUNE_EVERY * 3)));
        // Between prunes it grows by less than PRUNE_EVERY.
        for _ in 0..PRUNE_EVERY - 1 {
            s.event_at(1000, "web", None, "more").unwrap();
        }
        assert_eq!(seqs(&s).len() as u64, 10 + PRUNE_EVERY - 1);
    }

    #[test]
    fn tc_u14_state_events_come_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1000, DEFAULT_MAX_EVENT_AGE_SECS);
        for i in 1..=20u64 {
            let app = if i % 4 == 0 { "db" } else { "web" };
            s.event_at(1000, app, None, &format!("e{i}")).unwrap();
        }
        let page = s.events_page(0, None, 7).unwrap();
        assert_eq!(
            page.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7]
        );
        let next = s.events_page(7, None, 7).unwrap();
        assert_eq!(next.first().map(|e| e.seq), Some(8));
        let db = s.events_page(0, Some("db"), 3).unwrap();
        assert_eq!(db.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 8, 12]);
        let rest = s.events_page(12, Some("db"), 100).unwrap();
        assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), [16, 20]);
        assert!(s.events_page(0, None, 0).unwrap().is_empty());
        assert!(s.events_page(20, None, 10).unwrap().is_empty());
        assert!(s.events_page(u64::MAX, None, 10).unwrap().is_empty());
        assert_eq!(s.events(0, Some("web")).unwrap().len(), 15);
    }
}
