//! `CniNetwork`: everything a VM needs on the host side of its network.
//!
//! The bridge (default `swg-br0`, gateway 10.0.4.1/24) is ensured idempotently: an
//! agent restart never flushes its addresses or detaches running VMs' TAPs. With it come
//! the fence's tables, so a VM port (name prefix `swg`) without a fence of its own sends
//! nothing. Per VM: a lease from the persistent IPAM, its network fence (installed
//! before its TAP exists), a persistent TAP named from the VM id on the bridge, an IFB
//! for upload shaping, and the eBPF+HTB QoS. Teardown removes all of it and the lease,
//! is idempotent, and works on a half-built setup.
//!
//! Every call acts in the calling thread's network namespace.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;

use crate::fence::{EgressPolicy, Fence, FenceBase, FenceError, VmFence};
use crate::ipam::{Ipam, IpamError, Subnet};
use crate::link::{LinkError, LinkInfo, Netlink};
use crate::qos::{self, Limits, QosError, VmQos};
use crate::tap::{create_tap, TapError};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Qos(#[from] QosError),
    #[error(transparent)]
    Nat(#[from] crate::nat::NatError),
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error("VM {0} has no address lease")]
    NoLease(String),
}

/// The host network's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub bridge: String,
    pub subnet: Subnet,
    /// uid that runs firecracker (owner of the TAPs).
    pub tap_owner: u32,
    /// Masquerade guest traffic leaving the host (nftables).
    pub nat: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "swg-br0".into(),
            subnet: Subnet::default_pool(),
            tap_owner: 0,
            nat: true,
        }
    }
}

/// What Firecracker and the guest need to know of a VM's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNetwork {
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

/// Whose a VM is and what it may reach beyond the host: what its fence is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenant {
    /// VMs of the same app reach each other on the bridge; of other apps, never.
    pub app: String,
    pub policy: EgressPolicy,
}

/// Bridge ports with this name prefix are VMs' (the fence drops any without a fence).
pub const TAP_PREFIX: &str = "swg";

/// The TAP name of a VM: "swg" + the first 12 hex digits of its id (15 characters).
pub fn tap_name(vm_id: &str) -> String {
    let hex: String = vm_id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    format!("{TAP_PREFIX}{hex}")
}

/// The IFB (upload shaping) device of a VM: "swi" + the same 12 hex digits.
pub fn ifb_name(vm_id: &str) -> String {
    let hex: String = vm_id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    format!("swi{hex}")
}

pub struct CniNetwork {
    config: NetworkConfig,
    ipam: Ipam,
    qos: Mutex<HashMap<String, VmQos>>,
    fence: Fence,
}

impl CniNetwork {
    /// Opens the IPAM under `state_dir` (leases survive restarts).
    pub fn new(config: NetworkConfig, state_dir: &Path) -> Result<CniNetwork, NetError> {
        let ipam = Ipam::open(state_dir, config.subnet)?;
        let base =
            FenceBase::new(&config.bridge, config.subnet, TAP_PREFIX).map_err(FenceError::from)?;
        Ok(CniNetwork {
            config,
            ipam,
            qos: Mutex::new(HashMap::new()),
            fence: Fence::new(base),
        })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Ensures the bridge exists, carries the gateway address and is up, the fence's
    /// tables, and (if configured) the NAT table. Never removes anything.
    pub async fn ensure_bridge(&self) -> Result<LinkInfo, NetError> {
        let nl = Netlink::connect()?;
        // The fence first: from here on no VM port sends anything without its own fence.
        self.fence.ensure()?;
        let bridge = nl.ensure_bridge(&self.config.bridge).await?;
        let s = self.config.subnet;
        nl.ensure_address(bridge.index, s.gateway, s.prefix_len)
            .await?;
        nl.set_up(bridge.index).await?;
        if self.config.nat {
            crate::nat::enable(&self.config.bridge, &s)?;
        }
        Ok(nl.require(&self.config.bridge).await?)
    }

    /// Creates the persistent TAP `name` (or keeps it), attached to the bridge and up.
    pub async fn create_tap(&self, name: &str) -> Result<LinkInfo, NetError> {
        let nl = Netlink::connect()?;
        let bridge = nl.require(&self.config.bridge).await?;
        // An existing TAP may be held open by a running firecracker: the tun ioctls would
        // fail with EBUSY, and it needs nothing from them anyway.
        if nl.get(name).await?.is_none() {
            create_tap(name, self.config.tap_owner)?;
        }
        let tap = nl.require(name).await?;
        if tap.controller != Some(bridge.index) {
            nl.enslave(tap.index, bridge.index).await?;
        }
        nl.set_up(tap.index).await?;
        Ok(nl.require(name).await?)
    }

    /// Everything the VM needs: lease, fence, TAP, IFB and QoS. Idempotent per VM id.
    pub async fn setup_vm(
        &self,
        vm_id: &str,
        mac: &str,
        limits: Limits,
        tenant: &Tenant,
    ) -> Result<VmNetwork, NetError> {
        let ip = self.ipam.allocate(vm_id)?;
        let tap = tap_name(vm_id);
        let result = match self.apply_fence(&tap, mac, ip, tenant) {
            Ok(()) => self.setup_links(vm_id, &tap, limits).await,
            Err(e) => Err(e),
        };
        // The address may have been another VM's, with another MAC.
        let result = match result {
            Ok(()) => self.forget_neighbour(ip).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            // Half-built: take it all down again, lease included.
            let _ = self.teardown_vm(vm_id).await;
            return Err(e);
        }
        Ok(VmNetwork {
            tap,
            mac: mac.to_string(),
            ip,
            prefix_len: self.config.subnet.prefix_len,
            gateway: self.config.subnet.gateway,
        })
    }

    /// Forgets what the host remembers of `ip`'s MAC on the bridge.
    async fn forget_neighbour(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        let nl = Netlink::connect()?;
        let bridge = nl.require(&self.config.bridge).await?;
        Ok(nl.forget_neighbour(bridge.index, ip).await?)
    }

    fn apply_fence(
        &self,
        tap: &str,
        mac: &str,
        ip: std::net::Ipv4Addr,
        tenant: &Tenant,
    ) -> Result<(), NetError> {
        let vm =
            VmFence::new(tap, mac, ip, &tenant.app, &tenant.policy).map_err(FenceError::from)?;
        Ok(self.fence.apply(&vm)?)
    }

    /// Re-applies the fence of a VM whose TAP and lease exist (after an agent restart the
    /// rules are still in the kernel; this makes them match the current policy and
    /// rules). Removes nothing on failure.
    pub fn reattach_fence(&self, vm_id: &str, mac: &str, tenant: &Tenant) -> Result<(), NetError> {
        let ip = self
            .ipam
            .leases()?
            .get(vm_id)
            .copied()
            .ok_or_else(|| NetError::NoLease(vm_id.to_string()))?;
        self.apply_fence(&tap_name(vm_id), mac, ip, tenant)
    }

    async fn setup_links(&self, vm_id: &str, tap: &str, limits: Limits) -> Result<(), NetError> {
        self.create_tap(tap).await?;
        self.reattach_qos(vm_id, limits).await
    }

    /// Re-attaches the QoS of a VM whose TAP and lease already exist (after an agent
    /// restart: the loaded programs lived in the old process). Touches nothing else and
    /// removes nothing on failure.
    pub async fn reattach_qos(&self, vm_id: &str, limits: Limits) -> Result<(), NetError> {
        let tap = tap_name(vm_id);
        let nl = Netlink::connect()?;
        nl.require(&tap).await?;
        let ifb = ifb_name(vm_id);
        let ifb_link = nl.ensure_ifb(&ifb).await?;
        nl.set_up(ifb_link.index).await?;
        let previous = self
            .qos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm_id);
        if let Some(old) = previous {
            old.detach();
        }
        let attached = VmQos::attach(&tap, &ifb, limits)?;
        self.qos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm_id.to_string(), attached);
        Ok(())
    }

    /// Changes a VM's bandwidth limits live.
    pub fn set_limits(&self, vm_id: &str, limits: Limits) -> Result<(), NetError> {
        let mut qos = self.qos.lock().unwrap_or_else(|e| e.into_inner());
        match qos.get_mut(vm_id) {
            Some(q) => Ok(q.set_limits(limits)?),
            None => Err(NetError::Link(LinkError::NotFound(tap_name(vm_id)))),
        }
    }

    /// (download, upload) byte and packet counters of a VM, from its BPF maps.
    pub fn counters(&self, vm_id: &str) -> Result<(qos::Counters, qos::Counters), NetError> {
        let qos = self.qos.lock().unwrap_or_else(|e| e.into_inner());
        match qos.get(vm_id) {
            Some(q) => Ok(q.counters()?),
            None => Err(NetError::Link(LinkError::NotFound(tap_name(vm_id)))),
        }
    }

    /// Removes the VM's QoS, IFB, TAP, fence and lease. Idempotent.
    pub async fn teardown_vm(&self, vm_id: &str) -> Result<(), NetError> {
        let tap = tap_name(vm_id);
        let ifb = ifb_name(vm_id);
        let attached = self
            .qos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm_id);
        match attached {
            Some(q) => q.detach(),
            None => qos::remove(&tap, Some(&ifb)),
        }
        let nl = Netlink::connect()?;
        nl.delete(&tap).await?;
        nl.delete(&ifb).await?;
        // After the TAP: it never exists without its fence.
        self.fence.remove(&tap)?;
        self.ipam.release(vm_id)?;
        Ok(())
    }

    /// Removes the NAT table (the bridge itself stays: other VMs or a restart may use it).
    pub fn disable_nat(&self) -> Result<(), NetError> {
        Ok(crate::nat::disable()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_limits() {
        let id = "6f1e3c1a-2b4d-4e5f-8a9b-0c1d2e3f4a5b";
        assert_eq!(tap_name(id), "swg6f1e3c1a2b4d");
        assert_eq!(ifb_name(id), "swi6f1e3c1a2b4d");
        assert!(tap_name(id).len() <= 15);
    }
}
