//! The network fence, attacked from inside real guests (`shellwego exec`) and from the
//! host side, on one real agent with one template shared by every check:
//!
//! - three apps: `fence-a` (allowed `10.77.0.10:7000`), `fence-b` (the default policy:
//!   the internet, nothing private) and `fence-c` (`egress = "none"`);
//! - the agent runs in the test's namespace (the "host"), with its API also on TCP and a
//!   listener of the test's own on port 9000; it is killed and started again midway (the
//!   fences are re-applied to the running VMs and still hold);
//! - "beyond the host" is a second namespace of the test, behind a veth: on its loopback
//!   it holds one public address (203.0.113.10, "the internet") and private ones
//!   (RFC 1918, CGNAT, link-local), each with the test's listeners. It has no route back
//!   to the VM subnet, so whatever a guest reaches there went through the host's NAT.
//!
//! Every blocked probe has a twin that is answered (same listener, other source), so a
//! probe can pass only by the fence deciding. The guest image is Alpine (busybox `nc`
//! with `-u`/`-s`, `arping`, `ip`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::Stack;
use shellwego_testkit::listen::Listener;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::prereq::require_command;

const API_PORT: u16 = 17444;
const INTERNET: &str = "203.0.113.10";
const ALLOWED: &str = "10.77.0.10";

/// Addresses "beyond the host", on the far namespace's loopback, with what they are.
const BEYOND: &[(&str, &str)] = &[
    (INTERNET, "public"),
    (ALLOWED, "RFC 1918, allowed to fence-a on port 7000"),
    ("192.168.77.10", "RFC 1918"),
    ("172.16.77.10", "RFC 1918"),
    ("100.64.77.10", "CGNAT"),
    ("169.254.77.10", "link-local"),
];

fn spec(name: &str, image: &str, network: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{image}\"\n\
         [run]\ncmd = [\"/usr/local/bin/swg-counter\"]\n\
         [env]\nSWG_PAGE = \"app-{name}\"\n\
         [resources]\nmemory = \"128Mi\"\n\
         [health]\nhttp = \"/\"\nport = 8080\ninterval = \"1s\"\ntimeout = \"1s\"\nretries = 60\n\
         {network}"
    )
}

fn exec(stack: &Stack, app: &str, script: &str) -> String {
    let out = stack.run(&["exec", app, "--", "sh", "-c", script]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A guest as the test sees it.
struct Vm {
    app: &'static str,
    id: String,
    ip: String,
    mac: String,
}

fn vm_of(stack: &Stack, app: &'static str) -> Vm {
    let vms = Stack::vms(&stack.ps(), app);
    assert_eq!(vms.len(), 1, "{app}: {vms:?}");
    let id = vms[0]["vm_id"].as_str().expect("vm_id").to_string();
    let ip = vms[0]["ip"].as_str().expect("ip").to_string();
    let mac = exec(stack, app, "cat /sys/class/net/eth0/address")
        .trim()
        .to_string();
    assert_eq!(mac.len(), 17, "{app}'s MAC: {mac}");
    Vm { app, id, ip, mac }
}

/// Connects from inside the guest of `app` to each `(address, port)` at once; for each,
/// the first line the listener sent, or `None` when no connection came about.
fn probe(stack: &Stack, app: &str, targets: &[(&str, u16)]) -> Vec<Option<String>> {
    // Few processes per probe: forking is slow in an emulated guest.
    let mut script = String::from(
        "p() { echo \"$1:$2=$(/bin/busybox nc -w 2 \"$1\" \"$2\" </dev/null 2>/dev/null)\"; }\n",
    );
    for (addr, port) in targets {
        script.push_str(&format!("p {addr} {port} &\n"));
    }
    script.push_str("wait\n");
    let out = exec(stack, app, &script);
    targets
        .iter()
        .map(|(addr, port)| {
            let key = format!("{addr}:{port}=");
            let line = out
                .lines()
                .find_map(|l| l.strip_prefix(&key))
                .unwrap_or_else(|| panic!("no result for {key} from {app}: {out}"));
            Some(line.trim().to_string()).filter(|l| !l.is_empty())
        })
        .collect()
}

/// Checks `(app, address, port, banner that must answer or None)` cases, grouped by app,
/// and reports every wrong decision at once.
fn expect(stack: &Stack, cases: &[(&str, &str, u16, Option<&str>)]) {
    let mut apps: Vec<&str> = Vec::new();
    for c in cases {
        if !apps.contains(&c.0) {
            apps.push(c.0);
        }
    }
    // One exec per app, the apps at once.
    let wrong: Vec<String> = std::thread::scope(|scope| {
        let running: Vec<_> = apps
            .iter()
            .map(|app| {
                let mine: Vec<_> = cases.iter().filter(|c| c.0 == *app).collect();
                scope.spawn(move || {
                    let targets: Vec<(&str, u16)> = mine.iter().map(|c| (c.1, c.2)).collect();
                    let got = probe(stack, app, &targets);
                    mine.iter()
                        .zip(got)
                        .filter(|(case, got)| got.as_deref() != case.3)
                        .map(|(case, got)| {
                            format!(
                                "{app} -> {}:{}: expected {:?}, got {got:?}",
                                case.1, case.2, case.3
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        running
            .into_iter()
            .flat_map(|h| h.join().expect("probe thread"))
            .collect()
    });
    assert!(
        wrong.is_empty(),
        "fence decisions wrong:\n{}",
        wrong.join("\n")
    );
}

/// The first bytes `to` sends on a TCP connection from inside `ns` (`None`: no
/// connection), or with `request`, the body of its HTTP answer.
fn from_ns(ns: &NetNs, to: &str, request: Option<&'static str>) -> Option<String> {
    let to: SocketAddr = to.parse().expect("address");
    ns.run_in(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut buf = Vec::new();
        match request {
            Some(r) => {
                s.write_all(r.as_bytes()).ok()?;
                s.read_to_end(&mut buf).ok()?;
                let text = String::from_utf8_lossy(&buf).into_owned();
                text.split_once("\r\n\r\n")
                    .map(|(_, b)| b.trim().to_string())
            }
            None => {
                let mut chunk = [0u8; 64];
                let n = s.read(&mut chunk).ok()?;
                Some(String::from_utf8_lossy(&chunk[..n]).trim().to_string())
            }
        }
    })
}

const WHO: &str = "GET /who HTTP/1.0\r\nHost: x\r\n\r\n";

#[test]
fn isolation_fence_guests_cannot_spoof_reach_the_host_other_apps_or_private_ranges() {
    require_command("nft", "apt-get install nftables (`make setup`)");
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:6.1} s] {what}", started.elapsed().as_secs_f64());
    let mut stack = Stack::new();
    // Alpine (busybox for the guests' side of each check) with the test app, which
    // serves without forking.
    let image = stack.push_web_with("1", b"-", &shellwego_testkit::oci::counter_layer());

    // Beyond the host: a namespace of the test's own, reached through an uplink.
    let outside = NetNs::new();
    stack
        .ns
        .veth_to("uplink", &outside, "wan", "198.51.100.2/24");
    stack
        .ns
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "uplink"]);
    for (addr, _) in BEYOND {
        outside.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        stack
            .ns
            .ip(&["route", "add", &format!("{addr}/32"), "via", "198.51.100.2"]);
    }
    outside.ip(&["route", "add", "10.0.4.0/24", "via", "198.51.100.1"]);
    let _listeners = [
        Listener::tcp(&outside, "0.0.0.0:7000", "outside-7000"),
        Listener::tcp(&outside, "0.0.0.0:7002", "outside-7002"),
        Listener::tcp(&stack.ns, "0.0.0.0:9000", "host-9000"),
    ];
    let udp = Listener::udp(&outside, "0.0.0.0:7001");

    let token = stack.dir.path().join("api.token");
    let api_tcp = format!("0.0.0.0:{API_PORT}");
    let agent_env = [
        ("SHELLWEGO_API_TCP", api_tcp.as_str()),
        ("SHELLWEGO_API_TOKEN_FILE", token.to_str().expect("path")),
    ];
    stack.start_agent(&agent_env);
    phase("agent up");
    // The three apps at once.
    std::thread::scope(|scope| {
        for (name, network) in [
            (
                "fence-a",
                format!("[network]\nallow = [\"{ALLOWED}:7000\"]\n"),
            ),
            ("fence-b", String::new()),
            ("fence-c", "[network]\negress = \"none\"\n".to_string()),
        ] {
            let file = stack.spec(&format!("{name}.toml"), &spec(name, &image, &network));
            let stack = &stack;
            scope.spawn(move || stack.run(&["apply", "-f", file.to_str().expect("path")]));
        }
    });
    phase("fence-a, fence-b and fence-c applied");
    let (a, b, c) = std::thread::scope(|scope| {
        let vms = ["fence-a", "fence-b", "fence-c"].map(|app| scope.spawn(|| vm_of(&stack, app)));
        let [a, b, c] = vms.map(|h| h.join().expect("vm_of"));
        (a, b, c)
    });
    // The host side: its own service and the agent's API answer it, it reaches every
    // guest (their replies pass the fence), and nothing beyond the host reaches a guest.
    assert_eq!(
        from_ns(&stack.ns, "10.0.4.1:9000", None).as_deref(),
        Some("host-9000")
    );
    assert!(
        from_ns(&stack.ns, &format!("10.0.4.1:{API_PORT}"), Some(WHO)).is_some(),
        "the agent's TCP API answers on the host"
    );
    for vm in [&a, &b, &c] {
        assert_eq!(
            from_ns(&stack.ns, &format!("{}:8080", vm.ip), Some(WHO)),
            Some(format!("app-{}", vm.app)),
            "the host reaches {}",
            vm.app
        );
    }
    assert_eq!(
        from_ns(&outside, &format!("{}:8080", b.ip), None),
        None,
        "beyond the host reaches a guest"
    );

    phase("host-side checks done");
    let mut cases: Vec<(&str, &str, u16, Option<&str>)> = vec![
        // Beyond the host: the internet through NAT; private ranges only where allowed.
        ("fence-a", INTERNET, 7000, Some("outside-7000")),
        ("fence-a", ALLOWED, 7000, Some("outside-7000")),
        ("fence-a", ALLOWED, 7002, None),
        ("fence-b", INTERNET, 7000, Some("outside-7000")),
        ("fence-b", ALLOWED, 7000, None),
        ("fence-c", INTERNET, 7000, None),
        ("fence-c", ALLOWED, 7000, None),
        // The host's own addresses: its service, the agent's API, on the gateway and on
        // the uplink address.
        ("fence-a", "10.0.4.1", 9000, None),
        ("fence-a", "198.51.100.1", 9000, None),
        ("fence-b", "10.0.4.1", 9000, None),
        ("fence-c", "10.0.4.1", 9000, None),
        ("fence-a", "10.0.4.1", API_PORT, None),
        ("fence-b", "198.51.100.1", API_PORT, None),
        // Another app's VM, each way.
        ("fence-a", &b.ip, 8080, None),
        ("fence-b", &a.ip, 8080, None),
        ("fence-c", &a.ip, 8080, None),
    ];
    for (addr, _) in &BEYOND[2..] {
        cases.push(("fence-a", addr, 7000, None));
        cases.push(("fence-b", addr, 7000, None));
    }
    expect(&stack, &cases);
    phase("reachability checks done");

    // IP spoofing: fence-a takes fence-b's address as a second one; a datagram from its
    // own address arrives beyond the host, one from fence-b's does not.
    // (The guest's side of each step must succeed: a spoof that was never sent would
    // prove nothing.)
    let sent = exec(
        &stack,
        "fence-a",
        &format!(
            "/bin/busybox ip addr add {bip}/32 dev eth0 && echo ALIAS-ADDED; \
             printf 'own-a\\nown-a\\n' | /bin/busybox nc -u -w 1 {INTERNET} 7001; \
             printf 'a-as-b\\na-as-b\\n' | /bin/busybox nc -u -w 1 -s {bip} {INTERNET} 7001 \
             && echo SPOOF-SENT; true",
            bip = b.ip
        ),
    );
    assert!(
        sent.contains("ALIAS-ADDED") && sent.contains("SPOOF-SENT"),
        "the guest could not send as fence-b: {sent}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let seen = udp.seen();
    assert!(
        seen.iter().any(|p| p.contains("own-a")),
        "own datagram: {seen:?}"
    );
    assert!(
        !seen.iter().any(|p| p.contains("a-as-b")),
        "a datagram from fence-b's address left the host: {seen:?}"
    );

    // ARP spoofing: asking the gateway as fence-b gets no answer (as itself it gets one);
    // unsolicited and answer-mode ARP claiming fence-b's address do not change the
    // host's entry, and the host still reaches fence-b.
    let arp = exec(
        &stack,
        "fence-a",
        &format!(
            "echo OWN; /bin/busybox arping -c 2 -w 3 -I eth0 -s {aip} 10.0.4.1; \
             echo SPOOFED; /bin/busybox arping -c 2 -w 3 -I eth0 -s {bip} 10.0.4.1; \
             /bin/busybox arping -U -c 2 -I eth0 -s {bip} {bip}; /bin/busybox arping -A -c 2 -I eth0 -s {bip} {bip}; \
             /bin/busybox ip addr del {bip}/32 dev eth0; true",
            aip = a.ip,
            bip = b.ip
        ),
    );
    let (own, spoofed) = arp
        .split_once("SPOOFED")
        .unwrap_or_else(|| panic!("arping output: {arp}"));
    assert!(
        own.contains("Received 2 response"),
        "arping as itself: {own}"
    );
    assert!(
        spoofed.contains(&format!("from {}", b.ip))
            && spoofed.contains("Sent 2 probe")
            && spoofed.contains("Received 0 response"),
        "arping as fence-b: {spoofed}"
    );
    let neigh = String::from_utf8_lossy(
        &stack
            .ns
            .exec(&["ip", "neigh", "show", &b.ip, "dev", "swg-br0"])
            .stdout,
    )
    .into_owned();
    assert!(
        neigh.contains(&b.mac) && !neigh.contains(&a.mac),
        "the host's ARP entry of fence-b: {neigh}"
    );
    assert_eq!(
        from_ns(&stack.ns, &format!("{}:8080", b.ip), Some(WHO)).as_deref(),
        Some("app-fence-b")
    );

    // MAC spoofing: frames fence-a sends with fence-b's MAC go nowhere, the bridge keeps
    // fence-b's MAC on fence-b's TAP, and the host's traffic still reaches fence-b.
    let gw_mac = String::from_utf8_lossy(
        &stack
            .ns
            .exec(&["cat", "/sys/class/net/swg-br0/address"])
            .stdout,
    )
    .trim()
    .to_string();
    let spoof = exec(
        &stack,
        "fence-a",
        &format!(
            "/bin/busybox ip link set dev eth0 address {bmac} && \
             /bin/busybox cat /sys/class/net/eth0/address; \
             /bin/busybox ip neigh replace 10.0.4.1 lladdr {gw_mac} dev eth0 nud permanent; \
             r=$(echo | /bin/busybox nc -w 3 {INTERNET} 7000); echo \"AS-B=${{r:-BLOCKED}}\"; \
             /bin/busybox ip link set dev eth0 address {amac}; /bin/busybox ip neigh del 10.0.4.1 dev eth0; \
             r=$(echo | /bin/busybox nc -w 3 {INTERNET} 7000); echo \"AS-A=${{r:-BLOCKED}}\"",
            bmac = b.mac,
            amac = a.mac
        ),
    );
    assert!(
        spoof.contains(&b.mac) && spoof.contains("AS-B=BLOCKED"),
        "with fence-b's MAC: {spoof}"
    );
    assert!(
        spoof.contains("AS-A=outside-7000"),
        "with its own MAC again: {spoof}"
    );
    let fdb = String::from_utf8_lossy(
        &stack
            .ns
            .exec(&["bridge", "fdb", "show", "br", "swg-br0"])
            .stdout,
    )
    .into_owned();
    let b_tap = shellwego_network::cni::tap_name(&b.id);
    let learned: Vec<&str> = fdb.lines().filter(|l| l.starts_with(&b.mac)).collect();
    assert!(
        learned.iter().all(|l| l.contains(&format!("dev {b_tap}"))),
        "fence-b's MAC learned on another port: {learned:?}"
    );
    assert_eq!(
        from_ns(&stack.ns, &format!("{}:8080", b.ip), Some(WHO)).as_deref(),
        Some("app-fence-b")
    );

    phase("spoofing checks done");

    // An agent killed and started again re-applies every running VM's fence (the rules
    // stayed in the kernel meanwhile), and the fence still decides the same.
    let log = stack.log.clone();
    let fenced = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("network fence in place")
            .count()
    };
    let before = fenced();
    let since = stack.last_seq();
    stack.kill_agent();
    stack.start_agent(&agent_env);
    for app in ["fence-a", "fence-b", "fence-c"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !stack.events().iter().any(|e| {
            e["seq"].as_u64().is_some_and(|s| s > since)
                && e["app"] == app
                && e["message"] == "re-attached after agent restart"
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "{app} not re-attached"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(
        fenced() >= before + 3,
        "the restarted agent re-applied {} fences",
        fenced() - before
    );
    expect(
        &stack,
        &[
            ("fence-a", INTERNET, 7000, Some("outside-7000")),
            ("fence-a", ALLOWED, 7000, Some("outside-7000")),
            ("fence-a", &b.ip, 8080, None),
            ("fence-b", ALLOWED, 7000, None),
            ("fence-c", INTERNET, 7000, None),
        ],
    );
    phase("agent restarted, fences re-applied");

    // Every app stayed healthy through all of it.
    let ps = stack.ps();
    for app in ["fence-a", "fence-b", "fence-c"] {
        let vms = Stack::vms(&ps, app);
        assert!(
            vms.len() == 1 && vms[0]["health"] == "Healthy",
            "{app}: {vms:?}"
        );
    }
    // Removing the apps removes their fences; the tables stay, empty of VMs.
    for app in ["fence-a", "fence-b", "fence-c"] {
        stack.run(&["rm", app]);
    }
    stack.wait_ps("all VMs gone", Duration::from_secs(120), |ps| {
        ["fence-a", "fence-b", "fence-c"]
            .iter()
            .all(|app| Stack::vms(ps, app).is_empty())
    });
    let left = String::from_utf8_lossy(
        &stack
            .ns
            .exec(&["nft", "list", "table", "bridge", "shellwego_fence"])
            .stdout,
    )
    .into_owned();
    for vm in [&a, &b, &c] {
        let tap = shellwego_network::cni::tap_name(&vm.id);
        assert!(!left.contains(&tap), "{}'s fence is left: {left}", vm.app);
    }
    assert!(left.contains("chain prerouting"), "{left}");
    phase("apps removed, their fences gone");
}
