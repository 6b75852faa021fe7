//! The ShellWeGo node agent as a library: the pure core (resource math, app specs,
//! reconciliation planning, Firecracker machine configuration) and the host-facing
//! pieces built on it (host detection, `doctor`).

pub mod admission;
pub mod api;
pub mod app_snapshot;
pub mod bounds;
pub mod client;
pub mod command;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod doctor;
pub mod endpoint;
pub mod fault;
pub mod guest;
pub mod hardening;
pub mod health;
pub mod host;
pub mod image_template;
pub mod initrd;
pub mod provision;
pub mod reconciler;
pub mod resources;
pub mod runconfig;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod suspend;
pub mod template;
pub mod uds_http;
pub mod units;
pub mod vault;
pub mod vmm;
pub mod wire;
