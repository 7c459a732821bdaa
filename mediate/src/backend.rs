//! [`MediatedBackend`]: a [`VfioBackend`] that sends every region-info query, region
//! access and mmap decision of a device through its mediator first.
//!
//! The vfio-pci device is built over this backend exactly as over a plain one, so the
//! device itself knows nothing of mediators: its trapped BAR accesses, configuration
//! accesses and region-info queries arrive here, and the mediator handles them or lets
//! them pass to the device's own backend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use devices::vfio::backend::{DmaMapping, Result};
use devices::vfio::migration::DeviceMigration;
use devices::vfio::{BackendError, DeviceInfo, IrqInfo, RegionInfo, VfioBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::mediator::{Access, MediatedDevice, Mediator};

/// The device's backend with its mediator in front. Dropping it releases the mediator's
/// handle and the mediator's use count.
pub struct MediatedBackend {
    inner: Arc<dyn VfioBackend>,
    handle: Box<dyn MediatedDevice>,
    mediator: Arc<dyn Mediator>,
    users: Arc<AtomicUsize>,
    /// The device's own region count; the mediator's regions follow.
    own_regions: u32,
    extra: Vec<RegionInfo>,
}

impl MediatedBackend {
    /// Puts `handle` (from `mediator`) in front of `inner`; `users` is the mediator's use
    /// count in the registry, already incremented for this device.
    pub(crate) fn new(
        inner: Arc<dyn VfioBackend>,
        handle: Box<dyn MediatedDevice>,
        mediator: Arc<dyn Mediator>,
        users: Arc<AtomicUsize>,
    ) -> Result<Self> {
        let own_regions = inner.device_info()?.num_regions;
        let extra = handle.extra_regions();
        Ok(MediatedBackend {
            inner,
            handle,
            mediator,
            users,
            own_regions,
            extra,
        })
    }

    /// The mediator's per-device handle.
    pub fn handle(&self) -> &dyn MediatedDevice {
        &*self.handle
    }

    /// The mediator's name.
    pub fn mediator_name(&self) -> &str {
        self.mediator.name()
    }

    /// The device's migration as the mediator provides it (over this backend, so that
    /// reads of the mediator's migration region go through the same path as any other).
    pub fn migration(self: &Arc<Self>) -> Option<Arc<dyn DeviceMigration>> {
        let me: Arc<dyn VfioBackend> = self.clone();
        self.handle.migration(me, self.own_regions)
    }

    fn extra(&self, index: u32) -> Option<&RegionInfo> {
        index
            .checked_sub(self.own_regions)
            .and_then(|i| self.extra.get(i as usize))
    }

    fn unhandled(&self, index: u32, op: &str) -> BackendError {
        BackendError::Unsupported {
            op: format!("{op} of region {index}"),
            reason: format!(
                "the region belongs to mediator {} but it passed the access on",
                self.mediator.name()
            ),
        }
    }
}

impl Drop for MediatedBackend {
    fn drop(&mut self) {
        self.handle.release();
        self.users.fetch_sub(1, Ordering::AcqRel);
        tracing::info!("mediator {} released its device", self.mediator.name());
    }
}

impl VfioBackend for MediatedBackend {
    fn device_info(&self) -> Result<DeviceInfo> {
        let mut info = self.inner.device_info()?;
        info.num_regions = self.own_regions + self.extra.len() as u32;
        Ok(info)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        if let Some(extra) = self.extra(index) {
            return Ok(extra.clone());
        }
        let info = self.inner.region_info(index)?;
        let mut info = self.handle.region_info(index, info);
        if info.flags.mmap && info.mmap.is_some() {
            let areas = info.mappable_areas();
            let allowed = self.handle.mmap_areas(index, areas);
            info.flags.mmap = !allowed.is_empty();
            info.sparse_areas = allowed;
        }
        Ok(info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        match self.handle.read(index, offset, data)? {
            Access::Handled => Ok(()),
            Access::PassThrough if self.extra(index).is_some() => {
                Err(self.unhandled(index, "read"))
            }
            Access::PassThrough => self.inner.region_read(index, offset, data),
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        match self.handle.write(index, offset, data)? {
            Access::Handled => Ok(()),
            Access::PassThrough if self.extra(index).is_some() => {
                Err(self.unhandled(index, "write"))
            }
            Access::PassThrough => self.inner.region_write(index, offset, data),
        }
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.inner.irq_info(index)
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()> {
        self.inner.set_irq_eventfds(index, start, fds)
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.inner.disable_irqs(index)
    }

    fn mask_irqs(&self, index: u32, start: u32, count: u32, masked: bool) -> Result<()> {
        self.inner.mask_irqs(index, start, count, masked)
    }

    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<bool> {
        self.inner.set_intx_unmask_eventfd(fd)
    }

    unsafe fn dma_map(&self, mapping: &DmaMapping<'_>) -> Result<()> {
        // SAFETY: the caller's guarantees for `mapping` are passed on unchanged.
        unsafe { self.inner.dma_map(mapping) }
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.inner.dma_unmap(iova, size)
    }

    fn reset(&self) -> Result<()> {
        self.inner.reset()
    }
}
