//! What the VM benches share.

use shellwego_proto::{NetConfig, RunConfig};

/// A run config for a bench guest on the 10.0.4.0/24 test bridge with a 256 MiB root disk.
pub fn run_config(ip: &str, argv: &[&str]) -> RunConfig {
    RunConfig {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        hostname: "bench".into(),
        net: Some(NetConfig {
            address: ip.into(),
            prefix_len: 24,
            gateway: "10.0.4.1".into(),
            nameservers: vec![],
            mac: None,
        }),
        root_device: "/dev/vda".into(),
        root_device_bytes: Some(256 << 20),
        ..Default::default()
    }
}
