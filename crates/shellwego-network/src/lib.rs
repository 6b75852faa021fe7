//! ShellWeGo's host networking: the bridge and per-VM TAPs (`link`, `tap`), persistent
//! IPAM (`ipam`), egress NAT with nftables (`nat`), eBPF + HTB bandwidth QoS (`qos`),
//! and `CniNetwork`, which puts them together per VM (`cni`).

pub mod cni;
pub mod ipam;
pub mod link;
pub mod nat;
pub mod qos;
pub mod tap;

pub use cni::{CniNetwork, NetError, NetworkConfig, VmNetwork};
pub use ipam::{Ipam, Subnet};
