//! Storage for ShellWeGo: ZFS datasets (`zfs`), OCI images and their layer cache
//! (`image`), layers fetched and checked in one pass (`fetch`, `spool`, `layer`), layer
//! unpacking (`unpack`), and the copy-on-write root disks of VMs (`rootfs`). Atomic
//! writes, the file lock and `/proc` facts come from `shellwego-sys`.

pub mod ext4;
pub mod fetch;
pub mod image;
pub mod layer;
pub mod rootfs;
pub mod spool;
#[cfg(test)]
mod testserver;
pub mod unpack;
pub mod zfs;

pub use image::{ImageBudget, ImageStore, PulledImage, RegistryConfig};
pub use rootfs::{BaseImage, RootfsBuilder, VmDisk};
pub use zfs::{DatasetInfo, DatasetKind, PoolHealth, ZfsError, ZfsFlavor, ZfsManager};
