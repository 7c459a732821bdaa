//! Saving and restoring the virtualized configuration state of a [`VfioPciDevice`]: what
//! the guest programmed (command, cache line, latency, interrupt line, BAR addresses of
//! memory and I/O BARs, MSI and MSI-X with the whole table), the vectors the device
//! signalled while masked (the PBA and MSI pending bits, an INTx signal held back by INTx
//! Disable), and the ranges a mediator trapped at run time. Where INTx is routed (pin and
//! GSI, which the guest's MP table describes) is part of the layout: a restored device must
//! be routed the same way.
//!
//! The device's own internal state (the VF's registers and queues) is not here: it travels
//! through [`crate::vfio::migration::DeviceMigration`].
//!
//! [`VfioPciDevice::restore`] applies a state to a freshly opened device of the same type
//! (possibly another VF on another host). Everything is checked first; then the state is
//! replayed through the paths the guest's own writes take (configuration writes, MSI-X
//! table writes), so BARs are placed, routes and irqfds programmed and the command
//! register forwarded exactly as if the guest had written them.

use serde::{Deserialize, Serialize};

use super::{
    Irqs, MsiCap, Msix, State, VfioPciDevice, VfioPciError, COMMAND_IO, COMMAND_MEMORY, NUM_BARS,
};
use crate::pci::persist::{MsiState, MsixState};
use crate::persist::Persist;
use crate::vfio::bars::BarKind;
use crate::vfio::intx::{Intx, IntxRouting};
use crate::vfio::placement::TrapOwner;

/// One implemented BAR as the guest sees it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct BarLayout {
    /// BAR number.
    pub index: usize,
    /// Type.
    pub kind: BarKind,
    /// Size the guest sees.
    pub size: u64,
}

/// A capability in the guest's list.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct CapLayout {
    /// Offset in configuration space.
    pub offset: usize,
    /// Capability id.
    pub id: u8,
}

/// Where the MSI-X capability, table and PBA are, and how many vectors it has.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct MsixCapLayout {
    /// Offset of the capability.
    pub offset: usize,
    /// Table size.
    pub vectors: usize,
    /// Table offset and BIR register.
    pub table: u32,
    /// PBA offset and BIR register.
    pub pba: u32,
}

/// Where the MSI capability is and what it can do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct MsiCapLayout {
    /// Offset of the capability.
    pub offset: usize,
    /// Read-only control bits: multiple-message capable, 64-bit, per-vector masking.
    pub capabilities: u16,
}

/// What must be the same on the device a state is restored into.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VfioPciLayout {
    /// Vendor id (low 16 bits) and device id.
    pub vendor_device: u32,
    /// The BARs (memory and I/O).
    pub bars: Vec<BarLayout>,
    /// The capability list the guest sees.
    pub caps: Vec<CapLayout>,
    /// The MSI-X capability, if exposed.
    pub msix: Option<MsixCapLayout>,
    /// The MSI capability, if exposed.
    pub msi: Option<MsiCapLayout>,
    /// MSI-X vectors the backend has.
    pub msix_backend_vectors: usize,
    /// MSI vectors the backend has.
    pub msi_backend_vectors: usize,
    /// Where INTx is routed, if it is offered (absent in states saved before INTx).
    #[serde(default)]
    pub intx: Option<IntxRouting>,
}

/// The ranges of one BAR trapped at run time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BarTraps {
    /// BAR number.
    pub index: usize,
    /// Ranges as `(offset, size)`, page-aligned.
    pub ranges: Vec<(u64, u64)>,
}

/// The saved configuration state of a [`VfioPciDevice`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VfioPciState {
    /// The layout the state belongs to (checked on restore).
    pub layout: VfioPciLayout,
    /// Command register (guest-writable bits).
    pub command: u16,
    /// Cache line size.
    pub cache_line: u8,
    /// Latency timer.
    pub latency: u8,
    /// Interrupt line.
    pub interrupt_line: u8,
    /// The six BAR registers as the guest reads them.
    pub bar_regs: [u32; NUM_BARS],
    /// The MSI capability's registers.
    pub msi: Option<MsiState>,
    /// MSI-X enable, function mask and table.
    pub msix: Option<MsixState>,
    /// Vectors the device signalled while they were not delivering (masked): what the PBA
    /// and the MSI pending bits report.
    pub pending_vectors: Vec<usize>,
    /// Ranges trapped at run time (by a mediator), per BAR.
    pub traps: Vec<BarTraps>,
    /// The device signalled INTx while INTx Disable held it back.
    #[serde(default)]
    pub intx_pending: bool,
}

/// Why a state could not be restored into a device.
#[derive(Debug, thiserror::Error)]
pub enum VfioPersistError {
    /// The device differs from the one the state was saved from. Nothing was changed.
    #[error("{name}: the saved state does not fit this device: {}", differences.join("; "))]
    Mismatch {
        /// Device name.
        name: String,
        /// Each difference, in words.
        differences: Vec<String>,
    },
    /// The state contradicts itself (corrupt or hand-made). Nothing was changed.
    #[error("{name}: the saved state is inconsistent: {reason}")]
    Invalid {
        /// Device name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A saved trap could not be applied.
    #[error("restoring the trapped ranges: {0}")]
    Trap(#[source] Box<VfioPciError>),
    /// A BAR could not be registered on the MMIO bus (the port-I/O bus for an I/O BAR) at
    /// its saved address.
    #[error("{name}: BAR {index} could not be placed at its saved address {addr:#x} (the bus refused it; the log has the reason)")]
    NotPlaced {
        /// Device name.
        name: String,
        /// The BAR.
        index: usize,
        /// Where it should be.
        addr: u64,
    },
    /// The backend or KVM refused requests while the state was applied.
    #[error("{name}: {count} backend or interrupt-routing requests failed while restoring (the log has the reasons); the device's interrupts may not be wired")]
    Failures {
        /// Device name.
        name: String,
        /// How many failed.
        count: u64,
    },
}

fn describe_bar(b: Option<&BarLayout>) -> String {
    match b {
        None => "absent".into(),
        Some(b) => {
            let kind = match b.kind {
                BarKind::Io => "I/O".to_string(),
                BarKind::Mem32 { prefetchable } => {
                    format!(
                        "32-bit{} memory",
                        if prefetchable { " prefetchable" } else { "" }
                    )
                }
                BarKind::Mem64 { prefetchable } => {
                    format!(
                        "64-bit{} memory",
                        if prefetchable { " prefetchable" } else { "" }
                    )
                }
            };
            format!("{kind} of {:#x} bytes", b.size)
        }
    }
}

impl VfioPciLayout {
    /// The differences between this (the device's) layout and `saved`, in words; empty
    /// when a state with layout `saved` can be restored here.
    pub fn differences(&self, saved: &VfioPciLayout) -> Vec<String> {
        let mut d = Vec::new();
        let ids = |v: u32| format!("{:04x}:{:04x}", v & 0xffff, v >> 16);
        if self.vendor_device != saved.vendor_device {
            d.push(format!(
                "vendor:device is {} here, {} in the saved state",
                ids(self.vendor_device),
                ids(saved.vendor_device)
            ));
        }
        for index in 0..NUM_BARS {
            let find = |l: &VfioPciLayout| l.bars.iter().find(|b| b.index == index).copied();
            let (here, then) = (find(self), find(saved));
            if here != then {
                d.push(format!(
                    "BAR {index} is {} here, {} in the saved state",
                    describe_bar(here.as_ref()),
                    describe_bar(then.as_ref())
                ));
            }
        }
        if self.caps != saved.caps {
            let list = |l: &VfioPciLayout| {
                let v: Vec<String> = l
                    .caps
                    .iter()
                    .map(|c| format!("{:#04x}@{:#x}", c.id, c.offset))
                    .collect();
                format!("[{}]", v.join(", "))
            };
            d.push(format!(
                "the capability list is {} here, {} in the saved state",
                list(self),
                list(saved)
            ));
        }
        if self.msix != saved.msix {
            let msix = |m: Option<MsixCapLayout>| match m {
                None => "absent".to_string(),
                Some(m) => format!(
                    "{} vectors at {:#x} (table {:#x}, PBA {:#x})",
                    m.vectors, m.offset, m.table, m.pba
                ),
            };
            d.push(format!(
                "MSI-X is {} here, {} in the saved state",
                msix(self.msix),
                msix(saved.msix)
            ));
        }
        if self.msi != saved.msi {
            let msi = |m: Option<MsiCapLayout>| match m {
                None => "absent".to_string(),
                Some(m) => format!(
                    "at {:#x} with control bits {:#06x}",
                    m.offset, m.capabilities
                ),
            };
            d.push(format!(
                "MSI is {} here, {} in the saved state",
                msi(self.msi),
                msi(saved.msi)
            ));
        }
        if self.intx != saved.intx {
            let intx = |i: Option<IntxRouting>| match i {
                None => "not offered".to_string(),
                Some(i) => format!(
                    "on pin INT{} routed to GSI {}",
                    char::from(b'A' + i.pin.saturating_sub(1)),
                    i.gsi
                ),
            };
            d.push(format!(
                "INTx is {} here, {} in the saved state",
                intx(self.intx),
                intx(saved.intx)
            ));
        }
        let counts = |l: &VfioPciLayout| (l.msix_backend_vectors, l.msi_backend_vectors);
        if counts(self) != counts(saved) {
            d.push(format!(
                "the device has {} MSI-X and {} MSI vectors here, {} and {} in the saved state",
                self.msix_backend_vectors,
                self.msi_backend_vectors,
                saved.msix_backend_vectors,
                saved.msi_backend_vectors
            ));
        }
        d
    }
}

/// The layout of a device, from its configuration state and interrupts.
fn layout(st: &State, irqs: &Irqs, intx: Option<&Intx>) -> VfioPciLayout {
    let msix = st.msix_cap.zip(irqs.msix()).map(|(offset, m)| {
        let mut regs = [0u8; 8];
        m.cap_read(4, &mut regs);
        MsixCapLayout {
            offset,
            vectors: m.size(),
            table: u32::from_le_bytes([regs[0], regs[1], regs[2], regs[3]]),
            pba: u32::from_le_bytes([regs[4], regs[5], regs[6], regs[7]]),
        }
    });
    let msi = st
        .msi_cap
        .zip(irqs.msi())
        .map(|((offset, _), m)| MsiCapLayout {
            offset,
            capabilities: m.capabilities(),
        });
    let (msix_backend_vectors, msi_backend_vectors) = irqs.backend_counts();
    VfioPciLayout {
        vendor_device: st.header.read(0x00, &st.bars, &st.caps, 0),
        bars: st
            .bars
            .bars()
            .iter()
            .map(|b| BarLayout {
                index: b.index,
                kind: b.kind,
                size: b.size,
            })
            .collect(),
        caps: st
            .caps
            .caps()
            .iter()
            .map(|c| CapLayout {
                offset: c.offset,
                id: c.id,
            })
            .collect(),
        msix,
        msi,
        msix_backend_vectors,
        msi_backend_vectors,
        intx: intx.map(Intx::routing),
    }
}

impl Persist for VfioPciDevice {
    type State = VfioPciState;
    type Error = VfioPersistError;

    /// The configuration state the guest programmed, the pending vectors and the run-time
    /// traps, for saving. Take it with the vCPUs stopped, so nothing changes meanwhile.
    fn save(&self) -> VfioPciState {
        let st = self.lock_state();
        let irqs = self.lock_irqs();
        let intx = self.lock_intx();
        let header = |reg| st.header.read(reg, &st.bars, &st.caps, 0);
        let (misc, int) = (header(0x0c), header(0x3c));
        let vectors = irqs.vectors();
        VfioPciState {
            layout: layout(&st, &irqs, intx.as_ref()),
            command: st.header.command,
            cache_line: misc as u8,
            latency: (misc >> 8) as u8,
            interrupt_line: int as u8,
            bar_regs: std::array::from_fn(|i| st.bars.read(i)),
            msi: irqs.msi().map(MsiCap::state),
            msix: irqs.msix().map(Msix::state),
            pending_vectors: (0..vectors.len())
                .filter(|&i| vectors.is_pending(i))
                .collect(),
            traps: st
                .bars
                .bars()
                .iter()
                .filter(|b| b.kind.is_memory())
                .map(|b| BarTraps {
                    index: b.index,
                    ranges: st.placement.device_traps(b.index),
                })
                .filter(|t| !t.ranges.is_empty())
                .collect(),
            intx_pending: intx.as_ref().is_some_and(Intx::is_pending),
        }
    }

    /// Applies `s` (from [`save`](Persist::save) of a device of the same type) to this
    /// freshly opened device, with the vCPUs stopped: traps the saved ranges, writes the
    /// header and BAR registers, programs MSI and MSI-X (routes, irqfds, the backend's
    /// eventfds), re-signals the pending vectors, and writes the command register last,
    /// which forwards it to the device and places the BARs (MMIO bus and memory slots, the
    /// port-I/O bus for I/O BARs). INTx follows the MSI and INTx Disable state as the
    /// guest's writes make it; at the end it is unmasked at the device (the source's
    /// device may have been masked waiting for an EOI) and a held-back signal re-made.
    ///
    /// Traps the device already has (its mediator's own) are kept: a trapped page is
    /// never wrong, only slower.
    ///
    /// A device whose layout differs (ids, BAR types or sizes, capability list, MSI/MSI-X
    /// layout or vector counts), or an inconsistent state, is refused before anything is
    /// changed, with every difference named.
    fn restore(&self, s: &VfioPciState) -> Result<(), VfioPersistError> {
        self.check_restore(s)?;
        let intx_errors = || self.lock_intx().as_ref().map_or(0, Intx::errors);
        let failures_before = self.errors.count() + self.lock_irqs().errors() + intx_errors();

        // BARs move with decoding off, as a guest does it.
        let command = self.lock_state().header.command;
        let decoding = COMMAND_MEMORY | COMMAND_IO;
        if command & decoding != 0 {
            self.write_config(0x04, &(command & !decoding).to_le_bytes());
        }
        for t in &s.traps {
            for &(offset, size) in &t.ranges {
                self.trap(t.index, offset, size, TrapOwner::Device)
                    .map_err(|e| VfioPersistError::Trap(Box::new(e)))?;
            }
        }
        self.write_config(0x0c, &[s.cache_line, s.latency]);
        self.write_config(0x3c, &[s.interrupt_line]);
        for (i, reg) in s.bar_regs.iter().enumerate() {
            self.write_config(0x10 + 4 * i, &reg.to_le_bytes());
        }
        if let (Some(m), Some(l)) = (&s.msi, s.layout.msi) {
            for (offset, data) in m.writes() {
                self.write_config(l.offset + offset, &data);
            }
        }
        if let (Some(m), Some(l)) = (&s.msix, s.layout.msix) {
            {
                let mut irqs = self.lock_irqs();
                for (offset, data) in m.table_writes() {
                    irqs.table_write(offset, &data);
                }
            }
            let (offset, data) = m.control_write();
            self.write_config(l.offset + offset, &data);
        }
        let mut failures = 0;
        {
            let irqs = self.lock_irqs();
            for &v in &s.pending_vectors {
                if let Some(Err(e)) = irqs.vectors().eventfd(v).map(|fd| fd.write(1)) {
                    failures += 1;
                    tracing::warn!("{}: cannot mark vector {v} pending: {e}", self.name);
                }
            }
        }

        let before = self.lock_state().header.command;
        self.write_config(0x04, &s.command.to_le_bytes());
        if before == s.command {
            // The write changed nothing here, so it was not forwarded: the device still
            // needs the command bits.
            self.forward_command(s.command);
        }

        if let Some(intx) = self.lock_intx().as_ref() {
            if s.intx_pending {
                intx.mark_pending();
            }
            intx.unmask();
        }

        let st = self.lock_state();
        let command = st.header.command;
        let (io, memory) = (command & COMMAND_IO != 0, command & COMMAND_MEMORY != 0);
        for b in st.bars.bars() {
            if let Some(addr) = st.bars.placement(b.index, io, memory) {
                if st.placement.base(b.index) != Some(addr) {
                    return Err(VfioPersistError::NotPlaced {
                        name: self.name.clone(),
                        index: b.index,
                        addr,
                    });
                }
            }
        }
        drop(st);
        let count = self.errors.count() + self.lock_irqs().errors() + intx_errors() + failures
            - failures_before;
        if count > 0 {
            return Err(VfioPersistError::Failures {
                name: self.name.clone(),
                count,
            });
        }
        Ok(())
    }
}

impl VfioPciDevice {
    fn invalid(&self, reason: String) -> VfioPersistError {
        VfioPersistError::Invalid {
            name: self.name.clone(),
            reason,
        }
    }

    /// Checks that `s` fits this device and is consistent in itself.
    fn check_restore(&self, s: &VfioPciState) -> Result<(), VfioPersistError> {
        let st = self.lock_state();
        let irqs = self.lock_irqs();
        let intx = self.lock_intx();
        let differences = layout(&st, &irqs, intx.as_ref()).differences(&s.layout);
        if !differences.is_empty() {
            return Err(VfioPersistError::Mismatch {
                name: self.name.clone(),
                differences,
            });
        }
        match (&s.msix, &s.layout.msix) {
            (Some(m), Some(l)) if m.entries.len() != l.vectors => {
                return Err(self.invalid(format!(
                    "the MSI-X table has {} entries for a capability of {} vectors",
                    m.entries.len(),
                    l.vectors
                )))
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(self.invalid(
                    "MSI-X registers and the MSI-X capability do not come together".into(),
                ))
            }
            _ => {}
        }
        match (&s.msi, &s.layout.msi) {
            (Some(m), Some(l)) if MsiCap::new(m.control).capabilities() != l.capabilities => {
                return Err(self.invalid(format!(
                    "the MSI control register {:#06x} does not match the capability's bits {:#06x}",
                    m.control, l.capabilities
                )))
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(self
                    .invalid("MSI registers and the MSI capability do not come together".into()))
            }
            _ => {}
        }
        let n = irqs.vectors().len();
        if let Some(&v) = s.pending_vectors.iter().find(|&&v| v >= n) {
            return Err(self.invalid(format!(
                "vector {v} is pending but the device has {n} vectors"
            )));
        }
        for t in &s.traps {
            for &(offset, size) in &t.ranges {
                st.placement
                    .check_range(t.index, offset, size)
                    .map_err(|e| self.invalid(format!("trapped range: {e}")))?;
            }
        }
        Ok(())
    }
}
