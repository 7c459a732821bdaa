//! The PCI configuration space (region 7): a type-0 header, the virtio vendor
//! capabilities and an MSI-X capability, with per-byte write masks.

use crate::layout::*;

/// A configuration-space access that does not fit the space.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The access reaches outside the 256 bytes.
    #[error("configuration access of {len} bytes at {offset:#x} is outside the {CONFIG_SPACE_SIZE}-byte space")]
    OutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
}

/// Virtio PCI capability id (vendor specific).
const CAP_ID_VENDOR: u8 = 0x09;
/// MSI-X capability id.
const CAP_ID_MSIX: u8 = 0x11;
/// PCI Express capability id.
const CAP_ID_PCIE: u8 = 0x10;
/// Offset of Device Control in configuration space.
pub const PCIE_DEVCTL: usize = CAP_PCIE + 8;
/// Device Control: Initiate Function Level Reset (always reads 0).
pub const DEVCTL_FLR: u16 = 1 << 15;
/// `cfg_type` of the common configuration.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// `cfg_type` of the notify area.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// `cfg_type` of the ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// `cfg_type` of the device configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// Command register bits the driver may change: memory space, bus master, INTx disable.
const COMMAND_WMASK: u16 = 0x0002 | 0x0004 | 0x0400;
/// BAR 0 type bits: 64-bit memory, not prefetchable.
const BAR0_TYPE: u32 = 0b100;

/// MSI-X control word: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// MSI-X control word: function mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Offset of the MSI-X control word in configuration space.
pub const MSIX_CONTROL: usize = CAP_MSIX + 2;
/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_SIZE: usize = 16;
/// Offset of the vector-control word in an MSI-X table entry.
pub const MSIX_VECTOR_CONTROL: usize = 12;

/// The PCI-level registers the function keeps besides the virtio ones: configuration
/// space and the (trapped) MSI-X table. Shared by the vfio-user and PF-side threads.
/// The MSI-X state the interrupts follow (enable, function mask, vector masks) is copied
/// into [`crate::irq::MsixVectors`] whenever it changes here.
#[derive(Debug, Clone)]
pub struct PciRegs {
    /// Configuration space.
    pub config: ConfigSpace,
    /// The MSI-X table as the client wrote it (every vector masked after reset), one
    /// entry per vector of the personality.
    pub msix_table: Vec<u8>,
}

impl PciRegs {
    /// The registers after reset of a function of `identity`.
    pub fn new(identity: &Identity) -> Self {
        let mut msix_table = vec![0; identity.msix_table_size() as usize];
        for entry in msix_table.chunks_exact_mut(MSIX_ENTRY_SIZE) {
            entry[MSIX_VECTOR_CONTROL] = 1;
        }
        PciRegs {
            config: ConfigSpace::new(identity),
            msix_table,
        }
    }

    /// Whether vector `v`'s mask bit is set in the table (vectors past the last: masked).
    pub fn vector_masked(&self, v: usize) -> bool {
        self.msix_table
            .get(v * MSIX_ENTRY_SIZE + MSIX_VECTOR_CONTROL)
            .is_none_or(|b| b & 1 != 0)
    }

    /// Sets or clears vector `v`'s mask bit in the table (as `SET_IRQS` mask/unmask
    /// does); vectors past the last are ignored.
    pub fn set_vector_masked(&mut self, v: usize, masked: bool) {
        if let Some(b) = self
            .msix_table
            .get_mut(v * MSIX_ENTRY_SIZE + MSIX_VECTOR_CONTROL)
        {
            *b = (*b & !1) | u8::from(masked);
        }
    }
}

/// The configuration space and what writes may change.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
}

impl ConfigSpace {
    /// The configuration space of a function of `identity` as it is after reset.
    pub fn new(identity: &Identity) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
        };
        c.put16(0x00, VENDOR_ID);
        c.put16(0x02, identity.device_id);
        c.put16(0x06, 0x0010); // status: capability list
        c.bytes[0x08] = REVISION;
        c.bytes[0x09] = identity.class_code as u8;
        c.bytes[0x0a] = (identity.class_code >> 8) as u8;
        c.bytes[0x0b] = (identity.class_code >> 16) as u8;
        c.bytes[0x0e] = 0; // header type 0, single function
        c.put32(0x10, BAR0_TYPE);
        c.put16(0x2c, SUBSYSTEM_VENDOR_ID);
        c.put16(0x2e, identity.subsystem_id);
        c.bytes[0x34] = CAP_COMMON as u8;
        c.bytes[0x3d] = 0; // no INTx pin: MSI-X only

        c.virtio_cap(
            CAP_COMMON,
            CAP_NOTIFY,
            VIRTIO_PCI_CAP_COMMON_CFG,
            COMMON_OFFSET,
            COMMON_SIZE,
        );
        c.virtio_cap(
            CAP_NOTIFY,
            CAP_ISR,
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            NOTIFY_SIZE,
        );
        c.bytes[CAP_NOTIFY + 2] = 20;
        c.put32(CAP_NOTIFY + 16, NOTIFY_OFF_MULTIPLIER);
        c.virtio_cap(CAP_ISR, CAP_DEVICE, VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1);
        c.virtio_cap(
            CAP_DEVICE,
            CAP_MSIX,
            VIRTIO_PCI_CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_SIZE,
        );

        c.bytes[CAP_MSIX] = CAP_ID_MSIX;
        c.bytes[CAP_MSIX + 1] = CAP_PCIE as u8;
        c.put16(CAP_MSIX + 2, identity.msix_vectors - 1);
        c.put32(CAP_MSIX + 4, MSIX_TABLE_OFFSET as u32); // BIR 0
        c.put32(CAP_MSIX + 8, MSIX_PBA_OFFSET as u32); // BIR 0

        // PCI Express v2, endpoint; Device Capabilities: FLR (bit 28), as every SR-IOV VF
        // has. Linux's vfio-pci resets a function only if it offers a reset method.
        c.bytes[CAP_PCIE] = CAP_ID_PCIE;
        c.bytes[CAP_PCIE + 1] = 0;
        c.put16(CAP_PCIE + 2, 0x0002);
        c.put32(CAP_PCIE + 4, 1 << 28);

        c.wmask16(0x04, COMMAND_WMASK);
        c.wmask32(0x10, !(BAR0_SIZE as u32 - 1));
        c.wmask32(0x14, u32::MAX);
        c.wmask[0x3c] = 0xff; // interrupt line
        c.wmask16(
            MSIX_CONTROL,
            MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK,
        );
        c.wmask16(PCIE_DEVCTL, DEVCTL_FLR);
        c
    }

    /// Whether the last writes initiated a function level reset; clears the bit, which
    /// always reads 0.
    pub fn take_flr(&mut self) -> bool {
        let flr = u16::from_le_bytes([self.bytes[PCIE_DEVCTL], self.bytes[PCIE_DEVCTL + 1]])
            & DEVCTL_FLR
            != 0;
        self.bytes[PCIE_DEVCTL + 1] &= !((DEVCTL_FLR >> 8) as u8);
        flr
    }

    /// Reads `data.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), ConfigError> {
        let range = Self::range(offset, data.len())?;
        data.copy_from_slice(&self.bytes[range]);
        Ok(())
    }

    /// Writes `data` at `offset`; only the bits of the write mask change.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigError> {
        let range = Self::range(offset, data.len())?;
        for (i, v) in range.zip(data) {
            self.bytes[i] = (self.bytes[i] & !self.wmask[i]) | (v & self.wmask[i]);
        }
        Ok(())
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[0x04], self.bytes[0x05]])
    }

    /// The MSI-X control word's enable and function-mask bits.
    pub fn msix_control(&self) -> (bool, bool) {
        let c = u16::from_le_bytes([self.bytes[MSIX_CONTROL], self.bytes[MSIX_CONTROL + 1]]);
        (
            c & MSIX_CONTROL_ENABLE != 0,
            c & MSIX_CONTROL_FUNCTION_MASK != 0,
        )
    }

    fn range(offset: u64, len: usize) -> Result<std::ops::Range<usize>, ConfigError> {
        let err = ConfigError::OutOfRange { offset, len };
        let start = usize::try_from(offset).map_err(|_| err.clone())?;
        let end = start.checked_add(len).ok_or(err.clone())?;
        if end > CONFIG_SPACE_SIZE {
            return Err(err);
        }
        Ok(start..end)
    }

    fn virtio_cap(&mut self, at: usize, next: usize, cfg_type: u8, offset: u64, len: u64) {
        self.bytes[at] = CAP_ID_VENDOR;
        self.bytes[at + 1] = next as u8;
        self.bytes[at + 2] = 16;
        self.bytes[at + 3] = cfg_type;
        self.bytes[at + 4] = 0; // BAR 0
        self.put32(at + 8, offset as u32);
        self.put32(at + 12, len as u32);
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn wmask16(&mut self, at: usize, v: u16) {
        self.wmask[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn wmask32(&mut self, at: usize, v: u32) {
        self.wmask[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dword(c: &ConfigSpace, at: u64) -> u32 {
        let mut b = [0; 4];
        c.read(at, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_and_capability_chain() {
        let c = ConfigSpace::new(&BLK_IDENTITY);
        assert_eq!(dword(&c, 0), 0x1042_1af4);
        assert_eq!(dword(&c, 8) >> 8, 0x01_80_00);
        assert_eq!(dword(&c, 0x2c), 0x0002_1af4);
        assert_eq!(dword(&c, CAP_MSIX as u64) >> 16, 1, "2 vectors");
        let n = ConfigSpace::new(&NET_IDENTITY);
        assert_eq!(dword(&n, 0), 0x1041_1af4);
        assert_eq!(dword(&n, 8) >> 8, 0x02_00_00);
        assert_eq!(dword(&n, 0x2c), 0x0001_1af4);
        assert_eq!(dword(&n, CAP_MSIX as u64) >> 16, 2, "3 vectors");
        let mut next = c.bytes[0x34] as usize;
        let mut seen = Vec::new();
        while next != 0 {
            seen.push((c.bytes[next], c.bytes[next + 3]));
            next = c.bytes[next + 1] as usize;
        }
        assert_eq!(
            seen,
            vec![
                (9, 1),
                (9, 2),
                (9, 3),
                (9, 4),
                (0x11, c.bytes[CAP_MSIX + 3]),
                (0x10, 0)
            ]
        );
        assert_eq!(
            dword(&c, CAP_PCIE as u64 + 4) & (1 << 28),
            1 << 28,
            "FLR capable"
        );
    }

    #[test]
    fn flr_bit_is_taken_once_and_reads_zero() {
        let mut c = ConfigSpace::new(&BLK_IDENTITY);
        c.write(PCIE_DEVCTL as u64, &0x0010u16.to_le_bytes())
            .unwrap();
        assert!(!c.take_flr(), "other Device Control bits are not FLR");
        c.write(PCIE_DEVCTL as u64 + 1, &[0x80]).unwrap();
        assert!(c.take_flr());
        assert_eq!(dword(&c, PCIE_DEVCTL as u64) & 0xffff, 0);
        assert!(!c.take_flr());
    }

    #[test]
    fn bar_sizing_and_read_only_bytes() {
        let mut c = ConfigSpace::new(&BLK_IDENTITY);
        c.write(0x10, &[0xff; 8]).unwrap();
        assert_eq!(dword(&c, 0x10), 0xffff_c004);
        assert_eq!(dword(&c, 0x14), 0xffff_ffff);
        c.write(0, &[0; 4]).unwrap();
        assert_eq!(dword(&c, 0), 0x1042_1af4);
        assert!(c.write(0xff, &[0, 0]).is_err());
        assert!(c.read(u64::MAX, &mut [0]).is_err());
    }
}
