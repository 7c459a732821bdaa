//! [`VfioBackend`] over the kernel's VFIO, through vfio-ioctls 0.10.
//!
//! **Untested against hardware on these machines**: they have no `/dev/vfio`, so this
//! module is only compiled here. It is kept small so that it can be checked by reading.
//!
//! Around the traps of vfio-ioctls 0.10 (see `../shared/crates.md`):
//! - its region table is positional and shifts after a missing VGA region, so only regions
//!   0-7 (BARs, ROM, configuration space), which precede the VGA region, are served;
//! - its `region_read`/`region_write` only log failures, so region accesses use
//!   `pread`/`pwrite` on (a duplicate of) the device fd at the region's offset;
//! - its `reset` returns nothing, so reset is our own `VFIO_DEVICE_RESET` ioctl, as is
//!   `VFIO_DEVICE_GET_INFO` (the crate keeps the result private);
//! - `enable_irq` always sets the whole vector range from 0, which is the only form this
//!   backend accepts (and the only one the PCI function uses);
//! - its `unmask_irq` serves INTx only and it has no mask, so masking vectors is our own
//!   `VFIO_DEVICE_SET_IRQS` (vfio-pci reports only INTx as maskable, so the PCI function
//!   does not ask it for MSI or MSI-X).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_set, VFIO_BASE, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::ioctl_io_nr;

use super::migration::{DeviceFdIoctls, KernelVfioMigration};
use crate::vfio::backend::{
    BackendError, DeviceInfo, DmaMapping, IrqInfo, RegionFlags, RegionInfo, RegionMmap, Result,
    VfioBackend, IRQ_INTX,
};
use crate::vfio::migration::MigrationError;

ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE.into(), VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE.into(), VFIO_BASE + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE.into(), VFIO_BASE + 11);

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

/// A VFIO device opened through the kernel (VFIO container/group API).
pub struct KernelVfio {
    device: VfioDevice,
    container: Arc<VfioContainer>,
    /// Duplicate of the device fd for `pread`/`pwrite`.
    file: File,
    /// Duplicate of the device fd handed out for mmap.
    mmap_fd: Arc<OwnedFd>,
    info: DeviceInfo,
}

impl KernelVfio {
    /// Opens the VFIO container of VM `vm` (creating KVM's VFIO device, which lets KVM
    /// know about the groups). Fails with [`KernelVfioError::NoVfio`] when the host has no
    /// `/dev/vfio`.
    pub fn container(vm: &VmFd) -> std::result::Result<Arc<VfioContainer>, KernelVfioError> {
        check_vfio()?;
        let mut dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_dev = vm
            .create_device(&mut dev)
            .map_err(KernelVfioError::KvmDevice)?;
        let handle = Arc::new(VfioDeviceFd::new_from_kvm(kvm_dev));
        VfioContainer::new(Some(handle))
            .map(Arc::new)
            .map_err(KernelVfioError::Container)
    }

    /// Opens the device at `sysfs` (e.g. `/sys/bus/pci/devices/0000:01:00.1`, bound to
    /// vfio-pci) in `container`.
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
        let io_err = |what| {
            let path = sysfs.to_path_buf();
            move |source| KernelVfioError::Io { what, path, source }
        };
        // SAFETY: the fd belongs to `device`, which outlives this borrow (it is only
        // used to duplicate the fd right below).
        let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(io_err("duplicate the fd"))?,
        );
        let mmap_fd = Arc::new(
            fd.try_clone_to_owned()
                .map_err(io_err("duplicate the fd"))?,
        );
        let mut raw = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_INFO writes at most `argsz` bytes into `raw`, which is a
        // valid, exclusively borrowed vfio_device_info; the fd is a VFIO device fd.
        let ret = unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_INFO(), &mut raw) };
        if ret < 0 {
            return Err(io_err("get the device info")(io::Error::last_os_error()));
        }
        Ok(KernelVfio {
            device,
            container,
            file,
            mmap_fd,
            info: DeviceInfo {
                num_regions: raw.num_regions,
                num_irqs: raw.num_irqs,
                flags: raw.flags,
            },
        })
    }

    /// The device's VFIO migration v2 interface, or `None` if it has none (see
    /// [`KernelVfioMigration`]; it issues its ioctls on a duplicate of the device fd).
    pub fn migration(&self) -> std::result::Result<Option<KernelVfioMigration>, MigrationError> {
        let fd = self.file.try_clone().map_err(|e| MigrationError::Device {
            op: "duplicate the device fd for migration".into(),
            reason: e.to_string(),
        })?;
        KernelVfioMigration::probe(Box::new(DeviceFdIoctls::new(fd)))
    }

    /// Region `index` if this backend serves it (see the module docs).
    fn check_region(&self, index: u32) -> Result<()> {
        if index > VFIO_PCI_CONFIG_REGION_INDEX || index >= self.info.num_regions {
            return Err(BackendError::Unsupported {
                op: format!("access to region {index}"),
                reason: "the kernel backend serves regions 0-7 only (vfio-ioctls 0.10 shifts later ones)".into(),
            });
        }
        Ok(())
    }

    /// File offset of `offset` in region `index`, for an access of `len` bytes.
    fn file_offset(&self, index: u32, offset: u64, len: usize) -> Result<u64> {
        self.check_region(index)?;
        let size = self.device.get_region_size(index);
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(BackendError::OutOfRange {
                index,
                offset,
                len,
                size,
            });
        }
        Ok(self.device.get_region_offset(index) + offset)
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

fn io_error(op: String) -> impl FnOnce(io::Error) -> BackendError {
    move |source| BackendError::Io { op, source }
}

impl VfioBackend for KernelVfio {
    fn device_info(&self) -> Result<DeviceInfo> {
        Ok(self.info)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.check_region(index)?;
        let flags = RegionFlags::from_vfio(self.device.get_region_flags(index));
        let sparse_areas = self
            .device
            .get_region_caps(index)
            .into_iter()
            .find_map(|cap| match cap {
                VfioRegionInfoCap::SparseMmap(s) => {
                    Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
                }
                _ => None,
            })
            .unwrap_or_default();
        Ok(RegionInfo {
            size: self.device.get_region_size(index),
            flags,
            sparse_areas,
            mmap: flags.mmap.then(|| RegionMmap {
                fd: self.mmap_fd.clone(),
                file_offset: self.device.get_region_offset(index),
            }),
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.file.read_exact_at(data, at).map_err(io_error(format!(
            "pread of {} bytes at {offset:#x} of region {index}",
            data.len()
        )))
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.file.write_all_at(data, at).map_err(io_error(format!(
            "pwrite of {} bytes at {offset:#x} of region {index}",
            data.len()
        )))
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        Ok(self
            .device
            .get_irq_info(index)
            .map(|i| IrqInfo {
                count: i.count,
                flags: i.flags,
            })
            .unwrap_or_default())
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()> {
        let all: Option<Vec<&EventFd>> = fds.iter().copied().collect();
        let Some(all) = all.filter(|_| start == 0) else {
            return Err(BackendError::Unsupported {
                op: format!("setting eventfds of interrupt {index} from vector {start}"),
                reason: "vfio-ioctls 0.10 only sets every vector from 0".into(),
            });
        };
        self.device
            .enable_irq(index, all)
            .map_err(|e| BackendError::Refused {
                op: format!("enabling {} vectors of interrupt {index}", fds.len()),
                reason: e.to_string(),
            })
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.device
            .disable_irq(index)
            .map_err(|e| BackendError::Refused {
                op: format!("disabling interrupt {index}"),
                reason: e.to_string(),
            })
    }

    fn mask_irqs(&self, index: u32, start: u32, count: u32, masked: bool) -> Result<()> {
        let action = if masked {
            VFIO_IRQ_SET_ACTION_MASK
        } else {
            VFIO_IRQ_SET_ACTION_UNMASK
        };
        let set = vfio_irq_set {
            argsz: std::mem::size_of::<vfio_irq_set>() as u32,
            flags: VFIO_IRQ_SET_DATA_NONE | action,
            index,
            start,
            count,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_SET_IRQS reads `argsz` bytes of `set`, which is a valid
        // vfio_irq_set with no data (DATA_NONE) and `argsz` its own size; the fd is a VFIO
        // device fd.
        let ret = unsafe { ioctl_with_ref(&self.file, VFIO_DEVICE_SET_IRQS(), &set) };
        if ret < 0 {
            let verb = if masked { "masking" } else { "unmasking" };
            return Err(BackendError::Refused {
                op: format!(
                    "{verb} vectors {start}..{} of interrupt {index}",
                    start.saturating_add(count)
                ),
                reason: io::Error::last_os_error().to_string(),
            });
        }
        Ok(())
    }

    /// The kernel unmasks INTx itself when `fd` is signalled (as QEMU's
    /// `vfio_intx_enable_kvm` sets it up), so no VMM thread relays the guest's EOI.
    fn set_intx_unmask_eventfd(&self, fd: &EventFd) -> Result<bool> {
        self.device
            .set_irq_resample_fd(IRQ_INTX, vec![fd])
            .map_err(|e| BackendError::Refused {
                op: "setting the INTx unmask eventfd".into(),
                reason: e.to_string(),
            })?;
        Ok(true)
    }

    unsafe fn dma_map(&self, m: &DmaMapping<'_>) -> Result<()> {
        let size = usize::try_from(m.size).map_err(|_| BackendError::Unsupported {
            op: format!("DMA map of {:#x} bytes at {:#x}", m.size, m.iova),
            reason: "the size does not fit this host's address space".into(),
        })?;
        // SAFETY: the caller guarantees that the memory at `host_addr` stays valid for
        // device access until it is unmapped (this method's contract).
        unsafe {
            self.container
                .vfio_dma_map(m.iova, size, m.host_addr as *mut u8)
        }
        .map_err(|e| BackendError::Refused {
            op: format!("DMA map of {:#x} bytes at {:#x}", m.size, m.iova),
            reason: e.to_string(),
        })
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let op = || format!("DMA unmap of {size:#x} bytes at {iova:#x}");
        let len = usize::try_from(size).map_err(|_| BackendError::Unsupported {
            op: op(),
            reason: "the size does not fit this host's address space".into(),
        })?;
        self.container
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
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is a VFIO device fd.
        let ret = unsafe { ioctl(&self.file, VFIO_DEVICE_RESET()) };
        if ret < 0 {
            return Err(io_error("VFIO_DEVICE_RESET".into())(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
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
