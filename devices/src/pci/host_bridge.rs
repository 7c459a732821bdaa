//! The host bridge at 00:00.0. Linux's configuration-mechanism probe looks for a host bridge
//! (or a known vendor) on bus 0 before trusting ports 0xCF8/0xCFC.

use super::config::ConfigSpace;
use super::root::PciDevice;

/// An Intel-id host bridge with nothing configurable.
pub struct HostBridge {
    pub(super) config: ConfigSpace,
}

impl HostBridge {
    /// Vendor 0x8086, device 0x0d57, class "host bridge".
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(0x8086, 0x0d57, 0x06_00_00, 0, 0),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data)
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data)
    }
}
