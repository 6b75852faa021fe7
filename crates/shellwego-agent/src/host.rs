//! What kind of virtualization this host offers. Shared by `doctor` and the agent: boot
//! arguments, vCPU limits and time budgets follow from it.

use std::path::Path;

/// How guests run on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostKind {
    /// KVM with hardware virtualization (VMX or SVM): a cold boot takes ~0.1 s.
    Hardware,
    /// KVM through `kvm_pvm` without VMX/SVM: guest kernel code is emulated, a cold boot
    /// takes about a minute and guests need special boot arguments (GUEST.md).
    NestedEmulated,
}

impl HostKind {
    pub fn describe(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware virtualization (VMX/SVM)",
            HostKind::NestedEmulated => {
                "nested KVM through kvm_pvm (guest kernel emulated: cold boot ~1 min, 1 vCPU)"
            }
        }
    }

    /// Factor by which guest-kernel-bound waits (boot, health checks) are stretched.
    pub fn time_factor(self) -> u32 {
        match self {
            HostKind::Hardware => 1,
            HostKind::NestedEmulated => 100,
        }
    }
}

/// Classifies from `/proc/cpuinfo`'s text and whether the `kvm_pvm` module is loaded.
pub fn classify(cpuinfo: &str, kvm_pvm_loaded: bool) -> HostKind {
    let has_hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if kvm_pvm_loaded && !has_hw_virt {
        HostKind::NestedEmulated
    } else if has_hw_virt {
        HostKind::Hardware
    } else if kvm_pvm_loaded {
        HostKind::NestedEmulated
    } else {
        // KVM without VMX/SVM flags visible and without kvm_pvm (e.g. flags hidden by a
        // hypervisor): treat as hardware, the kind that needs nothing special.
        HostKind::Hardware
    }
}

/// Reads this machine's facts and classifies it.
pub fn detect() -> std::io::Result<HostKind> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    Ok(classify(
        &cpuinfo,
        Path::new("/sys/module/kvm_pvm").exists(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_kinds() {
        let vmx = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
        let plain = "processor\t: 0\nflags\t\t: fpu vme sse\n";
        assert_eq!(classify(vmx, false), HostKind::Hardware);
        assert_eq!(classify(plain, true), HostKind::NestedEmulated);
        assert_eq!(classify(vmx, true), HostKind::Hardware);
        assert_eq!(classify(plain, false), HostKind::Hardware);
    }
}
