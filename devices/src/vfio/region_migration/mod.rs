//! The VMM's side of a VFIO migration v1 region: the third source of
//! [`DeviceMigration`](super::migration::DeviceMigration), beside the kernel's v2 uAPI
//! ([`super::kernel::migration`]) and vfio-user's v2 messages ([`super::user::migration`]).
//!
//! A v1 region is `struct vfio_device_migration_info` followed by a data window, in the
//! layout of the 2019 "mediate ops in vfio-pci" proposal. Two kinds of device offer one:
//! a mediated device, whose mediator serves the region in this process (the region's side,
//! `MigrationRegion` over a mediator's `MigrationOps`, is in the `mediate` crate), and a
//! vfio-user server built on libvfio-user 0.1, which serves it over the socket. Both are
//! driven here through [`VfioBackend`](super::VfioBackend) region accesses.
//!
//! - [`layout`]: offsets, `device_state` encoding, region type, and the transition table
//!   (each legal transition, the one-bit steps that make it, and why it exists), shared
//!   by both sides so they cannot drift;
//! - `driver.rs`: [`RegionMigration`], the register protocol as a `DeviceMigration`;
//! - `dirty.rs`: [`DirtyTracker`], where the dirty pages come from (v1 has no field for
//!   them);
//! - `error.rs`: [`OpsError`], the failure a region's hooks or a dirty tracker report.

mod dirty;
mod driver;
mod error;
pub mod layout;

pub use dirty::DirtyTracker;
pub use driver::RegionMigration;
pub use error::{OpsError, OpsResult};
