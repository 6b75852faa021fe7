//! The network fence of every VM: nftables rules that let a guest send only as itself,
//! reach only its own app's VMs on the bridge, nothing on the host but replies, and
//! beyond the host only what its egress policy allows. `rules` explains the tables;
//! this module applies them with the `nft` command.
//!
//! Every change is one nft transaction (`nft -f -`): a VM's fence is installed, replaced
//! or removed whole, never half. Changes are serialized in this process, and each one
//! reads what the kernel holds first, so re-applying after an agent restart, over a
//! half-built fence, or twice, converges on the same rules. Only the project's own
//! tables (`bridge shellwego_fence`, `inet shellwego_fence`) are ever touched.
//!
//! Every call acts in the calling thread's network namespace.

pub mod policy;
pub mod rules;
pub mod state;

use std::sync::Mutex;

use tracing::{debug, info, warn};

pub use policy::{AllowListError, AllowRule, Cidr, Egress, EgressPolicy};
pub use rules::{BadInput, FenceBase, Mac, VmFence, TABLE};
pub use state::FenceState;

use crate::nft::{self, NftError};

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error(transparent)]
    BadInput(#[from] BadInput),
    #[error("network fence of {tap}: {source}")]
    Vm {
        tap: String,
        #[source]
        source: NftError,
    },
    #[error("network fence tables: {0}")]
    Base(#[source] NftError),
}

/// Reads both tables as the kernel holds them.
pub fn read_state() -> Result<FenceState, NftError> {
    let bridge = nft::list_table("bridge", TABLE)?;
    let inet = nft::list_table("inet", TABLE)?;
    Ok(FenceState {
        bridge: state::TableState::parse(bridge.as_ref())?,
        inet: state::TableState::parse(inet.as_ref())?,
    })
}

/// Removes both fence tables: every VM's fence with them. For uninstalling and tests;
/// the agent never does this (running VMs would be left open).
pub fn remove_all() -> Result<(), FenceError> {
    nft::apply(&rules::teardown_all_script()).map_err(FenceError::Base)
}

/// The fence of one bridge.
pub struct Fence {
    base: FenceBase,
    lock: Mutex<()>,
}

impl Fence {
    pub fn new(base: FenceBase) -> Fence {
        Fence {
            base,
            lock: Mutex::new(()),
        }
    }

    pub fn base(&self) -> &FenceBase {
        &self.base
    }

    /// Installs the tables and their shared rules (idempotent; VMs' fences stay). From
    /// then on a VM port without a fence of its own sends nothing.
    pub fn ensure(&self) -> Result<(), FenceError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        nft::apply(&rules::base_script(&self.base)).map_err(FenceError::Base)
    }

    /// Installs or replaces the fence of one VM (the tables too, if missing).
    pub fn apply(&self, vm: &VmFence) -> Result<(), FenceError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let err = |source| FenceError::Vm {
            tap: vm.tap.clone(),
            source,
        };
        let state = read_state().map_err(err)?;
        nft::apply(&rules::vm_script(&self.base, vm, &state)).map_err(err)?;
        info!(
            tap = %vm.tap, mac = %vm.mac, ip = %vm.ip, app = %vm.app,
            egress = %vm.policy.egress, allow = vm.policy.allow.len(),
            "network fence in place"
        );
        Ok(())
    }

    /// Removes whatever exists of the fence of `tap`. Idempotent. The port, if it still
    /// exists, is then dropped like any port without a fence.
    pub fn remove(&self, tap: &str) -> Result<(), FenceError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let err = |source| FenceError::Vm {
            tap: tap.to_string(),
            source,
        };
        let state = read_state().map_err(err)?;
        if let Some(script) = rules::removal_script(tap, &state) {
            nft::apply(&script).map_err(err)?;
            debug!(%tap, "network fence removed");
        }
        if let Some(script) = rules::emptied_sets_script(tap, &state) {
            if let Err(e) = nft::apply(&script) {
                warn!(%tap, error = %e, "could not remove an app's emptied port set");
            }
        }
        Ok(())
    }
}
