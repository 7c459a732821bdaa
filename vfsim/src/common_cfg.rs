//! The virtio PCI common configuration (virtio 1.x section 4.1.4.3): feature
//! negotiation, device status and per-queue setup, as a 64-byte register block.

use crate::virtqueue::{Queue, NO_VECTOR};

/// Device status bit: the driver acknowledged the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status bit: the driver knows how to drive it.
pub const STATUS_DRIVER: u8 = 2;
/// Device status bit: the driver is ready.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status bit: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status bit: the device hit an error and needs a reset.
pub const STATUS_NEEDS_RESET: u8 = 0x40;
/// Device status bit: the driver gave up.
pub const STATUS_FAILED: u8 = 0x80;

/// Feature: the virtio 1.x interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Size of the register block.
pub const SIZE: usize = 0x40;

/// An access outside the block.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommonCfgError {
    /// The access reaches outside the 64-byte block.
    #[error("common configuration access of {len} bytes at {offset:#x} is outside the {SIZE}-byte block")]
    OutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
}

/// What a write asked of the device beyond storing registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgEvent {
    /// The driver wrote 0 to the device status: the device was reset.
    Reset,
}

/// The register file.
#[derive(Debug, Clone)]
pub struct CommonCfg {
    /// Features the device offers.
    pub device_features: u64,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `config_msix_vector`.
    pub config_msix_vector: u16,
    /// `device_status`.
    pub status: u8,
    /// `config_generation` (the device configuration never changes, so it stays 0
    /// unless a saved state brings another value).
    pub config_generation: u8,
    /// `queue_select`.
    pub queue_select: u16,
    /// The queues.
    pub queues: Vec<Queue>,
    msix_vectors: u16,
}

impl CommonCfg {
    /// Registers after reset for a device offering `device_features`, with
    /// `num_queues` queues of at most `queue_size` entries and `msix_vectors` vectors.
    pub fn new(device_features: u64, num_queues: u16, queue_size: u16, msix_vectors: u16) -> Self {
        CommonCfg {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: (0..num_queues).map(|_| Queue::new(queue_size)).collect(),
            msix_vectors,
        }
    }

    /// Back to the reset state (device status 0).
    pub fn reset(&mut self) {
        *self = CommonCfg::new(
            self.device_features,
            self.queues.len() as u16,
            self.queues.first().map_or(0, |q| q.max_size),
            self.msix_vectors,
        );
    }

    /// Number of MSI-X vectors the queues and the configuration may use.
    pub fn msix_vectors(&self) -> u16 {
        self.msix_vectors
    }

    /// Whether the driver finished initialisation and the device is not broken.
    pub fn is_live(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    /// Reads `data.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), CommonCfgError> {
        let range = range(offset, data.len())?;
        data.copy_from_slice(&self.snapshot()[range]);
        Ok(())
    }

    /// Writes `data` at `offset` (any width; read-only fields ignore writes).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Option<CfgEvent>, CommonCfgError> {
        let range = range(offset, data.len())?;
        let mut regs = self.snapshot();
        regs[range.clone()].copy_from_slice(data);
        let touched = |at: usize, len: usize| range.start < at + len && at < range.end;
        let r16 = |at: usize| u16::from_le_bytes([regs[at], regs[at + 1]]);
        let r32 =
            |at: usize| u32::from_le_bytes([regs[at], regs[at + 1], regs[at + 2], regs[at + 3]]);
        let r64 = |at: usize| u64::from(r32(at)) | (u64::from(r32(at + 4)) << 32);

        if touched(0x00, 4) {
            self.device_feature_select = r32(0x00);
        }
        if touched(0x08, 4) {
            self.driver_feature_select = r32(0x08);
        }
        if touched(0x0c, 4) && self.status & STATUS_FEATURES_OK == 0 {
            let v = u64::from(r32(0x0c));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            }
        }
        if touched(0x10, 2) {
            self.config_msix_vector = self.vector(r16(0x10));
        }
        if touched(0x16, 2) {
            self.queue_select = r16(0x16);
        }
        let msix = self.vector(r16(0x1a));
        if let Some(q) = self.queues.get_mut(self.queue_select as usize) {
            if touched(0x1a, 2) {
                q.msix_vector = msix;
            }
            if !q.ready {
                if touched(0x18, 2) {
                    q.size = r16(0x18);
                }
                if touched(0x20, 8) {
                    q.desc = r64(0x20);
                }
                if touched(0x28, 8) {
                    q.avail = r64(0x28);
                }
                if touched(0x30, 8) {
                    q.used = r64(0x30);
                }
                if touched(0x1c, 2) && r16(0x1c) == 1 {
                    if q.size_is_valid() {
                        q.ready = true;
                        q.next_avail = 0;
                        q.next_used = 0;
                    } else {
                        tracing::warn!(size = q.size, "queue enable refused: the size is not a power of two up to the maximum");
                    }
                }
            }
        }
        if touched(0x14, 1) {
            return Ok(self.write_status(regs[0x14]));
        }
        Ok(None)
    }

    fn write_status(&mut self, value: u8) -> Option<CfgEvent> {
        if value == 0 {
            self.reset();
            return Some(CfgEvent::Reset);
        }
        let mut value = value | (self.status & STATUS_NEEDS_RESET);
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let extra = self.driver_features & !self.device_features;
            if extra != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!(
                    driver = self.driver_features,
                    device = self.device_features,
                    "FEATURES_OK refused: the driver accepted unoffered features or not VERSION_1"
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        self.status = value;
        None
    }

    fn vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors {
            v
        } else {
            NO_VECTOR
        }
    }

    fn snapshot(&self) -> [u8; SIZE] {
        let mut r = [0u8; SIZE];
        let mut put = |at: usize, bytes: &[u8]| r[at..at + bytes.len()].copy_from_slice(bytes);
        let df = match self.device_feature_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        };
        let drf = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(0x04, &df.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(0x0c, &drf.to_le_bytes());
        put(0x10, &self.config_msix_vector.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status, self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(self.queue_select as usize) {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &q.msix_vector.to_le_bytes());
            put(0x1c, &u16::from(q.ready).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes()); // queue_notify_off = index
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.avail.to_le_bytes());
            put(0x30, &q.used.to_le_bytes());
        }
        r
    }
}

fn range(offset: u64, len: usize) -> Result<std::ops::Range<usize>, CommonCfgError> {
    usize::try_from(offset)
        .ok()
        .and_then(|s| Some(s..s.checked_add(len)?))
        .filter(|r| r.end <= SIZE)
        .ok_or(CommonCfgError::OutOfRange { offset, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(c: &CommonCfg, at: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        c.read(at, &mut b[..len]).unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn negotiation_and_queue_setup() {
        let mut c = CommonCfg::new(VIRTIO_F_VERSION_1 | 0x200, 1, 128, 2);
        c.write(0x00, &1u32.to_le_bytes()).unwrap();
        assert_eq!(rd(&c, 0x04, 4), 1);
        c.write(0x08, &1u32.to_le_bytes()).unwrap();
        c.write(0x0c, &1u32.to_le_bytes()).unwrap();
        c.write(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        )
        .unwrap();
        assert_ne!(c.status & STATUS_FEATURES_OK, 0);
        c.write(0x18, &64u16.to_le_bytes()).unwrap();
        c.write(0x1a, &5u16.to_le_bytes()).unwrap();
        assert_eq!(rd(&c, 0x1a, 2), u64::from(NO_VECTOR));
        c.write(0x1a, &1u16.to_le_bytes()).unwrap();
        c.write(0x20, &0x1000u32.to_le_bytes()).unwrap();
        c.write(0x24, &1u32.to_le_bytes()).unwrap();
        c.write(0x1c, &1u16.to_le_bytes()).unwrap();
        let q = &c.queues[0];
        assert!(q.ready && q.size == 64 && q.msix_vector == 1 && q.desc == 0x1_0000_1000);
        // Once enabled, the addresses are frozen.
        c.write(0x20, &0u64.to_le_bytes()).unwrap();
        assert_eq!(c.queues[0].desc, 0x1_0000_1000);
        assert_eq!(c.write(0x14, &[0]).unwrap(), Some(CfgEvent::Reset));
        assert!(!c.queues[0].ready);
        assert!(c.read(0x3f, &mut [0; 2]).is_err());
    }

    #[test]
    fn features_ok_needs_version_1_and_offered_bits() {
        let mut c = CommonCfg::new(VIRTIO_F_VERSION_1, 1, 128, 2);
        c.write(0x0c, &4u32.to_le_bytes()).unwrap();
        c.write(0x14, &[STATUS_FEATURES_OK]).unwrap();
        assert_eq!(c.status & STATUS_FEATURES_OK, 0);
    }
}
