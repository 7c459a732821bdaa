//! Where the BARs of a device are in guest physical memory.
//!
//! A placed BAR is registered whole on the MMIO bus, so any access not covered by a memory
//! slot exits and reaches the device's handler; its mappable pieces (see
//! [`mappable_pieces`]) are then mapped into KVM memory slots through [`MemSlots`], the
//! only owner of slots. Moving a BAR unmaps its slots and takes it off the bus before it is
//! registered and mapped at the new address. A piece that cannot be mapped stays trapped:
//! slower, still correct.
//!
//! The host mappings behind the slots ([`DeviceMmap`]) are owned here and unmapped on drop,
//! after the slots are gone; if KVM refused to delete a slot, they are leaked instead, since
//! the guest could still reach them.

use std::sync::Arc;

use resources::memslots::{MapFlags, MappingKind, MemSlots, MemSlotsError};
use vm_device::DeviceMmio;

use super::bars::BarDesc;
use super::errlog::ErrorLog;
use super::mmap::{mappable_pieces, DeviceMmap, Piece};
use crate::bus::{Bus, BusError};

/// Why a BAR could not be (re)mapped.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The MMIO bus refused the BAR's range.
    #[error("cannot register the BAR on the MMIO bus: {0}")]
    Bus(#[from] BusError),
    /// A memory slot could not be created or removed.
    #[error("cannot change the BAR's memory slots: {0}")]
    Slots(#[from] MemSlotsError),
}

/// The handler registered on the bus for a placed BAR.
pub type BarHandler = Arc<dyn DeviceMmio + Send + Sync>;

/// What a memory BAR is placed with: its layout, host mappings and trapped ranges.
pub struct BarSetup {
    /// The BAR.
    pub desc: BarDesc,
    /// Host mappings of its mmap-able areas.
    pub mmaps: Vec<DeviceMmap>,
    /// Ranges `(offset, size)` that must exit to the VMM (the MSI-X table and PBA).
    pub trapped: Vec<(u64, u64)>,
}

/// One memory BAR: its host mappings, trapped ranges and where it is.
struct Bar {
    desc: BarDesc,
    mmaps: Vec<DeviceMmap>,
    /// Ranges `(offset, size)` of the BAR that must exit to the VMM.
    trapped: Vec<(u64, u64)>,
    base: Option<u64>,
    /// Memory slots mapped for this BAR, as `(gpa, size)`.
    slots: Vec<(u64, u64)>,
}

/// The placement of every memory BAR of one device.
pub struct Placement {
    owner: String,
    bus: Arc<Bus>,
    memslots: Arc<MemSlots>,
    bars: Vec<Bar>,
    leaked: bool,
    errors: ErrorLog,
}

impl Placement {
    /// Nothing placed yet.
    pub fn new(owner: &str, bus: Arc<Bus>, memslots: Arc<MemSlots>, bars: Vec<BarSetup>) -> Self {
        let bars = bars
            .into_iter()
            .map(|b| Bar {
                desc: b.desc,
                mmaps: b.mmaps,
                trapped: b.trapped,
                base: None,
                slots: Vec::new(),
            })
            .collect();
        Placement {
            owner: owner.to_string(),
            bus,
            memslots,
            bars,
            leaked: false,
            errors: ErrorLog::default(),
        }
    }

    fn bar(&self, index: usize) -> Option<&Bar> {
        self.bars.iter().find(|b| b.desc.index == index)
    }

    fn bar_mut(&mut self, index: usize) -> Option<&mut Bar> {
        self.bars.iter_mut().find(|b| b.desc.index == index)
    }

    /// Where BAR `index` is registered, if it is.
    pub fn base(&self, index: usize) -> Option<u64> {
        self.bar(index).and_then(|b| b.base)
    }

    /// The memory slots of BAR `index` as `(gpa, size)`.
    pub fn slots(&self, index: usize) -> Vec<(u64, u64)> {
        self.bar(index).map(|b| b.slots.clone()).unwrap_or_default()
    }

    /// What of BAR `index` should be in memory slots now.
    pub fn pieces(&self, index: usize) -> Vec<Piece> {
        self.bar(index)
            .map(|b| mappable_pieces(&b.mmaps, &b.trapped))
            .unwrap_or_default()
    }

    /// Puts BAR `index` at `to` (`None`: takes it off the bus). Failures are logged
    /// (rate-limited: the guest chooses the addresses) and leave the BAR unregistered or
    /// trapped. Returns where the BAR is afterwards.
    pub fn place(
        &mut self,
        index: usize,
        to: Option<u64>,
        handler: impl FnOnce() -> BarHandler,
    ) -> Option<u64> {
        let bar = self.bar(index)?;
        if bar.base == to {
            return to;
        }
        let size = bar.desc.size;
        self.unplace(index);
        let new = to?;
        let name = format!("{}/bar{index}", self.owner);
        if let Err(e) = self.bus.register_mmio(&name, new, size, handler()) {
            self.errors.record(
                &self.owner,
                format_args!("placing BAR {index} at {new:#x}"),
                &e,
            );
            return None;
        }
        if let Some(b) = self.bar_mut(index) {
            b.base = Some(new);
        }
        if let Err(e) = self.map_slots(index) {
            self.errors.record(
                &self.owner,
                format_args!("mapping BAR {index} at {new:#x} (left trapped)"),
                &e,
            );
        }
        Some(new)
    }

    /// Unmaps the slots of BAR `index` and takes it off the bus.
    fn unplace(&mut self, index: usize) {
        let Some(old) = self.base(index) else {
            return;
        };
        self.unmap_slots(index);
        if let Err(e) = self.bus.deregister_mmio(old) {
            self.errors.record(
                &self.owner,
                format_args!("moving BAR {index} off {old:#x}"),
                &e,
            );
        }
        if let Some(b) = self.bar_mut(index) {
            b.base = None;
        }
    }

    /// Recomputes the pieces of BAR `index` and re-applies them: unmaps its slots and maps
    /// the current set. Does nothing for a BAR that is not placed.
    pub fn remap(&mut self, index: usize) -> Result<(), PlacementError> {
        if self.base(index).is_none() {
            return Ok(());
        }
        self.unmap_slots(index);
        self.map_slots(index)
    }

    /// Maps every piece of the placed BAR `index`; returns the first failure after trying
    /// them all.
    fn map_slots(&mut self, index: usize) -> Result<(), PlacementError> {
        let Some(base) = self.base(index) else {
            return Ok(());
        };
        let mut first_error = None;
        let mut mapped = Vec::new();
        for p in self.pieces(index) {
            let Some(gpa) = base.checked_add(p.bar_offset) else {
                continue;
            };
            let flags = MapFlags {
                readonly: !p.writable,
                log_dirty: false,
            };
            let kind = MappingKind::Device {
                owner: self.owner.clone(),
            };
            // SAFETY: the host range is part of a `DeviceMmap` owned by this BAR: a shared
            // mapping of device memory that no Rust reference points into, which stays
            // mapped until the slot is removed (`unmap_slots`, or leaked in `drop` when
            // removal fails).
            match unsafe { self.memslots.map(gpa, p.size, p.host_addr, flags, kind) } {
                Ok(_) => mapped.push((gpa, p.size)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(b) = self.bar_mut(index) {
            b.slots.extend(mapped);
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    fn unmap_slots(&mut self, index: usize) {
        let slots = self
            .bar_mut(index)
            .map(|b| std::mem::take(&mut b.slots))
            .unwrap_or_default();
        for (gpa, _) in slots {
            if let Err(e) = self.memslots.unmap(gpa) {
                // The slot may still point at our mapping: never unmap it.
                self.leaked = true;
                tracing::error!(
                    "{}: cannot remove the memory slot of BAR {index} at {gpa:#x}, its device memory stays mapped: {e}",
                    self.owner
                );
            }
        }
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        let indices: Vec<usize> = self.bars.iter().map(|b| b.desc.index).collect();
        for index in indices {
            self.unplace(index);
        }
        if self.leaked {
            for bar in &mut self.bars {
                for m in bar.mmaps.drain(..) {
                    std::mem::forget(m);
                }
            }
        }
    }
}
