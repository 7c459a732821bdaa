//! Memfds and shared mappings of file descriptors with bounds-checked copies.
//!
//! The memory is shared with another process (the VMM, and through it the guest) that
//! may change it at any time, so it is never handed out as a Rust reference: every
//! access is a copy through a raw pointer after a bounds check.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Why creating or using a mapping failed.
#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    /// `memfd_create()` failed.
    #[error("creating the memfd {name:?} failed: {source}")]
    MemfdCreate {
        /// Name of the memfd.
        name: String,
        /// The system error.
        source: io::Error,
    },
    /// `ftruncate()` of a new memfd failed.
    #[error("sizing the memfd {name:?} to {size:#x} bytes failed: {source}")]
    MemfdSize {
        /// Name of the memfd.
        name: String,
        /// The requested size.
        size: u64,
        /// The system error.
        source: io::Error,
    },
    /// The size is zero or does not fit the address space.
    #[error("cannot map {0:#x} bytes: the size is zero or too large")]
    BadSize(u64),
    /// `mmap()` failed.
    #[error("mapping {size:#x} bytes at file offset {offset:#x} failed: {source}")]
    Map {
        /// Requested size.
        size: u64,
        /// Requested file offset.
        offset: u64,
        /// The system error.
        source: io::Error,
    },
    /// An access reaches outside the mapping.
    #[error("an access of {len:#x} bytes at {offset:#x} is outside the {size:#x}-byte mapping")]
    OutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the mapping.
        size: usize,
    },
    /// A write to a mapping made read-only.
    #[error("a write of {len:#x} bytes at {offset:#x} hit a read-only mapping")]
    ReadOnly {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
}

/// Creates a memfd of `size` bytes (zero-filled, close-on-exec).
pub fn memfd(name: &CStr, size: u64) -> Result<OwnedFd, MmapError> {
    let display = name.to_string_lossy().into_owned();
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other inputs.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(MmapError::MemfdCreate {
            name: display,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = libc::off_t::try_from(size).map_err(|_| MmapError::BadSize(size))?;
    // SAFETY: `fd` is a valid memfd owned here; ftruncate only resizes it.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(MmapError::MemfdSize {
            name: display,
            size,
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

/// A shared mapping of part of a file.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only reached
// through copies with bounds checks, which are sound from any thread (concurrent
// writers only make the copied bytes unpredictable, never out of bounds).
unsafe impl Send for Mapping {}
// SAFETY: as above: no method hands out references into the memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `size` bytes of `fd` from `offset`, shared, readable and, if `writable`,
    /// writable.
    pub fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        writable: bool,
    ) -> Result<Self, MmapError> {
        let len = usize::try_from(size)
            .ok()
            .filter(|l| *l > 0 && *l <= isize::MAX as usize)
            .ok_or(MmapError::BadSize(size))?;
        let file_offset = libc::off_t::try_from(offset).map_err(|_| MmapError::Map {
            size,
            offset,
            source: io::Error::from_raw_os_error(libc::EOVERFLOW),
        })?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new mapping at an address of the kernel's choice, so no existing
        // memory is affected; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MmapError::Map {
                size,
                offset,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(MmapError::Map {
            size,
            offset,
            source: io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        Ok(Mapping { ptr, len, writable })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `out.len()` bytes from `offset` into `out`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), MmapError> {
        let start = self.check(offset, out.len())?;
        // SAFETY: `check` proved `start..start + out.len()` lies within the mapping,
        // and `out` is a distinct local buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MmapError> {
        if !self.writable {
            return Err(MmapError::ReadOnly {
                offset,
                len: data.len(),
            });
        }
        let start = self.check(offset, data.len())?;
        // SAFETY: `check` proved the range lies within the mapping, which is writable;
        // `data` is a distinct buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), data.len())
        };
        Ok(())
    }

    /// Reads the aligned 32-bit word at `offset` with a volatile load (for polling a
    /// location another process writes).
    pub fn read_u32_volatile(&self, offset: u64) -> Result<u32, MmapError> {
        let start = self.check(offset, 4)?;
        if !start.is_multiple_of(4) {
            return Err(MmapError::OutOfRange {
                offset,
                len: 4,
                size: self.len,
            });
        }
        // SAFETY: in bounds (checked) and 4-byte aligned (the mapping is page aligned
        // and `start` is a multiple of 4).
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(start).cast::<u32>()) })
    }

    /// Stores the aligned 32-bit word at `offset` with a volatile store.
    pub fn write_u32_volatile(&self, offset: u64, value: u32) -> Result<(), MmapError> {
        if !self.writable {
            return Err(MmapError::ReadOnly { offset, len: 4 });
        }
        let start = self.check(offset, 4)?;
        if !start.is_multiple_of(4) {
            return Err(MmapError::OutOfRange {
                offset,
                len: 4,
                size: self.len,
            });
        }
        // SAFETY: in bounds, aligned (see `read_u32_volatile`) and writable.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(start).cast::<u32>(), value) };
        Ok(())
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, MmapError> {
        usize::try_from(offset)
            .ok()
            .filter(|start| start.checked_add(len).is_some_and(|end| end <= self.len))
            .ok_or(MmapError::OutOfRange {
                offset,
                len,
                size: self.len,
            })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value created and nothing else
        // refers to it (no references into it were handed out).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn bounds_are_checked() {
        let fd = memfd(c"t", 0x1000).unwrap();
        let m = Mapping::new(fd.as_fd(), 0, 0x1000, true).unwrap();
        m.write(0xffc, &[1, 2, 3, 4]).unwrap();
        assert_eq!(m.read_u32_volatile(0xffc).unwrap(), 0x0403_0201);
        assert!(m.write(0xffd, &[0; 4]).is_err());
        assert!(m.read(u64::MAX, &mut [0; 2]).is_err());
        assert!(m.read_u32_volatile(2).is_err());
        let ro = Mapping::new(fd.as_fd(), 0, 0x1000, false).unwrap();
        assert!(ro.write(0, &[0]).is_err());
    }
}
