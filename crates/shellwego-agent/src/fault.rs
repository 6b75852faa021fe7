//! Fault injection for the crash-safety tests: with `SHELLWEGO_FAULT_STALL_AT=<point>` in
//! its environment the agent stops its reconciler when it reaches that point (it records
//! an event saying so, keeps serving the API, and waits forever), so a test can `kill -9`
//! it at a precise step of a deploy or a swap. Unset (always, in production) it costs one
//! comparison per point.
//!
//! Points: `after-pull`, `after-clone`, `after-vm-start`, `health-wait`, `after-switch`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Set once a point stalled: the reconciler then launches nothing more, so the kill that
/// follows lands on exactly that step (tasks of other VMs would otherwise go on).
static STALLED: AtomicBool = AtomicBool::new(false);

/// Whether a fault point has stalled this agent.
pub fn stalled() -> bool {
    STALLED.load(Ordering::Relaxed)
}

/// Every point the agent can stall at, in the order a deploy reaches them.
pub const POINTS: [&str; 5] = [
    "after-pull",
    "after-clone",
    "after-vm-start",
    "health-wait",
    "after-switch",
];

fn configured() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| {
        std::env::var("SHELLWEGO_FAULT_STALL_AT")
            .ok()
            .filter(|p| !p.is_empty())
    })
    .as_deref()
}

/// Never returns when the agent was told to stall at `point`; `record` is told first.
pub async fn point(point: &str, record: impl FnOnce(String)) {
    if configured() == Some(point) {
        STALLED.store(true, Ordering::Relaxed);
        record(format!("stalled at {point} (SHELLWEGO_FAULT_STALL_AT)"));
        std::future::pending::<()>().await;
    }
}

/// Refuses an unknown point name at start, so a typo cannot make a test wait forever.
pub fn check_configured() -> Result<(), String> {
    match configured() {
        Some(p) if !POINTS.contains(&p) => Err(format!(
            "SHELLWEGO_FAULT_STALL_AT={p:?} is not one of {POINTS:?}"
        )),
        _ => Ok(()),
    }
}
