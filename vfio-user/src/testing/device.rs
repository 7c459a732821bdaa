//! [`FakeDevice`]: a configurable device for tests, served by the crate's own server
//! ([`serve`](crate::serve)) like any other [`Device`].

use std::collections::BTreeMap;

use super::builder::FakeDeviceBuilder;
use super::dma::DmaTable;
use super::migration::Migration;
use super::probe::{DmaMapRecord, Probe, RegionWriteRecord, SetIrqsRecord};
use super::region::{RegionStore, Trigger};
use crate::device::{Device, DeviceResult, DmaMapping, Errno, IrqData};
use crate::proto::{DmaLoggingRange, MigState};
use crate::types::{DeviceInfo, IrqInfo, RegionInfo};

/// A device made by [`FakeDeviceBuilder`]: regions that hold what is written to them
/// (with triggers: interrupts, DMA into client memory), interrupts signalled through
/// the eventfds the client sets, DMA mappings, and optionally migration. What it does
/// is recorded in its [`Probe`].
pub struct FakeDevice {
    pub(crate) info: DeviceInfo,
    pub(crate) regions: BTreeMap<u32, RegionStore>,
    pub(crate) dma: DmaTable,
    pub(crate) migration: Option<Migration>,
    pub(crate) probe: Probe,
}

impl FakeDevice {
    /// Starts describing a device.
    pub fn builder() -> FakeDeviceBuilder {
        FakeDeviceBuilder::default()
    }

    /// The test's handle on what the device does and holds.
    pub fn probe(&self) -> Probe {
        self.probe.clone()
    }

    fn region(&mut self, index: u32) -> DeviceResult<&mut RegionStore> {
        self.regions.get_mut(&index).ok_or(Errno(libc::EINVAL))
    }

    fn migration(&self) -> DeviceResult<&Migration> {
        self.migration.as_ref().ok_or(Errno(libc::ENOTSUP))
    }

    fn run(&mut self, index: u32, trigger: Trigger, value: u8) -> DeviceResult<()> {
        match trigger {
            Trigger::Irq { index } => self.probe.raise(index, u32::from(value)),
            Trigger::DmaFill { addr, len } => {
                let region = self.region(index)?;
                let addr = region.register(addr, 8)?;
                let len = region.register(len, 4)?;
                let data = vec![value; usize::try_from(len).map_err(|_| Errno(libc::EFAULT))?];
                self.dma.write(addr, &data)
            }
        }
    }
}

impl Device for FakeDevice {
    fn device_info(&mut self) -> DeviceInfo {
        self.info
    }

    fn region_info(&mut self, index: u32) -> DeviceResult<RegionInfo> {
        match self.regions.get(&index) {
            Some(region) => region.info(index),
            None if index < self.info.num_regions => Ok(RegionInfo {
                index,
                flags: 0,
                size: 0,
                offset: 0,
                sparse_areas: Vec::new(),
                fd: None,
            }),
            None => Err(Errno(libc::EINVAL)),
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DeviceResult<()> {
        self.region(index)?.read(offset, data)
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DeviceResult<()> {
        if self.region(index)?.records_writes() {
            self.probe.lock().region_writes.push(RegionWriteRecord {
                index,
                offset,
                data: data.to_vec(),
            });
        }
        match self.region(index)?.write(offset, data)? {
            Some(trigger) => self.run(index, trigger, data.first().copied().unwrap_or(0)),
            None => Ok(()),
        }
    }

    fn dma_map(&mut self, mapping: DmaMapping) -> DeviceResult<()> {
        let record = DmaMapRecord {
            iova: mapping.iova,
            size: mapping.size,
            file_offset: mapping.file_offset,
            had_fd: mapping.fd.is_some(),
        };
        self.dma.map(mapping)?;
        self.probe.lock().dma_maps.push(record);
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> DeviceResult<()> {
        self.dma.unmap(iova, size)
    }

    fn irq_info(&mut self, index: u32) -> DeviceResult<IrqInfo> {
        self.probe.lock().irqs.info(index)
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> DeviceResult<()> {
        let fds = match &data {
            IrqData::Eventfds(fds) => fds.len(),
            _ => 0,
        };
        let mut state = self.probe.lock();
        state.set_irqs.push(SetIrqsRecord {
            index,
            flags,
            start,
            count,
            fds,
        });
        state.irqs.set(index, flags, start, count, data)
    }

    fn reset(&mut self) -> DeviceResult<()> {
        self.regions.values_mut().for_each(RegionStore::reset);
        let mut state = self.probe.lock();
        state.resets += 1;
        state.migration.reset();
        Ok(())
    }

    fn migration_flags(&mut self) -> DeviceResult<u64> {
        Ok(self.migration()?.flags())
    }

    fn mig_state(&mut self) -> DeviceResult<MigState> {
        self.migration()?;
        Ok(self.probe.lock().migration.state)
    }

    fn set_mig_state(&mut self, state: MigState) -> DeviceResult<()> {
        let spec = self.migration()?;
        self.probe.lock().migration.set_state(spec, state)
    }

    fn dma_logging_supported(&mut self) -> bool {
        self.migration.is_some()
    }

    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> DeviceResult<u64> {
        self.migration()?;
        self.probe.lock().migration.logging_start(page_size, ranges)
    }

    fn dma_logging_stop(&mut self) -> DeviceResult<()> {
        self.migration()?;
        self.probe.lock().migration.logging_stop();
        Ok(())
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> DeviceResult<Vec<u64>> {
        self.migration()?;
        self.probe
            .lock()
            .migration
            .logging_report(iova, length, page_size)
    }

    fn mig_data_read(&mut self, size: u32) -> DeviceResult<Vec<u8>> {
        self.migration()?;
        self.probe.lock().migration.read(size)
    }

    fn mig_data_write(&mut self, data: &[u8]) -> DeviceResult<()> {
        self.migration()?;
        self.probe.lock().migration.write(data)
    }

    fn client_disconnected(&mut self) {
        self.dma.clear();
        let mut state = self.probe.lock();
        state.irqs.clear();
        state.disconnects += 1;
    }
}
