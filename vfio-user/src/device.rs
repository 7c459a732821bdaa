//! [`Device`]: what a device process implements for [`serve`](crate::serve) to drive.
//!
//! Every method answers one command. Failures are an [`Errno`], sent back to the client
//! as an error reply; the connection goes on. Migration commands are refused with
//! `ENOTSUP` unless the device overrides them.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;

use crate::proto::DeviceFeature;
use crate::types::{DeviceInfo, IrqInfo, RegionInfo};

/// An errno value to report to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (errno {})",
            io::Error::from_raw_os_error(self.0),
            self.0
        )
    }
}

/// Result of a device method.
pub type DeviceResult<T> = Result<T, Errno>;

/// A `VFIO_USER_DMA_MAP` request as the device receives it.
#[derive(Debug)]
pub struct DmaMapping {
    /// DMA address.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the memory in `fd`.
    pub file_offset: u64,
    /// The device may read the memory.
    pub readable: bool,
    /// The device may write the memory.
    pub writable: bool,
    /// The memory to `mmap()`, if the client shared it (else only the unsupported
    /// `DMA_READ`/`DMA_WRITE` messages could reach it).
    pub fd: Option<OwnedFd>,
}

/// The data of a `VFIO_USER_DEVICE_SET_IRQS` request.
#[derive(Debug)]
pub enum IrqData {
    /// `VFIO_IRQ_SET_DATA_NONE`: act on every sub-index of the range.
    None,
    /// `VFIO_IRQ_SET_DATA_BOOL`: act on the sub-indexes whose flag is set.
    Bool(Vec<bool>),
    /// `VFIO_IRQ_SET_DATA_EVENTFD`: one eventfd per sub-index, or none to de-assign.
    Eventfds(Vec<OwnedFd>),
}

/// A device served over vfio-user.
pub trait Device {
    /// `DEVICE_GET_INFO`: flags, region and IRQ type counts.
    fn device_info(&mut self) -> DeviceInfo;

    /// `DEVICE_GET_REGION_INFO` for region `index`; `RegionInfo::index` is ignored.
    /// A file descriptor returned in `fd` is passed to the client (and then closed here;
    /// return a duplicate of one the device keeps).
    fn region_info(&mut self, index: u32) -> DeviceResult<RegionInfo>;

    /// `REGION_READ`: fill `data` from `offset` of region `index`.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DeviceResult<()>;

    /// `REGION_WRITE`: store `data` at `offset` of region `index`.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DeviceResult<()>;

    /// `DMA_MAP`: client memory becomes available for DMA.
    fn dma_map(&mut self, mapping: DmaMapping) -> DeviceResult<()>;

    /// `DMA_UNMAP`: release every reference to the mapping at `iova` of `size` bytes
    /// before returning.
    fn dma_unmap(&mut self, iova: u64, size: u64) -> DeviceResult<()>;

    /// `DEVICE_GET_IRQ_INFO` for IRQ type `index`; `IrqInfo::index` is ignored.
    fn irq_info(&mut self, index: u32) -> DeviceResult<IrqInfo>;

    /// `DEVICE_SET_IRQS`: `flags` holds the `VFIO_IRQ_SET_DATA_*` and
    /// `VFIO_IRQ_SET_ACTION_*` bits (checked: exactly one of each), `data` the matching
    /// payload (checked against `count`).
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> DeviceResult<()>;

    /// `DEVICE_RESET`.
    fn reset(&mut self) -> DeviceResult<()>;

    /// `DEVICE_FEATURE`: return the reply's data (the feature's data for GET, the
    /// request's data for SET, nothing for PROBE).
    fn device_feature(&mut self, request: &DeviceFeature) -> DeviceResult<Vec<u8>> {
        let _ = request;
        Err(Errno(libc::ENOTSUP))
    }

    /// `MIG_DATA_READ`: up to `size` bytes of migration data (fewer: the end).
    fn mig_data_read(&mut self, size: u32) -> DeviceResult<Vec<u8>> {
        let _ = size;
        Err(Errno(libc::ENOTSUP))
    }

    /// `MIG_DATA_WRITE`: migration data for the device being restored.
    fn mig_data_write(&mut self, data: &[u8]) -> DeviceResult<()> {
        let _ = data;
        Err(Errno(libc::ENOTSUP))
    }

    /// The client went away: drop its DMA mappings and IRQ eventfds, keep device state
    /// (a client may reconnect). Called once when [`serve`](crate::serve) returns.
    fn client_disconnected(&mut self) {}
}
