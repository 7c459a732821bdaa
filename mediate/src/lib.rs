//! Mediated vfio-pci: plug-ins ("mediators") that sit between the VMM's vfio-pci device and
//! the device's backend, and can trap and untrap BAR subregions while the guest runs.
//!
//! - [`migration`]: the migration region (the layout of the 2019 "mediate ops" proposal)
//!   and the helper that implements its protocol for a mediator.

#![deny(missing_docs)]

pub mod migration;
