//! IP address management that survives restarts: one lease per VM id in a JSON file under
//! the data dir, changed only under an exclusive `flock` and written atomically, so
//! concurrent requests (threads or processes) never get the same address.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// An IPv4 subnet with its gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

impl Subnet {
    /// 10.0.4.0/24 with gateway 10.0.4.1.
    pub fn default_pool() -> Subnet {
        Subnet {
            network: Ipv4Addr::new(10, 0, 4, 0),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 4, 1),
        }
    }

    fn mask(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network) & self.mask()
    }

    /// Checks the subnet makes sense: a network address, a gateway inside it, room for hosts.
    pub fn validate(&self) -> Result<(), IpamError> {
        let bad = |reason: &str| {
            IpamError::BadSubnet(format!("{}/{}: {reason}", self.network, self.prefix_len))
        };
        if self.prefix_len > 30 {
            return Err(bad("prefix must be at most /30"));
        }
        if u32::from(self.network) & !self.mask() != 0 {
            return Err(bad("not a network address (host bits set)"));
        }
        if !self.contains(self.gateway)
            || self.gateway == self.network
            || self.gateway == self.broadcast()
        {
            return Err(bad(&format!(
                "gateway {} is not a host of the subnet",
                self.gateway
            )));
        }
        Ok(())
    }

    /// The CIDR string of the gateway on the bridge, e.g. "10.0.4.1/24".
    pub fn gateway_cidr(&self) -> String {
        format!("{}/{}", self.gateway, self.prefix_len)
    }
}

/// The lowest address of the subnet that is neither network, gateway, broadcast nor used.
pub fn next_free<'a>(
    subnet: &Subnet,
    used: impl IntoIterator<Item = &'a Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let used: std::collections::HashSet<u32> = used.into_iter().map(|ip| u32::from(*ip)).collect();
    let first = u32::from(subnet.network) + 1;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    (first..=last)
        .filter(|ip| *ip != u32::from(subnet.gateway))
        .find(|ip| !used.contains(ip))
        .map(Ipv4Addr::from)
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("address pool {0} is full: release a VM's lease or use a larger subnet")]
    Exhausted(String),
    #[error("invalid subnet {0}")]
    BadSubnet(String),
    #[error(
        "lease file {path} was made for subnet {found}, not {expected}; move it away to start over"
    )]
    SubnetMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("lease file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lease file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseFile {
    subnet: Subnet,
    leases: BTreeMap<String, Ipv4Addr>,
}

/// The persistent pool.
pub struct Ipam {
    subnet: Subnet,
    path: PathBuf,
    lock_path: PathBuf,
    in_process: Mutex<()>,
}

impl Ipam {
    /// Opens (creating) the pool whose leases live in `dir/leases.json`.
    pub fn open(dir: &Path, subnet: Subnet) -> Result<Ipam, IpamError> {
        subnet.validate()?;
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IpamError::Io {
                path: path.clone(),
                source,
            }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ipam = Ipam {
            subnet,
            path: dir.join("leases.json"),
            lock_path: dir.join("leases.lock"),
            in_process: Mutex::new(()),
        };
        ipam.with_leases(|_| Ok(()))?;
        Ok(ipam)
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    fn io(&self, source: io::Error) -> IpamError {
        IpamError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` on the leases under both locks and saves them if `f` changed them.
    fn with_leases<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Ipv4Addr>) -> Result<T, IpamError>,
    ) -> Result<T, IpamError> {
        let _guard = self.in_process.lock().unwrap_or_else(|e| e.into_inner());
        let _lock =
            shellwego_sys::lock::FileLock::exclusive(&self.lock_path).map_err(|e| self.io(e))?;
        let mut file = match fs::read(&self.path) {
            Ok(bytes) => {
                serde_json::from_slice::<LeaseFile>(&bytes).map_err(|e| IpamError::Corrupt {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => LeaseFile {
                subnet: self.subnet,
                leases: BTreeMap::new(),
            },
            Err(e) => return Err(self.io(e)),
        };
        if file.subnet != self.subnet {
            return Err(IpamError::SubnetMismatch {
                path: self.path.clone(),
                found: format!("{}/{}", file.subnet.network, file.subnet.prefix_len),
                expected: format!("{}/{}", self.subnet.network, self.subnet.prefix_len),
            });
        }
        let before = file.leases.clone();
        let result = f(&mut file.leases)?;
        if file.leases != before || !self.path.exists() {
            let json =
                serde_json::to_vec_pretty(&file).map_err(|e| self.io(io::Error::other(e)))?;
            shellwego_sys::atomic::write_file(&self.path, &json).map_err(|e| self.io(e))?;
        }
        Ok(result)
    }

    /// The VM's address: its existing lease, or the lowest free one.
    pub fn allocate(&self, vm_id: &str) -> Result<Ipv4Addr, IpamError> {
        let subnet = self.subnet;
        self.with_leases(|leases| {
            if let Some(ip) = leases.get(vm_id) {
                return Ok(*ip);
            }
            let ip = next_free(&subnet, leases.values()).ok_or_else(|| {
                IpamError::Exhausted(format!("{}/{}", subnet.network, subnet.prefix_len))
            })?;
            leases.insert(vm_id.to_string(), ip);
            Ok(ip)
        })
    }

    /// Frees the VM's lease; releasing twice is fine. Returns the freed address.
    pub fn release(&self, vm_id: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        self.with_leases(|leases| Ok(leases.remove(vm_id)))
    }

    /// All leases, by VM id.
    pub fn leases(&self) -> Result<BTreeMap<String, Ipv4Addr>, IpamError> {
        self.with_leases(|leases| Ok(leases.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_lease_is_dot_two() {
        let s = Subnet::default_pool();
        assert_eq!(next_free(&s, []), Some(Ipv4Addr::new(10, 0, 4, 2)));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 0, 4, 255));
    }

    #[test]
    fn leases_persist_across_opens_under_the_shared_lock_and_atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ipam::open(dir.path(), Subnet::default_pool()).unwrap();
        let ip = a.allocate("vm-a").unwrap();
        assert_eq!(a.allocate("vm-a").unwrap(), ip);
        let b = Ipam::open(dir.path(), Subnet::default_pool()).unwrap();
        assert_ne!(b.allocate("vm-b").unwrap(), ip);
        assert_eq!(a.leases().unwrap().len(), 2);
        assert_eq!(b.release("vm-a").unwrap(), Some(ip));
        assert_eq!(a.release("vm-a").unwrap(), None);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["leases.json", "leases.lock"], "no temp file left");
    }

    #[test]
    fn bad_subnets_are_refused() {
        let mut s = Subnet::default_pool();
        s.network = Ipv4Addr::new(10, 0, 4, 7);
        assert!(s.validate().is_err());
        let mut s = Subnet::default_pool();
        s.gateway = Ipv4Addr::new(10, 0, 5, 1);
        assert!(s.validate().unwrap_err().to_string().contains("gateway"));
    }

    proptest! {
        #[test]
        fn never_network_gateway_broadcast_or_used(prefix in 24u8..=30, used_count in 0usize..300) {
            let s = Subnet { network: Ipv4Addr::new(10, 9, 0, 0), prefix_len: prefix, gateway: Ipv4Addr::new(10, 9, 0, 1) };
            let mut used = Vec::new();
            for _ in 0..used_count {
                match next_free(&s, &used) {
                    Some(ip) => {
                        prop_assert!(s.contains(ip));
                        prop_assert!(ip != s.network && ip != s.gateway && ip != s.broadcast());
                        prop_assert!(!used.contains(&ip));
                        used.push(ip);
                    }
                    None => {
                        let hosts = (1u32 << (32 - u32::from(prefix))) - 3;
                        prop_assert_eq!(used.len() as u32, hosts);
                        break;
                    }
                }
            }
        }
    }
}
