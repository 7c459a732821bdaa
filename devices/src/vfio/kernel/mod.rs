//! The kernel VFIO backend: a host PCI function bound to vfio-pci (or an mdev).
//!
//! - `backend.rs`: [`KernelVfio`], the [`VfioBackend`](crate::vfio::VfioBackend) over the
//!   device fd;
//! - `group.rs`: opening a device in a no-IOMMU container (type1 goes through vfio-ioctls);
//! - `device_fd.rs`: the device fd's info, region (with capabilities), IRQ and reset ioctls;
//! - [`migration`]: [`DeviceMigration`](crate::vfio::migration::DeviceMigration) over the
//!   kernel's VFIO migration v2 uAPI, tested against a fake kernel in unit tests.
//!
//! The hosts here have no VFIO; all of this is tested against the real Linux VFIO inside a
//! 6.12 guest (vfio-pci in no-IOMMU mode, and mtty mdevs): `tests/tests/guest_vfio.rs`.

mod backend;
mod device_fd;
mod group;
pub mod migration;

pub use backend::{KernelVfio, KernelVfioError};
