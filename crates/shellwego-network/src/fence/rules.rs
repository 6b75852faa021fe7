//! The fence's nftables scripts, generated as pure functions of the network's shape, a
//! VM's identity and policy, and (for replacing or removing a VM) what the kernel holds.
//!
//! Two tables, both named `shellwego_fence` and owned by ShellWeGo alone:
//!
//! `bridge shellwego_fence` — layer 2, per bridge port:
//! - `prerouting` (priority -300, before the bridge learns a source MAC): frames from a
//!   fenced port jump to its chain `out-<tap>` (anti-spoofing: only its MAC as source,
//!   only IPv4 and ARP, ARP only with its MAC and IP as sender, IPv4 only from its IP);
//!   every other port whose name has the VM prefix (the template TAP, a TAP whose fence is
//!   not in place) is dropped outright.
//! - `forward` (port to port): a frame to a fenced port jumps to `to-<tap>`, which lets
//!   in only ports of the same app (set `app-<name>`) and drops unicast frames meant for
//!   another MAC (flooding); a fenced port's frames to any other port are dropped.
//! - `input` (up to the host): from fenced ports, ARP requests only for the gateway
//!   address (the host does not tell guests about its other addresses) and no IPv4 to
//!   other addresses of the VM subnet (no hairpin through the host's routing).
//! - `output` (host to port): unicast frames only to the port's own MAC (no flooding of
//!   the host's traffic for one VM onto another).
//!
//! `inet shellwego_fence` — layer 3, on the host:
//! - `input`: from the bridge, only packets of connections the host opened (conntrack
//!   `established,related`): the agent's health checks and endpoint proxy connect to
//!   guests, guests connect to nothing on the host (any of its addresses).
//! - `forward`: guest packets leaving the host jump by source address to
//!   `egress-<tap>`: never loopback/link-local/multicast/reserved, then the allow list,
//!   then private ranges dropped and the rest accepted (`internet`) or all dropped
//!   (`none`); packets from addresses no VM holds are dropped. Packets routed to the
//!   bridge from elsewhere pass only as replies: nothing beyond the host opens
//!   connections to guests (published ports go through the agent's proxy).

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::policy::{Egress, EgressPolicy, NEVER, PRIVATE};
use super::state::{FenceState, Key, TableState};
use crate::ipam::Subnet;

/// The name of both tables.
pub const TABLE: &str = "shellwego_fence";
const BR: &str = "bridge shellwego_fence";
const IN: &str = "inet shellwego_fence";
/// Sets of the ports of one app are named this plus the app's name.
pub const APP_SET_PREFIX: &str = "app-";

/// Why a name or address cannot go into a fence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} cannot be fenced: {reason}")]
pub struct BadInput {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn bad(what: &'static str, value: &str, reason: &'static str) -> BadInput {
    BadInput {
        what,
        value: value.to_string(),
        reason,
    }
}

/// Letters, digits, '-' and '_' only, `1..=max` of them: safe unquoted in an nft script.
fn check_word(what: &'static str, value: &str, max: usize) -> Result<(), BadInput> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(bad(
            what,
            value,
            "use 1 to the allowed number of letters, digits, '-' and '_'",
        ))
    }
}

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = BadInput;

    fn from_str(s: &str) -> Result<Mac, BadInput> {
        let parts: Vec<&str> = s.split(':').collect();
        let mut mac = [0u8; 6];
        if parts.len() != 6 {
            return Err(bad("MAC", s, "not six ':'-separated hex bytes"));
        }
        for (dst, part) in mac.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(bad("MAC", s, "not six ':'-separated hex bytes"));
            }
            *dst = u8::from_str_radix(part, 16)
                .map_err(|_| bad("MAC", s, "not six ':'-separated hex bytes"))?;
        }
        if mac[0] & 1 == 1 {
            return Err(bad("MAC", s, "a multicast address is not a VM's address"));
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The network the fence guards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceBase {
    pub bridge: String,
    pub subnet: Subnet,
    /// Bridge ports whose names start with this are VMs': without a fence of their own
    /// nothing they send gets through.
    pub port_prefix: String,
}

impl FenceBase {
    pub fn new(bridge: &str, subnet: Subnet, port_prefix: &str) -> Result<FenceBase, BadInput> {
        check_word("bridge", bridge, 15)?;
        check_word("port prefix", port_prefix, 14)?;
        Ok(FenceBase {
            bridge: bridge.to_string(),
            subnet,
            port_prefix: port_prefix.to_string(),
        })
    }
}

/// One VM's fence: its port, identity, app and egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFence {
    pub tap: String,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub app: String,
    pub policy: EgressPolicy,
}

impl VmFence {
    /// Checks every part that goes into the script.
    pub fn new(
        tap: &str,
        mac: &str,
        ip: Ipv4Addr,
        app: &str,
        policy: &EgressPolicy,
    ) -> Result<VmFence, BadInput> {
        check_word("TAP", tap, 15)?;
        check_word("app", app, 64)?;
        Ok(VmFence {
            tap: tap.to_string(),
            mac: mac.parse()?,
            ip,
            app: app.to_string(),
            policy: policy.clone(),
        })
    }
}

pub fn out_chain(tap: &str) -> String {
    format!("out-{tap}")
}

pub fn to_chain(tap: &str) -> String {
    format!("to-{tap}")
}

pub fn egress_chain(tap: &str) -> String {
    format!("egress-{tap}")
}

pub fn app_set(app: &str) -> String {
    format!("{APP_SET_PREFIX}{app}")
}

/// Appends one line to a script.
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        // Writing to a String cannot fail.
        let _ = writeln!($out, $($arg)*);
    }};
}

fn cidr_list(nets: impl Iterator<Item = String>) -> String {
    nets.collect::<Vec<_>>().join(", ")
}

/// Declares both tables, their sets, maps and chains (where missing) and replaces the
/// rules of the shared chains, leaving every VM's chains and elements as they are. One
/// transaction: there is no moment without rules.
pub fn base_script(base: &FenceBase) -> String {
    let mut s = String::new();
    let br = &base.bridge;
    let gw = base.subnet.gateway;
    let net = format!("{}/{}", base.subnet.network, base.subnet.prefix_len);
    let prefix = &base.port_prefix;
    line!(s, "add table {BR}");
    line!(s, "add set {BR} vm_ports {{ type ifname; }}");
    line!(s, "add set {BR} port_mac {{ type ifname . ether_addr; }}");
    line!(s, "add map {BR} from_vm {{ type ifname : verdict; }}");
    line!(s, "add map {BR} to_vm {{ type ifname : verdict; }}");
    for (chain, prio) in [
        ("prerouting", -300),
        ("forward", -200),
        ("input", -200),
        ("output", -200),
    ] {
        line!(
            s,
            "add chain {BR} {chain} {{ type filter hook {chain} priority {prio}; policy accept; }}"
        );
        line!(s, "flush chain {BR} {chain}");
    }
    line!(s, "add rule {BR} prerouting iifname vmap @from_vm");
    line!(s, "add rule {BR} prerouting iifname \"{prefix}*\" drop");
    line!(s, "add rule {BR} forward oifname vmap @to_vm");
    line!(s, "add rule {BR} forward iifname @vm_ports drop");
    line!(
        s,
        "add rule {BR} input iifname @vm_ports arp operation request arp daddr ip != {gw} drop"
    );
    line!(
        s,
        "add rule {BR} input iifname @vm_ports ip daddr {net} ip daddr != {gw} drop"
    );
    line!(
        s,
        "add rule {BR} output oifname @vm_ports ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 oifname . ether daddr != @port_mac drop"
    );
    line!(s, "add table {IN}");
    line!(s, "add map {IN} egress_of {{ type ipv4_addr : verdict; }}");
    for chain in ["input", "forward"] {
        line!(
            s,
            "add chain {IN} {chain} {{ type filter hook {chain} priority 0; policy accept; }}"
        );
        line!(s, "flush chain {IN} {chain}");
    }
    for chain in ["from_guests", "to_guests"] {
        line!(s, "add chain {IN} {chain}");
        line!(s, "flush chain {IN} {chain}");
    }
    line!(
        s,
        "add rule {IN} input iifname \"{br}\" ct state established,related accept"
    );
    line!(s, "add rule {IN} input iifname \"{br}\" drop");
    line!(
        s,
        "add rule {IN} forward iifname \"{br}\" oifname != \"{br}\" jump from_guests"
    );
    line!(
        s,
        "add rule {IN} forward iifname != \"{br}\" oifname \"{br}\" jump to_guests"
    );
    line!(s, "add rule {IN} from_guests ip saddr vmap @egress_of");
    line!(s, "add rule {IN} from_guests drop");
    line!(
        s,
        "add rule {IN} to_guests ct state established,related accept"
    );
    line!(s, "add rule {IN} to_guests drop");
    s
}

/// The rules of a VM's egress chain, in order.
pub fn egress_rules(policy: &EgressPolicy) -> Vec<String> {
    let mut rules = vec![format!(
        "ip daddr {{ {} }} drop",
        cidr_list(
            NEVER
                .iter()
                .map(|(c, _)| format!("{}/{}", c.network, c.prefix_len))
        )
    )];
    for allow in &policy.allow {
        let net = format!("{}/{}", allow.net.network, allow.net.prefix_len);
        rules.push(match allow.port {
            Some(port) => {
                format!("ip daddr {net} meta l4proto {{ tcp, udp }} th dport {port} accept")
            }
            None => format!("ip daddr {net} accept"),
        });
    }
    match policy.egress {
        Egress::Internet => {
            rules.push(format!(
                "ip daddr {{ {} }} drop",
                cidr_list(
                    PRIVATE
                        .iter()
                        .map(|c| format!("{}/{}", c.network, c.prefix_len))
                )
            ));
            rules.push("accept".into());
        }
        Egress::None => rules.push("drop".into()),
    }
    rules
}

/// Whether an element's key is a single interface name equal to `tap`.
fn is_port(key: &Key, tap: &str) -> bool {
    key.len() == 1 && key[0] == tap
}

/// Deletes the verdict-map elements that belong to `tap` in `map`: keyed by it, or
/// pointing at one of `chains`. Keys that are not plain names are left alone.
fn delete_map_elements(
    s: &mut String,
    table: &str,
    state: &TableState,
    map: &str,
    key_matches: impl Fn(&Key) -> bool,
    chains: &[String],
    render: impl Fn(&Key) -> Option<String>,
) {
    for (key, target) in state.map(map) {
        let ours = key_matches(key) || target.as_ref().is_some_and(|t| chains.contains(t));
        if let (true, Some(k)) = (ours, render(key)) {
            line!(s, "delete element {table} {map} {{ {k} }}");
        }
    }
}

fn render_port(key: &Key) -> Option<String> {
    match key.as_slice() {
        [name] if check_word("port", name, 15).is_ok() => Some(format!("\"{name}\"")),
        _ => None,
    }
}

fn render_ip(key: &Key) -> Option<String> {
    match key.as_slice() {
        [ip] => ip.parse::<Ipv4Addr>().ok().map(|ip| ip.to_string()),
        _ => None,
    }
}

/// The app sets `tap` is a member of.
fn app_sets_of<'a>(state: &'a TableState, tap: &'a str) -> impl Iterator<Item = &'a String> {
    state.sets.iter().filter_map(move |(name, elems)| {
        (name.starts_with(APP_SET_PREFIX)
            && check_word("set", name, 128).is_ok()
            && elems.iter().any(|k| is_port(k, tap)))
        .then_some(name)
    })
}

/// Deletes what the kernel holds of `tap` in elements: its map entries, and its port,
/// MAC, app memberships and address in the egress map. With `keep` (the fence about to be
/// installed in the same transaction), what that fence adds again unchanged stays (its
/// port, its MAC, its app's set), and its address is taken from whoever held it before.
fn delete_elements(s: &mut String, state: &FenceState, tap: &str, keep: Option<&VmFence>) {
    let bridge_chains = [out_chain(tap), to_chain(tap)];
    for map in ["from_vm", "to_vm"] {
        delete_map_elements(
            s,
            BR,
            &state.bridge,
            map,
            |k| is_port(k, tap),
            &bridge_chains,
            render_port,
        );
    }
    if keep.is_none() && state.bridge.set("vm_ports").iter().any(|k| is_port(k, tap)) {
        line!(s, "delete element {BR} vm_ports {{ \"{tap}\" }}");
    }
    for key in state.bridge.set("port_mac") {
        if let [port, mac] = key.as_slice() {
            let Ok(mac) = mac.parse::<Mac>() else {
                continue;
            };
            if port == tap && Some(mac) != keep.map(|k| k.mac) {
                line!(s, "delete element {BR} port_mac {{ \"{tap}\" . {mac} }}");
            }
        }
    }
    let keep_set = keep.map(|k| app_set(&k.app));
    for set in app_sets_of(&state.bridge, tap) {
        if Some(set) != keep_set.as_ref() {
            line!(s, "delete element {BR} {set} {{ \"{tap}\" }}");
        }
    }
    let egress = [egress_chain(tap)];
    delete_map_elements(
        s,
        IN,
        &state.inet,
        "egress_of",
        |k| keep.is_some_and(|v| render_ip(k) == Some(v.ip.to_string())),
        &egress,
        render_ip,
    );
}

/// Installs (or replaces) the fence of one VM, base included, in one transaction: what
/// the kernel holds of an earlier fence of the same port is replaced, so applying twice,
/// after an agent restart or over a half-built fence, ends in the same rules.
pub fn vm_script(base: &FenceBase, vm: &VmFence, state: &FenceState) -> String {
    let mut s = base_script(base);
    let (tap, mac, ip) = (&vm.tap, vm.mac, vm.ip);
    delete_elements(&mut s, state, tap, Some(vm));
    let (out, to, egress, app) = (
        out_chain(tap),
        to_chain(tap),
        egress_chain(tap),
        app_set(&vm.app),
    );
    line!(s, "add set {BR} {app} {{ type ifname; }}");
    for chain in [&out, &to] {
        line!(s, "add chain {BR} {chain}");
        line!(s, "flush chain {BR} {chain}");
    }
    // Sets of another app that held only this port: nothing refers to them any more
    // once its chain is flushed.
    for set in app_sets_of(&state.bridge, tap) {
        let only_this = state.bridge.set(set).iter().all(|k| is_port(k, tap));
        if *set != app && only_this {
            line!(s, "delete set {BR} {set}");
        }
    }
    for rule in [
        format!("ether saddr != {mac} drop"),
        "ether type != { ip, arp } drop".into(),
        "arp htype != 1 drop".into(),
        "arp ptype != ip drop".into(),
        "arp hlen != 6 drop".into(),
        "arp plen != 4 drop".into(),
        "arp operation != { request, reply } drop".into(),
        format!("arp saddr ether != {mac} drop"),
        format!("arp saddr ip != {ip} drop"),
        format!("ip saddr != {ip} drop"),
        "accept".into(),
    ] {
        line!(s, "add rule {BR} {out} {rule}");
    }
    for rule in [
        format!("ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 ether daddr != {mac} drop"),
        format!("iifname @{app} accept"),
        "drop".into(),
    ] {
        line!(s, "add rule {BR} {to} {rule}");
    }
    line!(s, "add element {BR} {app} {{ \"{tap}\" }}");
    line!(s, "add element {BR} vm_ports {{ \"{tap}\" }}");
    line!(s, "add element {BR} port_mac {{ \"{tap}\" . {mac} }}");
    line!(s, "add element {BR} from_vm {{ \"{tap}\" : jump {out} }}");
    line!(s, "add element {BR} to_vm {{ \"{tap}\" : jump {to} }}");
    line!(s, "add chain {IN} {egress}");
    line!(s, "flush chain {IN} {egress}");
    for rule in egress_rules(&vm.policy) {
        line!(s, "add rule {IN} {egress} {rule}");
    }
    line!(s, "add element {IN} egress_of {{ {ip} : jump {egress} }}");
    s
}

/// Removes everything of `tap`'s fence the kernel holds (elements first, then its
/// chains); `None` when nothing is left of it.
pub fn removal_script(tap: &str, state: &FenceState) -> Option<String> {
    if check_word("TAP", tap, 15).is_err() {
        return None;
    }
    let mut s = String::new();
    delete_elements(&mut s, state, tap, None);
    for chain in [out_chain(tap), to_chain(tap)] {
        if state.bridge.chains.contains(&chain) {
            line!(s, "delete chain {BR} {chain}");
        }
    }
    let egress = egress_chain(tap);
    if state.inet.chains.contains(&egress) {
        line!(s, "delete chain {IN} {egress}");
    }
    (!s.is_empty()).then_some(s)
}

/// App sets that have no member left once `tap` is gone (their last VM): removed after
/// it, in a transaction of their own, so that a failure there never keeps a VM's
/// removal from happening.
pub fn emptied_sets_script(tap: &str, state: &FenceState) -> Option<String> {
    let names: BTreeSet<&String> = state
        .bridge
        .sets
        .iter()
        .filter(|(name, elems)| {
            name.starts_with(APP_SET_PREFIX)
                && check_word("set", name, 128).is_ok()
                && elems.iter().all(|k| is_port(k, tap))
        })
        .map(|(name, _)| name)
        .collect();
    let mut s = String::new();
    for name in names {
        line!(s, "delete set {BR} {name}");
    }
    (!s.is_empty()).then_some(s)
}

/// Deletes both tables (and nothing else); fine when they are not there.
pub fn teardown_all_script() -> String {
    format!("add table {BR}\ndelete table {BR}\nadd table {IN}\ndelete table {IN}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fence::policy::AllowRule;
    use proptest::prelude::*;

    /// A model of the fence's kernel state under the statements these scripts use,
    /// strict where nft is: deleting what is not there, deleting a chain a map element
    /// still jumps to, or giving an existing map key another verdict fails the script.
    fn run(state: &FenceState, script: &str) -> Result<FenceState, String> {
        let mut st = state.clone();
        for line in script.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (verb, family) = (words[..2].join(" "), words[2]);
            assert_eq!(words[3], TABLE, "{line}");
            let t = if family == "bridge" {
                &mut st.bridge
            } else {
                &mut st.inet
            };
            let name = words.get(4).map(|n| n.to_string()).unwrap_or_default();
            let inner = line
                .split_once('{')
                .map(|(_, r)| r.trim_end_matches('}').trim());
            match verb.as_str() {
                "add table" | "flush chain" | "add rule" => {}
                "add set" => {
                    t.sets.entry(name).or_default();
                }
                "add map" => {
                    t.maps.entry(name).or_default();
                }
                "add chain" => {
                    t.chains.insert(name);
                }
                "delete chain" => {
                    let used = t
                        .maps
                        .values()
                        .flatten()
                        .any(|(_, c)| c.as_deref() == Some(&name));
                    if used || !t.chains.remove(&name) {
                        return Err(format!("{line}: missing or in use"));
                    }
                }
                "delete set" => {
                    t.sets.remove(&name).ok_or(format!("{line}: missing"))?;
                }
                "add element" | "delete element" => {
                    let inner = inner.ok_or(format!("{line}: no elements"))?;
                    let (k, v) = match inner.split_once(" : jump ") {
                        Some((k, v)) => (k, Some(v.to_string())),
                        None => (inner, None),
                    };
                    let key: Key = k
                        .split(" . ")
                        .map(|p| p.trim().trim_matches('"').to_string())
                        .collect();
                    let add = verb == "add element";
                    if let Some(set) = t.sets.get_mut(&name) {
                        let had = set.contains(&key);
                        match (add, had) {
                            (true, false) => set.push(key),
                            (true, true) => {}
                            (false, true) => set.retain(|e| *e != key),
                            (false, false) => return Err(format!("{line}: no such element")),
                        }
                    } else if let Some(map) = t.maps.get_mut(&name) {
                        let had = map.iter().position(|(k2, _)| *k2 == key);
                        match (add, had) {
                            (true, None) => map.push((key, v)),
                            (true, Some(i)) if map[i].1 == v => {}
                            (true, Some(_)) => return Err(format!("{line}: key exists")),
                            (false, Some(i)) => {
                                map.remove(i);
                            }
                            (false, None) => return Err(format!("{line}: no such element")),
                        }
                    } else {
                        return Err(format!("{line}: no set or map {name}"));
                    }
                }
                other => return Err(format!("{line}: statement {other:?} not modelled")),
            }
        }
        Ok(st)
    }

    fn base() -> FenceBase {
        FenceBase::new("swg-br0", Subnet::default_pool(), "swg").unwrap()
    }

    fn vm(tap: &str, mac: &str, ip: [u8; 4], app: &str, policy: &EgressPolicy) -> VmFence {
        VmFence::new(tap, mac, Ipv4Addr::from(ip), app, policy).unwrap()
    }

    /// The state with element order (which the model does not keep like nft) sorted.
    fn sorted(state: &FenceState) -> FenceState {
        let mut st = state.clone();
        for t in [&mut st.bridge, &mut st.inet] {
            for e in t.sets.values_mut() {
                e.sort();
            }
            for e in t.maps.values_mut() {
                e.sort();
            }
        }
        st
    }

    fn apply(state: &FenceState, v: &VmFence) -> FenceState {
        let script = vm_script(&base(), v, state);
        run(state, &script).unwrap_or_else(|e| panic!("{e}\n{script}"))
    }

    fn remove(state: &FenceState, tap: &str) -> FenceState {
        let mut st = match removal_script(tap, state) {
            Some(s) => run(state, &s).unwrap_or_else(|e| panic!("{e}\n{s}")),
            None => state.clone(),
        };
        if let Some(s) = emptied_sets_script(tap, state) {
            st = run(&st, &s).unwrap_or_else(|e| panic!("{e}\n{s}"));
        }
        st
    }

    /// Everything in `state` that names `tap`.
    fn traces_of(state: &FenceState, tap: &str) -> Vec<String> {
        let mut found = Vec::new();
        for t in [&state.bridge, &state.inet] {
            found.extend(t.chains.iter().filter(|c| c.ends_with(tap)).cloned());
            for (name, elems) in &t.sets {
                if elems.iter().any(|k| k.iter().any(|p| p == tap)) {
                    found.push(format!("set {name}"));
                }
            }
            for (name, elems) in &t.maps {
                for (k, c) in elems {
                    if k.iter().any(|p| p == tap) || c.as_deref().is_some_and(|c| c.ends_with(tap))
                    {
                        found.push(format!("map {name}"));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn the_base_touches_only_its_own_tables_and_keeps_vms() {
        let s = base_script(&base());
        for line in s.lines() {
            assert!(
                line.contains(&format!(" {TABLE}")),
                "a statement outside the fence's tables: {line}"
            );
            assert!(
                !line.starts_with("delete")
                    && !line.contains("flush table")
                    && !line.contains("ruleset"),
                "the base never removes anything but its own chains' rules: {line}"
            );
        }
        for rule in [
            "prerouting iifname vmap @from_vm",
            "prerouting iifname \"swg*\" drop",
            "input iifname @vm_ports ip daddr 10.0.4.0/24 ip daddr != 10.0.4.1 drop",
            "input iifname @vm_ports arp operation request arp daddr ip != 10.0.4.1 drop",
            "input iifname \"swg-br0\" ct state established,related accept",
            "input iifname \"swg-br0\" drop",
            "forward iifname \"swg-br0\" oifname != \"swg-br0\" jump from_guests",
            "from_guests ip saddr vmap @egress_of",
        ] {
            assert!(s.contains(rule), "missing {rule:?}");
        }
        // Re-applying the base to a state with VMs changes none of them.
        let v = vm(
            "swg0001",
            "02:00:00:00:00:01",
            [10, 0, 4, 2],
            "web",
            &EgressPolicy::default(),
        );
        let with_vm = apply(&FenceState::default(), &v);
        assert_eq!(run(&with_vm, &s).unwrap(), with_vm);
    }

    #[test]
    fn a_vm_sends_only_as_itself() {
        let v = vm(
            "swg0001",
            "02:AB:00:00:00:01",
            [10, 0, 4, 2],
            "web",
            &EgressPolicy::default(),
        );
        let s = vm_script(&base(), &v, &FenceState::default());
        for rule in [
            "out-swg0001 ether saddr != 02:ab:00:00:00:01 drop",
            "out-swg0001 ether type != { ip, arp } drop",
            "out-swg0001 arp saddr ether != 02:ab:00:00:00:01 drop",
            "out-swg0001 arp saddr ip != 10.0.4.2 drop",
            "out-swg0001 ip saddr != 10.0.4.2 drop",
            "to-swg0001 iifname @app-web accept",
            "add element bridge shellwego_fence from_vm { \"swg0001\" : jump out-swg0001 }",
            "add element inet shellwego_fence egress_of { 10.0.4.2 : jump egress-swg0001 }",
        ] {
            assert!(s.contains(rule), "missing {rule:?}:\n{s}");
        }
        // The VM's chains end with a verdict: nothing falls through to the shared
        // "drop every VM port" rule or past the egress policy.
        let last = |chain: &str| {
            s.lines()
                .rev()
                .find(|l| {
                    l.starts_with(&format!("add rule {BR} {chain} "))
                        || l.starts_with(&format!("add rule {IN} {chain} "))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        };
        assert_eq!(last("out-swg0001").as_deref(), Some("accept"));
        assert_eq!(last("to-swg0001").as_deref(), Some("drop"));
        assert_eq!(last("egress-swg0001").as_deref(), Some("accept"));
    }

    #[test]
    fn egress_rules_put_never_first_then_the_allow_list_then_the_policy() {
        let policy = EgressPolicy {
            egress: Egress::Internet,
            allow: vec![
                "10.1.2.0/24:5432".parse::<AllowRule>().unwrap(),
                "192.168.1.10".parse().unwrap(),
            ],
        };
        let r = egress_rules(&policy);
        assert!(
            r[0].contains("169.254.0.0/16")
                && r[0].contains("127.0.0.0/8")
                && r[0].ends_with("drop")
        );
        assert_eq!(
            r[1],
            "ip daddr 10.1.2.0/24 meta l4proto { tcp, udp } th dport 5432 accept"
        );
        assert_eq!(r[2], "ip daddr 192.168.1.10/32 accept");
        assert!(
            r[3].contains("10.0.0.0/8")
                && r[3].contains("100.64.0.0/10")
                && r[3].contains("172.16.0.0/12")
                && r[3].contains("192.168.0.0/16")
        );
        assert_eq!(r[4], "accept");
        let none = egress_rules(&EgressPolicy {
            egress: Egress::None,
            allow: vec![],
        });
        assert_eq!(none.len(), 2);
        assert_eq!(none[1], "drop");
    }

    #[test]
    fn reapplying_converges_and_replaces_a_stale_fence() {
        let p = EgressPolicy::default();
        let a = vm("swg0001", "02:00:00:00:00:01", [10, 0, 4, 2], "web", &p);
        let b = vm("swg0002", "02:00:00:00:00:02", [10, 0, 4, 3], "db", &p);
        let once = apply(&apply(&FenceState::default(), &a), &b);
        assert_eq!(
            sorted(&apply(&once, &a)),
            sorted(&once),
            "applying twice changes nothing"
        );
        // The same port comes back with another MAC, address and app (a stale fence the
        // kernel kept): nothing of the old one stays, the neighbour is untouched.
        let a2 = vm("swg0001", "02:00:00:00:00:09", [10, 0, 4, 9], "api", &p);
        let replaced = apply(&once, &a2);
        let fresh = apply(&apply(&FenceState::default(), &b), &a2);
        let (r, f) = (sorted(&replaced), sorted(&fresh));
        assert_eq!(r, f, "a replaced fence equals a fresh one");
    }

    #[test]
    fn removal_takes_all_of_a_vm_and_nothing_of_its_neighbours() {
        let p = EgressPolicy::default();
        let a = vm("swg0001", "02:00:00:00:00:01", [10, 0, 4, 2], "web", &p);
        let a2 = vm("swg0003", "02:00:00:00:00:03", [10, 0, 4, 4], "web", &p);
        let b = vm("swg0002", "02:00:00:00:00:02", [10, 0, 4, 3], "db", &p);
        let all = apply(&apply(&apply(&FenceState::default(), &a), &b), &a2);
        let without_b = remove(&all, "swg0002");
        assert!(traces_of(&without_b, "swg0002").is_empty());
        assert!(
            !without_b.bridge.sets.contains_key("app-db"),
            "the emptied app set went"
        );
        assert_eq!(traces_of(&without_b, "swg0001"), traces_of(&all, "swg0001"));
        let without_a = remove(&without_b, "swg0001");
        assert!(
            without_a.bridge.sets.contains_key("app-web"),
            "swg0003 still uses it"
        );
        assert_eq!(
            remove(&without_a, "swg0001"),
            without_a,
            "removing twice is fine"
        );
        assert_eq!(removal_script("swg0001", &without_a), None);
        // A half-built fence (chain without elements) goes too.
        let mut half = without_a.clone();
        half.bridge.chains.insert("out-swg0009".into());
        half.inet.chains.insert("egress-swg0009".into());
        assert_eq!(remove(&half, "swg0009"), without_a);
    }

    #[test]
    fn names_that_could_break_a_script_are_refused() {
        let p = EgressPolicy::default();
        let ip = Ipv4Addr::new(10, 0, 4, 2);
        for (tap, mac, app) in [
            ("swg\"x", "02:00:00:00:00:01", "web"),
            ("swg x", "02:00:00:00:00:01", "web"),
            ("swg0123456789abc", "02:00:00:00:00:01", "web"),
            ("swg01", "02:00:00:00:00", "web"),
            ("swg01", "03:00:00:00:00:01", "web"),
            ("swg01", "02:00:00:00:00:0g", "web"),
            ("swg01", "02:00:00:00:00:01", "web; flush ruleset"),
            ("swg01", "02:00:00:00:00:01", ""),
        ] {
            assert!(
                VmFence::new(tap, mac, ip, app, &p).is_err(),
                "{tap} {mac} {app}"
            );
        }
        assert!(FenceBase::new("br}0", Subnet::default_pool(), "swg").is_err());
    }

    fn policy_strategy() -> impl Strategy<Value = EgressPolicy> {
        (
            prop_oneof![Just(Egress::Internet), Just(Egress::None)],
            proptest::collection::vec((any::<u32>(), 8u8..=32, proptest::option::of(1u16..)), 0..4),
        )
            .prop_map(|(egress, raw)| {
                let allow = raw
                    .into_iter()
                    .filter_map(|(ip, len, port)| {
                        let mask = u32::MAX << (32 - u32::from(len));
                        let text = format!("{}/{len}", Ipv4Addr::from(ip & mask));
                        let text = match port {
                            Some(p) => format!("{text}:{p}"),
                            None => text,
                        };
                        text.parse().ok()
                    })
                    .collect();
                EgressPolicy { egress, allow }
            })
    }

    proptest! {
        #[test]
        fn any_sequence_of_applies_and_removals_stays_consistent(
            ops in proptest::collection::vec((0usize..4, any::<bool>(), 0usize..3, 2u8..200, policy_strategy()), 1..12)
        ) {
            let apps = ["web", "db", "api"];
            let mut st = FenceState::default();
            let mut live: std::collections::BTreeMap<String, VmFence> = Default::default();
            for (n, add, app, host, policy) in ops {
                let tap = format!("swg{n:04}");
                if add {
                    // One address per VM, as the IPAM guarantees.
                    let ip = [10, 0, 4, 10 + n as u8 + host % 2 * 100];
                    let v = vm(&tap, &format!("02:00:00:00:{:02x}:{:02x}", n, host), ip, apps[app], &policy);
                    live.retain(|t, o| *t == tap || o.ip != v.ip);
                    st = apply(&st, &v);
                    live.insert(tap, v);
                } else {
                    st = remove(&st, &tap);
                    live.remove(&tap);
                }
                // What the kernel holds is exactly the live VMs' elements.
                let ports: BTreeSet<String> = st.bridge.set("vm_ports").iter().map(|k| k[0].clone()).collect();
                prop_assert_eq!(&ports, &live.keys().cloned().collect::<BTreeSet<_>>());
                prop_assert_eq!(st.bridge.set("port_mac").len(), live.len());
                prop_assert_eq!(st.bridge.map("from_vm").len(), live.len());
                prop_assert_eq!(st.inet.map("egress_of").len(), live.len());
                for (tap, v) in &live {
                    let sets: Vec<&String> = app_sets_of(&st.bridge, tap).collect();
                    let want = app_set(&v.app);
                    prop_assert_eq!(sets, vec![&want]);
                    prop_assert!(st.inet.map("egress_of").iter().any(|(k, c)| k[0] == v.ip.to_string() && c.as_deref() == Some(egress_chain(tap).as_str())));
                }
                for (name, elems) in &st.bridge.sets {
                    if name.starts_with(APP_SET_PREFIX) {
                        prop_assert!(!elems.is_empty(), "empty app set {} left", name);
                    }
                }
            }
        }

        #[test]
        fn scripts_only_ever_name_the_fence_tables(
            n in 0u32..0xffff, app in "[a-z][a-z0-9-]{0,31}", ip in any::<u32>(), policy in policy_strategy()
        ) {
            let v = vm(&format!("swg{n:x}"), "02:00:00:00:00:01", Ipv4Addr::from(ip).octets(), &app, &policy);
            let s = vm_script(&base(), &v, &FenceState::default());
            for line in s.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                prop_assert!(matches!(words[0], "add" | "flush" | "delete"), "{}", line);
                prop_assert!(matches!(words[2], "bridge" | "inet"), "{}", line);
                prop_assert_eq!(words[3], TABLE);
            }
        }
    }
}
