//! The kernel VFIO backend: a host PCI function bound to vfio-pci, through vfio-ioctls.
//!
//! - `backend.rs`: [`KernelVfio`], the [`VfioBackend`](crate::vfio::VfioBackend) over the
//!   device fd (untested against hardware here: these machines have no `/dev/vfio`);
//! - [`migration`]: [`DeviceMigration`](crate::vfio::migration::DeviceMigration) over the
//!   kernel's VFIO migration v2 uAPI, tested against a fake kernel (the ioctls themselves
//!   untested against hardware).

mod backend;
pub mod migration;

pub use backend::{KernelVfio, KernelVfioError};
