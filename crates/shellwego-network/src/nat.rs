//! Egress NAT for guests with nftables: one table owned by the project (`ip shellwego`),
//! replaced atomically as a whole and removed cleanly. It masquerades the VM subnet
//! leaving through anything but the bridge, and drops guest traffic to the cloud
//! metadata address 169.254.169.254 (forwarded or to the host itself).

use std::io::Write;
use std::process::{Command, Stdio};

use crate::ipam::Subnet;
use crate::link::check_name;

/// The nftables table this module owns.
pub const TABLE: &str = "shellwego";
const METADATA_IP: &str = "169.254.169.254";

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("nft failed: {0}")]
    Nft(String),
    #[error("cannot run nft (apt-get install nftables): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot enable IPv4 forwarding: {0}")]
    Forwarding(#[source] std::io::Error),
    #[error(transparent)]
    Name(#[from] crate::link::LinkError),
}

/// The table's full text for a bridge and subnet.
pub fn ruleset(bridge: &str, subnet: &Subnet) -> String {
    let net = format!("{}/{}", subnet.network, subnet.prefix_len);
    format!(
        "table ip {TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {net} oifname != \"{bridge}\" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{bridge}\" ip daddr {METADATA_IP} drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{bridge}\" ip daddr {METADATA_IP} drop
  }}
}}
"
    )
}

fn nft(script: &str) -> Result<(), NatError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NatError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NatError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NatError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NatError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Installs (or replaces) the table and turns on IPv4 forwarding, which NAT needs.
pub fn enable(bridge: &str, subnet: &Subnet) -> Result<(), NatError> {
    check_name(bridge)?;
    // Declaring the table first makes the delete succeed whether or not it existed; the
    // whole script is one transaction.
    let script = format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\n{}",
        ruleset(bridge, subnet)
    );
    nft(&script)?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1").map_err(NatError::Forwarding)
}

/// Removes the table; removing what is not there is fine.
pub fn disable() -> Result<(), NatError> {
    nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

/// True if the table is installed.
pub fn is_enabled() -> bool {
    Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_bridge_subnet_and_metadata() {
        let r = ruleset("swg-br0", &Subnet::default_pool());
        assert!(r.contains("ip saddr 10.0.4.0/24 oifname != \"swg-br0\" masquerade"));
        assert!(r.contains("ip daddr 169.254.169.254 drop"));
    }
}
