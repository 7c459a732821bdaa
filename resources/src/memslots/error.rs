//! Why a [`MemSlots`](super::MemSlots) operation failed.

use std::io;

use thiserror::Error;

use super::SlotId;

/// Why a [`MemSlots`](super::MemSlots) operation failed.
#[derive(Debug, Error)]
pub enum MemSlotsError {
    /// An address or size is not a multiple of the 4 KiB page size.
    #[error("cannot {op} {size:#x} bytes at {gpa:#x}: the {what} {value:#x} is not 4 KiB aligned")]
    Unaligned {
        /// The operation refused.
        op: &'static str,
        /// Requested guest physical address.
        gpa: u64,
        /// Requested size.
        size: u64,
        /// Which value is unaligned.
        what: &'static str,
        /// The unaligned value.
        value: u64,
    },
    /// The size is zero.
    #[error("cannot {op} an empty range at {gpa:#x}: the size must be at least one page")]
    ZeroSize {
        /// The operation refused.
        op: &'static str,
        /// Requested guest physical address.
        gpa: u64,
    },
    /// The guest or host range wraps around the 64-bit address space.
    #[error(
        "cannot {op} {size:#x} bytes at {gpa:#x}: the {what} range wraps around the address space"
    )]
    Wraps {
        /// The operation refused.
        op: &'static str,
        /// Requested guest physical address.
        gpa: u64,
        /// Requested size.
        size: u64,
        /// `"guest"` or `"host"`.
        what: &'static str,
    },
    /// The range overlaps a mapping that already exists.
    #[error("cannot {op} [{gpa:#x}, {end:#x}): it overlaps [{existing_gpa:#x}, {existing_end:#x}), already mapped in slot {slot}")]
    Overlap {
        /// The operation refused.
        op: &'static str,
        /// Requested first guest physical address.
        gpa: u64,
        /// Requested end (exclusive).
        end: u64,
        /// First address of the existing mapping.
        existing_gpa: u64,
        /// End (exclusive) of the existing mapping.
        existing_end: u64,
        /// Slot of the existing mapping.
        slot: SlotId,
    },
    /// Every slot number is taken.
    #[error("cannot {op} [{gpa:#x}, {end:#x}): it needs {needed} more KVM memory slot(s) but all {max} are in use")]
    NoFreeSlot {
        /// The operation refused.
        op: &'static str,
        /// Requested first guest physical address.
        gpa: u64,
        /// Requested end (exclusive).
        end: u64,
        /// Free slots the operation needs.
        needed: u64,
        /// Number of slots the backend supports.
        max: u32,
    },
    /// No mapping starts at the address.
    #[error("cannot {op} at {gpa:#x}: no mapping starts there")]
    NotMapped {
        /// The operation refused.
        op: &'static str,
        /// Requested guest physical address.
        gpa: u64,
    },
    /// The range is not entirely inside one mapping.
    #[error("cannot punch [{gpa:#x}, {end:#x}): {why}")]
    NotCovered {
        /// Requested first guest physical address.
        gpa: u64,
        /// Requested end (exclusive).
        end: u64,
        /// What covers the range instead.
        why: String,
    },
    /// KVM refused a `KVM_SET_USER_MEMORY_REGION` call.
    #[error("KVM failed to {op} slot {slot} for [{gpa:#x}, {end:#x}): {source}")]
    Kvm {
        /// `"create"`, `"delete"` or `"change the flags of"`.
        op: &'static str,
        /// The slot involved.
        slot: SlotId,
        /// First guest physical address of the slot.
        gpa: u64,
        /// End (exclusive) of the slot.
        end: u64,
        /// The error KVM returned.
        source: io::Error,
    },
    /// A step failed and undoing the steps before it failed too.
    #[error("{failed}; undoing the steps already done also failed ({undo}), so part of the range may be unmapped (see MemSlots::mappings)")]
    Partial {
        /// The step that failed first.
        failed: Box<MemSlotsError>,
        /// The undo step that failed.
        undo: Box<MemSlotsError>,
    },
}

/// Result of [`MemSlots`](super::MemSlots) operations.
pub type Result<T> = std::result::Result<T, MemSlotsError>;
