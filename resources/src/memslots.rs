//! The single owner of KVM memory slots.
//!
//! [`MemSlots`] is the only record of which guest physical ranges are mapped
//! into KVM memory slots, and the only code that changes them. It checks
//! every request (page alignment, overlap, free slot numbers) before KVM sees
//! it, and records a change only after KVM accepted it.
//!
//! # Replacing part of a mapping
//!
//! KVM can neither shrink, split nor merge a slot, and has no atomic
//! replace. [`MemSlots::punch`] therefore deletes the covering slot and then
//! creates the fragments that remain; [`MemSlots::fill`] deletes the
//! neighbours it merges with and then creates the merged slot. Between the
//! two steps the whole range is unmapped. A vCPU touching it then exits to
//! user space with an MMIO exit, which the caller's MMIO bus handles (for a
//! BAR, the device's MMIO handler), so the guest sees a trapped access,
//! never unmapped garbage. Nothing is ever created overlapping a live slot.
//!
//! Dirty-page bitmaps belong to slots: fetch the dirty log of a mapping
//! before punching or filling next to it if dirty logging is on.

mod backend;
mod error;
mod mapping;
mod record;
mod txn;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use backend::SlotBackend;
pub use error::{MemSlotsError, Result};
pub use mapping::{MapFlags, Mapping, MappingKind, SlotId};

use crate::layout::PAGE_SIZE;
use record::Record;
use txn::Txn;

/// The live KVM memory slots of one VM. Share it in an `Arc`: every method
/// takes `&self` and serialises on an internal lock.
pub struct MemSlots {
    backend: Arc<dyn SlotBackend>,
    record: Mutex<Record>,
}

impl MemSlots {
    /// Tracks the slots of `backend`, which must have none yet.
    pub fn new(backend: Arc<dyn SlotBackend>) -> Self {
        let record = Record::new(backend.max_slots());
        MemSlots {
            backend,
            record: Mutex::new(record),
        }
    }

    /// Number of slots the backend supports.
    pub fn max_slots(&self) -> u32 {
        self.lock().max_slots()
    }

    /// Maps `[gpa, gpa + size)` to the host memory at `host_addr` in a new
    /// slot (the lowest free number) and returns the slot.
    ///
    /// # Safety
    ///
    /// `[host_addr, host_addr + size)` must be memory of this process that
    /// the guest may read and write at any time behind the back of Rust code
    /// (typically an mmap no Rust reference points into), and it must stay
    /// mapped until every page of it has been removed again with
    /// [`unmap`](Self::unmap) or [`punch`](Self::punch), or the VM is
    /// destroyed.
    pub unsafe fn map(
        &self,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: MapFlags,
        kind: MappingKind,
    ) -> Result<SlotId> {
        let mapping = Mapping {
            gpa,
            size,
            host_addr,
            flags,
            kind,
        };
        let mut record = self.lock();
        check_new(&record, "map", &mapping)?;
        check_free_slots(&record, "map", gpa, mapping.end(), 1)?;
        // SAFETY: check_new found no overlap; the caller vouches for the
        // host memory.
        unsafe { record.create(&*self.backend, None, mapping) }
    }

    /// Removes the mapping that starts at `gpa` and returns it.
    pub fn unmap(&self, gpa: u64) -> Result<Mapping> {
        let mut record = self.lock();
        record
            .delete(&*self.backend, "unmap", gpa)
            .map(|(_, mapping)| mapping)
    }

    /// Removes the pages `[gpa, gpa + size)` from the one mapping that
    /// covers them, and returns the fragments left before and after them
    /// (none, one or two), each in a new slot.
    ///
    /// The covering slot is deleted before the fragments are created, so the
    /// whole mapping is briefly unmapped (see the [module docs](self)). If a
    /// step fails, the earlier steps are undone.
    pub fn punch(&self, gpa: u64, size: u64) -> Result<Vec<(SlotId, Mapping)>> {
        check_range("punch", gpa, size)?;
        let end = gpa + size;
        let mut record = self.lock();
        let covering = covering(&record, gpa, end)?;
        let fragments: Vec<Mapping> = [(covering.gpa, gpa), (end, covering.end())]
            .into_iter()
            .filter(|(from, to)| from < to)
            .map(|(from, to)| covering.slice(from, to - from))
            .collect();
        // Deleting the covering slot frees one number.
        let extra = (fragments.len() as u64).saturating_sub(1);
        check_free_slots(&record, "punch", gpa, end, extra)?;
        Txn::run(&*self.backend, &mut record, |txn| {
            txn.delete("punch", covering.gpa)?;
            let mut created = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                // SAFETY: the fragment is part of the mapping just deleted,
                // so it overlaps no live slot and its host memory is covered
                // by the guarantee given when that mapping was created.
                let slot = unsafe { txn.create(fragment.clone()) }?;
                created.push((slot, fragment));
            }
            Ok(created)
        })
    }

    /// Maps the hole `[gpa, gpa + size)` to `host_addr`, merged into one
    /// slot with the mappings directly before and after it if their host
    /// memory is contiguous with `host_addr` and their flags and kind match.
    /// Returns the slot of the resulting mapping.
    ///
    /// The neighbours are deleted before the merged slot is created, so they
    /// are briefly unmapped (see the [module docs](self)). If a step fails,
    /// the earlier steps are undone.
    ///
    /// # Safety
    ///
    /// As for [`map`](Self::map).
    pub unsafe fn fill(
        &self,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: MapFlags,
        kind: MappingKind,
    ) -> Result<SlotId> {
        let hole = Mapping {
            gpa,
            size,
            host_addr,
            flags,
            kind,
        };
        let mut record = self.lock();
        check_new(&record, "fill", &hole)?;
        let before = record
            .ending_at(gpa)
            .map(|(_, m)| m.clone())
            .filter(|m| m.continues_into(&hole));
        let after = record
            .starting_at(hole.end())
            .map(|(_, m)| m.clone())
            .filter(|m| hole.continues_into(m));
        if before.is_none() && after.is_none() {
            check_free_slots(&record, "fill", gpa, hole.end(), 1)?;
        }
        let first = before.as_ref().unwrap_or(&hole);
        let merged = Mapping {
            gpa: first.gpa,
            size: before.as_ref().map_or(0, |m| m.size)
                + size
                + after.as_ref().map_or(0, |m| m.size),
            host_addr: first.host_addr,
            flags: hole.flags,
            kind: hole.kind.clone(),
        };
        Txn::run(&*self.backend, &mut record, |txn| {
            for neighbour in before.iter().chain(after.iter()) {
                txn.delete("fill", neighbour.gpa)?;
            }
            // SAFETY: the neighbours are deleted and check_new found nothing
            // else overlapping the hole, so the merged range overlaps no live
            // slot. Its host memory is the neighbours' (vouched for when they
            // were created) and the hole's (vouched for by our caller).
            unsafe { txn.create(merged) }
        })
    }

    /// Turns KVM dirty-page logging on or off for the mapping that starts at
    /// `gpa`. Does nothing if it is already in that state.
    pub fn set_dirty_logging(&self, gpa: u64, enabled: bool) -> Result<()> {
        let mut record = self.lock();
        let (_, mapping) = record.starting_at(gpa).ok_or(MemSlotsError::NotMapped {
            op: "set dirty logging",
            gpa,
        })?;
        if mapping.flags.log_dirty == enabled {
            return Ok(());
        }
        let flags = MapFlags {
            log_dirty: enabled,
            ..mapping.flags
        };
        record.set_flags(&*self.backend, "set dirty logging", gpa, flags)
    }

    /// The guest pages of the mapping that starts at `gpa` written since the last call (or
    /// since dirty logging was turned on for it), as page-aligned guest addresses. KVM
    /// clears its log on each call.
    pub fn take_dirty_pages(&self, gpa: u64) -> Result<Vec<u64>> {
        let record = self.lock();
        let (slot, mapping) = record.starting_at(gpa).ok_or(MemSlotsError::NotMapped {
            op: "get the dirty log",
            gpa,
        })?;
        let bitmap = self
            .backend
            .get_dirty_log(slot.0, mapping.size)
            .map_err(|source| MemSlotsError::Kvm {
                op: "get the dirty log of",
                slot: *slot,
                gpa,
                end: mapping.end(),
                source,
            })?;
        let mut pages = Vec::new();
        for (word_index, mut word) in bitmap.into_iter().enumerate() {
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                word &= word - 1;
                let page = word_index as u64 * 64 + bit;
                if page * PAGE_SIZE < mapping.size {
                    pages.push(mapping.gpa + page * PAGE_SIZE);
                }
            }
        }
        Ok(pages)
    }

    /// All mappings with their slots, sorted by guest address.
    pub fn mappings(&self) -> Vec<(SlotId, Mapping)> {
        self.lock().all().cloned().collect()
    }

    /// The mapping that contains `gpa`, if any.
    pub fn lookup(&self, gpa: u64) -> Option<(SlotId, Mapping)> {
        self.lock().containing(gpa).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, Record> {
        // The record changes only after KVM accepted a change, one entry at a
        // time, so it is consistent even if a holder of the lock panicked.
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemSlots")
            .field("mappings", &self.mappings())
            .finish_non_exhaustive()
    }
}

/// Checks that `[gpa, gpa + size)` is a non-empty, page-aligned range that
/// does not wrap.
fn check_range(op: &'static str, gpa: u64, size: u64) -> Result<()> {
    for (what, value) in [("guest address", gpa), ("size", size)] {
        check_aligned(op, gpa, size, what, value)?;
    }
    if size == 0 {
        return Err(MemSlotsError::ZeroSize { op, gpa });
    }
    if gpa.checked_add(size).is_none() {
        return Err(MemSlotsError::Wraps {
            op,
            gpa,
            size,
            what: "guest",
        });
    }
    Ok(())
}

/// Checks that `mapping` is valid and overlaps no live mapping.
fn check_new(record: &Record, op: &'static str, mapping: &Mapping) -> Result<()> {
    let Mapping {
        gpa,
        size,
        host_addr,
        ..
    } = *mapping;
    check_range(op, gpa, size)?;
    check_aligned(op, gpa, size, "host address", host_addr)?;
    if host_addr.checked_add(size).is_none() {
        return Err(MemSlotsError::Wraps {
            op,
            gpa,
            size,
            what: "host",
        });
    }
    match record.first_overlap(gpa, mapping.end()) {
        Some((slot, existing)) => Err(MemSlotsError::Overlap {
            op,
            gpa,
            end: mapping.end(),
            existing_gpa: existing.gpa,
            existing_end: existing.end(),
            slot: *slot,
        }),
        None => Ok(()),
    }
}

fn check_aligned(
    op: &'static str,
    gpa: u64,
    size: u64,
    what: &'static str,
    value: u64,
) -> Result<()> {
    if value & (PAGE_SIZE - 1) != 0 {
        return Err(MemSlotsError::Unaligned {
            op,
            gpa,
            size,
            what,
            value,
        });
    }
    Ok(())
}

/// Checks that `needed` more slot numbers are free.
fn check_free_slots(
    record: &Record,
    op: &'static str,
    gpa: u64,
    end: u64,
    needed: u64,
) -> Result<()> {
    if record.free_slots() < needed {
        return Err(MemSlotsError::NoFreeSlot {
            op,
            gpa,
            end,
            needed,
            max: record.max_slots(),
        });
    }
    Ok(())
}

/// The mapping that covers all of `[gpa, end)`.
fn covering(record: &Record, gpa: u64, end: u64) -> Result<Mapping> {
    let why = match record.containing(gpa) {
        Some((_, m)) if end <= m.end() => return Ok(m.clone()),
        Some((slot, m)) => format!("it runs past the end of {m}, mapped in slot {slot}"),
        None => match record.first_overlap(gpa, end) {
            Some((slot, m)) => {
                format!("it starts in unmapped space before {m}, mapped in slot {slot}")
            }
            None => "nothing is mapped there".to_string(),
        },
    };
    Err(MemSlotsError::NotCovered { gpa, end, why })
}
