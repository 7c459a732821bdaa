//! Checked allocators for guest address space and small integer ids.
//!
//! [`AddressAllocator`] hands out ranges of an address space (PCI BAR
//! windows, MMIO for platform devices); [`IdAllocator`] hands out ids (GSIs,
//! PCI slots, KVM memory slot numbers). Both refuse overlapping reservations,
//! double frees and frees of things never handed out.

mod address;
mod id;

pub use address::{AddressAllocError, AddressAllocator, Policy, Range};
pub use id::{IdAllocError, IdAllocator};
