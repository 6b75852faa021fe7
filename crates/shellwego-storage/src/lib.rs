//! Storage for ShellWeGo: ZFS datasets (`zfs`), OCI images and their layer cache
//! (`image`), layer unpacking (`unpack`), and the copy-on-write root disks of VMs
//! (`rootfs`).

pub mod atomic;
pub mod image;
pub mod rootfs;
pub mod unpack;
pub mod zfs;

pub use image::{ImageStore, PulledImage, RegistryConfig};
pub use rootfs::{BaseImage, RootfsBuilder, VmDisk};
pub use zfs::{DatasetInfo, DatasetKind, PoolHealth, ZfsError, ZfsFlavor, ZfsManager};
