//! Mediated vfio-pci: plug-ins ("mediators") that sit between the VMM's vfio-pci device and
//! the device's backend, and can trap and untrap BAR subregions while the guest runs.
//!
//! - [`mediator`]: the [`Mediator`] and [`MediatedDevice`] traits a plug-in implements;
//! - [`registry`]: [`Registry`], mediators by name, and `mediator=auto`;
//! - [`backend`]: [`MediatedBackend`], the backend wrapper that routes a device's region
//!   info, accesses and mmaps through its mediator;
//! - [`attach`]: [`TrapHandle`] (run-time trap/untrap) and guest-memory access given to a
//!   mediator once its device exists;
//! - [`identity`]: what a mediator is told about a device, and the options it gets;
//! - [`migration`]: the migration region (the layout of the 2019 "mediate ops" proposal)
//!   and the helper that implements its protocol for a mediator (the layout and the VMM's
//!   driver of the region are `devices::vfio::region_migration`);
//! - [`mediators`]: the bundled mediators, `virtio-blk-vf` and `trace`.

#![deny(missing_docs)]

pub mod attach;
pub mod backend;
pub mod error;
pub mod identity;
pub mod mediator;
pub mod mediators;
pub mod migration;
pub mod registry;

pub use attach::{AttachContext, GuestMemory, TrapHandle, TrapOwner};
pub use backend::MediatedBackend;
pub use error::{MediateError, Result};
pub use identity::{BarRange, DeviceIdentity, MediatorOptions};
pub use mediator::{Access, MediatedDevice, Mediator, Probe};
pub use registry::{Registry, Selector};
