//! The virtual configuration header and capability list of a passed-through function.
//!
//! Identity (ids, class, revision, subsystem) is copied from the device at open and is read
//! only. Command, cache line size, latency timer and interrupt line are virtual registers
//! (the command bits the device must see are forwarded by the caller). The capability list
//! is walked once; capabilities the VMM does not pass through are unlinked by rewriting the
//! next pointers, so the guest never finds them. Everything here is pure data: reads and
//! writes of the device itself are the caller's.

use super::bars::BarRegs;

/// Size of the configuration space the guest can reach (conventional PCI).
pub const CONFIG_SIZE: usize = 256;
/// First byte after the type-0 header.
pub const HEADER_END: usize = 0x40;
/// Command register bits the guest controls: I/O, memory, bus master, INTx disable.
pub const COMMAND_WRITABLE: u16 = 0x0407;
/// Command bit: I/O space decoding.
pub const COMMAND_IO: u16 = 0x0001;
/// Command bit: memory space decoding.
pub const COMMAND_MEMORY: u16 = 0x0002;
/// Command bit: bus master.
pub const COMMAND_BUS_MASTER: u16 = 0x0004;
/// Command bit: INTx disable (the function must not assert its interrupt pin).
pub const COMMAND_INTX_DISABLE: u16 = 0x0400;
/// Status bits that are write-one-to-clear (error bits).
pub const STATUS_W1C: u16 = 0xf900;
const STATUS_CAP_LIST: u16 = 0x0010;

/// Capability id: power management.
pub const CAP_PM: u8 = 0x01;
/// Capability id: MSI.
pub const CAP_MSI: u8 = 0x05;
/// Capability id: vendor specific.
pub const CAP_VENDOR: u8 = 0x09;
/// Capability id: PCI Express.
pub const CAP_PCIE: u8 = 0x10;
/// Capability id: MSI-X.
pub const CAP_MSIX: u8 = 0x11;
/// Capabilities a well-formed list can hold in 192 bytes (each at least 4 bytes).
const MAX_CAPS: usize = (CONFIG_SIZE - HEADER_END) / 4;

/// The type-0 header registers other than the BARs.
#[derive(Clone, Debug)]
pub struct Header {
    ids: u32,
    class_revision: u32,
    header_type: u8,
    subsystem: u32,
    min_gnt_max_lat: u16,
    /// Virtual command register.
    pub command: u16,
    cache_line: u8,
    latency: u8,
    interrupt_line: u8,
    /// Interrupt pin the guest sees (1-4: INTA-INTD), 0 while INTx is not offered.
    interrupt_pin: u8,
}

impl Header {
    /// The header of the device whose configuration space reads `cfg`.
    pub fn new(cfg: &[u8; CONFIG_SIZE]) -> Self {
        Header {
            ids: dword(cfg, 0x00),
            class_revision: dword(cfg, 0x08),
            // Only function 0 is exposed: clear the multi-function bit.
            header_type: cfg[0x0e] & 0x7f,
            subsystem: dword(cfg, 0x2c),
            min_gnt_max_lat: u16::from_le_bytes([cfg[0x3e], cfg[0x3f]]),
            command: 0,
            cache_line: 0,
            latency: 0,
            interrupt_line: 0,
            interrupt_pin: 0,
        }
    }

    /// Offers INTx on `pin` (1-4: INTA-INTD; 0: not offered).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.interrupt_pin = pin;
    }

    /// Sets the interrupt line register as firmware does (the IRQ the pin is routed to).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.interrupt_line = line;
    }

    /// Header type without the multi-function bit (0 for an endpoint).
    pub fn header_type(&self) -> u8 {
        self.header_type
    }

    /// The header dword at `reg` (a multiple of 4 below 0x40). `status` is the device's
    /// live status register; its capability-list bit is replaced by whether `caps` has any.
    pub fn read(&self, reg: usize, bars: &BarRegs, caps: &CapList, status: u16) -> u32 {
        match reg {
            0x00 => self.ids,
            0x04 => {
                let mut status = status & !STATUS_CAP_LIST;
                if caps.first() != 0 {
                    status |= STATUS_CAP_LIST;
                }
                u32::from(self.command) | u32::from(status) << 16
            }
            0x08 => self.class_revision,
            0x0c => {
                u32::from(self.cache_line)
                    | u32::from(self.latency) << 8
                    | u32::from(self.header_type) << 16
            }
            0x10..=0x24 => bars.read((reg - 0x10) / 4),
            0x2c => self.subsystem,
            0x34 => u32::from(caps.first()),
            // Interrupt pin 0 unless INTx is offered: the guest then uses MSI-X or MSI.
            0x3c => {
                u32::from(self.interrupt_line)
                    | u32::from(self.interrupt_pin) << 8
                    | u32::from(self.min_gnt_max_lat) << 16
            }
            // CardBus CIS, expansion ROM (not exposed), reserved.
            _ => 0,
        }
    }

    /// Applies a guest write of `data` at `offset` (inside the dword `reg`) to the virtual
    /// cache line size, latency timer, interrupt line and command registers. Returns the
    /// old command register when the write reached it.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<u16> {
        match reg {
            0x04 => {
                if lanes(offset % 4, data.len()).start >= 2 {
                    return None; // status only
                }
                let old = self.command;
                let value = merge(u32::from(self.command), offset % 4, data) as u16;
                self.command = (old & !COMMAND_WRITABLE) | (value & COMMAND_WRITABLE);
                Some(old)
            }
            0x0c => {
                let v = merge(
                    u32::from(self.cache_line) | u32::from(self.latency) << 8,
                    offset % 4,
                    data,
                );
                self.cache_line = v as u8;
                self.latency = (v >> 8) as u8;
                None
            }
            0x3c => {
                self.interrupt_line = merge(u32::from(self.interrupt_line), offset % 4, data) as u8;
                None
            }
            _ => None,
        }
    }
}

/// A capability kept in the guest's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Offset in configuration space.
    pub offset: usize,
    /// Capability id.
    pub id: u8,
    /// Next pointer the guest sees.
    pub next: u8,
}

/// The capability list the guest sees.
#[derive(Clone, Debug, Default)]
pub struct CapList {
    caps: Vec<Cap>,
}

impl CapList {
    /// Walks the device's list in `cfg` and keeps the capabilities for which `keep(id,
    /// offset)` is true, linked in the device's order. Returns the list and the
    /// `(offset, id)` of the capabilities hidden. A loop, a pointer into the header or more
    /// capabilities than fit end the walk.
    pub fn walk(
        cfg: &[u8; CONFIG_SIZE],
        mut keep: impl FnMut(u8, usize) -> bool,
    ) -> (Self, Vec<(usize, u8)>) {
        let status = u16::from_le_bytes([cfg[0x06], cfg[0x07]]);
        let mut ptr = if status & STATUS_CAP_LIST != 0 {
            usize::from(cfg[0x34] & 0xfc)
        } else {
            0
        };
        let mut seen = [false; CONFIG_SIZE];
        let mut kept = Vec::new();
        let mut hidden = Vec::new();
        while ptr >= HEADER_END && !seen[ptr] && kept.len() + hidden.len() < MAX_CAPS {
            seen[ptr] = true;
            let id = cfg[ptr];
            if keep(id, ptr) {
                kept.push(Cap {
                    offset: ptr,
                    id,
                    next: 0,
                });
            } else {
                hidden.push((ptr, id));
            }
            ptr = usize::from(cfg[ptr + 1] & 0xfc);
        }
        for i in 1..kept.len() {
            kept[i - 1].next = kept[i].offset as u8;
        }
        (CapList { caps: kept }, hidden)
    }

    /// The capability pointer (0: no capabilities).
    pub fn first(&self) -> u8 {
        self.caps.first().map_or(0, |c| c.offset as u8)
    }

    /// The kept capabilities in list order.
    pub fn caps(&self) -> &[Cap] {
        &self.caps
    }

    /// Offset of the first kept capability with `id`.
    pub fn find(&self, id: u8) -> Option<usize> {
        self.caps.iter().find(|c| c.id == id).map(|c| c.offset)
    }

    /// The virtual value of byte `offset` if it is the id or next pointer of a kept
    /// capability.
    pub fn header_byte(&self, offset: usize) -> Option<u8> {
        self.caps
            .iter()
            .find_map(|c| match offset.checked_sub(c.offset) {
                Some(0) => Some(c.id),
                Some(1) => Some(c.next),
                _ => None,
            })
    }
}

/// The little-endian dword at `offset` of `cfg` (`offset + 4 <= 256`).
pub fn dword(cfg: &[u8; CONFIG_SIZE], offset: usize) -> u32 {
    u32::from_le_bytes([
        cfg[offset],
        cfg[offset + 1],
        cfg[offset + 2],
        cfg[offset + 3],
    ])
}

/// `old` with the bytes of `data` written at byte `start` (0-3) of the dword; bytes past
/// the dword are dropped.
pub fn merge(old: u32, start: usize, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    for (k, &b) in data.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(start + k) {
            *slot = b;
        }
    }
    u32::from_le_bytes(bytes)
}

/// The byte lanes (0-3) a write of `len` bytes at byte `start` of a dword covers.
pub fn lanes(start: usize, len: usize) -> std::ops::Range<usize> {
    start.min(4)..(start + len).min(4)
}

/// Whether a configuration access of `len` bytes at `offset` is one the bus can make:
/// 1, 2 or 4 bytes, naturally aligned, inside the 256 bytes.
pub fn valid_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) && offset + len <= CONFIG_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_with_caps() -> [u8; CONFIG_SIZE] {
        let mut cfg = [0u8; CONFIG_SIZE];
        cfg[0x06] = 0x10;
        cfg[0x34] = 0x40;
        // PM -> MSI-X -> VPD -> vendor -> loop back to MSI-X.
        cfg[0x40..0x42].copy_from_slice(&[CAP_PM, 0x50]);
        cfg[0x50..0x52].copy_from_slice(&[CAP_MSIX, 0x61]); // low bits ignored
        cfg[0x60..0x62].copy_from_slice(&[0x03, 0x70]);
        cfg[0x70..0x72].copy_from_slice(&[CAP_VENDOR, 0x50]);
        cfg
    }

    #[test]
    fn walk_hides_and_relinks_and_stops_on_loops() {
        let cfg = cfg_with_caps();
        let (caps, hidden) = CapList::walk(&cfg, |id, _| id != 0x03);
        assert_eq!(caps.first(), 0x40);
        let order: Vec<_> = caps.caps().iter().map(|c| (c.offset, c.next)).collect();
        assert_eq!(order, vec![(0x40, 0x50), (0x50, 0x70), (0x70, 0)]);
        assert_eq!(hidden, vec![(0x60, 0x03)]);
        assert_eq!(caps.header_byte(0x51), Some(0x70));
        assert_eq!(caps.header_byte(0x70), Some(CAP_VENDOR));
        assert_eq!(caps.header_byte(0x72), None);
        assert_eq!(caps.find(CAP_MSIX), Some(0x50));
    }

    #[test]
    fn no_cap_list_bit_means_no_caps() {
        let mut cfg = cfg_with_caps();
        cfg[0x06] = 0;
        let (caps, hidden) = CapList::walk(&cfg, |_, _| true);
        assert_eq!(caps.first(), 0);
        assert!(hidden.is_empty());
        cfg[0x06] = 0x10;
        cfg[0x34] = 0x3c; // points into the header
        assert_eq!(CapList::walk(&cfg, |_, _| true).0.first(), 0);
    }

    #[test]
    fn merge_and_lanes() {
        assert_eq!(merge(0x1122_3344, 2, &[0xaa, 0xbb]), 0xbbaa_3344);
        assert_eq!(merge(0x1122_3344, 3, &[0xaa, 0xbb]), 0xaa22_3344);
        assert_eq!(lanes(2, 2), 2..4);
        assert!(valid_access(0xfc, 4));
        assert!(!valid_access(0xfe, 4));
        assert!(!valid_access(0x10, 3));
    }
}
