//! What a KVM memory slot maps: [`Mapping`] and its parts.

use std::fmt;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};

/// A KVM memory slot number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId(pub u32);

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How the guest may use a mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapFlags {
    /// Guest writes exit to user space as MMIO instead of reaching memory
    /// (`KVM_MEM_READONLY`).
    pub readonly: bool,
    /// KVM tracks pages the guest writes (`KVM_MEM_LOG_DIRTY_PAGES`).
    pub log_dirty: bool,
}

impl MapFlags {
    /// The `flags` field of `kvm_userspace_memory_region` for these flags.
    pub fn kvm_flags(self) -> u32 {
        let mut flags = 0;
        if self.readonly {
            flags |= KVM_MEM_READONLY;
        }
        if self.log_dirty {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        flags
    }
}

/// What a mapping is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingKind {
    /// Guest RAM.
    Ram,
    /// Memory of a device (a BAR, a ROM, shared memory) mapped directly.
    Device {
        /// Name of the device that owns the memory.
        owner: String,
    },
}

/// A guest physical range backed by host memory through one KVM memory slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Host virtual address backing `gpa`.
    pub host_addr: u64,
    /// How the guest may use it.
    pub flags: MapFlags,
    /// What it is for.
    pub kind: MappingKind,
}

impl Mapping {
    /// One past the last guest physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Whether `gpa` lies inside this mapping.
    pub fn contains(&self, gpa: u64) -> bool {
        self.gpa <= gpa && gpa < self.end()
    }

    /// The part `[gpa, gpa + size)` of this mapping, which must lie inside it.
    pub(super) fn slice(&self, gpa: u64, size: u64) -> Mapping {
        debug_assert!(self.gpa <= gpa && gpa + size <= self.end());
        Mapping {
            gpa,
            size,
            host_addr: self.host_addr + (gpa - self.gpa),
            flags: self.flags,
            kind: self.kind.clone(),
        }
    }

    /// Whether `next` starts where this mapping ends, in guest and in host
    /// memory, with the same flags and kind, so both can share one slot.
    pub(super) fn continues_into(&self, next: &Mapping) -> bool {
        self.end() == next.gpa
            && self.host_addr + self.size == next.host_addr
            && self.flags == next.flags
            && self.kind == next.kind
    }

    /// The KVM region that installs this mapping in `slot`.
    pub(super) fn region(&self, slot: SlotId) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: slot.0,
            flags: self.flags.kvm_flags(),
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.gpa, self.end())
    }
}

/// The KVM region that deletes `slot`.
pub(super) fn delete_region(slot: SlotId) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: slot.0,
        ..Default::default()
    }
}
