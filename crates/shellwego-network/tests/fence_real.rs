//! The network fence with real nftables, a real bridge and veth "VMs", all inside network
//! namespaces this test creates (the machine's own namespace is never touched):
//!
//! - `h`, the host: the bridge `swg-br0` (10.0.4.1/24) made by `CniNetwork`, its NAT
//!   and the fence's tables, a service of the host on port 9000, and an uplink;
//! - one namespace per guest, its `eth0` a veth whose host end is a bridge port: `a1`,
//!   `a2` (app "web", allowed `10.77.0.0/24:7000`), `b1` (app "db", defaults), `c1`
//!   (app "closed", `egress = "none"`), and `rogue`, a VM-named port without a fence;
//! - `o`, "beyond the host": addresses of the test's own on its loopback (this kernel has
//!   no dummy interfaces), one public
//!   (203.0.113.2) and several private, with listeners; it has no route back to the VM
//!   subnet, so guests reach it only through the host's NAT.
//!
//! Every blocked probe has a reached twin (same listener, other source), so a probe can
//! only pass by the fence deciding, never by a listener that is not there.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use shellwego_network::cni::TAP_PREFIX;
use shellwego_network::fence::{self, AllowRule, Egress, EgressPolicy, Fence, FenceBase, VmFence};
use shellwego_network::ipam::Subnet;
use shellwego_network::{CniNetwork, NetworkConfig};
use shellwego_testkit::listen::Listener;
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::prereq::require_command;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn fence() -> Fence {
    Fence::new(FenceBase::new("swg-br0", Subnet::default_pool(), TAP_PREFIX).expect("base"))
}

/// A guest: a namespace whose eth0 is the far end of bridge port `port`.
struct Guest {
    ns: NetNs,
    port: String,
    ip: Ipv4Addr,
    mac: String,
}

impl Guest {
    fn new(host: &NetNs, port: &str, ip: Ipv4Addr) -> Guest {
        let ns = NetNs::new();
        host.veth_to(port, &ns, "eth0", &format!("{ip}/24"));
        host.ip(&["link", "set", port, "master", "swg-br0"]);
        ns.ip(&["route", "add", "default", "via", "10.0.4.1"]);
        let mac = text(ns.exec(&["cat", "/sys/class/net/eth0/address"]));
        Guest {
            ns,
            port: port.to_string(),
            ip,
            mac,
        }
    }

    fn fence(&self, host: &NetNs, app: &str, policy: &EgressPolicy) {
        let vm = VmFence::new(&self.port, &self.mac, self.ip, app, policy).expect("VM fence");
        host.run_in(move || fence().apply(&vm).expect("apply fence"));
    }

    fn sh(&self, script: &str) -> String {
        let out = self.ns.exec(&["sh", "-c", script]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

fn text(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Lab {
    host: NetNs,
    outside: NetNs,
    a1: Guest,
    a2: Guest,
    b1: Guest,
    c1: Guest,
    rogue: Guest,
    _listeners: Vec<Listener>,
    udp: Listener,
    b1_udp: Listener,
    _state: tempfile::TempDir,
}

const WEB_ALLOW: &str = "10.77.0.0/24:7000";

impl Lab {
    fn new() -> Lab {
        require_command("nft", "apt-get install nftables (`make setup`)");
        require_command("busybox", "apt-get install busybox-static (`make setup`)");
        let host = NetNs::new();
        let state = tempfile::tempdir().expect("tempdir");
        let dir = state.path().to_path_buf();
        host.run_in(move || {
            runtime().block_on(async {
                let net = CniNetwork::new(NetworkConfig::default(), &dir).expect("cni");
                net.ensure_bridge().await.expect("bridge, fence and NAT");
            })
        });
        let a1 = Guest::new(&host, "swga1", Ipv4Addr::new(10, 0, 4, 2));
        let a2 = Guest::new(&host, "swga2", Ipv4Addr::new(10, 0, 4, 3));
        let b1 = Guest::new(&host, "swgb1", Ipv4Addr::new(10, 0, 4, 4));
        let c1 = Guest::new(&host, "swgc1", Ipv4Addr::new(10, 0, 4, 5));
        let rogue = Guest::new(&host, "swgrogue", Ipv4Addr::new(10, 0, 4, 9));
        let web = EgressPolicy {
            egress: Egress::Internet,
            allow: vec![WEB_ALLOW.parse::<AllowRule>().expect("allow entry")],
        };
        a1.fence(&host, "web", &web);
        a2.fence(&host, "web", &web);
        b1.fence(&host, "db", &EgressPolicy::default());
        c1.fence(
            &host,
            "closed",
            &EgressPolicy {
                egress: Egress::None,
                allow: vec![],
            },
        );

        let outside = NetNs::new();
        host.veth_to("uplink", &outside, "wan", "198.51.100.2/24");
        host.ip(&["addr", "add", "198.51.100.1/24", "dev", "uplink"]);
        for net in [
            "203.0.113",
            "192.168.77",
            "172.16.77",
            "100.64.77",
            "10.77.0",
            "10.78.0",
        ] {
            outside.ip(&["addr", "add", &format!("{net}.2/32"), "dev", "lo"]);
            host.ip(&[
                "route",
                "add",
                &format!("{net}.0/24"),
                "via",
                "198.51.100.2",
            ]);
        }
        // "Beyond the host" knows the way to the VM subnet: only the fence keeps it out.
        outside.ip(&["route", "add", "10.0.4.0/24", "via", "198.51.100.1"]);

        let listeners = vec![
            Listener::tcp(&outside, "0.0.0.0:7000", "outside-7000"),
            Listener::tcp(&outside, "0.0.0.0:7002", "outside-7002"),
            Listener::tcp(&host, "0.0.0.0:9000", "host-9000"),
            Listener::tcp(&a1.ns, "0.0.0.0:8080", "a1"),
            Listener::tcp(&b1.ns, "0.0.0.0:8080", "b1"),
            Listener::tcp(&rogue.ns, "0.0.0.0:8080", "rogue"),
        ];
        let udp = Listener::udp(&outside, "0.0.0.0:7001");
        let b1_udp = Listener::udp(&b1.ns, "0.0.0.0:7001");
        Lab {
            host,
            outside,
            a1,
            a2,
            b1,
            c1,
            rogue,
            _listeners: listeners,
            udp,
            b1_udp,
            _state: state,
        }
    }
}

/// The banner of the listener at `to`, or `None` if no connection came about.
fn banner(to: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(1500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string()).filter(|b| !b.is_empty())
}

/// Runs the TCP probes in parallel, each from its namespace; `want` is the banner that
/// must answer (`None`: no connection). Reports every mismatch at once.
fn expect_tcp(cases: &[(&str, &NetNs, &str, Option<&str>)]) {
    let running: Vec<_> = cases
        .iter()
        .map(|(label, ns, to, want)| {
            let addr: SocketAddr = to.parse().expect("probe address");
            (
                format!("{label} ({} -> {to})", ns.name),
                want.map(str::to_string),
                ns.spawn_in(move || banner(addr)),
            )
        })
        .collect();
    let wrong: Vec<String> = running
        .into_iter()
        .filter_map(|(label, want, probe)| {
            let got = probe.join().expect("probe thread");
            (got != want).then(|| format!("{label}: expected {want:?}, got {got:?}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "fence decisions wrong:\n{}",
        wrong.join("\n")
    );
}

fn ping(ns: &NetNs, target: &str) -> bool {
    ns.exec(&["ping", "-c", "1", "-W", "2", target])
        .status
        .success()
}

#[test]
fn isolation_fence_egress_host_services_and_neighbours() {
    let lab = Lab::new();
    let (h, o) = (&lab.host, &lab.outside);
    let (a1, a2, b1, c1) = (&lab.a1.ns, &lab.a2.ns, &lab.b1.ns, &lab.c1.ns);
    let rogue = &lab.rogue.ns;
    expect_tcp(&[
        // Beyond the host: the internet through NAT, private ranges only when allowed.
        ("internet", a1, "203.0.113.2:7000", Some("outside-7000")),
        (
            "allowed private",
            a1,
            "10.77.0.2:7000",
            Some("outside-7000"),
        ),
        ("allowed net, other port", a1, "10.77.0.2:7002", None),
        ("RFC 1918 192.168/16", a1, "192.168.77.2:7000", None),
        ("RFC 1918 172.16/12", a1, "172.16.77.2:7000", None),
        ("CGNAT 100.64/10", a1, "100.64.77.2:7000", None),
        ("RFC 1918 10/8, not allowed", a1, "10.78.0.2:7000", None),
        (
            "default policy: internet",
            b1,
            "203.0.113.2:7000",
            Some("outside-7000"),
        ),
        ("default policy: no private", b1, "10.77.0.2:7000", None),
        ("egress none: no internet", c1, "203.0.113.2:7000", None),
        ("egress none: no private", c1, "10.77.0.2:7000", None),
        ("egress none: no other port", c1, "203.0.113.2:7002", None),
        // The host's own services, on any of its addresses; the host itself reaches them.
        ("host service on the gateway", a1, "10.0.4.1:9000", None),
        ("host service on the uplink", a1, "198.51.100.1:9000", None),
        ("host service, other app", b1, "10.0.4.1:9000", None),
        (
            "the host reaches its service",
            h,
            "10.0.4.1:9000",
            Some("host-9000"),
        ),
        // Neighbours: the same app yes, another app no (both ways); the host reaches all
        // fenced guests (their replies pass), nothing beyond the host reaches any.
        ("same app", a2, "10.0.4.2:8080", Some("a1")),
        ("other app to web", b1, "10.0.4.2:8080", None),
        ("web to other app", a1, "10.0.4.4:8080", None),
        ("closed to web", c1, "10.0.4.2:8080", None),
        ("host to guest", h, "10.0.4.4:8080", Some("b1")),
        ("host to guest", h, "10.0.4.2:8080", Some("a1")),
        ("beyond the host to a guest", o, "10.0.4.4:8080", None),
        // A VM-named port without a fence is dead both ways.
        ("unfenced port out", rogue, "203.0.113.2:7000", None),
        ("unfenced port to a guest", rogue, "10.0.4.2:8080", None),
        ("host to unfenced port", h, "10.0.4.9:8080", None),
    ]);
    assert!(!ping(a1, "10.0.4.1"), "a guest pings the host");
    assert!(ping(h, "10.0.4.2"), "the host pings a guest (replies pass)");
    assert!(ping(a1, "10.0.4.3"), "same-app guests ping each other");
    assert!(
        !ping(a1, "169.254.169.254"),
        "a guest reaches the metadata address"
    );

    // IPv6 never leaves a guest: a1 cannot reach a2 over link-local IPv6, which it could
    // over IPv4 just above.
    let deadline = Instant::now() + Duration::from_secs(10);
    let a2_ll = loop {
        let addrs = text(a2.exec(&[
            "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
        ]));
        if !addrs.is_empty() && !addrs.contains("tentative") {
            break addrs
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .expect("a2's link-local address")
                .to_string();
        }
        assert!(
            Instant::now() < deadline,
            "a2 has no link-local IPv6: {addrs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        !ping(a1, &format!("{a2_ll}%eth0")),
        "IPv6 from a guest must be dropped"
    );
}

#[test]
fn isolation_fence_spoofing_fails() {
    let lab = Lab::new();
    let (h, a1, b1) = (&lab.host, &lab.a1, &lab.b1);
    let b1_ip = b1.ip.to_string();
    let seen_b1_mac = || {
        let neigh = text(h.exec(&["ip", "neigh", "show", &b1_ip, "dev", "swg-br0"]));
        neigh.contains(&b1.mac)
    };
    // The host knows b1 (its ARP entry names b1's MAC).
    assert!(ping(h, &b1_ip));
    assert!(seen_b1_mac(), "the host's neighbour entry of b1");

    // a1 takes b1's address as a second one.
    a1.sh(&format!("ip addr add {b1_ip}/32 dev eth0"));
    // IP spoofing: a datagram from a1's own address arrives beyond the host, one from
    // b1's does not.
    a1.ns.run_in({
        let (own, spoofed) = (a1.ip, b1.ip);
        move || {
            let to: SocketAddr = "203.0.113.2:7001".parse().expect("address");
            for (from, text) in [(own, "own-a1"), (spoofed, "a1-as-b1")] {
                let s = UdpSocket::bind((from, 0)).expect("bind");
                for _ in 0..3 {
                    s.send_to(text.as_bytes(), to).expect("send");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let seen = lab.udp.seen();
    assert!(seen.iter().any(|p| p == "own-a1"), "own datagram: {seen:?}");
    assert!(
        !seen.iter().any(|p| p == "a1-as-b1"),
        "a datagram with b1's source address left the host: {seen:?}"
    );

    // ARP spoofing: asking the gateway as b1 gets no answer (as itself a1 gets one), and
    // unsolicited and answer-mode ARP claiming b1's address leave the host's entry alone.
    let own = a1.sh("busybox arping -c 2 -w 3 -I eth0 -s 10.0.4.2 10.0.4.1");
    assert!(
        own.contains("Received 2 response"),
        "arping as itself: {own}"
    );
    let spoofed = a1.sh(&format!(
        "busybox arping -c 2 -w 3 -I eth0 -s {b1_ip} 10.0.4.1"
    ));
    // (Nor does the host tell a guest about its other addresses.)
    let other = a1.sh("busybox arping -c 2 -w 3 -I eth0 -s 10.0.4.2 198.51.100.1");
    assert!(
        other.contains("Received 0 response"),
        "arping the uplink address: {other}"
    );
    assert!(
        spoofed.contains("Received 0 response"),
        "arping as b1: {spoofed}"
    );
    a1.sh(&format!(
        "busybox arping -U -c 3 -I eth0 -s {b1_ip} {b1_ip}; busybox arping -A -c 3 -I eth0 -s {b1_ip} {b1_ip}"
    ));
    assert!(
        seen_b1_mac(),
        "the host's ARP entry of b1 was changed by a1"
    );
    expect_tcp(&[("b1 is still b1", h, "10.0.4.4:8080", Some("b1"))]);
    a1.sh(&format!("ip addr del {b1_ip}/32 dev eth0"));

    // MAC spoofing: frames a1 sends with b1's MAC go nowhere, and the bridge keeps b1's
    // MAC on b1's port (the host's traffic for b1 still reaches b1, not a1).
    // (A static neighbour for the gateway: its ARP, sent with the wrong MAC, would fail.)
    let gw_mac = text(h.exec(&["cat", "/sys/class/net/swg-br0/address"]));
    a1.sh(&format!("ip link set dev eth0 address {}", b1.mac));
    a1.sh(&format!(
        "ip neigh replace 10.0.4.1 lladdr {gw_mac} dev eth0 nud permanent; ping -c 3 -i 0.3 -W 1 203.0.113.2"
    ));
    expect_tcp(&[("a1 with b1's MAC", &a1.ns, "203.0.113.2:7000", None)]);
    let fdb = text(h.exec(&["bridge", "fdb", "show", "br", "swg-br0"]));
    let learned: Vec<&str> = fdb.lines().filter(|l| l.starts_with(&b1.mac)).collect();
    assert!(
        !learned.is_empty() && learned.iter().all(|l| l.contains("dev swgb1")),
        "b1's MAC learned on another port: {learned:?}"
    );
    expect_tcp(&[("the host still reaches b1", h, "10.0.4.4:8080", Some("b1"))]);
    a1.sh(&format!(
        "ip link set dev eth0 address {}; ip neigh del 10.0.4.1 dev eth0",
        a1.mac
    ));
    expect_tcp(&[(
        "a1 as itself again",
        &a1.ns,
        "203.0.113.2:7000",
        Some("outside-7000"),
    )]);

    // Hairpin: b1's packets sent to the gateway's MAC (to be routed back onto the bridge)
    // do not get around the app boundary: a datagram that way never arrives, one from
    // the host does.
    a1.sh(&format!(
        "ip neigh replace {b1_ip} lladdr {gw_mac} dev eth0 nud permanent"
    ));
    let send = |ns: &NetNs, text: &'static str| {
        ns.run_in(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            for _ in 0..3 {
                s.send_to(text.as_bytes(), "10.0.4.4:7001").expect("send");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    send(&a1.ns, "a1-via-host");
    send(h, "from-host");
    std::thread::sleep(Duration::from_millis(500));
    let got = lab.b1_udp.seen();
    assert!(
        got.iter().any(|p| p == "from-host"),
        "b1 hears the host: {got:?}"
    );
    assert!(
        !got.iter().any(|p| p == "a1-via-host"),
        "a1 reached b1 through the host: {got:?}"
    );

    // Eavesdropping: when the bridge does not know b1's MAC it floods the host's frames
    // for b1 to every port; only b1's own port may carry them.
    h.ip(&[
        "neigh",
        "replace",
        &b1_ip,
        "lladdr",
        &b1.mac,
        "dev",
        "swg-br0",
        "nud",
        "permanent",
    ]);
    h.exec(&["bridge", "fdb", "del", &b1.mac, "dev", "swgb1", "master"]);
    let tx_packets = |port: &str| -> u64 {
        text(h.exec(&[
            "cat",
            &format!("/sys/class/net/{port}/statistics/tx_packets"),
        ]))
        .parse()
        .expect("tx_packets")
    };
    let before = tx_packets("swga1");
    h.run_in(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..50 {
            s.send_to(b"flooded", "10.0.4.4:7001").expect("send");
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let leaked = tx_packets("swga1") - before;
    assert!(
        lab.b1_udp.seen().iter().filter(|p| *p == "flooded").count() >= 40,
        "b1 gets its datagrams"
    );
    assert!(leaked < 10, "{leaked} frames for b1 went out on a1's port");
}

#[test]
fn isolation_fence_reapplies_idempotently_and_removes_cleanly() {
    let lab = Lab::new();
    let (h, a1, a2) = (&lab.host, &lab.a1, &lab.a2);
    // The kernel's state, element order aside.
    let listing = |h: &NetNs| {
        h.run_in(|| {
            let mut s = fence::read_state().expect("state");
            for t in [&mut s.bridge, &mut s.inet] {
                t.sets.values_mut().for_each(|e| e.sort());
                t.maps.values_mut().for_each(|e| e.sort());
            }
            s
        })
    };
    let before = listing(h);
    // An agent restart: the base again and every fence again.
    let dir = lab._state.path().to_path_buf();
    h.run_in(move || {
        runtime().block_on(async {
            let net = CniNetwork::new(NetworkConfig::default(), &dir).expect("cni");
            net.ensure_bridge().await.expect("ensure again");
        })
    });
    let web = EgressPolicy {
        egress: Egress::Internet,
        allow: vec![WEB_ALLOW.parse().expect("allow")],
    };
    a1.fence(h, "web", &web);
    // What a fence costs: each apply lists both tables and runs one transaction.
    let vm = VmFence::new(&a1.port, &a1.mac, a1.ip, "web", &web).expect("VM fence");
    let mut took = h.run_in(move || {
        let f = fence();
        (0..10)
            .map(|_| {
                let t = Instant::now();
                f.apply(&vm).expect("apply");
                t.elapsed()
            })
            .collect::<Vec<_>>()
    });
    took.sort();
    println!(
        "fence apply (list both tables + one nft transaction), median of 10: {:.1} ms",
        took[5].as_secs_f64() * 1e3
    );
    assert_eq!(listing(h), before, "re-applying changed the fence");
    expect_tcp(&[(
        "same app after re-apply",
        &a2.ns,
        "10.0.4.2:8080",
        Some("a1"),
    )]);

    // A changed policy applies live: a1 without its allow entry.
    a1.fence(h, "web", &EgressPolicy::default());
    expect_tcp(&[
        ("allow entry gone", &a1.ns, "10.77.0.2:7000", None),
        (
            "a2 keeps its own",
            &a2.ns,
            "10.77.0.2:7000",
            Some("outside-7000"),
        ),
    ]);

    // Removed: nothing of a1's fence is left, and its port (still there) is dead.
    h.run_in(|| fence().remove("swga1").expect("remove"));
    h.run_in(|| fence().remove("swga1").expect("remove twice"));
    let after = h.run_in(|| fence::read_state().expect("state"));
    assert!(!format!("{after:?}").contains("swga1"), "{after:?}");
    assert!(
        after.bridge.sets.contains_key("app-web"),
        "a2 still uses app-web"
    );
    expect_tcp(&[
        ("a removed fence's port", &a1.ns, "203.0.113.2:7000", None),
        ("to a removed fence's port", &a2.ns, "10.0.4.2:8080", None),
        (
            "the neighbour stays",
            &a2.ns,
            "203.0.113.2:7000",
            Some("outside-7000"),
        ),
    ]);
    h.run_in(|| fence().remove("swga2").expect("remove a2"));
    let after = h.run_in(|| fence::read_state().expect("state"));
    assert!(
        !after.bridge.sets.contains_key("app-web"),
        "emptied app set left: {after:?}"
    );

    // Both tables go, and only they: the NAT table stays.
    h.run_in(|| fence::remove_all().expect("remove all"));
    let tables = text(h.exec(&["nft", "list", "tables"]));
    assert!(!tables.contains("shellwego_fence"), "{tables}");
    assert!(tables.contains("table ip shellwego"), "{tables}");
}
