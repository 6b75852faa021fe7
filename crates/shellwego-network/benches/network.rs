//! Network figures, inside namespaces this bench creates: per-VM setup and teardown time
//! (lease + TAP + IFB + eBPF/HTB QoS), and a QoS accuracy table (configured vs achieved,
//! both directions, TCP with iperf3). `cargo bench -p shellwego-network` (root).

use std::time::Instant;

use shellwego_network::link::Netlink;
use shellwego_network::qos::{Limits, VmQos};
use shellwego_network::{CniNetwork, NetworkConfig};
use shellwego_testkit::netns::NetNs;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    let host = NetNs::new();
    let state = tempfile::tempdir().expect("tempdir");
    let dir = state.path().to_path_buf();
    let (setup, teardown) = host.run_in(move || {
        runtime().block_on(async {
            let net = CniNetwork::new(
                NetworkConfig {
                    nat: false,
                    ..Default::default()
                },
                &dir,
            )
            .expect("cni");
            net.ensure_bridge().await.expect("bridge");
            let limits = Limits {
                download_bps: Some(100_000_000),
                upload_bps: Some(100_000_000),
            };
            let tenant = shellwego_network::Tenant {
                app: "bench".into(),
                ..Default::default()
            };
            let (mut s, mut t) = (Vec::new(), Vec::new());
            for i in 0..20 {
                let id = format!("{i:08x}-0000-4000-8000-000000000000");
                let start = Instant::now();
                net.setup_vm(&id, "02:00:00:00:00:01", limits, &tenant)
                    .await
                    .expect("setup");
                s.push(start.elapsed());
                let start = Instant::now();
                net.teardown_vm(&id).await.expect("teardown");
                t.push(start.elapsed());
            }
            s.sort();
            t.sort();
            (s[s.len() / 2], t[t.len() / 2])
        })
    });
    println!(
        "per-VM network setup (lease, fence, TAP, IFB, eBPF + HTB), median of 20: {:.1} ms",
        setup.as_secs_f64() * 1e3
    );
    println!(
        "per-VM network teardown, median of 20: {:.1} ms",
        teardown.as_secs_f64() * 1e3
    );

    let guest = NetNs::new();
    host.veth_to("vmport", &guest, "eth0", "10.0.4.2/24");
    host.ip(&["link", "set", "vmport", "master", "swg-br0"]);
    println!("QoS accuracy (TCP, iperf3 4 s):");
    println!("| configured Mbit/s | download achieved | upload achieved |");
    println!("|---|---|---|");
    for mbit in [10u64, 50, 100, 200] {
        let limits = Limits {
            download_bps: Some(mbit * 1_000_000),
            upload_bps: Some(mbit * 1_000_000),
        };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let path = host.path();
        let worker = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns");
            // SAFETY: setns on this thread.
            unsafe {
                libc::setns(
                    std::os::unix::io::AsRawFd::as_raw_fd(&f),
                    libc::CLONE_NEWNET,
                )
            };
            runtime().block_on(async {
                let nl = Netlink::connect().expect("netlink");
                let ifb = nl.ensure_ifb("vmifb").await.expect("ifb");
                nl.set_up(ifb.index).await.expect("up");
            });
            let qos = VmQos::attach("vmport", "vmifb", limits).expect("qos");
            ready_tx.send(()).expect("ready");
            let _ = rx.recv();
            qos.detach();
        });
        ready_rx.recv().expect("qos ready");
        let down = host.iperf_mbit(&guest, "10.0.4.2", false);
        let up = host.iperf_mbit(&guest, "10.0.4.2", true);
        drop(tx);
        worker.join().expect("worker");
        println!("| {mbit} | {down:.1} | {up:.1} |");
    }
}
