//! Mappings of a device's BAR memory into this process, and which parts of them go into
//! KVM memory slots.
//!
//! [`DeviceMmap`] owns one shared mapping of an mmap-able area of a region (unmapped on
//! drop). [`mappable_pieces`] is the one place that decides what of a BAR is mapped into the
//! guest: the mmap-able areas minus the trapped pages (the MSI-X table and PBA now; ranges a
//! mediator traps later), all page-aligned.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use resources::layout::PAGE_SIZE;

/// One shared mapping of part of a device region, unmapped on drop.
#[derive(Debug)]
pub struct DeviceMmap {
    bar_offset: u64,
    size: u64,
    host: u64,
    writable: bool,
}

impl DeviceMmap {
    /// Maps `size` bytes of `fd` at `file_offset`, which hold offset `bar_offset` of the
    /// BAR. All three must be page-aligned and `size` non-zero.
    pub fn new(
        fd: BorrowedFd<'_>,
        file_offset: u64,
        bar_offset: u64,
        size: u64,
        writable: bool,
    ) -> io::Result<Self> {
        let aligned = [file_offset, bar_offset, size]
            .iter()
            .all(|v| v % PAGE_SIZE == 0);
        let len = usize::try_from(size).ok().filter(|_| aligned && size > 0);
        let off = libc::off_t::try_from(file_offset).ok();
        let (Some(len), Some(off)) = (len, off) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {size:#x} bytes at file offset {file_offset:#x} for BAR offset {bar_offset:#x}: not page-aligned or too large"),
            ));
        };
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new shared mapping chosen by the kernel (no address hint), so it
        // replaces nothing; the result is checked below and owned by the returned value.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(DeviceMmap {
            bar_offset,
            size,
            host: addr as u64,
            writable,
        })
    }

    /// Host address of the first mapped byte.
    #[cfg(test)]
    pub fn host_addr(&self) -> u64 {
        self.host
    }
}

impl Drop for DeviceMmap {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` is exactly the mapping created in `new` and owned by
        // `self`; no Rust reference points into it. Callers drop it only once no KVM
        // memory slot uses it any more.
        let r = unsafe { libc::munmap(self.host as *mut libc::c_void, self.size as usize) };
        if r != 0 {
            tracing::warn!(
                "munmap of device memory at {:#x} failed: {}",
                self.host,
                io::Error::last_os_error()
            );
        }
    }
}

/// A part of a BAR to map into a memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the BAR.
    pub bar_offset: u64,
    /// Length in bytes (page multiple).
    pub size: u64,
    /// Host address backing it.
    pub host_addr: u64,
    /// Whether the guest may write it directly.
    pub writable: bool,
}

/// The page-aligned area `[offset, offset + size)` shrunk inwards to whole pages, if any
/// page is left.
pub fn align_inwards(offset: u64, size: u64) -> Option<(u64, u64)> {
    let start = offset.checked_next_multiple_of(PAGE_SIZE)?;
    let end = offset.checked_add(size)? / PAGE_SIZE * PAGE_SIZE;
    (start < end).then(|| (start, end - start))
}

/// `[offset, offset + size)` grown outwards to whole pages, as `(start, end)`.
fn align_outwards(offset: u64, size: u64) -> (u64, u64) {
    let start = offset / PAGE_SIZE * PAGE_SIZE;
    let end = offset
        .saturating_add(size)
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(u64::MAX / PAGE_SIZE * PAGE_SIZE);
    (start, end)
}

/// What of `areas` goes into memory slots: every page of them outside the (page-rounded)
/// `trapped` ranges, as maximal pieces in BAR order.
pub fn mappable_pieces(areas: &[DeviceMmap], trapped: &[(u64, u64)]) -> Vec<Piece> {
    let mut holes: Vec<(u64, u64)> = trapped
        .iter()
        .filter(|&&(_, size)| size > 0)
        .map(|&(offset, size)| align_outwards(offset, size))
        .collect();
    holes.sort_unstable();
    let mut pieces = Vec::new();
    for area in areas {
        let end = area.bar_offset + area.size;
        let mut cursor = area.bar_offset;
        for &(h_start, h_end) in &holes {
            if h_end <= cursor || h_start >= end {
                continue;
            }
            if h_start > cursor {
                pieces.push(piece(area, cursor, h_start));
            }
            cursor = cursor.max(h_end);
        }
        if cursor < end {
            pieces.push(piece(area, cursor, end));
        }
    }
    pieces
}

fn piece(area: &DeviceMmap, from: u64, to: u64) -> Piece {
    Piece {
        bar_offset: from,
        size: to - from,
        host_addr: area.host + (from - area.bar_offset),
        writable: area.writable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    fn memfd(size: u64) -> File {
        let f = crate::vfio::testing::memfd("mmap-test").unwrap();
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn pieces_skip_trapped_pages() {
        let f = memfd(0x10000);
        let area = DeviceMmap::new(f.as_fd(), 0, 0, 0x4000, true).unwrap();
        let host = area.host_addr();
        // The MSI-X table in page 2 (not page-aligned) and the PBA in page 3.
        let pieces = mappable_pieces(&[area], &[(0x2010, 0x80), (0x3000, 8)]);
        assert_eq!(
            pieces,
            vec![Piece {
                bar_offset: 0,
                size: 0x2000,
                host_addr: host,
                writable: true
            }]
        );
        let area = DeviceMmap::new(f.as_fd(), 0x4000, 0x8000, 0x4000, false).unwrap();
        let host = area.host_addr();
        let pieces = mappable_pieces(&[area], &[(0x9000, 0x1000)]);
        let got: Vec<_> = pieces
            .iter()
            .map(|p| (p.bar_offset, p.size, p.host_addr))
            .collect();
        assert_eq!(
            got,
            vec![(0x8000, 0x1000, host), (0xa000, 0x2000, host + 0x2000)]
        );
    }

    #[test]
    fn unaligned_requests_are_refused() {
        let f = memfd(0x2000);
        assert!(DeviceMmap::new(f.as_fd(), 0x10, 0, 0x1000, true).is_err());
        assert!(DeviceMmap::new(f.as_fd(), 0, 0, 0, true).is_err());
        assert_eq!(align_inwards(0x10, 0x2000), Some((0x1000, 0x1000)));
        assert_eq!(align_inwards(0x10, 0x100), None);
        assert_eq!(align_inwards(u64::MAX - 5, 4), None);
    }
}
