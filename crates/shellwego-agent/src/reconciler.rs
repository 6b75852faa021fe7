//! Reconciliation: compare the desired state with what runs and plan the actions that
//! close the gap.
//!
//! `plan` is pure and deterministic: the same desired and actual state always give the
//! same actions in the same order, whatever the order of the VM records. The executor
//! (which carries the actions out and records each step) is separate, so the planning
//! rules can be tested exhaustively without VMs.
//!
//! The rules, per app:
//! - a VM of an app nobody wants is removed;
//! - a VM that exited, or whose health check gave up, is removed; if it ran the desired
//!   version, that counts as a failed attempt of that version;
//! - with fewer live VMs of the desired version than the app's `count` (replicas): one
//!   `Create` (no other VM of the app runs) or `Replace` (an older version runs: the new
//!   VM starts beside it) per missing VM — unless the desired version failed recently,
//!   in which case nothing is started until its backoff ends;
//! - once all `count` VMs of the desired version run and are healthy, each older VM is
//!   `Retire`d (the endpoint moves to the new VMs, then the old one drains and is
//!   removed). An old VM is never touched before all its successors are healthy.
//! - more live VMs of the desired version than `count`: the extras are retired (serving
//!   ones drain) or removed.
//! - scale to zero: once all `count` VMs of the desired version serve and nothing else
//!   runs, they are `Suspend`ed when the endpoint has been idle for the app's
//!   `[scale] idle` (or by hand); a suspended VM counts as kept (nothing is started in
//!   its place) and is woken (`Wake`) when a connection waits for it or by hand.

pub mod executor;
#[cfg(test)]
mod executor_tests;
#[cfg(test)]
mod fake;
pub mod ports;
pub mod steps;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::DesiredApp;

/// What the user wants to run, by app name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub apps: BTreeMap<String, DesiredApp>,
}

impl DesiredState {
    /// The version label of an app's desired spec.
    pub fn version_of(&self, app: &str) -> Option<String> {
        self.apps.get(app).map(DesiredApp::spec_hash)
    }
}

/// Lifecycle of one VM as the agent observes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// Being created or booting; not yet serving.
    Starting,
    /// Its firecracker process runs.
    Running,
    /// Its firecracker process is gone (crashed, killed or the guest rebooted).
    Exited,
    /// Snapshotted and stopped on purpose (scale to zero): its disk, network and
    /// snapshot are kept, and a wake restores it as it was.
    Suspended,
}

/// What the host-side health check last concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Not yet decided (still within its grace period).
    Unknown,
    Healthy,
    /// Gave up: failed `retries` times in a row, or never passed within its grace period.
    Unhealthy,
}

/// One VM the agent knows of. Identified by `vm_id`; `app` and `version` are labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub vm_id: Uuid,
    pub app: String,
    pub version: String,
    pub state: VmState,
    pub health: Health,
}

impl VmRecord {
    fn is_dead(&self) -> bool {
        self.state == VmState::Exited || self.health == Health::Unhealthy
    }

    fn is_serving(&self) -> bool {
        self.state == VmState::Running && self.health == Health::Healthy
    }

    fn is_suspended(&self) -> bool {
        self.state == VmState::Suspended
    }
}

/// Failed attempts of an app's version, for backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub version: String,
    pub attempts: u32,
    /// Seconds since the Unix epoch of the last failure.
    pub last_failed_at: u64,
    /// Why the last attempt failed (for `apply` and `ps`).
    #[serde(default)]
    pub reason: String,
    /// Provisions of `version` in a row that an agent restart interrupted. A provision
    /// that keeps taking the agent down with it counts as a failure from the second one
    /// on, so a hostile image cannot hold the agent in a crash loop.
    #[serde(default)]
    pub interrupted: u32,
}

/// Interrupted provisions of one version in a row that count as a failure.
pub const MAX_INTERRUPTED: u32 = 2;

impl FailureRecord {
    /// The record after one more failure of `version` at `now`.
    pub fn next(previous: Option<&FailureRecord>, version: &str, now: u64) -> FailureRecord {
        let attempts = match previous {
            Some(p) if p.version == version => p.attempts.saturating_add(1),
            _ => 1,
        };
        FailureRecord {
            version: version.to_string(),
            attempts,
            last_failed_at: now,
            reason: String::new(),
            interrupted: 0,
        }
    }

    /// The record after a provision of `version` was interrupted by an agent restart at
    /// `step`: counted, and a failure (with backoff) once it happened `MAX_INTERRUPTED`
    /// times in a row.
    pub fn interrupted(
        previous: Option<&FailureRecord>,
        version: &str,
        step: &str,
        now: u64,
    ) -> FailureRecord {
        let same = previous.filter(|p| p.version == version);
        let interrupted = same.map_or(0, |p| p.interrupted).saturating_add(1);
        if interrupted >= MAX_INTERRUPTED {
            let mut f = FailureRecord::next(previous, version, now);
            f.interrupted = interrupted;
            f.reason = format!(
                "the provision was interrupted by an agent restart {interrupted} times in a row (last at step {step}); backing off"
            );
            return f;
        }
        FailureRecord {
            version: version.to_string(),
            attempts: same.map_or(0, |p| p.attempts),
            last_failed_at: same.map_or(0, |p| p.last_failed_at),
            reason: same.map(|p| p.reason.clone()).unwrap_or_default(),
            interrupted,
        }
    }

    /// When the next attempt may start (seconds since the epoch).
    pub fn retry_at(&self) -> u64 {
        self.last_failed_at
            .saturating_add(backoff(self.attempts).as_secs())
    }
}

/// First retry delay; it doubles with each failure up to `MAX_BACKOFF`.
pub const BASE_BACKOFF: Duration = Duration::from_secs(5);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Delay before retrying after `attempts` consecutive failures.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    BASE_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

/// What runs, as observed, plus the failure history the backoff rule needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualState {
    /// Seconds since the Unix epoch at which this state was observed.
    pub now: u64,
    pub vms: Vec<VmRecord>,
    /// The last failure per app.
    pub failures: BTreeMap<String, FailureRecord>,
    /// What each app's endpoint saw (scale to zero); an app missing here had none.
    #[serde(default)]
    pub activity: BTreeMap<String, Activity>,
}

/// Traffic of an app's endpoint and requests to suspend or wake it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// How long no connection has been open (zero while one is).
    pub idle: Duration,
    /// Connections held because the app is suspended: they want it awake.
    pub waiting: usize,
    /// Suspend now (`shellwego suspend`), whatever the idle time.
    pub suspend: bool,
    /// Wake now (`shellwego wake`).
    pub wake: bool,
}

/// Why a VM is to be removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoveReason {
    /// Its app is no longer desired.
    NotDesired,
    /// It exited or became unhealthy. `counts_as_failure` is set when it ran the desired
    /// version: the executor then records a failed attempt (for backoff).
    Failed { counts_as_failure: bool },
    /// Another live VM of the same version already serves the app.
    Duplicate,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Start the first VM of an app.
    Create { app: String, version: String },
    /// Start a VM of a new version beside the running `old_vm` (blue-green).
    Replace {
        app: String,
        version: String,
        old_vm: Uuid,
    },
    /// The successor is healthy: point the app's endpoint at it, drain `vm_id`, remove it.
    Retire {
        app: String,
        vm_id: Uuid,
        successor: Uuid,
    },
    /// Stop the VM (if it runs) and remove everything it owns.
    Remove {
        app: String,
        vm_id: Uuid,
        reason: RemoveReason,
    },
    /// Snapshot the serving VM and stop it, keeping its disk and network (scale to zero).
    Suspend { app: String, vm_id: Uuid },
    /// Restore the suspended VM from its snapshot.
    Wake { app: String, vm_id: Uuid },
}

/// The actions that move `actual` towards `desired`. Pure and deterministic.
pub fn plan(desired: &DesiredState, actual: &ActualState) -> Vec<Action> {
    let mut by_app: BTreeMap<&str, Vec<&VmRecord>> = BTreeMap::new();
    for vm in &actual.vms {
        by_app.entry(vm.app.as_str()).or_default().push(vm);
    }
    for vms in by_app.values_mut() {
        vms.sort_by_key(|v| v.vm_id);
    }

    let mut actions = Vec::new();
    // Apps nobody wants: remove every VM.
    for (app, vms) in &by_app {
        if desired.apps.contains_key(*app) {
            continue;
        }
        actions.extend(vms.iter().map(|vm| Action::Remove {
            app: vm.app.clone(),
            vm_id: vm.vm_id,
            reason: RemoveReason::NotDesired,
        }));
    }
    for (name, app) in &desired.apps {
        let vms = by_app.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        plan_app(app, vms, actual, &mut actions);
    }
    actions
}

fn plan_app(spec: &DesiredApp, vms: &[&VmRecord], actual: &ActualState, actions: &mut Vec<Action>) {
    let (app, version) = (spec.name.as_str(), spec.spec_hash());
    let version = version.as_str();
    let count = spec.count.max(1) as usize;
    let remove = |vm: &VmRecord, reason: RemoveReason| Action::Remove {
        app: app.to_string(),
        vm_id: vm.vm_id,
        reason,
    };
    // Dead VMs of any version go first.
    for vm in vms.iter().filter(|v| v.is_dead()) {
        let counts_as_failure = vm.version == version;
        actions.push(remove(vm, RemoveReason::Failed { counts_as_failure }));
    }
    let live: Vec<&VmRecord> = vms.iter().copied().filter(|v| !v.is_dead()).collect();
    let (mut current, old): (Vec<&VmRecord>, Vec<&VmRecord>) =
        live.into_iter().partition(|v| v.version == version);

    // Keep `count` VMs of the desired version, serving ones first (then by id, the order
    // the endpoint uses too: see `serving_set`).
    current.sort_by_key(|v| (!v.is_serving(), v.vm_id));
    let (keep, extra) = current.split_at(current.len().min(count));
    let successor = keep.iter().find(|v| v.is_serving());
    for vm in extra {
        // A serving extra (the app was scaled down) drains like a retired VM.
        match successor {
            Some(s) if vm.is_serving() => actions.push(Action::Retire {
                app: app.to_string(),
                vm_id: vm.vm_id,
                successor: s.vm_id,
            }),
            _ => actions.push(remove(vm, RemoveReason::Duplicate)),
        }
    }

    let missing = count - keep.len();
    if missing > 0 {
        let failed_now = vms.iter().any(|v| v.is_dead() && v.version == version);
        let backing_off = failed_now
            || actual
                .failures
                .get(app)
                .is_some_and(|f| f.version == version && actual.now < f.retry_at());
        if !backing_off {
            let old_vm = old.iter().find(|v| v.is_serving()).or_else(|| old.first());
            for _ in 0..missing {
                actions.push(match old_vm {
                    Some(old_vm) => Action::Replace {
                        app: app.to_string(),
                        version: version.to_string(),
                        old_vm: old_vm.vm_id,
                    },
                    None => Action::Create {
                        app: app.to_string(),
                        version: version.to_string(),
                    },
                });
            }
        }
    }
    // Old versions go once all `count` VMs of the new one serve (health-gated swap);
    // until then they keep serving.
    let serving = keep.iter().filter(|v| v.is_serving()).count();
    if serving == count {
        if let Some(s) = successor {
            actions.extend(old.iter().map(|vm| Action::Retire {
                app: app.to_string(),
                vm_id: vm.vm_id,
                successor: s.vm_id,
            }));
        }
    }
    scale_to_zero(spec, keep, &old, actual.activity.get(app), actions);
}

/// Suspends an idle app's VMs, or wakes them for a waiting connection: suspending only
/// a complete, settled set (all `count` VMs of the desired version serving or already
/// suspended, nothing old, nothing missing), waking every suspended VM that serves.
fn scale_to_zero(
    spec: &DesiredApp,
    keep: &[&VmRecord],
    old: &[&VmRecord],
    activity: Option<&Activity>,
    actions: &mut Vec<Action>,
) {
    let activity = activity.copied().unwrap_or_default();
    let app = spec.name.as_str();
    let wake_wanted = activity.waiting > 0 || activity.wake;
    let idle_long = spec.scale.idle.is_some_and(|idle| activity.idle >= idle);
    let sleepy = idle_long || activity.suspend;
    // All or nothing: part of the app up while nothing asks it to sleep (a suspend called
    // off for one replica, a replica added while suspended) wakes the rest. A suspended
    // VM of the desired version beside an older one (a rollback to the suspended version)
    // wakes too: the swap needs it serving.
    let part_up = keep.iter().any(|v| !v.is_suspended()) && !sleepy;
    let wake = |v: &&&VmRecord| v.is_suspended() && (wake_wanted || !old.is_empty() || part_up);
    let woken: Vec<Action> = keep
        .iter()
        .filter(wake)
        .chain(old.iter().filter(|v| v.is_suspended() && wake_wanted))
        .map(|v| Action::Wake {
            app: app.to_string(),
            vm_id: v.vm_id,
        })
        .collect();
    if wake_wanted || !woken.is_empty() {
        actions.extend(woken);
        return;
    }
    let settled = old.is_empty()
        && keep.len() == spec.count.max(1) as usize
        && keep.iter().all(|v| v.is_serving() || v.is_suspended());
    if sleepy && settled {
        actions.extend(
            keep.iter()
                .filter(|v| v.is_serving())
                .map(|v| Action::Suspend {
                    app: app.to_string(),
                    vm_id: v.vm_id,
                }),
        );
    }
}

/// The VMs an app's endpoint should lead to, from `(vm_id, version, serving)` of its VMs:
/// the desired version's serving VMs (at most `count`, lowest ids first: those the plan
/// keeps) once all `count` serve or no older version serves; otherwise the older
/// version's serving VMs, which keep the endpoint until the swap is complete.
pub fn serving_set(version: &str, count: u32, vms: &[(Uuid, &str, bool)]) -> Vec<Uuid> {
    let count = count.max(1) as usize;
    let mut current: Vec<Uuid> = vms
        .iter()
        .filter(|(_, v, serving)| *serving && *v == version)
        .map(|(id, _, _)| *id)
        .collect();
    current.sort();
    current.truncate(count);
    let mut old: Vec<Uuid> = vms
        .iter()
        .filter(|(_, v, serving)| *serving && *v != version)
        .map(|(id, _, _)| *id)
        .collect();
    old.sort();
    if current.len() == count || old.is_empty() {
        current
    } else {
        old
    }
}

/// True when every desired app has exactly `count` serving (or suspended) VMs of its
/// version and nothing else runs.
pub fn is_converged(desired: &DesiredState, actual: &ActualState) -> bool {
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for vm in &actual.vms {
        let Some(version) = desired.version_of(&vm.app) else {
            return false;
        };
        if vm.version != version || !(vm.is_serving() || vm.is_suspended()) {
            return false;
        }
        *seen.entry(vm.app.as_str()).or_insert(0) += 1;
    }
    desired
        .apps
        .iter()
        .all(|(name, app)| seen.get(name.as_str()) == Some(&app.count.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::ResourceSpec;
    use crate::spec::{Bandwidth, RunOverride};
    use proptest::prelude::*;

    fn app(name: &str, image: &str) -> DesiredApp {
        DesiredApp {
            name: name.into(),
            image: image.into(),
            run: RunOverride::default(),
            resources: ResourceSpec::default(),
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            ports: vec![],
            health: None,
            bandwidth: Bandwidth::default(),
            network: Default::default(),
            count: 1,
            scale: Default::default(),
            snapshot: Default::default(),
            secrets_version: None,
        }
    }

    fn desired(apps: &[(&str, &str)]) -> DesiredState {
        DesiredState {
            apps: apps
                .iter()
                .map(|(n, i)| (n.to_string(), app(n, i)))
                .collect(),
        }
    }

    fn vm(id: u128, app: &str, version: &str, state: VmState, health: Health) -> VmRecord {
        VmRecord {
            vm_id: Uuid::from_u128(id),
            app: app.into(),
            version: version.into(),
            state,
            health,
        }
    }

    #[test]
    fn tc_u2_absent_app_plans_create() {
        let d = desired(&[("web", "alpine:3.23")]);
        let a = ActualState::default();
        let version = d.version_of("web").unwrap();
        assert_eq!(
            plan(&d, &a),
            vec![Action::Create {
                app: "web".into(),
                version
            }]
        );
    }

    #[test]
    fn tc_u2_changed_image_plans_replace_then_retire() {
        let d = desired(&[("web", "alpine:3.23")]);
        let v2 = d.version_of("web").unwrap();
        let mut a = ActualState {
            vms: vec![vm(1, "web", "v1", VmState::Running, Health::Healthy)],
            ..Default::default()
        };
        assert_eq!(
            plan(&d, &a),
            vec![Action::Replace {
                app: "web".into(),
                version: v2.clone(),
                old_vm: Uuid::from_u128(1)
            }]
        );
        a.vms
            .push(vm(2, "web", &v2, VmState::Starting, Health::Unknown));
        assert_eq!(
            plan(&d, &a),
            vec![],
            "old VM must keep serving while new starts"
        );
        a.vms[1].state = VmState::Running;
        a.vms[1].health = Health::Healthy;
        assert_eq!(
            plan(&d, &a),
            vec![Action::Retire {
                app: "web".into(),
                vm_id: Uuid::from_u128(1),
                successor: Uuid::from_u128(2)
            }]
        );
    }

    #[test]
    fn tc_u2_failed_new_version_backs_off_and_old_keeps_running() {
        let d = desired(&[("web", "alpine:3.23")]);
        let v2 = d.version_of("web").unwrap();
        let mut a = ActualState {
            now: 1000,
            vms: vec![
                vm(1, "web", "v1", VmState::Running, Health::Healthy),
                vm(2, "web", &v2, VmState::Running, Health::Unhealthy),
            ],
            failures: BTreeMap::new(),
            activity: BTreeMap::new(),
        };
        // The failed VM is removed, nothing new is started in the same breath.
        assert_eq!(
            plan(&d, &a),
            vec![Action::Remove {
                app: "web".into(),
                vm_id: Uuid::from_u128(2),
                reason: RemoveReason::Failed {
                    counts_as_failure: true
                }
            }]
        );
        a.vms.pop();
        a.failures
            .insert("web".into(), FailureRecord::next(None, &v2, 1000));
        a.now = 1000 + BASE_BACKOFF.as_secs() - 1;
        assert_eq!(plan(&d, &a), vec![]);
        a.now = 1000 + BASE_BACKOFF.as_secs();
        assert!(matches!(plan(&d, &a).as_slice(), [Action::Replace { .. }]));
    }

    #[test]
    fn interrupted_provisions_count_as_a_failure_from_the_second_in_a_row() {
        let first = FailureRecord::interrupted(None, "v1", "after-pull", 100);
        assert_eq!((first.attempts, first.interrupted), (0, 1));
        assert!(
            first.retry_at() <= 100,
            "the first interruption does not back off"
        );
        let second = FailureRecord::interrupted(Some(&first), "v1", "after-pull", 200);
        assert_eq!((second.attempts, second.interrupted), (1, 2));
        assert!(second.retry_at() > 200, "the second does");
        assert!(second.reason.contains("2 times"), "{}", second.reason);
        let other = FailureRecord::interrupted(Some(&second), "v2", "after-pull", 300);
        assert_eq!(
            (other.attempts, other.interrupted),
            (0, 1),
            "a new version starts over"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(100), MAX_BACKOFF);
        let f1 = FailureRecord::next(None, "v", 10);
        let f2 = FailureRecord::next(Some(&f1), "v", 20);
        assert_eq!(f2.attempts, 2);
        assert_eq!(FailureRecord::next(Some(&f2), "w", 30).attempts, 1);
    }

    // ---- property tests -------------------------------------------------------------

    const APPS: [&str; 5] = ["a", "b", "c", "d", "e"];
    const IMAGES: [&str; 3] = ["img:1", "img:2", "img:3"];

    fn arb_desired() -> impl Strategy<Value = DesiredState> {
        let spec = (0usize..IMAGES.len(), 1u32..4);
        proptest::collection::btree_map(0usize..4, spec, 0..4).prop_map(|m| DesiredState {
            apps: m
                .into_iter()
                .map(|(a, (i, count))| {
                    let mut spec = app(APPS[a], IMAGES[i]);
                    spec.count = count;
                    (APPS[a].to_string(), spec)
                })
                .collect(),
        })
    }

    fn arb_state() -> impl Strategy<Value = VmState> {
        prop_oneof![
            Just(VmState::Starting),
            Just(VmState::Running),
            Just(VmState::Exited),
            Just(VmState::Suspended)
        ]
    }

    fn arb_health() -> impl Strategy<Value = Health> {
        prop_oneof![
            Just(Health::Unknown),
            Just(Health::Healthy),
            Just(Health::Unhealthy)
        ]
    }

    /// VMs of any app (also undesired ones), any version (also current ones).
    fn arb_actual() -> impl Strategy<Value = ActualState> {
        let one = (
            0usize..APPS.len(),
            0usize..IMAGES.len() + 1,
            arb_state(),
            arb_health(),
        );
        (proptest::collection::vec(one, 0..8), 0u64..10_000).prop_map(|(vms, now)| ActualState {
            now,
            vms: vms
                .into_iter()
                .enumerate()
                .map(|(i, (a, img, state, health))| {
                    let version = match IMAGES.get(img) {
                        Some(image) => app(APPS[a], image).spec_hash(),
                        None => "stale".to_string(),
                    };
                    vm(i as u128 + 1, APPS[a], &version, state, health)
                })
                .collect(),
            failures: BTreeMap::new(),
            activity: BTreeMap::new(),
        })
    }

    /// Carries out actions the way a successful executor would.
    fn execute(actual: &mut ActualState, actions: &[Action], next_id: &mut u128) {
        for action in actions {
            match action {
                Action::Create { app, version } | Action::Replace { app, version, .. } => {
                    *next_id += 1;
                    actual.vms.push(vm(
                        *next_id,
                        app,
                        version,
                        VmState::Starting,
                        Health::Unknown,
                    ));
                }
                Action::Retire { vm_id, .. } => actual.vms.retain(|v| v.vm_id != *vm_id),
                Action::Remove { app, vm_id, reason } => {
                    if let Some(gone) = actual.vms.iter().find(|v| v.vm_id == *vm_id) {
                        if *reason
                            == (RemoveReason::Failed {
                                counts_as_failure: true,
                            })
                        {
                            let f = FailureRecord::next(
                                actual.failures.get(app),
                                &gone.version,
                                actual.now,
                            );
                            actual.failures.insert(app.clone(), f);
                        }
                    }
                    actual.vms.retain(|v| v.vm_id != *vm_id);
                }
                Action::Suspend { vm_id, .. } | Action::Wake { vm_id, .. } => {
                    if let Some(v) = actual.vms.iter_mut().find(|v| v.vm_id == *vm_id) {
                        v.state = if matches!(action, Action::Suspend { .. }) {
                            VmState::Suspended
                        } else {
                            VmState::Running
                        };
                    }
                }
            }
        }
    }

    /// Time passes: starting VMs boot and pass their health checks.
    fn tick(actual: &mut ActualState) {
        actual.now += MAX_BACKOFF.as_secs();
        for v in actual
            .vms
            .iter_mut()
            .filter(|v| !v.is_dead() && !v.is_suspended())
        {
            v.state = VmState::Running;
            v.health = Health::Healthy;
        }
    }

    fn converged_actual(d: &DesiredState) -> ActualState {
        ActualState {
            now: 0,
            vms: d
                .apps
                .iter()
                .enumerate()
                .flat_map(|(i, (n, a))| {
                    (0..a.count).map(move |r| {
                        vm(
                            (i as u128 + 1) * 100 + u128::from(r),
                            n,
                            &a.spec_hash(),
                            VmState::Running,
                            Health::Healthy,
                        )
                    })
                })
                .collect(),
            failures: BTreeMap::new(),
            activity: BTreeMap::new(),
        }
    }

    fn touches(action: &Action, id: Uuid) -> bool {
        match action {
            Action::Retire { vm_id, .. }
            | Action::Remove { vm_id, .. }
            | Action::Suspend { vm_id, .. }
            | Action::Wake { vm_id, .. } => *vm_id == id,
            Action::Create { .. } | Action::Replace { .. } => false,
        }
    }

    fn idle_app(idle_secs: u64, count: u32) -> (DesiredState, String) {
        let mut d = desired(&[("web", "img:1")]);
        let web = d.apps.get_mut("web").unwrap();
        web.count = count;
        web.scale.idle = Some(Duration::from_secs(idle_secs));
        let v = d.version_of("web").unwrap();
        (d, v)
    }

    fn with_activity(vms: Vec<VmRecord>, activity: Activity) -> ActualState {
        ActualState {
            vms,
            activity: BTreeMap::from([("web".to_string(), activity)]),
            ..Default::default()
        }
    }

    #[test]
    fn tc_u15_scale_to_zero_suspends_a_settled_idle_app_only() {
        let (d, v) = idle_app(60, 2);
        let serving = |id| vm(id, "web", &v, VmState::Running, Health::Healthy);
        let quiet = |secs| Activity {
            idle: Duration::from_secs(secs),
            ..Activity::default()
        };
        let both = vec![serving(1), serving(2)];
        // Not idle long enough: nothing.
        assert_eq!(plan(&d, &with_activity(both.clone(), quiet(59))), vec![]);
        // Idle long enough: both replicas.
        let actions = plan(&d, &with_activity(both.clone(), quiet(60)));
        assert_eq!(
            actions,
            vec![
                Action::Suspend {
                    app: "web".into(),
                    vm_id: Uuid::from_u128(1)
                },
                Action::Suspend {
                    app: "web".into(),
                    vm_id: Uuid::from_u128(2)
                },
            ]
        );
        // A replica still missing, or an old version beside it: not settled, no suspend.
        let one = plan(&d, &with_activity(vec![serving(1)], quiet(600)));
        assert!(
            !one.iter().any(|a| matches!(a, Action::Suspend { .. })),
            "{one:?}"
        );
        let mut mixed = both.clone();
        mixed.push(vm(3, "web", "old", VmState::Running, Health::Healthy));
        let mixed = plan(&d, &with_activity(mixed, quiet(600)));
        assert!(
            !mixed.iter().any(|a| matches!(a, Action::Suspend { .. })),
            "{mixed:?}"
        );
        // Off by default; a hand-made suspend works without it.
        let mut off = d.clone();
        off.apps.get_mut("web").unwrap().scale.idle = None;
        assert_eq!(
            plan(&off, &with_activity(both.clone(), quiet(1 << 20))),
            vec![]
        );
        let by_hand = Activity {
            suspend: true,
            ..Activity::default()
        };
        assert_eq!(plan(&off, &with_activity(both, by_hand)).len(), 2);
    }

    #[test]
    fn tc_u15_scale_to_zero_is_all_or_nothing() {
        let (d, v) = idle_app(60, 2);
        let up = vm(1, "web", &v, VmState::Running, Health::Healthy);
        let down = vm(2, "web", &v, VmState::Suspended, Health::Healthy);
        let busy = Activity::default();
        // Half up and nothing asks it to sleep: the rest wakes.
        assert_eq!(
            plan(&d, &with_activity(vec![up.clone(), down.clone()], busy)),
            vec![Action::Wake {
                app: "web".into(),
                vm_id: Uuid::from_u128(2)
            }]
        );
        // Half up and idle (or asked by hand): the rest is suspended.
        let idle = Activity {
            idle: Duration::from_secs(60),
            ..busy
        };
        let by_hand = Activity {
            suspend: true,
            ..busy
        };
        for a in [idle, by_hand] {
            assert_eq!(
                plan(&d, &with_activity(vec![up.clone(), down.clone()], a)),
                vec![Action::Suspend {
                    app: "web".into(),
                    vm_id: Uuid::from_u128(1)
                }]
            );
        }
    }

    #[test]
    fn tc_u15_scale_to_zero_keeps_suspended_vms_and_wakes_them_for_a_waiting_connection() {
        let (d, v) = idle_app(60, 2);
        let asleep = |id| vm(id, "web", &v, VmState::Suspended, Health::Healthy);
        let idle = Activity {
            idle: Duration::from_secs(3600),
            ..Activity::default()
        };
        // Suspended replicas are kept: nothing is started in their place.
        let vms = vec![asleep(1), asleep(2)];
        assert_eq!(plan(&d, &with_activity(vms.clone(), idle)), vec![]);
        assert!(is_converged(&d, &with_activity(vms.clone(), idle)));
        // A waiting connection (or `wake`) wakes every one of them.
        for activity in [
            Activity { waiting: 3, ..idle },
            Activity { wake: true, ..idle },
        ] {
            assert_eq!(
                plan(&d, &with_activity(vms.clone(), activity)),
                vec![
                    Action::Wake {
                        app: "web".into(),
                        vm_id: Uuid::from_u128(1)
                    },
                    Action::Wake {
                        app: "web".into(),
                        vm_id: Uuid::from_u128(2)
                    },
                ]
            );
        }
        // A new version starts beside suspended old VMs, and retires them once healthy.
        let mut d2 = d.clone();
        d2.apps.get_mut("web").unwrap().image = "img:2".into();
        let v2 = d2.version_of("web").unwrap();
        let creates = plan(&d2, &with_activity(vms.clone(), idle));
        assert_eq!(creates.len(), 2);
        assert!(
            creates.iter().all(|a| matches!(a, Action::Replace { .. })),
            "{creates:?}"
        );
        let mut swapped = vms;
        swapped.push(vm(10, "web", &v2, VmState::Running, Health::Healthy));
        swapped.push(vm(11, "web", &v2, VmState::Running, Health::Healthy));
        let retire = plan(&d2, &with_activity(swapped, Activity::default()));
        assert_eq!(
            retire
                .iter()
                .filter(|a| matches!(a, Action::Retire { .. }))
                .count(),
            2,
            "{retire:?}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn tc_u2_converged_state_plans_nothing(d in arb_desired()) {
            let a = converged_actual(&d);
            prop_assert!(is_converged(&d, &a));
            prop_assert_eq!(plan(&d, &a), vec![]);
        }

        #[test]
        fn tc_u2_carrying_out_plans_converges(d in arb_desired(), mut a in arb_actual()) {
            let mut next_id = 1000;
            for _ in 0..6 {
                let actions = plan(&d, &a);
                execute(&mut a, &actions, &mut next_id);
                tick(&mut a);
            }
            prop_assert!(is_converged(&d, &a), "not converged: {:?}", a.vms);
            prop_assert_eq!(plan(&d, &a), vec![]);
        }

        #[test]
        fn tc_u15_replicas_scale_to_count_and_swap_health_gated(
            count in 1u32..5, running in 0u32..6, healthy_new in 0u32..5
        ) {
            let mut d = desired(&[("web", "img:2")]);
            d.apps.get_mut("web").unwrap().count = count;
            let v2 = d.version_of("web").unwrap();
            // `running` old VMs serving, `healthy_new` of the new version serving.
            let mut vms: Vec<VmRecord> = (0..running)
                .map(|i| vm(u128::from(i) + 1, "web", "v1", VmState::Running, Health::Healthy))
                .collect();
            vms.extend((0..healthy_new).map(|i| {
                vm(u128::from(i) + 100, "web", &v2, VmState::Running, Health::Healthy)
            }));
            let a = ActualState { vms, ..Default::default() };
            let actions = plan(&d, &a);
            let creates = actions.iter().filter(|x| matches!(x, Action::Create { .. } | Action::Replace { .. })).count();
            prop_assert_eq!(creates as u32, count.saturating_sub(healthy_new));
            let old_touched = actions.iter().any(|x| (1..=u128::from(running)).any(|i| touches(x, Uuid::from_u128(i))));
            prop_assert_eq!(old_touched, running > 0 && healthy_new >= count, "{:?}", actions);
            let extras = actions.iter().filter(|x| matches!(x, Action::Retire { vm_id, .. } if vm_id.as_u128() >= 100)).count();
            prop_assert_eq!(extras as u32, healthy_new.saturating_sub(count));
            let set = serving_set(
                &v2,
                count,
                &a.vms.iter().map(|v| (v.vm_id, v.version.as_str(), v.is_serving())).collect::<Vec<_>>(),
            );
            if healthy_new >= count || running == 0 {
                prop_assert_eq!(set.len() as u32, healthy_new.min(count));
                prop_assert!(set.iter().all(|id| id.as_u128() >= 100));
            } else {
                prop_assert_eq!(set.len() as u32, running, "the old version keeps the endpoint");
            }
        }

        #[test]
        fn tc_u2_unwanted_vms_are_removed(d in arb_desired(), a in arb_actual()) {
            let actions = plan(&d, &a);
            for v in a.vms.iter().filter(|v| !d.apps.contains_key(&v.app)) {
                prop_assert!(
                    actions.contains(&Action::Remove {
                        app: v.app.clone(), vm_id: v.vm_id, reason: RemoveReason::NotDesired
                    }),
                    "VM {} of undesired app {} not removed", v.vm_id, v.app
                );
            }
        }

        #[test]
        fn tc_u2_old_vm_stays_until_successor_healthy(d in arb_desired(), a in arb_actual()) {
            let actions = plan(&d, &a);
            for (name, spec) in &d.apps {
                let version = spec.spec_hash();
                let successors_serving = a.vms.iter().filter(|v| {
                    v.app == *name && v.version == version && v.is_serving()
                }).count();
                if successors_serving >= spec.count as usize {
                    continue;
                }
                for old in a.vms.iter().filter(|v| v.app == *name && v.version != version && !v.is_dead()) {
                    prop_assert!(
                        !actions.iter().any(|x| touches(x, old.vm_id)),
                        "live old VM {} touched before its successor is healthy: {:?}", old.vm_id, actions
                    );
                }
            }
        }

        #[test]
        fn tc_u2_failing_version_backs_off(attempts in 1u32..12, elapsed in 0u64..400) {
            let d = desired(&[("web", "img:2")]);
            let v2 = d.version_of("web").unwrap();
            let failed = FailureRecord { version: v2, attempts, last_failed_at: 10_000, reason: String::new(), interrupted: 0 };
            let a = ActualState {
                now: 10_000 + elapsed,
                vms: vec![vm(1, "web", "v1", VmState::Running, Health::Healthy)],
                failures: [("web".to_string(), failed)].into_iter().collect(),
                ..Default::default()
            };
            let actions = plan(&d, &a);
            prop_assert!(!actions.iter().any(|x| touches(x, Uuid::from_u128(1))));
            if elapsed < backoff(attempts).as_secs() {
                prop_assert_eq!(actions, vec![]);
            } else {
                let replace = matches!(actions.as_slice(), [Action::Replace { .. }]);
                prop_assert!(replace, "{:?}", actions);
            }
        }

        #[test]
        fn tc_u2_plan_is_deterministic(d in arb_desired(), a in arb_actual()) {
            let mut reversed = a.clone();
            reversed.vms.reverse();
            prop_assert_eq!(plan(&d, &a), plan(&d, &a));
            prop_assert_eq!(plan(&d, &a), plan(&d, &reversed));
        }
    }
}
