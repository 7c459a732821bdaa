//! Opening a device through its VFIO group: into a type1 container (vfio-ioctls), or into a
//! no-IOMMU container (our own ioctls: vfio-ioctls 0.10 opens only `/dev/vfio/<N>` and
//! only sets type1 IOMMUs).
//!
//! No-IOMMU (`vfio.enable_unsafe_noiommu_mode=1`, groups `/dev/vfio/noiommu-<N>`) gives a
//! user-space driver the device with no DMA translation: the device reaches physical
//! addresses, so there is no MAP_DMA and a VM cannot use it (its guest addresses are not
//! host-physical). Tests use it to drive a real vfio-pci device inside a guest.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    vfio_group_status, VFIO_API_VERSION, VFIO_BASE, VFIO_GROUP_FLAGS_VIABLE, VFIO_NOIOMMU_IOMMU,
    VFIO_TYPE,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE.into(), VFIO_BASE);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE.into(), VFIO_BASE + 1);
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE.into(), VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE.into(), VFIO_BASE + 3);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE.into(), VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE.into(), VFIO_BASE + 6);

/// A no-IOMMU container and group holding one device open. Dropping it closes both.
pub struct NoIommuGroup {
    _container: File,
    _group: File,
}

fn step(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn last(what: String) -> io::Error {
    step(what)(io::Error::last_os_error())
}

/// The IOMMU group number of the device at `sysfs` (its `iommu_group` link).
pub fn group_number(sysfs: &Path) -> io::Result<u32> {
    let link = std::fs::read_link(sysfs.join("iommu_group"))
        .map_err(step(format!("{}/iommu_group", sysfs.display())))?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            io::Error::other(format!(
                "{}/iommu_group points to {}, not a group number",
                sysfs.display(),
                link.display()
            ))
        })
}

/// Opens the device at `sysfs` (bound to vfio-pci on a host in no-IOMMU mode): returns its
/// device fd and the container and group that keep it open.
pub fn open_noiommu(sysfs: &Path) -> io::Result<(File, NoIommuGroup)> {
    let name = sysfs
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("{} names no device", sysfs.display())))?;
    let number = group_number(sysfs)?;
    let rw = |p: &str| OpenOptions::new().read(true).write(true).open(p);
    let container = rw("/dev/vfio/vfio").map_err(step("open /dev/vfio/vfio".into()))?;
    // SAFETY: VFIO_GET_API_VERSION takes no argument; the fd is the VFIO container.
    let version = unsafe { ioctl(&container, VFIO_GET_API_VERSION()) };
    if version as u32 != VFIO_API_VERSION {
        return Err(io::Error::other(format!(
            "the VFIO API version is {version}, not {VFIO_API_VERSION}"
        )));
    }
    // SAFETY: VFIO_CHECK_EXTENSION takes an integer; the fd is the VFIO container.
    let has = unsafe {
        ioctl_with_val(
            &container,
            VFIO_CHECK_EXTENSION(),
            VFIO_NOIOMMU_IOMMU.into(),
        )
    };
    if has != 1 {
        return Err(io::Error::other(
            "this kernel offers no no-IOMMU VFIO (CONFIG_VFIO_NOIOMMU and the vfio module's \
             enable_unsafe_noiommu_mode=1 are both needed)",
        ));
    }
    let group_path = format!("/dev/vfio/noiommu-{number}");
    let group = rw(&group_path).map_err(step(format!("open {group_path}")))?;
    let mut status = vfio_group_status {
        argsz: std::mem::size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: the kernel writes at most `argsz` bytes into `status`, a valid, exclusively
    // borrowed vfio_group_status; the fd is a VFIO group.
    if unsafe { ioctl_with_mut_ref(&group, VFIO_GROUP_GET_STATUS(), &mut status) } < 0 {
        return Err(last(format!("VFIO_GROUP_GET_STATUS of {group_path}")));
    }
    if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(io::Error::other(format!(
            "{group_path} is not viable: some device in it is bound to a driver other than vfio"
        )));
    }
    let container_fd = container.as_raw_fd();
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) from the pointer,
    // which points to a live local; the fd is a VFIO group.
    if unsafe { ioctl_with_ptr(&group, VFIO_GROUP_SET_CONTAINER(), &container_fd) } < 0 {
        return Err(last(format!("VFIO_GROUP_SET_CONTAINER of {group_path}")));
    }
    // SAFETY: VFIO_SET_IOMMU takes an integer; the fd is the VFIO container.
    if unsafe { ioctl_with_val(&container, VFIO_SET_IOMMU(), VFIO_NOIOMMU_IOMMU.into()) } < 0 {
        return Err(last("VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)".into()));
    }
    let cname = CString::new(name)
        .map_err(|_| io::Error::other(format!("device name {name:?} holds a NUL")))?;
    // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string, which `cname` is and
    // which lives across the call; the fd is a VFIO group.
    let fd = unsafe { ioctl_with_ptr(&group, VFIO_GROUP_GET_DEVICE_FD(), cname.as_ptr()) };
    if fd < 0 {
        return Err(last(format!(
            "VFIO_GROUP_GET_DEVICE_FD({name}) on {group_path}"
        )));
    }
    // SAFETY: the ioctl returned a new fd, which nothing else owns.
    let device = unsafe { File::from_raw_fd(fd) };
    Ok((
        device,
        NoIommuGroup {
            _container: container,
            _group: group,
        },
    ))
}
