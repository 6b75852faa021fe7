//! Persistent TAP devices made with the tun ioctls (this kernel refuses TAPs over
//! netlink): `TUNSETIFF` (TAP, no packet info, vnet header as Firecracker expects),
//! `TUNSETOWNER`, `TUNSETPERSIST`. The device stays after the descriptor closes, with no
//! carrier until Firecracker opens it.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::io::AsRawFd;

use crate::link::{check_name, LinkError};

// From linux/if_tun.h.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(transparent)]
    Name(#[from] LinkError),
    #[error("creating TAP {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Creates (or reopens) the persistent TAP `name`, owned by `uid`.
pub fn create_tap(name: &str, uid: u32) -> Result<(), TapError> {
    check_name(name)?;
    let err = |what: &'static str| {
        let name = name.to_string();
        move |source| TapError::Ioctl {
            name: name.clone(),
            what,
            source,
        }
    };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(err("opening /dev/net/tun (modprobe tun)"))?;
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    let fd = tun.as_raw_fd();
    // SAFETY: tun ioctls on an open /dev/net/tun descriptor with a valid ifreq/integers.
    unsafe {
        if libc::ioctl(fd, TUNSETIFF as _, &mut req) < 0 {
            return Err(err("TUNSETIFF")(io::Error::last_os_error()));
        }
        if libc::ioctl(fd, TUNSETOWNER as _, uid as libc::c_ulong) < 0 {
            return Err(err("TUNSETOWNER")(io::Error::last_os_error()));
        }
        if libc::ioctl(fd, TUNSETPERSIST as _, 1 as libc::c_ulong) < 0 {
            return Err(err("TUNSETPERSIST")(io::Error::last_os_error()));
        }
    }
    Ok(())
}
