//! Saved state of the PCI pieces: a configuration space (the host bridge's), the
//! configuration mechanism's address latch, and the MSI and MSI-X registers a guest
//! programs (used by the vfio-pci device's state).
//!
//! Each state is plain data for serde; the stream that carries it is versioned by the
//! `migration` crate, not here. Restoring goes through the guest's own write paths where
//! there is one, so that a restored device is in a state a guest could have put it in.

use serde::{Deserialize, Serialize};
use vm_device::bus::PioAddress;
use vm_device::DevicePio;

use super::config::{ConfigSpace, CONFIG_SPACE_SIZE};
use super::host_bridge::HostBridge;
use super::msi::MsiCap;
use super::root::{PciRoot, CONFIG_ADDRESS_PORT};
use crate::persist::Persist;

/// Bits of CONFIG_ADDRESS that the configuration mechanism keeps (enable, bus, device,
/// function, register).
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// Why a PCI state could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum PciPersistError {
    /// The saved configuration space has the wrong number of dwords.
    #[error(
        "saved configuration space has {len} dwords, a conventional one has {}",
        CONFIG_SPACE_SIZE / 4
    )]
    ConfigLength {
        /// Dwords in the state.
        len: usize,
    },
    /// A read-only part of configuration space (identity, class, ...) differs: the state
    /// belongs to another device.
    #[error("configuration dword {offset:#04x} has read-only bits {mask:#010x} reading {saved:#010x} in the saved state but {current:#010x} here: the state is from a different device")]
    ConfigMismatch {
        /// Offset of the dword.
        offset: usize,
        /// The saved dword.
        saved: u32,
        /// This device's dword.
        current: u32,
        /// The bits that must be equal.
        mask: u32,
    },
    /// The saved CONFIG_ADDRESS has bits the configuration mechanism never keeps.
    #[error("saved CONFIG_ADDRESS {0:#010x} has reserved bits set (only {CONFIG_ADDRESS_MASK:#010x} can be)")]
    ConfigAddress(u32),
}

/// A configuration space's registers (the host bridge's). Restoring checks the read-only
/// bits against the device's and applies the guest-writable ones.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConfigSpaceState {
    /// The 64 dwords of conventional configuration space.
    pub regs: Vec<u32>,
}

impl ConfigSpace {
    /// The registers, for saving.
    pub fn state(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            regs: self.regs.to_vec(),
        }
    }

    /// Applies the guest-writable (and write-one-to-clear) bits of `state`. Fails, changing
    /// nothing, if the state is not 64 dwords or its read-only bits differ from this
    /// space's (another device).
    pub fn restore(&mut self, state: &ConfigSpaceState) -> Result<(), PciPersistError> {
        if state.regs.len() != self.regs.len() {
            return Err(PciPersistError::ConfigLength {
                len: state.regs.len(),
            });
        }
        for (i, (&saved, &current)) in state.regs.iter().zip(self.regs.iter()).enumerate() {
            let mask = !(self.writable[i] | self.w1c[i]);
            if saved & mask != current & mask {
                return Err(PciPersistError::ConfigMismatch {
                    offset: i * 4,
                    saved,
                    current,
                    mask,
                });
            }
        }
        for (i, &saved) in state.regs.iter().enumerate() {
            let keep = self.writable[i] | self.w1c[i];
            self.regs[i] = (self.regs[i] & !keep) | (saved & keep);
        }
        Ok(())
    }
}

/// The host bridge's configuration space (its command register and cache line size are
/// guest-writable). It sits in a mutex because the PCI root shares it with the VMM.
impl Persist for std::sync::Mutex<HostBridge> {
    type State = ConfigSpaceState;
    type Error = PciPersistError;

    fn save(&self) -> ConfigSpaceState {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .state()
    }

    /// See [`ConfigSpace::restore`].
    fn restore(&self, state: &ConfigSpaceState) -> Result<(), PciPersistError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .restore(state)
    }
}

/// The configuration mechanism's CONFIG_ADDRESS latch: a guest saved between its write of
/// 0xCF8 and its access of 0xCFC finds the same function selected after a restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PciRootState {
    /// The value of CONFIG_ADDRESS (port 0xCF8).
    pub config_address: u32,
}

impl Persist for PciRoot {
    type State = PciRootState;
    type Error = PciPersistError;

    /// The address latch. The functions on the bus save their own state.
    fn save(&self) -> PciRootState {
        let mut d = [0u8; 4];
        self.pio_read(PioAddress(CONFIG_ADDRESS_PORT), 0, &mut d);
        PciRootState {
            config_address: u32::from_le_bytes(d),
        }
    }

    /// Restores the address latch through the guest's write path.
    fn restore(&self, state: &PciRootState) -> Result<(), PciPersistError> {
        if state.config_address & !CONFIG_ADDRESS_MASK != 0 {
            return Err(PciPersistError::ConfigAddress(state.config_address));
        }
        self.pio_write(
            PioAddress(CONFIG_ADDRESS_PORT),
            0,
            &state.config_address.to_le_bytes(),
        );
        Ok(())
    }
}

/// The registers of an MSI capability.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MsiState {
    /// Message control: enable and multiple-message enable (written by the guest) and the
    /// read-only capability bits (multiple-message capable, 64-bit, per-vector masking).
    pub control: u16,
    /// Message address (the upper half only with a 64-bit capability).
    pub address: u64,
    /// Message data.
    pub data: u16,
    /// Mask bits (only with per-vector masking).
    pub mask: u32,
}

impl MsiState {
    /// The guest writes (offset from the capability's start, bytes) that put a capability
    /// with this state's layout into this state: address, data and mask first, the
    /// control register (enable) last, each a naturally aligned configuration access.
    pub fn writes(&self) -> Vec<(usize, Vec<u8>)> {
        let layout = MsiCap::new(self.control);
        let (data, mask, _) = layout.layout();
        let mut w = vec![(4, (self.address as u32).to_le_bytes().to_vec())];
        if layout.is_64bit() {
            w.push((8, ((self.address >> 32) as u32).to_le_bytes().to_vec()));
        }
        w.push((data, self.data.to_le_bytes().to_vec()));
        if layout.per_vector_mask() {
            w.push((mask, self.mask.to_le_bytes().to_vec()));
        }
        w.push((2, self.control.to_le_bytes().to_vec()));
        w
    }
}

/// One MSI-X table entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MsixEntryState {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub vector_control: u32,
}

/// The guest-programmed part of an MSI-X capability: enable, function mask and the table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MsixState {
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_mask: bool,
    /// The table, one entry per vector.
    pub entries: Vec<MsixEntryState>,
}

impl MsixState {
    /// The guest writes (offset in the table, dword) that program every table entry.
    pub fn table_writes(&self) -> Vec<(u64, [u8; 4])> {
        self.entries
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                let base = (i * 16) as u64;
                [
                    (base, (e.address as u32).to_le_bytes()),
                    (base + 4, ((e.address >> 32) as u32).to_le_bytes()),
                    (base + 8, e.data.to_le_bytes()),
                    (base + 12, e.vector_control.to_le_bytes()),
                ]
            })
            .collect()
    }

    /// The guest write (offset from the capability's start, bytes) of the message control
    /// register; write it after the table.
    pub fn control_write(&self) -> (usize, [u8; 2]) {
        let control = u16::from(self.enabled) << 15 | u16::from(self.function_mask) << 14;
        (2, control.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::testing::RecordingRoutes;
    use crate::pci::msix::{MsiVectors, Msix};
    use crate::pci::PciDevice;

    fn json<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(s: &T) {
        let text = serde_json::to_string(s).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&text).unwrap(), s, "{text}");
    }

    #[test]
    fn host_bridge_round_trip_and_identity_check() {
        let a = std::sync::Mutex::new(HostBridge::new());
        {
            let mut a = a.lock().unwrap();
            a.config_write(0x04, &0x0006u16.to_le_bytes());
            a.config_write(0x0c, &[0x10]);
            a.config_write(0x3c, &[0x0b]);
        }
        let s = a.save();
        json(&s);
        let b = std::sync::Mutex::new(HostBridge::new());
        b.restore(&s).unwrap();
        for reg in (0..256).step_by(4) {
            let (mut x, mut y) = ([0u8; 4], [0u8; 4]);
            a.lock().unwrap().config_read(reg, &mut x);
            b.lock().unwrap().config_read(reg, &mut y);
            assert_eq!(x, y, "dword {reg:#x}");
        }
        // Another device's state is refused and changes nothing.
        let mut other = s.clone();
        other.regs[0] = 0x1234_8086;
        other.regs[1] = 0;
        let e = b.restore(&other).unwrap_err().to_string();
        assert!(
            e.contains("dword 0x00") && e.contains("different device"),
            "{e}"
        );
        assert_eq!(b.save(), s);
        let e = b
            .restore(&ConfigSpaceState { regs: vec![0; 3] })
            .unwrap_err();
        assert!(e.to_string().contains("3 dwords"), "{e}");
    }

    #[test]
    fn root_address_latch_round_trip() {
        let a = PciRoot::new();
        a.pio_write(PioAddress(0xcf8), 0, &0x8000_1810u32.to_le_bytes());
        let s = a.save();
        json(&s);
        assert_eq!(s.config_address, 0x8000_1810);
        let b = PciRoot::new();
        b.restore(&s).unwrap();
        assert_eq!(b.save(), s);
        let e = b
            .restore(&PciRootState {
                config_address: 0x7f00_0001,
            })
            .unwrap_err();
        assert!(e.to_string().contains("reserved bits"), "{e}");
        assert_eq!(b.save(), s);
    }

    #[test]
    fn msi_writes_reproduce_the_state() {
        let routes = RecordingRoutes::new(10);
        let mut v = MsiVectors::new("a", routes.clone(), 4).unwrap();
        let mut a = MsiCap::new(0x0184);
        a.write(4, &0xfee0_1000u32.to_le_bytes(), &mut v);
        a.write(8, &0x1u32.to_le_bytes(), &mut v);
        a.write(0x0c, &0x4140u16.to_le_bytes(), &mut v);
        a.write(0x10, &0x2u32.to_le_bytes(), &mut v);
        a.write(2, &0x00a5u16.to_le_bytes(), &mut v); // enable, 4 vectors
        let s = a.state();
        json(&s);
        let routes2 = RecordingRoutes::new(10);
        let mut v2 = MsiVectors::new("b", routes2.clone(), 4).unwrap();
        let mut b = MsiCap::new(0x0184);
        for (off, data) in s.writes() {
            b.write(off, &data, &mut v2);
        }
        assert_eq!(b.state(), s);
        assert_eq!(routes.lock().routes, routes2.lock().routes);
        assert_eq!(routes.lock().enabled.len(), 3, "vector 1 masked");
        assert_eq!(
            routes.lock().enabled.keys().collect::<Vec<_>>(),
            routes2.lock().enabled.keys().collect::<Vec<_>>()
        );
        // A 32-bit capability without masking has neither the upper address nor the mask.
        let s32 = MsiCap::new(0).state();
        let offsets: Vec<usize> = s32.writes().iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![4, 8, 2]);
    }

    #[test]
    fn msix_writes_reproduce_the_state() {
        let routes = RecordingRoutes::new(40);
        let mut v = MsiVectors::new("a", routes.clone(), 4).unwrap();
        let mut a = Msix::new(4, 0x2002, 0x3002);
        let entry = |m: &mut Msix, v: &mut MsiVectors, i: u64, data: u32, masked: u32| {
            m.table_write(i * 16, &0xfee0_0000u32.to_le_bytes(), v);
            m.table_write(i * 16 + 8, &data.to_le_bytes(), v);
            m.table_write(i * 16 + 12, &masked.to_le_bytes(), v);
        };
        entry(&mut a, &mut v, 0, 0x41, 0);
        entry(&mut a, &mut v, 2, 0x43, 1);
        entry(&mut a, &mut v, 3, 0x44, 0);
        a.cap_write(2, &[0x03, 0x80], &mut v);
        let s = a.state();
        json(&s);
        let routes2 = RecordingRoutes::new(40);
        let mut v2 = MsiVectors::new("b", routes2.clone(), 4).unwrap();
        let mut b = Msix::new(4, 0x2002, 0x3002);
        for (off, d) in s.table_writes() {
            b.table_write(off, &d, &mut v2);
        }
        let (off, d) = s.control_write();
        b.cap_write(off, &d, &mut v2);
        assert_eq!(b.state(), s);
        assert_eq!(routes.lock().routes, routes2.lock().routes);
        assert_eq!(
            routes2.lock().enabled.keys().copied().collect::<Vec<_>>(),
            vec![40, 43]
        );
    }
}
