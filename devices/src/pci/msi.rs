//! The MSI capability emulated in the VMM.
//!
//! The guest programs address, data, the number of vectors and (with per-vector masking)
//! the mask bits; each change is pushed to the shared [`MsiVectors`], which programs KVM.
//! The vfio-pci function also passes the guest's writes on to the device's own capability
//! and its mask changes to the device (see `devices::vfio::irq`): the device must know
//! whether MSI is on and which vectors are masked, to hold back and pend what it cannot
//! send.

use super::msix::{MsiMessage, MsiVectors};
use super::persist::MsiState;

const CONTROL_ENABLE: u16 = 1;
const CONTROL_MMC_SHIFT: u16 = 1;
const CONTROL_MME_SHIFT: u16 = 4;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;
/// Largest capability: 64-bit with per-vector masking.
const MAX_LEN: usize = 24;

/// What a write to the MSI capability changed, for the caller to tell the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiChange {
    /// MSI is now enabled with this many vectors (also after a change of the count).
    Enabled(usize),
    /// MSI was disabled.
    Disabled,
    /// Nothing the device needs to know.
    None,
}

/// The registers of one MSI capability.
#[derive(Clone, Debug)]
pub struct MsiCap {
    control: u16,
    addr_lo: u32,
    addr_hi: u32,
    data: u16,
    mask: u32,
}

impl MsiCap {
    /// An MSI capability with the read-only features of the device's control register
    /// (multiple-message capable, 64-bit, per-vector masking); disabled, nothing masked.
    pub fn new(device_control: u16) -> Self {
        let mmc = ((device_control >> CONTROL_MMC_SHIFT) & 7).min(5);
        MsiCap {
            control: (mmc << CONTROL_MMC_SHIFT)
                | (device_control & (CONTROL_64BIT | CONTROL_PER_VECTOR_MASK)),
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            mask: 0,
        }
    }

    pub(super) fn is_64bit(&self) -> bool {
        self.control & CONTROL_64BIT != 0
    }

    pub(super) fn per_vector_mask(&self) -> bool {
        self.control & CONTROL_PER_VECTOR_MASK != 0
    }

    /// Length of the capability in configuration space.
    pub fn len(&self) -> usize {
        match (self.is_64bit(), self.per_vector_mask()) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }

    /// Always false: a capability has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Vectors the function can use (multiple-message capable).
    pub fn max_vectors(&self) -> usize {
        1 << ((self.control >> CONTROL_MMC_SHIFT) & 7)
    }

    /// Whether MSI is enabled.
    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    /// Vectors enabled by the guest (multiple-message enable, at most the capability).
    pub fn enabled_vectors(&self) -> usize {
        let mme = (self.control >> CONTROL_MME_SHIFT) & 7;
        (1usize << mme).min(self.max_vectors())
    }

    /// The message control register as the guest sees it.
    pub fn control(&self) -> u16 {
        self.control
    }

    /// The mask bits (all clear without per-vector masking).
    pub fn mask_bits(&self) -> u32 {
        if self.per_vector_mask() {
            self.mask
        } else {
            0
        }
    }

    /// Offset of the pending-bits register in the capability, if it has one (per-vector
    /// masking).
    pub fn pending_offset(&self) -> Option<usize> {
        self.per_vector_mask().then(|| self.layout().2)
    }

    /// The read-only bits of the control register: multiple-message capable, 64-bit,
    /// per-vector masking (what the capability's layout and vector count follow from).
    pub fn capabilities(&self) -> u16 {
        self.control & !(CONTROL_ENABLE | 7 << CONTROL_MME_SHIFT)
    }

    /// The registers the guest programmed, for saving.
    pub fn state(&self) -> MsiState {
        MsiState {
            control: self.control,
            address: u64::from(self.addr_lo) | u64::from(self.addr_hi) << 32,
            data: self.data,
            mask: self.mask,
        }
    }

    /// Offsets of data, mask and pending registers.
    pub(super) fn layout(&self) -> (usize, usize, usize) {
        if self.is_64bit() {
            (0x0c, 0x10, 0x14)
        } else {
            (0x08, 0x0c, 0x10)
        }
    }

    fn image(&self, vectors: Option<&MsiVectors>) -> [u8; MAX_LEN] {
        let mut img = [0u8; MAX_LEN];
        let (data, mask, pending) = self.layout();
        img[2..4].copy_from_slice(&self.control.to_le_bytes());
        img[4..8].copy_from_slice(&self.addr_lo.to_le_bytes());
        if self.is_64bit() {
            img[8..12].copy_from_slice(&self.addr_hi.to_le_bytes());
        }
        img[data..data + 2].copy_from_slice(&self.data.to_le_bytes());
        if self.per_vector_mask() {
            img[mask..mask + 4].copy_from_slice(&self.mask.to_le_bytes());
            let bits = vectors.map_or(0, |v| {
                (0..self.max_vectors())
                    .filter(|&i| self.enabled() && v.is_pending(i))
                    .fold(0u32, |acc, i| acc | 1 << i)
            });
            img[pending..pending + 4].copy_from_slice(&bits.to_le_bytes());
        }
        img
    }

    /// Bits of each byte the guest may write.
    fn writable(&self) -> [u8; MAX_LEN] {
        let mut w = [0u8; MAX_LEN];
        let (data, mask, _) = self.layout();
        w[2] = 0x71; // enable, multiple-message enable
        w[4..8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        if self.is_64bit() {
            w[8..12].fill(0xff);
        }
        w[data..data + 2].fill(0xff);
        if self.per_vector_mask() {
            let bits = (1u64 << self.max_vectors()) - 1;
            w[mask..mask + 4].copy_from_slice(&(bits as u32).to_le_bytes());
        }
        w
    }

    fn parse(&mut self, img: &[u8; MAX_LEN]) {
        let (data, mask, _) = self.layout();
        let u32_at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
        self.control = u16::from_le_bytes([img[2], img[3]]);
        self.addr_lo = u32_at(4);
        if self.is_64bit() {
            self.addr_hi = u32_at(8);
        }
        self.data = u16::from_le_bytes([img[data], img[data + 1]]);
        if self.per_vector_mask() {
            self.mask = u32_at(mask);
        }
    }

    /// Reads capability bytes at `offset` from its start; bytes 0-1 (id, next) read 0 (the
    /// caller owns the list) and bytes past the capability all ones. With `vectors`, the
    /// pending bits report masked vectors the device signalled.
    pub fn read(&self, offset: usize, data: &mut [u8], vectors: Option<&MsiVectors>) {
        let img = self.image(vectors);
        let len = self.len();
        for (k, b) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(k);
            *b = if o < len { img[o] } else { 0xff };
        }
    }

    /// A guest write of capability bytes at `offset`, applied through the writable bits;
    /// vectors are updated and the result says whether the device must switch MSI.
    pub fn write(&mut self, offset: usize, data: &[u8], vectors: &mut MsiVectors) -> MsiChange {
        let before = (self.enabled(), self.enabled_vectors());
        let mut img = self.image(None);
        let writable = self.writable();
        let len = self.len();
        for (k, &b) in data.iter().enumerate() {
            let o = offset.saturating_add(k);
            if o < len {
                img[o] = (img[o] & !writable[o]) | (b & writable[o]);
            }
        }
        self.parse(&img);
        // The vectors are shared with MSI-X: while MSI is off (before and after), they are
        // not MSI's to change.
        if before.0 || self.enabled() {
            self.resync(vectors);
        }
        match (before, (self.enabled(), self.enabled_vectors())) {
            ((false, _), (true, n)) => MsiChange::Enabled(n),
            ((true, _), (false, _)) => MsiChange::Disabled,
            ((true, a), (true, b)) if a != b => MsiChange::Enabled(b),
            _ => MsiChange::None,
        }
    }

    /// Turns MSI off without a guest write (e.g. the guest enabled MSI-X instead).
    pub fn force_disable(&mut self, vectors: &mut MsiVectors) {
        self.control &= !CONTROL_ENABLE;
        self.resync(vectors);
    }

    /// The message vector `i` should deliver now, if any.
    fn message(&self, i: usize) -> Option<MsiMessage> {
        let n = self.enabled_vectors();
        let masked = self.per_vector_mask() && self.mask & (1 << i) != 0;
        (self.enabled() && i < n && !masked).then(|| MsiMessage {
            addr: u64::from(self.addr_lo) | u64::from(self.addr_hi) << 32,
            // The function puts the vector number in the low bits of the data.
            data: u32::from(self.data) & !(n as u32 - 1) | i as u32,
        })
    }

    /// Pushes every vector's current state to `vectors` again (after another user of the
    /// shared vectors, MSI-X, changed them).
    pub fn resync(&self, vectors: &mut MsiVectors) {
        for i in 0..self.max_vectors().min(vectors.len()) {
            vectors.deliver(i, self.message(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::testing::RecordingRoutes;

    #[test]
    fn enable_with_four_vectors_64bit_masking() {
        let routes = RecordingRoutes::new(10);
        let mut v = MsiVectors::new("dev", routes.clone(), 4).unwrap();
        // 4 vectors capable, 64-bit, per-vector masking.
        let mut msi = MsiCap::new(0x0184);
        assert_eq!((msi.len(), msi.max_vectors()), (24, 4));
        msi.write(4, &0xfee0_0000u32.to_le_bytes(), &mut v);
        msi.write(8, &0u32.to_le_bytes(), &mut v);
        msi.write(0x0c, &0x4020u16.to_le_bytes(), &mut v);
        msi.write(0x10, &0b10u32.to_le_bytes(), &mut v); // mask vector 1
                                                         // Enable with MME = 2 (4 vectors).
        assert_eq!(msi.write(2, &[0x21], &mut v), MsiChange::Enabled(4));
        {
            let s = routes.lock();
            assert_eq!(
                s.enabled.keys().copied().collect::<Vec<_>>(),
                vec![10, 12, 13]
            );
            assert_eq!(s.routes[&13].data, 0x4023);
        }
        // Masked vector 1 fires: pending.
        v.eventfd(1).unwrap().write(1).unwrap();
        let mut p = [0u8; 4];
        msi.read(0x14, &mut p, Some(&v));
        assert_eq!(u32::from_le_bytes(p), 0b10);
        assert_eq!(msi.write(2, &[0x00], &mut v), MsiChange::Disabled);
        assert!(routes.lock().enabled.is_empty());
    }

    #[test]
    fn read_only_bits_and_out_of_range() {
        let routes = RecordingRoutes::new(0);
        let mut v = MsiVectors::new("dev", routes, 1).unwrap();
        let mut msi = MsiCap::new(0);
        assert_eq!(msi.len(), 10);
        msi.write(2, &[0xff, 0xff], &mut v);
        let mut c = [0u8; 2];
        msi.read(2, &mut c, None);
        // Enable set, MME written 7 but only one vector capable.
        assert_eq!(u16::from_le_bytes(c), 0x71);
        assert_eq!(msi.enabled_vectors(), 1);
        let mut d = [0u8; 4];
        msi.read(8, &mut d, None);
        assert_eq!(d[2..], [0xff, 0xff]);
        msi.write(usize::MAX, &[1, 2], &mut v);
        msi.read(usize::MAX, &mut d, None);
    }
}
