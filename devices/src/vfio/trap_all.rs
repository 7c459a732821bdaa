//! A backend wrapper that offers nothing for mmap: every BAR access of the device then exits
//! to the VMM (`--device ...,mmap=off`). Used to compare trapped and mapped BARs, and for
//! debugging a device without direct guest access.

use vmm_sys_util::eventfd::EventFd;

use super::backend::{DeviceInfo, DmaMapping, IrqInfo, RegionInfo, Result, VfioBackend};

/// Delegates everything to the inner backend, except that regions have no mappable areas.
pub struct TrapAll<B: ?Sized>(pub std::sync::Arc<B>);

impl<B: VfioBackend + ?Sized> VfioBackend for TrapAll<B> {
    fn device_info(&self) -> Result<DeviceInfo> {
        self.0.device_info()
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut info = self.0.region_info(index)?;
        info.sparse_areas.clear();
        info.mmap = None;
        info.flags.mmap = false;
        Ok(info)
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.0.region_read(index, offset, data)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.0.region_write(index, offset, data)
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.0.irq_info(index)
    }
    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()> {
        self.0.set_irq_eventfds(index, start, fds)
    }
    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.0.disable_irqs(index)
    }
    fn mask_irqs(&self, index: u32, start: u32, count: u32, masked: bool) -> Result<()> {
        self.0.mask_irqs(index, start, count, masked)
    }
    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<bool> {
        self.0.set_intx_unmask_eventfd(fd)
    }
    unsafe fn dma_map(&self, mapping: &DmaMapping<'_>) -> Result<()> {
        // SAFETY: the caller's guarantees for `mapping` are passed on unchanged.
        unsafe { self.0.dma_map(mapping) }
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.0.dma_unmap(iova, size)
    }
    fn reset(&self) -> Result<()> {
        self.0.reset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::testing::FakeBackend;

    #[test]
    fn regions_lose_their_mappable_areas_and_keep_the_rest() {
        let fake = FakeBackend::standard().unwrap();
        let inner = fake.region_info(0).unwrap();
        assert!(
            inner.mmap.is_some() && !inner.sparse_areas.is_empty(),
            "the fake's BAR 0 is mappable"
        );
        let wrapped = TrapAll(fake.clone());
        let info = wrapped.region_info(0).unwrap();
        assert!(info.mmap.is_none() && info.sparse_areas.is_empty() && !info.flags.mmap);
        assert_eq!(info.size, inner.size);
        assert_eq!(
            wrapped.device_info().unwrap().num_regions,
            fake.device_info().unwrap().num_regions
        );
    }
}
