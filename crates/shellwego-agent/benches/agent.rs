//! Agent-level figures with real VMs (root, /dev/kvm; many minutes on nested hosts):
//!
//! - the TC-E2E-1 gauntlet N times per combination of image cache (cold: fresh layer
//!   store and no base dataset; warm: both there) and boot (warm start from a template;
//!   cold boot), with the median of each phase;
//! - blue-green swaps behind the app's endpoint under a request loop: apply -> new VM
//!   healthy, new healthy -> old removed, failed requests (target 0), slowest answer;
//! - the agent's resident memory idle and with 10 VMs, and the time to bring 10 up;
//! - 1, 3 and 5 apps applied together, each until healthy: one VM built at a time
//!   (`max_provisions = 1`; health waits still overlap, so the old executor, which
//!   also waited for each health check in turn, was slower still) against the default,
//!   and the ratio;
//! - starts of the counter app's VM, apply -> healthy: cold boot, generic template, the
//!   image's template (N each);
//! - scale to zero with the in-memory counter app: apply -> answering (a start from the
//!   generic template), then 20 rounds of `suspend` (time, memory freed) and a request
//!   that wakes the VM (time to the answer, median and max), and replicas 1 -> 5
//!   (apply -> all five healthy); then the same app with `[snapshot] enabled`: replicas
//!   restored from its app snapshot, 1 -> 2 and 2 -> 5.
//!
//! `cargo bench -p shellwego-agent --bench agent`; `SWG_BENCH_RUNS` (default 3) sets N,
//! `SWG_BENCH_ONLY=gauntlet|swap|ten|together|starts|wake` runs one part.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/gauntlet.rs"]
mod gauntlet;

use std::time::{Duration, Instant};

use common::{rss_kib, Prober, Stack};
use shellwego_agent::host;
use shellwego_agent::provision::BootMode;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn runs() -> usize {
    std::env::var("SWG_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn gauntlet_bench() {
    let kind = host::detect().expect("host kind");
    let rig = gauntlet::Rig::new();
    let app = gauntlet::app(&rig.registry.addr);
    let (firecracker, data) = (rig.firecracker.clone(), rig.data.clone());
    let (pool_name, addr) = (rig.pool.name.clone(), rig.registry.addr.clone());
    let n = runs();
    println!("gauntlet x{n} on {}", kind.describe());
    rig.ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let platform = gauntlet::platform(&firecracker, &pool_name, &addr, &data).await;
            // The template is built once per shape, outside the figures.
            let t = Instant::now();
            gauntlet::run(&platform, &app, BootMode::Warm).await;
            println!("  template build + first warm start: {:.1}s", t.elapsed().as_secs_f64());
            for mode in [BootMode::Warm, BootMode::Cold] {
                for cache in ["cold", "warm"] {
                    // Phase name -> durations, in the order the gauntlet runs them.
                    let mut phases: Vec<(&'static str, Vec<f64>)> = Vec::new();
                    let mut totals = Vec::new();
                    for _ in 0..n {
                        if cache == "cold" {
                            for image in platform.images.list().expect("images") {
                                platform.images.remove(&image.digest).expect("forget image");
                            }
                            // Through the manager: it unmounts first and retries a busy
                            // dataset (a bare `zfs destroy -r -f` left the base in place
                            // on zfs-fuse, so "cache cold" runs reused it).
                            let bases = format!("{pool_name}/shellwego/images");
                            platform.rootfs.zfs().destroy(&bases).expect("destroy bases");
                        }
                        let (p, total) = gauntlet::run(&platform, &app, mode).await;
                        for phase in p {
                            let took = phase.took.as_secs_f64();
                            match phases.iter_mut().find(|(n, _)| *n == phase.name) {
                                Some((_, v)) => v.push(took),
                                None => phases.push((phase.name, vec![took])),
                            }
                        }
                        totals.push(total.as_secs_f64());
                    }
                    let parts: Vec<String> = phases
                        .into_iter()
                        .map(|(k, v)| format!("{k} {:.2}s", median(v)))
                        .collect();
                    println!(
                        "  {mode:?} boot, image cache {cache}: median total {:.2}s (min {:.2}, max {:.2}) | {}",
                        median(totals.clone()),
                        totals.iter().copied().fold(f64::INFINITY, f64::min),
                        totals.iter().copied().fold(0.0, f64::max),
                        parts.join(", ")
                    );
                }
            }
        })
    });
}

fn web_spec(name: &str, image: &str, port: u16) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{image}\"\n[resources]\nmemory = \"128Mi\"\n\
         [[ports]]\nguest = 8080\nhost = {port}\n\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n"
    )
}

fn swap_bench() {
    let mut stack = Stack::new();
    let images = [stack.push_web("1", b"v1\n"), stack.push_web("2", b"v2\n")];
    stack.start_agent(&[]);
    let specs: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, img)| stack.spec(&format!("v{i}.toml"), &web_spec("shop", img, 18090)))
        .collect();
    stack.run(&["apply", "-f", specs[0].to_str().expect("path")]);
    let n = runs();
    let (mut healthy, mut swapped) = (Vec::new(), Vec::new());
    let prober = Prober::start(&stack.ns, 18090);
    for i in 1..=n {
        let old = Stack::vms(&stack.ps(), "shop")[0]["vm_id"].clone();
        let t = Instant::now();
        stack.run(&["apply", "-f", specs[i % 2].to_str().expect("path")]);
        healthy.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        loop {
            let vms = Stack::vms(&stack.ps(), "shop");
            if vms.len() == 1 && vms[0]["vm_id"] != old {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "old VM never removed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        swapped.push(t.elapsed().as_secs_f64());
    }
    let tally = prober.finish();
    println!(
        "swap x{n}: apply -> new VM healthy median {:.1}s; new healthy -> old removed median {:.2}s \
         (max {:.2}s); {} requests, {} failed, slowest answer {:.2}s",
        median(healthy),
        median(swapped.clone()),
        swapped.iter().copied().fold(0.0, f64::max),
        tally.ok + tally.failed.len(),
        tally.failed.len(),
        tally.slowest.as_secs_f64()
    );
    stack.run(&["rm", "shop"]);
    stack.wait_ps("removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
}

fn ten_bench() {
    let want: usize = std::env::var("SWG_BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut stack = Stack::new();
    let image = stack.push_web("1", b"many\n");
    stack.start_agent(&[]);
    std::thread::sleep(Duration::from_secs(3));
    let pid = stack.agent_pid().expect("agent pid");
    println!("agent RSS idle: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);
    // Idle apps without a health check: on emulated hosts every probe of a forking web
    // server costs the guest real CPU, and many of them would measure that, not the agent.
    let t = Instant::now();
    for i in 0..want {
        let spec = stack.spec(
            &format!("app{i}.toml"),
            &format!(
                "name = \"app{i}\"\nimage = \"{image}\"\n[run]\ncmd = [\"/bin/sleep\", \"86400\"]\n\
                 [resources]\nmemory = \"128Mi\"\n"
            ),
        );
        stack.run(&["apply", "-f", spec.to_str().expect("path"), "--detach"]);
    }
    // Reports each step up; stops at `want` or when the host cannot start more in time.
    let deadline = Instant::now() + Duration::from_secs(1500);
    let mut reached = 0;
    while reached < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(5));
        let running = stack.ps().as_array().map_or(0, |apps| {
            apps.iter().filter(|a| a["healthy"] == true).count()
        });
        if running > reached {
            reached = running;
            let vm_rss: u64 = shellwego_testkit::process::vm_pids(&stack.run)
                .into_iter()
                .map(|p| rss_kib(p as u32))
                .sum();
            let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            println!(
                "  {reached} VMs running after {:.0}s: agent RSS {:.1} MiB, firecracker processes \
                 {:.0} MiB together, load {}",
                t.elapsed().as_secs_f64(),
                rss_kib(pid) as f64 / 1024.0,
                vm_rss as f64 / 1024.0,
                load.split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    if reached < want {
        println!("  only {reached} of {want} VMs started within 1500 s on this host");
    }
    stack.kill_agent();
}

/// Seconds from applying `n` apps together to all of them healthy, with the agent's
/// `SHELLWEGO_MAX_PROVISIONS` set to `max` (None: the default).
fn bring_up(stack: &mut Stack, image: &str, n: usize, max: Option<usize>) -> f64 {
    let max = max.map(|m| m.to_string());
    let extra: Vec<(&str, &str)> = max
        .iter()
        .map(|m| ("SHELLWEGO_MAX_PROVISIONS", m.as_str()))
        .collect();
    stack.start_agent(&extra);
    let specs: Vec<_> = (0..n)
        .map(|i| {
            stack.spec(
                &format!("t{i}.toml"),
                &format!(
                    "name = \"t{i}\"\nimage = \"{image}\"\n[resources]\nmemory = \"128Mi\"\n\
                     [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n"
                ),
            )
        })
        .collect();
    let t = Instant::now();
    for f in &specs {
        stack.run(&["apply", "-f", f.to_str().expect("path"), "--detach"]);
    }
    stack.wait_ps("all healthy", Duration::from_secs(1200), |ps| {
        ps.as_array()
            .is_some_and(|apps| apps.len() == n && apps.iter().all(|a| a["healthy"] == true))
    });
    let took = t.elapsed().as_secs_f64();
    for i in 0..n {
        stack.run(&["rm", &format!("t{i}")]);
    }
    stack.wait_ps("removed", Duration::from_secs(300), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
    stack.kill_agent();
    took
}

fn together_bench() {
    let mut stack = Stack::new();
    let image = stack.push_web("1", b"together\n");
    // The image and the template are made once, outside the figures.
    bring_up(&mut stack, &image, 1, None);
    let default = shellwego_agent::reconciler::executor::default_max_provisions();
    println!("apps applied together until all are healthy (default max_provisions = {default}):");
    for n in [1, 3, 5] {
        let serial = bring_up(&mut stack, &image, n, Some(1));
        let concurrent = bring_up(&mut stack, &image, n, None);
        println!(
            "  {n} apps: one at a time {serial:.1}s, concurrent {concurrent:.1}s, ratio {:.2}",
            serial / concurrent
        );
    }
}

fn counter_spec(image: &str, port: u16, count: u32) -> String {
    format!(
        "name = \"counter\"\nimage = \"{image}\"\ncount = {count}\n\
         [run]\ncmd = [\"/usr/local/bin/swg-counter\"]\n[resources]\nmemory = \"128Mi\"\n\
         [[ports]]\nguest = 8080\nhost = {port}\n\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\n"
    )
}

/// Seconds from `apply` of `count` replicas until that many are healthy.
fn scale_to(stack: &Stack, spec: &std::path::Path, count: usize) -> f64 {
    let t = Instant::now();
    stack.run(&["apply", "-f", spec.to_str().expect("path")]);
    stack.wait_ps("replicas healthy", Duration::from_secs(600), |ps| {
        Stack::vms(ps, "counter")
            .iter()
            .filter(|v| v["state"] == "Running" && v["health"] == "Healthy")
            .count()
            == count
    });
    t.elapsed().as_secs_f64()
}

/// `apply` -> healthy of the counter app's one VM, by how it starts: cold boot, the
/// generic template (image templates off), the image's template. What the first start
/// caches (base disk, templates) is made before the figures; each run removes the app.
fn starts_bench() {
    const PORT: u16 = 18099;
    let n = runs();
    let ways: [(&str, &[(&str, &str)]); 3] = [
        ("cold boot", &[("SHELLWEGO_BOOT", "cold")]),
        ("generic template", &[("SHELLWEGO_IMAGE_TEMPLATES", "0")]),
        ("image template", &[]),
    ];
    for (way, env) in ways {
        let mut stack = Stack::new();
        let image = stack.push_web_with("counter", b"-", &shellwego_testkit::oci::counter_layer());
        stack.start_agent(env);
        let spec = stack.spec("one.toml", &counter_spec(&image, PORT, 1));
        let mut times = Vec::new();
        for run in 0..=n {
            let took = scale_to(&stack, &spec, 1);
            if run > 0 {
                times.push(took);
            }
            stack.run(&["rm", "counter"]);
            stack.wait_ps("removed", Duration::from_secs(120), |ps| {
                ps.as_array().is_some_and(Vec::is_empty)
            });
        }
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "start -> healthy, {way}: median {:.1}s, max {max:.1}s (x{n})",
            median(times)
        );
    }
}

/// New replicas restored from the app snapshot (`[snapshot] enabled`): 1 -> 2 and 2 -> 5.
fn snapshot_bench() {
    const PORT: u16 = 18098;
    let mut stack = Stack::new();
    let image = stack.push_web_with("counter", b"-", &shellwego_testkit::oci::counter_layer());
    stack.start_agent(&[]);
    let spec = |n: u32| {
        let text = format!(
            "{}[snapshot]\nenabled = true\n",
            counter_spec(&image, PORT, n)
        );
        stack.spec(&format!("snap{n}.toml"), &text)
    };
    scale_to(&stack, &spec(1), 1);
    stack.wait_event(0, "app snapshot of version", Duration::from_secs(120));
    let one = scale_to(&stack, &spec(2), 2);
    let three = scale_to(&stack, &spec(5), 5);
    println!(
        "app snapshot starts: a replica (1 -> 2) apply -> healthy {one:.1}s; 2 -> 5 {three:.1}s"
    );
    stack.run(&["rm", "counter"]);
    stack.wait_ps("removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
}

fn wake_bench() {
    const PORT: u16 = 18096;
    const WAKES: usize = 20;
    let mut stack = Stack::new();
    let image = stack.push_web_with("counter", b"-", &shellwego_testkit::oci::counter_layer());
    stack.start_agent(&[]);
    let get = |stack: &Stack| {
        let t = Instant::now();
        let body = common::http_get_path_in(&stack.ns, PORT, "/count").expect("GET /count");
        (
            t.elapsed().as_secs_f64(),
            body.trim().parse::<u64>().expect("a count"),
        )
    };
    let one = stack.spec("one.toml", &counter_spec(&image, PORT, 1));
    // The image, its base disk and the template are made once, outside the figures.
    stack.run(&["apply", "-f", one.to_str().expect("path")]);
    stack.run(&["rm", "counter"]);
    stack.wait_ps("removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
    let t = Instant::now();
    stack.run(&["apply", "-f", one.to_str().expect("path")]);
    let mut n = 0;
    while common::http_get_path_in(&stack.ns, PORT, "/count").is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    n += 1;
    let start = t.elapsed().as_secs_f64();
    let (mut suspends, mut wakes, mut freed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..WAKES {
        let since = stack.last_seq();
        let t = Instant::now();
        stack.run(&["suspend", "counter"]);
        suspends.push(t.elapsed().as_secs_f64());
        let event = stack.wait_event(since, "suspended in", Duration::from_secs(10));
        let mib = event["message"]
            .as_str()
            .and_then(|m| m.split('(').nth(1))
            .and_then(|m| m.split_whitespace().next())
            .and_then(|m| m.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        freed.push(mib);
        let (took, count) = get(&stack);
        n += 1;
        assert_eq!(count, n, "the counter continues");
        wakes.push(took);
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "scale to zero ({} VM, 128 MiB, counter app): apply -> answering {start:.1}s (image template); \
         suspend x{WAKES} median {:.2}s max {:.2}s, memory freed median {:.0} MiB (the VM process's \
         resident set); wake -> answer x{WAKES} median {:.2}s max {:.2}s",
        1,
        median(suspends.clone()),
        max(&suspends),
        median(freed),
        median(wakes.clone()),
        max(&wakes)
    );
    let five = stack.spec("five.toml", &counter_spec(&image, PORT, 5));
    let t = Instant::now();
    stack.run(&["apply", "-f", five.to_str().expect("path")]);
    stack.wait_ps("five healthy", Duration::from_secs(600), |ps| {
        Stack::vms(ps, "counter")
            .iter()
            .filter(|v| v["state"] == "Running" && v["health"] == "Healthy")
            .count()
            == 5
    });
    println!(
        "replicas 1 -> 5: apply -> all five healthy {:.1}s",
        t.elapsed().as_secs_f64()
    );
    stack.run(&["rm", "counter"]);
    stack.wait_ps("removed", Duration::from_secs(120), |ps| {
        ps.as_array().is_some_and(Vec::is_empty)
    });
}

fn main() {
    let only = std::env::var("SWG_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "starts" {
        starts_bench();
    }
    if only.is_empty() || only == "wake" {
        wake_bench();
        snapshot_bench();
    }
    if only.is_empty() || only == "together" {
        together_bench();
    }
    if only.is_empty() || only == "gauntlet" {
        gauntlet_bench();
    }
    if only.is_empty() || only == "swap" {
        swap_bench();
    }
    if only.is_empty() || only == "ten" {
        ten_bench();
    }
}
