//! Where the BARs of a device are in guest physical memory and port space.
//!
//! An I/O BAR is registered on the port-I/O bus while it decodes, and every access to it
//! exits and reaches the device's handler: I/O BARs are never mapped. The rest of this
//! comment is about memory BARs.
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
//!
//! Run-time trap/untrap ([`Placement::trap`], [`Placement::untrap`]) changes only the slots
//! that cover the range: trapping punches the range out of its slot (KVM deletes the slot,
//! then the fragments around the range are re-created), untrapping fills it back, merged with
//! its neighbours. While a slot is being replaced its pages are not in any slot, so a vCPU
//! touching them exits and the access reaches the BAR's handler on the bus: the guest sees
//! a trapped access, never an unmapped page. The memory-slot owner records which slots
//! exist; this file keeps no copy of them.

use std::sync::Arc;

use resources::memslots::{MapFlags, MappingKind, MemSlots, MemSlotsError};
use vm_device::{DeviceMmio, DevicePio};

use super::bars::{BarDesc, BarKind};
use super::errlog::ErrorLog;
use super::mmap::{mappable_pieces, DeviceMmap, Piece};
use super::ranges::RangeSet;
use crate::bus::{Bus, BusError};
use resources::layout::PAGE_SIZE;

/// Why a BAR could not be (re)mapped.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The MMIO or port-I/O bus refused the BAR's range.
    #[error("cannot register the BAR on the bus: {0}")]
    Bus(#[from] BusError),
    /// An I/O BAR placed where it does not fit the 16-bit port space.
    #[error("I/O BAR {index} of {size:#x} bytes at {base:#x} does not fit the 16-bit port space")]
    NotPorts {
        /// The BAR.
        index: usize,
        /// Where it was to go.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// A memory slot could not be created or removed.
    #[error("cannot change the BAR's memory slots: {0}")]
    Slots(#[from] MemSlotsError),
    /// A trap/untrap range that is not whole pages inside the BAR.
    #[error(
        "range {offset:#x}+{size:#x} is not page-aligned inside BAR {index} of {bar_size:#x} bytes"
    )]
    BadRange {
        /// The BAR.
        index: usize,
        /// Offset asked for.
        offset: u64,
        /// Size asked for.
        size: u64,
        /// Size of the BAR.
        bar_size: u64,
    },
    /// The BAR is not a memory BAR of this device.
    #[error("BAR {0} is not an implemented memory BAR")]
    NoBar(usize),
}

/// What handles the trapped accesses of a placed BAR: MMIO for a memory BAR, port I/O for
/// an I/O BAR.
pub trait BarAccess: DeviceMmio + DevicePio + Send + Sync {}

impl<T: DeviceMmio + DevicePio + Send + Sync> BarAccess for T {}

/// The handler registered on the bus for a placed BAR.
pub type BarHandler = Arc<dyn BarAccess>;

/// What a BAR is placed with: its layout, host mappings and trapped ranges (an I/O BAR has
/// neither mappings nor trapped ranges: all of it is trapped).
pub struct BarSetup {
    /// The BAR.
    pub desc: BarDesc,
    /// Host mappings of its mmap-able areas (memory BARs only).
    pub mmaps: Vec<DeviceMmap>,
    /// Ranges `(offset, size)` that must exit to the VMM (the MSI-X table and PBA).
    pub trapped: Vec<(u64, u64)>,
}

/// Whose a run-time trap is, which decides whether the device's saved state carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapOwner {
    /// The device's mediated set-up (e.g. a mediator's `trap=` ranges): saved with the
    /// device's PCI state and trapped again where it is restored.
    Device,
    /// This VMM's own passing need (e.g. dirty tracking while the device is saved): not
    /// saved, so a restored device starts without it.
    Local,
}

/// One memory BAR: its host mappings, trapped ranges and where it is.
struct Bar {
    desc: BarDesc,
    mmaps: Vec<DeviceMmap>,
    /// Ranges `(offset, size)` of the BAR that always exit to the VMM (MSI-X).
    trapped: Vec<(u64, u64)>,
    /// Page ranges trapped at run time for the device ([`TrapOwner::Device`]).
    mediated: RangeSet,
    /// Page ranges trapped at run time for this VMM only ([`TrapOwner::Local`]).
    local: RangeSet,
    base: Option<u64>,
}

impl Bar {
    fn run_time_traps(&mut self, owner: TrapOwner) -> &mut RangeSet {
        match owner {
            TrapOwner::Device => &mut self.mediated,
            TrapOwner::Local => &mut self.local,
        }
    }
}

/// The placement of every BAR of one device.
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
                mediated: RangeSet::default(),
                local: RangeSet::default(),
                base: None,
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

    /// The memory slots of BAR `index` as `(gpa, size)`, as the memory-slot owner records
    /// them.
    pub fn slots(&self, index: usize) -> Vec<(u64, u64)> {
        let Some((base, size)) = self
            .bar(index)
            .filter(|b| b.desc.kind.is_memory())
            .and_then(|b| Some((b.base?, b.desc.size)))
        else {
            return Vec::new();
        };
        let end = base.saturating_add(size);
        self.memslots
            .mappings()
            .into_iter()
            .filter(|(_, m)| m.gpa >= base && m.end() <= end && self.owns(&m.kind))
            .map(|(_, m)| (m.gpa, m.size))
            .collect()
    }

    fn owns(&self, kind: &MappingKind) -> bool {
        matches!(kind, MappingKind::Device { owner } if *owner == self.owner)
    }

    fn kind(&self) -> MappingKind {
        MappingKind::Device {
            owner: self.owner.clone(),
        }
    }

    /// What of BAR `index` should be in memory slots now.
    pub fn pieces(&self, index: usize) -> Vec<Piece> {
        self.bar(index)
            .map(|b| {
                let mut trapped = b.trapped.clone();
                trapped.extend(b.mediated.as_offset_size());
                trapped.extend(b.local.as_offset_size());
                mappable_pieces(&b.mmaps, &trapped)
            })
            .unwrap_or_default()
    }

    /// The ranges of BAR `index` trapped at run time, whoever trapped them, as
    /// `(offset, size)`.
    pub fn trapped(&self, index: usize) -> Vec<(u64, u64)> {
        self.bar(index)
            .map(|b| {
                let mut all = b.mediated.clone();
                for (offset, size) in b.local.as_offset_size() {
                    all.insert(offset, offset + size);
                }
                all.as_offset_size()
            })
            .unwrap_or_default()
    }

    /// The ranges of BAR `index` trapped for the device ([`TrapOwner::Device`]): what its
    /// saved state carries.
    pub fn device_traps(&self, index: usize) -> Vec<(u64, u64)> {
        self.bar(index)
            .map(|b| b.mediated.as_offset_size())
            .unwrap_or_default()
    }

    /// Checks that `[offset, offset + size)` is whole pages inside BAR `index`; returns its
    /// end.
    pub fn check_range(&self, index: usize, offset: u64, size: u64) -> Result<u64, PlacementError> {
        let bar = self
            .bar(index)
            .filter(|b| b.desc.kind.is_memory())
            .ok_or(PlacementError::NoBar(index))?;
        let end = offset.checked_add(size).filter(|&e| {
            size > 0
                && offset.is_multiple_of(PAGE_SIZE)
                && size.is_multiple_of(PAGE_SIZE)
                && e <= bar.desc.size
        });
        end.ok_or(PlacementError::BadRange {
            index,
            offset,
            size,
            bar_size: bar.desc.size,
        })
    }

    /// Makes guest accesses to `[offset, offset + size)` of BAR `index` exit to the VMM from
    /// now on: the pages are punched out of the memory slots that map them. Returns when the
    /// change is in effect (KVM has stopped every vCPU from using the old slot). On an
    /// error the range stays recorded as trapped, and any page still mapped is logged.
    pub fn trap(
        &mut self,
        index: usize,
        offset: u64,
        size: u64,
        owner: TrapOwner,
    ) -> Result<(), PlacementError> {
        let end = self.check_range(index, offset, size)?;
        if let Some(b) = self.bar_mut(index) {
            b.run_time_traps(owner).insert(offset, end);
        }
        let Some(base) = self.base(index) else {
            return Ok(());
        };
        let (from, to) = (base + offset, base + end);
        for (gpa, len) in self.slots(index) {
            let (s, e) = (gpa.max(from), (gpa + len).min(to));
            if s < e {
                self.memslots.punch(s, e - s)?;
            }
        }
        Ok(())
    }

    /// Lets guest accesses to `[offset, offset + size)` of BAR `index` go straight to the
    /// device again where the BAR is mappable (not the MSI-X table or PBA): the pages are
    /// filled back into memory slots, merged with their neighbours, except where `owner`'s
    /// counterpart still traps them. Returns when the change is in effect.
    pub fn untrap(
        &mut self,
        index: usize,
        offset: u64,
        size: u64,
        owner: TrapOwner,
    ) -> Result<(), PlacementError> {
        let end = self.check_range(index, offset, size)?;
        if let Some(b) = self.bar_mut(index) {
            b.run_time_traps(owner).remove(offset, end);
        }
        let Some(base) = self.base(index) else {
            return Ok(());
        };
        // The pages of the range that should be mapped but are not (some may be mapped
        // already: untrapping a range that was only partly trapped).
        let mut holes = RangeSet::default();
        for p in self.pieces(index) {
            holes.insert(p.bar_offset.max(offset), (p.bar_offset + p.size).min(end));
        }
        for (gpa, len) in self.slots(index) {
            holes.remove(gpa - base, gpa - base + len);
        }
        for (s, len) in holes.as_offset_size() {
            // Pieces are maximal runs of one host mapping, so a hole lies in exactly one.
            let Some(p) = self
                .pieces(index)
                .into_iter()
                .find(|p| p.bar_offset <= s && s + len <= p.bar_offset + p.size)
            else {
                continue;
            };
            let flags = MapFlags {
                readonly: !p.writable,
                log_dirty: false,
            };
            // SAFETY: the host range lies in a `DeviceMmap` owned by this BAR (a shared
            // mapping of device memory that no Rust reference points into), which stays
            // mapped until the slot is removed (`unmap_slots`, or leaked in `drop`).
            unsafe {
                self.memslots.fill(
                    base + s,
                    len,
                    p.host_addr + (s - p.bar_offset),
                    flags,
                    self.kind(),
                )
            }?;
        }
        Ok(())
    }

    /// Puts BAR `index` at `to` (`None`: takes it off the bus): a memory BAR on the MMIO bus
    /// with its mappable pieces in memory slots, an I/O BAR on the port-I/O bus. Failures
    /// are logged (rate-limited: the guest chooses the addresses) and leave the BAR
    /// unregistered or trapped. Returns where the BAR is afterwards.
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
        let (size, kind) = (bar.desc.size, bar.desc.kind);
        self.unplace(index);
        let new = to?;
        let name = format!("{}/bar{index}", self.owner);
        let registered = if kind == BarKind::Io {
            self.register_ports(index, &name, new, size, handler())
        } else {
            let handler: Arc<dyn DeviceMmio + Send + Sync> = handler();
            self.bus
                .register_mmio(&name, new, size, handler)
                .map_err(PlacementError::from)
        };
        if let Err(e) = registered {
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

    /// Registers I/O BAR `index` for the ports `[base, base + size)`.
    fn register_ports(
        &self,
        index: usize,
        name: &str,
        base: u64,
        size: u64,
        handler: BarHandler,
    ) -> Result<(), PlacementError> {
        let not_ports = || PlacementError::NotPorts { index, base, size };
        let port = u16::try_from(base).map_err(|_| not_ports())?;
        let len = u16::try_from(size).map_err(|_| not_ports())?;
        if u32::from(port) + u32::from(len) > 1 << 16 {
            return Err(not_ports());
        }
        let handler: Arc<dyn DevicePio + Send + Sync> = handler;
        Ok(self.bus.register_pio(name, port, len, handler)?)
    }

    /// Unmaps the slots of BAR `index` and takes it off the bus.
    fn unplace(&mut self, index: usize) {
        let Some(old) = self.base(index) else {
            return;
        };
        self.unmap_slots(index);
        let is_io = self.bar(index).is_some_and(|b| b.desc.kind == BarKind::Io);
        let r = if is_io {
            // `place` registered it at a port, so `old` fits 16 bits.
            self.bus.deregister_pio(old as u16)
        } else {
            self.bus.deregister_mmio(old)
        };
        if let Err(e) = r {
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
        for p in self.pieces(index) {
            let Some(gpa) = base.checked_add(p.bar_offset) else {
                continue;
            };
            let flags = MapFlags {
                readonly: !p.writable,
                log_dirty: false,
            };
            let kind = self.kind();
            // SAFETY: the host range is part of a `DeviceMmap` owned by this BAR: a shared
            // mapping of device memory that no Rust reference points into, which stays
            // mapped until the slot is removed (`unmap_slots`, or leaked in `drop` when
            // removal fails).
            if let Err(e) = unsafe { self.memslots.map(gpa, p.size, p.host_addr, flags, kind) } {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    fn unmap_slots(&mut self, index: usize) {
        for (gpa, _) in self.slots(index) {
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
