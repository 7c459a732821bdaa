//! A type-0 configuration space with per-bit write masks.
//!
//! Guest writes are untrusted: each dword has a mask of the bits the guest may change and a
//! mask of write-one-to-clear bits; everything else is read-only, so no guest write can
//! corrupt the header (ids, class, capability pointers).

/// Size of conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
const DWORDS: usize = CONFIG_SPACE_SIZE / 4;

/// Register offsets used here.
pub mod reg {
    /// Vendor id (low 16 bits) and device id.
    pub const ID: usize = 0x00;
    /// Command (low 16 bits) and status.
    pub const COMMAND_STATUS: usize = 0x04;
    /// Revision (low 8 bits) and class code.
    pub const CLASS_REVISION: usize = 0x08;
    /// Cache line size, latency timer, header type, BIST.
    pub const HEADER: usize = 0x0C;
    /// Subsystem vendor id and subsystem id.
    pub const SUBSYSTEM: usize = 0x2C;
    /// Interrupt line and pin.
    pub const INTERRUPT: usize = 0x3C;
}

/// Configuration space contents and write masks.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    pub(super) regs: [u32; DWORDS],
    pub(super) writable: [u32; DWORDS],
    pub(super) w1c: [u32; DWORDS],
}

impl ConfigSpace {
    /// A header with the given identity; the command register's I/O, memory, bus-master and
    /// interrupt-disable bits and the interrupt line are writable.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, header_type: u8) -> Self {
        let mut c = ConfigSpace {
            regs: [0; DWORDS],
            writable: [0; DWORDS],
            w1c: [0; DWORDS],
        };
        c.regs[reg::ID / 4] = u32::from(vendor) | (u32::from(device) << 16);
        c.regs[reg::CLASS_REVISION / 4] = (class << 8) | u32::from(revision);
        c.regs[reg::HEADER / 4] = u32::from(header_type) << 16;
        c.writable[reg::COMMAND_STATUS / 4] = 0x0000_0407;
        c.writable[reg::HEADER / 4] = 0x0000_00ff; // cache line size
        c.writable[reg::INTERRUPT / 4] = 0x0000_00ff;
        c
    }

    /// Sets the subsystem ids.
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.regs[reg::SUBSYSTEM / 4] = u32::from(vendor) | (u32::from(id) << 16);
    }

    /// Sets a dword's value and masks (device set-up, not guest access).
    pub fn set_dword(&mut self, offset: usize, value: u32, writable: u32, w1c: u32) {
        let i = (offset % CONFIG_SPACE_SIZE) / 4;
        self.regs[i] = value;
        self.writable[i] = writable;
        self.w1c[i] = w1c;
    }

    /// The dword at `offset` (rounded down to a dword boundary).
    pub fn read_dword(&self, offset: usize) -> u32 {
        self.regs
            .get((offset / 4) % DWORDS)
            .copied()
            .unwrap_or(u32::MAX)
    }

    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`; a misaligned or oversized read
    /// returns all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let len = data.len();
        if !matches!(len, 1 | 2 | 4)
            || !offset.is_multiple_of(len)
            || offset + len > CONFIG_SPACE_SIZE
        {
            data.fill(0xff);
            return;
        }
        let bytes = self.read_dword(offset).to_le_bytes();
        let start = offset % 4;
        data.copy_from_slice(&bytes[start..start + len]);
    }

    /// A guest write of `data` (1, 2 or 4 bytes) at `offset`, applied through the masks.
    /// Misaligned or oversized writes are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let len = data.len();
        if !matches!(len, 1 | 2 | 4)
            || !offset.is_multiple_of(len)
            || offset + len > CONFIG_SPACE_SIZE
        {
            return;
        }
        let i = offset / 4;
        let shift = (offset % 4) * 8;
        let mut v = [0u8; 4];
        v[..len].copy_from_slice(data);
        let value = u32::from_le_bytes(v) << shift;
        let lane = if len == 4 {
            u32::MAX
        } else {
            ((1u32 << (len * 8)) - 1) << shift
        };
        let writable = self.writable[i] & lane;
        let clear = self.w1c[i] & lane & value;
        self.regs[i] = ((self.regs[i] & !writable) | (value & writable)) & !clear;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_read_only() {
        let mut c = ConfigSpace::new(0x8086, 0x0d57, 0x06_00_00, 0, 0);
        c.write(0, &0xdead_beefu32.to_le_bytes());
        assert_eq!(c.read_dword(0), 0x0d57_8086);
        let mut w = [0u8; 2];
        c.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        assert_eq!(c.read_dword(8) >> 8, 0x06_00_00);
    }

    #[test]
    fn command_bits_are_writable_through_masks() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, 0);
        c.write(4, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_dword(4) & 0xffff, 0x0407);
        c.write(4, &[0x02]);
        assert_eq!(
            c.read_dword(4) & 0xffff,
            0x0402,
            "byte write keeps the upper byte"
        );
    }

    #[test]
    fn write_one_to_clear_bits() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, 0);
        c.set_dword(0x40, 0x0000_00f0, 0, 0x0000_00f0);
        c.write(0x40, &[0x30]);
        assert_eq!(c.read_dword(0x40), 0xc0);
    }

    #[test]
    fn bad_accesses_are_harmless() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, 0);
        let before = c.clone().regs;
        c.write(0x3d, &[1, 2]); // misaligned
        c.write(0xfe, &[1, 2, 3, 4]); // misaligned and past the end
        c.write(0x10, &[1, 2, 3]); // odd size
        assert_eq!(before, c.regs);
        let mut d = [0u8; 4];
        c.read(0xfd, &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
