//! The migration region: layout, protocol helper and the VMM-side reader.
//!
//! A mediated device that cannot migrate itself gets a migration region from its mediator,
//! in the layout of the 2019 "mediate ops in vfio-pci" proposal (VFIO migration v1's
//! `struct vfio_device_migration_info` followed by a data window):
//!
//! - [`layout`]: offsets, `device_state` encoding, region type, and the transition table
//!   (each legal transition, the one-bit steps that make it, and why it exists);
//! - [`MigrationRegion`]: the region's side, the register protocol over a mediator's
//!   [`MigrationOps`]; a mediator serves its `read`/`write` as one of its device's regions;
//! - [`RegionMigration`]: the VMM's side, a [`devices::vfio::migration::DeviceMigration`]
//!   that drives the protocol through [`devices::vfio::VfioBackend`] region accesses, with
//!   dirty pages from a [`DirtyTracker`];
//! - [`testing`]: [`testing::FakeOps`], a fake mediator for tests.

pub mod layout;
mod region;
mod region_migration;
pub mod testing;

pub use region::{DirtyTracker, MigrationOps, MigrationRegion, OpsError, OpsResult, RegionError};
pub use region_migration::RegionMigration;
