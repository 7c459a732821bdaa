//! What the client returns and the server's device describes: device, region and IRQ
//! information in plain form (no `argsz`, descriptors as owned handles).

use std::os::fd::OwnedFd;

use crate::proto::SparseArea;

/// Basic device information (`VFIO_USER_DEVICE_GET_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*` (`RESET`, `PCI`).
    pub flags: u32,
    /// Number of regions (9 or more for a PCI device).
    pub num_regions: u32,
    /// Number of IRQ types.
    pub num_irqs: u32,
}

/// One region (`VFIO_USER_DEVICE_GET_REGION_INFO`).
#[derive(Debug)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*` (`READ`, `WRITE`, `MMAP`, `CAPS`).
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in `fd`, to pass to `mmap()`.
    pub offset: u64,
    /// The parts that may be mapped (relative to `offset`); empty when the region has no
    /// sparse-mmap capability (then, with `MMAP` set, the whole region may be mapped).
    pub sparse_areas: Vec<SparseArea>,
    /// The file to map, when the server passed one.
    pub fd: Option<OwnedFd>,
}

/// One IRQ type (`VFIO_USER_DEVICE_GET_IRQ_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// IRQ type index (e.g. `VFIO_PCI_MSIX_IRQ_INDEX`).
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` (`EVENTFD`, `MASKABLE`, `AUTOMASKED`, `NORESIZE`).
    pub flags: u32,
    /// Number of interrupts of this type.
    pub count: u32,
}
