//! [`Device`]: what a device process implements for [`serve`](crate::serve) to drive.
//!
//! Every method answers one command. Failures are an [`Errno`], sent back to the client
//! as an error reply; the connection goes on. Migration (device features, migration
//! data, DMA logging) is refused with `ENOTSUP` unless the device overrides its methods;
//! the server decodes and checks the messages, so the methods get typed arguments.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;

use crate::proto::{DmaLoggingRange, MigState};
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

    /// `DEVICE_FEATURE` GET of `VFIO_DEVICE_FEATURE_MIGRATION`: the migration flags
    /// (`VFIO_MIGRATION_STOP_COPY`, mandatory, or'ed with `VFIO_MIGRATION_PRE_COPY`). A
    /// device that answers supports `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` and the
    /// `MIG_DATA_*` messages too. A PROBE of either feature calls this and answers
    /// with its result.
    fn migration_flags(&mut self) -> DeviceResult<u64> {
        Err(Errno(libc::ENOTSUP))
    }

    /// `DEVICE_FEATURE` GET of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: the current state.
    fn mig_state(&mut self) -> DeviceResult<MigState> {
        Err(Errno(libc::ENOTSUP))
    }

    /// `DEVICE_FEATURE` SET of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: move to `state`
    /// (completely, before returning), along the specification's arcs. Refuse an
    /// illegal transition (e.g. `EINVAL`) without changing anything.
    fn set_mig_state(&mut self, state: MigState) -> DeviceResult<()> {
        let _ = state;
        Err(Errno(libc::ENOTSUP))
    }

    /// Whether the DMA logging features are implemented (for PROBE).
    fn dma_logging_supported(&mut self) -> bool {
        false
    }

    /// `DEVICE_FEATURE` SET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`: log the DMA writes
    /// into `ranges` (all writes if empty; checked not to wrap) at about `page_size` (a
    /// power of two). Returns the page size chosen.
    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> DeviceResult<u64> {
        let _ = (page_size, ranges);
        Err(Errno(libc::ENOTSUP))
    }

    /// `DEVICE_FEATURE` SET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    fn dma_logging_stop(&mut self) -> DeviceResult<()> {
        Err(Errno(libc::ENOTSUP))
    }

    /// `DEVICE_FEATURE` GET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`: the pages of
    /// `iova..iova + length` written since logging started or since they were last
    /// reported, as a bitmap of exactly [`crate::proto::DmaLoggingReport::bitmap_words`] words (bit
    /// `n` of the whole bitmap, i.e. bit `n % 64` of word `n / 64`, is the page at
    /// `iova + n * page_size`); the reported pages are cleared. The range does not wrap,
    /// `page_size` is a power of two and the bitmap fits the transfer size (checked).
    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> DeviceResult<Vec<u64>> {
        let _ = (iova, length, page_size);
        Err(Errno(libc::ENOTSUP))
    }

    /// `MIG_DATA_READ`: up to `size` bytes of migration data (fewer: no more for now; in
    /// `STOP_COPY`, the end). Only in a saving state (`PRE_COPY`, `STOP_COPY`).
    fn mig_data_read(&mut self, size: u32) -> DeviceResult<Vec<u8>> {
        let _ = size;
        Err(Errno(libc::ENOTSUP))
    }

    /// `MIG_DATA_WRITE`: the next piece of migration data for the device being restored
    /// (only in `RESUMING`).
    fn mig_data_write(&mut self, data: &[u8]) -> DeviceResult<()> {
        let _ = data;
        Err(Errno(libc::ENOTSUP))
    }

    /// The client went away: drop its DMA mappings and IRQ eventfds, keep device state
    /// (a client may reconnect). Called once when [`serve`](crate::serve) returns.
    fn client_disconnected(&mut self) {}
}
