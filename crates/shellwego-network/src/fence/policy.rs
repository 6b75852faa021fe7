//! A VM's egress policy (the app spec's `[network]` section): whether it may reach the
//! internet, and which private destinations it may reach besides. Pure values and their
//! strict parsing; the rules that enforce them are in `rules`.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a guest may open connections beyond the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Public addresses through the host's NAT; private ranges only where allowed.
    #[default]
    Internet,
    /// Nothing beyond the host but the allow list.
    None,
}

impl FromStr for Egress {
    type Err = String;

    fn from_str(s: &str) -> Result<Egress, String> {
        match s {
            "internet" => Ok(Egress::Internet),
            "none" => Ok(Egress::None),
            _ => Err("must be \"internet\" or \"none\"".into()),
        }
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Egress::Internet => "internet",
            Egress::None => "none",
        })
    }
}

/// An IPv4 network: address and prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl Cidr {
    pub const fn new(a: u8, b: u8, c: u8, d: u8, prefix_len: u8) -> Cidr {
        Cidr {
            network: Ipv4Addr::new(a, b, c, d),
            prefix_len,
        }
    }

    fn mask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n.min(32))),
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network) & self.mask()
    }

    /// True if the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let wider = Cidr {
            network: self.network,
            prefix_len: self.prefix_len.min(other.prefix_len),
        };
        wider.contains(other.network)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix_len == 32 {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.prefix_len)
        }
    }
}

/// Destinations no guest may ever reach, whatever its spec says: "this network",
/// loopback, link-local (with the cloud metadata service 169.254.169.254), multicast, and
/// the reserved block with the limited broadcast address.
pub const NEVER: &[(Cidr, &str)] = &[
    (Cidr::new(0, 0, 0, 0, 8), "\"this network\""),
    (Cidr::new(127, 0, 0, 0, 8), "loopback"),
    (Cidr::new(169, 254, 0, 0, 16), "link-local (cloud metadata)"),
    (Cidr::new(224, 0, 0, 0, 4), "multicast"),
    (Cidr::new(240, 0, 0, 0, 4), "reserved/broadcast"),
];

/// Private and special-purpose ranges a guest reaches only through its allow list:
/// RFC 1918, CGNAT (RFC 6598), IETF protocol assignments and benchmarking (RFC 6890).
pub const PRIVATE: &[Cidr] = &[
    Cidr::new(10, 0, 0, 0, 8),
    Cidr::new(100, 64, 0, 0, 10),
    Cidr::new(172, 16, 0, 0, 12),
    Cidr::new(192, 0, 0, 0, 24),
    Cidr::new(192, 168, 0, 0, 16),
    Cidr::new(198, 18, 0, 0, 15),
];

/// The widest network an allow entry may open.
pub const MIN_ALLOW_PREFIX: u8 = 8;

/// One allow-list entry: a network (or one address) and optionally one port (TCP and
/// UDP). Written `"10.1.2.0/24:5432"`, `"192.168.1.10"`, `"10.9.0.0/16"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowRule {
    pub net: Cidr,
    pub port: Option<u16>,
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.net),
            None => write!(f, "{}", self.net),
        }
    }
}

fn digits(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl FromStr for AllowRule {
    type Err = String;

    /// Strict: no spaces, no host bits, no prefix wider than /8, a port from 1 to 65535,
    /// nothing that overlaps the ranges in `NEVER`. The error says what is wrong.
    fn from_str(s: &str) -> Result<AllowRule, String> {
        const FORM: &str = "must be an IPv4 address or network with an optional port, such as \"10.1.2.0/24:5432\" or \"192.168.1.10\"";
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit() || b"./:".contains(&b)) {
            return Err(FORM.into());
        }
        let (addr_part, port) = match s.split_once(':') {
            Some((a, p)) => {
                let port = digits(p)
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("port {p:?} must be a number from 1 to 65535"))?;
                (a, Some(port))
            }
            None => (s, None),
        };
        let (ip_part, prefix_len) = match addr_part.split_once('/') {
            Some((ip, len)) => {
                let len = digits(len)
                    .and_then(|n| u8::try_from(n).ok())
                    .filter(|n| *n <= 32)
                    .ok_or_else(|| format!("prefix length {len:?} must be from 0 to 32"))?;
                (ip, len)
            }
            None => (addr_part, 32),
        };
        let network: Ipv4Addr = ip_part.parse().map_err(|_| FORM.to_string())?;
        if prefix_len < MIN_ALLOW_PREFIX {
            return Err(format!(
                "/{prefix_len} is too wide: an entry opens at most a /{MIN_ALLOW_PREFIX}"
            ));
        }
        let net = Cidr {
            network,
            prefix_len,
        };
        let exact = Cidr {
            network: Ipv4Addr::from(u32::from(network) & net.mask()),
            prefix_len,
        };
        if exact != net {
            return Err(format!(
                "has host bits set: the network is {}/{prefix_len}",
                exact.network
            ));
        }
        if let Some((never, what)) = NEVER.iter().find(|(n, _)| n.overlaps(&net)) {
            return Err(format!(
                "overlaps {never} ({what}), which guests can never reach"
            ));
        }
        Ok(AllowRule { net, port })
    }
}

impl Serialize for AllowRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AllowRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AllowRule, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e: String| serde::de::Error::custom(format!("{text:?}: {e}")))
    }
}

/// Most entries an allow list may have.
pub const MAX_ALLOW: usize = 32;

/// Why an allow list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowListError {
    #[error("has {count} entries, more than the {MAX_ALLOW} allowed")]
    TooMany { count: usize },
    #[error("entry {index} ({entry:?}) {reason}")]
    Entry {
        index: usize,
        entry: String,
        reason: String,
    },
}

/// What a VM may reach beyond the host: the spec's `[network]` section. Its serde form is
/// the one the agent stores with an app's spec, so it decodes leniently (an unknown field
/// is ignored); the user's `[network]` is parsed strictly by the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EgressPolicy {
    #[serde(default)]
    pub egress: Egress,
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

impl EgressPolicy {
    /// Internet through NAT, no private destinations: what a spec without `[network]` gets.
    pub fn is_default(&self) -> bool {
        *self == EgressPolicy::default()
    }

    /// Parses the allow list's entries, naming the first bad one by its index; refuses
    /// more than `MAX_ALLOW` entries and an entry listed twice.
    pub fn parse_allow(entries: &[String]) -> Result<Vec<AllowRule>, AllowListError> {
        if entries.len() > MAX_ALLOW {
            return Err(AllowListError::TooMany {
                count: entries.len(),
            });
        }
        let mut rules: Vec<AllowRule> = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let bad = |reason: String| AllowListError::Entry {
                index,
                entry: entry.clone(),
                reason,
            };
            let rule: AllowRule = entry.parse().map_err(bad)?;
            if rules.contains(&rule) {
                return Err(bad("is listed twice".into()));
            }
            rules.push(rule);
        }
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(s: &str) -> AllowRule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn allow_entries_parse_to_their_canonical_form() {
        assert_eq!(rule("10.1.2.0/24:5432").to_string(), "10.1.2.0/24:5432");
        assert_eq!(rule("192.168.1.10").to_string(), "192.168.1.10");
        assert_eq!(rule("192.168.1.10/32").to_string(), "192.168.1.10");
        assert_eq!(rule("10.0.0.0/8").net.prefix_len, 8);
        assert_eq!(rule("203.0.113.5:443").port, Some(443));
    }

    #[test]
    fn bad_allow_entries_say_what_is_wrong() {
        let err = |s: &str| s.parse::<AllowRule>().unwrap_err();
        assert!(err("10.1.2.5/24").contains("10.1.2.0/24"), "host bits");
        assert!(err("10.1.2.0/33").contains("prefix length"));
        assert!(err("10.1.2.0/24:0").contains("port"));
        assert!(err("10.1.2.0/24:65536").contains("port"));
        assert!(err("10.1.2.0/24:").contains("port"));
        assert!(err("0.0.0.0/0").contains("too wide"));
        assert!(err("10.0.0.0/7").contains("too wide"));
        assert!(err("169.254.169.254").contains("link-local"));
        assert!(err("127.0.0.1:22").contains("loopback"));
        assert!(err("224.0.0.0/8").contains("multicast"));
        assert!(err("255.255.255.255").contains("broadcast"));
        assert!(err("0.1.2.3").contains("this network"));
        for bad in [
            "",
            " 10.0.0.1",
            "10.0.0.1 ",
            "10.0.0",
            "10.0.0.256",
            "host:80",
            "10.0.0.1/24/8",
            "10.0.0.1:80:90",
            "::1",
            "10.0.0.1:+80",
            "10.0.0.0/+8",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn allow_lists_are_bounded_and_have_no_duplicates() {
        let many: Vec<String> = (0..=MAX_ALLOW).map(|i| format!("10.0.{i}.1")).collect();
        let err = EgressPolicy::parse_allow(&many).unwrap_err();
        assert_eq!(err, AllowListError::TooMany { count: 33 });
        assert!(err.to_string().contains("32"), "{err}");
        let entry_error = |list: &[&str]| {
            let list: Vec<String> = list.iter().map(|e| e.to_string()).collect();
            match EgressPolicy::parse_allow(&list) {
                Err(AllowListError::Entry {
                    index,
                    entry,
                    reason,
                }) => (index, entry, reason),
                other => panic!("{list:?}: {other:?}"),
            }
        };
        let (index, entry, reason) = entry_error(&["10.0.0.1", "10.0.0.1/32"]);
        assert_eq!((index, entry.as_str()), (1, "10.0.0.1/32"));
        assert!(reason.contains("twice"));
        let (index, entry, _) = entry_error(&["10.0.0.1", "bad"]);
        assert_eq!((index, entry.as_str()), (1, "bad"));
    }

    #[test]
    fn overlap_is_symmetric_and_exact() {
        let a = Cidr::new(10, 0, 0, 0, 8);
        let b = Cidr::new(10, 3, 0, 0, 16);
        let c = Cidr::new(11, 0, 0, 0, 8);
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
    }

    #[test]
    fn policy_serializes_as_the_spec_writes_it() {
        let p = EgressPolicy {
            egress: Egress::None,
            allow: vec![rule("10.1.2.0/24:5432")],
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"egress":"none","allow":["10.1.2.0/24:5432"]}"#);
        assert_eq!(serde_json::from_str::<EgressPolicy>(&json).unwrap(), p);
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"allow":["1.2.3.4/8"]}"#).is_err());
        // Stored with a spec: a field added by a later agent is ignored.
        let later = r#"{"egress":"none","allow":["10.1.2.0/24:5432"],"later":1}"#;
        assert_eq!(serde_json::from_str::<EgressPolicy>(later).unwrap(), p);
        assert!(EgressPolicy::default().is_default());
        assert_eq!("none".parse::<Egress>(), Ok(Egress::None));
        assert!("None".parse::<Egress>().is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_round_trips(s in "[0-9./:]{0,24}") {
            if let Ok(r) = s.parse::<AllowRule>() {
                prop_assert_eq!(r.to_string().parse::<AllowRule>(), Ok(r));
                prop_assert!(NEVER.iter().all(|(n, _)| !n.overlaps(&r.net)));
                prop_assert!(r.net.prefix_len >= MIN_ALLOW_PREFIX);
            }
        }

        #[test]
        fn every_valid_network_round_trips(ip in any::<u32>(), len in 8u8..=32, port in proptest::option::of(1u16..)) {
            let net = Cidr { network: Ipv4Addr::from(ip), prefix_len: len };
            let exact = Cidr { network: Ipv4Addr::from(ip & net.mask()), prefix_len: len };
            let r = AllowRule { net: exact, port };
            match r.to_string().parse::<AllowRule>() {
                Ok(back) => prop_assert_eq!(back, r),
                Err(e) => prop_assert!(e.contains("never reach"), "{}: {}", r, e),
            }
        }
    }
}
