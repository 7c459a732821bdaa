//! The record of live slots, changed only after KVM accepted each change.

use std::collections::BTreeMap;

use super::error::{MemSlotsError, Result};
use super::mapping::{delete_region, MapFlags, Mapping, SlotId};
use super::SlotBackend;
use crate::alloc::IdAllocator;

/// Live mappings by first guest address, and the slot numbers in use.
///
/// Every change goes to KVM first and is recorded only if KVM accepted it,
/// so the record always describes what KVM has, even after a failure.
pub(super) struct Record {
    by_gpa: BTreeMap<u64, (SlotId, Mapping)>,
    /// Slot numbers in use; `None` if the backend has no slots at all.
    slots: Option<IdAllocator>,
    max_slots: u32,
}

impl Record {
    /// An empty record for a backend with `max_slots` slots.
    pub(super) fn new(max_slots: u32) -> Self {
        let slots = max_slots
            .checked_sub(1)
            .and_then(|last| IdAllocator::new(0, last).ok());
        Record {
            by_gpa: BTreeMap::new(),
            slots,
            max_slots,
        }
    }

    /// Number of slots the backend supports.
    pub(super) fn max_slots(&self) -> u32 {
        self.max_slots
    }

    /// Number of slot numbers not in use.
    pub(super) fn free_slots(&self) -> u64 {
        self.slots.as_ref().map_or(0, IdAllocator::available)
    }

    /// All live mappings, sorted by guest address.
    pub(super) fn all(&self) -> impl Iterator<Item = &(SlotId, Mapping)> {
        self.by_gpa.values()
    }

    /// The mapping that starts at `gpa`.
    pub(super) fn starting_at(&self, gpa: u64) -> Option<&(SlotId, Mapping)> {
        self.by_gpa.get(&gpa)
    }

    /// The mapping that contains `gpa`.
    pub(super) fn containing(&self, gpa: u64) -> Option<&(SlotId, Mapping)> {
        self.by_gpa
            .range(..=gpa)
            .next_back()
            .map(|(_, entry)| entry)
            .filter(|(_, m)| m.contains(gpa))
    }

    /// The mapping that ends exactly at `gpa` (exclusive end).
    pub(super) fn ending_at(&self, gpa: u64) -> Option<&(SlotId, Mapping)> {
        self.by_gpa
            .range(..gpa)
            .next_back()
            .map(|(_, entry)| entry)
            .filter(|(_, m)| m.end() == gpa)
    }

    /// The lowest mapping that overlaps `[gpa, end)`.
    pub(super) fn first_overlap(&self, gpa: u64, end: u64) -> Option<&(SlotId, Mapping)> {
        self.containing(gpa)
            .or_else(|| self.by_gpa.range(gpa..end).next().map(|(_, entry)| entry))
    }

    /// Installs `mapping` in a new slot: `slot` if given (it must be free),
    /// else the lowest free one.
    ///
    /// # Safety
    ///
    /// `mapping` must not overlap a live mapping, and its host range must
    /// meet the contract of [`SlotBackend::set_user_memory_region`].
    pub(super) unsafe fn create(
        &mut self,
        backend: &dyn SlotBackend,
        slot: Option<SlotId>,
        mapping: Mapping,
    ) -> Result<SlotId> {
        let ids = self.slots.as_mut();
        let slot = match slot {
            Some(slot) => ids.and_then(|ids| ids.allocate_exact(slot.0).ok().map(|()| slot)),
            None => ids.and_then(|ids| ids.allocate().ok().map(SlotId)),
        }
        .ok_or(MemSlotsError::NoFreeSlot {
            op: "map",
            gpa: mapping.gpa,
            end: mapping.end(),
            needed: 1,
            max: self.max_slots,
        })?;
        // SAFETY: the caller guarantees no overlap and valid host memory.
        let res = unsafe { backend.set_user_memory_region(mapping.region(slot)) };
        if let Err(source) = res {
            // The slot number was never used by KVM; give it back.
            self.release(slot);
            return Err(kvm_error("create", slot, &mapping, source));
        }
        self.by_gpa.insert(mapping.gpa, (slot, mapping));
        Ok(slot)
    }

    /// Deletes the slot of the mapping that starts at `gpa`.
    pub(super) fn delete(
        &mut self,
        backend: &dyn SlotBackend,
        op: &'static str,
        gpa: u64,
    ) -> Result<(SlotId, Mapping)> {
        let (slot, mapping) = self
            .starting_at(gpa)
            .cloned()
            .ok_or(MemSlotsError::NotMapped { op, gpa })?;
        // SAFETY: a zero-sized region deletes the slot; it maps no memory.
        let res = unsafe { backend.set_user_memory_region(delete_region(slot)) };
        res.map_err(|source| kvm_error("delete", slot, &mapping, source))?;
        self.by_gpa.remove(&gpa);
        self.release(slot);
        Ok((slot, mapping))
    }

    /// Changes the flags of the mapping that starts at `gpa`.
    pub(super) fn set_flags(
        &mut self,
        backend: &dyn SlotBackend,
        op: &'static str,
        gpa: u64,
        flags: MapFlags,
    ) -> Result<()> {
        let (slot, mapping) = self
            .by_gpa
            .get_mut(&gpa)
            .ok_or(MemSlotsError::NotMapped { op, gpa })?;
        let mut changed = mapping.clone();
        changed.flags = flags;
        // SAFETY: the same slot, guest range and host range as the live
        // mapping, whose host memory its creator vouched for; only the flags
        // differ, so no new memory is exposed and nothing new overlaps.
        let res = unsafe { backend.set_user_memory_region(changed.region(*slot)) };
        res.map_err(|source| kvm_error("change the flags of", *slot, mapping, source))?;
        *mapping = changed;
        Ok(())
    }
}

impl Record {
    /// Returns a slot number taken by `create`.
    fn release(&mut self, slot: SlotId) {
        if let Some(ids) = self.slots.as_mut() {
            // Cannot fail: the number was taken when the slot was created.
            let _ = ids.free(slot.0);
        }
    }
}

fn kvm_error(
    op: &'static str,
    slot: SlotId,
    mapping: &Mapping,
    source: std::io::Error,
) -> MemSlotsError {
    MemSlotsError::Kvm {
        op,
        slot,
        gpa: mapping.gpa,
        end: mapping.end(),
        source,
    }
}
