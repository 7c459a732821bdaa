//! The vfio-pci device: a PCI function passed through to the guest.
//!
//! The device model knows one seam, the [`VfioBackend`] trait: [`pci`] and the files it
//! uses (configuration space, BARs, interrupts, placement) never name a backend. The
//! backends sit beside it, one folder each with the device migration that backend offers;
//! only the VMM, which builds the devices, picks one.
//!
//! - [`backend`]: [`VfioBackend`], what the function needs from "a VFIO device", so the same
//!   device type serves kernel VFIO and vfio-user;
//! - [`pci`]: [`VfioPciDevice`], the function on the guest's PCI bus, with its virtualized
//!   configuration space (`config.rs`, `bars.rs`), interrupts (`irq.rs`, over
//!   [`crate::pci::msix`] and [`crate::pci::msi`]; [`intx`] for INTx) and BAR placement
//!   (`placement.rs`, `mmap.rs`: the one place that computes what of a BAR is mapped) and
//!   save/restore of what the guest programmed ([`VfioPciState`], `pci/persist.rs`);
//! - [`kernel`]: the kernel VFIO backend over vfio-ioctls (untested against hardware here)
//!   and its migration over the kernel's VFIO migration v2 uAPI ([`kernel::migration`],
//!   tested against a fake kernel);
//! - [`user`]: the vfio-user backend over a [`vfio_user::Client`], the server's DMA into
//!   guest RAM, and its migration: vfio-user's v2 messages ([`user::migration`]) or, for
//!   a libvfio-user 0.1 server, its v1 migration region;
//! - [`migration`]: [`migration::DeviceMigration`], the one interface through which the VMM
//!   saves and restores a device's state and learns the pages it wrote by DMA;
//! - [`region_migration`]: [`region_migration::RegionMigration`], that interface over a
//!   VFIO migration v1 region (a mediator's, or a vfio-user server's), with its layout;
//! - [`testing`]: a fake backend and a fake memory-slot backend.

pub mod backend;
mod bars;
mod config;
mod errlog;
pub mod intx;
mod irq;
pub mod kernel;
pub mod migration;
mod mmap;
pub mod pci;
mod placement;
mod ranges;
pub mod region_migration;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trap_all;
pub mod user;

#[cfg(test)]
mod tests;

pub use backend::{BackendError, DeviceInfo, IrqInfo, RegionFlags, RegionInfo, VfioBackend};
pub use bars::{BarDesc, BarError, BarKind};
pub use intx::{IntxRoutes, IntxRouting};
pub use kernel::{KernelVfio, KernelVfioError};
pub use pci::{
    BarLayout, BarStats, BarTraps, CapLayout, MsiCapLayout, MsixCapLayout, VfioPciDevice,
    VfioPciError, VfioPciLayout, VfioPciParams, VfioPciState, VfioPersistError,
};
pub use placement::{PlacementError, TrapOwner};
pub use trap_all::TrapAll;
