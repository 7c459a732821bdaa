//! The six BAR registers of a passed-through function, virtualized.
//!
//! The layout (which BARs exist, their type and size) comes from the device once, at open:
//! the type bits from its configuration space, the size from the backend's region info.
//! Guest writes only change address bits, so sizing (writing all ones and reading back the
//! size mask) and programming work as on hardware and can never change a BAR's type.
//!
//! I/O BARs decode in the 16-bit port space when I/O decoding is on, memory BARs in guest
//! physical memory when memory decoding is on ([`BarRegs::placement`]). An I/O BAR larger
//! than PCI allows (256 bytes) is refused ([`BarError::IoTooLarge`]), never truncated.

use resources::layout::PCI_IO_BAR_MAX;

/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;
/// Smallest memory BAR (PCI: 16 bytes).
const MIN_MEM_SIZE: u64 = 16;
/// Smallest I/O BAR (PCI: 4 bytes).
const MIN_IO_SIZE: u64 = 4;
/// Largest I/O BAR (PCI: 256 bytes).
const MAX_IO_SIZE: u64 = PCI_IO_BAR_MAX;
/// End (exclusive) of the port space an I/O BAR can decode in.
const PORT_SPACE_END: u64 = 1 << 16;
/// Addresses a guest may place a BAR below: x86's largest physical address width.
const MAX_PHYS_ADDR: u64 = 1 << 52;

/// The kind of a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory.
    Mem32 {
        /// Prefetchable.
        prefetchable: bool,
    },
    /// 64-bit memory (uses the next BAR register for the upper half).
    Mem64 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

impl BarKind {
    /// Whether the BAR is in memory space.
    pub fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }

    /// The read-only low bits of the register.
    fn flags(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Mem32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Mem64 { prefetchable } => 0x4 | u32::from(prefetchable) << 3,
        }
    }
}

/// One implemented BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarDesc {
    /// BAR number (0-5), also the backend's region index.
    pub index: usize,
    /// Type.
    pub kind: BarKind,
    /// Size the guest sees: the region size rounded up to a power of two.
    pub size: u64,
    /// Size of the backend's region (accesses past it read all ones).
    pub region_size: u64,
}

impl BarDesc {
    /// Mask of the address bits of the whole (32- or 64-bit) BAR.
    fn address_mask(&self) -> u64 {
        let width = match self.kind {
            BarKind::Mem64 { .. } => u64::MAX,
            _ => u64::from(u32::MAX),
        };
        let low = if self.kind.is_memory() { !0xf } else { !0x3 };
        !(self.size - 1) & width & low
    }
}

/// Why a BAR the device reports is not offered to the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    /// A 64-bit BAR in the last register, with no register left for its upper half.
    #[error("BAR {index} is 64-bit but has no upper half")]
    NoUpperHalf {
        /// The BAR.
        index: usize,
    },
    /// The memory type bits hold the reserved value 3.
    #[error("BAR {index} has the reserved type 3")]
    ReservedType {
        /// The BAR.
        index: usize,
    },
    /// An I/O BAR larger than PCI allows: it would not fit the guest's port space the way
    /// the device expects, and truncating it would hide registers.
    #[error("BAR {index} is an I/O BAR of {region_size:#x} bytes, more than the {MAX_IO_SIZE:#x} bytes PCI allows an I/O BAR; it is refused rather than truncated")]
    IoTooLarge {
        /// The BAR.
        index: usize,
        /// Size of the device's region.
        region_size: u64,
    },
    /// A memory BAR larger than its type can address.
    #[error("BAR {index} ({kind:?}) region of {region_size:#x} bytes is too large")]
    TooLarge {
        /// The BAR.
        index: usize,
        /// Its type.
        kind: BarKind,
        /// Size of the device's region.
        region_size: u64,
    },
}

/// Builds the BAR layout from the device's BAR registers and region sizes. BARs the guest
/// could not use (unknown type, 64-bit in the last slot, absurd sizes, I/O BARs over 256
/// bytes) are left out and reported in the returned list of errors.
pub fn probe(raw: [u32; NUM_BARS], region_sizes: [u64; NUM_BARS]) -> (Vec<BarDesc>, Vec<BarError>) {
    let mut bars = Vec::new();
    let mut complaints = Vec::new();
    let mut i = 0;
    while i < NUM_BARS {
        let (reg, region_size) = (raw[i], region_sizes[i]);
        let index = i;
        i += 1;
        if region_size == 0 {
            continue;
        }
        let kind = if reg & 1 != 0 {
            BarKind::Io
        } else {
            let prefetchable = reg & 0x8 != 0;
            match (reg >> 1) & 3 {
                0 | 1 => BarKind::Mem32 { prefetchable },
                2 if index + 1 < NUM_BARS => {
                    i += 1;
                    BarKind::Mem64 { prefetchable }
                }
                2 => {
                    complaints.push(BarError::NoUpperHalf { index });
                    continue;
                }
                _ => {
                    complaints.push(BarError::ReservedType { index });
                    continue;
                }
            }
        };
        let (min, max) = match kind {
            BarKind::Io => (MIN_IO_SIZE, MAX_IO_SIZE),
            BarKind::Mem32 { .. } => (MIN_MEM_SIZE, 1 << 31),
            BarKind::Mem64 { .. } => (MIN_MEM_SIZE, 1 << 62),
        };
        let size = region_size.max(min).checked_next_power_of_two();
        match size.filter(|&s| s <= max) {
            Some(size) => bars.push(BarDesc {
                index,
                kind,
                size,
                region_size,
            }),
            None if kind == BarKind::Io => {
                complaints.push(BarError::IoTooLarge { index, region_size })
            }
            None => complaints.push(BarError::TooLarge {
                index,
                kind,
                region_size,
            }),
        }
    }
    (bars, complaints)
}

/// The BAR registers as the guest sees them.
#[derive(Clone, Debug)]
pub struct BarRegs {
    bars: Vec<BarDesc>,
    regs: [u32; NUM_BARS],
}

impl BarRegs {
    /// Registers for `bars`, with all addresses 0.
    pub fn new(bars: Vec<BarDesc>) -> Self {
        let mut regs = [0u32; NUM_BARS];
        for b in &bars {
            regs[b.index] = b.kind.flags();
        }
        BarRegs { bars, regs }
    }

    /// The implemented BARs.
    pub fn bars(&self) -> &[BarDesc] {
        &self.bars
    }

    /// The BAR with number `index`, if implemented.
    pub fn bar(&self, index: usize) -> Option<&BarDesc> {
        self.bars.iter().find(|b| b.index == index)
    }

    /// The register `reg` (0-5).
    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// A guest write of a whole register `reg` (merge partial writes with [`read`] first).
    /// Returns the BAR whose address may have changed.
    ///
    /// [`read`]: Self::read
    pub fn write(&mut self, reg: usize, value: u32) -> Option<usize> {
        let bar = *self.bars.iter().find(|b| {
            b.index == reg || (matches!(b.kind, BarKind::Mem64 { .. }) && b.index + 1 == reg)
        })?;
        let mask = bar.address_mask();
        self.regs[reg] = if reg == bar.index {
            (value & mask as u32) | bar.kind.flags()
        } else {
            value & (mask >> 32) as u32
        };
        Some(bar.index)
    }

    /// Sets the address of BAR `index` as firmware would. Returns false (and changes
    /// nothing) if the BAR does not exist or `addr` is not an address it can take.
    pub fn set_address(&mut self, index: usize, addr: u64) -> bool {
        let Some(bar) = self.bar(index).copied() else {
            return false;
        };
        if addr & !bar.address_mask() != 0 {
            return false;
        }
        if bar.kind == BarKind::Io && addr + bar.size > PORT_SPACE_END {
            return false;
        }
        self.regs[index] = addr as u32 | bar.kind.flags();
        if matches!(bar.kind, BarKind::Mem64 { .. }) {
            self.regs[index + 1] = (addr >> 32) as u32;
        }
        true
    }

    /// The address BAR `index` is programmed to.
    pub fn address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let low = if bar.kind.is_memory() {
            !0xfu32
        } else {
            !0x3u32
        };
        let mut addr = u64::from(self.regs[index] & low);
        if matches!(bar.kind, BarKind::Mem64 { .. }) {
            addr |= u64::from(self.regs[index + 1]) << 32;
        }
        Some(addr)
    }

    /// Where BAR `index` decodes, if it does: its address when the command register decodes
    /// its space (`io_decoding` for an I/O BAR, `memory_decoding` for a memory BAR) and the
    /// address is neither 0, the sizing pattern (all address bits set), nor beyond the
    /// space (the guest's physical address space; the 16-bit port space for I/O).
    pub fn placement(&self, index: usize, io_decoding: bool, memory_decoding: bool) -> Option<u64> {
        let bar = self.bar(index)?;
        let addr = self.address(index)?;
        let (decoding, limit) = if bar.kind.is_memory() {
            (memory_decoding, MAX_PHYS_ADDR)
        } else {
            (io_decoding, PORT_SPACE_END)
        };
        let fits = addr.checked_add(bar.size).is_some_and(|end| end <= limit);
        (decoding && addr != 0 && addr != bar.address_mask() && fits).then_some(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> BarRegs {
        // BAR0/1: 64-bit prefetchable 64 KiB; BAR2: 32-bit 16 KiB; BAR4: I/O 20 bytes.
        let raw = [0xc, 0, 0, 0, 1, 0];
        let sizes = [0x10000, 0, 0x4000, 0, 20, 0];
        let (bars, complaints) = probe(raw, sizes);
        assert!(complaints.is_empty());
        BarRegs::new(bars)
    }

    #[test]
    fn sizing_returns_the_size_mask() {
        let mut r = layout();
        for reg in 0..NUM_BARS {
            r.write(reg, u32::MAX);
        }
        assert_eq!(r.read(0), 0xffff_000c);
        assert_eq!(r.read(1), 0xffff_ffff);
        assert_eq!(r.read(2), 0xffff_c000);
        assert_eq!(r.read(3), 0);
        assert_eq!(r.read(4), 0xffff_ffe1, "I/O BAR of 20 bytes sizes as 32");
        assert_eq!(r.read(5), 0);
        assert_eq!(
            r.placement(0, true, true),
            None,
            "sizing pattern is not an address"
        );
        assert_eq!(r.placement(4, true, true), None, "nor for an I/O BAR");
    }

    #[test]
    fn programming_and_placement() {
        let mut r = layout();
        r.write(0, 0x1234_5678);
        r.write(1, 0x1);
        assert_eq!(r.address(0), Some(0x1_1234_0000));
        assert_eq!(r.placement(0, true, false), None);
        assert_eq!(r.placement(0, false, true), Some(0x1_1234_0000));
        assert!(r.set_address(2, 0xc000_4000));
        assert!(!r.set_address(2, 0xc000_5000), "misaligned");
        assert!(!r.set_address(3, 0xc000_0000), "not a BAR");
        assert_eq!(r.placement(2, false, true), Some(0xc000_4000));
        r.write(1, 0xffff_ffff);
        assert_eq!(
            r.placement(0, false, true),
            None,
            "beyond the physical address space"
        );
    }

    #[test]
    fn io_bars_decode_in_port_space_with_io_decoding() {
        let mut r = layout();
        assert_eq!(r.write(4, 0xc03e), Some(4));
        assert_eq!(r.read(4), 0xc021, "32-byte aligned, I/O space bit kept");
        assert_eq!(r.address(4), Some(0xc020));
        assert_eq!(r.placement(4, false, true), None, "memory decoding only");
        assert_eq!(r.placement(4, true, false), Some(0xc020));
        assert_eq!(
            r.placement(2, true, false),
            None,
            "I/O decoding places no memory BAR"
        );
        r.write(4, 0x1_c020);
        assert_eq!(r.placement(4, true, true), None, "beyond the port space");
        assert!(r.set_address(4, 0xffe0));
        assert_eq!(r.placement(4, true, true), Some(0xffe0));
        assert!(!r.set_address(4, 0x1_0000), "beyond the port space");
        assert!(!r.set_address(4, 0xc010), "misaligned");
    }

    #[test]
    fn io_bars_are_sized_per_device_and_over_256_bytes_refused() {
        // BAR0: an 8-byte I/O BAR (libvfio-user's sample `server`); BAR1: 0x3000 bytes of
        // I/O (the same sample's second BAR); BAR2: exactly 256 bytes.
        let (bars, errors) = probe([1, 1, 1, 0, 0, 0], [8, 0x3000, 0x100, 0, 0, 0]);
        let sizes: Vec<_> = bars.iter().map(|b| (b.index, b.size)).collect();
        assert_eq!(sizes, vec![(0, 8), (2, 0x100)]);
        assert_eq!(
            errors,
            vec![BarError::IoTooLarge {
                index: 1,
                region_size: 0x3000
            }]
        );
        let msg = errors[0].to_string();
        assert!(msg.contains("BAR 1") && msg.contains("0x3000"), "{msg}");
        let mut r = BarRegs::new(bars);
        r.write(0, u32::MAX);
        assert_eq!(r.read(0), 0xffff_fff9, "8 bytes, I/O");
        let (bars, _) = probe([1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]);
        assert_eq!(bars[0].size, 4, "the smallest I/O BAR is 4 bytes");
    }

    #[test]
    fn malformed_layouts_are_refused() {
        let (bars, complaints) = probe([0, 0, 0, 0, 0, 0x4], [0, 0, 0, 0, 0, 0x1000]);
        assert!(bars.is_empty());
        assert_eq!(complaints.len(), 1);
        let (bars, complaints) = probe([0x6, 0, 0x1, 0, 0, 0], [0x1000, 0, 1 << 20, 0, 0, 0]);
        assert!(bars.is_empty());
        assert_eq!(complaints.len(), 2);
    }
}
