//! CniNetwork with real netlink, tun ioctls, nftables, eBPF and HTB, each test inside
//! network namespaces it creates (never the machine's own).

use std::net::Ipv4Addr;
use std::sync::Arc;

use shellwego_network::fence::{self, EgressPolicy, VmFence};
use shellwego_network::ipam::{Ipam, IpamError, Subnet};
use shellwego_network::link::Netlink;
use shellwego_network::qos::{Limits, VmQos};
use shellwego_network::{CniNetwork, NetworkConfig, Tenant};
use shellwego_testkit::netns::NetNs;
use shellwego_testkit::prereq::require_command;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// (name, flags, master) from `ip -o link show` lines.
fn parse_links(text: &str) -> Vec<(String, Vec<String>, Option<String>)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ": ");
            parts.next()?;
            let name = parts.next()?.split('@').next()?.to_string();
            let rest = parts.next()?;
            let flags = rest
                .split_once('<')?
                .1
                .split_once('>')?
                .0
                .split(',')
                .map(str::to_string)
                .collect();
            let words: Vec<&str> = rest.split_whitespace().collect();
            let master = words
                .iter()
                .position(|w| *w == "master")
                .and_then(|i| words.get(i + 1))
                .map(|s| s.to_string());
            Some((name, flags, master))
        })
        .collect()
}

#[test]
fn tc_i3_bridge_lease_and_tap() {
    let ns = NetNs::new();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    let (ip, lease_again) = ns.run_in(move || {
        runtime().block_on(async {
            let net = CniNetwork::new(
                NetworkConfig {
                    nat: false,
                    ..Default::default()
                },
                &dir,
            )
            .unwrap();
            net.ensure_bridge().await.expect("bridge");
            let ip = net.ipam().allocate("vm-test").unwrap();
            net.create_tap("tap-test").await.expect("tap");
            // Idempotent: doing it all again changes nothing.
            net.ensure_bridge().await.expect("bridge again");
            net.create_tap("tap-test").await.expect("tap again");
            (ip, net.ipam().allocate("vm-test").unwrap())
        })
    });
    assert_eq!(ip, Ipv4Addr::new(10, 0, 4, 2));
    assert_eq!(lease_again, ip);
    let links = parse_links(&ns.ip(&["-o", "link", "show"]));
    let bridge = links
        .iter()
        .find(|l| l.0 == "swg-br0")
        .expect("swg-br0 listed");
    assert!(bridge.1.contains(&"UP".to_string()), "{bridge:?}");
    let tap = links
        .iter()
        .find(|l| l.0 == "tap-test")
        .expect("tap-test listed");
    assert!(tap.1.contains(&"UP".to_string()), "{tap:?}");
    assert_eq!(tap.2.as_deref(), Some("swg-br0"));
    let addrs = ns.ip(&["-o", "-4", "addr", "show", "dev", "swg-br0"]);
    assert!(addrs.contains("10.0.4.1/24"), "{addrs}");
    let details = ns.ip(&["-d", "link", "show", "tap-test"]);
    assert!(details.contains("tun type tap"), "{details}");
}

#[test]
fn ipam_is_concurrent_persistent_and_reports_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = Arc::new(Ipam::open(dir.path(), Subnet::default_pool()).unwrap());
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let ipam = ipam.clone();
            std::thread::spawn(move || ipam.allocate(&format!("vm-{i}")).unwrap())
        })
        .collect();
    let mut ips: Vec<Ipv4Addr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 40, "no address given twice");
    assert!(!ips.contains(&Ipv4Addr::new(10, 0, 4, 1)));
    // A second process's view (a reopen) sees the same leases.
    let reopened = Ipam::open(dir.path(), Subnet::default_pool()).unwrap();
    assert_eq!(reopened.leases().unwrap(), ipam.leases().unwrap());
    assert_eq!(
        reopened.allocate("vm-7").unwrap(),
        ipam.leases().unwrap()["vm-7"]
    );
    assert!(reopened.release("vm-7").unwrap().is_some());
    assert!(!ipam.leases().unwrap().contains_key("vm-7"));
    assert_eq!(
        reopened.release("vm-7").unwrap(),
        None,
        "release twice is fine"
    );

    let small = tempfile::tempdir().unwrap();
    let subnet = Subnet {
        network: Ipv4Addr::new(10, 9, 0, 0),
        prefix_len: 29,
        gateway: Ipv4Addr::new(10, 9, 0, 1),
    };
    let tiny = Ipam::open(small.path(), subnet).unwrap();
    for i in 0..5 {
        tiny.allocate(&format!("vm-{i}")).unwrap();
    }
    let err = tiny.allocate("one-too-many").unwrap_err();
    assert!(matches!(err, IpamError::Exhausted(_)), "{err}");
    assert!(err.to_string().contains("10.9.0.0/29"));
    let mismatch = Ipam::open(small.path(), Subnet::default_pool())
        .err()
        .expect("subnet mismatch refused");
    assert!(mismatch.to_string().contains("10.9.0.0/29"), "{mismatch}");
}

#[test]
fn vm_setup_and_teardown_leave_nothing_behind() {
    let ns = NetNs::new();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    let vm = "0d9f3b52-1111-4222-8333-444455556666";
    let (net_ip, counters_ok, after) = ns.run_in(move || {
        runtime().block_on(async {
            let net = CniNetwork::new(NetworkConfig::default(), &dir).unwrap();
            net.ensure_bridge().await.unwrap();
            let limits = Limits {
                download_bps: Some(50_000_000),
                upload_bps: Some(20_000_000),
            };
            let tenant = Tenant {
                app: "web".into(),
                ..Default::default()
            };
            let vmn = net
                .setup_vm(vm, "02:00:00:00:00:01", limits, &tenant)
                .await
                .expect("setup_vm");
            let again = net
                .setup_vm(vm, "02:00:00:00:00:01", limits, &tenant)
                .await
                .expect("setup_vm is idempotent");
            assert_eq!(again.ip, vmn.ip);
            let counters_ok = net.counters(vm).is_ok();
            let nl = Netlink::connect().unwrap();
            assert!(nl.get(&vmn.tap).await.unwrap().is_some());
            net.teardown_vm(vm).await.expect("teardown");
            net.teardown_vm(vm).await.expect("teardown twice");
            // The address handed on to another VM: what the host remembered of the old
            // VM's MAC (here set by hand, as traffic to a VM leaves it) is forgotten.
            let ip = vmn.ip.to_string();
            let neigh = |args: &[&str]| {
                std::process::Command::new("ip")
                    .arg("neigh")
                    .args(args)
                    .output()
                    .expect("ip neigh")
            };
            // A bridge whose MAC is set does not change it (and flush its neighbours)
            // when a port joins: as on a host where other VMs' TAPs are already there.
            let fixed = std::process::Command::new("ip")
                .args([
                    "link",
                    "set",
                    "dev",
                    "swg-br0",
                    "address",
                    "02:00:00:00:00:fe",
                ])
                .status()
                .expect("ip link");
            assert!(fixed.success());
            let set = neigh(&[
                "replace",
                &ip,
                "lladdr",
                "02:00:00:00:00:01",
                "dev",
                "swg-br0",
                "nud",
                "stale",
            ]);
            assert!(set.status.success(), "{set:?}");
            let shown =
                |out: std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(shown(neigh(&["show", &ip, "dev", "swg-br0"])).contains("02:00:00:00:00:01"));
            let next = "7e57a11e-2222-4333-8444-555566667777";
            let handed_on = net
                .setup_vm(next, "02:00:00:00:00:02", limits, &tenant)
                .await
                .expect("setup_vm of the next VM");
            assert_eq!(handed_on.ip, vmn.ip, "the released address is leased again");
            let left = shown(neigh(&["show", &ip, "dev", "swg-br0"]));
            assert!(
                !left.contains("02:00:00:00:00:01"),
                "the old MAC is remembered: {left}"
            );
            net.teardown_vm(next)
                .await
                .expect("teardown of the next VM");
            // Half-built: a TAP alone, no lease, no QoS.
            net.create_tap("swg0d9f3b521111").await.unwrap();
            net.teardown_vm(vm)
                .await
                .expect("teardown of a half-built setup");
            let names: Vec<String> = nl
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.name)
                .collect();
            // The fence's tables stay (they guard the bridge), with nothing of the VM.
            let fence_state = fence::read_state().unwrap();
            let traces = format!("{fence_state:?}");
            assert!(!traces.contains("swg0d9f"), "{traces}");
            net.disable_nat().unwrap();
            fence::remove_all().unwrap();
            (vmn.ip, counters_ok, (names, net.ipam().leases().unwrap()))
        })
    });
    assert_eq!(net_ip, Ipv4Addr::new(10, 0, 4, 2));
    assert!(counters_ok);
    let (names, leases) = after;
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("swg0d9f") || n.starts_with("swi0d9f")),
        "{names:?}"
    );
    assert!(leases.is_empty(), "{leases:?}");
    let qdiscs = ns.exec(&["tc", "qdisc", "show"]);
    let text = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(!text.contains("htb") && !text.contains("clsact"), "{text}");
    let nft = ns.exec(&["nft", "list", "tables"]);
    assert!(!String::from_utf8_lossy(&nft.stdout).contains("shellwego"));
}

#[test]
fn nat_masquerades_egress_and_blocks_metadata() {
    require_command("nft", "apt-get install nftables (`make setup`)");
    let host = NetNs::new();
    let guest = NetNs::new();
    let outside = NetNs::new();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    host.run_in(move || {
        runtime().block_on(async {
            let net = CniNetwork::new(NetworkConfig::default(), &dir).unwrap();
            net.ensure_bridge().await.unwrap();
        })
    });
    host.veth_to("vmport", &guest, "eth0", "10.0.4.2/24");
    host.ip(&["link", "set", "vmport", "master", "swg-br0"]);
    guest.ip(&["route", "add", "default", "via", "10.0.4.1"]);
    // The guest's port gets a VM's fence (without one, nothing it sends is forwarded).
    let mac = guest_mac(&guest, "eth0");
    host.run_in(move || {
        let vm = VmFence::new(
            "vmport",
            &mac,
            Ipv4Addr::new(10, 0, 4, 2),
            "nat",
            &EgressPolicy::default(),
        )
        .unwrap();
        let base = fence::FenceBase::new(
            "swg-br0",
            Subnet::default_pool(),
            shellwego_network::cni::TAP_PREFIX,
        )
        .unwrap();
        fence::Fence::new(base).apply(&vm).unwrap();
    });
    // "The internet": 203.0.113.2, and a metadata service at 169.254.169.254. It has
    // no route back to 10.0.4.0/24, so replies reach the guest only if masqueraded.
    host.veth_to("uplink", &outside, "wan", "203.0.113.2/24");
    host.ip(&["addr", "add", "203.0.113.1/24", "dev", "uplink"]);
    outside.ip(&["addr", "add", "169.254.169.254/32", "dev", "wan"]);
    host.ip(&["route", "add", "169.254.169.254/32", "dev", "uplink"]);

    let ok = guest.exec(&["ping", "-c", "1", "-W", "3", "203.0.113.2"]);
    assert!(
        ok.status.success(),
        "guest reaches outside through NAT: {}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let host_md = host.exec(&["ping", "-c", "1", "-W", "3", "169.254.169.254"]);
    assert!(
        host_md.status.success(),
        "the host itself reaches the metadata address"
    );
    let blocked = guest.exec(&["ping", "-c", "1", "-W", "2", "169.254.169.254"]);
    assert!(
        !blocked.status.success(),
        "guest must not reach 169.254.169.254"
    );

    host.run_in(|| shellwego_network::nat::disable().unwrap());
    let after = guest.exec(&["ping", "-c", "1", "-W", "2", "203.0.113.2"]);
    assert!(
        !after.status.success(),
        "without the NAT table there is no way back"
    );
}

/// The MAC address of `dev` in `ns`.
fn guest_mac(ns: &NetNs, dev: &str) -> String {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{dev}/address")]);
    assert!(out.status.success(), "MAC of {dev} in {}", ns.name);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn qos_holds_50_mbit_both_ways_and_leaves_others_alone() {
    require_command("iperf3", "apt-get install iperf3 (`make setup`)");
    let host = NetNs::new();
    let limited = NetNs::new();
    let free = NetNs::new();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    host.run_in(move || {
        runtime().block_on(async {
            let net = CniNetwork::new(
                NetworkConfig {
                    nat: false,
                    ..Default::default()
                },
                &dir,
            )
            .unwrap();
            net.ensure_bridge().await.unwrap();
        })
    });
    host.veth_to("vmport", &limited, "eth0", "10.0.4.2/24");
    host.veth_to("freeport", &free, "eth0", "10.0.4.3/24");
    host.ip(&["link", "set", "vmport", "master", "swg-br0"]);
    host.ip(&["link", "set", "freeport", "master", "swg-br0"]);
    let limits = Limits {
        download_bps: Some(50_000_000),
        upload_bps: Some(50_000_000),
    };
    // The QoS lives on a thread inside the host namespace while iperf3 runs.
    let (tx, rx) = std::sync::mpsc::channel::<Limits>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let host_name = host.path();
    let worker = std::thread::spawn(move || {
        let file = std::fs::File::open(&host_name).unwrap();
        // SAFETY: setns on this thread.
        assert_eq!(
            unsafe {
                libc::setns(
                    std::os::unix::io::AsRawFd::as_raw_fd(&file),
                    libc::CLONE_NEWNET,
                )
            },
            0
        );
        runtime().block_on(async {
            let nl = Netlink::connect().unwrap();
            let ifb = nl.ensure_ifb("vmifb").await.unwrap();
            nl.set_up(ifb.index).await.unwrap();
        });
        let mut qos = VmQos::attach("vmport", "vmifb", limits).expect("attach QoS");
        done_tx.send(qos.counters().unwrap()).unwrap();
        for new in rx {
            qos.set_limits(new).expect("change limits live");
            done_tx.send(qos.counters().unwrap()).unwrap();
        }
        let last = qos.counters().unwrap();
        qos.detach();
        done_tx.send(last).unwrap();
    });
    let _ = done_rx.recv().unwrap();

    let down = host.iperf_mbit(&limited, "10.0.4.2", false);
    let up = host.iperf_mbit(&limited, "10.0.4.2", true);
    let free_down = host.iperf_mbit(&free, "10.0.4.3", false);
    println!("QoS 50 Mbit/s: download {down:.1}, upload {up:.1}; unlimited neighbour {free_down:.1} Mbit/s");
    assert!(
        (45.0..=55.0).contains(&down),
        "download {down:.1} Mbit/s not within 10% of 50"
    );
    assert!(
        (45.0..=55.0).contains(&up),
        "upload {up:.1} Mbit/s not within 10% of 50"
    );
    assert!(
        free_down > 200.0,
        "an unlimited VM must not be slowed: {free_down:.1} Mbit/s"
    );

    // Live change to 20 Mbit/s download.
    tx.send(Limits {
        download_bps: Some(20_000_000),
        upload_bps: Some(50_000_000),
    })
    .unwrap();
    let _ = done_rx.recv().unwrap();
    let down20 = host.iperf_mbit(&limited, "10.0.4.2", false);
    println!("QoS changed live to 20 Mbit/s: download {down20:.1} Mbit/s");
    assert!(
        (18.0..=22.0).contains(&down20),
        "download {down20:.1} after live change to 20"
    );
    drop(tx);
    let last = done_rx.recv().unwrap();
    worker.join().unwrap();
    assert!(
        last.0.bytes > 10_000_000 && last.0.packets > 1_000,
        "download counters {:?}",
        last.0
    );
    assert!(
        last.1.bytes > 1_000_000 && last.1.packets > 1_000,
        "upload counters {:?}",
        last.1
    );
    let qdiscs =
        String::from_utf8_lossy(&host.exec(&["tc", "qdisc", "show", "dev", "vmport"]).stdout)
            .into_owned();
    assert!(
        !qdiscs.contains("htb") && !qdiscs.contains("clsact"),
        "detached: {qdiscs}"
    );
}
