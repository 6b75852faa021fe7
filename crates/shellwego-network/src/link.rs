//! Links over netlink (rtnetlink): bridges, IFBs, addresses, up/down, enslaving, lookup.
//! TAPs are made with the tun ioctls (`tap`), since this kernel refuses them over netlink.
//!
//! Everything acts in the network namespace of the calling thread. Every request waits
//! at most [`NETLINK_TIMEOUT`] for the kernel's answer: an answer that is lost must cost
//! a failed step, not a task that waits forever.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkIfb, LinkUnspec};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink: {op}: no answer within {limit:?}")]
    TimedOut { op: String, limit: Duration },
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("no interface named {0}")]
    NotFound(String),
    #[error("interface name {0:?} is invalid (1-15 characters of a-z, 0-9, '-', '_', '.')")]
    BadName(String),
}

/// What `ip link show` tells about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub index: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// The bridge (or other controller) it is attached to.
    pub controller: Option<u32>,
}

/// Checks a Linux interface name.
pub fn check_name(name: &str) -> Result<(), LinkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(LinkError::BadName(name.to_string()))
    }
}

/// How long one netlink request may wait for the kernel's answer. The kernel answers
/// link and address requests at once; ten seconds covers a host under heavy load.
pub const NETLINK_TIMEOUT: Duration = Duration::from_secs(10);

/// A netlink connection in the calling thread's network namespace.
pub struct Netlink {
    handle: Handle,
    limit: Duration,
}

/// Awaits `answer` for at most `limit`; the error names the request (`op`) and the limit.
pub async fn within<T>(
    limit: Duration,
    op: impl FnOnce() -> String,
    answer: impl Future<Output = T>,
) -> Result<T, LinkError> {
    tokio::time::timeout(limit, answer)
        .await
        .map_err(|_| LinkError::TimedOut { op: op(), limit })
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let op = op.into();
    move |source| LinkError::Netlink { op, source }
}

fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV)
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

fn info_of(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        name: String::new(),
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        controller: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Controller(c) => info.controller = Some(*c),
            _ => {}
        }
    }
    info
}

impl Netlink {
    /// Opens a connection; needs a tokio runtime (the connection runs as a task on it).
    pub fn connect() -> Result<Netlink, LinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            limit: NETLINK_TIMEOUT,
        })
    }

    /// The same connection with `limit` for each request instead of [`NETLINK_TIMEOUT`].
    pub fn with_limit(self, limit: Duration) -> Netlink {
        Netlink { limit, ..self }
    }

    /// The interface called `name`, if it exists.
    pub async fn get(&self, name: &str) -> Result<Option<LinkInfo>, LinkError> {
        check_name(name)?;
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match within(self.limit, || format!("get {name}"), stream.try_next()).await? {
            Ok(Some(msg)) => Ok(Some(info_of(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(nl(format!("get {name}"))(e)),
        }
    }

    /// Like `get`, but a missing interface is an error.
    pub async fn require(&self, name: &str) -> Result<LinkInfo, LinkError> {
        self.get(name)
            .await?
            .ok_or_else(|| LinkError::NotFound(name.to_string()))
    }

    /// Every interface.
    pub async fn list(&self) -> Result<Vec<LinkInfo>, LinkError> {
        let mut out = Vec::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(msg) = within(self.limit, || "list links".into(), stream.try_next())
            .await?
            .map_err(nl("list links"))?
        {
            out.push(info_of(&msg));
        }
        Ok(out)
    }

    /// Creates the link `msg` describes unless `name` exists; returns it.
    async fn ensure_link(
        &self,
        name: &str,
        kind: &str,
        msg: LinkMessage,
    ) -> Result<LinkInfo, LinkError> {
        check_name(name)?;
        if let Some(l) = self.get(name).await? {
            return Ok(l);
        }
        let add = self.handle.link().add(msg).execute();
        match within(self.limit, || format!("create {kind} {name}"), add).await? {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(e) => return Err(nl(format!("create {kind} {name}"))(e)),
        }
        self.require(name).await
    }

    /// Creates the bridge unless it exists; returns it.
    pub async fn ensure_bridge(&self, name: &str) -> Result<LinkInfo, LinkError> {
        self.ensure_link(name, "bridge", LinkBridge::new(name).build())
            .await
    }

    /// Creates an IFB device unless it exists.
    pub async fn ensure_ifb(&self, name: &str) -> Result<LinkInfo, LinkError> {
        self.ensure_link(name, "ifb", LinkIfb::new(name).build())
            .await
    }

    /// IPv4 addresses on an interface, with prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
        let mut out = Vec::new();
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = within(self.limit, || "list addresses".into(), stream.try_next())
            .await?
            .map_err(nl("list addresses"))?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                    out.push((*ip, msg.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Forgets the neighbour (ARP) entries of `ip` on the interface `index`. An address
    /// handed to another VM (a lease released and leased again) belongs to another MAC:
    /// a remembered entry would send its traffic to the old one until the kernel finds
    /// out (tens of seconds), and a guest restored from a snapshot, whose own ARP cache
    /// is warm, sends nothing that would tell it sooner.
    pub async fn forget_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), LinkError> {
        use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
        let mut stale = Vec::new();
        let mut stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(rtnetlink::packet_route::AddressFamily::Inet)
            .execute();
        while let Some(msg) = within(self.limit, || "list neighbours".into(), stream.try_next())
            .await?
            .map_err(nl("list neighbours"))?
        {
            let this_ip = msg.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == ip)
            });
            if msg.header.ifindex == index && this_ip {
                stale.push(msg);
            }
        }
        for msg in stale {
            let op = format!("forget neighbour {ip}");
            let del = self.handle.neighbours().del(msg).execute();
            match within(self.limit, || op.clone(), del).await? {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ENOENT => {}
                Err(e) => return Err(nl(op)(e)),
            }
        }
        Ok(())
    }

    /// Adds the address unless the interface already has it (never flushes others).
    pub async fn ensure_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), LinkError> {
        if self.addresses(index).await?.contains(&(ip, prefix_len)) {
            return Ok(());
        }
        let add = self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .execute();
        match within(self.limit, || format!("add {ip}/{prefix_len}"), add).await? {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(e) => Err(nl(format!("add {ip}/{prefix_len}"))(e)),
        }
    }

    pub async fn set_up(&self, index: u32) -> Result<(), LinkError> {
        let op = format!("set link {index} up");
        let set = self
            .handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute();
        within(self.limit, || op.clone(), set)
            .await?
            .map_err(nl(op))
    }

    /// Attaches `index` to the bridge `bridge_index`.
    pub async fn enslave(&self, index: u32, bridge_index: u32) -> Result<(), LinkError> {
        let op = format!("attach link {index} to bridge {bridge_index}");
        let set = self
            .handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge_index)
                    .build(),
            )
            .execute();
        within(self.limit, || op.clone(), set)
            .await?
            .map_err(nl(op))
    }

    /// Deletes the interface; a missing one is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), LinkError> {
        let Some(link) = self.get(name).await? else {
            return Ok(());
        };
        let del = self.handle.link().del(link.index).execute();
        match within(self.limit, || format!("delete {name}"), del).await? {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(nl(format!("delete {name}"))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tc_u14_deadline_a_netlink_answer_that_never_comes_fails_naming_the_request() {
        let limit = Duration::from_millis(100);
        let start = std::time::Instant::now();
        let e = within(limit, || "get swg-x".into(), std::future::pending::<()>())
            .await
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(e.to_string(), "netlink: get swg-x: no answer within 100ms");
        assert_eq!(
            within(limit, || unreachable!(), async { 7 }).await.unwrap(),
            7
        );
    }
}
