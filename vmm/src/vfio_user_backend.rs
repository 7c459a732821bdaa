//! [`VfioUserBackend`]: a [`VfioBackend`] over a [`vfio_user::Client`], so a device served
//! by another process is a vfio-pci function like a kernel VFIO one.
//!
//! It lives in the vmm rather than in `devices::vfio`: the device model stays independent
//! of any transport (`devices` knows the [`VfioBackend`] trait only, as its documentation
//! says), and the vmm is the one crate that chooses backends and owns the sockets.
//!
//! A dead or misbehaving server breaks the client's connection; every call after that
//! answers [`BackendError::Disconnected`] at once, which the PCI function logs (rate-limited)
//! while the guest reads all ones. The VMM keeps running.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::vfio::backend::{DmaMapping, RegionMmap, Result};
use devices::vfio::{BackendError, DeviceInfo, IrqInfo, RegionFlags, RegionInfo, VfioBackend};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};
use vfio_user::{Client, ClientError};
use vmm_sys_util::eventfd::EventFd;

/// A device behind a vfio-user socket.
pub struct VfioUserBackend {
    client: Client,
    socket: PathBuf,
}

impl VfioUserBackend {
    /// Connects to the server at `socket`; `timeout` is the deadline of every request.
    pub fn connect(socket: &Path, timeout: Duration) -> std::result::Result<Self, ClientError> {
        Ok(VfioUserBackend {
            client: Client::connect(socket, timeout)?,
            socket: socket.to_path_buf(),
        })
    }

    /// Wraps a connected client (`socket` is for messages only); tests use it with a
    /// socket pair.
    #[cfg(test)]
    pub fn from_client(client: Client, socket: PathBuf) -> Self {
        VfioUserBackend { client, socket }
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

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.client.region_write(index, offset, data).map_err(|e| {
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

#[cfg(test)]
#[path = "vfio_user_backend_tests.rs"]
mod tests;
