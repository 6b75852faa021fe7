//! What of the fence the kernel holds, read from `nft -j list table`: the chains, the
//! named sets with their elements and the verdict maps with theirs. Pure parsing; the
//! listing itself is done by `crate::nft`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::nft::NftError;

/// An element's key as text, one part per field of a concatenation.
pub type Key = Vec<String>;

/// One table's chains, sets and verdict maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableState {
    pub chains: BTreeSet<String>,
    pub sets: BTreeMap<String, Vec<Key>>,
    /// Each element: key, and the chain its verdict jumps (or goes) to.
    pub maps: BTreeMap<String, Vec<(Key, Option<String>)>>,
}

/// Both tables of the fence.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FenceState {
    pub bridge: TableState,
    pub inet: TableState,
}

impl TableState {
    /// The elements of set `name` (none if there is no such set).
    pub fn set(&self, name: &str) -> &[Key] {
        self.sets.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    /// The elements of map `name` (none if there is no such map).
    pub fn map(&self, name: &str) -> &[(Key, Option<String>)] {
        self.maps.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    /// Parses nft's JSON listing of one table (`None`: the table does not exist).
    pub fn parse(listing: Option<&Value>) -> Result<TableState, NftError> {
        let mut state = TableState::default();
        let Some(listing) = listing else {
            return Ok(state);
        };
        let objects = listing
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no \"nftables\" array", listing))?;
        for object in objects {
            if let Some(chain) = object.get("chain") {
                state.chains.insert(name_of(chain)?);
            } else if let Some(set) = object.get("set") {
                let elems = elements(set)?
                    .iter()
                    .map(key)
                    .collect::<Result<Vec<_>, _>>()?;
                state.sets.insert(name_of(set)?, elems);
            } else if let Some(map) = object.get("map") {
                let mut elems = Vec::new();
                for pair in elements(map)? {
                    let [k, v] = pair.as_array().map(Vec::as_slice).unwrap_or_default() else {
                        return Err(bad("a map element that is not [key, value]", pair));
                    };
                    elems.push((key(k)?, target(v)));
                }
                state.maps.insert(name_of(map)?, elems);
            }
        }
        Ok(state)
    }
}

fn bad(what: &str, value: &Value) -> NftError {
    let mut text = value.to_string();
    text.truncate(200);
    NftError::Json(format!("{what}: {text}"))
}

fn name_of(object: &Value) -> Result<String, NftError> {
    object
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| bad("an object without a name", object))
}

fn elements(object: &Value) -> Result<&[Value], NftError> {
    match object.get("elem") {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(bad("\"elem\" is not an array", other)),
    }
}

fn key(value: &Value) -> Result<Key, NftError> {
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Number(n) => Ok(vec![n.to_string()]),
        Value::Object(o) => {
            if let Some(Value::Array(parts)) = o.get("concat") {
                let mut out = Vec::new();
                for p in parts {
                    out.extend(key(p)?);
                }
                Ok(out)
            } else if let Some(val) = o.get("elem").and_then(|e| e.get("val")) {
                key(val)
            } else {
                Err(bad("an element of an unknown form", value))
            }
        }
        _ => Err(bad("an element of an unknown form", value)),
    }
}

fn target(verdict: &Value) -> Option<String> {
    ["jump", "goto"]
        .iter()
        .find_map(|k| verdict.get(k)?.get("target")?.as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verbatim from `nft -j list table bridge shellwego_fence` (nftables 1.0.6), rules cut.
    const BRIDGE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "bridge", "name": "shellwego_fence", "handle": 1}}, {"set": {"family": "bridge", "name": "vm_ports", "table": "shellwego_fence", "type": "ifname", "handle": 1, "elem": ["swg0123"]}}, {"set": {"family": "bridge", "name": "port_mac", "table": "shellwego_fence", "type": ["ifname", "ether_addr"], "handle": 2, "elem": [{"concat": ["swg0123", "02:00:00:00:00:01"]}]}}, {"map": {"family": "bridge", "name": "from_vm", "table": "shellwego_fence", "type": "ifname", "handle": 3, "map": "verdict", "elem": [["swg0123", {"jump": {"target": "out-swg0123"}}]]}}, {"map": {"family": "bridge", "name": "to_vm", "table": "shellwego_fence", "type": "ifname", "handle": 4, "map": "verdict"}}, {"set": {"family": "bridge", "name": "app-web", "table": "shellwego_fence", "type": "ifname", "handle": 15, "elem": ["swg0123"]}}, {"chain": {"family": "bridge", "table": "shellwego_fence", "name": "prerouting", "handle": 5, "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}}, {"chain": {"family": "bridge", "table": "shellwego_fence", "name": "out-swg0123", "handle": 16}}, {"rule": {"family": "bridge", "table": "shellwego_fence", "chain": "prerouting", "handle": 9, "expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@from_vm"}}]}}]}"#;

    #[test]
    fn a_real_listing_parses() {
        let v: Value = serde_json::from_str(BRIDGE).unwrap();
        let s = TableState::parse(Some(&v)).unwrap();
        assert!(s.chains.contains("prerouting") && s.chains.contains("out-swg0123"));
        assert_eq!(s.set("vm_ports"), &[vec!["swg0123".to_string()]]);
        assert_eq!(
            s.set("port_mac"),
            &[vec!["swg0123".to_string(), "02:00:00:00:00:01".to_string()]]
        );
        assert_eq!(
            s.map("from_vm"),
            &[(vec!["swg0123".to_string()], Some("out-swg0123".to_string()))]
        );
        assert!(s.map("to_vm").is_empty());
        assert!(s.set("no-such-set").is_empty());
        assert_eq!(TableState::parse(None).unwrap(), TableState::default());
    }

    #[test]
    fn unknown_shapes_are_errors_not_guesses() {
        for text in [
            r#"{"nope": []}"#,
            r#"{"nftables": [{"set": {"name": "s", "elem": [[1, 2]]}}]}"#,
            r#"{"nftables": [{"map": {"name": "m", "elem": ["x"]}}]}"#,
            r#"{"nftables": [{"chain": {"table": "t"}}]}"#,
        ] {
            let v: Value = serde_json::from_str(text).unwrap();
            assert!(TableState::parse(Some(&v)).is_err(), "{text}");
        }
        let wrapped: Value = serde_json::from_str(
            r#"{"nftables": [{"set": {"name": "s", "elem": [{"elem": {"val": "a", "timeout": 5}}, 7]}}]}"#,
        )
        .unwrap();
        let s = TableState::parse(Some(&wrapped)).unwrap();
        assert_eq!(s.set("s"), &[vec!["a".to_string()], vec!["7".to_string()]]);
    }
}
