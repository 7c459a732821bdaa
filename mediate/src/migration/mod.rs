//! The migration region, the mediator's side.
//!
//! A mediated device that cannot migrate itself gets a migration region from its mediator,
//! in the layout of the 2019 "mediate ops in vfio-pci" proposal (VFIO migration v1's
//! `struct vfio_device_migration_info` followed by a data window). The layout and the
//! VMM's side, which drives any v1 region (a mediator's or a vfio-user server's), are in
//! [`devices::vfio::region_migration`]; this crate serves the region:
//!
//! - [`MigrationRegion`]: the region's side, the register protocol over a mediator's
//!   [`MigrationOps`]; a mediator serves its `read`/`write` as one of its device's regions,
//!   and it is the [`DirtyTracker`](devices::vfio::region_migration::DirtyTracker) the
//!   VMM's [`RegionMigration`](devices::vfio::region_migration::RegionMigration) takes
//!   dirty pages from;
//! - [`testing`]: [`testing::FakeOps`], a fake mediator for tests.

mod region;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use region::{MigrationOps, MigrationRegion, RegionError};
