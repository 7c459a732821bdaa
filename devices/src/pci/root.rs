//! PCI bus 0 behind configuration mechanism #1: CONFIG_ADDRESS at port 0xCF8 and
//! CONFIG_DATA at 0xCFC-0xCFF.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// First port of the configuration mechanism (CONFIG_ADDRESS).
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Number of ports it covers (CONFIG_ADDRESS and CONFIG_DATA).
pub const CONFIG_PORTS: u16 = 8;

/// A function on the PCI bus, as the configuration mechanism sees it.
pub trait PciDevice: Send {
    /// Name for logs and statistics.
    fn name(&self) -> &str;
    /// Reads `data.len()` (1, 2 or 4) bytes of configuration space at `offset`.
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// A guest write to configuration space (untrusted: the device validates it).
    fn config_write(&mut self, offset: usize, data: &[u8]);
}

/// Errors from adding devices to the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// The slot is taken.
    #[error("PCI slot 00:{slot:02x}.{function} is already used by {existing}")]
    SlotInUse {
        slot: u8,
        function: u8,
        existing: String,
    },
    /// Slot or function out of range.
    #[error("invalid PCI address 00:{slot:02x}.{function} (slot 0-31, function 0-7)")]
    InvalidAddress { slot: u8, function: u8 },
}

type Shared = Arc<Mutex<dyn PciDevice>>;

struct State {
    address: u32,
    devices: BTreeMap<u8, Shared>,
}

/// Bus 0 and its configuration mechanism.
pub struct PciRoot {
    state: Mutex<State>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// An empty bus (add the host bridge at slot 0).
    pub fn new() -> Self {
        PciRoot {
            state: Mutex::new(State {
                address: 0,
                devices: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `dev` at 00:slot.function.
    pub fn add(&self, slot: u8, function: u8, dev: Shared) -> Result<(), PciError> {
        if slot > 31 || function > 7 {
            return Err(PciError::InvalidAddress { slot, function });
        }
        let devfn = slot << 3 | function;
        let mut s = self.lock();
        if let Some(existing) = s.devices.get(&devfn) {
            let existing = existing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .name()
                .to_string();
            return Err(PciError::SlotInUse {
                slot,
                function,
                existing,
            });
        }
        s.devices.insert(devfn, dev);
        Ok(())
    }

    /// The lowest free slot at or above `from` (function 0 free), if any.
    pub fn free_slot(&self, from: u8) -> Option<u8> {
        let s = self.lock();
        (from..32).find(|slot| !s.devices.contains_key(&(slot << 3)))
    }

    /// The device selected by CONFIG_ADDRESS and the register offset, if enabled, on bus 0
    /// and present.
    fn target(s: &State, byte: usize) -> Option<(Shared, usize)> {
        let a = s.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let devfn = ((a >> 8) & 0xff) as u8;
        let offset = (a & 0xfc) as usize + byte;
        s.devices.get(&devfn).map(|d| (d.clone(), offset))
    }

    fn data_read(&self, byte: usize, data: &mut [u8]) {
        let target = Self::target(&self.lock(), byte);
        match target {
            Some((dev, offset)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_read(offset, data),
            // No function there: the host bridge answers a master abort with all ones.
            None => data.fill(0xff),
        }
    }

    fn data_write(&self, byte: usize, data: &[u8]) {
        let target = Self::target(&self.lock(), byte);
        if let Some((dev, offset)) = target {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(offset, data)
        }
    }
}

impl DevicePio for PciRoot {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.lock().address.to_le_bytes()),
            4..=7 if usize::from(offset - 4) + data.len() <= 4 => {
                self.data_read(usize::from(offset - 4), data)
            }
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                self.lock().address = u32::from_le_bytes(v) & 0x80ff_fffc;
            }
            4..=7 if usize::from(offset - 4) + data.len() <= 4 => {
                self.data_write(usize::from(offset - 4), data)
            }
            // Byte writes to 0xCF8-0xCFB (e.g. the 0xCF9 reset register) are not part of
            // mechanism #1; ignore them.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::HostBridge;

    fn addr(root: &PciRoot, devfn: u32, reg: u32) {
        root.pio_write(
            PioAddress(0xcf8),
            0,
            &(0x8000_0000 | devfn << 8 | reg).to_le_bytes(),
        );
    }

    fn read32(root: &PciRoot) -> u32 {
        let mut d = [0u8; 4];
        root.pio_read(PioAddress(0xcf8), 4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_is_found_and_empty_slots_read_all_ones() {
        let root = PciRoot::new();
        root.add(0, 0, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        addr(&root, 0, 0);
        assert_eq!(read32(&root), 0x0d57_8086);
        addr(&root, 0, 8);
        assert_eq!(read32(&root) >> 8, 0x06_00_00);
        addr(&root, 3 << 3, 0);
        assert_eq!(read32(&root), u32::MAX);
        let mut w = [0u8; 2];
        addr(&root, 0, 0);
        root.pio_read(PioAddress(0xcf8), 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
    }

    #[test]
    fn disabled_address_or_other_bus_reads_all_ones() {
        let root = PciRoot::new();
        root.add(0, 0, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        root.pio_write(PioAddress(0xcf8), 0, &0u32.to_le_bytes());
        assert_eq!(read32(&root), u32::MAX);
        root.pio_write(PioAddress(0xcf8), 0, &(0x8001_0000u32).to_le_bytes());
        assert_eq!(read32(&root), u32::MAX);
    }

    #[test]
    fn slots_are_checked() {
        let root = PciRoot::new();
        root.add(0, 0, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        assert!(matches!(
            root.add(0, 0, Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciError::SlotInUse { .. })
        ));
        assert!(matches!(
            root.add(32, 0, Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciError::InvalidAddress { .. })
        ));
        assert_eq!(root.free_slot(0), Some(1));
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let root = PciRoot::new();
        let mut b = [0u8; 4];
        root.pio_read(PioAddress(0xcf8), 7, &mut b);
        root.pio_write(PioAddress(0xcf8), 6, &[1, 2, 3, 4]);
        root.pio_write(PioAddress(0xcf8), 1, &[9]);
        assert_eq!(b, [0xff; 4]);
    }
}
