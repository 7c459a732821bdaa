//! [`FakeDeviceBuilder`]: describes a fake device (identity, regions, interrupts,
//! migration) and makes it.

use std::collections::BTreeMap;

use vfio_bindings::bindings::vfio::{VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET};

use super::device::FakeDevice;
use super::dma::DmaTable;
use super::irq::Irqs;
use super::migration::Migration;
use super::probe::Probe;
use super::region::{Region, RegionStore};
use super::FakeError;
use crate::types::DeviceInfo;

/// A fake device under construction. By default: a PCI device with reset, 9 regions
/// and 5 IRQ types, all empty, no migration.
#[derive(Debug, Clone)]
pub struct FakeDeviceBuilder {
    info: DeviceInfo,
    regions: BTreeMap<u32, Region>,
    irqs: BTreeMap<u32, (u32, u32)>,
    migration: Option<Migration>,
}

impl Default for FakeDeviceBuilder {
    fn default() -> Self {
        FakeDeviceBuilder {
            info: DeviceInfo {
                flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
                num_regions: 9,
                num_irqs: 5,
            },
            regions: BTreeMap::new(),
            irqs: BTreeMap::new(),
            migration: None,
        }
    }
}

impl FakeDeviceBuilder {
    /// What `DEVICE_GET_INFO` answers. Regions and IRQ types below these counts that
    /// are not described exist, empty (size 0, no flags; no vectors).
    pub fn info(mut self, flags: u32, num_regions: u32, num_irqs: u32) -> Self {
        self.info = DeviceInfo {
            flags,
            num_regions,
            num_irqs,
        };
        self
    }

    /// Region `index` (any index: described regions exist even beyond the count).
    pub fn region(mut self, index: u32, region: Region) -> Self {
        self.regions.insert(index, region);
        self
    }

    /// IRQ type `index` with `VFIO_IRQ_INFO_*` `flags` and `count` vectors.
    pub fn irq(mut self, index: u32, flags: u32, count: u32) -> Self {
        self.irqs.insert(index, (flags, count));
        self
    }

    /// Migration over the v2 messages, with DMA logging.
    pub fn migration(mut self, migration: Migration) -> Self {
        self.migration = Some(migration);
        self
    }

    /// Makes the device (and the memfds of its memory regions).
    pub fn build(self) -> Result<FakeDevice, FakeError> {
        let regions = self
            .regions
            .into_iter()
            .map(|(index, spec)| Ok((index, RegionStore::new(spec)?)))
            .collect::<Result<_, FakeError>>()?;
        let probe = Probe::default();
        probe.lock().irqs = Irqs::new(&self.irqs, self.info.num_irqs);
        Ok(FakeDevice {
            info: self.info,
            regions,
            dma: DmaTable::default(),
            migration: self.migration,
            probe,
        })
    }
}
