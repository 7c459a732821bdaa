//! Devices on the guest's buses.
//!
//! - [`bus`]: the port-I/O and MMIO buses every exit is dispatched through;
//! - [`legacy`]: the 16550 serial ports and the i8042 controller (reset line);
//! - [`pci`]: PCI configuration space, the host bridge and the configuration mechanism #1
//!   (ports 0xCF8/0xCFC) root.
//! - [`vfio`]: the vfio-pci device over its backend trait, the kernel VFIO and vfio-user
//!   backends beside it, and their device migrations.
//!
//! Every device's guest-visible state can be saved and restored as a plain serde struct.
//! What the VMM saves goes through [`Persist`]: [`legacy::SerialPortState`],
//! [`legacy::I8042State`], [`pci::PciRootState`] (the CONFIG_ADDRESS latch) and
//! [`vfio::VfioPciState`] (a passed-through function's virtualized configuration). The host
//! bridge's [`pci::ConfigSpaceState`] has `state()` / `restore()` but is not saved (its only
//! guest-writable registers, command and cache line size, change nothing here). The stream that carries the states
//! is versioned by the `migration` crate; a passed-through device's internal state travels
//! through [`vfio::migration::DeviceMigration`].

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod trigger;
pub mod vfio;
pub mod wait;

pub use bus::{Bus, BusError, BusStats};
pub use persist::Persist;
