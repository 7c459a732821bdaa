//! [`VfioBackend`] over the kernel's VFIO.
//!
//! A device is opened through a type1 container (vfio-ioctls 0.10, which also tells KVM
//! about the group) or, for a user-space driver on a host in no-IOMMU mode, through a
//! no-IOMMU container (`group.rs`). Everything after opening goes through our own ioctls on
//! the device fd (`device_fd.rs`), around the traps of vfio-ioctls 0.10 (see
//! `../shared/crates.md`): its region table is positional and shifts after a missing VGA
//! region, its `region_read`/`region_write` only log failures (accesses here are `pread`/
//! `pwrite` at the region's offset), its `reset` returns nothing, and it has no IRQ mask.
//!
//! Tested against the real Linux VFIO inside a guest (vfio-pci in no-IOMMU mode, and mtty
//! mdevs in a type1 container): `tests/tests/guest_vfio.rs`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError};
use vmm_sys_util::eventfd::EventFd;

use super::device_fd::{DeviceFd, IoctlError, RawRegion};
use super::group::{open_noiommu, NoIommuGroup};
use super::migration::{DeviceFdIoctls, KernelVfioMigration};
use crate::vfio::backend::{
    BackendError, DeviceInfo, DmaMapping, IrqInfo, RegionFlags, RegionInfo, RegionMmap, Result,
    VfioBackend, IRQ_INTX,
};
use crate::vfio::migration::MigrationError;

const VFIO_DIR: &str = "/dev/vfio";

/// Why the kernel VFIO backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KernelVfioError {
    /// The host has no VFIO.
    #[error("{VFIO_DIR} does not exist: the vfio and vfio-pci kernel modules are not loaded (or this host cannot do device passthrough)")]
    NoVfio,
    /// KVM refused to create its VFIO device.
    #[error("KVM cannot create its VFIO device: {0}")]
    KvmDevice(#[source] kvm_ioctls::Error),
    /// Opening the container failed.
    #[error("cannot open the VFIO container: {0}")]
    Container(#[source] VfioError),
    /// Opening the device failed.
    #[error("cannot open VFIO device {path}: {source}")]
    Device {
        /// The sysfs path given.
        path: PathBuf,
        /// vfio-ioctls' error.
        source: VfioError,
    },
    /// Querying or duplicating the device fd failed.
    #[error("cannot {what} of VFIO device {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The sysfs path given.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
}

/// What keeps the device open, and maps DMA for it.
enum Holder {
    /// A type1 container: DMA addresses are IOVAs the container maps.
    Type1 {
        _device: VfioDevice,
        container: Arc<VfioContainer>,
    },
    /// No IOMMU: DMA addresses are physical addresses; nothing can be mapped.
    NoIommu { _group: NoIommuGroup },
}

/// A VFIO device opened through the kernel (VFIO container/group API).
pub struct KernelVfio {
    device: DeviceFd,
    holder: Holder,
    /// Duplicate of the device fd handed out for mmap.
    mmap_fd: Arc<OwnedFd>,
    info: DeviceInfo,
    /// Every region's info, read once at open (sizes and offsets do not change).
    regions: Vec<RawRegion>,
}

impl KernelVfio {
    /// Opens a VFIO type1 container. With `vm`, KVM's VFIO device is created and told
    /// about every group the container opens (what a VM needs; a user-space driver passes
    /// `None`). Fails with [`KernelVfioError::NoVfio`] when the host has no `/dev/vfio`.
    pub fn container(
        vm: Option<&VmFd>,
    ) -> std::result::Result<Arc<VfioContainer>, KernelVfioError> {
        check_vfio()?;
        let handle = match vm {
            Some(vm) => {
                let mut dev = kvm_create_device {
                    type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
                    fd: 0,
                    flags: 0,
                };
                let kvm_dev = vm
                    .create_device(&mut dev)
                    .map_err(KernelVfioError::KvmDevice)?;
                Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_dev)))
            }
            None => None,
        };
        VfioContainer::new(handle)
            .map(Arc::new)
            .map_err(KernelVfioError::Container)
    }

    /// Opens the device at `sysfs` (e.g. `/sys/bus/pci/devices/0000:01:00.1` bound to
    /// vfio-pci, or `/sys/bus/mdev/devices/<uuid>`) in `container`.
    pub fn open(
        sysfs: &Path,
        container: Arc<VfioContainer>,
    ) -> std::result::Result<Self, KernelVfioError> {
        check_vfio()?;
        let device = VfioDevice::new(sysfs, container.clone(), false).map_err(|source| {
            KernelVfioError::Device {
                path: sysfs.to_path_buf(),
                source,
            }
        })?;
        // SAFETY: the fd belongs to `device`, which outlives this borrow (it is only
        // used to duplicate the fd right below).
        let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(io_err("duplicate the fd", sysfs))?,
        );
        Self::from_fd(
            sysfs,
            file,
            Holder::Type1 {
                _device: device,
                container,
            },
        )
    }

    /// Opens the device at `sysfs`, bound to vfio-pci on a host in no-IOMMU mode, for a
    /// user-space driver: its DMA addresses are physical addresses and
    /// [`dma_map`](VfioBackend::dma_map) is refused. Not for a VM (see `group.rs`).
    pub fn open_noiommu(sysfs: &Path) -> std::result::Result<Self, KernelVfioError> {
        check_vfio()?;
        let (file, group) = open_noiommu(sysfs).map_err(io_err("open (no-IOMMU)", sysfs))?;
        Self::from_fd(sysfs, file, Holder::NoIommu { _group: group })
    }

    fn from_fd(
        sysfs: &Path,
        file: File,
        holder: Holder,
    ) -> std::result::Result<Self, KernelVfioError> {
        let mmap_fd = Arc::new(OwnedFd::from(
            file.try_clone()
                .map_err(io_err("duplicate the fd", sysfs))?,
        ));
        let device = DeviceFd::new(file);
        let raw = device
            .info()
            .map_err(|e| io_err("get the device info", sysfs)(e.into()))?;
        // vfio-pci counts the VGA region (8) in `num_regions` but answers EINVAL for it on
        // a device that is not VGA (seen on Linux 6.12): such a region is absent.
        let regions = (0..raw.num_regions)
            .map(|i| match device.region(i) {
                Err(e) if e.errno() == Some(libc::EINVAL) => Ok(RawRegion::default()),
                r => r.map_err(io::Error::from),
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(io_err("get the region info", sysfs))?;
        Ok(KernelVfio {
            device,
            holder,
            mmap_fd,
            info: DeviceInfo {
                num_regions: raw.num_regions,
                num_irqs: raw.num_irqs,
                flags: raw.flags,
            },
            regions,
        })
    }

    /// The device's VFIO migration v2 interface, or `None` if it has none (see
    /// [`KernelVfioMigration`]; it issues its ioctls on a duplicate of the device fd).
    pub fn migration(&self) -> std::result::Result<Option<KernelVfioMigration>, MigrationError> {
        let fd = self
            .device
            .file()
            .try_clone()
            .map_err(|e| MigrationError::Device {
                op: "duplicate the device fd for migration".into(),
                reason: e.to_string(),
            })?;
        KernelVfioMigration::probe(Box::new(DeviceFdIoctls::new(fd)))
    }

    /// A duplicate of the device fd, for ioctls this backend does not wrap (a test walking
    /// the raw migration arcs, say).
    pub fn try_clone_device_fd(&self) -> io::Result<File> {
        self.device.file().try_clone()
    }

    /// The ids of region `index`'s capabilities, in chain order (e.g. 1 sparse mmap, 3
    /// MSI-X mappable), as the kernel reported them.
    pub fn region_capability_ids(&self, index: u32) -> Result<Vec<u16>> {
        Ok(self.region(index)?.cap_ids.clone())
    }

    fn region(&self, index: u32) -> Result<&RawRegion> {
        self.regions
            .get(index as usize)
            .ok_or(BackendError::NoRegion { index })
    }

    /// File offset of `offset` in region `index`, for an access of `len` bytes.
    fn file_offset(&self, index: u32, offset: u64, len: usize) -> Result<u64> {
        let r = self.region(index)?;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > r.size)
        {
            return Err(BackendError::OutOfRange {
                index,
                offset,
                len,
                size: r.size,
            });
        }
        Ok(r.offset + offset)
    }
}

/// Fails with [`KernelVfioError::NoVfio`] if the host has no VFIO.
fn check_vfio() -> std::result::Result<(), KernelVfioError> {
    if Path::new(VFIO_DIR).exists() {
        Ok(())
    } else {
        Err(KernelVfioError::NoVfio)
    }
}

fn io_err(what: &'static str, sysfs: &Path) -> impl FnOnce(io::Error) -> KernelVfioError {
    let path = sysfs.to_path_buf();
    move |source| KernelVfioError::Io { what, path, source }
}

fn io_error(op: String) -> impl FnOnce(io::Error) -> BackendError {
    move |source| BackendError::Io { op, source }
}

fn refused(op: String) -> impl FnOnce(IoctlError) -> BackendError {
    move |e| BackendError::Refused {
        op,
        reason: e.to_string(),
    }
}

impl VfioBackend for KernelVfio {
    fn device_info(&self) -> Result<DeviceInfo> {
        Ok(self.info)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let r = self.region(index)?;
        let flags = RegionFlags::from_vfio(r.flags);
        Ok(RegionInfo {
            size: r.size,
            flags,
            sparse_areas: r.sparse_areas.clone().unwrap_or_default(),
            mmap: flags.mmap.then(|| RegionMmap {
                fd: self.mmap_fd.clone(),
                file_offset: r.offset,
            }),
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.device
            .file()
            .read_exact_at(data, at)
            .map_err(io_error(format!(
                "pread of {} bytes at {offset:#x} of region {index}",
                data.len()
            )))
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.device
            .file()
            .write_all_at(data, at)
            .map_err(io_error(format!(
                "pwrite of {} bytes at {offset:#x} of region {index}",
                data.len()
            )))
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        // An index the device lacks reads as no vectors (EINVAL from the kernel).
        Ok(self
            .device
            .irq(index)
            .map(|(count, flags)| IrqInfo { count, flags })
            .unwrap_or_default())
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()> {
        let raw: Vec<i32> = fds
            .iter()
            .map(|f| f.map_or(-1, |f| f.as_raw_fd()))
            .collect();
        self.device
            .set_irq_fds(index, start, &raw, false)
            .map_err(refused(format!(
                "enabling {} vectors of interrupt {index} from {start}",
                fds.len()
            )))
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.device
            .set_irqs_none(index, VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)
            .map_err(refused(format!("disabling interrupt {index}")))
    }

    fn mask_irqs(&self, index: u32, start: u32, count: u32, masked: bool) -> Result<()> {
        let (action, verb) = if masked {
            (VFIO_IRQ_SET_ACTION_MASK, "masking")
        } else {
            (VFIO_IRQ_SET_ACTION_UNMASK, "unmasking")
        };
        self.device
            .set_irqs_none(index, action, start, count)
            .map_err(refused(format!(
                "{verb} vectors {start}..{} of interrupt {index}",
                start.saturating_add(count)
            )))
    }

    /// The kernel unmasks INTx itself when `fd` is signalled (as QEMU's
    /// `vfio_intx_enable_kvm` sets it up), so no VMM thread relays the guest's EOI.
    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<bool> {
        self.device
            .set_irq_fds(IRQ_INTX, 0, &[fd.as_raw_fd()], true)
            .map_err(refused("setting the INTx unmask eventfd".into()))?;
        Ok(true)
    }

    unsafe fn dma_map(&self, m: &DmaMapping<'_>) -> Result<()> {
        let op = || format!("DMA map of {:#x} bytes at {:#x}", m.size, m.iova);
        let Holder::Type1 { container, .. } = &self.holder else {
            return Err(BackendError::Unsupported {
                op: op(),
                reason: "the device is in a no-IOMMU group: it uses physical addresses".into(),
            });
        };
        let size = usize::try_from(m.size).map_err(|_| BackendError::Unsupported {
            op: op(),
            reason: "the size does not fit this host's address space".into(),
        })?;
        // SAFETY: the caller guarantees that the memory at `host_addr` stays valid for
        // device access until it is unmapped (this method's contract).
        unsafe { container.vfio_dma_map(m.iova, size, m.host_addr as *mut u8) }.map_err(|e| {
            BackendError::Refused {
                op: op(),
                reason: e.to_string(),
            }
        })
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let op = || format!("DMA unmap of {size:#x} bytes at {iova:#x}");
        let Holder::Type1 { container, .. } = &self.holder else {
            return Err(BackendError::Unsupported {
                op: op(),
                reason: "the device is in a no-IOMMU group: nothing is mapped".into(),
            });
        };
        let len = usize::try_from(size).map_err(|_| BackendError::Unsupported {
            op: op(),
            reason: "the size does not fit this host's address space".into(),
        })?;
        container
            .vfio_dma_unmap(iova, len)
            .map_err(|e| BackendError::Refused {
                op: op(),
                reason: e.to_string(),
            })
    }

    fn reset(&self) -> Result<()> {
        if self.info.flags & VFIO_DEVICE_FLAGS_RESET == 0 {
            return Err(BackendError::Unsupported {
                op: "reset".into(),
                reason: "the device does not report VFIO_DEVICE_FLAGS_RESET".into(),
            });
        }
        self.device
            .reset()
            .map_err(|e| io_error("VFIO_DEVICE_RESET".into())(e.source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dev_vfio_is_a_clear_error() {
        if Path::new(VFIO_DIR).exists() {
            return; // a host with VFIO: nothing to check here
        }
        let e = check_vfio().unwrap_err();
        assert!(e.to_string().contains("/dev/vfio does not exist"), "{e}");
    }
}
