//! What the vfio-pci function needs from "a VFIO device", as a trait.
//!
//! [`VfioBackend`] is the seam between the PCI function ([`super::VfioPciDevice`]) and
//! whatever serves the device: the kernel's VFIO ([`super::kernel::KernelVfio`]) or a
//! vfio-user server ([`super::user::VfioUserBackend`]). Indices follow the VFIO PCI uAPI:
//! regions 0-5 are the BARs, 6 the ROM, 7 the configuration space; interrupt index 0 is
//! INTx, 1 MSI, 2 MSI-X.
//!
//! Every method returns errors instead of panicking: a backend whose device died or whose
//! server went away answers [`BackendError`], which the device logs (rate-limited) while the
//! guest reads all ones.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_MASKABLE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

/// Region index of the PCI configuration space.
pub const CONFIG_REGION: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
/// Interrupt index of INTx.
pub const IRQ_INTX: u32 = VFIO_PCI_INTX_IRQ_INDEX;
/// Interrupt index of MSI.
pub const IRQ_MSI: u32 = VFIO_PCI_MSI_IRQ_INDEX;
/// Interrupt index of MSI-X.
pub const IRQ_MSIX: u32 = VFIO_PCI_MSIX_IRQ_INDEX;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A system call or socket operation failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was attempted, e.g. "read 4 bytes at 0x10 of region 0".
        op: String,
        /// The error the system returned.
        source: io::Error,
    },
    /// The device (or its server) is gone; nothing will work again.
    #[error("the device is gone ({reason}) so {op} cannot be done")]
    Disconnected {
        /// What was attempted.
        op: String,
        /// Why the device is considered gone.
        reason: String,
    },
    /// The device has no region with that index.
    #[error("the device has no region {index}")]
    NoRegion {
        /// The region index asked for.
        index: u32,
    },
    /// An access reaches outside its region.
    #[error("{len} bytes at {offset:#x} reach outside region {index} of {size:#x} bytes")]
    OutOfRange {
        /// The region index.
        index: u32,
        /// Offset of the access in the region.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: u64,
    },
    /// The device or this backend does not do what was asked.
    #[error("{op} is not supported: {reason}")]
    Unsupported {
        /// What was attempted.
        op: String,
        /// Why it cannot be done.
        reason: String,
    },
    /// The device refused the request.
    #[error("the device refused {op}: {reason}")]
    Refused {
        /// What was attempted.
        op: String,
        /// What the device said.
        reason: String,
    },
}

/// Result of backend operations.
pub type Result<T> = std::result::Result<T, BackendError>;

/// What `VFIO_DEVICE_GET_INFO` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Number of regions (BARs, ROM, config space, device-specific regions).
    pub num_regions: u32,
    /// Number of interrupt indices.
    pub num_irqs: u32,
    /// `VFIO_DEVICE_FLAGS_*` (reset supported, PCI, ...).
    pub flags: u32,
}

/// How a region may be accessed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionFlags {
    /// Reads through the backend are allowed.
    pub read: bool,
    /// Writes through the backend are allowed.
    pub write: bool,
    /// (Parts of) the region can be mapped into memory.
    pub mmap: bool,
}

impl RegionFlags {
    /// From `VFIO_REGION_INFO_FLAG_*` bits.
    pub fn from_vfio(flags: u32) -> Self {
        RegionFlags {
            read: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            write: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
        }
    }
}

/// The file to mmap for a region, and where in that file the region starts.
#[derive(Clone, Debug)]
pub struct RegionMmap {
    /// The file (the VFIO device fd, or an fd a vfio-user server sent).
    pub fd: Arc<OwnedFd>,
    /// Offset of the region's first byte in `fd`.
    pub file_offset: u64,
}

/// What `VFIO_DEVICE_GET_REGION_INFO` reports, in the form the PCI function uses.
#[derive(Clone, Debug, Default)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist, e.g. an unimplemented BAR).
    pub size: u64,
    /// Access flags.
    pub flags: RegionFlags,
    /// The mmap-able areas as `(offset in the region, size)`. Empty with `flags.mmap` set
    /// means the whole region.
    pub sparse_areas: Vec<(u64, u64)>,
    /// Where to mmap the region from; `None` if it cannot be mapped.
    pub mmap: Option<RegionMmap>,
}

impl RegionInfo {
    /// The areas that can be mapped: `sparse_areas`, the whole region if the mmap flag is
    /// set without a sparse list, nothing if there is no file to map. Areas reaching past
    /// the end of the region are clipped.
    pub fn mappable_areas(&self) -> Vec<(u64, u64)> {
        if !self.flags.mmap || self.mmap.is_none() {
            return Vec::new();
        }
        if self.sparse_areas.is_empty() {
            return vec![(0, self.size)];
        }
        self.sparse_areas
            .iter()
            .filter(|&&(offset, _)| offset < self.size)
            .map(|&(offset, size)| (offset, size.min(self.size - offset)))
            .filter(|&(_, size)| size > 0)
            .collect()
    }
}

/// What `VFIO_DEVICE_GET_IRQ_INFO` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Number of vectors of this index.
    pub count: u32,
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
}

impl IrqInfo {
    /// Whether the device masks and unmasks single vectors of this index on request
    /// (`VFIO_IRQ_INFO_MASKABLE`: [`VfioBackend::mask_irqs`] is honoured).
    pub fn maskable(&self) -> bool {
        self.flags & VFIO_IRQ_INFO_MASKABLE != 0
    }
}

/// A range of guest memory handed to the device for DMA.
#[derive(Clone, Copy, Debug)]
pub struct DmaMapping<'a> {
    /// The I/O virtual address the device uses (the guest physical address).
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where the memory is mapped in this process (kernel VFIO pins it from here).
    pub host_addr: u64,
    /// The file backing the memory and the offset of `iova` in it (vfio-user sends the
    /// file to the server, which maps it itself). `None` for anonymous memory.
    pub file: Option<(BorrowedFd<'a>, u64)>,
}

/// A VFIO device, as the PCI function sees it. Implementations are shared between vCPU
/// threads (`Send + Sync`) and report every failure as a [`BackendError`].
pub trait VfioBackend: Send + Sync {
    /// Number of regions and interrupt indices, and device flags.
    fn device_info(&self) -> Result<DeviceInfo>;

    /// Size, flags and mmap information of region `index`.
    fn region_info(&self, index: u32) -> Result<RegionInfo>;

    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()>;

    /// Writes `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()>;

    /// Number of vectors and flags of interrupt index `index` ([`IRQ_MSI`], ...).
    fn irq_info(&self, index: u32) -> Result<IrqInfo>;

    /// Makes vectors `start..start + fds.len()` of interrupt `index` signal the given
    /// eventfds (`None`: stop signalling that vector). Backends may only support setting
    /// the whole range from vector 0 with every eventfd present, which is all the PCI
    /// function asks for.
    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()>;

    /// Disables every vector of interrupt `index`.
    fn disable_irqs(&self, index: u32) -> Result<()>;

    /// Masks (`masked`) or unmasks vectors `start..start + count` of interrupt `index` in
    /// the device: `SET_IRQS` with `VFIO_IRQ_SET_ACTION_MASK` or `_UNMASK` and
    /// `VFIO_IRQ_SET_DATA_NONE`. A masked vector does not signal its eventfd; the device
    /// keeps it pending and signals it when it is unmasked. Only meaningful for an index
    /// whose [`IrqInfo::maskable`] is set; other devices may refuse it. Wrappers must
    /// pass it on (a device that never hears an unmask never interrupts).
    fn mask_irqs(&self, index: u32, start: u32, count: u32, masked: bool) -> Result<()>;

    /// Makes the device unmask INTx by itself whenever `fd` is signalled (kernel VFIO's
    /// `VFIO_IRQ_SET_ACTION_UNMASK` with an eventfd), so the guest's EOI reaches it with no
    /// VMM thread on the way. Returns `Ok(false)` when the backend cannot (the default):
    /// the caller then waits on `fd` itself and unmasks INTx with [`mask_irqs`](Self::mask_irqs).
    /// Disabling INTx ([`disable_irqs`](Self::disable_irqs)) drops the eventfd.
    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<bool> {
        let _ = fd;
        Ok(false)
    }

    /// Lets the device access `mapping` by DMA.
    ///
    /// # Safety
    ///
    /// The memory `[host_addr, host_addr + size)` (and the file range, if given) must stay
    /// valid until [`dma_unmap`](Self::dma_unmap) removed it, and must be memory the device
    /// may read and write at any time behind the back of Rust code (guest RAM).
    unsafe fn dma_map(&self, mapping: &DmaMapping<'_>) -> Result<()>;

    /// Removes `[iova, iova + size)` from the device's DMA view.
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()>;

    /// Resets the device (function-level reset or equivalent).
    fn reset(&self) -> Result<()>;
}

/// Hands every region of `mem` to the device for DMA at its guest physical address.
/// Stops at the first failure and returns it (regions already mapped stay mapped).
///
/// # Safety
///
/// `mem` must be guest RAM that stays mapped until the regions are unmapped again with
/// [`VfioBackend::dma_unmap`] (see [`VfioBackend::dma_map`]).
pub unsafe fn dma_map_guest_memory<M: GuestMemoryBackend>(
    backend: &dyn VfioBackend,
    mem: &M,
) -> Result<()> {
    for region in mem.iter() {
        let iova = region.start_addr().0;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| BackendError::Unsupported {
                op: format!("DMA map of guest memory at {iova:#x}"),
                reason: format!("the region has no host address: {e}"),
            })?;
        let file = region.file_offset().map(|f| {
            use std::os::fd::AsFd;
            (f.file().as_fd(), f.start())
        });
        let mapping = DmaMapping {
            iova,
            size: region.len(),
            host_addr: host as u64,
            file,
        };
        // SAFETY: the caller guarantees the guest memory stays mapped while the device
        // may use it; the mapping describes exactly one region of it.
        unsafe { backend.dma_map(&mapping) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappable_areas_follow_flags_and_clip() {
        let fd = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let mut info = RegionInfo {
            size: 0x4000,
            flags: RegionFlags::from_vfio(VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP),
            sparse_areas: vec![],
            mmap: Some(RegionMmap { fd, file_offset: 0 }),
        };
        assert_eq!(info.mappable_areas(), vec![(0, 0x4000)]);
        info.sparse_areas = vec![(0x1000, 0x1000), (0x3000, 0x8000), (0x9000, 0x1000)];
        assert_eq!(
            info.mappable_areas(),
            vec![(0x1000, 0x1000), (0x3000, 0x1000)]
        );
        info.mmap = None;
        assert!(info.mappable_areas().is_empty());
    }
}
