//! Per-VM bandwidth QoS: eBPF classifies, HTB shapes.
//!
//! Download (to the VM) leaves the host through the TAP's egress; upload (from the VM)
//! enters through the TAP's ingress. Per VM:
//! ```text
//! TAP  clsact egress : qos.bpf (mark 1:10)          -> TAP root htb 1:, class 1:10 = download rate
//! TAP  clsact ingress: qos.bpf (mark 1:10, redirect) -> IFB root htb 1:, class 1:10 = upload rate
//! ```
//! The rates change live (`tc class change`); the BPF maps hold the marking config and
//! per-direction byte/packet counters. On kernels with `fq` an EDT path (BPF setting
//! `skb->tstamp`) would avoid HTB's qdisc lock; this kernel has no `fq`, so HTB it is.
//!
//! The loaded programs live as long as the [`VmQos`] value; dropping it detaches them.

use std::process::Command;

use aya::maps::{Array, PerCpuArray};
use aya::programs::tc::{self, SchedClassifier, TcAttachType};
use aya::Ebpf;

use crate::link::check_name;

/// ELF parsing needs the object 8-byte aligned; `include_bytes!` alone guarantees 1.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static PROGRAM_ALIGNED: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/qos.bpf.o")));
static PROGRAM: &[u8] = &PROGRAM_ALIGNED.0;

/// The HTB class (1:10) the program marks packets for.
const CLASS_ID: &str = "1:10";
const PRIORITY: u32 = (1 << 16) | 0x10;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct QosConfig {
    enabled: u32,
    priority: u32,
    redirect_ifindex: u32,
    pad: u32,
}
// SAFETY: plain-old-data with no padding holes (four u32).
unsafe impl aya::Pod for QosConfig {}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct QosCounters {
    bytes: u64,
    packets: u64,
}
// SAFETY: plain-old-data (two u64).
unsafe impl aya::Pod for QosCounters {}

#[derive(Debug, thiserror::Error)]
pub enum QosError {
    #[error("eBPF: {0}")]
    Bpf(String),
    #[error("`tc {args}` failed: {stderr}")]
    Tc { args: String, stderr: String },
    #[error("cannot run tc (apt-get install iproute2): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("`{cmd}` did not finish within {limit:?} and was killed")]
    TimedOut {
        cmd: String,
        limit: std::time::Duration,
    },
    #[error(transparent)]
    Name(#[from] crate::link::LinkError),
    #[error("rate must be at least 8 kbit/s, got {0} bit/s")]
    BadRate(u64),
}

/// Bandwidth limits in bits per second; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub download_bps: Option<u64>,
    pub upload_bps: Option<u64>,
}

/// Bytes and packets one direction has carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes: u64,
    pub packets: u64,
}

/// How long one `tc` run may take: it changes one qdisc or class, which the kernel does at
/// once; a `tc` still running after this is stuck.
pub const TC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn run_tc(args: &[&str]) -> Result<std::process::Output, QosError> {
    use shellwego_sys::command::{output_within, CommandError};
    output_within(Command::new("tc").args(args), None, TC_TIMEOUT).map_err(|e| match e {
        CommandError::TimedOut { cmd, limit } => QosError::TimedOut { cmd, limit },
        CommandError::Spawn { source, .. } | CommandError::Io { source, .. } => {
            QosError::Spawn(source)
        }
    })
}

fn tc(args: &[&str]) -> Result<(), QosError> {
    let out = run_tc(args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(QosError::Tc {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `tc` ignoring "nothing to delete" failures (teardown of a half-built setup).
fn tc_quiet(args: &[&str]) {
    let _ = run_tc(args);
}

/// HTB burst for a rate: at least one 100 ms worth of bytes, and 32 KiB.
fn burst_bytes(rate_bps: u64) -> u64 {
    (rate_bps / 8 / 10).max(32 * 1024)
}

fn set_htb_class(dev: &str, rate_bps: u64, verb: &str) -> Result<(), QosError> {
    if rate_bps < 8_000 {
        return Err(QosError::BadRate(rate_bps));
    }
    let rate = format!("{rate_bps}bit");
    let burst = burst_bytes(rate_bps).to_string();
    tc(&[
        "class", verb, "dev", dev, "parent", "1:", "classid", CLASS_ID, "htb", "rate", &rate,
        "ceil", &rate, "burst", &burst, "cburst", &burst,
    ])
}

fn ensure_htb_root(dev: &str) -> Result<(), QosError> {
    // `default 0`: unmarked traffic bypasses the classes (unshaped).
    tc(&[
        "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "0",
    ])
}

fn ifindex(name: &str) -> Result<u32, QosError> {
    let c =
        std::ffi::CString::new(name).map_err(|_| QosError::Bpf(format!("bad name {name:?}")))?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(QosError::Bpf(format!("no interface {name}")))
    } else {
        Ok(idx)
    }
}

/// One loaded and attached program instance.
struct Attached {
    ebpf: Ebpf,
}

impl Attached {
    fn load(dev: &str, direction: TcAttachType, config: QosConfig) -> Result<Attached, QosError> {
        let bpf = |e: &dyn std::fmt::Display| QosError::Bpf(format!("{dev}: {e}"));
        let mut ebpf = Ebpf::load(PROGRAM).map_err(|e| bpf(&e))?;
        {
            let mut cfg: Array<_, QosConfig> = Array::try_from(
                ebpf.map_mut("config")
                    .ok_or_else(|| bpf(&"map config missing"))?,
            )
            .map_err(|e| bpf(&e))?;
            cfg.set(0, config, 0).map_err(|e| bpf(&e))?;
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut("qos")
            .ok_or_else(|| bpf(&"program qos missing"))?
            .try_into()
            .map_err(|e| bpf(&e))?;
        prog.load().map_err(|e| bpf(&e))?;
        prog.attach(dev, direction).map_err(|e| bpf(&e))?;
        Ok(Attached { ebpf })
    }

    fn set_config(&mut self, config: QosConfig) -> Result<(), QosError> {
        let map = self
            .ebpf
            .map_mut("config")
            .ok_or_else(|| QosError::Bpf("map config missing".into()))?;
        let mut cfg: Array<_, QosConfig> =
            Array::try_from(map).map_err(|e| QosError::Bpf(e.to_string()))?;
        cfg.set(0, config, 0)
            .map_err(|e| QosError::Bpf(e.to_string()))
    }

    fn counters(&self) -> Result<Counters, QosError> {
        let map = self
            .ebpf
            .map("counters")
            .ok_or_else(|| QosError::Bpf("map counters missing".into()))?;
        let arr: PerCpuArray<_, QosCounters> =
            PerCpuArray::try_from(map).map_err(|e| QosError::Bpf(e.to_string()))?;
        let values = arr.get(&0, 0).map_err(|e| QosError::Bpf(e.to_string()))?;
        Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
            bytes: acc.bytes + c.bytes,
            packets: acc.packets + c.packets,
        }))
    }
}

/// The QoS of one VM's port (a TAP, or any interface standing in for one).
pub struct VmQos {
    dev: String,
    ifb: String,
    limits: Limits,
    egress: Attached,
    ingress: Attached,
}

impl VmQos {
    /// Sets up QoS on `dev` with the IFB `ifb` (created by the caller) for the upload
    /// direction. Replaces whatever QoS the device had.
    pub fn attach(dev: &str, ifb: &str, limits: Limits) -> Result<VmQos, QosError> {
        check_name(dev)?;
        check_name(ifb)?;
        remove(dev, Some(ifb));
        tc::qdisc_add_clsact(dev).map_err(|e| QosError::Bpf(format!("clsact on {dev}: {e}")))?;
        ensure_htb_root(dev)?;
        ensure_htb_root(ifb)?;
        let ifb_index = ifindex(ifb)?;
        let (down, up) = configs(limits, ifb_index);
        if let Some(rate) = limits.download_bps {
            set_htb_class(dev, rate, "replace")?;
        }
        if let Some(rate) = limits.upload_bps {
            set_htb_class(ifb, rate, "replace")?;
        }
        let egress = Attached::load(dev, TcAttachType::Egress, down)?;
        let ingress = Attached::load(dev, TcAttachType::Ingress, up)?;
        Ok(VmQos {
            dev: dev.to_string(),
            ifb: ifb.to_string(),
            limits,
            egress,
            ingress,
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes the limits live.
    pub fn set_limits(&mut self, limits: Limits) -> Result<(), QosError> {
        let ifb_index = ifindex(&self.ifb)?;
        for (dev, old, new) in [
            (
                self.dev.clone(),
                self.limits.download_bps,
                limits.download_bps,
            ),
            (self.ifb.clone(), self.limits.upload_bps, limits.upload_bps),
        ] {
            match (old, new) {
                (_, Some(rate)) => {
                    set_htb_class(&dev, rate, if old.is_some() { "change" } else { "replace" })?
                }
                (Some(_), None) => tc_quiet(&["class", "del", "dev", &dev, "classid", CLASS_ID]),
                (None, None) => {}
            }
        }
        let (down, up) = configs(limits, ifb_index);
        self.egress.set_config(down)?;
        self.ingress.set_config(up)?;
        self.limits = limits;
        Ok(())
    }

    /// (download, upload) counters from the BPF maps.
    pub fn counters(&self) -> Result<(Counters, Counters), QosError> {
        Ok((self.egress.counters()?, self.ingress.counters()?))
    }

    /// Detaches the programs and removes the qdiscs.
    pub fn detach(self) {
        let (dev, ifb) = (self.dev.clone(), self.ifb.clone());
        drop(self);
        remove(&dev, Some(&ifb));
    }
}

/// Marking configs for (egress, ingress). Unlimited directions only count.
fn configs(limits: Limits, ifb_index: u32) -> (QosConfig, QosConfig) {
    let down = QosConfig {
        enabled: u32::from(limits.download_bps.is_some()),
        priority: PRIORITY,
        redirect_ifindex: 0,
        pad: 0,
    };
    let up = QosConfig {
        enabled: u32::from(limits.upload_bps.is_some()),
        priority: PRIORITY,
        redirect_ifindex: ifb_index,
        pad: 0,
    };
    (down, up)
}

/// Removes QoS qdiscs (and with them every BPF filter) from a device and its IFB's root
/// qdisc; idempotent, works on a half-built setup.
pub fn remove(dev: &str, ifb: Option<&str>) {
    tc_quiet(&["qdisc", "del", "dev", dev, "clsact"]);
    tc_quiet(&["qdisc", "del", "dev", dev, "root"]);
    if let Some(ifb) = ifb {
        tc_quiet(&["qdisc", "del", "dev", ifb, "root"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_is_embedded_and_configs_follow_limits() {
        assert!(PROGRAM.starts_with(b"\x7fELF"));
        let (down, up) = configs(
            Limits {
                download_bps: Some(1),
                upload_bps: None,
            },
            7,
        );
        assert_eq!((down.enabled, up.enabled, up.redirect_ifindex), (1, 0, 7));
        assert_eq!(burst_bytes(50_000_000), 625_000);
    }
}
