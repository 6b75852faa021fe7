//! Egress NAT for guests with nftables: one table owned by the project (`ip shellwego`),
//! replaced atomically as a whole and removed cleanly. It masquerades the VM subnet
//! leaving through anything but the bridge, and drops guest traffic to the cloud
//! metadata address 169.254.169.254 (forwarded or to the host itself).

use crate::ipam::Subnet;
use crate::link::check_name;

/// The nftables table this module owns.
pub const TABLE: &str = "shellwego";
const METADATA_IP: &str = "169.254.169.254";

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error(transparent)]
    Nft(#[from] crate::nft::NftError),
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

/// Installs (or replaces) the table and turns on IPv4 forwarding, which NAT needs.
pub fn enable(bridge: &str, subnet: &Subnet) -> Result<(), NatError> {
    check_name(bridge)?;
    // Declaring the table first makes the delete succeed whether or not it existed; the
    // whole script is one transaction.
    let script = format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\n{}",
        ruleset(bridge, subnet)
    );
    crate::nft::apply(&script)?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1").map_err(NatError::Forwarding)
}

/// Removes the table; removing what is not there is fine.
pub fn disable() -> Result<(), NatError> {
    Ok(crate::nft::apply(&format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\n"
    ))?)
}

/// True if the table is installed.
pub fn is_enabled() -> bool {
    crate::nft::has_table("ip", TABLE)
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
