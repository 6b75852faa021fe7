//! From an app's resources to Firecracker's machine configuration, the guest kernel's boot
//! arguments, and the guest's MAC address. Pure: no I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::host::HostKind;
use crate::resources::ResourceSpec;

const MIB: u64 = 1 << 20;

/// Bounds a host puts on a VM's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineLimits {
    /// Most vCPUs one VM may get (Firecracker allows 32; nested hosts here boot only 1).
    pub max_vcpus: u8,
    /// Least memory a VM may get, in MiB.
    pub min_mem_mib: u64,
}

impl MachineLimits {
    /// Limits that follow from the host kind: on an emulated (kvm_pvm) host a guest with
    /// more than one vCPU hangs while bringing up secondary CPUs (GUEST.md).
    pub fn for_host(kind: HostKind) -> MachineLimits {
        MachineLimits {
            max_vcpus: match kind {
                HostKind::Hardware => 32,
                HostKind::NestedEmulated => 1,
            },
            min_mem_mib: 64,
        }
    }
}

/// Firecracker's `PUT /machine-config` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
}

/// A machine configuration together with what was changed to fit the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachinePlan {
    pub config: MachineConfig,
    /// Set when the requested vCPUs were lowered to the host's maximum: (requested, given).
    pub vcpus_capped: Option<(u64, u8)>,
}

/// Why resources cannot become a machine configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("resources.memory: {bytes} bytes is not a whole number of MiB")]
    MemoryNotWholeMib { bytes: u64 },
    #[error("resources.memory: {mib} MiB is below the minimum of {min} MiB")]
    MemoryTooSmall { mib: u64, min: u64 },
}

/// `vcpu_count = ceil(cpu_milli / 1000)`, at least 1, at most `limits.max_vcpus`;
/// `mem_size_mib = memory_bytes / MiB`, which must be whole and at least the minimum.
pub fn machine_config(
    spec: &ResourceSpec,
    limits: &MachineLimits,
) -> Result<MachinePlan, ConfigError> {
    if spec.memory_bytes % MIB != 0 {
        return Err(ConfigError::MemoryNotWholeMib {
            bytes: spec.memory_bytes,
        });
    }
    let mem_size_mib = spec.memory_bytes / MIB;
    if mem_size_mib < limits.min_mem_mib {
        return Err(ConfigError::MemoryTooSmall {
            mib: mem_size_mib,
            min: limits.min_mem_mib,
        });
    }
    let wanted = spec.cpu_milli.div_ceil(1000).max(1);
    let max = u64::from(limits.max_vcpus.max(1));
    let vcpu_count = wanted.min(max) as u8;
    Ok(MachinePlan {
        config: MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt: false,
        },
        vcpus_capped: (wanted > max).then_some((wanted, vcpu_count)),
    })
}

/// The guest MAC for a VM: deterministic in the whole id, locally administered, unicast.
/// 46 of its 48 bits come from a SHA-256 of the id's 16 bytes.
pub fn generate_mac(vm_id: Uuid) -> String {
    let hash = Sha256::digest(vm_id.as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&hash[..6]);
    mac[0] = (mac[0] & 0b1111_1100) | 0b0000_0010;
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Kernel arguments both host kinds share: serial console, reboot = VMM exit, no PCI.
const BASE_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Arguments an emulated (kvm_pvm) host needs: hide the CPU features its instruction
/// emulator mishandles and use the jiffies clock (GUEST.md, "Boot arguments").
const EMULATED_BOOT_ARGS: &str = "noxsave no-kvmclock tsc=unstable \
clearcpuid=151,141,158,306,288,308,534,59,298,515,516,114";

/// The guest kernel command line for a host kind. `quiet` saves boot time where the
/// serial console is emulated; `extra` is appended as given (e.g. `ip=` or `init=`).
pub fn boot_args(kind: HostKind, quiet: bool, extra: &str) -> String {
    let mut args = String::from(BASE_BOOT_ARGS);
    if kind == HostKind::NestedEmulated {
        args.push(' ');
        args.push_str(EMULATED_BOOT_ARGS);
    }
    if quiet {
        args.push_str(" quiet");
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        args.push(' ');
        args.push_str(extra);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn hw() -> MachineLimits {
        MachineLimits::for_host(HostKind::Hardware)
    }

    #[test]
    fn tc_u1_resource_spec_to_machine_config() {
        let spec = ResourceSpec {
            cpu_milli: 500,
            memory_bytes: 536_870_912,
            disk_bytes: 1 << 30,
        };
        let plan = machine_config(&spec, &hw()).expect("valid spec");
        assert_eq!(plan.config.vcpu_count, 1);
        assert_eq!(plan.config.mem_size_mib, 512);
        assert_eq!(plan.vcpus_capped, None);
    }

    #[test]
    fn tc_u1_vcpus_round_up_and_cap() {
        let mut spec = ResourceSpec {
            cpu_milli: 1001,
            ..ResourceSpec::default()
        };
        assert_eq!(machine_config(&spec, &hw()).unwrap().config.vcpu_count, 2);
        spec.cpu_milli = 64_000;
        let plan = machine_config(&spec, &hw()).unwrap();
        assert_eq!(plan.config.vcpu_count, 32);
        assert_eq!(plan.vcpus_capped, Some((64, 32)));
        spec.cpu_milli = 2000;
        let nested = MachineLimits::for_host(HostKind::NestedEmulated);
        let plan = machine_config(&spec, &nested).unwrap();
        assert_eq!(plan.config.vcpu_count, 1);
        assert_eq!(plan.vcpus_capped, Some((2, 1)));
    }

    #[test]
    fn tc_u1_memory_must_be_whole_mib_and_above_minimum() {
        let mut spec = ResourceSpec {
            memory_bytes: 128_000_000,
            ..ResourceSpec::default()
        };
        let err = machine_config(&spec, &hw()).unwrap_err();
        assert_eq!(err, ConfigError::MemoryNotWholeMib { bytes: 128_000_000 });
        assert!(err.to_string().contains("resources.memory"));
        spec.memory_bytes = 32 << 20;
        assert_eq!(
            machine_config(&spec, &hw()).unwrap_err(),
            ConfigError::MemoryTooSmall { mib: 32, min: 64 }
        );
    }

    fn mac_bytes(mac: &str) -> Vec<u8> {
        mac.split(':')
            .map(|p| u8::from_str_radix(p, 16).expect("hex octet"))
            .collect()
    }

    #[test]
    fn tc_u3_mac_is_stable_for_a_known_id() {
        // A fixed id must give this exact string in every process and on every build:
        // TAPs and guests are configured from it. The literal was computed independently
        // (SHA-256 of the id's 16 bytes, first six octets, low bits of octet 0 = 0b10).
        let id = Uuid::parse_str("6f1e3c1a-2b4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        assert_eq!(generate_mac(id), "9a:7d:10:fb:2b:15");
        assert_eq!(generate_mac(id), generate_mac(id));
    }

    #[test]
    fn tc_u3_no_duplicate_in_100k_random_ids() {
        let mut seen = HashSet::with_capacity(100_000);
        for _ in 0..100_000 {
            let mac = generate_mac(Uuid::new_v4());
            assert!(seen.insert(mac.clone()), "duplicate MAC {mac}");
        }
    }

    proptest! {
        #[test]
        fn tc_u3_mac_bit_rules(raw in any::<u128>()) {
            let id = Uuid::from_u128(raw);
            let mac = generate_mac(id);
            prop_assert_eq!(mac.len(), 17);
            prop_assert_eq!(&mac, &mac.to_lowercase());
            let bytes = mac_bytes(&mac);
            prop_assert_eq!(bytes.len(), 6);
            prop_assert!(bytes[0] & 0b10 != 0, "locally administered bit clear in {}", mac);
            prop_assert!(bytes[0] & 0b01 == 0, "multicast bit set in {}", mac);
            prop_assert_eq!(generate_mac(id), mac);
        }

        #[test]
        fn tc_u3_mac_depends_on_every_byte(raw in any::<u128>(), bit in 0u32..128) {
            // Flipping any single bit of the id changes the MAC (SHA-256 over all 16 bytes).
            let a = generate_mac(Uuid::from_u128(raw));
            let b = generate_mac(Uuid::from_u128(raw ^ (1u128 << bit)));
            prop_assert_ne!(a, b);
        }

        #[test]
        fn tc_u1_vcpu_formula(cpu in 1u64..100_000, mib in 64u64..65_536, max in 1u8..=32) {
            let spec = ResourceSpec { cpu_milli: cpu, memory_bytes: mib << 20, disk_bytes: 1 };
            let limits = MachineLimits { max_vcpus: max, min_mem_mib: 64 };
            let plan = machine_config(&spec, &limits).unwrap();
            let want = cpu.div_ceil(1000);
            prop_assert_eq!(u64::from(plan.config.vcpu_count), want.min(u64::from(max)));
            prop_assert!(plan.config.vcpu_count >= 1);
            prop_assert_eq!(plan.config.mem_size_mib, mib);
        }
    }

    #[test]
    fn boot_args_follow_host_kind() {
        let hw = boot_args(HostKind::Hardware, false, "ip=dhcp");
        assert_eq!(hw, "console=ttyS0 reboot=k panic=1 pci=off ip=dhcp");
        let nested = boot_args(HostKind::NestedEmulated, true, "");
        assert!(nested.contains("no-kvmclock") && nested.contains("clearcpuid="));
        assert!(nested.ends_with(" quiet"));
    }
}

/// Where a VM's pieces are, for [`guest_vm_config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    pub kernel: String,
    pub initrd: String,
    /// The root drive as Firecracker opens it (relative paths resolve in the VM's
    /// runtime directory, which is what lets snapshot clones use their own disks).
    pub root_drive: String,
    /// The vsock socket, likewise (relative = per VM).
    pub vsock: String,
    /// TAP and MAC of eth0, if the VM has a network.
    pub nic: Option<(String, String)>,
}

/// The Firecracker configuration of a VM that runs the ShellWeGo guest init: the init
/// comes from the initramfs, the app's root is the `rootfs` drive (`/dev/vda`, mounted
/// by the init at `run`), `eth0` is the TAP, and the init listens on vsock CID 3.
pub fn guest_vm_config(
    vm_id: &str,
    machine: MachineConfig,
    kind: HostKind,
    layout: &GuestLayout,
) -> super::MicrovmConfig {
    use super::models::{BootSource, Drive, NetworkInterface, Vsock};
    super::MicrovmConfig {
        vm_id: vm_id.to_string(),
        machine,
        boot: BootSource {
            kernel_image_path: layout.kernel.clone(),
            initrd_path: Some(layout.initrd.clone()),
            boot_args: Some(boot_args(
                kind,
                kind == HostKind::NestedEmulated,
                "rdinit=/init",
            )),
        },
        drives: vec![Drive {
            drive_id: "rootfs".into(),
            path_on_host: layout.root_drive.clone(),
            is_root_device: false,
            is_read_only: false,
            rate_limiter: None,
        }],
        network: layout
            .nic
            .iter()
            .map(|(tap, mac)| NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: tap.clone(),
                guest_mac: Some(mac.clone()),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect(),
        vsock: Some(Vsock {
            guest_cid: GUEST_CID,
            uds_path: layout.vsock.clone(),
        }),
        netns: None,
        links: vec![],
        cpu_milli: None,
    }
}

/// The guest's vsock CID (every VM has its own vsock device, so one CID serves all).
pub const GUEST_CID: u32 = 3;
