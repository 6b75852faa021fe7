//! ShellWeGo's host networking: the bridge and per-VM TAPs (`link`, `tap`), persistent
//! IPAM (`ipam`), egress NAT with nftables (`nat`), the nftables fence of every VM
//! (`fence`: anti-spoofing, app isolation, host protection, egress policy), eBPF + HTB
//! bandwidth QoS (`qos`), and `CniNetwork`, which puts them together per VM (`cni`).

pub mod cni;
pub mod fence;
pub mod ipam;
pub mod link;
pub mod nat;
pub mod nft;
pub mod qos;
pub mod tap;

pub use cni::{CniNetwork, NetError, NetworkConfig, Tenant, VmNetwork};
pub use ipam::{Ipam, Subnet};
