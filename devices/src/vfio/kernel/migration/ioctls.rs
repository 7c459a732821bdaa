//! The system calls of VFIO migration v2 behind [`MigrationIoctls`], and the byte layout of
//! the `VFIO_DEVICE_FEATURE` payloads this module sends.
//!
//! [`DeviceFdIoctls`] is the real implementation: `ioctl(2)`, `read(2)` and `write(2)` on the
//! device fd and on the data fds the kernel returns. **It is untested against hardware on
//! these machines** (no VFIO device here); everything above it is tested against a fake
//! kernel that decodes the same buffers (`fake.rs`).
//!
//! vfio-ioctls 0.10 wraps this uAPI too (`VfioDevice::set_migration_state`,
//! `read_migration_data`, `start_dma_logging`, ...), but keeps the data fd private inside
//! the `VfioDevice` (so it cannot be made non-blocking for pre-copy or polled, and a
//! blocking read holds the device's lock), so the ioctls are issued here, with the
//! structures and constants of vfio-bindings.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_precopy_info, VFIO_BASE, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_GET, VFIO_TYPE,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_mut_ref};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE.into(), VFIO_BASE + 17);
ioctl_io_nr!(VFIO_MIG_GET_PRECOPY_INFO, VFIO_TYPE.into(), VFIO_BASE + 21);

/// Size of `struct vfio_device_feature`'s header (`argsz`, `flags`).
pub const HEADER_SIZE: usize = std::mem::size_of::<vfio_device_feature>();

/// Payload layouts (byte offsets after the header), checked against vfio-bindings' structs
/// in the tests.
pub mod layout {
    /// `struct vfio_device_feature_migration`: `flags` (u64).
    pub const MIGRATION_SIZE: usize = 8;
    /// `struct vfio_device_feature_mig_state`: `device_state` (u32) at 0, `data_fd` (s32)
    /// at 4.
    pub const MIG_STATE_SIZE: usize = 8;
    /// Offset of `data_fd`.
    pub const MIG_STATE_DATA_FD: usize = 4;
    /// `struct vfio_device_feature_dma_logging_control`: `page_size` (u64) at 0,
    /// `num_ranges` (u32) at 8, reserved (u32) at 12, `ranges` (pointer as u64) at 16.
    pub const LOGGING_CONTROL_SIZE: usize = 24;
    /// Offset of `num_ranges`.
    pub const LOGGING_CONTROL_NUM_RANGES: usize = 8;
    /// Offset of `ranges`.
    pub const LOGGING_CONTROL_RANGES: usize = 16;
    /// `struct vfio_device_feature_dma_logging_report`: `iova`, `length`, `page_size`,
    /// `bitmap` (pointer as u64), u64 each.
    pub const LOGGING_REPORT_SIZE: usize = 32;
    /// Offset of `page_size`.
    pub const LOGGING_REPORT_PAGE_SIZE: usize = 16;
    /// Offset of `bitmap`.
    pub const LOGGING_REPORT_BITMAP: usize = 24;
}

/// A `struct vfio_device_feature` with its payload, 8-byte aligned (the payloads hold
/// `__aligned_u64` fields), in native byte order as the kernel reads it.
pub struct FeatureBuf {
    words: Vec<u64>,
    len: usize,
}

impl FeatureBuf {
    /// A buffer for feature `flags` (GET/SET/PROBE | index) with `payload_len` zeroed
    /// payload bytes; `argsz` covers header and payload.
    pub fn new(flags: u32, payload_len: usize) -> Self {
        let len = HEADER_SIZE + payload_len;
        let mut buf = FeatureBuf {
            words: vec![0; len.div_ceil(8)],
            len,
        };
        buf.put_raw_u32(0, len as u32);
        buf.put_raw_u32(4, flags);
        buf
    }

    /// A `DMA_LOGGING_REPORT` GET for `[iova, iova + length)` at `page_size` granularity,
    /// into `bitmap`, whose pointer it holds: the kernel sets a bit per dirty page and
    /// never clears one. `bitmap` must hold ceil(length / page_size / 64) words and
    /// outlive the ioctl.
    pub fn logging_report(iova: u64, length: u64, page_size: u64, bitmap: &mut [u64]) -> Self {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            layout::LOGGING_REPORT_SIZE,
        );
        buf.put_u64(0, iova);
        buf.put_u64(8, length);
        buf.put_u64(layout::LOGGING_REPORT_PAGE_SIZE, page_size);
        buf.put_u64(layout::LOGGING_REPORT_BITMAP, bitmap.as_mut_ptr() as u64);
        buf
    }

    /// `argsz`.
    pub fn argsz(&self) -> u32 {
        u32::from_ne_bytes(self.bytes()[0..4].try_into().unwrap())
    }

    /// `flags`.
    pub fn flags(&self) -> u32 {
        u32::from_ne_bytes(self.bytes()[4..8].try_into().unwrap())
    }

    /// The whole structure, header first.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialized bytes (len <= 8 * words.len());
        // u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `self` is borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }

    /// The payload (after the header).
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[HEADER_SIZE..]
    }

    /// Pointer to the structure, for `ioctl(2)`.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }

    fn put_raw_u32(&mut self, at: usize, v: u32) {
        self.bytes_mut()[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    /// Writes a u32 at payload offset `at`.
    pub fn put_u32(&mut self, at: usize, v: u32) {
        self.put_raw_u32(HEADER_SIZE + at, v);
    }

    /// Writes a u64 at payload offset `at`.
    pub fn put_u64(&mut self, at: usize, v: u64) {
        let at = HEADER_SIZE + at;
        self.bytes_mut()[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    /// The u32 at payload offset `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.payload()[at..at + 4].try_into().unwrap())
    }

    /// The u64 at payload offset `at`.
    pub fn u64_at(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.payload()[at..at + 8].try_into().unwrap())
    }
}

/// The system calls of VFIO migration v2, so the state machine and the data handling can be
/// tested against a fake kernel.
pub trait MigrationIoctls: Send + Sync {
    /// `ioctl(device_fd, VFIO_DEVICE_FEATURE, buf)`: the kernel reads and writes `buf` as
    /// `struct vfio_device_feature` with its payload. A `data_fd` written back into a
    /// `MIG_DEVICE_STATE` payload is a new file descriptor owned by the caller.
    ///
    /// # Safety
    ///
    /// Pointers inside the payload (DMA logging's `ranges` and `bitmap`) must be valid for
    /// reads (ranges) or writes (bitmap) of the sizes the uAPI derives from the payload,
    /// for the duration of the call: the callee dereferences them.
    unsafe fn device_feature(&self, buf: &mut FeatureBuf) -> io::Result<()>;

    /// `read(2)` on a data fd.
    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize>;

    /// `write(2)` on a data fd.
    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize>;

    /// `ioctl(data_fd, VFIO_MIG_GET_PRECOPY_INFO)`: `(initial_bytes, dirty_bytes)`.
    fn precopy_info(&self, fd: BorrowedFd<'_>) -> io::Result<(u64, u64)>;
}

/// [`MigrationIoctls`] on a VFIO device fd. **Untested against hardware here.**
pub struct DeviceFdIoctls {
    device: File,
}

impl DeviceFdIoctls {
    /// Issues the ioctls on `device`, a VFIO device fd (or a duplicate of one).
    pub fn new(device: File) -> Self {
        DeviceFdIoctls { device }
    }
}

impl MigrationIoctls for DeviceFdIoctls {
    unsafe fn device_feature(&self, buf: &mut FeatureBuf) -> io::Result<()> {
        // SAFETY: `self.device` is a VFIO device fd; `buf` is a `struct
        // vfio_device_feature` whose `argsz` is its own length, so the kernel reads and
        // writes inside it; pointers in the payload are valid per this method's contract.
        let ret =
            unsafe { ioctl_with_mut_ptr(&self.device, VFIO_DEVICE_FEATURE(), buf.as_mut_ptr()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `fd` is open (borrowed).
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes; `fd` is open (borrowed).
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn precopy_info(&self, fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
        let mut info = vfio_precopy_info {
            argsz: std::mem::size_of::<vfio_precopy_info>() as u32,
            ..Default::default()
        };
        // SAFETY: `fd` is a migration data fd; the kernel writes at most `argsz` bytes into
        // `info`, a valid, exclusively borrowed vfio_precopy_info.
        let ret = unsafe { ioctl_with_mut_ref(&fd, VFIO_MIG_GET_PRECOPY_INFO(), &mut info) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((info.initial_bytes, info.dirty_bytes))
    }
}
