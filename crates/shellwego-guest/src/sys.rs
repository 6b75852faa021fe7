//! System calls PID 1 needs: mounts, switching into the app's root (and growing it
//! online), identity (hostname, clock, entropy), IPv4 on eth0, and reboot.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

fn c(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// mount(2); `source`/`fstype` may be empty.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    let opt = |x: &CString, empty: bool| if empty { std::ptr::null() } else { x.as_ptr() };
    // SAFETY: valid C strings or null pointers, as mount(2) allows.
    let ret = unsafe {
        libc::mount(
            opt(&s, source.is_empty()),
            t.as_ptr(),
            opt(&f, fstype.is_empty()),
            flags,
            opt(&d, data.is_empty()).cast(),
        )
    };
    check(ret, &format!("mount {source} on {target}"))
}

/// The pseudo file systems of the initramfs stage. An already mounted one is fine.
pub fn mount_early() {
    for (src, target, fstype, flags) in [
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID),
        ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
        ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
    ] {
        let _ = fs::create_dir_all(target);
        if let Err(e) = mount(src, target, fstype, flags, "") {
            if e.raw_os_error() != Some(libc::EBUSY) {
                eprintln!("shellwego-init: {e}");
            }
        }
    }
}

/// Drops cached blocks of a block device, so a drive whose backing file changed under a
/// restored VM is read afresh.
fn flush_block_cache(device: &str) -> io::Result<()> {
    let f = fs::File::open(device)?;
    // BLKFLSBUF = _IO(0x12, 97)
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: ioctl without argument on an open block device.
    let ret = unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF as _, 0) };
    check(ret, &format!("flushing {device}"))
}

/// Waits until the block device reports `bytes` (from /sys/block/NAME/size, in 512-byte
/// sectors): after a restore the kernel learns a changed disk size from a config-change
/// interrupt handled asynchronously.
pub fn wait_for_size(device: &str, bytes: u64, timeout: std::time::Duration) -> io::Result<()> {
    let name = device.rsplit('/').next().unwrap_or(device);
    let path = format!("/sys/block/{name}/size");
    let start = std::time::Instant::now();
    loop {
        let sectors: u64 = fs::read_to_string(&path)?.trim().parse().unwrap_or(0);
        if sectors * 512 == bytes {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{device} reports {} bytes, expected {bytes}", sectors * 512),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `EXT4_IOC_RESIZE_FS`: `_IOW('f', 16, __u64)`, the new size in blocks.
const EXT4_IOC_RESIZE_FS: u32 = 0x4008_6610;

/// Grows the ext4 file system mounted at `mountpoint` to fill `bytes` of its device,
/// online (what `resize2fs` does for a mounted file system). Asking for its current
/// size (or less than it has: ext4 does not shrink online) changes nothing.
pub fn grow_mounted_ext4(mountpoint: &str, bytes: u64) -> io::Result<()> {
    let dir = fs::File::open(mountpoint)?;
    // SAFETY: statvfs fills the zeroed struct; the fd is open.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(
        unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut st) },
        "fstatvfs",
    )?;
    let block = st.f_frsize as u64;
    if block == 0 {
        return Err(io::Error::other("file system reports a block size of 0"));
    }
    let blocks: u64 = bytes / block;
    if blocks <= st.f_blocks as u64 {
        return Ok(());
    }
    // SAFETY: the ioctl reads one u64 from the pointer, which outlives the call.
    let ret = unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            EXT4_IOC_RESIZE_FS as _,
            &blocks as *const u64,
        )
    };
    check(ret, "EXT4_IOC_RESIZE_FS")
}

/// Mounts `device` (ext4) and makes it the root: the pseudo file systems move along,
/// then `/` is replaced (mount --move + chroot, as switch_root does).
pub fn switch_root(device: &str) -> io::Result<()> {
    let new_root = "/mnt/root";
    fs::create_dir_all(new_root)?;
    flush_block_cache(device)?;
    // The root disk's inode tables were never zeroed (mkfs ran with lazy_itable_init on a
    // sparse image, whose holes read as zeros): don't have the kernel zero them now in
    // the background, writing tens of MB through the disk of an image of many files.
    mount(device, new_root, "ext4", 0, "noinit_itable")?;
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        let target = format!("{new_root}{dir}");
        fs::create_dir_all(&target)?;
        mount(dir, &target, "", libc::MS_MOVE, "")?;
    }
    std::env::set_current_dir(new_root)?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = c(".")?;
    // SAFETY: chroot to the current directory.
    check(unsafe { libc::chroot(dot.as_ptr()) }, "chroot")?;
    std::env::set_current_dir("/")
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: buffer and its length.
    check(
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
        "sethostname",
    )
}

pub fn set_clock(secs: i64, nanos: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as _,
    };
    // SAFETY: a valid timespec.
    check(
        unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) },
        "clock_settime",
    )
}

/// Makes this VM's random numbers its own: credits `bytes` (fresh from the host) to the
/// kernel's input pool and forces the CRNG to reseed from it. A VM restored from a
/// snapshot resumes the snapshot's CRNG state, and a plain write to /dev/urandom is mixed
/// in without a reseed, so two clones would read the same bytes until the kernel's next
/// scheduled reseed (up to a minute later). This guest kernel has no VMGenID (no ACPI).
pub fn reseed_rng(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    // RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let f = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let len = i32::try_from(bytes.len()).map_err(io::Error::other)?;
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: the buffer is a complete rand_pool_info of `len` bytes, alive for the call.
    let ret = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    check(ret, "RNDADDENTROPY")?;
    // SAFETY: an ioctl without argument on an open random device.
    let ret = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _, 0) };
    check(ret, "RNDRESEEDCRNG")
}

/// Gives the app a `boot_id` of this VM's own: the kernel made one at the template's boot,
/// which every clone would share. A fresh random UUID is bind-mounted over
/// /proc/sys/kernel/random/boot_id (after `reseed_rng`, so it is the clone's own).
pub fn fresh_boot_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    // SAFETY: getrandom fills the buffer we pass, of that length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if usize::try_from(n).ok() != Some(b.len()) {
        return Err(io::Error::last_os_error());
    }
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    let id = format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    );
    let target = "/proc/sys/kernel/random/boot_id";
    if !Path::new(target).exists() {
        return Ok(id); // a kernel without sysctl in /proc has no boot_id to share
    }
    let file = "/run/shellwego-boot_id";
    fs::write(file, format!("{id}\n"))?;
    mount(file, target, "", libc::MS_BIND, "")?;
    Ok(id)
}

/// Milliseconds since boot (CLOCK_BOOTTIME: counts while a snapshot sat on disk too).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into ts.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn inet_socket() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sets an interface's MAC address ("02:ab:...").
pub fn set_mac(name: &str, mac: &str) -> io::Result<()> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("bad MAC {mac:?}")))?;
    if bytes.len() != 6 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad MAC {mac:?}"),
        ));
    }
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: writing the hardware address into the ifreq union, then one ioctl.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(&bytes) {
            *dst = *src as libc::c_char;
        }
        check(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &req),
            "SIOCSIFHWADDR",
        )
    }
}

/// Brings an interface up.
pub fn link_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: ioctls on a valid socket with a valid ifreq.
    unsafe {
        check(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            "SIOCGIFFLAGS",
        )?;
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req),
            "SIOCSIFFLAGS",
        )
    }
}

/// Sets eth0's IPv4 address and prefix, brings it up, and adds the default route.
pub fn configure_ipv4(
    name: &str,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> io::Result<()> {
    if prefix_len > 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "prefix length over 32",
        ));
    }
    let sock = inet_socket()?;
    let mask = if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - prefix_len)
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(address);
    // SAFETY: ioctls on a valid socket with valid ifreq/rtentry values.
    unsafe {
        check(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req),
            "SIOCSIFADDR",
        )?;
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
        check(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req),
            "SIOCSIFNETMASK",
        )?;
    }
    link_up(name)?;
    // SAFETY: all-zero is a valid rtentry; fields set below.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    // SAFETY: as above.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) };
    if ret != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::new(
                e.kind(),
                format!("default route via {gateway}: {e}"),
            ));
        }
    }
    Ok(())
}

/// Syncs, remounts `/` read-only (best effort) and reboots; with `reboot=k` the VMM exits.
pub fn reboot() -> ! {
    // SAFETY: sync, remount and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        let root = c("/").unwrap_or_default();
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        );
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot(2) does not return for PID 1 with enough privilege; if it did, stop here.
    loop {
        std::thread::park();
    }
}

/// (name, id, primary gid) rows of an /etc/passwd or /etc/group text.
fn id_table(text: &str) -> Vec<(String, u32, u32)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let id = f.get(2)?.parse().ok()?;
            let gid = f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            Some((f.first()?.to_string(), id, gid))
        })
        .collect()
}

/// Resolves an image `User` ("", "name", "1000", "name:group", "1000:1000") against the
/// root's /etc/passwd and /etc/group.
pub fn resolve_user(user: &str) -> io::Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let users = id_table(&fs::read_to_string("/etc/passwd").unwrap_or_default());
    let not_found = |what: &str, name: &str| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{what} {name:?} not found"),
        )
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => (
            uid,
            users
                .iter()
                .find(|r| r.1 == uid)
                .map(|r| r.2)
                .unwrap_or(uid),
        ),
        Err(_) => users
            .iter()
            .find(|r| r.0 == u)
            .map(|r| (r.1, r.2))
            .ok_or_else(|| not_found("user", u))?,
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => id_table(&fs::read_to_string("/etc/group").unwrap_or_default())
                .iter()
                .find(|r| r.0 == g)
                .map(|r| r.1)
                .ok_or_else(|| not_found("group", g))?,
        },
    };
    Ok((uid, gid))
}

/// Writes the nameservers to /etc/resolv.conf of the current root.
pub fn write_resolv_conf(nameservers: &[String]) -> io::Result<()> {
    if nameservers.is_empty() || !Path::new("/etc").is_dir() {
        return Ok(());
    }
    let text: String = nameservers
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect();
    fs::write("/etc/resolv.conf", text)
}
