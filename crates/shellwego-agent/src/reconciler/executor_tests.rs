//! The executor's control logic on the fake platform (`fake.rs`), on tokio's paused
//! clock: minutes of agent time run in milliseconds. What each test proves on the fake is
//! also exercised for real by `crash_real`, `bluegreen_real`, `executor_real` and the
//! other `*_real` tests.

use std::time::Duration;

use proptest::prelude::*;
use uuid::Uuid;

use super::executor::{Demand, TaskKind};
use super::fake::{Effect, Fault, Node};
use super::ports::Frontend;
use super::{Health, VmState};
use crate::spec::DesiredApp;

/// An app with a health check and a published port (so the endpoint is exercised).
fn app(name: &str, image: &str, port: u16) -> DesiredApp {
    DesiredApp::from_toml(&format!(
        "name = \"{name}\"\nimage = \"{image}\"\n\
         [[ports]]\nguest = 8080\nhost = {port}\n\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\nretries = 3\n"
    ))
    .expect("spec")
}

const MINUTE: Duration = Duration::from_secs(60);

fn serving(node: &Node, app: &str) -> Vec<Uuid> {
    node.store
        .vms()
        .expect("records")
        .into_iter()
        .filter(|v| v.app == app && v.state == VmState::Running && v.health == Health::Healthy)
        .map(|v| v.vm_id)
        .collect()
}

fn position(calls: &[String], what: &str) -> usize {
    calls
        .iter()
        .position(|c| c == what)
        .unwrap_or_else(|| panic!("no call {what:?} in {calls:?}"))
}

#[tokio::test(start_paused = true)]
async fn tc_u14_apply_converges_and_remove_leaves_nothing() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    assert_eq!(serving(&node, "web").len(), 1);
    node.remove("web");
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    assert!(node.platform.world().owners().is_empty());
    assert!(node.store.vms().expect("records").is_empty());
}

/// Every step of a first deploy and of a blue-green swap: the agent dies there, a new
/// one converges with nothing orphaned, and the endpoint leads to the desired version.
#[tokio::test(start_paused = true)]
async fn tc_u14_crash_at_every_step_converges_without_orphans() {
    const STEPS: [&str; 6] = ["pull", "rootfs", "network", "vm", "guest", "probe"];
    for swap in [false, true] {
        for step in STEPS {
            let node = Node::new();
            let mut agent = node.start().await;
            if swap {
                node.apply(&app("web", "img:1", 8001));
                agent.exec.wake.notify_one();
                agent.settle(&node, MINUTE).await;
            }
            node.platform
                .inject(Fault::at(step, "web", Effect::Crash).once());
            let target = app("web", if swap { "img:2" } else { "img:1" }, 8001);
            node.apply(&target);
            agent.exec.wake.notify_one();
            tokio::time::timeout(MINUTE, node.platform.crashed.notified())
                .await
                .unwrap_or_else(|_| panic!("never reached {step} (swap: {swap})"));
            agent.crash();
            agent = node.start().await;
            // Recovery alone removed what the interrupted step left: the host holds
            // nothing the records do not name.
            let recorded: std::collections::BTreeSet<Uuid> = node
                .store
                .vms()
                .expect("records")
                .iter()
                .map(|v| v.vm_id)
                .collect();
            let owners = node.platform.world().owners();
            assert!(
                owners.is_subset(&recorded),
                "{step}: {owners:?} vs {recorded:?}"
            );
            agent.settle(&node, 2 * MINUTE).await;
            let vms = node.store.vms().expect("records");
            assert_eq!(vms.len(), 1, "{step} (swap {swap}): {vms:?}");
            assert_eq!(vms[0].version, target.spec_hash(), "{step} (swap {swap})");
            let backend = super::ports::Frontend::backends(&*agent.exec.frontend, "web");
            assert_eq!(
                backend.iter().map(|b| b.vm_id).collect::<Vec<_>>(),
                vec![vms[0].vm_id],
                "{step}"
            );
            agent.crash();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn tc_u14_blue_green_switches_the_endpoint_before_the_old_vm_goes() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let blue = serving(&node, "web")[0];
    node.apply(&app("web", "img:2", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let green = serving(&node, "web")[0];
    assert_ne!(blue, green);
    let calls = node.platform.world().calls.clone();
    let healthy = position(&calls, "probe web");
    let switched = position(&calls, &format!("publish web {green}"));
    let drained = position(&calls, &format!("drain {blue}"));
    let removed = position(&calls, &format!("deprovision {blue}"));
    assert!(
        position(&calls, &format!("guest {green}")) < switched
            && healthy < switched
            && switched < drained
            && drained < removed,
        "order: {calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn tc_u14_a_failing_version_backs_off_while_the_old_one_serves() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let blue = serving(&node, "web")[0];
    node.platform
        .inject(Fault::at("guest", "web", Effect::Fail));
    node.apply(&app("web", "img:2", 8001));
    agent.exec.wake.notify_one();
    // Attempts at 0, +5, +10, +20, +40 s...: count pulls over ten minutes.
    let start = tokio::time::Instant::now();
    let mut attempts_at = Vec::new();
    let mut seen = 0;
    while start.elapsed() < 10 * MINUTE {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pulls = node
            .platform
            .world()
            .calls
            .iter()
            .filter(|c| *c == "pull web")
            .count();
        if pulls > seen {
            seen = pulls;
            attempts_at.push(start.elapsed().as_secs());
        }
        assert_eq!(
            serving(&node, "web"),
            vec![blue],
            "the old VM keeps serving"
        );
    }
    let gaps: Vec<u64> = attempts_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 4, "attempts at {attempts_at:?}");
    for pair in gaps.windows(2) {
        assert!(pair[1] >= pair[0], "backoff never shrinks: {gaps:?}");
    }
    assert!(gaps[0] >= 5 && *gaps.last().unwrap_or(&0) >= 40, "{gaps:?}");
    let failure = node.store.failures().expect("failures")["web"].clone();
    assert!(failure.attempts >= 4 && failure.reason.contains("injected failure at guest"));
    // Fixed: the next attempt goes through.
    node.platform.clear_faults();
    agent.settle(&node, 10 * MINUTE).await;
    assert_ne!(serving(&node, "web"), vec![blue]);
}

/// One app's registry stalls: five others come up as if it did not exist, a removal
/// completes at once, and removing the stalled app cancels its pull.
#[tokio::test(start_paused = true)]
async fn tc_u14_a_stalled_app_delays_no_other_app() {
    let node = Node::new();
    let agent = node.start().await;
    node.platform
        .inject(Fault::at("pull", "stuck", Effect::Stall));
    node.apply(&app("stuck", "img:1", 8000));
    for i in 1..=5 {
        node.platform.inject(Fault::at(
            "pull",
            &format!("app{i}"),
            Effect::Slow(Duration::from_secs(3)),
        ));
        node.apply(&app(&format!("app{i}"), "img:1", 8000 + i));
    }
    agent.exec.wake.notify_one();
    let start = tokio::time::Instant::now();
    agent
        .until("five apps serving", MINUTE, || {
            (1..=5).all(|i| serving(&node, &format!("app{i}")).len() == 1)
        })
        .await;
    // 3 s pulls, four at a time: two rounds, not six.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(
        agent
            .exec
            .busy()
            .values()
            .any(|k| *k == TaskKind::Provision),
        "the stalled provision is still running"
    );

    node.remove("app3");
    agent.exec.wake.notify_one();
    let t = tokio::time::Instant::now();
    agent
        .until("app3 removed", Duration::from_secs(5), || {
            serving(&node, "app3").is_empty()
                && !node.platform.world().vms.values().any(|v| v.app == "app3")
        })
        .await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    node.remove("stuck");
    agent.exec.wake.notify_one();
    agent.settle(&node, Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn tc_u14_provisions_are_bounded_and_served_in_arrival_order() {
    let mut node = Node::new();
    node.max_provisions = 2;
    let agent = node.start().await;
    // Applied one by one in reverse name order (passes and maps go by name), each slow
    // to pull and to hand over: a slot released early would let hand-overs pile up.
    let names: Vec<String> = (1..=6).rev().map(|i| format!("app{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        for step in ["pull", "guest"] {
            node.platform
                .inject(Fault::at(step, name, Effect::Slow(Duration::from_secs(4))));
        }
        node.apply(&app(name, "img:1", 8100 + i as u16));
        agent.exec.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.settle(&node, 5 * MINUTE).await;
    let w = node.platform.world();
    assert_eq!(w.most_running.get("pull"), Some(&2), "{:?}", w.most_running);
    assert_eq!(
        w.most_running.get("guest"),
        Some(&2),
        "{:?}",
        w.most_running
    );
    let pulls: Vec<&String> = w.calls.iter().filter(|c| c.starts_with("pull ")).collect();
    let expected: Vec<String> = names.iter().map(|n| format!("pull {n}")).collect();
    assert_eq!(
        pulls,
        expected.iter().collect::<Vec<_>>(),
        "first come, first served"
    );
}

/// A removal whose teardown keeps failing is retried with growing pauses, not in a loop,
/// and the failure of the VM it removes is counted once.
#[tokio::test(start_paused = true)]
async fn tc_u14_a_failing_teardown_is_retried_calmly_and_counted_once() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let first = serving(&node, "web")[0];
    node.platform
        .inject(Fault::at("deprovision", "web", Effect::Fail));
    if let Some(vm) = node.platform.world().vms.get_mut(&first) {
        vm.alive = false;
    }
    tokio::time::sleep(2 * MINUTE).await;
    let tries = node
        .platform
        .world()
        .calls
        .iter()
        .filter(|c| **c == format!("deprovision {first}"))
        .count();
    assert!((2..=8).contains(&tries), "{tries} teardowns in two minutes");
    node.platform.clear_faults();
    agent.settle(&node, 10 * MINUTE).await;
    let counted = node
        .store
        .events(0, Some("web"))
        .expect("events")
        .iter()
        .filter(|e| e.message.starts_with("attempt "))
        .count();
    assert_eq!(counted, 1, "one failure, counted once");
}

/// A health wait cut short by an agent restart gets its grace from when the VM started
/// running, not from when it was queued (a long pull would otherwise leave it none).
#[tokio::test(start_paused = true)]
async fn tc_u14_a_resumed_health_wait_keeps_its_grace() {
    let node = Node::new();
    let mut agent = node.start().await;
    node.platform.inject(Fault::at(
        "pull",
        "web",
        Effect::Slow(Duration::from_secs(300)),
    ));
    node.platform
        .inject(Fault::at("probe", "web", Effect::Crash).once());
    // After the restart the app answers only from its fourth probe on.
    node.platform.inject(Fault {
        times: 3,
        ..Fault::at("probe", "web", Effect::Fail)
    });
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    tokio::time::timeout(10 * MINUTE, node.platform.crashed.notified())
        .await
        .expect("reached the health wait");
    agent.crash();
    agent = node.start().await;
    agent.settle(&node, 2 * MINUTE).await;
    let events = node.store.events(0, Some("web")).expect("events");
    assert!(
        !events
            .iter()
            .any(|e| e.message.contains("health check failed")),
        "{events:?}"
    );
    assert_eq!(
        node.platform
            .world()
            .calls
            .iter()
            .filter(|c| c.starts_with("pull "))
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn tc_u14_a_stalled_step_fails_at_its_deadline_and_is_retried() {
    let node = Node::new();
    let agent = node.start().await;
    node.platform
        .inject(Fault::at("network", "web", Effect::Stall).once());
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, 10 * MINUTE).await;
    let failures = node.store.failures().expect("failures");
    assert!(failures.is_empty(), "cleared once healthy: {failures:?}");
    let events = node.store.events(0, Some("web")).expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("network: no result within its deadline")),
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn tc_u14_a_vm_that_turns_unhealthy_or_dies_is_replaced() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let first = serving(&node, "web")[0];
    node.platform
        .inject(Fault::at("probe", "web", Effect::Fail).once());
    node.platform.inject(Fault {
        times: 2,
        ..Fault::at("probe", "web", Effect::Fail)
    });
    agent
        .until("unhealthy VM replaced", 2 * MINUTE, || {
            serving(&node, "web").first().is_some_and(|v| *v != first)
        })
        .await;
    agent.settle(&node, MINUTE).await;
    let second = serving(&node, "web")[0];
    // Its process dies.
    if let Some(vm) = node.platform.world().vms.get_mut(&second) {
        vm.alive = false;
    }
    agent
        .until("dead VM replaced", MINUTE, || {
            serving(&node, "web").first().is_some_and(|v| *v != second)
        })
        .await;
    agent.settle(&node, MINUTE).await;
}

#[tokio::test(start_paused = true)]
async fn tc_u14_orphans_are_swept_at_start_and_while_running() {
    let node = Node::new();
    let orphan = Uuid::from_u128(7);
    node.platform.world().disks.insert(orphan);
    node.platform
        .world()
        .leases
        .insert(orphan, "10.0.0.99".parse().expect("ip"));
    let agent = node.start().await;
    assert!(node.platform.world().owners().is_empty(), "swept at start");
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let late = Uuid::from_u128(8);
    node.platform.world().disks.insert(late);
    agent
        .until("swept while running", 5 * MINUTE, || {
            !node.platform.world().disks.contains(&late)
        })
        .await;
    agent.settle(&node, MINUTE).await;
}

/// What a random run does to the node.
#[derive(Debug, Clone)]
enum Op {
    Apply { app: usize, image: usize },
    Remove { app: usize },
    Crash { step: usize, app: usize },
    Fail { step: usize, app: usize },
    Wait { secs: u64 },
}

const APPS: [&str; 3] = ["a", "b", "c"];
const STEPS: [&str; 7] = [
    "pull",
    "rootfs",
    "network",
    "vm",
    "guest",
    "probe",
    "deprovision",
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..APPS.len(), 0..3usize).prop_map(|(app, image)| Op::Apply { app, image }),
        1 => (0..APPS.len()).prop_map(|app| Op::Remove { app }),
        1 => (0..STEPS.len(), 0..APPS.len()).prop_map(|(step, app)| Op::Crash { step, app }),
        1 => (0..STEPS.len(), 0..APPS.len()).prop_map(|(step, app)| Op::Fail { step, app }),
        2 => (0..30u64).prop_map(|secs| Op::Wait { secs }),
    ]
}

async fn random_run(ops: Vec<Op>) {
    let node = Node::new();
    let mut agent = node.start().await;
    for op in ops {
        match op {
            Op::Apply { app: a, image } => {
                node.apply(&app(APPS[a], &format!("img:{image}"), 8200 + a as u16))
            }
            Op::Remove { app } => node.remove(APPS[app]),
            Op::Fail { step, app } => node
                .platform
                .inject(Fault::at(STEPS[step], APPS[app], Effect::Fail).once()),
            Op::Crash { step, app } => {
                node.platform
                    .inject(Fault::at(STEPS[step], APPS[app], Effect::Crash).once());
            }
            Op::Wait { secs } => tokio::time::sleep(Duration::from_secs(secs)).await,
        }
        agent.exec.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A crash fault that fired took the agent down: a new one starts.
        if tokio::time::timeout(Duration::ZERO, node.platform.crashed.notified())
            .await
            .is_ok()
        {
            agent.crash();
            agent = node.start().await;
        }
    }
    // Faults that never fired are withdrawn; then the node must converge.
    node.platform.clear_faults();
    agent.exec.wake.notify_one();
    agent.settle(&node, 30 * MINUTE).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn tc_u14_random_apply_remove_crash_fault_sequences_converge(
        ops in proptest::collection::vec(op(), 1..14)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(random_run(ops));
    }
}

fn replicated(name: &str, image: &str, port: u16, count: u32) -> DesiredApp {
    let mut spec = app(name, image, port);
    spec.count = count;
    spec
}

/// Three replicas behind one endpoint; a swap replaces all three, health-gated: the
/// endpoint moves to the new set only once all of it is healthy, and no old replica is
/// drained before that. Scaling down drains the extras; a dead replica is replaced.
#[tokio::test(start_paused = true)]
async fn tc_u15_replicas_serve_together_and_swap_all_at_once() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&replicated("web", "img:1", 8001, 3));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let blue = serving(&node, "web");
    assert_eq!(blue.len(), 3);
    let endpoint = |agent: &super::fake::Agent| -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = super::ports::Frontend::backends(&*agent.exec.frontend, "web")
            .iter()
            .map(|b| b.vm_id)
            .collect();
        ids.sort();
        ids
    };
    let mut sorted = blue.clone();
    sorted.sort();
    assert_eq!(endpoint(&agent), sorted, "all three behind the endpoint");

    // The new version: one replica is slow to become healthy.
    node.platform.inject(Fault {
        times: 1,
        ..Fault::at("guest", "web", Effect::Slow(Duration::from_secs(20)))
    });
    node.apply(&replicated("web", "img:2", 8001, 3));
    agent.exec.wake.notify_one();
    agent
        .until("two new replicas healthy", MINUTE, || {
            node.store
                .vms()
                .expect("records")
                .iter()
                .filter(|v| !blue.contains(&v.vm_id) && v.health == Health::Healthy)
                .count()
                == 2
        })
        .await;
    assert_eq!(
        endpoint(&agent),
        sorted,
        "the old set serves until all new ones do"
    );
    assert!(
        !node
            .platform
            .world()
            .calls
            .iter()
            .any(|c| c.starts_with("drain ")),
        "no old replica drained early"
    );
    agent.settle(&node, MINUTE).await;
    let green = serving(&node, "web");
    assert_eq!(green.len(), 3);
    assert!(green.iter().all(|g| !blue.contains(g)));
    let calls = node.platform.world().calls.clone();
    let switch = calls
        .iter()
        .rposition(|c| c.starts_with("publish web "))
        .expect("switched");
    for old in &blue {
        assert!(
            position(&calls, &format!("drain {old}")) > switch,
            "{calls:?}"
        );
    }

    // Scale down to one: two replicas drain and go; the endpoint keeps one.
    node.apply(&replicated("web", "img:2", 8001, 1));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let left = serving(&node, "web");
    assert_eq!(left.len(), 1);
    assert_eq!(endpoint(&agent), left);
    for gone in green.iter().filter(|g| !left.contains(g)) {
        assert!(node
            .platform
            .world()
            .calls
            .contains(&format!("drain {gone}")));
    }

    // Scale up to two; then one replica dies and is replaced.
    node.apply(&replicated("web", "img:2", 8001, 2));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let two = serving(&node, "web");
    if let Some(vm) = node.platform.world().vms.get_mut(&two[0]) {
        vm.alive = false;
    }
    agent
        .until("dead replica replaced", MINUTE, || {
            let now = serving(&node, "web");
            now.len() == 2 && !now.contains(&two[0])
        })
        .await;
    agent.settle(&node, MINUTE).await;
}

/// An endpoint that cannot be switched keeps the old VM serving: the new one runs beside
/// it, healthy, and the old one is not drained until the switch succeeds.
#[tokio::test(start_paused = true)]
async fn tc_u14_a_failed_switch_keeps_the_old_vm_serving() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let blue = serving(&node, "web")[0];
    node.platform
        .inject(Fault::at("publish", "web", Effect::Fail));
    node.apply(&app("web", "img:2", 8001));
    agent.exec.wake.notify_one();
    tokio::time::sleep(2 * MINUTE).await;
    assert_eq!(
        serving(&node, "web").len(),
        2,
        "the new VM runs beside the old"
    );
    let backends = super::ports::Frontend::backends(&*agent.exec.frontend, "web");
    assert_eq!(
        backends.iter().map(|b| b.vm_id).collect::<Vec<_>>(),
        vec![blue]
    );
    assert!(!node
        .platform
        .world()
        .calls
        .contains(&format!("drain {blue}")));
    node.platform.clear_faults();
    agent.settle(&node, MINUTE).await;
    assert_ne!(serving(&node, "web"), vec![blue]);
}

/// Removing an app while its VM is in a step that must not be cut (here the disk clone)
/// stops the provision at the next step boundary and leaves nothing behind.
#[tokio::test(start_paused = true)]
async fn tc_u14_a_removal_cancels_a_provision_at_the_next_step_boundary() {
    let node = Node::new();
    let agent = node.start().await;
    node.platform.inject(Fault::at(
        "rootfs",
        "web",
        Effect::Slow(Duration::from_secs(30)),
    ));
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent
        .until("cloning", MINUTE, || {
            node.platform
                .world()
                .calls
                .iter()
                .any(|c| c.starts_with("rootfs "))
        })
        .await;
    node.remove("web");
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let calls = node.platform.world().calls.clone();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("network ") || c.starts_with("vm ")),
        "no step after the clone ran: {calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.starts_with("deprovision ")),
        "{calls:?}"
    );
}

/// An old VM whose health wait was resumed after a restart, still undecided when its
/// successor is healthy, is retired: the retirement ends the wait once, and no new wait
/// is started for it pass after pass.
#[tokio::test(start_paused = true)]
async fn tc_u14_an_undecided_old_vm_is_retired_not_watched_again() {
    let node = Node::new();
    let mut agent = node.start().await;
    node.platform
        .inject(Fault::at("probe", "web", Effect::Crash).once());
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    tokio::time::timeout(MINUTE, node.platform.crashed.notified())
        .await
        .expect("reached the health wait");
    agent.crash();
    let blue = node.store.vms().expect("records")[0].vm_id;
    // Blue never answers again; green does.
    node.platform
        .inject(Fault::at("probe-vm", &blue.to_string(), Effect::Fail));
    node.apply(&app("web", "img:2", 8001));
    agent = node.start().await;
    agent.settle(&node, 2 * MINUTE).await;
    let waits = node
        .platform
        .world()
        .calls
        .iter()
        .filter(|c| **c == format!("probe-vm {blue}"))
        .count();
    assert!(waits < 200, "blue probed {waits} times");
}

/// An app that scales to zero after `idle` seconds without traffic, with `count` replicas.
fn sleepy(count: u32, idle: u64) -> DesiredApp {
    let mut a = app("web", "img:1", 8001);
    a.count = count;
    a.scale.idle = Some(Duration::from_secs(idle));
    a
}

fn states(node: &Node, app: &str) -> Vec<VmState> {
    node.store
        .vms()
        .expect("records")
        .into_iter()
        .filter(|v| v.app == app)
        .map(|v| v.state)
        .collect()
}

fn all_in(node: &Node, app: &str, state: VmState) -> bool {
    let s = states(node, app);
    !s.is_empty() && s.iter().all(|x| *x == state)
}

#[tokio::test(start_paused = true)]
async fn tc_u15_scale_to_zero_an_idle_app_is_suspended_and_a_waiting_connection_wakes_it() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&sleepy(2, 30));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let replicas = serving(&node, "web");
    assert_eq!(replicas.len(), 2);
    // Idle long enough: both replicas are snapshotted and their processes stop; disks,
    // leases and the endpoint stay, and the endpoint's set is empty (it holds).
    agent
        .until("both suspended", 2 * MINUTE, || {
            all_in(&node, "web", VmState::Suspended)
        })
        .await;
    {
        let w = node.platform.world();
        assert!(replicas.iter().all(|id| !w.vms.contains_key(id)));
        assert!(replicas
            .iter()
            .all(|id| w.snapshots.contains(id) && w.disks.contains(id)));
        assert!(
            w.calls.contains(&"publish web ".to_string()),
            "{:?}",
            w.calls
        );
    }
    assert!(node.converged(), "a suspended app is converged");
    // It stays suspended without traffic.
    tokio::time::sleep(5 * MINUTE).await;
    assert!(all_in(&node, "web", VmState::Suspended));
    // A connection waits: both replicas are restored (the same VMs) and serve again.
    agent.exec.frontend.set_waiting("web", 3);
    agent
        .until("both awake", MINUTE, || serving(&node, "web").len() == 2)
        .await;
    assert_eq!(serving(&node, "web"), replicas, "the same VMs woke");
    let backends: Vec<Uuid> = agent
        .exec
        .frontend
        .backends("web")
        .iter()
        .map(|b| b.vm_id)
        .collect();
    assert_eq!(backends.len(), 2);
    assert!(node.platform.world().snapshots.is_empty());
    agent.exec.frontend.set_waiting("web", 0);
    // Not suspended again before another idle period.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(serving(&node, "web").len(), 2);
    agent
        .until("suspended again", 2 * MINUTE, || {
            all_in(&node, "web", VmState::Suspended)
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn tc_u15_scale_to_zero_by_hand_and_a_suspend_called_off_by_a_connection() {
    let node = Node::new();
    let agent = node.start().await;
    // No [scale]: only by hand.
    node.apply(&app("web", "img:1", 8001));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    tokio::time::sleep(10 * MINUTE).await;
    assert_eq!(
        serving(&node, "web").len(),
        1,
        "not suspended without [scale]"
    );
    agent.exec.demand("web", Demand::Suspend);
    agent
        .until("suspended by hand", MINUTE, || {
            all_in(&node, "web", VmState::Suspended)
        })
        .await;
    agent.exec.demand("web", Demand::Wake);
    agent
        .until("woken by hand", MINUTE, || serving(&node, "web").len() == 1)
        .await;
    // A suspend that a connection interrupts (the snapshot takes a while): called off, the
    // VM resumed as it was, its snapshot gone, back behind the endpoint.
    let vm = serving(&node, "web")[0];
    node.platform
        .inject(Fault::at("suspend", "web", Effect::Slow(Duration::from_secs(10))).once());
    agent.exec.demand("web", Demand::Suspend);
    agent
        .until("suspending", MINUTE, || {
            agent.exec.busy().get(&vm) == Some(&TaskKind::Suspend)
        })
        .await;
    assert!(
        agent.exec.frontend.backends("web").is_empty(),
        "held meanwhile"
    );
    agent.exec.frontend.set_waiting("web", 1);
    agent
        .until("called off", MINUTE, || agent.exec.busy().is_empty())
        .await;
    assert_eq!(serving(&node, "web"), vec![vm]);
    assert_eq!(agent.exec.frontend.backends("web").len(), 1);
    let w = node.platform.world();
    assert!(w.snapshots.is_empty() && w.vms.get(&vm).is_some_and(|v| v.alive));
    drop(w);
    let events = node
        .store
        .events_page(0, Some("web"), 1000)
        .expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("suspend called off")),
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn tc_u15_scale_to_zero_a_restart_mid_suspend_or_mid_wake_settles_the_vm() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&sleepy(1, 30));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    // The agent dies with the snapshot written and the VM paused: the next one resumes it.
    node.platform
        .inject(Fault::at("suspend", "web", Effect::Crash).once());
    tokio::time::timeout(2 * MINUTE, node.platform.crashed.notified())
        .await
        .expect("crashed mid-suspend");
    agent.crash();
    let agent = node.start().await;
    assert!(
        all_in(&node, "web", VmState::Running),
        "{:?}",
        states(&node, "web")
    );
    assert!(node.platform.world().snapshots.is_empty());
    agent.exec.frontend.set_waiting("web", 0);
    agent
        .until("suspended", 2 * MINUTE, || {
            all_in(&node, "web", VmState::Suspended)
        })
        .await;
    // The agent dies while restoring: the snapshot is still there, so it stays suspended
    // and the next connection wakes it.
    node.platform
        .inject(Fault::at("wake", "web", Effect::Crash).once());
    agent.exec.frontend.set_waiting("web", 1);
    tokio::time::timeout(MINUTE, node.platform.crashed.notified())
        .await
        .expect("crashed mid-wake");
    agent.crash();
    let agent = node.start().await;
    assert!(
        all_in(&node, "web", VmState::Suspended),
        "{:?}",
        states(&node, "web")
    );
    agent.exec.frontend.set_waiting("web", 1);
    agent
        .until("woken", MINUTE, || serving(&node, "web").len() == 1)
        .await;
    agent.exec.frontend.set_waiting("web", 0);
    node.remove("web");
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    assert!(node.platform.world().owners().is_empty());
}

#[tokio::test(start_paused = true)]
async fn tc_u15_snapshot_start_a_healthy_version_is_snapshotted_once_and_forgotten_with_it() {
    let node = Node::new();
    let agent = node.start().await;
    let mut web = app("web", "img:1", 8001);
    web.snapshot.enabled = true;
    web.count = 2;
    node.apply(&web);
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let version = web.spec_hash();
    agent
        .until("snapshotted", MINUTE, || {
            node.platform
                .world()
                .app_snapshots
                .contains(&("web".to_string(), version.clone()))
        })
        .await;
    tokio::time::sleep(5 * MINUTE).await;
    let taken = node
        .platform
        .world()
        .calls
        .iter()
        .filter(|c| c.starts_with("app-snapshot"))
        .count();
    assert_eq!(taken, 1, "one snapshot per version, of one of its VMs");
    // Without [snapshot], none is taken.
    let mut plain = app("api", "img:1", 8002);
    plain.count = 1;
    node.apply(&plain);
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    tokio::time::sleep(MINUTE).await;
    assert_eq!(node.platform.world().app_snapshots.len(), 1);
    // The app goes: its snapshot goes with the next sweep (here: the next agent's start).
    node.remove("web");
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    agent.crash();
    let _agent = node.start().await;
    assert!(node.platform.world().app_snapshots.is_empty());
}

#[tokio::test(start_paused = true)]
async fn tc_u15_scale_to_zero_a_failed_wake_keeps_the_snapshot_and_retries_then_gives_up() {
    let node = Node::new();
    let agent = node.start().await;
    node.apply(&sleepy(1, 30));
    agent.exec.wake.notify_one();
    agent.settle(&node, MINUTE).await;
    let vm = serving(&node, "web")[0];
    agent
        .until("suspended", 2 * MINUTE, || {
            all_in(&node, "web", VmState::Suspended)
        })
        .await;
    // Two failed wakes: the snapshot stays, the third try (after backoff) wakes it.
    let mut twice = Fault::at("wake", "web", Effect::Fail);
    twice.times = 2;
    node.platform.inject(twice);
    agent.exec.frontend.set_waiting("web", 1);
    agent
        .until("woken at the third try", 2 * MINUTE, || {
            serving(&node, "web") == vec![vm]
        })
        .await;
    agent.exec.frontend.set_waiting("web", 0);
    agent
        .until("suspended again", 2 * MINUTE, || {
            all_in(&node, "web", VmState::Suspended)
        })
        .await;
    // A wake that always fails: given up after 4 tries, and a fresh VM replaces it.
    node.platform.inject(Fault::at("wake", "web", Effect::Fail));
    agent.exec.frontend.set_waiting("web", 1);
    agent
        .until("replaced", 5 * MINUTE, || {
            let s = serving(&node, "web");
            s.len() == 1 && s[0] != vm
        })
        .await;
    let wakes = node
        .platform
        .world()
        .calls
        .iter()
        .filter(|c| *c == &format!("wake {vm}"))
        .count();
    assert_eq!(wakes, 3 + 4, "3 for the first wake, 4 before giving up");
    node.platform.clear_faults();
    agent.exec.frontend.set_waiting("web", 0);
}
