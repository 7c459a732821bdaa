//! [`VfioUserBackend`]: a [`VfioBackend`] over a [`vfio_user::Client`], so a device served
//! by another process is a vfio-pci function like a kernel VFIO one.
//!
//! A dead or misbehaving server breaks the client's connection; every call after that
//! answers [`BackendError::Disconnected`] at once, which the PCI function logs (rate-limited)
//! while the guest reads all ones. The VMM keeps running.
//!
//! BAR writes are posted (sent without waiting for the server, see
//! [`VfioUserBackend::region_write`]); everything else waits for its reply.
//!
//! The server may read and write guest memory through the client (`DMA_READ`,
//! `DMA_WRITE`: libvfio-user does for memory it could not map): [`GuestDma`] serves
//! those from guest RAM, DMA address = guest physical address, and the client's reader
//! thread serves them while no request is in flight. The same thread notices at once when
//! the server hangs up and logs it: a guest waiting on a mapped doorbell page for
//! completions that will never come makes no access that would reveal it.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_BAR5_REGION_INDEX,
};
use vfio_user::{Client, ClientError};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::dma::GuestDma;
use super::dma_log::{DmaWriteLog, WithDmaWrites};
use super::migration::VfioUserMigration;
use super::v1_migration;
use crate::vfio::backend::{DmaMapping, RegionMmap, Result};
use crate::vfio::migration::DeviceMigration;
use crate::vfio::{BackendError, DeviceInfo, IrqInfo, RegionFlags, RegionInfo, VfioBackend};

/// A device behind a vfio-user socket.
pub struct VfioUserBackend {
    /// Shared with the device's [`VfioUserMigration`], if it has one.
    client: Arc<Client>,
    socket: PathBuf,
    /// Guest pages the server wrote with `DMA_WRITE` (this process wrote them, so neither
    /// KVM's log nor the server's own dirty tracking sees them).
    dma_log: Arc<DmaWriteLog>,
}

impl VfioUserBackend {
    /// Connects to the server at `socket`; `timeout` is the deadline of every request.
    /// The server's DMA reads and writes reach `mem`; the client's reader thread serves
    /// them while no request is in flight and logs at once when the server goes away.
    pub fn connect(
        socket: &Path,
        timeout: Duration,
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<Self, ClientError> {
        let client = Client::connect(socket, timeout)?;
        let dma_log = Arc::new(DmaWriteLog::default());
        client.set_server_requests(Arc::new(GuestDma::new(mem, dma_log.clone())));
        client.spawn_reader()?;
        Ok(VfioUserBackend {
            client: Arc::new(client),
            socket: socket.to_path_buf(),
            dma_log,
        })
    }

    /// Wraps a connected client (`socket` is for messages only); tests use it with a
    /// socket pair.
    #[cfg(test)]
    pub fn from_client(client: Client, socket: PathBuf) -> Self {
        VfioUserBackend {
            client: Arc::new(client),
            socket,
            dma_log: Arc::default(),
        }
    }

    /// The device's own migration, if its server offers one: vfio-user's v2 migration
    /// messages if the server has the migration feature, else its v1 migration region
    /// (libvfio-user 0.1). Dirty tracking covers the DMA writes into guest RAM `mem`
    /// (DMA-mapped at IOVA = GPA), those the server reports and those it made through
    /// `DMA_WRITE` messages. A refusal means no migration; a transport failure is an error.
    pub fn native_migration(
        self: &Arc<Self>,
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<Option<Arc<dyn DeviceMigration>>, ClientError> {
        let ram: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let found: Option<Arc<dyn DeviceMigration>> =
            match VfioUserMigration::probe(self.client.clone(), &self.socket, ram.clone())? {
                Some(m) => Some(Arc::new(m)),
                None => v1_migration::probe(self.clone(), self.client.clone(), &self.socket, ram)?
                    .map(|m| Arc::new(m) as Arc<dyn DeviceMigration>),
            };
        Ok(found.map(|inner| {
            Arc::new(WithDmaWrites {
                inner,
                log: self.dma_log.clone(),
            }) as Arc<dyn DeviceMigration>
        }))
    }

    /// Turns a client error into a backend error: a broken connection is
    /// [`BackendError::Disconnected`], a refusal [`BackendError::Refused`].
    fn error(&self, op: String, e: ClientError) -> BackendError {
        if self.client.is_broken() {
            return BackendError::Disconnected {
                op,
                reason: format!("vfio-user server at {}: {e}", self.socket.display()),
            };
        }
        match e {
            ClientError::Remote { .. } => BackendError::Refused {
                op,
                reason: e.to_string(),
            },
            ClientError::InvalidArgument { .. } => BackendError::Unsupported {
                op,
                reason: e.to_string(),
            },
            ClientError::Disconnected { .. }
            | ClientError::Broken { .. }
            | ClientError::Connect { .. } => BackendError::Disconnected {
                op,
                reason: format!("vfio-user server at {}: {e}", self.socket.display()),
            },
            other => BackendError::Io {
                op,
                source: std::io::Error::other(other.to_string()),
            },
        }
    }

    /// Sets vectors `start..start + n` of `index`: eventfds if given, de-assigned (an
    /// eventfd request with no descriptors, as the vfio-user specification allows) if not.
    fn set_run(&self, index: u32, start: u32, fds: &[BorrowedFd<'_>], n: u32) -> Result<()> {
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        self.client
            .set_irqs(index, flags, start, n, fds)
            .map_err(|e| {
                let what = if fds.is_empty() {
                    "de-assigning"
                } else {
                    "setting"
                };
                self.error(
                    format!(
                        "{what} the eventfds of vectors {start}..{} of interrupt {index}",
                        start + n
                    ),
                    e,
                )
            })
    }
}

impl VfioBackend for VfioUserBackend {
    fn device_info(&self) -> Result<DeviceInfo> {
        let i = self
            .client
            .device_info()
            .map_err(|e| self.error("getting the device info".into(), e))?;
        Ok(DeviceInfo {
            num_regions: i.num_regions,
            num_irqs: i.num_irqs,
            flags: i.flags,
        })
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let r = self
            .client
            .region_info(index)
            .map_err(|e| self.error(format!("getting the info of region {index}"), e))?;
        let flags = RegionFlags::from_vfio(r.flags);
        Ok(RegionInfo {
            size: r.size,
            flags,
            sparse_areas: r.sparse_areas.iter().map(|a| (a.offset, a.size)).collect(),
            mmap: r.fd.filter(|_| flags.mmap).map(|fd| RegionMmap {
                fd: Arc::new(fd),
                file_offset: r.offset,
            }),
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let len = data.len();
        self.client.region_read(index, offset, data).map_err(|e| {
            self.error(
                format!("read of {len} bytes at {offset:#x} of region {index}"),
                e,
            )
        })
    }

    /// Writes to a BAR (regions 0-5) are posted: PCI memory writes are posted on a real
    /// bus too, and waiting for vfsim's reply was almost all of the VMM's time on a trapped
    /// write. A later read still sees the write: the socket is ordered and the server
    /// serves requests in order, so the read's reply comes after the write was done. A
    /// write the device refuses cannot be reported to the guest (PCI has no way either);
    /// the server logs it. A dead socket fails here or on the next call, which the PCI
    /// function logs, naming the device. Config-space writes (region 7) and every other
    /// region stay synchronous: their callers act on the result.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let posted = index <= VFIO_PCI_BAR5_REGION_INDEX;
        let result = if posted {
            self.client.region_write_posted(index, offset, data)
        } else {
            self.client.region_write(index, offset, data)
        };
        result.map_err(|e| {
            self.error(
                format!(
                    "write of {} bytes at {offset:#x} of region {index}",
                    data.len()
                ),
                e,
            )
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let i = self
            .client
            .irq_info(index)
            .map_err(|e| self.error(format!("getting the info of interrupt {index}"), e))?;
        Ok(IrqInfo {
            count: i.count,
            flags: i.flags,
        })
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()> {
        // One request per run of set (or unset) vectors.
        let mut i = 0;
        while i < fds.len() {
            let set = fds[i].is_some();
            let end = fds[i..]
                .iter()
                .position(|f| f.is_some() != set)
                .map_or(fds.len(), |p| i + p);
            let first = start + i as u32;
            let n = (end - i) as u32;
            if set {
                let borrowed: Vec<BorrowedFd<'_>> = fds[i..end]
                    .iter()
                    .flatten()
                    // SAFETY: the eventfds are borrowed from the caller for this whole
                    // call, so their descriptors stay open while `borrowed` exists.
                    .map(|f| unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) })
                    .collect();
                self.set_run(index, first, &borrowed, n)?;
            } else {
                self.set_run(index, first, &[], n)?;
            }
            i = end;
        }
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        self.client
            .set_irqs(index, flags, 0, 0, &[])
            .map_err(|e| self.error(format!("disabling interrupt {index}"), e))
    }

    /// `SET_IRQS` with `ACTION_MASK`/`ACTION_UNMASK` and no data, waiting for the reply
    /// (the function sends one vector at a time, as QEMU's vfio client does).
    fn mask_irqs(&self, index: u32, start: u32, count: u32, masked: bool) -> Result<()> {
        let (action, verb) = if masked {
            (VFIO_IRQ_SET_ACTION_MASK, "masking")
        } else {
            (VFIO_IRQ_SET_ACTION_UNMASK, "unmasking")
        };
        self.client
            .set_irqs(index, VFIO_IRQ_SET_DATA_NONE | action, start, count, &[])
            .map_err(|e| {
                self.error(
                    format!(
                        "{verb} vectors {start}..{} of interrupt {index}",
                        start.saturating_add(count)
                    ),
                    e,
                )
            })
    }

    /// Not offered. In vfio-user an UNMASK eventfd runs the other way from kernel VFIO's:
    /// the specification (`VFIO_USER_DEVICE_SET_IRQS`) has the *server* signal it when the
    /// interrupt is unmasked, not wait on it; and libvfio-user (`lib/irq.c`, as bundled with
    /// QEMU 10.0) only checks the descriptor count, calls the device's mask callback once
    /// and drops the descriptor. The VMM relays each EOI as an UNMASK request instead (see
    /// [`crate::vfio::intx`]).
    fn set_intx_unmask_eventfd(&self, _fd: &EventFd) -> Result<bool> {
        Ok(false)
    }

    unsafe fn dma_map(&self, m: &DmaMapping<'_>) -> Result<()> {
        let op = || format!("DMA map of {:#x} bytes at {:#x}", m.size, m.iova);
        let Some((fd, offset)) = m.file else {
            return Err(BackendError::Unsupported {
                op: op(),
                reason: "vfio-user servers map guest memory from a file, and this memory has none"
                    .into(),
            });
        };
        self.client
            .dma_map(m.iova, m.size, fd, offset, true, true)
            .map_err(|e| self.error(op(), e))
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.client
            .dma_unmap(iova, size)
            .map_err(|e| self.error(format!("DMA unmap of {size:#x} bytes at {iova:#x}"), e))
    }

    fn reset(&self) -> Result<()> {
        self.client
            .reset()
            .map_err(|e| self.error("reset".into(), e))
    }
}
