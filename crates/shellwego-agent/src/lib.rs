//! The ShellWeGo node agent as a library: the pure core (resource math, app specs,
//! reconciliation planning, Firecracker machine configuration) and the host-facing
//! pieces built on it (host detection, `doctor`).

pub mod config;
pub mod doctor;
pub mod guest;
pub mod host;
pub mod initrd;
pub mod reconciler;
pub mod resources;
pub mod snapshot;
pub mod spec;
pub mod template;
pub mod units;
pub mod vmm;
