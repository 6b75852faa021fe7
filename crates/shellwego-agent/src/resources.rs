//! What an app asks for: CPU, memory and disk, parsed from human units.

use serde::{Deserialize, Serialize};

use crate::units::{self, UnitError};

/// Resources of one VM. CPU in thousandths of a core, sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceSpec {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// Default disk size of a VM's root image when the spec names none.
pub const DEFAULT_DISK_BYTES: u64 = 1 << 30;

impl Default for ResourceSpec {
    fn default() -> Self {
        ResourceSpec {
            cpu_milli: 1000,
            memory_bytes: 128 << 20,
            disk_bytes: DEFAULT_DISK_BYTES,
        }
    }
}

/// A field of a resource spec that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {source}")]
pub struct FieldError {
    /// Dotted path of the field, e.g. `resources.memory`.
    pub field: String,
    #[source]
    pub source: UnitError,
}

impl FieldError {
    pub fn new(field: impl Into<String>, source: UnitError) -> Self {
        FieldError {
            field: field.into(),
            source,
        }
    }
}

impl ResourceSpec {
    /// Parses the three quantities; a missing one takes its default. `prefix` names the
    /// table they came from (e.g. `resources`) so that errors name the whole field.
    pub fn parse(
        prefix: &str,
        cpu: Option<&str>,
        memory: Option<&str>,
        disk: Option<&str>,
    ) -> Result<ResourceSpec, FieldError> {
        let d = ResourceSpec::default();
        let field = |name: &str| format!("{prefix}.{name}");
        Ok(ResourceSpec {
            cpu_milli: match cpu {
                Some(t) => {
                    units::parse_cpu_milli(t).map_err(|e| FieldError::new(field("cpu"), e))?
                }
                None => d.cpu_milli,
            },
            memory_bytes: match memory {
                Some(t) => {
                    units::parse_bytes(t).map_err(|e| FieldError::new(field("memory"), e))?
                }
                None => d.memory_bytes,
            },
            disk_bytes: match disk {
                Some(t) => units::parse_bytes(t).map_err(|e| FieldError::new(field("disk"), e))?,
                None => d.disk_bytes,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_the_field() {
        let err = ResourceSpec::parse("resources", Some("1"), Some("lots"), None).unwrap_err();
        assert_eq!(err.field, "resources.memory");
        assert!(err.to_string().contains("resources.memory"), "{err}");
        assert!(err.to_string().contains("lots"), "{err}");
    }

    #[test]
    fn parse_fills_defaults() {
        let spec = ResourceSpec::parse("r", Some("500m"), Some("512Mi"), None).unwrap();
        assert_eq!(spec.cpu_milli, 500);
        assert_eq!(spec.memory_bytes, 536_870_912);
        assert_eq!(spec.disk_bytes, DEFAULT_DISK_BYTES);
    }
}
