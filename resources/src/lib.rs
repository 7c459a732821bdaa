//! Guest resources of the VMM: the x86_64 guest physical address layout
//! ([`layout`]), checked allocators for address ranges and ids ([`alloc`]),
//! and [`memslots::MemSlots`], the single owner of the VM's KVM memory slots.

#![deny(missing_docs)]

pub mod alloc;
pub mod layout;
pub mod memslots;
