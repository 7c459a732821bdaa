//! [`GuestDma`]: the server's `DMA_READ`/`DMA_WRITE` commands, served from guest RAM.

use std::sync::Arc;

use vfio_user::{Errno, ServerRequests};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::dma_log::DmaWriteLog;

/// Guest RAM as the device server reaches it through `DMA_READ`/`DMA_WRITE`: DMA address
/// = guest physical address. An access not wholly inside RAM is refused with `EFAULT`.
///
/// Pages written this way are seen by neither KVM's dirty log (this process writes them)
/// nor the server's own (libvfio-user logs only what it writes through its own mappings),
/// so they are recorded in a [`DmaWriteLog`] while it tracks.
pub struct GuestDma {
    mem: GuestMemoryMmap,
    log: Arc<DmaWriteLog>,
}

impl GuestDma {
    /// Serves DMA to `mem` (a handle on the same mappings, not a copy); writes are
    /// recorded in `log` while it tracks.
    pub fn new(mem: &GuestMemoryMmap, log: Arc<DmaWriteLog>) -> Self {
        GuestDma {
            mem: mem.clone(),
            log,
        }
    }
}

impl ServerRequests for GuestDma {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), Errno> {
        self.mem.read_slice(buf, GuestAddress(addr)).map_err(|e| {
            tracing::warn!(
                "vfio-user DMA read of {} bytes at {addr:#x} refused: {e}",
                buf.len()
            );
            Errno(libc::EFAULT)
        })
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), Errno> {
        // Recorded first: a page must never be written unrecorded while tracking.
        self.log.record(addr, data.len());
        self.mem.write_slice(data, GuestAddress(addr)).map_err(|e| {
            tracing::warn!(
                "vfio-user DMA write of {} bytes at {addr:#x} refused: {e}",
                data.len()
            );
            Errno(libc::EFAULT)
        })
    }
}
