//! Storage for ShellWeGo: ZFS datasets (`zfs`), OCI images and their layers, and the
//! copy-on-write root disks of VMs.

pub mod zfs;

pub use zfs::{DatasetInfo, DatasetKind, PoolHealth, ZfsError, ZfsFlavor, ZfsManager};
