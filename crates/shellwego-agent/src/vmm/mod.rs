//! MicroVMs: the pure translation of an app's resources into Firecracker's machine
//! configuration (`config`).

pub mod config;
